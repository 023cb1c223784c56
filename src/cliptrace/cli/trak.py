"""``cliptrace trak featurize|score|topk|methods``: data attribution on a training run, by any registered
method (TRAK by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_attribution_settings, with_data_options
from cliptrace.data.options import DataOptions
from cliptrace.train.config import run_config
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings
from cliptrace.train.run_dir import CONFIG

console = Console()
trak_app = typer.Typer(no_args_is_help=True)

Run = Annotated[Path, typer.Argument(help="Training run directory (from cliptrace train), or a model directory.")]
Data = Annotated[Optional[Path], typer.Argument(
    help="The training dataset (any supported format; default: the one RUN was trained on). The data options "
         "default to those RUN was trained with; options given here override them.", show_default=False)]
TrainSplit = Annotated[str, typer.Option(help="Split of DATA that was trained on ('' for all records).")]
Store = Annotated[Optional[Path], typer.Option(
    help="Feature store directory (default: RUN/trak/features/NAME, NAME from the feature settings).")]
Checkpoints = Annotated[Optional[int], typer.Option(help="Ensemble the last K checkpoints (default: all).")]
Method = Annotated[str, typer.Option(help="Attribution method (list them with: cliptrace trak methods).")]
Progress = Annotated[bool, typer.Option(help="Show progress bars.")]
Targets = Annotated[Optional[Path], typer.Option(
    help="Dataset of the targets (default: DATA), read with the same data options.")]
TargetSplit = Annotated[str, typer.Option(help="Split of the targets ('' for all records).")]
TargetIds = Annotated[Optional[str], typer.Option(help="Comma-separated record ids: only these targets.")]
Out = Annotated[Path, typer.Option(help="Directory for scores.npy, topk.csv/json and self_influence.csv.")]
TopK = Annotated[int, typer.Option(help="Proponents and opponents listed per target.")]
Devices = Annotated[int, typer.Option(
    help="Processes per node, each featurizing its shard of the training set and of the targets (on --device; "
         "launched here, or joined when started by torchrun or SLURM).")]
NumNodes = Annotated[int, typer.Option(help="Nodes of a distributed job.")]
CheckpointNames = Annotated[Optional[list[str]], typer.Option(
    "--checkpoint", help="Checkpoint name of RUN or a checkpoint directory of another run (repeatable); "
                         "overrides --checkpoints.")]
OnBadSample = Annotated[Literal["fail", "skip"], typer.Option(
    help="fail: stop at the first broken row or bad image. skip: leave out bad samples (the same checks as "
         "cliptrace train --on-bad-sample skip, so the same training records as that run) and list them in "
         "skipped.csv beside the outputs.")]


def _run_data(run: Path, data: Path | None, given: DataOptions) -> tuple[Path, DataOptions]:
    """DATA (default: the dataset RUN was trained on) and its data options: RUN's, overridden by those given.

    Raises:
        ValueError: No DATA and RUN is not a training run.
    """
    stored = run_config(run)
    if data is None:
        if stored is None:
            raise ValueError(f"{run}: not a training run (no {CONFIG} of one); give the training dataset DATA")
        data = Path(stored.data)
    return data, stored.data_options.overridden_by(given) if stored is not None else given


@trak_app.command("featurize", help="Featurize the training set under each checkpoint and solve the kernels "
                                    "(resumable).")
@with_attribution_settings
@with_data_options
def featurize_command(
    run: Run, data_options: DataOptions, settings: AttributionSettings, data: Data = None,
    train_split: TrainSplit = "train", method: Method = DEFAULT_METHOD, store: Store = None,
    checkpoints: Checkpoints = None, progress: Progress = True, on_bad_sample: OnBadSample = "fail",
    devices: Devices = 1, num_nodes: NumNodes = 1, checkpoint: CheckpointNames = None,
    stream: Annotated[bool, typer.Option(
        help="DATA is WebDataset shards: read the training records one shard at a time instead of holding them all "
             "in memory (the same records and store as without it; not with --on-bad-sample skip).")] = False,
) -> None:
    from cliptrace.attribution.stored import StoredGradientMethod
    from cliptrace.data.policy import SKIP_REPORT, BadSamplePolicy
    from cliptrace.data.stream import ShardIndex, ShardRecords
    from cliptrace.distributed import is_main, launch
    from cliptrace.trak.attribute import featurize

    with reported_errors():
        if stream and (on_bad_sample != "fail" or not train_split):
            raise ValueError("--stream reads the shards of one --train-split as they come; it cannot skip bad "
                             "samples up front")
        data, data_options = _run_data(run, data, data_options)
        ranks = launch(settings.device, devices, num_nodes)
        if ranks:
            settings = settings.replace(device=str(ranks.device))
        policy = BadSamplePolicy(on_bad_sample, progress=progress)
        train = ShardRecords(ShardIndex.scan(data, train_split), train_split) if stream else data
        prepared = featurize(run, train, method=method, settings=settings, store_dir=store,
                             checkpoints=checkpoint or checkpoints, train_split=train_split or None,
                             progress=progress, on_bad_sample=policy, ranks=ranks, data_options=data_options)
        if not is_main(ranks):
            return
        stores = prepared.stores if isinstance(prepared, StoredGradientMethod) else []
        report = policy.write_report(stores[-1].directory / SKIP_REPORT) if stores else None
    count = len(prepared.training.records)
    if stores:
        console.print(f"{method}: features of {count} training records under {len(stores)} checkpoint(s) in "
                      f"{stores[-1].directory}")
    else:
        console.print(f"{method}: nothing to store (it needs no gradient features); {count} training records")
    _print_notes(prepared.notes)
    _print_skipped(policy.summary(report))


def _print_notes(notes: dict) -> None:
    """Print what the method chose on its own, one line per checkpoint (e.g. the ridge term)."""
    for checkpoint_id, note in notes.items():
        choice = note.get("choice")
        detail = f" (damping {choice['damping']:g} chosen by {choice['criterion']})" if choice else ""
        if "lambda_reg" in note:
            console.print(f"{checkpoint_id}: ridge term λ = {note['lambda_reg']:.4g}{detail}")


@trak_app.command("methods", help="List the data-attribution methods, with when to use each.")
def methods_command() -> None:
    from cliptrace.attribution import METHODS

    table = Table(title="Data-attribution methods (--method NAME)")
    table.add_column("name")
    table.add_column("when to use it")
    for name, method in METHODS.items():
        table.add_row(name + (" (default)" if name == DEFAULT_METHOD else ""), method.summary)
    console.print(table)


def _print_skipped(summary: str | None) -> None:
    """Print the one-line summary of skipped samples, if any was skipped."""
    if summary:
        console.print(Text(summary))


def _attribute(run: Path, data: Path | None, data_options: DataOptions, targets: Path | None, target_split: str,
               target_ids: str | None, train_split: str, method: str, store: Path | None,
               checkpoints: int | list[str] | None, settings: AttributionSettings, top_k: int, full_scores: bool,
               out: Path, progress: bool, on_bad_sample: str, devices: int, num_nodes: int) -> None:
    from cliptrace.data.policy import SKIP_REPORT, BadSamplePolicy
    from cliptrace.distributed import launch
    from cliptrace.trak.attribute import attribute, read_records

    with reported_errors():
        data, data_options = _run_data(run, data, data_options)
        ranks = launch(settings.device, devices, num_nodes)
        if ranks:
            settings = settings.replace(device=str(ranks.device))
        policy = BadSamplePolicy(on_bad_sample, progress=progress)
        target_records = read_records(targets or data, target_split or None, policy, data_options)
        if target_ids:
            wanted = [item.strip() for item in target_ids.split(",") if item.strip()]
            by_id = {record.id: record for record in target_records}
            unknown = [item for item in wanted if item not in by_id]
            if unknown:
                raise ValueError(f"target ids not found in {targets or data}"
                                 f"{f' split {target_split!r}' if target_split else ''}: {', '.join(unknown)}")
            target_records = [by_id[item] for item in wanted]
        result = attribute(run, data, target_records, method=method, settings=settings, checkpoints=checkpoints,
                           store_dir=store, train_split=train_split or None, top_k=top_k, full_scores=full_scores,
                           progress=progress, on_bad_sample=policy, ranks=ranks, data_options=data_options)
        if result is None:  # another rank scores and writes
            return
        written = result.save(out)
        report = policy.write_report(out / SKIP_REPORT)
    table = Table(title=f"Top proponents by {method} ({len(result.targets)} targets, first 5 shown)")
    for column in ("target", "caption", "top proponent", "its caption", "score"):
        table.add_column(column)
    for column, target in enumerate(result.targets[:5]):
        index = int(result.top.proponents[column, 0])
        table.add_row(target.id, target.captions[0], result.train[index].id, result.train[index].captions[0],
                      f"{float(result.top.proponent_scores[column, 0]):.4g}")
    console.print(table)
    _print_notes(result.notes)
    console.print("written: " + ", ".join(str(path) for path in written))
    _print_skipped(policy.summary(report))


def _scoring_command(full_scores: bool):
    """The ``score`` (full matrix too) or ``topk`` (top-k tables and self-influence only) command."""

    @with_attribution_settings
    @with_data_options
    def command(
        run: Run, data_options: DataOptions, settings: AttributionSettings, data: Data = None,
        targets: Targets = None, target_split: TargetSplit = "test", target_ids: TargetIds = None,
        train_split: TrainSplit = "train", method: Method = DEFAULT_METHOD, store: Store = None,
        checkpoints: Checkpoints = None, top_k: TopK = 10, out: Out = Path("attribution"), progress: Progress = True,
        on_bad_sample: OnBadSample = "fail", devices: Devices = 1, num_nodes: NumNodes = 1,
        checkpoint: CheckpointNames = None,
    ) -> None:
        _attribute(run, data, data_options, targets, target_split, target_ids, train_split, method, store,
                   checkpoint or checkpoints, settings, top_k, full_scores, out, progress, on_bad_sample, devices,
                   num_nodes)

    return command


trak_app.command("score", help="Score targets against the training set: scores.npy, top-k tables, self-influence.")(
    _scoring_command(full_scores=True)
)
trak_app.command("topk", help="Top-k proponents/opponents per target and self-influence, without the full matrix.")(
    _scoring_command(full_scores=False)
)
