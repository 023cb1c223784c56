"""Image bytes held in a column of an Arrow or parquet file, named ``FILE::COLUMN[ROW]`` and read one row at a time.

``FILE`` is an absolute ``.arrow`` file (as ``datasets.Dataset.save_to_disk`` writes, read memory-mapped) or
``.parquet`` file (read one row group at a time, the last few kept); ``ROW`` counts the file's rows from 0. The
column holds binary values or the ``{bytes, path}`` struct of the ``datasets`` Image feature.
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict
from typing import Any

from cliptrace.data.record import DatasetError

EXTRA = "cliptrace[hf]"
TABLE_SUFFIXES = (".arrow", ".parquet")
ROW_GROUPS_KEPT = 4
_REF = re.compile(r"^(?P<file>.+)::(?P<column>.+)\[(?P<row>\d+)\]$")


def import_pyarrow(source: str) -> Any:
    """The ``pyarrow`` module (with ``pyarrow.parquet``), or a DatasetError for ``source`` naming the extra that
    installs it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (makes pyarrow.parquet an attribute of pyarrow)
    except ImportError:
        raise DatasetError(source, None, f"reading it needs pyarrow: pip install '{EXTRA}'") from None
    return pyarrow


def table_ref(file: str, column: str, row: int) -> str:
    """The reference of the image in ``column`` of ``file``'s row ``row``."""
    return f"{file}::{column}[{row}]"


def is_table_ref(ref: str) -> bool:
    """Whether ``ref`` names a row of an Arrow or parquet file."""
    match = _REF.match(ref)
    return match is not None and match["file"].lower().endswith(TABLE_SUFFIXES)


class TableRows:
    """Opens the files that table references point into, once each, and reads one row's image bytes."""

    def __init__(self) -> None:
        self._arrow: dict[str, Any] = {}
        self._parquet: dict[str, tuple[Any, list[int]]] = {}
        self._groups: OrderedDict[tuple[str, str, int], Any] = OrderedDict()

    def read_bytes(self, ref: str) -> bytes:
        """The image bytes ``ref`` names.

        Raises:
            DatasetError: The file cannot be read, or has no such column or row, or the row holds no bytes.
        """
        match = _REF.match(ref)
        if match is None:
            raise DatasetError(ref, None, "not a table reference FILE::COLUMN[ROW]")
        file, column, row = match["file"], match["column"], int(match["row"])
        try:
            if file.lower().endswith(".arrow"):
                value = self._arrow_value(file, column, row)
            else:
                value = self._parquet_value(file, column, row)
        except FileNotFoundError:
            raise DatasetError(file, None, "file not found") from None
        except (OSError, ValueError) as error:
            raise DatasetError(file, None, f"cannot read the table ({error})") from None
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, bytes):
            raise DatasetError(ref, None, "the row holds no image bytes")
        return value

    def _arrow_value(self, file: str, column: str, row: int) -> Any:
        """The value at ``row`` of ``column`` in a memory-mapped Arrow stream file."""
        pa = import_pyarrow(file)
        if file not in self._arrow:
            self._arrow[file] = pa.ipc.open_stream(pa.memory_map(file, "r")).read_all()
        table = self._arrow[file]
        _check(file, table.schema.names, column, row, table.num_rows)
        return table.column(column)[row].as_py()

    def _parquet_value(self, file: str, column: str, row: int) -> Any:
        """The value at ``row`` of ``column`` in a parquet file, read with its row group."""
        pa = import_pyarrow(file)
        if file not in self._parquet:
            handle = pa.parquet.ParquetFile(file)
            starts = [0]
            for group in range(handle.num_row_groups):
                starts.append(starts[-1] + handle.metadata.row_group(group).num_rows)
            self._parquet[file] = handle, starts
        handle, starts = self._parquet[file]
        _check(file, handle.schema_arrow.names, column, row, starts[-1])
        group = bisect.bisect_right(starts, row) - 1
        key = (file, column, group)
        if key not in self._groups:
            self._groups[key] = handle.read_row_group(group, columns=[column]).column(column)
            while len(self._groups) > ROW_GROUPS_KEPT:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][row - starts[group]].as_py()


def _check(file: str, names: list[str], column: str, row: int, rows: int) -> None:
    """Raise a DatasetError unless the table has ``column`` and ``row``."""
    if column not in names:
        raise DatasetError(file, None, f"no column {column!r}; the columns are {names}")
    if row >= rows:
        raise DatasetError(file, f"row {row}", f"no such row: the table has {rows}")
