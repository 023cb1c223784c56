"""The feature store under concurrent writers, killed writers and a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cliptrace.trak import store as store_module
from cliptrace.trak.store import FeatureStore, StoreBusyError, shard_rows

N, K = 10, 3
SETTINGS = {"featurizer": "test"}


def _store(directory: Path) -> FeatureStore:
    return FeatureStore(directory, N, K, SETTINGS)


def _rows(indices) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices)
    return (indices[:, None] * 10 + np.arange(K)).astype(np.float32), indices.astype(np.float32) / 7


class Holder:
    """A child process that opens the store, claims a checkpoint (or shard) and waits until it is killed."""

    def __init__(self, directory: Path, checkpoint: str, shard: tuple[int, int] | None = None,
                 write: list[int] | None = None) -> None:
        script = textwrap.dedent(f"""
            import sys, numpy as np
            from cliptrace.trak.store import FeatureStore
            store = FeatureStore({str(directory)!r}, {N}, {K}, {SETTINGS!r})
            store.add_checkpoint({checkpoint!r}, "fp")
            store.claim({checkpoint!r}, shard={shard!r})
            rows = np.asarray({write or []!r}, dtype=np.int64)
            if rows.size:
                store.write({checkpoint!r}, rows, (rows[:, None] * 10 + np.arange({K})).astype(np.float32),
                            rows.astype(np.float32) / 7)
            print("claimed", flush=True)
            sys.stdin.read()
        """)
        self.process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": _path()})
        line = self.process.stdout.readline()
        assert line.strip() == "claimed", self.process.stderr.read()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process.stdin.close()
        self.process.stdout.close()
        self.process.stderr.close()


def _path() -> str:
    import cliptrace

    return str(Path(cliptrace.__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")


def test_a_second_writer_fails_fast_naming_the_holder_and_the_store_stays_valid(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    holder = Holder(directory, "ck", write=[0, 1, 2])
    try:
        second = _store(directory)
        second.add_checkpoint("ck", "fp")  # registering the same checkpoint is fine; writing it is not
        features, weights = _rows([5, 6])
        with pytest.raises(StoreBusyError) as caught:
            second.write("ck", np.array([5, 6]), features, weights)
        message = str(caught.value)
        assert "checkpoint 'ck'" in message and str(directory) in message
        assert f"pid {holder.process.pid}" in message and "another process" in message
        assert caught.value.errno == errno.EBUSY
        assert second.missing("ck").tolist() == list(range(3, N))  # nothing of the refused write landed
    finally:
        holder.kill()
    # the holder was killed: its lock died with it, and the rows it wrote are intact
    store = _store(directory)
    features, weights = _rows(range(3, N))
    store.write("ck", np.arange(3, N), features, weights)
    stored, stored_weights = store.features("ck")
    expected, expected_weights = _rows(range(N))
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(stored_weights, expected_weights)


def test_processes_write_disjoint_shards_side_by_side_but_not_the_same_shard(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    first = Holder(directory, "ck", shard=(0, 2), write=list(shard_rows(N, (0, 2))))
    try:
        store = _store(directory)
        with pytest.raises(StoreBusyError, match=r"shard 0 of 2 of checkpoint 'ck'"):
            store.claim("ck", shard=(0, 2))
        with pytest.raises(StoreBusyError, match=r"checkpoint 'ck'"):
            store.claim("ck")  # the whole checkpoint overlaps the held shard
        store.claim("ck", shard=(1, 2))
        with pytest.raises(IndexError, match="outside this process's shard"):
            store.write("ck", np.array([0]), *_rows([0]))
        rows = list(shard_rows(N, (1, 2)))
        store.write("ck", np.array(rows), *_rows(rows))
        assert store.is_complete("ck")
        store.release("ck")
        with pytest.raises(StoreBusyError):  # solving the kernel needs the whole checkpoint
            store.save_kernel("ck", np.eye(K))
    finally:
        first.kill()
    store.save_kernel("ck", np.eye(K))
    np.testing.assert_array_equal(store.features("ck")[0], _rows(range(N))[0])


def test_shards_partition_the_rows_on_aligned_boundaries() -> None:
    for size in (0, 1, 7, 10, 1001):
        for count in (1, 2, 3, 8):
            for align in (1, 4, 5, 16):
                blocks = [shard_rows(size, (index, count), align) for index in range(count)]
                assert [row for block in blocks for row in block] == list(range(size))
                assert all(block.start % align == 0 or block.start == size for block in blocks)
                assert max(map(len, blocks)) - min(map(len, blocks)) <= (1 if align == 1 else 2 * align + 1)
    with pytest.raises(ValueError, match="0 <= index < count"):
        shard_rows(10, (2, 2))


def test_processes_register_checkpoints_concurrently(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    _store(directory)
    script = textwrap.dedent(f"""
        import sys
        from cliptrace.trak.store import FeatureStore
        store = FeatureStore({str(directory)!r}, {N}, {K}, {SETTINGS!r})
        print("ready", flush=True)
        sys.stdin.readline()  # start together
        for i in range(40):
            store.add_checkpoint(f"{{sys.argv[1]}}-{{i}}", "fp")
    """)
    env = {**os.environ, "PYTHONPATH": _path()}
    children = [subprocess.Popen([sys.executable, "-c", script, name], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for name in "abc"]
    assert [child.stdout.readline().strip() for child in children] == ["ready"] * 3
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    assert [child.wait(timeout=120) for child in children] == [0, 0, 0]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert sorted(manifest["checkpoints"]) == sorted(f"{name}-{i}" for name in "abc" for i in range(40))


def test_a_full_disk_while_writing_leaves_the_rows_unmarked_and_a_rerun_resumes(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path / "store")
    store.add_checkpoint("ck", "fp")
    store.write("ck", np.arange(4), *_rows(range(4)))
    real_pwrite, budget = os.pwrite, [50]

    def pwrite(fd: int, data: bytes, offset: int) -> int:  # the disk fills up after 50 more bytes
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = real_pwrite(fd, bytes(data[: budget[0]]), offset)
        budget[0] -= written
        return written

    monkeypatch.setattr(store_module.os, "pwrite", pwrite)
    with pytest.raises(OSError) as caught:
        store.write("ck", np.arange(4, N), *_rows(range(4, N)))
    assert caught.value.errno == errno.ENOSPC
    assert "features.npy: No space left on device while writing 6 rows" in str(caught.value)
    assert "rerunning the same command resumes here" in str(caught.value)
    assert store.missing("ck").tolist() == list(range(4, N))
    monkeypatch.setattr(store_module.os, "pwrite", real_pwrite)  # space was freed
    store.write("ck", store.missing("ck"), *_rows(store.missing("ck")))
    np.testing.assert_array_equal(store.features("ck")[0], _rows(range(N))[0])


def test_a_directory_holding_other_files_is_not_taken_for_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        _store(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_a_store_another_process_creates_meanwhile_is_not_taken_for_a_foreign_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    listing = Path.iterdir
    racing = []

    def create_then_list(path: Path):
        if path == directory and not racing:  # another process creates the store between the two looks
            racing.append(True)
            _store(directory).add_checkpoint("ck", "fp")
        return listing(path)

    monkeypatch.setattr(Path, "iterdir", create_then_list)
    store = _store(directory)
    assert racing and store.checkpoint_ids() == ["ck"]


def test_the_only_writer_clears_what_killed_writers_left(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add_checkpoint("ck", "fp")
    store.release()
    folder = tmp_path / "checkpoints" / "ck"
    left = [folder / ".kernel.0123456789abcdef.tmp.npy", tmp_path / ".manifest.0123456789abcdef.tmp.json"]
    for path in left:
        path.write_bytes(b"half")  # as a writer killed inside an atomic write leaves it
    shard_writer = _store(tmp_path)  # opening the store takes the manifest lock: the manifest's temporary goes
    assert not left[1].exists() and left[0].exists()
    shard_writer.claim("ck", shard=(0, 2))  # a shard writer shares the folder with others: it leaves it
    assert left[0].exists()
    shard_writer.release()
    _store(tmp_path).claim("ck")
    assert not left[0].exists()
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith(".")) == []
