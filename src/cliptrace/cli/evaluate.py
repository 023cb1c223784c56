"""``cliptrace eval`` and ``cliptrace retrieve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.options import DataOptions
from cliptrace.data.readers import SUPPORTED
from cliptrace.data.record import Record

if TYPE_CHECKING:
    from cliptrace.data.policy import BadSamplePolicy
    from cliptrace.evaluate.query import QueryResult
    from cliptrace.models.base import DualEncoder

console = Console()
SHAPES_WORLD_META = "shapes_world.json"


@with_data_options
def eval_command(
    model: Annotated[Path, typer.Argument(help="Model directory, or a training run (its final model/).")],
    data: Annotated[Path, typer.Argument(help=f"Dataset: {SUPPORTED}.")],
    data_options: DataOptions,
    split: Annotated[str, typer.Option(help="Split to evaluate ('' for all records).")] = "test",
    classes: Annotated[
        Optional[Path],
        typer.Option(help="Class names, one per line (default: shapes_world.json beside the data, else the labels)."),
    ] = None,
    templates: Annotated[
        Optional[Path], typer.Option(help="Prompt templates, one per line with {} (default: the 80 ImageNet ones).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the metrics to this JSON file.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images or texts embedded at once.")] = 64,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    on_bad_sample: Annotated[Literal["fail", "skip"], typer.Option(
        help="fail: stop at the first broken row or bad image. skip: decode every image of the split once up front "
             "and evaluate without the bad samples (listed in OUT_STEM.skipped.csv beside --out).")] = "fail",
) -> None:
    """Print retrieval R@k (and zero-shot accuracy when there are classes) of a model on a dataset split."""
    from cliptrace.data.policy import BadSamplePolicy
    from cliptrace.evaluate import IMAGENET_TEMPLATES, evaluate, format_metrics_table, load_classnames, load_templates

    with reported_errors():
        policy = BadSamplePolicy(on_bad_sample, progress=progress)
        records = _records(data, data_options, split or None, policy)
        classnames = None
        if classes is not None:
            classnames = load_classnames(classes)
        elif any(record.label is not None for record in records):
            classnames = _shapes_world_classes(data)  # None: evaluate() takes the labels as the classes
        prompts = load_templates(templates) if templates else IMAGENET_TEMPLATES
        encoder = _model(model, device)
        metrics = evaluate(
            encoder, records, policy.loader, classnames=classnames, templates=prompts, batch_size=batch_size,
            device=device, progress=progress,
        )
    title = Text(f"{model} on {data}" + (f", split {split!r}" if split else ""))
    console.print(format_metrics_table(metrics, title=title))
    report = None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        console.print(f"metrics written to {out}")
        report = policy.write_report(out.with_name(f"{out.stem}.skipped.csv"))
    summary = policy.summary(report)
    if summary:
        console.print(Text(summary))


@with_data_options
def retrieve_command(
    model: Annotated[Path, typer.Argument(help="Model directory, or a training run (its final model/).")],
    data: Annotated[Path, typer.Argument(help="Dataset whose images (or captions) are searched.")],
    data_options: DataOptions,
    text: Annotated[Optional[str], typer.Option(help="Caption to query: find the closest images.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="Image to query: find the closest captions.")] = None,
    k: Annotated[int, typer.Option(help="How many of the best matches to show.")] = 5,
    split: Annotated[Optional[str], typer.Option(help="Search only this split (default: all records).")] = None,
    out: Annotated[Path, typer.Option(help="PNG to draw the matches and the similarity histogram to.")] = Path(
        "retrieval.png"
    ),
    true_id: Annotated[
        Optional[str], typer.Option(help="Id of the record that is the correct answer, to mark it.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images or texts embedded at once.")] = 64,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Show the top-k images for a caption (--text) or the top-k captions for an image (--image)."""
    from cliptrace.data.images import ImageLoader
    from cliptrace.data.policy import BadSamplePolicy
    from cliptrace.evaluate import image_query, plot_image_query, plot_text_query, text_query

    if (text is None) == (image is None):
        raise typer.BadParameter("give exactly one of --text and --image", param_hint="--text / --image")
    loader = ImageLoader()
    with reported_errors():
        records = _records(data, data_options, split, BadSamplePolicy(loader=loader, progress=progress))
        encoder = _model(model, device)
        options = dict(k=k, true_id=true_id, batch_size=batch_size, device=device, progress=progress)
        if text is not None:
            result = text_query(encoder, text, records, loader, **options)
            plot_text_query(result, loader, out)
        else:
            result = image_query(encoder, loader.load(str(image)), records, **options)
            plot_image_query(result, out)
    console.print(_matches_table(result, f"query: {text}" if text is not None else f"query image: {image}"))
    if result.true_match is not None:
        true = result.true_match
        total = len(result.similarities)
        console.print(Text(f"true {true_id}: rank {true.rank} of {total}, similarity {true.similarity:.4f}"))
    console.print(f"plot written to {out}")


def _matches_table(result: QueryResult, title: str) -> Table:
    """The top-k matches of a query as a table; true matches in green, captions only for image queries."""
    table = Table(title=Text(title))
    with_captions = not isinstance(result.query, str)
    for column in ("rank", "similarity", "probability", "record", *(("caption",) if with_captions else ())):
        table.add_column(column, justify="right" if column in ("rank", "similarity", "probability") else "left")
    for match in result.matches:
        caption = (Text(match.caption or ""),) if with_captions else ()
        style = "green" if match.is_true else None
        table.add_row(str(match.rank), f"{match.similarity:.4f}", f"{match.probability:.4f}", Text(match.record.id),
                      *caption, style=style)
    return table


def _records(data: Path, data_options: DataOptions, split: str | None, policy: BadSamplePolicy) -> list[Record]:
    """The records of ``split`` (every record when None) under ``policy``; an error if none is left."""
    from cliptrace.data.readers import select_split

    records = policy.screen(select_split(policy.load(data, data_options), split))
    if not records:
        raise ValueError(f"{data}: no records" + (f" in split {split!r}" if split is not None else ""))
    return records


def _model(directory: Path, device: str) -> DualEncoder:
    """The model saved in ``directory`` (or the final ``model/`` of a training run), moved to ``device``."""
    from cliptrace.models import load_model
    from cliptrace.models.directory import model_directory_of

    return load_model(model_directory_of(directory)).to(device)


def _shapes_world_classes(data: Path) -> list[str] | None:
    """The class names of a shapes world's metadata file in or beside ``data``, if there is one."""
    candidates = [data / SHAPES_WORLD_META] if data.is_dir() else []
    candidates.append(data.parent / SHAPES_WORLD_META)
    meta = next((path for path in candidates if path.is_file()), None)
    if meta is None:
        return None
    try:
        return list(json.loads(meta.read_text(encoding="utf-8"))["classes"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{meta}: expected a JSON object with a 'classes' list ({error})") from None


