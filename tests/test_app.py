"""Tests for strokekit.app: upload checks and messages, readers, model listing, segmentation, downloads."""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from strokekit import app
from strokekit.app import UploadError


# --------------------------------------------------------------------------- fixtures and builders
@pytest.fixture
def work(tmp_path, monkeypatch):
    """Runs and data folders inside tmp_path; the upload work dir under runs; no system temp dir."""
    monkeypatch.setenv("STROKEKIT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("STROKEKIT_DATA", str(tmp_path / "data"))
    systemp = tmp_path / "system-temp"
    systemp.mkdir()
    # Anything written to the default temporary folder would land here and fail _listing checks.
    monkeypatch.setattr(tempfile, "tempdir", str(systemp))
    folder = tmp_path / "runs" / "uploads"
    folder.mkdir(parents=True)
    return folder


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _grey(shape=(40, 48)) -> np.ndarray:
    return (np.arange(shape[0] * shape[1]).reshape(shape) % 251).astype(np.uint8)


def _nifti_bytes(data: np.ndarray, zooms=(0.7, 0.8, 3.0), compress=True) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    raw = image.to_bytes()
    return gzip.compress(raw) if compress else raw


def _dicom_bytes(raw: np.ndarray, z: float, instance: int) -> bytes:
    """One CT slice written by pydicom (the way tests/test_io.py builds them)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    uid = f"1.2.826.0.1.3680043.8.498.{1000 + instance}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.Modality, ds.PatientID = "CT", "PAT1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-10.0, 20.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.8]
    ds.SliceThickness = 2.5
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = raw.astype(np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _constant_model(outputs: int = 1, bias=-5.0, weight=10.0):
    import keras

    activation = "sigmoid" if outputs == 1 else "softmax"
    return keras.Sequential(
        [
            keras.Input((32, 32, 1)),
            keras.layers.Conv2D(
                outputs,
                1,
                activation=activation,
                kernel_initializer=keras.initializers.Constant(weight),
                bias_initializer=keras.initializers.Constant(bias),
            ),
        ]
    )


def _config(**kw):
    from strokekit.train import TrainConfig

    return TrainConfig(image_size=32, windows=("brain",), filters=(4, 8, 16), **kw)


# --------------------------------------------------------------------------- rejected uploads
def _bad_uploads():
    png = _png_bytes(_grey())
    return [
        (
            "scan.png",
            b"hello world, this is text",
            r"^scan\.png: not a PNG image \(the file starts with b'hello wo'",
        ),
        ("cut.png", png[: len(png) // 2], r"^cut\.png: cannot read image \(.*truncated"),
        ("empty.png", b"", r"^empty\.png: the file is empty \(0 bytes\)"),
        ("../../etc/evil.png", png, r"^\.\./\.\./etc/evil\.png: unsafe file name"),
        ("notes.txt", b"some notes", r"^notes\.txt: unsupported file type '\.txt'; allowed: PNG"),
        ("photo.jpg", png, r"^photo\.jpg: not a JPEG image .*it looks like a PNG image"),
        ("IM0001", b"x" * 300, r"^IM0001: not a DICOM file \(no 'DICM' marker at byte 128"),
        ("vol.nii.gz", b"plain text, not gzip", r"^vol\.nii\.gz: not a gzip-compressed NIfTI file"),
        (
            "vol.nii",
            b"\x00" * 400,
            r"^vol\.nii: not a NIfTI volume \(the header size field is not 348",
        ),
        (
            "cut.nii.gz",
            _nifti_bytes(np.zeros((4, 4, 3), np.int16))[:60],
            r'^cut\.nii\.gz: cannot read .*"cut\.nii\.gz"',
        ),
    ]


@pytest.mark.parametrize("name, content, message", _bad_uploads(), ids=lambda v: str(v)[:12])
def test_bad_upload_gives_a_message_naming_file_and_problem(work, name, content, message):
    before = _listing(work.parent.parent)
    result, text = app.handle_upload(
        [(name, content)], model=object(), config=_config(), work_dir=work
    )
    assert result is None
    assert __import__("re").search(message, text), text
    assert "Traceback" not in text and str(work) not in text and "f0000" not in text
    with pytest.raises(UploadError, match=message):
        app.read_upload(name, content, work_dir=work)
    assert _listing(work.parent.parent) == before


def test_oversize_upload_is_refused(work, monkeypatch):
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 100)
    result, text = app.handle_upload(
        [("big.png", _png_bytes(_grey()))], model=object(), config=_config(), work_dir=work
    )
    assert result is None
    assert text.startswith("big.png: ") and "over the upload limit" in text
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 2000)
    small = _png_bytes(np.zeros((8, 8), np.uint8))
    with pytest.raises(UploadError, match=r"3 files: .* in all is over the upload limit"):
        app.read_uploads([(f"{k}.png", small + b"\x00" * 600) for k in range(3)], work_dir=work)


def test_mixed_and_duplicate_uploads_and_no_model(work):
    png = _png_bytes(_grey())
    nii = _nifti_bytes(np.zeros((4, 4, 3), np.int16))
    with pytest.raises(
        UploadError, match=r"mixed upload: a\.png \(PNG image\), v\.nii\.gz \(NIfTI volume\)"
    ):
        app.read_uploads([("a.png", png), ("v.nii.gz", nii)], work_dir=work)
    with pytest.raises(UploadError, match=r"a\.png: uploaded twice"):
        app.read_uploads([("a.png", png), ("dir/a.png", png)], work_dir=work)
    assert app.handle_upload([("a.png", png)], model=None, config=None) == (
        None,
        "choose a model first",
    )


def test_work_dir_outside_runs_and_data_is_refused(work, tmp_path):
    with pytest.raises(ValueError, match="outside the runs folder"):
        app.read_upload("a.png", _png_bytes(_grey()), work_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


# --------------------------------------------------------------------------- accepted uploads
def test_png_upload_is_read_in_display_units_and_cleaned_up(work, tmp_path):
    grey = _grey()
    before = _listing(tmp_path)
    data = app.read_upload("folder/scan.png", _png_bytes(grey), work_dir=work)
    assert data.images.shape == (1, 40, 48) and data.unit == "display"
    np.testing.assert_array_equal(data.images[0], grey.astype(np.float32))
    assert data.case_ids == ["scan"] and data.source_paths == ["scan.png"]
    assert data.spacing is None
    assert _listing(tmp_path) == before  # the temporary folder is gone, nothing else written


def test_widget_value_and_jpeg_are_accepted(work):
    grey = np.full((16, 24), 120, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    # ipywidgets 8 FileUpload.value: a tuple of dicts with the content as a memoryview
    value = (
        {
            "name": "a.jpg",
            "type": "image/jpeg",
            "size": 1,
            "content": memoryview(buffer.getvalue()),
        },
    )
    data = app.read_uploads(value, work_dir=work)
    assert data.images.shape == (1, 16, 24) and data.case_ids == ["a"]
    assert np.abs(data.images - 120).max() <= 2  # JPEG is lossy, but not on a flat grey


def test_nifti_upload_gives_hu_slices_spacing_and_thickness(work, tmp_path):
    raw = np.arange(20 * 24 * 5, dtype=np.int16).reshape(20, 24, 5) - 1000
    before = _listing(tmp_path)
    for name, compress in (("vol.nii.gz", True), ("vol.nii", False)):
        data = app.read_upload(name, _nifti_bytes(raw, compress=compress), work_dir=work)
        assert data.images.shape == (5, 20, 24) and data.unit == "HU"
        np.testing.assert_array_equal(data.images, np.moveaxis(raw, 2, 0).astype(np.float32))
        assert data.spacing == pytest.approx((0.7, 0.8)) and data.slice_thickness == pytest.approx(
            3.0
        )
        assert data.patient_ids == ["vol"] * 5 and not data.masks.any()
    assert _listing(tmp_path) == before


def test_nifti_upload_with_mask(work):
    raw = np.zeros((16, 16, 4), np.int16)
    labels = np.zeros((16, 16, 4), np.uint8)
    labels[4:8, 4:8, 1:3] = 1
    data = app.read_uploads(
        [("ct.nii.gz", _nifti_bytes(raw)), ("ct_mask.nii.gz", _nifti_bytes(labels))], work_dir=work
    )
    np.testing.assert_array_equal(data.masks, np.moveaxis(labels, 2, 0))


def test_dicom_series_upload_is_sorted_by_position_in_hu(work, tmp_path):
    raws = [np.full((6, 5), 1024 + 100 * k, np.uint16) for k in range(3)]
    # Stored out of order under names without, with a .dcm and with a numeric (UID-like) extension.
    files = [
        ("1.2.840.113619.2.7", _dicom_bytes(raws[2], z=10.0, instance=1)),
        ("IM0002", _dicom_bytes(raws[0], z=0.0, instance=2)),
        ("slice.dcm", _dicom_bytes(raws[1], z=5.0, instance=3)),
    ]
    before = _listing(tmp_path)
    data = app.read_uploads(files, work_dir=work)
    assert data.images.shape == (3, 6, 5) and data.unit == "HU"
    assert data.images[:, 0, 0].tolist() == [0.0, 100.0, 200.0]  # raw - 1024, ordered by z
    assert data.spacing == pytest.approx((0.7, 0.8)) and data.slice_thickness == pytest.approx(5.0)
    assert data.source_paths == ["IM0002", "slice.dcm", "1.2.840.113619.2.7"]
    assert _listing(tmp_path) == before


def test_dicom_error_names_the_uploaded_file(work):
    good = _dicom_bytes(np.zeros((6, 5), np.uint16), z=0.0, instance=1)
    other = _dicom_bytes(np.zeros((4, 4), np.uint16), z=5.0, instance=2)
    result, text = app.handle_upload(
        [("a.dcm", good), ("b.dcm", other)], object(), _config(), work_dir=work
    )
    assert result is None
    assert text.startswith("b.dcm: ") and "a.dcm" in text and "f000" not in text


def test_oversized_slices_are_refused_from_the_header_by_the_io_check(work):
    import pydicom

    wide = _png_bytes(np.zeros((1, 5000), np.uint8))
    with pytest.raises(
        UploadError,
        match=r"^wide\.png: declares 1x5000 pixels; slices are read up to 4096 pixels a side "
        r"\(strokekit\.io\.MAX_SLICE_SIDE, checked before decoding\)",
    ):
        app.read_upload("wide.png", wide, work_dir=work)
    # 12000 x 12000 declared, 60 bytes of pixel data: decoding would fail with another message.
    ds = pydicom.dcmread(io.BytesIO(_dicom_bytes(np.zeros((6, 5), np.uint16), z=0.0, instance=1)))
    ds.Rows, ds.Columns = 12000, 12000
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(UploadError, match=r"^big\.dcm: declares 12000x12000 pixels; slices are"):
        app.read_upload("big.dcm", buffer.getvalue(), work_dir=work)


# --------------------------------------------------------------------------- segmentation
@pytest.mark.backend
def test_handle_upload_segments_a_png(work):
    grey = np.zeros((40, 48), np.uint8)
    grey[:, :20] = 255  # display 255 -> 1.0 -> sigmoid(5); 0 -> sigmoid(-5)
    result, text = app.handle_upload(
        [("scan.png", _png_bytes(grey))], _constant_model(), _config(), work_dir=work
    )
    assert result is not None, text
    assert text.startswith("scan.png: 1 slice of 40x48 segmented in")
    assert result["mask"].shape == (1, 40, 48) and result["mask"].dtype == np.uint8
    assert result["mask"][0, :, :16].all() and not result["mask"][0, :, 24:].any()
    assert int(result["area_px"]["lesion"][0]) == int(result["mask"].sum())
    assert result["area_mm2"] is None and result["volume_ml"] is None
    overlay = result["overlays"][0]
    assert overlay.shape == (40, 48, 3) and overlay.dtype == np.uint8
    assert (
        tuple(overlay[0, 47]) == (0, 0, 0) and overlay[0, 0, 0] > overlay[0, 0, 1]
    )  # red on lesion
    assert result["seconds"] >= result["timing"]["predict_s"] > 0


@pytest.mark.backend
def test_segment_nifti_volume_reports_ml(work):
    raw = np.zeros((24, 20, 4), np.int16)
    raw[4:12, 4:12, 1:3] = 80  # 80 HU -> brain window 1.0 -> lesion
    labels = (raw > 0).astype(np.uint8)
    data = app.read_uploads(
        [
            ("ct.nii.gz", _nifti_bytes(raw, zooms=(0.5, 0.5, 4.0))),
            ("ct_seg.nii.gz", _nifti_bytes(labels, zooms=(0.5, 0.5, 4.0))),
        ],
        work_dir=work,
    )
    result = app.segment(_constant_model(), _config(), data)
    px = result["area_px"]["lesion"]
    assert px[0] == 0 and px[3] == 0 and px[1] > 0 and px[2] > 0
    np.testing.assert_allclose(result["area_mm2"]["lesion"], px * 0.25)
    assert result["volume_ml"]["lesion"] == pytest.approx(px.sum() * 0.5 * 0.5 * 4.0 / 1000.0)
    assert 0.5 < result["dice"] <= 1.0
    assert app.describe_result(result, "ct.nii.gz").startswith(
        "ct.nii.gz: 4 slices of 24x20 segmented in"
    )


@pytest.mark.backend
def test_segment_softmax_model_uses_argmax_and_class_names():
    from strokekit.dataset import SliceDataset

    data = SliceDataset(
        images=np.zeros((2, 16, 16), np.float32),
        masks=np.zeros((2, 16, 16), np.uint8),
        case_ids=["a", "b"],
        class_names=("background", "hemorrhagic", "ischemic"),
        spacing=(1.0, 2.0),
        slice_thickness=5.0,
    )
    model = _constant_model(outputs=3, weight=0.0, bias=0.0)
    model.layers[-1].set_weights(
        [np.zeros((1, 1, 1, 3), np.float32), np.array([0.0, 0.0, 3.0], np.float32)]
    )
    result = app.segment(model, _config(num_classes=3), data)
    assert result["class_names"] == ("background", "hemorrhagic", "ischemic")
    assert (result["mask"] == 2).all()
    assert result["area_px"]["ischemic"].tolist() == [256, 256]
    assert result["volume_ml"] == {
        "hemorrhagic": 0.0,
        "ischemic": pytest.approx(512 * 10.0 / 1000.0),
    }


# Not marked backend: under JAX the first U-Net build compiles every initializer (minutes on 2 cores);
# test_models covers the U-Net on every backend, this checks segment() on a real architecture.
def test_segment_with_an_untrained_unet():
    from strokekit.dataset import SliceDataset
    from strokekit.models import unet

    model = unet(input_shape=(32, 32, 1), filters=(4, 8, 16), seed=0)
    rng = np.random.default_rng(0)
    data = SliceDataset(
        images=rng.uniform(-50, 120, (3, 40, 40)),
        masks=np.zeros((3, 40, 40), np.uint8),
        case_ids=["a", "b", "c"],
    )
    result = app.segment(model, _config(), data, threshold=0.3)
    assert result["probability"].shape == (3, 40, 40)
    np.testing.assert_array_equal(result["mask"], (result["probability"] >= 0.3).astype(np.uint8))
    assert result["threshold"] == 0.3 and result["dice"] is None


# --------------------------------------------------------------------------- downloads
def test_mask_to_png_bytes_binary_and_colour():
    mask = np.zeros((5, 6), np.uint8)
    mask[1:3, 2:4] = 1
    back = np.asarray(Image.open(io.BytesIO(app.mask_to_png_bytes(mask))))
    assert back.dtype == np.uint8 and back.ndim == 2
    np.testing.assert_array_equal(back, mask * 255)
    mask[4, 5] = 2
    colour = np.asarray(Image.open(io.BytesIO(app.mask_to_png_bytes(mask[None]))))
    assert (
        tuple(colour[1, 2]) == (255, 0, 0)
        and tuple(colour[4, 5]) == (0, 255, 0)
        and tuple(colour[0, 0]) == (0, 0, 0)
    )
    with pytest.raises(ValueError, match="mask_to_nifti_bytes"):
        app.mask_to_png_bytes(np.zeros((2, 5, 6), np.uint8))


def test_mask_to_nifti_bytes_round_trips_through_the_kit_reader(tmp_path):
    from strokekit.io import read_nifti_pairs

    mask = np.zeros((4, 7, 9), np.uint8)
    mask[1:3, 2:5, 3:8] = 1
    data = app.mask_to_nifti_bytes(mask, (5.0, 0.6, 0.7))
    assert data[:2] == b"\x1f\x8b"
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "P.nii.gz").write_bytes(data)
    back = read_nifti_pairs(tmp_path, progress=False)
    np.testing.assert_array_equal(back.masks, mask)
    assert back.spacing == pytest.approx((0.6, 0.7)) and back.slice_thickness == pytest.approx(5.0)


# --------------------------------------------------------------------------- models
@pytest.mark.backend
def test_list_and_load_models_only_inside_runs(tmp_path):
    from strokekit.config import to_dict

    root = tmp_path / "runs"
    run = root / "exp" / "run-a"
    run.mkdir(parents=True)
    model = _constant_model(bias=-1.0)
    model.save(run / "model.keras")
    config = _config(threshold=0.4)
    (run / "config.json").write_text(json.dumps(to_dict(config)))
    (run / "metrics.json").write_text(json.dumps({"dice": 0.5}))
    (root / "half-done").mkdir()
    (root / "half-done" / "config.json").write_text("{}")
    assert app.list_models(root) == [("exp/run-a · trained on the phantom · val Dice 0.500 on phantom slices", run)]
    assert app.list_models(tmp_path / "missing") == []

    loaded, loaded_config = app.load_model_for_app(run, runs_root=root)
    assert loaded_config == config
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("model.keras", "config.json"):
        (outside / name).write_bytes((run / name).read_bytes())
    with pytest.raises(
        UploadError, match="refused, the app only loads models from inside the runs folder"
    ):
        app.load_model_for_app(outside, runs_root=root)
    os.symlink(outside, root / "link")
    with pytest.raises(UploadError, match="refused"):
        app.load_model_for_app(root / "link", runs_root=root)
    with pytest.raises(UploadError, match="not a run folder"):
        app.load_model_for_app(root / "half-done", runs_root=root)


# --------------------------------------------------------------------------- which models the app lists
def _slice_run(folder: Path, dice: float | None = None, **config) -> Path:
    """An ordinary run folder (a TrainConfig); model.keras only has to exist to be listed."""
    from strokekit.config import to_dict

    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"PK")
    (folder / "config.json").write_text(json.dumps(to_dict(_config(**config))))
    if dice is not None:
        (folder / "metrics.json").write_text(json.dumps({"dice": dice}))
    return folder


def _fewshot_run(folder: Path, trained_on: str, scores: dict, val_dice: float = 0.7) -> Path:
    """A few-shot run folder as strokekit.fewshot.save_fitted writes it (without a real model)."""
    from strokekit import fewshot as fs
    from strokekit.config import to_dict

    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"PK")
    (folder / "config.json").write_text(json.dumps(to_dict(_config())))
    info = dict(kind="few-shot", recipe=fs.recipe_to_dict(fs.FewShotRecipe(config=_config())), threshold=0.4,
                band=None, val_dice=val_dice, n_train=10, seconds=1.0, members=1, trained_on=trained_on,
                scores=scores)
    (folder / "fewshot.json").write_text(json.dumps(to_dict(info)))
    (folder / "metrics.json").write_text(json.dumps({"dice": val_dice, **scores}))
    return folder


def test_list_models_says_what_each_run_learned_and_skips_runs_the_app_cannot_apply(tmp_path):
    root = tmp_path / "runs"
    phantom = _slice_run(root / "04" / "single", dice=0.702)
    undecided = _slice_run(root / "09" / "model")
    ct = _fewshot_run(root / "10" / "fewshot", "CT-ICH patients 49, 50, 51",
                      {"test_per_patient_dice": 0.38, "test_data": "CT-ICH test patients 70-72"})
    # Notebook 07's multiclass and notebook 08's perfusion runs: config.json is no slice TrainConfig.
    multiclass = root / "07_multiclass" / "class_weights-s0"
    multiclass.mkdir(parents=True)
    (multiclass / "config.json").write_text(json.dumps({"base_filters": 8, "num_levels": 3,
                                                        "class_names": ["background", "a", "b"]}))
    (multiclass / "model.keras").write_bytes(b"PK")
    perfusion = root / "08_ctp_core_penumbra" / "pretrain"
    perfusion.mkdir(parents=True)
    (perfusion / "config.json").write_text(json.dumps({"filters": [8, 16], "use_clinical": True}))
    (perfusion / "model.keras").write_bytes(b"PK")
    damaged = _fewshot_run(root / "10" / "damaged", "x", {})
    (damaged / "fewshot.json").write_text("{ not json")

    assert app.list_models(root) == [
        ("04/single · trained on the phantom · val Dice 0.702 on phantom slices", phantom),
        ("09/model · trained on the phantom · no score recorded", undecided),
        ("10/fewshot · few-shot CT recipe, trained on CT-ICH patients 49, 50, 51 · "
         "test per patient Dice 0.380 on CT-ICH test patients 70-72", ct),
    ]
    for folder, why in ((multiclass, "not a slice model's training config"), (perfusion, "not a slice model's"),
                        (damaged, "fewshot.json is damaged")):
        with pytest.raises(UploadError, match=why):
            app.load_model_for_app(folder, runs_root=root)
    info = app.model_info(ct, root)
    assert info["kind"] == "few-shot" and info["ct_score"] == 0.38 and info["ct_tested"]
    assert app.model_info(multiclass, root) is None and app.model_info(damaged, root) is None


def test_default_model_is_the_best_for_ct(tmp_path):
    root = tmp_path / "runs"
    best_phantom = _slice_run(root / "a", dice=0.9)
    _slice_run(root / "b", dice=0.5)
    _slice_run(root / "c")
    assert app.default_model(app.list_models(root), root) == best_phantom
    # Few-shot CT runs win over any phantom run; among them the best recorded test Dice on CT
    # patients, and a run with only a validation score ranks after every tested one.
    _fewshot_run(root / "ct-1", "CT-ICH 49-51", {"test_per_patient_dice": 0.30})
    best_ct = _fewshot_run(root / "ct-2", "CT-ICH 49-51", {"test_3d_dice": 0.41}, val_dice=0.5)
    _fewshot_run(root / "ct-untested", "CT-ICH 49-51", {}, val_dice=0.95)
    assert app.default_model(app.list_models(root), root) == best_ct
    assert app.default_model([], root) is None


# --------------------------------------------------------------------------- a few-shot CT recipe in the app
def _display_heads(patients: dict[str, int], size: int = 16):
    """Display-unit heads (air 0, bone 255, brain 100, blood 180): lesion slices, then 2 without."""
    from strokekit.dataset import SliceDataset

    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2)
    images, masks, pids, index = [], [], [], []
    for pid, n_lesion in patients.items():
        for j in range(n_lesion + 2):
            image = np.where(r < size * 0.45, 255.0, 0.0).astype(np.float32)
            image[r < size * 0.38] = 100.0
            mask = np.zeros((size, size), np.uint8)
            if j < n_lesion:
                image[6:9, 6:9], mask[6:9, 6:9] = 180.0, 1
            images.append(image)
            masks.append(mask)
            pids.append(pid)
            index.append(j)
    return SliceDataset(images=np.stack(images), masks=np.stack(masks),
                        case_ids=[f"{p}_{i}" for p, i in zip(pids, index)], patient_ids=pids,
                        slice_indices=np.array(index), unit="display",
                        class_names=("background", "hemorrhage"))


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, tiny_recipe):
    """The tiny few-shot recipe (every part of the kit's default: channels, flips, brain, tuned
    threshold) fitted in seconds and saved as a run folder: (runs root, folder, fitted, val data)."""
    from strokekit import fewshot as fs
    from strokekit.fewshot import save_fitted

    data = _display_heads({"49": 2, "50": 1, "51": 3, "66": 2})
    train = data.select_patients(["49", "50", "51"])
    val = data.select_patients(["66"])
    fitted = fs.fit_recipe(tiny_recipe, train, val, seed=0)
    root = tmp_path_factory.mktemp("ct") / "runs"
    folder = save_fitted(fitted, root / "10_what_generalizes" / "fewshot-default", trained_on="fake CT-ICH 49/50/51",
                         scores={"test_per_patient_dice": 0.25, "test_data": "fake patient 66"})
    return root, folder, fitted, val


def test_a_fewshot_run_is_listed_chosen_loaded_and_applied_with_its_whole_recipe(ct_run, tmp_path):
    from strokekit import fewshot as fs

    root, folder, fitted, val = ct_run
    phantom = _slice_run(root / "04" / "single", dice=0.99)
    try:
        labels = dict((f, label) for label, f in app.list_models(root))
        assert "few-shot CT recipe, trained on fake CT-ICH 49/50/51" in labels[folder]
        assert "test per patient Dice 0.250 on fake patient 66" in labels[folder]
        assert app.default_model(app.list_models(root), root) == folder  # not the phantom's 0.99
    finally:
        import shutil

        shutil.rmtree(phantom)
    model, config = app.load_model_for_app(folder, runs_root=root)
    assert isinstance(model, fs.FittedRecipe) and model.recipe == fitted.recipe
    assert config.threshold == fitted.threshold and config.image_size == 16
    result = app.segment(model, config, val)
    expected = fs.predict_recipe(fitted, val, probabilities=True)
    np.testing.assert_allclose(result["probability"], expected, atol=1e-5)
    np.testing.assert_array_equal(result["mask"], (expected >= fitted.threshold).astype(np.uint8))
    # The recipe keeps predictions inside the (dilated) brain: nothing in the corners' air.
    yy, xx = np.mgrid[:16, :16]
    corners = np.hypot(yy - 7.5, xx - 7.5) >= 10.0
    assert not result["probability"][:, corners].any()
    # A non-square upload comes back at its own shape.
    wide = val.replace(images=np.pad(val.images, ((0, 0), (0, 0), (0, 8))),
                       masks=np.pad(val.masks, ((0, 0), (0, 0), (0, 8))))
    assert app.segment(model, config, wide)["mask"].shape == (len(val), 16, 24)


def test_a_png_upload_through_a_fewshot_run(ct_run, work):
    root, folder, fitted, val = ct_run
    model, config = app.load_model_for_app(folder, runs_root=root)
    png = _png_bytes(val.images[0].astype(np.uint8))
    result, text = app.handle_upload([("slice.png", png)], model, config, work_dir=work)
    assert result is not None, text
    assert text.startswith("slice.png: 1 slice of 16x16 segmented in")
    assert result["threshold"] == fitted.threshold and result["label"] == "slice.png"


def test_a_fewshot_recipe_with_a_brightness_floor_filters_scans_not_single_slices(ct_run):
    """On a scan of several slices the app keeps only what keep_bright_components keeps; one slice is left alone."""
    import dataclasses

    from strokekit import fewshot as fs

    root, folder, fitted, val = ct_run
    floored = dataclasses.replace(fitted, recipe=dataclasses.replace(fitted.recipe, stack_min_contrast=1000.0))
    _, config = app.load_model_for_app(folder, runs_root=root)
    plain = app.segment(fitted, config, val)["mask"]
    assert plain.any()  # the tiny recipe marks something, so the floor has work to do
    scan = app.segment(floored, config, val)["mask"]
    np.testing.assert_array_equal(scan, fs.keep_bright_components(floored, val, plain))
    assert not scan.any()  # nothing is 1000 levels brighter than brain
    one = val.subset([0])
    np.testing.assert_array_equal(app.segment(floored, config, one)["mask"], app.segment(fitted, config, one)["mask"])


def test_png_slices_of_one_upload_are_taken_in_their_names_natural_order(work):
    slices = {name: _png_bytes(np.full((8, 8), value, np.uint8)) for name, value in
              (("10.png", 30), ("2.png", 20), ("1.png", 10))}
    data = app.read_uploads(list(slices.items()), work_dir=work)
    assert data.case_ids == ["1", "2", "10"] and data.images[:, 0, 0].tolist() == [10, 20, 30]


# --------------------------------------------------------------------------- what the stack opens on
def test_focus_slice_is_the_most_lesion_inside_the_brain():
    mask = np.zeros((3, 8, 8), np.uint8)
    brain = np.zeros((3, 8, 8), bool)
    brain[:, 2:6, 2:6] = True
    mask[0, :2, :] = 1          # a large false positive outside the brain (skull base)
    mask[1, 3:5, 3:4] = 1       # a small lesion inside
    mask[2, 3, 3] = 1           # a smaller one inside
    assert app.focus_slice(mask, brain) == 1
    assert app.focus_slice(mask, None) == 0  # without a brain mask: the largest area
    outside_only = np.zeros_like(mask)
    outside_only[0, :2, :] = 1
    brain[2, 1:7, 1:7] = True
    assert app.focus_slice(outside_only, brain) == 2  # no lesion in the brain: the most brain


@pytest.mark.backend
def test_segment_opens_a_stack_on_the_lesion_inside_the_brain_not_a_larger_false_positive():
    from strokekit.dataset import SliceDataset

    # Five identical heads in HU (air, a bone ring, brain at 30 HU); slice 1 holds a 70 HU bleed,
    # slice 3 a larger bright band in the air above the head (a head rest, a skull-base streak).
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 36, xx - 31.5)
    head = np.where(r < 24, 1000.0, -1000.0).astype(np.float32)
    head[r < 20] = 30.0
    hu = np.repeat(head[None], 5, axis=0)
    hu[1, 30:36, 28:34] = 70.0
    hu[3, :6, 8:56] = 80.0
    data = SliceDataset(images=hu, masks=np.zeros(hu.shape, np.uint8), case_ids=[str(i) for i in range(5)])
    result = app.segment(_constant_model(bias=-5.0, weight=10.0), _config(), data, threshold=0.9)
    px = result["area_px"]["lesion"]
    assert px[3] > px[1] > px[0] > 0  # the band is predicted and the largest area (the bone ring too)
    assert result["focus_slice"] == 1
    inside = result["lesion_in_brain_px"]
    assert inside[1] > inside[0] == inside[3]  # the band is not in the brain, the bleed is


# --------------------------------------------------------------------------- geometry and the texts
def _stack_result(n=3, spacing=None, thickness=None):
    px = np.array([0, 120, 30][:n])
    mask = np.zeros((n, 20, 20), np.uint8)
    return {"mask": mask, "area_px": {"lesion": px}, "spacing": spacing, "slice_thickness": thickness,
            "seconds": 0.5, "dice": None, "lesion_in_brain_px": np.array([0, 100, 30][:n])}


def test_typed_geometry_applies_only_where_the_file_has_none_and_never_sticks():
    png = _stack_result()
    shown = app.with_geometry(png, pixel_mm=0.5, slice_mm=5.0)
    assert shown["spacing"] == (0.5, 0.5) and shown["slice_thickness"] == 5.0
    assert shown["pixel_source"] == shown["slice_source"] == "typed"
    assert shown["volume_ml"]["lesion"] == pytest.approx(150 * 0.25 * 5.0 / 1000)
    again = app.with_geometry(shown)  # the fields were reset for the next upload
    assert again["spacing"] is None and again["volume_ml"] is None and again["area_mm2"] is None
    dicom = app.with_geometry(_stack_result(spacing=(0.7, 0.8), thickness=2.5), pixel_mm=0.5, slice_mm=5.0)
    assert dicom["spacing"] == (0.7, 0.8) and dicom["slice_thickness"] == 2.5
    assert dicom["pixel_source"] == dicom["slice_source"] == "file"
    text = app.geometry_text(dicom)
    assert "pixel 0.7 × 0.8 mm (from the file)" in text and "slice spacing 2.5 mm (from the file)" in text


def test_the_panel_says_what_mm2_ml_and_3d_need():
    none = app.with_geometry(_stack_result())
    assert "mm², mL and the 3-D view need the pixel size and the slice spacing" in app.geometry_text(none)
    pixel_only = app.with_geometry(_stack_result(), pixel_mm=0.5)
    assert "mL and the 3-D view need the slice spacing: the file does not carry it, type it above" \
        in app.geometry_text(pixel_only)
    assert "pixel 0.5 × 0.5 mm (typed above)" in app.geometry_text(pixel_only)
    one = app.with_geometry(_stack_result(n=1))
    assert app.geometry_text(one).startswith("mm² needs the pixel size")
    assert "slice spacing" not in app.geometry_text(one)


def test_status_line_and_panel_give_the_same_numbers():
    import re

    shown = app.with_geometry(_stack_result(), pixel_mm=0.5, slice_mm=5.0)
    status = app.describe_result(shown, "stack")
    panel = app.slice_text(shown, 1)
    assert status == ("stack: 3 slices of 20x20 segmented in 0.50 s; lesion on 2 of 3 slices, "
                      "150 px = 37.5 mm² in all = 0.19 mL")
    assert "<b>Lesion volume:</b> 150 px = 37.5 mm² = 0.19 mL on 2 of 3 slices" in panel
    assert "<b>Lesion area:</b> 120 px = 30.0 mm² · slice 2 of 3 (100 px inside the brain)" in panel
    assert app.summary_rows(shown) == [{"class": "lesion", "slices with lesion": 2, "pixels, all slices": 150,
                                        "area, all slices (mm²)": 37.5, "volume (mL)": 0.188}]
    for number in ("150 px", "37.5 mm²", "0.19 mL"):
        assert number in status and number in re.sub("<[^>]+>", "", panel)
    single = app.with_geometry(_stack_result(n=1))
    assert app.describe_result(single, "a.png").endswith("; lesion 0 px")
    assert "<b>Lesion area:</b> 0 px" in app.slice_text(single, 0)


# --------------------------------------------------------------------------- what the page shows
def _link_payload(link: str) -> bytes:
    import base64
    import re

    return base64.b64decode(re.search(r'href="data:[^;]+;base64,([^"]+)"', link).group(1))


def test_png_bytes_and_figure_png_give_pngs_that_read_back():
    from matplotlib.figure import Figure

    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[1, 2] = (255, 10, 20)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(app.png_bytes(rgb)))), rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(app.png_bytes(_grey())))), _grey())
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1])
    for dpi in (50, 80):
        png = app.figure_png(fig, dpi=dpi)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size == (2 * dpi, dpi)


def test_download_link_carries_the_bytes_and_escapes_names():
    link = app.download_link(b"\x00mask bytes", 'a"<b>.png', "image/png", "get <it>")
    assert link.startswith('<a class="sk-download-link" download="a&quot;&lt;b&gt;.png" href="data:image/png;base64,')
    assert link.endswith(">⬇ get &lt;it&gt;</a>") and _link_payload(link) == b"\x00mask bytes"


def test_status_html_escapes_the_message_and_marks_errors_and_work_in_progress():
    assert app.status_html("scan <1>.png: ok") == '<span style="color:#222">scan &lt;1&gt;.png: ok</span>'
    assert app.status_html("bad & worse", error=True) == '<span style="color:#b00020">bad &amp; worse</span>'
    assert app.status_html("Segmenting 2 file(s) ...", busy=True) == (
        f'<span class="sk-busy">{app.SPINNER} Segmenting 2 file(s) ...</span>')
    assert "@keyframes sk-spin" in app.SPINNER


def test_set_quietly_changes_a_widget_without_its_callback_and_keeps_observing():
    widgets = pytest.importorskip("ipywidgets")
    from traitlets import TraitError

    slider = widgets.IntSlider(value=1, min=1, max=3)
    calls = []

    def handler(change):
        calls.append(change["new"])

    slider.observe(handler, names="value")
    app.set_quietly(slider, handler, max=10, value=7)
    assert (slider.max, slider.value, calls) == (10, 7, [])
    slider.value = 8  # observed again afterwards
    assert calls == [8]
    dropdown = widgets.Dropdown(options=["a", "b"], value="a")
    dropdown.observe(handler, names="value")
    with pytest.raises(TraitError):  # a value the widget refuses: the handler observes again all the same
        app.set_quietly(dropdown, handler, value="z")
    dropdown.value = "b"
    assert calls == [8, "b"]


def test_model_loaded_text_names_the_model_its_input_and_threshold(tmp_path):
    root = tmp_path / "runs"
    folder = _slice_run(root / "exp" / "run-a", dice=0.5, threshold=0.4)
    assert app.model_loaded_text(folder, _config(threshold=0.4), root) == (
        "Model loaded: exp/run-a · trained on the phantom · val Dice 0.500 on phantom slices "
        "(unet, 32 px input, threshold 0.40). Upload a file.")


def test_result_table_html_is_the_summary_rows_with_the_table_style():
    import re

    shown = app.with_geometry(_stack_result(), pixel_mm=0.5, slice_mm=5.0)
    table = app.result_table_html(shown)
    assert table.startswith(app.TABLE_STYLE) and 'class="dataframe sk-table-inner"' in table
    cells = [c.strip() for c in re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", table)]
    assert cells == ["class", "slices with lesion", "pixels, all slices", "area, all slices (mm²)", "volume (mL)",
                     "lesion", "2", "150", "37.5", "0.188"]


def test_mask_download_html_gives_a_png_for_a_slice_and_a_nifti_with_its_voxel_size_for_a_stack(tmp_path):
    import nibabel as nib

    mask = np.zeros((3, 5, 6), np.uint8)
    mask[1, 2:4, 1:3] = 1
    one = app.mask_download_html({"mask": mask[1:2], "spacing": None, "slice_thickness": None,
                                  "case_ids": ["scan 1/ä.png"]})
    assert 'download="scan_1__.png_mask.png" href="data:image/png;base64,' in one
    assert "download the mask (PNG)" in one and _link_payload(one) == app.mask_to_png_bytes(mask[1])
    assert 'download="upload_mask.png"' in app.mask_download_html(
        {"mask": mask[:1], "spacing": None, "slice_thickness": None, "case_ids": [""]})
    for spacing, thickness, zooms in (((0.7, 0.8), 2.5, (0.7, 0.8, 2.5)), ((0.7, 0.8), None, (1.0, 1.0, 1.0))):
        stack = app.mask_download_html({"mask": mask, "spacing": spacing, "slice_thickness": thickness,
                                        "case_ids": ["ct", "ct2", "ct3"]})
        assert 'download="ct_mask.nii.gz" href="data:application/gzip;base64,' in stack
        (tmp_path / "back.nii.gz").write_bytes(_link_payload(stack))
        back = nib.load(tmp_path / "back.nii.gz")
        assert np.allclose(back.header.get_zooms(), zooms)
        np.testing.assert_array_equal(np.moveaxis(np.asarray(back.dataobj), 2, 0), mask)


def test_view_3d_png_draws_a_stack_with_its_geometry_and_nothing_else():
    from strokekit.dataset import SliceDataset

    images = np.full((4, 24, 24), 30.0, np.float32)
    images[:, :2] = 1000.0  # bone: the skull drawn from HU
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[1:3, 8:14, 8:14] = 1
    data = SliceDataset(images, masks, ["a", "b", "c", "d"])
    stack = {"mask": masks, "spacing": (1.0, 1.0), "slice_thickness": 5.0, "dataset": data}
    png = app.view_3d_png(stack, dpi=40)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size == (220, 200)  # 5.5 x 5 in
    assert app.view_3d_png({**stack, "slice_thickness": None}) is None
    assert app.view_3d_png({**stack, "spacing": None}) is None
    assert app.view_3d_png({**stack, "mask": masks[:1]}) is None


# --------------------------------------------------------------------------- the server's settings
def test_voila_settings_free_kernels_and_take_the_largest_upload():
    """tools/app_server/voila.py, read as Voila reads it (tests/test_app_browser.py checks it live)."""
    from traitlets.config import Config

    config = Config()
    path = Path(__file__).resolve().parents[1] / "tools" / "app_server" / "voila.py"
    exec(compile(path.read_text(), str(path), "exec"), {"get_config": lambda: config})
    kernels = config.MappingKernelManager
    assert 0 < kernels.cull_idle_timeout <= 3600 and 0 < kernels.cull_interval <= kernels.cull_idle_timeout
    assert kernels.cull_connected is False  # an open page keeps its kernel
    assert config.Voila.tornado_settings["websocket_max_message_size"] >= app.MAX_UPLOAD_BYTES
    assert config.Voila.ip == "127.0.0.1"

    class Page:  # Tornado sets the _xsrf cookie when a handler first reads xsrf_token
        read = False

        @property
        def xsrf_token(self):
            Page.read = True
            return b"token"

    assert config.VoilaConfiguration.prelaunch_hook(Page(), notebook=None, cwd=".") is None and Page.read


def test_a_16_bit_png_upload_is_read_as_hu_plus_1024_like_the_readers(work):
    hu = np.array([[-1000, 0, 40, 80], [1000, 60, 20, 0]], np.int32)
    stored = Image.fromarray((hu + 1024).astype(np.uint16))
    buffer = io.BytesIO()
    stored.save(buffer, format="PNG")
    data = app.read_uploads([("ct.png", buffer.getvalue())], work_dir=work)
    assert data.unit == "HU"
    np.testing.assert_array_equal(data.images[0], hu.astype(np.float32))
    eight = _png_bytes(np.full((2, 4), 100, np.uint8))
    with pytest.raises(UploadError, match="8-bit image .* use one kind"):
        app.read_uploads([("ct.png", buffer.getvalue()), ("b.png", eight)], work_dir=work)
