"""``data check`` lists every broken row and image; ``data preview`` writes a contact sheet of the expected size."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli.data import data_app
from cliptrace.data.check import check_dataset
from cliptrace.data.images import ImageLoader
from cliptrace.data.preview import contact_sheet
from cliptrace.data.record import Record

runner = CliRunner()
WIDE = {"COLUMNS": "250"}
COLORS = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (240, 240, 20), (200, 20, 200), (20, 200, 200), (120, 60, 0)]


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file, delimiter=delimiter).writerows(rows)
    return path


@pytest.fixture
def clean(tmp_path: Path, write_image) -> Path:
    for index, color in enumerate(COLORS):
        write_image(tmp_path / "images" / f"{index}.png", color, (40 + 10 * index, 40))
    rows = [["filepath", "title", "split", "id"]]
    for index in range(len(COLORS)):
        split = "val" if index in (2, 5) else "train"
        rows.append([f"images/{index}.png", f"colour number {index}", split, f"r{index}"])
    rows.append(["images/0.png", "a second caption of the first image", "train", "r0"])
    return write_csv(tmp_path / "captions.csv", rows)


@pytest.fixture
def broken(tmp_path: Path, write_image) -> Path:
    write_image(tmp_path / "images" / "ok0.png")
    write_image(tmp_path / "images" / "ok1.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    return write_csv(tmp_path / "broken.csv", [
        ["filepath", "title", "split", "id"],                   # line 1
        ["images/ok0.png", "a red image", "train", "ok0"],      # line 2
        ["images/ok1.png", "another red image", "val", "ok1"],  # line 3
        ["images/x.png", "   ", "train", "x"],                  # line 4: empty caption
        ["images/missing.png", "gone", "train", "missing"],     # line 5: image file missing
        ["images/bad.png", "undecodable", "train", "bad"],      # line 6: image undecodable
        ["images/short.png", "too few fields"],                 # line 7: missing field
    ])


def test_check_dataset_collects_rows_and_images(broken: Path) -> None:
    report = check_dataset(broken)
    assert not report.ok
    assert (report.records, report.captions, report.splits) == (4, 4, {"train": 3, "val": 1})
    assert [problem.location for problem in report.problems] == ["line 4", "line 7", "id missing", "id bad"]
    assert report.problems[2].source == str(broken.parent / "images" / "missing.png")
    assert "not found" in report.problems[2].problem and "cannot decode" in report.problems[3].problem
    assert [problem.location for problem in check_dataset(broken, check_images=False).problems] == ["line 4", "line 7"]


def test_check_cli_lists_every_problem_and_fails(broken: Path) -> None:
    result = runner.invoke(data_app, ["check", str(broken)], env=WIDE)
    assert result.exit_code == 1
    for where in ("line 4", "line 7", "id missing", "id bad"):
        assert where in result.output
    assert "4 problem(s)" in result.output
    assert "4 records, 4 captions; splits: train 3, val 1" in result.output


def test_check_cli_clean_dataset(clean: Path) -> None:
    result = runner.invoke(data_app, ["check", str(clean)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "7 records, 8 captions; splits: train 5, val 2" in result.output
    directory = runner.invoke(data_app, ["check", str(clean.parent)], env=WIDE)
    assert directory.exit_code == 0 and "7 records" in directory.output


def test_check_cli_reader_options(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "a.png")
    path = write_csv(tmp_path / "data.txt", [["file", "c1", "c2"], ["a.png", "one, two", "three"]], delimiter="\t")
    result = runner.invoke(
        data_app,
        ["check", str(path), "--format", "csv", "--sep", "tab", "--image-key", "file", "--caption-key", "c1",
         "--caption-key", "c2"],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    assert "1 records, 2 captions" in result.output
    wrong = runner.invoke(data_app, ["check", str(path), "--format", "csv", "--sep", "tab"], env=WIDE)
    assert wrong.exit_code == 1 and "missing column(s) ['filepath', 'title']" in wrong.output


def test_check_cli_unreadable_dataset(tmp_path: Path) -> None:
    result = runner.invoke(data_app, ["check", str(tmp_path / "nothing.csv")], env=WIDE)
    assert result.exit_code == 1
    assert "no such file or directory" in result.output and "nothing.csv" in result.output


def cell_centres(image: np.ndarray, columns: int, tile: int, count: int) -> list[tuple[int, ...]]:
    """The pixel at the centre of each cell's image square."""
    cell_height = tile * 3 // 2
    centres = []
    for slot in range(count):
        row, column = divmod(slot, columns)
        centres.append(tuple(int(v) for v in image[row * cell_height + tile // 2, column * tile + tile // 2, :3]))
    return centres


def test_preview_cli_writes_a_sheet_of_the_expected_size(clean: Path, tmp_path: Path) -> None:
    out = tmp_path / "sheet" / "all.png"
    result = runner.invoke(data_app, ["preview", str(clean), "--out", str(out), "--n", "5", "--columns", "3"], env=WIDE)
    assert result.exit_code == 0, result.output
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.size == (3 * 256, 2 * (256 * 3 // 2))

    val = tmp_path / "val.png"
    result = runner.invoke(data_app, ["preview", str(clean), "--out", str(val), "--split", "val"], env=WIDE)
    assert result.exit_code == 0, result.output
    with Image.open(val) as sheet:
        assert sheet.size == (2 * 256, 256 * 3 // 2)
        centres = cell_centres(np.asarray(sheet.convert("RGB")), columns=2, tile=256, count=2)
    for centre, color in zip(centres, (COLORS[2], COLORS[5])):
        assert np.abs(np.subtract(centre, color)).max() <= 3

    empty = runner.invoke(data_app, ["preview", str(clean), "--out", str(val), "--split", "nope"], env=WIDE)
    assert empty.exit_code == 1 and "no records in split 'nope'" in empty.output


def test_contact_sheet_shows_every_record_in_order_with_unicode_captions(tmp_path: Path, write_image) -> None:
    captions = ["赤い丸と青い四角", "دائرة حمراء فوق مربع أزرق", "a red circle 🔴 above 🟦 " * 6]
    records = []
    for index, caption in enumerate(captions):
        write_image(tmp_path / f"{index}.png", COLORS[index], (30, 50))
        records.append(Record(f"id-{index}", str(tmp_path / f"{index}.png"), (caption, "second")))
    out = contact_sheet(records, ImageLoader(), tmp_path / "sheet.png", n=10, columns=4, tile=96)
    with Image.open(out) as sheet:
        assert sheet.size == (3 * 96, 96 * 3 // 2)
        centres = cell_centres(np.asarray(sheet.convert("RGB")), columns=3, tile=96, count=3)
    for centre, color in zip(centres, COLORS):
        assert np.abs(np.subtract(centre, color)).max() <= 3


def test_contact_sheet_samples_n_records_reproducibly(tmp_path: Path, write_image) -> None:
    records = []
    for index, color in enumerate(COLORS):
        write_image(tmp_path / f"{index}.png", color)
        records.append(Record(str(index), str(tmp_path / f"{index}.png"), (f"caption {index}",)))
    sheets = [
        contact_sheet(records, ImageLoader(), tmp_path / f"sheet{k}.png", n=3, columns=3, tile=64, seed=5) for k in (0, 1)
    ]
    pixels = [np.asarray(Image.open(sheet).convert("RGB")) for sheet in sheets]
    assert pixels[0].shape == (96, 192, 3) and np.array_equal(pixels[0], pixels[1])
    shown = cell_centres(pixels[0], columns=3, tile=64, count=3)
    indices = [min(range(len(COLORS)), key=lambda i: np.abs(np.subtract(centre, COLORS[i])).sum()) for centre in shown]
    assert len(set(indices)) == 3 and indices == sorted(indices)
    for centre, index in zip(shown, indices):
        assert np.abs(np.subtract(centre, COLORS[index])).max() <= 3
