"""A contact sheet: a grid of dataset images with their ids and captions, written as a PNG."""

from __future__ import annotations

import math
import random
import textwrap
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cliptrace.data.images import ImageLoader
from cliptrace.data.record import Record

DPI = 100
FONT_SIZE = 8
PADDING = 0.03  # margin around each image, as a fraction of the cell width
# Tried in order for every glyph, so captions in other scripts render where such fonts are installed.
FONT_FAMILIES = ("DejaVu Sans", "Noto Sans", "Noto Sans CJK JP", "Noto Sans Arabic", "Noto Color Emoji", "Noto Emoji")


def _installed_families() -> list[str]:
    """The entries of :data:`FONT_FAMILIES` that matplotlib can find."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return [name for name in FONT_FAMILIES if name in installed] or ["sans-serif"]


def _label(record: Record, width: int, max_lines: int) -> str:
    """The record's id and split, then its first caption wrapped to ``width`` columns (wide characters count 2)."""
    caption = record.captions[0]
    if any(unicodedata.east_asian_width(char) in "WF" for char in caption):
        width = max(4, width // 2)
    lines = textwrap.wrap(caption, width=width)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: width - 1] + "…"]
    more = len(record.captions) - 1
    header = f"{record.id} ({record.split})" + (f"  +{more} more" if more else "")
    return "\n".join([header, *lines])


def contact_sheet(
    records: Sequence[Record],
    loader: ImageLoader,
    out_png: str | Path,
    *,
    n: int = 16,
    columns: int = 4,
    seed: int = 0,
    tile: int = 256,
) -> Path:
    """Write a grid of up to ``n`` records, drawn at random with ``seed`` and shown in dataset order.

    Each cell is ``tile`` pixels wide and ``tile * 3 // 2`` high: the image fitted in a ``tile``-pixel square above
    its id, split and first caption. The sheet has ``min(columns, shown)`` columns and as many rows as needed, so
    it is ``columns * tile`` by ``rows * (tile * 3 // 2)`` pixels.

    Args:
        records: Records to draw from.
        loader: Opens the image references.
        out_png: The PNG file to write (its directory is created).
        n: Most records shown.
        columns: Most cells per row.
        seed: Seed of the random choice of records.
        tile: Cell width in pixels.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    if not records:
        raise ValueError("no records to preview")
    if n < 1 or columns < 1 or tile < 32:
        raise ValueError(f"need n >= 1, columns >= 1 and tile >= 32, got n={n}, columns={columns}, tile={tile}")
    chosen = sorted(random.Random(seed).sample(range(len(records)), min(n, len(records))))
    columns = min(columns, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    cell_height = tile * 3 // 2
    figure = Figure(figsize=(columns * tile / DPI, rows * cell_height / DPI), dpi=DPI, facecolor="white")
    families = _installed_families()
    width_chars = max(8, tile // 7)
    max_lines = max(1, (cell_height - tile) // (FONT_SIZE * 2) - 1)
    for slot, index in enumerate(chosen):
        row, column = divmod(slot, columns)
        left, top = column / columns, 1 - row / rows
        image_bottom = top - tile / cell_height / rows
        pad_x, pad_y = PADDING / columns, PADDING * tile / cell_height / rows
        axes = figure.add_axes(
            (left + pad_x, image_bottom + pad_y, 1 / columns - 2 * pad_x, tile / cell_height / rows - 2 * pad_y)
        )
        image = loader.load(records[index].image)
        image.thumbnail((tile, tile))
        axes.imshow(np.asarray(image))
        axes.set_axis_off()
        figure.text(
            left + 0.5 / columns, image_bottom - 0.02 / rows, _label(records[index], width_chars, max_lines),
            ha="center", va="top", fontsize=FONT_SIZE, family=families,
        )
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing")
        figure.savefig(out_png, format="png", dpi=DPI, facecolor="white")
    return out_png
