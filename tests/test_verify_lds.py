"""The linear datamodeling score, checked against a brute-force loop and planted linear datamodels."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from cliptrace.verify import LDSResult, linear_datamodeling_score, subset_masks


def _ranks(values: list[float]) -> list[float]:
    """Average ranks by counting: (number of smaller values) + (number of equal values + 1) / 2."""
    return [sum(v < x for v in values) + (sum(v == x for v in values) + 1) / 2 for x in values]


def _pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    spread = math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))
    return covariance / spread if spread > 0 else math.nan


def _brute_lds(scores: list[list[float]], masks: list[list[bool]], outputs: list[list[float]]) -> list[float]:
    """For each target: each model's predicted output summed pair by pair, then Pearson's r of the ranks."""
    n_models, n_train, n_targets = len(masks), len(scores), len(scores[0])
    per_target = []
    for j in range(n_targets):
        predicted = []
        for m in range(n_models):
            total = 0.0
            for i in range(n_train):
                if masks[m][i]:
                    total += scores[i][j]
            predicted.append(total)
        actual = [outputs[m][j] for m in range(n_models)]
        per_target.append(_pearson(_ranks(predicted), _ranks(actual)))
    return per_target


def _small_case(ties: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M=7 models, n=11 training pairs, t=5 targets; with ties, integer values, an all-zero score column (constant
    predictions) and a constant output column."""
    rng = np.random.default_rng(seed)
    masks = rng.random((7, 11)) < 0.5
    if ties:
        scores = rng.integers(-1, 2, (11, 5)).astype(float)
        outputs = rng.integers(0, 3, (7, 5)).astype(float)
        scores[:, 1] = 0.0
        outputs[:, 3] = 2.0
    else:
        scores, outputs = rng.normal(size=(11, 5)), rng.normal(size=(7, 5))
    return scores, masks, outputs


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("as_torch", [False, True])
def test_lds_matches_a_brute_force_loop(ties: bool, as_torch: bool) -> None:
    for seed in range(3):
        scores, masks, outputs = _small_case(ties, seed)
        expected = _brute_lds(scores.tolist(), masks.tolist(), outputs.tolist())
        inputs = (scores, masks, outputs)
        if as_torch:
            inputs = tuple(torch.from_numpy(x) for x in inputs)
        result = linear_datamodeling_score(*inputs, n_resamples=200)
        assert isinstance(result.per_target, np.ndarray) and result.per_target.dtype == np.float64
        np.testing.assert_allclose(result.per_target, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
        defined = [value for value in expected if not math.isnan(value)]
        assert result.n_undefined == len(expected) - len(defined)
        if ties:
            assert math.isnan(result.per_target[1]) and math.isnan(result.per_target[3])
        assert result.mean == pytest.approx(sum(defined) / len(defined), abs=1e-12)
        assert result.low <= result.mean <= result.high
        assert (result.n_models, result.n_targets) == (7, 5)


def test_zero_one_masks_and_float32_inputs_give_the_same_lds() -> None:
    scores, masks, outputs = _small_case(False, 4)
    reference = linear_datamodeling_score(scores, masks, outputs)
    as_ints = linear_datamodeling_score(scores, masks.astype(np.int64), outputs)
    np.testing.assert_array_equal(as_ints.per_target, reference.per_target)
    narrow = linear_datamodeling_score(torch.from_numpy(scores).float(), torch.from_numpy(masks),
                                       torch.from_numpy(outputs).float())
    np.testing.assert_allclose(narrow.per_target, reference.per_target, atol=1e-12)


def _planted(n_train: int = 200, n_models: int = 60, n_targets: int = 20, noise: float = 0.1):
    rng = np.random.default_rng(7)
    masks = subset_masks(n_train, n_models, seed=1)
    true_scores = rng.normal(size=(n_train, n_targets))
    outputs = masks @ true_scores + noise * rng.normal(size=(n_models, n_targets))
    return true_scores, masks, outputs, rng


def test_planted_linear_datamodel_scores_near_one_and_random_scores_near_zero() -> None:
    true_scores, masks, outputs, rng = _planted()
    exact = linear_datamodeling_score(true_scores, masks, outputs)
    assert exact.mean > 0.98 and exact.low > 0.97 and exact.n_undefined == 0
    assert linear_datamodeling_score(-true_scores, masks, outputs).mean < -0.98
    random = linear_datamodeling_score(rng.normal(size=true_scores.shape), masks, outputs)
    assert abs(random.mean) < 0.1 and random.low < 0 < random.high  # per-target sd ≈ 1/√59 ≈ 0.13, 20 targets
    half_right = linear_datamodeling_score(true_scores + 2 * rng.normal(size=true_scores.shape), masks, outputs)
    assert random.high < half_right.low and half_right.high < exact.low


def test_result_is_seeded_read_only_and_formats_its_own_fields() -> None:
    true_scores, masks, outputs, _ = _planted(n_targets=8, noise=10.0)
    outputs[:, 5] = 0.0
    result = linear_datamodeling_score(true_scores, masks, outputs, seed=2)
    assert isinstance(result, LDSResult)
    again = linear_datamodeling_score(true_scores, masks, outputs, seed=2)
    assert (again.mean, again.low, again.high) == (result.mean, result.low, result.high)
    other = linear_datamodeling_score(true_scores, masks, outputs, seed=3)
    assert (other.low, other.high) != (result.low, result.high)
    wide = linear_datamodeling_score(true_scores, masks, outputs, seed=2, confidence=0.99)
    assert wide.low <= result.low and wide.high >= result.high
    assert result.n_undefined == 1 and result.n_targets == 8
    with pytest.raises(ValueError):
        result.per_target[0] = 1.0
    expected = f"LDS {result.mean:.3f} [{result.low:.3f}, {result.high:.3f}] (M=60, 8 targets, 1 undefined)"
    assert str(result) == result.format() == expected
    assert re.fullmatch(r"LDS -?\d\.\d{2} \[-?\d\.\d{2}, -?\d\.\d{2}\] \(M=60, 8 targets, 1 undefined\)",
                        result.format(digits=2))
    clean = linear_datamodeling_score(true_scores[:, :3], masks, outputs[:, :3])
    assert str(clean).endswith("(M=60, 3 targets)")


def test_lds_rejects_bad_input() -> None:
    scores, masks, outputs = _small_case(False, 5)
    with pytest.raises(ValueError, match="masks has 12 columns but scores has 11 training rows"):
        linear_datamodeling_score(scores, np.ones((7, 12), dtype=bool), outputs)
    with pytest.raises(ValueError, match="outputs has 6 rows but masks has 7 models"):
        linear_datamodeling_score(scores, masks, outputs[:6])
    with pytest.raises(ValueError, match="outputs has 4 columns but scores has 5 target columns"):
        linear_datamodeling_score(scores, masks, outputs[:, :4])
    with pytest.raises(ValueError, match="at least 3 models.*M=2"):
        linear_datamodeling_score(scores, masks[:2], outputs[:2])
    with pytest.raises(ValueError, match=r"scores must be 2-D, got shape \(11,\)"):
        linear_datamodeling_score(scores[:, 0], masks, outputs)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        linear_datamodeling_score(scores, masks * 2, outputs)
    bad = outputs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="outputs has non-finite values"):
        linear_datamodeling_score(scores, masks, bad)
    with pytest.raises(ValueError, match="undefined for all 5 targets"):
        linear_datamodeling_score(np.zeros_like(scores), masks, outputs)
    with pytest.raises(ValueError, match="no target columns"):
        linear_datamodeling_score(scores[:, :0], masks, outputs[:, :0])


# ------------------------------------------------------------------------------------------------ subset masks


@pytest.mark.parametrize(("n_train", "alpha", "size"), [(11, 0.5, 6), (10, 0.5, 5), (9, 0.5, 4), (20, 0.3, 6),
                                                         (7, 0.9, 6)])
def test_subset_masks_rows_hold_exactly_round_alpha_n_pairs(n_train: int, alpha: float, size: int) -> None:
    masks = subset_masks(n_train, 6, alpha=alpha)
    assert masks.shape == (6, n_train) and masks.dtype == np.bool_
    assert masks.sum(axis=1).tolist() == [size] * 6  # 5.5 and 4.5 round to the even neighbour


def test_subset_masks_are_deterministic_and_row_m_does_not_depend_on_the_count() -> None:
    masks = subset_masks(30, 8, seed=3)
    np.testing.assert_array_equal(subset_masks(30, 8, seed=3), masks)
    np.testing.assert_array_equal(subset_masks(30, 3, seed=3), masks[:3])
    np.testing.assert_array_equal(subset_masks(30, 20, seed=3)[:8], masks)
    assert not np.array_equal(subset_masks(30, 8, seed=4), masks)
    assert len({row.tobytes() for row in masks}) == 8
    assert subset_masks(30, 0).shape == (0, 30)


def test_subset_masks_include_each_pair_about_alpha_of_the_time() -> None:
    frequency = subset_masks(12, 1000, alpha=0.25, seed=5).mean(axis=0)
    assert np.all(np.abs(frequency - 0.25) < 0.05)  # binomial sd ≈ 0.014


def test_subset_masks_reject_bad_alpha() -> None:
    for alpha in (0.0, 1.0, -0.1, 1.2):
        with pytest.raises(ValueError, match="alpha must lie strictly between 0 and 1"):
            subset_masks(10, 4, alpha=alpha)
    with pytest.raises(ValueError, match="rounds to 0 pairs: every subset would be empty"):
        subset_masks(10, 4, alpha=0.04)
    with pytest.raises(ValueError, match="rounds to 10 pairs: every subset would be the whole training set"):
        subset_masks(10, 4, alpha=0.96)
    with pytest.raises(ValueError, match="n_models"):
        subset_masks(10, -1)
