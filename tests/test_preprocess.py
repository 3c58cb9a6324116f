"""HU windows, brain masks, resizing, normalisation, overlays, statistics."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from strokekit import preprocess as pp
from strokekit.dataset import SliceDataset


def head(size=64, bleed=True):
    """Air, skull ring, brain at 35 HU with a 60 HU bleed and a CSF hole."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.full((size, size), -1000.0, np.float32)
    image[r < 0.45 * size] = 40.0  # scalp
    image[r < 0.42 * size] = 1200.0  # skull
    image[r < 0.36 * size] = 35.0
    image[(r < 0.06 * size)] = 5.0
    truth_brain = r < 0.36 * size
    if bleed:
        image[(yy - size / 2) ** 2 + (xx - size * 0.65) ** 2 < (0.08 * size) ** 2] = 65.0
    return image, truth_brain


def test_window_hu_maps_level_and_width():
    x = np.array([-1000, 0, 40, 80, 1000], np.float32)
    assert pp.window_hu(x, "brain").tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    assert pp.window_hu(x, (0, 200)).tolist() == pytest.approx([0, 0.5, 0.7, 0.9, 1])
    with pytest.raises(ValueError, match="Received: window='lung'"):
        pp.window_hu(x, "lung")
    with pytest.raises(ValueError, match="width must be positive"):
        pp.window_hu(x, (40, 0))


def test_brain_mask_excludes_skull_and_scalp_and_keeps_holes():
    image, truth = head()
    mask = pp.brain_mask(image)
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[image > 300].any()  # no bone
    stripped = pp.skull_strip(image)
    assert stripped.max() < 100 and (stripped == -1000).sum() == (~mask).sum()
    # display units (brain window 0..255) give the same mask
    display = pp.window_hu(image, (40, 120)) * 255
    mask_display = pp.brain_mask(display, unit="display")
    assert (mask_display & truth).sum() / (mask_display | truth).sum() > 0.9
    assert not pp.brain_mask(np.full((32, 32), -1000.0)).any()


def neck(size=64):
    """A neck slice: soft tissue (35 HU) with a vertebra and a jaw bone, no skull around it."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((size, size), -1000.0, np.float32)
    image[np.hypot(yy - size / 2, xx - size / 2) < 0.4 * size] = 35.0
    image[np.hypot(yy - size * 0.7, xx - size / 2) < 0.07 * size] = 1200.0  # vertebra
    image[np.hypot(yy - size * 0.25, xx - size / 2) < 0.05 * size] = 1200.0  # jaw
    return image


def test_skull_enclosure_tells_a_cranial_slice_from_a_neck_slice():
    image, truth = head()
    assert pp.skull_enclosure(image, pp.brain_mask(image)) == 1.0
    display = pp.window_hu(image, (40, 120)) * 255
    assert pp.skull_enclosure(display, pp.brain_mask(display, unit="display"), unit="display") == 1.0
    soft = neck()
    tissue = pp.brain_mask(soft)
    assert tissue.any()  # the brain finder takes the neck's soft tissue for brain ...
    assert pp.skull_enclosure(soft, tissue) < 0.5  # ... but no skull surrounds it
    assert pp.skull_enclosure(image, np.zeros_like(truth)) == 0.0


def test_resize_keeps_labels_and_rescales_spacing():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 2:5] = 2
    mask[6:9, 6:9] = 1
    small = pp.resize_mask(mask, 5)
    assert set(np.unique(small)) == {0, 1, 2}
    big = pp.resize_mask(mask, 40)
    assert set(np.unique(big)) == {0, 1, 2} and (big == 2).sum() == 9 * 16
    image, _ = head(32)
    d = SliceDataset(image[None], np.zeros((1, 32, 32), np.uint8), ["a"], spacing=(0.5, 0.5))
    r = pp.resize_dataset(d, 16)
    assert r.image_shape == (16, 16) and r.spacing == (1.0, 1.0)
    assert d.image_shape == (32, 32)  # source untouched
    assert pp.rescale_spacing((0.5, 0.5), (32, 32), (16, 64)) == (1.0, 0.25)  # to (rows, cols): same field of view


def test_resize_image_is_antialiased_bilinear_for_every_shape():
    checker = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    small = pp.resize_image(checker, 16)
    assert small.dtype == np.float32 and small.shape == (16, 16)
    # anti-aliased: a one-pixel checkerboard shrinks to its mean, not to a sampled 0/1 pattern
    assert np.abs(small[2:-2, 2:-2] - 0.5).max() < 0.05
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))
    big = pp.resize_image(ramp, (8, 32))  # (rows, cols), non-square
    assert big.shape == (8, 32)
    assert np.all(np.diff(big[4, 4:-4]) > 0)  # enlarging interpolates linearly: strictly rising inside
    assert big.min() >= 0 and big.max() <= 7
    rgb = np.random.default_rng(0).random((20, 30, 3)).astype(np.float32)
    out = pp.resize_image(rgb, 10)
    assert out.shape == (10, 10, 3)
    assert np.array_equal(out[..., 1], pp.resize_image(rgb[..., 1], 10))  # channel by channel
    same = pp.resize_image(ramp, 8)
    assert np.array_equal(same, ramp) and same is not ramp
    with pytest.raises(ValueError, match="size"):
        pp.resize_image(ramp, (0, 4))


def test_resize_mask_keeps_dtype_and_label_values():
    labels = np.zeros((12, 12), np.int32)
    labels[:6, :6] = 300  # above 255: must not wrap around
    labels[6:, 6:] = 7
    out = pp.resize_mask(labels, 24)
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 7, 300}
    flags = labels > 0
    assert pp.resize_mask(flags, (6, 3)).dtype == bool
    assert set(np.unique(pp.resize_mask(labels.astype(np.float32) / 2, 6))) <= {0.0, 3.5, 150.0}
    with pytest.raises(ValueError, match="label values"):
        pp.resize_mask(-labels, 6)


def test_normalize_methods_and_mask():
    x = np.array([[0.0, 10.0], [20.0, 30.0]])
    assert pp.normalize(x) == pytest.approx(np.array([[0, 1 / 3], [2 / 3, 1]]))
    z = pp.normalize(x, "zscore")
    assert z.mean() == pytest.approx(0, abs=1e-6) and z.std() == pytest.approx(1)
    m = np.array([[0, 1], [1, 0]], bool)
    assert pp.normalize(x, "minmax", mask=m)[0, 1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="Received: method='l2'"):
        pp.normalize(x, "l2")


def test_overlay_colours_only_labelled_pixels():
    image = np.full((4, 4), 0.5, np.float32)
    mask = np.zeros((4, 4), np.uint8)
    mask[0, 0], mask[3, 3] = 1, 2
    rgb = pp.overlay_mask(image, mask, alpha=1.0)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[3, 3].tolist() == [0, 255, 0]
    assert rgb[1, 1].tolist() == [128, 128, 128]


def test_prepare_inputs_stacks_windows_as_channels():
    image, _ = head(32)
    d = SliceDataset(np.stack([image, image]), np.zeros((2, 32, 32), np.uint8), ["a", "b"])
    x, y = pp.prepare_inputs(d, image_size=16, windows=("brain", "subdural", "bone"))
    assert x.shape == (2, 16, 16, 3) and y.shape == (2, 16, 16)
    assert 0 <= x.min() and x.max() <= 1
    assert not np.allclose(x[..., 0], x[..., 2])


def test_statistics_table_and_figure():
    image, _ = head(32)
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0, :2, :2] = 1
    d = SliceDataset(np.stack([image] * 3), masks, ["a", "b", "c"], ["p", "p", "q"], spacing=(0.5, 2.0))
    table = pp.dataset_statistics(d)
    assert table["lesion_mm2"].tolist() == [4.0, 0.0, 0.0]
    assert table["has_lesion"].tolist() == [True, False, False]
    fig = pp.plot_statistics(d)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3


def test_brain_mask_stack_on_a_stride_grown_is_the_strided_masks_dilated_and_repeated():
    from scipy import ndimage

    size = 40
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - 19.5, xx - 19.5)
    image = np.where(r < 18, 255.0, 0.0).astype(np.float32)
    image[r < 15] = 100.0
    stack = np.stack([image, np.zeros_like(image)])
    small = pp.brain_mask_stack(stack[:, ::3, ::3])
    cross = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)
    grown = ndimage.binary_dilation(small, structure=cross, iterations=2)
    expected = np.repeat(np.repeat(grown, 3, axis=1), 3, axis=2)[:, :size, :size]
    out = pp.brain_mask_stack(stack, stride=3, dilation=2)
    assert out.shape == stack.shape and small[0].any() and not out[1].any()
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(pp.brain_mask_stack(stack, dilation=1), pp.dilate_cross(pp.brain_mask_stack(stack)))
    np.testing.assert_array_equal(pp.erode_cross(pp.dilate_cross(small, 0), 0), small)
