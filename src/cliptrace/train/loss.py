"""The CLIP contrastive objective: symmetric InfoNCE over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
import torch.nn.functional as F


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` from every rank in rank order, keeping gradients flowing to each rank's share.

    Without an initialized process group (or with one rank) the input is returned unchanged. Every rank must
    pass the same number of rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return collectives.all_gather_single_autograd(features, gather_dim=0, group=dist.group.WORLD)


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP for this rank's rows against the whole global batch.

    With normalized features φ (images) and ψ (texts) of the global batch of N pairs and τ = ``logit_scale``
    (already exponentiated), the loss is ``½·mean_i[−log softmax_j(τ φ_i·ψ_j)_i] + ½·mean_i[−log softmax_j(τ ψ_i·φ_j)_i]``.
    Under ``torch.distributed`` each rank scores its own rows against the gathered columns; the mean of the
    per-rank losses is the global loss, and the gradients that data-parallel training averages are exactly
    those of the global loss.

    Args:
        image_features: This rank's normalized image embeddings, shape (n, D).
        text_features: This rank's normalized text embeddings, shape (n, D); row i pairs with image row i.
        logit_scale: The logit multiplier exp(s), a scalar tensor.

    Returns:
        A scalar tensor.
    """
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {tuple(image_features.shape)} and text features "
            f"{tuple(text_features.shape)} must have the same shape"
        )
    all_images = gather_features(image_features)
    all_texts = gather_features(text_features)
    local = image_features.shape[0]
    rank = dist.get_rank() if all_images.shape[0] != local else 0
    labels = torch.arange(local, device=image_features.device) + rank * local
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

