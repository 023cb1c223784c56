"""Curation: dataset writers round-trip every writable format, filters rank by their scores, the curation directory
holds a valid dataset of the input's format, and the CLI runs end to end (retraining included)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.curate.curation import removal_budget
from cliptrace.curate.filters import FILTERS, OUTLIER_Z, get_filter
from cliptrace.curate.retrain import compare_arms
from cliptrace.curate.signals import Signals, near_duplicates
from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import format_of, load_records, select_split
from cliptrace.data.record import DatasetError
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.data.writers import WRITABLE, write_records
from cliptrace.report import build_report
from cliptrace.train import TrainConfig, train
from cliptrace.trak.settings import AttributionSettings

SHAPES_FORMATS = {"csv": "csv", "jsonl": "jsonl", "webdataset": "wds"}


def _digests(root: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(root.rglob("*"))
            if path.is_file()}


@pytest.mark.parametrize("format", WRITABLE)
def test_a_written_dataset_reads_back_as_the_kept_records(tmp_path: Path, format: str) -> None:
    source = generate_shapes_world(tmp_path / "world", n_images=12, image_size=32, seed=3,
                                   format=SHAPES_FORMATS[format], shard_size=5)
    before = _digests(tmp_path / "world")
    records = load_records(source)
    assert format_of(source) == format
    kept = [record for index, record in enumerate(records) if index % 3]
    path = write_records(kept, tmp_path / "out", format)
    back = load_records(path)
    assert [(r.id, r.captions, r.split, r.label) for r in back] == [(r.id, r.captions, r.split, r.label)
                                                                    for r in kept]
    loader = ImageLoader()
    assert all(loader.read_bytes(a.image) == loader.read_bytes(b.image) for a, b in zip(back, kept))
    assert format_of(path) == format
    assert _digests(tmp_path / "world") == before
    assert not (tmp_path / "out.partial").exists()
    with pytest.raises(DatasetError, match="not an empty directory"):
        write_records(kept, tmp_path / "out", format)


def test_a_format_without_a_writer_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot write a 'hf' dataset; formats with a writer: csv"):
        write_records([], tmp_path / "out", "hf")


def _signals(n: int = 30, seed: int = 0) -> Signals:
    rng = np.random.default_rng(seed)
    self_influence = rng.normal(size=n)
    self_influence[[4, 17]] = [25.0, 12.0]  # two outliers
    duplicate_of = np.full(n, -1)
    duplicate_of[9] = 2
    similarity = np.full(n, np.nan)
    similarity[9] = 0.999
    return Signals(tuple(f"r{i:02d}" for i in range(n)), rng.normal(size=n), self_influence, rng.uniform(-1, 1, n),
                   duplicate_of, similarity, "trak")


def test_each_filter_removes_in_the_order_of_its_scores() -> None:
    signals = _signals()
    median = np.median(signals.self_influence)
    mad = np.median(np.abs(signals.self_influence - median)) * 1.4826
    expected = {
        "self-influence": (signals.self_influence - median) / mad,
        "val-harm": -signals.val_influence,
        "clip-score": -signals.clip_score,
    }
    for name in FILTERS:
        ranking = get_filter(name).rank(signals, seed=1)
        if name in expected:
            np.testing.assert_allclose(ranking.scores, expected[name], rtol=1e-12)
        assert sorted(ranking.order.tolist()) == list(range(30))
        ordered = ranking.scores[ranking.order]
        assert np.all(ordered[:-1] >= ordered[1:])
    ranking = get_filter("self-influence").rank(signals, 0)
    assert ranking.order[:2].tolist() == [4, 17]
    for index, reason in enumerate(ranking.reasons):
        outlier = ranking.scores[index] >= OUTLIER_Z
        assert reason.startswith("self-influence outlier") == outlier
        assert ("near-duplicate of r02" in reason) == (index == 9)
    harm = get_filter("val-harm").rank(signals, 0)
    assert all((reason == "lowers the validation objective") == (value < 0)
               for reason, value in zip(harm.reasons, signals.val_influence))
    first, again, other = (get_filter("random").rank(signals, seed).order for seed in (3, 3, 4))
    assert first.tolist() == again.tolist() != other.tolist()
    with pytest.raises(ValueError, match="unknown curation filter 'nope'"):
        get_filter("nope")


def test_near_duplicates_match_a_brute_force_loop() -> None:
    embeddings = torch.nn.functional.normalize(torch.randn(40, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    embeddings[25] = embeddings[3]
    embeddings[31] = torch.nn.functional.normalize(embeddings[3] + 1e-3, dim=-1)
    threshold = 0.9
    of, similarity = near_duplicates(embeddings, threshold)
    for i in range(40):
        earlier = [j for j in range(i) if float(embeddings[i] @ embeddings[j]) >= threshold]
        assert of[i] == (earlier[0] if earlier else -1)
        if earlier:
            assert similarity[i] == pytest.approx(float(embeddings[i] @ embeddings[earlier[0]]), abs=1e-6)
    assert of[25] == 3 and of[31] == 3


def test_the_budget_is_a_fraction_or_a_count() -> None:
    assert removal_budget(800, fraction=0.1) == 80
    assert removal_budget(800, budget=7) == 7
    for bad in ({"fraction": 0.1, "budget": 3}, {}, {"budget": 801}, {"fraction": 1.5}):
        with pytest.raises(ValueError):
            removal_budget(800, **bad)


def test_arms_are_compared_paired_by_seed() -> None:
    rows = [{"arm": arm, "seed": seed, "R@1": value} for arm, values in
            {"self-influence": [50, 52, 54], "none": [49, 50, 55]}.items() for seed, value in enumerate(values)]
    table = {row["arm"]: row for row in compare_arms(rows, "R@1", reference="self-influence")}
    assert table["self-influence"]["mean"] == pytest.approx(52) and table["self-influence"]["difference"] is None
    assert table["none"]["difference"] == pytest.approx(np.mean([1, 2, -1]))
    assert table["none"]["difference_low"] <= table["none"]["difference"] <= table["none"]["difference_high"]


@pytest.fixture(scope="module")
def mislabeled_run(tmp_path_factory):
    """A shapes world of 60 images with planted mislabels and a 2-checkpoint tiny run on it."""
    root = tmp_path_factory.mktemp("curate_run")
    world = generate_shapes_world(root / "world", n_images=60, seed=2, n_mislabeled=6)
    config = TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300,
                         epochs=2, batch_size=8, warmup_steps=1, save_every=1, progress=False)
    train(config)
    return world, root / "run"


@pytest.fixture(scope="module")
def curated(mislabeled_run):
    """``cliptrace curate RUN DATA --verify`` into the run's default ``RUN/curate``, with the world's digests before."""
    world, run = mislabeled_run
    before = _digests(world.parent)
    result = CliRunner().invoke(app, ["curate", str(run), str(world), "--budget", "5", "--proj-dim", "64",
                                      "--no-progress", "--verify", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    return world, run, run / "curate", before


def test_the_cli_writes_a_curated_dataset_whose_ranking_matches_its_scores(curated) -> None:
    world, run, out, before = curated
    records = load_records(world)
    train_ids = [record.id for record in select_split(records, "train")]
    with (out / "curation.csv").open(encoding="utf-8") as file:
        removed = list(csv.DictReader(file))
    with (out / "signals.csv").open(encoding="utf-8") as file:
        signals = {row["id"]: row for row in csv.DictReader(file)}
    assert list(signals) == train_ids and len(removed) == 5
    self_influence = np.array([float(signals[i]["self_influence"]) for i in train_ids])
    z = (self_influence - np.median(self_influence)) / (
        1.4826 * np.median(np.abs(self_influence - np.median(self_influence))))
    expected = [train_ids[i] for i in np.argsort(-z, kind="stable")[:5]]
    assert [row["id"] for row in removed] == expected
    for row in removed:
        assert float(row["score"]) == pytest.approx(z[train_ids.index(row["id"])], rel=1e-9)
        assert row["reason"].startswith("self-influence outlier") == (float(row["score"]) >= OUTLIER_Z)
    curated = load_records(out / "data")
    dropped = {row["id"] for row in removed}
    assert [r.id for r in curated] == [r.id for r in records if r.id not in dropped]
    assert format_of(out / "data") == "csv"
    assert (out / "kept_ids.txt").read_text().split() == [i for i in train_ids if i not in dropped]
    assert json.loads((out / "curation.json").read_text())["removed"] == 5
    with (out / "verify.csv").open(encoding="utf-8") as file:
        arms = {row["arm"]: row for row in csv.DictReader(file)}
    assert set(arms) == {"none", *FILTERS}
    assert int(arms["none"]["n_train"]) == len(train_ids) and int(arms["random"]["n_train"]) == len(train_ids) - 5
    assert (out / "verify.png").is_file()
    assert _digests(world.parent) == before
    again = CliRunner().invoke(app, ["curate", str(run), "--out", str(out), "--no-progress"])
    assert again.exit_code != 0 and "not empty" in again.output


def test_the_report_shows_the_retraining_comparison(curated, tmp_path: Path) -> None:
    world, run, out, _ = curated
    comparison = json.loads((out / "verify.json").read_text())
    with (out / "verify.csv").open(encoding="utf-8") as file:
        per_seed = list(csv.DictReader(file))
    assert [table["metric"] for table in comparison["comparisons"]] == ["R@1", "zeroshot_top1"]
    for table in comparison["comparisons"]:  # each arm's mean is the mean of its seeds' values in verify.csv
        for row in table["arms"]:
            values = {int(r["seed"]): float(r[table["metric"]]) for r in per_seed if r["arm"] == row["arm"]}
            reference = {int(r["seed"]): float(r[table["metric"]]) for r in per_seed if r["arm"] == "self-influence"}
            assert row["seeds"] == len(values) == 2 and row["mean"] == pytest.approx(np.mean(list(values.values())))
            if row["arm"] != "self-influence":
                assert row["difference"] == pytest.approx(np.mean([reference[s] - values[s] for s in values]))
    summary = build_report(run, out=tmp_path / "report", n_targets=1, top_k=2, self_influence_top=5,
                           settings=AttributionSettings(proj_dim=32, bank_size=8, batch_size=8), progress=False,
                           methods=("decomposition",))
    page = summary.index.read_text(encoding="utf-8")
    assert "<h2>Curation</h2>" in page and (summary.index.parent / "assets" / "curation.png").is_file()
    for table in comparison["comparisons"]:
        assert f"<th>{table['metric']}</th>" in page
        for row in table["arms"]:
            assert f"<td>{row['arm']}</td><td>{row['mean']:.2f}</td>" in page
            if row["difference"] is not None:
                assert f"<td>{row['difference']:+.2f}</td>" in page


def test_a_damaged_curation_summary_stops_the_report_naming_the_file(mislabeled_run, tmp_path: Path) -> None:
    world, run = mislabeled_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("curate", "curate-retrain", "trak*"))
    (copy / "curate").mkdir()
    (copy / "curate" / "curation.json").write_text('{"removed": "five"}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"curate/curation.json: expected the JSON object 'cliptrace curate' writes"):
        build_report(copy, data=world, n_targets=1, progress=False)
