"""Small helpers for batches given as pytrees of tensors (tensors, tuples/lists, mappings such as BatchEncoding)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def map_batch(function: Callable[[torch.Tensor], torch.Tensor], batch: Any) -> Any:
    """Apply ``function`` to every tensor of ``batch``; mappings become plain dicts (which ``vmap`` understands)."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, Mapping):
        return {key: map_batch(function, value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_batch(function, item) for item in batch)
    raise TypeError(f"batch entries must be tensors, tuples, lists or mappings, got {type(batch).__name__}")


def batch_size(batch: Any) -> int:
    """The leading dimension shared by every tensor of ``batch``."""
    sizes: set[int] = set()
    map_batch(lambda t: sizes.add(t.shape[0]) or t, batch)
    if len(sizes) != 1:
        raise ValueError(f"batch tensors disagree on the batch size: {sorted(sizes)}")
    return sizes.pop()


def take_rows(batch: Any, rows: Sequence[int] | torch.Tensor) -> Any:
    """The examples ``rows`` of ``batch``."""
    index = torch.as_tensor(rows, dtype=torch.long)
    return map_batch(lambda t: t[index.to(t.device)], batch)


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the batch dimension."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches))
    if isinstance(first, Mapping):
        return {key: concat_batches([batch[key] for batch in batches]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_batches(list(parts)) for parts in zip(*batches))
    raise TypeError(f"batch entries must be tensors, tuples, lists or mappings, got {type(first).__name__}")
