"""``torch.nn.functional.multi_head_attention_forward`` written with its projections as separate, observable calls.

torch's own function applies the packed in-projection and the out-projection inside one call, so no module hook
sees them. :func:`multi_head_attention` computes the same attention (explicit softmax, batch-first inside) and hands
every projection to a ``linear(x, weight, bias)`` callable, where the factored path forms its per-example blocks.
It covers packed in-projections (``nn.MultiheadAttention`` with ``kdim == vdim == embed_dim``) without ``bias_k``,
``bias_v``, ``add_zero_attn`` or static keys; :func:`supports` says whether a call is one of those.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a ``multi_head_attention_forward`` call by name, defaults filled in."""
    bound = _SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def supports(call: dict[str, Any]) -> bool:
    """Whether :func:`multi_head_attention` computes this (bound) call: packed weights, batched inputs, no extras."""
    return (call["in_proj_weight"] is not None and not call["use_separate_proj_weight"]
            and call["bias_k"] is None and call["bias_v"] is None and not call["add_zero_attn"]
            and call["static_k"] is None and call["static_v"] is None and call["query"].dim() == 3)


def multi_head_attention(linear: Linear, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What ``F.multi_head_attention_forward`` returns for the bound ``call``, projecting through ``linear``.

    Inputs are sequence-first (L, B, E) as torch passes them; each projection sees batch-first (B, L, E) rows.
    For cross-attention each input is projected by the whole packed weight and the unused thirds are dropped, so
    every projection is one ``linear`` call on the packed parameter (their gradients are zero).
    """
    query, key, value = (call[name].transpose(0, 1) for name in ("query", "key", "value"))
    weight, bias, heads = call["in_proj_weight"], call["in_proj_bias"], call["num_heads"]
    batch, length, width = query.shape
    if call["key"] is call["value"] and call["query"] is call["key"]:
        q, k, v = linear(query, weight, bias).chunk(3, -1)
    else:
        q = linear(query, weight, bias)[..., :width]
        k, v = (linear(key, weight, bias).chunk(3, -1)[1:] if call["key"] is call["value"]
                else (linear(key, weight, bias).chunk(3, -1)[1], linear(value, weight, bias).chunk(3, -1)[2]))
    source = k.shape[1]
    q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) / (width // heads) ** 0.5
    scores = scores + _additive_mask(call, batch, heads, length, source, scores.dtype)
    if call["need_weights"]:
        weights = torch.softmax(scores, -1)
    else:  # like torch's fused path, a query that may attend to no key gets a zero output (not NaN)
        blind = torch.isneginf(scores).all(-1, keepdim=True)
        weights = torch.softmax(scores.masked_fill(blind, 0), -1).masked_fill(blind, 0)
    if call["training"] and call["dropout_p"] > 0:
        weights = F.dropout(weights, call["dropout_p"])
    attended = (weights @ v).transpose(1, 2).reshape(batch, length, width)
    output = linear(attended, call["out_proj_weight"], call["out_proj_bias"]).transpose(0, 1)
    if not call["need_weights"]:
        return output, None
    return output, weights.mean(1) if call["average_attn_weights"] else weights


def _additive_mask(call: dict[str, Any], batch: int, heads: int, length: int, source: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """``attn_mask`` and ``key_padding_mask`` as one additive (B or 1, H or 1, L, S) mask (boolean True = masked)."""
    mask = torch.zeros(1, 1, length, source, dtype=dtype, device=call["query"].device)
    attn_mask, padding = call["attn_mask"], call["key_padding_mask"]
    if attn_mask is None and call["is_causal"]:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # torch's own error
    if attn_mask is not None:
        attn_mask = _as_additive(attn_mask, dtype)
        mask = mask + (attn_mask.reshape(batch, heads, length, source) if attn_mask.dim() == 3 else attn_mask)
    if padding is not None:
        mask = mask + _as_additive(padding, dtype).reshape(batch, 1, 1, source)
    return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = leave out) as 0 / −inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
