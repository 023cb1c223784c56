"""Does curation find planted mislabels, and does removing them help? ``cliptrace curate --verify`` on a shapes world
with 10 % of its training captions replaced by a wrong description.

Usage::

    python benchmarks/curate_mislabels.py OUT [--n-images 1200] [--epochs 15] [--seeds 3]

Steps, each through the command line a user would type (and skipped when its output exists, so a killed run
resumes):

1. ``cliptrace data shapes OUT/world --mislabeled M`` with M = 10 % of the training images;
2. ``cliptrace train`` of the tiny preset, a checkpoint every ``--save-every`` epochs;
3. ``cliptrace curate OUT/run --fraction 0.1 --verify --seeds S`` (default filter: self-influence under TRAK).

Then it prints, for every registered filter, the share of the planted mislabels in its first 10 % (from
``signals.csv``, ranked by the filter itself), and the retraining tables of ``verify.json`` (test R@1 and zero-shot top-1 per arm, mean
over seeds with a 95 % bootstrap CI, and self-influence − arm paired by seed). The numbers are also written to
``OUT/curate_mislabels.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cliptrace.curate import FILTERS, Signals, get_filter


def cliptrace(*arguments: str) -> None:
    """Run a cliptrace command, failing loudly."""
    command = [sys.executable, "-m", "cliptrace", *arguments]
    print("$", " ".join(command[2:]), flush=True)
    subprocess.run(command, check=True)


def read_signals(path: Path) -> Signals:
    """The signals ``cliptrace curate`` wrote to ``signals.csv``."""
    with path.open(encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    ids = tuple(row["id"] for row in rows)
    index = {record_id: i for i, record_id in enumerate(ids)}
    column = lambda name: np.array([float(row[name]) for row in rows])  # noqa: E731
    duplicate_of = np.array([index[row["duplicate_of"]] if row["duplicate_of"] else -1 for row in rows])
    similarity = np.array([float(row["duplicate_similarity"]) if row["duplicate_similarity"] else np.nan
                           for row in rows])
    return Signals(ids, column("val_influence"), column("self_influence"), column("clip_score"), duplicate_of,
                   similarity, "from signals.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="working directory (world, run, curation)")
    parser.add_argument("--n-images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="retraining seeds per arm")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=1, help="processes retraining at once")
    args = parser.parse_args()

    world, run, curation = args.out / "world", args.out / "run", args.out / "run" / "curate"
    start = time.perf_counter()
    n_train = round(args.n_images * 0.8)
    n_mislabeled = round(0.1 * n_train)
    if not world.is_dir():
        cliptrace("data", "shapes", str(world), "--n-images", str(args.n_images), "--mislabeled", str(n_mislabeled),
                  "--seed", "0")
    if not (run / "model").is_dir():
        cliptrace("train", str(world), "--out", str(run), "--preset", "tiny", "--epochs", str(args.epochs),
                  "--save-every", str(args.save_every), "--seed", "0", "--no-progress",
                  *(["--resume"] if run.is_dir() else []))
    if not (curation / "verify.json").is_file():
        if curation.is_dir():  # curated but not verified: the retrainings are cached in RUN/curate-retrain
            shutil.rmtree(curation)
        cliptrace("curate", str(run), "--fraction", "0.1", "--proj-dim", str(args.proj_dim), "--verify",
                  "--seeds", str(args.seeds), "--workers", str(args.workers), "--no-progress")

    planted = {item["id"] for item in json.loads((world / "planted.json").read_text())["mislabeled"]}
    signals = read_signals(curation / "signals.csv")
    summary = json.loads((curation / "curation.json").read_text())
    budget = summary["budget"]
    recovery = {}
    for name in FILTERS:
        flagged = {signals.ids[i] for i in get_filter(name).rank(signals, 0).removed(budget)}
        recovery[name] = len(flagged & planted) / len(planted)
    comparison = json.loads((curation / "verify.json").read_text())
    result = {"n_train": len(signals.ids), "mislabeled": len(planted), "budget": budget, "recovery": recovery,
              "retraining": comparison, "minutes": (time.perf_counter() - start) / 60}
    (args.out / "curate_mislabels.json").write_text(json.dumps(result, indent=2), encoding="utf-8")

    print(f"\n{len(planted)} planted mislabels among {len(signals.ids)} training pairs; budget {budget} (10 %)")
    print(f"{'filter':16s} mislabels in its first {budget}")
    for name, share in recovery.items():
        print(f"{name:16s} {share:6.1%}")
    reference = comparison["reference"]
    for table in comparison["comparisons"]:
        print(f"\ntest {table['metric']} after retraining ({comparison['seeds']} seeds)")
        print(f"{'arm':16s} {'mean':>6s} {'95 % CI':>16s} {reference + ' − arm':>22s} {'95 % CI':>18s}")
        for row in table["arms"]:
            gap = "" if row["difference"] is None else (
                f"{row['difference']:+22.2f} [{row['difference_low']:+6.2f}, {row['difference_high']:+6.2f}]")
            print(f"{row['arm']:16s} {row['mean']:6.2f} [{row['low']:6.2f}, {row['high']:6.2f}] {gap}")

if __name__ == "__main__":
    main()
