"""Transfer learning: freeze and unfreeze encoder blocks, fine-tuning schedules, few-shot curves.

Introduced in notebooks/05_transfer_learning.ipynb.

Two ideas from the stroke literature are reproduced here. A U-Net pretrained on a large source
set (a tumour set in one study; here a larger phantom set of a *different* lesion type, or any
set you load) is fine-tuned on a small target set at a low learning rate. And a pretrained
encoder is kept frozen, fully unfrozen, or unfrozen gradually, deepest block first
(:class:`FineTuneSchedule`). :func:`learning_curve` then asks the only question that matters
for few-shot work: with k annotated target slices, does the pretrained start beat training
from scratch, and by more than the spread between seeds?

The source sets come from :func:`strokekit.phantom.phantom_source` (phantom patients of another lesion
type) and :func:`strokekit.io.load_source_dataset` (real CT-ICH); the ImageNet encoder U-Net is
:func:`strokekit.models.imagenet_unet`, the batch-norm momentum of short runs
:func:`strokekit.models.set_batchnorm_momentum`.

Keras 3 facts the code relies on (tested in ``tests/test_transfer.py``):

* ``layer.trainable = False`` on a ``BatchNormalization`` layer also puts it in inference
  mode: it normalises with its moving mean and variance and no longer updates them. A frozen
  block therefore keeps the source set's statistics, as the keras.io transfer-learning guide
  recommends for fine-tuning.
* The set of trainable weights is fixed when a model is compiled (the traced training step
  and the optimizer's slots are built for it). Changing ``trainable`` flags needs a new
  ``compile``; :func:`recompile` does it, and gradual unfreezing is therefore a loop of short
  ``fit`` phases, each on a model compiled for its trainable blocks, rather than a callback
  that flips flags mid-``fit``. Tracing a training step takes seconds on a CPU, so compiled
  models are kept and reused (:func:`recompile`, :func:`fine_tune`, :func:`learning_curve`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import engine
from .config import seed_everything
from .dataset import SliceDataset
from .errors import DataError
from .errors import expected_one_of as _expected
from .train import RunResult, TrainConfig

MODES: tuple[str, ...] = ("frozen", "unfrozen", "gradual")
"""Fine-tuning modes of :class:`FineTuneSchedule`."""

CURVE_COLUMNS: tuple[str, ...] = (
    "method", "shots", "seed", "dice", "iou", "sensitivity", "specificity", "epochs", "seconds",
)
"""Columns :func:`learning_curve` always returns first (then ``patients``, ``best_epoch``, ``run_dir``)."""

LEARNED_DICE: float = 0.1
"""The mean Dice below which a network counts as not having learned (it finds hardly a lesion pixel).
:func:`transfer_effect` gives no verdict where transfer and baseline both stay below it: a gap between
two networks that found nothing is noise, not an effect of pretraining."""


# --------------------------------------------------------------------------- freezing


def encoder_layers(model) -> list[str]:
    """Names of the layers that make up the model's encoder, shallow to deep.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a model from :mod:`strokekit.models` (``enc1_*``…``bottleneck_*`` layers) or a
            :func:`strokekit.models.pretrained_unet` (``block1_*``… or ``conv1_*``… layers).

    Returns:
        The layer names of every block of :func:`strokekit.models.encoder_blocks`, in order.
    """
    from .models import encoder_blocks

    return [name for _, names in encoder_blocks(model) for name in names]


def _block_names(model) -> list[str]:
    from .models import encoder_blocks

    return [name for name, _ in encoder_blocks(model)]


def _matches(name: str, pattern: str) -> bool:
    # "enc1" must not pick up "enc10_conv1": a prefix ends at an underscore.
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern if pattern.endswith("_") else pattern + "_")


def _as_list(value: str | Sequence[str] | None, arg: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"{arg} must be a string or a sequence of strings. Received: {arg}={value!r}")
    return items


def _select_layers(model, names_or_prefixes, blocks) -> list:
    """The model's layers picked by names/prefixes/patterns and encoder blocks, in graph order."""
    from .models import encoder_blocks

    patterns = _as_list(names_or_prefixes, "names_or_prefixes")
    wanted_blocks = _as_list(blocks, "blocks")
    known = dict(encoder_blocks(model))
    if not patterns and not wanted_blocks:
        wanted_blocks = list(known)
        if not wanted_blocks:
            raise ValueError(
                "this model has no encoder blocks recognised by strokekit.models.encoder_blocks "
                "(layer names enc1_*, bottleneck_*, block1_* or conv1_*); name the layers to "
                "freeze with names_or_prefixes"
            )
    chosen: set[str] = set()
    names = [layer.name for layer in model.layers]
    for pattern in patterns:
        hits = [n for n in names if _matches(n, pattern)]
        if not hits:
            raise ValueError(
                f"no layer of model {model.name!r} matches {pattern!r} (a full name, a prefix "
                f"ending at '_' or a glob pattern). Layer names look like {names[1:6]}"
            )
        chosen.update(hits)
    for block in wanted_blocks:
        if block not in known:
            raise _expected(block, list(known), "block")
        chosen.update(known[block])
    return [layer for layer in model.layers if layer.name in chosen]


def _is_batchnorm(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def _ensure_model_trainable(model) -> None:
    # Layer flags only count while the model itself is trainable; `model.trainable = True`
    # would unfreeze every layer, so the per-layer flags are put back afterwards.
    if not model.trainable:
        flags = [(layer, layer.trainable) for layer in model.layers]
        model.trainable = True
        for layer, flag in flags:
            layer.trainable = flag


def freeze(model, names_or_prefixes: str | Sequence[str] | None = None,
           blocks: str | Sequence[str] | None = None) -> list[str]:
    """Freezes layers: their weights stop changing and their batch norm runs in inference mode.

    Recompile afterwards (:func:`recompile`): Keras fixes the trainable weights at compile
    time.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a Keras model.
        names_or_prefixes: layer names, prefixes (``"enc1"`` picks ``enc1_conv1``… but not
            ``enc10_*``; ``"dec"``-style partial words need a glob: ``"dec*"``) or glob
            patterns.
        blocks: encoder blocks as listed by :func:`strokekit.models.encoder_blocks`
            (``"enc1"``…``"bottleneck"``; ``"block1"``… for VGG16, ``"conv1"``… for ResNet50).
            With neither argument the whole encoder is frozen.

    Returns:
        The names of the layers frozen, in graph order.

    Raises:
        ValueError: a name that matches no layer, an unknown block, or a model without
            recognisable encoder blocks when nothing was named.
    """
    layers = _select_layers(model, names_or_prefixes, blocks)
    _ensure_model_trainable(model)
    for layer in layers:
        layer.trainable = False
    return [layer.name for layer in layers]


def unfreeze(model, names_or_prefixes: str | Sequence[str] | None = None,
             blocks: str | Sequence[str] | None = None,
             keep_batchnorm_frozen: bool = False) -> list[str]:
    """Makes layers trainable again (the counterpart of :func:`freeze`); then :func:`recompile`.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a Keras model.
        names_or_prefixes: as in :func:`freeze`.
        blocks: as in :func:`freeze`; with neither argument the whole encoder is unfrozen.
        keep_batchnorm_frozen: leave the batch-norm layers among them frozen (inference mode,
            fixed scale and offset), as advised when fine-tuning a pretrained encoder on a
            small set whose few batches give noisy statistics.

    Returns:
        The names of the layers made trainable, in graph order.

    Raises:
        ValueError: as :func:`freeze`.
    """
    layers = _select_layers(model, names_or_prefixes, blocks)
    _ensure_model_trainable(model)
    changed = []
    for layer in layers:
        if keep_batchnorm_frozen and _is_batchnorm(layer):
            layer.trainable = False
            continue
        layer.trainable = True
        changed.append(layer.name)
    return changed


def trainable_blocks(model) -> tuple[str, ...]:
    """Encoder blocks with at least one trainable weight, shallow to deep.

    A block whose convolutions train while its batch norm is kept frozen counts as trainable.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a Keras model with encoder blocks (:func:`strokekit.models.encoder_blocks`).

    Returns:
        The trainable blocks' names, e.g. ``("enc3", "bottleneck")``.
    """
    from .models import encoder_blocks

    if not model.trainable:
        return ()
    by_name = {layer.name: layer for layer in model.layers}
    out = []
    for block, names in encoder_blocks(model):
        if any(by_name[n].trainable and by_name[n].weights for n in names):
            out.append(block)
    return tuple(out)


def recompile(model, config: TrainConfig, learning_rate: float | None = None):
    """Makes a model ready to train after its trainable flags changed: fresh Adam at a rate.

    Uses :func:`strokekit.engine.compile_model` with the config's loss and lesion metrics
    (:func:`strokekit.train.loss_and_metrics`). When the model was last compiled there with exactly
    the same trainable layers, loss and metrics, the existing compiled step is kept and only the
    optimizer is reset (slots and step count to zero, new learning rate): the same state a new
    compile gives, without tracing the training step again (seconds per call on a CPU).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: a Keras model.
        config: the TrainConfig (loss, number of classes, threshold).
        learning_rate: Adam learning rate; None means ``config.learning_rate``.

    Returns:
        The model (compiled in place).

    Raises:
        ValueError: a learning rate that is not positive.
    """
    from .train import loss_and_metrics

    lr = float(config.learning_rate if learning_rate is None else learning_rate)
    if not lr > 0:
        raise ValueError(f"learning_rate must be > 0. Received: learning_rate={learning_rate!r}")
    return engine.compile_model(model, *loss_and_metrics(config), lr)


# --------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stretch of fine-tuning with fixed trainable blocks (see :meth:`FineTuneSchedule.phases`).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Attributes:
        index: 0 for the first phase.
        start_epoch: first epoch of the phase, counted from 0 (Keras' ``initial_epoch``).
        end_epoch: the epoch after its last (Keras' ``epochs``).
        blocks: encoder blocks trainable in this phase, shallow to deep.
        lr_factor: multiplies ``config.learning_rate``.
    """

    index: int
    start_epoch: int
    end_epoch: int
    blocks: tuple[str, ...]
    lr_factor: float


@dataclasses.dataclass(frozen=True)
class FineTuneSchedule:
    """How the encoder of a pretrained network is treated during fine-tuning.

    The decoder and head always train. Modes:

    * ``"frozen"``: the encoder never changes; the decoder trains at ``config.learning_rate``.
    * ``"unfrozen"``: everything trains from the first epoch at
      ``config.learning_rate * lr_scale`` (the study's "fine-tune at 1e-5").
    * ``"gradual"``: the first ``unfreeze_every`` epochs train the decoder only at
      ``config.learning_rate``; then every ``unfreeze_every`` epochs one more encoder block
      joins, deepest first (``bottleneck``, ``encN``, …, ``enc1``), and the rate drops to
      ``config.learning_rate * lr_scale``. Once all blocks train, training goes on to
      ``config.num_epochs``; blocks not reached by then stay frozen.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Attributes:
        mode: one of :data:`MODES`.
        unfreeze_every: epochs between two unfreezing steps (gradual mode).
        lr_scale: learning-rate factor whenever encoder blocks train.
        keep_batchnorm_frozen: batch norm inside unfrozen encoder blocks stays in inference
            mode with fixed scale and offset (the keras.io advice for small target sets).
    """

    mode: str = "unfrozen"
    unfreeze_every: int = 1
    lr_scale: float = 0.1
    keep_batchnorm_frozen: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise _expected(self.mode, MODES, "mode")
        if (not isinstance(self.unfreeze_every, (int, np.integer)) or isinstance(self.unfreeze_every, bool)
                or self.unfreeze_every < 1):
            raise ValueError(
                f"unfreeze_every must be an int >= 1 (epochs). Received: unfreeze_every={self.unfreeze_every!r}"
            )
        if not (isinstance(self.lr_scale, (int, float)) and 0 < float(self.lr_scale) <= 1):
            raise ValueError(f"lr_scale must be in (0, 1]. Received: lr_scale={self.lr_scale!r}")

    def phases(self, blocks: Sequence[str], num_epochs: int) -> list[Phase]:
        """The phases of a run of ``num_epochs`` epochs over encoder ``blocks`` (shallow to deep).

        Args:
            blocks: the encoder's blocks, shallow to deep (``enc1``, …, ``bottleneck``).
            num_epochs: epochs in all.

        Returns:
            Non-empty phases covering epochs ``0 .. num_epochs`` without gaps.

        Raises:
            ValueError: ``num_epochs`` < 1, or a frozen/gradual schedule for a model without
                encoder blocks.
        """
        blocks = tuple(blocks)
        if not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1:
            raise ValueError(f"num_epochs must be an int >= 1. Received: num_epochs={num_epochs!r}")
        num_epochs = int(num_epochs)
        if self.mode != "unfrozen" and not blocks:
            raise ValueError(
                f"mode={self.mode!r} needs encoder blocks to freeze, and the model has none "
                "recognised by strokekit.models.encoder_blocks"
            )
        if self.mode == "unfrozen":
            return [Phase(0, 0, num_epochs, blocks, float(self.lr_scale))]
        if self.mode == "frozen":
            return [Phase(0, 0, num_epochs, (), 1.0)]
        out = []
        deepest_first = blocks[::-1]
        for k in range(len(blocks) + 1):
            start = k * self.unfreeze_every
            if start >= num_epochs:
                break
            end = num_epochs if k == len(blocks) else min(num_epochs, start + self.unfreeze_every)
            open_blocks = tuple(b for b in blocks if b in deepest_first[:k])
            out.append(Phase(k, start, end, open_blocks, 1.0 if k == 0 else float(self.lr_scale)))
        return out

    def engine_phases(self, model, num_epochs: int, learning_rate: float) -> list[engine.Phase]:
        """The :class:`strokekit.engine.Phase` s of this schedule for ``model``, for :func:`strokekit.engine.fit`.

        Each phase makes the decoder and head trainable and the encoder blocks frozen but its own
        (:meth:`phases`), and starts at ``learning_rate * lr_factor``; its history rows record
        ``trainable_blocks`` (a tuple, shallow to deep) and ``trainable_params``. Used by
        :func:`fine_tune` and :func:`strokekit.perfusion.train_perfusion`.

        Raises:
            ValueError: as :meth:`phases`.
        """
        from .models import encoder_blocks

        blocks = _block_names(model)

        def phase(p: Phase) -> engine.Phase:
            def set_flags(m) -> dict:
                _ensure_model_trainable(m)
                in_encoder = {name for _, names in encoder_blocks(m) for name in names}
                for layer in m.layers:
                    if layer.name not in in_encoder:
                        layer.trainable = True
                if blocks:
                    freeze(m, blocks=blocks)
                    if p.blocks:
                        unfreeze(m, blocks=list(p.blocks), keep_batchnorm_frozen=self.keep_batchnorm_frozen)
                return {"trainable_blocks": trainable_blocks(m),
                        "trainable_params": int(sum(int(np.prod(w.shape)) for w in m.trainable_weights))}

            return engine.Phase(p.end_epoch - p.start_epoch, set_flags, learning_rate * p.lr_factor)

        return [phase(p) for p in self.phases(blocks, num_epochs)]


SCRATCH = FineTuneSchedule(mode="unfrozen", lr_scale=1.0, keep_batchnorm_frozen=False)
"""Training from scratch expressed as a schedule: everything trains at the config's rate."""


# --------------------------------------------------------------------------- fine-tuning


_ONE_BATCH_MAX = 4  # validation sets up to this many training batches are evaluated in one


def _full_batch_loader(base):
    """The kit's loader, with its last batch filled up from the start of the epoch's order.

    Every batch then has ``batch_size`` slices, so Keras traces the training step for one
    shape only (a second, generalised trace costs as much as the first), and every slice is
    still seen once per epoch; the few that fill the last batch are seen twice.
    """

    class FullBatchLoader(base):
        def batch_indices(self, index: int) -> np.ndarray:
            picks = super().batch_indices(index)
            if len(picks) < self.batch_size:
                picks = np.concatenate([picks, np.resize(self._order, self.batch_size - len(picks))])
            return picks

    return FullBatchLoader


def _check_input(model, config: TrainConfig) -> None:
    expected = (config.image_size, config.image_size, len(config.windows))
    shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, dict) else None
    if shape is None or len(shape) != 3 or any(
        s is not None and s != e for s, e in zip(shape, expected)
    ):
        raise ValueError(
            f"the model takes inputs of shape {model.input_shape} but the config gives images "
            f"of shape (None, {expected[0]}, {expected[1]}, {expected[2]}) "
            f"(image_size={config.image_size}, windows={config.windows}); build or pretrain "
            "the model with the same image_size and windows"
        )


def used_split(train_data: SliceDataset, val_data: SliceDataset, seed: int | None = None,
               **params: Any):
    """The split a fine-tuning run used, as a :class:`strokekit.split.Split` for ``split.json``.

    A few-shot run trains on a subset of the target's training slices, so the notebook's split
    file does not say which slices a run saw; this one does (``"train"``: ``train_data``,
    ``"val"``: ``val_data``, with their patients), and :meth:`strokekit.split.Split.load` and
    :func:`strokekit.train.load_run` read it back.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        train_data: the slices trained on.
        val_data: the validation slices.
        seed: the seed of the draw (recorded).
        **params: JSON-ready facts about the draw (e.g. ``shots``), recorded in ``params``.

    Returns:
        The split (``method="fine-tune"``).

    Raises:
        ValueError: a case id in both sets (a slice cannot be in two subsets; validate on
            other slices than you train on).
    """
    from .split import Split

    shared = sorted(set(train_data.case_ids) & set(val_data.case_ids))
    if shared:
        raise ValueError(
            f"training and validation data share {len(shared)} case id(s), e.g. {shared[:3]}: a "
            "run folder records which subset each slice was in; validate on other slices"
        )
    patients = None
    if train_data.patient_ids is not None and val_data.patient_ids is not None:
        patients = list(train_data.patient_ids) + list(val_data.patient_ids)
    return Split(case_ids=list(train_data.case_ids) + list(val_data.case_ids),
                 subsets=["train"] * len(train_data) + ["val"] * len(val_data),
                 patient_ids=patients, seed=seed, method="fine-tune", params=params)


def _check_split(split, train_data: SliceDataset, val_data: SliceDataset) -> None:
    for subset, data in (("train", train_data), ("val", val_data)):
        cases = split.cases(subset)
        if sorted(cases) != sorted(data.case_ids):
            verb = "trains" if subset == "train" else "validates"
            raise ValueError(
                f"the split's {subset!r} cases ({len(cases)}) are not the {len(data)} slices the "
                f"run {verb} on: save the split actually used (split=None does)"
            )


def fine_tune(
    model,
    config: TrainConfig,
    train_data: SliceDataset,
    val_data: SliceDataset,
    schedule: FineTuneSchedule = FineTuneSchedule(),
    run_dir: str | os.PathLike | None | bool = None,
    split: Any = None,
    progress: bool = True,
    restore_best: bool = True,
    callbacks: Sequence[Any] = (),
    overwrite: bool = False,
    resume: bool = False,
) -> RunResult:
    """Fine-tunes a (pretrained) model on target data following a schedule.

    Trains through :func:`strokekit.engine.fit`, with one engine phase per schedule phase, and
    the inputs of :func:`strokekit.train.train` (:func:`strokekit.train.to_arrays`): the same seeded augmenting
    loader, loss, lesion metrics, learning-rate halving on plateaus (per phase) and seeding
    (``config.seed``). Two differences keep every batch the same shape
    (each new shape costs a new trace of the training step): the last training batch of an
    epoch is filled up with slices from the start of that epoch's order, and a validation set
    of up to four batches is evaluated as one batch. Early stopping counts epochs without a better
    validation loss across phases. The model is changed in place and ends with the trainable
    flags of the last phase run.

    Every phase needs its own compiled training step (Keras fixes the trainable weights at
    compile time) and tracing one takes seconds on a CPU. So each setting of trainable blocks
    is trained by one compiled model kept with ``model`` (``model`` itself for the first
    setting met, a clone for each other: :meth:`strokekit.engine.ModelPool.of`) and reused by
    later calls; the weights move from phase to phase and end in ``model``. Before training
    ``model`` with Keras' own ``fit``, call :func:`recompile`.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        model: the model to train (e.g. from :func:`load_pretrained`); its input must match
            ``config.image_size`` and ``config.windows``.
        config: the TrainConfig (``num_epochs`` counts all phases).
        train_data: target training slices.
        val_data: validation slices (best epoch, early stopping, metrics).
        schedule: the :class:`FineTuneSchedule`; :data:`SCRATCH` trains everything at the
            config's rate.
        run_dir: the run folder, as in :func:`strokekit.train.train` (a
            :class:`strokekit.runs.RunFolder` of kind ``"binary"``): it receives ``config.json``,
            ``schedule.json``, ``split.json``, ``history.csv``, ``model.keras`` and
            ``metrics.json``; None creates ``<runs>/finetune-<mode>-s<seed>-<timestamp>``;
            False writes nothing.
        split: the :class:`strokekit.split.Split` saved as ``split.json``; its ``"train"`` and
            ``"val"`` cases must be exactly ``train_data``'s and ``val_data``'s. None saves the
            split actually used (:func:`used_split`).
        progress: a progress bar over epochs.
        restore_best: end with the weights of the epoch with the lowest validation loss
            (as :func:`strokekit.train.train` does when it writes a run folder).
        callbacks: more Keras callbacks, passed to every phase's ``fit`` (their ``model`` is
            the one training in that phase: phases before the last train a compiled copy).
        overwrite: replace a run already in ``run_dir``.
        resume: continue the interrupted run in ``run_dir`` (as :func:`strokekit.train.train`).

    Returns:
        :class:`strokekit.train.RunResult`; its ``history`` has one row per epoch with
        ``epoch``, ``phase``, ``learning_rate``, ``trainable_blocks`` (a tuple, shallow to
        deep), ``trainable_params`` and Keras' logs (``loss``, ``val_loss``, ``val_dice``…);
        ``metrics`` holds validation Dice, IoU, sensitivity, specificity, precision,
        ``best_epoch`` and ``epochs_run``.

    Raises:
        DataError: empty training or validation data.
        ValueError: a model whose input does not match the config, a schedule that needs
            encoder blocks the model lacks, or (with a run folder) a split that does not hold
            exactly the slices trained and validated on.
        FileExistsError: ``run_dir`` already holds a run and ``overwrite`` is False.
    """
    from .augment import SegmentationLoader
    from .train import fit_run

    if not isinstance(schedule, FineTuneSchedule):
        raise ValueError(f"schedule must be a FineTuneSchedule. Received: schedule={schedule!r}")  # noqa: TRY004
    _check_input(model, config)
    # The split is checked before any training: a run folder must not record other slices.
    if run_dir is not False:
        split = used_split(train_data, val_data, seed=config.seed) if split is None else split
        _check_split(split, train_data, val_data)
    # A small validation set goes in one batch: one traced evaluation step, and the loss's
    # Dice pooled over the whole set rather than over batches of it.
    val_batch = len(val_data) if len(val_data) <= _ONE_BATCH_MAX * config.batch_size else config.batch_size
    # Halving on plateaus whatever config.lr_schedule says, down to 1e-7: fine-tuning's own settings.
    return fit_run(
        config, train_data, val_data, model, run_dir, "binary", name=f"finetune-{schedule.mode}-s{config.seed}",
        phases=schedule.engine_phases(model, config.num_epochs, config.learning_rate), split=split,
        run_files={"schedule.json": schedule}, overwrite=overwrite, resume=resume, previews=False, repeats=1,
        loader=_full_batch_loader(SegmentationLoader), val_batch_size=val_batch, restore_best=restore_best,
        schedule="plateau", min_lr=1e-7, progress=progress, callbacks=callbacks, pool=engine.ModelPool.of(model),
        desc=f"fine-tune ({schedule.mode})")


# --------------------------------------------------------------------------- source tasks


def pretrain_on_source(
    config: TrainConfig,
    source_data: SliceDataset,
    val_data: SliceDataset,
    run_dir: str | os.PathLike | None = None,
    model=None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Trains a network on the source task with :func:`strokekit.train.train` and saves it.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        config: the TrainConfig of the source run (same ``image_size`` and ``windows`` as the
            target runs that will load it).
        source_data: source training slices.
        val_data: source validation slices (best-epoch checkpoint).
        run_dir: the run folder; None creates ``<runs>/pretrain-<timestamp>``.
        model: a pre-built model instead of one built from the config.
        progress: a progress bar over epochs.
        overwrite: replace a run already in ``run_dir``.

    Returns:
        Path of the saved ``model.keras`` (best validation loss), for :func:`load_pretrained`.

    Raises:
        DataError: empty data, or training that never produced a checkpoint (non-finite loss).
        ValueError: ``run_dir=False`` (the model has to be saved).
    """
    from .train import train

    if run_dir is False:
        raise ValueError("pretrain_on_source saves the model: give a run_dir or None, not False")
    result = train(config, source_data, val_data, run_dir=run_dir, model=model,
                   name=f"pretrain-{config.arch}-s{config.seed}", progress=progress, previews=False,
                   overwrite=overwrite)
    path = result.run_dir / "model.keras"
    if not path.is_file():
        raise DataError("source training saved no checkpoint (was the validation loss finite?)", path)
    return path


def load_pretrained(path: str | os.PathLike):
    """Loads a saved model (a ``.keras`` file or a run folder) in Keras safe mode, uncompiled.

    The optimizer state saved with it is not restored: fine-tuning compiles afresh anyway
    (:func:`recompile`), with its own trainable weights and learning rate.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        path: the ``.keras`` file, or a run folder holding ``model.keras``.

    Returns:
        The model, ready for :func:`fine_tune`.

    Raises:
        DataError: no saved model at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise DataError("no saved model here (a .keras file or a run folder holding model.keras)", path)
    return engine.load_model(path, compile=False)




# --------------------------------------------------------------------------- learning curves


def few_shot_subset(data: SliceDataset, shots: int | str | None, seed: int) -> SliceDataset:
    """``shots`` training slices drawn by patient: as few patients as possible, seeded.

    Patients are taken in a seeded random order, each with its slices in a seeded order, and
    the first ``shots`` slices of that sequence are kept: whole patients first, part of the
    last one. The subsets of one seed are nested (5 shots are the first 5 of the 10).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        data: the target training set.
        shots: number of slices, or ``"all"``/None for the whole set.
        seed: the draw's seed.

    Returns:
        The subset, in the drawn order.

    Raises:
        ValueError: ``shots`` < 1 or more than the set holds.
    """
    n = len(data)
    if shots is None or (isinstance(shots, str) and shots == "all"):
        shots = n
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or not 1 <= shots <= n:
        raise ValueError(
            f"shots must be an int from 1 to {n} (the training slices) or 'all'. Received: shots={shots!r}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5]))
    if data.patient_ids is None:
        order = rng.permutation(n)
    else:
        patients = data.patients()
        members = {p: [] for p in patients}
        for i, p in enumerate(data.patient_ids):
            members[p].append(i)
        order = np.concatenate([
            np.asarray(members[patients[k]])[rng.permutation(len(members[patients[k]]))]
            for k in rng.permutation(len(patients))
        ])
    return data.subset(order[: int(shots)])


def _variable_values(model) -> list[list[np.ndarray]]:
    import keras

    return [[keras.ops.convert_to_numpy(v) for v in layer.variables] for layer in model.layers]


def _assign_values(model, values: list[list[np.ndarray]]) -> None:
    # Only into a worker of the same engine.architecture: layers, variables and shapes match.
    for layer, layer_values in zip(model.layers, values):
        for variable, value in zip(layer.variables, layer_values):
            variable.assign(value)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "method"


def _parse_method(name: str, spec: Any, schedule: FineTuneSchedule):
    import keras

    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[1], FineTuneSchedule):
            raise ValueError(
                f"method {name!r}: a tuple must be (start, FineTuneSchedule). Received: {spec!r}"
            )
        start, own = spec
    else:
        start, own = spec, None
    if start is None or (isinstance(start, str) and start == "scratch"):
        return "scratch", None, own or SCRATCH
    if isinstance(start, (str, os.PathLike)):
        return "path", Path(os.fspath(start)), own or schedule
    if isinstance(start, keras.Model):
        return "model", start, own or schedule
    if callable(start):
        return "callable", start, own or schedule
    raise ValueError(
        f"method {name!r} must be None/'scratch', a saved model path, a keras.Model, a callable "
        f"seed -> model, or a (start, FineTuneSchedule) tuple. Received: {spec!r}"
    )


def learning_curve(
    base_config: TrainConfig,
    target_train: SliceDataset,
    target_val: SliceDataset,
    shots: Sequence[int | str] = (5, 10, "all"),
    seeds: Sequence[int] = (0, 1),
    methods: Mapping[str, Any] | None = None,
    schedule: FineTuneSchedule = FineTuneSchedule(),
    eval_data: SliceDataset | None = None,
    run_root: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
):
    """Trains every method on k target slices for every k and seed: one tidy row per run.

    Every run goes through :func:`fine_tune` on ``few_shot_subset(target_train, k, seed)`` with
    ``dataclasses.replace(base_config, seed=seed)``, so methods see the same slices, loader
    order and augmentation for a given seed and differ only in their start and schedule.
    Methods whose networks share an architecture share one compiled model, which loads each
    run's start before training (the result is that of a fresh model; it saves re-tracing
    the training step, seconds per compile on a CPU).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        base_config: the TrainConfig (epochs, rate, loss, size...); its seed is replaced.
        target_train: target training slices to draw from.
        target_val: validation slices (best epoch, early stopping; metrics unless
            ``eval_data``).
        shots: numbers of training slices; ``"all"`` for the whole set.
        seeds: seeds; each gives its own draw and training randomness.
        methods: name → start. A start is None or ``"scratch"`` (a new model from the config
            and seed, trained with :data:`SCRATCH`), a saved ``.keras`` path (or run folder), a
            ``keras.Model`` (its weights are copied; it is not changed), or a callable
            ``seed -> keras.Model``; or a tuple ``(start, FineTuneSchedule)`` to give that
            method its own schedule. Default ``{"scratch": None}``.
        schedule: the schedule of methods that do not name their own.
        eval_data: slices to measure on instead of ``target_val`` (e.g. a test set).
        run_root: a folder under which every run writes its run folder
            ``<method>-k<shots>-s<seed>`` (see :func:`fine_tune`; its ``split.json`` holds the
            slices drawn); None writes nothing.
        progress: a progress bar over runs.
        overwrite: replace runs already in those folders (e.g. when a notebook runs again).

    Returns:
        pandas DataFrame with columns :data:`CURVE_COLUMNS` plus ``patients`` (in the draw),
        ``best_epoch`` and ``run_dir`` ("" without ``run_root``); ``shots`` holds the number
        of slices (``"all"`` resolved).

    Raises:
        ValueError: no methods or seeds, bad shots, a method that cannot be read.
    """
    import keras
    import pandas as pd
    from tqdm.auto import tqdm

    from .models import build_model
    from .train import evaluate_arrays, to_arrays

    methods = {"scratch": None} if methods is None else dict(methods)
    if not methods:
        raise ValueError("methods must name at least one method, e.g. {'scratch': None}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must hold at least one seed")
    counts = []
    for k in shots:
        n = len(target_train) if (k is None or (isinstance(k, str) and k == "all")) else k
        few_shot_subset(target_train, n, 0)  # validates k
        counts.append(int(n))
    counts = list(dict.fromkeys(counts))
    parsed = {name: _parse_method(name, spec, schedule) for name, spec in methods.items()}
    eval_arrays = to_arrays(base_config, eval_data) if eval_data is not None else None

    # One compiled model per architecture, shared by every method and run: each run loads its
    # start into it, and fine_tune keeps one compiled copy per setting of trainable blocks.
    workers: dict[tuple, Any] = {}
    fixed: dict[str, tuple] = {}  # method -> (start values, architecture, loaded model)
    rows = []
    jobs = [(name, k, seed) for name in methods for k in counts for seed in seeds]
    for name, k, seed in tqdm(jobs, desc="learning curve", disable=not progress):
        kind, start, method_schedule = parsed[name]
        config = dataclasses.replace(base_config, seed=seed)
        if kind in ("scratch", "callable"):
            if kind == "scratch":
                seed_everything(seed)
                candidate = build_model(config.arch, **config.model_kwargs())
            else:
                candidate = start(seed)
            values, signature = _variable_values(candidate), engine.architecture(candidate)
        else:
            if name not in fixed:
                template = load_pretrained(start) if kind == "path" else start
                # A loaded model is ours to train; a caller's model is only read.
                fixed[name] = (_variable_values(template), engine.architecture(template),
                               template if kind == "path" else None)
            values, signature, candidate = fixed[name]
        if signature not in workers:
            workers[signature] = candidate if candidate is not None else keras.models.clone_model(start)
        worker = workers[signature]
        _assign_values(worker, values)
        subset = few_shot_subset(target_train, k, seed)
        folder = False if run_root is None else Path(run_root) / f"{_safe(name)}-k{k}-s{seed}"
        used = None if folder is False else used_split(
            subset, target_val, seed=seed, shots=int(k), drawn_from=len(target_train),
            draw="strokekit.transfer.few_shot_subset")
        result = fine_tune(worker, config, subset, target_val, method_schedule, run_dir=folder,
                           split=used, progress=False, overwrite=overwrite)
        metrics = result.metrics
        if eval_arrays is not None:
            metrics = {**metrics, **evaluate_arrays(worker, *eval_arrays, config.threshold)}
        rows.append({
            "method": name, "shots": k, "seed": seed,
            **{m: float(metrics.get(m, np.nan)) for m in ("dice", "iou", "sensitivity", "specificity")},
            "epochs": int(metrics["epochs_run"]), "seconds": round(result.seconds, 2),
            "patients": len(subset.patients()) if subset.patient_ids is not None else np.nan,
            "best_epoch": int(metrics["best_epoch"]),
            "run_dir": "" if folder is False else str(folder),
        })
    return pd.DataFrame(rows)


def summarize_curve(table, metric: str = "dice"):
    """Mean, sd and number of seeds per method and number of shots.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        table: a :func:`learning_curve` table.
        metric: the column to summarise.

    Returns:
        DataFrame with columns ``method``, ``shots``, ``mean``, ``sd`` (0 for one seed),
        ``seeds``.
    """
    if metric not in table.columns:
        raise _expected(metric, [c for c in table.columns if c not in ("method", "shots", "seed")], "metric")
    grouped = table.groupby(["method", "shots"], sort=False)[metric]
    out = grouped.agg(mean="mean", sd=lambda s: float(np.std(s, ddof=1)) if len(s) > 1 else 0.0,
                      seeds="size").reset_index()
    return out


def transfer_effect(table, method: str, baseline: str = "scratch", metric: str = "dice",
                    min_difference: float = 0.02, learned: float = LEARNED_DICE):
    """Did ``method`` beat ``baseline``? Paired differences per number of shots, with a verdict.

    Runs with the same seed and shots saw the same slices, loader order and augmentation, so
    they are compared pairwise: ``d = metric(method) - metric(baseline)`` per seed. The
    verdict is ``"helped"`` when every seed improved and the mean gain is at least
    ``min_difference``, ``"hurt"`` in the mirror case, else ``"no clear difference"``; with a
    single seed it is ``"one seed: cannot tell"``. Where neither network learned (both means
    below ``learned``) the verdict is ``"neither learned: cannot judge"``, whatever the seeds
    say. This is a description of the seeds run here, not a significance test (notebook 06
    has those).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        table: a :func:`learning_curve` table holding both methods.
        method: the method to judge.
        baseline: the reference method.
        metric: the column compared.
        min_difference: smallest mean gain (or loss) that counts.
        learned: the level (of ``metric``) both means must stay below for "neither learned"
            (:data:`LEARNED_DICE`; 0 turns the rule off).

    Returns:
        DataFrame, one row per shots present for both methods: ``shots``, ``seeds``,
        ``method_mean``, ``baseline_mean``, ``mean_difference``, ``sd_difference``,
        ``improved_seeds``, ``verdict``.

    Raises:
        ValueError: a method missing from the table, or an unknown metric.
    """
    import pandas as pd

    present = list(dict.fromkeys(table["method"]))
    for name in (method, baseline):
        if name not in present:
            raise _expected(name, present, "method")
    if metric not in table.columns:
        raise _expected(metric, [c for c in table.columns if c not in ("method", "shots", "seed")], "metric")
    a = table[table["method"] == method].set_index(["shots", "seed"])[metric]
    b = table[table["method"] == baseline].set_index(["shots", "seed"])[metric]
    paired = pd.concat({"method": a, "baseline": b}, axis=1).dropna()
    rows = []
    for shots, part in paired.groupby(level="shots", sort=True):
        d = (part["method"] - part["baseline"]).to_numpy(float)
        n = len(d)
        mean = float(d.mean())
        if max(part["method"].mean(), part["baseline"].mean()) < learned:
            verdict = "neither learned: cannot judge"
        elif n < 2:
            verdict = "one seed: cannot tell"
        elif (d > 0).all() and mean >= min_difference:
            verdict = "helped"
        elif (d < 0).all() and mean <= -min_difference:
            verdict = "hurt"
        else:
            verdict = "no clear difference"
        rows.append({"shots": int(shots), "seeds": n, "method_mean": float(part["method"].mean()),
                     "baseline_mean": float(part["baseline"].mean()), "mean_difference": mean,
                     "sd_difference": float(d.std(ddof=1)) if n > 1 else 0.0,
                     "improved_seeds": int((d > 0).sum()), "verdict": verdict})
    return pd.DataFrame(rows)


def plot_learning_curve(table, metric: str = "dice", ax=None):
    """Metric against the number of training slices: mean ± sd (band and bars) per method, seeds as dots.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        table: a :func:`learning_curve` table.
        metric: the column to plot.
        ax: an existing Axes to draw in (its Figure is returned); None makes a new Figure.

    Returns:
        The matplotlib Figure.
    """
    from matplotlib.figure import Figure

    summary = summarize_curve(table, metric)
    if ax is None:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    colours = ["#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#555555"]
    for i, (name, part) in enumerate(summary.groupby("method", sort=False)):
        colour = colours[i % len(colours)]
        part = part.sort_values("shots")
        x = part["shots"].to_numpy(float)
        mean, sd = part["mean"].to_numpy(float), part["sd"].to_numpy(float)
        ax.plot(x, mean, marker="o", color=colour, label=f"{name} (mean ± sd)")
        ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.18, linewidth=0)
        # Error bars too: a method run at one number of shots has no band to show its sd.
        ax.errorbar(x, mean, yerr=sd, fmt="none", ecolor=colour, capsize=4, linewidth=1)
        runs = table[table["method"] == name]
        # Small sideways offsets so the seeds of different methods do not hide each other.
        jitter = (i - (summary["method"].nunique() - 1) / 2) * 0.012 * max(1.0, float(x.max()))
        ax.scatter(runs["shots"].to_numpy(float) + jitter, runs[metric], s=12, color=colour, alpha=0.6)
    seeds = int(table["seed"].nunique())
    ax.set(xlabel="target training slices (shots)", ylabel=metric,
           title=f"{metric} vs training slices ({seeds} seed{'s' if seeds != 1 else ''} per point)")
    if metric in ("dice", "iou", "sensitivity", "specificity"):
        ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(sorted(table["shots"].unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
