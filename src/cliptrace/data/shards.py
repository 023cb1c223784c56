"""Scan uncompressed tar shards, telling a complete shard from one that was cut short.

``tarfile`` stops quietly at a member header cut in half, so a truncated shard would silently lose its last
members; :func:`scan_shard` keeps the members that are stored whole and says where the file was cut.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardScan:
    """The regular-file members of a shard stored whole, and how the shard is cut short, if it is.

    Attributes:
        members: Regular-file members whose data lies wholly in the file, in file order.
        cut_member: Name of the member whose data runs past the end of the file; None when no member is cut.
        truncation: What is missing, e.g. ``"the shard is truncated: ..."``; None for a complete shard.
    """

    members: list[tarfile.TarInfo]
    cut_member: str | None = None
    truncation: str | None = None


def scan_shard(tar: tarfile.TarFile) -> ShardScan:
    """Read every member header of an open, uncompressed ``tar`` and check that the file ends properly.

    A complete shard ends with an all-zero end-of-archive block after its last member. A file that ends inside a
    member's data, inside a header, or right after a member is truncated; one with garbage where a header belongs
    is corrupt from there on.
    """
    files: list[tarfile.TarInfo] = []
    last = None
    try:
        for last in tar:
            if last.isfile():
                files.append(last)
    except tarfile.ReadError:  # tarfile's check that the previous member's data is all there
        pass
    fileobj = tar.fileobj
    size = fileobj.seek(0, os.SEEK_END)
    if last is not None and last.offset_data + last.size > size:
        if files and files[-1] is last:
            files.pop()
        present = max(0, size - last.offset_data)
        problem = f"the shard is truncated: the file ends inside member {last.name} ({present} of {last.size} bytes)"
        return ShardScan(files, last.name, problem)
    fileobj.seek(tar.offset)
    tail = fileobj.read(tarfile.BLOCKSIZE)
    if len(tail) < tarfile.BLOCKSIZE or any(tail):
        where = f"after member {last.name}" if last is not None else "at its start"
        problem = (
            f"the shard is truncated or corrupt: {where} comes neither a whole member header nor the end-of-archive "
            f"block (byte {tar.offset} of {size}); any members after it are lost"
        )
        return ShardScan(files, None, problem)
    return ShardScan(files)
