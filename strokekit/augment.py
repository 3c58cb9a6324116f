"""Paired image/mask augmentation in NumPy/SciPy and a Keras ``PyDataset`` batch loader.

Everything here is backend-agnostic: the transforms are NumPy/SciPy (no ``tf.image``), so
training works the same under the TensorFlow, JAX and PyTorch Keras backends.

Geometry (rotation, shear, zoom, shift and flips about the image centre) is composed into ONE
affine matrix and applied once with :func:`scipy.ndimage.affine_transform`: linear
interpolation (order 1) for the image and nearest neighbour (order 0) for the mask, so mask
labels are copied, never interpolated, and image and mask move identically. An optional elastic
deformation is folded into the same resampling (one displacement field, one
:func:`scipy.ndimage.map_coordinates` call per array). Intensity changes (contrast, gamma, noise,
blur) touch the image only and assume image values in [0, 1] (the output is clipped to [0, 1]
whenever one of them is active).

The few-shot study (notebooks/10_what_generalizes.ipynb) adds :data:`STRONG_AUGMENT` (rotations up to
180 degrees, both flips) and crops: :func:`sample_patches` for training, :func:`tile_patches` for validation.

Introduced in notebooks/03_augmentation.ipynb.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .dataset import SliceDataset, concat
from .errors import DataError

FILL_MODES = ("constant", "nearest", "reflect")

# Fixed positions in the SeedSequence entropy so that the shuffle stream and the per-sample
# streams can never coincide (SeedSequence pads short entropy with zeros, so [s, e] == [s, e, 0]).
_SHUFFLE_TAG = 0
_SAMPLE_TAG = 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strength of each random transform; a strength of 0 (or False) switches it off.

    Every range is symmetric: a value ``v`` means a uniform draw in ``[-v, +v]``.

    Attributes:
        rotation: degrees; positive angles turn the image counter-clockwise as displayed.
        shift: fraction of the image height (rows) and width (columns), drawn separately.
        shear: horizontal shear factor ``s`` (a column moves by ``s`` × its row offset from the
            centre), i.e. the tangent of the shear angle; for small values it is the angle in
            radians (0.1 ≈ 5.7°). Keras' ``ImageDataGenerator(shear_range=...)`` takes degrees
            instead, so its ``shear_range=0.1`` is almost no shear at all.
        zoom: isotropic scale ``1 + u``, ``u`` uniform in ``[-zoom, zoom]``; above 1 enlarges
            the content (zooms in). Must be below 1.
        hflip: mirror left-right with probability 0.5.
        vflip: mirror top-bottom with probability 0.5 (off in the study: heads are upright).
        elastic_alpha: largest elastic displacement in pixels; 0 disables elastic deformation.
        elastic_sigma: Gaussian smoothing (pixels) of the random displacement field; larger is
            smoother.
        contrast: image only: ``(x - mean) · (1 + u) + mean``, ``u`` uniform in ±contrast.
        gamma: image only: ``x ** exp(u)``, ``u`` uniform in ±gamma (a fraction of log-gamma).
        noise: image only: standard deviation of added Gaussian noise, in image units.
        blur: image only: Gaussian blur with sigma uniform in ``[0, blur]`` pixels.
        fill_mode: how pixels that come from outside the image are filled: ``"constant"``
            (0 in image and mask), ``"nearest"`` (edge value) or ``"reflect"`` (mirror,
            ``abcd|dcba``, like Keras' ``"reflect"``).
        p: probability that a sample is augmented at all; otherwise it passes unchanged.
    """

    rotation: float = 15.0
    shift: float = 0.1
    shear: float = 0.1
    zoom: float = 0.1
    hflip: bool = True
    vflip: bool = False
    elastic_alpha: float = 0.0
    elastic_sigma: float = 8.0
    contrast: float = 0.0
    gamma: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    fill_mode: str = "constant"
    p: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "rotation",
            "shift",
            "shear",
            "zoom",
            "elastic_alpha",
            "contrast",
            "gamma",
            "noise",
            "blur",
        ):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(
                    f"AugmentConfig.{name} must be a finite number >= 0, got {value!r}"
                )
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom must be below 1 (a ±fraction), got {self.zoom!r}")
        if self.contrast >= 1:
            raise ValueError(
                f"AugmentConfig.contrast must be below 1 (a ±fraction), got {self.contrast!r}"
            )
        if not self.elastic_sigma > 0:
            raise ValueError(
                f"AugmentConfig.elastic_sigma must be > 0 pixels, got {self.elastic_sigma!r}"
            )
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"AugmentConfig.p must lie in [0, 1], got {self.p!r}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(
                f"Expected one of {list(FILL_MODES)}. Received: fill_mode={self.fill_mode!r}"
            )

    @property
    def enabled(self) -> bool:
        """Whether any transform can change a sample."""
        return self.p > 0 and any(
            (
                self.rotation,
                self.shift,
                self.shear,
                self.zoom,
                self.hflip,
                self.vflip,
                self.elastic_alpha,
                self.contrast,
                self.gamma,
                self.noise,
                self.blur,
            )
        )


#: The study's settings, in the spirit of the Keras ``ImageDataGenerator`` used in such studies
#: (rotation_range=15, width/height_shift_range=0.1, shear 0.1, zoom_range=0.1,
#: horizontal_flip=True); nothing elastic and no intensity changes.
STUDY_AUGMENT = AugmentConfig(rotation=15.0, shift=0.1, shear=0.1, zoom=0.1, hflip=True)

#: Every transform off: samples pass through unchanged.
NO_AUGMENT = AugmentConfig(rotation=0.0, shift=0.0, shear=0.0, zoom=0.0, hflip=False, vflip=False)

#: Geometry and intensity augmentation strong enough to break a position prior
#: (:meth:`strokekit.config.TrainConfig.few_shot`).
STRONG_AUGMENT = AugmentConfig(
    rotation=180.0, shift=0.2, shear=0.1, zoom=0.2, hflip=True, vflip=True,
    contrast=0.15, gamma=0.15, noise=0.01, fill_mode="constant",
)


# ---------------------------------------------------------------------------- random draws
def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (bool, np.bool_)) or not isinstance(rng, (int, np.integer)):
        raise ValueError(f"expected a numpy.random.Generator or an int seed, got {rng!r}")
    return np.random.default_rng(int(rng))


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that draws the augmentation of sample ``index`` in ``epoch``.

    A pure function of its arguments, so a sample's augmentation does not depend on batch
    order or on which worker computes it. :func:`augment_batch` uses epoch 0.
    """
    return np.random.default_rng(
        np.random.SeedSequence([_check_seed(seed), int(epoch), _SAMPLE_TAG, int(index)])
    )


def identity_params() -> dict[str, Any]:
    """Parameters that leave image and mask unchanged (the keys of :func:`random_transform`)."""
    return {
        "applied": False,
        "rotation": 0.0,
        "shift_row": 0.0,
        "shift_col": 0.0,
        "shear": 0.0,
        "zoom": 1.0,
        "hflip": False,
        "vflip": False,
        "elastic_alpha": 0.0,
        "elastic_sigma": 8.0,
        "elastic_seed": 0,
        "contrast": 1.0,
        "gamma": 1.0,
        "noise_sd": 0.0,
        "noise_seed": 0,
        "blur_sigma": 0.0,
    }


def random_transform(config: AugmentConfig, rng: np.random.Generator | int) -> dict[str, Any]:
    """Draw the parameters of one random transform (to display, test or replay it).

    Every parameter is drawn on every call, in a fixed order, even when its strength is 0, so
    changing one slider does not change the draws of the others.

    Args:
        config: the strengths.
        rng: a ``numpy.random.Generator`` (advanced in place) or an int seed.

    Returns:
        dict with ``applied`` (False when the sample skips augmentation, probability 1 - p),
        ``rotation`` (degrees), ``shift_row``/``shift_col`` (fractions of height/width),
        ``shear`` (factor), ``zoom`` (scale, 1 = none), ``hflip``/``vflip``, ``elastic_alpha``/
        ``elastic_sigma`` (pixels) and ``elastic_seed``, ``contrast`` and ``gamma`` (factors,
        1 = none), ``noise_sd`` and ``noise_seed``, ``blur_sigma`` (pixels). Feed it to
        :func:`apply_transform`.
    """
    rng = _as_rng(rng)
    c = config
    draws = {
        "applied": bool(rng.random() < c.p),
        "rotation": float(rng.uniform(-c.rotation, c.rotation)),
        "shift_row": float(rng.uniform(-c.shift, c.shift)),
        "shift_col": float(rng.uniform(-c.shift, c.shift)),
        "shear": float(rng.uniform(-c.shear, c.shear)),
        "zoom": float(1.0 + rng.uniform(-c.zoom, c.zoom)),
        "hflip": bool(rng.random() < 0.5) and c.hflip,
        "vflip": bool(rng.random() < 0.5) and c.vflip,
        "elastic_alpha": float(c.elastic_alpha),
        "elastic_sigma": float(c.elastic_sigma),
        "elastic_seed": int(rng.integers(0, 2**31 - 1)),
        "contrast": float(1.0 + rng.uniform(-c.contrast, c.contrast)),
        "gamma": float(math.exp(rng.uniform(-c.gamma, c.gamma))),
        "noise_sd": float(c.noise),
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
        "blur_sigma": float(rng.uniform(0.0, c.blur)),
    }
    if not draws["applied"]:
        return identity_params()
    return draws


# ---------------------------------------------------------------------------- geometry
def affine_matrix(params: dict[str, Any], shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The output→input mapping of the geometric part of ``params`` for an (H, W) image.

    The forward map (input → output) about the centre ``c`` is
    ``out = F (in - c) + c + t`` with ``F = flip · rotation · shear · zoom`` in (row, col)
    coordinates and ``t`` the shift in pixels. SciPy resamples by pulling, so this returns
    ``matrix = F⁻¹`` and ``offset = c - F⁻¹ (c + t)``, i.e. ``in = matrix @ out + offset``.

    Returns:
        (matrix (2, 2), offset (2,)), ready for :func:`scipy.ndimage.affine_transform`.
    """
    h, w = int(shape[0]), int(shape[1])
    theta = math.radians(params["rotation"])
    cos, sin = math.cos(theta), math.sin(theta)
    # Rows point down, so a counter-clockwise turn on screen is this matrix on (row, col).
    rotation = np.array([[cos, -sin], [sin, cos]])
    shear = np.array([[1.0, 0.0], [params["shear"], 1.0]])
    zoom = np.diag([params["zoom"], params["zoom"]])
    flip = np.diag([-1.0 if params["vflip"] else 1.0, -1.0 if params["hflip"] else 1.0])
    forward = flip @ rotation @ shear @ zoom
    inverse = np.linalg.inv(forward)
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    shift = np.array([params["shift_row"] * h, params["shift_col"] * w])
    offset = centre - inverse @ (centre + shift)
    return inverse, offset


def _is_identity(matrix: np.ndarray, offset: np.ndarray) -> bool:
    return bool(np.array_equal(matrix, np.eye(2)) and np.all(offset == 0))


def _exact_flip(
    matrix: np.ndarray, offset: np.ndarray, shape: Sequence[int]
) -> tuple[bool, bool] | None:
    """(vflip, hflip) when the map is a pure flip, else None: flips are done by indexing,
    which is exact and much faster than resampling."""
    h, w = shape[0], shape[1]
    diag = np.diag(matrix)
    if not (matrix[0, 1] == 0 and matrix[1, 0] == 0 and np.all(np.abs(diag) == 1)):
        return None
    expected = np.array([0.0 if diag[0] == 1 else h - 1.0, 0.0 if diag[1] == 1 else w - 1.0])
    if not np.allclose(offset, expected, atol=1e-9, rtol=0):
        return None
    return bool(diag[0] == -1), bool(diag[1] == -1)


def _elastic_field(shape: Sequence[int], alpha: float, sigma: float, seed: int) -> np.ndarray:
    """Smooth random displacement (2, H, W) in pixels whose largest component is ``alpha``."""
    rng = np.random.default_rng(seed)
    field = rng.uniform(-1.0, 1.0, size=(2, int(shape[0]), int(shape[1])))
    for axis in range(2):
        field[axis] = ndimage.gaussian_filter(field[axis], sigma, mode="reflect")
    peak = float(np.abs(field).max())
    return field * (alpha / peak) if peak > 0 else field


def _resample(array2d: np.ndarray, matrix, offset, coords, order: int, mode: str, out_dtype):
    if coords is None:
        return ndimage.affine_transform(
            array2d,
            matrix,
            offset=offset,
            order=order,
            mode=mode,
            cval=0.0,
            output=out_dtype,
            prefilter=False,
        )
    return ndimage.map_coordinates(
        array2d, coords, order=order, mode=mode, cval=0.0, output=out_dtype, prefilter=False
    )


def _geometry(image: np.ndarray, mask: np.ndarray | None, params: dict[str, Any], mode: str):
    shape = image.shape[:2]
    matrix, offset = affine_matrix(params, shape)
    elastic = params.get("elastic_alpha", 0.0) > 0
    if not elastic:
        if _is_identity(matrix, offset):
            return image.copy(), None if mask is None else mask.copy()
        flips = _exact_flip(matrix, offset, shape)
        if flips is not None:
            rows = slice(None, None, -1) if flips[0] else slice(None)
            cols = slice(None, None, -1) if flips[1] else slice(None)
            return (
                np.ascontiguousarray(image[rows, cols]),
                None if mask is None else np.ascontiguousarray(mask[rows, cols]),
            )
        coords = None
    else:
        # Displace the output grid first, then map it through the affine: one resampling.
        field = _elastic_field(
            shape, params["elastic_alpha"], params["elastic_sigma"], params["elastic_seed"]
        )
        grid = np.indices(shape, dtype=np.float64) + field
        coords = np.einsum("ij,jhw->ihw", matrix, grid) + offset[:, None, None]

    if image.ndim == 2:
        out_image = _resample(image, matrix, offset, coords, 1, mode, np.float32)
    else:
        out_image = np.stack(
            [
                _resample(
                    np.ascontiguousarray(image[..., k]), matrix, offset, coords, 1, mode, np.float32
                )
                for k in range(image.shape[-1])
            ],
            axis=-1,
        )
    out_mask = None
    if mask is not None:
        work = mask.view(np.uint8) if mask.dtype == bool else mask
        out_mask = _resample(work, matrix, offset, coords, 0, mode, work.dtype)
        if mask.dtype == bool:
            out_mask = out_mask.astype(bool)
    return out_image, out_mask


# ---------------------------------------------------------------------------- intensity
def _intensity(image: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    changed = False
    if params["blur_sigma"] > 0:
        sigma = (params["blur_sigma"], params["blur_sigma"]) + (0,) * (image.ndim - 2)
        image = ndimage.gaussian_filter(image, sigma)
        changed = True
    if params["contrast"] != 1.0:
        mean = image.mean(axis=(0, 1), keepdims=True)
        image = (image - mean) * params["contrast"] + mean
        changed = True
    if params["gamma"] != 1.0:
        image = np.clip(image, 0.0, 1.0) ** params["gamma"]
        changed = True
    if params["noise_sd"] > 0:
        rng = np.random.default_rng(params["noise_seed"])
        image = image + rng.normal(0.0, params["noise_sd"], size=image.shape).astype(np.float32)
        changed = True
    if changed:
        image = np.clip(image, 0.0, 1.0)
    return image.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- public transforms
def _check_pair(image: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {image.shape}")
    image = image.astype(np.float32, copy=False)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ValueError(
                f"mask shape {mask.shape} does not match image shape {image.shape[:2]}"
            )
        if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
            raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
    return image, mask


def apply_transform(
    image: np.ndarray,
    mask: np.ndarray | None,
    params: dict[str, Any],
    config: AugmentConfig,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one set of drawn parameters to an image and its mask with identical geometry.

    Args:
        image: (H, W) or (H, W, C); every channel gets the same geometry. Intensity transforms
            assume values in [0, 1].
        mask: (H, W) integer (or bool) labels, or None for an image alone.
        params: from :func:`random_transform` or :func:`identity_params`.
        config: supplies ``fill_mode`` (the strengths are already in ``params``).

    Returns:
        (image float32 of the input shape, mask of the input dtype with a subset of its labels
        (plus 0 where ``fill_mode="constant"`` brings in background)).

    Raises:
        ValueError: for shapes that do not fit or a non-integer mask.
    """
    image, mask = _check_pair(image, mask)
    image, mask = _geometry(image, mask, params, config.fill_mode)
    return _intensity(image, params), mask


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray | None,
    config: AugmentConfig,
    rng: np.random.Generator | int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one random transform and apply it to an image and its mask.

    Args:
        image: (H, W) or (H, W, C), values in [0, 1] when intensity transforms are on.
        mask: (H, W) integer labels (or None).
        config: the strengths.
        rng: a ``numpy.random.Generator`` (advanced in place) or an int seed.

    Returns:
        (augmented image float32, augmented mask of the mask's dtype).
    """
    return apply_transform(image, mask, random_transform(config, rng), config)


def augment_batch(
    images: np.ndarray,
    masks: np.ndarray | None,
    config: AugmentConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augment a stack of slices; sample ``i`` uses :func:`sample_rng` ``(seed, 0, i)``.

    Args:
        images: (N, H, W) or (N, H, W, C).
        masks: (N, H, W) integer labels, or None.
        config: the strengths.
        seed: non-negative int; the same seed gives the same output.

    Returns:
        (images float32 (N, ...), masks of the input dtype, or None).
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != images.shape[:3]:
            raise ValueError(
                f"masks shape {masks.shape} does not match images shape {images.shape[:3]}"
            )
    out_images = np.empty(images.shape, dtype=np.float32)
    out_masks = None if masks is None else np.empty_like(masks)
    for i in range(len(images)):
        img, msk = augment_pair(
            images[i], None if masks is None else masks[i], config, sample_rng(seed, 0, i)
        )
        out_images[i] = img
        if out_masks is not None:
            out_masks[i] = msk
    return out_images, out_masks


def check_masks_valid(masks: np.ndarray, allowed_labels: Sequence[int]) -> dict[str, Any]:
    """Check that masks hold only allowed integer labels (what interpolated masks break).

    Args:
        masks: any array of labels, e.g. (N, H, W).
        allowed_labels: the labels the masks may hold, e.g. ``[0, 1]``.

    Returns:
        dict with ``valid`` (bool), ``dtype``, ``labels`` (sorted labels present),
        ``unexpected`` (present labels not in ``allowed_labels``), ``non_integer`` (number of
        pixels holding a fractional value, e.g. 0.5 after linear interpolation), ``counts``
        (pixels per label) and ``slices`` (slices containing each label; for an (N, H, W) stack).
    """
    masks = np.asarray(masks)
    allowed = sorted({int(v) for v in allowed_labels})
    if masks.dtype == bool:
        masks = masks.astype(np.uint8)
    if np.issubdtype(masks.dtype, np.floating):
        finite = np.isfinite(masks)
        non_integer = int((~finite).sum() + (masks[finite] != np.round(masks[finite])).sum())
    else:
        non_integer = 0
    values, counts = np.unique(masks, return_counts=True)
    integral = [
        (v, c)
        for v, c in zip(values.tolist(), counts.tolist(), strict=True)
        if np.isfinite(v) and float(v) == int(v)
    ]
    labels = [int(v) for v, _ in integral]
    unexpected = [v for v in labels if v not in allowed]
    if masks.ndim >= 3:
        flat = masks.reshape(len(masks), -1)
        slices = {v: int((flat == v).any(axis=1).sum()) for v in labels}
    else:
        slices = dict.fromkeys(labels, 1)
    return {
        "valid": not unexpected and non_integer == 0,
        "dtype": str(masks.dtype),
        "labels": labels,
        "unexpected": unexpected,
        "non_integer": non_integer,
        "counts": {int(v): int(c) for v, c in integral},
        "slices": slices,
    }


# ---------------------------------------------------------------------------- figures
def _display_scale(image: np.ndarray):
    """A function mapping images like ``image`` to [0, 1] grey for display (channel 0)."""
    grey = image[..., 0] if image.ndim == 3 else image
    lo, hi = float(np.min(grey)), float(np.max(grey))
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    span = hi - lo if hi > lo else 1.0

    def scale(img: np.ndarray) -> np.ndarray:
        g = img[..., 0] if img.ndim == 3 else img
        return np.clip((g - lo) / span, 0.0, 1.0)

    return scale


def _single_transforms(config: AugmentConfig, seed: int) -> list[tuple[str, dict[str, Any] | None]]:
    """Each transform alone at full strength (None when the config switches it off)."""
    rng = np.random.default_rng(seed)
    base = identity_params()

    def only(**changes):
        return {**base, "applied": True, **changes}

    c = config
    return [
        (f"rotation {c.rotation:g}°", only(rotation=c.rotation) if c.rotation else None),
        (f"shift {c.shift:g}", only(shift_row=c.shift, shift_col=c.shift) if c.shift else None),
        (f"shear {c.shear:g}", only(shear=c.shear) if c.shear else None),
        (f"zoom ×{1 + c.zoom:g}", only(zoom=1 + c.zoom) if c.zoom else None),
        ("horizontal flip", only(hflip=True) if c.hflip else None),
        ("vertical flip", only(vflip=True) if c.vflip else None),
        (
            f"elastic α={c.elastic_alpha:g} σ={c.elastic_sigma:g}",
            only(
                elastic_alpha=c.elastic_alpha,
                elastic_sigma=c.elastic_sigma,
                elastic_seed=int(rng.integers(0, 2**31 - 1)),
            )
            if c.elastic_alpha
            else None,
        ),
        (f"contrast ×{1 + c.contrast:g}", only(contrast=1 + c.contrast) if c.contrast else None),
        (f"gamma {math.exp(c.gamma):.3g}", only(gamma=math.exp(c.gamma)) if c.gamma else None),
        (
            f"noise sd {c.noise:g}",
            only(noise_sd=c.noise, noise_seed=int(rng.integers(0, 2**31 - 1))) if c.noise else None,
        ),
        (f"blur σ={c.blur:g}", only(blur_sigma=c.blur) if c.blur else None),
    ]


def show_transforms(image: np.ndarray, mask: np.ndarray, config: AugmentConfig, seed: int = 0):
    """One slice under each transform separately, at the config's full strength, mask outlined.

    Transforms the config switches off are drawn unchanged and titled "off".

    Args:
        image: (H, W) or (H, W, C) slice (channel 0 is shown).
        mask: (H, W) integer labels.
        config: the strengths.
        seed: seeds the random parts (elastic field, noise).

    Returns:
        matplotlib Figure: the original plus one panel per transform.
    """
    from matplotlib.figure import Figure

    from .preprocess import overlay_mask

    image, mask = _check_pair(image, mask)
    scale = _display_scale(image)
    panels = [("original", image, mask)]
    for title, params in _single_transforms(config, seed):
        if params is None:
            panels.append((f"{title} (off)", image, mask))
        else:
            img, msk = apply_transform(image, mask, params, config)
            panels.append((title, img, msk))
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.1 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, img, msk) in zip(axes, panels, strict=False):
        ax.imshow(overlay_mask(scale(img), msk.astype(np.int64), outline=True))
        ax.set_title(title, fontsize=9, color="0.5" if title.endswith("(off)") else "black")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"Each transform alone (fill_mode={config.fill_mode!r})")
    return fig


def _short(params: dict[str, Any]) -> str:
    if not params["applied"]:
        return "not augmented"
    parts = [f"rot {params['rotation']:+.0f}°", f"×{params['zoom']:.2f}"]
    if params["hflip"]:
        parts.append("⇆")
    if params["vflip"]:
        parts.append("⇅")
    return " ".join(parts)


def show_random_grid(
    image: np.ndarray, mask: np.ndarray, config: AugmentConfig, n: int = 12, seed: int = 0
):
    """A grid of ``n`` random augmentations of one slice with the mask overlaid.

    Args:
        image: (H, W) or (H, W, C) slice (channel 0 is shown).
        mask: (H, W) integer labels.
        config: the strengths.
        n: number of random draws.
        seed: draw ``k`` uses :func:`sample_rng` ``(seed, 0, k)``.

    Returns:
        matplotlib Figure.
    """
    from matplotlib.figure import Figure

    from .preprocess import overlay_mask

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    image, mask = _check_pair(image, mask)
    scale = _display_scale(image)
    ncols = min(n, 6)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.3 * ncols, 2.45 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for k in range(n):
        params = random_transform(config, sample_rng(seed, 0, k))
        img, msk = apply_transform(image, mask, params, config)
        axes[k].imshow(overlay_mask(scale(img), msk.astype(np.int64)))
        axes[k].set_title(_short(params), fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{n} random augmentations (seed {seed})")
    return fig


# ---------------------------------------------------------------------------- batch loader
def _make_loader_class():
    import keras

    class SegmentationLoader(keras.utils.PyDataset):
        """Batches of (augmented) slices for ``model.fit``, the same under every Keras backend.

        One loader object lives for the whole training run and its workers prepare the next
        batches while the model trains, so epochs do not stall on data (``fit`` on NumPy
        arrays re-slices them and idles 2–4 s at the start of many epochs on a small CPU).

        Determinism: the augmentation of sample ``i`` in epoch ``e`` comes from
        :func:`sample_rng` ``(seed, e, i)`` and the order of epoch ``e`` from a generator seeded
        with ``(seed, e)``, so batches do not depend on worker count or scheduling.
        :meth:`on_epoch_end` moves to the next epoch. Keras' ``fit``/``evaluate`` call it once
        before their first epoch too (a reset after peeking at a batch), on every backend, so a
        fresh loader trains its epochs 0, 1, … as loader epochs 1, 2, …; use :meth:`set_epoch`
        to replay one.

        Args:
            images: (N, H, W) or (N, H, W, C); a channel axis is added for (N, H, W).
            masks: (N, H, W) integer labels.
            batch_size: samples per batch; the last batch may be smaller.
            augment: strengths, or None for no augmentation (validation).
            shuffle: a new seeded order every epoch.
            seed: non-negative int.
            num_classes: 1 gives a binary target ``mask > 0`` (B, H, W, 1); K > 1 gives one-hot
                (B, H, W, K) and requires labels < K.
            workers: worker threads (or processes) ``fit`` uses to prepare batches.
            use_multiprocessing: processes instead of threads.
            max_queue_size: batches prepared ahead.
            channels_last: False gives (B, C, H, W) inputs and (B, K, H, W) targets.

        Yields (through ``loader[i]``):
            (x float32 (B, H, W, C), y float32 (B, H, W, K)).
        """

        def __init__(
            self,
            images: np.ndarray,
            masks: np.ndarray,
            batch_size: int = 8,
            augment: AugmentConfig | None = None,
            shuffle: bool = True,
            seed: int = 0,
            num_classes: int = 1,
            workers: int = 2,
            use_multiprocessing: bool = False,
            max_queue_size: int = 8,
            channels_last: bool = True,
        ):
            super().__init__(
                workers=workers,
                use_multiprocessing=use_multiprocessing,
                max_queue_size=max_queue_size,
            )
            images = np.asarray(images, dtype=np.float32)
            masks = np.asarray(masks)
            if images.ndim == 3:
                images = images[..., None]
            if images.ndim != 4:
                raise ValueError(
                    f"images must be (N, H, W) or (N, H, W, C), got shape {images.shape}"
                )
            if masks.shape != images.shape[:3]:
                raise ValueError(
                    f"masks shape {masks.shape} does not match images shape {images.shape[:3]}"
                )
            if len(images) == 0:
                raise ValueError("the loader needs at least one sample, got 0")
            if not (masks.dtype == bool or np.issubdtype(masks.dtype, np.integer)):
                raise ValueError(f"masks must hold integer labels, got dtype {masks.dtype}")
            if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
                raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
            if num_classes > 1 and masks.size and (masks.min() < 0 or masks.max() >= num_classes):
                raise ValueError(
                    f"mask labels must lie in 0..{num_classes - 1} for num_classes={num_classes}, "
                    f"found {int(masks.min())}..{int(masks.max())}"
                )
            if augment is not None and not isinstance(augment, AugmentConfig):
                raise ValueError(
                    f"augment must be an AugmentConfig or None, got {type(augment).__name__}"
                )
            self.images = images
            self.masks = masks
            self.batch_size = int(batch_size)
            self.augment = augment
            self.shuffle = bool(shuffle)
            self.seed = _check_seed(seed)
            self.num_classes = int(num_classes)
            self.channels_last = bool(channels_last)
            self.epoch = 0
            self._order = self._epoch_order(0)

        @classmethod
        def from_dataset(cls, dataset: SliceDataset, **kwargs: Any) -> SegmentationLoader:
            """A loader over a :class:`~strokekit.dataset.SliceDataset` (images as stored)."""
            return cls(dataset.images, dataset.masks, **kwargs)

        def _epoch_order(self, epoch: int) -> np.ndarray:
            n = len(self.images)
            if not self.shuffle:
                return np.arange(n)
            rng = np.random.default_rng(
                np.random.SeedSequence([self.seed, int(epoch), _SHUFFLE_TAG])
            )
            return rng.permutation(n)

        def set_epoch(self, epoch: int) -> None:
            """Jump to ``epoch`` (e.g. when resuming training)."""
            self.epoch = int(epoch)
            self._order = self._epoch_order(self.epoch)

        def __len__(self) -> int:
            return math.ceil(len(self.images) / self.batch_size)

        def batch_indices(self, index: int) -> np.ndarray:
            """Sample positions that make up batch ``index`` in the current epoch."""
            if not -len(self) <= index < len(self):
                raise IndexError(f"batch index {index} out of range for {len(self)} batches")
            index %= len(self)
            return self._order[index * self.batch_size : (index + 1) * self.batch_size]

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            picks = self.batch_indices(index)
            xs, ys = [], []
            for i in picks:
                image, mask = self.images[i], self.masks[i]
                if self.augment is not None and self.augment.enabled:
                    image, mask = augment_pair(
                        image, mask, self.augment, sample_rng(self.seed, self.epoch, int(i))
                    )
                xs.append(image)
                ys.append(mask)
            x = np.stack(xs).astype(np.float32, copy=False)
            labels = np.stack(ys)
            if self.num_classes == 1:
                y = (labels > 0).astype(np.float32)[..., None]
            else:
                y = np.eye(self.num_classes, dtype=np.float32)[labels.astype(np.intp)]
            if not self.channels_last:
                x, y = np.moveaxis(x, -1, 1), np.moveaxis(y, -1, 1)
            return np.ascontiguousarray(x), np.ascontiguousarray(y)

        def on_epoch_end(self) -> None:
            """Next epoch: a new seeded order and new augmentations."""
            self.set_epoch(self.epoch + 1)

    SegmentationLoader.__module__ = __name__
    SegmentationLoader.__qualname__ = "SegmentationLoader"
    return SegmentationLoader


_LOADER_CLASS = None


def __getattr__(name: str):
    # Keras is imported on first use of the loader only, so the transforms (and
    # `import strokekit.augment`) stay cheap; pickling finds the class through here too.
    global _LOADER_CLASS
    if name == "SegmentationLoader":
        if _LOADER_CLASS is None:
            _LOADER_CLASS = _make_loader_class()
        return _LOADER_CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- crops
def sample_patches(
    images: np.ndarray,
    masks: np.ndarray,
    patch_size: int,
    per_slice: int,
    foreground_fraction: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops of slices, a share of them guaranteed to contain a lesion pixel.

    For a foreground crop a lesion pixel is drawn at random and the crop's corner is drawn so
    that the pixel lies anywhere inside it (not always in the centre); other crops are uniform.
    Slices without lesion pixels give uniform crops only.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        images: (N, H, W) or (N, H, W, C).
        masks: (N, H, W).
        patch_size: crop side (at most min(H, W)).
        per_slice: crops per slice.
        foreground_fraction: probability that a crop of a lesion slice is a foreground crop.
        seed: seed of the draw.

    Returns:
        (patches (N·per_slice, p, p[, C]), patch masks (N·per_slice, p, p)).
    """
    images, masks = np.asarray(images), np.asarray(masks)
    n, h, w = masks.shape
    p = int(patch_size)
    if p > min(h, w) or p < 1:
        raise ValueError(f"patch_size must lie in 1..{min(h, w)}, got {patch_size!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 11]))
    out_x, out_y = [], []
    for i in range(n):
        lesion = np.argwhere(masks[i] > 0)
        for _ in range(int(per_slice)):
            if len(lesion) and rng.random() < foreground_fraction:
                r, c = lesion[rng.integers(len(lesion))]
                r0 = rng.integers(max(0, r - p + 1), min(r, h - p) + 1)
                c0 = rng.integers(max(0, c - p + 1), min(c, w - p) + 1)
            else:
                r0, c0 = rng.integers(0, h - p + 1), rng.integers(0, w - p + 1)
            out_x.append(images[i, r0:r0 + p, c0:c0 + p])
            out_y.append(masks[i, r0:r0 + p, c0:c0 + p])
    return np.stack(out_x), np.stack(out_y)


def tile_patches(x: np.ndarray, y: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping p x p tiles of every slice (for a validation loss on crop-sized inputs)."""
    n, h, w = y.shape
    xs = [x[:, r:r + p, c:c + p] for r in range(0, h - p + 1, p) for c in range(0, w - p + 1, p)]
    ys = [y[:, r:r + p, c:c + p] for r in range(0, h - p + 1, p) for c in range(0, w - p + 1, p)]
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------- offline oversampling
def _check_writable_images(dataset: SliceDataset, folder: Path) -> float:
    """The factor that turns the dataset's images into 8-bit pixels (255 for [0, 1] images)."""
    if dataset.unit != "display":
        raise DataError(
            "8-bit PNGs cannot hold HU values; window the dataset first "
            "(strokekit.preprocess.window_hu) and pass a dataset with unit='display'",
            folder,
        )
    if dataset.images.ndim == 4 and dataset.images.shape[-1] not in (1, 3):
        raise DataError(
            f"PNG copies need 1 or 3 channels, the images have {dataset.images.shape[-1]}", folder
        )
    return 255.0 if dataset.images.size == 0 or float(np.max(dataset.images)) <= 1.0 else 1.0


def _write_pngs(folder: Path, case_ids: list[str], pixels: np.ndarray, masks: np.ndarray) -> None:
    from PIL import Image

    for case, img, msk in zip(case_ids, pixels, masks, strict=True):
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        Image.fromarray(img).save(folder / f"{case}.png")
        Image.fromarray(msk.astype(np.uint8)).save(folder / f"{case}_mask.png")


def oversample_offline(
    dataset: SliceDataset,
    out_folder: str | os.PathLike,
    target_label: int,
    factor: int,
    config: AugmentConfig,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> SliceDataset:
    """Oversample a rare class by writing augmented copies of its slices to a NEW folder.

    The multiclass study balanced its rare class this way. Every slice that contains
    ``target_label`` gets ``factor`` augmented copies ``<case>_aug<k>`` (k = 1..factor), saved in
    the study layout by :func:`strokekit.io.write_study_layout` (``<case>_aug<k>.png``,
    ``<case>_aug<k>_mask.png``, the ``_result.png`` overlay and ``cases.csv``), so
    :func:`strokekit.io.read_study_layout` reads the folder back; 3-channel images (which that
    writer does not take) are saved as RGB PNGs with label-valued masks. A copy whose draw pushed
    the target label out of the frame is drawn again (up to 10 times). Copies keep their slice's
    patient id, so patient-wise splits keep them with their source. The source data are never
    touched.

    Args:
        dataset: the slices; ``unit`` must be ``"display"`` (0..1 or 0..255) because the copies
            are 8-bit PNGs.
        out_folder: folder for the copies; created if missing. It must not hold any of the
            dataset's source files and must be empty unless ``overwrite`` is True.
        target_label: the label whose slices are copied.
        factor: copies per slice (>= 1).
        config: augmentation strengths.
        seed: copy ``k`` of slice ``i`` draws from :func:`sample_rng` ``(seed, k, i)``.
        overwrite: allow writing into a non-empty folder (same-named files are replaced).
        progress: show a progress bar.

    Returns:
        The input slices followed by the copies, with extra columns ``augmented`` (bool) and
        ``augmented_from`` (source case id, "" for originals). Copies hold the 8-bit values
        written to disk, so reloading the folder gives the same arrays.

    Raises:
        DataError: for a folder holding source files, a non-empty folder without ``overwrite``,
            HU images, or no slice containing ``target_label``.
        ValueError: for a bad ``factor``, ``target_label`` or ``seed``.
    """
    from tqdm.auto import tqdm

    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if isinstance(target_label, bool) or int(target_label) != target_label or target_label < 1:
        raise ValueError(f"target_label must be a non-background label >= 1, got {target_label!r}")
    seed = _check_seed(seed)
    folder = Path(out_folder).resolve()
    sources = [Path(p).resolve() for p in dataset.source_paths if p]
    inside = [p for p in sources if p == folder or folder in p.parents]
    if inside:
        raise DataError(
            f"holds {len(inside)} source file(s) of the dataset (e.g. {inside[0].name}); "
            "write the augmented copies to a separate folder",
            folder,
        )
    if folder.exists() and not folder.is_dir():
        raise DataError("exists and is not a folder", folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise DataError("is not empty; choose a new folder or pass overwrite=True", folder)
    scale = _check_writable_images(dataset, folder)
    chosen = np.flatnonzero((dataset.masks == target_label).reshape(len(dataset), -1).any(axis=1))
    if len(chosen) == 0:
        raise DataError(f"no slice contains label {target_label}; nothing to oversample", folder)

    new_images, new_masks, new_ids, origin = [], [], [], []
    for k in tqdm(range(1, int(factor) + 1), desc="oversampling", disable=not progress):
        for i in chosen:
            rng = sample_rng(seed, k, int(i))
            for _attempt in range(10):
                img, msk = augment_pair(dataset.images[i], dataset.masks[i], config, rng)
                if (msk == target_label).any():
                    break
            new_images.append(img)
            new_masks.append(msk)
            new_ids.append(f"{dataset.case_ids[i]}_aug{k}")
            origin.append(int(i))
    origin_arr = np.array(origin, dtype=np.int64)
    pixels = np.clip(np.round(np.stack(new_images) * scale), 0, 255).astype(np.uint8)
    masks = np.stack(new_masks).astype(np.uint8)
    provenance = {
        "augmented": np.ones(len(origin), dtype=bool),
        "augmented_from": np.array([dataset.case_ids[i] for i in origin]),
    }
    copies = SliceDataset(
        images=pixels.astype(np.float32) / scale,
        masks=masks,
        case_ids=new_ids,
        patient_ids=None
        if dataset.patient_ids is None
        else [dataset.patient_ids[i] for i in origin],
        slice_indices=dataset.slice_indices[origin_arr],
        source_paths=None,
        unit=dataset.unit,
        class_names=dataset.class_names,
        spacing=dataset.spacing,
        slice_thickness=dataset.slice_thickness,
        extra={**{key: values[origin_arr] for key, values in dataset.extra.items()}, **provenance},
    )

    if copies.images.ndim == 3 or copies.images.shape[-1] == 1:
        # The kit's writer, so that strokekit.io.read_study_layout reads the copies back.
        from .io import write_study_layout

        grey = copies if copies.images.ndim == 3 else copies.replace(images=copies.images[..., 0])
        write_study_layout(grey, folder, overwrite=True, progress=False)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _write_pngs(folder, new_ids, pixels, masks)
    copies = copies.replace(source_paths=[str(folder / f"{c}.png") for c in new_ids])

    base = dataset.replace(
        extra={
            **dataset.extra,
            "augmented": dataset.extra.get("augmented", np.zeros(len(dataset), dtype=bool)),
            "augmented_from": dataset.extra.get("augmented_from", np.array([""] * len(dataset))),
        }
    )
    return concat([base, copies])
