r"""K-FAC and EK-FAC whitening of factored gradients: features φ = F̂^{-1/2} g, so that φ·φ' = gᵀ F̂⁻¹ g'.

For a linear layer with inputs x̃_t = [x_t; 1] and output gradients δ_t at the positions t of one example, the
per-example gradient is G = Σ_t δ_t x̃_tᵀ. K-FAC approximates the layer's block of the Gauss–Newton matrix
F = E[vec G vec Gᵀ] by A ⊗ S, with A = E[Σ_t x̃_t x̃_tᵀ] and S = E[Σ_t δ_t δ_tᵀ] (means over the fitted examples).
With the eigenbases A = Q_A diag(a) Q_Aᵀ and S = Q_S diag(s) Q_Sᵀ, its eigenvalues are Λ_ij = s_i a_j; EK-FAC
(George et al. 2018) keeps the eigenbasis and refits the eigenvalues to the gradients, Λ_ij = E[(Q_Sᵀ G Q_A)_ij²].
The whitened gradient is

    W = (Q_Sᵀ G Q_A) ⊘ √(Λ + λ),        λ = damping × mean(Λ) of the layer,

so ⟨W, W'⟩ = gᵀ (F̂ + λI)⁻¹ g' exactly (for K-FAC, F̂ = A ⊗ S). Rotating back is not needed: the side projections and
the sketch that follow preserve inner products in any basis. LayerNorm parameters get the diagonal
(Λ = E[g²] per parameter) and embeddings one value per layer (the mean of E[g²] over its weights).

Fitting takes two passes over the fitting examples (covariances, then eigenvalues; K-FAC uses the second only for
LayerNorms and embeddings), each about one featurization's cost. Nothing is projected while fitting, so a layer's
statistics hold d_o² + d_i² + d_o·d_i numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cliptrace.files import atomic_file
from cliptrace.trak.factored import FactoredFeaturizer, FactoredLayer
from cliptrace.trak.settings import WHITENINGS

Batches = Callable[[], Iterable[tuple[Any, torch.Tensor]]]
"""A function giving a fresh iterator over the fitting batches: (batch, training indices) pairs."""


@dataclass(frozen=True)
class LayerWhitening:
    """What one layer's hooks apply: rotations of both sides and the elementwise 1/√(Λ + λ).

    Attributes:
        in_basis: Q_A ((d_i + 1) × (d_i + 1), the bias column included), or None (LayerNorm, embedding).
        out_basis: Q_S (d_o × d_o), or None.
        inverse_sqrt: 1/√(Λ + λ): (d_o, d_i + 1) for a linear layer, (size,) for a LayerNorm, a scalar for an embedding.
    """

    in_basis: torch.Tensor | None
    out_basis: torch.Tensor | None
    inverse_sqrt: torch.Tensor

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerWhitening:
        """A copy on ``device`` in ``dtype``."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, dtype)
        return LayerWhitening(move(self.in_basis), move(self.out_basis), move(self.inverse_sqrt))


@dataclass(frozen=True)
class LayerStatistics:
    """The fitted, undamped statistics of one layer: its eigenbases (linear layers) and eigenvalues Λ."""

    in_basis: torch.Tensor | None
    out_basis: torch.Tensor | None
    eigenvalues: torch.Tensor

    def whitening(self, damping: float) -> LayerWhitening:
        """The whitening with λ = ``damping`` × mean(Λ)."""
        eigenvalues = self.eigenvalues.clamp_min(0)
        ridge = damping * eigenvalues.mean()
        if not ridge > 0:
            raise ValueError(f"the whitening needs a positive ridge term; got damping {damping} on eigenvalues with "
                             f"mean {float(eigenvalues.mean()):g}")
        return LayerWhitening(self.in_basis, self.out_basis, (eigenvalues + ridge).rsqrt())


def _is_linear(layer: FactoredLayer) -> bool:
    return isinstance(layer.module, (nn.Linear, nn.Conv2d))


def fit_statistics(featurizer: FactoredFeaturizer, batches: Batches, kind: str) -> dict[str, LayerStatistics]:
    """Fit K-FAC (``kind="kfac"``) or EK-FAC (``"ekfac"``) statistics of every layer of ``featurizer``.

    Args:
        featurizer: A factored featurizer without a whitening; its model-output function is differentiated.
        batches: The fitting batches (called once per pass).
        kind: ``"kfac"`` (eigenvalues s_i a_j) or ``"ekfac"`` (eigenvalues refitted to the gradients).

    Returns:
        The statistics by layer name, in float64 on the CPU.

    Raises:
        ValueError: Unknown kind, a featurizer that is already whitened, or no fitting example.
    """
    if kind not in WHITENINGS:
        raise ValueError(f"kind must be one of {WHITENINGS}, got {kind!r}")
    if any(layer.whitening is not None for layer in featurizer.layers):
        raise ValueError("fit the statistics on a featurizer without a whitening")
    covariances = _covariances(featurizer, batches)
    bases: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for name, (inputs, outputs) in covariances.items():
        in_values, in_basis = torch.linalg.eigh(inputs)
        out_values, out_basis = torch.linalg.eigh(outputs)
        bases[name] = in_basis, out_basis, in_values, out_values
    eigenvalues = _second_moments(featurizer, batches, {name: basis[:2] for name, basis in bases.items()},
                                  linear=kind == "ekfac")
    statistics = {}
    for layer in featurizer.layers:
        if layer.name in bases:
            in_basis, out_basis, in_values, out_values = bases[layer.name]
            values = (eigenvalues[layer.name] if kind == "ekfac"
                      else torch.outer(out_values.clamp_min(0), in_values.clamp_min(0)))
            statistics[layer.name] = LayerStatistics(in_basis, out_basis, values)
        else:
            statistics[layer.name] = LayerStatistics(None, None, eigenvalues[layer.name])
    return statistics


def _covariances(featurizer: FactoredFeaturizer, batches: Batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A = E[Σ_t x̃_t x̃_tᵀ] and S = E[Σ_t δ_t δ_tᵀ] of every linear layer, in float64."""
    sums: dict[str, list[torch.Tensor]] = {}
    examples = 0
    for batch, indices in batches():
        dtype = featurizer.place(indices.device)
        count = len(indices)

        def keep(layer: FactoredLayer, inputs: tuple[Any, ...]) -> torch.Tensor | None:
            return layer.with_bias(layer.rows(inputs, count, dtype)).flatten(0, 1) if _is_linear(layer) else None

        def add(layer: FactoredLayer, rows: torch.Tensor | None, grad: torch.Tensor) -> None:
            if rows is None:
                return
            deltas = layer.deltas(grad, count, dtype).flatten(0, 1)
            pair = [(rows.T @ rows).double().cpu(), (deltas.T @ deltas).double().cpu()]
            if layer.name in sums:
                sums[layer.name] = [total + part for total, part in zip(sums[layer.name], pair, strict=True)]
            else:
                sums[layer.name] = pair

        featurizer.hooked_backward(batch, indices, keep, add)
        examples += count
    if examples == 0:
        raise ValueError("no fitting example: the statistics need at least one")
    return {name: (inputs / examples, outputs / examples) for name, (inputs, outputs) in sums.items()}


def _second_moments(featurizer: FactoredFeaturizer, batches: Batches,
                    bases: dict[str, tuple[torch.Tensor, torch.Tensor]], linear: bool) -> dict[str, torch.Tensor]:
    """E[(Q_Sᵀ G Q_A)²] of the linear layers (when ``linear``), E[g²] of LayerNorms, mean E[g²] of embeddings."""
    layers = [layer for layer in featurizer.layers if linear or not _is_linear(layer)]
    fitted = {layer.name for layer in layers}
    totals: dict[str, torch.Tensor] = {}
    examples = 0
    for batch, indices in batches():
        dtype = featurizer.place(indices.device)
        count = len(indices)
        rotations = {name: (q_in.to(indices.device, dtype), q_out.to(indices.device, dtype))
                     for name, (q_in, q_out) in bases.items()}
        gradients: dict[str, torch.Tensor] = {}

        def keep(layer: FactoredLayer, inputs: tuple[Any, ...]) -> torch.Tensor | None:
            if layer.name not in fitted:
                return None
            if _is_linear(layer):
                return layer.with_bias(layer.rows(inputs, count, dtype)) @ rotations[layer.name][0]
            return layer.keep(inputs, count, dtype)

        def add(layer: FactoredLayer, kept: torch.Tensor | None, grad: torch.Tensor) -> None:
            if kept is None:
                return
            if _is_linear(layer):
                deltas = layer.deltas(grad, count, dtype) @ rotations[layer.name][1]
                gradient = torch.bmm(deltas.transpose(1, 2), kept)
            else:
                gradient = layer.block(kept, grad, dtype)
            gradients[layer.name] = gradients[layer.name] + gradient if layer.name in gradients else gradient

        featurizer.hooked_backward(batch, indices, keep, add)
        for name, gradient in gradients.items():
            square = gradient.double().square().sum(0).cpu()
            totals[name] = totals[name] + square if name in totals else square
        examples += count
    if examples == 0:
        raise ValueError("no fitting example: the statistics need at least one")
    moments = {}
    for layer in layers:
        total = totals.get(layer.name)
        if total is None:
            total = torch.zeros(() if isinstance(layer.module, nn.Embedding) else layer.size, dtype=torch.float64)
        if isinstance(layer.module, nn.Embedding):
            d_out, d_in = layer.widths()
            total = total.sum() / (d_out * d_in)
        moments[layer.name] = total / examples
    return moments


def save_statistics(path: str | Path, statistics: dict[str, LayerStatistics], metadata: dict[str, str]) -> None:
    """Write ``statistics`` to the safetensors file ``path`` (atomically), with string ``metadata``."""
    tensors = {}
    for name, layer in statistics.items():
        for part in ("in_basis", "out_basis", "eigenvalues"):
            tensor = getattr(layer, part)
            if tensor is not None:
                tensors[f"{name}/{part}"] = tensor.contiguous()
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def stored_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a statistics file, or None when there is none or it cannot be read."""
    try:
        with safe_open(str(path), "pt") as handle:
            return handle.metadata()
    except (OSError, SafetensorError):
        return None


def load_statistics(path: str | Path, layers: Iterable[str]) -> dict[str, LayerStatistics]:
    """Read the statistics of ``layers`` written by :func:`save_statistics`.

    Raises:
        ValueError: The file lacks a layer's eigenvalues.
    """
    tensors = load_file(str(path))
    statistics = {}
    for name in layers:
        if f"{name}/eigenvalues" not in tensors:
            raise ValueError(f"{path}: no statistics of layer {name!r}")
        statistics[name] = LayerStatistics(tensors.get(f"{name}/in_basis"), tensors.get(f"{name}/out_basis"),
                                           tensors[f"{name}/eigenvalues"])
    return statistics


def whitenings(statistics: dict[str, LayerStatistics], damping: float) -> dict[str, LayerWhitening]:
    """Every layer's whitening at ``damping`` (λ = damping × the layer's mean eigenvalue)."""
    return {name: layer.whitening(damping) for name, layer in statistics.items()}
