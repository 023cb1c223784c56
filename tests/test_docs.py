"""The docs point at real tests: every ``tests/FILE.py::NAME`` that docs/bad-input.md names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_functions(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text(encoding="utf-8")).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_that_bad_input_md_names_exists() -> None:
    text = (ROOT / "docs" / "bad-input.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(named) > 50  # the tables were read
    missing = [f"{file}::{name}" if name else file for file, name in named
               if not (ROOT / file).is_file() or (name and name not in _test_functions(ROOT / file))]
    assert missing == []
