"""``cliptrace data check`` and ``cliptrace data preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.check import CheckReport, check_dataset
from cliptrace.data.images import ImageLoader
from cliptrace.data.preview import contact_sheet
from cliptrace.data.options import DataOptions
from cliptrace.data.readers import SUPPORTED, select_split
from cliptrace.data.record import DatasetError

data_app = typer.Typer(help="Validate and preview datasets.", no_args_is_help=True, pretty_exceptions_show_locals=False)

PathArgument = Annotated[Path, typer.Argument(help=f"Dataset: {SUPPORTED}.")]


def _summary(report: CheckReport) -> str:
    """Records, captions and records per split, in one line."""
    splits = ", ".join(f"{split} {count}" for split, count in report.splits.items()) or "none"
    return f"{report.records} records, {report.captions} captions; splits: {splits}"


def _table(title: str, problems: list[DatasetError], kind: str = "problem") -> Table:
    """Problems (or warnings: ``kind``) as a table of file, where and what."""
    table = Table(title=Text(title), title_justify="left")
    for name in ("file", "where", kind):
        table.add_column(name, overflow="fold")
    for problem in problems:
        table.add_row(Text(problem.source), Text(str(problem.location or "")), Text(problem.problem))
    return table


@data_app.command("check")
@with_data_options
def check_command(
    path: PathArgument,
    data_options: DataOptions,
    images: Annotated[bool, typer.Option(help="Also open and decode every image.")] = True,
    allow_outside_root: Annotated[bool, typer.Option(
        help="Do not warn of image paths that leave the dataset root (../, absolute paths elsewhere).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while the images are decoded.")] = True,
) -> None:
    """List every broken row and unreadable image; exit with status 1 when there is any.

    Image paths that leave the dataset root are listed as warnings (they do not change the exit status).
    """
    console = Console()
    report = check_dataset(path, data_options, check_images=images, allow_outside_root=allow_outside_root,
                           progress=progress)
    if report.warnings:
        console.print(_table(f"{len(report.warnings)} warning(s) in {path}", report.warnings, "warning"))
        console.print(Text("images outside the dataset root are read all the same; pass --allow-outside-root if "
                           "they are meant to be there", style="yellow"))
    if report.ok:
        console.print(Text.assemble(("OK", "green"), f" {path}: {_summary(report)}"))
        return
    console.print(_table(f"{len(report.problems)} problem(s) in {path}", report.problems))
    console.print(Text(_summary(report)))
    raise typer.Exit(code=1)


@data_app.command("preview")
@with_data_options
def preview_command(
    path: PathArgument,
    data_options: DataOptions,
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    n: Annotated[int, typer.Option(min=1, help="Most images shown.")] = 16,
    columns: Annotated[int, typer.Option(min=1, help="Images per row.")] = 4,
    split: Annotated[Optional[str], typer.Option(help="Only records of this split (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choice of records.")] = 0,
) -> None:
    """Write a contact sheet: a grid of randomly chosen images with their captions."""
    console = Console()
    with reported_errors():
        records = select_split(data_options.load(path), split)
        if not records:
            raise DatasetError(str(path), None, f"no records in split {split!r}" if split else "no records")
        written = contact_sheet(records, ImageLoader(), out, n=n, columns=columns, seed=seed)
    console.print(Text(f"wrote {written} ({min(n, len(records))} of {len(records)} records)"))
