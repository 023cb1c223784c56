"""``TRAKer``: the six verbs of the ``traker`` library, on cliptrace's engine (CPU or GPU, exact, resumable).

Switching from ``traker`` is a change of import::

    from cliptrace.trak import TRAKer
    traker = TRAKer(model=model, task="clip", train_set_size=N, proj_dim=512, device="cpu")
    traker.task.get_embeddings(model, ds_train, batch_size=1, size=600, embedding_dim=1024,
                               preprocess_fn_img=..., preprocess_fn_txt=...)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for batch in loader_train:
        traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="clip", checkpoint=model.state_dict(), model_id=0, num_targets=M)
    for batch in loader_val:
        traker.score(batch=batch, num_samples=len(batch[0]))
    scores = traker.finalize_scores(exp_name="clip")      # (N, M) numpy array

Differences from ``traker`` 0.3.2, all deliberate: features and scores are float32 (``use_half_precision`` is
accepted for compatibility and ignored: half precision is slow on CPU and loses accuracy); the CLIP bank is drawn
uniformly and re-embedded under every loaded checkpoint; the ensemble is a plain mean (see
:mod:`cliptrace.trak.scoring`); scores stay correct when ``proj_dim`` exceeds the training-set size.
``gradient_computer``, ``saver``, ``score_computer`` and ``proj_max_batch_size`` are ``traker`` internals and
must be left at their defaults. Features come from the factored path by default (``features="exact"`` for the
reference path); pass ``featurizer=`` to plug in another one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cliptrace.files import create_npy_atomic
from cliptrace.models.base import check_weights_fit
from cliptrace.trak.batches import batch_size, map_batch, take_rows
from cliptrace.trak.factored import make_featurizer
from cliptrace.trak.features import ExactFeaturizer, Featurizer
from cliptrace.trak.outputs import ModelOutput, output_for_task
from cliptrace.trak.projection import Projector
from cliptrace.trak.scoring import EnsembleScorer, ScoringKernel, TopK
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings
from cliptrace.trak.store import FeatureStore, StoreMismatchError

log = logging.getLogger("cliptrace.trak")


class TRAKer:
    """TRAK data attribution with the ``traker`` API.

    Args:
        model: The model (any module the model-output function understands).
        task: ``"clip"``, ``"image_classification"`` or a :class:`~cliptrace.trak.outputs.ModelOutput`.
        train_set_size: Number of training examples.
        save_dir: Directory for features (``features/``), target features (``experiments/``) and ``scores/``.
        load_from_save_dir: Reuse features already in ``save_dir`` (resume); False refuses an existing store.
        device: Where gradients are computed (default: CUDA when available, else CPU).
        projector: A :class:`~cliptrace.trak.projection.Projector` to use instead of a dense one of ``proj_dim``.
        proj_dim: Feature dimension of the dense Rademacher projection; ``None`` means no projection.
        projector_seed: Seed of the projection.
        grad_wrt: Parameter names (or globs) to differentiate; default all trainable parameters.
        lambda_reg: Ridge term λ added to XᵀX (0, as in ``traker``); None: the relative ``damping``.
        featurizer: A ready :class:`~cliptrace.trak.features.Featurizer` (overrides projection arguments).
        features: The feature path: ``"factored"`` (hooks on linear-type layers, about the cost of a training step),
            ``"exact"`` (per-example gradients and a dense projection), or ``"auto"``: factored unless ``proj_dim``
            is None, a ``projector`` is given, or the task has no batched form (see :mod:`cliptrace.trak.factored`).
        score_dtype: dtype of the kernel solve (``torch.float32`` or ``torch.float64``).
        chunk_size: Examples per vectorized gradient call (bounds memory).
        method: A registered gradient method over the stored features (:data:`cliptrace.attribution.METHODS`:
            ``trak``, ``trak-layers`` with ``proj_dim=None`` on the factored path, ``tracin``, ``grad-cosine``).
        damping: The relative ridge term (λ = damping × mean diag(XᵀX)) when ``lambda_reg`` is None.
    """

    def __init__(
        self,
        model: nn.Module,
        task: str | ModelOutput,
        train_set_size: int,
        save_dir: str | Path = "./trak_results",
        load_from_save_dir: bool = True,
        device: str | torch.device | None = None,
        gradient_computer: Any = None,
        projector: Projector | None = None,
        saver: Any = None,
        score_computer: Any = None,
        proj_dim: int | None = 2048,
        logging_level: int = logging.INFO,
        use_half_precision: bool = True,
        proj_max_batch_size: int = 32,
        projector_seed: int = 0,
        grad_wrt: Iterable[str] | None = None,
        lambda_reg: float | None = 0.0,
        *,
        featurizer: Featurizer | None = None,
        score_dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        features: str = "auto",
        method: str = DEFAULT_METHOD,
        damping: float = AttributionSettings().damping,
    ) -> None:
        del use_half_precision, proj_max_batch_size  # see the module docstring
        for name, value in (("gradient_computer", gradient_computer), ("saver", saver),
                            ("score_computer", score_computer)):
            if value is not None:
                raise TypeError(f"{name} is a traker internal; cliptrace takes featurizer= instead")
        log.setLevel(logging_level)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.task = output_for_task(task)
        self.train_set_size = train_set_size
        self.lambda_reg = lambda_reg
        self.score_dtype = score_dtype
        self.save_dir = Path(save_dir)
        from cliptrace.attribution.registry import METHODS, make_method  # the methods import this package
        from cliptrace.attribution.stored import StoredGradientMethod

        self.method = make_method(method, AttributionSettings(
            lambda_reg=lambda_reg, damping=damping, score_dtype=_numpy_dtype(score_dtype), device=str(self.device)))
        if not isinstance(self.method, StoredGradientMethod):
            raise ValueError(f"method {method!r} does not score stored gradient features; TRAKer takes "
                             f"{', '.join(name for name, kind in METHODS.items() if issubclass(kind, StoredGradientMethod))}")
        self._kernels: dict[str, ScoringKernel] = {}
        parameters = None if grad_wrt is None else list(grad_wrt)
        if featurizer is None and projector is None:
            featurizer = make_featurizer(features, self.model, self.task, proj_dim=proj_dim, seed=projector_seed,
                                         parameters=parameters, chunk_size=chunk_size)
        elif featurizer is None:
            featurizer = ExactFeaturizer(self.model, self.task, proj_dim=None, seed=projector_seed,
                                         parameters=parameters, chunk_size=chunk_size)
            if projector.input_dim != featurizer.projector.input_dim:
                raise ValueError(f"projector expects {projector.input_dim} gradient entries, the selected "
                                 f"parameters have {featurizer.projector.input_dim}")
            featurizer.projector, featurizer.proj_dim = projector, projector.proj_dim
        self.featurizer = featurizer
        self.proj_dim = featurizer.proj_dim
        features_dir = self.save_dir / "features"
        if not load_from_save_dir and features_dir.exists():
            raise StoreMismatchError(f"{features_dir} exists and load_from_save_dir=False: choose another save_dir")
        self.store = FeatureStore(features_dir, train_set_size, self.proj_dim, featurizer.settings(),
                                  dtype=_numpy_dtype(score_dtype))
        self._checkpoint: str | None = None
        self._next_index = 0
        self._experiment: tuple[str, FeatureStore] | None = None
        self._next_target = 0

    # -- featurizing ---------------------------------------------------------------------------------------

    def _load(self, checkpoint: Mapping[str, torch.Tensor], model_id: int | str) -> str:
        check_weights_fit({name: tuple(value.shape) for name, value in self.model.state_dict().items()},
                          {name: tuple(value.shape) for name, value in checkpoint.items()},
                          f"checkpoint of model id {model_id!r}")
        self.model.load_state_dict(checkpoint)
        self.model.eval()
        self.task.prepare(self.model)
        return self.featurizer.fingerprint()

    def load_checkpoint(
        self, checkpoint: Mapping[str, torch.Tensor], model_id: int | str,
        _allow_featurizing_already_registered: bool = False,
    ) -> None:
        """Load a state dict and open (or resume) its features under ``model_id``."""
        del _allow_featurizing_already_registered  # resuming is always allowed; done rows are skipped
        self.store.add_checkpoint(str(model_id), self._load(checkpoint, model_id))
        self._checkpoint = str(model_id)
        self._next_index = 0

    def _indices(self, inds: Iterable[int] | None, num_samples: int | None, counter: str) -> np.ndarray:
        if (inds is None) == (num_samples is None):
            raise ValueError("give exactly one of inds and num_samples")
        if inds is not None:
            return np.asarray(inds, dtype=np.int64).reshape(-1)
        start = getattr(self, counter)
        setattr(self, counter, start + num_samples)
        return np.arange(start, start + num_samples)

    def _features(self, batch: Any, indices: np.ndarray | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
        batch = map_batch(lambda t: t.to(self.device), batch)
        index = torch.full((rows,), -1, dtype=torch.long) if indices is None else torch.as_tensor(indices)
        features, weights = self.featurizer.features(batch, index.to(self.device))
        return features.detach().cpu().numpy(), weights.detach().cpu().numpy()

    def featurize(self, batch: Any, inds: Iterable[int] | None = None, num_samples: int | None = None) -> None:
        """Compute and store features for a batch of training examples (rows already stored are skipped)."""
        if self._checkpoint is None:
            raise RuntimeError("load a checkpoint with load_checkpoint() before featurize()")
        indices = self.store.rows(self._indices(inds, num_samples, "_next_index"))
        if indices.size != batch_size(batch):
            raise ValueError(f"batch has {batch_size(batch)} examples but {indices.size} indices")
        todo = ~self.store.featurized(self._checkpoint)[indices]
        if not todo.any():
            return
        rows = np.flatnonzero(todo)
        features, weights = self._features(take_rows(batch, rows), indices[rows], rows.size)
        self.store.write(self._checkpoint, indices[rows], features, weights)

    def finalize_features(self, model_ids: Iterable[int | str] | None = None, del_grads: bool = False) -> None:
        """Solve the kernel of each (fully featurized) checkpoint: see :mod:`cliptrace.trak.scoring`."""
        del del_grads  # features are kept: self-influence reads them
        for checkpoint in self._checkpoint_ids(model_ids):
            self.store.features(checkpoint)  # complete and finite
            self._kernels[checkpoint] = self.method.checkpoint_kernel(self.store, self._loaded(checkpoint))

    def _loaded(self, checkpoint: str) -> Any:
        from cliptrace.trak.attribute import LoadedCheckpoint

        return LoadedCheckpoint(checkpoint, self.model, self.featurizer)

    def _finalized(self, checkpoint: str) -> bool:
        """Whether ``checkpoint``'s kernel was solved (by this instance, or stored by an earlier TRAK one)."""
        return checkpoint in self._kernels or (self.method.name == "trak" and self.store.kernel(
            checkpoint, self.method.settings.damping_spec()) is not None)

    def _kernel(self, checkpoint: str) -> ScoringKernel:
        if checkpoint not in self._kernels:
            self._kernels[checkpoint] = self.method.checkpoint_kernel(self.store, self._loaded(checkpoint))
        return self._kernels[checkpoint]

    def _checkpoint_ids(self, model_ids: Iterable[int | str] | None) -> list[str]:
        return self.store.checkpoint_ids() if model_ids is None else [str(m) for m in model_ids]

    # -- scoring -------------------------------------------------------------------------------------------

    def start_scoring_checkpoint(
        self, exp_name: str, checkpoint: Mapping[str, torch.Tensor], model_id: int | str, num_targets: int
    ) -> None:
        """Load the checkpoint of ``model_id`` and open the target features of experiment ``exp_name``."""
        fingerprint = self._load(checkpoint, model_id)
        if str(model_id) not in self.store.checkpoint_ids():
            raise KeyError(f"model id {model_id!r} was never featurized in {self.store.directory}")
        if self.store.fingerprint(str(model_id)) != fingerprint:
            raise StoreMismatchError(f"the checkpoint given for model id {model_id!r} differs from the one featurized")
        targets = FeatureStore(self.save_dir / "experiments" / exp_name, num_targets, self.proj_dim,
                               self.featurizer.settings(), dtype=self.store.dtype.name)
        targets.add_checkpoint(str(model_id), fingerprint)
        self._experiment = (str(model_id), targets)
        self._next_target = 0

    def score(self, batch: Any, inds: Iterable[int] | None = None, num_samples: int | None = None) -> None:
        """Compute and store the features of a batch of targets for the current experiment and checkpoint."""
        if self._experiment is None:
            raise RuntimeError("call start_scoring_checkpoint() before score()")
        checkpoint, targets = self._experiment
        if not self._finalized(checkpoint):
            raise RuntimeError(f"model id {checkpoint!r} is not finalized: call finalize_features() first")
        indices = self._indices(inds, num_samples, "_next_target")
        features, weights = self._features(batch, None, indices.size)
        targets.write(checkpoint, indices, features, weights)

    def _scorer(self, exp_name: str, model_ids: Iterable[int | str] | None, allow_skip: bool
                ) -> tuple[EnsembleScorer, list[np.ndarray], list[str]]:
        experiment_dir = self.save_dir / "experiments" / exp_name
        if not experiment_dir.is_dir():
            raise ValueError(f"experiment {exp_name!r} does not exist: run start_scoring_checkpoint() and score()")
        targets = FeatureStore.reopen(experiment_dir)
        kernels, train_features, loss_weights, target_features, used = [], [], [], [], []
        for checkpoint in self._checkpoint_ids(model_ids):
            ready = (self._finalized(checkpoint) and checkpoint in targets.checkpoint_ids()
                     and targets.is_complete(checkpoint))
            if not ready:
                if allow_skip:
                    log.warning("skipping model id %s: not finalized or targets not scored", checkpoint)
                    continue
                raise ValueError(f"model id {checkpoint!r} has no kernel or incomplete target features for "
                                 f"experiment {exp_name!r}")
            features, q = self.store.features(checkpoint)
            kernels.append(self._kernel(checkpoint))
            train_features.append(features)
            loss_weights.append(self.method.loss_weights(q))
            target_features.append(targets.features(checkpoint)[0])
            used.append(checkpoint)
        if not used:
            raise ValueError(f"no model id is ready to score experiment {exp_name!r}")
        return EnsembleScorer(kernels, train_features, loss_weights), target_features, used

    def finalize_scores(
        self, exp_name: str, model_ids: Iterable[int | str] | None = None, allow_skip: bool = False
    ) -> np.ndarray:
        """The (train_set_size, num_targets) score matrix, averaged over checkpoints.

        It is written to ``scores/EXP_NAME.npy`` a row block at a time and returned as a read-only memory map of
        that file.
        """
        scorer, targets, _ = self._scorer(exp_name, model_ids, allow_skip)
        path = self.save_dir / "scores" / f"{exp_name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        with create_npy_atomic(path, self.store.dtype, (scorer.train_size, len(targets[0]))) as scores:
            scorer.score(targets, out=scores)
        return np.load(path, mmap_mode="r")

    def top_k(self, exp_name: str, k: int = 10, model_ids: Iterable[int | str] | None = None) -> TopK:
        """Top-k proponents and opponents per target of ``exp_name``, without forming the score matrix."""
        scorer, targets, _ = self._scorer(exp_name, model_ids, allow_skip=False)
        return scorer.top_k(targets, k)

    def self_influence(self, model_ids: Iterable[int | str] | None = None) -> np.ndarray:
        """τ(z_i, z_i) for every training example, averaged over the (finalized) checkpoints."""
        ids = self._checkpoint_ids(model_ids)
        missing = [m for m in ids if not self._finalized(m)]
        if missing:
            raise ValueError(f"model ids {missing} are not finalized: call finalize_features() first")
        kernels, features, loss_weights = [], [], []
        for checkpoint in ids:
            x, q = self.store.features(checkpoint)
            kernels.append(self._kernel(checkpoint))
            features.append(x)
            loss_weights.append(self.method.loss_weights(q))
        return EnsembleScorer(kernels, features, loss_weights).self_influence().numpy()


def _numpy_dtype(dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"score_dtype must be torch.float32 or torch.float64, got {dtype}")
    return "float64" if dtype == torch.float64 else "float32"
