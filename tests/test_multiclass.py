"""Tests for strokekit.multiclass and the colour-coded masks it reads and writes (strokekit.io)."""

import hashlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

from strokekit import engine, io
from strokekit import multiclass as mc
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError

pytestmark = pytest.mark.backend

LABELS = np.array([[0, 1, 2], [2, 0, 1]], dtype=np.uint8)


# --------------------------------------------------------------------------- colour masks
def test_colour_encoding_uses_study_colours_and_round_trips():
    rgb = io.encode_colour_mask(LABELS, io.MULTICLASS_COLOURS)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == (255, 0, 0)  # hemorrhagic = red
    assert tuple(rgb[0, 2]) == (0, 255, 0)  # ischemic = green
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    np.testing.assert_array_equal(io.decode_colour_mask(rgb, io.MULTICLASS_COLOURS), LABELS)


def test_unknown_colour_is_rejected_with_file_and_colour():
    rgb = io.encode_colour_mask(LABELS, io.MULTICLASS_COLOURS)
    rgb[1, 1] = (255, 0, 255)
    with pytest.raises(DataError, match=r"cases/7_mask\.png.*\(255, 0, 255\): 1 px"):
        io.decode_colour_mask(rgb, io.MULTICLASS_COLOURS, path="cases/7_mask.png")


def test_label_without_colour_cannot_be_encoded():
    with pytest.raises(ValueError, match=r"labels \[3\] have no colour"):
        io.encode_colour_mask(np.array([[0, 3]]), io.MULTICLASS_COLOURS)


def _display_dataset(n=3, size=32, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 4:10, 4:10] = 1
    masks[:, 20:26, 18:28] = 2
    return SliceDataset(images=images, masks=masks, case_ids=[f"c{i}" for i in range(n)],
                        patient_ids=[f"P{i}" for i in range(n)], unit="display",
                        class_names=io.MULTICLASS_CLASS_NAMES)


def test_study_layout_colour_masks_round_trip_through_files(tmp_path):
    data = _display_dataset()
    io.write_study_layout(data, tmp_path / "study", colour_map=io.MULTICLASS_COLOURS, progress=False)
    on_disk = np.asarray(Image.open(tmp_path / "study" / "c0_mask.png"))
    assert on_disk.shape == (32, 32, 3) and tuple(on_disk[5, 5]) == (255, 0, 0)
    back = io.read_study_layout(tmp_path / "study", colour_map=io.MULTICLASS_COLOURS,
                                class_names=io.MULTICLASS_CLASS_NAMES, progress=False)
    np.testing.assert_array_equal(back.masks, data.masks)
    assert back.class_names == ("background", "hemorrhagic", "ischemic")


def test_study_layout_with_foreign_colour_names_the_file(tmp_path):
    data = _display_dataset()
    folder = io.write_study_layout(data, tmp_path / "study", colour_map=io.MULTICLASS_COLOURS,
                                   progress=False)
    rgb = np.asarray(Image.open(folder / "c1_mask.png")).copy()
    rgb[0, 0] = (0, 0, 255)
    Image.fromarray(rgb).save(folder / "c1_mask.png")
    with pytest.raises(DataError, match=r"c1_mask\.png.*\(0, 0, 255\)"):
        io.read_study_layout(folder, colour_map=io.MULTICLASS_COLOURS, progress=False)


# --------------------------------------------------------------------------- config, weights
def test_config_maps_to_unet_arguments():
    cfg = mc.MulticlassConfig(base_filters=4, num_levels=2, kernel_size=5, dilation_rate=2,
                              dropout=0.25, image_size=32)
    assert cfg.filters == (4, 8, 16)
    kw = cfg.model_kwargs()
    assert kw["input_shape"] == (32, 32, 1) and kw["num_classes"] == 3
    assert (kw["kernel_size"], kw["dilation_rate"], kw["dropout"]) == (5, 2, 0.25)
    tc = cfg.train_config()
    assert tc.filters == (4, 8, 16) and tc.num_classes == 3 and tc.loss == "categorical_ce_dice"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"class_weights must be 3 non-negative numbers"):
        mc.MulticlassConfig(class_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match=r"image_size must be a multiple of 2 \*\* num_levels = 8"):
        mc.MulticlassConfig(image_size=36, num_levels=3)


def test_class_weights_hand_values():
    masks = np.array([0] * 90 + [1] * 9 + [2] * 1).reshape(1, 10, 10)
    assert mc.class_weights(masks, 3, power=1.0, max_weight=100) == pytest.approx((1.0, 10.0, 90.0))
    assert mc.class_weights(masks, 3, power=1.0) == pytest.approx((1.0, 10.0, 50.0))  # capped
    assert mc.class_weights(masks, 3, power=0.5) == pytest.approx((1.0, 10**0.5, 90**0.5), abs=1e-4)
    assert mc.class_weights(masks, 3, power=0.0) == pytest.approx((1.0, 1.0, 1.0))
    absent = np.zeros((1, 4, 4), np.uint8)
    absent[0, 0, 0] = 1
    assert mc.class_weights(absent, 3, power=1.0, max_weight=7.0) == pytest.approx((1.0, 7.0, 7.0))
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        mc.class_weights(np.array([[3]]), 3)


class _FixedModel:
    """Stands in for a Keras model: predicts one-hot probabilities of fixed labels."""

    def __init__(self, labels, num_classes=3):
        self.labels = labels
        self.num_classes = num_classes
        self.done = 0  # slices predicted so far: batches come in order

    def __call__(self, x, training=False):
        assert not training and self.done + len(x) <= len(self.labels)
        labels = self.labels[self.done:self.done + len(x)]
        self.done += len(x)
        return np.eye(self.num_classes, dtype=np.float32)[labels]


def test_evaluate_is_per_class_without_background():
    data = _display_dataset(n=2)
    pred = data.masks.copy()
    pred[:, 4:10, 4:7] = 0  # half of each hemorrhage missed
    pred[:, 0:2, 0:2] = 2  # 4 false ischemic pixels per slice
    cfg = mc.MulticlassConfig(base_filters=2, num_levels=2, image_size=32)
    table = mc.evaluate(_FixedModel(pred), cfg, data)
    assert list(table["class_name"]) == ["hemorrhagic", "ischemic"]
    hem, isc = table.iloc[0], table.iloc[1]
    assert hem["dice"] == pytest.approx(2 * 36 / (72 + 36))  # 18 tp per slice of 36 true
    assert isc["dice"] == pytest.approx(2 * 120 / (120 + 128))
    assert isc["lesion_f1"] == pytest.approx(2 / 3)  # one true lesion, one false per slice


# --------------------------------------------------------------------------- predict_folder
@pytest.fixture(scope="module")
def tiny_model():
    cfg = mc.MulticlassConfig(base_filters=2, num_levels=2, image_size=32, seed=0)
    return cfg, mc.build_model(cfg)


def _snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_predict_folder_writes_only_into_the_new_folder(tmp_path, tiny_model):
    cfg, model = tiny_model
    data = _display_dataset(n=3, size=40)  # not the model's size: predictions are resized back
    src = io.write_study_layout(data, tmp_path / "study", progress=False)
    before = _snapshot(src)
    table = mc.predict_folder(model, cfg, src, tmp_path / "pred", progress=False)
    assert _snapshot(src) == before
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert written == ["c0_pred.png", "c1_pred.png", "c2_pred.png"]
    assert list(table["case_id"]) == ["c0", "c1", "c2"]
    pred = np.asarray(Image.open(tmp_path / "pred" / "c0_pred.png"))
    assert pred.shape == (40, 40, 3)
    colours = {tuple(c) for c in pred.reshape(-1, 3).tolist()}
    assert colours <= set(io.MULTICLASS_COLOURS)
    decoded = io.decode_colour_mask(pred, io.MULTICLASS_COLOURS)
    assert int((decoded == 1).sum()) == table.loc[0, "hemorrhagic_pixels"]


def test_predict_folder_refuses_input_folder_and_non_empty_output(tmp_path, tiny_model):
    cfg, model = tiny_model
    src = io.write_study_layout(_display_dataset(n=1), tmp_path / "study", progress=False)
    before = _snapshot(src)
    with pytest.raises(DataError, match="refusing to write predictions into the input folder"):
        mc.predict_folder(model, cfg, src, src, progress=False)
    with pytest.raises(DataError, match="refusing to write predictions into the input folder"):
        mc.predict_folder(model, cfg, src, src / "pred", progress=False)
    assert _snapshot(src) == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="output folder is not empty"):
        mc.predict_folder(model, cfg, src, tmp_path / "busy", progress=False)
    (tmp_path / "empty_in").mkdir()
    with pytest.raises(DataError, match="no images to segment"):
        mc.predict_folder(model, cfg, tmp_path / "empty_in", tmp_path / "out", progress=False)


# --------------------------------------------------------------------------- training
def test_train_multiclass_writes_run_folder(tmp_path):
    data = _display_dataset(n=4, size=32)
    cfg = mc.MulticlassConfig(base_filters=2, num_levels=1, image_size=32, num_epochs=2,
                              batch_size=2, class_weights=(1.0, 5.0, 5.0), preview_slices=2,
                              workers=1)
    result = mc.train_multiclass(cfg, data.subset([0, 1, 2]), data.subset([3]),
                                 run_dir=tmp_path / "run", progress=False)
    folder = result.run_dir
    for name in ("config.json", "history.csv", "model.keras", "metrics.json", "curves.png"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "previews").iterdir()) == ["epoch_001.png", "epoch_002.png"]
    assert {"loss", "val_loss", "dice_hemorrhagic", "val_dice_ischemic"} <= set(result.history.columns)
    assert len(result.history) == 2 and np.isfinite(result.history["loss"]).all()
    assert 0.0 <= result.metrics["dice_hemorrhagic"] <= 1.0 and "dice_background" not in result.metrics
    loaded = mc.config_from_dict(__import__("json").loads((folder / "config.json").read_text()))
    assert loaded == cfg


def test_an_interrupted_multiclass_run_resumes_to_the_uninterrupted_result(tmp_path):
    import keras
    import pandas as pd

    data = _display_dataset(n=6, size=32)
    # batch norm, augmentation and a plateau halving: state a resumed run has to carry over
    cfg = mc.MulticlassConfig(base_filters=2, num_levels=1, image_size=32, num_epochs=4, batch_size=2,
                              class_weights=(1.0, 5.0, 5.0), batch_norm=True, learning_rate=1e-2,
                              reduce_lr_patience=1, preview_slices=0, workers=1)
    train_data, val_data = data.subset(range(4)), data.subset([4, 5])
    whole = mc.train_multiclass(cfg, train_data, val_data, run_dir=tmp_path / "whole", progress=False)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 3:
                raise KeyboardInterrupt  # during epoch 4

    class Count(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_begin(self, epoch, logs=None):
            Count.epochs += 1

    def with_callback(callback):  # train_multiclass takes no callbacks: give them to engine.fit
        fit = engine.fit
        return lambda *args, **kw: fit(*args, **{**kw, "callbacks": [callback]})

    folder = tmp_path / "cut"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "fit", with_callback(Interrupt()))
        with pytest.raises(KeyboardInterrupt):
            mc.train_multiclass(cfg, train_data, val_data, run_dir=folder, progress=False)
    assert (folder / "checkpoint.keras").is_file() and len(pd.read_csv(folder / "history.csv")) == 3
    with pytest.raises(FileExistsError, match="resume=True"):
        mc.train_multiclass(cfg, train_data, val_data, run_dir=folder, progress=False)
    with pytest.raises(ValueError, match="name the folder"):
        mc.train_multiclass(cfg, train_data, val_data, progress=False, resume=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "fit", with_callback(Count()))
        resumed = mc.train_multiclass(cfg, train_data, val_data, run_dir=folder, progress=False, resume=True)
    assert Count.epochs == 1  # only the epoch the interruption stopped
    columns = ["loss", "val_loss", "dice_hemorrhagic", "val_dice_ischemic", "learning_rate"]
    np.testing.assert_allclose(resumed.history[columns].to_numpy(), whole.history[columns].to_numpy(), atol=1e-5)
    assert resumed.metrics["best_epoch"] == whole.metrics["best_epoch"]
    assert resumed.metrics["mean_dice"] == pytest.approx(whole.metrics["mean_dice"], abs=1e-5)
    x, _ = mc.to_arrays(cfg, val_data)
    np.testing.assert_allclose(resumed.model.predict(x, verbose=0), whole.model.predict(x, verbose=0), atol=1e-5)
    # the checkpoint goes when training ends: the folder is that of the uninterrupted run
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_multiclass_config_carries_the_profile_training_levers():
    config = mc.MulticlassConfig(image_size=32, num_levels=2, base_filters=4, batch_norm=True,
                                         bn_momentum=0.9, head_bias=-4.0, lr_schedule="cosine", repeats=2)
    assert config.model_kwargs()["head_bias"] == -4.0 and config.model_kwargs()["bn_momentum"] == 0.9
    assert config.train_config().repeats == 2 and config.train_config().lr_schedule == "cosine"
    model = mc.build_model(config)
    assert np.allclose(model.get_layer("head").get_weights()[1], [0.0, -4.0, -4.0])
    with pytest.raises(ValueError, match="lr_schedule"):
        mc.MulticlassConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="repeats"):
        mc.MulticlassConfig(repeats=0)
