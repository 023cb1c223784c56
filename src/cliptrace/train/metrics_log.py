"""Append-only metric logs: one CSV per stream, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from cliptrace.files import write_text_atomic


class MetricsLog:
    """Writes rows of scalars to ``DIR/NAME.csv`` (header from the first row) and to TensorBoard if available.

    Appending to an existing file keeps its header, so a resumed run continues the same log.

    Args:
        directory: Where the CSV files (and ``tensorboard/``) go.
        tensorboard: Also log to TensorBoard when it is installed.
        resume_step: The step a resumed run continues from. Rows an interrupted run logged after it are dropped
            from every CSV with a ``step`` column (and purged from TensorBoard), so each step is logged once.
    """

    def __init__(self, directory: Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.directory = directory
        self._fieldnames: dict[str, list[str]] = {}  # each stream's CSV header, read or written once
        self._writer = None
        if resume_step is not None:
            for path in sorted(directory.glob("*.csv")):
                _drop_rows_after(path, resume_step)
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"), purge_step=purge)

    def write(self, stream: str, row: dict[str, float | int | str]) -> None:
        """Append ``row`` to ``stream``.csv; numeric values also go to TensorBoard under ``stream/key``."""
        path = self.directory / f"{stream}.csv"
        fieldnames = self._fieldnames.get(stream)
        if fieldnames is None:
            if path.is_file() and path.stat().st_size > 0:
                with path.open(newline="", encoding="utf-8") as file:
                    fieldnames = next(csv.reader(file))
            else:
                fieldnames = list(row)
            self._fieldnames[stream] = fieldnames
        with path.open("a", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames, extrasaction="ignore")
            if file.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
        if self._writer is not None:
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{stream}/{key}", value, step)

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.close()


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep only the complete rows of a metrics CSV whose ``step`` is at most ``step`` (files without one stay)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    if not rows or "step" not in rows[0]:
        return
    header, column = rows[0], rows[0].index("step")
    kept = [row for row in rows[1:] if len(row) == len(header) and row[column].isdigit() and int(row[column]) <= step]
    if len(kept) == len(rows) - 1:
        return
    text = io.StringIO(newline="")
    csv.writer(text).writerows([header, *kept])
    write_text_atomic(path, text.getvalue())
