"""One run folder: what a training run writes, and how the app, the CLI and the notebooks read it.

Every trainer of the kit writes the same layout through :class:`RunFolder`:

- ``config.json``: the settings, with ``kind`` (one of :data:`KINDS`) so a reader knows what it holds;
- ``model.keras``: the model (a few-shot recipe's further members are ``model_1.keras``, ...);
- ``history.csv``: one row per epoch;
- ``metrics.json``: the final scores and ``data``, the data they were measured on;
- ``split.json``: the split the run trained on, when it was given one;
- ``previews/``: predicted masks on a few validation slices after every epoch;
- ``checkpoint.keras`` and ``checkpoint.json`` while a run trains: model, optimizer and training state at the
  end of the last epoch checkpointed, which ``resume=True`` continues from (:func:`strokekit.engine.fit`);
  removed when training ends. ``checkpoint.json`` is there from the first epoch on (a run that has it is
  not finished); the state that ``resume`` reads lives inside ``checkpoint.keras``, so that model and
  state are replaced by one rename (see :meth:`RunFolder.save_checkpoint`);
- extras by kind: ``fewshot.json`` (a few-shot recipe's decisions), ``schedule.json`` (a fine-tuning
  schedule), ``curves.png``.

:func:`list_runs` is how the app, the CLI and notebook 06 find runs. Introduced in
notebooks/04_unet_vs_resunet.ipynb.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

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


#: Members of ``checkpoint.keras`` (a zip archive) beside Keras' own: the training state and the best weights.
_STATE_MEMBER, _BEST_MEMBER = "strokekit_state.json", "strokekit_best.npz"


def _dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (a config dataclass or JSON-ready data, see :func:`strokekit.config.to_dict`) as
    indented JSON, atomically: a reader sees the old file or the new one (the kit's one JSON writer)."""
    return write_text_atomic(path, _dumps(obj))


def data_text(dataset, role: str = "validation") -> str:
    """What scores were measured on, for ``metrics.json``: e.g. ``"validation: 4 slices of 2 patients"``."""
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    text = f"{role}: {count(len(dataset), 'slice')}"
    if dataset.patient_ids is not None:
        text += f" of {count(len(set(dataset.patient_ids)), 'patient')}"
    return text


def _file_property(name: str, doc: str) -> property:
    """A read-only property: the path of the file ``name`` in the run folder."""
    return property(lambda self: self.folder / name, doc=doc)


def _read_object(path: Path, holds: str) -> dict[str, Any]:
    """The JSON object in the run file ``path``, or a DataError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path.name} cannot be read ({exc})", path) from None
    if not isinstance(data, dict):
        raise DataError(f"{path.name} holds no {holds} (not a JSON object)", path)
    return data


def _finished(folder: Path) -> bool:
    return ((folder / "model.keras").is_file() and (folder / "config.json").is_file()
            and not (folder / "checkpoint.json").exists() and not (folder / "checkpoint.keras").exists())


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
        run.write_json("config.json", {"kind": kind, **run.config})
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

    def save_model(self, model, member: int = 0, path: str | os.PathLike | None = None,
                   extra: dict[str, bytes] | None = None) -> Path:
        """Save a Keras model as :meth:`model_file` (``model.keras`` by default) or as ``path``.

        Written through a temporary file and a rename, so an interrupted save leaves the old file.
        ``extra`` files (name → bytes) go into the ``.keras`` archive (a zip, whose other members
        Keras ignores) before the rename: written as one with the model.
        """
        path = Path(path) if path is not None else self.model_file(member)
        partial = path.with_name(f".{path.stem}.partial.keras")
        try:
            model.save(partial)
            if extra:
                with zipfile.ZipFile(partial, "a") as archive:
                    for name, data in extra.items():
                        archive.writestr(name, data)
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
        """Write a JSON file of the run (e.g. ``fewshot.json``, ``schedule.json``), atomically (:func:`write_json`)."""
        return write_json(self.folder / name, obj)

    # ------------------------------------------------------------------ the checkpoint
    def start_training(self) -> None:
        """Mark the run as training: ``checkpoint.json`` (no epoch done yet), and no checkpoint of an
        earlier run. From here until :meth:`remove_checkpoint` the run is not :attr:`finished`."""
        self.checkpoint_path.unlink(missing_ok=True)
        self.write_json(self.checkpoint_state_path.name, {"epochs_done": 0})

    def save_checkpoint(self, model, state: dict[str, Any], best_weights: list | None = None) -> None:
        """Write ``checkpoint.keras``: the model with its optimizer and, inside the same archive, the
        training ``state`` and (when they are not the model's own) the ``best_weights``; one rename puts
        all of it in place, so an interrupt leaves the previous checkpoint or this one, never a mix.
        Then ``checkpoint.json``, a copy of the state for people (resume reads the archive)."""
        extra = {_STATE_MEMBER: json.dumps(to_dict(state)).encode()}
        if best_weights is not None:
            buffer = io.BytesIO()
            np.savez(buffer, *best_weights)
            extra[_BEST_MEMBER] = buffer.getvalue()
        self.save_model(model, path=self.checkpoint_path, extra=extra)
        self.write_json(self.checkpoint_state_path.name, state)

    def read_checkpoint(self) -> tuple[dict[str, Any], list | None] | None:
        """The state and best weights of :meth:`save_checkpoint` (best weights None when not stored
        apart); None when there is no ``checkpoint.keras``. A checkpoint written before the state moved
        into the archive has its state in ``checkpoint.json``."""
        if not self.checkpoint_path.is_file():
            return None
        with zipfile.ZipFile(self.checkpoint_path) as archive:
            names = set(archive.namelist())
            if _STATE_MEMBER not in names:
                return json.loads(self.checkpoint_state_path.read_text()), None
            state = json.loads(archive.read(_STATE_MEMBER))
            if _BEST_MEMBER not in names:
                return state, None
            with np.load(io.BytesIO(archive.read(_BEST_MEMBER))) as saved:
                return state, [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def remove_checkpoint(self) -> None:
        """Remove the checkpoint when training ends: ``checkpoint.json`` first, so that an interrupt in
        between leaves a ``checkpoint.keras`` that ``resume`` finishes from."""
        for path in (self.checkpoint_state_path, self.checkpoint_path):
            path.unlink(missing_ok=True)

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
        config = _read_object(path, "settings")
        kind = config.pop("kind", None) or _legacy_kind(folder, config)
        if kind not in KINDS:
            raise DataError(f"unknown run kind {kind!r}; expected one of {list(KINDS)}", path)
        return cls(folder, kind, config)

    model_path = _file_property("model.keras", "``model.keras``: the model (the first member of a few-shot recipe).")
    history_path = _file_property("history.csv", "``history.csv``: one row per epoch.")
    checkpoint_path = _file_property("checkpoint.keras", "``checkpoint.keras``: model, optimizer and training "
                                     "state at the end of the last epoch checkpointed.")
    checkpoint_state_path = _file_property("checkpoint.json", "``checkpoint.json``: marks a run that is training "
                                           "(or was interrupted); a readable copy of the checkpoint's state.")
    previews_dir = _file_property("previews", "``previews/``: the per-epoch preview images.")

    @property
    def split_path(self) -> Path | None:
        """``split.json``, or None when the run saved no split."""
        path = self.folder / "split.json"
        return path if path.is_file() else None

    @property
    def finished(self) -> bool:
        """Whether the run ended: ``model.keras`` beside ``config.json`` and no checkpoint (a run that is
        still training, or was interrupted, has one: its ``model.keras`` is only the best so far)."""
        return _finished(self.folder)

    @property
    def history(self):
        """The per-epoch history (a pandas DataFrame), or None when there is none."""
        import pandas as pd

        return pd.read_csv(self.history_path) if self.history_path.is_file() else None

    @property
    def metrics(self) -> dict[str, Any] | None:
        """What ``metrics.json`` holds, or None when there is none.

        Raises:
            DataError: a ``metrics.json`` that cannot be read or holds no JSON object.
        """
        path = self.folder / "metrics.json"
        return _read_object(path, "scores") if path.is_file() else None

    def load_model(self):
        """The run's ``model.keras`` in Keras safe mode (:func:`strokekit.engine.load_model`).

        Raises:
            DataError: no model, or a damaged file.
        """
        from .engine import load_model

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
        RunFolders sorted by folder. A folder whose ``config.json`` cannot be read is left out with a
        warning that names it and the problem.
    """
    kinds = (kind,) if isinstance(kind, str) else kind
    for k in kinds or ():
        if k not in KINDS:
            raise ValueError(f"Expected one of {list(KINDS)}. Received: kind={k!r}")
    root = Path(root)
    found = []
    for path in sorted(root.rglob("config.json")) if root.is_dir() else []:
        if not _finished(path.parent):
            continue  # no model yet, or a run still training (or interrupted)
        try:
            run = RunFolder.open(path.parent)
        except DataError as exc:
            warnings.warn(f"skipped the run in {path.parent}: {exc.problem}", stacklevel=2)
            continue
        if kinds is None or run.kind in kinds:
            found.append(run)
    return found


# --------------------------------------------------------------------------- few-shot recipes
def _fewshot_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What ``fewshot.json`` of a run folder says, checked to be a few-shot recipe's description.

    Raises:
        DataError: no ``fewshot.json`` (the folder is the error's ``path``), or a damaged one (it is the ``path``).
    """
    path = Path(folder) / FEWSHOT_FILE
    if not path.is_file():
        raise DataError(f"not a few-shot run (no {FEWSHOT_FILE})", Path(folder))
    try:
        info = json.loads(path.read_text())
        kind = info.get("kind") if isinstance(info, dict) else None
        if kind != "few-shot":
            raise ValueError(f"kind {kind!r}, not 'few-shot'")
    except ValueError as exc:
        raise DataError(f"damaged few-shot run description ({exc})", path) from None
    return info


def fewshot_run_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """What ``fewshot.json`` of a run folder says (trained on, scores, threshold), or None if it has none.

    A plain JSON reader: the recipe itself is :func:`strokekit.fewshot.load_fitted`'s to rebuild."""
    try:
        return _fewshot_info(folder)
    except DataError:
        return None
