"""The feature store's manifest: whatever STORE/manifest.json holds, opening the store gives a usable store or a
StoreMismatchError that names the manifest."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cliptrace.trak.store import MANIFEST, STORE_FORMAT, STORE_VERSION, FeatureStore, StoreMismatchError


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A fresh temporary directory per example (pytest's tmp_path is shared by all examples of a test)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def open_store(directory: Path) -> Iterator[Callable[[], FeatureStore]]:
    yield lambda: FeatureStore.reopen(directory)
    yield lambda: FeatureStore(directory, 3, 2, {"projection": {"seed": 0}})


def valid_manifest() -> dict:
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "checkpoints": {"ck": {"fingerprint": "abc"}},
            "settings": {"train_size": 3, "proj_dim": 2, "dtype": "float32", "projection": {"seed": 0}}}


def manifest_with(**changes: Any) -> bytes:
    manifest = valid_manifest()
    for dotted, value in changes.items():
        parent, *keys = [manifest, *dotted.split("__")]
        for key in keys[:-1]:
            parent = parent[key]
        if value is DROP:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
    return json.dumps(manifest).encode()


DROP = object()


BROKEN_MANIFESTS = {  # what came out before, of FeatureStore(...) and of reopen
    "not UTF-8": b"\x80{}",  # UnicodeDecodeError
    "nested too deeply": b"[" * 100_000,  # RecursionError
    "null": b"null",  # AttributeError
    "a list": b"[]",  # AttributeError
    "no settings": manifest_with(settings=DROP),  # KeyError
    "settings a list": manifest_with(settings=[]),  # TypeError, ValueError
    "no checkpoints": manifest_with(checkpoints=DROP),  # KeyError on checkpoint_ids()
    "checkpoint without a fingerprint": manifest_with(checkpoints={"ck": {}}),  # KeyError on add_checkpoint
    "checkpoint entry a string": manifest_with(checkpoints={"ck": "abc"}),  # TypeError on add_checkpoint
}


BROKEN_SETTINGS = {  # reopen only: FeatureStore(...) reports these as settings that differ from the ones it is given
    "no train_size": manifest_with(settings__train_size=DROP),  # KeyError
    "train_size a string": manifest_with(settings__train_size="3"),  # a store of '3' examples
    "dtype not a float type": manifest_with(settings__dtype="int8"),  # ValueError not naming the manifest
}


@pytest.mark.parametrize("case", sorted(BROKEN_MANIFESTS) + sorted(BROKEN_SETTINGS))
def test_broken_manifests_raise_store_mismatch_naming_the_manifest(case: str) -> None:
    content = BROKEN_MANIFESTS.get(case) or BROKEN_SETTINGS[case]
    with workdir() as root:
        (root / MANIFEST).write_bytes(content)
        openers = list(open_store(root)) if case in BROKEN_MANIFESTS else [lambda: FeatureStore.reopen(root)]
        for opener in openers:
            with pytest.raises(StoreMismatchError, match=re.escape(f"{root / MANIFEST}: ")):
                opener()
