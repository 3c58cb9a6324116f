"""Execute the course notebooks headless and write executed copies and HTML (the kit's main job).

Used by ``make run`` through ``python -m strokekit run-notebooks``. Besides the executed copies it
writes ``summary.json``: per notebook its run time, whether it ran to the end, the error if not,
and the headline figures the notebook recorded with :func:`strokekit.report.record`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .paths import project_root
from .report import FIGURES_ENV
from .runs import write_json

#: Environment every notebook kernel gets: quiet TensorFlow, oneDNN kernels (1.5–2× faster on CPU).
KERNEL_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "1",
    "PYTHONHASHSEED": "0",
}
#: Arguments every notebook kernel gets (here and under nbval, see notebooks/conftest.py).
#: Recent TensorFlow (2.21 here) logs its start-up lines ("All log messages before
#: absl::InitializeLog() ...", "oneDNN custom operations are on ...") through absl straight to file
#: descriptor 2; TF_CPP_MIN_LOG_LEVEL no longer filters them (tensorflow issue 100442) and only
#: turning oneDNN off would. ipykernel copies that descriptor into the notebook as stderr output;
#: with this switch it stays the kernel's own stderr (``logs/<name>.log`` here, a temporary file
#: under nbval). Python's warnings and tracebacks go through ``sys.stderr`` and still appear in
#: the notebook.
KERNEL_ARGS = ("--IPKernelApp.capture_fd_output=False",)
#: File in the output folder that lists every notebook's record.
SUMMARY_NAME = "summary.json"
#: Notebooks that can run at the same time as the other chain (``run-notebooks --parallel``, and nbval's
#: ``NBVAL_A``/``NBVAL_B`` in the Makefile, which a test keeps equal to these). Notebooks that hand files to
#: each other share a chain: 02 saves the course split that 04, 06 and 09 read, and 06 evaluates the runs
#: of 04 and 05. Most of a quick notebook is single-threaded Python, so two chains share 2 cores well.
CHAINS: tuple[tuple[str, ...], ...] = (
    ("01_preprocessing", "02_cluster_split", "04_unet_vs_resunet", "05_transfer_learning", "06_evaluation",
     "09_3d_reconstruction", "03_augmentation", "08_ctp_core_penumbra"),
    ("07_multiclass", "10_what_generalizes"),
)


def find_notebooks(
    folder: str | os.PathLike | None = None, pattern: str = "[0-9][0-9]_*.ipynb"
) -> list[Path]:
    """The numbered course notebooks in order (``NN_snake_case.ipynb``)."""
    folder = Path(folder) if folder else project_root() / "notebooks"
    return sorted(folder.glob(pattern))


def run_notebooks(
    notebooks: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    profile: str = "quick",
    timeout: int = 1800,
    html: bool = True,
    progress_every: float | None = 30.0,
    parallel: bool = False,
) -> list[dict]:
    """Execute each notebook top to bottom in a fresh kernel, in its own folder.

    Prints ``[k/n] name …`` before each notebook and, while it runs, its elapsed time and current
    cell every ``progress_every`` seconds. A notebook that fails does not stop the others.
    With ``parallel``, the notebooks of each chain in :data:`CHAINS` run in order while the other
    chain runs beside it (notebooks in no chain run after both); kernels talk over Unix sockets,
    so two kernels starting at once cannot take each other's ports.

    Args:
        notebooks: paths of the notebooks, run in the given order.
        out_dir: where executed ``.ipynb`` (and ``.html``) copies, the kernels' logs
            (``logs/<name>.log``) and ``summary.json`` go; sources are not touched.
        profile: value for ``STROKEKIT_PROFILE`` in the kernels.
        timeout: seconds allowed per cell.
        html: also export HTML.
        progress_every: seconds between progress lines; ``None`` or 0 prints none.
        parallel: run the two :data:`CHAINS` at the same time.

    Returns:
        one dict per notebook, also written to ``out_dir/summary.json`` under ``"notebooks"``:
        ``notebook`` (file name without ``.ipynb``), ``seconds``, ``ok``, ``error`` (``None`` or
        ``"cell 12: AssertionError: ..."``), ``figures`` (what the notebook passed to
        :func:`strokekit.report.record`, up to where it stopped), ``ipynb``, ``html`` (``None``
        without HTML) and ``log``.
    """
    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (out_dir / ".figures").mkdir(exist_ok=True)
    paths = [Path(p) for p in notebooks]
    counter = iter(range(1, len(paths) + 1))
    lock = threading.Lock()
    found: dict[Path, dict] = {}

    def run_chain(chain: list[Path]) -> None:
        for path in chain:
            with lock:
                k = next(counter)
            found[path] = _run_one(path, k, len(paths), out_dir, profile, timeout, html, progress_every)

    if parallel:
        *chains, rest = _chains(paths)
        threads = [threading.Thread(target=run_chain, args=(chain,)) for chain in chains if chain]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        run_chain(rest)  # the notebooks in no chain, after both
    else:
        run_chain(paths)
    records = [found[path] for path in paths]
    write_json(out_dir / SUMMARY_NAME, {
        "profile": profile,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notebooks": records,
    })
    return records


def _chains(paths: list[Path]) -> list[list[Path]]:
    """The paths grouped by :data:`CHAINS` (in the given order), plus a last group of the others."""
    groups = [[p for p in paths if p.stem in chain] for chain in CHAINS]
    return [*groups, [p for p in paths if not any(p.stem in chain for chain in CHAINS)]]


def _run_one(path: Path, k: int, n: int, out_dir: Path, profile: str, timeout: int, html: bool,
             progress_every: float | None) -> dict:
    """Execute one notebook (see :func:`run_notebooks`) and return its record."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    name = path.stem
    print(f"[{k}/{n}] {name} …\n", end="", flush=True)  # one write: the other chain's lines cannot split it
    figures_file = (out_dir / ".figures" / f"{name}.json").resolve()
    figures_file.unlink(missing_ok=True)
    env = {**os.environ, **KERNEL_ENV, "STROKEKIT_PROFILE": profile,
           FIGURES_ENV: str(figures_file)}
    nb = nbformat.read(path, as_version=4)
    watch = _Progress(name, len(nb.cells), progress_every)
    sockets = tempfile.mkdtemp(prefix="strokekit-kernel-")
    km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
    client = NotebookClient(
        nb, km=km, timeout=timeout, kernel_name="python3", extra_arguments=list(KERNEL_ARGS),
        resources={"metadata": {"path": str(path.parent)}}, on_cell_start=watch.on_cell_start,
    )
    log = out_dir / "logs" / f"{name}.log"
    error = None
    with open(log, "w", encoding="utf-8") as log_file, watch:
        try:
            client.execute(env=env, stdout=log_file, stderr=subprocess.STDOUT)
        except CellExecutionError as exc:
            error = f"cell {watch.cell}: {exc.ename}: {exc.evalue}"
        except (CellTimeoutError, DeadKernelError) as exc:
            detail = str(exc).strip().splitlines()[:1]  # "Kernel died", "A cell timed out ..."
            error = ": ".join([f"cell {watch.cell}", type(exc).__name__, *detail])
    executed = out_dir / path.name
    nbformat.write(nb, executed)
    html_path = None
    if html:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        html_path = executed.with_suffix(".html")
        html_path.write_text(body, encoding="utf-8")
    figures = {}
    if figures_file.is_file():
        figures = json.loads(figures_file.read_text(encoding="utf-8"))
    shutil.rmtree(sockets, ignore_errors=True)
    return {
        "notebook": name, "seconds": round(watch.seconds, 1), "ok": error is None,
        "error": error, "figures": figures, "ipynb": str(executed),
        "html": str(html_path) if html_path else None, "log": str(log),
    }


class _Progress:
    """Times one notebook; while it runs, a thread prints ``  name: 1m30s, cell 12/40``."""

    def __init__(self, name: str, num_cells: int, every: float | None):
        self.name, self.num_cells, self.every = name, num_cells, every
        self.cell = 0  # 1-based number of the cell running now
        self.seconds = 0.0
        self._start = 0.0
        self._stop = threading.Event()
        self._thread = None

    def on_cell_start(self, cell, cell_index: int) -> None:
        self.cell = cell_index + 1

    def __enter__(self) -> _Progress:
        self._start = time.perf_counter()
        if self.every:
            self._thread = threading.Thread(target=self._report, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _report(self) -> None:
        while not self._stop.wait(self.every):
            elapsed = _duration(time.perf_counter() - self._start)
            where = f"cell {self.cell}/{self.num_cells}" if self.cell else "starting the kernel"
            print(f"  {self.name}: {elapsed}, {where}\n", end="", flush=True)


def _duration(seconds: float) -> str:
    """``45s``, ``1m30s`` or ``1h02m``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
