"""Shared settings of the property-based tests (``test_fuzz_*.py``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hypothesis import HealthCheck, settings

SCALE = int(os.environ.get("CLIPTRACE_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    """Reproducible settings: the same examples on every run, no example database, no deadline (file I/O).

    CLIPTRACE_FUZZ_SCALE=N runs N times as many examples, new ones on every run, for a longer search.
    """
    return settings(
        max_examples=max_examples * SCALE,
        derandomize=SCALE == 1,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh temporary directory per example (pytest's tmp_path is shared by all examples of a test)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)
