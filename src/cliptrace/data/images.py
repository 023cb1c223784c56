"""Open images by reference: a file path, ``SHARD.tar::MEMBER`` read by offset from an indexed tar shard, or
``FILE.parquet::COLUMN[ROW]`` / ``FILE.arrow::COLUMN[ROW]`` read from one row of a table (see
:mod:`cliptrace.data.tables`).

Every image is decoded to RGB. Conversion follows PIL's ``convert("RGB")``, as open_clip's and HuggingFace's CLIP
preprocessing do: grayscale is replicated, palettes are looked up, CMYK is converted, and an alpha channel is
dropped (not composited: transparent pixels keep their stored colour). 16-bit grayscale, which PIL would clip at
255, is scaled to 8 bits first (value / 257, rounded). Images above ``PIL.Image.MAX_IMAGE_PIXELS`` decode without
PIL's decompression-bomb warning (JPEGs at half resolution, which later downscaling hides); images above twice that
limit, where PIL refuses, are a :class:`DatasetError` naming the file and its size. An image whose EXIF data gives
an orientation other than the default (a camera held sideways) is turned upright first, as
``PIL.ImageOps.exif_transpose`` does, so its pixels are the ones image viewers show.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cliptrace.data.record import DatasetError, Record
from cliptrace.data.shards import TAR_ERRORS, scan_shard
from cliptrace.data.tables import TableRows, is_table_ref

SHARD_SEPARATOR = "::"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")
JPEG_END = b"\xff\xd9"  # the end-of-image marker; byte stuffing keeps it out of the compressed data


class ImageLoader:
    """Reads image references as produced by the dataset readers.

    Each tar shard is scanned once, on first use, into an index of member name -> (data offset, size); members are
    then read with one seek. Each Arrow or parquet file is opened once. The indexes and open files live in the
    instance; a pickled copy (as DataLoader workers get) keeps the shard indexes and opens the tables again.
    """

    def __init__(self) -> None:
        self._shards: dict[str, tuple[dict[str, tuple[int, int]], str | None]] = {}
        self._tables = TableRows()

    def __getstate__(self) -> dict:
        return {"_shards": self._shards}

    def __setstate__(self, state: dict) -> None:
        self._shards = state["_shards"]
        self._tables = TableRows()

    def _index(self, shard: str) -> tuple[dict[str, tuple[int, int]], str | None]:
        """Member name -> (data offset, size) of every whole regular file in ``shard``, and its truncation."""
        if shard not in self._shards:
            try:
                with tarfile.open(shard, "r:") as tar:
                    scan = scan_shard(tar)
            except FileNotFoundError:
                raise DatasetError(shard, None, "shard not found") from None
            except TAR_ERRORS as error:
                raise DatasetError(shard, None, f"not a readable uncompressed tar file ({error})") from None
            index = {member.name: (member.offset_data, member.size) for member in scan.members}
            self._shards[shard] = index, scan.truncation
        return self._shards[shard]

    def read_bytes(self, ref: str) -> bytes:
        """The raw bytes of the file, shard member or table row ``ref`` names."""
        if is_table_ref(ref):
            return self._tables.read_bytes(ref)
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
        """The image ``ref`` names, decoded, turned upright and converted to RGB (see the module docstring)."""
        with _decoding(ref, self.read_bytes(ref)) as image:
            return _to_rgb(image)

    def verify(self, ref: str) -> None:
        """Check cheaply that the image ``ref`` names would load, without decoding its pixels.

        The file is read and its header parsed, which catches a missing, empty or unrecognized file and one too large
        to decode. A JPEG must then hold its end-of-image marker after the start of its compressed data (a file cut
        short does not); any other format gets PIL's ``verify()``, which for PNG checks every chunk's checksum.
        Damage these checks miss (e.g. garbled compressed data in an intact file) still raises in :meth:`load`.

        Raises:
            DatasetError: The image would not load; the same problems as :meth:`load` reports.
        """
        data = self.read_bytes(ref)
        with _decoding(ref, data) as image:
            if image.format != "JPEG":
                image.verify()
            elif data.find(JPEG_END, image.tile[0][2] if image.tile else 0) < 0:
                raise OSError("the JPEG data stops before its end-of-image marker")


@contextlib.contextmanager
def _decoding(ref: str, data: bytes) -> Iterator[Image.Image]:
    """The opened image of ``ref``'s bytes ``data``; a problem while opening or decoding it is a DatasetError."""
    if not data:
        raise DatasetError(ref, None, "cannot decode the image: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                yield image
    except Image.DecompressionBombError as error:
        raise DatasetError(ref, None, f"refused, too large to decode safely: {error}") from None
    except UnidentifiedImageError:
        problem = "cannot decode the image: not an image format PIL recognizes (or cut short in its header)"
        raise DatasetError(ref, None, problem) from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise DatasetError(ref, None, f"cannot decode the image: corrupt or truncated ({error})") from None


def load_record_image(loader: ImageLoader, record: Record) -> Image.Image:
    """The image of ``record`` opened with ``loader``; an error names the image file (or member) and the record id."""
    try:
        return loader.load(record.image)
    except DatasetError as error:
        raise DatasetError(error.source, f"id {record.id}", error.problem) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Decode an opened image to RGB: large JPEGs drafted at half size, turned upright by their EXIF orientation,
    16-bit grayscale scaled to 8 bits."""
    limit = Image.MAX_IMAGE_PIXELS
    if image.format == "JPEG" and limit is not None and image.width * image.height > limit:
        image.draft("RGB", ((image.width + 1) // 2, (image.height + 1) // 2))
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64).clip(0, 65535)
        return Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
