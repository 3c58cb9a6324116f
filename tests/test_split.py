"""Tests of strokekit.split: embeddings, clustering, the grouped stratified split and its file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from matplotlib.figure import Figure

from strokekit import split as sk
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.split import LeakageError, Split


# ------------------------------------------------------------------------------------ fixtures
def _pattern(level: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One of four clearly different slice 'levels' plus a little noise, in [0, 1]."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    if level == 0:
        image = (r < size * 0.2).astype(float)  # small disc
    elif level == 1:
        image = (r < size * 0.45).astype(float)  # large disc
    elif level == 2:
        image = ((yy // 4) % 2).astype(float)  # horizontal stripes
    else:
        image = ((yy < size // 2) & (xx < size // 2)).astype(float)  # bright corner
    return np.clip(image * 0.8 + 0.1 + rng.normal(0, 0.02, image.shape), 0, 1)


def make_dataset(
    levels_per_patient, size: int = 32, seed: int = 0, patient_ids: bool = True
) -> SliceDataset:
    """A display-unit dataset whose slices' true cluster is ``extra['level']``."""
    rng = np.random.default_rng(seed)
    images, pids, levels, cases = [], [], [], []
    for p, levels_p in enumerate(levels_per_patient):
        for j, level in enumerate(levels_p):
            images.append(_pattern(level, rng, size))
            pids.append(f"p{p}")
            levels.append(level)
            cases.append(f"{p:03d}_{j}")  # leading zeros must survive the file round trip
    images = np.stack(images).astype(np.float32)
    masks = np.zeros(images.shape, dtype=np.uint8)
    masks[:, size // 2 : size // 2 + 3, size // 2 : size // 2 + 3] = 1
    return SliceDataset(
        images=images,
        masks=masks,
        case_ids=cases,
        patient_ids=pids if patient_ids else None,
        unit="display",
        extra={"level": np.array(levels)},
    )


@pytest.fixture(scope="module")
def ds40():
    """10 patients x 4 slices, each patient with one slice of each of 4 levels."""
    return make_dataset([[0, 1, 2, 3]] * 10)


@pytest.fixture(scope="module")
def tempting():
    """12 patients x 5 slices; rare cluster 3 has 4 slices, 3 of them from patient p0."""
    rng = np.random.default_rng(3)
    levels = [list(rng.integers(0, 3, size=5)) for _ in range(12)]
    levels[0] = [3, 3, 3, 0, 1]
    levels[1] = [3, 0, 1, 2, 2]
    return make_dataset(levels, size=8)


@pytest.fixture(scope="module")
def uneven():
    """12 patients of varied cluster make-up, so a random split is visibly unbalanced."""
    rng = np.random.default_rng(7)
    levels = []
    for p in range(12):
        main = p % 4
        levels.append([main if rng.random() < 0.7 else int(rng.integers(0, 4)) for _ in range(6)])
    return make_dataset(levels, size=8)


# ------------------------------------------------------------------------------------ embeddings
def test_embed_intensity_block_means_hand_computed():
    image = np.zeros((1, 32, 32), dtype=np.float32)
    image[:, :, :16] = 1.0  # left half white
    feats = sk.embed_intensity(image, size=4)
    assert feats.shape == (1, 16)
    np.testing.assert_allclose(feats.reshape(4, 4), np.tile([1.0, 1.0, 0.0, 0.0], (4, 1)))


def test_embed_intensity_windows_hu_datasets():
    # brain window (40, 80): 0 HU -> 0, 40 HU -> 0.5, 80 HU -> 1
    images = np.stack([np.full((8, 8), v, np.float32) for v in (0.0, 40.0, 80.0)])
    ds = SliceDataset(images=images, masks=np.zeros((3, 8, 8)), case_ids=["a", "b", "c"], unit="HU")
    np.testing.assert_allclose(sk.embed_intensity(ds, size=2)[:, 0], [0.0, 0.5, 1.0])


def test_embed_hog_length_and_orientation_sensitivity():
    yy, xx = np.mgrid[:32, :32]
    horizontal = ((yy // 4) % 2).astype(np.float32)
    vertical = ((xx // 4) % 2).astype(np.float32)
    feats = sk.embed_hog(np.stack([horizontal, vertical, horizontal]), size=32)
    # 4x4 cells of 8 px -> 3x3 blocks of 2x2 cells x 9 orientations = 9 * 36
    assert feats.shape == (3, 324)
    np.testing.assert_allclose(feats[0], feats[2])
    assert np.abs(feats[0] - feats[1]).sum() > 1.0


def test_embed_registry_rejects_unknown_method(ds40):
    with pytest.raises(
        ValueError,
        match=r"Expected one of \['hog', 'intensity', 'vgg16'\]. Received: method='resnet'",
    ):
        sk.embed(ds40, "resnet")
    np.testing.assert_array_equal(
        sk.embed(ds40, "intensity", size=8), sk.embed_intensity(ds40, size=8)
    )


def test_overlay_needs_a_dataset():
    with pytest.raises(ValueError, match="use_overlay=True needs a SliceDataset"):
        sk.embed_intensity(np.zeros((2, 8, 8)), use_overlay=True)


@pytest.mark.backend
@pytest.mark.slow
def test_vgg16_offline_fallback_warns_and_is_deterministic(tmp_path, monkeypatch, ds40):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache: no ImageNet file
    images = ds40.images[:4]
    with pytest.warns(
        UserWarning, match=r"ImageNet weights for (?i:vgg16) were not found"
    ) as record:
        feats, info = sk.embed_vgg16(
            images, image_size=32, batch_size=2, progress=False, return_info=True
        )
    assert len([w for w in record if "ImageNet" in str(w.message)]) == 1  # once, not once per batch
    assert str(tmp_path / "models") in str(record[0].message)
    assert info["weights"] == "random (offline fallback)" and info["weights_path"] is None
    assert feats.shape == (4, 512) and feats.dtype == np.float32
    assert np.all(np.isfinite(feats))
    # the four levels look different, so random conv features must differ between them
    assert min(np.abs(feats[i] - feats[j]).sum() for i in range(4) for j in range(i)) > 0
    with warnings.catch_warnings():
        # weights=None is a choice, not a fallback: no warning
        warnings.simplefilter("error", UserWarning)
        again, info2 = sk.embed_vgg16(
            images, weights=None, image_size=32, batch_size=2, progress=False, return_info=True
        )
    assert info2["weights"] == "random"
    np.testing.assert_array_equal(feats, again)


def test_vgg16_weights_resolution_uses_the_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    cached = tmp_path / "models" / sk.VGG16_NOTOP_FILE
    cached.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert sk._resolve_vgg16_weights("imagenet") == (str(cached), "imagenet")
    assert sk._resolve_vgg16_weights(None) == (None, "random")
    missing = tmp_path / "nowhere.h5"
    with pytest.raises(DataError, match=r"nowhere\.h5: no vgg16 weights file"):
        sk.embed_vgg16(np.zeros((1, 32, 32)), weights=missing, image_size=32, progress=False)


def test_vgg16_rejects_tiny_images():
    with pytest.raises(ValueError, match="at least 32x32"):
        sk.embed_vgg16(np.zeros((1, 16, 16)), weights=None, image_size=16, progress=False)


# ------------------------------------------------------------------------------------ clustering
def test_cluster_recovers_the_levels_deterministically(ds40):
    feats = sk.embed_intensity(ds40, size=8)
    labels = sk.cluster(feats, k=4, seed=0)
    assert sk.adjusted_rand(labels, ds40.extra["level"]) == pytest.approx(1.0)
    np.testing.assert_array_equal(labels, sk.cluster(feats, k=4, seed=0))
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    assert labels[0] == 0  # equal sizes: numbered by first appearance


def test_cluster_numbers_by_size():
    feats = np.array([[0.0], [10.0], [10.1], [10.2], [0.1]])
    np.testing.assert_array_equal(sk.cluster(feats, k=2, standardize=False), [1, 0, 0, 0, 1])


def test_cluster_rejects_k_larger_than_images(ds40):
    feats = sk.embed_intensity(ds40, size=4)
    with pytest.raises(ValueError, match="k=41 clusters requested for only 40 images"):
        sk.cluster(feats, k=41)
    with pytest.raises(ValueError, match="k must be at least 1"):
        sk.cluster(feats, k=0)


def test_choose_k_finds_four_levels_and_plots(ds40):
    table = sk.choose_k(sk.embed_intensity(ds40, size=8), ks=range(2, 7))
    assert list(table.columns) == ["k", "inertia", "silhouette"]
    assert int(table.loc[table["silhouette"].idxmax(), "k"]) == 4
    assert np.all(np.diff(table["inertia"]) <= 1e-9)  # more clusters never fit worse here
    fig = sk.plot_choose_k(table)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    with pytest.raises(ValueError, match=r"every k must lie in 2\.\.39"):
        sk.choose_k(sk.embed_intensity(ds40, size=4), ks=[2, 40])


def test_adjusted_rand_hand_values():
    assert sk.adjusted_rand([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert sk.adjusted_rand([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-0.5)


def test_projection_and_plots(ds40):
    feats = sk.embed_intensity(ds40, size=8)
    labels = ds40.extra["level"]
    xy = sk.embed_2d(feats, "pca")
    assert xy.shape == (40, 2)
    tsne = sk.embed_2d(feats[:12], "tsne", seed=1)
    assert tsne.shape == (12, 2)
    np.testing.assert_array_equal(tsne, sk.embed_2d(feats[:12], "tsne", seed=1))
    with pytest.raises(
        ValueError, match=r"Expected one of \['pca', 'tsne'\]. Received: method='umap'"
    ):
        sk.embed_2d(feats, "umap")
    fig = sk.plot_embedding(xy, labels, "levels", style=["train"] * 20 + ["test"] * 20)
    assert isinstance(fig, Figure) and len(fig.axes[0].collections) == 8  # 4 levels x 2 styles
    montage = sk.plot_cluster_montage(ds40, labels, per_cluster=3)
    assert isinstance(montage, Figure) and len(montage.axes) == 4 * 3
    assert sum(len(ax.images) for ax in montage.axes) == 12


# ------------------------------------------------------------------------------------ splitting
def test_cluster_split_is_deterministic_and_seed_dependent(tempting):
    clusters = tempting.extra["level"]
    a = sk.cluster_split(tempting, clusters, seed=0)
    assert a == sk.cluster_split(tempting, clusters, seed=0)
    others = [sk.cluster_split(tempting, clusters, seed=s).subsets for s in range(1, 6)]
    assert any(o != a.subsets for o in others)


def test_grouped_split_keeps_patients_whole_even_when_tempted(tempting):
    clusters = tempting.extra["level"]
    for seed in range(4):
        split = sk.cluster_split(tempting, clusters, test=0.25, val=0.15, seed=seed)
        summary = sk.check_leakage(split)
        assert summary["clean"] and summary["checked"]
        subset_of = {p: s for p, s in zip(split.patient_ids, split.subsets)}
        assert len(subset_of) == 12
        # the rare cluster (4 slices, 3 owned by p0) reaches test and train via different patients
        rare = {s for s, c in zip(split.subsets, split.clusters) if c == 3}
        assert {"test", "train"} <= rare
        assert subset_of["p0"] != subset_of["p1"]
        assert split.params["missing_in_test"] == []


def test_every_eligible_cluster_reaches_test(uneven):
    clusters = uneven.extra["level"]
    counts = np.bincount(clusters)
    assert counts.min() >= 3
    for grouped in (True, False):
        for seed in range(3):
            split = sk.cluster_split(
                uneven, clusters, test=0.2, val=0.15, seed=seed, group_by_patient=grouped
            )
            in_test = {c for c, s in zip(split.clusters, split.subsets) if s == "test"}
            assert in_test == {0, 1, 2, 3}


def test_flat_split_puts_a_small_cluster_in_test():
    # 30 slices, one 3-slice cluster; a 4-slice test set must still take one of them
    levels = [[0] * 9, [1] * 9, [2] * 9, [3] * 3]
    ds = make_dataset(levels, size=8)
    for seed in range(8):
        split = sk.cluster_split(
            ds, ds.extra["level"], test=4, val=3, seed=seed, group_by_patient=False
        )
        assert {c for c, s in zip(split.clusters, split.subsets) if s == "test"} == {0, 1, 2, 3}
        assert split.counts() == {"train": 23, "val": 3, "test": 4}


def test_sizes_match_the_request(tempting):
    clusters = tempting.extra["level"]
    # 60 slices: test 15, val 9, train 36; patients have 5 slices, the documented tolerance
    split = sk.cluster_split(tempting, clusters, test=0.25, val=0.15, seed=0)
    assert split.params["requested"] == {"train": 36, "val": 9, "test": 15}
    assert split.params["tolerance"] == 5
    for name, n in split.counts().items():
        assert abs(n - split.params["requested"][name]) <= 5
        assert n % 5 == 0
    flat = sk.cluster_split(tempting, clusters, test=0.25, val=0.15, seed=0, group_by_patient=False)
    assert flat.counts() == {"train": 36, "val": 9, "test": 15}
    counts = sk.cluster_split(tempting, clusters, test=10, val=0, seed=0)
    assert counts.counts() == {"train": 50, "val": 0, "test": 10}
    assert counts.names == ["train", "test"]


def test_random_split_groups_patients_and_hits_sizes(tempting):
    split = sk.random_split(tempting, test=0.25, val=0.15, seed=2)
    assert sk.check_leakage(split)["clean"]
    assert split == sk.random_split(tempting, test=0.25, val=0.15, seed=2)
    assert all(abs(n - r) <= 5 for n, r in zip(split.counts().values(), (36, 9, 15)))
    flat = sk.random_split(tempting, test=0.25, val=0.15, seed=2, group_by_patient=False)
    assert flat.counts() == {"train": 36, "val": 9, "test": 15}


def test_split_selects_the_dataset_slices(tempting):
    split = sk.cluster_split(tempting, tempting.extra["level"], seed=0)
    test = split.dataset(tempting, "test")
    assert test.case_ids == split.cases("test")
    assert set(test.patient_ids).isdisjoint(split.dataset(tempting, "train").patient_ids)
    np.testing.assert_array_equal(split.indices("test"), tempting.index_of(split.cases("test")))
    with pytest.raises(
        ValueError, match=r"Expected one of \['train', 'val', 'test'\]. Received: subset='dev'"
    ):
        split.indices("dev")


def test_bad_requests_give_clear_errors(tempting):
    clusters = tempting.extra["level"]
    with pytest.raises(ValueError, match="must sum to less than 1"):
        sk.cluster_split(tempting, clusters, test=0.6, val=0.4)
    with pytest.raises(ValueError, match=r"test=-0.1 is negative"):
        sk.cluster_split(tempting, clusters, test=-0.1)
    with pytest.raises(ValueError, match="leave no training slices"):
        sk.cluster_split(tempting, clusters, test=40, val=20)
    no_ids = make_dataset([[0, 1, 2]] * 3, size=8, patient_ids=False)
    with pytest.raises(ValueError, match=r"pass patient ids .* or group_by_patient=False"):
        sk.cluster_split(no_ids, no_ids.extra["level"])
    two = make_dataset([[0, 1, 2, 0, 1], [2, 0, 1, 2, 0]], size=8)
    with pytest.raises(
        ValueError,
        match=r"3 subsets \(test, val, train\) requested but the dataset has only 2 patient",
    ):
        sk.cluster_split(two, two.extra["level"])
    with pytest.raises(ValueError, match="3 cluster labels for 10 slices"):
        sk.cluster_split(two, [0, 1, 2], val=0)
    # without patient ids the flat draw works and the leakage check says it could not look
    flat = sk.cluster_split(no_ids, no_ids.extra["level"], group_by_patient=False)
    assert sk.check_leakage(flat)["checked"] is False


@pytest.mark.parametrize("bad", [float("nan"), np.float64("nan"), float("inf"), -float("inf")])
def test_non_finite_fractions_are_refused(tempting, bad):
    # test=nan used to compare false with every bound and give an empty test set.
    with pytest.raises(ValueError, match=rf"^test={bad} is not a finite number; expected a fraction"):
        sk.cluster_split(tempting, tempting.extra["level"], test=bad)
    with pytest.raises(ValueError, match=rf"^val={bad} is not a finite number"):
        sk.random_split(tempting, val=bad)


# ------------------------------------------------------------------------------------ the file
@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_split_file_round_trips(tmp_path, tempting, suffix):
    split = sk.cluster_split(tempting, tempting.extra["level"], seed=1)
    path = split.save(tmp_path / "splits" / f"split{suffix}")
    loaded = Split.load(path)
    assert loaded == split
    assert loaded.case_ids[0] == "000_0"
    text_clusters = Split(
        ["a", "b"], ["train", "test"], ["skull", "vertex"], None, seed=None, params={"k": (1, 2)}
    )
    path2 = text_clusters.save(tmp_path / f"text{suffix}")
    assert Split.load(path2) == text_clusters
    # saving again replaces the file whole (written aside, then renamed): nothing left beside it
    text_clusters.save(path)
    assert Split.load(path) == text_clusters
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_json_file_is_readable_and_checked(tmp_path):
    split = Split(["1", "2"], ["train", "test"], [0, 1], ["p1", "p2"], seed=3, method="cluster")
    path = split.save(tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert data["counts"] == {"train": 1, "val": 0, "test": 1}
    assert data["cases"][1] == {"case_id": "2", "patient_id": "p2", "subset": "test", "cluster": 1}
    data["cases"][0]["subset"] = "holdout"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"s\.json: unknown subset name\(s\) \['holdout'\]"):
        Split.load(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"s\.json: not valid JSON"):
        Split.load(path)


def test_csv_file_is_checked(tmp_path):
    path = tmp_path / "hand.csv"
    path.write_text("case_id,group\n1,train\n")
    with pytest.raises(DataError, match=r"hand\.csv: missing column\(s\) \['subset'\]"):
        Split.load(path)
    path.write_text("case_id,subset\n1,train\n2,holdout\n")
    with pytest.raises(DataError, match=r"hand\.csv: unknown subset name\(s\) \['holdout'\]"):
        Split.load(path)
    path.write_text("case_id,subset\n001,train\n002,test\n")
    hand = Split.load(path)  # a hand-made CSV without metadata is accepted
    assert hand.case_ids == ["001", "002"] and hand.patient_ids is None and hand.clusters is None
    with pytest.raises(DataError, match=r"missing\.json: split file not found"):
        Split.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------ checks
def test_check_leakage_names_the_leaking_patient():
    leaky = Split(
        case_ids=["a", "b", "c", "d", "e"],
        subsets=["train", "train", "test", "test", "val"],
        patient_ids=["p0", "p1", "p1", "p2", "p3"],
    )
    with pytest.raises(
        LeakageError, match=r"1 patient\(s\) appear in more than one subset: 'p1' in train, test"
    ) as err:
        sk.check_leakage(leaky)
    assert isinstance(err.value, DataError)
    assert err.value.patients == {"p1": ["train", "test"]}
    clean = Split(["a", "b", "c"], ["train", "train", "test"], patient_ids=["p0", "p0", "p1"])
    assert sk.check_leakage(clean) == {
        "clean": True,
        "checked": True,
        "slices": {"train": 2, "val": 0, "test": 1},
        "patients": {"train": 1, "val": 0, "test": 1},
    }


def test_balance_report_hand_computed():
    split = Split(
        ["a", "b", "c", "d"],
        ["train", "train", "test", "test"],
        [0, 0, 0, 1],
        ["p0", "p0", "p1", "p2"],
    )
    report = sk.balance_report(split)
    assert list(report.index) == ["all", "train", "test"]
    props = report.filter(like="cluster ")
    np.testing.assert_allclose(props.sum(axis=1), 1.0)
    np.testing.assert_allclose(props.loc["all"], [0.75, 0.25])
    np.testing.assert_allclose(props.loc["test"], [0.5, 0.5])
    assert report.loc["test", "patients"] == 2
    np.testing.assert_allclose(report["tv_distance"], [0.0, 0.25, 0.25])
    # JS(train=(1,0), all=(.75,.25)), m=(.875,.125):
    # 0.5*log2(1/.875) + 0.5*(.75*log2(.75/.875) + .25*log2(.25/.125))
    expected = 0.5 * np.log2(1 / 0.875) + 0.5 * (0.75 * np.log2(0.75 / 0.875) + 0.25 * 1.0)
    assert report.loc["train", "js_divergence"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="no cluster labels"):
        sk.balance_report(Split(["a"], ["train"]))


def test_stratified_split_is_better_balanced_than_random(uneven):
    clusters = uneven.extra["level"]
    frame = sk.compare_balance(uneven, clusters, seed=0, n_seeds=5, progress=False)
    assert set(frame["method"]) == {"cluster", "random"} and frame["seed"].nunique() == 5
    mean = frame.groupby("method")["tv_distance"].mean()
    assert mean["cluster"] <= mean["random"]
    assert frame.loc[frame["method"] == "cluster", "missing_clusters"].max() == 0
    for s in range(3):
        report = sk.balance_report(sk.cluster_split(uneven, clusters, seed=s))
        np.testing.assert_allclose(report.filter(like="cluster ").sum(axis=1), 1.0)
    fig = sk.plot_balance(frame)
    assert isinstance(fig, Figure) and len(fig.axes[0].patches) == 2 * 3
