"""The tower protocol: one encoder of a dual encoder, described as the parts of a transformer.

Every family (HF CLIP, open_clip ViTs, SigLIP, the frozen-backbone dual encoder's ViT / BERT-style backbones) is the
same computation once its modules are named uniformly:

1. ``embed``: the input embeddings whose contributions are tracked (one per patch or token, the *sources*), the
   constant input (class, position and token-type embeddings) over all N positions, the attention mask and the
   pooling;
2. an optional LayerNorm over every position, then the blocks ``x += attn(norm1(x)); x += mlp(norm2(x))`` (or,
   post-LN as in BERT, ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``) with attention through q/k/v/out
   projections and an MLP ``fc2(act(fc1(·)))``;
3. an optional final LayerNorm over every position, the pooling (one token per row, a mean over positions, or an
   attention-pool head) and an optional projection.

The embedding is the L2-normalized result. A family module only says where these parts are; the exact
decomposition and the attention methods (:mod:`cliptrace.explain`) run on the description alone.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


class TowerUnavailable(TypeError):
    """The model cannot describe this tower as the protocol's parts (e.g. an unsupported pooling or block)."""


@dataclass(frozen=True)
class Affine:
    """``y = x Wᵀ + b``: a linear map with weight (out, in) and an optional bias (out,)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, linear: nn.Linear) -> Affine:
        """The map of a ``torch.nn.Linear`` (sharing its parameters)."""
        return cls(linear.weight, linear.bias)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Apply the map to the last dimension."""
        return F.linear(inputs, self.weight, self.bias)


@dataclass(frozen=True)
class Attention:
    """Multi-head scaled dot-product attention through query, key, value and output projections."""

    query: Affine
    key: Affine
    value: Affine
    out: Affine
    heads: int

    def probabilities(
        self, queries: torch.Tensor, keys: torch.Tensor, additive_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Softmax probabilities (B, H, Nq, Nk) of query inputs (B, Nq, D) over key inputs (B, Nk, D)."""
        batch, count, _ = queries.shape
        query = self.query(queries).view(batch, count, self.heads, -1).transpose(1, 2)
        key = self.key(keys).view(batch, keys.shape[1], self.heads, -1).transpose(1, 2)
        scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5
        if additive_mask is not None:
            scores = scores + additive_mask
        return scores.softmax(-1)


@dataclass(frozen=True)
class MLP:
    """``fc2(act(fc1(x)))`` with an activation ``act(z) = z · g(z)`` named as HuggingFace names it."""

    fc1: Affine
    fc2: Affine
    activation: str


@dataclass(frozen=True)
class Block:
    """``x += s1 ⊙ attention(norm1(x)); x += s2 ⊙ mlp(norm2(x))``, s1 and s2 being optional layer scales.

    With ``post_norm`` the LayerNorms follow the residual sums instead (BERT, DistilBERT):
    ``x = norm1(x + s1 ⊙ attention(x)); x = norm2(x + s2 ⊙ mlp(x))``.
    """

    norm1: nn.LayerNorm
    attention: Attention
    norm2: nn.LayerNorm
    mlp: MLP
    attention_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None
    post_norm: bool = False


@dataclass(frozen=True)
class TokenPool:
    """Pool one position per row: the class token, the EOS token or the last token."""

    positions: torch.Tensor  # (B,)


@dataclass(frozen=True)
class AttentionPool:
    """A multi-head attention-pool head (SigLIP's MAP head): a learned probe attends over every position, then
    ``y += mlp(norm(y))`` with the attention output y as the residual."""

    probe: torch.Tensor  # (D,)
    attention: Attention
    norm: nn.LayerNorm
    mlp: MLP


@dataclass(frozen=True)
class MeanPool:
    """A weighted mean over positions ``Σ_n w_n h_n``: ``1/count`` at the positions pooled, 0 elsewhere.

    Attributes:
        weights: (B, N) the weight of each position.
    """

    weights: torch.Tensor

    @classmethod
    def over(cls, kept: torch.Tensor, dtype: torch.dtype) -> MeanPool:
        """The mean over the positions where ``kept`` (B, N) is nonzero (an all-zero row pools to zero)."""
        kept = kept.to(dtype)
        return cls(kept / kept.sum(-1, keepdim=True).clamp_min(1.0))


Pool = TokenPool | MeanPool | AttentionPool


@dataclass(frozen=True)
class Embedding:
    """A tower's input for one batch.

    Attributes:
        sources: Input embedding of each source (B, S, D): patch embeddings or token embeddings.
        positions: (S,) the sequence position each source enters at.
        constant: (N, D) the input no source owns over all N positions (class, position and token-type
            embeddings).
        mask: Additive attention mask broadcastable to (B, H, N, N), or ``None``.
        pool: How the tower pools the final states.
    """

    sources: torch.Tensor
    positions: torch.Tensor
    constant: torch.Tensor
    mask: torch.Tensor | None
    pool: Pool

    def hidden(self, sources: torch.Tensor | None = None) -> torch.Tensor:
        """The first hidden state (B, N, D): the constant plus each source (``sources`` instead, if given)."""
        sources = self.sources if sources is None else sources
        whole = self.constant.to(sources.dtype).expand(sources.shape[0], -1, -1).clone()
        whole[:, self.positions] += sources
        return whole


class Tower(abc.ABC):
    """One encoder as the protocol's parts (see the module); subclasses implement :meth:`embed`.

    Attributes:
        pre_norm: LayerNorm over every position before the first block, or ``None``.
        blocks: The transformer blocks in order.
        final_norm: LayerNorm over every position after the last block, or ``None``.
        projection: The map from the pooled state to the joint space, or ``None``.
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        final_norm: nn.LayerNorm | None,
        *,
        pre_norm: nn.LayerNorm | None = None,
        projection: Affine | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.final_norm = final_norm
        self.pre_norm = pre_norm
        self.projection = projection

    @abc.abstractmethod
    def embed(self, *inputs: torch.Tensor) -> Embedding:
        """The sources, constant, mask and pooling of a batch of inputs."""


class ImageTower(Tower):
    """A ViT image tower; its sources are the patch embeddings in raster order.

    Attributes:
        patch_size: Side of one square patch in pixels.
    """

    patch_size: int

    @abc.abstractmethod
    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """Patch sources and the constant of preprocessed images (B, 3, H, W)."""

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """The (rows, columns) of the patch grid of images shaped like ``pixel_values``."""
        height, width = pixel_values.shape[-2:]
        return height // self.patch_size, width // self.patch_size


class TextTower(Tower):
    """A text tower; its sources are the token embeddings.

    Attributes:
        token_embedding: The module whose output (B, L, D) are the sources.
        special_ids: Token ids that are not words (BOS, EOS, padding): token maps attribute no word to them.
        neutral_id: The id that stands in for a removed word (occlusion, integrated-gradient baselines).
    """

    token_embedding: nn.Module
    special_ids: frozenset[int]
    neutral_id: int

    @abc.abstractmethod
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embedding:
        """Token sources, position constant, mask and pooling of tokenized texts (B, L)."""


@runtime_checkable
class DescribesTowers(Protocol):
    """A dual encoder that describes its towers; either method may raise :class:`TowerUnavailable`."""

    def image_tower(self) -> ImageTower:
        """The image tower."""

    def text_tower(self) -> TextTower:
        """The text tower."""


def require_layer_norm(module: nn.Module, where: str) -> nn.LayerNorm:
    """``module`` if it is a LayerNorm; else :class:`TowerUnavailable` naming ``where``."""
    if not isinstance(module, nn.LayerNorm):
        raise TowerUnavailable(f"{where} is a {type(module).__name__}, not a LayerNorm")
    return module


def multihead_attention(attention: nn.MultiheadAttention) -> Attention:
    """A ``torch.nn.MultiheadAttention`` with packed ``in_proj`` weights as the protocol's attention."""
    if attention.in_proj_weight is None or attention.bias_k is not None or not attention.batch_first:
        raise TowerUnavailable("only batch-first nn.MultiheadAttention with a packed in_proj and no bias_k/bias_v")
    weights = attention.in_proj_weight.chunk(3)
    biases = (None,) * 3 if attention.in_proj_bias is None else attention.in_proj_bias.chunk(3)
    query, key, value = (Affine(weight, bias) for weight, bias in zip(weights, biases))
    out = Affine(attention.out_proj.weight, attention.out_proj.bias)
    return Attention(query, key, value, out, attention.num_heads)


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype, *, causal: bool) -> torch.Tensor:
    """Additive mask (B, 1, L, L): a query sees non-padding keys (and with ``causal`` only those at or before it)."""
    length = attention_mask.shape[-1]
    allowed = attention_mask.bool()[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
