"""From 2-D slice predictions to a 3-D lesion: stacking, cleaning, volume in mL, surfaces, 3-D views.

A slice model sees one axial slice at a time. Stacking its predictions in slice order gives a
lesion volume that can be measured in millilitres (voxel count x voxel volume) and drawn as a
surface. Axial CT slices are thick (5 mm) compared with their pixels (about 0.5 mm), so every
function here takes the spacing as ``(dz, dy, dx)`` in mm and never assumes cubic voxels.

Introduced in notebooks/09_3d_reconstruction.ipynb.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from .dataset import SliceDataset
from .errors import DataError
from .preprocess import resize_image

__all__ = [
    "ASSUMED_FOV_MM",
    "ASSUMED_SLICE_MM",
    "bright_components",
    "clean_mask",
    "lesion_volume_ml",
    "plot_3d",
    "plot_volume_slice",
    "predict_volume",
    "skull_from_hu",
    "stack_slices",
    "surface_mesh",
    "volume_report",
    "voxel_ml",
]

#: Largest in-plane side (pixels) of the volumes meshed for the context surfaces in
#: :func:`plot_3d`; brain and skull are downsampled to it so the figure draws in about a second.
CONTEXT_MESH_SIDE = 48
#: Same for the lesion and the reference surfaces, which are smaller and deserve more detail.
LESION_MESH_SIDE = 96


# --------------------------------------------------------------------------- helpers
def _spacing3(spacing: Sequence[float] | None, what: str = "spacing") -> tuple[float, float, float]:
    """A checked (dz, dy, dx) triple of positive floats."""
    if spacing is None:
        return (1.0, 1.0, 1.0)
    values = tuple(float(s) for s in spacing)
    if len(values) != 3:
        raise ValueError(f"{what} must be (dz, dy, dx) in mm, got {spacing!r}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what} values must be positive numbers of mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _as_volume(mask: Any, what: str = "mask") -> np.ndarray:
    """A 3-D array from a (D, H, W) or single-slice (H, W) input."""
    arr = np.asarray(mask)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"{what} must be a (D, H, W) volume or one (H, W) slice, got shape {arr.shape}"
        )
    return arr


def _foreground(mask: Any, what: str = "mask") -> np.ndarray:
    """Boolean foreground of a bool, label or probability volume (probabilities: >= 0.5)."""
    from .metrics import as_binary

    return as_binary(_as_volume(mask, what))


# --------------------------------------------------------------------------- prediction
def predict_volume(
    model: Any,
    volume_hu_or_dataset: np.ndarray | SliceDataset,
    config: Any,
    batch_size: int = 8,
    progress: bool = True,
    unit: str = "HU",
) -> np.ndarray:
    """Run a slice model over every slice of a volume and return probabilities at the original size.

    Slices are prepared exactly as for training (:func:`strokekit.train.to_arrays`: resized to
    ``config.image_size``, one [0, 1] channel per CT window in ``config.windows``; display-unit
    data is rescaled from 0..255 once per window), predicted in batches, and the probabilities
    are resized back to the original slice size with linear interpolation.

    Args:
        model: a Keras model mapping (B, S, S, C) to (B, S, S, K) probabilities.
        volume_hu_or_dataset: a (D, H, W) array (one (H, W) slice is accepted too), or a
            :class:`~strokekit.dataset.SliceDataset` whose own unit is then used.
        config: a :class:`strokekit.config.TrainConfig` (anything with ``image_size`` and
            ``windows``).
        batch_size: slices per forward pass.
        progress: show a progress bar over batches.
        unit: ``"HU"`` or ``"display"``; only used for an array input.

    Returns:
        float32 probabilities in [0, 1]: (D, H, W) for a one-channel (sigmoid) model,
        (D, H, W, K) for a K-class softmax model.

    Raises:
        ValueError: for a non-positive batch size or an input that is not a stack of slices.
    """
    from tqdm.auto import tqdm

    from .train import to_arrays

    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(volume_hu_or_dataset, SliceDataset):
        dataset = volume_hu_or_dataset
    else:
        volume = np.asarray(volume_hu_or_dataset, dtype=np.float32)
        if volume.ndim == 2:
            volume = volume[None]
        if volume.ndim != 3:
            raise ValueError(
                f"expected a (D, H, W) volume or a SliceDataset, got an array of shape {volume.shape}"
            )
        dataset = SliceDataset(
            images=volume,
            masks=np.zeros(volume.shape, np.uint8),
            case_ids=[f"s{k:03d}" for k in range(len(volume))],
            unit=unit,
        )
    height, width = dataset.image_shape[:2]
    if len(dataset) == 0:
        return np.zeros((0, height, width), np.float32)
    x, _ = to_arrays(config, dataset)
    outputs = []
    starts = range(0, len(x), int(batch_size))
    for start in tqdm(starts, desc="predicting slices", disable=not progress, unit="batch"):
        # predict_on_batch avoids building a new predict loop per batch on every backend.
        outputs.append(
            np.asarray(model.predict_on_batch(x[start : start + batch_size]), dtype=np.float32)
        )
    prob = np.concatenate(outputs)
    if prob.ndim == 3:
        prob = prob[..., None]
    if prob.shape[1:3] != (height, width):
        prob = np.stack([resize_image(p, (height, width)) for p in prob])
    prob = np.clip(prob, 0.0, 1.0).astype(np.float32, copy=False)
    return prob[..., 0] if prob.shape[-1] == 1 else prob


# --------------------------------------------------------------------------- cleaning
def _clean_binary(
    fg: np.ndarray, min_size: int, keep_largest: int | None, fill_holes: bool
) -> np.ndarray:
    # Full connectivity: with 5 mm slices a lesion often continues only diagonally between slices.
    structure = ndimage.generate_binary_structure(3, 3)
    labels, count = ndimage.label(fg, structure=structure)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        keep = sizes >= min_size
        if keep_largest is not None:
            order = np.argsort(-sizes, kind="stable")
            top = np.zeros(count, bool)
            top[order[:keep_largest]] = True
            keep &= top
        fg = np.concatenate([[False], keep])[labels]
    if fill_holes and fg.any():
        # 2-D first: a hole open to the slice above or below is still a hole in its own slice.
        fg = np.stack([ndimage.binary_fill_holes(s) for s in fg])
        fg = ndimage.binary_fill_holes(fg)
    return fg


def clean_mask(
    mask3d: Any,
    min_size_voxels: int = 10,
    keep_largest: int | None = None,
    fill_holes: bool = True,
    spacing: Sequence[float] | None = None,
    min_size_ml: float | None = None,
) -> np.ndarray:
    """Remove specks, optionally keep the k largest lesions, and fill holes in a 3-D mask.

    Connected components use full (26-) connectivity. Hole filling is done per slice (2-D) and
    then in 3-D. Each label of an integer mask is cleaned on its own.

    Args:
        mask3d: (D, H, W) bool, label or probability (>= 0.5) mask; one (H, W) slice is accepted.
        min_size_voxels: components with fewer voxels are removed.
        keep_largest: keep only the k largest components (per label); None keeps all.
        fill_holes: fill enclosed holes (2-D per slice, then 3-D).
        spacing: (dz, dy, dx) in mm; needed for ``min_size_ml``.
        min_size_ml: components smaller than this volume in mL are removed as well.

    Returns:
        uint8 mask of the input's shape (0/1 for binary input, the labels for label input);
        all zeros for an empty input.

    Raises:
        ValueError: a negative size, ``keep_largest`` < 1, or ``min_size_ml`` without ``spacing``.
    """
    arr = np.asarray(mask3d)
    shape = arr.shape
    vol = _as_volume(arr, "mask3d")
    if min_size_voxels < 0:
        raise ValueError(f"min_size_voxels must be >= 0, got {min_size_voxels}")
    if keep_largest is not None and (isinstance(keep_largest, bool) or int(keep_largest) < 1):
        raise ValueError(f"keep_largest must be None or an integer >= 1, got {keep_largest!r}")
    min_size = int(min_size_voxels)
    if min_size_ml is not None:
        if spacing is None:
            raise ValueError("min_size_ml needs spacing=(dz, dy, dx) in mm to convert mL to voxels")
        if min_size_ml < 0:
            raise ValueError(f"min_size_ml must be >= 0, got {min_size_ml}")
        dz, dy, dx = _spacing3(spacing)
        min_size = max(min_size, math.ceil(min_size_ml * 1000.0 / (dz * dy * dx) - 1e-9))
    if (
        np.issubdtype(vol.dtype, np.integer)
        and vol.dtype != bool
        and vol.size
        and int(vol.max()) > 1
    ):
        out = np.zeros(vol.shape, np.uint8)
        for label in np.unique(vol):
            if label == 0:
                continue
            part = _clean_binary(vol == label, min_size, keep_largest, fill_holes)
            out[part & (out == 0)] = label
    else:
        out = _clean_binary(_foreground(vol), min_size, keep_largest, fill_holes).astype(np.uint8)
    return out.reshape(shape)


# --------------------------------------------------------------------------- volumes
#: Geometry :func:`voxel_ml` assumes when slices do not carry it (PNG): CT-ICH's, a 230.4 mm field of
#: view and 5 mm slices.
ASSUMED_FOV_MM, ASSUMED_SLICE_MM = 230.4, 5.0


def voxel_ml(shape: Sequence[int], spacing: Sequence[float] | None = None, thickness: float | None = None) -> float:
    """mL of one voxel of (rows, cols) slices: their spacing and thickness, else CT-ICH's (``ASSUMED_*``)."""
    rows, cols = int(shape[0]), int(shape[1])
    row_mm, col_mm = spacing if spacing is not None else (ASSUMED_FOV_MM / rows, ASSUMED_FOV_MM / cols)
    return float(row_mm) * float(col_mm) * float(thickness or ASSUMED_SLICE_MM) / 1000.0


def bright_components(mask: np.ndarray, levels: np.ndarray, brains: np.ndarray, min_contrast: float | None,
                      min_ml: float, ml_per_voxel: float) -> np.ndarray:
    """Keep the 3-D lesion components that are brighter than the brain on their slices, and large enough.

    A component (26-connected) of ``mask`` stays if its mean level exceeds the median level of the
    brain on its slices by at least ``min_contrast`` (None: no contrast floor) and it holds at least
    ``min_ml`` mL. Fresh blood is hyperdense (about 50–90 HU against 20–45 HU for brain); brain that a
    network marks on a scan brighter than its training scans is not. Slices with fewer than 50 brain
    pixels borrow the median of the others.

    Args:
        mask: (N, H, W) lesion mask of one scan, slices in order (or one (H, W) slice).
        levels: (N, H, W) the slices in one intensity scale (the few-shot recipe: display levels).
        brains: (N, H, W) bool brain masks.
        min_contrast: floor on mean level minus brain median, in the units of ``levels``.
        min_ml: floor on the component's volume.
        ml_per_voxel: mL of one voxel (:func:`voxel_ml`).

    Returns:
        uint8 (N, H, W) 0/1 mask.
    """
    mask = _as_volume(mask) > 0
    levels = _as_volume(levels, "levels").astype(np.float32, copy=False)
    brains = _as_volume(brains, "brains").astype(bool, copy=False)
    if levels.shape != mask.shape or brains.shape != mask.shape:
        raise ValueError(f"mask {mask.shape}, levels {levels.shape} and brains {brains.shape} must have one shape")
    medians = np.array([np.median(lv[b]) if b.sum() >= 50 else np.nan for lv, b in zip(levels, brains)])
    fallback = float(np.nanmedian(medians)) if np.isfinite(medians).any() else float(np.median(levels))
    labels, n = ndimage.label(mask, np.ones((3, 3, 3), bool))
    keep = np.zeros(n + 1, bool)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[box] == k
        around = medians[box[0]]
        brain_level = float(np.nanmedian(around)) if np.isfinite(around).any() else fallback
        bright = min_contrast is None or float(levels[box][inside].mean()) - brain_level >= min_contrast
        keep[k] = bright and inside.sum() * ml_per_voxel >= min_ml
    return keep[labels].astype(np.uint8)


def lesion_volume_ml(
    mask3d: Any, spacing_row_col: Sequence[float], slice_thickness: float
) -> float:
    """Lesion volume in mL: foreground voxel count x (row x col x slice spacing in mm) / 1000.

    Args:
        mask3d: bool, label (> 0) or probability (>= 0.5) mask of any shape.
        spacing_row_col: pixel spacing (row, col) in mm.
        slice_thickness: distance between slices in mm.

    Returns:
        the volume in millilitres (1 mL = 1000 mm³).

    Raises:
        ValueError: for spacing that is missing or not positive.
    """
    from .metrics import as_binary, voxel_volume_ml

    if spacing_row_col is None or slice_thickness is None:
        raise ValueError(
            "lesion_volume_ml needs the pixel spacing (row, col) and the slice thickness in mm; "
            f"got spacing={spacing_row_col!r}, slice_thickness={slice_thickness!r}"
        )
    if len(tuple(spacing_row_col)) != 2:
        raise ValueError(f"spacing_row_col must be (row, col) in mm, got {spacing_row_col!r}")
    voxel = voxel_volume_ml(spacing_row_col, slice_thickness)
    return float(np.count_nonzero(as_binary(mask3d))) * voxel


def _patient_spacing(
    data: SliceDataset, patient_id: str
) -> tuple[float | None, float | None, float | None]:
    """(dz, dy, dx) from the dataset, or from per-slice NIfTI columns when they agree."""
    dz = data.slice_thickness
    dy, dx = data.spacing if data.spacing is not None else (None, None)
    for key, value in (("thickness", dz), ("spacing_row", dy), ("spacing_col", dx)):
        if value is None and key in data.extra:
            column = np.asarray(data.extra[key], dtype=np.float64)
            if len(column) and np.all(column == column[0]):
                if key == "thickness":
                    dz = float(column[0])
                elif key == "spacing_row":
                    dy = float(column[0])
                else:
                    dx = float(column[0])
    return dz, dy, dx


def stack_slices(
    dataset: SliceDataset,
    patient_id: str | int,
    spacing: Sequence[float] | None = None,
    allow_gaps: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Stack one patient's slices into a volume, ordered by ``slice_indices``.

    Args:
        dataset: slices of one or more patients (with patient ids and slice indices).
        patient_id: the patient to stack.
        spacing: (dz, dy, dx) in mm, overriding the dataset's (needed when it has none, e.g. the
            CT-ICH PNGs: 5 mm slices, pixel spacing not recorded).
        allow_gaps: stack even if some slice indices are missing (the volume is then shorter
            than the scan and volumes in mL are too small).

    Returns:
        (volume (D, H, W) float32 in the dataset's unit, mask (D, H, W) uint8, spacing (dz, dy, dx)).

    Raises:
        DataError: no patient ids, an unknown patient, unknown or repeated slice indices,
            missing slices (without ``allow_gaps``), or unknown spacing.
    """
    if dataset.patient_ids is None:
        raise DataError("stack_slices needs patient ids; this dataset has none")
    patient_id = str(patient_id)
    index = np.flatnonzero(np.asarray(dataset.patient_ids) == patient_id)
    if len(index) == 0:
        raise DataError(
            f"unknown patient {patient_id!r}; patients are e.g. {dataset.patients()[:5]}"
        )
    order = np.asarray(dataset.slice_indices)[index]
    if np.any(order < 0):
        raise DataError(
            f"patient {patient_id!r} has slices without a slice index (-1); cannot order them"
        )
    if len(np.unique(order)) != len(order):
        values, counts = np.unique(order, return_counts=True)
        raise DataError(
            f"patient {patient_id!r} has repeated slice indices {values[counts > 1][:5].tolist()}"
        )
    index = index[np.argsort(order, kind="stable")]
    order = np.sort(order)
    missing = sorted(set(range(int(order[0]), int(order[-1]) + 1)) - set(order.tolist()))
    if missing and not allow_gaps:
        raise DataError(
            f"patient {patient_id!r} lacks slices {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"between {int(order[0])} and {int(order[-1])}; stacking needs every slice of the scan "
            "(pass allow_gaps=True to stack anyway)"
        )
    images = dataset.images[index]
    if images.ndim == 4:
        images = images[..., 0]
    if spacing is not None:
        spacing3 = _spacing3(spacing)
    else:
        dz, dy, dx = _patient_spacing(dataset.subset(index), patient_id)
        if dz is None or dy is None or dx is None:
            raise DataError(
                f"the spacing of patient {patient_id!r} is unknown (slice thickness {dz}, pixel "
                f"spacing {(dy, dx)}); pass spacing=(dz, dy, dx) in mm"
            )
        spacing3 = _spacing3((dz, dy, dx))
    return images.astype(np.float32), dataset.masks[index].copy(), spacing3


# --------------------------------------------------------------------------- surfaces
def _empty_mesh() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)


def surface_mesh(
    mask3d: Any,
    spacing: Sequence[float] | None,
    level: float = 0.5,
    step_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """A triangle surface of a 3-D mask in mm (marching cubes), closed even where it meets the border.

    The mask is padded by one empty voxel on every side before meshing, so a lesion touching the
    first or last slice still gets a closed surface; vertices are shifted back afterwards.

    Args:
        mask3d: (D, H, W) bool/label mask (label > 0 is inside) or probabilities.
        spacing: (dz, dy, dx) voxel size in mm (None: 1 mm).
        level: iso-level for probabilities; binary masks are meshed at 0.5.
        step_size: marching-cubes step in voxels (larger is coarser and faster).

    Returns:
        (verts (V, 3) float32 in mm as (z, y, x), faces (F, 3) int64). An empty mask (nothing at
        or above ``level``) gives two empty arrays, never an exception.

    Raises:
        ValueError: for a bad spacing or step size.
    """
    from skimage.measure import marching_cubes

    spacing3 = _spacing3(spacing)
    if isinstance(step_size, bool) or int(step_size) < 1:
        raise ValueError(f"step_size must be an integer >= 1, got {step_size!r}")
    vol = _as_volume(mask3d, "mask3d")
    if vol.dtype == bool or np.issubdtype(vol.dtype, np.integer):
        field = (vol > 0).astype(np.float32)
        level = 0.5
    else:
        field = np.nan_to_num(vol.astype(np.float32), nan=0.0)
    if not 0.0 < float(level) < float("inf"):
        raise ValueError(f"level must be a positive iso-value (0.5 for masks), got {level!r}")
    if field.size == 0 or float(field.max()) <= level:
        return _empty_mesh()
    padded = np.pad(field, 1, mode="constant", constant_values=0.0)
    try:
        verts, faces, _, _ = marching_cubes(
            padded, level=level, spacing=spacing3, step_size=int(step_size), allow_degenerate=False
        )
    except (ValueError, RuntimeError):
        # Too small for the step size (e.g. one voxel at step 3): nothing to draw.
        return _empty_mesh()
    verts = verts - np.asarray(spacing3)[None, :]
    return verts.astype(np.float32), faces.astype(np.int64)


def skull_from_hu(volume_hu: np.ndarray, threshold: float = 300.0) -> np.ndarray:
    """Bone mask of a HU volume (voxels above ``threshold`` HU), for the skull in :func:`plot_3d`."""
    return np.asarray(volume_hu) > float(threshold)


def _downsampled(mask: np.ndarray, spacing: tuple[float, float, float], side: int):
    """Block-average a mask in plane to at most ``side`` pixels; returns (field, spacing, offset mm)."""
    from skimage.measure import block_reduce

    fg = _foreground(mask).astype(np.float32)
    factor = max(1, math.ceil(max(fg.shape[1:]) / float(side)))
    if factor == 1:
        return fg, spacing, np.zeros(3)
    small = block_reduce(fg, (1, factor, factor), np.mean)
    dz, dy, dx = spacing
    # A block's value sits at the centre of its pixels, (factor - 1) / 2 pixels in.
    offset = np.array([0.0, (factor - 1) / 2.0 * dy, (factor - 1) / 2.0 * dx])
    return small, (dz, dy * factor, dx * factor), offset


def _mesh_for_plot(mask, spacing, side):
    field, sp, offset = _downsampled(mask, spacing, side)
    verts, faces = surface_mesh(field, sp, level=0.5)
    return verts + offset.astype(np.float32), faces


def plot_3d(
    lesion_mask: Any,
    spacing: Sequence[float],
    brain_mask: Any = None,
    skull_mask: Any = None,
    truth_mask: Any = None,
    elev: float = 20.0,
    azim: float = -60.0,
    title: str | None = None,
    figsize: tuple[float, float] = (6.5, 6.0),
):
    """A 3-D view of a predicted lesion inside the brain and skull (matplotlib, no extra packages).

    Brain and skull are drawn translucent from meshes downsampled to at most
    :data:`CONTEXT_MESH_SIDE` pixels in plane, the lesion in red and the reference (truth) as a
    green wireframe at :data:`LESION_MESH_SIDE`, so a 24 x 256 x 256 volume draws in about a
    second. An empty prediction is drawn as "no lesion predicted".

    Args:
        lesion_mask: (D, H, W) predicted mask (label > 0 or probability >= 0.5 is lesion).
        spacing: (dz, dy, dx) in mm, e.g. from :func:`stack_slices`.
        brain_mask: optional (D, H, W) brain mask (translucent grey).
        skull_mask: optional (D, H, W) bone mask (light, very translucent), e.g. :func:`skull_from_hu`.
        truth_mask: optional (D, H, W) reference lesion mask (green wireframe).
        elev: elevation of the view in degrees.
        azim: azimuth of the view in degrees.
        title: figure title; default states the predicted (and true) volume in mL.
        figsize: figure size in inches.

    Returns:
        matplotlib Figure with one 3-D axes; axes in mm (x = columns, y = rows, z = slices).

    Raises:
        ValueError: for a bad spacing or masks of different shapes.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    spacing3 = _spacing3(spacing)
    lesion = _foreground(lesion_mask, "lesion_mask")
    shape = lesion.shape
    for name, other in (
        ("brain_mask", brain_mask),
        ("skull_mask", skull_mask),
        ("truth_mask", truth_mask),
    ):
        if other is not None and _as_volume(other, name).shape != shape:
            raise ValueError(
                f"{name} shape {_as_volume(other, name).shape} differs from lesion_mask shape {shape}"
            )

    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot(projection="3d")
    handles = []

    def add(verts, faces, label, **style):
        if len(faces) == 0:
            return
        # matplotlib wants (x, y, z); marching cubes gives (z, y, x).
        tris = verts[:, ::-1][faces]
        ax.add_collection3d(Poly3DCollection(tris, label=label, **style))

    if skull_mask is not None:
        v, f = _mesh_for_plot(skull_mask, spacing3, CONTEXT_MESH_SIDE)
        add(v, f, "skull", facecolors=(0.93, 0.90, 0.80, 0.06), edgecolors="none", linewidths=0)
        handles.append(Patch(facecolor=(0.93, 0.90, 0.80), edgecolor="grey", label="skull"))
    if brain_mask is not None:
        v, f = _mesh_for_plot(brain_mask, spacing3, CONTEXT_MESH_SIDE)
        add(v, f, "brain", facecolors=(0.55, 0.55, 0.55, 0.10), edgecolors="none", linewidths=0)
        handles.append(Patch(facecolor=(0.55, 0.55, 0.55), label="brain"))
    v, f = _mesh_for_plot(lesion, spacing3, LESION_MESH_SIDE)
    lesion_empty = len(f) == 0
    add(v, f, "prediction", facecolors=(0.85, 0.05, 0.05, 0.9), linewidths=0, shade=True)
    if not lesion_empty:
        handles.append(Patch(facecolor=(0.85, 0.05, 0.05), label="predicted lesion"))
    if truth_mask is not None:
        v, f = _mesh_for_plot(truth_mask, spacing3, LESION_MESH_SIDE)
        add(v, f, "truth", facecolors=(0, 0, 0, 0), edgecolors=(0.0, 0.7, 0.2, 0.5), linewidths=0.3)
        if len(f):
            handles.append(Patch(facecolor="none", edgecolor=(0.0, 0.7, 0.2), label="reference"))

    dz, dy, dx = spacing3
    extent = (shape[2] * dx, shape[1] * dy, shape[0] * dz)
    ax.set_xlim(0, extent[0])
    ax.set_ylim(extent[1], 0)  # image rows run downwards
    ax.set_zlim(0, extent[2])
    ax.set_box_aspect(extent, zoom=0.88)  # leaves room for the z label
    ax.set_xlabel("x (mm)", fontsize=8)
    ax.set_ylabel("y (mm)", fontsize=8)
    ax.set_zlabel("z (mm)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.view_init(elev=elev, azim=azim)
    if handles:
        ax.legend(handles=handles, loc="upper left", fontsize=8)
    if title is None:
        voxel_ml = dz * dy * dx / 1000.0
        if lesion_empty:
            title = "no lesion predicted"
        else:
            title = f"predicted lesion: {np.count_nonzero(lesion) * voxel_ml:.1f} mL"
        if truth_mask is not None:
            title += f" (reference {np.count_nonzero(_foreground(truth_mask)) * voxel_ml:.1f} mL)"
    fig.suptitle(title, fontsize=10)
    return fig


def plot_volume_slice(
    volume_hu: np.ndarray,
    pred_mask: Any,
    truth_mask: Any,
    index: int,
    window: str | Sequence[float] = "brain",
    unit: str = "HU",
    figsize: tuple[float, float] = (5.0, 5.3),
):
    """One slice of a volume with the prediction (red fill and outline) and the reference (green outline).

    Meant for an ipywidgets slider over ``index``.

    Args:
        volume_hu: (D, H, W) volume in HU (or display units with ``unit="display"``).
        pred_mask: (D, H, W) predicted mask, or None.
        truth_mask: (D, H, W) reference mask, or None.
        index: the slice to show (negative counts from the end).
        window: CT window name or (level, width) for HU data.
        unit: ``"HU"`` or ``"display"``.
        figsize: figure size in inches.

    Returns:
        matplotlib Figure.

    Raises:
        IndexError: for a slice index outside the volume.
        ValueError: for masks whose shape differs from the volume's.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from .preprocess import overlay_mask, to_unit_range

    volume = _as_volume(volume_hu, "volume_hu")
    depth = volume.shape[0]
    if not -depth <= int(index) < depth:
        raise IndexError(f"slice index {index} is outside the volume's {depth} slices")
    index = int(index) % depth
    image01 = to_unit_range(volume[index], unit, window)
    masks = {}
    for name, m in (("pred_mask", pred_mask), ("truth_mask", truth_mask)):
        if m is not None:
            m = _foreground(m, name)
            if m.shape != volume.shape:
                raise ValueError(f"{name} shape {m.shape} differs from the volume's {volume.shape}")
            masks[name] = m[index]
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    pred = masks.get("pred_mask")
    ax.imshow(
        overlay_mask(image01, pred.astype(np.uint8), alpha=0.35) if pred is not None else image01,
        cmap="gray",
        vmin=0,
        vmax=1,
    )
    handles = []
    parts = [f"slice {index + 1}/{depth}"]
    if pred is not None:
        if pred.any():
            ax.contour(pred.astype(np.float32), levels=[0.5], colors=["red"], linewidths=1.0)
        handles.append(Line2D([], [], color="red", label="prediction"))
        parts.append(f"predicted {int(pred.sum())} px")
    truth = masks.get("truth_mask")
    if truth is not None:
        if truth.any():
            ax.contour(
                truth.astype(np.float32),
                levels=[0.5],
                colors=["lime"],
                linewidths=1.0,
                linestyles="--",
            )
        handles.append(Line2D([], [], color="lime", linestyle="--", label="reference"))
        parts.append(f"reference {int(truth.sum())} px")
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7)
    ax.set_title(", ".join(parts), fontsize=9)
    ax.set_axis_off()
    return fig


def volume_report(
    pred_mask: Any,
    truth_mask: Any,
    spacing: Sequence[float],
    slice_thickness: float | None = None,
) -> dict[str, float]:
    """Predicted and true lesion volume in mL, their difference, and the 3-D Dice.

    Args:
        pred_mask: (D, H, W) predicted mask (label > 0 or probability >= 0.5).
        truth_mask: (D, H, W) reference mask, or None (true volume and Dice are then NaN).
        spacing: pixel spacing (row, col) in mm, or (dz, dy, dx) when ``slice_thickness`` is None.
        slice_thickness: distance between slices in mm.

    Returns:
        dict with ``predicted_ml``, ``true_ml``, ``difference_ml`` (predicted − true),
        ``relative_difference`` (difference / true; NaN when the true volume is 0) and ``dice_3d``
        (1.0 when both are empty, see :mod:`strokekit.metrics`).

    Raises:
        ValueError: for missing spacing or masks of different shapes.
    """
    from .metrics import dice

    spacing = tuple(float(s) for s in spacing)
    if slice_thickness is None:
        if len(spacing) != 3:
            raise ValueError(
                "pass spacing=(row, col) with slice_thickness, or spacing=(dz, dy, dx)"
            )
        slice_thickness, spacing = spacing[0], spacing[1:]
    pred = _foreground(pred_mask, "pred_mask")
    predicted = lesion_volume_ml(pred, spacing, slice_thickness)
    if truth_mask is None:
        return {
            "predicted_ml": predicted,
            "true_ml": float("nan"),
            "difference_ml": float("nan"),
            "relative_difference": float("nan"),
            "dice_3d": float("nan"),
        }
    truth = _foreground(truth_mask, "truth_mask")
    if truth.shape != pred.shape:
        raise ValueError(f"pred_mask shape {pred.shape} and truth_mask shape {truth.shape} differ")
    true = lesion_volume_ml(truth, spacing, slice_thickness)
    diff = predicted - true
    return {
        "predicted_ml": predicted,
        "true_ml": true,
        "difference_ml": diff,
        "relative_difference": diff / true if true > 0 else float("nan"),
        "dice_3d": float(dice(truth, pred)),
    }
