"""TRAK: the kernel regression (XᵀX + λI)⁻¹ over projected gradients, ensembled over checkpoints.

The ridge term is relative to the features' scale by default (``damping`` × mean diag(XᵀX)); ``damping="auto"``
chooses it per checkpoint by generalized cross-validation (:mod:`cliptrace.trak.damping`). The solved kernel is
kept in the store beside the features, with how its ridge term was set, and reused while that request stays the
same.
"""

from __future__ import annotations

import numpy as np
import torch

from cliptrace.attribution.stored import StoredGradientMethod
from cliptrace.trak.attribute import LoadedCheckpoint
from cliptrace.trak.scoring import Kernel, solve_kernel
from cliptrace.trak.settings import AUTO
from cliptrace.trak.store import FeatureStore


class Trak(StoredGradientMethod):
    """TRAK (Park et al. 2023) with a scale-free ridge term."""

    name = "trak"
    summary = "the default: kernel-regression attribution over the checkpoint ensemble; compact store (k floats)"

    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> Kernel:
        settings, request = self.settings, self.settings.damping_spec()
        cached = store.kernel(checkpoint.id, request)
        if cached is not None:
            info = store.kernel_info(checkpoint.id) or {}
            self.notes[checkpoint.id] = info
            return Kernel(torch.from_numpy(np.array(cached)), float(info.get("lambda_reg", 0.0)))
        features, loss_weights = store.features(checkpoint.id)
        info: dict = {"request": request}
        damping = settings.damping
        if settings.lambda_reg is None and damping == AUTO:
            from cliptrace.trak.damping import gcv_damping, loss_weight_response

            choice = gcv_damping(features, loss_weight_response(loss_weights))
            info["choice"] = choice.to_json()
            damping = choice.damping
        kernel = solve_kernel(features, settings.lambda_reg, settings.torch_dtype, settings.device,
                              damping=damping if settings.lambda_reg is None else 0.0)
        info["lambda_reg"] = kernel.lambda_reg
        store.save_kernel(checkpoint.id, kernel.matrix.numpy(), info)
        self.notes[checkpoint.id] = info
        return kernel
