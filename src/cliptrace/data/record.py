"""The one canonical record every dataset reader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    """One image with its captions.

    Attributes:
        id: Unique identifier of the image within its dataset.
        image: Image reference: a file path, ``"SHARD.tar::MEMBER"`` for a member of a tar shard, or
            ``"FILE.parquet::COLUMN[ROW]"`` (or ``.arrow``) for image bytes in a row of a table.
        captions: One or more captions describing the image.
        split: Dataset split, e.g. ``"train"``, ``"val"`` or ``"test"``.
        label: Optional class name, used by zero-shot classification.
    """

    id: str
    image: str
    captions: tuple[str, ...]
    split: str = "train"
    label: str | None = None


class DatasetError(ValueError):
    """A dataset could not be read; the message names the file and the row or key.

    Built from a message alone (``DatasetError(message)``), as torch rebuilds an error raised in a DataLoader worker
    (``"Caught DatasetError in DataLoader worker process 0. Original Traceback ... DatasetError: FILE, WHERE:
    PROBLEM"``), it keeps the original one-line message, whose parts then all stand in ``source`` and ``problem``.
    """

    def __init__(self, source: str, location: str | int | None = None, problem: str | None = None) -> None:
        if problem is None:
            lines = source.strip().splitlines() or [source]
            source = problem = lines[-1].partition(f"{DatasetError.__name__}: ")[2] or lines[-1]
            super().__init__(source)
        else:
            where = f"{source}" if location is None else f"{source}, {location}"
            super().__init__(f"{where}: {problem}")
        self.source = source
        self.location = location
        self.problem = problem
