"""Training on a config: run folders, determinism, reload, best-epoch weights, grids."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from strokekit import train
from strokekit.augment import NO_AUGMENT, STUDY_AUGMENT
from strokekit.dataset import SliceDataset

pytestmark = pytest.mark.backend


def blobs(n=12, size=32, seed=0):
    """Bright discs (the lesion) on a darker head-like background, in HU."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.full((n, size, size), 30.0, np.float32) + rng.normal(0, 2, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(3, 6)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i][disc] = 70.0
        masks[i][disc] = 1
    return SliceDataset(images, masks, [f"c{i}" for i in range(n)], [f"p{i // 2}" for i in range(n)])


CONFIG = train.TrainConfig(image_size=32, filters=(4, 8, 16), num_epochs=2, batch_size=4,
                           augment=NO_AUGMENT, early_stopping_patience=0, reduce_lr_patience=0,
                           preview_slices=2, workers=1)


def test_run_folder_holds_everything_and_reloads(tmp_path):
    data = blobs()
    result = train.train(CONFIG, data.subset(range(8)), data.subset(range(8, 12)), run_dir=tmp_path / "run",
                         progress=False)
    folder = result.run_dir
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "history.csv", "metrics.json",
                                                        "model.keras", "previews"]
    assert sorted(p.name for p in (folder / "previews").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    history = pd.read_csv(folder / "history.csv")
    assert len(history) == 2 and {"loss", "val_loss", "val_dice"} <= set(history.columns)
    run = train.load_run(folder)
    assert run["config"] == CONFIG
    assert set(json.loads((folder / "metrics.json").read_text())) >= {"dice", "iou", "sensitivity", "specificity",
                                                                      "seconds", "images_per_second"}
    x, _ = train.to_arrays(CONFIG, data)
    reloaded = train.load_model(folder)
    assert np.array_equal(np.asarray(reloaded.predict(x, verbose=0)), np.asarray(result.model.predict(x, verbose=0)))
    assert 0.0 <= result.metrics["dice"] <= 1.0 and result.metrics["epochs_run"] == 2


def test_same_seed_same_losses_and_other_seed_differs():
    data = blobs()
    config = dataclasses.replace(CONFIG, augment=STUDY_AUGMENT)
    a = train.train(config, data.subset(range(8)), data.subset(range(8, 12)), run_dir=False, progress=False)
    b = train.train(config, data.subset(range(8)), data.subset(range(8, 12)), run_dir=False, progress=False)
    c = train.train(dataclasses.replace(config, seed=1), data.subset(range(8)), data.subset(range(8, 12)),
                    run_dir=False, progress=False)
    assert a.history["loss"].tolist() == b.history["loss"].tolist()
    assert a.history["loss"].tolist() != c.history["loss"].tolist()


def test_best_epoch_weights_are_kept():
    data = blobs()
    config = dataclasses.replace(CONFIG, num_epochs=3, learning_rate=0.05)  # a rate that overshoots
    result = train.train(config, data.subset(range(8)), data.subset(range(8, 12)), run_dir=False, progress=False)
    x, y = train.to_arrays(config, data.subset(range(8, 12)))
    import keras

    loss = result.model.compute_loss(x=keras.ops.convert_to_tensor(x),
                                     y=keras.ops.convert_to_tensor(y[..., None].astype("float32")),
                                     y_pred=result.model(x))
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(result.history["val_loss"].min(), rel=1e-3)
    assert result.metrics["best_epoch"] == int(result.history["val_loss"].idxmin()) + 1


def test_config_dict_round_trip_and_unknown_field():
    data = {**json.loads(json.dumps(__import__("strokekit").config.to_dict(CONFIG)))}
    assert train.config_from_dict(data) == CONFIG
    with pytest.raises(ValueError, match=r"TrainConfig has no field\(s\) \['bogus'\]"):
        train.config_from_dict({**data, "bogus": 1})


def test_grid_rows_and_mean_sd_summary(tmp_path):
    data = blobs()
    base = dataclasses.replace(CONFIG, num_epochs=1)
    table = train.train_grid(base, [{"activation": "elu"}], [0, 1],
                             data.subset(range(8)), data.subset(range(8, 12)), root=tmp_path, progress=False)
    assert len(table) == 2 and table["seed"].tolist() == [0, 1]
    assert all((tmp_path / p).is_dir() for p in table["run_dir"])  # one folder per run under root
    summary = train.summarize(table, by=["activation"])
    assert summary["seeds"].tolist() == [2]
    elu = table["dice"]
    assert summary.loc[0, "dice"] == f"{elu.mean():.3f} ± {elu.std(ddof=1):.3f}"


def test_empty_training_set_is_refused():
    data = blobs()
    with pytest.raises(ValueError, match="must not be empty"):
        train.train(CONFIG, data.subset([]), data, run_dir=False, progress=False)


def test_compile_model_builds_the_optimizer_slots_before_fit():
    # built before fit, TensorFlow traces the training step once instead of twice
    from strokekit.models import build_model

    model = build_model("unet", **CONFIG.model_kwargs())
    train.compile_model(model, CONFIG)
    assert model.optimizer.built
    slots = {id(v) for v in model.optimizer.variables}
    assert len(model.optimizer.variables) >= 2 * len(model.trainable_variables)
    train.build_optimizer(model)                    # a second call changes nothing
    assert {id(v) for v in model.optimizer.variables} == slots


# ------------------------------------------------------------------ the quick profile's training levers
def test_cosine_schedule_falls_from_the_rate_to_a_hundredth():
    rates = [train.cosine_learning_rate(e, 10, 1e-2) for e in range(10)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert train.cosine_learning_rate(0, 1, 3e-3) == pytest.approx(3e-3)


def test_config_refuses_unknown_schedule_and_bad_repeats():
    with pytest.raises(ValueError, match="lr_schedule"):
        dataclasses.replace(CONFIG, lr_schedule="step")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="repeats"):
            dataclasses.replace(CONFIG, repeats=bad)


def test_repeat_arrays_tiles_every_sample():
    x, y = np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(3)
    rx, ry = train.repeat_arrays(x, y, 3)
    assert rx.shape == (9, 2) and ry.tolist() == [0, 1, 2] * 3
    assert train.repeat_arrays(x, y, 1)[0] is x


def test_cosine_repeats_bn_momentum_and_head_bias_reach_the_run():
    data = blobs()
    config = dataclasses.replace(CONFIG, batch_norm=True, bn_momentum=0.9, head_bias=-4.0, repeats=2,
                                 lr_schedule="cosine", learning_rate=1e-2, num_epochs=3)
    result = train.train(config, data.subset(range(8)), data.subset(range(8, 12)), run_dir=False, progress=False)
    rates = result.history["learning_rate"].to_numpy()
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-4) and rates[1] < rates[0]
    bns = [layer for layer in result.model.layers if "bn" in layer.name]
    assert bns and all(layer.momentum == pytest.approx(0.9) for layer in bns)
    # 8 slices x 2 passes per epoch: twice the images of a plain epoch
    assert result.images_per_second * result.seconds == pytest.approx(8 * 2 * 3, rel=1e-6)


def test_head_bias_starts_the_network_at_the_lesion_prior():
    from strokekit import models

    model = models.unet((32, 32, 1), filters=(4, 8), head_bias=-4.0, seed=0)
    assert np.allclose(model.get_layer("head").get_weights()[1], -4.0)
    prob = np.asarray(model(np.zeros((1, 32, 32, 1), np.float32), training=False))
    assert prob.mean() < 0.2          # ~sigmoid(-4) = 0.018 instead of 0.5
    softmax = models.resunet((32, 32, 1), num_classes=3, filters=(4, 8), head_bias=-4.0, seed=0)
    assert np.allclose(softmax.get_layer("head").get_weights()[1], [0.0, -4.0, -4.0])
    with pytest.raises(ValueError, match="bn_momentum"):
        models.unet((32, 32, 1), filters=(4, 8), batch_norm=True, bn_momentum=1.0)


def test_selu_unet_drops_batch_norm_and_profile_builds_its_config():
    from strokekit.config import get_profile

    kwargs = dataclasses.replace(CONFIG, batch_norm=True, activation="selu").model_kwargs()
    assert kwargs["batch_norm"] is False
    quick = get_profile("quick").train_config(activation="elu")
    assert (quick.batch_norm, quick.lr_schedule, quick.head_bias, quick.activation) == (True, "cosine", -4.0, "elu")
    assert get_profile("full").train_config().lr_schedule == "plateau"


# batch norm, augmentation, a plateau that halves the rate after epoch 5 and a best epoch (4) before the
# interruptions below: everything a resumed run has to carry over
RESUME_CONFIG = dataclasses.replace(CONFIG, num_epochs=6, augment=STUDY_AUGMENT, learning_rate=1e-2, batch_norm=True,
                                    head_bias=-4.0, reduce_lr_patience=1, early_stopping_patience=3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The data of the resume tests and their run trained without interruption."""
    data = blobs()
    train_data, val_data = data.subset(range(8)), data.subset(range(8, 12))
    folder = tmp_path_factory.mktemp("resume") / "whole"
    whole = train.train(RESUME_CONFIG, train_data, val_data, run_dir=folder, progress=False, previews=False)
    return train_data, val_data, whole


def interrupt_at(epoch):
    """A callback that stops training (as the notebook's stop button does) when epoch ``epoch`` (from 1) begins."""
    import keras

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, index, logs=None):
            if index + 1 == epoch:
                raise KeyboardInterrupt

    return Interrupt()


def assert_same_run(resumed, whole, val_data, folder):
    """The resumed run is the uninterrupted one: history, best epoch, scores, model and files.

    Exact to 1e-5 on TensorFlow. Under JAX a run resumed after epoch 4 of this config trains epoch 5 with a loss
    1.5e-4 away from the uninterrupted run's (same data, same learning rate; resumed after epoch 5 it is exact),
    so the JAX pass allows 1e-3 (a cause not found yet).
    """
    import keras

    tol = 1e-5 if keras.backend.backend() == "tensorflow" else 1e-3
    columns = ["loss", "dice", "val_loss", "val_dice", "learning_rate"]
    np.testing.assert_allclose(resumed.history[columns].to_numpy(), whole.history[columns].to_numpy(), atol=tol)
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"]
    assert resumed.metrics["dice"] == pytest.approx(whole.metrics["dice"], abs=tol)
    x, _ = train.to_arrays(RESUME_CONFIG, val_data)
    np.testing.assert_allclose(train.predict_numpy(resumed.model, x), train.predict_numpy(whole.model, x), atol=tol)
    # the checkpoint goes when training ends: the folder is that of the uninterrupted run
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in whole.run_dir.iterdir())


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    import keras

    train_data, val_data, whole = uninterrupted
    config = RESUME_CONFIG
    folder = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train.train(config, train_data, val_data, run_dir=folder, progress=False, previews=False,
                    callbacks=[interrupt_at(6)])
    assert {"checkpoint.keras", "checkpoint.json"} <= {p.name for p in folder.iterdir()}
    assert len(pd.read_csv(folder / "history.csv")) == 5
    with pytest.raises(FileExistsError, match="resume=True"):
        train.train(config, train_data, val_data, run_dir=folder, progress=False)
    resumed = train.train(config, train_data, val_data, run_dir=folder, progress=False, previews=False, resume=True)

    if keras.backend.backend() == "tensorflow":  # the backend this config was chosen on
        assert whole.history["learning_rate"].iloc[-1] < whole.history["learning_rate"].iloc[0]  # the plateau acted
        assert whole.metrics["best_epoch"] == 4
    assert_same_run(resumed, whole, val_data, folder)
    with pytest.raises(ValueError, match="finished"):
        train.train(config, train_data, val_data, run_dir=folder, progress=False, resume=True)


def test_a_checkpoint_every_few_epochs_resumes_from_the_last_one_to_the_same_result(tmp_path, uninterrupted):
    from strokekit.runs import RunFolder

    train_data, val_data, whole = uninterrupted
    folder = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):  # during epoch 6: the last checkpoint is that of epoch 4
        train.train(RESUME_CONFIG, train_data, val_data, run_dir=folder, progress=False, previews=False,
                    callbacks=[interrupt_at(6)], checkpoint_every=2)
    assert len(pd.read_csv(folder / "history.csv")) == 5
    assert RunFolder.open(folder).read_checkpoint()[0]["epochs_done"] == 4
    resumed = train.train(RESUME_CONFIG, train_data, val_data, run_dir=folder, progress=False, previews=False,
                          resume=True, checkpoint_every=2)
    assert_same_run(resumed, whole, val_data, folder)
    with pytest.raises(ValueError, match="checkpoint_every >= 1"):
        train.train(RESUME_CONFIG, train_data, val_data, run_dir=False, progress=False, checkpoint_every=0)


def test_an_interrupt_between_checkpoint_files_does_not_train_an_epoch_twice(tmp_path, uninterrupted, monkeypatch):
    from strokekit.runs import RunFolder

    train_data, val_data, whole = uninterrupted
    write_json = RunFolder.write_json

    def interrupted_after_the_model(run, name, obj):  # checkpoint.keras of epoch 5 is written, its json is not
        if name == "checkpoint.json" and obj.get("epochs_done") == 5:
            raise KeyboardInterrupt
        return write_json(run, name, obj)

    folder = tmp_path / "cut"
    monkeypatch.setattr(RunFolder, "write_json", interrupted_after_the_model)
    with pytest.raises(KeyboardInterrupt):
        train.train(RESUME_CONFIG, train_data, val_data, run_dir=folder, progress=False, previews=False)
    monkeypatch.setattr(RunFolder, "write_json", write_json)
    assert json.loads((folder / "checkpoint.json").read_text())["epochs_done"] == 4  # the stale copy
    resumed = train.train(RESUME_CONFIG, train_data, val_data, run_dir=folder, progress=False, previews=False,
                          resume=True)
    assert_same_run(resumed, whole, val_data, folder)


@pytest.mark.parametrize("patience", [0, 1], ids=["all-epochs", "early-stop"])
def test_a_run_interrupted_after_its_last_epoch_only_finishes_on_resume(tmp_path, patience):
    import keras

    from strokekit import engine, models
    from strokekit.augment import SegmentationLoader
    from strokekit.runs import RunFolder

    data = blobs()
    x, y = train.to_arrays(CONFIG, data)
    loss, metrics = train.loss_and_metrics(CONFIG)

    def fit(folder, resume=False, callbacks=()):
        loaders = [SegmentationLoader(x[s], y[s], batch_size=4, shuffle=True, seed=0) for s in (slice(8), slice(8, 12))]
        keras.utils.set_random_seed(0)
        model = models.unet((32, 32, 1), filters=(4, 8), seed=0)
        run = RunFolder.create(folder, "binary", CONFIG, resume=resume)
        phases = [engine.Phase(5, learning_rate=0.2 if patience else 0.05)]  # 0.2 overshoots at once
        return engine.fit(model, *loaders, phases, loss, metrics, patience=patience, restore_best=False, run=run,
                          resume=resume, progress=False, callbacks=callbacks)

    class InterruptAtTheEnd(keras.callbacks.Callback):  # after the last epoch's checkpoint, before the final save
        def on_train_end(self, logs=None):
            raise KeyboardInterrupt

    whole = fit(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", callbacks=[InterruptAtTheEnd()])
    resumed = fit(tmp_path / "cut", resume=True)
    if keras.backend.backend() == "tensorflow":  # the learning rates were chosen on it: the run stops at epoch 2
        assert whole.stopped_early == bool(patience) and len(whole.history) == (2 if patience else 5)
    assert resumed.stopped_early == whole.stopped_early and len(resumed.history) == len(whole.history)
    np.testing.assert_allclose(resumed.history["val_loss"], whole.history["val_loss"], atol=1e-6)
    # the last epoch's weights (restore_best=False), not the fresh model's
    for a, b in zip(resumed.model.get_weights(), whole.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert RunFolder.open(tmp_path / "cut").finished
