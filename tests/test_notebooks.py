"""Notebooks: each .ipynb is in sync with its py:percent twin, carries no outputs, and follows the
course skeleton (title, learning goals, one parameters cell, setup, exercises, summary)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NUMBERED = [p for p in NOTEBOOKS if re.match(r"^\d\d_[a-z0-9_]+\.ipynb$", p.name)]


def test_there_are_numbered_notebooks():
    assert [p.name for p in NUMBERED][:1] == ["01_preprocessing.ipynb"]
    assert all(re.match(r"^(\d\d_)?[a-z0-9_]+\.ipynb$", p.name) for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_matches_its_twin_and_has_no_outputs(path):
    twin = path.with_suffix(".py")
    assert twin.is_file(), f"{path.name} has no py:percent twin {twin.name}"
    nb = jupytext.read(path)
    py = jupytext.read(twin)
    assert [(c.cell_type, c.source.strip()) for c in nb.cells] == [
        (c.cell_type, c.source.strip()) for c in py.cells
    ], f"{path.name} and {twin.name} differ: run `make notebooks`"
    raw = json.loads(path.read_text())
    for cell in raw["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs", []) == [], f"{path.name} carries outputs: strip them"


@pytest.mark.parametrize("path", NUMBERED, ids=lambda p: p.name)
def test_notebook_follows_the_skeleton(path):
    nb = jupytext.read(path)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    number = path.name[:2]
    assert re.search(rf"^# {number} · ", nb.cells[0].source, re.M), "title '# NN · ...' first"
    for heading in ("**Learning goals**", "**Runtime**", "## Setup", "## Parameters", "## Exercises", "## Summary", "**Next →**"):
        if heading == "**Next →**" and path == NUMBERED[-1]:
            continue
        assert heading in markdown, f"{path.name} lacks {heading}"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "get_profile(" in tagged[0].source, "sizes come from the profile"
