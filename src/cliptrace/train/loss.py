"""The training losses of the objectives (see :mod:`cliptrace.objectives`), under their familiar names."""

from __future__ import annotations

from cliptrace.objectives.gather import gather_features
from cliptrace.objectives.sigmoid import sigmoid_loss
from cliptrace.objectives.softmax import contrastive_loss

__all__ = ["contrastive_loss", "gather_features", "sigmoid_loss"]
