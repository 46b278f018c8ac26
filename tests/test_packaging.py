"""An installed wheel, not only a checkout, has what a run needs: every module, the
command and the model-card template, which it finds whatever the install scheme (a
``--user`` or ``--prefix`` install, or a system Python installing under /usr/local,
puts the template outside ``sys.prefix``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def test_a_wheel_installed_under_another_prefix_has_every_module_and_finds_its_card_template(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("refilled_hf", "model_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source))
    wheel = next((tmp_path / "wheel").glob("refilled_hf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "refilled_hf").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert any(n.endswith("entry_points.txt") for n in names)

    prefix = tmp_path / "prefix"
    # --ignore-installed: without it pip uninstalls this environment's refilled-hf first
    _pip("install", "--no-deps", "--no-index", "--ignore-installed", "--prefix", str(prefix), str(wheel))
    site = next(prefix.glob("lib/python*/site-packages"))
    code = "import refilled_hf, refilled_hf.model_card as m; print(refilled_hf.__file__); print(m.card_template())"
    env = {**os.environ, "PYTHONPATH": str(site)}
    lines = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    assert Path(lines[0]).is_relative_to(site)  # the installed copy, not the checkout
    installed = prefix / "share" / "refilled-hf" / "model_cards" / "refilled_student.md"
    assert Path(lines[1]).resolve() == installed.resolve()
    assert installed.read_text() == (ROOT / "model_cards" / "refilled_student.md").read_text()
    assert (prefix / "bin" / "refilled-hf").is_file()
    here = subprocess.run([sys.executable, "-c", "import refilled_hf; print(refilled_hf.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(here).is_relative_to(ROOT)  # this environment's own install is untouched
