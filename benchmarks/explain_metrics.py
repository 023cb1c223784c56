"""Input attribution on the shapes world: the exact decomposition vs every baseline vs random.

Usage (a shapes world and a tiny CLIP trained on it, e.g. from ``cliptrace demo``)::

    cliptrace demo --out runs/demo
    python benchmarks/explain_metrics.py runs/demo/data runs/demo/run --limit 100 --out explain-bench

Each case is a two-object test image explained against the zero-shot class of one of its objects ("a red
circle"), so a map is right when it lands on that object and not the other. Prints, per method: pointing-game
accuracy, energy inside the object, top-k IoU, deletion and insertion AUC (area under the logit curve over the
perturbed fraction; patch- and pixel-level), completeness error and wall time per image, as mean ± 95 % CI
half-width. The ``--contrast-methods`` run a second time with each class contrasted with the mean of the other
23 classes (``classes=``). Last, the model-randomization sanity check: Spearman ρ of |map| before vs after
randomizing the top layer and the whole vision tower.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from cliptrace.evaluate import load_templates
from cliptrace.explain import method_names
from cliptrace.explain.evaluation import evaluate_methods, load_cases, sanity_checks, summarize, summary_markdown
from cliptrace.models import load_model


RESULTS_TEMPLATES = ("a {}", "a photo of a {}.")  # the prompts of the recorded results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("world", type=Path, help="shapes world directory")
    parser.add_argument("run", type=Path, help="training run directory (its model/) or a model directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="cases (two-object images)")
    parser.add_argument("--steps", type=int, default=16, help="points per deletion/insertion curve")
    parser.add_argument("--sanity-cases", type=int, default=16, help="images in the randomization check")
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--contrast-methods", default="decomposition,chefer,integrated_gradients",
                        help="methods run again with each class contrasted with the mean of all other classes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templates", type=Path, default=None,
                        help="class prompt templates, one per line with {} (default: the two the results in "
                             "RESULTS.md used, 'a {}' and 'a photo of a {}.'; explain's own default is eval's 80)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="directory for metrics.json and summary.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.run / "model" if (args.run / "model").is_dir() else args.run
    model = load_model(model_dir).eval()
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    templates = load_templates(args.templates) if args.templates else RESULTS_TEMPLATES
    cases = load_cases(model, args.world, split=args.split, limit=args.limit, seed=args.seed)
    start = time.perf_counter()
    rows = evaluate_methods(model, cases, methods, steps=args.steps, templates=templates, progress=True)
    contrast = [name.strip() for name in args.contrast_methods.split(",") if name.strip()]
    if contrast:
        classes = json.loads((args.world / "shapes_world.json").read_text())["classes"]
        for row in evaluate_methods(model, cases, contrast, classes=classes, steps=args.steps,
                                    templates=templates, progress=True):
            rows.append({**row, "method": f"{row['method']} vs other classes"})
    summary = summarize(rows)
    sanity = sanity_checks(model, cases[: args.sanity_cases], methods, seed=args.seed, templates=templates)
    elapsed = time.perf_counter() - start
    print(f"{len(cases)} cases, {len(methods)} methods, {args.steps} curve steps, {elapsed:.0f} s in all")
    print(summary_markdown(summary))
    print("| method | ρ after the top layer | ρ after the whole tower | passes (ρ < 0.5) |")
    print("|---|---|---|---|")
    for entry in sanity:
        print(f"| {entry['method']} | {entry['rho_top_layer']:.3f} | {entry['rho_full']:.3f} | "
              f"{'yes' if entry['passed'] else 'no'} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps({"rows": rows, "summary": summary, "sanity": sanity,
                                                           "seconds": elapsed}, indent=1))
        (args.out / "summary.md").write_text(summary_markdown(summary))


if __name__ == "__main__":
    main()
