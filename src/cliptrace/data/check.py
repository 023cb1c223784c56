"""Validate a dataset: every broken metadata row and every missing or undecodable image, in one pass; and warn of image
paths that leave the dataset root."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cliptrace.data.images import SHARD_SEPARATOR, ImageLoader, load_record_image
from cliptrace.data.options import DataOptions
from cliptrace.data.record import DatasetError, Record


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        path: The dataset checked.
        records: Records that loaded.
        captions: Captions of those records.
        splits: Records per split.
        problems: Every problem found; each names its file (or image reference), location and what is wrong.
        warnings: Records whose image path leaves the dataset root (``../``, an absolute path elsewhere): not wrong
            in itself, but a dataset from elsewhere can point anywhere on the machine, ``/etc`` included.
    """

    path: str
    records: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[DatasetError] = field(default_factory=list)
    warnings: list[DatasetError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


def _dataset_root(path: str | Path, image_root: str | Path | None = None) -> str:
    """The absolute directory a dataset's relative image paths are read from: ``image_root`` when given, else the
    dataset directory, or the directory of the dataset file (the folder above for a file in ``annotations/``, as
    COCO lays its images out beside that folder)."""
    if image_root is not None:
        return os.path.abspath(image_root)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return os.path.abspath(folder.parent if folder.name == "annotations" else folder)


def _outside_root(path: str | Path, records: list[Record], root: str) -> list[DatasetError]:
    """A warning for each record whose image file lies outside ``root`` (judged on the path as written, with ``..``
    resolved; shard members are inside their shard)."""
    return [
        DatasetError(str(path), f"id {record.id}", f"image {record.image} is outside the dataset root {root}")
        for record in records
        if SHARD_SEPARATOR not in record.image and os.path.commonpath([root, os.path.abspath(record.image)]) != root
    ]


def check_dataset(
    path: str | Path,
    data_options: DataOptions | None = None,
    *,
    check_images: bool = True,
    allow_outside_root: bool = False,
    progress: bool = False,
) -> CheckReport:
    """Read a dataset collecting every broken row, then open and decode every image.

    Args:
        path: Any dataset :func:`~cliptrace.data.readers.load_records` reads.
        data_options: How to read it (format, image root, separator, keys); the defaults when None.
        check_images: Also open every image (location ``id ID`` in the problem).
        allow_outside_root: Do not warn of image paths outside the dataset root (the ``image_root`` of
            ``data_options``, or the dataset directory, or the directory of the dataset file).
        progress: Show a progress bar while the images are decoded (on stderr, removed when done).
    """
    data_options = data_options if data_options is not None else DataOptions()
    report = CheckReport(path=str(path))
    try:
        records = data_options.load(path, on_error=report.problems.append)
    except DatasetError as error:
        report.problems.append(error)
        return report
    report.records = len(records)
    report.captions = sum(len(record.captions) for record in records)
    report.splits = dict(sorted(Counter(record.split for record in records).items()))
    if not allow_outside_root:
        report.warnings = _outside_root(path, records, _dataset_root(path, data_options.image_root))
    if check_images:
        loader = ImageLoader()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True, disable=not progress) as bar:
            for record in bar.track(records, description="decoding images"):
                try:
                    load_record_image(loader, record)
                except DatasetError as error:
                    report.problems.append(error)
    if not records and report.ok:
        report.problems.append(DatasetError(str(path), None, "no records"))
    return report
