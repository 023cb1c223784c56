"""Is TRAK right on the shapes world? Linear datamodeling score and remove-and-retrain, with the quality levers.

Usage (a shapes world and a run with several checkpoints)::

    cliptrace data shapes WORLD --n-images 1000 --image-size 32 --seed 1
    cliptrace train WORLD/captions.csv --out RUN --image-size 32 --vocab-size 512 --epochs 16 --save-every 2 \\
        --batch-size 64 --warmup-steps 20
    python benchmarks/verify_lds.py RUN --dir VERIFY --models 64 --workers 2 --json verify.json

Retrains ``--models`` subset models (each on a random half of the training pairs, cached in ``--dir``), then
prints the LDS (mean over targets, 95 % bootstrap CI) of TRAK, TracIn-style gradient dot products, CLIP-embedding
similarity and random scores; LDS vs the number of checkpoints and vs the projection dimension for the factored
and the exact feature paths; LDS and its CI half-width vs M; and the mean drop of a target's similarity and margin
after removing its top-k proponents and retraining, per method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cliptrace.data.readers import load_records
from cliptrace.stats import bootstrap_ci
from cliptrace.verify import linear_datamodeling_score
from cliptrace.verify.experiments import linear_datamodeling, remove_and_retrain, removal_plot, subset_jobs
from cliptrace.trak.settings import AttributionSettings
from cliptrace.verify.methods import method_scores
from cliptrace.verify.retrain import create_plan, load_outputs


def ints(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",") if value.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dir", type=Path, required=True, help="verification directory (cache)")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=8, help="TRAK ensemble size of the main table")
    parser.add_argument("--lambda-reg", type=float, default=0.0, help="TRAK's ridge term in the main table")
    parser.add_argument("--lambda-grid", type=floats, default=[0.0, 2000.0, 20000.0])
    parser.add_argument("--checkpoint-grid", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--proj-grid", type=ints, default=[256, 1024, 4096])
    parser.add_argument("--exact-checkpoint-grid", type=ints, default=[1, 2, 4])
    parser.add_argument("--exact-proj-grid", type=ints, default=[256, 1024, 4096])
    parser.add_argument("--m-grid", type=ints, default=[8, 16, 32, 64])
    parser.add_argument("--removal-targets", type=int, default=4)
    parser.add_argument("--k", type=ints, default=[10, 40])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    plan = create_plan(args.dir, args.run, n_targets=args.targets, bank_size=100, seed=args.seed)
    by_id = {r.id: r for r in load_records(plan.config["data"])}
    train, targets = [by_id[i] for i in plan.train_ids], [by_id[i] for i in plan.target_ids]
    timings: dict[str, float] = {}

    start = time.perf_counter()
    jobs, masks = subset_jobs(args.dir, args.models, args.alpha, args.seed)
    done_before = sum((args.dir / "outputs" / f"{job.name}.npz").is_file() for job in jobs)
    linear_datamodeling(args.dir, {}, n_models=args.models, alpha=args.alpha, seed=args.seed, workers=args.workers,
                        progress=True)
    trained = args.models - done_before
    timings["subset models"] = time.perf_counter() - start
    timings["seconds per subset model (wall, all workers)"] = timings["subset models"] / max(trained, 1)
    outputs = load_outputs(args.dir, [job.name for job in jobs])["margin"]

    def scores(method: str, features: str = "factored", checkpoints: int = args.checkpoints,
               proj_dim: int = args.proj_dim, lambda_reg: float = args.lambda_reg) -> np.ndarray:
        store = args.dir / "stores" / f"{features}-{proj_dim}-{lambda_reg:g}"
        began = time.perf_counter()
        settings = AttributionSettings(proj_dim=proj_dim, features=features, lambda_reg=lambda_reg, seed=args.seed)
        matrix = method_scores(method, args.run, train, targets, settings=settings, checkpoints=checkpoints,
                               store_dir=store, progress=True)
        timings[f"{method} {features} K={checkpoints} k={proj_dim} λ={lambda_reg:g}"] = time.perf_counter() - began
        return matrix

    def lds(matrix: np.ndarray, models: int = args.models) -> dict:
        result = linear_datamodeling_score(matrix, masks[:models], outputs[:models], seed=args.seed)
        return {"lds": result.mean, "low": result.low, "high": result.high, "text": str(result),
                "per_target": result.per_target}

    def paired(first: dict, second: dict) -> str:
        """Mean per-target LDS difference with a bootstrap CI over targets (both scored on the same models)."""
        mean, low, high = bootstrap_ci(first["per_target"] - second["per_target"], seed=args.seed)
        return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"

    table: dict[str, dict] = {}
    main_scores = {"trak": scores("trak"), "tracin": scores("tracin"), "embedding": scores("embedding"),
                   "random": scores("random")}
    for name, matrix in main_scores.items():
        table[name] = lds(matrix)
    print(f"\nLDS (M={args.models}, α={args.alpha}, {len(targets)} targets, output: CLIP margin against "
          f"{len(plan.bank_ids)} held-out pairs; TRAK: factored, K={args.checkpoints}, k={args.proj_dim})")
    for name, row in table.items():
        print(f"  {name:10s} {row['text']}")
    for first, second in (("trak", "embedding"), ("trak", "tracin"), ("embedding", "random"), ("tracin", "random")):
        print(f"  paired difference {first} − {second}: {paired(table[first], table[second])}")

    levers: dict[str, dict] = {}
    for lambda_reg in args.lambda_grid:
        levers[f"factored K={args.checkpoints} k={args.proj_dim} λ={lambda_reg:g}"] = lds(
            scores("trak", "factored", args.checkpoints, args.proj_dim, lambda_reg))
    for features, checkpoint_grid, proj_grid in (("factored", args.checkpoint_grid, args.proj_grid),
                                                 ("exact", args.exact_checkpoint_grid, args.exact_proj_grid)):
        for checkpoints in checkpoint_grid:
            levers[f"{features} K={checkpoints} k={args.proj_dim} λ={args.lambda_reg:g}"] = lds(
                scores("trak", features, checkpoints))
        for proj_dim in proj_grid:
            if proj_dim != args.proj_dim:
                levers[f"{features} K=1 k={proj_dim} λ={args.lambda_reg:g}"] = lds(scores("trak", features, 1, proj_dim))
    print("\nLDS of TRAK vs checkpoints K and projection dimension k")
    for name, row in levers.items():
        print(f"  {name:32s} {row['text']}")

    by_m = {m: lds(main_scores["trak"], m) for m in args.m_grid if m <= args.models}
    print("\nLDS of TRAK vs the number of subset models M")
    for m, row in by_m.items():
        print(f"  M={m:3d} {row['text']}  CI half-width {(row['high'] - row['low']) / 2:.3f}")

    began = time.perf_counter()
    rankings = {name: main_scores[name] for name in ("trak", "embedding", "random")}
    rows = remove_and_retrain(args.dir, rankings, list(range(args.removal_targets)), args.k, workers=args.workers,
                              progress=True)
    timings["remove-and-retrain"] = time.perf_counter() - began
    removal_plot(rows, args.dir / "removal.png")
    print(f"\nRemove the top-k proponents of {args.removal_targets} targets and retrain: mean drop (± s.e.)")
    for name in rankings:
        for k in args.k:
            mine = [row for row in rows if row["method"] == name and row["k"] == k]
            for key in ("drop_logit", "drop_margin"):
                values = np.array([row[key] for row in mine])
                error = values.std(ddof=1) / np.sqrt(len(values))
                print(f"  {name:10s} k={k:3d} {key:12s} {values.mean():+.3f} ± {error:.3f}")
    print("\nTimings (s):", json.dumps({key: round(value, 1) for key, value in timings.items()}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "levers": levers, "by_m": by_m, "removal": rows,
                                         "timings": timings}, indent=1, default=lambda value: np.asarray(value).tolist()))


if __name__ == "__main__":
    main()
