"""Named model sizes as HF configs: CLIP from a CPU-trainable ``tiny`` to OpenAI's ViT-B/32 (``base``), and SigLIP
from ``siglip-tiny`` to google/siglip-base-patch16-224 (``siglip-base``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    PreTrainedTokenizerBase,
    SiglipConfig,
    SiglipTextConfig,
    SiglipVisionConfig,
)

HIDDEN_ACTS = ("quick_gelu", "gelu")
SIGLIP_HIDDEN_ACT = "gelu_pytorch_tanh"
CLIP_TOP_FIELDS = ("projection_dim", "logit_scale_init_value")


@dataclass(frozen=True)
class Preset:
    """The architecture of one CLIP size; MLP widths are 4× the tower width."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    context_length: int
    projection_dim: int


_PRESETS = {
    # 64 px, 8×8 patches: 65 tokens; trains in minutes on two CPU cores.
    "tiny": Preset(64, 8, 128, 3, 4, 128, 3, 4, 32, 128),
    # 128 px, 16×16 patches: 65 tokens at twice the width and depth of tiny.
    "small": Preset(128, 16, 256, 6, 4, 256, 6, 4, 77, 256),
    # OpenAI ViT-B/32: 151,277,313 parameters with the 49,408-token OpenAI vocabulary.
    "base": Preset(224, 32, 768, 12, 12, 512, 12, 8, 77, 512),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)

_SIGLIP_PRESETS = {
    # SigLIP has no image projection: the text head maps to the vision width, which is the embedding width.
    "siglip-tiny": Preset(64, 8, 128, 3, 4, 128, 3, 4, 32, 128),
    "siglip-small": Preset(128, 16, 256, 6, 4, 256, 6, 4, 64, 256),
    # google/siglip-base-patch16-224 (with its 32,000-token vocabulary).
    "siglip-base": Preset(224, 16, 768, 12, 12, 768, 12, 12, 64, 768),
}
SIGLIP_PRESETS: tuple[str, ...] = tuple(_SIGLIP_PRESETS)
PRESET_ADAPTERS: dict[str, str] = {**dict.fromkeys(PRESETS, "hf_clip"), **dict.fromkeys(SIGLIP_PRESETS, "siglip")}
"""The adapter (:data:`cliptrace.models.directory.ADAPTERS`) that builds each preset."""


def preset_adapter(name: str) -> str:
    """The adapter name that builds preset ``name``.

    Raises:
        ValueError: Unknown preset (the message lists them all).
    """
    if name not in PRESET_ADAPTERS:
        raise ValueError(f"unknown preset {name!r}; choose one of {tuple(PRESET_ADAPTERS)}")
    return PRESET_ADAPTERS[name]


def build_config(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    image_size: int | None = None,
    hidden_act: str | None = None,
    **overrides: Any,
) -> CLIPConfig:
    """Build the ``CLIPConfig`` of preset ``name``.

    Args:
        name: One of :data:`PRESETS`.
        tokenizer: Supplies the vocabulary size and the pad/BOS/EOS ids; without it the OpenAI CLIP
            vocabulary (49,408 tokens, BOS 49406, EOS 49407) is assumed.
        image_size: Input side length in pixels (a multiple of the patch size); the preset's by default.
        hidden_act: MLP activation of both towers, ``"quick_gelu"`` (default, as OpenAI CLIP) or ``"gelu"``.
        **overrides: Config fields to replace: ``vision_<field>`` and ``text_<field>`` set a field of the
            vision or text config (e.g. ``vision_num_hidden_layers=2``); ``projection_dim`` and
            ``logit_scale_init_value`` set the top-level fields.

    Raises:
        ValueError: Unknown preset, activation or override field, or an image size that is not a
            multiple of the patch size.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    hidden_act = hidden_act or "quick_gelu"
    if hidden_act not in HIDDEN_ACTS:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; choose one of {HIDDEN_ACTS}")
    vision, text = _tower_fields(_PRESETS[name], image_size, hidden_act, tokenizer)
    top = dict(projection_dim=_PRESETS[name].projection_dim)
    _apply_overrides(overrides, vision, text, top)
    _check_patches(vision)
    vision["projection_dim"] = text["projection_dim"] = top["projection_dim"]
    return CLIPConfig(
        text_config=CLIPTextConfig(**text).to_dict(),
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        **top,
    )


def build_siglip_config(
    name: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    image_size: int | None = None,
    **overrides: Any,
) -> SiglipConfig:
    """Build the ``SiglipConfig`` of SigLIP preset ``name`` (MLP activation ``gelu_pytorch_tanh``, as SigLIP).

    Args:
        name: One of :data:`SIGLIP_PRESETS`.
        tokenizer: Supplies the vocabulary size and the pad/BOS/EOS ids; without it SigLIP's 32,000-token
            vocabulary is assumed.
        image_size: Input side length in pixels (a multiple of the patch size); the preset's by default.
        **overrides: ``vision_<field>`` and ``text_<field>`` set a field of the vision or text config (e.g.
            ``vision_num_hidden_layers=2``). The embedding width is the vision width: the text head maps to it.

    Raises:
        ValueError: Unknown preset or override field, or an image size that is not a multiple of the patch size.
    """
    if name not in _SIGLIP_PRESETS:
        raise ValueError(f"unknown SigLIP preset {name!r}; choose one of {SIGLIP_PRESETS}")
    vision, text = _tower_fields(_SIGLIP_PRESETS[name], image_size, SIGLIP_HIDDEN_ACT, tokenizer)
    if tokenizer is None:  # SigLIP's SentencePiece vocabulary: "</s>" (id 1) ends and pads every text, no BOS
        text.update(pad_token_id=1, bos_token_id=None, eos_token_id=1)
    _apply_overrides(overrides, vision, text, {}, (SiglipVisionConfig, SiglipTextConfig), ())
    _check_patches(vision)
    text["projection_size"] = vision["hidden_size"]
    return SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(),
                        vision_config=SiglipVisionConfig(**vision).to_dict())


def _tower_fields(preset: Preset, image_size: int | None, hidden_act: str,
                  tokenizer: PreTrainedTokenizerBase | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The vision and text config fields of ``preset`` (MLP widths 4× the tower width), with the tokenizer's
    vocabulary size and special ids when given."""
    vision = dict(
        image_size=image_size or preset.image_size,
        patch_size=preset.patch_size,
        hidden_size=preset.vision_width,
        intermediate_size=4 * preset.vision_width,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        hidden_act=hidden_act,
    )
    text = dict(
        hidden_size=preset.text_width,
        intermediate_size=4 * preset.text_width,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        max_position_embeddings=preset.context_length,
        hidden_act=hidden_act,
    )
    if tokenizer is not None:
        text.update(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return vision, text


def _check_patches(vision: dict[str, Any]) -> None:
    """Refuse an image size that is not a multiple of the patch size."""
    if vision["image_size"] % vision["patch_size"]:
        raise ValueError(
            f"image_size={vision['image_size']} is not a multiple of patch_size={vision['patch_size']}"
        )


def _apply_overrides(overrides: dict[str, Any], vision: dict, text: dict, top: dict,
                     configs: tuple[type, type] = (CLIPVisionConfig, CLIPTextConfig),
                     top_fields: tuple[str, ...] = CLIP_TOP_FIELDS) -> None:
    """Route ``vision_*``/``text_*``/top-level overrides into their dicts, rejecting fields that the
    ``(vision, text)`` config classes and ``top_fields`` do not have."""
    vision_fields, text_fields = ({field.name for field in dataclasses.fields(config)} for config in configs)
    for key, value in overrides.items():
        if key.startswith("vision_") and key.removeprefix("vision_") in vision_fields:
            vision[key.removeprefix("vision_")] = value
        elif key.startswith("text_") and key.removeprefix("text_") in text_fields:
            text[key.removeprefix("text_")] = value
        elif key in top_fields:
            top[key] = value
        else:
            family = configs[0].__name__.removesuffix("VisionConfig")
            raise ValueError(
                f"unknown override {key!r}: use vision_<field> or text_<field> of the {family} vision/text "
                "config" + "".join(f", {field}" for field in top_fields)
            )
