"""Tests for strokekit.perfusion: map synthesis rules, the multi-input loader, loss and schedules."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses

import keras
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from strokekit import ctp_phantom, engine, losses
from strokekit import perfusion as pf
from strokekit.augment import AugmentConfig
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.phantom import PhantomConfig, make_volume

PHANTOM = PhantomConfig(n_patients=3, image_size=64, lesion_types=("ischemic",), seed=0)


@pytest.fixture(scope="module")
def volumes():
    return [make_volume(k, PHANTOM) for k in range(3)]


@pytest.fixture(scope="module")
def ctp(volumes):
    return ctp_phantom.synthesize_perfusion(volumes, ctp_phantom.PerfusionConfig(), seed=0, progress=False)


@pytest.fixture(scope="module")
def clean(volumes):
    return ctp_phantom.synthesize_perfusion(volumes, ctp_phantom.PerfusionConfig(noise=0.0), seed=0, progress=False)


# --------------------------------------------------------------------------- synthesis
@pytest.mark.backend
def test_dataset_shape_channels_and_labels(ctp, volumes):
    n = sum(len(v.selected) for v in volumes)
    assert ctp.images.shape == (n, 64, 64, len(pf.MAP_NAMES)) == (15, 64, 64, 5)
    assert ctp.images.min() >= 0.0 and ctp.images.max() <= 1.0
    assert ctp.class_names == ("background", "brain", "penumbra", "core")
    assert set(np.unique(ctp.masks)) == {0, 1, 2, 3}
    assert ctp.case_ids[0] == f"P01_s{volumes[0].selected[0]:02d}"


@pytest.mark.backend
def test_core_strictly_inside_penumbra_and_brain(ctp, volumes):
    start = 0
    in_plane = np.ones((3, 3), bool)
    for v in volumes:
        rows = slice(start, start + len(v.selected))
        start += len(v.selected)
        masks = ctp.masks[rows]
        brain = v.brain[v.selected]
        # Brain classes exactly on the phantom's brain; core only inside its infarct.
        np.testing.assert_array_equal(masks > 0, brain)
        assert not ((masks == 3) & (v.labels[v.selected] != 2)).any()
        for m, b in zip(masks, brain):
            core = m == 3
            if not core.any():
                continue
            ring = ndimage.binary_dilation(core, structure=in_plane) & b
            # every brain neighbour of a core pixel is core or penumbra: the core never touches
            # unaffected brain
            assert ((m[ring] == 2) | (m[ring] == 3)).all()
    assert (ctp.masks == 3).sum() > 0 and (ctp.masks == 2).sum() > (ctp.masks == 3).sum() / 2


def _contralateral_normal(dataset, i):
    """Normal brain pixels of slice i on the side of the brain centroid away from the core."""
    m = dataset.masks[i]
    cols = np.nonzero(m > 0)[1]
    centre = cols.mean()
    core_side = np.sign(np.nonzero(m == 3)[1].mean() - centre)
    cc = np.arange(m.shape[1])[None, :].repeat(m.shape[0], 0)
    return (m == 1) & (np.sign(cc - centre) == -core_side) & (np.abs(cc - centre) > 5)


@pytest.mark.backend
@pytest.mark.parametrize("which", ["ctp", "clean"])
def test_map_relations(which, request):
    data = request.getfixturevalue(which)
    phys = ctp_phantom.to_physical(data.images)
    checked = 0
    for i in range(len(data)):
        m = data.masks[i]
        if (m == 3).sum() < 5 or (m == 2).sum() < 5:
            continue
        normal = _contralateral_normal(data, i)
        if normal.sum() < 50:
            continue
        checked += 1
        cbf_n, cbv_n = phys["cbf"][i][normal].mean(), phys["cbv"][i][normal].mean()
        assert phys["cbf"][i][m == 3].mean() < 0.3 * cbf_n
        assert phys["cbv"][i][m == 3].mean() < 0.8 * cbv_n
        assert phys["tmax"][i][m == 2].mean() > 6.0
        assert phys["cbv"][i][m == 2].mean() >= 0.9 * cbv_n
        assert phys["tmax"][i][normal].mean() < 2.5
    assert checked >= 3


@pytest.mark.backend
def test_noise_free_maps_follow_the_thresholds_pixel_by_pixel(clean):
    phys = ctp_phantom.to_physical(clean.images)
    m = clean.masks
    assert phys["tmax"][(m == 2) | (m == 3)].min() > 6.0
    assert phys["tmax"][m == 1].max() <= 2.0
    assert (phys["cbf"][m == 0] == 0).all() and (phys["tmax"][m == 0] == 0).all()
    # Tmax > 6 s recovers the hypoperfused region exactly on clean maps.
    rule = pf.threshold_segmentation(clean)
    np.testing.assert_array_equal(rule >= 2, m >= 2)
    np.testing.assert_array_equal(rule > 0, m > 0)


@pytest.mark.backend
def test_groups_nihss_and_determinism(volumes, ctp):
    again = ctp_phantom.synthesize_perfusion(volumes, ctp_phantom.PerfusionConfig(), seed=0, progress=False)
    np.testing.assert_array_equal(again.images, ctp.images)
    other = ctp_phantom.synthesize_perfusion(volumes, ctp_phantom.PerfusionConfig(), seed=1, progress=False)
    assert not np.array_equal(other.images, ctp.images)
    table = pf.patient_table(ctp)
    for v in volumes:
        row = table.loc[v.patient_id]
        assert row["occlusion"] == ("LVO" if v.territory == "MCA" else "other")
        assert 0 <= row["nihss"] <= 42 and row["nihss"] == round(row["nihss"])
    cfg = ctp_phantom.PerfusionConfig(nihss_sd=0.0, nihss_base=1.0, nihss_per_core_ml=0.5,
                             nihss_per_penumbra_ml=0.25)
    exact = pf.patient_table(ctp_phantom.synthesize_perfusion(volumes[:1], cfg, seed=0, progress=False))
    row = exact.iloc[0]
    assert row["nihss"] == round(1.0 + 0.5 * row["core_ml"] + 0.25 * row["penumbra_ml"])


@pytest.mark.backend
def test_synthesis_from_an_hu_slice_dataset():
    from strokekit.phantom import generate_phantom

    slices = generate_phantom(dataclasses.replace(PHANTOM, n_patients=2, multiclass=True), progress=False)
    data = ctp_phantom.synthesize_perfusion(slices, seed=0, progress=False)
    assert data.case_ids == slices.case_ids and data.images.shape == slices.images.shape + (5,)
    core = data.masks == 3
    assert core.any() and not (core & (slices.masks != 2)).any()
    territory = {p: t for p, t in zip(slices.patient_ids, slices.extra["territory"]) if t != "none"}
    for pid, group in zip(data.patient_ids, data.extra["occlusion"]):
        assert group == ("LVO" if territory[pid] == "MCA" else "other")
    with pytest.raises(DataError, match="needs slices in HU"):
        ctp_phantom.synthesize_perfusion(slices.replace(unit="display"), progress=False)


@pytest.mark.backend
def test_lvo_has_wider_penumbra_than_other(volumes):
    wide = ctp_phantom.PerfusionConfig(lvo_margin_mm=(20.0, 20.0), other_margin_mm=(20.0, 20.0), noise=0)
    narrow = ctp_phantom.PerfusionConfig(lvo_margin_mm=(5.0, 5.0), other_margin_mm=(5.0, 5.0), noise=0)
    a = ctp_phantom.synthesize_perfusion(volumes[:1], wide, progress=False)
    b = ctp_phantom.synthesize_perfusion(volumes[:1], narrow, progress=False)
    assert (a.masks == 2).sum() > 1.5 * (b.masks == 2).sum()


@pytest.mark.backend
def test_bad_inputs_are_rejected(volumes):
    hem = make_volume(0, dataclasses.replace(PHANTOM, lesion_types=("hemorrhagic",)))
    with pytest.raises(DataError, match="P01 has a hemorrhagic lesion"):
        ctp_phantom.synthesize_perfusion(hem, progress=False)
    with pytest.raises(ValueError, match="Received: str"):
        ctp_phantom.synthesize_perfusion("P01", progress=False)
    with pytest.raises(ValueError, match=r"core_cbf must be a range below 0\.3"):
        ctp_phantom.PerfusionConfig(core_cbf=(0.1, 0.4))
    with pytest.raises(ValueError, match=r"penumbra_tmax must be a range above 6 s"):
        ctp_phantom.PerfusionConfig(penumbra_tmax=(5.0, 9.0))


@pytest.mark.backend
def test_normalisation_round_trip():
    rng = np.random.default_rng(0)
    maps = {n: rng.uniform(lo, hi, (2, 4, 4)).astype(np.float32) for n, (lo, hi) in ctp_phantom.MAP_RANGES.items()}
    back = ctp_phantom.to_physical(ctp_phantom.normalize_maps(maps))
    for name in pf.MAP_NAMES:
        np.testing.assert_allclose(back[name], maps[name], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"lacks \['mip'\]"):
        ctp_phantom.normalize_maps({n: maps[n] for n in pf.MAP_NAMES[:-1]})


# --------------------------------------------------------------------------- losses
@pytest.mark.backend
def test_focal_tversky_with_gamma_one_is_tversky():
    rng = np.random.default_rng(0)
    y_true = (rng.random((2, 8, 8, 3)) > 0.6).astype("float32")
    y_pred = rng.random((2, 8, 8, 3)).astype("float32")
    for per_image in (False, True):
        ft = losses.focal_tversky_loss(alpha=0.6, beta=0.4, gamma=1.0, per_image=per_image)
        tv = losses.tversky_loss(alpha=0.6, beta=0.4, per_image=per_image)
        a = float(keras.ops.convert_to_numpy(ft(y_true, y_pred)))
        b = float(keras.ops.convert_to_numpy(tv(y_true, y_pred)))
        assert a == pytest.approx(b, rel=1e-6) and 0 < a < 1


@pytest.mark.backend
def test_weighted_focal_tversky_hand_value():
    rng = np.random.default_rng(1)
    y_true = (rng.random((2, 6, 6, 4)) > 0.5).astype("float32")
    y_pred = rng.random((2, 6, 6, 4)).astype("float32")
    alpha, beta, gamma, w = 0.7, 0.3, 0.75, np.array([0.2, 0.5, 1.5, 2.0])
    tp = (y_true * y_pred).sum(axis=(0, 1, 2))
    fn = (y_true * (1 - y_pred)).sum(axis=(0, 1, 2))
    fp = ((1 - y_true) * y_pred).sum(axis=(0, 1, 2))
    ti = (tp + 1.0) / (tp + alpha * fn + beta * fp + 1.0)
    expected = float(((1 - ti) ** gamma * w).sum() / w.sum())
    loss = pf.weighted_focal_tversky_loss(w, alpha, beta, gamma)
    got = float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))
    assert got == pytest.approx(expected, rel=1e-5)
    plain = float(keras.ops.convert_to_numpy(losses.focal_tversky_loss(alpha, beta, gamma)(y_true, y_pred)))
    even = float(keras.ops.convert_to_numpy(pf.weighted_focal_tversky_loss([1, 1, 1, 1])(y_true, y_pred)))
    assert even == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="4 class weights for 3 output channels"):
        pf.weighted_focal_tversky_loss([1, 1, 1, 1])(y_true[..., :3], y_pred[..., :3])


# --------------------------------------------------------------------------- model side
def _tiny_data(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    masks = rng.integers(0, 4, size=(n, size, size)).astype(np.uint8)
    return SliceDataset(
        images=rng.random((n, size, size, 5)).astype(np.float32), masks=masks,
        case_ids=[f"P{i}_s00" for i in range(n)], patient_ids=[f"P{i}" for i in range(n)],
        unit="display", class_names=pf.CLASS_NAMES,
        extra={"nihss": np.arange(n, dtype=np.float32) * 10.0,
               "occlusion": np.array(["LVO", "other"] * n)[:n]},
    )


@pytest.mark.backend
def test_loader_yields_named_inputs_with_matching_clinical_rows():
    data = _tiny_data(n=5)
    clinical = np.arange(5, dtype=np.float32)
    loader = pf.MultiInputLoader(data.images, data.masks, clinical=clinical, batch_size=2,
                                 shuffle=True, seed=3)
    assert len(loader) == 3
    x, y = loader[0]
    assert sorted(x) == sorted([*pf.MAP_NAMES, "clinical"])
    picks = loader.batch_indices(0)
    for k, name in enumerate(pf.MAP_NAMES):
        np.testing.assert_array_equal(x[name][..., 0], data.images[picks][..., k])
    np.testing.assert_array_equal(x["clinical"][:, 0], clinical[picks])
    assert y.shape == (2, 32, 32, 4) and (y.sum(-1) == 1).all()
    with pytest.raises(ValueError, match=r"one channel per input name"):
        pf.MultiInputLoader(data.images[..., :4], data.masks)
    with pytest.raises(ValueError, match=r"clinical must be \(N,\) or \(N, F\) with N = 5"):
        pf.MultiInputLoader(data.images, data.masks, clinical=np.ones(3))


@pytest.mark.backend
def test_multi_input_model_builds_with_and_without_clinical():
    for use_clinical in (False, True):
        cfg = pf.PerfusionTrainConfig(filters=(4, 8), use_clinical=use_clinical)
        model = pf.build_perfusion_model(cfg, image_size=32)
        names = sorted(t.name.split(":")[0] for t in model.inputs)
        assert names == sorted([*pf.MAP_NAMES] + (["clinical"] if use_clinical else []))
        assert model.output_shape == (None, 32, 32, 4)
        assert ("bottleneck_clinical_concat" in [layer.name for layer in model.layers]) == use_clinical


@pytest.mark.backend
def test_multi_input_model_trains_one_step_from_the_loader():
    use_clinical = True
    cfg = pf.PerfusionTrainConfig(filters=(4, 8), use_clinical=use_clinical, batch_size=2)
    model = pf.build_perfusion_model(cfg, image_size=32)
    data = _tiny_data()
    engine.compile_model(model, *pf.loss_and_metrics(cfg), 1e-2)
    loader = pf.loader_for(data, cfg, training=True)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    logs = model.train_on_batch(*loader[0], return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 < logs["loss"] < 1.0
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    pred = pf.predict_labels(model, data, use_clinical=use_clinical)
    assert pred.shape == (4, 32, 32) and pred.max() <= 3


@pytest.mark.backend
def test_frozen_schedule_keeps_the_encoder_and_trains_the_decoder(tmp_path):
    data = _tiny_data(n=4)
    cfg = pf.PerfusionTrainConfig(filters=(4, 8), use_clinical=False, batch_size=2, num_epochs=1,
                                  learning_rate=1e-2)
    model = pf.build_perfusion_model(cfg, image_size=32)
    enc = [keras.ops.convert_to_numpy(w).copy() for w in model.get_layer("enc1_conv1").weights]
    dec = [keras.ops.convert_to_numpy(w).copy() for w in model.get_layer("head").weights]
    run = pf.train_perfusion(model, data.subset([0, 1, 2]), data.subset([3]), cfg, "frozen",
                             run_dir=tmp_path / "run")
    for a, b in zip(enc, model.get_layer("enc1_conv1").weights):
        np.testing.assert_array_equal(a, keras.ops.convert_to_numpy(b))
    assert any(not np.allclose(a, keras.ops.convert_to_numpy(b))
               for a, b in zip(dec, model.get_layer("head").weights))
    assert list(run.history["trainable_blocks"]) == [""] and run.schedule == "frozen"
    assert {"loss", "val_loss", "val_dice_core", "val_dice_penumbra"} <= set(run.history.columns)
    assert (tmp_path / "run" / "history.csv").is_file() and (tmp_path / "run" / "model.keras").is_file()
    assert all(layer.trainable for layer in model.layers)  # flags restored after training


@pytest.mark.backend
def test_gradual_training_interrupted_at_a_phase_switch_resumes_to_the_same_run(tmp_path):
    data = _tiny_data(n=6)
    cfg = pf.PerfusionTrainConfig(filters=(4, 8), batch_size=2, num_epochs=3, learning_rate=1e-2,
                                  augment=AugmentConfig(rotation=15.0, shift=0.1))
    train, val = data.subset([0, 1, 2, 3]), data.subset([4, 5])
    model = pf.build_perfusion_model(cfg, image_size=32)
    whole = pf.train_perfusion(pf.copy_model(model), train, val, cfg, "gradual", run_dir=tmp_path / "whole")

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # the first epoch of phase 1, which trains other blocks
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pf.train_perfusion(pf.copy_model(model), train, val, cfg, "gradual", run_dir=tmp_path / "cut",
                           callbacks=[Interrupt()])
    assert (tmp_path / "cut" / "checkpoint.keras").is_file()
    resumed = pf.train_perfusion(pf.copy_model(model), train, val, cfg, "gradual", run_dir=tmp_path / "cut",
                                 resume=True)
    assert list(resumed.history["trainable_blocks"]) == list(whole.history["trainable_blocks"])
    columns = ["loss", "val_loss", "val_dice_core", "learning_rate", "trainable_params"]
    np.testing.assert_allclose(resumed.history[columns].to_numpy(), whole.history[columns].to_numpy(), atol=1e-5)
    assert resumed.best_epoch == whole.best_epoch
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not (tmp_path / "cut" / "checkpoint.keras").exists()
    with pytest.raises(ValueError, match="resume=True continues the run in run_dir: name the folder"):
        pf.train_perfusion(pf.copy_model(model), train, val, cfg, "gradual", resume=True)


@pytest.mark.backend
def test_schedules_come_from_notebook_05():
    from strokekit.transfer import SCRATCH

    cfg = pf.PerfusionTrainConfig(lr_scale=0.5, unfreeze_every=2)
    assert pf.make_schedule("scratch", cfg) == SCRATCH
    gradual = pf.make_schedule("gradual", cfg)
    assert (gradual.mode, gradual.unfreeze_every, gradual.lr_scale) == ("gradual", 2, 0.5)
    phases = gradual.phases(["enc1", "enc2", "bottleneck"], 6)
    assert [p.blocks for p in phases] == [(), ("bottleneck",), ("enc2", "bottleneck")]
    with pytest.raises(ValueError, match=r"Expected one of \['scratch', 'frozen', 'unfrozen', 'gradual'\]"):
        pf.make_schedule("warm", cfg)
    with pytest.raises(ValueError, match=r"lr_scale must be in \(0, 1\]"):
        pf.PerfusionTrainConfig(lr_scale=2.0)


@pytest.mark.backend
def test_group_scores_and_schedule_table():
    data = _tiny_data(n=2, size=4)
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[:, :2, :2] = 3  # 4 core pixels per slice
    truth[:, 2:, :] = 2  # 8 penumbra pixels per slice
    data = data.replace(masks=truth)
    pred = truth.copy()
    pred[0, 0, 0] = 1  # slice 0 (LVO): one core pixel missed
    pred[1, 3, :] = 1  # slice 1 (other): four penumbra pixels missed
    scores = pf.group_scores(data, pred)
    lvo = scores.set_index("group").loc["LVO"]
    other = scores.set_index("group").loc["other"]
    assert lvo["core_f1"] == pytest.approx(6 / 7) and lvo["penumbra_f1"] == 1.0
    assert other["core_f1"] == 1.0 and other["penumbra_f1"] == pytest.approx(8 / 12)
    runs = pd.concat([scores.assign(schedule="frozen", seed=0),
                      scores.assign(schedule="frozen", seed=1,
                                    core_f1=scores["core_f1"] - 0.1)])
    table = pf.schedule_table(runs)
    row = table.loc[("frozen", "LVO")]
    assert row["core_mean"] == pytest.approx(6 / 7 - 0.05) and row["seeds"] == 2
    assert row["Core F1"] == f"{6 / 7 - 0.05:.3f} ± {np.std([6 / 7, 6 / 7 - 0.1], ddof=1):.3f}"
