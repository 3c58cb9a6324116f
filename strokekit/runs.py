"""One run folder: what a training run writes, and how the app, the CLI and the notebooks read it.

Every trainer of the kit writes the same layout through :class:`RunFolder`:

- ``config.json``: the settings, with ``kind`` (one of :data:`KINDS`) so a reader knows what it holds;
- ``model.keras``: the model (a few-shot recipe's further members are ``model_1.keras``, ...);
- ``history.csv``: one row per epoch;
- ``metrics.json``: the final scores and ``data``, the data they were measured on;
- ``split.json``: the split the run trained on, when it was given one;
- ``previews/``: predicted masks on a few validation slices after every epoch;
- ``checkpoint.keras`` and ``checkpoint.json`` while a run trains: model, optimizer and training state at the
  end of the last epoch, which ``resume=True`` continues from (:func:`strokekit.engine.fit`); removed when
  training ends;
- extras by kind: ``fewshot.json`` (a few-shot recipe's decisions), ``schedule.json`` (a fine-tuning
  schedule), ``curves.png``.

:func:`list_runs` is how the app, the CLI and notebook 06 find runs. Introduced in
notebooks/04_unet_vs_resunet.ipynb.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import to_dict
from .errors import DataError
from .paths import write_text_atomic

#: What a run can be: a slice model of :func:`strokekit.train.train` or
#: :func:`strokekit.transfer.fine_tune` (``"binary"``), notebook 07's softmax U-Net, notebook 08's
#: perfusion model, or a few-shot CT recipe of :func:`strokekit.fewshot.save_fitted`.
KINDS: tuple[str, ...] = ("binary", "multiclass", "perfusion", "fewshot")

#: File that marks a run folder as a fitted few-shot recipe (beside ``config.json`` and ``model.keras``).
FEWSHOT_FILE = "fewshot.json"

#: The files a run writes; ``overwrite=True`` removes these (and previews, extra members), nothing else.
RUN_FILES: tuple[str, ...] = ("config.json", "model.keras", "history.csv", "metrics.json", "split.json",
                              FEWSHOT_FILE, "schedule.json", "curves.png", "checkpoint.keras", "checkpoint.json")

# Runs written before config.json recorded its kind are told apart by fields only their config has.
_LEGACY_FIELDS = {
    "multiclass": {"base_filters", "num_levels", "class_names"},
    "perfusion": {"use_clinical", "lr_scale", "schedule"},
}


def _dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2)


def data_text(dataset, role: str = "validation") -> str:
    """What scores were measured on, for ``metrics.json``: e.g. ``"validation: 4 slices of 2 patients"``."""
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    text = f"{role}: {count(len(dataset), 'slice')}"
    if dataset.patient_ids is not None:
        text += f" of {count(len(set(dataset.patient_ids)), 'patient')}"
    return text


class RunFolder:
    """A run folder: :meth:`create` one to write a run, :meth:`open` one to read it.

    Attributes:
        folder: the folder (a Path).
        kind: one of :data:`KINDS`.
        config: the settings as saved (``config.json`` without its ``kind``).
    """

    def __init__(self, folder: str | os.PathLike, kind: str, config: dict[str, Any]):
        self.folder = Path(folder)
        self.kind = kind
        self.config = config

    def __repr__(self) -> str:
        return f"RunFolder({os.fspath(self.folder)!r}, kind={self.kind!r})"

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, folder: str | os.PathLike, kind: str, config: Any, *, overwrite: bool = False,
               resume: bool = False, split: Any = None) -> RunFolder:
        """Start a run in ``folder``: write ``config.json`` (with ``kind``) and ``split.json``.

        Args:
            folder: the run folder; created when missing.
            kind: one of :data:`KINDS`.
            config: the settings (a config dataclass or a JSON-ready dict).
            overwrite: replace a run already in the folder: its files (:data:`RUN_FILES`,
                previews, further model members) are removed first; other files stay.
            resume: continue the run already in the folder: its files are kept (``config.json``
                is written again).
            split: a :class:`strokekit.split.Split` (anything with ``save(path)``) for ``split.json``.

        Returns:
            The RunFolder.

        Raises:
            ValueError: an unknown kind, or both ``overwrite`` and ``resume``.
            FileExistsError: the folder holds a run (``config.json`` or ``model.keras``) and neither
                ``overwrite`` nor ``resume`` is set; nothing is changed.
        """
        if kind not in KINDS:
            raise ValueError(f"Expected one of {list(KINDS)}. Received: kind={kind!r}")
        if overwrite and resume:
            raise ValueError("pass overwrite=True (start afresh) or resume=True (continue), not both")
        folder = Path(folder)
        held = (folder / "config.json").exists() or (folder / "model.keras").exists()
        if held and not (overwrite or resume):
            raise FileExistsError(f"{folder} already holds a run; pass overwrite=True to replace it "
                                  "or resume=True to continue it")
        run = cls(folder, kind, to_dict(config))
        if resume and (folder / "config.json").exists():
            saved = cls.open(folder)
            if saved.kind != kind or json.loads(_dumps(saved.config)) != json.loads(_dumps(run.config)):
                raise ValueError(f"{folder} holds a {saved.kind} run with other settings: resume=True continues "
                                 "a run with its own settings; pass overwrite=True to start this one instead")
        if held and overwrite:
            run._remove_run_files()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "config.json", _dumps({"kind": kind, **run.config}))
        if split is not None:
            run.write_split(split)
        return run

    def _remove_run_files(self) -> None:
        for name in RUN_FILES:
            (self.folder / name).unlink(missing_ok=True)
        for path in [*self.folder.glob("model_[0-9]*.keras"), *self.previews_dir.glob("epoch_*.png")]:
            path.unlink()
        if self.previews_dir.is_dir() and not any(self.previews_dir.iterdir()):
            self.previews_dir.rmdir()

    def model_file(self, member: int = 0) -> Path:
        """``model.keras``, or ``model_<member>.keras`` for a further member of a few-shot recipe."""
        return self.folder / ("model.keras" if member == 0 else f"model_{member}.keras")

    def save_model(self, model, member: int = 0, path: str | os.PathLike | None = None) -> Path:
        """Save a Keras model as :meth:`model_file` (``model.keras`` by default) or as ``path``.

        Written through a temporary file and a rename, so an interrupted save leaves the old file.
        """
        path = Path(path) if path is not None else self.model_file(member)
        partial = path.with_name(f".{path.stem}.partial.keras")
        try:
            model.save(partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def write_history(self, history) -> Path:
        """Write the per-epoch history (a DataFrame) as ``history.csv``."""
        return write_text_atomic(self.history_path, history.to_csv(index=False))

    def write_metrics(self, metrics: dict[str, Any], *, data: str) -> Path:
        """Write ``metrics.json``: the scores and, under ``data``, what they were measured on
        (e.g. :func:`data_text` of the validation set)."""
        return self.write_json("metrics.json", {**metrics, "data": data})

    def write_split(self, split) -> Path:
        """Save the split the run trained on as ``split.json``."""
        return split.save(self.folder / "split.json")

    def write_json(self, name: str, obj: Any) -> Path:
        """Write a JSON file of the run (e.g. ``fewshot.json``, ``schedule.json``), atomically."""
        return write_text_atomic(self.folder / name, _dumps(obj))

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, folder: str | os.PathLike) -> RunFolder:
        """Read a run folder's ``config.json``; runs written before it recorded a kind get one inferred.

        Raises:
            DataError: no ``config.json``, or one that is damaged or names an unknown kind.
        """
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise DataError("not a run folder (no config.json)", folder)
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"config.json cannot be read ({exc})", path) from None
        if not isinstance(config, dict):
            raise DataError("config.json holds no settings (not a JSON object)", path)
        kind = config.pop("kind", None) or _legacy_kind(folder, config)
        if kind not in KINDS:
            raise DataError(f"unknown run kind {kind!r}; expected one of {list(KINDS)}", path)
        return cls(folder, kind, config)

    @property
    def model_path(self) -> Path:
        return self.model_file(0)

    @property
    def history_path(self) -> Path:
        return self.folder / "history.csv"

    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.keras``: the model with its optimizer at the end of the last epoch trained."""
        return self.folder / "checkpoint.keras"

    @property
    def checkpoint_state_path(self) -> Path:
        """``checkpoint.json``: epoch, history and training state that go with ``checkpoint.keras``."""
        return self.folder / "checkpoint.json"

    @property
    def previews_dir(self) -> Path:
        return self.folder / "previews"

    @property
    def split_path(self) -> Path | None:
        """``split.json``, or None when the run saved no split."""
        path = self.folder / "split.json"
        return path if path.is_file() else None

    @property
    def finished(self) -> bool:
        """Whether the run ended: ``model.keras`` beside ``config.json`` and no ``checkpoint.json`` (a run
        that is still training, or was interrupted, has one: its ``model.keras`` is only the best so far)."""
        return (self.model_path.is_file() and (self.folder / "config.json").is_file()
                and not self.checkpoint_state_path.exists())

    @property
    def history(self):
        """The per-epoch history (a pandas DataFrame), or None when there is none."""
        import pandas as pd

        return pd.read_csv(self.history_path) if self.history_path.is_file() else None

    @property
    def metrics(self) -> dict[str, Any] | None:
        """What ``metrics.json`` holds, or None when there is none."""
        path = self.folder / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def load_model(self):
        """The run's ``model.keras`` in Keras safe mode (:func:`strokekit.train.load_model`).

        Raises:
            DataError: no model, or a damaged file.
        """
        from .train import load_model

        return load_model(self.model_path)


def _legacy_kind(folder: Path, config: dict[str, Any]) -> str:
    if (folder / FEWSHOT_FILE).exists():
        return "fewshot"
    for kind, fields in _LEGACY_FIELDS.items():
        if fields & config.keys():
            return kind
    return "binary"


def list_runs(root: str | os.PathLike, kind: str | tuple[str, ...] | None = None) -> list[RunFolder]:
    """The finished runs (:attr:`RunFolder.finished`) under ``root``, at any depth.

    Args:
        root: where to look; a missing folder holds no runs.
        kind: keep only runs of this kind (or these kinds); None keeps all.

    Returns:
        RunFolders sorted by folder. Folders whose ``config.json`` cannot be read are left out.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    for k in kinds or ():
        if k not in KINDS:
            raise ValueError(f"Expected one of {list(KINDS)}. Received: kind={k!r}")
    root = Path(root)
    found = []
    for path in sorted(root.rglob("config.json")) if root.is_dir() else []:
        if not (path.parent / "model.keras").is_file() or (path.parent / "checkpoint.json").exists():
            continue  # no model yet, or a run still training (or interrupted): not finished
        try:
            run = RunFolder.open(path.parent)
        except DataError:
            continue
        if kinds is None or run.kind in kinds:
            found.append(run)
    return found
