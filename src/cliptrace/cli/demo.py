"""``cliptrace demo``: the whole pipeline on the shapes world, ending in an HTML report."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cliptrace.cli.errors import reported_errors
from cliptrace.train.config import TrainConfig
from cliptrace.trak.settings import AttributionSettings

console = Console()
DEMO_MARKER = "demo.json"
STEPS = 4
TOP_K = 8  # proponents and opponents shown per target


def demo_command(
    out: Annotated[Path, typer.Option(help="Directory for the dataset, the run and the report (replaced if it holds "
                                           "an earlier demo).")] = Path("runs/demo"),
    n_images: Annotated[int, typer.Option(help="Images in the shapes world.")] = 3000,
    duplicates: Annotated[int, typer.Option(help="Near-duplicate pairs planted in the training split.")] = 20,
    mislabeled: Annotated[int, typer.Option(help="Mislabeled captions planted in the training split.")] = 20,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N epochs (TRAK ensembles them all).")] = 5,
    n_targets: Annotated[int, typer.Option(help="Held-out test images explained, besides the planted originals.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the dataset, the training run and TRAK.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Shapes world (with planted items) → tiny CLIP → evaluation → TRAK → input attributions → report."""
    from cliptrace.data.readers import load_records
    from cliptrace.data.shapes import generate_shapes_world
    from cliptrace.evaluate import format_metrics_table
    from cliptrace.models import load_model
    from cliptrace.report import build_report
    from cliptrace.report.build import held_out_metrics
    from cliptrace.train import train

    if out.exists():
        if not (out / DEMO_MARKER).is_file():
            raise typer.BadParameter(f"{out} exists and is not an earlier demo; choose another --out",
                                     param_hint="--out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    settings = {"n_images": n_images, "duplicates": duplicates, "mislabeled": mislabeled, "epochs": epochs,
                "save_every": save_every, "n_targets": n_targets, "seed": seed}
    (out / DEMO_MARKER).write_text(json.dumps(settings) + "\n")
    start = time.perf_counter()

    with reported_errors():
        console.print(f"[bold]1/{STEPS}[/bold] generating the shapes world ({n_images} images, {duplicates} planted "
                      f"near-duplicates, {mislabeled} mislabeled captions) in {out / 'data'}")
        dataset = generate_shapes_world(out / "data", n_images=n_images, seed=seed, format="csv",
                                        n_duplicates=duplicates, n_mislabeled=mislabeled)
        console.print(f"[bold]2/{STEPS}[/bold] training a tiny CLIP ({epochs} epochs, a checkpoint every {save_every})")
        config = TrainConfig(data=str(dataset), out=str(out / "run"), preset="tiny", epochs=epochs, seed=seed,
                             save_every=save_every, progress=progress)
        result = train(config)
        console.print(f"[bold]3/{STEPS}[/bold] evaluating on the held-out test split")
        metrics, _ = held_out_metrics(result.run_dir, load_model(result.model_dir).eval(), load_records(dataset))
        console.print(format_metrics_table(metrics, title="Held-out test split"))
        console.print(f"[bold]4/{STEPS}[/bold] TRAK attribution of {n_targets} test images and the originals of the "
                      "planted duplicates, input heatmaps, report")
        summary = build_report(result.run_dir, dataset, out=out / "report", n_targets=n_targets, top_k=TOP_K,
                               settings=AttributionSettings(seed=seed), progress=progress)

    minutes = (time.perf_counter() - start) / 60
    planted = summary.planted
    if planted is not None:
        console.print(f"planted near-duplicates found as the top proponent of their original: "
                      f"[bold]{planted.duplicates_top1}/{planted.duplicates_total}[/bold] "
                      f"(in the top {TOP_K}: {planted.duplicates_topk}/{planted.duplicates_total})")
        console.print(f"planted mislabeled captions among the {planted.window} most self-influential training pairs: "
                      f"[bold]{planted.mislabeled_found}/{planted.mislabeled_total}[/bold]")
    console.print(f"image→text R@1 {metrics['i2t_R@1']:.1f} %, zero-shot top-1 {metrics['zeroshot_top1']:.1f} %; "
                  f"demo took {minutes:.1f} min")
    console.print(f"report: [bold]{summary.index}[/bold]  (open it in a browser; it needs no server)")
