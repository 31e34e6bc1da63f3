"""The command line itself: `--version`, and the version the docs install."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import gradclip
from gradclip.commands.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gradclip {gradclip.__version__}\n"
    assert main(["--version"], prog="python -m gradclip") == 0
    assert capsys.readouterr().out == f"python -m gradclip {gradclip.__version__}\n"


def test_the_package_version_is_the_projects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert gradclip.__version__ == project["version"]


def test_the_wheel_the_docs_install_is_the_one_the_build_makes() -> None:
    wheels = {
        (page.name, wheel)
        for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        for wheel in re.findall(r"gradclip-[^\s`/]+\.whl", page.read_text())
    }
    assert wheels, "the README shows how to install the wheel"
    expected = f"gradclip-{gradclip.__version__}-py3-none-any.whl"
    assert {wheel for _, wheel in wheels} == {expected}, wheels
