"""The HuggingFace ``CLIPModel`` as a DualEncoder: from a size preset, or from a local pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.base import DualEncoder
from cliptrace.models.base import normalize as l2_normalize
from cliptrace.models.directory import write_manifest, write_preprocessor_config
from cliptrace.models.hf_pretrained import load_hf_pretrained
from cliptrace.models.presets import build_config
from cliptrace.models.tokenizer import tokenize
from cliptrace.models.towers.hf_clip import CLIPImageTower, CLIPTextTower


class HFCLIP(DualEncoder):
    """A ``transformers.CLIPModel`` with its tokenizer and image preprocessing.

    The image embedding is ``visual_projection(post_layernorm(CLS state))`` and the text embedding is
    ``text_projection(final state at the first EOS token)`` (HF pools at the highest token id instead when
    the config's ``eos_token_id`` is 2, which suits OpenAI's vocabulary, whose EOS is its highest id).

    Attributes:
        model: The wrapped ``CLIPModel``.
        tokenizer: Its tokenizer.
        preprocess: PIL image -> normalized tensor.
        context_length: Token sequence length (the text tower's position count).
    """

    def __init__(self, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, preprocess: ImageTransform) -> None:
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
        hidden_act: str | None = None,
        attn_implementation: str = "sdpa",
        seed: int | None = None,
        **overrides,
    ) -> HFCLIP:
        """A freshly initialized CLIP of preset ``name`` (see :func:`cliptrace.models.presets.build_config`).

        Args:
            name: A preset name from :data:`cliptrace.models.PRESETS`.
            tokenizer: Its vocabulary size and special ids shape the text tower.
            image_size: Input side length; the preset's by default.
            hidden_act: ``"quick_gelu"`` (default) or ``"gelu"``.
            attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (returns attention maps).
            seed: Seeds the weight initialization without touching the global random state.
            **overrides: Config fields, e.g. ``vision_num_hidden_layers=2`` or ``projection_dim=64``.
        """
        config = build_config(name, tokenizer, image_size=image_size, hidden_act=hidden_act, **overrides)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = CLIPModel._from_config(config, attn_implementation=attn_implementation)
        return cls(model, tokenizer, ImageTransform(config.vision_config.image_size))

    @staticmethod
    def preset_context_length(name: str) -> int:
        """The token sequence length of preset ``name``: the context length to train its tokenizer with."""
        return build_config(name).text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, directory: str | Path, attn_implementation: str = "sdpa") -> HFCLIP:
        """Load a local CLIP directory (this class's ``save`` or e.g. a downloaded ``openai/clip-vit-base-patch32``).

        Never downloads, and never unpickles: the weights must be safetensors. Preprocessing comes from
        ``cliptrace_model.json``, else ``preprocessor_config.json``, else OpenAI CLIP's mean/std at the config's
        image size.

        Raises:
            FileNotFoundError: ``directory`` does not exist.
            ValueError: It holds another adapter's model, its ``config.json`` does not describe a CLIP model, its
                weights are pickled, unreadable or of another architecture, or its tokenizer is missing or does not
                fit the text tower (see :func:`cliptrace.models.tokenizer.load_tokenizer`).
        """
        model, tokenizer, preprocess = load_hf_pretrained(
            directory, "hf_clip", CLIPModel, lambda config: ImageTransform(config.vision_config.image_size),
            attn_implementation)
        return cls(model, tokenizer, preprocess)

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed preprocessed images (B, 3, H, W) into (B, D)."""
        return l2_normalize(_pooled(self.model.get_image_features(pixel_values=pixel_values)), normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Embed tokenized texts (B, L) into (B, D)."""
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return l2_normalize(_pooled(features), normalize)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize to (B, context_length) ``input_ids`` and ``attention_mask``."""
        return tokenize(self.tokenizer, texts, self.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The CLIPModel's log inverse temperature."""
        return self.model.logit_scale

    def image_tower(self) -> CLIPImageTower:
        """The vision tower described for the exact decomposition and the attention methods."""
        return CLIPImageTower(self.model)

    def text_tower(self) -> CLIPTextTower:
        """The text tower described for the exact decomposition and the attention methods."""
        return CLIPTextTower(self.model, self.tokenizer)

    def save(self, directory: str | Path) -> None:
        """Write config, ``model.safetensors``, tokenizer, ``preprocessor_config.json`` and the manifest."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        write_preprocessor_config(directory, self.preprocess)
        write_manifest(directory, "hf_clip", self.preprocess, self.context_length)


def _pooled(output: torch.Tensor | object) -> torch.Tensor:
    """The embedding from ``get_*_features``: a tensor in transformers 4.x, ``.pooler_output`` in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output

