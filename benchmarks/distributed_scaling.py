"""Featurization on 1 process vs 2 processes (gloo) vs 1 process with 2 threads, on the same cores and data.

Usage (see benchmarks/README.md)::

    python benchmarks/distributed_scaling.py [--n-images 600] [--preset tiny] [--proj-dim 2048] \
        [--batch-size 32] [--workdir /tmp/scaling] [--json out.json]

Builds a shapes world and a randomly initialized model directory of ``--preset`` (throughput does not depend on
training), then runs ``cliptrace trak featurize`` on the training split into a fresh store, each configuration in
its own command, timed from start to exit (process start-up, loading, the negative bank, featurization and the
kernel solve: what a user waits for). The stores of all configurations are compared at the end: they must hold
the same features (float32 rounding, relative to the largest entry). Prints wall times, examples/s and the
speed-up of the 2-process job over each single-process configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGURATIONS = (  # name, processes (--devices), torch threads per process
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread", 2, 1),
)


def prepare(workdir: Path, n_images: int, preset: str) -> tuple[Path, Path, int]:
    """A shapes world and a model directory of ``preset``; the number of training records."""
    from cliptrace.data.readers import load_records, select_split
    from cliptrace.data.shapes import generate_shapes_world
    from cliptrace.models import HFCLIP, train_tokenizer

    data = generate_shapes_world(workdir / "world", n_images=n_images, seed=0, format="csv")
    records = load_records(data)
    tokenizer = train_tokenizer([c for r in records for c in r.captions], vocab_size=1024,
                                context_length=HFCLIP.preset_context_length(preset))
    HFCLIP.from_preset(preset, tokenizer).save(workdir / "model")
    return data, workdir / "model", len(select_split(records, "train"))


def featurize(data: Path, model: Path, store: Path, devices: int, threads: int, options: list[str]) -> float:
    """Wall seconds of one ``cliptrace trak featurize`` job."""
    command = [str(Path(sys.executable).with_name("cliptrace")), "trak", "featurize", str(model), str(data),
               "--store", str(store), "--devices", str(devices), "--device", "cpu", "--no-progress", *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=600)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bank-size", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cliptrace-scaling"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data, model, n_train = prepare(args.workdir, args.n_images, args.preset)
    options = ["--proj-dim", str(args.proj_dim), "--batch-size", str(args.batch_size), "--bank-size",
               str(args.bank_size), "--lambda-reg", "1"]
    rows = []
    for index, (name, devices, threads) in enumerate(CONFIGURATIONS):
        store = args.workdir / f"store-{index}"
        seconds = featurize(data, model, store, devices, threads, options)
        rows.append({"configuration": name, "processes": devices, "threads": threads, "seconds": seconds,
                     "examples_per_second": n_train / seconds, "store": str(store)})
    reference = np.load(Path(rows[0]["store"]) / "checkpoints" / "model" / "features.npy")
    for row in rows:
        features = np.load(Path(row["store"]) / "checkpoints" / "model" / "features.npy")
        row["max_relative_difference"] = float(np.abs(features - reference).max() / np.abs(reference).max())
    two = rows[-1]["seconds"]
    print(f"{n_train} training records, preset {args.preset}, proj_dim {args.proj_dim}, batch {args.batch_size}")
    print(f"{'configuration':<24} {'seconds':>8} {'examples/s':>11} {'2-process speed-up':>19} {'max rel. diff':>14}")
    for row in rows:
        print(f"{row['configuration']:<24} {row['seconds']:8.1f} {row['examples_per_second']:11.1f} "
              f"{row['seconds'] / two:18.2f}x {row['max_relative_difference']:14.1e}")
    if args.json:
        args.json.write_text(json.dumps({"n_train": n_train, **vars(args), "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
