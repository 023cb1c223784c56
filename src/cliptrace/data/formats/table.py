"""Records from Arrow tables (HuggingFace ``save_to_disk`` files and parquet): columns found, rows checked.

An image column holds, per row, image bytes (a binary column, or the ``{bytes, path}`` struct of the ``datasets``
Image feature) or an image path (a string column, or the struct with null bytes). A row with bytes gets the
reference ``FILE::COLUMN[ROW]`` (see :mod:`cliptrace.data.tables`), opened lazily; a path is resolved against the
image root. A caption column holds a caption string or a list of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cliptrace.data.formats.rows import (
    Broken,
    OnError,
    RecordSet,
    captions_of,
    image_path,
    optional_text,
    report,
)
from cliptrace.data.record import DatasetError
from cliptrace.data.tables import table_ref

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_bytes")
CAPTION_COLUMNS = ("caption", "text", "captions", "sentences")


@dataclass(frozen=True)
class Columns:
    """The columns records are made of."""

    image: str
    captions: tuple[str, ...]
    id: str | None
    split: str | None
    label: str | None


def _pick(names: Sequence[str], wanted: str | Sequence[str] | None, defaults: Sequence[str]) -> list[str]:
    """The columns asked for (all must exist), or the first default one present."""
    if wanted is not None:
        return [wanted] if isinstance(wanted, str) else list(wanted)
    return [name for name in defaults if name in names][:1]


def columns(
    schema: pa.Schema,
    source: str,
    *,
    image_key: str | None,
    caption_key: str | Sequence[str] | None,
    id_key: str | None,
    split_key: str | None,
    label_key: str | None,
) -> Columns:
    """The image, caption, id, split and label columns of ``schema``; a DatasetError listing the columns when the
    image or caption column is missing."""
    names = list(schema.names)
    images = _pick(names, image_key, IMAGE_COLUMNS)
    captions = _pick(names, caption_key, CAPTION_COLUMNS)
    for kind, found, option, defaults in (
        ("image", images, "image_key", IMAGE_COLUMNS),
        ("caption", captions, "caption_key", CAPTION_COLUMNS),
    ):
        missing = [name for name in found if name not in names]
        if missing or not found:
            asked = f"no column {missing}" if missing else f"no {kind} column (none of {list(defaults)})"
            raise DatasetError(source, None, f"{asked}; the columns are {names}; choose one with {option}")
    if len(images) != 1:
        raise DatasetError(source, None, f"image_key must name one column, not {images}")
    image_type = schema.field(images[0]).type
    if not (_is_binary(image_type) or _is_string(image_type) or _is_image_struct(image_type)):
        raise DatasetError(
            source, None,
            f"column {images[0]!r} holds {image_type}, not image bytes, a {{bytes, path}} struct or image paths",
        )

    def optional(key: str | None) -> str | None:
        return key if key is not None and key in names else None

    return Columns(images[0], tuple(captions), optional(id_key), optional(split_key), optional(label_key))


def _is_binary(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_string(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_image_struct(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} >= {"bytes", "path"}


def _images(column: Any) -> tuple[list[bool], list[str | None]]:
    """(whether the row holds bytes, its path or None) of every row of an image column, chunk by chunk so that no
    image bytes are copied."""
    import pyarrow as pa

    holds_bytes: list[bool] = []
    paths: list[str | None] = []
    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if _is_binary(chunk.type):
            holds_bytes += chunk.is_valid().to_pylist()
            paths += [None] * len(chunk)
        elif _is_string(chunk.type):
            holds_bytes += [False] * len(chunk)
            paths += chunk.to_pylist()
        else:
            fields = dict(zip((field.name for field in chunk.type), chunk.flatten()))
            holds_bytes += fields["bytes"].is_valid().to_pylist()
            paths += fields["path"].to_pylist()
    return holds_bytes, paths


@dataclass(frozen=True)
class Part:
    """Where a table's rows come from and what they are called.

    Attributes:
        file: The absolute path of the Arrow or parquet file (image references point into it).
        first_row: Row number, in ``file``, of the table's first row.
        split: Split of rows without a split value.
        id_prefix: Prefix of default ids (the row's number among its part's rows, counted from ``first_id``).
        first_id: Number in the default id of the table's first row.
        root: Directory image paths are relative to.
    """

    file: str
    first_row: int
    split: str
    id_prefix: str
    first_id: int
    root: str


def add_rows(records: RecordSet, table: Any, found: Columns, part: Part, on_error: OnError) -> None:
    """Add the rows of an Arrow table (or record batch) to ``records``."""
    holds_bytes, paths = _images(table.column(found.image))
    captions = [table.column(name).to_pylist() for name in found.captions]
    optional = {
        kind: table.column(name).to_pylist() if name is not None else [None] * table.num_rows
        for kind, name in (("id", found.id), ("split", found.split), ("label", found.label))
    }
    for index in range(table.num_rows):
        row = part.first_row + index
        try:
            if holds_bytes[index]:
                image = table_ref(part.file, found.image, row)
            elif paths[index]:
                image = image_path(paths[index], part.root, found.image)
            else:
                raise Broken(f"no image in {found.image!r} (neither bytes nor a path)")
            texts = [text for name, values in zip(found.captions, captions)
                     for text in captions_of(values[index], name)]
            record_id = optional_text(optional["id"][index], found.id or "id")
            records.add(
                record_id or f"{part.id_prefix}{part.first_id + index}",
                image,
                texts,
                optional_text(optional["split"][index], found.split or "split") or part.split,
                optional_text(optional["label"][index], found.label or "label"),
            )
        except Broken as broken:
            report(DatasetError(part.file, f"row {row}", str(broken)), on_error)
