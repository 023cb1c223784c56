"""Cross-device gathering of features for a loss over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """Concatenate ``features`` from every rank in rank order, keeping gradients flowing to each rank's share.

    Without an initialized process group (or with one rank) the input is returned unchanged. Every rank must
    pass the same number of rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    return collectives.all_gather_single_autograd(features, gather_dim=0, group=dist.group.WORLD)


def rank_offset(local: int, gathered: int) -> int:
    """The global row of this rank's first local row: ``rank × local`` once features were gathered, else 0."""
    return dist.get_rank() * local if gathered != local else 0
