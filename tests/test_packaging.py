"""The pip and conda descriptions of the environment must name the same packages and bounds; the
package's modules import one another without a cycle."""

from __future__ import annotations

import ast
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


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside a function (``from . import x``,
    ``from .x import y``, ``from strokekit.x import y``, ``import strokekit.x``)."""
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("strokekit")):
                parts = (node.module or "").split(".")[0 if node.level else 1:]
                found.update(parts[:1] or [alias.name for alias in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("strokekit."))
        graph[path.stem] = found & modules - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_names_the_modules_of_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    """A lower module never imports a higher one, not even inside a function: data flows one way."""
    graph = import_graph(ROOT / "strokekit")
    assert {"train", "config", "runs", "fewshot"} <= graph.keys() and "runs" in graph["train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_package_has_one_resizer():
    """Images, probabilities and masks are resized only in preprocess.resize_image / resize_mask."""
    offenders = []
    for path in sorted((ROOT / "strokekit").glob("*.py")):
        if path.name == "preprocess.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                    node.module == "skimage.transform"
                    or (node.module == "skimage" and any(a.name == "transform" for a in node.names))
                    or (node.module == "scipy.ndimage" and any(a.name == "zoom" for a in node.names))):
                offenders.append(f"{path.name}:{node.lineno} imports a resizer from {node.module}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("resize", "zoom") and not _is_numpy(node.func.value)):
                offenders.append(f"{path.name}:{node.lineno} calls .{node.func.attr}(")
    assert not offenders, "resize through strokekit.preprocess.resize_image/resize_mask: " + "; ".join(offenders)


def _is_numpy(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("np", "numpy")
