"""Tests for strokekit.recon3d: volumes in mL, cleaning, stacking, meshes, 3-D figures, prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.recon3d import (
    clean_mask,
    lesion_volume_ml,
    plot_3d,
    plot_volume_slice,
    predict_volume,
    stack_slices,
    surface_mesh,
    volume_report,
)


# --------------------------------------------------------------------------- helpers
def _sphere(radius_mm: float, spacing_rc, thickness: float) -> np.ndarray:
    """Voxels whose centres lie inside a sphere centred in a grid that covers it with margin."""
    half = radius_mm + 2 * thickness
    z = np.arange(-half, half + 1e-9, thickness)
    y = np.arange(-half, half + 1e-9, spacing_rc[0])
    x = np.arange(-half, half + 1e-9, spacing_rc[1])
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return (zz**2 + yy**2 + xx**2) <= radius_mm**2


def _edges_shared_twice(faces: np.ndarray) -> bool:
    """A closed triangle mesh uses every edge in exactly two faces."""
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    return bool(np.all(counts == 2))


def _constant_model(size: int = 32, channels: int = 1, weight: float = 10.0, bias: float = -5.0):
    """sigmoid(weight * x + bias) per pixel: predictions that can be computed by hand."""
    import keras

    return keras.Sequential(
        [
            keras.Input((size, size, channels)),
            keras.layers.Conv2D(
                1,
                1,
                activation="sigmoid",
                kernel_initializer=keras.initializers.Constant(weight),
                bias_initializer=keras.initializers.Constant(bias),
            ),
        ]
    )


def _config(**kw):
    from strokekit.train import TrainConfig

    return TrainConfig(image_size=32, windows=("brain",), **kw)


# --------------------------------------------------------------------------- volumes
def test_sphere_volume_in_ml_with_anisotropic_spacing():
    spacing, thickness = (0.5, 0.5), 2.0
    sphere = _sphere(10.0, spacing, thickness)
    expected = 4.0 / 3.0 * math.pi * 10.0**3 / 1000.0  # 4.19 mL
    got = lesion_volume_ml(sphere, spacing, thickness)
    assert got == pytest.approx(expected, rel=0.03)
    # The same voxels counted as 1 mm cubes give a different number: spacing really matters.
    assert lesion_volume_ml(sphere, (1.0, 1.0), 1.0) == pytest.approx(
        np.count_nonzero(sphere) / 1000.0
    )


def test_box_volume_is_exact_and_labels_count_as_lesion():
    mask = np.zeros((6, 10, 12), np.uint8)
    mask[1:4, 2:6, 3:8] = 2  # 3 x 4 x 5 = 60 voxels, label 2
    # 0.5 x 0.8 mm pixels, 2.5 mm slices: 1 mm³ per voxel, so 60 mm³ = 0.06 mL
    assert lesion_volume_ml(mask, (0.5, 0.8), 2.5) == pytest.approx(0.06, rel=1e-12)
    with pytest.raises(ValueError, match="slice thickness"):
        lesion_volume_ml(mask, (0.5, 0.8), None)
    with pytest.raises(ValueError, match="positive"):
        lesion_volume_ml(mask, (0.5, -0.8), 2.5)


def test_volume_report_hand_computed():
    pred = np.zeros((4, 10, 10), bool)
    truth = np.zeros((4, 10, 10), bool)
    pred[1:3, 2:6, 2:6] = True  # 32 voxels
    truth[1:3, 4:8, 2:6] = True  # 32 voxels, 16 shared
    report = volume_report(pred, truth, (0.5, 0.5), 4.0)  # 1 mm³ voxels
    assert report["predicted_ml"] == pytest.approx(0.032)
    assert report["true_ml"] == pytest.approx(0.032)
    assert report["difference_ml"] == pytest.approx(0.0)
    assert report["dice_3d"] == pytest.approx(2 * 16 / 64)
    same = volume_report(pred, truth, (4.0, 0.5, 0.5))  # (dz, dy, dx) form
    assert same == pytest.approx(report, nan_ok=True)
    alone = volume_report(pred, None, (0.5, 0.5), 4.0)
    assert alone["predicted_ml"] == pytest.approx(0.032) and math.isnan(alone["dice_3d"])
    with pytest.raises(ValueError, match="differ"):
        volume_report(pred, truth[:3], (0.5, 0.5), 4.0)


# --------------------------------------------------------------------------- cleaning
def test_clean_mask_removes_speck_keeps_blob_and_fills_hole():
    mask = np.zeros((9, 12, 12), np.uint8)
    mask[2:7, 2:7, 2:7] = 1
    mask[4, 4, 4] = 0  # an enclosed hole
    mask[0, 10, 9:12] = 1  # a 3-voxel speck
    out = clean_mask(mask, min_size_voxels=10)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    assert out[0, 10].sum() == 0
    assert out[4, 4, 4] == 1
    assert out.sum() == 125
    kept = clean_mask(mask, min_size_voxels=0, fill_holes=False)
    assert kept.sum() == 124 + 3 and kept[4, 4, 4] == 0


def test_clean_mask_fills_a_hole_open_to_the_next_slice():
    mask = np.zeros((3, 9, 9), bool)
    mask[1, 2:7, 2:7] = True
    mask[1, 4, 4] = False
    mask[2, 4, 4] = True  # touches the hole from above, so 3-D filling alone would not close it
    out = clean_mask(mask, min_size_voxels=0)
    assert out[1, 4, 4] == 1


def test_clean_mask_keep_largest_min_ml_labels_and_empty():
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[1:4, 1:5, 1:5] = 1  # 48 voxels
    mask[1:4, 10:18, 10:18] = 1  # 192 voxels
    largest = clean_mask(mask, min_size_voxels=0, keep_largest=1)
    assert largest.sum() == 192 and largest[2, 2, 2] == 0
    # 1 x 1 x 1 mm voxels: 48 mm³ = 0.048 mL < 0.05 mL <= 0.192 mL
    by_ml = clean_mask(mask, min_size_voxels=0, spacing=(1.0, 1.0, 1.0), min_size_ml=0.05)
    assert by_ml.sum() == 192
    labels = mask.copy()
    labels[1:4, 10:18, 10:18] = 2
    labels[5, 0, 0] = 2  # a speck of label 2
    cleaned = clean_mask(labels, min_size_voxels=5)
    assert set(np.unique(cleaned).tolist()) == {0, 1, 2}
    assert (cleaned == 2).sum() == 192 and (cleaned == 1).sum() == 48
    assert not clean_mask(np.zeros((3, 4, 4), bool)).any()
    with pytest.raises(ValueError, match="needs spacing"):
        clean_mask(mask, min_size_ml=0.1)
    with pytest.raises(ValueError, match="keep_largest"):
        clean_mask(mask, keep_largest=0)


# --------------------------------------------------------------------------- stacking
def _two_patient_dataset(spacing=(0.7, 0.7), thickness=5.0) -> SliceDataset:
    order = [2, 0, 1, 3]  # patient A's slices stored out of order
    images = np.stack([np.full((4, 5), 10.0 * k) for k in order] + [np.full((4, 5), -1.0)] * 2)
    masks = np.zeros(images.shape, np.uint8)
    masks[0, 1, 1] = 1  # slice index 2
    return SliceDataset(
        images=images,
        masks=masks,
        case_ids=[f"A{k}" for k in order] + ["B0", "B1"],
        patient_ids=["A"] * 4 + ["B"] * 2,
        slice_indices=np.array(order + [0, 1]),
        spacing=spacing,
        slice_thickness=thickness,
    )


def test_stack_slices_orders_by_slice_index():
    volume, mask, spacing = stack_slices(_two_patient_dataset(), "A")
    assert volume.shape == (4, 4, 5)
    assert volume[:, 0, 0].tolist() == [0.0, 10.0, 20.0, 30.0]
    assert mask[2, 1, 1] == 1 and mask.sum() == 1
    assert spacing == (5.0, 0.7, 0.7)


def test_stack_slices_errors_and_spacing_override():
    data = _two_patient_dataset()
    with pytest.raises(DataError, match="unknown patient 'C'"):
        stack_slices(data, "C")
    gappy = data.subset([0, 1, 3])  # indices 2, 0, 3: slice 1 missing
    with pytest.raises(DataError, match=r"lacks slices \[1\]"):
        stack_slices(gappy, "A")
    assert stack_slices(gappy, "A", allow_gaps=True)[0].shape[0] == 3
    no_spacing = _two_patient_dataset(spacing=None, thickness=None)
    with pytest.raises(DataError, match="spacing=\\(dz, dy, dx\\)"):
        stack_slices(no_spacing, "A")
    assert stack_slices(no_spacing, "A", spacing=(5, 0.45, 0.45))[2] == (5.0, 0.45, 0.45)


# --------------------------------------------------------------------------- meshes and figures
def test_surface_mesh_of_empty_prediction_is_empty():
    verts, faces = surface_mesh(np.zeros((5, 8, 8), np.uint8), (5.0, 0.9, 0.9))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)
    verts, faces = surface_mesh(np.full((5, 8, 8), 0.2, np.float32), (5.0, 0.9, 0.9))
    assert len(verts) == 0 and len(faces) == 0


def test_surface_mesh_of_cube_is_closed_and_in_mm():
    spacing = (2.0, 0.5, 0.25)
    mask = np.zeros((8, 12, 14), bool)
    mask[2:5, 3:8, 4:10] = True
    verts, faces = surface_mesh(mask, spacing)
    assert _edges_shared_twice(faces)
    # The iso-surface lies half a voxel outside the outermost lesion voxel centres.
    lo = [(2 - 0.5) * 2.0, (3 - 0.5) * 0.5, (4 - 0.5) * 0.25]
    hi = [(4 + 0.5) * 2.0, (7 + 0.5) * 0.5, (9 + 0.5) * 0.25]
    np.testing.assert_allclose(verts.min(axis=0), lo, atol=1e-5)
    np.testing.assert_allclose(verts.max(axis=0), hi, atol=1e-5)


def test_surface_mesh_closes_at_the_volume_border():
    mask = np.zeros((4, 6, 6), bool)
    mask[0:2, 0:3, 0:3] = True  # touches the first slice, row and column
    verts, faces = surface_mesh(mask, (5.0, 1.0, 1.0))
    assert _edges_shared_twice(faces)
    np.testing.assert_allclose(verts.min(axis=0), [-2.5, -0.5, -0.5], atol=1e-5)


def test_plot_3d_empty_prediction_says_so():
    empty = np.zeros((6, 16, 16), bool)
    brain = np.zeros_like(empty)
    brain[1:5, 3:13, 3:13] = True
    fig = plot_3d(empty, (5.0, 0.9, 0.9), brain_mask=brain)
    assert fig.get_suptitle() == "no lesion predicted"
    assert len(fig.axes) == 1 and fig.axes[0].name == "3d"


def test_plot_3d_titles_volumes_and_checks_shapes():
    lesion = np.zeros((6, 16, 16), bool)
    lesion[2:4, 4:9, 4:8] = True  # 40 voxels of 2 mm³ = 0.08 mL
    fig = plot_3d(lesion, (2.0, 1.0, 1.0), truth_mask=lesion)
    assert fig.get_suptitle() == "predicted lesion: 0.1 mL (reference 0.1 mL)"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["predicted lesion", "reference"]
    with pytest.raises(ValueError, match="brain_mask shape"):
        plot_3d(lesion, (2.0, 1.0, 1.0), brain_mask=lesion[:3])


def test_plot_volume_slice_titles_counts():
    volume = np.zeros((3, 10, 10), np.float32)
    pred = np.zeros((3, 10, 10), np.uint8)
    truth = np.zeros((3, 10, 10), np.uint8)
    pred[1, 2:6, 2:7] = 1  # 20 px
    truth[1, 3:6, 3:7] = 1  # 12 px
    fig = plot_volume_slice(volume, pred, truth, 1)
    assert fig.axes[0].get_title() == "slice 2/3, predicted 20 px, reference 12 px"
    with pytest.raises(IndexError, match="outside the volume's 3 slices"):
        plot_volume_slice(volume, pred, truth, 3)


# --------------------------------------------------------------------------- prediction
@pytest.mark.backend
def test_predict_volume_returns_original_size_and_probabilities():
    model = _constant_model()
    volume = np.zeros((3, 48, 40), np.float32)
    volume[:, :, :20] = 80.0  # brain window L40/W80: 80 HU -> 1.0, 0 HU -> 0.0
    prob = predict_volume(model, volume, _config(), batch_size=2, progress=False)
    assert prob.shape == (3, 48, 40) and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0

    def sig(v):
        return 1.0 / (1.0 + math.exp(-v))

    np.testing.assert_allclose(prob[:, :, :14], sig(5.0), atol=1e-3)  # left half stays left
    np.testing.assert_allclose(prob[:, :, 26:], sig(-5.0), atol=1e-3)


@pytest.mark.backend
def test_predict_volume_on_display_dataset():
    model = _constant_model()
    data = SliceDataset(
        images=np.full((2, 20, 20), 127.5, np.float32),  # display 0..255 -> 0.5
        masks=np.zeros((2, 20, 20), np.uint8),
        case_ids=["a", "b"],
        unit="display",
    )
    prob = predict_volume(model, data, _config(), progress=False)
    assert prob.shape == (2, 20, 20)
    np.testing.assert_allclose(prob, 0.5, atol=1e-5)  # sigmoid(10 * 0.5 - 5)


def test_voxel_ml_uses_the_slices_geometry_else_ct_ichs():
    from strokekit.recon3d import ASSUMED_FOV_MM, ASSUMED_SLICE_MM, voxel_ml

    assert voxel_ml((10, 10), (0.5, 0.8), 2.0) == pytest.approx(0.5 * 0.8 * 2.0 / 1000)
    assert voxel_ml((512, 512)) == pytest.approx((ASSUMED_FOV_MM / 512) ** 2 * ASSUMED_SLICE_MM / 1000)
    assert voxel_ml((256, 128), None, 1.0) == pytest.approx(0.9 * 1.8 * 1.0 / 1000)


def test_bright_components_takes_one_slice_and_checks_shapes():
    from strokekit.recon3d import bright_components

    levels = np.full((20, 20), 100.0, np.float32)
    brain = np.zeros((20, 20), bool)
    brain[2:18, 2:18] = True
    levels[5:9, 5:9] = 170.0
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:9] = 1
    mask[12:15, 12:15] = 1  # as bright as the brain
    kept = bright_components(mask, levels, brain, 40.0, 0.0, 0.001)
    assert kept.shape == (1, 20, 20) and kept.sum() == 16
    assert bright_components(mask, levels, brain, None, 0.012, 0.001).sum() == 16  # 0.016 mL kept, 0.009 mL not
    with pytest.raises(ValueError, match="one shape"):
        bright_components(mask, levels[:10], brain, 40.0, 0.0, 0.001)
