"""CLIP-style dual encoders: the DualEncoder contract, its adapters, size presets, tokenizer and model directory.

``OpenCLIPAdapter`` is importable here without open_clip installed; it imports open_clip when used.
"""

from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import load_model
from cliptrace.models.frozen import FrozenBackboneDualEncoder
from cliptrace.models.hf_clip import HFCLIP
from cliptrace.models.open_clip import OpenCLIPAdapter
from cliptrace.models.presets import PRESETS, build_config
from cliptrace.models.tokenizer import tokenize, train_tokenizer

__all__ = [
    "DualEncoder",
    "FrozenBackboneDualEncoder",
    "HFCLIP",
    "OpenCLIPAdapter",
    "PRESETS",
    "build_config",
    "load_model",
    "tokenize",
    "train_tokenizer",
]
