"""``cliptrace report RUN``: the HTML report of any training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_attribution_settings, with_data_options
from cliptrace.data.options import DataOptions
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings

console = Console()


@with_attribution_settings
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
    checkpoints: Annotated[Optional[int], typer.Option(
        help="The attribution ensembles the last K checkpoints (default: all).")] = None,
    attribution_method: Annotated[str, typer.Option(
        "--attribution-method", help="Data-attribution method (list them with: cliptrace trak methods).")] = (
        DEFAULT_METHOD),
    store: Annotated[Optional[Path], typer.Option(
        help="Feature store directory (default: RUN/trak/features/NAME, NAME from the feature settings).")] = None,
    on_bad_sample: Annotated[Literal["fail", "skip"], typer.Option(
        help="fail: stop at the first broken row or bad image. skip: leave bad samples out (as cliptrace train "
             "--on-bad-sample skip does).")] = "fail",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    data_options: DataOptions = DataOptions(),
    settings: AttributionSettings = AttributionSettings(),
) -> None:
    from cliptrace.report import build_report

    with reported_errors():
        summary = build_report(run, data, data_options=data_options, out=out, n_targets=n_targets, target_split=target_split, top_k=top_k,
                               methods=[name.strip() for name in method.split(",") if name.strip()],
                               checkpoints=checkpoints, attribution_method=attribution_method, settings=settings,
                               store_dir=store, on_bad_sample=on_bad_sample, progress=progress)
    console.print(f"report: [bold]{summary.index}[/bold] ({summary.n_targets} targets)")
