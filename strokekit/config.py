"""Profiles, experiment configs and seeding: the one place that decides how big a run is.

The profile comes from the environment variable ``STROKEKIT_PROFILE`` (``quick`` or ``full``);
notebooks read it once in their Parameters cell through :func:`get_profile` and never hard-code
sizes. Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np

from .augment import STRONG_AUGMENT, STUDY_AUGMENT, AugmentConfig
from .engine import LR_SCHEDULES
from .phantom import field_checker

PROFILE_ENV = "STROKEKIT_PROFILE"
DEFAULT_PROFILE = "quick"


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much work a notebook does.

    Attributes:
        name: ``"quick"`` (CI and laptops, minutes on 2 CPU cores), ``"full"`` (the study, a GPU)
            or ``"smoke"`` (the full profile's code paths at tiny sizes: CI checks that every cell a
            GPU class would run still runs; nothing in it is meant to learn).
        image_size: side of the square images fed to models.
        num_epochs: training epochs per run.
        num_seeds: seeds per configuration (results are reported as mean ± sd over them).
        batch_size: training batch size.
        phantom_patients: synthetic patients generated for the few-shot set.
        phantom_slices_per_patient: labelled slices taken from each synthetic patient.
        phantom_size: side of the generated phantom slices in pixels.
        filters: U-Net filters per level (the last is the bottleneck); the full profile is the
            study's 64→1024 network (31M parameters).
        learning_rate: Adam's learning rate (its start, under the cosine schedule).
        batch_norm: batch normalisation in the U-Net (the study had none).
        lr_schedule: ``strokekit.engine.LR_SCHEDULES`` name: the study halves on plateaus; the quick
            profile falls along a cosine.
        bn_momentum: momentum of the batch-norm running statistics.
        repeats: passes over the training slices per epoch (see ``TrainConfig.repeats``).
        head_bias: starting logit of the lesion class (see ``TrainConfig.head_bias``).
        mode: which branches the notebooks take, ``"quick"`` or ``"full"`` (the smoke profile takes
            the full profile's). Notebooks choose code paths by ``mode`` and sizes by ``name``.

    The quick profile has a few minutes on 2 CPU cores to train a network that *learns*: 10
    epochs of 4 augmented passes each (about 200 steps) with batch norm (momentum 0.9, so its
    running statistics keep up), a learning rate of 0.01 along a cosine, and a head that starts
    at the lesion share of pixels instead of 0.5. The full profile keeps the study's recipe: the defaults.
    """

    name: str
    image_size: int = 256
    num_epochs: int = 50
    num_seeds: int = 3
    batch_size: int = 8
    phantom_patients: int = 12
    phantom_slices_per_patient: int = 5
    phantom_size: int = 256
    filters: tuple[int, ...] = (64, 128, 256, 512, 1024)
    learning_rate: float = 1e-3
    batch_norm: bool = False
    lr_schedule: str = "plateau"
    bn_momentum: float = 0.99
    repeats: int = 1
    head_bias: float | None = None
    mode: str = "full"

    def train_config(self, **changes: Any) -> TrainConfig:
        """A :class:`TrainConfig` with this profile's sizes and training recipe.

        Args:
            **changes: TrainConfig fields to set (``arch``, ``activation``, ``loss``, ...).
        """
        base = dict(
            filters=self.filters, image_size=self.image_size, num_epochs=self.num_epochs,
            batch_size=self.batch_size, learning_rate=self.learning_rate, batch_norm=self.batch_norm,
            lr_schedule=self.lr_schedule, bn_momentum=self.bn_momentum, repeats=self.repeats,
            head_bias=self.head_bias,
        )
        return TrainConfig(**{**base, **changes})


PROFILES: dict[str, Profile] = {
    "quick": Profile(
        name="quick",
        image_size=64,
        num_epochs=10,
        num_seeds=2,
        phantom_size=128,
        filters=(8, 16, 32, 64),
        learning_rate=1e-2,
        batch_norm=True,
        lr_schedule="cosine",
        bn_momentum=0.9,
        repeats=4,
        head_bias=-4.0,
        mode="quick",
    ),
    "full": Profile(name="full"),  # the study: the defaults
}
#: The full profile's code paths (and recipe) at tiny sizes, for CI (``make test-smoke``).
PROFILES["smoke"] = dataclasses.replace(
    PROFILES["full"], name="smoke", image_size=32, num_epochs=1, num_seeds=1, batch_size=4,
    phantom_size=64, filters=(4, 8, 16, 32, 64),
)


def get_profile(name: str | None = None) -> Profile:
    """Return the profile named ``name``, else the one in ``$STROKEKIT_PROFILE``, else quick.

    Raises:
        ValueError: for an unknown profile name.
    """
    chosen = name if name is not None else os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)
    chosen = chosen.strip().lower()
    if chosen not in PROFILES:
        raise ValueError(f"Expected one of {sorted(PROFILES)}. Received: profile={chosen!r}")
    return PROFILES[chosen]


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """The settings every slice trainer shares: the training loop's (read by :func:`strokekit.train.fit_run`) and
    the network settings both slice configs have. :class:`TrainConfig` and
    :class:`strokekit.multiclass.MulticlassConfig` hold them, each with its own network fields.

    Attributes:
        activation: relu, leaky_relu, elu, selu, gelu or swish.
        dropout: dropout rate after the bottleneck, as in the original U-Net (0 disables).
        batch_norm: batch normalisation in U-Net blocks (not with selu, which is self-normalising;
            ResU-Net has it for every activation but selu).
        learning_rate: Adam learning rate.
        batch_size: slices per batch.
        num_epochs: maximum epochs (early stopping may end sooner).
        image_size: side of the square model input.
        windows: CT windows stacked as input channels (see ``strokekit.preprocess.WINDOWS``).
        augment: augmentation settings (``strokekit.augment.AugmentConfig``).
        early_stopping_patience: epochs without validation-loss improvement before stopping (0: never).
        reduce_lr_patience: epochs without improvement before halving the learning rate (0: never);
            used by the ``"plateau"`` schedule only.
        seed: the one seed for weights, shuffling and augmentation.
        preview_slices: validation slices shown in the per-epoch previews.
        workers: loader threads (2 keeps both CPU cores busy).
        lr_schedule: ``"plateau"`` (halve on a validation-loss plateau, the study's way),
            ``"cosine"`` (from ``learning_rate`` down to 1/100 of it along a half cosine over
            ``num_epochs``: large steps first, small ones to settle) or ``"constant"``.
        bn_momentum: momentum of the batch-norm running statistics (U-Net and ResU-Net).
        repeats: passes over the training slices per epoch, each with its own augmentation.
            Validation, previews and checkpoints happen once per epoch, so a short run on a
            few dozen slices spends its time on training steps rather than on per-epoch work.
        head_bias: starting logit of the lesion class(es) in the network's head (U-Net and
            ResU-Net; None: 0). ``-4`` (a lesion probability of 0.018 everywhere) lets a short run
            on rare lesions skip its "everything is background" phase.
    """

    activation: str = "relu"
    dropout: float = 0.0
    batch_norm: bool = False
    learning_rate: float = 1e-3
    batch_size: int = 8
    num_epochs: int = 50
    image_size: int = 128
    windows: tuple[str, ...] = ("brain",)
    augment: AugmentConfig = STUDY_AUGMENT
    early_stopping_patience: int = 10
    reduce_lr_patience: int = 5
    seed: int = 0
    preview_slices: int = 4
    workers: int = 2
    lr_schedule: str = "plateau"
    bn_momentum: float = 0.99
    repeats: int = 1
    head_bias: float | None = None

    def __post_init__(self) -> None:
        need = field_checker(self)
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {list(LR_SCHEDULES)}")
        need(isinstance(self.repeats, (int, np.integer)) and not isinstance(self.repeats, bool) and self.repeats >= 1,
             "repeats", "an int >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig(FitSettings):
    """Everything that decides a training run. Variants by ``dataclasses.replace``.

    Attributes:
        arch: a name in ``strokekit.models.MODELS`` (``"unet"``, ``"resunet"``, ...).
        filters: filters per encoder level; the last is the bottleneck.
        loss: a name in ``strokekit.losses.LOSSES``.
        num_classes: 1 for a binary lesion mask (sigmoid), more for softmax.
        threshold: probability above which a pixel counts as lesion in the metrics.
        The others: see :class:`FitSettings`.
    """

    arch: str = "unet"
    filters: tuple[int, ...] = (16, 32, 64, 128)
    loss: str = "bce_dice"
    num_classes: int = 1
    threshold: float = 0.5

    @classmethod
    def few_shot(cls, **changes: Any) -> TrainConfig:
        """The network settings of the kit's few-shot default, ``strokekit.fewshot.FEWSHOT_DEFAULT.config``.

        The field defaults of this class are the study's shape (no batch norm, its augmentation,
        early stopping), which notebooks 03-06 reproduce. For few labelled patients start here
        instead: a batch-normalised U-Net 8-64, Dice+BCE, rotations up to 180 degrees and both
        flips, 25 epochs, 256 px inputs. The full recipe (crops, lesion-free slices, extra input
        channels, the decisions after training) is :data:`strokekit.fewshot.FEWSHOT_DEFAULT`;
        notebook 10's full profile trains exactly that.

        Args:
            **changes: fields to override (e.g. ``seed=1``).
        """
        base = dict(arch="unet", filters=(8, 16, 32, 64), activation="relu", dropout=0.0, batch_norm=True,
                    loss="bce_dice", learning_rate=1e-3, batch_size=8, num_epochs=25, image_size=256,
                    augment=STRONG_AUGMENT, early_stopping_patience=0, reduce_lr_patience=0)
        return cls(**{**base, **changes})

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``strokekit.models.build_model``."""
        kw: dict[str, Any] = dict(
            input_shape=(self.image_size, self.image_size, len(self.windows)),
            num_classes=self.num_classes,
            filters=tuple(self.filters),
            activation=self.activation,
            dropout=self.dropout,
        )
        if self.arch == "unet":  # selu is self-normalising: it runs without batch norm, as in ResU-Net
            kw["batch_norm"] = self.batch_norm and self.activation != "selu"
        if self.arch in ("unet", "resunet"):
            kw["bn_momentum"] = self.bn_momentum
            kw["head_bias"] = self.head_bias
        return kw


def seed_everything(seed: int, deterministic_ops: bool = False) -> None:
    """Seed Python, NumPy and the Keras backend from one integer.

    Args:
        seed: the seed.
        deterministic_ops: also ask TensorFlow for deterministic kernels (slower; only
            meaningful on the TensorFlow backend, ignored elsewhere).
    """
    random.seed(seed)
    np.random.seed(seed)
    import keras  # imported here so that importing strokekit stays cheap

    keras.utils.set_random_seed(seed)
    if deterministic_ops and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (possibly nested) config dataclass."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value

    return convert(config)


def from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a flat config dataclass from :func:`to_dict` output (lists become tuples).

    Raises:
        ValueError: for keys the dataclass does not have.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def phantom_config(profile: Profile | str | None = None, **changes: Any):
    """The course's standard phantom for a profile: every notebook builds the same dataset from it,
    so a split saved by one notebook matches the case ids of the next.

    Args:
        profile: a Profile, a profile name, or None for :func:`get_profile`.
        **changes: fields of ``strokekit.phantom.PhantomConfig`` to override.
    """
    from .phantom import PhantomConfig

    if not isinstance(profile, Profile):
        profile = get_profile(profile)
    base = PhantomConfig(
        n_patients=profile.phantom_patients,
        slices_per_patient=profile.phantom_slices_per_patient,
        empty_slices_per_patient=1,
        image_size=profile.phantom_size,
        seed=0,
    )
    return dataclasses.replace(base, **changes)


@dataclasses.dataclass(frozen=True)
class TransferSettings:
    """What notebook 05 (transfer learning) does in a profile: :func:`transfer_settings`.

    The defaults are the full profile's (and the smoke profile's, at its sizes).

    Attributes:
        fine_tune_epochs: fine-tuning epochs, all phases together (at least 4, so that the gradual
            schedule opens a block).
        fine_tune_batch: fine-tuning batch size. Short CPU runs need many small steps: a 42-slice
            target gives 11 steps per epoch at batch 4.
        source_patients: hemorrhage phantom patients to pretrain on.
        bn_momentum: batch-norm momentum of the U-Net (notebook 05, section 2: batch norm in short runs).
        shots: target training slices on the learning curve (``"all"``: every one).
        curve_methods: the methods that get every number of shots; the others train on all slices only.
        train_imagenet: train the VGG16 U-Net (a 15M-parameter encoder: GPU only; smoke: a few tiny steps).
        ctich_source: pretrain on the CT-ICH slices (2814 real slices: GPU only).
        ctich_patients: CT-ICH patients to read (None: every one).
    """

    fine_tune_epochs: int
    fine_tune_batch: int
    source_patients: int = 240
    bn_momentum: float = 0.99
    shots: tuple[int | str, ...] = (4, 8, 16, 32, "all")
    curve_methods: tuple[str, ...] = ("scratch", "frozen", "unfrozen", "gradual")
    train_imagenet: bool = True
    ctich_source: bool = True
    ctich_patients: int | None = None


def transfer_settings(profile: Profile | str | None = None) -> TransferSettings:
    """Notebook 05's sizes for a profile (a Profile, a profile name, or None for :func:`get_profile`).

    Introduced in notebooks/05_transfer_learning.ipynb (its Parameters cell prints them).
    """
    if not isinstance(profile, Profile):
        profile = get_profile(profile)
    if profile.mode == "quick":
        return TransferSettings(fine_tune_epochs=8, fine_tune_batch=4, source_patients=30, bn_momentum=0.8,
                                shots=(8, "all"), curve_methods=("scratch", "unfrozen"), train_imagenet=False,
                                ctich_source=False)
    settings = TransferSettings(fine_tune_epochs=max(4, profile.num_epochs), fine_tune_batch=profile.batch_size)
    if profile.name == "smoke":
        settings = dataclasses.replace(settings, source_patients=30, shots=(4, "all"), ctich_patients=4)
    return settings
