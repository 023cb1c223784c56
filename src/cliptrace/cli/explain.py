"""``cliptrace explain``: which patches and words drive a similarity — one image, or a whole dataset with metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.options import DataOptions

if TYPE_CHECKING:
    from cliptrace.explain.api import MethodFailed

console = Console()

DEFAULT_METHODS = "decomposition,gradient_x_input,integrated_gradients,occlusion,attention_rollout,chefer,gradcam"


def _names(methods: str) -> list[str]:
    from cliptrace.explain import method_names

    names = [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in method_names()]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(method_names())}")
    return names


def _runnable(model: object, names: list[str]) -> list[str]:
    """The default methods the model can run; one line names those skipped and why."""
    from cliptrace.explain.api import unavailable_methods

    if names != _names(DEFAULT_METHODS):
        return names  # methods the user chose run, and fail with an error line if they must
    skipped = unavailable_methods(model, names)
    if skipped:
        typer.echo(f"skipped {', '.join(skipped)}: {next(iter(skipped.values()))}", err=True)
    return [name for name in names if name not in skipped]


def _report_failure(model_dir: Path, failure: MethodFailed) -> None:
    """Print one ``error:`` line naming the model directory, the failed method and its problem."""
    typer.echo(f"error: {model_dir}, method {failure.method}: {failure.problem}", err=True)


def _require_some(model_dir: Path, names: list[str], failed: list[str], out: Path) -> None:
    """Refuse when every method failed: there is nothing to write to ``out``."""
    if len(failed) == len(names):
        raise ValueError(f"{model_dir}: every method failed ({', '.join(failed)}); nothing written to {out}")


def _lines(value: Optional[str], path: Optional[Path]) -> list[str] | None:
    """Comma-separated values, or the non-blank lines of a UTF-8 file."""
    if path is not None:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if value:
        return [item.strip() for item in value.split(",") if item.strip()]
    return None


@with_data_options
def explain_command(
    model: Annotated[Optional[Path], typer.Option(
        help="Model directory, or a training run (its final model/); not needed with --list-methods.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="The image to explain.")] = None,
    text: Annotated[Optional[str], typer.Option(help="The caption to explain the match with.")] = None,
    target_class: Annotated[Optional[str], typer.Option(
        "--class", help="Explain the match with this zero-shot class instead of a caption.")] = None,
    classes: Annotated[Optional[str], typer.Option(
        help="Comma-separated class names: contrast --class with the mean of the other classes.")] = None,
    templates: Annotated[Optional[Path], typer.Option(
        help="Prompt templates of --class, one per line with {} (default: the 80 ImageNet ones, as eval).")] = None,
    contrast: Annotated[Optional[Path], typer.Option(
        help="File of prompts, one per line: explain the caption minus the prompts' mean embedding.")] = None,
    method: Annotated[str, typer.Option(help="Comma-separated methods (see --list-methods).")] = DEFAULT_METHODS,
    out: Annotated[Path, typer.Option(help="PNG with one heatmap column per method (and token bars).")] = Path(
        "explanation.png"),
    list_methods: Annotated[bool, typer.Option(help="Print the available methods and exit.")] = False,
    data: Annotated[Optional[Path], typer.Option(
        help="Batch mode: explain a dataset's images and write a metrics table to --out (a directory).")] = None,
    split: Annotated[str, typer.Option(help="Batch mode: split of --data ('' for all records).")] = "test",
    limit: Annotated[int, typer.Option(help="Batch mode: explain at most this many targets.")] = 100,
    steps: Annotated[int, typer.Option(help="Batch mode: points on each deletion/insertion curve.")] = 16,
    seed: Annotated[int, typer.Option(help="Batch mode: seed of the target sample and the random baseline.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    data_options: DataOptions = DataOptions(),
) -> None:
    from cliptrace.evaluate import IMAGENET_TEMPLATES, load_templates
    from cliptrace.explain import method_names
    from cliptrace.models.directory import model_directory_of

    if list_methods:
        console.print("\n".join(method_names()))
        return
    with reported_errors():
        if model is None:
            raise ValueError("give --model (a model directory or a training run), or --list-methods")
        names = _names(method)
        prompts = load_templates(templates) if templates else IMAGENET_TEMPLATES
        if data is not None:
            _batch(model_directory_of(model), data, data_options, split, limit, names, prompts, out, steps, seed,
                   progress)
            return
        if image is None:
            raise ValueError("give --image (and --text or --class), or --data for batch mode")
        _single(model_directory_of(model), image, text, target_class, _lines(classes, None), _lines(None, contrast),
                names, prompts, out)


def _single(model_dir: Path, image_path: Path, text: str | None, target_class: str | None,
            classes: list[str] | None, contrast: list[str] | None, names: list[str], templates: Sequence[str],
            out: Path) -> None:
    from PIL import Image

    from cliptrace.explain import explain
    from cliptrace.explain.api import MethodFailed
    from cliptrace.explain.plot import method_grid, save_figure
    from cliptrace.models import load_model

    model = load_model(model_dir).eval()
    names = _runnable(model, names)
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}: no such image file")
    with Image.open(image_path) as opened:
        picture = opened.convert("RGB")
    pixels = model.preprocess(picture).unsqueeze(0)
    results, failed = [], []
    for name in names:
        try:
            results.append(explain(model, pixels, text, target_class=target_class, classes=classes,
                                   contrast=contrast, templates=templates, method=name))
        except MethodFailed as failure:
            _report_failure(model_dir, failure)
            failed.append(name)
    _require_some(model_dir, names, failed, out)
    figure = method_grid(model.preprocess.unnormalize(pixels[0]), results,
                         caption=text if text is not None else f"class: {target_class}")
    save_figure(figure, out)
    table = Table(title=f"{image_path.name} · {text if text is not None else target_class}")
    for column in ("method", "logit", "seconds", "top tokens"):
        table.add_column(column)
    for result in results:
        top = ""
        if result.text_map is not None and result.tokens:
            scores = result.text_map[0, : len(result.tokens[0])]
            order = scores.argsort(descending=True)[:3].tolist()
            top = ", ".join(f"{result.tokens[0][i].strip()} ({scores[i]:.3g})" for i in order)
        table.add_row(result.method, f"{float(result.logit[0]):.6g}", f"{result.seconds:.3f}", top)
    console.print(table)
    console.print(f"written: {out}")
    _exit_if_failed(failed, names)


def _batch(model_dir: Path, data: Path, data_options: DataOptions, split: str, limit: int, names: list[str],
           templates: Sequence[str], out: Path, steps: int, seed: int, progress: bool) -> None:
    import csv

    from cliptrace.explain import explain
    from cliptrace.explain.api import MethodFailed
    from cliptrace.explain.evaluation import evaluate_methods, load_cases, summarize, summary_markdown
    from cliptrace.explain.plot import method_grid, save_figure
    from cliptrace.models import load_model

    model = load_model(model_dir).eval()
    names = _runnable(model, names)
    cases = load_cases(model, data, data_options=data_options, split=split or None, limit=limit, seed=seed)
    rows, failed = [], []
    for name in names:  # one method at a time, so a failing one leaves the others' rows
        try:
            rows += evaluate_methods(model, cases, [name], templates=templates, steps=steps, progress=progress)
        except MethodFailed as failure:
            _report_failure(model_dir, failure)
            failed.append(name)
    _require_some(model_dir, names, failed, out)
    kept = [name for name in names if name not in failed]
    summary = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in (("metrics.csv", rows), ("summary.csv", summary)):
        columns = list(dict.fromkeys(key for row in table for key in row))
        with (out / name).open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
    markdown = summary_markdown(summary)
    (out / "summary.md").write_text(markdown, encoding="utf-8")
    for case in cases[:4]:
        results = [explain(model, case.pixels[None], case.caption, target_class=case.target_class,
                           templates=templates, method=name)
                   for name in kept]
        label = case.caption if case.caption is not None else f"class: {case.target_class}"
        save_figure(method_grid(model.preprocess.unnormalize(case.pixels), results, caption=label),
                    out / "examples" / f"{case.id}.png")
    console.print(markdown)
    console.print(f"{len(cases)} cases × {len(kept)} methods; written: {out / 'metrics.csv'}, "
                  f"{out / 'summary.csv'}, {out / 'summary.md'}, {out / 'examples'}/")
    _exit_if_failed(failed, names)


def _exit_if_failed(failed: list[str], names: list[str]) -> None:
    """Exit with status 1 after the other methods' outputs are written when any method failed."""
    if failed:
        typer.echo(f"{len(failed)} of {len(names)} methods failed ({', '.join(failed)}); the others were written",
                   err=True)
        raise typer.Exit(1)
