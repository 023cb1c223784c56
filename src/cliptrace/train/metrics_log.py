"""Append-only metric logs: one CSV per stream, mirrored to TensorBoard when it is installed."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path


class MetricsLog:
    """Writes rows of scalars to ``DIR/NAME.csv`` (header from the first row) and to TensorBoard if available.

    Appending to an existing file keeps its header, so a resumed run continues the same log.
    """

    def __init__(self, directory: Path, tensorboard: bool = True) -> None:
        self.directory = directory
        self._fieldnames: dict[str, list[str]] = {}  # each stream's CSV header, read or written once
        self._writer = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(directory / "tensorboard"))

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
