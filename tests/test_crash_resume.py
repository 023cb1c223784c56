"""Long jobs killed with SIGKILL at random moments and resumed with the same command end exactly where an
uninterrupted run does, and never leave anything half-written that looks finished."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, list_checkpoints, train
from test_lit import save_tiny_backbones

KILLS = 10
TRAK_OPTIONS = ["--proj-dim", "32", "--lambda-reg", "0.1", "--bank-size", "12", "--batch-size", "2", "--no-progress",
                "--top-k", "3"]
PRESET_OPTIONS = ["--preset", "tiny", "--image-size", "32", "--vocab-size", "300"]
TRAIN_OPTIONS = ["--epochs", "4", "--batch-size", "8", "--warmup-steps", "2", "--seed", "3", "--eval-split", "",
                 "--no-progress", "--accelerator", "cpu", "--save-every", "1"]

# Runs a cliptrace command in-process after the heavy imports, and says when it starts, so that the kill times are
# spread over the work itself rather than over interpreter start-up.
RUNNER = textwrap.dedent("""
    import sys
    import cliptrace.train, cliptrace.trak.attribute  # noqa: F401
    from cliptrace.cli import app
    print("ready", flush=True)
    app(sys.argv[1:], standalone_mode=True)
""")


def _source_path() -> str:
    import cliptrace

    return str(Path(cliptrace.__file__).parents[1])


def _start(args: list[str]) -> tuple[subprocess.Popen, float]:
    """Start the command; return the process and the moment its work began."""
    env = {**os.environ, "PYTHONPATH": _source_path(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", RUNNER, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdout.readline().strip() == "ready", process.stderr.read()
    return process, time.monotonic()


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, f"{out}\n{err}"


def _run_to_completion(args: list[str]) -> float:
    """Run the command uninterrupted; return how long its work took."""
    process, started = _start(args)
    _finish(process)
    return time.monotonic() - started


def _kill_and_resume(args: list[str], work_seconds: float, seed: int, check) -> list[float]:
    """Kill the command ``KILLS`` times, each after a random share of its work, checking the state left behind
    with ``check`` after every kill; then let it finish. Returns the kill times (seconds into each attempt)."""
    rng = random.Random(seed)
    kills = []
    while len(kills) < KILLS:
        delay = rng.uniform(0.0, 2.0 * work_seconds / KILLS)
        process, started = _start(args)
        time.sleep(max(0.0, started + delay - time.monotonic()))
        if process.poll() is not None:  # finished before the kill: the job is done, start it over elsewhere
            _finish(process)
            return kills
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        kills.append(delay)
        check()
    _finish(_start(args)[0])
    return kills


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("crash_world"), n_images=60, seed=11, format="csv")


@pytest.fixture(scope="module")
def run(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crash_run") / "run"
    train(TrainConfig(data=str(world), out=str(out), preset="tiny", image_size=32, vocab_size=300, epochs=2,
                      batch_size=8, warmup_steps=1, save_every=1, eval_split=None, progress=False))
    return out


def _close(left: np.ndarray, right: np.ndarray) -> float:
    """Largest difference relative to the largest entry."""
    return float(np.max(np.abs(left - right)) / np.max(np.abs(right)))


def test_featurize_and_score_killed_at_random_points_resume_to_the_uninterrupted_result(
        world: Path, run: Path, tmp_path: Path) -> None:
    def command(name: str) -> list[str]:
        return ["trak", "score", run, world, "--store", tmp_path / name / "store", "--out", tmp_path / name / "out",
                *TRAK_OPTIONS]

    work = _run_to_completion(command("reference"))
    reference = tmp_path / "reference"
    checkpoints = [path.name for path in list_checkpoints(run)]
    reference_features = {c: np.load(reference / "store" / "checkpoints" / c / "features.npy") for c in checkpoints}
    crashed = tmp_path / "crashed"
    store = crashed / "store"

    def check() -> None:
        # Every row marked as done holds exactly the features an uninterrupted run computes.
        for checkpoint in checkpoints:
            folder = store / "checkpoints" / checkpoint
            if not (folder / "featurized.npy").is_file():
                continue
            done = np.load(folder / "featurized.npy")
            features = np.load(folder / "features.npy")
            if done.any():  # rows are computed in fixed batches, so a resumed job repeats the same arithmetic
                assert np.array_equal(features[done], reference_features[checkpoint][done])
            assert done.all() or not (folder / "kernel.npy").exists()
        # An output folder is complete exactly when it holds ids.json.
        if (crashed / "out" / "ids.json").is_file():
            assert json.loads((crashed / "out" / "ids.json").read_text())["checkpoints"] == checkpoints
            assert _close(np.load(crashed / "out" / "scores.npy"), np.load(reference / "out" / "scores.npy")) <= 1e-6

    kills = _kill_and_resume(command("crashed"), work, seed=0, check=check)
    assert len(kills) == KILLS, f"the job finished after {len(kills)} kills; the kill times are too long"
    scores, expected = np.load(crashed / "out" / "scores.npy"), np.load(reference / "out" / "scores.npy")
    assert np.array_equal(scores, expected)
    for name in ("topk.csv", "self_influence.csv"):
        with open(crashed / "out" / name, newline="") as left, open(reference / "out" / name, newline="") as right:
            got, want = list(csv.DictReader(left)), list(csv.DictReader(right))
        assert [row["train_id"] for row in got] == [row["train_id"] for row in want]
    assert not list(crashed.rglob("*.tmp*")), "a temporary file was left behind as if it were an output"


@pytest.mark.parametrize("lit", [False, True], ids=["preset", "lit"])
def test_training_killed_at_random_points_resumes_to_the_same_weights_and_log(world: Path, tmp_path: Path,
                                                                              lit: bool) -> None:
    model = PRESET_OPTIONS
    if lit:  # a locked image backbone, referenced by every checkpoint, and a fine-tuned text backbone
        backbones = save_tiny_backbones(tmp_path / "backbones", world)
        model = ["--image-backbone", backbones["image"], "--text-backbone", backbones["text"], "--lock-image"]

    def command(name: str) -> list[str]:
        return ["train", world, "--out", tmp_path / name, "--resume", *model, *TRAIN_OPTIONS]

    work = _run_to_completion(command("reference"))
    crashed = tmp_path / "crashed"

    def check() -> None:
        for checkpoint in list_checkpoints(crashed):  # every listed checkpoint loads
            load_model(checkpoint)
        if (crashed / "model").is_dir():
            load_model(crashed / "model")

    kills = _kill_and_resume(command("crashed"), work, seed=1, check=check)
    assert len(kills) == KILLS, f"the run finished after {len(kills)} kills; the kill times are too long"
    want, got = load_model(tmp_path / "reference" / "model").state_dict(), load_model(crashed / "model").state_dict()
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert torch.equal(value, got[name]), name
    assert [path.name for path in list_checkpoints(crashed)] == [f"epoch-{epoch:04d}" for epoch in range(1, 5)]
    logs = [(tmp_path / name / "train.csv").read_text() for name in ("reference", "crashed")]
    assert logs[0] == logs[1], "each step is logged once, with the loss of the uninterrupted run"
