"""The linear datamodeling score (LDS) of Park et al. 2023, "TRAK: Attributing Model Behavior at Scale".

Models are retrained on random subsets of the training pairs (:func:`subset_masks`). Attribution scores predict
the output of model m on target j as the sum of ``scores[i, j]`` over the pairs i it was trained on; the LDS of a
target is the Spearman correlation, over the models, between these predictions and the actual outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cliptrace.stats import bootstrap_ci, spearman

Matrix = np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class LDSResult:
    """The LDS of one score matrix.

    Attributes:
        per_target: LDS of each target, (n_targets,) float64, read-only; NaN where the predictions or the outputs
            are constant across the models.
        mean: Mean LDS over the targets where it is defined.
        low: Lower end of the bootstrap confidence interval of ``mean`` (resampling targets).
        high: Upper end of that interval.
        n_models: Number of retrained models M.
        n_targets: Number of targets, undefined ones included.
        n_undefined: Number of targets whose LDS is NaN, left out of ``mean`` and the interval.
    """

    per_target: np.ndarray
    mean: float
    low: float
    high: float
    n_models: int
    n_targets: int
    n_undefined: int

    def format(self, digits: int = 3) -> str:
        """One line, e.g. ``"LDS 0.312 [0.281, 0.344] (M=64, 50 targets)"``, naming undefined targets if any."""
        text = f"LDS {self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        text += f" (M={self.n_models}, {self.n_targets} targets"
        if self.n_undefined:
            text += f", {self.n_undefined} undefined"
        return text + ")"

    def __str__(self) -> str:
        return self.format()


def linear_datamodeling_score(
    scores: Matrix,
    masks: Matrix,
    outputs: Matrix,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> LDSResult:
    """The LDS of a score matrix, with a bootstrap confidence interval over targets.

    Args:
        scores: (n_train, n_targets) attribution scores of any method; higher means the training pair raises the
            target's output.
        masks: (M, n_train) boolean (or 0/1): which training pairs model m was trained on.
        outputs: (M, n_targets) the output of model m on each target.
        n_resamples: Bootstrap resamples of the targets.
        confidence: Coverage of the interval.
        seed: Seeds the bootstrap.

    Raises:
        ValueError: A matrix is not 2-D, has non-finite values (masks: values other than 0/1), the shapes
            disagree, M < 3, or the LDS is undefined for every target.
    """
    score_matrix = _matrix("scores", scores)
    mask_matrix = _matrix("masks", masks)
    output_matrix = _matrix("outputs", outputs)
    if not ((mask_matrix == 0) | (mask_matrix == 1)).all():
        raise ValueError("masks must be boolean or 0/1")
    (n_train, n_targets), (n_models, mask_columns) = score_matrix.shape, mask_matrix.shape
    if mask_columns != n_train:
        raise ValueError(f"masks has {mask_columns} columns but scores has {n_train} training rows")
    if output_matrix.shape[0] != n_models:
        raise ValueError(f"outputs has {output_matrix.shape[0]} rows but masks has {n_models} models (rows)")
    if output_matrix.shape[1] != n_targets:
        raise ValueError(f"outputs has {output_matrix.shape[1]} columns but scores has {n_targets} target columns")
    if n_models < 3:
        raise ValueError(f"the LDS needs at least 3 models (over 2 a rank correlation is always ±1), got M={n_models}")
    if n_targets == 0:
        raise ValueError("scores has no target columns")
    predicted = mask_matrix @ score_matrix  # (M, n_targets)
    per_target = spearman(predicted.T, output_matrix.T).numpy()
    per_target.setflags(write=False)
    n_undefined = int(np.isnan(per_target).sum())
    if n_undefined == n_targets:
        raise ValueError(
            f"the LDS is undefined for all {n_targets} targets: predictions or outputs are constant across the models"
        )
    mean, low, high = bootstrap_ci(per_target, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return LDSResult(per_target, mean, low, high, n_models, n_targets, n_undefined)


def subset_masks(n_train: int, n_models: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Training subsets for the retrained models, (n_models, n_train) boolean.

    Row m holds a uniformly random subset of exactly ``round(alpha * n_train)`` pairs (Python's rounding, halves to
    even), drawn from ``np.random.default_rng([seed, m])``: it does not depend on ``n_models``, so a longer run
    extends the same list of subsets.

    Raises:
        ValueError: ``alpha`` is not strictly between 0 and 1, or the subsets would be empty or complete.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    if n_models < 0:
        raise ValueError(f"n_models must not be negative, got {n_models}")
    size = round(alpha * n_train)
    if not 0 < size < n_train:
        raise ValueError(f"alpha={alpha} of n_train={n_train} rounds to {size} pairs: every subset would be "
                         f"{'empty' if size <= 0 else 'the whole training set'}")
    masks = np.zeros((n_models, n_train), dtype=bool)
    for m in range(n_models):
        masks[m, np.random.default_rng([seed, m]).choice(n_train, size, replace=False)] = True
    return masks


def _matrix(name: str, value: Matrix) -> torch.Tensor:
    """``value`` as a 2-D float64 CPU tensor with finite entries."""
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    tensor = tensor.to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")
    return tensor
