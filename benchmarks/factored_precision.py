"""How much do float32 and bf16/fp16 autocast change factored TRAK features? Compared with a float64 run.

Usage::

    python benchmarks/factored_precision.py [--preset small] [--device cuda] [--batch-size 16]

Features of one batch are computed with the factored path in float64 (the reference), float32, and float32 under
``torch.autocast`` with bf16 and fp16 (where the device supports it). For each it prints the relative error
‖F − F₆₄‖/‖F₆₄‖, the worst per-example cosine similarity with the reference, and the relative error of the Gram
matrix FFᵀ (what the kernel regression sees).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from featurize_throughput import build_model, make_batch, random_bank  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--proj-dim", type=int, default=2048)
    args = parser.parse_args()

    from cliptrace.trak import ClipMargin, EmbeddingBank, FactoredFeaturizer

    model = build_model(args.preset, args.device)
    images, texts = make_batch(model, args.batch_size, args.device)
    bank_images, bank_texts = random_bank(model, 1024, args.device)
    indices = torch.arange(args.batch_size, device=args.device)

    def features(dtype: torch.dtype, autocast: torch.dtype | None) -> torch.Tensor:
        output = ClipMargin()
        output.bank = EmbeddingBank(bank_images.to(dtype), bank_texts.to(dtype),
                                    torch.arange(1024, device=args.device) + args.batch_size)
        featurizer = FactoredFeaturizer(model.to(dtype), output, proj_dim=args.proj_dim, autocast=autocast)
        return featurizer.features((images.to(dtype), texts), indices)[0].double()

    reference = features(torch.float64, None)
    gram = reference @ reference.T
    variants = {"float32": (torch.float32, None), "bf16 autocast": (torch.float32, torch.bfloat16)}
    if args.device.startswith("cuda"):
        variants["fp16 autocast"] = (torch.float32, torch.float16)
    print(f"preset {args.preset}, device {args.device}, batch {args.batch_size}, proj_dim {args.proj_dim}")
    print("| variant | ‖F − F64‖/‖F64‖ | worst per-example cosine | ‖G − G64‖/‖G64‖ (G = FFᵀ) |")
    print("|---|---|---|---|")
    for name, (dtype, autocast) in variants.items():
        f = features(dtype, autocast)
        cosine = torch.nn.functional.cosine_similarity(f, reference, dim=1).min()
        print(f"| {name} | {float((f - reference).norm() / reference.norm()):.2e} | {float(cosine):.6f} | "
              f"{float((f @ f.T - gram).norm() / gram.norm()):.2e} |")


if __name__ == "__main__":
    main()
