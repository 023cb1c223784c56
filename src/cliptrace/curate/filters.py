"""Curation filters: one class per way of choosing the training pairs to remove, registered by name.

A filter ranks every training pair from the run's :class:`~cliptrace.curate.signals.Signals`; the first ``budget``
pairs of the ranking are removed. Each ranked pair carries a score (higher: removed sooner) and the reason its
score gives. Adding a filter is one class here plus one entry in :data:`FILTERS`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cliptrace.curate.signals import Signals

OUTLIER_Z = 3.0  # robust z-score from which self-influence is an outlier


@dataclass(frozen=True)
class Ranking:
    """Training pairs in the order a filter removes them.

    Attributes:
        order: (n,) indices of the training pairs, the first removed first.
        scores: (n,) each pair's score (higher: removed sooner), in dataset order.
        reasons: Each pair's reason, in dataset order.
    """

    order: np.ndarray
    scores: np.ndarray
    reasons: tuple[str, ...]

    @classmethod
    def by_score(cls, scores: np.ndarray, reasons: list[str], signals: Signals) -> Ranking:
        """Pairs by decreasing score (ties in dataset order); each reason notes the pair's near-duplicate, if any."""
        noted = tuple(reason + (f"; near-duplicate of {signals.ids[duplicate]}" if (duplicate := int(of)) >= 0 else "")
                      for reason, of in zip(reasons, signals.duplicate_of))
        return cls(np.argsort(-scores, kind="stable"), scores, noted)

    def removed(self, budget: int) -> np.ndarray:
        """The indices of the first ``budget`` pairs of the ranking."""
        return self.order[:budget]


def robust_z(values: np.ndarray) -> np.ndarray:
    """(x − median) / (1.4826 · MAD): a z-score that a few extreme values cannot inflate (0 when MAD is 0)."""
    deviation = np.median(np.abs(values - np.median(values))) * 1.4826
    return (values - np.median(values)) / deviation if deviation > 0 else np.zeros_like(values)


class CurationFilter(abc.ABC):
    """One way of ranking training pairs for removal."""

    name: ClassVar[str]
    summary: ClassVar[str]

    @abc.abstractmethod
    def rank(self, signals: Signals, seed: int) -> Ranking:
        """Every training pair, in the order this filter removes them."""


class SelfInfluenceFilter(CurationFilter):
    """Memorization: the pairs with the largest self-influence under the attribution method.

    A pair whose caption does not fit its image can only be fitted by memorizing it, so its self-influence (how much
    it raises its own output) stands out; the score is the robust z-score of the self-influence.
    """

    name = "self-influence"
    summary = "largest self-influence under the attribution method: memorized pairs, most often mislabeled ones"

    def rank(self, signals: Signals, seed: int) -> Ranking:
        scores = robust_z(signals.self_influence)
        reasons = [f"self-influence outlier (robust z ≥ {OUTLIER_Z:g})" if z >= OUTLIER_Z else "high self-influence"
                   for z in scores]
        return Ranking.by_score(scores, reasons, signals)


class ValidationHarmFilter(CurationFilter):
    """Measured harm: the pairs whose total influence on the validation pairs is most negative."""

    name = "val-harm"
    summary = "most negative total influence on the validation objective under the attribution method"

    def rank(self, signals: Signals, seed: int) -> Ranking:
        scores = -signals.val_influence
        reasons = ["lowers the validation objective" if value < 0 else "least helpful to validation"
                   for value in signals.val_influence]
        return Ranking.by_score(scores, reasons, signals)


class ClipScoreFilter(CurationFilter):
    """The DataComp baseline: the pairs whose image and caption the model itself finds least similar."""

    name = "clip-score"
    summary = "lowest image–caption similarity under the run's own model (the DataComp CLIP-score baseline)"

    def rank(self, signals: Signals, seed: int) -> Ranking:
        scores = -signals.clip_score
        return Ranking.by_score(scores, ["low CLIP score"] * len(scores), signals)


class RandomFilter(CurationFilter):
    """Removal at random, the control any curation must beat."""

    name = "random"
    summary = "uniformly random removal (seeded), the control"

    def rank(self, signals: Signals, seed: int) -> Ranking:
        scores = np.random.default_rng(seed).random(len(signals.ids))
        return Ranking.by_score(scores, ["random"] * len(scores), signals)


DEFAULT_FILTER = "self-influence"
ATTRIBUTION_FILTERS = ("self-influence", "val-harm")  # the filters that use the attribution method

FILTERS: dict[str, type[CurationFilter]] = {
    filter.name: filter for filter in (SelfInfluenceFilter, ValidationHarmFilter, ClipScoreFilter, RandomFilter)
}
"""Every curation filter by name."""


def get_filter(name: str) -> CurationFilter:
    """The registered filter ``name``.

    Raises:
        ValueError: No filter has that name.
    """
    if name not in FILTERS:
        raise ValueError(f"unknown curation filter {name!r}; choose from {', '.join(FILTERS)}")
    return FILTERS[name]()
