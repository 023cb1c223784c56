"""Planning numbers: time and storage to train on and featurize COCO and a 400M-pair web-scale set on N GPUs.

Usage (see benchmarks/README.md)::

    python benchmarks/planning.py [--train-rate 3200] [--featurize-rate 1836] [--proj-dim 2048] [--checkpoints 4] \
        [--gpus 1 8 64 256] [--read-gbps 2.3] [--solve-gflops 90]

An estimate, not a measurement: it multiplies measured per-example costs (the defaults, each from
``benchmarks/RESULTS.md``) by the work each job does, and divides by the number of GPUs as if data-parallel jobs
scaled linearly (a measured 2-process job on 2 CPU cores matched one process using both cores; communication
overhead at larger N is not modelled). What each job does:

* training: one caption per image per epoch (``cliptrace train`` samples one), ``--epochs`` epochs;
* featurization: every (image, caption) pair once per checkpoint (a record's features are the mean over its
  captions), ``--checkpoints`` checkpoints;
* store: per checkpoint, n × k float32 features + n loss weights + an n-byte mask, and the k × k kernel;
* kernel solve: the Gram matrix XᵀX reads the features once (at ``--read-gbps`` per reader) and does 2nk² flops;
  scoring 1,000 targets does 2nk·1000 flops and reads the features once more.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Dataset:
    name: str
    images: int
    captions_per_image: float
    epochs: int


DATASETS = (
    Dataset("COCO train2017 (118,287 images × 5 captions ≈ 591k pairs)", 118_287, 5.0, 10),
    Dataset("web-scale (400M image-text pairs)", 400_000_000, 1.0, 32),
)


def duration(seconds: float) -> str:
    """Seconds as the most readable unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def size(bytes_: float) -> str:
    """Bytes as GB or TB."""
    return f"{bytes_ / 1e12:.2f} TB" if bytes_ >= 1e12 else f"{bytes_ / GB:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rate", type=float, default=3200.0,
                        help="Training examples/s per GPU (measured: ViT-B/32, bf16, batch 256, H200).")
    parser.add_argument("--featurize-rate", type=float, default=1836.0,
                        help="Featurized pairs/s per GPU (measured: factored, ViT-B/32, bf16, batch 256, H200).")
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--read-gbps", type=float, default=2.3, help="Feature read bandwidth, GB/s per reader.")
    parser.add_argument("--solve-gflops", type=float, default=90.0,
                        help="Gram/scoring matmul rate, GFLOP/s (measured: 2-core CPU, 1M × 4096 store).")
    args = parser.parse_args()
    k = args.proj_dim
    print(f"train {args.train_rate:g} examples/s/GPU, featurize {args.featurize_rate:g} pairs/s/GPU, k = {k}, "
          f"{args.checkpoints} checkpoints, reads {args.read_gbps:g} GB/s, matmul {args.solve_gflops:g} GFLOP/s\n")
    print("| data | GPUs | train (epochs) | featurize, all checkpoints | store | kernel solve per checkpoint "
          "(read / matmul) | score 1,000 targets per checkpoint (read / matmul) |")
    print("|---|---|---|---|---|---|---|")
    for data in DATASETS:
        n, pairs = data.images, data.images * data.captions_per_image
        store = args.checkpoints * (n * k * 4 + n * 4 + n + k * k * 4)
        read = n * k * 4 / (args.read_gbps * GB)
        solve = 2 * n * k * k / (args.solve_gflops * 1e9)
        score = 2 * n * k * 1000 / (args.solve_gflops * 1e9)
        for gpus in args.gpus:
            train = data.epochs * n / (args.train_rate * gpus)
            featurize = args.checkpoints * pairs / (args.featurize_rate * gpus)
            print(f"| {data.name} | {gpus} | {duration(train)} ({data.epochs}) | {duration(featurize)} | {size(store)} "
                  f"| {duration(read)} / {duration(solve)} | {duration(read)} / {duration(score)} |")


if __name__ == "__main__":
    main()
