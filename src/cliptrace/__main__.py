"""``python -m cliptrace``: the command line, e.g. under ``torchrun ... -m cliptrace train ...``."""

from cliptrace.cli import app

app(prog_name="cliptrace")
