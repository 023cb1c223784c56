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
import csv
import inspect
import json
import logging
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cliptrace.data.images import ImageLoader
from cliptrace.data.readers import load_records
from cliptrace.data.record import Record
from cliptrace.stats import bootstrap_ci
from cliptrace.train.checkpoint import list_checkpoints
from cliptrace.verify import linear_datamodeling_score
from cliptrace.verify.experiments import linear_datamodeling, subset_jobs
from cliptrace.verify.retrain import create_plan, load_outputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trak_vs_traker import PhaseMeter, TrakerCLIPAdapter, batches, cpu_model, load_models, run_traker  # noqa: E402

CACHE = Path("/work/bench")
DAMPING_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


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


@dataclass(frozen=True)
class Bench:
    """The shared ground of every method: run, checkpoints, records, subset masks and their measured outputs."""

    run: Path
    checkpoints: list[Path]
    train: list[Record]
    targets: list[Record]
    bank: list[Record]
    masks: np.ndarray
    outputs: np.ndarray
    stores: Path
    proj_dim: int
    bank_size: int
    batch_size: int
    seed: int


def load_bench(cache: Path, *, models: int, alpha: float, targets: int, proj_dim: int, bank_size: int,
               batch_size: int, seed: int) -> Bench:
    """The bench of a prepared cache (``--prepare`` must have finished)."""
    run, verify = cache / "run", cache / "verify"
    plan = create_plan(verify, run, n_targets=targets, bank_size=100, seed=seed)
    jobs, masks = subset_jobs(verify, models, alpha, seed)
    outputs = load_outputs(verify, [job.name for job in jobs])["margin"]
    by_id = {record.id: record for record in load_records(plan.config["data"])}
    return Bench(run, list_checkpoints(run), [by_id[i] for i in plan.train_ids], [by_id[i] for i in plan.target_ids],
                 [by_id[i] for i in plan.bank_ids], masks, outputs, cache / "stores", proj_dim, bank_size,
                 batch_size, seed)


@dataclass
class Row:
    """One method's scores and costs."""

    name: str
    library: str
    scores: np.ndarray
    featurize_s: float
    score_s: float
    bytes_per_example: float
    note: str = ""


def store_bytes(directory: Path, pattern: str = "*.npy") -> int:
    """Bytes of the files matching ``pattern`` under ``directory``."""
    return sum(path.stat().st_size for path in directory.rglob(pattern) if path.is_file())


# --- cliptrace -------------------------------------------------------------------------------------------


def cliptrace_rows(bench: Bench, damping_grid: Sequence[float]) -> tuple[list[Row], dict[float, np.ndarray], str]:
    """Every registered cliptrace method (one fresh store each), TRAK's damping sweep on TRAK's store, the default.

    Falls back to :mod:`cliptrace.verify.methods` where the method registry is missing (then no sweep).
    """
    try:
        from cliptrace.attribution import METHODS
    except ImportError:
        return _legacy_rows(bench), {}, "trak"
    from cliptrace.trak.attribute import attribute, featurize
    from cliptrace.trak.settings import AttributionSettings

    default = inspect.signature(attribute).parameters["method"].default
    rows, sweep = [], {}
    for name in METHODS:
        store = bench.stores / f"cliptrace-{name}"
        settings = AttributionSettings(proj_dim=bench.proj_dim, bank_size=bench.bank_size, seed=bench.seed)
        began = time.perf_counter()
        featurize(bench.run, bench.train, store_dir=store, method=name, settings=settings)
        featurized = time.perf_counter() - began
        began = time.perf_counter()
        result = attribute(bench.run, bench.train, bench.targets, method=name, settings=settings, store_dir=store,
                           full_scores=True, top_k=1)
        rows.append(Row(name, "cliptrace", np.asarray(result.scores, dtype=np.float64), featurized,
                        time.perf_counter() - began, store_bytes(store) / len(bench.train),
                        "default" if name == default else ""))
        if name == "trak":
            for damping in damping_grid:
                swept = AttributionSettings(proj_dim=bench.proj_dim, bank_size=bench.bank_size, seed=bench.seed,
                                            damping=damping)
                sweep[damping] = np.asarray(attribute(bench.run, bench.train, bench.targets, method=name,
                                                      settings=swept, store_dir=store, full_scores=True,
                                                      top_k=1).scores, dtype=np.float64)
    return rows, sweep, default


def _legacy_rows(bench: Bench) -> list[Row]:
    from cliptrace.verify.methods import METHODS, method_scores

    rows = []
    for name in METHODS:
        store = bench.stores / f"legacy-{name}"
        began = time.perf_counter()
        scores = method_scores(name, bench.run, bench.train, bench.targets, checkpoints=len(bench.checkpoints),
                               proj_dim=bench.proj_dim, bank_size=bench.bank_size, seed=bench.seed, store_dir=store)
        rows.append(Row(name, "cliptrace (verify.methods)", scores, float("nan"), time.perf_counter() - began,
                        store_bytes(store) / len(bench.train), "featurize time included in scoring"))
    return rows


# --- peers: inputs -------------------------------------------------------------------------------------------


def encode_pairs(bench: Bench) -> dict:
    """Every (image, caption) pair of the training records, the targets and the bank (first captions), as tensors.

    ``owner[p]`` is the training record of pair p: peers score pairs and a record gets the mean of its pairs.
    """
    model = load_models([str(bench.checkpoints[-1])])[0]
    loader = ImageLoader()

    def encode(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([model.preprocess(loader.load(image)) for image, _ in pairs])
        tokens = model.tokenize([caption for _, caption in pairs])
        return {"pixels": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    pairs = [(record.image, caption) for record in bench.train for caption in record.captions]
    owner = np.array([row for row, record in enumerate(bench.train) for _ in record.captions])
    return {"train": encode(pairs), "targets": encode([(r.image, r.captions[0]) for r in bench.targets]),
            "bank": encode([(r.image, r.captions[0]) for r in bench.bank]), "owner": owner,
            "pad_id": model.tokenizer.pad_token_id}


def record_means(pair_scores: np.ndarray, owner: np.ndarray, n_records: int) -> np.ndarray:
    """Rows of pair scores averaged per training record (``owner[p]`` is pair p's record)."""
    sums = np.zeros((n_records, pair_scores.shape[1]))
    np.add.at(sums, owner, pair_scores)
    return sums / np.bincount(owner, minlength=n_records)[:, None]


# --- peers: traker ---------------------------------------------------------------------------------------


def traker_row(bench: Bench, inputs: dict) -> Row:
    """traker 0.3.2 through trak_vs_traker's adapter and workarounds, on all checkpoints."""
    save_dir = bench.stores / "traker"
    if save_dir.exists():
        raise SystemExit(f"{save_dir}: exists; delete it so traker's store and timing start fresh")
    config = {"checkpoints": [str(c) for c in bench.checkpoints], "proj_dim": bench.proj_dim,
              "batch_size": bench.batch_size, "bank_size": min(bench.bank_size, len(inputs["owner"]) - 1),
              "seed": bench.seed}
    meter = PhaseMeter()
    os.environ.setdefault("TQDM_DISABLE", "1")
    scores = run_traker(inputs, config, save_dir, meter)
    phases = {name: value["seconds"] for name, value in meter.results.items()}
    return Row("traker TRAK", "traker 0.3.2", record_means(scores, inputs["owner"], len(bench.train)),
               phases["setup"] + phases["featurize"] + phases["finalize_features"],
               phases["score"] + phases["finalize_scores"], store_bytes(save_dir, "*") / len(bench.train),
               "output: traker's CLIP loss against a training-pair bank, not the held-out margin")


# --- peers: dattri ---------------------------------------------------------------------------------------


def import_dattri() -> types.ModuleType:
    """dattri 0.3.0, with a stand-in ``scipy.stats`` where scipy is missing.

    dattri imports ``scipy.stats.pearsonr`` at module level for metrics and the RPS helper, none of which this
    benchmark calls; the stand-in raises if anything does.
    """
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        def unavailable(*_args, **_kwargs):
            raise RuntimeError("scipy is not installed; this dattri function needs it")
        stats = types.ModuleType("scipy.stats")
        stats.pearsonr = stats.spearmanr = unavailable
        scipy = types.ModuleType("scipy")
        scipy.stats = stats
        sys.modules.setdefault("scipy", scipy)
        sys.modules.setdefault("scipy.stats", stats)
    import dattri

    return dattri


class MarginFunctions:
    """dattri's per-example functions: the CLIP margin of a pair against a detached bank of the loaded checkpoint.

    Training pairs (the "loss") use a bank of ``bank_size`` training pairs (the pair itself left out), as cliptrace's
    ClipMargin does; targets use the fixed held-out bank the subset models are measured on.
    """

    def __init__(self, adapter: TrakerCLIPAdapter, inputs: dict, bank_size: int, seed: int) -> None:
        self.adapter, self.inputs = adapter, inputs
        n = len(inputs["owner"])
        self.train_bank = torch.from_numpy(np.random.default_rng(seed).permutation(n)[:bank_size])
        self.banks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def load(self, model: torch.nn.Module, checkpoint: dict) -> torch.nn.Module:
        """dattri's checkpoint loader: load the state, re-embed both banks under it."""
        model.load_state_dict(checkpoint)
        model.eval()
        train, bank = self.inputs["train"], self.inputs["bank"]
        rows = self.train_bank
        image, text, _ = model(train["pixels"][rows], train["input_ids"][rows])
        self.banks["train"] = (image, text)
        image, text, _ = model(bank["pixels"], bank["input_ids"])
        self.banks["held_out"] = (image, text)
        return model

    def _halves(self, params: dict, data: tuple, bank: str) -> tuple[torch.Tensor, torch.Tensor]:
        from cliptrace.trak.outputs import clip_margins

        pixels, ids, index = data
        image, text, scale = torch.func.functional_call(self.adapter, params, (pixels[None], ids[None]))
        bank_images, bank_texts = self.banks[bank]
        excluded = (self.train_bank == index)[None] if bank == "train" else None
        return clip_margins(image, text, bank_images, bank_texts, scale, excluded)

    def train_output(self, params: dict, data: tuple) -> torch.Tensor:
        image, text = self._halves(params, data, "train")
        return (image + text).sum()

    def target_output(self, params: dict, data: tuple) -> torch.Tensor:
        image, text = self._halves(params, data, "held_out")
        return (image + text).sum()

    def correct_probability(self, params: dict, data: tuple) -> torch.Tensor:
        image, text = self._halves(params, data, "train")
        return ((torch.sigmoid(image) + torch.sigmoid(text)) / 2).sum()


def checkpoint_learning_rates(run: Path, checkpoints: Sequence[Path]) -> list[float]:
    """The learning rate of the last logged step of each checkpoint's epoch (TracIn's weights)."""
    with open(run / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    last = {int(row["epoch"]): float(row["lr"]) for row in rows}
    epochs = [json.loads((c / "manifest.json").read_text()).get("epoch") if (c / "manifest.json").is_file() else None
              for c in checkpoints]
    return [last[int(e)] if e is not None else last[int(c.name.split("-")[-1])] for e, c in zip(epochs, checkpoints)]


def dattri_rows(bench: Bench, inputs: dict, methods: Sequence[str]) -> list[Row]:
    """dattri 0.3.0's TRAK and TracIn family (TracIn, Grad-Dot, Grad-Cos) on the same checkpoints and targets."""
    import_dattri()
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    adapter = TrakerCLIPAdapter(load_models([str(bench.checkpoints[0])])[0], inputs["pad_id"]).eval()
    states = [{f"encoder.{k}": v.clone() for k, v in m.state_dict().items()}
              for m in load_models([str(c) for c in bench.checkpoints])]
    functions = MarginFunctions(adapter, inputs, min(bench.bank_size, len(inputs["owner"]) - 1), bench.seed)
    train, targets = inputs["train"], inputs["targets"]
    train_set = torch.utils.data.TensorDataset(train["pixels"], train["input_ids"], torch.arange(len(inputs["owner"])))
    target_set = torch.utils.data.TensorDataset(targets["pixels"], targets["input_ids"],
                                                torch.full((len(bench.targets),), -1))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=bench.batch_size, shuffle=False)
    target_loader = torch.utils.data.DataLoader(target_set, batch_size=bench.batch_size, shuffle=False)
    projector = {"proj_dim": bench.proj_dim, "proj_max_batch_size": bench.batch_size, "proj_seed": bench.seed,
                 "device": "cpu"}

    def task(checkpoints: list[dict]) -> AttributionTask:
        return AttributionTask(loss_func=functions.train_output, model=adapter, checkpoints=checkpoints,
                               target_func=functions.target_output, checkpoints_load_func=functions.load)

    def finish(name: str, scores: torch.Tensor, featurized: float, scored: float, stored: int, note: str) -> Row:
        pair_scores = scores.detach().double().numpy()
        return Row(name, "dattri 0.3.0", record_means(pair_scores, inputs["owner"], len(bench.train)), featurized,
                   scored, stored / len(bench.train), note)

    rows = []
    if "trak" in methods:
        attributor = TRAKAttributor(task(states), functions.correct_probability, projector_kwargs=dict(projector))
        began = time.perf_counter()
        attributor.cache(train_loader)
        featurized = time.perf_counter() - began
        began = time.perf_counter()
        scores = attributor.attribute(target_loader)
        stored = sum(t.numel() * t.element_size() for t in attributor.inv_XTX_XT_list)
        rows.append(finish("dattri TRAK", scores, featurized, time.perf_counter() - began, stored,
                           "in memory: (XᵀX)⁻¹Xᵀ per checkpoint; p = mean sigmoid of the two margin halves"))
    rates = checkpoint_learning_rates(bench.run, bench.checkpoints)
    family = {"tracin": ("dattri TracIn", states, torch.tensor(rates), False),
              "grad-dot": ("dattri Grad-Dot", states[-1:], torch.ones(1), False),
              "grad-cos": ("dattri Grad-Cos", states[-1:], torch.ones(1), True)}
    for key, (name, chosen, weights, normalized) in family.items():
        if key not in methods:
            continue
        attributor = TracInAttributor(task(chosen), weight_list=weights, normalized_grad=normalized,
                                      projector_kwargs=dict(projector))
        began = time.perf_counter()
        scores = attributor.attribute(train_loader, target_loader)
        rows.append(finish(name, scores, 0.0, time.perf_counter() - began, 0,
                           f"{len(chosen)} checkpoint(s); recomputes gradients, stores nothing"))
    return rows


# --- statistics ------------------------------------------------------------------------------------------


def paired_ratio(first: np.ndarray, second: np.ndarray, *, n_resamples: int = 1000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """mean(first) / mean(second) over targets, with a 95 % percentile bootstrap resampling targets jointly."""
    keep = np.isfinite(first) & np.isfinite(second)
    first, second = first[keep], second[keep]
    draws = np.random.default_rng(seed).integers(0, len(first), (n_resamples, len(first)))
    ratios = first[draws].mean(1) / second[draws].mean(1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(first.mean() / second.mean()), float(low), float(high)


def paired_difference(first: np.ndarray, second: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """mean(first − second) over targets with its 95 % bootstrap CI."""
    return bootstrap_ci(first - second, seed=seed)


def lds_row(bench: Bench, row: Row) -> dict:
    """LDS of a row's scores on the bench's subset models, with its per-target values."""
    result = linear_datamodeling_score(row.scores, bench.masks, bench.outputs, seed=bench.seed)
    return {"name": row.name, "library": row.library, "lds": result.mean, "low": result.low, "high": result.high,
            "per_target": result.per_target, "featurize_s": row.featurize_s, "score_s": row.score_s,
            "bytes_per_example": row.bytes_per_example, "note": row.note}


def table(entries: Sequence[dict]) -> str:
    """The markdown table of the LDS and the costs."""
    lines = ["| method | library | LDS [95 % CI] | featurize s | score s | bytes / example | note |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['name']} | {e['library']} | {e['lds']:.3f} [{e['low']:.3f}, {e['high']:.3f}] | "
                     f"{e['featurize_s']:.1f} | {e['score_s']:.1f} | {e['bytes_per_example']:.0f} | {e['note']} |")
    return "\n".join(lines)


def comparisons(entries: Sequence[dict], sweep: dict[float, dict], default: str, seed: int) -> dict[str, tuple]:
    """The paired statistics of the acceptance: best cliptrace − traker and the two ratios."""
    by_name = {e["name"]: e for e in entries}
    ours = [e for e in entries if e["library"].startswith("cliptrace")]
    best = max(ours, key=lambda e: e["lds"])
    out: dict[str, tuple] = {}
    traker = by_name.get("traker TRAK")
    if traker is not None:
        out[f"LDS({best['name']}) − LDS(traker)"] = paired_difference(best["per_target"], traker["per_target"], seed)
        if default in by_name:
            out[f"LDS({default}, default) / LDS(traker)"] = paired_ratio(by_name[default]["per_target"],
                                                                         traker["per_target"], seed=seed)
    if sweep:
        damping, tuned = max(sweep.items(), key=lambda item: item[1]["lds"])
        out[f"LDS({best['name']}) / LDS(trak, damping {damping:g})"] = paired_ratio(
            best["per_target"], tuned["per_target"], seed=seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help="world, run, subset models and stores")
    parser.add_argument("--prepare", action="store_true", help="only build the world, run and subset models")
    parser.add_argument("--models", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--targets", type=int, default=60)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--proj-dim", type=int, default=512, help="projection dimension of every method")
    parser.add_argument("--bank-size", type=int, default=300, help="training pairs in the CLIP negative bank")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while scoring")
    parser.add_argument("--damping", type=lambda t: [float(v) for v in t.split(",")], default=list(DAMPING_GRID))
    parser.add_argument("--peers", nargs="*", default=["traker", "dattri"], choices=("traker", "dattri"))
    parser.add_argument("--dattri-methods", nargs="*", default=["trak", "tracin", "grad-dot", "grad-cos"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepare(args.cache, models=args.models, alpha=args.alpha, targets=args.targets, workers=args.workers,
            seed=args.seed)
    if args.prepare:
        return
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    began = time.perf_counter()
    bench = load_bench(args.cache, models=args.models, alpha=args.alpha, targets=args.targets,
                       proj_dim=args.proj_dim, bank_size=args.bank_size, batch_size=args.batch_size, seed=args.seed)
    rows, sweep_scores, default = cliptrace_rows(bench, args.damping)
    if args.peers:
        inputs = encode_pairs(bench)
        if "traker" in args.peers:
            rows.append(traker_row(bench, inputs))
        if "dattri" in args.peers:
            rows.extend(dattri_rows(bench, inputs, args.dattri_methods))
    entries = [lds_row(bench, row) for row in rows]
    sweep = {damping: lds_row(bench, Row(f"trak damping {damping:g}", "cliptrace", scores, 0.0, 0.0, 0.0))
             for damping, scores in sweep_scores.items()}
    stats = comparisons(entries, sweep, default, args.seed)
    wall = time.perf_counter() - began
    print(f"\nLDS on {args.models} subset models (α = {args.alpha}), {len(bench.targets)} targets, output: CLIP "
          f"margin against {len(bench.bank)} held-out pairs; {len(bench.checkpoints)} checkpoints, k = "
          f"{args.proj_dim}, bank {args.bank_size}; {cpu_model()}, {os.cpu_count()} CPUs, {args.threads} thread(s)\n")
    print(table(entries))
    if sweep:
        print("\nTRAK damping sweep (relative ridge c × mean diag XᵀX):")
        for damping, entry in sweep.items():
            print(f"  c = {damping:g}: LDS {entry['lds']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]")
    print()
    for label, (value, low, high) in stats.items():
        print(f"{label}: {value:+.3f} [{low:+.3f}, {high:+.3f}]")
    print(f"\nscoring wall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"entries": entries, "sweep": {str(k): v for k, v in sweep.items()},
                                         "comparisons": stats, "default": default, "wall_s": wall,
                                         "settings": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1, default=lambda value: np.asarray(value).tolist()))


if __name__ == "__main__":
    main()
