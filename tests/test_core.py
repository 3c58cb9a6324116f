"""SliceDataset, config/profiles/seeding, paths."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from strokekit import config as cfg
from strokekit import paths
from strokekit.dataset import SliceDataset, concat
from strokekit.errors import DataError


def make_dataset(n=6, size=8, patients=("a", "a", "b", "b", "c", "c")):
    images = np.arange(n * size * size, dtype=np.float32).reshape(n, size, size)
    masks = np.zeros((n, size, size), np.uint8)
    masks[1, 2:4, 2:5] = 1  # 6 pixels
    masks[4, 0, 0] = 1
    return SliceDataset(images, masks, [f"c{i}" for i in range(n)], list(patients[:n]),
                        slice_indices=np.arange(n), extra={"level": np.array(list("xyzxyz"[:n]))})


def test_dataset_validates_shapes_ids_and_units():
    d = make_dataset()
    with pytest.raises(DataError, match="does not match images shape"):
        SliceDataset(d.images, d.masks[:, :4], d.case_ids)
    with pytest.raises(DataError, match=r"duplicate case ids: \['c0'\]"):
        SliceDataset(d.images, d.masks, ["c0"] * 2 + d.case_ids[2:])
    with pytest.raises(DataError, match="unit must be one of"):
        SliceDataset(d.images, d.masks, d.case_ids, unit="kelvin")
    with pytest.raises(DataError, match="has no name in class_names"):
        SliceDataset(d.images, d.masks * 2, d.case_ids)
    with pytest.raises(DataError, match="extra column 'level' has 2 values for 6 images"):
        SliceDataset(d.images, d.masks, d.case_ids, extra={"level": np.array(["x", "y"])})


def test_dataset_subsets_keep_every_column_aligned():
    d = make_dataset()
    assert d.lesion_area().tolist() == [0, 6, 0, 0, 1, 0]
    assert d.patients() == ["a", "b", "c"]
    sub = d.select_patients(["c", "a"])
    assert sub.case_ids == ["c0", "c1", "c4", "c5"]
    assert sub.extra["level"].tolist() == ["x", "y", "y", "z"]
    assert np.array_equal(sub.images[2], d.images[4])
    picked = d.select_cases(["c4", "c1"])
    assert picked.lesion_area().tolist() == [1, 6]
    with pytest.raises(DataError, match=r"unknown case ids: \['zz'\]"):
        d.select_cases(["zz"])
    both = concat([d.subset([0, 1]), d.subset([5])])
    assert both.case_ids == ["c0", "c1", "c5"] and both.patient_ids == ["a", "a", "c"]
    summary = d.summary()
    assert summary["slices_with_lesion"] == 2 and summary["patients"] == 3
    assert summary["pixel_fraction"]["lesion"] == pytest.approx(7 / (6 * 64))


def test_profiles_come_from_one_environment_variable(monkeypatch):
    monkeypatch.delenv(cfg.PROFILE_ENV, raising=False)
    assert cfg.get_profile().name == "quick"
    monkeypatch.setenv(cfg.PROFILE_ENV, "FULL")
    assert cfg.get_profile().name == "full"
    assert cfg.get_profile().image_size > cfg.PROFILES["quick"].image_size
    monkeypatch.setenv(cfg.PROFILE_ENV, "huge")
    with pytest.raises(ValueError, match=r"Expected one of \['full', 'quick', 'smoke'\]. Received: profile='huge'"):
        cfg.get_profile()


def test_smoke_profile_takes_the_full_paths_at_tiny_sizes():
    smoke, full, quick = (cfg.PROFILES[n] for n in ("smoke", "full", "quick"))
    assert smoke.mode == full.mode == "full" and quick.mode == "quick"
    assert len(smoke.filters) == len(full.filters) and 10 * sum(smoke.filters) < sum(full.filters)
    assert smoke.image_size < quick.image_size and smoke.num_epochs == smoke.num_seeds == 1
    assert smoke.image_size % 2 ** (len(smoke.filters) - 1) == 0   # the 5-level U-Net fits


def test_full_profile_is_the_study_and_transfer_settings_follow_the_profile():
    full = cfg.PROFILES["full"]
    assert (full.image_size, full.num_epochs, full.filters, full.lr_schedule, full.batch_norm) == (
        256, 50, (64, 128, 256, 512, 1024), "plateau", False)
    quick, study, smoke = (cfg.transfer_settings(name) for name in ("quick", "full", "smoke"))
    assert (quick.fine_tune_epochs, quick.fine_tune_batch, quick.source_patients, quick.bn_momentum) == (8, 4, 30, 0.8)
    assert quick.shots == (8, "all") and quick.curve_methods == ("scratch", "unfrozen")
    assert not (quick.train_imagenet or quick.ctich_source) and quick.ctich_patients is None
    assert (study.fine_tune_epochs, study.fine_tune_batch, study.source_patients) == (50, 8, 240)
    assert study.bn_momentum == 0.99
    assert study.shots == (4, 8, 16, 32, "all") and study.curve_methods == ("scratch", "frozen", "unfrozen", "gradual")
    assert study.train_imagenet and study.ctich_source and study.ctich_patients is None
    # the smoke profile: the full paths, at least 4 fine-tuning epochs so that the gradual schedule opens a block
    assert (smoke.fine_tune_epochs, smoke.fine_tune_batch, smoke.source_patients, smoke.shots) == (4, 4, 30, (4, "all"))
    assert smoke.curve_methods == study.curve_methods and smoke.train_imagenet and smoke.ctich_patients == 4
    assert cfg.transfer_settings(cfg.PROFILES["quick"]) == quick


def test_config_round_trip_through_dict():
    profile = cfg.PROFILES["quick"]
    data = cfg.to_dict(profile)
    assert data["name"] == "quick"
    assert cfg.from_dict(cfg.Profile, data) == profile
    with pytest.raises(ValueError, match=r"has no field\(s\) \['bogus'\]"):
        cfg.from_dict(cfg.Profile, {**data, "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.num_epochs = 99  # type: ignore[misc]


def test_seed_everything_makes_numpy_and_keras_repeat():
    import keras

    cfg.seed_everything(7)
    a = np.random.rand(3), keras.random.uniform((3,), seed=None)
    cfg.seed_everything(7)
    b = np.random.rand(3), keras.random.uniform((3,), seed=None)
    assert np.array_equal(a[0], b[0])
    assert np.allclose(keras.ops.convert_to_numpy(a[1]), keras.ops.convert_to_numpy(b[1]))


def test_ctich_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.CTICH_ENV, str(tmp_path))
    assert paths.ctich_dir() is None  # no slices.csv there
    (tmp_path / "slices.csv").write_text("file,patient_id\n")
    assert paths.ctich_dir() == tmp_path


def test_import_has_no_side_effects():
    code = ("import sys, strokekit, strokekit.dataset, strokekit.preprocess, strokekit.config;"
            "print('keras' in sys.modules, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    assert out.stderr == ""
