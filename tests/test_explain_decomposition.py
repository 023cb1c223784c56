"""The exact decomposition: completeness against the real model, and a cross-check by gradient×input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.clip import modeling_clip

from cliptrace.explain.decomposition import ExactDecomposition, image_components, interaction, text_components
from cliptrace.models import HFCLIP, train_tokenizer

CAPTIONS = ["a red circle", "a small blue square above a green cross", "two yellow triangles", "a purple cross"]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def tiny_clip(hidden_act: str, dtype: torch.dtype, *, eos_is_two: bool = False, layers: int = 2) -> HFCLIP:
    """A tiny CLIP with non-trivial LayerNorm and bias values; ``eos_is_two`` makes HF pool at the highest token id."""
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, hidden_act=hidden_act, image_size=32,
                               vision_num_hidden_layers=layers, text_num_hidden_layers=layers).to(dtype).eval()
    if eos_is_two:
        model.model.text_model.eos_token_id = 2
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
        model.logit_scale.fill_(3.0)
    return model


def inputs(model: HFCLIP, captions: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=generator, dtype=model.logit_scale.dtype)
    return pixels, model.tokenize(captions)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("captions", [CAPTIONS[:1], CAPTIONS[2:3] * 2, CAPTIONS], ids=["one", "unpadded", "padded"])
@pytest.mark.parametrize("eos_is_two", [False, True], ids=["pool-eos", "pool-argmax"])
def test_components_sum_to_the_real_embeddings_and_logit(dtype, hidden_act, captions, eos_is_two):
    model = tiny_clip(hidden_act, dtype, eos_is_two=eos_is_two)
    pixels, tokens = inputs(model, captions)
    if len(captions) == len(CAPTIONS):
        assert (tokens["attention_mask"] == 0).any()
    with torch.no_grad():
        image, text = image_components(model, pixels), text_components(model, **tokens)
        phi, psi = model.encode_image(pixels), model.encode_text(**tokens)
        logit = model.logit_scale.exp() * (phi * psi).sum(-1)
        split = interaction(model, image, text)
    tolerance = TOLERANCE[dtype]
    assert image.shape == (len(captions), 16 + 1, phi.shape[-1])
    assert relative(image.sum(1), phi) < tolerance
    assert relative(text.sum(1), psi) < tolerance
    # A logit is at most τ in size; near-orthogonal random embeddings give logits far below it, where float32
    # rounding of the embeddings alone exceeds 1e-5 of |logit|. So float32 is measured against τ, float64
    # against |logit|.
    scale = logit.abs() if dtype == torch.float64 else model.logit_scale.exp()
    assert ((split.sum((1, 2)) - logit).abs() / scale).max() < tolerance
    padding = tokens["attention_mask"] == 0
    assert (text[:, :-1][padding] == 0).all()


def test_image_and_text_maps_with_the_constants_sum_to_the_logit():
    model = tiny_clip("quick_gelu", torch.float64)
    pixels, tokens = inputs(model, CAPTIONS)
    method = ExactDecomposition()
    with torch.no_grad():
        phi, psi = model.encode_image(pixels), model.encode_text(**tokens)
        split = interaction(model, image_components(model, pixels), text_components(model, **tokens))
    image_map = method.attribute_image(model, pixels, psi)
    text_map = method.attribute_text(model, tokens["input_ids"], tokens["attention_mask"], phi)
    assert image_map.shape == (4, 4, 4)
    torch.testing.assert_close(image_map.flatten(1), split.sum(2)[:, :-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(text_map, split.sum(1)[:, :-1], rtol=1e-12, atol=1e-12)


def test_a_wrong_image_size_is_refused():
    model = tiny_clip("quick_gelu", torch.float32)
    with pytest.raises(ValueError, match="takes 32×32"):
        image_components(model, torch.zeros(1, 3, 64, 64))


# --- independent cross-check: gradient × input on a copy with detached attention, LayerNorm σ and gates ---------


class DetachedSigmaLayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + self.norm.eps).detach()
        return (x - x.mean(-1, keepdim=True)) / sigma * self.norm.weight + self.norm.bias


class DetachedGate(nn.Module):
    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * (self.activation(z) / z).detach()


def detached_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = weights.softmax(-1).detach()
    return (weights @ value).transpose(1, 2).contiguous(), weights


def detached_copy(model: HFCLIP) -> HFCLIP:
    clone = copy.deepcopy(model)
    clone.model.set_attn_implementation("eager")
    for module in list(clone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(module, name, DetachedSigmaLayerNorm(child))
        if isinstance(module, modeling_clip.CLIPMLP):
            module.activation_fn = DetachedGate(module.activation_fn)
    return clone


def capture_output(module: nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    """Replace ``module``'s output with a leaf that requires grad, kept in ``store``."""
    def hook(_module, _args, output):
        leaf = output.detach().requires_grad_(True)
        store.append(leaf)
        return leaf
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_per_source_scores_equal_gradient_x_input_on_a_detached_copy(hidden_act, monkeypatch):
    model = tiny_clip(hidden_act, torch.float64)
    pixels, tokens = inputs(model, CAPTIONS)
    monkeypatch.setattr(modeling_clip, "eager_attention_forward", detached_attention)
    clone = detached_copy(model)
    patches, words = [], []
    handles = [capture_output(clone.model.vision_model.embeddings.patch_embedding, patches),
               capture_output(clone.model.text_model.embeddings.token_embedding, words)]
    try:
        image = clone.encode_image(pixels, normalize=False)
        text = clone.encode_text(**tokens, normalize=False)
    finally:
        for handle in handles:
            handle.remove()
    image = image / image.norm(dim=-1, keepdim=True).detach()
    text = text / text.norm(dim=-1, keepdim=True).detach()
    logit = clone.logit_scale.exp() * (image * text).sum(-1)
    patch_grad, word_grad = torch.autograd.grad(logit.sum(), [patches[0], words[0]], create_graph=True)
    patch_scores = (patch_grad * patches[0]).sum(1).flatten(1)  # conv output (B, D, gh, gw) -> (B, P)
    word_scores = (word_grad * words[0]).sum(-1)

    with torch.no_grad():
        split = interaction(model, image_components(model, pixels), text_components(model, **tokens))
    torch.testing.assert_close(patch_scores.detach(), split.sum(2)[:, :-1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(word_scores.detach(), split.sum(1)[:, :-1], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logit.detach(), split.sum((1, 2)), rtol=1e-10, atol=0)

    # The interaction of patch s and token t is the mixed second derivative contracted with both inputs.
    for token in range(4):
        token_score = word_scores[:, token].sum()
        (mixed,) = torch.autograd.grad(token_score, patches[0], retain_graph=True, allow_unused=True)
        mixed = torch.zeros_like(patches[0]) if mixed is None else mixed
        torch.testing.assert_close((mixed * patches[0]).sum(1).flatten(1).detach(), split[:, :-1, token],
                                   rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 16])
def test_propagating_sources_in_chunks_gives_the_same_components(chunk_size):
    model = tiny_clip("gelu", torch.float64)
    pixels, tokens = inputs(model, CAPTIONS)
    with torch.no_grad():
        whole_image, whole_text = image_components(model, pixels), text_components(model, **tokens)
        image = image_components(model, pixels, chunk_size=chunk_size)
        text = text_components(model, **tokens, chunk_size=chunk_size)
    torch.testing.assert_close(image, whole_image, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(text, whole_text, rtol=1e-12, atol=1e-14)


ARCHITECTURES = {
    "patch4-2heads": dict(image_size=24, vision_patch_size=4, vision_num_attention_heads=2, text_num_attention_heads=2),
    "patch8-1head": dict(image_size=32, vision_num_attention_heads=1, text_num_attention_heads=1),
    "wide-mlp": dict(image_size=16, vision_intermediate_size=300, text_intermediate_size=200, projection_dim=24),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_completeness_holds_for_other_patch_grids_and_widths(name):
    options = ARCHITECTURES[name]
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=300, context_length=16)
    model = HFCLIP.from_preset("tiny", tokenizer, seed=0, vision_num_hidden_layers=1, text_num_hidden_layers=1,
                               **options).double().eval()
    size = options["image_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    method = ExactDecomposition(chunk_size=5)
    with torch.no_grad():
        psi = model.encode_text(**model.tokenize(CAPTIONS[:2]))
        logit = model.logit_scale.exp() * (model.encode_image(pixels) * psi).sum(-1)
        image = image_components(model, pixels, chunk_size=5)
    image_map = method.attribute_image(model, pixels, psi)
    patch = model.model.vision_model.embeddings.patch_size
    assert image_map.shape == (2, size // patch, size // patch)
    constant = model.logit_scale.exp() * (image[:, -1] * psi).sum(-1)
    torch.testing.assert_close(image_map.sum((1, 2)) + constant, logit, rtol=1e-10, atol=1e-12)
