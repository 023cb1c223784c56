"""Scale-free damping and per-block kernels of trak/scoring.py against float64 brute force with explicit solves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cliptrace.trak import scoring
from cliptrace.trak.scoring import (
    BlockKernel,
    EnsembleScorer,
    Kernel,
    ridge_term,
    solve_block_kernel,
    solve_checkpoint,
    solve_kernel,
    stored_kernel,
)
from cliptrace.trak.store import FeatureStore

N = 12
WIDTHS = [3, 15, 5, 20]  # n = 12: blocks of both forms, k_l ≤ n (factor) and k_l > n (W)


def _blocks(widths: list[int]) -> list[slice]:
    bounds = np.cumsum([0, *widths])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _data(n: int = N, widths: list[int] = WIDTHS, t: int = 4, m: int = 2, seed: int = 0):
    """Per checkpoint: features with columns of unequal scales, loss weights, target features."""
    rng = np.random.default_rng(seed)
    k = sum(widths)
    scales = np.repeat(10.0 ** rng.uniform(-2, 2, len(widths)), widths)  # layers differ in gradient size
    xs = [rng.normal(size=(n, k)) * scales for _ in range(m)]
    qs = [rng.random(n) for _ in range(m)]
    phis = [rng.normal(size=(t, k)) * scales for _ in range(m)]
    return xs, qs, phis


def _explicit(x: np.ndarray, phi: np.ndarray, blocks: list[slice], damping: float, lambda_reg: float | None):
    """Σ_l X_l (X_lᵀX_l + λ_l I)⁻¹ Φ_lᵀ, Σ_l diag(X_l (X_lᵀX_l + λ_l I)⁻¹ X_lᵀ) and the λ_l, block by block."""
    x, phi = torch.from_numpy(x), torch.from_numpy(phi)
    scores = torch.zeros(x.shape[0], phi.shape[0], dtype=torch.float64)
    leverage = torch.zeros(x.shape[0], dtype=torch.float64)
    lambdas = []
    for block in blocks:
        xl, pl = x[:, block], phi[:, block]
        k = xl.shape[1]
        lam = lambda_reg if lambda_reg is not None else damping * float(torch.trace(xl.T @ xl)) / k
        lambdas.append(lam)
        if lam == 0 and k > x.shape[0]:  # XᵀX singular: the minimum-norm solution
            inverse = torch.linalg.pinv(xl.T @ xl)
        else:
            inverse = torch.linalg.solve(xl.T @ xl + lam * torch.eye(k, dtype=torch.float64),
                                         torch.eye(k, dtype=torch.float64))
        scores += xl @ inverse @ pl.T
        leverage += torch.einsum("ik,kj,ij->i", xl, inverse, xl)
    return scores.numpy(), leverage.numpy(), lambdas


def _ensemble_reference(xs, qs, phis, blocks, damping, lambda_reg):
    parts = [_explicit(x, p, blocks, damping, lambda_reg) for x, p in zip(xs, phis)]
    q = np.mean(qs, 0)
    return q[:, None] * np.mean([s for s, _, _ in parts], 0), q * np.mean([v for _, v, _ in parts], 0)


def _scorer(xs, qs, blocks, damping, lambda_reg, block_rows=scoring.BLOCK_ROWS, block_size=1024):
    kernels = [solve_block_kernel(x, blocks, damping=damping, lambda_reg=lambda_reg, dtype=torch.float64,
                                  block_rows=block_rows) for x in xs]
    return EnsembleScorer(kernels, xs, qs, block_size=block_size, block_rows=block_rows), kernels


@pytest.mark.parametrize(("damping", "lambda_reg"), [(0.05, None), (0.0, 0.3), (0.0, None)])
def test_block_scores_and_self_influence_equal_the_explicit_per_block_sum(damping, lambda_reg) -> None:
    xs, qs, phis = _data()
    blocks = _blocks(WIDTHS)
    expected_scores, expected_self = _ensemble_reference(xs, qs, phis, blocks, damping, lambda_reg)
    scorer, kernels = _scorer(xs, qs, blocks, damping, lambda_reg)
    assert [k.is_factor for k in kernels[0].kernels] == [True, False, True, False]
    np.testing.assert_allclose(kernels[0].lambda_regs, _explicit(xs[0], phis[0], blocks, damping, lambda_reg)[2],
                               rtol=1e-12)
    targets = [torch.from_numpy(p) for p in phis]
    scores = scorer.score(targets).numpy()
    assert np.abs(scores - expected_scores).max() < 1e-8 * np.abs(expected_scores).max()
    np.testing.assert_allclose(scorer.self_influence().numpy(), expected_self, rtol=1e-8, atol=1e-10)
    top = scorer.top_k(targets, 3)
    assert np.array_equal(top.proponents.numpy(), np.argsort(-expected_scores, axis=0, kind="stable")[:3].T)


def test_the_blocks_are_solved_apart_not_as_one_global_kernel() -> None:
    xs, qs, phis = _data(m=1, seed=3)
    blocks = _blocks(WIDTHS)
    block_scores = EnsembleScorer([solve_block_kernel(xs[0], blocks, damping=0.1, dtype=torch.float64)], xs, qs)
    global_scores = EnsembleScorer([solve_kernel(xs[0], dtype=torch.float64, damping=0.1)], xs, qs)
    target = [torch.from_numpy(phis[0])]
    assert not np.allclose(block_scores.score(target).numpy(), global_scores.score(target).numpy(), rtol=1e-3)


@pytest.mark.parametrize("piece_bytes", [8 * 7, scoring.PIECE_BYTES])  # 7 values: pieces of a fraction of a row
def test_streaming_a_memory_map_in_small_row_blocks_equals_in_memory(tmp_path: Path, monkeypatch,
                                                                      piece_bytes) -> None:
    xs, qs, phis = _data(seed=1)
    blocks = _blocks(WIDTHS)
    in_memory, memory_kernels = _scorer([torch.from_numpy(x) for x in xs], qs, blocks, 0.02, None)
    monkeypatch.setattr(scoring, "PIECE_BYTES", piece_bytes)
    maps = []
    for index, x in enumerate(xs):
        np.save(tmp_path / f"x{index}.npy", x)
        maps.append(np.load(tmp_path / f"x{index}.npy", mmap_mode="r"))
    streamed, map_kernels = _scorer(maps, qs, blocks, 0.02, None, block_rows=5, block_size=3)
    for solved, reference in zip(map_kernels, memory_kernels):
        for a, b in zip(solved.kernels, reference.kernels):
            np.testing.assert_allclose(a.matrix.numpy(), b.matrix.numpy(), rtol=1e-12, atol=1e-12)
    targets = [torch.from_numpy(p) for p in phis]
    expected_scores, expected_self = _ensemble_reference(xs, qs, phis, blocks, 0.02, None)
    np.testing.assert_allclose(streamed.score(targets).numpy(), in_memory.score(targets).numpy(), rtol=1e-10,
                               atol=1e-12 * np.abs(expected_scores).max())
    np.testing.assert_allclose(streamed.self_influence().numpy(), in_memory.self_influence().numpy(), rtol=1e-10)
    np.testing.assert_allclose(streamed.self_influence().numpy(), expected_self, rtol=1e-8)


@pytest.mark.parametrize("shape", [(20, 6), (5, 9)])  # the factor form and the W form
def test_relative_damping_equals_the_absolute_lambda_it_resolves_to(shape) -> None:
    x = np.random.default_rng(4).normal(size=shape) * 30.0
    lam = 0.01 * np.trace(x.T @ x) / shape[1]  # mean diag(XᵀX)
    relative = solve_kernel(x, dtype=torch.float64, damping=0.01)
    absolute = solve_kernel(x, lam, torch.float64)
    assert relative.lambda_reg == pytest.approx(lam, rel=1e-12) and absolute.lambda_reg == lam
    np.testing.assert_allclose(relative.matrix.numpy(), absolute.matrix.numpy(), rtol=1e-11, atol=1e-13)
    assert solve_kernel(x, 0.7, torch.float64, damping=0.01).lambda_reg == 0.7  # an absolute λ wins
    assert solve_kernel(x, dtype=torch.float64).lambda_reg == 0.0  # the default: no ridge, as before


def test_ridge_term_rule_and_its_refusals() -> None:
    assert ridge_term(50.0, 10, 0.2) == pytest.approx(1.0)
    assert ridge_term(50.0, 10, 0.2, lambda_reg=3.0) == 3.0
    assert ridge_term(0.0, 0, 0.2) == 0.0
    for bad in ({"damping": -0.1}, {"damping": float("nan")}, {"lambda_reg": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ridge_term(1.0, 1, **{"damping": 0.0, **bad})
    with pytest.raises(ValueError, match="damping must be"):
        solve_block_kernel(np.ones((3, 2)), [slice(0, 2)], damping=-1.0)


@pytest.mark.parametrize("kind", ["global", "block"])
def test_scores_are_invariant_to_the_scale_of_the_features(kind) -> None:
    xs, qs, phis = _data(m=1, seed=5)
    blocks = _blocks(WIDTHS)

    def solve(x):
        if kind == "global":
            return solve_kernel(x, dtype=torch.float64, damping=0.05)
        return solve_block_kernel(x, blocks, damping=0.05, dtype=torch.float64)

    results = []
    for scale in (1.0, 1e3):
        x, phi = xs[0] * scale, phis[0] * scale
        scorer = EnsembleScorer([solve(x)], [x], qs)
        results.append((scorer.score([torch.from_numpy(phi)]).numpy(), scorer.self_influence().numpy()))
    (scores, leverage), (scaled_scores, scaled_leverage) = results
    assert np.abs(scaled_scores - scores).max() < 1e-9 * np.abs(scores).max()
    np.testing.assert_allclose(scaled_leverage, leverage, rtol=1e-9)


@pytest.mark.parametrize("shape", [(20, 6), (5, 9)])
def test_one_block_covering_everything_equals_the_global_kernel(shape) -> None:
    rng = np.random.default_rng(6)
    x, phi, q = rng.normal(size=shape), rng.normal(size=(3, shape[1])), rng.random(shape[0])
    one = solve_block_kernel(x, [slice(0, shape[1])], damping=0.1, dtype=torch.float64)
    whole = solve_kernel(x, dtype=torch.float64, damping=0.1)
    np.testing.assert_array_equal(one.kernels[0].matrix.numpy(), whole.matrix.numpy())
    block_scorer, global_scorer = EnsembleScorer([one], [x], [q]), EnsembleScorer([whole], [x], [q])
    target = [torch.from_numpy(phi)]
    np.testing.assert_allclose(block_scorer.score(target).numpy(), global_scorer.score(target).numpy(), rtol=1e-13)
    np.testing.assert_allclose(block_scorer.self_influence().numpy(), global_scorer.self_influence().numpy(),
                               rtol=1e-13)


@pytest.mark.parametrize(("blocks", "message"), [
    ([slice(0, 6), slice(4, 10)], r"block slice\(4, 10, None\) overlaps block slice\(0, 6, None\)"),
    ([slice(0, 4), slice(6, 10)], r"columns \[4, 6\) lie in no block.*slice\(6, 10, None\)"),
    ([slice(0, 4), slice(4, 8)], r"columns \[8, 10\) lie in no block.*slice\(4, 8, None\)"),
    ([slice(2, 10)], r"columns \[0, 2\) lie in no block.*slice\(2, 10, None\)"),
    ([slice(0, 4), slice(4, 12)], r"block slice\(4, 12, None\) lies outside the 10 feature columns"),
    ([slice(-2, 4), slice(4, 10)], r"block slice\(-2, 4, None\) lies outside"),
    ([slice(0, 10, 2)], r"block slice\(0, 10, 2\) is not a slice"),
    ([slice(None, 10)], r"block slice\(None, 10, None\) is not a slice"),
    ([], r"columns \[0, 10\) lie in no block"),
])
def test_bad_blocks_are_refused_naming_the_slice(blocks, message) -> None:
    with pytest.raises(ValueError, match=message):
        solve_block_kernel(np.ones((12, 10)), blocks)


def test_empty_and_unordered_blocks_are_accepted() -> None:
    xs, qs, phis = _data(m=1, seed=7)
    blocks = _blocks(WIDTHS)
    shuffled = [blocks[2], slice(43, 43), blocks[0], blocks[3], blocks[1]]  # e.g. an empty "other" block
    kernel = solve_block_kernel(xs[0], shuffled, damping=0.05, dtype=torch.float64)
    assert kernel.blocks == tuple(blocks)
    expected, _, _ = _explicit(xs[0], phis[0], blocks, 0.05, None)
    scores = EnsembleScorer([kernel], xs, [np.ones(N)]).score([torch.from_numpy(phis[0])]).numpy()
    assert np.abs(scores - expected).max() < 1e-8 * np.abs(expected).max()


def test_the_scorer_refuses_a_block_kernel_that_does_not_fit() -> None:
    xs, qs, _ = _data(m=1)
    kernel = solve_block_kernel(xs[0], _blocks(WIDTHS), dtype=torch.float64, damping=0.1)
    with pytest.raises(ValueError, match="block kernel over 43 feature columns does not fit"):
        EnsembleScorer([kernel], [xs[0][:, :40]], qs)
    with pytest.raises(ValueError, match=r"kernel of block slice\(3, 18, None\).*does not fit"):
        EnsembleScorer([kernel], [xs[0][:10]], [qs[0][:10]])  # W of block 2 has 12 rows
    with pytest.raises(ValueError, match="one kernel for each of the 4 blocks"):
        BlockKernel(kernel.blocks, kernel.kernels[:3])


def test_kernels_saved_to_a_directory_load_back_equal(tmp_path: Path) -> None:
    xs, qs, phis = _data(m=1, seed=8)
    block = solve_block_kernel(xs[0], _blocks(WIDTHS), damping=0.05, dtype=torch.float64)
    block.save(tmp_path / "block")
    description = json.loads((tmp_path / "block" / "kernel.json").read_text())
    assert description["blocks"] == [[b.start, b.stop] for b in _blocks(WIDTHS)]
    assert description["lambda_reg"] == list(block.lambda_regs)
    loaded = BlockKernel.load(tmp_path / "block")
    assert loaded.blocks == block.blocks and loaded.lambda_regs == block.lambda_regs
    for a, b in zip(loaded.kernels, block.kernels):
        assert torch.equal(a.matrix, b.matrix)
    whole = solve_kernel(xs[0][:, :5], dtype=torch.float64, damping=0.05)
    whole.save(tmp_path / "whole")
    again = Kernel.load(tmp_path / "whole")
    assert torch.equal(again.matrix, whole.matrix) and again.lambda_reg == whole.lambda_reg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block", "whole"]  # no partial directory left
    with pytest.raises(ValueError, match="not a 'block' one"):
        BlockKernel.load(tmp_path / "whole")
    with pytest.raises(ValueError, match="no saved kernel"):
        Kernel.load(tmp_path)


def test_solve_checkpoint_takes_the_relative_damping_too(tmp_path: Path) -> None:
    x, q = np.random.default_rng(9).normal(size=(8, 3)) * 50.0, np.ones(8)
    store = FeatureStore(tmp_path / "store", 8, 3, {}, dtype="float64")
    store.add_checkpoint("only", "fingerprint")
    store.write("only", np.arange(8), x, q)
    solved = solve_checkpoint(store, "only", dtype=torch.float64, damping=0.1)
    lam = 0.1 * np.trace(x.T @ x) / 3
    assert solved.lambda_reg == pytest.approx(lam, rel=1e-12)
    factor = stored_kernel(store, "only").matrix.numpy()
    np.testing.assert_allclose(factor @ factor.T, x.T @ x + lam * np.eye(3), rtol=1e-12)
