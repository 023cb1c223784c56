"""Open images by reference: a file path, or ``SHARD.tar::MEMBER`` read by offset from an indexed tar shard."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator

from PIL import Image

from cliptrace.data.record import DatasetError

SHARD_SEPARATOR = "::"

TAR_ERRORS = (tarfile.TarError, OSError, ValueError, RecursionError)
"""What reading a damaged tar file can raise: besides TarError and OSError, tarfile lets ValueError (malformed numbers
in pax headers, offsets too large to seek to) and RecursionError (long chains of extended headers) through."""


def tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The members of a tar file opened for reading from a file on disk, in order.

    Raises :class:`tarfile.ReadError` at a member tarfile accepts though its header cannot be right, and that would
    make tarfile, or a read of the member, loop for ever or allocate without bound: a header that does not come after
    the previous one (a negative size sends tarfile back to a header it has read, and round again), a sparse file, or
    a file whose data would reach past the end of the tar file.
    """
    length = os.fstat(tar.fileobj.fileno()).st_size
    previous = -1
    for member in tar:
        if member.offset <= previous:
            raise tarfile.ReadError(f"the header of {member.name!r} does not follow the previous one")
        if member.issparse():
            raise tarfile.ReadError(f"{member.name!r} is a sparse file")
        if member.isfile() and member.size < 0:
            raise tarfile.ReadError(f"{member.name!r} has a negative size")
        if member.isfile() and member.size > length - member.offset_data:
            raise tarfile.ReadError(f"the data of {member.name!r} ({member.size} bytes) runs past the end of the file")
        previous = member.offset
        yield member


class ImageLoader:
    """Reads image references as produced by the dataset readers.

    Each tar shard is scanned once, on first use, into an index of member name -> (data offset, size); members are
    then read with one seek. The index lives in the instance.
    """

    def __init__(self) -> None:
        self._shards: dict[str, dict[str, tuple[int, int]]] = {}

    def _index(self, shard: str) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size) of every regular file in ``shard``."""
        if shard not in self._shards:
            try:
                with tarfile.open(shard, "r:") as tar:
                    members = [member for member in tar_members(tar) if member.isfile()]
                self._shards[shard] = {member.name: (member.offset_data, member.size) for member in members}
            except FileNotFoundError:
                raise DatasetError(shard, None, "shard not found") from None
            except TAR_ERRORS as error:
                raise DatasetError(shard, None, f"not a readable uncompressed tar file ({error})") from None
        return self._shards[shard]

    def read_bytes(self, ref: str) -> bytes:
        """The raw bytes of the file or shard member ``ref`` names."""
        shard, separator, member = ref.partition(SHARD_SEPARATOR)
        if not separator:
            try:
                with open(ref, "rb") as file:
                    return file.read()
            except FileNotFoundError:
                raise DatasetError(ref, None, "image file not found") from None
            except OSError as error:
                raise DatasetError(ref, None, f"cannot read the image file ({error.strerror})") from None
        index = self._index(shard)
        if member not in index:
            raise DatasetError(ref, None, f"no member {member!r} in the shard")
        offset, size = index[member]
        with open(shard, "rb") as file:
            file.seek(offset)
            data = file.read(size)
        if len(data) != size:
            raise DatasetError(ref, None, "the shard is truncated")
        return data

    def load(self, ref: str) -> Image.Image:
        """The image ``ref`` names, decoded and converted to RGB."""
        data = self.read_bytes(ref)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(ref, None, f"cannot decode the image ({error})") from None
