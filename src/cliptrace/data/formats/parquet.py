"""The parquet format: parquet files with an image column (bytes, the ``datasets`` Image struct, or paths).

A path names one file, a folder (every ``*.parquet`` below it, by path) or a glob pattern. Without a split column a
file's split comes from the first part of its path, below the folder, that names one: a folder (``train/``) or the
start of a file name (``train-00000-of-00002.parquet``, ``validation.parquet`` -> ``val``); ``default_split`` when
none does. A row's default id is its number among the rows of its split (after ``SPLIT/`` when more than one file is
read). Reading scans the needed columns once, a batch at a time; image bytes stay in the files until loaded.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Sequence
from pathlib import Path

from cliptrace.data.formats.format import Format
from cliptrace.data.formats.rows import SPLIT_WORDS, OnError, RecordSet, split_name
from cliptrace.data.formats.table import Part, add_rows, columns
from cliptrace.data.formats.text import is_pattern
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.tables import import_pyarrow

BATCH_ROWS = 1024


def _files(path: Path) -> list[Path]:
    """The parquet files a path names."""
    if is_pattern(str(path)) and not path.exists():
        files = sorted(Path(name) for name in glob.glob(str(path)))
    elif path.is_dir():
        files = sorted(path.rglob("*.parquet"))
    else:
        files = [path]
    if not files:
        raise DatasetError(str(path), None, "no .parquet files found")
    return files


def _base(path: Path) -> Path | None:
    """The folder that file paths are taken relative to when telling their split: the folder read, or the part of
    a glob pattern before its first wildcard; None for a single file."""
    if path.is_dir():
        return path
    if not is_pattern(str(path)) or path.exists():
        return None
    fixed = []
    for part in path.parts:
        if is_pattern(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def split_of(relative: Path, default_split: str) -> str:
    """The split the path of a parquet file (below the folder read) names (see the module docstring)."""
    for part in (*relative.parent.parts, relative.name):
        word = re.split(r"[-_.]", part, maxsplit=1)[0].lower()
        if word in SPLIT_WORDS:
            return split_name(word)
    return default_split


def read_parquet(
    path: str | Path,
    *,
    image_key: str | None = None,
    caption_key: str | Sequence[str] | None = None,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    image_root: str | Path | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read parquet files of images and captions (see the module docstring).

    Args:
        path: A ``.parquet`` file, a folder of them, or a glob pattern.
        image_key: Image column (bytes, a ``{bytes, path}`` struct, or image paths); by default the first of
            ``image``, ``img``, ``jpg``, ``png``, ``image_bytes``.
        caption_key: Caption column (a string or a list of strings), or several; by default the first of
            ``caption``, ``text``, ``captions``, ``sentences``.
        split_key: Optional split column.
        id_key: Optional id column; by default the id is the row's number in its split.
        label_key: Optional class-label column.
        default_split: Split of rows whose file names none and that have no split value.
        image_root: Directory relative image paths are resolved against; each file's folder when None.
        on_error: Receives each broken row (location ``row N`` of its file), which is then skipped; when None the
            first one raises.
    """
    path = Path(path)
    pa = import_pyarrow(str(path))
    files = _files(path)
    base = _base(path)
    keys = dict(image_key=image_key, caption_key=caption_key, id_key=id_key, split_key=split_key, label_key=label_key)
    records = RecordSet()
    counted: dict[str, int] = {}
    for file in files:
        source = str(file.absolute())
        try:
            handle = pa.parquet.ParquetFile(source)
            schema = handle.schema_arrow
        except FileNotFoundError:
            raise DatasetError(source, None, "file not found") from None
        except (OSError, pa.ArrowException) as error:
            raise DatasetError(source, None, f"not a readable parquet file ({error})") from None
        found = columns(schema, source, **keys)
        relative = file.relative_to(base) if base is not None and file.is_relative_to(base) else Path(file.name)
        split = split_of(relative, default_split)
        root = str(Path(image_root if image_root is not None else file.parent).absolute())
        prefix = f"{split}/" if len(files) > 1 else ""
        needed = list(dict.fromkeys(name for name in (found.image, *found.captions, found.id, found.split, found.label)
                                    if name is not None))
        row = 0
        try:
            for batch in handle.iter_batches(batch_size=BATCH_ROWS, columns=needed):
                part = Part(source, row, split, prefix, counted.get(split, 0) + row, root)
                add_rows(records, batch, found, part, on_error)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as error:
            raise DatasetError(source, f"row {row}", f"cannot read the parquet data ({error})") from None
        counted[split] = counted.get(split, 0) + row
    return records.records()


def _find(directory: Path) -> Path | None:
    """The directory itself when it holds ``.parquet`` files, or its ``data/`` or split-named folders do (as a
    HuggingFace Hub dataset repository keeps them); other folders are not searched, to keep detection cheap."""
    folders = (directory, directory / "data", *(directory / word for word in SPLIT_WORDS))
    return directory if any(any(folder.glob("*.parquet")) for folder in folders if folder.is_dir()) else None


FORMAT = Format(
    name="parquet",
    summary="parquet (.parquet, a glob, or a directory of .parquet files)",
    read=read_parquet,
    suffixes=(".parquet",),
    find=_find,
    patterns=True,
)
