"""The baseline attribution methods against independent computations: autograd and finite differences, a test-side
hook for embedding gradients, IG completeness, brute-force occlusion, numpy rollout and Chefer relevance from HF's
own ``output_attentions``, a hand-run last block for Grad-CAM; plus shapes, padding, batching, the model left
unchanged, and the registry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ResNetConfig, RobertaConfig

from cliptrace.data.transforms import ImageTransform
from cliptrace.explain.base import image_logit, patch_grid, text_logit, to_patches
from cliptrace.explain.baselines import (
    BASELINES,
    CheferRelevance,
    GradCAM,
    Gradient,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    PatchGradient,
    PatchGradientXInput,
    RandomMap,
    make_baseline,
)
from cliptrace.models import FrozenBackboneDualEncoder, HFCLIP, train_tokenizer
from cliptrace.models.towers import TowerUnavailable
from cliptrace.trak.clip_call import eager_attention

CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]
PIXEL_LEVEL = {"gradient", "gradient_x_input", "integrated_gradients"}


def tiny_clip() -> HFCLIP:
    """A float64 two-layer CLIP on 32×32 images (a 4×4 patch grid) with non-trivial LayerNorm and bias values."""
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, image_size=32, vision_num_hidden_layers=2,
                               text_num_hidden_layers=2).double().eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


@pytest.fixture(scope="module")
def model() -> HFCLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def batch(model: HFCLIP) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Two images, two padded captions of different lengths and two unit side vectors."""
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    tokens = model.tokenize(CAPTIONS[:2])
    assert (tokens["attention_mask"] == 0).any() and not torch.equal(*tokens["attention_mask"])
    dim = model.model.config.projection_dim
    sides = F.normalize(torch.randn(2, dim, generator=generator, dtype=torch.float64), dim=-1)
    return images, tokens, sides


def options(name: str) -> dict[str, int]:
    return {"n_steps": 8} if name == "integrated_gradients" else {}


def snapshot(model: HFCLIP) -> dict:
    """Everything a method must leave as it was."""
    return {
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "attention": [sub.config._attn_implementation for sub in model.modules() if hasattr(sub, "config")],
    }


def assert_unchanged(model: HFCLIP, before: dict) -> None:
    after = snapshot(model)
    assert after["requires_grad"] == before["requires_grad"]
    assert after["attention"] == before["attention"]
    for name, value in before["parameters"].items():
        assert torch.equal(after["parameters"][name], value), name
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@contextmanager
def embedding_offset(module: torch.nn.Module, shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """A zero tensor added to ``module``'s output: the gradient w.r.t. it is the gradient w.r.t. that output."""
    offset = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    handle = module.register_forward_hook(lambda module, args, output: output + offset)
    try:
        yield offset
    finally:
        handle.remove()


def content_tokens(model: HFCLIP, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Non-padding tokens other than BOS, EOS and pad, built from the tokenizer's own token strings."""
    specials = {model.tokenizer.bos_token_id, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
    keep = [[bool(m) and int(i) not in specials for i, m in zip(ids, mask)]
            for ids, mask in zip(input_ids, attention_mask)]
    return torch.tensor(keep)


# --- registry -------------------------------------------------------------------------------------------------------


def test_registry_names_and_levels() -> None:
    assert set(BASELINES) == {"gradient", "gradient_x_input", "patch_gradient", "patch_gradient_x_input",
                              "integrated_gradients", "occlusion", "attention_rollout", "chefer", "chefer_last",
                              "gradcam", "random"}
    for name in BASELINES:
        method = make_baseline(name)
        assert method.name == name
        assert method.image_level == ("pixel" if name in PIXEL_LEVEL else "patch")
    assert make_baseline("chefer_last").layers == "last" and make_baseline("chefer").layers == "all"
    assert make_baseline("occlusion", baseline=0.5).baseline == 0.5


def test_make_baseline_errors() -> None:
    with pytest.raises(ValueError, match="unknown baseline 'lime'.*gradient.*random"):
        make_baseline("lime")
    with pytest.raises(TypeError):
        make_baseline("gradient", n_steps=3)
    with pytest.raises(ValueError, match="layers"):
        CheferRelevance(layers="first")


# --- contract, for every method -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BASELINES))
def test_contract(name: str, model: HFCLIP, batch) -> None:
    """Shapes, finite values, zero at padding, batched == per row, model unchanged."""
    images, tokens, sides = batch
    method = make_baseline(name, **options(name))
    before = snapshot(model)
    image_map = method.attribute_image(model, images, sides)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    assert_unchanged(model, before)

    expected_shape = (2, 32, 32) if method.image_level == "pixel" else (2, *patch_grid(model, images))
    assert image_map.shape == expected_shape and image_map.dtype == torch.float64
    assert text_map.shape == tokens["input_ids"].shape
    assert torch.isfinite(image_map).all() and torch.isfinite(text_map).all()
    assert not image_map.requires_grad and not text_map.requires_grad
    assert (text_map[tokens["attention_mask"] == 0] == 0).all()
    assert image_map.abs().sum() > 0 and text_map.abs().sum() > 0

    if name == "random":
        return
    for row in range(2):
        single = method.attribute_image(model, images[row : row + 1], sides[row : row + 1])
        torch.testing.assert_close(single[0], image_map[row], rtol=1e-6, atol=1e-9)
        ids, mask = tokens["input_ids"][row : row + 1], tokens["attention_mask"][row : row + 1]
        torch.testing.assert_close(method.attribute_text(model, ids, mask, sides[row : row + 1])[0], text_map[row],
                                   rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [name for name in BASELINES if name != "random"])
def test_model_restored_on_error(name: str, model: HFCLIP, batch) -> None:
    """A side vector of the wrong width fails after the towers ran; hooks and attention settings are still undone."""
    images, tokens, sides = batch
    wrong = torch.ones(2, sides.shape[1] + 1, dtype=torch.float64)
    method = make_baseline(name, **options(name))
    before = snapshot(model)
    with pytest.raises(RuntimeError):
        method.attribute_image(model, images, wrong)
    with pytest.raises(RuntimeError):
        method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], wrong)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", list(BASELINES))
def test_frozen_model_under_no_grad(name: str, batch) -> None:
    """Frozen parameters and an outer ``torch.no_grad`` change nothing; the flags stay frozen."""
    frozen = tiny_clip().requires_grad_(False)
    images, tokens, sides = batch
    method = make_baseline(name, **options(name))
    expected = method.attribute_image(frozen, images, sides)
    with torch.no_grad():
        torch.testing.assert_close(method.attribute_image(frozen, images, sides), expected)
        assert method.attribute_text(frozen, tokens["input_ids"], tokens["attention_mask"], sides) is not None
    assert not any(p.requires_grad for p in frozen.parameters())


# --- gradients ------------------------------------------------------------------------------------------------------


def pixel_gradient(model, images: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    pixels = images.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(image_logit(model, pixels, sides).sum(), pixels)
    return gradient


def test_gradient_and_gradient_x_input_match_autograd(model: HFCLIP, batch) -> None:
    images, _, sides = batch
    gradient = pixel_gradient(model, images, sides)
    torch.testing.assert_close(Gradient().attribute_image(model, images, sides), gradient.abs().amax(1))
    torch.testing.assert_close(GradientXInput().attribute_image(model, images, sides), (images * gradient).sum(1))


def test_gradient_matches_central_differences(model: HFCLIP, batch) -> None:
    images, _, sides = batch
    saliency = Gradient().attribute_image(model, images, sides)
    step = 1e-5
    for row, y, x in [(0, 3, 5), (1, 17, 30), (0, 31, 0)]:
        derivatives = []
        for channel in range(3):
            plus, minus = images[row : row + 1].clone(), images[row : row + 1].clone()
            plus[0, channel, y, x] += step
            minus[0, channel, y, x] -= step
            side = sides[row : row + 1]
            derivatives.append((image_logit(model, plus, side) - image_logit(model, minus, side)) / (2 * step))
        torch.testing.assert_close(saliency[row, y, x], torch.cat(derivatives).abs().max(), rtol=1e-6, atol=1e-9)


def test_patch_gradients_match_a_test_side_hook(model: HFCLIP, batch) -> None:
    images, _, sides = batch
    conv = model.model.vision_model.embeddings.patch_embedding
    rows, columns = patch_grid(model, images)
    with embedding_offset(conv, (2, conv.out_channels, rows, columns)) as offset:
        (gradient,) = torch.autograd.grad(image_logit(model, images, sides).sum(), offset)
    embeddings = F.conv2d(images, conv.weight, stride=conv.stride)
    torch.testing.assert_close(PatchGradient().attribute_image(model, images, sides), gradient.norm(dim=1))
    torch.testing.assert_close(PatchGradientXInput().attribute_image(model, images, sides),
                               (embeddings * gradient).sum(1))


def test_patch_gradient_x_input_is_the_derivative_of_scaling_a_patch(model: HFCLIP, batch) -> None:
    """The patch convolution is linear without bias, so Σ_d e·∂f/∂e of patch n is d/dt f(patch n scaled by 1 + t);
    by the same token it is pixel gradient × input summed over the patch."""
    images, _, sides = batch
    relevance = PatchGradientXInput().attribute_image(model, images, sides)
    torch.testing.assert_close(to_patches(GradientXInput().attribute_image(model, images, sides), (4, 4)), relevance)
    step = 1e-5
    for row, i, j in [(0, 0, 0), (1, 2, 3)]:
        scaled = []
        for t in (step, -step):
            image = images[row : row + 1].clone()
            image[..., 8 * i : 8 * i + 8, 8 * j : 8 * j + 8] *= 1 + t
            scaled.append(image_logit(model, image, sides[row : row + 1]))
        derivative = (scaled[0] - scaled[1]) / (2 * step)
        torch.testing.assert_close(relevance[row, i, j], derivative[0], rtol=1e-6, atol=1e-9)


def test_token_gradient_maps_match_a_test_side_hook(model: HFCLIP, batch) -> None:
    _, tokens, sides = batch
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    table = model.model.text_model.embeddings.token_embedding
    with embedding_offset(table, (*ids.shape, table.embedding_dim)) as offset:
        (gradient,) = torch.autograd.grad(text_logit(model, ids, mask, sides).sum(), offset)
    embeddings = table.weight[ids]
    norm, dot = gradient.norm(dim=-1) * mask, (embeddings * gradient).sum(-1) * mask
    for method, expected in [(Gradient(), norm), (PatchGradient(), norm), (GradientXInput(), dot),
                             (PatchGradientXInput(), dot)]:
        torch.testing.assert_close(method.attribute_text(model, ids, mask, sides), expected)


# --- integrated gradients -------------------------------------------------------------------------------------------


def test_integrated_gradients_completeness(model: HFCLIP, batch) -> None:
    images, tokens, sides = batch
    for baseline in (0.0, 0.3):
        method = IntegratedGradients(n_steps=64, baseline=baseline, internal_batch_size=40)
        expected = image_logit(model, images, sides) - image_logit(model, torch.full_like(images, baseline), sides)
        total = method.attribute_image(model, images, sides).sum((1, 2))
        torch.testing.assert_close(total, expected.detach(), rtol=1e-3, atol=1e-4)

    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    content = content_tokens(model, ids, mask)
    baseline_ids = torch.where(content, model.tokenizer.pad_token_id, ids)
    text_map = IntegratedGradients(n_steps=64).attribute_text(model, ids, mask, sides)
    expected = text_logit(model, ids, mask, sides) - text_logit(model, baseline_ids, mask, sides)
    torch.testing.assert_close(text_map.sum(1), expected.detach(), rtol=1e-3, atol=1e-4)
    assert (text_map[~content] == 0).all()


# --- occlusion ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", [0.0, -0.7])
def test_occlusion_matches_a_brute_force_loop(baseline: float, model: HFCLIP, batch) -> None:
    images, _, sides = batch
    occlusion = Occlusion(baseline=baseline, perturbations_per_eval=5).attribute_image(model, images, sides)
    full = image_logit(model, images, sides)
    expected = torch.zeros(2, 4, 4, dtype=torch.float64)
    for i in range(4):
        for j in range(4):
            occluded = images.clone()
            occluded[..., 8 * i : 8 * i + 8, 8 * j : 8 * j + 8] = baseline
            expected[:, i, j] = full - image_logit(model, occluded, sides)
    torch.testing.assert_close(occlusion, expected.detach())


def test_text_occlusion_matches_a_brute_force_loop(model: HFCLIP, batch) -> None:
    _, tokens, sides = batch
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    content = content_tokens(model, ids, mask)
    full = text_logit(model, ids, mask, sides)
    expected = torch.zeros(ids.shape, dtype=torch.float64)
    for row, position in content.nonzero().tolist():
        replaced = ids[row : row + 1].clone()
        replaced[0, position] = model.tokenizer.pad_token_id
        expected[row, position] = full[row] - text_logit(model, replaced, mask[row : row + 1], sides[row : row + 1])[0]
    torch.testing.assert_close(Occlusion(perturbations_per_eval=3).attribute_text(model, ids, mask, sides),
                               expected.detach())
    with pytest.raises(ValueError, match="pooling position"):
        Occlusion(token_id=model.tokenizer.eos_token_id).attribute_text(model, ids, mask, sides)


# --- attention methods against HF's own output_attentions -----------------------------------------------------------


def hf_attentions(model: HFCLIP, modality: str, inputs: dict, sides: torch.Tensor):
    """HF's ``output_attentions`` under eager attention, the logit's gradients w.r.t. them, and the pooled position
    of each row (CLS, or the first EOS found by a Python search)."""
    with eager_attention(model):
        if modality == "image":
            pixels = inputs["pixel_values"].clone().requires_grad_(True)
            output = model.model.get_image_features(pixel_values=pixels, output_attentions=True)
            positions = [0, 0]
        else:
            output = model.model.get_text_features(**inputs, output_attentions=True)
            positions = [ids.tolist().index(model.tokenizer.eos_token_id) for ids in inputs["input_ids"]]
    logit = model.logit_scale.exp() * (F.normalize(output.pooler_output, dim=-1) * sides).sum(-1)
    gradients = torch.autograd.grad(logit.sum(), output.attentions)
    return [a.detach().numpy() for a in output.attentions], [g.numpy() for g in gradients], positions


def reference_map(rows: list[np.ndarray], modality: str, mask: torch.Tensor | None) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(rows))
    return stacked[:, 1:].reshape(-1, 4, 4) if modality == "image" else stacked * mask


@pytest.mark.parametrize("modality", ["image", "text"])
def test_rollout_and_chefer_match_numpy_loops(modality: str, model: HFCLIP, batch) -> None:
    images, tokens, sides = batch
    inputs = {"pixel_values": images} if modality == "image" else dict(tokens)
    attentions, gradients, positions = hf_attentions(model, modality, inputs, sides)
    rollout, chefer, last = [], [], []
    for b, position in enumerate(positions):
        size = attentions[0].shape[-1]
        rolled, relevance = np.eye(size), np.eye(size)
        for attention, gradient in zip(attentions, gradients):
            mixed = attention[b].mean(0) + np.eye(size)
            rolled = (mixed / mixed.sum(-1, keepdims=True)) @ rolled
            weighted = np.maximum(gradient[b] * attention[b], 0).mean(0)
            relevance = relevance + weighted @ relevance
        rollout.append(rolled[position])
        chefer.append(relevance[position])
        last.append(weighted[position])
    mask = tokens["attention_mask"] if modality == "text" else None
    methods = {"attention_rollout": rollout, "chefer": chefer, "chefer_last": last}
    for name, rows in methods.items():
        method = make_baseline(name)
        actual = (method.attribute_image(model, images, sides) if modality == "image"
                  else method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides))
        torch.testing.assert_close(actual, reference_map(rows, modality, mask), msg=name)


def test_rollout_ignores_the_side(model: HFCLIP, batch) -> None:
    images, _, sides = batch
    method = make_baseline("attention_rollout")
    torch.testing.assert_close(method.attribute_image(model, images, sides),
                               method.attribute_image(model, images, -sides))


# --- Grad-CAM: the last block run by hand ---------------------------------------------------------------------------


def test_gradcam_image_matches_a_hand_run_last_block(model: HFCLIP, batch) -> None:
    images, _, sides = batch
    vision = model.model.vision_model
    hidden = model.model.get_image_features(pixel_values=images, output_hidden_states=True).hidden_states[-2].detach()
    block = vision.encoder.layers[-1]
    activations = block.layer_norm1(hidden).detach().requires_grad_(True)
    state = hidden + block.self_attn(activations)[0]
    state = state + block.mlp(block.layer_norm2(state))
    embedding = model.model.visual_projection(vision.post_layernorm(state[:, 0]))
    logit = model.logit_scale.exp() * (F.normalize(embedding, dim=-1) * sides).sum(-1)
    torch.testing.assert_close(logit, image_logit(model, images, sides))
    (gradient,) = torch.autograd.grad(logit.sum(), activations)
    weights = gradient[:, 1:].mean(1)
    expected = torch.relu(torch.einsum("bnd,bd->bn", activations[:, 1:].detach(), weights)).reshape(2, 4, 4)
    torch.testing.assert_close(GradCAM().attribute_image(model, images, sides), expected)


def test_gradcam_text_matches_a_hand_run_last_block(model: HFCLIP, batch) -> None:
    _, tokens, sides = batch
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    text = model.model.text_model
    hidden = model.model.get_text_features(**tokens, output_hidden_states=True).hidden_states[-2].detach()
    block = text.encoder.layers[-1]
    length = ids.shape[1]
    allowed = torch.ones(length, length).tril().bool()[None] & mask.bool()[:, None, :]
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    activations = block.layer_norm1(hidden).detach().requires_grad_(True)
    state = hidden + block.self_attn(activations, attention_mask=additive[:, None])[0]
    state = state + block.mlp(block.layer_norm2(state))
    positions = [row.tolist().index(model.tokenizer.eos_token_id) for row in ids]
    embedding = model.model.text_projection(text.final_layer_norm(state[torch.arange(2), positions]))
    logit = model.logit_scale.exp() * (F.normalize(embedding, dim=-1) * sides).sum(-1)
    torch.testing.assert_close(logit, text_logit(model, ids, mask, sides))
    (gradient,) = torch.autograd.grad(logit.sum(), activations)
    expected = torch.zeros(ids.shape, dtype=torch.float64)
    for b in range(2):
        valid = int(mask[b].sum())
        weights = gradient[b, :valid].mean(0)
        expected[b, :valid] = torch.relu(activations[b, :valid].detach() @ weights)
    torch.testing.assert_close(GradCAM().attribute_text(model, ids, mask, sides), expected)


# --- random control, other dual encoders ----------------------------------------------------------------------------


def test_random_map_is_deterministic_per_seed(model: HFCLIP, batch) -> None:
    images, tokens, sides = batch
    first, again, other = RandomMap(seed=3), RandomMap(seed=3), RandomMap(seed=4)
    torch.testing.assert_close(first.attribute_image(model, images, sides),
                               again.attribute_image(model, images, sides))
    assert not torch.equal(first.attribute_image(model, images, sides), other.attribute_image(model, images, sides))
    values = first.attribute_image(model, images, sides)
    assert ((values >= 0) & (values < 1)).all()
    args = (model, tokens["input_ids"], tokens["attention_mask"], sides)
    torch.testing.assert_close(first.attribute_text(*args), again.attribute_text(*args))


def test_pixel_methods_work_for_any_dual_encoder(batch) -> None:
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    # Backbones no tower describes: a ResNet and a RoBERTa.
    vision = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    text = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)
    other = FrozenBackboneDualEncoder.from_configs(vision, text, tokenizer, preprocess=ImageTransform(32),
                                                   projection_dim=8, seed=0).double().eval()
    images, tokens, _ = batch
    sides = F.normalize(torch.ones(2, 8, dtype=torch.float64), dim=-1)
    gradient = pixel_gradient(other, images, sides)
    torch.testing.assert_close(Gradient().attribute_image(other, images, sides), gradient.abs().amax(1))
    torch.testing.assert_close(GradientXInput().attribute_image(other, images, sides), (images * gradient).sum(1))
    assert IntegratedGradients(n_steps=4).attribute_image(other, images, sides).shape == (2, 32, 32)
    # Occlusion and the random map need only a grid: without a described tower, 8×8 cells of 4×4 pixels.
    occluded = images.clone()
    occluded[:, :, 4:8, 8:12] = 0.0
    drop = image_logit(other, images, sides) - image_logit(other, occluded, sides)
    occlusion = Occlusion().attribute_image(other, images, sides)
    assert occlusion.shape == (2, 8, 8) and RandomMap().attribute_image(other, images, sides).shape == (2, 8, 8)
    torch.testing.assert_close(occlusion[:, 1, 2], drop.detach())
    for name in set(BASELINES) - PIXEL_LEVEL - {"occlusion", "random"}:
        with pytest.raises(TowerUnavailable, match="cannot describe its image tower: its backbone is a ResNetModel"):
            make_baseline(name).attribute_image(other, images, sides)
    with pytest.raises(TowerUnavailable, match="cannot describe its text tower: its backbone is a RobertaModel"):
        Gradient().attribute_text(other, tokens["input_ids"], tokens["attention_mask"], sides)
