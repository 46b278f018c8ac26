"""pyproject.toml's dependencies are what the code imports, and their lower bounds are the
versions CI's second run installs (.ci/lowest-versions.txt), so every bound is tested."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

#: Import names that differ from the distribution's name.
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
#: Dependencies CI's lowest run does not pin: torch (see .ci/lowest-versions.txt) and the dev tools.
UNPINNED = {"torch", "torchvision", "pytest", "pytest-xdist", "ruff"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_third_party_import_is_a_declared_dependency():
    project = _project()
    required = {_name(r) for r in project["dependencies"]}
    optional = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    imported: dict[str, set[str]] = {}
    for path in (ROOT / "refilled_hf").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("refilled_hf", "__future__"):
                    imported.setdefault(_name(DISTRIBUTION_OF.get(top, top)), set()).add(path.name)
    undeclared = {name: files for name, files in imported.items() if name not in required | optional}
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"
    assert imported.get("scikit-learn", set()) <= {"quickstart.py"}, "scikit-learn is the quickstart's extra only"


def test_every_lower_bound_is_the_version_ci_tests_as_lowest():
    project = _project()
    bounds = {}
    for requirement in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                   for r in extra)]:  # fmt: skip
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.strip())
        assert match, f"{requirement!r}: give each dependency a lower bound (name>=X), tested by CI"
        assert bounds.setdefault(_name(match[1]), match[2]) == match[2], f"{requirement!r}: two bounds"
    pins = {}
    for line in (ROOT / ".ci" / "lowest-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_name(name)] = version
    assert set(pins) == set(bounds) - UNPINNED
    for name, version in pins.items():
        assert Version(version) == Version(bounds[name]), f"{name}: CI tests {version}, pyproject admits {bounds[name]}"
