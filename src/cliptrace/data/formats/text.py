"""Reading metadata files: UTF-8 text and JSON, every problem a DatasetError naming the file."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

from cliptrace.data.record import DatasetError


def read_text(path: Path) -> str:
    """The UTF-8 text of a metadata file (a byte-order mark is dropped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(str(path), None, "file not found") from None
    except IsADirectoryError:
        raise DatasetError(str(path), None, "is a directory, not a file") from None
    except OSError as error:
        raise DatasetError(str(path), None, f"cannot read the file ({error.strerror})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DatasetError(str(path), f"line {line}", "not UTF-8 text") from None


def json_problem(error: ValueError | RecursionError) -> str:
    """What json.loads found wrong: besides JSONDecodeError it raises RecursionError for values nested too deeply and
    ValueError for integers with too many digits to convert."""
    if isinstance(error, json.JSONDecodeError):
        return error.msg
    return "nested too deeply" if isinstance(error, RecursionError) else str(error).partition(";")[0]


def load_json(path: Path) -> Any:
    """The parsed content of a JSON file."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(str(path), f"line {error.lineno}", f"invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise DatasetError(str(path), None, f"invalid JSON ({json_problem(error)})") from None


def is_pattern(text: str) -> bool:
    """Whether ``text`` is a glob pattern."""
    return any(char in text for char in "*?[")
