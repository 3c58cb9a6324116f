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
# # 08 · CT perfusion: infarct core and penumbra
# Five parametric maps in, four classes out — and a check of whether the network works as well
# behind a distal occlusion as behind a large one.
#
# **Learning goals**
# - Read CT-perfusion maps (CBF, CBV, Tmax, TTP, MIP) and the rules that separate the infarct core from the penumbra.
# - Fuse several maps (and a clinical score) in one multi-input U-Net trained with a class-weighted focal Tversky loss.
# - Compare frozen, unfrozen and gradually unfrozen fine-tuning honestly, per class and per occlusion group.
#
# **Runtime**: about 3 minutes on a 2-core laptop CPU (quick profile: 64 px, 30 epochs, 2 seeds);
# the full profile (256 px, 200 epochs, 3 seeds) needs a GPU (~1 hour). The Parameters cell prints
# the image size, epochs and seeds of this run.

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import dataclasses

import ipywidgets as widgets
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from scipy import stats

from strokekit import ctp_phantom, models, multiclass, paths, perfusion, report
from strokekit import split as splitting
from strokekit.config import get_profile, phantom_config

# %%
print(f"keras {keras.__version__} · backend {keras.backend.backend()}")

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = phantom_config(PROFILE, n_patients=2 * PROFILE.phantom_patients, empty_slices_per_patient=0,
                         image_size=PROFILE.image_size, lesion_types=("ischemic",))
SOURCE = dataclasses.replace(PHANTOM, n_patients=PROFILE.phantom_patients, seed=1)   # other patients, for pretraining
MAPS = ctp_phantom.PerfusionConfig()         # normal CBF 60/25, CBV 4/2, core rCBF < 0.3, penumbra Tmax > 6 s
EPOCHS = {"quick": 3, "full": 4}[PROFILE.mode] * PROFILE.num_epochs   # quick: 30, in the course's time budget
TRAIN = perfusion.PerfusionTrainConfig(
    filters=PROFILE.filters,
    use_clinical=True,               # NIHSS as an extra input
    class_weights=None,              # set from the training pixels in step 4
    alpha=0.7, beta=0.3, gamma=0.75,  # focal Tversky: false negatives cost more than false positives
    learning_rate=3e-3,
    lr_scale=0.3,                    # learning-rate factor once pretrained encoder blocks train
    unfreeze_every=max(1, EPOCHS // 3),
    batch_size=PROFILE.batch_size,
    num_epochs=EPOCHS,
)
WEIGHT_POWER = 0.5                   # class weight = (background pixels / class pixels) ** WEIGHT_POWER
SCHEDULES = ("scratch", "frozen", "unfrozen", "gradual")
SEEDS = tuple(range(PROFILE.num_seeds))
SPLIT_FILE = paths.data_dir() / "splits" / "ctp_split.json"
RUNS = paths.runs_dir() / "08_ctp_core_penumbra"
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floor (measured in the quick profile)
print(PROFILE.name, f"· {PROFILE.image_size} px, {EPOCHS} epochs, {len(SEEDS)} seeds ·", TRAIN)

# %% [markdown]
# ## 1. Perfusion maps
# A perfusion scan follows a contrast bolus and summarises each pixel in maps: blood **flow** (CBF),
# blood **volume** (CBV), **Tmax** and **TTP** (delays) and the **MIP** (the brightest moment: an
# angiogram). Behind an occlusion, the **core** is already lost (CBF < 30 % of normal *and* CBV
# down: the vessels have collapsed) and the **penumbra** is at risk but alive (Tmax > 6 s while CBV
# is kept or raised by dilated vessels). The phantom's infarcts become cores; a margin around each
# in the same hemisphere becomes its penumbra. It is a drawing by rules, not a perfusion model.

# %%
ctp = ctp_phantom.perfusion_phantom(PHANTOM, MAPS, progress=False)
lvo = int(np.argmax(np.where(ctp.extra["occlusion"] == "LVO", (ctp.masks == 2).sum(axis=(1, 2)), -1)))
other = int(np.argmax(np.where(ctp.extra["occlusion"] == "other", (ctp.masks == 3).sum(axis=(1, 2)), -1)))
display(perfusion.plot_maps(ctp, lvo))
display(perfusion.plot_maps(ctp, other))
table = perfusion.map_statistics(ctp)
display(table.round(2))
assert ctp.images.shape[1:] == (PROFILE.image_size, PROFILE.image_size, len(perfusion.MAP_NAMES))
assert table.loc["core", "cbf"] < 0.3 * table.loc["normal", "cbf"]
assert table.loc["core", "cbv"] < table.loc["normal", "cbv"] <= table.loc["penumbra", "cbv"]
assert table.loc["penumbra", "tmax"] > 6.0 and table.loc["normal", "tmax"] < 2.0

# %% [markdown]
# ## 2. Occlusion groups and a clinical score
# Large-vessel occlusions (LVO, here the MCA's M1 segment) starve a large territory, often with a
# small core and a large penumbra — the patients thrombectomy helps most. Other occlusions (ACA,
# PCA, distal branches) leave smaller deficits. In the phantom both groups get their cores from the
# same kind of infarct; what differs is the margin of penumbra drawn around it: wide behind an LVO,
# narrow otherwise, so behind other occlusions the core fills more of the hypoperfused region.
# Smaller is not simply harder: a thin penumbral ring is hard to outline, while a core that is a
# larger share of the lesion can be an easier target. Step 6 prints, class by class, which group
# scores higher. Each patient also has a synthetic NIHSS score that grows with core and penumbra
# volume (plus noise).

# %%
patients = perfusion.patient_table(ctp)
display(patients.groupby("occlusion")[["core_ml", "penumbra_ml", "nihss"]].agg(["count", "mean"]).round(1))
rho = stats.spearmanr(patients["core_ml"] + patients["penumbra_ml"], patients["nihss"]).statistic
fig, ax = plt.subplots(figsize=(5, 3.5))
for group in perfusion.OCCLUSION_GROUPS:
    part = patients[patients["occlusion"] == group]
    ax.scatter(part["core_ml"] + part["penumbra_ml"], part["nihss"], label=group)
ax.set(xlabel="core + penumbra (mL)", ylabel="NIHSS", title=f"Spearman ρ = {rho:.2f}")
ax.legend()
plt.show()
assert set(patients["occlusion"]) == {"LVO", "other"} and rho > 0.5
assert (patients.groupby("occlusion")["penumbra_ml"].mean()["LVO"]
        > patients.groupby("occlusion")["penumbra_ml"].mean()["other"])

# %% [markdown]
# ## 3. Split by patient, stratified by occlusion group, and the classical rule
# Both groups must reach the test set, or the per-group table below has an empty row. Before any
# network: the rule perfusion software applies (Tmax > 6 s → hypoperfused; rCBF < 30 % and CBV
# reduced → core) on the same noisy maps. That is the bar to beat.

# %%
split = splitting.cluster_split(ctp, clusters=ctp.extra["occlusion"], test=0.3, val=0.2, seed=0)
split.save(SPLIT_FILE)
splitting.check_leakage(split)
train_data, val_data, test_data = (split.dataset(ctp, s) for s in ("train", "val", "test"))
print({s: len(split.dataset(ctp, s).patients()) for s in ("train", "val", "test")}, "patients")
rule = perfusion.group_scores(test_data, perfusion.threshold_segmentation(test_data))
display(rule.round(3))
assert set(test_data.extra["occlusion"]) == {"LVO", "other"}
assert rule[["core_f1", "penumbra_f1"]].apply(lambda c: c.between(0, 1)).all().all()

# %% [markdown]
# ## 4. One input per map, plus a clinical input
# Early fusion: each map is its own named input, and the five are concatenated before the first
# convolution, so every filter sees every map. NIHSS (scaled to 0..1) enters at the bottleneck.
# The loader yields a dict keyed by input name; it is a `keras.utils.PyDataset`, so the same code
# runs on TensorFlow, JAX and PyTorch.

# %%
weights = multiclass.class_weights(train_data.masks, len(perfusion.CLASS_NAMES), power=WEIGHT_POWER)
TRAIN = dataclasses.replace(TRAIN, class_weights=weights)
for clinical in (False, True):
    m = perfusion.build_perfusion_model(dataclasses.replace(TRAIN, use_clinical=clinical), PROFILE.image_size)
    print(f"clinical={clinical!s:5s} inputs {[t.name for t in m.inputs]} · {models.count_params(m):,d} parameters")
x, y = perfusion.loader_for(train_data, TRAIN, training=True)[0]
print({k: v.shape for k, v in x.items()}, "→ targets", y.shape)
print("class weights", dict(zip(perfusion.CLASS_NAMES, weights)))
assert sorted(x) == sorted([*perfusion.MAP_NAMES, "clinical"]) and y.shape[-1] == 4
assert weights[3] > weights[2] > weights[1]   # core rarest, then penumbra
del m

# %% [markdown]
# ## 5. Pretraining on other patients
# As in notebook 05, a network first learns the task on a *source* set — here another cohort of
# phantom patients (another seed) — and is then fine-tuned on ours. The pool keeps one compiled
# copy per set of trainable blocks, so the many runs below do not each wait for Keras to compile.

# %%
source = ctp_phantom.perfusion_phantom(SOURCE, MAPS, progress=False)
source_split = splitting.random_split(source, test=0, val=0.2, seed=0)
pool = perfusion.ModelPool()
pretrained = perfusion.train_perfusion(
    perfusion.build_perfusion_model(TRAIN, PROFILE.image_size), source_split.dataset(source, "train"),
    source_split.dataset(source, "val"), TRAIN, "scratch", pool=pool, run_dir=RUNS / "pretrain", overwrite=True)
display(pretrained.history[["epoch", "loss", "val_loss", "val_dice_penumbra", "val_dice_core"]].round(3))
assert np.isfinite(pretrained.history["loss"]).all()
assert pretrained.history["loss"].iloc[-1] < pretrained.history["loss"].iloc[0]

# %% [markdown]
# ## 6. Frozen, unfrozen, gradual — and from scratch
# Every schedule starts from the same pretrained weights (scratch from random ones), trains the
# same epochs on the same slices with each seed, and is scored on the same test patients.
# *Frozen*: the encoder keeps its pretrained weights. *Unfrozen*: everything trains, at a lower rate.
# *Gradual*: frozen first, then the deepest blocks join every few epochs.

# %%
rows, finals = [], {}
for schedule in SCHEDULES:
    for seed in SEEDS:
        config = dataclasses.replace(TRAIN, seed=seed)
        start = (perfusion.build_perfusion_model(config, PROFILE.image_size) if schedule == "scratch"
                 else perfusion.copy_model(pretrained.model))
        run = perfusion.train_perfusion(start, train_data, val_data, config, schedule, pool=pool)
        pred = perfusion.predict_labels(run.model, test_data, pool=pool)
        finals[(schedule, seed)] = (run, pred)
        for row in perfusion.group_scores(test_data, pred).to_dict("records"):
            rows.append({"schedule": schedule, "seed": seed, **row})

# %% [markdown]
# The study's table: core and penumbra F1 per schedule and occlusion group, as mean ± sd over seeds, and
# for each schedule the group it segments better.

# %%
scores = pd.DataFrame(rows)
study = perfusion.schedule_table(scores)
display(study[["Core F1", "Penumbra F1", "seeds"]])
for metric, name in (("core_mean", "core"), ("penumbra_mean", "penumbra")):
    higher = study[metric].unstack("group").idxmax(axis=1).reindex(list(SCHEDULES))
    print(f"{name} F1 higher for: "
          + ", ".join(f"{schedule} → {group}" for schedule, group in higher.items()))
print(f"{pool.compiles} compilations for {len(SCHEDULES) * len(SEEDS) + 1} runs")
report.record(**{f"{schedule}_{name}_f1": study.loc[schedule, f"{name}_mean"].mean()
                 for schedule in SCHEDULES for name in ("core", "penumbra")})
assert len(scores) == len(SCHEDULES) * len(SEEDS) * 2
assert scores[["core_f1", "penumbra_f1"]].apply(lambda c: c.between(0, 1)).all().all()
# learned: every schedule's core and penumbra F1 >= 0.6 in both groups (quick runs: 0.73-0.89, sd over seeds <= 0.03)
assert not CHECK_LEARNING or (study[["core_mean", "penumbra_mean"]] >= 0.6).all().all()

# %% [markdown]
# The same table as a chart, with the classical rule as a dashed line in each group's colour. The
# error bars are the sd over seeds: how much training noise moves a bar, on the same test patients
# every time. They cannot show the other uncertainty: with a handful of test patients per group
# (step 3 prints how many), which patients landed in the test set moves every bar and every dashed
# line, and one patient more or less could change the picture.
#
# Compare each bar with its dashed line (the rule's figures are in the table of step 3). Where the
# rule comes out ahead, that is what to expect: these maps were *drawn* from those very thresholds,
# so the rule is nearly the ground truth up to noise, while a network has to learn it from a few
# dozen slices. On real scans the labels come from follow-up imaging, not from the thresholds, and
# the rule has no such advantage.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True, layout="constrained")
for ax, metric, title in zip(axes, ("core_mean", "penumbra_mean"), ("core F1", "penumbra F1")):
    sd = scores.groupby(["schedule", "group"], sort=False)[metric.replace("_mean", "_f1")].std().fillna(0)
    wide = study[metric].unstack("group")[list(perfusion.OCCLUSION_GROUPS)]
    wide.plot.bar(ax=ax, yerr=sd.unstack("group").loc[wide.index, wide.columns], capsize=3, rot=0)
    for k, group in enumerate(wide.columns):
        ax.axhline(rule.set_index("group").loc[group, metric.replace("_mean", "_f1")], ls="--",
                   color=f"C{k}", lw=1)
    ax.set(title=f"{title} (dashed: threshold rule)", ylim=(0, 1), xlabel="")
    ax.get_legend().remove()
axes[0].set_ylabel("F1 (bars: mean ± sd over seeds)")
axes[1].legend(title="occlusion group", loc="upper left", bbox_to_anchor=(1.01, 1), framealpha=0.9)
plt.show()
assert set(wide.columns) == {"LVO", "other"}

# %% [markdown]
# ## 7. What the network sees and predicts
# Truth, the threshold rule and the gradual-schedule network on the test slice with the largest
# core of each group (brain grey, penumbra yellow, core red).

# %%
run, pred = finals[("gradual", SEEDS[0])]
threshold = perfusion.threshold_segmentation(test_data)
groups = test_data.extra["occlusion"]
cores = (test_data.masks == 3).sum(axis=(1, 2))
picks = [int(np.argmax(np.where(groups == g, cores, -1))) for g in ("LVO", "other")]

# %%
cmap = plt.matplotlib.colors.ListedColormap(["black", "#555555", "#f2c94c", "#d62728"])
fig, axes = plt.subplots(len(picks), 4, figsize=(11, 2.9 * len(picks)))
for r, i in enumerate(picks):
    tmax = ctp_phantom.to_physical(test_data.images[i])["tmax"]
    axes[r, 0].imshow(tmax, cmap="turbo", vmin=0, vmax=14)
    axes[r, 0].set_title(f"{test_data.case_ids[i]} Tmax ({groups[i]})", fontsize=8)
    for c, (labels, name) in enumerate(((test_data.masks[i], "truth"), (threshold[i], "threshold rule"),
                                        (pred[i], "network (gradual)")), start=1):
        axes[r, c].imshow(labels, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        axes[r, c].set_title(name, fontsize=8)
for ax in axes.ravel():
    ax.set_axis_off()
plt.show()
assert pred.shape == test_data.masks.shape and pred.max() <= 3

# %% [markdown]
# The gradual run's history: its phases, the encoder blocks that trained in each, and the learning rate.
# Phases only move forward, and the first one trains no encoder block.

# %%
history = run.history
print(history[["epoch", "phase", "trainable_blocks", "learning_rate", "val_loss"]].to_string(index=False))
assert history["phase"].is_monotonic_increasing and history["trainable_blocks"].iloc[0] == ""

# %% [markdown]
# ## Try it: one schedule, your settings
# Train one fine-tuning run with or without the clinical input, or with another focal Tversky
# exponent (it starts when you press the button). The pretrained network has a clinical input, so
# with `use_clinical=False` every schedule starts from random weights: "frozen" and "gradual" then
# freeze a randomly initialised encoder, and only the blocks that train can learn.

# %%
def fine_tune_one(schedule="gradual", use_clinical=True, gamma=0.75, epochs=EPOCHS):
    config = dataclasses.replace(TRAIN, use_clinical=use_clinical, gamma=gamma, num_epochs=epochs)
    start = (perfusion.build_perfusion_model(config, PROFILE.image_size) if schedule == "scratch" or not use_clinical
             else perfusion.copy_model(pretrained.model))
    run = perfusion.train_perfusion(start, train_data, val_data, config, schedule, pool=pool)
    display(perfusion.group_scores(test_data, perfusion.predict_labels(run.model, test_data, pool=pool)).round(3))

display(widgets.interactive(
    fine_tune_one, {"manual": True, "manual_name": "Train"},
    schedule=widgets.Dropdown(options=list(SCHEDULES), value="gradual"),
    use_clinical=widgets.Checkbox(value=True),
    gamma=widgets.FloatSlider(value=0.75, min=0.5, max=2.0, step=0.25),
    epochs=widgets.IntSlider(value=EPOCHS, min=1, max=100),
))

# %% [markdown]
# ## Exercises
# 1. Train without the clinical input (`use_clinical=False`, from scratch: the pretrained model
#    has a clinical input). Does NIHSS help the core, the penumbra, or neither?
# 2. Set `MAPS = ctp_phantom.PerfusionConfig(noise=2.0)`. Which suffers more, the threshold rule or
#    the network? Why would a network trained on one scanner's noise struggle on another's?
# 3. Drop the MIP channel (build the model with four inputs). Which class loses most?
# 4. Change `SOURCE` to `seed=0` (the same patients as the target set): what does pretraining on
#    the test patients do to the table, and why is that cheating?
# 5. Double `EPOCHS`. Which schedules gain, and does any network reach the threshold rule?
#
# ## Summary
# - Core = CBF < 30 % of normal with CBV reduced; penumbra = Tmax > 6 s with CBV kept; the core
#   lies inside the hypoperfused region.
# - A multi-input U-Net takes each map (and a clinical score) as a named input; a dict-yielding
#   `PyDataset` feeds it on any backend.
# - Compare fine-tuning schedules from the same start, per class and per occlusion group, as mean
#   ± sd over seeds — and against the classical threshold rule.
#
# **Next →** [09 · 3-D reconstruction](09_3d_reconstruction.ipynb)
