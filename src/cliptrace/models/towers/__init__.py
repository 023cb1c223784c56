"""Towers described uniformly (:mod:`cliptrace.models.towers.base`), one module per model family.

:mod:`cliptrace.models.towers.open_clip` is not imported here: it imports the optional open_clip.
"""

from cliptrace.models.towers.base import (
    MLP,
    Affine,
    Attention,
    AttentionPool,
    Block,
    DescribesTowers,
    Embedding,
    ImageTower,
    MeanPool,
    Pool,
    TextTower,
    TokenPool,
    Tower,
    TowerUnavailable,
)
from cliptrace.models.towers.hf_clip import CLIPImageTower, CLIPTextTower
from cliptrace.models.towers.siglip import SiglipImageTower, SiglipTextTower

__all__ = [
    "MLP",
    "Affine",
    "Attention",
    "AttentionPool",
    "Block",
    "CLIPImageTower",
    "CLIPTextTower",
    "DescribesTowers",
    "Embedding",
    "ImageTower",
    "MeanPool",
    "Pool",
    "SiglipImageTower",
    "SiglipTextTower",
    "TextTower",
    "TokenPool",
    "Tower",
    "TowerUnavailable",
]
