"""TracIn-CP (Pruthi et al. 2020): projected-gradient dot products summed over checkpoints, no kernel."""

from __future__ import annotations

from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.trak.attribute import LoadedCheckpoint
from cliptrace.trak.scoring import Kernel, identity_kernel
from cliptrace.trak.store import FeatureStore


class TracInCP(StoredGradientMethod):
    """TracIn over the checkpoints: Q̄_i · mean_m ⟨x_{m,i}, φ_m⟩ (every checkpoint weighted equally)."""

    name = "tracin"
    summary = "a fast baseline: gradient dot products over checkpoints, no kernel solve; TRAK's kernel beats it"

    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> Kernel:
        features, _ = store.features(checkpoint.id)
        return identity_kernel(features, self.settings.torch_dtype)
