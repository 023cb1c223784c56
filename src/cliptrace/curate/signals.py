"""What curation ranks training pairs by, measured once per run: influence on a validation set, self-influence,
the model's own image–caption similarity (CLIP score) and near-duplicate images.

All arrays are in the order of the training records. Influence comes from any registered attribution method
(:data:`cliptrace.attribution.METHODS`): entry (i, j) of its score matrix says how much training pair i raises
validation pair j's output, so the mean over j is pair i's total effect on the validation objective and a negative
mean is measured harm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cliptrace.data.images import ImageLoader
from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.models import load_model
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import model_directory_of
from cliptrace.trak.attribute import attribute
from cliptrace.trak.settings import AttributionSettings

BLOCK_ROWS = 4096  # rows of the image-similarity matrix held at once


@dataclass(frozen=True)
class Signals:
    """Per training pair, what curation ranks it by.

    Attributes:
        ids: The training record ids, in dataset order (the order of every array here).
        val_influence: (n,) mean attribution score of the pair over the validation pairs (negative: harmful).
        self_influence: (n,) the method's score of the pair for itself (large: memorized, often mislabeled).
        clip_score: (n,) cosine similarity of the pair's image and caption embeddings under the run's final model
            (mean over its captions).
        duplicate_of: (n,) index of the earliest earlier pair whose image embedding is at least the threshold
            similar, or −1.
        duplicate_similarity: (n,) that similarity (NaN where there is none).
        method: The attribution method that measured the influences.
    """

    ids: tuple[str, ...]
    val_influence: np.ndarray
    self_influence: np.ndarray
    clip_score: np.ndarray
    duplicate_of: np.ndarray
    duplicate_similarity: np.ndarray
    method: str


def measure_signals(
    run: str | Path,
    train: Sequence[Record],
    val: Sequence[Record],
    *,
    method: str = "trak",
    settings: AttributionSettings = AttributionSettings(),
    checkpoints: int | None = None,
    duplicate_threshold: float = 0.998,
    progress: bool = False,
) -> Signals:
    """Every curation signal of a run's training pairs.

    Args:
        run: The ``cliptrace train`` run (its checkpoints give the influences, its final model the CLIP scores).
        train: Its training records.
        val: The validation records whose objective the influences are measured on.
        method: A registered attribution method.
        settings: The attribution settings (the run's feature store for them is reused).
        checkpoints: The ensemble: the last K checkpoints (None: all).
        duplicate_threshold: Cosine similarity of image embeddings from which a pair is a near-duplicate.
        progress: Show progress bars.

    Raises:
        ValueError: No training or validation records, or a threshold outside (0, 1].
    """
    if not train or not val:
        raise ValueError(f"curation needs training and validation records, got {len(train)} and {len(val)}")
    if not 0 < duplicate_threshold <= 1:
        raise ValueError(f"duplicate_threshold must lie in (0, 1], got {duplicate_threshold}")
    result = attribute(run, list(train), list(val), method=method, settings=settings, checkpoints=checkpoints,
                       full_scores=True, top_k=1, progress=progress)
    scores = np.asarray(result.scores, dtype=np.float64)
    model = load_model(model_directory_of(run))
    images, clip = clip_scores(model, train, progress=progress)
    duplicate_of, similarity = near_duplicates(images, duplicate_threshold)
    return Signals(tuple(record.id for record in train), scores.mean(1), np.asarray(result.self_influence, float),
                   clip, duplicate_of, similarity, method)


def clip_scores(model: DualEncoder, records: Sequence[Record], *, progress: bool = False
                ) -> tuple[torch.Tensor, np.ndarray]:
    """The records' L2-normalized image embeddings (n, D) and each record's mean image–caption cosine similarity."""
    images = embed_images(model, records, ImageLoader(), progress=progress)
    captions = [caption for record in records for caption in record.captions]
    owner = torch.tensor([index for index, record in enumerate(records) for _ in record.captions])
    texts = embed_texts(model, captions, progress=progress)
    cosine = (images[owner] * texts).sum(-1).double()
    total = torch.zeros(len(records), dtype=torch.float64).index_add_(0, owner, cosine)
    return images, (total / torch.bincount(owner, minlength=len(records))).numpy()


def near_duplicates(embeddings: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """For each row of L2-normalized ``embeddings``, the earliest earlier row at least ``threshold`` similar.

    Returns:
        ``(duplicate_of, similarity)``: the index of that row or −1, and its cosine similarity or NaN.
    """
    n = embeddings.shape[0]
    duplicate_of = np.full(n, -1, dtype=np.int64)
    similarity = np.full(n, np.nan)
    for start in range(0, n, BLOCK_ROWS):
        block = embeddings[start : start + BLOCK_ROWS] @ embeddings[: start + BLOCK_ROWS].T
        rows = torch.arange(block.shape[0])
        earlier = torch.arange(block.shape[1])[None, :] < (rows + start)[:, None]
        hits = (block >= threshold) & earlier
        found = hits.any(1)
        first = hits.int().argmax(1)
        for row in torch.nonzero(found).flatten().tolist():
            duplicate_of[start + row] = int(first[row])
            similarity[start + row] = float(block[row, first[row]])
    return duplicate_of, similarity
