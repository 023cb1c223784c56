"""GCV damping choice, checked against explicit hat matrices and the true prediction error of planted ridge problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliptrace.trak.damping import DAMPING_GRID, RESPONSE_CLIP, gcv_damping, loss_weight_response


def _brute_gcv(x: np.ndarray, y: np.ndarray, lambda_reg: float) -> float:
    """n‖(I − H)y‖² / tr(I − H)² with I − H = λ(XXᵀ + λI)⁻¹ formed and inverted explicitly.

    The push-through identity X(XᵀX + λI)⁻¹Xᵀ = XXᵀ(XXᵀ + λI)⁻¹ gives I − H without subtracting H from I, which
    at small λ cancels to a few digits and makes the reference, not the code under test, the inexact side.
    """
    n = x.shape[0]
    residual_maker = lambda_reg * np.linalg.inv(x @ x.T + lambda_reg * np.eye(n))
    residual = residual_maker @ y
    return n * float(residual @ residual) / float(np.trace(residual_maker)) ** 2


def _problem(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * rng.uniform(0.1, 3.0, size=k)  # unequal column scales
    return x, x @ rng.normal(size=k) + rng.normal(size=n)


@pytest.mark.parametrize(("n", "k"), [(23, 6), (9, 9), (7, 15)])
def test_gcv_values_match_the_explicit_hat_matrix(n: int, k: int) -> None:
    x, y = _problem(n, k)
    choice = gcv_damping(x, y)
    scale = np.trace(x.T @ x) / k
    expected = [_brute_gcv(x, y, c * scale) for c in DAMPING_GRID]
    np.testing.assert_allclose(choice.values, expected, rtol=1e-8)
    assert choice.criterion == "gcv" and choice.grid == DAMPING_GRID
    best = DAMPING_GRID[int(np.argmin(expected))]
    assert choice.damping == best
    assert choice.lambda_reg == pytest.approx(best * scale, rel=1e-12)


def test_a_custom_grid_and_a_tensor_give_the_same_values() -> None:
    x, y = _problem(20, 5, seed=1)
    grid = (0.002, 0.05, 0.7)
    choice = gcv_damping(torch.from_numpy(x), torch.from_numpy(y), grid=grid, block_rows=4)
    scale = np.trace(x.T @ x) / 5
    np.testing.assert_allclose(choice.values, [_brute_gcv(x, y, c * scale) for c in grid], rtol=1e-8)
    assert choice.grid == grid


@pytest.mark.parametrize(("n", "k"), [(17, 4), (5, 12)])
def test_a_memory_map_read_in_small_blocks_equals_in_memory(tmp_path, n: int, k: int) -> None:
    x, y = _problem(n, k, seed=2)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    mapped = gcv_damping(np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r"),
                         block_rows=3)
    in_memory = gcv_damping(x, y)
    np.testing.assert_allclose(mapped.values, in_memory.values, rtol=1e-10)
    assert mapped.damping == in_memory.damping


@pytest.mark.parametrize(("n", "k"), [(40, 8), (8, 20)])
def test_the_choice_is_deterministic_and_ignores_the_order_of_rows(n: int, k: int) -> None:
    x, y = _problem(n, k, seed=3)
    first, second = gcv_damping(x, y, block_rows=7), gcv_damping(x, y, block_rows=7)
    assert first == second
    order = np.random.default_rng(4).permutation(n)
    permuted = gcv_damping(x[order], y[order], block_rows=7)
    assert permuted.damping == first.damping
    np.testing.assert_allclose(permuted.values, first.values, rtol=1e-10)


def _true_prediction_error(x: np.ndarray, beta: np.ndarray, noise: float, lambda_reg: float) -> float:
    """E‖X β̂_λ − Xβ‖² for y = Xβ + ε, ε ~ N(0, noise² I): squared bias ‖(I − H)Xβ‖² plus variance noise² tr(H²)."""
    n, k = x.shape
    hat = x @ np.linalg.inv(x.T @ x + lambda_reg * np.eye(k)) @ x.T
    bias = (np.eye(n) - hat) @ x @ beta
    return float(bias @ bias) + noise**2 * float(np.trace(hat @ hat))


@pytest.mark.parametrize(("noise", "seed"), [(1.0, 0), (4.0, 1), (12.0, 2)])
def test_gcv_picks_a_damping_near_the_oracle(noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = 300, 40
    x = rng.normal(size=(n, k))
    beta = rng.normal(size=k)
    y = x @ beta + noise * rng.normal(size=n)
    scale = np.trace(x.T @ x) / k
    errors = [_true_prediction_error(x, beta, noise, c * scale) for c in DAMPING_GRID]
    oracle = int(np.argmin(errors))
    assert 0 < oracle < len(DAMPING_GRID) - 1  # the planted problem has its best damping inside the grid
    chosen = DAMPING_GRID.index(gcv_damping(x, y).damping)
    assert abs(chosen - oracle) <= 1


def test_a_flat_criterion_picks_the_largest_damping() -> None:
    # X = [I 0] (k > n): every eigenvalue of XXᵀ is 1, so GCV(λ) = ‖y‖²/n for every λ, up to rounding
    x = np.hstack([np.eye(5), np.zeros((5, 3))])
    y = np.array([0.3, -1.0, 2.0, 0.5, 1.5])
    choice = gcv_damping(x, y)
    np.testing.assert_allclose(choice.values, float(y @ y) / 5, rtol=1e-12)
    assert choice.damping == DAMPING_GRID[-1]


def test_bad_responses_and_features_are_refused() -> None:
    x, y = _problem(10, 3)
    with pytest.raises(ValueError, match="constant"):
        gcv_damping(x, np.full(10, 0.7))
    with pytest.raises(ValueError, match="non-finite"):
        gcv_damping(x, np.where(np.arange(10) == 4, np.nan, y))
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        gcv_damping(x, y[:9])
    with pytest.raises(ValueError, match="all zero"):
        gcv_damping(np.zeros((10, 3)), y)
    with pytest.raises(ValueError, match="features have non-finite"):
        gcv_damping(np.where(np.arange(30).reshape(10, 3) == 5, np.inf, x), y)
    with pytest.raises(ValueError, match="increasing"):
        gcv_damping(x, y, grid=(0.1, 0.01))
    with pytest.raises(ValueError, match="positive"):
        gcv_damping(x, y, grid=(0.0, 0.1))


def test_the_loss_weight_response_is_the_logit_of_p_clipped() -> None:
    q = np.array([0.5, 0.1, 0.9, 0.0, 1.0], dtype=np.float32)
    expected = [0.0, np.log(0.9 / 0.1), np.log(0.1 / 0.9),
                np.log((1 - RESPONSE_CLIP) / RESPONSE_CLIP), np.log(RESPONSE_CLIP / (1 - RESPONSE_CLIP))]
    np.testing.assert_allclose(loss_weight_response(q), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss_weight_response(torch.from_numpy(q)), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_weight_response(np.array([0.2, np.nan]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss_weight_response(np.array([0.2, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        loss_weight_response(np.ones((2, 2)) / 2)
