"""Tests for strokekit.io: each reader on files written here, each documented error, round trips."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from strokekit.dataset import SliceDataset
from strokekit.errors import DataError
from strokekit.io import (
    MULTICLASS_CLASS_NAMES,
    MULTICLASS_COLOURS,
    decode_colour_mask,
    encode_colour_mask,
    load_ctich,
    load_dataset,
    read_dicom_series,
    read_image,
    read_nifti_pairs,
    read_paired_folders,
    read_study_layout,
    write_study_layout,
)
from strokekit.preprocess import window_hu

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --------------------------------------------------------------------------- helpers
def _png(path: Path, array) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path


def _grey(seed: int, shape=(6, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _binary(seed: int, shape=(6, 8)) -> np.ndarray:
    """A 0/1 label map with a lesion block whose place depends on the seed."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[seed % 3 : seed % 3 + 2, 1 : 1 + seed % 4 + 1] = 1
    return labels


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _study_folder(
    folder: Path, stems=("10", "2", "1"), shape=(6, 8)
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    written = {}
    for k, stem in enumerate(stems):
        image, labels = _grey(k, shape), _binary(k, shape)
        _png(folder / f"{stem}.png", image)
        _png(folder / f"{stem}_mask.png", labels * 255)
        _png(folder / f"{stem}_result.png", np.stack([image] * 3, axis=-1))
        written[stem] = (image, labels)
    return written


def _paired_folder(folder: Path, stems=("10", "2", "1"), dirs=("images", "masks"), shape=(6, 8)):
    written = {}
    for k, stem in enumerate(stems):
        image, labels = _grey(k + 20, shape), _binary(k + 1, shape)
        _png(folder / dirs[0] / f"{stem}.png", image)
        _png(folder / dirs[1] / f"{stem}.png", labels * 255)
        written[stem] = (image, labels)
    return written


# --------------------------------------------------------------------------- colour masks
def test_decode_colour_mask_gives_the_labels_of_each_colour():
    rgb = np.array([[(0, 0, 0), RED, GREEN], [GREEN, RED, (0, 0, 0)]], dtype=np.uint8)
    labels = decode_colour_mask(rgb, MULTICLASS_COLOURS)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[0, 1, 2], [2, 1, 0]])


def test_decode_colour_mask_lists_five_unknown_colours_with_counts(tmp_path):
    rgb = np.zeros((1, 40, 3), dtype=np.uint8)
    # Seven unknown colours with 7, 6, ..., 1 pixels: the five commonest are listed.
    position = 0
    for k, count in enumerate(range(7, 0, -1)):
        rgb[0, position : position + count] = (10 + k, 20, 30)
        position += count
    with pytest.raises(DataError, match=r"7 colour\(s\) not in the colour map") as info:
        decode_colour_mask(rgb, MULTICLASS_COLOURS, tmp_path / "17_mask.png")
    message = str(info.value)
    assert message.startswith(str(tmp_path / "17_mask.png"))
    assert "(10, 20, 30): 7 px" in message and "(14, 20, 30): 3 px" in message
    assert "(15, 20, 30)" not in message and "and 2 more" in message


def test_encode_then_decode_gives_back_the_labels():
    labels = np.random.default_rng(0).integers(0, 3, (5, 7)).astype(np.uint8)
    rgb = encode_colour_mask(labels, MULTICLASS_COLOURS)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[labels == 1][0]) == RED and tuple(rgb[labels == 2][0]) == GREEN
    np.testing.assert_array_equal(decode_colour_mask(rgb, MULTICLASS_COLOURS), labels)


def test_encode_colour_mask_rejects_a_label_without_colour():
    with pytest.raises(ValueError, match=r"labels \[3\] have no colour"):
        encode_colour_mask(np.array([[0, 3]]), MULTICLASS_COLOURS)


# --------------------------------------------------------------------------- read_image
def test_read_image_returns_the_stored_grey_values(tmp_path):
    grey = _grey(1)
    np.testing.assert_array_equal(
        read_image(_png(tmp_path / "a.png", grey)), grey.astype(np.float32)
    )
    rgb_grey = read_image(_png(tmp_path / "b.png", np.stack([grey] * 3, axis=-1)))
    assert rgb_grey.dtype == np.float32 and rgb_grey.shape == grey.shape
    np.testing.assert_array_equal(rgb_grey, grey)
    sixteen = np.full((4, 5), 3000, dtype=np.uint16)
    assert read_image(_png(tmp_path / "c.png", sixteen))[0, 0] == 3000.0
    np.save(tmp_path / "d.npy", grey.astype(np.float32) - 1000)
    assert read_image(tmp_path / "d.npy")[0, 0] == float(grey[0, 0]) - 1000


def test_read_image_rejects_colour_truncated_and_non_images(tmp_path):
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = RED
    with pytest.raises(DataError, match=r"colour\.png: is a colour image"):
        read_image(_png(tmp_path / "colour.png", rgb))
    whole = _png(tmp_path / "whole.png", _grey(2, (64, 64))).read_bytes()
    (tmp_path / "half.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"half\.png: cannot read image"):
        read_image(tmp_path / "half.png")
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.png: cannot read image"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(DataError, match=r"missing\.png: file does not exist"):
        read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- study layout
def test_read_study_layout_reads_pairs_in_numeric_order(tmp_path):
    written = _study_folder(tmp_path)
    ds = read_study_layout(tmp_path, progress=False)
    assert ds.case_ids == ["1", "2", "10"]
    assert ds.unit == "display" and ds.class_names == ("background", "lesion")
    assert ds.patient_ids is None and ds.images.shape == (3, 6, 8)
    for i, stem in enumerate(ds.case_ids):
        np.testing.assert_array_equal(ds.images[i], written[stem][0])
        np.testing.assert_array_equal(ds.masks[i], written[stem][1])
    assert ds.source_paths[0] == str(tmp_path / "1.png")


def test_read_study_layout_decodes_colour_coded_masks(tmp_path):
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[1:3, 1:3], labels[4:6, 5:8] = 1, 2
    _png(tmp_path / "1.png", _grey(0))
    _png(tmp_path / "1_mask.png", encode_colour_mask(labels, MULTICLASS_COLOURS))
    _png(tmp_path / "2.png", _grey(1))
    _png(tmp_path / "2_mask.png", np.zeros((6, 8, 3), dtype=np.uint8))
    ds = read_study_layout(tmp_path, progress=False)
    assert ds.class_names == MULTICLASS_CLASS_NAMES
    np.testing.assert_array_equal(ds.masks[0], labels)
    assert ds.masks[1].max() == 0


def test_read_study_layout_rejects_a_white_mask_next_to_colour_masks(tmp_path):
    _png(tmp_path / "1.png", _grey(0))
    _png(tmp_path / "1_mask.png", encode_colour_mask(_binary(0), MULTICLASS_COLOURS))
    _png(tmp_path / "2.png", _grey(1))
    _png(tmp_path / "2_mask.png", _binary(1) * 255)
    with pytest.raises(DataError, match=r"2_mask\.png: mask is white/grey"):
        read_study_layout(tmp_path, progress=False)


def test_read_study_layout_errors_name_the_file(tmp_path):
    _study_folder(tmp_path, stems=("1", "3"))
    (tmp_path / "3_mask.png").unlink()
    with pytest.raises(DataError, match=r"3\.png has no 3_mask\.png"):
        read_study_layout(tmp_path, progress=False)
    _png(tmp_path / "3_mask.png", np.zeros((5, 8), dtype=np.uint8))
    with pytest.raises(DataError, match=r"3_mask\.png: mask is 5x8 but its image 3\.png is 6x8"):
        read_study_layout(tmp_path, progress=False)
    _png(tmp_path / "3.png", _grey(3, (5, 8)))
    with pytest.raises(
        DataError, match=r"3\.png: image is 5x8 but the first image .*1\.png\) is 6x8"
    ):
        read_study_layout(tmp_path, progress=False)
    _png(tmp_path / "3.jpg", _grey(3, (5, 8)))
    with pytest.raises(DataError, match=r"two files share the id '3': 3\.jpg and 3\.png"):
        read_study_layout(tmp_path, progress=False)


def test_read_study_layout_rejects_an_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty folder"):
        read_study_layout(tmp_path, progress=False)


def test_image_size_resizes_and_keeps_label_values_exact(tmp_path):
    _png(tmp_path / "1.png", _grey(0, (40, 40)))
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[:20, :20], labels[20:, 20:] = 1, 2
    _png(tmp_path / "1_mask.png", encode_colour_mask(labels, MULTICLASS_COLOURS))
    _png(tmp_path / "2.png", _grey(1, (30, 20)))  # another size is fine once resized
    _png(tmp_path / "2_mask.png", np.zeros((30, 20), dtype=np.uint8))
    ds = read_study_layout(tmp_path, image_size=10, progress=False)
    assert ds.images.shape == (2, 10, 10) and ds.masks.shape == (2, 10, 10)
    assert set(np.unique(ds.masks[0]).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(ds.masks[0][:5, :5], 1)
    np.testing.assert_array_equal(ds.masks[0][5:, 5:], 2)
    # Anti-aliased bilinear: the mean grey level survives a 4x reduction within a few levels.
    assert abs(float(ds.images[0].mean()) - float(_grey(0, (40, 40)).mean())) < 3.0


def test_read_study_layout_attaches_a_patients_csv(tmp_path):
    _study_folder(tmp_path)
    csv = tmp_path.parent / f"{tmp_path.name}_patients.csv"
    csv.write_text("file,patient_id,slice_index,site\n1.png,p1,4,A\n2.png,p1,5,A\n10.png,p2,0,B\n")
    ds = read_study_layout(tmp_path, patients_csv=csv, progress=False)
    assert ds.patient_ids == ["p1", "p1", "p2"]
    np.testing.assert_array_equal(ds.slice_indices, [4, 5, 0])
    assert ds.extra["site"].tolist() == ["A", "A", "B"]
    csv.write_text("file,patient_id\n1.png,p1\n2.png,p1\n")
    with pytest.raises(DataError, match=r"1 file\(s\) have no row in column 'file': \['10'\]"):
        read_study_layout(tmp_path, patients_csv=csv, progress=False)


# --------------------------------------------------------------------------- paired folders
@pytest.mark.parametrize("dirs", [("images", "masks"), ("image", "label")])
def test_read_paired_folders_detects_the_folders(tmp_path, dirs):
    written = _paired_folder(tmp_path, dirs=dirs)
    (tmp_path / "cases.csv").write_text(
        "file,patient_id,slice_index_in_volume,has_mask,note\n"
        "1.png,7,1,1,x\n2.png,7,2,0,y\n10.png,9,1,1,z\n"
    )
    ds = read_paired_folders(tmp_path, patients_csv="cases.csv", progress=False)
    assert ds.case_ids == ["1", "2", "10"]
    assert ds.patient_ids == ["7", "7", "9"]
    np.testing.assert_array_equal(ds.slice_indices, [1, 2, 1])
    np.testing.assert_array_equal(ds.extra["has_mask"], [1, 0, 1])
    assert ds.extra["note"].tolist() == ["x", "y", "z"]
    for i, stem in enumerate(ds.case_ids):
        np.testing.assert_array_equal(ds.images[i], written[stem][0])
        np.testing.assert_array_equal(ds.masks[i], written[stem][1])


def test_read_paired_folders_reads_tif_and_npy_and_01_masks(tmp_path):
    image = _grey(5)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "a.tif")
    np.save(tmp_path / "masks" / "a.npy", _binary(2))
    np.save(tmp_path / "images" / "b.npy", image.astype(np.float32) - 1000)
    _png(tmp_path / "masks" / "b.png", _binary(1))  # 0/1 PNG
    ds = read_paired_folders(tmp_path, progress=False)
    assert ds.case_ids == ["a", "b"]
    np.testing.assert_array_equal(ds.images[0], image)
    np.testing.assert_array_equal(ds.images[1], image.astype(np.float32) - 1000)
    np.testing.assert_array_equal(ds.masks[0], _binary(2))
    np.testing.assert_array_equal(ds.masks[1], _binary(1))


def test_read_paired_folders_csv_errors(tmp_path):
    _paired_folder(tmp_path)
    csv = tmp_path / "slices.csv"
    csv.write_text(
        "file,patient_id,slice_index_in_volume\n1.png,7,1\n2.png,7,2\n2.png,7,2\n10.png,9,1\n"
    )
    with pytest.raises(
        DataError, match=r"slices\.csv: duplicate rows for 1 id\(s\): '2' \(rows 3 and 4\)"
    ):
        read_paired_folders(tmp_path, patients_csv=csv, progress=False)
    csv.write_text("file,patient_id,slice_index_in_volume\n1.png,7,1\n10.png,9,1\n")
    with pytest.raises(
        DataError, match=r"slices\.csv: 1 file\(s\) have no row in column 'file': \['2'\]"
    ):
        read_paired_folders(tmp_path, patients_csv=csv, progress=False)


def test_read_paired_folders_file_errors(tmp_path):
    _paired_folder(tmp_path, stems=("1", "3"))
    _png(
        tmp_path / "masks" / "1.png",
        np.array([[0, 128], [255, 0]], dtype=np.uint8).repeat(3, 0).repeat(4, 1),
    )
    with pytest.raises(
        DataError, match=r"masks/1\.png: mask values \[0, 128, 255\] are not binary.*colour_map"
    ):
        read_paired_folders(tmp_path, progress=False)
    _png(tmp_path / "masks" / "1.png", _binary(0) * 255)
    (tmp_path / "masks" / "3.png").unlink()
    with pytest.raises(DataError, match=r"images/3\.png: image has no mask"):
        read_paired_folders(tmp_path, progress=False)
    _png(tmp_path / "masks" / "3.png", _binary(0) * 255)
    _png(tmp_path / "images" / "3.jpg", _grey(0))
    with pytest.raises(DataError, match=r"two files share the id '3': 3\.jpg and 3\.png"):
        read_paired_folders(tmp_path, progress=False)
    (tmp_path / "images" / "3.jpg").unlink()
    whole = (tmp_path / "images" / "3.png").read_bytes()
    (tmp_path / "images" / "3.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"images/3\.png: cannot read image"):
        read_paired_folders(tmp_path, progress=False)


def test_read_paired_folders_reads_only_the_requested_files(tmp_path):
    _paired_folder(tmp_path, stems=("1", "2", "3"))
    (tmp_path / "images" / "3.png").write_bytes(b"\x89PNG broken")  # would fail if it were read
    ds = read_paired_folders(tmp_path, files=["2.png", "1"], progress=False)
    assert ds.case_ids == ["1", "2"]
    with pytest.raises(DataError, match=r"requested file\(s\) are not in the folder: \['7\.png'\]"):
        read_paired_folders(tmp_path, files=["7.png"], progress=False)


def test_read_paired_folders_decodes_colours_with_a_colour_map(tmp_path):
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[0:2, 0:3], labels[3:6, 4:8] = 1, 2
    _png(tmp_path / "images" / "1.png", _grey(0))
    _png(tmp_path / "masks" / "1.png", encode_colour_mask(labels, MULTICLASS_COLOURS))
    ds = read_paired_folders(tmp_path, colour_map=MULTICLASS_COLOURS, progress=False)
    assert ds.class_names == ("background", "class_1", "class_2")
    np.testing.assert_array_equal(ds.masks[0], labels)
    named = read_paired_folders(
        tmp_path, colour_map=MULTICLASS_COLOURS, class_names=MULTICLASS_CLASS_NAMES, progress=False
    )
    assert named.class_names == MULTICLASS_CLASS_NAMES
    rgb = encode_colour_mask(labels, MULTICLASS_COLOURS)
    rgb[5, 7] = BLUE
    _png(tmp_path / "masks" / "1.png", rgb)
    with pytest.raises(
        DataError,
        match=r"masks/1\.png: mask has 1 colour\(s\) not in the colour map.*\(0, 0, 255\): 1 px",
    ):
        read_paired_folders(tmp_path, colour_map=MULTICLASS_COLOURS, progress=False)


def test_read_paired_folders_without_subfolders(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(
        DataError, match=r"no image and mask folders found; expected images/ \+ masks/"
    ):
        read_paired_folders(tmp_path, progress=False)


# --------------------------------------------------------------------------- NIfTI
def _nifti_folder(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import nibabel as nib

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(3)
    # A rotated, anisotropic affine: voxel axis 0 runs along y (0.75 mm), axis 1 along -x (0.5 mm).
    affine = np.array([[0, -0.5, 0, 12.0], [0.75, 0, 0, -30.0], [0, 0, 5.0, 40.0], [0, 0, 0, 1]])
    volumes = {}
    for ident, suffix in (("P2", ".nii.gz"), ("P1", ".nii")):
        raw = rng.integers(0, 600, (6, 5, 3)).astype(np.int16)
        labels = np.zeros((6, 5, 3), dtype=np.uint8)
        labels[1:3, 2:4, 1] = 1
        image = nib.Nifti1Image(raw, affine)
        image.header.set_data_dtype(np.int16)
        image.header.set_slope_inter(2.0, -1024.0)
        image.to_filename(folder / "images" / f"{ident}{suffix}")
        nib.Nifti1Image(labels, affine).to_filename(folder / "masks" / f"{ident}{suffix}")
        volumes[ident] = (raw, labels)
    return volumes


def test_read_nifti_pairs_applies_scaling_and_reads_zooms(tmp_path):
    import nibabel as nib

    volumes = _nifti_folder(tmp_path)
    stored = nib.load(tmp_path / "images" / "P1.nii")
    # The file stores the raw integers; the slope and intercept live in its header.
    np.testing.assert_array_equal(stored.dataobj.get_unscaled(), volumes["P1"][0])
    ds = read_nifti_pairs(tmp_path, progress=False)
    assert ds.unit == "HU" and len(ds) == 6
    assert ds.case_ids[:4] == ["P1_s000", "P1_s001", "P1_s002", "P2_s000"]
    assert ds.patient_ids == ["P1"] * 3 + ["P2"] * 3
    np.testing.assert_array_equal(ds.slice_indices, [0, 1, 2, 0, 1, 2])
    raw, labels = volumes["P1"]
    np.testing.assert_array_equal(ds.images[2], raw[:, :, 2].astype(np.float32) * 2 - 1024)
    np.testing.assert_array_equal(ds.masks[1], labels[:, :, 1])
    assert ds.spacing == pytest.approx((0.75, 0.5)) and ds.slice_thickness == pytest.approx(5.0)
    assert ds.has_lesion().tolist() == [False, True, False] * 2

    along_rows = read_nifti_pairs(
        [(tmp_path / "images" / "P1.nii", tmp_path / "masks" / "P1.nii")], axis=0, progress=False
    )
    assert along_rows.images.shape == (6, 5, 3) and along_rows.case_ids[-1] == "P1_s005"
    np.testing.assert_array_equal(along_rows.images[4], raw[4].astype(np.float32) * 2 - 1024)
    assert along_rows.spacing == pytest.approx((0.5, 5.0))
    assert along_rows.slice_thickness == pytest.approx(0.75)


def test_read_nifti_pairs_errors(tmp_path):
    import nibabel as nib

    _nifti_folder(tmp_path)
    nib.Nifti1Image(np.zeros((6, 5, 2), np.uint8), np.eye(4)).to_filename(
        tmp_path / "masks" / "P1.nii"
    )
    with pytest.raises(
        DataError,
        match=r"masks/P1\.nii: mask shape \(6, 5, 2\) differs from image shape \(6, 5, 3\)",
    ):
        read_nifti_pairs(tmp_path, progress=False)
    (tmp_path / "masks" / "P1.nii").unlink()
    with pytest.raises(DataError, match=r"images/P1\.nii: volume has no mask P1\.nii\[\.gz\]"):
        read_nifti_pairs(tmp_path, progress=False)


# --------------------------------------------------------------------------- DICOM
ROWS, COLS = 5, 6


def _dicom_slice(path: Path, raw: np.ndarray, z: float, instance: int, series: str, patient="PAT7"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    uid = f"1.2.826.0.1.3680043.8.498.{abs(hash((series, instance))) % 10**12}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.Modality, ds.PatientID = "CT", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", series
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [-10.0, 20.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.8]
    ds.SliceThickness = 2.5  # deliberately not the 5 mm spacing of the positions
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = raw.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _dicom_folder(folder: Path, series="1.2.3.4.5") -> np.ndarray:
    """Four slices at z = -10, -5, 0, 5 written in shuffled order under unrelated names.

    Returns the raw pixels in z order; slice k is 1024 + 100 k + a small ramp.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.arange(ROWS * COLS).reshape(ROWS, COLS)
    raws = np.stack([1024 + 100 * k + ramp for k in range(4)]).astype(np.uint16)
    names = {2: "x91", 0: "b.dcm", 3: "a.dcm", 1: "IM0007"}
    for k in (2, 0, 3, 1):
        # Instance numbers run against z, so sorting by them would give the wrong order.
        _dicom_slice(folder / names[k], raws[k], z=-10.0 + 5 * k, instance=4 - k, series=series)
    return raws


def test_read_dicom_series_orders_by_position_and_gives_hu(tmp_path):
    raws = _dicom_folder(tmp_path / "series")
    ds = read_dicom_series(tmp_path / "series", progress=False)
    assert ds.unit == "HU" and ds.images.shape == (4, ROWS, COLS)
    for k in range(4):
        np.testing.assert_array_equal(ds.images[k], raws[k].astype(np.float32) - 1024)
    assert ds.images[2, 0, 1] == 201.0  # 1024 + 200 + 1 - 1024
    assert [Path(p).name for p in ds.source_paths] == ["b.dcm", "IM0007", "x91", "a.dcm"]
    assert ds.patient_ids == ["PAT7"] * 4 and ds.case_ids[0] == "PAT7_s000"
    assert ds.spacing == pytest.approx((0.7, 0.8)) and ds.slice_thickness == pytest.approx(5.0)
    renamed = read_dicom_series(tmp_path / "series", progress=False, patient_id="Jane Doe/2")
    assert renamed.patient_ids == ["Jane Doe/2"] * 4
    assert renamed.case_ids[3] == "Jane_Doe_2_s003"  # case ids become file names


def test_read_dicom_series_aligns_masks(tmp_path):
    import nibabel as nib

    _dicom_folder(tmp_path / "series")
    labels = np.zeros((4, ROWS, COLS), dtype=np.uint8)
    labels[1, 0:2, 0:4] = 1
    labels[2, 3, 5] = 1
    from_array = read_dicom_series(tmp_path / "series", progress=False, mask=labels)
    np.testing.assert_array_equal(from_array.masks, labels)

    # As a converter would write it: voxel i = column, j = flipped row, k = slice, in RAS.
    x0, y0, z0 = -10.0, 20.0, -10.0
    affine = np.array(
        [[-0.8, 0, 0, -x0], [0, 0.7, 0, -y0 - (ROWS - 1) * 0.7], [0, 0, 5.0, z0], [0, 0, 0, 1]]
    )
    stored = np.ascontiguousarray(labels[:, ::-1, :].transpose(2, 1, 0))
    nib.Nifti1Image(stored, affine).to_filename(tmp_path / "mask.nii.gz")
    from_nifti = read_dicom_series(
        tmp_path / "series", progress=False, mask=tmp_path / "mask.nii.gz"
    )
    np.testing.assert_array_equal(from_nifti.masks, labels)

    # PNG masks named like the DICOM files.
    for name, k in (("b", 0), ("IM0007", 1), ("x91", 2), ("a", 3)):
        _png(tmp_path / "pngs" / f"{name}.png", labels[k] * 255)
    from_pngs = read_dicom_series(tmp_path / "series", progress=False, mask=tmp_path / "pngs")
    np.testing.assert_array_equal(from_pngs.masks, labels)

    with pytest.raises(DataError, match=r"mask array shape \(3, 5, 6\) differs"):
        read_dicom_series(tmp_path / "series", progress=False, mask=labels[:3])


def test_read_dicom_series_errors(tmp_path):
    _dicom_folder(tmp_path / "series")
    (tmp_path / "series" / "notes.txt").write_text("scanner log")
    with pytest.raises(DataError, match=r"notes\.txt: is not a DICOM file"):
        read_dicom_series(tmp_path / "series", progress=False)
    (tmp_path / "series" / "notes.txt").unlink()
    _dicom_slice(
        tmp_path / "series" / "other", np.zeros((ROWS, COLS)), z=30.0, instance=9, series="9.9.9"
    )
    with pytest.raises(DataError, match=r"holds 2 series"):
        read_dicom_series(tmp_path / "series", progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"nothing: empty folder"):
        read_dicom_series(tmp_path / "nothing", progress=False)


# --------------------------------------------------------------------------- CT-ICH
def _fake_ctich(folder: Path) -> None:
    rows = [
        "file,patient_id,slice_index_in_volume,n_slices_in_volume,has_mask,lesion_pixels,Subdural"
    ]
    layout = [(49, 1, 0), (49, 2, 1), (49, 3, 0), (50, 1, 0), (50, 2, 1), (50, 3, 0)]
    for n, (patient, index, positive) in enumerate(layout):
        labels = _binary(n) if positive else np.zeros((6, 8), np.uint8)
        _png(folder / "image" / f"{n}.png", _grey(n))
        _png(folder / "label" / f"{n}.png", labels * 255)
        rows.append(f"{n}.png,{patient},{index},3,{positive},{int(labels.sum())},{float(positive)}")
    (folder / "slices.csv").write_text("\n".join(rows) + "\n")


def test_load_ctich_reads_ids_and_filters(tmp_path):
    _fake_ctich(tmp_path)
    ds = load_ctich(tmp_path, progress=False)
    assert ds.class_names == ("background", "hemorrhage") and ds.unit == "display"
    assert ds.patient_ids == ["49"] * 3 + ["50"] * 3
    np.testing.assert_array_equal(ds.slice_indices, [1, 2, 3, 1, 2, 3])
    np.testing.assert_array_equal(ds.extra["has_mask"], ds.has_lesion().astype(int))
    np.testing.assert_array_equal(ds.extra["lesion_pixels"], ds.lesion_area())
    # Unneeded files are never opened: break a negative slice and filter it out.
    (tmp_path / "image" / "0.png").write_bytes(b"broken")
    positives = load_ctich(tmp_path, lesion_only=True, progress=False)
    assert positives.case_ids == ["1", "4"]
    assert load_ctich(tmp_path, patients=[50], progress=False).case_ids == ["3", "4", "5"]
    with pytest.raises(DataError, match=r"unknown patient ids \['77'\]"):
        load_ctich(tmp_path, patients=["77"], progress=False)


def test_load_ctich_without_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STROKEKIT_CTICH", str(tmp_path / "absent"))
    with pytest.raises(DataError, match=r"CT-ICH data not found.*STROKEKIT_CTICH.*slices\.csv"):
        load_ctich(progress=False)


# --------------------------------------------------------------------------- load_dataset
def test_load_dataset_detects_each_layout(tmp_path):
    _study_folder(tmp_path / "study")
    _paired_folder(tmp_path / "paired", dirs=("image", "label"))
    _nifti_folder(tmp_path / "nifti")
    _dicom_folder(tmp_path / "dicom")
    assert load_dataset(tmp_path / "study", progress=False).source_paths[0].endswith("study/1.png")
    assert load_dataset(tmp_path / "paired", progress=False).source_paths[0].endswith("image/1.png")
    assert load_dataset(tmp_path / "nifti", progress=False).case_ids[0] == "P1_s000"
    assert load_dataset(tmp_path / "dicom", progress=False).case_ids[0] == "PAT7_s000"
    _fake_ctich(tmp_path / "ctich")  # paired folders with a slices.csv: patient ids come along
    assert load_dataset(tmp_path / "ctich", progress=False).patient_ids[0] == "49"


def test_load_dataset_rejects_unknown_and_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: empty folder; layouts read: study layout"):
        load_dataset(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "README.txt").write_text("hello")
    _png(tmp_path / "odd" / "picture.png", _grey(0))
    with pytest.raises(
        DataError, match=r"odd: unknown layout; layouts read: .*paired folders.*NIfTI.*DICOM"
    ):
        load_dataset(tmp_path / "odd")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing")


# --------------------------------------------------------------------------- writing
def _display_dataset() -> SliceDataset:
    images = np.stack([_grey(k) for k in range(3)]).astype(np.float32)
    masks = np.stack([_binary(k) for k in range(3)])
    return SliceDataset(
        images=images,
        masks=masks,
        case_ids=["4", "12", "30"],
        patient_ids=["a", "a", "b"],
        slice_indices=[0, 1, 7],
        unit="display",
        extra={
            "level": np.array([1, 2, 3]),
            "lesion_type": np.array(["ich", "none", "ich"], dtype=object),
            "reviewed": np.array([True, False, True]),
        },
    )


def test_write_then_read_study_layout_round_trips(tmp_path):
    original = _display_dataset()
    folder = write_study_layout(original, tmp_path / "out", progress=False)
    header = (folder / "cases.csv").read_text().splitlines()[0]
    assert header == "case_id,patient_id,slice_index,level,lesion_type,reviewed"
    overlay = np.asarray(Image.open(folder / "4_result.png"))
    lesion = original.masks[0] > 0
    assert overlay.shape == (6, 8, 3) and np.all(overlay[lesion][:, 0] > overlay[lesion][:, 1])
    back = read_study_layout(folder, progress=False)  # picks up cases.csv by itself
    np.testing.assert_array_equal(back.images, original.images)
    np.testing.assert_array_equal(back.masks, original.masks)
    assert back.case_ids == original.case_ids and back.patient_ids == original.patient_ids
    np.testing.assert_array_equal(back.slice_indices, original.slice_indices)
    np.testing.assert_array_equal(back.extra["level"], [1, 2, 3])
    assert back.extra["lesion_type"].tolist() == ["ich", "none", "ich"]
    assert back.extra["reviewed"].dtype == bool and back.extra["reviewed"].tolist() == [1, 0, 1]
    explicit = read_study_layout(folder, patients_csv=folder / "cases.csv", progress=False)
    assert explicit.patient_ids == original.patient_ids


def test_write_study_layout_windows_hu_and_colour_codes_multiclass(tmp_path):
    hu = np.linspace(-100, 200, 3 * 6 * 8, dtype=np.float32).reshape(3, 6, 8)
    masks = np.zeros((3, 6, 8), dtype=np.uint8)
    masks[0, :2, :2], masks[1, 3:, 3:] = 1, 2
    ds = SliceDataset(hu, masks, ["a", "b", "c"], unit="HU", class_names=MULTICLASS_CLASS_NAMES)
    folder = write_study_layout(ds, tmp_path / "out", window="brain", progress=False)
    stored = np.asarray(Image.open(folder / "b_mask.png"))
    assert stored.shape == (6, 8, 3) and tuple(stored[5, 7]) == GREEN
    back = read_study_layout(folder, progress=False)
    assert back.class_names == MULTICLASS_CLASS_NAMES and back.unit == "display"
    np.testing.assert_array_equal(back.masks, masks)
    np.testing.assert_array_equal(back.images, np.rint(window_hu(hu, "brain") * 255))
    # -100 HU and 200 HU lie outside the brain window L40/W80.
    assert back.images.min() == 0 and back.images.max() == 255


def test_write_study_layout_refuses_non_empty_and_source_folders(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"busy: folder is not empty; pass overwrite=True"):
        write_study_layout(_display_dataset(), tmp_path / "busy", progress=False)
    write_study_layout(_display_dataset(), tmp_path / "busy", overwrite=True, progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "busy" / "4.png").is_file()
    # Rewriting with fewer slices removes the dropped slices' files, so the folder reads back
    # as the new dataset; files the kit did not list stay.
    write_study_layout(_display_dataset().subset([1, 2]), tmp_path / "busy", overwrite=True,
                       progress=False)
    assert not list((tmp_path / "busy").glob("4*.png"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert read_study_layout(tmp_path / "busy", progress=False).case_ids == ["12", "30"]
    _study_folder(tmp_path / "source")
    read = read_study_layout(tmp_path / "source", progress=False)
    with pytest.raises(
        DataError,
        match=r"source: refusing to write into the folder that holds the dataset's source files",
    ):
        write_study_layout(read, tmp_path / "source", overwrite=True, progress=False)


def test_readers_and_writer_leave_source_files_untouched(tmp_path):
    src = tmp_path / "src"
    _study_folder(src / "study")
    _paired_folder(src / "paired")
    _nifti_folder(src / "nifti")
    _dicom_folder(src / "dicom")
    _fake_ctich(src / "ctich")
    before = _snapshot(src)
    assert len(before) > 30
    study = read_study_layout(src / "study", progress=False)
    read_paired_folders(src / "paired", progress=False)
    nifti = read_nifti_pairs(src / "nifti", progress=False)
    read_dicom_series(src / "dicom", progress=False)
    load_ctich(src / "ctich", progress=False)
    write_study_layout(study, tmp_path / "out_study", progress=False)
    write_study_layout(nifti, tmp_path / "out_nifti", progress=False)
    assert _snapshot(src) == before


# --------------------------------------------------------------------------- bad input (issue 16)
def _edit_dicom(path: Path, **changes) -> Path:
    """Rewrite a DICOM file with some elements changed (a value of None deletes the element)."""
    import pydicom

    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A 68-byte PNG whose header declares width x height pixels (its pixel data is a stub)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )
    return path


def test_nifti_id_with_both_nii_and_nii_gz_is_an_error_naming_both(tmp_path):
    import shutil

    _nifti_folder(tmp_path)
    # images/P1.nii.gz next to images/P1.nii: one of them used to be dropped silently, and a lone
    # masks/P1.nii was then paired with whichever scan won.
    shutil.copy(tmp_path / "images" / "P2.nii.gz", tmp_path / "images" / "P1.nii.gz")
    with pytest.raises(
        DataError, match=r"images: two files share the id 'P1': P1\.nii and P1\.nii\.gz; keep one"
    ):
        read_nifti_pairs(tmp_path, progress=False)
    (tmp_path / "images" / "P1.nii.gz").unlink()
    shutil.copy(tmp_path / "masks" / "P1.nii", tmp_path / "masks" / "P2.nii")
    with pytest.raises(
        DataError, match=r"masks: two files share the id 'P2': P2\.nii and P2\.nii\.gz; keep one"
    ):
        load_dataset(tmp_path, progress=False)


def test_nifti_mask_of_0_and_128_is_not_read_as_129_classes(tmp_path):
    import nibabel as nib

    volumes = _nifti_folder(tmp_path)
    affine = nib.load(tmp_path / "masks" / "P1.nii").affine
    labels = volumes["P1"][1]
    nib.Nifti1Image(labels * 128, affine).to_filename(tmp_path / "masks" / "P1.nii")
    with pytest.raises(DataError) as info:
        read_nifti_pairs(tmp_path, progress=False)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "masks" / "P1.nii"))
    assert "mask values [0, 128] are not binary (expected {0, 255} or {0, 1})" in message
    assert "are in no mask" in message and "pass class_names=" in message
    with pytest.raises(DataError, match=r"P1\.nii: mask values \[0, 128\] are not labels 0\.\.1"):
        read_nifti_pairs(tmp_path, progress=False, class_names=("background", "lesion"))

    # Labels 0..2 that all occur are a label map; labels that skip one need their names.
    nib.Nifti1Image(labels * 2, affine).to_filename(tmp_path / "masks" / "P1.nii")
    alone = [(tmp_path / "images" / "P1.nii", tmp_path / "masks" / "P1.nii")]
    with pytest.raises(DataError, match=r"P1\.nii: mask values \[0, 2\] are not binary"):
        read_nifti_pairs(alone, progress=False)
    names = ("background", "hemorrhagic", "ischemic")
    assert read_nifti_pairs(alone, progress=False, class_names=names).class_names == names
    multi = labels.copy()
    multi[4, 0, 2] = 2
    nib.Nifti1Image(multi, affine).to_filename(tmp_path / "masks" / "P1.nii")
    assert read_nifti_pairs(tmp_path, progress=False).class_names == (
        "background", "class_1", "class_2",
    )


def test_image_size_scales_the_spacing_like_resize_dataset(tmp_path):
    import nibabel as nib

    from strokekit.preprocess import dataset_statistics, resize_dataset

    # A 16 mm² lesion (4 x 4 pixels of 1 mm) on a 40 x 40 slice; at 10 px it is one 4 mm pixel.
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    labels = np.zeros((40, 40, 1), np.uint8)
    labels[8:12, 20:24] = 1
    nib.Nifti1Image(np.zeros((40, 40, 1), np.int16), np.eye(4)).to_filename(tmp_path / "images/a.nii")
    nib.Nifti1Image(labels, np.eye(4)).to_filename(tmp_path / "masks/a.nii")
    small = read_nifti_pairs(tmp_path, image_size=10, progress=False)
    assert small.spacing == pytest.approx((4.0, 4.0))
    assert small.extra["spacing_row"][0] == pytest.approx(4.0)
    assert dataset_statistics(small)["lesion_mm2"][0] == pytest.approx(16.0)
    full = read_nifti_pairs(tmp_path, progress=False)
    assert dataset_statistics(full)["lesion_mm2"][0] == pytest.approx(16.0)
    assert resize_dataset(full, 10).spacing == pytest.approx(small.spacing)

    _dicom_folder(tmp_path / "series")  # 5 x 6 slices of 0.7 x 0.8 mm
    dicom = read_dicom_series(tmp_path / "series", image_size=10, progress=False)
    assert dicom.spacing == pytest.approx((0.7 * 5 / 10, 0.8 * 6 / 10))
    full = read_dicom_series(tmp_path / "series", progress=False)
    assert resize_dataset(full, 10).spacing == pytest.approx(dicom.spacing)


def test_dicom_without_rescale_tags_is_an_error_saying_how_to_fix_it(tmp_path):
    _dicom_folder(tmp_path / "series")
    _edit_dicom(tmp_path / "series" / "IM0007", RescaleIntercept=None)
    with pytest.raises(DataError) as info:
        read_dicom_series(tmp_path / "series", progress=False)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "series" / "IM0007") + ": no RescaleIntercept:")
    assert "cannot be turned into HU" in message and "add the scanner's RescaleSlope" in message
    _edit_dicom(tmp_path / "series" / "IM0007", RescaleSlope=None)
    with pytest.raises(DataError, match=r"IM0007: no RescaleSlope and no RescaleIntercept:"):
        read_dicom_series(tmp_path / "series", progress=False)


def test_dicom_series_with_a_missing_slice_names_the_gap(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    raw = np.zeros((ROWS, COLS))
    for k, z in enumerate((0.0, 2.5, 5.0, 10.0, 12.5)):  # the slice at 7.5 mm is missing
        _dicom_slice(folder / f"s{k}.dcm", raw, z=z, instance=k + 1, series="1.2.3.9")
    with pytest.raises(DataError) as info:
        read_dicom_series(folder, progress=False)
    assert str(info.value) == (
        f"{folder}: slices are missing: the positions jump from 5 to 10 mm between s2.dcm and "
        "s3.dcm (the other slices are 2.5 mm apart; 1 gap(s)); add the missing files, or put "
        "parts with different spacing in separate folders"
    )

    # Without positions the instance numbers order the slices; 1, 2, 4, 5 lacks number 3.
    for k, path in enumerate(sorted(folder.iterdir())):
        _edit_dicom(path, ImagePositionPatient=None, InstanceNumber=k + 1 + (k >= 2))
    with pytest.raises(
        DataError, match=r"series: slices are missing: the instance numbers jump from 2 to 4 "
        r"between s1\.dcm and s2\.dcm"
    ):
        read_dicom_series(folder, progress=False)


def test_16_bit_png_is_read_as_hu_plus_1024(tmp_path):
    from strokekit.preprocess import prepare_inputs

    # HU + 1024 as CT exports store it: -24..117 HU around the brain window's 0..80 HU.
    stored = (1000 + np.arange(48).reshape(6, 8) * 3).astype(np.uint16)
    for stem in ("1", "2"):
        _png(tmp_path / "images" / f"{stem}.png", stored)
        _png(tmp_path / "masks" / f"{stem}.png", _binary(1) * 255)
    data = load_dataset(tmp_path, progress=False)
    assert data.unit == "HU"
    np.testing.assert_array_equal(data.images[0], stored.astype(np.float32) - 1024)
    x, _ = prepare_inputs(data)
    assert len(np.unique(x[0])) > 20  # read as display values it gave 2-3 grey levels

    _png(tmp_path / "images" / "2.png", _grey(2))
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path, progress=False)
    assert str(info.value) == (
        f"{tmp_path / 'images' / '2.png'}: is an 8-bit image (display values) but 1.png is a "
        "16-bit image (HU + 1024); use one kind in a dataset"
    )
    _png(tmp_path / "images" / "2.png", np.full((6, 8), 60000, np.uint16))
    with pytest.raises(
        DataError, match=r"2\.png: 16-bit image with values up to 60000: 16-bit slices are read "
        r"as HU \+ 1024 \(0\.\.4095\), so this is not CT in HU"
    ):
        load_dataset(tmp_path, progress=False)


def test_csv_rows_naming_absent_files_are_an_error(tmp_path):
    _paired_folder(tmp_path)
    rows = "".join(f"{k}.png,p{k}\n" for k in (1, 2, 10, 99, 100, 101, 102, 103, 104))
    (tmp_path / "slices.csv").write_text("file,patient_id\n" + rows)
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path, progress=False)
    assert str(info.value) == (
        f"{tmp_path / 'slices.csv'}: 6 row(s) name files that are not in {tmp_path / 'images'}: "
        "['99.png', '100.png', '101.png', '102.png', '103.png'] ..."
    )
    _study_folder(tmp_path / "study")
    (tmp_path / "study" / "cases.csv").write_text("case_id,patient_id\n1,a\n2,a\n10,b\n11,b\n")
    with pytest.raises(DataError, match=r"cases\.csv: 1 row\(s\) name files that are not in .*study: \['11'\]"):
        read_study_layout(tmp_path / "study", progress=False)


def test_1_png_and_01_png_are_one_id(tmp_path):
    _study_folder(tmp_path / "study", stems=("1", "01", "2"))
    with pytest.raises(DataError) as info:
        read_study_layout(tmp_path / "study", progress=False)
    assert str(info.value) == (
        f"{tmp_path / 'study'}: two files share the id '1' ('01' and '1' are one number): 01.png "
        "and 1.png; keep one"
    )
    _paired_folder(tmp_path / "paired", stems=("7", "007"))
    with pytest.raises(DataError, match=r"images: two files share the id '7' .*: 007\.png and 7\.png"):
        read_paired_folders(tmp_path / "paired", progress=False)


def test_declared_sizes_are_checked_before_decoding(tmp_path, monkeypatch):
    import nibabel as nib
    from PIL import ImageFile

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(nib.Nifti1Image, "get_fdata", no_decoding)
    Image.fromarray(np.zeros((1, 5000), np.uint8)).save(tmp_path / "wide.png")  # 5000 x 1: cheap
    too_big = r"declares {} pixels; slices are read up to 4096 pixels a side"
    with pytest.raises(DataError, match=r"wide\.png: " + too_big.format("1x5000")):
        read_image(tmp_path / "wide.png")
    # The case: 68 bytes declaring 8000 x 8000 (took 44 s and 4.3 GB to decode).
    with pytest.raises(DataError, match=too_big.format("8000x8000")):
        read_image(_png_declaring(tmp_path / "big.png", 8000, 8000))
    with pytest.raises(DataError, match=r"huge\.png: declares too many pixels .* up to 4096 pixels"):
        read_image(_png_declaring(tmp_path / "huge.png", 20000, 20000))  # Pillow's bomb guard
    np.save(tmp_path / "long.npy", np.zeros((5000, 2), np.float32))
    with pytest.raises(DataError, match=r"long\.npy: " + too_big.format("5000x2")):
        read_image(tmp_path / "long.npy")

    (tmp_path / "nii" / "images").mkdir(parents=True)
    (tmp_path / "nii" / "masks").mkdir()
    for sub in ("images", "masks"):
        nib.Nifti1Image(np.zeros((5000, 1, 2), np.uint8), np.eye(4)).to_filename(
            tmp_path / "nii" / sub / "a.nii"
        )
    with pytest.raises(DataError, match=r"images/a\.nii: " + too_big.format("5000x1")):
        read_nifti_pairs(tmp_path / "nii", progress=False)

    # A DICOM declaring 12000 x 12000 with 60 bytes of pixel data: decoding would fail differently.
    _dicom_folder(tmp_path / "series")
    _edit_dicom(tmp_path / "series" / "x91", Rows=12000, Columns=12000)
    with pytest.raises(DataError, match=r"x91: " + too_big.format("12000x12000")):
        read_dicom_series(tmp_path / "series", progress=False)
