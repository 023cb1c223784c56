"""How every command reports bad input: one line naming the problem, exit status 1, no traceback."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from cliptrace.notices import CliptraceWarning


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn ``ValueError`` and ``OSError`` (``DatasetError`` included) raised inside into ``error: ...`` + exit 1.

    Every :class:`~cliptrace.notices.CliptraceWarning` issued inside is printed as one ``warning: ...`` line on
    stderr, each time it is issued; other warnings show as Python shows them.

    A failed attribution method (:class:`cliptrace.explain.api.MethodFailed`) reads ``error: method NAME: ...``.
    """
    try:
        with warnings.catch_warnings():  # restores Python's hook and filters afterwards
            _print_own_warnings()
            yield
    except (ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as error:
        from cliptrace.explain.api import MethodFailed  # imported only once an error arrives: it pulls in torch

        if not isinstance(error, MethodFailed):
            raise
        typer.echo(f"error: method {error.method}: {error.problem}", err=True)
        raise typer.Exit(1) from None


def _print_own_warnings() -> None:
    """Show :class:`CliptraceWarning` as one ``warning: ...`` line (inside ``warnings.catch_warnings()``)."""
    python_way = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 - warnings' hook
        if issubclass(category, CliptraceWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            python_way(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", CliptraceWarning)
