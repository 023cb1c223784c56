"""What a dataset format declares: its name, the paths it reads, how it recognizes itself, and its reader."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptrace.data.formats.text import load_json
from cliptrace.data.record import Record


class Probe:
    """One dataset file being told apart, its parsed JSON kept so that it is parsed once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._json: Any = None
        self._parsed = False

    def json(self) -> Any:
        """The parsed JSON content of the file (a DatasetError when it is not JSON)."""
        if not self._parsed:
            self._json = load_json(self.path)
            self._parsed = True
        return self._json


@dataclass(frozen=True)
class Format:
    """A dataset format.

    Attributes:
        name: The name ``load_records(format=...)`` and ``--format`` take.
        summary: What it reads, for help texts and errors (e.g. ``"CSV/TSV (.csv, .tsv)"``).
        read: The reader: ``read(path, **options) -> list[Record]``; its keyword parameters are the options.
        suffixes: File suffixes (lower case, with the dot) that name a file of this format.
        find: The path to read for a directory holding this format (the directory or a file in it), else None.
        claims: For a file whose suffix several formats share: whether its content is of this format.
        content: What ``claims`` looks for, for the error when no format claims a file.
        read_probe: Reads an already probed file (its JSON parsed once); ``read`` of the path when None.
        patterns: Whether a glob pattern may name the files to read.
        write: Writes records as a new dataset of this format into a directory it creates and returns the path
            ``read`` takes (see :func:`cliptrace.data.writers.write_records`); None when the format has no writer.
    """

    name: str
    summary: str
    read: Callable[..., list[Record]]
    suffixes: tuple[str, ...] = ()
    find: Callable[[Path], Path | None] | None = None
    claims: Callable[[Probe], bool] | None = None
    content: str = ""
    read_probe: Callable[..., list[Record]] | None = None
    patterns: bool = False
    write: Callable[[Sequence[Record], Path], Path] | None = None

    @property
    def options(self) -> list[str]:
        """The options the reader takes."""
        return [name for name in inspect.signature(self.read).parameters if name != "path"]

    def located(self, directory: Path) -> Path | None:
        """The path to read when ``directory`` holds this format, else None."""
        return self.find(directory) if self.find is not None else None

    def load(self, probe: Probe, **options: Any) -> list[Record]:
        """The records of a probed file."""
        if self.read_probe is not None:
            return self.read_probe(probe, **options)
        return self.read(probe.path, **options)


def named_file(name: str) -> Callable[[Path], Path | None]:
    """A ``find`` for a dataset kept in a directory under a fixed file name (e.g. ``captions.csv``)."""

    def find(directory: Path) -> Path | None:
        return directory / name if (directory / name).is_file() else None

    return find
