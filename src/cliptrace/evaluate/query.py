"""Single queries against a dataset — the images closest to a text, the captions closest to an image — and plots.

Candidates are ordered by similarity, best first; among equal similarities wrong candidates come before true
ones, so the rank of the true candidate is the pessimistic rank used by the retrieval metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import torch
from matplotlib import font_manager
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_pil_images, embed_texts
from cliptrace.models.base import DualEncoder

if TYPE_CHECKING:
    from cliptrace.data.images import ImageLoader

# Tried in order for every character; only the installed ones are used (Agg falls back glyph by glyph).
_FONT_FAMILIES = (
    "DejaVu Sans",
    "Noto Sans",
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans Arabic",
    "Noto Sans Hebrew",
    "Noto Sans Devanagari",
    "Noto Sans Thai",
    "Arial Unicode MS",
)
_TRUE_COLOR = "tab:green"
_CAPTION_CHARS = 80


@dataclass(frozen=True)
class Match:
    """One ranked candidate.

    Attributes:
        rank: 1-based position in the ranking.
        record: The candidate's record (for an image query, the record the caption belongs to).
        caption: The matched caption for an image query; ``None`` for a text query.
        similarity: Cosine similarity to the query.
        is_true: Whether the candidate belongs to the record named as the true match.
        probability: The model's probability that the candidate matches the query, under its objective: softmax
            over all candidates for CLIP, σ(t·similarity + b) of the pair alone for SigLIP.
    """

    rank: int
    record: Record
    caption: str | None
    similarity: float
    is_true: bool
    probability: float


@dataclass(frozen=True)
class QueryResult:
    """The ranking of all candidates for one query.

    Attributes:
        query: The query text, or the query image.
        matches: The top-k candidates, best first.
        similarities: Cosine similarity of the query to every candidate, in candidate order.
        probabilities: The model's match probability of every candidate (see :attr:`Match.probability`).
        true_match: The best-ranked true candidate (its rank and similarity), when a true id was given.
    """

    query: str | Image.Image
    matches: tuple[Match, ...]
    similarities: torch.Tensor
    probabilities: torch.Tensor
    true_match: Match | None = None


def text_query(
    model: DualEncoder,
    text: str,
    records: Sequence[Record],
    loader: ImageLoader,
    *,
    k: int = 5,
    true_id: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> QueryResult:
    """Rank the records' images by similarity to ``text``.

    Args:
        model: The model, already on ``device``.
        text: The query caption (any language or script the model's tokenizer handles).
        records: The candidate images.
        loader: Loads a record's image reference.
        k: How many of the best images to keep as ``matches``.
        true_id: Id of the record whose image is the correct answer, if known.
        batch_size: Images embedded at once.
        device: Where the model runs.
        progress: Show a progress bar while embedding.
    """
    images = embed_images(model, records, loader, batch_size=batch_size, device=device, progress=progress)
    query = embed_texts(model, [text], device=device)[0]
    return _ranked(text, images @ query, match_probabilities(model, query, images),
                   [(record, None) for record in records], k, true_id)


def image_query(
    model: DualEncoder,
    image: Image.Image,
    records: Sequence[Record],
    *,
    k: int = 5,
    true_id: str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> QueryResult:
    """Rank all captions of the records by similarity to ``image``.

    Args:
        model: The model, already on ``device``.
        image: The query image.
        records: The records whose captions are the candidates.
        k: How many of the best captions to keep as ``matches``.
        true_id: Id of the record whose captions are the correct answers, if known.
        batch_size: Captions embedded at once.
        device: Where the model runs.
        progress: Show a progress bar while embedding.
    """
    candidates = [(record, caption) for record in records for caption in record.captions]
    captions = [caption for _, caption in candidates]
    texts = embed_texts(model, captions, batch_size=batch_size, device=device, progress=progress)
    query = embed_pil_images(model, [image], device=device)[0]
    return _ranked(image, texts @ query, match_probabilities(model, query, texts), candidates, k, true_id)


def plot_text_query(result: QueryResult, loader: ImageLoader, out_png: str | Path) -> Path:
    """Draw the top-k images with their similarities (true ones framed), and a histogram of all similarities.

    When the true image is not among the top k, it is drawn as an extra panel after them. Returns the path
    of the written PNG.
    """
    if not isinstance(result.query, str):
        raise ValueError("plot_text_query needs the result of a text query")
    panels = list(result.matches)
    if result.true_match is not None and not any(match.is_true for match in panels):
        panels.append(result.true_match)
    with _unicode_fonts():
        figure = Figure(figsize=(max(6.0, 2.2 * len(panels)), 5.5), layout="constrained")
        grid = figure.add_gridspec(2, len(panels), height_ratios=(3, 2))
        for column, match in enumerate(panels):
            axes = figure.add_subplot(grid[0, column])
            axes.imshow(loader.load(match.record.image))
            axes.set_xticks([])
            axes.set_yticks([])
            label = (f"#{match.rank}  {match.similarity:.3f}  p {match.probability:.2f}\n"
                     f"{_shorten(match.record.id, 24)}")
            _mark(axes, label, match.is_true)
        histogram = figure.add_subplot(grid[1, :])
        _similarity_histogram(histogram, result, "images")
        figure.suptitle(_shorten(result.query, _CAPTION_CHARS), parse_math=False)
        return _save(figure, out_png)


def plot_image_query(result: QueryResult, out_png: str | Path) -> Path:
    """Draw the query image, the top-k captions with their similarities (true ones marked ✓), and a histogram.

    When no true caption is among the top k, the best-ranked one is listed after them. Returns the path of
    the written PNG.
    """
    if not isinstance(result.query, Image.Image):
        raise ValueError("plot_image_query needs the result of an image query")
    lines = list(result.matches)
    if result.true_match is not None and not any(match.is_true for match in lines):
        lines.append(result.true_match)
    with _unicode_fonts():
        figure = Figure(figsize=(11.0, 6.0), layout="constrained")
        grid = figure.add_gridspec(2, 3, height_ratios=(3, 2))
        picture = figure.add_subplot(grid[0, 0])
        picture.imshow(result.query)
        picture.set_xticks([])
        picture.set_yticks([])
        picture.set_title("query image")
        listing = figure.add_subplot(grid[0, 1:])
        listing.axis("off")
        for row, match in enumerate(lines):
            mark = "✓ " if match.is_true else ""
            text = (f"#{match.rank}  {match.similarity:.3f}  p {match.probability:.2f}  {mark}"
                    f"{_shorten(match.caption or '', _CAPTION_CHARS)}")
            listing.text(
                0.0,
                1.0 - (row + 0.5) / max(len(lines), 5),
                f"{text}\n        [{_shorten(match.record.id, 40)}]",
                color=_TRUE_COLOR if match.is_true else "black",
                va="center",
                fontsize=9,
                parse_math=False,
                transform=listing.transAxes,
            )
        histogram = figure.add_subplot(grid[1, :])
        _similarity_histogram(histogram, result, "captions")
        return _save(figure, out_png)


@torch.no_grad()
def match_probabilities(model: DualEncoder, query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The model's probability (C,) that each candidate matches the query, under its objective (softmax over the
    candidates, or the sigmoid of each logit alone), from the normalized embeddings of the query (D,) and of the
    candidates (C, D)."""
    bias = model.logit_bias
    logits = model.objective.logits(query[None], candidates, model.logit_scale.exp().cpu(),
                                    None if bias is None else bias.cpu())
    return model.objective.probabilities(logits)[0]


def _ranked(
    query: str | Image.Image,
    similarities: torch.Tensor,
    probabilities: torch.Tensor,
    candidates: Sequence[tuple[Record, str | None]],
    k: int,
    true_id: str | None,
) -> QueryResult:
    """Order the candidates pessimistically (wrong before true among ties) and keep the top k."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    is_true = torch.tensor([record.id == true_id for record, _ in candidates], dtype=torch.bool)
    if true_id is not None and not is_true.any():
        raise ValueError(f"true id {true_id!r} is not the id of any of the {len(candidates)} candidates")
    wrong_first = torch.argsort(is_true.int(), stable=True)
    order = wrong_first[torch.argsort(similarities[wrong_first], descending=True, stable=True)].tolist()

    def match(position: int) -> Match:
        index = order[position]
        record, caption = candidates[index]
        return Match(position + 1, record, caption, float(similarities[index]), bool(is_true[index]),
                     float(probabilities[index]))

    true_position = next((position for position, index in enumerate(order) if is_true[index]), None)
    return QueryResult(
        query=query,
        matches=tuple(match(position) for position in range(min(k, len(order)))),
        similarities=similarities,
        probabilities=probabilities,
        true_match=None if true_position is None else match(true_position),
    )


def _similarity_histogram(axes: Axes, result: QueryResult, what: str) -> None:
    """A histogram of the query's similarity to every candidate, with the top-k cut-off and the true one."""
    axes.hist(result.similarities.numpy(), bins=min(50, max(10, len(result.similarities) // 5)), color="0.6")
    cutoff = result.matches[-1]
    axes.axvline(cutoff.similarity, color="tab:blue", linestyle="--", label=f"top-{cutoff.rank} cut-off")
    if result.true_match is not None:
        axes.axvline(
            result.true_match.similarity,
            color=_TRUE_COLOR,
            label=f"true (rank {result.true_match.rank} of {len(result.similarities)})",
        )
    axes.set_xlabel(f"cosine similarity of the query to all {len(result.similarities)} {what}")
    axes.set_ylabel("count")
    axes.legend(loc="upper left")


def _mark(axes: Axes, label: str, is_true: bool) -> None:
    """Title an image panel, framing it in the true colour when it is a true match."""
    color = _TRUE_COLOR if is_true else "black"
    axes.set_title(label + ("  ✓" if is_true else ""), fontsize=9, color=color, parse_math=False)
    if is_true:
        for spine in axes.spines.values():
            spine.set_color(_TRUE_COLOR)
            spine.set_linewidth(4)


def _shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _save(figure: Figure, out_png: str | Path) -> Path:
    """Render ``figure`` with Agg to a PNG file, creating its folder."""
    path = Path(out_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


@contextmanager
def _unicode_fonts() -> Iterator[None]:
    """Render text with every installed font of ``_FONT_FAMILIES``, so captions in any script draw."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    families = [family for family in _FONT_FAMILIES if family in installed] or ["sans-serif"]
    with matplotlib.rc_context({"font.family": families}):
        yield
