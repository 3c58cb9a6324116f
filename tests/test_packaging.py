"""The pip and conda descriptions of the environment must name the same packages and bounds."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Extras that environment.yml installs (the README's set); tf-gpu and torch are for other machines.
CONDA_EXTRAS = ("tf", "jax", "notebooks", "dev")
# PyPI name -> conda-forge name where they differ.
PIP_TO_CONDA = {"tensorflow-cpu": "tensorflow"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in CONDA_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    out = {}
    for line in reqs:
        req = Requirement(line)
        name = PIP_TO_CONDA.get(_norm(req.name), _norm(req.name))
        out[name] = str(req.specifier)
    return out


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):  # the pip: section installs the kit itself
            assert dep.get("pip") == ["-e ."], f"unexpected pip section {dep}"
            continue
        match = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", dep)
        name, spec = _norm(match.group(1)), match.group(2).replace(" ", "")
        if name in ("python", "pip"):
            continue
        out[name] = str(Requirement(f"x{spec}").specifier) if spec else ""
    return out


def test_environment_yml_matches_pyproject():
    pip, conda = pip_requirements(), conda_requirements()
    assert sorted(set(pip) - set(conda)) == [], "in pyproject.toml but not environment.yml"
    assert sorted(set(conda) - set(pip)) == [], "in environment.yml but not pyproject.toml"
    differing = {n: (pip[n], conda[n]) for n in pip if pip[n] != conda[n]}
    assert differing == {}, f"version bounds differ (pip, conda): {differing}"


def test_python_bounds_match():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert Requirement("python" + project["requires-python"].replace(" ", "")).specifier == Requirement(
        conda_python.replace(" ", "")
    ).specifier


def test_readme_shows_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    assert "make test" in readme and "make run" in readme
