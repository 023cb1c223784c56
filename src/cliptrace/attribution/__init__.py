"""Data-attribution methods behind one interface (:class:`DataAttributor`) and one registry (:data:`METHODS`).

Each method is one class in one module: TRAK (:mod:`~cliptrace.attribution.trak`), TracIn-CP, gradient cosine,
CLIP-embedding similarity and random scores. Run one with :func:`cliptrace.trak.attribute.attribute`
(``method=NAME``) or ``cliptrace trak score RUN --method NAME``.
"""

from cliptrace.attribution.base import DataAttributor, TrainingSide
from cliptrace.attribution.registry import DEFAULT_METHOD, METHODS, make_method

__all__ = ["DEFAULT_METHOD", "METHODS", "DataAttributor", "TrainingSide", "make_method"]
