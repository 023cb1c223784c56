"""Shared data fixtures: tiny images and tar shards written by the tests themselves."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
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
