"""TRAK scoring at scale: solve, top-k, full scores and self-influence over n training rows × k feature dims.

Writes synthetic features (float32, generated in row blocks by a seeded generator) into a cliptrace
``FeatureStore`` under ``--workdir``, then times each scoring phase of one checkpoint and reports wall time,
achieved GFLOP/s, the ratio to the machine's matrix-multiply rate (an in-RAM ``torch.mm`` of the same block shapes,
timed before and after the phases in the same run; the best of these is the bound) and the peak resident memory
of the process.

Features: x = z + g·B with z ~ N(0, I_k), g ~ N(0, I_r) and a fixed B (r × k, entries N(0, spike/k)), so that the
covariance I + BᵀB has r eigenvalues near 1 + spike and the rest 1: a well-conditioned Gram matrix with some
low-rank structure. Loss weights ~ U(0.05, 1). Targets are drawn the same way and held in RAM.

Flop counts: Gram 2nk² (what a GEMM spends on XᵀX); top-k and full scores 2nkt; self-influence nk² (one
triangular solve per row against the k × k Cholesky factor).

Peak RSS is VmHWM from /proc/self/status, reset at the start of each phase by writing 5 to /proc/self/clear_refs
(the helper of benchmarks/trak_vs_traker.py). It counts anonymous memory plus file pages of memory maps that are
mapped into the process; the scorer copies each row block out of the features memory map and drops the mapped
pages afterwards (madvise), so the file's pages stay in the OS page cache but not in this process's RSS.

    .venv/bin/python benchmarks/scoring_scale.py --n 1000000 --k 4096 --targets 1024 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliptrace.trak.scoring import EnsembleScorer, solve_checkpoint, stored_kernel
from cliptrace.trak.store import FeatureStore, create_npy_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trak_vs_traker import PhaseMeter, cpu_model  # noqa: E402  (a sibling script, not a package)

CHECKPOINT = "0"
RANK, SPIKE = 32, 10.0


def mixing_matrix(k: int, seed: int) -> np.ndarray:
    """B (RANK × k), entries N(0, SPIKE/k): shared by training rows and targets."""
    return np.random.default_rng([seed, 0]).standard_normal((RANK, k), dtype=np.float32) * np.float32(
        np.sqrt(SPIKE / k))


def synthetic_rows(rng: np.random.Generator, mixing: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` feature rows z + g·B (float32)."""
    z = rng.standard_normal((rows, mixing.shape[1]), dtype=np.float32)
    z += rng.standard_normal((rows, mixing.shape[0]), dtype=np.float32) @ mixing
    return z


def prepare_store(directory: Path, n: int, k: int, block_rows: int, seed: int) -> tuple[FeatureStore, float]:
    """A complete store of n synthetic rows (reused when ``directory`` already holds one); and the seconds spent."""
    settings = {"synthetic": {"seed": seed, "rank": RANK, "spike": SPIKE, "block_rows": block_rows}}
    store = FeatureStore(directory, n, k, settings)
    store.add_checkpoint(CHECKPOINT, f"synthetic-{seed}")
    start = time.perf_counter()
    if not store.is_complete(CHECKPOINT):
        rng, mixing = np.random.default_rng([seed, 1]), mixing_matrix(k, seed)
        for row_start in range(0, n, block_rows):
            rows = min(block_rows, n - row_start)
            store.write(CHECKPOINT, np.arange(row_start, row_start + rows), synthetic_rows(rng, mixing, rows),
                        rng.uniform(0.05, 1.0, rows).astype(np.float32))
            print(f"  wrote rows {row_start + rows:,}/{n:,}", flush=True)
    return store, time.perf_counter() - start


def gemm_rate(rows: int, k: int, t: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of in-RAM torch.mm on the block shapes of the Gram (XᵀX) and of the scores (X·Ψ)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator)
    psi = torch.randn(k, t, generator=generator)
    rates = {}
    for name, product, flops in (("gram", lambda: torch.mm(x.T, x), 2 * rows * k * k),
                                 ("score", lambda: torch.mm(x, psi), 2 * rows * k * t)):
        product()
        start = time.perf_counter()
        for _ in range(repeats):
            product()
        rates[name] = flops * repeats / (time.perf_counter() - start) / 1e9
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="training rows")
    parser.add_argument("--k", type=int, default=4096, help="feature dimension")
    parser.add_argument("--targets", type=int, default=1024, help="targets scored")
    parser.add_argument("--top", type=int, default=10, help="proponents/opponents kept per target")
    parser.add_argument("--block-rows", type=int, default=65536, help="training rows read at once")
    parser.add_argument("--lambda-reg", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--gemm-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scoring-scale"))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the features and scores in --workdir")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, k, t = args.n, args.k, args.targets
    print(f"n={n:,} k={k:,} targets={t:,} block_rows={args.block_rows:,} threads={torch.get_num_threads()} "
          f"features {n * k * 4 / 2**30:.1f} GiB", flush=True)

    meter = PhaseMeter()
    store, data_seconds = prepare_store(args.workdir / "store", n, k, args.block_rows, args.seed)
    print(f"data: {data_seconds:.1f} s", flush=True)
    targets = [torch.from_numpy(synthetic_rows(np.random.default_rng([args.seed, 2]), mixing_matrix(k, args.seed), t))]

    load = {}  # 1-minute load average after each phase: other processes on the machine slow every phase
    with meter.phase("gemm_bound"):
        bound_before = gemm_rate(min(args.block_rows, n), k, t, args.gemm_repeats)
    load["gemm_bound"] = os.getloadavg()[0]
    print(f"GEMM rate before: Gram-shaped {bound_before['gram']:.1f} GFLOP/s, score-shaped "
          f"{bound_before['score']:.1f} GFLOP/s", flush=True)

    with meter.phase("solve"):
        solve_checkpoint(store, CHECKPOINT, args.lambda_reg, torch.float32, "cpu", args.block_rows)
    load["solve"] = os.getloadavg()[0]
    features, loss_weights = store.features(CHECKPOINT)
    scorer = EnsembleScorer([stored_kernel(store, CHECKPOINT)], [features], [loss_weights],
                            block_rows=args.block_rows)
    print(f"solve: {meter.results['solve']['seconds']:.1f} s", flush=True)
    with meter.phase("top_k"):
        top = scorer.top_k(targets, args.top)
    load["top_k"] = os.getloadavg()[0]
    print(f"top_k: {meter.results['top_k']['seconds']:.1f} s", flush=True)
    scores_path = args.workdir / "scores.npy"
    with meter.phase("score"), create_npy_atomic(scores_path, np.float32, (n, t)) as out:
        scorer.score(targets, out=out)
    load["score"] = os.getloadavg()[0]
    print(f"score: {meter.results['score']['seconds']:.1f} s", flush=True)
    with meter.phase("self_influence"):
        influence = scorer.self_influence()
    load["self_influence"] = os.getloadavg()[0]
    print(f"self_influence: {meter.results['self_influence']['seconds']:.1f} s", flush=True)

    scores = np.load(scores_path, mmap_mode="r")
    columns = np.arange(t)[:, None]
    check = {  # the streamed top-k against the full matrix written by score()
        "top_k_vs_score_max_abs_diff": float(max(
            np.abs(scores[top.proponents.numpy(), columns] - top.proponent_scores.numpy()).max(),
            np.abs(scores[top.opponents.numpy(), columns] - top.opponent_scores.numpy()).max())),
        "self_influence_min": float(influence.min()), "self_influence_max": float(influence.max()),
    }
    del scores
    bound_after = gemm_rate(min(args.block_rows, n), k, t, args.gemm_repeats)
    bound = max(*bound_before.values(), *bound_after.values())  # the machine's GEMM rate: its best measurement

    flops = {"solve": 2 * n * k * k, "top_k": 2 * n * k * t, "score": 2 * n * k * t, "self_influence": n * k * k}
    rows = []
    for phase, count in flops.items():
        result = meter.results[phase]
        rate = count / result["seconds"] / 1e9
        rows.append({"phase": phase, "seconds": result["seconds"], "gflops": rate,
                     "ratio_to_gemm": rate / bound, "peak_rss_mb": result["peak_rss_mb"],
                     "start_rss_mb": result["start_rss_mb"], "load_average_1min_after": load[phase]})
    print("\n| phase | seconds | GFLOP/s | ratio to GEMM bound | peak RSS MB (start) | load avg after |\n"
          "|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['phase']} | {row['seconds']:.1f} | {row['gflops']:.1f} | {row['ratio_to_gemm']:.2f} | "
              f"{row['peak_rss_mb']:.0f} ({row['start_rss_mb']:.0f}) | {row['load_average_1min_after']:.1f} |")
    gemm = meter.results["gemm_bound"]
    print(f"GEMM bound {bound:.1f} GFLOP/s: the best in-RAM torch.mm of {min(args.block_rows, n)} rows, before / after "
          f"the phases: Gram-shaped {bound_before['gram']:.1f} / {bound_after['gram']:.1f}, score-shaped "
          f"{bound_before['score']:.1f} / {bound_after['score']:.1f}; peak RSS {gemm['peak_rss_mb']:.0f} MB. "
          f"Data generation {data_seconds:.1f} s. Checks: {check}")
    if not meter.peak_resets:
        print("note: /proc/self/clear_refs was not writable; peaks are since process start")

    if args.json:
        args.json.write_text(json.dumps({
            "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "machine": {"cpu": cpu_model(), "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
            "data_seconds": data_seconds, "gemm_gflops": bound, "gemm_gflops_before": bound_before,
            "gemm_gflops_after": bound_after, "gemm_phase": {**gemm, "load_average_1min_after":
                                                                                   load["gemm_bound"]},
            "phases": rows, "check": check,
            "peak_resets": meter.peak_resets,
        }, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(args.workdir / "store")
        scores_path.unlink()


if __name__ == "__main__":
    main()
