"""Gradient cosine similarity: cos(x_i, φ) of projected gradients, averaged over checkpoints.

Unlike TracIn it ignores gradient norms, so examples with large gradients (hard or mislabeled pairs) do not
dominate every target's list; no loss weights and no kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.trak.attribute import LoadedCheckpoint
from cliptrace.trak.scoring import Rows, read_rows
from cliptrace.trak.store import FeatureStore


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)


@dataclass(frozen=True)
class CosineKernel:
    """Scores ``x̂_i · φ̂`` with unit-normalized rows (zero rows score 0); streams like any kernel."""

    dtype: torch.dtype

    def check(self, train_size: int, dim: int) -> None:
        """Fits features of any shape."""

    def target_map(self, targets: torch.Tensor) -> torch.Tensor:
        """Ψ = Φ̂ᵀ (k × t)."""
        return _unit_rows(targets.to(self.dtype)).T

    def left_rows(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of X̂."""
        return _unit_rows(read_rows(features, start, stop).to(self.dtype))

    def leverage(self, features: Rows, start: int, stop: int) -> torch.Tensor:
        """x̂_i · x̂_i: 1, or 0 for an all-zero row."""
        return (read_rows(features, start, stop).abs().sum(1) > 0).to(self.dtype)


class GradientCosine(StoredGradientMethod):
    """Mean over checkpoints of cos(x_{m,i}, φ_m)."""

    name = "grad-cosine"
    summary = "a norm-free baseline: similar gradients rank high regardless of how hard the pair is"

    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> CosineKernel:
        return CosineKernel(self.settings.torch_dtype)

    def loss_weights(self, stored: np.ndarray) -> Rows:
        return np.ones(stored.shape, dtype=stored.dtype)
