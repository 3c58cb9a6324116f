"""Segmentation losses, written with ``keras.ops`` so they run on every backend.

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
``keras.saving.load_model(path, safe_mode=True)``) and takes, besides its own arguments,
``per_image`` (above), ``name`` (shown in training logs; instances also carry it as
``__name__`` for code that expects plain functions), ``reduction`` and ``dtype`` (as for
``keras.losses.Loss``). Each has a lower-case alias, the name configs use
(``soft_dice_loss(...)`` is ``SoftDiceLoss(...)``); :data:`LOSSES` and :func:`get_loss` look
them up by name.

The epoch-pooled Keras metrics (:class:`~strokekit.metrics.DiceMetric`, ``IoUMetric``,
``Sensitivity``, ``Specificity``) live in :mod:`strokekit.metrics` beside the NumPy metrics;
they are imported here too, so ``from strokekit.losses import DiceMetric`` keeps working and
importing this module registers them for loading saved models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from .errors import expected_one_of as _expected
from .metrics import DiceMetric, IoUMetric, Sensitivity, Specificity, _align  # noqa: F401  (re-exported)

_PACKAGE = "strokekit"



# --------------------------------------------------------------------------- helpers


def _pixel_mean(values, per_image: bool):
    """Mean over pixels (and channels): a scalar for the batch, or one value per image."""
    if per_image:
        return ops.mean(values, axis=tuple(range(1, len(values.shape))))
    return ops.mean(values)


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
    return _pixel_mean(-(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p)), per_image)


def _reduce_channels(values):
    # (C,) -> scalar (batch-pooled), (B, C) -> (B,) (per image)
    return ops.mean(values, axis=-1)


def _non_negative(**values) -> dict[str, float]:
    for key, value in values.items():
        if not float(value) >= 0:
            raise ValueError(f"{key} must be >= 0. Received: {key}={value!r}")
    return {key: float(value) for key, value in values.items()}


class _StrokeLoss(keras.losses.Loss):
    """Shared plumbing: a default name, a ``__name__``, the loss's own arguments in its config."""

    default_name = "loss"

    def __init__(
        self,
        per_image: bool = False,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        dtype=None,
        params: dict[str, Any] | None = None,
    ):
        # params: the subclass's own arguments, already checked (see _keep).
        super().__init__(name=name or self.default_name, reduction=reduction, dtype=dtype)
        self.per_image = bool(per_image)
        self.__name__ = self.name
        self._config_keys: tuple[str, ...] = ()
        self._keep(**(params or {}))

    def _keep(self, **values) -> None:
        """Stores the loss's own arguments as attributes, in the order its config lists them."""
        for key, value in values.items():
            setattr(self, key, value)
        self._config_keys += tuple(values)

    def _extra_config(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._config_keys}

    def get_config(self):
        return {**super().get_config(), "per_image": self.per_image, **self._extra_config()}

    def _aligned_dice(self, y_true, y_pred, weights=None):
        """Soft Dice per channel of the aligned pair, with this loss's smoothing."""
        return _dice_per_channel(y_true, y_pred, self.smooth, self.per_image, weights=weights)


# --------------------------------------------------------------------------- losses


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BCELoss(_StrokeLoss):
    """Binary cross-entropy averaged over pixels and channels (probability inputs)."""

    default_name = "bce"

    def call(self, y_true, y_pred):
        return _bce(*_align(y_true, y_pred), self.per_image)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftDiceLoss(_StrokeLoss):
    """``1 - (2·Σtp + s) / (Σt + Σp + s)`` per channel, averaged over channels.

    Args:
        smooth: the additive ``s``; keeps empty-vs-empty at loss 0.
    """

    default_name = "soft_dice_loss"

    def __init__(self, smooth: float = 1.0, **kwargs):
        super().__init__(params=_non_negative(smooth=smooth), **kwargs)

    def call(self, y_true, y_pred):
        return 1.0 - _reduce_channels(self._aligned_dice(*_align(y_true, y_pred)))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BCEDiceLoss(_StrokeLoss):
    """``w_bce · BCE + w_dice · (1 - soft Dice)``: pixel-wise and overlap terms together.

    Args:
        w_bce, w_dice: weights of the cross-entropy and of the Dice loss.
        smooth: Dice smoothing.
    """

    default_name = "bce_dice_loss"

    def __init__(self, w_bce: float = 1.0, w_dice: float = 1.0, smooth: float = 1.0, **kwargs):
        super().__init__(params=_non_negative(w_bce=w_bce, w_dice=w_dice, smooth=smooth), **kwargs)

    def call(self, y_true, y_pred):
        y_true, y_pred = _align(y_true, y_pred)
        dice = _reduce_channels(self._aligned_dice(y_true, y_pred))
        return self.w_bce * _bce(y_true, y_pred, self.per_image) + self.w_dice * (1.0 - dice)


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
    """

    default_name = "log_dice_loss"

    def __init__(self, exponent: float = 0.3, smooth: float = 1.0, **kwargs):
        super().__init__(params=_non_negative(exponent=exponent, smooth=smooth), **kwargs)

    def call(self, y_true, y_pred):
        dice = self._aligned_dice(*_align(y_true, y_pred))
        neg_log = ops.maximum(-ops.log(ops.clip(dice, keras.config.epsilon(), 1.0)), 0.0)
        return _reduce_channels(_safe_power(neg_log, self.exponent))


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
        _non_negative(border_weight=border_weight)
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
        self._keep(weight_map=weight_map, **_non_negative(smooth=smooth))

    def call(self, y_true, y_pred):
        if isinstance(self.weight_map, str):
            y_true = ops.convert_to_tensor(y_true)
            weights = ops.cast(y_true[..., -1:], y_pred.dtype)
            y_true, y_pred = _align(y_true[..., :-1], y_pred)
        else:
            y_true, y_pred = _align(y_true, y_pred)
            weights = ops.cast(self.weight_map(y_true), y_pred.dtype)
        return 1.0 - _reduce_channels(self._aligned_dice(y_true, y_pred, weights))

    def _extra_config(self):
        config = super()._extra_config()
        if not isinstance(self.weight_map, str):
            config["weight_map"] = keras.saving.serialize_keras_object(self.weight_map)
        return config


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
    """

    default_name = "tversky_loss"

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, smooth: float = 1.0, **kwargs):
        super().__init__(params=_non_negative(alpha=alpha, beta=beta, smooth=smooth), **kwargs)

    def _one_minus_ti(self, y_true, y_pred):
        """``1 - TI`` per channel: shape (C,) pooled, or (B, C) per image."""
        ti = _tversky_index(*_align(y_true, y_pred), self.alpha, self.beta, self.smooth, self.per_image)
        return ops.maximum(1.0 - ti, 0.0)

    def call(self, y_true, y_pred):
        return _reduce_channels(self._one_minus_ti(y_true, y_pred))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FocalTverskyLoss(TverskyLoss):
    """Focal Tversky loss ``(1 - TI)^gamma`` per channel, averaged over channels.

    Abraham & Khan, "A novel focal Tversky loss function with improved attention U-Net for
    lesion segmentation", ISBI 2019, write the exponent as 1/γ with γ = 4/3 best; ``gamma``
    here is the exponent itself, so the default 0.75 is their setting. With ``gamma < 1``
    well-segmented images contribute less than hard ones; ``gamma == 1`` is exactly
    :class:`TverskyLoss`.

    Args:
        alpha, beta, smooth: as :class:`TverskyLoss`.
        gamma: the exponent.
    """

    default_name = "focal_tversky_loss"

    def __init__(self, alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75, smooth: float = 1.0, **kwargs):
        super().__init__(alpha=alpha, beta=beta, smooth=smooth, **kwargs)
        self._keep(**_non_negative(gamma=gamma))

    def call(self, y_true, y_pred):
        return _reduce_channels(_safe_power(self._one_minus_ti(y_true, y_pred), self.gamma))


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
        num_classes: number of classes ``C`` (channels of ``y_pred``), background included.
        exclude_background: leave class 0 out of the Dice term.
        class_weights: None (all 1) or ``C`` non-negative numbers.
        w_ce: weight of the cross-entropy.
        w_dice: weight of the Dice loss.
        smooth: Dice smoothing.

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
        weights = _non_negative(w_ce=w_ce, w_dice=w_dice, smooth=smooth)
        self._keep(
            num_classes=num_classes,
            exclude_background=bool(exclude_background),
            class_weights=class_weights,
            **weights,
        )

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
        ce = _pixel_mean(pixel_ce, self.per_image)
        start = 1 if self.exclude_background else 0
        dice = self._aligned_dice(y_true, y_pred)[..., start:]
        dice_weights = weights[start:]
        mean_dice = ops.sum(dice * dice_weights, axis=-1) / ops.maximum(ops.sum(dice_weights), eps)
        return self.w_ce * ce + self.w_dice * (1.0 - mean_dice)


# --------------------------------------------------------------------------- names
# The lower-case names configs use; each is its class (``soft_dice_loss(...)`` builds a
# ``SoftDiceLoss``), so the arguments and the maths are documented once, on the class.

bce = BCELoss
soft_dice_loss = SoftDiceLoss
bce_dice_loss = BCEDiceLoss
log_dice_loss = LogDiceLoss
weighted_dice_loss = WeightedDiceLoss
tversky_loss = TverskyLoss
focal_tversky_loss = FocalTverskyLoss
categorical_ce_dice_loss = CategoricalCEDiceLoss

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
"""Loss name → loss class."""


def get_loss(loss: str, /, **kwargs: Any) -> keras.losses.Loss:
    """A loss by name, for configs that name their loss by string.

    Args:
        loss: a key of :data:`LOSSES`.
        **kwargs: the loss's arguments (e.g. ``smooth=1.0``, ``num_classes=3``).

    Returns:
        The loss object.

    Raises:
        ValueError: unknown name (or bad arguments).
    """
    if loss not in LOSSES:
        raise _expected(loss, list(LOSSES), "loss")
    return LOSSES[loss](**kwargs)
