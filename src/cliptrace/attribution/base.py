"""The data-attribution method interface: a :class:`DataAttributor` scores targets against training records.

A method is prepared once on the training side (:meth:`DataAttributor.prepare`: featurize, solve), then answers
for any targets: the full score matrix, top-k proponents and opponents, and the self-influence of every training
record. Gradient methods share the on-disk feature store (:mod:`cliptrace.attribution.stored`); the others keep
what they need in memory. Scores are ``(n_train × n_targets)``: entry (i, j) says how much training record i raises
target j's model output.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from cliptrace.data.images import ImageLoader
from cliptrace.data.record import Record
from cliptrace.distributed import Ranks, is_main
from cliptrace.trak.attribute import Attribution
from cliptrace.trak.scoring import EnsembleScorer, Rows, TopK
from cliptrace.trak.settings import AttributionSettings


@dataclass
class TrainingSide:
    """What a method is prepared on: the checkpoints of the ensemble and the training records.

    Attributes:
        checkpoints: ``(id, model or model directory)`` per checkpoint, oldest first.
        records: The training records, in score-row order.
        store_root: Where the feature stores of the run live (one folder per feature setting), or None for an
            explicit ``store_dir``.
        store_dir: An explicit feature-store directory (used as it is), or None.
        loader: Reads the records' images.
        progress: Show progress bars (rank 0 only).
        ranks: The processes of a distributed job, or None.
    """

    checkpoints: list[tuple[str, Any]]
    records: Sequence[Record]
    store_root: Path | None = None
    store_dir: Path | None = None
    loader: ImageLoader = field(default_factory=ImageLoader)
    progress: bool = False
    ranks: Ranks | None = None

    def store_path(self, settings: AttributionSettings) -> Path:
        """The feature store for ``settings``: the explicit one, else the root's folder of that feature setting."""
        if self.store_dir is not None:
            return self.store_dir
        if self.store_root is None:
            raise ValueError("no feature store directory: give store_dir")
        return self.store_root / settings.store_name()


class DataAttributor(abc.ABC):
    """One data-attribution method (one class per method; registered in :mod:`cliptrace.attribution.registry`).

    Subclasses set ``name`` and ``summary`` (one line: when to use it) and implement :meth:`prepare` (which must
    set ``self.scorer`` on rank 0) and :meth:`target_features`.

    Args:
        settings: The attribution settings (features, damping, device, ...).
    """

    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, settings: AttributionSettings = AttributionSettings()) -> None:
        self.settings = settings
        self.scorer: EnsembleScorer | None = None
        self.training: TrainingSide | None = None
        self.notes: dict[str, Any] = {}

    @abc.abstractmethod
    def prepare(self, training: TrainingSide) -> None:
        """Compute and solve what the scores need on the training side; set ``self.scorer`` (on rank 0)."""

    @abc.abstractmethod
    def target_features(self, targets: Sequence[Record]) -> list[Rows] | None:
        """Per ensemble member, the targets' features that ``self.scorer`` scores (None on ranks other than 0)."""

    def _ready(self) -> EnsembleScorer:
        if self.scorer is None or self.training is None:
            raise RuntimeError(f"{self.name}: call prepare() first (on rank 0 of a distributed job)")
        return self.scorer

    def excluded(self, targets: Sequence[Record]) -> torch.Tensor | None:
        """Per target, its own training index (left out of its top-k lists), or −1; None when no target trains."""
        position = {record.id: i for i, record in enumerate(self._training().records)}
        index = [position.get(record.id, -1) for record in targets]
        return torch.as_tensor(index) if index and max(index) >= 0 else None

    def _training(self) -> TrainingSide:
        if self.training is None:
            raise RuntimeError(f"{self.name}: call prepare() first")
        return self.training

    def score(self, targets: Sequence[Record]) -> np.ndarray | None:
        """The (n_train × n_targets) score matrix (None on ranks other than 0)."""
        features = self.target_features(targets)
        return None if features is None else self._ready().score(features).numpy()

    def top_k(self, targets: Sequence[Record], k: int) -> TopK | None:
        """The k strongest proponents and opponents per target, never the target itself (None off rank 0)."""
        features = self.target_features(targets)
        return None if features is None else self._ready().top_k(features, k, exclude=self.excluded(targets))

    def self_influence(self) -> np.ndarray | None:
        """(n_train,) the score of each training record for itself (None on ranks other than 0)."""
        if not is_main(self._training().ranks):
            return None
        return self._ready().self_influence().numpy()

    def attribution(self, targets: Sequence[Record], top_k: int = 10, full_scores: bool = True) -> Attribution | None:
        """Top-k tables, self-influence and (with ``full_scores``) the score matrix of ``targets``, from one
        featurization of them (None on ranks other than 0)."""
        features = self.target_features(targets)
        if features is None:
            return None
        scorer, training = self._ready(), self._training()
        return Attribution(
            train=list(training.records), targets=list(targets),
            top=scorer.top_k(features, top_k, exclude=self.excluded(targets)),
            self_influence=scorer.self_influence().numpy(),
            scores=scorer.score(features).numpy() if full_scores else None,
            checkpoints=[checkpoint_id for checkpoint_id, _ in training.checkpoints],
            method=self.name, notes=dict(self.notes),
        )
