"""HuggingFace ``save_to_disk`` folders and parquet files: records and decoded pixels match what was written, images
are referenced as table rows and read lazily."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.record import DatasetError, Record

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLORS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90), (250, 250, 0)]


def picture(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 6), color)


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    picture(color).save(buffer, format="PNG")
    return buffer.getvalue()


def color_of(loader: ImageLoader, ref: str) -> tuple[int, int, int]:
    """The single colour of the 8x6 image ``ref`` names."""
    pixels = np.asarray(loader.load(ref))
    assert pixels.shape == (6, 8, 3) and (pixels == pixels[0, 0]).all()
    return tuple(int(value) for value in pixels[0, 0])


def test_save_to_disk_dataset_with_image_bytes(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"image": [picture(color) for color in COLORS[:3]], "text": ["red", "green", "blue"]}, features=features)
    dataset.save_to_disk(str(tmp_path / "ds"))
    records = load_records(tmp_path / "ds")
    arrow = str((tmp_path / "ds" / "data-00000-of-00001.arrow").absolute())
    assert records == [Record(str(row), f"{arrow}::image[{row}]", (text,))
                       for row, text in enumerate(["red", "green", "blue"])]
    loader = ImageLoader()
    assert [color_of(loader, record.image) for record in records] == COLORS[:3]
    copy = pickle.loads(pickle.dumps(loader))
    assert color_of(copy, records[2].image) == COLORS[2]


def test_save_to_disk_dataset_dict_with_caption_lists_and_image_paths(tmp_path: Path) -> None:
    paths = []
    for index, color in enumerate(COLORS[:3]):
        paths.append(str(tmp_path / "files" / f"{index}.png"))
        Path(paths[-1]).parent.mkdir(exist_ok=True)
        picture(color).save(paths[-1])
    features = datasets.Features({
        "img": datasets.Image(), "file": datasets.Value("string"),
        "captions": datasets.Sequence(datasets.Value("string")),
    })
    rows = {"train": ([0, 1], [["red", "a red one"], ["green"]]), "validation": ([2], [["blue"]])}
    splits = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"img": [paths[i] for i in indices], "file": [paths[i] for i in indices], "captions": captions},
            features=features)
        for split, (indices, captions) in rows.items()
    })
    splits.save_to_disk(str(tmp_path / "dd"))
    records = load_records(tmp_path / "dd")
    train, val = (str((tmp_path / "dd" / split / "data-00000-of-00001.arrow").absolute()) for split in rows)
    assert records == [
        Record("train/0", f"{train}::img[0]", ("red", "a red one"), "train"),
        Record("train/1", f"{train}::img[1]", ("green",), "train"),
        Record("validation/0", f"{val}::img[0]", ("blue",), "val"),
    ]
    assert [record.id for record in select_split(records, "val")] == ["validation/0"]
    loader = ImageLoader()
    assert [color_of(loader, record.image) for record in records] == COLORS[:3]
    by_path = load_records(tmp_path / "dd", image_key="file")
    assert [record.image for record in by_path] == paths
    assert [color_of(loader, record.image) for record in by_path] == COLORS[:3]


def test_parquet_with_image_structs_across_row_groups(tmp_path: Path) -> None:
    table = pa.table({
        "image": pa.array([{"bytes": png(color), "path": f"{index}.png"} for index, color in enumerate(COLORS)]),
        "caption": [f"caption {index}" for index in range(5)],
        "label": ["a", "b", "a", "b", "a"],
    })
    path = tmp_path / "train.parquet"
    pq.write_table(table, path, row_group_size=2)
    records = load_records(path)
    assert records == [Record(str(row), f"{path}::image[{row}]", (f"caption {row}",), "train", "ab"[row % 2])
                       for row in range(5)]
    loader = ImageLoader()
    assert [color_of(loader, record.image) for record in reversed(records)] == COLORS[::-1]


def test_parquet_binary_column_and_split_files_in_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"jpg": [png(COLORS[0]), png(COLORS[1])], "text": ["red", "green"]}),
                   folder / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"jpg": [png(COLORS[2])], "text": ["blue"]}), folder / "validation-00000-of-00001.parquet")
    records = load_records(tmp_path)
    train, val = folder / "train-00000-of-00001.parquet", folder / "validation-00000-of-00001.parquet"
    assert records == [
        Record("train/0", f"{train}::jpg[0]", ("red",), "train"),
        Record("train/1", f"{train}::jpg[1]", ("green",), "train"),
        Record("val/0", f"{val}::jpg[0]", ("blue",), "val"),
    ]
    assert [color_of(ImageLoader(), record.image) for record in records] == COLORS[:3]
    assert load_records(folder / "*.parquet") == records


def test_parquet_with_image_paths(tmp_path: Path) -> None:
    for index, color in enumerate(COLORS[:2]):
        (tmp_path / "pics").mkdir(exist_ok=True)
        picture(color).save(tmp_path / "pics" / f"{index}.png")
    table = pa.table({"file": ["0.png", "1.png"], "sentences": [["red"], ["green", "a green one"]], "id": ["r", "g"]})
    path = tmp_path / "meta" / "rows.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    records = load_records(path, image_key="file", image_root=tmp_path / "pics")
    assert records == [
        Record("r", str(tmp_path / "pics" / "0.png"), ("red",)),
        Record("g", str(tmp_path / "pics" / "1.png"), ("green", "a green one")),
    ]
    assert [color_of(ImageLoader(), record.image) for record in records] == COLORS[:2]
    assert load_records(path, image_key="file")[0].image == str(tmp_path / "meta" / "0.png")


def test_missing_columns_and_broken_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [png(COLORS[0]), None], "label": ["a", "b"]}), path)
    with pytest.raises(DatasetError, match=r"x\.parquet: no caption column \(none of .*\); the columns are "
                                           r"\['image', 'label'\]; choose one with caption_key"):
        load_records(path)
    with pytest.raises(DatasetError, match=r"no column \['title'\]; the columns are"):
        load_records(path, caption_key="title")
    errors: list[DatasetError] = []
    records = load_records(path, caption_key="label", on_error=errors.append)
    assert [record.id for record in records] == ["0"]
    assert [str(error) for error in errors] == [
        f"{path}, row 1: no image in 'image' (neither bytes nor a path)"]
    with pytest.raises(DatasetError, match=r"the parquet reader takes no option \['sep'\]"):
        load_records(path, sep="\t")


def test_a_table_row_without_bytes_or_a_missing_row_is_a_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [png(COLORS[0])], "text": ["red"]}), path)
    loader = ImageLoader()
    with pytest.raises(DatasetError, match=r"x\.parquet, row 3: no such row: the table has 1"):
        loader.load(f"{path}::image[3]")
    with pytest.raises(DatasetError, match=r"no column 'img'"):
        loader.load(f"{path}::img[0]")


def test_missing_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"image": [png(COLORS[0])], "text": ["red"]}), path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DatasetError, match=r"x\.parquet: reading it needs pyarrow: pip install 'cliptrace\[hf\]'"):
        load_records(path)
