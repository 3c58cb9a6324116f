"""Few-shot segmentation that has to work on *new* patients: a fixed protocol, baselines, a recipe.

The study trained a 31M-parameter U-Net on the lesion slices of three patients and scored it on
slices of the same kind. On the real CT-ICH slices (traumatic intracranial haemorrhage, not
stroke) under the protocol ``fewshot-ctich-v1`` — train on patients 49, 50, 51, validate on 66,
test on the lesion slices of the 32 other lesion patients — that recipe reaches a per-patient Dice
of about 0.04: the network learns *where* the three training patients bled (the front rim of the
skull) instead of *what* blood looks like, and a specificity of 0.996 hides it.

This module holds what notebooks/10 and ``benchmarks/bench_fewshot_ctich.py`` share:

* :data:`PROTOCOLS`, :func:`protocol_split`, :func:`load_protocol` — the fixed patient split;
* :func:`threshold_baseline` — the classical baseline (bright pixels inside the brain:
  :func:`strokekit.preprocess.threshold_in_brain`, band by :func:`strokekit.preprocess.fit_threshold`),
  :func:`all_background` — the trivial one;
* :class:`FewShotRecipe`, :data:`FEWSHOT_DEFAULT`, :data:`STUDY_RECIPE`, :func:`fit_recipe`,
  :func:`predict_recipe` — a trained network plus everything around it (lesion-free slices,
  test-time flips, brain-mask restriction, threshold chosen on validation, extra input channels),
  :func:`redecide` (after-training decisions without retraining), :func:`ablation_recipes`;
* :func:`evaluate_protocol` — the protocol's figures (per-patient Dice first).
* :func:`save_fitted`, :func:`load_fitted` — a fitted recipe as a run folder the app applies whole.

The defaults of :data:`FEWSHOT_DEFAULT` were chosen by measurement on the validation patient and
by leave-one-training-patient-out cross-validation, never on the test patients; the log of those
experiments is ``benchmarks/fewshot_log.md``.

Introduced in notebooks/10_what_generalizes.ipynb.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# STRONG_AUGMENT lives in strokekit.augment; re-exported here because tests/test_fewshot.py reads fs.STRONG_AUGMENT.
from .augment import STRONG_AUGMENT, STUDY_AUGMENT, sample_patches, tile_patches  # noqa: F401
from .config import Profile, TrainConfig, get_profile, seed_everything, to_dict
from .dataset import SliceDataset, concat
from .engine import load_model, recalibrate_batchnorm
from .errors import DataError
from .io import _natural_key, load_ctich
from .metrics import _bbox, aggregate, per_patient_dice, slice_confusion
from .paths import ctich_dir
from .preprocess import (
    DISPLAY_WINDOW,
    _levels,
    brain_mask_stack,
    cranial_slices,
    dilate_cross,
    display_levels,
    fit_threshold,
    rescale_spacing,
    resize_dataset,
    resize_image,
    threshold_in_brain,
)
from .runs import FEWSHOT_FILE, RunFolder, _fewshot_info
from .split import Split, check_leakage
from .train import config_from_dict, predict_numpy, to_arrays, train

#: Fixed few-shot protocols: training and validation patients (all their lesion slices), input
#: size and the probability threshold of the reference figures. The test set is the lesion
#: slices of every *other* patient that has a lesion.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "fewshot-ctich-v1": dict(train=["49", "50", "51"], val=["66"], image_size=128, threshold=0.5),
}


# ----------------------------------------------------------------------------- protocol
def _check_protocol(name: str) -> dict[str, Any]:
    if name not in PROTOCOLS:
        raise ValueError(f"Expected one of {sorted(PROTOCOLS)}. Received: name={name!r}")
    return PROTOCOLS[name]


def lesion_flags(dataset: SliceDataset) -> np.ndarray:
    """Which slices carry a lesion: ``extra["has_mask"]`` when present, else a non-empty mask.

    The CT-ICH ``has_mask`` column is the truth at full resolution; after shrinking to 64 px two
    small masks vanish, so the resized mask alone would drop those slices from the protocol.

    Introduced in notebooks/10_what_generalizes.ipynb.
    """
    if "has_mask" in dataset.extra:
        return np.asarray(dataset.extra["has_mask"]).astype(int) == 1
    return dataset.has_lesion()


def patient_split(
    dataset: SliceDataset,
    train: Sequence[str],
    val: Sequence[str],
    empty_slices: bool = False,
    params: dict[str, Any] | None = None,
):
    """Named training and validation patients; every other lesion patient is a test patient.

    Train holds the lesion slices of ``train`` (and, with ``empty_slices=True``, their
    lesion-free slices too, so a model can learn what absence looks like); val holds the lesion
    slices of ``val``; test holds the lesion slices of every other patient with at least one
    lesion slice. Lesion-free slices of validation and test patients and all slices of
    lesion-free patients are left out. Lesion slices are found by :func:`lesion_flags`.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        dataset: slices with patient ids.
        train: training patient ids.
        val: validation patient ids.
        empty_slices: add the training patients' lesion-free slices to train.
        params: stored in the split's ``params`` (with ``train``, ``val``, ``empty_slices``).

    Returns:
        :class:`strokekit.split.Split` with method ``"protocol"``.

    Raises:
        DataError: no patient ids, a patient named twice, or a named patient without lesion slices.
    """
    if dataset.patient_ids is None:
        raise DataError("a patient split needs patient ids; this dataset has none")
    train_p, val_p = [str(p) for p in train], [str(p) for p in val]
    both = sorted(set(train_p) & set(val_p))
    if both:
        raise DataError(f"patient(s) {both} are named for both train and val")
    pids = np.asarray(dataset.patient_ids, dtype=object).astype(str)
    lesion = lesion_flags(dataset)
    lesion_patients = set(pids[lesion].tolist())
    missing = [p for p in train_p + val_p if p not in lesion_patients]
    if missing:
        raise DataError(
            f"patient(s) {missing} have no lesion slices in this dataset (train={train_p}, "
            f"val={val_p}); load them, e.g. with strokekit.fewshot.load_protocol"
        )
    subsets = np.full(len(dataset), "", dtype=object)
    subsets[np.isin(pids, train_p) & (lesion | bool(empty_slices))] = "train"
    subsets[np.isin(pids, val_p) & lesion] = "val"
    test_patients = sorted(lesion_patients - set(train_p) - set(val_p))
    subsets[np.isin(pids, test_patients) & lesion] = "test"
    keep = np.flatnonzero(subsets != "")
    split = Split(
        case_ids=[dataset.case_ids[i] for i in keep],
        subsets=[str(subsets[i]) for i in keep],
        patient_ids=[str(pids[i]) for i in keep],
        method="protocol",
        params=dict(params or {}, train=train_p, val=val_p, empty_slices=bool(empty_slices)),
    )
    check_leakage(split)
    return split


def protocol_split(dataset: SliceDataset, name: str = "fewshot-ctich-v1", empty_slices: bool = False):
    """The split of a named protocol in :data:`PROTOCOLS` (see :func:`patient_split`).

    For ``fewshot-ctich-v1`` on the CT-ICH slices: train = the 40 lesion slices of patients 49,
    50, 51 (117 slices with their lesion-free ones), val = the 12 lesion slices of patient 66,
    test = the 266 lesion slices of the 32 other lesion patients.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        dataset: slices with patient ids (e.g. from :func:`load_protocol`).
        name: a key of :data:`PROTOCOLS`.
        empty_slices: add the training patients' lesion-free slices to train.

    Returns:
        :class:`strokekit.split.Split` with method ``"protocol"`` and the protocol in ``params``.

    Raises:
        ValueError: unknown protocol name.
        DataError: no patient ids, or a protocol patient without lesion slices in the dataset.
    """
    proto = _check_protocol(name)
    try:
        return patient_split(dataset, proto["train"], proto["val"], empty_slices=empty_slices,
                             params=dict(protocol=name, image_size=proto["image_size"],
                                         threshold=proto["threshold"]))
    except DataError as err:
        raise DataError(f"protocol {name!r}: {err}") from None


def _slices_table(path: str | os.PathLike | None):
    """(the ct-ich folder, its slices.csv as a DataFrame); a clear DataError when either is missing."""
    import pandas as pd

    folder = path if path is not None else ctich_dir()
    if folder is None:
        load_ctich(None)  # raises the DataError that says where to put the data
    csv = os.path.join(folder, "slices.csv")
    if not os.path.isfile(csv):
        raise DataError("no slices.csv (file, patient_id, has_mask, ...)", folder)
    return folder, pd.read_csv(csv, dtype={"file": str, "patient_id": str})


def lesion_free_patients(path: str | os.PathLike | None = None) -> list[str]:
    """CT-ICH patients without a lesion on any slice, by id (no protocol trains, validates or tests on them).

    Introduced in notebooks/10_what_generalizes.ipynb, which measures false positives on their whole scans.
    """
    _, table = _slices_table(path)
    lesion = set(table.loc[table["has_mask"] == 1, "patient_id"])
    return sorted(set(table["patient_id"]) - lesion, key=_natural_key)


def load_protocol(
    name: str = "fewshot-ctich-v1",
    path: str | os.PathLike | None = None,
    image_size: int | None = None,
    empty_slices: bool = True,
    progress: bool = True,
):
    """Read only the CT-ICH slices a protocol uses and split them.

    Reads every slice of the training and validation patients and the lesion slices of the
    others (about 420 of the 2814 slices), so 256 px inputs fit in memory.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        name: a key of :data:`PROTOCOLS`.
        path: the ``ct-ich`` folder; default :func:`strokekit.paths.ctich_dir`.
        image_size: side in pixels; default the protocol's.
        empty_slices: passed to :func:`protocol_split`.
        progress: progress bars while reading.

    Returns:
        (dataset, split): the slices read and their :func:`protocol_split`.

    Raises:
        DataError: the folder is absent or malformed (see :func:`strokekit.io.load_ctich`).
    """
    proto = _check_protocol(name)
    folder, table = _slices_table(path)
    size = int(image_size or proto["image_size"])
    named = [str(p) for p in proto["train"] + proto["val"]]
    others = sorted(set(table.loc[table["has_mask"] == 1, "patient_id"]) - set(named), key=_natural_key)
    parts = [load_ctich(folder, image_size=size, patients=named, progress=progress)]
    if others:
        parts.append(load_ctich(folder, image_size=size, lesion_only=True, patients=others,
                                progress=progress))
    data = concat(parts)
    return data, protocol_split(data, name, empty_slices=empty_slices)


# ----------------------------------------------------------------------------- baselines
def threshold_baseline(train: SliceDataset, val: SliceDataset,
                       test: SliceDataset) -> tuple[dict[str, float], np.ndarray]:
    """The protocol's classical baseline: a band fitted on the lesion slices of train and val, applied to test.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Returns:
        (band from :func:`strokekit.preprocess.fit_threshold`, 0/1 masks of
        :func:`strokekit.preprocess.threshold_in_brain` on ``test``).
    """
    dev = [d.subset(np.flatnonzero(lesion_flags(d))) for d in (train, val)]
    band = fit_threshold(np.concatenate([d.images for d in dev]), np.concatenate([d.masks for d in dev]),
                         unit=train.unit, patient_ids=sum((list(d.patient_ids or []) for d in dev), []) or None)
    pred = threshold_in_brain(test.images, unit=test.unit, low=band["low"], high=band["high"],
                              erosion=int(band["erosion"]))
    return band, pred


def all_background(images: np.ndarray) -> np.ndarray:
    """The trivial baseline: no lesion anywhere (Dice 0 on every lesion slice, specificity 1).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        images: (N, H, W), (N, H, W, C) or one (H, W) slice.

    Returns:
        uint8 zeros of shape (N, H, W) (or (H, W)).
    """
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[..., 0]
    if images.ndim not in (2, 3):
        raise ValueError(f"expected (H, W), (N, H, W) or (N, H, W, C), got shape {images.shape}")
    return np.zeros(images.shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- evaluation
def evaluate_protocol(pred: np.ndarray, data: SliceDataset, threshold: float = 0.5) -> dict[str, float]:
    """The protocol's figures for predictions on a dataset's slices.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        pred: predicted masks or probabilities (N, H, W) in the dataset's order and size.
        data: the evaluated slices (with patient ids).
        threshold: probability cut-off for float predictions.

    Returns:
        ``per_patient_dice`` (each patient's pixels pooled, then the mean over patients — the
        headline), ``per_patient_dice_sd`` (spread over patients), ``per_slice_dice`` (mean over
        slices), ``pooled_dice``, ``sensitivity``, ``specificity`` (pooled over all pixels),
        ``n_patients``, ``n_slices``.

    Raises:
        ValueError: shapes differ or patient ids are missing.
    """
    pred = np.asarray(pred)
    if pred.ndim == 4 and pred.shape[-1] == 1:
        pred = pred[..., 0]
    if pred.shape != data.masks.shape:
        raise ValueError(f"pred shape {pred.shape} does not match the masks' {data.masks.shape}")
    if data.patient_ids is None:
        raise ValueError("evaluate_protocol needs patient ids (per-patient Dice)")
    table = aggregate(data.masks > 0, pred, data.patient_ids, threshold=threshold,
                      metrics=("dice", "sensitivity", "specificity"))
    _, per_dice = per_patient_dice(slice_confusion(data.masks > 0, pred, threshold), data.patient_ids)
    return dict(
        per_patient_dice=float(table.loc["dice", "mean_of_patients"]),
        per_patient_dice_sd=float(per_dice.std(ddof=1)) if len(per_dice) > 1 else 0.0,
        per_slice_dice=float(table.loc["dice", "mean_of_slices"]),
        pooled_dice=float(table.loc["dice", "pooled"]),
        sensitivity=float(table.loc["sensitivity", "pooled"]),
        specificity=float(table.loc["specificity", "pooled"]),
        n_patients=int(len(per_dice)),
        n_slices=int(len(pred)),
    )


def patient_dice(pred: np.ndarray, data: SliceDataset, threshold: float = 0.5) -> dict[str, float]:
    """Dice of each patient's pooled pixels, ``{patient_id: dice}`` (order of first appearance).

    Introduced in notebooks/10_what_generalizes.ipynb.
    """
    uniq, dice = per_patient_dice(slice_confusion(data.masks > 0, np.asarray(pred), threshold), data.patient_ids)
    score = dict(zip(uniq.tolist(), dice.tolist()))
    return {p: score[p] for p in dict.fromkeys(str(p) for p in data.patient_ids)}


# ----------------------------------------------------------------------------- the recipe
@dataclasses.dataclass(frozen=True)
class FewShotRecipe:
    """A network's training config plus what happens around training. Variants by ``replace``.

    Attributes:
        config: the :class:`strokekit.config.TrainConfig` of the network.
        preset: a :data:`strokekit.models.PRESETS` name that builds the network instead of
            ``config.arch``/``filters``/... (the study's U-Net); None builds from the config.
        empty_ratio: lesion-free slices of the training patients added per lesion slice
            (0: lesion slices only; the study's choice). Capped by what the patients have.
        strip_skull: multiply the input by the (dilated) brain mask, so bone and scalp are gone
            before the network sees them.
        restrict_to_brain: set predictions outside the dilated brain mask to 0.
        brain_dilation: pixels added around the brain mask for both of the above (bleeds
            between skull and brain — epidural, subdural — lie on the mask's edge).
        tta_flip: average the prediction with that of the left-right mirrored slice.
        tune_threshold: choose the probability threshold on the validation slices
            (maximising per-patient Dice) instead of using ``config.threshold``.
        thresholds: candidates for ``tune_threshold``.
        patch_size: train on random square crops of this side instead of whole slices (None:
            whole slices, the study's way). The network is fully convolutional, so it still
            segments whole slices. A crop does not show where in the head it lies, which takes
            away the position prior; crops are also cheaper, and centring some on lesions
            raises the share of lesion pixels the loss sees.
        patches_per_slice: crops drawn from each training slice (a fixed, seeded set that the
            augmentation varies every epoch).
        foreground_fraction: share of a lesion slice's crops that contain a lesion pixel (at a
            random position in the crop, so lesions are not always central).
        recalibrate_bn: after training, recompute the batch-normalisation statistics on the
            whole (unaugmented) training slices (:func:`strokekit.engine.recalibrate_batchnorm`).
        display_windows: contrast stretches of the 8-bit display range, each an extra input
            channel ``clip((level - low) / (high - low), 0, 1)``: the PNGs are already
            brain-windowed, so a narrow window (e.g. 130–230) is the closest thing to a
            "blood window" that can still be had.
        candidate_channel: add the threshold-in-brain map (:func:`strokekit.preprocess.threshold_in_brain`,
            band fitted on the training slices by :func:`strokekit.preprocess.fit_threshold`) as an input channel: the
            network then learns which bright candidates are blood rather than finding them.
        context_slices: neighbouring slices on each side of a slice given as extra input
            channels (2.5-D): the slices ``k`` positions above and below in the same patient's
            scan (:func:`attach_context`); a slice whose neighbour is absent (the end of a scan,
            a single uploaded slice) repeats itself there.
        n_models: networks trained (member ``k`` with seed ``seed + 1000·k``, so member 0 is
            the single-network run of the same seed) whose probabilities are averaged. In the
            kit's cross-validation three members scored like one network (0.29-0.31 against
            0.31) at three times the training, so the default trains one.
        stack_min_contrast: on each patient's slices in order (a whole scan, or the protocol's
            lesion slices; :func:`keep_bright_components`, applied by :func:`predict_recipe`), keep
            a 3-D lesion component only if its mean display level exceeds the median brain level
            of its slices by at least this many display levels (``None``: keep every component).
            Blood is hyperdense; parenchyma that a network marks on a scan whose brain is brighter
            is not, but neither is a faint bleed always.
        stack_min_ml: on each patient's slices, drop 3-D components smaller than this many mL.
        paste_per_slice: synthetic lesion slices per training lesion slice: its lesion laid onto a
            lesion-free slice of another patient, at its contrast to the brain (:func:`paste_lesions`;
            the lesion-free slices come from ``fit_recipe(..., backgrounds=)``).
    """

    config: TrainConfig = TrainConfig()
    preset: str | None = None
    empty_ratio: float = 0.0
    strip_skull: bool = False
    restrict_to_brain: bool = False
    brain_dilation: int = 3
    tta_flip: bool = False
    tune_threshold: bool = False
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    patch_size: int | None = None
    patches_per_slice: int = 8
    foreground_fraction: float = 0.5
    recalibrate_bn: bool = True
    display_windows: tuple[tuple[float, float], ...] = ()
    candidate_channel: bool = False
    context_slices: int = 0
    n_models: int = 1
    stack_min_contrast: float | None = None
    stack_min_ml: float = 0.0
    paste_per_slice: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n_models, bool) or not isinstance(self.n_models, (int, np.integer)) or self.n_models < 1:
            raise ValueError(f"n_models must be an integer >= 1, got {self.n_models!r}")
        if self.patch_size is not None:
            if self.patch_size < 8 or self.config.image_size % self.patch_size:
                raise ValueError(
                    f"patch_size must divide image_size={self.config.image_size} and be >= 8, "
                    f"got {self.patch_size!r}"
                )
            if self.preset is not None:
                raise ValueError("patch training builds the network from the config; use preset=None")
        if self.patches_per_slice < 1:
            raise ValueError(f"patches_per_slice must be >= 1, got {self.patches_per_slice!r}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must lie in [0, 1], got {self.foreground_fraction!r}")
        if not np.isfinite(self.empty_ratio) or self.empty_ratio < 0:
            raise ValueError(f"empty_ratio must be a finite number >= 0, got {self.empty_ratio!r}")
        if isinstance(self.context_slices, bool) or not isinstance(self.context_slices, (int, np.integer)) \
                or not 0 <= self.context_slices <= 3:
            raise ValueError(f"context_slices must be an integer in 0..3, got {self.context_slices!r}")
        if isinstance(self.paste_per_slice, bool) or not isinstance(self.paste_per_slice, (int, np.integer)) \
                or self.paste_per_slice < 0:
            raise ValueError(f"paste_per_slice must be an integer >= 0, got {self.paste_per_slice!r}")
        if self.paste_per_slice and self.context_slices:
            raise ValueError("paste_per_slice and context_slices cannot be combined: a pasted slice has no neighbours")
        if self.brain_dilation < 0:
            raise ValueError(f"brain_dilation must be >= 0, got {self.brain_dilation!r}")
        for window in self.display_windows:
            if len(window) != 2 or not 0 <= window[0] < window[1] <= 255:
                raise ValueError(
                    f"display_windows must be (low, high) pairs with 0 <= low < high <= 255, got {window!r}")
        if not self.thresholds or not all(0.0 < t < 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must be values in (0, 1), got {self.thresholds!r}")
        if self.stack_min_contrast is not None and not np.isfinite(self.stack_min_contrast):
            raise ValueError(f"stack_min_contrast must be a finite number or None, got {self.stack_min_contrast!r}")
        if not np.isfinite(self.stack_min_ml) or self.stack_min_ml < 0:
            raise ValueError(f"stack_min_ml must be a finite number >= 0, got {self.stack_min_ml!r}")

    @property
    def has_floor(self) -> bool:
        """Whether the recipe sets a brightness floor (``stack_min_contrast`` or ``stack_min_ml``)."""
        return self.stack_min_contrast is not None or self.stack_min_ml > 0


#: The study's original configuration rebuilt with the kit: its 31M-parameter U-Net preset
#: (leaky ReLU, dropout 0.5), BCE, its augmentation, 50 epochs, the best epoch by validation
#: loss (patience 50 never stops early; the best weights are restored), threshold 0.5.
STUDY_RECIPE = FewShotRecipe(
    config=TrainConfig(
        arch="unet", filters=(64, 128, 256, 512, 1024), activation="leaky_relu", dropout=0.5,
        batch_norm=False, loss="bce", learning_rate=1e-3, batch_size=8, num_epochs=50,
        image_size=128, augment=STUDY_AUGMENT, early_stopping_patience=50, reduce_lr_patience=0,
    ),
    preset="study_unet",
)

#: The kit's few-shot default, chosen by measurement on the validation patient and by
#: leave-one-training-patient-out cross-validation over 49/50/51 (see ``benchmarks/fewshot_log.md``):
#: a small batch-normalised U-Net (0.5M parameters, :meth:`strokekit.config.TrainConfig.few_shot`) trained
#: for 25 epochs on 64 px crops (4 per slice, half of them on a lesion) of 256 px slices — the lesion slices
#: and as many lesion-free ones — rotated up to 180° and flipped both ways
#: (:data:`strokekit.augment.STRONG_AUGMENT`), with Dice+BCE; inputs are the slice, a 130–230 "blood window"
#: and the threshold-in-brain map; batch-norm statistics recomputed on whole slices; predictions averaged
#: with the mirrored slice's, restricted to the brain, thresholded where patient 66 is best. On the protocol
#: (scored on its 128 px masks) cross-validation gives 0.31
#: (0.29–0.34 per seed) at 256 px against 0.23 (0.21–0.26) at 128 px, threshold-in-brain 0.21;
#: patient 66 0.75–0.81 against 0.69–0.75. Training takes 2–2.5 minutes per seed on a 2-core CPU
#: with oneDNN on. The threshold stays tuned: a network that came out under-confident (never above
#: 0.46) scored 0.000 at 0.5 on a held-out patient and 0.59 at the threshold patient 66 chose.
#: On each patient's slices (:func:`predict_recipe`, the app) it keeps only 3-D components at
#: least 44 display levels (about 21 HU) brighter than the brain on their slices and of at least
#: 0.5 mL, chosen on the whole scans of 49/50/51/66, ties broken on 19 lesion-free scans
#: (:func:`keep_bright_components`; ``benchmarks/fewshot_log.md``, session 10, which also says what
#: else was looked at). On whole scans it raises the test patients' 3-D Dice (0.20 -> 0.29 over 3
#: seeds); on the protocol's lesion slices it costs per-patient Dice (0.360 -> 0.284, session 12).
FEWSHOT_DEFAULT = FewShotRecipe(
    config=TrainConfig.few_shot(),
    empty_ratio=1.0,
    strip_skull=False,
    restrict_to_brain=True,
    tta_flip=True,
    tune_threshold=True,
    patch_size=64,
    patches_per_slice=4,
    foreground_fraction=0.5,
    recalibrate_bn=True,
    display_windows=((130.0, 230.0),),
    candidate_channel=True,
    stack_min_contrast=44.0,
    stack_min_ml=0.5,
)


@dataclasses.dataclass
class FittedRecipe:
    """What :func:`fit_recipe` returns: a trained model and the recipe's decisions.

    Attributes:
        model: the trained Keras model (the first member when ``recipe.n_models > 1``).
        recipe: the recipe (with the seed actually used).
        threshold: the probability threshold to apply (tuned on validation or the config's).
        history: per-epoch training history of ``model`` (pandas DataFrame).
        seconds: training wall time (all members together).
        images_per_second: training throughput in whole slices per second (crops count as the
            fraction of a slice they cover).
        n_train: training slices used (lesion + lesion-free).
        val_dice: per-patient Dice on the validation slices at ``threshold``.
        band: the threshold-in-brain band of the candidate channel (None without one).
        models: every member whose probabilities are averaged (``(model,)`` for one network).
        threshold_flat: the threshold was tuned on validation (``tune_threshold``) but every
            candidate gave the same validation Dice (e.g. 0 at all of them: no lesion pixel found
            at any threshold), so the "tuned" threshold is only the first candidate, not a choice
            the validation data informed (:func:`threshold_scores`).
    """

    model: Any
    recipe: FewShotRecipe
    threshold: float
    history: Any
    seconds: float
    images_per_second: float
    n_train: int
    val_dice: float
    band: dict[str, float] | None = None
    models: tuple = ()
    threshold_flat: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            self.models = (self.model,)


def _choose_slices(data: SliceDataset, ratio: float, seed: int) -> SliceDataset:
    lesion = lesion_flags(data)
    keep = np.flatnonzero(lesion)
    empty = np.flatnonzero(~lesion)
    n_empty = min(len(empty), int(round(ratio * len(keep))))
    if n_empty:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
        keep = np.sort(np.concatenate([keep, rng.choice(empty, n_empty, replace=False)]))
    return data.subset(keep)


def as_display(data: SliceDataset, window: tuple[float, float] = DISPLAY_WINDOW) -> SliceDataset:
    """Slices in display levels 0..255: HU slices through ``window``; display slices unchanged.

    Introduced in notebooks/10_what_generalizes.ipynb.
    """
    if data.unit == "display":
        return data
    levels = display_levels(data.images, window)
    extra = {k: display_levels(v, window) if k in _CONTEXT_COLUMNS else v for k, v in data.extra.items()}
    return data.replace(images=levels, unit="display", extra=extra)


def paste_lesions(lesions: SliceDataset, backgrounds: SliceDataset, per_slice: int = 1, seed: int = 0,
                  dilation: int = 3, min_inside: float = 0.95, tries: int = 30) -> SliceDataset:
    """Synthetic lesion slices: each lesion laid onto lesion-free slices of other patients (copy-paste).

    Few-shot data shows each bleed on one brain only. Here every lesion slice (left-right mirrored at
    random) is mapped onto a lesion-free slice of another patient, drawn (seeded) from ``backgrounds``, so
    that the two brains' bounding boxes coincide (a scaling of at most 25 % per axis): a subdural crescent
    lands near the new brain's inner table, an intraparenchymal bleed inside it (the slice level is not
    matched: a bleed from a mid-brain slice may land on a skull-base slice). The
    lesion keeps its contrast to its own brain: its display levels minus the median brain level of its
    slice plus the median brain level of the new slice, blended over a one-pixel edge, without the mask's
    pixels outside its own brain (bone or air the annotation overlapped), and only where
    the new slice's brain (:func:`strokekit.preprocess.brain_mask_stack`, grown by ``dilation`` pixels) is;
    at least ``min_inside`` of the mapped lesion must lie there. Nothing is assumed about the scanner
    beyond the display window. A lesion that fits no background in ``tries`` draws is skipped.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        lesions: slices with lesions (display or HU; slices without a lesion are ignored).
        backgrounds: lesion-free slices of other patients (any lesion pixel in them is an error).
        per_slice: synthetic slices made from each lesion slice.
        seed: seeds the choice of backgrounds and the mirroring.
        dilation: pixels the backgrounds' brain masks grow by (as :attr:`FewShotRecipe.brain_dilation`).
        min_inside: share of the mapped lesion that must lie in the background's brain.
        tries: backgrounds drawn per synthetic slice before the lesion is skipped.

    Returns:
        display-level :class:`SliceDataset` of the synthetic slices at ``lesions``' size and scale (binary
        masks), patient ids (None when the backgrounds have none) and slice indices of their backgrounds,
        case ids ``paste:<lesion case>:<background case>`` (with ``:<n>``, the slice's position, appended
        when one lesion lands twice on the same background).

    Raises:
        DataError: a background slice holds a lesion, the sizes differ, or no lesion fits any background.
    """
    from scipy.ndimage import affine_transform, gaussian_filter

    if per_slice < 1:
        raise ValueError(f"per_slice must be >= 1, got {per_slice!r}")
    if backgrounds.masks.any():
        bad = [c for c, m in zip(backgrounds.case_ids, backgrounds.masks) if m.any()][:3]
        raise DataError(f"paste_lesions: background slices must be lesion-free; {bad} hold a lesion")
    lesions = as_display(lesions.subset(np.flatnonzero(lesion_flags(lesions))))
    backgrounds = as_display(backgrounds)
    if len(lesions) == 0 or len(backgrounds) == 0:
        raise DataError("paste_lesions: no lesion slice or no background slice")
    if lesions.image_shape[:2] != backgrounds.image_shape[:2]:
        raise DataError(f"paste_lesions: lesion slices are {lesions.image_shape[:2]}, "
                        f"backgrounds {backgrounds.image_shape[:2]}; resize them to one size first")
    scale = 255.0 if float(lesions.images.max()) <= 1.0 else 1.0  # back to the lesions' scale at the end
    src = _levels(lesions.images[..., 0] if lesions.images.ndim == 4 else lesions.images, "display")
    dst = _levels(backgrounds.images[..., 0] if backgrounds.images.ndim == 4 else backgrounds.images, "display")
    src_core, dst_core = brain_mask_stack(src), brain_mask_stack(dst)
    dst_brain = dilate_cross(dst_core, dilation)
    src_box = [_box(b) for b in src_core]
    dst_box = [_box(b) for b in dst_core]
    usable = np.flatnonzero([b is not None for b in dst_box])
    back_pids = np.asarray(backgrounds.patient_ids, dtype=str) if backgrounds.patient_ids is not None else None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    images, masks, cases, pids, where = [], [], [], [], []
    for n in range(len(src)):
        if src_box[n] is None or not (lesions.masks[n] > 0)[src_core[n]].any():
            continue
        level = float(np.median(src[n][src_core[n]]))
        for _ in range(per_slice):
            mirror = bool(rng.integers(2))
            image = src[n][:, ::-1] if mirror else src[n]
            # mask pixels outside the brain are bone or air that the annotation overlapped, not blood
            core = src_core[n][:, ::-1] if mirror else src_core[n]
            lesion = ((lesions.masks[n][:, ::-1] if mirror else lesions.masks[n]) > 0) & core
            lesion = lesion.astype(np.float32)
            r0, r1, c0, c1 = src_box[n]
            if mirror:
                c0, c1 = src.shape[2] - c1, src.shape[2] - c0
            others = usable
            if back_pids is not None and lesions.patient_ids is not None:  # another patient's brain
                others = usable[back_pids[usable] != str(lesions.patient_ids[n])]
            if not len(others):
                continue
            for k in rng.choice(others, min(tries, len(others)), replace=False):
                t0, t1, u0, u1 = dst_box[k]
                sr, sc = (r1 - r0) / (t1 - t0), (c1 - c0) / (u1 - u0)
                if not (0.8 <= sr <= 1.25 and 0.8 <= sc <= 1.25):
                    continue
                # output pixel (y, x) of the background reads the lesion slice at (r0 + (y - t0)·sr, c0 + (x - u0)·sc)
                matrix, offset = (sr, sc), (r0 - t0 * sr, c0 - u0 * sc)
                mapped = affine_transform(lesion, matrix, offset, order=0) > 0
                if not mapped.any() or (mapped & dst_brain[k]).sum() < min_inside * mapped.sum():
                    continue
                new = mapped & dst_brain[k]
                moved = affine_transform(image, matrix, offset, order=1) - level + np.median(dst[k][dst_core[k]])
                weight = np.maximum(new, gaussian_filter(new.astype(np.float32), 0.7)) * dst_brain[k]
                images.append(np.clip(dst[k] + weight * (moved - dst[k]), 0.0, 255.0))
                masks.append(new.astype(np.uint8))
                cases.append(f"paste:{lesions.case_ids[n]}:{backgrounds.case_ids[k]}")
                pids.append(str(back_pids[k]) if back_pids is not None else None)
                where.append(int(backgrounds.slice_indices[k]))
                break
    if not images:
        raise DataError("paste_lesions: no lesion fits inside the brain of any background slice")
    # one case id per pair even when one lesion lands twice on the same background
    cases = [f"{c}:{i}" if cases.count(c) > 1 else c for i, c in enumerate(cases)]
    return SliceDataset(images=(np.stack(images) / scale).astype(np.float32), masks=np.stack(masks),
                        case_ids=cases, patient_ids=pids if back_pids is not None else None,
                        slice_indices=np.array(where),
                        source_paths=[""] * len(images), unit="display", spacing=backgrounds.spacing,
                        slice_thickness=backgrounds.slice_thickness)


def _box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(first row, row end, first column, column end) of a 2-D mask's bounding box; None when it is empty."""
    if not mask.any():
        return None
    rows, cols = _bbox(mask)
    return rows.start, rows.stop, cols.start, cols.stop


def context_keys(k: int) -> list[str]:
    """The ``extra`` columns that hold the neighbours of :func:`attach_context`: ``slice-1``, ``slice+1``, ..."""
    return [f"slice{offset:+d}" for offset in (*range(-k, 0), *range(1, k + 1))]


_CONTEXT_COLUMNS = frozenset(context_keys(3))  # every neighbour column a recipe can ask for


def attach_context(data: SliceDataset, k: int = 1, source: SliceDataset | None = None) -> SliceDataset:
    """The dataset with its slices' neighbours in ``extra`` (``slice-1``, ``slice+1``, ...), for 2.5-D inputs.

    The neighbour ``d`` positions away is the slice of the same patient whose slice index differs
    by ``d``, looked up in ``source`` (default ``data`` itself: pass the whole scans when ``data``
    holds only some of their slices). Where there is none (the end of the scan, a slice without
    patient id or index, a slice not loaded) the slice stands in for its own neighbour. Columns
    already present are kept, so subsets of a dataset with context keep the neighbours they had.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        data: single-channel slices.
        k: neighbours on each side.
        source: where to look the neighbours up (same image size and unit).

    Returns:
        A new dataset; ``data`` is unchanged.
    """
    keys = context_keys(int(k))
    if all(key in data.extra for key in keys):
        return data
    if data.images.ndim != 3:
        raise DataError(f"context slices need single-channel slices; got images of shape {data.images.shape}")
    source = data if source is None else source
    if source.image_shape != data.image_shape:
        raise DataError(f"context source slices are {source.image_shape}, the slices {data.image_shape}")
    where = {}
    if source.patient_ids is not None:
        where = {(p, int(i)): n for n, (p, i) in enumerate(zip(source.patient_ids, source.slice_indices)) if i >= 0}
    pids = data.patient_ids or [None] * len(data)
    extra = dict(data.extra)
    for key in keys:
        offset = int(key[len("slice"):])
        planes = data.images.copy()
        for n, (p, i) in enumerate(zip(pids, data.slice_indices)):
            hit = where.get((p, int(i) + offset)) if p is not None and i >= 0 else None
            if hit is not None:
                planes[n] = source.images[hit]
        extra[key] = planes
    return data.replace(extra=extra)


def _model_inputs(recipe: FewShotRecipe, data: SliceDataset, band: dict[str, float] | None = None,
                  gate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs (N, S, S, C), masks (N, S, S) and dilated brain masks (N, S, S) for a recipe (see
    :func:`_inputs_and_core`)."""
    return _inputs_and_core(recipe, data, band, gate)[:3]


def _inputs_and_core(recipe: FewShotRecipe, data: SliceDataset, band: dict[str, float] | None = None,
                     gate: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Model inputs (N, S, S, C), masks (N, S, S), dilated brain masks (N, S, S) for a recipe, and the
    brain masks before dilation and gate, found on the display levels (None when the recipe finds none or works
    in HU).

    Channels: the image as the config's windows give it, then one contrast stretch per
    ``recipe.display_windows``, then (``candidate_channel``) the threshold-in-brain map of
    ``band``. With ``gate`` (and ``restrict_to_brain``) the brain masks of non-cranial slices
    (:func:`strokekit.preprocess.cranial_slices`) are empty: a whole scan is segmented.
    """
    config = recipe.config
    display = bool(recipe.display_windows or recipe.candidate_channel)
    if display:
        data = as_display(data)
    x, y = to_arrays(config, data)
    if recipe.context_slices:
        with_context = attach_context(data, recipe.context_slices)
        planes = [to_arrays(config, data.replace(images=with_context.extra[key]))[0]
                  for key in context_keys(recipe.context_slices)]
        x = np.concatenate([x, *planes], axis=-1)
    need_brain = recipe.strip_skull or recipe.restrict_to_brain or recipe.candidate_channel
    if need_brain:
        small = resize_dataset(data, config.image_size) if data.image_shape[:2] != x.shape[1:3] else data
        images = small.images if small.images.ndim == 3 else small.images[..., 0]
        core = brain_mask_stack(images, unit=small.unit)
        brains = dilate_cross(core, recipe.brain_dilation)
        if gate and recipe.restrict_to_brain:  # the gate measures on the display slices: reuse their masks
            native = small is data and data.unit == "display"
            brains = brains & cranial_slices(data, core if native else None)[:, None, None]
    else:
        brains, core = np.ones(x.shape[:3], dtype=bool), None
    extra = []
    if display:
        levels = x[..., 0] * 255.0
        for low, high in recipe.display_windows:
            extra.append(np.clip((levels - low) / (high - low), 0.0, 1.0))
        if recipe.candidate_channel:
            if band is None:
                raise ValueError("candidate_channel needs the band fitted by fit_recipe (band=None)")
            extra.append(threshold_in_brain(levels, core, unit="display", low=band["low"], high=band["high"],
                                            erosion=int(band["erosion"])).astype(np.float32))
    if extra:
        x = np.concatenate([x, np.stack(extra, axis=-1)], axis=-1)
    if recipe.strip_skull:
        x = x * brains[..., None]
    return x.astype(np.float32), y, brains, core if display else None


def _as_input_dataset(x: np.ndarray, y: np.ndarray) -> SliceDataset:
    # train() takes 4-D images as ready model inputs (its multi-channel path), so the recipe's
    # own preprocessing (channels, skull stripping, crops) reaches the network unchanged.
    return SliceDataset(images=x, masks=y, case_ids=[str(i) for i in range(len(x))], unit="display")


def _predict_prob(members: Sequence[Any], recipe: FewShotRecipe, x: np.ndarray, brains: np.ndarray,
                  batch_size: int = 32) -> np.ndarray:
    """Mean probability of the members (and of the mirrored slice with tta_flip)."""
    mirrored = np.ascontiguousarray(x[:, :, ::-1]) if recipe.tta_flip else None
    prob = np.zeros(x.shape[:3], dtype=np.float64)
    for model in members:  # eager predict_numpy: no prediction step traced for every model
        prob += predict_numpy(model, x, batch_size)[..., 0]
        if mirrored is not None:
            prob += predict_numpy(model, mirrored, batch_size)[..., 0][:, :, ::-1]
    prob /= len(members) * (2 if mirrored is not None else 1)
    if recipe.restrict_to_brain:
        prob = prob * brains
    return prob.astype(np.float32)


def _pp_dice(prob: np.ndarray, truth: np.ndarray, pids: Sequence[Any], threshold: float) -> float:
    return float(np.mean(per_patient_dice(slice_confusion(truth > 0, prob >= threshold), pids)[1]))


def threshold_scores(prob: np.ndarray, truth: np.ndarray, patient_ids: Sequence[Any],
                     thresholds: Sequence[float]) -> np.ndarray:
    """The per-patient Dice at each candidate threshold: the curve :func:`best_threshold` maximises.

    A curve that is the same at every candidate (``np.ptp(scores) == 0``; typically 0 everywhere,
    when a network finds no lesion pixel of the validation slices at any threshold) informs no
    choice: its "best" threshold is only the first candidate (:attr:`FittedRecipe.threshold_flat`).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        prob: probabilities (N, H, W).
        truth: true masks (N, H, W).
        patient_ids: patient of each slice.
        thresholds: candidates, in order.

    Returns:
        float array, one per-patient Dice per candidate.

    Raises:
        ValueError: no candidate.
    """
    if not len(thresholds):
        raise ValueError("thresholds must hold at least one candidate")
    return np.array([_pp_dice(prob, truth, patient_ids, float(t)) for t in thresholds])


def best_threshold(prob: np.ndarray, truth: np.ndarray, patient_ids: Sequence[Any],
                   thresholds: Sequence[float]) -> tuple[float, float]:
    """The candidate threshold with the highest per-patient Dice (ties: the first candidate).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        prob: probabilities (N, H, W).
        truth: true masks (N, H, W).
        patient_ids: patient of each slice.
        thresholds: candidates, tried in order.

    Returns:
        (threshold, its per-patient Dice).
    """
    scores = threshold_scores(prob, truth, patient_ids, thresholds)
    k = int(np.argmax(scores))
    return float(thresholds[k]), float(scores[k])


def _fit_band(recipe: FewShotRecipe, data: SliceDataset) -> dict[str, float]:
    """The threshold-in-brain band fitted on the lesion slices of the training data."""
    lesion = data.subset(np.flatnonzero(lesion_flags(data)))
    small = resize_dataset(lesion, recipe.config.image_size)
    pids = small.patient_ids if small.patient_ids is not None else None
    return fit_threshold(small.images, small.masks, unit=small.unit, patient_ids=pids)


def fit_recipe(
    recipe: FewShotRecipe,
    train_data: SliceDataset,
    val_data: SliceDataset,
    seed: int | None = None,
    progress: bool = False,
    model: Any = None,
    backgrounds: SliceDataset | None = None,
) -> FittedRecipe:
    """Train a recipe's network on few-shot data and make its decisions on the validation slices.

    Lesion-free slices in ``train_data`` are used at ``recipe.empty_ratio`` per lesion slice
    (a seeded draw); ``val_data`` should hold lesion slices of other patients (it picks the best
    epoch by validation loss and, with ``tune_threshold``, the threshold). Test patients must
    not appear in either.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        recipe: the :class:`FewShotRecipe`.
        train_data: training slices (display or HU, any size; resized to the config's).
        val_data: validation slices.
        seed: replaces ``recipe.config.seed`` (weights, sampling, augmentation).
        progress: a progress bar over epochs.
        model: a pre-built (e.g. pretrained) model instead of the recipe's.
        backgrounds: lesion-free slices of patients outside training, validation and test, for
            ``recipe.paste_per_slice`` (ignored without it).

    Returns:
        :class:`FittedRecipe`.

    Raises:
        DataError: no lesion slice to train on, empty validation data, or ``paste_per_slice`` without
            backgrounds.
    """
    config = recipe.config if seed is None else dataclasses.replace(recipe.config, seed=int(seed))
    recipe = dataclasses.replace(recipe, config=config)
    if not lesion_flags(train_data).any():
        raise DataError("fit_recipe: the training slices hold no lesion")
    if len(val_data) == 0:
        raise DataError("fit_recipe: no validation slices")
    if recipe.paste_per_slice and (backgrounds is None or len(backgrounds) == 0):
        raise DataError("fit_recipe: paste_per_slice needs lesion-free backgrounds (fit_recipe(..., backgrounds=))")
    if recipe.paste_per_slice and not (recipe.display_windows or recipe.candidate_channel) \
            and train_data.unit == "HU":
        raise ValueError("paste_per_slice pastes in display levels; a recipe that reads HU slices through its "
                         "config's windows needs display_windows or candidate_channel, or display-level data")
    if model is not None and recipe.n_models > 1:
        raise ValueError(f"a pre-built model trains one network; got n_models={recipe.n_models}")
    if recipe.context_slices:  # neighbours from the whole scans, before slices are drawn
        train_data = attach_context(train_data, recipe.context_slices)
        val_data = attach_context(val_data, recipe.context_slices)
    # the band depends on the lesion slices only, which every member trains on
    band = _fit_band(recipe, train_data) if recipe.candidate_channel else None
    val_inputs = _model_inputs(recipe, val_data, band)
    fits = [_fit_member(recipe, dataclasses.replace(config, seed=int(config.seed) + 1000 * k), train_data,
                        band, *val_inputs[:2], model, progress, backgrounds) for k in range(recipe.n_models)]
    results = [result for result, _ in fits]
    members = tuple(result.model for result in results)
    threshold, val_dice, flat = _decide(recipe, members, val_data, band, val_inputs)
    seconds = float(sum(r.seconds for r in results))
    rate = float(np.mean([r.images_per_second for r in results]))
    if recipe.patch_size:  # crops per second -> whole slices' worth of pixels per second
        rate *= (recipe.patch_size / config.image_size) ** 2
    return FittedRecipe(members[0], recipe, threshold, results[0].history, seconds, rate,
                        len(fits[0][1]), val_dice, band, members, threshold_flat=flat)


def _fit_member(recipe: FewShotRecipe, config: TrainConfig, train_data: SliceDataset, band: dict[str, float] | None,
                x_val: np.ndarray, y_val: np.ndarray, model: Any, progress: bool,
                backgrounds: SliceDataset | None = None):
    """One network of :func:`fit_recipe`, everything seeded by ``config.seed``: (TrainResult, slices used)."""
    from .models import build_model, build_preset

    chosen = _choose_slices(train_data, recipe.empty_ratio, config.seed)
    if recipe.paste_per_slice:  # synthetic lesion slices on other patients' brains, at the training slices' size
        shown = as_display(chosen)
        if backgrounds.image_shape[:2] != shown.image_shape[:2]:
            backgrounds = resize_dataset(backgrounds, shown.image_shape[0])
        pasted = paste_lesions(shown, backgrounds, recipe.paste_per_slice, seed=config.seed,
                               dilation=recipe.brain_dilation)
        chosen = concat([shown.replace(extra={}), pasted.replace(class_names=shown.class_names)])
    x_train, y_train, _ = _model_inputs(recipe, chosen, band)
    if model is None and (recipe.preset is not None or recipe.patch_size):
        seed_everything(config.seed)
        if recipe.preset is not None:
            model = build_preset(recipe.preset, input_shape=x_train.shape[1:], seed=config.seed)
        else:  # height and width left open: trained on crops, applied to whole slices
            kwargs = dict(config.model_kwargs(), input_shape=(None, None, x_train.shape[-1]))
            model = build_model(config.arch, **kwargs)
    fit_config, train_set, val_set = config, (x_train, y_train), (x_val, y_val)
    if recipe.patch_size:
        p = int(recipe.patch_size)
        fit_config = dataclasses.replace(config, image_size=p)
        train_set = sample_patches(x_train, y_train, p, recipe.patches_per_slice, recipe.foreground_fraction,
                                   seed=config.seed)
        val_set = tile_patches(x_val, y_val, p)
    result = train(fit_config, _as_input_dataset(*train_set), _as_input_dataset(*val_set), run_dir=False, model=model,
                   progress=progress, previews=False)
    if recipe.recalibrate_bn:
        recalibrate_batchnorm(result.model, x_train, config.batch_size)
    return result, chosen


#: Recipe fields that act after training (prediction and threshold), so changing them needs no
#: new training: see :func:`redecide`.
POSTHOC_FIELDS = ("restrict_to_brain", "brain_dilation", "tta_flip", "tune_threshold", "thresholds",
                  "stack_min_contrast", "stack_min_ml")


def redecide(fitted: FittedRecipe, val_data: SliceDataset, **changes: Any) -> FittedRecipe:
    """The same trained model with other after-training decisions (flips, brain restriction, threshold).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        fitted: from :func:`fit_recipe`.
        val_data: the validation slices (the threshold is chosen on them with ``tune_threshold``).
        **changes: new values of fields in :data:`POSTHOC_FIELDS`.

    Returns:
        A new :class:`FittedRecipe` sharing the model, with threshold, ``val_dice`` and
        ``threshold_flat`` recomputed.

    Raises:
        ValueError: a field that needs retraining (or no field of the recipe at all).
    """
    wrong = sorted(set(changes) - set(POSTHOC_FIELDS))
    if wrong:
        raise ValueError(f"Expected fields among {list(POSTHOC_FIELDS)}. Received: {wrong} (they need training)")
    recipe = dataclasses.replace(fitted.recipe, **changes)
    threshold, val_dice, flat = _decide(recipe, fitted.models, val_data, fitted.band)
    return dataclasses.replace(fitted, recipe=recipe, threshold=threshold, val_dice=val_dice, threshold_flat=flat)


def _decide(recipe: FewShotRecipe, members: Sequence[Any], val_data: SliceDataset, band: dict[str, float] | None,
            inputs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[float, float, bool]:
    """The threshold (chosen on the validation slices with ``tune_threshold``, else the config's), the
    validation per-patient Dice at it, and whether a tuned threshold met a flat validation curve
    (:attr:`FittedRecipe.threshold_flat`); ``inputs``: :func:`_model_inputs` of ``val_data`` if known."""
    x_val, y_val, brains = _model_inputs(recipe, val_data, band) if inputs is None else inputs
    prob = _predict_prob(members, recipe, x_val, brains)
    pids = val_data.patient_ids or ["val"] * len(val_data)
    if recipe.tune_threshold:
        scores = threshold_scores(prob, y_val, pids, recipe.thresholds)
        k = int(np.argmax(scores))
        return float(recipe.thresholds[k]), float(scores[k]), bool(np.ptp(scores) <= 1e-12)
    threshold = float(recipe.config.threshold)
    return threshold, _pp_dice(prob, y_val, pids, threshold), False


def predict_recipe(
    fitted: FittedRecipe,
    data: SliceDataset,
    probabilities: bool = False,
    output_size: int | None = None,
    batch_size: int = 32,
    floor: bool = True,
) -> np.ndarray:
    """Predict lesion masks with a fitted recipe (flips, brain restriction, threshold and brightness floor applied).

    With ``restrict_to_brain``, slices below the cranium (:func:`strokekit.preprocess.cranial_slices`: neck, face) get
    no lesion either, so a whole scan can be segmented, not only its brain slices.

    With ``floor`` and a recipe that sets ``stack_min_contrast`` or ``stack_min_ml``, the thresholded masks keep
    only the lesion components brighter than the brain around them (:func:`keep_bright_components`), found on
    each patient's slices in slice order (``data.patient_ids``, ``data.slice_indices``; all slices one scan
    when the patients are unknown) at the model's size, whatever ``output_size``: the floor's contrast is
    measured on the pixels the model saw, so the protocol's 128 px scoring and a whole scan at the model's size
    (:func:`strokekit.evaluation.whole_scans`) decide alike. (The app thresholds the probabilities itself and
    applies :func:`keep_bright_components` at the upload's size.) The probabilities (``probabilities=True``)
    are never floored.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        fitted: from :func:`fit_recipe`.
        data: slices to segment.
        probabilities: return probabilities instead of thresholded masks.
        output_size: resize the probabilities to this side (linear) before thresholding, e.g. to
            score a 256 px model on the protocol's 128 px masks; default the side of ``data``'s
            (square) masks, so the prediction lines up with them whatever size the model
            works at (the model's size for non-square slices).
        batch_size: prediction batch size.
        floor: apply the recipe's brightness floor to the masks (False: thresholded masks only).

    Returns:
        float32 probabilities or uint8 0/1 masks, (N, S, S).
    """
    if probabilities:
        return _predict_masks(fitted, data, output_size, batch_size, floor=False)[0]
    _, mask, floored = _predict_masks(fitted, data, output_size, batch_size, floor=floor)
    return (floored if floor else mask).astype(np.uint8)


def _predict_masks(fitted: FittedRecipe, data: SliceDataset, output_size: int | None = None, batch_size: int = 32,
                   floor: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One prediction of :func:`predict_recipe`: (probabilities, thresholded masks, masks after the floor or
    None without ``floor``), at ``output_size``; the floor reuses the brain masks the inputs were made with."""
    x, _, brains, core = _inputs_and_core(fitted.recipe, data, fitted.band, gate=True)
    prob = _predict_prob(fitted.models, fitted.recipe, x, brains, batch_size)
    model_prob = prob
    if output_size is None and data.masks.ndim == 3 and data.masks.shape[1] == data.masks.shape[2]:
        output_size = int(data.masks.shape[1])
    if output_size is not None and output_size != prob.shape[1]:
        prob = np.stack([resize_image(p, int(output_size)) for p in prob]) if len(prob) else prob
    mask = prob >= fitted.threshold
    if not floor:
        return prob, mask, None
    floored = mask.copy()
    if fitted.recipe.has_floor and mask.any():
        # the inputs' brain masks serve the floor where it finds its own on every pixel
        reuse = core if core is not None and _floor_stride(core.shape[1:]) == 1 else None
        kept = _floor_per_patient(fitted, data, model_prob >= fitted.threshold, reuse)
        if kept.shape[1:] != mask.shape[1:]:  # kept components at the model's size: any overlap keeps a pixel
            kept = np.stack([resize_image(k.astype(np.float32), mask.shape[1:]) for k in kept]) > 0
        floored &= kept
    return prob, mask, floored


def _floor_per_patient(fitted: FittedRecipe, data: SliceDataset, mask: np.ndarray,
                       brains: np.ndarray | None = None) -> np.ndarray:
    """:func:`keep_bright_components` on each patient's slices in slice order (bool, ``mask``'s shape);
    ``brains``: the slices' brain masks at ``mask``'s size, when the caller has them."""
    patients = np.asarray(data.patient_ids if data.patient_ids is not None else [""] * len(data)).astype(str)
    kept = np.zeros(mask.shape, dtype=bool)
    for patient in dict.fromkeys(patients):
        rows = np.flatnonzero(patients == patient)
        rows = rows[np.argsort(np.asarray(data.slice_indices)[rows], kind="stable")]
        if mask[rows].any():
            kept[rows] = keep_bright_components(fitted, data.subset(rows), mask[rows],
                                                brains=None if brains is None else brains[rows]) > 0
    return kept


def _floor_stride(shape: Sequence[int]) -> int:
    """The pixel stride at which :func:`keep_bright_components` finds brain masks: about 256 px, as the app."""
    return max(1, int(np.ceil(max(shape) / 256)))


def keep_bright_components(fitted_or_recipe: FittedRecipe | FewShotRecipe, data: SliceDataset,
                           mask: np.ndarray, brains: np.ndarray | None = None) -> np.ndarray:
    """A whole scan's mask with only the lesion components brighter than the brain around them.

    The recipe's ``stack_min_contrast`` and ``stack_min_ml`` applied by
    :func:`strokekit.recon3d.bright_components` to the slices in display levels (through
    :data:`strokekit.preprocess.DISPLAY_WINDOW`, as the recipe sees them) and their brain masks
    (:func:`strokekit.preprocess.brain_mask_stack`, found at about 256 px). Volumes use the slices'
    spacing and thickness, else CT-ICH's geometry (:data:`strokekit.recon3d.ASSUMED_FOV_MM`,
    :data:`strokekit.recon3d.ASSUMED_SLICE_MM`). Only for the slices of one patient in order (the app's
    uploads, a patient's whole stack or lesion slices; :func:`predict_recipe` groups a dataset by
    patient). Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        fitted_or_recipe: the recipe (or a fitted one) whose ``stack_*`` fields apply.
        data: the scan's slices, in order (HU or display).
        mask: (N, H, W) predicted lesion mask of ``data`` (nonzero = lesion).
        brains: the slices' brain masks at the mask's size, when the caller has them (else found here).

    Returns:
        uint8 (N, H, W) 0/1 mask; ``mask > 0`` unchanged when the recipe sets no floor.
    """
    from .recon3d import bright_components, voxel_ml

    recipe = getattr(fitted_or_recipe, "recipe", fitted_or_recipe)
    mask = np.asarray(mask) > 0
    if mask.ndim != 3 or len(mask) != len(data):
        raise ValueError(f"mask must be (N, H, W) for the {len(data)} slices, got shape {mask.shape}")
    if not recipe.has_floor or not mask.any():
        return mask.astype(np.uint8)
    images = as_display(data).images
    images = _levels(images[..., 0] if images.ndim == 4 else images, "display")  # 0..1 display: to 0..255
    spacing = data.spacing
    if images.shape[1:] != mask.shape[1:]:  # the mask at another size: same field of view, other pixels
        if spacing is not None:
            spacing = rescale_spacing(spacing, images.shape[1:], mask.shape[1:])
        images = np.stack([resize_image(im, mask.shape[1:]) for im in images])
    if brains is None or np.shape(brains) != mask.shape:
        brains = brain_mask_stack(images, unit="display", stride=_floor_stride(images.shape[1:]))
    return bright_components(mask, images, brains, recipe.stack_min_contrast, recipe.stack_min_ml,
                             voxel_ml(mask.shape[1:], spacing, data.slice_thickness))


def recipe_to_dict(recipe: FewShotRecipe) -> dict[str, Any]:
    """A JSON-ready dict of a recipe (its training config nested under ``config``)."""
    return to_dict(recipe)


def recipe_from_dict(data: dict[str, Any]) -> FewShotRecipe:
    """The recipe :func:`recipe_to_dict` wrote (unknown fields raise ValueError)."""
    fields = {f.name for f in dataclasses.fields(FewShotRecipe)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"unknown few-shot recipe fields {unknown}")
    values = dict(data)
    values["config"] = config_from_dict(values.get("config", {}))
    if "thresholds" in values:
        values["thresholds"] = tuple(float(t) for t in values["thresholds"])
    if "display_windows" in values:
        values["display_windows"] = tuple(tuple(float(v) for v in w) for w in values["display_windows"])
    return FewShotRecipe(**values)


def save_fitted(fitted: FittedRecipe, folder: str | os.PathLike, trained_on: str,
                scores: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a fitted few-shot recipe as a run folder the app and :func:`load_fitted` can apply.

    A :class:`strokekit.runs.RunFolder` of kind ``"fewshot"``: ``model.keras`` (and
    ``model_1.keras``... for more members), ``config.json`` (the network's training config),
    ``fewshot.json`` (kind ``"few-shot"``: the whole recipe, threshold,
    threshold-map band, what it was trained on, its scores) and ``metrics.json``
    (``dice`` = the validation per-patient Dice, plus ``scores``).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        fitted: a :class:`FittedRecipe` from :func:`fit_recipe`.
        folder: the run folder.
        trained_on: what the training data was, in words (shown by the app).
        scores: further figures to keep, e.g. ``{"test_per_patient_dice": 0.38, "test_data": "..."}``.
        overwrite: replace a folder that already holds a run.

    Returns:
        The folder (a Path).

    Raises:
        FileExistsError: the folder holds a run and ``overwrite`` is False.
    """
    run = RunFolder.create(folder, "fewshot", fitted.recipe.config, overwrite=overwrite)
    info = dict(kind="few-shot", recipe=to_dict(fitted.recipe), threshold=float(fitted.threshold),
                band=fitted.band, val_dice=float(fitted.val_dice), threshold_flat=bool(fitted.threshold_flat),
                n_train=int(fitted.n_train),
                seconds=float(fitted.seconds), members=len(fitted.models), trained_on=str(trained_on),
                scores=dict(scores or {}))
    run.write_json(FEWSHOT_FILE, info)  # before the models: a listed model always has its recipe
    for k, member in enumerate(fitted.models):
        run.save_model(member, member=k)
    run.write_metrics(dict(dice=float(fitted.val_dice), **(scores or {})),
                      data="the fit's validation slices (per-patient Dice)")
    return run.folder


def load_fitted(folder: str | os.PathLike) -> FittedRecipe:
    """A fitted recipe (:class:`FittedRecipe`) from a run folder written by
    :func:`save_fitted` (models in Keras safe mode).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Raises:
        DataError: the folder is not a few-shot run, or a file in it is damaged (a damaged
            ``fewshot.json`` is the error's ``path``).
    """
    info = _fewshot_info(folder)
    try:
        recipe = recipe_from_dict(info["recipe"])
        members = int(info.get("members", 1))
        threshold = float(info["threshold"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"damaged few-shot run description ({exc})", Path(folder) / FEWSHOT_FILE) from None
    run = RunFolder(folder, "fewshot", {})
    models = tuple(load_model(run.model_file(k)) for k in range(members))
    return FittedRecipe(models[0], recipe, threshold, None, float(info.get("seconds", 0.0)),
                        float("nan"), int(info.get("n_train", 0)), float(info.get("val_dice", float("nan"))),
                        info.get("band"), models, threshold_flat=bool(info.get("threshold_flat", False)))


def profile_recipe(profile=None) -> FewShotRecipe:
    """The few-shot recipe for real CT at a profile's budget.

    The full profile trains exactly :data:`FEWSHOT_DEFAULT` (256 px, 25 epochs; the smoke profile
    the same recipe at 64 px for its epochs). The quick profile
    keeps its recipe at 128 px (at 64 px the bleeds of 512 px CT shrink to a few pixels) for the
    profile's epochs and network, with the profile's short-run training levers (learning rate and
    schedule, batch-norm momentum, head bias): about half a minute on 2 CPU cores.

    Args:
        profile: a :class:`strokekit.config.Profile`, its name, or None for the current one.
    """
    if not isinstance(profile, Profile):
        profile = get_profile(profile)
    if profile.name == "full":
        return FEWSHOT_DEFAULT
    if profile.mode == "full":  # the smoke profile: the default's code path at a tiny size
        _, recipe = ablation_recipes(image_size=64, num_epochs=profile.num_epochs, filters=profile.filters[:4])[-1]
        return recipe
    size = max(128, profile.image_size)
    _, recipe = ablation_recipes(image_size=size, num_epochs=profile.num_epochs, filters=profile.filters)[-1]
    return dataclasses.replace(recipe, config=dataclasses.replace(
        recipe.config, learning_rate=profile.learning_rate, lr_schedule=profile.lr_schedule,
        bn_momentum=profile.bn_momentum, head_bias=profile.head_bias))


def ablation_recipes(
    image_size: int | None = None,
    num_epochs: int | None = None,
    filters: Sequence[int] | None = None,
    final: FewShotRecipe | None = None,
) -> list[tuple[str, FewShotRecipe]]:
    """The study's recipe turned into the kit's default one lever at a time (notebook 10's ablation).

    Step 0 is the study's configuration with the network built from the config (leaky ReLU,
    dropout 0.5, no batch norm, BCE, the study's augmentation, lesion slices only, whole
    slices, threshold 0.5); each later step changes one thing, and the last is ``final``
    (default :data:`FEWSHOT_DEFAULT`). Every step keeps the final recipe's filters, epochs and
    image size, so only the named lever differs between neighbours. At another image size the
    crops keep their share of the slice, but are never smaller than 32 px (a 64 px quick run of a
    256 px default trains on 32 px crops, not 16 px ones).

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        image_size: input side of every step (default the final recipe's).
        num_epochs: epochs of every step (default the final recipe's).
        filters: U-Net filters of every step (default the final recipe's).
        final: the recipe the ablation ends at.

    Returns:
        ``[(label, recipe), ...]`` in order, cumulative.
    """
    final = FEWSHOT_DEFAULT if final is None else final
    common = dict(
        image_size=int(image_size or final.config.image_size),
        num_epochs=int(num_epochs or final.config.num_epochs),
        filters=tuple(filters or final.config.filters),
    )
    common["early_stopping_patience"] = 0 if final.config.early_stopping_patience == 0 else common["num_epochs"]
    patch = final.patch_size
    if patch is not None:  # the same share of the slice at any image size, but at least 32 px of context
        patch = max(min(32, common["image_size"]), patch * common["image_size"] // final.config.image_size)
    end = dataclasses.replace(final, patch_size=patch, config=dataclasses.replace(final.config, **common))
    study = FewShotRecipe(config=dataclasses.replace(
        STUDY_RECIPE.config, **common, batch_size=end.config.batch_size), recalibrate_bn=False)
    steps = [("0 study: leaky ReLU, dropout, BCE, study augmentation", study)]

    def step(label: str, recipe: FewShotRecipe, **config_changes: Any) -> FewShotRecipe:
        if config_changes:
            recipe = dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, **config_changes))
        steps.append((f"{len(steps)} {label}", recipe))
        return recipe

    cur = step("+ Dice+BCE loss, batch norm, ReLU, no dropout", study, loss=end.config.loss,
               batch_norm=end.config.batch_norm, activation=end.config.activation, dropout=end.config.dropout)
    cur = step("+ lesion-free slices", dataclasses.replace(cur, empty_ratio=end.empty_ratio))
    cur = step("+ crops, strong augmentation, BN recalibration",
               dataclasses.replace(cur, patch_size=end.patch_size, patches_per_slice=end.patches_per_slice,
                                   foreground_fraction=end.foreground_fraction,
                                   recalibrate_bn=end.recalibrate_bn),
               augment=end.config.augment)
    cur = step("+ blood window and threshold-map channels",
               dataclasses.replace(cur, display_windows=end.display_windows,
                                   candidate_channel=end.candidate_channel))
    if end.has_floor:
        step("+ brain restriction, flips, threshold from validation",
             dataclasses.replace(end, stack_min_contrast=None, stack_min_ml=0.0))
        step("+ brightness floor per patient (the default)", end)
    else:
        step("+ brain restriction, flips, threshold from validation (the default)", end)
    return steps


def needs_training(before: FewShotRecipe, after: FewShotRecipe) -> bool:
    """Whether ``after`` differs from ``before`` in anything but :data:`POSTHOC_FIELDS`.

    False: ``after`` is ``before``'s trained model with other after-training decisions
    (:func:`redecide`), as in the last steps of :func:`ablation_recipes`.
    """
    return dataclasses.replace(after, **{f: getattr(before, f) for f in POSTHOC_FIELDS}) != before
