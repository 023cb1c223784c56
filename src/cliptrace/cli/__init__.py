"""The ``cliptrace`` command line: one entry point for every capability."""

from __future__ import annotations

import typer

from cliptrace.cli.curate import curate_command
from cliptrace.cli.data import data_app
from cliptrace.cli.evaluate import eval_command, retrieve_command
from cliptrace.cli.explain import explain_command
from cliptrace.cli.report import report_command
from cliptrace.cli.shapes import shapes
from cliptrace.cli.demo import demo_command
from cliptrace.cli.train import train_command
from cliptrace.cli.trak import trak_app
from cliptrace.cli.verify import verify_app

app = typer.Typer(
    help="Train, evaluate and explain CLIP-style image-text models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app.command("shapes", help="Generate the shapes world, the embedded synthetic dataset.")(shapes)


@app.callback()
def _quiet_libraries() -> None:
    """Keep the terminal for cliptrace's own progress: no per-file progress bars from transformers."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


app.add_typer(data_app, name="data", help="Generate, validate and preview datasets.")
app.command("train", help="Train a CLIP model contrastively on an image-caption dataset.")(train_command)
app.command("eval", help="Evaluate a model: retrieval R@k and zero-shot classification.")(eval_command)
app.command("retrieve", help="Query a model by eye: top-k images for a caption, or captions for an image.")(
    retrieve_command
)
app.command("explain", help="Input attribution: which image patches and caption words drive a similarity.")(
    explain_command
)
app.command("report", help="Build the HTML report of a training run: model card, attributions, heatmaps.")(
    report_command
)
app.command("curate", help="Find harmful training pairs by attribution, write the curated dataset, prove it by "
                          "retraining.")(curate_command)
app.add_typer(verify_app, name="verify", help="Is an attribution right? LDS and remove-and-retrain by retraining.")
app.add_typer(trak_app, name="trak", help="Data attribution with TRAK: which training pairs drive a judgment.")
app.command(
    "demo", help="The whole pipeline on the shapes world: train, evaluate, attribute, explain, report."
)(demo_command)
