# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Evaluation a reviewer would trust
# The same predictions score very differently depending on how you count: count per patient, say
# how, and choose on validation only.
#
# **Learning goals**
# - Compute Dice, IoU, sensitivity, specificity, HD95/ASSD in mm, volume error in mL and lesion-wise
#   F1 with explicit rules for empty masks, and summarise them per patient with bootstrap intervals.
# - Compare two models on the same test cases (paired test, effect size, interval) after choosing
#   the models and the threshold on validation data.
# - Recognise numbers that cannot be compared: specificity ≈ 0.999, a Dice that includes
#   background, a Dice with the wrong formula.
#
# **Runtime**: about 1–2 minutes on a laptop CPU (quick profile) when notebook 04 has saved its
# runs; about 3–4 minutes when run alone (it then trains 2 small configurations × 2 seeds itself).
# The full profile only evaluates (256 px): a few minutes on a GPU.
#
# *Quick profile:* the models of notebook 04 are slim U-Nets trained for a few minutes. Most of them
# learn the lesions; a configuration that did not (step 2 prints each run's validation Dice, and a 0
# there means it found no lesion pixel) is still worth evaluating: watch what the study's table makes
# of such a model. A HU-threshold baseline (step 3) gives every section a number to beat. With the
# full profile, the study's U-Nets take over.

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import logging
import time

import ipywidgets as widgets
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from scipy import ndimage
from scipy.special import expit

from strokekit import evaluation, metrics, paths, report, train
from strokekit import split as splitting
from strokekit.augment import STUDY_AUGMENT
from strokekit.config import get_profile, phantom_config
from strokekit.dataset import concat
from strokekit.phantom import generate_phantom, make_volume, volume_to_dataset
from strokekit.preprocess import brain_mask, window_hu
from strokekit.recon3d import predict_volume

# %%
# Many small models are loaded one after the other: TensorFlow's retracing notes are noise here.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
print(f"keras {keras.__version__} · backend {keras.backend.backend()} · pandas {pd.__version__}")

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = phantom_config(PROFILE)  # the course's standard phantom (same in every notebook)
SPLIT_FILE = paths.data_dir() / "splits" / "phantom_split.json"
RUN_SOURCES = {  # where earlier notebooks saved their runs
    "04": paths.runs_dir() / "04_unet_vs_resunet" / "grid",
    "05": paths.runs_dir() / "05_transfer_learning",
}
OUT = paths.runs_dir() / "06_evaluation"
# Used only when no earlier run is found (this notebook run on its own): a small grid trained here.
FALLBACK_BASE = train.TrainConfig(arch="unet", filters=PROFILE.filters, activation="leaky_relu", loss="bce",
                                  batch_size=PROFILE.batch_size, num_epochs=PROFILE.num_epochs,
                                  image_size=PROFILE.image_size, augment=STUDY_AUGMENT)
FALLBACK_VARIANTS = [{"arch": "unet", "activation": "leaky_relu"}, {"arch": "resunet", "activation": "leaky_relu"}]
SEEDS = tuple(range(PROFILE.num_seeds))
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floors (measured in the quick profile)
BASELINE_CUTOFFS = np.arange(40.0, 85.0, 5.0)  # HU cut-offs the baseline may choose (on train)
BASELINE_MARGINS_MM = (0.0, 2.0, 4.0, 6.0)  # margins it may trim off the brain edge (on train)
BASELINE_SOFTNESS = 4.0  # HU over which its "probability" rises around the cut-off
THRESHOLD = 0.5  # the usual cut-off, until step 11 chooses one on validation
THRESHOLDS = np.round(np.linspace(0.05, 0.95, 19), 2)
N_BOOT = 2000  # bootstrap replicates
CI = 0.95
SEED = 0  # seed of every bootstrap and jitter
print(PROFILE.name, "·", PHANTOM.image_size, "px phantom ·", len(SEEDS), "seeds")

# %% [markdown]
# ## 1. The test set, and what it is
# We read the split saved by notebook 02 (or make the same one): models were trained on `train`,
# chosen on `val`, and `test` has not been looked at. Every model below is evaluated on exactly
# these slices, so their numbers can be paired case by case. Predictions are made at the model's
# input size and resized back, so every metric is computed on the phantom's own pixels (whatever
# resolution a model was trained at) and distances come out in millimetres. Look at the lesion
# types too: with a handful of test patients, a test set can hold only one kind of lesion by
# chance, and then its score says nothing about the other kind.

# %%
data = generate_phantom(PHANTOM, progress=False)
split = splitting.load_or_make_split(data, SPLIT_FILE, seed=0)
splitting.check_leakage(split)
val_data, test_data = split.dataset(data, "val"), split.dataset(data, "test")
TEST_CASES = sorted(test_data.case_ids)
n_empty_test = int((~test_data.has_lesion()).sum())
n_test_patients = len(test_data.patients())
print(f"val: {len(val_data)} slices of {len(val_data.patients())} patients · test: "
      f"{len(test_data)} slices of {n_test_patients} patients ({n_empty_test} without lesion) · "
      f"pixel {test_data.spacing[0]} mm · slices {test_data.slice_thickness} mm apart")
for name, subset in (("val", val_data), ("test", test_data)):
    kinds = pd.Series(subset.extra["lesion_type"], index=subset.patient_ids)
    print(f"{name} patients: {kinds[kinds != 'none'].groupby(level=0).first().to_dict()}")
assert set(test_data.patients()).isdisjoint(split.dataset(data, "train").patients())
assert set(test_data.patients()).isdisjoint(val_data.patients())

# %% [markdown]
# ## 2. Which models: the runs of notebooks 04 and 05 — or, alone, a few trained here
# This is the one cell that decides what gets evaluated, with four rules (`evaluation.find_runs`
# applies the first three, and prints why it left a folder out):
# 1. a run is a finished binary run folder (`model.keras`, `config.json` and `metrics.json`; found
#    by `strokekit.runs.list_runs`) under `runs/04_unet_vs_resunet/grid` or `runs/05_transfer_learning`;
# 2. when it saved a `split.json`, its test slices must be ours — otherwise its training set may
#    contain our test slices and its score would be flattered. Notebook 05's fine-tuning runs were
#    trained on its own split of other patients, so they are left out (the cell prints each one as
#    "trained on another split"); a run without `split.json` (notebook 05's pretraining run) is kept,
#    but flagged `split_checked=False`;
# 3. if the same configuration and seed were trained twice (notebook 04 run twice), the newest
#    folder counts — never the better one;
# 4. if nothing is found (this notebook run on its own), it trains a small grid itself into
#    `runs/06_evaluation/runs` (2 configurations × the profile's seeds), or reuses that grid when
#    an earlier run of this notebook left it there. This is the only training in the notebook.

# %%
start = time.perf_counter()
runs = pd.concat([evaluation.find_runs(root, TEST_CASES, source=src, prefix="05:" if src == "05" else "", log=print)
                  for src, root in RUN_SOURCES.items()], ignore_index=True)
if runs.empty:
    runs = evaluation.find_runs(OUT / "runs", TEST_CASES, source="06", log=print)
if runs.empty:
    print(f"No runs from notebooks 04/05: training {len(FALLBACK_VARIANTS)} configurations × "
          f"{len(SEEDS)} seeds here (quick profile: a few minutes) …")
    train.train_grid(FALLBACK_BASE, FALLBACK_VARIANTS, SEEDS, split.dataset(data, "train"),
                     val_data, root=OUT / "runs", split=split, progress=False)
    runs = evaluation.find_runs(OUT / "runs", TEST_CASES, source="06", log=print)
print(f"{len(runs)} runs of {runs['model'].nunique()} configurations from notebook(s) "
      f"{sorted(runs['source'].unique())} ({time.perf_counter() - start:.0f} s)")

# %% [markdown]
# One row per configuration and seed. `saved_val_dice` is what each run measured on validation when
# it was trained; a 0 there means the run did not find a single lesion pixel of the validation slices.

# %%
display(runs[["model", "seed", "source", "split_checked", "saved_val_dice"]])
found_nothing = int((runs["saved_val_dice"] == 0).sum())
print(f"{found_nothing} of {len(runs)} runs found no lesion pixel on validation "
      "(Dice 0 in their own metrics.json)")
assert len(runs) >= 1 and not runs.duplicated(["model", "seed"]).any()
assert runs["saved_val_dice"].dropna().between(0, 1).all()

# %% [markdown]
# ## 3. A baseline every model must beat
# Fresh blood is brighter than brain (about 50–90 HU against 20–45 HU). The simplest "model" marks
# brain pixels above a HU cut-off, after a light smoothing against noise, and trims a margin off
# the brain's edge, where the blurred inner table of the skull is as bright as blood. Its two
# parameters (cut-off and margin) are fitted on the **training** slices. It cannot see an infarct
# (darker than brain, not brighter). A deep model that does not beat it has learned nothing worth
# its parameters — report the baseline next to it. Its "probability" rises smoothly around the
# cut-off, so it can be thresholded and swept like a network's output.

# %%
def hu_evidence(dataset, margin_mm):
    smooth = ndimage.gaussian_filter(dataset.images, sigma=(0, 1, 1))  # in-plane only
    brain = np.stack([brain_mask(image, dataset.unit) for image in dataset.images])
    steps = round(margin_mm / dataset.spacing[0])
    if steps:  # (iterations=0 would erode until nothing changes)
        brain = ndimage.binary_erosion(brain, np.ones((1, 3, 3), bool), iterations=steps)
    return smooth, brain


def baseline_probability(dataset):
    smooth, brain = hu_evidence(dataset, MARGIN)
    return (brain * expit((smooth - CUTOFF) / BASELINE_SOFTNESS)).astype(np.float32)

# %% [markdown]
# Fit the two parameters on the training slices: the Dice of every cut-off and margin, and the best
# pair. The baseline then joins the runs as one more "model".

# %%
train_data = split.dataset(data, "train")
fit = {}
for margin in BASELINE_MARGINS_MM:
    smooth, brain = hu_evidence(train_data, margin)
    fit[margin] = {c: metrics.dice(train_data.masks, brain & (smooth >= c))
                   for c in BASELINE_CUTOFFS}
fit = pd.DataFrame(fit).rename_axis(index="cut-off (HU)", columns="margin (mm)")
CUTOFF, MARGIN = fit.stack().idxmax()
baseline_row = [f"baseline HU≥{CUTOFF:.0f}", 0, "baseline", True, None, None, np.nan, np.nan]
runs = pd.concat([runs, pd.DataFrame([baseline_row], columns=list(evaluation.RUN_COLUMNS))], ignore_index=True)

# %%
display(fit.round(3))
kinds = pd.Series(train_data.extra["lesion_type"], index=train_data.patient_ids)
infarcts = (kinds[kinds != "none"].groupby(level=0).first() == "ischemic").sum()
print(f"fitted on the training slices: HU ≥ {CUTOFF:.0f}, {MARGIN:g} mm trimmed off the brain "
      f"edge (training Dice {fit.loc[CUTOFF, MARGIN]:.3f}; {infarcts} of "
      f"{len(train_data.patients())} training patients have an infarct, which it cannot see)")
assert fit.loc[CUTOFF, MARGIN] == fit.max().max() and np.all((fit >= 0) & (fit <= 1))

# %% [markdown]
# One function gives the probabilities of any run, a saved network or the baseline, on any slices;
# every later step predicts through it.

# %%
def predict(i, *datasets):
    """Probabilities of run ``i`` on each dataset, at the dataset's own pixel size."""
    if runs.loc[i, "source"] == "baseline":
        return [baseline_probability(ds) for ds in datasets]
    model = train.load_model(runs.loc[i, "folder"])
    joint = concat(list(datasets))  # one call, few batch shapes: each new shape is traced again
    prob = predict_volume(model, joint, runs.loc[i, "config"], batch_size=32, progress=False)
    keras.backend.clear_session()
    return np.split(prob, np.cumsum([len(ds) for ds in datasets])[:-1])

# %% [markdown]
# ## 4. Predict once, measure everything
# Each model predicts probabilities for the validation and test slices once. From the test
# probabilities, `metrics.segmentation_report` writes one row per slice with the confusion counts
# and every metric, under one documented rule for empty masks (see the top of
# `strokekit/metrics.py`): Dice/IoU are 1 when truth and prediction are both empty, sensitivity is
# NaN on a lesion-free slice (nothing to find), HD95 is infinite when one mask is empty.

# %%
start = time.perf_counter()
prob_val, prob_test, rows = {}, {}, []
for i, run in runs.iterrows():
    prob_val[i], prob_test[i] = predict(i, val_data, test_data)
    per_slice = metrics.segmentation_report(
        test_data.masks, prob_test[i], case_ids=test_data.case_ids,
        patient_ids=test_data.patient_ids, spacing=test_data.spacing,
        slice_thickness=test_data.slice_thickness, threshold=THRESHOLD, progress=False)
    rows.append(per_slice.assign(model=run["model"], seed=run["seed"], run=i))
    runs.loc[i, "val_dice"] = metrics.dice(val_data.masks, prob_val[i] >= THRESHOLD)

# %% [markdown]
# The result: one row per model run and test slice, with every metric and the confusion counts behind it.

# %%
slices = pd.concat(rows, ignore_index=True)
print(f"{len(runs)} models × {len(test_data)} test slices predicted and measured "
      f"in {time.perf_counter() - start:.0f} s")
display(slices.head(3))
overlap = slices[["dice", "iou", "specificity"]]
assert len(slices) == len(runs) * len(test_data) and np.all((overlap >= 0) & (overlap <= 1))
assert slices.loc[slices["truth_pixels"] == 0, "sensitivity"].isna().all()  # nothing to find

# %% [markdown]
# ## 5. Choose on validation: the two best configurations and one run
# Which models to compare — and, in step 11, which threshold — is decided on the validation
# patients only. Choosing on test and then reporting test is the commonest leak in the field: the
# "best of N" on test is an optimistic number even when no single model is better.
# A configuration's score is the mean over its seeds of the validation Dice (all validation pixels
# pooled, at threshold 0.5); for pictures and thresholds we use its best-on-validation seed.
# The two compared are **networks whose split was checked** (their test slices are ours): the
# threshold baseline stays in every table as the bar to clear, and runs without a `split.json`
# (notebook 05's source-task network) are shown but not chosen.

# %%
by_config = (runs.groupby("model")["val_dice"].agg(["mean", "std", "count"])
             .sort_values("mean", ascending=False))
display(by_config.round(3))
networks = runs[(runs["source"] != "baseline") & runs["split_checked"]]
candidates = by_config.loc[by_config.index.isin(networks["model"])]
BEST, RUNNER_UP = candidates.index[:2]
best_run = int(runs[runs["model"] == BEST]["val_dice"].idxmax())
print(f"chosen on validation: {BEST} (val Dice {by_config.loc[BEST, 'mean']:.3f}) vs "
      f"{RUNNER_UP} ({by_config.loc[RUNNER_UP, 'mean']:.3f}); pictures use run {best_run} "
      f"(seed {runs.loc[best_run, 'seed']})")

# %% [markdown]
# The floor below is a test of the run: in the quick profile both compared networks must have learned.

# %%
assert by_config.loc[BEST, "mean"] >= by_config.loc[RUNNER_UP, "mean"] and BEST != RUNNER_UP
assert runs["val_dice"].between(0, 1).all()
# Both compared networks learned (quick profile floor: validation Dice >= 0.4, mean over seeds).
assert not CHECK_LEARNING or candidates.loc[[BEST, RUNNER_UP], "mean"].min() >= 0.4
report.record(best_network=BEST, best_network_val_dice=candidates.loc[BEST, "mean"],
              runner_up=RUNNER_UP, runner_up_val_dice=candidates.loc[RUNNER_UP, "mean"],
              networks_found_nothing=int((networks["saved_val_dice"] == 0).sum()))

# %% [markdown]
# ## 6. The study's table — and what it leaves out
# The study reports, per model, IoU, sensitivity and specificity as **means over test slices**,
# one number each. Next to it: the same models summarised **per patient** (each patient's pixels
# pooled, then averaged over patients) with 95 % bootstrap intervals that resample *patients*, not
# slices — slices of one head are not independent. With only a few test patients the intervals are
# wide, and that width is the honest answer to "how sure are we?".

# %%
study = evaluation.study_table(slices, by="model")
dice_by_patient = evaluation.patient_dice_table(slices)  # each patient's pixels pooled, then mean over seeds
view = {}
for model_name, g in slices.groupby("model", sort=False):
    dice_ci = evaluation.bootstrap_ci(dice_by_patient[model_name], n_boot=N_BOOT, ci=CI, seed=SEED)
    iou_ci = evaluation.bootstrap_ci(g["iou"], groups=g["patient_id"], n_boot=N_BOOT, ci=CI,
                                     seed=SEED)
    view[model_name] = {"Dice, mean of patients [95% CI]": dice_ci,
                        "IoU, mean of slices [95% CI, patients resampled]": iou_ci,
                        "patients": dice_ci.n}
    assert 0 <= dice_ci.low <= dice_ci.high <= 1 and 0 <= iou_ci.low <= iou_ci.high <= 1
view = pd.DataFrame(view).T

# %% [markdown]
# The study's columns next to the patient-level intervals, each written as "estimate [low, high]".

# %%
as_text = {c: view[c].map(lambda x: f"{x.estimate:.3f} [{x.low:.3f}, {x.high:.3f}]")
           for c in view.columns[:2]}
display(study.round(4).join(view.assign(**as_text)))
widest = max(x.high - x.low for x in view.iloc[:, 0])
print(f"The widest patient-level interval is {widest:.2f} Dice wide, from {n_test_patients} test "
      "patients — an uncertainty the study's 4-decimal table does not show.")
means = study[["IoU", "Sensitivity", "Specificity"]]
assert np.all((means >= 0) & (means <= 1)) and (view["patients"] == n_test_patients).all()
assert (study["n_slices"] == len(test_data) * runs.groupby("model").size()[study.index]).all()

# %% [markdown]
# Does each chosen network clear the bar the threshold baseline sets? On test, per patient, on all patients and
# per lesion type. The networks were chosen on the validation patients alone: when those hold only hemorrhages
# (step 1 prints their lesion types), the choice could not see how a network does on infarcts, and a network
# that ranks first on validation can still miss every infarct on test. The baseline cannot see infarcts either
# (step 3), so on infarcts its bar is low; the lines below say which network clears which bar in this run.

# %%
test_types = pd.Series(test_data.extra["lesion_type"], index=test_data.patient_ids)
test_types = test_types[test_types != "none"].groupby(level=0).first()
baseline_name = runs.loc[runs["source"] == "baseline", "model"].item()
versus = evaluation.versus_baseline(dice_by_patient, [BEST, RUNNER_UP], baseline_name, groups=test_types)
for r in versus.itertuples():
    print(f"{r.model} on {r.patients} test patients ({r.n_patients}): Dice {r.dice:.3f} vs {baseline_name} "
          f"{r.baseline_dice:.3f}: {'beats' if r.beats else 'does NOT beat'} the baseline")
val_beaten = [m for m in (BEST, RUNNER_UP) if by_config.loc[m, "mean"] > by_config.loc[baseline_name, "mean"]]
print(f"On validation (lesion types: {', '.join(sorted(set(val_data.extra['lesion_type']) - {'none'}))}) the "
      f"baseline is beaten by: {', '.join(val_beaten) or 'neither chosen network'} (step 5's table).")
assert np.isclose(versus.iloc[0]["dice"], view.loc[BEST, "Dice, mean of patients [95% CI]"].estimate)
assert versus["n_patients"].iloc[0] == n_test_patients and versus["dice"].between(0, 1).all()

# %% [markdown]
# A model that finds nothing at all is the acid test of a results table:

# %%
predicted = slices.groupby("model")["pred_pixels"].sum()
for name in predicted.index[predicted == 0]:
    print(f"{name} predicts no lesion pixel on any test slice, yet the study's table gives it "
          f"specificity {study.loc[name, 'Specificity']:.4f} and IoU {study.loc[name, 'IoU']:.4f}"
          f" — the IoU is the {n_empty_test} lesion-free slices out of {len(test_data)}, each "
          "scoring 1 for agreeing on nothing.")
    assert study.loc[name, "Specificity"] == 1.0 and study.loc[name, "Sensitivity"] == 0.0
    assert np.isclose(study.loc[name, "IoU"], n_empty_test / len(test_data))
silent = predicted.index[predicted == 0]
outranked = [m for m in predicted.index[predicted > 0]
             if len(silent) and study.loc[m, "IoU"] < study.loc[silent, "IoU"].max()]
print(f"{len(silent)} of {len(predicted)} models predict no lesion on the test slices; by the "
      f"study's IoU, a model that finds nothing outranks {len(outranked)} that do: {outranked}")
assert (predicted > 0).sum() >= 1  # the baseline marks something

# %% [markdown]
# ## 7. Pooled, mean of slices, mean of patients: three numbers from one set of predictions
# `metrics.aggregate` summarises the *same* thresholded predictions (the chosen run) four ways:
# all pixels pooled (large lesions dominate), mean over slices (every lesion-free slice with an
# empty prediction adds a free 1.0 to Dice), mean over lesion slices only, and mean over patients.
# A paper must say which one it reports; numbers from different rows cannot be compared.

# %%
levels = metrics.aggregate(test_data.masks, prob_test[best_run],
                           patient_ids=test_data.patient_ids, threshold=THRESHOLD)
display(levels.round(3))
d = levels.loc["dice", ["pooled", "mean_of_slices", "mean_of_lesion_slices", "mean_of_patients"]]
n_lesion_slices = len(test_data) - n_empty_test
empty_right = d["mean_of_slices"] * len(test_data) - d["mean_of_lesion_slices"] * n_lesion_slices
print(f"On the same predictions, Dice is {d['pooled']:.3f} pooled, {d['mean_of_slices']:.3f} as "
      f"a mean over slices, {d['mean_of_lesion_slices']:.3f} over lesion slices only and "
      f"{d['mean_of_patients']:.3f} over patients: {100 * (d.max() - d.min()):.1f} points apart. "
      f"{round(empty_right)} of the {n_empty_test} lesion-free slices were predicted empty: each "
      "adds a free 1.0 to the mean over slices, the others a 0.")
assert d.between(0, 1).all() and levels.loc["dice", "mean_of_slices_n"] == len(test_data)
assert levels.loc["sensitivity", "mean_of_slices_skipped"] == n_empty_test  # NaN on empty truth
assert np.isclose(empty_right, round(empty_right)) and 0 <= round(empty_right) <= n_empty_test

# %% [markdown]
# ## 8. Per patient in 3-D: surface distance in mm, volume in mL, lesions found
# Overlap says nothing about *where* the errors are. HD95 (95th percentile of the distances
# between the two lesion surfaces) and ASSD (their mean) do, in millimetres, and the volume error
# in mL is what a clinician reads. Both need the **whole head**: the test set holds a few sampled
# slices per patient, so we rebuild each test patient's full volume (every slice, 5 mm apart —
# with real data you would load the full series) and let the two chosen models predict all of it.
# Distances use the anisotropic voxel (slice thickness × pixel spacing). Lesion-wise detection
# counts 3-D connected components: a true lesion is found if the prediction touches it; a
# predicted component touching no lesion is a false-positive lesion.

# %%
# Phantom patient "P07" is make_volume(6): the same head generate_phantom sampled its slices from.
volumes = concat([volume_to_dataset(make_volume(int(p[1:]) - 1, PHANTOM))
                  for p in test_data.patients()])
assert np.array_equal(volumes.select_cases(test_data.case_ids).images, test_data.images)
chosen = {BEST: best_run, RUNNER_UP: int(runs[runs["model"] == RUNNER_UP]["val_dice"].idxmax())}
patients3d = []
for model_name, i in chosen.items():
    (prob,) = predict(i, volumes)
    table = metrics.per_patient_metrics(
        volumes.masks, prob, volumes.patient_ids, spacing=volumes.spacing,
        slice_thickness=volumes.slice_thickness, slice_indices=volumes.slice_indices,
        threshold=THRESHOLD, progress=False)
    patients3d.append(table.assign(model=model_name, seed=runs.loc[i, "seed"], run=i))
patients3d = pd.concat(patients3d, ignore_index=True)

# %% [markdown]
# One row per model and test patient. The checks: units are mm and mL, every test patient has a lesion,
# and the volume difference is the predicted minus the true volume.

# %%
display(patients3d[["model", "patient_id", "n_slices", "dice", "hd95", "assd", "truth_volume",
                    "pred_volume", "volume_difference", "n_true_lesions", "n_pred_lesions",
                    "lesion_f1"]].round(2))
print(f"distances in {table.attrs['distance_unit']}, volumes in {table.attrs['volume_unit']}; "
      f"voxel {volumes.slice_thickness} × {volumes.spacing[0]} × {volumes.spacing[1]} mm")
assert table.attrs["distance_unit"] == "mm" and table.attrs["volume_unit"] == "mL"
assert (patients3d["truth_volume"] > 0).all() and (patients3d["n_true_lesions"] >= 1).all()
assert np.allclose(patients3d["volume_difference"],
                   patients3d["pred_volume"] - patients3d["truth_volume"])
assert (patients3d["hd95"] >= 0).all() and patients3d["lesion_f1"].between(0, 1).all()

# %% [markdown]
# ## 9. Two models on the same cases: a paired comparison
# The two configurations chosen on validation in step 5 are compared on the **same** test slices
# (each configuration's Dice per slice, averaged over its seeds): the Wilcoxon signed-rank test on
# the per-slice differences, an effect size (rank-biserial correlation, −1…1), and a bootstrap
# interval of the mean difference. Slices of one patient are correlated, so the slice-level p-value
# is optimistic; the interval that resamples whole patients is the honest one. And with a handful
# of test patients, no test *on patients* can be significant at all: with n pairs the smallest
# two-sided Wilcoxon p-value is 2 / 2ⁿ.

# %%
lesion_slices = slices[slices["truth_pixels"] > 0]
paired = lesion_slices.groupby(["model", "case_id"])["dice"].mean().unstack("model")
cmp = evaluation.paired_comparison(paired[BEST], paired[RUNNER_UP], names=(BEST, RUNNER_UP),
                                   n_boot=N_BOOT, ci=CI, seed=SEED)
patient_of = dict(zip(test_data.case_ids, test_data.patient_ids))
by_patient = evaluation.bootstrap_ci(paired[BEST] - paired[RUNNER_UP], n_boot=N_BOOT, ci=CI,
                                     seed=SEED, groups=[patient_of[c] for c in paired.index])

# %% [markdown]
# The comparison in one sentence, then checks that its parts agree: the mean difference is the
# difference of the means, and both intervals contain the same estimate.

# %%
print(f"{BEST} − {RUNNER_UP} on {cmp['n']} test lesion slices: mean Dice difference "
      f"{cmp['mean_difference']:+.3f}, 95% CI [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}] "
      f"resampling slices, [{by_patient.low:+.3f}, {by_patient.high:+.3f}] resampling patients; "
      f"Wilcoxon p = {cmp['p_value']:.4f}, rank-biserial r = {cmp['rank_biserial']:+.2f}, "
      f"Cohen's dz = {cmp['cohens_dz']:+.2f}.\nOn {n_test_patients} patients the smallest "
      f"possible p-value would be {2 / 2 ** n_test_patients:.2f}.")
assert cmp["n"] == n_lesion_slices and cmp["n_skipped"] == 0
assert np.isclose(cmp["mean_difference"], cmp["mean_a"] - cmp["mean_b"])
assert 0 <= cmp["p_value"] <= 1 and -1 <= cmp["rank_biserial"] <= 1
assert by_patient.low <= by_patient.high and np.isclose(by_patient.estimate, cmp["mean_difference"])

# %% [markdown]
# ## 10. Look at the errors
# Numbers hide *how* a model fails. The chosen run's best, median and worst test slices (among
# slices with a lesion or a prediction), with true positives yellow, false positives red and
# false negatives blue.

# %%
fig = evaluation.plot_error_overlays(window_hu(test_data.images, "brain"), test_data.masks,
                                     prob_test[best_run], case_ids=test_data.case_ids,
                                     threshold=THRESHOLD)
display(fig)
assert len(fig.axes) == 3

# %% [markdown]
# ## 11. The threshold is a hyperparameter: choose it on validation
# A sigmoid output becomes a mask at a threshold, and 0.5 is a habit, not a law. Sweep thresholds
# on the **validation** patients, pick the threshold with the best Dice, and apply that one number
# unchanged to test. The curve is the mean over validation patients of each patient's Dice (all its
# pixels pooled); with a single validation patient it is that patient's pooled Dice, and the plot
# labels it "pooled". Sweeping on test and reporting the best is another way of grading your own exam.

# %%
sweep = evaluation.threshold_sweep(val_data.masks, prob_val[best_run], THRESHOLDS,
                                   patient_ids=val_data.patient_ids)
chosen_threshold = evaluation.choose_threshold(sweep)
display(evaluation.plot_threshold_sweep(sweep, chosen=chosen_threshold))
at = {t: metrics.aggregate(test_data.masks, prob_test[best_run], test_data.patient_ids,
                           threshold=t).loc["dice", "mean_of_patients"]
      for t in (THRESHOLD, chosen_threshold)}
print(f"threshold chosen on validation: {chosen_threshold:.2f}; test Dice (mean of patients) "
      f"{at[THRESHOLD]:.3f} at {THRESHOLD} → {at[chosen_threshold]:.3f} at {chosen_threshold:.2f}")
assert chosen_threshold in THRESHOLDS and all(0 <= v <= 1 for v in at.values())

# %% [markdown]
# Move the threshold on the validation set: the point on the Dice curve and the overlay of the
# validation slice with the largest lesion follow it.

# %%
val_curve = sweep.groupby("threshold")["dice"].mean()
show_case = int(np.argmax(val_data.lesion_area()))
val_image = window_hu(val_data.images[show_case], "brain")

# %%
def show_threshold(threshold=chosen_threshold):
    _, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(val_curve.index, val_curve.to_numpy(), marker="o", ms=3)
    dice_here = metrics.aggregate(val_data.masks, prob_val[best_run], val_data.patient_ids,
                                  threshold=threshold).loc["dice", "mean_of_patients"]
    ax1.plot([threshold], [dice_here], "o", color="C3", ms=9)
    ax1.set(xlabel="threshold", ylabel="validation Dice (mean of patients)", xlim=(0, 1),
            ylim=(0, 1.02))
    ax2.imshow(evaluation.error_overlay(val_image, val_data.masks[show_case],
                                        prob_val[best_run][show_case] >= threshold))
    ax2.set_title(f"{val_data.case_ids[show_case]} at threshold {threshold:.2f}")
    ax2.set_axis_off()
    plt.show()

# %%
display(widgets.interactive(show_threshold, threshold=widgets.FloatSlider(
    value=chosen_threshold, min=0.05, max=0.95, step=0.05, continuous_update=False)))

# %% [markdown]
# ## 12. Why "specificity 0.9987" says little
# On a CT slice almost every pixel is background, so specificity = TN / (TN + FP) is close to 1
# for *any* model that does not paint the whole head — including one that finds nothing at all.
# We compute how far that goes on our test slices.

# %%
truth_test, pred_test = test_data.masks > 0, prob_test[best_run] >= THRESHOLD
illusion = evaluation.specificity_illusion(truth_test, pred_test)
print(f"background is {100 * illusion['background_fraction']:.2f} % of the test pixels.\n"
      f"A model that predicts nothing: specificity {illusion['all_background_specificity']:.4f},"
      f" Dice {illusion['all_background_dice']:.3f}.\n"
      f"The chosen model: specificity {illusion['model_specificity']:.4f}, "
      f"Dice {illusion['model_dice']:.3f}.\n"
      f"Specificity stays ≥ 0.999 with up to {illusion['fp_budget_at_0999']:.0f} false-positive "
      f"pixels: {illusion['fp_budget_over_lesion_pixels']:.2f} × all the lesion pixels here.")
assert illusion["all_background_specificity"] == 1.0 and illusion["all_background_dice"] == 0.0
assert np.isclose(illusion["fp_budget_at_0999"],
                  0.001 * (illusion["pixels"] - illusion["lesion_pixels"]))

# %% [markdown]
# Make that concrete with three made-up predictions on the same test slices: one that marks
# nothing, the perfect mask plus that many false-positive pixels in a ring around each lesion, and
# the ring alone (every lesion missed). All three report a specificity of at least 0.999.

# %%
budget = int(illusion["fp_budget_at_0999"])
# Distance to the nearest lesion pixel of the same slice (a huge step between slices).
distance = ndimage.distance_transform_edt(~truth_test, sampling=(1e6, 1, 1))
nearest = np.argsort(distance, axis=None, kind="stable")  # lesion pixels (distance 0) first
ring = np.zeros_like(truth_test)
ring.flat[nearest[truth_test.sum(): truth_test.sum() + budget]] = True
made_up = {"marks nothing": np.zeros_like(truth_test), "lesion + ring": truth_test | ring,
           "ring only": ring}

# %% [markdown]
# Score the three made-up predictions like a model:

# %%
illusion_table = pd.DataFrame({
    name: metrics.metrics_from_counts(*metrics.confusion(truth_test, pred))
    for name, pred in made_up.items()}).T[["specificity", "sensitivity", "dice"]]
display(illusion_table.round(4))
assert (illusion_table["specificity"] >= 0.999).all() and not (ring & truth_test).any()
assert illusion_table.loc["ring only", "dice"] == 0.0
assert illusion_table.loc["lesion + ring", "sensitivity"] == 1.0

# %% [markdown]
# Two more numbers that cannot be compared with a Dice:
# - **The wrong formula.** Dice is 2·TP / (2·TP + FP + FN). One study printed TP / (2·TP + FN + FP)
#   instead, without the factor 2 in the numerator: exactly half the real Dice, so a perfect mask
#   scores 0.5.
# - **Background counted as a class.** A "multiclass Dice" that averages over classes *including
#   background* is lifted by the background's Dice of ≈ 1; averaged over pixels (micro-averaged) it
#   is simply pixel accuracy — which is how a 0.99 appears.

# %%
right = metrics.dice(truth_test, pred_test)
wrong = metrics.dice_wrong_formula(truth_test, pred_test)
classes = metrics.per_class_metrics(truth_test.astype(np.uint8), pred_test.astype(np.uint8),
                                    num_classes=2, class_names=("background", "lesion"),
                                    include_background=True)
display(classes[["class_name", "truth_pixels", "pred_pixels", "dice", "iou"]].round(4))

# %% [markdown]
# The same prediction, four numbers: the right Dice, the wrong formula, the mean over classes with
# background, and the micro-average over pixels, which equals pixel accuracy.

# %%
tp_all, fp_all, fn_all = classes["tp"].sum(), classes["fp"].sum(), classes["fn"].sum()
micro = 2 * tp_all / (2 * tp_all + fp_all + fn_all)
accuracy = (truth_test == pred_test).mean()
print(f"Dice {right:.3f} · the wrong formula gives {wrong:.3f} · a perfect mask would score "
      f"{metrics.dice_wrong_formula(truth_test, truth_test):.2f} with it.\n"
      f"lesion Dice {classes['dice'].iloc[1]:.3f} · mean over classes with background "
      f"{classes['dice'].mean():.3f} · micro-averaged over pixels {micro:.4f} = pixel accuracy "
      f"{accuracy:.4f}")
assert np.isclose(wrong, right / 2) and metrics.dice_wrong_formula(truth_test, truth_test) == 0.5
assert np.isclose(classes["dice"].iloc[1], right) and np.isclose(micro, accuracy)

# %% [markdown]
# ## 13. Keep everything: a tidy table and the figures
# One row per model run × case × metric (slices and 3-D patients), so anyone can recompute any
# summary — including ones we did not think of. The figures show every case, not only a mean.

# %%
units = {"hd95": "mm", "assd": "mm", "volume_difference": "mL", "truth_volume": "mL",
         "pred_volume": "mL"}
ids = ["model", "seed", "run", "patient_id", "case_id"]
slice_metrics = ["dice", "iou", "sensitivity", "specificity", "precision", "hd95", "assd",
                 "volume_difference"]
patient_metrics = ["dice", "iou", "sensitivity", "precision", "hd95", "assd", "truth_volume",
                   "pred_volume", "volume_difference", "lesion_precision", "lesion_recall",
                   "lesion_f1"]
long = pd.concat([
    slices.melt(ids, slice_metrics, var_name="metric").assign(level="slice"),
    patients3d.assign(case_id=patients3d["patient_id"])
    .melt(ids, patient_metrics, var_name="metric").assign(level="patient_3d"),
], ignore_index=True)

# %% [markdown]
# Each row says its unit, the threshold and the run folder it came from; the file is read back to
# check that nothing was lost.

# %%
long["unit"] = long["metric"].map(units).fillna("")
long["threshold"] = THRESHOLD
long["folder"] = long["run"].map(runs["folder"].astype(str))
OUT.mkdir(parents=True, exist_ok=True)
long.to_csv(OUT / "report.csv", index=False)
back = pd.read_csv(OUT / "report.csv")
print(f"{len(back)} rows → {OUT / 'report.csv'}")
assert len(back) == len(slices) * len(slice_metrics) + len(patients3d) * len(patient_metrics)
assert set(back["level"]) == {"slice", "patient_3d"}

# %%
figures = {
    "dice_per_lesion_slice": evaluation.plot_metric_boxes(lesion_slices, "dice", seed=SEED),
    "hd95_per_lesion_slice": evaluation.plot_metric_boxes(lesion_slices, "hd95", seed=SEED),
    "dice_per_patient_3d": evaluation.plot_metric_boxes(patients3d, "dice", seed=SEED),
}
figures["hd95_per_lesion_slice"].axes[0].set_ylabel("HD95 per slice (mm; infinite = missed)")
(OUT / "figures").mkdir(exist_ok=True)
for name, fig in figures.items():
    fig.savefig(OUT / "figures" / f"{name}.png", dpi=100)
    display(fig)
assert all((OUT / "figures" / f"{name}.png").is_file() for name in figures)

# %% [markdown]
# ## Exercises
# 1. Re-run step 6 with `slices[slices.truth_pixels > 0]`: how much of the study-style IoU came
#    from lesion-free slices?
# 2. In step 9, compare the best configuration with the *worst* on validation. Does the
#    slice-level Wilcoxon test call the difference significant? Does the patient-level interval
#    exclude 0?
# 3. Choose the threshold on the test set instead of validation (step 11) and report test Dice. By
#    how much does it flatter the model, and why is that number not publishable?
# 4. Evaluate one run from the command line:
#    `python -m strokekit evaluate --model runs/04_unet_vs_resunet/grid/<run> --data data/phantom --csv /tmp/report.csv`
#    (notebook 01 writes `data/phantom`). Which of the numbers above does it print — and why can
#    they not be compared with this notebook's test numbers? (Which slices does that folder hold?)
#
# ## Summary
# - Say how you aggregate: pooled, mean of slices and mean of patients differ by many points on
#   the same predictions; lesion-free slices add free 1.0s to a mean over slices.
# - Report per patient, with intervals that resample patients; add distances in mm, volumes in mL
#   and lesion-wise F1 — and look at the worst case.
# - Choose models and thresholds on validation, compare on paired test cases with an effect size;
#   never trust specificity ≈ 0.999 or a Dice that counts background.
#
# **Next →** [07 · Multiclass](07_multiclass.ipynb)
