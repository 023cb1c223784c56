"""Bad input data gets a clear error naming the file and the row, key or record id, or is converted, truncated with
a warning, or skipped under ``--on-bad-sample skip``: one test per case of docs/bad-input.md."""

from __future__ import annotations

import csv
import io
import json
import re
import struct
import tarfile
import warnings
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.images import ImageLoader, load_record_image
from cliptrace.data.pairs import PairDataset
from cliptrace.data.policy import BadSamplePolicy, check_policy
from cliptrace.data.readers import load_records, read_coco, read_csv, read_webdataset
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.transforms import ImageTransform
from cliptrace.models import HFCLIP, load_model, train_tokenizer
from cliptrace.models.tokenizer import CaptionTruncatedWarning, tokenize
from cliptrace.trak.attribute import RecordBatches, data_fingerprint, read_records

WIDE = {"COLUMNS": "250"}


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return path


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (32, 24), seed: int = 0) -> Image.Image:
    """An RGB image of random pixels (it compresses badly, so cutting the file in half cuts pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring ``width`` × ``height`` grey pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def record_for(path: Path, record_id: str = "r1") -> Record:
    return Record(record_id, str(path), ("a caption",))


def load_through(route: str, record: Record) -> None:
    """Load ``record``'s image the way one part of the package does."""
    if route == "loader":
        load_record_image(ImageLoader(), record)
    elif route == "pair dataset":
        PairDataset([record], ImageTransform(8))[0]
    else:  # TRAK featurization
        model = SimpleNamespace(preprocess=ImageTransform(8), tokenize=lambda texts: {})
        RecordBatches(model, [record], ImageLoader(), batch_size=1).pairs([0])


ROUTES = ["loader", "pair dataset", "trak batches"]


# ------------------------------------------------------------------------------------------------- 1-3: images


@pytest.mark.parametrize("route", ROUTES)
def test_missing_image_names_the_file_and_the_record_id(tmp_path: Path, route: str) -> None:
    missing = tmp_path / "images" / "gone.png"
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(missing))}, id r1: image file not found$"):
        load_through(route, record_for(missing))


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("route", ROUTES)
def test_truncated_image_names_the_file_and_the_record_id(tmp_path: Path, format: str, route: str) -> None:
    data = encoded(noise(), format)
    path = tmp_path / f"cut.{format.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}, id r1: cannot decode the image: corrupt or"):
        load_through(route, record_for(path))


def test_unrecognized_image_bytes_name_the_file_and_the_record_id(tmp_path: Path) -> None:
    path = tmp_path / "not-an-image.png"
    path.write_bytes(b"GIF? no: just text")
    expected = (f"{path}, id r1: cannot decode the image: not an image format PIL recognizes (or cut short in its "
                "header)")
    with pytest.raises(DatasetError) as raised:
        load_record_image(ImageLoader(), record_for(path))
    assert str(raised.value) == expected


def test_zero_byte_image_is_an_error_naming_it(tmp_path: Path, write_tar) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    shard = write_tar(tmp_path / "s.tar", {"k.png": b"", "k.txt": b"caption"})
    for reference in (str(path), f"{shard}::k.png"):
        with pytest.raises(DatasetError) as raised:
            load_record_image(ImageLoader(), record_for(Path(reference)))
        assert str(raised.value) == f"{reference}, id r1: cannot decode the image: the file is empty (0 bytes)"


# ------------------------------------------------------------------------------------------ 4: modes to RGB


def _mode_image(mode: str) -> tuple[bytes, np.ndarray]:
    """Encoded bytes of a small image in ``mode`` and its RGB pixels by closed form."""
    rng = np.random.default_rng(len(mode))
    if mode == "L":
        gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
        return encoded(Image.fromarray(gray)), np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA"):
        rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
        rgba[0, :, 3] = 0  # fully transparent pixels keep their stored colour
        if mode == "LA":
            la = rgba[..., [0, 3]]
            return encoded(Image.fromarray(la, "LA")), np.repeat(la[..., :1], 3, axis=2)
        return encoded(Image.fromarray(rgba, "RGBA")), rgba[..., :3]
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        indices = rng.integers(0, 256, (5, 7), dtype=np.uint8)
        image = Image.fromarray(indices, "P")
        image.putpalette(palette.tobytes())
        image.info["transparency"] = 3
        return encoded(image, transparency=3), palette[indices]
    if mode == "I;16":
        values = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
        values[0, :3] = (0, 257 * 200, 65535)
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        eight_bit = np.rint(values / 257).astype(np.uint8)
        return encoded(image), np.repeat(eight_bit[..., None], 3, axis=2)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16"])
def test_image_modes_are_converted_to_rgb(tmp_path: Path, mode: str) -> None:
    data, expected = _mode_image(mode)
    path = tmp_path / "image.png"
    path.write_bytes(data)
    with Image.open(path) as stored:
        assert stored.mode == mode
    image = ImageLoader().load(str(path))
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), expected)
    if mode != "I;16":  # PIL's own conversion, except for 16-bit, which PIL clips at 255 instead of scaling
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_cmyk_jpeg_is_converted_like_pil_does(tmp_path: Path) -> None:
    cmyk = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 8, 4), dtype=np.uint8), "CMYK")
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(encoded(cmyk, "JPEG", quality=95))
    with Image.open(path) as stored:
        assert stored.mode == "CMYK"
        expected = np.asarray(stored.convert("RGB"))
    image = ImageLoader().load(str(path))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)


# ------------------------------------------------------------------------------------------------ 5: huge images


def test_huge_images_decode_without_warning_up_to_the_bomb_limit(tmp_path: Path) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    jpeg, png = tmp_path / "huge.jpg", tmp_path / "huge.png"
    assert 10_000 * 9_000 > limit and 9_500 * 9_500 > limit  # PIL warns above its limit
    jpeg.write_bytes(encoded(Image.new("RGB", (10_000, 9_000), (200, 30, 60)), "JPEG", quality=90))
    png.write_bytes(encoded(Image.new("L", (9_500, 9_500), 77), "PNG", compress_level=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drafted = ImageLoader().load(str(jpeg))
        full = ImageLoader().load(str(png))
    assert drafted.mode == "RGB" and drafted.size == (5_000, 4_500)  # a JPEG decodes at half resolution
    for (low, high), value in zip(drafted.getextrema(), (200, 30, 60)):
        assert value - 3 <= low <= high <= value + 3
    assert full.mode == "RGB" and full.size == (9_500, 9_500) and full.getextrema() == ((77, 77),) * 3
    assert Image.MAX_IMAGE_PIXELS == limit


def test_image_above_the_bomb_limit_is_refused_naming_file_and_size(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(20_000, 10_000))
    limit = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(DatasetError) as raised:
        load_record_image(ImageLoader(), record_for(path))
    assert str(raised.value) == (
        f"{path}, id r1: refused, too large to decode safely: Image size (200000000 pixels) exceeds limit of "
        f"{limit} pixels, could be decompression bomb DOS attack."
    )


# -------------------------------------------------------------------------------------------- 6-7: captions, text


def _empty_caption_dataset(kind: str, tmp_path: Path, write_tar) -> tuple[Path, str, str]:
    """A dataset of two samples, the second with a whitespace-only caption: (path, location, problem)."""
    if kind == "csv":
        path = write_csv(tmp_path / "d.csv", [["filepath", "title"], ["good.png", "fine"], ["bad.png", " \t "]])
        return path, "line 3", "empty caption in 'title'"
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"image": "good.png", "caption": "fine"}) + "\n"
                        + json.dumps({"image": "bad.png", "captions": ["  "]}) + "\n", encoding="utf-8")
        return path, "line 2", "empty caption in 'captions'"
    if kind == "coco":  # image 2 then has no caption left
        path = tmp_path / "captions_train2017.json"
        path.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "good.png"}, {"id": 2, "file_name": "bad.png"}],
            "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 2, "caption": "\n"}],
        }), encoding="utf-8")
        return path, "annotations[1]", "empty caption in 'caption'"
    members = {"good.png": b"png", "good.txt": b"fine", "bad.png": b"png", "bad.txt": b" \n"}
    path = write_tar(tmp_path / "d.tar", members)
    return path, "key bad", "empty caption in 'bad.txt'"


@pytest.mark.parametrize("kind", ["csv", "jsonl", "coco", "webdataset"])
def test_empty_caption_is_an_error_naming_file_and_row_and_skipped_under_skip(
    tmp_path: Path, write_tar, kind: str
) -> None:
    path, location, problem = _empty_caption_dataset(kind, tmp_path, write_tar)
    with pytest.raises(DatasetError) as raised:
        load_records(path)
    assert str(raised.value) == f"{path}, {location}: {problem}"
    policy = BadSamplePolicy("skip")
    assert [record.captions for record in policy.load(path)] == [("fine",)]
    also = [(str(path), "images[1]", "image 2 has no caption")] if kind == "coco" else []
    skipped = [(error.source, error.location, error.problem) for error in policy.skipped]
    assert skipped == [(str(path), location, problem), *also]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "coco", "webdataset"])
def test_non_utf8_metadata_names_file_and_line(tmp_path: Path, write_tar, kind: str) -> None:
    latin1 = "café".encode("latin-1")
    if kind == "csv":
        path, location = tmp_path / "d.csv", "line 3: not UTF-8 text"
        path.write_bytes(b"filepath,title\na.png,fine\nb.png," + latin1 + b"\n")
    elif kind == "jsonl":
        path, location = tmp_path / "d.jsonl", "line 2: not UTF-8 text"
        path.write_bytes(b'{"image": "a.png", "caption": "fine"}\n{"image": "b.png", "caption": "' + latin1 + b'"}\n')
    elif kind == "coco":
        path, location = tmp_path / "captions.json", "line 4: not UTF-8 text"
        path.write_bytes(b'{"images": [{"id": 1, "file_name": "a.png"}],\n"annotations": [\n{"image_id": 1,\n'
                         b'"caption": "' + latin1 + b'"}]}\n')
    else:
        path = write_tar(tmp_path / "d.tar", {"a.png": b"png", "a.txt": latin1})
        location = "key a: a.txt is not UTF-8 text"
    with pytest.raises(DatasetError) as raised:
        load_records(path)
    assert str(raised.value) == f"{path}, {location}"


# ---------------------------------------------------------------------------------------------- 8: long captions


def test_long_captions_are_truncated_to_the_context_length_with_one_warning() -> None:
    words = ["a", "red", "circle", "above", "a", "small", "blue", "square", "next", "to", "two", "green", "triangles"]
    tokenizer = train_tokenizer([" ".join(words)] * 4, vocab_size=300, context_length=8)
    long_one, long_two = " ".join(words * 2), " ".join(words * 3)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0)
    length = model.context_length
    with pytest.warns(CaptionTruncatedWarning) as caught:
        tokens = model.tokenize(["a red circle", long_one, long_two])
    assert len(caught) == 1
    assert str(caught[0].message) == (
        f"2 of 3 caption(s) longer than the context length of {length} tokens were truncated to fit it; "
        f"the first: {long_one[:60] + '...'!r}"
    )
    for row, text in ((1, long_one), (2, long_two)):
        full = tokenizer(text)["input_ids"]
        assert len(full) > length
        assert tokens["input_ids"][row].tolist() == full[: length - 1] + [tokenizer.eos_token_id]
        assert tokens["attention_mask"][row].tolist() == [1] * length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = tokenize(tokenizer, ["a red circle", "two green triangles"], length)
    assert short["attention_mask"].sum().item() < 2 * length


# --------------------------------------------------------------------------------------------- 9-11: structure


@pytest.mark.parametrize(
    ("header", "missing"),
    [(["filepath", "caption"], ["title"]), (["Filepath", "Title"], ["filepath", "title"]), (["image"], None)],
)
def test_csv_with_missing_or_misnamed_columns_names_file_columns_and_header(
    tmp_path: Path, header: list[str], missing: list[str] | None
) -> None:
    path = write_csv(tmp_path / "d.csv", [header, ["a.png", "x"][: len(header)]])
    with pytest.raises(DatasetError) as raised:
        read_csv(path, on_error=lambda error: None)  # a whole-file problem raises even when rows may be skipped
    if missing is None:  # one column: probably the wrong separator
        expected = (f"{path}, line 1: missing column(s) ['filepath', 'title']; the header has ['image'] "
                    "(is ',' the right separator?)")
    else:
        expected = f"{path}, line 1: missing column(s) {missing}; the header has {header}"
    assert str(raised.value) == expected


def test_coco_dangling_ids_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "no-caption.jpg"}],
        "annotations": [{"image_id": 1, "caption": "fine"}, {"image_id": 99, "caption": "whose image?"}],
    }), encoding="utf-8")
    with pytest.raises(DatasetError) as raised:
        read_coco(path)
    assert str(raised.value) == f"{path}, images[1]: image 2 has no caption"
    problems: list[DatasetError] = []
    assert [record.id for record in read_coco(path, on_error=problems.append)] == ["1"]
    assert [str(problem) for problem in problems] == [
        f"{path}, images[1]: image 2 has no caption", f"{path}, annotations[1]: unknown image_id 99"
    ]


def _shard_bytes() -> tuple[bytes, dict[str, tuple[int, int]]]:
    """A shard of samples a, b, c (png + txt each) and the (header offset, data offset) of every member."""
    buffer = io.BytesIO()
    offsets = {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
            image = encoded(Image.new("RGB", (20, 20), color))
            for name, data in ((f"{key}.png", image), (f"{key}.txt", key.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                offsets[name] = (buffer.tell(), buffer.tell() + tarfile.BLOCKSIZE)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), offsets


@pytest.mark.parametrize("cut", ["inside member data", "inside a header", "after a member"])
def test_truncated_shard_is_an_error_naming_shard_and_key(tmp_path: Path, cut: str) -> None:
    data, offsets = _shard_bytes()
    start = offsets["b.png"][1]
    png_size = len(encoded(Image.new("RGB", (20, 20), (0, 255, 0))))
    end = {"inside member data": start + 10, "inside a header": offsets["c.png"][0] + 100,
           "after a member": offsets["c.png"][0]}[cut]
    shard = tmp_path / "shard.tar"
    shard.write_bytes(data[:end])
    if cut == "inside member data":
        kept = ["a"]
        expected = f"{shard}, key b: the shard is truncated: the file ends inside member b.png (10 of {png_size} bytes)"
    else:
        kept = ["a", "b"]
        expected = (f"{shard}, byte {offsets['c.png'][0]}: the shard is truncated or corrupt: after member b.txt "
                    "comes neither a whole member "
                    f"header nor the end-of-archive block (byte {offsets['c.png'][0]} of {end}); any members after it "
                    "are lost")
    with pytest.raises(DatasetError) as raised:
        read_webdataset(shard)
    assert str(raised.value) == expected
    problems: list[DatasetError] = []
    records = read_webdataset(shard, on_error=problems.append)
    assert [record.id for record in records] == kept and [str(problem) for problem in problems] == [expected]
    loader = ImageLoader()
    assert np.asarray(loader.load(f"{shard}::a.png"))[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(shard))}::c.png, id c: the shard is truncated"):
        load_record_image(loader, Record("c", f"{shard}::c.png", ("c",)))


# ------------------------------------------------------------------------------------- the bad-sample policy


@pytest.fixture
def dirty(tmp_path: Path, write_image) -> tuple[Path, list[str], list[tuple[str, str, str]]]:
    """A CSV dataset with good records and one of each bad sample: (path, good train ids, expected skip report).

    Train: 16 good records and five bad samples; test: two good records and one with a corrupt image.
    """
    root = tmp_path / "dirty"
    rows = [["filepath", "title", "split", "id"]]
    good = []
    for index in range(16):
        color = (index * 15, 255 - index * 15, (index * 70) % 256)
        write_image(root / "images" / f"g{index:02d}.png", color, (40 + index, 36))
        rows.append([f"images/g{index:02d}.png", f"picture {index} with colour {color}", "train", f"g{index:02d}"])
        good.append(f"g{index:02d}")
    for index in range(2):
        write_image(root / "images" / f"t{index}.png", (90, 90, 90 + 80 * index), (36, 36))
        rows.append([f"images/t{index}.png", f"test picture {index}", "test", f"t{index}"])
    images = root / "images"
    (images / "cut.png").write_bytes(encoded(noise())[:200])
    (images / "zero.png").write_bytes(b"")
    (images / "cut-test.png").write_bytes(encoded(noise(seed=1))[:200])
    rows += [
        ["images/nowhere.png", "a picture that is not there", "train", "missing"],  # line 20
        ["images/cut.png", "a picture cut short", "train", "cut"],                   # line 21
        ["images/g00.png", "   ", "train", "blank"],                                 # line 22: empty caption
        ["images/zero.png", "an empty file", "train", "zero"],                       # line 23
        ["images/g01.png", "too few fields"],                                        # line 24
        ["images/cut-test.png", "a test picture cut short", "test", "cut-test"],     # line 25
    ]
    path = write_csv(root / "captions.csv", rows)
    cut = images / "cut.png"
    report = [
        (str(path), "line 22", "empty caption in 'title'"),
        (str(path), "line 24", "2 fields, but the header has 4"),
        (str(images / "nowhere.png"), "id missing", "image file not found"),
        (str(images / "cut.png"), "id cut", f"cannot decode the image: corrupt or truncated ({pil_error(cut)})"),
        (str(images / "zero.png"), "id zero", "cannot decode the image: the file is empty (0 bytes)"),
    ]
    return path, good, report


def pil_error(path: Path) -> str:
    """What PIL says when it decodes ``path``."""
    try:
        with Image.open(path) as image:
            image.load()
    except OSError as error:
        return str(error)
    raise AssertionError(f"{path} decodes")


def read_report(path: Path) -> list[tuple[str, str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["source", "location", "problem"]
    return [tuple(row) for row in rows[1:]]


def test_skip_policy_keeps_exactly_the_good_records_and_reports_the_bad_ones(dirty, tmp_path: Path) -> None:
    path, good, report = dirty
    policy = BadSamplePolicy("skip")
    records = policy.screen([record for record in policy.load(path) if record.split == "train"])
    assert [record.id for record in records] == good
    written = policy.write_report(tmp_path / "out" / "skipped.csv")
    assert read_report(written) == report
    assert sorted(item.name for item in written.parent.iterdir()) == ["skipped.csv"]  # no temporary file left
    assert policy.matches_report(written)
    assert policy.summary(written) == f"skipped 5 of 24 records: see {written}"
    warning = r"captions\.csv: skipped 5 of 24 records; the first: .*line 22: empty caption"
    with pytest.warns(UserWarning, match=warning):
        assert read_records(path, "train", "skip") == records


def test_fail_policy_checks_every_image_up_front_and_fails_on_the_first_bad_one(dirty, tmp_path: Path) -> None:
    path, good, _ = dirty
    policy = BadSamplePolicy("fail")
    with pytest.raises(DatasetError) as raised:
        policy.load(path)
    assert str(raised.value) == f"{path}, line 22: empty caption in 'title'"
    train = [record for record in load_records(path, on_error=lambda error: None) if record.split == "train"]
    assert [record.id for record in train] == [*good, "missing", "cut", "zero"]
    for bad in ("cut", "zero", "missing"):  # each bad image fails the check, ahead of any loading
        records = [record for record in train if record.id in good or record.id == bad]
        with pytest.raises(DatasetError, match=rf", id {bad}: (image file not found|cannot decode the image)"):
            policy.screen(records)
    clean = [record for record in train if record.id in good]
    assert policy.screen(clean) == clean and policy.write_report(tmp_path / "x.csv") is None
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(ValueError, match="on_bad_sample must be one of fail, skip, not 'ignore'"):
        check_policy("ignore")


def test_skipping_every_record_is_an_error(tmp_path: Path, write_image) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "zero.png").write_bytes(b"")
    broken_rows = write_csv(tmp_path / "rows.csv", [["filepath", "title"], ["a.png", " "], ["b.png", ""]])
    no_images = write_csv(tmp_path / "images.csv", [["filepath", "title"], ["images/zero.png", "x"], ["nope.png", "y"]])
    with pytest.raises(DatasetError) as raised:
        BadSamplePolicy("skip").load(broken_rows)
    assert str(raised.value) == (
        f"{broken_rows}: every one of its 2 samples is broken; the first: {broken_rows}, line 2: "
        "empty caption in 'title'"
    )
    policy = BadSamplePolicy("skip")
    with pytest.raises(DatasetError) as raised:
        policy.screen(policy.load(no_images))
    assert str(raised.value) == (
        f"{images / 'zero.png'}, id images/zero: cannot decode the image: the file is empty (0 bytes); every one of "
        "the 2 records in use was skipped for a bad image"
    )


# ------------------------------------------------------------------------------------- the policy on the CLI

def train_args(epochs: int = 1, batch_size: int = 8) -> list[str]:
    return ["--image-size", "32", "--vocab-size", "300", "--epochs", str(epochs), "--batch-size", str(batch_size),
            "--warmup-steps", "1", "--eval-split", "", "--no-progress"]


TRAK = ["--proj-dim", "32", "--bank-size", "8", "--batch-size", "8", "--no-progress",
        "--parameter", "model.visual_projection.*", "--parameter", "model.text_projection.*"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=WIDE)
    return result.exit_code, result.output.replace("\n", "")


def test_train_and_trak_skip_exactly_the_bad_samples(dirty, tmp_path: Path) -> None:
    path, good, report = dirty
    run, clean_run = tmp_path / "run", tmp_path / "clean-run"
    code, output = invoke("train", path, "--out", run, "--on-bad-sample", "skip", *train_args())
    assert code == 0, output
    assert f"skipped 5 of 24 records: see {run / 'skipped.csv'}" in output
    assert read_report(run / "skipped.csv") == report

    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    clean = write_csv(path.with_name("clean.csv"), [rows[0], *(row for row in rows[1:] if row[-1] in good)])
    code, output = invoke("train", clean, "--out", clean_run, *train_args())
    assert code == 0, output
    skipped_weights = load_model(run / "model").state_dict()
    clean_weights = load_model(clean_run / "model").state_dict()
    assert all(torch.equal(skipped_weights[name], clean_weights[name]) for name in clean_weights)

    store = tmp_path / "store"
    code, output = invoke("trak", "featurize", run, path, "--store", store, "--on-bad-sample", "skip", *TRAK)
    assert code == 0, output
    assert f"skipped 5 of 24 records: see {store / 'skipped.csv'}" in output
    assert read_report(store / "skipped.csv") == report
    expected = [record for record in load_records(clean) if record.id in good]
    assert json.loads((store / "manifest.json").read_text())["settings"]["train_data"] == data_fingerprint(expected)

    out = tmp_path / "scores"
    code, output = invoke("trak", "topk", run, path, "--store", store, "--out", out, "--top-k", "2",
                          "--on-bad-sample", "skip", *TRAK)
    assert code == 0, output
    ids = json.loads((out / "ids.json").read_text())
    assert ids["train"] == good and ids["targets"] == ["t0", "t1"]
    cut_test = (str(path.parent / "images" / "cut-test.png"), "id cut-test", report[3][2])
    assert read_report(out / "skipped.csv") == [*report[:2], cut_test, *report[2:]]  # the targets are read first
    assert f"skipped 6 of 24 records: see {out / 'skipped.csv'}" in output


def test_fail_policy_exits_1_naming_the_first_problem(dirty, tmp_path: Path) -> None:
    path, good, _ = dirty
    code, output = invoke("train", path, "--out", tmp_path / "run", *train_args())
    assert code == 1 and output == f"error: {path}, line 22: empty caption in 'title'"
    one_bad_image = write_csv(path.with_name("one-bad.csv"), [
        ["filepath", "title", "id"],
        *([f"images/{record_id}.png", f"caption of {record_id}", record_id] for record_id in good),
        ["images/nowhere.png", "not there", "missing"],
    ])
    code, output = invoke("train", one_bad_image, "--out", tmp_path / "run2", *train_args(batch_size=17))
    assert code == 1 and output == f"error: {path.parent / 'images' / 'nowhere.png'}, id missing: image file not found"
    code, output = invoke("trak", "featurize", tmp_path / "run", path, "--store", tmp_path / "store", *TRAK)
    assert code == 1 and output == f"error: {path}, line 22: empty caption in 'title'"


def test_resumed_skip_run_must_skip_the_same_samples(dirty, tmp_path: Path) -> None:
    path, _, _ = dirty
    run = tmp_path / "run"
    code, output = invoke("train", path, "--out", run, "--on-bad-sample", "skip", *train_args())
    assert code == 0, output
    (path.parent / "images" / "g03.png").unlink()
    code, output = invoke("train", path, "--out", run, "--on-bad-sample", "skip", "--resume", *train_args(epochs=2))
    assert code == 1
    assert output == (f"error: {run / 'skipped.csv'}: the data no longer gives the samples this run skipped; it "
                      "changed since the run started, and resuming would train on other records")


def test_evaluate_skips_bad_samples_under_skip(dirty, tmp_path: Path) -> None:
    path, _, report = dirty
    run = tmp_path / "run"
    assert invoke("train", path, "--out", run, "--on-bad-sample", "skip", *train_args())[0] == 0
    out = tmp_path / "eval" / "metrics.json"
    code, output = invoke("eval", run / "model", path, "--split", "test", "--out", out, "--on-bad-sample", "skip",
                          "--no-progress")
    assert code == 0, output
    assert json.loads(out.read_text())["n_images"] == 2
    assert read_report(out.with_name("metrics.skipped.csv")) == [*report[:2], (
        str(path.parent / "images" / "cut-test.png"), "id cut-test", report[3][2])]


def test_a_bad_image_in_a_dataloader_worker_reads_as_the_same_one_line_error(tmp_path: Path) -> None:
    """torch rebuilds a worker's exception from its formatted traceback; the error keeps its one-line message."""
    from torch.utils.data import DataLoader

    record = Record("gone", str(tmp_path / "gone.png"), ("a caption",))
    dataset = PairDataset([record], ImageTransform(8))
    with pytest.raises(DatasetError) as in_process:
        dataset[0]
    with pytest.raises(DatasetError) as in_worker:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=list)))
    assert str(in_worker.value) == str(in_process.value) == f"{tmp_path / 'gone.png'}, id gone: image file not found"
