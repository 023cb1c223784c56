"""``cliptrace trak featurize|score|topk``: TRAK data attribution on a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_data_options
from cliptrace.data.options import DataOptions
from cliptrace.train.config import run_config
from cliptrace.train.run_dir import CONFIG

console = Console()
trak_app = typer.Typer(no_args_is_help=True)

Run = Annotated[Path, typer.Argument(help="Training run directory (from cliptrace train), or a model directory.")]
Data = Annotated[Optional[Path], typer.Argument(
    help="The training dataset (any supported format; default: the one RUN was trained on). The data options "
         "default to those RUN was trained with; options given here override them.", show_default=False)]
TrainSplit = Annotated[str, typer.Option(help="Split of DATA that was trained on ('' for all records).")]
Store = Annotated[Optional[Path], typer.Option(help="Feature store directory (default: RUN/trak/store).")]
Checkpoints = Annotated[Optional[int], typer.Option(help="Ensemble the last K checkpoints (default: all).")]
ProjDim = Annotated[int, typer.Option(help="Projection dimension k (0: no projection, raw gradients).")]
Projection = Annotated[str, typer.Option(help="rademacher or gaussian.")]
Seed = Annotated[int, typer.Option(help="Seed of the projection and of the negative-bank draw.")]
BankSize = Annotated[int, typer.Option(help="Training pairs in the CLIP margin's negative bank.")]
Parameters = Annotated[
    Optional[list[str]], typer.Option("--parameter", help="Parameter name or glob to differentiate (repeatable).")
]
LambdaReg = Annotated[float, typer.Option(help="Ridge term added to XᵀX.")]
BatchSize = Annotated[int, typer.Option(help="Records featurized at once.")]
Dtype = Annotated[str, typer.Option(help="float32 or float64 for features and the kernel solve.")]
Device = Annotated[str, typer.Option(help="Torch device, e.g. cpu or cuda.")]
Features = Annotated[str, typer.Option(
    help="Feature path: factored (hooks on linear-type layers, about the cost of a training step), exact "
         "(per-example gradients + dense projection, the reference), or auto (factored unless --proj-dim 0).")]
LayerDim = Annotated[int, typer.Option(help="Factored path: width each side of a layer is projected to.")]
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


def _settings(proj_dim: int, projection: str, seed: int, bank_size: int, parameters: list[str] | None,
              lambda_reg: float, batch_size: int, dtype: str, device: str, features: str, layer_dim: int):
    from cliptrace.trak.attribute import AttributionSettings

    return AttributionSettings(proj_dim or None, projection, seed, bank_size, tuple(parameters) if parameters else None,
                               lambda_reg, batch_size, dtype, device, features, layer_dim)


def _store_dir(run: Path, store: Path | None) -> Path:
    return store if store is not None else run / "trak" / "store"


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


@trak_app.command("featurize", help="Featurize the training set under each checkpoint (resumable).")
@with_data_options
def featurize_command(
    run: Run, data_options: DataOptions, data: Data = None, train_split: TrainSplit = "train", store: Store = None, checkpoints: Checkpoints = None,
    proj_dim: ProjDim = 2048, projection: Projection = "rademacher", seed: Seed = 0, bank_size: BankSize = 1024,
    parameters: Parameters = None, lambda_reg: LambdaReg = 0.0, batch_size: BatchSize = 16, dtype: Dtype = "float32",
    device: Device = "cpu", features: Features = "auto", layer_dim: LayerDim = 32, progress: Progress = True,
    on_bad_sample: OnBadSample = "fail", devices: Devices = 1, num_nodes: NumNodes = 1,
    checkpoint: CheckpointNames = None,
    stream: Annotated[bool, typer.Option(
        help="DATA is WebDataset shards: read the training records one shard at a time instead of holding them all "
             "in memory (the same records and store as without it; not with --on-bad-sample skip).")] = False,
) -> None:
    from cliptrace.data.policy import SKIP_REPORT, BadSamplePolicy
    from cliptrace.data.stream import ShardIndex, ShardRecords
    from cliptrace.distributed import is_main, launch
    from cliptrace.trak.attribute import featurize

    with reported_errors():
        if stream and (on_bad_sample != "fail" or not train_split):
            raise ValueError("--stream reads the shards of one --train-split as they come; it cannot skip bad "
                             "samples up front")
        data, data_options = _run_data(run, data, data_options)
        ranks = launch(device, devices, num_nodes)
        settings = _settings(proj_dim, projection, seed, bank_size, parameters, lambda_reg, batch_size, dtype,
                             str(ranks.device) if ranks else device, features, layer_dim)
        policy = BadSamplePolicy(on_bad_sample, progress=progress)
        train = ShardRecords(ShardIndex.scan(data, train_split), train_split) if stream else data
        result = featurize(run, train, store_dir=_store_dir(run, store), checkpoints=checkpoint or checkpoints,
                           train_split=train_split or None, settings=settings, progress=progress,
                           on_bad_sample=policy, ranks=ranks, data_options=data_options)
        if not is_main(ranks):
            return
        report = policy.write_report(result.directory / SKIP_REPORT)
    console.print(f"features of {result.train_size} training records under {len(result.checkpoint_ids())} "
                  f"checkpoint(s) in {result.directory}")
    _print_skipped(policy.summary(report))


def _print_skipped(summary: str | None) -> None:
    """Print the one-line summary of skipped samples, if any was skipped."""
    if summary:
        console.print(Text(summary))


def _attribute(run: Path, data: Path | None, data_options: DataOptions, targets: Path | None, target_split: str,
               target_ids: str | None, train_split: str, store: Path | None, checkpoints: int | list[str] | None,
               settings, top_k: int, full_scores: bool, out: Path, progress: bool, on_bad_sample: str, devices: int,
               num_nodes: int) -> None:
    from cliptrace.data.policy import SKIP_REPORT, BadSamplePolicy
    from cliptrace.distributed import launch
    from cliptrace.trak.attribute import attribute, read_records

    with reported_errors():
        data, data_options = _run_data(run, data, data_options)
        ranks = launch(settings.device, devices, num_nodes)
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
        result = attribute(
            run, data, target_records, checkpoints=checkpoints, proj_dim=settings.proj_dim,
            projection=settings.projection, seed=settings.seed, bank_size=settings.bank_size,
            parameters=settings.parameters, lambda_reg=settings.lambda_reg, batch_size=settings.batch_size,
            score_dtype=settings.score_dtype, device=str(ranks.device) if ranks else settings.device,
            features=settings.features, layer_dim=settings.layer_dim, store_dir=_store_dir(run, store),
            train_split=train_split or None, top_k=top_k, full_scores=full_scores, progress=progress,
            on_bad_sample=policy, ranks=ranks, data_options=data_options,
        )
        if result is None:  # another rank scores and writes
            return
        written = result.save(out)
        report = policy.write_report(out / SKIP_REPORT)
    table = Table(title=f"Top proponents ({len(result.targets)} targets, first 5 shown)")
    for column in ("target", "caption", "top proponent", "its caption", "score"):
        table.add_column(column)
    for column, target in enumerate(result.targets[:5]):
        index = int(result.top.proponents[column, 0])
        table.add_row(target.id, target.captions[0], result.train[index].id, result.train[index].captions[0],
                      f"{float(result.top.proponent_scores[column, 0]):.4g}")
    console.print(table)
    console.print("written: " + ", ".join(str(path) for path in written))
    _print_skipped(policy.summary(report))


def _scoring_command(full_scores: bool):
    """The ``score`` (full matrix too) or ``topk`` (top-k tables and self-influence only) command."""

    @with_data_options
    def command(
        run: Run, data_options: DataOptions, data: Data = None, targets: Targets = None, target_split: TargetSplit = "test",
        target_ids: TargetIds = None, train_split: TrainSplit = "train", store: Store = None,
        checkpoints: Checkpoints = None, proj_dim: ProjDim = 2048, projection: Projection = "rademacher",
        seed: Seed = 0, bank_size: BankSize = 1024, parameters: Parameters = None, lambda_reg: LambdaReg = 0.0,
        batch_size: BatchSize = 16, dtype: Dtype = "float32", device: Device = "cpu", features: Features = "auto",
        layer_dim: LayerDim = 32, top_k: TopK = 10, out: Out = Path("attribution"), progress: Progress = True,
        on_bad_sample: OnBadSample = "fail", devices: Devices = 1, num_nodes: NumNodes = 1,
        checkpoint: CheckpointNames = None,
    ) -> None:
        settings = _settings(proj_dim, projection, seed, bank_size, parameters, lambda_reg, batch_size, dtype, device,
                             features, layer_dim)
        _attribute(run, data, data_options, targets, target_split, target_ids, train_split, store, checkpoint or checkpoints,
                   settings, top_k, full_scores, out, progress, on_bad_sample, devices, num_nodes)

    return command


trak_app.command("score", help="Score targets against the training set: scores.npy, top-k tables, self-influence.")(
    _scoring_command(full_scores=True)
)
trak_app.command("topk", help="Top-k proponents/opponents per target and self-influence, without the full matrix.")(
    _scoring_command(full_scores=False)
)
