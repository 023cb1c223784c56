"""Featurization throughput: a training step vs cliptrace factored vs cliptrace exact vs ``traker``, same batch.

Usage (see benchmarks/README.md)::

    python benchmarks/featurize_throughput.py [--presets tiny small] [--methods train_step factored exact traker] \
        [--batch-size 32] [--proj-dim 2048] [--device cpu|cuda] [--autocast bf16] [--json out.json]

For every preset (a randomly initialized HF ``CLIPModel`` of cliptrace's size presets with a ``--vocab-size``
vocabulary; ``base`` is ViT-B/32-sized with the 49,408-token OpenAI vocabulary) each method runs in its own
subprocess on the same batch of random images and captions (lengths vary, so attention masks pad):

* ``train_step``: forward + backward of CLIP's contrastive loss with weight gradients (the yardstick);
* ``factored``: :class:`cliptrace.trak.FactoredFeaturizer` (features of every linear-type layer, CountSketch to
  ``proj_dim``);
* ``exact``: :class:`cliptrace.trak.ExactFeaturizer` (``vmap(grad)`` + dense Rademacher projection to ``proj_dim``);
* ``traker``: traker 0.3.2's ``TRAKer.featurize`` (dense Rademacher ``BasicProjector`` of ``proj_dim``; its
  CPU workarounds as in ``trak_vs_traker.py``).

Both TRAK libraries differentiate every parameter and use a bank of ``--bank-size`` negatives. After ``--warmup``
untimed batches, ``--repeats`` batches are timed, each right after a timed training step on the same batch in the
same process, so that the cost ratio to a training step is measured under the same machine load; examples/s =
batch size / mean seconds per batch. Peak memory is that of one batch of the method alone: the worker's peak RSS
(VmHWM, reset before it) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from trak_vs_traker import PhaseMeter, cpu_model  # noqa: E402

METHODS = ("train_step", "factored", "exact", "traker")


def build_model(preset: str, device: str, vocab_size: int = 0) -> nn.Module:
    """A randomly initialized HF ``CLIPModel`` of a cliptrace size preset, seeded.

    ``vocab_size`` 0 keeps the OpenAI vocabulary (49,408 tokens); another size stands for a BPE tokenizer trained on
    the data (as ``cliptrace train`` does), with pad 0, BOS and EOS the two highest ids.
    """
    from transformers import CLIPModel

    from cliptrace.models.presets import build_config

    ids = {} if not vocab_size else dict(text_vocab_size=vocab_size, text_pad_token_id=0,
                                          text_bos_token_id=vocab_size - 2, text_eos_token_id=vocab_size - 1)
    config = build_config(preset, **ids)
    torch.manual_seed(0)
    return CLIPModel._from_config(config, attn_implementation="sdpa").to(device).eval()


def make_batch(model: nn.Module, size: int, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Random images and token sequences of varying length (BOS, words, EOS, padding)."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    side = config.vision_config.image_size
    images = torch.randn(size, 3, side, side, generator=generator)
    length = config.text_config.max_position_embeddings
    text = config.text_config
    ids = torch.randint(0, min(text.bos_token_id, text.eos_token_id), (size, length), generator=generator)
    mask = torch.zeros(size, length, dtype=torch.long)
    for row in range(size):
        words = int(torch.randint(3, length - 1, (), generator=generator))
        ids[row, 0], ids[row, words + 1] = text.bos_token_id, text.eos_token_id
        ids[row, words + 2 :] = text.pad_token_id
        mask[row, : words + 2] = 1
    return images.to(device), {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def random_bank(model: nn.Module, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    dim = model.config.projection_dim
    bank = torch.nn.functional.normalize(torch.randn(2, size, dim, generator=generator), dim=-1)
    return bank[0].to(device), bank[1].to(device)


def step_function(method: str, model: nn.Module, batch: Any, args: argparse.Namespace):
    """A no-argument function that processes the batch once with ``method``."""
    from cliptrace.trak import ClipMargin, EmbeddingBank, ExactFeaturizer, FactoredFeaturizer

    images, texts = batch
    count = images.shape[0]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    device = args.device
    if method == "train_step":
        def train_step() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                loss = model(pixel_values=images, return_loss=True, **texts).loss
            loss.backward()
        return train_step
    if method in ("factored", "exact"):
        output = ClipMargin(bank_size=args.bank_size)
        bank_images, bank_texts = random_bank(model, args.bank_size, device)
        output.bank = EmbeddingBank(bank_images, bank_texts, torch.arange(args.bank_size, device=device) + count)
        if method == "factored":
            featurizer = FactoredFeaturizer(model, output, proj_dim=args.proj_dim, autocast=autocast)
        else:
            featurizer = ExactFeaturizer(model, output, proj_dim=args.proj_dim, chunk_size=args.chunk_size)
        indices = torch.arange(count, device=device)
        return lambda: featurizer.features(batch, indices)
    if method == "traker":
        return traker_step(model, batch, args)
    raise ValueError(method)


class HFTrakerAdapter(nn.Module):
    """What traker's CLIP output calls: ``forward(image, text)`` -> (normalized image emb, text emb, scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = (text != self.model.config.text_config.pad_token_id).long()
        out = self.model(pixel_values=image, input_ids=text, attention_mask=mask)
        return out.image_embeds, out.text_embeds, self.model.logit_scale.exp()


def traker_step(model: nn.Module, batch: Any, args: argparse.Namespace):
    from trak import TRAKer
    from trak.modelout_functions import CLIPModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class ColumnQ(CLIPModelOutput):  # W4 of trak_vs_traker.py: Q as an (B, 1) column
        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)

    adapter = HFTrakerAdapter(model).eval()
    images, texts = batch
    grad_dim = sum(p.numel() for p in adapter.parameters())
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=args.proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                               device=args.device, dtype=torch.float32)
    save_dir = Path(args.workdir) / f"traker-{os.getpid()}"
    rows = args.batch_size * (args.warmup + args.repeats + 1)
    traker = TRAKer(model=adapter, task=ColumnQ(simulated_batch_size=args.bank_size), train_set_size=rows,
                    save_dir=str(save_dir), device=args.device, projector=projector, proj_dim=args.proj_dim,
                    use_half_precision=False, logging_level=logging.WARNING)
    traker.load_checkpoint(adapter.state_dict(), model_id=0)
    bank_images, bank_texts = random_bank(model, args.bank_size, args.device)
    CLIPModelOutput.image_embeddings, CLIPModelOutput.text_embeddings = bank_images, bank_texts  # W3
    CLIPModelOutput.num_computed_embeddings = args.bank_size
    start = [0]

    def step() -> None:
        model.set_attn_implementation("eager")  # traker's vmap cannot trace sdpa's mask checks
        traker.featurize(batch=(images, texts["input_ids"]), inds=np.arange(start[0], start[0] + images.shape[0]))
        model.set_attn_implementation("sdpa")  # the interleaved training step keeps the default kernel
        start[0] += images.shape[0]
    return step


def worker(args: argparse.Namespace) -> None:
    """Time ``args.method`` interleaved with a training step on the same batch, in this one process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.device, 0 if args.preset == "base" else args.vocab_size)
    batch = make_batch(model, args.batch_size, args.device)
    method = step_function(args.method, model, batch, args)
    train_step = method if args.method == "train_step" else step_function("train_step", model, batch, args)
    cuda = args.device.startswith("cuda")

    def timed(step) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        method()
    train_step()
    meter = PhaseMeter()  # peak memory of one batch of the method alone
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with meter.phase("peak"):
        method()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else meter.results["peak"]["peak_rss_mb"]
    times, train_times = [], []
    for _ in range(args.repeats):  # interleaved, so that both see the same machine load
        train_times.append(timed(train_step))
        times.append(timed(method))
    seconds, train_seconds = sum(times) / len(times), sum(train_times) / len(train_times)
    result = {
        "preset": args.preset, "method": args.method, "batch_size": args.batch_size,
        "parameters": sum(p.numel() for p in model.parameters()), "seconds_per_batch": seconds,
        "examples_per_s": args.batch_size / seconds, "times": times, "train_step_times": train_times,
        "cost_vs_train_step": seconds / train_seconds, "peak_mb": peak,
    }
    print("RESULT " + json.dumps(result))


def run_worker(args: argparse.Namespace, preset: str, method: str) -> dict[str, Any] | None:
    command = [sys.executable, __file__, "--worker", "--preset", preset, "--method", method]
    for key in ("batch_size", "proj_dim", "bank_size", "device", "threads", "warmup", "repeats", "workdir",
                "vocab_size"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.autocast:
        command += ["--autocast", args.autocast]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    completed = subprocess.run(command, capture_output=True, text=True)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{preset}/{method} failed:\n{completed.stderr[-3000:]}", file=sys.stderr)
    return None


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| preset (parameters) | method | examples/s | s per batch | cost per example (× training step, same "
             "process) | speed-up vs traker (ratio of those costs) | peak memory MB |", "|---|---|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in results):
        rows = {r["method"]: r for r in results if r["preset"] == preset}
        peer = rows.get("traker")
        for method, row in rows.items():
            speedup = f"{peer['cost_vs_train_step'] / row['cost_vs_train_step']:.1f}×" if peer else "—"
            lines.append(f"| {preset} ({row['parameters'] / 1e6:.1f} M) | {method} | {row['examples_per_s']:.2f} | "
                         f"{row['seconds_per_batch']:.3f} | {row['cost_vs_train_step']:.2f} | {speedup} | "
                         f"{row['peak_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--bank-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="text vocabulary of tiny/small (a trained BPE's size; base keeps OpenAI's 49,408)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                        help="run train_step and factored under torch.autocast with this dtype")
    parser.add_argument("--chunk-size", type=int, default=0, help="exact path: examples per vmap call (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/featurize-throughput")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.chunk_size = args.chunk_size or None
    if args.worker:
        worker(args)
        return
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"{cpu_model()}, {os.cpu_count()} cores"
    print(f"device: {device}; torch {torch.__version__}; batch {args.batch_size}, proj_dim {args.proj_dim}, "
          f"bank {args.bank_size}, autocast {args.autocast}")
    results = []
    for preset in args.presets:
        for method in args.methods:
            result = run_worker(args, preset, method)
            if result is not None:
                results.append(result)
                print(f"{preset:6s} {method:10s} {result['examples_per_s']:9.2f} examples/s  "
                      f"{result['cost_vs_train_step']:.2f}× a training step  peak {result['peak_mb']:.0f} MB",
                      flush=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "args": vars(args),
                                         "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
