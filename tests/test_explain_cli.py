"""``cliptrace explain`` (one image, and batch mode over a shapes world) and the dataset evaluation behind it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.data.shapes import COLORS, generate_shapes_world, load_objects
from cliptrace.explain.evaluation import evaluate_methods, load_cases, summarize
from cliptrace.models import HFCLIP, train_tokenizer

METHODS = "decomposition,gradient,occlusion,random"


@pytest.fixture(scope="module")
def world_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 60-image shapes world at 32 px and an untrained tiny CLIP saved as a model directory."""
    root = tmp_path_factory.mktemp("explain")
    world = generate_shapes_world(root / "world", n_images=60, seed=3, image_size=32)
    captions = [line for line in world.read_text(encoding="utf-8").splitlines()[1:]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=16)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=1,
                               text_num_hidden_layers=1)
    model.save(root / "model")
    return world.parent, root / "model"


def invoke(*args: object) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_single_image_writes_a_method_grid(world_and_model, tmp_path):
    world, model = world_and_model
    out = tmp_path / "grid.png"
    output = invoke("explain", "--model", model, "--image", world / "images" / "shapes-000000.png",
                    "--text", "a red circle", "--method", METHODS, "--out", out)
    with Image.open(out) as image:
        assert image.width > 400 and image.height > 200
    for method in METHODS.split(","):
        assert method in output


def test_list_methods_and_clear_errors(world_and_model, tmp_path):
    world, model = world_and_model
    assert "chefer_last" in invoke("explain", "--model", model, "--list-methods")
    runner = CliRunner()
    cases = [
        (["--image", tmp_path / "missing.png", "--text", "a"], "missing.png"),
        (["--image", world / "images" / "shapes-000000.png", "--text", "a", "--method", "magic"], "magic"),
        (["--text", "a"], "--image"),
    ]
    for args, message in cases:
        command = ["explain", "--model", str(model), *map(str, args), "--out", str(tmp_path / "x.png")]
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "x.png").exists()


def test_shapes_cases_name_one_object_and_carry_its_pixels(world_and_model):
    world, model_dir = world_and_model
    from cliptrace.models import load_model

    model = load_model(model_dir)
    cases = load_cases(model, world, split="", limit=10, seed=1)
    objects = load_objects(world)
    assert cases and all(case.target_class is not None and case.caption is None for case in cases)
    for case in cases:
        names = [f"{obj['color']} {obj['shape']}" for obj in objects[case.id]]
        assert len(names) == 2 and case.target_class in names
        pixels = model.preprocess.unnormalize(case.pixels).permute(1, 2, 0)[case.mask] * 255
        colour = torch.tensor(COLORS[case.target_class.split()[0]], dtype=pixels.dtype)
        assert case.mask.any() and (pixels - colour).abs().max() < 25  # the mask covers the named object


def test_batch_mode_writes_the_metrics_table(world_and_model, tmp_path):
    world, model = world_and_model
    out = tmp_path / "batch"
    templates = tmp_path / "templates.txt"  # two prompts keep the class word maps of the examples quick
    templates.write_text("a photo of a {}.\na {}\n", encoding="utf-8")
    output = invoke("explain", "--model", model, "--data", world, "--split", "", "--limit", "6", "--steps", "4",
                    "--method", METHODS, "--templates", templates, "--out", out, "--no-progress")
    assert "pointing game" in output
    with (out / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 * 4 and {row["method"] for row in rows} == set(METHODS.split(","))
    assert {row["pointing"] for row in rows} <= {"0.0", "1.0"}
    assert all(float(row["completeness"]) < 1e-4 for row in rows if row["method"] == "decomposition")
    assert (out / "summary.md").read_text().count("\n") == 2 + 4
    assert len(list((out / "examples").glob("*.png"))) == 4


def test_summary_is_the_mean_and_normal_interval_of_each_measure():
    measured = {"a": [1.0, 2.0, 4.0], "b": [0.5, math.nan, 1.5]}
    rows = [{"id": str(i), "method": method, "score": value}
            for method, values in measured.items() for i, value in enumerate(values)]
    summary = {entry["method"]: entry for entry in summarize(rows)}
    assert summary["a"]["score"] == pytest.approx(7 / 3)
    assert summary["a"]["score±"] == pytest.approx(1.96 * np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    assert summary["b"]["score"] == pytest.approx(1.0)  # NaN (an undefined measure) is left out


def test_decomposition_rows_are_complete_and_agree_with_a_direct_call(world_and_model):
    world, model_dir = world_and_model
    from cliptrace.explain import explain
    from cliptrace.models import load_model

    model = load_model(model_dir)
    cases = load_cases(model, world, split="", limit=3, seed=0)
    rows = evaluate_methods(model, cases, ["decomposition"], steps=2)
    direct = explain(model, torch.stack([case.pixels for case in cases]),
                     target_class=[case.target_class for case in cases])
    assert [row["logit"] for row in rows] == pytest.approx(direct.logit.tolist(), rel=1e-5)
    assert all(row["completeness"] < 1e-4 for row in rows)


def test_contrastive_rows_explain_the_class_against_the_others(world_and_model):
    world, model_dir = world_and_model
    from cliptrace.data.shapes import class_names
    from cliptrace.explain import explain
    from cliptrace.models import load_model

    model = load_model(model_dir)
    cases = load_cases(model, world, split="", limit=3, seed=0)
    rows = evaluate_methods(model, cases, ["decomposition"], classes=class_names(), steps=2)
    direct = explain(model, torch.stack([case.pixels for case in cases]),
                     target_class=[case.target_class for case in cases], classes=class_names())
    plain = explain(model, torch.stack([case.pixels for case in cases]),
                    target_class=[case.target_class for case in cases])
    assert [row["logit"] for row in rows] == pytest.approx(direct.logit.tolist(), rel=1e-5)
    assert not torch.allclose(direct.logit, plain.logit)


def test_default_methods_skip_those_a_frozen_backbone_model_cannot_run_in_one_line(world_and_model, tmp_path):
    from transformers import BertConfig, ResNetConfig

    from cliptrace.data.transforms import ImageTransform
    from cliptrace.models import FrozenBackboneDualEncoder

    world, _ = world_and_model
    captions = [line for line in (world / "captions.csv").read_text(encoding="utf-8").splitlines()[1:]]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=16)
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16)
    FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, preprocess=ImageTransform(32), projection_dim=8,
                                           seed=0).save(tmp_path / "lit")
    result = CliRunner().invoke(app, ["explain", "--model", str(tmp_path / "lit"), "--image",
                                      str(world / "images" / "shapes-000000.png"), "--text", "a red circle",
                                      "--out", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if line.startswith("skipped")]
    assert skipped == ["skipped decomposition, attention_rollout, chefer, gradcam: FrozenBackboneDualEncoder cannot "
                       "describe its image tower: its backbone is a ResNetModel, which is not described (supported: "
                       "ViTModel, CLIPVisionModel)"]
    assert "Traceback" not in result.output and (tmp_path / "grid.png").is_file()
    for method in ("gradient_x_input", "integrated_gradients", "occlusion"):
        assert method in result.output
