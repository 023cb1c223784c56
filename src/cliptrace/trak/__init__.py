"""TRAK data attribution for CLIP-style models: which training pairs made the model believe x matches y?

Pipeline: a model-output function (:mod:`~cliptrace.trak.outputs`) → per-example gradient features
(:mod:`~cliptrace.trak.factored` by default, :mod:`~cliptrace.trak.features` for the exact reference,
:mod:`~cliptrace.trak.projection`) → an on-disk store
(:mod:`~cliptrace.trak.store`) → kernel scores over a checkpoint ensemble (:mod:`~cliptrace.trak.scoring`).
Entry points: the ``traker``-compatible :class:`TRAKer` and the one-call :func:`attribute`.
"""

from cliptrace.trak.factored import FactoredFeaturizer, make_featurizer
from cliptrace.trak.features import ExactFeaturizer, Featurizer
from cliptrace.trak.outputs import (
    ClipMargin,
    EmbeddingBank,
    ImageClassificationMargin,
    ModelOutput,
    SigmoidPairLogit,
    output_for_objective,
)
from cliptrace.trak.projection import CountSketchProjector, DenseProjector, IdentityProjector, Projector
from cliptrace.trak.scoring import EnsembleScorer, Kernel, TopK, solve_kernel
from cliptrace.trak.settings import AttributionSettings
from cliptrace.trak.store import FeatureStore, StoreMismatchError
from cliptrace.trak.traker import TRAKer

__all__ = [
    "AttributionSettings",
    "ClipMargin",
    "CountSketchProjector",
    "DenseProjector",
    "EmbeddingBank",
    "EnsembleScorer",
    "ExactFeaturizer",
    "FactoredFeaturizer",
    "FeatureStore",
    "Featurizer",
    "IdentityProjector",
    "ImageClassificationMargin",
    "Kernel",
    "ModelOutput",
    "Projector",
    "SigmoidPairLogit",
    "StoreMismatchError",
    "TRAKer",
    "TopK",
    "make_featurizer",
    "output_for_objective",
    "solve_kernel",
]
