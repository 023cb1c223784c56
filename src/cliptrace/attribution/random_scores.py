"""Random scores: the floor every method must beat (its LDS is 0 in expectation).

Each record gets a seeded standard-normal vector of :data:`DIM` entries, drawn from its id and the seed, and a
score is the dot product of two such vectors divided by √DIM: the same record always gets the same vector, so
the scores do not depend on the order or batching of the records.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from cliptrace.attribution.base import DataAttributor, TrainingSide
from cliptrace.data.record import Record
from cliptrace.distributed import is_main
from cliptrace.trak.scoring import EnsembleScorer, Rows, identity_kernel

DIM = 256


class RandomScores(DataAttributor):
    """Seeded random scores, one reproducible vector per record id."""

    name = "random"
    summary = "a control: any method worth using must beat it"

    def _vectors(self, records: Sequence[Record]) -> torch.Tensor:
        rows = [np.random.default_rng([self.settings.seed, zlib.crc32(record.id.encode())]).standard_normal(DIM)
                for record in records]
        return torch.from_numpy(np.stack(rows) / math.sqrt(math.sqrt(DIM))).to(self.settings.torch_dtype)

    def prepare(self, training: TrainingSide) -> None:
        self.training = training
        if is_main(training.ranks):
            features = self._vectors(training.records)
            self.scorer = EnsembleScorer([identity_kernel(features, self.settings.torch_dtype)], [features],
                                         [np.ones(len(features), dtype=np.float64)])

    def target_features(self, targets: Sequence[Record]) -> list[Rows] | None:
        return [self._vectors(targets)] if is_main(self._training().ranks) else None
