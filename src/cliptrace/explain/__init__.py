"""Input attribution: which image patches and caption tokens drive a CLIP similarity.

The package itself is callable: ``cliptrace.explain(model, images, text, method=...)`` is
:func:`cliptrace.explain.api.explain`.
"""

import sys
import types

from cliptrace.explain.api import MethodFailed, explain, make_method, method_names, unavailable_methods
from cliptrace.explain.base import AttributionMethod, Explanation, image_logit, text_logit
from cliptrace.explain.decomposition import ExactDecomposition
from cliptrace.explain.wrap import as_dual_encoder

__all__ = [
    "AttributionMethod",
    "ExactDecomposition",
    "Explanation",
    "MethodFailed",
    "as_dual_encoder",
    "explain",
    "image_logit",
    "make_method",
    "method_names",
    "text_logit",
    "unavailable_methods",
]


class _CallablePackage(types.ModuleType):
    """Lets ``cliptrace.explain(...)`` call :func:`explain` while ``cliptrace.explain.metrics`` stays a module."""

    def __call__(self, *args, **kwargs) -> Explanation:
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
