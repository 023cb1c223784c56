"""What every reader shares: broken-row reporting, the merging record set, and the checks of one field."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cliptrace.data.record import DatasetError, Record

OnError = Callable[[DatasetError], None] | None

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("captions", "caption", "text")
IMAGE_KEYS = ("image", "file_name", "filepath")
SPLIT_WORDS = ("train", "validation", "valid", "val", "test")
"""Folder and file names that name a split (HuggingFace's ``train/``, ``validation/``, ``test/``, ...)."""
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
"""Split names taken from folder names, ``DatasetDict`` keys and file names are mapped to the names the rest of the
toolkit uses (``--eval-split`` defaults to ``val``); split values written in the data are kept as they are."""


class Broken(Exception):
    """A problem with one row; the reader adds the file and the row."""


def report(error: DatasetError, on_error: OnError) -> None:
    """Raise ``error``, or hand it to ``on_error`` when one is given."""
    if on_error is None:
        raise error
    on_error(error)


def split_name(name: str) -> str:
    """The split a folder, key or file name stands for: ``validation`` and ``valid`` are ``val``."""
    return SPLIT_ALIASES.get(name.lower(), name)


@dataclass
class _Entry:
    image: str
    captions: list[str]
    split: str
    label: str | None


class RecordSet:
    """Records in order of first appearance; rows that share an id (and image) are merged into one record."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._owners: dict[str, str] = {}

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._entries

    def add(self, record_id: str, image: str, captions: Sequence[str], split: str, label: str | None) -> None:
        """Add a row, or raise :class:`Broken` when it conflicts with an earlier row."""
        entry = self._entries.get(record_id)
        if entry is None:
            owner = self._owners.get(image)
            if owner is not None:
                raise Broken(f"image {image} already belongs to id {owner!r}")
            self._entries[record_id] = _Entry(image, list(captions), split, label)
            self._owners[image] = record_id
            return
        if entry.image != image:
            raise Broken(f"id {record_id!r} already has image {entry.image}, not {image}")
        if entry.split != split:
            raise Broken(f"id {record_id!r} is already in split {entry.split!r}, not {split!r}")
        if entry.label != label:
            raise Broken(f"id {record_id!r} already has label {entry.label!r}, not {label!r}")
        entry.captions.extend(captions)

    def records(self) -> list[Record]:
        """The merged records."""
        return [
            Record(record_id, entry.image, tuple(entry.captions), entry.split, entry.label)
            for record_id, entry in self._entries.items()
        ]


def file_entry(record: Record) -> dict[str, Any]:
    """A record as the row writers write it: ``id``, ``image`` (its file path), ``captions``, ``split``, ``label``.

    Raises:
        DatasetError: The image is a member of a shard or a table row, which a file-based format cannot name.
    """
    if "::" in record.image:
        raise DatasetError(record.image, None, f"record {record.id!r}: its image is not a file, so a file-based "
                                                "dataset cannot name it")
    return {"id": record.id, "image": record.image, "captions": list(record.captions), "split": record.split,
            "label": record.label}


def caption(value: Any, name: str) -> str:
    """One stripped, non-empty caption."""
    if not isinstance(value, str):
        raise Broken(f"{name!r} holds a {type(value).__name__}, not a caption string")
    if not value.strip():
        raise Broken(f"empty caption in {name!r}")
    return value.strip()


def captions_of(value: Any, name: str) -> tuple[str, ...]:
    """Captions from a caption string or a non-empty list of them."""
    if isinstance(value, str):
        return (caption(value, name),)
    if not isinstance(value, list) or not value:
        raise Broken(f"{name!r} must be a caption or a non-empty list of captions")
    return tuple(caption(item, name) for item in value)


def optional_text(value: Any, name: str) -> str | None:
    """A string or integer field as stripped text; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Broken(f"{name!r} must be a string or an integer, not {type(value).__name__}")
    return str(value).strip() or None


def require(row: dict, key: str) -> Any:
    """The value of a required key."""
    if row.get(key) is None:
        raise Broken(f"missing key {key!r}")
    return row[key]


def as_object(value: Any) -> dict:
    """``value`` when it is a JSON object."""
    if not isinstance(value, dict):
        raise Broken(f"expected a JSON object, got {type(value).__name__}")
    return value


def image_path(value: Any, root: str, name: str) -> str:
    """The absolute path of an image path written relative to ``root``."""
    if not isinstance(value, str) or not value.strip():
        raise Broken(f"{name!r} must be a non-empty path")
    return os.path.abspath(os.path.join(root, value.strip()))


def default_id(image: str) -> str:
    """The id of a record without one: its image path as written, without the extension."""
    path = PurePosixPath(image.strip())
    if not path.name:
        raise Broken(f"no id, and the image path {image.strip()!r} has no file name to make one from")
    return str(path.with_suffix(""))


def root_of(path: Path, root: str | Path | None) -> str:
    """The directory relative image paths are resolved against: ``root``, or else the directory of ``path``."""
    return os.path.abspath(root if root is not None else path.parent)


def split_from_name(name: str) -> str:
    """The split a COCO annotation file name implies (``captions_val2017.json`` -> ``val``); train by default."""
    lowered = name.lower()
    return next((split for split in ("train", "val", "test") if split in lowered), "train")


def json_list(data: Any, key: str, source: str, layout: str) -> list:
    """``data[key]`` when ``data`` is an object holding a list there."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(source, None, f"expected a {layout} JSON object with an {key!r} list")
    return data[key]


def id_field(row: dict, key: str) -> int | str:
    """A required integer or string image id."""
    value = require(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Broken(f"{key!r} must be an integer or a string, not {type(value).__name__}")
    return value
