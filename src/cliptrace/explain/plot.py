"""Pictures of attributions: heatmaps over images, per-token bars, and one grid comparing several methods.

Everything draws on :class:`matplotlib.figure.Figure` objects and renders with Agg; nothing touches pyplot or
the global backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from cliptrace.explain.base import Explanation
from cliptrace.files import atomic_file

DIVERGING_CMAP = "RdBu_r"  # signed maps: blue negative, white zero, red positive
SEQUENTIAL_CMAP = "inferno"  # non-negative maps: black zero, pale yellow the maximum
POSITIVE_COLOR = "tab:red"
NEGATIVE_COLOR = "tab:blue"
ZERO_COLOR = "0.6"
PANEL_INCHES = 2.4  # side of one image panel
TOKEN_INCHES = 0.2  # height of one token bar
NAME_CHARS = 28  # method names are cut to this many characters


def overlay(
    image: Image.Image | torch.Tensor,
    relevance: torch.Tensor | np.ndarray,
    ax: Axes | None = None,
    *,
    alpha: float = 0.5,
    signed: bool | None = None,
) -> Axes:
    """Draw ``image`` with a relevance heatmap on top.

    Args:
        image: A PIL image, or an unnormalized (3, H, W) tensor in [0, 1] (see ``ImageTransform.unnormalize``).
        relevance: A patch map (gh, gw), enlarged to the image by nearest neighbour, or a pixel map (H, W).
        ax: Where to draw; a new figure's axes by default (reach the figure with ``ax.figure``).
        alpha: Opacity of the heatmap.
        signed: Diverging colours centred at 0 (:data:`DIVERGING_CMAP`) when true, sequential colours from 0
            to the maximum (:data:`SEQUENTIAL_CMAP`) when false; by default signed when any value is negative.
    """
    pixels = _rgb(image)
    height, width = pixels.shape[:2]
    values = torch.as_tensor(relevance).detach().double().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"expected one map (gh, gw) or (H, W), got shape {tuple(values.shape)}")
    rows = np.arange(height) * values.shape[0] // height
    columns = np.arange(width) * values.shape[1] // width
    heat = values[rows][:, columns]
    signed = bool(values.min() < 0) if signed is None else signed
    if signed:
        limit = float(np.abs(values).max()) or 1.0
        cmap, norm = DIVERGING_CMAP, Normalize(-limit, limit)
    else:
        cmap, norm = SEQUENTIAL_CMAP, Normalize(0.0, float(values.max()) if values.max() > 0 else 1.0)
    if ax is None:
        ax = Figure(figsize=(PANEL_INCHES, PANEL_INCHES)).add_subplot()
    ax.imshow(pixels, interpolation="nearest")
    ax.imshow(heat, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest")
    ax.set_axis_off()
    return ax


def token_bars(tokens: Sequence[str], scores: torch.Tensor | Sequence[float], ax: Axes | None = None) -> Axes:
    """Horizontal bars of per-token relevance, first token on top, red positive, blue negative, grey zero.

    Raises:
        ValueError: ``scores`` does not have one value per token.
    """
    values = torch.as_tensor(scores).detach().double().cpu().flatten().tolist()
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} scores")
    if ax is None:
        ax = Figure(figsize=(PANEL_INCHES, 0.6 + TOKEN_INCHES * len(tokens))).add_subplot()
    colors = [POSITIVE_COLOR if v > 0 else NEGATIVE_COLOR if v < 0 else ZERO_COLOR for v in values]
    positions = list(range(len(values)))
    ax.barh(positions, values, color=colors)
    ax.set_yticks(positions, labels=[token.replace("$", r"\$") for token in tokens], fontsize=8)
    ax.set_ylim(len(values) - 0.5, -0.5)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.tick_params(axis="x", labelsize=7)
    return ax


def method_grid(
    image: Image.Image | torch.Tensor,
    explanations: Sequence[Explanation],
    caption: str | None = None,
    index: int = 0,
    *,
    columns: int = 5,
) -> Figure:
    """Compare methods on one pair: the image, then one panel per method (its map, name and logit).

    Panels wrap after ``columns``, so each keeps its size however many methods there are. When any method has
    a text map, a row of token bars follows each row of panels (empty under methods without one).

    Args:
        image: The pair's image, as for :func:`overlay`.
        explanations: One per method, each for the same batch.
        caption: The figure's title, e.g. the caption or class explained.
        index: Which pair of the batch to draw.
        columns: Panels per row.
    """
    if not explanations:
        raise ValueError("method_grid needs at least one explanation")
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    panels: list[Explanation | None] = [None, *explanations]  # None: the plain image
    width = min(columns, len(panels))
    bands = math.ceil(len(panels) / width)
    with_text = [e for e in explanations if e.text_map is not None]
    token_count = max((len(_token_labels(e, index)) for e in with_text), default=0)
    token_height = 0.6 + TOKEN_INCHES * token_count
    heights = [PANEL_INCHES, token_height] * bands if with_text else [PANEL_INCHES] * bands
    figure = Figure(
        figsize=(width * PANEL_INCHES, sum(heights) + 0.3 * (caption is not None) + 0.5), layout="constrained"
    )
    grid = figure.add_gridspec(len(heights), width, height_ratios=heights)
    rows_per_band = 2 if with_text else 1
    for number, explanation in enumerate(panels):
        band, column = divmod(number, width)
        picture = figure.add_subplot(grid[band * rows_per_band, column])
        _draw_panel(picture, image, explanation, index)
        if with_text:
            bars = figure.add_subplot(grid[band * rows_per_band + 1, column])
            if explanation is not None and explanation.text_map is not None:
                labels = _token_labels(explanation, index)
                token_bars(labels, explanation.text_map[index][: len(labels)], bars)
            else:
                bars.set_axis_off()
    if caption is not None:
        figure.suptitle(caption, parse_math=False)
    return figure


def save_figure(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG atomically (a temporary file in the same folder, then a rename); return the path.

    Creates the folder when missing.
    """
    path = Path(path)
    with atomic_file(path) as temporary, temporary.open("wb") as file:
        figure.savefig(file, format="png", dpi=dpi)
    return path


def _draw_panel(ax: Axes, image: Image.Image | torch.Tensor, explanation: Explanation | None, index: int) -> None:
    """The plain image (``explanation`` None), or a method's map over it titled with its name and logit."""
    if explanation is None:
        ax.imshow(_rgb(image), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title("image", fontsize=9)
        return
    if explanation.image_map is None:
        ax.imshow(_rgb(image), interpolation="nearest")
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no image map", transform=ax.transAxes, ha="center", va="center", color="white",
                backgroundcolor="0.3", fontsize=8)
    else:
        overlay(image, explanation.image_map[index], ax)
    name = explanation.method if len(explanation.method) <= NAME_CHARS else explanation.method[: NAME_CHARS - 1] + "…"
    ax.set_title(f"{name}\nlogit {float(explanation.logit[index]):.3g}", fontsize=9, parse_math=False)


def _token_labels(explanation: Explanation, index: int) -> list[str]:
    """The pair's tokens, or their positions when the explanation has none."""
    if explanation.tokens is not None:
        return list(explanation.tokens[index])
    return [str(position) for position in range(explanation.text_map.shape[-1])]


def _rgb(image: Image.Image | torch.Tensor) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    pixels = torch.as_tensor(image).detach().double().cpu()
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected an image tensor (3, H, W), got shape {tuple(pixels.shape)}")
    return pixels.permute(1, 2, 0).clamp(0, 1).numpy()
