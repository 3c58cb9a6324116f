"""The logic of the upload-and-segment app, testable without a browser.

``notebooks/app.ipynb`` (served with Voila) only wires widgets to these functions: a model
picker fed by :func:`list_models` and :func:`load_model_for_app`, a file upload whose callback
calls :func:`handle_upload`, and download buttons fed by :func:`mask_to_png_bytes` and
:func:`mask_to_nifti_bytes`.

Uploads are untrusted. Each file is checked for size, a safe name, an allowed type by its
extension *and* its first bytes, and readability; it is written only into a private temporary
folder (``tempfile.mkdtemp``) inside a work folder under the project's runs or data folder, read
with :mod:`strokekit.io`, and deleted straight after. Every problem becomes an
:class:`UploadError` whose message names the file and the problem, never a traceback.

Introduced in notebooks/app.ipynb.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import SliceDataset
from .errors import DataError

__all__ = [
    "ALLOWED",
    "MAX_UPLOAD_BYTES",
    "MAX_VOXELS",
    "UploadError",
    "default_work_dir",
    "describe_result",
    "handle_upload",
    "list_models",
    "load_model_for_app",
    "mask_to_nifti_bytes",
    "mask_to_png_bytes",
    "read_upload",
    "read_uploads",
    "segment",
]

#: Largest upload accepted, per file and for all files of one upload together.
MAX_UPLOAD_BYTES = 200_000_000
#: Largest image or volume accepted (voxels), checked from the header before pixel data is
#: decoded, so a small compressed file cannot expand into many gigabytes.
MAX_VOXELS = 512 * 512 * 512
#: Allowed upload types: kind → (description, file name endings). DICOM files may also have no
#: extension (or a numeric one, as in UID-named files).
ALLOWED: dict[str, tuple[str, tuple[str, ...]]] = {
    "png": ("PNG image (one slice, display units)", (".png",)),
    "jpeg": ("JPEG image (one slice, display units)", (".jpg", ".jpeg")),
    "dicom": ("DICOM file or series (.dcm or no extension)", (".dcm", ".dicom", "")),
    "nifti": ("NIfTI volume", (".nii", ".nii.gz")),
}
_KIND_TEXT = {
    "png": "PNG image",
    "jpeg": "JPEG image",
    "dicom": "DICOM file",
    "nifti": "NIfTI volume",
}
_ALLOWED_TEXT = "PNG or JPEG (one slice), DICOM (.dcm or no extension; one file or a series), NIfTI (.nii, .nii.gz)"
_MASK_WORDS = re.compile(r"(^|[^a-z])(mask|label|labels|seg|segmentation)([^a-z]|$)", re.IGNORECASE)


class UploadError(ValueError):
    """An upload the app cannot use; ``str(error)`` is a message for the user."""


# --------------------------------------------------------------------------- small helpers
def default_work_dir() -> Path:
    """Where uploads are unpacked by default: ``<runs>/app-uploads`` (created on use)."""
    from .paths import runs_dir

    return runs_dir() / "app-uploads"


def _check_work_dir(work_dir: str | os.PathLike | None) -> Path:
    """The work folder, created if missing; it must lie inside the runs or data folder."""
    from .paths import data_dir, runs_dir

    folder = Path(work_dir) if work_dir is not None else default_work_dir()
    resolved = folder.resolve()
    roots = [runs_dir().resolve(), data_dir().resolve()]
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        raise ValueError(
            f"work_dir {folder} is outside the runs folder ({roots[0]}) and the data folder "
            f"({roots[1]}); uploads are only unpacked there"
        )
    resolved.mkdir(parents=True, exist_ok=True)
    return resolved


def _display_name(name: str) -> str:
    """The file name to show in messages: printable, short."""
    cleaned = "".join(c if c.isprintable() else "?" for c in name)
    return cleaned if len(cleaned) <= 80 else cleaned[:77] + "..."


def _safe_name(name: Any) -> str:
    """A bare file name from an uploaded name; path traversal and absolute paths are refused."""
    if not isinstance(name, str) or not name.strip():
        raise UploadError("an uploaded file has no name")
    shown = _display_name(name)
    if any(ord(c) < 32 for c in name):
        raise UploadError(f"{shown}: unsafe file name (control characters)")
    parts = re.split(r"[\\/]", name)
    if ".." in parts or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise UploadError(
            f"{shown}: unsafe file name (it contains a path such as '../' or '/'); upload the file itself"
        )
    base = parts[-1].strip()
    if base in ("", ".", ".."):
        raise UploadError(f"{shown}: unsafe file name")
    return base


def _kind_by_name(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return "nifti"
    suffix = Path(lower).suffix
    if suffix == "" or suffix[1:].isdigit():  # "IM0001" or UID names like "1.2.840.113619.2.5"
        return "dicom"
    for kind, (_, endings) in ALLOWED.items():
        if suffix in endings:
            return kind
    return None


def _nifti_header_ok(head: bytes) -> bool:
    if len(head) < 4:
        return False
    return any(struct.unpack(f"{e}i", head[:4])[0] in (348, 540) for e in "<>")


def _gunzip_head(content: bytes, size: int = 352) -> bytes | None:
    """The first bytes of a gzip stream, or None when it is not valid gzip."""
    try:
        return zlib.decompressobj(wbits=31).decompress(content[: 1 << 16], size)
    except zlib.error:
        return None


def _kind_by_content(content: bytes) -> str | None:
    """What the first bytes say the file is (None: none of the allowed types)."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if content.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(content) >= 132 and content[128:132] == b"DICM":
        return "dicom"
    if content.startswith(b"\x1f\x8b"):
        head = _gunzip_head(content)
        return "nifti" if head is not None and _nifti_header_ok(head) else "gzip"
    if _nifti_header_ok(content[:4]) and len(content) >= 348:
        return "nifti"
    return None


def _starts_with(content: bytes) -> str:
    return f"the file starts with {content[:8]!r}"


def _check_file(name: str, content: bytes) -> tuple[str, str]:
    """(kind, safe name) after the name, size, extension and content checks."""
    safe = _safe_name(name)
    shown = _display_name(safe)
    size = len(content)
    if size == 0:
        raise UploadError(f"{shown}: the file is empty (0 bytes)")
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(
            f"{shown}: {size / 1e6:.1f} MB is over the upload limit of {MAX_UPLOAD_BYTES / 1e6:.0f} MB"
        )
    kind = _kind_by_name(safe)
    seen = _kind_by_content(content)
    if kind is None:
        hint = (
            f" (its content looks like a {_KIND_TEXT[seen]}; rename it)"
            if seen in _KIND_TEXT
            else ""
        )
        raise UploadError(
            f"{shown}: unsupported file type {Path(safe).suffix or '(none)'!r}{hint}; allowed: {_ALLOWED_TEXT}"
        )
    if kind == seen:
        return kind, safe
    looks = f"; it looks like a {_KIND_TEXT[seen]}" if seen in _KIND_TEXT else ""
    if kind == "png":
        raise UploadError(
            f"{shown}: not a PNG image ({_starts_with(content)}, not b'\\x89PNG'){looks}"
        )
    if kind == "jpeg":
        raise UploadError(
            f"{shown}: not a JPEG image ({_starts_with(content)}, not b'\\xff\\xd8'){looks}"
        )
    if kind == "dicom":
        what = (
            "no 'DICM' marker at byte 128" if len(content) >= 132 else f"only {len(content)} bytes"
        )
        extra = (
            ""
            if Path(safe).suffix
            else f"; files without an extension are read as DICOM, allowed: {_ALLOWED_TEXT}"
        )
        raise UploadError(
            f"{shown}: not a DICOM file ({what}; {_starts_with(content)}){looks}{extra}"
        )
    if safe.lower().endswith(".nii.gz"):
        if not content.startswith(b"\x1f\x8b"):
            raise UploadError(
                f"{shown}: not a gzip-compressed NIfTI file ({_starts_with(content)}, not b'\\x1f\\x8b'){looks}"
            )
        if seen == "gzip" and _gunzip_head(content) is None:
            raise UploadError(
                f"{shown}: damaged gzip data (cannot decompress the start of the file)"
            )
        raise UploadError(f"{shown}: not a NIfTI volume (the decompressed header size is not 348)")
    raise UploadError(
        f"{shown}: not a NIfTI volume (the header size field is not 348; {_starts_with(content)}){looks}"
    )


def _write_private(folder: Path, filename: str, content: bytes) -> Path:
    path = folder / filename
    # O_EXCL: never follow or overwrite anything that is already there.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    return path


def _scrub(
    text: str, names: Mapping[str, str], folder: Path, folder_label: str = "the upload"
) -> str:
    """A message with the temporary copies' paths replaced by the uploaded file names."""
    for tmp in sorted(names, key=len, reverse=True):  # full paths before bare names
        text = text.replace(tmp, names[tmp])
    return text.replace(str(folder) + os.sep, "").replace(str(folder), folder_label)


def _translate(
    error: DataError, names: Mapping[str, str], folder: Path, folder_label: str = "the upload"
) -> UploadError:
    """An UploadError naming the uploaded file instead of its temporary copy."""
    text = _scrub(getattr(error, "problem", str(error)), names, folder, folder_label)
    where = None
    if error.path is not None:
        where = names.get(error.path) or names.get(Path(error.path).name)
        if where is None and Path(error.path).resolve() == folder.resolve():
            where = folder_label
    return UploadError(f"{where}: {text}" if where else text)


def _check_image_pixels(shape: Sequence[int], shown: str) -> None:
    count = int(np.prod([int(s) for s in shape]))
    if count > MAX_VOXELS:
        raise UploadError(
            f"{shown}: {'x'.join(str(int(s)) for s in shape)} = {count} voxels is over the limit of {MAX_VOXELS}"
        )


# --------------------------------------------------------------------------- readers by kind
def _read_images(items: list[tuple[str, Path]]) -> SliceDataset:
    from PIL import Image

    from .io import read_image

    images, names = [], []
    for name, path in items:
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception:  # noqa: BLE001 - read_image below gives the precise message
            size = None
        if size is not None:
            _check_image_pixels(size[::-1], name)
        try:
            image = read_image(path)
        except DataError as exc:
            problem = exc.problem.replace(str(path), name).replace(path.name, name)
            raise UploadError(f"{name}: {problem}") from None
        if image.size and float(image.max()) > 255.0:  # 16-bit grey PNG: bring to 0..255
            image = image * np.float32(255.0 / 65535.0)
        if images and image.shape != images[0].shape:
            raise UploadError(
                f"{name}: the slice is {image.shape[0]}x{image.shape[1]} but {names[0]} is "
                f"{images[0].shape[0]}x{images[0].shape[1]}; upload slices of one size"
            )
        images.append(image)
        names.append(name)
    stems = _unique_stems(names)
    return SliceDataset(
        images=np.stack(images),
        masks=np.zeros((len(images),) + images[0].shape, np.uint8),
        case_ids=stems,
        patient_ids=["upload"] * len(images),
        slice_indices=np.arange(len(images)),
        source_paths=names,
        unit="display",
    )


def _unique_stems(names: Sequence[str]) -> list[str]:
    stems, seen = [], {}
    for name in names:
        stem = (
            name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem or name
        )
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _read_dicom(items: list[tuple[str, Path]], folder: Path) -> SliceDataset:
    from .io import read_dicom_series

    series_dir = items[0][1].parent
    names = {str(p): n for n, p in items} | {p.name: n for n, p in items}
    try:
        data = read_dicom_series(series_dir, patient_id="upload", progress=False)
    except DataError as exc:
        raise _translate(exc, names, series_dir, "the DICOM series") from None
    _check_image_pixels(data.images.shape, "the DICOM series")
    return data.replace(source_paths=[names.get(p, p) for p in data.source_paths])


def _read_nifti(items: list[tuple[str, Path]], folder: Path) -> SliceDataset:
    import nibabel as nib

    from .io import read_nifti_pairs

    if len(items) == 1:
        images, masks = items, []
    else:
        masks = [(n, p) for n, p in items if _MASK_WORDS.search(n)]
        images = [(n, p) for n, p in items if not _MASK_WORDS.search(n)]
    if len(images) != 1 or len(masks) > 1:
        listed = ", ".join(n for n, _ in items)
        raise UploadError(
            f"{listed}: upload one NIfTI volume, optionally with one mask whose name contains "
            "'mask', 'label' or 'seg'"
        )
    image_name, image_path = images[0]
    names = {str(p): n for n, p in items} | {p.name: n for n, p in items}
    try:
        header_img = nib.load(str(image_path))
        shape = tuple(int(s) for s in header_img.shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad headers
        raise UploadError(
            f"{image_name}: cannot read the NIfTI header ({type(exc).__name__}: {exc})"
        ) from None
    _check_image_pixels(shape, image_name)
    if len(shape) != 3:
        raise UploadError(f"{image_name}: expected a 3-D volume, got shape {shape}")
    if masks:
        mask_path = masks[0][1]
    else:
        # read_nifti_pairs reads (image, mask) pairs; an all-zero mask stands in for "no labels".
        mask_path = folder / "empty-mask.nii"
        nib.Nifti1Image(np.zeros(shape, np.uint8), header_img.affine).to_filename(str(mask_path))
    try:
        data = read_nifti_pairs([(image_path, mask_path)], progress=False)
    except DataError as exc:
        raise _translate(exc, names, folder) from None
    stem = _unique_stems([image_name])[0]
    depth = len(data)
    return data.replace(
        case_ids=[f"{stem}_s{k:03d}" for k in range(depth)],
        patient_ids=[stem] * depth,
        source_paths=[image_name] * depth,
    )


# --------------------------------------------------------------------------- public readers
def _as_file_list(files: Any) -> list[tuple[str, bytes]]:
    """(name, bytes) pairs from a list of pairs, an ipywidgets FileUpload value or a name→content dict."""
    out: list[tuple[str, bytes]] = []
    if isinstance(files, Mapping):  # ipywidgets 7: {name: {"metadata": ..., "content": bytes}}
        items: Iterable = [
            (k, v.get("content") if isinstance(v, Mapping) else v) for k, v in files.items()
        ]
    else:
        items = files or []
    for item in items:
        # ipywidgets 8 gives dicts: {"name", "type", "size", "content": memoryview}
        if isinstance(item, Mapping):
            name, content = item.get("name"), item.get("content")
        else:
            try:
                name, content = item
            except (TypeError, ValueError):
                raise UploadError("expected uploaded files as (name, bytes) pairs") from None
        if isinstance(content, (memoryview, bytearray)):
            content = bytes(content)
        if not isinstance(content, bytes):
            raise UploadError(f"{_display_name(str(name))}: no file content received")
        out.append((name, content))
    return out


def read_uploads(
    files: Sequence[tuple[str, bytes]] | Any,
    work_dir: str | os.PathLike | None = None,
) -> SliceDataset:
    """Check and read uploaded files into one dataset.

    One upload is one of: one or more PNG/JPEG slices of one size (display units, no spacing),
    one DICOM file or the files of one DICOM series, or one NIfTI volume (optionally with a mask
    volume whose name contains ``mask``, ``label`` or ``seg``).

    Args:
        files: (name, content bytes) pairs; an ipywidgets ``FileUpload.value`` works too.
        work_dir: folder under which a private temporary folder is made; it must lie inside the
            runs or data folder (default :func:`default_work_dir`). The temporary folder and
            everything in it is deleted before returning.

    Returns:
        a :class:`~strokekit.dataset.SliceDataset` (``unit="display"`` for images, ``"HU"`` for
        DICOM and NIfTI, with spacing and slice thickness when the files have them).

    Raises:
        UploadError: for any problem with the files; the message names the file and the problem.
        ValueError: for a work_dir outside the runs and data folders.
    """
    pairs = _as_file_list(files)
    if not pairs:
        raise UploadError("no file uploaded")
    checked = [(*_check_file(name, content), content) for name, content in pairs]
    total = sum(len(c) for _, _, c in checked)
    if total > MAX_UPLOAD_BYTES:
        raise UploadError(
            f"{len(checked)} files: {total / 1e6:.1f} MB in all is over the upload limit of "
            f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB"
        )
    kinds = {"image" if k in ("png", "jpeg") else k for k, _, _ in checked}
    if len(kinds) > 1:
        listed = ", ".join(f"{_display_name(n)} ({_KIND_TEXT[k]})" for k, n, _ in checked)
        raise UploadError(
            f"mixed upload: {listed}; upload PNG/JPEG slices, one DICOM series or one NIfTI volume at a time"
        )
    names = [n for _, n, _ in checked]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UploadError(f"{_display_name(dup[0])}: uploaded twice")
    kind = kinds.pop()
    root = _check_work_dir(work_dir)
    folder = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
    try:
        items = []
        for index, (k, name, content) in enumerate(checked):
            # Our own file names on disk: nothing from the uploader reaches the file system.
            ending = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm", "nifti": ".nii"}[k]
            if k == "nifti" and content.startswith(b"\x1f\x8b"):
                ending = ".nii.gz"  # nibabel decides by the ending whether to gunzip
            items.append(
                (_display_name(name), _write_private(folder, f"f{index:04d}{ending}", content))
            )
        try:
            if kind == "image":
                return _read_images(items)
            if kind == "dicom":
                return _read_dicom(items, folder)
            return _read_nifti(items, folder)
        except UploadError as exc:
            # Readers quote file paths; the user knows only the names they uploaded.
            names = {str(p): n for n, p in items} | {p.name: n for n, p in items}
            raise UploadError(_scrub(str(exc), names, folder)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def read_upload(
    name: str, content: bytes, work_dir: str | os.PathLike | None = None
) -> SliceDataset:
    """Check and read one uploaded file; see :func:`read_uploads`.

    Raises:
        UploadError: with a message like ``"scan.png: not a PNG image (the file starts with ...)"``.
    """
    return read_uploads([(name, content)], work_dir=work_dir)


# --------------------------------------------------------------------------- models
def _runs_root(runs_root: str | os.PathLike | None) -> Path:
    from .paths import runs_dir

    return Path(runs_root) if runs_root is not None else runs_dir()


def list_models(runs_root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The trained runs the app can use: folders under ``runs_root`` with model.keras and config.json.

    Args:
        runs_root: where to look (default :func:`strokekit.paths.runs_dir`), at any depth.

    Returns:
        (label, run folder) pairs sorted by label; the label is the folder's path relative to
        ``runs_root`` plus the validation Dice when ``metrics.json`` records it. Empty when the
        folder does not exist.
    """
    import json

    root = _runs_root(runs_root)
    if not root.is_dir():
        return []
    found = []
    for model_path in root.rglob("model.keras"):
        folder = model_path.parent
        if not (folder / "config.json").is_file() or not model_path.is_file():
            continue
        label = folder.relative_to(root).as_posix()
        metrics_path = folder / "metrics.json"
        if metrics_path.is_file():
            try:
                value = json.loads(metrics_path.read_text()).get("dice")
                if isinstance(value, (int, float)):
                    label += f" (val Dice {value:.3f})"
            except (ValueError, OSError, AttributeError):
                pass
        found.append((label, folder))
    return sorted(found, key=lambda item: item[0])


def load_model_for_app(folder: str | os.PathLike, runs_root: str | os.PathLike | None = None):
    """Load a run's model (Keras safe mode) and its TrainConfig, only from inside ``runs_root``.

    Args:
        folder: a run folder from :func:`list_models`.
        runs_root: the runs folder (default :func:`strokekit.paths.runs_dir`).

    Returns:
        (model, TrainConfig).

    Raises:
        UploadError: the folder lies outside ``runs_root`` (symbolic links are resolved first),
            or is not a run folder, or its model cannot be loaded.
    """
    import json

    from .train import config_from_dict, load_model

    root = _runs_root(runs_root).resolve()
    target = Path(folder).resolve()
    if not target.is_relative_to(root):
        raise UploadError(
            f"{folder}: refused, the app only loads models from inside the runs folder {root}"
        )
    if not (target / "model.keras").is_file() or not (target / "config.json").is_file():
        raise UploadError(f"{folder}: not a run folder (it needs model.keras and config.json)")
    try:
        config = config_from_dict(json.loads((target / "config.json").read_text()))
    except (ValueError, TypeError) as exc:
        raise UploadError(f"{folder}: config.json is not a training config ({exc})") from None
    try:
        model = load_model(target)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad or unsafe files
        raise UploadError(
            f"{folder}: cannot load model.keras in safe mode ({type(exc).__name__}: {exc})"
        ) from None
    return model, config


# --------------------------------------------------------------------------- segmentation
def segment(
    model: Any,
    config: Any,
    dataset: SliceDataset,
    threshold: float | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Segment every slice of an uploaded dataset and measure the result.

    Args:
        model: a Keras slice model.
        config: its TrainConfig (``image_size``, ``windows``, ``threshold``).
        dataset: the slices, e.g. from :func:`read_uploads`.
        threshold: probability cut-off for a sigmoid model (default ``config.threshold``).
        class_names: names of the output classes; default ("background", "lesion") for a
            sigmoid model, else the dataset's names when their number matches.
        batch_size: slices per forward pass.
        progress: show a progress bar.

    Returns:
        dict with ``probability`` (N, H, W) lesion probability (for softmax: 1 − background),
        ``mask`` (N, H, W) uint8 labels, ``class_names``, ``area_px`` {class: (N,) pixel counts},
        ``area_mm2`` {class: (N,) mm²} or None without spacing, ``volume_ml`` {class: mL} or None
        (needs more than one slice, spacing and slice thickness), ``overlays`` list of uint8 RGB
        (H, W, 3), ``dice`` against the dataset's masks when they hold any lesion (else None),
        ``case_ids``, ``spacing``, ``slice_thickness``, ``threshold``, ``seconds`` (total) and
        ``timing`` {"predict_s", "postprocess_s"}.
    """
    from .metrics import dice as dice_score
    from .preprocess import overlay_mask, to_unit_range
    from .recon3d import predict_volume

    if len(dataset) == 0:
        raise UploadError("nothing to segment: the upload holds no slices")
    start = time.perf_counter()
    prob = predict_volume(model, dataset, config, batch_size=batch_size, progress=progress)
    predicted = time.perf_counter()
    if threshold is None:
        threshold = float(getattr(config, "threshold", 0.5))
    if prob.ndim == 3:
        mask = (prob >= threshold).astype(np.uint8)
        names = tuple(class_names) if class_names is not None else ("background", "lesion")
        lesion_prob = prob
    else:
        mask = np.argmax(prob, axis=-1).astype(np.uint8)
        if class_names is not None:
            names = tuple(class_names)
        elif len(dataset.class_names) == prob.shape[-1]:
            names = tuple(dataset.class_names)
        else:
            names = ("background",) + tuple(f"class_{k}" for k in range(1, prob.shape[-1]))
        lesion_prob = 1.0 - prob[..., 0]
    n = len(dataset)
    area_px = {
        name: (mask == label).reshape(n, -1).sum(axis=1)
        for label, name in enumerate(names)
        if label
    }
    spacing = dataset.spacing
    area_mm2 = None
    if spacing is not None:
        pixel_mm2 = float(spacing[0]) * float(spacing[1])
        area_mm2 = {name: px * pixel_mm2 for name, px in area_px.items()}
    volume_ml = None
    if n > 1 and spacing is not None and dataset.slice_thickness:
        voxel_ml = pixel_mm2 * float(dataset.slice_thickness) / 1000.0
        volume_ml = {name: float(px.sum()) * voxel_ml for name, px in area_px.items()}
    window = config.windows[0] if getattr(config, "windows", None) else "brain"
    overlays = []
    for image, m in zip(dataset.images, mask):
        grey = image[..., 0] if image.ndim == 3 else image
        overlays.append(overlay_mask(to_unit_range(grey, dataset.unit, window), m))
    truth_dice = float(dice_score(dataset.masks > 0, mask > 0)) if dataset.masks.any() else None
    end = time.perf_counter()
    return {
        "probability": lesion_prob.astype(np.float32),
        "mask": mask,
        "class_names": names,
        "area_px": area_px,
        "area_mm2": area_mm2,
        "volume_ml": volume_ml,
        "overlays": overlays,
        "dice": truth_dice,
        "case_ids": list(dataset.case_ids),
        "spacing": spacing,
        "slice_thickness": dataset.slice_thickness,
        "threshold": float(threshold),
        "seconds": end - start,
        "timing": {"predict_s": predicted - start, "postprocess_s": end - predicted},
    }


def describe_result(result: Mapping[str, Any], name: str = "upload") -> str:
    """One line for the user: slices, time, lesion size (area or volume)."""
    mask = result["mask"]
    n, h, w = mask.shape
    head = f"{name}: {n} slice{'s' if n != 1 else ''} of {h}x{w} segmented in {result['seconds']:.2f} s"
    parts = []
    for cls, px in result["area_px"].items():
        if result["volume_ml"] is not None:
            parts.append(f"{cls} volume {result['volume_ml'][cls]:.2f} mL")
        elif result["area_mm2"] is not None:
            parts.append(
                f"{cls} {int(px.sum())} px ({float(result['area_mm2'][cls].sum()):.1f} mm²)"
            )
        else:
            parts.append(f"{cls} {int(px.sum())} px")
    if result.get("dice") is not None:
        parts.append(f"Dice vs uploaded mask {result['dice']:.3f}")
    return head + ("; " + ", ".join(parts) if parts else "")


# --------------------------------------------------------------------------- downloads
def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    """A predicted slice mask as PNG bytes: 0/255 grey for a binary mask, colour-coded for more labels.

    Colours follow :data:`strokekit.preprocess.DEFAULT_COLOURS` (red = hemorrhagic = 1,
    green = ischemic = 2), as in the study's masks.

    Raises:
        ValueError: for anything but one (H, W) slice (a (1, H, W) stack is accepted).
    """
    import io

    from PIL import Image

    from .preprocess import DEFAULT_COLOURS

    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(
            f"expected one (H, W) mask slice, got shape {arr.shape}; use mask_to_nifti_bytes for volumes"
        )
    labels = arr.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("mask labels must lie in 0..255")
    if labels.size == 0 or labels.max() <= 1:
        picture = Image.fromarray((labels > 0).astype(np.uint8) * 255, mode="L")
    else:
        lut = np.zeros((256, 3), np.uint8)
        for label, colour in DEFAULT_COLOURS.items():
            lut[label] = colour
        lut[int(max(DEFAULT_COLOURS)) + 1 :] = (255, 0, 255)
        picture = Image.fromarray(lut[labels], mode="RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_to_nifti_bytes(
    mask3d: np.ndarray,
    spacing: Sequence[float] | None,
    affine: np.ndarray | None = None,
    compress: bool = True,
) -> bytes:
    """A (D, H, W) mask as NIfTI bytes (``.nii.gz`` by default) that :func:`strokekit.io.read_nifti_pairs` reads back.

    The array is stored as (H, W, D) with zooms (dy, dx, dz), the layout the kit's NIfTI reader
    slices along axis 2.

    Args:
        mask3d: (D, H, W) label mask; one (H, W) slice is accepted.
        spacing: (dz, dy, dx) in mm, or None for 1 mm.
        affine: a 4x4 affine for the stored (H, W, D) array (e.g. the uploaded volume's);
            default a diagonal of the spacing.
        compress: gzip the bytes (for a ``.nii.gz`` download).

    Returns:
        the file's bytes.
    """
    import nibabel as nib

    arr = np.asarray(mask3d)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a (D, H, W) mask, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("mask labels must lie in 0..255")
    dz, dy, dx = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    stored = np.ascontiguousarray(np.moveaxis(arr.astype(np.uint8), 0, 2))
    if affine is None:
        affine = np.diag([dy, dx, dz, 1.0])
    image = nib.Nifti1Image(stored, np.asarray(affine, dtype=np.float64))
    image.header.set_zooms((dy, dx, dz))
    image.header.set_xyzt_units("mm")
    raw = image.to_bytes()
    return gzip.compress(raw, mtime=0) if compress else raw


# --------------------------------------------------------------------------- the widget callback
def handle_upload(
    files: Any,
    model: Any,
    config: Any,
    work_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
) -> tuple[dict[str, Any] | None, str]:
    """What the upload widget's callback calls: read, segment, and say what happened.

    Args:
        files: (name, bytes) pairs or an ipywidgets ``FileUpload.value``.
        model: the loaded model (None: the user has not picked one yet).
        config: its TrainConfig.
        work_dir: see :func:`read_uploads`.
        threshold: probability cut-off (default ``config.threshold``).

    Returns:
        (result of :func:`segment` with ``dataset`` added, message) on success, or
        (None, message saying which file failed and why). It never raises for a bad upload.
    """
    if model is None or config is None:
        return None, "choose a model first"
    try:
        dataset = read_uploads(files, work_dir=work_dir)
    except UploadError as exc:
        return None, str(exc)
    except DataError as exc:  # a reader problem not already translated
        return None, f"the upload could not be read: {exc.problem}"
    sources = list(dict.fromkeys(dataset.source_paths))
    label = (
        ", ".join(sources)
        if len(sources) <= 3
        else f"{sources[0]} ... {sources[-1]} ({len(sources)} files)"
    )
    try:
        result = segment(model, config, dataset, threshold=threshold)
    except (UploadError, DataError) as exc:
        return None, f"{label}: {exc}"
    except Exception as exc:  # noqa: BLE001 - shown in the app instead of a traceback
        return None, f"{label}: segmentation failed ({type(exc).__name__}: {exc})"
    result["dataset"] = dataset
    return result, describe_result(result, label)
