"""Named CLIP sizes, from a CPU-trainable ``tiny`` to OpenAI's ViT-B/32 (``base``), as HF ``CLIPConfig`` objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerBase

HIDDEN_ACTS = ("quick_gelu", "gelu")


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
    preset = _PRESETS[name]
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
    top = dict(projection_dim=preset.projection_dim)
    _apply_overrides(overrides, vision, text, top)
    if vision["image_size"] % vision["patch_size"]:
        raise ValueError(
            f"image_size={vision['image_size']} is not a multiple of patch_size={vision['patch_size']}"
        )
    vision["projection_dim"] = text["projection_dim"] = top["projection_dim"]
    return CLIPConfig(
        text_config=CLIPTextConfig(**text).to_dict(),
        vision_config=CLIPVisionConfig(**vision).to_dict(),
        **top,
    )


def _apply_overrides(overrides: dict[str, Any], vision: dict, text: dict, top: dict) -> None:
    """Route ``vision_*``/``text_*``/top-level overrides into their dicts, rejecting unknown fields."""
    vision_fields, text_fields = CLIPVisionConfig().to_dict(), CLIPTextConfig().to_dict()
    for key, value in overrides.items():
        if key.startswith("vision_") and key.removeprefix("vision_") in vision_fields:
            vision[key.removeprefix("vision_")] = value
        elif key.startswith("text_") and key.removeprefix("text_") in text_fields:
            text[key.removeprefix("text_")] = value
        elif key in ("projection_dim", "logit_scale_init_value"):
            top[key] = value
        else:
            raise ValueError(
                f"unknown override {key!r}: use vision_<field> or text_<field> of the CLIP vision/text "
                "config, projection_dim or logit_scale_init_value"
            )
