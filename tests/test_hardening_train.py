"""Hardening of training runs: no pickle in checkpoints, one writer per run directory, damaged checkpoints passed
over, non-finite training stopped, resumes independent of how paths are spelled.

The rows of docs/bad-input.md on training runs point at these tests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric import Fabric
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.train import checkpoint as checkpoint_module
from cliptrace.train.run_dir import RUN_LOCK, RunBusyError, RunWarning, locked_run_dir
from cliptrace.train.state_file import read_state, write_state

SETTINGS = dict(preset="tiny", image_size=32, vocab_size=300, batch_size=8, warmup_steps=1, eval_split=None,
                progress=False, accelerator="cpu", seed=5)
CLI_SETTINGS = ["--preset", "tiny", "--image-size", "32", "--vocab-size", "300", "--batch-size", "8",
                "--warmup-steps", "1", "--eval-split", "", "--no-progress", "--accelerator", "cpu", "--seed", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes world of 40 images (32 for training: 4 steps an epoch); the path of its captions.csv."""
    return generate_shapes_world(tmp_path_factory.mktemp("hardening_world") / "world", n_images=40, seed=2,
                                 format="csv")


@pytest.fixture(scope="module")
def finished(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run with a checkpoint after each epoch (copy it before changing it)."""
    out = tmp_path_factory.mktemp("hardening_run") / "run"
    train(TrainConfig(data=str(world), out=str(out), epochs=2, **SETTINGS))
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _error_line(output: str) -> str:
    """The one ``error:`` line of a failed command (rich may wrap stdout; stderr lines are whole)."""
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


def _resume(world: Path, run: Path, epochs: int = 2, *extra: object) -> tuple[int, str]:
    return _cli("train", world, "--out", run, "--resume", "--epochs", epochs, *CLI_SETTINGS, *extra)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(directory).state_dict()


def _same_weights(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


# --- 1. no pickle: the training state is safetensors + JSON; a pickled one is refused and never runs ---------------


class _TouchOnUnpickle:
    """Unpickling an instance calls ``Path.touch(marker)``: what a crafted training_state.pt does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


def test_the_training_state_round_trips_exactly_without_pickle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    state = {"epoch": 3, "step": 17, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "odd": {"__tensor__": "a plain dict with a tag-like key"}}
    write_state(tmp_path, state)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["training_state.json", "training_state.safetensors"]
    back = read_state(tmp_path)
    assert back["odd"] == state["odd"] and (back["epoch"], back["step"]) == (3, 17)
    assert back["scheduler"] == state["scheduler"]
    assert torch.equal(back["torch_rng"], state["torch_rng"]) and back["torch_rng"].dtype == torch.uint8
    groups, saved_groups = back["optimizer"]["param_groups"], state["optimizer"]["param_groups"]
    assert groups == saved_groups and isinstance(groups[0]["betas"], tuple)
    assert back["optimizer"]["state"].keys() == {0, 1}  # parameter indices stay ints
    for index, entry in state["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(back["optimizer"]["state"][index][name], value), (index, name)


def test_a_pickled_training_state_is_refused_and_nothing_in_it_runs(finished: Path, world: Path,
                                                                     tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"optimizer": _TouchOnUnpickle(marker)})
    pickle.loads(payload)  # the payload is live: unpickling it touches the marker
    assert marker.exists()
    marker.unlink()
    run = _copy(finished, tmp_path / "run")
    for checkpoint in list_checkpoints(run):  # make every checkpoint look like one of an older version
        for name in ("checkpoint.json", "training_state.json", "training_state.safetensors"):
            (checkpoint / name).unlink()
        (checkpoint / "training_state.pt").write_bytes(payload)
    assert [path.name for path in list_checkpoints(run)] == ["epoch-0001", "epoch-0002"]  # still usable as models
    code, output = _resume(world, run, 3)
    assert code == 1
    state = run / "checkpoints" / "epoch-0002" / "training_state.pt"
    assert _error_line(output) == (
        f"error: {state}: not loaded: a pickled training state (from an older cliptrace) can run code when "
        "unpickled; start a new run, e.g. with --model on this checkpoint")
    assert not marker.exists(), "nothing of the pickle ran"
    assert not (run / "checkpoints" / "epoch-0003").exists()


def test_checkpoints_hold_no_pickle_and_a_manifest_of_every_file(finished: Path) -> None:
    checkpoint = list_checkpoints(finished)[-1]
    names = sorted(path.name for path in checkpoint.iterdir())
    assert "training_state.pt" not in names and {"checkpoint.json", "model.safetensors"} <= set(names)
    with (checkpoint / "training_state.safetensors").open("rb") as file:  # safetensors: u64 header size, JSON
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    assert {entry["dtype"] for name, entry in header.items() if name != "__metadata__"} <= {"F32", "U8"}
    assert json.loads((checkpoint / "training_state.json").read_text())["format"] == "cliptrace-training-state"
    files = json.loads((checkpoint / "checkpoint.json").read_text())["files"]
    assert set(files) == set(names) - {"checkpoint.json"}
    for name, entry in files.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --- 3. one writer per run directory ------------------------------------------------------------------------------


def _source_path() -> str:
    import cliptrace

    return str(Path(cliptrace.__file__).parents[1])


def test_a_second_train_on_a_locked_run_directory_fails_at_once(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "run")
    log_before = (run / "train.csv").read_text()
    command = [sys.executable, "-c", "from cliptrace.cli import app; app()", "train", str(world), "--out", str(run),
               "--resume", "--epochs", "3", *CLI_SETTINGS]
    env = {**os.environ, "PYTHONPATH": _source_path(), "OMP_NUM_THREADS": "1"}
    with locked_run_dir(run):  # what a running `cliptrace train` holds
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stderr.strip() == (
        f"error: {run}: another cliptrace train is running in this run directory (pid {os.getpid()} on "
        f"{socket.gethostname()}); wait for it to finish or choose another --out")
    assert (run / "train.csv").read_text() == log_before and not (run / "checkpoints" / "epoch-0003").exists()
    # Once the first one is done, the second one runs, and logs every step once.
    code, output = _resume(world, run, 3)
    assert code == 0, output
    steps = [line.split(",")[0] for line in (run / "train.csv").read_text().splitlines()[1:]]
    assert steps == [str(step) for step in range(1, 13)]


def test_the_lock_is_taken_before_anything_is_read_and_released_after_an_error(world: Path, tmp_path: Path) -> None:
    run, missing = tmp_path / "run", str(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="missing.csv"):
        train(TrainConfig(data=missing, out=str(run), epochs=1, **SETTINGS))
    assert not run.exists(), "a run directory created for a run that failed at once is removed again"
    with locked_run_dir(run):  # the lock conflicts between open files even in one process
        with pytest.raises(RunBusyError, match=f"^{run}: another cliptrace train .* \\(pid {os.getpid()} on "):
            train(TrainConfig(data=missing, out=str(run), epochs=1, **SETTINGS))
    assert not (run / RUN_LOCK).read_text(), "released: the holder note is cleared"


def test_leftovers_of_a_killed_run_are_removed_on_the_next_run(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "run")
    left = [run / "checkpoints" / "epoch-0003.partial", run / "model.partial", run / ".train.0123456789abcdef.tmp.csv",
            run / "checkpoints" / "epoch-0002" / ".model.0123456789abcdef.tmp.safetensors"]
    for path in left[:2]:
        shutil.copytree(run / "checkpoints" / "epoch-0002", path)
    for path in left[2:]:
        path.write_text("half a file")
    # Other commands' files under the run directory, perhaps being written right now, stay.
    others = [run / "trak" / "store" / ".features.0123456789abcdef.tmp.npy",
              run / ".test_metrics.0123456789abcdef.tmp.json"]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("another command's")
    code, output = _resume(world, run, 2)
    assert code == 0, output
    assert f"warning: {run}: removed 4 temporary file(s) or folder(s) a killed run left" in output.replace("\n", "")
    assert not any(path.exists() for path in left) and all(path.exists() for path in others)


# --- 5. damaged checkpoints, full disks: one line; resume falls back to the newest intact checkpoint -------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 8)


@pytest.mark.parametrize("damage", [
    ("training_state.safetensors", _truncate),
    ("training_state.json", _garble),
    ("model.safetensors", _truncate),
    ("checkpoint.json", _garble),
])
def test_resume_passes_over_a_damaged_newest_checkpoint_and_says_so(finished: Path, world: Path, tmp_path: Path,
                                                                    damage: tuple) -> None:
    name, spoil = damage
    run = _copy(finished, tmp_path / "run")
    shutil.rmtree(run / "model")
    damaged = run / "checkpoints" / "epoch-0002"
    spoil(damaged / name)
    with pytest.warns(RunWarning, match=rf"passed over 1 damaged checkpoint\(s\) \({damaged / name}: .*\); resuming "
                                        r"from epoch-0001"):
        result = train(TrainConfig(data=str(world), out=str(run), epochs=2, **SETTINGS), resume=True)
    # Epoch 2 is trained again from epoch 1, exactly as the uninterrupted run trained it.
    assert _same_weights(_weights(result.model_dir), _weights(finished / "model"))
    checkpoint_module.verify_checkpoint(damaged)  # rewritten whole


def test_the_fallback_is_one_warning_line_on_the_command_line(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "run")
    _truncate(run / "checkpoints" / "epoch-0002" / "model.safetensors")
    code, output = _resume(world, run, 2)
    assert code == 0, output
    weights = run / "checkpoints" / "epoch-0002" / "model.safetensors"
    size = weights.stat().st_size
    lines = [line for line in output.splitlines() if line.startswith("warning:")]
    assert lines == [f"warning: {run}: passed over 1 damaged checkpoint(s) ({weights}: {size // 2} bytes, but {size} "
                     "were written (truncated or replaced)); resuming from epoch-0001"]


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "run")
    for checkpoint in list_checkpoints(run):
        _truncate(checkpoint / "training_state.safetensors")
    code, output = _resume(world, run, 3)
    assert code == 1
    line = _error_line(output)
    assert line.startswith(f"error: {run}: no checkpoint can be resumed, every one is damaged (")
    assert line.endswith("choose another --out to start over")
    assert all(f"{checkpoint / 'training_state.safetensors'}: " in line for checkpoint in list_checkpoints(run))


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1472\nframe #0: c10::Error"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["torch-unexpected-pos", "enospc"])
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(
        world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    real_write, calls = checkpoint_module.write_state, []

    def fill_up_on_second(*args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise failure
        real_write(*args)

    monkeypatch.setattr(checkpoint_module, "write_state", fill_up_on_second)
    run = tmp_path / "run"
    code, output = _cli("train", world, "--out", run, "--epochs", "2", *CLI_SETTINGS)
    assert code == 1
    problem = "unexpected pos 1536 vs 1472" if isinstance(failure, RuntimeError) else "No space left on device"
    line = _error_line(output)
    assert line.startswith(f"error: {run / 'checkpoints' / 'epoch-0002'}: could not write the checkpoint (")
    assert problem in line and line.endswith("--resume continues from the newest once the cause (e.g. a full disk) "
                                             "is fixed")
    assert [path.name for path in list_checkpoints(run)] == ["epoch-0001"]
    checkpoint_module.verify_checkpoint(run / "checkpoints" / "epoch-0001")


# --- 7. non-finite training stops at the first bad step -----------------------------------------------------------


@pytest.fixture(scope="module")
def nan_model(finished: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory whose image projection is NaN."""
    model = load_model(finished / "model")
    with torch.no_grad():
        dict(model.named_parameters())["model.visual_projection.weight"].fill_(float("nan"))
    directory = tmp_path_factory.mktemp("nan_model") / "model"
    model.save(directory)
    return directory


@pytest.mark.parametrize("grad_clip, hint", [
    ("0", "lower --lr, use --grad-clip, or check the model weights / data"),
    ("1.0", "lower --lr, or check the model weights / data"),
])
def test_nan_weights_stop_training_at_the_first_step(world: Path, nan_model: Path, tmp_path: Path, grad_clip: str,
                                                     hint: str) -> None:
    run = tmp_path / "run"
    code, output = _cli("train", world, "--out", run, "--model", nan_model, "--epochs", "2", "--grad-clip", grad_clip,
                        *CLI_SETTINGS)
    assert code == 1
    assert _error_line(output) == f"error: {run}: loss is NaN at step 1 (epoch 1); {hint}"
    assert not (run / "model").exists() and list_checkpoints(run) == []


def test_a_non_finite_gradient_norm_stops_training_at_its_step(world: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_clip, calls = Fabric.clip_gradients, []

    def overflow_on_sixth(self: Fabric, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        norm = real_clip(self, *args, **kwargs)
        return torch.tensor(float("inf")) if len(calls) == 6 else norm

    monkeypatch.setattr(Fabric, "clip_gradients", overflow_on_sixth)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^{run}: the gradient norm is inf at step 6 \(epoch 2\); lower --lr, or "
                                         r"check the model weights / data$"):
        train(TrainConfig(data=str(world), out=str(run), epochs=2, **SETTINGS))
    assert [path.name for path in list_checkpoints(run)] == ["epoch-0001"]


# --- 9. a resume does not depend on how paths are spelled ---------------------------------------------------------


def test_a_moved_run_directory_resumes(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "second"
    moved.parent.mkdir()
    shutil.move(run, moved)
    shutil.rmtree(moved / "model")
    shutil.rmtree(moved / "checkpoints" / "epoch-0002")
    result = train(TrainConfig(data=str(world), out=str(moved), epochs=2, **SETTINGS), resume=True)
    assert [path.name for path in result.checkpoints] == ["epoch-0001", "epoch-0002"]
    assert _same_weights(_weights(result.model_dir), _weights(finished / "model"))


@pytest.mark.parametrize("spelling", ["relative", "folder", "symlink"])
def test_the_data_may_be_spelled_differently_on_resume(finished: Path, world: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, spelling: str) -> None:
    run = _copy(finished, tmp_path / "run")
    if spelling == "relative":
        monkeypatch.chdir(world.parent.parent)
        data = Path(world.parent.name) / world.name
        assert not data.is_absolute() and data.resolve() == world.resolve()
    elif spelling == "folder":
        data = world.parent
    else:
        data = tmp_path / "link"
        data.symlink_to(world.parent, target_is_directory=True)
    code, output = _resume(data, run, 2)
    assert code == 0, output


def test_other_data_or_ids_are_still_refused(finished: Path, world: Path, tmp_path: Path) -> None:
    run = _copy(finished, tmp_path / "run")
    other = generate_shapes_world(tmp_path / "other", n_images=40, seed=3, format="csv")
    code, output = _resume(other, run, 2)
    assert code == 1
    assert _error_line(output) == (f"error: {run}: cannot resume with different settings (data: "
                                   f"'{world.resolve()}' -> '{other.resolve()}')")


def test_train_ids_are_compared_by_their_contents(world: Path, tmp_path: Path) -> None:
    records = [record.id for record in select_split(load_records(world), "train")][:16]
    first, copy = tmp_path / "ids.txt", tmp_path / "elsewhere" / "same-ids.txt"
    first.write_text("\n".join(records) + "\n")
    copy.parent.mkdir()
    shutil.copy(first, copy)
    run = tmp_path / "run"
    train(TrainConfig(data=str(world), out=str(run), epochs=1, train_ids=str(first), **SETTINGS))
    train(TrainConfig(data=str(world), out=str(run), epochs=1, train_ids=str(copy), **SETTINGS), resume=True)
    copy.write_text("\n".join(records[:8]) + "\n")  # edited in place: the same path, other records
    digests = [hashlib.sha256(("\n".join(ids) + "\n").encode()).hexdigest() for ids in (records, records[:8])]
    with pytest.raises(ValueError, match=rf"^{run}: cannot resume with different settings \(train_ids: "
                                         rf"'sha256:{digests[0]}' -> 'sha256:{digests[1]}'\)$"):
        train(TrainConfig(data=str(world), out=str(run), epochs=1, train_ids=str(copy), **SETTINGS), resume=True)


def test_the_stored_config_names_the_data_by_absolute_path(world: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = TrainConfig(data="world/captions.csv", out="run", model="models/init", train_ids="ids.txt")
    monkeypatch.chdir(tmp_path)
    absolute = config.absolute()
    assert (absolute.data, absolute.model, absolute.train_ids) == (
        str(tmp_path / "world" / "captions.csv"), str(tmp_path / "models" / "init"), str(tmp_path / "ids.txt"))
    assert absolute.out == "run" and config.differences(absolute) == {}
    assert TrainConfig(data="d", out="one").differences(TrainConfig(data="d", out="two")) == {}


# --- 11. the hint names the flag -------------------------------------------------------------------------------------


def test_an_existing_run_without_resume_names_the_flag(finished: Path, world: Path) -> None:
    code, output = _cli("train", world, "--out", finished, "--epochs", "2", *CLI_SETTINGS)
    assert code == 1
    assert _error_line(output) == (f"error: {finished}: a run already exists here; pass --resume to continue it or "
                                   "choose another --out")
    assert not (finished / RUN_LOCK).read_text(), "the lock was released"
