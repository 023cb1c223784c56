"""cliptrace: train, evaluate and explain CLIP-style image-text models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``cliptrace.attribute`` and ``cliptrace.explain`` without importing torch on ``import cliptrace``."""
    if name == "attribute":
        from cliptrace.trak.attribute import attribute

        return attribute
    if name == "explain":
        import importlib

        return importlib.import_module("cliptrace.explain")
    raise AttributeError(f"module 'cliptrace' has no attribute {name!r}")
