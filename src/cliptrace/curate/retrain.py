"""Proof by retraining: the run's recipe trained again on each curated training set, over several seeds, and
measured on held-out retrieval (and zero-shot classification when the records have labels).

A retraining directory caches every job: ``jobs/NAME/`` while it trains (resumed after a kill), then
``outputs/NAME.json`` (its test metrics and the digest of its training ids), written atomically; a job whose
outputs exist is not run again. Arms are compared per seed (the same seed trains every arm), with bootstrap CIs
over seeds of the paired differences.
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
from matplotlib.figure import Figure

from cliptrace.data.images import ImageLoader
from cliptrace.data.record import Record
from cliptrace.evaluate import evaluate
from cliptrace.explain.plot import save_figure
from cliptrace.files import write_json_atomic
from cliptrace.models import load_model
from cliptrace.stats import bootstrap_ci
from cliptrace.train import TrainConfig, train

NO_FILTER = "none"  # the arm that keeps every training pair
METRICS = ("R@1", "i2t_R@1", "t2i_R@1", "zeroshot_top1")  # what each job reports, when defined
COMPARED_METRICS = ("R@1", "zeroshot_top1")  # what ``cliptrace curate --verify`` compares, when every job has it


@dataclass(frozen=True)
class RetrainJob:
    """One retraining: an arm (a filter, or ``none``), the pairs it removed, a seed, and the training ids it keeps."""

    arm: str
    removed: int
    seed: int
    train_ids: tuple[str, ...]

    @property
    def name(self) -> str:
        """A file-name-safe name: ``ARM-removeN-seedS``."""
        return f"{self.arm}-remove{self.removed}-seed{self.seed}"

    @property
    def digest(self) -> str:
        """SHA-256 of the training ids, to tell a cached job of other ids apart."""
        return hashlib.sha256("\n".join(self.train_ids).encode("utf-8")).hexdigest()


def run_retraining(run: str | Path, directory: str | Path, jobs: Sequence[RetrainJob], test: Sequence[Record], *,
                   workers: int = 1) -> list[dict]:
    """Run every job without outputs (``workers`` processes at a time) and return one row per job.

    Args:
        run: The ``cliptrace train`` run whose recipe (``config.json``) every job copies, its seed apart.
        directory: The retraining directory (created).
        jobs: The retrainings.
        test: Held-out records every model is measured on.
        workers: Processes training at once.

    Returns:
        Per job, ``{"arm", "seed", "n_train", METRIC: value...}``.

    Raises:
        ValueError: Two jobs share a name, or cached outputs of a job were made on other training ids.
    """
    directory = Path(directory)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        raise ValueError("two retraining jobs share a name")
    missing = [job for job in jobs if _outputs(directory, job) is None]
    if workers <= 1:
        for job in missing:
            _run_job(Path(run), directory, job, test)
    elif missing:
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            for future in [pool.submit(_run_job, Path(run), directory, job, test) for job in missing]:
                future.result()
    return [{"arm": job.arm, "seed": job.seed, "n_train": len(job.train_ids), **_outputs(directory, job)}
            for job in jobs]


def _output_path(directory: Path, job: RetrainJob) -> Path:
    return directory / "outputs" / f"{job.name}.json"


def _outputs(directory: Path, job: RetrainJob) -> dict | None:
    """The cached metrics of ``job``, or None when it has not run."""
    path = _output_path(directory, job)
    if not path.is_file():
        return None
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored.get("train_ids_digest") != job.digest:
        raise ValueError(f"{path}: job {job.name!r} was run on other training ids; delete it or use another "
                         "directory")
    return stored["metrics"]


def _run_job(run: Path, directory: Path, job: RetrainJob, test: Sequence[Record]) -> None:
    """Train one job (resuming a half-finished one), measure it on ``test``, store the metrics, clean up."""
    job_dir = directory / "jobs" / job.name
    job_dir.mkdir(parents=True, exist_ok=True)
    ids_file = job_dir / "train_ids.txt"
    ids_text = "".join(f"{record_id}\n" for record_id in job.train_ids)
    if not ids_file.is_file() or ids_file.read_text(encoding="utf-8") != ids_text:
        shutil.rmtree(job_dir / "run", ignore_errors=True)
        ids_file.write_text(ids_text, encoding="utf-8")
    config = dataclasses.replace(TrainConfig.load(run / "config.json"), out=str(job_dir / "run"),
                                 train_ids=str(ids_file), seed=job.seed, eval_split=None, save_every=1,
                                 keep_checkpoints=1, progress=False)
    result = train(config, resume=(job_dir / "run" / "config.json").is_file())
    metrics = evaluate(load_model(result.model_dir), list(test), ImageLoader())
    metrics["R@1"] = (metrics["i2t_R@1"] + metrics["t2i_R@1"]) / 2
    write_json_atomic(_output_path(directory, job), {
        "train_ids_digest": job.digest,
        "metrics": {name: float(metrics[name]) for name in METRICS if name in metrics},
    })
    shutil.rmtree(job_dir)


def compare_arms(rows: Sequence[dict], metric: str = "R@1", reference: str = "self-influence",
                 n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Per arm, the metric's mean over seeds with a bootstrap CI, and ``reference`` − arm paired by seed.

    Returns:
        Rows ``{"arm", "seeds", "mean", "low", "high", "difference", "difference_low", "difference_high"}``
        (the differences are None for the reference arm and for arms without the reference's seeds).
    """
    by_arm: dict[str, dict[int, float]] = {}
    for row in rows:
        if metric in row:
            by_arm.setdefault(row["arm"], {})[row["seed"]] = row[metric]
    mine = by_arm.get(reference, {})
    table = []
    for arm, values in by_arm.items():
        seeds = sorted(values)
        mean, low, high = bootstrap_ci(np.array([values[s] for s in seeds]), n_resamples=n_resamples, seed=seed)
        row = {"arm": arm, "seeds": len(seeds), "mean": mean, "low": low, "high": high,
               "difference": None, "difference_low": None, "difference_high": None}
        shared = [s for s in seeds if s in mine]
        if arm != reference and shared:
            gaps = np.array([mine[s] - values[s] for s in shared])
            row["difference"], row["difference_low"], row["difference_high"] = bootstrap_ci(
                gaps, n_resamples=n_resamples, seed=seed)
        table.append(row)
    return table


def comparison_plot(comparisons: Sequence[dict], path: str | Path) -> Path:
    """One panel per compared metric (``{"metric", "arms"}`` as :func:`compare_arms` gives them), a bar per arm: the
    metric's mean over seeds with its 95 % bootstrap CI."""
    arms = max(len(comparison["arms"]) for comparison in comparisons)
    figure = Figure(figsize=((1.2 + 1.1 * arms) * len(comparisons), 3.6), layout="constrained")
    for number, comparison in enumerate(comparisons, start=1):
        table = comparison["arms"]
        axes = figure.add_subplot(1, len(comparisons), number)
        means = [row["mean"] for row in table]
        errors = np.array([[row["mean"] - row["low"] for row in table], [row["high"] - row["mean"] for row in table]])
        axes.bar(range(len(table)), means, yerr=errors, capsize=4, color="#4c72b0")
        axes.set_xticks(range(len(table)), [row["arm"] for row in table], rotation=20)
        axes.set_ylabel(f"test {comparison['metric']}")
        axes.set_title(f"mean over {max(row['seeds'] for row in table)} seeds, 95 % CI", fontsize=9)
    figure.suptitle("Retrained on each curated training set")
    return save_figure(figure, path)
