"""``cliptrace data check`` and ``cliptrace data preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.data.check import CheckReport, check_dataset
from cliptrace.data.images import ImageLoader
from cliptrace.data.preview import contact_sheet
from cliptrace.data.readers import load_records, select_split
from cliptrace.data.record import DatasetError

data_app = typer.Typer(help="Validate and preview datasets.", no_args_is_help=True, pretty_exceptions_show_locals=False)

PathArgument = Annotated[
    Path, typer.Argument(help="Dataset: CSV/TSV, JSONL, COCO or Karpathy JSON, .tar shards or a glob, or a folder.")
]
FormatOption = Annotated[
    str, typer.Option("--format", help="csv, jsonl, coco, karpathy, webdataset, imagefolder, or auto.")
]


def _separator(sep: str) -> str:
    """A separator as typed on a command line: ``tab`` and ``\\t`` stand for a tab."""
    return "\t" if sep in ("tab", "\\t") else sep


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
def check_command(
    path: PathArgument,
    data_format: FormatOption = "auto",
    image_key: Annotated[Optional[str], typer.Option(help="Image column or key (CSV, JSONL).")] = None,
    caption_key: Annotated[
        Optional[list[str]], typer.Option(help="Caption column or key; repeat for several CSV caption columns.")
    ] = None,
    sep: Annotated[
        Optional[str], typer.Option(help="CSV separator; 'tab' for a tab (default: tab for .tsv, else comma).")
    ] = None,
    images: Annotated[bool, typer.Option(help="Also open and decode every image.")] = True,
    allow_outside_root: Annotated[bool, typer.Option(
        help="Do not warn of image paths that leave the dataset root (../, absolute paths elsewhere).")] = False,
) -> None:
    """List every broken row and unreadable image; exit with status 1 when there is any.

    Image paths that leave the dataset root are listed as warnings (they do not change the exit status).
    """
    options: dict = {}
    if image_key is not None:
        options["image_key"] = image_key
    if caption_key:
        options["caption_key"] = caption_key[0] if len(caption_key) == 1 else caption_key
    if sep is not None:
        options["sep"] = _separator(sep)
    console = Console()
    report = check_dataset(path, data_format, check_images=images, allow_outside_root=allow_outside_root, **options)
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
def preview_command(
    path: PathArgument,
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    n: Annotated[int, typer.Option(min=1, help="Most images shown.")] = 16,
    columns: Annotated[int, typer.Option(min=1, help="Images per row.")] = 4,
    split: Annotated[Optional[str], typer.Option(help="Only records of this split (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random choice of records.")] = 0,
    data_format: FormatOption = "auto",
) -> None:
    """Write a contact sheet: a grid of randomly chosen images with their captions."""
    console = Console()
    with reported_errors():
        records = select_split(load_records(path, data_format), split)
        if not records:
            raise DatasetError(str(path), None, f"no records in split {split!r}" if split else "no records")
        written = contact_sheet(records, ImageLoader(), out, n=n, columns=columns, seed=seed)
    console.print(Text(f"wrote {written} ({min(n, len(records))} of {len(records)} records)"))
