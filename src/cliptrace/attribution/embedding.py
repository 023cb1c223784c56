"""CLIP-embedding similarity: ``cos(φ_i, φ_j) + cos(ψ_i, ψ_j)`` of the images and first captions under the
final checkpoint. No gradients: the baseline any gradient method should beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cliptrace.attribution.base import DataAttributor, TrainingSide
from cliptrace.data.record import Record
from cliptrace.distributed import is_main
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import load_model
from cliptrace.trak.scoring import EnsembleScorer, Rows, identity_kernel


class EmbeddingSimilarity(DataAttributor):
    """Image–image plus caption–caption cosine similarity under the last checkpoint of the ensemble."""

    name = "embedding"
    summary = "no gradients, seconds to compute: near-duplicates and look-alikes, not what the model learned from"

    def _model(self) -> DualEncoder:
        _, source = self._training().checkpoints[-1]
        model = source if isinstance(source, DualEncoder) else load_model(source)
        return model.to(self.settings.device).eval()

    @torch.no_grad()
    def _embeddings(self, model: DualEncoder, records: Sequence[Record]) -> torch.Tensor:
        """(len(records), 2d): unit image embedding, unit first-caption embedding, side by side."""
        images = embed_images(model, records, self._training().loader, device=self.settings.device)
        texts = embed_texts(model, [record.captions[0] for record in records], device=self.settings.device)
        return torch.cat([images, texts], 1).to(self.settings.torch_dtype).cpu()

    def prepare(self, training: TrainingSide) -> None:
        self.training = training
        if not is_main(training.ranks):
            return
        features = self._embeddings(self._model(), training.records)
        self.scorer = EnsembleScorer([identity_kernel(features, self.settings.torch_dtype)], [features],
                                     [np.ones(len(features), dtype=np.float64)])

    def target_features(self, targets: Sequence[Record]) -> list[Rows] | None:
        if not is_main(self._training().ranks):
            return None
        return [self._embeddings(self._model(), targets)]
