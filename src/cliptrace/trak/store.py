"""The on-disk feature store: per checkpoint, TRAK features, loss weights and a per-example "featurized" mask.

Layout (``.npy`` files: rows written in place, read as memory maps, no dependency beyond numpy, readable by any
tool)::

    STORE/manifest.json                      versioned; settings; checkpoints and their model fingerprints
    STORE/manifest.lock                      serializes registering checkpoints
    STORE/checkpoints/ID/features.npy        (n, k) float32 (or float64), rows written as batches finish
    STORE/checkpoints/ID/loss_weights.npy    (n,)   same dtype
    STORE/checkpoints/ID/featurized.npy      (n,)   bool, set only after the rows it covers are flushed
    STORE/checkpoints/ID/kernel.npy          the solved kernel, written once all rows are done:
                                             (k, k) lower Cholesky factor of XᵀX + λI when k ≤ n,
                                             (n, k) W = (XXᵀ + λI)⁻¹X when k > n (see cliptrace.trak.scoring)
    STORE/checkpoints/ID/kernel.json         how its ridge term was set (the request and the λ used), written
                                             after kernel.npy: a kernel without it is solved again
    STORE/checkpoints/ID/writer.lock         held by the writer of the checkpoint (shared by shard writers)
    STORE/checkpoints/ID/shard-R-of-W.lock   held by the writer of one shard

The manifest is replaced atomically (write, fsync, rename); rows are flushed before the mask marks them; a
second writer of the same rows fails at once with :class:`StoreBusyError`. Reopening a store with other settings,
or featurizing a checkpoint id with other weights than it was started with, raises :class:`StoreMismatchError`. A
crash (or a full disk) loses at most the batch in flight: :meth:`FeatureStore.missing` lists exactly the rows still
to compute.

Files damaged behind the store's back are found when they are read: every ``.npy`` header must give the shape and
dtype the store expects and the file must be as long as its header says (checked whenever the mask is read), and
the rows :meth:`FeatureStore.features` and the matrix :meth:`FeatureStore.kernel` return must be finite. A damaged
row file is repaired by marking the rows it lost (or all of them) as not featurized and restoring the file's
layout, a damaged kernel by removing it; then :class:`StoreDamagedError` names the file, so rerunning the command
that featurized the checkpoint recomputes exactly the lost rows and solves the kernel again.

Version history: 1 stored the n × k kernel weights W in ``kernel_weights.npy``; 2 stores ``kernel.npy``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from cliptrace.files import create_npy_atomic, remove_temporaries, save_npy_atomic, write_json_atomic
from cliptrace.locks import FileLock, holder_note

STORE_FORMAT = "cliptrace.trak.feature_store"
STORE_VERSION = 2
MANIFEST = "manifest.json"
MANIFEST_LOCK = "manifest.lock"


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


Shard = tuple[int, int]


class NonFiniteFeaturesError(ValueError):
    """Features or loss weights of some examples are NaN or infinite; ``rows`` holds their indices."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows


class StoreDamagedError(ValueError):
    """A file of a feature store is missing, truncated, of another shape or dtype, or holds NaN or infinite values.

    ``rows`` holds the indices whose features were lost: they are marked as not featurized (so rerunning the
    command that featurized them recomputes exactly those rows); it is empty when only the kernel was damaged.
    """

    def __init__(self, message: str, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = [int(row) for row in rows]


class StoreBusyError(OSError):
    """Another process is writing the same rows of a feature store (or finalizing the checkpoint)."""

    def __str__(self) -> str:
        return str(self.strerror)


def shard_rows(size: int, shard: Shard, align: int = 1) -> range:
    """The contiguous block of ``size`` rows that ``shard = (index, count)`` owns.

    Blocks differ by at most one row, or, with ``align``, every boundary between blocks is moved to the nearest
    multiple of ``align`` (so a block of ``align`` rows, e.g. a batch, never straddles two shards; blocks then
    differ by at most ``2·align + 1`` rows, and some may be empty when ``size`` is small).
    """
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard}")
    if align < 1:
        raise ValueError(f"align must be at least 1, got {align}")

    def boundary(position: int) -> int:
        return size if position == count else min(size, (size * position // count + align // 2) // align * align)

    return range(boundary(index), boundary(index + 1))


def _busy(what: str, lock: Path) -> StoreBusyError:
    return StoreBusyError(errno.EBUSY, f"{what} is being written by another process{holder_note(lock)}; "
                                       "wait for it to finish, or use another store directory")


def _npy_header(path: Path, c_order: bool = True) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, offset of the data)`` of the ``.npy`` file ``path`` (in C order unless not ``c_order``).

    Raises:
        ValueError: The file has no valid ``.npy`` header (the message does not name the file).
    """
    with open(path, "rb") as file:
        major, _ = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(file)
        if fortran_order and c_order:
            raise ValueError("the array is stored in Fortran order, rows are written in C order")
        return shape, dtype, file.tell()


@dataclass(frozen=True)
class _Damage:
    """What is wrong with one ``.npy`` file of a checkpoint, and how to repair it."""

    path: Path
    problem: str
    lost: range  # the rows whose values are gone
    size: int | None  # the length to extend the file to; None when it must be made anew


def _inspect(path: Path, shape: tuple[int, ...], dtypes: Sequence[np.dtype], c_order: bool = True) -> _Damage | None:
    """The damage of the ``.npy`` file ``path`` that should hold an array ``shape`` of one of ``dtypes``, if any."""
    everything = range(shape[0])
    try:
        found_shape, found_dtype, offset = _npy_header(path, c_order)
    except FileNotFoundError:
        return _Damage(path, "the file is missing", everything, None)
    except ValueError as error:
        return _Damage(path, f"not a .npy array ({error})", everything, None)
    if found_shape != shape or found_dtype not in dtypes:
        return _Damage(path, f"holds a {found_dtype} array of shape {found_shape}, the store expects "
                             f"{' or '.join(map(str, dtypes))} of shape {shape}", everything, None)
    row_bytes = found_dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    size, expected = path.stat().st_size, offset + row_bytes * shape[0]
    if size >= expected:
        return None
    first_lost = (size - offset) // row_bytes if row_bytes else 0
    return _Damage(path, f"truncated: {size} bytes, its header needs {expected}", range(first_lost, shape[0]),
                   expected)


def _describe_rows(rows: Sequence[int], total: int) -> str:
    """``"3 of 40 rows (index 3, 5, 9)"``, at most five indices shown."""
    shown = ", ".join(str(int(row)) for row in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return f"{len(rows)} of {total} rows (index {shown})"


def _non_finite_rows(features: np.ndarray, loss_weights: np.ndarray, block_bytes: int = 1 << 26) -> np.ndarray:
    """Sorted indices of the rows whose features or loss weight are NaN or infinite, read in blocks."""
    step = max(1, block_bytes // max(1, features.itemsize * features.shape[1]))
    bad = [start + np.flatnonzero(~(np.isfinite(features[start : start + step]).all(axis=1)
                                    & np.isfinite(loss_weights[start : start + step])))
           for start in range(0, features.shape[0], step)]
    release_pages(features)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def _write_rows(path: Path, indices: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows[j]`` into row ``indices[j]`` of the ``.npy`` file ``path`` in place, then flush it to disk.

    Plain positioned writes, not a memory map: a full disk raises ``OSError`` (a memory map would kill the process
    with SIGBUS), and processes on other hosts of a shared filesystem only ever touch their own bytes.
    """
    try:
        shape, dtype, offset = _npy_header(path)
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        with open(path, "r+b") as file:
            order = np.argsort(indices, kind="stable")
            ordered = indices[order]
            breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
            for run in np.split(np.arange(ordered.size), breaks):
                if not run.size:
                    continue
                data = memoryview(np.ascontiguousarray(rows[order[run]], dtype=dtype).tobytes())
                position = offset + int(ordered[run[0]]) * row_bytes
                while data:
                    written = os.pwrite(file.fileno(), data, position)
                    data, position = data[written:], position + written
            os.fsync(file.fileno())
    except OSError as error:
        raise type(error)(error.errno, f"{path}: {error.strerror} while writing {indices.size} rows; they are not "
                                       "marked as done, so rerunning the same command resumes here") from None
    except ValueError as error:
        raise StoreDamagedError(f"{path}: not a .npy array ({error})") from None


@dataclass
class _Claim:
    """What a store instance holds to write a checkpoint: the rows it may write and the locks that reserve them."""

    shard: Shard | None
    rows: range
    locks: list[FileLock]


class FeatureStore:
    """Features of one training set under one featurizer setting, for any number of checkpoints.

    Writers are exclusive per checkpoint: the first :meth:`write` (or :meth:`claim`) of a checkpoint locks it for
    this instance, and a second process writing it gets a :class:`StoreBusyError` at once. Processes may instead
    claim disjoint shards of one checkpoint (``claim(checkpoint, shard=(rank, world))``) and write them side by side;
    solving the kernel needs the whole checkpoint. Locks are ``flock`` locks, released by :meth:`release`, when the
    instance is collected, or when its process dies. Registering checkpoints is serialized by a lock on the manifest, so several
    processes may add checkpoints to one store.

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
        self._claims: dict[str, _Claim] = {}
        self._finite: dict[str, tuple[tuple[int, int], ...]] = {}  # checkpoint -> (mtime_ns, size) of checked files
        requested = json.loads(json.dumps({"train_size": train_size, "proj_dim": proj_dim, "dtype": dtype, **settings}))
        manifest_path = self.directory / MANIFEST
        self._check_is_store()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._manifest_lock():
            self._check_is_store()
            if manifest_path.is_file():
                self._manifest = self._read_manifest(manifest_path)
                differences = settings_differences(self._manifest["settings"], requested)
                if differences:
                    raise StoreMismatchError(
                        f"feature store {self.directory} was made with other settings:\n  "
                        + "\n  ".join(differences) + "\nuse another store directory, or the original settings"
                    )
            else:
                self._manifest = {"format": STORE_FORMAT, "version": STORE_VERSION, "settings": requested,
                                  "checkpoints": {}}
                write_json_atomic(manifest_path, self._manifest, sort_keys=False)

    def _check_is_store(self) -> None:
        """Refuse an existing directory that holds other things than a store (or a store being created) does."""
        if not self.directory.is_dir() or (self.directory / MANIFEST).is_file():
            return
        # the manifest lock, and a temporary manifest that a process killed while creating the store left behind;
        # anything else is written only once the manifest is, so look for the manifest again after listing (another
        # process may have created the store meanwhile)
        if any(path.name != MANIFEST_LOCK and not path.name.startswith(".manifest.")
               for path in self.directory.iterdir()) and not (self.directory / MANIFEST).is_file():
            raise StoreMismatchError(f"{self.directory} is not empty and holds no {MANIFEST}: not a feature store")

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        """Hold the store's manifest lock (waiting for it) for the length of the block; the temporary manifests of
        killed writers go first."""
        lock = FileLock(self.directory / MANIFEST_LOCK, exclusive=True, wait=True)
        try:
            remove_temporaries(self.directory, names=(MANIFEST,))
            yield
        finally:
            lock.release()

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
        """Registered checkpoint ids, in registration order (including those other processes registered)."""
        self._manifest = self._read_manifest(self.directory / MANIFEST)
        return list(self._manifest["checkpoints"])

    def _dir(self, checkpoint: str) -> Path:
        if checkpoint not in self._manifest["checkpoints"]:
            self._manifest = self._read_manifest(self.directory / MANIFEST)
        if checkpoint not in self._manifest["checkpoints"]:
            raise KeyError(f"checkpoint {checkpoint!r} is not in feature store {self.directory}")
        return self.directory / "checkpoints" / checkpoint

    def add_checkpoint(self, checkpoint: str, fingerprint: str) -> None:
        """Register ``checkpoint`` (or reopen it, checking that its weights are the ones it was started with)."""
        with self._manifest_lock():
            self._manifest = self._read_manifest(self.directory / MANIFEST)
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
            for name, (shape, dtype) in self._row_files().items():
                open_memmap(folder / name, "w+", dtype, shape).flush()  # sparse: no disk used before rows arrive
            self._manifest["checkpoints"][checkpoint] = {"fingerprint": fingerprint}
            write_json_atomic(self.directory / MANIFEST, self._manifest, sort_keys=False)

    def fingerprint(self, checkpoint: str) -> str:
        """The model fingerprint ``checkpoint`` was registered with."""
        self._dir(checkpoint)
        return self._manifest["checkpoints"][checkpoint]["fingerprint"]

    # -- writing ---------------------------------------------------------------------------------------------

    def claim(self, checkpoint: str, shard: Shard | None = None, align: int = 1) -> range:
        """Reserve ``checkpoint`` (or one shard of its rows, see :func:`shard_rows`) for writing by this instance.

        Every process writing shards of one checkpoint must pass the same ``align``. Returns the rows claimed.

        Raises:
            StoreBusyError: Another process holds the checkpoint, or the same shard, or (for a whole-checkpoint
                claim) any shard of it.
            ValueError: This instance already holds the checkpoint under another shard.
        """
        folder = self._dir(checkpoint)
        rows = range(self.train_size) if shard is None else shard_rows(self.train_size, shard, align)
        held = self._claims.get(checkpoint)
        if held is not None:
            if held.rows != rows:
                raise ValueError(f"checkpoint {checkpoint!r} is already claimed as shard {held.shard} "
                                 f"(rows {held.rows.start}..{held.rows.stop - 1}), not {shard}")
            return rows
        name = f"checkpoint {checkpoint!r} of feature store {self.directory}"
        writer = folder / "writer.lock"
        try:
            locks = [FileLock(writer, exclusive=shard is None)]
        except BlockingIOError:
            raise _busy(name, writer) from None
        if shard is not None:
            lock = folder / f"shard-{shard[0]}-of-{shard[1]}.lock"
            try:
                locks.append(FileLock(lock, exclusive=True))
            except BlockingIOError:
                locks[0].release()
                raise _busy(f"shard {shard[0]} of {shard[1]} of {name}", lock) from None
        else:  # the only writer of the checkpoint: what killed writers left in its folder goes
            remove_temporaries(folder)
        self._claims[checkpoint] = _Claim(shard, rows, locks)
        return rows

    def release(self, checkpoint: str | None = None) -> None:
        """Give up the claim on ``checkpoint`` (every claim when None)."""
        for name in [checkpoint] if checkpoint is not None else list(self._claims):
            claim = self._claims.pop(name, None)
            for lock in claim.locks if claim is not None else ():
                lock.release()

    # -- checking what is read -------------------------------------------------------------------------------

    def _row_files(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of each per-row file of a checkpoint."""
        n = self.train_size
        return {"features.npy": ((n, self.proj_dim), self.dtype), "loss_weights.npy": ((n,), self.dtype),
                "featurized.npy": ((n,), np.dtype(np.bool_))}

    @contextmanager
    def _repairing(self, checkpoint: str, damage: str, rows: Sequence[int]) -> Iterator[None]:
        """Hold the whole ``checkpoint`` for the block (claiming it unless this instance holds it already).

        Raises:
            StoreDamagedError: Naming ``damage``, when the checkpoint cannot be held to repair it.
        """
        held = self._claims.get(checkpoint)
        if held is not None and held.shard is not None:
            raise StoreDamagedError(f"{damage}; repairing it needs the whole checkpoint: rerun the command in one "
                                    "process", rows)
        if held is None:
            try:
                self.claim(checkpoint)
            except StoreBusyError as error:
                raise StoreDamagedError(f"{damage}; it is not repaired, as {error}", rows) from None
        try:
            yield
        finally:
            if held is None:
                self.release(checkpoint)

    def _unmark(self, folder: Path, rows: np.ndarray) -> None:
        """Remove the kernel solved from ``folder``'s rows, then mark ``rows`` as not featurized."""
        (folder / "kernel.npy").unlink(missing_ok=True)
        _write_rows(folder / "featurized.npy", rows, np.zeros(rows.size, dtype=np.bool_))

    def _restore(self, damage: _Damage) -> None:
        """Give a damaged row file its layout back: extended with zeros past a cut, or made anew (all zeros)."""
        shape, dtype = self._row_files()[damage.path.name]
        if damage.size is not None:
            os.truncate(damage.path, damage.size)
            return
        with create_npy_atomic(damage.path, dtype, shape):
            pass  # a sparse file of zeros (for the mask: nothing featurized)

    def _check_files(self, checkpoint: str) -> None:
        """Check the layout of the checkpoint's row files; repair damaged ones (see the module notes).

        Raises:
            StoreDamagedError: A file was damaged (and is now repaired, its lost rows marked as not featurized).
        """
        folder = self._dir(checkpoint)
        damages = [damage for name, (shape, dtype) in self._row_files().items()
                   if (damage := _inspect(folder / name, shape, (dtype,))) is not None]
        if not damages:
            return
        lost = np.array(sorted(set().union(*(damage.lost for damage in damages))), dtype=np.int64)
        first = damages[0]
        message = f"{first.path}: {first.problem}" + "".join(f"; {damage.path.name}: {damage.problem}"
                                                             for damage in damages[1:])
        with self._repairing(checkpoint, message, lost):
            # The mask first, so that a crash while repairing never leaves a row marked whose values are gone.
            (folder / "kernel.npy").unlink(missing_ok=True)
            mask = [damage for damage in damages if damage.path.name == "featurized.npy"]
            for damage in mask:
                self._restore(damage)
            self._unmark(folder, lost)
            for damage in damages:
                if damage not in mask:
                    self._restore(damage)
        raise StoreDamagedError(f"{message}; {_describe_rows(lost, self.train_size)} are lost and marked as not "
                                "featurized: rerun the same command to recompute them", lost)

    def featurized(self, checkpoint: str) -> np.ndarray:
        """(n,) bool: which training examples have features for ``checkpoint``.

        Raises:
            StoreDamagedError: A file of the checkpoint was damaged; its lost rows are now marked as not
                featurized (see the module notes).
        """
        self._check_files(checkpoint)
        return np.array(np.load(self._dir(checkpoint) / "featurized.npy", mmap_mode="r"))

    def missing(self, checkpoint: str, rows: range | None = None) -> np.ndarray:
        """Sorted training indices still to featurize for ``checkpoint`` (only those in ``rows`` when given)."""
        missing = np.flatnonzero(~self.featurized(checkpoint))
        if rows is None:
            return missing
        return missing[(missing >= rows.start) & (missing < rows.stop)]

    def is_complete(self, checkpoint: str) -> bool:
        """True when every training example has features for ``checkpoint``."""
        return bool(self.featurized(checkpoint).all())

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """``indices`` as a flat int64 array, checked to be training indices of this store.

        Raises:
            IndexError: An index lies outside ``[0, train_size)``.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.train_size):
            raise IndexError(f"training indices must lie in [0, {self.train_size}); "
                             f"got {indices.min()}..{indices.max()}")
        return indices

    def write(self, checkpoint: str, indices: np.ndarray, features: np.ndarray, loss_weights: np.ndarray) -> None:
        """Store rows ``indices`` (claiming the whole checkpoint first unless this instance holds a claim).

        The rows are flushed to disk before the featurized mask marks them, so a crash or a full disk at any point
        leaves them unmarked, to be computed again.

        Raises:
            NonFiniteFeaturesError: Some rows are NaN or infinite (nothing is written).
            StoreBusyError: Another process is writing the checkpoint (see :meth:`claim`).
            OSError: Writing failed (e.g. the disk is full); the rows stay unmarked.
        """
        folder = self._dir(checkpoint)
        indices = self.rows(indices)
        if features.shape != (indices.size, self.proj_dim) or loss_weights.shape != (indices.size,):
            raise ValueError(f"expected features ({indices.size}, {self.proj_dim}) and loss weights ({indices.size},); "
                             f"got {features.shape} and {loss_weights.shape}")
        finite = np.isfinite(features).all(axis=1) & np.isfinite(loss_weights)
        if not finite.all():
            rows = indices[~finite].tolist()
            raise NonFiniteFeaturesError(
                f"features of example(s) {rows[:5]}{' ...' if len(rows) > 5 else ''} under checkpoint {checkpoint!r} "
                "are NaN or infinite (the model output or its gradient overflowed for them); nothing of this batch "
                "was stored", rows)
        if checkpoint not in self._claims:
            self.claim(checkpoint)
        rows = self._claims[checkpoint].rows
        outside = indices[(indices < rows.start) | (indices >= rows.stop)]
        if outside.size:
            raise IndexError(f"rows {outside[:5].tolist()} lie outside this process's shard "
                             f"{self._claims[checkpoint].shard} (rows {rows.start}..{rows.stop - 1})")
        _write_rows(folder / "features.npy", indices, features)
        _write_rows(folder / "loss_weights.npy", indices, loss_weights)
        _write_rows(folder / "featurized.npy", indices, np.ones(indices.size, dtype=np.bool_))

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
        """``(features (n, k), loss weights (n,))`` of a fully featurized checkpoint (read-only memory maps).

        The rows are checked for NaN and infinite values once per instance, and again when the files change.

        Raises:
            StoreDamagedError: A file is damaged, or some rows are NaN or infinite; those rows are now marked as
                not featurized (see the module notes).
        """
        folder = self._require_complete(checkpoint)
        features = np.load(folder / "features.npy", mmap_mode="r")
        loss_weights = np.load(folder / "loss_weights.npy", mmap_mode="r")
        stamp = tuple((stat.st_mtime_ns, stat.st_size) for stat in
                      ((folder / name).stat() for name in ("features.npy", "loss_weights.npy")))
        if self._finite.get(checkpoint) == stamp:  # checked by this instance and unchanged since: read once
            return features, loss_weights
        bad = _non_finite_rows(features, loss_weights)
        if bad.size:
            name = "features.npy" if not np.isfinite(features[bad]).all() else "loss_weights.npy"
            message = f"{folder / name}: {_describe_rows(bad, self.train_size)} are NaN or infinite"
            with self._repairing(checkpoint, message, bad):
                self._unmark(folder, bad)
            raise StoreDamagedError(f"{message}; they are marked as not featurized: rerun the same command to "
                                    "recompute them", bad)
        self._finite[checkpoint] = stamp
        return features, loss_weights

    def save_kernel(self, checkpoint: str, matrix: np.ndarray, info: dict[str, Any] | None = None) -> None:
        """Store the solved kernel matrix of a fully featurized checkpoint (atomically), with ``info``: how its
        ridge term was set (the request under ``"request"``, the λ used under ``"lambda_reg"``).

        Raises:
            StoreBusyError: Another process holds the checkpoint or a shard of it.
            ValueError: This instance holds only a shard of it (release it first), or rows are missing.
        """
        folder = self._require_complete(checkpoint)
        held = self._claims.get(checkpoint)
        if held is not None and held.shard is not None:
            raise ValueError(f"this process holds shard {held.shard} of checkpoint {checkpoint!r}: release it "
                             "before solving the kernel, which needs the whole checkpoint")
        if held is None:
            self.claim(checkpoint)
        try:
            (folder / "kernel.json").unlink(missing_ok=True)  # a kernel.npy without it is never taken as solved
            save_npy_atomic(folder / "kernel.npy", matrix)
            write_json_atomic(folder / "kernel.json", info or {})
        finally:
            if held is None:
                self.release(checkpoint)

    def kernel_info(self, checkpoint: str) -> dict[str, Any] | None:
        """What :meth:`save_kernel` stored beside the kernel of ``checkpoint``; None when it is not solved."""
        path = self._dir(checkpoint) / "kernel.json"
        if not (path.is_file() and (self._dir(checkpoint) / "kernel.npy").is_file()):
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a damaged note: the kernel is solved again
        return info if isinstance(info, dict) else None

    def kernel(self, checkpoint: str, request: dict[str, Any] | None = None) -> np.ndarray | None:
        """The solved kernel matrix of ``checkpoint`` (read-only memory map), or None when it is not solved (or,
        with ``request``, solved for another ridge-term request than ``request``).

        Raises:
            StoreDamagedError: The kernel file is damaged or not finite; it is now removed, to be solved again.
        """
        path = self._dir(checkpoint) / "kernel.npy"
        info = self.kernel_info(checkpoint)
        if info is None or (request is not None and info.get("request") != request):
            return None
        n, k = self.train_size, self.proj_dim
        damage = _inspect(path, (k, k) if k <= n else (n, k), (np.dtype(np.float32), np.dtype(np.float64)),
                          c_order=False)
        matrix = np.load(path, mmap_mode="r") if damage is None else None
        if matrix is not None and np.isfinite(matrix).all():
            return matrix
        message = f"{path}: {damage.problem if damage is not None else 'holds NaN or infinite values'}"
        with self._repairing(checkpoint, message, ()):
            path.unlink(missing_ok=True)
        raise StoreDamagedError(f"{message}; it is removed: rerun the same command to solve it again")

