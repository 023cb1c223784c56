"""Atomic writes: the mode of what they create, and the temporaries a killed writer leaves."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cliptrace.files import atomic_directory, remove_temporaries, write_json_atomic, write_text_atomic

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_outputs_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    # In a child process, so that this process's umask is left alone.
    result = _run(f"""
        import os
        from cliptrace.files import write_json_atomic
        os.umask({umask:#o})
        write_json_atomic({str(tmp_path / 'atomic.json')!r}, {{"a": 1}})
        with open({str(tmp_path / 'plain.json')!r}, "w") as file:
            file.write("{{}}")
    """)
    assert result.returncode == 0, result.stderr
    plain = stat.S_IMODE((tmp_path / "plain.json").stat().st_mode)
    assert plain == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode) == plain


def test_remove_temporaries_clears_exactly_what_killed_writers_left(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_text_atomic(run / "keep.txt", "kept")
    (run / ".hidden").write_text("a user's dotfile")
    (run / "sub").mkdir()
    (run / "sub" / "notes.tmp.txt").write_text("not ours: no random token")
    write_json_atomic(run / "sub" / "done.json", {"ok": True})
    # Writers killed by SIGKILL inside an atomic file and inside an atomic directory.
    for script in (
        f"""
        import os, signal
        from cliptrace.files import atomic_file
        with atomic_file({str(run / 'sub' / 'features.npy')!r}) as temporary:
            temporary.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        f"""
        import os, signal
        from cliptrace.files import atomic_directory
        with atomic_directory({str(run / 'epoch-0002')!r}) as partial:
            (partial / "model.safetensors").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    ):
        assert _run(script).returncode == -signal.SIGKILL
    left = sorted(path.relative_to(run).as_posix() for path in run.rglob("*"))
    assert any(name.startswith("sub/.features.") for name in left)
    assert "epoch-0002.partial" in left and not (run / "epoch-0002").exists()

    removed = sorted(path.relative_to(run).as_posix() for path in remove_temporaries(run))

    assert len(removed) == 2 and removed[0] == "epoch-0002.partial" and removed[1].startswith("sub/.features.")
    assert sorted(path.relative_to(run).as_posix() for path in run.rglob("*")) == [
        ".hidden", "keep.txt", "sub", "sub/done.json", "sub/notes.tmp.txt"]
    assert remove_temporaries(run) == []


def test_an_error_inside_an_atomic_directory_leaves_the_previous_version(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_directory(target) as partial:
        (partial / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_directory(target) as partial:
        (partial / "weights").write_text("v2 half")
        raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    assert remove_temporaries(tmp_path) == []


def test_remove_temporaries_of_named_outputs_leaves_other_writers_leftovers(tmp_path: Path) -> None:
    for name in (".config.0123456789abcdef.tmp.json", ".lds.0123456789abcdef.tmp.json",
                 ".config.0123456789abcdef.tmp.csv"):
        (tmp_path / name).write_text("half")
    for name in ("model.partial", "store.partial", "sub/model.partial"):
        (tmp_path / name).mkdir(parents=True)

    removed = remove_temporaries(tmp_path, names=("config.json", "model"))

    assert [path.name for path in removed] == [".config.0123456789abcdef.tmp.json", "model.partial"]
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        ".config.0123456789abcdef.tmp.csv", ".lds.0123456789abcdef.tmp.json", "store.partial", "sub",
        "sub/model.partial"]
