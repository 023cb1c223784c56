"""Counterfactual retraining: deterministic, cached and resumable jobs; LDS and remove-and-retrain end to end."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptrace.trak.settings import AttributionSettings
from cliptrace.cli import app
from cliptrace.data.readers import load_records
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import load_model
from cliptrace.train import TrainConfig, train
from cliptrace.verify import linear_datamodeling_score
from cliptrace.verify.experiments import FULL, linear_datamodeling, remove_and_retrain, subset_jobs
from cliptrace.verify.retrain import Job, Plan, create_plan, load_outputs, output_path, run_jobs, target_outputs


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 48-image shapes world at 32 px and a 2-epoch tiny run on it with 2 checkpoints."""
    root = tmp_path_factory.mktemp("verify")
    world = generate_shapes_world(root / "world", n_images=48, seed=2, image_size=32)
    train(TrainConfig(data=str(world), out=str(root / "run"), preset="tiny", image_size=32, vocab_size=300, epochs=2,
                      batch_size=8, warmup_steps=1, save_every=1, eval_split=None, progress=False))
    return root / "run"


def records_by_id(run: Path) -> dict:
    return {record.id: record for record in load_records(TrainConfig.load(run / "config.json").data)}


def test_retraining_on_every_pair_reproduces_the_run_and_is_cached(run, tmp_path):
    plan = create_plan(tmp_path / "v", run, n_targets=3, bank_size=4)
    assert create_plan(tmp_path / "v", run, n_targets=3, bank_size=4) == plan  # reopened, not rebuilt
    run_jobs(tmp_path / "v", [Job(FULL, plan.train_ids)])
    by_id = records_by_id(run)
    expected = target_outputs(load_model(run / "model"), [by_id[i] for i in plan.target_ids],
                              [by_id[i] for i in plan.bank_ids])
    outputs = load_outputs(tmp_path / "v", [FULL])
    np.testing.assert_array_equal(outputs["margin"][0], expected["margin"])  # same seed, same weights
    np.testing.assert_array_equal(outputs["logit"][0], expected["logit"])
    stamp = output_path(tmp_path / "v", FULL).stat().st_mtime_ns
    run_jobs(tmp_path / "v", [Job(FULL, plan.train_ids)])
    assert output_path(tmp_path / "v", FULL).stat().st_mtime_ns == stamp
    assert not (tmp_path / "v" / "jobs").exists() or not any((tmp_path / "v" / "jobs").iterdir())


def test_target_outputs_are_the_clip_margin_against_the_bank(run):
    by_id = records_by_id(run)
    model = load_model(run / "model")
    targets, bank = list(by_id.values())[:3], list(by_id.values())[10:15]
    outputs = target_outputs(model, targets, bank)
    def embed(records):
        pixels = torch.stack([model.preprocess(Image.open(r.image)) for r in records])
        return model.encode_image(pixels), model.encode_text(**model.tokenize([r.captions[0] for r in records]))

    with torch.no_grad():
        phi, psi = embed(targets)
        bank_phi, bank_psi = embed(bank)
    tau = float(model.logit_scale.detach().exp())
    for j in range(3):
        positive = tau * float(phi[j] @ psi[j])
        image_side = positive - np.log(sum(np.exp(tau * float(phi[j] @ b)) for b in bank_psi))
        text_side = positive - np.log(sum(np.exp(tau * float(b @ psi[j])) for b in bank_phi))
        assert outputs["margin"][j] == pytest.approx(image_side + text_side, rel=1e-4, abs=1e-4)
        assert outputs["logit"][j] == pytest.approx(positive, rel=1e-5, abs=1e-5)


def test_a_job_killed_after_its_first_epoch_resumes_to_the_same_outputs(run, tmp_path, monkeypatch):
    from cliptrace.train import loop

    plan = create_plan(tmp_path / "v", run, n_targets=2, bank_size=4)
    job = Job("half", plan.train_ids[::2])
    run_jobs(tmp_path / "v", [job])
    reference = load_outputs(tmp_path / "v", ["half"])
    output_path(tmp_path / "v", "half").unlink()

    original = loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("killed after the first checkpoint")

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        run_jobs(tmp_path / "v", [job])
    monkeypatch.setattr(loop, "save_checkpoint", original)
    assert not output_path(tmp_path / "v", "half").exists()
    assert [p.name for p in (tmp_path / "v" / "jobs" / "half" / "run" / "checkpoints").iterdir()] == ["epoch-0001"]
    run_jobs(tmp_path / "v", [job])
    np.testing.assert_array_equal(load_outputs(tmp_path / "v", ["half"])["margin"], reference["margin"])


def test_jobs_refuse_records_outside_the_training_set(run, tmp_path):
    create_plan(tmp_path / "v", run, n_targets=2, bank_size=4)
    with pytest.raises(ValueError, match="not in the run's training set"):
        run_jobs(tmp_path / "v", [Job("bad", ("no-such-record",))])
    with pytest.raises(ValueError, match="other settings"):
        create_plan(tmp_path / "v", run, n_targets=3, bank_size=4)


def test_lds_and_removal_end_to_end(run, tmp_path):
    directory = tmp_path / "v"
    plan = create_plan(directory, run, n_targets=3, bank_size=4)
    n = len(plan.train_ids)
    scores = {"random": np.random.default_rng(0).standard_normal((n, 3))}
    results = linear_datamodeling(directory, scores, n_models=4, alpha=0.5)
    jobs, masks = subset_jobs(directory, 4, 0.5)
    ids = np.array(plan.train_ids, dtype=object)
    assert masks.shape == (4, n)
    assert [set(job.train_ids) for job in jobs] == [set(ids[mask]) for mask in masks]  # job m trains on mask m
    margins = load_outputs(directory, [job.name for job in jobs])["margin"]
    direct = linear_datamodeling_score(scores["random"], masks, margins)
    np.testing.assert_array_equal(results["random"].per_target, direct.per_target)
    rows = remove_and_retrain(directory, {"random": scores["random"]}, targets=[0, 1], ks=(2, 4))
    assert [(row["target"], row["k"]) for row in rows] == [(0, 2), (0, 4), (1, 2), (1, 4)]
    outputs = load_outputs(directory, [FULL, "remove-random-t0-k2"])
    assert rows[0]["drop_logit"] == pytest.approx(outputs["logit"][0, 0] - outputs["logit"][1, 0])


def test_verify_cli_writes_lds_and_removal_tables_that_the_report_shows(run):
    from cliptrace.report import build_report

    directory = run / "verify"  # the default --dir, where the report looks
    common = ["--n-targets", "3", "--proj-dim", "32", "--checkpoints", "2", "--no-progress"]
    result = CliRunner().invoke(app, ["verify", "lds", str(run), "--models", "3", "--methods", "trak,embedding,random",
                                      *common])
    assert result.exit_code == 0, result.output
    assert "trak" in result.output and (directory / "lds.json").is_file()
    result = CliRunner().invoke(app, ["verify", "retrain", str(run), "--methods", "trak,random", "--targets", "1",
                                      "--k", "3", *common])
    assert result.exit_code == 0, result.output
    assert (directory / "removal.csv").is_file() and (directory / "removal.png").is_file()
    summary = build_report(run, n_targets=2, settings=AttributionSettings(proj_dim=32, batch_size=8), top_k=2, self_influence_top=5,
                           progress=False)
    index = summary.index.read_text(encoding="utf-8")
    assert "Linear datamodeling score over 3 models" in index and "assets/removal.png" in index
    assert (summary.index.parent / "assets" / "removal.png").is_file()


def test_an_ensemble_can_take_checkpoints_of_another_run_but_not_two_of_one_name(run, tmp_path):
    from cliptrace.trak.attribute import resolve_checkpoints

    other = tmp_path / "other" / "checkpoints" / "epoch-0002"
    shutil.copytree(run / "checkpoints" / "epoch-0002", other)
    renamed = tmp_path / "seed1-epoch-0002"
    shutil.copytree(other, renamed)
    chosen = resolve_checkpoints(run, ["epoch-0001", renamed])
    assert chosen == [("epoch-0001", run / "checkpoints" / "epoch-0001"), ("seed1-epoch-0002", renamed)]
    with pytest.raises(ValueError, match="share the name 'epoch-0002'"):
        resolve_checkpoints(run, ["epoch-0002", other])  # a path is not silently replaced by this run's namesake
    with pytest.raises(FileNotFoundError, match="epoch-0009"):
        resolve_checkpoints(run, ["epoch-0009"])


def test_outputs_under_a_job_name_are_not_reused_for_other_records(run, tmp_path):
    plan = create_plan(tmp_path / "v", run, n_targets=2, bank_size=4)
    run_jobs(tmp_path / "v", [Job("top", plan.train_ids[:20])])
    with pytest.raises(ValueError, match="run on other training records"):
        run_jobs(tmp_path / "v", [Job("top", plan.train_ids[5:25])])


def test_a_plan_written_before_data_options_still_gives_its_jobs_settings(tmp_path) -> None:
    from cliptrace.verify.retrain import Job, Plan

    old_config = {"data": "data/train.tsv", "out": "runs/a", "data_format": "csv", "epochs": 2}
    plan = Plan(run="runs/a", config=old_config, train_ids=("a", "b"), target_ids=("c",), bank_ids=())

    config = plan.train_config(tmp_path, Job("subset-0", ("a",)))

    assert config.data_options.format == "csv" and config.epochs == 2 and config.data == "data/train.tsv"
    assert config.train_ids == str(tmp_path / "jobs" / "subset-0" / "train_ids.txt")


def test_a_job_of_a_run_of_backbones_starts_from_init_alone(tmp_path: Path) -> None:
    """A LiT run's config names its backbones; a job starts from ``init/`` instead (whose manifest keeps the locks),
    so the two must not both reach TrainConfig (it refuses a model with backbones)."""
    run = TrainConfig(data="world", out="run", image_backbone="vit", text_backbone="bert", lock_image=True)
    plan = Plan(run="run", config=dataclasses.asdict(run), train_ids=("a", "b"), target_ids=("c",), bank_ids=())
    config = plan.train_config(tmp_path, Job("m0", ("a",)))
    assert (config.model, config.image_backbone, config.text_backbone) == (str(tmp_path / "init"), None, None)
    assert not config.lock_image and config.epochs == run.epochs and config.seed == run.seed
