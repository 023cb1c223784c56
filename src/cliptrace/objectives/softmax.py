"""CLIP's objective: symmetric InfoNCE (softmax over the batch), and the symmetric margin against a fixed bank."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptrace.objectives.base import Objective, check_pairs, register_objective
from cliptrace.objectives.gather import gather_features, rank_offset


def contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP for this rank's rows against the whole global batch.

    With normalized features φ (images) and ψ (texts) of the global batch of N pairs and τ = ``logit_scale``
    (already exponentiated), the loss is
    ``½·mean_i[−log softmax_j(τ φ_i·ψ_j)_i] + ½·mean_i[−log softmax_j(τ ψ_i·φ_j)_i]``.
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
    check_pairs(image_features, text_features)
    all_images = gather_features(image_features)
    all_texts = gather_features(text_features)
    local = image_features.shape[0]
    labels = torch.arange(local, device=image_features.device) + rank_offset(local, all_images.shape[0])
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_margins(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    bank_images: torch.Tensor,
    bank_texts: torch.Tensor,
    tau: torch.Tensor | float,
    excluded: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves of the CLIP margin of pairs (B, D) against a bank (K, D) of normalized embeddings.

    Returns ``(τφ·ψ − logsumexp_k τφ·ψ_k, τφ·ψ − logsumexp_k τφ_k·ψ)``, each (B,); ``excluded`` (B, K) leaves
    bank entries out of a row (a pair that is itself in the bank).
    """
    bank_images = bank_images.to(image_embeddings.dtype)
    bank_texts = bank_texts.to(image_embeddings.dtype)
    positive = tau * (image_embeddings * text_embeddings).sum(-1)
    to_texts = tau * image_embeddings @ bank_texts.T
    to_images = tau * text_embeddings @ bank_images.T
    if excluded is not None:
        to_texts = to_texts.masked_fill(excluded, float("-inf"))
        to_images = to_images.masked_fill(excluded, float("-inf"))
    return positive - torch.logsumexp(to_texts, -1), positive - torch.logsumexp(to_images, -1)


class SoftmaxObjective(Objective):
    r"""CLIP: symmetric InfoNCE; its per-pair output is the symmetric margin against a fixed, detached bank.

    For a pair i with multiplier τ and the bank B_i (without the pair itself)::

        m_img(i) = τ φ_i·ψ_i − logsumexp_{j∈B_i} τ φ_i·ψ_j      m_txt(i) = τ φ_i·ψ_i − logsumexp_{j∈B_i} τ φ_j·ψ_i
        f_i = m_img(i) + m_txt(i)                                Q_i = 1 − ½[σ(m_img(i)) + σ(m_txt(i))]

    σ(m) is the probability of the correct match against the bank in one direction.
    """

    name = "softmax"
    has_bias = False
    uses_bank = True

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the global batch (see :func:`contrastive_loss`)."""
        self.check_bias(bias)
        return contrastive_loss(image_features, text_features, scale)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over the candidates of each row."""
        return torch.softmax(logits, dim=-1)

    def pair_output(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float,
                    bias: torch.Tensor | float | None = None, bank: tuple[torch.Tensor, torch.Tensor] | None = None,
                    excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The symmetric CLIP margin f against ``bank`` and Q = 1 − ½[σ(m_img) + σ(m_txt)].

        Raises:
            ValueError: No bank was given.
        """
        self.check_bias(bias)
        if bank is None:
            raise ValueError("the softmax (CLIP) margin needs a bank of negatives")
        image_margin, text_margin = clip_margins(image_features, text_features, bank[0], bank[1], scale, excluded)
        weight = 1 - (torch.sigmoid(image_margin) + torch.sigmoid(text_margin)) / 2
        return image_margin + text_margin, weight.detach()


SOFTMAX = register_objective(SoftmaxObjective())
