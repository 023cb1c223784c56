"""TRAK ensembled over independently seeded runs: LDS and remove-and-retrain against embedding similarity.

Usage, after ``benchmarks/verify_lds.py`` filled ``--dir`` (its subset models and its single-run removals)::

    for s in 1 2; do cliptrace train WORLD/captions.csv --out RUN-s$s --image-size 32 --vocab-size 512 \\
        --epochs 16 --save-every 8 --batch-size 64 --warmup-steps 20 --eval-split '' --seed $s; done
    python benchmarks/verify_seed_ensemble.py RUN --dir VERIFY --extra-runs RUN-s1 RUN-s2

The ensemble: the run's last 4 checkpoints and the 2 checkpoints of each extra run (8 in all), linked under
distinct names. Removal retrains from the run's own initial model and seed, as for every other method.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from cliptrace.data.readers import load_records
from cliptrace.stats import bootstrap_ci
from cliptrace.train import list_checkpoints
from cliptrace.trak.attribute import attribute
from cliptrace.verify import linear_datamodeling_score
from cliptrace.verify.experiments import remove_and_retrain, subset_jobs
from cliptrace.trak.settings import AttributionSettings
from cliptrace.verify.methods import method_scores
from cliptrace.verify.retrain import load_outputs, load_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--extra-runs", type=Path, nargs="+", required=True)
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--targets", type=int, default=40, help="removal targets (the plan's first N)")
    parser.add_argument("--k", type=int, default=40)
    parser.add_argument("--lambda-reg", type=float, default=2000.0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    plan = load_plan(args.dir)
    by_id = {r.id: r for r in load_records(plan.config["data"])}
    train, targets = [by_id[i] for i in plan.train_ids], [by_id[i] for i in plan.target_ids]
    links = args.dir / "ensemble-checkpoints"
    links.mkdir(exist_ok=True)
    chosen = [(f"s0-{path.name}", path) for path in list_checkpoints(args.run)[-4:]]
    for number, extra in enumerate(args.extra_runs, start=1):
        chosen += [(f"s{number}-{path.name}", path) for path in list_checkpoints(extra)]
    for name, path in chosen:
        if not (links / name).exists():
            os.symlink(path.resolve(), links / name)
    settings = AttributionSettings(proj_dim=1024, lambda_reg=args.lambda_reg, features="factored")
    scores = {
        "trak (3 seeds)": np.asarray(attribute(
            args.run, train, targets, checkpoints=[links / name for name, _ in chosen], settings=settings,
            store_dir=args.dir / "stores" / "seed-ensemble",
            full_scores=True, top_k=1).scores, dtype=np.float64),
        "trak (1 run)": method_scores("trak", args.run, train, targets, checkpoints=8, settings=settings,
                                      store_dir=args.dir / "stores" / f"factored-1024-{args.lambda_reg:g}"),
        "embedding": method_scores("embedding", args.run, train, targets),
    }
    jobs, masks = subset_jobs(args.dir, args.models, 0.5, 0)
    outputs = load_outputs(args.dir, [job.name for job in jobs])["margin"]
    results = {name: linear_datamodeling_score(matrix, masks, outputs) for name, matrix in scores.items()}
    for name, result in results.items():
        print(f"LDS {name:16s} {result}")
    mean, low, high = bootstrap_ci(results["trak (3 seeds)"].per_target - results["embedding"].per_target)
    print(f"paired LDS difference trak (3 seeds) − embedding: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")

    rankings = {"trakseeds": scores["trak (3 seeds)"], "trak": scores["trak (1 run)"], "embedding": scores["embedding"]}
    rows = remove_and_retrain(args.dir, rankings, list(range(args.targets)), [args.k], workers=args.workers)
    drops = {method: {key: np.array([r[key] for r in rows if r["method"] == method])
                      for key in ("drop_logit", "drop_margin")} for method in rankings}
    for key in ("drop_logit", "drop_margin"):
        for method in rankings:
            values = drops[method][key]
            print(f"{key:12s} {method:10s} {values.mean():.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}")
        difference = drops["trakseeds"][key] - drops["embedding"][key]
        mean, low, high = bootstrap_ci(difference)
        print(f"{key:12s} paired trak (3 seeds) − embedding {mean:+.3f} [{low:+.3f}, {high:+.3f}] "
              f"(s.e. {difference.std(ddof=1) / np.sqrt(len(difference)):.3f})")


if __name__ == "__main__":
    main()
