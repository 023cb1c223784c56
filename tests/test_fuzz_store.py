"""Property-based tests of the feature store's manifest (:mod:`cliptrace.trak.store`).

Whatever ``STORE/manifest.json`` holds, opening the store gives a usable store or a :class:`StoreMismatchError` that
names the manifest; settings of any JSON shape round trip through the manifest, and a change of one setting is named
by its dotted key; checkpoint ids are refused or round trip with their fingerprints.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from cliptrace.trak.store import (
    MANIFEST,
    STORE_FORMAT,
    STORE_VERSION,
    FeatureStore,
    StoreMismatchError,
    settings_differences,
)
from fuzzing import fuzz, workdir


RESERVED = {"train_size", "proj_dim", "dtype"}  # the store's own settings
# Keys without dots: settings_differences names nested settings by their dotted path.
KEYS = st.text(st.characters(codec="utf-8", exclude_characters="."), min_size=1, max_size=6)
NUMBERS = (st.integers() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False) | st.sampled_from([1e-320, 5e-324, 1.7976931348623157e308, -0.0, 1e22]))
LEAVES = st.none() | st.booleans() | NUMBERS | st.text(max_size=8)
VALUES = st.recursive(
    LEAVES, lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3), max_leaves=12
)
SETTINGS = st.dictionaries(KEYS.filter(lambda key: key not in RESERVED), VALUES, max_size=5)


def json_copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def leaf_paths(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Paths of every setting that is not itself a group of settings (lists are single settings)."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaf_paths(child, (*path, key))
    elif path:
        yield path


# -------------------------------------------------------------------------------------------------- round trips


@fuzz(60)
@given(settings=SETTINGS, train_size=st.integers(0, 5), proj_dim=st.integers(0, 4),
       dtype=st.sampled_from(["float32", "float64"]))
def test_settings_round_trip_through_the_manifest(settings: dict, train_size: int, proj_dim: int, dtype: str) -> None:
    expected = {"train_size": train_size, "proj_dim": proj_dim, "dtype": dtype, **json_copy(settings)}
    with workdir() as root:
        store = FeatureStore(root / "store", train_size, proj_dim, settings, dtype=dtype)
        reopened = FeatureStore.reopen(root / "store")
        assert store.settings == reopened.settings == expected
        assert (reopened.train_size, reopened.proj_dim, reopened.dtype.name) == (train_size, proj_dim, dtype)
        again = FeatureStore(root / "store", train_size, proj_dim, copy.deepcopy(settings), dtype=dtype)
        assert again.settings == expected
        assert settings_differences(reopened.settings, expected) == []


@fuzz(80)
@given(data=st.data(), settings=SETTINGS)
def test_a_changed_setting_is_named_by_its_dotted_key(data: st.DataObject, settings: dict) -> None:
    paths = list(leaf_paths(settings))
    assume(paths)
    path = data.draw(st.sampled_from(paths), label="changed setting")
    parent = changed = copy.deepcopy(settings)
    for key in path[:-1]:
        parent = parent[key]
    old = parent[path[-1]]
    new = data.draw((LEAVES | st.lists(LEAVES, max_size=2)).filter(lambda value: value != old), label="new value")
    parent[path[-1]] = new
    name = ".".join(path)
    differences = settings_differences(settings, changed)
    assert len(differences) == 1 and differences[0].startswith(f"{name}: {old!r} -> {new!r}"), differences
    with workdir() as root:
        FeatureStore(root, 4, 2, settings)
        with pytest.raises(StoreMismatchError) as raised:
            FeatureStore(root, 4, 2, changed)
        assert f"\n  {name}: " in str(raised.value) and str(root) in str(raised.value)


VALID_IDS = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda name: not name.startswith(".")
)
INVALID_IDS = st.sampled_from(["", ".", "..", ".x", "a/b", "/a", "a/", "../x"]) | st.builds(
    lambda head, tail: f"{head}/{tail}", st.text(max_size=4), st.text(max_size=4)
) | VALID_IDS.map(lambda name: "." + name)


def invalid(checkpoint: str) -> bool:
    return not checkpoint or "/" in checkpoint or checkpoint.startswith(".")


@fuzz(40)
@given(calls=st.lists(st.tuples(VALID_IDS | INVALID_IDS, st.sampled_from(["f0", "f1", "ëf"])), max_size=5))
def test_checkpoint_ids_are_refused_or_round_trip(calls: list[tuple[str, str]]) -> None:
    """Invalid ids raise ValueError; others are kept in order with their first fingerprint, through a reopen; a known
    id registered again with other weights raises StoreMismatchError."""
    registered: dict[str, str] = {}
    with workdir() as root:
        store = FeatureStore(root, 3, 2, {"projection": {"seed": 0}})
        for checkpoint, fingerprint in calls:
            if invalid(checkpoint):
                with pytest.raises(ValueError, match="invalid checkpoint id"):
                    store.add_checkpoint(checkpoint, fingerprint)
            elif registered.setdefault(checkpoint, fingerprint) != fingerprint:
                with pytest.raises(StoreMismatchError, match="other weights"):
                    store.add_checkpoint(checkpoint, fingerprint)
            else:
                store.add_checkpoint(checkpoint, fingerprint)
        reopened = FeatureStore.reopen(root)
        assert store.checkpoint_ids() == list(registered)
        assert reopened.checkpoint_ids() == list(registered)  # registration order survives a reopen
        assert {checkpoint: reopened.fingerprint(checkpoint) for checkpoint in registered} == registered
        for checkpoint in registered:
            assert not reopened.featurized(checkpoint).any()
            reopened.add_checkpoint(checkpoint, registered[checkpoint])


# --------------------------------------------------------------------------------------------------- robustness


def open_store(directory: Path) -> Iterator[Callable[[], FeatureStore]]:
    yield lambda: FeatureStore.reopen(directory)
    yield lambda: FeatureStore(directory, 3, 2, {"projection": {"seed": 0}})


def check_opens(directory: Path) -> None:
    """Every way to open the store gives a usable store or a StoreMismatchError that names the manifest."""
    manifest = directory / MANIFEST
    for opener in open_store(directory):
        try:
            store = opener()
        except StoreMismatchError as error:
            if "was made with other settings" in str(error):
                assert str(directory) in str(error)
            else:
                assert str(manifest) in str(error), error
            continue
        assert isinstance(store.settings, dict)
        assert isinstance(store.train_size, int) and isinstance(store.proj_dim, int)
        for checkpoint in store.checkpoint_ids():
            assert isinstance(store.fingerprint(checkpoint), str)
            store.add_checkpoint(checkpoint, store.fingerprint(checkpoint))


def valid_manifest() -> dict:
    return {"format": STORE_FORMAT, "version": STORE_VERSION, "checkpoints": {"ck": {"fingerprint": "abc"}},
            "settings": {"train_size": 3, "proj_dim": 2, "dtype": "float32", "projection": {"seed": 0}}}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["format", "version", "settings", "checkpoints", "train_size", "proj_dim", "dtype",
                         "fingerprint", "ck"]) | st.text(max_size=4), children, max_size=4),
    max_leaves=15,
)
SWAPS = st.sampled_from([None, 0, -1, 2, 1.5, True, "", "x", "float64", "../x", [], {}, [1], {"a": 1}]) | JSON_VALUES


def paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from paths(child, (*path, key))


@st.composite
def changed_manifests(draw: Callable) -> Any:
    """A valid manifest with one to three values dropped or replaced by values of other types."""
    document = valid_manifest()
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(paths(document))))
        if not path:
            document = copy.deepcopy(draw(SWAPS))  # sampled_from shares its values
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(draw(SWAPS))
    return document


@fuzz(200)
@given(content=st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    changed_manifests().map(lambda value: json.dumps(value).encode()),
))
def test_any_manifest_gives_a_store_or_a_mismatch_naming_it(content: bytes) -> None:
    with workdir() as root:
        (root / MANIFEST).write_bytes(content)
        check_opens(root)


def test_a_missing_manifest() -> None:
    with workdir() as root:
        with pytest.raises(FileNotFoundError, match=f"{root} is not a feature store"):
            FeatureStore.reopen(root)
        (root / "other").write_text("x")
        with pytest.raises(StoreMismatchError, match="holds no manifest.json"):
            FeatureStore(root, 3, 2, {})



# ---------------------------------------------------------------------------------------------------- regressions


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
