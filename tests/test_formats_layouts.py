"""Dataset layouts as users keep them: COCO's official layout, a Karpathy file outside the image root, open_clip's
tab-separated .csv, and a HuggingFace image folder with split subfolders; records and pixels match what was written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cliptrace.data.formats import FORMATS, REGISTRY
from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import dataset_path, load_records, select_split
from cliptrace.data.record import DatasetError, Record

RED, GREEN, BLUE, GREY = (200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)


def assert_pixels(ref: str, color: tuple[int, int, int], tolerance: int = 0) -> None:
    """The image ``ref`` names decodes to a single-colour 8x6 image of ``color``."""
    pixels = np.asarray(ImageLoader().load(ref)).astype(int)
    assert pixels.shape == (6, 8, 3)
    assert np.abs(pixels - np.array(color)).max() <= tolerance


def coco_file(path: Path, images: list[tuple[int, str]], captions: list[tuple[int, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [{"id": image_id, "file_name": name} for image_id, name in images],
        "annotations": [{"id": index, "image_id": image_id, "caption": text}
                        for index, (image_id, text) in enumerate(captions)],
    }))
    return path


@pytest.fixture
def coco_root(tmp_path: Path, write_image) -> Path:
    """COCO's official layout: annotations/captions_{train,val}2017.json beside train2017/ and val2017/."""
    root = tmp_path / "coco"
    write_image(root / "train2017" / "000000000009.jpg", RED)
    write_image(root / "train2017" / "000000000025.jpg", GREEN)
    write_image(root / "val2017" / "000000000139.jpg", BLUE)
    coco_file(root / "annotations" / "captions_train2017.json",
              [(9, "000000000009.jpg"), (25, "000000000025.jpg")],
              [(9, "a red plate"), (25, "a green giraffe"), (9, "food on a plate")])
    coco_file(root / "annotations" / "captions_val2017.json", [(139, "000000000139.jpg")], [(139, "a blue room")])
    return root


def test_coco_annotation_file_finds_images_in_the_sibling_split_folder(coco_root: Path) -> None:
    records = load_records(coco_root / "annotations" / "captions_train2017.json")
    assert records == [
        Record("9", str(coco_root / "train2017" / "000000000009.jpg"), ("a red plate", "food on a plate"), "train"),
        Record("25", str(coco_root / "train2017" / "000000000025.jpg"), ("a green giraffe",), "train"),
    ]
    assert_pixels(records[0].image, RED, tolerance=3)
    val = load_records(coco_root / "annotations" / "captions_val2017.json")
    assert val == [Record("139", str(coco_root / "val2017" / "000000000139.jpg"), ("a blue room",), "val")]


def test_coco_root_folder_reads_every_split(coco_root: Path) -> None:
    records = load_records(coco_root)
    assert [(record.id, record.split) for record in records] == [("9", "train"), ("25", "train"), ("139", "val")]
    assert select_split(records, "val")[0].image == str(coco_root / "val2017" / "000000000139.jpg")
    assert_pixels(select_split(records, "val")[0].image, BLUE, tolerance=3)
    assert dataset_path(coco_root) == coco_root
    assert load_records(coco_root / "annotations") == records


def test_coco_image_root_overrides_the_layout(coco_root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    records = load_records(coco_root / "annotations" / "captions_train2017.json", image_root=elsewhere)
    assert [record.image for record in records] == [
        str(elsewhere / "000000000009.jpg"), str(elsewhere / "000000000025.jpg")]


def test_coco_folder_with_two_files_for_one_split_is_refused(coco_root: Path) -> None:
    coco_file(coco_root / "annotations" / "captions_train2014.json", [(9, "x.jpg")], [(9, "x")])
    with pytest.raises(DatasetError, match=r"several COCO caption files for split 'train': captions_train2014\.json"):
        load_records(coco_root)


def test_coco_without_the_split_folder_resolves_beside_the_json(tmp_path: Path) -> None:
    path = coco_file(tmp_path / "ann" / "captions_val2017.json", [(1, "a.png")], [(1, "x")])
    assert load_records(path)[0].image == str(tmp_path / "ann" / "a.png")


def test_karpathy_file_outside_the_image_root(tmp_path: Path, write_image) -> None:
    images = tmp_path / "images"
    write_image(images / "train2014" / "COCO_train2014_1.png", RED)
    write_image(images / "val2014" / "COCO_val2014_2.png", GREEN)
    karpathy = tmp_path / "splits" / "dataset_coco.json"
    karpathy.parent.mkdir()
    karpathy.write_text(json.dumps({"images": [
        {"filepath": "train2014", "filename": "COCO_train2014_1.png", "cocoid": 1, "split": "restval",
         "sentences": [{"raw": "a red thing"}, {"raw": "red"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_2.png", "cocoid": 2, "split": "val",
         "sentences": [{"raw": "a green thing"}]},
    ]}))
    records = load_records(karpathy, image_root=images)
    assert records == [
        Record("1", str(images / "train2014" / "COCO_train2014_1.png"), ("a red thing", "red"), "train"),
        Record("2", str(images / "val2014" / "COCO_val2014_2.png"), ("a green thing",), "val"),
    ]
    assert_pixels(records[0].image, RED)
    assert_pixels(records[1].image, GREEN)
    assert load_records(karpathy)[0].image == str(karpathy.parent / "train2014" / "COCO_train2014_1.png")


def test_tab_separated_csv_needs_sep(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "img" / "a.png", RED)
    write_image(tmp_path / "img" / "b.png", BLUE)
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as file:
        csv.writer(file, delimiter="\t").writerows(
            [["filepath", "title"], ["img/a.png", "a red, square image"], ["img/b.png", "blue"], ["img/a.png", "red"]])
    records = load_records(path, sep="\t")
    assert records == [
        Record("img/a", str(tmp_path / "img" / "a.png"), ("a red, square image", "red")),
        Record("img/b", str(tmp_path / "img" / "b.png"), ("blue",)),
    ]
    assert_pixels(records[1].image, BLUE)
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['filepath', 'title'\].*right separator"):
        load_records(path)


def test_image_folder_with_split_subfolders(tmp_path: Path, write_image) -> None:
    data = tmp_path / "DATA"
    write_image(data / "train" / "a.png", RED)
    write_image(data / "train" / "b.png", GREEN)
    write_image(data / "validation" / "a.png", BLUE)
    write_image(data / "test" / "c.png", GREY)
    (data / "train" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "red"}) + "\n" + json.dumps({"file_name": "b.png", "text": "green"}))
    (data / "validation" / "metadata.csv").write_text("file_name,text\na.png,blue\n")
    (data / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "caption": ["grey", "gray"]}))
    records = load_records(data)
    assert records == [
        Record("test/c", str(data / "test" / "c.png"), ("grey", "gray"), "test"),
        Record("train/a", str(data / "train" / "a.png"), ("red",), "train"),
        Record("train/b", str(data / "train" / "b.png"), ("green",), "train"),
        Record("validation/a", str(data / "validation" / "a.png"), ("blue",), "val"),
    ]
    assert [record.id for record in select_split(records, "val")] == ["validation/a"]
    for record, color in zip(records, (GREY, RED, GREEN, BLUE)):
        assert_pixels(record.image, color)
    assert load_records(data, format="imagefolder") == records


def test_every_registered_format_is_named_and_checks_its_options(tmp_path: Path) -> None:
    assert FORMATS == ("csv", "jsonl", "coco", "karpathy", "webdataset", "imagefolder", "hf", "parquet")
    for format in REGISTRY:
        with pytest.raises(DatasetError, match=rf"the {format.name} reader takes no option \['colour'\]"):
            load_records(tmp_path, format=format.name, colour="red")


def test_data_check_of_a_coco_annotation_file_takes_the_layout_root(coco_root: Path, tmp_path: Path) -> None:
    from cliptrace.data.check import check_dataset

    report = check_dataset(coco_root / "annotations" / "captions_train2017.json")
    assert report.problems == [] and report.warnings == []  # train2017/ is inside the dataset root
    elsewhere = tmp_path / "elsewhere" / "annotations"
    coco_file(elsewhere / "captions_train2017.json", [(9, "../../coco/train2017/000000000009.jpg")], [(9, "a plate")])
    warned = check_dataset(elsewhere / "captions_train2017.json").warnings
    assert [warning.problem for warning in warned] == [
        f"image {coco_root / 'train2017' / '000000000009.jpg'} is outside the dataset root {elsewhere.parent}"]
