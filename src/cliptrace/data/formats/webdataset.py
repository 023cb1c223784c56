"""The webdataset format: WebDataset tar shards, members grouped by key."""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

from cliptrace.data.formats.format import Format
from cliptrace.data.formats.rows import (
    CAPTION_KEYS,
    IMAGE_EXTENSIONS,
    Broken,
    OnError,
    RecordSet,
    as_object,
    caption,
    captions_of,
    optional_text,
    report,
)
from cliptrace.data.formats.text import is_pattern, json_problem
from cliptrace.data.images import SHARD_SEPARATOR, ImageLoader
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.shards import TAR_ERRORS, scan_shard


def shards(path: str | Path) -> list[Path]:
    """The shards named by a ``.tar`` path, a glob pattern, or a directory of ``.tar`` files."""
    text = str(path)
    if is_pattern(text):
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
        raise Broken(f"{member.name} is not UTF-8 text") from None


def _shard_sample(
    tar: tarfile.TarFile,
    shard: str,
    key: str,
    parts: dict[str, tarfile.TarInfo],
    records: RecordSet,
    default_split: str,
) -> None:
    """Add the sample ``key`` of an open shard to ``records``."""
    images = [parts[extension] for extension in IMAGE_EXTENSIONS if extension in parts]
    if not images:
        raise Broken(f"no image ({', '.join(IMAGE_EXTENSIONS)})")
    if len(images) > 1:
        raise Broken(f"several images: {', '.join(member.name for member in images)}")
    meta: dict = {}
    if "json" in parts:
        text = _member_text(tar, parts["json"])
        try:
            meta = as_object(json.loads(text))
        except (ValueError, RecursionError) as error:
            raise Broken(f"invalid JSON in {parts['json'].name} ({json_problem(error)})") from None
    caption_key = next((name for name in CAPTION_KEYS if meta.get(name) is not None), None)
    if caption_key is not None:
        captions = captions_of(meta[caption_key], caption_key)
    elif "txt" in parts:
        captions = (caption(_member_text(tar, parts["txt"]), parts["txt"].name),)
    else:
        raise Broken(f"no caption ({key}.json with 'captions' or 'caption', or {key}.txt)")
    records.add(
        optional_text(meta.get("id"), "id") or key,
        f"{os.path.abspath(shard)}{SHARD_SEPARATOR}{images[0].name}",
        captions,
        optional_text(meta.get("split"), "split") or default_split,
        optional_text(meta.get("label"), "label"),
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
    records = RecordSet()
    for shard in shards(path):
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
                    except Broken as broken:
                        report(DatasetError(source, f"key {key}", str(broken)), on_error)
                if scan.truncation:
                    where = f"key {cut_key}" if cut_key else f"byte {scan.cut_offset}"
                    report(DatasetError(source, where, scan.truncation), on_error)
        except DatasetError:
            raise
        except FileNotFoundError:
            raise DatasetError(source, None, "file not found") from None
        except TAR_ERRORS as error:
            raise DatasetError(source, None, f"not a readable uncompressed tar file ({error})") from None
    return records.records()


def _find(directory: Path) -> Path | None:
    """The folder of a directory's shards: the directory itself, or its ``shards/``."""
    if any(directory.glob("*.tar")):
        return directory
    return directory / "shards" if any((directory / "shards").glob("*.tar")) else None


class ShardWriter:
    """Writes samples into numbered tar shards of ``shard_size`` samples each, with reproducible headers."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory = directory
        self.shard_size = shard_size
        self.count = 0
        self.tar: tarfile.TarFile | None = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append the members ``KEY.EXT`` of one sample."""
        if self.count % self.shard_size == 0:
            self.close()
            self.directory.mkdir(exist_ok=True)
            name = f"shard-{self.count // self.shard_size:06d}.tar"
            self.tar = tarfile.open(self.directory / name, "w", format=tarfile.USTAR_FORMAT)
        for extension, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1

    def close(self) -> None:
        """Finish the open shard, if any."""
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_webdataset(records: Sequence[Record], directory: Path, shard_size: int = 1000) -> Path:
    """Write ``records`` as ``DIRECTORY/shards/shard-NNNNNN.tar``: per record its image bytes (copied from its file,
    shard member or table row) and ``KEY.json`` with its id, captions, split and label; return the shards folder."""
    loader = ImageLoader()
    directory.mkdir(parents=True)
    with ShardWriter(directory / "shards", shard_size) as writer:
        for index, record in enumerate(records):
            name = record.image.rpartition("::")[2] if "::" in record.image else record.image
            extension = Path(name).suffix.lower().lstrip(".") or "png"
            meta = {"id": record.id, "captions": list(record.captions), "split": record.split, "label": record.label}
            writer.add(f"{index:09d}", {extension: loader.read_bytes(record.image),
                                        "json": (json.dumps(meta) + "\n").encode()})
    return directory / "shards"


FORMAT = Format(
    name="webdataset",
    summary="WebDataset shards (.tar, a glob, or a directory of .tar files or with shards/*.tar)",
    read=read_webdataset,
    suffixes=(".tar",),
    find=_find,
    patterns=True,
    write=write_webdataset,
)
