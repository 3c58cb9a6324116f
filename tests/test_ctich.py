"""Checks on the real CT-ICH slices in ../shared/data/ct-ich (skipped when the folder is absent).

The whole set is read once at 64 x 64 (decoding dominates; a few tens of seconds on 2 cores);
the positive slices are read again at full size, where every lesion pixel can be counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from strokekit.io import load_ctich
from strokekit.paths import ctich_dir

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def folder():
    path = ctich_dir()
    if path is None:
        pytest.skip(
            "../shared/data/ct-ich is absent: put the CT-ICH image/, label/ and slices.csv there "
            "or set $STROKEKIT_CTICH"
        )
    return path


@pytest.fixture(scope="module")
def table(folder):
    return pd.read_csv(folder / "slices.csv", dtype={"file": str, "patient_id": str})


@pytest.fixture(scope="module")
def small(folder):
    return load_ctich(folder, image_size=64, progress=False)


def test_counts_of_slices_patients_and_positives(small, table):
    assert len(small) == 2814
    assert small.images.shape == (2814, 64, 64)
    assert len(small.patients()) == 75
    assert int(small.extra["has_mask"].sum()) == 318
    # Nearest-neighbour shrinking can lose a tiny lesion but never invents one.
    assert not small.has_lesion()[small.extra["has_mask"] == 0].any()
    assert small.unit == "display" and small.class_names == ("background", "hemorrhage")


def test_patient_ids_and_slice_indices_match_slices_csv(small, table):
    by_file = table.set_index(table["file"].str.replace(".png", "", regex=False))
    assert small.patient_ids == by_file.loc[small.case_ids, "patient_id"].tolist()
    np.testing.assert_array_equal(
        small.slice_indices, by_file.loc[small.case_ids, "slice_index_in_volume"].to_numpy()
    )
    frame = small.to_frame()
    for patient, rows in frame.groupby("patient_id", sort=False):
        steps = np.diff(rows["slice_index"].to_numpy())
        assert (steps > 0).all(), f"patient {patient}: slice indices not strictly increasing"


def test_positive_slices_have_non_empty_masks_at_full_size(folder, table):
    positives = load_ctich(folder, lesion_only=True, progress=False)
    assert len(positives) == 318
    assert positives.image_shape == (512, 512)
    assert positives.has_lesion().all()
    np.testing.assert_array_equal(positives.lesion_area(), positives.extra["lesion_pixels"])
    assert set(positives.case_ids) == {f[:-4] for f in table.loc[table["has_mask"] == 1, "file"]}


def test_whole_scans_reads_every_slice_in_order_and_filters_only_downwards(folder, table, tiny_recipe):
    """evaluation.whole_scans on two real scans (one with a bleed, one without) with a tiny recipe fitted in seconds."""
    import dataclasses

    from strokekit import fewshot as fs
    from strokekit.evaluation import whole_scans

    lesion = load_ctich(folder, image_size=16, patients=["49", "50", "51", "66"], lesion_only=True, progress=False)
    recipe = dataclasses.replace(tiny_recipe, stack_min_contrast=20.0, stack_min_ml=0.5)
    fitted = fs.fit_recipe(recipe, lesion.select_patients(["49", "50", "51"]), lesion.select_patients(["66"]), seed=0)
    scans = whole_scans(fitted, ["71", "54"], folder, image_size=16).set_index("patient_id")
    counts = table.groupby("patient_id").size()
    assert scans.loc["71", "slices"] == counts["71"] and scans.loc["54", "slices"] == counts["54"]
    assert scans.loc["71", "true_ml"] > 50 and scans.loc["54", "true_ml"] == 0   # 132 mL at 512 px
    assert scans.loc["71", "has_lesion"] and not scans.loc["54", "has_lesion"]
    assert np.isnan(scans.loc["54", "dice_3d"]) and 0 <= scans.loc["71", "dice_3d"] <= 1
    assert (scans.predicted_ml <= scans.unfiltered_predicted_ml).all()          # the floor only removes
    assert (scans.false_ml <= scans.predicted_ml + 1e-9).all()
    assert scans.loc["54", "false_ml"] == scans.loc["54", "predicted_ml"]


def test_lesion_free_patients_are_the_patients_without_a_lesion_slice(folder, table):
    from strokekit import fewshot as fs

    free = fs.lesion_free_patients(folder)
    with_lesion = set(table.loc[table.has_mask == 1, "patient_id"])
    assert len(free) == table.patient_id.nunique() - len(with_lesion) and not set(free) & with_lesion
    assert free == sorted(free, key=int)
