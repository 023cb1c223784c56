"""``cliptrace curate``: rank a run's training pairs by measured harm, write the curated dataset, and (with
``--verify``) prove it by retraining against no filtering, random removal and CLIP-score filtering."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cliptrace.cli.errors import reported_errors
from cliptrace.cli.options import with_attribution_settings, with_data_options
from cliptrace.cli.trak import Checkpoints, Data, Method, Progress, TrainSplit, _run_data
from cliptrace.curate.filters import DEFAULT_FILTER, FILTERS
from cliptrace.data.options import DataOptions
from cliptrace.trak.settings import DEFAULT_METHOD, AttributionSettings

console = Console()


@with_attribution_settings
@with_data_options
def curate_command(
    run: Annotated[Path, typer.Argument(help="Training run directory (from cliptrace train).")],
    data_options: DataOptions, settings: AttributionSettings, data: Data = None,
    val: Annotated[Optional[Path], typer.Option(
        help="Dataset of the validation pairs whose objective harm is measured on (default: DATA).")] = None,
    val_split: Annotated[str, typer.Option(help="Split of the validation pairs.")] = "val",
    test_split: Annotated[str, typer.Option(help="Split of DATA the --verify retrainings are measured on.")] = "test",
    train_split: TrainSplit = "train",
    filter: Annotated[str, typer.Option(help=f"How pairs are ranked for removal: {', '.join(FILTERS)}.")] = (
        DEFAULT_FILTER),
    fraction: Annotated[float, typer.Option(help="Share of the training pairs removed.")] = 0.1,
    budget: Annotated[Optional[int], typer.Option(help="Training pairs removed (overrides --fraction).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="New curation directory (default: RUN/curate).")] = None,
    method: Method = DEFAULT_METHOD, checkpoints: Checkpoints = None,
    duplicate_threshold: Annotated[float, typer.Option(
        help="Cosine similarity of image embeddings from which a pair is reported as a near-duplicate.")] = 0.998,
    verify: Annotated[bool, typer.Option(
        help="Retrain the run's recipe on every filter's curated set and on all pairs, over --seeds seeds, and "
             "compare test retrieval R@1 and, where the records have labels, zero-shot top-1 (cached in "
             "RUN/curate-retrain).")] = False,
    seeds: Annotated[int, typer.Option(help="Seeds per retrained arm (--verify).")] = 3,
    workers: Annotated[int, typer.Option(help="Processes retraining at once (--verify).")] = 1,
    progress: Progress = True,
) -> None:
    from cliptrace.curate.curation import removal_budget, write_curation
    from cliptrace.curate.filters import get_filter
    from cliptrace.curate.signals import measure_signals
    from cliptrace.data.readers import format_of, select_split

    with reported_errors():
        data, data_options = _run_data(run, data, data_options)
        out = out or run / "curate"
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out}: not empty; choose a new --out")
        records = data_options.load(data)
        train = select_split(records, train_split or None)
        val_records = select_split(data_options.load(val) if val else records, val_split or None)
        signals = measure_signals(run, train, val_records, method=method, settings=settings, checkpoints=checkpoints,
                                  duplicate_threshold=duplicate_threshold, progress=progress)
        removed = removal_budget(len(train), None if budget is not None else fraction, budget)
        ranking = get_filter(filter).rank(signals, settings.seed)
        curation = write_curation(out, records, signals, ranking, removed, format=format_of(data, data_options.format),
                                  summary={"run": str(run), "data": str(data), "filter": filter, "method": method,
                                           "val": str(val or data), "val_split": val_split})
    console.print(f"{filter}: removed {len(curation.removed)} of {len(train)} training pairs; curated dataset "
                  f"{curation.dataset}, ranking {out / 'curation.csv'}")
    if verify:
        with reported_errors():
            _verify(run, out, signals, removed, select_split(records, test_split), seeds, workers)


def _verify(run: Path, out: Path, signals, removed: int, test: list, seeds: int, workers: int) -> None:
    """Retrain every arm; write ``OUT/verify.csv`` (per job), ``OUT/verify.json`` (per metric, the arms compared)
    and ``OUT/verify.png``; print the comparisons."""
    import csv

    from cliptrace.curate.filters import get_filter
    from cliptrace.curate.retrain import (COMPARED_METRICS, NO_FILTER, RetrainJob, compare_arms, comparison_plot,
                                          run_retraining)
    from cliptrace.files import atomic_file, write_json_atomic

    if not test:
        raise ValueError("--verify needs test records (--test-split) to measure the retrained models on")
    jobs = []
    for seed in range(seeds):
        jobs.append(RetrainJob(NO_FILTER, 0, seed, signals.ids))
        for name in FILTERS:
            dropped = {signals.ids[i] for i in get_filter(name).rank(signals, seed).removed(removed)}
            jobs.append(RetrainJob(name, removed, seed, tuple(i for i in signals.ids if i not in dropped)))
    rows = run_retraining(run, run / "curate-retrain", jobs, test, workers=workers)
    with atomic_file(out / "verify.csv") as path, path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    comparisons = [{"metric": metric, "arms": compare_arms(rows, metric, reference=DEFAULT_FILTER)}
                   for metric in COMPARED_METRICS if all(metric in row for row in rows)]
    write_json_atomic(out / "verify.json", {"seeds": seeds, "removed": removed, "reference": DEFAULT_FILTER,
                                            "comparisons": comparisons})
    plot = comparison_plot(comparisons, out / "verify.png")
    for comparison in comparisons:
        table = Table(title=f"Test {comparison['metric']} after retraining ({seeds} seeds, {removed} pairs removed)")
        for column in ("arm", f"{comparison['metric']} [95 % CI]", f"{DEFAULT_FILTER} − arm [95 % CI]"):
            table.add_column(column)
        for row in comparison["arms"]:
            gap = "" if row["difference"] is None else (
                f"{row['difference']:+.2f} [{row['difference_low']:+.2f}, {row['difference_high']:+.2f}]")
            table.add_row(row["arm"], f"{row['mean']:.2f} [{row['low']:.2f}, {row['high']:.2f}]", gap)
        console.print(table)
    console.print(f"written: {out / 'verify.csv'}, {out / 'verify.json'}, {plot}")
