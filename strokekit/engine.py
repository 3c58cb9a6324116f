"""One engine: the training loop every trainer of the kit calls.

:func:`fit` trains a Keras model through a list of :class:`Phase` s (plain training is one phase;
gradual unfreezing is several, each with its own trainable layers and learning rate). It owns what
every study would otherwise write again: compiling (one optimizer, :func:`make_optimizer`; XLA on or
off, :func:`jit_compile_setting`), reusing compiled models (:func:`compile_model`,
:class:`ModelPool`), the best weights, early stopping, the learning-rate schedule, the progress bar,
per-epoch previews, the history and, given a :class:`strokekit.runs.RunFolder`, what the run writes:
``history.csv`` and ``model.keras`` as it goes, and a checkpoint at the end of every epoch (or every
``checkpoint_every``-th) that ``resume=True`` continues from. The studies (:func:`strokekit.train.train`,
:func:`strokekit.multiclass.train_multiclass`, :func:`strokekit.transfer.fine_tune`,
:func:`strokekit.perfusion.train_perfusion`) supply data, model, loss and metrics.

Keras' own callbacks do the learning-rate schedules; one callback of the kit (:class:`_Tracker`)
does what Keras lacks: best weights and early stopping that carry across phases and a resume.

Introduced in notebooks/04_unet_vs_resunet.ipynb (d2l's single ``Trainer.fit``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

#: Learning-rate schedules :func:`fit` knows (see its ``schedule``).
LR_SCHEDULES: tuple[str, ...] = ("plateau", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training with fixed trainable layers and one starting learning rate.

    Attributes:
        epochs: epochs in this phase.
        trainable: None leaves the layers' ``trainable`` flags as they are; ``"all"`` makes every
            layer trainable; a function ``set_flags(model)`` sets them (e.g. freezes the encoder)
            and may return a dict of columns for this phase's history rows (e.g. the open blocks).
        learning_rate: Adam's learning rate at the start of the phase.
    """

    epochs: int
    trainable: str | Callable[[Any], dict | None] | None = None
    learning_rate: float = 1e-3

    def set_trainable(self, model) -> dict:
        """Set the model's flags for this phase; returns the phase's history columns."""
        if self.trainable == "all":
            model.trainable = True
            for layer in model.layers:
                layer.trainable = True
        elif callable(self.trainable):
            return dict(self.trainable(model) or {})
        elif self.trainable is not None:
            raise ValueError(f"Expected None, 'all' or a function. Received: trainable={self.trainable!r}")
        return {}


@dataclasses.dataclass(frozen=True)
class Previews:
    """Fixed validation slices to draw after every epoch into the run's ``previews/`` folder."""

    images: np.ndarray
    masks: np.ndarray
    threshold: float = 0.5


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        model: the model, with the best epoch's weights unless ``restore_best=False``.
        history: one row per epoch: ``epoch`` (from 1), ``phase`` (from 0), ``learning_rate``, the
            phase's own columns, then Keras' logs (``loss``, metrics, ``val_loss``, ...).
        best_epoch: the epoch (from 1) with the lowest monitored value (the last when none was finite).
        seconds: training time (of an interrupted run and its resumption together).
        stopped_early: whether early stopping ended the run.
    """

    model: Any
    history: Any
    best_epoch: int
    seconds: float
    stopped_early: bool


def fit(model, train_loader, val_loader, phases: Sequence[Phase], loss, metrics: Sequence[Any] = (), *,
        monitor: str = "val_loss", patience: int = 0, restore_best: bool = True, schedule: str = "constant",
        reduce_lr_patience: int = 0, min_lr: float = 1e-6, run=None, resume: bool = False,
        progress: bool = True, previews: Previews | None = None, callbacks: Sequence[Any] = (),
        pool: ModelPool | None = None, desc: str = "training", checkpoint: bool = True,
        checkpoint_every: int = 1) -> FitResult:
    """Train ``model`` phase by phase; the one training loop of the kit.

    Args:
        model: a Keras model; changed in place (weights, and the flags of the last phase run).
        train_loader: training batches (a ``keras.utils.PyDataset``; one with ``set_epoch``, such as
            :class:`strokekit.augment.SegmentationLoader`, is put at each phase's first epoch).
        val_loader: validation batches.
        phases: the :class:`Phase` s, in order.
        loss, metrics: for ``model.compile``.
        monitor: the logged value whose lowest epoch is the best (best weights, early stopping).
        patience: stop after this many epochs in a row without a lower ``monitor`` (0: never).
        restore_best: end with the best epoch's weights.
        schedule: ``"plateau"`` (halve the rate after ``reduce_lr_patience`` epochs without
            improvement, down to ``min_lr``; each phase starts afresh), ``"cosine"`` (from each
            phase's rate along a half cosine to 1/100 of it at the last epoch of all phases) or
            ``"constant"``.
        reduce_lr_patience, min_lr: of the ``"plateau"`` schedule (patience 0: no halving).
        run: a :class:`strokekit.runs.RunFolder` to write ``history.csv``, ``model.keras`` (the
            best epoch so far, and at the end the model returned), ``previews/`` and the checkpoint
            (:meth:`strokekit.runs.RunFolder.save_checkpoint`: model, optimizer, epoch, history, best
            value and weights, schedule state, whether early stopping ended the run); the checkpoint
            is removed when training ends. None writes nothing.
        resume: continue the run in ``run`` from its checkpoint (history, weights, optimizer, best
            weights, schedule state and the random state of the batch order as they were), which
            reproduces the uninterrupted run; a checkpoint of the last epoch (or of an early stop)
            only finishes the run. Without a checkpoint (interrupted in its first epochs), start afresh.
        progress: a progress bar over epochs.
        previews: slices drawn after every epoch into ``run``'s ``previews/`` (needs ``run``).
        callbacks: more Keras callbacks for every phase (their ``model`` is the one training it).
        pool: compiled copies to train in (:class:`ModelPool`); None trains ``model`` itself.
        desc: the progress bar's label.
        checkpoint: write the checkpoint into ``run`` (False for callers that cannot resume).
        checkpoint_every: write it after every this many epochs (and after the last one, or an early
            stop); ``resume`` then repeats up to ``checkpoint_every - 1`` epochs, with the same
            result. 1 suits the kit's models (a few MB); a checkpoint is a full copy of the model
            with its optimizer state (about 370 MB for the study's 31M-parameter U-Net), so a large
            model trained for many short epochs may write it less often.

    Returns:
        :class:`FitResult`.

    Raises:
        ValueError: an unknown schedule, no phases, ``checkpoint_every`` below 1, ``resume`` without
            a run folder, or ``resume`` of a run that finished (a model and no checkpoint).
    """
    import keras
    from tqdm.auto import tqdm

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"Expected one of {list(LR_SCHEDULES)}. Received: schedule={schedule!r}")
    if not phases or (resume and run is None) or checkpoint_every < 1:
        raise ValueError("fit needs at least one phase and checkpoint_every >= 1, and resume=True needs a run "
                         f"folder. Received: {len(phases)} phases, checkpoint_every={checkpoint_every}, run={run!r}")
    total = sum(int(p.epochs) for p in phases)
    tracker = _Tracker(monitor, patience, restore_best, run, checkpoint_every if checkpoint else 0, total)
    done = tracker.open(resume)  # epochs already trained by an interrupted run
    extra = list(callbacks)
    if previews is not None and run is not None:
        extra.append(PreviewCallback(previews.images, previews.masks, run.previews_dir, previews.threshold))
    tracker.bar = tqdm(total=total, initial=done, desc=desc, unit="epoch", leave=False, disable=not progress)
    tracker.start, last = time.perf_counter() - tracker.seconds, 0  # a resumed run counts its earlier time
    trained = False
    with warnings.catch_warnings():
        # Each phase recompiles on purpose; Keras' "trainable state changed" note is moot.
        warnings.filterwarnings("ignore", message=".*trainable.*state has changed.*")
        for index, phase in enumerate(phases):
            if tracker.stopped:
                break
            first, last = last, last + int(phase.epochs)
            begin = max(first, done)
            if begin >= last:
                continue
            trained = True
            columns = phase.set_trainable(model)
            if pool is None:
                runner = compile_model(model, loss, metrics, phase.learning_rate)
            else:
                runner = pool.runner(model, loss, metrics, phase.learning_rate)
            if begin == done > 0:  # the phase an interrupted run stopped in (or before)
                tracker.load_checkpoint(runner, optimizer=begin > first)
            tracker.start_phase(index, columns)
            if hasattr(train_loader, "set_epoch"):
                # fit() advances the loader once before its first epoch, so each phase continues the
                # loader's epoch numbering (and augmentation draws) where the last one stopped.
                train_loader.set_epoch(begin)
            schedule_cbs = schedule_callbacks(schedule, phase.learning_rate, total, reduce_lr_patience,
                                              min_lr, monitor)
            tracker.plateau = next((c for c in schedule_cbs if isinstance(c, keras.callbacks.ReduceLROnPlateau)),
                                   None)
            runner.fit(train_loader, validation_data=val_loader, initial_epoch=begin, epochs=last,
                       verbose=0, callbacks=[*schedule_cbs, *extra, tracker])
            if runner is not model:
                copy_variables(runner, model)
    if done and not trained:  # every epoch was done (or an early stop had ended the run): finish it
        phases[tracker.phase].set_trainable(model)
        tracker.load_checkpoint(model)
    tracker.bar.close()
    seconds = time.perf_counter() - tracker.start
    history = tracker.finish(model)
    return FitResult(model, history, tracker.best_epoch or len(history), seconds, tracker.stopped)


# --------------------------------------------------------------------------- the tracker


class _Tracker:
    """Factory for the callback that lives through all phases of :func:`fit`: history rows, best
    weights, early stopping, the progress bar and, with a run folder, what the run writes.

    It runs after every other callback of an epoch, so the checkpoint holds the schedule's state
    after that epoch's update; it reads the learning rate when an epoch begins (after a schedule set it).
    It checkpoints every ``every`` epochs (0: never), after the last of ``total`` and after an early stop.
    """

    def __new__(cls, monitor: str, patience: int, restore_best: bool, run, every: int, total: int):
        import keras

        class Tracker(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.rows: list[dict[str, Any]] = []
                self.best, self.best_epoch, self.best_weights = math.inf, 0, None
                self.wait, self.stopped, self.start, self.seconds = 0, False, 0.0, 0.0
                self.phase, self.columns, self.plateau, self.bar = 0, {}, None, None
                self.restore_plateau: dict | None = None
                self.random: list | None = None  # the random states a resumed run puts back

            def start_phase(self, index: int, columns: dict) -> None:
                self.phase, self.columns = index, columns

            def on_train_begin(self, logs=None):
                # Keras' ReduceLROnPlateau resets itself when fit() begins; a resumed phase puts back
                # its counters (the learning rate came back with the optimizer).
                state = self.restore_plateau
                if state is not None and self.plateau is not None:
                    self.plateau.best = None if state["best"] is None else float(state["best"])
                    self.plateau.wait, self.plateau.cooldown_counter = state["wait"], state["cooldown_counter"]
                self.restore_plateau = None

            def on_epoch_begin(self, epoch, logs=None):
                self.learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

            def on_epoch_end(self, epoch, logs=None):
                logs = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
                self.rows.append({"epoch": epoch + 1, "phase": self.phase, "learning_rate": self.learning_rate,
                                  **self.columns, **logs})
                current = logs.get(monitor, math.nan)
                improved = math.isfinite(current) and current < self.best
                if improved:
                    self.best, self.best_epoch, self.wait = current, epoch + 1, 0
                    if restore_best:
                        self.best_weights = self.model.get_weights()
                else:
                    self.wait += 1
                    if patience and self.wait >= patience:
                        self.stopped = self.model.stop_training = True
                if self.bar is not None:
                    shown = ("loss", "val_loss", "val_dice")
                    self.bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in shown})
                    self.bar.update(1)
                if run is not None:
                    self.save(epoch + 1, improved)

            # ------------------------------------------------------------ the run folder
            def save(self, epochs_done: int, improved: bool) -> None:
                if improved:
                    run.save_model(self.model)
                run.write_history(_csv_ready(self.rows))
                if not every or not (epochs_done % every == 0 or epochs_done == total or self.stopped):
                    return
                plateau = None if self.plateau is None else {"best": _plain(self.plateau.best),
                    "wait": int(self.plateau.wait), "cooldown_counter": int(self.plateau.cooldown_counter)}
                state = {"epochs_done": epochs_done, "phase": self.phase, "best": _plain(self.best),
                         "best_epoch": self.best_epoch, "wait": self.wait, "stopped": self.stopped,
                         "plateau": plateau, "seconds": time.perf_counter() - self.start,
                         "random": _get_random_state(), "rows": self.rows}
                # The best weights go with the checkpoint unless they are its own (model.keras may be
                # ahead of a checkpoint written every few epochs).
                apart = self.best_weights is not None and self.best_epoch != epochs_done
                run.save_checkpoint(self.model, state, self.best_weights if apart else None)

            def open(self, resume: bool) -> int:
                """Epochs done by the interrupted run resumed (0 for a new run); marks the run as training."""
                saved = run.read_checkpoint() if resume else None
                if saved is None:
                    if resume and run.model_path.is_file() and not run.checkpoint_state_path.exists():
                        raise ValueError(f"the run in {run.folder} finished (it has a model and no checkpoint): "
                                         "nothing to resume; pass overwrite=True to train it again")
                    if run is not None and every:  # a new run, or one stopped before its first checkpoint
                        run.start_training()
                    return 0
                state, best_weights = saved
                self.rows = [{k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
                             for row in state["rows"]]
                self.best, self.best_epoch, self.wait = float(state["best"]), state["best_epoch"], state["wait"]
                self.restore_plateau, self.seconds = state["plateau"], float(state["seconds"])
                self.random, self.stopped = state["random"], bool(state.get("stopped", False))
                self.phase = int(state["phase"])
                if restore_best and self.best_epoch:
                    # Stored apart, else the checkpoint's own (a checkpoint written before the best
                    # weights went into it: model.keras, saved at the best epoch).
                    own = run.checkpoint_path if self.best_epoch == state["epochs_done"] else run.model_path
                    self.best_weights = best_weights or load_model(own, compile=False).get_weights()
                return int(state["epochs_done"])

            def load_checkpoint(self, runner, optimizer: bool = False) -> None:
                # Keras' fit() shuffles the order of a PyDataset's batches with Python's `random`: put
                # back the state the interrupted run had, so the next epochs draw the same orders.
                _set_random_state(self.random)
                if optimizer:  # weights and the optimizer's state (same trainable weights as saved)
                    runner.load_weights(run.checkpoint_path)
                else:  # a new phase starts with a fresh optimizer; a finished run needs none
                    copy_variables(load_model(run.checkpoint_path, compile=False), runner)
                    self.restore_plateau = None

            def finish(self, model):
                import pandas as pd

                if restore_best and self.best_weights is not None:
                    model.set_weights(self.best_weights)
                history = pd.DataFrame(self.rows)
                if run is not None:
                    run.write_history(_csv_ready(self.rows))
                    if self.best_epoch or not restore_best:
                        run.save_model(model)
                    run.remove_checkpoint()
                return history

        return Tracker()


def _plain(value):
    """A number of Keras' callbacks (NumPy or tensor scalars, inf) as JSON can hold it."""
    if value is None:
        return None
    value = float(np.asarray(value))
    return value if math.isfinite(value) else str(value)


def _get_random_state() -> list:
    """The global random states of Python and NumPy, as JSON can hold them."""
    import random

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [[version, list(internal), gauss], [name, keys.tolist(), pos, has_gauss, cached]]


def _set_random_state(state: list) -> None:
    """Put back the global random states of :func:`_get_random_state`."""
    import random

    (version, internal, gauss), (name, keys, pos, has_gauss, cached) = state
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))


def _csv_ready(rows: list[dict[str, Any]]):
    """The history as a DataFrame for ``history.csv``: tuples (e.g. open blocks) joined by ``+``."""
    import pandas as pd

    return pd.DataFrame([{k: "+".join(v) if isinstance(v, tuple) else v for k, v in row.items()} for row in rows])


def _check_keras_file(path: Path) -> None:
    """A ``.keras`` file is a zip archive holding ``config.json``; check that before Keras reads it.

    Keras answers a truncated or empty file with "File not found", which sends people looking
    for the wrong problem.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            complete = "config.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        complete = False
    if not complete:
        raise DataError(
            "model file is damaged or not a Keras model (not a complete .keras archive)", path
        )


def load_model(path: str | os.PathLike, compile: bool = True):
    """Load a saved ``.keras`` model (or a run folder's) in Keras safe mode with the kit's objects.

    The kit's one model loader: :func:`strokekit.train.load_model` (its name in notebooks 06 and 09),
    :meth:`strokekit.runs.RunFolder.load_model`, a checkpoint for ``resume`` (``compile=False``).

    Args:
        path: a ``.keras`` file, or a run folder holding ``model.keras``.
        compile: restore the saved loss, metrics and optimizer (False: the network only).

    Raises:
        DataError: no model at ``path``, or the file is damaged (truncated, empty, not a zip
            archive, a corrupted member) or not a Keras model.
    """
    import zipfile

    path = Path(path)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise DataError("no saved model here", path)
    if path.suffix.lower() not in (".h5", ".hdf5"):  # legacy HDF5 files are Keras' to check
        _check_keras_file(path)

    import keras

    from . import losses, models  # noqa: F401  (registers the kit's layers, losses and metrics)

    try:
        return keras.saving.load_model(path, safe_mode=True, compile=compile)
    except zipfile.BadZipFile as exc:  # a member fails its CRC check
        raise DataError(f"model file is damaged or not a Keras model ({exc})", path) from None


# --------------------------------------------------------------------------- compiling


def jit_compile_setting(value: bool | str = "auto") -> bool | str:
    """Keras' ``jit_compile`` for short CPU runs: XLA off on TensorFlow without a GPU.

    Keras' own "auto" turns XLA on wherever the layers allow it; on a CPU the XLA compilation of
    a U-Net takes several times longer than the few epochs of a classroom run. JAX and PyTorch
    keep "auto" (JAX without jit would run eagerly, far slower).
    """
    if value != "auto":
        return bool(value)
    import keras

    if keras.backend.backend() != "tensorflow":
        return "auto"
    import tensorflow as tf

    return "auto" if tf.config.list_physical_devices("GPU") else False


def make_optimizer(learning_rate: float):
    """The kit's optimizer: Adam at ``learning_rate``."""
    import keras

    return keras.optimizers.Adam(learning_rate)


def build_optimizer(model) -> None:
    """Create the optimizer's slots for the model's trainable weights now, before ``fit``.

    Otherwise TensorFlow creates them while tracing the first training step and then traces
    that step a second time: 3-5 s per training run on a small CPU, most of a quick run.
    The slots start at zero either way, so training is unchanged.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not getattr(optimizer, "built", True) and model.trainable_variables:
        optimizer.build(model.trainable_variables)


def trainable_mask(model) -> tuple:
    """The model's and every layer's ``trainable`` flag: what a compiled training step is fixed to."""
    return (bool(model.trainable),) + tuple((layer.name, bool(layer.trainable)) for layer in model.layers)


def _compile_signature(loss, metrics) -> str:
    import keras

    return json.dumps(keras.saving.serialize_keras_object([loss, list(metrics)]), sort_keys=True, default=str)


def compile_model(model, loss, metrics: Sequence[Any], learning_rate: float):
    """Compile with a fresh :func:`make_optimizer` at ``learning_rate``, the loss and the metrics.

    When the model was last compiled here with the same trainable layers, loss and metrics, its
    compiled training step is kept and only the optimizer is reset (slots and step count to zero,
    the new learning rate): the state a new compile gives, without tracing the step again (seconds
    per call on a CPU). Keras fixes the trainable weights at compile time, so changing ``trainable``
    flags needs this call before training.

    Returns:
        The model (compiled in place).
    """
    import keras

    optimizer = getattr(model, "optimizer", None)
    key = (trainable_mask(model), _compile_signature(loss, metrics), id(optimizer))
    if optimizer is not None and model.__dict__.get("_strokekit_compile_key") == key:
        # make_optimizer builds Adam, whose step count and moment slots all start at 0.
        for variable in optimizer.variables:
            variable.assign(keras.ops.zeros(variable.shape, dtype=variable.dtype))
        optimizer.learning_rate = learning_rate
        return model
    # Fresh metric objects for every compile: one shared by two compiled models carries the
    # counts of the first into the first epoch of the second.
    metrics = [type(m).from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m for m in metrics]
    model.compile(optimizer=make_optimizer(learning_rate), loss=loss, metrics=metrics,
                  jit_compile=jit_compile_setting())
    build_optimizer(model)
    # Set past Keras' attribute tracking: a plain marker, not model state.
    object.__setattr__(model, "_strokekit_compile_key", key[:-1] + (id(model.optimizer),))
    return model


def copy_variables(source, target) -> None:
    """Every layer variable (weights, batch-norm statistics, seed states) from source to target."""
    for a, b in zip(source.layers, target.layers):
        for va, vb in zip(a.variables, b.variables):
            vb.assign(va.value)


def architecture(model) -> tuple:
    """What two models must share for one to take the other's weights: layers and shapes."""
    return tuple((layer.__class__.__name__, layer.name, tuple(tuple(v.shape) for v in layer.variables))
                 for layer in model.layers)


class ModelPool:
    """Compiled copies of models, reused across phases and runs that share an architecture,
    trainable layers, loss and metrics.

    Compiling a Keras model and tracing its training step takes seconds on a CPU, every time, and
    a schedule comparison (several schedules × seeds × phases) compiles dozens of times for only a
    handful of distinct settings. The pool keeps one compiled copy per setting and, for each phase,
    loads the model's weights into it and resets the optimizer (:func:`compile_model`): the result
    is that of compiling afresh; only the waiting goes.

    Args:
        owner: a model that may train its own first setting itself (see :meth:`of`); None: every
            setting trains in a copy.

    Attributes:
        compiles: how many copies were compiled.
    """

    def __init__(self, owner=None):
        self._compiled: dict[Any, Any] = {}
        self._owner = owner
        self.compiles = 0

    @classmethod
    def of(cls, model) -> ModelPool:
        """The pool kept with ``model`` (made on first use): the first setting met trains in
        ``model`` itself, each other one in a copy kept for later calls with the same model."""
        pool = model.__dict__.get("_strokekit_pool")
        if pool is None:
            pool = cls(owner=model)
            # Set past Keras' attribute tracking: a cache, not part of the model's state.
            object.__setattr__(model, "_strokekit_pool", pool)
        return pool

    def runner(self, model, loss, metrics: Sequence[Any], learning_rate: float):
        """A compiled model with ``model``'s architecture and trainable flags, holding its weights."""
        import keras

        key = (architecture(model), trainable_mask(model), _compile_signature(loss, metrics))
        twin = self._compiled.get(key)
        if twin is None:
            own = model is self._owner and all(m is not model for m in self._compiled.values())
            twin = model if own else keras.models.clone_model(model)
            if twin is not model:
                twin.trainable = model.trainable
                for layer, flag in zip(twin.layers, key[1][1:]):
                    layer.trainable = flag[1]
            self._compiled[key] = twin
            self.compiles += 1
        if twin is not model:
            copy_variables(model, twin)
        return compile_model(twin, loss, metrics, learning_rate)


# --------------------------------------------------------------------------- schedules


def cosine_learning_rate(epoch: int, num_epochs: int, learning_rate: float, final_fraction: float = 0.01) -> float:
    """The ``"cosine"`` schedule: the learning rate of epoch ``epoch`` (0-based) of ``num_epochs``.

    Falls along a half cosine from ``learning_rate`` (first epoch) to
    ``final_fraction · learning_rate`` (last epoch).
    """
    progress = epoch / max(num_epochs - 1, 1)
    return learning_rate * (
        final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    )


def schedule_callbacks(schedule: str, learning_rate: float, num_epochs: int, reduce_lr_patience: int = 0,
                       min_lr: float = 1e-6, monitor: str = "val_loss") -> list:
    """Keras' callbacks of a learning-rate schedule (see :func:`fit`): halving on a plateau of
    ``monitor``, or the cosine from ``learning_rate`` over ``num_epochs``; none for ``"constant"``."""
    import keras

    if schedule == "plateau" and reduce_lr_patience:
        return [keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=reduce_lr_patience,
                                                  min_lr=min_lr)]
    if schedule == "cosine":
        return [keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: cosine_learning_rate(epoch, num_epochs, learning_rate))]
    return []


# --------------------------------------------------------------------------- previews


def preview_indices(masks: np.ndarray, count: int) -> np.ndarray:
    """Fixed preview slices: the validation slices with the largest lesions, then the rest."""
    area = (masks > 0).reshape(len(masks), -1).sum(axis=1)
    return np.argsort(-area, kind="stable")[: min(count, len(masks))]


def predict_numpy(model, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Model outputs as a NumPy array, computed eagerly batch by batch.

    For the small arrays of this course an eager call is cheaper than ``model.predict``, which
    compiles a new function for every model (and warns about retracing when many are trained).
    """
    import keras

    out = [keras.ops.convert_to_numpy(model(x[i:i + batch_size], training=False))
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def save_preview(images, masks, prob, path: str | os.PathLike, title: str = "", threshold: float = 0.5) -> Path:
    """Write a PNG grid: each slice with its true mask (top) and the prediction (bottom): the
    thresholded probability of a one-channel model, the arg-max label of a softmax one."""
    from matplotlib.figure import Figure  # no pyplot: never changes the notebook's backend

    from .preprocess import overlay_mask

    path = Path(path)
    n = len(images)
    fig = Figure(figsize=(2.2 * n, 4.6))
    axes = fig.subplots(2, n, squeeze=False)
    for i in range(n):
        grey = np.clip(images[i][..., 0], 0.0, 1.0)
        truth = masks[i] if masks[i].ndim == 2 else masks[i][..., 0]
        p = prob[i][..., 0] if prob.shape[-1] == 1 else np.argmax(prob[i], axis=-1)
        pred = (p >= threshold).astype(np.uint8) if prob.shape[-1] == 1 else p.astype(np.uint8)
        axes[0, i].imshow(overlay_mask(grey, truth))
        axes[1, i].imshow(overlay_mask(grey, pred))
        axes[0, i].set_axis_off()
        axes[1, i].set_axis_off()
    axes[0, 0].set_title("truth", fontsize=8, loc="left")
    axes[1, 0].set_title("prediction", fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


class PreviewCallback:
    """Factory for a Keras callback that saves predicted masks on fixed slices after every epoch."""

    def __new__(cls, images: np.ndarray, masks: np.ndarray, folder: Path, threshold: float = 0.5,
                every: int = 1):
        import keras

        class _Preview(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if (epoch + 1) % every:
                    return
                prob = predict_numpy(self.model, images)
                save_preview(images, masks, prob, Path(folder) / f"epoch_{epoch + 1:03d}.png",
                             title=f"epoch {epoch + 1}", threshold=threshold)

        return _Preview()


# --------------------------------------------------------------------------- after training
def recalibrate_batchnorm(model, images: np.ndarray, batch_size: int = 8) -> int:
    """Set every BatchNormalization layer's statistics to their average over ``images``.

    A batch-normalised network trains with each batch's own mean and variance but predicts
    with running averages that trail them (momentum 0.99: a few hundred steps to settle). A
    few-shot run takes only a few hundred steps, on crops rich in lesions and augmented, so
    the running averages describe neither the last weights nor whole slices: the network then
    predicts much worse than its training Dice says. One forward pass over the whole training
    slices in training mode, with the momentum set to give an exact running mean, fixes the
    statistics without changing a weight.

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        model: a Keras model (unchanged if it has no BatchNormalization layer).
        images: model inputs (N, H, W, C), e.g. the unaugmented training slices.
        batch_size: slices per forward pass.

    Returns:
        The number of BatchNormalization layers recalibrated.
    """
    import keras

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or len(images) == 0:
        return 0
    saved = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, len(images), batch_size)):
            for layer in layers:
                layer.momentum = k / (k + 1.0)  # running mean of the per-batch statistics
            model(images[start:start + batch_size], training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return len(layers)
