"""Image↔text retrieval metrics with several captions per image (the COCO / Flickr30k protocol).

Ranks are 1-based and ties are resolved **pessimistically**: every wrong candidate that scores at least as high
as the best correct one is ranked ahead of it. A collapsed model whose embeddings are all equal therefore gets
the worst rank, never a perfect one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def best_correct_rank(similarities: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """The 1-based rank of the best-ranked correct candidate in each row, ties ranked against it.

    Args:
        similarities: Scores of shape (B, M), higher is better.
        correct: Boolean mask of shape (B, M); every row needs at least one ``True``.

    Returns:
        An int64 tensor of shape (B,): ``1 + #{wrong j : s_j >= max over correct s}``.
    """
    best = similarities.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((similarities >= best) & ~correct).sum(dim=1)


def image_to_text_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    block_size: int = 1024,
) -> torch.Tensor:
    """For each image, the rank of its best-ranked correct caption among all captions, shape (N,).

    Args:
        image_features: Image embeddings (N, D); similarity is the dot product (cosine when normalized).
        text_features: Caption embeddings (M, D).
        text_to_image: For each caption, the index of its image, shape (M,).
        block_size: Images scored at once; memory holds a block_size × M similarity matrix.
    """
    _validate(image_features, text_features, text_to_image, block_size)
    targets = text_to_image.to(image_features.device)
    ranks = []
    for start in range(0, image_features.shape[0], block_size):
        block = image_features[start : start + block_size]
        image_ids = torch.arange(start, start + block.shape[0], device=block.device)
        ranks.append(best_correct_rank(block @ text_features.T, targets[None, :] == image_ids[:, None]))
    return torch.cat(ranks)


def text_to_image_ranks(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    block_size: int = 1024,
) -> torch.Tensor:
    """For each caption, the rank of its image among all images, shape (M,).

    Arguments as in :func:`image_to_text_ranks`; memory holds a block_size × N similarity matrix.
    """
    _validate(image_features, text_features, text_to_image, block_size)
    targets = text_to_image.to(image_features.device)
    image_ids = torch.arange(image_features.shape[0], device=image_features.device)
    ranks = []
    for start in range(0, text_features.shape[0], block_size):
        block = text_features[start : start + block_size]
        correct = image_ids[None, :] == targets[start : start + block.shape[0], None]
        ranks.append(best_correct_rank(block @ image_features.T, correct))
    return torch.cat(ranks)


def rank_summary(ranks: torch.Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Recall@k in percent for each k, mean rank and median rank of 1-based ``ranks``, keys prefixed."""
    ranks = ranks.double()
    summary = {f"{prefix}R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in ks}
    summary[f"{prefix}mean_rank"] = ranks.mean().item()
    summary[f"{prefix}median_rank"] = torch.quantile(ranks, 0.5).item()
    return summary


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    block_size: int = 1024,
) -> dict[str, float]:
    """Image→text and text→image retrieval metrics with several captions per image.

    Image→text scores each image by its best-ranked correct caption; text→image scores each caption by the
    rank of its image. Ties are resolved pessimistically (see the module docstring).

    Args:
        image_features: Image embeddings (N, D).
        text_features: Caption embeddings (M, D).
        text_to_image: For each caption, the index of its image, shape (M,); every image needs a caption.
        ks: The cut-offs k of Recall@k.
        block_size: Rows of the similarity matrix held in memory at once.

    Returns:
        ``i2t_R@k`` and ``t2i_R@k`` (percent) for each k, ``i2t_mean_rank``, ``i2t_median_rank``,
        ``t2i_mean_rank``, ``t2i_median_rank`` (1-based), and ``rsum``, the sum of all the R@k.
    """
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    i2t = image_to_text_ranks(image_features, text_features, text_to_image, block_size=block_size)
    t2i = text_to_image_ranks(image_features, text_features, text_to_image, block_size=block_size)
    metrics = {**rank_summary(i2t, ks, "i2t_"), **rank_summary(t2i, ks, "t2i_")}
    metrics["rsum"] = sum(metrics[f"{direction}_R@{k}"] for direction in ("i2t", "t2i") for k in ks)
    return metrics


def _validate(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, block_size: int
) -> None:
    """Raise a ValueError naming the first problem with the retrieval inputs."""
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"{name} must have shape (n, D) with n > 0, got {tuple(features.shape)}")
        bad_rows = (~torch.isfinite(features)).any(dim=1).nonzero()
        if len(bad_rows):
            raise ValueError(f"{name} row {bad_rows[0].item()} contains NaN or infinity")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must have the same embedding dimension"
        )
    if text_to_image.shape != (text_features.shape[0],):
        raise ValueError(
            f"text_to_image must have shape ({text_features.shape[0]},), one image index per caption, "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype not in _INDEX_DTYPES:
        raise ValueError(f"text_to_image must hold integer indices, got dtype {text_to_image.dtype}")
    n_images = image_features.shape[0]
    out_of_range = ((text_to_image < 0) | (text_to_image >= n_images)).nonzero()
    if len(out_of_range):
        caption = out_of_range[0].item()
        raise ValueError(
            f"text_to_image[{caption}] = {text_to_image[caption].item()} is not an image index in [0, {n_images})"
        )
    uncaptioned = (torch.bincount(text_to_image.cpu(), minlength=n_images) == 0).nonzero()
    if len(uncaptioned):
        raise ValueError(f"image {uncaptioned[0].item()} has no caption in text_to_image")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
