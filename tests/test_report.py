"""The course report: `report.record` in a notebook, the figures and summary.json of the runner, and
kernels whose notebooks carry no TensorFlow start-up lines (under `make run` and nbval)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from strokekit import report
from strokekit.runner import run_notebooks

ROOT = Path(__file__).resolve().parents[1]


def test_record_without_the_variable_writes_nothing_and_returns_the_figures(tmp_path, monkeypatch):
    monkeypatch.delenv(report.FIGURES_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    got = report.record(dice=np.float32(0.5), configs=np.int64(7), learned=np.bool_(True),
                        arch="unet")
    assert got == {"dice": 0.5, "configs": 7, "learned": True, "arch": "unet"}
    assert [type(v) for v in got.values()] == [float, int, bool, str]
    assert list(tmp_path.iterdir()) == []


def test_record_merges_into_the_file(tmp_path, monkeypatch):
    path = tmp_path / "figures" / "04.json"
    monkeypatch.setenv(report.FIGURES_ENV, str(path))
    report.record(dice=0.5, epochs=3)
    report.record(dice=0.71, arch="resunet")
    assert json.loads(path.read_text()) == {"dice": 0.71, "epochs": 3, "arch": "resunet"}
    assert [p.name for p in path.parent.iterdir()] == ["04.json"], "no temporary file left behind"


@pytest.mark.parametrize("value", [float("nan"), np.inf, [0.5], np.zeros(2), None, "x" * 200, 1j],
                         ids=["nan", "inf", "list", "array", "none", "long-str", "complex"])
def test_record_rejects_what_is_not_a_finite_number_bool_or_short_string(tmp_path, monkeypatch,
                                                                          value):
    path = tmp_path / "figures.json"
    monkeypatch.setenv(report.FIGURES_ENV, str(path))
    with pytest.raises(ValueError, match="'bad_one'"):
        report.record(fine=1.0, bad_one=value)
    assert not path.exists(), "nothing is written when one figure is bad"


def _notebook(path: Path, *sources: str) -> Path:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    return path


def test_runner_writes_figures_to_summary_and_records_a_failing_notebook(tmp_path, capsys):
    pytest.importorskip("nbclient")
    good = _notebook(tmp_path / "01_good.ipynb", "from strokekit import report",
                     "import time; time.sleep(1.5); report.record(x=1.5, name='unet')")
    bad = _notebook(tmp_path / "02_bad.ipynb",
                    "from strokekit import report; report.record(before=2)",
                    "1 / 0", "report.record(after=3)")
    out = tmp_path / "build"
    records = run_notebooks([good, bad], out, html=False, progress_every=0.5)
    assert [(r["notebook"], r["ok"], r["figures"]) for r in records] == [
        ("01_good", True, {"x": 1.5, "name": "unet"}),
        ("02_bad", False, {"before": 2}),
    ]
    assert records[0]["error"] is None
    assert records[1]["error"] == "cell 2: ZeroDivisionError: division by zero"
    assert Path(records[1]["ipynb"]).is_file() and records[1]["html"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == "quick" and summary["finished"].endswith("+00:00")
    assert summary["notebooks"] == records
    printed = capsys.readouterr().out
    assert "[1/2] 01_good …" in printed and "[2/2] 02_bad …" in printed
    assert re.search(r"^  01_good: \ds, cell 2/2$", printed, re.M), printed


def test_cli_table_shows_status_seconds_figures_and_the_summary(tmp_path, monkeypatch, capsys):
    from strokekit import cli, runner

    fake = [{"notebook": "04_unet_vs_resunet", "seconds": 312.46, "ok": True, "error": None,
             "figures": {"watched_val_dice": 0.712345, "grid_configs_learned": 7}},
            {"notebook": "05_transfer_learning", "seconds": 12.0, "ok": False,
             "error": "cell 9: AssertionError: no lesion learned", "figures": {}}]
    monkeypatch.setattr(runner, "run_notebooks", lambda *a, **k: fake)
    assert cli.main(["run-notebooks", "x.ipynb", "--out", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["notebook", "status", "seconds", "figures"]
    assert lines[2].split() == ["04_unet_vs_resunet", "ok", "312.5", "watched_val_dice=0.7123",
                                "grid_configs_learned=7"]
    assert lines[3].split() == ["05_transfer_learning", "FAILED", "12.0"]
    assert lines[4].strip() == "cell 9: AssertionError: no lesion learned"
    assert lines[-1] == f"summary:            {tmp_path.resolve() / 'summary.json'}"


KERAS_CELLS = ("import keras", "import warnings; warnings.warn('a warning a student should see')")


def _stderr_texts(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")


@pytest.mark.slow
def test_tensorflow_start_up_lines_stay_out_of_notebooks_run_by_make_run(tmp_path):
    pytest.importorskip("tensorflow")
    path = _notebook(tmp_path / "keras.ipynb", *KERAS_CELLS)
    (record,) = run_notebooks([path], tmp_path / "build", html=False, progress_every=None)
    assert record["ok"], record["error"]
    import nbformat

    cells = nbformat.read(record["ipynb"], as_version=4).cells
    assert not any(w in _stderr_texts(cells[0].outputs) for w in ("absl", "oneDNN", "I0000"))
    assert "a warning a student should see" in _stderr_texts(cells[1].outputs)


@pytest.mark.slow
def test_tensorflow_start_up_lines_stay_out_of_notebooks_under_nbval():
    pytest.importorskip("nbval")
    pytest.importorskip("tensorflow")
    spec = importlib.util.spec_from_file_location("strokekit_nbval_plugin",
                                                  ROOT / "notebooks" / "conftest.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    km, kc = plugin.start_new_kernel(startup_timeout=60, kernel_name="python3", cwd=str(ROOT))
    try:
        outputs = []

        def keep(msg):
            outputs.append({"name": msg["content"].get("name"), "text": msg["content"].get("text")})

        for source in KERAS_CELLS:
            reply = kc.execute_interactive(source, timeout=120, output_hook=keep)
            assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        plugin.pytest_unconfigure(None)
    stderr = _stderr_texts(outputs)
    assert not any(w in stderr for w in ("absl", "oneDNN", "I0000"))
    assert "a warning a student should see" in stderr


def test_run_notebooks_takes_the_profile_from_the_environment(tmp_path, monkeypatch):
    from strokekit import cli, runner

    seen = {}
    fake = [{"notebook": "01", "seconds": 1.0, "ok": True, "error": None, "figures": {}}]
    monkeypatch.setattr(runner, "run_notebooks", lambda *a, **k: seen.update(k) or fake)
    monkeypatch.setenv("STROKEKIT_PROFILE", "full")
    cli.main(["run-notebooks", "x.ipynb", "--out", str(tmp_path)])
    assert seen["profile"] == "full"            # `STROKEKIT_PROFILE=full make run` runs the full profile
    cli.main(["run-notebooks", "x.ipynb", "--out", str(tmp_path), "--profile", "smoke"])
    assert seen["profile"] == "smoke"


def test_parallel_runs_the_two_chains_side_by_side_and_keeps_the_course_order(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    from strokekit import runner

    monkeypatch.setattr(runner, "CHAINS", (("01_a", "03_c"), ("02_b",)))
    cell = "import time; t0 = time.time(); time.sleep(4); from strokekit import report; report.record(t0=t0)"
    paths = [_notebook(tmp_path / f"{name}.ipynb", cell) for name in ("01_a", "02_b", "03_c", "04_free")]
    records = run_notebooks(paths, tmp_path / "build", html=False, progress_every=None, parallel=True)
    assert [r["notebook"] for r in records] == ["01_a", "02_b", "03_c", "04_free"] and all(r["ok"] for r in records)
    start = {r["notebook"]: r["figures"]["t0"] for r in records}
    assert abs(start["02_b"] - start["01_a"]) < 3              # the chains ran at the same time (in turn: > 4 s)
    assert start["03_c"] >= start["01_a"] + 4                  # a chain runs in order
    assert start["04_free"] >= max(start["03_c"], start["02_b"]) + 4   # a notebook in no chain runs after both


def test_the_makefile_nbval_chains_are_the_runners_chains():
    from strokekit.runner import CHAINS

    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    for var, chain in zip(("NBVAL_A", "NBVAL_B"), CHAINS):
        listed = re.search(rf"^{var} \?=(.*)$", text, re.M).group(1).split()
        assert [Path(p).stem for p in listed] == list(chain)
