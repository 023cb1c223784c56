"""SigLIP's objective: an independent binary (sigmoid) loss on every image–text pair, with a learned bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cliptrace.objectives.base import Objective, check_pairs, register_objective
from cliptrace.objectives.gather import gather_features, rank_offset


def sigmoid_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    r"""SigLIP's pairwise sigmoid loss of this rank's images against the texts of the whole global batch.

    For the global batch of N pairs with normalized features φ (images), ψ (texts), multiplier t and bias b::

        loss = −(1/N) Σ_i Σ_j log σ(z_ij (t φ_i·ψ_j + b)),   z_ij = +1 if i = j else −1

    (Zhai et al. 2023, eq. 1). Each rank sums over its own rows i and all gathered columns j and divides by its row
    count n = N / world, so the mean of the per-rank losses is the global loss and data-parallel gradient averaging
    gives the gradients of the global loss. Every pair (i, j) is counted once, on the rank that holds image i.

    Args:
        image_features: This rank's normalized image embeddings, shape (n, D).
        text_features: This rank's normalized text embeddings, shape (n, D); row i pairs with image row i.
        scale: The logit multiplier t = exp(t'), a scalar tensor.
        bias: The logit bias b, a scalar tensor.

    Returns:
        A scalar tensor.
    """
    check_pairs(image_features, text_features)
    all_texts = gather_features(text_features)
    local = image_features.shape[0]
    logits = scale * image_features @ all_texts.T + bias
    rows = torch.arange(local, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + rank_offset(local, all_texts.shape[0])] = 1
    return -F.logsigmoid(signs * logits).sum() / local


class SigmoidObjective(Objective):
    r"""SigLIP: the pairwise sigmoid loss; its per-pair output is the pair's logit, which needs no negative bank.

    Training treats every pair (i, j) as a binary question "do they match?" with probability σ(s_ij),
    s_ij = t φ_i·ψ_j + b. A training pair's own term is the positive one, ℓ_i = −log σ(s_ii). TRAK takes as model
    output the log-odds of the correct answer, f = log(p / (1 − p)) with p = σ(s_ii), which is the logit itself::

        f_i = t φ_i·ψ_i + b          Q_i = −∂ℓ_i/∂f_i = 1 − σ(f_i)

    (ℓ = −log σ(f), ∂ℓ/∂f = −(1 − σ(f))). This is TRAK's choice for binary classification: f is unbounded and
    linearizes well, and Q is the probability the model still gives to the wrong answer. (Taking f = log σ(s_ii)
    instead would make ℓ = −f and Q ≡ 1.) The negative terms of pair i pair it with whichever examples share its
    batch; like the CLIP margin's bank they are left out of f, so f depends on pair i alone.
    """

    name = "sigmoid"
    has_bias = True
    uses_bank = False

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
        """The pairwise sigmoid loss over the global batch (see :func:`sigmoid_loss`)."""
        self.check_bias(bias)
        return sigmoid_loss(image_features, text_features, scale, bias)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """σ of each logit: the probability that the pair matches, independently of the other candidates."""
        return torch.sigmoid(logits)

    def pair_output(self, image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor | float,
                    bias: torch.Tensor | float | None = None, bank: tuple[torch.Tensor, torch.Tensor] | None = None,
                    excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """f = t φ·ψ + b and Q = 1 − σ(f) of each pair; a bank, if given, is not used."""
        self.check_bias(bias)
        logit = self.pair_logits(image_features, text_features, scale, bias)
        return logit, (1 - torch.sigmoid(logit)).detach()


SIGMOID = register_objective(SigmoidObjective())
