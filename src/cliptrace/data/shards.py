"""Scan uncompressed tar shards, telling a complete shard from one that was cut short or damaged.

``tarfile`` stops quietly at a member header cut in half, so a truncated shard would silently lose its last
members; :func:`scan_shard` keeps the members that are stored whole and says where the file was cut. Headers that
would send ``tarfile`` round in circles or make it allocate without bound are refused.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

TAR_ERRORS = (tarfile.TarError, OSError, ValueError, RecursionError)
"""What reading a damaged tar file can raise: besides TarError and OSError, tarfile lets ValueError (malformed numbers
in pax headers, offsets too large to seek to) and RecursionError (long chains of extended headers) through."""


@dataclass(frozen=True)
class ShardScan:
    """The regular-file members of a shard stored whole, and how the shard is cut short, if it is.

    Attributes:
        members: Regular-file members whose data lies wholly in the file, in file order.
        cut_member: Name of the member whose data runs past the end of the file; None when no member is cut.
        truncation: What is missing, e.g. ``"the shard is truncated: ..."``; None for a complete shard.
        cut_offset: The byte where a header or the end-of-archive block should start but does not; None when no
            header is cut.
    """

    members: list[tarfile.TarInfo]
    cut_member: str | None = None
    truncation: str | None = None
    cut_offset: int | None = None


def _members(tar: tarfile.TarFile, size: int) -> Iterator[tarfile.TarInfo]:
    """The members of ``tar`` (a file of ``size`` bytes), in order, up to the first whose data runs past its end.

    Raises :class:`tarfile.HeaderError` at a header tarfile accepts though it cannot be right, and that would make
    tarfile, or a read of the member, loop for ever or allocate without bound: a header that does not come after
    the previous one (a negative size sends tarfile back to a header it has read, and round again), a sparse file,
    or a negative size.
    """
    previous = -1
    for member in tar:
        if member.offset <= previous:
            raise tarfile.HeaderError(f"the header of {member.name!r} does not follow the previous one")
        if member.issparse():
            raise tarfile.HeaderError(f"{member.name!r} is a sparse file")
        if member.isfile() and member.size < 0:
            raise tarfile.HeaderError(f"{member.name!r} has a negative size")
        previous = member.offset
        yield member
        if member.offset_data + member.size > size:
            return


def scan_shard(tar: tarfile.TarFile) -> ShardScan:
    """Read every member header of an open, uncompressed ``tar`` and check that the file ends properly.

    A complete shard ends with an all-zero end-of-archive block after its last member. A file that ends inside a
    member's data, inside a header, or right after a member is truncated; one with garbage where a header belongs
    is corrupt from there on.

    Raises:
        tarfile.HeaderError: A header that cannot be right (see :func:`_members`); the other :data:`TAR_ERRORS`
            from a damaged file.
    """
    fileobj = tar.fileobj
    size = os.fstat(fileobj.fileno()).st_size
    files: list[tarfile.TarInfo] = []
    last = None
    try:
        for last in _members(tar, size):
            if last.isfile():
                files.append(last)
    except tarfile.ReadError:  # tarfile's check that the previous member's data is all there
        pass
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
        return ShardScan(files, None, problem, tar.offset)
    return ShardScan(files)
