"""The csv format: open_clip-style CSV/TSV files, one row per caption."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image

from cliptrace.data.formats.format import Format, named_file
from cliptrace.data.formats.rows import (
    Broken,
    OnError,
    RecordSet,
    caption,
    default_id,
    file_entry,
    image_path,
    report,
    root_of,
)
from cliptrace.data.formats.text import read_text
from cliptrace.data.record import DatasetError, Record


class Lines:
    """The physical lines of a text (ended by ``\\n``, ``\\r\\n`` or ``\\r``, as csv.reader sees them), handed out
    one at a time to csv.reader; reading can go back to any line."""

    def __init__(self, text: str) -> None:
        self.lines = list(io.StringIO(text, newline=""))
        self.next = 0
        self.ran_out = False

    def __iter__(self) -> Lines:
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


def csv_header(lines: Lines, delimiter: str, source: str) -> list[str]:
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
    lines: Lines, delimiter: str, source: str, is_row: Callable[[list[str]], bool], recover: bool
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
    records = RecordSet()
    add_csv(
        records, Path(path), image_key=image_key, caption_key=caption_key, sep=sep, split_key=split_key, id_key=id_key,
        label_key=label_key, default_split=default_split, image_root=image_root, on_error=on_error,
    )
    return records.records()


def add_csv(
    records: RecordSet,
    path: Path,
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
    id_prefix: str = "",
) -> None:
    """Add the rows of a CSV/TSV file to ``records`` (see :func:`read_csv`); default ids start with ``id_prefix``."""
    path = Path(path)
    source = str(path)
    delimiter = sep if sep is not None else ("\t" if path.suffix.lower() == ".tsv" else ",")
    if len(delimiter) != 1:
        raise DatasetError(source, None, f"the separator must be one character, not {delimiter!r}")
    caption_keys = [caption_key] if isinstance(caption_key, str) else list(caption_key)
    root = root_of(path, image_root)
    lines = Lines(read_text(path))
    header = csv_header(lines, delimiter, source)
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

    for line, row, quote in _csv_rows(lines, delimiter, source, is_row, recover=on_error is not None):
        if quote is not None:
            report(DatasetError(source, f"line {line}", quote), on_error)
            continue
        if not "".join(row).strip():
            continue
        try:
            if len(row) != len(header):
                raise Broken(f"{len(row)} fields, but the header has {len(header)}")
            values = dict(zip(header, row))
            image = values[image_key]
            if not image.strip():
                raise Broken(f"empty {image_key!r}")
            records.add(
                id_prefix + (_cell(values, id_key) or default_id(image)),
                image_path(image, root, image_key),
                tuple(caption(values[key], key) for key in caption_keys),
                _cell(values, split_key) or default_split,
                _cell(values, label_key),
            )
        except Broken as broken:
            report(DatasetError(source, f"line {line}", str(broken)), on_error)


CSV_COLUMNS = ("filepath", "title", "split", "label", "id")
"""The columns :func:`write_csv_rows` writes, as :func:`read_csv` reads them by default."""


def write_csv_rows(path: Path, entries: Iterable[dict]) -> None:
    """Write ``entries`` (``id``, ``image``, ``captions``, ``split``, ``label``) as a CSV file, one row per caption."""
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for entry in entries:
            writer.writerows([entry["image"], caption, entry["split"], entry["label"], entry["id"]]
                             for caption in entry["captions"])


def write_csv(records: Sequence[Record], directory: Path) -> Path:
    """Write ``records`` as ``DIRECTORY/captions.csv`` with absolute image paths; return its path."""
    directory.mkdir(parents=True)
    path = directory / "captions.csv"
    write_csv_rows(path, [file_entry(record) for record in records])
    return path


FORMAT = Format(
    name="csv",
    summary="CSV/TSV (.csv, .tsv, or a directory with captions.csv)",
    read=read_csv,
    suffixes=(".csv", ".tsv"),
    find=named_file("captions.csv"),
    write=write_csv,
)
