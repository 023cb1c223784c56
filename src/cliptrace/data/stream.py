"""Streamed WebDataset shards for training at a scale where the list of records does not fit in memory.

Each reader — one DataLoader worker of one process — reads whole shards, one at a time, holding only the records of
the shard it is reading. In every epoch the shards are shuffled (seeded by the epoch) and dealt round-robin to the
``ranks × workers`` readers, so there must be at least as many shards as readers: with fewer, some readers would get
none, and a data-parallel job whose ranks run out of data at different times hangs in its collectives.
:func:`check_shard_split` refuses that up front. Every reader also yields a fixed number of whole batches per epoch
(the epoch's ``samples // global batch`` steps, dealt over the workers), going round its shards again if they hold
fewer samples, so every rank takes the same number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from cliptrace.data.images import ImageLoader, load_record_image
from cliptrace.data.readers import list_shards, read_webdataset
from cliptrace.data.record import DatasetError, Record

StreamPair = tuple[torch.Tensor, str, int]  # pixels, caption, sample number


def check_shard_split(shards: int, ranks: int, workers: int) -> None:
    """Refuse a job with fewer shards than readers (``ranks × max(workers, 1)``).

    Raises:
        ValueError: Naming the counts and what to change.
    """
    readers = ranks * max(workers, 1)
    if shards < readers:
        raise ValueError(
            f"{shards} shard(s) cannot feed {ranks} process(es) × {max(workers, 1)} DataLoader worker(s) = {readers} "
            "readers: each reader streams whole shards, and one without any would leave its process short of data "
            "(a data-parallel job then hangs). Use more, smaller shards, fewer --num-workers, or train without "
            "--stream (shards are then read by offset, with no such limit)."
        )


@dataclass
class ShardIndex:
    """The shards of a WebDataset and how many samples of the training split each holds.

    Attributes:
        shards: Shard paths, sorted.
        counts: Training samples per shard.
        held_out: Records of the other splits (e.g. the evaluation split), which are few and kept in memory.
    """

    shards: list[Path]
    counts: list[int]
    held_out: list[Record] = field(default_factory=list)

    @classmethod
    def scan(cls, path: str | Path, train_split: str) -> ShardIndex:
        """Read every shard's metadata once (captions, not images), one shard in memory at a time."""
        shards, counts, held_out = list_shards(path), [], []
        for shard in shards:
            records = read_webdataset(shard)
            counts.append(sum(record.split == train_split for record in records))
            held_out.extend(record for record in records if record.split != train_split)
        return cls(shards, counts, held_out)

    @property
    def samples(self) -> int:
        """Training samples in all shards."""
        return sum(self.counts)

    def captions(self, train_split: str, limit: int) -> list[str]:
        """Captions of the first training samples, up to ``limit`` (e.g. to train a tokenizer on)."""
        captions: list[str] = []
        for shard in self.shards:
            for record in read_webdataset(shard):
                if record.split == train_split:
                    captions.extend(record.captions)
                if len(captions) >= limit:
                    return captions[:limit]
        return captions


class ShardRecords(Sequence[Record]):
    """The training records of a :class:`ShardIndex` as a sequence, read one shard at a time.

    Record ``i`` is the ``i``-th training sample in shard order, as in ``select_split(load_records(path), split)``,
    but only the records of the last shard read are held in memory: reading in order touches each shard once (TRAK
    featurization reads its rows in order); a random read costs one shard's metadata.

    Raises:
        DatasetError: (on reading) A shard no longer holds the training samples it held when it was scanned.
    """

    def __init__(self, index: ShardIndex, train_split: str) -> None:
        self.index, self.train_split = index, train_split
        self._starts = np.cumsum([0, *index.counts])
        self._held: tuple[int, list[Record]] = (-1, [])

    def __len__(self) -> int:
        return self.index.samples

    def __getitem__(self, position: int) -> Record:  # type: ignore[override]
        if not isinstance(position, (int, np.integer)):
            raise TypeError(f"ShardRecords takes one integer position, not {type(position).__name__}")
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"record {position} is out of range for {len(self)} records")
        shard = int(np.searchsorted(self._starts, position, side="right")) - 1
        return self._records(shard)[position - int(self._starts[shard])]

    def _records(self, shard: int) -> list[Record]:
        if self._held[0] != shard:
            path = self.index.shards[shard]
            records = [record for record in read_webdataset(path) if record.split == self.train_split]
            if len(records) != self.index.counts[shard]:
                raise DatasetError(str(path), None, f"holds {len(records)} samples of split {self.train_split!r}, "
                                                    f"not the {self.index.counts[shard]} it held when scanned")
            self._held = (shard, records)
        return self._held[1]


class ShardStream(IterableDataset):
    """The training samples of a :class:`ShardIndex` as ``(pixels, caption, position)``, streamed shard by shard.

    Args:
        index: The shards and their sample counts.
        transform: Maps a PIL image to a tensor (3, S, S).
        train_split: The split streamed.
        rank: This process's rank.
        world: Number of processes.
        batch_size: Samples per batch in each process (the global batch over ``world``).
        seed: Seed of the shard order and the caption choice.

    Each item is ``(pixels, caption, sample)``; ``sample`` numbers the training samples of the whole dataset in
    shard order (the shard's first sample is the sum of the counts of the shards before it).
    """

    def __init__(self, index: ShardIndex, transform: Callable[[Image.Image], torch.Tensor], *, train_split: str,
                 rank: int, world: int, batch_size: int, seed: int = 0) -> None:
        self.index, self.transform, self.train_split = index, transform, train_split
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its shard order and captions."""
        self.epoch = epoch

    def steps(self) -> int:
        """Batches each process takes per epoch: the global batches the training samples fill."""
        return self.index.samples // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[StreamPair]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        check_shard_split(len(self.index.shards), self.world, workers)
        reader, readers = self.rank * workers + worker, self.world * workers
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.index.shards))
        mine = [int(shard) for shard in order[reader::readers]]
        batches = self.steps() // workers + (worker < self.steps() % workers)
        yield from self._samples(mine, batches * self.batch_size)

    def _samples(self, shards: list[int], quota: int) -> Iterator[StreamPair]:
        """``quota`` samples from ``shards`` in turn, going round them again when they hold fewer."""
        loader, served, first = ImageLoader(), 0, np.cumsum([0, *self.index.counts])
        if quota and not any(self.index.counts[shard] for shard in shards):
            raise ValueError(f"shards {[str(self.index.shards[shard]) for shard in shards]} hold no samples of "
                             f"split {self.train_split!r}")
        while served < quota:
            for shard in shards:
                records = [record for record in read_webdataset(self.index.shards[shard])
                           if record.split == self.train_split]
                for offset, record in enumerate(records):
                    if served == quota:
                        return
                    sample = int(first[shard]) + offset
                    choice = np.random.default_rng([self.seed, self.epoch, sample]).integers(len(record.captions))
                    yield self.transform(load_record_image(loader, record)), record.captions[choice], sample
                    served += 1
