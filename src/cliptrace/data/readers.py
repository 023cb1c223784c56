"""Dataset readers: CSV/TSV, JSONL, COCO captions, Karpathy splits, WebDataset shards and image folders.

Every reader returns ``list[Record]`` with absolute image references, in file order. A broken row raises a
:class:`DatasetError` naming the file and the row (1-based line for CSV/JSONL, counting the header; list index for
JSON; member key for tar shards), or, when ``on_error`` is given, is passed to it and skipped. Problems with the
file as a whole (missing, not UTF-8, not JSON, missing CSV column) always raise. Image files themselves are not
opened here: :func:`cliptrace.data.check.check_dataset` does that.
"""

from __future__ import annotations

import codecs
import csv
import glob
import inspect
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from cliptrace.data.images import SHARD_SEPARATOR
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.shards import TAR_ERRORS, scan_shard

OnError = Callable[[DatasetError], None] | None

FORMATS = ("csv", "jsonl", "coco", "karpathy", "webdataset", "imagefolder")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("captions", "caption", "text")
IMAGE_KEYS = ("image", "file_name", "filepath")
SUPPORTED = (
    "CSV/TSV (.csv, .tsv), JSON lines (.jsonl), COCO captions or Karpathy JSON (.json), WebDataset shards "
    "(.tar, a glob, or a directory of .tar files), a HuggingFace image folder (a directory with metadata.jsonl "
    "or metadata.csv), or a directory with captions.csv, captions.jsonl or shards/*.tar"
)


class _Broken(Exception):
    """A problem with one row; the reader adds the file and the row."""


def _report(error: DatasetError, on_error: OnError) -> None:
    """Raise ``error``, or hand it to ``on_error`` when one is given."""
    if on_error is None:
        raise error
    on_error(error)


@dataclass
class _Entry:
    image: str
    captions: list[str]
    split: str
    label: str | None


class _Records:
    """Records in order of first appearance; rows that share an id (and image) are merged into one record."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._owners: dict[str, str] = {}

    def __contains__(self, record_id: str) -> bool:
        return record_id in self._entries

    def add(self, record_id: str, image: str, captions: Sequence[str], split: str, label: str | None) -> None:
        """Add a row, or raise :class:`_Broken` when it conflicts with an earlier row."""
        entry = self._entries.get(record_id)
        if entry is None:
            owner = self._owners.get(image)
            if owner is not None:
                raise _Broken(f"image {image} already belongs to id {owner!r}")
            self._entries[record_id] = _Entry(image, list(captions), split, label)
            self._owners[image] = record_id
            return
        if entry.image != image:
            raise _Broken(f"id {record_id!r} already has image {entry.image}, not {image}")
        if entry.split != split:
            raise _Broken(f"id {record_id!r} is already in split {entry.split!r}, not {split!r}")
        if entry.label != label:
            raise _Broken(f"id {record_id!r} already has label {entry.label!r}, not {label!r}")
        entry.captions.extend(captions)

    def records(self) -> list[Record]:
        """The merged records."""
        return [
            Record(record_id, entry.image, tuple(entry.captions), entry.split, entry.label)
            for record_id, entry in self._entries.items()
        ]


def _caption(value: Any, name: str) -> str:
    """One stripped, non-empty caption."""
    if not isinstance(value, str):
        raise _Broken(f"{name!r} holds a {type(value).__name__}, not a caption string")
    if not value.strip():
        raise _Broken(f"empty caption in {name!r}")
    return value.strip()


def _captions(value: Any, name: str) -> tuple[str, ...]:
    """Captions from a caption string or a non-empty list of them."""
    if isinstance(value, str):
        return (_caption(value, name),)
    if not isinstance(value, list) or not value:
        raise _Broken(f"{name!r} must be a caption or a non-empty list of captions")
    return tuple(_caption(item, name) for item in value)


def _optional_text(value: Any, name: str) -> str | None:
    """A string or integer field as stripped text; None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _Broken(f"{name!r} must be a string or an integer, not {type(value).__name__}")
    return str(value).strip() or None


def _require(row: dict, key: str) -> Any:
    """The value of a required key."""
    if row.get(key) is None:
        raise _Broken(f"missing key {key!r}")
    return row[key]


def _object(value: Any) -> dict:
    """``value`` when it is a JSON object."""
    if not isinstance(value, dict):
        raise _Broken(f"expected a JSON object, got {type(value).__name__}")
    return value


def _image_path(value: Any, root: str, name: str) -> str:
    """The absolute path of an image path written relative to ``root``."""
    if not isinstance(value, str) or not value.strip():
        raise _Broken(f"{name!r} must be a non-empty path")
    return os.path.abspath(os.path.join(root, value.strip()))


def _default_id(image: str) -> str:
    """The id of a record without one: its image path as written, without the extension."""
    path = PurePosixPath(image.strip())
    if not path.name:
        raise _Broken(f"no id, and the image path {image.strip()!r} has no file name to make one from")
    return str(path.with_suffix(""))


def _root(path: Path, image_root: str | Path | None) -> str:
    """The directory relative image paths are resolved against."""
    return os.path.abspath(image_root if image_root is not None else path.parent)


def _read_text(path: Path) -> str:
    """The UTF-8 text of a metadata file (a byte-order mark is dropped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(str(path), None, "file not found") from None
    except IsADirectoryError:
        raise DatasetError(str(path), None, "is a directory, not a file") from None
    except OSError as error:
        raise DatasetError(str(path), None, f"cannot read the file ({error.strerror})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(str(path), f"line {line}", "not UTF-8 text") from None


def _json_problem(error: ValueError | RecursionError) -> str:
    """What json.loads found wrong: besides JSONDecodeError it raises RecursionError for values nested too deeply and
    ValueError for integers with too many digits to convert."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    return "nested too deeply" if isinstance(error, RecursionError) else str(error).partition(";")[0]


def _load_json(path: Path) -> Any:
    """The parsed content of a JSON file."""
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(str(path), f"line {error.lineno}", f"invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise DatasetError(str(path), None, f"invalid JSON ({_json_problem(error)})") from None


def _is_pattern(text: str) -> bool:
    """Whether ``text`` is a glob pattern."""
    return any(char in text for char in "*?[")


def _split_from_name(name: str) -> str:
    """The split a COCO annotation file name implies (``captions_val2017.json`` -> ``val``); train by default."""
    lowered = name.lower()
    return next((split for split in ("train", "val", "test") if split in lowered), "train")


class _Lines:
    """The physical lines of a text (ended by ``\\n``, ``\\r\\n`` or ``\\r``, as csv.reader sees them), handed out
    one at a time to csv.reader; reading can go back to any line."""

    def __init__(self, text: str) -> None:
        self.lines = list(io.StringIO(text, newline=""))
        self.next = 0
        self.ran_out = False

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.next >= len(self.lines):
            self.ran_out = True
            raise StopIteration
        self.next += 1
        return self.lines[self.next - 1]

    def go_to(self, index: int) -> None:
        """Hand out the line at 0-based ``index`` next."""
        self.next = index
        self.ran_out = False


def _csv_header(lines: _Lines, delimiter: str, source: str) -> list[str]:
    """The fields of the first CSV row (the header); empty for an empty file."""
    try:
        return next(csv.reader(lines, delimiter=delimiter), [])
    except csv.Error as error:
        raise DatasetError(source, "line 1", f"malformed CSV ({error})") from None


def _reads_as_row(line: str, delimiter: str, is_row: Callable[[list[str]], bool]) -> bool:
    """Whether one physical line, read on its own, is a complete row: every quote in it closed, no field holding a
    quote, and ``is_row`` of its fields.

    A line inside a legitimate quoted field that holds a quote holds the one that closes the field, or a doubled one;
    read on its own, either leaves a quote open or puts one in a field.
    """
    try:
        fields = next(csv.reader([line], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return False
    return not any('"' in field for field in fields) and is_row(fields)


def _csv_rows(
    lines: _Lines, delimiter: str, source: str, is_row: Callable[[list[str]], bool], recover: bool
) -> Iterator[tuple[int, list[str], str | None]]:
    """(first line number, fields, unbalanced-quote problem or None) of every CSV row after ``lines``' position.

    A quoted field may hold line breaks. A row whose quoted field is never closed, or takes in lines that read as
    complete rows of their own (``is_row``), or outgrows the csv module's field limit, has an unbalanced quote (a stray
    ``"`` at the start of a field): it is yielded with the problem, naming how many lines it took in, and reading goes
    on at its second line, so a stray quote costs its own row only (``recover`` says so in the problem).
    """
    while True:
        reader = csv.reader(lines, delimiter=delimiter)
        start = lines.next
        problem = None
        try:
            for fields in reader:
                taken = lines.next - start - 1
                if lines.ran_out:
                    problem = "a quoted field opens on this line and is never closed" + (
                        f": it takes in the {taken} line(s) after it, to the end of the file" if taken else ""
                    )
                elif taken:
                    rows = sum(
                        _reads_as_row(line, delimiter, is_row) for line in lines.lines[start + 1 : lines.next]
                    )
                    if rows:
                        problem = (f"a quoted field opens on this line and runs on to line {lines.next}, taking in "
                                   f"{taken} line(s) after it, {rows} of which read as rows of their own")
                if problem is not None:
                    break
                yield start + 1, fields, None
                start = lines.next
            else:
                return
        except csv.Error as error:
            if lines.next - start <= 1:
                raise DatasetError(source, f"line {start + 1}", f"malformed CSV ({error})") from None
            taken = lines.next - start - 1
            problem = f"a quoted field opens on this line and runs on past line {lines.next} ({error})"
        if recover and taken:
            problem += f"; this row is left out and the lines after it are read again as rows, from line {start + 2}"
        yield start + 1, [], f"unbalanced quote: {problem}"
        lines.go_to(start + 1)


def _cell(values: dict[str, str], key: str | None) -> str | None:
    """The stripped value of an optional column; None when the column is absent or the cell empty."""
    if key is None:
        return None
    return (values.get(key) or "").strip() or None


def read_csv(
    path: str | Path,
    *,
    image_key: str = "filepath",
    caption_key: str | Sequence[str] = "title",
    sep: str | None = None,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    image_root: str | Path | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read an open_clip-style CSV/TSV file: one row per caption, rows sharing an image grouped into one record.

    A quoted field may hold line breaks. A row with an unbalanced quote (a quoted field never closed, or one that
    takes in lines reading as complete rows naming an image file) is a broken row at the line the quote opens on,
    naming the lines it took in; with ``on_error``, reading goes on at the next line, so no other row is lost.

    Args:
        path: The CSV or TSV file (UTF-8, with or without a byte-order mark).
        image_key: Column holding the image path, relative to ``image_root``.
        caption_key: Caption column, or several caption columns that all hold captions.
        sep: Field separator; tab for ``.tsv`` files and comma otherwise when None.
        split_key: Optional split column (used when present and non-empty).
        id_key: Optional id column; by default the id is the image path without its extension.
        label_key: Optional class-label column.
        default_split: Split of rows without one.
        image_root: Directory image paths are relative to; the CSV file's directory when None.
        on_error: Receives each broken row, which is then skipped; when None the first one raises.
    """
    path = Path(path)
    source = str(path)
    delimiter = sep if sep is not None else ("\t" if path.suffix.lower() == ".tsv" else ",")
    if len(delimiter) != 1:
        raise DatasetError(source, None, f"the separator must be one character, not {delimiter!r}")
    caption_keys = [caption_key] if isinstance(caption_key, str) else list(caption_key)
    root = _root(path, image_root)
    lines = _Lines(_read_text(path))
    header = _csv_header(lines, delimiter, source)
    if not header:
        raise DatasetError(source, "line 1", "expected a header row naming the columns")
    missing = [key for key in (image_key, *caption_keys) if key not in header]
    if missing:
        hint = f" (is {delimiter!r} the right separator?)" if len(header) == 1 else ""
        raise DatasetError(source, "line 1", f"missing column(s) {missing}; the header has {header}{hint}")
    image_index = header.index(image_key)
    required = [image_index, *(header.index(key) for key in caption_keys)]
    extensions = {extension.lower() for extension in Image.registered_extensions()}

    def is_row(fields: list[str]) -> bool:
        """Whether ``fields`` are a complete row naming an image file (the test for lines a stray quote took in)."""
        return (
            len(fields) == len(header)
            and all(fields[index].strip() for index in required)
            and os.path.splitext(fields[image_index].strip())[1].lower() in extensions
        )

    records = _Records()
    for line, row, quote in _csv_rows(lines, delimiter, source, is_row, recover=on_error is not None):
        if quote is not None:
            _report(DatasetError(source, f"line {line}", quote), on_error)
            continue
        if not "".join(row).strip():
            continue
        try:
            if len(row) != len(header):
                raise _Broken(f"{len(row)} fields, but the header has {len(header)}")
            values = dict(zip(header, row))
            image = values[image_key]
            if not image.strip():
                raise _Broken(f"empty {image_key!r}")
            records.add(
                _cell(values, id_key) or _default_id(image),
                _image_path(image, root, image_key),
                tuple(_caption(values[key], key) for key in caption_keys),
                _cell(values, split_key) or default_split,
                _cell(values, label_key),
            )
        except _Broken as broken:
            _report(DatasetError(source, f"line {line}", str(broken)), on_error)
    return records.records()


def _object_row(
    row: dict,
    records: _Records,
    *,
    image_keys: Sequence[str],
    caption_keys: Sequence[str],
    id_key: str | None,
    split_key: str | None,
    label_key: str | None,
    default_split: str,
    root: str,
) -> None:
    """Add one JSON object (image path, caption or captions, optional id/split/label) to ``records``."""
    image_key = next((key for key in image_keys if row.get(key) is not None), None)
    if image_key is None:
        raise _Broken(f"missing key {' / '.join(map(repr, image_keys))}")
    caption_key = next((key for key in caption_keys if row.get(key) is not None), None)
    if caption_key is None:
        raise _Broken(f"missing key {' / '.join(map(repr, caption_keys))}")
    image = _image_path(row[image_key], root, image_key)
    captions = _captions(row[caption_key], caption_key)
    record_id = _optional_text(row.get(id_key), id_key) if id_key else None
    split = _optional_text(row.get(split_key), split_key) if split_key else None
    label = _optional_text(row.get(label_key), label_key) if label_key else None
    records.add(record_id or _default_id(row[image_key]), image, captions, split or default_split, label)


def read_jsonl(
    path: str | Path,
    *,
    image_key: str = "image",
    caption_key: str | None = None,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    image_root: str | Path | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read a JSON-lines file with one object per image; blank lines are skipped.

    Args:
        path: The ``.jsonl`` file (UTF-8).
        image_key: Key of the image path; ``image``, ``file_name`` and ``filepath`` are tried after it.
        caption_key: Key of a caption string or a list of captions; by default the first of ``captions``,
            ``caption``, ``text`` present.
        split_key: Optional split key.
        id_key: Optional id key; by default the id is the image path without its extension.
        label_key: Optional class-label key.
        default_split: Split of objects without one.
        image_root: Directory image paths are relative to; the file's directory when None.
        on_error: Receives each broken line, which is then skipped; when None the first one raises.
    """
    path = Path(path)
    source = str(path)
    if caption_key is not None and not isinstance(caption_key, str):
        raise DatasetError(source, None, f"caption_key must be one key (it may hold a list), not {caption_key!r}")
    options = dict(
        image_keys=list(dict.fromkeys((image_key, *IMAGE_KEYS))),
        caption_keys=(caption_key,) if caption_key else CAPTION_KEYS,
        id_key=id_key,
        split_key=split_key,
        label_key=label_key,
        default_split=default_split,
        root=_root(path, image_root),
    )
    records = _Records()
    for line, text in enumerate(_read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as error:
                raise _Broken(f"invalid JSON ({_json_problem(error)})") from None
            _object_row(_object(row), records, **options)
        except _Broken as broken:
            _report(DatasetError(source, f"line {line}", str(broken)), on_error)
    return records.records()


def _json_list(data: Any, key: str, source: str, layout: str) -> list:
    """``data[key]`` when ``data`` is an object holding a list there."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DatasetError(source, None, f"expected a {layout} JSON object with an {key!r} list")
    return data[key]


def _image_id(row: dict, key: str) -> int | str:
    """A required integer or string image id."""
    value = _require(row, key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Broken(f"{key!r} must be an integer or a string, not {type(value).__name__}")
    return value


def _coco_records(
    data: Any,
    path: Path,
    *,
    image_root: str | Path | None = None,
    default_split: str | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Records of parsed COCO captions JSON read from ``path``."""
    source = str(path)
    annotations = _json_list(data, "annotations", source, "COCO captions")
    images = _json_list(data, "images", source, "COCO captions")
    split = default_split or _split_from_name(path.name)
    root = _root(path, image_root)
    captions: dict[int | str, list[str]] = {}
    annotated_at: dict[int | str, list[int]] = {}
    for index, annotation in enumerate(annotations):
        try:
            annotation = _object(annotation)
            image_id = _image_id(annotation, "image_id")
            caption = _caption(_require(annotation, "caption"), "caption")
            captions.setdefault(image_id, []).append(caption)
            annotated_at.setdefault(image_id, []).append(index)
        except _Broken as broken:
            _report(DatasetError(source, f"annotations[{index}]", str(broken)), on_error)
    records = _Records()
    known: dict[int | str, int] = {}
    for index, image in enumerate(images):
        try:
            image = _object(image)
            image_id = _image_id(image, "id")
            if image_id in known:
                raise _Broken(f"duplicate image id {image_id!r} (first at images[{known[image_id]}])")
            known[image_id] = index
            file = _image_path(_require(image, "file_name"), root, "file_name")
            if image_id not in captions:
                raise _Broken(f"image {image_id!r} has no caption")
            records.add(str(image_id), file, captions[image_id], split, None)
        except _Broken as broken:
            _report(DatasetError(source, f"images[{index}]", str(broken)), on_error)
    orphans = sorted(index for image_id, indices in annotated_at.items() if image_id not in known for index in indices)
    for index in orphans:
        problem = f"unknown image_id {annotations[index]['image_id']!r}"
        _report(DatasetError(source, f"annotations[{index}]", problem), on_error)
    return records.records()


def read_coco(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    default_split: str | None = None,
    on_error: OnError = None,
) -> list[Record]:
    """Read a COCO captions file (``images`` [{id, file_name}] joined with ``annotations`` [{image_id, caption}]).

    Args:
        path: The annotation file, e.g. ``captions_train2017.json``.
        image_root: Directory ``file_name`` is relative to; the file's directory when None.
        default_split: Split of every record; inferred from the file name (train, val, test) when None.
        on_error: Receives each broken entry (location ``images[i]`` or ``annotations[j]``), which is then
            skipped; when None the first one raises.
    """
    path = Path(path)
    return _coco_records(_load_json(path), path, image_root=image_root, default_split=default_split, on_error=on_error)


def _karpathy_records(
    data: Any,
    path: Path,
    *,
    image_root: str | Path | None = None,
    restval_as: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Records of a parsed Karpathy split file read from ``path``."""
    source = str(path)
    root = _root(path, image_root)
    records = _Records()
    for index, entry in enumerate(_json_list(data, "images", source, "Karpathy")):
        try:
            entry = _object(entry)
            id_key = "cocoid" if entry.get("cocoid") is not None else "imgid"
            image_id = str(_image_id(entry, id_key))
            if image_id in records:
                raise _Broken(f"duplicate {id_key} {image_id}")
            filename = _require(entry, "filename")
            if not isinstance(filename, str) or not filename.strip():
                raise _Broken("'filename' must be a non-empty string")
            folder = _optional_text(entry.get("filepath"), "filepath") or ""
            image = _image_path(os.path.join(folder, filename), root, "filename")
            sentences = _require(entry, "sentences")
            if not isinstance(sentences, list) or not sentences:
                raise _Broken("no caption ('sentences' is empty)")
            captions = [_caption(_require(_object(sentence), "raw"), "raw") for sentence in sentences]
            split = _optional_text(entry.get("split"), "split") or "train"
            records.add(image_id, image, captions, restval_as if split == "restval" else split, None)
        except _Broken as broken:
            _report(DatasetError(source, f"images[{index}]", str(broken)), on_error)
    return records.records()


def read_karpathy(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    restval_as: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    Each ``images`` entry gives ``filename`` (under ``filepath`` when present), ``sentences`` [{raw}], ``split``
    and the id ``cocoid`` (or ``imgid`` when there is none).

    Args:
        path: The JSON file.
        image_root: Directory image paths are relative to; the file's directory when None.
        restval_as: Split given to ``restval`` entries.
        on_error: Receives each broken entry (location ``images[i]``), which is then skipped; when None the first
            one raises.
    """
    path = Path(path)
    return _karpathy_records(_load_json(path), path, image_root=image_root, restval_as=restval_as, on_error=on_error)


def _shards(path: str | Path) -> list[Path]:
    """The shards named by a ``.tar`` path, a glob pattern, or a directory of ``.tar`` files."""
    text = str(path)
    if _is_pattern(text):
        shards = sorted(Path(name) for name in glob.glob(text))
    elif Path(text).is_dir():
        shards = sorted(Path(text).glob("*.tar"))
    else:
        shards = [Path(text)]
    if not shards:
        raise DatasetError(text, None, "no .tar shards found")
    return shards


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset grouping: (directory + basename up to the first dot, lower-cased rest of the basename)."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _member_text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """The UTF-8 text of a shard member."""
    try:
        return tar.extractfile(member).read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _Broken(f"{member.name} is not UTF-8 text") from None


def _shard_sample(
    tar: tarfile.TarFile,
    shard: str,
    key: str,
    parts: dict[str, tarfile.TarInfo],
    records: _Records,
    default_split: str,
) -> None:
    """Add the sample ``key`` of an open shard to ``records``."""
    images = [parts[extension] for extension in IMAGE_EXTENSIONS if extension in parts]
    if not images:
        raise _Broken(f"no image ({', '.join(IMAGE_EXTENSIONS)})")
    if len(images) > 1:
        raise _Broken(f"several images: {', '.join(member.name for member in images)}")
    meta: dict = {}
    if "json" in parts:
        text = _member_text(tar, parts["json"])
        try:
            meta = _object(json.loads(text))
        except (ValueError, RecursionError) as error:
            raise _Broken(f"invalid JSON in {parts['json'].name} ({_json_problem(error)})") from None
    caption_key = next((name for name in CAPTION_KEYS if meta.get(name) is not None), None)
    if caption_key is not None:
        captions = _captions(meta[caption_key], caption_key)
    elif "txt" in parts:
        captions = (_caption(_member_text(tar, parts["txt"]), parts["txt"].name),)
    else:
        raise _Broken(f"no caption ({key}.json with 'captions' or 'caption', or {key}.txt)")
    records.add(
        _optional_text(meta.get("id"), "id") or key,
        f"{os.path.abspath(shard)}{SHARD_SEPARATOR}{images[0].name}",
        captions,
        _optional_text(meta.get("split"), "split") or default_split,
        _optional_text(meta.get("label"), "label"),
    )


def read_webdataset(
    path: str | Path,
    *,
    default_split: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Read WebDataset tar shards: members grouped by key, one image and its captions per key.

    A sample's image is its ``jpg``, ``jpeg``, ``png`` or ``webp`` member; captions come from ``KEY.json``
    (``captions`` list, or ``caption`` / ``text`` string, with optional ``split``, ``label`` and ``id``) or else
    ``KEY.txt`` (the whole text). Image references are ``"/abs/shard.tar::member"``. A truncated shard (see
    :func:`~cliptrace.data.shards.scan_shard`) is reported like a broken sample, at the key of the member that is cut
    (or the whole shard when a header is cut); the samples stored whole before the cut are read.

    Args:
        path: A ``.tar`` file, a glob pattern, or a directory of ``.tar`` files.
        default_split: Split of samples without one.
        on_error: Receives each broken sample (location ``key KEY``), which is then skipped; when None the first
            one raises.
    """
    records = _Records()
    for shard in _shards(path):
        source = str(shard)
        try:
            with tarfile.open(shard, "r:") as tar:
                scan = scan_shard(tar)
                samples: dict[str, dict[str, tarfile.TarInfo]] = {}
                for member in scan.members:
                    key, extension = _member_key(member.name)
                    samples.setdefault(key, {})[extension] = member
                cut_key = _member_key(scan.cut_member)[0] if scan.cut_member else None
                samples.pop(cut_key, None)
                for key, parts in samples.items():
                    try:
                        _shard_sample(tar, source, key, parts, records, default_split)
                    except _Broken as broken:
                        _report(DatasetError(source, f"key {key}", str(broken)), on_error)
                if scan.truncation:
                    where = f"key {cut_key}" if cut_key else f"byte {scan.cut_offset}"
                    _report(DatasetError(source, where, scan.truncation), on_error)
        except DatasetError:
            raise
        except FileNotFoundError:
            raise DatasetError(source, None, "file not found") from None
        except TAR_ERRORS as error:
            raise DatasetError(source, None, f"not a readable uncompressed tar file ({error})") from None
    return records.records()


def read_image_folder(
    path: str | Path,
    *,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    on_error: OnError = None,
) -> list[Record]:
    """Read a HuggingFace ``imagefolder`` directory: ``metadata.jsonl`` or ``metadata.csv`` beside the images.

    The metadata has a ``file_name`` column and a ``text``, ``caption`` or ``captions`` column.

    Args:
        path: The directory.
        split_key: Optional split column.
        id_key: Optional id column; by default the id is ``file_name`` without its extension.
        label_key: Optional class-label column.
        default_split: Split of rows without one.
        on_error: Receives each broken row, which is then skipped; when None the first one raises.
    """
    folder = Path(path)
    found = [folder / name for name in ("metadata.jsonl", "metadata.csv") if (folder / name).is_file()]
    if len(found) != 1:
        problem = "holds both metadata.jsonl and metadata.csv" if found else "has no metadata.jsonl or metadata.csv"
        raise DatasetError(str(folder), None, problem)
    metadata = found[0]
    options = dict(
        split_key=split_key, id_key=id_key, label_key=label_key, default_split=default_split, on_error=on_error
    )
    if metadata.suffix == ".jsonl":
        return read_jsonl(metadata, image_key="file_name", **options)
    header = _csv_header(_Lines(_read_text(metadata)), ",", str(metadata))
    caption_key = next((name for name in ("text", "caption", "captions") if name in header), "text")
    return read_csv(metadata, image_key="file_name", caption_key=caption_key, **options)


_READERS: dict[str, Callable[..., list[Record]]] = {
    "csv": read_csv,
    "jsonl": read_jsonl,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "webdataset": read_webdataset,
    "imagefolder": read_image_folder,
}


def _directory_datasets(path: Path) -> list[tuple[str, Path]]:
    """(format, path to read) of every dataset layout found in the directory ``path``."""
    found: list[tuple[str, Path]] = []
    if any((path / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
        found.append(("imagefolder", path))
    for kind, name in (("csv", "captions.csv"), ("jsonl", "captions.jsonl")):
        if (path / name).is_file():
            found.append((kind, path / name))
    if any(path.glob("*.tar")):
        found.append(("webdataset", path))
    elif any((path / "shards").glob("*.tar")):
        found.append(("webdataset", path / "shards"))
    return found


def _locate(path: Path) -> tuple[str, Path]:
    """(format, path to read) of a dataset path; format ``json`` stands for COCO or Karpathy."""
    if _is_pattern(str(path)) and not path.exists():
        return "webdataset", path
    if not path.exists():
        raise DatasetError(str(path), None, "no such file or directory")
    if path.is_dir():
        found = _directory_datasets(path)
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f"{target} ({kind})" for kind, target in found)
            raise DatasetError(
                str(path), None, f"holds several datasets: {names}; pass one of them as the path, or choose a format"
            )
        raise DatasetError(str(path), None, f"holds no dataset; supported: {SUPPORTED}")
    suffixes = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "json", ".tar": "webdataset"}
    if path.suffix.lower() in suffixes:
        return suffixes[path.suffix.lower()], path
    raise DatasetError(str(path), None, f"cannot tell the dataset format; supported: {SUPPORTED}")


def _check_options(reader: Callable[..., list[Record]], name: str, source: str, options: dict) -> None:
    """Raise a DatasetError when ``reader`` does not take every one of ``options``."""
    accepted = [param for param in inspect.signature(reader).parameters if param != "path"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(source, None, f"the {name} reader takes no option {unknown}; it takes {accepted}")


def dataset_path(path: str | Path, format: str = "auto") -> Path:
    """The file or directory :func:`load_records` reads for ``path`` (a directory's ``captions.csv``, ...).

    Raises:
        DatasetError: ``format`` is ``auto`` and ``path`` does not exist, holds no dataset or several.
    """
    path = Path(path)
    if format == "auto":
        return _locate(path)[1]
    if path.is_dir():
        return next((target for found, target in _directory_datasets(path) if found == format), path)
    return path


def load_records(path: str | Path, format: str = "auto", **options: Any) -> list[Record]:
    """Read a dataset in any supported format.

    Args:
        path: A dataset file, directory or shard glob (see :data:`SUPPORTED`).
        format: One of :data:`FORMATS`, or ``auto`` to tell it from the path (and, for ``.json``, the content).
        **options: Passed to the format's reader (e.g. ``image_key``, ``caption_key``, ``on_error``).
    """
    path = Path(path)
    if format != "auto":
        if format not in _READERS:
            raise DatasetError(str(path), None, f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        _check_options(_READERS[format], format, str(path), options)
        return _READERS[format](dataset_path(path, format), **options)
    detected, target = _locate(path)
    if detected != "json":
        _check_options(_READERS[detected], detected, str(path), options)
        return _READERS[detected](target, **options)
    data = _load_json(target)
    if isinstance(data, dict) and "annotations" in data:
        _check_options(read_coco, "coco", str(path), options)
        return _coco_records(data, target, **options)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
        _check_options(read_karpathy, "karpathy", str(path), options)
        return _karpathy_records(data, target, **options)
    raise DatasetError(
        str(target), None, "JSON that is neither COCO captions ('annotations') nor Karpathy ('images' with 'sentences')"
    )


def list_shards(path: str | Path) -> list[Path]:
    """The shards of a WebDataset path (a ``.tar`` file, a glob, or a directory of shards or with ``shards/``).

    Raises:
        DatasetError: The path holds another kind of dataset, or no shards.
    """
    detected, target = _locate(Path(path))
    if detected != "webdataset":
        raise DatasetError(str(path), None, f"holds a {detected} dataset, not WebDataset .tar shards")
    return _shards(target)


def select_split(records: Sequence[Record], split: str | None) -> list[Record]:
    """The records of one split, in order; every record when ``split`` is None."""
    return [record for record in records if split is None or record.split == split]
