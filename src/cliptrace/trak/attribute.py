"""One call from a training run to attributions: ``attribute(run, train_records, target_records)``.

A training example is a record: an image with one or more captions. Its features are the mean of the features of
its (image, caption) pairs — the gradient of the expected model output over the caption the training loop samples —
and its loss weight is the mean of theirs. The negative bank pairs each bank image with its first caption.
Targets that are themselves training records (same id) are excluded from their own bank and top-k lists.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.progress import track

from cliptrace.data.images import ImageLoader, load_record_image
from cliptrace.data.options import DataOptions
from cliptrace.data.policy import BadSamplePolicy
from cliptrace.data.readers import select_split
from cliptrace.data.record import Record
from cliptrace.distributed import Ranks, barrier, is_main, shard_of
from cliptrace.files import atomic_file, remove_temporaries, write_json
from cliptrace.models.base import DualEncoder
from cliptrace.models.directory import load_model
from cliptrace.notices import CliptraceWarning
from cliptrace.train.checkpoint import list_checkpoints
from cliptrace.train.config import run_data_options
from cliptrace.trak.factored import make_featurizer
from cliptrace.trak.features import Featurizer
from cliptrace.trak.outputs import output_for_objective
from cliptrace.trak.scoring import TopK
from cliptrace.trak.settings import AttributionSettings, default_store_root
from cliptrace.trak.store import FeatureStore, NonFiniteFeaturesError, StoreDamagedError, StoreMismatchError

if TYPE_CHECKING:
    from cliptrace.attribution.base import DataAttributor

ModelSource = DualEncoder | str | Path


@dataclass
class Attribution:
    """Scores of targets against training records, their top-k tables and training self-influence.

    Attributes:
        train: Training records, in score-row order.
        targets: Target records, in score-column order.
        top: Top-k proponents/opponents per target (training positions into ``train``).
        self_influence: (n,) self-influence of each training record.
        scores: (n, t) score matrix, or None when only top-k was asked for.
        checkpoints: Ids of the checkpoints in the ensemble.
        method: The registered name of the method that scored them.
        notes: What the method chose on its own, per checkpoint (e.g. TRAK's ridge term).
    """

    train: list[Record]
    targets: list[Record]
    top: TopK
    self_influence: np.ndarray
    scores: np.ndarray | None = None
    checkpoints: list[str] = field(default_factory=list)
    method: str = "trak"
    notes: dict[str, Any] = field(default_factory=dict)

    def top_k_rows(self) -> list[dict[str, Any]]:
        """One row per (target, kind, rank): ids, captions and image paths of the target and the training record."""
        rows = []
        for column, target in enumerate(self.targets):
            for kind, indices, values in (("proponent", self.top.proponents, self.top.proponent_scores),
                                          ("opponent", self.top.opponents, self.top.opponent_scores)):
                for rank, (index, score) in enumerate(zip(indices[column].tolist(), values[column].tolist()), 1):
                    record = self.train[index]
                    rows.append({
                        "target_id": target.id, "target_caption": target.captions[0], "target_image": target.image,
                        "kind": kind, "rank": rank, "train_index": index, "train_id": record.id,
                        "train_caption": record.captions[0], "train_image": record.image, "score": score,
                    })
        return rows

    def self_influence_rows(self) -> list[dict[str, Any]]:
        """Training records by decreasing self-influence."""
        order = np.argsort(-self.self_influence, kind="stable")
        return [{"rank": rank, "train_index": int(i), "train_id": self.train[i].id,
                 "train_caption": self.train[i].captions[0], "train_image": self.train[i].image,
                 "self_influence": float(self.self_influence[i])} for rank, i in enumerate(order, 1)]

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``topk.csv``, ``topk.json``, ``self_influence.csv``, ``scores.npy`` (when present) and ``ids.json``.

        Every file is first written under a temporary name; only when all are written (so a full disk leaves the
        earlier outputs as they were) is ``ids.json`` removed, the files renamed into place and ``ids.json``
        renamed last: a folder that holds ``ids.json`` holds a complete, consistent set. A ``scores.npy`` of an
        earlier run is removed when there are no scores. The temporaries of these files that a killed save left are
        removed first.
        """
        directory = Path(directory)
        top_rows = self.top_k_rows()
        names = ("ids.json", "topk.csv", "self_influence.csv", "topk.json", "scores.npy")
        if directory.is_dir():
            remove_temporaries(directory, names=names)  # what a save killed before its renames left
        with ExitStack() as renames:
            files = {name: renames.enter_context(atomic_file(directory / name))
                     for name in ("ids.json", "topk.csv", "self_influence.csv", "topk.json")}
            write_json(files["ids.json"], {"train": [r.id for r in self.train],
                                           "targets": [r.id for r in self.targets], "checkpoints": self.checkpoints,
                                           "method": self.method, "notes": self.notes})
            _write_csv(files["topk.csv"], top_rows)
            _write_csv(files["self_influence.csv"], self.self_influence_rows())
            files["topk.json"].write_text(json.dumps(top_rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            if self.scores is not None:
                files["scores.npy"] = renames.enter_context(atomic_file(directory / "scores.npy"))
                np.save(files["scores.npy"], self.scores)
            (directory / "ids.json").unlink(missing_ok=True)
            if self.scores is None:
                (directory / "scores.npy").unlink(missing_ok=True)
        return [directory / name for name in ("topk.csv", "self_influence.csv", "topk.json", "scores.npy", "ids.json")
                if name in files]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        if rows:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


# --- inputs --------------------------------------------------------------------------------------------------


def read_records(
    data: Sequence[Record] | str | Path, split: str | None, on_bad_sample: str | BadSamplePolicy = "fail",
    data_options: DataOptions | None = None,
) -> Sequence[Record]:
    """Records from a list (used as given) or a dataset path (only ``split``, when given); an error if none.

    Args:
        data: Records, or a dataset path. A sequence of records (e.g. streamed
            :class:`~cliptrace.data.stream.ShardRecords`) is used as it is, not read into a list.
        split: The split of a dataset path to keep; None keeps every record.
        on_bad_sample: For a path: ``"fail"`` on the first bad sample, or ``"skip"`` bad samples (broken rows, records
            whose image does not decode) with one warning that counts them; a :class:`BadSamplePolicy` collects
            them instead (see :mod:`cliptrace.data.policy`). Training runs the same checks, so the same dataset
            and split give the records a run with the same policy trained on.
        data_options: How a dataset path is read (format, image root, separator, keys); the defaults when None.
    """
    policy = on_bad_sample if isinstance(on_bad_sample, BadSamplePolicy) else BadSamplePolicy(on_bad_sample)
    if isinstance(data, (str, Path)):
        records = policy.screen(select_split(policy.load(data, data_options), split))
        if not records:
            raise ValueError(f"{data}: no records" + (f" in split {split!r}" if split else ""))
        if policy is not on_bad_sample and policy.skipped:
            warnings.warn(f"{data}: {policy.summary(None)}", CliptraceWarning, stacklevel=2)
        return records
    records = data if isinstance(data, Sequence) else list(data)  # a sequence (e.g. streamed records) as given
    if not records:
        raise ValueError("no records given")
    return records


def source_data_options(model: ModelSource, data_options: DataOptions | None) -> DataOptions | None:
    """For a training run directory, the options it was trained with, those set in ``data_options`` taking over (as
    on the command line); else ``data_options``."""
    return data_options if isinstance(model, DualEncoder) else run_data_options(model, data_options)


def resolve_checkpoints(source: ModelSource, checkpoints: int | Sequence[str | Path] | None) -> list[tuple[str, Any]]:
    """``(id, model or model directory)`` for each checkpoint of the ensemble.

    Args:
        source: A DualEncoder, a model directory, or a training-run directory from ``cliptrace train``.
        checkpoints: For a run: ``None`` (all of its checkpoints), an int K (its last K), or checkpoint
            names (of this run) and checkpoint directories (of any run, e.g. independently seeded ones, under
            distinct directory names). Ignored for a single model.
    """
    if isinstance(source, DualEncoder):
        return [("model", source)]
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such model or run directory")
    available = list_checkpoints(source)
    if not available:
        if (source / "model").is_dir():
            return [("model", source / "model")]
        return [(source.name, source)]
    if checkpoints is None:
        chosen = available
    elif isinstance(checkpoints, int):
        if checkpoints < 1:
            raise ValueError(f"checkpoints must be at least 1, got {checkpoints}")
        chosen = available[-checkpoints:]
    else:
        by_name = {path.name: path for path in available}
        chosen = []
        for item in checkpoints:
            path = Path(item)
            if len(path.parts) > 1 and path.is_dir():  # a checkpoint directory, possibly of another run
                chosen.append(path)
            elif path.name in by_name:
                chosen.append(by_name[path.name])
            else:
                raise FileNotFoundError(f"checkpoint {item!r} not found in {source / 'checkpoints'} "
                                        f"(have {', '.join(by_name)})")
    names = [path.name for path in chosen]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"checkpoints share the name {repeated[0]!r}; the ensemble keys features by directory "
                         "name, so give checkpoints of different runs distinct names (e.g. links)")
    return [(path.name, path) for path in chosen]


def data_fingerprint(records: Sequence[Record]) -> str:
    """A digest of the records' ids, images and captions (ties a feature store to its training set)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.id, record.image, list(record.captions)]).encode())
    return digest.hexdigest()[:16]


# --- featurizing records -------------------------------------------------------------------------------------


class RecordBatches:
    """Preprocessed, tokenized batches of records for one model."""

    def __init__(self, model: DualEncoder, records: Sequence[Record], loader: ImageLoader, batch_size: int) -> None:
        self.model, self.records, self.loader, self.batch_size = model, records, loader, batch_size

    def pairs(self, positions: Sequence[int], first_caption_only: bool = False
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(images, tokens, owner)``: one row per (record, caption); ``owner`` is the row's position in ``positions``."""
        images, captions, owner = [], [], []
        for slot, position in enumerate(positions):
            record = self.records[position]
            pixels = self.model.preprocess(load_record_image(self.loader, record))
            for caption in record.captions[:1] if first_caption_only else record.captions:
                images.append(pixels)
                captions.append(caption)
                owner.append(slot)
        return torch.stack(images), self.model.tokenize(captions), torch.tensor(owner)

    def chunks(self, positions: Sequence[int]) -> Iterator[list[int]]:
        """``positions`` cut into batches of at most ``batch_size`` records."""
        positions = list(positions)
        for start in range(0, len(positions), self.batch_size):
            yield positions[start : start + self.batch_size]


def record_features(
    featurizer: Featurizer, batches: RecordBatches, positions: Sequence[int], train_index: Sequence[int], device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and loss weights of the records ``positions``: means over each record's captions."""
    images, tokens, owner = batches.pairs(positions)
    index = torch.as_tensor([train_index[slot] for slot in owner.tolist()])
    dtype = next(featurizer.module.parameters()).dtype
    batch = (images.to(device, dtype), {key: value.to(device) for key, value in tokens.items()})
    features, weights = featurizer.features(batch, index.to(device))
    counts = torch.bincount(owner, minlength=len(positions)).to(features)
    summed = torch.zeros(len(positions), features.shape[1], dtype=features.dtype, device=features.device)
    summed.index_add_(0, owner.to(features.device), features)
    mean_weights = torch.zeros(len(positions), dtype=weights.dtype, device=weights.device)
    mean_weights.index_add_(0, owner.to(weights.device), weights)
    return (summed / counts[:, None]).cpu(), (mean_weights / counts).cpu()


@dataclass
class LoadedCheckpoint:
    """One checkpoint, loaded: its model and featurizer."""

    id: str
    model: DualEncoder
    featurizer: Featurizer


def load_checkpoint_featurizer(
    checkpoint_id: str, source: Any, train: Sequence[Record], loader: ImageLoader, settings: AttributionSettings
) -> LoadedCheckpoint:
    model = source if isinstance(source, DualEncoder) else load_model(source)
    model = model.to(settings.device).eval()
    if settings.torch_dtype == torch.float64:
        model = model.double()
    output = output_for_objective(model.objective, bank_size=settings.bank_size, seed=settings.seed)
    batches = RecordBatches(model, train, loader, settings.batch_size)

    def bank_batches(indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
        for chunk in batches.chunks(indices.tolist()):
            images, tokens, owner = batches.pairs(chunk, first_caption_only=True)
            tokens = {key: value.to(settings.device) for key, value in tokens.items()}
            yield images.to(settings.device, settings.torch_dtype), tokens, torch.as_tensor(chunk)[owner]

    if model.objective.uses_bank:
        output.set_bank_source(len(train), bank_batches)
    featurizer = make_featurizer(settings.features, model, output, proj_dim=settings.proj_dim,
                                 projection=settings.projection, seed=settings.seed, parameters=settings.parameters,
                                 layer_dim=settings.layer_dim, other_parameters=settings.other_parameters)
    output.prepare(model)
    return LoadedCheckpoint(checkpoint_id, model, featurizer)


@contextmanager
def naming_records(records: Sequence[Record]) -> Iterator[None]:
    """Add the record ids of the rows a :class:`StoreDamagedError` lost to its message (row i is ``records[i]``)."""
    try:
        yield
    except StoreDamagedError as error:
        if not error.rows:
            raise
        ids = ", ".join(records[row].id for row in error.rows[:5]) + (", ..." if len(error.rows) > 5 else "")
        raise StoreDamagedError(f"{error} (record ids {ids})", error.rows) from None


def feature_store(directory: Path, train_size: int, train_digest: str, featurizer: Featurizer,
           settings: AttributionSettings, checkpoint_id: str) -> FeatureStore:
    """The feature store of the training set (``train_digest``: its :func:`data_fingerprint`), refusing one made
    with other settings than those of ``checkpoint_id``'s ``featurizer``."""
    store_settings = {**featurizer.settings(), "train_data": train_digest, "lambda_reg": settings.lambda_reg}
    try:
        return FeatureStore(directory, train_size, featurizer.proj_dim, store_settings, dtype=settings.score_dtype)
    except StoreMismatchError as error:
        raise StoreMismatchError(f"checkpoint {checkpoint_id!r}: {error}") from None


def target_store(store: FeatureStore, targets: list[Record], featurizer: Featurizer) -> FeatureStore:
    """The store of the target features, ``STORE/targets/DIGEST`` (DIGEST of the target records)."""
    digest = data_fingerprint(targets)
    settings = {**featurizer.settings(), "train_data": store.settings["train_data"], "target_data": digest}
    return FeatureStore(store.directory / "targets" / digest, len(targets), featurizer.proj_dim, settings,
                        dtype=store.dtype.name)


def featurize_rows(store: FeatureStore, checkpoint: LoadedCheckpoint, records: Sequence[Record],
                    train_index: Sequence[int], loader: ImageLoader, settings: AttributionSettings, description: str,
                    progress: bool, ranks: Ranks | None) -> None:
    """Featurize the rows of ``store`` still missing under ``checkpoint``, batch by batch (row i is ``records[i]``,
    ``train_index[i]`` its training index or -1), holding them so no other process writes them meanwhile.

    Rows are computed in fixed batches, rows ``[b·batch_size, (b + 1)·batch_size)`` (the missing ones of them), so
    a row is computed in the same batch however the job is split or resumed: float32 results do not depend on it.
    In a distributed job each process does its shard of the rows (:func:`~cliptrace.trak.store.shard_rows`, on
    batch boundaries), and all of them wait for each other at the end."""
    store.add_checkpoint(checkpoint.id, checkpoint.featurizer.fingerprint())
    rows = store.claim(checkpoint.id, shard_of(ranks), align=settings.batch_size)
    try:
        batches = RecordBatches(checkpoint.model, records, loader, settings.batch_size)
        with naming_records(records):
            missing = store.missing(checkpoint.id, rows)
        batch_starts = np.flatnonzero(np.diff(missing // settings.batch_size)) + 1
        chunks = [block.tolist() for block in np.split(missing, batch_starts) if block.size]
        for chunk in track(chunks, description=description, disable=not progress or not chunks):
            features, weights = record_features(checkpoint.featurizer, batches, chunk,
                                                [train_index[i] for i in chunk], settings.device)
            try:
                store.write(checkpoint.id, np.asarray(chunk), features.numpy(), weights.numpy())
            except NonFiniteFeaturesError as error:
                raise ValueError(f"{error}: record id(s) {[records[i].id for i in error.rows[:5]]}") from None
    finally:
        store.release(checkpoint.id)
    barrier(ranks)


def _training_side(model: ModelSource, train: Sequence[Record], checkpoints: int | Sequence[str | Path] | None,
                   store_dir: str | Path | None, progress: bool, ranks: Ranks | None) -> Any:
    """The :class:`~cliptrace.attribution.base.TrainingSide` of ``model``'s checkpoints: its stores go to
    ``store_dir`` when given, else under ``RUN/trak/features`` for a run (one folder per feature setting), else
    under a new temporary directory."""
    from cliptrace.attribution.base import TrainingSide

    sources = resolve_checkpoints(model, checkpoints)
    run = None if isinstance(model, DualEncoder) else Path(model)
    root = None
    if store_dir is None:
        if run is not None and list_checkpoints(run):
            root = default_store_root(run)
        elif shard_of(ranks) is not None:
            raise ValueError("a distributed attribution needs a store_dir that every process shares")
        else:
            root = Path(tempfile.mkdtemp(prefix="cliptrace-trak-"))
    return TrainingSide(sources, train, store_root=root, store_dir=None if store_dir is None else Path(store_dir),
                        progress=progress and is_main(ranks), ranks=ranks)


def featurize(
    model: ModelSource,
    train: Sequence[Record] | str | Path,
    *,
    method: str = "trak",
    settings: AttributionSettings = AttributionSettings(),
    store_dir: str | Path | None = None,
    checkpoints: int | Sequence[str | Path] | None = None,
    train_split: str | None = "train",
    progress: bool = False,
    on_bad_sample: str | BadSamplePolicy = "fail",
    ranks: Ranks | None = None,
    data_options: DataOptions | None = None,
) -> DataAttributor:
    """Prepare ``method`` on the training set: featurize it under every checkpoint (resuming whatever the store
    holds already) and solve the kernels; returns the prepared method (see :mod:`cliptrace.attribution`).

    ``on_bad_sample`` applies to a dataset path ``train``, as in :func:`read_records`. With ``ranks`` (e.g. a
    launched :class:`~lightning.fabric.Fabric`, see :mod:`cliptrace.distributed`) every process of the job calls
    this, each featurizes its shard of the rows into the shared store, and rank 0 solves the kernels; the store is
    the one a single process would write. ``data_options`` reads a dataset path ``train``: for a training run
    directory ``model``, its options with those set here taking over (see :func:`source_data_options`).
    ``store_dir`` is the feature store (default: ``RUN/trak/features/NAME``, NAME from the feature settings, for a
    run; a temporary directory for a model).
    """
    from cliptrace.attribution.registry import make_method

    attributor = make_method(method, settings)
    records = read_records(train, train_split, on_bad_sample, source_data_options(model, data_options))
    attributor.prepare(_training_side(model, records, checkpoints, store_dir, progress, ranks))
    return attributor


def attribute(
    model: ModelSource,
    train: Sequence[Record] | str | Path,
    targets: Sequence[Record] | str | Path,
    *,
    method: str = "trak",
    settings: AttributionSettings = AttributionSettings(),
    checkpoints: int | Sequence[str | Path] | None = None,
    store_dir: str | Path | None = None,
    train_split: str | None = "train",
    target_split: str | None = "test",
    top_k: int = 10,
    full_scores: bool = True,
    progress: bool = False,
    on_bad_sample: str | BadSamplePolicy = "fail",
    ranks: Ranks | None = None,
    data_options: DataOptions | None = None,
) -> Attribution | None:
    """Attribution of ``targets`` to the ``train`` records by ``method``, over an ensemble of checkpoints.

    In a distributed job (``ranks``, see :func:`featurize`) the processes share the featurization of the training
    set and of the targets; rank 0 then scores and returns the attribution, the other ranks return None.

    Args:
        model: A DualEncoder, a model directory, or a run directory from ``cliptrace train``.
        train: Training records, or a dataset path (its ``train_split``).
        targets: Target records, or a dataset path (its ``target_split``).
        method: A registered method (:data:`cliptrace.attribution.METHODS`).
        settings: Features, ridge term, device and batching (:class:`~cliptrace.trak.settings.AttributionSettings`).
        checkpoints: For a run: None (all checkpoints), K (the last K) or checkpoint names/paths.
        store_dir: Feature store directory (default: one folder per feature setting under ``RUN/trak/features``
            for a run, else a temporary one). Features already there are reused; other settings in it are an
            error. Target features are kept in ``STORE/targets/`` too, so an interrupted run resumes where it
            stopped.
        train_split: Split of ``train`` when it is a path.
        target_split: Split of ``targets`` when it is a path.
        top_k: Proponents and opponents kept per target.
        full_scores: Also return the full n × t score matrix.
        progress: Show progress bars (on rank 0).
        on_bad_sample: For dataset paths: ``"fail"``, ``"skip"`` or a :class:`BadSamplePolicy` (see
            :func:`read_records`).
        ranks: The processes of a distributed job (see :mod:`cliptrace.distributed`); None for one process.
        data_options: How dataset paths ``train`` and ``targets`` are read: for a training run directory ``model``,
            its options (its ``config.json``) with those set here taking over, else these (the defaults when None).
    """
    data_options = source_data_options(model, data_options)
    target_records = read_records(targets, target_split, on_bad_sample, data_options)
    attributor = featurize(model, train, method=method, settings=settings, store_dir=store_dir,
                           checkpoints=checkpoints, train_split=train_split, progress=progress,
                           on_bad_sample=on_bad_sample, ranks=ranks, data_options=data_options)
    return attributor.attribution(target_records, top_k=top_k, full_scores=full_scores)
