"""``cliptrace eval`` and ``cliptrace retrieve`` on a tiny untrained HF CLIP and a tiny generated shapes world."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli.evaluate import eval_command, retrieve_command
from cliptrace.data.readers import load_records
from cliptrace.data.shapes import generate_shapes_world
from cliptrace.models import HFCLIP, load_model, train_tokenizer

runner = CliRunner()


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("retrieve")(retrieve_command)
    return app


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """(model directory, dataset path) of an untrained tiny CLIP and a 40-image shapes world."""
    root = tmp_path_factory.mktemp("world")
    dataset = generate_shapes_world(root / "data", n_images=40, image_size=32, seed=0)
    captions = [caption for record in load_records(dataset) for caption in record.captions]
    tokenizer = train_tokenizer(captions, vocab_size=300, context_length=24)
    model = HFCLIP.from_preset("tiny", tokenizer, image_size=32, seed=0)
    model.save(root / "model")
    return root / "model", dataset


def image_embeddings(model, records) -> torch.Tensor:
    """The records' images embedded in one batch straight from the files, as float64."""
    pixels = torch.stack([model.preprocess(Image.open(record.image).convert("RGB")) for record in records])
    with torch.no_grad():
        return model.encode_image(pixels).double()


def text_embeddings(model, texts: list[str]) -> torch.Tensor:
    """The texts embedded in one batch, as float64."""
    with torch.no_grad():
        return model.encode_text(**model.tokenize(texts)).double()


def rank_bounds(scores: list[float], correct: list[bool], eps: float = 1e-5) -> tuple[int, int]:
    """Best and worst 1-based rank of the best correct candidate when scores within ``eps`` of it may tie."""
    best = max(score for score, right in zip(scores, correct) if right)
    wrong = [score for score, right in zip(scores, correct) if not right]
    return 1 + sum(score > best + eps for score in wrong), 1 + sum(score >= best - eps for score in wrong)


def assert_within(metrics: dict, names: dict[str, str], bounds: list[tuple[int, int]], ks: tuple[int, ...]) -> None:
    """Each metric lies between its values at the best and at the worst ranks (all metrics are monotone in ranks)."""
    best, worst = [b for b, _ in bounds], [w for _, w in bounds]
    for k in ks:
        low, high = (100 * sum(r <= k for r in ranks) / len(bounds) for ranks in (worst, best))
        assert low - 1e-9 <= metrics[names["recall"].format(k=k)] <= high + 1e-9
    if "mean" in names:
        assert statistics.mean(best) - 1e-9 <= metrics[names["mean"]] <= statistics.mean(worst) + 1e-9
        assert statistics.median(best) <= metrics[names["median"]] <= statistics.median(worst)


def test_eval_command_matches_brute_force(world, tmp_path) -> None:
    model_dir, dataset = world
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n{}\n", encoding="utf-8")
    out = tmp_path / "metrics" / "eval.json"
    args = ["eval", str(model_dir), str(dataset), "--split", "", "--templates", str(templates), "--out", str(out)]
    result = runner.invoke(cli(), [*args, "--no-progress", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    assert "i2t_R@1" in result.output
    metrics = json.loads(out.read_text(encoding="utf-8"))

    records = load_records(dataset)
    model = load_model(model_dir).eval()
    images = image_embeddings(model, records)
    texts = text_embeddings(model, [caption for record in records for caption in record.captions])
    owner = [index for index, record in enumerate(records) for _ in record.captions]
    assert (metrics["n_images"], metrics["n_captions"]) == (len(records), len(owner))
    i2t = [rank_bounds((texts @ image).tolist(), [o == i for o in owner]) for i, image in enumerate(images)]
    t2i = [rank_bounds((images @ t).tolist(), [i == o for i in range(len(records))]) for t, o in zip(texts, owner)]
    for direction, bounds in (("i2t", i2t), ("t2i", t2i)):
        names = {"recall": direction + "_R@{k}", "mean": f"{direction}_mean_rank", "median": f"{direction}_median_rank"}
        assert_within(metrics, names, bounds, (1, 5, 10))

    classes = json.loads((dataset.parent / "shapes_world.json").read_text())["classes"]
    labeled = [(index, record) for index, record in enumerate(records) if record.label is not None]
    assert metrics["zeroshot_n_images"] == len(labeled) > 0
    assert set(metrics["zeroshot_per_class_recall"]) == {record.label for _, record in labeled}
    prompts = text_embeddings(model, [t.replace("{}", name) for name in classes for t in ("a photo of a {}.", "{}")])
    class_features = torch.nn.functional.normalize(prompts.view(len(classes), 2, -1).mean(1), dim=-1)
    bounds = [
        rank_bounds((class_features @ images[index]).tolist(), [name == record.label for name in classes])
        for index, record in labeled
    ]
    assert_within(metrics, {"recall": "zeroshot_top{k}"}, bounds, (1, 5))


def test_eval_command_reports_bad_templates_without_traceback(world, tmp_path) -> None:
    model_dir, dataset = world
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo\n", encoding="utf-8")
    result = runner.invoke(cli(), ["eval", str(model_dir), str(dataset), "--templates", str(templates)])
    assert result.exit_code == 1
    assert f"{templates}, line 2" in result.output
    assert "Traceback" not in result.output


def test_eval_command_reports_an_empty_split(world) -> None:
    model_dir, dataset = world
    result = runner.invoke(cli(), ["eval", str(model_dir), str(dataset), "--split", "nope", "--no-progress"])
    assert result.exit_code == 1
    assert "no records in split 'nope'" in result.output


def test_retrieve_text_query(world, tmp_path) -> None:
    model_dir, dataset = world
    records = [record for record in load_records(dataset) if record.split == "train"]
    query, true_id = records[3].captions[0], records[3].id
    out = tmp_path / "plots" / "text.png"
    args = ["retrieve", str(model_dir), str(dataset), "--text", query, "--split", "train", "--k", "3"]
    result = runner.invoke(cli(), [*args, "--true-id", true_id, "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output

    model = load_model(model_dir).eval()
    sims = (image_embeddings(model, records) @ text_embeddings(model, [query])[0]).tolist()
    best, worst = rank_bounds(sims, [record.id == true_id for record in records])
    reported = re.search(r"rank (\d+) of (\d+)", result.output)
    assert best <= int(reported[1]) <= worst and int(reported[2]) == len(records)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 0 and png.size[1] > 0


def test_retrieve_image_query(world, tmp_path) -> None:
    model_dir, dataset = world
    record = load_records(dataset)[0]
    out = tmp_path / "image.png"
    result = runner.invoke(
        cli(), ["retrieve", str(model_dir), str(dataset), "--image", record.image, "--out", str(out), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


@pytest.mark.parametrize(
    "extra, code, message",
    [
        ([], 2, "exactly one of --text and --image"),
        (["--text", "a red circle", "--image", "x.png"], 2, "exactly one of --text and --image"),
        (["--text", "a red circle", "--true-id", "nope"], 1, "true id 'nope'"),
        (["--image", "missing.png"], 1, "missing.png"),
    ],
)
def test_retrieve_rejects_bad_arguments(world, tmp_path, extra: list[str], code: int, message: str) -> None:
    model_dir, dataset = world
    args = ["retrieve", str(model_dir), str(dataset), "--out", str(tmp_path / "q.png"), "--no-progress", *extra]
    result = runner.invoke(cli(), args)
    assert result.exit_code == code
    assert message in " ".join(result.output.split())
