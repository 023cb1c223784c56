"""Does TRAK find what was planted? Near-duplicates as top-1 proponents, mislabeled captions by self-influence.

Usage (a shapes world with planted items and a run trained on it)::

    cliptrace data shapes WORLD --n-images 2000 --duplicates 20 --mislabeled 20
    cliptrace train WORLD/captions.csv --out RUN --epochs 15 --save-every 5
    python benchmarks/trak_planted_items.py WORLD RUN --proj-dim 1024 --checkpoints 3

Targets are the originals of the planted near-duplicates (training records themselves, so they are left out of
their own top-k). Prints the share of targets whose top-1 proponent is their duplicate, and where the mislabeled
records rank by self-influence (percentile from the top).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cliptrace
from cliptrace.trak.settings import AttributionSettings
from cliptrace.data.readers import load_records, select_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", type=Path, help="shapes world directory (with planted.json)")
    parser.add_argument("run", type=Path, help="training run directory")
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=None, help="last K checkpoints (default: all)")
    parser.add_argument("--bank-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lambda-reg", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the projection and the negative bank")
    parser.add_argument("--features", default="auto", choices=["auto", "factored", "exact"])
    parser.add_argument("--layer-dim", type=int, default=32, help="factored path: width of each side projection")
    parser.add_argument("--other-parameters", default="exclude", choices=["exclude", "exact", "error"],
                        help="factored path: parameters outside supported layers")
    parser.add_argument("--parameter", action="append", default=None, help="parameter name or glob (repeatable)")
    args = parser.parse_args()

    planted = json.loads((args.world / "planted.json").read_text())
    train = select_split(load_records(args.world / "captions.csv"), "train")
    by_id = {record.id: i for i, record in enumerate(train)}
    originals = [by_id[item["original"]] for item in planted["duplicates"]]
    duplicates = [by_id[item["duplicate"]] for item in planted["duplicates"]]
    mislabeled = [by_id[item["id"]] for item in planted["mislabeled"]]

    start = time.perf_counter()
    result = cliptrace.attribute(
        args.run, train, [train[i] for i in originals], checkpoints=args.checkpoints,
        settings=AttributionSettings(proj_dim=args.proj_dim, seed=args.seed, bank_size=args.bank_size,
                                     batch_size=args.batch_size, lambda_reg=args.lambda_reg, device=args.device,
                                     features=args.features, layer_dim=args.layer_dim,
                                     other_parameters=args.other_parameters,
                                     parameters=tuple(args.parameter) if args.parameter else None),
        store_dir=args.store, top_k=5, full_scores=False, progress=True,
    )
    seconds = time.perf_counter() - start

    top1 = result.top.proponents[:, 0].numpy()
    hits = int((top1 == np.asarray(duplicates)).sum())
    order = np.argsort(-result.self_influence, kind="stable")
    rank = np.empty(len(train), dtype=int)
    rank[order] = np.arange(1, len(train) + 1)
    percentiles = 100.0 * rank[mislabeled] / len(train)
    print(f"training records: {len(train)}, checkpoints: {', '.join(result.checkpoints)}, proj_dim: {args.proj_dim}, "
          f"features: {args.features} (other parameters: {args.other_parameters}), time: {seconds:.0f} s")
    print(f"duplicate is the top-1 proponent: {hits}/{len(originals)} targets ({100.0 * hits / len(originals):.1f} %)")
    print(f"mislabeled records by self-influence: {int((percentiles <= 5).sum())}/{len(mislabeled)} in the top 5 %; "
          f"median percentile {np.median(percentiles):.2f} %, worst {percentiles.max():.2f} %")


if __name__ == "__main__":
    main()
