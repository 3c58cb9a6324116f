"""Clustering-based train/validation/test splits for few-shot data.

The study's trick for 56 labelled slices: embed every slice with an ImageNet VGG16, cluster the
embeddings with KMeans (8 clusters) and draw the test set evenly from the clusters, so that every
subset holds every kind of slice (skull base, ventricles, vertex; large and small lesions). Here
the draw is also *grouped by patient* — no patient's slices in two subsets — and the result is a
file (:class:`Split`, JSON or CSV) that later notebooks load. Files on disk are never moved.

Pipeline: :func:`embed` (``"vgg16"``, ``"intensity"``, ``"hog"``) → :func:`cluster` (choose k with
:func:`choose_k`) → :func:`cluster_split` → :meth:`Split.save`; check with :func:`check_leakage`
and :func:`balance_report`; compare with :func:`random_split` through :func:`compare_balance`.

Introduced in notebooks/02_cluster_split.ipynb.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset import SliceDataset, _check_unique, _strings
from .errors import DataError
from .preprocess import overlay_mask, resize_image, to_unit_range

if TYPE_CHECKING:  # matplotlib is imported by the plotting functions only
    from matplotlib.figure import Figure

#: Subset names in canonical order.
SUBSETS: tuple[str, ...] = ("train", "val", "test")

#: File name Keras gives the ImageNet VGG16 weights without the classifier head.
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

_SPLIT_FORMAT = "strokekit-split"
_SPLIT_VERSION = 1
_CSV_HEADER = "# strokekit-split "

# Cost weights of the grouped search, largest first: a hard constraint is worth more than any
# number of softer ones could add up to on realistic data (a few thousand slices).
_COST_EMPTY = 1e9  # a requested subset left without slices
_COST_TOLERANCE = 1e6  # per slice beyond the documented size tolerance
_COST_MISSING = {"test": 1e4, "train": 3e3, "val": 1e3}  # per eligible cluster absent


class LeakageError(DataError):
    """A patient's slices appear in more than one subset.

    Attributes:
        patients: the offending patient ids, each with the subsets it appears in.
    """

    def __init__(self, message: str, patients: Mapping[str, Sequence[str]] | None = None):
        super().__init__(message)
        self.patients = dict(patients or {})


# ============================================================================== images → features
def _unit_images(
    data: SliceDataset | np.ndarray,
    window: str | Sequence[float] = "brain",
    use_overlay: bool = False,
) -> np.ndarray:
    """float32 images in [0, 1]: (N, H, W) grey, or (N, H, W, 3) RGB (overlays, colour inputs)."""
    if isinstance(data, SliceDataset):
        images = data.images
        if images.ndim == 4:
            # 3-channel display data is kept as colour; other channel counts (e.g. stacked HU
            # windows) are reduced to grey so every slice becomes one picture.
            if images.shape[-1] == 3 and data.unit == "display" and not use_overlay:
                return np.stack([to_unit_range(im, "display") for im in images]).astype(np.float32)
            images = images.mean(axis=-1)
        unit = (
            np.stack([to_unit_range(im, data.unit, window) for im in images])
            if len(images)
            else images
        )
        unit = np.asarray(unit, dtype=np.float32)
        if use_overlay:
            return np.stack(
                [overlay_mask(im, m).astype(np.float32) / 255.0 for im, m in zip(unit, data.masks)]
            )
        return unit
    if use_overlay:
        raise ValueError(
            "use_overlay=True needs a SliceDataset (the overlay needs the masks), got an array"
        )
    images = np.asarray(data)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[-1] != 3:
        images = images.mean(axis=-1)
    if images.ndim not in (3, 4):
        raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, 3), got {images.shape}")
    # A plain array carries no unit: 0..255 (or uint8) is display data, anything else is [0, 1].
    return to_unit_range(images.astype(np.float32), "display").astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a batch (N, H, W[, C]) to (N, size, size[, C]) with the kit's one resizer."""
    if images.shape[1:3] == (size, size):
        return images.astype(np.float32)
    return np.stack([resize_image(im, size) for im in images]).astype(np.float32)


def _block_mean(images: np.ndarray, size: int) -> np.ndarray:
    """Exact block averages when the image side is a multiple of ``size``, else a smooth resize."""
    n, h, w = images.shape[:3]
    if h % size == 0 and w % size == 0:
        shape = (n, size, h // size, size, w // size) + images.shape[3:]
        return images.reshape(shape).mean(axis=(2, 4)).astype(np.float32)
    return _resize(images, size)


def _resolve_vgg16_weights(weights: str | os.PathLike | None) -> tuple[str | None, str]:
    """Find VGG16 weights without ever downloading (``strokekit.models.resolve_imagenet_weights``).

    Args:
        weights: ``"imagenet"`` (look in the Keras cache), None (random), or a weights file (or
            a folder holding :data:`VGG16_NOTOP_FILE`).

    Returns:
        (what to give ``keras.applications.VGG16(weights=...)``, a label): the cached file's
        path and ``"imagenet"``; None and ``"random"``; None and ``"random (offline fallback)"``
        after one UserWarning; or the given file and ``"file"``.

    Raises:
        DataError: a weights path that does not exist.
    """
    from .models import resolve_imagenet_weights  # imports Keras, so only when embedding

    path = resolve_imagenet_weights("vgg16", weights)
    if weights is None:
        return None, "random"
    if isinstance(weights, str) and weights == "imagenet":
        return path, "imagenet" if path is not None else "random (offline fallback)"
    return path, "file"


def _seeded_init(model, seed: int) -> None:
    """Give every conv/dense layer He-uniform kernels and zero biases from one NumPy seed.

    He scaling (not Keras's Glorot default) keeps the activation scale roughly constant through
    13 ReLU layers, so random features still reflect the input's coarse structure. Using NumPy
    instead of the backend's RNG gives the same weights on every backend without global seeding.
    """
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for variable in layer.weights:  # assign() avoids get_weights(), which warns under JAX
            shape = tuple(variable.shape)
            if len(shape) >= 2:
                limit = np.sqrt(6.0 / int(np.prod(shape[:-1])))
                value = rng.uniform(-limit, limit, size=shape)
            else:
                value = np.zeros(shape)
            variable.assign(value.astype(variable.dtype))


def embed_vgg16(
    dataset_or_images: SliceDataset | np.ndarray,
    use_overlay: bool = False,
    weights: str | os.PathLike | None = "imagenet",
    batch_size: int = 16,
    image_size: int | None = 224,
    pooling: str = "avg",
    window: str | Sequence[float] = "brain",
    seed: int = 0,
    progress: bool = True,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """VGG16 features of every slice: the convolutional base, globally pooled (512 numbers each).

    Grey slices are windowed to [0, 1] (``to_unit_range``), copied to 3 channels, resized, scaled to
    0..255 and passed through ``keras.applications.vgg16.preprocess_input``. With
    ``use_overlay=True`` the input is the mask overlaid in colour on the slice, as the study did.

    The ImageNet weights are never downloaded: ``weights="imagenet"`` uses the file in the Keras
    cache (``$KERAS_HOME/models/`` or ``~/.keras/models/``, name :data:`VGG16_NOTOP_FILE`) when it
    is there; otherwise it warns once and falls back to VGG16 with random weights drawn under
    ``seed`` (He-uniform, zero bias; the lookup is ``strokekit.models.resolve_imagenet_weights``).
    Random convolutional features still carry coarse shape and intensity structure, so clusters
    remain meaningful, only less semantic. Check which was used with ``return_info=True``.

    Args:
        dataset_or_images: a SliceDataset, or an array (N, H, W) / (N, H, W, 3) in [0, 1] or 0..255.
        use_overlay: embed the colour overlay of the mask instead of the bare slice (dataset only).
        weights: ``"imagenet"`` (from the cache, else random fallback), None (random weights under
            ``seed``), or the path of a weights file for ``VGG16(include_top=False)``.
        batch_size: images per forward pass.
        image_size: side the slices are resized to (≥ 32); None keeps their own size.
        pooling: ``"avg"`` or ``"max"`` global pooling of the last block.
        window: HU window for datasets in HU (see ``strokekit.preprocess.WINDOWS``).
        seed: seed of the random weights (ignored when weights are loaded).
        progress: show a tqdm bar.
        return_info: also return a dict with ``weights`` (``"imagenet"``, ``"random"``,
            ``"random (offline fallback)"`` or ``"file"``), ``weights_path``, ``image_size``,
            ``pooling``, ``use_overlay``, ``backend`` and ``seed``.

    Returns:
        float32 array (N, 512); with ``return_info``, the pair (features, info).

    Raises:
        ValueError: bad pooling, image size or batch size.
        DataError: a weights path that does not exist.
    """
    if pooling not in ("avg", "max"):
        raise ValueError(f"Expected one of ['avg', 'max']. Received: pooling={pooling!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images = _unit_images(dataset_or_images, window, use_overlay)
    size = int(image_size) if image_size is not None else None
    if size is None and images.shape[1] != images.shape[2]:
        raise ValueError(f"image_size=None needs square images, got {images.shape[1:3]}")
    side = size if size is not None else images.shape[1]
    if side < 32:
        raise ValueError(f"VGG16 needs images of at least 32x32 pixels, got image_size={side}")
    weights_arg, label = _resolve_vgg16_weights(weights)

    import keras
    from tqdm.auto import tqdm

    # weights_arg is a local file or None, never the string "imagenet": Keras would try to download.
    model = keras.applications.VGG16(
        include_top=False, weights=weights_arg, input_shape=(side, side, 3), pooling=pooling
    )
    if weights_arg is None:
        _seeded_init(model, seed)
    preprocess = keras.applications.vgg16.preprocess_input

    features = np.zeros((len(images), model.output_shape[-1]), dtype=np.float32)
    with tqdm(total=len(images), desc="VGG16 features", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = _resize(images[start : start + batch_size], side)
            if batch.ndim == 3:
                batch = np.repeat(batch[..., None], 3, axis=-1)
            batch = preprocess(batch * 255.0)
            count = len(batch)
            if count < batch_size and start > 0:
                # pad the last batch to the usual shape: a new shape means a new trace/compile
                pad = np.zeros((batch_size - count, *batch.shape[1:]), dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            out = np.asarray(model.predict_on_batch(batch))
            features[start : start + count] = out[:count]
            bar.update(count)
    if not return_info:
        return features
    info = {
        "weights": label,
        "weights_path": weights_arg,
        "image_size": side,
        "pooling": pooling,
        "use_overlay": bool(use_overlay),
        "backend": keras.backend.backend(),
        "seed": int(seed),
    }
    return features, info


def embed_intensity(
    dataset_or_images: SliceDataset | np.ndarray,
    size: int = 16,
    window: str | Sequence[float] = "brain",
    use_overlay: bool = False,
) -> np.ndarray:
    """The cheapest embedding: the windowed slice shrunk to size x size, flattened.

    Args:
        dataset_or_images: a SliceDataset or an image array (see :func:`embed_vgg16`).
        size: side of the thumbnail; block averages when it divides the image side.
        window: HU window for datasets in HU.
        use_overlay: thumbnail the colour overlay instead (3 values per pixel).

    Returns:
        float32 array (N, size*size) (times 3 with an overlay).
    """
    if size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    images = _unit_images(dataset_or_images, window, use_overlay)
    return _block_mean(images, size).reshape(len(images), -1)


def embed_hog(
    dataset_or_images: SliceDataset | np.ndarray,
    size: int = 64,
    orientations: int = 9,
    pixels_per_cell: int = 8,
    cells_per_block: int = 2,
    window: str | Sequence[float] = "brain",
) -> np.ndarray:
    """Histogram-of-oriented-gradients features (``skimage.feature.hog``) of each windowed slice.

    Args:
        dataset_or_images: a SliceDataset or an image array (see :func:`embed_vgg16`).
        size: side the slices are resized to first, so every slice gives the same length.
        orientations: gradient direction bins.
        pixels_per_cell: side of a cell in pixels.
        cells_per_block: side of a normalisation block in cells.
        window: HU window for datasets in HU.

    Returns:
        float32 array (N, D) with D = orientations * cells_per_block² * blocks².
    """
    from skimage.feature import hog

    if size < pixels_per_cell * cells_per_block:
        raise ValueError(
            f"size={size} is smaller than one block ({pixels_per_cell * cells_per_block} pixels)"
        )
    images = _resize(_unit_images(dataset_or_images, window), size)
    if images.ndim == 4:
        images = images.mean(axis=-1)
    return np.stack(
        [
            hog(
                im,
                orientations=orientations,
                pixels_per_cell=(pixels_per_cell, pixels_per_cell),
                cells_per_block=(cells_per_block, cells_per_block),
                feature_vector=True,
            )
            for im in images
        ]
    ).astype(np.float32)


#: Embedding methods by name, for :func:`embed`.
EMBEDDINGS: dict[str, Callable[..., Any]] = {
    "vgg16": embed_vgg16,
    "intensity": embed_intensity,
    "hog": embed_hog,
}


def embed(dataset_or_images: SliceDataset | np.ndarray, method: str = "vgg16", **kwargs: Any):
    """Embed every slice with a method from :data:`EMBEDDINGS`; ``kwargs`` go to that function.

    Raises:
        ValueError: an unknown method name.
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"Expected one of {sorted(EMBEDDINGS)}. Received: method={method!r}")
    return EMBEDDINGS[method](dataset_or_images, **kwargs)


# ====================================================================================== clustering
def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N, D), got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or infinite values")
    return features


def _prepare(
    features: np.ndarray, standardize: bool, pca: int | float | None, seed: int
) -> np.ndarray:
    """Standardise (zero mean, unit variance per feature) and optionally reduce with PCA."""
    x = _check_features(features)
    if standardize:
        from sklearn.preprocessing import StandardScaler

        x = StandardScaler().fit_transform(x)
    if pca is not None:
        from sklearn.decomposition import PCA

        if isinstance(pca, (int, np.integer)) and not 1 <= pca <= min(x.shape):
            raise ValueError(
                f"pca={pca} components for {x.shape[0]} samples of {x.shape[1]} features"
            )
        with _one_thread():
            x = PCA(n_components=pca, random_state=seed).fit_transform(x)
    return x


def _check_k(k: int, n: int) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if int(k) > n:
        raise ValueError(f"k={k} clusters requested for only {n} images; choose k <= {n}")


def _one_thread():
    """Run scikit-learn's native loops on one thread.

    Why: OpenMP/BLAS thread counts change floating-point summation order, so KMeans and t-SNE
    could differ between machines; and on small shared machines (2 cores, other jobs) OpenMP
    threads spin-wait — t-SNE of 12 points took 20 s instead of 0.2 s. The problems here are
    small (at most a few thousand slices), so one thread costs little.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by size (largest = 0), ties by first appearance, so labels are stable."""
    labels = np.asarray(labels)
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    mapping = {uniq[i]: new for new, i in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=np.int64)


def cluster(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    standardize: bool = True,
    pca: int | float | None = None,
    n_init: int = 10,
) -> np.ndarray:
    """KMeans cluster labels of the embeddings (deterministic for a seed).

    Args:
        features: (N, D) embeddings.
        k: number of clusters (the study used 8 for 56 images).
        seed: KMeans and PCA seed.
        standardize: scale every feature to unit variance first (else large features dominate).
        pca: reduce to this many components (int) or this fraction of variance (float) first.
        n_init: KMeans restarts (fixed, so results do not depend on the sklearn version's default).

    Returns:
        int64 labels 0..k-1, numbered by cluster size (0 = largest).

    Raises:
        ValueError: k < 1 or k larger than the number of images; bad features.
    """
    from sklearn.cluster import KMeans

    x = _prepare(features, standardize, pca, seed)
    _check_k(k, len(x))
    with _one_thread():
        labels = KMeans(n_clusters=int(k), n_init=n_init, random_state=seed).fit_predict(x)
    return _canonical_labels(labels)


def choose_k(
    features: np.ndarray,
    ks: Sequence[int] = range(2, 13),
    seed: int = 0,
    standardize: bool = True,
    pca: int | float | None = None,
    n_init: int = 10,
):
    """Inertia (for the elbow plot) and silhouette score for each candidate k.

    Args:
        features: (N, D) embeddings.
        ks: candidate numbers of clusters, each in 2..N-1 (the silhouette needs that).
        seed, standardize, pca, n_init: as in :func:`cluster`.

    Returns:
        DataFrame with columns ``k``, ``inertia``, ``silhouette`` (one row per k).

    Raises:
        ValueError: a k outside 2..N-1.
    """
    import pandas as pd
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = _prepare(features, standardize, pca, seed)
    ks = [int(k) for k in ks]
    bad = [k for k in ks if not 2 <= k <= len(x) - 1]
    if bad or not ks:
        raise ValueError(
            f"every k must lie in 2..{len(x) - 1} for {len(x)} images, got {bad or ks}"
        )
    rows = []
    for k in ks:
        with _one_thread():
            model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
            silhouette = float(silhouette_score(x, model.labels_))
        rows.append({"k": k, "inertia": float(model.inertia_), "silhouette": silhouette})
    return pd.DataFrame(rows)


def plot_choose_k(table) -> Figure:
    """Elbow (inertia) and silhouette curves from :func:`choose_k`; the best k is marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(table["k"], table["inertia"], "o-")
    ax1.set(xlabel="k (clusters)", ylabel="inertia (within-cluster sum of squares)", title="Elbow")
    ax2.plot(table["k"], table["silhouette"], "o-", color="tab:orange")
    best = table.loc[table["silhouette"].idxmax()]
    ax2.axvline(best["k"], color="grey", ls="--", lw=1)
    ax2.set(
        xlabel="k (clusters)",
        ylabel="silhouette score",
        title=f"Silhouette (best k = {int(best['k'])})",
    )
    return fig


def embed_2d(
    features: np.ndarray, method: str = "pca", seed: int = 0, standardize: bool = True
) -> np.ndarray:
    """Project embeddings to 2-D for plotting.

    Args:
        features: (N, D) embeddings.
        method: ``"pca"`` (linear, fast) or ``"tsne"`` (neighbourhoods, slower).
        seed: random state of the projection.
        standardize: scale features to unit variance first.

    Returns:
        float array (N, 2).
    """
    methods = ("pca", "tsne")
    if method not in methods:
        raise ValueError(f"Expected one of {list(methods)}. Received: method={method!r}")
    x = _prepare(features, standardize, None, seed)
    if len(x) < 3:
        raise ValueError(f"need at least 3 samples to project, got {len(x)}")
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
        if xy.shape[1] < 2:
            xy = np.hstack([xy, np.zeros((len(xy), 1))])
        return xy
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (len(x) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with _one_thread():
        return tsne.fit_transform(x)


def plot_embedding(
    xy: np.ndarray, labels: Sequence[Any], title: str = "", style: Sequence[Any] | None = None
) -> Figure:
    """Scatter of a 2-D embedding coloured by label (cluster, level, ...), markers by ``style``.

    Args:
        xy: (N, 2) points from :func:`embed_2d`.
        labels: colour category of each point.
        title: axes title.
        style: marker category of each point (e.g. the subset of a :class:`Split`).

    Returns:
        a matplotlib Figure.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    xy = np.asarray(xy)
    labels = np.asarray(labels)
    if len(labels) != len(xy):
        raise ValueError(f"{len(labels)} labels for {len(xy)} points")
    cats = list(dict.fromkeys(sorted(labels.tolist(), key=str)))
    cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    styles = [None] if style is None else list(dict.fromkeys(np.asarray(style).tolist()))
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for ci, cat in enumerate(cats):
        for si, st in enumerate(styles):
            sel = labels == cat
            if style is not None:
                sel &= np.asarray(style) == st
            if not sel.any():
                continue
            name = f"{cat}" if style is None else f"{cat} · {st}"
            ax.scatter(
                *xy[sel].T,
                color=cmap(ci % cmap.N),
                marker=markers[si % len(markers)],
                s=28,
                label=name,
            )
    ax.set(title=title, xlabel="dim 1", ylabel="dim 2")
    ax.legend(fontsize="small", loc="best", ncols=2 if len(cats) * len(styles) > 8 else 1)
    return fig


def plot_cluster_montage(
    dataset: SliceDataset,
    labels: Sequence[int],
    per_cluster: int = 4,
    seed: int = 0,
    overlay: bool = True,
    window: str | Sequence[float] = "brain",
) -> Figure:
    """A grid of example slices: one row per cluster (as the study's figure of 8 classes).

    Args:
        dataset: the slices that were clustered.
        labels: cluster of each slice.
        per_cluster: examples per row, drawn under ``seed`` (all of them if the cluster is smaller).
        seed: which examples are shown.
        overlay: colour the masks onto the slices.
        window: HU window for datasets in HU.

    Returns:
        a matplotlib Figure with ``clusters x per_cluster`` axes.
    """
    from matplotlib.figure import Figure

    labels = np.asarray(labels)
    if len(labels) != len(dataset):
        raise ValueError(f"{len(labels)} labels for {len(dataset)} slices")
    rng = np.random.default_rng(seed)
    clusters = sorted(np.unique(labels).tolist(), key=str)
    fig = Figure(figsize=(1.6 * per_cluster + 0.6, 1.6 * len(clusters)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(clusters), per_cluster, squeeze=False))
    for row, c in enumerate(clusters):
        members = np.flatnonzero(labels == c)
        shown = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
        for col in range(per_cluster):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col == 0:
                ax.set_ylabel(f"cluster {c}\n(n={len(members)})", fontsize="small")
            if col >= len(shown):
                continue
            i = shown[col]
            picture = _unit_images(dataset.subset([i]), window, use_overlay=overlay)[0]
            ax.imshow(picture, cmap=None if picture.ndim == 3 else "gray", vmin=0, vmax=1)
            ax.set_title(dataset.case_ids[i], fontsize="x-small")
    return fig


def adjusted_rand(clusters: Sequence[Any], truth: Sequence[Any]) -> float:
    """Adjusted Rand index of clusters against true groups (1 = same partition, ~0 = chance)."""
    from sklearn.metrics import adjusted_rand_score

    clusters, truth = np.asarray(clusters), np.asarray(truth)
    if len(clusters) != len(truth):
        raise ValueError(f"{len(clusters)} cluster labels for {len(truth)} true labels")
    return float(adjusted_rand_score(truth, clusters))


# ========================================================================================= Split
def _plain(value: Any) -> Any:
    """JSON-ready Python value (numpy scalars → Python, tuples → lists), for exact round trips."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _cluster_value(value: Any) -> int | str:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return str(value)


@dataclasses.dataclass
class Split:
    """Which subset every slice belongs to, with the clusters and patients behind the choice.

    Attributes:
        case_ids: slice ids (``SliceDataset.case_ids``).
        subsets: ``"train"``, ``"val"`` or ``"test"`` for each case.
        clusters: cluster label of each case (int or str), or None.
        patient_ids: patient of each case, or None when unknown.
        seed: the seed that made the split (None for a hand-made one).
        method: how it was made (``"cluster"``, ``"random"``, ``"manual"``, ...).
        params: the request (fractions, sizes, tolerance, ...), JSON-ready.
    """

    case_ids: list[str]
    subsets: list[str]
    clusters: list[int | str] | None = None
    patient_ids: list[str] | None = None
    seed: int | None = None
    method: str = "manual"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.case_ids = [str(c) for c in self.case_ids]
        n = len(self.case_ids)
        self.subsets = _strings(self.subsets, "subset names", n, "cases")
        unknown = sorted(set(self.subsets) - set(SUBSETS))
        if unknown:
            raise DataError(f"unknown subset name(s) {unknown}; expected {list(SUBSETS)}")
        _check_unique(self.case_ids)
        if self.clusters is not None:
            self.clusters = [_cluster_value(c) for c in self.clusters]
            if len(self.clusters) != n:
                raise DataError(f"{len(self.clusters)} cluster labels for {n} cases")
        self.patient_ids = _strings(self.patient_ids, "patient ids", n, "cases")
        self.seed = None if self.seed is None else int(self.seed)
        self.method = str(self.method)
        self.params = json.loads(json.dumps(_plain(dict(self.params))))

    def __len__(self) -> int:
        return len(self.case_ids)

    @property
    def names(self) -> list[str]:
        """The subsets that hold at least one case, in canonical order."""
        present = set(self.subsets)
        return [s for s in SUBSETS if s in present]

    def _check_subset(self, subset: str) -> None:
        if subset not in SUBSETS:
            raise ValueError(f"Expected one of {list(SUBSETS)}. Received: subset={subset!r}")

    def indices(self, subset: str) -> np.ndarray:
        """Positions of a subset's cases in this split's case order (the dataset's order)."""
        self._check_subset(subset)
        return np.flatnonzero(np.asarray(self.subsets, dtype=object) == subset)

    def cases(self, subset: str) -> list[str]:
        """Case ids of a subset."""
        return [self.case_ids[i] for i in self.indices(subset)]

    def dataset(self, dataset: SliceDataset, subset: str) -> SliceDataset:
        """The slices of ``dataset`` in ``subset``, looked up by case id (order of the split)."""
        return dataset.select_cases(self.cases(subset))

    def counts(self) -> dict[str, int]:
        """Slices per subset (canonical order, empty subsets included)."""
        c = Counter(self.subsets)
        return {s: int(c.get(s, 0)) for s in SUBSETS}

    def to_frame(self):
        """One row per case: ``case_id``, ``patient_id``, ``subset``, ``cluster``."""
        import pandas as pd

        n = len(self)
        return pd.DataFrame(
            {
                "case_id": self.case_ids,
                "patient_id": self.patient_ids if self.patient_ids is not None else [None] * n,
                "subset": self.subsets,
                "cluster": self.clusters if self.clusters is not None else [None] * n,
            }
        )

    def _meta(self) -> dict[str, Any]:
        return {
            "format": _SPLIT_FORMAT,
            "version": _SPLIT_VERSION,
            "method": self.method,
            "seed": self.seed,
            "params": self.params,
            "counts": self.counts(),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the split as JSON (``.json``: metadata + one case per line) or CSV (``.csv``: a
        ``# strokekit-split {...}`` metadata line, then ``case_id,patient_id,subset,cluster``).

        Returns:
            the path written.

        Raises:
            ValueError: an extension other than .json or .csv.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise ValueError(
                f"Expected one of ['.csv', '.json']. Received: extension={path.suffix!r}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        if suffix == ".json":
            records = []
            for i, case in enumerate(self.case_ids):
                records.append(
                    {
                        "case_id": case,
                        "patient_id": None if self.patient_ids is None else self.patient_ids[i],
                        "subset": self.subsets[i],
                        "cluster": None if self.clusters is None else self.clusters[i],
                    }
                )
            head = json.dumps(meta, indent=1)[:-2]  # drop the closing "\n}" to append the cases
            body = ",\n".join("  " + json.dumps(r) for r in records)
            text = f'{head},\n "cases": [\n{body}\n ]\n}}\n'
        else:
            buffer = io.StringIO()
            self.to_frame().to_csv(buffer, index=False, lineterminator="\n")
            text = _CSV_HEADER + json.dumps(meta) + "\n" + buffer.getvalue()
        from .paths import write_text_atomic

        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        """Read a split written by :meth:`save`, or a hand-made CSV with ``case_id``, ``subset``.

        Raises:
            DataError: naming the file — missing, unreadable, wrong format, missing columns,
                unknown subset names, duplicate case ids or counts that do not match.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(
                "split file not found; make one with strokekit.split.cluster_split(...).save(path)",
                path,
            )
        suffix = path.suffix.lower()
        if suffix not in (".json", ".csv"):
            raise DataError(
                f"unknown split file extension {path.suffix!r}; expected .json or .csv", path
            )
        text = path.read_text(encoding="utf-8")
        meta: dict[str, Any] = {}
        try:
            if suffix == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(f"not valid JSON ({err})", path) from None
                if not isinstance(data, dict) or data.get("format") != _SPLIT_FORMAT:
                    raise DataError(
                        f'not a strokekit split file (expected "format": "{_SPLIT_FORMAT}")', path
                    )
                meta = data
                records = data.get("cases")
                if not isinstance(records, list):
                    raise DataError('missing the "cases" list', path)
                columns = {"case_id": [], "patient_id": [], "subset": [], "cluster": []}
                for i, rec in enumerate(records):
                    if not isinstance(rec, dict):
                        raise DataError(f"case {i} is not an object", path)
                    missing = [k for k in ("case_id", "subset") if k not in rec]
                    if missing:
                        raise DataError(f"case {i} lacks the field(s) {missing}", path)
                    for key, values in columns.items():
                        values.append(rec.get(key))
                pids, clusters = columns["patient_id"], columns["cluster"]
            else:
                import pandas as pd

                lines = text.splitlines(keepends=True)
                if lines and lines[0].startswith("#"):
                    header = (
                        lines[0][len(_CSV_HEADER) :] if lines[0].startswith(_CSV_HEADER) else "{}"
                    )
                    try:
                        meta = json.loads(header)
                    except json.JSONDecodeError as err:
                        raise DataError(f"unreadable metadata line ({err})", path) from None
                    lines = lines[1:]
                try:
                    frame = pd.read_csv(
                        io.StringIO("".join(lines)), dtype=str, keep_default_na=False
                    )
                except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
                    raise DataError(f"not a readable CSV ({err})", path) from None
                missing = [c for c in ("case_id", "subset") if c not in frame.columns]
                if missing:
                    raise DataError(
                        f"missing column(s) {missing}; a split CSV needs case_id and subset "
                        f"(patient_id and cluster are optional), found {list(frame.columns)}",
                        path,
                    )
                columns = {c: frame[c].tolist() for c in frame.columns}
                pids = columns.get("patient_id")
                if pids is not None and all(p == "" for p in pids):
                    pids = None
                clusters = columns.get("cluster")
                if clusters is not None:
                    if all(c == "" for c in clusters):
                        clusters = None
                    elif all(c.lstrip("-").isdigit() for c in clusters):
                        clusters = [int(c) for c in clusters]
            if pids is not None and all(p is None for p in pids):
                pids = None
            if clusters is not None and all(c is None for c in clusters):
                clusters = None
            unknown = sorted({str(s) for s in columns["subset"]} - set(SUBSETS))
            if unknown:
                raise DataError(f"unknown subset name(s) {unknown}; expected {list(SUBSETS)}", path)
            split = cls(
                case_ids=columns["case_id"],
                subsets=columns["subset"],
                clusters=clusters,
                patient_ids=pids,
                seed=meta.get("seed"),
                method=meta.get("method", "manual"),
                params=meta.get("params", {}),
            )
        except DataError as err:
            if err.path is None:
                raise DataError(err.problem, path) from None
            raise
        if "counts" in meta and meta["counts"] != split.counts():
            raise DataError(
                f"the cases add up to {split.counts()} but the file says {meta['counts']}", path
            )
        return split


# ======================================================================================= splitting
def _request_sizes(n: int, test: float | int, val: float | int) -> dict[str, int]:
    """Slices wanted per subset from fractions (of n) or integer counts; train takes the rest."""
    sizes = {}
    for name, value in (("test", test), ("val", val)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"{name} must be a fraction (float) or a count (int), got {value!r}")
        if not np.isfinite(value):
            raise ValueError(
                f"{name}={value} is not a finite number; expected a fraction in [0, 1) or a count >= 0"
            )
        if value < 0:
            raise ValueError(
                f"{name}={value} is negative; expected a fraction in [0, 1) or a count >= 0"
            )
        if isinstance(value, (int, np.integer)):
            sizes[name] = int(value)
        else:
            if value >= 1:
                raise ValueError(
                    f"{name}={value} must be a fraction below 1 (or an int count of slices)"
                )
            sizes[name] = max(1, int(np.floor(value * n + 0.5))) if value > 0 else 0
    fractions = [v for v in (test, val) if isinstance(v, (float, np.floating))]
    if len(fractions) == 2 and sum(fractions) >= 1:
        raise ValueError(
            f"test + val = {test} + {val} must sum to less than 1 to leave training slices"
        )
    if sizes["test"] + sizes["val"] >= n:
        raise ValueError(
            f"test ({sizes['test']}) + val ({sizes['val']}) slices leave no training slices "
            f"out of {n}"
        )
    sizes["train"] = n - sizes["test"] - sizes["val"]
    return sizes


def _active(sizes: Mapping[str, int]) -> list[str]:
    """Subsets with a non-zero request, in the order they are filled: test first."""
    return [s for s in ("test", "val", "train") if sizes[s] > 0]


def _patient_ids(dataset: SliceDataset, group_by_patient: bool) -> list[str] | None:
    if group_by_patient and dataset.patient_ids is None:
        raise ValueError(
            "group_by_patient=True needs patient ids, but this dataset has none: pass patient ids "
            "(SliceDataset(..., patient_ids=...)) or group_by_patient=False"
        )
    return dataset.patient_ids


def _patient_index(dataset: SliceDataset, names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct patients and each slice's patient number; refuses more subsets than patients."""
    patients = dataset.patients()
    if len(names) > len(patients):
        raise ValueError(
            f"{len(names)} subsets ({', '.join(names)}) requested but the dataset has only "
            f"{len(patients)} patient(s); ask for fewer subsets (val=0) or use "
            "group_by_patient=False"
        )
    pindex = {p: i for i, p in enumerate(patients)}
    return patients, np.array([pindex[p] for p in dataset.patient_ids], dtype=np.int64)


def _sequential_fill(order: np.ndarray, weights: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """Give items in ``order`` to subsets in turn, each until its size is nearest its target."""
    out = np.full(len(weights), len(targets) - 1, dtype=np.int64)
    pos = 0
    for s, target in enumerate(targets[:-1]):
        total = 0
        while pos < len(order):
            w = weights[order[pos]]
            if total > 0 and abs(total + w - target) >= abs(total - target):
                break
            out[order[pos]] = s
            total += w
            pos += 1
    return out


def _deal(sequence: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Deal items to subsets, each step to the subset furthest behind its share (exact totals)."""
    n = len(sequence)
    out = np.empty(n, dtype=np.int64)
    given = np.zeros(len(targets))
    for i, item in enumerate(sequence):
        s = int(np.argmax(targets * (i + 1) / n - given))  # ties go to the first: test
        out[item] = s
        given[s] += 1
    return out


def _subset_cost(
    counts: np.ndarray,
    s: int,
    targets: np.ndarray,
    q: np.ndarray,
    tol: float,
    eligible: np.ndarray,
    missing_cost: np.ndarray,
) -> np.ndarray:
    """Cost of subset s holding ``counts`` (..., K) slices per cluster (vectorised over ...)."""
    n = counts.sum(axis=-1)
    dev = np.abs(n - targets[s])
    cost = dev + np.abs(counts - targets[s] * q).sum(axis=-1)
    cost = cost + _COST_TOLERANCE * np.maximum(0.0, dev - tol)
    cost = cost + _COST_EMPTY * (n == 0)
    return cost + missing_cost[s] * ((counts == 0) & eligible).sum(axis=-1)


def _grouped_search(
    patient_counts: np.ndarray,
    targets: np.ndarray,
    q: np.ndarray,
    tol: float,
    eligible: np.ndarray,
    missing_cost: np.ndarray,
    rng: np.random.Generator,
    restarts: int,
) -> tuple[np.ndarray, float]:
    """Assign patients to subsets: seeded random starts, then steepest descent (moves, swaps)."""
    P = len(patient_counts)
    S = len(targets)
    sizes = patient_counts.sum(axis=1)

    def cost(counts: np.ndarray, s: int) -> np.ndarray:
        return _subset_cost(counts, s, targets, q, tol, eligible, missing_cost)

    best, best_cost = None, np.inf
    for _ in range(restarts):
        assign = _sequential_fill(rng.permutation(P), sizes, list(targets))
        totals = np.stack([patient_counts[assign == s].sum(axis=0) for s in range(S)]).astype(
            np.float64
        )
        current = np.array([cost(totals[s], s) for s in range(S)])
        for _step in range(20 * P + 20):
            top_delta, top = -1e-9, None
            for a in range(S):
                pa = np.flatnonzero(assign == a)
                if len(pa) == 0:
                    continue
                ca = patient_counts[pa]
                loss_a = cost(totals[a] - ca, a) - current[a]
                for b in range(S):
                    if b == a:
                        continue
                    delta = loss_a + cost(totals[b] + ca, b) - current[b]
                    i = int(np.argmin(delta))
                    if delta[i] < top_delta:
                        top_delta, top = delta[i], ("move", pa[i], a, b)
                for b in range(a + 1, S):
                    pb = np.flatnonzero(assign == b)
                    if len(pb) == 0:
                        continue
                    cb = patient_counts[pb]
                    diff = cb[None, :, :] - ca[:, None, :]  # (|a|, |b|, K): what a gains in a swap
                    delta = (
                        cost(totals[a] + diff, a)
                        + cost(totals[b] - diff, b)
                        - current[a]
                        - current[b]
                    )
                    i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
                    if delta[i, j] < top_delta:
                        top_delta, top = delta[i, j], ("swap", pa[i], pb[j], a, b)
            if top is None:
                break
            if top[0] == "move":
                _, p, a, b = top
                assign[p] = b
                totals[a] -= patient_counts[p]
                totals[b] += patient_counts[p]
            else:
                _, p, r, a, b = top
                assign[p], assign[r] = b, a
                totals[a] += patient_counts[r] - patient_counts[p]
                totals[b] += patient_counts[p] - patient_counts[r]
            current = np.array([cost(totals[s], s) for s in range(S)])
        total_cost = float(current.sum())
        if total_cost < best_cost - 1e-9:
            best, best_cost = assign.copy(), total_cost
    return best, best_cost


def cluster_split(
    dataset: SliceDataset,
    clusters: Sequence[Any],
    test: float | int = 0.25,
    val: float | int = 0.15,
    seed: int = 0,
    group_by_patient: bool = True,
    min_cluster_size: int | None = None,
    restarts: int = 10,
) -> Split:
    """Cluster-stratified split, grouped by patient: every subset gets every kind of slice.

    With ``group_by_patient=True`` whole patients are assigned: from ``restarts`` seeded random
    starts, a steepest-descent search moves and swaps patients between subsets to minimise, in
    order of priority, (1) a subset left empty, (2) a subset size further than the tolerance from
    its request, (3) an eligible cluster missing from test (then from train, then val), and (4) the
    sum of size errors and per-cluster count errors against the overall cluster proportions.

    Size tolerance: with patients, each subset's size is within ``m`` slices of its request, where
    ``m`` is the largest number of slices one patient has (usually much closer); a request that
    patients cannot meet otherwise is reported in ``params["size_error"]``. Without grouping the
    sizes are exact.

    With ``group_by_patient=False`` slices are drawn per cluster (the study's method): clusters and
    their members are shuffled under ``seed`` and dealt to subsets in proportion, so each cluster is
    spread as evenly as sizes allow. Patients may then cross subsets (see :func:`check_leakage`).

    Either way, every *eligible* cluster — one with at least ``min_cluster_size`` slices (default:
    the number of subsets, i.e. 3 with a validation set) — reaches the test set whenever patients
    allow it; ``params["missing_in_test"]`` lists any that could not.

    Args:
        dataset: the slices (with patient ids when grouping).
        clusters: cluster label of each slice (from :func:`cluster`, or any grouping).
        test: fraction (float in [0, 1)) or number (int) of slices for testing.
        val: fraction or number of slices for validation (0 for none).
        seed: seed of the search (or draw); the same seed gives the same split.
        group_by_patient: keep each patient's slices in one subset.
        min_cluster_size: clusters at least this big must reach the test set.
        restarts: random starts of the grouped search.

    Returns:
        a :class:`Split` with method ``"cluster"``.

    Raises:
        ValueError: negative or non-finite (nan, inf) fractions, fractions summing to 1 or more,
            no patient ids when grouping, more subsets than patients (or slices), a cluster label
            per slice missing.
    """
    n = len(dataset)
    clusters = np.asarray(
        [_cluster_value(c) for c in np.asarray(clusters, dtype=object).ravel()], dtype=object
    )
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} slices; expected one per slice")
    sizes = _request_sizes(n, test, val)
    names = _active(sizes)
    pids = _patient_ids(dataset, group_by_patient)
    rng = np.random.default_rng(seed)
    uniq = sorted(set(clusters.tolist()), key=lambda c: (isinstance(c, str), c))
    cidx = np.array([uniq.index(c) for c in clusters], dtype=np.int64)
    K = len(uniq)
    ccount = np.bincount(cidx, minlength=K)
    q = ccount / n
    min_size = len(names) if min_cluster_size is None else int(min_cluster_size)
    eligible = ccount >= min_size
    targets = np.array([sizes[s] for s in names], dtype=np.float64)
    missing_cost = np.array([_COST_MISSING[s] for s in names])

    if group_by_patient:
        patients, pid_idx = _patient_index(dataset, names)
        patient_counts = np.zeros((len(patients), K), dtype=np.float64)
        np.add.at(patient_counts, (pid_idx, cidx), 1.0)
        tol = float(patient_counts.sum(axis=1).max())
        assign_p, _ = _grouped_search(
            patient_counts, targets, q, tol, eligible, missing_cost, rng, max(1, restarts)
        )
        assign = assign_p[pid_idx]
    else:
        if len(names) > n:
            raise ValueError(f"{len(names)} subsets requested for only {n} slices")
        tol = 0.0
        order = rng.permutation(K)
        sequence = np.concatenate([rng.permutation(np.flatnonzero(cidx == k)) for k in order])
        assign = _deal(sequence, targets)
        test_pos = names.index("test") if "test" in names else None
        if test_pos is not None:
            # A small cluster may be dealt past the test set; swap one of its slices with a test
            # slice of the cluster that has the most test slices, which keeps every size exact.
            for k in np.flatnonzero(eligible):
                in_k = cidx == k
                if np.any(assign[in_k] == test_pos):
                    continue
                per_cluster_test = np.bincount(cidx[assign == test_pos], minlength=K)
                # a donor keeps its own place in test, unless it is too small to need one
                spare = np.where(eligible, per_cluster_test - 1, per_cluster_test)
                donor = int(np.argmax(spare))
                if spare[donor] < 1:
                    continue
                give = rng.choice(np.flatnonzero(in_k))
                take = rng.choice(np.flatnonzero((cidx == donor) & (assign == test_pos)))
                assign[give], assign[take] = test_pos, assign[give]

    subsets = [names[a] for a in assign]
    present_test = set(cidx[np.asarray(subsets) == "test"].tolist()) if "test" in names else set()
    missing = [
        uniq[k] for k in np.flatnonzero(eligible) if "test" in names and k not in present_test
    ]
    return _sized_split(
        dataset, subsets, sizes, "cluster", seed, pids, clusters.tolist(),
        test=test, val=val, group_by_patient=group_by_patient, tolerance=tol,
        min_cluster_size=min_size, missing_in_test=missing,
        restarts=int(restarts) if group_by_patient else None,
    )


def random_split(
    dataset: SliceDataset,
    test: float | int = 0.25,
    val: float | int = 0.15,
    seed: int = 0,
    group_by_patient: bool = True,
    clusters: Sequence[Any] | None = None,
) -> Split:
    """Plain random split for comparison: shuffled patients (or slices) cut to the requested sizes.

    Args:
        dataset: the slices (with patient ids when grouping).
        test, val, seed, group_by_patient: as in :func:`cluster_split` (same size tolerance).
        clusters: cluster labels to record in the split (for :func:`balance_report`); not used.

    Returns:
        a :class:`Split` with method ``"random"``.
    """
    n = len(dataset)
    sizes = _request_sizes(n, test, val)
    names = _active(sizes)
    pids = _patient_ids(dataset, group_by_patient)
    rng = np.random.default_rng(seed)
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} slices; expected one per slice")
    if group_by_patient:
        patients, pid_idx = _patient_index(dataset, names)
        psizes = np.bincount(pid_idx, minlength=len(patients))
        assign = _sequential_fill(
            rng.permutation(len(patients)), psizes, [sizes[s] for s in names]
        )[pid_idx]
        tol = float(psizes.max())
    else:
        assign = _sequential_fill(
            rng.permutation(n), np.ones(n, dtype=np.int64), [sizes[s] for s in names]
        )
        tol = 0.0
    return _sized_split(
        dataset, [names[a] for a in assign], sizes, "random", seed, pids,
        None if clusters is None else list(np.asarray(clusters, dtype=object).ravel()),
        test=test, val=val, group_by_patient=group_by_patient, tolerance=tol,
    )


def _sized_split(
    dataset: SliceDataset,
    subsets: list[str],
    sizes: Mapping[str, int],
    method: str,
    seed: int,
    patient_ids: list[str] | None,
    clusters: list | None,
    *,
    test: float | int,
    val: float | int,
    group_by_patient: bool,
    tolerance: float,
    **method_params: Any,
) -> Split:
    """The :class:`Split`; its params record the request, the sizes obtained and ``method_params``."""
    got = Counter(subsets)
    params = {
        "test": test,
        "val": val,
        "group_by_patient": bool(group_by_patient),
        "requested": {s: sizes[s] for s in SUBSETS},
        "sizes": {s: int(got.get(s, 0)) for s in SUBSETS},
        "size_error": {s: int(got.get(s, 0)) - sizes[s] for s in SUBSETS},
        "tolerance": tolerance,
        **method_params,
    }
    return Split(
        case_ids=dataset.case_ids,
        subsets=subsets,
        clusters=clusters,
        patient_ids=patient_ids,
        seed=seed,
        method=method,
        params=params,
    )


# ======================================================================================== checks
def check_leakage(split: Split) -> dict[str, Any]:
    """Make sure no patient has slices in two subsets.

    Returns:
        a summary: ``{"clean": True, "checked": bool, "slices": {subset: n},
        "patients": {subset: n} or None}`` (``checked`` is False when there are no patient ids).

    Raises:
        LeakageError: naming each patient found in more than one subset, with those subsets.
    """
    slices = split.counts()
    if split.patient_ids is None:
        return {"clean": True, "checked": False, "slices": slices, "patients": None}
    where: dict[str, set[str]] = {}
    for pid, subset in zip(split.patient_ids, split.subsets):
        where.setdefault(pid, set()).add(subset)
    leaky = {p: [s for s in SUBSETS if s in subs] for p, subs in where.items() if len(subs) > 1}
    if leaky:
        shown = "; ".join(f"{p!r} in {', '.join(s)}" for p, s in list(leaky.items())[:10])
        more = f" (and {len(leaky) - 10} more)" if len(leaky) > 10 else ""
        raise LeakageError(
            f"{len(leaky)} patient(s) appear in more than one subset: {shown}{more}. "
            "Split by patient (group_by_patient=True) so no patient's slices are seen in training "
            "and evaluation alike.",
            leaky,
        )
    patients = {s: sum(1 for subs in where.values() if s in subs) for s in SUBSETS}
    return {"clean": True, "checked": True, "slices": slices, "patients": patients}


def _distribution(labels: Sequence[Any], categories: Sequence[Any]) -> np.ndarray:
    c = Counter(labels)
    counts = np.array([c.get(k, 0) for k in categories], dtype=np.float64)
    return counts / counts.sum() if counts.sum() else counts


def _divergences(p: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """Total variation distance and Jensen–Shannon divergence (base 2, both in [0, 1])."""
    from scipy.spatial.distance import jensenshannon

    tv = 0.5 * float(np.abs(p - q).sum())
    js = float(jensenshannon(p, q, base=2) ** 2) if p.sum() and q.sum() else float("nan")
    return tv, max(0.0, js)


def balance_report(split: Split):
    """Cluster proportions of each subset against the whole, with how far each subset is off.

    Returns:
        DataFrame indexed by ``"all"`` and each non-empty subset, with columns ``slices``,
        ``patients``, one ``cluster <label>`` column per cluster (proportions; each row sums to 1),
        ``tv_distance`` (total variation from "all": half the summed absolute differences) and
        ``js_divergence`` (Jensen–Shannon divergence, base 2). Both are 0 for a perfect match and
        1 for no overlap.

    Raises:
        ValueError: a split without cluster labels.
    """
    import pandas as pd

    if split.clusters is None:
        raise ValueError("this split has no cluster labels; pass clusters= when making it")
    cats = sorted(set(split.clusters), key=lambda c: (isinstance(c, str), c))
    overall = _distribution(split.clusters, cats)
    subsets = np.asarray(split.subsets, dtype=object)
    clusters = np.asarray(split.clusters, dtype=object)
    pids = None if split.patient_ids is None else np.asarray(split.patient_ids, dtype=object)
    rows, index = [], []
    for name in ["all", *split.names]:
        sel = np.ones(len(split), bool) if name == "all" else subsets == name
        dist = _distribution(clusters[sel].tolist(), cats)
        tv, js = _divergences(dist, overall)
        row = {
            "slices": int(sel.sum()),
            "patients": None if pids is None else len(set(pids[sel].tolist())),
        }
        row.update({f"cluster {c}": float(v) for c, v in zip(cats, dist)})
        row.update({"tv_distance": tv, "js_divergence": js})
        rows.append(row)
        index.append(name)
    return pd.DataFrame(rows, index=pd.Index(index, name="subset"))


def compare_balance(
    dataset: SliceDataset,
    clusters: Sequence[Any],
    seed: int = 0,
    n_seeds: int = 5,
    test: float | int = 0.25,
    val: float | int = 0.15,
    group_by_patient: bool = True,
    progress: bool = True,
):
    """Cluster-stratified vs random splits over seeds ``seed .. seed+n_seeds-1``.

    Returns:
        long DataFrame, one row per (method, seed, subset), with ``tv_distance``,
        ``js_divergence`` and ``missing_clusters`` (clusters of the dataset absent from that
        subset); average with ``frame.groupby(["method", "subset"]).mean()``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    all_clusters = {_cluster_value(c) for c in clusters}
    rows = []
    for s in tqdm(range(seed, seed + n_seeds), desc="splits", disable=not progress):
        made = {
            "cluster": cluster_split(
                dataset, clusters, test=test, val=val, seed=s, group_by_patient=group_by_patient
            ),
            "random": random_split(
                dataset,
                test=test,
                val=val,
                seed=s,
                group_by_patient=group_by_patient,
                clusters=clusters,
            ),
        }
        for method, split in made.items():
            report = balance_report(split)
            for subset in split.names:
                present = {c for c, sub in zip(split.clusters, split.subsets) if sub == subset}
                rows.append(
                    {
                        "method": method,
                        "seed": s,
                        "subset": subset,
                        "tv_distance": float(report.loc[subset, "tv_distance"]),
                        "js_divergence": float(report.loc[subset, "js_divergence"]),
                        "missing_clusters": len(all_clusters - present),
                    }
                )
    return pd.DataFrame(rows)


def plot_balance(frame, metric: str = "tv_distance") -> Figure:
    """Bars of a divergence per subset and method (mean ± sd over seeds), from compare_balance."""
    from matplotlib.figure import Figure

    if metric not in frame.columns:
        metrics = [c for c in frame.columns if c not in ("method", "seed", "subset")]
        raise ValueError(f"Expected one of {metrics}. Received: metric={metric!r}")
    subsets = [s for s in SUBSETS if s in set(frame["subset"])]
    methods = list(dict.fromkeys(frame["method"]))
    stats = frame.groupby(["method", "subset"])[metric].agg(["mean", "std"]).fillna(0.0)
    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(subsets))
    for i, m in enumerate(methods):
        means = [stats.loc[(m, s), "mean"] if (m, s) in stats.index else np.nan for s in subsets]
        sds = [stats.loc[(m, s), "std"] if (m, s) in stats.index else 0.0 for s in subsets]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=m)
    ax.set_xticks(x, subsets)
    n_seeds = frame["seed"].nunique()
    ax.set(
        ylabel=metric.replace("_", " "),
        title=f"Cluster balance vs the whole set ({n_seeds} seeds; lower is better)",
    )
    ax.legend()
    return fig


#: The course's default split recipe (notebook 02's parameters); load_or_make_split uses it.
DEFAULT_SPLIT: dict[str, Any] = {"embedding": "vgg16", "image_size": 64, "use_overlay": True, "k": 8,
                                 "test": 0.25, "val": 0.15}


def load_or_make_split(
    dataset: SliceDataset,
    path: str | os.PathLike | None,
    seed: int = 0,
    **recipe: Any,
) -> Split:
    """The split saved at ``path`` if it covers exactly this dataset's slices; else a new one.

    Later notebooks call this so they can also run on their own: when notebook 02 has not saved
    a split yet, the same recipe (:data:`DEFAULT_SPLIT`: embed, KMeans, cluster-stratified and
    patient-grouped split) is applied and saved at ``path``. A saved split for a different set of
    slices is never overwritten: a warning says so and a fresh split is returned unsaved.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        dataset: the slices to split (needs patient ids).
        path: the split file (JSON or CSV), or None to make a split without saving it.
        seed: seed of the embedding, clustering and split.
        **recipe: overrides of :data:`DEFAULT_SPLIT`.
    """
    import warnings

    unknown = sorted(set(recipe) - set(DEFAULT_SPLIT))
    if unknown:
        raise ValueError(f"Expected keys among {sorted(DEFAULT_SPLIT)}. Received: {unknown}")
    settings = {**DEFAULT_SPLIT, **recipe}
    target = None if path is None else Path(path)
    if target is not None and target.is_file():
        saved = Split.load(target)
        if sorted(saved.case_ids) == sorted(dataset.case_ids):
            return saved
        warnings.warn(
            f"{target}: this split lists other slices than the dataset ({len(saved)} vs {len(dataset)}); "
            "making a new split for this dataset without overwriting the file.",
            UserWarning,
            stacklevel=2,
        )
        target = None
    if settings["embedding"] == "vgg16":
        features = embed_vgg16(dataset, use_overlay=settings["use_overlay"], image_size=settings["image_size"],
                               seed=seed, progress=False)
    else:
        features = embed(dataset, settings["embedding"])
    k = min(int(settings["k"]), len(dataset) - 1)
    clusters = cluster(features, k, seed=seed)
    split = cluster_split(dataset, clusters, test=settings["test"], val=settings["val"], seed=seed)
    split.params["recipe"] = settings
    if target is not None:
        split.save(target)
    return split
