"""The two counterfactual checks of an attribution: linear datamodeling score and remove-and-retrain.

Both retrain through :mod:`cliptrace.verify.retrain`, so every model is cached in the verification directory
and an interrupted check resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cliptrace.explain.plot import save_figure
from cliptrace.verify.lds import LDSResult, linear_datamodeling_score, subset_masks
from cliptrace.verify.retrain import Job, load_outputs, load_plan, run_jobs

FULL = "full"  # the job that retrains on every training pair: reproduces the run


def subset_jobs(
    directory: str | Path, n_models: int, alpha: float = 0.5, seed: int = 0
) -> tuple[list[Job], np.ndarray]:
    """The retrainings of the LDS: model m keeps a random ``alpha`` share of the training pairs.

    Returns:
        The jobs and their masks (n_models × n_train). Model m's subset does not depend on ``n_models``, so a
        check extended to more models reuses the first ones.
    """
    plan = load_plan(directory)
    masks = subset_masks(len(plan.train_ids), n_models, alpha=alpha, seed=seed)
    ids = np.array(plan.train_ids, dtype=object)
    jobs = [Job(f"subset-a{alpha:g}-s{seed}-{m:04d}", tuple(ids[mask].tolist())) for m, mask in enumerate(masks)]
    return jobs, masks


def linear_datamodeling(
    directory: str | Path,
    scores: Mapping[str, np.ndarray],
    *,
    n_models: int = 32,
    alpha: float = 0.5,
    seed: int = 0,
    output: str = "margin",
    workers: int = 1,
    n_resamples: int = 1000,
    progress: bool = False,
) -> dict[str, LDSResult]:
    """Retrain the subset models (cached) and grade each score matrix (n_train × n_targets) by its LDS.

    Args:
        directory: A verification directory (:func:`cliptrace.verify.retrain.create_plan`).
        scores: Method name -> scores, rows in the plan's training order, columns in its target order.
        n_models: Subset models M.
        alpha: Share of the training pairs each keeps.
        seed: Seeds the subsets and the bootstrap.
        output: ``"margin"`` (the per-pair output of the model's objective: the CLIP margin against the held-out
            bank, or a SigLIP model's pair logit) or ``"logit"`` (the pair's logit).
        workers: Processes retraining at once.
        n_resamples: Bootstrap resamples of the confidence interval.
        progress: Show progress bars.
    """
    plan = load_plan(directory)
    for name, matrix in scores.items():
        if np.shape(matrix) != (len(plan.train_ids), len(plan.target_ids)):
            raise ValueError(f"scores {name!r} have shape {np.shape(matrix)}; the plan has "
                             f"{len(plan.train_ids)} training pairs × {len(plan.target_ids)} targets")
    jobs, masks = subset_jobs(directory, n_models, alpha, seed)
    run_jobs(directory, jobs, workers=workers, progress=progress)
    outputs = load_outputs(directory, [job.name for job in jobs])[output]
    return {name: linear_datamodeling_score(matrix, masks, outputs, n_resamples=n_resamples, seed=seed)
            for name, matrix in scores.items()}


def removal_jobs(
    directory: str | Path, rankings: Mapping[str, np.ndarray], targets: Sequence[int], ks: Sequence[int]
) -> list[tuple[str, int, int, Job]]:
    """``(method, target, k, job)`` for each retraining without a method's top-k training pairs of a target.

    ``rankings[method]`` is an (n_train × n_targets) score matrix; the k largest entries of the target's column
    are removed.
    """
    plan = load_plan(directory)
    ids = np.array(plan.train_ids, dtype=object)
    removals = []
    for method, matrix in rankings.items():
        for target in targets:
            order = np.argsort(-np.asarray(matrix)[:, target], kind="stable")
            for k in ks:
                keep = np.ones(len(ids), dtype=bool)
                keep[order[:k]] = False
                removals.append((method, target, k, Job(f"remove-{method}-t{target}-k{k}", tuple(ids[keep].tolist()))))
    return removals


def remove_and_retrain(
    directory: str | Path,
    rankings: Mapping[str, np.ndarray],
    targets: Sequence[int],
    ks: Sequence[int] = (10, 20, 40),
    *,
    workers: int = 1,
    progress: bool = False,
) -> list[dict[str, float | int | str]]:
    """Retrain without each method's top-k proponents of each target; rows of the target's drop in logit and margin.

    A drop is the full retraining's output minus the output after removal (positive: the removed pairs supported
    the target).
    """
    plan = load_plan(directory)
    removals = removal_jobs(directory, rankings, targets, ks)
    jobs = [Job(FULL, plan.train_ids)] + [job for *_, job in removals]
    run_jobs(directory, jobs, workers=workers, progress=progress)
    outputs = load_outputs(directory, [job.name for job in jobs])
    rows = []
    for row, (method, target, k, _) in enumerate(removals, start=1):
        rows.append({"method": method, "target": target, "k": k,
                     "drop_logit": float(outputs["logit"][0, target] - outputs["logit"][row, target]),
                     "drop_margin": float(outputs["margin"][0, target] - outputs["margin"][row, target])})
    return rows


def removal_plot(rows: Sequence[Mapping[str, float | int | str]], path: str | Path) -> Path:
    """Mean drop in the target's logit and margin vs k, one line per method (± standard error over targets)."""
    figure = Figure(figsize=(9, 3.4))
    axes = figure.subplots(1, 2)
    methods = list(dict.fromkeys(str(row["method"]) for row in rows))
    for ax, key, title in zip(axes, ("drop_logit", "drop_margin"), ("similarity logit", "margin (the objective's pair output)")):
        for method in methods:
            ks = sorted({int(row["k"]) for row in rows if row["method"] == method})
            values = [[float(row[key]) for row in rows if row["method"] == method and row["k"] == k] for k in ks]
            means = [np.mean(v) for v in values]
            errors = [np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="training pairs removed (k)", ylabel=f"drop in the target's {title}",
               title=f"Remove top-k and retrain: {title}")
        ax.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
