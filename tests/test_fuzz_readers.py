"""Dataset readers on damaged input: only DatasetError naming the file comes out, never a hang."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import signal
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import (
    load_records,
    read_coco,
    read_csv,
    read_image_folder,
    read_jsonl,
    read_karpathy,
    read_webdataset,
)
from cliptrace.data.record import DatasetError, Record


class Hang(Exception):
    """A read ran past its time limit (not an OSError, so the readers' handlers never turn it into a DatasetError)."""


@contextlib.contextmanager
def time_limit(seconds: float = 10.0) -> Iterator[None]:
    """Raise :class:`Hang` in the block once it has run ``seconds``."""

    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)  # again every 0.5 s: a callback may swallow one
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def collect(read: Callable[..., list[Record]], target: Any, **options: Any) -> tuple[list[Record], list[DatasetError]]:
    """Records and every problem reported, reading with ``on_error``."""
    errors: list[DatasetError] = []
    with time_limit():
        records = read(target, on_error=errors.append, **options)
    return records, errors


def write_rows(path: Path, rows: list[list[str]], delimiter: str = ",", bom: bool = False, newline: str = "\r\n",
               quoting: int = csv.QUOTE_MINIMAL) -> str:
    """Write CSV rows with the csv module; the text written."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator=newline, quoting=quoting).writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8-sig" if bom else "utf-8", newline="")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]], format: int = tarfile.PAX_FORMAT,
                pax: dict[str, dict[str, str]] | None = None) -> bytes:
    """Write an uncompressed tar shard of (name, data) members with tarfile; the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax and name in pax:
                info.pax_headers = pax[name]
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


HEADER_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "typeflag": (156, 1),
                 "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155), "sparse": (386, 96),
                 "realsize": (483, 12)}


def number_field(value: int, length: int) -> bytes:
    """``value`` as tar writes numbers: octal digits, or base-256 (first byte 0x80, or 0xff for negative values)."""
    if 0 <= value < 8 ** (length - 1):
        return b"%0*o\0" % (length - 1, value)
    value %= 256 ** (length - 1)
    return (b"\xff" if value >= 256 ** (length - 1) // 2 else b"\x80") + value.to_bytes(length - 1, "big")


def set_header_field(raw: bytearray, header: int, field: str, value: bytes) -> None:
    """Overwrite a field of the header block at ``header`` and fix the header's checksum, so tarfile parses it."""
    start, length = HEADER_FIELDS[field]
    raw[header + start:header + start + length] = value[:length].ljust(length, b"\0")
    raw[header + 148:header + 156] = b" " * 8
    raw[header + 148:header + 156] = b"%06o\0 " % sum(raw[header:header + 512])


def shard_with_header_field(header: int, field: str, value: bytes) -> Callable[[Path], str]:
    """A writer of a shard (an empty image, then its caption) with one header field rewritten."""

    def write(path: Path) -> str:
        raw = bytearray(write_shard(path, [("k0.png", b""), ("k0.txt", b"caption 0")]))
        set_header_field(raw, header, field, value)
        path.write_bytes(raw)
        return "k0.png"

    return write


def shard_with_pax_headers(headers: dict[str, str]) -> Callable[[Path], str]:
    def write(path: Path) -> str:
        write_shard(path, [("k0.png", b"png"), ("k0.txt", b"caption 0")], pax={"k0.png": headers})
        return "k0.png"

    return write


def shard_with_a_chain_of_extended_headers(path: Path) -> str:
    extended = tarfile.TarInfo("././@PaxHeader")
    extended.type = tarfile.XHDTYPE
    image = tarfile.TarInfo("k0.png")
    path.write_bytes(extended.tobuf(tarfile.USTAR_FORMAT) * 3000 + image.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024)
    return "k0.png"


BROKEN_SHARDS = {
    # tarfile went back to the header it had just read, and round again, for ever (memory growing)
    "negative size of the second member": shard_with_header_field(512, "size", number_field(-512, 12)),
    # ImageLoader: ValueError: read length must be non-negative or -1
    "negative size of the first member": shard_with_header_field(0, "size", number_field(-512, 12)),
    # ValueError: cannot fit 'int' into an offset-sized integer
    "size past any offset": shard_with_header_field(0, "size", number_field(2**80, 12)),
    # ValueError: invalid literal for int() with base 10: ''
    "malformed number in a pax header": shard_with_pax_headers({"GNU.sparse.realsize": ""}),
    "malformed sparse map in a pax header": shard_with_pax_headers({"GNU.sparse.map": "x"}),
    # the data tarfile would make up for the holes of a sparse file has no bound
    "sparse file": shard_with_pax_headers({"GNU.sparse.size": str(2**40), "GNU.sparse.map": "0,3"}),
    # RecursionError
    "3000 extended headers in a row": shard_with_a_chain_of_extended_headers,
}


@pytest.mark.parametrize("case", sorted(BROKEN_SHARDS))
def test_shards_that_trip_tarfile_up_are_dataset_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "shard.tar"
    member = BROKEN_SHARDS[case](path)
    with time_limit():
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: not a readable uncompressed tar file"):
            read_webdataset(path, on_error=lambda error: None)
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}: not a readable uncompressed tar file"):
            ImageLoader().read_bytes(f"{path}::{member}")


@pytest.mark.parametrize("image", [".", "/", " / ", "./."])
def test_an_image_path_without_a_file_name_and_no_id_is_a_broken_row(tmp_path: Path, image: str) -> None:
    """pathlib raised ValueError ("PurePosixPath('.') has an empty name") making the default id."""
    problem = f"no id, and the image path {image.strip()!r} has no file name to make one from"
    csv_path = tmp_path / "data.csv"
    write_rows(csv_path, [["filepath", "title"], ["a.png", "fine"], [image, "a caption"]])
    jsonl_path = tmp_path / "data.jsonl"
    jsonl_path.write_text(f'{{"image": "a.png", "caption": "fine"}}\n{json.dumps({"image": image, "caption": "x"})}\n')
    for read, path, line in ((read_csv, csv_path, 3), (read_jsonl, jsonl_path, 2)):
        records, errors = collect(read, path)
        assert records == [Record("a", str(tmp_path / "a.png"), ("fine",))]
        assert [str(error) for error in errors] == [f"{path}, line {line}: {problem}"]
        with pytest.raises(DatasetError, match=re.escape(f"{path}, line {line}: {problem}")):
            read(path)


@pytest.mark.parametrize(("text", "problem"), [
    ("[" * 100_000, "nested too deeply"),  # RecursionError
    ("1" * 5000, "Exceeds the limit (4300 digits) for integer string conversion"),  # ValueError
])
def test_json_nested_too_deeply_or_with_too_long_integers_is_invalid_json(tmp_path: Path, text: str,
                                                                          problem: str) -> None:
    invalid = re.escape(f"invalid JSON ({problem}")
    for name, read in (("captions.json", read_coco), ("dataset.json", read_karpathy), ("data.json", load_records)):
        (tmp_path / name).write_text(text)
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / name))}: {invalid}"):
            read(tmp_path / name)
    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "caption": "fine"}\n' + text + "\n")
    records, errors = collect(read_jsonl, path)
    assert [record.id for record in records] == ["a"]
    assert [(error.location, error.problem.startswith(f"invalid JSON ({problem}")) for error in errors] == [
        ("line 2", True)]
    shard = tmp_path / "shard.tar"
    write_shard(shard, [("k.png", b""), ("k.json", text.encode())])
    records, errors = collect(read_webdataset, shard)
    assert records == [] and [error.location for error in errors] == ["key k"]
    assert errors[0].problem.startswith(f"invalid JSON in k.json ({problem}")


def test_image_folder_with_a_metadata_csv_header_field_over_the_csv_limit(tmp_path: Path) -> None:
    """csv.Error ("field larger than field limit (131072)") came out of the header sniffing."""
    (tmp_path / "metadata.csv").write_text("x" * 200_000 + ",text\n")
    message = rf"^{re.escape(str(tmp_path / 'metadata.csv'))}, line 1: malformed CSV \(field larger than field limit"
    for read in (read_image_folder, load_records):
        with pytest.raises(DatasetError, match=message):
            read(tmp_path)
