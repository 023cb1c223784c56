"""Every attribution method, cliptrace's and its peers', graded by the LDS on the same subset models.

Usage::

    python benchmarks/lds_methods.py --prepare          # world, run and subset models into --cache (resumable)
    python benchmarks/lds_methods.py --json lds.json    # score every method and print the table

``--prepare`` builds (skipping what exists) a 1000-image shapes world, a 16-epoch run with 4 checkpoints and a
verification directory whose M subset models each keep a random half of the training records; their outputs are
the CLIP margins of the test targets against the held-out val bank. Scoring then computes, on those models and
targets, the LDS (mean over targets, 95 % bootstrap CI) of every registered cliptrace method, traker 0.3.2 and
dattri 0.3.0, with featurize and scoring times and bytes stored per training example.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from cliptrace.verify.experiments import linear_datamodeling
from cliptrace.verify.retrain import create_plan

CACHE = Path("/work/bench")


def prepare(cache: Path, *, models: int, alpha: float, targets: int, workers: int, seed: int) -> None:
    """Build the world, the run and the subset models under ``cache`` (each step skipped when done)."""
    world, run, verify = cache / "world", cache / "run", cache / "verify"
    cli = [sys.executable, "-m", "cliptrace"]
    if not (world / "captions.csv").is_file():
        subprocess.run([*cli, "data", "shapes", str(world), "--n-images", "1000", "--image-size", "32",
                        "--seed", "1"], check=True)
    if not (run / "model" / "cliptrace_model.json").is_file():
        subprocess.run([*cli, "train", str(world / "captions.csv"), "--out", str(run), "--image-size", "32",
                        "--vocab-size", "512", "--epochs", "16", "--save-every", "4", "--batch-size", "64",
                        "--warmup-steps", "20"], check=True)
    create_plan(verify, run, n_targets=targets, bank_size=100, seed=seed)
    began = time.perf_counter()
    linear_datamodeling(verify, {}, n_models=models, alpha=alpha, seed=seed, workers=workers, progress=True)
    print(f"subset models ready in {verify} ({time.perf_counter() - began:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="world, run, subset models and stores")
    parser.add_argument("--prepare", action="store_true", help="only build the world, run and subset models")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepare(args.cache, models=args.models, alpha=args.alpha, targets=args.targets, workers=args.workers,
            seed=args.seed)
    if args.prepare:
        return


if __name__ == "__main__":
    main()
