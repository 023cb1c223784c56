"""Training objectives of image–text dual encoders, each travelling with its model family.

An :class:`Objective` defines the training loss (gathered over devices), the pairwise logits and the probabilities
they mean, and the per-pair model output TRAK and verification measure. ``softmax`` is CLIP's symmetric InfoNCE,
``sigmoid`` SigLIP's pairwise sigmoid loss with a learned bias. A model names its objective with its ``objective``
attribute (:class:`~cliptrace.models.DualEncoder` defaults to ``softmax``).
"""

from cliptrace.objectives.base import OBJECTIVES, Objective, get_objective, register_objective
from cliptrace.objectives.gather import gather_features
from cliptrace.objectives.sigmoid import SIGMOID, SigmoidObjective, sigmoid_loss
from cliptrace.objectives.softmax import SOFTMAX, SoftmaxObjective, contrastive_loss

__all__ = [
    "OBJECTIVES",
    "Objective",
    "SIGMOID",
    "SOFTMAX",
    "SigmoidObjective",
    "SoftmaxObjective",
    "contrastive_loss",
    "gather_features",
    "get_objective",
    "register_objective",
    "sigmoid_loss",
]
