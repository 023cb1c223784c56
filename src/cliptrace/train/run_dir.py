"""The run directory: one run writes it at a time, leftovers of killed runs are cleared, a resume must match it.

``RUN/run.lock`` is held (``flock``, exclusive) by the process that writes the run (the global rank 0 of a
distributed run) for as long as it trains; a second ``train`` on the same directory fails at once with
:class:`RunBusyError` naming the holder. The lock dies with its process, so a killed run never blocks the next.
While holding it, the run removes the temporaries and ``.partial`` directories that killed training runs left,
with one :class:`RunWarning` that counts them. Only training's own: other commands write under the run directory
too (``trak/``, ``verify/``, ``report/``, ``test_metrics.json``), under their own locks or none, and may be running.
"""

from __future__ import annotations

import errno
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cliptrace.files import remove_temporaries
from cliptrace.locks import FileLock, holder_note
from cliptrace.notices import CliptraceWarning
from cliptrace.train.config import TrainConfig

RUN_LOCK = "run.lock"
CONFIG = "config.json"
# What training writes atomically at the top of a run directory; under checkpoints/ everything is training's.
_OWN_OUTPUTS = ("config.json", "skipped.csv", "metrics.json", "train.csv", "eval.csv", "model")


class RunBusyError(OSError):
    """Another process is training in the same run directory."""

    def __str__(self) -> str:
        return str(self.strerror)


class RunWarning(CliptraceWarning):
    """Something about a run that its user should know: a damaged checkpoint passed over, leftovers of a killed run
    removed, no eval split to evaluate on."""


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Create ``run_dir`` if needed and hold its lock for the block; clear what killed runs left in it.

    A directory created here that holds nothing but the lock when the block fails is removed again.

    Raises:
        RunBusyError: Another process holds the lock.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / RUN_LOCK
    try:
        lock = FileLock(lock_path, exclusive=True)
    except BlockingIOError:
        raise RunBusyError(
            errno.EBUSY,
            f"{run_dir}: another cliptrace train is running in this run directory{holder_note(lock_path)}; wait for "
            "it to finish or choose another --out",
        ) from None
    try:
        removed = _remove_leftovers(run_dir)
        if removed:
            names = ", ".join(str(path.relative_to(run_dir)) for path in removed[:3])
            warnings.warn(f"{run_dir}: removed {len(removed)} temporary file(s) or folder(s) a killed run left "
                          f"({names}{', ...' if len(removed) > 3 else ''})", RunWarning, stacklevel=3)
        yield
    except BaseException:
        if created and [path.name for path in run_dir.iterdir()] == [RUN_LOCK]:
            lock_path.unlink()
            run_dir.rmdir()
        raise
    finally:
        lock.release()


def _remove_leftovers(run_dir: Path) -> list[Path]:
    """Remove what killed training runs left in ``run_dir`` (see the module docstring); return the removed paths."""
    removed = remove_temporaries(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    return removed + remove_temporaries(run_dir, names=_OWN_OUTPUTS)


def check_run_dir(config: TrainConfig, resume: bool) -> bool:
    """Whether ``config.out`` holds a run to continue; raise when it may not be continued with ``config``.

    Raises:
        FileExistsError: A run exists there and ``resume`` is False.
        ValueError: The stored run has settings ``config`` may not change (see :meth:`TrainConfig.differences`).
    """
    run_dir = Path(config.out)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        return False
    if not resume:
        raise FileExistsError(f"{run_dir}: a run already exists here; pass --resume to continue it or choose another "
                              "--out")
    changed = config.differences(TrainConfig.load(config_path), TrainConfig.load_inputs(config_path))
    if changed:
        details = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (new, old) in changed.items())
        raise ValueError(f"{run_dir}: cannot resume with different settings ({details})")
    return True
