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
# # 10 · What generalizes
# Few-shot segmentation on real CT, scored on patients the model has never seen — one lever at a time.
#
# **Learning goals**
# - Evaluate a few-shot model the honest way: a fixed patient split, choices made on validation only, per-patient Dice.
# - See a position prior: a network that learned *where* the training patients bled, not *what* blood looks like.
# - Measure which levers help (loss, lesion-free slices, crops and augmentation, input channels, after-training
#   decisions) against a classical threshold baseline — and read what a specificity of 0.996 hides.
#
# **Runtime**: about 4 minutes on a laptop CPU (quick profile: 64 px, 3 epochs, 2 seeds); the full profile
# (256 px like the default, its 25 epochs, 3 seeds) takes about 1–2 hours on 2 CPU cores or a few minutes on a GPU.
# The reference numbers at the end come from `benchmarks/bench_fewshot_ctich.py`.
#
# The data are the CT-ICH slices (`../shared/data/ct-ich`): **traumatic intracranial haemorrhage, not
# ischemic stroke** — bright blood on brain-windowed 8-bit PNGs. Without them the notebook prints why and
# skips every step.

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import dataclasses  # noqa: F401 (exercises 4 and 5 vary the recipe with it)
import time

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from strokekit import fewshot as fs
from strokekit import paths
from strokekit.config import get_profile
from strokekit.preprocess import overlay_mask

print(f"keras {keras.__version__} · backend {keras.backend.backend()}")

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
PROFILE = get_profile()
PROTOCOL = "fewshot-ctich-v1"          # train 49/50/51, validate 66, test the 32 other lesion patients
SIZE = min(PROFILE.image_size, fs.FEWSHOT_DEFAULT.config.image_size)   # 64 px quick, 256 px full
EPOCHS = min(fs.FEWSHOT_DEFAULT.config.num_epochs, PROFILE.num_epochs)  # 3 quick, 25 full
FILTERS = tuple(min(a, b) for a, b in zip(PROFILE.filters, fs.FEWSHOT_DEFAULT.config.filters))
SEEDS = tuple(range(PROFILE.num_seeds))
STEPS = fs.ablation_recipes(image_size=SIZE, num_epochs=EPOCHS, filters=FILTERS)
CTICH = paths.ctich_dir()
print(PROFILE.name, f"{SIZE} px · {EPOCHS} epochs · filters {FILTERS} · seeds {SEEDS}")
for label, recipe in STEPS:
    print(" ", label)
if PROFILE.name == "full":   # the full profile trains exactly the kit's few-shot default
    assert STEPS[-1][1] == fs.FEWSHOT_DEFAULT

# %% [markdown]
# ## 1. The protocol
# The study trained on the lesion slices of three patients and tested on slices *of the same kind*. Here the
# test patients are new people: 32 patients, 266 lesion slices. Patient 66 is the only validation patient:
# every choice (epochs, threshold, which levers to keep) is made on it or by cross-validation over the three
# training patients, never on the test patients. No patient appears in two subsets.

# %%
HAVE_DATA = CTICH is not None
if not HAVE_DATA:
    print("skipped: ../shared/data/ct-ich is absent (set $STROKEKIT_CTICH); this notebook needs the real slices.")
else:
    data, split = fs.load_protocol(PROTOCOL, image_size=SIZE, empty_slices=True, progress=False)
    train_data, val_data, test_data = (split.dataset(data, s) for s in ("train", "val", "test"))
    frame = split.to_frame()
    display(frame.groupby("subset").agg(slices=("case_id", "size"), patients=("patient_id", "nunique")))
    assert (frame.groupby("patient_id")["subset"].nunique() == 1).all()      # no patient crosses subsets
    assert split.counts() == {"train": 117, "val": 12, "test": 266}
    assert int(fs.lesion_flags(train_data).sum()) == 40

# %% [markdown]
# ## 2. A baseline that needs no training
# Fresh blood is brighter than brain and darker than bone. So: find the brain (`strokekit.preprocess.brain_mask`,
# skull stripping by thresholds and morphology), keep pixels in a band of grey levels, clean up speckle. The band
# is chosen on the training and validation patients. Any learned recipe has to beat this.

# %%
if HAVE_DATA:
    dev = [train_data.subset(np.flatnonzero(fs.lesion_flags(train_data))), val_data]
    band = fs.fit_threshold(np.concatenate([d.images for d in dev]), np.concatenate([d.masks for d in dev]),
                            patient_ids=sum((list(d.patient_ids) for d in dev), []))
    thr_pred = fs.threshold_in_brain(test_data.images, low=band["low"], high=band["high"], erosion=band["erosion"])
    baseline = fs.evaluate_protocol(thr_pred, test_data)
    background = fs.evaluate_protocol(fs.all_background(test_data.images), test_data)
    print(f"band {band['low']:.0f}–{band['high']:.0f}, erosion {band['erosion']}: test per-patient Dice "
          f"{baseline['per_patient_dice']:.3f}; all-background {background['per_patient_dice']:.3f} "
          f"with specificity {background['specificity']:.4f}")
    assert 0.0 < baseline["per_patient_dice"] < 1.0 and background["per_patient_dice"] == 0.0
    assert background["specificity"] == 1.0

# %% [markdown]
# ## 3. The ablation: from the study's recipe to the kit's default
# Each step changes one lever and keeps the others; every step is trained with several seeds and scored on the
# test patients (reported, never used to choose). Step 0 is the study's recipe shrunk to this profile's
# network size. Crops (step 3) show the network a 1/4-slice window that does not say *where* in the head it
# lies, and rotations up to 180° with vertical flips make every position look alike: that takes the position
# prior away. Step 4 gives the network the threshold map of section 2 and a narrow "blood window" as extra
# channels. Step 5 changes nothing in training: it restricts the prediction to the brain, averages it with the
# prediction of the mirrored slice, and takes the threshold that is best on patient 66.

# %%
if HAVE_DATA:
    started = time.perf_counter()
    rows, models, per_patient = [], {}, {}
    for seed in SEEDS:
        for k, (label, recipe) in enumerate(STEPS):
            if k == len(STEPS) - 1:   # the last step only changes after-training decisions: no new training
                fitted = fs.redecide(models[(k - 1, seed)], val_data,
                                     **{f: getattr(recipe, f) for f in fs.POSTHOC_FIELDS})
            else:
                fitted = fs.fit_recipe(recipe, train_data, val_data, seed=seed)
            pred = fs.predict_recipe(fitted, test_data)
            result = fs.evaluate_protocol(pred, test_data)
            models[(k, seed)], per_patient[(k, seed)] = fitted, fs.patient_dice(pred, test_data)
            rows.append(dict(step=label, seed=seed, val_dice=fitted.val_dice, threshold=fitted.threshold,
                             train_s=fitted.seconds, **result))
    runs = pd.DataFrame(rows)
    print(f"{len(runs)} runs in {time.perf_counter() - started:.0f} s")
    assert len(runs) == len(STEPS) * len(SEEDS) and runs["per_patient_dice"].between(0, 1).all()

# %%
if HAVE_DATA:
    table = runs.groupby("step", sort=False).agg(
        per_patient_dice=("per_patient_dice", "mean"), sd=("per_patient_dice", "std"),
        per_slice_dice=("per_slice_dice", "mean"), sensitivity=("sensitivity", "mean"),
        specificity=("specificity", "mean"), val_dice=("val_dice", "mean"), threshold=("threshold", "mean"))
    extra = pd.DataFrame([dict(per_patient_dice=baseline["per_patient_dice"], sd=np.nan,
                               per_slice_dice=baseline["per_slice_dice"], sensitivity=baseline["sensitivity"],
                               specificity=baseline["specificity"]),
                          dict(per_patient_dice=0.0, sd=np.nan, per_slice_dice=0.0, sensitivity=0.0,
                               specificity=1.0)], index=["threshold in brain", "all background"])
    display(pd.concat([table, extra]).round(3))
    assert table["specificity"].between(0, 1).all() and table["per_patient_dice"].between(0, 1).all()

# %%
if HAVE_DATA:
    fig, ax = plt.subplots(figsize=(9, 3.8))
    order = [label for label, _ in STEPS]
    for i, label in enumerate(order):
        vals = runs.loc[runs.step == label, "per_patient_dice"]
        ax.scatter(np.full(len(vals), i), vals, color="tab:blue", alpha=0.6)
        ax.errorbar(i, vals.mean(), yerr=vals.std(ddof=1) if len(vals) > 1 else 0, fmt="_", color="k",
                    markersize=20, capsize=4)
    ax.axhline(baseline["per_patient_dice"], color="tab:red", ls="--", label="threshold in brain")
    ax.set_xticks(range(len(order)), [label.split(" ", 1)[0] for label in order])
    ax.set(xlabel="ablation step (see the table)", ylabel="test per-patient Dice",
           title="Each lever, mean ± sd over seeds (dots: seeds)")
    ax.legend()
    plt.show()
    assert len(ax.collections) >= len(order)

# %% [markdown]
# Two means can differ by less than their spread. Compare the default with the threshold **patient by
# patient** (each patient's Dice averaged over seeds): on how many of the 32 test patients is it better, and
# how sure is the mean difference? The interval is a bootstrap over patients — it shows how much the answer
# depends on which patients happened to be in the test set.

# %%
if HAVE_DATA:
    last = len(STEPS) - 1
    ours_pp = {p: float(np.mean([per_patient[(last, s)][p] for s in SEEDS])) for p in per_patient[(last, SEEDS[0])]}
    thr_pp = fs.patient_dice(thr_pred, test_data)
    paired = fs.compare_patients(ours_pp, thr_pp)
    print(f"kit default vs threshold: better on {paired['wins']} of {paired['n']} patients, worse on "
          f"{paired['losses']}; mean difference {paired['mean_difference']:+.3f} "
          f"(95 % CI over patients {paired['ci_low']:+.3f} to {paired['ci_high']:+.3f})")
    assert paired["n"] == 32 and paired["wins"] + paired["ties"] + paired["losses"] == 32
    assert paired["ci_low"] <= paired["mean_difference"] <= paired["ci_high"]

# %% [markdown]
# ## 4. The position prior, in pictures
# Where does each model paint? The mean predicted probability over all 266 test slices: a model that learned
# *where* the training patients bled paints the same place on every patient; a model that learned what blood
# looks like paints wherever each patient's blood is. Then four test slices, one per patient, with the truth
# (green), the study's recipe and the kit's default (red).
#
# In the quick profile (64 px, 3 epochs) both networks are undertrained and the table above is mostly seed
# noise: the study's recipe usually paints nothing yet, the default paints much of the inner skull rim at low
# confidence. The lesson needs the full profile (or the benchmark's numbers in section 6): trained for its 50
# epochs, the study's 31M-parameter model painted the front rim of the skull — where the three training
# patients bled — on every test patient (per-patient Dice 0.04, specificity 0.996).

# %%
if HAVE_DATA:
    study_fit, ours_fit = models[(0, SEEDS[0])], models[(len(STEPS) - 1, SEEDS[0])]
    prob_study = fs.predict_recipe(study_fit, test_data, probabilities=True)
    prob_ours = fs.predict_recipe(ours_fit, test_data, probabilities=True)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, img, title in zip(axes, [test_data.masks.mean(0), prob_study.mean(0), prob_ours.mean(0)],
                              ["where the test patients bled", "study recipe: mean probability",
                               "kit default: mean probability"]):
        im = ax.imshow(img, cmap="magma"); ax.set_title(title); ax.set_axis_off()
        fig.colorbar(im, ax=ax, fraction=0.046)
    plt.show()
    assert prob_study.shape == prob_ours.shape == test_data.masks.shape

# %%
if HAVE_DATA:
    pids = np.asarray(test_data.patient_ids)
    area = test_data.masks.reshape(len(test_data), -1).sum(1).astype(np.int64)
    picks = []
    for pid in sorted(set(pids), key=lambda p: -area[pids == p].max())[:4]:   # the 4 largest bleeds, 4 patients
        picks.append(int(np.flatnonzero(pids == pid)[np.argmax(area[pids == pid])]))
    pred_study = (prob_study >= study_fit.threshold).astype(np.uint8)
    pred_ours = (prob_ours >= ours_fit.threshold).astype(np.uint8)
    fig, axes = plt.subplots(3, len(picks), figsize=(3 * len(picks), 9))
    for j, i in enumerate(picks):
        image01 = test_data.images[i] / 255.0
        # truth in green (class 2 of DEFAULT_COLOURS), predictions in red
        for r, (mask, name) in enumerate([(test_data.masks[i] * 2, "truth"), (pred_study[i], "study recipe"),
                                          (pred_ours[i], "kit default")]):
            axes[r, j].imshow(overlay_mask(image01, mask))
            axes[r, j].set_axis_off()
            axes[r, j].set_title(f"patient {pids[i]}: {name}", fontsize=9)
    plt.show()
    assert len(set(pids[picks])) == len(picks)

# %% [markdown]
# ## 5. What a specificity of 0.996 hides
# Specificity counts the background pixels left alone. A 128 px slice has 16,384 pixels and a bleed covers a
# few hundred, so 99 % of the pixels are background: predicting *nothing* scores a specificity of 1.000 (and a
# Dice of 0). The study's model paints the skull rim of every patient and still scores 0.996 — the false
# pixels are a few percent of a huge background. Per-patient Dice (each patient's pixels pooled, then the mean
# over patients) asks the question that matters: how much of *this patient's* bleed was found, and how much of
# what was painted was blood?

# %%
if HAVE_DATA:
    counts = pd.DataFrame({
        "painted pixels / slice": [pred_study.sum() / len(pred_study), pred_ours.sum() / len(pred_ours), 0.0],
        "true pixels / slice": [test_data.masks.sum() / len(test_data)] * 3,
        "specificity": [fs.evaluate_protocol(pred_study, test_data)["specificity"],
                        fs.evaluate_protocol(pred_ours, test_data)["specificity"], 1.0],
        "per-patient Dice": [fs.evaluate_protocol(pred_study, test_data)["per_patient_dice"],
                             fs.evaluate_protocol(pred_ours, test_data)["per_patient_dice"], 0.0],
    }, index=["study recipe", "kit default", "all background"])
    display(counts.round(4))
    assert counts.loc["all background", "specificity"] == 1.0 and counts["specificity"].between(0, 1).all()

# %% [markdown]
# ## 6. Reference numbers (full protocol, from the benchmark)
# `python benchmarks/bench_fewshot_ctich.py`: the default at its own 256 px with 3 seeds and at 128 px with 1,
# scored on the protocol's 128 px masks (a 256 px prediction is resized first), the study's 31M-parameter U-Net
# rebuilt with the kit, the threshold baseline. Every setting was chosen by cross-validation over patients
# 49/50/51 and on patient 66 only; `benchmarks/fewshot_log.md` records what was tried. (This notebook's full
# profile scores on 256 px masks, so its figures differ a little from these.)
#
# Run of 2026-11-23, 19:37 UTC, 2-core CPU, keras 3.15.1 / TensorFlow with oneDNN, load ~2:
#
# | method | per-patient Dice per seed | mean ± sd | train time / seed |
# |---|---|---|---|
# | kit default, 256 px | 0.367 / 0.387 / 0.381 | **0.379 ± 0.010** | 1.9–2.0 min |
# | kit default, 128 px | 0.299 | — | 2.2 min |
# | threshold in brain | 0.298 | — | — |
# | all background | 0.000 | — | — |
# | study recipe, 50 epochs | 0.000 (specificity 1.0000: it predicts nothing) | — | 63.5 min (the last 17 shared the CPU) |
#
# Patient by patient the 256 px default beats the threshold on 24 of 32 patients (5 ties), mean difference
# +0.081 (95 % bootstrap interval over patients +0.050 to +0.113); the 128 px default ties it (+0.001, −0.037 to
# +0.042). Pooled Dice 0.594 against the threshold's 0.576; the whole table took 81 min, 64 of them the study's row.
#
# At 128 px the same recipe had given 0.312 ± 0.029 and 0.277 ± 0.044 in two earlier runs: no better than the
# threshold, and the run-to-run spread (CPU arithmetic, thread timing) was as large as the gap. At 256 px the
# network sees each bleed with four times the pixels while still training on 64 px crops (same cost); it beats
# the threshold with every seed. The 0.50 the issue aimed for is not reached: three training patients remain
# three training patients.
#
# Note the specificities: every method is above 0.995, including the ones that find nothing.
#
# ## Exercises
# 1. Reorder the ablation: apply step 5 (after-training decisions) to the study's model. How much of the gain is
#    decisions, how much is training? (Hint: `fs.redecide(models[(0, 0)], val_data, restrict_to_brain=True,
#    tta_flip=True, tune_threshold=True)`.)
# 2. Leave one training patient out: train on two of 49/50/51 and score the third. How much do the numbers move
#    with one patient more or less — and what does that say about a single validation patient?
# 3. Replace the threshold-map channel with a second window only (`candidate_channel=False`). Is the network
#    learning blood, or copying the threshold?
# 4. Average three networks: `fs.fit_recipe(dataclasses.replace(recipe, n_models=3), ...)` trains members with
#    seeds `seed`, `seed + 1000`, `seed + 2000` and averages their probabilities. Does the spread over seeds
#    shrink? Does the mean move? (In the kit's cross-validation it did not beat one network with a tuned
#    threshold, at three times the training time.)
# 5. Train twice as long: `dataclasses.replace(recipe, config=dataclasses.replace(recipe.config, num_epochs=50))`.
#    Compare the validation Dice at a fixed 0.5 and at the tuned threshold. (In the kit's cross-validation 50
#    epochs made under-confident networks confident — the CV at 0.5 rose from 0.25 to 0.32 — but with the
#    threshold tuned on patient 66 it moved only from 0.308 to 0.313: the tuned threshold had already done that
#    work, so the default stays at 25 epochs.)
#
# ## Summary
# - A few-shot model must be judged on new patients: fixed patient split, choices on validation, per-patient Dice.
# - Whole-slice training on three patients learns a position prior; crops and strong geometric augmentation take
#   it away, and a cheap classical baseline tells you whether a network is worth its training time.
# - Specificity near 1 is what "predict nothing" scores; report Dice per patient, with its spread over seeds.
