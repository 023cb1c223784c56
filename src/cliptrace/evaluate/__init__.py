"""Evaluation of a DualEncoder: image↔text retrieval, zero-shot classification, single queries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from rich.table import Table
from rich.text import Text

from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_pil_images, embed_texts
from cliptrace.evaluate.query import Match, QueryResult, image_query, plot_image_query, plot_text_query, text_query
from cliptrace.evaluate.retrieval import retrieval_metrics
from cliptrace.evaluate.templates import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, load_classnames, load_templates
from cliptrace.evaluate.zeroshot import (
    class_embeddings,
    zero_shot_classify,
    zero_shot_from_features,
    zero_shot_metrics,
)
from cliptrace.models.base import DualEncoder

if TYPE_CHECKING:
    from cliptrace.data.images import ImageLoader

__all__ = [
    "IMAGENET_TEMPLATES",
    "SIMPLE_TEMPLATES",
    "Match",
    "QueryResult",
    "class_embeddings",
    "embed_images",
    "embed_pil_images",
    "embed_texts",
    "evaluate",
    "format_metrics_table",
    "image_query",
    "load_classnames",
    "load_templates",
    "plot_image_query",
    "plot_text_query",
    "retrieval_metrics",
    "text_query",
    "zero_shot_classify",
    "zero_shot_from_features",
    "zero_shot_metrics",
]


def evaluate(
    model: DualEncoder,
    records: Sequence[Record],
    loader: ImageLoader,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Retrieval over the records' images and all their captions, plus zero-shot classification.

    Zero-shot classification runs when ``classnames`` is given (then some record must have a label) or when
    any record has a label (classes: the sorted distinct labels); unlabeled records are left out of it.
    Images are embedded once for both. The model must already be on ``device``.

    Returns:
        A flat dict: ``n_images``, ``n_captions``, the entries of :func:`retrieval_metrics` and, when zero-shot
        classification runs, the entries of :func:`zero_shot_metrics` prefixed ``zeroshot_``. The only
        non-scalar entry is ``zeroshot_per_class_recall``.
    """
    if not records:
        raise ValueError("no records to evaluate")
    for record in records:
        if not record.captions:
            raise ValueError(f"record {record.id!r} has no caption")
    captions = [caption for record in records for caption in record.captions]
    text_to_image = torch.tensor([index for index, record in enumerate(records) for _ in record.captions])
    images = embed_images(model, records, loader, batch_size=batch_size, device=device, progress=progress)
    texts = embed_texts(model, captions, batch_size=batch_size, device=device, progress=progress)
    metrics: dict = {
        "n_images": len(records),
        "n_captions": len(captions),
        **retrieval_metrics(images, texts, text_to_image),
    }
    if classnames is not None or any(record.label is not None for record in records):
        zero_shot = zero_shot_from_features(
            model, records, images, classnames, templates, batch_size=batch_size, device=device, progress=progress
        )
        metrics.update({f"zeroshot_{name}": value for name, value in zero_shot.items()})
    return metrics


def format_metrics_table(metrics: dict, title: str | Text = "Evaluation") -> Table:
    """A two-column rich table of the scalar entries of a metrics dict such as :func:`evaluate` returns.

    Non-scalar entries (per-class recalls) are left out; they stay in the dict and the JSON output.
    """
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        if isinstance(value, float):
            table.add_row(name, f"{value:.2f}")
        elif isinstance(value, int):
            table.add_row(name, str(value))
    return table
