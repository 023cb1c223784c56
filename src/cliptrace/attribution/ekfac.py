"""Influence functions with an EK-FAC Gauss–Newton approximation (George et al. 2018; Grosse et al. 2023).

Each layer's factored gradient is whitened by its EK-FAC factors before the per-layer side projections
(:mod:`cliptrace.trak.kfac`), so a dot product of features is gᵀ(F̂ + λI)⁻¹g' with F̂ block-diagonal over layers,
Kronecker-factored within each, and eigenvalue-corrected. The scores are those dot products times the training
record's loss weight Q, averaged over checkpoints; no kernel is solved. Fitting the factors costs two extra passes
over ``fit_records`` training records per checkpoint. Like ``trak-layers`` it keeps the layer blocks unmixed (no final
projection), so storage is the sum of the layer blocks per example plus the factors (about the model's size per
checkpoint).
"""

from __future__ import annotations

from typing import Any, ClassVar

from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.trak.attribute import LoadedCheckpoint
from cliptrace.trak.scoring import Kernel, identity_kernel
from cliptrace.trak.store import FeatureStore


class EkfacInfluence(StoredGradientMethod):
    """Influence functions over EK-FAC-whitened projected gradients."""

    name = "ekfac"
    summary = "influence functions with EK-FAC per-layer curvature; two extra fitting passes per checkpoint"
    feature_changes: ClassVar[dict[str, Any]] = {"whitening": "ekfac", "features": "factored",
                                                         "proj_dim": None}

    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> Kernel:
        features, _ = store.features(checkpoint.id)
        return identity_kernel(features, self.settings.torch_dtype)
