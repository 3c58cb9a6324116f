"""Tests of the synthetic head-CT phantom (strokekit.phantom): small images, few patients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from strokekit.config import from_dict, to_dict
from strokekit.phantom import (
    BINARY_NAMES,
    LEVELS,
    MULTICLASS_NAMES,
    PhantomConfig,
    generate_phantom,
    level_counts,
    make_volume,
    volume_to_dataset,
)

SMALL = PhantomConfig(n_patients=3, image_size=64, seed=3)


@pytest.fixture(scope="module")
def small_set():
    return generate_phantom(SMALL, progress=False)


@pytest.fixture(scope="module")
def volumes():
    """Two volumes of each lesion type at 96 px (patient indices chosen by type below)."""
    config = PhantomConfig(image_size=96, seed=11)
    return {k: make_volume(k, config) for k in range(4)}


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_gives_identical_arrays(small_set):
    again = generate_phantom(SMALL, progress=False)
    np.testing.assert_array_equal(again.images, small_set.images)
    np.testing.assert_array_equal(again.masks, small_set.masks)
    assert again.case_ids == small_set.case_ids


def test_different_seed_gives_different_data(small_set):
    other = generate_phantom(dataclasses.replace(SMALL, seed=4), progress=False)
    assert other.images.shape == small_set.images.shape
    assert np.mean(np.abs(other.images - small_set.images)) > 10.0
    assert not np.array_equal(other.masks, small_set.masks)


def test_patient_k_does_not_depend_on_the_number_of_patients():
    three = generate_phantom(dataclasses.replace(SMALL, n_patients=3), progress=False)
    five = generate_phantom(dataclasses.replace(SMALL, n_patients=5), progress=False)
    assert five.patients() == ["P01", "P02", "P03", "P04", "P05"]
    for pid in three.patients():
        a, b = three.select_patients([pid]), five.select_patients([pid])
        assert a.case_ids == b.case_ids
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.masks, b.masks)


def test_generated_slices_equal_the_same_slices_of_the_volume(small_set):
    volume = make_volume(1, SMALL)
    part = small_set.select_patients(["P02"])
    np.testing.assert_array_equal(part.slice_indices, volume.selected)
    np.testing.assert_array_equal(part.images, volume.hu[volume.selected])
    np.testing.assert_array_equal(part.masks, (volume.labels[volume.selected] > 0).astype(np.uint8))


def test_lesion_geometry_does_not_depend_on_image_size():
    small = make_volume(0, PhantomConfig(image_size=64))
    large = make_volume(0, PhantomConfig(image_size=128))
    np.testing.assert_array_equal(small.selected, large.selected)
    assert (small.lesion_type, small.territory, small.side) == (large.lesion_type, large.territory,
                                                                 large.side)
    # Same lesion area in mm^2 on every slice, up to the pixelisation of the outline.
    mm2_small = small.lesion_area * small.spacing[0] ** 2
    mm2_large = large.lesion_area * large.spacing[0] ** 2
    big = mm2_large > 300
    assert big.any()
    np.testing.assert_allclose(mm2_small[big], mm2_large[big], rtol=0.35)


# ----------------------------------------------------------------------------- intensities
def test_hounsfield_ranges(volumes):
    volume = volumes[0]
    corners = volume.hu[:, :6, :6]
    assert abs(float(corners.mean()) + 1000.0) < 3.0  # air
    assert float(volume.hu.max()) > 700.0  # cortical bone
    assert 20.0 <= float(np.median(volume.hu[volume.brain])) <= 50.0


def test_tissue_values_without_noise_or_blur():
    volume = make_volume(0, PhantomConfig(image_size=96, seed=11, noise_sd=0.0, blur_sigma=0.0))
    csf = volume.intracranial & ~volume.brain
    assert 0.0 <= float(np.median(volume.hu[csf])) <= 15.0
    brain = volume.hu[volume.brain & (volume.labels == 0)]
    # Grey matter around 35-45 HU, white matter around 25-32 HU, little else.
    assert ((brain > 23.0) & (brain < 47.0)).mean() > 0.97
    assert ((brain > 34.0) & (brain < 46.0)).mean() > 0.2
    assert ((brain > 24.0) & (brain < 33.0)).mean() > 0.2
    outside = ~volume.intracranial
    assert float(volume.hu[outside].min()) == -1000.0
    bone = volume.hu[outside & (volume.hu > 300)]
    assert 700.0 <= float(np.median(bone)) <= 1500.0


def test_noise_level_matches_noise_sd():
    config = PhantomConfig(image_size=96, noise_sd=5.0, blur_sigma=0.0, noise_correlation=0.0)
    air = make_volume(0, config).hu[:, :10, :10]
    assert float(air.std()) == pytest.approx(5.0, rel=0.1)
    correlated = make_volume(0, dataclasses.replace(config, noise_correlation=0.8)).hu[:, :10, :10]
    assert float(correlated.std()) == pytest.approx(5.0, rel=0.15)
    clean = make_volume(0, dataclasses.replace(config, noise_sd=0.0)).hu
    assert float(clean[:, :10, :10].std()) == 0.0


def test_spacing_scales_with_image_size(small_set):
    assert small_set.spacing == pytest.approx((3.6, 3.6))
    assert small_set.slice_thickness == pytest.approx(5.0)
    assert PhantomConfig(image_size=256).spacing == pytest.approx((0.9, 0.9))
    assert PhantomConfig(n_slices=30).slice_thickness == pytest.approx(4.0)


# ----------------------------------------------------------------------------- lesions
def test_masks_lie_inside_the_brain(volumes):
    for volume in volumes.values():
        lesion = volume.labels > 0
        assert lesion.any()
        assert not (lesion & ~volume.brain).any()


def _ring(mask2d: np.ndarray, inner: int, outer: int) -> np.ndarray:
    """Pixels between ``inner`` and ``outer`` dilation steps away from a 2-D mask."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask2d, iterations=outer)
    return grown & ~(ndimage.binary_dilation(mask2d, iterations=inner) if inner else mask2d)


def test_ischemic_is_darker_than_surrounding_parenchyma():
    config = PhantomConfig(image_size=96, lesion_types=("ischemic",), ischemic_contrast=10.0,
                           noise_sd=0.0, blur_sigma=0.0, seed=5)
    for k in range(3):
        volume = make_volume(k, config)
        assert volume.lesion_type == "ischemic"
        assert volume.territory in ("MCA", "ACA", "PCA")
        assert set(np.unique(volume.labels)) == {0, 2}
        lesion_hu, ring_hu = [], []
        for z in np.flatnonzero(volume.lesion_area > 20):
            lesion = volume.labels[z] > 0
            ring = _ring(lesion, 1, 5) & volume.brain[z]
            lesion_hu.append(volume.hu[z][lesion].mean())
            ring_hu.append(volume.hu[z][ring].mean())
        assert np.mean(ring_hu) - np.mean(lesion_hu) > 5.0


def test_ischemic_contrast_parameter_sets_the_drop():
    base = PhantomConfig(image_size=64, lesion_types=("ischemic",), noise_sd=0.0, blur_sigma=0.0)
    drops = []
    for contrast in (4.0, 12.0):
        volume = make_volume(0, dataclasses.replace(base, ischemic_contrast=contrast))
        healthy = make_volume(0, dataclasses.replace(base, lesion_types=("ischemic",),
                                                     ischemic_contrast=1e-3))
        lesion = volume.labels > 0
        drops.append(float((healthy.hu[lesion] - volume.hu[lesion]).mean()))
    assert drops[0] == pytest.approx(4.0, rel=0.25)
    assert drops[1] == pytest.approx(12.0, rel=0.25)


def test_hemorrhage_is_bright_with_an_unlabelled_darker_halo():
    config = PhantomConfig(image_size=96, lesion_types=("hemorrhagic",), seed=5)
    volume = make_volume(0, config)
    assert volume.lesion_type == "hemorrhagic"
    assert volume.territory in ("deep", "lobar", "cerebellar")
    assert set(np.unique(volume.labels)) == {0, 1}
    lesion = volume.labels > 0
    assert float(volume.hu[lesion].mean()) > 50.0
    clean = make_volume(0, dataclasses.replace(config, noise_sd=0.0, blur_sigma=0.0))
    assert 55.0 - 8.0 <= float(clean.hu[clean.labels > 0].mean()) <= 85.0 + 8.0
    z = int(np.argmax(clean.lesion_area))
    clot = clean.labels[z] > 0
    halo = _ring(clot, 0, 1) & clean.brain[z] & ~clot
    far = _ring(clot, 6, 9) & clean.brain[z]
    assert halo.any() and far.any()
    # Edema lowers the parenchyma next to the clot; the halo is not part of the mask.
    assert clean.hu[z][halo].mean() < clean.hu[z][far].mean() - 2.0


def test_lesion_size_parameter_changes_lesion_area():
    small = generate_phantom(PhantomConfig(n_patients=3, image_size=64, lesion_size=(6.0, 7.0)),
                             progress=False)
    large = generate_phantom(PhantomConfig(n_patients=3, image_size=64, lesion_size=(24.0, 26.0)),
                             progress=False)
    assert large.lesion_area().mean() > 2.5 * small.lesion_area().mean()


def test_multiclass_labels_match_lesion_type():
    config = PhantomConfig(n_patients=6, image_size=64, multiclass=True, seed=2)
    data = generate_phantom(config, progress=False)
    assert data.class_names == MULTICLASS_NAMES
    types = data.extra["lesion_type"]
    assert {"ischemic", "hemorrhagic"} <= set(types)
    for i in range(len(data)):
        present = set(np.unique(data.masks[i])) - {0}
        expected = {"hemorrhagic": {1}, "ischemic": {2}, "none": set()}[types[i]]
        assert present == expected, data.case_ids[i]


def test_binary_masks_are_zero_one(small_set):
    assert small_set.class_names == BINARY_NAMES
    assert set(np.unique(small_set.masks)) == {0, 1}
    assert small_set.unit == "HU"


# ----------------------------------------------------------------------------- counts and levels
def test_counts_of_lesion_and_empty_slices():
    config = PhantomConfig(n_patients=3, image_size=64, slices_per_patient=4,
                           empty_slices_per_patient=2, seed=8)
    data = generate_phantom(config, progress=False)
    assert len(data) == 3 * (4 + 2)
    frame = data.to_frame()
    per_patient = frame.groupby("patient_id").agg(
        lesion=("lesion_pixels", lambda s: int((s > 0).sum())),
        empty=("lesion_pixels", lambda s: int((s == 0).sum())),
    )
    assert per_patient["lesion"].tolist() == [4, 4, 4]
    assert per_patient["empty"].tolist() == [2, 2, 2]
    empty = frame["lesion_pixels"] == 0
    assert (frame.loc[empty, "lesion_type"] == "none").all()
    assert (frame.loc[empty, "territory"] == "none").all()
    assert (frame.loc[~empty, "lesion_type"] != "none").all()
    # Lesion slices have a real lesion: at least 20 px at 256 px, i.e. 16 mm^2.
    assert (frame.loc[~empty, "lesion_pixels"] * data.spacing[0] ** 2 >= 16.0).all()


def test_case_ids_and_bookkeeping(small_set):
    assert small_set.patients() == ["P01", "P02", "P03"]
    columns = (small_set.case_ids, small_set.patient_ids, small_set.slice_indices)
    for cid, pid, k in zip(*columns, strict=True):
        assert cid == f"{pid}_s{k:02d}"
    assert set(small_set.source_paths) == {""}
    assert set(small_set.extra) == {"level", "lesion_type", "territory"}
    assert set(small_set.extra["level"]) <= set(LEVELS)


def test_all_levels_appear_among_lesion_slices_and_lesions_span_levels(small_set):
    counts = level_counts(small_set)
    assert all(counts[name] > 0 for name in LEVELS), counts
    frame = small_set.to_frame()
    spans = frame.groupby("patient_id")["level"].nunique()
    assert (spans >= 2).sum() >= 2


def test_levels_run_from_skull_base_to_vertex(volumes):
    order = {name: i for i, name in enumerate(LEVELS)}
    for volume in volumes.values():
        ranks = np.array([order[x] for x in volume.levels])
        assert ranks[0] == 0 and ranks[-1] == 2
        assert (np.diff(ranks) >= 0).all()


def test_brain_is_larger_at_ventricle_level_than_at_vertex(volumes):
    for volume in volumes.values():
        area = volume.brain.reshape(len(volume.levels), -1).sum(axis=1)
        levels = np.asarray(volume.levels)
        assert area[levels == "ventricles"].mean() > 1.3 * area[levels == "vertex"].mean()
        # The vertex narrows upwards.
        assert area[-1] < area[levels == "ventricles"].max()


def test_volume_to_dataset_covers_every_slice(volumes):
    volume = volumes[2]
    data = volume_to_dataset(volume, multiclass=True)
    assert len(data) == len(volume.hu)
    assert data.case_ids[0] == f"{volume.patient_id}_s00"
    np.testing.assert_array_equal(data.masks, volume.labels)
    with_lesion = data.has_lesion()
    assert (data.extra["lesion_type"][with_lesion] == volume.lesion_type).all()
    assert (data.extra["lesion_type"][~with_lesion] == "none").all()
    binary = volume_to_dataset(volume)
    assert binary.class_names == BINARY_NAMES and binary.masks.max() == 1


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_slices": 4}, "n_slices"),
        ({"lesion_types": ("ischemic", "tumour")}, "lesion_types"),
        ({"lesion_types": ()}, "lesion_types"),
        ({"slices_per_patient": 13}, "slices_per_patient"),
        ({"empty_slices_per_patient": -1}, "empty_slices_per_patient"),
        ({"image_size": 16}, "image_size"),
        ({"lesion_size": (20.0, 10.0)}, "lesion_size"),
        ({"ischemic_contrast": 0.0}, "ischemic_contrast"),
        ({"hemorrhage_hu": (90.0, 60.0)}, "hemorrhage_hu"),
        ({"noise_sd": -1.0}, "noise_sd"),
        ({"seed": -3}, "seed"),
        ({"n_patients": 0}, "n_patients"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        PhantomConfig(**changes)


def test_unknown_lesion_type_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Expected .*'ischemic', 'hemorrhagic'.*tumour"):
        PhantomConfig(lesion_types=("tumour",))


def test_config_round_trips_through_a_dict():
    config = PhantomConfig(lesion_types=("ischemic",), lesion_size=(5.0, 9.0))
    data = to_dict(config)
    assert data["lesion_types"] == ["ischemic"]
    assert from_dict(PhantomConfig, data) == config


def test_bad_patient_index_is_rejected():
    with pytest.raises(ValueError, match="patient_index"):
        make_volume(-1, SMALL)
