"""TRAK features: projected per-example gradients of a model-output function, and the loss weights Q.

A :class:`Featurizer` turns a batch into ``(features (B, k), Q (B,))``. :class:`ExactFeaturizer` is the reference
path: per-example gradients with ``torch.func`` followed by a dense random projection. A faster path slots in
beside it by implementing the same two methods.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cliptrace.trak.clip_call import eager_attention
from cliptrace.trak.gradients import gradient_dim, parameter_fingerprint, per_example_gradients, select_parameters
from cliptrace.trak.outputs import ModelOutput
from cliptrace.trak.projection import DenseProjector, IdentityProjector, Projector


class Featurizer(abc.ABC):
    """Computes TRAK features and loss weights for batches, with the checkpoint currently in ``module``."""

    module: nn.Module
    output: ModelOutput
    parameter_names: list[str]
    proj_dim: int

    @abc.abstractmethod
    def features(self, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (B, proj_dim), loss weights Q (B,))`` for ``batch`` (float32; float64 for a float64 model).

        Args:
            batch: A pytree of tensors with a leading batch dimension, as the model-output function expects.
            indices: (B,) training index of each example (−1 for examples outside the training set).
        """

    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes the features (recorded in the feature store's manifest)."""

    def fingerprint(self) -> str:
        """A digest of the selected parameter values: identifies the checkpoint loaded in ``module``."""
        return parameter_fingerprint(self.module, self.parameter_names)


class ExactFeaturizer(Featurizer):
    """Per-example gradients by ``vmap(grad(f))``, then a dense seeded projection.

    Args:
        module: The model (a DualEncoder, HF ``CLIPModel``, open_clip-style module, or a classifier).
        output: The model-output function.
        proj_dim: Feature dimension; ``None`` keeps the raw gradients (no projection).
        projection: ``"rademacher"`` or ``"gaussian"``.
        seed: Projection seed.
        parameters: Parameter names or globs to differentiate (default: all trainable parameters).
        chunk_size: Examples per vectorized gradient call (bounds memory; ``None`` = whole batch).
    """

    def __init__(
        self,
        module: nn.Module,
        output: ModelOutput,
        proj_dim: int | None = 2048,
        projection: str = "rademacher",
        seed: int = 0,
        parameters: Sequence[str] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        self.module = module
        self.output = output
        self.parameter_names = select_parameters(module, parameters)
        self.chunk_size = chunk_size
        dim = gradient_dim(module, self.parameter_names)
        self.projector: Projector = (
            IdentityProjector(dim) if proj_dim is None else DenseProjector(dim, proj_dim, projection, seed)
        )
        self.proj_dim = self.projector.proj_dim

    def settings(self) -> dict[str, Any]:
        return {
            "featurizer": "exact",
            "projection": self.projector.settings(),
            "parameters": parameter_set_summary(self.parameter_names),
            "output": self.output.settings(),
        }

    def features(self, batch: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with eager_attention(self.module):
            gradients = per_example_gradients(
                self.output, self.module, self.parameter_names, batch, indices, self.chunk_size
            )
            weights = self.output.loss_weight(self.module, batch, indices)
        features = self.projector.project(gradients)
        return features, weights.to(features.dtype)


def parameter_set_summary(names: Sequence[str]) -> dict[str, Any]:
    """A compact, comparable description of a parameter set: its size and a digest of the names."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    return {"count": len(names), "names_sha256": digest}
