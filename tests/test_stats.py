"""Shared statistics, each checked against an independent computation written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cliptrace.stats import average_ranks, bootstrap_ci, spearman


def _counted_ranks(values: list[float]) -> list[float]:
    """Rank = (number of smaller values) + (number of equal values, itself included, + 1) / 2."""
    return [sum(v < x for v in values) + (sum(v == x for v in values) + 1) / 2 for x in values]


def _sorted_ranks(values: list[float]) -> list[float]:
    """Sort, then give each run of equal values the mean of its 1-based positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _brute_spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_sorted_ranks(a), _sorted_ranks(b))[0, 1])


def test_average_ranks_with_ties_match_counting_and_sorting() -> None:
    assert average_ranks(torch.tensor([3.0, 1.0, 1.0, 2.0])).tolist() == [4.0, 1.5, 1.5, 3.0]
    values = torch.randint(0, 4, (3, 2, 9), generator=torch.Generator().manual_seed(12)).double()
    ranks = average_ranks(values)
    assert ranks.shape == values.shape and ranks.dtype == torch.float64
    for row, result in zip(values.reshape(-1, 9).tolist(), ranks.reshape(-1, 9).tolist()):
        assert result == _counted_ranks(row) == _sorted_ranks(row)


def test_spearman_with_ties_matches_a_brute_force_formula() -> None:
    generator = torch.Generator().manual_seed(13)
    a = torch.randint(0, 4, (5, 9), generator=generator).double()  # many ties
    b = torch.randint(0, 5, (5, 9), generator=generator).double()
    expected = [_brute_spearman(x.tolist(), y.tolist()) for x, y in zip(a, b)]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected).double())


def test_spearman_without_ties_is_the_rank_difference_formula() -> None:
    a, b = torch.randn(2, 30, generator=torch.Generator().manual_seed(14)).double()
    d = torch.tensor(_sorted_ranks(a.tolist())) - torch.tensor(_sorted_ranks(b.tolist()))
    n = 30
    torch.testing.assert_close(spearman(a, b), (1 - 6 * (d**2).sum() / (n * (n**2 - 1))).double())
    assert math.isnan(spearman(a, torch.ones(30)))
    assert math.isnan(spearman(torch.ones(30), a))


# ---------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_estimate_drops_nans_and_the_interval_contains_it() -> None:
    values = np.array([0.3, np.nan, -0.1, 0.8, 0.25, np.nan, 0.4, 0.05])
    kept = [v for v in values.tolist() if v == v]
    estimate, low, high = bootstrap_ci(values)
    assert estimate == pytest.approx(sum(kept) / len(kept))
    assert min(kept) <= low < estimate < high <= max(kept)
    median, _, _ = bootstrap_ci(values, statistic=np.median)
    ordered = sorted(kept)  # six values: the median is the mean of the third and fourth
    assert median == pytest.approx((ordered[2] + ordered[3]) / 2)


def test_bootstrap_of_two_values_follows_the_resampled_mean_distribution() -> None:
    # Resampled means of {0, 1} with n = 2 are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_ci(np.array([0.0, 1.0]), confidence=0.95) == (0.5, 0.0, 1.0)
    assert bootstrap_ci(np.array([0.0, 1.0]), confidence=0.4) == (0.5, 0.5, 0.5)
    assert bootstrap_ci(torch.full((5,), 2.5)) == (2.5, 2.5, 2.5)


def test_bootstrap_is_seeded_and_leaves_global_random_state_alone() -> None:
    values = torch.randn(40, generator=torch.Generator().manual_seed(1))
    numpy_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    first = bootstrap_ci(values, seed=3)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    np.random.seed(123)
    torch.manual_seed(123)
    assert bootstrap_ci(values, seed=3) == first
    assert bootstrap_ci(values.numpy(), seed=3) == first
    assert bootstrap_ci(values, seed=4) != first


def test_bootstrap_interval_shrinks_like_one_over_root_n() -> None:
    rng = np.random.default_rng(5)
    widths = {}
    for n in (25, 2500):
        values = rng.normal(size=n)
        _, low, high = bootstrap_ci(values, n_resamples=2000)
        widths[n] = high - low
        normal_width = 2 * 1.959964 * values.std() / math.sqrt(n)  # the mean's normal-theory 95% interval
        assert widths[n] == pytest.approx(normal_width, rel=0.2)
    assert widths[2500] < widths[25] / 5


def test_bootstrap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="all 3 values are NaN"):
        bootstrap_ci(np.full(3, np.nan))
    with pytest.raises(ValueError, match="no values left"):
        bootstrap_ci(np.array([]))
    with pytest.raises(ValueError, match=r"1-D.*\(2, 3\)"):
        bootstrap_ci(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(np.ones(3), confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(np.ones(3), n_resamples=0)
