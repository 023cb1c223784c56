"""Validate a dataset: every broken metadata row and every missing or undecodable image, in one pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliptrace.data.images import ImageLoader, load_record_image
from cliptrace.data.readers import load_records
from cliptrace.data.record import DatasetError


@dataclass
class CheckReport:
    """What :func:`check_dataset` found.

    Attributes:
        path: The dataset checked.
        records: Records that loaded.
        captions: Captions of those records.
        splits: Records per split.
        problems: Every problem found; each names its file (or image reference), location and what is wrong.
    """

    path: str
    records: int = 0
    captions: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[DatasetError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.problems


def check_dataset(path: str | Path, format: str = "auto", *, check_images: bool = True, **options: Any) -> CheckReport:
    """Read a dataset collecting every broken row, then open and decode every image.

    Args:
        path: Any dataset :func:`~cliptrace.data.readers.load_records` reads.
        format: Dataset format, or ``auto``.
        check_images: Also open every image (location ``id ID`` in the problem).
        **options: Reader options such as ``image_key``, ``caption_key`` or ``sep``.
    """
    report = CheckReport(path=str(path))
    try:
        records = load_records(path, format, on_error=report.problems.append, **options)
    except DatasetError as error:
        report.problems.append(error)
        return report
    report.records = len(records)
    report.captions = sum(len(record.captions) for record in records)
    report.splits = dict(sorted(Counter(record.split for record in records).items()))
    if check_images:
        loader = ImageLoader()
        for record in records:
            try:
                load_record_image(loader, record)
            except DatasetError as error:
                report.problems.append(error)
    if not records and report.ok:
        report.problems.append(DatasetError(str(path), None, "no records"))
    return report
