"""Tests for strokekit.models: every architecture builds, trains a step, and names its layers."""

import os
import re
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Under JAX, XLA's optimising CPU compiler dominates these tiny tests (seconds to tens of
# seconds for each new shape on 2 busy cores, against ~1 s unoptimised). It only takes effect
# if nothing has started JAX before this module is collected.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import keras
import numpy as np
import pytest

from strokekit import losses as L
from strokekit import models as M
from strokekit.errors import DataError

pytestmark = pytest.mark.backend

SIZE = 16
FILTERS = (4, 8)  # one pooling: the smallest U-Net with every kind of layer
# TensorFlow runs a tiny model's step faster eagerly than it traces it; JAX the other way round.
EAGER = keras.backend.backend() == "tensorflow"


def batch(shape, num_classes=1, seed=0, n=2):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape)).astype("float32")
    if num_classes == 1:
        y = (x[..., :1] > 0.6).astype("float32")
    else:
        y = rng.integers(0, num_classes, size=(n, *shape[:2])).astype("int32")
    return x, y


def train_one_step(model, x, y, loss):
    """Compiles with SGD, runs one step; returns (loss, whether any trainable weight moved)."""
    before = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss, run_eagerly=EAGER)
    value = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
    moved = any(not np.array_equal(b, np.array(w)) for b, w in zip(before, model.trainable_weights))
    return value, moved


def head_activation(model):
    return model.get_layer("head").get_config()["activation"]


def layer_names(model):
    return [layer.name for layer in model.layers]


# --------------------------------------------------------------------------- U-Net / ResU-Net

SWEEP = [(arch, act) for arch in ("unet", "resunet") for act in M.ACTIVATIONS]


@pytest.mark.parametrize("arch, activation", SWEEP, ids=[f"{a}-{b}" for a, b in SWEEP])
def test_architecture_activation_builds_and_trains(arch, activation):
    model = M.build_model(
        arch,
        input_shape=(SIZE, SIZE, 1),
        filters=FILTERS,
        activation=activation,
        dropout=0.2,
        seed=1,
    )
    names = layer_names(model)
    assert len(names) == len(set(names))
    assert model.output_shape == (None, SIZE, SIZE, 1)
    assert head_activation(model) == "sigmoid"

    act = model.get_layer("enc1_act1")
    conv = model.get_layer("enc1_conv1")
    drop = model.get_layer("bottleneck_drop")
    if activation == "leaky_relu":
        assert isinstance(act, keras.layers.LeakyReLU)
        assert act.negative_slope == pytest.approx(M.LEAKY_RELU_SLOPE)
    else:
        assert act.activation is keras.activations.get(activation)  # swish is Keras' silu
    if activation == "selu":
        assert isinstance(conv.kernel_initializer, keras.initializers.LecunNormal)
        assert isinstance(drop, keras.layers.AlphaDropout)
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    else:
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
        assert type(drop) is keras.layers.Dropout
        has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
        assert has_bn == (arch == "resunet")

    x, y = batch((SIZE, SIZE, 1))
    pred = keras.ops.convert_to_numpy(model(x, training=False))
    assert pred.shape == (2, SIZE, SIZE, 1)
    assert np.all((pred >= 0) & (pred <= 1))
    loss, moved = train_one_step(model, x, y, L.bce_dice_loss())
    assert np.isfinite(loss) and loss > 0
    assert moved


def test_unet_layer_names_follow_the_scheme():
    model = M.unet((32, 32, 1), filters=(4, 8, 16), batch_norm=True, dropout=0.1)
    assert layer_names(model) == [
        "image",
        "enc1_conv1",
        "enc1_bn1",
        "enc1_act1",
        "enc1_conv2",
        "enc1_bn2",
        "enc1_act2",
        "enc1_pool",
        "enc2_conv1",
        "enc2_bn1",
        "enc2_act1",
        "enc2_conv2",
        "enc2_bn2",
        "enc2_act2",
        "enc2_pool",
        "bottleneck_conv1",
        "bottleneck_bn1",
        "bottleneck_act1",
        "bottleneck_conv2",
        "bottleneck_bn2",
        "bottleneck_act2",
        "bottleneck_drop",
        "dec2_up",
        "dec2_concat",
        "dec2_conv1",
        "dec2_bn1",
        "dec2_act1",
        "dec2_conv2",
        "dec2_bn2",
        "dec2_act2",
        "dec1_up",
        "dec1_concat",
        "dec1_conv1",
        "dec1_bn1",
        "dec1_act1",
        "dec1_conv2",
        "dec1_bn2",
        "dec1_act2",
        "head",
    ]
    assert model.get_layer("dec2_up").output.shape[1:] == (16, 16, 8)
    assert model.get_layer("dec2_concat").output.shape[1:] == (16, 16, 16)
    # with batch norm the convolutions drop their (redundant) bias
    assert not model.get_layer("enc1_conv1").use_bias


def test_encoder_blocks_group_by_prefix():
    model = M.unet((32, 32, 1), filters=(4, 8, 16))
    blocks = M.encoder_blocks(model)
    assert [prefix for prefix, _ in blocks] == ["enc1", "enc2", "bottleneck"]
    assert blocks[0][1] == ["enc1_conv1", "enc1_act1", "enc1_conv2", "enc1_act2", "enc1_pool"]
    assert all(name.startswith("bottleneck_") for name in blocks[2][1])


def test_multiclass_head_and_interpolation_upsampling():
    model = M.unet((SIZE, SIZE, 2), num_classes=3, filters=FILTERS, upsample="bilinear", seed=0)
    assert head_activation(model) == "softmax"
    assert isinstance(model.get_layer("dec1_up"), keras.layers.UpSampling2D)
    assert model.get_layer("dec1_upconv").filters == 4
    x, _ = batch((SIZE, SIZE, 2))
    pred = keras.ops.convert_to_numpy(model(x))
    assert pred.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-5)


def test_resunet_projects_only_when_channels_change():
    model = M.resunet((SIZE, SIZE, 4), filters=FILTERS)  # enc1 receives 4 channels already
    names = set(layer_names(model))
    assert "enc1_proj" not in names and "enc1_add" in names
    assert {"bottleneck_proj", "bottleneck_proj_bn", "dec1_proj"} <= names
    assert model.get_layer("bottleneck_proj").kernel_size == (1, 1)


def test_resunet_is_unet_with_residual_blocks():
    res = M.resunet((SIZE, SIZE, 1), 1, FILTERS, "elu", 0.1, seed=3)  # unet's first arguments
    same = M.unet((SIZE, SIZE, 1), filters=FILTERS, activation="elu", dropout=0.1, seed=3, residual=True,
                  batch_norm=None, name="resunet")
    assert res.name == "resunet" and layer_names(res) == layer_names(same)
    assert "enc1_bn1" in layer_names(res)  # batch norm by default, but not with selu
    assert "enc1_bn1" not in layer_names(M.resunet((SIZE, SIZE, 1), filters=FILTERS, activation="selu"))
    for wa, wb in zip(res.get_weights(), same.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    with pytest.raises(TypeError):
        M.resunet((SIZE, SIZE, 1), filters=FILTERS, residual=False)


def test_dilation_and_kernel_size_reach_the_convolutions():
    model = M.unet((SIZE, SIZE, 1), filters=FILTERS, kernel_size=5, dilation_rate=2)
    conv = model.get_layer("enc1_conv1")
    assert conv.kernel_size == (5, 5) and conv.dilation_rate == (2, 2)
    assert model.output_shape == (None, SIZE, SIZE, 1)


def test_seed_makes_weights_reproducible():
    a = M.unet((SIZE, SIZE, 1), filters=FILTERS, seed=7)
    b = M.unet((SIZE, SIZE, 1), filters=FILTERS, seed=7)
    c = M.unet((SIZE, SIZE, 1), filters=FILTERS, seed=8)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.get_weights()[0], c.get_weights()[0])
    # one seed per layer: two same-shaped kernels do not start equal
    assert a.get_layer("enc1_conv2").kernel.shape == a.get_layer("dec1_conv2").kernel.shape
    assert not np.array_equal(
        np.array(a.get_layer("enc1_conv2").kernel), np.array(a.get_layer("dec1_conv2").kernel)
    )


def test_unknown_names_and_bad_arguments():
    message = f"Expected one of {list(M.MODELS)}. Received: arch='vnet'"
    with pytest.raises(ValueError, match=re.escape(message)):
        M.build_model("vnet")
    message = f"Expected one of {list(M.ACTIVATIONS)}. Received: activation='tanh'"
    with pytest.raises(ValueError, match=re.escape(message)):
        M.unet(activation="tanh")
    with pytest.raises(ValueError, match=re.escape("Received: activation='eval(1)'")):
        M.resunet(activation="eval(1)")
    with pytest.raises(ValueError, match=re.escape("Received: upsample='deconv'")):
        M.unet(upsample="deconv")
    with pytest.raises(ValueError, match="must not be mixed with batch normalisation"):
        M.unet(activation="selu", batch_norm=True)
    with pytest.raises(ValueError, match="multiples of 8"):
        M.unet((60, 60, 1), filters=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="at least 2 positive ints"):
        M.unet(filters=(16,))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        M.unet(dropout=1.0)


# --------------------------------------------------------------------------- presets


def expected_unet_params(channels, filters, num_classes, k=3):
    """Parameters of a plain U-Net (no batch norm, transposed-conv upsampling), by hand."""
    total, c = 0, channels
    for f in filters:  # encoder levels and bottleneck: two kxk convolutions with bias
        total += (k * k * c * f + f) + (k * k * f * f + f)
        c = f
    for f in reversed(filters[:-1]):
        total += 2 * 2 * c * f + f  # 2x2 transposed convolution
        total += (k * k * 2 * f * f + f) + (k * k * f * f + f)  # after concatenating the skip
        c = f
    return total + c * num_classes + num_classes  # 1x1 head


@pytest.mark.slow
def test_study_preset_has_the_studys_31m_parameters():
    model = M.build_preset("study_unet", (128, 128, 1))
    n = M.count_params(model)
    assert n == expected_unet_params(1, (64, 128, 256, 512, 1024), 1)
    assert 30.5e6 < n < 31.5e6
    assert isinstance(model.get_layer("enc1_act1"), keras.layers.LeakyReLU)
    assert model.get_layer("bottleneck_drop").rate == 0.5
    assert model.name == "study_unet"


def test_presets_and_overrides():
    slim = M.build_preset("slim_unet", (32, 32, 1), num_classes=2, name="run1")
    assert M.count_params(slim) == expected_unet_params(1, (16, 32, 64, 128, 256), 2)
    assert slim.name == "run1" and head_activation(slim) == "softmax"
    res = M.build_preset("slim_resunet", (32, 32, 1))
    assert any(isinstance(layer, keras.layers.Add) for layer in res.layers)
    message = f"Expected one of {list(M.PRESETS)}. Received: preset='big_unet'"
    with pytest.raises(ValueError, match=re.escape(message)):
        M.build_preset("big_unet")
    with pytest.raises(ValueError, match="a preset fixes its architecture"):
        M.build_preset("slim_unet", arch="resunet")


def test_count_params_trainable_only():
    model = M.unet((SIZE, SIZE, 1), filters=FILTERS, batch_norm=True)
    total = M.count_params(model)
    # batch norm's moving mean and variance are not trainable: 2 per channel per BN layer
    bn_stats = sum(
        2 * layer.gamma.shape[0]
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert M.count_params(model, trainable_only=True) == total - bn_stats
    enc1 = dict(M.encoder_blocks(model))["enc1"]
    for name in enc1:
        model.get_layer(name).trainable = False
    frozen = (3 * 3 * 1 * 4) + 2 * 4 + (3 * 3 * 4 * 4) + 2 * 4  # two convs, two BN (gamma, beta)
    assert M.count_params(model, trainable_only=True) == total - bn_stats - frozen


# --------------------------------------------------------------------------- pretrained encoders


@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return tmp_path


def test_resolve_imagenet_weights_warns_once_when_absent(empty_keras_home):
    with pytest.warns(UserWarning, match="ImageNet weights for vgg16 were not found") as record:
        assert M.resolve_imagenet_weights("vgg16", "imagenet") is None
    assert len(record) == 1
    assert "random weights" in str(record[0].message)
    assert str(empty_keras_home / "models") in str(record[0].message)


def test_resolve_imagenet_weights_finds_cached_and_user_files(empty_keras_home, tmp_path):
    cached = empty_keras_home / "models" / M.IMAGENET_WEIGHT_FILES["resnet50"]
    cached.parent.mkdir()
    cached.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert M.resolve_imagenet_weights("resnet50", "imagenet") == str(cached)
        assert M.resolve_imagenet_weights("resnet50", None) is None
        assert M.resolve_imagenet_weights("resnet50", cached.parent) == str(cached)
        assert M.resolve_imagenet_weights("resnet50", cached) == str(cached)
    with pytest.raises(DataError, match="no vgg16 weights file here"):
        M.resolve_imagenet_weights("vgg16", tmp_path / "nowhere.h5")
    message = f"Expected one of {list(M.ENCODERS)}. Received: encoder='vgg19'"
    with pytest.raises(ValueError, match=re.escape(message)):
        M.resolve_imagenet_weights("vgg19", None)


PRETRAINED = [
    ("vgg16", 32, ["block1", "block2", "block3", "block4", "block5"]),
    ("resnet50", 64, ["conv1", "conv2", "conv3", "conv4", "conv5"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("encoder, size, blocks", PRETRAINED, ids=[p[0] for p in PRETRAINED])
def test_pretrained_unet_builds_and_trains_without_weights(encoder, size, blocks):
    levels = len(M._ENCODER_SPECS[encoder].skips)
    model = M.pretrained_unet(
        (size, size, 1), encoder=encoder, weights=None, decoder_filters=(8,) * levels, seed=0
    )
    names = layer_names(model)
    assert len(names) == len(set(names))
    assert names[:3] == ["image", "grey_to_rgb", "encoder_preprocess"]
    assert model.get_layer("grey_to_rgb").output.shape[-1] == 3
    assert model.output_shape == (None, size, size, 1) and head_activation(model) == "sigmoid"
    assert [prefix for prefix, _ in M.encoder_blocks(model)] == blocks
    assert f"dec{levels}_up" in names and "dec1_conv2" in names
    # ResNet50's last level has no skip at full resolution; VGG16 has one at every level.
    assert ("dec1_concat" in names) == (encoder == "vgg16")
    x, y = batch((size, size, 1))
    loss, moved = train_one_step(model, x, y, L.bce_dice_loss())
    assert np.isfinite(loss) and moved


def test_pretrained_unet_falls_back_to_random_weights_with_one_warning(empty_keras_home):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = M.pretrained_unet(
            (32, 32, 3),
            encoder="vgg16",
            weights="imagenet",
            num_classes=2,
            decoder_filters=(8, 8, 8, 8),
        )
    ours = [w for w in record if "ImageNet weights" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
    assert "grey_to_rgb" not in layer_names(model)  # RGB input is used as it is
    assert head_activation(model) == "softmax"


@pytest.mark.slow
def test_pretrained_unet_loads_cached_weights_without_downloading(empty_keras_home):
    legacy = pytest.importorskip("keras.src.legacy.saving.legacy_h5_format")
    h5py = pytest.importorskip("h5py")
    # Stand-in for the ImageNet file: a random VGG16 saved in Keras' legacy "notop" format.
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    cached = empty_keras_home / "models" / M.IMAGENET_WEIGHT_FILES["vgg16"]
    cached.parent.mkdir()
    with h5py.File(cached, "w") as f:
        legacy.save_weights_to_hdf5_group(f, donor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found in the cache: no fallback warning
        model = M.pretrained_unet(
            (32, 32, 1), encoder="vgg16", weights="imagenet", decoder_filters=(8, 8, 8, 8)
        )
    for name in ("block1_conv1", "block5_conv3"):
        np.testing.assert_array_equal(
            np.array(model.get_layer(name).kernel), np.array(donor.get_layer(name).kernel)
        )


def test_pretrained_unet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 32"):
        M.pretrained_unet((48, 48, 1), encoder="resnet50", weights=None)
    with pytest.raises(ValueError, match="grey \\(1\\) or RGB \\(3\\)"):
        M.pretrained_unet((32, 32, 2), weights=None)
    with pytest.raises(ValueError, match="needs 4 widths"):
        M.pretrained_unet((32, 32, 1), weights=None, decoder_filters=(8, 8))


def test_encoder_preprocess_matches_the_application():
    rng = np.random.default_rng(0)
    x = rng.random((1, 4, 4, 3)).astype("float32")
    for encoder in M.ENCODERS:
        layer = M.EncoderPreprocess(encoder)
        got = keras.ops.convert_to_numpy(layer(x))
        module = getattr(keras.applications, encoder)
        np.testing.assert_allclose(
            got, module.preprocess_input(x.copy() * 255.0), rtol=1e-5, atol=1e-3
        )
    # BGR order and mean: a mid-grey pixel becomes 127.5 minus the per-channel ImageNet means.
    grey = np.full((1, 1, 1, 3), 0.5, "float32")
    got = keras.ops.convert_to_numpy(M.EncoderPreprocess("vgg16")(grey))[0, 0, 0]
    np.testing.assert_allclose(got, [127.5 - 103.939, 127.5 - 116.779, 127.5 - 123.68], atol=1e-3)


def test_model_with_encoder_preprocess_reloads_in_safe_mode(tmp_path):
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    x = M.EncoderPreprocess("resnet50", name="encoder_preprocess")(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs)
    path = tmp_path / "pre.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("encoder_preprocess").encoder == "resnet50"
    x = np.random.default_rng(1).random((2, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x))
    )


# --------------------------------------------------------------------------- multi-input

PERFUSION = {
    "cbf": (SIZE, SIZE, 1),
    "cbv": (SIZE, SIZE, 1),
    "tmax": (SIZE, SIZE, 1),
    "ttp": (SIZE, SIZE, 1),
    "mip": (SIZE, SIZE, 1),
}


def perfusion_batch(n=2, clinical=0, seed=0):
    rng = np.random.default_rng(seed)
    x = {k: rng.random((n, *s)).astype("float32") for k, s in PERFUSION.items()}
    if clinical:
        x["clinical"] = rng.random((n, clinical)).astype("float32")
    y = rng.integers(0, 4, size=(n, SIZE, SIZE)).astype("int32")
    return x, y


@pytest.mark.parametrize("clinical", [0, 2], ids=["maps-only", "with-clinical"])
def test_multi_input_unet_builds_and_trains(clinical):
    model = M.multi_input_unet(
        PERFUSION, num_classes=4, clinical_features=clinical, filters=FILTERS, seed=0
    )
    names = layer_names(model)
    assert len(names) == len(set(names))
    expected_inputs = set(PERFUSION) | ({"clinical"} if clinical else set())
    inputs = {layer.name for layer in model.layers if isinstance(layer, keras.layers.InputLayer)}
    assert inputs == expected_inputs
    assert model.get_layer("fusion_concat").output.shape[-1] == 5
    assert model.output_shape == (None, SIZE, SIZE, 4) and head_activation(model) == "softmax"
    assert ("bottleneck_clinical_concat" in names) == bool(clinical)

    x, y = perfusion_batch(clinical=clinical)
    pred = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(pred.sum(-1), 1.0, atol=1e-5)
    if clinical:
        # the clinical vector reaches the output
        other = dict(x, clinical=x["clinical"] + 5.0)
        assert not np.allclose(keras.ops.convert_to_numpy(model(other)), pred)
        assert model.get_layer("bottleneck_clinical_concat").output.shape[-1] == 8 + clinical
    loss, moved = train_one_step(model, x, y, L.categorical_ce_dice_loss(4))
    assert np.isfinite(loss) and moved


def test_multi_input_unet_errors():
    with pytest.raises(
        ValueError, match=re.escape("Expected one of ['early']. Received: fusion='late'")
    ):
        M.multi_input_unet(PERFUSION, fusion="late")
    with pytest.raises(ValueError, match="must share height and width"):
        M.multi_input_unet({"cbf": (16, 16, 1), "cbv": (32, 32, 1)}, filters=FILTERS)
    with pytest.raises(ValueError, match="input names must start with a letter"):
        M.multi_input_unet({"cbf map": (16, 16, 1)}, filters=FILTERS)
    with pytest.raises(ValueError, match="input names must start with a letter"):
        M.multi_input_unet({"clinical": (16, 16, 1)}, clinical_features=1, filters=FILTERS)
    with pytest.raises(ValueError, match="non-empty dict"):
        M.multi_input_unet({})
    with pytest.raises(ValueError, match="fixed height and width"):
        M.multi_input_unet({"cbf": (None, None, 1)}, clinical_features=1, filters=FILTERS)
