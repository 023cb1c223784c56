"""HuggingFace ``CLIPModel`` towers: ``vision_model`` (class token, pre-LayerNorm) and the causal ``text_model``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from cliptrace.models.towers.base import (
    MLP,
    Affine,
    Attention,
    Block,
    Embedding,
    ImageTower,
    TextTower,
    TokenPool,
    causal_padding_mask,
)


def _affine(linear: nn.Linear) -> Affine:
    return Affine(linear.weight, linear.bias)


def encoder_blocks(layers: nn.ModuleList, activation: str) -> list[Block]:
    """HF CLIP-style encoder layers (``layer_norm1``, ``self_attn`` with q/k/v/out_proj, ``layer_norm2``, ``mlp``
    with fc1/fc2) as protocol blocks; SigLIP's layers have the same shape."""
    return [
        Block(
            norm1=layer.layer_norm1,
            attention=Attention(
                query=_affine(layer.self_attn.q_proj),
                key=_affine(layer.self_attn.k_proj),
                value=_affine(layer.self_attn.v_proj),
                out=_affine(layer.self_attn.out_proj),
                heads=layer.self_attn.num_heads,
            ),
            norm2=layer.layer_norm2,
            mlp=MLP(_affine(layer.mlp.fc1), _affine(layer.mlp.fc2), activation),
        )
        for layer in layers
    ]


def patch_embeddings(embeddings: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch embeddings (B, P, D) in raster order of a HF CLIP or SigLIP vision embedding module.

    Raises:
        ValueError: The images are not the model's input size.
    """
    size = embeddings.image_size
    if tuple(pixel_values.shape[-2:]) != (size, size):
        raise ValueError(f"images are {tuple(pixel_values.shape[-2:])} pixels; the model takes {size}×{size}")
    pixel_values = pixel_values.to(embeddings.patch_embedding.weight.dtype)
    return embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)


def class_token_inputs(
    embeddings: nn.Module, pixel_values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The patch sources (B, P, D) of a HF CLIP vision embedding module, their positions 1…P, and the constant
    (P + 1, D): the position embeddings plus the class embedding at position 0.

    Raises:
        ValueError: The images are not the model's input size.
    """
    patches = patch_embeddings(embeddings, pixel_values)
    constant = embeddings.position_embedding(embeddings.position_ids[0]).clone()
    constant[0] += embeddings.class_embedding
    return patches, torch.arange(1, patches.shape[1] + 1, device=patches.device), constant


class CLIPImageTower(ImageTower):
    """The vision tower of a ``CLIPModel``: ``visual_projection(post_layernorm(CLS))``."""

    def __init__(self, model: CLIPModel) -> None:
        vision = model.vision_model
        super().__init__(
            encoder_blocks(vision.encoder.layers, model.config.vision_config.hidden_act),
            vision.post_layernorm,
            pre_norm=vision.pre_layrnorm,
            projection=Affine(model.visual_projection.weight),
        )
        self.embeddings = vision.embeddings
        self.patch_size = self.embeddings.patch_size

    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """Patch embeddings as sources; class and position embeddings as the constant.

        Raises:
            ValueError: The images are not the model's input size.
        """
        patches, positions, constant = class_token_inputs(self.embeddings, pixel_values)
        pool = TokenPool(torch.zeros(len(patches), dtype=torch.long, device=patches.device))
        return Embedding(patches, positions, constant, None, pool)


class CLIPTextTower(TextTower):
    """The text tower of a ``CLIPModel``: causal attention over non-padding tokens, pooled at the first EOS (at the
    highest token id when ``eos_token_id == 2``, as HF does), ``text_projection(final_layer_norm(·))``."""

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase) -> None:
        text = model.text_model
        super().__init__(
            encoder_blocks(text.encoder.layers, model.config.text_config.hidden_act),
            text.final_layer_norm,
            projection=Affine(model.text_projection.weight),
        )
        self.embeddings = text.embeddings
        self.token_embedding = text.embeddings.token_embedding
        self.eos_token_id = text.eos_token_id
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.neutral_id = tokenizer.pad_token_id

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embedding:
        """Token embeddings as sources; position embeddings as the constant."""
        tokens = self.token_embedding(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        mask = causal_padding_mask(attention_mask, tokens.dtype, causal=True)
        constant = self.embeddings.position_embedding(positions)
        return Embedding(tokens, positions, constant, mask, TokenPool(self.pooled_positions(input_ids)))

    def pooled_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The position each row pools at: the first EOS, or the highest token id when ``eos_token_id == 2``."""
        if self.eos_token_id == 2:
            return input_ids.to(torch.int).argmax(-1)
        return (input_ids.to(torch.int) == self.eos_token_id).int().argmax(-1)
