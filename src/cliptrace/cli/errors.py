"""How every command reports bad input: one line naming the problem, exit status 1, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn ``ValueError`` and ``OSError`` (``DatasetError`` included) raised inside into ``error: ...`` + exit 1."""
    try:
        yield
    except (ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
