"""Readers for the slice layouts people actually have, and a writer for the study's layout.

Every reader returns a :class:`strokekit.dataset.SliceDataset`. Source files are only ever
opened for reading; the writer refuses to write where the dataset's own files live.

Layouts read:

* the few-shot study's folder: ``N.png``, ``N_mask.png``, ``N_result.png``
  (:func:`read_study_layout`);
* paired folders ``images/`` + ``masks/`` or ``image/`` + ``label/`` (:func:`read_paired_folders`);
* NIfTI volume pairs ``images/ID.nii.gz`` + ``masks/ID.nii.gz`` (:func:`read_nifti_pairs`);
* one DICOM series in a folder (:func:`read_dicom_series`);
* the shared CT-ICH slices (:func:`load_ctich`), and any of the above by detection
  (:func:`load_dataset`);
* a real source set for transfer learning, by name (:func:`load_source_dataset`, notebook 05).

Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import SliceDataset
from .errors import DataError
from .preprocess import resize_image, resize_mask

__all__ = [
    "HU_OFFSET_16BIT",
    "IMAGE_SUFFIXES",
    "LAYOUTS",
    "MAX_SLICE_SIDE",
    "MULTICLASS_CLASS_NAMES",
    "MULTICLASS_COLOURS",
    "decode_colour_mask",
    "encode_colour_mask",
    "load_ctich",
    "load_dataset",
    "read_dicom_series",
    "read_image",
    "read_nifti_pairs",
    "read_paired_folders",
    "read_study_layout",
    "write_study_layout",
]

#: Colour of each label in the study's colour-coded masks: red = hemorrhagic, green = ischemic.
MULTICLASS_COLOURS: dict[tuple[int, int, int], int] = {(0, 0, 0): 0, (255, 0, 0): 1, (0, 255, 0): 2}
#: Class names that go with :data:`MULTICLASS_COLOURS`.
MULTICLASS_CLASS_NAMES: tuple[str, ...] = ("background", "hemorrhagic", "ischemic")
BINARY_CLASS_NAMES: tuple[str, ...] = ("background", "lesion")
#: File suffixes the 2-D readers accept (lower case).
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
_LOSSY_SUFFIXES = (".jpg", ".jpeg")
#: Folder pairs (images, masks) that :func:`read_paired_folders` finds by itself, in this order.
PAIRED_DIRS: tuple[tuple[str, str], ...] = (
    ("images", "masks"),
    ("image", "label"),
    ("images", "labels"),
    ("image", "mask"),
)
#: The layouts :func:`load_dataset` recognises, as shown in its error message.
LAYOUTS: tuple[str, ...] = (
    "study layout: N.png + N_mask.png (+ N_result.png) in one folder",
    "paired folders: images/ + masks/ or image/ + label/, same file stems (png/jpg/tif/npy)",
    "NIfTI pairs: images/ID.nii[.gz] + masks/ID.nii[.gz]",
    "DICOM series: one series of .dcm (or extension-less DICOM) files in one folder",
)
#: Largest side (pixels) of a 2-D slice any reader accepts. Every format's declared size is checked
#: from its header before the pixels are decoded: a 79 KB PNG can declare 8000 x 8000 pixels and
#: decode into gigabytes.
MAX_SLICE_SIDE = 4096
#: A 16-bit grey image file (PNG, TIFF) holds HU + this offset, the usual way CT slices are exported
#: to PNG (air, -1000 HU, is stored as 24). Such slices are read in HU.
HU_OFFSET_16BIT = 1024
#: Largest stored value of such a file: HU 3071, the top of the 12-bit CT range.
_MAX_STORED_16BIT = 4095
_STUDY_ROLES = ("_mask", "_result")
_CASES_CSV = "cases.csv"
_MAX_WORKERS = 8


# ----------------------------------------------------------------------------- small helpers
def _natural_key(text: str) -> tuple:
    """Sort key that orders ``"2"`` before ``"10"`` and ``"a2"`` before ``"a10"``."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", text)
        if part
    )


def _sorted_stems(stems: Iterable[str]) -> list[str]:
    stems = list(stems)
    if all(re.fullmatch(r"-?\d+", s) for s in stems):
        return sorted(stems, key=int)
    return sorted(stems, key=_natural_key)


def _check_image_size(image_size: int | None) -> int | None:
    if image_size is None:
        return None
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    return int(image_size)


def _check_slice_size(shape: Sequence[int], path: str | os.PathLike | None) -> None:
    """The one size check: a slice's declared (rows, cols), read from its header, against the cap.

    Raises:
        DataError: a side is above :data:`MAX_SLICE_SIDE`.
    """
    rows, cols = (int(side) for side in shape)
    if max(rows, cols) > MAX_SLICE_SIDE:
        raise DataError(
            f"declares {rows}x{cols} pixels; slices are read up to {MAX_SLICE_SIDE} pixels a side "
            "(strokekit.io.MAX_SLICE_SIDE, checked before decoding); downsample or crop it first",
            path,
        )


def _safe_name(text: str) -> str:
    """A file-name-safe form of an id (case ids become file names in the study layout)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("_") or "unnamed"


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _id_key(ident: str) -> str:
    """What makes two ids the same: ``"01"`` and ``"1"`` name one number (ids sort as numbers)."""
    return str(int(ident)) if re.fullmatch(r"[0-9]+", ident) else ident


def _index_unique(entries: Iterable[tuple[str, Path]], folder: Path) -> dict[str, Path]:
    """id → file; two files with one id (also ``1.png`` and ``01.png``) are an error."""
    found: dict[str, Path] = {}
    by_key: dict[str, str] = {}
    for ident, path in entries:
        key = _id_key(ident)
        if key in by_key:
            first = by_key[key]
            same = "" if first == ident else f" ({first!r} and {ident!r} are one number)"
            raise DataError(
                f"two files share the id {ident!r}{same}: {found[first].name} and {path.name}; "
                "keep one",
                folder,
            )
        by_key[key] = ident
        found[ident] = path
    return found


def _require_folder(folder: str | os.PathLike, what: str = "folder") -> Path:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{what} does not exist", folder)
    if not folder.is_dir():
        raise DataError(f"expected a {what}, found a file", folder)
    return folder


def _map_ordered(func: Callable, items: Sequence, progress: bool, desc: str) -> Iterable:
    """``map`` over a thread pool, in order, with a progress bar.

    Threads pay off because PNG decoding (zlib) and Pillow's resize release the GIL.
    """
    from tqdm.auto import tqdm

    workers = max(1, min(_MAX_WORKERS, (os.cpu_count() or 1) + 2, len(items)))
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="slice")
    try:
        if workers == 1:
            for item in items:
                yield func(item)
                bar.update(1)
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for result in pool.map(func, items):
                    yield result
                    bar.update(1)
            finally:
                # On an error, drop the queued slices instead of reading thousands in vain.
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


# ----------------------------------------------------------------------------- colour masks
def _check_colour_map(colour_map: Mapping) -> dict[tuple[int, int, int], int]:
    checked: dict[tuple[int, int, int], int] = {}
    for colour, label in dict(colour_map).items():
        rgb = tuple(int(c) for c in colour)
        if len(rgb) != 3 or any(c < 0 or c > 255 for c in rgb):
            raise ValueError(
                f"colour_map keys must be (R, G, B) with values 0..255, got {colour!r}"
            )
        if not 0 <= int(label) <= 255:
            raise ValueError(f"colour_map labels must lie in 0..255, got {label!r} for {colour!r}")
        checked[rgb] = int(label)
    if not checked:
        raise ValueError("colour_map is empty; expected e.g. {(0, 0, 0): 0, (255, 0, 0): 1}")
    return checked


def _packed(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.uint32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def decode_colour_mask(
    rgb: np.ndarray,
    colour_map: Mapping[tuple[int, int, int], int],
    path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Turn a colour-coded mask into integer labels.

    Args:
        rgb: uint8 array (H, W, 3) (an alpha channel is dropped; a grey (H, W) array is
            read as R = G = B).
        colour_map: (R, G, B) → label, e.g. :data:`MULTICLASS_COLOURS`. It must include the
            background colour.
        path: the file the mask came from, named in errors.

    Returns:
        uint8 label array (H, W).

    Raises:
        DataError: some pixels have colours that are not in ``colour_map``; the message lists up
            to five of them with their pixel counts.
        ValueError: ``colour_map`` is malformed.
    """
    cmap = _check_colour_map(colour_map)
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise DataError(f"expected an RGB mask (H, W, 3), got shape {rgb.shape}", path)
    if rgb.dtype != np.uint8:
        if rgb.size and (rgb.min() < 0 or rgb.max() > 255 or not np.all(rgb == np.round(rgb))):
            raise DataError("colour mask values must be integers in 0..255", path)
        rgb = rgb.astype(np.uint8)
    keys = _packed(rgb[..., :3])
    labels = np.zeros(keys.shape, dtype=np.uint8)
    matched = np.zeros(keys.shape, dtype=bool)
    # One comparison per known colour is much faster than np.unique over every pixel.
    for colour, label in cmap.items():
        hit = keys == ((colour[0] << 16) | (colour[1] << 8) | colour[2])
        labels[hit] = label
        matched |= hit
    if not matched.all():
        values, counts = np.unique(keys[~matched], return_counts=True)
        order = np.argsort(-counts, kind="stable")
        shown = ", ".join(
            f"({v >> 16}, {(v >> 8) & 255}, {v & 255}): {c} px"
            for v, c in zip(values[order][:5].tolist(), counts[order][:5].tolist())
        )
        more = f" and {len(values) - 5} more" if len(values) > 5 else ""
        raise DataError(
            f"mask has {len(values)} colour(s) not in the colour map {sorted(cmap)}: {shown}{more}",
            path,
        )
    return labels


def encode_colour_mask(
    labels: np.ndarray, colour_map: Mapping[tuple[int, int, int], int]
) -> np.ndarray:
    """Turn integer labels into a colour-coded uint8 RGB mask; undoes :func:`decode_colour_mask`.

    Args:
        labels: integer label array of any shape.
        colour_map: (R, G, B) → label; when two colours share a label the first is used.

    Returns:
        uint8 array of shape ``labels.shape + (3,)``.

    Raises:
        ValueError: a label present in ``labels`` has no colour in ``colour_map``.
    """
    cmap = _check_colour_map(colour_map)
    colour_of: dict[int, tuple[int, int, int]] = {}
    for colour, label in cmap.items():
        colour_of.setdefault(label, colour)
    labels = np.asarray(labels)
    present = [int(v) for v in np.unique(labels)]
    missing = [v for v in present if v not in colour_of]
    if missing:
        raise ValueError(
            f"labels {missing} have no colour in the colour map "
            f"(labels with colours: {sorted(colour_of)})"
        )
    lut = np.zeros((max(present + [0]) + 1, 3), dtype=np.uint8)
    for label in present:
        lut[label] = colour_of[label]
    return lut[labels.astype(np.int64)]


# ----------------------------------------------------------------------------- single files
def _read_array(path: str | os.PathLike) -> np.ndarray:
    """The pixels of a 2-D image file as stored: (H, W) grey or (H, W, 3) RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file does not exist", path)
    if path.suffix.lower() == ".npy":
        try:
            # Mapped, not read: the shape is checked before the data are loaded.
            mapped = np.load(path, allow_pickle=False, mmap_mode="r")
            if mapped.ndim >= 2:
                _check_slice_size(mapped.shape[:2], path)
            arr = np.array(mapped)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read .npy array ({exc})", path) from exc
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
            raise DataError(
                f"expected a 2-D (H, W) or (H, W, 3) array, got shape {arr.shape}", path
            )
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise DataError(f"expected a numeric array, got dtype {arr.dtype}", path)
        return arr
    from PIL import Image

    try:
        with Image.open(path) as im:
            _check_slice_size(im.size[::-1], path)  # the header's size; nothing is decoded yet
            if getattr(im, "n_frames", 1) > 1:
                raise DataError(f"has {im.n_frames} frames; expected a single 2-D image", path)
            mode = im.mode
            if mode in ("1", "P", "CMYK", "YCbCr", "RGBA", "LAB", "HSV", "PA"):
                im = im.convert("RGB") if mode != "1" else im.convert("L")
            elif mode == "LA":
                im = im.getchannel("L")
            arr = np.asarray(im)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"declares too many pixels ({exc}); slices are read up to {MAX_SLICE_SIDE} pixels "
            "a side",
            path,
        ) from None
    except Exception as exc:
        raise DataError(f"cannot read image ({type(exc).__name__}: {exc})", path) from exc
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise DataError(f"unsupported image shape {arr.shape}", path)
    return arr


def _to_grey(arr: np.ndarray, path: Path, what: str = "image") -> np.ndarray:
    if arr.ndim == 2:
        return arr
    channels = arr.astype(np.int64)
    spread = int((channels.max(axis=-1) - channels.min(axis=-1)).max()) if arr.size else 0
    # JPEG's chroma compression leaves grey pictures a few levels off grey.
    tolerance = 3 if path.suffix.lower() in _LOSSY_SUFFIXES else 0
    if spread > tolerance:
        raise DataError(
            f"is a colour {what} (RGB channels differ by up to {spread}); expected a grey {what}",
            path,
        )
    return arr[..., 0] if spread == 0 else np.rint(channels.mean(axis=-1)).astype(arr.dtype)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one grey image (png/jpg/tif/bmp via Pillow, or .npy).

    Args:
        path: the image file.

    Returns:
        float32 array (H, W) with the stored values (e.g. 0..255 for 8-bit PNG; a 16-bit PNG's
        HU + 1024 as stored: the folder readers turn those into HU).

    Raises:
        DataError: the file is missing, unreadable, truncated, not an image, a colour image
            whose RGB channels differ, or declares a side above :data:`MAX_SLICE_SIDE`.
    """
    path = Path(path)
    return _to_grey(_read_array(path), path).astype(np.float32)


def _read_slice(path: Path) -> tuple[np.ndarray, str]:
    """One grey slice as float32 and its unit.

    8-bit files (and .npy arrays) hold display values. A 16-bit grey image file holds
    HU + :data:`HU_OFFSET_16BIT`, the common CT PNG convention, and is returned in HU; values
    above 4095 (HU 3071, the top of the 12-bit CT range) mean it holds something else.
    """
    stored = _to_grey(_read_array(path), path)
    is_16bit = stored.dtype.kind == "u" and stored.dtype.itemsize == 2
    if not is_16bit or path.suffix.lower() == ".npy":
        return stored.astype(np.float32), "display"
    top = int(stored.max(initial=0))
    if top > _MAX_STORED_16BIT:
        raise DataError(
            f"16-bit image with values up to {top}: 16-bit slices are read as HU + "
            f"{HU_OFFSET_16BIT} (0..{_MAX_STORED_16BIT}), so this is not CT in HU; save it as an "
            "8-bit display PNG, or as NIfTI/DICOM in HU",
            path,
        )
    return stored.astype(np.float32) - np.float32(HU_OFFSET_16BIT), "HU"


def _distinct(arr: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for 8-bit data is ~10x faster than np.unique."""
    if arr.dtype == np.uint8:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).astype(np.uint8)
    return np.unique(arr)


def _binary_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    """0/255 or 0/1 → 0/1; anything else is an error that points at colour_map."""
    if arr.ndim == 3:
        if arr.size and bool(np.any(arr != arr[..., :1])):
            raise DataError(
                "mask is colour-coded (its RGB channels differ); pass colour_map= "
                "(e.g. strokekit.io.MULTICLASS_COLOURS) to read colour-coded masks",
                path,
            )
        arr = arr[..., 0]
    values = _distinct(arr)
    if set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    if set(values.tolist()) <= {0, 1}:
        return arr.astype(np.uint8)
    shown = values[:10].tolist()
    raise DataError(
        f"mask values {shown}{' ...' if len(values) > 10 else ''} are not binary "
        "(expected {0, 255} or {0, 1}); pass colour_map= for colour-coded masks, "
        "or class_names= for integer label maps",
        path,
    )


def _label_mask(arr: np.ndarray, path: Path, n_classes: int) -> np.ndarray:
    """Integer label maps (0..n_classes-1); a {0, 255}-only mask counts as binary."""
    if arr.ndim == 3:
        arr = _to_grey(arr, path, "mask")
    values = _distinct(arr)
    if values.size and set(values.tolist()) <= {0, 255} and 255 in values and n_classes < 256:
        return (arr == 255).astype(np.uint8)
    if values.size and (
        values.min() < 0 or values.max() >= n_classes or np.any(values != np.round(values))
    ):
        raise DataError(
            f"mask values {values[:10].tolist()} are not labels 0..{n_classes - 1} "
            f"(one per class name)",
            path,
        )
    return arr.astype(np.uint8)


# ----------------------------------------------------------------------------- CSV tables
_ID_COLUMNS = ("case_id", "file", "filename", "case", "id", "image")
_PATIENT_COLUMNS = ("patient_id", "patient", "PatientID")
_SLICE_COLUMNS = ("slice_index", "slice_index_in_volume", "slice")


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _pick_column(
    columns: Sequence[str], preferred: str | None, candidates: Sequence[str]
) -> str | None:
    if preferred is not None and preferred in columns:
        return preferred
    for name in candidates:
        if name in columns:
            return name
    return None


def _read_case_table(
    csv_path: str | os.PathLike,
    stems: Sequence[str],
    id_column: str | None = None,
    patient_column: str | None = None,
    slice_column: str | None = None,
    *,
    folder: Path,
    present: Iterable[str] | None = None,
) -> tuple[list[str] | None, np.ndarray | None, dict[str, np.ndarray]]:
    """Patient ids, slice indices and extra columns for ``stems`` from a one-row-per-file CSV.

    Every row must name a file of ``folder``: ``present`` (the ids found there; default ``stems``).
    """
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError("CSV file does not exist", csv_path)
    try:
        table = pd.read_csv(csv_path, dtype=str)
    except Exception as exc:
        raise DataError(f"cannot read CSV ({exc})", csv_path) from exc
    columns = list(table.columns)
    id_col = _pick_column(columns, id_column, _ID_COLUMNS)
    if id_col is None:
        raise DataError(
            f"no id column: expected {id_column or 'one of ' + str(list(_ID_COLUMNS))}; "
            f"columns are {columns}",
            csv_path,
        )
    pid_col = _pick_column(columns, patient_column, _PATIENT_COLUMNS)
    if pid_col is None:
        raise DataError(
            "no patient column: expected "
            f"{patient_column or 'one of ' + str(list(_PATIENT_COLUMNS))}; "
            f"columns are {columns}",
            csv_path,
        )
    slice_col = _pick_column(columns, slice_column, _SLICE_COLUMNS)
    if table[id_col].isna().any():
        rows = (np.flatnonzero(table[id_col].isna().to_numpy()) + 2).tolist()
        raise DataError(f"empty {id_col!r} in rows {rows[:5]}", csv_path)
    keys = [_strip_suffix(str(v).strip()) for v in table[id_col]]
    seen: dict[str, int] = {}
    dups: list[str] = []
    for row, key in enumerate(keys):
        if key in seen:
            dups.append(f"{key!r} (rows {seen[key] + 2} and {row + 2})")
        else:
            seen[key] = row
    if dups:
        raise DataError(f"duplicate rows for {len(dups)} id(s): {', '.join(dups[:5])}", csv_path)
    missing = [s for s in stems if s not in seen]
    if missing:
        raise DataError(
            f"{len(missing)} file(s) have no row in column {id_col!r}: {missing[:5]}", csv_path
        )
    known = set(stems if present is None else present)
    absent = [str(name).strip() for name, key in zip(table[id_col], keys) if key not in known]
    if absent:
        more = " ..." if len(absent) > 5 else ""
        raise DataError(
            f"{len(absent)} row(s) name files that are not in {folder}: {absent[:5]}{more}",
            csv_path,
        )
    rows = table.iloc[[seen[s] for s in stems]].reset_index(drop=True)

    patients = rows[pid_col]
    if patients.isna().all():
        patient_ids = None
    elif patients.isna().any():
        bad = [stems[i] for i in np.flatnonzero(patients.isna().to_numpy())]
        raise DataError(f"no {pid_col!r} for {len(bad)} file(s): {bad[:5]}", csv_path)
    else:
        patient_ids = [str(p).strip() for p in patients]

    slice_indices = None
    if slice_col is not None:
        values = pd.to_numeric(rows[slice_col], errors="coerce")
        bad = [
            stems[i]
            for i in np.flatnonzero((values.notna() & (values != values.round())).to_numpy())
        ]
        if bad or (values.isna() & rows[slice_col].notna()).any():
            raise DataError(
                f"column {slice_col!r} must hold integers; bad for {bad[:5] or 'some rows'}",
                csv_path,
            )
        slice_indices = values.fillna(-1).to_numpy(dtype=np.int64)

    extra: dict[str, np.ndarray] = {}
    for column in columns:
        if column in (id_col, pid_col, slice_col):
            continue
        values = rows[column]
        if values.notna().all() and set(values) <= {"True", "False"}:
            extra[column] = (values == "True").to_numpy()
            continue
        try:
            extra[column] = pd.to_numeric(values).to_numpy()
        except (ValueError, TypeError):
            extra[column] = values.fillna("").to_numpy(dtype=object)
    return patient_ids, slice_indices, extra


# ----------------------------------------------------------------------------- 2-D pair reading
def _load_pair(
    image_path: Path,
    mask_path: Path,
    mode: str,
    image_size: int | None,
    colour_map: Mapping | None,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, bool, bool, tuple[int, ...], str]:
    """Read, check and resize one image/mask pair.

    Returns the image, the labels, whether the mask was colour-coded, whether a grey mask had
    lesion pixels (both only matter in the study's ``auto`` mode), the original shape and the
    image's unit (see :func:`_read_slice`).
    """
    image, unit = _read_slice(image_path)
    raw = _read_array(mask_path)
    if raw.shape[:2] != image.shape:
        raise DataError(
            f"mask is {_shape_text(raw.shape[:2])} but its image {image_path.name} is "
            f"{_shape_text(image.shape)}",
            mask_path,
        )
    is_colour = False
    grey_lesion = False
    if mode == "colour":
        labels = decode_colour_mask(raw, colour_map, mask_path)
    elif mode == "labels":
        labels = _label_mask(raw, mask_path, n_classes)
    elif mode == "auto":
        is_colour = raw.ndim == 3 and bool(np.any(raw != raw[..., :1]))
        if is_colour:
            labels = decode_colour_mask(raw, MULTICLASS_COLOURS, mask_path)
        else:
            labels = _binary_mask(raw, mask_path)
            grey_lesion = bool(labels.any())
    else:
        labels = _binary_mask(raw, mask_path)
    shape = image.shape
    if image_size is not None:
        image = resize_image(image, image_size)
        labels = resize_mask(labels, image_size).astype(np.uint8)
    return image, labels, is_colour, grey_lesion, shape, unit


def _read_pairs(
    pairs: Sequence[tuple[str, Path, Path]],
    mode: str,
    image_size: int | None,
    colour_map: Mapping | None,
    n_classes: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray, bool, list[int], str]:
    """Stacked images and masks for (stem, image, mask) triples; checks sizes and units agree.

    Returns the images, masks, whether any mask was colour-coded, the rows whose grey mask had
    lesion pixels and the images' unit.
    """
    n = len(pairs)
    images = masks = None
    first_shape: tuple[int, ...] | None = None
    first_unit = "display"
    any_colour = False
    grey_lesion_rows: list[int] = []

    def job(item):
        _, image_path, mask_path = item
        return _load_pair(image_path, mask_path, mode, image_size, colour_map, n_classes)

    results = _map_ordered(job, pairs, progress, desc)
    try:
        for i, (image, labels, is_colour, grey_lesion, shape, unit) in enumerate(results):
            if first_shape is None:
                first_shape, first_unit = shape, unit
                images = np.empty((n, *image.shape), dtype=np.float32)
                masks = np.empty((n, *labels.shape), dtype=np.uint8)
            elif image_size is None and shape != first_shape:
                raise DataError(
                    f"image is {_shape_text(shape)} but the first image ({pairs[0][1]}) is "
                    f"{_shape_text(first_shape)}; pass image_size= to resize all to one size",
                    pairs[i][1],
                )
            if unit != first_unit:
                raise DataError(_mixed_units_text(unit, pairs[0][1]), pairs[i][1])
            images[i] = image
            masks[i] = labels
            any_colour |= is_colour
            if grey_lesion:
                grey_lesion_rows.append(i)
    finally:
        results.close()
    return images, masks, any_colour, grey_lesion_rows, first_unit


def _pairs_dataset(
    pairs: Sequence[tuple[str, Path, Path]],
    images: np.ndarray,
    masks: np.ndarray,
    unit: str,
    class_names: Sequence[str],
    case_table: str | os.PathLike | None,
    **table_kwargs: Any,
) -> SliceDataset:
    """The SliceDataset of read (stem, image, mask) pairs; a case table adds patients and extras."""
    stems = [stem for stem, _, _ in pairs]
    patient_ids = slice_indices = None
    extra: dict[str, np.ndarray] = {}
    if case_table is not None:
        patient_ids, slice_indices, extra = _read_case_table(case_table, stems, **table_kwargs)
    return SliceDataset(
        images=images,
        masks=masks,
        case_ids=stems,
        patient_ids=patient_ids,
        slice_indices=slice_indices,
        source_paths=[str(image_path) for _, image_path, _ in pairs],
        unit=unit,
        class_names=tuple(class_names),
        extra=extra,
    )


def _mixed_units_text(unit: str, first: Path) -> str:
    kinds = {"HU": "a 16-bit image (HU + 1024)", "display": "an 8-bit image (display values)"}
    other = "display" if unit == "HU" else "HU"
    return f"is {kinds[unit]} but {first.name} is {kinds[other]}; use one kind in a dataset"


def _index_by_stem(paths: Iterable[Path], folder: Path) -> dict[str, Path]:
    """stem → file for files with a readable suffix; two files with one id are an error."""
    return _index_unique(
        ((p.stem, p) for p in paths if p.suffix.lower() in IMAGE_SUFFIXES), folder
    )


def _stem_key(name: str) -> str:
    return _strip_suffix(str(name))


# ----------------------------------------------------------------------------- study layout
def read_study_layout(
    folder: str | os.PathLike,
    image_size: int | None = None,
    patients_csv: str | os.PathLike | None = None,
    progress: bool = True,
    colour_map: Mapping[tuple[int, int, int], int] | None = None,
    class_names: Sequence[str] | None = None,
) -> SliceDataset:
    """Read the few-shot study's layout: ``N.png`` with ``N_mask.png`` (``N_result.png`` ignored).

    Masks are binary (0/255 or 0/1 grey → labels 0/1, class names ``("background", "lesion")``)
    unless some mask is colour-coded: then every mask is decoded with ``colour_map`` (default
    :data:`MULTICLASS_COLOURS`: red = hemorrhagic = 1, green = ischemic = 2).

    Args:
        folder: the folder with the slices.
        image_size: resize every slice to image_size x image_size (images bilinear and
            anti-aliased, masks nearest-neighbour). Without it all slices must share one size.
        patients_csv: CSV with one row per slice: an id column (``case_id`` or ``file``), a
            patient column (``patient_id``) and optionally ``slice_index``; other columns go to
            ``extra``. Defaults to ``folder/cases.csv`` when that exists (as written by
            :func:`write_study_layout`).
        progress: show a progress bar.
        colour_map: force colour-coded decoding with this map.
        class_names: names of the labels; defaults as described above.

    Returns:
        SliceDataset with ``unit="display"`` (8-bit values 0..255), or ``unit="HU"`` when the
        images are 16-bit: those hold HU + :data:`HU_OFFSET_16BIT` (the common CT PNG convention).

    Raises:
        DataError: empty folder, an image without its mask (or a mask without its image), two
            files with one id (also ``1.png`` and ``01.png``), unreadable files, a side above
            :data:`MAX_SLICE_SIDE`, size mismatches, 8-bit and 16-bit images mixed, 16-bit values
            above 4095, mask colours outside the map, ids missing from the CSV or CSV rows naming
            files that are not there.
    """
    folder = _require_folder(folder)
    image_size = _check_image_size(image_size)
    files = [p for p in _visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    roles = {p: next((r for r in _STUDY_ROLES if p.stem.endswith(r)), None) for p in files}
    # N_result.png is an overlay for people, not data.
    images = _index_unique(((p.stem, p) for p in files if roles[p] is None), folder)
    masks = _index_unique(
        ((p.stem[: -len("_mask")], p) for p in files if roles[p] == "_mask"), folder
    )
    if not images and not masks:
        raise DataError(
            "empty folder: expected the study layout N.png + N_mask.png (+ N_result.png)", folder
        )
    no_mask = [images[s].name for s in _sorted_stems(images) if s not in masks]
    if no_mask:
        raise DataError(
            f"{len(no_mask)} image(s) have no mask: {images[_stem_key(no_mask[0])]} has no "
            f"{_stem_key(no_mask[0])}_mask.png (first few: {no_mask[:5]})",
            folder,
        )
    no_image = [masks[s].name for s in _sorted_stems(masks) if s not in images]
    if no_image:
        raise DataError(f"{len(no_image)} mask(s) have no image: {no_image[:5]}", folder)
    stems = _sorted_stems(images)
    pairs = [(s, images[s], masks[s]) for s in stems]

    mode = "auto" if colour_map is None else "colour"
    n_classes = len(class_names) if class_names is not None else 2
    imgs, labels, any_colour, grey_rows, unit = _read_pairs(
        pairs, mode, image_size, colour_map, n_classes, progress, "study slices"
    )
    if mode == "auto" and any_colour and grey_rows:
        raise DataError(
            "mask is white/grey while other masks in the folder are colour-coded; use one "
            f"convention (colours: {MULTICLASS_COLOURS})",
            pairs[grey_rows[0]][2],
        )
    if class_names is None:
        if mode == "colour":
            class_names = _default_class_names(_check_colour_map(colour_map))
        else:
            class_names = MULTICLASS_CLASS_NAMES if any_colour else BINARY_CLASS_NAMES

    if patients_csv is None and (folder / _CASES_CSV).is_file():
        patients_csv = folder / _CASES_CSV
    return _pairs_dataset(pairs, imgs, labels, unit, class_names, patients_csv, folder=folder)


def _default_class_names(cmap: Mapping[tuple[int, int, int], int]) -> tuple[str, ...]:
    return _numbered_class_names(max(cmap.values()))


def _numbered_class_names(top: int) -> tuple[str, ...]:
    """``("background", "class_1", ..., "class_<top>")``."""
    return ("background",) + tuple(f"class_{k}" for k in range(1, top + 1))


def _class_names_for_labels(
    labels_by_file: Mapping[Path | None, np.ndarray], class_names: Sequence[str] | None
) -> tuple[str, ...]:
    """Class names for integer label volumes (NIfTI and DICOM masks), from each file's labels.

    With ``class_names`` every label needs a name. Without, the labels must run 0, 1, ..., K with
    none missing from all masks: a 0/128 mask is a binary mask with an unusual foreground value,
    not 129 classes.
    """
    if class_names is not None:
        names = tuple(class_names)
        for path, values in labels_by_file.items():
            if values.size and int(values.max()) >= len(names):
                raise DataError(
                    f"mask values {values[:10].tolist()} are not labels 0..{len(names) - 1} "
                    "(one per class name)",
                    path,
                )
        return names
    present = set().union(*(values.tolist() for values in labels_by_file.values()))
    top = max(present, default=0)
    absent = sorted(set(range(top + 1)) - present)
    if absent:
        path, values = next(
            (p, v) for p, v in labels_by_file.items() if v.size and v.max() > absent[0]
        )
        more = " ..." if len(absent) > 5 else ""
        raise DataError(
            f"mask values {values[:10].tolist()} are not binary (expected {{0, 255}} or {{0, 1}}) "
            f"nor labels 0..{top} (label(s) {absent[:5]}{more} are in no mask); pass "
            "class_names= (one name per label) for integer label maps",
            path,
        )
    return BINARY_CLASS_NAMES if top <= 1 else _numbered_class_names(top)


# ----------------------------------------------------------------------------- paired folders
def _find_pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    for image_name, mask_name in PAIRED_DIRS:
        if (folder / image_name).is_dir() and (folder / mask_name).is_dir():
            return folder / image_name, folder / mask_name
    return None


def read_paired_folders(
    folder: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
    colour_map: Mapping[tuple[int, int, int], int] | None = None,
    patients_csv: str | os.PathLike | None = None,
    id_column: str = "file",
    patient_column: str = "patient_id",
    slice_column: str = "slice_index_in_volume",
    image_size: int | None = None,
    files: Sequence[str] | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> SliceDataset:
    """Read an images folder and a masks folder whose files share their stems.

    Args:
        folder: the parent folder.
        image_dir, mask_dir: the two sub-folders (relative to ``folder`` or absolute); found
            automatically when not given (``images/`` + ``masks/``, ``image/`` + ``label/``, ...).
        colour_map: (R, G, B) → label for colour-coded masks. Without it masks must be binary
            (0/255 or 0/1), or integer label maps when ``class_names`` has more than two names.
        patients_csv: optional CSV with one row per file (relative to the working directory or
            to ``folder``). Columns ``id_column`` (file name or stem), ``patient_column`` and,
            if present, ``slice_column``; every other column goes to ``extra``.
        id_column, patient_column, slice_column: the CSV's column names (``case_id``,
            ``patient_id`` and ``slice_index`` are tried when these are absent).
        image_size: resize every slice to image_size x image_size (images bilinear and
            anti-aliased, masks nearest-neighbour). Without it all slices must share one size.
        files: read only these files (names like ``"3.png"`` or stems like ``"3"``).
        progress: show a progress bar.
        class_names: label names; default ``("background", "lesion")``, or ``("background",
            "class_1", ...)`` with a colour map.

    Returns:
        SliceDataset with ``unit="display"`` for 8-bit images, or ``unit="HU"`` for 16-bit grey
        images, which hold HU + :data:`HU_OFFSET_16BIT` (the common CT PNG convention); case ids
        = file stems (numeric order when the stems are integers).

    Raises:
        DataError: no image/mask folders, an empty image folder, two files with one id (also
            ``1.png`` and ``01.png``), an image without its mask, unreadable files, a side above
            :data:`MAX_SLICE_SIDE`, size mismatches, 8-bit and 16-bit images mixed, 16-bit values
            above 4095, non-binary masks without a colour map, colours outside the map, files
            missing from the CSV, CSV rows naming files that are not in the folder, or duplicate
            CSV rows.
    """
    folder = _require_folder(folder)
    image_size = _check_image_size(image_size)
    if image_dir is None and mask_dir is None:
        found = _find_pair_dirs(folder)
        if found is None:
            expected = ", ".join(f"{a}/ + {b}/" for a, b in PAIRED_DIRS)
            raise DataError(f"no image and mask folders found; expected {expected}", folder)
        image_dir, mask_dir = found
    elif image_dir is None or mask_dir is None:
        raise ValueError("give both image_dir and mask_dir, or neither to detect them")
    image_dir = _require_folder(folder / image_dir, "image folder")
    mask_dir = _require_folder(folder / mask_dir, "mask folder")

    image_files = _index_by_stem(_visible_files(image_dir), image_dir)
    mask_files = _index_by_stem(_visible_files(mask_dir), mask_dir)
    if not image_files:
        raise DataError(f"empty folder: no images with suffixes {list(IMAGE_SUFFIXES)}", image_dir)
    if files is not None:
        wanted = [_stem_key(Path(str(f)).name) for f in files]
        unknown = [f for f, s in zip(files, wanted) if s not in image_files]
        if unknown:
            raise DataError(
                f"{len(unknown)} requested file(s) are not in the folder: {list(unknown)[:5]}",
                image_dir,
            )
        stems = _sorted_stems(dict.fromkeys(wanted))
    else:
        stems = _sorted_stems(image_files)
        orphans = _sorted_stems(s for s in mask_files if s not in image_files)
        if orphans:
            raise DataError(
                f"{len(orphans)} mask(s) have no image in {image_dir.name}/: "
                f"{[mask_files[s].name for s in orphans[:5]]}",
                mask_dir,
            )
    for stem in stems:
        if stem not in mask_files:
            raise DataError(
                f"image has no mask: expected {mask_dir / stem}.<png|jpg|tif|npy>",
                image_files[stem],
            )
    pairs = [(s, image_files[s], mask_files[s]) for s in stems]

    if colour_map is not None:
        cmap = _check_colour_map(colour_map)
        mode, n_classes = "colour", max(cmap.values()) + 1
        default_names = _default_class_names(cmap)
    elif class_names is not None and len(class_names) > 2:
        mode, n_classes, default_names = "labels", len(class_names), tuple(class_names)
    else:
        mode, n_classes, default_names = "binary", 2, BINARY_CLASS_NAMES
    names = tuple(class_names) if class_names is not None else default_names
    if len(names) < n_classes:
        raise ValueError(
            f"class_names has {len(names)} names for labels 0..{n_classes - 1}: {names}"
        )

    imgs, labels, _, _, unit = _read_pairs(
        pairs, mode, image_size, colour_map, n_classes, progress, f"{folder.name} slices"
    )
    csv_path = None if patients_csv is None else Path(patients_csv)
    if csv_path is not None and not csv_path.is_file() and not csv_path.is_absolute():
        if (folder / csv_path).is_file():
            csv_path = folder / csv_path
    return _pairs_dataset(
        pairs, imgs, labels, unit, names, csv_path,
        id_column=id_column, patient_column=patient_column, slice_column=slice_column,
        folder=image_dir, present=image_files,
    )


# ----------------------------------------------------------------------------- NIfTI
def _nifti_id(path: Path) -> str | None:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _index_nifti(folder: Path) -> dict[str, Path]:
    """ID → file of a folder's NIfTI files; ``a.nii`` next to ``a.nii.gz`` is an error."""
    files = ((ident, p) for p in _visible_files(folder) if (ident := _nifti_id(p)) is not None)
    return _index_unique(files, folder)


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:
        raise DataError(f"cannot read NIfTI ({type(exc).__name__}: {exc})", path) from exc


def _integer_labels(values: np.ndarray, path: Path | None, what: str = "mask") -> np.ndarray:
    """Integer-valued labels 0..255 (0/255-only masks become 0/1)."""
    values = np.asarray(values)
    if values.size == 0:
        return values.astype(np.uint8)
    if np.issubdtype(values.dtype, np.floating) and (
        not np.all(np.isfinite(values)) or np.any(values != np.round(values))
    ):
        raise DataError(f"{what} has non-integer values; expected integer labels", path)
    low, high = values.min(), values.max()
    if low < 0 or high > 255:
        raise DataError(f"{what} values lie in {low}..{high}; expected labels 0..255", path)
    if high == 255 and set(np.unique(values).tolist()) <= {0, 255}:
        return (values == 255).astype(np.uint8)
    return values.astype(np.uint8)


def read_nifti_pairs(
    folder_or_pairs: str | os.PathLike | Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    image_size: int | None = None,
    axis: int = 2,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> SliceDataset:
    """Read CT volumes and label volumes from NIfTI files, one slice per case.

    Args:
        folder_or_pairs: a folder with ``images/ID.nii[.gz]`` and ``masks/ID.nii[.gz]`` (or
            ``image/`` + ``label/``), or a list of (image path, mask path).
        image_size: resize every slice to image_size x image_size; the pixel spacing is scaled
            with it (:func:`strokekit.preprocess.rescale_spacing`).
        axis: the array axis to slice along (2: axial for the usual x, y, z storage). Slices
            are taken from the stored array as is; no reorientation is applied.
        progress: show a progress bar.
        class_names: label names, for label maps whose labels do not all occur. Without them
            masks are binary (0/1 or 0/255) or labels 0..K that all occur in some mask.

    Returns:
        SliceDataset with ``unit="HU"`` (nibabel applies ``scl_slope``/``scl_inter``),
        patient id = ID, case ids ``"ID_s003"``, slice index = position along ``axis``,
        spacing and slice thickness from the header's zooms (per slice in ``extra`` as
        ``spacing_row``, ``spacing_col`` and ``thickness``; the dataset-level values are set
        when all volumes agree).

    Raises:
        DataError: no pairs, an image without its mask, two files with one id (``a.nii`` and
            ``a.nii.gz``), unreadable files, non-3-D volumes, a slice side above
            :data:`MAX_SLICE_SIDE` (checked from the header), image/mask shape mismatch,
            non-integer labels, labels that are neither binary nor 0..K (e.g. 0/128) without
            ``class_names``, or differing slice sizes without ``image_size``.
    """
    from tqdm.auto import tqdm

    from .preprocess import rescale_spacing

    image_size = _check_image_size(image_size)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if isinstance(folder_or_pairs, (str, os.PathLike)):
        folder = _require_folder(folder_or_pairs)
        dirs = _find_pair_dirs(folder)
        if dirs is None:
            raise DataError(
                "no images/ + masks/ (or image/ + label/) folders with NIfTI files", folder
            )
        images, masks = (_index_nifti(d) for d in dirs)
        if not images:
            raise DataError("empty folder: no .nii or .nii.gz files", dirs[0])
        for ident in _sorted_stems(images):
            if ident not in masks:
                raise DataError(f"volume has no mask {ident}.nii[.gz] in {dirs[1]}", images[ident])
        pairs = [(images[i], masks[i]) for i in _sorted_stems(images)]
    else:
        pairs = [(Path(a), Path(b)) for a, b in folder_or_pairs]
        if not pairs:
            raise DataError("no (image, mask) pairs given")
    idents = [_nifti_id(p) or p.stem for p, _ in pairs]
    if len(set(idents)) != len(idents):
        raise DataError(
            f"two volumes share one id: {sorted(i for i in idents if idents.count(i) > 1)[:5]}"
        )

    parts_img, parts_mask, case_ids, patient_ids, slice_idx, sources = [], [], [], [], [], []
    zoom_rows: list[tuple[float, float, float]] = []
    first: tuple[Path, tuple[int, int]] | None = None
    labels_by_file: dict[Path | None, np.ndarray] = {}
    for ident, (image_path, mask_path) in tqdm(
        list(zip(idents, pairs)), desc="NIfTI volumes", disable=not progress, unit="volume"
    ):
        image_nii, mask_nii = _load_nifti(image_path), _load_nifti(mask_path)
        if len(image_nii.shape) != 3:
            raise DataError(f"expected a 3-D volume, got shape {image_nii.shape}", image_path)
        if tuple(mask_nii.shape) != tuple(image_nii.shape):
            raise DataError(
                f"mask shape {tuple(mask_nii.shape)} differs from image shape "
                f"{tuple(image_nii.shape)}",
                mask_path,
            )
        shape = tuple(int(s) for i, s in enumerate(image_nii.shape) if i != axis)
        _check_slice_size(shape, image_path)  # from the header, before the data are read
        try:
            volume = np.asarray(image_nii.get_fdata(dtype=np.float32))
            labels = _integer_labels(np.asarray(mask_nii.dataobj), mask_path)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"cannot read volume data ({type(exc).__name__}: {exc})", image_path
            ) from exc
        volume, labels = np.moveaxis(volume, axis, 0), np.moveaxis(labels, axis, 0)
        zooms = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
        in_plane = tuple(z for i, z in enumerate(zooms) if i != axis)
        labels_by_file[mask_path] = _distinct(labels)
        if first is None:
            first = (image_path, shape)
        elif image_size is None and shape != first[1]:
            raise DataError(
                f"slices are {_shape_text(shape)} but those of {first[0]} are "
                f"{_shape_text(first[1])}; "
                "pass image_size= to resize",
                image_path,
            )
        if image_size is not None:
            volume = np.stack([resize_image(s, image_size) for s in volume])
            labels = np.stack([resize_mask(s, image_size) for s in labels]).astype(np.uint8)
            in_plane = rescale_spacing(in_plane, shape, image_size)
        depth = volume.shape[0]
        parts_img.append(volume.astype(np.float32))
        parts_mask.append(labels)
        case_ids += [f"{_safe_name(ident)}_s{k:03d}" for k in range(depth)]
        patient_ids += [ident] * depth
        slice_idx += list(range(depth))
        sources += [str(image_path)] * depth
        zoom_rows += [(in_plane[0], in_plane[1], zooms[axis])] * depth
    zoom_arr = np.asarray(zoom_rows, dtype=np.float64)
    uniform = bool(np.all(zoom_arr == zoom_arr[0]))
    return SliceDataset(
        images=np.concatenate(parts_img),
        masks=np.concatenate(parts_mask),
        case_ids=case_ids,
        patient_ids=patient_ids,
        slice_indices=np.asarray(slice_idx),
        source_paths=sources,
        unit="HU",
        class_names=_class_names_for_labels(labels_by_file, class_names),
        spacing=(zoom_arr[0, 0], zoom_arr[0, 1]) if uniform else None,
        slice_thickness=zoom_arr[0, 2] if uniform else None,
        extra={
            "spacing_row": zoom_arr[:, 0],
            "spacing_col": zoom_arr[:, 1],
            "thickness": zoom_arr[:, 2],
        },
    )


# ----------------------------------------------------------------------------- DICOM
def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(position, row direction, column direction, (row, col) spacing) in LPS mm, if all present."""
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        spacing = np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if position.shape != (3,) or orientation.shape != (6,) or spacing.shape != (2,):
        return None
    return position, orientation[:3], orientation[3:], spacing


def _mask_from_nifti_geometry(
    path: Path, datasets: list, shape: tuple[int, int, int]
) -> np.ndarray:
    """Sample a NIfTI mask at each DICOM pixel centre (nearest voxel), whatever its orientation.

    NIfTI stores world coordinates as RAS and DICOM as LPS, and converters transpose and flip
    axes; mapping through both affines avoids guessing any of that.
    """
    nii = _load_nifti(path)
    if len(nii.shape) != 3:
        raise DataError(f"expected a 3-D mask volume, got shape {nii.shape}", path)
    _check_slice_size(nii.shape[:2], path)  # the in-plane axes of the usual (x, y, z) storage
    labels = _integer_labels(np.asarray(nii.dataobj), path)
    to_voxel = np.linalg.inv(nii.affine)
    _, rows, cols = shape
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.empty(shape, dtype=np.uint8)
    for k, ds in enumerate(datasets):
        geometry = _dicom_geometry(ds)
        if geometry is None:
            raise DataError(
                "cannot align a NIfTI mask: the DICOM slices lack ImagePositionPatient, "
                "ImageOrientationPatient or PixelSpacing; pass the mask as a (D, H, W) array "
                "instead",
                path,
            )
        position, row_dir, col_dir, spacing = geometry
        lps = (
            position[None, None, :]
            + cc[..., None] * spacing[1] * row_dir[None, None, :]
            + rr[..., None] * spacing[0] * col_dir[None, None, :]
        )
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxel = ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        index = np.rint(voxel).astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(labels.shape)), axis=-1)
        if not inside.all():
            raise DataError(
                f"mask volume {labels.shape} does not cover DICOM slice {k} (its affine puts "
                f"{int((~inside).sum())} pixels outside)",
                path,
            )
        out[k] = labels[index[..., 0], index[..., 1], index[..., 2]]
    return out


def _read_dicom_headers(paths: Sequence[Path], progress: bool) -> list[tuple[Path, Any]]:
    """Each file's dataset, its pixel data left on disk until decoded; checked before decoding."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from tqdm.auto import tqdm

    datasets = []
    for path in tqdm(paths, desc="DICOM files", disable=not progress, unit="file"):
        try:
            # Values over 1 KB (the pixel data) are read from the file only when used.
            ds = pydicom.dcmread(path, defer_size=1024)
        except InvalidDicomError as exc:
            raise DataError(
                "is not a DICOM file (no DICM preamble); the folder must hold only one "
                "series' files",
                path,
            ) from exc
        except Exception as exc:
            raise DataError(f"cannot read DICOM ({type(exc).__name__}: {exc})", path) from exc
        if "PixelData" not in ds:
            raise DataError("DICOM file has no pixel data (not an image slice)", path)
        _check_slice_size((ds.get("Rows") or 0, ds.get("Columns") or 0), path)
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:
            raise DataError(f"holds {frames} frames; expected one slice per file", path)
        _rescale(ds, path)  # missing tags fail here, before any slice is decoded
        datasets.append((path, ds))
    return datasets


def _rescale(ds, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), which turn stored values into HU; both must be there."""
    missing = [tag for tag in ("RescaleSlope", "RescaleIntercept") if ds.get(tag) in (None, "")]
    if missing:
        raise DataError(
            f"no {' and no '.join(missing)}: the stored values cannot be turned into HU (CT "
            "often stores HU + 1024, so air would read +24 instead of -1000); add the scanner's "
            "RescaleSlope and RescaleIntercept to the files (e.g. with pydicom) or export the "
            "series again with them",
            path,
        )
    return float(ds.RescaleSlope), float(ds.RescaleIntercept)


def _order_slices(
    datasets: list[tuple[Path, Any]], folder: Path
) -> tuple[list[tuple[Path, Any]], list[float], bool]:
    """The slices in order along the slice normal (else by InstanceNumber), their sort keys and
    whether those are positions; a gap in them (a missing file) is an error."""
    geometries = [_dicom_geometry(ds) for _, ds in datasets]
    by_position = True
    if all(g is not None for g in geometries):
        # Distance along the slice normal; equals ImagePositionPatient[2] for axial series.
        normal = np.cross(geometries[0][1], geometries[0][2])
        keys = [float(np.dot(g[0], normal)) for g in geometries]
    elif all("ImagePositionPatient" in ds for _, ds in datasets):
        keys = [float(ds.ImagePositionPatient[2]) for _, ds in datasets]
    elif all("InstanceNumber" in ds and ds.InstanceNumber is not None for _, ds in datasets):
        keys = [float(ds.InstanceNumber) for _, ds in datasets]
        by_position = False
    else:
        raise DataError(
            "cannot order the slices: no ImagePositionPatient or InstanceNumber", folder
        )
    if len(set(keys)) != len(keys):
        raise DataError("two slices share one position; is this one series?", folder)
    order = np.argsort(keys, kind="stable")
    datasets = [datasets[i] for i in order]
    keys = [keys[i] for i in order]
    _check_slice_gaps(datasets, keys, by_position, folder)
    return datasets, keys, by_position


def _check_slice_gaps(
    datasets: list[tuple[Path, Any]], keys: list[float], by_position: bool, folder: Path
) -> None:
    """A missing file must not be stacked away: its neighbours would pass for adjacent slices.

    Positions: a step over 1.5 times the median step is a gap. Instance numbers: a step over 1.
    """
    steps = np.diff(keys)
    fix = "add the missing files"
    if by_position:
        usual = float(np.median(steps)) if steps.size >= 2 else np.inf
        gaps = np.flatnonzero(steps > 1.5 * usual)
        what, unit, rule = "positions", " mm", f"the other slices are {usual:g} mm apart"
        fix += ", or put parts with different spacing in separate folders"
    else:
        gaps = np.flatnonzero(steps > 1)
        what, unit, rule = "instance numbers", "", "they should run without a gap"
    if gaps.size == 0:
        return
    i = int(gaps[0])
    raise DataError(
        f"slices are missing: the {what} jump from {keys[i]:g} to {keys[i + 1]:g}{unit} between "
        f"{datasets[i][0].name} and {datasets[i + 1][0].name} ({rule}; {gaps.size} gap(s)); {fix}",
        folder,
    )


def _decode_slices(datasets: list[tuple[Path, Any]]) -> np.ndarray:
    """The (D, H, W) volume in HU: each slice decoded and rescaled."""
    slices = []
    for path, ds in datasets:
        try:
            pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception as exc:
            raise DataError(
                f"cannot decode pixel data ({type(exc).__name__}: {exc})", path
            ) from exc
        if pixels.ndim != 2:
            raise DataError(f"expected one 2-D frame, got pixel array shape {pixels.shape}", path)
        if slices and pixels.shape != slices[0].shape:
            raise DataError(
                f"slice is {_shape_text(pixels.shape)} but {datasets[0][0].name} is "
                f"{_shape_text(slices[0].shape)}",
                path,
            )
        slope, intercept = _rescale(ds, path)
        slices.append(pixels * np.float32(slope) + np.float32(intercept))
    return np.stack(slices)


def _series_labels(
    mask: np.ndarray | str | os.PathLike | None,
    datasets: list[tuple[Path, Any]],
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, Path | None]:
    """The labels of a series (``mask`` of :func:`read_dicom_series`) and the file they are from."""
    if mask is None:
        return np.zeros(shape, dtype=np.uint8), None
    if isinstance(mask, np.ndarray):
        if mask.shape != shape:
            raise DataError(
                f"mask array shape {mask.shape} differs from the series' {shape} (D, H, W)"
            )
        return _integer_labels(mask, None), None
    mask_path = Path(mask)
    if mask_path.is_dir():
        return _png_masks_for_series(mask_path, [p for p, _ in datasets], shape), mask_path
    if _nifti_id(mask_path) is not None:
        return _mask_from_nifti_geometry(mask_path, [ds for _, ds in datasets], shape), mask_path
    raise DataError("mask must be an array, a NIfTI file or a folder of PNG masks", mask_path)


def read_dicom_series(
    folder: str | os.PathLike,
    mask: np.ndarray | str | os.PathLike | None = None,
    patient_id: str | None = None,
    image_size: int | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> SliceDataset:
    """Read one DICOM CT series (every file in the folder, any names) as HU slices.

    Args:
        folder: folder holding the series' files (hidden files and a ``DICOMDIR`` are skipped).
        mask: optional labels: a (D, H, W) array in sorted slice order, a NIfTI file (aligned
            through its affine and the DICOM geometry), or a folder of PNG masks (matched to the
            DICOM files by stem, else taken in natural name order).
        patient_id: overrides the files' PatientID.
        image_size: resize every slice to image_size x image_size; the pixel spacing is scaled
            with it (:func:`strokekit.preprocess.rescale_spacing`).
        progress: show a progress bar.
        class_names: label names, as in :func:`read_nifti_pairs`.

    Returns:
        SliceDataset with ``unit="HU"`` (pixel x RescaleSlope + RescaleIntercept), slices sorted
        along the slice normal (= ImagePositionPatient[2] for axial series; InstanceNumber when
        positions are missing), case ids ``"<patient>_s003"``, spacing from PixelSpacing and
        thickness from the position differences (else SliceThickness).

    Raises:
        DataError: empty folder, non-DICOM files, several series, a file without
            RescaleSlope/RescaleIntercept, Rows or Columns above :data:`MAX_SLICE_SIDE` (checked
            before decoding), multi-frame files, slices of different sizes, missing sort keys,
            a missing slice (a gap in the positions or instance numbers), or a mask that does not
            match the series.
    """
    from .preprocess import rescale_spacing

    folder = _require_folder(folder)
    image_size = _check_image_size(image_size)
    paths = [p for p in _visible_files(folder) if p.name.upper() != "DICOMDIR"]
    if not paths:
        raise DataError("empty folder: expected the files of one DICOM series", folder)
    datasets = _read_dicom_headers(paths, progress)
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise DataError(
            f"holds {len(series)} series (SeriesInstanceUID {sorted(series)[:5]}); put each series "
            "in its own folder",
            folder,
        )
    datasets, keys, by_position = _order_slices(datasets, folder)
    volume = _decode_slices(datasets)
    depth, rows, cols = volume.shape

    first = datasets[0][1]
    spacing = None
    if "PixelSpacing" in first:
        spacing = (float(first.PixelSpacing[0]), float(first.PixelSpacing[1]))
    thickness = None
    if depth > 1 and by_position:
        thickness = float(np.median(np.abs(np.diff(keys))))
    elif "SliceThickness" in first and first.SliceThickness not in (None, ""):
        thickness = float(first.SliceThickness)

    labels, mask_file = _series_labels(mask, datasets, (depth, rows, cols))
    names = _class_names_for_labels({mask_file: _distinct(labels)}, class_names)
    if image_size is not None:
        volume = np.stack([resize_image(s, image_size) for s in volume])
        labels = np.stack([resize_mask(s, image_size) for s in labels]).astype(np.uint8)
        if spacing is not None:
            spacing = rescale_spacing(spacing, (rows, cols), image_size)
    if patient_id is None:
        patient_id = str(getattr(first, "PatientID", "") or folder.name)
    patient_id = str(patient_id)
    return SliceDataset(
        images=volume,
        masks=labels,
        case_ids=[f"{_safe_name(patient_id)}_s{k:03d}" for k in range(depth)],
        patient_ids=[patient_id] * depth,
        slice_indices=np.arange(depth),
        source_paths=[str(p) for p, _ in datasets],
        unit="HU",
        class_names=names,
        spacing=spacing,
        slice_thickness=thickness,
    )


def _png_masks_for_series(
    folder: Path, dicom_paths: list[Path], shape: tuple[int, int, int]
) -> np.ndarray:
    found = _index_by_stem(_visible_files(folder), folder)
    if not found:
        raise DataError("empty mask folder: expected one PNG mask per DICOM slice", folder)
    stems = [p.stem for p in dicom_paths]
    if all(s in found for s in stems):
        files = [found[s] for s in stems]
    else:
        if len(found) != shape[0]:
            raise DataError(
                f"{len(found)} mask files for {shape[0]} DICOM slices (and their names do not "
                "match "
                "the DICOM file names)",
                folder,
            )
        files = [found[s] for s in _sorted_stems(found)]
    out = np.empty(shape, dtype=np.uint8)
    for k, path in enumerate(files):
        raw = _read_array(path)
        if raw.shape[:2] != shape[1:]:
            raise DataError(
                f"mask is {_shape_text(raw.shape[:2])} but the slices are {_shape_text(shape[1:])}",
                path,
            )
        out[k] = _binary_mask(raw, path)
    return out


# ----------------------------------------------------------------------------- CT-ICH
def load_ctich(
    path: str | os.PathLike | None = None,
    image_size: int | None = None,
    lesion_only: bool = False,
    patients: Sequence[str | int] | None = None,
    progress: bool = True,
) -> SliceDataset:
    """Load the shared CT-ICH slices (traumatic intracranial haemorrhage, not stroke).

    Args:
        path: the ``ct-ich`` folder (``image/N.png``, ``label/N.png``, ``slices.csv``); default
            :func:`strokekit.paths.ctich_dir`.
        image_size: resize to image_size x image_size (strongly advised: 2814 slices at 512 x 512
            take 2.9 GB as float32).
        lesion_only: read only slices whose ``has_mask`` is 1.
        patients: read only these patient ids.
        progress: show a progress bar.

    Returns:
        SliceDataset with ``unit="display"`` (already brain-windowed, about L40/W120), patient
        ids and slice indices from ``slices.csv``, its other columns (``has_mask``, subtype
        flags, ...) in ``extra``, class names ``("background", "hemorrhage")``.

    Raises:
        DataError: the folder is absent, or unknown patients were asked for.
    """
    import pandas as pd

    from .paths import ctich_dir

    if path is None:
        path = ctich_dir()
        if path is None:
            raise DataError(
                "CT-ICH data not found: put the folder at <project>/../shared/data/ct-ich or set "
                "$STROKEKIT_CTICH to it. It must hold image/N.png, label/N.png (0/255 masks) and "
                "slices.csv (file, patient_id, slice_index_in_volume, has_mask, ...). "
                "Other layouts "
                "are read by strokekit.io.load_dataset: " + "; ".join(LAYOUTS)
            )
    path = _require_folder(path, "CT-ICH folder")
    csv_path = path / "slices.csv"
    if not csv_path.is_file():
        raise DataError(
            "no slices.csv (file, patient_id, slice_index_in_volume, has_mask, ...)", path
        )
    table = pd.read_csv(csv_path, dtype={"file": str, "patient_id": str})
    for column in ("file", "patient_id", "has_mask"):
        if column not in table.columns:
            raise DataError(
                f"missing column {column!r}; columns are {list(table.columns)}", csv_path
            )
    keep = np.ones(len(table), dtype=bool)
    if lesion_only:
        keep &= table["has_mask"].fillna(0).astype(int).to_numpy() == 1
    if patients is not None:
        wanted = [str(p) for p in patients]
        known = set(table["patient_id"])
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise DataError(
                f"unknown patient ids {unknown[:5]}; known are e.g. {sorted(known)[:5]}", csv_path
            )
        keep &= table["patient_id"].isin(wanted).to_numpy()
    files = table.loc[keep, "file"].tolist()
    if not files:
        raise DataError("no slices left after filtering (lesion_only / patients)", csv_path)
    return read_paired_folders(
        path,
        image_dir="image",
        mask_dir="label",
        patients_csv=csv_path,
        id_column="file",
        patient_column="patient_id",
        slice_column="slice_index_in_volume",
        image_size=image_size,
        files=None if keep.all() else files,
        progress=progress,
        class_names=("background", "hemorrhage"),
    )


def load_source_dataset(name: str = "ctich", image_size: int = 128, lesion_only: bool = False,
                        progress: bool = True, max_patients: int | None = None) -> SliceDataset:
    """Loads a real source set by name; today ``"ctich"`` (CT-ICH, traumatic hemorrhage).

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        name: ``"ctich"``.
        image_size: slice side after resizing.
        lesion_only: only slices with a lesion.
        progress: a progress bar.
        max_patients: read only the first this many patients of ``slices.csv`` (sorted ids), e.g.
            for a tiny smoke run; None reads all.

    Returns:
        The dataset (``unit="display"``), patient ids as in ``slices.csv``.

    Raises:
        ValueError: an unknown name.
        DataError: the data are absent (the message says where to put them).
    """
    if name != "ctich":
        raise ValueError(f"Expected one of ['ctich']. Received: name={name!r}")
    patients = None
    if max_patients is not None:
        import pandas as pd

        from .paths import ctich_dir

        folder = ctich_dir()
        if folder is None:
            load_ctich(None)  # raises the DataError that says where to put the data
        ids = pd.read_csv(folder / "slices.csv", dtype={"patient_id": str})["patient_id"]
        patients = sorted(ids.unique())[: int(max_patients)]
    return load_ctich(image_size=image_size, lesion_only=lesion_only, progress=progress, patients=patients)


# ----------------------------------------------------------------------------- detection
def _detect_layout(folder: Path) -> str:
    dirs = _find_pair_dirs(folder)
    if dirs is not None:
        if any(_nifti_id(p) is not None for p in _visible_files(dirs[0])):
            return "nifti"
        return "paired"
    files = _visible_files(folder)
    stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    if any(s.endswith("_mask") and s[: -len("_mask")] in stems for s in stems):
        return "study"
    if any(_is_dicom_file(p) for p in files):
        return "dicom"
    if not files and not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        return "empty"
    return "unknown"


def load_dataset(path: str | os.PathLike, **kwargs: Any) -> SliceDataset:
    """Detect a folder's layout and read it with the matching reader.

    Args:
        path: a folder in one of :data:`LAYOUTS`.
        **kwargs: passed to the reader (e.g. ``image_size``). For paired folders with a
            ``slices.csv`` next to them, that CSV is used unless ``patients_csv`` is given.

    Returns:
        SliceDataset from :func:`read_study_layout`, :func:`read_paired_folders`,
        :func:`read_nifti_pairs` or :func:`read_dicom_series`.

    Raises:
        DataError: the path is missing or empty, or its layout is none of :data:`LAYOUTS`.
    """
    path = Path(path)
    if path.is_file():
        raise DataError("expected a folder; layouts read: " + "; ".join(LAYOUTS), path)
    folder = _require_folder(path)
    layout = _detect_layout(folder)
    if layout == "nifti":
        return read_nifti_pairs(folder, **kwargs)
    if layout == "paired":
        if "patients_csv" not in kwargs and (folder / "slices.csv").is_file():
            kwargs["patients_csv"] = folder / "slices.csv"
        return read_paired_folders(folder, **kwargs)
    if layout == "study":
        return read_study_layout(folder, **kwargs)
    if layout == "dicom":
        return read_dicom_series(folder, **kwargs)
    if layout == "empty":
        raise DataError("empty folder; layouts read: " + "; ".join(LAYOUTS), folder)
    raise DataError("unknown layout; layouts read: " + "; ".join(LAYOUTS), folder)


# ----------------------------------------------------------------------------- writing
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _remove_stale_cases(folder: Path, keep: set[str]) -> None:
    """Deletes the files of cases an earlier :func:`write_study_layout` wrote here and ``keep`` lacks."""
    import pandas as pd

    listing = folder / "cases.csv"
    if not listing.is_file():
        return
    try:
        old = pd.read_csv(listing, dtype=str, usecols=["case_id"])["case_id"].dropna()
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(f"cannot read the old case list to replace it: {err}", listing) from err
    for case in set(old) - keep:
        if not _SAFE_ID.fullmatch(case):
            continue
        for suffix in ("", "_mask", "_result"):
            stale = folder / f"{case}{suffix}.png"
            if stale.is_file():
                stale.unlink()


def write_study_layout(
    dataset: SliceDataset,
    folder: str | os.PathLike,
    window: str | Sequence[float] = "brain",
    colour_map: Mapping[tuple[int, int, int], int] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write a dataset in the study's layout, plus a ``cases.csv`` with its bookkeeping.

    Writes ``<case_id>.png`` (8-bit grey: HU through ``window``, display images as they are),
    ``<case_id>_mask.png`` (0/255 grey for two classes; colour-coded with ``colour_map``, default
    :data:`MULTICLASS_COLOURS`, when there are more classes or a map is given),
    ``<case_id>_result.png`` (the overlay) and ``cases.csv`` (case_id, patient_id, slice_index and
    the ``extra`` columns). :func:`read_study_layout` reads it back.

    Args:
        dataset: grey (N, H, W) slices.
        folder: where to write; created if missing.
        window: HU window name or (level, width), used when ``dataset.unit == "HU"``.
        colour_map: (R, G, B) → label for the masks and overlays.
        overwrite: allow writing into a non-empty folder. Files with the same names are
            replaced; the slices of an earlier write that this dataset no longer has (those
            listed in the folder's old ``cases.csv``) are removed, so the folder reads back as
            exactly this dataset; any other file is left alone.
        progress: show a progress bar.

    Returns:
        The folder.

    Raises:
        DataError: the folder is not empty (and not ``overwrite``), holds the dataset's own source
            files, case ids are not usable as file names, or images have channels.
        ValueError: a label has no colour in the colour map.
    """
    import pandas as pd
    from PIL import Image
    from tqdm.auto import tqdm

    from .preprocess import DEFAULT_COLOURS, overlay_mask, window_hu

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError("expected a folder, found a file", folder)
    target = folder.resolve()
    sources = [Path(p) for p in (dataset.source_paths or []) if p]
    clash = [p for p in sources if p.resolve().parent == target]
    if clash:
        raise DataError(
            "refusing to write into the folder that holds the dataset's source files "
            f"(e.g. {clash[0].name}); "
            "choose another folder",
            folder,
        )
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise DataError("folder is not empty; pass overwrite=True to write into it anyway", folder)
    if dataset.images.ndim != 3:
        raise DataError(
            f"write_study_layout writes grey slices (N, H, W); got images {dataset.images.shape}"
        )
    bad = [c for c in dataset.case_ids if not _SAFE_ID.fullmatch(c) or c.endswith(_STUDY_ROLES)]
    if bad:
        raise DataError(
            "case ids must be file-name safe (letters, digits, . _ -) and not end in "
            f"_mask/_result: {bad[:5]}"
        )

    clashing = [k for k in dataset.extra if k in ("case_id", "patient_id", "slice_index")]
    if clashing:
        raise DataError(f"extra columns {clashing} clash with the cases.csv columns")

    if colour_map is None and dataset.num_classes > 2:
        colour_map = MULTICLASS_COLOURS
    colours = DEFAULT_COLOURS
    if colour_map is not None:
        cmap = _check_colour_map(colour_map)
        encode_colour_mask(_distinct(dataset.masks), cmap)  # fail before writing anything
        colours = {}
        for colour, label in cmap.items():
            colours.setdefault(label, colour)

    # One scale for the whole set, so a dark 0..255 display slice is not mistaken for 0..1.
    top = float(dataset.images.max()) if len(dataset) and dataset.unit != "HU" else 0.0
    scale = 255.0 if top > 1.0 else 1.0

    def to_unit(image: np.ndarray) -> np.ndarray:
        if dataset.unit == "HU":
            return window_hu(image, window)
        return np.clip(np.asarray(image, np.float32) / scale, 0.0, 1.0)

    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_cases(folder, set(dataset.case_ids))
    for i in tqdm(range(len(dataset)), desc="writing", disable=not progress, unit="slice"):
        case = dataset.case_ids[i]
        unit01 = to_unit(dataset.images[i])
        grey = np.rint(unit01 * 255.0).astype(np.uint8)
        Image.fromarray(grey).save(folder / f"{case}.png")
        labels = dataset.masks[i]
        if colour_map is None:
            Image.fromarray((labels > 0).astype(np.uint8) * 255).save(folder / f"{case}_mask.png")
        else:
            Image.fromarray(encode_colour_mask(labels, colour_map)).save(
                folder / f"{case}_mask.png"
            )
        overlay = overlay_mask(grey.astype(np.float32) / 255.0, labels, colours)
        Image.fromarray(overlay).save(folder / f"{case}_result.png")

    table = {
        "case_id": dataset.case_ids,
        "patient_id": dataset.patient_ids
        if dataset.patient_ids is not None
        else [""] * len(dataset),
        "slice_index": dataset.slice_indices,
    }
    for key, values in dataset.extra.items():
        table[key] = values
    pd.DataFrame(table).to_csv(folder / _CASES_CSV, index=False)
    return folder
