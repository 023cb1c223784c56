"""Atomic writes: a file or directory appears under its final name only once it is complete.

Each writer fills a temporary sibling (same folder, so the final rename stays on one filesystem), flushes it to disk
and renames it over the final name. A crash, a full disk or any error inside leaves the previous version (or
nothing) under the final name and removes the temporary. A process killed mid-write (SIGKILL) leaves its temporary
behind: :func:`remove_temporaries` clears those, for a caller that holds the directory's lock. Files get the mode
the umask gives (as ``open`` would), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
import secrets
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's contents, read in chunks."""
    with Path(path).open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory entry's) data to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


_TEMPORARY_FILE = re.compile(r"^\..*\.[0-9a-f]{16}\.tmp(\.[^.]*)?$")
_PARTIAL_DIRECTORY = ".partial"


def _new_temporary(path: Path) -> Path:
    """Create an empty, unused hidden sibling of ``path`` (mode from the umask) and return its path."""
    while True:
        temporary = path.with_name(f".{path.stem}.{secrets.token_hex(8)}.tmp{path.suffix}")  # see _temporary_pattern
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return temporary


def remove_temporaries(directory: str | Path, names: Collection[str] | None = None) -> list[Path]:
    """Remove what killed writers left under ``directory`` (atomic-write temporaries, ``.partial`` directories).

    With ``names``, only the leftovers of writes to those final names directly in ``directory`` go (for a
    directory shared with other writers); without, every leftover in the whole tree. Call it only while holding
    the lock that keeps the writers concerned out: a live writer's temporary looks the same. Returns the removed
    paths.
    """
    directory = Path(directory)
    if names is None:
        walk = os.walk(directory)
        is_leftover = lambda name: bool(_TEMPORARY_FILE.match(name)) or name.endswith(_PARTIAL_DIRECTORY)  # noqa: E731
    else:
        top = next(os.walk(directory), (str(directory), [], []))
        walk = iter([top])
        wanted = {_temporary_pattern(Path(name)) for name in names}
        partials = {name + _PARTIAL_DIRECTORY for name in names}
        is_leftover = lambda name: name in partials or any(p.match(name) for p in wanted)  # noqa: E731
    removed = []
    for root, folders, files in walk:
        for name in files:
            if is_leftover(name) and not name.endswith(_PARTIAL_DIRECTORY):
                (Path(root) / name).unlink(missing_ok=True)
                removed.append(Path(root) / name)
        for name in list(folders):
            if name.endswith(_PARTIAL_DIRECTORY) and is_leftover(name):
                shutil.rmtree(Path(root) / name, ignore_errors=True)
                removed.append(Path(root) / name)
                folders.remove(name)
    return sorted(removed)


def _temporary_pattern(path: Path) -> re.Pattern[str]:
    """How :func:`atomic_file` names the temporaries of ``path``."""
    return re.compile(rf"^\.{re.escape(path.stem)}\.[0-9a-f]{{16}}\.tmp{re.escape(path.suffix)}$")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` when the block completes and is removed otherwise.

    The temporary name ends with ``path``'s suffix, so writers that append one (``np.save``) keep it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _new_temporary(path)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    """Write ``data`` as indented UTF-8 JSON to ``path`` (keys sorted unless ``sort_keys`` is False)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    Path(path).write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    """Write ``data`` as :func:`write_json` does, atomically, so readers never see half a file."""
    with atomic_file(path) as temporary:
        write_json(temporary, data, sort_keys)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically."""
    with atomic_file(path) as temporary:
        np.save(temporary, array)


@contextmanager
def create_npy_atomic(path: str | Path, dtype: np.dtype | str, shape: tuple[int, ...]) -> Iterator[np.memmap]:
    """A new ``.npy`` memory map to fill inside the block; it appears as ``path`` only when the block completes."""
    with atomic_file(path) as temporary:
        array = open_memmap(temporary, "w+", dtype, shape)
        yield array
        array.flush()
        del array


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a sibling ``.partial`` directory to fill; it replaces ``directory`` only when the block completes.

    A crash inside the block never leaves a directory that looks finished; an error removes the partial one.
    """
    directory = Path(directory)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(partial, directory)
