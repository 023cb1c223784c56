r"""Choosing the ridge damping of the kernel regression without retraining, or from existing subset models.

The ridge term is relative to the scale of the features: λ = c · s with s = mean diag(XᵀX) = ‖X‖²_F / k
(:func:`feature_scale`), and c the *damping*, picked from the log-spaced :data:`DAMPING_GRID`.

* :func:`gcv_damping` — generalized cross-validation (Golub, Heath & Wahba 1979) of the ridge regression of a
  response y on X: GCV(λ) = n‖(I − H_λ)y‖² / tr(I − H_λ)² with H_λ = X(XᵀX + λI)⁻¹Xᵀ, an estimate of the
  leave-one-out prediction error that needs no refitting. Every grid value comes from one eigendecomposition
  in float64: of the k × k Gram XᵀX (summed over row blocks, :func:`~cliptrace.trak.scoring.gram_matrix`) when
  k ≤ n, of the n × n XXᵀ when k > n. With eigenvalues s_j and coordinates z_j of y on the left singular
  vectors u_j (z_j² = (v_jᵀXᵀy)² / s_j from XᵀX; z_j = u_jᵀy from XXᵀ)::

      ‖(I − H_λ)y‖² = ‖y − Py‖² + Σ_j (λ / (s_j + λ))² z_j²        tr(I − H_λ) = n − Σ_j s_j / (s_j + λ)

  with P the projection onto the column space of X (‖y − Py‖² = ‖y‖² − Σ_j z_j²).
* :func:`loss_weight_response` — the response when there is no other: the logit of each training pair's own
  probability p_i = 1 − Q_i, i.e. its margin against the bank of negatives, the output function whose gradients
  the features are.
* :func:`lds_damping` — the damping whose scores have the highest mean linear datamodeling score on the models
  that ``cliptrace verify lds`` has already trained on random subsets.

Both choices break ties (and a flat criterion) the same way: the best criterion value, then the larger damping
among values equal to it up to a relative :data:`TIE_TOLERANCE`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cliptrace.trak.scoring import BLOCK_ROWS, Rows, gram_matrix, read_rows
from cliptrace.verify.lds import linear_datamodeling_score

DAMPING_GRID: tuple[float, ...] = tuple(float(f"1e{exponent / 2:g}") for exponent in range(-8, 3))
"""Relative damping values c (λ = c · mean diag(XᵀX)): 1e-4 to 1e1 in half decades, 11 values."""

TIE_TOLERANCE = 1e-9
"""Criterion values within this relative distance of the best count as tied (the larger damping wins)."""

PROBABILITY_FLOOR = 1e-6
""":func:`loss_weight_response` clips p into [floor, 1 − floor]: a logit of at most ±13.8."""

_CRITERIA = {"gcv": "min", "lds": "max"}


@dataclass(frozen=True)
class DampingChoice:
    """A damping picked from a grid by a criterion.

    Attributes:
        damping: The chosen relative damping c.
        lambda_reg: The absolute ridge term it means, c · mean diag(XᵀX); None where the scale was not known.
        criterion: Name of the criterion: ``"gcv"`` (lower is better) or ``"lds"`` (higher is better).
        values: The criterion at each grid value, in grid order (NaN where it is undefined).
    """

    damping: float
    lambda_reg: float | None
    criterion: str
    values: Mapping[float, float]

    def to_json(self) -> str:
        """The choice as a JSON object (undefined criterion values as null)."""
        return json.dumps({
            "damping": self.damping,
            "lambda_reg": self.lambda_reg,
            "criterion": self.criterion,
            "values": [[c, None if math.isnan(v) else v] for c, v in self.values.items()],
        })

    @classmethod
    def from_json(cls, text: str) -> DampingChoice:
        """The choice that :meth:`to_json` wrote.

        Raises:
            ValueError: ``text`` is not such an object.
        """
        try:
            data = json.loads(text)
            values = {float(c): math.nan if v is None else float(v) for c, v in data["values"]}
            lambda_reg = None if data["lambda_reg"] is None else float(data["lambda_reg"])
            choice = cls(float(data["damping"]), lambda_reg, str(data["criterion"]), values)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"not a stored damping choice: {error}") from error
        if choice.criterion not in _CRITERIA or choice.damping not in choice.values:
            raise ValueError(f"not a stored damping choice: criterion {choice.criterion!r}, damping {choice.damping}")
        return choice

    def describe(self) -> str:
        """One line, e.g. ``"damping 0.01 (λ=3.2) by gcv over 11 values 0.0001…10 (gcv 0.81)"``."""
        scale = "" if self.lambda_reg is None else f" (λ={self.lambda_reg:.3g})"
        grid = list(self.values)
        return (f"damping {self.damping:g}{scale} by {self.criterion} over {len(grid)} values "
                f"{min(grid):g}…{max(grid):g} ({self.criterion} {self.values[self.damping]:.4g})")


def feature_scale(features: Rows, block_rows: int = BLOCK_ROWS) -> float:
    """mean diag(XᵀX) = ‖X‖²_F / k of training features X (n × k), read ``block_rows`` rows at a time, in float64.

    Raises:
        ValueError: X is not 2-D, is empty, or is all zero or non-finite.
    """
    _check_features(features)
    total = 0.0
    for start in range(0, features.shape[0], block_rows):
        total += float(read_rows(features, start, min(start + block_rows, features.shape[0])).double().square().sum())
    return _checked_scale(total / features.shape[1])


def loss_weight_response(loss_weights: np.ndarray | torch.Tensor) -> np.ndarray:
    """The GCV response from TRAK loss weights Q: logit(p) = log((1 − Q) / Q), with p = 1 − Q clipped.

    p is the model's probability of a training pair's correct match against the bank of negatives, so logit(p)
    is that pair's own margin: the output function that TRAK linearizes, whose gradients are the features. A
    pair the model fits perfectly has Q = 0 in float32 and an infinite margin, so p is clipped into
    [:data:`PROBABILITY_FLOOR`, 1 − :data:`PROBABILITY_FLOOR`] to keep such pairs from dominating the fit.

    Returns:
        (n,) float64.

    Raises:
        ValueError: Q is not 1-D, or has values outside [0, 1] (NaN included).
    """
    q = (loss_weights.detach().cpu().double().numpy() if isinstance(loss_weights, torch.Tensor)
         else np.asarray(loss_weights, dtype=np.float64))
    if q.ndim != 1:
        raise ValueError(f"loss_weights must be 1-D (one per training pair), got shape {q.shape}")
    if not ((q >= 0) & (q <= 1)).all():
        raise ValueError("loss_weights must lie in [0, 1] (Q = 1 − p), got NaN or values outside")
    p = np.clip(1 - q, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
    return np.log(p) - np.log1p(-p)


def gcv_damping(
    features: Rows,
    response: np.ndarray | torch.Tensor,
    grid: Sequence[float] = DAMPING_GRID,
    block_rows: int = BLOCK_ROWS,
) -> DampingChoice:
    """The damping of ``grid`` with the lowest generalized cross-validation error of ridge regression of y on X.

    Args:
        features: X (n × k); a memory map is read ``block_rows`` rows at a time when k ≤ n (all of it when k > n).
        response: y (n,), e.g. :func:`loss_weight_response` of the loss weights.
        grid: Relative damping values c; each means λ = c · mean diag(XᵀX).
        block_rows: Rows of X per block.

    Raises:
        ValueError: X is not 2-D, empty, all zero or non-finite; y is not (n,), not finite, or constant; the grid
            is empty or has values that are not positive and finite.
    """
    _check_features(features)
    dampings = _checked_grid(grid)
    n, k = features.shape
    y = _checked_response(response, n)
    if k <= n:
        gram = gram_matrix(features, torch.float64, "cpu", block_rows)
        cross = torch.zeros(k, dtype=torch.float64)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            cross += read_rows(features, start, stop).double().T @ y[start:stop]
    else:
        x = read_rows(features, 0, n).double()
        gram, cross = x @ x.T, y
    if not torch.isfinite(gram).all():
        raise ValueError("features has non-finite values (NaN or inf)")
    scale = _checked_scale(float(gram.diagonal().sum()) / k)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues = eigenvalues.clamp(min=0)
    kept = eigenvalues > eigenvalues.max() * max(n, k) * torch.finfo(torch.float64).eps
    s = eigenvalues[kept]
    coordinates = (vectors.T @ cross)[kept]  # (V'Xᵀy) for XᵀX, U'y for XXᵀ
    z_squared = coordinates.square() / s if k <= n else coordinates.square()
    outside = max(float(y.square().sum() - z_squared.sum()), 0.0)  # ‖y − Py‖²
    values = []
    for damping in dampings:
        lambda_reg = damping * scale
        shrink = lambda_reg / (s + lambda_reg)
        residual = outside + float((shrink.square() * z_squared).sum())
        trace = n - float((s / (s + lambda_reg)).sum())
        values.append(n * residual / trace**2 if trace > 0 else math.nan)
    damping = _choose(dampings, values, "gcv")
    return DampingChoice(damping, damping * scale, "gcv", dict(zip(dampings, values)))


def lds_damping(
    score_for: Callable[[float], np.ndarray],
    masks: np.ndarray,
    outputs: np.ndarray,
    grid: Sequence[float] = DAMPING_GRID,
    *,
    scale: float | None = None,
) -> DampingChoice:
    """The damping of ``grid`` whose scores have the highest mean LDS on models retrained on subsets.

    Args:
        score_for: Maps a relative damping c to the (n_train × n_targets) score matrix computed with it.
        masks: (M, n_train) which training pairs each subset model was trained on.
        outputs: (M, n_targets) each subset model's output on each target.
        grid: Relative damping values c.
        scale: mean diag(XᵀX) (:func:`feature_scale`), to report the absolute λ; None leaves it unknown.

    Raises:
        ValueError: The grid is invalid, a score matrix has the wrong shape, or the LDS of some grid value cannot
            be computed (see :func:`~cliptrace.verify.lds.linear_datamodeling_score`); the message names the value.
    """
    dampings = _checked_grid(grid)
    expected = (np.shape(masks)[-1], np.shape(outputs)[-1])
    values = []
    for damping in dampings:
        scores = score_for(damping)
        if tuple(scores.shape) != expected:
            raise ValueError(f"score_for({damping:g}) has shape {tuple(scores.shape)}, expected (n_train, "
                             f"n_targets) = {expected} from masks and outputs")
        try:
            values.append(linear_datamodeling_score(scores, masks, outputs, n_resamples=1).mean)
        except ValueError as error:
            raise ValueError(f"the LDS of damping {damping:g}: {error}") from error
    damping = _choose(dampings, values, "lds")
    return DampingChoice(damping, None if scale is None else damping * _checked_scale(scale), "lds",
                         dict(zip(dampings, values)))


def _choose(dampings: list[float], values: list[float], criterion: str) -> float:
    """The damping with the best finite value; among values tied with the best, the largest damping."""
    sign = 1.0 if _CRITERIA[criterion] == "min" else -1.0
    finite = [(sign * v, c) for c, v in zip(dampings, values) if math.isfinite(v)]
    if not finite:
        raise ValueError(f"the {criterion} criterion is undefined at every damping of the grid")
    best = min(v for v, _ in finite)
    return max(c for v, c in finite if v <= best + TIE_TOLERANCE * abs(best))


def _check_features(features: Rows) -> None:
    if len(features.shape) != 2 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty 2-D matrix (n × k), got shape {tuple(features.shape)}")


def _checked_scale(scale: float) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"mean diag(XᵀX) of the features is {scale}: the features are all zero or not finite")
    return scale


def _checked_grid(grid: Sequence[float]) -> list[float]:
    dampings = [float(c) for c in grid]
    if not dampings or not all(math.isfinite(c) and c > 0 for c in dampings):
        raise ValueError(f"the damping grid must be non-empty, positive and finite, got {list(grid)}")
    if len(set(dampings)) != len(dampings):
        raise ValueError(f"the damping grid has repeated values: {dampings}")
    return dampings


def _checked_response(response: np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    y = (response.detach().cpu() if isinstance(response, torch.Tensor) else torch.as_tensor(np.asarray(response)))
    y = y.to(torch.float64)
    if tuple(y.shape) != (n,):
        raise ValueError(f"response must have shape ({n},), one value per feature row, got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("response has non-finite values (NaN or inf)")
    if bool((y == y[0]).all()):
        raise ValueError(f"response is constant ({float(y[0]):g} for all {n} rows): there is nothing to fit")
    return y


def _unused(_: Any) -> None:  # pragma: no cover
    pass
