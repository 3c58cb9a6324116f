"""Bootstrap, paired tests, threshold choice, study numbers and figures."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import stats

from strokekit import evaluation as E


# --------------------------------------------------------------------------- bootstrap
def test_bootstrap_deterministic_for_a_seed():
    values = np.random.default_rng(1).normal(0.6, 0.2, 40)
    a = E.bootstrap_ci(values, n_boot=500, seed=3)
    b = E.bootstrap_ci(values, n_boot=500, seed=3)
    c = E.bootstrap_ci(values, n_boot=500, seed=4)
    assert tuple(a) == tuple(b)
    assert np.array_equal(a.distribution, b.distribution)
    assert tuple(a) != tuple(c)
    est, low, high = a
    assert est == pytest.approx(values.mean())
    assert low < est < high
    # A generator works as a seed as well.
    g = E.bootstrap_ci(values, n_boot=500, seed=np.random.default_rng(3))
    assert tuple(g) == tuple(a)


def test_bootstrap_skips_nan_and_counts():
    res = E.bootstrap_ci([1.0, np.nan, 3.0], n_boot=50)
    assert res.estimate == 2.0 and res.n == 2 and res.n_skipped == 1
    # Resampling two values gives means 1, 2 or 3 only.
    assert set(np.unique(res.distribution)) <= {1.0, 2.0, 3.0}
    with pytest.raises(ValueError, match="no non-NaN values"):
        E.bootstrap_ci([np.nan])
    with pytest.raises(ValueError, match="ci must lie strictly between 0 and 1"):
        E.bootstrap_ci([1.0, 2.0], ci=95)


def test_cluster_bootstrap_resamples_patients_not_rows():
    # Patient A: one slice of value 0; patient B: nine slices of value 1.
    values = [0.0] + [1.0] * 9
    groups = ["A"] + ["B"] * 9
    res = E.bootstrap_ci(values, n_boot=400, seed=0, groups=groups)
    assert res.estimate == pytest.approx(0.9)
    assert res.n_groups == 2
    # Drawing two patients gives {A, A} → 0, {A, B} → 0.9, {B, B} → 1 and nothing else.
    seen = set(np.round(res.distribution, 12))
    assert seen == {0.0, 0.9, 1.0}
    # P({A, A}) = 1/4 > 2.5 %, so the lower bound is 0.
    assert (res.low, res.high) == (0.0, 1.0)
    # A row bootstrap of the same values sees many other means (k/10).
    rows = E.bootstrap_ci(values, n_boot=400, seed=0)
    assert len(set(np.round(rows.distribution, 12)) - {0.0, 0.9, 1.0}) > 0
    with pytest.raises(ValueError, match="3 group labels for 10 values"):
        E.bootstrap_ci(values, groups=["A", "B", "C"])


# --------------------------------------------------------------------------- paired test
def test_paired_comparison_agrees_with_scipy_and_by_hand():
    b = np.array([0.50, 0.40, 0.60, 0.30, 0.20])
    d = np.array([0.01, 0.02, -0.03, 0.04, 0.05])
    a = b + d
    out = E.paired_comparison(a, b, names=("unet", "fcn"), n_boot=300)
    ref = stats.wilcoxon(a, b)
    assert out["wilcoxon_statistic"] == pytest.approx(ref.statistic)
    assert out["p_value"] == pytest.approx(ref.pvalue)
    # By hand: |d| ranks 1..5; the negative difference has rank 3 → W = min(12, 3) = 3;
    # exact two-sided p = 2 * P(W <= 3) = 2 * 5/32 (subsets {}, {1}, {2}, {3}, {1, 2}).
    assert out["wilcoxon_statistic"] == 3.0
    assert out["p_value"] == pytest.approx(10 / 32)
    assert out["rank_biserial"] == pytest.approx((12 - 3) / 15)
    assert out["mean_difference"] == pytest.approx(0.018)
    assert out["cohens_dz"] == pytest.approx(0.018 / np.std(d, ddof=1))
    assert out["ci_low"] <= out["mean_difference"] <= out["ci_high"]
    assert out["names"] == ("unet", "fcn") and out["n"] == 5


def test_paired_comparison_nan_pairs_and_errors():
    a = [0.5, np.nan, 0.7, 0.9]
    b = [0.4, 0.3, np.nan, 0.6]
    out = E.paired_comparison(a, b, n_boot=50)
    assert out["n"] == 2 and out["n_skipped"] == 2
    same = E.paired_comparison([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], n_boot=20)
    assert same["p_value"] == 1.0 and same["mean_difference"] == 0.0
    with pytest.raises(ValueError, match="expected paired values"):
        E.paired_comparison([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------- thresholds
def sweep_example():
    truth = np.array([[[1, 1, 0, 0]]], dtype=np.uint8)
    prob = np.array([[[0.72, 0.66, 0.62, 0.30]]], dtype=np.float32)
    return truth, prob


def test_threshold_sweep_and_choice_by_hand():
    truth, prob = sweep_example()
    sweep = E.threshold_sweep(truth, prob)
    assert len(sweep) == 19
    dice = dict(zip(np.round(sweep["threshold"], 4), sweep["dice"]))
    assert dice[0.6] == pytest.approx(4 / 5)  # tp 2, fp 1
    assert dice[0.65] == pytest.approx(1.0)  # exactly the lesion
    assert dice[0.7] == pytest.approx(2 / 3)  # tp 1, fn 1
    assert dice[0.25] == pytest.approx(4 / 6)  # everything: tp 2, fp 2
    assert dice[0.75] == 0.0  # nothing predicted
    assert E.choose_threshold(sweep) == pytest.approx(0.65)


def test_threshold_sweep_matches_direct_thresholding_per_patient():
    rng = np.random.default_rng(0)
    prob = rng.random((6, 8, 8)).astype(np.float32)
    truth = (rng.random((6, 8, 8)) < 0.3).astype(np.uint8)
    pids = ["a", "a", "b", "b", "c", "c"]
    thr = [0.1, 0.5, 0.9]
    sweep = E.threshold_sweep(truth, prob, thresholds=thr, patient_ids=pids)
    assert len(sweep) == 9
    for _, row in sweep.iterrows():
        idx = [i for i, p in enumerate(pids) if p == row.patient_id]
        t = truth[idx] > 0
        p = prob[idx] >= np.float32(row.threshold)
        tp = int((t & p).sum())
        expected = 2 * tp / (t.sum() + p.sum())
        assert row.tp == tp
        assert row.dice == pytest.approx(expected)


def test_choose_threshold_ties_go_to_the_one_nearest_half():
    sweep = pd.DataFrame({"threshold": [0.3, 0.4, 0.7], "patient_id": "x", "dice": [0.8, 0.8, 0.8]})
    assert E.choose_threshold(sweep) == 0.4
    with pytest.raises(ValueError, match="expected a threshold_sweep table"):
        E.choose_threshold(sweep.drop(columns="dice"))


# --------------------------------------------------------------------------- study numbers
def test_specificity_illusion_numbers():
    truth = np.zeros((1, 100, 100), dtype=np.uint8)
    truth[0, :2, :5] = 1  # 10 lesion pixels out of 10 000
    pred = np.zeros_like(truth)
    pred[0, :2, :3] = 1  # 6 true positives
    pred[0, 50, :4] = 1  # 4 false positives
    out = E.specificity_illusion(truth, pred)
    assert out["background_fraction"] == pytest.approx(9990 / 10000)
    assert out["all_background_specificity"] == 1.0
    assert out["all_background_dice"] == 0.0
    assert out["all_background_sensitivity"] == 0.0
    assert out["model_specificity"] == pytest.approx(9986 / 9990)
    assert out["model_dice"] == pytest.approx(12 / 20)
    assert out["fp_budget_at_0999"] == pytest.approx(9.99)
    assert out["fp_budget_over_lesion_pixels"] == pytest.approx(0.999)


def test_study_table_means_over_slices():
    df = pd.DataFrame(
        {
            "model": ["unet", "unet", "fcn", "fcn"],
            "iou": [1.0, 0.5, 0.2, 0.4],
            "sensitivity": [1.0, np.nan, 0.5, 0.7],
            "specificity": [0.99, 1.0, 0.98, 1.0],
        }
    )
    table = E.study_table(df)
    assert table.index.tolist() == ["unet", "fcn"]
    assert table.columns.tolist() == ["IoU", "Sensitivity", "Specificity", "n_slices"]
    assert table.loc["unet", "IoU"] == pytest.approx(0.75)
    assert table.loc["unet", "Sensitivity"] == pytest.approx(1.0)  # NaN skipped
    assert table.loc["fcn", "Sensitivity"] == pytest.approx(0.6)
    assert table.loc["unet", "n_slices"] == 2
    with pytest.raises(ValueError, match=r"columns \['model'\] not in the table"):
        E.study_table(df.drop(columns="model"))


# --------------------------------------------------------------------------- figures
def test_plot_metric_boxes_one_axes_per_figure():
    df = pd.DataFrame(
        {"model": ["a"] * 5 + ["b"] * 5, "dice": np.r_[np.linspace(0, 1, 5), [0.2] * 4, np.nan]}
    )
    fig = E.plot_metric_boxes(df)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["a\n(n=5)", "b\n(n=4, 1 skipped)"]
    with pytest.raises(ValueError, match="column 'hd95' not in the table"):
        E.plot_metric_boxes(df, metric="hd95")


def test_threshold_sweep_plot():
    truth, prob = sweep_example()
    sweep = E.threshold_sweep(np.repeat(truth, 2, 0), np.repeat(prob, 2, 0), patient_ids=["p", "q"])
    fig = E.plot_threshold_sweep(sweep, chosen=E.choose_threshold(sweep))
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert any("chosen 0.65" in t.get_text() for t in fig.axes[0].get_legend().get_texts())


def test_error_overlay_colours_and_plot():
    image = np.full((4, 4), 0.5, dtype=np.float32)
    truth = np.zeros((4, 4), dtype=np.uint8)
    pred = np.zeros((4, 4), dtype=np.uint8)
    truth[0, 0] = pred[0, 0] = 1  # TP
    pred[1, 1] = 1  # FP
    truth[2, 2] = 1  # FN
    rgb = E.error_overlay(image, truth, pred, alpha=1.0)
    assert tuple(rgb[0, 0]) == E.ERROR_COLOURS["true positive"]
    assert tuple(rgb[1, 1]) == E.ERROR_COLOURS["false positive"]
    assert tuple(rgb[2, 2]) == E.ERROR_COLOURS["false negative"]
    assert tuple(rgb[3, 3]) == (128, 128, 128)

    images = np.repeat(image[None], 4, 0)
    truths = np.repeat(truth[None], 4, 0)
    preds = np.stack([truth, pred, np.zeros_like(pred), np.zeros_like(pred)])
    truths[3] = 0  # slice 3: empty and correctly empty, never ranked
    fig = E.plot_error_overlays(images, truths, preds, case_ids=["s0", "s1", "s2", "s3"])
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    titles = [ax.get_title() for ax in fig.axes]
    # Dice per slice: s0 = 1, s1 = 2/4, s2 = 0 → best s0, median s1, worst s2.
    assert titles[0].startswith("best: case s0") and titles[2].startswith("worst: case s2")
    assert "median: case s1" in titles[1]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(E.ERROR_COLOURS)
    fig2 = E.plot_error_overlays(
        images, truths, preds, case_ids=["s0", "s1", "s2", "s3"], which=("s3",)
    )
    assert len(fig2.axes) == 1
    with pytest.raises(ValueError, match="Expected 'best', 'median', 'worst' or a case id"):
        E.plot_error_overlays(images, truths, preds, which=("nope",))


def test_find_runs_keeps_checked_and_unchecked_runs_newest_first_and_says_what_it_left_out(tmp_path):
    import dataclasses
    import os

    from strokekit import train
    from strokekit.augment import NO_AUGMENT
    from strokekit.runs import RunFolder
    from strokekit.split import Split

    base = train.TrainConfig(image_size=16, filters=(4, 8), num_epochs=1, batch_size=4, augment=NO_AUGMENT)
    ours = Split(["a", "b", "c", "d"], ["train", "val", "test", "test"])
    theirs = Split(["a", "b", "c", "d"], ["train", "test", "val", "test"])

    def run(name, seed=0, split=None, dice=0.5, mtime=1000.0, metrics=True):
        folder = tmp_path / "grid" / name
        made = RunFolder.create(folder, "binary", dataclasses.replace(base, seed=seed), split=split)
        made.model_path.write_bytes(b"PK")  # listed when it exists
        os.utime(made.model_path, (mtime, mtime))
        if metrics:
            made.write_metrics({"dice": dice}, data="validation")
        return folder

    run("unet-s0-20260101-120000", split=ours, dice=0.2, mtime=1000.0)  # older: replaced by the next
    newest = run("unet-s0-20260102-120000", split=ours, dice=0.4, mtime=2000.0)
    run("unet-s1", seed=1, split=ours, dice=0.6)
    run("resunet-s0", split=None, dice=0.0)  # no split.json: kept, flagged
    run("elu-s0", split=theirs)  # trained on other test cases
    run("selu-s0", metrics=False)  # unfinished
    said = []
    table = E.find_runs(tmp_path, ["d", "c"], source="04", prefix="04:", log=said.append)
    assert list(table.columns) == list(E.RUN_COLUMNS)
    assert table[["model", "seed", "split_checked", "saved_val_dice"]].values.tolist() == [
        ["04:grid/resunet", 0, False, 0.0], ["04:grid/unet", 0, True, 0.4], ["04:grid/unet", 1, True, 0.6]]
    assert table.loc[1, "folder"] == newest and table.loc[1, "config"].seed == 0 and set(table["source"]) == {"04"}
    assert sorted(said) == ["skipped elu-s0: trained on another split",
                            "skipped selu-s0: unfinished (no metrics.json) or not a binary model"]
    assert E.find_runs(tmp_path / "missing", ["c", "d"]).empty
    assert len(E.find_runs(tmp_path, ["c", "d"])) == 3  # silent without log


def test_find_runs_skips_a_run_with_a_damaged_metrics_or_split_file_with_a_warning(tmp_path):
    from strokekit import train
    from strokekit.augment import NO_AUGMENT
    from strokekit.runs import RunFolder
    from strokekit.split import Split

    config = train.TrainConfig(image_size=16, filters=(4, 8), num_epochs=1, batch_size=4, augment=NO_AUGMENT)
    split = Split(["a", "b", "c", "d"], ["train", "val", "test", "test"])
    for name in ("good-s0", "metrics-s0", "split-s0", "config-s0"):
        run = RunFolder.create(tmp_path / name, "binary", config, split=split)
        run.model_path.write_bytes(b"PK")
        run.write_metrics({"dice": 0.5}, data="validation")
    (tmp_path / "metrics-s0" / "metrics.json").write_text('{"dice": 0.')  # cut off while written by hand
    (tmp_path / "split-s0" / "split.json").write_text("[]")
    (tmp_path / "config-s0" / "config.json").write_text("{ not json")
    with pytest.warns(UserWarning) as caught:
        table = E.find_runs(tmp_path, ["c", "d"])
    assert table["model"].tolist() == ["good"]
    said = sorted(str(w.message) for w in caught)
    assert len(said) == 3
    assert said[0].startswith(f"skipped the run in {tmp_path / 'config-s0'}: config.json cannot be read")
    assert said[1].startswith(f"skipped the run in {tmp_path / 'metrics-s0'}: metrics.json cannot be read")
    assert said[2].startswith(f"skipped the run in {tmp_path / 'split-s0'}: not a strokekit split file")


def test_compare_patients_counts_wins_and_brackets_the_mean_difference():
    method = {"a": 0.5, "b": 0.2, "c": 0.4, "d": 0.3}
    baseline = {"a": 0.3, "b": 0.2, "c": 0.5, "d": 0.1, "e": 0.9}   # "e" is not in method: ignored
    c = E.compare_patients(method, baseline)
    assert (c["n"], c["wins"], c["ties"], c["losses"]) == (4, 2, 1, 1)
    assert c["mean_difference"] == pytest.approx((0.2 + 0.0 - 0.1 + 0.2) / 4)
    assert c["ci_low"] <= c["mean_difference"] <= c["ci_high"]
    assert -0.1 <= c["ci_low"] and c["ci_high"] <= 0.2          # bootstrap means lie within the differences
    assert E.compare_patients(method, baseline) == c            # seeded
    same = E.compare_patients(method, method)
    assert same["ties"] == 4 and same["ci_low"] == same["ci_high"] == 0.0
    with pytest.raises(ValueError, match="no patient"):
        E.compare_patients({"x": 1.0}, {"y": 1.0})


def test_per_patient_dice_pools_each_patients_pixels():
    counts = np.array([[2, 1, 1, 10], [0, 0, 2, 10], [3, 0, 0, 10]])   # tp, fp, fn, tn per slice
    patients, dice = E.per_patient_dice(counts, ["b", "b", 1])
    assert patients.tolist() == ["1", "b"]                              # sorted, compared as strings
    np.testing.assert_allclose(dice, [1.0, 4 / 8])


def test_patient_dice_table_pools_pixels_per_seed_then_averages_seeds():
    rows = [  # model, seed, patient, tp, fp, fn, tn (one row per slice)
        ("net", 0, "P1", 2, 1, 1, 10), ("net", 0, "P1", 0, 0, 2, 10), ("net", 1, "P1", 4, 0, 0, 10),
        ("net", 0, "P2", 0, 3, 1, 10), ("net", 1, "P2", 1, 0, 1, 10),
        ("base", 0, "P2", 1, 0, 0, 10), ("base", 0, "P1", 0, 0, 4, 10),
    ]
    slices = pd.DataFrame(rows, columns=["model", "seed", "patient_id", "tp", "fp", "fn", "tn"])
    table = E.patient_dice_table(slices)
    assert list(table.columns) == ["net", "base"] and list(table.index) == ["P1", "P2"]
    # net P1: seed 0 pools 2 slices (tp 2, fp 1, fn 3) -> 4/8; seed 1 -> 1; mean over seeds
    assert table.loc["P1", "net"] == pytest.approx((4 / 8 + 1.0) / 2)
    assert table.loc["P2", "net"] == pytest.approx((0.0 + 2 / 3) / 2)
    assert table["base"].tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="seed"):
        E.patient_dice_table(slices.drop(columns="seed"))


def test_versus_baseline_judges_all_patients_and_each_group():
    table = pd.DataFrame({"net": [0.8, 0.6, 0.0, 0.1], "base": [0.5, 0.5, 0.2, 0.1]},
                         index=["P1", "P2", "P3", "P4"])
    kinds = {"P1": "hemorrhagic", "P2": "hemorrhagic", "P3": "ischemic", "P9": "ischemic"}  # P4: none, P9: absent
    out = E.versus_baseline(table, ["net"], "base", groups=kinds)
    assert out["patients"].tolist() == ["all", "hemorrhagic", "ischemic"]
    assert out["n_patients"].tolist() == [4, 2, 1]
    assert out["dice"].tolist() == pytest.approx([1.5 / 4, 0.7, 0.0])
    assert out["baseline_dice"].tolist() == pytest.approx([1.3 / 4, 0.5, 0.2])
    assert out["beats"].tolist() == [True, True, False]      # better overall, worse on the infarct
    tie = E.versus_baseline(table.loc[["P4"]], ["net"], "base")
    assert tie["patients"].tolist() == ["all"] and not tie["beats"].iloc[0]   # a tie does not beat
    with pytest.raises(ValueError, match="'resnet' is not a column"):
        E.versus_baseline(table, ["resnet"], "base")


def test_whole_scan_summary_compares_the_thresholded_and_the_filtered_masks():
    import pandas as pd

    from strokekit.evaluation import whole_scan_summary

    scans = pd.DataFrame({
        "patient_id": ["71", "72", "54"], "true_ml": [132.0, 5.0, 0.0],
        "unfiltered_dice_3d": [0.7, 0.1, float("nan")], "unfiltered_predicted_ml": [200.0, 30.0, 60.0],
        "dice_3d": [0.8, 0.4, float("nan")], "predicted_ml": [170.0, 6.0, 2.0]})
    table = whole_scan_summary(scans, patient="71")
    flagged = whole_scan_summary(scans.assign(true_ml=[132.0, 0.0, 0.0], has_lesion=[True, True, False]), "71")
    assert flagged.equals(table)  # slices.csv's flags decide, not a volume that vanished at a small size
    assert list(table.index) == ["thresholded", "brighter than brain"]
    assert table.loc["thresholded", "mean_dice_3d"] == pytest.approx(0.4)
    assert table.loc["brighter than brain", "mean_dice_3d"] == pytest.approx(0.6)  # the lesion-free NaN left out
    assert table["lesion_free_ml"].tolist() == [60.0, 2.0]
    assert table.loc["brighter than brain", "patient_ml"] == 170.0 and table["patient_true_ml"].eq(132.0).all()
