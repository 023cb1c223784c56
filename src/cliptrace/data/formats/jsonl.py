"""The jsonl format: JSON lines, one object per image."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from cliptrace.data.formats.format import Format, named_file
from cliptrace.data.formats.rows import (
    CAPTION_KEYS,
    IMAGE_KEYS,
    Broken,
    OnError,
    RecordSet,
    as_object,
    captions_of,
    default_id,
    file_entry,
    image_path,
    optional_text,
    report,
    root_of,
)
from cliptrace.data.formats.text import json_problem, read_text
from cliptrace.data.record import DatasetError, Record


def _object_row(
    row: dict,
    records: RecordSet,
    *,
    image_keys: Sequence[str],
    caption_keys: Sequence[str],
    id_key: str | None,
    split_key: str | None,
    label_key: str | None,
    default_split: str,
    root: str,
    id_prefix: str,
) -> None:
    """Add one JSON object (image path, caption or captions, optional id/split/label) to ``records``."""
    image_key = next((key for key in image_keys if row.get(key) is not None), None)
    if image_key is None:
        raise Broken(f"missing key {' / '.join(map(repr, image_keys))}")
    caption_key = next((key for key in caption_keys if row.get(key) is not None), None)
    if caption_key is None:
        raise Broken(f"missing key {' / '.join(map(repr, caption_keys))}")
    image = image_path(row[image_key], root, image_key)
    captions = captions_of(row[caption_key], caption_key)
    record_id = optional_text(row.get(id_key), id_key) if id_key else None
    split = optional_text(row.get(split_key), split_key) if split_key else None
    label = optional_text(row.get(label_key), label_key) if label_key else None
    records.add(record_id or id_prefix + default_id(row[image_key]), image, captions, split or default_split, label)


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
    records = RecordSet()
    add_jsonl(
        records, Path(path), image_key=image_key, caption_key=caption_key, split_key=split_key, id_key=id_key,
        label_key=label_key, default_split=default_split, image_root=image_root, on_error=on_error,
    )
    return records.records()


def add_jsonl(
    records: RecordSet,
    path: Path,
    *,
    image_key: str = "image",
    caption_key: str | None = None,
    split_key: str | None = "split",
    id_key: str | None = "id",
    label_key: str | None = "label",
    default_split: str = "train",
    image_root: str | Path | None = None,
    on_error: OnError = None,
    id_prefix: str = "",
) -> None:
    """Add the objects of a JSON-lines file to ``records`` (see :func:`read_jsonl`); default ids start with
    ``id_prefix``."""
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
        root=root_of(path, image_root),
        id_prefix=id_prefix,
    )
    for line, text in enumerate(read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as error:
                raise Broken(f"invalid JSON ({json_problem(error)})") from None
            _object_row(as_object(row), records, **options)
        except Broken as broken:
            report(DatasetError(source, f"line {line}", str(broken)), on_error)


def write_jsonl_lines(path: Path, entries: Iterable[dict]) -> None:
    """Write ``entries`` (JSON objects) to a JSON-lines file, one per line."""
    with path.open("w", encoding="utf-8") as file:
        file.writelines(json.dumps(entry) + "\n" for entry in entries)


def write_jsonl(records: Sequence[Record], directory: Path) -> Path:
    """Write ``records`` as ``DIRECTORY/captions.jsonl`` with absolute image paths; return its path."""
    directory.mkdir(parents=True)
    path = directory / "captions.jsonl"
    write_jsonl_lines(path, [file_entry(record) for record in records])
    return path


FORMAT = Format(
    name="jsonl",
    summary="JSON lines (.jsonl, or a directory with captions.jsonl)",
    read=read_jsonl,
    suffixes=(".jsonl",),
    find=named_file("captions.jsonl"),
    write=write_jsonl,
)
