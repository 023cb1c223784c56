"""Every attribution method, cliptrace's and its peers', graded by the LDS on the same subset models.

Usage::

    python benchmarks/lds_methods.py --prepare          # world, run and subset models into --cache (resumable)
    python benchmarks/lds_methods.py --json lds.json    # score every method and print the table

``--prepare`` builds (skipping what exists) a 1000-image shapes world, a 16-epoch run with 4 checkpoints and a
verification directory whose M subset models each keep a random half of the training records; their outputs are
the CLIP margins of the test targets against the held-out val bank. Scoring then computes, on those models and
targets, the LDS (mean over targets, 95 % bootstrap CI) of every registered cliptrace method, traker 0.3.2 and
dattri 0.3.0, with featurize and scoring times and bytes stored per training example; the LDS of TRAK over a
sweep of its damping; paired bootstrap intervals (over targets) of the differences and ratios the comparison needs.

Every cliptrace method featurizes into a fresh store of its own (``CACHE/stores/METHOD``); the damping sweep reuses
TRAK's. traker runs in a subprocess through ``benchmarks/trak_vs_traker.py`` (its CPU workarounds); it scores
(image, caption) pairs, and a training record with several captions gets the mean of its pairs' scores (cliptrace
featurizes a record as the mean of its pairs' features). Peers are imported only here, never by cliptrace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptrace.data.readers import load_records
from cliptrace.data.record import Record
from cliptrace.stats import bootstrap_ci
from cliptrace.train.checkpoint import list_checkpoints
from cliptrace.verify import linear_datamodeling_score
from cliptrace.verify.experiments import linear_datamodeling, subset_jobs
from cliptrace.verify.lds import LDSResult
from cliptrace.verify.retrain import create_plan, load_outputs

CACHE = Path("/work/bench")
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

import trak_vs_traker  # noqa: E402  (the traker adapter and its CPU workarounds)


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value.strip()]


def build_run(cache: Path) -> None:
    """Build the shapes world and the run under ``cache`` (each step skipped when done)."""
    world, run = cache / "world", cache / "run"
    cli = [sys.executable, "-m", "cliptrace"]
    if not (world / "captions.csv").is_file():
        subprocess.run([*cli, "data", "shapes", str(world), "--n-images", "1000", "--image-size", "32",
                        "--seed", "1"], check=True)
    if not (run / "model" / "cliptrace_model.json").is_file():
        subprocess.run([*cli, "train", str(world / "captions.csv"), "--out", str(run), "--image-size", "32",
                        "--vocab-size", "512", "--epochs", "16", "--save-every", "4", "--batch-size", "64",
                        "--warmup-steps", "20"], check=True)


def subset_models(cache: Path, *, models: int, alpha: float, workers: int, seed: int) -> None:
    """Train the subset models of the verification plan ``cache/verify`` (those missing)."""
    began = time.perf_counter()
    linear_datamodeling(cache / "verify", {}, n_models=models, alpha=alpha, seed=seed, workers=workers,
                        progress=True)
    print(f"subset models ready in {cache / 'verify'} ({time.perf_counter() - began:.0f} s)", flush=True)


def store_bytes(directory: Path) -> int:
    """Bytes of the ``.npy`` files under ``directory`` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in directory.rglob("*.npy")) if directory.is_dir() else 0


class Grader:
    """The LDS of score matrices on one set of subset models and targets, and paired comparisons of them."""

    def __init__(self, masks: np.ndarray, outputs: np.ndarray, seed: int) -> None:
        self.masks, self.outputs, self.seed = masks, outputs, seed

    def lds(self, scores: np.ndarray) -> LDSResult:
        """The LDS of an (n_train × n_targets) score matrix."""
        return linear_datamodeling_score(scores, self.masks, self.outputs, seed=self.seed)

    def paired(self, first: LDSResult, second: LDSResult, statistic: Callable[[np.ndarray, np.ndarray], float]
               ) -> tuple[float, float, float]:
        """``statistic(first, second)`` of the per-target LDS with a bootstrap CI that resamples targets jointly
        (targets where either LDS is undefined left out)."""
        a, b = first.per_target, second.per_target
        keep = np.flatnonzero(~(np.isnan(a) | np.isnan(b)))
        return bootstrap_ci(keep.astype(float), seed=self.seed,
                            statistic=lambda rows: statistic(a[rows.astype(int)], b[rows.astype(int)]))


def difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a - b))


def ratio(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a) / np.mean(b))


def cliptrace_rows(run: Path, train: list[Record], targets: list[Record], grader: Grader, stores: Path,
                   methods: Sequence[str], settings: Any, dampings: Sequence[float]
                   ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Featurize (and solve) every method in a fresh store of its own, then score the targets with the prepared
    method; then TRAK over the ``dampings`` from its store (each a new solve and scoring)."""
    from cliptrace.trak.attribute import attribute, featurize

    rows: dict[str, dict] = {}
    for method in methods:
        store = stores / method
        shutil.rmtree(store, ignore_errors=True)
        began = time.perf_counter()
        prepared = featurize(run, train, store_dir=store, method=method, settings=settings, progress=True)
        featurized = time.perf_counter() - began
        stored = store_bytes(store)
        began = time.perf_counter()
        result = prepared.attribution(targets, top_k=1, full_scores=True)
        rows[method] = {"library": "cliptrace", "lds": grader.lds(np.asarray(result.scores, np.float64)),
                        "featurize_s": featurized, "score_s": time.perf_counter() - began,
                        "bytes_per_example": stored / len(train), "notes": result.notes}
        print(f"{method}: {rows[method]['lds']}", flush=True)
    sweep: dict[str, dict] = {}
    for damping in dampings if "trak" in methods else ():
        chosen = settings.replace(damping=damping)
        began = time.perf_counter()
        result = attribute(run, train, targets, method="trak", settings=chosen, store_dir=stores / "trak",
                           full_scores=True, top_k=1)
        sweep[f"{damping:g}"] = {"damping": damping, "lds": grader.lds(np.asarray(result.scores, np.float64)),
                                 "score_s": time.perf_counter() - began}
        print(f"trak damping {damping:g}: {sweep[f'{damping:g}']['lds']}", flush=True)
    return rows, sweep


def record_means(pair_scores: np.ndarray, owner: np.ndarray, n_records: int) -> np.ndarray:
    """(n_records × n_targets): each record's mean of the score rows of its pairs (``owner[p]``: pair p's record).

    Raises:
        ValueError: A record owns no pair, or ``owner`` does not match the rows.
    """
    if len(owner) != len(pair_scores):
        raise ValueError(f"{len(owner)} pair owners for {len(pair_scores)} score rows")
    counts = np.bincount(owner, minlength=n_records)
    if len(counts) != n_records or (counts == 0).any():
        raise ValueError(f"pair owners must cover records 0..{n_records - 1}, each at least once")
    sums = np.zeros((n_records, pair_scores.shape[1]))
    np.add.at(sums, owner, pair_scores)
    return sums / counts[:, None]


class TrakerJob:
    """traker 0.3.2's TRAK on every checkpoint of the run, in a subprocess started at once (:meth:`row` waits)."""

    def __init__(self, run: Path, train: list[Record], targets: list[Record], work: Path, *, proj_dim: int,
                 bank_size: int, batch_size: int, threads: int, seed: int) -> None:
        checkpoints = list_checkpoints(run)
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.n_train = work, len(train)
        self.owner = np.array([row for row, record in enumerate(train) for _ in record.captions])
        train_pairs = [(record.image, caption) for record in train for caption in record.captions]
        target_pairs = [(record.image, record.captions[0]) for record in targets]
        model = trak_vs_traker.load_models([str(checkpoints[-1])])[0]
        torch.save(trak_vs_traker.encode_inputs(model, train_pairs, target_pairs), work / "inputs.pt")
        bank = min(bank_size, len(train_pairs) - 1)  # traker draws its bank from pairs 1..n-1, without replacement
        self.config = {"checkpoints": [str(path) for path in checkpoints], "proj_dim": proj_dim,
                       "batch_size": batch_size, "bank_size": bank, "seed": seed, "threads": threads,
                       "pairs": len(train_pairs)}
        (work / "config.json").write_text(json.dumps(self.config, indent=1))
        for stale in ("traker_scores.npy", "traker_phases.json"):
            (work / stale).unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / "trak_vs_traker.py"), "_worker", "--lib", "traker", "--inputs",
             str(work / "inputs.pt"), "--config", str(work / "config.json"), "--result", str(work), "--tag",
             "traker"], env={**os.environ, "TQDM_DISABLE": "1"})

    def row(self, grader: Grader) -> dict:
        """Wait for traker; its LDS (a record's score: the mean over its pairs), phase times and stored bytes.

        Raises:
            RuntimeError: The traker worker failed.
        """
        if self.process.wait() != 0:
            raise RuntimeError(f"the traker worker exited with status {self.process.returncode} (see its output)")
        report = json.loads((self.work / "traker_phases.json").read_text())
        phases = report["phases"]
        scores = record_means(np.load(self.work / "traker_scores.npy"), self.owner, self.n_train)
        return {"library": "traker 0.3.2", "lds": grader.lds(scores),
                "featurize_s": sum(phases[p]["seconds"] for p in ("setup", "featurize", "finalize_features")),
                "score_s": sum(phases[p]["seconds"] for p in ("score", "finalize_scores")),
                "bytes_per_example": report["stored_bytes"] / self.n_train, "notes": self.config}


def dattri_reason() -> str:
    """Why dattri is not among the rows: its import error, or that this benchmark has no adapter for it."""
    try:
        import dattri.algorithm  # noqa: F401
    except ImportError as error:
        return f"`import dattri.algorithm` fails: {error}"
    return "dattri imports, but this benchmark has no adapter for it yet"


def fmt(result: LDSResult) -> str:
    return f"{result.mean:.3f} [{result.low:.3f}, {result.high:.3f}]"


def interval(values: tuple[float, float, float], sign: str = "") -> str:
    return f"{values[0]:{sign}.3f} [{values[1]:{sign}.3f}, {values[2]:{sign}.3f}]"


def markdown(rows: dict[str, dict], sweep: dict[str, dict], comparisons: dict[str, tuple], notes: list[str],
             header: str) -> str:
    """The printed report: one table of methods, one of the damping sweep, the paired comparisons."""
    lines = [header, "", "| method | library | LDS [95 % CI] | featurize s | scoring s | bytes / example |",
             "|---|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: -item[1]["lds"].mean):
        lines.append(f"| {name} | {row['library']} | {fmt(row['lds'])} | {row['featurize_s']:.1f} | "
                     f"{row['score_s']:.1f} | {row['bytes_per_example']:,.0f} |")
    lines += ["", "| TRAK damping (× mean diag XᵀX) | LDS [95 % CI] | solve + scoring s (features reused) |",
              "|---|---|---|"]
    for row in sweep.values():
        lines.append(f"| {row['damping']:g} | {fmt(row['lds'])} | {row['score_s']:.1f} |")
    lines += ["", "| paired comparison (bootstrap over targets) | estimate [95 % CI] |", "|---|---|"]
    for name, values in comparisons.items():
        lines.append(f"| {name} | {interval(values, '+' if '−' in name else '')} |")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    from cliptrace.attribution import DEFAULT_METHOD, METHODS
    from cliptrace.trak.settings import AttributionSettings

    defaults = AttributionSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="world, run, subset models and stores")
    parser.add_argument("--prepare", action="store_true", help="only build the world, run and subset models")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--proj-dim", type=int, default=defaults.proj_dim, help="of every method and peer")
    parser.add_argument("--damping-grid", type=floats, default=[0.001, 0.01, 0.1, 1.0, 10.0])
    parser.add_argument("--peers", nargs="*", default=["traker", "dattri"], choices=("traker", "dattri"))
    parser.add_argument("--traker-batch-size", type=int, default=128,
                        help="pairs per traker featurize call (its BasicProjector regenerates the projection per call)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each library")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    run, verify = args.cache / "run", args.cache / "verify"
    build_run(args.cache)
    plan = create_plan(verify, run, n_targets=args.targets, bank_size=100, seed=args.seed)
    by_id = {record.id: record for record in load_records(plan.config["data"])}
    train, targets = [by_id[i] for i in plan.train_ids], [by_id[i] for i in plan.target_ids]
    settings = defaults.replace(proj_dim=args.proj_dim, seed=args.seed)
    traker = None
    if "traker" in args.peers and not args.prepare:  # one thread beside the subset models and cliptrace's methods
        traker = TrakerJob(run, train, targets, args.cache / "traker", proj_dim=args.proj_dim,
                           bank_size=settings.bank_size, batch_size=args.traker_batch_size, threads=args.threads,
                           seed=args.seed)
    subset_models(args.cache, models=args.models, alpha=args.alpha, workers=args.workers, seed=args.seed)
    if args.prepare:
        return
    jobs, masks = subset_jobs(verify, args.models, args.alpha, args.seed)
    grader = Grader(masks, load_outputs(verify, [job.name for job in jobs])["margin"], args.seed)

    rows, sweep = cliptrace_rows(run, train, targets, grader, args.cache / "stores", args.methods, settings,
                                 args.damping_grid)
    notes = []
    if traker is not None:
        print("\n" + markdown(rows, sweep, {}, [], "cliptrace methods (traker still running):"), flush=True)
        rows["traker TRAK"] = traker.row(grader)
    if "dattri" in args.peers:
        notes.append(f"dattri 0.3.0 left out: {dattri_reason()}.")

    comparisons: dict[str, tuple] = {}
    ours = {name: row for name, row in rows.items() if row["library"] == "cliptrace"}
    best = max(ours, key=lambda name: ours[name]["lds"].mean)
    best_damping = max(sweep.values(), key=lambda row: row["lds"].mean) if sweep else None
    if "traker TRAK" in rows:
        peer = rows["traker TRAK"]["lds"]
        comparisons[f"LDS({best}) − LDS(traker)"] = grader.paired(ours[best]["lds"], peer, difference)
        if DEFAULT_METHOD in ours:
            comparisons[f"LDS({DEFAULT_METHOD}, default settings) / LDS(traker)"] = grader.paired(
                ours[DEFAULT_METHOD]["lds"], peer, ratio)
    if best_damping is not None:
        comparisons[f"LDS({best}) / LDS(trak, damping {best_damping['damping']:g}, best of the sweep)"] = (
            grader.paired(ours[best]["lds"], best_damping["lds"], ratio))
    notes.append(f"Best cliptrace method and best damping are picked on these same targets (optimistic). "
                 f"Wall time {time.perf_counter() - began:.0f} s.")
    header = (f"LDS on {args.models} subset models (α = {args.alpha:g}) and {len(targets)} test targets; output: "
              f"the CLIP margin against {len(plan.bank_ids)} held-out val pairs; {len(list_checkpoints(run))} "
              f"checkpoints, k = {args.proj_dim}, {len(train)} training records, threads {args.threads}.")
    print("\n" + markdown(rows, sweep, comparisons, notes, header), flush=True)
    if args.json:
        def plain(value: Any) -> Any:
            if isinstance(value, LDSResult):
                return {"mean": value.mean, "low": value.low, "high": value.high, "n_models": value.n_models,
                        "per_target": value.per_target.tolist(), "n_undefined": value.n_undefined}
            return np.asarray(value).tolist()

        args.json.write_text(json.dumps({"rows": rows, "damping_sweep": sweep, "comparisons": comparisons,
                                         "best_method": best, "notes": notes, "settings": vars(args) | {
                                             "cache": str(args.cache), "json": str(args.json)}},
                                        indent=1, default=plain))


if __name__ == "__main__":
    main()
