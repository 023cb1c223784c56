"""Wrap an in-memory HuggingFace model and its processor into the DualEncoder adapter :func:`cliptrace.explain`
runs on, so a user with ``CLIPModel.from_pretrained(...)`` and its processor needs no model directory."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import CLIPModel, PreTrainedTokenizerBase, SiglipModel

from cliptrace.data.transforms import ImageTransform
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import transform_from_config
from cliptrace.models.hf_clip import HFCLIP


def as_dual_encoder(model: DualEncoder | nn.Module, processor: Any = None) -> DualEncoder:
    """``model`` itself if it is a DualEncoder; a ``CLIPModel`` as :class:`HFCLIP` or a ``SiglipModel`` as
    :class:`~cliptrace.models.siglip.SigLIPAdapter`, with the tokenizer and image preprocessing of ``processor``.

    The wrapper shares the model's modules (nothing is copied). The image preprocessing is read from the image
    processor's config (size, crop, mean, std) as :func:`~cliptrace.models.directory.read_preprocessor_config`
    reads a ``preprocessor_config.json``.

    Args:
        model: A DualEncoder, or a ``transformers`` ``CLIPModel`` or ``SiglipModel``.
        processor: With a transformers model: its processor (``CLIPProcessor``, ``SiglipProcessor``: anything with
            ``tokenizer`` and ``image_processor``) or a ``(tokenizer, image_processor)`` pair.

    Raises:
        TypeError: ``model`` is of another kind, or a transformers model comes without a usable processor (or a
            DualEncoder with one, which it would ignore).
    """
    if isinstance(model, DualEncoder):
        if processor is not None:
            raise TypeError(f"{type(model).__name__} carries its own tokenizer and preprocessing; pass no processor")
        return model
    if not isinstance(model, (CLIPModel, SiglipModel)):
        raise TypeError(f"explain takes a cliptrace DualEncoder, a transformers CLIPModel or a SiglipModel; got "
                        f"{type(model).__name__}")
    tokenizer, preprocess = _processor_parts(processor, type(model).__name__)
    if isinstance(model, CLIPModel):
        return HFCLIP(model, tokenizer, preprocess)
    from cliptrace.models.siglip import SigLIPAdapter

    return SigLIPAdapter(model, tokenizer, preprocess)


def _processor_parts(processor: Any, model_name: str) -> tuple[PreTrainedTokenizerBase, ImageTransform]:
    """The tokenizer and image preprocessing of a processor or a ``(tokenizer, image_processor)`` pair."""
    if isinstance(processor, (tuple, list)) and len(processor) == 2:
        tokenizer, image_processor = processor
    else:
        tokenizer = getattr(processor, "tokenizer", None)
        image_processor = getattr(processor, "image_processor", None)
    if not isinstance(tokenizer, PreTrainedTokenizerBase) or not hasattr(image_processor, "to_dict"):
        raise TypeError(f"a transformers {model_name} needs processor= its processor (with a tokenizer and an image "
                        f"processor) or a (tokenizer, image_processor) pair; got {type(processor).__name__}")
    name = type(image_processor).__name__
    try:
        preprocess = transform_from_config(image_processor.to_dict(), name)
    except ValueError as error:
        raise TypeError(f"the image processor's preprocessing cannot be followed: {error}") from None
    return tokenizer, preprocess
