"""Streamed WebDataset shards: the split over processes × workers, its check, and streamed training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.data.stream import ShardIndex, ShardRecords, ShardStream, check_shard_split
from cliptrace.data.transforms import ImageTransform
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world of 48 images in 4 shards of 12 (train, val and test samples mixed in every shard)."""
    return generate_shapes_world(tmp_path_factory.mktemp("stream"), n_images=48, seed=2, format="wds", shard_size=12)


def _samples(stream: ShardStream, workers: int) -> list[int]:
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, drop_last=True,
                        collate_fn=lambda batch: [sample for _, _, sample in batch])
    return [sample for batch in loader for sample in batch]


def test_the_index_counts_the_training_samples_of_every_shard(shards: Path) -> None:
    index = ShardIndex.scan(shards, "train")
    records = load_records(shards)
    assert len(index.shards) == 4
    assert index.samples == len(select_split(records, "train"))
    assert sorted(record.id for record in index.held_out) == sorted(r.id for r in records if r.split != "train")
    assert index.captions("train", limit=5) == [c for r in select_split(records, "train") for c in r.captions][:5]


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2), (1, 4)])
def test_every_rank_takes_the_same_steps_and_an_epoch_serves_each_sample_at_most_once(
        shards: Path, world: int, workers: int) -> None:
    index = ShardIndex.scan(shards, "train")
    per_rank = []
    for rank in range(world):
        stream = ShardStream(index, ImageTransform(16), train_split="train", rank=rank, world=world, batch_size=2,
                             seed=3)
        stream.set_epoch(1)
        per_rank.append(_samples(stream, workers))
    steps = index.samples // (2 * world)
    assert [len(samples) for samples in per_rank] == [steps * 2] * world
    served = Counter(sample for samples in per_rank for sample in samples)
    assert set(served) <= set(range(index.samples))
    # A reader goes round its shards again only when they hold fewer samples than its share of the epoch. With
    # shards of 10, 12, 8 and 8 training samples, one or two readers never need to; four readers (one shard each)
    # have quotas of 10, 10, 10 and 8 samples (two processes × two workers: 5 and 4 batches of 2 per process), so
    # a shard of 8 may be read twice over in part.
    assert index.counts == [10, 12, 8, 8]
    assert max(served.values()) == (1 if world * max(workers, 1) <= 2 else 2)


def test_the_shard_order_changes_with_the_epoch_and_repeats_with_the_seed(shards: Path) -> None:
    index = ShardIndex.scan(shards, "train")

    def epoch(number: int, seed: int) -> list[int]:
        stream = ShardStream(index, ImageTransform(16), train_split="train", rank=0, world=1, batch_size=2, seed=seed)
        stream.set_epoch(number)
        return _samples(stream, 0)

    assert epoch(0, 3) == epoch(0, 3)
    assert epoch(0, 3) != epoch(1, 3)
    assert sorted(epoch(0, 3)) == sorted(epoch(1, 3)) == list(range(index.samples // 2 * 2))


def test_fewer_shards_than_readers_is_refused_up_front() -> None:
    check_shard_split(4, 2, 2)
    check_shard_split(4, 4, 0)
    with pytest.raises(ValueError, match=r"2 shard\(s\) cannot feed 2 process\(es\) × 2 DataLoader worker\(s\) = 4 "
                                         r"readers"):
        check_shard_split(2, 2, 2)


def test_streamed_training_is_deterministic_and_refuses_a_split_it_cannot_feed(shards: Path, tmp_path: Path) -> None:
    def config(out: str, **overrides) -> TrainConfig:
        settings = {"data": str(shards), "out": str(tmp_path / out), "preset": "tiny", "image_size": 32,
                    "vocab_size": 300, "epochs": 2, "batch_size": 8, "warmup_steps": 1, "seed": 5, "stream": True,
                    "eval_split": "val", "progress": False, **overrides}
        return TrainConfig(**settings)

    first, second = train(config("a")), train(config("b"))
    assert first.metrics["n_images"] == len(select_split(load_records(shards), "val"))  # held-out split evaluated
    left, right = load_model(first.model_dir).state_dict(), load_model(second.model_dir).state_dict()
    assert all(torch.equal(left[name], value) for name, value in right.items())
    with pytest.raises(ValueError, match=r"4 shard\(s\) cannot feed 1 process\(es\) × 5 DataLoader worker\(s\)"):
        train(config("c", num_workers=5))
    with pytest.raises(ValueError, match="stream reads shards as they come"):
        config("d", on_bad_sample="skip")


def test_two_processes_with_two_workers_each_stream_four_shards(shards: Path, tmp_path: Path) -> None:
    command = [str(Path(sys.executable).with_name("cliptrace")), "train", str(shards), "--out", str(tmp_path / "run"),
               "--stream", "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--num-workers", "2",
               "--image-size", "32", "--vocab-size", "300", "--epochs", "2", "--batch-size", "8", "--eval-split", "",
               "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    steps = ShardIndex.scan(shards, "train").samples // 8
    logged = (tmp_path / "run" / "train.csv").read_text().splitlines()
    assert len(logged) == 1 + 2 * steps


def test_streamed_records_are_the_records_read_one_shard_at_a_time(shards: Path) -> None:
    records = ShardRecords(ShardIndex.scan(shards, "train"), "train")
    expected = select_split(load_records(shards), "train")
    assert len(records) == len(expected) and list(records) == expected
    assert [records[i] for i in (17, 3, -1)] == [expected[17], expected[3], expected[-1]]
    assert records._held[0] == 3 and len(records._held[1]) == 8  # only the shard read last is held
    with pytest.raises(IndexError):
        records[len(expected)]


def test_streamed_featurization_writes_the_store_of_the_record_list(shards: Path, tmp_path: Path) -> None:
    train(TrainConfig(data=str(shards), out=str(tmp_path / "run"), preset="tiny", image_size=32, vocab_size=300,
                      epochs=1, batch_size=8, warmup_steps=1, eval_split=None, progress=False))
    options = ["--proj-dim", "16", "--lambda-reg", "1", "--bank-size", "8", "--batch-size", "5", "--no-progress"]
    cliptrace = str(Path(sys.executable).with_name("cliptrace"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("list", []), ("stream", ["--stream"]), ("stream2", ["--stream", "--devices", "2"])):
        result = subprocess.run([cliptrace, "trak", "featurize", str(tmp_path / "run"), str(shards), "--store",
                                 str(tmp_path / name), *options, *extra], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    folder = Path("checkpoints") / "epoch-0001"
    for name in ("stream", "stream2"):
        assert (tmp_path / name / "manifest.json").read_text() == (tmp_path / "list" / "manifest.json").read_text()
        for array in ("features.npy", "loss_weights.npy", "kernel.npy"):
            assert (tmp_path / name / folder / array).read_bytes() == (tmp_path / "list" / folder / array).read_bytes()
