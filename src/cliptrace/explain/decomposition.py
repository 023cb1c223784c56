"""Exact additive decomposition of a HuggingFace CLIP similarity over image patches and caption tokens.

The real forward pass fixes every nonlinear quantity: attention probabilities, LayerNorm standard deviations,
activation gates and the embedding norms. With those frozen, both towers are affine in their input embeddings, so
each patch embedding and each token embedding owns a component of the image or text embedding, and one constant
source owns the rest (class and position embeddings, biases, LayerNorm shifts). The components are pushed through
every layer with the rules of :mod:`cliptrace.explain.rules` and sum to the real embeddings to float precision.
The logit ``τ ⟨φ, ψ⟩`` of ``φ = Σ_s φ_s`` and ``ψ = Σ_t ψ_t`` then splits exactly into the patch × token
interaction matrix ``τ ⟨φ_s, ψ_t⟩``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from cliptrace.explain import rules
from cliptrace.explain.base import AttributionMethod, patch_grid, require_hf_clip
from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP


def image_components(model: HFCLIP, pixel_values: torch.Tensor) -> torch.Tensor:
    """Per-patch components of the normalized image embedding, (B, P + 1, E); the last row is the constant source.

    Patch s owns its patch embedding (the patch-embedding convolution of its pixels); the constant source owns
    the class embedding and all position embeddings. ``components.sum(1)`` is ``model.encode_image(pixel_values)``.
    """
    vision = model.model.vision_model
    embeddings = vision.embeddings
    pixel_values = pixel_values.to(embeddings.patch_embedding.weight.dtype)
    if pixel_values.shape[-2:] != (embeddings.image_size, embeddings.image_size):
        raise ValueError(
            f"images are {tuple(pixel_values.shape[-2:])} pixels; the model takes "
            f"{embeddings.image_size}×{embeddings.image_size}"
        )
    patches = embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, P, D)
    batch, count, width = patches.shape
    components = patches.new_zeros(batch, count + 1, count + 1, width)
    source = torch.arange(count, device=patches.device)
    components[:, source, source + 1] = patches
    components[:, rules.CONSTANT, 0] = embeddings.class_embedding
    components[:, rules.CONSTANT] += embeddings.position_embedding(embeddings.position_ids[0])
    components = _layer_norm(components, vision.pre_layrnorm)
    for layer in vision.encoder.layers:
        components = _encoder_layer(components, layer, attention_mask=None)
    pooled = _layer_norm(components[:, :, 0], vision.post_layernorm)
    return _normalized(rules.linear(pooled, model.model.visual_projection.weight))


def text_components(model: HFCLIP, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token components of the normalized text embedding, (B, L + 1, E); the last row is the constant source.

    Token t owns its token embedding; the constant source owns the position embeddings. Padding tokens own
    exactly zero (no real position attends to them). ``components.sum(1)`` is ``model.encode_text(...)``.
    """
    text = model.model.text_model
    embeddings = text.embeddings
    tokens = embeddings.token_embedding(input_ids)  # (B, L, D)
    batch, length, width = tokens.shape
    components = tokens.new_zeros(batch, length + 1, length, width)
    position = torch.arange(length, device=tokens.device)
    components[:, position, position] = tokens
    components[:, rules.CONSTANT] = embeddings.position_embedding(position)
    mask = _causal_padding_mask(attention_mask, tokens.dtype)
    for layer in text.encoder.layers:
        components = _encoder_layer(components, layer, attention_mask=mask)
    components = _layer_norm(components, text.final_layer_norm)
    pooled = components[torch.arange(batch, device=tokens.device), :, _pooled_position(text, input_ids)]
    return _normalized(rules.linear(pooled, model.model.text_projection.weight))


def interaction(model: HFCLIP, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The logit split over sources: ``τ ⟨φ_s, ψ_t⟩`` of image components (B, S, E) and text components (B, T, E)."""
    return model.logit_scale.exp() * torch.einsum("bse,bte->bst", image, text)


class ExactDecomposition(AttributionMethod):
    """Exact patch and token contributions to the logit, summing to it with the constant source (HF CLIP only).

    The image map of patch s is ``τ ⟨φ_s, v⟩`` for the text side v; the text map of token t is ``τ ⟨u, ψ_t⟩``.
    Both are signed and, with the constant source, sum to the logit to float precision.
    """

    name = "decomposition"
    image_level = "patch"

    @torch.no_grad()
    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Patch contributions (B, gh, gw); the constant source's share is ``logit − map.sum()``."""
        clip = require_hf_clip(model, "the exact decomposition")
        scores = _side_scores(clip, image_components(clip, pixel_values), text_side)
        return scores[:, :-1].reshape(-1, *patch_grid(clip, pixel_values))

    @torch.no_grad()
    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Token contributions (B, L), zero at padding."""
        clip = require_hf_clip(model, "the exact decomposition")
        return _side_scores(clip, text_components(clip, input_ids, attention_mask), image_side)[:, :-1]


def _side_scores(model: HFCLIP, components: torch.Tensor, other_side: torch.Tensor) -> torch.Tensor:
    """``τ ⟨component_s, other_side⟩`` for every source, (B, S)."""
    other_side = other_side.to(components.dtype)
    return model.logit_scale.exp() * torch.einsum("bse,be->bs", components, other_side)


def _encoder_layer(
    components: torch.Tensor, layer: CLIPEncoderLayer, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """One pre-LN transformer block: attention and MLP residual branches with frozen state."""
    attention = layer.self_attn
    normed = _layer_norm(components, layer.layer_norm1)
    probabilities = _attention_probabilities(normed.sum(1), attention, attention_mask)
    values = rules.linear(normed, attention.v_proj.weight, attention.v_proj.bias)
    mixed = rules.attention_values(values, probabilities)
    components = components + rules.linear(mixed, attention.out_proj.weight, attention.out_proj.bias)

    mlp = layer.mlp
    normed = _layer_norm(components, layer.layer_norm2)
    hidden = rules.linear(normed, mlp.fc1.weight, mlp.fc1.bias)
    gated = rules.gate(hidden, rules.activation_gate(hidden.sum(1), mlp.config.hidden_act))
    return components + rules.linear(gated, mlp.fc2.weight, mlp.fc2.bias)


def _layer_norm(components: torch.Tensor, layer: nn.LayerNorm) -> torch.Tensor:
    """A LayerNorm with σ frozen at the full hidden state's."""
    return rules.layer_norm(components, layer, rules.layer_norm_sigma(components.sum(1), layer))


def _normalized(components: torch.Tensor) -> torch.Tensor:
    """L2 normalization with the full embedding's norm frozen."""
    return rules.scale_by_norm(components, components.sum(1).norm(dim=-1, keepdim=True))


def _attention_probabilities(
    hidden: torch.Tensor, attention: nn.Module, additive_mask: torch.Tensor | None
) -> torch.Tensor:
    """Softmax attention probabilities (B, H, N, N) of the full hidden state (B, N, D), as the real forward pass."""
    batch, positions, _ = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    queries = attention.q_proj(hidden).view(batch, positions, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(hidden).view(batch, positions, heads, head_dim).transpose(1, 2)
    scores = queries @ keys.transpose(-1, -2) * attention.scale
    if additive_mask is not None:
        scores = scores + additive_mask
    return scores.softmax(-1)


def _causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, L, L): a query sees keys at or before it that are not padding."""
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _pooled_position(text: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The position HF CLIP pools each caption at: the first EOS, or the highest token id when ``eos_token_id == 2``."""
    if text.eos_token_id == 2:
        return input_ids.to(torch.int).argmax(-1)
    return (input_ids.to(torch.int) == text.eos_token_id).int().argmax(-1)
