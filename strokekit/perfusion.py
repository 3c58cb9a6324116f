"""CT perfusion (CTP): infarct core and penumbra with multi-input models.

A CT perfusion study follows a contrast bolus through the brain and summarises each pixel's
time-density curve in parametric maps:

* **CBF**, cerebral blood flow (mL/100 g/min): grey matter ~60, white matter ~25.
* **CBV**, cerebral blood volume (mL/100 g): grey ~4, white ~2.
* **Tmax**, time to the maximum of the deconvolved residue function (s): 0–2 s in healthy tissue;
  above 6 s marks critically hypoperfused tissue.
* **TTP**, time to peak of the raw curve (s): bolus arrival + delay + about half the mean transit
  time.
* **MIP**, the maximum-intensity projection over time: an angiogram-like image with bright vessels.

Behind an arterial occlusion the tissue splits into an infarct **core** (already dead: CBF below
30 % of normal *and* CBV reduced, because autoregulation has failed) and a **penumbra** (at risk but
salvageable: Tmax > 6 s with CBV preserved or raised, as the vessels dilate to keep volume). The
core lies strictly inside the hypoperfused region. This is the rule commercial software
(RAPID-like: rCBF < 30 %, Tmax > 6 s) applies to decide on thrombectomy.

The maps, 4-class masks (0 background, 1 brain, 2 penumbra, 3 core), occlusion groups and NIHSS
scores come from :mod:`strokekit.ctp_phantom` (:func:`strokekit.ctp_phantom.synthesize_perfusion`).
This module is the study: inspecting the maps, the classical threshold rule, and the model side
(:class:`MultiInputLoader`, a class-weighted focal Tversky loss, frozen / unfrozen / gradual
fine-tuning, per-group F1 tables) of the notebook that segments core and penumbra with a
multi-input U-Net.

Introduced in notebooks/08_ctp_core_penumbra.ipynb.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import engine
from .ctp_phantom import (
    BRAIN,
    CLASS_NAMES,
    CORE,
    MAP_NAMES,
    MAP_RANGES,
    MAP_UNITS,
    NIHSS_MAX,
    OCCLUSION_GROUPS,
    PENUMBRA,
    to_physical,
)
from .dataset import SliceDataset
from .errors import DataError

#: Fine-tuning schedules of :func:`train_perfusion`.
SCHEDULES: tuple[str, ...] = ("scratch", "frozen", "unfrozen", "gradual")


# ============================================================================ inspection
def map_statistics(dataset: SliceDataset):
    """Mean physical value of every map in each region: normal brain, penumbra, core.

    ``normal`` is all brain outside the hypoperfused region (both hemispheres). Useful to check
    the synthesis against the textbook rules (core CBF < 30 % of normal, penumbra Tmax > 6 s, ...).

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        dataset: from :func:`strokekit.ctp_phantom.synthesize_perfusion`.

    Returns:
        pandas DataFrame indexed by region (``normal``, ``penumbra``, ``core``) with one column
        per map and ``pixels``.
    """
    import pandas as pd

    phys = to_physical(dataset.images)
    rows = {}
    for name, label in (("normal", BRAIN), ("penumbra", PENUMBRA), ("core", CORE)):
        region = dataset.masks == label
        row = {m: float(phys[m][region].mean()) if region.any() else float("nan") for m in MAP_NAMES}
        row["pixels"] = int(region.sum())
        rows[name] = row
    return pd.DataFrame(rows).T[[*MAP_NAMES, "pixels"]]


def patient_table(dataset: SliceDataset):
    """One row per patient (indexed by patient id): occlusion group, territory, core and
    penumbra volumes (mL), NIHSS. Introduced in notebooks/08_ctp_core_penumbra.ipynb."""
    frame = dataset.to_frame()
    cols = ["occlusion", "territory", "core_ml", "penumbra_ml", "nihss"]
    return frame.groupby("patient_id", sort=False)[cols].first()


def plot_maps(dataset: SliceDataset, index: int, cmap: str = "turbo"):
    """The five maps of one slice in physical units, and its core/penumbra mask.

    Args:
        dataset: from :func:`strokekit.ctp_phantom.synthesize_perfusion`.
        index: slice position.
        cmap: colour map of the perfusion maps (the MIP is grey).

    Returns:
        matplotlib Figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not -len(dataset) <= index < len(dataset):
        raise IndexError(f"index {index} out of range for {len(dataset)} slices")
    phys = to_physical(dataset.images[index])
    fig = Figure(figsize=(15, 3.2), layout="constrained")
    axes = fig.subplots(1, len(MAP_NAMES) + 1)
    for ax, name in zip(axes, MAP_NAMES):
        lo, hi = MAP_RANGES[name]
        if name == "tmax":
            lo, hi = 0.0, 14.0
        im = ax.imshow(phys[name], cmap="gray" if name == "mip" else cmap, vmin=lo, vmax=hi)
        ax.set_title(f"{name.upper()} ({MAP_UNITS[name]})", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, shrink=0.8)
    colours = ListedColormap(["black", "#555555", "#f2c94c", "#d62728"])
    axes[-1].imshow(dataset.masks[index], cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    axes[-1].set_title("mask: brain / penumbra / core", fontsize=9)
    axes[-1].set_axis_off()
    extra = dataset.extra
    title = dataset.case_ids[index]
    if "occlusion" in extra:
        title += (f" · {extra['occlusion'][index]} ({extra['territory'][index]}) · "
                  f"NIHSS {extra['nihss'][index]:.0f}")
    fig.suptitle(title, fontsize=10)
    return fig


def threshold_segmentation(dataset: SliceDataset, core_cbf: float = 0.3, tmax: float = 6.0,
                           core_cbv: float = 1.0) -> np.ndarray:
    """The classical rule on the (noisy) maps: core = rCBF < 30 % and CBV reduced, penumbra = Tmax > 6 s.

    Relative CBF and CBV are taken against the median of the brain pixels with Tmax <= 6 s of
    the same slice (a stand-in for the contralateral hemisphere). This is what perfusion
    software does, and the baseline a network must beat.

    Args:
        dataset: from :func:`strokekit.ctp_phantom.synthesize_perfusion`.
        core_cbf: relative CBF below which tissue is core.
        tmax: Tmax (s) above which tissue is hypoperfused.
        core_cbv: relative CBV below which tissue may be core.

    Returns:
        uint8 labels (N, H, W) with the classes of :data:`CLASS_NAMES`.
    """
    phys = to_physical(dataset.images)
    brain = (phys["cbf"] > 0) | (phys["cbv"] > 0) | (phys["tmax"] > 0)
    out = np.zeros(dataset.masks.shape, np.uint8)
    for i in range(len(dataset)):
        b = brain[i]
        hypo = b & (phys["tmax"][i] > tmax)
        normal = b & ~hypo
        ref = normal if normal.sum() >= 10 else b
        if not ref.any():
            continue
        rcbf = phys["cbf"][i] / max(float(np.median(phys["cbf"][i][ref])), 1e-6)
        rcbv = phys["cbv"][i] / max(float(np.median(phys["cbv"][i][ref])), 1e-6)
        out[i][b] = BRAIN
        out[i][hypo] = PENUMBRA
        out[i][hypo & (rcbf < core_cbf) & (rcbv < core_cbv)] = CORE
    return out


# ============================================================================ model side
def clinical_features(dataset: SliceDataset, column: str = "nihss", scale: float = NIHSS_MAX) -> np.ndarray:
    """The clinical input of the model: ``extra[column] / scale`` as (N, 1) float32."""
    if column not in dataset.extra:
        raise DataError(f"the dataset has no extra column {column!r}; columns: {sorted(dataset.extra)}")
    return (np.asarray(dataset.extra[column], np.float32) / np.float32(scale))[:, None]


def split_inputs(images: np.ndarray, input_names: Sequence[str] = MAP_NAMES,
                 clinical: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Channels (N, H, W, C) → the model's named inputs ``{name: (N, H, W, 1)}`` (+ clinical)."""
    images = _check_channels(images, input_names)
    out = {name: np.ascontiguousarray(images[..., k: k + 1]) for k, name in enumerate(input_names)}
    if clinical is not None:
        clinical = np.asarray(clinical, np.float32)
        if clinical.ndim == 1:
            clinical = clinical[:, None]
        if clinical.ndim != 2 or len(clinical) != len(images):
            raise ValueError(f"clinical must be (N,) or (N, F) with N = {len(images)}; got shape {clinical.shape}")
        out["clinical"] = clinical
    return out


def _check_channels(images, input_names: Sequence[str]) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != len(input_names):
        raise ValueError(
            f"images must be (N, H, W, {len(input_names)}), one channel per input name "
            f"{list(input_names)}; got shape {images.shape}"
        )
    return images


def _make_loader_class():
    from .augment import SegmentationLoader

    class MultiInputLoader(SegmentationLoader):
        """Batches for a multi-input model: each map its own named input, plus a clinical vector.

        A :class:`strokekit.augment.SegmentationLoader` over the stacked channels (shuffling,
        augmentation with the same geometry for every map and the mask, one-hot targets, epochs)
        whose batches are split into the model's named inputs (:func:`split_inputs`), so it works
        on every Keras backend.

        Args:
            images: (N, H, W, C), one channel per input name.
            masks: (N, H, W) integer labels.
            input_names: the model's input names, one per channel (default :data:`MAP_NAMES`).
            clinical: None, or (N,) / (N, F) clinical features fed as the input ``"clinical"``.
            batch_size, augment, shuffle, seed, num_classes: as for SegmentationLoader (use
                geometric augmentation only: intensity changes would break the maps' units).
            workers, use_multiprocessing, max_queue_size: as for ``keras.utils.PyDataset``.

        Yields (through ``loader[i]``):
            ({name: (B, H, W, 1), ..., "clinical": (B, F)}, y (B, H, W, K)).
        """

        def __init__(self, images, masks, input_names: Sequence[str] = MAP_NAMES,
                     clinical=None, batch_size: int = 8, augment=None, shuffle: bool = True,
                     seed: int = 0, num_classes: int = len(CLASS_NAMES), workers: int = 1,
                     use_multiprocessing: bool = False, max_queue_size: int = 8):
            names = tuple(str(n) for n in input_names)
            if len(set(names)) != len(names) or "clinical" in names:
                raise ValueError(f"input names must be distinct and not 'clinical'; got {list(names)}")
            images = _check_channels(images, names)
            # split_inputs checks the clinical rows (beside one pixel of each image: no copy of the images).
            self.clinical = split_inputs(images[:, :1, :1], names, clinical).get("clinical")
            self.input_names = names
            super().__init__(images, masks, batch_size=batch_size, augment=augment, shuffle=shuffle, seed=seed,
                             num_classes=num_classes, workers=workers, use_multiprocessing=use_multiprocessing,
                             max_queue_size=max_queue_size)

        def __getitem__(self, index: int):
            x, y = super().__getitem__(index)
            rows = None if self.clinical is None else self.clinical[self.batch_indices(index)]
            return split_inputs(x, self.input_names, rows), y

    MultiInputLoader.__module__ = __name__
    MultiInputLoader.__qualname__ = "MultiInputLoader"
    return MultiInputLoader


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    # Keras is imported on first use of these names only, so `import strokekit.perfusion` stays
    # cheap (the synthesis itself lives in strokekit.ctp_phantom).
    factory = {"MultiInputLoader": _make_loader_class, "WeightedFocalTverskyLoss": _make_loss_class}.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _LAZY:
        _LAZY[name] = factory()
    return _LAZY[name]


def _make_loss_class():
    import keras
    from keras import ops

    from .losses import FocalTverskyLoss, _safe_power

    @keras.saving.register_keras_serializable(package="strokekit")
    class WeightedFocalTverskyLoss(FocalTverskyLoss):
        """Focal Tversky loss per class, averaged over classes with class weights.

        ``sum_c w_c (1 - TI_c)^gamma / sum_c w_c``: with equal weights it is
        :class:`strokekit.losses.FocalTverskyLoss`; larger weights on the rare classes (core,
        penumbra) keep the large background and brain classes from dominating.

        Args:
            class_weights: one non-negative weight per output channel (None: all 1).
            alpha, beta, gamma, smooth, per_image, name, reduction, dtype: as
                :class:`strokekit.losses.FocalTverskyLoss`.
        """

        default_name = "weighted_focal_tversky_loss"

        def __init__(self, class_weights=None, **kwargs):
            super().__init__(**kwargs)
            if class_weights is not None:
                class_weights = [float(w) for w in class_weights]
                if not class_weights or min(class_weights) < 0 or sum(class_weights) <= 0:
                    raise ValueError(
                        "class_weights must be non-negative numbers, one per class, with a "
                        f"positive sum. Received: class_weights={class_weights!r}"
                    )
            self.class_weights = class_weights

        def call(self, y_true, y_pred):
            per_class = _safe_power(self._one_minus_ti(y_true, y_pred), self.gamma)
            if self.class_weights is None:
                return ops.mean(per_class, axis=-1)
            if per_class.shape[-1] is not None and per_class.shape[-1] != len(self.class_weights):
                raise ValueError(
                    f"{len(self.class_weights)} class weights for {per_class.shape[-1]} output "
                    "channels"
                )
            w = ops.convert_to_tensor(self.class_weights, dtype=per_class.dtype)
            return ops.sum(per_class * w, axis=-1) / ops.sum(w)

        def _extra_config(self):
            return {**super()._extra_config(), "class_weights": self.class_weights}

    WeightedFocalTverskyLoss.__module__ = __name__
    WeightedFocalTverskyLoss.__qualname__ = "WeightedFocalTverskyLoss"
    return WeightedFocalTverskyLoss


def weighted_focal_tversky_loss(class_weights=None, alpha: float = 0.7, beta: float = 0.3,
                                gamma: float = 0.75, smooth: float = 1.0, per_image: bool = False):
    """A :class:`WeightedFocalTverskyLoss` (focal Tversky with class weights).

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.
    """
    cls = __getattr__("WeightedFocalTverskyLoss")
    return cls(class_weights=class_weights, alpha=alpha, beta=beta, gamma=gamma, smooth=smooth,
               per_image=per_image)


@dataclasses.dataclass(frozen=True)
class PerfusionTrainConfig:
    """Everything that decides a core/penumbra training run. Variants by ``dataclasses.replace``.

    Attributes:
        filters: U-Net filters per level (the last is the bottleneck).
        activation: as in :func:`strokekit.models.unet`.
        dropout: dropout after the bottleneck.
        use_clinical: feed NIHSS (scaled to 0..1) as the extra input ``clinical``.
        alpha: focal Tversky weight of false negatives.
        beta: focal Tversky weight of false positives.
        gamma: focal Tversky exponent.
        class_weights: one weight per class of :data:`CLASS_NAMES` (None: all 1).
        learning_rate: Adam learning rate (from scratch, and while the encoder is frozen).
        lr_scale: factor on the learning rate whenever pretrained encoder blocks train.
        unfreeze_every: epochs between two unfreezing steps of the gradual schedule.
        batch_size: slices per batch.
        num_epochs: epochs of a run.
        augment: geometric augmentation (``strokekit.augment.AugmentConfig``) or None.
        seed: weights, shuffling and augmentation.
        workers: loader threads.
    """

    filters: tuple[int, ...] = (16, 32, 64, 128)
    activation: str = "relu"
    dropout: float = 0.0
    use_clinical: bool = True
    alpha: float = 0.7
    beta: float = 0.3
    gamma: float = 0.75
    class_weights: tuple[float, ...] | None = (0.2, 0.5, 1.5, 2.0)
    learning_rate: float = 1e-3
    lr_scale: float = 0.3
    unfreeze_every: int = 1
    batch_size: int = 8
    num_epochs: int = 20
    augment: Any = None
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
            if len(self.class_weights) != len(CLASS_NAMES) or min(self.class_weights) < 0:
                raise ValueError(
                    f"PerfusionTrainConfig.class_weights needs {len(CLASS_NAMES)} non-negative "
                    f"numbers, one per class {list(CLASS_NAMES)}; got {self.class_weights!r}"
                )
        if not self.learning_rate > 0:
            raise ValueError(f"PerfusionTrainConfig.learning_rate must be > 0; got {self.learning_rate!r}")
        if not 0 < self.lr_scale <= 1:
            raise ValueError(f"PerfusionTrainConfig.lr_scale must be in (0, 1]; got {self.lr_scale!r}")
        for name in ("num_epochs", "unfreeze_every", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"PerfusionTrainConfig.{name} must be an int >= 1; got {value!r}")


def build_perfusion_model(config: PerfusionTrainConfig, image_size: int, seed: int | None = None):
    """The multi-input U-Net: one input per map (early fusion), optionally the clinical input.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        config: filters, activation, dropout, ``use_clinical`` and (default) seed.
        image_size: side of the square maps.
        seed: weight initialisation seed; None uses ``config.seed``.

    Returns:
        An uncompiled ``keras.Model`` with inputs ``cbf``, ``cbv``, ``tmax``, ``ttp``, ``mip``
        (each (S, S, 1)) and ``clinical`` (1 value) when used, and a 4-class softmax head.
    """
    from .models import multi_input_unet

    return multi_input_unet(
        {name: (image_size, image_size, 1) for name in MAP_NAMES},
        num_classes=len(CLASS_NAMES),
        clinical_features=1 if config.use_clinical else 0,
        filters=config.filters,
        activation=config.activation,
        dropout=config.dropout,
        seed=config.seed if seed is None else seed,
    )


def copy_model(model):
    """A new model with the same architecture and a copy of the weights (one per fine-tuning run)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def make_schedule(schedule: Any, config: PerfusionTrainConfig):
    """A :class:`strokekit.transfer.FineTuneSchedule` from a name of :data:`SCHEDULES` (or as is).

    ``"scratch"`` trains everything at the full rate; the others are notebook 05's modes with
    the config's ``lr_scale`` and ``unfreeze_every``.
    """
    from .transfer import SCRATCH, FineTuneSchedule

    if isinstance(schedule, FineTuneSchedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"Expected one of {list(SCHEDULES)}. Received: schedule={schedule!r}")
    if schedule == "scratch":
        return SCRATCH
    # No batch norm in these models; keep_batchnorm_frozen would change nothing.
    return FineTuneSchedule(mode=schedule, unfreeze_every=int(config.unfreeze_every),
                            lr_scale=float(config.lr_scale), keep_batchnorm_frozen=True)


class ModelPool(engine.ModelPool):
    """Compiled copies of one architecture, reused across runs that share trainable blocks and loss
    (:class:`strokekit.engine.ModelPool`), and one shared copy for predictions.

    A schedule comparison (several schedules × seeds × phases) would otherwise compile dozens of
    times for only a handful of distinct settings; results are the same as compiling afresh.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.
    """

    def __init__(self):
        super().__init__()
        self._predictor = None

    def predict(self, model, inputs, batch_size: int = 8) -> np.ndarray:
        """``model.predict`` through one shared copy (one traced prediction step for all runs)."""
        import keras

        if self._predictor is None or [tuple(w.shape) for w in self._predictor.weights] != \
                [tuple(w.shape) for w in model.weights]:
            self._predictor = keras.models.clone_model(model)
        self._predictor.set_weights(model.get_weights())
        return np.asarray(self._predictor.predict(inputs, batch_size=batch_size, verbose=0))


@dataclasses.dataclass
class PerfusionRun:
    """What :func:`train_perfusion` returns."""

    model: Any
    history: Any  # pandas DataFrame, one row per epoch with its phase and trainable blocks
    schedule: str
    config: PerfusionTrainConfig
    run_dir: Path | None
    seconds: float
    best_epoch: int


def loss_and_metrics(config: PerfusionTrainConfig) -> tuple[Any, list]:
    """The class-weighted focal Tversky loss of a config, and the Dice of penumbra and core."""
    from .losses import DiceMetric

    return (weighted_focal_tversky_loss(config.class_weights, config.alpha, config.beta, config.gamma),
            [DiceMetric(class_id=PENUMBRA, name="dice_penumbra"), DiceMetric(class_id=CORE, name="dice_core")])


def loader_for(dataset: SliceDataset, config: PerfusionTrainConfig, training: bool):
    """A :class:`MultiInputLoader` over a perfusion dataset for a config (shuffled and
    augmented when ``training``)."""
    cls = __getattr__("MultiInputLoader")
    return cls(
        dataset.images, dataset.masks, MAP_NAMES,
        clinical=clinical_features(dataset) if config.use_clinical else None,
        batch_size=config.batch_size, augment=config.augment if training else None,
        shuffle=training, seed=config.seed, num_classes=len(CLASS_NAMES),
        workers=config.workers if training else 1,
    )


def train_perfusion(
    model,
    train_data: SliceDataset,
    val_data: SliceDataset,
    config: PerfusionTrainConfig,
    schedule: Any = "scratch",
    num_epochs: int | None = None,
    run_dir: str | os.PathLike | None = None,
    restore_best: bool = True,
    pool: ModelPool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> PerfusionRun:
    """Train (or fine-tune) a multi-input model following a freezing schedule.

    The schedules are notebook 05's (:class:`strokekit.transfer.FineTuneSchedule`): each phase
    sets the encoder blocks' ``trainable`` flags as :func:`strokekit.transfer.fine_tune` does
    (:meth:`~strokekit.transfer.FineTuneSchedule.engine_phases`), recompiles (Keras fixes the
    trainable weights at compile time; Adam starts afresh at ``learning_rate * phase.lr_factor``)
    and trains its epochs, all through :func:`strokekit.engine.fit`. This function exists beside
    :func:`strokekit.transfer.fine_tune` because the perfusion model takes a dict of inputs
    (:class:`MultiInputLoader`) and a class-weighted focal Tversky loss.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        model: from :func:`build_perfusion_model` (or :func:`copy_model` of a pretrained one);
            changed in place.
        train_data: training slices from :func:`strokekit.ctp_phantom.synthesize_perfusion`.
        val_data: validation slices (best epoch).
        config: the training settings (seed, loss, learning rate, ...).
        schedule: a name of :data:`SCHEDULES` or a FineTuneSchedule.
        num_epochs: overrides ``config.num_epochs`` (e.g. for pretraining).
        run_dir: when given, a :class:`strokekit.runs.RunFolder` of kind ``"perfusion"``:
            ``config.json`` (with the schedule and epochs), ``history.csv`` and ``model.keras``
            (the weights returned, saved with the trainable flags of the last phase).
        restore_best: end with the weights of the epoch with the lowest validation loss.
        pool: a :class:`ModelPool` to reuse compiled copies across calls (much faster for many
            runs of one architecture); None compiles ``model`` itself.
        overwrite: replace a run already in ``run_dir``.
        resume: continue the interrupted run in ``run_dir`` (as :func:`strokekit.train.train`).
        callbacks: more Keras callbacks for every phase (their ``model`` is the one training it).

    Returns:
        :class:`PerfusionRun`; ``history`` has ``epoch``, ``phase``, ``trainable_blocks`` (joined
        by ``+``), ``trainable_params``, ``learning_rate`` and Keras' logs (``loss``, ``val_loss``,
        ``val_dice_core``, ...).

    Raises:
        DataError: empty training or validation data.
        FileExistsError: ``run_dir`` already holds a run and neither ``overwrite`` nor ``resume`` is set.
        ValueError: ``resume`` without a ``run_dir``.
    """
    from .config import seed_everything, to_dict
    from .runs import RunFolder
    from .train import check_run_inputs

    check_run_inputs(train_data, val_data, run_dir, resume)
    plan = make_schedule(schedule, config)
    name = schedule if isinstance(schedule, str) else plan.mode
    epochs = int(num_epochs or config.num_epochs)
    phases = plan.engine_phases(model, epochs, config.learning_rate)
    seed_everything(config.seed)
    loader = loader_for(train_data, config, training=True)
    val_loader = loader_for(val_data, config, training=False)
    run = None if run_dir is None else RunFolder.create(
        run_dir, "perfusion", {**to_dict(config), "schedule": name, "epochs": epochs}, overwrite=overwrite,
        resume=resume)
    fitted = engine.fit(model, loader, val_loader, phases, *loss_and_metrics(config), restore_best=restore_best,
                        run=run, resume=resume, progress=False, callbacks=callbacks, pool=pool,
                        desc=f"perfusion ({name})")
    for layer in model.layers:
        layer.trainable = True
    history = fitted.history.assign(trainable_blocks=fitted.history["trainable_blocks"].map("+".join))
    return PerfusionRun(model, history, name, config, run.folder if run else None, fitted.seconds, fitted.best_epoch)


def predict_labels(model, dataset: SliceDataset, use_clinical: bool | None = None,
                   batch_size: int = 8, pool: ModelPool | None = None) -> np.ndarray:
    """Arg-max labels (N, H, W) uint8 of a multi-input model on a perfusion dataset."""
    if use_clinical is None:
        use_clinical = "clinical" in [t.name for t in model.inputs] if hasattr(model, "inputs") else False
    inputs = split_inputs(dataset.images, MAP_NAMES,
                          clinical_features(dataset) if use_clinical else None)
    if pool is not None:
        prob = pool.predict(model, inputs, batch_size)
    else:
        prob = np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0))
    return np.argmax(prob, axis=-1).astype(np.uint8)


def group_scores(dataset: SliceDataset, pred: np.ndarray, group_column: str = "occlusion"):
    """Per-class F1 (= Dice) of penumbra and core, pooled over the pixels of each group.

    Args:
        dataset: the evaluated slices (truth in ``masks``).
        pred: predicted labels (N, H, W).
        group_column: extra column that names the groups.

    Returns:
        pandas DataFrame, one row per group (occlusion groups in :data:`OCCLUSION_GROUPS` order,
        others in order of appearance): ``group``, ``core_f1``,
        ``penumbra_f1``, ``slices``, ``patients``.
    """
    import pandas as pd

    from .metrics import per_class_metrics

    pred = np.asarray(pred)
    if pred.shape != dataset.masks.shape:
        raise ValueError(f"pred shape {pred.shape} does not match masks {dataset.masks.shape}")
    if group_column not in dataset.extra:
        raise DataError(f"the dataset has no extra column {group_column!r}")
    groups = np.asarray(dataset.extra[group_column]).astype(str)
    present = list(dict.fromkeys(groups.tolist()))
    # Occlusion groups in their fixed order (LVO first), so tables and charts line up.
    order = [g for g in OCCLUSION_GROUPS if g in present] + [g for g in present if g not in OCCLUSION_GROUPS]
    rows = []
    for g in order:
        sel = groups == g
        table = per_class_metrics(dataset.masks[sel], pred[sel], len(CLASS_NAMES), CLASS_NAMES)
        by = table.set_index("class_name")["dice"]
        pids = np.asarray(dataset.patient_ids)[sel] if dataset.patient_ids else []
        rows.append({"group": g, "core_f1": float(by["core"]), "penumbra_f1": float(by["penumbra"]),
                     "slices": int(sel.sum()), "patients": len(set(pids))})
    return pd.DataFrame(rows)


def schedule_table(scores, by: Sequence[str] = ("schedule", "group")):
    """The study's table: rows schedule × group, columns core F1 and penumbra F1 as mean ± sd.

    Args:
        scores: one row per run and group with ``core_f1``, ``penumbra_f1``, ``seed`` and the
            ``by`` columns (e.g. several :func:`group_scores` tables with ``schedule`` and
            ``seed`` added).
        by: row keys.

    Returns:
        pandas DataFrame indexed by ``by`` with columns ``Core F1``, ``Penumbra F1`` (strings
        "mean ± sd"), ``core_mean``, ``penumbra_mean`` and ``seeds``.
    """
    missing = [c for c in (*by, "core_f1", "penumbra_f1") if c not in scores.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; columns are {list(scores.columns)}")
    grouped = scores.groupby(list(by), sort=False)
    mean, sd = grouped[["core_f1", "penumbra_f1"]].mean(), grouped[["core_f1", "penumbra_f1"]].std(ddof=1)
    sd = sd.fillna(0.0)
    out = mean.copy()
    out["Core F1"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean["core_f1"], sd["core_f1"])]
    out["Penumbra F1"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean["penumbra_f1"], sd["penumbra_f1"])]
    out = out.rename(columns={"core_f1": "core_mean", "penumbra_f1": "penumbra_mean"})
    out["seeds"] = grouped.size()
    return out[["Core F1", "Penumbra F1", "core_mean", "penumbra_mean", "seeds"]]
