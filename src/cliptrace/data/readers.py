"""Reading a dataset in any registered format (see :mod:`cliptrace.data.formats`), told from its path.

Every reader returns ``list[Record]`` with absolute image references, in file order. A broken row raises a
:class:`DatasetError` naming the file and the row (1-based line for CSV/JSONL, counting the header; list index for
JSON; member key for tar shards; row number for parquet and Arrow), or, when ``on_error`` is given, is passed to it
and skipped. Problems with the file as a whole (missing, not UTF-8, not JSON, missing CSV column) always raise. Image
files themselves are not opened here: :func:`cliptrace.data.check.check_dataset` does that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cliptrace.data.formats import FORMATS, REGISTRY, SUPPORTED, Format, Probe, by_name
from cliptrace.data.formats.coco import read_coco
from cliptrace.data.formats.delimited import read_csv
from cliptrace.data.formats.hf import read_hf
from cliptrace.data.formats.imagefolder import read_image_folder
from cliptrace.data.formats.jsonl import read_jsonl
from cliptrace.data.formats.karpathy import read_karpathy
from cliptrace.data.formats.parquet import read_parquet
from cliptrace.data.formats.rows import CAPTION_KEYS, IMAGE_EXTENSIONS, IMAGE_KEYS
from cliptrace.data.formats.text import is_pattern
from cliptrace.data.formats.webdataset import read_webdataset, shards
from cliptrace.data.record import DatasetError, Record

__all__ = [
    "CAPTION_KEYS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "IMAGE_KEYS",
    "SUPPORTED",
    "dataset_path",
    "format_of",
    "list_shards",
    "load_records",
    "read_coco",
    "read_csv",
    "read_hf",
    "read_image_folder",
    "read_jsonl",
    "read_karpathy",
    "read_parquet",
    "read_webdataset",
    "select_split",
]


def _candidates(path: Path) -> tuple[list[Format], Path]:
    """The formats ``path`` may be in (several only for a file whose suffix they share) and the path to read."""
    if is_pattern(str(path)) and not path.exists():
        globbing = [format for format in REGISTRY if format.patterns]
        matching = [format for format in globbing if path.suffix.lower() in format.suffixes]
        return matching or globbing[:1], path
    if not path.exists():
        raise DatasetError(str(path), None, "no such file or directory")
    if path.is_dir():
        found = [(format, target) for format in REGISTRY if (target := format.located(path)) is not None]
        if len(found) == 1:
            return [found[0][0]], found[0][1]
        if found:
            names = ", ".join(f"{target} ({format.name})" for format, target in found)
            raise DatasetError(
                str(path), None, f"holds several datasets: {names}; pass one of them as the path, or choose a format"
            )
        raise DatasetError(str(path), None, f"holds no dataset; supported: {SUPPORTED}")
    matching = [format for format in REGISTRY if path.suffix.lower() in format.suffixes]
    if not matching:
        raise DatasetError(str(path), None, f"cannot tell the dataset format; supported: {SUPPORTED}")
    return matching, path


def _detected(path: Path) -> tuple[Format, Path, Probe | None]:
    """The format of ``path``, the path to read, and the probe that told it by content (None when the path did)."""
    formats, target = _candidates(path)
    if len(formats) == 1:
        return formats[0], target, None
    probe = Probe(target)
    claimed = next((format for format in formats if format.claims is not None and format.claims(probe)), None)
    if claimed is None:
        contents = " nor ".join(format.content for format in formats)
        raise DatasetError(str(target), None, f"a {target.suffix.lower()} file that is neither {contents}")
    return claimed, target, probe


def _format(name: str, path: Path) -> Format:
    """The registered format ``name``."""
    format = by_name(name)
    if format is None:
        raise DatasetError(str(path), None, f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return format


def _check_options(format: Format, source: str, options: dict) -> None:
    """Raise a DatasetError when the reader of ``format`` does not take every one of ``options``."""
    unknown = sorted(set(options) - set(format.options))
    if unknown:
        problem = f"the {format.name} reader takes no option {unknown}; it takes {format.options}"
        raise DatasetError(source, None, problem)


def dataset_path(path: str | Path, format: str = "auto") -> Path:
    """The file or directory :func:`load_records` reads for ``path`` (a directory's ``captions.csv``, ...).

    Raises:
        DatasetError: ``format`` is ``auto`` and ``path`` does not exist, holds no dataset or several.
    """
    path = Path(path)
    if format == "auto":
        return _candidates(path)[1]
    if path.is_dir():
        known = by_name(format)
        target = known.located(path) if known is not None else None
        return target if target is not None else path
    return path


def format_of(path: str | Path, format: str = "auto") -> str:
    """The name of the format ``path`` is read in: ``format`` itself unless it is ``auto``.

    Raises:
        DatasetError: ``auto`` cannot tell the format of ``path`` (see :func:`load_records`).
    """
    return format if format != "auto" else _detected(Path(path))[0].name


def load_records(path: str | Path, format: str = "auto", **options: Any) -> list[Record]:
    """Read a dataset in any supported format.

    Args:
        path: A dataset file, directory or glob (see :data:`SUPPORTED`).
        format: One of :data:`FORMATS`, or ``auto`` to tell it from the path (and, for ``.json``, the content).
        **options: Passed to the format's reader (e.g. ``image_key``, ``caption_key``, ``sep``, ``image_root``,
            ``on_error``); a reader refuses an option it does not take.
    """
    path = Path(path)
    if format != "auto":
        chosen = _format(format, path)
        _check_options(chosen, str(path), options)
        return chosen.read(dataset_path(path, format), **options)
    detected, target, probe = _detected(path)
    _check_options(detected, str(path), options)
    return detected.read(target, **options) if probe is None else detected.load(probe, **options)


def list_shards(path: str | Path) -> list[Path]:
    """The shards of a WebDataset path (a ``.tar`` file, a glob, or a directory of shards or with ``shards/``).

    Raises:
        DatasetError: The path holds another kind of dataset, or no shards.
    """
    formats, target = _candidates(Path(path))
    if formats[0].name != "webdataset":
        names = " or ".join(format.name for format in formats)
        raise DatasetError(str(path), None, f"holds a {names} dataset, not WebDataset .tar shards")
    return shards(target)


def select_split(records: Sequence[Record], split: str | None) -> list[Record]:
    """The records of one split, in order; every record when ``split`` is None."""
    return [record for record in records if split is None or record.split == split]
