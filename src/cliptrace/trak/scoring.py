r"""TRAK scores from stored features: the kernel regression, the checkpoint ensemble, top-k and self-influence.

For checkpoint m with training features X_m (n × k), loss weights Q_m (n) and target features Φ_m (t × k)::

    W_m    = X_m (X_mᵀ X_m + λI)⁻¹                      (n × k)
    τ      = diag(Q̄) · (1/M) Σ_m W_m Φ_mᵀ               (n × t),   Q̄ = (1/M) Σ_m Q_m

i.e. the plain mean of the per-checkpoint kernel scores, re-weighted by the mean loss weight, as in the TRAK
paper. No checkpoint is rescaled: with λ = 0 each term is invariant to the scale of its features, so every
checkpoint counts equally (``traker`` divides each inverse by its mean |entry|, which weights checkpoints by
the size of their gradients).

W_m is computed by Cholesky. When k ≤ n the k × k system X_mᵀX_m + λI is solved. When k > n that matrix is
singular for λ = 0, and W_m = (X_m X_mᵀ + λI)⁻¹ X_m (the same matrix by the push-through identity) is solved
with the n × n Gram matrix instead; for λ = 0 it is the minimum-norm least-squares solution X_m (X_m)⁺ᵀ.

Self-influence of training example i is τ(z_i, z_i) = Q̄_i (1/M) Σ_m x_{m,i}ᵀ (X_mᵀX_m + λI)⁻¹ x_{m,i}.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from cliptrace.trak.store import FeatureStore


def kernel_weights(features: torch.Tensor, lambda_reg: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W = X (XᵀX + λI)⁻¹ for training features X (n × k), by Cholesky, in ``dtype``.

    Raises:
        ValueError: The system is not positive definite (e.g. duplicated or all-zero features with λ = 0).
    """
    x = features.to(dtype)
    n, k = x.shape
    if k <= n:
        gram = x.T @ x
        system, right_hand_side = gram + lambda_reg * torch.eye(k, dtype=dtype, device=x.device), x.T
    else:
        gram = x @ x.T
        system, right_hand_side = gram + lambda_reg * torch.eye(n, dtype=dtype, device=x.device), x
    factor, info = torch.linalg.cholesky_ex(system)
    if info.item() != 0:
        size = system.shape[0]
        raise ValueError(
            f"the {size}×{size} kernel {'XᵀX' if k <= n else 'XXᵀ'} + λI (λ={lambda_reg:g}) is not positive definite "
            f"in {dtype}: features are linearly dependent (duplicated or zero rows/columns); pass lambda_reg > 0 "
            f"or score in float64"
        )
    solved = torch.cholesky_solve(right_hand_side, factor)
    return solved.T if k <= n else solved


def solve_checkpoint(
    store: FeatureStore, checkpoint: str, lambda_reg: float, dtype: torch.dtype, device: str | torch.device
) -> None:
    """Solve W (:func:`kernel_weights`) for a fully featurized checkpoint of ``store`` on ``device`` and store it."""
    features, _ = store.features(checkpoint)
    weights = kernel_weights(torch.from_numpy(np.array(features)).to(device), lambda_reg, dtype)
    store.save_kernel_weights(checkpoint, weights.cpu().numpy())


@dataclass
class TopK:
    """The k strongest training examples per target.

    Attributes:
        proponents: (t, k) training indices with the largest scores, strongest first.
        proponent_scores: (t, k) their scores.
        opponents: (t, k) training indices with the most negative scores, strongest first.
        opponent_scores: (t, k) their scores.
    """

    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor


class EnsembleScorer:
    """Scores targets against training examples over an ensemble of checkpoints.

    Args:
        weights: Per checkpoint, W_m (n × k) from :func:`kernel_weights`.
        loss_weights: Per checkpoint, Q_m (n).
        block_size: Targets scored at once (bounds memory to n × block_size).
    """

    def __init__(
        self, weights: Sequence[torch.Tensor], loss_weights: Sequence[torch.Tensor], block_size: int = 1024
    ) -> None:
        if not weights or len(weights) != len(loss_weights):
            raise ValueError(f"need one loss-weight vector per checkpoint; got {len(weights)} and {len(loss_weights)}")
        self.weights = list(weights)
        self.dtype = self.weights[0].dtype
        self.mean_loss_weight = torch.stack([q.to(self.dtype) for q in loss_weights]).mean(0)
        self.block_size = block_size

    @property
    def train_size(self) -> int:
        """n, the number of training examples."""
        return self.weights[0].shape[0]

    def _block(self, targets: Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
        total = sum(w @ phi[start:stop].to(w).T for w, phi in zip(self.weights, targets, strict=True))
        return total / len(self.weights) * self.mean_loss_weight[:, None]

    def _check(self, targets: Sequence[torch.Tensor]) -> int:
        if len(targets) != len(self.weights):
            raise ValueError(f"got target features for {len(targets)} checkpoints, the ensemble has {len(self.weights)}")
        sizes = {phi.shape[0] for phi in targets}
        if len(sizes) != 1:
            raise ValueError(f"target features disagree on the number of targets across checkpoints: {sorted(sizes)}")
        return sizes.pop()

    def score(self, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """The n × t score matrix for target features Φ_m (t × k), one per checkpoint."""
        count = self._check(targets)
        return torch.cat(
            [self._block(targets, start, min(start + self.block_size, count)) for start in range(0, count, self.block_size)]
            or [torch.empty(self.train_size, 0, dtype=self.dtype)],
            dim=1,
        )

    def top_k(self, targets: Sequence[torch.Tensor], k: int, exclude: torch.Tensor | None = None) -> TopK:
        """Top-k proponents and opponents per target, one block of targets at a time (no n × t matrix).

        Args:
            targets: Target features per checkpoint.
            k: How many of each (capped at n, or n − 1 where a target is excluded).
            exclude: (t,) a training index to leave out per target (the target itself), or −1.
        """
        count = self._check(targets)
        k = min(k, self.train_size - (1 if exclude is not None else 0))
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, count, self.block_size):
            stop = min(start + self.block_size, count)
            block = self._block(targets, start, stop)
            high, low = block.clone(), block.clone()
            if exclude is not None:
                for column, index in enumerate(exclude[start:stop].tolist()):
                    if index >= 0:
                        high[index, column], low[index, column] = float("-inf"), float("inf")
            top = high.topk(k, dim=0)
            bottom = low.topk(k, dim=0, largest=False)
            parts.append((top.indices.T, top.values.T, bottom.indices.T, bottom.values.T))
        if not parts:
            empty_index, empty_value = torch.empty(0, k, dtype=torch.long), torch.empty(0, k, dtype=self.dtype)
            return TopK(empty_index, empty_value, empty_index, empty_value)
        return TopK(*(torch.cat(column) for column in zip(*parts)))

    def self_influence(self, train_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """τ(z_i, z_i) for every training example, from the training features X_m of each checkpoint."""
        if len(train_features) != len(self.weights):
            raise ValueError(f"got training features for {len(train_features)} checkpoints, expected {len(self.weights)}")
        leverage = sum((w * x.to(w)).sum(1) for w, x in zip(self.weights, train_features))
        return leverage / len(self.weights) * self.mean_loss_weight
