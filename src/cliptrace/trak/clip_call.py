"""Call any supported CLIP-style module functionally: (images, texts) -> (image embeddings, text embeddings, scale[,
bias]).

Three module shapes are understood, so the same model-output functions serve them all:

* a cliptrace :class:`~cliptrace.models.DualEncoder` (texts: ``input_ids`` or ``{"input_ids", "attention_mask"}``);
* a HuggingFace ``CLIPModel`` or ``SiglipModel`` (same texts; its ``forward`` returns normalized
  ``image_embeds``/``text_embeds``);
* an open_clip-style module whose ``forward(image, text)`` returns ``(image features, text features, scale)``, and
  the logit bias after them for a sigmoid-loss model, or (open_clip's ``output_dict=True``) a dict with keys
  ``image_features``, ``text_features``, ``logit_scale`` and, for a sigmoid-loss model, ``logit_bias``.

Embeddings are L2-normalized; the scale is the logit multiplier ``exp(logit_scale)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
import torch.nn.functional as F

from cliptrace.models.base import DualEncoder

Texts = torch.Tensor | Mapping[str, torch.Tensor]


def split_texts(texts: Texts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` from a token tensor or a tokenizer's mapping."""
    if isinstance(texts, torch.Tensor):
        return texts, None
    if "input_ids" not in texts:
        raise ValueError(f"text batch has keys {sorted(texts)}; expected 'input_ids' (and 'attention_mask')")
    return texts["input_ids"], texts.get("attention_mask")


def _is_hf_clip(module: nn.Module) -> bool:
    return hasattr(module, "get_image_features") and hasattr(module, "get_text_features") and hasattr(
        module, "logit_scale"
    )


def clip_logit_inputs(
    module: nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor, texts: Texts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Normalized image and text embeddings, the logit multiplier and the logit bias (None for a model without
    one), with ``params`` substituted into ``module``.

    Args:
        module: A DualEncoder, a HuggingFace ``CLIPModel``/``SiglipModel`` or an open_clip-style module.
        params: Parameter tensors by name that replace the module's own (the rest stay as they are).
        images: Preprocessed images (B, 3, H, W).
        texts: Token ids (B, L) or a mapping with ``input_ids`` and optionally ``attention_mask``.

    Returns:
        ``(image_embeddings (B, D), text_embeddings (B, D), scale, bias or None)``.
    """
    input_ids, attention_mask = split_texts(texts)
    if isinstance(module, DualEncoder):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image, text, scale, *bias = functional_call(module, dict(params), (images, input_ids, attention_mask),
                                                    strict=False)
        return image, text, scale, bias[0] if bias else None
    if _is_hf_clip(module):
        kwargs: dict[str, Any] = {"input_ids": input_ids, "pixel_values": images}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        output = functional_call(module, dict(params), (), kwargs, strict=False)
        scale = params["logit_scale"] if "logit_scale" in params else module.logit_scale
        bias = params["logit_bias"] if "logit_bias" in params else getattr(module, "logit_bias", None)
        return (output.image_embeds, output.text_embeds, scale.exp().reshape(()),
                None if bias is None else bias.reshape(()))
    output = functional_call(module, dict(params), (images, input_ids), strict=False)
    if isinstance(output, Mapping):
        output = (output["image_features"], output["text_features"], output["logit_scale"],
                  *([output["logit_bias"]] if output.get("logit_bias") is not None else []))
    image_features, text_features, scale, *bias = output
    return (F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1), scale.reshape(()),
            bias[0].reshape(()) if bias else None)


def clip_embed(
    module: nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor, texts: Texts
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized image and text embeddings and the logit multiplier (see :func:`clip_logit_inputs`).

    Returns:
        ``(image_embeddings (B, D), text_embeddings (B, D), scale)``.
    """
    return clip_logit_inputs(module, params, images, texts)[:3]


@contextmanager
def eager_attention(module: nn.Module) -> Iterator[nn.Module]:
    """Switch every HuggingFace submodule to eager attention for the block, then restore it.

    ``torch.func.vmap`` cannot trace the data-dependent mask checks of HF's ``sdpa`` path; eager attention is
    the same computation written in plain tensor ops.
    """
    changed = []
    for sub in module.modules():
        config = getattr(sub, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if hasattr(sub, "set_attn_implementation") and current not in (None, "eager"):
            sub.set_attn_implementation("eager")
            changed.append((sub, current))
    try:
        yield module
    finally:
        for sub, previous in changed:
            sub.set_attn_implementation(previous)
