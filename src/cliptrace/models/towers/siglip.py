"""HuggingFace ``SiglipModel`` towers: a ViT without class token pooled by the MAP attention-pool head, and an
unmasked bidirectional text tower pooled at the last position through its ``head`` linear layer."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, SiglipModel

from cliptrace.models.towers.base import (
    MLP,
    Affine,
    AttentionPool,
    Embedding,
    ImageTower,
    TextTower,
    TokenPool,
    TowerUnavailable,
    multihead_attention,
)
from cliptrace.models.towers.hf_clip import encoder_blocks, patch_embeddings


class SiglipImageTower(ImageTower):
    """The vision tower of a ``SiglipModel``: patches plus position embeddings, ``post_layernorm`` over every
    position, then the MAP head (probe attention, ``y += mlp(layernorm(y))``); no projection."""

    def __init__(self, model: SiglipModel) -> None:
        vision = model.vision_model
        config = model.config.vision_config
        if not vision.use_head:
            raise TowerUnavailable("this SigLIP vision tower has no pooling head (vision_use_head=False)")
        head = vision.head
        pool_mlp = MLP(Affine(head.mlp.fc1.weight, head.mlp.fc1.bias), Affine(head.mlp.fc2.weight, head.mlp.fc2.bias),
                       config.hidden_act)
        super().__init__(encoder_blocks(vision.encoder.layers, config.hidden_act), vision.post_layernorm)
        self.head = AttentionPool(head.probe.reshape(-1), multihead_attention(head.attention), head.layernorm, pool_mlp)
        self.embeddings = vision.embeddings
        self.patch_size = self.embeddings.patch_size

    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """Patch embeddings as sources; position embeddings as the constant.

        Raises:
            ValueError: The images are not the model's input size.
        """
        embeddings = self.embeddings
        patches = patch_embeddings(embeddings, pixel_values)
        constant = embeddings.position_embedding(embeddings.position_ids[0])
        positions = torch.arange(patches.shape[1], device=patches.device)
        return Embedding(patches, positions, constant, None, self.head)


class SiglipTextTower(TextTower):
    """The text tower of a ``SiglipModel``: bidirectional attention over every position, ``final_layer_norm``, the
    state at the last position (padding or not), then ``head``."""

    def __init__(self, model: SiglipModel, tokenizer: PreTrainedTokenizerBase) -> None:
        text = model.text_model
        super().__init__(
            encoder_blocks(text.encoder.layers, model.config.text_config.hidden_act),
            text.final_layer_norm,
            projection=Affine(text.head.weight, text.head.bias),
        )
        self.embeddings = text.embeddings
        self.token_embedding = text.embeddings.token_embedding
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.neutral_id = tokenizer.pad_token_id

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embedding:
        """Token embeddings as sources; position embeddings as the constant. Every position attends to every
        other, padding included, as SigLIP was trained: ``attention_mask`` is not read, and padding tokens own
        their share."""
        tokens = self.token_embedding(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.full((len(input_ids),), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        return Embedding(tokens, positions, self.embeddings.position_embedding(positions), None, TokenPool(last))
