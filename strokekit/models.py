"""Segmentation networks: U-Net, residual U-Net, U-Net on a pretrained encoder, multi-input U-Net.

Introduced in notebooks/04_unet_vs_resunet.ipynb (``unet``, ``resunet``, ``build_model``,
``PRESETS``, ``build_preset``, ``count_params``, ``encoder_blocks``);
notebooks/05_transfer_learning.ipynb adds ``pretrained_unet``, ``resolve_imagenet_weights``,
``imagenet_unet`` and ``set_batchnorm_momentum``,
notebooks/08_ctp_core_penumbra.ipynb ``multi_input_unet``.

Every builder is a Keras 3 functional model and runs on any backend (TensorFlow, JAX,
PyTorch). Every layer has a fixed, readable name so that a notebook can freeze or inspect it
by name:

* encoder level ``i`` (1 = full resolution): ``enc{i}_conv1``, ``enc{i}_bn1``, ``enc{i}_act1``,
  ``enc{i}_conv2``, ..., ``enc{i}_pool``;
* the deepest level: ``bottleneck_conv1``, ..., ``bottleneck_drop``;
* decoder level ``i`` (joins the skip of ``enc{i}``): ``dec{i}_up``, ``dec{i}_concat``,
  ``dec{i}_conv1``, ...;
* the output layer: ``head`` (sigmoid for one class, softmax for more).

``filters`` lists the widths of the encoder levels, the last being the bottleneck, so
``filters=(64, 128, 256, 512, 1024)`` is the classic U-Net of Ronneberger et al. (2015) with
four poolings and ~31M parameters (the study's best model, with leaky ReLU).

Activation notes:

* ``leaky_relu`` uses a negative slope of 0.1 (:data:`LEAKY_RELU_SLOPE`). Keras' own defaults
  differ between entry points (0.3 for ``layers.LeakyReLU``, 0.2 for
  ``activations.leaky_relu``), so the slope is fixed here: a result must not depend on which
  entry point was used. 0.1 is the common choice in segmentation and detection networks:
  large enough that units with negative input keep a useful gradient (with a few dozen
  training slices a plain ReLU unit that dies early never recovers), small enough that the
  unit stays clearly non-linear.
* ``selu`` is only self-normalising (Klambauer et al., 2017) with LeCun-normal weights, no
  batch normalisation and, for dropout, ``AlphaDropout`` (which keeps the activations' mean
  and variance where ordinary dropout shifts them). The builders switch to all three for
  ``selu``; asking for ``batch_norm=True`` together with ``selu`` raises ValueError.
  Skip connections and residual sums still move the activations away from the fixed point,
  so SELU in a U-Net is an approximation of the theory, which the notebook discusses.
* the other activations use He-normal weights, the initialiser derived for ReLU-like units.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
from keras import layers

from strokekit.errors import DataError
from strokekit.errors import expected_one_of as _expected

ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu", "selu", "gelu", "swish")
"""Activation names the builders accept (resolved by Keras, never evaluated as code)."""

LEAKY_RELU_SLOPE = 0.1
"""Negative slope of ``leaky_relu`` (see the module docstring for why)."""

UPSAMPLE_MODES: tuple[str, ...] = ("transpose", "bilinear", "nearest")
"""``transpose``: learned 2x2 transposed convolution; the others: fixed interpolation + 2x2 conv."""

ENCODERS: tuple[str, ...] = ("vgg16", "resnet50")
"""Pretrained encoders available to :func:`pretrained_unet`."""

FUSIONS: tuple[str, ...] = ("early",)
"""How :func:`multi_input_unet` joins its image inputs."""

IMAGENET_WEIGHT_FILES: dict[str, str] = {
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
}
"""File names Keras gives the ImageNet "no top" weights in its cache folder."""

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")



# --------------------------------------------------------------------------- building blocks


class _Seeds:
    """Hands out distinct initialiser seeds so a seeded model is reproducible layer by layer.

    One fixed seed shared by every initialiser would give same-shaped layers identical
    starting weights, hence one seed per layer, counted from the model's seed.
    """

    def __init__(self, seed: int | None):
        self.base = seed
        self.count = 0

    def next(self) -> int | None:
        if self.base is None:
            return None
        self.count += 1
        return int(self.base) + self.count


@dataclasses.dataclass(frozen=True)
class _BlockConfig:
    activation: str
    batch_norm: bool
    kernel_size: int
    dilation_rate: int
    seeds: _Seeds
    bn_momentum: float = 0.99

    def batch_norm_layer(self, name: str) -> layers.Layer:
        return layers.BatchNormalization(momentum=self.bn_momentum, name=name)

    def initializer(self):
        seed = self.seeds.next()
        if self.activation == "selu":
            return keras.initializers.LecunNormal(seed=seed)
        return keras.initializers.HeNormal(seed=seed)

    def activation_layer(self, name: str) -> layers.Layer:
        if self.activation == "leaky_relu":
            return layers.LeakyReLU(negative_slope=LEAKY_RELU_SLOPE, name=name)
        return layers.Activation(self.activation, name=name)

    def dropout_layer(self, rate: float, name: str) -> layers.Layer:
        if self.activation == "selu":
            return layers.AlphaDropout(rate, seed=self.seeds.next(), name=name)
        return layers.Dropout(rate, seed=self.seeds.next(), name=name)

    def conv(self, x, filters: int, name: str, kernel_size: int | None = None, dilated=True):
        return layers.Conv2D(
            filters,
            kernel_size or self.kernel_size,
            padding="same",
            dilation_rate=self.dilation_rate if dilated else 1,
            use_bias=not self.batch_norm,  # batch norm's offset makes a bias redundant
            kernel_initializer=self.initializer(),
            name=name,
        )(x)


def _conv_bn_act(x, filters: int, prefix: str, index: int, cfg: _BlockConfig):
    x = cfg.conv(x, filters, f"{prefix}_conv{index}")
    if cfg.batch_norm:
        x = cfg.batch_norm_layer(f"{prefix}_bn{index}")(x)
    return cfg.activation_layer(f"{prefix}_act{index}")(x)


def _plain_block(x, filters: int, prefix: str, cfg: _BlockConfig):
    x = _conv_bn_act(x, filters, prefix, 1, cfg)
    return _conv_bn_act(x, filters, prefix, 2, cfg)


def _residual_block(x, filters: int, prefix: str, cfg: _BlockConfig):
    # He et al. (2016) block: the sum is taken before the second activation; a 1x1
    # projection matches the channels when they change (every block of a U-Net but the
    # ones whose input already has `filters` channels).
    shortcut = x
    y = _conv_bn_act(x, filters, prefix, 1, cfg)
    y = cfg.conv(y, filters, f"{prefix}_conv2")
    if cfg.batch_norm:
        y = cfg.batch_norm_layer(f"{prefix}_bn2")(y)
    if x.shape[-1] != filters:
        shortcut = cfg.conv(x, filters, f"{prefix}_proj", kernel_size=1, dilated=False)
        if cfg.batch_norm:
            shortcut = cfg.batch_norm_layer(f"{prefix}_proj_bn")(shortcut)
    y = layers.Add(name=f"{prefix}_add")([y, shortcut])
    return cfg.activation_layer(f"{prefix}_act2")(y)


def _upsample(x, filters: int, prefix: str, mode: str, cfg: _BlockConfig):
    if mode == "transpose":
        return layers.Conv2DTranspose(
            filters,
            2,
            strides=2,
            padding="same",
            kernel_initializer=cfg.initializer(),
            name=f"{prefix}_up",
        )(x)
    x = layers.UpSampling2D(2, interpolation=mode, name=f"{prefix}_up")(x)
    # The "up-convolution" of Ronneberger et al.: halves the channels after interpolation.
    return layers.Conv2D(
        filters, 2, padding="same", kernel_initializer=cfg.initializer(), name=f"{prefix}_upconv"
    )(x)


def _head(x, num_classes: int, seeds: _Seeds, head_bias: float | None = None):
    # head_bias: the starting logit of every lesion class (background's stays 0), e.g. the log-odds
    # of the lesion share of pixels: the network then starts by predicting "rare lesion" instead of
    # "coin flip" and skips the phase in which it only learns that most pixels are background.
    bias = "zeros"
    if head_bias is not None:
        start = [float(head_bias)] * num_classes
        if num_classes > 1:
            start[0] = 0.0
        bias = keras.initializers.Constant(start)
    return layers.Conv2D(
        num_classes,
        1,
        activation="sigmoid" if num_classes == 1 else "softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=seeds.next()),
        bias_initializer=bias,
        dtype="float32",  # probabilities stay float32 under a mixed-precision policy
        name="head",
    )(x)


# --------------------------------------------------------------------------- validation


def _check_activation(activation: str, batch_norm: bool) -> None:
    if activation not in ACTIVATIONS:
        raise _expected(activation, ACTIVATIONS, "activation")
    if activation == "selu" and batch_norm:
        raise ValueError(
            "activation='selu' is self-normalising and must not be mixed with batch "
            "normalisation, which replaces the statistics SELU relies on. Use batch_norm=False "
            "(or another activation). Received: activation='selu', batch_norm=True"
        )


def _check_momentum(bn_momentum) -> None:
    if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0.0 <= bn_momentum < 1.0:
        raise ValueError(f"bn_momentum must be a number in [0, 1). Received: bn_momentum={bn_momentum!r}")


def _check_filters(filters: Sequence[int], arg: str = "filters", min_len: int = 2) -> tuple:
    filters = tuple(filters)
    if len(filters) < min_len or not all(
        isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters
    ):
        raise ValueError(
            f"{arg} must be a sequence of at least {min_len} positive ints (encoder widths, "
            f"the last one the bottleneck). Received: {arg}={filters!r}"
        )
    return filters


def _check_common(num_classes, dropout, kernel_size, dilation_rate, upsample) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive int. Received: num_classes={num_classes!r}"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(
            f"kernel_size must be a positive int. Received: kernel_size={kernel_size!r}"
        )
    if not isinstance(dilation_rate, int) or dilation_rate < 1:
        raise ValueError(
            f"dilation_rate must be a positive int. Received: dilation_rate={dilation_rate!r}"
        )
    if upsample not in UPSAMPLE_MODES:
        raise _expected(upsample, UPSAMPLE_MODES, "upsample")


def _check_image_shape(input_shape, divisor: int, why: str, arg: str = "input_shape") -> tuple:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(d is None or (isinstance(d, int) and d > 0) for d in shape):
        raise ValueError(
            f"{arg} must be (height, width, channels) with positive ints (height and width may "
            f"be None). Received: {arg}={shape!r}"
        )
    if shape[2] is None:
        raise ValueError(f"{arg} needs a known number of channels. Received: {arg}={shape!r}")
    for side in shape[:2]:
        if side is not None and side % divisor:
            raise ValueError(
                f"{arg} height and width must be multiples of {divisor} ({why}). "
                f"Received: {arg}={shape!r}"
            )
    return shape


# --------------------------------------------------------------------------- U-Net family


def _unet_body(
    x,
    filters,
    cfg: _BlockConfig,
    block,
    dropout: float,
    upsample: str,
    bottleneck_hook: Callable | None = None,
):
    skips = []
    for level, width in enumerate(filters[:-1], start=1):
        x = block(x, width, f"enc{level}", cfg)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = block(x, filters[-1], "bottleneck", cfg)
    if dropout > 0:
        # Ronneberger et al. put dropout "at the end of the contracting path": the widest,
        # most over-parameterised layers, which over-fit first on a few dozen slices.
        x = cfg.dropout_layer(dropout, "bottleneck_drop")(x)
    if bottleneck_hook is not None:
        x = bottleneck_hook(x)
    for level in range(len(filters) - 1, 0, -1):
        width = filters[level - 1]
        x = _upsample(x, width, f"dec{level}", upsample, cfg)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level - 1]])
        x = block(x, width, f"dec{level}", cfg)
    return x


def unet(
    input_shape: tuple = (128, 128, 1),
    num_classes: int = 1,
    filters: Sequence[int] = (16, 32, 64, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool | None = False,
    kernel_size: int = 3,
    dilation_rate: int = 1,
    upsample: str = "transpose",
    seed: int | None = None,
    name: str = "unet",
    bn_momentum: float = 0.99,
    head_bias: float | None = None,
    residual: bool = False,
) -> keras.Model:
    """U-Net (Ronneberger et al., 2015): two convolutions per level, skip connections.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        input_shape: (height, width, channels); height and width must be multiples of
            ``2 ** (len(filters) - 1)`` (or None).
        num_classes: output channels; 1 gives a sigmoid head, more a softmax head.
        filters: widths of the encoder levels, the last being the bottleneck.
        activation: one of :data:`ACTIVATIONS`.
        dropout: rate of the dropout after the bottleneck (0 = none).
        batch_norm: batch normalisation after every convolution (not with ``selu``); None
            means batch norm for every activation except ``selu`` (:func:`resunet`'s default).
        kernel_size: side of the convolution kernels.
        dilation_rate: dilation of the 3x3 (kernel_size) convolutions.
        upsample: one of :data:`UPSAMPLE_MODES`.
        seed: seed for the weight initialisers and dropout; None leaves them to Keras'
            global seed (``strokekit.config.seed_everything``).
        name: model name.
        bn_momentum: momentum of the batch-norm running statistics (Keras' 0.99 averages over
            about 100 steps; a run of a few hundred steps predicts better with 0.9).
        head_bias: starting logit of the lesion class(es) in the head, None for 0 (a 0.5
            probability everywhere). ``-4`` starts at a lesion probability of 0.018, near the
            share of lesion pixels; short runs on rare lesions then start learning at once.
        residual: residual blocks at every level, as :func:`resunet`.

    Returns:
        An uncompiled ``keras.Model`` mapping ``(B, H, W, C)`` to ``(B, H, W, num_classes)``.

    Raises:
        ValueError: unknown activation or upsampling mode, selu with batch norm, a bad shape.
    """
    if batch_norm is None:
        batch_norm = activation != "selu"
    filters = _check_filters(filters)
    _check_activation(activation, batch_norm)
    _check_common(num_classes, dropout, kernel_size, dilation_rate, upsample)
    n_pool = len(filters) - 1
    shape = _check_image_shape(
        input_shape, 2**n_pool, f"{n_pool} poolings for {len(filters)} filter levels"
    )
    _check_momentum(bn_momentum)
    cfg = _BlockConfig(activation, bool(batch_norm), kernel_size, dilation_rate, _Seeds(seed), float(bn_momentum))
    inputs = keras.Input(shape=shape, name="image")
    block = _residual_block if residual else _plain_block
    x = _unet_body(inputs, filters, cfg, block, float(dropout), upsample)
    return keras.Model(inputs, _head(x, num_classes, cfg.seeds, head_bias), name=name)


def resunet(*args: Any, batch_norm: bool | None = None, name: str = "resunet", **kwargs: Any) -> keras.Model:
    """Residual U-Net (ResU-Net, Zhang et al., 2018): every level is a residual block.

    Each block is conv-BN-act, conv-BN, plus a shortcut (a 1x1 convolution with batch norm
    when the number of channels changes, else the identity), then the activation. Layer
    names as in :func:`unet`, plus ``{prefix}_proj``, ``{prefix}_proj_bn``, ``{prefix}_add``.
    It is ``unet(..., residual=True)`` with batch norm on by default.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        *args: :func:`unet`'s first arguments (``input_shape``, ``num_classes``, ``filters``,
            ``activation``, ``dropout``), in that order.
        batch_norm: None (default) means batch norm for every activation except ``selu``,
            which is self-normalising; True with ``selu`` raises ValueError.
        name: model name.
        **kwargs: any other argument of :func:`unet` but ``residual``.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: as :func:`unet`.
    """
    return unet(*args, batch_norm=batch_norm, name=name, residual=True, **kwargs)


# --------------------------------------------------------------------------- pretrained encoders


def _keras_cache_dir() -> Path:
    # The same rule Keras uses: $KERAS_HOME, else ~/.keras; files live in its models/.
    home = os.environ.get("KERAS_HOME")
    base = Path(home) if home else Path(os.path.expanduser("~")) / ".keras"
    return base / "models"


def resolve_imagenet_weights(encoder: str, weights: str | os.PathLike | None) -> str | None:
    """Finds ImageNet weights for an encoder on this machine, never downloading anything.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        encoder: one of :data:`ENCODERS`.
        weights: ``"imagenet"`` (look in the Keras cache, ``$KERAS_HOME/models`` or
            ``~/.keras/models``), None (random weights, no warning), or a path to the ``.h5``
            file or to a folder holding it under its Keras name
            (:data:`IMAGENET_WEIGHT_FILES`).

    Returns:
        The path of the weights file to hand to ``keras.applications``, or None for random
        initialisation. When ``weights="imagenet"`` and the cache lacks the file, returns None
        and emits one ``UserWarning`` (the documented fallback: the encoder starts from
        random weights).

    Raises:
        ValueError: unknown encoder.
        DataError: ``weights`` names a path that does not exist or lacks the file.
    """
    if encoder not in ENCODERS:
        raise _expected(encoder, ENCODERS, "encoder")
    if weights is None:
        return None
    file_name = IMAGENET_WEIGHT_FILES[encoder]
    if isinstance(weights, str) and weights == "imagenet":
        cached = _keras_cache_dir() / file_name
        if cached.is_file():
            return str(cached)
        warnings.warn(
            f"ImageNet weights for {encoder} were not found at {cached} and cannot be "
            f"downloaded here. Put {file_name} in that folder (or set KERAS_HOME, or pass "
            f"weights='path/to/{file_name}'). The {encoder} encoder starts from random weights.",
            UserWarning,
            stacklevel=2,
        )
        return None
    path = Path(os.fspath(weights))
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise DataError(
            f"no {encoder} weights file here; expected {file_name} (ImageNet, no top) or a "
            "folder holding it",
            path,
        )
    return str(path)


@keras.saving.register_keras_serializable(package="strokekit")
class EncoderPreprocess(layers.Layer):
    """Maps [0, 1] images to the input a ``keras.applications`` encoder was trained on.

    strokekit images are windowed to [0, 1]; the applications expect 0–255 RGB and apply
    their own ``preprocess_input`` (for VGG16 and ResNet50: RGB→BGR and ImageNet-mean
    subtraction). The layer scales by ``input_scale`` and calls exactly that function, so the
    model carries its preprocessing and can be fed strokekit images directly.

    Args:
        encoder: one of :data:`ENCODERS`.
        input_scale: factor taking the model's input range to 0–255.
        **kwargs: ``keras.layers.Layer`` arguments (name, dtype).
    """

    def __init__(self, encoder: str = "vgg16", input_scale: float = 255.0, **kwargs):
        super().__init__(**kwargs)
        if encoder not in ENCODERS:
            raise _expected(encoder, ENCODERS, "encoder")
        self.encoder = encoder
        self.input_scale = float(input_scale)

    def call(self, inputs):
        module = getattr(keras.applications, self.encoder)
        return module.preprocess_input(inputs * self.input_scale)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "encoder": self.encoder, "input_scale": self.input_scale}


@dataclasses.dataclass(frozen=True)
class _EncoderSpec:
    application: str
    skips: tuple  # shallow to deep, one per decoder level; None = no skip at that level
    bottleneck: str
    decoder_filters: tuple  # deep to shallow
    divisor: int


_ENCODER_SPECS = {
    "vgg16": _EncoderSpec(
        application="VGG16",
        skips=("block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3"),
        bottleneck="block5_conv3",
        decoder_filters=(256, 128, 64, 32),
        divisor=16,
    ),
    "resnet50": _EncoderSpec(
        application="ResNet50",
        skips=(None, "conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out"),
        bottleneck="conv5_block3_out",
        decoder_filters=(256, 128, 64, 32, 16),
        divisor=32,
    ),
}


def pretrained_unet(
    input_shape: tuple = (128, 128, 1),
    num_classes: int = 1,
    encoder: str = "vgg16",
    weights: str | os.PathLike | None = "imagenet",
    decoder_filters: Sequence[int] | None = None,
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = True,
    kernel_size: int = 3,
    upsample: str = "transpose",
    seed: int | None = None,
    name: str = "pretrained_unet",
) -> keras.Model:
    """U-Net decoder on a ``keras.applications`` VGG16 or ResNet50 encoder.

    A grey input is copied to three channels (layer ``grey_to_rgb``), scaled from [0, 1] and
    run through the application's own preprocessing (layer ``encoder_preprocess``). The
    encoder's layers keep their Keras names (``block1_conv1``…, ``conv2_block1_1_conv``…),
    so :func:`encoder_blocks` groups them into ``block1``–``block5`` or ``conv1``–``conv5``.
    Skips come from ``block1_conv2``…``block4_conv3`` (VGG16, bottleneck ``block5_conv3`` at
    1/16 resolution) or ``conv1_relu``…``conv4_block6_out`` (ResNet50, bottleneck
    ``conv5_block3_out`` at 1/32; the last decoder level ``dec1`` has no skip).

    Nothing is downloaded: ``weights="imagenet"`` uses the Keras cache when the file is there
    and otherwise warns and starts from random weights (:func:`resolve_imagenet_weights`).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        input_shape: (height, width, 1 or 3); height and width multiples of 16 (VGG16) or 32
            (ResNet50), at least 32.
        num_classes: 1 (sigmoid head) or more (softmax head).
        encoder: one of :data:`ENCODERS`.
        weights: ``"imagenet"``, None or a path (see :func:`resolve_imagenet_weights`).
        decoder_filters: widths of the decoder levels, deepest first; None gives
            (256, 128, 64, 32) for VGG16 and (256, 128, 64, 32, 16) for ResNet50.
        activation: decoder activation, one of :data:`ACTIVATIONS`.
        dropout: dropout rate on the encoder output before decoding (0 = none).
        batch_norm: batch normalisation in the decoder.
        kernel_size: decoder convolution size.
        upsample: one of :data:`UPSAMPLE_MODES`.
        seed: seed for the decoder initialisers (the encoder's random start, when there are
            no weights, follows Keras' global seed).
        name: model name.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: unknown encoder, activation or upsampling mode; a bad shape or
            ``decoder_filters`` of the wrong length.
        DataError: a weights path that does not exist.
    """
    if encoder not in ENCODERS:
        raise _expected(encoder, ENCODERS, "encoder")
    spec = _ENCODER_SPECS[encoder]
    _check_activation(activation, batch_norm)
    _check_common(num_classes, dropout, kernel_size, 1, upsample)
    shape = _check_image_shape(input_shape, spec.divisor, f"the {encoder} encoder's downsampling")
    if shape[2] not in (1, 3):
        raise ValueError(
            "pretrained encoders take grey (1) or RGB (3) channels. "
            f"Received: input_shape={shape!r}"
        )
    if any(side is not None and side < 32 for side in shape[:2]):
        raise ValueError(
            f"keras.applications encoders need images of at least 32x32. "
            f"Received: input_shape={shape!r}"
        )
    levels = len(spec.skips)
    decoder_filters = _check_filters(
        spec.decoder_filters if decoder_filters is None else decoder_filters,
        "decoder_filters",
        min_len=1,
    )
    if len(decoder_filters) != levels:
        raise ValueError(
            f"decoder_filters for {encoder} needs {levels} widths (deepest first). "
            f"Received: decoder_filters={decoder_filters!r}"
        )
    weights_path = resolve_imagenet_weights(encoder, weights)

    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    if shape[2] == 1:
        x = layers.Concatenate(axis=-1, name="grey_to_rgb")([x, x, x])
    x = EncoderPreprocess(encoder, name="encoder_preprocess")(x)
    application = getattr(keras.applications, spec.application)
    # input_tensor makes the encoder's layers part of this graph (one flat model), so each
    # can be frozen by its own name.
    base = application(include_top=False, weights=weights_path, input_tensor=x)

    cfg = _BlockConfig(activation, bool(batch_norm), kernel_size, 1, _Seeds(seed))
    x = base.get_layer(spec.bottleneck).output
    if dropout > 0:
        x = cfg.dropout_layer(float(dropout), "bottleneck_drop")(x)
    for level, width in zip(range(levels, 0, -1), decoder_filters):
        x = _upsample(x, width, f"dec{level}", upsample, cfg)
        skip_name = spec.skips[level - 1]
        if skip_name is not None:
            skip = base.get_layer(skip_name).output
            x = layers.Concatenate(name=f"dec{level}_concat")([x, skip])
        x = _plain_block(x, width, f"dec{level}", cfg)
    return keras.Model(inputs, _head(x, num_classes, cfg.seeds), name=name)


@dataclasses.dataclass(frozen=True)
class EncoderWeights:
    """What :func:`imagenet_unet` found.

    Attributes:
        encoder: ``"vgg16"`` or ``"resnet50"``.
        weights_found: True when ImageNet weights were loaded.
        weights_path: the file loaded, or None.
        message: one sentence for the notebook: where the weights came from, or the fallback.
    """

    encoder: str
    weights_found: bool
    weights_path: str | None
    message: str


def imagenet_unet(encoder: str = "vgg16", input_shape: tuple = (128, 128, 1),
                  weights: str | os.PathLike | None = "imagenet", **kwargs: Any):
    """A U-Net on an ImageNet encoder that says whether the ImageNet weights were there.

    Nothing is downloaded (:func:`resolve_imagenet_weights`): without the file
    in the Keras cache the encoder starts from random weights, one ``UserWarning`` says so and
    the returned :class:`EncoderWeights` carries the same message.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        encoder: one of :data:`ENCODERS`.
        input_shape: (height, width, 1 or 3).
        weights: ``"imagenet"``, None (random on purpose) or a path to the weights file.
        **kwargs: other :func:`pretrained_unet` arguments (``seed``,
            ``decoder_filters``, ...).

    Returns:
        ``(model, EncoderWeights)``.

    Raises:
        ValueError: an unknown encoder or bad shape.
        DataError: a weights path that does not exist.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = resolve_imagenet_weights(encoder, weights)
    fallback = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    model = pretrained_unet(input_shape=input_shape, encoder=encoder, weights=path, **kwargs)
    if path is not None:
        message = f"ImageNet weights for {encoder} loaded from {path}."
    elif weights is None:
        message = f"weights=None: the {encoder} encoder starts from random weights, as asked."
    else:
        message = fallback[0] if fallback else f"the {encoder} encoder starts from random weights."
        warnings.warn(message, UserWarning, stacklevel=2)
    return model, EncoderWeights(encoder, path is not None, path, message)


# --------------------------------------------------------------------------- multi-input


def multi_input_unet(
    input_shapes: Mapping[str, tuple],
    num_classes: int = 4,
    clinical_features: int = 0,
    fusion: str = "early",
    filters: Sequence[int] = (16, 32, 64, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
    kernel_size: int = 3,
    dilation_rate: int = 1,
    upsample: str = "transpose",
    residual: bool = False,
    seed: int | None = None,
    name: str = "multi_input_unet",
) -> keras.Model:
    """U-Net over several co-registered maps (CT perfusion: CBF, CBV, Tmax, TTP, MIP, ...).

    Each map is its own named input; ``fusion="early"`` concatenates them along the channels
    (layer ``fusion_concat``) before the first convolution, so every filter sees every map.
    With ``clinical_features > 0`` a vector input named ``clinical`` (e.g. NIHSS, age,
    time since onset — scale them to roughly unit range first) is tiled over the
    bottleneck's grid (``clinical_reshape``, ``clinical_broadcast``) and concatenated to the
    bottleneck features (``bottleneck_clinical_concat``), so the decoder is conditioned on it.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        input_shapes: input name → (height, width, channels); names are letters, digits and
            underscores starting with a letter; all maps share height and width.
        num_classes: output classes (softmax when > 1).
        clinical_features: length of the clinical vector; 0 for none.
        fusion: one of :data:`FUSIONS`.
        filters: as in :func:`unet`.
        activation: as in :func:`unet`.
        dropout: as in :func:`unet`.
        batch_norm: as in :func:`unet`.
        kernel_size: as in :func:`unet`.
        dilation_rate: as in :func:`unet`.
        upsample: as in :func:`unet`.
        residual: residual blocks (:func:`resunet`) instead of plain ones.
        seed: as in :func:`unet`.
        name: model name.

    Returns:
        An uncompiled ``keras.Model`` whose input is a dict keyed by the map names (plus
        ``"clinical"`` when used).

    Raises:
        ValueError: no inputs, bad or clashing names, mismatched sizes, unknown fusion, or as
            :func:`unet`.
    """
    if fusion not in FUSIONS:
        raise _expected(fusion, FUSIONS, "fusion")
    if not isinstance(input_shapes, Mapping) or not input_shapes:
        raise ValueError(
            "input_shapes must be a non-empty dict of name -> (height, width, channels). "
            f"Received: input_shapes={input_shapes!r}"
        )
    if not isinstance(clinical_features, int) or clinical_features < 0:
        raise ValueError(
            "clinical_features must be an int >= 0. "
            f"Received: clinical_features={clinical_features!r}"
        )
    filters = _check_filters(filters)
    _check_activation(activation, batch_norm)
    _check_common(num_classes, dropout, kernel_size, dilation_rate, upsample)
    n_pool = len(filters) - 1
    reserved = {"clinical", "head"} if clinical_features else {"head"}
    shapes = {}
    for key, shape in input_shapes.items():
        if not isinstance(key, str) or not _NAME_RE.match(key) or key in reserved:
            raise ValueError(
                "input names must start with a letter, hold only letters, digits and "
                f"underscores, and not be one of {sorted(reserved)}. Received: name={key!r}"
            )
        shapes[key] = _check_image_shape(
            shape, 2**n_pool, f"{n_pool} poolings", arg=f"input_shapes[{key!r}]"
        )
    sizes = {s[:2] for s in shapes.values()}
    if len(sizes) != 1:
        raise ValueError(
            "all perfusion maps must share height and width (co-registered). "
            f"Received: input_shapes={shapes!r}"
        )
    (size,) = sizes
    if clinical_features and None in size:
        raise ValueError(
            "a clinical input needs a fixed height and width to tile over the bottleneck. "
            f"Received: input_shapes={shapes!r}"
        )

    cfg = _BlockConfig(activation, bool(batch_norm), kernel_size, dilation_rate, _Seeds(seed))
    inputs = {key: keras.Input(shape=shape, name=key) for key, shape in shapes.items()}
    tensors = list(inputs.values())
    x = (
        layers.Concatenate(axis=-1, name="fusion_concat")(tensors)
        if len(tensors) > 1
        else tensors[0]
    )

    hook = None
    if clinical_features:
        clinical = keras.Input(shape=(clinical_features,), name="clinical")
        inputs["clinical"] = clinical
        grid = (size[0] // 2**n_pool, size[1] // 2**n_pool)

        def hook(features):
            c = layers.Reshape((1, 1, clinical_features), name="clinical_reshape")(clinical)
            c = layers.UpSampling2D(size=grid, name="clinical_broadcast")(c)
            return layers.Concatenate(name="bottleneck_clinical_concat")([features, c])

    block = _residual_block if residual else _plain_block
    x = _unet_body(x, filters, cfg, block, float(dropout), upsample, bottleneck_hook=hook)
    return keras.Model(inputs, _head(x, num_classes, cfg.seeds), name=name)


# --------------------------------------------------------------------------- registry & presets

MODELS: dict[str, Callable[..., keras.Model]] = {
    "unet": unet,
    "resunet": resunet,
    "pretrained_unet": pretrained_unet,
    "multi_input_unet": multi_input_unet,
}
"""Architecture name → builder, for configs that name a model by string."""


def build_model(arch: str, **kwargs: Any) -> keras.Model:
    """Builds a registered architecture by name.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        arch: a key of :data:`MODELS`.
        **kwargs: the builder's arguments.

    Returns:
        The uncompiled model.

    Raises:
        ValueError: unknown ``arch`` (or bad builder arguments).
    """
    if arch not in MODELS:
        raise _expected(arch, list(MODELS), "arch")
    return MODELS[arch](**kwargs)


PRESETS: dict[str, dict[str, Any]] = {
    # The study's best model: classic U-Net widths, leaky ReLU, dropout 0.5 after the
    # bottleneck as in Ronneberger et al.; ~31M parameters, ~1.2 images/s training at
    # 128 px on 2 CPU cores, so a GPU job in practice.
    "study_unet": {
        "arch": "unet",
        "filters": (64, 128, 256, 512, 1024),
        "activation": "leaky_relu",
        "dropout": 0.5,
        "batch_norm": False,
    },
    # The same network at a quarter of the width (1/16 of the parameters, ~1.9M): ~13
    # images/s at 128 px on 2 CPU cores, the classroom stand-in. Only the width differs, so
    # the two can be compared directly.
    "slim_unet": {
        "arch": "unet",
        "filters": (16, 32, 64, 128, 256),
        "activation": "leaky_relu",
        "dropout": 0.5,
        "batch_norm": False,
    },
    # ResU-Net as in Zhang et al. (2018): three levels plus bridge, 64-512 wide, ReLU with
    # batch norm throughout; the study trained it with the log-Dice loss.
    "study_resunet": {
        "arch": "resunet",
        "filters": (64, 128, 256, 512),
        "activation": "relu",
        "dropout": 0.0,
        "batch_norm": True,
    },
    "slim_resunet": {
        "arch": "resunet",
        "filters": (16, 32, 64, 128),
        "activation": "relu",
        "dropout": 0.0,
        "batch_norm": True,
    },
}
"""Named configurations: ``build_preset(name, input_shape)`` builds one."""


def build_preset(
    preset: str, /, input_shape: tuple = (128, 128, 1), **overrides: Any
) -> keras.Model:
    """Builds a named configuration from :data:`PRESETS`, with optional overrides.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        preset: a key of :data:`PRESETS`.
        input_shape: (height, width, channels).
        **overrides: builder arguments replacing the preset's (e.g. ``num_classes=3``,
            ``name="run1"``, ``seed=0``); ``arch`` may not be overridden.

    Returns:
        The uncompiled model.

    Raises:
        ValueError: unknown preset, an ``arch`` override, or bad builder arguments.
    """
    if preset not in PRESETS:
        raise _expected(preset, list(PRESETS), "preset")
    if "arch" in overrides:
        raise ValueError(
            f"a preset fixes its architecture; use build_model for another. "
            f"Received: arch={overrides['arch']!r}"
        )
    kwargs = dict(PRESETS[preset])
    arch = kwargs.pop("arch")
    kwargs.setdefault("name", preset)
    kwargs.update(overrides)
    return build_model(arch, input_shape=input_shape, **kwargs)


# --------------------------------------------------------------------------- inspection


def count_params(model: keras.Model, trainable_only: bool = False) -> int:
    """Number of weights (scalars) in a model, without building or training anything more.

    Introduced in notebooks/04_unet_vs_resunet.ipynb.

    Args:
        model: a built Keras model.
        trainable_only: count only the weights training would change (after freezing).

    Returns:
        The parameter count.
    """
    weights = model.trainable_weights if trainable_only else model.weights
    total = 0
    for w in weights:
        size = 1
        for d in w.shape:
            size *= int(d)
        total += size
    return total


_BLOCK_PATTERNS = (
    re.compile(r"^(enc\d+|bottleneck)(?:_|$)"),  # strokekit builders
    re.compile(r"^(block\d+)_"),  # VGG16
    re.compile(r"^(conv\d+)_"),  # ResNet50 stages
    re.compile(r"^(pool1)_"),  # ResNet50's stem pooling, part of stage conv1
)


def encoder_blocks(model: keras.Model) -> list[tuple[str, list[str]]]:
    """The model's encoder blocks, shallow to deep, each with its layer names.

    Blocks are recognised by name prefix: ``enc1``…``encN`` and ``bottleneck`` for the
    strokekit builders, ``block1``…``block5`` for a VGG16 encoder and ``conv1``…``conv5`` for
    ResNet50. Freezing schedules use this to set ``layer.trainable`` block by block.

    Introduced in notebooks/04_unet_vs_resunet.ipynb (used by notebooks/05_transfer_learning.ipynb).

    Args:
        model: a model built by this module (or any model using those names).

    Returns:
        ``[(prefix, [layer names...]), ...]`` in the order the blocks first appear in the
        graph (input side first).
    """
    blocks: dict[str, list[str]] = {}
    for layer in model.layers:
        for pattern in _BLOCK_PATTERNS:
            match = pattern.match(layer.name)
            if match:
                prefix = "conv1" if match.group(1) == "pool1" else match.group(1)
                blocks.setdefault(prefix, []).append(layer.name)
                break
    return list(blocks.items())


def set_batchnorm_momentum(model, momentum: float) -> list[str]:
    """Sets how fast every batch-norm layer's moving mean and variance follow the batches.

    Keras' default, 0.99, averages over roughly the last few hundred training steps, so a
    run of about a hundred steps ends with moving statistics still close to their starting
    values (mean 0, variance 1): the network does well in training mode and fails at
    inference, which uses those statistics. A lower momentum (0.9 averages over ~10 steps)
    suits short CPU runs. Set it before compiling; it is saved with the model.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a Keras model.
        momentum: in [0, 1): ``moving = momentum * moving + (1 - momentum) * batch``.

    Returns:
        The names of the batch-norm layers changed, in graph order.

    Raises:
        ValueError: a momentum outside [0, 1).
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1). Received: momentum={momentum!r}")
    changed = []
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(momentum)
            changed.append(layer.name)
    return changed
