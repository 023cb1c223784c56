"""Checkpoints of a run: a model directory plus the training state, written atomically."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

from cliptrace.files import atomic_directory
from cliptrace.models.base import DualEncoder

TRAINING_STATE = "training_state.pt"
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})$")


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    """Where the checkpoint taken after ``epoch`` (1-based) lives."""
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a half-written one is never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _CHECKPOINT_NAME.match(path.name) and (path / TRAINING_STATE).is_file()
    ]
    return sorted(found, key=lambda path: int(_CHECKPOINT_NAME.match(path.name).group(1)))


def save_checkpoint(directory: Path, model: DualEncoder, training_state: dict) -> None:
    """Write ``model`` (a loadable model directory) and ``training_state`` to ``directory``, atomically."""
    with atomic_directory(directory) as partial:
        model.save(partial)
        torch.save(training_state, partial / TRAINING_STATE)


def load_training_state(directory: Path) -> dict:
    """Read the training state (optimizer, scheduler, epoch, step, RNG) saved beside a checkpoint's model."""
    path = directory / TRAINING_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a checkpoint (no {TRAINING_STATE})")
    return torch.load(path, map_location="cpu", weights_only=False)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints; ``keep == 0`` keeps all."""
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)
