"""The data options every command that reads a dataset takes: ``--format``, ``--image-root``, ``--sep``,
``--image-key``, ``--caption-key``, defined once.

A command declares one parameter ``data_options: DataOptions``; :func:`with_data_options` replaces it by the five
command-line options and hands the command the :class:`~cliptrace.data.options.DataOptions` they make.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from cliptrace.data.options import DataOptions
from cliptrace.data.readers import FORMATS

Command = TypeVar("Command", bound=Callable[..., Any])
PARAMETER = "data_options"  # the parameter of a command that receives the options

_OPTIONS: dict[str, tuple[Any, Any]] = {  # parameter -> (annotation, default)
    "data_format": (Annotated[str, typer.Option(
        "--format", help=f"Dataset format: {', '.join(FORMATS)}, or auto (detected from the path).",
        rich_help_panel="Data")], "auto"),
    "image_root": (Annotated[Optional[Path], typer.Option(
        "--image-root", help="Directory the dataset's relative image paths are read from (default: the folder "
                             "of the dataset file).", rich_help_panel="Data")], None),
    "sep": (Annotated[Optional[str], typer.Option(
        "--sep", help="CSV separator; 'tab' or '\\t' for a tab (default: tab for .tsv, else comma).",
        rich_help_panel="Data")], None),
    "image_key": (Annotated[Optional[str], typer.Option(
        "--image-key", help="Image column or key (default: the format's, e.g. filepath for CSV).",
        rich_help_panel="Data")], None),
    "caption_key": (Annotated[Optional[list[str]], typer.Option(
        "--caption-key", help="Caption column or key; comma-separated (or repeated) for several caption columns.",
        rich_help_panel="Data")], None),
}


def data_options(data_format: str = "auto", image_root: Path | None = None, sep: str | None = None,
                 image_key: str | None = None, caption_key: list[str] | None = None) -> DataOptions:
    """The :class:`DataOptions` of the five command-line options."""
    return DataOptions(format=data_format, image_root=None if image_root is None else str(image_root), sep=sep,
                       image_key=image_key, caption_key=caption_key)


def with_data_options(command: Command) -> Command:
    """``command`` with its ``data_options: DataOptions`` parameter taken from ``--format``, ``--image-root``,
    ``--sep``, ``--image-key`` and ``--caption-key`` (added at the end of its options)."""
    signature = inspect.signature(command, eval_str=True)
    if PARAMETER not in signature.parameters:
        raise TypeError(f"{command.__name__} has no {PARAMETER} parameter")
    kept = [parameter for name, parameter in signature.parameters.items() if name != PARAMETER]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in _OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, default) for name, (_, default) in _OPTIONS.items()}
        return command(*args, **{PARAMETER: data_options(**given)}, **kwargs)

    del wrapper.__wrapped__  # typer reads the signature below, not the wrapped function's
    wrapper.__signature__ = signature.replace(parameters=[*kept, *added])
    wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in [*kept, *added]}
    return wrapper  # type: ignore[return-value]
