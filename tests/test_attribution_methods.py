"""Every registered data-attribution method: the registry contract, and each method's scores against an
independent float64 computation from the features it stored (or the embeddings it used)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cliptrace.attribution import METHODS, DataAttributor, make_method
from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.cli import app
from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.record import Record
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, list_checkpoints, train
from cliptrace.trak.attribute import attribute, data_fingerprint, featurize
from cliptrace.trak.settings import AttributionSettings
from cliptrace.trak.store import FeatureStore

SETTINGS = AttributionSettings(proj_dim=24, bank_size=8, batch_size=8, score_dtype="float64", damping=0.05,
                               parameters=("model.visual_projection.*", "model.text_projection.*",
                                           "model.text_model.final_layer_norm.*", "model.vision_model.post_layernorm.*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Record], list[Record]]:
    """A 40-image shapes world, a 2-checkpoint tiny run on it, its training records and 5 test targets."""
    root = tmp_path_factory.mktemp("methods")
    world = generate_shapes_world(root / "world", n_images=40, seed=3, image_size=32)
    train(TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300, epochs=2,
                      batch_size=8, warmup_steps=1, save_every=1, eval_split=None, progress=False))
    records = load_records(world)
    return root / "run", select_split(records, "train"), select_split(records, "test")[:5]


def _stored(method: StoredGradientMethod, targets: list[Record]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per checkpoint, (X, Q, Φ) in float64, read back from the method's stores."""
    triples = []
    for (checkpoint_id, _), store in zip(method.training.checkpoints, method.stores, strict=True):
        x, q = store.features(checkpoint_id)
        targets_store = FeatureStore.reopen(store.directory / "targets" / data_fingerprint(targets))
        phi, _ = targets_store.features(checkpoint_id)
        triples.append((np.array(x, np.float64), np.array(q, np.float64), np.array(phi, np.float64)))
    return triples


def _ridge(x: np.ndarray, damping: float) -> float:
    return damping * np.trace(x.T @ x) / x.shape[1]


def _trak(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    parts = [x @ np.linalg.solve(x.T @ x + _ridge(x, SETTINGS.damping) * np.eye(x.shape[1]), phi.T)
             for x, _, phi in _stored(method, targets)]
    return np.mean([q for _, q, _ in _stored(method, targets)], 0)[:, None] * np.mean(parts, 0)


def _layer_trak(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    """Σ_l X_l (X_lᵀX_l + λ_l I)⁻¹ Φ_lᵀ with explicit per-layer solves, mean over checkpoints, times Q̄."""
    checkpoint_id, source = method.training.checkpoints[-1]
    featurizer = method._load(checkpoint_id, source).featurizer
    blocks = [block for block in featurizer.layer_slices().values() if block.stop > block.start]
    parts = []
    for x, _, phi in _stored(method, targets):
        parts.append(sum(x[:, b] @ np.linalg.solve(x[:, b].T @ x[:, b] + _ridge(x[:, b], SETTINGS.damping)
                                                   * np.eye(b.stop - b.start), phi[:, b].T) for b in blocks))
    return np.mean([q for _, q, _ in _stored(method, targets)], 0)[:, None] * np.mean(parts, 0)


def _tracin(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    stored = _stored(method, targets)
    return np.mean([q for _, q, _ in stored], 0)[:, None] * np.mean([x @ phi.T for x, _, phi in stored], 0)


def _cosine(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    return np.mean([unit(x) @ unit(phi).T for x, _, phi in _stored(method, targets)], 0)


def _embedding(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    model = load_model(method.training.checkpoints[-1][1])
    train = method.training.records
    images = embed_images(model, [*train, *targets], ImageLoader()).double()
    texts = embed_texts(model, [record.captions[0] for record in [*train, *targets]]).double()
    n = len(train)
    return (images[:n] @ images[n:].T + texts[:n] @ texts[n:].T).numpy()


def _random(method: DataAttributor, targets: list[Record]) -> np.ndarray:
    """Scores follow the records, not their positions: reversing the training order reverses the rows."""
    reversed_method = make_method("random", SETTINGS)
    reversed_method.prepare(type(method.training)(method.training.checkpoints, method.training.records[::-1]))
    return reversed_method.score(targets)[::-1]


REFERENCES: dict[str, Callable[[DataAttributor, list[Record]], np.ndarray]] = {
    "trak": _trak, "trak-layers": _layer_trak, "tracin": _tracin, "grad-cosine": _cosine, "embedding": _embedding,
    "random": _random,
    "ekfac": _tracin,  # dot products of the stored (whitened) features; the whitening: tests/test_trak_kfac.py
}


def test_every_registered_method_has_a_reference_computation() -> None:
    assert set(METHODS) == set(REFERENCES)
    for name, method in METHODS.items():
        assert method.name == name and method.summary and issubclass(method, DataAttributor)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_contract_and_scores_against_the_reference(trained, tmp_path: Path, name: str) -> None:
    run, train_records, targets = trained
    method = featurize(run, train_records, method=name, settings=SETTINGS, store_dir=tmp_path / "store")
    scores = method.score(targets)
    assert scores.shape == (len(train_records), len(targets)) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, REFERENCES[name](method, targets), rtol=1e-7, atol=1e-10)

    # top-k follows the scores; a target that is a training record is left out of its own lists
    own = train_records[:2]
    top = method.top_k([*targets, *own], 3)
    full = method.score([*targets, *own])
    for column in range(len(targets) + len(own)):
        ranked = [i for i in np.argsort(-full[:, column], kind="stable")
                  if column < len(targets) or i != column - len(targets)]
        np.testing.assert_allclose(top.proponent_scores[column].numpy(), full[ranked[:3], column], rtol=1e-9)
    # self-influence is each record's score for itself
    influence = method.self_influence()
    np.testing.assert_allclose(influence[:2], np.diag(method.score(own))[:2], rtol=1e-6, atol=1e-10)

    # the one-call entry point gives the same, and says which method
    result = attribute(run, train_records, targets, method=name, settings=SETTINGS, store_dir=tmp_path / "store",
                       top_k=3)
    assert result.method == name
    np.testing.assert_allclose(result.scores, scores, rtol=1e-9, atol=1e-12)


def test_an_unknown_method_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ValueError, match="unknown attribution method 'nope'.*trak"):
        make_method("nope")


def test_auto_damping_is_chosen_once_stored_and_deterministic(trained, tmp_path: Path) -> None:
    run, train_records, targets = trained
    settings = SETTINGS.replace(damping="auto")
    first = attribute(run, train_records, targets, settings=settings, store_dir=tmp_path / "a", checkpoints=1)
    again = attribute(run, train_records, targets, settings=settings, store_dir=tmp_path / "b", checkpoints=1)
    (checkpoint,) = first.checkpoints
    choice = first.notes[checkpoint]["choice"]
    assert choice == again.notes[checkpoint]["choice"] and choice["criterion"] == "gcv"
    np.testing.assert_array_equal(first.scores, again.scores)
    # the stored kernel is the one of the chosen damping
    fixed = attribute(run, train_records, targets, settings=SETTINGS.replace(damping=choice["damping"]),
                      store_dir=tmp_path / "c", checkpoints=1)
    np.testing.assert_allclose(first.scores, fixed.scores, rtol=1e-9)


def test_ekfac_leaves_raw_parameters_out_of_the_store_it_creates(trained, tmp_path: Path) -> None:
    """EK-FAC's whitening drops raw parameters (here the logit scale) from the features: the store must be made
    with the whitened featurizer's settings (it was made before and then refused), and the scores are those of the
    parameters without it."""
    run, train_records, targets = trained
    with_scale = SETTINGS.replace(parameters=(*SETTINGS.parameters, "model.logit_scale"))
    with pytest.warns(UserWarning, match="leave out 1 parameter.*K-FAC whitening: model.logit_scale"):
        result = attribute(run, train_records, targets, method="ekfac", settings=with_scale,
                           store_dir=tmp_path / "scale", checkpoints=1)
    without = attribute(run, train_records, targets, method="ekfac", settings=SETTINGS, store_dir=tmp_path / "plain",
                        checkpoints=1)
    np.testing.assert_allclose(result.scores, without.scores, rtol=1e-9)


def test_default_commands_share_one_store(trained, tmp_path: Path) -> None:
    """``report RUN`` then ``trak featurize|topk RUN`` with default options: one store, features reused."""
    run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(copy), "--n-targets", "2", "--method", "gradient", "--no-progress"])
    assert result.exit_code == 0, result.output
    stores = list((copy / "trak" / "features").iterdir())
    assert len(stores) == 1
    features = stores[0] / "checkpoints" / list_checkpoints(copy)[-1].name / "features.npy"
    stamp = features.stat().st_mtime_ns
    for command in (["featurize"], ["topk", "--out", str(tmp_path / "out")]):
        result = runner.invoke(app, ["trak", command[0], str(copy), "--no-progress", *command[1:]])
        assert result.exit_code == 0, result.output
    assert list((copy / "trak" / "features").iterdir()) == stores and features.stat().st_mtime_ns == stamp


def test_trak_methods_lists_every_method() -> None:
    result = CliRunner().invoke(app, ["trak", "methods"])
    assert result.exit_code == 0
    for name in METHODS:
        assert name in result.output


def test_score_by_a_named_method_from_the_cli(trained, tmp_path: Path) -> None:
    run, train_records, targets = trained
    result = CliRunner().invoke(app, ["trak", "score", str(run), "--method", "tracin", "--proj-dim", "24",
                                      "--bank-size", "8", "--batch-size", "8", "--dtype", "float64", "--no-progress",
                                      *[item for p in SETTINGS.parameters for item in ("--parameter", p)],
                                      "--store", str(tmp_path / "store"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    expected = attribute(run, train_records, select_split(load_records(
        TrainConfig.load(run / "config.json").data), "test"), method="tracin", settings=SETTINGS,
        store_dir=tmp_path / "store").scores
    np.testing.assert_allclose(np.load(tmp_path / "out" / "scores.npy"), expected, rtol=1e-9)
    assert '"method": "tracin"' in (tmp_path / "out" / "ids.json").read_text()
