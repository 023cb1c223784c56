"""``cliptrace report RUN``: the HTML report of any training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.options import DataOptions

console = Console()


@with_data_options
def report_command(
    run: Annotated[Path, typer.Argument(help="Training run directory (from cliptrace train).")],
    data: Annotated[Optional[Path], typer.Option(help="The training dataset (default: the run's config.json).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: RUN/report); replaced.")] = None,
    n_targets: Annotated[int, typer.Option(help="Held-out targets drawn from --target-split.")] = 24,
    target_split: Annotated[str, typer.Option(help="Split the targets come from.")] = "test",
    top_k: Annotated[int, typer.Option(help="Proponents and opponents shown per target.")] = 8,
    method: Annotated[str, typer.Option(help="Comma-separated input-attribution methods per target.")] = (
        "decomposition,chefer"),
    checkpoints: Annotated[Optional[int], typer.Option(help="TRAK ensembles the last K checkpoints.")] = 3,
    proj_dim: Annotated[int, typer.Option(help="TRAK projection dimension.")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed of the target draw and of TRAK.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    data_options: DataOptions = DataOptions(),
) -> None:
    from cliptrace.report import build_report

    with reported_errors():
        summary = build_report(run, data, data_options=data_options, out=out, n_targets=n_targets, target_split=target_split, top_k=top_k,
                               methods=[name.strip() for name in method.split(",") if name.strip()],
                               checkpoints=checkpoints, proj_dim=proj_dim, seed=seed, progress=progress)
    console.print(f"report: [bold]{summary.index}[/bold] ({summary.n_targets} targets)")
