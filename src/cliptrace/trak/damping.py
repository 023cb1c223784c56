r"""Choosing the kernel's ridge term without retraining: generalized cross-validation, or held-out LDS.

The ridge term of the kernel (XᵀX + λI)⁻¹ is set relative to the scale of the features: λ = c · s with
s = mean diag(XᵀX) = ‖X‖²_F / k and c the *damping*. Both criteria here pick c from the fixed log-spaced
:data:`DAMPING_GRID` and return a :class:`DampingChoice`.

**GCV** (:func:`gcv_damping`; Golub, Heath & Wahba 1979, "Generalized cross-validation as a method for choosing a
good ridge parameter") scores the ridge regression of a response y (n) on X (n × k) by

    GCV(λ) = n ‖(I − H_λ) y‖² / tr(I − H_λ)²,      H_λ = X (XᵀX + λI)⁻¹ Xᵀ,

a rotation-invariant form of leave-one-out error. With the eigendecomposition XᵀX = V diag(e) Vᵀ (k ≤ n; the
Gram is summed over row blocks by :func:`~cliptrace.trak.scoring.gram_matrix`) and b = Vᵀ Xᵀy, every grid value
costs O(k)::

    ‖(I − H_λ) y‖² = ‖y‖² − Σ_j b_j² (e_j + 2λ) / (e_j + λ)²,      tr(I − H_λ) = n − Σ_j e_j / (e_j + λ).

When k > n the n × n XXᵀ = U diag(e) Uᵀ is decomposed instead, with z = Uᵀy::

    ‖(I − H_λ) y‖² = Σ_j z_j² λ² / (e_j + λ)²,                    tr(I − H_λ) = Σ_j λ / (e_j + λ).

Everything is computed in float64; no n × n matrix is formed when k ≤ n. Without another response,
:func:`loss_weight_response` turns the loss weights Q into the training pairs' own margins.

**Held-out LDS** (:func:`lds_damping`) needs the subset models of ``cliptrace verify lds``: each grid value's
scores are rated by the linear datamodeling score (:func:`~cliptrace.verify.lds.linear_datamodeling_score`), and
the largest mean LDS wins.

**Ties.** Criterion values within a relative :data:`TIE_RTOL` of the best one are ties (summing the Gram in
another row order moves GCV by rounding only), and among ties the larger damping wins, so a flat criterion picks
the largest grid value and the choice does not depend on the order of the rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cliptrace.trak.scoring import BLOCK_ROWS, Rows, gram_matrix, read_rows
from cliptrace.verify.lds import linear_datamodeling_score

DAMPING_GRID: tuple[float, ...] = tuple(float(10.0 ** (exponent / 2)) for exponent in range(-8, 3))
"""Relative damping values c tried by default: 11 values, half a decade apart, 1e-4 … 1e1 (λ = c · mean diag XᵀX)."""

TIE_RTOL = 1e-9
"""Criterion values within this relative distance of the best value count as ties (the larger damping wins)."""

RESPONSE_CLIP = 1e-6
""":func:`loss_weight_response` clips Q into [RESPONSE_CLIP, 1 − RESPONSE_CLIP]: margins stay within ±13.8."""

CRITERIA = {"gcv": "minimum", "lds": "maximum"}
"""The criteria of a :class:`DampingChoice`, and whether the best value is their minimum or maximum."""


@dataclass(frozen=True)
class DampingChoice:
    """A damping chosen from a grid by a criterion.

    Attributes:
        criterion: ``"gcv"`` (smaller is better) or ``"lds"`` (mean LDS, larger is better).
        damping: The chosen relative damping c.
        lambda_reg: The absolute ridge term λ = c · mean diag(XᵀX) it means; None where the features' scale was
            not given (:func:`lds_damping` without ``scale``).
        grid: The relative damping values tried, increasing.
        values: The criterion at each grid value.
    """

    criterion: str
    damping: float
    lambda_reg: float | None
    grid: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown damping criterion {self.criterion!r}; expected one of {sorted(CRITERIA)}")
        if len(self.grid) != len(self.values):
            raise ValueError(f"a damping choice over {len(self.grid)} grid values has {len(self.values)} criterion "
                             f"values")
        if self.damping not in self.grid:
            raise ValueError(f"the chosen damping {self.damping!r} is not one of the grid values {self.grid}")

    @property
    def at_edge(self) -> bool:
        """True where the choice is the smallest or largest grid value (the best damping may lie beyond the grid)."""
        return len(self.grid) > 1 and self.damping in (self.grid[0], self.grid[-1])

    def describe(self) -> str:
        """One line, e.g. ``"damping 0.01 (λ=2.37) by GCV, minimum 1.04 over 11 values 0.0001…10"``."""
        best = self.values[self.grid.index(self.damping)]
        text = f"damping {self.damping:.3g}"
        if self.lambda_reg is not None:
            text += f" (λ={self.lambda_reg:.3g})"
        text += (f" by {self.criterion.upper()}, {CRITERIA[self.criterion]} {best:.4g} over {len(self.grid)} values "
                 f"{self.grid[0]:.3g}…{self.grid[-1]:.3g}")
        return text + (", at the edge of the grid" if self.at_edge else "")

    def to_json(self) -> str:
        """The choice as a JSON object (read back by :meth:`from_json`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DampingChoice:
        """The choice that :meth:`to_json` wrote.

        Raises:
            ValueError: ``text`` is not such a JSON object.
        """
        try:
            data = json.loads(text)
            return cls(str(data["criterion"]), float(data["damping"]),
                       None if data["lambda_reg"] is None else float(data["lambda_reg"]),
                       tuple(float(value) for value in data["grid"]), tuple(float(value) for value in data["values"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"not a stored damping choice ({type(error).__name__}: {error}): {text[:200]!r}") from None


def loss_weight_response(loss_weights: Rows) -> np.ndarray:
    """The default GCV response: each training pair's margin logit(p) = log((1 − Q) / Q), float64.

    p = 1 − Q is the model's probability of the pair's correct match against the bank, so logit(p) is the pair's
    own margin against the bank, the quantity whose gradients TRAK linearizes. Q is clipped into
    [:data:`RESPONSE_CLIP`, 1 − RESPONSE_CLIP] first: a saturated softmax stores Q = 0 or 1 exactly (float32),
    which would give an infinite margin.

    Raises:
        ValueError: Q is not 1-D, or has values that are NaN or outside [0, 1].
    """
    if len(loss_weights.shape) != 1:
        raise ValueError(f"loss weights must be 1-D (one per training pair), got shape {tuple(loss_weights.shape)}")
    q = read_rows(loss_weights, 0, loss_weights.shape[0]).to(torch.float64).numpy()
    if np.isnan(q).any() or (q < 0).any() or (q > 1).any():
        raise ValueError("loss weights must lie in [0, 1] (Q = 1 − p); got NaN or values outside it")
    q = np.clip(q, RESPONSE_CLIP, 1 - RESPONSE_CLIP)
    return np.log1p(-q) - np.log(q)


def gcv_damping(
    features: Rows, response: Rows, grid: Sequence[float] = DAMPING_GRID, block_rows: int = BLOCK_ROWS
) -> DampingChoice:
    """The damping of the grid with the smallest GCV of the ridge regression of ``response`` on ``features``.

    Args:
        features: X (n × k), e.g. a checkpoint's training features; a ``.npy`` memory map is read ``block_rows``
            rows at a time (twice when k ≤ n: for XᵀX, then for Xᵀy).
        response: y (n), e.g. :func:`loss_weight_response` of the checkpoint's loss weights.
        grid: Relative damping values c, positive and increasing.
        block_rows: Rows of X read at once.

    Raises:
        ValueError: The shapes disagree, y is constant or not finite, X is all zeros or not finite, or the grid is
            not positive and increasing.
    """
    values = _grid(grid)
    n, k = features.shape
    y = _response(response, n)
    if k <= n:
        gram = gram_matrix(features, torch.float64, block_rows=block_rows)
        _check_finite(gram)
        moment = torch.zeros(k, dtype=torch.float64)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            moment += read_rows(features, start, stop).to(torch.float64).T @ y[start:stop]
    else:
        x = torch.cat([read_rows(features, start, min(start + block_rows, n)).to(torch.float64)
                       for start in range(0, n, block_rows)])
        gram, moment = x @ x.T, y
        _check_finite(gram)
    scale = gram.diagonal().sum().item() / k
    if scale == 0:
        raise ValueError(f"features ({n} × {k}) are all zero: there is no scale to set the damping against")
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, projected = eigenvalues.clamp_(min=0).numpy(), (vectors.T @ moment).square_().numpy()
    lambdas = np.asarray(values) * scale
    shifted = eigenvalues[None, :] + lambdas[:, None]  # (grid, eigenvalues)
    if k <= n:
        residual = y.square().sum().item() - (projected * (eigenvalues + 2 * lambdas[:, None]) / shifted**2).sum(1)
        trace = (n - k) + (lambdas[:, None] / shifted).sum(1)  # n − Σ e/(e + λ), without the cancellation
    else:
        residual = (projected * (lambdas[:, None] / shifted) ** 2).sum(1)
        trace = (lambdas[:, None] / shifted).sum(1)
    criterion = n * np.maximum(residual, 0) / trace**2
    damping = _best(values, criterion, minimize=True)
    return DampingChoice("gcv", damping, damping * scale, values, tuple(float(value) for value in criterion))


def lds_damping(
    score_for: Callable[[float], np.ndarray],
    masks: np.ndarray,
    outputs: np.ndarray,
    grid: Sequence[float] = DAMPING_GRID,
    *,
    scale: float | None = None,
) -> DampingChoice:
    """The damping of the grid whose scores have the largest mean LDS on existing subset models.

    Args:
        score_for: Maps a relative damping c to the (n_train × n_targets) scores computed with it.
        masks: (M, n_train) which training pairs each subset model was trained on.
        outputs: (M, n_targets) each subset model's output on each target.
        grid: Relative damping values c, positive and increasing.
        scale: mean diag(XᵀX) of the features, to report the absolute λ of the choice; None leaves it out.

    Raises:
        ValueError: The grid is not positive and increasing, or the LDS cannot be computed for some grid value
            (see :func:`~cliptrace.verify.lds.linear_datamodeling_score`).
    """
    values = _grid(grid)
    criterion = []
    for damping in values:
        try:  # only the mean is used: one bootstrap resample is enough
            criterion.append(linear_datamodeling_score(score_for(damping), masks, outputs, n_resamples=1).mean)
        except ValueError as error:
            raise ValueError(f"the LDS of the scores at damping {damping:g}: {error}") from error
    chosen = _best(values, np.asarray(criterion), minimize=False)
    return DampingChoice("lds", chosen, None if scale is None else chosen * scale, values, tuple(criterion))


def _grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(value) for value in grid)
    if not values or not all(np.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"the damping grid must be non-empty, finite and positive, got {values}")
    if any(later <= earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(f"the damping grid must be strictly increasing, got {values}")
    return values


def _response(response: Rows, n: int) -> torch.Tensor:
    if tuple(response.shape) != (n,):
        raise ValueError(f"the response must have one value per feature row, shape ({n},); got {tuple(response.shape)}")
    y = read_rows(response, 0, n).to(torch.float64)
    if not torch.isfinite(y).all():
        raise ValueError("the response has non-finite values (NaN or inf)")
    if n == 0 or (y == y[0]).all():
        raise ValueError(f"the response is constant ({n} values): it cannot rate any damping")
    return y


def _check_finite(gram: torch.Tensor) -> None:
    if not torch.isfinite(gram).all():
        raise ValueError("the features have non-finite values (NaN or inf): their Gram matrix is not finite")


def _best(grid: tuple[float, ...], criterion: np.ndarray, minimize: bool) -> float:
    """The largest grid value whose criterion is within :data:`TIE_RTOL` of the best finite one."""
    signed = np.where(np.isfinite(criterion), criterion if minimize else -criterion, np.inf)
    if not np.isfinite(signed).any():
        raise ValueError(f"the damping criterion is not finite at any grid value {grid}: {tuple(criterion)}")
    best = signed.min()
    ties = np.flatnonzero(signed <= best + TIE_RTOL * abs(best))
    return grid[int(ties[-1])]
