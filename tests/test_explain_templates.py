"""``explain`` of a zero-shot class: the templates of ``eval``, the logit it classifies with, and per-word maps."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cliptrace.cli import app
from cliptrace.evaluate import IMAGENET_TEMPLATES, class_embeddings, embed_pil_images
from cliptrace.explain import explain
from cliptrace.models import HFCLIP, load_model, train_tokenizer

CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]
CLASSES = ["red circle", "blue square", "green cross", "yellow triangle"]
TEMPLATES = ("a {}", "a photo of the {}.", "{} in art", "itap of a {}")


def tiny(dtype: torch.dtype = torch.float64) -> HFCLIP:
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    return HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=1,
                              text_num_hidden_layers=2).to(dtype).eval()


@pytest.fixture(scope="module")
def model() -> HFCLIP:
    return tiny()


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy())
            for _ in range(3)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, images: list[Image.Image]) -> tuple[Path, Path]:
    """A float32 tiny CLIP saved as a model directory, and one image file."""
    root = tmp_path_factory.mktemp("templates")
    tiny(torch.float32).save(root / "model")
    images[0].save(root / "image.png")
    return root / "model", root / "image.png"


def zero_shot_logits(model: HFCLIP, images: list[Image.Image], templates=IMAGENET_TEMPLATES) -> torch.Tensor:
    """τ × the cosine similarities zero-shot classification ranks the classes by, (N, C)."""
    features = embed_pil_images(model, images)
    return model.logit_scale.exp().item() * features @ class_embeddings(model, CLASSES, templates).T


def test_the_class_logit_explained_is_the_one_zero_shot_classification_uses(model, images):
    expected = zero_shot_logits(model, images)  # eval's default: the 80 ImageNet templates
    custom = zero_shot_logits(model, images, TEMPLATES)
    assert not torch.allclose(expected, custom, rtol=1e-3, atol=1e-3)  # the templates matter
    for column, name in enumerate(CLASSES):
        plain = explain(model, images, target_class=name, method="random", word_maps=False)
        torch.testing.assert_close(plain.logit.float(), expected[:, column], rtol=1e-5, atol=1e-5)
        chosen = explain(model, images, target_class=name, templates=TEMPLATES, method="random",
                         word_maps=False)
        torch.testing.assert_close(chosen.logit.float(), custom[:, column], rtol=1e-5, atol=1e-5)


def cli_logit(*args: object) -> float:
    result = CliRunner().invoke(app, ["explain", *map(str, args)], terminal_width=200)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if re.match(r"\W*random\b", line))
    return float(row.split("│")[2])


def test_the_cli_explains_the_logit_zero_shot_classification_uses(saved, tmp_path):
    model_dir, image = saved
    model = load_model(model_dir)
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    expected = zero_shot_logits(model, [picture])[0, CLASSES.index("green cross")]
    common = ["--model", model_dir, "--image", image, "--class", "green cross", "--method", "random",
              "--out", tmp_path / "x.png"]
    assert cli_logit(*common) == pytest.approx(float(expected), rel=1e-5)
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    custom = zero_shot_logits(model, [picture], TEMPLATES)[0, CLASSES.index("green cross")]
    assert cli_logit(*common, "--templates", templates) == pytest.approx(float(custom), rel=1e-5)


def prompt_words(template: str, name: str) -> list[str]:
    """The words of a prompt written out by hand: whitespace-separated, the final full stop a word of its own."""
    return template.replace("{}", name).replace(".", " .").split()


def word_labels(tokens: list[str], words: list[str]) -> list[str]:
    """The word of each token of a caption explanation (special tokens first and last label themselves)."""
    labels, position, spelled = [tokens[0]], 0, ""
    for token in tokens[1:-1]:
        spelled += token.strip()
        labels.append(words[position])
        if spelled == words[position]:
            position, spelled = position + 1, ""
    assert position == len(words)
    return [*labels, tokens[-1]]


def by_hand(model: HFCLIP, images, name: str, method: str) -> tuple[list[dict[str, float]], torch.Tensor | None]:
    """Per image: each word's share of the class logit from explaining every prompt as a caption, and the constant."""
    prompts = [template.replace("{}", name) for template in TEMPLATES]
    with torch.no_grad():
        mean = model.encode_text(**model.tokenize(prompts)).mean(0)
    weight = 1 / (len(TEMPLATES) * mean.norm())
    shares: list[dict[str, float]] = [{} for _ in images]
    constant = None
    for template, prompt in zip(TEMPLATES, prompts):
        caption = explain(model, images, prompt, method=method)
        for row, tokens in enumerate(caption.tokens):
            for label, score in zip(word_labels(tokens, prompt_words(template, name)), caption.text_map[row]):
                shares[row][label] = shares[row].get(label, 0.0) + float(weight * score)
        if caption.text_constant is not None:
            part = weight * caption.text_constant
            constant = part if constant is None else constant + part
    return shares, constant


@pytest.mark.parametrize("method", ["decomposition", "gradient_x_input"])
def test_class_word_maps_average_the_prompts_explained_one_by_one(model, images, method):
    result = explain(model, images, target_class="red circle", templates=TEMPLATES, method=method)
    shares, constant = by_hand(model, images, "red circle", method)
    for row, expected in enumerate(shares):
        words = result.tokens[row]
        assert words[:2] == ["red", "circle"] and set(words) == set(expected)
        got = dict(zip(words, result.text_map[row].tolist()))
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)
    if method == "decomposition":
        # zero-shot classification keeps class embeddings in float32: the constant also owns that rounding
        torch.testing.assert_close(result.text_constant, constant, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(result.text_map.sum(1) + result.text_constant, result.logit, rtol=1e-10,
                                   atol=1e-12)
        torch.testing.assert_close(result.interaction.sum((1, 2)), result.logit, rtol=1e-10, atol=1e-12)


def test_classes_with_different_words_share_a_batch(model, images):
    targets = ["red circle", "yellow triangle", "red circle"]
    whole = explain(model, images, target_class=targets, templates=TEMPLATES, batch_size=3)
    single = explain(model, images, target_class=targets, templates=TEMPLATES, batch_size=1)
    for row, name in enumerate(targets):
        alone = explain(model, images[row], target_class=name, templates=TEMPLATES)
        count = len(alone.tokens[0])
        assert whole.tokens[row] == alone.tokens[0] == single.tokens[row]
        torch.testing.assert_close(whole.text_map[row, :count], alone.text_map[0], rtol=1e-10, atol=1e-12)
        assert not whole.text_map[row, count:].any()  # padding past the class's words
    torch.testing.assert_close(whole.interaction, single.interaction, rtol=1e-10, atol=1e-12)


def test_list_methods_needs_no_model_and_other_uses_do():
    runner = CliRunner()
    listed = runner.invoke(app, ["explain", "--list-methods"])
    assert listed.exit_code == 0 and "decomposition" in listed.output and "chefer_last" in listed.output
    missing = runner.invoke(app, ["explain", "--image", "x.png", "--text", "a"])
    assert missing.exit_code == 1 and missing.output.startswith("error: ") and "--model" in missing.output
    assert "Traceback" not in missing.output


def test_a_bad_templates_file_is_named_with_its_line(saved, tmp_path):
    model_dir, image = saved
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\nno placeholder here\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["explain", "--model", str(model_dir), "--image", str(image), "--class",
                                      "red circle", "--templates", str(templates), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {templates}, line 2: ") and len(result.output.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()
