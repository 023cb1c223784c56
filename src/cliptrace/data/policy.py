"""The ``--on-bad-sample`` policy: fail on the first bad sample, or skip every bad sample and list it.

A bad sample is a broken metadata row (see :mod:`cliptrace.data.readers`) or a record whose image is missing or does
not decode. Under ``fail`` (the default) a broken row raises while the dataset is read, and every image of the records
in use is checked up front, cheaply (:meth:`~cliptrace.data.images.ImageLoader.verify`), before any is used: the first
bad one raises, naming the image file and the record id, whether or not training would have drawn it. Under ``skip``
broken rows are collected while reading, and every image of the records in use is opened and fully decoded once, up
front; records with a problem are dropped and listed in a skip report (``skipped.csv``: source, location, problem).
The checks depend only on the data, so the same dataset and split always keep the same records: TRAK featurization
skips exactly what training skipped. Both show a progress bar on a terminal (on stderr, removed when done).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cliptrace.data.images import ImageLoader
from cliptrace.data.options import DataOptions
from cliptrace.data.record import DatasetError, Record
from cliptrace.files import atomic_file

ON_BAD_SAMPLE = ("fail", "skip")
SKIP_REPORT = "skipped.csv"
REPORT_COLUMNS = ("source", "location", "problem")


def check_policy(on_bad_sample: str) -> str:
    """``on_bad_sample`` itself when it names a policy.

    Raises:
        ValueError: It is neither ``fail`` nor ``skip``.
    """
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise ValueError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, not {on_bad_sample!r}")
    return on_bad_sample


def _row(problem: DatasetError) -> tuple[str, str, str]:
    """A problem as a skip-report row."""
    return problem.source, "" if problem.location is None else str(problem.location), problem.problem


class BadSamplePolicy:
    """Reads datasets under an ``on_bad_sample`` policy and keeps the problems of every sample it skipped.

    Args:
        on_bad_sample: ``"fail"`` or ``"skip"``.
        loader: Opens the images checked; a new :class:`ImageLoader` when None.
        progress: Show a progress bar while the images are checked (on a terminal only, on stderr).

    Attributes:
        on_bad_sample: The policy.
        skipped: Problems of the skipped samples, in the order found, each once.
    """

    def __init__(self, on_bad_sample: str = "fail", loader: ImageLoader | None = None, progress: bool = True) -> None:
        self.on_bad_sample = check_policy(on_bad_sample)
        self.progress = progress
        self.loader = loader if loader is not None else ImageLoader()
        self.skipped: list[DatasetError] = []
        self._rows: set[tuple[str, str, str]] = set()
        self._images: dict[str, DatasetError | None] = {}
        self._samples: dict[str, int] = {}

    @property
    def skips(self) -> bool:
        """Whether bad samples are skipped rather than raised."""
        return self.on_bad_sample == "skip"

    def _skip(self, problem: DatasetError) -> None:
        if _row(problem) not in self._rows:
            self._rows.add(_row(problem))
            self.skipped.append(problem)

    def load(self, path: str | Path, data_options: DataOptions | None = None) -> list[Record]:
        """The records of ``path`` read with ``data_options`` (:meth:`DataOptions.load`; the defaults when None);
        under ``skip`` broken rows are left out and kept.

        Raises:
            DatasetError: The dataset as a whole is unreadable (under either policy), a row is broken under
                ``fail``, or every row is broken under ``skip``.
        """
        data_options = data_options if data_options is not None else DataOptions()
        if not self.skips:
            return data_options.load(path)
        broken: list[DatasetError] = []
        records = data_options.load(path, on_error=broken.append)
        for problem in broken:
            self._skip(problem)
        self._samples[str(path)] = len(records) + len(broken)
        if broken and not records:
            problem = f"every one of its {len(broken)} samples is broken; the first: {broken[0]}"
            raise DatasetError(str(path), None, problem)
        return records

    def screen(self, records: Sequence[Record]) -> list[Record]:
        """The records whose image is good, each image checked once, up front.

        Under ``fail`` every image gets the cheap check of :meth:`ImageLoader.verify` and every record is returned;
        under ``skip`` every image is fully decoded and the records with a bad one are left out and kept.

        Raises:
            DatasetError: Under ``fail``, an image is bad (naming the image file and the record id); under ``skip``,
                records were given and none of them has a readable image.
        """
        check = self.loader.load if self.skips else self.loader.verify
        kept = []
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True, disable=not self.progress) as progress:
            for record in progress.track(records, description="decoding images" if self.skips else "checking images"):
                error = self._image_problem(record.image, check)
                if error is None:
                    kept.append(record)
                elif self.skips:
                    self._skip(DatasetError(error.source, f"id {record.id}", error.problem))
                else:
                    raise DatasetError(error.source, f"id {record.id}", error.problem)
        if records and not kept:
            first = self._images[records[0].image]
            problem = f"{first.problem}; every one of the {len(records)} records in use was skipped for a bad image"
            raise DatasetError(first.source, f"id {records[0].id}", problem)
        return kept

    def _image_problem(self, image: str, check: Callable[[str], object]) -> DatasetError | None:
        """What ``check`` finds wrong with ``image`` (None when nothing), found once per image."""
        if image not in self._images:
            try:
                check(image)
                self._images[image] = None
            except DatasetError as error:
                self._images[image] = error
        return self._images[image]

    def write_report(self, path: str | Path) -> Path | None:
        """Under ``skip``, write the skip report to ``path`` atomically (a header alone when nothing was skipped).

        Args:
            path: The CSV file to write, e.g. ``RUN/skipped.csv``; its directory is created.

        Returns:
            ``path``; None under ``fail``, which writes nothing.
        """
        if not self.skips:
            return None
        path = Path(path)
        with atomic_file(path) as temporary, temporary.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(REPORT_COLUMNS)
            writer.writerows(_row(problem) for problem in self.skipped)
        return path

    def matches_report(self, path: str | Path) -> bool:
        """Whether the skip report at ``path`` lists exactly the problems skipped here (False when it is missing)."""
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                rows = [tuple(row) for row in csv.reader(handle)]
        except FileNotFoundError:
            return False
        return rows == [REPORT_COLUMNS, *map(_row, self.skipped)]

    def summary(self, report: str | Path | None) -> str | None:
        """One line: how many records were skipped, of how many, and where they are listed; None if none was."""
        if not self.skipped:
            return None
        total = sum(self._samples.values())
        where = f": see {report}" if report is not None else f"; the first: {self.skipped[0]}"
        return f"skipped {len(self.skipped)} of {total} records{where}"
