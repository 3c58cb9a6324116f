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
# # 05 · Transfer learning for few-shot lesions
# Pretrain where labels are plentiful, fine-tune where they are few — then measure whether it helped.
#
# **Learning goals**
# - Freeze, unfreeze and gradually unfreeze the encoder of a U-Net, and know why Keras needs a
#   recompile and what happens to batch norm.
# - Pretrain on a larger source task (hemorrhage phantoms; optionally real CT-ICH) and fine-tune on
#   a few ischemic slices.
# - Read a learning curve (Dice vs number of training slices, mean ± sd over seeds) and say honestly
#   whether transfer helped.
#
# **Runtime**: about 3 minutes on a 2-core CPU (quick profile: 64 px, 162 source slices, 8
# fine-tuning epochs at batch 4, 2 seeds); the full profile (the study's U-Net at 256 px, a larger
# source set, 3 seeds, ImageNet and CT-ICH sections) needs a GPU (1–2 hours).

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import dataclasses
import itertools

import ipywidgets as widgets
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from strokekit import models, paths, preprocess, report, train, transfer
from strokekit import split as splitting
from strokekit.augment import STUDY_AUGMENT
from strokekit.config import get_profile, phantom_config, transfer_settings
from strokekit.io import load_source_dataset
from strokekit.phantom import generate_phantom, phantom_source
from strokekit.runs import RunFolder

# %%
print(f"keras {keras.__version__} · backend {keras.backend.backend()}")

# %% [markdown]
# ## Parameters
# The only cell that sets values; `STROKEKIT_PROFILE=full` makes everything bigger.

# %% tags=["parameters"]
PROFILE = get_profile()
SIZES = transfer_settings(PROFILE)  # shots, epochs, source patients, ... (config.py; printed below)
TARGET_PHANTOM = phantom_config(PROFILE, lesion_types=("ischemic",))  # the course phantom, infarcts only
SOURCE_SEED = 1000                   # another seed than the target's: other heads, no shared patient
BASE = train.TrainConfig(
    arch="unet", filters=PROFILE.filters, activation="relu", batch_norm=True, image_size=PROFILE.image_size,
    loss="soft_dice",  # in ~100 steps BCE first teaches "no lesion anywhere" and small infarcts stay lost
    learning_rate=3e-3, batch_size=SIZES.fine_tune_batch, num_epochs=SIZES.fine_tune_epochs,  # all phases
    windows=("brain", "stroke", "subdural"),  # three windows as channels: blood, early ischemia, both
    augment=STUDY_AUGMENT, early_stopping_patience=10, reduce_lr_patience=5)
PRETRAIN = dataclasses.replace(BASE, batch_size=PROFILE.batch_size, num_epochs=PROFILE.num_epochs + 2)
LR_SCALE = 0.3                      # learning-rate factor whenever encoder blocks train
SCHEDULES = {
    "frozen": transfer.FineTuneSchedule("frozen"),
    "unfrozen": transfer.FineTuneSchedule("unfrozen", lr_scale=LR_SCALE),
    # one more encoder block every few epochs (the quick profile ends before the shallow ones open)
    "gradual": transfer.FineTuneSchedule("gradual", lr_scale=LR_SCALE,
                                         unfreeze_every=max(3, BASE.num_epochs // (len(PROFILE.filters) + 1))),
}
SEEDS = tuple(range(PROFILE.num_seeds))
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floors (measured in the quick profile)
IMAGENET_ENCODER = "vgg16"
SPLIT_FILE = paths.data_dir() / "splits" / "phantom_ischemic_split.json"
RUNS = paths.runs_dir() / "05_transfer_learning"

# %%
# The profile's sizes (config.transfer_settings): change one in the cell above, right after `SIZES = ...` (BASE reads
# it), e.g. SIZES = dataclasses.replace(SIZES, shots=(4, "all")).
print(PROFILE.name, SIZES, BASE, sep="\n")
print(f"batch-norm momentum of the U-Nets pretrained, fine-tuned and trained from scratch here: "
      f"{SIZES.bn_momentum} (SIZES; new_model of section 2 sets it, overriding BASE's {BASE.bn_momentum})")

# %% [markdown]
# ## 1. Source and target: two lesion types, no shared patient
# The **target** is what we care about and have little of: ischemic infarcts (darker than brain,
# by a few HU). The **source** is a larger labelled set of a *related* task: hemorrhages (brighter
# than brain), from other synthetic patients. One study pretrained on a large tumour set for the
# same reason. Two rules keep the comparison fair: no source patient is a target patient (other
# phantom seed, ids `S01`… instead of `P01`…), and the target split is by patient and saved.

# %%
target = generate_phantom(TARGET_PHANTOM, progress=False)
split = splitting.load_or_make_split(target, SPLIT_FILE, seed=0)
splitting.check_leakage(split)
target_train, target_val = split.dataset(target, "train"), split.dataset(target, "val")

# %% [markdown]
# The source comes from another phantom seed. Its patients are exchangeable, so the first tenth of them
# validate the pretraining; the checks below confirm that no patient is shared and which lesions each set holds.

# %%
source = phantom_source(n_patients=SIZES.source_patients, seed=SOURCE_SEED, target=TARGET_PHANTOM,
                        progress=False)
n_val = max(2, len(source.patients()) // 10)   # source patients are exchangeable: hold out the first 10 %
source_val = source.select_patients(source.patients()[:n_val])
source_train = source.select_patients(source.patients()[n_val:])
shared = set(source.patients()) & set(target.patients())
print(f"target: {len(target_train)} train · {len(target_val)} val slices ({len(target.patients())} patients, "
      f"test kept for notebook 06)")
print(f"source: {len(source_train)} train · {len(source_val)} val slices ({len(source.patients())} patients); "
      f"shared patients: {sorted(shared)}")
assert not shared and len(source_train) > 3 * len(target_train)
assert set(target.extra["lesion_type"]) == {"ischemic", "none"}
assert set(source.extra["lesion_type"]) == {"hemorrhagic", "none"}

# %%
def lesion_examples(data, count=4):
    area = data.lesion_area()
    return list(np.argsort(-area, kind="stable")[:count])

fig, axes = plt.subplots(2, 4, figsize=(11, 5.8))
rows = [("source: hemorrhage", source_train, "brain"), ("target: infarct", target_train, "stroke")]
for ax_row, (name, data, window) in zip(axes, rows):
    for ax, i in zip(ax_row, lesion_examples(data)):
        ax.imshow(preprocess.window_hu(data.images[i], window), cmap="gray")
        ax.contour(data.masks[i], levels=[0.5], colors="yellow", linewidths=0.8)
        ax.set_title(f"{name} ({window} window)\n{data.case_ids[i]}", fontsize=8)
        ax.set_axis_off()
fig.suptitle("largest lesions of each set; yellow = lesion outline")
plt.show()

# %% [markdown]
# ## 2. Freezing, the Keras 3 way
# Every layer of the kit's U-Net has a name (`enc1_conv1`, …, `bottleneck_conv2`, `dec1_up`, `head`),
# and `models.encoder_blocks` groups the encoder into blocks. Three facts matter:
#
# - `layer.trainable = False` stops the optimizer from changing a layer's weights;
# - Keras fixes the list of trainable weights when the model is **compiled**, so changing a flag
#   needs a recompile (`transfer.recompile`) — that is why gradual unfreezing below is a series of
#   short training phases, not a callback flipping flags mid-training;
# - on a **batch-norm** layer the same flag also switches it to inference mode: it normalises with
#   the moving statistics learned on the source and stops updating them. The schedules keep the
#   encoder's batch norm frozen even when its convolutions train (`keep_batchnorm_frozen=True`):
#   a few dozen target slices give noisy batch statistics.
#
# A fourth fact bites short runs: a batch-norm layer's moving mean and variance follow the batches
# slowly (Keras' momentum 0.99 averages over a few hundred steps). After the ~100 steps of a CPU run
# they are still near their starting values, and the network that looked fine during training
# fails at inference, which uses them. So every network here is built by `new_model`, which sets
# the momentum `SIZES.bn_momentum` of the parameters cell (`models.set_batchnorm_momentum`; 0.8 in
# the quick profile) — not the `bn_momentum` field of `BASE` printed above, which `new_model` overrides.
# Section 4 checks in the trained models that all of this really happened.

# %%
def new_model(seed=0):
    """The U-Net of BASE (weights drawn from `seed`) with the batch-norm momentum of the parameters."""
    model = models.build_model(BASE.arch, seed=seed, **BASE.model_kwargs())
    models.set_batchnorm_momentum(model, SIZES.bn_momentum)
    return model

# %% [markdown]
# Build one and freeze its whole encoder: how many of its parameters are left to train, and which
# batch-norm layers switched to inference mode?

# %%
demo = new_model()
blocks = [name for name, _ in models.encoder_blocks(demo)]
total = models.count_params(demo)
frozen_layers = transfer.freeze(demo)              # no argument: the whole encoder
trainable = models.count_params(demo, trainable_only=True)
print(f"encoder blocks, shallow to deep: {blocks}")
print(f"frozen: {len(frozen_layers)} layers, from {frozen_layers[0]} to {frozen_layers[-1]}")
print(f"{total:,d} parameters, {trainable:,d} trainable with the encoder frozen ({trainable / total:.0%})")
assert transfer.trainable_blocks(demo) == () and 0 < trainable < total
assert not demo.get_layer("enc1_bn1").trainable and demo.get_layer("dec1_bn1").trainable
assert demo.get_layer("dec1_bn1").momentum == SIZES.bn_momentum
del demo

# %% [markdown]
# Gradual unfreezing opens the encoder **deepest block first** (the most task-specific features),
# one block every few epochs, and lowers the learning rate once pretrained weights start to move.
# Here is its plan for our runs:

# %%
plan = SCHEDULES["gradual"].phases(blocks, BASE.num_epochs)
display(pd.DataFrame([{"epochs": f"{p.start_epoch + 1}–{p.end_epoch}",
                       "trainable encoder blocks": ", ".join(p.blocks) or "none",
                       "learning rate": BASE.learning_rate * p.lr_factor} for p in plan]))
assert plan[0].blocks == () and plan[1].blocks == (blocks[-1],)
assert plan[-1].end_epoch == BASE.num_epochs

# %% [markdown]
# ## 3. Pretrain on the source
# An ordinary training run (notebook 04's `train.train`) on the hemorrhage set; its best checkpoint
# is saved as `model.keras` and reloaded in Keras safe mode. Before fine-tuning we also try the
# pretrained network **as is** on the ischemic target ("zero-shot"): it has learned to find
# *bright* lesions, and infarcts are dark.

# %%
PRETRAINED = transfer.pretrain_on_source(PRETRAIN, source_train, source_val, run_dir=RUNS / "pretrain",
                                         model=new_model(PRETRAIN.seed), progress=False, overwrite=True)
source_metrics = RunFolder.open(PRETRAINED.parent).metrics
pretrained = transfer.load_pretrained(PRETRAINED)
zero_shot = train.evaluate_arrays(pretrained, *train.to_arrays(BASE, target_val), BASE.threshold)
print(f"source (hemorrhage) validation Dice after {source_metrics['epochs_run']} epochs: {source_metrics['dice']:.3f}")
print(f"the same network on the ischemic target, before fine-tuning: Dice {zero_shot['dice']:.3f}")
assert PRETRAINED.is_file() and 0.0 <= source_metrics["dice"] <= 1.0 and 0.0 <= zero_shot["dice"] <= 1.0
del pretrained

# %% [markdown]
# ## 4. Fine-tuning schedules against training from scratch
# Every method is trained on the **same** target slices with the **same** seeds: for each seed the
# training subset, loader order and augmentation are identical, so the methods differ only in
# where they start (random or pretrained weights) and in which encoder blocks train. `shots` is
# the number of target training slices, drawn by patient (few-shot means few annotated patients).
# `SIZES.curve_methods` get every number of shots; the other schedules are trained on all slices.
# Each run writes its own folder (config, `split.json` with the slices it drew, history, model,
# metrics) under `RUNS / "curve"`; `overwrite=True` replaces the runs of an earlier execution
# (without it, a folder that already holds a run stops the training with an error).

# %%
methods = {"scratch": (new_model, transfer.SCRATCH),
           **{name: (PRETRAINED, schedule) for name, schedule in SCHEDULES.items()}}
on_curve = {name: start for name, start in methods.items() if name in SIZES.curve_methods}
at_all = {name: start for name, start in methods.items() if name not in SIZES.curve_methods}
curve = pd.concat([
    transfer.learning_curve(BASE, target_train, target_val, shots=SIZES.shots, seeds=SEEDS, methods=on_curve,
                            run_root=RUNS / "curve", progress=False, overwrite=True),
    transfer.learning_curve(BASE, target_train, target_val, shots=("all",), seeds=SEEDS, methods=at_all,
                            run_root=RUNS / "curve", progress=False, overwrite=True) if at_all else None,
], ignore_index=True)
n_all = len(target_train)
display(train.summarize(curve[curve.shots == n_all], by=["method"]))
assert len(curve) == (len(on_curve) * len(SIZES.shots) + len(at_all)) * len(SEEDS)
assert curve[["dice", "iou", "sensitivity", "specificity"]].stack().between(0, 1).all()

# %% [markdown]
# Each run left a folder with its history. The gradual run shows the schedule at work: the
# trainable blocks and the learning rate per epoch.

# %%
gradual_run = curve[(curve.method == "gradual") & (curve.shots == n_all)].iloc[0]["run_dir"]
history = RunFolder.open(gradual_run).history.fillna({"trainable_blocks": "none"})
display(history[["epoch", "phase", "trainable_blocks", "learning_rate", "loss", "val_loss", "val_dice"]].round(4))
opened = [set(b.split("+")) - {"none"} for b in history["trainable_blocks"]]
assert all(a <= b for a, b in itertools.pairwise(opened))     # blocks only ever open, never close
assert history["epoch"].tolist() == list(range(1, len(history) + 1))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name in methods:
    runs = curve[(curve.method == name) & (curve.shots == n_all)]["run_dir"]
    logs = [RunFolder.open(r).history for r in runs]
    n = min(map(len, logs))
    for ax, column in zip(axes, ("loss", "val_loss")):
        ax.plot(np.arange(1, n + 1), np.mean([h[column].to_numpy()[:n] for h in logs], axis=0), marker="o", label=name)
for ax, title in zip(axes, ("training loss", "validation loss")):
    ax.set(title=f"{title} (mean over seeds, all {n_all} slices)", xlabel="epoch", xticks=np.arange(1, n + 1))
axes[0].legend()
plt.show()

# %% [markdown]
# Did freezing really freeze? Compare the saved models of the frozen and unfrozen runs with the
# pretrained network they started from: the first encoder convolution, its batch norm (scale,
# offset, moving mean and variance) and the last decoder convolution.

# %%
start = transfer.load_pretrained(PRETRAINED)
watch = ("enc1_conv1", "enc1_bn1", "dec1_conv1")
check = {}
for name in ("frozen", "unfrozen"):
    run = curve[(curve.method == name) & (curve.shots == n_all) & (curve.seed == SEEDS[0])].iloc[0]["run_dir"]
    tuned = transfer.load_pretrained(f"{run}/model.keras")
    check[name] = {layer: "changed" if any(not np.array_equal(a, b) for a, b in zip(
        start.get_layer(layer).get_weights(), tuned.get_layer(layer).get_weights())) else "identical"
        for layer in watch}
display(pd.DataFrame(check).T)
assert start.get_layer("enc1_bn1").momentum == tuned.get_layer("dec1_bn1").momentum == SIZES.bn_momentum
assert check["frozen"] == {"enc1_conv1": "identical", "enc1_bn1": "identical", "dec1_conv1": "changed"}
assert check["unfrozen"] == {"enc1_conv1": "changed", "enc1_bn1": "identical", "dec1_conv1": "changed"}
del start, tuned

# %% [markdown]
# ## 5. The learning curve
# Dice against the number of target training slices, mean ± sd over seeds (dots are single
# runs; methods run on all slices only appear as single points). Transfer is worth its trouble
# where its curve lies above the scratch curve by more than the spread between seeds. The literature
# expects that on the left, where target data are scarcest; whether this run shows it is for the
# verdicts of section 9, per number of slices. A rise measured from a Dice of about 0 (a method that
# found nothing with the fewest slices) is simply the Dice with all slices: the print gives both ends.

# %%
fig = transfer.plot_learning_curve(curve, metric="dice")
display(fig)
summary = transfer.summarize_curve(curve)
assert len(summary) == len(on_curve) * len(SIZES.shots) + len(at_all) and (summary["seeds"] == len(SEEDS)).all()
at_all_shots = summary[summary["shots"] == n_all].set_index("method")["mean"]
fewest = summary["shots"].min()
at_fewest = summary[summary["shots"] == fewest].set_index("method")["mean"]
rises = {m: at_all_shots[m] - at_fewest[m] for m in SIZES.curve_methods}
print(f"best schedule with all {n_all} slices: {at_all_shots.idxmax()} (mean Dice {at_all_shots.max():.3f}); "
      f"rise from {fewest} to all {n_all} slices: "
      + ", ".join(f"{m} {v:+.3f} ({at_fewest[m]:.3f} → {at_all_shots[m]:.3f})" for m, v in rises.items()))
# Quick-profile floors: the best schedule learns the infarcts (>= 0.4) and more slices help every curve.
assert not CHECK_LEARNING or (at_all_shots.max() >= 0.4 and all(v > 0 for v in rises.values()))
report.record(best_schedule=at_all_shots.idxmax(), best_schedule_dice=at_all_shots.max(),
              scratch_dice=at_all_shots["scratch"], **{f"curve_rise_{m}": v for m, v in rises.items()})

# %% [markdown]
# What the best network predicts: validation slices of the target (infarcts) with the largest lesions,
# the truth on top and the prediction of the best schedule's first seed below.

# %%
best_run = curve[(curve.method == at_all_shots.idxmax()) & (curve.shots == n_all) & (curve.seed == SEEDS[0])].iloc[0]
x_val, y_val = train.to_arrays(BASE, target_val)
shown = np.argsort(-(y_val > 0).reshape(len(y_val), -1).sum(axis=1), kind="stable")[:4]
prob = train.predict_numpy(transfer.load_pretrained(f"{best_run['run_dir']}/model.keras"), x_val[shown])
train.save_preview(x_val[shown], y_val[shown], prob, RUNS / "best_predictions.png",
                   title=f"{best_run['method']}, all {n_all} slices, seed {SEEDS[0]}: truth (top), prediction (bottom)")
plt.figure(figsize=(9, 4.8))
plt.imshow(plt.imread(RUNS / "best_predictions.png"))
plt.axis("off")
plt.show()
assert prob.shape[:3] == y_val[shown].shape

# %% [markdown]
# ## 6. Try it yourself
# Pick a schedule, a learning rate and a number of target slices; training starts when you press
# the button. (The study fine-tuned its pretrained U-Net at a learning rate of 1e-5 — try it.)

# %%
def try_schedule(schedule="unfrozen", learning_rate=BASE.learning_rate, shots=n_all, epochs=BASE.num_epochs, seed=0):
    config = dataclasses.replace(BASE, learning_rate=learning_rate, num_epochs=epochs, seed=seed)
    subset = transfer.few_shot_subset(target_train, shots, seed)
    if schedule == "scratch":
        model, plan = new_model(seed), transfer.SCRATCH
    else:
        model, plan = transfer.load_pretrained(PRETRAINED), SCHEDULES[schedule]
    folder = train.make_run_dir(f"{schedule}-k{shots}-s{seed}", RUNS / "try")
    result = transfer.fine_tune(model, config, subset, target_val, plan, run_dir=folder, progress=True)
    display(result.history[["epoch", "trainable_blocks", "learning_rate", "loss", "val_loss", "val_dice"]].round(4))
    print({k: round(v, 3) for k, v in result.metrics.items()}, "· run folder:", folder)

# %% [markdown]
# The panel: one control per argument of `try_schedule`; nothing trains until you press **Train**.

# %%
display(widgets.interactive(
    try_schedule, {"manual": True, "manual_name": "Train"},
    schedule=widgets.Dropdown(options=["scratch", *SCHEDULES], value="unfrozen"),
    learning_rate=widgets.FloatLogSlider(value=BASE.learning_rate, base=10, min=-5, max=-2),
    shots=widgets.IntSlider(value=n_all, min=1, max=n_all),
    epochs=widgets.IntSlider(value=BASE.num_epochs, min=1, max=10 * BASE.num_epochs),
    seed=widgets.IntSlider(value=0, min=0, max=9),
))

# %% [markdown]
# ## 7. ImageNet encoders
# Another study used U-Nets whose encoder is a ResNet pretrained on ImageNet photographs. The kit
# builds such a network around `keras.applications` (VGG16 or ResNet50): our three CT windows
# take the place of the red, green and blue channels (a single grey channel would be copied to
# all three), and the encoder's own preprocessing runs inside the model. It never downloads:
# if the weights file is not in the Keras cache (`~/.keras/models`), the encoder starts from
# **random** weights and one warning says so — the message is printed below either way.

# %%
imagenet_model, found = models.imagenet_unet(IMAGENET_ENCODER,
                                             input_shape=(BASE.image_size, BASE.image_size, len(BASE.windows)),
                                             seed=0)
print(found.message)
print(f"ImageNet weights found: {found.weights_found}")
encoder_names = [name for name, _ in models.encoder_blocks(imagenet_model)]
total = models.count_params(imagenet_model)
transfer.freeze(imagenet_model)
trainable = models.count_params(imagenet_model, trainable_only=True)
print(f"{IMAGENET_ENCODER} U-Net: {total:,d} parameters; encoder blocks {encoder_names}; "
      f"{trainable:,d} trainable with the encoder frozen")
assert found.weights_found == (found.weights_path is not None)
assert encoder_names[0] == ("block1" if IMAGENET_ENCODER == "vgg16" else "conv1") and 0 < trainable < total

# %%
if not SIZES.train_imagenet:
    print(f"Training the {IMAGENET_ENCODER} U-Net is left to the full profile (a GPU job): "
          f"{total:,d} parameters is "
          f"{total / models.count_params(models.build_model(BASE.arch, **BASE.model_kwargs())):.0f}x "
          "the quick profile's U-Net.")
else:
    imagenet_config = dataclasses.replace(BASE, arch="pretrained_unet")
    imagenet_curve = transfer.learning_curve(
        imagenet_config, target_train, target_val, shots=SIZES.shots, seeds=SEEDS,
        methods={f"{IMAGENET_ENCODER} frozen": (imagenet_model, SCHEDULES["frozen"]),
                 f"{IMAGENET_ENCODER} gradual": (imagenet_model, SCHEDULES["gradual"])},
        run_root=RUNS / "imagenet", progress=False, overwrite=True)

# %% [markdown]
# When it trained (full profile), its runs are summarised and its learning curve is drawn next to training
# from scratch (the same slices and seeds).

# %%
if SIZES.train_imagenet:
    both = pd.concat([curve[curve.method == "scratch"], imagenet_curve], ignore_index=True)
    display(train.summarize(both[both.shots == n_all], by=["method"]))
    display(transfer.plot_learning_curve(both))
    if not found.weights_found:
        print("NB: these 'ImageNet' encoders started from random weights (see the message above).")
    assert len(imagenet_curve) == 2 * len(SIZES.shots) * len(SEEDS)

# %% [markdown]
# ## 8. Optional: real CT-ICH as the source (full profile)
# The shared CT-ICH slices are real head CTs with *traumatic* intracranial hemorrhage — not
# stroke. As a source they bring real anatomy and scanner noise, but they were stored already
# windowed (8-bit, about L40/W120), so the network sees a slightly different intensity mapping
# than on the phantom. Only in the full profile, and skipped cleanly when the data are absent.

# %%
ctich_path = paths.ctich_dir()
if not SIZES.ctich_source:
    print("skipped: CT-ICH pretraining runs in the full profile only (STROKEKIT_PROFILE=full).")
elif ctich_path is None:
    print("skipped: ../shared/data/ct-ich is absent (set $STROKEKIT_CTICH to use it).")
else:
    ctich = load_source_dataset("ctich", image_size=BASE.image_size, progress=False,
                                max_patients=SIZES.ctich_patients)
    held_out = ctich.patients()[: max(2, len(ctich.patients()) // 10)]
    ctich_val = ctich.select_patients(held_out)
    ctich_train = ctich.select_patients([p for p in ctich.patients() if p not in held_out])
    ctich_model = transfer.pretrain_on_source(PRETRAIN, ctich_train, ctich_val, run_dir=RUNS / "pretrain-ctich",
                                              progress=False, overwrite=True)

# %% [markdown]
# Fine-tune the CT-ICH network with the unfrozen schedule and compare it with training from scratch and
# with the phantom-pretrained network.

# %%
if SIZES.ctich_source and ctich_path is not None:
    ctich_curve = transfer.learning_curve(
        BASE, target_train, target_val, shots=SIZES.shots, seeds=SEEDS,
        methods={"ct-ich unfrozen": (ctich_model, SCHEDULES["unfrozen"])}, run_root=RUNS / "ctich", progress=False,
        overwrite=True)
    both = pd.concat([curve[curve.method.isin(["scratch", "unfrozen"])], ctich_curve], ignore_index=True)
    display(transfer.plot_learning_curve(both))
    display(transfer.transfer_effect(both, "ct-ich unfrozen"))
    assert not set(ctich.patients()) & set(target.patients())

# %% [markdown]
# ## 9. What the numbers say
# The verdicts below are computed from this run, not written in advance. A method "helped" at a
# given number of slices only if it beat scratch **for every seed** (same slices, same
# augmentation) and by at least 0.02 Dice on average; otherwise the honest answer is "no clear
# difference" (or "hurt"). Where neither the transfer run nor scratch reached a mean Dice of
# `transfer.LEARNED_DICE` (0.1), there is no verdict: two networks that found nothing differ by noise.
# Two seeds are a small sample: this describes these runs, it does not test a hypothesis (notebook 06
# does that properly).

# %%
effects = pd.concat([transfer.transfer_effect(curve, name).assign(schedule=name) for name in SCHEDULES],
                    ignore_index=True)
words = {"helped": "helped", "hurt": "hurt", "no clear difference": "made no clear difference",
         "one seed: cannot tell": "cannot be judged from one seed",
         "neither learned: cannot judge": "cannot be judged: neither it nor scratch learned"}
for row in effects.itertuples():
    print(f"{row.schedule:>8s}, {row.shots:3d} slices: transfer {words[row.verdict]} "
          f"(Dice {row.method_mean:.3f} vs scratch {row.baseline_mean:.3f}, paired difference "
          f"{row.mean_difference:+.3f} ± {row.sd_difference:.3f}, better in {row.improved_seeds}/{row.seeds} seeds)")

# %% [markdown]
# Two more facts for the verdict: which schedules started ahead of scratch (a lower training loss after the
# first epoch), and the best mean Dice of any method at any number of slices.

# %%
first_loss = {name: np.mean([RunFolder.open(r).history["loss"].iloc[0]
                             for r in curve[(curve.method == name) & (curve.shots == n_all)]["run_dir"]])
              for name in methods}
ahead = [name for name in SCHEDULES if first_loss[name] < first_loss["scratch"]]
best = summary.loc[summary["mean"].idxmax()]
named = {v: [f"{r.schedule} at {r.shots} slices" for r in effects.itertuples() if r.verdict == v] for v in words}
helped, hurt = named["helped"], named["hurt"]

# %% [markdown]
# The verdict in words, by fixed rules: first whether any method learned at all (a best mean Dice of
# at least `transfer.LEARNED_DICE`), then where a schedule helped or hurt, and where no verdict was possible.

# %%
if best["mean"] < transfer.LEARNED_DICE:
    verdict = (f"No method reached a mean Dice of {transfer.LEARNED_DICE} (best {best['mean']:.3f}): the networks "
               "have barely begun to find infarcts, so these verdicts say more about noise than about transfer.")
elif not helped and not hurt:
    verdict = ("Pretraining on hemorrhages did not help here: no schedule beat training from scratch "
               "consistently across seeds at any number of slices.")
else:
    verdict = (f"Pretraining on hemorrhages helped with: {', '.join(helped) or 'no schedule'}; "
               f"it hurt with: {', '.join(hurt) or 'no schedule'}.")
if named["neither learned: cannot judge"]:
    verdict += f" No verdict where neither learned: {', '.join(named['neither learned: cannot judge'])}."
if transfer.LEARNED_DICE <= best["mean"] < 0.3:
    verdict += (f" Keep in mind that every Dice here is low (best {best['mean']:.3f}): {BASE.num_epochs} epochs "
                "have only begun to find infarcts, so this run shows how to make the comparison more than it "
                "settles it.")

# %%
print(f"\n{verdict}\nBest mean Dice: {best['mean']:.3f} ({best['method']}, {best['shots']} slices); "
      f"zero-shot Dice of the pretrained network on the target: {zero_shot['dice']:.3f}.")
print(f"After the first epoch the training loss was lower than scratch's for: {', '.join(ahead) or 'none'} "
      f"(scratch {first_loss['scratch']:.3f}; " + ", ".join(f"{n} {first_loss[n]:.3f}" for n in SCHEDULES) + ").")
assert set(effects["verdict"]) <= set(words)
assert len(effects) == sum(len(SIZES.shots) if name in SIZES.curve_methods else 1 for name in SCHEDULES)
assert all(np.isfinite(v) for v in first_loss.values()) and 0.0 <= best["mean"] <= 1.0

# %% [markdown]
# **How to read this.** The verdict above is the result; the points below are the reasons it can
# come out either way. Transfer from hemorrhage to infarct *can* help: the pretrained encoder
# has already learned the head's anatomy (skull, ventricles, sulci) on other patients, which may
# give fine-tuning a head start. Whether it did here is printed above: the schedules whose first-epoch
# training loss was below scratch's (see also the loss curves of section 4), and the verdict at the
# fewest slices, where a head start would matter most. It can also fail to help, or hurt:
#
# - the lesions have **opposite contrast** (blood is bright, an infarct is dark), so the source
#   network's lesion detectors may be of little use — its zero-shot Dice on the target (section 3) tests this;
# - a **frozen** encoder can only recombine features learned for bright blobs; if the infarct needs
#   new low-level features, only schedules that unfreeze the encoder can learn them;
# - with enough target slices and epochs, training from scratch can catch up, and the curves meet on
#   the right of the learning curve;
# - with too few slices or epochs, *neither* network may learn: then there is nothing to compare, and the
#   verdict says so instead of calling a gap between two failures "helped" or "hurt";
# - the gap between methods has to be compared with the spread between seeds: with two or three
#   seeds, differences of a few hundredths of Dice are within noise.
#
# The studies this notebook follows reported that transfer helped (a tumour-pretrained U-Net
# fine-tuned at 1e-5; different F1 for frozen, unfrozen and gradual encoders; ImageNet ResNet
# encoders). Whether it helps *here* is the output of the cells above — if your run says "did not
# help", that is a result, not a failure.
#
# ## Exercises
# 1. Pretrain on **the same** lesion type: `phantom_source(..., lesion_types=("ischemic",))`
#    (still another seed, so other patients). Does the learning curve move up?
# 2. Use the study's fine-tuning rate: set `LR_SCALE` so that `BASE.learning_rate * LR_SCALE` is 1e-5.
#    What happens with this number of epochs — and why did the study need many more?
# 3. Set `keep_batchnorm_frozen=False` in the schedules. Which schedule changes most, and why does
#    batch norm on a few dozen slices make noisy statistics?
# 4. Put `vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` in `~/.keras/models` and rerun section 7.
#
# ## Summary
# - Freeze by layer name or encoder block; recompile after every change; frozen batch norm runs in
#   inference mode. Gradual unfreezing is a sequence of compiled phases, deepest block first.
# - Pretrain on a larger related set with other patients, save it, reload it in safe mode, fine-tune.
# - Judge transfer with a learning curve: same slices and seeds for every method, mean ± sd, paired
#   differences — and accept "no clear difference" as an answer.
#
# **Next →** [06 · Evaluation](06_evaluation.ipynb)
