"""Packaging metadata: the MIT LICENSE, the SPDX license string, every third-party import declared.

Static checks of LICENSE and pyproject.toml against the source tree; no build runs here.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata

from tests.authd_process import REPO

PACKAGES = ("authd", "protocol", "config", "lua_api")


def _pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_mit_and_spdx() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    # PEP 639: an SPDX expression, not the deprecated {text = ...} table setuptools warns about.
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    build = _pyproject()["build-system"]
    assert isinstance(build, dict)
    bounds = [re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", req) for req in build["requires"]]
    assert [int(m.group(1)) for m in bounds if m] and all(int(m.group(1)) >= 77 for m in bounds if m), (
        "setuptools 77 is the first to take an SPDX license string"
    )


def _third_party_imports() -> set[str]:
    found: set[str] = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    found.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name not in PACKAGES}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_import_is_a_declared_dependency() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    # The runtime dependencies, and extras other than the test tools (an optional backend's client).
    requirements = list(project["dependencies"])
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra != "test":
            requirements.extend(reqs)
    declared = {_normalized(re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]) for req in requirements}
    providers = metadata.packages_distributions()
    undeclared = {
        name: providers.get(name, ["?"])
        for name in _third_party_imports()
        if not {_normalized(dist) for dist in providers.get(name, [])} & declared
    }
    assert undeclared == {}
    assert "outcome" in _third_party_imports()


def test_every_package_is_listed() -> None:
    # A package missing from [tool.setuptools] packages is absent from a real (non-editable) install.
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    listed = set(tool["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for package in PACKAGES
        for init in (REPO / package).rglob("__init__.py")
    }
    assert found - listed == set()
