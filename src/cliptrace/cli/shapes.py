"""``cliptrace data shapes``: generate the shapes world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cliptrace.cli.errors import reported_errors

console = Console()


def shapes(
    out: Annotated[Path, typer.Argument(help="Directory to write the dataset to (absent or empty).")],
    n_images: Annotated[int, typer.Option(help="Generated images, before planted near-duplicates.")] = 2000,
    image_size: Annotated[int, typer.Option(help="Side of the square images in pixels (at least 32).")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes byte-identical files.")] = 0,
    format: Annotated[str, typer.Option("--format", help="csv, jsonl or wds (WebDataset tar shards).")] = "csv",
    val_fraction: Annotated[float, typer.Option(help="Fraction of the images in the val split.")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Fraction of the images in the test split.")] = 0.1,
    max_objects: Annotated[int, typer.Option(help="Most objects per image (1 or 2).")] = 2,
    duplicates: Annotated[int, typer.Option(help="Near-duplicates of train images to plant.")] = 0,
    mislabeled: Annotated[int, typer.Option(help="Train images to give the captions of a different scene.")] = 0,
    shard_size: Annotated[int, typer.Option(help="Images per tar shard (wds format).")] = 1000,
    progress: Annotated[bool, typer.Option(help="Show a progress bar while the images are written.")] = True,
) -> None:
    """Generate the shapes world and print where it was written and how many images each split holds."""
    from cliptrace.data.shapes import METADATA, generate_shapes_world

    with reported_errors():
        data = generate_shapes_world(
            out, n_images=n_images, image_size=image_size, seed=seed, format=format, val_fraction=val_fraction,
            test_fraction=test_fraction, max_objects=max_objects, n_duplicates=duplicates, n_mislabeled=mislabeled,
            shard_size=shard_size, progress=progress,
        )
    counts = json.loads((out / METADATA).read_text(encoding="utf-8"))["counts"]
    console.print(f"shapes world written to [bold]{out}[/bold]; read it from {data}")
    console.print(", ".join(f"{split}: {count}" for split, count in counts.items())
                  + f" (planted: {duplicates} near-duplicates, {mislabeled} mislabeled)")
