"""Advisory file locks that name their holder: who is writing a store, a checkpoint or a run directory."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class FileLock:
    """An ``flock`` on a file, shared or exclusive; released by :meth:`release`, when this object is collected, or
    when the process dies (also by SIGKILL), so a crash never leaves a stale lock.

    An exclusive holder writes ``pid P on HOST`` into the file (and clears it on release) for error messages.

    Raises:
        BlockingIOError: ``wait`` is False and another process holds a conflicting lock.
    """

    def __init__(self, path: Path, exclusive: bool, wait: bool = False) -> None:
        self._file = open(path, "a+b")  # noqa: SIM115 - held open for the lifetime of the lock
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._file.fileno(), flags)
        except BaseException:
            self._file.close()
            raise
        self._exclusive = exclusive
        if exclusive:
            os.ftruncate(self._file.fileno(), 0)
            os.pwrite(self._file.fileno(), f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)

    @staticmethod
    def holder(path: Path) -> str:
        """What the current exclusive holder of ``path`` wrote about itself (empty when unknown)."""
        try:
            return path.read_text(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._file.closed:
            return
        if self._exclusive:
            os.ftruncate(self._file.fileno(), 0)
        self._file.close()


def holder_note(lock: Path) -> str:
    """`` (pid P on HOST)`` for the holder of ``lock``, or an empty string when it is unknown."""
    holder = FileLock.holder(lock)
    return f" ({holder})" if holder else ""
