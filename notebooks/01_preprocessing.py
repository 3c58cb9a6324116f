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
# # 01 · Preprocessing head CT
# From Hounsfield units on disk to model-ready slices, without touching the source files.
#
# **Learning goals**
# - Read CT values in Hounsfield units (HU) and choose a window that shows what you are looking for.
# - Strip the skull, resize images and masks correctly (nearest neighbour for masks), normalise.
# - Describe a dataset before training on it: lesions per slice, per class, per patient.
#
# **Runtime**: about 30 s on a laptop CPU (quick profile); the same on a GPU (nothing here trains).

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import hashlib
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

import strokekit
from strokekit import io, paths, preprocess
from strokekit.config import get_profile, phantom_config
from strokekit.phantom import describe, generate_phantom

print(f"strokekit {strokekit.__version__} · numpy {np.__version__}")

# %% [markdown]
# ## Parameters
# The only cell that sets values. `STROKEKIT_PROFILE=full` makes everything bigger; do not edit sizes elsewhere.

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = phantom_config(PROFILE)      # the course's standard phantom (same in every notebook)
WINDOW = "brain"            # one of strokekit.preprocess.WINDOWS or a (level, width) pair
IMAGE_SIZE = PROFILE.image_size
OUT_DIR = paths.data_dir() / "phantom"
print(PROFILE)

# %% [markdown]
# ## 1. A synthetic head CT
# The kit generates its own data: 3-D head volumes of synthetic patients, in HU, with an ischemic
# (darker) or hemorrhagic (brighter) lesion each, and slices taken at three levels: skull base,
# ventricles, vertex. It is **not** real anatomy — it is simple enough to run anywhere and honest
# enough to show every step. Real CT appears in section 8.
#
# Its lesions stay within realistic CT contrast: an infarct core lies `ischemic_contrast` = 14 HU
# below the parenchyma it replaces (real cores: about 10–20 HU below brain), fresh blood has 65–85 HU
# (25–45 HU above grey matter's ~40 HU), and lesions have a radius of 12–30 mm — a territorial
# infarct or a large hematoma, the kind of lesion a few-shot study learns. The line printed below
# (`phantom.describe`) states the settings of this run.

# %%
data = generate_phantom(PHANTOM, progress=False)
summary = data.summary()
print({k: summary[k] for k in ("slices", "patients", "image_shape", "unit", "slices_with_lesion")})
print("\n".join(describe(PHANTOM)))
assert 10 <= PHANTOM.ischemic_contrast <= 20 and PHANTOM.hemorrhage_hu == (65.0, 85.0)
assert data.unit == "HU" and summary["patients"] == PHANTOM.n_patients
assert summary["slices_with_lesion"] == PHANTOM.n_patients * PHANTOM.slices_per_patient

# %% [markdown]
# ## 2. Hounsfield units and windows
# CT stores attenuation in HU: air −1000, water 0, brain 20–45, fresh blood 50–90, bone up to 2000.
# A screen shows ~256 grey levels, so we pick a **window** (level L, width W) and map L−W/2…L+W/2 to
# black…white. Written out once in NumPy, then the kit's four windows on the slice with the largest
# lesion (the cell prints which kind of lesion that is):

# %%
def window_from_scratch(image_hu, level, width):
    return np.clip((image_hu - (level - width / 2)) / width, 0, 1)

index = int(np.argmax(data.lesion_area()))          # the slice with the largest lesion
mine = window_from_scratch(data.images[index], 40, 80)
assert np.allclose(mine, preprocess.window_hu(data.images[index], "brain"))  # the kit does the same
print(f"{data.case_ids[index]}: {data.extra['lesion_type'][index]} lesion")
fig = preprocess.plot_windows(data.images[index])
display(fig)

# %%
image = data.images[index]
air, bone = image.min(), image.max()
brain_hu = np.median(image[preprocess.brain_mask(image)])
print(f"air {air:.0f} HU · bone {bone:.0f} HU · brain median {brain_hu:.0f} HU")
assert air < -900 and bone > 700 and 20 < brain_hu < 50

# %% [markdown]
# What a window shows depends on the lesion. Fresh blood is 25–45 HU brighter than grey matter, so a
# hemorrhage stands out in the brain, stroke and subdural windows alike. An infarct core is only about
# 14 HU darker than healthy brain: the narrow "stroke" window (W ≈ 24) is the one that makes it visible.
# The bone window hides either kind. The figure above shows the largest lesion, whichever kind it is.
#
# Try it: move the level and width. To see the stroke window at work on an infarct, move the slice
# slider until the right panel's title says `ischemic`.

# %%
def show_window(case=index, level=40, width=80):
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    ax[0].imshow(preprocess.window_hu(data.images[case], (level, width)), cmap="gray")
    ax[0].set_title(f"{data.case_ids[case]} · L{level} W{width}")
    ax[1].imshow(preprocess.overlay_mask(preprocess.window_hu(data.images[case], (level, width)), data.masks[case]))
    ax[1].set_title(f"lesion: {data.extra['lesion_type'][case]}")
    for a in ax:
        a.set_axis_off()
    plt.show()

# %% [markdown]
# `widgets.interactive` builds one slider per argument of `show_window` and calls it again whenever a
# slider moves; `continuous_update=False` waits until you let go, so the figure is not redrawn on every pixel.

# %%
panel = widgets.interactive(
    show_window,
    case=widgets.IntSlider(value=index, min=0, max=len(data) - 1, description="slice"),
    level=widgets.IntSlider(value=40, min=-100, max=400, step=2, continuous_update=False),
    width=widgets.IntSlider(value=80, min=4, max=2000, step=4, continuous_update=False),
)
display(panel)

# %% [markdown]
# ## 3. Skull stripping
# Bone is far brighter than brain, so thresholds and a little morphology find the intracranial
# soft tissue: fill inside the skull ring, keep the largest soft-tissue region, fill its holes
# (ventricles, a bleed). Models then cannot learn from the skull or the scalp.

# %%
brains = np.stack([preprocess.brain_mask(im) for im in data.images])
inside = (data.masks > 0) & brains
fraction_inside = inside.sum() / max(1, (data.masks > 0).sum())
print(f"lesion pixels inside the brain mask: {fraction_inside:.1%}")
assert fraction_inside > 0.9  # a cortical lesion may touch the skull, where the mask is trimmed
fig, ax = plt.subplots(1, 3, figsize=(10, 3.4))
ax[0].imshow(preprocess.window_hu(image, "brain"), cmap="gray")
ax[0].set_title("brain window")
ax[1].imshow(brains[index], cmap="gray")
ax[1].set_title("brain mask")
ax[2].imshow(preprocess.window_hu(preprocess.skull_strip(image), "brain"), cmap="gray")
ax[2].set_title("skull stripped")
for a in ax:
    a.set_axis_off()
plt.show()

# %% [markdown]
# ## 4. Resizing: linear for images, nearest for masks
# Interpolating a mask linearly invents values between labels (0.5 is neither lesion nor background);
# nearest-neighbour keeps exactly the labels that were there. The kit resizes in one place: the readers'
# `image_size`, `resize_dataset`, the split's features and the app all call `preprocess.resize_image`
# (bilinear, anti-aliased when shrinking) and `preprocess.resize_mask` (nearest neighbour).

# %%
small = preprocess.resize_dataset(data, IMAGE_SIZE)
labels_before, labels_after = set(np.unique(data.masks).tolist()), set(np.unique(small.masks).tolist())
print(f"{data.image_shape} → {small.image_shape}; labels {sorted(labels_before)} → {sorted(labels_after)}")
print(f"pixel spacing {data.spacing[0]:.2f} mm → {small.spacing[0]:.2f} mm")
assert labels_after <= labels_before and small.image_shape == (IMAGE_SIZE, IMAGE_SIZE)

# %% [markdown]
# ## 5. Normalisation and model inputs
# Models want inputs in a fixed range. Windowing already maps HU to [0, 1]; several windows can be
# stacked as channels (brain for blood, a narrow stroke window for ischemia).

# %%
x, y = preprocess.prepare_inputs(data, image_size=IMAGE_SIZE, windows=(WINDOW, "stroke", "subdural"))
print(f"inputs {x.shape} in [{x.min():.2f}, {x.max():.2f}] · masks {y.shape} {y.dtype}")
assert x.shape == (len(data), IMAGE_SIZE, IMAGE_SIZE, 3) and 0.0 <= x.min() and x.max() <= 1.0

# %% [markdown]
# ## 6. Overlays and the study's file layout
# The study kept each slice as `N.png`, its mask as `N_mask.png` and an overlay as `N_result.png`.
# We write the phantom the same way, read it back, and check with checksums that reading and
# preprocessing never change a source file.

# %%
folder = io.write_study_layout(data, OUT_DIR, window=WINDOW, overwrite=True, progress=False)

def checksums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}

before = checksums(folder)
again = io.read_study_layout(folder, image_size=IMAGE_SIZE, progress=False)
_ = preprocess.prepare_inputs(again, image_size=IMAGE_SIZE)
assert checksums(folder) == before, "a source file changed!"
print(f"{len(before)} files in {folder.relative_to(paths.project_root())}; unchanged after reading: True")
assert again.case_ids == data.case_ids and again.patient_ids == data.patient_ids
fig = preprocess.plot_overlays(data, np.flatnonzero(data.has_lesion())[:8])
display(fig)

# %% [markdown]
# ## 7. Know your dataset
# How big are the lesions, how many slices per class, per patient? A handful of patients with a few
# slices each is the few-shot setting of the study.

# %%
stats = preprocess.dataset_statistics(data)
per_type = stats.groupby("lesion_type")["lesion_mm2"].agg(["count", "median"]).round(1)
display(per_type)
assert per_type.loc[["hemorrhagic", "ischemic"], "count"].sum() == summary["slices_with_lesion"]
fig = preprocess.plot_statistics(data)
display(fig)

# %% [markdown]
# ## 8. Phantom next to real CT (CT-ICH)
# When `../shared/data/ct-ich` is present, we show one real slice from PhysioNet CT-ICH. Its lesions
# are **traumatic intracranial hemorrhages, not ischemic strokes**, and its PNGs are already
# brain-windowed (display units, not HU). The cell skips cleanly when the data is absent.

# %%
ctich = paths.ctich_dir()
if ctich is None:
    print("CT-ICH not found (../shared/data/ct-ich or $STROKEKIT_CTICH): skipping the real-data comparison.")
else:
    real = io.load_ctich(ctich, lesion_only=True, patients=["50"], progress=False)
    j = int(np.argmax(real.lesion_area()))
    fig, ax = plt.subplots(1, 2, figsize=(8, 4))
    ax[0].imshow(preprocess.overlay_mask(preprocess.window_hu(image, WINDOW), data.masks[index]))
    ax[0].set_title(f"phantom {data.case_ids[index]} ({data.extra['lesion_type'][index]})")
    ax[1].imshow(preprocess.overlay_mask(preprocess.to_unit_range(real.images[j], real.unit), real.masks[j]))
    ax[1].set_title(f"CT-ICH patient {real.patient_ids[j]}, slice {real.slice_indices[j]} (hemorrhage)")
    for a in ax:
        a.set_axis_off()
    plt.show()
    assert real.unit == "display" and real.has_lesion().all()

# %% [markdown]
# ## Exercises
# 1. Find the narrowest window in which the ischemic lesion of patient P02 is still visible. Why is
#    the subdural window wider than the brain window?
# 2. Resize a mask with the image resizer (`preprocess.resize_image(mask.astype(float), 32)`, bilinear) and
#    count the new values it invents. What would a loss do with them?
# 3. Make the phantom harder: `dataclasses.replace(PHANTOM, ischemic_contrast=4.0, noise_sd=6.0)`.
#    Can you still see the lesion in the brain window? In the stroke window?
#
# ## Summary
# - HU are physical; a window is a choice that decides what a model (and you) can see.
# - Masks are resized with nearest neighbour; source files are read, never rewritten.
# - A few patients, a few slices each: every later notebook starts from this dataset.
#
# **Next →** [02 · Clustering-based split](02_cluster_split.ipynb)
