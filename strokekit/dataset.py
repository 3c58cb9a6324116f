"""The one in-memory dataset type every notebook passes around.

Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import numpy as np

from .errors import DataError

UNITS = ("HU", "display")


def _strings(values: Sequence[Any] | None, what: str, n: int, items: str) -> list[str] | None:
    """``values`` as strings, one per item (None stays None): the per-slice id lists."""
    if values is None:
        return None
    values = [str(v) for v in values]
    if len(values) != n:
        raise DataError(f"{len(values)} {what} for {n} {items}")
    return values


def _check_unique(case_ids: Sequence[str]) -> None:
    dup = [c for c, k in Counter(case_ids).items() if k > 1]
    if dup:
        raise DataError(f"duplicate case ids: {sorted(dup)[:5]}")


@dataclasses.dataclass
class SliceDataset:
    """A stack of 2-D slices with integer label masks and per-slice bookkeeping.

    Attributes:
        images: float32 array (N, H, W) or (N, H, W, C) for multi-channel inputs.
        masks: uint8 integer label array (N, H, W); 0 is background.
        case_ids: unique id of each slice (e.g. the file stem ``"17"``).
        patient_ids: patient of each slice, or None when unknown.
        slice_indices: position of each slice in its patient's volume (-1 if unknown).
        source_paths: file each slice came from ("" for generated data).
        unit: ``"HU"`` (Hounsfield units) or ``"display"`` (already windowed, 0..255 or 0..1).
        class_names: name of each label value, index = label.
        spacing: pixel spacing in mm as (row, col), or None when unknown.
        slice_thickness: distance between slices in mm, or None when unknown.
        extra: further per-slice columns (each a length-N array), e.g. ``level`` or ``lesion_type``.
    """

    images: np.ndarray
    masks: np.ndarray
    case_ids: list[str]
    patient_ids: list[str] | None = None
    slice_indices: np.ndarray | None = None
    source_paths: list[str] | None = None
    unit: str = "HU"
    class_names: tuple[str, ...] = ("background", "lesion")
    spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images, dtype=np.float32)
        self.masks = np.asarray(self.masks)
        if self.masks.dtype != np.uint8:
            if self.masks.size and (self.masks.min() < 0 or self.masks.max() > 255):
                raise DataError("mask labels must lie in 0..255")
            self.masks = self.masks.astype(np.uint8)
        n = len(self.images)
        if self.images.ndim not in (3, 4):
            raise DataError(f"images must be (N, H, W) or (N, H, W, C), got shape {self.images.shape}")
        if self.masks.shape != self.images.shape[:3]:
            raise DataError(
                f"masks shape {self.masks.shape} does not match images shape {self.images.shape[:3]}"
            )
        self.case_ids = _strings(self.case_ids, "case ids", n, "images")
        _check_unique(self.case_ids)
        self.patient_ids = _strings(self.patient_ids, "patient ids", n, "images")
        if self.slice_indices is None:
            self.slice_indices = np.full(n, -1, dtype=np.int64)
        self.slice_indices = np.asarray(self.slice_indices, dtype=np.int64)
        if self.source_paths is None:
            self.source_paths = [""] * n
        self.source_paths = [str(p) for p in self.source_paths]
        if self.unit not in UNITS:
            raise DataError(f"unit must be one of {UNITS}, got {self.unit!r}")
        self.class_names = tuple(self.class_names)
        if n and int(self.masks.max()) >= len(self.class_names):
            raise DataError(
                f"mask label {int(self.masks.max())} has no name in class_names={self.class_names}"
            )
        for key, values in list(self.extra.items()):
            values = np.asarray(values)
            if len(values) != n:
                raise DataError(f"extra column {key!r} has {len(values)} values for {n} images")
            self.extra[key] = values

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, (H, W) or (H, W, C)."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of labels including background."""
        return len(self.class_names)

    @property
    def has_patient_ids(self) -> bool:
        return self.patient_ids is not None

    def lesion_area(self) -> np.ndarray:
        """Number of non-background pixels per slice."""
        return (self.masks > 0).reshape(len(self), -1).sum(axis=1)

    def has_lesion(self) -> np.ndarray:
        """Boolean per slice: does the mask contain any lesion pixel?"""
        return self.lesion_area() > 0

    def patients(self) -> list[str]:
        """Distinct patient ids in order of first appearance."""
        if self.patient_ids is None:
            raise DataError("this dataset has no patient ids")
        return list(dict.fromkeys(self.patient_ids))

    def index_of(self, case_ids: Sequence[str]) -> np.ndarray:
        """Positions of the given case ids; raises DataError for unknown ids."""
        pos = {c: i for i, c in enumerate(self.case_ids)}
        missing = [c for c in case_ids if str(c) not in pos]
        if missing:
            raise DataError(f"unknown case ids: {missing[:5]}")
        return np.array([pos[str(c)] for c in case_ids], dtype=np.int64)

    # ---------------------------------------------------------------- subsets
    def subset(self, index: Sequence[int] | np.ndarray) -> "SliceDataset":
        """A new dataset with the slices at ``index`` (integer positions or a boolean mask)."""
        index = np.asarray(index)
        if index.dtype == bool:
            if len(index) != len(self):
                raise DataError(f"boolean index of length {len(index)} for {len(self)} slices")
            index = np.flatnonzero(index)
        index = index.astype(np.int64)
        return dataclasses.replace(
            self,
            images=self.images[index],
            masks=self.masks[index],
            case_ids=[self.case_ids[i] for i in index],
            patient_ids=None if self.patient_ids is None else [self.patient_ids[i] for i in index],
            slice_indices=self.slice_indices[index],
            source_paths=[self.source_paths[i] for i in index],
            extra={k: v[index] for k, v in self.extra.items()},
        )

    def select_cases(self, case_ids: Sequence[str]) -> "SliceDataset":
        """The slices with the given case ids, in that order."""
        return self.subset(self.index_of(case_ids))

    def select_patients(self, patient_ids: Sequence[str]) -> "SliceDataset":
        """All slices of the given patients, in dataset order."""
        if self.patient_ids is None:
            raise DataError("this dataset has no patient ids")
        wanted = {str(p) for p in patient_ids}
        return self.subset(np.array([p in wanted for p in self.patient_ids], dtype=bool))

    def replace(self, **changes: Any) -> "SliceDataset":
        """A copy with some fields changed (``dataclasses.replace``), validated again."""
        return dataclasses.replace(self, **changes)

    def to_frame(self):
        """A pandas DataFrame with one row per slice (ids, index, path, lesion area, extras)."""
        import pandas as pd

        table = {
            "case_id": self.case_ids,
            "patient_id": self.patient_ids if self.patient_ids is not None else [None] * len(self),
            "slice_index": self.slice_indices,
            "source_path": self.source_paths,
            "lesion_pixels": self.lesion_area(),
        }
        for k, v in self.extra.items():
            table[k] = v
        return pd.DataFrame(table)

    def summary(self) -> dict[str, Any]:
        """Counts a notebook can print and check."""
        counts = np.bincount(self.masks.ravel(), minlength=self.num_classes)
        return {
            "slices": len(self),
            "patients": len(self.patients()) if self.patient_ids is not None else None,
            "image_shape": self.image_shape,
            "unit": self.unit,
            "slices_with_lesion": int(self.has_lesion().sum()),
            "pixel_fraction": {
                name: float(c) / max(1, self.masks.size) for name, c in zip(self.class_names, counts)
            },
        }


def concat(datasets: Sequence[SliceDataset]) -> SliceDataset:
    """Stack datasets with the same image shape, unit and class names."""
    if not datasets:
        raise DataError("nothing to concatenate")
    first = datasets[0]
    for d in datasets[1:]:
        if d.image_shape != first.image_shape:
            raise DataError(f"image shapes differ: {first.image_shape} vs {d.image_shape}")
        if d.unit != first.unit or d.class_names != first.class_names:
            raise DataError("datasets differ in unit or class names")
    with_pid = all(d.patient_ids is not None for d in datasets)
    keys = set(first.extra).intersection(*[set(d.extra) for d in datasets[1:]]) if datasets[1:] else set(first.extra)
    return SliceDataset(
        images=np.concatenate([d.images for d in datasets]),
        masks=np.concatenate([d.masks for d in datasets]),
        case_ids=[c for d in datasets for c in d.case_ids],
        patient_ids=[p for d in datasets for p in d.patient_ids] if with_pid else None,
        slice_indices=np.concatenate([d.slice_indices for d in datasets]),
        source_paths=[p for d in datasets for p in d.source_paths],
        unit=first.unit,
        class_names=first.class_names,
        spacing=first.spacing,
        slice_thickness=first.slice_thickness,
        extra={k: np.concatenate([d.extra[k] for d in datasets]) for k in sorted(keys)},
    )
