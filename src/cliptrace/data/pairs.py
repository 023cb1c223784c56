"""A torch dataset of (image, caption) pairs and the collate function that tokenizes a batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cliptrace.data.images import ImageLoader, load_record_image
from cliptrace.data.record import Record

Pair = tuple[torch.Tensor, str, int]


class PairDataset(Dataset):
    """One item per record: its preprocessed image, one of its captions, and its index.

    With ``caption_choice="random"`` the caption of record ``i`` in epoch ``e`` is drawn by a generator seeded
    with ``(seed, e, i)``: reproducible, independent of the order items are fetched in, and different per epoch.
    Call :meth:`set_epoch` before each epoch (DataLoader workers that are not persistent pick it up).

    Args:
        records: The records to serve.
        transform: Maps a PIL image to a tensor (3, S, S), e.g. an :class:`~cliptrace.data.transforms.ImageTransform`.
        loader: Opens image references; a new :class:`ImageLoader` when None.
        caption_choice: ``random`` (seeded, per epoch) or ``first``.
        seed: Non-negative seed of the caption choice.
        cache_images: Keep each preprocessed image in memory after its first load.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        loader: ImageLoader | None = None,
        caption_choice: Literal["random", "first"] = "random",
        seed: int = 0,
        cache_images: bool = False,
    ) -> None:
        if caption_choice not in ("random", "first"):
            raise ValueError(f"caption_choice must be 'random' or 'first', not {caption_choice!r}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        self.records = list(records)
        self.transform = transform
        self.loader = loader if loader is not None else ImageLoader()
        self.caption_choice = caption_choice
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, torch.Tensor] | None = {} if cache_images else None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random captions are served."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def caption_index(self, index: int) -> int:
        """Which caption of record ``index`` is served in the current epoch."""
        count = len(self.records[index].captions)
        if self.caption_choice == "first" or count == 1:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(count))

    def pixels(self, index: int) -> torch.Tensor:
        """The preprocessed image of record ``index``; a bad image raises a DatasetError naming file and record id."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pixels = self.transform(load_record_image(self.loader, self.records[index]))
        if self._cache is not None:
            self._cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> Pair:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} is out of range for {len(self.records)} records")
        return self.pixels(index), self.records[index].captions[self.caption_index(index)], index


def _collate(batch: list[Pair], tokenize: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    pixels, captions, indices = zip(*batch)
    tokens = tokenize(list(captions))
    return {
        "pixel_values": torch.stack(pixels),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "index": torch.tensor(indices, dtype=torch.long),
    }


def make_collate(
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
) -> Callable[[list[Pair]], dict[str, torch.Tensor]]:
    """A DataLoader collate function: stacks images, tokenizes captions with ``tokenize``, keeps the indices.

    The batch is ``{"pixel_values": (B, 3, S, S), "input_ids": (B, L), "attention_mask": (B, L), "index": (B,)}``.
    """
    return functools.partial(_collate, tokenize=tokenize)
