"""Atomic writes: a file or directory appears under its final name only once it is complete.

Each writer fills a temporary sibling (same folder, so the final rename stays on one filesystem), flushes it to disk
and renames it over the final name. A crash, a full disk or any error inside leaves the previous version (or
nothing) under the final name and removes the temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory entry's) data to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; it replaces ``path`` when the block completes and is removed otherwise.

    The temporary name ends with ``path``'s suffix, so writers that append one (``np.save``) keep it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    temporary = Path(name)
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
