"""CLIP-style dual encoders: the DualEncoder contract, its adapters (HF CLIP, HF SigLIP, frozen backbones,
open_clip), size presets, tokenizer and model directory.

``OpenCLIPAdapter`` is importable here without open_clip installed; it imports open_clip when used.
"""

from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import load_model
from cliptrace.models.frozen import FrozenBackboneDualEncoder
from cliptrace.models.hf_clip import HFCLIP
from cliptrace.models.open_clip import OpenCLIPAdapter
from cliptrace.models.presets import PRESETS, SIGLIP_PRESETS, build_config, build_siglip_config
from cliptrace.models.siglip import SigLIPAdapter
from cliptrace.models.tokenizer import tokenize, train_tokenizer

__all__ = [
    "DualEncoder",
    "FrozenBackboneDualEncoder",
    "HFCLIP",
    "OpenCLIPAdapter",
    "PRESETS",
    "SIGLIP_PRESETS",
    "SigLIPAdapter",
    "build_config",
    "build_siglip_config",
    "load_model",
    "tokenize",
    "train_tokenizer",
]
