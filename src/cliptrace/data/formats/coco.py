"""The coco format: COCO captions JSON, alone or in the official layout.

The official layout keeps ``annotations/captions_<split-dir>.json`` beside the image folders ``<split-dir>/``
(``annotations/captions_train2017.json`` and ``train2017/``). Without an ``image_root``, a file's ``file_name``
entries are resolved against the first of these folders that holds the file's first listed image: the JSON's own
folder, ``<split-dir>/`` inside it, ``<split-dir>/`` beside it (``../train2017/``); the JSON's folder when none does.
An ``image_root`` always wins. A directory holding ``annotations/captions_*.json`` (the dataset root) or
``captions_*.json`` is read file by file, each file's split coming from its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cliptrace.data.formats.format import Format, Probe
from cliptrace.data.formats.rows import (
    Broken,
    OnError,
    RecordSet,
    as_object,
    caption,
    id_field,
    image_path,
    json_list,
    report,
    require,
    split_from_name,
)
from cliptrace.data.formats.text import load_json
from cliptrace.data.record import DatasetError, Record

PREFIX = "captions_"


def _first_file_name(images: list) -> str | None:
    """The ``file_name`` of the first image entry that has a usable one."""
    return next(
        (entry["file_name"].strip() for entry in images
         if isinstance(entry, dict) and isinstance(entry.get("file_name"), str) and entry["file_name"].strip()),
        None,
    )


def image_folder(path: Path, images: list) -> str:
    """The folder the ``file_name`` entries of the COCO file ``path`` are relative to (see the module docstring)."""
    folder = path.parent.absolute()
    first = _first_file_name(images)
    stem = path.stem
    if first is None or not stem.startswith(PREFIX) or stem == PREFIX:
        return str(folder)
    split_dir = stem[len(PREFIX):]
    candidates = (folder, folder / split_dir, folder.parent / split_dir)
    found = next((candidate for candidate in candidates if (candidate / first).is_file()), folder)
    return os.path.abspath(found)


def _add_coco(
    records: RecordSet,
    data: Any,
    path: Path,
    *,
    image_root: str | Path | None,
    default_split: str | None,
    on_error: OnError,
) -> None:
    """Add the records of parsed COCO captions JSON read from ``path`` to ``records``."""
    source = str(path)
    annotations = json_list(data, "annotations", source, "COCO captions")
    images = json_list(data, "images", source, "COCO captions")
    split = default_split or split_from_name(path.name)
    root = os.path.abspath(image_root) if image_root is not None else image_folder(path, images)
    captions: dict[int | str, list[str]] = {}
    annotated_at: dict[int | str, list[int]] = {}
    for index, annotation in enumerate(annotations):
        try:
            annotation = as_object(annotation)
            image_id = id_field(annotation, "image_id")
            text = caption(require(annotation, "caption"), "caption")
            captions.setdefault(image_id, []).append(text)
            annotated_at.setdefault(image_id, []).append(index)
        except Broken as broken:
            report(DatasetError(source, f"annotations[{index}]", str(broken)), on_error)
    known: dict[int | str, int] = {}
    for index, image in enumerate(images):
        try:
            image = as_object(image)
            image_id = id_field(image, "id")
            if image_id in known:
                raise Broken(f"duplicate image id {image_id!r} (first at images[{known[image_id]}])")
            known[image_id] = index
            file = image_path(require(image, "file_name"), root, "file_name")
            if image_id not in captions:
                raise Broken(f"image {image_id!r} has no caption")
            records.add(str(image_id), file, captions[image_id], split, None)
        except Broken as broken:
            report(DatasetError(source, f"images[{index}]", str(broken)), on_error)
    orphans = sorted(index for image_id, indices in annotated_at.items() if image_id not in known for index in indices)
    for index in orphans:
        problem = f"unknown image_id {annotations[index]['image_id']!r}"
        report(DatasetError(source, f"annotations[{index}]", problem), on_error)


def annotation_files(directory: Path) -> list[Path]:
    """The ``captions_*.json`` files of a COCO dataset root (in ``annotations/``) or of an annotations folder."""
    return sorted((directory / "annotations").glob(f"{PREFIX}*.json")) or sorted(directory.glob(f"{PREFIX}*.json"))


def _find(directory: Path) -> Path | None:
    """The directory itself when it holds COCO annotation files."""
    return directory if annotation_files(directory) else None


def _files(directory: Path, default_split: str | None) -> list[Path]:
    """The annotation files of a directory, refusing two that give the same split."""
    files = annotation_files(directory)
    if not files:
        raise DatasetError(str(directory), None, f"holds no annotations/{PREFIX}*.json or {PREFIX}*.json")
    by_split: dict[str, list[str]] = {}
    for file in files:
        by_split.setdefault(default_split or split_from_name(file.name), []).append(file.name)
    clashes = {split: names for split, names in by_split.items() if len(names) > 1}
    if clashes:
        split, names = next(iter(clashes.items()))
        raise DatasetError(
            str(directory), None,
            f"holds several COCO caption files for split {split!r}: {', '.join(names)}; pass one of them as the path",
        )
    return files


def read_coco(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    default_split: str | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read a COCO captions file (``images`` [{id, file_name}] joined with ``annotations`` [{image_id, caption}]).

    Args:
        path: The annotation file, e.g. ``captions_train2017.json``, or a directory holding
            ``annotations/captions_*.json`` or ``captions_*.json`` (every file is read).
        image_root: Directory ``file_name`` is relative to; when None, found as the module docstring says.
        default_split: Split of every record; inferred from each file name (train, val, test) when None.
        on_error: Receives each broken entry (location ``images[i]`` or ``annotations[j]``), which is then
            skipped; when None the first one raises.
    """
    path = Path(path)
    records = RecordSet()
    options = dict(image_root=image_root, default_split=default_split, on_error=on_error)
    for file in _files(path, default_split) if path.is_dir() else [path]:
        _add_coco(records, load_json(file), file, **options)
    return records.records()


def _read_probe(
    probe: Probe,
    *,
    image_root: str | Path | None = None,
    default_split: str | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """The records of a probed COCO file, its JSON parsed once."""
    records = RecordSet()
    _add_coco(records, probe.json(), probe.path, image_root=image_root, default_split=default_split, on_error=on_error)
    return records.records()


def _claims(probe: Probe) -> bool:
    """Whether a JSON file holds COCO captions."""
    data = probe.json()
    return isinstance(data, dict) and "annotations" in data


FORMAT = Format(
    name="coco",
    summary="COCO captions JSON (.json, or a folder with annotations/captions_*.json)",
    read=read_coco,
    suffixes=(".json",),
    find=_find,
    claims=_claims,
    content="COCO captions ('annotations')",
    read_probe=_read_probe,
)
