"""Counterfactual retraining: models trained on chosen parts of a run's training set, and their outputs.

A *verification directory* holds everything, so a run is cached and resumable:

* ``plan.json``: the run it copies (its ``config.json`` settings), the target and bank record ids, the seed;
* ``init/``: the model every retraining starts from, built exactly as the run built its own (same seed and
  tokenizer), so retraining on the whole training set reproduces the run;
* ``jobs/NAME/``: a retraining in progress (deleted when its outputs are saved, unless models are kept);
* ``outputs/NAME.npz``: what a finished job measured on every target: ``margin`` (the per-pair output of the
  model's objective: the CLIP margin of DESIGN §4 against the fixed held-out bank, or SigLIP's pair logit) and
  ``logit`` (τ⟨φ, ψ⟩ of the target pair, plus the logit bias of a SigLIP model). Written atomically;
  a job whose outputs exist is never run again.

Training is deterministic for a given seed, so a job gives the same outputs whenever it runs, in any process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import select_split
from cliptrace.data.record import Record
from cliptrace.evaluate.embed import embed_images, embed_texts
from cliptrace.files import write_json_atomic
from cliptrace.models import load_model
from cliptrace.models.base import DualEncoder
from cliptrace.train import TrainConfig, initial_model, train

PLAN = "plan.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Job:
    """One retraining: a name (a file-name-safe string) and the training record ids it keeps."""

    name: str
    train_ids: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """What a verification directory retrains and measures.

    Attributes:
        run: The run whose settings every retraining copies.
        config: That run's training settings (``TrainConfig`` fields).
        train_ids: The run's training record ids, in dataset order (the rows of every score matrix).
        target_ids: The records whose outputs are measured.
        bank_ids: Held-out records forming the fixed negative bank of the CLIP margin.
        keep_models: Keep each job's final model under ``jobs/NAME/model``.
    """

    run: str
    config: dict
    train_ids: tuple[str, ...]
    target_ids: tuple[str, ...]
    bank_ids: tuple[str, ...]
    keep_models: bool = False

    def train_config(self, directory: Path, job: Job) -> TrainConfig:
        """The settings of ``job``: the run's, from ``init/``, on the job's records, no evaluation.

        ``init/`` replaces the backbones of a dual encoder of backbones; its manifest keeps their locks.
        A checkpoint is kept after every epoch (the newest only), so a killed job resumes from its last epoch.
        """
        ids_file = directory / "jobs" / job.name / "train_ids.txt"
        return dataclasses.replace(
            TrainConfig.from_dict(self.config, str(directory / PLAN)), out=str(directory / "jobs" / job.name / "run"),
            model=str(directory / "init"), image_backbone=None, text_backbone=None, lock_image=False, lock_text=False,
            train_ids=str(ids_file), eval_split=None, save_every=1, keep_checkpoints=1, progress=False,
        )


def create_plan(
    directory: str | Path,
    run: str | Path,
    *,
    targets: Sequence[str] | None = None,
    n_targets: int = 50,
    target_split: str = "test",
    bank_split: str = "val",
    bank_size: int = 256,
    seed: int = 0,
    keep_models: bool = False,
) -> Plan:
    """Start a verification directory for ``run`` (or return its plan if it exists with the same settings).

    Args:
        directory: The verification directory.
        run: A ``cliptrace train`` run trained from scratch or from a model directory.
        targets: Target record ids; default ``n_targets`` records of ``target_split`` drawn with ``seed``.
        n_targets: Targets drawn when ``targets`` is not given.
        target_split: Their split.
        bank_split: Split of the margin's negative bank (held out from training).
        bank_size: Bank records (the first of ``bank_split``, at most this many).
        seed: Seeds the target draw.
        keep_models: Keep each job's final model.

    Raises:
        ValueError: The directory holds a plan with other settings, or a split is empty.
    """
    directory, run = Path(directory), Path(run)
    config = TrainConfig.load(run / "config.json")
    records = config.data_options.load(config.data)
    train_records = select_split(records, config.train_split)
    if config.train_ids is not None:
        raise ValueError(f"{run}: was itself trained on a subset (train_ids); verify the full run instead")
    if targets is None:
        pool = select_split(records, target_split)
        chosen = np.random.default_rng(seed).permutation(len(pool))[:n_targets]
        targets = [pool[i].id for i in sorted(chosen.tolist())]
    bank = [record.id for record in select_split(records, bank_split)[:bank_size]]
    for name, ids, split in (("target", targets, target_split), ("bank", bank, bank_split)):
        if not ids:
            raise ValueError(f"{config.data}: no {name} records (split {split!r})")
    plan = Plan(str(run), dataclasses.asdict(config), tuple(r.id for r in train_records), tuple(targets), tuple(bank),
                keep_models)
    path = directory / PLAN
    if path.is_file():
        stored = load_plan(directory)
        if stored != plan:
            raise ValueError(f"{path}: holds a plan with other settings (run, targets, bank or data); "
                             "use another directory")
        return stored
    directory.mkdir(parents=True, exist_ok=True)
    init = directory / "init"
    if not (init / "cliptrace_model.json").is_file():
        partial = directory / "init.partial"
        shutil.rmtree(partial, ignore_errors=True)
        model = load_model(config.model) if config.model else initial_model(config)
        model.save(partial)
        os.replace(partial, init)
    write_json_atomic(path, {"format_version": FORMAT_VERSION, **dataclasses.asdict(plan)})
    return plan


def load_plan(directory: str | Path) -> Plan:
    """The plan of a verification directory.

    Raises:
        ValueError: No plan, or one written by a newer version.
    """
    path = Path(directory) / PLAN
    if not path.is_file():
        raise ValueError(f"{directory}: not a verification directory (no {PLAN}); create it with create_plan")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.pop("format_version", None) != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format version")
    return Plan(data["run"], data["config"], tuple(data["train_ids"]), tuple(data["target_ids"]),
                tuple(data["bank_ids"]), data["keep_models"])


def run_jobs(directory: str | Path, jobs: Sequence[Job], *, workers: int = 1, progress: bool = False) -> None:
    """Run every job whose outputs are missing, ``workers`` processes at a time (resumable at any point).

    Raises:
        ValueError: A job keeps a record that is not in the run's training set, or two jobs share a name.
    """
    directory = Path(directory)
    plan = load_plan(directory)
    known = set(plan.train_ids)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two jobs share a name")
    for job in jobs:
        unknown = [record_id for record_id in job.train_ids if record_id not in known]
        if unknown:
            raise ValueError(f"job {job.name!r}: {len(unknown)} record(s) not in the run's training set, "
                             f"e.g. {unknown[0]!r}")
    missing = [job for job in jobs if not _finished(directory, job)]
    if not missing:
        return
    if workers <= 1:
        for job in track(missing, description="Retraining", disable=not progress):
            _run_job(directory, job)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads,
                             initargs=(max(1, (os.cpu_count() or 1) // workers),)) as pool:
        futures = [pool.submit(_run_job, directory, job) for job in missing]
        for future in track(futures, description="Retraining", disable=not progress):
            future.result()


def _finished(directory: Path, job: Job) -> bool:
    """Whether ``job`` has outputs; outputs stored under its name for other training records are an error."""
    path = output_path(directory, job.name)
    if not path.is_file():
        return False
    with np.load(path) as data:
        stored = str(data["train_ids_digest"]) if "train_ids_digest" in data else None
    if stored != _digest(job.train_ids):
        raise ValueError(f"{path}: job {job.name!r} was run on other training records; "
                         "delete its outputs or give the job another name")
    return True


def _digest(train_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(train_ids).encode("utf-8")).hexdigest()


def output_path(directory: str | Path, name: str) -> Path:
    """Where the outputs of job ``name`` are stored."""
    return Path(directory) / "outputs" / f"{name}.npz"


def load_outputs(directory: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The stacked outputs (len(names) × targets) of finished jobs: ``{"margin": ..., "logit": ...}``.

    Raises:
        ValueError: A job has no outputs yet.
    """
    stacked: dict[str, list[np.ndarray]] = {"margin": [], "logit": []}
    for name in names:
        path = output_path(directory, name)
        if not path.is_file():
            raise ValueError(f"{path}: job {name!r} has not run yet")
        with np.load(path) as data:
            for key in stacked:
                stacked[key].append(data[key])
    return {key: np.stack(values) for key, values in stacked.items()}


@torch.no_grad()
def target_outputs(model: DualEncoder, targets: Sequence[Record], bank: Sequence[Record]) -> dict[str, np.ndarray]:
    """Each target pair's output under the model's objective and its logit (first captions).

    ``margin`` is the objective's per-pair output (:meth:`~cliptrace.objectives.Objective.pair_output`): the CLIP
    margin against the fixed bank for a softmax model, the pair logit τ⟨φ, ψ⟩ + b for a sigmoid (SigLIP) model,
    which uses no bank. ``logit`` is τ⟨φ, ψ⟩ plus the model's logit bias where it has one.
    """
    model = model.eval()
    objective = model.objective
    loader = ImageLoader()
    image = embed_images(model, targets, loader)
    text = embed_texts(model, [record.captions[0] for record in targets])
    negatives = None
    if objective.uses_bank:
        negatives = (embed_images(model, bank, loader), embed_texts(model, [record.captions[0] for record in bank]))
    tau = float(model.logit_scale.exp())
    bias = None if model.logit_bias is None else float(model.logit_bias)
    margin, _ = objective.pair_output(image, text, tau, bias, bank=negatives)
    logit = objective.pair_logits(image, text, tau, bias)
    return {"margin": margin.double().numpy(), "logit": logit.double().numpy()}


def _run_job(directory: Path, job: Job) -> None:
    """Train one job (resuming a half-finished one), measure it, store its outputs, clean up."""
    plan = load_plan(directory)
    config = plan.train_config(directory, job)
    job_dir = directory / "jobs" / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    ids_file = Path(config.train_ids)
    ids_text = "\n".join(job.train_ids) + "\n"
    if not ids_file.is_file() or ids_file.read_text(encoding="utf-8") != ids_text:
        shutil.rmtree(job_dir / "run", ignore_errors=True)
        ids_file.write_text(ids_text, encoding="utf-8")
    result = train(config, resume=(job_dir / "run" / "config.json").is_file())
    by_id = {record.id: record for record in config.data_options.load(config.data)}
    outputs = target_outputs(load_model(result.model_dir), [by_id[i] for i in plan.target_ids],
                             [by_id[i] for i in plan.bank_ids])
    path = output_path(directory, job.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **outputs, train_ids_digest=np.array(_digest(job.train_ids)))
    os.replace(partial, path)
    if plan.keep_models:
        shutil.move(str(result.model_dir), str(job_dir / "model"))
        shutil.rmtree(job_dir / "run")
    else:
        shutil.rmtree(job_dir)


def _limit_threads(threads: int) -> None:
    torch.set_num_threads(threads)
