"""``python -m strokekit evaluate``: the per-case table it prints and the CSV it writes.

The command is introduced in notebooks/06_evaluation.ipynb. A tiny untrained U-Net (32 px,
filters 4-8-16) is saved into a fake run folder; its predictions are thresholded by hand and
the CLI's numbers must equal :func:`strokekit.metrics.dice` on them, case by case.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest

from strokekit import cli, io, metrics
from strokekit.config import to_dict
from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.train import TrainConfig, compile_model, load_model, to_arrays

SIZE = 32
FILTERS = (4, 8, 16)
CASE_IDS = ["case01", "case02", "case03", "case04", "case05"]
PATIENT_IDS = ["pA", "pA", "pB", "pB", "pB"]


def _tiny_dataset() -> SliceDataset:
    """Five 48 px HU slices: four with a bright disc lesion, one without any lesion."""
    rng = np.random.default_rng(0)
    side = 48  # not the model's 32 px, so the CLI's resizing is exercised too
    yy, xx = np.mgrid[:side, :side]
    images = 30.0 + rng.normal(0.0, 6.0, (len(CASE_IDS), side, side))
    masks = np.zeros((len(CASE_IDS), side, side), np.uint8)
    for i, (cy, cx, r) in enumerate([(14, 18, 7), (30, 26, 10), (24, 24, 4), (12, 34, 6)]):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i][disc] = 1
        images[i][disc] += 45.0
    return SliceDataset(images.astype(np.float32), masks, case_ids=CASE_IDS,
                        patient_ids=PATIENT_IDS, unit="HU")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run folder (config.json + model.keras) and a study-layout data folder."""
    import keras

    from strokekit.models import unet

    root = tmp_path_factory.mktemp("cli_evaluate")
    config = TrainConfig(image_size=SIZE, filters=FILTERS)
    keras.utils.set_random_seed(0)
    model = unet(input_shape=(SIZE, SIZE, 1), filters=FILTERS, seed=0)
    compile_model(model, config)
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    model.save(run / "model.keras")
    folder = io.write_study_layout(_tiny_dataset(), root / "data", progress=False)
    return run, folder, config


def _expected_probabilities(run, folder, config):
    """What the model predicts on the data, prepared as a training run would prepare it."""
    data = io.load_dataset(folder, progress=False)
    x, y = to_arrays(config, data)
    prob = np.asarray(load_model(run).predict(x, batch_size=8, verbose=0))[..., 0]
    return data, y, prob


def _printed_rows(text: str) -> list[list[str]]:
    """The per-case table: the lines between the header and the first blank line."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["case_id", "patient_id"])
    rows = []
    for line in lines[header + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_evaluate_run_folder_prints_one_row_per_case_and_csv_matches_dice(setup, tmp_path, capsys):
    run, folder, config = setup
    out = tmp_path / "report.csv"
    code = cli.main(["evaluate", "--model", str(run), "--data", str(folder), "--csv", str(out)])
    assert code == 0
    printed = capsys.readouterr().out

    data, y, prob = _expected_probabilities(run, folder, config)
    expected = {cid: metrics.dice(y[i], prob[i] >= config.threshold)
                for i, cid in enumerate(data.case_ids)}
    # The check is only worth something if the untrained model's masks are not all trivial.
    assert any(0.0 < d < 1.0 for d in expected.values())

    rows = _printed_rows(printed)
    assert [r[0] for r in rows] == data.case_ids
    assert sorted(r[0] for r in rows) == sorted(CASE_IDS)
    assert [r[1] for r in rows] == [dict(zip(CASE_IDS, PATIENT_IDS))[c] for c in data.case_ids]
    for r in rows:  # third column is Dice, printed with four decimals
        assert float(r[2]) == pytest.approx(expected[r[0]], abs=5e-5)

    table = pd.read_csv(out, dtype={"case_id": str, "patient_id": str})
    assert len(table) == len(CASE_IDS)
    assert table["case_id"].tolist() == data.case_ids
    got = dict(zip(table["case_id"], table["dice"]))
    for cid, want in expected.items():
        assert got[cid] == pytest.approx(want, rel=1e-12, abs=1e-12)
    # The lesion-free slice: Dice is 1 only if the model also predicts nothing there.
    empty = table.set_index("case_id").loc["case05"]
    assert empty["truth_pixels"] == 0
    assert empty["dice"] == (1.0 if empty["pred_pixels"] == 0 else 0.0)


def test_evaluate_keras_file_with_threshold(setup, tmp_path, capsys):
    run, folder, config = setup
    out = tmp_path / "report.csv"
    threshold = 0.52
    code = cli.main(["evaluate", "--model", str(run / "model.keras"), "--data", str(folder),
                     "--threshold", str(threshold), "--csv", str(out)])
    assert code == 0
    capsys.readouterr()
    data, y, prob = _expected_probabilities(run, folder, config)
    table = pd.read_csv(out, dtype={"case_id": str, "patient_id": str}).set_index("case_id")
    for i, cid in enumerate(data.case_ids):
        pred = prob[i] >= np.float32(threshold)
        assert table.loc[cid, "pred_pixels"] == int(pred.sum())
        assert table.loc[cid, "dice"] == pytest.approx(metrics.dice(y[i], pred), rel=1e-12, abs=1e-12)
    # A different threshold gives different masks than 0.5 on at least one slice.
    assert any(int((prob[i] >= 0.5).sum()) != table.loc[c, "pred_pixels"]
               for i, c in enumerate(data.case_ids))


def test_evaluate_folder_without_config_is_refused(setup, tmp_path, capsys):
    _, folder, _ = setup
    code = cli.main(["evaluate", "--model", str(tmp_path), "--data", str(folder)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"strokekit evaluate: error: {tmp_path}: not a run folder (no config.json)\n"
    )


# --------------------------------------------------------------------------- bad models and data
def _damaged_models(folder, good):
    """name → a file that is not a loadable .keras model, each damaged in another way."""
    data = good.read_bytes()
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # inside the weights member: its CRC check fails
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"not a model at all",
        "corrupted": bytes(corrupted),
    }
    out = {}
    for name, content in files.items():
        out[name] = folder / f"{name}.keras"
        out[name].write_bytes(content)
    import zipfile

    with zipfile.ZipFile(folder / "other.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip, but no Keras model in it")
    out["other"] = folder / "other.keras"
    return out


def test_load_model_says_a_damaged_file_is_damaged(setup, tmp_path):
    run, _, _ = setup
    for name, path in _damaged_models(tmp_path, run / "model.keras").items():
        with pytest.raises(DataError) as info:
            load_model(path)
        message = str(info.value)
        assert message.startswith(f"{path}: model file is damaged or not a Keras model ("), name
        assert "File not found" not in message


def test_cli_bad_model_or_data_is_one_line_and_exit_code_2(setup, tmp_path, capsys):
    run, folder, _ = setup
    truncated = _damaged_models(tmp_path, run / "model.keras")["truncated"]
    code = cli.main(["evaluate", "--model", str(truncated), "--data", str(folder)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"strokekit evaluate: error: {truncated}: model file is damaged or not a Keras model "
        "(not a complete .keras archive)\n"
    )
    bad_data = tmp_path / "bad-data"
    two_ids = _tiny_dataset().subset([0, 1]).replace(case_ids=["1", "01"])
    io.write_study_layout(two_ids, bad_data, progress=False)
    code = cli.main(["evaluate", "--model", str(run), "--data", str(bad_data)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"strokekit evaluate: error: {bad_data}: two files share the id '1' ('01' and '1' are one "
        "number): 01.png and 1.png; keep one\n"
    )


def test_python_m_strokekit_on_a_damaged_model_prints_no_traceback(setup, tmp_path):
    import subprocess
    import sys

    _, folder, _ = setup
    (tmp_path / "model.keras").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "strokekit", "evaluate", "--model", str(tmp_path / "model.keras"),
         "--data", str(folder)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"strokekit evaluate: error: {tmp_path / 'model.keras'}: model file is damaged or not a "
        "Keras model (not a complete .keras archive)\n"
    )


def test_cli_keeps_tracebacks_for_bugs(monkeypatch):
    def broken(args):
        raise KeyError("a bug in the kit")

    monkeypatch.setitem(cli.COMMANDS, "evaluate", (broken, "broken"))
    with pytest.raises(KeyError, match="a bug in the kit"):
        cli.main(["evaluate", "--model", "m", "--data", "d"])
