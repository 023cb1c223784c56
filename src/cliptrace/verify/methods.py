"""Attribution scores to grade: TRAK, and the baselines any attribution method should beat.

Every method returns an (n_train × n_targets) float64 matrix whose entry (i, j) says how much training pair i
raises target j's output; :func:`cliptrace.verify.lds.linear_datamodeling_score` grades any such matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cliptrace.data.images import ImageLoader
from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.models import load_model
from cliptrace.trak.attribute import attribute

METHODS: tuple[str, ...] = ("trak", "tracin", "embedding", "random")


def method_scores(
    method: str,
    run: str | Path,
    train: Sequence[Record],
    targets: Sequence[Record],
    *,
    checkpoints: int | None = 3,
    proj_dim: int = 1024,
    features: str = "auto",
    lambda_reg: float = 0.0,
    bank_size: int = 1024,
    batch_size: int = 32,
    seed: int = 0,
    store_dir: str | Path | None = None,
    progress: bool = False,
) -> np.ndarray:
    """The scores of one method for the targets against a run's training pairs.

    Args:
        method: ``"trak"`` (kernel regression, ensembled over the last ``checkpoints``), ``"tracin"`` (projected
            gradient dot products at the final checkpoint, TracIn-style), ``"embedding"`` (cosine of the images
            plus cosine of the first captions under the final model), ``"random"`` (seeded normal noise).
        run: The ``cliptrace train`` run.
        train: Its training records, in the row order of the result.
        targets: The targets, in column order.
        checkpoints: TRAK's ensemble size (the last K checkpoints; None: all).
        proj_dim: Projection dimension of the gradient methods.
        features: ``"factored"``, ``"exact"`` or ``"auto"`` gradient features.
        lambda_reg: TRAK's ridge term λ (worth raising when the projection dimension nears the training-set size).
        bank_size: Negative-bank size of the CLIP margin.
        batch_size: Records featurized at once.
        seed: Seed of the projection, the bank and the random baseline.
        store_dir: Feature store (default: the run's); stores of different settings must differ.
        progress: Show progress bars.

    Raises:
        ValueError: An unknown method.
    """
    if method == "random":
        return np.random.default_rng(seed).standard_normal((len(train), len(targets)))
    if method == "embedding":
        return embedding_similarity(load_model(Path(run) / "model"), train, targets)
    if method not in ("trak", "tracin"):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    result = attribute(run, list(train), list(targets), checkpoints=checkpoints if method == "trak" else 1,
                       proj_dim=proj_dim, features=features, lambda_reg=lambda_reg, bank_size=bank_size,
                       batch_size=batch_size, seed=seed,
                       store_dir=store_dir, full_scores=True, top_k=1,
                       kernel="trak" if method == "trak" else "identity", progress=progress)
    return np.asarray(result.scores, dtype=np.float64)


@torch.no_grad()
def embedding_similarity(model, train: Sequence[Record], targets: Sequence[Record]) -> np.ndarray:
    """``cos(φ_i, φ_j) + cos(ψ_i, ψ_j)`` of training pair i and target j (images and first captions)."""
    loader = ImageLoader()
    images = embed_images(model, train, loader) @ embed_images(model, targets, loader).T
    texts = embed_texts(model, [r.captions[0] for r in train]) @ embed_texts(model, [r.captions[0] for r in targets]).T
    return (images + texts).double().numpy()
