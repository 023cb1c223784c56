"""The registry of data-attribution methods: every entry point (``attribute``, the CLI's ``--method``, ``verify``,
``report``) looks methods up here. Adding a method is one module with a :class:`DataAttributor` subclass and one
line in :data:`METHODS`."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from cliptrace.attribution.base import DataAttributor
from cliptrace.attribution.ekfac import EkfacInfluence
from cliptrace.attribution.embedding import EmbeddingSimilarity
from cliptrace.attribution.gradient_cosine import GradientCosine
from cliptrace.attribution.layer_trak import LayerTrak
from cliptrace.attribution.random_scores import RandomScores
from cliptrace.attribution.tracin import TracInCP
from cliptrace.attribution.trak import Trak
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings

METHODS: Mapping[str, type[DataAttributor]] = MappingProxyType({method.name: method for method in (
    Trak,
    LayerTrak,
    EkfacInfluence,
    TracInCP,
    GradientCosine,
    EmbeddingSimilarity,
    RandomScores,
)})
"""Every registered method by name."""

__all__ = ["DEFAULT_METHOD", "METHODS", "make_method"]


def make_method(name: str, settings: AttributionSettings = AttributionSettings()) -> DataAttributor:
    """A new, unprepared instance of the method ``name``.

    Raises:
        ValueError: No method of that name (the message lists them).
    """
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](settings)
