"""Gradient methods over the shared feature store: featurize each checkpoint, solve its kernel, score.

:class:`StoredGradientMethod` runs the pipeline every gradient method shares (resumable, sharded over the
processes of a distributed job, one store per feature setting); a method says only which features it reads
(``feature_changes``), which kernel it solves per checkpoint (:meth:`StoredGradientMethod.checkpoint_kernel`) and
which loss weights it applies.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from cliptrace.attribution.base import DataAttributor, TrainingSide
from cliptrace.data.record import Record
from cliptrace.distributed import barrier, is_main
from cliptrace.trak.attribute import (LoadedCheckpoint, RecordBatches, data_fingerprint, feature_store,
                                      featurize_rows, load_checkpoint_featurizer, naming_records, target_store)
from cliptrace.trak.factored import FactoredFeaturizer
from cliptrace.trak.kfac import fit_statistics, load_statistics, save_statistics, stored_metadata, whitenings
from cliptrace.trak.scoring import EnsembleScorer, ScoringKernel, Rows
from cliptrace.trak.settings import AttributionSettings
from cliptrace.trak.store import FeatureStore


class StoredGradientMethod(DataAttributor, abc.ABC):
    """A method scoring with per-checkpoint kernels over stored gradient features (see the module docstring).

    Attributes:
        feature_changes: Settings this method's features override (e.g. no final projection).
        stores: After :meth:`prepare`, the feature store of each checkpoint's training features.
    """

    feature_changes: ClassVar[dict[str, Any]] = {}

    def __init__(self, settings: AttributionSettings = AttributionSettings()) -> None:
        super().__init__(settings)
        self.stores: list[FeatureStore] = []

    def feature_settings(self) -> AttributionSettings:
        """The settings of the features this method reads."""
        return self.settings.replace(**self.feature_changes)

    @abc.abstractmethod
    def checkpoint_kernel(self, store: FeatureStore, checkpoint: LoadedCheckpoint) -> ScoringKernel:
        """The kernel of one fully featurized checkpoint (called on rank 0)."""

    def loss_weights(self, stored: np.ndarray) -> Rows:
        """The loss weights the scores are multiplied by, from the stored Q (default: Q itself)."""
        return stored

    def _load(self, checkpoint_id: str, source: Any) -> LoadedCheckpoint:
        training, settings = self._training(), self.feature_settings()
        checkpoint = load_checkpoint_featurizer(checkpoint_id, source, training.records, training.loader, settings)
        if settings.whitening is not None:
            whiten_checkpoint(checkpoint, training, settings)
        return checkpoint

    def prepare(self, training: TrainingSide) -> None:
        self.training, settings = training, self.feature_settings()
        records, main = training.records, is_main(training.ranks)
        digest = data_fingerprint(records)
        kernels, features, loss_weights = [], [], []
        self.stores = []
        for checkpoint_id, source in training.checkpoints:
            checkpoint = self._load(checkpoint_id, source)
            store = feature_store(training.store_path(settings), len(records), digest, checkpoint.featurizer,
                                  settings, checkpoint_id)
            featurize_rows(store, checkpoint, records, range(len(records)), training.loader, settings,
                           f"Featurizing {checkpoint_id}", training.progress and main, training.ranks)
            if main:
                with naming_records(records):
                    kernels.append(self.checkpoint_kernel(store, checkpoint))
                    x, q = store.features(checkpoint_id)
                features.append(x)
                loss_weights.append(self.loss_weights(q))
            barrier(training.ranks)
            self.stores.append(store)
        self.scorer = EnsembleScorer(kernels, features, loss_weights) if main else None

    def target_features(self, targets: Sequence[Record]) -> list[Rows] | None:
        training = self._training()
        main, settings = is_main(training.ranks), self.feature_settings()
        position = {record.id: i for i, record in enumerate(training.records)}
        index = [position.get(record.id, -1) for record in targets]
        result = []
        for (checkpoint_id, source), store in zip(training.checkpoints, self.stores, strict=True):
            checkpoint = self._load(checkpoint_id, source)
            targets_store = target_store(store, list(targets), checkpoint.featurizer)
            featurize_rows(targets_store, checkpoint, targets, index, training.loader, settings,
                           f"Targets under {checkpoint_id}", training.progress and main, training.ranks)
            if main:
                with naming_records(targets):
                    result.append(targets_store.features(checkpoint_id)[0])
        return result if main else None


def whiten_checkpoint(checkpoint: LoadedCheckpoint, training: TrainingSide, settings: AttributionSettings) -> None:
    """Install the K-FAC / EK-FAC whitening of ``settings`` in ``checkpoint``'s featurizer.

    The statistics are fitted once per checkpoint on rank 0 (``settings.fit_records`` records of a seeded shuffle,
    every caption of each) and kept in the feature store (``whitening/CHECKPOINT.safetensors``, with the weights'
    and the data's digests); the other processes of a distributed job wait for them and read them.

    Raises:
        TypeError: The featurizer is not the factored one.
    """
    featurizer = checkpoint.featurizer
    if not isinstance(featurizer, FactoredFeaturizer):
        raise TypeError(f"whitening needs the factored featurizer, got {type(featurizer).__name__}")
    records = training.records
    digest = data_fingerprint(records)
    identity = {"kind": str(settings.whitening), "fit_records": str(settings.fit_records), "seed": str(settings.seed),
                "weights": featurizer.fingerprint(), "train_data": digest}
    featurizer.whitening = {"kind": settings.whitening, "damping": settings.damping, "fit_records": settings.fit_records}
    directory = training.store_path(settings)
    path = directory / "whitening" / f"{checkpoint.id}.safetensors"
    fitted = None
    if is_main(training.ranks) and stored_metadata(path) != identity:
        order = np.random.default_rng(settings.seed).permutation(len(records))
        positions = sorted(order[: settings.fit_records].tolist())
        batches = RecordBatches(checkpoint.model, records, training.loader, settings.batch_size)
        dtype = next(checkpoint.model.parameters()).dtype

        def fitting_batches() -> Iterator[tuple[Any, torch.Tensor]]:
            for chunk in batches.chunks(positions):
                images, tokens, owner = batches.pairs(chunk)
                batch = (images.to(settings.device, dtype), {k: v.to(settings.device) for k, v in tokens.items()})
                yield batch, torch.as_tensor(chunk)[owner].to(settings.device)

        fitted = fit_statistics(featurizer, fitting_batches, settings.whitening)
        featurizer.whiten(whitenings(fitted, float(settings.damping)), featurizer.whitening)
        # the store takes the whitened featurizer's settings (the whitening leaves raw parameters out), then the file
        feature_store(directory, len(records), digest, featurizer, settings, checkpoint.id)
        save_statistics(path, fitted, identity)
    barrier(training.ranks)
    if fitted is None:
        statistics = load_statistics(path, [layer.name for layer in featurizer.layers])
        featurizer.whiten(whitenings(statistics, float(settings.damping)), featurizer.whitening)
