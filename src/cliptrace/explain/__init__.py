"""Input attribution: which image patches and caption tokens drive a CLIP similarity."""

from cliptrace.explain.base import AttributionMethod, Explanation, image_logit, text_logit

__all__ = ["AttributionMethod", "Explanation", "image_logit", "text_logit"]
