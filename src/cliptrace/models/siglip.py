"""The HuggingFace ``SiglipModel`` as a DualEncoder: SigLIP's towers, trained with the sigmoid objective.

SigLIP differs from CLIP in ways the adapter keeps:

* the image embedding is the vision tower's attention-pooling head (a learned probe attending over the patch
  tokens through ``nn.MultiheadAttention``, then a LayerNorm and an MLP); there is no projection;
* the text embedding is ``head(final state at the last position)``: texts are padded to the context length and
  every position attends to every other, pads included, as SigLIP was trained (big_vision passes no mask), so
  ``encode_text`` does not use the attention mask;
* the logit is ``exp(logit_scale)·φ·ψ + logit_bias`` and the loss the pairwise sigmoid loss
  (:class:`~cliptrace.objectives.SigmoidObjective`); a new model starts at t = 10, b = −10 as in the paper
  (Zhai et al. 2023).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, SiglipModel

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.base import DualEncoder
from cliptrace.models.base import normalize as l2_normalize
from cliptrace.models.directory import write_manifest, write_preprocessor_config
from cliptrace.models.hf_pretrained import load_hf_pretrained
from cliptrace.models.presets import build_siglip_config
from cliptrace.models.tokenizer import tokenize
from cliptrace.models.towers.siglip import SiglipImageTower, SiglipTextTower
from cliptrace.objectives import SIGMOID, Objective

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SigLIP's image normalization: pixels scaled to [−1, 1]
LOGIT_SCALE_INIT = math.log(10.0)  # the paper's t' = log 10
LOGIT_BIAS_INIT = -10.0  # the paper's b = −10


class SigLIPAdapter(DualEncoder):
    """A ``transformers.SiglipModel`` with its tokenizer and image preprocessing.

    Attributes:
        model: The wrapped ``SiglipModel``.
        tokenizer: Its tokenizer.
        preprocess: PIL image -> normalized tensor.
        context_length: Token sequence length (the text tower's position count); every text is padded to it.
    """

    def __init__(self, model: SiglipModel, tokenizer: PreTrainedTokenizerBase, preprocess: ImageTransform) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.context_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_preset(
        cls,
        name: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        image_size: int | None = None,
        attn_implementation: str = "sdpa",
        seed: int | None = None,
        **overrides,
    ) -> SigLIPAdapter:
        """A freshly initialized SigLIP of preset ``name`` (see :func:`cliptrace.models.presets.build_siglip_config`),
        with logit scale log 10 and bias −10.

        Args:
            name: A preset name from :data:`cliptrace.models.SIGLIP_PRESETS`.
            tokenizer: Its vocabulary size and special ids shape the text tower.
            image_size: Input side length; the preset's by default.
            attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (returns attention maps).
            seed: Seeds the weight initialization without touching the global random state.
            **overrides: Config fields, e.g. ``vision_num_hidden_layers=2``.
        """
        config = build_siglip_config(name, tokenizer, image_size=image_size, **overrides)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = SiglipModel._from_config(config, attn_implementation=attn_implementation)
        with torch.no_grad():
            model.logit_scale.fill_(LOGIT_SCALE_INIT)
            model.logit_bias.fill_(LOGIT_BIAS_INIT)
        return cls(model, tokenizer, ImageTransform(config.vision_config.image_size, SIGLIP_MEAN, SIGLIP_STD))

    @staticmethod
    def preset_context_length(name: str) -> int:
        """The token sequence length of preset ``name``: the context length to train its tokenizer with."""
        return build_siglip_config(name).text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, directory: str | Path, attn_implementation: str = "sdpa") -> SigLIPAdapter:
        """Load a local SigLIP directory (this class's ``save``, or a ``save_pretrained`` SigLIP such as
        google/siglip-base-patch16-224 with its tokenizer files).

        Never downloads, and never unpickles: the weights must be safetensors. Preprocessing comes from
        ``cliptrace_model.json``, else ``preprocessor_config.json``, else SigLIP's mean/std at the config's image size.

        Raises:
            FileNotFoundError: ``directory`` does not exist.
            ValueError: It holds another adapter's model, its ``config.json`` does not describe a SigLIP model, its
                weights are pickled, unreadable or of another architecture, or its tokenizer is missing or does not
                fit the text tower.
        """
        model, tokenizer, preprocess = load_hf_pretrained(
            directory, "siglip", SiglipModel,
            lambda config: ImageTransform(config.vision_config.image_size, SIGLIP_MEAN, SIGLIP_STD),
            attn_implementation)
        return cls(model, tokenizer, preprocess)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images (B, 3, H, W) into (B, D): the attention-pooling head's output."""
        return l2_normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed tokenized texts (B, L) into (B, D): the head of the last position's final state.

        ``attention_mask`` is accepted for the DualEncoder contract and not used: SigLIP attends to every position.
        """
        del attention_mask
        return l2_normalize(self.model.get_text_features(input_ids=input_ids).pooler_output, normalize)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to (B, context_length) ``input_ids`` and ``attention_mask`` (1 on real tokens)."""
        return tokenize(self.tokenizer, texts, self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The SiglipModel's log inverse temperature t' (shape (1,)); the multiplier is t = exp(t')."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter:
        """The SiglipModel's learned logit bias b (shape (1,))."""
        return self.model.logit_bias

    @property
    def objective(self) -> Objective:
        """The pairwise sigmoid objective."""
        return SIGMOID

    def image_tower(self) -> SiglipImageTower:
        """The vision tower described for the exact decomposition and the attention methods."""
        return SiglipImageTower(self.model)

    def text_tower(self) -> SiglipTextTower:
        """The text tower described for the exact decomposition and the attention methods."""
        return SiglipTextTower(self.model, self.tokenizer)

    def save(self, directory: str | Path) -> None:
        """Write config, ``model.safetensors``, tokenizer, ``preprocessor_config.json`` and the manifest."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_preprocessor_config(directory, self.preprocess)
        write_manifest(directory, "siglip", self.preprocess, self.context_length)

