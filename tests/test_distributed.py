"""Data-parallel jobs on 2 CPU processes (gloo) against one process: training gradients, sharded featurization and
scoring, and separate jobs featurizing checkpoints of one run into one store."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric

from cliptrace.data.images import ImageLoader
from cliptrace.data.pairs import PairDataset, make_collate
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import HFCLIP, load_model, train_tokenizer
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.train.loop import backward_step

TRAK = ["--proj-dim", "16", "--lambda-reg", "1", "--bank-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("distributed")
    world = generate_shapes_world(root / "world", n_images=40, seed=4, format="csv")
    train(TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300, epochs=2,
                      batch_size=8, warmup_steps=1, save_every=1, eval_split=None, progress=False))
    return world, root / "run"


def _cliptrace(*args: object, wait: bool = True) -> subprocess.Popen | None:
    """Run the CLI in a new process (single-threaded, so both sides of a comparison do the same arithmetic)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(Path(sys.executable).with_name("cliptrace")), *map(str, args)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return None


def _relative(left: np.ndarray, right: np.ndarray) -> float:
    left, right = np.asarray(left, dtype=np.float64), np.asarray(right, dtype=np.float64)
    return float(np.max(np.abs(left - right)) / np.max(np.abs(right)))


# --- training -------------------------------------------------------------------------------------------------


def _global_batch(world: Path, model: HFCLIP) -> dict[str, torch.Tensor]:
    records = select_split(load_records(world), "train")[:8]
    dataset = PairDataset(records, model.preprocess, loader=ImageLoader(), caption_choice="first")
    batch = make_collate(model.tokenize)([dataset[i] for i in range(len(records))])
    return {"pixel_values": batch["pixel_values"].double(), "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"]}


def _gradients(fabric: Fabric, model_dir: str, batch: dict[str, torch.Tensor], out: str) -> None:
    """This process's share of the global batch through the training step; rank 0 saves the (DDP-averaged)
    gradients to ``out``."""
    model = load_model(model_dir).double()
    share = batch["pixel_values"].shape[0] // fabric.world_size
    rows = slice(fabric.global_rank * share, (fabric.global_rank + 1) * share)
    backward_step(fabric, fabric.setup_module(model), {key: value[rows] for key, value in batch.items()})
    if fabric.global_rank == 0:
        torch.save({name: parameter.grad for name, parameter in model.named_parameters()}, out)


def test_two_process_training_step_gives_the_gradients_of_one_process_on_the_global_batch(
        run: tuple[Path, Path], tmp_path: Path) -> None:
    world, _ = run
    tokenizer = train_tokenizer([c for r in load_records(world) for c in r.captions], vocab_size=300,
                                context_length=32)
    HFCLIP.from_preset("tiny", tokenizer, image_size=32).save(tmp_path / "model")
    batch = _global_batch(world, load_model(tmp_path / "model"))
    _gradients(Fabric(accelerator="cpu", devices=1), str(tmp_path / "model"), batch, str(tmp_path / "one.pt"))
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(_gradients, str(tmp_path / "model"), batch, str(tmp_path / "two.pt"))
    single, distributed = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert single.keys() == distributed.keys()
    assert all(gradient.abs().max() > 0 for gradient in single.values())
    for name, gradient in single.items():
        torch.testing.assert_close(distributed[name], gradient, rtol=1e-9, atol=1e-12, msg=name)


# --- featurization and scoring -----------------------------------------------------------------------------


def test_two_process_featurization_and_scoring_equal_one_process(run: tuple[Path, Path], tmp_path: Path) -> None:
    """float64, with a batch size that does not divide the shards, so the batches differ between the two jobs."""
    world, trained = run
    for name, devices in (("one", 1), ("two", 2)):
        _cliptrace("trak", "score", trained, world, "--store", tmp_path / name / "store", "--out", tmp_path / name /
                   "out", "--dtype", "float64", "--devices", devices, "--device", "cpu", "--batch-size", "5", "--top-k", "3",
                   *TRAK)
    for checkpoint in ("epoch-0001", "epoch-0002"):
        for name in ("features.npy", "loss_weights.npy", "featurized.npy", "kernel.npy"):
            one, two = (np.load(tmp_path / job / "store" / "checkpoints" / checkpoint / name)
                        for job in ("one", "two"))
            assert one.shape == two.shape and _relative(two, one) <= 1e-6, (checkpoint, name)
    targets = [folder for folder in (tmp_path / "one" / "store" / "targets").iterdir()]
    assert len(targets) == 1
    for checkpoint in ("epoch-0001", "epoch-0002"):
        one, two = (np.load(tmp_path / job / "store" / "targets" / targets[0].name / "checkpoints" / checkpoint /
                            "features.npy") for job in ("one", "two"))
        assert _relative(two, one) <= 1e-6
    assert _relative(np.load(tmp_path / "two" / "out" / "scores.npy"),
                     np.load(tmp_path / "one" / "out" / "scores.npy")) <= 1e-6
    tables = []
    for job in ("one", "two"):
        with open(tmp_path / job / "out" / "topk.csv", newline="") as handle:
            tables.append([(row["target_id"], row["kind"], row["rank"], row["train_id"])
                           for row in csv.DictReader(handle)])
    assert tables[0] == tables[1] and tables[0]


def test_float32_features_of_a_two_process_job_equal_one_process_bit_for_bit(run: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    """Rows are featurized in fixed batches and shards end on batch boundaries (32 rows, batches of 5: shards of
    15 and 17 rows), so each row is computed in the same batch either way and float32 results are identical."""
    world, trained = run
    assert len(select_split(load_records(world), "train")) == 32
    for name, devices in (("one", 1), ("two", 2)):
        _cliptrace("trak", "featurize", trained, world, "--store", tmp_path / name, "--devices", devices,
                   "--checkpoint", "epoch-0002", "--batch-size", "5", *TRAK)
    for name in ("features.npy", "loss_weights.npy", "kernel.npy"):
        one, two = (np.load(tmp_path / job / "checkpoints" / "epoch-0002" / name) for job in ("one", "two"))
        assert np.array_equal(one, two), name


def test_separate_jobs_featurize_checkpoints_of_one_run_into_one_store(run: tuple[Path, Path], tmp_path: Path) -> None:
    world, trained = run
    store = tmp_path / "shared"
    jobs = [_cliptrace("trak", "featurize", trained, world, "--store", store, "--checkpoint", checkpoint, *TRAK,
                       wait=False) for checkpoint in ("epoch-0001", "epoch-0002")]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-4000:]
    _cliptrace("trak", "featurize", trained, world, "--store", tmp_path / "alone", *TRAK)
    for checkpoint in [path.name for path in list_checkpoints(trained)]:
        folder = store / "checkpoints" / checkpoint
        assert np.load(folder / "featurized.npy").all() and (folder / "kernel.npy").is_file()
        alone = np.load(tmp_path / "alone" / "checkpoints" / checkpoint / "features.npy")
        assert _relative(np.load(folder / "features.npy"), alone) <= 1e-6


# --- data at scale ------------------------------------------------------------------------------------------


def test_two_processes_with_two_workers_each_train_on_a_single_webdataset_shard(tmp_path: Path) -> None:
    """More processes × workers (4) than shards (1): samples are read by offset, so nothing starves or hangs, and
    the run follows the one-process trajectory."""
    world = generate_shapes_world(tmp_path / "world", n_images=40, seed=4, format="wds", shard_size=1000)
    assert [path.name for path in world.glob("*.tar")] == ["shard-000000.tar"]
    options = ["--image-size", "32", "--vocab-size", "300", "--epochs", "2", "--batch-size", "8", "--warmup-steps",
               "1", "--seed", "5", "--eval-split", "", "--no-progress", "--accelerator", "cpu"]
    _cliptrace("train", world, "--out", tmp_path / "two", "--devices", 2, "--strategy", "ddp", "--num-workers", 2,
               *options)
    _cliptrace("train", world, "--out", tmp_path / "one", *options)
    two, one = load_model(tmp_path / "two" / "model").state_dict(), load_model(tmp_path / "one" / "model").state_dict()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_two_process_training_run_resumes_to_the_uninterrupted_run(run: tuple[Path, Path], tmp_path: Path) -> None:
    world, _ = run
    options = ["--image-size", "32", "--vocab-size", "300", "--batch-size", "8", "--warmup-steps", "1", "--seed", "6",
               "--eval-split", "", "--no-progress", "--accelerator", "cpu", "--devices", 2, "--strategy", "ddp"]
    _cliptrace("train", world, "--out", tmp_path / "straight", "--epochs", 2, *options)
    _cliptrace("train", world, "--out", tmp_path / "resumed", "--epochs", 2, *options)
    # a crash during epoch 2: only the epoch-1 checkpoint survives (the log keeps the rows of the lost steps)
    for lost in (tmp_path / "resumed" / "checkpoints" / "epoch-0002", tmp_path / "resumed" / "model"):
        shutil.rmtree(lost)
    _cliptrace("train", world, "--out", tmp_path / "resumed", "--epochs", 2, "--resume", *options)
    straight = load_model(tmp_path / "straight" / "model").state_dict()
    resumed = load_model(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in straight.items())
    assert (tmp_path / "resumed" / "train.csv").read_text() == (tmp_path / "straight" / "train.csv").read_text()


def _traker_shard(fabric: Fabric, save_dir: str) -> None:
    """The traker verbs on 2 processes: each featurizes its shard of the rows; rank 0 finalizes and scores."""
    from cliptrace.trak import TRAKer

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(12, 6, generator=generator), torch.randint(0, 4, (12,), generator=generator)
    traker = TRAKer(model=model, task="image_classification", train_set_size=10, save_dir=save_dir, proj_dim=None,
                    device="cpu", lambda_reg=0.1)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    if fabric.world_size > 1:
        traker.store.claim("0", shard=(fabric.global_rank, fabric.world_size))
    rows = range(10) if fabric.world_size == 1 else range(5 * fabric.global_rank, 5 * fabric.global_rank + 5)
    traker.featurize((images[list(rows)], labels[list(rows)]), inds=list(rows))
    traker.store.release()
    fabric.barrier()
    if fabric.global_rank == 0:
        traker.finalize_features()
        traker.start_scoring_checkpoint("exp", model.state_dict(), model_id=0, num_targets=2)
        traker.score((images[10:], labels[10:]), num_samples=2)
        traker.finalize_scores("exp")


def test_traker_verbs_run_sharded_over_processes(tmp_path: Path) -> None:
    _traker_shard(Fabric(accelerator="cpu", devices=1), str(tmp_path / "one"))
    Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn").launch(_traker_shard, str(tmp_path / "two"))
    one, two = (np.load(tmp_path / job / "scores" / "exp.npy") for job in ("one", "two"))
    assert _relative(two, one) <= 1e-6
