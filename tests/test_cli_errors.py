"""How every command reports: errors and cliptrace's own warnings as one line each."""

from __future__ import annotations

import warnings

import pytest
import typer

from cliptrace.cli.errors import reported_errors
from cliptrace.notices import CliptraceWarning


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as caught, reported_errors():
        raise ValueError("/data/x.csv, line 3: empty caption in 'title'")
    assert caught.value.exit_code == 1
    assert capsys.readouterr().err == "error: /data/x.csv, line 3: empty caption in 'title'\n"


def test_own_warnings_are_one_line_each_time_and_others_show_as_python_shows_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    filters, hook = list(warnings.filters), warnings.showwarning
    with pytest.warns(UserWarning, match="a library's own warning") as others, reported_errors():
        for _ in range(2):
            warnings.warn("/run/test_metrics.json: not valid JSON; computing the metrics again", CliptraceWarning)
        warnings.warn("a library's own warning", UserWarning)
    line = "warning: /run/test_metrics.json: not valid JSON; computing the metrics again\n"
    assert capsys.readouterr().err == line * 2
    assert [record.category for record in others] == [UserWarning]  # passed on to whoever shows the rest
    assert (warnings.filters, warnings.showwarning) == (filters, hook)  # the hook and the filter are undone
