"""Multiclass segmentation: background / hemorrhagic / ischemic with a softmax U-Net.

The configuration is one frozen dataclass (:class:`MulticlassConfig`) whose fields map to
:func:`strokekit.models.unet` (base filters, levels, kernel size, dilation, dropout) and to the
training loop (learning rate, early stopping, learning-rate reducer, class weights of the
categorical cross-entropy + Dice loss). :func:`train_multiclass` writes the same run folder as
:func:`strokekit.train.train` (config, history, best model, per-epoch previews, metrics) plus a
plot of the curves; :func:`predict_folder` writes colour-coded predictions (red = hemorrhagic,
green = ischemic) for a folder of images into a new folder.

Introduced in notebooks/07_multiclass.ipynb.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .augment import NO_AUGMENT, AugmentConfig
from .config import FitSettings, TrainConfig, from_dict
from .dataset import SliceDataset
from .errors import DataError
from .io import MULTICLASS_CLASS_NAMES
from .phantom import field_checker, tuple_fields

#: Class names of the multiclass phantom and of the study's colour masks.
CLASS_NAMES: tuple[str, ...] = MULTICLASS_CLASS_NAMES
#: Suffix of the predicted masks written by :func:`predict_folder`.
PRED_SUFFIX = "_pred"
_SKIP_SUFFIXES = ("_mask", "_result", PRED_SUFFIX)


@dataclasses.dataclass(frozen=True)
class MulticlassConfig(FitSettings):
    """Everything that decides a multiclass run. Variants by ``dataclasses.replace``.

    Attributes:
        base_filters: filters of the first level; each deeper level doubles them.
        num_levels: poolings (the U-Net has ``num_levels + 1`` widths, the last the bottleneck).
        kernel_size: side of the convolution kernels.
        dilation_rate: dilation of the convolutions (1: none; 2 widens the receptive field).
        class_weights: one weight per class for the cross-entropy and the Dice average (None:
            all 1); see :func:`class_weights`.
        w_ce: weight of the cross-entropy term.
        w_dice: weight of the multiclass Dice term.
        class_names: name of each label; their number is the number of classes.
        The others (activation, batch norm, learning rate, epochs, image size, windows,
        augmentation, early stopping, schedule, seed, ...): as in :class:`strokekit.config.FitSettings`;
        ``head_bias`` is the starting logit of each lesion class (background 0).
    """

    base_filters: int = 16
    num_levels: int = 3
    kernel_size: int = 3
    dilation_rate: int = 1
    class_weights: tuple[float, ...] | None = None
    w_ce: float = 1.0
    w_dice: float = 1.0
    class_names: tuple[str, ...] = CLASS_NAMES

    def __post_init__(self) -> None:
        tuple_fields(self, ("windows", "class_names"))
        if self.augment is None:
            object.__setattr__(self, "augment", NO_AUGMENT)
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", AugmentConfig(**self.augment))
        super().__post_init__()
        need = field_checker(self)

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        need(is_int(self.base_filters) and self.base_filters >= 1, "base_filters", "an int >= 1")
        need(is_int(self.num_levels) and 1 <= self.num_levels <= 6, "num_levels", "an int in 1..6")
        need(is_int(self.kernel_size) and self.kernel_size >= 1, "kernel_size", "an int >= 1")
        need(is_int(self.dilation_rate) and self.dilation_rate >= 1, "dilation_rate", "an int >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        need(self.learning_rate > 0, "learning_rate", "> 0")
        need(is_int(self.num_epochs) and self.num_epochs >= 1, "num_epochs", "an int >= 1")
        need(is_int(self.image_size) and self.image_size % 2**self.num_levels == 0, "image_size",
             f"a multiple of 2 ** num_levels = {2 ** self.num_levels}")
        need(len(self.class_names) >= 2, "class_names", "at least two names (background first)")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            object.__setattr__(self, "class_weights", weights)
            need(len(weights) == len(self.class_names) and min(weights) >= 0, "class_weights",
                 f"{len(self.class_names)} non-negative numbers, one per class {list(self.class_names)}")

    @property
    def num_classes(self) -> int:
        """Number of labels including background."""
        return len(self.class_names)

    @property
    def filters(self) -> tuple[int, ...]:
        """U-Net widths: ``base_filters * 2**k`` for ``k = 0..num_levels``."""
        return tuple(self.base_filters * 2**k for k in range(self.num_levels + 1))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`strokekit.models.unet`."""
        return dict(input_shape=(self.image_size, self.image_size, len(self.windows)),
                    num_classes=self.num_classes, filters=self.filters, activation=self.activation,
                    dropout=self.dropout, batch_norm=self.batch_norm, kernel_size=self.kernel_size,
                    dilation_rate=self.dilation_rate, bn_momentum=self.bn_momentum, head_bias=self.head_bias)

    def train_config(self):
        """The equivalent :class:`strokekit.config.TrainConfig`: the fields both have, a U-Net of
        :attr:`filters` and its softmax loss (without kernel size, dilation and class weights, which
        it does not hold)."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(self)}
        return TrainConfig(arch="unet", filters=self.filters, loss="categorical_ce_dice", num_classes=self.num_classes,
                           **{name: getattr(self, name) for name in shared})


def config_from_dict(data: Mapping[str, Any]) -> MulticlassConfig:
    """Rebuild a :class:`MulticlassConfig` from its ``config.json`` (lists become tuples; its ``kind`` is skipped)."""
    return from_dict(MulticlassConfig, {k: v for k, v in data.items() if k != "kind"})


def class_weights(masks: np.ndarray, num_classes: int, power: float = 0.5,
                  max_weight: float = 50.0) -> tuple[float, ...]:
    """Class weights from pixel frequencies: ``(f_background / f_c) ** power``, background 1.

    ``power = 1`` is inverse frequency (a lesion at 0.5 % of the pixels weighs 200, which makes
    training unstable); the default square root is milder. Absent classes get ``max_weight``.

    Introduced in notebooks/07_multiclass.ipynb.

    Args:
        masks: integer labels of the training set.
        num_classes: number of labels including background.
        power: how strongly rare classes are favoured (0: all weights 1).
        max_weight: upper bound of any weight.

    Returns:
        A tuple of ``num_classes`` weights.
    """
    masks = np.asarray(masks)
    if masks.size == 0:
        raise ValueError("masks is empty")
    if masks.min() < 0 or masks.max() >= num_classes:
        raise ValueError(f"mask labels {int(masks.min())}..{int(masks.max())} outside 0..{num_classes - 1}")
    if power < 0 or max_weight < 1:
        raise ValueError(f"power must be >= 0 and max_weight >= 1; got {power!r}, {max_weight!r}")
    counts = np.bincount(masks.ravel().astype(np.int64), minlength=num_classes).astype(np.float64)
    ref = counts[0] if counts[0] > 0 else counts.max()
    weights = np.where(counts > 0, (ref / np.maximum(counts, 1.0)) ** power, max_weight)
    weights = np.clip(weights, 0.0, max_weight)
    weights[0] = 1.0
    return tuple(float(round(w, 4)) for w in weights)


def build_model(config: MulticlassConfig, seed: int | None = None):
    """The softmax U-Net of a config (:func:`strokekit.models.unet`)."""
    from .models import unet

    return unet(**config.model_kwargs(), seed=config.seed if seed is None else seed)


def loss_and_metrics(config: MulticlassConfig) -> tuple[Any, list]:
    """Cross-entropy + multiclass Dice (class-weighted) and the Dice of each lesion class."""
    from .losses import DiceMetric, categorical_ce_dice_loss

    loss = categorical_ce_dice_loss(config.num_classes, class_weights=config.class_weights,
                                    w_ce=config.w_ce, w_dice=config.w_dice)
    return loss, [DiceMetric(class_id=c, name=f"dice_{config.class_names[c]}") for c in range(1, config.num_classes)]


def to_arrays(config: MulticlassConfig, dataset: SliceDataset) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (N, S, S, windows) in [0, 1] and labels (N, S, S) for a config."""
    from .train import to_arrays as _to_arrays

    if dataset.num_classes != config.num_classes:
        raise DataError(f"the dataset has {dataset.num_classes} classes {dataset.class_names}; the config "
                        f"expects {config.num_classes} {config.class_names}")
    return _to_arrays(config.train_config(), dataset)


def predict_labels(model, config: MulticlassConfig, dataset_or_images, batch_size: int | None = None) -> np.ndarray:
    """Arg-max labels (N, S, S) uint8 of a softmax model on a dataset (or ready inputs).

    Eager batches (:func:`strokekit.engine.predict_numpy`), not ``model.predict``: that traces a
    new function for every model, and a loop over runs (notebook 07) made TensorFlow warn about retracing.
    """
    from .engine import predict_numpy

    x = dataset_or_images
    if isinstance(x, SliceDataset):
        x, _ = to_arrays(config, x)
    prob = predict_numpy(model, np.asarray(x, np.float32), batch_size or config.batch_size)
    return np.argmax(prob, axis=-1).astype(np.uint8)


def evaluate(model, config: MulticlassConfig, dataset: SliceDataset):
    """Per-class metrics on a dataset, background excluded, plus lesion-wise detection F1.

    Introduced in notebooks/07_multiclass.ipynb.

    Returns:
        pandas DataFrame, one row per lesion class: the columns of
        :func:`strokekit.metrics.per_class_metrics` (pooled over all pixels) and ``lesion_f1``
        (connected components per slice, :func:`strokekit.metrics.lesion_detection`).
    """
    from .metrics import lesion_detection, per_class_metrics

    x, y = to_arrays(config, dataset)
    pred = predict_labels(model, config, x)
    table = per_class_metrics(y, pred, config.num_classes, config.class_names)
    table["lesion_f1"] = [
        lesion_detection(y == k, pred == k, per_slice=True)["lesion_f1"] for k in table["label"]
    ]
    return table


def plot_history(history, class_names: Sequence[str] = CLASS_NAMES):
    """Training and validation loss and per-class Dice against the epoch.

    Args:
        history: DataFrame with ``epoch``, ``loss``, ``val_loss`` and ``dice_<class>`` /
            ``val_dice_<class>`` columns (from :func:`train_multiclass` or its ``history.csv``).
        class_names: class names (background first; it is not plotted).

    Returns:
        matplotlib Figure.
    """
    from matplotlib.figure import Figure

    # Runs written before strokekit.engine counted epochs from 0 in history.csv: plot them from 1.
    epochs = np.arange(1, len(history) + 1)
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, history["loss"], marker="o", label="train")
    if "val_loss" in history:
        ax_loss.plot(epochs, history["val_loss"], marker="o", label="validation")
    ax_loss.set(title="loss (cross-entropy + Dice)", xlabel="epoch")
    ax_loss.legend()
    colours = {"hemorrhagic": "tab:red", "ischemic": "tab:green"}
    for name in class_names[1:]:
        colour = colours.get(name)
        if f"dice_{name}" in history:
            ax_dice.plot(epochs, history[f"dice_{name}"], ls="--", marker=".", color=colour,
                         label=f"{name} (train)")
        if f"val_dice_{name}" in history:
            ax_dice.plot(epochs, history[f"val_dice_{name}"], marker="o", color=colour,
                         label=f"{name} (validation)")
    ax_dice.set(title="Dice per class", xlabel="epoch", ylim=(0, 1))
    ax_dice.legend(fontsize=8)
    return fig


def train_multiclass(
    config: MulticlassConfig,
    train_data: SliceDataset,
    val_data: SliceDataset,
    run_dir: str | os.PathLike | None | bool = None,
    name: str | None = None,
    progress: bool = True,
    previews: bool = True,
    overwrite: bool = False,
    resume: bool = False,
):
    """Train a softmax U-Net on a :class:`MulticlassConfig` and write its run folder.

    Like :func:`strokekit.train.train` (same loader, :func:`strokekit.engine.fit` and folder: a
    :class:`strokekit.runs.RunFolder` of kind ``"multiclass"`` with ``config.json``,
    ``history.csv``, ``model.keras`` at the best validation loss, ``previews/epoch_NNN.png``,
    ``metrics.json``) plus ``curves.png``; the loss carries the config's class weights.

    Introduced in notebooks/07_multiclass.ipynb.

    Args:
        config: the settings.
        train_data: training slices with ``config.num_classes`` labels.
        val_data: validation slices (checkpoint, early stopping, learning-rate reducer).
        run_dir: the run folder; None creates ``<runs>/<name>-<timestamp>``; False writes nothing.
        name: run name prefix.
        progress: a progress bar over epochs.
        previews: save per-epoch previews.
        overwrite: replace a run already in ``run_dir``.
        resume: continue the interrupted run in ``run_dir`` (as :func:`strokekit.train.train`).

    Returns:
        :class:`strokekit.train.RunResult`: the model with the weights of the epoch with the lowest
        validation loss; ``metrics`` hold ``dice_<class>`` and ``iou_<class>`` of that model on the
        validation set (background excluded), ``mean_dice``, ``best_epoch``, ``epochs_run``.

    Raises:
        DataError: empty training or validation data.
        FileExistsError: ``run_dir`` already holds a run and neither ``overwrite`` nor ``resume`` is set.
        ValueError: ``resume`` without a ``run_dir``.
    """
    from .metrics import per_class_metrics
    from .train import fit_run

    def score(model, x_val, y_val) -> dict[str, float]:
        table = per_class_metrics(y_val, predict_labels(model, config, x_val), config.num_classes, config.class_names)
        metrics: dict[str, float] = {}
        for row in table.itertuples():
            metrics[f"dice_{row.class_name}"] = float(row.dice)
            metrics[f"iou_{row.class_name}"] = float(row.iou)
        return {**metrics, "mean_dice": float(table["dice"].mean())}

    result = fit_run(config, train_data, val_data, None, run_dir, "multiclass",
                     name=name or f"multiclass-s{config.seed}", build=lambda: build_model(config), arrays=to_arrays,
                     loss_metrics=loss_and_metrics(config), score=score, overwrite=overwrite, resume=resume,
                     previews=previews, progress=progress, desc=name or "multiclass")
    if result.run_dir is not None:
        plot_history(result.history, config.class_names).savefig(result.run_dir / "curves.png", dpi=80)
    return result


def predict_folder(
    model,
    config: MulticlassConfig,
    in_folder: str | os.PathLike,
    out_folder: str | os.PathLike,
    colour_map: Mapping[tuple[int, int, int], int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Segment every image of a folder and write colour-coded masks ``<case>_pred.png`` to a NEW folder.

    Images are the grey files of ``in_folder`` (8-bit display images, as in the study's layout);
    ``*_mask``, ``*_result`` and ``*_pred`` files are skipped. Each image is scaled to [0, 1],
    resized to the model's input, segmented (arg-max), resized back with nearest neighbours and
    written in colour (default :data:`strokekit.io.MULTICLASS_COLOURS`: red = hemorrhagic,
    green = ischemic). Nothing is ever written into ``in_folder``.

    Introduced in notebooks/07_multiclass.ipynb.

    Args:
        model: a softmax model with ``config.num_classes`` outputs.
        config: its config (image size, windows).
        in_folder: folder with the images (read only).
        out_folder: folder for the predictions; created if missing; must not be ``in_folder``
            or inside it, and must be empty unless ``overwrite``.
        colour_map: (R, G, B) → label.
        overwrite: allow a non-empty ``out_folder`` (same-named files are replaced).
        progress: a progress bar.

    Returns:
        pandas DataFrame, one row per image: ``case_id``, ``image``, ``prediction`` (paths) and
        the predicted pixels of each lesion class (``<class>_pixels``).

    Raises:
        DataError: a missing input folder, no images in it, an output folder that is the input
            folder (or inside it) or not empty, unreadable images.
    """
    import pandas as pd
    from PIL import Image
    from tqdm.auto import tqdm

    from .io import IMAGE_SUFFIXES, MULTICLASS_COLOURS, _visible_files, encode_colour_mask, read_image
    from .preprocess import resize_image, resize_mask, to_unit_range

    src = Path(in_folder)
    if not src.is_dir():
        raise DataError("input folder does not exist or is not a folder", src)
    dst = Path(out_folder)
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or src_r in dst_r.parents:
        raise DataError(
            f"refusing to write predictions into the input folder {src} (or a folder inside "
            "it); choose a new folder", dst)
    if dst.exists() and not dst.is_dir():
        raise DataError("exists and is not a folder", dst)
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DataError("output folder is not empty; choose a new folder or pass overwrite=True", dst)
    files = [p for p in _visible_files(src)
             if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(_SKIP_SUFFIXES)]
    if not files:
        raise DataError("no images to segment (png/jpg/tif/bmp/npy, not *_mask/*_result)", src)
    colour_map = MULTICLASS_COLOURS if colour_map is None else colour_map
    dst.mkdir(parents=True, exist_ok=True)
    rows = []
    chunk = max(1, config.batch_size)
    for start in tqdm(range(0, len(files), chunk), desc="predicting", disable=not progress):
        batch = files[start: start + chunk]
        originals = [read_image(p) for p in batch]
        x = []
        for image in originals:
            unit = resize_image(to_unit_range(image, "display"), config.image_size)
            x.append(np.repeat(unit[..., None], len(config.windows), axis=-1))
        labels = predict_labels(model, config, np.stack(x))
        for path, image, lab in zip(batch, originals, labels):
            full = resize_mask(lab, image.shape)
            out = dst / f"{path.stem}{PRED_SUFFIX}.png"
            Image.fromarray(encode_colour_mask(full, colour_map)).save(out)
            row = {"case_id": path.stem, "image": str(path), "prediction": str(out)}
            for k, cname in enumerate(config.class_names[1:], start=1):
                row[f"{cname}_pixels"] = int((full == k).sum())
            rows.append(row)
    return pd.DataFrame(rows)
