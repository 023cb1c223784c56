"""Held-out LDS damping choice with planted score functions, and the stored form of a damping choice."""

from __future__ import annotations

import numpy as np
import pytest

from cliptrace.trak.damping import DAMPING_GRID, DampingChoice, gcv_damping, lds_damping
from cliptrace.verify.lds import subset_masks

N_TRAIN, N_TARGETS, N_MODELS = 30, 6, 16


def _planted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True linear datamodel scores, subset masks, and the subset models' outputs they (nearly) predict."""
    rng = np.random.default_rng(0)
    true_scores = rng.normal(size=(N_TRAIN, N_TARGETS))
    masks = subset_masks(N_TRAIN, N_MODELS, seed=1)
    outputs = masks @ true_scores + 0.01 * rng.normal(size=(N_MODELS, N_TARGETS))
    return true_scores, masks, outputs


@pytest.mark.parametrize("peak", [0, 4, len(DAMPING_GRID) - 1])
def test_lds_damping_picks_the_grid_value_whose_scores_predict_the_outputs(peak: int) -> None:
    true_scores, masks, outputs = _planted()
    calls = []

    def score_for(damping: float) -> np.ndarray:
        calls.append(damping)
        index = DAMPING_GRID.index(damping)
        if index == peak:
            return true_scores
        return np.random.default_rng([2, index]).normal(size=(N_TRAIN, N_TARGETS))  # unrelated scores

    choice = lds_damping(score_for, masks, outputs)
    assert calls == list(DAMPING_GRID)
    assert choice.criterion == "lds" and choice.damping == DAMPING_GRID[peak] and choice.lambda_reg is None
    assert int(np.argmax(choice.values)) == peak and choice.values[peak] > 0.95
    assert choice.at_edge == (peak in (0, len(DAMPING_GRID) - 1))


def test_lds_ties_pick_the_larger_damping_and_scale_gives_lambda() -> None:
    true_scores, masks, outputs = _planted()
    grid = (0.01, 0.1, 1.0)
    choice = lds_damping(lambda damping: true_scores, masks, outputs, grid, scale=8.0)
    assert len(set(choice.values)) == 1
    assert choice.damping == 1.0 and choice.lambda_reg == 8.0


def test_lds_errors_name_the_damping() -> None:
    _, masks, outputs = _planted()
    with pytest.raises(ValueError, match="damping 0.1"):
        lds_damping(lambda damping: np.zeros((N_TRAIN + 1, N_TARGETS)), masks, outputs, (0.1,))


def test_a_choice_survives_its_json_round_trip() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(25, 4))
    gcv = gcv_damping(x, x @ rng.normal(size=4) + rng.normal(size=25))
    _, masks, outputs = _planted()
    lds = lds_damping(lambda damping: np.full((N_TRAIN, N_TARGETS), damping) + np.eye(N_TRAIN, N_TARGETS),
                      masks, outputs, (0.5, 2.0))
    for choice in (gcv, lds):
        again = DampingChoice.from_json(choice.to_json())
        assert again == choice and again.to_json() == choice.to_json()


def test_describe_is_one_line_with_the_choice() -> None:
    choice = DampingChoice("gcv", 0.01, 2.5, (0.001, 0.01, 0.1), (3.0, 1.25, 2.0))
    assert choice.describe() == "damping 0.01 (λ=2.5) by GCV, minimum 1.25 over 3 values 0.001…0.1"
    edge = DampingChoice("lds", 0.1, None, (0.001, 0.01, 0.1), (0.2, 0.3, 0.4))
    assert edge.describe() == "damping 0.1 by LDS, maximum 0.4 over 3 values 0.001…0.1, at the edge of the grid"


def test_bad_choices_and_bad_json_are_refused() -> None:
    with pytest.raises(ValueError, match="criterion"):
        DampingChoice("loo", 0.1, None, (0.1,), (1.0,))
    with pytest.raises(ValueError, match="not one of the grid"):
        DampingChoice("gcv", 0.2, None, (0.1,), (1.0,))
    with pytest.raises(ValueError, match="2 criterion values"):
        DampingChoice("gcv", 0.1, None, (0.1,), (1.0, 2.0))
    with pytest.raises(ValueError, match="not a stored damping choice"):
        DampingChoice.from_json('{"criterion": "gcv"}')
    with pytest.raises(ValueError, match="not a stored damping choice"):
        DampingChoice.from_json("not json")
