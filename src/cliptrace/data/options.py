"""How to read a dataset: its format and the reader options a user gives (``--format``, ``--image-root``, ...).

One :class:`DataOptions` travels whole from the command line through training, evaluation and attribution to
:func:`cliptrace.data.readers.load_records`; a training run stores it in ``config.json`` so that later commands on
the run read its data the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliptrace.data.readers import load_records
from cliptrace.data.record import Record

TAB_NAMES = ("tab", "\\t")  # how a tab separator is typed on a command line


def separator(sep: str | None) -> str | None:
    """A separator as typed: ``tab`` and ``\\t`` stand for a tab; None stays None (the reader's default)."""
    return "\t" if sep in TAB_NAMES else sep


def caption_keys(value: str | Sequence[str] | None) -> str | None:
    """Caption columns from ``"a, b"``, ``["a", "b"]`` (each item may hold commas too) or None, as ``"a,b"``;
    None when empty."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    keys = [key.strip() for item in items for key in str(item).split(",") if key.strip()]
    return ",".join(keys) or None


@dataclass(frozen=True)
class DataOptions:
    """The format of a dataset and the reader options given for it; None leaves a reader's own default.

    Attributes:
        format: A format of :data:`cliptrace.data.readers.FORMATS`, or ``auto`` to detect it from the path.
        image_root: Directory relative image paths are read from (default: the reader's, e.g. the file's folder).
        sep: CSV field separator (``tab`` and ``\\t`` are read as a tab).
        image_key: Image column or key.
        caption_key: Caption column or key; ``"a,b"`` names two caption columns (a list of names is joined so).

    Every field is a string or None, so the options survive a JSON round trip unchanged.
    """

    format: str = "auto"
    image_root: str | None = None
    sep: str | None = None
    image_key: str | None = None
    caption_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", self.format or "auto")
        object.__setattr__(self, "image_root", None if self.image_root in (None, "") else str(self.image_root))
        object.__setattr__(self, "sep", separator(self.sep))
        object.__setattr__(self, "caption_key", caption_keys(self.caption_key))
        for name in ("sep", "image_key"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "data options") -> "DataOptions":
        """Options from a dict of their fields (as stored in a run's ``config.json``); the defaults for None.

        Raises:
            ValueError: ``data`` is not a mapping of the fields of :class:`DataOptions` (``source`` names it).
        """
        if data is None:
            return cls()
        if isinstance(data, DataOptions):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: data options must be a JSON object, not {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown data option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_reader_options(self) -> dict[str, Any]:
        """The keyword options of :func:`~cliptrace.data.readers.load_records` that were given (``format`` apart).

        Options left at None are left out, so each reader keeps its own defaults and a reader is only handed the
        options it was asked to use (one it does not take is an error naming the dataset).
        """
        options: dict[str, Any] = {}
        if self.image_root is not None:
            options["image_root"] = self.image_root
        if self.sep is not None:
            options["sep"] = self.sep
        if self.image_key is not None:
            options["image_key"] = self.image_key
        if self.caption_key is not None:
            keys = self.caption_key.split(",")
            options["caption_key"] = keys[0] if len(keys) == 1 else keys
        return options

    def load(self, path: str | Path, **extra: Any) -> list[Record]:
        """:func:`~cliptrace.data.readers.load_records` of ``path`` with these options (and ``extra``, e.g.
        ``on_error``)."""
        return load_records(path, self.format, **self.to_reader_options(), **extra)

    def absolute(self) -> "DataOptions":
        """These options with ``image_root`` as an absolute path (valid from any directory)."""
        if self.image_root is None:
            return self
        return dataclasses.replace(self, image_root=os.path.abspath(self.image_root))

    def overridden_by(self, given: "DataOptions") -> "DataOptions":
        """These options with every option set in ``given`` (not None, a format other than ``auto``) taking over."""
        changes = {field.name: getattr(given, field.name) for field in dataclasses.fields(given)
                   if getattr(given, field.name) not in (None, "auto")}
        return dataclasses.replace(self, **changes)
