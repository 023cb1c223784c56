"""Attribution scores to grade: any registered method (:data:`cliptrace.attribution.METHODS`) as a dense matrix.

Every method returns an (n_train × n_targets) float64 matrix whose entry (i, j) says how much training pair i
raises target j's output; :func:`cliptrace.verify.lds.linear_datamodeling_score` grades any such matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cliptrace.data.record import Record
from cliptrace.trak.attribute import attribute
from cliptrace.trak.settings import AttributionSettings


def method_scores(
    method: str,
    run: str | Path,
    train: Sequence[Record],
    targets: Sequence[Record],
    *,
    settings: AttributionSettings = AttributionSettings(),
    checkpoints: int | None = None,
    store_dir: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The scores of one registered method for the targets against a run's training pairs.

    Args:
        method: A name in :data:`cliptrace.attribution.METHODS`.
        run: The ``cliptrace train`` run.
        train: Its training records, in the row order of the result.
        targets: The targets, in column order.
        settings: The attribution settings.
        checkpoints: The ensemble: the last K checkpoints (None: all).
        store_dir: Feature store (default: the run's store for these settings).
        progress: Show progress bars.

    Raises:
        ValueError: An unknown method.
    """
    result = attribute(run, list(train), list(targets), method=method, settings=settings, checkpoints=checkpoints,
                       store_dir=store_dir, full_scores=True, top_k=1, progress=progress)
    return np.asarray(result.scores, dtype=np.float64)
