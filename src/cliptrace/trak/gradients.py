"""Per-example gradients of a model-output function with ``torch.func``, over a chosen parameter set."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import grad, vmap

if TYPE_CHECKING:
    from cliptrace.trak.outputs import ModelOutput


def select_parameters(module: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters to take gradients with respect to, in the module's order.

    Args:
        module: The model.
        patterns: Exact names or shell-style globs (``"model.visual_projection.*"``); ``None`` selects every
            parameter with ``requires_grad``.

    Raises:
        ValueError: A pattern matches no parameter, or nothing is selected.
    """
    named = [(name, p) for name, p in module.named_parameters()]
    if patterns is None:
        chosen = [name for name, p in named if p.requires_grad]
    else:
        unmatched = [pattern for pattern in patterns if not any(fnmatchcase(name, pattern) for name, _ in named)]
        if unmatched:
            raise ValueError(f"parameter pattern(s) {unmatched} match no parameter of {type(module).__name__}")
        chosen = [name for name, _ in named if any(fnmatchcase(name, pattern) for pattern in patterns)]
    if not chosen:
        raise ValueError(f"no parameters selected in {type(module).__name__} (none requires grad)")
    return chosen


def gradient_dim(module: nn.Module, names: Sequence[str]) -> int:
    """Total number of entries of the named parameters."""
    parameters = dict(module.named_parameters())
    return sum(parameters[name].numel() for name in names)


def per_example_gradients(
    output: ModelOutput,
    module: nn.Module,
    names: Sequence[str],
    batch: Any,
    indices: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """∇_θ f(θ; z_b) for every example b of ``batch``, flattened and concatenated in ``names`` order.

    Args:
        output: The model-output function.
        module: The model, in eval mode, with the checkpoint loaded.
        names: Parameters to differentiate (see :func:`select_parameters`); the others are held fixed.
        batch: A pytree of tensors with a leading batch dimension.
        indices: (B,) training index of each example (−1 for non-training examples).
        chunk_size: Examples per vectorized call (``None``: the whole batch at once).

    Returns:
        (B, D) gradients with D = :func:`gradient_dim`.
    """
    everything = dict(module.named_parameters())
    params = {name: everything[name].detach() for name in names}

    def f(p: dict[str, torch.Tensor], example: Any, index: torch.Tensor) -> torch.Tensor:
        return output.output(module, p, example, index)

    with torch.no_grad(), _masks_built():  # torch.func.grad still differentiates; nothing outside it is recorded
        grads = vmap(grad(f), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, batch, indices)
    return torch.cat([grads[name].reshape(indices.shape[0], -1) for name in names], dim=1)


@contextmanager
def _masks_built() -> Iterator[None]:
    """Have transformers build every bidirectional attention mask rather than skip an all-ones one.

    Deciding the skip reads the padding mask's values in a Python ``if`` (``padding_mask.all()``), which
    ``torch.func.vmap`` refuses as data-dependent control flow: transformers 5.x BERT-style text backbones (the frozen
    dual encoder's) fail under the exact path without this. The built mask gives the same attention.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # an older transformers without masking_utils: nothing to switch
        yield
        return
    name = "_ignore_bidirectional_mask_sdpa"
    original = getattr(masking_utils, name, None)
    if original is None:
        yield
        return
    setattr(masking_utils, name, lambda *args, **kwargs: False)
    try:
        yield
    finally:
        setattr(masking_utils, name, original)


@torch.no_grad()
def parameter_fingerprint(module: nn.Module, names: Sequence[str]) -> str:
    """SHA-256 (first 16 hex digits) of the named parameters' bytes, in order."""
    parameters = dict(module.named_parameters())
    digest = hashlib.sha256()
    for name in names:
        tensor = parameters[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
