"""Attribution pictures: colours read back from the rendered canvas, and PNG files decoded with PIL."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image

from cliptrace.explain.base import Explanation
from cliptrace.explain.plot import (
    DIVERGING_CMAP,
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    SEQUENTIAL_CMAP,
    ZERO_COLOR,
    method_grid,
    overlay,
    save_figure,
    token_bars,
)

GREY = 0.5


def _render_overlay(relevance: torch.Tensor, **options) -> np.ndarray:
    """Draw a 16×16 grey image with ``relevance`` on axes filling a 160×160-pixel figure; return its RGB."""
    figure = Figure(figsize=(1.6, 1.6), dpi=100)
    overlay(torch.full((3, 16, 16), GREY), relevance, figure.add_axes((0, 0, 1, 1)), alpha=0.5, **options)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255


def _blend(cmap: str, position: float) -> np.ndarray:
    return 0.5 * np.array(matplotlib.colormaps[cmap](position)[:3]) + 0.5 * GREY


def _cell(canvas: np.ndarray, row: int, column: int) -> np.ndarray:
    """The pixels well inside cell (row, column) of the 2×2 patch grid (80×80 canvas pixels each)."""
    return canvas[row * 80 + 5 : row * 80 + 75, column * 80 + 5 : column * 80 + 75].reshape(-1, 3)


def test_overlay_puts_the_hottest_colour_on_the_one_hot_patch() -> None:
    one_hot = torch.zeros(2, 2)
    one_hot[1, 0] = 1.0
    canvas = _render_overlay(one_hot)
    assert canvas.shape == (160, 160, 3)
    np.testing.assert_allclose(_cell(canvas, 1, 0), np.broadcast_to(_blend(SEQUENTIAL_CMAP, 1.0), (4900, 3)),
                               atol=2 / 255)
    for row, column in [(0, 0), (0, 1), (1, 1)]:
        np.testing.assert_allclose(_cell(canvas, row, column),
                                   np.broadcast_to(_blend(SEQUENTIAL_CMAP, 0.0), (4900, 3)), atol=2 / 255)


def test_overlay_of_a_signed_map_is_diverging_and_centred_at_zero() -> None:
    signed = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])  # ±2 are the ends, so −1 sits a quarter of the way up
    canvas = _render_overlay(signed)
    for (row, column), position in {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 0.25, (1, 1): 0.5}.items():
        np.testing.assert_allclose(_cell(canvas, row, column),
                                   np.broadcast_to(_blend(DIVERGING_CMAP, position), (4900, 3)), atol=2 / 255)
    forced = _render_overlay(torch.tensor([[2.0, 0.0], [1.0, 0.0]]), signed=True)  # non-negative, drawn signed
    np.testing.assert_allclose(_cell(forced, 0, 1), np.broadcast_to(_blend(DIVERGING_CMAP, 0.5), (4900, 3)),
                               atol=2 / 255)


def test_overlay_accepts_a_pil_image_and_a_pixel_map() -> None:
    image = Image.new("RGB", (12, 8), (10, 200, 30))
    ax = overlay(image, torch.rand(8, 12))
    shown = ax.get_images()[0].get_array()
    assert shown.shape == (8, 12, 3)
    np.testing.assert_allclose(shown[0, 0], np.array([10, 200, 30]) / 255)
    with pytest.raises(ValueError, match="one map"):
        overlay(image, torch.rand(1, 8, 12))


def test_token_bars_colour_by_sign_in_token_order() -> None:
    tokens = ["a", "red", "$", "circle"]  # a lone $ would break mathtext if not escaped
    ax = token_bars(tokens, torch.tensor([0.5, -1.0, 0.0, 2.0]))
    bars = ax.patches
    assert [bar.get_width() for bar in bars] == [0.5, -1.0, 0.0, 2.0]
    assert [bar.get_facecolor() for bar in bars] == [
        to_rgba(POSITIVE_COLOR), to_rgba(NEGATIVE_COLOR), to_rgba(ZERO_COLOR), to_rgba(POSITIVE_COLOR)
    ]
    assert [bar.get_y() + bar.get_height() / 2 for bar in bars] == [0, 1, 2, 3]
    bottom, top = ax.get_ylim()
    assert bottom > top  # the first token is drawn on top
    FigureCanvasAgg(ax.figure).draw()
    with pytest.raises(ValueError, match="4 tokens but 3 scores"):
        token_bars(tokens, [1.0, 2.0, 3.0])


def _explanations(count: int) -> list[Explanation]:
    generator = torch.Generator().manual_seed(0)
    explanations = []
    for number in range(count):
        with_text = number % 2 == 0
        explanations.append(Explanation(
            method=f"method number {number} with a rather long descriptive name",
            logit=torch.tensor([1.5, -0.5]),
            image_map=torch.randn(2, 4, 4, generator=generator) if number != 1 else None,
            image_level="patch",
            text_map=torch.randn(2, 8, generator=generator) if with_text else None,
            tokens=[["a", "red", "circle"], ["a", "blue", "$quare"]] if with_text else None,
        ))
    return explanations


def test_method_grid_writes_a_png_of_the_figure_size(tmp_path: Path) -> None:
    figure = method_grid(torch.rand(3, 32, 32), _explanations(3), caption="a red $circle", index=1)
    path = save_figure(figure, tmp_path / "new" / "folder" / "grid.png")
    assert path == tmp_path / "new" / "folder" / "grid.png"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind
    with Image.open(path) as decoded:
        decoded.load()
        width, height = figure.get_size_inches() * 100
        assert decoded.format == "PNG" and decoded.size == (round(width), round(height))


def test_method_grid_keeps_panels_readable_with_many_methods(tmp_path: Path) -> None:
    figure = method_grid(torch.rand(3, 32, 32), _explanations(12), columns=5)
    save_figure(figure, tmp_path / "many.png")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    pictures = [ax for ax in figure.axes if ax.get_images()]
    assert len(pictures) == 13  # the image and 12 methods
    boxes = [ax.get_window_extent(renderer) for ax in pictures]
    assert min(box.width for box in boxes) > 150 and min(box.height for box in boxes) > 150  # pixels at dpi 100
    assert figure.get_size_inches()[0] == pytest.approx(5 * 2.4)
    for first in range(len(boxes)):
        for second in range(first + 1, len(boxes)):
            assert not boxes[first].overlaps(boxes[second])
    token_axes = [ax for ax in figure.axes if ax.patches]
    assert len(token_axes) == 6  # methods 0, 2, ..., 10 have text maps
    assert [label.get_text() for label in token_axes[0].get_yticklabels()] == ["a", "red", "circle"]
