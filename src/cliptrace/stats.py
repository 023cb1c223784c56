"""Small statistics shared across the package: average ranks, Spearman correlation and a bootstrap interval."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Statistic = Callable[[np.ndarray], float]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, tied values sharing the mean of their ranks (float64)."""
    length = values.shape[-1]
    flat = values.reshape(-1, length)
    ordered, order = flat.sort(dim=-1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    groups = starts.cumsum(-1) - 1 + length * torch.arange(len(flat))[:, None]  # tie groups, unique across rows
    positions = torch.arange(1, length + 1, dtype=torch.float64).expand_as(ordered)
    totals = torch.zeros(flat.numel(), dtype=torch.float64).index_add_(0, groups.flatten(), positions.flatten())
    counts = torch.zeros(flat.numel(), dtype=torch.float64).index_add_(
        0, groups.flatten(), torch.ones(flat.numel(), dtype=torch.float64)
    )
    mean_rank = (totals / counts.clamp_min(1))[groups]
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank).view(values.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation along the last dimension: Pearson's r of the average ranks (NaN if constant)."""
    ranks_a, ranks_b = average_ranks(a), average_ranks(b)
    ranks_a = ranks_a - ranks_a.mean(dim=-1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(dim=-1, keepdim=True)
    covariance = (ranks_a * ranks_b).sum(-1)
    return covariance / ((ranks_a**2).sum(-1) * (ranks_b**2).sum(-1)).sqrt()
