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


def bootstrap_ci(
    values: np.ndarray | torch.Tensor,
    *,
    statistic: Statistic = np.mean,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of ``statistic`` over the items of a 1-D array.

    NaN items are dropped first. Each resample draws as many items as are left, with replacement, from
    ``np.random.default_rng(seed)``; no global random state is used or changed.

    Args:
        values: One value per item, shape (n,); a numpy array or a torch tensor.
        statistic: Maps a 1-D float64 array to a number; applied to the values and to each resample.
        n_resamples: Number of resamples.
        confidence: Coverage of the interval, strictly between 0 and 1.
        seed: Seeds the resampling.

    Returns:
        ``(estimate, low, high)``: the statistic of the values and the ends of the percentile interval.

    Raises:
        ValueError: ``values`` is not 1-D, every value is NaN (or there are none), or an argument is out of range.
    """
    data = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if data.ndim != 1:
        raise ValueError(f"values must be 1-D (one value per item), got shape {tuple(data.shape)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    data = data[~np.isnan(data)]
    if data.size == 0:
        raise ValueError(f"no values left to bootstrap: all {len(values)} values are NaN (or there are none)")
    rng = np.random.default_rng(seed)
    resampled = np.array([statistic(data[rng.integers(0, data.size, data.size)]) for _ in range(n_resamples)])
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return float(statistic(data)), float(low), float(high)
