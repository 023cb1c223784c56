"""Train and evaluate through the CLI on a dataset kept in each layout users keep one in: COCO's official layout, a
Karpathy file outside the image root, open_clip's tab-separated .csv, a HuggingFace ``save_to_disk`` folder, parquet
with image bytes and with image paths, and an image folder with split subfolders.

Each case writes the same tiny world of single-colour images (a train and a val split) in its layout, trains a tiny
model on it with ``cliptrace train`` and evaluates it with ``cliptrace eval --split val``; the metrics must equal
:func:`cliptrace.evaluate.evaluate` of the saved model over the val records, read apart.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import load_records, select_split
from cliptrace.evaluate import evaluate
from cliptrace.models import load_model

N_TRAIN, N_VAL = 24, 8
SIZE = (32, 32)
BATCH = 8
FAST = ["--preset", "tiny", "--image-size", "32", "--vocab-size", "300", "--epochs", "1", "--batch-size", str(BATCH),
        "--warmup", "1", "--no-progress"]
HUES = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
        "purple": (140, 30, 160), "orange": (240, 140, 20), "cyan": (20, 210, 220), "grey": (128, 128, 128)}
SHADES = {"dark": 0.45, "deep": 0.7, "plain": 1.0, "pale": 1.3}


@dataclass(frozen=True)
class Sample:
    """One image of the tiny world: a numeric id (COCO and Karpathy ids are integers), its colour and captions."""

    id: str
    color: tuple[int, int, int]
    captions: tuple[str, ...]
    split: str  # "train" or "val"

    def png(self) -> bytes:
        """The image encoded as PNG."""
        buffer = io.BytesIO()
        self.picture().save(buffer, format="PNG")
        return buffer.getvalue()

    def picture(self) -> Image.Image:
        """The image: SIZE pixels of its colour."""
        return Image.new("RGB", SIZE, self.color)

    def save(self, path: Path) -> Path:
        """Write the image to ``path`` (format from its suffix), creating its folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.picture().save(path)
        return path


def _world() -> list[Sample]:
    """N_TRAIN + N_VAL distinct single colours, each named twice ("a pale red square", "pale red")."""
    samples = []
    for index, (shade, hue) in enumerate((shade, hue) for shade in SHADES for hue in HUES):
        color = tuple(min(255, round(value * SHADES[shade])) for value in HUES[hue])
        split = "val" if index % 4 == 3 else "train"
        samples.append(Sample(str(100 + index), color, (f"a {shade} {hue} square", f"{shade} {hue}"), split))
    assert sum(sample.split == "val" for sample in samples) == N_VAL and len(samples) == N_TRAIN + N_VAL
    return samples


WORLD = _world()


@dataclass(frozen=True)
class Layout:
    """A dataset written in one layout: the path the commands are given, their data options, and the ids its
    reader gives the train and the val records."""

    data: Path
    options: tuple[str, ...]
    reader_options: dict[str, str]
    train_ids: list[str]
    val_ids: list[str]


def _ids(split: str, name: Callable[[Sample], str] = lambda sample: sample.id) -> list[str]:
    """The ids (``name`` of each sample) of one split's samples, in order."""
    return [name(sample) for sample in WORLD if sample.split == split]


def coco_official(root: Path) -> Layout:
    """annotations/captions_{train,val}2017.json beside train2017/ and val2017/ (JPEG files), the root given."""
    for split in ("train", "val"):
        samples = [sample for sample in WORLD if sample.split == split]
        for sample in samples:
            sample.save(root / f"{split}2017" / f"{int(sample.id):012d}.jpg")
        annotations = [(sample.id, text) for sample in samples for text in sample.captions]
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps({
            "images": [{"id": int(sample.id), "file_name": f"{int(sample.id):012d}.jpg"} for sample in samples],
            "annotations": [{"id": index, "image_id": int(image_id), "caption": text}
                            for index, (image_id, text) in enumerate(annotations)],
        }))
    return Layout(root, (), {}, _ids("train"), _ids("val"))


def karpathy_outside_root(root: Path) -> Layout:
    """splits/dataset_coco.json naming images under images/{train,val}2014/, given with --image-root."""
    images = root / "images"
    entries = []
    for number, sample in enumerate(WORLD):
        folder = f"{sample.split}2014"
        name = f"COCO_{folder}_{int(sample.id):012d}.png"
        sample.save(images / folder / name)
        split = sample.split if sample.split == "val" or number % 3 else "restval"  # restval is training data too
        entries.append({"filepath": folder, "filename": name, "cocoid": int(sample.id), "split": split,
                        "sentences": [{"raw": text} for text in sample.captions]})
    karpathy = root / "splits" / "dataset_coco.json"
    karpathy.parent.mkdir(parents=True)
    karpathy.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return Layout(karpathy, ("--image-root", str(images)), {"image_root": str(images)}, _ids("train"), _ids("val"))


def tab_csv(root: Path) -> Layout:
    """An open_clip-style tab-separated data.csv, one row per caption, with split and id columns; --sep tab."""
    path = root / "data.csv"
    root.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title", "split", "id"])
        for sample in WORLD:
            sample.save(root / "images" / f"{sample.id}.png")
            writer.writerows([f"images/{sample.id}.png", text, sample.split, sample.id] for text in sample.captions)
    return Layout(path, ("--sep", "tab"), {"sep": "\t"}, _ids("train"), _ids("val"))


def hf_save_to_disk(root: Path) -> Layout:
    """A ``datasets.DatasetDict`` (train, validation) with an Image feature, saved with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  "id": datasets.Value("string")})
    splits = datasets.DatasetDict({
        key: datasets.Dataset.from_dict({
            "image": [sample.picture() for sample in WORLD if sample.split == split],
            "captions": [list(sample.captions) for sample in WORLD if sample.split == split],
            "id": _ids(split),
        }, features=features)
        for key, split in (("train", "train"), ("validation", "val"))
    })
    splits.save_to_disk(str(root / "dd"))
    return Layout(root / "dd", (), {}, _ids("train"), _ids("val"))


def parquet_bytes(root: Path) -> Layout:
    """A Hub-style repository: data/{train,validation}-00000-of-00001.parquet with {bytes, path} image structs."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (root / "data").mkdir(parents=True)
    for stem, split in (("train", "train"), ("validation", "val")):
        samples = [sample for sample in WORLD if sample.split == split]
        table = pa.table({
            "image": pa.array([{"bytes": sample.png(), "path": f"{sample.id}.png"} for sample in samples]),
            "text": [sample.captions[0] for sample in samples],
            "id": [sample.id for sample in samples],
        })
        pq.write_table(table, root / "data" / f"{stem}-00000-of-00001.parquet", row_group_size=5)
    return Layout(root, (), {}, _ids("train"), _ids("val"))


def parquet_paths(root: Path) -> Layout:
    """meta/rows.parquet whose 'file' column holds paths relative to pics/; split and id columns; --image-key file
    and --image-root pics."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    for sample in WORLD:
        sample.save(root / "pics" / sample.split / f"{sample.id}.png")
    table = pa.table({
        "file": [f"{sample.split}/{sample.id}.png" for sample in WORLD],
        "sentences": [list(sample.captions) for sample in WORLD],
        "split": [sample.split for sample in WORLD],
        "id": [sample.id for sample in WORLD],
    })
    path = root / "meta" / "rows.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    pics = str(root / "pics")
    return Layout(path, ("--image-key", "file", "--image-root", pics), {"image_key": "file", "image_root": pics},
                  _ids("train"), _ids("val"))


def imagefolder_splits(root: Path) -> Layout:
    """DATA/train/ with metadata.jsonl and DATA/validation/ with metadata.csv, images beside them."""
    data = root / "DATA"
    for sample in WORLD:
        sample.save(data / ("train" if sample.split == "train" else "validation") / f"img{sample.id}.png")
    (data / "train" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"img{sample.id}.png", "caption": list(sample.captions)}) + "\n"
        for sample in WORLD if sample.split == "train"))
    with (data / "validation" / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([f"img{sample.id}.png", sample.captions[0]] for sample in WORLD if sample.split == "val")
    return Layout(data, (), {}, _ids("train", lambda sample: f"train/img{sample.id}"),
                  _ids("val", lambda sample: f"validation/img{sample.id}"))


LAYOUTS = [coco_official, karpathy_outside_root, tab_csv, hf_save_to_disk, parquet_bytes, parquet_paths,
           imagefolder_splits]


def _invoke(*args: object) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``cliptrace ARGS``."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("write", LAYOUTS, ids=[write.__name__ for write in LAYOUTS])
def test_train_and_eval_through_the_cli(write: Callable[[Path], Layout], tmp_path: Path) -> None:
    layout = write(tmp_path / "dataset")
    records = load_records(layout.data, **layout.reader_options)
    assert [record.id for record in select_split(records, "train")] == layout.train_ids
    val = select_split(records, "val")
    assert [record.id for record in val] == layout.val_ids and len(val) == N_VAL
    loader = ImageLoader()
    for record, sample in zip(val, (sample for sample in WORLD if sample.split == "val")):
        pixels = np.asarray(loader.load(record.image)).astype(int)
        assert pixels.shape == (*SIZE, 3) and np.abs(pixels - np.array(sample.color)).max() <= 4  # JPEG in COCO

    run = tmp_path / "run"
    code, out, err = _invoke("train", layout.data, "--out", run, *layout.options, *FAST)
    assert code == 0, out + err
    assert (run / "model" / "model.safetensors").is_file()
    with (run / "train.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == N_TRAIN // BATCH  # one epoch over the train split only
    model = load_model(run / "model")
    expected = evaluate(model, val, ImageLoader())
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(expected)  # the val split after training

    code, out, err = _invoke("eval", run, layout.data, "--split", "val", *layout.options, "--no-progress",
                             "--out", tmp_path / "eval.json")
    assert code == 0, out + err
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["n_images"] == N_VAL
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected)
