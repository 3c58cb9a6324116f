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
# # 02 · A clustering-based split
# With a few dozen slices (step 1 prints how many), a random test set can miss a whole kind of
# slice. Cluster first, then split — by patient.
#
# **Learning goals**
# - Embed slices with a pretrained CNN (VGG16) and group them with KMeans; choose k with evidence.
# - Draw train/validation/test so that train and test hold every kind of slice, with no patient in two subsets.
# - Save the split as a file that later notebooks load; never move the images.
#
# **Runtime**: about 1–2 minutes on a laptop CPU (quick profile: VGG16 at 64 px; the full profile
# uses ImageNet's 224 px — `VGG_SIZE`, printed by the Parameters cell); under a minute on a GPU.

# %% [markdown]
# ## Setup

# %%
# %matplotlib inline
import ipywidgets as widgets
import keras
import numpy as np
import pandas as pd
from IPython.display import display

from strokekit import io, paths
from strokekit import split as splitting
from strokekit.config import get_profile, phantom_config
from strokekit.phantom import generate_phantom

print(f"keras {keras.__version__} · backend {keras.backend.backend()}")

# %% [markdown]
# ## Parameters

# %% tags=["parameters"]
PROFILE = get_profile()
PHANTOM = phantom_config(PROFILE)
VGG_SIZE = {"quick": 64, "full": 224, "smoke": 32}[PROFILE.name]   # VGG16 input side; 224 is the ImageNet size
USE_OVERLAY = True                  # the study embedded the overlays (N_result.png), not the bare slices
K = 8                               # the study: 8 clusters for 56 slices
TEST, VAL = 0.25, 0.15              # fractions of slices
REAL_EMBEDDING = "vgg16" if PROFILE.mode == "full" else "intensity"   # 318 real slices: VGG16 is slow on a CPU
SEED = 0
SPLIT_FILE = paths.data_dir() / "splits" / "phantom_split.json"
print(PROFILE.name, VGG_SIZE, K)

# %% [markdown]
# ## 1. Data
# The course's phantom: a dozen synthetic patients, a few slices each, at three levels (skull base,
# ventricles, vertex). Because we generated it, we know each slice's true level — a luxury real data
# does not give, and the way to check whether clusters mean anything.

# %%
data = generate_phantom(PHANTOM, progress=False)
levels = data.extra["level"]
print(f"{len(data)} slices, {len(data.patients())} patients; levels: "
      + ", ".join(f"{name} {int((levels == name).sum())}" for name in np.unique(levels)))
assert len(np.unique(levels)) == 3

# %% [markdown]
# ## 2. Embed every slice
# VGG16's convolutional layers, pretrained on ImageNet photographs, turn an image into 512 numbers
# that describe shapes and textures. We use them as a fingerprint of each slice. Offline, without the
# ImageNet weights, the kit says so and uses the same network with seeded random weights (random
# convolutions still respond to coarse shape and brightness). A cheap alternative: the slice itself
# shrunk to 16×16 pixels.

# %%
features, info = splitting.embed_vgg16(data, use_overlay=USE_OVERLAY, image_size=VGG_SIZE, seed=SEED,
                                       progress=False, return_info=True)
cheap = splitting.embed(data, "intensity")
print(f"VGG16 weights: {info['weights']} · features {features.shape} · cheap {cheap.shape}")
assert features.shape == (len(data), 512) and np.isfinite(features).all()

# %% [markdown]
# ## 3. Choose k
# Inertia always falls as k grows (the elbow is a judgement call); the silhouette score is highest
# where clusters are compact and well separated, and the plot marks that k. Do not expect it to
# point at `K`: the silhouette tends to reward a clean *coarse* division (the cell prints what its
# best k separates, level by level — look whether it is one level against the rest), and a split
# stratified by two or three groups only promises that each subset gets some of each.
#
# `K` is the study's choice (8 clusters for 56 slices, about 7 slices per cluster), kept here to
# reproduce it, not a result of this plot. For a split, clusters are strata, not findings: finer
# strata (level, lesion size and position) let each subset's mix follow the whole set more closely,
# as long as every cluster has at least 3 slices, one for each of train, validation and test. The
# next cell prints the cluster sizes; a smaller cluster cannot be spread over all three subsets.

# %%
table = splitting.choose_k(features, ks=range(2, 13), seed=SEED)
display(table.round(3))
fig = splitting.plot_choose_k(table)
display(fig)
best_k = int(table.loc[table["silhouette"].idxmax(), "k"])
print(f"best silhouette at k = {best_k} (we use K = {K}); its clusters, slices per level:")
display(pd.crosstab(splitting.cluster(features, best_k, seed=SEED), levels,
                    rownames=["cluster"], colnames=["level"]))
assert table["silhouette"].between(-1, 1).all()

# %%
clusters = splitting.cluster(features, K, seed=SEED)
xy = splitting.embed_2d(features, "pca", seed=SEED)
weights = " (random weights)" if info["weights"].startswith("random") else ""   # offline: no ImageNet weights

def legend_outside(fig):   # one entry per cluster and level: beside the points, not over them
    fig.set_size_inches(9.5, 4.5)
    fig.axes[0].legend(fontsize="small", ncols=2, loc="upper left", bbox_to_anchor=(1.02, 1), title="cluster · level")
    return fig

title = f"VGG16 features{weights}, PCA, coloured by cluster (k={K})"
display(legend_outside(splitting.plot_embedding(xy, clusters, title=title, style=levels)))
display(splitting.plot_cluster_montage(data, clusters, per_cluster=4, seed=SEED))
print(f"slices per cluster at k = {K}: {np.bincount(clusters).tolist()}")
assert len(np.unique(clusters)) == K

# %% [markdown]
# Try it: move k and watch the clusters regroup.

# %%
def show_k(k=K):
    labels = splitting.cluster(features, k, seed=SEED)
    display(legend_outside(splitting.plot_embedding(xy, labels, title=f"k = {k}", style=levels)))

display(widgets.interactive(show_k, k=widgets.IntSlider(value=K, min=2, max=12, continuous_update=False)))

# %% [markdown]
# ## 4. Do the clusters recover the slice level?
# The adjusted Rand index (ARI) compares two groupings: 1 means identical, about 0 means no better
# than chance. We compare clusters from each embedding with the true level, at k = 3 (there are three
# levels) and at the chosen k.

# %%
rows = []
for name, feats in [("vgg16", features), ("intensity", cheap), ("hog", splitting.embed(data, "hog"))]:
    for k in (3, K):
        rows.append({"embedding": name, "k": k,
                     "ARI vs level": splitting.adjusted_rand(splitting.cluster(feats, k, seed=SEED), levels)})
ari = pd.DataFrame(rows).pivot(index="embedding", columns="k", values="ARI vs level").round(3)
display(ari)
assert ari.to_numpy().max() <= 1.0 and ari.to_numpy().min() >= -1.0

# %% [markdown]
# ## 5. Split: stratified by cluster, grouped by patient
# Train and test should contain every kind of slice, in the proportions of the whole set. And no
# patient may have slices on both sides — otherwise the test measures memory of a patient's anatomy,
# not generalisation. Whole patients are assigned so that each subset's cluster mix matches the
# overall one as closely as the patients allow, and whole patients are a real limit: a subset of one
# or two patients (the cell prints how many patients each subset got) can only hold those patients'
# slices, whichever patients are picked. Its mix, and its `tv_distance` in the table, is then not
# expected to beat a random split's; stratifying pays off in the larger subsets.

# %%
split = splitting.cluster_split(data, clusters, test=TEST, val=VAL, seed=SEED, group_by_patient=True)
leak = splitting.check_leakage(split)
print(split.counts(), "·", leak,
      "· clusters missing from test:", split.params["missing_in_test"] or "none")
report = splitting.balance_report(split)
display(report.round(3))
assert sum(split.counts().values()) == len(data)
assert split.counts()["test"] > 0 and split.counts()["val"] > 0

# %% [markdown]
# Compared with a plain random split by patient, over several seeds: how far is each subset's
# cluster mix from the overall mix (total-variation distance, 0 = identical)?

# %%
comparison = splitting.compare_balance(data, clusters, seed=SEED, n_seeds=5, test=TEST, val=VAL, progress=False)
display(splitting.plot_balance(comparison))
means = comparison.groupby("method")["tv_distance"].mean()
print(means.round(3).to_dict())
assert means["cluster"] <= means["random"] + 1e-9, "the stratified split should be at least as balanced"

# %% [markdown]
# ## 6. Save the split
# A split is a small file: case id → subset, cluster, patient. Images stay where they are. Later
# notebooks (04, 06, 07, 09) load this file, so every model is trained and tested on the same
# slices.

# %%
path = split.save(SPLIT_FILE)
again = splitting.Split.load(path)
assert again.case_ids == split.case_ids and again.subsets == split.subsets
print(f"saved {path.relative_to(paths.project_root())}: {again.counts()}")
display(again.to_frame().head())

# %% [markdown]
# ## 7. The same on real data (CT-ICH)
# When `../shared/data/ct-ich` is present, we split its hemorrhage slices the same way, grouped by
# the real patient ids (the data's `SOURCE.md`, read 2026-12-04, lists 318 slices with hemorrhage
# from 36 patients; the cell prints what it loaded). These are **traumatic intracranial
# hemorrhages, not ischemic strokes**. The images are already brain-windowed PNGs.

# %%
ctich = paths.ctich_dir()
if ctich is None:
    print("CT-ICH not found (../shared/data/ct-ich or $STROKEKIT_CTICH): skipping the real-data split.")
else:
    real = io.load_ctich(ctich, image_size=128, lesion_only=True, progress=False)
    if REAL_EMBEDDING == "vgg16":
        real_features = splitting.embed_vgg16(real, use_overlay=USE_OVERLAY, image_size=VGG_SIZE, seed=SEED,
                                              progress=False)
    else:
        real_features = splitting.embed(real, REAL_EMBEDDING, use_overlay=USE_OVERLAY)

# %% [markdown]
# Then the same steps as on the phantom: cluster the features, assign whole patients to the subsets by
# cluster, and check that no patient is on both sides.

# %%
if ctich is not None:
    real_clusters = splitting.cluster(real_features, K, seed=SEED)
    real_split = splitting.cluster_split(real, real_clusters, test=TEST, val=VAL, seed=SEED)
    splitting.check_leakage(real_split)
    by_subset = real_split.to_frame().groupby("subset")["patient_id"].nunique().to_dict()
    print(f"{len(real)} slices of {len(real.patients())} patients → slices {real_split.counts()}, patients {by_subset}")
    display(splitting.plot_cluster_montage(real, real_clusters, per_cluster=4, seed=SEED))
    assert sum(by_subset.values()) == len(real.patients())

# %% [markdown]
# ## Exercises
# 1. Split with `group_by_patient=False` (the study's way) and run `check_leakage`. What does it say,
#    and why would the test score be too optimistic?
# 2. Which embedding recovers the slice level best on the phantom? Does that change with `USE_OVERLAY`?
# 3. Put your own ImageNet weights in `~/.keras/models/` and compare the ARI with the random fallback.
#
# ## Summary
# - Embed → cluster → stratify makes small test sets representative; grouping by patient keeps them honest.
# - The split is a file of case ids; the images never move.
#
# **Next →** [03 · Augmentation](03_augmentation.ipynb)
