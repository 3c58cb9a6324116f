"""Where things are: the project, its data and runs folders, and the shared real data.

Paths come from arguments first, then one environment variable each, then defaults relative
to the project root. Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "STROKEKIT_HOME"
DATA_ENV = "STROKEKIT_DATA"
RUNS_ENV = "STROKEKIT_RUNS"
CTICH_ENV = "STROKEKIT_CTICH"


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename, so that a reader
    (another notebook running at the same time) sees the old file or the new one, never half of one."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The strokekit checkout: ``$STROKEKIT_HOME``, else the nearest folder above ``start``
    (default: the working directory) holding both ``pyproject.toml`` and ``strokekit/``, else
    the folder above this package."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "strokekit").is_dir():
            return folder
    return Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """Folder for generated data (the phantom): ``$STROKEKIT_DATA`` or ``<root>/data``."""
    return Path(os.environ.get(DATA_ENV) or project_root() / "data")


def runs_dir() -> Path:
    """Folder where training runs write their own sub-folders: ``$STROKEKIT_RUNS`` or ``<root>/runs``."""
    return Path(os.environ.get(RUNS_ENV) or project_root() / "runs")


def ctich_dir() -> Path | None:
    """The real CT-ICH slices if present: ``$STROKEKIT_CTICH``, else ``<root>/../shared/data/ct-ich``.

    Returns None when the folder (with its ``slices.csv``) is absent, so callers can skip cleanly.
    These are traumatic intracranial haemorrhages, not ischemic strokes.
    """
    candidate = Path(os.environ.get(CTICH_ENV) or project_root().parent / "shared" / "data" / "ct-ich")
    return candidate if (candidate / "slices.csv").is_file() else None
