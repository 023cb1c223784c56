"""How every command reports bad input: one line naming the problem, exit status 1, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn ``ValueError`` and ``OSError`` (``DatasetError`` included) raised inside into ``error: ...`` + exit 1.

    A failed attribution method (:class:`cliptrace.explain.api.MethodFailed`) reads ``error: method NAME: ...``.
    """
    try:
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
