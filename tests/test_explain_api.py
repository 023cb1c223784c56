"""``cliptrace.explain``: targets (captions, classes, contrastive views), batching and input checks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cliptrace.evaluate import class_embeddings
from cliptrace.explain.api import MethodFailed, explain
from cliptrace.models import HFCLIP, train_tokenizer

CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]
CLASSES = ["red circle", "blue square", "green cross", "yellow triangle"]
TEMPLATES = ("a {}", "a photo of a {}.")


@pytest.fixture(scope="module")
def model() -> HFCLIP:
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    return HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=2,
                              text_num_hidden_layers=2).double().eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def embed(model: HFCLIP, pixels: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(**model.tokenize(captions))


def test_caption_maps_and_constants_sum_to_the_real_logit(model, pixels):
    result = explain(model, pixels, CAPTIONS[:3])
    phi, psi = embed(model, pixels, CAPTIONS[:3])
    expected = model.logit_scale.exp() * (phi * psi).sum(-1)
    torch.testing.assert_close(result.logit, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.image_map.sum((1, 2)) + result.image_constant, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.text_map.sum(1) + result.text_constant, expected, rtol=1e-10, atol=1e-12)
    lengths = model.tokenize(CAPTIONS[:3])["attention_mask"].sum(1).tolist()
    assert [len(tokens) for tokens in result.tokens] == lengths
    assert result.tokens[0][1].strip() == "a"


def test_contrastive_caption_view_explains_the_target_minus_the_prompt_mean(model, pixels):
    result = explain(model, pixels, CAPTIONS[:3], contrast=CAPTIONS)
    plain = explain(model, pixels, CAPTIONS[:3])
    phi, psi = embed(model, pixels, CAPTIONS[:3])
    _, prompts = embed(model, pixels, CAPTIONS)
    expected = model.logit_scale.exp() * (phi * (psi - prompts.mean(0))).sum(-1)
    torch.testing.assert_close(result.logit, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.interaction.sum((1, 2)), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.text_map, plain.text_map, rtol=1e-12, atol=1e-12)  # the mean owns no token
    torch.testing.assert_close(result.image_map.sum((1, 2)) + result.image_constant, expected, rtol=1e-10,
                               atol=1e-12)


def test_class_target_contrasted_with_the_other_classes(model, pixels):
    targets = ["red circle", "green cross", "red circle"]
    result = explain(model, pixels, target_class=targets, classes=CLASSES, templates=TEMPLATES)
    assert [words[:2] for words in result.tokens] == [name.split() for name in targets]  # the class words first
    with torch.no_grad():
        phi = model.encode_image(pixels).float()
        logits = model.logit_scale.exp().float() * phi @ class_embeddings(model, CLASSES, TEMPLATES).T
    expected = torch.stack([
        logits[row, CLASSES.index(name)]
        - sum(logits[row, c] for c in range(len(CLASSES)) if CLASSES[c] != name) / (len(CLASSES) - 1)
        for row, name in enumerate(targets)
    ])
    torch.testing.assert_close(result.logit.float(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.image_map.sum((1, 2)) + result.image_constant, result.logit,
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.text_map.sum(1) + result.text_constant, result.logit, rtol=1e-10, atol=1e-12)


def test_batch_size_and_image_form_do_not_change_the_result(model, pixels):
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(i)) * 255)
                              .to(torch.uint8).numpy()) for i in range(3)]
    processed = torch.stack([model.preprocess(image) for image in images])
    whole = explain(model, processed, "a red circle", batch_size=3)
    single = explain(model, images, "a red circle", batch_size=1)
    torch.testing.assert_close(single.image_map, whole.image_map, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(single.interaction, whole.interaction, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "either text"),
    ({"text": "a", "target_class": "red circle"}, "either text"),
    ({"text": ["a", "b"]}, "2 given for 3 images"),
    ({"text": "a", "classes": CLASSES}, "needs target_class"),
    ({"target_class": "red circle", "contrast": CAPTIONS}, "classes="),
    ({"target_class": "purple star", "classes": CLASSES}, "not in classes"),
    ({"text": "a", "method": "no-such-method"}, "no-such-method"),
])
def test_bad_arguments_are_refused_clearly(model, pixels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        explain(model, pixels, **kwargs)


def test_the_package_is_callable_as_cliptrace_explain(model, pixels):
    import cliptrace

    result = cliptrace.explain(model, pixels, "a red circle", method="decomposition")
    torch.testing.assert_close(result.image_map, explain(model, pixels, "a red circle").image_map)


def test_other_dual_encoders_get_pixel_methods_and_a_clear_error_for_the_decomposition():
    from transformers import BertConfig, ResNetConfig

    from cliptrace.data.transforms import ImageTransform
    from cliptrace.models import FrozenBackboneDualEncoder

    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16)
    model = FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, preprocess=ImageTransform(16),
                                                   projection_dim=8, seed=0).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = explain(model, pixels, "a red circle", method="gradient")
    assert result.image_map.shape == (2, 16, 16) and result.image_level == "pixel"
    with pytest.raises(MethodFailed, match="'decomposition' failed: TowerUnavailable: .*its backbone is a ResNetModel") \
            as caught:
        explain(model, pixels, "a red circle")
    assert isinstance(caught.value.__cause__, TypeError)
