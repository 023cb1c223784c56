"""TRAK with a block-diagonal kernel: one kernel regression per layer, over unmixed per-layer features.

The factored featurizer forms one block per layer (``layer_dim`` × ``layer_dim`` projected entries for a wide
linear layer) before its final CountSketch mixes them. This method keeps the blocks apart (no final projection)
and replaces the global XᵀX by its block diagonal, each layer with its own ridge term
λ_l = damping × mean diag(X_lᵀX_l): scores Σ_l X_l (X_lᵀX_l + λ_l I)⁻¹ Φ_lᵀ (a per-layer Gauss–Newton
approximation, as in EK-FAC-style influence functions). Featurization costs the same as TRAK's factored path; the
store holds every layer block, Σ_l size_l floats per example (about 32 K for the tiny preset at layer_dim 32,
against 2,048 for TRAK), and the solve keeps per layer a k_l × k_l factor or an n × k_l matrix.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.trak.attribute import LoadedCheckpoint
from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.scoring import BlockKernel, solve_block_kernel
from cliptrace.trak.settings import AUTO
from cliptrace.trak.store import FeatureStore


class LayerTrak(StoredGradientMethod):
    """TRAK over per-layer gradient blocks with a block-diagonal kernel."""

    name = "trak-layers"
    summary = ("the most accurate here: per-layer kernels over unmixed layer blocks; same featurize cost as trak, "
               "about 16× its storage")
    feature_changes: ClassVar[dict[str, Any]] = {"proj_dim": None, "features": "factored"}

    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> BlockKernel:
        featurizer = checkpoint.featurizer
        if not isinstance(featurizer, FactoredFeaturizer):
            raise TypeError(f"{self.name} needs the factored featurizer, got {type(featurizer).__name__}")
        if self.settings.damping == AUTO and self.settings.lambda_reg is None:
            raise ValueError(f"{self.name}: damping 'auto' is not supported per layer; give a number")
        features, _ = store.features(checkpoint.id)
        blocks = [block for block in featurizer.layer_slices().values() if block.stop > block.start]
        kernel = solve_block_kernel(features, blocks, damping=float(self.settings.damping),
                                    lambda_reg=self.settings.lambda_reg, dtype=self.settings.torch_dtype,
                                    device=self.settings.device)
        self.notes[checkpoint.id] = {"blocks": len(blocks), "damping": self.settings.damping}
        return kernel
