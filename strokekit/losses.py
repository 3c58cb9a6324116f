"""Segmentation losses and lesion metrics, written with ``keras.ops`` so they run on every backend.

Introduced in notebooks/04_unet_vs_resunet.ipynb.

Conventions:

* ``y_pred`` holds probabilities (the models' sigmoid or softmax head), shape
  ``(B, H, W, C)``.
* ``y_true`` has the same shape (binary masks, one-hot labels), or holds integer labels of
  shape ``(B, H, W)`` or ``(B, H, W, 1)``: with ``C == 1`` these are the binary mask, with
  ``C > 1`` they are one-hot encoded to ``C`` classes.
* Overlap losses (Dice, Tversky, ...) are computed per channel and averaged over channels.
  By default the sums run over the whole batch (``per_image=False``): the batch is treated as
  one volume, so slices without a lesion neither dominate nor give undefined ratios, which
  matters when most slices of a small data set are lesion-free. ``per_image=True`` computes
  one value per image and lets Keras average them (and apply ``sample_weight``).
* ``smooth`` is added to numerator and denominator: an empty truth predicted empty scores a
  Dice of 1 (loss 0) instead of 0/0.

Every loss is a registered ``keras.losses.Loss`` subclass (so a saved model reloads with
``keras.saving.load_model(path, safe_mode=True)``) with a lower-case factory of the same
meaning (``soft_dice_loss(...)`` returns a ``SoftDiceLoss``); instances carry a ``__name__``
for code that expects plain functions. :data:`LOSSES` and :func:`get_loss` look them up by
name.

Metrics (:class:`DiceMetric`, :class:`IoUMetric`, :class:`Sensitivity`,
:class:`Specificity`) threshold the prediction and pool true/false positives/negatives over
every batch of an epoch, then compute the ratio once: the epoch's Dice is the Dice of all
its pixels together, not an average of per-batch values. They measure the lesion class, not
pixel accuracy, which a network predicting "no lesion" everywhere maxes out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

_PACKAGE = "strokekit"


def _expected(value: Any, choices, arg: str) -> ValueError:
    return ValueError(f"Expected one of {list(choices)}. Received: {arg}={value!r}")


# --------------------------------------------------------------------------- helpers


def _align(y_true, y_pred):
    """Returns ``(y_true, y_pred)`` as float tensors of the same shape (see module docstring)."""
    y_pred = ops.convert_to_tensor(y_pred)
    if not str(y_pred.dtype).startswith(("float", "bfloat")):
        y_pred = ops.cast(y_pred, "float32")
    y_true = ops.convert_to_tensor(y_true)
    channels = y_pred.shape[-1]
    if len(y_true.shape) == len(y_pred.shape) - 1:
        y_true = ops.expand_dims(y_true, -1)
    if len(y_true.shape) != len(y_pred.shape):
        raise ValueError(
            f"y_true must have the shape of y_pred {tuple(y_pred.shape)} or be integer labels "
            f"without the channel axis. Received: y_true.shape={tuple(y_true.shape)}"
        )
    true_channels = y_true.shape[-1]
    if channels is not None and channels > 1 and true_channels == 1:
        labels = ops.cast(ops.round(ops.squeeze(y_true, -1)), "int32")
        y_true = ops.one_hot(labels, channels)
    elif channels is not None and true_channels is not None and true_channels != channels:
        raise ValueError(
            f"y_true has {true_channels} channels; expected {channels} (one-hot, like y_pred) "
            f"or 1 (integer labels). Received: y_true.shape={tuple(y_true.shape)}, "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    return ops.cast(y_true, y_pred.dtype), y_pred


def _sum_axes(x, per_image: bool) -> tuple[int, ...]:
    rank = len(x.shape)
    return tuple(range(1 if per_image else 0, rank - 1))


def _dice_per_channel(y_true, y_pred, smooth: float, per_image: bool, weights=None):
    """Soft Dice per channel: shape (C,) pooled, or (B, C) per image."""
    axes = _sum_axes(y_pred, per_image)
    if weights is None:
        weights = ops.ones_like(y_true)
    intersection = ops.sum(weights * y_true * y_pred, axis=axes)
    total = ops.sum(weights * y_true, axis=axes) + ops.sum(weights * y_pred, axis=axes)
    return (2.0 * intersection + smooth) / (total + smooth)


def _tversky_index(y_true, y_pred, alpha: float, beta: float, smooth: float, per_image: bool):
    axes = _sum_axes(y_pred, per_image)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    return (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)


def _safe_power(x, exponent: float):
    """``x ** exponent`` for x >= 0 whose gradient stays finite (zero) at x == 0.

    For exponents below 1 the derivative of x**g is infinite at 0, which a perfect
    prediction reaches; the double ``where`` keeps the NaN out of the backward pass.
    """
    if exponent == 1:
        return x
    positive = x > 0
    safe = ops.where(positive, x, ops.ones_like(x))
    return ops.where(positive, ops.power(safe, exponent), ops.zeros_like(x))


def _bce(y_true, y_pred, per_image: bool):
    eps = keras.config.epsilon()
    p = ops.clip(y_pred, eps, 1.0 - eps)
    loss = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    if per_image:
        return ops.mean(loss, axis=tuple(range(1, len(loss.shape))))
    return ops.mean(loss)


def _reduce_channels(values):
    # (C,) -> scalar (batch-pooled), (B, C) -> (B,) (per image)
    return ops.mean(values, axis=-1)


def _check_positive(**values) -> None:
    for key, value in values.items():
        if not float(value) >= 0:
            raise ValueError(f"{key} must be >= 0. Received: {key}={value!r}")


class _StrokeLoss(keras.losses.Loss):
    """Shared plumbing: a default name, a ``__name__`` and the config of the extra arguments."""

    default_name = "loss"

    def __init__(
        self,
        per_image: bool = False,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        super().__init__(name=name or self.default_name, reduction=reduction, dtype=dtype)
        self.per_image = bool(per_image)
        self.__name__ = self.name

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def get_config(self):
        return {**super().get_config(), "per_image": self.per_image, **self._extra_config()}


# --------------------------------------------------------------------------- losses


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BCELoss(_StrokeLoss):
    """Binary cross-entropy averaged over pixels and channels (probability inputs).

    Args:
        per_image: one value per image instead of one for the batch.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "bce"

    def call(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        return _bce(y_true, y_pred, self.per_image)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftDiceLoss(_StrokeLoss):
    """``1 - (2·Σtp + s) / (Σt + Σp + s)`` per channel, averaged over channels.

    Args:
        smooth: the additive ``s``; keeps empty-vs-empty at loss 0.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "soft_dice_loss"

    def __init__(self, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(smooth=smooth)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        dice = _dice_per_channel(y_true, y_pred, self.smooth, self.per_image)
        return 1.0 - _reduce_channels(dice)

    def _extra_config(self):
        return {"smooth": self.smooth}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BCEDiceLoss(_StrokeLoss):
    """``w_bce · BCE + w_dice · (1 - soft Dice)``: pixel-wise and overlap terms together.

    Args:
        w_bce: weight of the cross-entropy.
        w_dice: weight of the Dice loss.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "bce_dice_loss"

    def __init__(self, w_bce: float = 1.0, w_dice: float = 1.0, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(w_bce=w_bce, w_dice=w_dice, smooth=smooth)
        self.w_bce, self.w_dice, self.smooth = float(w_bce), float(w_dice), float(smooth)

    def call(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        dice = _reduce_channels(_dice_per_channel(y_true, y_pred, self.smooth, self.per_image))
        return self.w_bce * _bce(y_true, y_pred, self.per_image) + self.w_dice * (1.0 - dice)

    def _extra_config(self):
        return {"w_bce": self.w_bce, "w_dice": self.w_dice, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LogDiceLoss(_StrokeLoss):
    """The Dice part of the exponential logarithmic loss: mean over channels of (−ln Dice)^γ.

    Wong et al., "3D segmentation with exponential logarithmic loss for highly unbalanced
    object sizes", MICCAI 2018, define ``L_Dice = E_i[(−ln Dice_i)^γ]`` over the labels ``i``
    and report γ = 0.3 as best. With γ < 1 the loss rises steeply for poor overlaps and
    flattens near a good one, which helps small lesions; the study trained its ResU-Net with
    it. (Wong et al. add a similarly transformed cross-entropy; combine with ``bce`` for that.)

    Args:
        exponent: γ.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "log_dice_loss"

    def __init__(self, exponent: float = 0.3, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(exponent=exponent, smooth=smooth)
        self.exponent, self.smooth = float(exponent), float(smooth)

    def call(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        dice = _dice_per_channel(y_true, y_pred, self.smooth, self.per_image)
        neg_log = ops.maximum(-ops.log(ops.clip(dice, keras.config.epsilon(), 1.0)), 0.0)
        return _reduce_channels(_safe_power(neg_log, self.exponent))

    def _extra_config(self):
        return {"exponent": self.exponent, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BorderWeights:
    """Per-pixel weights that emphasise lesion borders, computed from ``y_true`` in the graph.

    A pixel within ``width`` pixels (a square neighbourhood) of a mask edge, on either side,
    gets ``border_weight``; every other pixel 1. The border is the morphological dilation
    minus the erosion of the mask, both by max-pooling, so it runs on every backend. Use it
    as ``weighted_dice_loss(weight_map=BorderWeights(...))``.

    Args:
        width: half-width of the border band in pixels.
        border_weight: weight of border pixels.
    """

    def __init__(self, width: int = 2, border_weight: float = 5.0):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int. Received: width={width!r}")
        _check_positive(border_weight=border_weight)
        self.width, self.border_weight = width, float(border_weight)

    def __call__(self, y_true):
        size = 2 * self.width + 1
        dilated = ops.max_pool(y_true, size, strides=1, padding="same")
        eroded = -ops.max_pool(-y_true, size, strides=1, padding="same")
        border = dilated - eroded
        return 1.0 + (self.border_weight - 1.0) * border

    def get_config(self):
        return {"width": self.width, "border_weight": self.border_weight}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WeightedDiceLoss(_StrokeLoss):
    """Soft Dice with per-pixel weights: ``1 - (2·Σwtp + s) / (Σwt + Σwp + s)``.

    The weights come from one of two places (the ``weight_map`` argument):

    * ``"channel"``: ``y_true`` carries them as one extra last channel, i.e. ``y_true`` is
      ``concat([mask, weights], axis=-1)`` of shape ``(B, H, W, C + 1)``. Use this for
      weights computed in the data pipeline (distance maps, hand-drawn uncertainty, ...).
      Metrics compiled alongside then see the extra channel too: give them the plain mask.
    * a callable ``f(y_true) -> weights`` of ``y_true``'s shape, evaluated in the graph,
      such as :class:`BorderWeights`. For the model to reload in safe mode it must be a
      registered serializable object (``BorderWeights`` is).

    Args:
        weight_map: ``"channel"`` or a callable (see above).
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.

    Raises:
        ValueError: ``weight_map`` neither ``"channel"`` nor callable.
    """

    default_name = "weighted_dice_loss"

    def __init__(self, weight_map: str | Callable = "channel", smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(weight_map, dict):
            weight_map = keras.saving.deserialize_keras_object(weight_map)
        if not (weight_map == "channel" if isinstance(weight_map, str) else callable(weight_map)):
            raise ValueError(
                "weight_map must be 'channel' (weights as y_true's last channel) or a callable "
                f"y_true -> weights. Received: weight_map={weight_map!r}"
            )
        _check_positive(smooth=smooth)
        self.weight_map, self.smooth = weight_map, float(smooth)

    def call(self, y_true, y_pred):
        if isinstance(self.weight_map, str):
            y_true = ops.convert_to_tensor(y_true)
            weights = ops.cast(y_true[..., -1:], y_pred.dtype)
            y_true, y_pred = _align(y_true[..., :-1], y_pred)
        else:
            y_true, y_pred = _align(y_true, y_pred)
            weights = ops.cast(self.weight_map(y_true), y_pred.dtype)
        dice = _dice_per_channel(y_true, y_pred, self.smooth, self.per_image, weights=weights)
        return 1.0 - _reduce_channels(dice)

    def _extra_config(self):
        weight_map = self.weight_map
        if not isinstance(weight_map, str):
            weight_map = keras.saving.serialize_keras_object(weight_map)
        return {"weight_map": weight_map, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TverskyLoss(_StrokeLoss):
    """``1 - TI`` with ``TI = (TP + s) / (TP + α·FN + β·FP + s)``, averaged over channels.

    Soft counts: TP = Σtp, FN = Σt(1−p), FP = Σ(1−t)p. Following Abraham & Khan (2019),
    ``alpha`` weighs false negatives and ``beta`` false positives, so the default α = 0.7,
    β = 0.3 trades precision for recall on small lesions. α = β = 0.5 is the soft Dice loss
    (with Dice's ``smooth`` twice Tversky's).
    (Salehi et al., 2017, who introduced the loss, name the two weights the other way round.)

    Args:
        alpha: weight of false negatives.
        beta: weight of false positives.
        smooth: additive smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "tversky_loss"

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, smooth: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive(alpha=alpha, beta=beta, smooth=smooth)
        self.alpha, self.beta, self.smooth = float(alpha), float(beta), float(smooth)

    def _one_minus_ti(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        ti = _tversky_index(y_true, y_pred, self.alpha, self.beta, self.smooth, self.per_image)
        return ops.maximum(1.0 - ti, 0.0)

    def call(self, y_true, y_pred):
        return _reduce_channels(self._one_minus_ti(y_true, y_pred))

    def _extra_config(self):
        return {"alpha": self.alpha, "beta": self.beta, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss ``(1 - TI)^gamma`` per channel, averaged over channels.

    Abraham & Khan, "A novel focal Tversky loss function with improved attention U-Net for
    lesion segmentation", ISBI 2019, write the exponent as 1/γ with γ = 4/3 best; ``gamma``
    here is the exponent itself, so the default 0.75 is their setting. With ``gamma < 1``
    well-segmented images contribute less than hard ones; ``gamma == 1`` is exactly
    :class:`TverskyLoss`.

    Args:
        alpha: weight of false negatives.
        beta: weight of false positives.
        gamma: the exponent.
        smooth: additive smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.
    """

    default_name = "focal_tversky_loss"

    def __init__(
        self,
        alpha: float = 0.7,
        beta: float = 0.3,
        gamma: float = 0.75,
        smooth: float = 1.0,
        **kwargs,
    ):
        super().__init__(alpha=alpha, beta=beta, smooth=smooth, **kwargs)
        _check_positive(gamma=gamma)
        self.gamma = float(gamma)

    def call(self, y_true, y_pred):
        base = self._one_minus_ti(y_true, y_pred)
        return _reduce_channels(_safe_power(base, self.gamma))

    def _extra_config(self):
        return {**super()._extra_config(), "gamma": self.gamma}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CategoricalCEDiceLoss(_StrokeLoss):
    """``w_ce · CCE + w_dice · (1 - mean multiclass soft Dice)`` for softmax outputs.

    The cross-entropy covers every class (the background included: it is what teaches the
    network where lesions are not); the Dice term, by default, only the lesion classes,
    because the background's Dice is near 1 whatever the network does and would dilute
    the lesion classes' signal.

    ``class_weights`` (one per class) multiply each pixel's cross-entropy by the weight of
    its true class, and turn the Dice average over the included classes into a weighted one.

    Args:
        num_classes: number of classes ``C`` (channels of ``y_pred``).
        exclude_background: leave class 0 out of the Dice term.
        class_weights: None (all 1) or ``C`` non-negative numbers.
        w_ce: weight of the cross-entropy.
        w_dice: weight of the Dice loss.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name, reduction, dtype: as for ``keras.losses.Loss``.

    Raises:
        ValueError: fewer than 2 classes, wrong number of class weights, or ``y_pred`` with
            a different number of channels.
    """

    default_name = "categorical_ce_dice_loss"

    def __init__(
        self,
        num_classes: int,
        exclude_background: bool = True,
        class_weights=None,
        w_ce: float = 1.0,
        w_dice: float = 1.0,
        smooth: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                "num_classes must be an int >= 2 (background plus at least one class). "
                f"Received: num_classes={num_classes!r}"
            )
        if class_weights is not None:
            class_weights = [float(w) for w in class_weights]
            if len(class_weights) != num_classes or min(class_weights) < 0:
                raise ValueError(
                    f"class_weights needs {num_classes} non-negative numbers, one per class. "
                    f"Received: class_weights={class_weights!r}"
                )
        _check_positive(w_ce=w_ce, w_dice=w_dice, smooth=smooth)
        self.num_classes = num_classes
        self.exclude_background = bool(exclude_background)
        self.class_weights = class_weights
        self.w_ce, self.w_dice, self.smooth = float(w_ce), float(w_dice), float(smooth)

    def call(self, y_true, y_pred):
        if y_pred.shape[-1] is not None and y_pred.shape[-1] != self.num_classes:
            raise ValueError(
                f"y_pred has {y_pred.shape[-1]} channels; expected num_classes="
                f"{self.num_classes}. Received: y_pred.shape={tuple(y_pred.shape)}"
            )
        y_true, y_pred = _align(y_true, y_pred)
        weights = ops.convert_to_tensor(
            self.class_weights or [1.0] * self.num_classes, dtype=y_pred.dtype
        )
        eps = keras.config.epsilon()
        pixel_ce = -ops.sum(weights * y_true * ops.log(ops.clip(y_pred, eps, 1.0)), axis=-1)
        if self.per_image:
            ce = ops.mean(pixel_ce, axis=tuple(range(1, len(pixel_ce.shape))))
        else:
            ce = ops.mean(pixel_ce)
        start = 1 if self.exclude_background else 0
        dice = _dice_per_channel(y_true, y_pred, self.smooth, self.per_image)[..., start:]
        dice_weights = weights[start:]
        mean_dice = ops.sum(dice * dice_weights, axis=-1) / ops.maximum(ops.sum(dice_weights), eps)
        return self.w_ce * ce + self.w_dice * (1.0 - mean_dice)

    def _extra_config(self):
        return {
            "num_classes": self.num_classes,
            "exclude_background": self.exclude_background,
            "class_weights": self.class_weights,
            "w_ce": self.w_ce,
            "w_dice": self.w_dice,
            "smooth": self.smooth,
        }


# --------------------------------------------------------------------------- factories
# Thin constructors with the names configs use; the classes document the maths.


def bce(per_image: bool = False, name: str = "bce") -> BCELoss:
    """Binary cross-entropy.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        per_image: one value per image instead of one for the batch.
        name: the loss name shown in training logs.

    Returns:
        A :class:`BCELoss`.
    """
    return BCELoss(per_image=per_image, name=name)


def soft_dice_loss(
    smooth: float = 1.0, per_image: bool = False, name: str = "soft_dice_loss"
) -> SoftDiceLoss:
    """Soft Dice loss ``1 - Dice``.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        smooth: additive smoothing (empty truth predicted empty scores 0).
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`SoftDiceLoss`.
    """
    return SoftDiceLoss(smooth=smooth, per_image=per_image, name=name)


def bce_dice_loss(
    w_bce: float = 1.0,
    w_dice: float = 1.0,
    smooth: float = 1.0,
    per_image: bool = False,
    name: str = "bce_dice_loss",
) -> BCEDiceLoss:
    """Weighted sum of binary cross-entropy and soft Dice loss.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        w_bce: weight of the cross-entropy.
        w_dice: weight of the Dice loss.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`BCEDiceLoss`.
    """
    return BCEDiceLoss(w_bce=w_bce, w_dice=w_dice, smooth=smooth, per_image=per_image, name=name)


def log_dice_loss(
    exponent: float = 0.3, smooth: float = 1.0, per_image: bool = False, name: str = "log_dice_loss"
) -> LogDiceLoss:
    """``(−ln Dice)^γ``, the Dice part of Wong et al.'s exponential logarithmic loss.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        exponent: γ (0.3 in Wong et al., 2018).
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`LogDiceLoss`.
    """
    return LogDiceLoss(exponent=exponent, smooth=smooth, per_image=per_image, name=name)


def weighted_dice_loss(
    weight_map: str | Callable = "channel",
    smooth: float = 1.0,
    per_image: bool = False,
    name: str = "weighted_dice_loss",
) -> WeightedDiceLoss:
    """Soft Dice loss with per-pixel weights.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        weight_map: ``"channel"`` (weights are ``y_true``'s extra last channel) or a callable
            ``y_true -> weights`` such as :class:`BorderWeights`.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`WeightedDiceLoss`.

    Raises:
        ValueError: ``weight_map`` neither ``"channel"`` nor callable.
    """
    return WeightedDiceLoss(weight_map=weight_map, smooth=smooth, per_image=per_image, name=name)


def tversky_loss(
    alpha: float = 0.7,
    beta: float = 0.3,
    smooth: float = 1.0,
    per_image: bool = False,
    name: str = "tversky_loss",
) -> TverskyLoss:
    """Tversky loss ``1 - TP / (TP + α·FN + β·FP)`` (smoothed).

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        alpha: weight of false negatives.
        beta: weight of false positives.
        smooth: additive smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`TverskyLoss`.
    """
    return TverskyLoss(alpha=alpha, beta=beta, smooth=smooth, per_image=per_image, name=name)


def focal_tversky_loss(
    alpha: float = 0.7,
    beta: float = 0.3,
    gamma: float = 0.75,
    smooth: float = 1.0,
    per_image: bool = False,
    name: str = "focal_tversky_loss",
) -> FocalTverskyLoss:
    """Focal Tversky loss ``(1 - TI)^gamma``; ``gamma=1`` is the Tversky loss.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        alpha: weight of false negatives.
        beta: weight of false positives.
        gamma: the exponent (0.75 = Abraham & Khan's 1/γ with γ = 4/3).
        smooth: additive smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`FocalTverskyLoss`.
    """
    return FocalTverskyLoss(
        alpha=alpha, beta=beta, gamma=gamma, smooth=smooth, per_image=per_image, name=name
    )


def categorical_ce_dice_loss(
    num_classes: int,
    exclude_background: bool = True,
    class_weights=None,
    w_ce: float = 1.0,
    w_dice: float = 1.0,
    smooth: float = 1.0,
    per_image: bool = False,
    name: str = "categorical_ce_dice_loss",
) -> CategoricalCEDiceLoss:
    """Categorical cross-entropy plus multiclass soft Dice (background left out by default).

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        num_classes: number of classes, background included.
        exclude_background: leave class 0 out of the Dice term.
        class_weights: None or one non-negative weight per class.
        w_ce: weight of the cross-entropy.
        w_dice: weight of the Dice loss.
        smooth: Dice smoothing.
        per_image: one value per image instead of batch-pooled sums.
        name: the loss name shown in training logs.

    Returns:
        A :class:`CategoricalCEDiceLoss`.

    Raises:
        ValueError: fewer than 2 classes or a wrong number of class weights.
    """
    return CategoricalCEDiceLoss(
        num_classes,
        exclude_background=exclude_background,
        class_weights=class_weights,
        w_ce=w_ce,
        w_dice=w_dice,
        smooth=smooth,
        per_image=per_image,
        name=name,
    )


LOSSES: dict[str, Callable[..., keras.losses.Loss]] = {
    "bce": bce,
    "soft_dice": soft_dice_loss,
    "bce_dice": bce_dice_loss,
    "log_dice": log_dice_loss,
    "weighted_dice": weighted_dice_loss,
    "tversky": tversky_loss,
    "focal_tversky": focal_tversky_loss,
    "categorical_ce_dice": categorical_ce_dice_loss,
}
"""Loss name → factory."""


def get_loss(loss: str, /, **kwargs: Any) -> keras.losses.Loss:
    """A loss by name, for configs that name their loss by string.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        loss: a key of :data:`LOSSES`.
        **kwargs: the factory's arguments (e.g. ``smooth=1.0``, ``num_classes=3``).

    Returns:
        The loss object.

    Raises:
        ValueError: unknown name (or bad arguments).
    """
    if loss not in LOSSES:
        raise _expected(loss, list(LOSSES), "loss")
    return LOSSES[loss](**kwargs)


# --------------------------------------------------------------------------- metrics


class _ConfusionMetric(keras.metrics.Metric):
    """Thresholded confusion counts (tp, fp, fn, tn) of the lesion class over an epoch.

    The prediction is binarised: ``y_pred >= threshold`` for a single (sigmoid) channel,
    the arg-max class for a softmax output. ``class_id`` picks one channel; None means the
    only channel when there is one, and every channel but the background (0) pooled when
    there are several. ``sample_weight`` of shape (B,) or (B, H, W) weighs the counts.
    A ratio whose denominator is 0 (e.g. no lesion anywhere and none predicted) is 1: there
    was nothing to get wrong.
    """

    default_name = "confusion"

    def __init__(
        self,
        threshold: float = 0.5,
        class_id: int | None = None,
        name: str | None = None,
        dtype=None,
    ):
        super().__init__(name=name or self.default_name, dtype=dtype)
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold!r}")
        if class_id is not None and (not isinstance(class_id, int) or class_id < 0):
            raise ValueError(
                f"class_id must be None or an int >= 0. Received: class_id={class_id!r}"
            )
        self.threshold = float(threshold)
        self.class_id = class_id
        self.tp = self.add_variable(shape=(), initializer="zeros", name="tp")
        self.fp = self.add_variable(shape=(), initializer="zeros", name="fp")
        self.fn = self.add_variable(shape=(), initializer="zeros", name="fn")
        self.tn = self.add_variable(shape=(), initializer="zeros", name="tn")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = _align(y_true, y_pred)
        channels = y_pred.shape[-1]
        if channels == 1:
            pred = ops.cast(y_pred >= self.threshold, self.dtype)
        else:
            pred = ops.one_hot(ops.argmax(y_pred, axis=-1), channels, dtype=self.dtype)
        true = ops.cast(y_true >= 0.5, self.dtype)
        if self.class_id is not None:
            if channels is not None and self.class_id >= channels:
                raise ValueError(f"class_id={self.class_id} but y_pred has {channels} channels.")
            pred = pred[..., self.class_id : self.class_id + 1]
            true = true[..., self.class_id : self.class_id + 1]
        elif channels != 1:
            pred, true = pred[..., 1:], true[..., 1:]
        weight = ops.ones_like(true)
        if sample_weight is not None:
            sw = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
            while len(sw.shape) < len(true.shape):
                sw = ops.expand_dims(sw, -1)
            weight = weight * sw
        self.tp.assign_add(ops.sum(weight * true * pred))
        self.fp.assign_add(ops.sum(weight * (1.0 - true) * pred))
        self.fn.assign_add(ops.sum(weight * true * (1.0 - pred)))
        self.tn.assign_add(ops.sum(weight * (1.0 - true) * (1.0 - pred)))

    @staticmethod
    def _ratio(numerator, denominator):
        # Variables go through convert_to_tensor: JAX's ones_like rejects a Keras Variable.
        numerator = ops.convert_to_tensor(numerator)
        denominator = ops.convert_to_tensor(denominator)
        return ops.where(
            denominator > 0, numerator / ops.maximum(denominator, 1e-12), ops.ones_like(numerator)
        )

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "class_id": self.class_id}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DiceMetric(_ConfusionMetric):
    """Dice ``2TP / (2TP + FP + FN)`` of the lesion class, pooled over the epoch.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        threshold: probability above which a pixel counts as lesion (sigmoid outputs).
        class_id: channel to score (see :class:`_ConfusionMetric`).
        name, dtype: as for ``keras.metrics.Metric``.
    """

    default_name = "dice"

    def result(self):
        return self._ratio(2.0 * self.tp, 2.0 * self.tp + self.fp + self.fn)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class IoUMetric(_ConfusionMetric):
    """Intersection over union (Jaccard) ``TP / (TP + FP + FN)``, pooled over the epoch.

    Introduced in notebooks/04_unet_vs_resunet.ipynb. Arguments as :class:`DiceMetric`.
    """

    default_name = "iou"

    def result(self):
        return self._ratio(self.tp, self.tp + self.fp + self.fn)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Sensitivity(_ConfusionMetric):
    """Sensitivity (recall) ``TP / (TP + FN)``, pooled over the epoch.

    Introduced in notebooks/04_unet_vs_resunet.ipynb. Arguments as :class:`DiceMetric`.
    """

    default_name = "sensitivity"

    def result(self):
        return self._ratio(self.tp, self.tp + self.fn)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Specificity(_ConfusionMetric):
    """Specificity ``TN / (TN + FP)``, pooled over the epoch.

    Introduced in notebooks/04_unet_vs_resunet.ipynb. Arguments as :class:`DiceMetric`.
    """

    default_name = "specificity"

    def result(self):
        return self._ratio(self.tn, self.tn + self.fp)
