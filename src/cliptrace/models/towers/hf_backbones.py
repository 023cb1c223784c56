"""Towers of the HF backbones of :class:`~cliptrace.models.frozen.FrozenBackboneDualEncoder`, each mean-pooled into
its linear head.

* Image: ``ViTModel`` (class token, pre-LN blocks, ``layernorm`` over every position) and ``CLIPVisionModel``
  (class token, ``pre_layrnorm``, pre-LN blocks; its ``last_hidden_state`` has no LayerNorm after the last block).
  The sources are the patch embeddings; the constant holds the class and position embeddings.
* Text: ``BertModel`` and ``DistilBertModel`` (the embedding LayerNorm as the tower's ``pre_norm``, then post-LN
  blocks) and ``CLIPTextModel`` (causal pre-LN blocks, ``final_layer_norm``). The sources are the word embeddings;
  the constant holds the position embeddings and, for BERT, the token-type-0 embedding (the adapter passes no
  ``token_type_ids``).

The pooling is the adapter's: the mean of ``last_hidden_state`` over all positions (image) or over the tokens the
attention mask keeps (text). Any other backbone (ResNet, ConvNeXt, …) raises :class:`TowerUnavailable` naming its
class.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertModel,
    CLIPTextModel,
    CLIPVisionModel,
    DistilBertModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ViTModel,
)

from cliptrace.models.towers.base import (
    MLP,
    Affine,
    Attention,
    Block,
    Embedding,
    ImageTower,
    MeanPool,
    TextTower,
    TowerUnavailable,
    causal_padding_mask,
)
from cliptrace.models.towers.hf_clip import class_token_inputs, encoder_blocks

IMAGE_BACKBONES = (ViTModel, CLIPVisionModel)
TEXT_BACKBONES = (BertModel, DistilBertModel, CLIPTextModel)


def image_backbone_tower(backbone: PreTrainedModel, head: nn.Linear) -> ImageTower:
    """The described image tower of ``backbone`` mean-pooled over all positions into ``head``.

    Raises:
        TowerUnavailable: The backbone is not a ``ViTModel`` or ``CLIPVisionModel``.
    """
    if isinstance(backbone, ViTModel):
        return ViTBackboneTower(backbone, head)
    if isinstance(backbone, CLIPVisionModel):
        return CLIPVisionBackboneTower(backbone, head)
    raise TowerUnavailable(_unsupported(backbone, IMAGE_BACKBONES))


def text_backbone_tower(
    backbone: PreTrainedModel, head: nn.Linear, tokenizer: PreTrainedTokenizerBase
) -> TextTower:
    """The described text tower of ``backbone`` mean-pooled over the kept tokens into ``head``.

    Raises:
        TowerUnavailable: The backbone is not a ``BertModel``, ``DistilBertModel`` or ``CLIPTextModel``.
    """
    if not isinstance(backbone, TEXT_BACKBONES):
        raise TowerUnavailable(_unsupported(backbone, TEXT_BACKBONES))
    return BackboneTextTower(backbone, head, tokenizer)


def _unsupported(backbone: nn.Module, supported: tuple[type, ...]) -> str:
    names = ", ".join(kind.__name__ for kind in supported)
    return f"its backbone is a {type(backbone).__name__}, which is not described (supported: {names})"


def _image_pool(patches: torch.Tensor, positions: int) -> MeanPool:
    """The mean over all ``positions`` of each image."""
    return MeanPool.over(patches.new_ones(len(patches), positions), patches.dtype)


class ViTBackboneTower(ImageTower):
    """A ``ViTModel``: ``head(mean_n layernorm(h)_n)`` over the class token and every patch."""

    def __init__(self, vit: ViTModel, head: nn.Linear) -> None:
        config = vit.config
        if vit.embeddings.position_embeddings is None:
            raise TowerUnavailable("this ViTModel has no absolute position embeddings")
        blocks = [
            Block(
                norm1=layer.layernorm_before,
                attention=Attention(Affine.of(layer.attention.q_proj), Affine.of(layer.attention.k_proj),
                                    Affine.of(layer.attention.v_proj), Affine.of(layer.attention.o_proj),
                                    config.num_attention_heads),
                norm2=layer.layernorm_after,
                mlp=MLP(Affine.of(layer.mlp.fc1), Affine.of(layer.mlp.fc2), config.hidden_act),
            )
            for layer in vit.layers
        ]
        super().__init__(blocks, vit.layernorm, projection=Affine.of(head))
        self.embeddings = vit.embeddings
        self.patch_size = config.patch_size

    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """Patch embeddings as sources; class and position embeddings as the constant.

        Raises:
            ValueError: The images are not the model's input size.
        """
        embeddings = self.embeddings
        size = tuple(embeddings.image_size)
        if tuple(pixel_values.shape[-2:]) != size:
            raise ValueError(f"images are {tuple(pixel_values.shape[-2:])} pixels; the model takes "
                             f"{size[0]}×{size[1]}")
        patch_module = embeddings.patch_embeddings
        patches = patch_module(pixel_values.to(patch_module.projection.weight.dtype))
        constant = embeddings.position_embeddings[0].clone()
        constant[0] += embeddings.cls_token[0, 0]
        positions = torch.arange(1, patches.shape[1] + 1, device=patches.device)
        return Embedding(patches, positions, constant, None, _image_pool(patches, len(constant)))


class CLIPVisionBackboneTower(ImageTower):
    """A ``CLIPVisionModel``: ``head(mean_n h_n)`` of its ``last_hidden_state`` (``post_layernorm`` is not applied)."""

    def __init__(self, vision: CLIPVisionModel, head: nn.Linear) -> None:
        super().__init__(encoder_blocks(vision.encoder.layers, vision.config.hidden_act), None,
                         pre_norm=vision.pre_layrnorm, projection=Affine.of(head))
        self.embeddings = vision.embeddings
        self.patch_size = self.embeddings.patch_size

    def embed(self, pixel_values: torch.Tensor) -> Embedding:
        """As :class:`~cliptrace.models.towers.hf_clip.CLIPImageTower` embeds, pooled by the mean over every position
        (``ValueError`` for images not at the model's input size)."""
        patches, positions, constant = class_token_inputs(self.embeddings, pixel_values)
        return Embedding(patches, positions, constant, None, _image_pool(patches, len(constant)))


class BackboneTextTower(TextTower):
    """A ``BertModel``, ``DistilBertModel`` or ``CLIPTextModel``: ``head`` of the mean of ``last_hidden_state`` over
    the tokens the attention mask keeps.

    Attributes:
        position_embedding: The position embeddings (part of the constant).
        token_type_embedding: BERT's token-type embeddings, whose type 0 joins the constant; ``None`` otherwise.
        causal: Whether a query sees only the keys at or before it (CLIP text, BERT as a decoder).
    """

    def __init__(self, backbone: PreTrainedModel, head: nn.Linear, tokenizer: PreTrainedTokenizerBase) -> None:
        config, embeddings = backbone.config, backbone.embeddings
        if isinstance(backbone, CLIPTextModel):
            blocks = encoder_blocks(backbone.encoder.layers, config.hidden_act)
            pre_norm, final_norm, self.causal = None, backbone.final_layer_norm, True
            self.token_embedding, self.position_embedding = embeddings.token_embedding, embeddings.position_embedding
            self.token_type_embedding = None
        else:
            blocks = _bert_blocks(backbone) if isinstance(backbone, BertModel) else _distilbert_blocks(backbone)
            pre_norm, final_norm, self.causal = embeddings.LayerNorm, None, bool(getattr(config, "is_decoder", False))
            self.token_embedding = embeddings.word_embeddings
            self.position_embedding = embeddings.position_embeddings
            self.token_type_embedding = getattr(embeddings, "token_type_embeddings", None)
        super().__init__(blocks, final_norm, pre_norm=pre_norm, projection=Affine.of(head))
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.neutral_id = tokenizer.pad_token_id

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Embedding:
        """Word embeddings as sources; position (and token-type 0) embeddings as the constant; attention over the
        kept tokens (causal where the backbone is); the mean over the kept tokens."""
        tokens = self.token_embedding(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        constant = self.position_embedding(positions)
        if self.token_type_embedding is not None:
            constant = constant + self.token_type_embedding(torch.zeros_like(positions))
        mask = causal_padding_mask(attention_mask, tokens.dtype, causal=self.causal)
        return Embedding(tokens, positions, constant, mask, MeanPool.over(attention_mask, tokens.dtype))


def _bert_blocks(bert: BertModel) -> list[Block]:
    """BERT's post-LN layers: ``LayerNorm(x + dense(attention(x)))``, then ``LayerNorm(x + dense(act(dense(x))))``."""
    heads = bert.config.num_attention_heads
    return [
        Block(
            norm1=layer.attention.output.LayerNorm,
            attention=Attention(Affine.of(layer.attention.self.query), Affine.of(layer.attention.self.key),
                                Affine.of(layer.attention.self.value), Affine.of(layer.attention.output.dense), heads),
            norm2=layer.output.LayerNorm,
            mlp=MLP(Affine.of(layer.intermediate.dense), Affine.of(layer.output.dense), bert.config.hidden_act),
            post_norm=True,
        )
        for layer in bert.encoder.layer
    ]


def _distilbert_blocks(distilbert: DistilBertModel) -> list[Block]:
    """DistilBERT's post-LN layers: ``sa_layer_norm(x + attention(x))``, then ``output_layer_norm(x + ffn(x))``."""
    config = distilbert.config
    return [
        Block(
            norm1=layer.sa_layer_norm,
            attention=Attention(Affine.of(layer.attention.q_lin), Affine.of(layer.attention.k_lin),
                                Affine.of(layer.attention.v_lin), Affine.of(layer.attention.out_lin), config.n_heads),
            norm2=layer.output_layer_norm,
            mlp=MLP(Affine.of(layer.ffn.lin1), Affine.of(layer.ffn.lin2), config.activation),
            post_norm=True,
        )
        for layer in distilbert.transformer.layer
    ]
