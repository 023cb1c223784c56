"""The TRAK engine on a GPU gives what it gives on the CPU: factored and exact features, the kernel solve.
Runs only where CUDA is available (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliptrace.trak import ExactFeaturizer, FactoredFeaturizer
from cliptrace.trak.outputs import EmbeddingBank
from cliptrace.trak.scoring import solve_kernel

from test_trak_factored import hf_clip_case, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on(device: str):
    model, output, batch, _ = hf_clip_case("quick_gelu")
    bank = output.bank
    output.bank = EmbeddingBank(bank.image_embeddings.to(device), bank.text_embeddings.to(device),
                                bank.indices.to(device))
    images, tokens = batch
    moved = (images.to(device), {key: value.to(device) for key, value in tokens.items()})
    return model.to(device), output, moved, torch.tensor([1, -1, 7], device=device)


# The exact path runs HF's eager attention, whose softmax is float32 even in a float64 model (measured 1.2e-7 on an
# H200); the factored path keeps sdpa in float64.
@pytest.mark.parametrize(("featurizer_class", "tolerance"), [(FactoredFeaturizer, 1e-9), (ExactFeaturizer, 1e-6)])
def test_features_on_the_gpu_equal_the_cpu_ones_in_float64(featurizer_class, tolerance: float) -> None:
    def features(device: str) -> tuple[torch.Tensor, torch.Tensor]:
        model, output, batch, indices = _on(device)
        return featurizer_class(model, output, proj_dim=256).features(batch, indices)

    for expected, actual in zip(features("cpu"), features("cuda")):
        assert actual.device.type == "cuda"
        assert relative_error(actual.cpu(), expected) < tolerance


def test_kernel_solve_on_the_gpu_equals_the_cpu_one() -> None:
    features = np.random.default_rng(0).normal(size=(300, 40))
    cpu = solve_kernel(features, 0.1, torch.float64, "cpu", block_rows=64)
    gpu = solve_kernel(features, 0.1, torch.float64, "cuda", block_rows=64)
    assert relative_error(gpu.matrix.cpu(), cpu.matrix) < 1e-10
