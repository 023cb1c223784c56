"""The imagefolder format: HuggingFace's image-folder layout, ``metadata.jsonl`` or ``metadata.csv`` with the images.

Either the folder holds the metadata itself (its ``file_name`` entries may point into subfolders), or each split has
a subfolder with its own metadata, named ``train``, ``validation``, ``valid``, ``val`` or ``test``. Its name is the
split of its rows (``validation`` and ``valid`` become ``val``) unless a row has a split column, and the default id
of a row there is ``FOLDER/FILE_NAME`` without the extension, as the same file gets in the single-metadata layout.
"""

from __future__ import annotations

from pathlib import Path

from cliptrace.data.formats.delimited import Lines, add_csv, csv_header
from cliptrace.data.formats.format import Format
from cliptrace.data.formats.jsonl import add_jsonl
from cliptrace.data.formats.rows import SPLIT_WORDS, OnError, RecordSet, split_name
from cliptrace.data.formats.text import read_text
from cliptrace.data.record import DatasetError, Record

METADATA = ("metadata.jsonl", "metadata.csv")


def _metadata(folder: Path) -> list[Path]:
    """The metadata files of ``folder``."""
    return [folder / name for name in METADATA if (folder / name).is_file()]


def _split_folders(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` named after a split and holding metadata, by name."""
    children = [folder / name for name in SPLIT_WORDS]
    return sorted(child for child in children if child.is_dir() and _metadata(child))


def _add_folder(records: RecordSet, folder: Path, *, id_prefix: str, **options) -> None:
    """Add the rows of one folder's metadata to ``records``."""
    found = _metadata(folder)
    if len(found) != 1:
        problem = "holds both metadata.jsonl and metadata.csv" if found else "has no metadata.jsonl or metadata.csv"
        raise DatasetError(str(folder), None, problem)
    metadata = found[0]
    if metadata.suffix == ".jsonl":
        add_jsonl(records, metadata, image_key="file_name", id_prefix=id_prefix, **options)
        return
    header = csv_header(Lines(read_text(metadata)), ",", str(metadata))
    caption_key = next((name for name in ("text", "caption", "captions") if name in header), "text")
    add_csv(records, metadata, image_key="file_name", caption_key=caption_key, id_prefix=id_prefix, **options)


def read_image_folder(
    path: str | Path,
    *,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Read a HuggingFace ``imagefolder`` directory: ``metadata.jsonl`` or ``metadata.csv`` beside the images, or in
    each split subfolder (see the module docstring).

    The metadata has a ``file_name`` column and a ``text``, ``caption`` or ``captions`` column.

    Args:
        path: The directory.
        split_key: Optional split column.
        id_key: Optional id column; by default the id is ``file_name`` without its extension.
        label_key: Optional class-label column.
        default_split: Split of rows without one, in the single-metadata layout.
        on_error: Receives each broken row, which is then skipped; when None the first one raises.
    """
    folder = Path(path)
    options = dict(split_key=split_key, id_key=id_key, label_key=label_key, on_error=on_error)
    records = RecordSet()
    splits = [] if _metadata(folder) else _split_folders(folder)
    if not splits:
        _add_folder(records, folder, id_prefix="", default_split=default_split, **options)
    for split in splits:
        _add_folder(records, split, id_prefix=f"{split.name}/", default_split=split_name(split.name), **options)
    return records.records()


def _find(directory: Path) -> Path | None:
    """The directory itself when it, or one of its subfolders, holds image-folder metadata."""
    return directory if _metadata(directory) or _split_folders(directory) else None


FORMAT = Format(
    name="imagefolder",
    summary=(
        "a HuggingFace image folder (a directory with metadata.jsonl or metadata.csv, or split subfolders with one "
        "each)"
    ),
    read=read_image_folder,
    find=_find,
)
