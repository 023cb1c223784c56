"""The tower protocol on every described family (HF CLIP, SigLIP, open_clip ViT), like timm's tests over every model:
the exact decomposition sums to the logit the real model computes; the attention probabilities a described tower
uses are the model's own; the attention, gradient and occlusion methods give maps of the patch grid that match
independent computations; what cannot be described is refused in one clear line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliptrace.explain import propagation
from cliptrace.explain.base import image_logit, text_logit
from cliptrace.explain.baselines import make_baseline
from cliptrace.explain.decomposition import ExactDecomposition, image_components, interaction, text_components
from cliptrace.models import HFCLIP, train_tokenizer
from cliptrace.models.base import DualEncoder
from cliptrace.models.towers import TowerUnavailable

CAPTIONS = ["a red circle", "a small blue square above a green cross"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
FAMILIES = ["hf_clip", "siglip", pytest.param("open_clip", marks=pytest.mark.open_clip)]
GRID = (4, 4)  # 32×32 images in 8×8 patches
MAP_METHODS = ["decomposition", "attention_rollout", "chefer", "chefer_last", "occlusion", "gradcam",
               "patch_gradient_x_input"]


def tokenizer():
    return train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)


def hf_clip(hidden_act: str) -> DualEncoder:
    return HFCLIP.from_preset("tiny", tokenizer(), seed=0, image_size=32, vision_hidden_act=hidden_act,
                              text_hidden_act=hidden_act, vision_num_hidden_layers=2, text_num_hidden_layers=2)


def siglip(hidden_act: str) -> DualEncoder:
    from cliptrace.models.siglip import SigLIPAdapter

    return SigLIPAdapter.from_preset("siglip-tiny", tokenizer(), seed=0, image_size=32, vision_hidden_act=hidden_act,
                                     text_hidden_act=hidden_act, vision_num_hidden_layers=2, text_num_hidden_layers=2)


def open_clip_model(hidden_act: str) -> DualEncoder:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    from cliptrace.models.open_clip import OpenCLIPAdapter

    tanh = {"act_kwargs": {"approximate": "tanh"}} if hidden_act == "gelu_pytorch_tanh" else {}
    config = {"embed_dim": 16, "quick_gelu": hidden_act == "quick_gelu",
              "vision_cfg": dict(layers=2, width=32, head_width=8, patch_size=8, image_size=32, **tanh),
              "text_cfg": dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2, **tanh)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(**config)
    open_clip.model.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    return OpenCLIPAdapter(model, SimpleTokenizer(context_length=16), "tiny-test", config)


BUILDERS = {"hf_clip": hf_clip, "siglip": siglip, "open_clip": open_clip_model}


def build(family: str, dtype: torch.dtype = torch.float64, hidden_act: str = "gelu") -> DualEncoder:
    """A tiny model of ``family`` with non-trivial LayerNorm and bias values and τ = e³."""
    model = BUILDERS[family](hidden_act).to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
        model.logit_scale.fill_(3.0)
    return model


def batch(model: DualEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Two images, two captions of different lengths, and two unit side vectors."""
    generator = torch.Generator().manual_seed(2)
    dtype = model.logit_scale.dtype
    pixels = torch.randn(2, 3, 32, 32, generator=generator, dtype=dtype)
    with torch.no_grad():
        width = model.encode_image(pixels).shape[-1]
    sides = F.normalize(torch.randn(2, width, generator=generator, dtype=dtype), dim=-1)
    return pixels, model.tokenize(CAPTIONS), sides


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str) -> DualEncoder:
    return build(family)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu", "gelu_pytorch_tanh"])
def test_components_sum_to_the_real_embeddings_and_logit(family, dtype, hidden_act):
    model = build(family, dtype, hidden_act)
    pixels, tokens, _ = batch(model)
    with torch.no_grad():
        image, text = image_components(model, pixels), text_components(model, **tokens)
        phi, psi = model.encode_image(pixels), model.encode_text(**tokens)
        logit = model.logit_scale.exp() * (phi * psi).sum(-1)
        split = interaction(model, image, text)
    tolerance = TOLERANCE[dtype]
    assert image.shape == (2, GRID[0] * GRID[1] + 1, phi.shape[-1])
    assert text.shape == (2, tokens["input_ids"].shape[1] + 1, psi.shape[-1])
    assert ((image.sum(1) - phi).norm() / phi.norm()) < tolerance
    assert ((text.sum(1) - psi).norm() / psi.norm()) < tolerance
    # float32 is measured against τ (the largest a logit can be), float64 against |logit|: see
    # tests/test_explain_decomposition.py.
    scale = logit.abs() if dtype == torch.float64 else model.logit_scale.exp()
    assert ((split.sum((1, 2)) - logit).abs() / scale).max() < tolerance


def model_attentions(model: DualEncoder, family: str, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The image tower's attention probabilities (B, H, Nq, N) as the model's own modules compute them: HF's eager
    attention weights, and ``nn.MultiheadAttention`` (open_clip's blocks, SigLIP's pool head) asked for its
    per-head weights with the same arguments."""
    from torch import nn

    from cliptrace.trak.clip_call import eager_attention

    found: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if isinstance(module, nn.MultiheadAttention):
            query, key = args[0], args[1]
            _, weights = nn.MultiheadAttention.forward(module, query, key, key, need_weights=True,
                                                       average_attn_weights=False, attn_mask=kwargs.get("attn_mask"))
            found.append(weights.detach())
        else:
            found.append(output[1].detach())

    vision = model.model.visual if family == "open_clip" else model.model.vision_model
    modules = [module for name, module in vision.named_modules()
               if isinstance(module, nn.MultiheadAttention) or name.endswith("self_attn")]
    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        with eager_attention(model), torch.no_grad():
            model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return found


def test_a_described_towers_attention_is_the_models_own(model, family):
    pixels, _, _ = batch(model)
    tower = model.image_tower()
    with torch.no_grad():
        traced = propagation.trace(tower, tower.embed(pixels))
    ours = traced.attentions + ([] if traced.pool_attention is None else [traced.pool_attention])
    theirs = model_attentions(model, family, pixels)
    assert len(ours) == len(theirs) == len(tower.blocks) + (family == "siglip")
    for mine, reference in zip(ours, theirs):
        # HF's eager attention takes the softmax in float32 even in a float64 model.
        torch.testing.assert_close(mine, reference.to(mine.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", MAP_METHODS)
def test_image_maps_have_the_patch_grid_shape_and_token_maps_the_caption_shape(model, name):
    pixels, tokens, sides = batch(model)
    method = ExactDecomposition() if name == "decomposition" else make_baseline(name)
    image_map = method.attribute_image(model, pixels, sides)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    assert image_map.shape == (2, *GRID) and torch.isfinite(image_map).all()
    assert text_map.shape == tokens["input_ids"].shape and torch.isfinite(text_map).all()


def test_decomposition_maps_with_the_constants_sum_to_the_real_logits(model):
    pixels, tokens, sides = batch(model)
    method = ExactDecomposition()
    image_map = method.attribute_image(model, pixels, sides)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], sides)
    with torch.no_grad():
        real_image, real_text = image_logit(model, pixels, sides), text_logit(model, **tokens, image_side=sides)
        image_constant = side_constant(image_components(model, pixels), model, sides)
        text_constant = side_constant(text_components(model, **tokens), model, sides)
    torch.testing.assert_close(image_map.sum((1, 2)) + image_constant, real_image, rtol=0, atol=1e-10)
    torch.testing.assert_close(text_map.sum(1) + text_constant, real_text, rtol=0, atol=1e-10)


def side_constant(components: torch.Tensor, model: DualEncoder, side: torch.Tensor) -> torch.Tensor:
    return model.logit_scale.exp() * (components[:, -1] * side).sum(-1)


def test_occlusion_matches_a_brute_force_loop(model):
    pixels, _, sides = batch(model)
    full = image_logit(model, pixels, sides).detach()
    expected = torch.zeros(2, *GRID, dtype=pixels.dtype)
    for row in range(GRID[0]):
        for column in range(GRID[1]):
            occluded = pixels.clone()
            occluded[:, :, 8 * row: 8 * row + 8, 8 * column: 8 * column + 8] = 0.0
            expected[:, row, column] = full - image_logit(model, occluded, sides).detach()
    torch.testing.assert_close(make_baseline("occlusion").attribute_image(model, pixels, sides), expected)


def test_patch_gradient_x_input_is_the_derivative_of_scaling_each_patch_embedding(model):
    """Σ_d e_d ∂f/∂e_d of patch s is d/dα f(e_s → α e_s) at α = 1: checked by central differences on the real
    model, scaling one patch's pixels (the patch embedding is linear in them, up to its bias)."""
    pixels, _, sides = batch(model)
    tower = model.image_tower()
    embedding = tower.embed(pixels)
    gradient_map = make_baseline("patch_gradient_x_input").attribute_image(model, pixels, sides)
    step = 1e-5
    for row, column in [(0, 0), (2, 3)]:
        index = row * GRID[1] + column
        scaled = []
        for alpha in (1 + step, 1 - step):
            sources = embedding.sources.detach().clone()
            sources[:, index] *= alpha
            with torch.no_grad():
                embedded = propagation.trace(tower, dataclasses.replace(embedding, sources=sources)).embedding
            scaled.append(model.logit_scale.exp() * (embedded * sides).sum(-1))
        derivative = (scaled[0] - scaled[1]) / (2 * step)
        torch.testing.assert_close(gradient_map[:, row, column], derivative, atol=1e-6, rtol=1e-5)


def test_the_traced_forward_pass_is_the_models(model):
    pixels, tokens, _ = batch(model)
    image, text = model.image_tower(), model.text_tower()
    with torch.no_grad():
        torch.testing.assert_close(propagation.trace(image, image.embed(pixels)).embedding, model.encode_image(pixels))
        torch.testing.assert_close(propagation.trace(text, text.embed(**tokens)).embedding, model.encode_text(**tokens))


def test_siglip_rollout_reads_the_pool_heads_attention_through_the_encoders_rollout():
    model = build("siglip")
    pixels, _, sides = batch(model)
    attentions = [a.numpy() for a in model_attentions(model, "siglip", pixels)]
    expected = []
    for b in range(2):
        rolled = np.eye(attentions[0].shape[-1])
        for attention in attentions[:-1]:
            mixed = attention[b].mean(0) + np.eye(len(rolled))
            rolled = (mixed / mixed.sum(-1, keepdims=True)) @ rolled
        expected.append((attentions[-1][b].mean(0) @ rolled)[0].reshape(GRID))
    actual = make_baseline("attention_rollout").attribute_image(model, pixels, sides)
    torch.testing.assert_close(actual, torch.from_numpy(np.stack(expected)), atol=1e-6, rtol=1e-6)


@pytest.mark.open_clip
def test_open_clip_towers_it_cannot_describe_are_refused_clearly():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    from cliptrace.explain.api import unavailable_methods
    from cliptrace.models.open_clip import OpenCLIPAdapter

    vision = dict(layers=1, width=32, head_width=8, patch_size=8, image_size=32, attentional_pool=True,
                  attn_pooler_queries=4, attn_pooler_heads=4)
    config = {"embed_dim": 16, "vision_cfg": vision,
              "text_cfg": dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1)}
    model = open_clip.model.CLIP(**config)
    open_clip.model.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    adapter = OpenCLIPAdapter(model, SimpleTokenizer(context_length=16), "tiny-attn-pool", config)
    with pytest.raises(TowerUnavailable, match="attentional pooling"):
        adapter.image_tower()
    skipped = unavailable_methods(adapter, ["decomposition", "chefer", "occlusion", "gradient"])
    assert set(skipped) == {"decomposition", "chefer"}
    assert "attentional pooling" in skipped["chefer"]
    adapter.text_tower()  # the text tower is still described


@pytest.mark.open_clip
@pytest.mark.parametrize("text_cfg", [dict(no_causal_mask=True), dict(pool_type="eos", eos_id=49407),
                                      dict(ls_init_value=0.5)], ids=["bidirectional-padding-mask", "eos", "layer-scale"])
def test_open_clip_text_transformer_variants_decompose_exactly(text_cfg):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    from cliptrace.models.open_clip import OpenCLIPAdapter

    config = {"embed_dim": 16, "custom_text": True,
              "vision_cfg": dict(layers=1, width=32, head_width=8, patch_size=8, image_size=32, ls_init_value=0.5),
              "text_cfg": dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=2, **text_cfg)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CustomTextCLIP(
            config["embed_dim"], config["vision_cfg"], config["text_cfg"]).double().eval()
    model.text.use_pad_mask = model.text.attn_mask is None  # open_clip masks padding in bidirectional towers only
    open_clip.model.set_model_preprocess_cfg(model, {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    adapter = OpenCLIPAdapter(model, SimpleTokenizer(context_length=16), "tiny-custom-text", config)
    pixels, tokens, _ = batch(adapter)
    with torch.no_grad():
        text, image = text_components(adapter, **tokens), image_components(adapter, pixels)
        psi, phi = adapter.encode_text(**tokens), adapter.encode_image(pixels)
    assert ((text.sum(1) - psi).norm() / psi.norm()) < 1e-10
    assert ((image.sum(1) - phi).norm() / phi.norm()) < 1e-10
