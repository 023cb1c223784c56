"""Zero-shot classification: classes as prompt-ensemble text embeddings, images scored against them.

Ties are resolved pessimistically, as in retrieval: an image counts as correct at k only if fewer than k
wrong classes score at least as high as its true class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.evaluate.retrieval import best_correct_rank
from cliptrace.evaluate.templates import IMAGENET_TEMPLATES, PLACEHOLDER, fill_template
from cliptrace.models.base import DualEncoder

if TYPE_CHECKING:
    from cliptrace.data.images import ImageLoader


def class_embeddings(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """One embedding per class (C, D): the mean of its normalized prompt embeddings, renormalized.

    Each template's ``{}`` is replaced by the class name. The model must already be on ``device``.
    """
    if not classnames:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no templates given")
    for index, template in enumerate(templates):
        if PLACEHOLDER not in template:
            raise ValueError(f"template {index} ({template!r}) has no '{PLACEHOLDER}' for the class name")
    prompts = [fill_template(template, name) for name in classnames for template in templates]
    features = embed_texts(model, prompts, batch_size=batch_size, device=device, progress=progress)
    return F.normalize(features.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def zero_shot_metrics(
    image_features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    *,
    classnames: Sequence[str] | None = None,
) -> dict:
    """Top-k accuracy and per-class recall of classifying each image as its most similar class.

    Args:
        image_features: Image embeddings (N, D).
        class_features: Class embeddings (C, D).
        labels: The true class index of each image, shape (N,).
        ks: The k of the top-k accuracies.
        classnames: Names of the C classes, used as keys of ``per_class_recall`` (default: the indices).

    Returns:
        ``top{k}`` (percent) for each k; ``per_class_recall``, a dict class → top-1 recall (percent) over the
        classes that have images; ``mean_per_class_recall``, its mean; ``n_images``.
    """
    n_classes = class_features.shape[0]
    names = [str(index) for index in range(n_classes)] if classnames is None else list(classnames)
    _validate(image_features, class_features, labels, names, ks)
    class_ids = torch.arange(n_classes, device=labels.device)
    ranks = best_correct_rank(image_features @ class_features.T, labels[:, None] == class_ids[None, :])
    metrics: dict = {f"top{k}": 100.0 * (ranks <= k).double().mean().item() for k in ks}
    per_class = {
        names[index]: 100.0 * (ranks[labels == index] == 1).double().mean().item()
        for index in labels.unique().tolist()
    }
    metrics["mean_per_class_recall"] = sum(per_class.values()) / len(per_class)
    metrics["per_class_recall"] = per_class
    metrics["n_images"] = int(labels.shape[0])
    return metrics


def label_indices(records: Sequence[Record], classnames: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """The positions of the records that have a label, and their labels as indices into ``classnames``.

    Raises:
        ValueError: naming the record whose label is not one of ``classnames``.
    """
    index_of = {name: index for index, name in enumerate(classnames)}
    positions, labels = [], []
    for position, record in enumerate(records):
        if record.label is None:
            continue
        if record.label not in index_of:
            raise ValueError(
                f"record {record.id!r}: label {record.label!r} is not one of the {len(index_of)} class names"
            )
        positions.append(position)
        labels.append(index_of[record.label])
    return positions, torch.tensor(labels, dtype=torch.long)


def zero_shot_classify(
    model: DualEncoder,
    records: Sequence[Record],
    loader: ImageLoader,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Zero-shot metrics (see :func:`zero_shot_metrics`) of the labeled records; unlabeled ones are skipped.

    ``classnames`` defaults to the sorted distinct labels of the records.
    """
    labeled = [record for record in records if record.label is not None]
    if not labeled:
        raise ValueError("no record has a label to classify")
    images = embed_images(model, labeled, loader, batch_size=batch_size, device=device, progress=progress)
    return zero_shot_from_features(
        model, labeled, images, classnames, templates, batch_size=batch_size, device=device, progress=progress
    )


def zero_shot_from_features(
    model: DualEncoder,
    records: Sequence[Record],
    image_features: torch.Tensor,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Zero-shot metrics of the labeled ``records`` from their already computed ``image_features`` (row i = record i).

    ``classnames`` defaults to the sorted distinct labels of the records; unlabeled records are left out.
    """
    if classnames is None:
        classnames = sorted({record.label for record in records if record.label is not None})
    positions, labels = label_indices(records, classnames)
    if not positions:
        raise ValueError(f"{len(classnames)} class names were given but no record has a label")
    classes = class_embeddings(model, classnames, templates, batch_size=batch_size, device=device, progress=progress)
    return zero_shot_metrics(image_features[positions], classes, labels, classnames=classnames)


def _validate(
    image_features: torch.Tensor,
    class_features: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    ks: Sequence[int],
) -> None:
    """Raise a ValueError naming the first problem with the zero-shot inputs."""
    if image_features.ndim != 2 or image_features.shape[0] == 0:
        raise ValueError(f"image_features must have shape (N, D) with N > 0, got {tuple(image_features.shape)}")
    if class_features.ndim != 2 or class_features.shape[1] != image_features.shape[1]:
        raise ValueError(
            f"class_features {tuple(class_features.shape)} must have shape (C, {image_features.shape[1]})"
        )
    if len(classnames) != class_features.shape[0]:
        raise ValueError(f"{len(classnames)} class names for {class_features.shape[0]} class embeddings")
    if labels.shape != (image_features.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be an int64 tensor of shape ({image_features.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    out_of_range = ((labels < 0) | (labels >= class_features.shape[0])).nonzero()
    if len(out_of_range):
        image = out_of_range[0].item()
        raise ValueError(f"labels[{image}] = {labels[image].item()} is not a class index in [0, {len(classnames)})")
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
