"""``cliptrace verify lds|retrain``: counterfactual checks of data attribution on a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_attribution_settings
from cliptrace.files import write_json_atomic
from cliptrace.trak.settings import AttributionSettings

console = Console()
verify_app = typer.Typer(no_args_is_help=True)

Run = Annotated[Path, typer.Argument(help="Training run directory (from cliptrace train).")]
Directory = Annotated[Optional[Path], typer.Option("--dir", help="Verification directory (default: RUN/verify).")]
Methods = Annotated[Optional[str], typer.Option(
    help="Comma-separated attribution methods (default: every registered one; see cliptrace trak methods).")]
NTargets = Annotated[int, typer.Option(help="Test targets drawn when the directory is created.")]
Checkpoints = Annotated[Optional[int], typer.Option(help="Methods ensemble the last K checkpoints (default: all).")]
Workers = Annotated[int, typer.Option(help="Processes retraining at once.")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]


def _scores(run: Path, directory: Path, methods: str | None, checkpoints: int | None, settings: AttributionSettings,
            progress: bool) -> dict[str, np.ndarray]:
    from cliptrace.attribution import METHODS
    from cliptrace.train.config import TrainConfig
    from cliptrace.verify.methods import method_scores
    from cliptrace.verify.retrain import load_plan

    plan = load_plan(directory)
    config = TrainConfig.from_dict(plan.config, str(directory))
    by_id = {record.id: record for record in config.data_options.load(config.data)}
    train = [by_id[i] for i in plan.train_ids]
    targets = [by_id[i] for i in plan.target_ids]
    names = list(METHODS) if methods is None else [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown attribution method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return {name: method_scores(name, run, train, targets, settings=settings, checkpoints=checkpoints,
                                progress=progress) for name in names}


@verify_app.command("lds", help="Linear datamodeling score of attribution methods (retrains M subset models).")
@with_attribution_settings
def lds_command(
    run: Run, directory: Directory = None, models: Annotated[int, typer.Option(help="Subset models M.")] = 32,
    alpha: Annotated[float, typer.Option(help="Share of the training pairs each subset model keeps.")] = 0.5,
    methods: Methods = None,
    scores: Annotated[Optional[list[str]], typer.Option(
        help="NAME=FILE.npy: grade your own scores too (n_train × n_targets, the plan's order).")] = None,
    output: Annotated[str, typer.Option(help="Target output: margin (the objective's pair output: CLIP margin, "
                                             "SigLIP pair logit) or logit.")] = "margin",
    n_targets: NTargets = 50, checkpoints: Checkpoints = None, workers: Workers = 1, progress: Progress = True,
    settings: AttributionSettings = AttributionSettings(),
) -> None:
    from cliptrace.verify.experiments import linear_datamodeling
    from cliptrace.verify.retrain import create_plan

    directory = directory or run / "verify"
    with reported_errors():
        seed = settings.seed
        create_plan(directory, run, n_targets=n_targets, seed=seed)
        matrices = _scores(run, directory, methods, checkpoints, settings, progress)
        for item in scores or []:
            name, _, path = item.partition("=")
            if not path:
                raise ValueError(f"--scores {item!r}: expected NAME=FILE.npy")
            matrices[name] = np.load(path)
        results = linear_datamodeling(directory, matrices, n_models=models, alpha=alpha, seed=seed, output=output,
                                      workers=workers, progress=progress)
    table = Table(title=f"Linear datamodeling score (M={models}, α={alpha:g}, output: {output})")
    for column in ("method", "LDS", "95 % CI", "targets"):
        table.add_column(column)
    for name, result in results.items():
        table.add_row(name, f"{result.mean:.3f}", f"[{result.low:.3f}, {result.high:.3f}]",
                      f"{result.n_targets - result.n_undefined}")
    console.print(table)
    summary = {name: {"lds": result.mean, "low": result.low, "high": result.high,
                      "per_target": [float(value) for value in result.per_target]}
               for name, result in results.items()}
    write_json_atomic(directory / "lds.json", {"models": models, "alpha": alpha, "output": output,
                                               "results": summary})
    console.print(f"written: {directory / 'lds.json'}")


@verify_app.command("retrain", help="Remove each method's top-k proponents of some targets, retrain, measure the drop.")
@with_attribution_settings
def retrain_command(
    run: Run, directory: Directory = None, methods: Methods = "trak,embedding,random",
    targets: Annotated[int, typer.Option(help="The first N targets of the plan are tested.")] = 4,
    k: Annotated[str, typer.Option(help="Comma-separated numbers of proponents removed.")] = "10,20,40",
    n_targets: NTargets = 50, checkpoints: Checkpoints = None, workers: Workers = 1, progress: Progress = True,
    settings: AttributionSettings = AttributionSettings(),
) -> None:
    import csv

    from cliptrace.verify.experiments import remove_and_retrain, removal_plot
    from cliptrace.verify.retrain import create_plan

    directory = directory or run / "verify"
    with reported_errors():
        plan = create_plan(directory, run, n_targets=n_targets, seed=settings.seed)
        matrices = _scores(run, directory, methods, checkpoints, settings, progress)
        ks = [int(value) for value in k.split(",") if value.strip()]
        rows = remove_and_retrain(directory, matrices, list(range(min(targets, len(plan.target_ids)))), ks,
                                  workers=workers, progress=progress)
    with (directory / "removal.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot = removal_plot(rows, directory / "removal.png")
    table = Table(title="Mean drop of the target's output after removing its top-k and retraining")
    for column in ("method", "k", "drop in logit", "drop in margin"):
        table.add_column(column)
    for name in dict.fromkeys(row["method"] for row in rows):
        for size in ks:
            mine = [row for row in rows if row["method"] == name and row["k"] == size]
            table.add_row(name, str(size), f"{np.mean([r['drop_logit'] for r in mine]):.3f}",
                          f"{np.mean([r['drop_margin'] for r in mine]):.3f}")
    console.print(table)
    console.print(f"written: {directory / 'removal.csv'}, {plot}")
