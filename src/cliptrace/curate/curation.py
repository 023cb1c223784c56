"""``cliptrace curate``: rank a run's training pairs by a filter, remove the first ones, write the curated dataset.

A curation directory holds, written together (into ``OUT.partial``, renamed to ``OUT`` when complete):

* ``data/``: the input dataset without the removed training pairs, in the input's format (every other split kept);
* ``curation.csv``: the removed pairs, most harmful first: ``rank, id, reason, score`` and the signals behind them;
* ``signals.csv``: every training pair's signals (see :class:`~cliptrace.curate.signals.Signals`);
* ``kept_ids.txt``: the kept training ids, for ``cliptrace train --train-ids``;
* ``curation.json``: what was done (run, data, format, method, filter, budget).

The original dataset files are only read.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cliptrace.curate.filters import Ranking
from cliptrace.curate.signals import Signals
from cliptrace.data.record import Record
from cliptrace.data.writers import write_records
from cliptrace.files import write_json_atomic

SIGNAL_COLUMNS = ("val_influence", "self_influence", "clip_score", "duplicate_of", "duplicate_similarity")


def removal_budget(n_train: int, fraction: float | None = None, budget: int | None = None) -> int:
    """Training pairs to remove: ``budget`` when given, else ``round(fraction × n_train)``.

    Raises:
        ValueError: Both or neither given, or a budget outside [0, n_train].
    """
    if (fraction is None) == (budget is None):
        raise ValueError("give exactly one of fraction and budget")
    if budget is None:
        if not 0 <= fraction <= 1:
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        budget = round(fraction * n_train)
    if not 0 <= budget <= n_train:
        raise ValueError(f"budget must lie in [0, {n_train}] (the training pairs), got {budget}")
    return budget


@dataclass(frozen=True)
class Curation:
    """A curated dataset on disk.

    Attributes:
        directory: The curation directory.
        dataset: The path the curated dataset is read from.
        removed: The removed training ids, most harmful first.
        kept: The kept training ids, in dataset order.
    """

    directory: Path
    dataset: Path
    removed: tuple[str, ...]
    kept: tuple[str, ...]


def _signal_values(signals: Signals, index: int) -> dict[str, object]:
    duplicate = int(signals.duplicate_of[index])
    return {"val_influence": float(signals.val_influence[index]),
            "self_influence": float(signals.self_influence[index]),
            "clip_score": float(signals.clip_score[index]),
            "duplicate_of": signals.ids[duplicate] if duplicate >= 0 else "",
            "duplicate_similarity": "" if duplicate < 0 else float(signals.duplicate_similarity[index])}


def _write_csv(path: Path, rows: Sequence[dict[str, object]], columns: Sequence[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_curation(
    out: str | Path,
    records: Sequence[Record],
    signals: Signals,
    ranking: Ranking,
    budget: int,
    *,
    format: str,
    summary: dict[str, object],
) -> Curation:
    """Write a curation directory: every record of ``records`` but the first ``budget`` of ``ranking``.

    Args:
        out: The curation directory (absent or empty).
        records: The whole input dataset (every split), in file order.
        signals: The training pairs' signals (their ids a subset of ``records``).
        ranking: The filter's ranking of those pairs.
        budget: Pairs removed.
        format: The dataset format to write (a format with a writer, see :mod:`cliptrace.data.writers`).
        summary: What to record in ``curation.json`` besides the counts.

    Raises:
        ValueError: ``out`` holds files, or a training id is not among ``records``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; curation writes a new directory")
    known = {record.id for record in records}
    missing = [record_id for record_id in signals.ids if record_id not in known]
    if missing:
        raise ValueError(f"training id {missing[0]!r} is not in the dataset ({len(missing)} missing)")
    removed_index = ranking.removed(budget)
    removed = tuple(signals.ids[i] for i in removed_index)
    dropped = set(removed)
    kept = tuple(record_id for record_id in signals.ids if record_id not in dropped)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    dataset = write_records([record for record in records if record.id not in dropped], partial / "data", format)
    _write_csv(partial / "curation.csv", [
        {"rank": rank, "id": signals.ids[i], "reason": ranking.reasons[i], "score": float(ranking.scores[i]),
         **_signal_values(signals, int(i))} for rank, i in enumerate(removed_index, start=1)
    ], ("rank", "id", "reason", "score", *SIGNAL_COLUMNS))
    _write_csv(partial / "signals.csv", [{"id": record_id, **_signal_values(signals, i)}
                                         for i, record_id in enumerate(signals.ids)], ("id", *SIGNAL_COLUMNS))
    (partial / "kept_ids.txt").write_text("".join(f"{record_id}\n" for record_id in kept), encoding="utf-8")
    write_json_atomic(partial / "curation.json", {**summary, "format": format, "n_train": len(signals.ids),
                                                  "budget": budget, "removed": len(removed)})
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return Curation(out, out / dataset.relative_to(partial), removed, kept)

