"""Shared data fixtures (tiny images and tar shards written by the tests themselves), and the rule that open_clip
tests may not skip where open_clip is required."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image


def _encode(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6), format: str = "PNG") -> bytes:
    """The encoded bytes of a single-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """Encode a single-colour image: ``image_bytes(color=(r, g, b), size=(w, h), format="PNG")``."""
    return _encode


@pytest.fixture
def write_image() -> Callable[..., bytes]:
    """Write a single-colour image (format from the suffix) creating its directory; return the bytes written."""

    def write(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 6)) -> bytes:
        formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
        data = _encode(color, size, formats[path.suffix.lower()])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    return write


@pytest.fixture
def write_tar() -> Callable[[Path, dict[str, bytes]], Path]:
    """Write an uncompressed tar shard holding ``members`` (name -> bytes) in the given order."""

    def write(path: Path, members: dict[str, bytes]) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return write


# --- the open_clip environment ----------------------------------------------------------------------------------
# `make test` runs the tests marked open_clip a second time in .venv-openclip with CLIPTRACE_REQUIRE_OPEN_CLIP=1:
# there a skipped open_clip test (open_clip failed to import, or anything else) is a failure, not a quiet pass.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Report a skipped open_clip test as failed when ``CLIPTRACE_REQUIRE_OPEN_CLIP=1``."""
    outcome = yield
    report = outcome.get_result()
    required = os.environ.get("CLIPTRACE_REQUIRE_OPEN_CLIP") == "1"
    if required and report.skipped and item.get_closest_marker("open_clip"):
        report.outcome = "failed"
        report.longrepr = f"skipped where open_clip is required (CLIPTRACE_REQUIRE_OPEN_CLIP=1): {report.longrepr}"
