"""Checks of attribution scores against models retrained on subsets of the training data."""

from cliptrace.verify.lds import LDSResult, linear_datamodeling_score, subset_masks

__all__ = ["LDSResult", "linear_datamodeling_score", "subset_masks"]
