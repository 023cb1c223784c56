"""TRAK for CLIP: the ``traker`` library (0.3.2) against cliptrace, on the same checkpoints, projection and targets.

Usage (see benchmarks/README.md)::

    python benchmarks/trak_vs_traker.py --run RUN [--n-train 800] [--n-targets 50] [--proj-dim 512] \
        [--checkpoints 2] [--batch-size 64] [--threads 1]

``RUN`` is a ``cliptrace train`` run directory (checkpoints under ``RUN/checkpoints/epoch-NNNN``); its
``config.json`` names the dataset (or pass ``--data``). The script

1. preprocesses the training pairs (image, caption) of the train split and the targets (the test split's first
   captions, plus ``--n-copies`` exact copies of training pairs) once, and saves them as tensors;
2. runs each library in its own subprocess, through its six-verb ``TRAKer`` API, on the last ``--checkpoints``
   checkpoints, timing four phases (featurize, finalize_features, score, finalize_scores; plus ``setup``, the
   constructor) and recording each phase's peak resident memory;
3. prints a table and the per-target Spearman correlation between the two score matrices; then repeats with
   ``proj_dim > n_train`` (``--collapse-n-train``), where ``XᵀX`` is singular.

``traker`` is CPU-hostile out of the box; the workarounds applied here (all in :func:`run_traker`) are listed in
benchmarks/RESULTS.md. Install it for benchmarks only: ``pip install traker==0.3.2 --no-deps``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PHASES = ("setup", "featurize", "finalize_features", "score", "finalize_scores")
EXPERIMENT = "bench"


# --- measurement ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PhaseMeter:
    """Wall time (perf_counter) and peak resident memory (VmHWM, reset at the start of every phase) per phase."""

    def __init__(self) -> None:
        self.results: dict[str, dict[str, float]] = {}
        self.peak_resets = True

    @contextlib.contextmanager
    def phase(self, name: str):
        self.peak_resets &= _reset_peak()
        start_rss = _status_kb("VmRSS")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM")
        self.results[name] = {"seconds": seconds, "peak_rss_mb": peak / 1024, "start_rss_mb": start_rss / 1024,
                              "peak_delta_mb": (peak - start_rss) / 1024}


# --- inputs --------------------------------------------------------------------------------------------------


def checkpoint_dirs(run: Path, count: int) -> list[Path]:
    """The last ``count`` complete checkpoints of a cliptrace run, oldest first."""
    from cliptrace.train.checkpoint import list_checkpoints

    found = list_checkpoints(run)
    if not found:
        raise SystemExit(f"{run}: no checkpoints under {run / 'checkpoints'} (train with --save-every)")
    if count > len(found):
        raise SystemExit(f"{run}: asked for {count} checkpoints, the run has {len(found)}")
    return found[-count:]


def dataset_path(run: Path, data: str | None) -> Path:
    """``--data``, else the dataset named in the run's config.json (relative paths tried against cwd and RUN/..)."""
    if data is not None:
        return Path(data)
    recorded = Path(json.loads((run / "config.json").read_text())["data"])
    for candidate in (recorded, run.parent / recorded, run.parent / recorded.name):
        if candidate.exists():
            return candidate
    raise SystemExit(f"{run}/config.json names dataset {recorded}, which does not exist here: pass --data")


def prepare_inputs(data: Path, checkpoint: Path, n_train: int, n_targets: int, n_copies: int,
                   out: Path) -> dict[str, Any]:
    """Preprocess training pairs and targets with the run's model; save them as tensors in ``out``."""
    from cliptrace.data import load_records, select_split

    model = load_models([str(checkpoint)])[0]
    records = load_records(data)
    train_pairs = [(r.image, c) for r in select_split(records, "train") for c in r.captions]
    test_pairs = [(r.image, r.captions[0]) for r in select_split(records, "test")]
    if len(train_pairs) < n_train:
        raise SystemExit(f"{data}: {len(train_pairs)} training pairs, fewer than --n-train {n_train}")
    if len(test_pairs) < n_targets:
        raise SystemExit(f"{data}: {len(test_pairs)} test pairs, fewer than --n-targets {n_targets}")
    train_pairs = train_pairs[:n_train]
    copied = np.linspace(0, n_train - 1, n_copies).round().astype(int).tolist() if n_copies else []
    target_pairs = test_pairs[:n_targets] + [train_pairs[i] for i in copied]
    inputs = encode_inputs(model, train_pairs, target_pairs)
    inputs.update(copied=copied, n_test_targets=n_targets)
    torch.save(inputs, out)
    return inputs


def encode_inputs(model: nn.Module, train_pairs: list[tuple[str, str]],
                  target_pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Preprocessed pixels and tokens of (image path, caption) pairs, as both library workers read them."""
    from cliptrace.data import ImageLoader

    loader = ImageLoader()

    def encode(pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        pixels = torch.stack([model.preprocess(loader.load(image)) for image, _ in pairs])
        tokens = model.tokenize([caption for _, caption in pairs])
        return {"pixels": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    train, targets = encode(train_pairs), encode(target_pairs)
    pad = model.tokenizer.pad_token_id
    for name, part in (("train", train), ("targets", targets)):
        if not torch.equal(part["attention_mask"].bool(), part["input_ids"] != pad):
            raise SystemExit(f"{name}: the attention mask is not `input_ids != pad`; the traker adapter needs it")
    return {"train": train, "targets": targets, "pad_id": pad}


def batches(count: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(start, min(start + size, count)) for start in range(0, count, size)]


def load_models(checkpoints: list[str]) -> list[nn.Module]:
    """The DualEncoders of the checkpoints, with eager attention (HF sdpa cannot run under vmap)."""
    from transformers.utils import logging as hf_logging

    from cliptrace.models import load_model

    hf_logging.disable_progress_bar()
    return [load_model(path, attn_implementation="eager").eval() for path in checkpoints]


# --- traker ----------------------------------------------------------------------------------------------


class TrakerCLIPAdapter(nn.Module):
    """What traker's CLIP output calls: ``forward(image=..., text=...)`` -> (image emb, text emb, scale).

    Embeddings are L2-normalized (as open_clip returns them); the attention mask is ``text != pad``.
    """

    def __init__(self, encoder: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pad_id = pad_id

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = (text != self.pad_id).long()
        return self.encoder.encode_image(image), self.encoder.encode_text(text, mask), self.encoder.logit_scale.exp()


def run_traker(inputs: dict, config: dict, save_dir: Path, meter: PhaseMeter) -> np.ndarray:
    """traker 0.3.2's TRAKer on CPU, with the workarounds documented in RESULTS.md (W1-W6)."""
    from trak import TRAKer
    from trak.modelout_functions import CLIPModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class ColumnQ(CLIPModelOutput):
        """W4: traker stores Q in an (n, 1) array but CLIPModelOutput returns (B,): featurize crashes for B > 1
        (and at B = 1 its in-batch softmax makes Q exactly 0, so every score is 0). Return Q as a column."""

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    models = load_models(config["checkpoints"])
    adapter = TrakerCLIPAdapter(models[0], inputs["pad_id"]).eval()
    # clone: a state_dict aliases the live parameters, and every checkpoint is loaded into models[0]
    states = [{f"encoder.{k}": v.clone() for k, v in m.state_dict().items()} for m in models]
    train, targets = inputs["train"], inputs["targets"]
    n, m = train["pixels"].shape[0], targets["pixels"].shape[0]
    size = config["batch_size"]

    @torch.no_grad()
    def set_bank() -> None:
        # W3: CLIPModelOutput.get_embeddings allocates with .cuda(); embed the bank (all n training pairs, batched)
        # with the checkpoint now loaded and set the class attributes it would have set.
        images, texts = [], []
        for rows in batches(n, max(size, 64)):
            i, t, _ = adapter(train["pixels"][rows], train["input_ids"][rows])
            images.append(i)
            texts.append(t)
        CLIPModelOutput.image_embeddings = torch.cat(images)
        CLIPModelOutput.text_embeddings = torch.cat(texts)
        CLIPModelOutput.num_computed_embeddings = n
        # W5: get_out_to_loss_grad caches the first temperature it sees forever; reset it for every checkpoint.
        traker.task.temperature = None

    with meter.phase("setup"):
        grad_dim = sum(p.numel() for p in adapter.parameters())
        # W2: the default projector needs fast_jl + CUDA (on CPU traker falls back to a Gaussian BasicProjector);
        # use the same kind of projection as cliptrace: dense Rademacher, float32, on the CPU.
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=config["proj_dim"], seed=config["seed"],
                                   proj_type=ProjectionType.rademacher, device="cpu", dtype=torch.float32)
        task = ColumnQ(simulated_batch_size=config["bank_size"])
        # W1: device="cpu" and use_half_precision=False (fp16 matmuls on CPU are slow or unsupported).
        traker = TRAKer(model=adapter, task=task, train_set_size=n, save_dir=str(save_dir), device="cpu",
                        projector=projector, proj_dim=config["proj_dim"], use_half_precision=False,
                        logging_level=logging.WARNING)
    with meter.phase("featurize"):
        for model_id, state in enumerate(states):
            traker.load_checkpoint(state, model_id=model_id)
            set_bank()
            for rows in batches(n, size):
                traker.featurize(batch=(train["pixels"][rows], train["input_ids"][rows]), num_samples=len(rows))
    with meter.phase("finalize_features"):
        traker.finalize_features()
    with meter.phase("score"):
        for model_id, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name=EXPERIMENT, checkpoint=state, model_id=model_id, num_targets=m)
            set_bank()
            if not projector.proj_matrix_available:
                # W6: finalize_features frees the projection matrix; a one-block BasicProjector (proj_dim <= 100)
                # only regenerates it when the model id changes, so scoring the last featurized id crashes.
                projector.generate_sketch_matrix(projector.generator_states[0])
            for rows in batches(m, size):
                traker.score(batch=(targets["pixels"][rows], targets["input_ids"][rows]), num_samples=len(rows))
    with meter.phase("finalize_scores"):
        scores = traker.finalize_scores(exp_name=EXPERIMENT)
    return np.array(scores, dtype=np.float64)


# --- cliptrace -------------------------------------------------------------------------------------------


def run_cliptrace(inputs: dict, config: dict, save_dir: Path, meter: PhaseMeter) -> np.ndarray:
    """cliptrace's TRAKer (the same six verbs) on the DualEncoder itself."""
    from cliptrace.trak import ClipMargin, TRAKer

    models = load_models(config["checkpoints"])
    states = [{k: v.clone() for k, v in model.state_dict().items()} for model in models]  # see run_traker
    model = models[0]
    train, targets = inputs["train"], inputs["targets"]
    n, m = train["pixels"].shape[0], targets["pixels"].shape[0]
    size = config["batch_size"]

    def example(part: dict, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return part["pixels"][rows], {"input_ids": part["input_ids"][rows], "attention_mask": part["attention_mask"][rows]}

    def bank_batches(indices: torch.Tensor):
        for chunk in indices.split(max(size, 64)):
            images, texts = example(train, chunk)
            yield images, texts, chunk

    with meter.phase("setup"):
        task = ClipMargin(bank_size=config["bank_size"], seed=config["seed"])
        task.set_bank_source(n, bank_batches)
        traker = TRAKer(model=model, task=task, train_set_size=n, save_dir=save_dir, device="cpu",
                        proj_dim=config["proj_dim"], projector_seed=config["seed"], logging_level=logging.WARNING)
    with meter.phase("featurize"):
        for model_id, state in enumerate(states):
            traker.load_checkpoint(state, model_id=model_id)
            for rows in batches(n, size):
                traker.featurize(batch=example(train, rows), num_samples=len(rows))
    with meter.phase("finalize_features"):
        traker.finalize_features()
    with meter.phase("score"):
        for model_id, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name=EXPERIMENT, checkpoint=state, model_id=model_id, num_targets=m)
            for rows in batches(m, size):
                traker.score(batch=example(targets, rows), num_samples=len(rows))
    with meter.phase("finalize_scores"):
        scores = traker.finalize_scores(exp_name=EXPERIMENT)
    return np.array(scores, dtype=np.float64)


def worker(args: argparse.Namespace) -> None:
    """One library, one configuration, in a fresh process: write scores.npy and phases.json to --result."""
    config = json.loads(Path(args.config).read_text())
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    logging.basicConfig(level=logging.WARNING)
    inputs = torch.load(args.inputs, weights_only=False)
    result = Path(args.result)
    meter = PhaseMeter()
    run = {"traker": run_traker, "cliptrace": run_cliptrace}[args.lib]
    with tempfile.TemporaryDirectory(prefix=f"{args.lib}-", dir=result) as save_dir:
        start = time.perf_counter()
        scores = run(inputs, config, Path(save_dir) / "trak_results", meter)
        total = time.perf_counter() - start
        stored_bytes = sum(path.stat().st_size for path in Path(save_dir).rglob("*") if path.is_file())
    tag = args.tag or args.lib
    np.save(result / f"{tag}_scores.npy", scores)
    (result / f"{tag}_phases.json").write_text(json.dumps(
        {"phases": meter.results, "total_seconds": total, "stored_bytes": stored_bytes,
         "peak_resets": meter.peak_resets, "threads": torch.get_num_threads(), "library": _version(args.lib)},
        indent=1))


def _version(lib: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("traker" if lib == "traker" else "cliptrace")
    except PackageNotFoundError:
        return "unknown"


# --- comparison ----------------------------------------------------------------------------------------------


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (1-based), ties given their average rank (as scipy.stats.rankdata)."""
    ranks = np.empty_like(values, dtype=np.float64)
    for column in range(values.shape[1]):
        x = values[:, column]
        order = np.argsort(x, kind="mergesort")
        sorted_x = x[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
        ends = np.r_[starts[1:], len(x)]
        average = (starts + ends + 1) / 2.0
        column_ranks = np.empty(len(x))
        column_ranks[order] = np.repeat(average, ends - starts)
        ranks[:, column] = column_ranks
    return ranks


def spearman_per_target(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of column j of ``a`` with column j of ``b`` (NaN where a column is constant)."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denominator = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(0) / denominator


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per target, |top-k of a ∩ top-k of b| / k."""
    top_a = np.argsort(-a, axis=0, kind="stable")[:k]
    top_b = np.argsort(-b, axis=0, kind="stable")[:k]
    return np.array([len(set(top_a[:, j]) & set(top_b[:, j])) / k for j in range(a.shape[1])])


def run_config(args: argparse.Namespace, run: Path, data: Path, n_train: int, proj_dim: int, checkpoints: int,
               workdir: Path, label: str) -> dict[str, Any]:
    """Prepare inputs and run both libraries (each in its own process) for one configuration."""
    directory = workdir / label
    directory.mkdir(parents=True, exist_ok=True)
    chosen = checkpoint_dirs(run, checkpoints)
    inputs_path = directory / "inputs.pt"
    inputs = prepare_inputs(data, chosen[-1], n_train, args.n_targets, args.n_copies, inputs_path)
    bank = min(args.bank_size, n_train - 1)  # traker samples its bank without replacement from indices 1..n-1
    config = {"checkpoints": [str(c) for c in chosen], "proj_dim": proj_dim, "batch_size": args.batch_size,
              "bank_size": bank, "seed": args.seed, "threads": args.threads, "n_train": n_train,
              "n_targets": args.n_targets, "n_copies": args.n_copies}
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(config, indent=1))
    results: dict[str, Any] = {"config": config}

    def launch(lib: str, tag: str, config_file: Path) -> dict[str, Any]:
        print(f"[{label}] running {tag} ...", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_worker", "--lib", lib, "--inputs", str(inputs_path),
                        "--config", str(config_file), "--result", str(directory), "--tag", tag], check=True,
                       env={**os.environ, "TQDM_DISABLE": "1"})
        print(f"[{label}] {tag} done in {time.perf_counter() - start:.1f} s", flush=True)
        result = json.loads((directory / f"{tag}_phases.json").read_text())
        result["scores"] = np.load(directory / f"{tag}_scores.npy")
        return result

    for lib in args.libraries:
        results[lib] = launch(lib, lib, config_path)
    if args.noise_floor:
        other = directory / "config_other_seed.json"
        other.write_text(json.dumps({**config, "seed": args.seed + 1}, indent=1))
        floor = launch("cliptrace", "cliptrace_other_seed", other)
        a, b = results["cliptrace"]["scores"][:, : args.n_targets], floor["scores"][:, : args.n_targets]
        results["noise_floor_spearman"] = spearman_per_target(a, b)
        results["noise_floor_top10_overlap"] = top_k_overlap(a, b, 10)
    copied = inputs["copied"]
    for lib in args.libraries:
        scores = results[lib]["scores"]
        results[lib]["finite"] = bool(np.isfinite(scores).all())
        if copied:
            top = np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)[:, args.n_targets:], axis=0)
            results[lib]["self_attribution"] = float(np.mean(top == np.array(copied)))
    if set(args.libraries) == {"traker", "cliptrace"}:
        a = results["traker"]["scores"][:, : args.n_targets]
        b = results["cliptrace"]["scores"][:, : args.n_targets]
        rho = spearman_per_target(a, b)
        results["spearman"] = rho
        results["top10_overlap"] = top_k_overlap(a, b, 10)
    return results


def _fmt(value: float, digits: int = 3) -> str:
    return "nan" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def report(results: dict[str, Any], label: str, libraries: list[str]) -> str:
    """A plain-text (Markdown) table of one configuration."""
    config = results["config"]
    lines = [f"### {label}: n_train={config['n_train']}, targets={config['n_targets']} test + {config['n_copies']} "
             f"copies of training pairs, proj_dim={config['proj_dim']}, checkpoints={len(config['checkpoints'])}, "
             f"batch={config['batch_size']}, bank={config['bank_size']}, threads={config['threads'] or 'default'}",
             ""]
    if set(libraries) == {"traker", "cliptrace"}:
        lines += ["| phase | traker s | cliptrace s | ratio traker/cliptrace | traker peak RSS MB (Δ) | "
                  "cliptrace peak RSS MB (Δ) |", "|---|---|---|---|---|---|"]
        for phase in (*PHASES, "total"):
            if phase == "total":
                t = sum(results["traker"]["phases"][p]["seconds"] for p in PHASES)
                c = sum(results["cliptrace"]["phases"][p]["seconds"] for p in PHASES)
                tm = max(results["traker"]["phases"][p]["peak_rss_mb"] for p in PHASES)
                cm = max(results["cliptrace"]["phases"][p]["peak_rss_mb"] for p in PHASES)
                lines.append(f"| **total** | {t:.2f} | {c:.2f} | {t / c:.1f}× | {tm:.0f} | {cm:.0f} |")
                continue
            tp, cp = results["traker"]["phases"][phase], results["cliptrace"]["phases"][phase]
            ratio = tp["seconds"] / cp["seconds"] if cp["seconds"] > 0 else float("nan")
            lines.append(f"| {phase} | {tp['seconds']:.2f} | {cp['seconds']:.2f} | {ratio:.1f}× | "
                         f"{tp['peak_rss_mb']:.0f} ({tp['peak_delta_mb']:+.0f}) | "
                         f"{cp['peak_rss_mb']:.0f} ({cp['peak_delta_mb']:+.0f}) |")
        rho = results["spearman"]
        lines += ["", f"Per-target Spearman correlation, traker vs cliptrace scores over the {config['n_train']} "
                      f"training pairs ({config['n_targets']} test targets): mean {_fmt(np.nanmean(rho))}, "
                      f"median {_fmt(np.nanmedian(rho))}, min {_fmt(np.nanmin(rho))}, max {_fmt(np.nanmax(rho))}"
                      + (f" ({int(np.isnan(rho).sum())} targets undefined: constant scores)" if np.isnan(rho).any()
                         else "") + ".",
                  f"Top-10 proponent overlap: mean {_fmt(np.mean(results['top10_overlap']))}."]
    if "noise_floor_spearman" in results:
        rho = results["noise_floor_spearman"]
        lines.append(f"Reference: cliptrace vs cliptrace with another projection and bank seed: per-target Spearman "
                     f"mean {_fmt(np.nanmean(rho))}, median {_fmt(np.nanmedian(rho))}, min {_fmt(np.nanmin(rho))}; "
                     f"top-10 overlap mean {_fmt(np.mean(results['noise_floor_top10_overlap']))}.")
    for lib in libraries:
        r = results[lib]
        scores = r["scores"]
        extra = (f"; copies of training pairs whose top-1 proponent is the copied pair: "
                 f"{_fmt(100 * r['self_attribution'], 0)} %" if "self_attribution" in r else "")
        lines.append(f"{lib} {r['library']}: scores finite: {r['finite']}; |score| max "
                     f"{_fmt(float(np.nanmax(np.abs(scores))), 4)}{extra}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        parser = argparse.ArgumentParser()
        parser.add_argument("--lib", choices=("traker", "cliptrace"), required=True)
        parser.add_argument("--inputs", required=True)
        parser.add_argument("--config", required=True)
        parser.add_argument("--result", required=True)
        parser.add_argument("--tag", help="name of the result files (default: the library)")
        worker(parser.parse_args(argv[1:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="cliptrace training run (RUN/checkpoints/epoch-NNNN)")
    parser.add_argument("--data", help="dataset (default: the one in RUN/config.json)")
    parser.add_argument("--n-train", type=int, default=800, help="training pairs (image, caption) scored")
    parser.add_argument("--n-targets", type=int, default=50, help="targets: test pairs (first caption)")
    parser.add_argument("--n-copies", type=int, default=10, help="extra targets: exact copies of training pairs")
    parser.add_argument("--proj-dim", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=2, help="ensemble of the run's last K checkpoints")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bank-size", type=int, default=300,
                        help="CLIP negatives: traker's simulated_batch_size and cliptrace's bank_size")
    parser.add_argument("--seed", type=int, default=0, help="projection (and cliptrace bank) seed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per library (0: torch's default)")
    parser.add_argument("--collapse-n-train", type=int, default=256,
                        help="second configuration with n_train < proj_dim, 1 checkpoint (0 to skip)")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run cliptrace with seed+1 and report its Spearman with seed (projection noise)")
    parser.add_argument("--libraries", nargs="+", default=["traker", "cliptrace"], choices=("traker", "cliptrace"))
    parser.add_argument("--workdir", type=Path, help="keep inputs and scores here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    run = args.run
    data = dataset_path(run, args.data)
    print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, {cpu_model()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trak-bench-")))
        configs = [("main", args.n_train, args.proj_dim, args.checkpoints)]
        if args.collapse_n_train:
            configs.append(("proj_dim > n_train", args.collapse_n_train, args.proj_dim, 1))
        texts, summary = [], {}
        for label, n_train, proj_dim, checkpoints in configs:
            results = run_config(args, run, data, n_train, proj_dim, checkpoints, workdir, label.replace(" ", "_")
                                 .replace(">", "gt"))
            text = report(results, label, args.libraries)
            print("\n" + text + "\n", flush=True)
            texts.append(text)
            summary[label] = _jsonable(results)
        print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")
        if args.json:
            summary["machine"] = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                  "python": platform.python_version(), "load_average_end": os.getloadavg()}
            args.json.write_text(json.dumps(summary, indent=1))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() where that is missing)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _jsonable(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out[key] = _jsonable(value)
        elif isinstance(value, np.ndarray):
            out[key] = None if key == "scores" else [None if not np.isfinite(v) else float(v) for v in value]
        else:
            out[key] = value
    out.pop("scores", None)
    return out


if __name__ == "__main__":
    main()
