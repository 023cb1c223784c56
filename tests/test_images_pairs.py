"""ImageLoader (files and tar members read by offset) and the PairDataset with its collate function."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cliptrace.data.images import ImageLoader
from cliptrace.data.pairs import PairDataset, make_collate
from cliptrace.data.record import DatasetError, Record
from cliptrace.data.transforms import ImageTransform

COLORS = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (250, 250, 0)]


@pytest.fixture
def shard(tmp_path: Path, write_tar, image_bytes) -> tuple[Path, dict[str, bytes]]:
    members = {
        "big.bin": bytes(range(256)) * 40,  # an odd-sized member in front, so offsets are not trivial
        "a.png": image_bytes(COLORS[0], (5, 7)),
        "sub/b.jpg": image_bytes(COLORS[1], (9, 4), "JPEG"),
        "c.txt": "not an image ✓".encode(),
    }
    return write_tar(tmp_path / "shard.tar", members), members


def test_tar_members_read_back_the_bytes_written(shard) -> None:
    path, members = shard
    loader = ImageLoader()
    for name, data in members.items():
        assert loader.read_bytes(f"{path}::{name}") == data


def test_tar_images_decode_like_pil_does(shard) -> None:
    path, members = shard
    loader = ImageLoader()
    for name in ("a.png", "sub/b.jpg"):
        image = loader.load(f"{path}::{name}")
        expected = Image.open(io.BytesIO(members[name])).convert("RGB")
        assert image.mode == "RGB" and image.size == expected.size
        assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_each_shard_is_indexed_once(shard, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = shard
    opened: list[str] = []
    real_open = tarfile.open

    def counting_open(name, *args, **kwargs):
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(tarfile, "open", counting_open)
    loader = ImageLoader()
    for _ in range(3):
        loader.load(f"{path}::a.png")
        loader.load(f"{path}::sub/b.jpg")
    assert opened == [str(path)]
    assert ImageLoader().read_bytes(f"{path}::a.png") and opened == [str(path)] * 2  # the index is per instance


def test_plain_files(tmp_path: Path, write_image) -> None:
    data = write_image(tmp_path / "x.png", COLORS[2], (3, 2))
    loader = ImageLoader()
    assert loader.read_bytes(str(tmp_path / "x.png")) == data
    assert np.array_equal(np.asarray(loader.load(str(tmp_path / "x.png"))), np.full((2, 3, 3), COLORS[2], np.uint8))


def test_errors_name_the_reference(tmp_path: Path, shard) -> None:
    path, _ = shard
    loader = ImageLoader()
    missing = str(tmp_path / "missing.png")
    with pytest.raises(DatasetError, match=rf"^{missing}: image file not found"):
        loader.load(missing)
    with pytest.raises(DatasetError, match=rf"^{path}::nope.png: no member 'nope.png' in the shard"):
        loader.load(f"{path}::nope.png")
    with pytest.raises(DatasetError, match=rf"^{path}::c.txt: cannot decode the image"):
        loader.load(f"{path}::c.txt")
    with pytest.raises(DatasetError, match=r"other\.tar: shard not found"):
        loader.load(f"{tmp_path}/other.tar::a.png")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really")
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for broken in (garbage, truncated):
        with pytest.raises(DatasetError, match=rf"^{broken}: cannot decode the image"):
            loader.load(str(broken))


# ------------------------------------------------------------------------------------------------------- pairs


@pytest.fixture
def records(tmp_path: Path, write_image) -> list[Record]:
    result = []
    for index in range(12):
        write_image(tmp_path / f"{index}.png", COLORS[index % 4], (6 + index, 5))
        captions = tuple(f"caption {index}.{k}" for k in range(1 + index % 4))
        result.append(Record(str(index), str(tmp_path / f"{index}.png"), captions))
    return result


def test_items_are_transformed_images_captions_and_indices(records: list[Record]) -> None:
    transform = ImageTransform(size=4)
    dataset = PairDataset(records, transform, caption_choice="first")
    assert len(dataset) == len(records)
    for index, record in enumerate(records):
        pixels, caption, item_index = dataset[index]
        assert item_index == index and caption == record.captions[0]
        assert torch.equal(pixels, transform(Image.open(record.image)))
    with pytest.raises(IndexError):
        dataset[len(records)]


def captions_of_epoch(dataset: PairDataset, epoch: int, order: list[int]) -> dict[int, str]:
    dataset.set_epoch(epoch)
    return {index: dataset[index][1] for index in order}


def test_random_caption_choice_is_seeded_and_changes_per_epoch(records: list[Record]) -> None:
    forward = list(range(len(records)))
    transform = ImageTransform(size=4)
    first = PairDataset(records, transform, seed=3)
    second = PairDataset(records, transform, seed=3)
    for epoch in range(3):
        assert captions_of_epoch(first, epoch, forward) == captions_of_epoch(second, epoch, forward[::-1])
    epochs = [captions_of_epoch(first, epoch, forward) for epoch in range(40)]
    other_seed = [captions_of_epoch(PairDataset(records, transform, seed=4), epoch, forward) for epoch in range(40)]
    assert epochs != other_seed
    assert len({tuple(sorted(choice.items())) for choice in epochs}) > 30
    for index, record in enumerate(records):
        chosen = Counter(choice[index] for choice in epochs)
        assert set(chosen) == set(record.captions)  # every caption is served, and only those
        assert min(chosen.values()) >= 40 / len(record.captions) / 4


def test_cache_keeps_preprocessed_images(records: list[Record]) -> None:
    transform = ImageTransform(size=4)
    cached = PairDataset(records, transform, caption_choice="first", cache_images=True)
    plain = PairDataset(records, transform, caption_choice="first")
    before = cached[0][0].clone()
    Path(records[0].image).unlink()
    assert torch.equal(cached[0][0], before)
    with pytest.raises(DatasetError, match="image file not found"):
        plain[0]


def test_invalid_options(records: list[Record]) -> None:
    with pytest.raises(ValueError, match="caption_choice"):
        PairDataset(records, ImageTransform(size=4), caption_choice="longest")
    with pytest.raises(ValueError, match="non-negative"):
        PairDataset(records, ImageTransform(size=4), seed=-1)


def char_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in tokenizer: code points, padded to the longest text."""
    length = max(len(text) for text in texts)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, : len(text)] = torch.tensor([ord(char) for char in text])
        mask[row, : len(text)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_collate_through_a_dataloader(records: list[Record]) -> None:
    transform = ImageTransform(size=6)
    dataset = PairDataset(records, transform, seed=1)
    dataset.set_epoch(2)
    loader = DataLoader(dataset, batch_size=5, shuffle=False, collate_fn=make_collate(char_tokenize))
    batches = list(loader)
    assert [len(batch["index"]) for batch in batches] == [5, 5, 2]
    for start, batch in zip((0, 5, 10), batches):
        indices = list(range(start, min(start + 5, len(records))))
        assert batch["pixel_values"].shape == (len(indices), 3, 6, 6)
        assert batch["index"].dtype == torch.long and batch["index"].tolist() == indices
        captions = [dataset[index][1] for index in indices]
        expected = char_tokenize(captions)
        assert torch.equal(batch["input_ids"], expected["input_ids"])
        assert torch.equal(batch["attention_mask"], expected["attention_mask"])
        for row, index in enumerate(indices):
            assert torch.equal(batch["pixel_values"][row], transform(Image.open(records[index].image)))
