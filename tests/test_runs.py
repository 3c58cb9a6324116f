"""One run folder (strokekit.runs): what a run writes, how a second run into it is refused, how
old folders without a ``kind`` are still read, and which runs ``list_runs`` finds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from strokekit import train
from strokekit.augment import NO_AUGMENT
from strokekit.config import to_dict
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.runs import RunFolder, data_text, list_runs, write_json

CONFIG = train.TrainConfig(image_size=16, filters=(4, 8), num_epochs=1, batch_size=4, augment=NO_AUGMENT,
                           early_stopping_patience=0, reduce_lr_patience=0, preview_slices=0, workers=1)


def _finished(folder, kind="binary", config=CONFIG):
    """A finished run folder; its model.keras only has to exist to be listed."""
    run = RunFolder.create(folder, kind, config)
    run.model_path.write_bytes(b"PK")
    return run


def test_create_writes_config_with_its_kind_and_the_files_read_back(tmp_path):
    run = RunFolder.create(tmp_path / "run", "binary", CONFIG)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved == {"kind": "binary", **to_dict(CONFIG)}
    run.write_history(pd.DataFrame({"epoch": [1, 2], "loss": [0.5, 0.25]}))
    data = SliceDataset(np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.uint8), ["a", "b", "c"],
                        ["p", "p", "q"])
    run.write_metrics({"dice": np.float32(0.5)}, data=data_text(data))
    back = RunFolder.open(tmp_path / "run")
    assert back.kind == "binary" and train.config_from_dict(back.config) == CONFIG
    assert back.metrics == {"dice": 0.5, "data": "validation: 3 slices of 2 patients"}
    assert back.history["loss"].tolist() == [0.5, 0.25]
    assert back.split_path is None and not back.finished
    with pytest.raises(ValueError, match=r"Expected one of \['binary', .*Received: kind='segmentation'"):
        RunFolder.create(tmp_path / "other", "segmentation", CONFIG)


def test_a_folder_that_holds_a_run_is_refused_unless_overwrite_or_resume(tmp_path):
    folder = tmp_path / "run"
    run = _finished(folder)
    run.write_metrics({"dice": 0.5}, data="validation")
    run.write_json("fewshot.json", {"kind": "few-shot"})
    (run.previews_dir).mkdir()
    (run.previews_dir / "epoch_001.png").write_bytes(b"png")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"{folder} already holds a run; pass overwrite=True"):
        RunFolder.create(folder, "multiclass", {"base_filters": 4})
    assert RunFolder.open(folder).kind == "binary"  # nothing changed

    RunFolder.create(folder, "binary", CONFIG, resume=True)  # keeps the run's files
    assert run.model_path.is_file() and (folder / "metrics.json").is_file()

    RunFolder.create(folder, "multiclass", {"base_filters": 4}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "notes.txt"]  # the old run's files are gone
    assert RunFolder.open(folder).kind == "multiclass"


def test_open_infers_the_kind_of_a_folder_written_before_kind_was_recorded(tmp_path):
    legacy = {"binary": to_dict(CONFIG), "multiclass": {"base_filters": 8, "num_levels": 3},
              "perfusion": {"filters": [8, 16], "use_clinical": True}, "fewshot": to_dict(CONFIG)}
    for kind, config in legacy.items():
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "config.json").write_text(json.dumps(config))
    (tmp_path / "fewshot" / "fewshot.json").write_text("{}")
    for kind in legacy:
        assert RunFolder.open(tmp_path / kind).kind == kind
    with pytest.raises(DataError, match="not a run folder"):
        RunFolder.open(tmp_path)


def test_list_runs_finds_finished_runs_of_a_kind(tmp_path):
    binary = _finished(tmp_path / "04" / "single")
    fewshot = _finished(tmp_path / "10" / "ct", "fewshot")
    multiclass = _finished(tmp_path / "07" / "s0", "multiclass", {"base_filters": 4})
    RunFolder.create(tmp_path / "04" / "unfinished", "binary", CONFIG)  # no model.keras yet
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{ not json")
    (damaged / "model.keras").write_bytes(b"PK")

    def folders(runs):
        return [run.folder for run in runs]

    with pytest.warns(UserWarning, match=f"skipped the run in {damaged}: config.json cannot be read"):
        assert folders(list_runs(tmp_path)) == [binary.folder, multiclass.folder, fewshot.folder]
    (damaged / "config.json").unlink()
    assert folders(list_runs(tmp_path, kind="multiclass")) == [multiclass.folder]
    assert folders(list_runs(tmp_path, kind=("binary", "fewshot"))) == [binary.folder, fewshot.folder]
    assert list_runs(tmp_path / "missing") == []
    with pytest.raises(ValueError, match="Received: kind='slice'"):
        list_runs(tmp_path, kind="slice")


@pytest.mark.backend
def test_train_into_a_folder_that_holds_a_run_raises_unless_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(30, 2, (8, 16, 16)).astype(np.float32)
    masks = np.zeros((8, 16, 16), np.uint8)
    masks[:, 5:9, 6:10] = 1
    images[masks == 1] = 70.0
    data = SliceDataset(images, masks, [f"c{i}" for i in range(8)], [f"p{i // 2}" for i in range(8)])
    folder = tmp_path / "run"
    _finished(folder)
    (folder / "split.json").write_text("{}")  # an earlier run's split: overwrite removes it
    with pytest.raises(FileExistsError, match=f"{folder} already holds a run"):
        train.train(CONFIG, data.subset(range(6)), data.subset(range(6, 8)), run_dir=folder, progress=False)
    result = train.train(CONFIG, data.subset(range(6)), data.subset(range(6, 8)), run_dir=folder, progress=False,
                         overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "history.csv", "metrics.json", "model.keras"]
    run = RunFolder.open(folder)
    assert run.kind == "binary" and run.metrics["data"] == "validation: 2 slices of 1 patient"
    assert run.metrics["dice"] == pytest.approx(result.metrics["dice"])
    assert [r.folder for r in list_runs(tmp_path, kind="binary")] == [folder]
    assert run.load_model().output_shape == result.model.output_shape


def test_resume_with_other_settings_is_refused_before_anything_is_written(tmp_path):
    _finished(tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_text()
    other = train.TrainConfig(**{**to_dict(CONFIG), "augment": NO_AUGMENT, "learning_rate": 0.5})
    with pytest.raises(ValueError, match="other settings"):
        RunFolder.create(tmp_path / "run", "binary", other, resume=True)
    with pytest.raises(ValueError, match="other settings"):
        RunFolder.create(tmp_path / "run", "multiclass", CONFIG, resume=True)
    assert (tmp_path / "run" / "config.json").read_text() == before  # the run's own settings are kept
    assert RunFolder.create(tmp_path / "run", "binary", CONFIG, resume=True).kind == "binary"


def test_a_run_with_a_checkpoint_is_not_finished_and_not_listed(tmp_path):
    run = _finished(tmp_path / "training")
    _finished(tmp_path / "done")
    run.checkpoint_state_path.write_text("{}")  # still training (or interrupted): model.keras is the best so far
    assert not run.finished and RunFolder.open(tmp_path / "done").finished
    assert [r.folder.name for r in list_runs(tmp_path)] == ["done"]
    run.checkpoint_state_path.unlink()
    run.checkpoint_path.write_bytes(b"PK")  # interrupted while removing its checkpoint: resume finishes it
    assert not run.finished and [r.folder.name for r in list_runs(tmp_path)] == ["done"]


def test_a_damaged_metrics_file_is_named_and_json_files_are_written_one_way(tmp_path, monkeypatch):
    from strokekit import report

    run = _finished(tmp_path / "run")
    (run.folder / "metrics.json").write_text("[1, 2")
    with pytest.raises(DataError, match="metrics.json cannot be read"):
        run.metrics
    (run.folder / "metrics.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="metrics.json holds no scores"):
        run.metrics
    run.write_json("schedule.json", {"epochs": np.int64(3), "blocks": ("enc4", "enc3")})
    write_json(tmp_path / "plain.json", {"epochs": 3, "blocks": ["enc4", "enc3"]})
    assert (run.folder / "schedule.json").read_text() == (tmp_path / "plain.json").read_text()
    monkeypatch.setenv(report.FIGURES_ENV, str(tmp_path / "figures.json"))
    report.record(epochs=np.int64(3))  # the notebooks' figures go through the same writer
    assert (tmp_path / "figures.json").read_text() == '{\n  "epochs": 3\n}\n'


@pytest.mark.backend
def test_a_checkpoint_holds_model_state_and_best_weights_in_one_file(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    run = RunFolder.create(tmp_path / "run", "binary", CONFIG)
    run.start_training()
    assert not run.finished and run.read_checkpoint() is None
    best = [np.full(w.shape, 7.0, w.dtype) for w in model.get_weights()]
    run.save_checkpoint(model, {"epochs_done": 3, "rows": [{"epoch": 1}]}, best)
    state, weights = run.read_checkpoint()
    assert state == {"epochs_done": 3, "rows": [{"epoch": 1}]}
    assert json.loads(run.checkpoint_state_path.read_text()) == state
    assert all(np.array_equal(a, b) for a, b in zip(weights, best, strict=True))
    # checkpoint.json is only a readable copy: a stale one (an interrupt after checkpoint.keras) changes nothing
    run.checkpoint_state_path.write_text(json.dumps({"epochs_done": 2}))
    assert run.read_checkpoint()[0]["epochs_done"] == 3
    loaded = keras.saving.load_model(run.checkpoint_path, compile=False)  # Keras reads it as a model
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights(), strict=True))
    run.save_checkpoint(model, {"epochs_done": 4})
    assert run.read_checkpoint() == ({"epochs_done": 4}, None)
    run.remove_checkpoint()
    assert not run.checkpoint_path.exists() and not run.checkpoint_state_path.exists()
