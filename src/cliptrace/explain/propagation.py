"""Run a described tower (:mod:`cliptrace.models.towers`) on per-source components, with its nonlinear state frozen.

A *component tensor* (B, S, N, D) holds the share of each of S sources in a hidden state (B, N, D); its sum over
the source axis is the hidden state. :func:`propagate` pushes components through a tower with the rules of
:mod:`cliptrace.explain.rules`. Run on a single source holding the whole input, it *is* the tower's forward pass
and records the nonlinear state (attention probabilities, LayerNorm deviations, activation gates, the embedding
norm); replayed on any split of the input into sources, it yields components summing to that forward's embedding.

:func:`trace` is the single-source pass with its attention probabilities and block inputs exposed and the sources
a gradient leaf, which the attention and embedding-gradient methods read; :func:`components` is the exact split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from cliptrace.explain import rules
from cliptrace.models.towers.base import MLP, Attention, Block, Embedding, MeanPool, Tower, TokenPool


class FrozenState:
    """The nonlinear quantities of one real forward pass, recorded in order and then replayed.

    Attributes:
        values: ``(kind, value)`` pairs in the order they were recorded.
        notes: Hidden states kept for inspection during the recording pass, by kind.
    """

    def __init__(self) -> None:
        self.values: list[tuple[str, torch.Tensor]] = []
        self.notes: dict[str, list[torch.Tensor]] = {}
        self.replaying: Iterator[tuple[str, torch.Tensor]] | None = None

    def get(self, kind: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The next recorded value, or ``compute()`` recorded now as ``kind``."""
        if self.replaying is not None:
            return next(self.replaying)[1]
        value = compute()
        self.values.append((kind, value))
        return value

    def note(self, kind: str, value: torch.Tensor) -> None:
        """Keep ``value`` under ``kind`` while recording; nothing while replaying."""
        if self.replaying is None:
            self.notes.setdefault(kind, []).append(value)

    def recorded(self, kind: str) -> list[torch.Tensor]:
        """Every recorded value of ``kind``, in order."""
        return [value for name, value in self.values if name == kind]

    def replay(self) -> None:
        """Read the recorded values from the start."""
        self.replaying = iter(self.values)


def propagate(tower: Tower, embedding: Embedding, components: torch.Tensor, frozen: FrozenState) -> torch.Tensor:
    """Components (B, S', N, D) of the first hidden state -> components (B, S', E) of the normalized embedding."""
    if tower.pre_norm is not None:
        components = _layer_norm(components, tower.pre_norm, frozen)
    for block in tower.blocks:
        components = _block(components, block, embedding.mask, frozen)
    if tower.final_norm is not None:
        components = _layer_norm(components, tower.final_norm, frozen)
    if isinstance(embedding.pool, TokenPool):
        rows = torch.arange(components.shape[0], device=components.device)
        pooled = components[rows, :, embedding.pool.positions]
    elif isinstance(embedding.pool, MeanPool):
        pooled = torch.einsum("bsnd,bn->bsd", components, embedding.pool.weights.to(components.dtype))
    else:
        head = embedding.pool
        probe = head.probe.to(components.dtype).expand(components.shape[0], 1, -1)
        pooled = _attend(components, probe, head.attention, None, frozen, "pool_attention")
        pooled = (pooled + _mlp(_layer_norm(pooled, head.norm, frozen), head.mlp, frozen))[:, :, 0]
    if tower.projection is not None:
        pooled = rules.linear(pooled, tower.projection.weight, tower.projection.bias)
    norm = frozen.get("norm", lambda: pooled.sum(1).norm(dim=-1, keepdim=True))
    return rules.scale_by_norm(pooled, norm)


@dataclass
class Trace:
    """One real forward pass of a tower, differentiable in its sources.

    Attributes:
        embedding: The normalized embedding (B, E).
        sources: The input embeddings (B, S, D), a leaf that requires grad.
        attentions: Each block's attention probabilities (B, H, N, N), in the graph.
        pool_attention: The attention-pool head's probabilities (B, H, 1, N), or ``None`` without one.
        attention_inputs: Each block's attention input (the ``norm1`` output, or the block input in a post-LN
            block) as the single source's components (B, 1, N, D), in the graph (differentiate w.r.t. these
            tensors, not a slice of them).
    """

    embedding: torch.Tensor
    sources: torch.Tensor
    attentions: list[torch.Tensor]
    pool_attention: torch.Tensor | None
    attention_inputs: list[torch.Tensor]


def trace(tower: Tower, embedding: Embedding) -> Trace:
    """The tower's forward pass on ``embedding`` with its sources as a gradient leaf (grad mode is the caller's)."""
    sources = embedding.sources.detach().requires_grad_(torch.is_grad_enabled())
    frozen = FrozenState()
    output = propagate(tower, embedding, embedding.hidden(sources)[:, None], frozen)[:, 0]
    pooled = frozen.recorded("pool_attention")
    return Trace(output, sources, frozen.recorded("attention"), pooled[0] if pooled else None,
                 frozen.notes.get("attention_input", []))


def components(tower: Tower, embedding: Embedding, *, chunk_size: int | None = None) -> torch.Tensor:
    """Each source's component of the normalized embedding, then the constant source's: (B, S + 1, E).

    The frozen state is recorded with one real forward pass; then the sources are propagated ``chunk_size`` at a
    time (all at once by default). Memory grows with ``B · chunk_size · positions · MLP width``.

    Raises:
        ValueError: ``chunk_size`` is not positive.
    """
    inputs, positions, constant = embedding.sources, embedding.positions, embedding.constant.to(embedding.sources.dtype)
    batch, count, width = inputs.shape
    size = count if chunk_size is None else chunk_size
    if size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    frozen = FrozenState()
    propagate(tower, embedding, embedding.hidden()[:, None], frozen)  # the real forward pass, as one source
    parts = []
    for start in range(0, count, size):
        stop = min(start + size, count)
        # Every chunk carries a constant slot (it collects the biases); only the first chunk's is kept.
        chunk = inputs.new_zeros(batch, stop - start + 1, len(constant), width)
        chunk[:, torch.arange(stop - start, device=inputs.device), positions[start:stop]] = inputs[:, start:stop]
        if start == 0:
            chunk[:, rules.CONSTANT] = constant
        frozen.replay()
        output = propagate(tower, embedding, chunk, frozen)
        parts.append(output if start == 0 else output[:, :-1])
    first = parts[0]
    return torch.cat([first[:, :-1], *parts[1:], first[:, -1:]], dim=1)


def _block(components: torch.Tensor, block: Block, mask: torch.Tensor | None, frozen: FrozenState) -> torch.Tensor:
    """One block: attention and MLP residual branches with frozen state."""
    if block.post_norm:
        return _post_norm_block(components, block, mask, frozen)
    normed = _layer_norm(components, block.norm1, frozen)
    frozen.note("attention_input", normed)
    branch = _attend(normed, None, block.attention, mask, frozen, "attention")
    components = components + _scaled(branch, block.attention_scale)
    branch = _mlp(_layer_norm(components, block.norm2, frozen), block.mlp, frozen)
    return components + _scaled(branch, block.mlp_scale)


def _post_norm_block(
    components: torch.Tensor, block: Block, mask: torch.Tensor | None, frozen: FrozenState
) -> torch.Tensor:
    """One post-LN block: each LayerNorm (σ frozen) follows its residual sum."""
    frozen.note("attention_input", components)
    branch = _attend(components, None, block.attention, mask, frozen, "attention")
    components = _layer_norm(components + _scaled(branch, block.attention_scale), block.norm1, frozen)
    branch = _mlp(components, block.mlp, frozen)
    return _layer_norm(components + _scaled(branch, block.mlp_scale), block.norm2, frozen)


def _attend(
    components: torch.Tensor,
    queries: torch.Tensor | None,
    attention: Attention,
    mask: torch.Tensor | None,
    frozen: FrozenState,
    kind: str,
) -> torch.Tensor:
    """Attention over key/value components (B, S', N, D) with probabilities frozen from the full states; the
    queries are the full states themselves (self-attention) or fixed ``queries`` (B, Nq, D)."""

    def probabilities() -> torch.Tensor:
        keys = components.sum(1)
        return attention.probabilities(keys if queries is None else queries, keys, mask)

    values = rules.linear(components, attention.value.weight, attention.value.bias)
    mixed = rules.attention_values(values, frozen.get(kind, probabilities))
    return rules.linear(mixed, attention.out.weight, attention.out.bias)


def _mlp(components: torch.Tensor, mlp: MLP, frozen: FrozenState) -> torch.Tensor:
    """``fc2(act(fc1(·)))`` with the activation's gate frozen at the full pre-activation."""
    hidden = rules.linear(components, mlp.fc1.weight, mlp.fc1.bias)
    gated = rules.gate(hidden, frozen.get("gate", lambda: rules.activation_gate(hidden.sum(1), mlp.activation)))
    return rules.linear(gated, mlp.fc2.weight, mlp.fc2.bias)


def _scaled(components: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A layer scale (elementwise, so linear in every component), or the components themselves."""
    return components if scale is None else components * scale


def _layer_norm(components: torch.Tensor, layer: nn.LayerNorm, frozen: FrozenState) -> torch.Tensor:
    """A LayerNorm with σ frozen at the full hidden state's."""
    sigma = frozen.get("sigma", lambda: rules.layer_norm_sigma(components.sum(1), layer))
    return rules.layer_norm(components, layer, sigma)
