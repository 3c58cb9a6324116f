"""Tests for strokekit.losses: hand-computed loss values, metric pooling, serialisation."""

import math
import os
import re

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under JAX, XLA's optimising CPU compiler dominates these tiny tests (seconds to tens of
# seconds for each new shape on 2 busy cores, against ~1 s unoptimised). It only takes effect
# if nothing has started JAX before this module is collected.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras
import numpy as np
import pytest

from strokekit import losses as L

pytestmark = pytest.mark.backend


def img(values, shape=(1, 2, 2, 1)):
    """A (B, H, W, C) float32 array from a flat list."""
    return np.asarray(values, dtype="float32").reshape(shape)


def value(loss, y_true, y_pred):
    return float(keras.ops.convert_to_numpy(loss(y_true, y_pred)))


T = img([1, 1, 0, 0])
PARTIAL = img([1, 0.5, 0.5, 0])  # I = 1.5, sum t = 2, sum p = 2
MISSED = img([1, 0, 0, 0])  # TP = 1, FN = 1, FP = 0
EXTRA = img([1, 1, 1, 0])  # TP = 2, FN = 0, FP = 1
DISJOINT = img([0, 0, 1, 1])
EMPTY = img([0, 0, 0, 0])


# --------------------------------------------------------------------------- Dice family


def test_soft_dice_hand_values():
    assert value(L.soft_dice_loss(), T, T) == pytest.approx(0.0, abs=1e-7)
    assert value(L.soft_dice_loss(), EMPTY, EMPTY) == pytest.approx(0.0, abs=1e-7)
    # smooth=1: (2*1.5 + 1) / (2 + 2 + 1) = 0.8
    assert value(L.soft_dice_loss(), T, PARTIAL) == pytest.approx(0.2, abs=1e-6)
    assert value(L.soft_dice_loss(smooth=0.0), T, PARTIAL) == pytest.approx(0.25, abs=1e-6)
    # disjoint: (0 + 1) / (2 + 2 + 1)
    assert value(L.soft_dice_loss(), T, DISJOINT) == pytest.approx(0.8, abs=1e-6)
    # empty truth, two predicted pixels: 1 / (0 + 2 + 1)
    assert value(L.soft_dice_loss(), EMPTY, DISJOINT) == pytest.approx(2 / 3, abs=1e-6)


def test_dice_label_forms_agree():
    # (B, H, W) labels, (B, H, W, 1) labels and the mask itself give one value.
    as_labels = T[..., 0]
    expected = value(L.soft_dice_loss(), T, PARTIAL)
    assert value(L.soft_dice_loss(), as_labels, PARTIAL) == pytest.approx(expected, abs=1e-7)
    assert value(L.soft_dice_loss(), T.astype("uint8"), PARTIAL) == pytest.approx(
        expected, abs=1e-7
    )


def test_dice_pooled_versus_per_image():
    y_true = img([1, 1, 0, 0, 0, 0, 0, 0], (2, 2, 2, 1))
    y_pred = img([1, 1, 0, 0, 1, 0, 0, 0], (2, 2, 2, 1))
    # pooled: I = 2, sum t = 2, sum p = 3 -> 1 - 5/6
    assert value(L.soft_dice_loss(), y_true, y_pred) == pytest.approx(1 / 6, abs=1e-6)
    # per image: image 1 perfect (0), image 2 1 - 1/(1+1) = 0.5 -> mean 0.25
    assert value(L.soft_dice_loss(per_image=True), y_true, y_pred) == pytest.approx(0.25, abs=1e-6)


def test_bce_and_bce_dice_hand_values():
    y_pred = img([0.9, 0.6, 0.2, 0.1])
    bce = -(math.log(0.9) + math.log(0.6) + math.log(0.8) + math.log(0.9)) / 4
    assert value(L.bce(), T, y_pred) == pytest.approx(bce, abs=1e-6)
    dice_loss = 1 - (2 * 1.5 + 1) / (2 + 1.8 + 1)
    combined = L.bce_dice_loss(w_bce=2.0, w_dice=0.5)
    assert value(combined, T, y_pred) == pytest.approx(2 * bce + 0.5 * dice_loss, abs=1e-6)
    assert value(L.bce(), T, T) == pytest.approx(0.0, abs=1e-5)


def test_log_dice_hand_values():
    loss = L.log_dice_loss()  # exponent 0.3 as in Wong et al. (2018)
    assert value(loss, T, T) == 0.0
    assert value(loss, EMPTY, EMPTY) == 0.0
    assert value(loss, T, PARTIAL) == pytest.approx((-math.log(0.8)) ** 0.3, abs=1e-5)
    assert value(loss, T, DISJOINT) == pytest.approx(math.log(5.0) ** 0.3, abs=1e-5)
    assert value(L.log_dice_loss(exponent=1.0), T, PARTIAL) == pytest.approx(
        -math.log(0.8), abs=1e-6
    )


def test_weighted_dice_channel_and_border_weights():
    weights = img([1, 3, 1, 1])
    y_true = np.concatenate([T, weights], axis=-1)
    # sum w*t*p = 1 + 1.5, sum w*t = 4, sum w*p = 1 + 1.5 + 0.5 -> 1 - 5/7
    loss = L.weighted_dice_loss("channel", smooth=0.0)
    assert value(loss, y_true, PARTIAL) == pytest.approx(2 / 7, abs=1e-6)
    ones = np.concatenate([T, np.ones_like(T)], axis=-1)
    assert value(loss, ones, PARTIAL) == pytest.approx(0.25, abs=1e-6)  # plain Dice

    mask = np.zeros((1, 5, 5, 1), "float32")
    mask[0, 2, 2, 0] = 1
    border = L.BorderWeights(width=1, border_weight=5.0)
    expected = np.ones((5, 5), "float32")
    expected[1:4, 1:4] = 5.0
    got = keras.ops.convert_to_numpy(border(keras.ops.convert_to_tensor(mask)))
    np.testing.assert_allclose(got[0, ..., 0], expected)

    # The callable form equals the channel form fed the same weights.
    rng = np.random.default_rng(0)
    y_pred = rng.random((1, 5, 5, 1)).astype("float32")
    by_callable = value(L.weighted_dice_loss(border), mask, y_pred)
    by_channel = value(
        L.weighted_dice_loss("channel"),
        np.concatenate([mask, expected[None, ..., None]], -1),
        y_pred,
    )
    assert by_callable == pytest.approx(by_channel, abs=1e-6)

    with pytest.raises(ValueError, match="weight_map must be 'channel'"):
        L.weighted_dice_loss("border")


# --------------------------------------------------------------------------- Tversky family


def test_tversky_hand_values_and_asymmetry():
    loss = L.tversky_loss(smooth=0.0)  # alpha=0.7 on FN, beta=0.3 on FP
    assert value(loss, T, MISSED) == pytest.approx(1 - 1 / 1.7, abs=1e-6)
    assert value(loss, T, EXTRA) == pytest.approx(1 - 2 / 2.3, abs=1e-6)
    # smooth=1, TP=1.5, FN=FP=0.5: 2.5 / (1.5 + 0.35 + 0.15 + 1)
    assert value(L.tversky_loss(), T, PARTIAL) == pytest.approx(1 - 2.5 / 3.0, abs=1e-6)
    assert value(L.tversky_loss(), T, T) == pytest.approx(0.0, abs=1e-7)
    assert value(L.tversky_loss(), EMPTY, EMPTY) == pytest.approx(0.0, abs=1e-7)
    assert value(L.tversky_loss(smooth=0.0), T, DISJOINT) == pytest.approx(1.0, abs=1e-6)


def test_tversky_at_one_half_is_dice():
    rng = np.random.default_rng(1)
    y_true = (rng.random((2, 4, 4, 1)) > 0.6).astype("float32")
    y_pred = rng.random((2, 4, 4, 1)).astype("float32")
    tversky = value(L.tversky_loss(alpha=0.5, beta=0.5, smooth=0.0), y_true, y_pred)
    assert tversky == pytest.approx(value(L.soft_dice_loss(smooth=0.0), y_true, y_pred), abs=1e-6)
    # with smoothing, Tversky's s matches Dice's 2s (numerator and denominator doubled)
    tversky = value(L.tversky_loss(alpha=0.5, beta=0.5, smooth=0.5), y_true, y_pred)
    assert tversky == pytest.approx(value(L.soft_dice_loss(smooth=1.0), y_true, y_pred), abs=1e-6)


def test_focal_tversky():
    assert value(L.focal_tversky_loss(smooth=0.0), T, MISSED) == pytest.approx(
        (0.7 / 1.7) ** 0.75, abs=1e-6
    )
    assert value(L.focal_tversky_loss(), T, T) == 0.0
    rng = np.random.default_rng(2)
    y_true = (rng.random((2, 4, 4, 2)) > 0.5).astype("float32")
    y_pred = rng.random((2, 4, 4, 2)).astype("float32")
    for per_image in (False, True):
        focal = L.focal_tversky_loss(gamma=1.0, per_image=per_image)
        plain = L.tversky_loss(per_image=per_image)
        assert value(focal, y_true, y_pred) == value(plain, y_true, y_pred)


def _gradient(loss, y_true, y_pred):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(y_pred)
        with tf.GradientTape() as tape:
            out = loss(y_true, x)
        return tape.gradient(out, x).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda p: loss(y_true, p))(y_pred))
    if backend == "torch":
        import torch

        x = torch.tensor(y_pred, requires_grad=True)
        loss(y_true, x).backward()
        return x.grad.numpy()
    pytest.skip(f"no gradient helper for backend {backend}")


@pytest.mark.parametrize(
    "loss",
    [L.log_dice_loss(), L.focal_tversky_loss(), L.soft_dice_loss(), L.bce_dice_loss()],
    ids=lambda x: x.name,
)
def test_gradients_finite_at_perfect_prediction(loss):
    # Exponents below 1 have an infinite slope at 0; the loss must not hand NaN to training.
    assert np.all(np.isfinite(_gradient(loss, T, T.copy())))
    assert np.all(np.isfinite(_gradient(loss, T, PARTIAL.copy())))
    assert np.any(_gradient(loss, T, PARTIAL.copy()) != 0)


# --------------------------------------------------------------------------- multiclass


Y3 = np.array([[[1, 2]]])  # (1, 1, 2) integer labels
P3 = img([0.2, 0.7, 0.1, 0.1, 0.2, 0.7], (1, 1, 2, 3))
CE3 = -(math.log(0.7) + math.log(0.7)) / 2
DICE1 = (2 * 0.7 + 1) / (1 + 0.9 + 1)  # class 1
DICE2 = (2 * 0.7 + 1) / (1 + 0.8 + 1)  # class 2
DICE0 = 1 / (0 + 0.3 + 1)  # background: no true pixel, 0.3 predicted


def test_categorical_ce_dice_hand_values():
    loss = L.categorical_ce_dice_loss(3)
    expected = CE3 + 1 - (DICE1 + DICE2) / 2
    assert value(loss, Y3, P3) == pytest.approx(expected, abs=1e-5)
    one_hot = np.eye(3, dtype="float32")[Y3]
    assert value(loss, one_hot, P3) == pytest.approx(expected, abs=1e-5)
    assert value(loss, Y3[..., None], P3) == pytest.approx(expected, abs=1e-5)
    with_bg = L.categorical_ce_dice_loss(3, exclude_background=False)
    assert value(with_bg, Y3, P3) == pytest.approx(CE3 + 1 - (DICE0 + DICE1 + DICE2) / 3, abs=1e-5)


def test_categorical_dice_ignores_background_channel():
    other = P3.copy()
    other[..., 0] = 0.9  # only the background channel changes
    dice_only = L.categorical_ce_dice_loss(3, w_ce=0.0)
    assert value(dice_only, Y3, other) == pytest.approx(value(dice_only, Y3, P3), abs=1e-7)
    with_bg = L.categorical_ce_dice_loss(3, exclude_background=False, w_ce=0.0)
    assert value(with_bg, Y3, other) != pytest.approx(value(with_bg, Y3, P3), abs=1e-4)


def test_categorical_class_weights():
    ce_only = L.categorical_ce_dice_loss(3, class_weights=[0, 1, 3], w_dice=0.0)
    assert value(ce_only, Y3, P3) == pytest.approx(-(1 + 3) * math.log(0.7) / 2, abs=1e-5)
    dice_only = L.categorical_ce_dice_loss(3, class_weights=[0, 1, 3], w_ce=0.0)
    assert value(dice_only, Y3, P3) == pytest.approx(1 - (DICE1 + 3 * DICE2) / 4, abs=1e-5)


def test_categorical_errors():
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        L.categorical_ce_dice_loss(1)
    with pytest.raises(ValueError, match="class_weights needs 3 non-negative numbers"):
        L.categorical_ce_dice_loss(3, class_weights=[1, 2])
    with pytest.raises(ValueError, match="y_pred has 3 channels; expected num_classes=4"):
        L.categorical_ce_dice_loss(4)(Y3, P3)
    with pytest.raises(ValueError, match="y_true has 2 channels; expected 3"):
        L.soft_dice_loss()(np.zeros((1, 1, 2, 2), "float32"), P3)


# --------------------------------------------------------------------------- registry


def test_registry_and_unknown_name():
    assert set(L.LOSSES) == {
        "bce",
        "soft_dice",
        "bce_dice",
        "log_dice",
        "weighted_dice",
        "tversky",
        "focal_tversky",
        "categorical_ce_dice",
    }
    loss = L.get_loss("focal_tversky", gamma=1.0)
    assert isinstance(loss, L.FocalTverskyLoss) and loss.gamma == 1.0
    assert loss.__name__ == "focal_tversky_loss"
    assert L.get_loss("bce_dice", name="mine").name == "mine"
    message = f"Expected one of {list(L.LOSSES)}. Received: loss='dice_bce'"
    with pytest.raises(ValueError, match=re.escape(message)):
        L.get_loss("dice_bce")
    # the lower-case names are the classes; a misspelt argument is still an error
    assert L.soft_dice_loss is L.SoftDiceLoss and L.LOSSES["categorical_ce_dice"] is L.CategoricalCEDiceLoss
    assert L.tversky_loss(0.6, 0.4).get_config()["alpha"] == 0.6
    with pytest.raises(TypeError):
        L.soft_dice_loss(smoth=2.0)


@pytest.mark.parametrize(
    "loss",
    [
        L.bce(per_image=True),
        L.soft_dice_loss(smooth=2.0),
        L.bce_dice_loss(w_bce=0.5),
        L.log_dice_loss(exponent=0.5),
        L.weighted_dice_loss(L.BorderWeights(width=1, border_weight=3.0)),
        L.weighted_dice_loss("channel"),
        L.tversky_loss(alpha=0.6, beta=0.4),
        L.focal_tversky_loss(gamma=0.5),
        L.categorical_ce_dice_loss(3, class_weights=[0.1, 1, 2]),
    ],
    ids=lambda x: x.name,
)
def test_loss_serialisation_round_trip(loss):
    config = keras.saving.serialize_keras_object(loss)
    restored = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()


# --------------------------------------------------------------------------- saved models


def test_keras_metrics_are_re_exported_from_metrics():
    from strokekit import metrics as M

    for name in ("DiceMetric", "IoUMetric", "Sensitivity", "Specificity"):
        assert getattr(L, name) is getattr(M, name)


def test_trained_model_reloads_in_safe_mode(tmp_path):
    from strokekit.models import unet

    rng = np.random.default_rng(0)
    x = rng.random((4, 16, 16, 1)).astype("float32")
    y = (x > 0.6).astype("float32")
    model = unet((16, 16, 1), filters=(4, 8), seed=0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=L.focal_tversky_loss(gamma=0.5),
        metrics=[L.DiceMetric(), L.IoUMetric(), L.Sensitivity(), L.Specificity()],
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.loss, L.FocalTverskyLoss) and loaded.loss.gamma == 0.5
    logs = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert {"dice", "iou", "sensitivity", "specificity"} <= set(logs)
    assert all(0.0 <= logs[k] <= 1.0 for k in ("dice", "iou", "sensitivity", "specificity"))
