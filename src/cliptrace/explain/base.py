"""What every input-attribution method explains, and the result type they all return.

The explained number is always the similarity logit ``τ ⟨φ(image), v⟩`` of an image embedding φ (normalized,
τ = exp(logit_scale)) with a fixed *text side* vector v, or symmetrically ``τ ⟨u, ψ(text)⟩`` of a fixed image
side u with a text embedding ψ. v is a caption's normalized embedding, a zero-shot class embedding, or a
contrastive difference (target minus the mean of a prompt set); see :mod:`cliptrace.explain.api`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch

from cliptrace.models.base import DualEncoder
from cliptrace.models.hf_clip import HFCLIP
from cliptrace.models.towers.base import DescribesTowers, ImageTower, TextTower, TowerUnavailable

ImageLevel = Literal["patch", "pixel"]
CELLS = 8  # grid side for models without a described patch grid


@dataclass
class Explanation:
    """Input attributions for a batch of B (image, text side) pairs.

    Attributes:
        method: The method's name.
        logit: The explained number for each pair, shape (B,), computed by the real model.
        image_map: Per-patch (B, gh, gw) or per-pixel (B, H, W) relevance; ``None`` if the method has none.
        image_level: ``"patch"`` or ``"pixel"``: what one cell of ``image_map`` covers.
        text_map: Per-token relevance (B, L) of a caption, zero at padding (except in the exact decomposition of
            a tower that attends to padding, SigLIP's, where padding owns its real share); for a zero-shot class,
            per-word relevance (B, W) over its prompts' words (:mod:`cliptrace.explain.classwords`), zero after
            the pair's words; ``None`` when the method has no text map.
        tokens: Per pair, the caption's tokens (strings, padding left out), or the class's word labels
            (class-name words, template words, special tokens), when there is a text map.
        image_constant: The part of the logit no patch owns (class and position embeddings, biases), shape (B,):
            ``image_map.sum() + image_constant == logit``; only the exact decomposition sets it.
        text_constant: The same for the text side: ``text_map.sum() + text_constant == logit``.
        interaction: The logit split over (image sources × text sources), shape (B, gh·gw + 1, L + 1) (W + 1
            for a class), the last row and column being the constant source; only the exact decomposition sets it.
        seconds: Wall time the method took.
    """

    method: str
    logit: torch.Tensor
    image_map: torch.Tensor | None
    image_level: ImageLevel
    text_map: torch.Tensor | None = None
    tokens: list[list[str]] | None = None
    image_constant: torch.Tensor | None = None
    text_constant: torch.Tensor | None = None
    interaction: torch.Tensor | None = None
    seconds: float = 0.0


def image_logit(model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor) -> torch.Tensor:
    """``τ ⟨φ(pixel_values), text_side⟩`` per row: (B, 3, H, W) × (B, D) -> (B,). Differentiable in the pixels."""
    return model.logit_scale.exp() * (model.encode_image(pixel_values) * text_side).sum(-1)


def text_logit(
    model: DualEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_side: torch.Tensor
) -> torch.Tensor:
    """``τ ⟨image_side, ψ(text)⟩`` per row: (B, L) × (B, D) -> (B,)."""
    return model.logit_scale.exp() * (model.encode_text(input_ids, attention_mask) * image_side).sum(-1)


def image_tower(model: DualEncoder, needs: str) -> ImageTower:
    """The model's described image tower (:mod:`cliptrace.models.towers`).

    Raises:
        TowerUnavailable: The model does not describe it; the message starts with ``needs``, then says why.
    """
    return _tower(model, needs, "image")


def text_tower(model: DualEncoder, needs: str) -> TextTower:
    """The model's described text tower; :class:`TowerUnavailable` as in :func:`image_tower`."""
    return _tower(model, needs, "text")


def missing_tower(model: DualEncoder, side: Literal["image", "text"]) -> str | None:
    """Why ``model`` does not describe its ``side`` tower (see :mod:`cliptrace.models.towers`), or ``None``."""
    try:
        _describe(model, side)
    except TowerUnavailable as error:
        return str(error)
    return None


def _tower(model: DualEncoder, needs: str, side: Literal["image", "text"]) -> ImageTower | TextTower:
    """The described tower; :class:`TowerUnavailable` prefixed with what ``needs`` it."""
    try:
        return _describe(model, side)
    except TowerUnavailable as error:
        raise TowerUnavailable(f"{needs}: {error}") from None


def _describe(model: DualEncoder, side: Literal["image", "text"]) -> ImageTower | TextTower:
    name = type(model).__name__
    if not isinstance(model, DescribesTowers):
        raise TowerUnavailable(f"{name} does not describe its {side} tower (HFCLIP, OpenCLIPAdapter, "
                               f"SigLIPAdapter and FrozenBackboneDualEncoder do)")
    try:
        return model.image_tower() if side == "image" else model.text_tower()
    except TowerUnavailable as error:
        raise TowerUnavailable(f"{name} cannot describe its {side} tower: {error}") from None


def patch_grid(model: DualEncoder, pixel_values: torch.Tensor) -> tuple[int, int]:
    """The (rows, columns) of the ViT patch grid of images shaped like ``pixel_values``.

    A model that does not describe its image tower gets a grid of :data:`CELLS` × :data:`CELLS` equal cells, the
    unit of occlusion, random maps and patch-level perturbation curves.

    Raises:
        ValueError: Such a model's images do not split into that grid.
    """
    try:
        return image_tower(model, "a patch grid").grid(pixel_values)
    except TowerUnavailable:
        height, width = pixel_values.shape[-2:]
        if height % CELLS or width % CELLS:
            raise ValueError(f"{type(model).__name__} has no described patch grid and {height}×{width} images do "
                             f"not split into {CELLS}×{CELLS} equal cells") from None
        return CELLS, CELLS


def to_pixels(image_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spread a patch map (B, gh, gw) over pixels (B, H, W), each pixel getting its patch's value / patch area.

    The pixel map sums to the patch map; a pixel map of shape ``size`` is returned as it is.
    """
    rows, columns = image_map.shape[-2:]
    if (rows, columns) == tuple(size):
        return image_map
    height, width = size
    if height % rows or width % columns:
        raise ValueError(f"a {rows}×{columns} patch map does not tile a {height}×{width} image")
    area = (height // rows) * (width // columns)
    expanded = image_map.repeat_interleave(height // rows, -2).repeat_interleave(width // columns, -1)
    return expanded / area


def to_patches(pixel_map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum a pixel map (B, H, W) over the cells of a (gh, gw) patch grid; a map already on the grid is returned."""
    rows, columns = grid
    height, width = pixel_map.shape[-2:]
    if (height, width) == (rows, columns):
        return pixel_map
    if height % rows or width % columns:
        raise ValueError(f"a {height}×{width} pixel map does not split into a {rows}×{columns} grid")
    cells = pixel_map.reshape(*pixel_map.shape[:-2], rows, height // rows, columns, width // columns)
    return cells.sum(dim=(-3, -1))


def require_hf_clip(model: DualEncoder, needs: str) -> HFCLIP:
    """``model`` itself if it is an :class:`HFCLIP`; else a TypeError saying what needed one."""
    if not isinstance(model, HFCLIP):
        raise TypeError(f"{needs} needs a HuggingFace CLIP model (HFCLIP), got {type(model).__name__}")
    return model


class AttributionMethod(abc.ABC):
    """One input-attribution algorithm (one class per algorithm, as in captum).

    Subclasses set ``name`` and ``image_level`` and implement :meth:`attribute_image`; those with a text-side
    map also override :meth:`attribute_text`. ``needs_image_tower`` says whether the image map reads the
    described image tower (:mod:`cliptrace.models.towers`); text maps always read the text tower.
    """

    name: str
    image_level: ImageLevel
    needs_image_tower: bool = False

    @abc.abstractmethod
    def attribute_image(
        self, model: DualEncoder, pixel_values: torch.Tensor, text_side: torch.Tensor
    ) -> torch.Tensor:
        """Relevance of each patch (B, gh, gw) or pixel (B, H, W) for ``image_logit(model, pixels, text_side)``."""

    def attribute_text(
        self,
        model: DualEncoder,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_side: torch.Tensor,
    ) -> torch.Tensor | None:
        """Relevance of each token (B, L) for ``text_logit(...)``, zero at padding; ``None`` if not defined."""
        return None
