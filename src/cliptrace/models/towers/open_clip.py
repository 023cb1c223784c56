"""open_clip towers: ``VisionTransformer`` (class token, ``ln_pre``, ``ln_post``, ``proj`` matrix) and the text
transformer of ``CLIP`` (or a ``TextTransformer``), whose blocks run ``nn.MultiheadAttention``. Importing this
module imports open_clip (the optional extra).

Only what the exact decomposition can follow is described; anything else (timm or ResNet image towers, attention
pooling, average pooling, class tokens appended to text, custom blocks with extra norms) raises
:class:`~cliptrace.models.towers.base.TowerUnavailable` naming it.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from cliptrace.models.towers.base import (
    MLP,
    Affine,
    Block,
    Embedding,
    ImageTower,
    TextTower,
    TokenPool,
    TowerUnavailable,
    causal_padding_mask,
    multihead_attention,
    require_layer_norm,
)

def _activation(module: nn.Module) -> str:
    """The HuggingFace name of an activation module, for its gate rule."""
    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu_pytorch_tanh"
    if isinstance(module, nn.ReLU):
        return "relu"
    raise TowerUnavailable(f"activation {type(module).__name__} has no exact gate rule")


def _scale(module: nn.Module) -> torch.Tensor | None:
    """A LayerScale's ``gamma``; ``None`` for an identity."""
    return None if isinstance(module, nn.Identity) else module.gamma


def transformer_blocks(transformer: nn.Module, where: str) -> list[Block]:
    """The ``resblocks`` of an open_clip ``Transformer`` as protocol blocks.

    Raises:
        TowerUnavailable: A block is not a plain ``ResidualAttentionBlock`` (custom blocks add norms and scales).
    """
    blocks = []
    for index, block in enumerate(transformer.resblocks):
        name = f"{where}.resblocks.{index}"
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise TowerUnavailable(f"{name} is a {type(block).__name__}; only ResidualAttentionBlock is described")
        mlp = MLP(Affine(block.mlp.c_fc.weight, block.mlp.c_fc.bias),
                  Affine(block.mlp.c_proj.weight, block.mlp.c_proj.bias), _activation(block.mlp.gelu))
        blocks.append(Block(
            norm1=require_layer_norm(block.ln_1, f"{name}.ln_1"),
            attention=multihead_attention(block.attn),
            norm2=require_layer_norm(block.ln_2, f"{name}.ln_2"),
            mlp=mlp,
            attention_scale=_scale(block.ls_1),
            mlp_scale=_scale(block.ls_2),
        ))
    return blocks


class OpenCLIPImageTower(ImageTower):
    """An open_clip ``VisionTransformer`` with class-token pooling: ``proj(ln_post(CLS))``."""

    def __init__(self, model: nn.Module) -> None:
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise TowerUnavailable(f"open_clip image tower {type(visual).__name__} is not a VisionTransformer")
        if visual.attn_pool is not None:
            raise TowerUnavailable("open_clip image towers with attentional pooling (attn_pool) are not described")
        if visual.pool_type != "tok":
            raise TowerUnavailable(f"open_clip pool_type {visual.pool_type!r}: only class-token pooling ('tok')")
        pre_norm = None if isinstance(visual.ln_pre, nn.Identity) else require_layer_norm(visual.ln_pre, "ln_pre")
        super().__init__(
            transformer_blocks(visual.transformer, "visual.transformer"),
            require_layer_norm(visual.ln_post, "visual.ln_post"),
            pre_norm=pre_norm,
            projection=None if visual.proj is None else Affine(visual.proj.T),
        )
        self.visual = visual
        self.patch_size = visual.conv1.kernel_size[0]

    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """Patch embeddings (``conv1``) as sources; class and position embeddings as the constant.

        Raises:
            ValueError: The images do not give the model's patch grid.
        """
        visual = self.visual
        pixel_values = pixel_values.to(visual.conv1.weight.dtype)
        patches = visual.conv1(pixel_values).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != len(visual.positional_embedding):
            raise ValueError(f"images of {tuple(pixel_values.shape[-2:])} pixels give {patches.shape[1]} patches; "
                             f"the model has positions for {len(visual.positional_embedding) - 1}")
        constant = visual.positional_embedding.clone()
        constant[0] += visual.class_embedding
        positions = torch.arange(1, patches.shape[1] + 1, device=patches.device)
        pool = TokenPool(torch.zeros(len(patches), dtype=torch.long, device=patches.device))
        return Embedding(patches, positions, constant, None, pool)


class OpenCLIPTextTower(TextTower):
    """The text tower of an open_clip ``CLIP`` (parts on the model itself) or a ``TextTransformer`` (``model.text``):
    token plus position embeddings, the causal ``attn_mask`` (and a padding mask if configured), ``ln_final`` at
    the pooled position, then ``text_projection``."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        if isinstance(model, open_clip.CLIP):
            text, self.pool_type, self.eos_id, self.pad_id, self.pad_mask = (
                model, model.text_pool_type, model.text_eos_id, 0, False)
        elif isinstance(getattr(model, "text", None), TextTransformer):
            text = model.text
            self.pool_type, self.eos_id, self.pad_id, self.pad_mask = (
                text.pool_type, text.eos_id, text.pad_id, text.use_pad_mask)
            if text.cls_emb is not None:
                raise TowerUnavailable("open_clip text towers with an appended class token (embed_cls) are not "
                                       "described")
        else:
            raise TowerUnavailable(f"the text tower of open_clip {type(model).__name__} is not a TextTransformer")
        projection = text.text_projection
        if isinstance(projection, nn.Linear):
            projection = Affine(projection.weight, projection.bias)
        elif projection is not None:
            projection = Affine(projection.T)
        super().__init__(
            transformer_blocks(text.transformer, "transformer"),
            require_layer_norm(text.ln_final, "ln_final"),
            projection=projection,
        )
        self.text = text
        self.token_embedding = text.token_embedding
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise TowerUnavailable(f"open_clip text pool_type {self.pool_type!r} is not one token per text")
        specials = getattr(tokenizer, "all_special_ids", None)
        if specials is None:
            raise TowerUnavailable(f"tokenizer {type(tokenizer).__name__} does not list its special ids")
        self.special_ids = frozenset([*specials, self.pad_id])
        self.neutral_id = self.pad_id

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embedding:
        """Token embeddings as sources; position embeddings as the constant. Like open_clip, padding (``pad_id``)
        is masked only in towers configured so (``use_pad_mask``); ``attention_mask`` is not read."""
        text = self.text
        length = input_ids.shape[1]
        tokens = self.token_embedding(input_ids)
        positions = torch.arange(length, device=input_ids.device)
        mask = None if text.attn_mask is None else text.attn_mask[:length, :length].to(tokens.dtype)
        if self.pad_mask:  # open_clip masks padding in bidirectional towers only
            mask = causal_padding_mask(input_ids != self.pad_id, tokens.dtype, causal=False)
        return Embedding(tokens, positions, text.positional_embedding[:length], mask,
                         TokenPool(self.pooled_positions(input_ids)))

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The position each row pools at, by ``pool_type``: highest id, first EOS, first or last token."""
        rows = len(input_ids)
        if self.pool_type == "argmax":
            return input_ids.argmax(-1)
        if self.pool_type == "eos":
            return (input_ids == self.eos_id).int().argmax(-1)
        index = 0 if self.pool_type == "first" else input_ids.shape[1] - 1
        return torch.full((rows,), index, dtype=torch.long, device=input_ids.device)
