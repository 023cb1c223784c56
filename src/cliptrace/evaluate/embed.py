"""Batched, gradient-free embedding of images and texts with a DualEncoder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from rich.progress import track
from torch import nn

from cliptrace.data.images import load_record_image
from cliptrace.data.record import Record
from cliptrace.models.base import DualEncoder

if TYPE_CHECKING:
    from cliptrace.data.images import ImageLoader


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode for the block, then restore each one's previous mode."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in previous:
            module.training = training


def embed_pil_images(
    model: DualEncoder, images: Sequence[Image.Image], *, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """L2-normalized float32 embeddings (N, D), on the CPU, of one batch of PIL images.

    Images are preprocessed with ``model.preprocess``; the model must already be on ``device``.
    """
    if not images:
        raise ValueError("no images to embed")
    with eval_mode(model), torch.inference_mode():
        pixels = torch.stack([model.preprocess(image) for image in images]).to(device)
        features = model.encode_image(pixels, normalize=False).float().cpu()
    return F.normalize(features, dim=-1)


def embed_images(
    model: DualEncoder,
    records: Sequence[Record],
    loader: ImageLoader,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalized float32 embeddings (N, D), on the CPU, of the records' images, in record order.

    Images are loaded with ``loader`` and preprocessed with ``model.preprocess``; the model must already be
    on ``device``. A progress bar is shown when ``progress`` is true.
    """
    if not records:
        raise ValueError("no records to embed")
    batches = [records[start : start + batch_size] for start in range(0, len(records), _positive(batch_size))]
    features = [
        embed_pil_images(model, [load_record_image(loader, record) for record in batch], device=device)
        for batch in track(batches, description="Embedding images", disable=not progress)
    ]
    return torch.cat(features)


def embed_texts(
    model: DualEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalized float32 embeddings (N, D), on the CPU, of ``texts`` in order.

    The model must already be on ``device``. A progress bar is shown when ``progress`` is true.
    """
    if not texts:
        raise ValueError("no texts to embed")
    batches = [texts[start : start + batch_size] for start in range(0, len(texts), _positive(batch_size))]
    features = []
    with eval_mode(model), torch.inference_mode():
        for batch in track(batches, description="Embedding texts", disable=not progress):
            tokens = {name: tensor.to(device) for name, tensor in model.tokenize(list(batch)).items()}
            encoded = model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=False)
            features.append(encoded.float().cpu())
    return F.normalize(torch.cat(features), dim=-1)


def _positive(batch_size: int) -> int:
    """``batch_size`` itself, or a ValueError if it is not positive."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return batch_size
