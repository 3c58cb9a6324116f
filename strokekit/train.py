"""Training on a config: one call, one run folder with everything needed to trust or redo it.

A run folder (:class:`strokekit.runs.RunFolder`, kind ``"binary"``) holds ``config.json``,
``split.json`` (when a split was given), ``history.csv``, ``model.keras`` (best epoch by validation
loss), ``previews/epoch_NNN.png`` (predicted masks on a few fixed validation slices, so students
watch the mask form), and ``metrics.json``.

Introduced in notebooks/04_unet_vs_resunet.ipynb.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import engine
from .augment import NO_AUGMENT, STRONG_AUGMENT, AugmentConfig  # noqa: F401  (STRONG_AUGMENT: known here too)

# The slice configs live in strokekit.config; strokekit.train.TrainConfig is the name notebooks use.
from .config import FitSettings, TrainConfig, seed_everything  # noqa: F401
from .dataset import SliceDataset

# The engine's helpers, under the names notebooks 04-06, 09 and the CLI import from here.
from .engine import (  # noqa: F401
    LR_SCHEDULES,
    build_optimizer,
    cosine_learning_rate,
    load_model,
    predict_numpy,
    preview_indices,
    save_preview,
)
from .errors import DataError
from .paths import runs_dir
from .runs import RunFolder, data_text


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from ``config.json`` (nested augment settings included; its ``kind`` is skipped)."""
    data = dict(data)
    data.pop("kind", None)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"TrainConfig has no field(s) {unknown}")
    if isinstance(data.get("augment"), dict):
        data["augment"] = AugmentConfig(**data["augment"])
    elif data.get("augment") is None and "augment" in data:
        data["augment"] = NO_AUGMENT
    for key in ("filters", "windows"):
        if key in data:
            data[key] = tuple(data[key])
    return TrainConfig(**data)


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns."""

    model: Any
    history: Any  # pandas DataFrame, one row per epoch
    metrics: dict[str, float]
    run_dir: Path | None
    config: TrainConfig
    seconds: float
    images_per_second: float


def make_run_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """A new, unique run folder ``<runs>/<name>-<timestamp>`` (never reuses an existing one)."""
    root = Path(root) if root else runs_dir()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for k in range(1000):
        folder = root / (f"{name}-{stamp}" + (f"-{k}" if k else ""))
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {root}")


def to_arrays(config: TrainConfig, dataset: SliceDataset) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, S, S, channels) in [0, 1] and integer masks (N, S, S) for a config."""
    from .preprocess import prepare_inputs

    if dataset.images.ndim == 4:  # already multi-channel (e.g. perfusion maps)
        from .preprocess import resize_dataset

        data = resize_dataset(dataset, config.image_size)
        return data.images.astype(np.float32), data.masks.copy()
    return prepare_inputs(dataset, image_size=config.image_size, windows=config.windows)


def loss_and_metrics(config: TrainConfig) -> tuple[Any, list]:
    """The config's loss and its lesion-class metrics (never pixel accuracy): Dice, IoU,
    sensitivity and specificity of a binary model, Dice per lesion class of a softmax one."""
    import inspect

    from .losses import LOSSES, DiceMetric, IoUMetric, Sensitivity, Specificity, get_loss

    wants_classes = "num_classes" in inspect.signature(LOSSES.get(config.loss, get_loss)).parameters
    loss = get_loss(
        config.loss, **({"num_classes": config.num_classes} if config.num_classes > 1 and wants_classes else {})
    )
    if config.num_classes == 1:
        metrics = [
            DiceMetric(threshold=config.threshold, name="dice"),
            IoUMetric(threshold=config.threshold, name="iou"),
            Sensitivity(threshold=config.threshold, name="sensitivity"),
            Specificity(threshold=config.threshold, name="specificity"),
        ]
    else:
        metrics = [DiceMetric(class_id=c, name=f"dice_{c}") for c in range(1, config.num_classes)]
    return loss, metrics


def compile_model(model, config: TrainConfig, learning_rate: float | None = None):
    """Compile with Adam, the config's loss and lesion-class metrics (:func:`strokekit.engine.compile_model`)."""
    return engine.compile_model(model, *loss_and_metrics(config), learning_rate or config.learning_rate)


def repeat_arrays(x: np.ndarray, y: np.ndarray, repeats: int) -> tuple[np.ndarray, np.ndarray]:
    """``repeats`` copies of the training arrays for one epoch; the loader draws each copy's
    augmentation from its own sample index, so no two copies are augmented alike."""
    if repeats <= 1:
        return x, y
    return np.tile(x, (repeats,) + (1,) * (x.ndim - 1)), np.tile(y, (repeats,) + (1,) * (y.ndim - 1))


def evaluate_arrays(
    model, x: np.ndarray, y: np.ndarray, threshold: float = 0.5, batch_size: int = 32
) -> dict[str, float]:
    """Pooled Dice, IoU, sensitivity, specificity, precision of a binary model on arrays.

    Uses :mod:`strokekit.metrics` (probability >= threshold is lesion; its empty-case rules).
    """
    from .metrics import confusion, metrics_from_counts

    prob = predict_numpy(model, x, batch_size)[..., 0]
    return metrics_from_counts(*confusion(y > 0, prob >= threshold))


def train(
    config: TrainConfig,
    train_data: SliceDataset,
    val_data: SliceDataset,
    run_dir: str | os.PathLike | None | bool = None,
    split: Any = None,
    name: str | None = None,
    model: Any = None,
    progress: bool = True,
    previews: bool = True,
    overwrite: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    checkpoint_every: int = 1,
) -> RunResult:
    """Train a segmentation model on a config and write its run folder.

    Args:
        config: the TrainConfig.
        train_data: training slices.
        val_data: validation slices (best epoch, early stopping, learning-rate schedule).
        run_dir: the run folder; None creates ``<runs>/<name>-<timestamp>``; False writes nothing.
        split: a ``strokekit.split.Split`` (anything with ``save(path)``) saved as ``split.json``.
        name: run name prefix (default ``<arch>-<activation>-s<seed>``).
        model: a pre-built (e.g. pretrained) model to train instead of building one from the config.
        progress: show a progress bar over epochs.
        previews: save per-epoch prediction previews in the run folder.
        overwrite: replace a run already in ``run_dir`` (see :meth:`strokekit.runs.RunFolder.create`).
        resume: continue the interrupted run in ``run_dir`` from the end of its last epoch, with its
            optimizer state, history, best weights and schedule as they were; the result is that of
            an uninterrupted run (:func:`strokekit.engine.fit`).
        callbacks: more Keras callbacks.
        checkpoint_every: epochs between the checkpoints that ``resume`` continues from
            (see :func:`strokekit.engine.fit`).

    Returns:
        RunResult with the model (weights of the epoch with the lowest validation loss),
        history, final validation metrics, run folder, timing.

    Raises:
        DataError: empty training or validation data.
        FileExistsError: ``run_dir`` already holds a run and neither ``overwrite`` nor ``resume`` is set.
        ValueError: ``resume`` without a ``run_dir``.
    """
    from .models import build_model

    return fit_run(
        config, train_data, val_data, model, run_dir, "binary",
        name=name or f"{config.arch}-{config.activation}-s{config.seed}",
        build=lambda: build_model(config.arch, **config.model_kwargs()), desc=name or config.arch, split=split,
        overwrite=overwrite, resume=resume, progress=progress, previews=previews, preview_threshold=config.threshold,
        callbacks=callbacks, checkpoint_every=checkpoint_every)


def fit_run(
    config: Any,
    train_data: SliceDataset,
    val_data: SliceDataset,
    model: Any,
    run_dir: str | os.PathLike | None | bool,
    kind: str,
    *,
    name: str,
    build: Callable[[], Any] | None = None,
    arrays: Callable[[Any, SliceDataset], tuple[np.ndarray, np.ndarray]] = to_arrays,
    loss_metrics: tuple[Any, list] | None = None,
    phases: Sequence[engine.Phase] | None = None,
    score: Callable[[Any, np.ndarray, np.ndarray], dict[str, float]] | None = None,
    split: Any = None,
    run_files: dict[str, Any] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    previews: bool = True,
    preview_threshold: float = 0.5,
    repeats: int | None = None,
    loader: type | None = None,
    val_batch_size: int | None = None,
    **fit_options: Any,
) -> RunResult:
    """The one way a slice model is trained on a config: what :func:`train`,
    :func:`strokekit.multiclass.train_multiclass` and :func:`strokekit.transfer.fine_tune` share.

    Checks the data, seeds (``config.seed``), turns both sets into arrays, creates (or reopens) the
    run folder, builds the training loader (``config.repeats`` passes, the config's augmentation)
    and the validation loader, trains through :func:`strokekit.engine.fit` and writes
    ``metrics.json``.

    Args:
        config: the run's config (a :class:`TrainConfig` or one with the same training fields:
            ``seed``, ``batch_size``, ``augment``, ``num_classes``, ``workers``, ``num_epochs``,
            ``learning_rate``, ``early_stopping_patience``, ``reduce_lr_patience``, ``lr_schedule``,
            ``preview_slices``, ``repeats``); saved as ``config.json``.
        train_data, val_data: training and validation slices.
        model: the model to train, or None to call ``build`` (after seeding, so that its weights
            follow ``config.seed``).
        run_dir: the run folder; None creates ``<runs>/<name>-<timestamp>``; False writes nothing.
        kind: the run folder's kind (:data:`strokekit.runs.KINDS`).
        name: the new run folder's name prefix.
        build: makes the model when ``model`` is None.
        arrays: ``(config, dataset) -> (inputs, labels)`` (default :func:`to_arrays`).
        loss_metrics: the loss and metrics (default :func:`loss_and_metrics` of the config).
        phases: the engine phases (default one phase of ``config.num_epochs`` at ``config.learning_rate``).
        score: ``(model, x_val, y_val) -> metrics`` after training (default :func:`evaluate_arrays`
            for a binary model, the lowest validation loss for a softmax one).
        split: saved as ``split.json``.
        run_files: more JSON files for the run folder (file name -> object), written before training.
        overwrite, resume: as in :func:`train`.
        previews: draw ``config.preview_slices`` validation slices after every epoch (at
            ``preview_threshold``).
        repeats: passes over the training slices per epoch; None takes ``config.repeats``.
        loader: the training loader's class (default :class:`strokekit.augment.SegmentationLoader`).
        val_batch_size: the validation loader's batch size (default ``config.batch_size``).
        **fit_options: more :func:`strokekit.engine.fit` arguments (``desc``, ``progress``,
            ``callbacks``, ``pool``...); they override the config's ``patience``,
            ``reduce_lr_patience`` and ``schedule``.

    Returns:
        :class:`RunResult`; its metrics gain ``best_epoch`` and ``epochs_run``.
    """
    from .augment import SegmentationLoader

    check_run_inputs(train_data, val_data, run_dir, resume)
    seed_everything(config.seed)
    x_train, y_train = arrays(config, train_data)
    x_val, y_val = arrays(config, val_data)
    if model is None:
        model = build()

    run = None
    if run_dir is not False:  # created before training, so a folder that holds a run stops it at once
        run = RunFolder.create(run_dir if run_dir is not None else make_run_dir(name), kind, config,
                               overwrite=overwrite, resume=resume, split=split)
        for file_name, value in (run_files or {}).items():
            run.write_json(file_name, value)

    x_train, y_train = repeat_arrays(x_train, y_train, config.repeats if repeats is None else repeats)
    train_loader = (loader or SegmentationLoader)(
        x_train, y_train, batch_size=config.batch_size, augment=config.augment, shuffle=True,
        seed=config.seed, num_classes=config.num_classes, workers=config.workers,
    )
    val_loader = SegmentationLoader(
        x_val, y_val, batch_size=val_batch_size or config.batch_size, augment=None, shuffle=False,
        seed=config.seed, num_classes=config.num_classes, workers=1,
    )
    chosen = preview_indices(y_val, config.preview_slices) if previews and config.preview_slices else None
    options = dict(patience=config.early_stopping_patience, schedule=config.lr_schedule,
                   reduce_lr_patience=config.reduce_lr_patience, run=run, resume=resume,
                   previews=None if chosen is None else engine.Previews(x_val[chosen], y_val[chosen],
                                                                        preview_threshold))
    fitted = engine.fit(
        model, train_loader, val_loader,
        phases or [engine.Phase(config.num_epochs, learning_rate=config.learning_rate)],
        *(loss_metrics or loss_and_metrics(config)), **{**options, **fit_options})

    if score is not None:
        metrics = score(model, x_val, y_val)
    elif config.num_classes == 1:
        metrics = evaluate_arrays(model, x_val, y_val, config.threshold)
    else:
        metrics = {"val_loss": float(fitted.history["val_loss"].min())}
    history, seconds = fitted.history, fitted.seconds
    metrics = {**metrics, "best_epoch": fitted.best_epoch, "epochs_run": len(history)}
    images_per_second = len(x_train) * len(history) / seconds if seconds else float("nan")
    if run is not None:
        run.write_metrics({**metrics, "seconds": round(seconds, 2), "images_per_second": round(images_per_second, 2)},
                          data=data_text(val_data))
    return RunResult(fitted.model, history, metrics, run.folder if run else None, config, seconds, images_per_second)


def check_run_inputs(train_data: SliceDataset, val_data: SliceDataset, run_dir: Any = None,
                     resume: bool = False) -> None:
    """What every trainer checks first: both sets hold slices, and ``resume`` names the run folder.

    Raises:
        DataError: empty training or validation data.
        ValueError: ``resume`` without a ``run_dir`` (None or False).
    """
    if len(train_data) == 0 or len(val_data) == 0:
        raise DataError("training and validation sets must not be empty")
    if resume and (run_dir is None or run_dir is False):
        raise ValueError("resume=True continues the run in run_dir: name the folder")


def load_run(folder: str | os.PathLike) -> dict[str, Any]:
    """Read a slice model's run folder (:meth:`strokekit.runs.RunFolder.open`) as a dict: folder,
    config (TrainConfig), history (DataFrame or None), metrics ({} when none), model path and
    split path (None when absent)."""
    run = RunFolder.open(folder)
    return {"folder": run.folder, "config": config_from_dict(run.config), "history": run.history,
            "metrics": run.metrics or {}, "model_path": run.model_path if run.model_path.is_file() else None,
            "split_path": run.split_path}


def train_grid(
    base: TrainConfig,
    variants: Sequence[dict[str, Any]],
    seeds: Sequence[int],
    train_data: SliceDataset,
    val_data: SliceDataset,
    root: str | os.PathLike | None = None,
    split: Any = None,
    progress: bool = True,
):
    """Train every variant (a dict of config changes) for every seed; one tidy row per run.

    Returns:
        pandas DataFrame: the variant's fields, seed, validation metrics, epochs, seconds, run folder.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    rows = []
    jobs = [(v, s) for v in variants for s in seeds]
    for changes, seed in tqdm(jobs, desc="grid", disable=not progress):
        config = dataclasses.replace(base, seed=seed, **changes)
        label = "-".join(str(v) for v in changes.values()) or "base"
        run_dir = make_run_dir(f"{label}-s{seed}", root) if root is not None else None
        result = train(config, train_data, val_data, run_dir=run_dir, split=split,
                       name=f"{label}-s{seed}", progress=False, previews=False)
        rows.append({**changes, "seed": seed, **result.metrics, "seconds": round(result.seconds, 1),
                     "run_dir": str(result.run_dir) if result.run_dir else ""})
    return pd.DataFrame(rows)


def summarize(table, by: Sequence[str], metrics: Sequence[str] = ("dice", "iou", "sensitivity", "specificity")):
    """Mean ± sd over seeds per configuration (never the best of N)."""
    grouped = table.groupby(list(by), sort=False)[list(metrics)]
    mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.size()
    out = mean.copy()
    for m in metrics:
        out[m] = [f"{a:.3f} ± {b:.3f}" for a, b in zip(mean[m], sd[m].fillna(0.0))]
    out["seeds"] = n
    return out.reset_index()
