"""The logic of the upload-and-segment app, testable without a browser.

``notebooks/app.ipynb`` (served with Voila) only wires widgets to these functions: a model
picker fed by :func:`list_models`, :func:`default_model` and :func:`load_model_for_app` (the
phantom slice models of the notebooks and few-shot CT recipes saved by
:func:`strokekit.fewshot.save_fitted`), a file upload whose callback calls :func:`handle_upload`,
a result panel fed by :func:`with_geometry`, :func:`describe_result`, :func:`slice_text` and
:func:`summary_rows`, and download links fed by :func:`mask_to_png_bytes` and
:func:`mask_to_nifti_bytes`. What the page shows is built here too, as bytes and HTML that the
notebook puts into its widgets: :func:`status_html`, :func:`result_table_html`,
:func:`mask_download_html`, :func:`view_3d_png`, :func:`png_bytes`; :func:`set_quietly` changes
a widget without running its callback.

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
    "CT_TEST_SCORES",
    "MAX_UPLOAD_BYTES",
    "MAX_VOXELS",
    "SPINNER",
    "TABLE_STYLE",
    "UploadError",
    "default_model",
    "default_work_dir",
    "describe_result",
    "download_link",
    "figure_png",
    "focus_slice",
    "geometry_text",
    "handle_upload",
    "list_models",
    "load_model_for_app",
    "mask_download_html",
    "mask_to_nifti_bytes",
    "mask_to_png_bytes",
    "model_info",
    "model_loaded_text",
    "png_bytes",
    "read_upload",
    "read_uploads",
    "result_table_html",
    "segment",
    "set_quietly",
    "slice_text",
    "status_html",
    "summary_rows",
    "view_3d_png",
    "with_geometry",
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
    from .io import _mixed_units_text, _read_slice

    images, names, units = [], [], []
    for name, path in items:
        try:  # checks the declared size (io.MAX_SLICE_SIDE) before decoding; 16-bit grey = HU + 1024
            image, unit = _read_slice(path)
        except DataError as exc:
            problem = exc.problem.replace(str(path), name).replace(path.name, name)
            raise UploadError(f"{name}: {problem}") from None
        if units and unit != units[0]:
            raise UploadError(f"{name}: " + _mixed_units_text(unit, Path(names[0])))
        if images and image.shape != images[0].shape:
            raise UploadError(
                f"{name}: the slice is {image.shape[0]}x{image.shape[1]} but {names[0]} is "
                f"{images[0].shape[0]}x{images[0].shape[1]}; upload slices of one size"
            )
        images.append(image)
        names.append(name)
        units.append(unit)
    stems = _unique_stems(names)
    return SliceDataset(
        images=np.stack(images),
        masks=np.zeros((len(images),) + images[0].shape, np.uint8),
        case_ids=stems,
        patient_ids=["upload"] * len(images),
        slice_indices=np.arange(len(images)),
        source_paths=names,
        unit=units[0],
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
        DICOM and NIfTI, with spacing and slice thickness when the files have them). Several
        PNG/JPEG slices are taken as one scan in their names' natural order (``2.png`` before
        ``10.png``); a DICOM series comes in the order of its slice positions.

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
            if kind == "image":  # one scan's slices in their names' natural order (2.png before 10.png)
                from .io import _natural_key

                return _read_images(sorted(items, key=lambda item: _natural_key(item[0])))
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


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if np.isfinite(value) else None


#: Few-shot score keys that measure a recipe on held-out CT patients, best first (see
#: :func:`strokekit.fewshot.save_fitted`'s ``scores``); the first one a run records ranks it.
CT_TEST_SCORES = ("test_per_patient_dice", "test_3d_dice", "test_dice")


def _score_words(key: str) -> str:
    return key.replace("_", " ").replace("3d", "3-D").replace("dice", "Dice")


def _fewshot_scores_text(info: Mapping[str, Any]) -> str:
    """'test per patient Dice 0.380 on CT-ICH patients 70-72' from a few-shot run's scores.

    A number under ``<prefix>_...`` is said to be measured on the text under ``<prefix>_data``
    when the run records one; without numeric scores, the validation Dice (CT slices) is shown.
    """
    scores = info.get("scores") if isinstance(info.get("scores"), Mapping) else {}
    parts = []
    for key, value in scores.items():
        number = _finite(value)
        if number is None:
            continue
        text = f"{_score_words(str(key))} {number:.3f}"
        data = scores.get(f"{str(key).split('_')[0]}_data")
        if isinstance(data, str) and data.strip():
            text += f" on {data.strip()}"
        parts.append(text)
    val = _finite(info.get("val_dice"))
    if not parts and val is not None:
        parts.append(f"val Dice {val:.3f} on CT validation slices")
    return "; ".join(parts) if parts else "no score recorded"


def model_info(folder: str | os.PathLike, runs_root: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """What the app knows about a run folder without loading its model, or None if it cannot apply it.

    The app applies two kinds of run (:class:`strokekit.runs.RunFolder`): a few-shot CT recipe
    (``"fewshot"``, written by :func:`strokekit.fewshot.save_fitted`, ``fewshot.json`` beside the
    model) and an ordinary binary-or-softmax slice model (``"binary"``, whose ``config.json`` is a
    :class:`strokekit.config.TrainConfig`: notebooks 04-06, 09, the demo model; all trained on the
    phantom). Other kinds (notebook 07's multiclass and notebook 08's perfusion runs), a damaged
    ``fewshot.json`` or ``config.json`` and no ``model.keras`` give None.

    Args:
        folder: a run folder.
        runs_root: the runs folder the label is relative to (default
            :func:`strokekit.paths.runs_dir`).

    Returns:
        dict with ``folder`` (Path), ``kind`` (``"few-shot"`` or ``"slice"``), ``trained_on``
        (words), ``scores`` (words), ``ct_score`` (the recorded test Dice on CT patients, the
        validation Dice on CT slices when no test score was recorded, None for phantom runs),
        ``ct_tested`` (True when ``ct_score`` is a test score), ``val_dice`` (float or None)
        and ``label`` (what the model picker shows).
    """
    from .runs import RunFolder

    try:
        run = RunFolder.open(folder)
    except DataError:
        return None
    return _run_info(run, _runs_root(runs_root)) if run.finished else None


def _run_info(run, root: Path) -> dict[str, Any] | None:
    """:func:`model_info` of an opened :class:`strokekit.runs.RunFolder`."""
    from .fewshot import recipe_from_dict
    from .runs import fewshot_run_info
    from .train import config_from_dict

    folder = run.folder
    try:
        name = folder.relative_to(root).as_posix()
    except ValueError:
        name = folder.name
    if run.kind == "fewshot":
        info = fewshot_run_info(folder)
        if info is None:
            return None
        try:
            recipe_from_dict(info["recipe"])
        except (KeyError, TypeError, ValueError):
            return None
        scores = info.get("scores") if isinstance(info.get("scores"), Mapping) else {}
        tested = [_finite(scores.get(key)) for key in CT_TEST_SCORES]
        tested = [value for value in tested if value is not None]
        val = _finite(info.get("val_dice"))
        trained_on = str(info.get("trained_on") or "CT (not recorded)")
        scores_text = _fewshot_scores_text(info)
        return dict(folder=folder, kind="few-shot", trained_on=trained_on, scores=scores_text,
                    ct_score=tested[0] if tested else val, ct_tested=bool(tested), val_dice=val,
                    label=f"{name} · few-shot CT recipe, trained on {trained_on} · {scores_text}")
    if run.kind != "binary":
        return None
    try:
        config_from_dict(run.config)
    except (TypeError, ValueError, AttributeError):
        return None
    try:
        metrics = run.metrics
    except (OSError, ValueError):  # a damaged metrics.json: the run is listed without a score
        metrics = None
    val = _finite(metrics.get("dice")) if isinstance(metrics, Mapping) else None
    scores_text = f"val Dice {val:.3f} on phantom slices" if val is not None else "no score recorded"
    return dict(folder=folder, kind="slice", trained_on="the phantom", scores=scores_text,
                ct_score=None, ct_tested=False, val_dice=val,
                label=f"{name} · trained on the phantom · {scores_text}")


def list_models(runs_root: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """The trained runs the app can apply: see :func:`model_info` for which ones and their labels.

    Args:
        runs_root: where to look (default :func:`strokekit.paths.runs_dir`), at any depth
            (:func:`strokekit.runs.list_runs` of the ``"binary"`` and ``"fewshot"`` kinds).

    Returns:
        (label, run folder) pairs sorted by label. A label is the folder's path relative to
        ``runs_root``, what the model was trained on and what it scored on which data, e.g.
        ``"04_unet_vs_resunet/single · trained on the phantom · val Dice 0.702 on phantom
        slices"``. Empty when the folder does not exist.
    """
    from .runs import list_runs

    root = _runs_root(runs_root)
    found = []
    for run in list_runs(root, kind=("binary", "fewshot")):
        info = _run_info(run, root)
        if info is not None:
            found.append((info["label"], run.folder))
    return sorted(found, key=lambda item: item[0])


def default_model(choices: Sequence[tuple[str, Path]], runs_root: str | os.PathLike | None = None) -> Path | None:
    """The model the picker starts on: the best one *for CT*.

    A few-shot CT recipe when there is one (the best by its recorded test Dice on CT patients;
    runs without a test score rank after those with one, by their validation Dice), else the
    phantom model with the best validation Dice, else the first listed.

    Args:
        choices: (label, folder) pairs from :func:`list_models`.
        runs_root: as for :func:`list_models`.

    Returns:
        The chosen folder, or None when there is no choice.
    """
    infos = [model_info(folder, runs_root) for _, folder in choices]
    infos = [info for info in infos if info is not None]
    if not infos:
        return Path(choices[0][1]) if choices else None

    def rank(info):
        ct = info["ct_score"] if info["ct_score"] is not None else -1.0
        val = info["val_dice"] if info["val_dice"] is not None else -1.0
        return (info["kind"] == "few-shot", info["ct_tested"], ct, val)

    return Path(max(infos, key=rank)["folder"])


def _is_fitted(model: Any) -> bool:
    from .fewshot import FittedRecipe

    return isinstance(model, FittedRecipe)


def load_model_for_app(folder: str | os.PathLike, runs_root: str | os.PathLike | None = None):
    """Load a run for :func:`segment` (Keras safe mode), only from inside ``runs_root``.

    Args:
        folder: a run folder from :func:`list_models`.
        runs_root: the runs folder (default :func:`strokekit.paths.runs_dir`).

    Returns:
        (model, TrainConfig). For an ordinary run, the Keras model and its TrainConfig. For a
        few-shot CT recipe (``fewshot.json``), the :class:`strokekit.fewshot.FittedRecipe`
        (members, input channels, flips, brain restriction) and its network's TrainConfig with
        ``threshold`` set to the recipe's tuned threshold. :func:`segment` applies either.

    Raises:
        UploadError: the folder lies outside ``runs_root`` (symbolic links are resolved first),
            or is not a run folder, or is a run the app cannot apply (:func:`model_info`), or
            its model cannot be loaded.
    """
    import dataclasses

    from .fewshot import load_fitted
    from .runs import FEWSHOT_FILE, RunFolder
    from .train import config_from_dict

    root = _runs_root(runs_root).resolve()
    target = Path(folder).resolve()
    if not target.is_relative_to(root):
        raise UploadError(
            f"{folder}: refused, the app only loads models from inside the runs folder {root}"
        )
    try:
        run = RunFolder.open(target)
    except DataError as exc:  # no config.json, or a damaged one
        raise UploadError(f"{folder}: {exc.problem}") from None
    if not run.finished:
        raise UploadError(f"{folder}: not a run folder (it needs model.keras and config.json)")
    if run.kind == "fewshot":
        try:
            fitted = load_fitted(target)  # reads fewshot.json once, checks it and loads the members
        except DataError as exc:
            if exc.path is not None and Path(exc.path).name == FEWSHOT_FILE:
                raise UploadError(
                    f"{folder}: {FEWSHOT_FILE} is damaged or not a few-shot recipe ({exc.problem})"
                ) from None
            raise UploadError(f"{folder}: {exc.problem}") from None
        except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad or unsafe files
            raise UploadError(
                f"{folder}: cannot load the few-shot recipe's models in safe mode ({type(exc).__name__}: {exc})"
            ) from None
        return fitted, dataclasses.replace(fitted.recipe.config, threshold=float(fitted.threshold))
    try:
        if run.kind != "binary":
            raise ValueError(f"a {run.kind} run")
        config = config_from_dict(run.config)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UploadError(
            f"{folder}: config.json is not a slice model's training config ({exc}); the app applies "
            "the binary slice models of notebooks 04-06 and 09 and few-shot CT recipes"
        ) from None
    try:
        model = run.load_model()
    except DataError as exc:  # a damaged model.keras: say so, not a generic wrap
        raise UploadError(f"{folder}: {exc.problem}") from None
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for bad or unsafe files
        raise UploadError(
            f"{folder}: cannot load model.keras in safe mode ({type(exc).__name__}: {exc})"
        ) from None
    return model, config


# --------------------------------------------------------------------------- segmentation
def _predict_fitted(fitted: Any, dataset: SliceDataset, batch_size: int) -> np.ndarray:
    """A few-shot recipe's lesion probabilities (N, H, W) at the uploaded slices' size.

    :func:`strokekit.fewshot.predict_recipe` applies the whole recipe (HU slices through the
    CT-ICH display window, input channels, flips, brain restriction) and returns square
    probabilities; a non-square upload gets them resized to its own shape.
    """
    from .fewshot import predict_recipe
    from .preprocess import resize_image

    h, w = dataset.image_shape[:2]
    prob = predict_recipe(fitted, dataset, probabilities=True, batch_size=max(int(batch_size), 1))
    if prob.shape[1:] != (h, w):
        prob = np.stack([resize_image(p, (h, w)) for p in prob])
    return np.clip(prob, 0.0, 1.0).astype(np.float32)


def _brain_stack(dataset: SliceDataset, side: int = 128) -> np.ndarray | None:
    """Brain masks (N, H, W) of the uploaded slices, found at about ``side`` px (a few ms a slice).

    Dilated by a few pixels, so a bleed on the brain's edge (subdural, epidural) counts as inside.
    None when the slices are not CT of a head in a unit the brain finder reads.
    """
    from .preprocess import brain_mask_stack

    images = dataset.images[..., 0] if dataset.images.ndim == 4 else dataset.images
    step = max(1, int(np.ceil(max(images.shape[1:3]) / side)))
    try:
        return brain_mask_stack(images, unit=dataset.unit, stride=step, dilation=2)
    except (ValueError, DataError):
        return None


def focus_slice(mask: np.ndarray, brain: np.ndarray | None) -> int:
    """The slice a stack opens on: the most predicted lesion *inside the brain*.

    A model's false positives sit mostly outside the brain (skull base, scalp, the head rest),
    and they can be larger than the lesion, so the slice with the largest predicted area is often
    the wrong one to show first. Without any lesion inside the brain, the slice showing the most
    brain; without a brain mask, the slice with the most predicted lesion.

    Args:
        mask: (N, H, W) predicted labels (0 = background).
        brain: (N, H, W) bool brain masks, or None.

    Returns:
        A slice index (0-based).
    """
    n = len(mask)
    lesion = (np.asarray(mask) > 0).reshape(n, -1)
    if brain is not None:
        inside = (lesion & np.asarray(brain, bool).reshape(n, -1)).sum(axis=1)
        if inside.any():
            return int(np.argmax(inside))
        area = np.asarray(brain, bool).reshape(n, -1).sum(axis=1)
        if area.any():
            return int(np.argmax(area))
    return int(np.argmax(lesion.sum(axis=1))) if n else 0


def _measure(area_px: Mapping[str, np.ndarray], spacing, thickness, n: int):
    """(area_mm2 or None, volume_ml or None) from pixel counts and geometry."""
    if spacing is None:
        return None, None
    pixel_mm2 = float(spacing[0]) * float(spacing[1])
    area_mm2 = {name: px * pixel_mm2 for name, px in area_px.items()}
    volume_ml = None
    if n > 1 and thickness:
        voxel_ml = pixel_mm2 * float(thickness) / 1000.0
        volume_ml = {name: float(px.sum()) * voxel_ml for name, px in area_px.items()}
    return area_mm2, volume_ml


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
        model: a Keras slice model, or a :class:`strokekit.fewshot.FittedRecipe` (as
            :func:`load_model_for_app` returns for a few-shot CT run: its whole recipe is applied).
        config: its TrainConfig (``image_size``, ``windows``, ``threshold``).
        dataset: the slices, e.g. from :func:`read_uploads`.
        threshold: probability cut-off for a sigmoid model (default ``config.threshold``).
        class_names: names of the output classes; default ("background", "lesion") for a
            sigmoid model, else the dataset's names when their number matches.
        batch_size: slices per forward pass.
        progress: show a progress bar.

    Returns:
        dict with ``probability`` (N, H, W) lesion probability (for softmax: 1 − background),
        ``mask`` (N, H, W) uint8 labels (for a few-shot recipe on a scan of several slices, only
        the 3-D components brighter than the brain around them: :func:`strokekit.fewshot.keep_bright_components`;
        runs saved before the recipe had that floor apply none),
        ``class_names``, ``area_px`` {class: (N,) pixel counts},
        ``area_mm2`` {class: (N,) mm²} or None without spacing, ``volume_ml`` {class: mL} or None
        (needs more than one slice, spacing and slice thickness), ``overlays`` list of uint8 RGB
        (H, W, 3), ``dice`` against the dataset's masks when they hold any lesion (else None),
        ``lesion_in_brain_px`` (N,) predicted lesion pixels inside the brain (None when no brain
        mask could be made), ``focus_slice`` (the slice to show first, :func:`focus_slice`),
        ``case_ids``, ``spacing``, ``slice_thickness`` (from the files), ``threshold``,
        ``seconds`` (total) and ``timing`` {"predict_s", "postprocess_s"}.
    """
    from .metrics import dice as dice_score
    from .preprocess import overlay_mask, to_unit_range
    from .recon3d import predict_volume

    if len(dataset) == 0:
        raise UploadError("nothing to segment: the upload holds no slices")
    start = time.perf_counter()
    if _is_fitted(model):
        prob = _predict_fitted(model, dataset, batch_size)
    else:
        prob = predict_volume(model, dataset, config, batch_size=batch_size, progress=progress)
    predicted = time.perf_counter()
    if threshold is None:
        threshold = float(getattr(config, "threshold", 0.5))
    if prob.ndim == 3:
        mask = (prob >= threshold).astype(np.uint8)
        if _is_fitted(model) and len(dataset) > 1:  # a whole scan: only components brighter than brain
            from .fewshot import keep_bright_components

            mask = keep_bright_components(model, dataset, mask)
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
    area_mm2, volume_ml = _measure(area_px, spacing, dataset.slice_thickness, n)
    window = config.windows[0] if getattr(config, "windows", None) else "brain"
    overlays = []
    for image, m in zip(dataset.images, mask):
        grey = image[..., 0] if image.ndim == 3 else image
        overlays.append(overlay_mask(to_unit_range(grey, dataset.unit, window), m))
    truth_dice = float(dice_score(dataset.masks > 0, mask > 0)) if dataset.masks.any() else None
    brain = _brain_stack(dataset) if n > 1 else None  # one slice: nothing to choose
    in_brain = None if brain is None else ((mask > 0) & brain).reshape(n, -1).sum(axis=1)
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
        "lesion_in_brain_px": in_brain,
        "focus_slice": focus_slice(mask, brain),
        "case_ids": list(dataset.case_ids),
        "spacing": spacing,
        "slice_thickness": dataset.slice_thickness,
        "threshold": float(threshold),
        "seconds": end - start,
        "timing": {"predict_s": predicted - start, "postprocess_s": end - predicted},
    }


def with_geometry(
    result: Mapping[str, Any], pixel_mm: float | None = None, slice_mm: float | None = None
) -> dict[str, Any]:
    """The result measured with the geometry that applies: the file's, else what the user typed.

    PNG and JPEG files carry neither pixel size nor slice spacing; DICOM and NIfTI carry both,
    and then typed values are ignored. Applying it again to its own output starts again from
    the files' values, so a value typed for one upload never sticks to the next.

    Args:
        result: from :func:`segment` (or from this function).
        pixel_mm: typed pixel size in mm (square pixels); None or <= 0: not given.
        slice_mm: typed slice spacing in mm; None or <= 0: not given.

    Returns:
        A copy with ``spacing`` and ``slice_thickness`` in effect, ``area_mm2`` and
        ``volume_ml`` measured with them, ``pixel_source`` and ``slice_source`` (``"file"``,
        ``"typed"`` or None: unknown) and the files' own values in ``file_spacing`` and
        ``file_slice_thickness``.
    """
    out = dict(result)
    file_spacing = result.get("file_spacing", result["spacing"])
    file_thickness = result.get("file_slice_thickness", result["slice_thickness"])
    typed_pixel = _finite(pixel_mm)
    typed_slice = _finite(slice_mm)
    spacing, pixel_source = file_spacing, "file" if file_spacing is not None else None
    if spacing is None and typed_pixel is not None and typed_pixel > 0:
        spacing, pixel_source = (typed_pixel, typed_pixel), "typed"
    thickness, slice_source = file_thickness, "file" if file_thickness else None
    if not thickness and typed_slice is not None and typed_slice > 0:
        thickness, slice_source = typed_slice, "typed"
    n = len(result["mask"])
    out["area_mm2"], out["volume_ml"] = _measure(result["area_px"], spacing, thickness, n)
    out.update(spacing=spacing, slice_thickness=thickness or None, pixel_source=pixel_source,
               slice_source=slice_source, file_spacing=file_spacing, file_slice_thickness=file_thickness)
    return out


def _px_text(px: int, spacing) -> str:
    text = f"{px} px"
    if spacing is not None:
        text += f" = {px * float(spacing[0]) * float(spacing[1]):.1f} mm²"
    return text


def describe_result(result: Mapping[str, Any], name: str = "upload") -> str:
    """One line for the user: slices, time, lesion size; the same numbers :func:`slice_text` shows.

    A stack gives its total over all slices (the volume in mL when the geometry is known); one
    slice its area. Pass the result through :func:`with_geometry` first to count typed values.
    """
    mask = result["mask"]
    n, h, w = mask.shape
    head = f"{name}: {n} slice{'s' if n != 1 else ''} of {h}x{w} segmented in {result['seconds']:.2f} s"
    spacing = result.get("spacing")
    parts = []
    for cls, px in result["area_px"].items():
        total = int(np.sum(px))
        if n == 1:
            parts.append(f"{cls} {_px_text(total, spacing)}")
            continue
        text = f"{cls} on {int((np.asarray(px) > 0).sum())} of {n} slices, {_px_text(total, spacing)} in all"
        if result.get("volume_ml") is not None:
            text += f" = {result['volume_ml'][cls]:.2f} mL"
        parts.append(text)
    if result.get("dice") is not None:
        parts.append(f"Dice vs uploaded mask {result['dice']:.3f}")
    return head + ("; " + ", ".join(parts) if parts else "")


def geometry_text(result: Mapping[str, Any]) -> str:
    """Which pixel size and slice spacing the numbers use, and what is missing for mm², mL and 3-D."""
    n = len(result["mask"])
    spacing, thickness = result.get("spacing"), result.get("slice_thickness")
    where = {"file": "from the file", "typed": "typed above"}
    parts = []
    if spacing is not None:
        parts.append(f"pixel {float(spacing[0]):.3g} × {float(spacing[1]):.3g} mm "
                     f"({where.get(result.get('pixel_source'), 'from the file')})")
    if n > 1 and thickness:
        parts.append(f"slice spacing {float(thickness):.3g} mm "
                     f"({where.get(result.get('slice_source'), 'from the file')})")
    missing = [what for what, absent in (("the pixel size", spacing is None),
                                         ("the slice spacing", n > 1 and not thickness)) if absent]
    if missing:
        if n == 1:
            needs = "mm² needs"
        elif spacing is None:
            needs = "mm², mL and the 3-D view need"
        else:
            needs = "mL and the 3-D view need"
        it = "it" if len(missing) == 1 else "them"
        parts.append(f"{needs} {' and '.join(missing)}: the file does not carry {it}, type {it} above")
    return " · ".join(parts)


def slice_text(result: Mapping[str, Any], k: int) -> str:
    """The result panel's text (HTML) for slice ``k`` (0-based) of a :func:`with_geometry` result.

    The totals over all slices are the numbers of :func:`describe_result`'s status line.
    """
    n = len(result["mask"])
    spacing = result.get("spacing")
    names = list(result["area_px"])
    one = len(names) == 1
    lines = []
    if n > 1:
        totals = []
        for cls, px in result["area_px"].items():
            text = ("" if one else f"{cls} ") + _px_text(int(np.sum(px)), spacing)
            if result.get("volume_ml") is not None:
                text += f" = {result['volume_ml'][cls]:.2f} mL"
            totals.append(text + f" on {int((np.asarray(px) > 0).sum())} of {n} slices")
        label = "Lesion volume" if result.get("volume_ml") is not None else "All slices"
        lines.append(f"<b>{label}:</b> " + "; ".join(totals))
    here = "; ".join(("" if one else f"{cls} ") + _px_text(int(px[k]), spacing)
                     for cls, px in result["area_px"].items())
    line = f"<b>{'Lesion area' if one else 'Area'}:</b> {here}"
    if n > 1:
        line += f" · slice {k + 1} of {n}"
        in_brain = result.get("lesion_in_brain_px")
        if in_brain is not None and int(np.sum([px[k] for px in result["area_px"].values()])) > int(in_brain[k]):
            line += f" ({int(in_brain[k])} px inside the brain)"
    lines.append(line)
    note = geometry_text(result)
    if note:
        lines.append(f'<span class="sk-geometry">{note}</span>')
    return "<br>".join(lines)


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per class for the result table (a :func:`with_geometry` result): the same totals."""
    spacing, thickness = result.get("spacing"), result.get("slice_thickness")
    n = len(result["mask"])
    rows = []
    for name, px in result["area_px"].items():
        total = int(np.sum(px))
        row: dict[str, Any] = {"class": name, "slices with lesion": int((np.asarray(px) > 0).sum()),
                               "pixels, all slices": total}
        if spacing is not None:
            row["area, all slices (mm²)"] = round(total * float(spacing[0]) * float(spacing[1]), 1)
        if result.get("volume_ml") is not None and n > 1 and thickness:
            row["volume (mL)"] = round(float(result["volume_ml"][name]), 3)
        rows.append(row)
    return rows


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


# --------------------------------------------------------------------------- what the page shows
#: A spinner for the status line while the kernel segments (CSS only): the page would otherwise look frozen.
SPINNER = ('<style>@keyframes sk-spin {to {transform: rotate(360deg)}}</style>'
           '<span style="display:inline-block; width:12px; height:12px; border:2px solid #bbb; '
           'border-top-color:#333; border-radius:50%; animation:sk-spin 0.8s linear infinite"></span>')

#: The CSS of the result table (:func:`result_table_html`): thin row lines, numbers right-aligned.
TABLE_STYLE = ("<style>.sk-table-inner {border-collapse: collapse; margin: 6px 0}"
               " .sk-table-inner th, .sk-table-inner td {padding: 2px 10px; border-bottom: 1px solid #ddd;"
               " text-align: right} .sk-table-inner th:first-child, .sk-table-inner td:first-child"
               " {text-align: left}</style>")


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 picture, (H, W) grey or (H, W, 3) RGB (e.g. an overlay of :func:`segment`), as PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(picture)).save(buffer, format="PNG")
    return buffer.getvalue()


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib Figure as PNG bytes at ``dpi`` dots per inch (for an ``ipywidgets.Image``)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def download_link(data: bytes, filename: str, mime: str, label: str) -> str:
    """An HTML link that downloads ``data`` as ``filename``: the bytes travel in the link, nothing is written
    to disk. ``filename`` and ``label`` are HTML-escaped."""
    import base64
    import html

    payload = base64.b64encode(data).decode("ascii")
    return (f'<a class="sk-download-link" download="{html.escape(filename)}" '
            f'href="data:{mime};base64,{payload}">⬇ {html.escape(label)}</a>')


def status_html(message: str, error: bool = False, busy: bool = False) -> str:
    """The status line as HTML: the message escaped (it quotes uploaded file names, which are not ours),
    red for an error, after :data:`SPINNER` while busy."""
    import html

    text = html.escape(message)
    if busy:
        return f'<span class="sk-busy">{SPINNER} {text}</span>'
    return f'<span style="color:{"#b00020" if error else "#222"}">{text}</span>'


def set_quietly(widget: Any, handler: Any, **values: Any) -> None:
    """Set attributes of a widget (``value``, ``options``, ``max`` ...) without running ``handler``, the
    callback observing its ``value``: the caller does what is needed. The handler observes again afterwards,
    also when setting a value fails."""
    widget.unobserve(handler, names="value")
    try:
        for name, value in values.items():
            setattr(widget, name, value)
    finally:
        widget.observe(handler, names="value")


def model_loaded_text(folder: str | os.PathLike, config: Any, runs_root: str | os.PathLike | None = None) -> str:
    """The status line after a model was loaded: its label (:func:`model_info`), architecture, input size and
    threshold."""
    return (f"Model loaded: {model_info(folder, runs_root)['label']} ({config.arch}, {config.image_size} px "
            f"input, threshold {config.threshold:.2f}). Upload a file.")


def result_table_html(result: Mapping[str, Any]) -> str:
    """The result table of a :func:`with_geometry` result (:func:`summary_rows`) as HTML, with
    :data:`TABLE_STYLE`."""
    import pandas as pd

    return TABLE_STYLE + pd.DataFrame(summary_rows(result)).to_html(index=False, border=0, classes="sk-table-inner")


def mask_download_html(result: Mapping[str, Any]) -> str:
    """A :func:`download_link` for the predicted mask of a :func:`with_geometry` result: one slice as PNG
    (:func:`mask_to_png_bytes`), a stack as NIfTI ``.nii.gz`` (:func:`mask_to_nifti_bytes`) with its voxel
    size when the pixel size and the slice spacing are known. The file is named after the first case id,
    with anything but letters, digits, ``_``, ``.`` and ``-`` replaced (``upload`` when nothing is left)."""
    mask, spacing, thickness = result["mask"], result["spacing"], result["slice_thickness"]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(result["case_ids"][0]))[:60] or "upload"
    if len(mask) == 1:
        return download_link(mask_to_png_bytes(mask[0]), f"{stem}_mask.png", "image/png",
                             "download the mask (PNG)")
    dzyx = (thickness, *spacing) if spacing is not None and thickness else None
    return download_link(mask_to_nifti_bytes(mask, dzyx), f"{stem}_mask.nii.gz", "application/gzip",
                         "download the mask (NIfTI, .nii.gz)")


def view_3d_png(result: Mapping[str, Any], dpi: int = 80) -> bytes | None:
    """The 3-D view of a stack (:func:`strokekit.recon3d.plot_3d`: the predicted mask, the skull of a CT in HU,
    the reference mask when the upload had one) as PNG bytes; None for one slice or when the pixel size or the
    slice spacing is unknown.

    Args:
        result: a :func:`with_geometry` result with its ``dataset`` (:func:`handle_upload` adds it).
        dpi: resolution of the PNG.
    """
    mask, spacing, thickness = result["mask"], result["spacing"], result["slice_thickness"]
    if len(mask) < 2 or spacing is None or not thickness:
        return None
    from . import recon3d

    data = result["dataset"]
    images = data.images[..., 0] if data.images.ndim == 4 else data.images
    fig = recon3d.plot_3d(mask > 0, (thickness, *spacing),
                          skull_mask=recon3d.skull_from_hu(images) if data.unit == "HU" else None,
                          truth_mask=data.masks if data.masks.any() else None, figsize=(5.5, 5.0))
    return figure_png(fig, dpi=dpi)


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
        (result of :func:`segment` with ``dataset`` and ``label`` (the files, in words) added,
        message of :func:`describe_result`) on success, or
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
    result["label"] = label
    return result, describe_result(result, label)
