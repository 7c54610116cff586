"""Reproducible installs: constraints.txt pins what CI tests, README's commands and .ci/run use it, and CI also
runs the fast tests on the newest versions pyproject.toml allows."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[A-Za-z0-9_.\-]+", name), f"constraints.txt: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (*project["dependencies"], *project["optional-dependencies"]["test"])]


def test_every_declared_dependency_is_pinned_to_a_version_pyproject_allows():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} violates {req}"
    assert "flowtame" not in pins
    assert pins["torch"] == Version("2.13.0"), "torch stays README's plain pin (a local CPU wheel satisfies it)"


def test_readme_commands_and_ci_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    assert len(installs) == 2, "README has two set-up commands (quick start, tests)"
    for command in installs:
        for pip in re.findall(r"pip install [^&]*", command):
            assert "-c constraints.txt" in pip, f"README: {pip!r} ignores the lock"
    ci = (ROOT / ".ci" / "run").read_text().replace("pip install -q ", "pip install ")
    test_command = next(c for c in installs if "pytest" in c).split("&& ", 1)[1]  # after venv creation
    test_command = test_command.replace(". .venv/bin/activate && ", "")
    assert test_command in ci, ".ci/run runs README's test command"


def test_ci_has_a_newest_dependencies_step_without_constraints():
    ci = (ROOT / ".ci" / "run").read_text()
    newest = [line for line in ci.splitlines() if "--upgrade-strategy eager" in line]
    assert newest and all("constraints" not in line and line.endswith("torch==2.13.0") for line in newest)
    assert ci.index("--upgrade-strategy eager") < ci.rindex('pytest -q -m "not slow"')
    assert os.access(ROOT / ".ci" / "run", os.X_OK) and os.access(ROOT / "scripts" / "lock.sh", os.X_OK)
