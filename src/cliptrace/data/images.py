"""Open images by reference: a file path, or ``SHARD.tar::MEMBER`` read by offset from an indexed tar shard."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from cliptrace.data.record import DatasetError
from cliptrace.data.shards import scan_shard

SHARD_SEPARATOR = "::"


class ImageLoader:
    """Reads image references as produced by the dataset readers.

    Each tar shard is scanned once, on first use, into an index of member name -> (data offset, size); members are
    then read with one seek. The index lives in the instance.
    """

    def __init__(self) -> None:
        self._shards: dict[str, tuple[dict[str, tuple[int, int]], str | None]] = {}

    def _index(self, shard: str) -> tuple[dict[str, tuple[int, int]], str | None]:
        """Member name -> (data offset, size) of every whole regular file in ``shard``, and its truncation."""
        if shard not in self._shards:
            try:
                with tarfile.open(shard, "r:") as tar:
                    scan = scan_shard(tar)
            except FileNotFoundError:
                raise DatasetError(shard, None, "shard not found") from None
            except (tarfile.TarError, OSError) as error:
                raise DatasetError(shard, None, f"not a readable uncompressed tar file ({error})") from None
            index = {member.name: (member.offset_data, member.size) for member in scan.members}
            self._shards[shard] = index, scan.truncation
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
        index, truncation = self._index(shard)
        if member not in index:
            raise DatasetError(ref, None, truncation or f"no member {member!r} in the shard")
        offset, size = index[member]
        with open(shard, "rb") as file:
            file.seek(offset)
            return file.read(size)

    def load(self, ref: str) -> Image.Image:
        """The image ``ref`` names, decoded and converted to RGB."""
        data = self.read_bytes(ref)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise DatasetError(ref, None, f"cannot decode the image ({error})") from None
