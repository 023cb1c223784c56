"""The towers of the frozen-backbone dual encoder (ViT / CLIP vision images; BERT, DistilBERT / CLIP text captions,
mean-pooled into linear heads): the exact decomposition sums to the real model's embeddings and logit; the attention
probabilities are the backbones' own eager attentions; rollout and Chefer match independent computations on those
attentions; backbones that are not described are refused naming their class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    DistilBertConfig,
    PretrainedConfig,
    ResNetConfig,
    RobertaConfig,
    ViTConfig,
)

from cliptrace.data.transforms import ImageTransform
from cliptrace.explain import propagation
from cliptrace.explain.api import unavailable_methods
from cliptrace.explain.base import image_logit, text_logit
from cliptrace.explain.baselines import make_baseline
from cliptrace.explain.decomposition import ExactDecomposition, image_components, interaction, text_components
from cliptrace.models import FrozenBackboneDualEncoder, train_tokenizer
from cliptrace.models.towers import TowerUnavailable
from cliptrace.trak.clip_call import eager_attention

CAPTIONS = ["a red circle", "a small blue square above a green cross"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
GRID = (4, 4)  # 32×32 images in 8×8 patches
PAIRS = [("vit", "bert"), ("clip_vision", "distilbert"), ("vit", "clip_text")]
MAP_METHODS = ["decomposition", "attention_rollout", "chefer", "chefer_last", "gradcam", "patch_gradient_x_input"]


def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)


def backbone_config(name: str, vocab_size: int) -> PretrainedConfig:
    """A tiny two-layer config of the backbone ``name``."""
    image = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32)
    text = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=16)
    return {
        "vit": lambda: ViTConfig(**image),
        "clip_vision": lambda: CLIPVisionConfig(**image),
        "bert": lambda: BertConfig(**text),
        "clip_text": lambda: CLIPTextConfig(**text),
        "distilbert": lambda: DistilBertConfig(vocab_size=vocab_size, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                               max_position_embeddings=16),
    }[name]()


def build(pair: tuple[str, str], dtype: torch.dtype = torch.float64) -> FrozenBackboneDualEncoder:
    """A tiny frozen dual encoder with non-trivial LayerNorm and bias values and τ = e³."""
    tok = tokenizer()
    vision, text = (backbone_config(name, len(tok)) for name in pair)
    model = FrozenBackboneDualEncoder.from_configs(vision, text, tok, projection_dim=8, seed=0).to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
        model.logit_scale.fill_(3.0)
    return model


def batch(model: FrozenBackboneDualEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Two images, two captions of different lengths (the first padded), and two unit side vectors."""
    generator = torch.Generator().manual_seed(2)
    dtype = model.logit_scale.dtype
    pixels = torch.randn(2, 3, 32, 32, generator=generator, dtype=dtype)
    sides = F.normalize(torch.randn(2, 8, generator=generator, dtype=dtype), dim=-1)
    return pixels, model.tokenize(CAPTIONS), sides


@pytest.fixture(scope="module", params=PAIRS, ids="+".join)
def model(request) -> FrozenBackboneDualEncoder:
    return build(request.param)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_components_sum_to_the_real_embeddings_and_logit(pair, dtype):
    model = build(pair, dtype)
    pixels, tokens, _ = batch(model)
    with torch.no_grad():
        image, text = image_components(model, pixels), text_components(model, **tokens)
        phi, psi = model.encode_image(pixels), model.encode_text(**tokens)
        logit = model.logit_scale.exp() * (phi * psi).sum(-1)
        split = interaction(model, image, text)
    tolerance = TOLERANCE[dtype]
    assert image.shape == (2, GRID[0] * GRID[1] + 1, 8) and text.shape == (2, 16 + 1, 8)
    assert ((image.sum(1) - phi).norm() / phi.norm()) < tolerance
    assert ((text.sum(1) - psi).norm() / psi.norm()) < tolerance
    # float32 is measured against τ (the largest a logit can be), float64 against |logit|.
    scale = logit.abs() if dtype == torch.float64 else model.logit_scale.exp()
    assert ((split.sum((1, 2)) - logit).abs() / scale).max() < tolerance
    # Padding is never a key and never pooled: its tokens own nothing, and the words own something.
    padding = tokens["attention_mask"] == 0
    assert padding[0].any() and (text[:, :-1][padding] == 0).all()
    assert (text[:, :-1][~padding].norm(dim=-1) > 0).all()


def hf_attentions(model: FrozenBackboneDualEncoder, pixels: torch.Tensor, tokens: dict[str, torch.Tensor],
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The backbones' own eager attention probabilities (``output_attentions=True``), in the autograd graph."""
    with eager_attention(model):
        image = model.vision(pixel_values=pixels, output_attentions=True).attentions
        text = model.text(**tokens, output_attentions=True).attentions
    return list(image), list(text)


def test_the_described_attention_is_the_backbones_eager_attention(model):
    pixels, tokens, _ = batch(model)
    image, text = model.image_tower(), model.text_tower()
    with torch.no_grad():
        ours = (propagation.trace(image, image.embed(pixels)).attentions
                + propagation.trace(text, text.embed(**tokens)).attentions)
        theirs_image, theirs_text = hf_attentions(model, pixels, tokens)
    theirs = theirs_image + theirs_text
    assert len(ours) == len(theirs) == 4
    for mine, reference in zip(ours, theirs):
        # CLIP's eager attention takes the softmax in float32 even in a float64 model.
        torch.testing.assert_close(mine, reference.to(mine.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MAP_METHODS)
def test_maps_have_the_patch_grid_and_caption_shapes(model, name):
    pixels, tokens, sides = batch(model)
    method = ExactDecomposition() if name == "decomposition" else make_baseline(name)
    image_map = method.attribute_image(model, pixels, sides)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    assert image_map.shape == (2, *GRID) and torch.isfinite(image_map).all()
    assert text_map.shape == tokens["input_ids"].shape and torch.isfinite(text_map).all()
    assert (text_map[tokens["attention_mask"] == 0] == 0).all()


def test_decomposition_maps_with_the_constants_sum_to_the_real_logits(model):
    pixels, tokens, sides = batch(model)
    method = ExactDecomposition()
    image_map = method.attribute_image(model, pixels, sides)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    tau = model.logit_scale.exp()
    with torch.no_grad():
        image_constant = tau * (image_components(model, pixels)[:, -1] * sides).sum(-1)
        text_constant = tau * (text_components(model, **tokens)[:, -1] * sides).sum(-1)
        real_image, real_text = image_logit(model, pixels, sides), text_logit(model, **tokens, image_side=sides)
    torch.testing.assert_close(image_map.sum((1, 2)) + image_constant, real_image, rtol=0, atol=1e-10)
    torch.testing.assert_close(text_map.sum(1) + text_constant, real_text, rtol=0, atol=1e-10)


def pooled_rows(matrices: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The mean over the kept positions of each row of (B, N, N) matrices: (B, N)."""
    return np.einsum("bn,bnm->bm", kept / kept.sum(-1, keepdims=True), matrices)


def numpy_rollout(attentions: list[torch.Tensor]) -> np.ndarray:
    """Abnar & Zuidema's rollout of (B, H, N, N) attentions, written out in numpy."""
    rolled = None
    for attention in attentions:
        mixed = attention.detach().numpy().mean(1) + np.eye(attention.shape[-1])
        mixed = mixed / mixed.sum(-1, keepdims=True)
        rolled = mixed if rolled is None else mixed @ rolled
    return rolled


def test_rollout_is_the_mean_pooled_row_of_the_backbones_rolled_out_attention():
    model = build(("vit", "bert"))
    pixels, tokens, sides = batch(model)
    with torch.no_grad():
        image, text = hf_attentions(model, pixels, tokens)
    mask = tokens["attention_mask"].numpy().astype(float)
    expected_image = pooled_rows(numpy_rollout(image), np.ones((2, 17)))[:, 1:].reshape(2, *GRID)
    expected_text = pooled_rows(numpy_rollout(text), mask) * mask
    rollout = make_baseline("attention_rollout")
    torch.testing.assert_close(rollout.attribute_image(model, pixels, sides), torch.from_numpy(expected_image))
    actual_text = rollout.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    torch.testing.assert_close(actual_text, torch.from_numpy(expected_text))


def test_chefer_weighs_the_backbones_attentions_by_the_real_logits_gradient():
    """Chefer's rule computed on the HF backbones themselves: their eager attentions and the gradient with respect
    to them of the logit of the mean-pooled, projected, normalized last hidden states."""
    model = build(("vit", "bert")).requires_grad_(True)  # unlocked, so that the attentions are in the graph
    pixels, tokens, sides = batch(model)
    tau = model.logit_scale.exp().detach()
    with eager_attention(model):
        vision = model.vision(pixel_values=pixels, output_attentions=True)
        text_out = model.text(**tokens, output_attentions=True)
    image, text = list(vision.attentions), list(text_out.attentions)
    kept = tokens["attention_mask"][..., None].to(pixels.dtype)
    phi = F.normalize(model.visual_projection(vision.last_hidden_state.mean(1)), dim=-1)
    psi = F.normalize(model.text_projection((text_out.last_hidden_state * kept).sum(1) / kept.sum(1)), dim=-1)
    image_gradients = torch.autograd.grad((tau * phi * sides).sum(), image)
    text_gradients = torch.autograd.grad((tau * psi * sides).sum(), text)

    def relevance(attentions, gradients) -> np.ndarray:
        result = np.eye(attentions[0].shape[-1])
        for attention, gradient in zip(attentions, gradients):
            weighted = np.clip((gradient * attention).detach().numpy(), 0, None).mean(1)
            result = result + weighted @ result
        return result

    mask = tokens["attention_mask"].numpy().astype(float)
    expected_image = pooled_rows(relevance(image, image_gradients), np.ones((2, 17)))[:, 1:].reshape(2, *GRID)
    expected_text = pooled_rows(relevance(text, text_gradients), mask) * mask
    chefer = make_baseline("chefer")
    torch.testing.assert_close(chefer.attribute_image(model, pixels, sides), torch.from_numpy(expected_image))
    actual_text = chefer.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    torch.testing.assert_close(actual_text, torch.from_numpy(expected_text))


def test_backbones_that_are_not_described_are_refused_naming_their_class():
    tok = tokenizer()
    resnet = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    roberta = RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32)
    model = FrozenBackboneDualEncoder.from_configs(resnet, backbone_config("bert", len(tok)), tok,
                                                   preprocess=ImageTransform(32), projection_dim=8, seed=0)
    with pytest.raises(TowerUnavailable, match=r"ResNetModel, which is not described \(supported: ViTModel, "
                                               r"CLIPVisionModel\)"):
        model.image_tower()
    model.text_tower()  # the BERT text tower is still described
    skipped = unavailable_methods(model, ["decomposition", "chefer", "occlusion", "gradient"])
    assert set(skipped) == {"decomposition", "chefer"}
    assert skipped["chefer"] == ("FrozenBackboneDualEncoder cannot describe its image tower: its backbone is a "
                                 "ResNetModel, which is not described (supported: ViTModel, CLIPVisionModel)")
    other = FrozenBackboneDualEncoder.from_configs(backbone_config("vit", len(tok)), roberta, tok, projection_dim=8,
                                                   seed=0)
    with pytest.raises(TowerUnavailable, match=r"RobertaModel, which is not described \(supported: BertModel, "
                                               r"DistilBertModel, CLIPTextModel\)"):
        other.text_tower()
