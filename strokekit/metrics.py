"""Segmentation metrics: overlap, surface distance, lesion detection, multiclass, aggregation.

Introduced in notebooks/06_evaluation.ipynb.

Masks are binary arrays of any shape (bool, 0/1 or 0/255 integers; any label > 0 counts as
foreground). Float arrays are treated as probabilities and thresholded with ``>= threshold``
(0.5 unless a function takes a ``threshold`` argument), so a model's sigmoid output can be
passed as it is.

Empty-case convention (one rule, used by every function here)
-------------------------------------------------------------
A ratio whose denominator is zero is *undefined* and returns ``NaN``, except for the two
agreement scores, which compare the masks as a whole:

=====================  =======================  ========================  ====================
metric                 truth and pred empty     truth empty, pred not      pred empty, truth not
=====================  =======================  ========================  ====================
Dice, IoU              1.0 (perfect agreement)  0.0                       0.0
sensitivity (recall)   NaN (nothing to find)    NaN                       0.0
precision              NaN (nothing claimed)    0.0                       NaN
specificity            tn / (tn + fp); NaN only when the mask has no background at all
HD95, ASSD, Hausdorff  0.0                      inf                       inf
relative volume diff.  NaN (truth volume is 0)  NaN                       -1.0
lesion F1              1.0                      0.0                       0.0
=====================  =======================  ========================  ====================

Why: Dice and IoU measure agreement, and two empty masks agree perfectly. Sensitivity is
"of the lesion pixels, how many were found" — on a lesion-free slice there is nothing to ask,
so it is NaN, not 1 (a 1 would reward every empty slice) and not 0 (a 0 would punish a
correct empty prediction). The distance from a point to an empty surface is the infimum over
an empty set, +inf: a model that misses the whole lesion is infinitely wrong, which a mean
must show rather than hide. Use medians (or :func:`summarize`) for distances.

Aggregations never silently average NaN: :func:`summarize`, :func:`aggregate`,
:func:`strokekit.evaluation.bootstrap_ci` and :func:`strokekit.evaluation.paired_comparison`
skip NaN *explicitly* and report how many values they skipped; :func:`summarize` also counts
infinite distances (which it keeps: their mean is inf, their median is still informative).

Never compare a Dice computed one way with a Dice computed another: a Dice pooled over all
pixels, a mean over slices (where every lesion-free slice with an empty prediction adds a 1.0),
and a mean over patients can differ by tens of points on the same predictions — see
:func:`aggregate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "METRICS",
    "aggregate",
    "as_binary",
    "average_surface_distance",
    "confusion",
    "dice",
    "dice_wrong_formula",
    "hausdorff95",
    "hausdorff_distance",
    "iou",
    "lesion_detection",
    "metrics_from_counts",
    "per_class_metrics",
    "per_patient_counts",
    "per_patient_dice",
    "per_patient_metrics",
    "precision",
    "segmentation_report",
    "sensitivity",
    "slice_confusion",
    "specificity",
    "summarize",
    "surface_distances",
    "volume",
    "volume_difference",
    "voxel_volume_ml",
]

#: Overlap metrics computed from confusion counts, in report column order.
METRICS = ("dice", "iou", "sensitivity", "specificity", "precision")


# --------------------------------------------------------------------------- basics
def as_binary(mask: Any, threshold: float = 0.5) -> np.ndarray:
    """A boolean foreground mask from a bool, integer-label or probability array.

    Args:
        mask: bool array (returned as is), integer array (label > 0 is foreground) or float
            array of probabilities (``>= threshold`` is foreground).
        threshold: cut-off for float arrays.

    Returns:
        bool array of the same shape.

    Raises:
        ValueError: for non-numeric input.
    """
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr > 0
    if np.issubdtype(arr.dtype, np.floating):
        # Compare in the array's own precision so that sweeps and reports agree exactly.
        return arr >= np.asarray(threshold, dtype=arr.dtype)
    raise ValueError(f"expected a bool, integer or float mask, got dtype {arr.dtype}")


def _pair(truth: Any, pred: Any, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    t = as_binary(truth, threshold)
    p = as_binary(pred, threshold)
    if p.ndim == t.ndim + 1 and p.shape[-1] == 1:
        p = p[..., 0]  # a Keras sigmoid output (N, H, W, 1)
    if t.shape != p.shape:
        raise ValueError(
            f"truth shape {t.shape} and pred shape {p.shape} differ; "
            "expected masks of the same shape"
        )
    return t, p


def confusion(truth: Any, pred: Any) -> tuple[int, int, int, int]:
    """Pixel (voxel) confusion counts of two binary masks of any shape.

    Args:
        truth: reference mask.
        pred: predicted mask (floats are thresholded at 0.5).

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints.

    Raises:
        ValueError: if the shapes differ.
    """
    t, p = _pair(truth, pred)
    tp = int(np.count_nonzero(t & p))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = int(t.size) - tp - fp - fn
    return tp, fp, fn, tn


def slice_confusion(truth: Any, pred: Any, threshold: float = 0.5) -> np.ndarray:
    """Confusion counts of each slice of a stack.

    Args:
        truth: masks (N, ...) .
        pred: masks or probabilities (N, ...) or (N, H, W, 1).
        threshold: cut-off for float predictions.

    Returns:
        int64 array (N, 4) with columns tp, fp, fn, tn.
    """
    t, p = _pair(truth, pred, threshold)
    if t.ndim < 2:
        raise ValueError(f"expected a stack (N, ...) of masks, got shape {t.shape}")
    t = t.reshape(len(t), -1)
    p = p.reshape(len(p), -1)
    tp = np.count_nonzero(t & p, axis=1)
    fp = np.count_nonzero(p, axis=1) - tp
    fn = np.count_nonzero(t, axis=1) - tp
    tn = t.shape[1] - tp - fp - fn
    return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)


def _ratio(num: np.ndarray, den: np.ndarray, when_zero: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, when_zero, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metrics_from_counts(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, Any]:
    """Dice, IoU, sensitivity, specificity and precision from confusion counts.

    The single place where the module's empty-case convention is applied. Works on scalars
    or arrays of counts (one per slice, per patient...).

    Args:
        tp: true-positive count(s).
        fp: false-positive count(s).
        fn: false-negative count(s).
        tn: true-negative count(s).

    Returns:
        dict metric → float (scalar input) or float64 array.
    """
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "iou": _ratio(tp, tp + fp + fn, 1.0),
        "sensitivity": _ratio(tp, tp + fn, np.nan),
        "specificity": _ratio(tn, tn + fp, np.nan),
        "precision": _ratio(tp, tp + fp, np.nan),
    }
    if tp.ndim == 0:
        return {k: float(v) for k, v in out.items()}
    return out


def per_patient_counts(counts: np.ndarray, patient_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(patients sorted by id, each one's summed confusion counts (P, 4)) from per-slice counts
    (:func:`slice_confusion`), so that every patient's pixels are pooled; ids are compared as strings."""
    uniq, inverse = np.unique(np.asarray(patient_ids, dtype=object).astype(str), return_inverse=True)
    per = np.zeros((len(uniq), 4), dtype=np.int64)
    np.add.at(per, inverse, counts)
    return uniq, per


def per_patient_dice(counts: np.ndarray, patient_ids: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(patients sorted by id, the Dice of each one's pooled pixels) from per-slice confusion counts
    (:func:`slice_confusion`); ids are compared as strings."""
    uniq, per = per_patient_counts(counts, patient_ids)
    return uniq, metrics_from_counts(*per.T)["dice"]


def dice(truth: Any, pred: Any) -> float:
    """Dice = 2·tp / (2·tp + fp + fn); 1.0 when both masks are empty.

    Args:
        truth: reference mask, any shape.
        pred: predicted mask of the same shape (floats are thresholded at 0.5).

    Returns:
        the Dice coefficient in 0..1.

    Raises:
        ValueError: if the shapes differ.
    """
    return metrics_from_counts(*confusion(truth, pred))["dice"]


def iou(truth: Any, pred: Any) -> float:
    """IoU (Jaccard) = tp / (tp + fp + fn) in 0..1; 1.0 when both masks are empty.

    On one case IoU is a fixed function of Dice: IoU = Dice / (2 − Dice).
    Arguments and errors as :func:`dice`.
    """
    return metrics_from_counts(*confusion(truth, pred))["iou"]


def sensitivity(truth: Any, pred: Any) -> float:
    """Sensitivity (recall) = tp / (tp + fn) in 0..1; NaN when the truth is empty. Arguments as :func:`dice`."""
    return metrics_from_counts(*confusion(truth, pred))["sensitivity"]


def specificity(truth: Any, pred: Any) -> float:
    """Specificity = tn / (tn + fp) in 0..1; NaN only when there is no background.

    On CT slices nearly every pixel is background, so specificity is ≈ 1 for any sensible
    model and says little (see :func:`strokekit.evaluation.specificity_illusion`).
    Arguments and errors as :func:`dice`.
    """
    return metrics_from_counts(*confusion(truth, pred))["specificity"]


def precision(truth: Any, pred: Any) -> float:
    """Precision (positive predictive value) = tp / (tp + fp) in 0..1; NaN for an empty prediction.

    Precision is to false positives what sensitivity is to false negatives. Arguments as :func:`dice`.
    """
    return metrics_from_counts(*confusion(truth, pred))["precision"]


def dice_wrong_formula(truth: Any, pred: Any) -> float:
    """The WRONG "Dice" tp / (2·tp + fn + fp) printed in one study — a teaching contrast only.

    It is not Dice: it can never exceed 0.5 (a perfect prediction scores 0.5) and is not
    comparable with anything. The correct formula is :func:`dice` = 2·tp / (2·tp + fp + fn).

    Args:
        truth: reference mask.
        pred: predicted mask of the same shape.

    Returns:
        tp / (2·tp + fn + fp), at most 0.5; 0.0 when both masks are empty.
    """
    tp, fp, fn, _ = confusion(truth, pred)
    den = 2 * tp + fn + fp
    return float(tp / den) if den else 0.0


# --------------------------------------------------------------------------- volumes
def voxel_volume_ml(spacing: Sequence[float], slice_thickness: float | None = None) -> float:
    """Volume of one voxel in millilitres (1 mL = 1000 mm³).

    Args:
        spacing: voxel size in mm, e.g. (row, col) or (dz, dy, dx).
        slice_thickness: extra factor in mm for a 2-D pixel spacing (distance between slices).

    Returns:
        the voxel volume in mL.

    Raises:
        ValueError: for a spacing value that is not positive.
    """
    vals = [float(s) for s in spacing] + (
        [] if slice_thickness is None else [float(slice_thickness)]
    )
    if not vals or any(v <= 0 for v in vals):
        raise ValueError(f"spacing values must be positive, got {tuple(vals)}")
    return float(np.prod(vals)) / 1000.0


def volume(mask: Any, voxel_volume_ml: float | None = None) -> float:
    """Foreground volume: voxel count, or mL when the volume of one voxel is given.

    Args:
        mask: binary mask, any shape.
        voxel_volume_ml: volume of one voxel in mL (see :func:`voxel_volume_ml`).

    Returns:
        the volume in voxels or mL.
    """
    n = float(np.count_nonzero(as_binary(mask)))
    return n if voxel_volume_ml is None else n * float(voxel_volume_ml)


def volume_difference(
    truth: Any, pred: Any, voxel_volume_ml: float | None = None, relative: bool = False
) -> float:
    """Signed volume error, predicted minus true (positive = over-segmentation).

    Args:
        truth: reference mask.
        pred: predicted mask.
        voxel_volume_ml: volume of one voxel in mL (see :func:`voxel_volume_ml`); without it
            the absolute difference is in voxels (pixels).
        relative: return (pred − truth) / truth instead, a unit-free fraction; NaN when the
            truth is empty (undefined).

    Returns:
        the difference as a float. Take ``abs()`` for the absolute volume error.
    """
    t, p = _pair(truth, pred)
    vt, vp = float(np.count_nonzero(t)), float(np.count_nonzero(p))
    if relative:
        return (vp - vt) / vt if vt > 0 else float("nan")
    diff = vp - vt
    return diff if voxel_volume_ml is None else diff * float(voxel_volume_ml)


# --------------------------------------------------------------------------- surface distances
def _spacing_for(ndim: int, spacing: Sequence[float] | float | None) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        spacing = (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(
            f"spacing {spacing} has {len(spacing)} values for {ndim}-D masks; "
            "expected one per axis "
            "((row, col) in 2-D, (dz, dy, dx) in 3-D)"
        )
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing values must be positive, got {spacing}")
    return spacing


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    # A foreground voxel with a face-neighbour in the background (or on the array edge,
    # since erosion pads with background) lies on the surface.
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(
    truth: Any, pred: Any, spacing: Sequence[float] | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of one mask to the nearest surface voxel of the other.

    Uses ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)`` so anisotropic voxels
    (e.g. 0.5 × 0.5 mm pixels, 5 mm slices) give distances in mm.

    Args:
        truth: reference mask, 2-D or 3-D.
        pred: predicted mask of the same shape.
        spacing: voxel size per axis in mm ((row, col) or (dz, dy, dx)); None = 1 (pixels).

    Returns:
        ``(truth_to_pred, pred_to_truth)`` float64 arrays. Both are empty when both masks are
        empty; when only one mask is empty the other's distances are all +inf.
    """
    t, p = _pair(truth, pred)
    sp = _spacing_for(t.ndim, spacing)
    if not t.any() and not p.any():
        return np.zeros(0), np.zeros(0)
    if not t.any() or not p.any():
        st, spd = _surface(t), _surface(p)
        return np.full(int(st.sum()), np.inf), np.full(int(spd.sum()), np.inf)
    # Crop to the bounding box of both masks: every surface voxel lies inside it, so the
    # distance transform there is exact and far cheaper than on a 512 × 512 slice.
    box = _bbox(t | p)
    t, p = t[box], p[box]
    st, spd = _surface(t), _surface(p)
    dist_to_p = ndimage.distance_transform_edt(~spd, sampling=sp)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=sp)
    return dist_to_p[st].astype(np.float64), dist_to_t[spd].astype(np.float64)


def hausdorff_distance(
    truth: Any, pred: Any, spacing: Sequence[float] | float | None = None, percentile: float = 100.0
) -> float:
    """Symmetric (percentile) Hausdorff distance between two mask surfaces.

    The distances of both directions are pooled and the given percentile taken (as MedPy's
    ``hd95`` does); ``percentile=100`` is the classical Hausdorff distance (the maximum).

    Args:
        truth: reference mask, 2-D or 3-D.
        pred: predicted mask.
        spacing: voxel size per axis in mm; None = pixels.
        percentile: 0..100.

    Returns:
        distance in mm (or pixels); 0.0 when both masks are empty, inf when one is.
    """
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must lie in 0..100, got {percentile}")
    a, b = surface_distances(truth, pred, spacing)
    d = np.concatenate([a, b])
    if d.size == 0:
        return 0.0
    if np.isinf(d).any():
        return float("inf")
    return float(np.percentile(d, percentile))


def hausdorff95(truth: Any, pred: Any, spacing: Sequence[float] | float | None = None) -> float:
    """95th-percentile Hausdorff distance (HD95): robust to a few outlying surface voxels.

    Args:
        truth: reference mask, 2-D or 3-D.
        pred: predicted mask.
        spacing: (row, col) or (dz, dy, dx) in mm; None = pixels.

    Returns:
        HD95 in mm (or pixels); 0.0 when both masks are empty, inf when exactly one is.
    """
    return hausdorff_distance(truth, pred, spacing, percentile=95.0)


def average_surface_distance(
    truth: Any, pred: Any, spacing: Sequence[float] | float | None = None
) -> float:
    """Average symmetric surface distance (ASSD).

    The mean of all surface distances of both directions together (Heimann et al. 2009):
    (Σ d(a, P) + Σ d(b, T)) / (|∂T| + |∂P|). Arguments as :func:`hausdorff95`.

    Returns:
        ASSD in mm (or pixels); 0.0 when both masks are empty, inf when exactly one is.
    """
    a, b = surface_distances(truth, pred, spacing)
    d = np.concatenate([a, b])
    if d.size == 0:
        return 0.0
    return float(d.mean())


# --------------------------------------------------------------------------- lesions
_CONNECTIVITY = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


def _structure(ndim: int, connectivity: int | None, per_slice: bool) -> np.ndarray:
    plane_ndim = ndim - 1 if per_slice else ndim
    if plane_ndim not in _CONNECTIVITY:
        raise ValueError(
            "lesion detection needs 2-D or 3-D masks "
            "(or a stack of 2-D slices with per_slice=True), "
            f"got {ndim}-D"
        )
    options = _CONNECTIVITY[plane_ndim]
    if connectivity is None:
        rank = plane_ndim  # full connectivity: 8 in 2-D, 26 in 3-D
    elif connectivity in options:
        rank = options[connectivity]
    else:
        raise ValueError(
            f"Expected one of {sorted(options)}. Received: connectivity={connectivity!r}"
        )
    structure = ndimage.generate_binary_structure(plane_ndim, rank)
    if per_slice:
        # No links along the slice axis: each slice's components stay separate.
        full = np.zeros((3,) + structure.shape, dtype=bool)
        full[1] = structure
        structure = full
    return structure


def lesion_detection(
    truth: Any,
    pred: Any,
    min_overlap: float = 0.0,
    connectivity: int | None = None,
    per_slice: bool = False,
) -> dict[str, Any]:
    """Lesion-wise detection counts from connected components.

    A true lesion (connected component of the truth) is *detected* when the prediction covers
    at least one of its voxels and at least ``min_overlap`` of them. A predicted component is
    a *false-positive lesion* when the truth covers none of its voxels, or less than
    ``min_overlap`` of them. Lesion precision = matched predicted components / predicted
    components; recall = detected lesions / true lesions; F1 their harmonic mean.

    Args:
        truth: reference mask, 2-D or 3-D, or a stack (N, H, W) with ``per_slice=True``.
        pred: predicted mask of the same shape.
        min_overlap: fraction 0..1 of a component that must be covered; 0 = any overlap.
        connectivity: 4 or 8 in 2-D, 6, 18 or 26 in 3-D; None = full (8 / 26), so
            diagonal neighbours belong to the same lesion.
        per_slice: treat axis 0 as independent slices (a stack of non-adjacent 2-D slices).

    Returns:
        dict with ``n_true_lesions``, ``n_pred_lesions``, ``tp_lesions`` (detected true
        lesions), ``fn_lesions`` (missed), ``fp_lesions`` (unmatched predicted components),
        ``matched_pred_lesions``, ``lesion_precision`` (NaN without predicted lesions),
        ``lesion_recall`` (NaN without true lesions) and ``lesion_f1`` (1.0 when there are
        neither true nor predicted lesions, 0.0 when only one side has any).
    """
    if not 0.0 <= min_overlap <= 1.0:
        raise ValueError(f"min_overlap must lie in 0..1, got {min_overlap}")
    t, p = _pair(truth, pred)
    structure = _structure(t.ndim, connectivity, per_slice)
    if t.any() or p.any():
        # Labelling a whole 3-D volume is slow; no component lies outside the joint bounding box.
        box = _bbox(t | p)
        t, p = t[box], p[box]
    lt, nt = ndimage.label(t, structure=structure)
    lp, npred = ndimage.label(p, structure=structure)

    def covered(labels: np.ndarray, n: int, other: np.ndarray) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype=bool)
        size = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        hit = np.bincount(labels[other].ravel(), minlength=n + 1)[1:]
        return (hit > 0) & (hit >= min_overlap * size)

    det = covered(lt, nt, p)
    match = covered(lp, npred, t)
    tp, matched = int(det.sum()), int(match.sum())
    recall = tp / nt if nt else float("nan")
    prec = matched / npred if npred else float("nan")
    if nt == 0 and npred == 0:
        f1 = 1.0
    elif nt == 0 or npred == 0:
        f1 = 0.0
    else:
        f1 = 2 * prec * recall / (prec + recall) if prec + recall > 0 else 0.0
    return {
        "n_true_lesions": int(nt),
        "n_pred_lesions": int(npred),
        "tp_lesions": tp,
        "fn_lesions": int(nt) - tp,
        "fp_lesions": int(npred) - matched,
        "matched_pred_lesions": matched,
        "lesion_precision": float(prec),
        "lesion_recall": float(recall),
        "lesion_f1": float(f1),
    }


# --------------------------------------------------------------------------- multiclass
def per_class_metrics(
    truth_labels: Any,
    pred_labels: Any,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    include_background: bool = False,
):
    """Per-class overlap metrics for integer label maps, pooled over all pixels given.

    Background (label 0) is excluded by default: on CT it covers > 99 % of the pixels, so its
    Dice is ≈ 1 and a "mean Dice over classes" that includes it (the 0.99 some studies report)
    says almost nothing about the lesions.

    Args:
        truth_labels: integer labels, any shape.
        pred_labels: integer labels of the same shape (e.g. ``argmax`` of a softmax output).
        num_classes: number of labels including background.
        class_names: a name per label; defaults to ``class_0``, ``class_1``...
        include_background: add a row for label 0.

    Returns:
        pandas DataFrame, one row per class: ``label``, ``class_name``, ``truth_pixels``,
        ``pred_pixels``, ``tp``, ``fp``, ``fn``, ``tn`` and the metrics of :data:`METRICS`.

    Raises:
        ValueError: for shapes that differ, labels outside 0..num_classes-1 or a wrong
            number of class names.
    """
    import pandas as pd

    t = np.asarray(truth_labels)
    p = np.asarray(pred_labels)
    if t.shape != p.shape:
        raise ValueError(
            f"truth shape {t.shape} and pred shape {p.shape} differ; expected the same shape"
        )
    for name, arr in (("truth_labels", t), ("pred_labels", p)):
        if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
            raise ValueError(
                f"{name} must hold integer labels, got dtype {arr.dtype} "
                "(argmax probabilities first)"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} holds labels {int(arr.min())}..{int(arr.max())}; "
                f"expected 0..{num_classes - 1}"
            )
    if class_names is None:
        class_names = [f"class_{k}" for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
    # One pass: the confusion matrix of (truth, pred) label pairs.
    cm = np.bincount(
        t.ravel().astype(np.int64) * num_classes + p.ravel().astype(np.int64),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes)
    total = int(cm.sum())
    rows = []
    for k in range(0 if include_background else 1, num_classes):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        tn = total - tp - fp - fn
        row = {
            "label": k,
            "class_name": class_names[k],
            "truth_pixels": tp + fn,
            "pred_pixels": tp + fp,
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
        }
        row.update(metrics_from_counts(tp, fp, fn, tn))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- aggregation
def summarize(values: Any) -> dict[str, float | int]:
    """Mean, spread and counts of a metric, skipping NaN explicitly.

    Args:
        values: metric values (one per slice, patient...).

    Returns:
        dict with ``mean``, ``std`` (ddof=1), ``median``, ``q25``, ``q75`` over the non-NaN
        values, ``n`` (values used), ``n_skipped_nan`` and ``n_inf`` (infinite distances are
        kept: the mean becomes inf, the median stays informative).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    nan = np.isnan(v)
    used = v[~nan]
    out: dict[str, float | int] = {
        "n": int(used.size),
        "n_skipped_nan": int(nan.sum()),
        "n_inf": int(np.isinf(used).sum()),
    }
    if used.size == 0:
        out.update(
            mean=float("nan"),
            std=float("nan"),
            median=float("nan"),
            q25=float("nan"),
            q75=float("nan"),
        )
        return out
    with np.errstate(invalid="ignore"):
        out["mean"] = float(np.mean(used))
        out["std"] = float(np.std(used, ddof=1)) if used.size > 1 else float("nan")
    q25, med, q75 = (_percentile_with_inf(used, q) for q in (25, 50, 75))
    out.update(median=med, q25=q25, q75=q75)
    return out


def _percentile_with_inf(values: np.ndarray, q: float) -> float:
    # np.percentile interpolates inf - x into NaN; do the linear interpolation by hand so a
    # quartile that falls between finite values stays finite and one touching inf is inf.
    s = np.sort(values)
    h = (s.size - 1) * q / 100.0
    lo, hi = int(np.floor(h)), int(np.ceil(h))
    frac = h - lo
    if frac == 0 or s[lo] == s[hi]:
        return float(s[lo])
    if np.isinf(s[hi]) or np.isinf(s[lo]):
        return float(s[hi]) if np.isinf(s[hi]) else float(s[lo])
    return float(s[lo] + frac * (s[hi] - s[lo]))


def _ids(
    ids: Sequence[Any] | None, n: int, what: str, default: str | None = None
) -> list[str] | None:
    if ids is None:
        return None if default is None else [f"{default}{i}" for i in range(n)]
    ids = [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} {what} for {n} slices; expected one per slice")
    return ids


def _progress(iterable, progress: bool, desc: str, total: int | None = None):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def segmentation_report(
    truth: Any,
    pred: Any,
    case_ids: Sequence[Any] | None = None,
    patient_ids: Sequence[Any] | None = None,
    spacing: Sequence[float] | None = None,
    slice_thickness: float | None = None,
    threshold: float = 0.5,
    surface: bool = True,
    progress: bool = True,
):
    """A tidy table with one row per slice and one column per metric.

    Foreground = any label > 0 (use :func:`per_class_metrics` for class-wise numbers).

    Args:
        truth: masks (N, H, W).
        pred: predicted masks or probabilities (N, H, W) or (N, H, W, 1); floats are
            thresholded at ``threshold``.
        case_ids: id of each slice; defaults to ``"0"``, ``"1"``...
        patient_ids: patient of each slice, or None.
        spacing: pixel size (row, col) in mm; distances are then in mm, else in pixels.
        slice_thickness: slice thickness in mm; with ``spacing`` volumes are in mL, else in pixels.
        threshold: probability cut-off.
        surface: compute HD95 and ASSD (the slow part; about a millisecond per lesion slice).
        progress: show a progress bar over the slices.

    Returns:
        pandas DataFrame with columns ``case_id``, ``patient_id``, ``tp``, ``fp``, ``fn``,
        ``tn``, ``truth_pixels``, ``pred_pixels``, ``dice``, ``iou``, ``sensitivity``,
        ``specificity``, ``precision``, ``volume_difference`` and, with ``surface``,
        ``hd95`` and ``assd``. ``df.attrs`` records ``distance_unit``, ``volume_unit``,
        ``threshold`` and the empty-case convention.
    """
    import pandas as pd

    t, p = _pair(truth, pred, threshold)
    if t.ndim != 3:
        raise ValueError(f"expected a stack of 2-D masks (N, H, W), got shape {t.shape}")
    n = len(t)
    case_ids = _ids(case_ids, n, "case ids", default="")
    patient_ids = _ids(patient_ids, n, "patient ids")
    counts = slice_confusion(t, p)
    tp, fp, fn, tn = counts.T
    table: dict[str, Any] = {
        "case_id": case_ids,
        "patient_id": patient_ids if patient_ids is not None else [None] * n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "truth_pixels": tp + fn,
        "pred_pixels": tp + fp,
    }
    table.update(metrics_from_counts(tp, fp, fn, tn))
    vol = (
        None
        if spacing is None or slice_thickness is None
        else voxel_volume_ml(spacing, slice_thickness)
    )
    table["volume_difference"] = (fp - fn).astype(np.float64) * (1.0 if vol is None else vol)
    if surface:
        sp = None if spacing is None else _spacing_for(2, spacing)
        hd = np.zeros(n)
        asd = np.zeros(n)
        for i in _progress(range(n), progress, "surface distances"):
            if tp[i] + fp[i] + fn[i] == 0:
                continue  # both empty: 0.0 by convention, no work
            a, b = surface_distances(t[i], p[i], sp)
            d = np.concatenate([a, b])
            hd[i] = np.inf if np.isinf(d).any() else np.percentile(d, 95)
            asd[i] = d.mean()
        table["hd95"] = hd
        table["assd"] = asd
    df = pd.DataFrame(table)
    df.attrs.update(
        distance_unit="pixels" if spacing is None else "mm",
        volume_unit="pixels" if vol is None else "mL",
        threshold=float(threshold),
        empty_convention=(
            "Dice/IoU 1 if both empty; sensitivity/precision NaN if undefined; "
            "HD95/ASSD inf if one mask empty"
        ),
    )
    return df


def _nanmean(values: np.ndarray) -> tuple[float, int]:
    v = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(v)
    return (float(v[keep].mean()) if keep.any() else float("nan")), int((~keep).sum())


def aggregate(
    truth: Any,
    pred: Any,
    patient_ids: Sequence[Any] | None = None,
    threshold: float = 0.5,
    metrics: Sequence[str] = METRICS,
):
    """The same predictions summarised at four levels, side by side.

    * ``pooled``: all pixels of all slices counted together, then the metric (a "global" or
      "micro" Dice; large lesions dominate).
    * ``mean_of_slices``: the metric per slice, then the mean over slices (NaN skipped).
      Every lesion-free slice with an empty prediction adds a Dice of 1.0.
    * ``mean_of_lesion_slices``: the same over slices whose truth contains a lesion only.
    * ``mean_of_patients``: each patient's pixels pooled, the metric per patient, then the
      mean over patients (NaN skipped) — every patient weighs the same.

    Args:
        truth: masks (N, H, W).
        pred: predicted masks or probabilities of the same shape.
        patient_ids: patient of each slice; without them the patient columns are left out.
        threshold: probability cut-off for float predictions.
        metrics: names from :data:`METRICS`.

    Returns:
        pandas DataFrame indexed by metric with one column per level and, per level, the
        number of NaN values skipped (``*_skipped``) and of units used (``*_n``).
    """
    import pandas as pd

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Expected one of {list(METRICS)}. Received: metrics={unknown!r}")
    counts = slice_confusion(truth, pred, threshold)
    n = len(counts)
    pids = _ids(patient_ids, n, "patient ids")
    pooled = metrics_from_counts(*counts.sum(axis=0))
    per_slice = metrics_from_counts(*counts.T)
    lesion = counts[:, 0] + counts[:, 2] > 0
    per_lesion_slice = metrics_from_counts(*counts[lesion].T)
    levels: dict[str, dict[str, float]] = {}
    for m in metrics:
        row: dict[str, float] = {"pooled": pooled[m]}
        row["mean_of_slices"], row["mean_of_slices_skipped"] = _nanmean(per_slice[m])
        row["mean_of_slices_n"] = n - row["mean_of_slices_skipped"]
        row["mean_of_lesion_slices"], row["mean_of_lesion_slices_skipped"] = _nanmean(
            per_lesion_slice[m]
        )
        row["mean_of_lesion_slices_n"] = int(lesion.sum()) - row["mean_of_lesion_slices_skipped"]
        levels[m] = row
    if pids is not None:
        uniq, per = per_patient_counts(counts, pids)
        per_patient = metrics_from_counts(*per.T)
        for m in metrics:
            mean, skipped = _nanmean(per_patient[m])
            levels[m].update(
                mean_of_patients=mean,
                mean_of_patients_skipped=skipped,
                mean_of_patients_n=len(uniq) - skipped,
            )
    df = pd.DataFrame.from_dict(levels, orient="index")
    order = ["pooled", "mean_of_slices", "mean_of_lesion_slices", "mean_of_patients"]
    value_cols = [c for c in order if c in df.columns]
    extra = [c for c in df.columns if c not in value_cols]
    df = df[value_cols + extra]
    for c in extra:
        df[c] = df[c].astype(int)
    df.index.name = "metric"
    return df


def per_patient_metrics(
    truth: Any,
    pred: Any,
    patient_ids: Sequence[Any],
    spacing: Sequence[float] | None = None,
    slice_thickness: float | None = None,
    slice_indices: Sequence[int] | None = None,
    threshold: float = 0.5,
    surface: bool = True,
    connectivity: int | None = None,
    progress: bool = True,
):
    """3-D metrics per patient: the patient's slices stacked into a volume.

    Slices are ordered by ``slice_indices`` when given (else kept in input order). Distances
    use spacing (slice_thickness, row, col) in mm when both ``spacing`` and ``slice_thickness``
    are known, otherwise voxel units (recorded in ``df.attrs``). If only some of a patient's
    slices are present (e.g. lesion slices only) the stack is not the real volume and 3-D
    distances and lesion counts are approximate.

    Args:
        truth: masks (N, H, W).
        pred: predicted masks or probabilities (N, H, W) or (N, H, W, 1).
        patient_ids: patient of each slice.
        spacing: pixel size (row, col) in mm.
        slice_thickness: distance between slices in mm.
        slice_indices: position of each slice in its volume, for ordering.
        threshold: probability cut-off for float predictions.
        surface: compute HD95 and ASSD in 3-D.
        connectivity: for the 3-D lesion counts (6, 18 or 26; None = 26).
        progress: show a progress bar over patients.

    Returns:
        pandas DataFrame, one row per patient (in order of first appearance): ``patient_id``, ``n_slices``,
        ``tp``, ``fp``, ``fn``, ``tn``, the :data:`METRICS`, ``truth_volume``, ``pred_volume``,
        ``volume_difference`` (pred − truth), ``relative_volume_difference``, ``hd95``,
        ``assd`` and the lesion counts of :func:`lesion_detection`.
    """
    import pandas as pd

    t, p = _pair(truth, pred, threshold)
    if t.ndim != 3:
        raise ValueError(f"expected a stack of 2-D masks (N, H, W), got shape {t.shape}")
    n = len(t)
    pids = np.asarray(_ids(patient_ids, n, "patient ids"), dtype=object)
    order_key = np.arange(n) if slice_indices is None else np.asarray(slice_indices)
    if len(order_key) != n:
        raise ValueError(f"{len(order_key)} slice indices for {n} slices; expected one per slice")
    mm = spacing is not None and slice_thickness is not None
    sp3 = (float(slice_thickness), *_spacing_for(2, spacing)) if mm else None
    vox_ml = voxel_volume_ml(spacing, slice_thickness) if mm else None
    rows = []
    patients = list(dict.fromkeys(pids.tolist()))  # order of first appearance
    for pid in _progress(patients, progress, "patients"):
        idx = np.flatnonzero(pids == pid)
        idx = idx[np.argsort(order_key[idx], kind="stable")]
        vt, vp = t[idx], p[idx]
        tp, fp, fn, tn = confusion(vt, vp)
        row: dict[str, Any] = {
            "patient_id": pid,
            "n_slices": len(idx),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
        }
        row.update(metrics_from_counts(tp, fp, fn, tn))
        scale = 1.0 if vox_ml is None else vox_ml
        row["truth_volume"] = (tp + fn) * scale
        row["pred_volume"] = (tp + fp) * scale
        row["volume_difference"] = (fp - fn) * scale
        row["relative_volume_difference"] = (fp - fn) / (tp + fn) if tp + fn else float("nan")
        if surface:
            a, b = surface_distances(vt, vp, sp3)
            d = np.concatenate([a, b])
            if d.size == 0:
                row["hd95"], row["assd"] = 0.0, 0.0
            elif np.isinf(d).any():
                row["hd95"], row["assd"] = float("inf"), float("inf")
            else:
                row["hd95"], row["assd"] = float(np.percentile(d, 95)), float(d.mean())
        row.update(lesion_detection(vt, vp, connectivity=connectivity))
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs.update(
        distance_unit="mm" if mm else "voxels",
        volume_unit="mL" if mm else "voxels",
        threshold=float(threshold),
    )
    return df


# --------------------------------------------------------------------------- Keras metrics
# Dice, IoU, sensitivity and specificity for ``model.compile`` (introduced in
# notebooks/04_unet_vs_resunet.ipynb). Keras is imported on the first use of one of these names
# (``strokekit.metrics.DiceMetric``), so everything above stays NumPy-only and cheap to import;
# ``strokekit.losses`` imports them, which registers them for loading saved models. They are
# left out of ``__all__`` so that ``from strokekit.metrics import *`` does not import Keras.

_KERAS_METRICS = ("DiceMetric", "IoUMetric", "Sensitivity", "Specificity")
_LAZY: dict[str, type] = {}


def _align(y_true, y_pred):
    """``(y_true, y_pred)`` as Keras float tensors of the same shape.

    The label convention of the Keras metrics and of :mod:`strokekit.losses`: ``y_pred`` holds
    probabilities ``(B, H, W, C)``; ``y_true`` has the same shape, or holds integer labels of
    shape ``(B, H, W)`` or ``(B, H, W, 1)``, which are the binary mask when ``C == 1`` and are
    one-hot encoded to ``C`` classes when ``C > 1``.
    """
    from keras import ops

    y_pred = ops.convert_to_tensor(y_pred)
    if not str(y_pred.dtype).startswith(("float", "bfloat")):
        y_pred = ops.cast(y_pred, "float32")
    y_true = ops.convert_to_tensor(y_true)
    channels = y_pred.shape[-1]
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    if len(y_true.shape) != len(y_pred.shape):
        raise ValueError(
            f"y_true must have the shape of y_pred {tuple(y_pred.shape)} or be integer labels "
            f"without the channel axis. Received: y_true.shape={tuple(y_true.shape)}"
        )
    true_channels = y_true.shape[-1]
    if channels is not None and channels > 1 and true_channels == 1:
        labels = ops.cast(ops.round(ops.squeeze(y_true, -1)), "int32")
        y_true = ops.one_hot(labels, channels)
    elif channels is not None and true_channels is not None and true_channels != channels:
        raise ValueError(
            f"y_true has {true_channels} channels; expected {channels} (one-hot, like y_pred) "
            f"or 1 (integer labels). Received: y_true.shape={tuple(y_true.shape)}, "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    return ops.cast(y_true, y_pred.dtype), y_pred


def __getattr__(name: str):
    if name in _KERAS_METRICS:
        if not _LAZY:
            _LAZY.update(_make_keras_metrics())
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_keras_metrics() -> dict[str, type]:
    import keras
    from keras import ops

    class _ConfusionMetric(keras.metrics.Metric):
        """Thresholded confusion counts (tp, fp, fn, tn) of the lesion class over an epoch.

        The prediction is binarised: ``y_pred >= threshold`` for a single (sigmoid) channel,
        the arg-max class for a softmax output. ``class_id`` picks one channel; None means the
        only channel when there is one, and every channel but the background (0) pooled when
        there are several. ``sample_weight`` of shape (B,) or (B, H, W) weighs the counts.
        The counts of every batch of an epoch are pooled and the ratio computed once: the
        epoch's Dice is the Dice of all its pixels together, not an average of per-batch
        values. A ratio whose denominator is 0 (e.g. no lesion anywhere and none predicted)
        is 1: there was nothing to get wrong (unlike the NumPy functions above, which return
        NaN for an undefined sensitivity or specificity).
        """

        default_name = "confusion"

        def __init__(
            self,
            threshold: float = 0.5,
            class_id: int | None = None,
            name: str | None = None,
            dtype=None,
        ):
            super().__init__(name=name or self.default_name, dtype=dtype)
            if not 0.0 < float(threshold) < 1.0:
                raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold!r}")
            if class_id is not None and (not isinstance(class_id, int) or class_id < 0):
                raise ValueError(
                    f"class_id must be None or an int >= 0. Received: class_id={class_id!r}"
                )
            self.threshold = float(threshold)
            self.class_id = class_id
            self.tp = self.add_variable(shape=(), initializer="zeros", name="tp")
            self.fp = self.add_variable(shape=(), initializer="zeros", name="fp")
            self.fn = self.add_variable(shape=(), initializer="zeros", name="fn")
            self.tn = self.add_variable(shape=(), initializer="zeros", name="tn")

        def update_state(self, y_true, y_pred, sample_weight=None):
            y_true, y_pred = _align(y_true, y_pred)
            channels = y_pred.shape[-1]
            if channels == 1:
                pred = ops.cast(y_pred >= self.threshold, self.dtype)
            else:
                pred = ops.one_hot(ops.argmax(y_pred, axis=-1), channels, dtype=self.dtype)
            true = ops.cast(y_true >= 0.5, self.dtype)
            if self.class_id is not None:
                if channels is not None and self.class_id >= channels:
                    raise ValueError(f"class_id={self.class_id} but y_pred has {channels} channels.")
                pred = pred[..., self.class_id : self.class_id + 1]
                true = true[..., self.class_id : self.class_id + 1]
            elif channels != 1:
                pred, true = pred[..., 1:], true[..., 1:]
            weight = ops.ones_like(true)
            if sample_weight is not None:
                sw = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
                while len(sw.shape) < len(true.shape):
                    sw = ops.expand_dims(sw, -1)
                weight = weight * sw
            self.tp.assign_add(ops.sum(weight * true * pred))
            self.fp.assign_add(ops.sum(weight * (1.0 - true) * pred))
            self.fn.assign_add(ops.sum(weight * true * (1.0 - pred)))
            self.tn.assign_add(ops.sum(weight * (1.0 - true) * (1.0 - pred)))

        def result(self):
            # Variables go through convert_to_tensor: JAX's ones_like rejects a Keras Variable.
            tp, fp, fn, tn = (ops.convert_to_tensor(v) for v in (self.tp, self.fp, self.fn, self.tn))
            numerator, denominator = self._ratio(tp, fp, fn, tn)
            return ops.where(
                denominator > 0, numerator / ops.maximum(denominator, 1e-12), ops.ones_like(numerator)
            )

        def get_config(self):
            return {**super().get_config(), "threshold": self.threshold, "class_id": self.class_id}

    class DiceMetric(_ConfusionMetric):
        """Dice ``2TP / (2TP + FP + FN)`` of the lesion class, pooled over the epoch.

        Args:
            threshold: probability above which a pixel counts as lesion (sigmoid outputs).
            class_id: channel to score: None for the only channel of a sigmoid output, or
                every class but the background (0) pooled for a softmax output.
            name, dtype: as for ``keras.metrics.Metric``.
        """

        default_name = "dice"

        def _ratio(self, tp, fp, fn, tn):
            return 2.0 * tp, 2.0 * tp + fp + fn

    class IoUMetric(_ConfusionMetric):
        """Intersection over union (Jaccard) ``TP / (TP + FP + FN)``, pooled over the epoch.

        Arguments as :class:`DiceMetric`.
        """

        default_name = "iou"

        def _ratio(self, tp, fp, fn, tn):
            return tp, tp + fp + fn

    class Sensitivity(_ConfusionMetric):
        """Sensitivity (recall) ``TP / (TP + FN)``, pooled over the epoch. Arguments as :class:`DiceMetric`."""

        default_name = "sensitivity"

        def _ratio(self, tp, fp, fn, tn):
            return tp, tp + fn

    class Specificity(_ConfusionMetric):
        """Specificity ``TN / (TN + FP)``, pooled over the epoch. Arguments as :class:`DiceMetric`."""

        default_name = "specificity"

        def _ratio(self, tp, fp, fn, tn):
            return tn, tn + fp

    classes = {}
    for cls in (DiceMetric, IoUMetric, Sensitivity, Specificity):
        cls.__qualname__ = cls.__name__
        # Registered names ("strokekit>DiceMetric") are what saved models refer to: keep them.
        classes[cls.__name__] = keras.saving.register_keras_serializable(package="strokekit")(cls)
    return classes
