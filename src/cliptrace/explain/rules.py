"""Propagation rules of the exact decomposition: each pushes per-source components through one operation.

A *component tensor* ``C`` has shape (B, S, ..., D): the contribution of each of S sources (patches or tokens, the
last one being the constant source) to a hidden state of shape (B, ..., D). Its sum over the source axis is the
hidden state itself. Each rule takes the *frozen state* of the real forward pass (the LayerNorm standard
deviation, the activation gate, the attention probabilities) as an explicit argument, so that

* it preserves the sum: ``rule(C).sum(1) == op(C.sum(1))``, and
* it is linear in each component, given the frozen state; biases go to the constant source alone.

That makes the whole network affine in the sources, and the sources' contributions sum exactly to the output.
Nothing is divided by a component and no operand of a product is rescaled: attention decomposes its values only,
with the probabilities computed once from the full hidden state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONSTANT = -1  # index of the constant source on the source axis


def linear(components: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``C Wᵀ`` for every source; the bias goes to the constant source."""
    out = components @ weight.T
    if bias is not None:
        out[:, CONSTANT] += bias
    return out


def layer_norm_sigma(full: torch.Tensor, layer: nn.LayerNorm) -> torch.Tensor:
    """The frozen state of a LayerNorm: the standard deviation ``√(var + ε)`` of the full hidden state, (B, ..., 1)."""
    return torch.sqrt(full.var(-1, unbiased=False, keepdim=True) + layer.eps)


def layer_norm(components: torch.Tensor, layer: nn.LayerNorm, sigma: torch.Tensor) -> torch.Tensor:
    """``γ ⊙ (C_s − mean_d C_s) / σ`` with σ from :func:`layer_norm_sigma`; β to the constant."""
    out = (components - components.mean(-1, keepdim=True)) / sigma.unsqueeze(1)
    if layer.weight is not None:
        out = out * layer.weight
    if layer.bias is not None:
        out[:, CONSTANT] += layer.bias
    return out


def activation_gate(pre_activation: torch.Tensor, name: str) -> torch.Tensor:
    """The gate g(z) with ``act(z) = z · g(z)`` for a HuggingFace activation name, evaluated at the full ``z``.

    Raises:
        ValueError: The activation is not of the form ``z · g(z)``.
    """
    z = pre_activation
    if name == "quick_gelu":
        return torch.sigmoid(1.702 * z)
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))
    if name == "relu":
        return (z > 0).to(z.dtype)
    raise ValueError(f"activation {name!r} has no exact gate; supported: quick_gelu, gelu, gelu_new, relu")


def gate(components: torch.Tensor, full_gate: torch.Tensor) -> torch.Tensor:
    """Multiply every component by the gate of the full pre-activation: ``Σ_s C_s g(z) = z g(z) = act(z)``."""
    return components * full_gate.unsqueeze(1)


def attention_values(components: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Mix value components with frozen attention probabilities, head by head.

    Args:
        components: Value components (B, S, M, H·dh) (already through the value projection) at M key positions.
        probabilities: Attention probabilities (B, H, N, M) of N queries, from the full hidden state.

    Returns:
        (B, S, N, H·dh): each source's share of the attention output at every query.
    """
    batch, sources, positions, width = components.shape
    heads = probabilities.shape[1]
    values = components.reshape(batch, sources, positions, heads, width // heads)
    mixed = torch.einsum("bhnm,bsmhe->bsnhe", probabilities.to(components.dtype), values)
    return mixed.reshape(batch, sources, probabilities.shape[2], width)


def scale_by_norm(components: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """L2 normalization with the norm (B, ..., 1) of the full vector frozen: ``C_s / ‖Σ_s C_s‖``."""
    return components / norm.unsqueeze(1)
