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
    for heading in (
        "**Learning goals**", "**Runtime**", "## Setup", "## Parameters", "## Exercises", "## Summary", "**Next →**"
    ):
        if heading == "**Next →**" and path == NUMBERED[-1]:
            continue
        assert heading in markdown, f"{path.name} lacks {heading}"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "get_profile(" in tagged[0].source, "sizes come from the profile"


def _nbval_plugin():
    """notebooks/conftest.py, the pytest plugin that starts nbval's kernels (loaded by path)."""
    import importlib.util

    pytest.importorskip("nbval")
    spec = importlib.util.spec_from_file_location("strokekit_nbval_plugin", ROOT / "notebooks" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nbval_kernels_talk_over_ipc_sockets_not_tcp_ports():
    # Two nbval chains run at once in `make test`; TCP ports picked by one can be taken by the other.
    plugin = _nbval_plugin()
    km, kc = plugin.start_new_kernel(startup_timeout=60, kernel_name="python3", cwd=str(ROOT))
    try:
        assert km.transport == "ipc"
        assert km.ip.startswith(plugin.ipc_dir())
        reply = kc.execute_interactive("x = 6 * 7", timeout=30)
        assert reply["content"]["status"] == "ok"
        assert Path(f"{km.ip}-{km.shell_port}").is_socket()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        plugin.pytest_unconfigure(None)
    assert not Path(km.ip).parent.exists(), "the socket folder is removed at the end of the run"


def test_nbval_kernel_that_dies_at_start_is_retried_and_its_stderr_quoted(tmp_path, monkeypatch):
    import sys

    spec_dir = tmp_path / "kernels" / "dies"
    spec_dir.mkdir(parents=True)
    counter = tmp_path / "starts.txt"
    code = f"import sys; open({str(counter)!r}, 'a').write('x'); sys.stderr.write('boom: no such module'); sys.exit(3)"
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {"argv": [sys.executable, "-c", code, "{connection_file}"], "display_name": "dies", "language": "python"}
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    plugin = _nbval_plugin()
    try:
        with pytest.raises(RuntimeError, match=r"(?s)did not start in 3 attempts.*boom: no such module"):
            plugin.start_new_kernel(startup_timeout=20, kernel_name="dies")
    finally:
        plugin.pytest_unconfigure(None)
    assert counter.read_text() == "x" * plugin.START_ATTEMPTS
