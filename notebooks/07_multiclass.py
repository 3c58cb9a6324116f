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
# # 07 · Hemorrhagic vs ischemic: multiclass segmentation
# One network, three classes — background, hemorrhage (red), infarct (green) — and a rare class to look after.
#
# **Learning goals**
# - Read colour-coded masks through an explicit colour map, and reject colours the map does not know.
# - Train a softmax U-Net with cross-entropy + multiclass Dice from one configuration object.
# - Handle class imbalance by offline oversampling or by class weights, and compare them honestly
#   (mean ± sd over seeds, per class, background excluded).
#
# **Runtime**: about 3 minutes on a laptop CPU (quick profile: 64 px, 2 seeds × 2 strategies, twice the
# profile's epochs: the Parameters cell prints `num_epochs`); the full profile (256 px, twice its epochs
# with early stopping, 3 seeds) needs a GPU (~1 hour).

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import dataclasses
import hashlib

import ipywidgets as widgets
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from PIL import Image

from strokekit import io, multiclass, paths, preprocess, report, train
from strokekit import split as splitting
from strokekit.augment import STUDY_AUGMENT, oversample_offline
from strokekit.config import get_profile, phantom_config
from strokekit.errors import DataError
from strokekit.metrics import per_class_metrics
from strokekit.phantom import generate_phantom

# %%
print(f"keras {keras.__version__} · backend {keras.backend.backend()}")

# %% [markdown]
# ## Parameters
# The model and its training live in one frozen `MulticlassConfig`; every variant below is a
# `dataclasses.replace` of it.

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = phantom_config(PROFILE, multiclass=True)    # the course's phantom, labels 1 = hemorrhagic, 2 = ischemic
CONFIG = multiclass.MulticlassConfig(
    base_filters=PROFILE.filters[0], num_levels=len(PROFILE.filters) - 1, kernel_size=3, dilation_rate=1, dropout=0.0,
    # the profile's training recipe (strokekit/config.py)
    batch_norm=PROFILE.batch_norm, bn_momentum=PROFILE.bn_momentum, learning_rate=PROFILE.learning_rate,
    lr_schedule=PROFILE.lr_schedule, head_bias=PROFILE.head_bias, repeats=PROFILE.repeats,
    batch_size=PROFILE.batch_size,
    num_epochs=2 * PROFILE.num_epochs,   # three classes learn more slowly than one lesion class
    image_size=PROFILE.image_size, augment=STUDY_AUGMENT, early_stopping_patience=10, reduce_lr_patience=5,
)
OVERSAMPLE_FACTOR = 2          # augmented copies of every training slice that holds the rare class
WEIGHT_POWER = 0.5             # class weight = (background pixels / class pixels) ** WEIGHT_POWER
STRATEGIES = ("oversample", "class_weights")
SEEDS = tuple(range(PROFILE.num_seeds))
CHECK_LEARNING = PROFILE.name == "quick"   # assert the learning floors (measured in the quick profile)
COURSE_SPLIT = paths.data_dir() / "splits" / "phantom_split.json"
SPLIT_FILE = paths.data_dir() / "splits" / "phantom_multiclass_split.json"
WORK = paths.data_dir() / "generated" / "07_multiclass"   # derived data: never committed
RUNS = paths.runs_dir() / "07_multiclass"
print(PROFILE.name, CONFIG)

# %% [markdown]
# ## 1. Two lesion types
# Each synthetic patient has one lesion: a hemorrhage (bright, label 1) or an infarct (dark,
# label 2). The same slices as in the earlier notebooks, now with two lesion labels instead of one.

# %%
phantom = generate_phantom(PHANTOM, progress=False)
frame = phantom.to_frame()
print(frame[frame.lesion_pixels > 0].groupby("lesion_type")["patient_id"].nunique().rename("patients").to_dict())
display(preprocess.plot_overlays(phantom, [i for i in range(len(phantom)) if phantom.has_lesion()[i]][::8][:8]))
assert set(np.unique(phantom.masks)) == {0, 1, 2} and phantom.class_names == io.MULTICLASS_CLASS_NAMES

# %% [markdown]
# ## 2. Colour-coded masks, read through a colour map
# The study stored its masks as colour PNGs: red = hemorrhagic, green = ischemic. A colour is not
# a label until a **colour map** says so; we write the phantom in the study's layout and read it
# back through `io.MULTICLASS_COLOURS`.

# %%
print("colour map:", io.MULTICLASS_COLOURS)
study = io.write_study_layout(phantom, WORK / "study", colour_map=io.MULTICLASS_COLOURS,
                              overwrite=True, progress=False)
case = phantom.case_ids[int(np.argmax(phantom.lesion_area()))]
rgb = np.asarray(Image.open(study / f"{case}_mask.png"))
colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
print(f"{case}_mask.png holds", {tuple(map(int, c)): int(n) for c, n in zip(colours, counts)})
print("decoded labels:", np.unique(io.decode_colour_mask(rgb, io.MULTICLASS_COLOURS), return_counts=True))
data = io.read_study_layout(study, colour_map=io.MULTICLASS_COLOURS,
                            class_names=io.MULTICLASS_CLASS_NAMES, progress=False)
assert np.array_equal(data.masks, phantom.masks) and data.unit == "display"
assert {tuple(map(int, c)) for c in colours} <= set(io.MULTICLASS_COLOURS)

# %% [markdown]
# A colour outside the map is an error that names the file and the colour, never a silent
# background: a magenta annotation stroke would otherwise vanish from the training data.

# %%
bad = rgb.copy()
bad[:3, :3] = (255, 0, 255)
try:
    io.decode_colour_mask(bad, io.MULTICLASS_COLOURS, path=study / f"{case}_mask.png")
    raise AssertionError("an unknown colour was accepted")
except DataError as err:
    print(err)
    assert "(255, 0, 255): 9 px" in str(err) and f"{case}_mask.png" in str(err)

# %% [markdown]
# ## 3. A split that holds both lesion types
# Notebook 02's split is stratified by slice level. Check it before trusting it for a new question:
# a test set without infarcts cannot say anything about infarcts. Here we stratify by the
# patient's lesion type instead (still whole patients per subset) and save that split separately.

# %%
if COURSE_SPLIT.is_file():
    course = splitting.Split.load(COURSE_SPLIT)
    if sorted(course.case_ids) == sorted(data.case_ids):
        for subset in ("train", "val", "test"):
            part = course.dataset(data, subset)
            print(f"notebook 02's {subset:5s}: lesion types {sorted(set(part.extra['lesion_type']) - {'none'})}")
else:
    print("notebook 02 has not saved its split yet; skipping the check")

# %% [markdown]
# Our split: each slice is labelled with its patient's lesion type, and `cluster_split` stratifies by that
# label instead of a cluster (whole patients per subset, as before). The table counts pixels per class.

# %%
patient_type = frame[frame.lesion_pixels > 0].groupby("patient_id")["lesion_type"].first()
lesion_of_slice = np.array([patient_type[p] for p in data.patient_ids])
split = splitting.cluster_split(data, clusters=lesion_of_slice, test=0.25, val=0.2, seed=0)
split.save(SPLIT_FILE)
train_data, val_data, test_data = (split.dataset(data, s) for s in ("train", "val", "test"))
counts = pd.DataFrame({s: np.bincount(d.masks.ravel(), minlength=3) for s, d in
                       (("train", train_data), ("val", val_data), ("test", test_data))},
                      index=data.class_names)
display(counts)
splitting.check_leakage(split)
assert (counts.loc[["hemorrhagic", "ischemic"]] > 0).all().all()

# %% [markdown]
# ## 4. Class imbalance, two remedies
# Background is ~99 % of the pixels, and the two lesion classes are not equally common either.
# (a) **Offline oversampling**: augmented copies of every training slice that holds the rare class,
# written to a *separate* folder (the originals are never touched). (b) **Class weights** in the
# loss: a pixel of class c counts `w_c` times in the cross-entropy and in the Dice average.

# %%
train_pixels = np.bincount(train_data.masks.ravel(), minlength=3)
RARE = 1 + int(np.argmin(train_pixels[1:]))
print(f"training pixels {dict(zip(data.class_names, train_pixels.tolist()))}; rare class: {data.class_names[RARE]}")
oversampled = oversample_offline(train_data, WORK / "oversampled", target_label=RARE,
                                 factor=OVERSAMPLE_FACTOR, config=STUDY_AUGMENT, seed=0,
                                 overwrite=True, progress=False)
after = np.bincount(oversampled.masks.ravel(), minlength=3)
weights = multiclass.class_weights(train_data.masks, 3, power=WEIGHT_POWER)
print(f"(a) {len(train_data)} → {len(oversampled)} slices; {data.class_names[RARE]} pixels "
      f"{train_pixels[RARE]} → {after[RARE]}; copies in {WORK / 'oversampled'}")
print(f"(b) class weights {dict(zip(data.class_names, weights))}")
assert len(oversampled) > len(train_data) and after[RARE] > train_pixels[RARE]
assert weights[0] == 1.0 and weights[RARE] == max(weights)

# %% [markdown]
# ## 5. One configuration object, several runs
# The U-Net's shape (base filters, levels, kernel size, dilation, dropout) and its training
# (learning rate, early stopping, learning-rate halving) all come from `CONFIG`. Each strategy is
# trained with every seed and scored per class on the test patients. Note that oversampling also
# gives more steps per epoch — a cost (and a confounder) of the method.

# %%
model = multiclass.build_model(CONFIG)
print(f"filters {CONFIG.filters} · kernel {CONFIG.kernel_size} · dilation {CONFIG.dilation_rate} · "
      f"{model.count_params():,d} parameters · output {model.output_shape}")
assert model.output_shape == (None, CONFIG.image_size, CONFIG.image_size, 3)
del model

# %% [markdown]
# How one trained run is scored: per-class Dice and lesion-wise F1 on the test patients, the number of
# lesion pixels it predicts, and whether its validation loss stopped moving ("stuck", see below).

# %%
def score_run(result, config):
    scores = multiclass.evaluate(result.model, config, test_data).set_index("class_name")
    flat = np.ptp(result.history["val_loss"].to_numpy()[1:]) < 1e-6   # same loss every epoch: stuck
    return {"epochs": result.metrics["epochs_run"], "stuck": bool(flat),
            "lesion_px_predicted": int(scores["pred_pixels"].sum()),
            **{f"dice_{c}": scores.loc[c, "dice"] for c in scores.index},
            **{f"lesion_f1_{c}": scores.loc[c, "lesion_f1"] for c in scores.index}}

# %% [markdown]
# Every strategy with every seed: oversampling trains on the enlarged set, class weights on the
# original slices with `weights` in the loss.

# %%
runs, rows = {}, []
for strategy in STRATEGIES:
    for seed in SEEDS:
        if strategy == "oversample":
            config, train_set = dataclasses.replace(CONFIG, seed=seed), oversampled
        else:
            config, train_set = dataclasses.replace(CONFIG, seed=seed, class_weights=weights), train_data
        result = multiclass.train_multiclass(config, train_set, val_data, name=f"{strategy}-s{seed}",
                                             run_dir=train.make_run_dir(f"{strategy}-s{seed}", RUNS),
                                             progress=False)
        runs[(strategy, seed)] = result
        rows.append({"strategy": strategy, "seed": seed, **score_run(result, config)})

# %%
results = pd.DataFrame(rows)
display(results.round(3))
metric_cols = ["dice_hemorrhagic", "dice_ischemic", "lesion_f1_hemorrhagic", "lesion_f1_ischemic"]
display(train.summarize(results, by=["strategy"], metrics=metric_cols))
assert len(results) == len(STRATEGIES) * len(SEEDS)
assert results[metric_cols].apply(lambda c: c.between(0, 1)).all().all()

# %% [markdown]
# The better strategy of this run, by the mean lesion Dice over seeds on the test patients, and the
# floors it must clear. "Better" is a label for this run's record, not a finding: unless the gap
# between the two strategies is larger than their spread over seeds (the ± in the table above), it
# is seed noise. A choice you act on must come from the validation patients; picking by test score
# grades your own exam (notebook 06, step 11).

# %%
means = results.groupby("strategy")[["dice_hemorrhagic", "dice_ischemic"]].mean()
better = means.mean(axis=1).idxmax()             # the better imbalance strategy: higher mean lesion Dice
print(f"better strategy here: {better} (hemorrhagic {means.loc[better, 'dice_hemorrhagic']:.3f}, "
      f"ischemic {means.loc[better, 'dice_ischemic']:.3f}, mean over seeds)")
# Both lesion classes learned (quick profile floors: hemorrhagic >= 0.6, ischemic >= 0.3).
assert not CHECK_LEARNING or (means.loc[better, "dice_hemorrhagic"] >= 0.6
                              and means.loc[better, "dice_ischemic"] >= 0.3)
report.record(better_strategy=better, hemorrhagic_dice=means.loc[better, "dice_hemorrhagic"],
              ischemic_dice=means.loc[better, "dice_ischemic"])

# %% [markdown]
# Read the table per class, and the `stuck` column first. A run whose validation loss no longer
# moves at all has fallen into the **majority-class trap**: it predicts background everywhere, with
# a softmax so saturated that no gradient is left to get it out (`lesion_px_predicted` = 0).
# Two-fold oversampling leaves the background at ~98 % of the pixels, so without weights in the
# loss this can happen within the first epoch — unless, as in the profile's recipe, the head starts
# at the rarity of the lesion classes (`head_bias`) and batch norm keeps the steps well scaled
# (exercise 5 takes them away). The class weights make every lesion pixel count many times instead.
#
# The hemorrhage is bright and compact and is found first. The infarct is darker than the cortex it
# replaces by about as much as white matter is (the phantom uses 14 HU, within the 10–20 HU of a
# real infarct core), so it is the harder class: compare the two Dice columns, and note how a
# "mean Dice" over classes would hide the gap. Whatever wins here, check whether the gap between
# strategies is larger than the spread between seeds before believing it.

# %% [markdown]
# ## 6. Watching a run: previews and curves
# Every run folder holds `history.csv`, the curves, and one preview per epoch (validation slices:
# truth on top, prediction below; red = hemorrhagic, green = ischemic). The loss is drawn on a log
# scale: an early epoch's validation loss can be many times the later ones and would flatten the rest.

# %%
watched = runs[(STRATEGIES[-1], SEEDS[0])]
history = pd.read_csv(watched.run_dir / "history.csv")
curves = multiclass.plot_history(history, CONFIG.class_names)
curves.axes[0].set(yscale="log", ylabel="loss (log scale)")
display(curves)
assert {"val_dice_hemorrhagic", "val_dice_ischemic"} <= set(history.columns)

# %% [markdown]
# Three of its previews: the first epoch, the middle one and the last.

# %%
previews = sorted((watched.run_dir / "previews").glob("epoch_*.png"))
shown = [previews[0], previews[len(previews) // 2], previews[-1]]
fig, axes = plt.subplots(len(shown), 1, figsize=(8.8, 4.4 * len(shown)))
for ax, path in zip(np.atleast_1d(axes), shown):
    ax.imshow(plt.imread(path))
    ax.set_axis_off()
plt.tight_layout()
plt.show()
assert len(previews) == len(history) == watched.metrics["epochs_run"]

# %% [markdown]
# ## 7. Per-class evaluation, background excluded
# The background's Dice is ≈ 0.99 whatever the network does; averaging it in (as some papers do)
# hides a lesion class the model never finds. Report each lesion class on its own.

# %%
table = multiclass.evaluate(watched.model, watched.config, test_data)
display(table[["class_name", "truth_pixels", "pred_pixels", "dice", "iou", "sensitivity", "precision",
               "lesion_f1"]].round(3))
x_test, y_test = multiclass.to_arrays(CONFIG, test_data)
with_bg = per_class_metrics(y_test, multiclass.predict_labels(watched.model, CONFIG, x_test), 3,
                            data.class_names, include_background=True)
print(f"mean Dice with background {with_bg['dice'].mean():.3f} vs without {table['dice'].mean():.3f}")
assert list(table["class_name"]) == ["hemorrhagic", "ischemic"]
assert with_bg.loc[with_bg.class_name == "background", "dice"].item() > 0.95

# %% [markdown]
# ## 8. Inference on a folder
# `predict_folder` segments every image of a folder and writes colour masks `<case>_pred.png` into
# a **new** folder; the input folder is read only. Here the input is the test patients' slices.

# %%
test_folder = io.write_study_layout(test_data, WORK / "test_study", overwrite=True, progress=False)
before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(test_folder.iterdir())}
out_folder = train.make_run_dir("predictions", RUNS)
written = multiclass.predict_folder(watched.model, CONFIG, test_folder, out_folder, progress=False)
after_files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(test_folder.iterdir())}
display(written.drop(columns=["image", "prediction"]).head())

# %% [markdown]
# The test slices with the largest lesions: the study-layout overlay (truth) above the written prediction.
# Then the two checks: the input folder is unchanged, and there is one prediction per slice.

# %%
picks = [test_data.case_ids[i] for i in np.argsort(-test_data.lesion_area())[:4]]
fig, axes = plt.subplots(2, len(picks), figsize=(3 * len(picks), 6))
for k, case in enumerate(picks):
    axes[0, k].imshow(Image.open(test_folder / f"{case}_result.png"))
    axes[0, k].set_title(f"{case} truth", fontsize=8)
    axes[1, k].imshow(Image.open(out_folder / f"{case}_pred.png"))
    axes[1, k].set_title("prediction", fontsize=8)
for ax in axes.ravel():
    ax.set_axis_off()
plt.show()
assert before == after_files, "the input folder changed"
assert sorted(p.name for p in out_folder.iterdir()) == sorted(f"{c}_pred.png" for c in test_data.case_ids)

# %% [markdown]
# ## Try it: one more configuration
# Change the kernel size, dilation or dropout and train one run (it starts only when you press
# the button).

# %%
def train_variant(kernel_size=3, dilation_rate=1, dropout=0.0, strategy="class_weights", epochs=CONFIG.num_epochs):
    config = dataclasses.replace(CONFIG, kernel_size=kernel_size, dilation_rate=dilation_rate, dropout=dropout,
                                 num_epochs=epochs, class_weights=weights if strategy == "class_weights" else None)
    train_set = oversampled if strategy == "oversample" else train_data
    result = multiclass.train_multiclass(config, train_set, val_data, name="variant", progress=True)
    display(multiclass.evaluate(result.model, config, test_data).round(3))
    print("→", result.run_dir)

# %% [markdown]
# The panel: one control per argument of `train_variant`; nothing trains until you press **Train**.

# %%
display(widgets.interactive(
    train_variant, {"manual": True, "manual_name": "Train"},
    kernel_size=widgets.Dropdown(options=[3, 5, 7], value=3),
    dilation_rate=widgets.Dropdown(options=[1, 2, 3], value=1),
    dropout=widgets.FloatSlider(value=0.0, min=0.0, max=0.5, step=0.1),
    strategy=widgets.Dropdown(options=list(STRATEGIES), value="class_weights"),
    epochs=widgets.IntSlider(value=CONFIG.num_epochs, min=1, max=100),
))

# %% [markdown]
# ## Exercises
# 1. Add a strategy `"both"` (the oversampled folder *and* the class weights) to `STRATEGIES` and
#    the loop. Does it beat the weights alone by more than the spread between seeds?
# 2. Set `WEIGHT_POWER = 1.0` (inverse frequency). What happens to the rare class's precision?
#    And with `WEIGHT_POWER = 0.0` (all weights 1), do the class-weight runs get stuck too?
# 3. Train with `dilation_rate=2`: the receptive field doubles for the same number of weights. Does
#    the large, faint infarct benefit more than the small, bright hemorrhage?
# 4. Paint a stroke of orange `(255, 128, 0)` into one `_mask.png` in `WORK / "study"` and read the
#    folder again. Which file does the error name?
# 5. Train the oversampled set with `dataclasses.replace(CONFIG, head_bias=None, batch_norm=False)`:
#    does it fall into the majority-class trap (`stuck`) now?
#
# ## Summary
# - A colour mask is decoded through an explicit colour map; unknown colours are errors, not background.
# - One frozen config builds the softmax U-Net and drives training; variants are `dataclasses.replace`.
# - Oversampling (a new folder of copies) and class weights (in the loss) both target the rare
#   class; compare them per class, background excluded, as mean ± sd over seeds.
# - Inference writes colour-coded predictions to a new folder and never touches the input.
#
# **Next →** [08 · CT perfusion: core and penumbra](08_ctp_core_penumbra.ipynb)
