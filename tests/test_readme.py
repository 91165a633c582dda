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


def test_ci_lints_type_checks_then_tests_with_interop_required() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    steps = [
        "set -eu\n",
        "./scripts/bootstrap\n",
        ".venv/bin/ruff check .\n",
        ".venv/bin/ruff format --check .\n",
        ".venv/bin/mypy --strict protocol config\n",
        ".venv/bin/mypy\n",
        "export AUTHD_REQUIRE_INTEROP=1\n",
        ".venv/bin/python -m pytest -q || status=$?\n",
        'exit "$status"\n',
    ]
    positions = [ci.find(step) for step in steps]
    assert -1 not in positions, [step for step, at in zip(steps, positions, strict=True) if at < 0]
    assert positions == sorted(positions)
