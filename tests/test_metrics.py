"""Metrics against numbers computed by hand on tiny arrays."""

import math

import numpy as np
import pytest

from strokekit import metrics as M


def example_4x4():
    """tp=3, fp=1, fn=2, tn=10."""
    truth = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    pred = np.array(
        [
            [1, 1, 1, 0],
            [0, 1, 0, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )
    return truth, pred


def test_confusion_and_overlap_metrics_by_hand():
    truth, pred = example_4x4()
    assert M.confusion(truth, pred) == (3, 1, 2, 10)
    assert M.dice(truth, pred) == pytest.approx(6 / 9)
    assert M.iou(truth, pred) == pytest.approx(3 / 6)
    assert M.sensitivity(truth, pred) == pytest.approx(3 / 5)
    assert M.specificity(truth, pred) == pytest.approx(10 / 11)
    assert M.precision(truth, pred) == pytest.approx(3 / 4)
    # IoU and Dice are tied: IoU = Dice / (2 - Dice).
    d = M.dice(truth, pred)
    assert M.iou(truth, pred) == pytest.approx(d / (2 - d))


def test_wrong_formula_is_not_dice():
    truth, pred = example_4x4()
    assert M.dice_wrong_formula(truth, pred) == pytest.approx(3 / 9)
    # A perfect prediction scores only 0.5 with the study's formula.
    assert M.dice_wrong_formula(truth, truth) == pytest.approx(0.5)
    assert M.dice(truth, truth) == 1.0


def test_bool_255_and_probabilities_are_accepted():
    truth, pred = example_4x4()
    assert M.confusion(truth.astype(bool), pred * 255) == (3, 1, 2, 10)
    prob = np.where(pred > 0, 0.8, 0.2).astype(np.float32)
    assert M.confusion(truth, prob) == (3, 1, 2, 10)
    # The threshold is inclusive: 0.5 counts as foreground.
    assert M.as_binary(np.array([0.49, 0.5, 0.51], dtype=np.float32)).tolist() == [
        False,
        True,
        True,
    ]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"truth shape \(2, 2\) and pred shape \(3, 3\) differ"):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))


def test_empty_case_convention():
    empty = np.zeros((3, 3), dtype=bool)
    some = empty.copy()
    some[1, 1] = True
    # Both empty: perfect agreement; recall and precision undefined.
    assert M.dice(empty, empty) == 1.0
    assert M.iou(empty, empty) == 1.0
    assert math.isnan(M.sensitivity(empty, empty))
    assert math.isnan(M.precision(empty, empty))
    assert M.specificity(empty, empty) == 1.0
    # Truth empty, prediction not.
    assert M.dice(empty, some) == 0.0
    assert M.iou(empty, some) == 0.0
    assert M.precision(empty, some) == 0.0
    assert math.isnan(M.sensitivity(empty, some))
    assert M.specificity(empty, some) == pytest.approx(8 / 9)
    # Prediction empty, truth not.
    assert M.dice(some, empty) == 0.0
    assert M.sensitivity(some, empty) == 0.0
    assert math.isnan(M.precision(some, empty))
    # No background at all: specificity undefined.
    full = np.ones((2, 2), dtype=bool)
    assert math.isnan(M.specificity(full, full))
    # The same rule applied to arrays of counts.
    out = M.metrics_from_counts(
        np.array([0, 0]), np.array([0, 1]), np.array([0, 0]), np.array([4, 3])
    )
    assert out["dice"].tolist() == [1.0, 0.0]
    assert np.isnan(out["sensitivity"]).all()


def test_volume_difference_pixels_ml_and_relative():
    truth, pred = example_4x4()  # truth 5 pixels, pred 4 pixels
    assert M.volume(truth) == 5.0
    assert M.volume_difference(truth, pred) == -1.0
    assert M.volume_difference(truth, pred, relative=True) == pytest.approx(-1 / 5)
    vox = M.voxel_volume_ml((0.5, 0.5), slice_thickness=4.0)  # 1 mm³
    assert vox == pytest.approx(0.001)
    assert M.volume_difference(truth, pred, voxel_volume_ml=vox) == pytest.approx(-0.001)
    assert M.volume(truth, vox) == pytest.approx(0.005)
    empty = np.zeros_like(truth)
    assert math.isnan(M.volume_difference(empty, pred, relative=True))
    assert M.volume_difference(truth, empty, relative=True) == -1.0
    with pytest.raises(ValueError, match="must be positive"):
        M.voxel_volume_ml((0.5, 0.0))


# --------------------------------------------------------------------------- distances
def test_single_points_anisotropic_2d():
    truth = np.zeros((5, 5), dtype=bool)
    pred = np.zeros((5, 5), dtype=bool)
    truth[1, 1] = True
    pred[2, 1] = True  # one row below: rows are 2.5 mm apart
    assert M.hausdorff95(truth, pred, spacing=(2.5, 1.0)) == pytest.approx(2.5)
    assert M.average_surface_distance(truth, pred, spacing=(2.5, 1.0)) == pytest.approx(2.5)
    pred2 = np.zeros((5, 5), dtype=bool)
    pred2[1, 2] = True  # one column to the right: 1.0 mm
    assert M.hausdorff95(truth, pred2, spacing=(2.5, 1.0)) == pytest.approx(1.0)
    # Diagonal neighbour: sqrt(2.5² + 1²).
    pred3 = np.zeros((5, 5), dtype=bool)
    pred3[2, 2] = True
    assert M.hausdorff95(truth, pred3, spacing=(2.5, 1.0)) == pytest.approx(math.sqrt(7.25))


def test_single_points_anisotropic_3d():
    truth = np.zeros((4, 4, 4), dtype=bool)
    pred = np.zeros((4, 4, 4), dtype=bool)
    truth[1, 2, 2] = True
    pred[3, 2, 2] = True  # two slices apart, slices 5 mm thick
    sp = (5.0, 0.5, 0.5)
    assert M.hausdorff95(truth, pred, spacing=sp) == pytest.approx(10.0)
    assert M.average_surface_distance(truth, pred, spacing=sp) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="has 2 values for 3-D masks"):
        M.hausdorff95(truth, pred, spacing=(0.5, 0.5))


def test_shifted_square_known_distances():
    # A 3x3 square and the same square one column to the right. Each surface has 8 voxels
    # (the centre is interior); in each direction 4 surface voxels are at distance 1 and 4
    # lie on the other surface (distance 0).
    truth = np.zeros((7, 8), dtype=bool)
    pred = np.zeros((7, 8), dtype=bool)
    truth[2:5, 2:5] = True
    pred[2:5, 3:6] = True
    a, b = M.surface_distances(truth, pred)
    assert sorted(a.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(b.tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert M.average_surface_distance(truth, pred) == pytest.approx(0.5)
    assert M.hausdorff95(truth, pred) == pytest.approx(1.0)
    assert M.hausdorff_distance(truth, pred, percentile=100) == pytest.approx(1.0)
    assert M.hausdorff_distance(truth, pred, percentile=50) == pytest.approx(0.5)
    # Columns 2 mm apart: the three edge pixels per side move to 2 mm, but the one pixel
    # that was 1 column from the other surface is now nearer along a row (1 mm):
    # (3 * 2 + 1) per direction over 16 distances.
    assert M.average_surface_distance(truth, pred, spacing=(1.0, 2.0)) == pytest.approx(14 / 16)


def test_surface_distance_empty_cases():
    empty = np.zeros((4, 4), dtype=bool)
    some = empty.copy()
    some[1:3, 1:3] = True
    assert M.hausdorff95(empty, empty) == 0.0
    assert M.average_surface_distance(empty, empty) == 0.0
    assert M.hausdorff95(empty, some) == math.inf
    assert M.hausdorff95(some, empty) == math.inf
    assert M.average_surface_distance(some, empty) == math.inf


def test_distances_do_not_depend_on_crop_position():
    # The bounding-box crop must give the same result wherever the masks sit.
    a = np.zeros((30, 30), dtype=bool)
    b = np.zeros((30, 30), dtype=bool)
    a[0:6, 0:4] = True
    b[3:9, 2:5] = True
    ref = M.hausdorff95(a, b, spacing=(0.7, 1.3))
    shifted = M.hausdorff95(
        np.roll(a, (12, 15), (0, 1)), np.roll(b, (12, 15), (0, 1)), spacing=(0.7, 1.3)
    )
    assert ref == pytest.approx(shifted)
    assert ref > 0


# --------------------------------------------------------------------------- lesions
def lesion_masks():
    truth = np.zeros((20, 20), dtype=bool)
    pred = np.zeros((20, 20), dtype=bool)
    truth[1:3, 1:3] = True  # lesion 1: 4 px, hit by one pixel of a shifted blob
    truth[10:13, 10:13] = True  # lesion 2: 9 px, fully covered
    truth[1:3, 15:17] = True  # lesion 3: missed
    pred[2:4, 2:4] = True  # overlaps lesion 1 at (2, 2) only
    pred[10:13, 10:13] = True
    pred[16:18, 2:4] = True  # false-positive blob
    return truth, pred


def test_lesion_detection_counts():
    truth, pred = lesion_masks()
    out = M.lesion_detection(truth, pred)
    assert out["n_true_lesions"] == 3
    assert out["n_pred_lesions"] == 3
    assert out["tp_lesions"] == 2
    assert out["fn_lesions"] == 1
    assert out["fp_lesions"] == 1
    assert out["lesion_precision"] == pytest.approx(2 / 3)
    assert out["lesion_recall"] == pytest.approx(2 / 3)
    assert out["lesion_f1"] == pytest.approx(2 / 3)


def test_lesion_detection_min_overlap():
    truth, pred = lesion_masks()
    # Lesion 1 and the blob over it share 1 of 4 pixels (25 %) < 50 %: missed and a false positive.
    out = M.lesion_detection(truth, pred, min_overlap=0.5)
    assert (out["tp_lesions"], out["fn_lesions"], out["fp_lesions"]) == (1, 2, 2)
    assert out["lesion_recall"] == pytest.approx(1 / 3)
    assert out["lesion_precision"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="min_overlap must lie in 0..1"):
        M.lesion_detection(truth, pred, min_overlap=2)


def test_lesion_connectivity_and_empty():
    diag = np.zeros((4, 4), dtype=bool)
    diag[0, 0] = diag[1, 1] = True
    assert M.lesion_detection(diag, diag)["n_true_lesions"] == 1  # 8-connectivity by default
    assert M.lesion_detection(diag, diag, connectivity=4)["n_true_lesions"] == 2
    with pytest.raises(ValueError, match=r"Expected one of \[4, 8\]. Received: connectivity=6"):
        M.lesion_detection(diag, diag, connectivity=6)
    empty = np.zeros((4, 4), dtype=bool)
    both_empty = M.lesion_detection(empty, empty)
    assert both_empty["lesion_f1"] == 1.0
    assert math.isnan(both_empty["lesion_recall"]) and math.isnan(both_empty["lesion_precision"])
    fp_only = M.lesion_detection(empty, diag)
    assert fp_only["fp_lesions"] == 1 and fp_only["lesion_f1"] == 0.0
    assert fp_only["lesion_precision"] == 0.0


def test_lesion_detection_3d_and_per_slice():
    vol = np.zeros((3, 5, 5), dtype=bool)
    vol[0, 1:3, 1:3] = True
    vol[1, 2:4, 2:4] = True  # touches the blob above: one 3-D lesion
    assert M.lesion_detection(vol, vol)["n_true_lesions"] == 1
    assert M.lesion_detection(vol, vol, connectivity=26)["n_true_lesions"] == 1
    assert M.lesion_detection(vol, vol, per_slice=True)["n_true_lesions"] == 2


# --------------------------------------------------------------------------- multiclass
def test_per_class_metrics_excludes_background():
    truth = np.array([[0, 1, 1, 2], [0, 0, 2, 2], [0, 0, 0, 0]])
    pred = np.array([[0, 1, 0, 2], [1, 0, 2, 0], [0, 0, 0, 2]])
    df = M.per_class_metrics(truth, pred, 3, class_names=["background", "hemorrhagic", "ischemic"])
    assert df["class_name"].tolist() == ["hemorrhagic", "ischemic"]
    hem = df.iloc[0]
    # class 1: truth {(0,1),(0,2)}, pred {(0,1),(1,0)} → tp 1, fp 1, fn 1, tn 9
    assert (hem.tp, hem.fp, hem.fn, hem.tn) == (1, 1, 1, 9)
    assert hem.dice == pytest.approx(2 / 4)
    isc = df.iloc[1]
    # class 2: truth {(0,3),(1,2),(1,3)}, pred {(0,3),(1,2),(2,3)} → tp 2, fp 1, fn 1
    assert (isc.tp, isc.fp, isc.fn) == (2, 1, 1)
    assert isc.dice == pytest.approx(4 / 6)
    assert isc.iou == pytest.approx(2 / 4)
    assert isc.sensitivity == pytest.approx(2 / 3)
    assert isc.precision == pytest.approx(2 / 3)
    with_bg = M.per_class_metrics(truth, pred, 3, include_background=True)
    # background: truth 7 px, pred 7 px, tp 5 → Dice 10/14
    assert with_bg.iloc[0].dice == pytest.approx(10 / 14)
    with pytest.raises(ValueError, match=r"expected 0..1"):
        M.per_class_metrics(truth, pred, 2)


# --------------------------------------------------------------------------- aggregation
def slice_with(tp, fp, fn, width=10):
    """A 1 x width slice pair with the given counts (tn fills the rest)."""
    t = np.zeros((1, width), dtype=np.uint8)
    p = np.zeros((1, width), dtype=np.uint8)
    t[0, :tp] = p[0, :tp] = 1
    p[0, tp : tp + fp] = 1
    t[0, tp + fp : tp + fp + fn] = 1
    return t, p


def aggregation_example():
    parts = [slice_with(8, 0, 0), slice_with(0, 0, 0), slice_with(1, 1, 2), slice_with(0, 2, 0)]
    truth = np.stack([t for t, _ in parts])
    pred = np.stack([p for _, p in parts])
    return truth, pred, ["A", "A", "B", "B"]


def test_aggregate_levels_differ_by_hand():
    truth, pred, pids = aggregation_example()
    agg = M.aggregate(truth, pred, pids)
    # Dice per slice: 1, 1 (both empty), 2/5, 0.
    assert agg.loc["dice", "pooled"] == pytest.approx(18 / 23)  # tp 9, fp 3, fn 2
    assert agg.loc["dice", "mean_of_slices"] == pytest.approx(0.6)
    assert agg.loc["dice", "mean_of_lesion_slices"] == pytest.approx(0.7)
    assert agg.loc["dice", "mean_of_patients"] == pytest.approx((1 + 2 / 7) / 2)  # B: tp1 fp3 fn2
    # Sensitivity is NaN on the two lesion-free slices: skipped and counted.
    assert agg.loc["sensitivity", "pooled"] == pytest.approx(9 / 11)
    assert agg.loc["sensitivity", "mean_of_slices"] == pytest.approx((1 + 1 / 3) / 2)
    assert agg.loc["sensitivity", "mean_of_slices_skipped"] == 2
    assert agg.loc["sensitivity", "mean_of_slices_n"] == 2
    # Precision: 1, NaN, 1/2, 0 per slice; A 1, B 1/4 per patient.
    assert agg.loc["precision", "pooled"] == pytest.approx(9 / 12)
    assert agg.loc["precision", "mean_of_slices"] == pytest.approx(0.5)
    assert agg.loc["precision", "mean_of_slices_skipped"] == 1
    assert agg.loc["precision", "mean_of_patients"] == pytest.approx(0.625)
    assert agg.loc["dice", "mean_of_patients_skipped"] == 0
    no_patients = M.aggregate(truth, pred)
    assert "mean_of_patients" not in no_patients.columns
    with pytest.raises(ValueError, match=r"Expected one of"):
        M.aggregate(truth, pred, metrics=("f2",))


def test_summarize_skips_nan_and_counts_inf():
    s = M.summarize([1.0, np.nan, 3.0, np.nan])
    assert (s["mean"], s["n"], s["n_skipped_nan"], s["n_inf"]) == (2.0, 2, 2, 0)
    s = M.summarize([1.0, np.inf, 2.0])
    assert s["mean"] == math.inf and s["median"] == 2.0 and s["n_inf"] == 1


def test_segmentation_report_rows_units_and_threshold():
    truth, pred, pids = aggregation_example()
    prob = np.where(pred > 0, 0.7, 0.3).astype(np.float32)
    df = M.segmentation_report(
        truth,
        prob,
        ["a", "b", "c", "d"],
        pids,
        spacing=(0.5, 2.0),
        slice_thickness=5.0,
        progress=False,
    )
    assert df["case_id"].tolist() == ["a", "b", "c", "d"]
    assert df["dice"].tolist() == pytest.approx([1.0, 1.0, 0.4, 0.0])
    assert df["tp"].tolist() == [8, 0, 1, 0]
    assert np.isnan(df.loc[1, "sensitivity"])
    # one voxel = 0.5 * 2 * 5 mm³ = 0.005 mL; slice c: pred 2 px, truth 3 px
    assert df.loc[2, "volume_difference"] == pytest.approx(-0.005)
    assert df.attrs["volume_unit"] == "mL" and df.attrs["distance_unit"] == "mm"
    assert df.loc[0, "hd95"] == 0.0 and df.loc[1, "hd95"] == 0.0
    assert df.loc[3, "hd95"] == math.inf  # truth empty, prediction not
    # slice c: truth cols 0,2,3; pred cols 0,1 (2 mm apart each) — distances from each surface
    # pixel: truth→pred 0, 2, 4 mm; pred→truth 0, 2 mm.
    assert df.loc[2, "assd"] == pytest.approx((0 + 2 + 4 + 0 + 2) / 5)
    # The threshold is applied to probabilities: at 0.8 nothing is predicted.
    high = M.segmentation_report(truth, prob, threshold=0.8, surface=False, progress=False)
    assert high["pred_pixels"].sum() == 0
    assert high["case_id"].tolist() == ["0", "1", "2", "3"]
    assert high.attrs["volume_unit"] == "pixels"


def test_per_patient_metrics_3d_by_hand():
    truth = np.zeros((3, 4, 4), dtype=np.uint8)
    pred = np.zeros((3, 4, 4), dtype=np.uint8)
    truth[0, 1, 1] = 1  # patient P, slice index 0
    pred[1, 1, 1] = 1  # patient P, slice index 1
    truth[2, 0:2, 0:2] = 1  # patient Q: perfect
    pred[2, 0:2, 0:2] = 1
    df = M.per_patient_metrics(
        truth,
        pred,
        ["P", "P", "Q"],
        spacing=(0.5, 0.5),
        slice_thickness=5.0,
        slice_indices=[0, 1, 0],
        progress=False,
    )
    p, q = df.iloc[0], df.iloc[1]
    assert (p.patient_id, q.patient_id) == ("P", "Q")
    assert p.dice == 0.0 and q.dice == 1.0
    assert p.hd95 == pytest.approx(5.0)  # one slice apart, 5 mm
    assert q.hd95 == 0.0
    assert q.truth_volume == pytest.approx(4 * 1.25 / 1000)  # 4 voxels of 0.5*0.5*5 mm³
    assert p.volume_difference == pytest.approx(0.0)
    assert (p.n_true_lesions, p.tp_lesions, p.fp_lesions) == (1, 0, 1)
    assert df.attrs["distance_unit"] == "mm"
    # Reversing the slice order of P swaps which slice comes first; distance is unchanged
    # but without spacing it is in voxels.
    vox = M.per_patient_metrics(
        truth, pred, ["P", "P", "Q"], slice_indices=[1, 0, 0], progress=False
    )
    assert vox.iloc[0].hd95 == pytest.approx(1.0)
    assert vox.attrs["distance_unit"] == "voxels"


def test_summarize_quartiles_with_infinite_distances():
    s = M.summarize([1.0, 2.0, 3.0, np.inf])
    # positions 0.75, 1.5, 2.25 in the sorted values [1, 2, 3, inf]
    assert (s["q25"], s["median"], s["q75"]) == (1.75, 2.5, math.inf)


@pytest.mark.realdata
def test_real_masks_shift_bounds_distances_and_background_dominates():
    import pandas as pd
    from PIL import Image

    from strokekit.paths import ctich_dir

    root = ctich_dir()
    if root is None:
        pytest.skip("../shared/data/ct-ich is absent: real-data check skipped")
    table = pd.read_csv(root / "slices.csv")
    files = table.loc[table["lesion_pixels"] > 0, "file"].head(6)
    truth = np.stack([np.asarray(Image.open(root / "label" / f)) > 0 for f in files])
    # Every surface pixel of a mask moved 3 columns (0.5 mm apart) is within 1.5 mm of the
    # original surface, so HD95 and the full Hausdorff distance are at most 1.5 mm.
    pred = np.zeros_like(truth)
    pred[:, :, 3:] = truth[:, :, :-3]
    df = M.segmentation_report(
        truth, pred, files, spacing=(0.5, 0.5), slice_thickness=5.0, progress=False
    )
    assert (df["hd95"] <= 1.5 + 1e-9).all()
    assert (df["hd95"] > 0).all()
    assert (df["dice"] < 1).all()
    # Lesions cover well under 1 % of the pixels: specificity is near 1 for any prediction.
    assert df["specificity"].min() > 0.99
    agg = M.aggregate(truth, pred)
    assert agg.loc["specificity", "pooled"] > 0.99
    assert agg.loc["dice", "pooled"] < agg.loc["specificity", "pooled"]


# --------------------------------------------------------------------------- Keras metrics
# The epoch-pooled metrics for model.compile (Keras is imported when they are first used).


def img(values, shape=(1, 2, 2, 1)):
    """A (B, H, W, C) float32 array from a flat list."""
    return np.asarray(values, dtype="float32").reshape(shape)


EMPTY = img([0, 0, 0, 0])

BATCH1 = (img([1, 1, 0, 0]), img([0.9, 0.4, 0.6, 0.1]))  # tp 1, fn 1, fp 1, tn 1
BATCH2 = (img([1, 0, 0, 0]), img([0.8, 0.2, 0.1, 0.3]))  # tp 1, tn 3


def result(metric):
    import keras

    return float(keras.ops.convert_to_numpy(metric.result()))


@pytest.mark.backend
@pytest.mark.parametrize(
    "metric_name, expected, batch1_alone",  # names: collecting these tests imports no Keras
    [
        ("DiceMetric", 4 / 6, 0.5),  # 2tp / (2tp + fp + fn), pooled tp=2 fp=1 fn=1
        ("IoUMetric", 2 / 4, 1 / 3),
        ("Sensitivity", 2 / 3, 0.5),
        ("Specificity", 4 / 5, 0.5),
    ],
)
def test_metrics_pool_over_batches_and_reset(metric_name, expected, batch1_alone):
    metric = getattr(M, metric_name)()
    metric.update_state(*BATCH1)
    metric.update_state(*BATCH2)
    assert result(metric) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    metric.update_state(*BATCH1)
    assert result(metric) == pytest.approx(batch1_alone, abs=1e-6)


@pytest.mark.backend
def test_metric_options():
    dice = M.DiceMetric()
    assert result(dice) == 1.0  # nothing seen, nothing to get wrong
    dice.update_state(EMPTY, EMPTY)
    assert result(dice) == 1.0
    # threshold 0.35 also counts the 0.4 pixel of batch 1: tp 2, fp 1 -> 4 / 5
    loose = M.DiceMetric(threshold=0.35)
    loose.update_state(*BATCH1)
    assert result(loose) == pytest.approx(0.8, abs=1e-6)
    # per-sample weights: the first image counts 0 times, the second once
    weighted = M.DiceMetric()
    y_true = np.concatenate([BATCH1[0], BATCH2[0]])
    y_pred = np.concatenate([BATCH1[1], BATCH2[1]])
    weighted.update_state(y_true, y_pred, sample_weight=np.array([0.0, 1.0], "float32"))
    assert result(weighted) == 1.0
    weighted.update_state(y_true, y_pred, sample_weight=np.array([1.0, 0.0], "float32"))
    assert result(weighted) == pytest.approx(4 / 6, abs=1e-6)
    with pytest.raises(ValueError, match="threshold must be in"):
        M.DiceMetric(threshold=1.5)


@pytest.mark.backend
def test_multiclass_metric_uses_argmax_and_class_id():
    # labels (1, 1, 4): background, class 1, class 2, class 2
    y_true = np.array([[[0, 1, 2, 2]]])
    y_pred = img(
        [
            0.8,
            0.1,
            0.1,  # -> 0
            0.2,
            0.5,
            0.3,  # -> 1 (correct)
            0.1,
            0.6,
            0.3,  # -> 1 (should be 2)
            0.1,
            0.2,
            0.7,
        ],  # -> 2 (correct)
        (1, 1, 4, 3),
    )
    class2 = M.DiceMetric(class_id=2)
    class2.update_state(y_true, y_pred)
    assert result(class2) == pytest.approx(2 / 3, abs=1e-6)  # tp 1, fn 1
    pooled = M.DiceMetric()  # foreground classes 1 and 2 pooled: tp 2, fp 1, fn 1
    pooled.update_state(y_true, y_pred)
    assert result(pooled) == pytest.approx(4 / 6, abs=1e-6)
    background = M.Sensitivity(class_id=0)
    background.update_state(y_true, y_pred)
    assert result(background) == 1.0


@pytest.mark.backend
def test_metric_config_round_trip():
    import keras

    metric = M.IoUMetric(threshold=0.3, class_id=1, name="iou_core")
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric), safe_mode=True
    )
    assert isinstance(restored, M.IoUMetric)
    assert (restored.threshold, restored.class_id, restored.name) == (0.3, 1, "iou_core")


@pytest.mark.backend
def test_keras_metric_names_still_load_old_configs():
    import keras

    # Saved models name these metrics "strokekit>DiceMetric", ...; runs saved when the
    # classes lived in strokekit.losses also record that module.
    metric = M.DiceMetric(threshold=0.4, class_id=1, name="dice_1")
    config = keras.saving.serialize_keras_object(metric)
    assert config["registered_name"] == "strokekit>DiceMetric"
    config["module"] = "strokekit.losses"
    restored = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert isinstance(restored, M.DiceMetric) and restored.get_config() == metric.get_config()
    for name in ("IoUMetric", "Sensitivity", "Specificity"):
        assert keras.saving.get_registered_name(getattr(M, name)) == f"strokekit>{name}"


def test_numpy_metrics_do_not_import_keras():
    import subprocess
    import sys

    code = "import sys, strokekit.metrics; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
