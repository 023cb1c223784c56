"""The attribution entry points on a real (tiny) training run: ``cliptrace trak ...`` and ``cliptrace.attribute``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import cliptrace
from cliptrace.cli import app
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.trak.settings import AttributionSettings

OPTIONS = ["--proj-dim", "64", "--bank-size", "16", "--batch-size", "8", "--no-progress",
           "--parameter", "model.visual_projection.*", "--parameter", "model.text_projection.*",
           "--parameter", "model.text_model.final_layer_norm.*", "--parameter", "model.logit_scale"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shapes world of 40 images with planted items, and a 2-checkpoint run of the tiny preset on it."""
    root = tmp_path_factory.mktemp("trak_run")
    world = generate_shapes_world(root / "world", n_images=40, seed=5, n_duplicates=2, n_mislabeled=2)
    config = TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32,
                         vocab_size=300, epochs=2, batch_size=8, warmup_steps=1, save_every=1, progress=False)
    train(config)
    return world, root / "run"


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_featurize_score_topk_agree_and_resume(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    assert len(list_checkpoints(run)) == 2
    store = tmp_path / "store"
    _invoke("trak", "featurize", run, data, "--store", store, *OPTIONS)
    manifest = json.loads((store / "manifest.json").read_text())
    assert sorted(manifest["checkpoints"]) == ["epoch-0001", "epoch-0002"]
    features = np.load(store / "checkpoints" / "epoch-0002" / "features.npy").copy()

    _invoke("trak", "score", run, data, "--store", store, "--out", tmp_path / "full", "--top-k", "3", *OPTIONS)
    _invoke("trak", "topk", run, data, "--store", store, "--out", tmp_path / "top", "--top-k", "3", *OPTIONS)
    # Scoring reuses the stored features instead of recomputing them.
    assert np.array_equal(np.load(store / "checkpoints" / "epoch-0002" / "features.npy"), features)

    train_ids = [r.id for r in select_split(load_records(data), "train")]
    test_ids = [r.id for r in select_split(load_records(data), "test")]
    scores = np.load(tmp_path / "full" / "scores.npy")
    assert scores.shape == (len(train_ids), len(test_ids)) and np.isfinite(scores).all()
    assert not (tmp_path / "top" / "scores.npy").exists()
    for folder in ("full", "top"):
        with open(tmp_path / folder / "topk.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == len(test_ids) * 2 * 3
        for column, target in enumerate(test_ids):
            best = [r for r in rows if r["target_id"] == target and r["kind"] == "proponent"]
            worst = [r for r in rows if r["target_id"] == target and r["kind"] == "opponent"]
            order = np.argsort(-scores[:, column], kind="stable")
            assert [train_ids.index(r["train_id"]) for r in best] == order[:3].tolist()
            assert [train_ids.index(r["train_id"]) for r in worst] == order[::-1][:3].tolist()
            assert all(r["train_image"] and r["train_caption"] for r in best)
            np.testing.assert_allclose([float(r["score"]) for r in best], scores[order[:3], column], rtol=1e-5)
    with open(tmp_path / "full" / "self_influence.csv", newline="") as handle:
        influence = list(csv.DictReader(handle))
    assert sorted(r["train_id"] for r in influence) == sorted(train_ids)


def test_api_matches_cli_and_store_settings_are_checked(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    store = tmp_path / "store"
    _invoke("trak", "score", run, data, "--store", store, "--out", tmp_path / "cli", "--top-k", "2", *OPTIONS)
    parameters = [OPTIONS[i + 1] for i, item in enumerate(OPTIONS) if item == "--parameter"]
    settings = AttributionSettings(proj_dim=64, bank_size=16, batch_size=8, parameters=tuple(parameters))
    result = cliptrace.attribute(run, data, data, settings=settings, store_dir=tmp_path / "fresh", top_k=2)
    np.testing.assert_allclose(result.scores, np.load(tmp_path / "cli" / "scores.npy"), rtol=1e-5, atol=1e-7)

    # Targets that are training records are excluded from their own top-k.
    train_records = select_split(load_records(data), "train")
    own = cliptrace.attribute(run, data, train_records[:4], settings=settings, store_dir=tmp_path / "fresh", top_k=2,
                              full_scores=False)
    assert own.scores is None
    for column in range(4):
        assert column not in own.top.proponents[column].tolist()

    refused = CliRunner().invoke(app, ["trak", "featurize", str(run), str(data), "--store", str(store),
                                       *OPTIONS[:1], "32", *OPTIONS[2:]])
    assert refused.exit_code == 1
    assert "proj_dim" in refused.output and "other settings" in refused.output
    other_path = CliRunner().invoke(app, ["trak", "featurize", str(run), str(data), "--store", str(store),
                                          "--features", "exact", *OPTIONS])
    assert other_path.exit_code == 1
    assert "featurizer: 'factored' -> 'exact'" in other_path.output
