"""K-FAC and EK-FAC whitening of factored features against explicit float64 computations: covariances from
per-example loops, the Kronecker inverse formed as a matrix, eigenvalues refitted from exact per-example gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.gradients import per_example_gradients
from cliptrace.trak.kfac import fit_statistics, load_statistics, save_statistics, stored_metadata, whitenings
from cliptrace.trak.outputs import ImageClassificationMargin
from test_trak_factored import LayerZoo

DAMPING = 0.3


@pytest.fixture(scope="module")
def zoo() -> tuple[nn.Module, ImageClassificationMargin, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(6, 3, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2, 0, 1])
    return LayerZoo().double(), ImageClassificationMargin(), (images, labels), torch.arange(6)


def _example(batch: tuple[torch.Tensor, torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0][b : b + 1], batch[1][b : b + 1]


def _explicit_covariances(module: nn.Module, output: ImageClassificationMargin, batch: tuple, names: list[str]
                          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A = mean_b Σ_t x̃x̃ᵀ and S = mean_b Σ_t δδᵀ of the layers ``names``, one example at a time."""
    layers = dict(module.named_modules())
    sums: dict[str, list[np.ndarray]] = {}
    for b in range(len(batch[1])):
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [layers[name].register_forward_hook(
            lambda m, inputs, out, name=name: seen.__setitem__(name, (inputs[0], out))) for name in names]
        value = output.batch_outputs(module, _example(batch, b), torch.tensor([b]))[0].sum()
        for handle in handles:
            handle.remove()
        grads = torch.autograd.grad(value, [seen[name][1] for name in names])
        for name, grad in zip(names, grads, strict=True):
            layer, x = layers[name], seen[name][0].detach()
            if isinstance(layer, nn.Conv2d):
                x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
                grad = grad.flatten(2).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            if layer.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            delta = grad.reshape(-1, grad.shape[-1])
            parts = [(x.T @ x).numpy(), (delta.T @ delta).numpy()]
            sums[name] = parts if name not in sums else [s + p for s, p in zip(sums[name], parts, strict=True)]
    return {name: (a / len(batch[1]), s / len(batch[1])) for name, (a, s) in sums.items()}


def _layer_gradients(module: nn.Module, output: ImageClassificationMargin, batch: tuple, indices: torch.Tensor
                     ) -> dict[str, np.ndarray]:
    """Exact per-example gradients of each layer: (B, d_o, d_i [+ 1]) for linear layers, (B, size) otherwise."""
    result = {}
    for name, layer in module.named_modules():
        own = [f"{name}.{local}" for local, _ in layer.named_parameters(recurse=False)]
        if not own:
            continue
        grads = per_example_gradients(output, module, own, batch, indices).numpy()
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            weight = grads[:, : layer.weight.numel()].reshape(len(grads), layer.weight.shape[0], -1)
            bias = grads[:, layer.weight.numel():, None]
            result[name] = np.concatenate([weight, bias], 2) if layer.bias is not None else weight
        elif isinstance(layer, nn.Embedding):
            result[name] = grads  # (V·d) row-major: the (V, d) weight
        else:
            result[name] = grads  # LayerNorm: weight then bias
    return result


def _reference_gram(module: nn.Module, output: ImageClassificationMargin, batch: tuple, indices: torch.Tensor,
                    kind: str) -> np.ndarray:
    """Σ_layers g_bᵀ (F̂_l + λ_l I)⁻¹ g_c with every F̂_l formed explicitly."""
    gradients = _layer_gradients(module, output, batch, indices)
    linear = [name for name, layer in module.named_modules() if isinstance(layer, (nn.Linear, nn.Conv2d))]
    covariances = _explicit_covariances(module, output, batch, linear)
    gram = np.zeros((len(indices), len(indices)))
    for name, g in gradients.items():
        if name in covariances:
            a, s = covariances[name]
            if kind == "kfac":
                curvature = np.kron(s, a)  # vec(G) row-major: entry (i, j) is i·d_i + j
                ridge = DAMPING * np.trace(s) / len(s) * np.trace(a) / len(a)
                flat = g.reshape(len(g), -1)
                gram += flat @ np.linalg.solve(curvature + ridge * np.eye(len(curvature)), flat.T)
            else:
                q_a, q_s = np.linalg.eigh(a)[1], np.linalg.eigh(s)[1]
                rotated = np.einsum("oi,boj,jk->bik", q_s, g, q_a)
                eigenvalues = (rotated**2).mean(0)
                scaled = rotated / (eigenvalues + DAMPING * eigenvalues.mean())
                gram += np.einsum("bij,cij->bc", scaled, rotated)
        elif isinstance(dict(module.named_modules())[name], nn.Embedding):
            value = (g**2).sum(1).mean() / g.shape[1]
            gram += g @ g.T / (value * (1 + DAMPING))
        else:
            values = (g**2).mean(0)
            gram += (g / (values + DAMPING * values.mean())) @ g.T
    return gram


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_whitened_features_give_the_explicit_damped_curvature_inverse(zoo, kind: str) -> None:
    module, output, batch, indices = zoo
    featurizer = FactoredFeaturizer(module, output, proj_dim=None, layer_dim=64)  # every side unprojected
    statistics = fit_statistics(featurizer, lambda: [(batch, indices)], kind)
    featurizer.whiten(whitenings(statistics, DAMPING), {"kind": kind, "damping": DAMPING})
    features = featurizer.features(batch, indices)[0].numpy()
    expected = _reference_gram(module, output, batch, indices, kind)
    np.testing.assert_allclose(features @ features.T, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    assert featurizer.settings()["whitening"] == {"kind": kind, "damping": DAMPING}


def test_statistics_do_not_depend_on_how_the_examples_are_batched(zoo) -> None:
    module, output, batch, indices = zoo
    featurizer = FactoredFeaturizer(module, output, proj_dim=None, layer_dim=64)
    whole = fit_statistics(featurizer, lambda: [(batch, indices)], "ekfac")
    halves = fit_statistics(featurizer, lambda: [((batch[0][s], batch[1][s]), indices[s])
                                                 for s in (slice(0, 2), slice(2, 6))], "ekfac")
    for name, layer in whole.items():
        torch.testing.assert_close(halves[name].eigenvalues, layer.eigenvalues, rtol=1e-9, atol=1e-14)


def test_projected_whitened_features_are_the_sketch_of_the_projected_whitened_gradients(zoo) -> None:
    module, output, batch, indices = zoo
    featurizer = FactoredFeaturizer(module, output, proj_dim=40, layer_dim=3, seed=2)
    statistics = fit_statistics(featurizer, lambda: [(batch, indices)], "ekfac")
    layers = whitenings(statistics, DAMPING)
    featurizer.whiten(layers, {"kind": "ekfac", "damping": DAMPING})
    gradients = _layer_gradients(module, output, batch, indices)
    blocks = []
    for layer in featurizer.layers:
        g, whitening = torch.from_numpy(gradients[layer.name]), layers[layer.name]
        if isinstance(layer.module, (nn.Linear, nn.Conv2d)):
            block = whitening.out_basis.T @ g @ whitening.in_basis * whitening.inverse_sqrt
            if layer.out_projection is not None:
                block = layer.out_projection @ block
            if layer.in_projection is not None:
                block = block @ layer.in_projection.T
            blocks.append(block.flatten(1))
        elif isinstance(layer.module, nn.Embedding):  # the (V, d) weight read as (d outputs, V inputs)
            weight = g.reshape(len(g), *layer.module.weight.shape).transpose(1, 2)
            if layer.out_projection is not None:
                weight = layer.out_projection @ weight
            if layer.in_projection is not None:
                weight = weight @ layer.in_projection.T
            blocks.append(weight.flatten(1) * whitening.inverse_sqrt)
        else:
            blocks.append(g * whitening.inverse_sqrt)
    expected = featurizer.projector.project(torch.cat(blocks, 1))
    torch.testing.assert_close(featurizer.features(batch, indices)[0], expected, rtol=1e-9, atol=1e-12)


def test_statistics_round_trip_through_their_file(zoo, tmp_path: Path) -> None:
    module, output, batch, indices = zoo
    featurizer = FactoredFeaturizer(module, output, proj_dim=None, layer_dim=64)
    statistics = fit_statistics(featurizer, lambda: [(batch, indices)], "kfac")
    save_statistics(tmp_path / "s.safetensors", statistics, {"kind": "kfac"})
    assert stored_metadata(tmp_path / "s.safetensors") == {"kind": "kfac"}
    assert stored_metadata(tmp_path / "missing.safetensors") is None
    loaded = load_statistics(tmp_path / "s.safetensors", list(statistics))
    for name, layer in statistics.items():
        for part in ("in_basis", "out_basis", "eigenvalues"):
            left, right = getattr(layer, part), getattr(loaded[name], part)
            assert (left is None and right is None) or torch.equal(left, right)


def test_whitening_errors(zoo) -> None:
    module, output, batch, indices = zoo
    featurizer = FactoredFeaturizer(module, output, proj_dim=None, layer_dim=64)
    with pytest.raises(ValueError, match="kind must be one of"):
        fit_statistics(featurizer, lambda: [(batch, indices)], "shampoo")
    with pytest.raises(ValueError, match="no fitting example"):
        fit_statistics(featurizer, lambda: [], "kfac")
    statistics = fit_statistics(featurizer, lambda: [(batch, indices)], "kfac")
    with pytest.raises(ValueError, match="missing layers"):
        featurizer.whiten({}, {})
    with pytest.raises(ValueError, match="positive ridge term"):
        whitenings(statistics, 0.0)
    featurizer.whiten(whitenings(statistics, DAMPING), {"kind": "kfac"})
    with pytest.raises(ValueError, match="without a whitening"):
        fit_statistics(featurizer, lambda: [(batch, indices)], "kfac")
