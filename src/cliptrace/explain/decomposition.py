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

from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from cliptrace.explain import rules
from cliptrace.explain.base import AttributionMethod, patch_grid, require_hf_clip
from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP


class FrozenState:
    """The nonlinear quantities of one real forward pass, recorded in order and then replayed.

    The recording pass propagates a single source holding the whole input, so it *is* the model's forward pass;
    each later pass over a chunk of sources reads the same values back in the same order.
    """

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []
        self.replaying: Iterator[torch.Tensor] | None = None

    def get(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The next recorded value, or ``compute()`` recorded now."""
        if self.replaying is not None:
            return next(self.replaying)
        value = compute()
        self.values.append(value)
        return value

    def replay(self) -> None:
        """Read the recorded values from the start."""
        self.replaying = iter(self.values)


def image_components(
    model: HFCLIP, pixel_values: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-patch components of the normalized image embedding, (B, P + 1, E); the last row is the constant source.

    Patch s owns its patch embedding (the patch-embedding convolution of its pixels); the constant source owns
    the class embedding and all position embeddings. ``components.sum(1)`` is ``model.encode_image(pixel_values)``.

    Args:
        model: The CLIP model.
        pixel_values: Preprocessed images (B, 3, H, W) at the model's input size.
        chunk_size: Sources propagated at a time (all by default). Memory grows with
            ``B · chunk_size · positions · MLP width``; a smaller chunk trades time for memory on large models.
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
    constant = embeddings.position_embedding(embeddings.position_ids[0]).clone()
    constant[0] += embeddings.class_embedding
    positions = torch.arange(1, patches.shape[1] + 1, device=patches.device)

    def propagate(components: torch.Tensor, frozen: FrozenState) -> torch.Tensor:
        components = _layer_norm(components, vision.pre_layrnorm, frozen)
        for layer in vision.encoder.layers:
            components = _encoder_layer(components, layer, None, frozen)
        pooled = _layer_norm(components[:, :, 0], vision.post_layernorm, frozen)
        return _normalized(rules.linear(pooled, model.model.visual_projection.weight), frozen)

    return _by_chunks(patches, positions, constant, propagate, chunk_size)


def text_components(
    model: HFCLIP, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-token components of the normalized text embedding, (B, L + 1, E); the last row is the constant source.

    Token t owns its token embedding; the constant source owns the position embeddings. Padding tokens own
    exactly zero (no real position attends to them). ``components.sum(1)`` is ``model.encode_text(...)``.
    ``chunk_size`` is as in :func:`image_components`.
    """
    text = model.model.text_model
    embeddings = text.embeddings
    tokens = embeddings.token_embedding(input_ids)  # (B, L, D)
    batch, length, _ = tokens.shape
    positions = torch.arange(length, device=tokens.device)
    mask = _causal_padding_mask(attention_mask, tokens.dtype)
    pooled_position = _pooled_position(text, input_ids)

    def propagate(components: torch.Tensor, frozen: FrozenState) -> torch.Tensor:
        for layer in text.encoder.layers:
            components = _encoder_layer(components, layer, mask, frozen)
        components = _layer_norm(components, text.final_layer_norm, frozen)
        pooled = components[torch.arange(batch, device=tokens.device), :, pooled_position]
        return _normalized(rules.linear(pooled, model.model.text_projection.weight), frozen)

    return _by_chunks(tokens, positions, embeddings.position_embedding(positions), propagate, chunk_size)


def _by_chunks(
    inputs: torch.Tensor,
    positions: torch.Tensor,
    constant: torch.Tensor,
    propagate: Callable[[torch.Tensor, FrozenState], torch.Tensor],
    chunk_size: int | None,
) -> torch.Tensor:
    """Record the frozen state with one real forward pass, then propagate the sources chunk by chunk.

    Args:
        inputs: The input embedding of each source (B, S, D); source s enters at position ``positions[s]``.
        positions: (S,) positions of the sources in the sequence.
        constant: The constant source's input (N, D) over all N positions.
        propagate: Pushes components (B, S' + 1, N, D) through the tower with a :class:`FrozenState`.
        chunk_size: Sources per chunk; all at once by default.

    Returns:
        (B, S + 1, E): each source's output component, then the constant source's.
    """
    batch, count, width = inputs.shape
    whole = constant.expand(batch, -1, -1).clone()
    whole[:, positions] += inputs
    frozen = FrozenState()
    propagate(whole[:, None], frozen)  # the real forward pass, as one source
    size = count if chunk_size is None else chunk_size
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    parts = []
    for start in range(0, count, size):
        stop = min(start + size, count)
        # Every chunk carries a constant slot (it collects the biases); only the first chunk's is kept.
        components = inputs.new_zeros(batch, stop - start + 1, len(constant), width)
        chunk = torch.arange(stop - start, device=inputs.device)
        components[:, chunk, positions[start:stop]] = inputs[:, start:stop]
        if start == 0:
            components[:, rules.CONSTANT] = constant
        frozen.replay()
        output = propagate(components, frozen)
        parts.append(output if start == 0 else output[:, :-1])
    first = parts[0]
    return torch.cat([first[:, :-1], *parts[1:], first[:, -1:]], dim=1)


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

    def __init__(self, chunk_size: int | None = None) -> None:
        """``chunk_size``: sources propagated at a time (see :func:`image_components`); all by default."""
        self.chunk_size = chunk_size

    @torch.no_grad()
    def attribute_image(self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
        """Patch contributions (B, gh, gw); the constant source's share is ``logit − map.sum()``."""
        clip = require_hf_clip(model, "the exact decomposition")
        components = image_components(clip, pixel_values, chunk_size=self.chunk_size)
        scores = side_scores(clip, components, text_side)
        return scores[:, :-1].reshape(-1, *patch_grid(clip, pixel_values))

    @torch.no_grad()
    def attribute_text(
        self, model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
    ) -> torch.Tensor:
        """Token contributions (B, L), zero at padding."""
        clip = require_hf_clip(model, "the exact decomposition")
        components = text_components(clip, input_ids, attention_mask, chunk_size=self.chunk_size)
        return side_scores(clip, components, image_side)[:, :-1]


def side_scores(model: HFCLIP, components: torch.Tensor, other_side: torch.Tensor) -> torch.Tensor:
    """``τ ⟨component_s, other_side⟩`` for every source, (B, S): the logit split over one tower's sources."""
    other_side = other_side.to(components.dtype)
    return model.logit_scale.exp() * torch.einsum("bse,be->bs", components, other_side)


def _encoder_layer(
    components: torch.Tensor, layer: CLIPEncoderLayer, attention_mask: torch.Tensor | None, frozen: FrozenState
) -> torch.Tensor:
    """One pre-LN transformer block: attention and MLP residual branches with frozen state."""
    attention = layer.self_attn
    normed = _layer_norm(components, layer.layer_norm1, frozen)
    probabilities = frozen.get(lambda: _attention_probabilities(normed.sum(1), attention, attention_mask))
    values = rules.linear(normed, attention.v_proj.weight, attention.v_proj.bias)
    mixed = rules.attention_values(values, probabilities)
    components = components + rules.linear(mixed, attention.out_proj.weight, attention.out_proj.bias)

    mlp = layer.mlp
    normed = _layer_norm(components, layer.layer_norm2, frozen)
    hidden = rules.linear(normed, mlp.fc1.weight, mlp.fc1.bias)
    gated = rules.gate(hidden, frozen.get(lambda: rules.activation_gate(hidden.sum(1), mlp.config.hidden_act)))
    return components + rules.linear(gated, mlp.fc2.weight, mlp.fc2.bias)


def _layer_norm(components: torch.Tensor, layer: nn.LayerNorm, frozen: FrozenState) -> torch.Tensor:
    """A LayerNorm with σ frozen at the full hidden state's."""
    sigma = frozen.get(lambda: rules.layer_norm_sigma(components.sum(1), layer))
    return rules.layer_norm(components, layer, sigma)


def _normalized(components: torch.Tensor, frozen: FrozenState) -> torch.Tensor:
    """L2 normalization with the full embedding's norm frozen."""
    return rules.scale_by_norm(components, frozen.get(lambda: components.sum(1).norm(dim=-1, keepdim=True)))


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
