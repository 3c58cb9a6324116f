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
# # 03 · Augmentation
# A few dozen slices (step 1 prints how many) are too few to learn from — unless every epoch shows them differently.
#
# **Learning goals**
# - Apply the same geometry to an image and its mask (nearest neighbour for the mask), intensity
#   changes to the image only.
# - See what each transform does and how strong is too strong.
# - Feed augmented batches to Keras with a loader that keeps the CPU busy, and oversample a rare
#   class offline without touching the originals.
#
# **Runtime**: under a minute on a laptop CPU (quick profile); the same on a GPU.

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import dataclasses
import time

import ipywidgets as widgets
import numpy as np
from IPython.display import display

from strokekit import augment, paths, preprocess
from strokekit.config import get_profile
from strokekit.phantom import PhantomConfig, generate_phantom

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = PhantomConfig(
    n_patients=PROFILE.phantom_patients, slices_per_patient=PROFILE.phantom_slices_per_patient,
    image_size=PROFILE.phantom_size, multiclass=True,
    lesion_types=("ischemic", "ischemic", "ischemic", "hemorrhagic"),   # drawn per patient: hemorrhage is rarer
    seed=0,
)
AUGMENT = dataclasses.replace(
    augment.STUDY_AUGMENT, elastic_alpha=6.0, elastic_sigma=6.0, contrast=0.15, gamma=0.2, noise=0.02, blur=1.0
)
IMAGE_SIZE = PROFILE.image_size
BATCH_SIZE = PROFILE.batch_size
SEED = 0
OVERSAMPLE_DIR = paths.data_dir() / "generated" / "oversampled"
print(PROFILE.name, AUGMENT)

# %% [markdown]
# ## 1. Data
# The phantom of notebook 01, with two lesion classes (1 = hemorrhagic, red; 2 = ischemic, green) so
# that we can also balance classes below. Images are windowed to [0, 1] first: intensity transforms
# are defined on that range.

# %%
data = generate_phantom(PHANTOM, progress=False)
x, y = preprocess.prepare_inputs(data, image_size=IMAGE_SIZE, windows=("brain",))
example = int(np.argmax(data.lesion_area()))      # the slice with the largest lesion
image, mask = x[example, ..., 0], y[example]
print(f"{len(data)} slices, inputs {x.shape}, labels {sorted(np.unique(y).tolist())}")
assert x.dtype == np.float32 and set(np.unique(y)) <= {0, 1, 2}

# %% [markdown]
# ## 2. One transform at a time
# Geometry (rotation, shift, shear, zoom, flip, elastic) moves pixels, so it must move the mask in
# exactly the same way. Intensity (contrast, gamma, noise, blur) changes what a pixel looks like,
# not what it is, so the mask stays as it is.

# %%
fig = augment.show_transforms(image, mask, AUGMENT, seed=SEED)
display(fig)

# %% [markdown]
# ## 3. Random draws
# During training every slice gets a new random combination each epoch.

# %%
fig = augment.show_random_grid(image, mask, AUGMENT, n=12, seed=SEED)
display(fig)

# %% [markdown]
# Try it: each slider sets one strength. When does a slice stop looking like a head CT?

# %%
def preview(rotation=15.0, shift=0.1, shear=0.1, zoom=0.1, elastic_alpha=6.0, contrast=0.15, noise=0.02):
    config = dataclasses.replace(AUGMENT, rotation=rotation, shift=shift, shear=shear, zoom=zoom,
                                 elastic_alpha=elastic_alpha, contrast=contrast, noise=noise)
    display(augment.show_random_grid(image, mask, config, n=8, seed=SEED))

# %% [markdown]
# One slider per argument of `preview`; each moves only that strength, the others keep their values.

# %%
slider = dict(continuous_update=False)
display(widgets.interactive(
    preview,
    rotation=widgets.FloatSlider(value=15, min=0, max=90, step=5, **slider),
    shift=widgets.FloatSlider(value=0.1, min=0, max=0.4, step=0.05, **slider),
    shear=widgets.FloatSlider(value=0.1, min=0, max=0.5, step=0.05, **slider),
    zoom=widgets.FloatSlider(value=0.1, min=0, max=0.5, step=0.05, **slider),
    elastic_alpha=widgets.FloatSlider(value=6, min=0, max=30, step=2, **slider),
    contrast=widgets.FloatSlider(value=0.15, min=0, max=0.8, step=0.05, **slider),
    noise=widgets.FloatSlider(value=0.02, min=0, max=0.2, step=0.01, **slider),
))

# %% [markdown]
# ## 4. Are masks still masks, and still on the lesion?
# Two checks that catch the classic bugs. (1) Labels: an interpolated mask holds values like 0.5 or
# 1.5 that are no class at all. (2) Alignment: flip the image but not the mask and the model learns
# nonsense. We augment the image together with its *brain mask* and recompute the brain mask on the
# augmented image: the two must coincide.

# %%
images_aug, masks_aug = augment.augment_batch(x[..., 0], y, AUGMENT, seed=SEED)
report = augment.check_masks_valid(masks_aug, allowed_labels=[0, 1, 2])
print(report)
assert report["valid"]

# %% [markdown]
# Check (2): the brain mask rides along as if it were a lesion mask, with geometry only (intensity changes
# would move the brain mask found on the image). A flipped image without its mask is the bug to catch.

# %%
brains = np.stack([preprocess.brain_mask(im, unit="display") for im in x[..., 0]]).astype(np.uint8)
geometry_only = dataclasses.replace(AUGMENT, contrast=0.0, gamma=0.0, noise=0.0, blur=0.0)
moved_images, moved_brains = augment.augment_batch(x[..., 0], brains, geometry_only, seed=SEED)

def agreement(images, masks):
    found = np.stack([preprocess.brain_mask(im, unit="display") for im in images])
    return float(((found & (masks > 0)).sum()) / ((found | (masks > 0)).sum()))

aligned = agreement(moved_images, moved_brains)
broken = agreement(moved_images[:, :, ::-1], moved_brains)   # the bug: image flipped, mask not
print(f"brain-mask agreement after augmentation: {aligned:.3f}; with the image flipped alone: {broken:.3f}")
assert aligned > 0.8 and broken < aligned - 0.2

# %% [markdown]
# ## 5. Feeding Keras
# `SegmentationLoader` is a `keras.utils.PyDataset`: worker threads prepare the next batches while
# the model trains, it works with the TensorFlow, JAX and PyTorch backends, and sample *i* in epoch
# *e* is always augmented the same way for a given seed, whatever the number of workers.

# %%
loader = augment.SegmentationLoader(x, y, batch_size=BATCH_SIZE, augment=AUGMENT, seed=SEED, num_classes=3)
xb, yb = loader[0]
print(f"{len(loader)} batches per epoch; x {xb.shape} {xb.dtype}; y {yb.shape} (one-hot)")
assert xb.shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 1) and yb.shape == (BATCH_SIZE, IMAGE_SIZE, IMAGE_SIZE, 3)
assert np.allclose(yb.sum(axis=-1), 1.0)
again = augment.SegmentationLoader(x, y, batch_size=BATCH_SIZE, augment=AUGMENT, seed=SEED, num_classes=3, workers=1)
assert np.array_equal(again[0][0], xb), "same seed, same batch"

start = time.perf_counter()
for i in range(len(loader)):
    loader[i]
rate = len(x) / (time.perf_counter() - start)
print(f"augmentation speed on this machine: {rate:.0f} slices/s at {IMAGE_SIZE} px (one thread)")
assert rate > 0

# %% [markdown]
# ## 6. Offline oversampling of a rare class
# The multiclass study had few slices of one class and wrote extra, distorted copies of them. We do
# the same — into a **separate folder**, never over the originals — and check the class balance.

# %%
display_data = data.replace(images=(preprocess.window_hu(data.images, "brain") * 255).astype(np.float32),
                            unit="display")
counts = {name: int((display_data.masks == k).any(axis=(1, 2)).sum()) for k, name in enumerate(data.class_names) if k}
rare = 1 + int(np.argmin([counts[n] for n in data.class_names[1:]]))
balanced = augment.oversample_offline(display_data, OVERSAMPLE_DIR, target_label=rare, factor=2,
                                      config=augment.STUDY_AUGMENT, seed=SEED, overwrite=True, progress=False)
after = {name: int((balanced.masks == k).any(axis=(1, 2)).sum()) for k, name in enumerate(data.class_names) if k}
print(f"slices per class before {counts} → after {after}; "
      f"copies written to {OVERSAMPLE_DIR.relative_to(paths.project_root())}")
assert after[data.class_names[rare]] == 3 * counts[data.class_names[rare]]
assert int(balanced.extra["augmented"].sum()) == 2 * counts[data.class_names[rare]]

# %% [markdown]
# ## Exercises
# 1. Set `vflip=True`. Is an upside-down head a plausible CT slice? What could a model learn from it?
# 2. Raise `elastic_alpha` until the ventricles tear. Which check in section 4 notices first?
# 3. Time `SegmentationLoader` with `workers=1` and `workers=2` inside `model.fit` (notebook 04).
#
# ## Summary
# - Geometry moves image and mask together (mask with nearest neighbour); intensity touches only the image.
# - Two cheap checks — valid labels and alignment — catch the bugs that silently ruin training.
# - Oversampling writes new files to a new folder; the source data stay as they were.
#
# **Next →** [04 · U-Net vs ResU-Net](04_unet_vs_resunet.ipynb)
