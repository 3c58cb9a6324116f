"""Paired augmentation (strokekit.augment): determinism, label safety, image/mask alignment,
exact geometry, the Keras batch loader and offline oversampling."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from strokekit import augment as A
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError

SIZE = 48

# Each transform alone at a strength large enough to matter, plus everything at once.
SINGLE = {
    "rotation": {"rotation": 30.0},
    "shift": {"shift": 0.15},
    "shear": {"shear": 0.3},
    "zoom": {"zoom": 0.3},
    "hflip": {"hflip": True},
    "vflip": {"vflip": True},
    "elastic": {"elastic_alpha": 4.0, "elastic_sigma": 5.0},
    "contrast": {"contrast": 0.5},
    "gamma": {"gamma": 0.5},
    "noise": {"noise": 0.05},
    "blur": {"blur": 2.0},
}
GEOMETRIC = ("rotation", "shift", "shear", "zoom", "hflip", "vflip", "elastic")
INTENSITY = ("contrast", "gamma", "noise", "blur")


def only(name: str, **more) -> A.AugmentConfig:
    return dataclasses.replace(A.NO_AUGMENT, **SINGLE[name], **more)


EVERYTHING = dataclasses.replace(
    A.STUDY_AUGMENT,
    vflip=True,
    **{k: v for name in ("elastic", *INTENSITY) for k, v in SINGLE[name].items()},
)


# Every geometric transform at once (intensity changes would move the 0.5 threshold).
ALL_GEOMETRY = dataclasses.replace(A.STUDY_AUGMENT, vflip=True, **SINGLE["elastic"])


def square_pair(size: int = SIZE, top: int = 14, left: int = 20, side: int = 16):
    """An image whose bright square is exactly the mask, off-centre so a flip moves it."""
    image = np.full((size, size), 0.1, dtype=np.float32)
    image[top : top + side, left : left + side] = 0.9
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1
    return image, mask


def multilabel_pair(size: int = SIZE):
    rng = np.random.default_rng(7)
    image = rng.uniform(0.2, 0.8, (size, size)).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[8:20, 8:22] = 1
    mask[26:40, 24:42] = 2
    mask[30:34, 10:14] = 4  # a sparse label set: 3 is absent and must stay absent
    return image, mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def bright_region_iou(image: np.ndarray, mask: np.ndarray) -> float:
    return iou(image > 0.5, mask > 0)


# --------------------------------------------------------------------------- config
def test_config_rejects_bad_values():
    with pytest.raises(
        ValueError,
        match=r"Expected one of \['constant', 'nearest', 'reflect'\]. Received: fill_mode='wrap'",
    ):
        A.AugmentConfig(fill_mode="wrap")
    with pytest.raises(ValueError, match="zoom must be below 1"):
        A.AugmentConfig(zoom=1.0)
    with pytest.raises(ValueError, match="rotation must be a finite number >= 0"):
        A.AugmentConfig(rotation=-5)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        A.AugmentConfig(p=1.5)
    with pytest.raises(ValueError, match="elastic_sigma must be > 0"):
        A.AugmentConfig(elastic_sigma=0)


def test_presets():
    assert not A.NO_AUGMENT.enabled
    s = A.STUDY_AUGMENT
    assert s.enabled and s.hflip and not s.vflip
    assert (
        10 <= s.rotation <= 20 and s.shift == pytest.approx(0.1) and s.shear == pytest.approx(0.1)
    )
    assert 0.1 <= s.zoom <= 0.2
    assert (s.elastic_alpha, s.contrast, s.gamma, s.noise, s.blur) == (0, 0, 0, 0, 0)


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_output_and_different_seed_differs():
    images = np.stack([multilabel_pair()[0]] * 4)
    masks = np.stack([multilabel_pair()[1]] * 4)
    a = A.augment_batch(images, masks, EVERYTHING, seed=3)
    b = A.augment_batch(images, masks, EVERYTHING, seed=3)
    c = A.augment_batch(images, masks, EVERYTHING, seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Samples inside one batch get different draws.
    assert not np.array_equal(a[0][0], a[0][1])
    # augment_pair with an int seed equals the same seed's Generator.
    p1 = A.augment_pair(images[0], masks[0], EVERYTHING, 11)
    p2 = A.augment_pair(images[0], masks[0], EVERYTHING, np.random.default_rng(11))
    assert np.array_equal(p1[0], p2[0]) and np.array_equal(p1[1], p2[1])


def test_sliders_do_not_change_other_draws():
    # Every parameter is drawn in a fixed order, so turning rotation up leaves the flips alone.
    low = [A.random_transform(A.AugmentConfig(rotation=5), s) for s in range(20)]
    high = [A.random_transform(A.AugmentConfig(rotation=25), s) for s in range(20)]
    assert [p["hflip"] for p in low] == [p["hflip"] for p in high]
    assert [p["zoom"] for p in low] == [p["zoom"] for p in high]
    assert all(
        h["rotation"] == pytest.approx(5 * lo["rotation"]) for lo, h in zip(low, high, strict=True)
    )


def test_random_transform_respects_ranges_and_p():
    cfg = A.AugmentConfig(
        rotation=10, shift=0.05, shear=0.2, zoom=0.15, contrast=0.3, gamma=0.4, blur=1.5
    )
    draws = [A.random_transform(cfg, s) for s in range(200)]
    assert max(abs(d["rotation"]) for d in draws) <= 10
    assert max(abs(d["shift_row"]) for d in draws) <= 0.05
    assert all(0.85 <= d["zoom"] <= 1.15 for d in draws)
    assert all(math.exp(-0.4) <= d["gamma"] <= math.exp(0.4) for d in draws)
    assert all(0 <= d["blur_sigma"] <= 1.5 for d in draws)
    assert 60 < sum(d["hflip"] for d in draws) < 140
    assert not any(d["vflip"] for d in draws)
    skipped = [A.random_transform(dataclasses.replace(cfg, p=0.0), s) for s in range(20)]
    assert all(d == A.identity_params() for d in skipped)
    half = [A.random_transform(dataclasses.replace(cfg, p=0.5), s)["applied"] for s in range(200)]
    assert 70 < sum(half) < 130


# --------------------------------------------------------------------------- label safety
@pytest.mark.parametrize("name", [*SINGLE, "everything"])
@pytest.mark.parametrize("fill_mode", ["constant", "reflect"])
def test_masks_stay_valid_under_every_transform(name, fill_mode):
    config = EVERYTHING if name == "everything" else only(name)
    config = dataclasses.replace(config, fill_mode=fill_mode)
    image, mask = multilabel_pair()
    for seed in range(4):
        out_image, out_mask = A.augment_pair(image, mask, config, seed)
        assert out_mask.dtype == np.uint8 and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= {0, 1, 2, 4}
        assert out_image.dtype == np.float32 and out_image.shape == image.shape
        assert A.check_masks_valid(out_mask, [0, 1, 2, 4])["valid"]


@pytest.mark.parametrize("dtype", [bool, np.int32, np.int64, np.uint16])
def test_mask_dtype_kept_and_binary_stays_binary(dtype):
    image, mask = square_pair()
    mask = mask.astype(dtype)
    for seed in range(3):
        _, out = A.augment_pair(image, mask, EVERYTHING, seed)
        assert out.dtype == np.dtype(dtype)
        assert set(np.unique(out).tolist()) <= {0, 1}


def test_interpolating_a_mask_would_be_caught():
    # What check_masks_valid exists for: linear interpolation invents fractional labels.
    _, mask = multilabel_pair()
    from scipy import ndimage

    smeared = ndimage.rotate(mask.astype(np.float32), 20, reshape=False, order=1)
    report = A.check_masks_valid(smeared, [0, 1, 2, 4])
    assert not report["valid"] and report["non_integer"] > 0


def test_check_masks_valid_hand_computed():
    masks = np.array([[[0, 1], [1, 0]], [[0, 0], [2, 5]]], dtype=np.uint8)
    report = A.check_masks_valid(masks, [0, 1, 2])
    assert report == {
        "valid": False,
        "dtype": "uint8",
        "labels": [0, 1, 2, 5],
        "unexpected": [5],
        "non_integer": 0,
        "counts": {0: 4, 1: 2, 2: 1, 5: 1},
        "slices": {0: 2, 1: 1, 2: 1, 5: 1},
    }
    assert A.check_masks_valid(masks, [0, 1, 2, 5])["valid"]


# --------------------------------------------------------------------------- alignment
@pytest.mark.parametrize("name", [*GEOMETRIC, "all geometry"])
def test_mask_stays_on_the_bright_region(name):
    config = ALL_GEOMETRY if name == "all geometry" else only(name)
    image, mask = square_pair()
    assert bright_region_iou(image, mask) == 1.0
    for seed in range(6):
        out_image, out_mask = A.augment_pair(image, mask, config, seed)
        assert out_mask.sum() > 50, "the square left the frame; the test would prove nothing"
        assert bright_region_iou(out_image, out_mask) > 0.9, (name, seed)


def test_broken_pairing_fails_the_alignment_check():
    # The check above must catch a flipped image with an unflipped mask.
    image, mask = square_pair()
    params = {**A.identity_params(), "applied": True, "hflip": True}
    flipped_image, _ = A.apply_transform(image, None, params, A.STUDY_AUGMENT)
    assert bright_region_iou(flipped_image, mask) < 0.5
    flipped_image, flipped_mask = A.apply_transform(image, mask, params, A.STUDY_AUGMENT)
    assert bright_region_iou(flipped_image, flipped_mask) == 1.0


def test_multichannel_image_gets_the_same_geometry_on_every_channel():
    image, mask = square_pair()
    stack = np.stack([image, 1.0 - image, image * 0.5], axis=-1)
    for seed in range(3):
        params = A.random_transform(dataclasses.replace(A.STUDY_AUGMENT, elastic_alpha=3.0), seed)
        grey, grey_mask = A.apply_transform(image, mask, params, A.STUDY_AUGMENT)
        multi, multi_mask = A.apply_transform(stack, mask, params, A.STUDY_AUGMENT)
        assert multi.shape == stack.shape and multi.dtype == np.float32
        np.testing.assert_allclose(multi[..., 0], grey, atol=1e-6)
        np.testing.assert_allclose(multi[..., 2], grey * 0.5, atol=1e-6)
        assert np.array_equal(multi_mask, grey_mask)


# --------------------------------------------------------------------------- exact geometry
def test_identity_params_change_nothing():
    image, mask = multilabel_pair()
    stack = np.stack([image, image**2], axis=-1)
    out_image, out_mask = A.apply_transform(image, mask, A.identity_params(), EVERYTHING)
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)
    out_stack, _ = A.apply_transform(stack, mask, A.identity_params(), EVERYTHING)
    assert np.array_equal(out_stack, stack)
    out_image, out_mask = A.augment_pair(image, mask, A.NO_AUGMENT, 5)
    assert np.array_equal(out_image, image) and np.array_equal(out_mask, mask)
    out_image, _ = A.augment_pair(image, mask, A.NO_AUGMENT, 5)
    assert out_image is not image  # a copy: callers may write into it


@pytest.mark.parametrize("size", [32, 33])
def test_hflip_maps_column_c_to_w_minus_1_minus_c(size):
    image = np.arange(size * size, dtype=np.float32).reshape(size, size) / size**2
    mask = (np.arange(size * size).reshape(size, size) % 7).astype(np.uint8)
    params = {**A.identity_params(), "applied": True, "hflip": True}
    out_image, out_mask = A.apply_transform(image, mask, params, A.STUDY_AUGMENT)
    for r, c in [(0, 0), (3, 5), (10, size - 1), (size - 1, size // 2)]:
        assert out_image[r, size - 1 - c] == image[r, c]
        assert out_mask[r, size - 1 - c] == mask[r, c]
    assert np.array_equal(out_image, image[:, ::-1]) and np.array_equal(out_mask, mask[:, ::-1])
    # The matrix SciPy would use says the same: output (r, W-1-c) pulls from input (r, c).
    matrix, offset = A.affine_matrix(params, (size, size))
    np.testing.assert_allclose(
        matrix @ np.array([3.0, size - 1 - 5.0]) + offset, [3.0, 5.0], atol=1e-12
    )
    vparams = {**A.identity_params(), "applied": True, "vflip": True}
    out_image, _ = A.apply_transform(image, mask, vparams, A.STUDY_AUGMENT)
    assert np.array_equal(out_image, image[::-1])


def test_rotation_is_counter_clockwise_and_shift_is_in_pixels():
    image = np.zeros((33, 33), dtype=np.float32)
    image[0, 16] = 1.0  # top centre
    turn = {**A.identity_params(), "applied": True, "rotation": 90.0}
    out, _ = A.apply_transform(image, None, turn, A.STUDY_AUGMENT)
    assert np.argwhere(out > 0.5).tolist() == [[16, 0]]  # counter-clockwise: top goes left
    shift = {**A.identity_params(), "applied": True, "shift_row": 0.25, "shift_col": -0.125}
    square = np.zeros((32, 32), dtype=np.float32)
    square[4, 20] = 1.0
    out, _ = A.apply_transform(square, None, shift, A.STUDY_AUGMENT)
    assert np.argwhere(out > 0.5).tolist() == [[12, 16]]  # +8 rows, -4 columns


def test_zoom_scales_about_the_centre():
    params = {**A.identity_params(), "applied": True, "zoom": 2.0}
    matrix, offset = A.affine_matrix(params, (33, 33))
    # Output (16, 24), 8 px right of the centre, comes from input (16, 20), 4 px right of it.
    np.testing.assert_allclose(matrix @ np.array([16.0, 24.0]) + offset, [16.0, 20.0], atol=1e-12)
    shear = {**A.identity_params(), "applied": True, "shear": 0.5}
    matrix, offset = A.affine_matrix(shear, (33, 33))
    # Forward: a column moves by 0.5 x its row offset; 10 rows below the centre -> +5 columns.
    np.testing.assert_allclose(matrix @ np.array([26.0, 21.0]) + offset, [26.0, 16.0], atol=1e-12)


def test_fill_modes():
    ones = np.ones((16, 16), dtype=np.float32)
    params = {**A.identity_params(), "applied": True, "shift_col": 0.25}
    constant, _ = A.apply_transform(ones, None, params, A.AugmentConfig(fill_mode="constant"))
    assert np.all(constant[:, :4] == 0) and np.all(constant[:, 4:] == 1)
    nearest, _ = A.apply_transform(ones, None, params, A.AugmentConfig(fill_mode="nearest"))
    assert np.all(nearest == 1)
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1)) / 16
    reflect, _ = A.apply_transform(ramp, None, params, A.AugmentConfig(fill_mode="reflect"))
    # Shift right by 4: column 3 pulls from -1, mirrored to column 0; column 0 from -4 -> 3.
    assert reflect[0, 3] == ramp[0, 0] and reflect[0, 0] == ramp[0, 3]


def test_elastic_displacement_is_bounded_by_alpha():
    # On a linear ramp, linear interpolation is exact, so |out - in| measures the displacement.
    size = 40
    ramp = np.tile(np.arange(size, dtype=np.float32), (size, 1)) / size
    config = A.AugmentConfig(fill_mode="nearest")
    params = {
        **A.identity_params(),
        "applied": True,
        "elastic_alpha": 3.0,
        "elastic_sigma": 4.0,
        "elastic_seed": 1,
    }
    out, _ = A.apply_transform(ramp, None, params, config)
    moved = np.abs(out - ramp) * size
    assert moved.max() <= 3.0 + 1e-4
    assert moved.max() > 1.0  # and it does move pixels


# --------------------------------------------------------------------------- intensity
@pytest.mark.parametrize("name", INTENSITY)
def test_intensity_transforms_leave_the_mask_alone(name):
    image, mask = multilabel_pair()
    changed = []
    for seed in range(3):
        out_image, out_mask = A.augment_pair(image, mask, only(name), seed)
        assert np.array_equal(out_mask, mask)
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0
        changed.append(not np.array_equal(out_image, image))
    assert sum(changed) >= 2  # a draw near 0 (e.g. blur sigma 0.005) may leave one unchanged


def test_contrast_and_gamma_hand_computed():
    image = np.array([[0.25, 0.75], [0.25, 0.75]], dtype=np.float32)
    params = {**A.identity_params(), "applied": True, "contrast": 1.5}
    out, _ = A.apply_transform(image, None, params, A.NO_AUGMENT)
    np.testing.assert_allclose(out, [[0.125, 0.875], [0.125, 0.875]], atol=1e-6)
    params = {**A.identity_params(), "applied": True, "gamma": 2.0}
    out, _ = A.apply_transform(image, None, params, A.NO_AUGMENT)
    np.testing.assert_allclose(out, image**2, atol=1e-6)


def test_bad_shapes_are_rejected():
    with pytest.raises(
        ValueError, match=r"mask shape \(8, 9\) does not match image shape \(8, 8\)"
    ):
        A.augment_pair(np.zeros((8, 8)), np.zeros((8, 9), dtype=np.uint8), A.STUDY_AUGMENT, 0)
    with pytest.raises(ValueError, match="mask must hold integer labels"):
        A.augment_pair(np.zeros((8, 8)), np.zeros((8, 8), dtype=np.float32), A.STUDY_AUGMENT, 0)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        A.augment_batch(np.zeros((2, 8, 8)), None, A.STUDY_AUGMENT, seed=-1)


# --------------------------------------------------------------------------- figures
def test_show_transforms_and_grid():
    image, mask = square_pair()
    fig = A.show_transforms(image, mask, A.STUDY_AUGMENT, seed=0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "original" and len(titles) == 12
    assert "elastic α=0 σ=8 (off)" in titles and "horizontal flip" in titles
    assert sum(t.endswith("(off)") for t in titles) == 6  # vflip, elastic, 4 intensity
    grid = A.show_random_grid(image, mask, A.STUDY_AUGMENT, n=5, seed=0)
    assert sum(bool(ax.get_title()) for ax in grid.axes) == 5
    with pytest.raises(ValueError, match="n must be at least 1"):
        A.show_random_grid(image, mask, A.STUDY_AUGMENT, n=0)


# --------------------------------------------------------------------------- loader
def _loader_data(n: int = 10, size: int = 32, labels: int = 2):
    rng = np.random.default_rng(0)
    images = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        images[i] = (i + 1) / (n + 1)  # each sample identifies itself by its grey value
        masks[i, 8:20, 8 + i % 5 : 20 + i % 5] = 1 + i % (labels - 1) if labels > 1 else 0
    images += rng.normal(0, 1e-3, images.shape).astype(np.float32)
    return images, masks


def _epoch(loader):
    return [loader[i] for i in range(len(loader))]


@pytest.mark.backend
def test_loader_shapes_dtypes_and_len():
    images, masks = _loader_data(n=10)
    loader = A.SegmentationLoader(images, masks, batch_size=4, augment=A.STUDY_AUGMENT, seed=1)
    assert len(loader) == 3 == math.ceil(10 / 4)
    batches = _epoch(loader)
    assert [b[0].shape for b in batches] == [(4, 32, 32, 1), (4, 32, 32, 1), (2, 32, 32, 1)]
    x, y = batches[0]
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert len(A.SegmentationLoader(images, masks, batch_size=5)) == 2
    assert len(A.SegmentationLoader(images, masks, batch_size=64)) == 1
    with pytest.raises(IndexError, match="batch index 3 out of range for 3 batches"):
        loader[3]


@pytest.mark.backend
def test_loader_one_hot_and_channels_first():
    images, masks = _loader_data(n=6, labels=3)
    loader = A.SegmentationLoader(images, masks, batch_size=3, num_classes=3, shuffle=False)
    x, y = loader[1]
    assert y.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(y.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(y.argmax(axis=-1), masks[3:6])
    np.testing.assert_array_equal(x[..., 0], images[3:6])
    cf = A.SegmentationLoader(
        images, masks, batch_size=3, num_classes=3, shuffle=False, channels_last=False
    )
    xc, yc = cf[1]
    assert xc.shape == (3, 1, 32, 32) and yc.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(np.moveaxis(yc, 1, -1), y)
    rgb = A.SegmentationLoader(np.repeat(images[..., None], 3, axis=-1), masks, batch_size=2)
    assert rgb[0][0].shape == (2, 32, 32, 3)
    with pytest.raises(
        ValueError, match=r"mask labels must lie in 0..1 for num_classes=2, found 0..2"
    ):
        A.SegmentationLoader(images, masks, num_classes=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        A.SegmentationLoader(images, masks, batch_size=0)


@pytest.mark.backend
def test_loader_covers_every_sample_once_per_epoch():
    images, masks = _loader_data(n=10)
    loader = A.SegmentationLoader(images, masks, batch_size=4, augment=None, seed=2)
    orders = []
    for _ in range(3):
        seen = np.concatenate([loader.batch_indices(i) for i in range(len(loader))])
        assert sorted(seen.tolist()) == list(range(10))
        # The content agrees with the indices: grey value identifies the sample.
        xs = np.concatenate([b[0] for b in _epoch(loader)])
        np.testing.assert_allclose(xs[:, 16, 16, 0], images[seen, 16, 16])
        orders.append(seen.tolist())
        loader.on_epoch_end()
    assert loader.epoch == 3
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    fixed = A.SegmentationLoader(images, masks, batch_size=4, shuffle=False)
    assert np.concatenate([fixed.batch_indices(i) for i in range(3)]).tolist() == list(range(10))


@pytest.mark.backend
def test_loader_is_deterministic_and_changes_each_epoch():
    images, masks = _loader_data(n=8)
    kw = {"batch_size": 4, "augment": A.STUDY_AUGMENT}
    a = A.SegmentationLoader(images, masks, seed=5, **kw)
    b = A.SegmentationLoader(images, masks, seed=5, **kw)
    c = A.SegmentationLoader(images, masks, seed=6, **kw)
    ea, eb, ec = _epoch(a), _epoch(b), _epoch(c)
    assert all(
        np.array_equal(p[0], q[0]) and np.array_equal(p[1], q[1])
        for p, q in zip(ea, eb, strict=True)
    )
    assert not np.array_equal(ea[0][0], ec[0][0])
    a.on_epoch_end()
    assert not np.array_equal(_epoch(a)[0][0], ea[0][0])
    # Sample i's augmentation depends only on (seed, epoch, i): batches computed in any order,
    # concurrently, give the same arrays.
    b.on_epoch_end()
    forward = _epoch(b)
    with ThreadPoolExecutor(4) as pool:
        backward = list(pool.map(lambda i: a[i], reversed(range(len(a)))))[::-1]
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(forward, backward, strict=True))
    # And resuming at an epoch reproduces it.
    d = A.SegmentationLoader(images, masks, seed=5, **kw)
    d.set_epoch(1)
    assert np.array_equal(_epoch(d)[1][0], forward[1][0])


def _identity_model(size: int):
    import keras

    inputs = keras.Input((size, size, 1))
    return keras.Model(inputs, keras.layers.Rescaling(1.0)(inputs))


@pytest.mark.backend
def test_loader_through_keras_workers_gives_the_same_batches():
    images, masks = _loader_data(n=12, size=16)
    images = images[:, :16, :16]
    model = _identity_model(16)
    outs = []
    for workers in (1, 2):
        loader = A.SegmentationLoader(
            images,
            masks[:, :16, :16],
            batch_size=4,
            augment=A.STUDY_AUGMENT,
            seed=9,
            workers=workers,
        )
        expected = np.concatenate([loader[i][0] for i in range(len(loader))])
        got = model.predict(loader, verbose=0)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        outs.append(got)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.backend
def test_fit_advances_the_loader_epoch():
    import keras

    images, masks = _loader_data(n=8, size=16)
    loader = A.SegmentationLoader(
        images[:, :16, :16],
        masks[:, :16, :16],
        batch_size=4,
        augment=A.STUDY_AUGMENT,
        seed=0,
        workers=2,
    )
    inputs = keras.Input((16, 16, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    history = model.fit(loader, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2
    # Keras calls on_epoch_end once before training (a reset after peeking at a batch to build
    # the model) and once after each epoch, on every backend: fit's epochs are loader epochs 1, 2.
    assert loader.epoch == 3


@pytest.mark.backend
def test_loader_from_dataset():
    images, masks = _loader_data(n=5, size=16)
    ds = SliceDataset(
        images=images[:, :16, :16],
        masks=masks[:, :16, :16],
        case_ids=[str(i) for i in range(5)],
        unit="display",
    )
    loader = A.SegmentationLoader.from_dataset(ds, batch_size=2, shuffle=False)
    assert isinstance(loader, A.SegmentationLoader) and len(loader) == 3
    np.testing.assert_array_equal(loader[2][0][..., 0], ds.images[4:5])


# --------------------------------------------------------------------------- oversampling
def _checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _source_dataset(folder: Path) -> SliceDataset:
    from PIL import Image

    folder.mkdir()
    images, masks, paths = [], [], []
    for i in range(5):
        image, mask = square_pair(size=32, top=8 + i, left=6 + i, side=12)
        mask = mask * (2 if i in (1, 3) else 1)  # label 2 is the rare class
        pixels = np.round(image * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        Image.fromarray(mask).save(folder / f"{i}_mask.png")
        images.append(pixels / 255.0)
        masks.append(mask)
        paths.append(str(folder / f"{i}.png"))
    return SliceDataset(
        images=np.stack(images),
        masks=np.stack(masks),
        case_ids=[str(i) for i in range(5)],
        patient_ids=["p0", "p1", "p1", "p2", "p2"],
        source_paths=paths,
        unit="display",
        class_names=("background", "hemorrhagic", "ischemic"),
    )


def test_oversample_offline_writes_only_into_the_new_folder(tmp_path):
    source = tmp_path / "source"
    ds = _source_dataset(source)
    before = _checksums(source)
    out = tmp_path / "oversampled"
    combined = A.oversample_offline(
        ds, out, target_label=2, factor=3, config=A.STUDY_AUGMENT, seed=1, progress=False
    )
    assert _checksums(source) == before
    assert len(combined) == 5 + 2 * 3
    assert combined.case_ids[:5] == ds.case_ids
    assert combined.case_ids[5:] == ["1_aug1", "3_aug1", "1_aug2", "3_aug2", "1_aug3", "3_aug3"]
    assert combined.patient_ids[5:] == ["p1", "p2"] * 3  # copies stay with their patient
    assert combined.extra["augmented"].tolist() == [False] * 5 + [True] * 6
    assert combined.extra["augmented_from"][5:].tolist() == ["1", "3"] * 3
    copies = combined.subset(np.arange(5, 11))
    assert all((m == 2).any() for m in copies.masks)
    assert set(np.unique(copies.masks)) <= {0, 2}
    assert all(Path(p).parent == out.resolve() and Path(p).is_file() for p in copies.source_paths)
    assert all((out / f"{c}_mask.png").is_file() for c in copies.case_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oversampled", "source"]
    # The folder reads back as the same copies (8-bit values, labels, patients).
    io = pytest.importorskip("strokekit.io")
    back = io.read_study_layout(out, progress=False, class_names=ds.class_names)
    back = back.select_cases(copies.case_ids)
    np.testing.assert_allclose(back.images / 255.0, copies.images, atol=1e-6)
    np.testing.assert_array_equal(back.masks, copies.masks)
    assert back.patient_ids == copies.patient_ids
    # Same seed, same copies.
    again = A.oversample_offline(
        ds, tmp_path / "again", 2, 3, A.STUDY_AUGMENT, seed=1, progress=False
    )
    assert np.array_equal(again.images, combined.images) and np.array_equal(
        again.masks, combined.masks
    )


def test_oversample_offline_refuses_unsafe_folders(tmp_path):
    ds = _source_dataset(tmp_path / "source")
    before = _checksums(tmp_path / "source")
    with pytest.raises(DataError, match="holds 5 source file"):
        A.oversample_offline(ds, tmp_path / "source", 2, 1, A.STUDY_AUGMENT, progress=False)
    with pytest.raises(DataError, match="holds 5 source file"):
        A.oversample_offline(ds, tmp_path, 2, 1, A.STUDY_AUGMENT, overwrite=True, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="is not empty; choose a new folder or pass overwrite=True"):
        A.oversample_offline(ds, busy, 2, 1, A.STUDY_AUGMENT, progress=False)
    combined = A.oversample_offline(ds, busy, 2, 1, A.STUDY_AUGMENT, overwrite=True, progress=False)
    assert len(combined) == 7 and (busy / "notes.txt").read_text() == "keep me"
    assert _checksums(tmp_path / "source") == before
    with pytest.raises(DataError, match="no slice contains label 3"):
        A.oversample_offline(ds, tmp_path / "x", 3, 1, A.STUDY_AUGMENT, progress=False)
    with pytest.raises(DataError, match="8-bit PNGs cannot hold HU values"):
        A.oversample_offline(
            ds.replace(unit="HU"), tmp_path / "y", 2, 1, A.STUDY_AUGMENT, progress=False
        )
    with pytest.raises(ValueError, match="factor must be a positive int"):
        A.oversample_offline(ds, tmp_path / "z", 2, 0, A.STUDY_AUGMENT, progress=False)


def test_sample_patches_foreground_share_and_determinism():
    images = np.arange(3 * 16 * 16, dtype=np.float32).reshape(3, 16, 16)
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[0, 14, 1] = 1  # one lesion pixel near a corner of slice 0
    x, y = A.sample_patches(images, masks, 8, per_slice=5, foreground_fraction=1.0, seed=4)
    assert x.shape == (15, 8, 8) and y.shape == (15, 8, 8)
    # every crop of the lesion slice holds its one lesion pixel; the other slices have none
    assert (y[:5].reshape(5, -1).sum(axis=1) == 1).all() and y[5:].sum() == 0
    # crops are real windows of their slice: the top-left value fixes the rest
    for k in range(15):
        i = k // 5
        r0, c0 = divmod(int(x[k, 0, 0]) - i * 256, 16)
        np.testing.assert_array_equal(x[k], images[i, r0:r0 + 8, c0:c0 + 8])
    x2, _ = A.sample_patches(images, masks, 8, per_slice=5, foreground_fraction=1.0, seed=4)
    np.testing.assert_array_equal(x, x2)
    _, y0 = A.sample_patches(images, masks, 8, per_slice=50, foreground_fraction=0.0, seed=0)
    assert 0 < y0[:50].reshape(50, -1).any(axis=1).sum() < 50  # uniform crops hit it sometimes
    with pytest.raises(ValueError, match="patch_size must lie in 1..16"):
        A.sample_patches(images, masks, 32, per_slice=1)


def test_tile_patches_cut_every_slice_into_non_overlapping_tiles():
    x = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    y = (x[..., 0] > 60).astype(np.uint8)
    tx, ty = A.tile_patches(x, y, 4)
    assert tx.shape == (8, 4, 4, 1) and ty.shape == (8, 4, 4)
    np.testing.assert_array_equal(tx[1, ..., 0], x[1, :4, :4, 0])   # tile-major: tile (0, 0) of slice 1
    np.testing.assert_array_equal(ty[3], y[1, :4, 4:])
