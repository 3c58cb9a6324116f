"""Preprocessing of head CT: HU windows, brain masks, resizing, normalisation, overlays, statistics.

Also the stack-level brain work of the few-shot study (notebooks/09 and 10, and the app): :func:`brain_mask_stack`,
the cranial-slice gate :func:`cranial_slices`, and the classical threshold-in-brain baseline
(:func:`threshold_in_brain`, :func:`fit_threshold`).

Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from .dataset import SliceDataset
from .errors import DataError

#: Standard CT windows as (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "stroke": (32.0, 8.0 * 3),  # narrow: level 32, width 24 — makes early ischemia visible
    "subdural": (75.0, 215.0),
    "bone": (600.0, 2800.0),
}

#: Colour of each label in overlays and colour-coded masks: red = hemorrhagic, green = ischemic.
DEFAULT_COLOURS: dict[int, tuple[int, int, int]] = {
    1: (255, 0, 0),
    2: (0, 255, 0),
    3: (0, 0, 255),
    4: (255, 255, 0),
}


def resolve_window(window: str | Sequence[float]) -> tuple[float, float]:
    """(level, width) for a window name in :data:`WINDOWS` or an explicit pair."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"Expected one of {sorted(WINDOWS)}. Received: window={window!r}")
        return WINDOWS[window]
    level, width = (float(v) for v in window)
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    return level, width


def window_hu(image: np.ndarray, window: str | Sequence[float] = "brain") -> np.ndarray:
    """Map HU to [0, 1] through a window: level - width/2 → 0, level + width/2 → 1, clipped.

    Args:
        image: array in Hounsfield units, any shape.
        window: a name from :data:`WINDOWS` (``"brain"``, ``"stroke"``, ``"subdural"``, ``"bone"``)
            or a (level, width) pair.

    Returns:
        float32 array of the same shape in [0, 1].
    """
    level, width = resolve_window(window)
    low = level - width / 2.0
    return np.clip((np.asarray(image, dtype=np.float32) - low) / width, 0.0, 1.0)


def to_unit_range(image: np.ndarray, unit: str, window: str | Sequence[float] = "brain") -> np.ndarray:
    """Bring an image to [0, 1]: windowed if in HU, rescaled from 0..255 if a display image."""
    if unit == "HU":
        return window_hu(image, window)
    if unit == "display":
        image = np.asarray(image, dtype=np.float32)
        scale = 255.0 if image.size and float(np.max(image)) > 1.0 else 1.0
        return np.clip(image / scale, 0.0, 1.0)
    raise DataError(f"unknown unit {unit!r}")


def overlay_mask(
    image: np.ndarray,
    mask: np.ndarray,
    colours: Mapping[int, tuple[int, int, int]] | None = None,
    alpha: float = 0.45,
    outline: bool = False,
) -> np.ndarray:
    """Colour a label mask onto a grey image (the study's ``N_result.png``).

    Args:
        image: grey image in [0, 1] (H, W).
        mask: integer labels (H, W); 0 is left uncoloured.
        colours: label → RGB; defaults to :data:`DEFAULT_COLOURS`.
        alpha: opacity of the colour over the image.
        outline: colour only the border of each labelled region.

    Returns:
        uint8 RGB array (H, W, 3).
    """
    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    if image.shape != mask.shape:
        raise DataError(f"image shape {image.shape} and mask shape {mask.shape} differ")
    colours = dict(DEFAULT_COLOURS if colours is None else colours)
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    for label in np.unique(mask):
        if label == 0:
            continue
        region = mask == label
        if outline:
            region = region & ~ndimage.binary_erosion(region)
        colour = np.asarray(colours.get(int(label), (255, 0, 255)), dtype=np.float32) / 255.0
        a = 1.0 if outline else alpha
        rgb[region] = (1 - a) * rgb[region] + a * colour
    return (rgb * 255 + 0.5).astype(np.uint8)


BRAIN_COMPARTMENT_FRACTION = 0.05
"""Soft-tissue regions inside the skull smaller than this fraction of the largest are dropped."""


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _inside_skull(bone: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Pixels enclosed by the skull: the filled bone ring, or its convex hull where the ring is open."""
    from skimage.morphology import convex_hull_image

    bone = bone & head  # the scanner's head rest is bright too, but separated from the head by air
    if not bone.any():
        return np.zeros_like(bone)
    filled = ndimage.binary_fill_holes(bone) & ~bone
    hull = convex_hull_image(bone) & ~bone
    # A closed ring fills to (almost) its hull. An open one (a thin frontal bone lost to resizing,
    # the skull base, the orbits) fills to little: then the hull stands in for the ring.
    return filled if filled.sum() >= 0.6 * hull.sum() else hull


def _tissue_classes(image: np.ndarray, unit: str, threshold: tuple[float, float] | None = None):
    """(image in the units of the band, soft-tissue band, bone, head) of one slice."""
    if threshold is None:
        if unit == "HU":
            return image, (-5.0, 100.0), image > 250.0, image > -500.0
        # brain window L40/W120 maps 0..100 HU to ~0.17..1; bone saturates at 1.0
        scaled = to_unit_range(image, "display")
        return scaled, (0.12, 0.97), scaled >= 0.99, scaled > 0.02
    return image, threshold, image > threshold[1], image > threshold[0]


def brain_mask(image: np.ndarray, unit: str = "HU", threshold: tuple[float, float] | None = None) -> np.ndarray:
    """Intracranial soft-tissue mask of one slice (skull stripping by thresholds and morphology).

    In HU the brain lies between about 0 and 100 HU while bone is above ~300 and air at -1000.
    The skull is the bone within the head (the largest non-air region, so the head rest is
    ignored); the inside of the skull is its filled ring or, where the ring is open on the
    slice, its convex hull. The mask is the soft tissue inside, after a small opening that cuts
    thin bridges, keeping every compartment of at least :data:`BRAIN_COMPARTMENT_FRACTION` of
    the largest (at the skull base the petrous ridges split temporal lobes from the cerebellum);
    holes (ventricles, a hyperdense bleed) are filled. For display images (brain-windowed
    0..255 or 0..1) the soft-tissue band is taken in window units.

    Measured on the 2814 CT-ICH slices at 128 px: a non-empty mask on 86 % of slices (the rest
    are neck, vertex caps and blank slices) and 99.6 % of hemorrhage pixels inside the mask.

    Args:
        image: one slice (H, W), in HU or display units.
        unit: ``"HU"`` or ``"display"``.
        threshold: optional (low, high) band for soft tissue in the image's own units.

    Returns:
        bool array (H, W); all False when no brain is found.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise DataError(f"brain_mask expects one 2-D slice, got shape {image.shape}")
    image, threshold, bone, head = _tissue_classes(image, unit, threshold)
    low, high = threshold
    soft = (image > low) & (image < high)
    head = ndimage.binary_fill_holes(_largest_component(head))
    inside_skull = _inside_skull(bone, head)
    candidate = soft & inside_skull if inside_skull.any() else soft & head
    structure = ndimage.generate_binary_structure(2, 1)
    candidate = ndimage.binary_opening(candidate, structure=structure, iterations=2)
    labels, count = ndimage.label(candidate)
    if count == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = ndimage.sum(candidate, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(sizes >= BRAIN_COMPARTMENT_FRACTION * sizes.max()) + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


SKULL_RAYS = 72
"""Directions from the brain's centre that :func:`skull_enclosure` follows."""


def skull_enclosure(image: np.ndarray, brain: np.ndarray, unit: str = "HU") -> float:
    """Share of directions in which the skull surrounds ``brain`` on this slice (0..1).

    From the centre of the mask, :data:`SKULL_RAYS` rays run outwards until they leave the head;
    a ray counts when it meets bone first. Inside the cranium the skull is met in (almost) every
    direction, also at the skull base; on slices through the neck and the face the bones
    (vertebrae, jaw, sinus walls) stand in a few directions only, so the soft tissue that
    :func:`brain_mask` finds there is not brain. Measured on the CT-ICH scans at 256 px: every
    lesion slice of the protocol's training and validation patients has 0.9 or more.

    Args:
        image: one slice (H, W), in HU or display units.
        brain: its brain mask (H, W), e.g. from :func:`brain_mask`.
        unit: ``"HU"`` or ``"display"``.

    Returns:
        The share of rays that meet bone; 0.0 for an empty mask.
    """
    brain = np.asarray(brain, dtype=bool)
    if not brain.any():
        return 0.0
    _, _, bone, head = _tissue_classes(np.asarray(image, dtype=np.float32), unit)
    head = ndimage.binary_fill_holes(head)
    cy, cx = ndimage.center_of_mass(brain)
    angles = np.linspace(0.0, 2.0 * np.pi, SKULL_RAYS, endpoint=False)
    radii = np.arange(1, int(np.hypot(*image.shape)) + 1)
    ys = np.rint(cy + np.sin(angles)[:, None] * radii).astype(int)
    xs = np.rint(cx + np.cos(angles)[:, None] * radii).astype(int)
    inside = (ys >= 0) & (ys < image.shape[0]) & (xs >= 0) & (xs < image.shape[1])
    ys, xs = np.clip(ys, 0, image.shape[0] - 1), np.clip(xs, 0, image.shape[1] - 1)
    in_head = inside & head[ys, xs]
    # Along each ray: the first step out of the head, and whether bone comes before it.
    leaves = np.where(in_head.all(axis=1), len(radii), np.argmin(in_head, axis=1))
    hits_bone = bone[ys, xs] & in_head & (np.arange(len(radii))[None] < leaves[:, None])
    return float(hits_bone.any(axis=1).mean())


def skull_strip(image: np.ndarray, unit: str = "HU", fill: float | None = None) -> np.ndarray:
    """The slice with everything outside :func:`brain_mask` set to ``fill`` (default: air)."""
    mask = brain_mask(image, unit)
    if fill is None:
        fill = -1000.0 if unit == "HU" else 0.0
    out = np.asarray(image, dtype=np.float32).copy()
    out[~mask] = fill
    return out


# --------------------------------------------------------------------------- stacks of slices: brain masks,
# the cranial-slice gate, the threshold-in-brain baseline (introduced with the few-shot study, notebooks/09-10)

#: The brain window of the CT-ICH PNGs, (level, width) in HU (about L40/W120, ``SOURCE.md`` of the data):
#: :func:`display_levels` maps HU slices through it, so a recipe trained on those PNGs sees a CT scan
#: in HU (DICOM, NIfTI) the way it saw its training slices.
DISPLAY_WINDOW = (40.0, 120.0)


def display_levels(images: np.ndarray, window: tuple[float, float] = DISPLAY_WINDOW) -> np.ndarray:
    """HU images as display levels 0..255 (float32) through ``window``, the CT-ICH brain window by default."""
    return (window_hu(images, window) * 255.0).astype(np.float32)


def _stack(images: np.ndarray) -> tuple[np.ndarray, bool]:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 2:
        return images[None], True
    if images.ndim != 3:
        raise ValueError(f"expected one slice (H, W) or a stack (N, H, W), got shape {images.shape}")
    return images, False


def _levels(images: np.ndarray, unit: str) -> np.ndarray:
    """Intensities on the scale the thresholds use: 0..255 display levels, or HU."""
    if unit == "HU":
        return images
    if unit == "display":
        # display images come as 0..255 or as 0..1; decide once per stack, not per slice, so a
        # dark slice is not rescaled differently from its neighbours.
        scale = 255.0 if images.size and float(images.max()) <= 1.0 else 1.0
        return images * scale
    raise ValueError(f"Expected one of ['HU', 'display']. Received: unit={unit!r}")


def brain_mask_stack(images: np.ndarray, unit: str = "display", stride: int = 1,
                     dilation: int = 0) -> np.ndarray:
    """:func:`brain_mask` of every slice of a stack.

    On the CT-ICH PNGs at 128 px it is non-empty on 86 % of slices (the rest are neck, vertex
    caps and blank slices) and holds 99.6 % of the haemorrhage pixels, so restricting a
    prediction to it costs (almost) no lesion. A slice without brain gets an empty mask: nothing
    is predicted there.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        images: (H, W) or (N, H, W) slices (a trailing channel axis of 1 is allowed).
        unit: ``"display"`` (0..255 or 0..1) or ``"HU"``.
        stride: find the masks on every ``stride``-th pixel (the app: about 128 px of a 512 px
            upload, a few ms a slice) and repeat them back to the images' size.
        dilation: grow the masks by this many pixels (4-connected, :func:`dilate_cross`) at the
            strided size, so a bleed on the brain's edge (subdural, epidural) counts as inside.

    Returns:
        bool array of the images' shape (without channel axis).

    Raises:
        ValueError: bad shape.
    """
    stack, single = _stack(images)
    step = int(stride)
    small = stack[:, ::step, ::step]
    out = np.zeros(small.shape, dtype=bool)
    for i, image in enumerate(small):
        out[i] = brain_mask(image, unit=unit)
    out = dilate_cross(out, dilation)
    if step > 1:
        out = np.repeat(np.repeat(out, step, axis=1), step, axis=2)[:, :stack.shape[1], :stack.shape[2]]
    return out[0] if single else out


#: :func:`cranial_slices`: the skull must surround a slice's brain mask in this share of directions.
MIN_SKULL_ENCLOSURE = 0.9
#: ... measured at about this side: at 128 px a thin skull base loses its bone to resizing.
ENCLOSURE_SIDE = 256


def cranial_slices(data: SliceDataset, brains: np.ndarray | None = None) -> np.ndarray:
    """Which slices of a scan pass through the cranium: (N,) bool.

    A slice through the neck or the face has soft tissue between bones, which
    :func:`brain_mask_stack` takes for brain; a model trained on brain slices paints lesions
    there. A slice counts as cranial when the skull surrounds its brain mask in at least
    :data:`MIN_SKULL_ENCLOSURE` of the directions (:func:`strokekit.preprocess.skull_enclosure`),
    measured at about :data:`ENCLOSURE_SIDE` px. Measured on CT-ICH at 256 px: every lesion slice
    of the protocol's training and validation patients (49, 50, 51, 66) scores 0.958 or more; on the
    whole scans of the 32 test patients the slices below 0.9 hold 0.3 % of the lesion pixels and 37 %
    of the few-shot default's false positives. Slices smaller than :data:`ENCLOSURE_SIDE` (the
    bone is lost; the shorter side counts) all count as cranial. HU slices are judged in the CT-ICH display window
    (:data:`DISPLAY_WINDOW`), where the threshold was measured. ``brains``: the
    :func:`brain_mask_stack` of those display slices at their own size, when the caller has it
    (used where the enclosure is measured at that size).

    Introduced in notebooks/09_3d_reconstruction.ipynb.
    """
    images = data.images if data.images.ndim == 3 else data.images[..., 0]
    if data.unit != "display":  # measured in the display window: bone is what saturates it
        images = display_levels(images)
    side = min(images.shape[1:3]) if len(images) else 0
    if side < ENCLOSURE_SIDE:
        return np.ones(len(images), dtype=bool)
    step = side // ENCLOSURE_SIDE
    small = np.asarray(images[:, ::step, ::step], dtype=np.float32)
    if brains is None or step > 1:
        brains = brain_mask_stack(small, unit="display")
    return np.array([skull_enclosure(image, brain, "display") >= MIN_SKULL_ENCLOSURE
                     for image, brain in zip(small, brains)], dtype=bool)


def _cross_neighbours(mask: np.ndarray) -> tuple[np.ndarray, ...]:
    """The 4 neighbours of every pixel of a stack (N, H, W); False beyond the border."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    return padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]


def erode_cross(masks: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Erode each mask of a stack (N, H, W) by ``pixels`` (4-connected cross; beyond the border is False)."""
    for _ in range(int(pixels)):
        up, down, left, right = _cross_neighbours(masks)
        masks = masks & up & down & left & right
    return masks


def dilate_cross(masks: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Dilate each mask of a stack (N, H, W) by ``pixels`` (4-connected cross), nothing crossing slices."""
    for _ in range(int(pixels)):
        up, down, left, right = _cross_neighbours(masks)
        masks = masks | up | down | left | right
    return masks


def _clean(candidate: np.ndarray, opening: int, min_size: int) -> np.ndarray:
    """Opening with a 4-connected cross and small-component removal, slice by slice (N, H, W).

    NumPy shifts instead of scipy's n-d morphology: the whole stack in one pass, nothing
    connecting across slices, and several times faster on a busy CPU.
    """
    candidate = dilate_cross(erode_cross(candidate, opening), opening)
    if min_size > 1 and candidate.any():
        square = np.zeros((3, 3, 3), dtype=bool)
        square[1] = True
        labels, count = ndimage.label(candidate, structure=square)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        small = sizes < min_size
        small[0] = True
        candidate = ~small[labels]
    return candidate


def threshold_in_brain(
    images: np.ndarray,
    brain_masks: np.ndarray | None = None,
    unit: str = "display",
    low: float = 150.0,
    high: float = 230.0,
    erosion: int = 1,
    opening: int = 1,
    min_size: int = 4,
) -> np.ndarray:
    """The classical baseline: hyperdense pixels inside the brain, lightly cleaned up.

    Fresh blood is brighter than brain (about 50–90 HU against 20–40 HU; in the 8-bit
    brain-windowed CT-ICH PNGs blood lies around 150–200, brain around 100–130) and darker than
    bone, so a band of intensities inside the brain finds much of it without any training.
    The brain mask is eroded first because the skull's inner edge, blurred by the pixel size,
    passes through the same band all around the head; then a morphological opening and a
    minimum component size remove isolated speckle.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        images: (H, W) or (N, H, W) slices (a trailing channel axis of 1 is allowed).
        brain_masks: bool masks of the same shape; default :func:`brain_mask_stack`.
        unit: ``"display"`` (thresholds in 0..255 levels; 0..1 images are scaled up) or ``"HU"``.
        low: lowest intensity counted as blood (inclusive).
        high: highest intensity counted as blood (inclusive); bone lies above.
        erosion: pixels removed from the brain mask's border (0 keeps it).
        opening: iterations of binary opening with a 4-connected cross (0 skips it).
        min_size: connected regions smaller than this many pixels are dropped.

    Returns:
        uint8 masks (0/1) of the images' shape (without channel axis).

    Raises:
        ValueError: bad shapes, ``low > high``, negative sizes or an unknown unit.
    """
    stack, single = _stack(images)
    if low > high:
        raise ValueError(f"low must not exceed high, got low={low!r}, high={high!r}")
    if min(erosion, opening, min_size) < 0:
        raise ValueError(f"erosion, opening and min_size must be >= 0, got {erosion}, {opening}, {min_size}")
    levels = _levels(stack, unit)
    if brain_masks is None:
        brains = brain_mask_stack(stack, unit=unit)
    else:
        brains, _ = _stack(np.asarray(brain_masks, dtype=np.float32))
        brains = brains > 0
        if brains.shape != stack.shape:
            raise ValueError(f"brain_masks shape {brains.shape} does not match images shape {stack.shape}")
    brains = erode_cross(brains, int(erosion))
    band = (levels >= low) & (levels <= high) & brains
    out = _clean(band, int(opening), int(min_size)).astype(np.uint8)
    return out[0] if single else out


def fit_threshold(
    train_images: np.ndarray,
    train_masks: np.ndarray,
    brain_masks: np.ndarray | None = None,
    unit: str = "display",
    lows: Sequence[float] | None = None,
    highs: Sequence[float] | None = None,
    erosions: Sequence[int] = (0, 1, 2, 3),
    opening: int = 1,
    min_size: int = 4,
    patient_ids: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Choose the band (and brain-mask erosion) of :func:`threshold_in_brain` by grid search.

    Give it training or validation slices only: a band chosen on the test patients would make
    the baseline look better than it is.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        train_images: (N, H, W) slices.
        train_masks: (N, H, W) true masks (non-zero = lesion).
        brain_masks: precomputed brain masks; default :func:`brain_mask_stack`.
        unit: ``"display"`` or ``"HU"``.
        lows: candidate lower bounds; default 110..200 (display) or 30..80 HU in steps.
        highs: candidate upper bounds; default 190..255 (display) or 80..130 HU.
        erosions: candidate brain-mask erosions in pixels.
        opening: passed to :func:`threshold_in_brain`.
        min_size: passed to :func:`threshold_in_brain`.
        patient_ids: when given, maximise the mean of per-patient Dice (each patient's pixels
            pooled) instead of the pooled Dice of all slices.

    Returns:
        ``{"low", "high", "erosion", "dice"}``: the best band and its Dice on these slices (ties
        go to the first in grid order: lowest erosion, lowest low, lowest high).

    Raises:
        ValueError: shapes differ, or no candidate has ``low <= high``.
    """
    from .metrics import metrics_from_counts, per_patient_dice, slice_confusion

    stack, _ = _stack(train_images)
    truth = np.asarray(train_masks)
    if truth.ndim == 2:
        truth = truth[None]
    if truth.shape != stack.shape:
        raise ValueError(f"train_masks shape {truth.shape} does not match images shape {stack.shape}")
    if lows is None:
        lows = np.arange(110, 201, 5) if unit == "display" else np.arange(30, 81, 5)
    if highs is None:
        highs = (190, 205, 220, 235, 255) if unit == "display" else (80, 90, 100, 115, 130)
    brains = brain_mask_stack(stack, unit=unit) if brain_masks is None else np.asarray(brain_masks) > 0
    best: dict[str, float] | None = None
    for erosion in erosions:
        eroded = erode_cross(brains, int(erosion))
        for low in lows:
            for high in highs:
                if low > high:
                    continue
                pred = threshold_in_brain(stack, eroded, unit=unit, low=float(low), high=float(high),
                                          erosion=0, opening=opening, min_size=min_size)
                counts = slice_confusion(truth > 0, pred > 0)
                if patient_ids is None:
                    score = metrics_from_counts(*counts.sum(axis=0))["dice"]
                else:
                    score = float(np.mean(per_patient_dice(counts, patient_ids)[1]))
                if best is None or score > best["dice"] + 1e-12:
                    best = dict(low=float(low), high=float(high), erosion=int(erosion), dice=score)
    if best is None:
        raise ValueError("no candidate band with low <= high; widen lows/highs")
    return best


def _target_shape(size: int | Sequence[int]) -> tuple[int, int]:
    shape = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"size must be a positive int or (rows, cols), got {size!r}")
    return shape


def resize_image(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """The kit's one resizer for images and probabilities: bilinear, anti-aliased when shrinking.

    ``image`` is (H, W) or (H, W, C); ``size`` an int (square) or (rows, cols). Every resize of
    image data in the kit comes here: the readers' ``image_size``, :func:`resize_dataset`, the
    split's feature inputs, and predictions brought back to a slice's own size. (Exact block
    means — the split's cheap intensity features, the 3-D view's coarse meshes — are averages
    over whole pixel blocks, not resizes.)

    Pillow's bilinear filter widens its triangle by the reduction factor when shrinking, which is
    the anti-aliasing (like ``skimage.transform.resize(order=1, anti_aliasing=True)``, whose
    Gaussian prefilter it replaces at a fifth of the cost); enlarging is plain bilinear
    interpolation. Channels are resized one by one, as float32.
    """
    from PIL import Image

    shape = _target_shape(size)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an image (H, W) or (H, W, C), got shape {image.shape}")
    if image.shape[:2] == shape:
        return image.copy()
    if image.ndim == 3:
        return np.stack([resize_image(image[..., c], shape) for c in range(image.shape[2])], axis=-1)
    out = Image.fromarray(np.ascontiguousarray(image)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(out, dtype=np.float32)


def resize_mask(mask: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
    """The kit's one resizer for label masks: nearest neighbour, so no new label value appears.

    Pillow samples the source pixel under each output pixel's centre, like
    ``skimage.transform.resize(order=0)``, at a fiftieth of the cost. The dtype is kept.
    """
    from PIL import Image

    shape = _target_shape(size)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D label mask, got shape {mask.shape}")
    if mask.shape == shape:
        return mask.copy()
    if mask.dtype.kind == "f":
        work = np.ascontiguousarray(mask, dtype=np.float32)
    elif mask.size and (mask.min() < 0 or mask.max() > np.iinfo(np.int32).max):
        raise ValueError(f"label values must lie in 0..2**31-1, got {mask.min()}..{mask.max()}")
    else:
        small = not mask.size or mask.max() <= 255
        work = np.ascontiguousarray(mask, dtype=np.uint8 if small else np.int32)
    out = Image.fromarray(work).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(out).astype(mask.dtype)


def rescale_spacing(spacing: Sequence[float], shape: Sequence[int], size: int | Sequence[int]) -> tuple[float, float]:
    """Pixel spacing (row, col) in mm after resizing a (rows, cols) slice to ``size``×``size`` (or to (rows, cols)).

    The field of view stays the same, so a slice shrunk from 512 to 128 pixels has pixels four
    times as wide: the rule every resize in the kit (:func:`resize_dataset`, the readers'
    ``image_size``) applies, so areas in mm² do not change with the image size.
    """
    rows, cols = _target_shape(size)
    return (float(spacing[0]) * int(shape[0]) / rows, float(spacing[1]) * int(shape[1]) / cols)


def resize_dataset(dataset: SliceDataset, size: int) -> SliceDataset:
    """A copy of the dataset at ``size``×``size`` (images linear, masks nearest); spacing rescaled."""
    if dataset.image_shape[:2] == (size, size):
        return dataset.replace()
    images = np.stack([resize_image(im, size) for im in dataset.images]) if len(dataset) else dataset.images
    masks = np.stack([resize_mask(m, size) for m in dataset.masks]) if len(dataset) else dataset.masks
    spacing = None
    if dataset.spacing is not None:
        spacing = rescale_spacing(dataset.spacing, dataset.image_shape[:2], size)
    return dataset.replace(images=images, masks=masks, spacing=spacing)


def normalize(image: np.ndarray, method: str = "minmax", mask: np.ndarray | None = None) -> np.ndarray:
    """Normalise intensities: ``"minmax"`` to [0, 1] or ``"zscore"`` to mean 0, sd 1.

    Statistics come from the pixels under ``mask`` (e.g. the brain) when given, so air and
    bone do not dominate them.
    """
    image = np.asarray(image, dtype=np.float32)
    values = image[mask.astype(bool)] if mask is not None else image
    if values.size == 0:
        raise DataError("normalize: the mask selects no pixels")
    if method == "minmax":
        low, high = float(values.min()), float(values.max())
        return np.zeros_like(image) if high <= low else (image - low) / (high - low)
    if method == "zscore":
        sd = float(values.std())
        return image - float(values.mean()) if sd == 0 else (image - float(values.mean())) / sd
    raise ValueError(f"Expected one of ['minmax', 'zscore']. Received: method={method!r}")


def prepare_inputs(
    dataset: SliceDataset,
    image_size: int | None = None,
    windows: Sequence[str | Sequence[float]] = ("brain",),
    strip_skull: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready arrays: images (N, S, S, len(windows)) in [0, 1] and masks (N, S, S) uint8.

    Each window becomes one input channel (several CT windows as channels help a model see
    both subtle ischemia and bright blood). Display-unit data cannot be re-windowed: it is
    scaled to [0, 1] once and repeated for each requested window.
    """
    data = resize_dataset(dataset, image_size) if image_size else dataset
    channels = []
    for window in windows:
        if data.images.ndim == 4:
            raise DataError("prepare_inputs expects single-channel slices")
        channels.append(to_unit_range(data.images, data.unit, window))
    x = np.stack(channels, axis=-1).astype(np.float32)
    if strip_skull:
        brains = np.stack([brain_mask(im, data.unit) for im in data.images])
        x = x * brains[..., None]
    return x, data.masks.copy()


def dataset_statistics(dataset: SliceDataset):
    """Per-slice table for the statistics chart: lesion area (pixels and mm² when spacing is
    known), lesion class present, patient, level (when the dataset has it)."""
    table = dataset.to_frame()
    if dataset.spacing is not None:
        table["lesion_mm2"] = table["lesion_pixels"] * dataset.spacing[0] * dataset.spacing[1]
    for label, name in enumerate(dataset.class_names):
        if label:
            table[f"has_{name}"] = (dataset.masks == label).reshape(len(dataset), -1).any(axis=1)
    return table


def plot_statistics(dataset: SliceDataset):
    """The study's statistics chart: lesion area per slice, slices per class, slices per patient.

    Returns:
        matplotlib Figure with three panels.
    """
    from matplotlib.figure import Figure

    table = dataset_statistics(dataset)
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    area = table["lesion_mm2"] if "lesion_mm2" in table else table["lesion_pixels"]
    unit = "mm²" if "lesion_mm2" in table else "pixels"
    positive = area[area > 0]
    axes[0].hist(positive, bins=min(20, max(5, len(positive) // 3)), color="tab:red", alpha=0.8)
    axes[0].set(title="Lesion area per lesion slice", xlabel=f"area ({unit})", ylabel="slices")
    names = [n for n in dataset.class_names[1:]]
    counts = [int(table[f"has_{n}"].sum()) for n in names] + [int((table["lesion_pixels"] == 0).sum())]
    axes[1].bar(
        names + ["no lesion"], counts, color=["tab:red", "tab:green", "tab:blue", "tab:orange"][: len(names)] + ["grey"]
    )
    axes[1].set(title="Slices per class", ylabel="slices")
    if dataset.patient_ids is not None:
        per_patient = table.groupby("patient_id", sort=False)["lesion_pixels"].agg(lambda s: int((s > 0).sum()))
        totals = table.groupby("patient_id", sort=False).size()
        x = np.arange(len(totals))
        axes[2].bar(x, totals.values, color="lightgrey", label="all slices")
        axes[2].bar(x, per_patient.values, color="tab:red", label="with lesion")
        axes[2].set_xticks(x, totals.index, rotation=90, fontsize=7)
        axes[2].legend(fontsize=8)
        axes[2].set(title="Slices per patient", ylabel="slices")
    else:
        axes[2].set_axis_off()
        axes[2].text(0.5, 0.5, "no patient ids", ha="center")
    return fig


def plot_windows(image_hu: np.ndarray, windows: Sequence[str] = ("brain", "stroke", "subdural", "bone")):
    """One HU slice under several windows side by side. Returns a Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(windows), 3.4), layout="constrained")
    axes = fig.subplots(1, len(windows))
    for ax, name in zip(np.atleast_1d(axes), windows):
        level, width = resolve_window(name)
        ax.imshow(window_hu(image_hu, name), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name}: L{level:g} W{width:g}", fontsize=9)
        ax.set_axis_off()
    return fig


def plot_overlays(dataset: SliceDataset, index: Sequence[int], window: str = "brain", ncols: int = 4):
    """A montage of slices with their masks overlaid (colour per class). Returns a Figure."""
    from matplotlib.figure import Figure

    index = list(index)
    nrows = max(1, int(np.ceil(len(index) / ncols)))
    fig = Figure(figsize=(3 * ncols, 3.1 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, i in zip(axes.ravel(), index):
        image = dataset.images[i]
        if image.ndim == 3:
            image = image[..., 0]
        ax.imshow(overlay_mask(to_unit_range(image, dataset.unit, window), dataset.masks[i]))
        label = dataset.case_ids[i]
        if "level" in dataset.extra:
            label += f"\n{dataset.extra['level'][i]}"
        ax.set_title(label, fontsize=8)
    return fig
