"""Checkpoints of a run: a model directory plus the training state, written atomically and verifiable.

A checkpoint ``checkpoints/epoch-NNNN/`` holds a model directory, the training state (see
:mod:`cliptrace.train.state_file`; never a pickle) and, written last, ``checkpoint.json``: the size and sha256 of
every other file in it. Resuming verifies them, so a checkpoint truncated or damaged anywhere is detected, and falls
back to the newest checkpoint that is intact. Checkpoints of older versions hold a pickled ``training_state.pt``:
they still load as models, but resuming from one is refused, since unpickling a file can run arbitrary code.

A model with a locked backbone loaded from a local directory (locked-image tuning) saves no copy of it: the
checkpoint's model manifest references the backbone by path and file digests (see
:mod:`cliptrace.models.backbone_reference`), and loading the checkpoint checks them. A missing or changed backbone
is not a damaged checkpoint: it fails every checkpoint of the run alike, so it is reported as it is.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from cliptrace.files import atomic_directory, file_sha256
from cliptrace.models import load_model
from cliptrace.models.backbone_reference import BackboneChangedError
from cliptrace.models.base import DualEncoder
from cliptrace.train.run_dir import RunWarning
from cliptrace.train.state_file import read_state, write_state

MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = "cliptrace-checkpoint"
MANIFEST_VERSION = 1
PICKLED_STATE = "training_state.pt"
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d{4,})$")


class PickledStateError(ValueError):
    """A checkpoint's training state is a pickle (written by an older cliptrace) and is not loaded."""


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    """Where the checkpoint taken after ``epoch`` (1-based) lives."""
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first: those with a manifest, and older ones with a pickled training state.

    A half-written checkpoint is never listed; one damaged after it was written is, and :func:`verify_checkpoint`
    tells.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        path
        for path in root.iterdir()
        if _CHECKPOINT_NAME.match(path.name) and ((path / MANIFEST).is_file() or (path / PICKLED_STATE).is_file())
    ]
    return sorted(found, key=lambda path: int(_CHECKPOINT_NAME.match(path.name).group(1)))


def _write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file under ``directory`` in its manifest."""
    files = sorted(path for path in directory.rglob("*") if path.is_file())
    entries = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in files
    }
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": entries}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def save_checkpoint(directory: Path, model: DualEncoder, training_state: dict[str, Any]) -> None:
    """Write ``model`` (a loadable model directory), ``training_state`` and the manifest to ``directory``, atomically.

    Raises:
        OSError: Writing failed (e.g. the disk is full); the message names ``directory``, and nothing of it is left.
    """
    try:
        with atomic_directory(directory) as partial:
            model.save(partial)
            write_state(partial, training_state)
            _write_manifest(partial)
    except (OSError, RuntimeError, SafetensorError) as error:  # torch and safetensors report write errors so
        problem = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"{directory}: could not write the checkpoint ({problem}); the earlier checkpoints are kept, "
                      "and --resume continues from the newest once the cause (e.g. a full disk) is fixed") from error


def verify_checkpoint(directory: Path) -> None:
    """Check that every file of the checkpoint ``directory`` has the size and sha256 its manifest records.

    Raises:
        PickledStateError: The checkpoint holds a pickled training state from an older cliptrace.
        ValueError: The manifest is missing or unreadable, or a file is missing, truncated or changed; the message
            starts with that file.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        if (directory / PICKLED_STATE).is_file():
            raise PickledStateError(
                f"{directory / PICKLED_STATE}: not loaded: a pickled training state (from an older cliptrace) can run "
                "code when unpickled; start a new run, e.g. with --model on this checkpoint"
            )
        raise ValueError(f"{directory}: not a complete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        if not isinstance(entries, dict):
            raise ValueError(f"no format {MANIFEST_FORMAT!r} with a 'files' table")
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: not a readable checkpoint manifest ({error})") from error
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path}: checkpoint version {manifest.get('version')!r}; this cliptrace reads "
                         f"version {MANIFEST_VERSION}")
    for name, (size, digest) in expected.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {MANIFEST})")
        if path.stat().st_size != size:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, but {size} were written (truncated or replaced)")
        if file_sha256(path) != digest:
            raise ValueError(f"{path}: its contents changed since it was written (sha256 differs from {MANIFEST})")


def load_checkpoint(directory: Path) -> tuple[DualEncoder, dict[str, Any]]:
    """The model and training state of a checkpoint, after :func:`verify_checkpoint`.

    Raises:
        PickledStateError: The checkpoint holds a pickled training state from an older cliptrace.
        BackboneChangedError: A locked backbone it references is missing or changed (naming it and the checkpoint).
        ValueError, OSError: The checkpoint is damaged or does not load; the message starts with the file.
    """
    verify_checkpoint(directory)
    return load_model(directory), read_state(directory)


def resume_point(run_dir: Path, warn: bool = True) -> tuple[Path, DualEncoder, dict[str, Any]] | None:
    """The newest intact checkpoint of a run with its model and training state; None when there is no checkpoint.

    Damaged checkpoints are passed over for the previous one, with a :class:`RunWarning` naming both (when ``warn``).

    Raises:
        PickledStateError: The newest intact checkpoint holds a pickled training state.
        BackboneChangedError: A locked backbone the newest intact checkpoint references is missing or changed.
        ValueError: Every checkpoint is damaged.
    """
    checkpoints = list_checkpoints(run_dir)
    damaged: list[str] = []
    for directory in reversed(checkpoints):
        try:
            model, state = load_checkpoint(directory)
        except (PickledStateError, BackboneChangedError):
            raise
        except (ValueError, OSError) as error:
            damaged.append(str(error))
            continue
        if damaged and warn:
            warnings.warn(f"{run_dir}: passed over {len(damaged)} damaged checkpoint(s) ({'; '.join(damaged)}); "
                          f"resuming from {directory.name}", RunWarning, stacklevel=2)
        return directory, model, state
    if damaged:
        raise ValueError(f"{run_dir}: no checkpoint can be resumed, every one is damaged ({'; '.join(damaged)}); "
                         "choose another --out to start over")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints; ``keep == 0`` keeps all."""
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path)
