"""Tests for strokekit.fewshot: the protocol split, the classical baselines, the recipe wrappers."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from strokekit import fewshot as fs
from strokekit import preprocess as pp
from strokekit.dataset import SliceDataset
from strokekit.engine import recalibrate_batchnorm
from strokekit.errors import DataError
from strokekit.paths import ctich_dir
from strokekit.runs import fewshot_run_info
from strokekit.train import TrainConfig


# ----------------------------------------------------------------------------- helpers
def head(size: int = 32, blood: tuple[int, int, int, int] | None = (12, 17, 12, 17), level: float = 180.0):
    """A display-unit head: air 0, bone ring 255, brain 100, optional blood square."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    image = np.zeros((size, size), np.float32)
    image[r < size * 0.45] = 255.0
    brain = r < size * 0.38
    image[brain] = 100.0
    mask = np.zeros((size, size), np.uint8)
    if blood is not None:
        r0, r1, c0, c1 = blood
        image[r0:r1, c0:c1] = level
        mask[r0:r1, c0:c1] = 1
    return image, brain, mask


def fake_ctich(vanish: bool = True) -> SliceDataset:
    """Fake CT-ICH: protocol patients, 3 other lesion patients, 1 lesion-free patient.

    Every patient has 2 lesion-free slices; lesion patients have 1-3 lesion slices. One test
    slice's mask is empty although has_mask says 1 (a lesion that vanished when shrinking).
    """
    spec = {"49": 2, "50": 1, "51": 3, "66": 2, "70": 2, "71": 1, "72": 3, "99": 0}
    images, masks, cases, pids, flags = [], [], [], [], []
    k = 0
    for pid, n_lesion in spec.items():
        for j in range(n_lesion + 2):
            lesion = j < n_lesion
            image, _, mask = head(16, (6, 9, 6, 9) if lesion else None)
            if vanish and pid == "72" and j == 0:
                mask[:] = 0
            images.append(image)
            masks.append(mask)
            cases.append(str(k))
            pids.append(pid)
            flags.append(int(lesion))
            k += 1
    return SliceDataset(
        images=np.stack(images), masks=np.stack(masks), case_ids=cases, patient_ids=pids,
        slice_indices=np.arange(k), unit="display", class_names=("background", "hemorrhage"),
        extra={"has_mask": np.array(flags)},
    )


# ----------------------------------------------------------------------------- protocol split
def test_protocol_split_counts_and_no_patient_crosses_subsets():
    data = fake_ctich()
    split = fs.protocol_split(data, "fewshot-ctich-v1")
    assert split.method == "protocol"
    assert split.counts() == {"train": 6, "val": 2, "test": 6}
    frame = split.to_frame()
    per_patient = frame.groupby("patient_id")["subset"].nunique()
    assert (per_patient == 1).all()
    assert set(frame.loc[frame.subset == "train", "patient_id"]) == {"49", "50", "51"}
    assert set(frame.loc[frame.subset == "val", "patient_id"]) == {"66"}
    assert set(frame.loc[frame.subset == "test", "patient_id"]) == {"70", "71", "72"}
    # only lesion slices (has_mask), including the one whose shrunken mask is empty
    chosen = data.select_cases(split.case_ids)
    assert (chosen.extra["has_mask"] == 1).all()
    assert "99" not in set(split.patient_ids)
    assert split.params["protocol"] == "fewshot-ctich-v1" and split.params["val"] == ["66"]


def test_protocol_split_empty_slices_only_from_training_patients():
    data = fake_ctich()
    split = fs.protocol_split(data, empty_slices=True)
    # 6 lesion + 3 patients x 2 lesion-free slices; val and test unchanged
    assert split.counts() == {"train": 12, "val": 2, "test": 6}
    test = data.select_cases(split.cases("test"))
    val = data.select_cases(split.cases("val"))
    assert (test.extra["has_mask"] == 1).all() and (val.extra["has_mask"] == 1).all()


def test_protocol_split_falls_back_to_masks_without_has_mask():
    data = fake_ctich(vanish=True)
    data = data.replace(extra={})
    split = fs.protocol_split(data)
    # without has_mask the vanished slice of patient 72 is no longer a lesion slice
    assert split.counts() == {"train": 6, "val": 2, "test": 5}


def test_protocol_split_errors():
    data = fake_ctich()
    with pytest.raises(ValueError, match=r"Expected one of \['fewshot-ctich-v1'\]"):
        fs.protocol_split(data, "fewshot-ctich-v9")
    without_66 = data.subset(np.flatnonzero(np.asarray(data.patient_ids) != "66"))
    with pytest.raises(DataError, match=r"\['66'\] have no lesion slices"):
        fs.protocol_split(without_66)
    with pytest.raises(DataError, match="needs patient ids"):
        fs.protocol_split(data.replace(patient_ids=None))


@pytest.mark.realdata
def test_protocol_counts_on_real_ctich():
    if ctich_dir() is None:
        pytest.skip("../shared/data/ct-ich is absent: put the CT-ICH image/, label/ and slices.csv there")
    data, split = fs.load_protocol(image_size=64, empty_slices=False, progress=False)
    assert split.counts() == {"train": 40, "val": 12, "test": 266}
    frame = split.to_frame()
    assert frame.loc[frame.subset == "test", "patient_id"].nunique() == 32
    assert (frame.groupby("patient_id")["subset"].nunique() == 1).all()
    with_empty = fs.protocol_split(data, empty_slices=True)
    # patients 49, 50, 51 have 39 + 32 + 46 slices in all
    assert with_empty.counts() == {"train": 117, "val": 12, "test": 266}


# ----------------------------------------------------------------------------- baselines
def test_threshold_in_brain_finds_blood_not_bone():
    image, brain, mask = head()
    pred = pp.threshold_in_brain(image, brain, low=150, high=230, erosion=0, opening=0, min_size=1)
    np.testing.assert_array_equal(pred, mask)
    assert pred.dtype == np.uint8


def test_threshold_in_brain_opening_cuts_square_corners_and_speckle():
    image, brain, mask = head()
    image[8, 8] = 180.0  # a one-pixel speckle
    pred = pp.threshold_in_brain(image, brain, low=150, high=230, erosion=0, opening=1, min_size=1)
    expected = mask.copy()
    # opening a 5x5 square with a 4-connected cross keeps all but its 4 corners
    for r, c in [(12, 12), (12, 16), (16, 12), (16, 16)]:
        expected[r, c] = 0
    np.testing.assert_array_equal(pred, expected)


def test_threshold_in_brain_band_limits_inclusive():
    image, brain, _ = head(level=150.0)
    assert pp.threshold_in_brain(image, brain, low=150, high=230, erosion=0, opening=0, min_size=1).sum() == 25
    assert pp.threshold_in_brain(image, brain, low=151, high=230, erosion=0, opening=0, min_size=1).sum() == 0
    # brain (100) and blood (150) both lie in [100, 150]: the whole brain is returned
    whole = pp.threshold_in_brain(image, brain, low=100, high=150, erosion=0, opening=0, min_size=1)
    np.testing.assert_array_equal(whole, brain.astype(np.uint8))


def test_threshold_in_brain_min_size_erosion_and_scale():
    image, brain, mask = head()
    image[8, 8] = 180.0
    small = pp.threshold_in_brain(image, brain, low=150, high=230, erosion=0, opening=0, min_size=2)
    np.testing.assert_array_equal(small, mask)  # the lone pixel is gone, the square stays
    # blood touching the brain's edge goes with a 1-pixel erosion; inner blood stays
    edge_image, _, _ = head(blood=None)
    rows = np.flatnonzero(brain[:, 16])
    edge_image[rows[0], 16] = 180.0
    kept = pp.threshold_in_brain(edge_image, brain, low=150, high=230, erosion=0, opening=0, min_size=1)
    cut = pp.threshold_in_brain(edge_image, brain, low=150, high=230, erosion=1, opening=0, min_size=1)
    assert kept[rows[0], 16] == 1 and cut.sum() == 0
    # the same image scaled to 0..1 gives the same answer (thresholds stay in 0..255 levels)
    stack = np.stack([image, image])
    a = pp.threshold_in_brain(stack, np.stack([brain, brain]), low=150, high=230)
    b = pp.threshold_in_brain(stack / 255.0, np.stack([brain, brain]), low=150, high=230)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 32, 32)


def test_threshold_in_brain_in_hu():
    image, brain, mask = head(blood=(12, 17, 12, 17), level=70.0)
    image[brain & (mask == 0)] = 30.0
    image[image == 255.0] = 1000.0
    pred = pp.threshold_in_brain(image, brain, unit="HU", low=50, high=90, erosion=0, opening=0, min_size=1)
    np.testing.assert_array_equal(pred, mask)


def test_threshold_in_brain_errors():
    image, brain, _ = head()
    with pytest.raises(ValueError, match="low must not exceed high"):
        pp.threshold_in_brain(image, brain, low=200, high=100)
    with pytest.raises(ValueError, match="does not match images shape"):
        pp.threshold_in_brain(image, brain[:-1])
    with pytest.raises(ValueError, match=r"Expected one of \['HU', 'display'\]"):
        pp.threshold_in_brain(image, brain, unit="raw")


def test_fit_threshold_recovers_the_band():
    images, brains, masks = [], [], []
    for k, level in enumerate((170.0, 185.0, 175.0)):
        image, brain, mask = head(blood=(10 + k, 15 + k, 12, 17), level=level)
        image[brain & (mask == 0)] = 130.0  # brighter brain, so a low band of 120 catches it
        # a bright calcification-like spot (240) inside the brain that is not blood
        image[20:23, 20:23] = 240.0
        images.append(image)
        brains.append(brain)
        masks.append(mask)
    best = pp.fit_threshold(np.stack(images), np.stack(masks), np.stack(brains),
                            lows=(120, 160, 180), highs=(190, 250), erosions=(0,), opening=0, min_size=1)
    assert best == {"low": 160.0, "high": 190.0, "erosion": 0, "dice": 1.0}
    per_patient = pp.fit_threshold(np.stack(images), np.stack(masks), np.stack(brains), lows=(140,),
                                   highs=(250,), erosions=(0,), opening=0, min_size=1,
                                   patient_ids=["a", "a", "b"])
    # with the spot included: each slice 25 true pixels and 9 false ones -> Dice 50 / 59
    assert per_patient["low"] == 140.0 and per_patient["dice"] == pytest.approx(50 / 59)


def test_all_background():
    pred = fs.all_background(np.ones((3, 8, 8, 1)))
    assert pred.shape == (3, 8, 8) and pred.dtype == np.uint8 and pred.sum() == 0
    with pytest.raises(ValueError, match="expected"):
        fs.all_background(np.ones(5))


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_protocol_hand_computed():
    truth = np.zeros((3, 4, 4), np.uint8)
    truth[0, 0, :2] = 1  # patient a, slice 0: 2 pixels
    truth[1, 0, :2] = 1  # patient a, slice 1: 2 pixels
    truth[2, 0, :4] = 1  # patient b: 4 pixels
    pred = np.zeros_like(truth)
    pred[0, 0, :2] = 1  # perfect
    pred[2, 0, :2] = 1  # half of b's lesion
    pred[2, 3, :2] = 1  # and two false pixels
    data = SliceDataset(images=np.zeros((3, 4, 4)), masks=truth, case_ids=["0", "1", "2"],
                        patient_ids=["a", "a", "b"], unit="display")
    out = fs.evaluate_protocol(pred, data)
    # patient a: tp 2 fp 0 fn 2 -> 4/6; patient b: tp 2 fp 2 fn 2 -> 4/8
    assert out["per_patient_dice"] == pytest.approx((4 / 6 + 4 / 8) / 2)
    assert out["per_patient_dice_sd"] == pytest.approx(np.std([4 / 6, 4 / 8], ddof=1))
    assert out["per_slice_dice"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert out["pooled_dice"] == pytest.approx(8 / 14)
    assert out["sensitivity"] == pytest.approx(4 / 8)
    assert out["specificity"] == pytest.approx(38 / 40)
    assert (out["n_patients"], out["n_slices"]) == (2, 3)
    assert fs.patient_dice(pred, data) == pytest.approx({"a": 4 / 6, "b": 0.5})
    with pytest.raises(ValueError, match="does not match"):
        fs.evaluate_protocol(pred[:2], data)


# ----------------------------------------------------------------------------- recipe
def test_recipe_validation_and_defaults():
    with pytest.raises(ValueError, match="empty_ratio"):
        fs.FewShotRecipe(empty_ratio=-1)
    with pytest.raises(ValueError, match="thresholds"):
        fs.FewShotRecipe(thresholds=(0.0, 0.5))
    with pytest.raises(ValueError, match="patch_size must divide image_size=128"):
        fs.FewShotRecipe(patch_size=48)
    with pytest.raises(ValueError, match="use preset=None"):
        fs.FewShotRecipe(patch_size=64, preset="study_unet")
    study = fs.STUDY_RECIPE
    assert study.preset == "study_unet" and study.config.loss == "bce" and study.config.num_epochs == 50
    assert study.empty_ratio == 0 and not (study.tta_flip or study.restrict_to_brain or study.tune_threshold)
    default = fs.FEWSHOT_DEFAULT
    # trained at the protocol's size or a multiple of it (scored on the protocol's masks after resizing)
    assert default.config.image_size % fs.PROTOCOLS["fewshot-ctich-v1"]["image_size"] == 0
    assert default.config.loss != "bce" and default.n_models >= 1


def test_choose_slices_ratio_is_seeded_and_capped():
    data = fake_ctich()
    train = data.select_patients(["49", "50", "51"])  # 6 lesion + 6 lesion-free slices
    half = fs._choose_slices(train, 0.5, seed=3)
    assert len(half) == 9 and fs.lesion_flags(half).sum() == 6
    assert half.case_ids == fs._choose_slices(train, 0.5, seed=3).case_ids
    assert len(fs._choose_slices(train, 10.0, seed=0)) == 12
    assert len(fs._choose_slices(train, 0.0, seed=0)) == 6


class _LeftBright:
    """A stand-in model: probability = the input pixel times a left-to-right ramp 1..0."""

    def __call__(self, x, training=False):
        ramp = np.linspace(1.0, 0.0, x.shape[2], dtype=np.float32)
        return x * ramp[None, None, :, None]


def _fitted(**changes) -> fs.FittedRecipe:
    config = TrainConfig(image_size=16, filters=(4, 8))
    recipe = fs.FewShotRecipe(config=config, brain_dilation=0, **changes)
    return fs.FittedRecipe(_LeftBright(), recipe, 0.25, None, 1.0, 1.0, 0, 0.0)


def test_predict_recipe_flip_restriction_threshold_and_resize():
    image = np.full((16, 16), 255.0, np.float32)  # display 255 -> input 1.0 everywhere
    data = SliceDataset(images=image[None], masks=np.zeros((1, 16, 16), np.uint8), case_ids=["0"],
                        patient_ids=["p"], unit="display")
    ramp = np.linspace(1.0, 0.0, 16)
    plain = fs.predict_recipe(_fitted(), data, probabilities=True)
    np.testing.assert_allclose(plain[0, 3], ramp, atol=1e-6)
    # the mirrored prediction, mirrored back, is the reversed ramp: the average is 0.5 everywhere
    flipped = fs.predict_recipe(_fitted(tta_flip=True), data, probabilities=True)
    np.testing.assert_allclose(flipped, 0.5, atol=1e-6)
    mask = fs.predict_recipe(_fitted(), data)
    np.testing.assert_array_equal(mask[0, 0], (ramp >= 0.25).astype(np.uint8))
    assert mask.dtype == np.uint8
    # a slice of soft tissue only (no skull) is brain everywhere: restriction changes nothing
    soft = data.replace(images=np.full((1, 16, 16), 102.0, np.float32))
    restricted = fs.predict_recipe(_fitted(restrict_to_brain=True), soft, probabilities=True)
    np.testing.assert_allclose(restricted[0, 5], 0.4 * ramp, atol=1e-6)
    head_image, brain, _ = head(16, None)
    one = data.replace(images=head_image[None])
    inside = fs.predict_recipe(_fitted(restrict_to_brain=True), one, probabilities=True)
    assert float(inside[0][~brain].max()) == 0.0 and float(inside[0][brain].max()) > 0.0
    assert fs.predict_recipe(_fitted(), data, probabilities=True, output_size=32).shape == (1, 32, 32)
    # a model working at 32 px answers on the data's own 16 px grid unless told otherwise
    big = dataclasses.replace(_fitted(), recipe=fs.FewShotRecipe(config=TrainConfig(image_size=32, filters=(4, 8))))
    assert fs.predict_recipe(big, data).shape == (1, 16, 16)
    wide = fs.predict_recipe(big, data, probabilities=True, output_size=32)
    np.testing.assert_allclose(wide[0, 3], np.linspace(1.0, 0.0, 32), atol=1e-6)


class _Constant:
    """A stand-in model: the same probability everywhere."""

    def __init__(self, value: float):
        self.value = value

    def __call__(self, x, training=False):
        return np.full(x.shape[:3] + (1,), self.value, np.float32)


def test_predict_recipe_averages_the_members_of_an_ensemble():
    image = np.full((1, 16, 16), 255.0, np.float32)
    data = SliceDataset(images=image, masks=np.zeros((1, 16, 16), np.uint8), case_ids=["0"],
                        patient_ids=["p"], unit="display")
    recipe = fs.FewShotRecipe(config=TrainConfig(image_size=16, filters=(4, 8)), n_models=3)
    members = (_Constant(0.1), _Constant(0.2), _Constant(0.6))
    fitted = fs.FittedRecipe(members[0], recipe, 0.25, None, 1.0, 1.0, 0, 0.0, models=members)
    np.testing.assert_allclose(fs.predict_recipe(fitted, data, probabilities=True), 0.3, atol=1e-6)
    assert int(fs.predict_recipe(fitted, data).min()) == 1          # 0.3 >= 0.25; member 0 alone: 0.1
    single = fs.FittedRecipe(members[0], recipe, 0.25, None, 1.0, 1.0, 0, 0.0)
    assert single.models == (members[0],)
    assert int(fs.predict_recipe(single, data).max()) == 0
    # with flips, each member and its mirrored prediction count once
    both = dataclasses.replace(fitted, recipe=dataclasses.replace(recipe, tta_flip=True),
                               models=(_LeftBright(), _Constant(0.5)))
    np.testing.assert_allclose(fs.predict_recipe(both, data, probabilities=True), 0.5, atol=1e-6)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_models"):
            fs.FewShotRecipe(n_models=bad)


def test_best_threshold_maximises_per_patient_dice():
    truth = np.zeros((2, 1, 4), np.uint8)
    truth[0, 0, :2] = 1
    truth[1, 0, :1] = 1
    prob = np.array([[[0.9, 0.6, 0.4, 0.1]], [[0.7, 0.2, 0.2, 0.2]]], np.float32)
    # 0.5: a perfect (1.0), b perfect (1.0); 0.3: a 4/5, b 1.0; 0.8: a 2/3, b 0
    assert fs.best_threshold(prob, truth, ["a", "b"], (0.3, 0.5, 0.8)) == (0.5, 1.0)
    thr, dice = fs.best_threshold(prob, truth, ["a", "b"], (0.3, 0.8))
    assert thr == 0.3 and dice == pytest.approx((0.8 + 1.0) / 2)
    with pytest.raises(ValueError, match="at least one"):
        fs.best_threshold(prob, truth, ["a", "b"], ())


# ----------------------------------------------------------------------------- brain masks, channels
def test_brain_mask_stack_is_preprocess_brain_mask_of_each_slice():
    from strokekit.preprocess import brain_mask

    image, brain, _ = head()
    empty_head, _, _ = head(blood=None)
    stack = pp.brain_mask_stack(np.stack([image, empty_head, np.zeros_like(image)]))
    assert stack.shape == (3, 32, 32) and stack.dtype == bool
    # inside the bone ring, blood included (holes are filled); the ring and the air are out
    np.testing.assert_array_equal(stack[0], brain)
    np.testing.assert_array_equal(stack[1], brain_mask(empty_head, unit="display"))
    assert not stack[2].any()  # no head, no brain: nothing will be predicted there
    np.testing.assert_array_equal(pp.brain_mask_stack(image), brain)


def test_threshold_in_brain_finds_the_blob_with_its_own_brain_mask():
    image, _, mask = head()
    pred = pp.threshold_in_brain(image, low=150, high=230)  # default: brain mask, erosion 1, opening 1
    expected = mask.copy()
    for r, c in [(12, 12), (12, 16), (16, 12), (16, 16)]:  # the opening cuts the square's corners
        expected[r, c] = 0
    np.testing.assert_array_equal(pred, expected)
    # the bone ring (255) is above the band and outside the brain: nothing of it is found
    assert pred[image == 255.0].sum() == 0


def test_model_inputs_window_and_candidate_channels():
    image, _, mask = head(16, (6, 9, 6, 9))
    data = SliceDataset(images=image[None], masks=mask[None], case_ids=["0"], patient_ids=["p"], unit="display")
    recipe = fs.FewShotRecipe(config=TrainConfig(image_size=16, filters=(4, 8)), display_windows=((100.0, 200.0),),
                              candidate_channel=True, brain_dilation=0)
    band = dict(low=150.0, high=230.0, erosion=0)
    x, y, _ = fs._model_inputs(recipe, data, band)
    assert x.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(x[0, ..., 0], image / 255.0, atol=1e-6)
    # window 100..200: brain (100) -> 0, blood (180) -> 0.8, bone (255) -> 1
    assert x[0, 4, 8, 1] == pytest.approx(0.0) and x[0, 7, 7, 1] == pytest.approx(0.8)
    assert x[0, 0, 8, 1] == pytest.approx(0.0) and x[0, 1, 8, 1] == pytest.approx(1.0)
    np.testing.assert_array_equal(x[0, ..., 2], pp.threshold_in_brain(image, low=150, high=230, erosion=0))
    np.testing.assert_array_equal(y, mask[None])
    with pytest.raises(ValueError, match="needs the band"):
        fs._model_inputs(recipe, data)
    with pytest.raises(ValueError, match="display_windows"):
        fs.FewShotRecipe(display_windows=((200.0, 100.0),))


def test_redecide_changes_decisions_not_the_model():
    image = np.full((16, 16), 255.0, np.float32)
    truth = np.zeros((1, 16, 16), np.uint8)
    truth[:, :, :4] = 1  # the left quarter, where the ramp is highest
    val = SliceDataset(images=image[None], masks=truth, case_ids=["0"], patient_ids=["p"], unit="display")
    fitted = _fitted()
    tuned = fs.redecide(fitted, val, tune_threshold=True, thresholds=(0.5, 0.75, 0.9))
    # ramp 1..0 over 16 columns: >= 0.75 keeps columns 0-3 exactly
    assert tuned.threshold == 0.75 and tuned.val_dice == pytest.approx(1.0) and tuned.model is fitted.model
    flipped = fs.redecide(fitted, val, tta_flip=True)
    assert flipped.threshold == 0.5 and flipped.val_dice == pytest.approx(2 * 4 / (4 + 16))  # 0.5 everywhere
    with pytest.raises(ValueError, match="need training"):
        fs.redecide(fitted, val, empty_ratio=1.0)
    assert not tuned.threshold_flat and not flipped.threshold_flat  # flipped: not tuned at all


def test_a_tuned_threshold_on_a_flat_validation_curve_is_flagged():
    image = np.full((1, 16, 16), 255.0, np.float32)
    truth = np.zeros((1, 16, 16), np.uint8)
    truth[:, 4:8, :4] = 1
    val = SliceDataset(images=image, masks=truth, case_ids=["0"], patient_ids=["p"], unit="display")
    recipe = fs.FewShotRecipe(config=TrainConfig(image_size=16, filters=(4, 8)), brain_dilation=0)
    blind = fs.FittedRecipe(_Constant(0.05), recipe, 0.5, None, 1.0, 1.0, 0, 0.0)  # below every candidate
    flat = fs.redecide(blind, val, tune_threshold=True, thresholds=(0.3, 0.1, 0.5))
    assert flat.threshold == 0.3 and flat.val_dice == 0.0 and flat.threshold_flat  # the first candidate
    assert not fs.redecide(blind, val, tune_threshold=False).threshold_flat        # a fixed threshold: no tuning
    informed = fs.redecide(dataclasses.replace(blind, models=(_LeftBright(),)), val, tune_threshold=True,
                           thresholds=(0.3, 0.1, 0.5))
    assert not informed.threshold_flat and informed.val_dice > 0.0
    prob = np.linspace(0.0, 1.0, 16, dtype=np.float32)[None, None, :].repeat(16, axis=1)
    scores = fs.threshold_scores(prob, truth, ["p"], (0.2, 0.99, 1.5))
    assert scores.shape == (3,) and scores[0] > 0.0 and scores[1] == scores[2] == 0.0
    assert fs.best_threshold(prob, truth, ["p"], (0.2, 0.99, 1.5)) == (0.2, float(scores[0]))
    with pytest.raises(ValueError, match="at least one"):
        fs.threshold_scores(prob, truth, ["p"], ())


def test_ablation_recipes_change_one_lever_at_a_time():
    steps = fs.ablation_recipes(image_size=64, num_epochs=4, filters=(4, 8))
    labels = [label for label, _ in steps]
    recipes = [recipe for _, recipe in steps]
    assert len(steps) == 7 and labels[0].startswith("0 study") and labels[-1].endswith("(the default)")
    assert all(r.config.image_size == 64 and r.config.num_epochs == 4 and r.config.filters == (4, 8) for r in recipes)
    study = recipes[0]
    assert (study.config.loss, study.config.activation, study.config.dropout) == ("bce", "leaky_relu", 0.5)
    assert study.empty_ratio == 0 and study.patch_size is None and not study.config.batch_norm
    final = recipes[-1]
    default = fs.FEWSHOT_DEFAULT
    assert final == dataclasses.replace(default, patch_size=final.patch_size, config=dataclasses.replace(
        default.config, image_size=64, num_epochs=4, filters=(4, 8),
        early_stopping_patience=final.config.early_stopping_patience))
    if default.patch_size:  # crops keep their share of the slice at another size, 32 px at least
        assert final.patch_size == max(32, default.patch_size * 64 // default.config.image_size)
    at128 = dataclasses.replace(default, patch_size=32, config=dataclasses.replace(default.config, image_size=128))
    wide = fs.ablation_recipes(image_size=256, final=at128)
    assert wide[-1][1].patch_size == 64 and wide[3][1].patch_size == 64   # 1/4 of the side at 128 and 256 px
    at256 = dataclasses.replace(default, patch_size=64, config=dataclasses.replace(default.config, image_size=256))
    assert fs.ablation_recipes(image_size=64, final=at256)[-1][1].patch_size == 32   # not 16 px: no context
    # the last two steps change only after-training decisions: the flips, brain and threshold, then the floor
    for k in (-2, -1):
        before = {f: getattr(recipes[k - 1], f) for f in fs.POSTHOC_FIELDS}
        after = {f: getattr(recipes[k], f) for f in fs.POSTHOC_FIELDS}
        assert dataclasses.replace(recipes[k - 1], **after) == recipes[k]
        assert before != {f: getattr(recipes[k], f) for f in fs.POSTHOC_FIELDS}
        assert not fs.needs_training(recipes[k - 1], recipes[k])
    assert recipes[-2].stack_min_contrast is None and final.stack_min_contrast == default.stack_min_contrast
    assert all(fs.needs_training(a, b) for a, b in zip(recipes[:4], recipes[1:5]))   # steps 1-4 train anew
    # a default without a floor ends at the step before (no empty step)
    no_floor = dataclasses.replace(default, stack_min_contrast=None, stack_min_ml=0.0)
    assert len(fs.ablation_recipes(image_size=64, final=no_floor)) == 6


@pytest.mark.backend
def test_fit_recipe_patches_channels_and_bn_recalibration_end_to_end():
    data = fake_ctich(vanish=False)
    train = data.select_patients(["49", "50", "51"])
    val = data.subset(np.flatnonzero((np.asarray(data.patient_ids) == "66") & (data.extra["has_mask"] == 1)))
    recipe = fs.FewShotRecipe(
        config=TrainConfig(image_size=16, filters=(4, 8), batch_norm=True, num_epochs=2, batch_size=4,
                           early_stopping_patience=0, reduce_lr_patience=0, workers=1),
        empty_ratio=1.0, patch_size=8, patches_per_slice=2, display_windows=((130.0, 230.0),),
        candidate_channel=True, restrict_to_brain=True, tta_flip=True, tune_threshold=True)
    fitted = fs.fit_recipe(recipe, train, val, seed=1)
    assert fitted.model.input_shape[-1] == 3 and len(fitted.history) == 2
    assert fitted.n_train == 12 and fitted.threshold in recipe.thresholds
    assert fitted.band is not None and fitted.band["low"] <= 180.0 <= fitted.band["high"]
    prob = fs.predict_recipe(fitted, val, probabilities=True)
    assert prob.shape == (2, 16, 16) and 0.0 <= prob.min() and prob.max() <= 1.0
    brains = pp.dilate_cross(pp.brain_mask_stack(val.images), recipe.brain_dilation)
    assert float(prob[~brains].max(initial=0.0)) == 0.0  # restricted to the (dilated) brain
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32)
    single = np.asarray(fitted.model(x, training=False))
    assert recalibrate_batchnorm(fitted.model, np.zeros((2, 16, 16, 3), np.float32)) > 0
    # an ensemble of two: member 0 is the single network of the same seed, member 1 differs
    pair = fs.fit_recipe(dataclasses.replace(recipe, n_models=2), train, val, seed=1)
    assert len(pair.models) == 2 and pair.model is pair.models[0] and pair.models[0] is not pair.models[1]
    first = np.asarray(pair.models[0](x, training=False))
    np.testing.assert_allclose(first, single, atol=1e-5)
    assert not np.allclose(first, np.asarray(pair.models[1](x, training=False)), atol=1e-5)
    assert pair.threshold in recipe.thresholds and pair.band == fitted.band
    with pytest.raises(ValueError, match="pre-built model"):
        fs.fit_recipe(dataclasses.replace(recipe, n_models=2), train, val, model=fitted.model)
    # copy-paste: each of the 6 training lesion slices also shown on a lesion-free patient's brain
    pasted = fs.fit_recipe(dataclasses.replace(recipe, paste_per_slice=1), train, val, seed=1,
                           backgrounds=data.select_patients(["99"]))
    assert pasted.n_train == fitted.n_train + 6
    with pytest.raises(ValueError, match="display levels"):  # an HU recipe on HU slices: pasting would change units
        fs.fit_recipe(dataclasses.replace(recipe, paste_per_slice=1, display_windows=(), candidate_channel=False),
                      train.replace(unit="HU"), val, backgrounds=data.select_patients(["99"]))


def test_train_config_few_shot_is_the_default_recipes_network():
    config = TrainConfig.few_shot()
    assert config == fs.FEWSHOT_DEFAULT.config
    assert config.batch_norm and config.loss == "bce_dice" and config.augment == fs.STRONG_AUGMENT
    assert TrainConfig.few_shot(seed=3).seed == 3 and TrainConfig.few_shot(seed=3).filters == config.filters
    assert TrainConfig().batch_norm is False   # the class defaults stay the study's shape


def test_attach_context_finds_neighbours_of_the_same_patient_or_repeats_the_slice():
    images = np.arange(5 * 4 * 4, dtype=np.float32).reshape(5, 4, 4)
    data = SliceDataset(images=images, masks=np.zeros((5, 4, 4), np.uint8), case_ids=list("abcde"),
                        patient_ids=["1", "1", "1", "2", "2"], slice_indices=[1, 2, 4, 1, 2], unit="display")
    ctx = fs.attach_context(data, 1)
    below, above = ctx.extra["slice-1"][:, 0, 0], ctx.extra["slice+1"][:, 0, 0]
    np.testing.assert_array_equal(below, [0, 0, 32, 48, 48])    # a: none below -> itself; c (4): 3 absent
    np.testing.assert_array_equal(above, [16, 16, 32, 64, 64])  # b: 3 absent -> itself; 2nd patient apart
    sub = ctx.subset([1])                                        # a subset keeps the neighbours it had
    assert sub.extra["slice-1"][0, 0, 0] == 0 and fs.attach_context(sub, 1) is sub
    only_b = fs.attach_context(data.subset([1]), 1, source=data)  # neighbours from the whole scans
    assert only_b.extra["slice-1"][0, 0, 0] == 0
    recipe = fs.FewShotRecipe(config=TrainConfig(image_size=4, filters=(4, 8)), context_slices=1)
    x, _, _ = fs._model_inputs(recipe, data)
    assert x.shape == (5, 4, 4, 3)
    np.testing.assert_allclose(x[0, ..., 2], images[1] / 255.0, atol=1e-6)   # image, below, above
    with pytest.raises(ValueError, match="context_slices"):
        fs.FewShotRecipe(context_slices=5)


def test_hu_slices_reach_a_display_recipe_through_the_ctich_window():
    hu = np.array([[[-20.0, 40.0, 100.0, 1000.0]]], np.float32)  # window L40/W120: -20 -> 0, 100 -> 255
    data = SliceDataset(images=hu, masks=np.zeros((1, 1, 4), np.uint8), case_ids=["0"], unit="HU")
    shown = fs.as_display(data)
    assert shown.unit == "display" and data.unit == "HU"
    np.testing.assert_allclose(shown.images[0, 0], [0.0, 127.5, 255.0, 255.0], atol=1e-3)
    assert fs.as_display(shown) is shown


def test_save_and_load_a_fitted_recipe_round_trip(tmp_path, tiny_recipe):
    data = fake_ctich(vanish=False)
    train = data.select_patients(["49", "50", "51"])
    val = data.subset(np.flatnonzero((np.asarray(data.patient_ids) == "66") & (data.extra["has_mask"] == 1)))
    fitted = fs.fit_recipe(tiny_recipe, train, val, seed=0)
    folder = fs.save_fitted(fitted, tmp_path / "ct", trained_on="fake CT-ICH 49/50/51", scores={"test": 0.5})
    assert fewshot_run_info(folder)["trained_on"] == "fake CT-ICH 49/50/51"
    back = fs.load_fitted(folder)
    assert back.recipe == fitted.recipe and back.threshold == fitted.threshold and back.band == fitted.band
    assert back.threshold_flat == fitted.threshold_flat
    flat = fs.save_fitted(dataclasses.replace(fitted, threshold_flat=True), tmp_path / "flat", trained_on="x")
    assert fs.load_fitted(flat).threshold_flat
    np.testing.assert_allclose(fs.predict_recipe(back, val, probabilities=True),
                               fs.predict_recipe(fitted, val, probabilities=True), atol=1e-5)
    with pytest.raises(FileExistsError, match="overwrite"):
        fs.save_fitted(fitted, folder, trained_on="again")
    fs.save_fitted(fitted, folder, trained_on="again", overwrite=True)
    assert fewshot_run_info(tmp_path) is None
    with pytest.raises(DataError, match="not a few-shot run"):
        fs.load_fitted(tmp_path)


def test_threshold_baseline_fits_on_lesion_slices_of_train_and_val_and_segments_test():
    data = fake_ctich(vanish=False)
    split = fs.protocol_split(data, empty_slices=True)
    train, val, test = (split.dataset(data, s) for s in ("train", "val", "test"))
    band, pred = fs.threshold_baseline(train, val, test)
    dev = [train.subset(np.flatnonzero(fs.lesion_flags(train))), val]
    expected = pp.fit_threshold(np.concatenate([d.images for d in dev]), np.concatenate([d.masks for d in dev]),
                                patient_ids=sum((list(d.patient_ids) for d in dev), []))
    assert band == expected and band["low"] <= 180.0 <= band["high"]   # the blood level of the fake heads
    np.testing.assert_array_equal(pred, pp.threshold_in_brain(test.images, low=band["low"], high=band["high"],
                                                              erosion=band["erosion"]))
    assert pred.shape == test.masks.shape and pred[test.masks > 0].mean() > 0.5


def test_cranial_slices_keep_the_head_and_drop_the_neck_and_predict_nothing_there():
    size = pp.ENCLOSURE_SIDE
    image, _, _ = head(size, blood=None)
    yy, xx = np.mgrid[:size, :size]
    neck = np.zeros((size, size), np.float32)
    neck[np.hypot(yy - size / 2, xx - size / 2) < 0.4 * size] = 100.0  # soft tissue
    neck[np.hypot(yy - size * 0.7, xx - size / 2) < 0.07 * size] = 255.0  # a vertebra
    neck[np.hypot(yy - size * 0.25, xx - size / 2) < 0.05 * size] = 255.0  # the jaw; no skull
    data = SliceDataset(images=np.stack([image, neck]), masks=np.zeros((2, size, size), np.uint8),
                        case_ids=["0", "1"], patient_ids=["p", "p"], unit="display")
    assert pp.brain_mask_stack(neck).any()  # the brain finder takes the neck's soft tissue for brain
    assert pp.cranial_slices(data).tolist() == [True, False]
    prob = fs.predict_recipe(_fitted(restrict_to_brain=True), data, probabilities=True)
    assert prob[0].max() > 0 and prob[1].max() == 0
    assert fs.predict_recipe(_fitted(), data, probabilities=True)[1].max() > 0  # no restriction: no gate
    # below ENCLOSURE_SIDE the bone is lost to resizing: every slice counts as cranial
    small = data.replace(images=data.images[:, ::4, ::4], masks=data.masks[:, ::4, ::4])
    assert pp.cranial_slices(small).tolist() == [True, True]


def test_cranial_slices_judge_hu_in_the_display_window_and_use_the_shorter_side():
    size = pp.ENCLOSURE_SIDE
    image, _, _ = head(size, blood=None)
    hu = np.where(image >= 255, 1200.0, np.where(image > 0, 35.0, -1000.0)).astype(np.float32)  # bone, brain, air
    masks = np.zeros((1, size, size), np.uint8)
    data = SliceDataset(images=hu[None], masks=masks, case_ids=["0"], patient_ids=["p"], unit="HU")
    assert pp.cranial_slices(data).tolist() == [True]
    # a slice padded to twice the width is judged at its shorter side, where the skull is still whole
    wide = np.pad(image, ((0, 0), (size // 2, size // 2)))[None]
    data = SliceDataset(images=wide, masks=np.zeros(wide.shape, np.uint8), case_ids=["0"], patient_ids=["p"],
                        unit="display")
    assert pp.cranial_slices(data).tolist() == [True]


class _Identity:
    """A stand-in model: probability = the input image (display level / 255)."""

    def __call__(self, x, training=False):
        return x[..., :1]


def test_predict_recipe_applies_the_brightness_floor_per_patient_at_the_models_size(monkeypatch):
    """The protocol, a whole scan and the app apply one floor: each patient's slices in order, measured at the
    model's size, the probabilities untouched; floor=False gives the thresholded masks."""
    size = 32
    rows, cols = slice(12, 18), slice(12, 18)
    images, pids, order = [], [], []
    for k in range(4):  # patients a and b interleaved, b's slices in reverse order
        image, _, _ = head(size, blood=None)
        patient = "ab"[k % 2]
        if patient == "b":
            image[image == 100.0] = 130.0  # b's brain is brighter: the same region is only 30 levels above it
        image[rows, cols] = 160.0          # a: 60 levels above its brain
        image[4:6, 14:18] = 255.0          # (the bone ring is marked too; the test looks at the square)
        images.append(image)
        pids.append(patient)
        order.append(k // 2 if patient == "a" else 1 - k // 2)
    data = SliceDataset(np.stack(images), np.zeros((4, size, size), np.uint8), [f"s{k}" for k in range(4)],
                        patient_ids=pids, slice_indices=np.array(order), unit="display",
                        spacing=(1.0, 1.0), slice_thickness=5.0)
    recipe = fs.FewShotRecipe(config=TrainConfig(image_size=size, filters=(4, 8)), brain_dilation=0,
                              stack_min_contrast=45.0, stack_min_ml=0.0)
    fitted = fs.FittedRecipe(_Identity(), recipe, 0.5, None, 1.0, 1.0, 0, 0.0)
    plain = fs.predict_recipe(fitted, data, floor=False)
    assert plain[:, rows, cols].all()                       # 160 / 255 >= 0.5 on every slice
    floored = fs.predict_recipe(fitted, data)
    assert floored.dtype == np.uint8
    assert floored[0::2, rows, cols].all()                  # patient a: 60 >= 45 levels, kept
    assert not floored[1::2, rows, cols].any()              # patient b: 30 < 45, dropped
    # the probabilities are never floored
    np.testing.assert_allclose(fs.predict_recipe(fitted, data, probabilities=True)[1, 14, 14], 160 / 255, atol=1e-6)
    # at twice the size the floor is still measured at the model's 32 px: the same decision, on the finer grid
    big = fs.predict_recipe(fitted, data, output_size=64)
    assert big.shape == (4, 64, 64)
    assert big[0, 26:34, 26:34].all() and not big[1, 26:34, 26:34].any()
    # read as one scan (patients unknown), a's and b's squares join one component measured against the
    # median of the four slices' brain levels (100, 130, 100, 130 -> 115): 45 levels, so b's squares stay too
    one_scan = fs.predict_recipe(fitted, data.replace(patient_ids=None))
    assert one_scan[:, rows, cols].all()
    # a recipe that finds brain masks for its inputs hands them to the floor: found once, the same answer
    seeing = dataclasses.replace(fitted, recipe=dataclasses.replace(recipe, display_windows=((0.0, 255.0),)),
                                 band=None)
    seeing.recipe = dataclasses.replace(seeing.recipe, restrict_to_brain=True)
    expected = fs.predict_recipe(seeing, data)
    calls = []
    real = fs.brain_mask_stack
    monkeypatch.setattr(fs, "brain_mask_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.testing.assert_array_equal(fs.predict_recipe(seeing, data), expected)
    assert len(calls) == 1 and expected[0::2, rows, cols].all() and not expected[1::2, rows, cols].any()
    monkeypatch.undo()
    # a recipe without a floor: the thresholded masks
    off = dataclasses.replace(fitted, recipe=dataclasses.replace(recipe, stack_min_contrast=None))
    np.testing.assert_array_equal(fs.predict_recipe(off, data), plain)
    assert recipe.has_floor and not off.recipe.has_floor
    assert dataclasses.replace(off.recipe, stack_min_ml=0.5).has_floor   # a size floor alone is a floor


def test_keep_bright_components_drops_what_is_not_brighter_than_the_brain():
    """Whole scans: a component stays only if it is brighter than its slices' brain by the floor, and large enough."""
    size, pad = 64, 48  # a head in a wide field of air: the slice's median is air, only the brain's is 100
    image, _, _ = head(size, blood=None)
    stack = np.repeat(np.pad(image, pad)[None], 4, axis=0)
    mask = np.zeros(stack.shape, np.uint8)
    o = pad
    stack[1:3, o + 20:o + 30, o + 20:o + 30] = 160.0  # blood: 60 levels above the brain's 100, on two slices
    mask[1:3, o + 20:o + 30, o + 20:o + 30] = 1
    mask[1:3, o + 36:o + 46, o + 36:o + 46] = 1       # marked brain: no brighter than the brain around it
    stack[3, o + 40:o + 42, o + 20:o + 22] = 200.0    # a bright speck of 4 pixels on one slice
    mask[3, o + 40:o + 42, o + 20:o + 22] = 1
    data = SliceDataset(stack, np.zeros_like(mask), [f"s{k}" for k in range(4)], unit="display",
                        spacing=(1.0, 1.0), slice_thickness=5.0)
    recipe = dataclasses.replace(fs.FewShotRecipe(), stack_min_contrast=30.0, stack_min_ml=0.05)
    kept = fs.keep_bright_components(recipe, data, mask)
    assert kept.dtype == np.uint8 and kept.shape == mask.shape
    assert kept[1:3, o + 20:o + 30, o + 20:o + 30].all()  # blood kept (2 x 100 px x 5 mm^3 = 1 mL)
    assert not kept[1:3, o + 36:o + 46, o + 36:o + 46].any()  # as bright as brain: dropped
    assert not kept[3].any()                              # 4 px x 5 mm^3 = 0.02 mL < 0.05: dropped
    assert kept.sum() == 200
    loose = dataclasses.replace(recipe, stack_min_ml=0.0)
    assert fs.keep_bright_components(loose, data, mask)[3, o + 40:o + 42, o + 20:o + 22].all()
    unit_range = data.replace(images=stack / 255.0)      # display slices in 0..1 read as 0..255
    assert np.array_equal(fs.keep_bright_components(recipe, unit_range, mask), kept)
    # a mask at half size: its pixels are 2 mm wide, so the blood is 1 mL there too (0.25 mL if read as 1 mm)
    half = fs.keep_bright_components(dataclasses.replace(recipe, stack_min_ml=0.5), data, mask[:, ::2, ::2])
    assert half.shape == (4, 80, 80) and half.sum() == 50 and not half[3].any()
    strict = dataclasses.replace(recipe, stack_min_contrast=70.0)
    assert not fs.keep_bright_components(strict, data, mask)[1:3].any()
    # brain masks the caller already has are used as given: the same masks, the same answer; a brain that
    # takes in the bright blood square and the air around the head puts its median at air: everything is brighter
    brains = pp.brain_mask_stack(stack, unit="display")
    assert np.array_equal(fs.keep_bright_components(recipe, data, mask, brains=brains), kept)
    wide = np.zeros_like(brains)
    wide[:, : o + 30] = True
    assert fs.keep_bright_components(recipe, data, mask, brains=wide)[1:3, o + 36:o + 46, o + 36:o + 46].all()
    off = fs.FewShotRecipe()  # no floors: the mask comes back unchanged
    assert np.array_equal(fs.keep_bright_components(off, data, mask), mask)
    assert fs.FEWSHOT_DEFAULT.stack_min_contrast is not None  # the app's CT model filters its scans
    with pytest.raises(ValueError, match="mask must be"):
        fs.keep_bright_components(recipe, data, mask[:2])
    with pytest.raises(ValueError, match="stack_min_ml"):
        dataclasses.replace(recipe, stack_min_ml=-1.0)


def test_paste_lesions_moves_a_bleed_onto_another_brain_at_its_contrast():
    """Copy-paste: the lesion keeps its contrast to the brain (80 levels above it) and lands where it lay relative to
    the brain's bounding box, on a smaller, shifted brain of another patient (mirrored at random), inside the new
    brain; bad backgrounds are refused by name."""
    size = 32
    rows, cols = slice(8, 12), slice(9, 13)
    image, brain, mask = head(size, blood=None)
    image[rows, cols], mask[rows, cols] = 180.0, 1
    lesions = SliceDataset(image[None], mask[None], ["L"], patient_ids=["49"], slice_indices=np.array([3]),
                           unit="display")
    backs = []
    for k in range(3):  # heads of 28 px, shifted by (3, 1 + k) in the 32 px field: brains about 0.88 as wide
        small, _, _ = head(28, blood=None)
        small[small == 100.0] = 130.0 + k  # brighter brains than the lesion's own
        back = np.zeros((size, size), np.float32)
        back[3:31, 1 + k:29 + k] = small
        backs.append(back)
    own = head(size, blood=None)[0]  # a lesion-free slice of the lesion's own patient: never a background
    backgrounds = SliceDataset(np.stack([*backs, own]), np.zeros((4, size, size), np.uint8),
                               ["b0", "b1", "b2", "own"], patient_ids=["90", "91", "92", "49"],
                               slice_indices=np.array([5, 6, 7, 8]), unit="display")
    pasted = fs.paste_lesions(lesions, backgrounds, per_slice=12, seed=0, dilation=0)
    assert len(pasted) == 12 and pasted.unit == "display" and pasted.masks.max() == 1
    assert all(c.startswith("paste:L:b") for c in pasted.case_ids) and len(set(pasted.case_ids)) == 12

    def box(b):
        r, c = np.flatnonzero(b.any(1)), np.flatnonzero(b.any(0))
        return r[0], r[-1] + 1, c[0], c[-1] + 1

    r0, r1, c0, c1 = box(brain)
    centre = np.array([9.5, 10.5])  # the lesion's centre (pixel centres)
    mirrored = 0
    for n in range(len(pasted)):
        k = int(pasted.case_ids[n].split(":")[2][1])
        assert pasted.patient_ids[n] == f"9{k}" and pasted.slice_indices[n] == 5 + k
        t0, t1, u0, u1 = box(pp.brain_mask_stack(backs[k][None])[0])
        where = pasted.masks[n] > 0
        got = np.argwhere(where).mean(0)
        # where the box-to-box map sends the lesion's centre (or its mirror image)
        col = centre[1] if got[1] < size / 2 else size - 1 - centre[1]
        mirrored += got[1] >= size / 2
        lo = np.array([r0, c0 if got[1] < size / 2 else size - c1])
        scale = np.array([(r1 - r0) / (t1 - t0), (c1 - c0) / (u1 - u0)])
        expected = np.array([t0, u0]) + (np.array([centre[0], col]) - lo) / scale
        np.testing.assert_allclose(got, expected, atol=0.75)
        assert 9 <= where.sum() <= 16                    # the 4 x 4 square shrunk by about 0.88: 3-4 pixels a side
        np.testing.assert_allclose(pasted.images[n][where], 130.0 + k + 80.0, atol=1e-3)   # 80 levels above
        far = np.ones((size, size), bool)
        far[2:18, 3:19] = far[2:18, size - 19:size - 1] = False
        np.testing.assert_array_equal(pasted.images[n][far], backs[k][far])              # the rest untouched
    assert 0 < mirrored < 12                                                            # both ways, seeded
    again = fs.paste_lesions(lesions, backgrounds, per_slice=12, seed=0, dilation=0)
    np.testing.assert_array_equal(again.images, pasted.images)
    assert again.case_ids == pasted.case_ids
    assert fs.paste_lesions(lesions, backgrounds.replace(patient_ids=None), seed=1).patient_ids is None
    # a background with a lesion, another size, or brains too unlike the lesion's are refused
    with pytest.raises(DataError, match=r"lesion-free.*b1"):
        marked = backgrounds.masks.copy() | (np.arange(4) == 1)[:, None, None].astype(np.uint8)
        fs.paste_lesions(lesions, backgrounds.replace(masks=marked))
    with pytest.raises(DataError, match="resize"):
        fs.paste_lesions(lesions, pp.resize_dataset(backgrounds, 16))
    tiny = np.zeros((1, size, size), np.float32)
    small_head, _, _ = head(16, blood=None)
    tiny[0, 8:24, 8:24] = small_head                                                    # a brain half as wide
    with pytest.raises(DataError, match="no lesion fits"):
        fs.paste_lesions(lesions, SliceDataset(tiny, np.zeros((1, size, size), np.uint8), ["t"], unit="display"))
    # the recipe field and fit_recipe's backgrounds
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="paste_per_slice"):
            fs.FewShotRecipe(paste_per_slice=bad)
    with pytest.raises(ValueError, match="context_slices"):
        fs.FewShotRecipe(paste_per_slice=1, context_slices=1)
    with pytest.raises(DataError, match="backgrounds"):
        fs.fit_recipe(fs.FewShotRecipe(paste_per_slice=1), lesions, lesions)
