"""strokekit.transfer: freezing, fine-tuning schedules, pretraining, few-shot learning curves."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from strokekit import io, models, phantom, transfer
from strokekit.augment import NO_AUGMENT, STUDY_AUGMENT
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.train import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_data(n=8, size=32, seed=0, prefix=""):
    """Bright squares on noise; two slices per patient (ids ``{prefix}c0``…, ``{prefix}p0``…)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(30.0, 8.0, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        r, c = 4 + 2 * (i % 4), 6 + (i % 3) * 3
        masks[i, r:r + 10, c:c + 10] = 1
    images[masks > 0] += 45.0
    return SliceDataset(images, masks, [f"{prefix}c{i}" for i in range(n)],
                        [f"{prefix}p{i // 2}" for i in range(n)])


# Two levels and no batch norm keep each compile (a traced training step) short; the
# freezing test adds batch norm, the selection test a third level.
CONFIG = TrainConfig(
    filters=(4, 8), image_size=32, num_epochs=1, batch_size=4, batch_norm=False,
    augment=NO_AUGMENT, workers=1, early_stopping_patience=0, reduce_lr_patience=0,
    learning_rate=1e-2, loss="bce_dice",
)


def tiny_model(seed=0, **changes):
    return models.build_model("unet", seed=seed, **dataclasses.replace(CONFIG, **changes).model_kwargs())


def values(model, name):
    import keras

    return [keras.ops.convert_to_numpy(v).copy() for v in model.get_layer(name).variables]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- selection (no training)


@pytest.mark.backend
def test_freeze_and_unfreeze_select_by_name_prefix_glob_and_block():
    model = tiny_model(batch_norm=True)
    assert [b for b, _ in models.encoder_blocks(model)] == ["enc1", "bottleneck"]
    frozen = transfer.freeze(model, "enc1")
    assert frozen == ["enc1_conv1", "enc1_bn1", "enc1_act1", "enc1_conv2", "enc1_bn2", "enc1_act2",
                      "enc1_pool"]
    assert transfer.trainable_blocks(model) == ("bottleneck",)
    assert not transfer._matches("enc10_conv1", "enc1") and transfer._matches("enc1_pool", "enc1_")
    assert transfer.freeze(model, "dec*")[:2] == ["dec1_up", "dec1_concat"]
    assert not model.get_layer("dec1_conv2").trainable and model.get_layer("head").trainable
    # No arguments: the whole encoder.
    assert transfer.freeze(model) == transfer.encoder_layers(model)
    assert transfer.trainable_blocks(model) == ()
    opened = transfer.unfreeze(model, blocks=["bottleneck"], keep_batchnorm_frozen=True)
    assert "bottleneck_conv1" in opened and "bottleneck_bn1" not in opened
    assert not model.get_layer("bottleneck_bn1").trainable
    assert transfer.trainable_blocks(model) == ("bottleneck",)
    with pytest.raises(ValueError, match=r"Expected one of \['enc1', 'bottleneck'\]\. "
                                         r"Received: block='enc9'"):
        transfer.freeze(model, blocks="enc9")
    with pytest.raises(ValueError, match="no layer of model 'unet' matches 'decoder'"):
        transfer.freeze(model, "decoder")
    # A frozen model can still be unfrozen part by part.
    model.trainable = False
    assert transfer.unfreeze(model, "head") == ["head"]
    assert model.trainable and not model.get_layer("enc1_conv1").trainable


@pytest.mark.backend
def test_schedule_phases_follow_the_stated_order_and_epochs():
    blocks = ("enc1", "enc2", "bottleneck")
    phases = transfer.FineTuneSchedule("gradual", unfreeze_every=2, lr_scale=0.1).phases(blocks, 7)
    assert [(p.start_epoch, p.end_epoch, p.blocks, p.lr_factor) for p in phases] == [
        (0, 2, (), 1.0),
        (2, 4, ("bottleneck",), 0.1),
        (4, 6, ("enc2", "bottleneck"), 0.1),
        (6, 7, ("enc1", "enc2", "bottleneck"), 0.1),
    ]
    # Too few epochs: the shallow blocks are never reached.
    short = transfer.FineTuneSchedule("gradual", unfreeze_every=3).phases(blocks, 5)
    assert [(p.start_epoch, p.end_epoch, p.blocks) for p in short] == [(0, 3, ()), (3, 5, ("bottleneck",))]
    assert transfer.FineTuneSchedule("frozen").phases(blocks, 4)[0].blocks == ()
    unfrozen = transfer.FineTuneSchedule("unfrozen", lr_scale=0.01).phases(blocks, 4)
    assert len(unfrozen) == 1 and unfrozen[0].blocks == blocks and unfrozen[0].lr_factor == 0.01
    with pytest.raises(ValueError, match=r"Expected one of \['frozen', 'unfrozen', 'gradual'\]"):
        transfer.FineTuneSchedule("thawed")
    with pytest.raises(ValueError, match="unfreeze_every must be an int >= 1"):
        transfer.FineTuneSchedule("gradual", unfreeze_every=0)
    with pytest.raises(ValueError, match=r"lr_scale must be in \(0, 1\]"):
        transfer.FineTuneSchedule(lr_scale=2.0)
    with pytest.raises(ValueError, match="needs encoder blocks"):
        transfer.FineTuneSchedule("frozen").phases((), 3)


# --------------------------------------------------------------------------- training


@pytest.mark.backend
def test_frozen_layers_and_their_batchnorm_statistics_do_not_move():
    data = tiny_data()
    model = tiny_model(batch_norm=True)
    config = dataclasses.replace(CONFIG, batch_norm=True)
    transfer.freeze(model, blocks="enc1")
    transfer.recompile(model, config)
    names = ("enc1_conv1", "enc1_bn1", "enc1_bn2", "bottleneck_conv1", "bottleneck_bn1", "head")
    before = {n: values(model, n) for n in names}
    x = np.clip(data.images[:4] / 80.0, 0, 1)[..., None]
    y = data.masks[:4, ..., None].astype(np.float32)
    model.train_on_batch(x, y)
    after = {n: values(model, n) for n in names}
    for frozen in ("enc1_conv1", "enc1_bn1", "enc1_bn2"):
        assert same(before[frozen], after[frozen]), frozen  # kernel; gamma, beta, moving stats
    for trained in ("bottleneck_conv1", "head"):
        assert not np.array_equal(before[trained][0], after[trained][0]), trained
    # A trainable batch norm uses batch statistics: gamma and the moving mean both move.
    gamma, mean = 0, 2
    assert not np.array_equal(before["bottleneck_bn1"][gamma], after["bottleneck_bn1"][gamma])
    assert not np.array_equal(before["bottleneck_bn1"][mean], after["bottleneck_bn1"][mean])

    # Same flags again: the compiled step is kept and only the optimizer is reset.
    optimizer = model.optimizer
    transfer.recompile(model, config, learning_rate=1e-4)
    assert model.optimizer is optimizer
    assert int(np.asarray(optimizer.iterations)) == 0
    assert np.isclose(float(np.asarray(optimizer.learning_rate)), 1e-4)
    # Other flags: a real compile, with a new optimizer.
    transfer.unfreeze(model, blocks="enc1")
    transfer.recompile(model, config)
    assert model.optimizer is not optimizer
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        transfer.recompile(model, config, learning_rate=0.0)


@pytest.mark.backend
def test_batchnorm_momentum_sets_how_fast_moving_statistics_follow_the_batch():
    import keras

    model = tiny_model(batch_norm=True)
    changed = models.set_batchnorm_momentum(model, 0.75)
    assert changed == [layer.name for layer in model.layers
                       if isinstance(layer, keras.layers.BatchNormalization)] and "enc1_bn1" in changed
    assert keras.models.clone_model(model).get_layer("enc1_bn1").momentum == 0.75  # kept in the config
    # One training-mode batch moves the moving mean a quarter of the way to the batch mean.
    inputs = keras.Input((3,))
    small = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
    assert models.set_batchnorm_momentum(small, 0.75) == ["bn"]
    x = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]], np.float32)
    small(x, training=True)
    moving = keras.ops.convert_to_numpy(small.get_layer("bn").moving_mean)
    assert np.allclose(moving, [0.5, 1.0, 1.5])  # 0.75 * 0 + (1 - 0.75) * [2, 4, 6]
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        models.set_batchnorm_momentum(model, 1.0)


@pytest.mark.backend
def test_gradual_unfreezing_opens_blocks_deepest_first_at_the_stated_epochs():
    import keras

    class Snapshots(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_epoch_end(self, epoch, logs=None):
            self.seen.append({n: values(self.model, n)[0] for n in ("enc1_conv1", "bottleneck_conv1")})

    data = tiny_data()
    model = tiny_model()
    start = {n: values(model, n)[0] for n in ("enc1_conv1", "bottleneck_conv1")}
    config = dataclasses.replace(CONFIG, num_epochs=3)
    schedule = transfer.FineTuneSchedule("gradual", unfreeze_every=1, lr_scale=0.1)
    snapshots = Snapshots()
    result = transfer.fine_tune(model, config, data, data, schedule, run_dir=False, progress=False,
                                restore_best=False, callbacks=[snapshots])
    history = result.history
    assert list(history["epoch"]) == [1, 2, 3]
    assert list(history["trainable_blocks"]) == [(), ("bottleneck",), ("enc1", "bottleneck")]
    assert np.allclose(history["learning_rate"], [1e-2, 1e-3, 1e-3])
    params = list(history["trainable_params"])
    assert params[0] < params[1] < params[2]
    # The weights agree: the bottleneck first moves in epoch 2, enc1 in epoch 3.
    e1, e2, e3 = snapshots.seen
    assert np.array_equal(e1["bottleneck_conv1"], start["bottleneck_conv1"])
    assert not np.array_equal(e2["bottleneck_conv1"], e1["bottleneck_conv1"])
    assert np.array_equal(e2["enc1_conv1"], start["enc1_conv1"])
    assert not np.array_equal(e3["enc1_conv1"], e2["enc1_conv1"])
    # The model returned holds the last phase's weights and flags.
    assert np.array_equal(values(result.model, "enc1_conv1")[0], e3["enc1_conv1"])
    assert transfer.trainable_blocks(result.model) == ("enc1", "bottleneck")
    assert np.isfinite(history["loss"]).all() and 0.0 <= result.metrics["dice"] <= 1.0


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny U-Net pretrained for one epoch, saved as .keras."""
    folder = tmp_path_factory.mktemp("pretrain")
    data = tiny_data(seed=1)
    return transfer.pretrain_on_source(CONFIG, data, data, run_dir=folder, progress=False)


VAL = tiny_data(seed=2, prefix="v")  # validation slices with their own case and patient ids


@pytest.fixture(scope="module")
def fine_tuned(pretrained, tmp_path_factory):
    """The run learning_curve does for (transfer, all shots, seed 0), done by hand."""
    model = transfer.load_pretrained(pretrained)
    loaded = values(model, "enc1_conv1")
    data = tiny_data()
    folder = tmp_path_factory.mktemp("finetune") / "run"
    result = transfer.fine_tune(model, CONFIG, transfer.few_shot_subset(data, "all", 0), VAL,
                                transfer.FineTuneSchedule("unfrozen", lr_scale=0.5), run_dir=folder,
                                progress=False)
    return loaded, result


@pytest.mark.backend
def test_saved_pretrained_model_reloads_in_safe_mode_and_fine_tunes(pretrained, fine_tuned, tmp_path):
    import keras

    assert pretrained.name == "model.keras" and pretrained.is_file()
    assert (pretrained.parent / "history.csv").is_file()
    reloaded = transfer.load_pretrained(pretrained.parent)  # a run folder works too
    assert not reloaded.compiled  # loaded uncompiled: fine-tuning compiles afresh
    with pytest.raises(DataError, match="no saved model here"):
        transfer.load_pretrained(pretrained.parent / "elsewhere")
    # Safe mode: a saved model that would run arbitrary Python code (a Lambda) is refused.
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2.0)(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        transfer.load_pretrained(tmp_path / "unsafe.keras")
    loaded, result = fine_tuned
    assert same(loaded, values(reloaded, "enc1_conv1"))
    assert np.isfinite(result.history["loss"]).all()
    assert not np.array_equal(loaded[0], values(result.model, "enc1_conv1")[0])
    assert result.history["trainable_blocks"].iloc[0] == ("enc1", "bottleneck")
    assert np.isclose(result.history["learning_rate"].iloc[0], CONFIG.learning_rate * 0.5)


@pytest.mark.backend
def test_fine_tuning_writes_a_run_folder_with_the_split_it_used(fine_tuned):
    from strokekit.split import Split
    from strokekit.train import load_run

    _, result = fine_tuned
    run = load_run(result.run_dir)  # notebook 04's reader understands the folder
    assert sorted(p.name for p in result.run_dir.iterdir()) == [
        "config.json", "history.csv", "metrics.json", "model.keras", "schedule.json", "split.json"]
    assert run["config"] == CONFIG
    assert list(run["history"]["epoch"]) == [1] and run["history"]["trainable_blocks"][0] == "enc1+bottleneck"
    assert run["metrics"]["dice"] == pytest.approx(result.metrics["dice"])
    split = Split.load(run["split_path"])
    assert split.cases("train") == transfer.few_shot_subset(tiny_data(), "all", 0).case_ids
    assert split.cases("val") == VAL.case_ids and split.cases("test") == []
    assert split.method == "fine-tune" and split.seed == CONFIG.seed
    assert split.patient_ids[:2] == [tiny_data().patient_ids[tiny_data().case_ids.index(c)]
                                     for c in split.case_ids[:2]]
    # The folder holds the fine-tuned weights.
    saved = transfer.load_pretrained(result.run_dir)
    assert same(values(saved, "enc1_conv1"), values(result.model, "enc1_conv1"))


@pytest.mark.backend
def test_gradual_fine_tuning_interrupted_at_a_phase_switch_resumes_to_the_same_run(tmp_path):
    import keras

    data = tiny_data()
    config = dataclasses.replace(CONFIG, num_epochs=3, augment=STUDY_AUGMENT)
    schedule = transfer.FineTuneSchedule("gradual", unfreeze_every=1, lr_scale=0.1)
    whole = transfer.fine_tune(tiny_model(), config, data, VAL, schedule, run_dir=tmp_path / "whole", progress=False)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # the first epoch of phase 1, which trains in another compiled copy
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transfer.fine_tune(tiny_model(), config, data, VAL, schedule, run_dir=tmp_path / "cut", progress=False,
                           callbacks=[Interrupt()])
    resumed = transfer.fine_tune(tiny_model(), config, data, VAL, schedule, run_dir=tmp_path / "cut",
                                 progress=False, resume=True)
    assert list(resumed.history["trainable_blocks"]) == list(whole.history["trainable_blocks"])
    columns = ["loss", "dice", "val_loss", "learning_rate", "trainable_params"]
    np.testing.assert_allclose(resumed.history[columns].to_numpy(), whole.history[columns].to_numpy(), atol=1e-5)
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"]
    for a, b in zip(values(resumed.model, "enc1_conv1"), values(whole.model, "enc1_conv1")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not (tmp_path / "cut" / "checkpoint.keras").exists()


@pytest.mark.backend
def test_fine_tuning_refuses_to_record_a_split_it_did_not_use(tmp_path):
    data, model = tiny_data(), tiny_model()
    with pytest.raises(ValueError, match=r"share 8 case id\(s\), e\.g\. \['c0', 'c1', 'c2'\]"):
        transfer.fine_tune(model, CONFIG, data, data, run_dir=tmp_path / "leaky", progress=False)
    other = transfer.used_split(transfer.few_shot_subset(data, 4, 0), VAL)
    with pytest.raises(ValueError, match=r"the split's 'train' cases \(4\) are not the 8 slices the run trains on"):
        transfer.fine_tune(model, CONFIG, data, VAL, split=other, run_dir=tmp_path / "other", progress=False)
    assert not (tmp_path / "leaky").exists() and not (tmp_path / "other").exists()  # checked before training


@pytest.mark.backend
def test_learning_curve_has_one_row_per_method_shots_and_seed(pretrained, fine_tuned, tmp_path):
    from strokekit.split import Split

    data = tiny_data()
    table = transfer.learning_curve(
        CONFIG, data, VAL, shots=(4, "all"), seeds=(0, 1),
        methods={"scratch": None, "transfer": pretrained},
        schedule=transfer.FineTuneSchedule("unfrozen", lr_scale=0.5), run_root=tmp_path, progress=False,
    )
    assert list(table.columns[:9]) == list(transfer.CURVE_COLUMNS)
    assert len(table) == 2 * 2 * 2
    assert sorted(zip(table.method, table.shots, table.seed)) == sorted(
        (m, k, s) for m in ("scratch", "transfer") for k in (4, 8) for s in (0, 1))
    assert set(table.loc[table.shots == 4, "patients"]) == {2}  # four slices = two whole patients
    assert table["dice"].between(0, 1).all() and (table["epochs"] == 1).all()
    # Reusing one compiled model per method gives the result of a fresh model.
    row = table[(table.method == "transfer") & (table.shots == 8) & (table.seed == 0)].iloc[0]
    assert row["dice"] == pytest.approx(fine_tuned[1].metrics["dice"], abs=1e-5)
    # Every run's folder records the slices it drew.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{m}-k{k}-s{s}" for m in ("scratch", "transfer") for k in (4, 8) for s in (0, 1))
    drawn = Split.load(tmp_path / "scratch-k4-s1" / "split.json")
    assert drawn.cases("train") == transfer.few_shot_subset(data, 4, 1).case_ids
    assert drawn.params == {"shots": 4, "drawn_from": 8, "draw": "strokekit.transfer.few_shot_subset"}
    assert drawn.seed == 1
    with pytest.raises(ValueError, match=r"shots must be an int from 1 to 8"):
        transfer.learning_curve(CONFIG, data, VAL, shots=(9,), progress=False)


# --------------------------------------------------------------------------- data and plots


@pytest.mark.backend
def test_few_shot_subsets_are_seeded_nested_and_take_whole_patients_first():
    data = tiny_data(n=10)
    five = transfer.few_shot_subset(data, 5, seed=3)
    assert five.case_ids == transfer.few_shot_subset(data, 5, seed=3).case_ids
    assert five.case_ids == transfer.few_shot_subset(data, 9, seed=3).case_ids[:5]
    counts = sorted(np.unique(five.patient_ids, return_counts=True)[1])
    assert counts == [1, 2, 2]  # two whole patients and one slice of a third
    assert len(transfer.few_shot_subset(data, "all", 0)) == 10
    assert transfer.few_shot_subset(data, 5, seed=4).case_ids != five.case_ids
    with pytest.raises(ValueError, match=r"shots must be an int from 1 to 10 .*Received: shots=0"):
        transfer.few_shot_subset(data, 0, 0)


def test_phantom_source_shares_no_patient_with_the_target():
    from strokekit.phantom import PhantomConfig, generate_phantom

    target_config = PhantomConfig(n_patients=2, slices_per_patient=2, image_size=32, seed=0,
                                  lesion_types=("ischemic",))
    target = generate_phantom(target_config, progress=False)
    source = phantom.phantom_source(n_patients=3, slices_per_patient=2, empty_slices_per_patient=1,
                                     seed=7, target=target_config, progress=False)
    assert source.patients() == ["S01", "S02", "S03"]
    assert not set(source.patients()) & set(target.patients())
    assert not set(source.case_ids) & set(target.case_ids)
    assert source.case_ids[0].startswith("S01_s")
    assert set(source.extra["lesion_type"]) == {"hemorrhagic", "none"}
    assert len(source) == 3 * 3 and source.image_shape == (32, 32)
    # Different seed, different heads: no source slice equals a target slice.
    assert not any(np.array_equal(a, b) for a in source.images for b in target.images)
    with pytest.raises(ValueError, match="another seed than the target"):
        phantom.phantom_source(n_patients=2, seed=0, target=target_config)
    with pytest.raises(ValueError, match="prefix must be letters other than 'P'"):
        phantom.phantom_source(n_patients=2, prefix="P")


def test_imagenet_unet_reports_the_offline_fallback_once(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache: no weights anywhere
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = models.imagenet_unet("vgg16", input_shape=(32, 32, 1), seed=0)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "random weights" in messages[0]
    assert report.weights_found is False and report.weights_path is None
    assert report.message == messages[0]
    assert model.output_shape == (None, 32, 32, 1)
    assert next(b for b, _ in models.encoder_blocks(model)) == "block1"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = models.imagenet_unet("vgg16", input_shape=(32, 32, 1), weights=None)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
    assert "as asked" in report.message


def test_summary_and_plot_show_mean_and_sd_per_method():
    import pandas as pd
    from matplotlib.figure import Figure

    table = pd.DataFrame({
        "method": ["scratch"] * 4 + ["transfer"] * 4,
        "shots": [2, 2, 8, 8] * 2,
        "seed": [0, 1] * 4,
        "dice": [0.1, 0.3, 0.5, 0.7, 0.4, 0.4, 0.6, 0.8],
    })
    summary = transfer.summarize_curve(table)
    row = summary[(summary.method == "scratch") & (summary.shots == 2)].iloc[0]
    assert row["mean"] == pytest.approx(0.2) and row["sd"] == pytest.approx(np.sqrt(0.02))
    assert summary.loc[(summary.method == "transfer") & (summary.shots == 2), "sd"].item() == 0.0
    fig = transfer.plot_learning_curve(table)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"scratch (mean ± sd)", "transfer (mean ± sd)"}
    assert np.allclose(lines["transfer (mean ± sd)"].get_ydata(), [0.4, 0.7])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.2 - np.sqrt(0.02)) and band.max() == pytest.approx(0.6 + np.sqrt(0.02))
    bars = ax.collections[1].get_segments()  # scratch's error bars: mean ± sd at 2 and 8 shots
    assert np.allclose(bars[0][:, 1], [0.2 - np.sqrt(0.02), 0.2 + np.sqrt(0.02)])
    with pytest.raises(ValueError, match="Expected one of"):
        transfer.summarize_curve(table, metric="auc")


def test_transfer_effect_pairs_seeds_and_only_claims_consistent_gains():
    import pandas as pd

    rows = []
    for shots, scratch, transfer_ in [(2, (0.10, 0.20, 0.30), (0.20, 0.30, 0.40)),   # +0.1 every seed
                                      (4, (0.50, 0.50, 0.50), (0.60, 0.45, 0.55)),   # mixed
                                      (8, (0.60, 0.70, 0.80), (0.59, 0.69, 0.79))]:  # -0.01: too small
        for seed in range(3):
            rows.append({"method": "scratch", "shots": shots, "seed": seed, "dice": scratch[seed]})
            rows.append({"method": "transfer", "shots": shots, "seed": seed, "dice": transfer_[seed]})
    effect = transfer.transfer_effect(pd.DataFrame(rows), "transfer")
    assert list(effect["shots"]) == [2, 4, 8]
    assert list(effect["verdict"]) == ["helped", "no clear difference", "no clear difference"]
    assert effect["mean_difference"].tolist() == pytest.approx([0.1, 0.1 / 3, -0.01])
    assert effect["sd_difference"].iloc[0] == pytest.approx(0.0, abs=1e-12)
    assert list(effect["improved_seeds"]) == [3, 2, 0]
    hurt = transfer.transfer_effect(pd.DataFrame(rows), "scratch", baseline="transfer")
    assert hurt["verdict"].iloc[0] == "hurt"
    one = transfer.transfer_effect(pd.DataFrame([r for r in rows if r["seed"] == 0]), "transfer")
    assert set(one["verdict"]) == {"one seed: cannot tell"}
    with pytest.raises(ValueError, match=r"Expected one of \['scratch', 'transfer'\]"):
        transfer.transfer_effect(pd.DataFrame(rows), "imagenet")


def test_transfer_effect_gives_no_verdict_where_neither_network_learned():
    import pandas as pd

    rows = []
    # 2 shots: both below LEARNED_DICE, scratch ahead in every seed; 8 shots: the same gap, both learned
    for shots, scratch, transfer_ in [(2, (0.035, 0.034), (0.0, 0.0)), (8, (0.535, 0.534), (0.5, 0.5))]:
        for seed in range(2):
            rows.append({"method": "scratch", "shots": shots, "seed": seed, "dice": scratch[seed]})
            rows.append({"method": "transfer", "shots": shots, "seed": seed, "dice": transfer_[seed]})
    effect = transfer.transfer_effect(pd.DataFrame(rows), "transfer")
    assert transfer.LEARNED_DICE == 0.1
    assert list(effect["verdict"]) == ["neither learned: cannot judge", "hurt"]
    assert effect["mean_difference"].iloc[0] == pytest.approx(-0.0345)   # the numbers are still reported
    # one side above the level is enough for a verdict; learned=0 turns the rule off
    rows[0]["dice"] = rows[2]["dice"] = 0.2
    assert transfer.transfer_effect(pd.DataFrame(rows), "transfer")["verdict"].iloc[0] == "hurt"
    rows[0]["dice"], rows[2]["dice"] = 0.035, 0.034
    assert transfer.transfer_effect(pd.DataFrame(rows), "transfer", learned=0.0)["verdict"].iloc[0] == "hurt"


@pytest.mark.backend
def test_training_batches_all_have_the_batch_size_and_cover_every_slice():
    from strokekit.augment import SegmentationLoader

    loader = transfer._full_batch_loader(SegmentationLoader)(
        np.zeros((10, 8, 8), np.float32), np.zeros((10, 8, 8), np.uint8), batch_size=4, seed=0, workers=1)
    assert len(loader) == 3
    picks = [loader.batch_indices(i) for i in range(3)]
    assert [len(p) for p in picks] == [4, 4, 4]
    assert set(np.concatenate(picks)) == set(range(10))
    assert list(picks[2][2:]) == list(picks[0][:2])  # filled up from the start of the order
    tiny = transfer._full_batch_loader(SegmentationLoader)(
        np.zeros((3, 8, 8), np.float32), np.zeros((3, 8, 8), np.uint8), batch_size=8, seed=0, workers=1)
    x, y = tiny[0]
    assert x.shape == (8, 8, 8, 1) and y.shape == (8, 8, 8, 1)


@pytest.mark.realdata
def test_ctich_loads_as_a_source_with_its_own_patients():
    from strokekit import paths

    if paths.ctich_dir() is None:
        pytest.skip("../shared/data/ct-ich is absent: the CT-ICH source cannot be read")
    source = io.load_source_dataset("ctich", image_size=32, lesion_only=True, progress=False)
    assert source.unit == "display" and source.image_shape == (32, 32)
    assert source.has_lesion().sum() > 0.9 * len(source)  # lesion_only (a few masks vanish at 32 px)
    assert not any(p.startswith(("P", "S")) for p in source.patients())  # no phantom id can clash
    with pytest.raises(ValueError, match=r"Expected one of \['ctich'\]. Received: name='tumour'"):
        io.load_source_dataset("tumour")
