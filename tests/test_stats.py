"""Shared statistics, each checked against an independent computation written out here."""

from __future__ import annotations

import math

import numpy as np
import torch

from cliptrace.stats import average_ranks, spearman


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
