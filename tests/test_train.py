"""Training: optimizer set-up, schedule, checkpoints, determinism, resume, and the CLI on CSV and WebDataset data."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.files import atomic_directory
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.train.metrics_log import MetricsLog
from cliptrace.train.optim import build_optimizer, parameter_groups, warmup_cosine


def test_warmup_cosine_matches_closed_form() -> None:
    schedule = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [schedule(step) for step in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    for step in range(4, 15):
        expected = 0.5 * (1 + math.cos(math.pi * (step - 4) / 10))
        assert schedule(step) == pytest.approx(expected)
    assert schedule(100) == pytest.approx(0.0)


def test_parameter_groups_exempt_biases_norms_scale_and_frozen() -> None:
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(3, 4)
    model.layer_norm = torch.nn.LayerNorm(4)
    model.logit_scale = torch.nn.Parameter(torch.ones(2, 2))  # 2-D on purpose: exempt by name
    model.frozen = torch.nn.Linear(2, 2)
    model.frozen.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.proj.weight)]
    assert {id(p) for p in no_decay["params"]} == {
        id(model.proj.bias), id(model.layer_norm.weight), id(model.layer_norm.bias), id(model.logit_scale)
    }


def test_scheduler_steps_follow_schedule() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = build_optimizer(model, lr=0.5, weight_decay=0.0, warmup_steps=2, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    schedule = warmup_cosine(2, 6)
    assert seen == pytest.approx([0.5 * schedule(step) for step in range(6)])


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as partial:
            (partial / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert not target.exists()
    with atomic_directory(target) as partial:
        (partial / "weights").write_text("whole")
    assert (target / "weights").read_text() == "whole"
    assert not (tmp_path / "model.partial").exists()


def test_metrics_log_appends_under_one_header(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("train", {"step": 1, "loss": 2.5})
    log.close()
    resumed = MetricsLog(tmp_path, tensorboard=False)
    resumed.write("train", {"step": 2, "loss": 1.5})
    with (tmp_path / "train.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert rows == [{"step": "1", "loss": "2.5"}, {"step": "2", "loss": "1.5"}]


def test_config_refuses_bad_values_and_reports_differences(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(data="d", out="o", batch_size=0)
    config = TrainConfig(data="d", out="o")
    config.save(tmp_path / "config.json")
    loaded = TrainConfig.load(tmp_path / "config.json")
    assert loaded == config
    changed = TrainConfig(data="d", out="o", lr=0.5, epochs=99)
    assert changed.differences(config) == {"lr": (0.5, config.lr)}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("world"), n_images=80, seed=3, format="csv")


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(
        data=str(data), out=str(out), preset="tiny", image_size=32, vocab_size=300, epochs=2, batch_size=16,
        warmup_steps=2, lr=1e-3, seed=7, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(model_dir).state_dict()


def _assert_same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def test_training_is_deterministic_and_resumes_exactly(small_world: Path, tmp_path: Path) -> None:
    first = train(_config(small_world, tmp_path / "a"))
    second = train(_config(small_world, tmp_path / "b"))
    _assert_same_weights(_state(first.model_dir), _state(second.model_dir))
    assert [path.name for path in first.checkpoints] == ["epoch-0001", "epoch-0002"]
    with (first.run_dir / "train.csv").open() as file:
        steps = [int(row["step"]) for row in csv.DictReader(file)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * (64 // 16)

    # Simulate a crash during epoch 2: only the epoch-1 checkpoint survives; resuming must reproduce the run.
    crashed = tmp_path / "b"
    for path in [crashed / "checkpoints" / "epoch-0002", crashed / "model"]:
        shutil.rmtree(path)
    resumed = train(_config(small_world, crashed), resume=True)
    _assert_same_weights(_state(first.model_dir), _state(resumed.model_dir))
    assert [path.name for path in list_checkpoints(crashed)] == ["epoch-0001", "epoch-0002"]

    other_seed = _state(train(_config(small_world, tmp_path / "c", seed=8)).model_dir)
    reference = _state(first.model_dir)
    assert any(not torch.equal(reference[name], other_seed[name]) for name in reference)


def test_existing_run_needs_resume_and_same_settings(small_world: Path, tmp_path: Path) -> None:
    train(_config(small_world, tmp_path / "run", epochs=1))
    with pytest.raises(FileExistsError, match="resume"):
        train(_config(small_world, tmp_path / "run", epochs=1))
    with pytest.raises(ValueError, match="lr"):
        train(_config(small_world, tmp_path / "run", epochs=1, lr=0.5), resume=True)


@pytest.mark.parametrize("data_format", ["csv", "wds"])
def test_cli_trains_from_csv_and_webdataset(data_format: str, tmp_path: Path) -> None:
    data = generate_shapes_world(tmp_path / "data", n_images=60, seed=1, format=data_format)
    out = tmp_path / "run"
    args = ["train", str(data), "--out", str(out), "--image-size", "32", "--vocab-size", "300", "--epochs", "2",
            "--batch-size", "16", "--warmup-steps", "1", "--keep-checkpoints", "1", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    assert [path.name for path in list_checkpoints(out)] == ["epoch-0002"]  # pruned to the newest one
    model = load_model(out / "model")
    _assert_same_weights(model.state_dict(), load_model(out / "checkpoints" / "epoch-0002").state_dict())


def test_two_process_ddp_training_matches_one_process(small_world: Path, tmp_path: Path) -> None:
    """Fabric DDP on 2 CPU processes (gloo) with the gathered loss follows the same trajectory as one process."""
    args = ["--image-size", "32", "--vocab-size", "300", "--epochs", "2", "--batch-size", "16", "--warmup-steps", "2",
            "--seed", "7", "--eval-split", "", "--no-progress", "--accelerator", "cpu"]
    command = [str(Path(sys.executable).with_name("cliptrace")), "train", str(small_world)]
    two = subprocess.run(command + ["--out", str(tmp_path / "ddp"), "--devices", "2", "--strategy", "ddp", *args],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stdout + two.stderr
    one = train(_config(small_world, tmp_path / "one", eval_split=None, accelerator="cpu"))
    distributed, single = _state(tmp_path / "ddp" / "model"), _state(one.model_dir)
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=name)


def test_train_cli_reports_bad_input_without_traceback(small_world: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.csv"
    result = CliRunner().invoke(app, ["train", str(missing), "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.exit_code == 1 and "error:" in result.output and str(missing) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    train(_config(small_world, tmp_path / "run", epochs=1))
    again = CliRunner().invoke(
        app, ["train", str(small_world), "--out", str(tmp_path / "run"), "--image-size", "32", "--no-progress"]
    )
    assert again.exit_code == 1 and "resume" in again.output


def test_demo_runs_end_to_end_and_replaces_only_an_earlier_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--n-images", "200", "--epochs", "2", "--save-every", "1", "--duplicates",
            "2", "--mislabeled", "2", "--n-targets", "3", "--no-progress"]
    for _ in range(2):  # the second run replaces the first
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    metrics = json.loads((out / "run" / "test_metrics.json").read_text())
    assert metrics["n_images"] == 20  # 10 % of 200 images are held out for test
    assert {"i2t_R@1", "t2i_R@1", "zeroshot_top1"} <= set(metrics)
    output = result.output.replace("\n", "")
    assert str(out / "report" / "index.html") in output
    assert "/2 (in the top 8" in output and "most self-influential training pairs" in output
    assert len(list((out / "report" / "targets").glob("*.html"))) == 2 + 3  # planted originals + test images
    stranger = tmp_path / "mine"
    stranger.mkdir()
    refused = CliRunner().invoke(app, ["demo", "--out", str(stranger), "--n-images", "200", "--epochs", "1"])
    assert refused.exit_code != 0 and stranger.is_dir()
