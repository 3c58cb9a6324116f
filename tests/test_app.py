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
    assert app.list_models(root) == [("exp/run-a (val Dice 0.500)", run)]
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
