"""README.md opens with the two commands, and CI runs exactly the second one."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_starts_with_demo_and_test_commands() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert readme.startswith("```sh\n")
    assert blocks[0] == "./scripts/bootstrap && .venv/bin/authd serve"
    assert blocks[1] == "./scripts/bootstrap && .venv/bin/python -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "./scripts/bootstrap\nexec .venv/bin/python -m pytest -q\n" in ci
