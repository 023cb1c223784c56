"""The on-disk feature store: per checkpoint, TRAK features, loss weights and a per-example "featurized" mask.

Layout (``.npy`` memory maps: random-access row writes, no dependency beyond numpy, readable by any tool)::

    STORE/manifest.json                      versioned; settings; checkpoints and their model fingerprints
    STORE/checkpoints/ID/features.npy        (n, k) float32 (or float64), rows written as batches finish
    STORE/checkpoints/ID/loss_weights.npy    (n,)   same dtype
    STORE/checkpoints/ID/featurized.npy      (n,)   bool, set only after the rows it covers are flushed
    STORE/checkpoints/ID/kernel.npy          the solved kernel, written once all rows are done:
                                             (k, k) lower Cholesky factor of XᵀX + λI when k ≤ n,
                                             (n, k) W = (XXᵀ + λI)⁻¹X when k > n (see cliptrace.trak.scoring)

The manifest is replaced atomically (write, fsync, rename). Reopening a store with other settings, or featurizing
a checkpoint id with other weights than it was started with, raises :class:`StoreMismatchError`. A crash loses at
most the batch in flight: :meth:`FeatureStore.missing` lists exactly the rows still to compute.

Version history: 1 stored the n × k kernel weights W in ``kernel_weights.npy``; 2 stores ``kernel.npy``.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

STORE_FORMAT = "cliptrace.trak.feature_store"
STORE_VERSION = 2
MANIFEST = "manifest.json"


class StoreMismatchError(ValueError):
    """A store was reopened with settings (or checkpoint weights) other than those it was made with."""


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def settings_differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    """Human-readable ``key: stored -> requested`` lines for every setting that differs."""
    old, new = _flatten(stored), _flatten(requested)
    return [f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file and a rename, so readers never see half a file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp.npy")
    np.save(temporary, array)
    os.replace(temporary, path)


@contextmanager
def create_npy_atomic(path: Path, dtype: np.dtype | str, shape: tuple[int, ...]) -> Iterator[np.memmap]:
    """A new ``.npy`` memory map, filled inside the ``with`` block under a temporary name and renamed to ``path``
    (after a flush) when the block exits without an error; on an error the temporary file is removed."""
    temporary = path.with_name(path.name + ".tmp.npy")
    array = open_memmap(temporary, "w+", dtype, shape)
    try:
        yield array
        array.flush()
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a shared memory map that ``array`` views from this process's resident set.

    The data stays in the file and the OS page cache (written pages are written back as usual) and is paged in
    again on the next access; only the resident-set accounting of this process shrinks. A no-op for arrays in
    RAM, copy-on-write maps (``mode="c"``) and platforms without ``madvise``.
    """
    owner = array
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    if (isinstance(owner, np.memmap) and owner.mode != "c" and isinstance(owner.base, mmap.mmap)
            and hasattr(mmap, "MADV_DONTNEED")):
        owner.base.madvise(mmap.MADV_DONTNEED)


class FeatureStore:
    """Features of one training set under one featurizer setting, for any number of checkpoints.

    Args:
        directory: Where the store lives (created if missing).
        train_size: n, the number of training examples.
        proj_dim: k, the feature dimension.
        settings: JSON-serializable featurizer settings (projection, parameter set, output function).
        dtype: ``"float32"`` (default) or ``"float64"`` for features and loss weights.

    Raises:
        StoreMismatchError: ``directory`` holds a store made with another train size, dimension or settings.
    """

    def __init__(
        self, directory: str | Path, train_size: int, proj_dim: int, settings: dict[str, Any], dtype: str = "float32"
    ) -> None:
        if dtype not in ("float32", "float64"):
            raise ValueError(f"feature store dtype must be 'float32' or 'float64', got {dtype!r}")
        self.directory = Path(directory)
        self.train_size, self.proj_dim, self.dtype = train_size, proj_dim, np.dtype(dtype)
        requested = json.loads(json.dumps({"train_size": train_size, "proj_dim": proj_dim, "dtype": dtype, **settings}))
        manifest_path = self.directory / MANIFEST
        if manifest_path.is_file():
            self._manifest = self._read_manifest(manifest_path)
            differences = settings_differences(self._manifest["settings"], requested)
            if differences:
                raise StoreMismatchError(
                    f"feature store {self.directory} was made with other settings:\n  " + "\n  ".join(differences)
                    + "\nuse another store directory, or the original settings"
                )
        else:
            if self.directory.exists() and any(self.directory.iterdir()):
                raise StoreMismatchError(f"{self.directory} is not empty and holds no {MANIFEST}: not a feature store")
            self.directory.mkdir(parents=True, exist_ok=True)
            self._manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "settings": requested,
                              "checkpoints": {}}
            write_json_atomic(manifest_path, self._manifest)

    @classmethod
    def reopen(cls, directory: str | Path) -> FeatureStore:
        """Open an existing store with the settings it was made with."""
        manifest_path = Path(directory) / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{directory} is not a feature store (no {MANIFEST})")
        settings = dict(cls._read_manifest(manifest_path)["settings"])
        train_size, proj_dim, dtype = (settings.pop(key, None) for key in ("train_size", "proj_dim", "dtype"))
        for key, value in (("train_size", train_size), ("proj_dim", proj_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StoreMismatchError(
                    f"{manifest_path}: settings.{key} must be a non-negative integer, not {value!r}"
                )
        if dtype not in ("float32", "float64"):
            raise StoreMismatchError(f"{manifest_path}: settings.dtype must be 'float32' or 'float64', not {dtype!r}")
        return cls(directory, train_size, proj_dim, settings, dtype=dtype)

    @staticmethod
    def _read_manifest(path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:  # also not UTF-8, nested too deeply, integers too long
            raise StoreMismatchError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            raise StoreMismatchError(f"{path}: not a cliptrace feature store manifest")
        if manifest.get("version") != STORE_VERSION:
            raise StoreMismatchError(
                f"{path}: store version {manifest.get('version')}, this cliptrace reads version {STORE_VERSION}"
            )
        if not isinstance(manifest.get("settings"), dict):
            raise StoreMismatchError(f"{path}: 'settings' must be a JSON object")
        checkpoints = manifest.get("checkpoints")
        if not isinstance(checkpoints, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) for entry in checkpoints.values()
        ):
            raise StoreMismatchError(f"{path}: 'checkpoints' must map each checkpoint id to {{\"fingerprint\": ...}}")
        return manifest

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the store was made with."""
        return self._manifest["settings"]

    def checkpoint_ids(self) -> list[str]:
        """Registered checkpoint ids, in registration order."""
        return list(self._manifest["checkpoints"])

    def _dir(self, checkpoint: str) -> Path:
        if checkpoint not in self._manifest["checkpoints"]:
            raise KeyError(f"checkpoint {checkpoint!r} is not in feature store {self.directory}")
        return self.directory / "checkpoints" / checkpoint

    def add_checkpoint(self, checkpoint: str, fingerprint: str) -> None:
        """Register ``checkpoint`` (or reopen it, checking that its weights are the ones it was started with)."""
        entry = self._manifest["checkpoints"].get(checkpoint)
        if entry is not None:
            if entry["fingerprint"] != fingerprint:
                raise StoreMismatchError(
                    f"checkpoint {checkpoint!r} in {self.directory} was featurized with other weights "
                    f"(fingerprint {entry['fingerprint']}, now {fingerprint})"
                )
            return
        if not checkpoint or "/" in checkpoint or checkpoint.startswith("."):
            raise ValueError(f"invalid checkpoint id {checkpoint!r}")
        folder = self.directory / "checkpoints" / checkpoint
        folder.mkdir(parents=True, exist_ok=True)
        open_memmap(folder / "features.npy", "w+", self.dtype, (self.train_size, self.proj_dim)).flush()
        open_memmap(folder / "loss_weights.npy", "w+", self.dtype, (self.train_size,)).flush()
        open_memmap(folder / "featurized.npy", "w+", np.bool_, (self.train_size,)).flush()
        self._manifest["checkpoints"][checkpoint] = {"fingerprint": fingerprint}
        write_json_atomic(self.directory / MANIFEST, self._manifest)

    def fingerprint(self, checkpoint: str) -> str:
        """The model fingerprint ``checkpoint`` was registered with."""
        self._dir(checkpoint)
        return self._manifest["checkpoints"][checkpoint]["fingerprint"]

    def featurized(self, checkpoint: str) -> np.ndarray:
        """(n,) bool: which training examples have features for ``checkpoint``."""
        return np.array(np.load(self._dir(checkpoint) / "featurized.npy", mmap_mode="r"))

    def missing(self, checkpoint: str) -> np.ndarray:
        """Sorted training indices still to featurize for ``checkpoint``."""
        return np.flatnonzero(~self.featurized(checkpoint))

    def is_complete(self, checkpoint: str) -> bool:
        """True when every training example has features for ``checkpoint``."""
        return bool(self.featurized(checkpoint).all())

    def write(self, checkpoint: str, indices: np.ndarray, features: np.ndarray, loss_weights: np.ndarray) -> None:
        """Store rows ``indices``; the featurized mask is set only after the rows are flushed to disk."""
        folder = self._dir(checkpoint)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.train_size):
            raise IndexError(f"training indices must lie in [0, {self.train_size}); got {indices.min()}..{indices.max()}")
        if features.shape != (indices.size, self.proj_dim) or loss_weights.shape != (indices.size,):
            raise ValueError(f"expected features ({indices.size}, {self.proj_dim}) and loss weights ({indices.size},); "
                             f"got {features.shape} and {loss_weights.shape}")
        for name, rows in (("features.npy", features), ("loss_weights.npy", loss_weights)):
            array = np.load(folder / name, mmap_mode="r+")
            array[indices] = rows
            array.flush()
        mask = np.load(folder / "featurized.npy", mmap_mode="r+")
        mask[indices] = True
        mask.flush()

    def _require_complete(self, checkpoint: str) -> Path:
        folder = self._dir(checkpoint)
        missing = self.missing(checkpoint)
        if missing.size:
            raise ValueError(
                f"checkpoint {checkpoint!r} in {self.directory} is not fully featurized: {missing.size} of "
                f"{self.train_size} examples missing (first: {missing[:5].tolist()})"
            )
        return folder

    def features(self, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
        """``(features (n, k), loss weights (n,))`` of a fully featurized checkpoint (read-only memory maps)."""
        folder = self._require_complete(checkpoint)
        return np.load(folder / "features.npy", mmap_mode="r"), np.load(folder / "loss_weights.npy", mmap_mode="r")

    def save_kernel(self, checkpoint: str, matrix: np.ndarray) -> None:
        """Store the solved kernel matrix of a fully featurized checkpoint (atomically)."""
        folder = self._require_complete(checkpoint)
        save_npy_atomic(folder / "kernel.npy", matrix)

    def kernel(self, checkpoint: str) -> np.ndarray | None:
        """The solved kernel matrix of ``checkpoint`` (read-only memory map), or None when it is not solved."""
        path = self._dir(checkpoint) / "kernel.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None
