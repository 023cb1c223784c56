"""Property-based tests of the dataset readers' contract (see :mod:`cliptrace.data.readers`).

Round trips: datasets generated with arbitrary unicode text are written in every format with the standard library's
writers (csv, json, tarfile) and read back as exactly the records the generator knows. Robustness: arbitrary bytes,
arbitrary JSON and damaged valid files give records or a :class:`DatasetError` naming the file, never another
exception and never a hang. Broken rows: with ``on_error`` the problems reported name exactly the rows broken on
purpose, and the records are exactly the good rows.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import json
import os
import re
import signal
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import (
    CAPTION_KEYS,
    load_records,
    read_coco,
    read_csv,
    read_image_folder,
    read_jsonl,
    read_karpathy,
    read_webdataset,
)
from cliptrace.data.record import DatasetError, Record
from fuzzing import fuzz, workdir


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


# ------------------------------------------------------------------------------------------------------ strategies

TEXT = st.text(st.characters(codec="utf-8"), max_size=6)  # any code point but lone surrogates
SPECIAL = st.sampled_from([
    ",", ";", "\t", '"', "'", "\n", "\r", "\r\n", " ", "\u3000", "\ufeff", "\u2028", "\x85", "\x00", "\\", "{", "[",
    ":", "::", "é", "字", "🙂",
])
MESSY = st.lists(st.one_of(TEXT, SPECIAL), max_size=6).map("".join)
CAPTION = MESSY.filter(lambda text: text.strip())
CELL = st.none() | MESSY | st.sampled_from(["train", "val", "test", " val ", "restval"])
SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=6).filter(
    lambda text: text.strip() == text and text not in (".", "..")
)
STEM = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)
IMAGE_EXTENSION = st.sampled_from([".png", ".jpg", ".jpeg", ".webp", ".PNG", ".JPG"])
PAD = st.sampled_from(["", " ", "  ", "\t"])


@dataclass(frozen=True)
class Item:
    """One generated image: relative path ``stem + extension``, its captions as written, optional fields."""

    stem: str
    extension: str
    captions: tuple[str, ...]
    id: str | int | None = None
    split: str | None = None
    label: str | None = None

    @property
    def image(self) -> str:
        return self.stem + self.extension


def items(ids: st.SearchStrategy = st.none() | MESSY, min_size: int = 0, max_size: int = 5) -> st.SearchStrategy:
    """Lists of items with distinct image paths."""
    item = st.builds(
        Item,
        stem=STEM,
        extension=IMAGE_EXTENSION,
        captions=st.lists(CAPTION, min_size=1, max_size=3).map(tuple),
        id=ids,
        split=CELL,
        label=CELL,
    )
    return st.lists(item, min_size=min_size, max_size=max_size, unique_by=lambda item: item.image)


def text_field(value: str | int | None) -> str | None:
    """An id, split or label as a reader sees it: stripped text, None when absent or blank."""
    return None if value is None else (str(value).strip() or None)


def record_id(item: Item) -> str:
    """The id of an item in the text formats: its id, or its image path without the extension."""
    return text_field(item.id) or item.stem


def distinct_ids(items: list[Item], key: Callable[[Item], str] = record_id) -> bool:
    return len({key(item) for item in items}) == len(items)


def merged(rows: list[tuple[Item, tuple[str, ...]]], root: Path, default_split: str = "train") -> list[Record]:
    """The records of rows (item, captions) in the text formats: grouped by id in order of first appearance."""
    records: dict[str, Record] = {}
    for item, captions in rows:
        stripped = tuple(caption.strip() for caption in captions)
        key = record_id(item)
        if key in records:
            records[key] = dataclasses.replace(records[key], captions=records[key].captions + stripped)
        else:
            split = text_field(item.split) or default_split
            records[key] = Record(key, os.path.join(root, item.image), stripped, split, text_field(item.label))
    return list(records.values())


def without(item: Item, fields: set[str]) -> Item:
    return dataclasses.replace(item, **{name: None for name in fields})


# ------------------------------------------------------------------------------------------------------- checking


def collect(read: Callable[..., list[Record]], target: Any, **options: Any) -> tuple[list[Record], list[DatasetError]]:
    """Records and every problem reported, reading with ``on_error``."""
    errors: list[DatasetError] = []
    with time_limit():
        records = read(target, on_error=errors.append, **options)
    return records, errors


def assert_well_formed(records: list[Record]) -> None:
    """What every successful read returns: records with distinct ids and images, stripped non-empty captions."""
    assert isinstance(records, list)
    for record in records:
        assert isinstance(record, Record)
        assert isinstance(record.id, str)
        assert isinstance(record.captions, tuple) and record.captions
        assert all(isinstance(caption, str) and caption and caption == caption.strip() for caption in record.captions)
        assert isinstance(record.split, str) and record.split
        assert record.label is None or (isinstance(record.label, str) and record.label == record.label.strip() != "")
        assert os.path.isabs(record.image)
    assert len({record.id for record in records}) == len(records)
    assert len({record.image for record in records}) == len(records)


def check_contract(read: Callable[..., list[Record]], target: Any, sources: set[str], **options: Any) -> list | None:
    """Read ``target`` with ``on_error`` and strictly; check the contract; the records, or None after an error.

    Only DatasetError naming one of ``sources`` may come out, within the time limit; problems reported to
    ``on_error`` name a row; the strict read raises the first problem reported, or returns the same records.
    """
    errors: list[DatasetError] = []
    try:
        with time_limit():
            collected = read(target, on_error=errors.append, **options)
    except DatasetError as error:
        assert error.source in sources, error
        assert str(error).startswith(error.source)
        collected = None
    for error in errors:
        assert isinstance(error, DatasetError), error
        assert error.source in sources and error.location is not None, error
        assert str(error).startswith(f"{error.source}, {error.location}: ")
    try:
        with time_limit():
            records = read(target, **options)
    except DatasetError as error:
        assert error.source in sources, error
        assert errors or collected is None, f"only the strict read failed: {error}"
        if errors:
            assert str(error) == str(errors[0])
        return None
    assert collected is not None and not errors
    assert records == collected
    assert_well_formed(records)
    return records


# -------------------------------------------------------------------------------------------------------- writers


def write_rows(path: Path, rows: list[list[str]], delimiter: str = ",", bom: bool = False, newline: str = "\r\n",
               quoting: int = csv.QUOTE_MINIMAL) -> str:
    """Write CSV rows with the csv module; the text written."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=delimiter, lineterminator=newline, quoting=quoting).writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8-sig" if bom else "utf-8", newline="")
    return buffer.getvalue()


def csv_text(rows: list[list[str]]) -> str:
    """Rows as the csv module writes them."""
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def csv_row(item: Item, caption: str) -> list[str]:
    """A row of the default columns filepath, title, id, split, label."""
    return [item.image, caption, *("" if value is None else str(value) for value in (item.id, item.split, item.label))]


CSV_HEADER = ["filepath", "title", "id", "split", "label"]


def jsonl_object(item: Item, captions: tuple[str, ...]) -> dict:
    row: dict[str, Any] = {"image": item.image, "captions": list(captions)}
    row.update({name: value for name in ("id", "split", "label") if (value := getattr(item, name)) is not None})
    return row


def coco_document(items: list[Item]) -> dict:
    return {
        "images": [{"id": item.id, "file_name": item.image} for item in items],
        "annotations": [{"image_id": item.id, "caption": caption} for item in items for caption in item.captions],
    }


def karpathy_document(items: list[Item]) -> dict:
    return {"images": [
        {"filename": item.image, "imgid": item.id, "split": item.split,
         "sentences": [{"raw": caption} for caption in item.captions]}
        for item in items
    ]}


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


# ---------------------------------------------------------------------------------------------------- round trips


@fuzz(60)
@given(data=st.data(), items=items())
def test_csv_and_tsv_round_trip(data: st.DataObject, items: list[Item]) -> None:
    """Rows in any order, any subset and order of the optional columns: records grouped per image, fields stripped."""
    tsv = data.draw(st.booleans(), label="tsv")
    optional = data.draw(st.lists(st.sampled_from(["id", "split", "label"]), unique=True), label="optional columns")
    items = [without(item, {"id", "split", "label"} - set(optional)) for item in items]
    assume(distinct_ids(items))
    header = data.draw(st.permutations(["filepath", "title", *optional]), label="header")
    rows = data.draw(st.permutations([(item, caption) for item in items for caption in item.captions]), label="rows")
    written = []
    for item, caption in rows:
        cells = dict(zip(CSV_HEADER, csv_row(item, caption)))
        cells["filepath"] = data.draw(PAD) + item.image + data.draw(PAD)
        written.append([cells[name] for name in header])
    with workdir() as root:
        path = root / ("data.tsv" if tsv else "data.csv")
        newline = data.draw(st.sampled_from(["\r\n", "\n"]), label="newline")
        # The csv module quotes a field holding \r only when \r is part of the line terminator: quote every field
        # when lines end with \n alone, or the file would hold a bare \r, which ends a CSV row.
        quoting = data.draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]), label="quoting")
        write_rows(path, [header, *written], delimiter="\t" if tsv else ",", bom=data.draw(st.booleans(), label="bom"),
                   newline=newline, quoting=csv.QUOTE_ALL if newline == "\n" else quoting)
        expected = merged([(item, (caption,)) for item, caption in rows], root)
        assert collect(read_csv, path) == (expected, [])
        assert read_csv(path) == expected
        assert load_records(path) == expected


@fuzz(60)
@given(data=st.data(), items=items(ids=st.none() | MESSY | st.integers(-(10**18), 10**18)))
def test_jsonl_round_trip(data: st.DataObject, items: list[Item]) -> None:
    """An image's captions over several lines in any order, any image/caption key, blank lines, CRLF, a BOM."""
    assume(distinct_ids(items))
    chunks = []
    for item in items:
        cuts = sorted(data.draw(st.sets(st.integers(1, len(item.captions) - 1))) if len(item.captions) > 1 else [])
        bounds = [0, *cuts, len(item.captions)]
        chunks.extend((item, item.captions[start:stop]) for start, stop in zip(bounds, bounds[1:]))
    chunks = data.draw(st.permutations(chunks), label="lines")
    newline = data.draw(st.sampled_from(["\n", "\r\n"]), label="newline")
    lines = []
    for item, captions in chunks:
        row: dict[str, Any] = {data.draw(st.sampled_from(["image", "file_name", "filepath"])):
                               data.draw(PAD) + item.image + data.draw(PAD)}
        caption_key = data.draw(st.sampled_from(CAPTION_KEYS))
        single = len(captions) == 1 and data.draw(st.booleans())
        row[caption_key] = captions[0] if single else list(captions)
        for name in ("id", "split", "label"):
            if getattr(item, name) is not None or data.draw(st.booleans()):
                row[name] = getattr(item, name)
        row = dict(data.draw(st.permutations(list(row.items()))))
        lines.append(json.dumps(row, ensure_ascii=data.draw(st.booleans())))
        lines.extend(data.draw(st.lists(st.sampled_from(["", " ", "\t", "\r"]), max_size=1), label="blank lines"))
    text = newline.join(lines) + data.draw(st.sampled_from(["", newline]))
    with workdir() as root:
        path = root / "data.jsonl"
        path.write_text(text, encoding="utf-8-sig" if data.draw(st.booleans(), label="bom") else "utf-8", newline="")
        expected = merged(list(chunks), root)
        assert collect(read_jsonl, path) == (expected, [])
        assert read_jsonl(path) == expected
        assert load_records(path) == expected


COCO_IDS = st.integers(-(2**63), 2**63) | MESSY.filter(str.strip)
COCO_NAMES = st.sampled_from([
    ("captions_train2017.json", "train"), ("captions_val2014.json", "val"), ("image_info_test2015.json", "test"),
    ("annotations.json", "train"),
])


@fuzz(50)
@given(data=st.data(), items=items(ids=COCO_IDS), name=COCO_NAMES)
def test_coco_round_trip(data: st.DataObject, items: list[Item], name: tuple[str, str]) -> None:
    """Annotations in any order join their images; records in image order; split from the file name or given."""
    assume(distinct_ids(items, key=lambda item: str(item.id)))
    annotations = data.draw(st.permutations([(item, caption) for item in items for caption in item.captions]))
    document = {
        "info": {"description": data.draw(MESSY)},
        "images": [{"id": item.id, "file_name": data.draw(PAD) + item.image + data.draw(PAD), "width": 8}
                   for item in items],
        "annotations": [{"image_id": item.id, "id": index, "caption": caption}
                        for index, (item, caption) in enumerate(annotations)],
    }
    default_split = data.draw(st.none() | st.sampled_from(["train", "val", "test", "other"]), label="default_split")
    file_name, name_split = name
    with workdir() as root:
        path = root / "annotations" / file_name
        path.parent.mkdir()
        path.write_text(json.dumps(document, ensure_ascii=data.draw(st.booleans())), encoding="utf-8")
        image_root = data.draw(st.sampled_from([None, root / "images"]), label="image_root")
        base = path.parent if image_root is None else image_root
        expected = [
            Record(str(item.id), os.path.join(base, item.image),
                   tuple(caption.strip() for owner, caption in annotations if owner is item),
                   default_split or name_split)
            for item in items
        ]
        options = dict(image_root=image_root, default_split=default_split)
        assert collect(read_coco, path, **options) == (expected, [])
        assert load_records(path, **options) == expected


@fuzz(50)
@given(data=st.data(), items=items(ids=st.none() | st.integers(0, 10**12), min_size=1),
       restval_as=st.sampled_from(["train", "restval", "val"]))
def test_karpathy_round_trip(data: st.DataObject, items: list[Item], restval_as: str) -> None:
    """filepath + filename, cocoid or else imgid as the id, restval mapped to ``restval_as``."""
    imgids = data.draw(st.lists(st.integers(0, 10**12), min_size=len(items), max_size=len(items), unique=True))
    ids = [str(item.id if item.id is not None else imgid) for item, imgid in zip(items, imgids)]
    assume(len(set(ids)) == len(ids))
    entries = []
    for item, imgid in zip(items, imgids):
        folder, _, filename = item.image.rpartition("/")
        sentences = [{"raw": caption, "tokens": caption.split()} for caption in item.captions]
        entry: dict[str, Any] = {"filename": filename, "imgid": imgid, "split": item.split, "sentences": sentences}
        if folder or data.draw(st.booleans()):
            entry["filepath"] = folder
        if item.id is not None:
            entry["cocoid"] = item.id
        entries.append(entry)
    with workdir() as root:
        path = root / "dataset_coco.json"
        path.write_text(json.dumps({"dataset": "coco", "images": entries}), encoding="utf-8")
        expected = []
        for item, record_id in zip(items, ids):
            split = text_field(item.split) or "train"
            split = restval_as if split == "restval" else split
            captions = tuple(caption.strip() for caption in item.captions)
            expected.append(Record(record_id, os.path.join(root, item.image), captions, split))
        assert collect(read_karpathy, path, restval_as=restval_as) == (expected, [])
        assert load_records(path, restval_as=restval_as) == expected


KEY_SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/.\x00"), min_size=1, max_size=6)


@dataclass(frozen=True)
class Sample:
    """One generated WebDataset sample."""

    key: str
    image_extension: str
    image: bytes
    captions: tuple[str, ...]
    source: str  # "txt", or the JSON key holding the captions
    id: str | int | None
    split: str | None
    label: str | None
    bom: bool

    def members(self, draw: Callable) -> list[tuple[str, bytes]]:
        members = [(f"{self.key}.{self.image_extension}", self.image)]
        bom = b"\xef\xbb\xbf" if self.bom else b""
        if self.source == "txt":
            members.append((f"{self.key}.{draw(st.sampled_from(['txt', 'TXT']))}", bom + self.captions[0].encode()))
        else:
            meta: dict[str, Any] = {self.source: list(self.captions) if self.source == "captions" else self.captions[0]}
            meta.update({name: getattr(self, name) for name in ("id", "split", "label")
                         if getattr(self, name) is not None})
            members.append((f"{self.key}.{draw(st.sampled_from(['json', 'JSON']))}", bom + json.dumps(meta).encode()))
            if draw(st.booleans()):
                members.append((f"{self.key}.txt", draw(MESSY).encode()))  # the JSON captions win
        if draw(st.booleans()):
            members.append((f"{self.key}.{draw(st.sampled_from(['cls', 'seg.png', 'meta.json']))}", b"extra"))
        return members

    def record(self, shard: Path, default_split: str) -> Record:
        if self.source == "txt":
            text = self.captions[0] if self.bom else self.captions[0].removeprefix("\ufeff")
            captions = (text.strip(),)
        else:
            captions = tuple(caption.strip() for caption in self.captions)
        image = f"{os.path.abspath(shard)}::{self.key}.{self.image_extension}"
        return Record(text_field(self.id) or self.key, image, captions, text_field(self.split) or default_split,
                      text_field(self.label))


@st.composite
def samples(draw: Callable) -> Sample:
    source = draw(st.sampled_from(["txt", "captions", "caption", "text"]))
    single = source != "captions"
    captions = tuple(draw(st.lists(CAPTION, min_size=1, max_size=1 if single else 3)))
    json_only = source != "txt"
    bom = draw(st.booleans())
    if source == "txt" and not bom:
        assume(captions[0].removeprefix("\ufeff").strip())
    return Sample(
        key=draw(st.lists(KEY_SEGMENT, min_size=1, max_size=2).map("/".join)),
        image_extension=draw(st.sampled_from(["png", "PNG", "jpg", "jpeg", "Jpeg", "webp"])),
        image=draw(st.binary(max_size=24)),
        captions=captions,
        source=source,
        id=draw(st.none() | MESSY | st.integers()) if json_only else None,
        split=draw(CELL) if json_only else None,
        label=draw(CELL) if json_only else None,
        bom=bom,
    )


@fuzz(50)
@given(data=st.data(), samples=st.lists(samples(), max_size=5, unique_by=lambda sample: sample.key),
       format=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_webdataset_round_trip(data: st.DataObject, samples: list[Sample], format: int) -> None:
    """Members of several samples interleaved over one to three shards; the image bytes read back by reference."""
    assume(len({text_field(sample.id) or sample.key for sample in samples}) == len(samples))
    shard_of = [data.draw(st.integers(0, 2), label="shard") for _ in samples]
    default_split = data.draw(st.sampled_from(["train", "val"]), label="default_split")
    with workdir() as root:
        expected, images = [], {}
        for number in range(max(shard_of, default=0) + 1):
            shard = root / "shards" / f"shard-{number:06d}.tar"
            chosen = [sample for sample, owner in zip(samples, shard_of) if owner == number]
            members = data.draw(st.permutations([m for sample in chosen for m in sample.members(data.draw)]))
            write_shard(shard, members, format=format)
            names = [name for name, _ in members]
            first = {sample.key: min(i for i, name in enumerate(names) if name.startswith(f"{sample.key}."))
                     for sample in chosen}
            for sample in sorted(chosen, key=lambda sample: first[sample.key]):
                expected.append(sample.record(shard, default_split))
                images[expected[-1].image] = sample.image
        for target in (root / "shards", f"{root}/shards/shard-*.tar"):
            assert collect(read_webdataset, target, default_split=default_split) == (expected, [])
        assert load_records(root, default_split=default_split) == expected
        loader = ImageLoader()
        for reference, image in images.items():
            assert loader.read_bytes(reference) == image


@fuzz(40)
@given(data=st.data(), items=items(), metadata=st.sampled_from(["metadata.jsonl", "metadata.csv"]))
def test_image_folder_round_trip(data: st.DataObject, items: list[Item], metadata: str) -> None:
    """metadata.jsonl or metadata.csv with file_name and a text, caption or captions column."""
    optional = data.draw(st.lists(st.sampled_from(["id", "split", "label"]), unique=True), label="optional columns")
    items = [without(item, {"id", "split", "label"} - set(optional)) for item in items]
    assume(distinct_ids(items))
    caption_key = data.draw(st.sampled_from(["text", "caption", "captions"]), label="caption column")
    with workdir() as root:
        folder = root / "folder"
        folder.mkdir()
        if metadata == "metadata.csv":
            rows = data.draw(st.permutations([(item, (caption,)) for item in items for caption in item.captions]))
            header = ["file_name", caption_key, *optional]
            table = [[item.image, captions[0], *(str(getattr(item, name) or "") for name in optional)]
                     for item, captions in rows]
            write_rows(folder / metadata, [header, *table])
        else:
            rows = [(item, item.captions) for item in items]
            lines = []
            for item, captions in rows:
                row = {"file_name": item.image, caption_key: list(captions)}
                row.update({name: getattr(item, name) for name in optional})
                lines.append(json.dumps(row))
            (folder / metadata).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        expected = merged(list(rows), folder)
        assert collect(read_image_folder, folder) == (expected, [])
        assert load_records(folder) == expected


# ----------------------------------------------------------------------------------------------------- robustness


READERS: dict[str, tuple[str, Callable[..., list[Record]]]] = {
    "csv": ("data.csv", read_csv),
    "tsv": ("data.tsv", read_csv),
    "jsonl": ("data.jsonl", read_jsonl),
    "coco": ("captions_val2017.json", read_coco),
    "karpathy": ("dataset_flickr8k.json", read_karpathy),
    "webdataset": ("shard.tar", read_webdataset),
    "imagefolder jsonl": ("metadata.jsonl", read_image_folder),
    "imagefolder csv": ("metadata.csv", read_image_folder),
}


def check_file(root: Path, kind: str, content: bytes) -> None:
    """Write ``content`` as a file of ``kind`` and check the contract of its reader and of load_records."""
    name, read = READERS[kind]
    path = root / name
    path.write_bytes(content)
    sources = {str(path), str(root)}
    target = root if read is read_image_folder else path
    check_contract(read, target, sources)
    check_contract(load_records, target, sources)


@fuzz(150)
@given(kind=st.sampled_from(sorted(READERS)), content=st.binary(max_size=600))
def test_any_bytes_give_records_or_a_dataset_error(kind: str, content: bytes) -> None:
    with workdir() as root:
        check_file(root, kind, content)


JSON_KEYS = st.sampled_from([
    "image", "file_name", "filepath", "filename", "caption", "captions", "text", "id", "split", "label", "images",
    "annotations", "image_id", "sentences", "raw", "imgid", "cocoid",
]) | st.text(max_size=4)
JSON_LEAVES = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
               | st.sampled_from(["", " ", "a.png", "x/y.jpg", ".", "..", "/", "a caption", "restval"]))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_KEYS, children, max_size=5),
    max_leaves=25,
)


@fuzz(150)
@given(kind=st.sampled_from(["coco", "karpathy", "jsonl", "imagefolder jsonl"]), value=JSON_VALUES,
       lines=st.lists(JSON_VALUES, max_size=6))
def test_any_json_gives_records_or_a_dataset_error(kind: str, value: Any, lines: list[Any]) -> None:
    text = json.dumps(value) if kind in ("coco", "karpathy") else "\n".join(json.dumps(line) for line in lines)
    with workdir() as root:
        check_file(root, kind, text.encode())


PATHS = st.sampled_from(["a.png", "b.png", "a.png ", "", " ", ".", "..", "/", "c/", "c/.", "./a.png", "a::b.png"])
JSONL_LINES = st.fixed_dictionaries({
    "image": PATHS | JSON_VALUES,
    "caption": st.just("a caption") | JSON_VALUES,
}, optional={
    "captions": st.lists(st.sampled_from(["one", "two", " "]) | JSON_VALUES, max_size=3) | JSON_VALUES,
    "id": st.sampled_from(["A", "B", " ", 1, 1.5, True]) | JSON_VALUES,
    "split": st.sampled_from(["train", "val", None, 2]),
    "label": st.sampled_from(["cat", "", None, [1]]),
})


@fuzz(100)
@given(lines=st.lists(st.one_of(JSONL_LINES, JSONL_LINES, JSON_VALUES), max_size=8))
def test_jsonl_lines_are_records_or_reported_problems(lines: list[Any]) -> None:
    """With on_error a JSONL file never raises; every line is reported or has its captions in the records."""
    with workdir() as root:
        path = root / "data.jsonl"
        path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
        records, errors = collect(read_jsonl, path)
        assert_well_formed(records)
        reported = [error.location for error in errors]
        assert len(set(reported)) == len(reported) and set(reported) <= {f"line {n}" for n in range(1, len(lines) + 1)}
        kept = [line for n, line in enumerate(lines, start=1) if f"line {n}" not in reported]
        values = [next(line[key] for key in CAPTION_KEYS if line.get(key) is not None) for line in kept]
        assert sum(len(record.captions) for record in records) == sum(
            len(value) if isinstance(value, list) else 1 for value in values
        )


CSV_CELLS = PATHS | st.sampled_from(["x", "a caption", "A", "val", '"', ",", "\n", "\r", "\t", "\x00"]) | MESSY


@fuzz(100)
@given(data=st.data(), optional=st.lists(st.sampled_from(["id", "split", "label", "other"]), unique=True))
def test_csv_rows_are_records_or_reported_problems(data: st.DataObject, optional: list[str]) -> None:
    """With on_error a CSV file with the required columns never raises; every row is blank, reported, or has its
    caption in the records."""
    header = data.draw(st.permutations(["filepath", "title", *optional]), label="header")
    rows = data.draw(st.lists(st.lists(CSV_CELLS, min_size=len(header) - 1, max_size=len(header) + 1), max_size=8))
    with workdir() as root:
        path = root / "data.csv"
        write_rows(path, [header, *rows])
        records, errors = collect(read_csv, path)
        assert_well_formed(records)
        reported = {error.location for error in errors}
        assert len(reported) == len(errors)
        lines, line = [], 2
        for row in rows:
            lines.append(line)
            line += line_count(csv_text([row]))
        kept = [row for row, number in zip(rows, lines) if f"line {number}" not in reported and "".join(row).strip()]
        assert reported <= {f"line {number}" for number in lines}
        assert sum(len(record.captions) for record in records) == len(kept)


def mutated_bytes(draw: Callable, content: bytes, log: list[str] | None = None) -> bytes:
    """``content`` truncated, with bytes flipped, inserted, deleted or duplicated (one to three times); each change
    is described in ``log`` when one is given."""
    raw = bytearray(content)
    for _ in range(draw(st.integers(1, 3))):
        operation = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, len(raw)))
        if operation == "truncate":
            del raw[at:]
            change = ""
        elif operation == "flip" and at < len(raw):
            mask = draw(st.integers(1, 255))
            raw[at] ^= mask
            change = f" ^{mask:#04x}"
        elif operation == "insert":
            inserted = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b",", b'"', b"\n", b"\r", b"\t", b"{", b"}", b"[", b"]", b":", b"\xff", b"\xef\xbb\xbf", b"\x00"]))
            raw[at:at] = inserted
            change = f" {inserted!r}"
        elif operation == "delete":
            count = draw(st.integers(1, 16))
            del raw[at:at + count]
            change = f" {count}"
        else:
            count = draw(st.integers(1, 32))
            raw[at:at] = raw[at:at + count]
            change = f" {count}"
        if log is not None:
            log.append(f"{operation} at {at}{change}")
    return bytes(raw)


def json_paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from json_paths(child, (*path, key))


SWAPS = st.sampled_from([None, 0, -1, 1.5, True, "", " ", "x", [], {}, [1], ["a"], {"a": 1}]) | JSON_VALUES


def mutated_json(data: st.DataObject, document: Any) -> Any:
    """``document`` with one to three values dropped or replaced by values of other types."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(list(json_paths(document))), label="path")
        if not path:
            document = copy.deepcopy(data.draw(SWAPS))  # sampled_from shares its values
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans(), label="drop"):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(data.draw(SWAPS, label="new value"))
    return document


def valid_content(kind: str, items: list[Item]) -> bytes:
    if kind in ("csv", "tsv", "imagefolder csv"):
        header = ["file_name", "text"] if kind == "imagefolder csv" else CSV_HEADER
        rows = [csv_row(item, caption)[:len(header)] for item in items for caption in item.captions]
        buffer = io.StringIO(newline="")
        csv.writer(buffer, delimiter="\t" if kind == "tsv" else ",").writerows([header, *rows])
        return buffer.getvalue().encode()
    if kind in ("jsonl", "imagefolder jsonl"):
        key = "file_name" if kind == "imagefolder jsonl" else "image"
        return "".join(json.dumps({key: item.image, "text": list(item.captions)}) + "\n" for item in items).encode()
    document = coco_document(items) if kind == "coco" else karpathy_document(items)
    return json.dumps(document).encode()


VALID_ITEMS = items(ids=st.integers(0, 50), min_size=1, max_size=4)


@fuzz(150)
@given(data=st.data(), kind=st.sampled_from(sorted(set(READERS) - {"webdataset"})), items=VALID_ITEMS)
def test_damaged_files_give_records_or_a_dataset_error(data: st.DataObject, kind: str, items: list[Item]) -> None:
    """A valid file truncated or with bytes flipped, inserted, deleted or duplicated."""
    with workdir() as root:
        check_file(root, kind, mutated_bytes(data.draw, valid_content(kind, items)))


@fuzz(100)
@given(data=st.data(), kind=st.sampled_from(["coco", "karpathy", "jsonl", "webdataset"]), items=VALID_ITEMS)
def test_changed_json_gives_records_or_a_dataset_error(data: st.DataObject, kind: str, items: list[Item]) -> None:
    """Valid JSON documents with keys dropped and values replaced by values of other types."""
    with workdir() as root:
        if kind == "jsonl":
            document = mutated_json(data, [jsonl_object(item, item.captions) for item in items])
            lines = document if isinstance(document, list) else [document]
            check_file(root, kind, "".join(json.dumps(line) + "\n" for line in lines).encode())
        elif kind == "webdataset":
            members = []
            for item in items:
                meta = mutated_json(data, {"captions": list(item.captions), "id": item.id, "split": "val"})
                members += [(f"{item.id}.png", b""), (f"{item.id}.json", json.dumps(meta).encode())]
            check_file(root, kind, write_shard(root / "valid.tar", members))
        else:
            document = coco_document(items) if kind == "coco" else karpathy_document(items)
            check_file(root, kind, json.dumps(mutated_json(data, document)).encode())


# ------------------------------------------------------------------------------------------------- damaged shards

HEADER_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "mtime": (136, 12), "typeflag": (156, 1),
                 "linkname": (157, 100), "magic": (257, 8), "prefix": (345, 155), "sparse": (386, 96),
                 "realsize": (483, 12)}
SIZES = st.integers(-8, 8).map(lambda blocks: blocks * 512) | st.integers(-(2**90), 2**90)


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


def header_offsets(raw: bytes) -> list[int]:
    """Where the header blocks of a tar file as tarfile writes it start (extended headers included)."""
    offsets, position = [], 0
    while position + 512 <= len(raw) and raw[position:position + 512].strip(b"\0"):
        offsets.append(position)
        size = int(raw[position + 124:position + 136].strip(b"\0 ") or b"0", 8)
        position += 512 + -(-size // 512) * 512
    return offsets


PAX_KEYS = st.sampled_from([
    "GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name",
    "GNU.sparse.realsize", "GNU.sparse.numblocks", "GNU.sparse.offset", "GNU.sparse.numbytes", "size", "path",
    "linkpath", "uid", "mtime", "uname", "hdrcharset", "comment",
])
PAX_VALUES = (st.text(max_size=12) | SIZES.map(str) | st.sampled_from(["0", "1", "BINARY", "0,1,2", "1,-512", ","])
              | st.lists(st.integers(-600, 600), max_size=6).map(lambda numbers: ",".join(map(str, numbers))))


class Shard:
    """A damaged shard: the members written, the bytes after the damage, and what was done (its repr)."""

    def __init__(self, members: list[tuple[str, bytes]], content: bytes, steps: list[str]) -> None:
        self.members, self.content, self.steps = members, content, steps

    def __repr__(self) -> str:
        return f"Shard({'; '.join(self.steps)}; {len(self.content)} bytes)"


@st.composite
def damaged_shards(draw: Callable) -> Shard:
    members = []
    for number in range(draw(st.integers(1, 3))):
        members += [(f"k{number}.png", draw(st.binary(max_size=700))), (f"k{number}.txt", b"caption %d" % number)]
    pax = draw(st.dictionaries(st.sampled_from([name for name, _ in members]),
                               st.dictionaries(PAX_KEYS, PAX_VALUES, max_size=3), max_size=2))
    buffer = io.BytesIO()
    format = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    steps = [f"{['USTAR', 'GNU', 'PAX'][format]} members {[(name, len(data)) for name, data in members]}"]
    if format == tarfile.PAX_FORMAT and pax:
        steps.append(f"pax headers {pax}")
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if format == tarfile.PAX_FORMAT and name in pax:
                info.pax_headers = pax[name]
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buffer.getvalue())
    headers = header_offsets(raw)
    for _ in range(draw(st.integers(0, 3))):
        header = draw(st.sampled_from(headers))
        field = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        if field in ("size", "mode", "mtime", "realsize"):
            value = number_field(draw(SIZES), HEADER_FIELDS[field][1])
        elif field == "typeflag":
            value = draw(st.sampled_from(list(b"0123456789xgLKSAVDMN\0"))).to_bytes(1, "big")
        else:
            value = draw(st.binary(max_size=HEADER_FIELDS[field][1]))
        set_header_field(raw, header, field, value)
        steps.append(f"header at {header}: {field} = {value!r}")
    content = bytes(raw)
    return Shard(members, mutated_bytes(draw, content, steps) if draw(st.booleans()) else content, steps)


@fuzz(200)
@given(shard=damaged_shards())
def test_damaged_shards_give_records_or_a_dataset_error(shard: Shard) -> None:
    """Header fields rewritten (with a valid checksum), pax records added, truncation and flipped bytes; the image
    loader reads every reference of the original shard as bytes or a DatasetError, too."""
    with workdir() as root:
        path = root / "shard.tar"
        check_file(root, "webdataset", shard.content)
        loader = ImageLoader()
        for name, _ in shard.members:
            try:
                with time_limit():
                    assert isinstance(loader.read_bytes(f"{path}::{name}"), bytes)
            except DatasetError as error:
                assert error.source == f"{path}::{name}" or error.source == str(path), error


def _encoded(format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (200, 30, 60)).save(buffer, format=format)
    return buffer.getvalue()


ENCODED = {format: _encoded(format) for format in ("PNG", "JPEG", "WEBP", "GIF", "BMP")}


@fuzz(100)
@given(data=st.data(), format=st.sampled_from(sorted(ENCODED)))
def test_damaged_images_decode_or_give_a_dataset_error(data: st.DataObject, format: str) -> None:
    with workdir() as root:
        path = root / "image.bin"
        path.write_bytes(mutated_bytes(data.draw, ENCODED[format]))
        try:
            with time_limit():
                image = ImageLoader().load(str(path))
        except DatasetError as error:
            assert error.source == str(path)
        else:
            assert image.mode == "RGB"


# ---------------------------------------------------------------------------------------------------- broken rows


def line_count(text: str) -> int:
    """Lines as the csv module counts them (\\n, \\r\\n and a lone \\r each end one)."""
    return len(io.StringIO(text, newline="").readlines())


CSV_BREAKS = {
    "empty caption": "empty caption in 'title'",
    "short row": "4 fields, but the header has 5",
    "long row": "6 fields, but the header has 5",
    "empty image": "empty 'filepath'",
}


@fuzz(60)
@given(data=st.data(), items=items(max_size=4))
def test_csv_broken_rows_are_reported_by_line(data: st.DataObject, items: list[Item]) -> None:
    assume(distinct_ids(items))
    rows = [(item, caption) for item in items for caption in item.captions]
    breaks = data.draw(st.lists(st.none() | st.sampled_from(sorted(CSV_BREAKS)), min_size=len(rows),
                                max_size=len(rows)))
    texts, cells = [], []
    for (item, caption), broken in zip(rows, breaks):
        row = csv_row(item, caption)
        if broken == "empty caption":
            row[1] = data.draw(st.sampled_from(["", " ", "\t", "\u3000"]))
        elif broken == "short row":
            row = row[:-1]
        elif broken == "long row":
            row.append("extra")
        elif broken == "empty image":
            row[0] = " "
        cells.append(row)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    for row in [CSV_HEADER, *cells]:
        start = buffer.tell()
        writer.writerow(row)
        texts.append(buffer.getvalue()[start:])
    starts = [1 + sum(line_count(text) for text in texts[:index]) for index in range(1, len(texts))]
    with workdir() as root:
        path = root / "data.csv"
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        records, errors = collect(read_csv, path)
        assert records == merged([(item, (caption,)) for (item, caption), b in zip(rows, breaks) if b is None], root)
        expected = [(f"line {start}", CSV_BREAKS[b]) for start, b in zip(starts, breaks) if b is not None]
        assert [(error.location, error.problem) for error in errors] == expected
        assert all(error.source == str(path) for error in errors)


JSONL_BREAKS = {
    "empty caption": "empty caption in 'captions'",
    "missing image": "missing key 'image' / 'file_name' / 'filepath'",
    "caption type": "'captions' must be a caption or a non-empty list of captions",
    "caption item type": "'captions' holds a int, not a caption string",
    "no captions": "'captions' must be a caption or a non-empty list of captions",
    "invalid JSON": "invalid JSON",
    "not an object": "expected a JSON object, got list",
    "id type": "'id' must be a string or an integer, not float",
    "split type": "'split' must be a string or an integer, not list",
}


@fuzz(60)
@given(data=st.data(), items=items(max_size=5))
def test_jsonl_broken_lines_are_reported_by_line(data: st.DataObject, items: list[Item]) -> None:
    assume(distinct_ids(items))
    breaks = data.draw(st.lists(st.none() | st.sampled_from(sorted(JSONL_BREAKS)), min_size=len(items),
                                max_size=len(items)))
    lines, numbers = [], []
    for item, broken in zip(items, breaks):
        lines.extend(data.draw(st.lists(st.just(""), max_size=1)))
        row = jsonl_object(item, item.captions)
        if broken == "empty caption":
            row["captions"][data.draw(st.integers(0, len(item.captions) - 1))] = " "
        elif broken == "missing image":
            del row["image"]
        elif broken == "caption type":
            row["captions"] = 5
        elif broken == "caption item type":
            row["captions"][-1] = 7
        elif broken == "no captions":
            row["captions"] = []
        elif broken == "id type":
            row["id"] = 1.5
        elif broken == "split type":
            row["split"] = ["val"]
        text = json.dumps([row] if broken == "not an object" else row)
        lines.append(text[:-1] if broken == "invalid JSON" else text)
        numbers.append(len(lines))
    with workdir() as root:
        path = root / "data.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        records, errors = collect(read_jsonl, path)
        assert records == merged([(item, item.captions) for item, b in zip(items, breaks) if b is None], root)
        assert [error.location for error in errors] == [f"line {n}" for n, b in zip(numbers, breaks) if b is not None]
        for error, broken in zip(errors, [b for b in breaks if b is not None]):
            assert error.problem.startswith(JSONL_BREAKS[broken]) and error.source == str(path)


COCO_IMAGE_BREAKS = ("missing file_name", "empty file_name", "id type", "not an object")
COCO_ANNOTATION_BREAKS = ("empty caption", "missing caption", "caption type", "missing image_id", "image_id type",
                          "not an object", "unknown image_id")


@fuzz(60)
@given(data=st.data(), items=items(ids=st.integers(0, 10**6), max_size=4))
def test_coco_broken_entries_are_reported_by_index(data: st.DataObject, items: list[Item]) -> None:
    """Broken annotations, then broken images (and images left without a caption), then annotations of unknown
    images; annotations of an image that is broken but has its id are dropped with it."""
    assume(distinct_ids(items, key=lambda item: str(item.id)))
    image_breaks = data.draw(st.lists(st.none() | st.sampled_from(COCO_IMAGE_BREAKS), min_size=len(items),
                                      max_size=len(items)))
    pairs = data.draw(st.permutations([(index, caption) for index, item in enumerate(items)
                                       for caption in item.captions]))
    annotation_breaks = data.draw(st.lists(st.none() | st.sampled_from(COCO_ANNOTATION_BREAKS), min_size=len(pairs),
                                           max_size=len(pairs)))
    images = []
    for item, broken in zip(items, image_breaks):
        image: Any = {"id": item.id, "file_name": item.image}
        if broken == "missing file_name":
            del image["file_name"]
        elif broken == "empty file_name":
            image["file_name"] = "  "
        elif broken == "id type":
            image["id"] = [item.id]
        images.append([image] if broken == "not an object" else image)
    annotations = []
    for (index, caption), broken in zip(pairs, annotation_breaks):
        annotation: Any = {"image_id": items[index].id, "caption": caption}
        if broken == "empty caption":
            annotation["caption"] = ""
        elif broken == "missing caption":
            del annotation["caption"]
        elif broken == "caption type":
            annotation["caption"] = ["x"]
        elif broken == "missing image_id":
            del annotation["image_id"]
        elif broken == "image_id type":
            annotation["image_id"] = 1.5
        elif broken == "unknown image_id":
            annotation["image_id"] = -1
        annotations.append(7 if broken == "not an object" else annotation)
    known = [broken in (None, "missing file_name", "empty file_name") for broken in image_breaks]
    good = [[caption for (owner, caption), b in zip(pairs, annotation_breaks) if owner == index and b is None]
            for index in range(len(items))]
    expected_errors = [f"annotations[{j}]" for j, b in enumerate(annotation_breaks)
                       if b not in (None, "unknown image_id")]
    expected_errors += [f"images[{i}]" for i, b in enumerate(image_breaks) if b is not None or not good[i]]
    expected_errors += [f"annotations[{j}]" for j, ((owner, _), b) in enumerate(zip(pairs, annotation_breaks))
                        if b == "unknown image_id" or (b is None and not known[owner])]
    with workdir() as root:
        path = root / "captions_val2017.json"
        path.write_text(json.dumps({"images": images, "annotations": annotations}), encoding="utf-8")
        records, errors = collect(read_coco, path)
        assert records == [
            Record(str(item.id), os.path.join(root, item.image), tuple(caption.strip() for caption in good[i]), "val")
            for i, (item, broken) in enumerate(zip(items, image_breaks)) if broken is None and good[i]
        ]
        assert [error.location for error in errors] == expected_errors
        assert all(error.source == str(path) for error in errors)


KARPATHY_BREAKS = {
    "no sentences": "no caption ('sentences' is empty)",
    "missing filename": "missing key 'filename'",
    "sentence without raw": "missing key 'raw'",
    "empty raw": "empty caption in 'raw'",
    "id type": "'imgid' must be an integer or a string, not float",
    "not an object": "expected a JSON object, got str",
}


@fuzz(50)
@given(data=st.data(), items=items(ids=st.integers(0, 10**6), max_size=5))
def test_karpathy_broken_entries_are_reported_by_index(data: st.DataObject, items: list[Item]) -> None:
    assume(distinct_ids(items, key=lambda item: str(item.id)))
    breaks = data.draw(st.lists(st.none() | st.sampled_from(sorted(KARPATHY_BREAKS)), min_size=len(items),
                                max_size=len(items)))
    entries = karpathy_document(items)["images"]
    for index, broken in enumerate(breaks):
        entry = entries[index]
        if broken == "no sentences":
            entry["sentences"] = []
        elif broken == "missing filename":
            del entry["filename"]
        elif broken == "sentence without raw":
            entry["sentences"].append({"tokens": []})
        elif broken == "empty raw":
            entry["sentences"][0]["raw"] = "\n"
        elif broken == "id type":
            entry["imgid"] = 1.5
        elif broken == "not an object":
            entries[index] = "entry"
    with workdir() as root:
        path = root / "dataset_flickr30k.json"
        path.write_text(json.dumps({"images": entries}), encoding="utf-8")
        records, errors = collect(read_karpathy, path)
        assert records == [
            Record(str(item.id), os.path.join(root, item.image), tuple(c.strip() for c in item.captions),
                   "train" if text_field(item.split) in (None, "restval") else text_field(item.split))
            for item, broken in zip(items, breaks) if broken is None
        ]
        assert [(error.location, error.problem) for error in errors] == [
            (f"images[{index}]", KARPATHY_BREAKS[broken]) for index, broken in enumerate(breaks) if broken is not None
        ]


SHARD_BREAKS = {
    "no image": "no image (jpg, jpeg, png, webp)",
    "no caption": "no caption",
    "empty caption": "empty caption in",
    "invalid JSON": "invalid JSON in",
    "two images": "several images:",
    "caption type": "'caption' must be a caption or a non-empty list of captions",
}


@fuzz(50)
@given(data=st.data(), keys=st.lists(KEY_SEGMENT, max_size=5, unique=True))
def test_webdataset_broken_samples_are_reported_by_key(data: st.DataObject, keys: list[str]) -> None:
    breaks = data.draw(st.lists(st.none() | st.sampled_from(sorted(SHARD_BREAKS)), min_size=len(keys),
                                max_size=len(keys)))
    members = []
    captions = {}
    for key, broken in zip(keys, breaks):
        captions[key] = data.draw(CAPTION)
        sample = {"png": b"", "json": json.dumps({"caption": captions[key]}).encode()}
        if broken == "no image":
            del sample["png"]
        elif broken == "no caption":
            del sample["json"]
        elif broken == "empty caption":
            sample["json"] = json.dumps({"caption": " \n"}).encode()
        elif broken == "invalid JSON":
            sample["json"] = sample["json"][:-1]
        elif broken == "two images":
            sample["jpg"] = b""
        elif broken == "caption type":
            sample["json"] = json.dumps({"caption": 3}).encode()
        members += [(f"{key}.{extension}", content) for extension, content in sample.items()]
    with workdir() as root:
        path = root / "shard.tar"
        write_shard(path, members)
        records, errors = collect(read_webdataset, path)
        assert records == [Record(key, f"{path}::{key}.png", (captions[key].strip(),))
                           for key, broken in zip(keys, breaks) if broken is None]
        assert [error.location for error in errors] == [f"key {key}" for key, b in zip(keys, breaks) if b is not None]
        for error, broken in zip(errors, [b for b in breaks if b is not None]):
            assert error.problem.startswith(SHARD_BREAKS[broken]) and error.source == str(path)


# ---------------------------------------------------------------------------------------------------- regressions
# Inputs the properties above found, and ones of the same kind they would need far more examples to reach.


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
    # A size past the end of the file reads as a shard cut inside that member.
    problem = "the shard is truncated" if case == "size past any offset" else "not a readable uncompressed tar file"
    with time_limit():
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}(, key \S+)?: {problem}"):
            read_webdataset(path)
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}(::\S+)?: {problem}"):
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
