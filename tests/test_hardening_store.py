"""Damaged feature stores, stale report caches and ``eval RUN``: named in one line, repaired by a rerun."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cliptrace.trak.settings import AttributionSettings
from cliptrace.cli import app
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import HFCLIP, train_tokenizer
from cliptrace.trak import store as store_module
from cliptrace.trak.store import FeatureStore, StoreDamagedError

OPTIONS = ["--proj-dim", "16", "--bank-size", "16", "--batch-size", "8", "--no-progress",
           "--parameter", "model.visual_projection.*", "--parameter", "model.text_projection.*"]
CHECKPOINT = "model"  # a model directory is a one-checkpoint ensemble named after the directory


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained tiny CLIP, a 40-image shapes world, a complete store and the scores of that store."""
    root = tmp_path_factory.mktemp("store_world")
    data = generate_shapes_world(root / "data", n_images=40, image_size=32, seed=0)
    captions = [caption for record in load_records(data) for caption in record.captions]
    model = HFCLIP.from_preset("tiny", train_tokenizer(captions, vocab_size=300, context_length=24), image_size=32,
                               seed=0)
    model.save(root / CHECKPOINT)
    paths = {"root": root, "data": data, "model": root / CHECKPOINT, "store": root / "store"}
    _ok("trak", "score", paths["model"], data, "--store", paths["store"], "--out", root / "clean", *OPTIONS)
    return paths


def _invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _ok(*args: object) -> str:
    code, output = _invoke(*args)
    assert code == 0, output
    return output


def _error(*args: object) -> str:
    """The one-line error of a command that must fail."""
    code, output = _invoke(*args)
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return " ".join(output.split())


def _store_copy(world: dict[str, Path], tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    return store


def _score(world: dict[str, Path], store: Path, out: Path) -> tuple[int, str]:
    return _invoke("trak", "score", world["model"], world["data"], "--store", store, "--out", out, *OPTIONS)


def _assert_clean_scores(world: dict[str, Path], store: Path, out: Path) -> None:
    """Scoring ``store`` now gives the scores and top-k tables of the undamaged store."""
    code, output = _score(world, store, out)
    assert code == 0, output
    clean = world["root"] / "clean"
    np.testing.assert_allclose(np.load(out / "scores.npy"), np.load(clean / "scores.npy"), rtol=1e-4, atol=1e-5)
    assert [row.split(",")[:7] for row in (out / "topk.csv").read_text().splitlines()] == \
        [row.split(",")[:7] for row in (clean / "topk.csv").read_text().splitlines()]


def _train_ids(world: dict[str, Path]) -> list[str]:
    return [record.id for record in select_split(load_records(world["data"]), "train")]


def _cut(path: Path, keep: float) -> int:
    """Cut ``path`` after its header and ``keep`` of its data; return the first row whose bytes are incomplete."""
    with open(path, "rb") as file:
        np.lib.format.read_magic(file)
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        offset = file.tell()
    size = offset + int((path.stat().st_size - offset) * keep)
    os.truncate(path, size)
    row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
    return (size - offset) // row_bytes


@pytest.mark.parametrize("name", ["features.npy", "loss_weights.npy", "featurized.npy"])
def test_a_truncated_row_file_is_named_and_the_rerun_recomputes_the_lost_rows(world, tmp_path, name) -> None:
    store = _store_copy(world, tmp_path)
    path = store / "checkpoints" / CHECKPOINT / name
    first_lost = _cut(path, keep=0.6)
    n = len(_train_ids(world))

    message = _error("trak", "featurize", world["model"], world["data"], "--store", store, *OPTIONS)
    assert f"error: {path}: truncated" in message and "rerun the same command to recompute them" in message
    assert f"{n - first_lost} of {n} rows" in message
    # Exactly the rows past the cut are to be computed again; the kernel solved from them is gone.
    reopened = FeatureStore.reopen(store)
    assert reopened.missing(CHECKPOINT).tolist() == list(range(first_lost, n))
    assert not (store / "checkpoints" / CHECKPOINT / "kernel.npy").exists()

    _ok("trak", "featurize", world["model"], world["data"], "--store", store, *OPTIONS)
    _assert_clean_scores(world, store, tmp_path / "out")


@pytest.mark.parametrize("damage", ["not an array", "other shape"])
def test_a_replaced_features_file_is_made_anew_and_every_row_recomputed(world, tmp_path, damage) -> None:
    store = _store_copy(world, tmp_path)
    path = store / "checkpoints" / CHECKPOINT / "features.npy"
    if damage == "not an array":
        path.write_bytes(b"garbage")
    else:
        np.save(path, np.zeros((3, 5), dtype=np.float32))
    n = len(_train_ids(world))

    code, output = _score(world, store, tmp_path / "out")
    message = " ".join(output.split())
    assert code == 1 and message.startswith(f"error: {path}: ") and f"{n} of {n} rows" in message, output
    assert FeatureStore.reopen(store).missing(CHECKPOINT).size == n
    _assert_clean_scores(world, store, tmp_path / "out")


def test_featurize_does_not_report_a_truncated_store_complete(world, tmp_path) -> None:
    """It used to say "features of N training records" for a truncated features.npy, and exit 0."""
    store = _store_copy(world, tmp_path)
    _cut(store / "checkpoints" / CHECKPOINT / "features.npy", keep=0.5)
    code, output = _invoke("trak", "featurize", world["model"], world["data"], "--store", store, *OPTIONS)
    assert code == 1 and "features of" not in output


@pytest.mark.parametrize("name, row", [("features.npy", 3), ("loss_weights.npy", 17)])
def test_a_non_finite_row_is_named_and_recomputed_on_the_rerun(world, tmp_path, name, row) -> None:
    store = _store_copy(world, tmp_path)
    path = store / "checkpoints" / CHECKPOINT / name
    array = np.load(path, mmap_mode="r+")
    array[row] = np.nan if name == "features.npy" else np.inf
    array.flush()
    del array

    code, output = _score(world, store, tmp_path / "out")
    message = " ".join(output.split())
    assert code == 1, output
    assert message.startswith(f"error: {path}: 1 of {len(_train_ids(world))} rows (index {row}) are NaN or infinite")
    assert f"record ids {_train_ids(world)[row]})" in message and "rerun the same command" in message
    assert FeatureStore.reopen(store).missing(CHECKPOINT).tolist() == [row]
    _assert_clean_scores(world, store, tmp_path / "out")


def test_featurize_finds_a_nan_row_of_a_solved_checkpoint(world, tmp_path) -> None:
    store = _store_copy(world, tmp_path)
    path = store / "checkpoints" / CHECKPOINT / "features.npy"
    array = np.load(path, mmap_mode="r+")
    array[5, 2] = np.nan
    array.flush()
    del array
    message = _error("trak", "featurize", world["model"], world["data"], "--store", store, *OPTIONS)
    assert f"error: {path}: 1 of" in message and "(index 5)" in message
    _ok("trak", "featurize", world["model"], world["data"], "--store", store, *OPTIONS)
    _assert_clean_scores(world, store, tmp_path / "out")


def test_a_nan_row_of_the_target_features_is_recomputed(world, tmp_path) -> None:
    store = _store_copy(world, tmp_path)
    [targets] = list((store / "targets").iterdir())
    path = targets / "checkpoints" / CHECKPOINT / "features.npy"
    array = np.load(path, mmap_mode="r+")
    array[1] = np.nan
    array.flush()
    del array
    test_ids = [record.id for record in select_split(load_records(world["data"]), "test")]
    code, output = _score(world, store, tmp_path / "out")
    message = " ".join(output.split())
    assert code == 1 and message.startswith(f"error: {path}: ") and f"record ids {test_ids[1]})" in message, output
    _assert_clean_scores(world, store, tmp_path / "out")


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_a_damaged_kernel_is_removed_and_solved_again(world, tmp_path, damage) -> None:
    store = _store_copy(world, tmp_path)
    path = store / "checkpoints" / CHECKPOINT / "kernel.npy"
    if damage == "truncated":
        _cut(path, keep=0.7)
    else:
        matrix = np.load(path)
        matrix[0, 0] = np.nan
        np.save(path, matrix)
    code, output = _score(world, store, tmp_path / "out")
    message = " ".join(output.split())
    assert code == 1 and message.startswith(f"error: {path}: ") and "solve it again" in message, output
    assert not path.exists() and FeatureStore.reopen(store).missing(CHECKPOINT).size == 0
    _assert_clean_scores(world, store, tmp_path / "out")


def test_the_store_api_raises_store_damaged_with_the_lost_rows(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store", 10, 3, {"featurizer": "test"})
    store.add_checkpoint("a", "fp")
    rows = np.arange(10)
    store.write("a", rows, np.ones((10, 3), np.float32), np.ones(10, np.float32))
    store.release()
    path = tmp_path / "store" / "checkpoints" / "a" / "features.npy"
    first_lost = _cut(path, keep=0.5)
    with pytest.raises(StoreDamagedError, match=str(path)) as caught:
        store.missing("a")
    assert caught.value.rows == list(range(first_lost, 10))
    assert store.missing("a").tolist() == list(range(first_lost, 10))  # repaired: the file is whole again
    assert np.load(path).shape == (10, 3) and (np.load(path)[:first_lost] == 1).all()


def test_rows_are_checked_once_per_instance_and_again_after_a_change(tmp_path: Path, monkeypatch) -> None:
    store = FeatureStore(tmp_path / "store", 10, 3, {"featurizer": "test"})
    store.add_checkpoint("a", "fp")
    store.write("a", np.arange(10), np.ones((10, 3), np.float32), np.ones(10, np.float32))
    store.release()
    passes = []
    check = store_module._non_finite_rows
    monkeypatch.setattr(store_module, "_non_finite_rows", lambda *args: passes.append(1) or check(*args))
    store.features("a")
    store.features("a")
    assert len(passes) == 1  # scoring after solving reads the rows once more, but checks them once
    path = tmp_path / "store" / "checkpoints" / "a" / "features.npy"
    rows = np.load(path, mmap_mode="r+")
    rows[4, 1] = np.nan
    rows.flush()
    del rows
    later = path.stat().st_mtime_ns + 1_000_000_000  # the edit comes later than the check (coarse clocks)
    os.utime(path, ns=(later, later))
    with pytest.raises(StoreDamagedError, match=r"features.npy: 1 of 10 rows \(index 4\) are NaN or infinite"):
        store.features("a")
    assert len(passes) == 2 and store.missing("a").tolist() == [4]


def test_a_damaged_store_held_by_another_writer_is_named_but_left_alone(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path / "store", 10, 3, {"featurizer": "test"})
    store.add_checkpoint("a", "fp")
    store.write("a", np.arange(10), np.ones((10, 3), np.float32), np.ones(10, np.float32))
    path = tmp_path / "store" / "checkpoints" / "a" / "features.npy"
    _cut(path, keep=0.5)
    size = path.stat().st_size
    other = FeatureStore.reopen(tmp_path / "store")  # another instance: its claim is refused while store holds it
    with pytest.raises(StoreDamagedError, match="it is not repaired, as .* is being written by another process"):
        other.missing("a")
    assert path.stat().st_size == size
    with pytest.raises(StoreDamagedError, match="are lost and marked as not featurized"):
        store.missing("a")  # the holder repairs it
    assert store.missing("a").size == 5


def test_eval_accepts_a_training_run_like_explain_does(world, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world["model"], run / "model")
    _ok("eval", world["model"], world["data"], "--out", tmp_path / "model.json", "--no-progress")
    _ok("eval", run, world["data"], "--out", tmp_path / "run.json", "--no-progress")
    from_run = json.loads((tmp_path / "run.json").read_text())
    assert from_run == json.loads((tmp_path / "model.json").read_text()) and from_run["n_images"] > 0


REPORT = dict(n_targets=2, top_k=2, methods=("decomposition",), checkpoints=None,
              settings=AttributionSettings(proj_dim=16, bank_size=16, batch_size=8), progress=False)


@pytest.fixture
def report_run(world, tmp_path) -> Path:
    """A run folder holding only the final model (what a report needs besides the data)."""
    run = tmp_path / "run"
    shutil.copytree(world["model"], run / "model")
    return run


def _held_out_metrics(world, data: Path) -> dict:
    """The model's metrics on the test split of ``data``, computed here."""
    from cliptrace.data.images import ImageLoader
    from cliptrace.evaluate import evaluate
    from cliptrace.models import load_model

    with torch.no_grad():
        return evaluate(load_model(world["model"]).eval(), select_split(load_records(data), "test"), ImageLoader())


def test_report_on_other_data_shows_that_datas_metrics(world, report_run, tmp_path) -> None:
    from cliptrace.report import build_report

    other = generate_shapes_world(tmp_path / "other", n_images=40, image_size=32, seed=1)
    first = build_report(report_run, world["data"], **REPORT)
    assert first.metrics == _held_out_metrics(world, world["data"])
    second = build_report(report_run, other, **REPORT)
    expected = _held_out_metrics(world, other)
    assert second.metrics == expected != first.metrics
    assert f"{expected['i2t_R@1']:.4g}" in second.index.read_text()
    cached = json.loads((report_run / "test_metrics.json").read_text())
    assert {key: value for key, value in cached.items() if key != "cache_key"} == expected
    # The cache of the same inputs is used as it is: a marked value shows it was not recomputed.
    (report_run / "test_metrics.json").write_text(json.dumps({**cached, "n_images": -1}))
    assert build_report(report_run, other, **REPORT).metrics["n_images"] == -1


def test_an_unreadable_metrics_cache_is_computed_again_saying_so(world, report_run) -> None:
    from cliptrace.report import build_report

    path = report_run / "test_metrics.json"
    path.write_text('{"i2t_R@1": 1')
    with pytest.warns(UserWarning, match=f"{path}: not valid JSON .*; computing the metrics again"):
        summary = build_report(report_run, world["data"], **REPORT)
    assert summary.metrics == _held_out_metrics(world, world["data"])
    assert json.loads(path.read_text())["cache_key"]["split"] == "test"


def test_a_failed_metrics_write_leaves_the_previous_cache_whole(world, report_run, monkeypatch) -> None:
    from cliptrace.report import build_report

    path = report_run / "test_metrics.json"
    old = json.dumps({"n_images": 3, "cache_key": {"data": "other"}})
    path.write_text(old)
    write_text = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs) -> int:
        if "test_metrics" in self.name:
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_report(report_run, world["data"], **REPORT)
    monkeypatch.undo()
    assert path.read_text() == old
    assert [p.name for p in report_run.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("content", ['{"results": ', '{"models": 4, "results": {"trak": {"lds": "high"}}}', "[]"])
def test_a_broken_lds_json_is_named_before_the_report_is_computed(world, report_run, content) -> None:
    path = report_run / "verify" / "lds.json"
    path.parent.mkdir()
    path.write_text(content)
    message = _error("report", report_run, "--data", world["data"], "--no-progress")
    assert message.startswith(f"error: {path}: ")
    assert not (report_run / "report").exists()


def test_saving_attributions_clears_what_a_killed_save_left(tmp_path: Path) -> None:
    from cliptrace.data.record import Record
    from cliptrace.trak.attribute import Attribution
    from cliptrace.trak.scoring import TopK

    out = tmp_path / "out"
    out.mkdir()
    left = [out / ".scores.0123456789abcdef.tmp.npy", out / ".topk.0123456789abcdef.tmp.csv"]
    for path in left:
        path.write_bytes(b"half")  # as a save killed before its renames leaves them
    mine = out / ".notes.0123456789abcdef.tmp.txt"  # not a temporary of an attribution output
    mine.write_text("kept")
    records = [Record(str(i), f"{i}.png", (f"caption {i}",), "train") for i in range(3)]
    top = TopK(torch.tensor([[2]]), torch.tensor([[0.5]]), torch.tensor([[0]]), torch.tensor([[-0.5]]))
    Attribution(train=records, targets=records[:1], top=top, self_influence=np.ones(3),
                scores=np.arange(3, dtype=np.float32)[:, None], checkpoints=["ck"]).save(out)
    assert not any(path.exists() for path in left) and mine.exists()
    assert sorted(path.name for path in out.iterdir()) == [
        ".notes.0123456789abcdef.tmp.txt", "ids.json", "scores.npy", "self_influence.csv", "topk.csv", "topk.json"]
