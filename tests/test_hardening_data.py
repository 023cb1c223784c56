"""Hardening of the data layer (issue 17): a stray quote in a CSV loses no row uncounted, ``--on-bad-sample fail``
checks every image before training, ``data check`` warns of image paths outside the dataset root, and EXIF
orientation is applied."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.check import check_dataset
from cliptrace.data.images import ImageLoader
from cliptrace.data.policy import BadSamplePolicy
from cliptrace.data.readers import read_csv
from cliptrace.data.record import DatasetError

WIDE = {"COLUMNS": "250"}
ROWS = 200
HEADER = ["filepath", "title", "split", "id"]
MULTILINE = "a red circle,\nleft of a blue square,\nsmall"  # a legitimate caption over three lines, kept


def caption(index: int) -> str:
    """Row ``index``'s caption; every tenth holds a comma, so the csv module quotes it."""
    return MULTILINE if index == 10 else f"picture {index}, of a shape" if index % 10 == 0 else f"picture {index}"


def stray_quote_csv(path: Path, stray: int | None) -> Path:
    """A CSV of ``ROWS`` rows (ids r0...) written by the csv module, with a ``"`` put before the caption of row
    ``stray`` (0-based data row: file line ``stray + 2`` counting the header and the three-line caption)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    for index in range(ROWS):
        writer.writerow([f"images/{index}.png", caption(index), "train", f"r{index}"])
    lines = buffer.getvalue().splitlines(keepends=True)
    if stray is not None:
        number = line_of_row(stray)
        image, rest = lines[number - 1].split(",", 1)
        lines[number - 1] = f'{image},"{rest}'
    path.write_text("".join(lines), encoding="utf-8")
    return path


def line_of_row(index: int) -> int:
    """The 1-based file line data row ``index`` starts on (row 10's caption spans three lines)."""
    return index + 2 + (2 if index > 10 else 0)


def next_line_with_a_quote(path: Path, after: int) -> int:
    """The first 1-based line after line ``after`` holding a ``"``: where a quote opened on ``after`` closes."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(number for number in range(after + 1, len(lines) + 1) if '"' in lines[number - 1])


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=WIDE)
    return result.exit_code, result.output


# ---------------------------------------------------------------------------------------------- 2: a stray quote


def test_stray_quote_mid_file_fails_naming_the_line_and_skip_keeps_the_199_other_rows(tmp_path: Path) -> None:
    path = stray_quote_csv(tmp_path / "captions.csv", stray=83)
    line = line_of_row(83)
    closes = next_line_with_a_quote(path, line)
    taken = closes - line
    assert taken > 1  # the stray quote takes in whole rows, the last of them a good row with a quoted caption
    problem = (f"unbalanced quote: a quoted field opens on this line and runs on to line {closes}, taking in "
               f"{taken} line(s) after it, {taken} of which read as rows of their own")
    with pytest.raises(DatasetError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}, line {line}: {problem}"
    code, output = invoke("train", path, "--out", tmp_path / "run", "--epochs", "1", "--no-progress")
    assert code == 1 and output.replace("\n", "") == f"error: {path}, line {line}: {problem}"

    policy = BadSamplePolicy("skip")
    records = policy.load(path)
    assert [record.id for record in records] == [f"r{index}" for index in range(ROWS) if index != 83]
    assert [record.captions for record in records] == [(caption(index),) for index in range(ROWS) if index != 83]
    assert records[10].captions == (MULTILINE,)  # a legitimate quoted caption over three lines is kept
    recovered = f"{problem}; this row is left out and the lines after it are read again as rows, from line {line + 1}"
    assert [str(error) for error in policy.skipped] == [f"{path}, line {line}: {recovered}"]
    report = policy.write_report(tmp_path / "skipped.csv")
    assert policy.summary(report) == f"skipped 1 of {ROWS} records: see {report}"
    with report.open(newline="", encoding="utf-8") as handle:
        assert list(csv.reader(handle))[1:] == [[str(path), f"line {line}", recovered]]

    checked = check_dataset(path, check_images=False)
    assert [str(error) for error in checked.problems] == [f"{path}, line {line}: {recovered}"]
    assert checked.records == ROWS - 1


@pytest.mark.parametrize("stray", [ROWS - 1, ROWS - 2])
def test_stray_quote_at_the_end_fails_naming_the_line_and_skip_keeps_every_other_row(tmp_path: Path,
                                                                                     stray: int) -> None:
    """In the last row the quote is never closed; in the row before it, it takes in the last row."""
    path = stray_quote_csv(tmp_path / "captions.csv", stray=stray)
    line = line_of_row(stray)
    after = "" if stray == ROWS - 1 else ": it takes in the 1 line(s) after it, to the end of the file"
    problem = f"unbalanced quote: a quoted field opens on this line and is never closed{after}"
    with pytest.raises(DatasetError) as raised:
        read_csv(path)
    assert str(raised.value) == f"{path}, line {line}: {problem}"
    kept, errors = read_csv(path, on_error=(found := []).append), found
    assert [record.id for record in kept] == [f"r{index}" for index in range(ROWS) if index != stray]
    resumes = "" if stray == ROWS - 1 else (
        f"; this row is left out and the lines after it are read again as rows, from line {line + 1}")
    assert [str(error) for error in errors] == [f"{path}, line {line}: {problem}{resumes}"]

    code, output = invoke("data", "check", path, "--no-images")
    assert code == 1
    assert "1 problem(s)" in output and f"line {line}" in output and f"{ROWS - 1} records" in output


# ------------------------------------------------------------------------------ 8: images checked under fail


def noise_png(size: tuple[int, int] = (32, 24), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_fail_policy_stops_before_training_on_a_bad_image_the_epoch_would_not_draw(tmp_path: Path,
                                                                                  write_image) -> None:
    """17 records, batch 16, one epoch: one step draws 16 of them, and with this seed not the cut image (the last
    record); it is found all the same, before training starts."""
    # The one-process DistributedSampler of epoch 0 orders the records by torch.randperm seeded with the run's seed.
    seed = next(seed for seed in range(100)
                if torch.randperm(17, generator=torch.Generator().manual_seed(seed)).tolist()[-1] == 16)
    rows = [["filepath", "title", "id"]]
    for index in range(16):
        write_image(tmp_path / "images" / f"g{index}.png", (index * 15, 255 - index * 15, 90), (36, 36))
        rows.append([f"images/g{index}.png", f"picture {index}", f"g{index}"])
    cut = tmp_path / "images" / "cut.png"
    cut.write_bytes(noise_png()[:300])
    rows.append(["images/cut.png", "a picture cut short", "cut"])
    path = tmp_path / "captions.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    code, output = invoke("train", path, "--out", tmp_path / "run", "--image-size", "32", "--vocab-size", "300",
                          "--epochs", "1", "--batch-size", "16", "--warmup-steps", "1", "--eval-split", "",
                          "--no-progress", "--seed", seed)
    assert code == 1
    assert re.fullmatch(rf"error: {re.escape(str(cut))}, id cut: cannot decode the image: corrupt or truncated \(.+\)",
                        output.replace("\n", ""))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fail_check_catches_a_cut_jpeg_without_a_full_decode(tmp_path: Path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(buffer.getvalue())
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    loader = ImageLoader()
    loader.verify(str(whole))
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(cut))}: cannot decode the image: corrupt or truncated"):
        loader.verify(str(cut))


# --------------------------------------------------------------------------- 11: paths outside the dataset root


def test_data_check_warns_of_image_paths_outside_the_root_unless_allowed(tmp_path: Path, write_image) -> None:
    root, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    write_image(root / "images" / "in.png")
    write_image(tmp_path / "up.png")
    write_image(elsewhere / "abs.png")
    path = root / "captions.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([
            ["filepath", "title", "id"],
            ["images/in.png", "inside", "in"],
            ["../up.png", "one directory up", "up"],
            [str(elsewhere / "abs.png"), "an absolute path elsewhere", "abs"],
            ["images/../images/in2.png", "inside, spelled with ..", "in2"],
        ])
    write_image(root / "images" / "in2.png")
    report = check_dataset(path)
    assert report.ok
    assert [str(warning) for warning in report.warnings] == [
        f"{path}, id up: image {tmp_path / 'up.png'} is outside the dataset root {root}",
        f"{path}, id abs: image {elsewhere / 'abs.png'} is outside the dataset root {root}",
    ]
    code, output = invoke("data", "check", path)
    flat = output.replace("\n", " ")
    assert code == 0 and "2 warning(s)" in output and "--allow-outside-root" in flat and "OK" in output
    assert "id up" in output and "id abs" in output and "id in2" not in output
    code, output = invoke("data", "check", path, "--allow-outside-root")
    assert code == 0 and "warning" not in output and "OK" in output
    assert check_dataset(path, allow_outside_root=True).warnings == []


# ------------------------------------------------------------------------------------------- 11: EXIF orientation


def test_exif_orientation_is_applied_when_loading(tmp_path: Path) -> None:
    """Orientation 6: the stored image is shown turned 90 degrees clockwise."""
    height, width = 24, 40
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (230, 20, 20)   # left half red
    pixels[: height // 3, :, 2] = 240          # top third blue-ish
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        decoded = np.asarray(stored.convert("RGB"))
    loaded = np.asarray(ImageLoader().load(str(path)))
    assert loaded.shape == (width, height, 3)
    np.testing.assert_array_equal(loaded, np.rot90(decoded, k=-1))
    plain = tmp_path / "plain.jpg"
    Image.fromarray(pixels).save(plain, quality=95)
    with Image.open(plain) as stored:
        np.testing.assert_array_equal(np.asarray(ImageLoader().load(str(plain))), np.asarray(stored.convert("RGB")))
