"""CT perfusion (CTP) from the phantom: parametric maps, infarct core and penumbra, multi-input models.

A CT perfusion study follows a contrast bolus through the brain and summarises each pixel's
time-density curve in parametric maps:

* **CBF**, cerebral blood flow (mL/100 g/min): grey matter ~60, white matter ~25.
* **CBV**, cerebral blood volume (mL/100 g): grey ~4, white ~2.
* **Tmax**, time to the maximum of the deconvolved residue function (s): 0–2 s in healthy tissue;
  above 6 s marks critically hypoperfused tissue.
* **TTP**, time to peak of the raw curve (s): bolus arrival + delay + about half the mean transit
  time.
* **MIP**, the maximum-intensity projection over time: an angiogram-like image with bright vessels.

Behind an arterial occlusion the tissue splits into an infarct **core** (already dead: CBF below
30 % of normal *and* CBV reduced, because autoregulation has failed) and a **penumbra** (at risk but
salvageable: Tmax > 6 s with CBV preserved or raised, as the vessels dilate to keep volume). The
core lies strictly inside the hypoperfused region. This is the rule commercial software
(RAPID-like: rCBF < 30 %, Tmax > 6 s) applies to decide on thrombectomy.

:func:`synthesize_perfusion` draws such maps over the phantom's ischemic patients: the phantom's
hypodense infarct becomes the core and a margin around it in the same hemisphere (wide behind a
large-vessel occlusion, narrow behind a distal one) the penumbra. Masks have four classes:
0 background, 1 brain, 2 penumbra, 3 core. Each patient is in an occlusion group, ``"LVO"``
(large-vessel occlusion, here the MCA M1 segment: a large penumbra, often a small core) or
``"other"`` (ACA/PCA and distal occlusions: smaller hypoperfusion), and has a synthetic NIHSS score
that grows with the core and penumbra volumes. The model side (:class:`MultiInputLoader`, a
class-weighted focal Tversky loss, frozen / unfrozen / gradual fine-tuning, per-group F1 tables)
serves the notebook that segments core and penumbra with a multi-input U-Net.

It is not a perfusion model: no arterial input function, deconvolution, delay correction or
motion; maps are drawn from region rules with smooth random variation and noise.

Introduced in notebooks/08_ctp_core_penumbra.ipynb.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from . import engine
from .dataset import SliceDataset, concat
from .errors import DataError

#: Parametric maps, in channel order of the synthesised images (and the model's input names).
MAP_NAMES: tuple[str, ...] = ("cbf", "cbv", "tmax", "ttp", "mip")
#: Physical unit of each map.
MAP_UNITS: dict[str, str] = {
    "cbf": "mL/100 g/min",
    "cbv": "mL/100 g",
    "tmax": "s",
    "ttp": "s",
    "mip": "HU",
}
#: Physical range of each map mapped linearly onto [0, 1] (values outside are clipped).
MAP_RANGES: dict[str, tuple[float, float]] = {
    "cbf": (0.0, 100.0),
    "cbv": (0.0, 8.0),
    "tmax": (0.0, 20.0),
    "ttp": (0.0, 40.0),
    "mip": (-20.0, 180.0),
}
#: Standard deviation of the noise of each map at ``PerfusionConfig.noise == 1``.
MAP_NOISE: dict[str, float] = {"cbf": 5.0, "cbv": 0.35, "tmax": 0.8, "ttp": 1.0, "mip": 6.0}
#: Labels of the 4-class masks.
CLASS_NAMES: tuple[str, ...] = ("background", "brain", "penumbra", "core")
BRAIN, PENUMBRA, CORE = 1, 2, 3
#: Occlusion groups.
OCCLUSION_GROUPS: tuple[str, ...] = ("LVO", "other")
#: Fine-tuning schedules of :func:`train_perfusion`.
SCHEDULES: tuple[str, ...] = ("scratch", "frozen", "unfrozen", "gradual")
#: Largest NIHSS score.
NIHSS_MAX = 42


# ============================================================================ synthesis config
@dataclasses.dataclass(frozen=True)
class PerfusionConfig:
    """How the perfusion maps are drawn; ranges are (low, high) drawn uniformly per patient.

    Attributes:
        cbf_grey: normal grey-matter CBF (mL/100 g/min).
        cbf_white: normal white-matter CBF.
        cbv_grey: normal grey-matter CBV (mL/100 g).
        cbv_white: normal white-matter CBV.
        cbf_scale: per-patient global CBF factor (why thresholds are relative to normal tissue).
        tmax_normal: Tmax of healthy tissue (s).
        arrival_time: bolus arrival in healthy tissue (s), the TTP offset.
        core_cbf: core CBF relative to normal tissue (must stay below 0.3).
        core_cbv: core CBV relative to normal tissue (reduced: below 1).
        core_tmax: core Tmax (s).
        penumbra_cbf: penumbra CBF relative to normal, (next to the edge, next to the core)
            reversed: the low end applies next to the core.
        penumbra_cbv: penumbra CBV relative to normal (preserved or raised: >= 1).
        penumbra_tmax: penumbra Tmax (s), the high end next to the core (must stay above 6 s).
        lvo_margin_mm: width of the penumbra around the core behind a large-vessel occlusion.
        other_margin_mm: the same behind other (distal, ACA/PCA) occlusions.
        margin_variation: relative variation of the margin along the outline (smooth field).
        lvo_territories: phantom territories whose occlusion counts as LVO (MCA = M1).
        noise: multiplier of :data:`MAP_NOISE` (0: noise-free maps).
        noise_correlation: sigma in pixels of the Gaussian that correlates the noise.
        field_mm: length scale of the smooth random variations, in mm.
        nihss_base: NIHSS of a patient with no core or penumbra.
        nihss_per_core_ml: NIHSS points per mL of core.
        nihss_per_penumbra_ml: NIHSS points per mL of penumbra.
        nihss_sd: standard deviation of the NIHSS noise (points).
    """

    cbf_grey: float = 60.0
    cbf_white: float = 25.0
    cbv_grey: float = 4.0
    cbv_white: float = 2.0
    cbf_scale: tuple[float, float] = (0.85, 1.15)
    tmax_normal: tuple[float, float] = (0.3, 1.5)
    arrival_time: tuple[float, float] = (6.0, 10.0)
    core_cbf: tuple[float, float] = (0.08, 0.22)
    core_cbv: tuple[float, float] = (0.35, 0.65)
    core_tmax: tuple[float, float] = (11.0, 15.0)
    penumbra_cbf: tuple[float, float] = (0.40, 0.75)
    penumbra_cbv: tuple[float, float] = (1.00, 1.30)
    penumbra_tmax: tuple[float, float] = (7.5, 10.5)
    lvo_margin_mm: tuple[float, float] = (14.0, 24.0)
    other_margin_mm: tuple[float, float] = (5.0, 10.0)
    margin_variation: float = 0.35
    lvo_territories: tuple[str, ...] = ("MCA",)
    noise: float = 1.0
    noise_correlation: float = 0.8
    field_mm: float = 12.0
    nihss_base: float = 2.0
    nihss_per_core_ml: float = 0.15
    nihss_per_penumbra_ml: float = 0.06
    nihss_sd: float = 1.5

    def __post_init__(self) -> None:
        from .phantom import field_checker, tuple_fields

        tuple_fields(self, ("cbf_scale", "tmax_normal", "arrival_time", "core_cbf", "core_cbv", "core_tmax",
                            "penumbra_cbf", "penumbra_cbv", "penumbra_tmax", "lvo_margin_mm", "other_margin_mm",
                            "lvo_territories"))
        need = field_checker(self)

        def is_range(v, low=0.0, high=np.inf) -> bool:
            return len(v) == 2 and low <= v[0] <= v[1] <= high

        need(0 < self.cbf_white < self.cbf_grey, "cbf_white", "positive and below cbf_grey")
        need(0 < self.cbv_white < self.cbv_grey, "cbv_white", "positive and below cbv_grey")
        need(is_range(self.cbf_scale, 0.1, 10.0), "cbf_scale", "a (low, high) range in [0.1, 10]")
        need(is_range(self.tmax_normal, 0.0, 6.0), "tmax_normal", "a range in [0, 6] s")
        need(is_range(self.arrival_time, 0.0, 30.0), "arrival_time", "a range in [0, 30] s")
        need(is_range(self.core_cbf, 0.0, 0.3) and self.core_cbf[1] < 0.3, "core_cbf",
             "a range below 0.3 (core: CBF < 30 % of normal)")
        need(is_range(self.core_cbv, 0.0, 1.0) and self.core_cbv[1] < 1.0, "core_cbv",
             "a range below 1 (core: CBV reduced)")
        need(is_range(self.core_tmax, 6.0, 60.0) and self.core_tmax[0] > 6.0, "core_tmax",
             "a range above 6 s")
        need(is_range(self.penumbra_cbf, 0.3, 1.0), "penumbra_cbf", "a range in [0.3, 1]")
        need(is_range(self.penumbra_cbv, 1.0, 3.0), "penumbra_cbv",
             "a range in [1, 3] (penumbra: CBV preserved or raised)")
        need(is_range(self.penumbra_tmax, 6.0, 60.0) and self.penumbra_tmax[0] > 6.0,
             "penumbra_tmax", "a range above 6 s (Tmax > 6 s defines hypoperfusion)")
        need(is_range(self.lvo_margin_mm, 1.0, 100.0), "lvo_margin_mm", "a range in [1, 100] mm")
        need(is_range(self.other_margin_mm, 1.0, 100.0), "other_margin_mm",
             "a range in [1, 100] mm")
        need(0.0 <= self.margin_variation < 1.0, "margin_variation", "in [0, 1)")
        need(0.0 <= self.noise <= 10.0, "noise", "in [0, 10]")
        need(0.0 <= self.noise_correlation <= 5.0, "noise_correlation", "in [0, 5] pixels")
        need(self.field_mm > 0, "field_mm", "> 0 mm")
        need(self.nihss_sd >= 0 and self.nihss_base >= 0, "nihss_sd", ">= 0 (and nihss_base >= 0)")


# ============================================================================ synthesis
@dataclasses.dataclass
class _Patient:
    """One patient's slices as a (pseudo-)volume, whatever the source."""

    patient_id: str
    hu: np.ndarray  # (D, H, W)
    brain: np.ndarray  # (D, H, W) bool, parenchyma
    seed_core: np.ndarray  # (D, H, W) bool, the phantom's infarct
    intracranial: np.ndarray  # (D, H, W) bool
    territory: str
    keep: np.ndarray  # rows of the volume that become slices of the output
    slice_index: np.ndarray  # slice index of every row
    levels: np.ndarray  # level of every row ("" if unknown)
    spacing: tuple[float, float]
    thickness: float  # mm between rows; inf: rows are unrelated slices (2-D processing)
    out_thickness: float  # thickness reported in the output dataset (volumes in mL)
    side: str = "unknown"  # hemisphere of the lesion, when the source knows it


def _patients_from(source: Any) -> list[_Patient]:
    """Normalise a PhantomVolume, a list of them or an HU SliceDataset to :class:`_Patient`."""
    from .phantom import LABELS, PhantomVolume

    if isinstance(source, PhantomVolume):
        source = [source]
    if isinstance(source, SliceDataset):
        return _patients_from_dataset(source)
    if isinstance(source, (list, tuple)) and source and all(
            isinstance(v, PhantomVolume) for v in source):
        out = []
        for v in source:
            if v.lesion_type != "ischemic":
                raise DataError(
                    f"perfusion maps need ischemic patients; {v.patient_id} has a "
                    f"{v.lesion_type} lesion (use PhantomConfig(lesion_types=('ischemic',)))"
                )
            keep = v.selected if v.selected is not None else np.flatnonzero(v.lesion_area > 0)
            n = len(v.hu)
            intracranial = v.intracranial if v.intracranial is not None else v.brain
            out.append(_Patient(
                patient_id=v.patient_id, hu=v.hu, brain=v.brain.astype(bool),
                seed_core=v.labels == LABELS["ischemic"], intracranial=intracranial.astype(bool),
                territory=v.territory, keep=np.asarray(keep, np.int64),
                slice_index=np.arange(n), levels=np.asarray(v.levels).astype(str),
                spacing=tuple(v.spacing), thickness=float(v.slice_thickness),
                out_thickness=float(v.slice_thickness), side=v.side or "unknown",
            ))
        ids = [p.patient_id for p in out]
        if len(set(ids)) != len(ids):
            raise DataError(f"patient ids repeat: {ids}")
        return out
    raise ValueError(
        "synthesize_perfusion takes a PhantomVolume, a list of PhantomVolumes or an HU "
        f"SliceDataset. Received: {type(source).__name__}"
    )


def _patients_from_dataset(data: SliceDataset) -> list[_Patient]:
    """Slices in HU grouped by patient; brain from thresholds (each slice processed in 2-D)."""
    from .preprocess import brain_mask

    if data.unit != "HU":
        raise DataError(
            f"perfusion synthesis needs slices in HU (unit='HU'); got unit={data.unit!r}"
        )
    if data.images.ndim != 3:
        raise DataError(f"expected grey slices (N, H, W); got images {data.images.shape}")
    if len(data) == 0:
        raise DataError("the dataset is empty")
    names = tuple(data.class_names)
    if "hemorrhagic" in names and "lesion_type" in data.extra:
        bad = sorted({str(t) for t in data.extra["lesion_type"]} - {"ischemic", "none"})
        if bad:
            raise DataError(
                f"perfusion maps need ischemic patients; the dataset has lesion types {bad}"
            )
    core_label = names.index("ischemic") if "ischemic" in names else None
    pids = data.patient_ids or [c.split("_")[0] for c in data.case_ids]
    spacing = tuple(data.spacing) if data.spacing is not None else (1.0, 1.0)
    thickness = float(data.slice_thickness) if data.slice_thickness else 5.0
    out = []
    for pid in dict.fromkeys(pids):
        rows = np.array([i for i, p in enumerate(pids) if p == pid])
        hu = data.images[rows]
        inside = np.stack([brain_mask(im, "HU") for im in hu])
        brain = inside & (hu > 15.0) & (hu < 80.0)
        masks = data.masks[rows]
        seed = masks == core_label if core_label is not None else masks > 0
        territories = [str(t) for t in data.extra.get("territory", np.array(["unknown"] * len(data)))[rows]
                       if str(t) != "none"]
        levels = data.extra.get("level", np.array([""] * len(data)))[rows].astype(str)
        out.append(_Patient(
            patient_id=str(pid), hu=hu, brain=brain, seed_core=seed & brain, intracranial=inside,
            territory=territories[0] if territories else "unknown",
            keep=np.arange(len(rows)), slice_index=data.slice_indices[rows], levels=levels,
            spacing=spacing, thickness=np.inf, out_thickness=thickness,
        ))
    return out


def _smooth_field(shape, sigma_px: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A smooth Gaussian random field with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px,
                                    mode="reflect")
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _hemisphere(brain: np.ndarray) -> np.ndarray:
    """Signed side of every in-plane pixel with respect to the brain's long (midline) axis.

    The phantom's heads are rotated by up to 15 degrees, so the midline is found as the principal
    (antero-posterior, longest) axis of the brain pixels rather than the image's centre column.
    """
    h, w = brain.shape[1:]
    rows, cols = np.nonzero(brain.any(axis=0))
    rr, cc = np.mgrid[0:h, 0:w].astype(np.float32)
    if len(rows) < 3:
        return cc - (w - 1) / 2.0
    pts = np.stack([rows, cols], axis=1).astype(np.float64)
    centre = pts.mean(axis=0)
    cov = np.cov((pts - centre).T)
    vals, vecs = np.linalg.eigh(cov)
    axis = vecs[:, int(np.argmax(vals))]  # (row, col) direction of the midline
    return ((rr - centre[0]) * axis[1] - (cc - centre[1]) * axis[0]).astype(np.float32)


def _patient_rng(seed: int, patient_id: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(patient_id.encode())]))


def _synthesize_patient(p: _Patient, config: PerfusionConfig, seed: int) -> dict[str, Any]:
    """Maps (physical units), labels and scores of one patient's kept slices."""
    rng = _patient_rng(seed, p.patient_id)
    # Patient-level draws, always in this order, so that a config change elsewhere does not
    # reshuffle them.
    u = rng.uniform(size=12)

    def draw(rng_pair, k):
        return rng_pair[0] + (rng_pair[1] - rng_pair[0]) * u[k]

    lvo = p.territory in config.lvo_territories
    margin = draw(config.lvo_margin_mm if lvo else config.other_margin_mm, 0)
    cbf_scale = draw(config.cbf_scale, 1)
    tmax0 = draw(config.tmax_normal, 2)
    arrival = draw(config.arrival_time, 3)
    core_cbf = draw(config.core_cbf, 4)
    core_cbv = draw(config.core_cbv, 5)
    core_tmax = draw(config.core_tmax, 6)
    nihss_noise = rng.standard_normal()

    sp = float(p.spacing[0])
    shape = p.hu.shape
    three_d = np.isfinite(p.thickness)
    sampling = (p.thickness if three_d else 1e6, sp, float(p.spacing[1]))
    sigma = (config.field_mm / p.thickness if three_d else 0.0,
             config.field_mm / sp, config.field_mm / float(p.spacing[1]))
    f_margin = np.clip(_smooth_field(shape, sigma, rng), -1.5, 1.5)
    f_tissue = np.clip(_smooth_field(shape, sigma, rng), -2.0, 2.0)

    brain, seed_core = p.brain, p.seed_core & p.brain
    side = _hemisphere(brain)
    core_side = float(np.sign(np.broadcast_to(side, shape)[seed_core].sum())) if seed_core.any() else 0.0
    ipsi = (side * core_side > 0)[None] if core_side else np.zeros((1,) + shape[1:], bool)

    # The hypoperfused region: brain of the core's hemisphere within a (wavy) margin of the core.
    if seed_core.any():
        dist = ndimage.distance_transform_edt(~seed_core, sampling=sampling).astype(np.float32)
    else:
        dist = np.full(shape, np.inf, np.float32)
    # At least a pixel and a half, so that the penumbra surrounds the core at any image size.
    local = np.maximum(margin * (1.0 + config.margin_variation * f_margin), 1.5 * np.hypot(sp, sp))
    hypo = brain & ((ipsi & (dist <= local)) | seed_core)
    # The core stays strictly inside: core pixels touching unaffected brain become penumbra.
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = True
    outside = ndimage.binary_dilation(brain & ~hypo, structure=in_plane)
    core = seed_core & ~outside
    penumbra = hypo & ~core

    # Normal tissue: grey-matter fraction from the HU (before the infarct's hypodensity).
    hu_s = ndimage.gaussian_filter(p.hu.astype(np.float32), (0, 0.6, 0.6))
    grey = np.clip((hu_s - 29.0) / (40.0 - 29.0), 0.0, 1.0)
    ring = penumbra if penumbra.any() else brain
    grey[core] = float(grey[ring].mean()) if ring.any() else 0.5
    cbf_n = (config.cbf_white + (config.cbf_grey - config.cbf_white) * grey) * cbf_scale
    cbf_n *= 1.0 + 0.05 * f_tissue
    cbv_n = config.cbv_white + (config.cbv_grey - config.cbv_white) * grey

    rel_cbf = np.ones(shape, np.float32)
    rel_cbv = np.ones(shape, np.float32)
    tmax = np.clip(tmax0 + 0.25 * f_tissue, 0.0, 2.0).astype(np.float32)
    # Penumbra: graded from the core (worst) to the edge of the hypoperfused region.
    t = np.clip(dist / local, 0.0, 1.0)
    pc, pv, pt = config.penumbra_cbf, config.penumbra_cbv, config.penumbra_tmax
    rel_cbf = np.where(penumbra, pc[0] + (pc[1] - pc[0]) * t, rel_cbf)
    rel_cbv = np.where(penumbra, pv[1] - (pv[1] - pv[0]) * t, rel_cbv)
    tmax = np.where(penumbra, pt[1] - (pt[1] - pt[0]) * t, tmax)
    rel_cbf = np.where(core, np.clip(core_cbf + 0.02 * f_tissue, 0.03, 0.27), rel_cbf)
    rel_cbv = np.where(core, np.clip(core_cbv + 0.05 * f_tissue, 0.15, 0.9), rel_cbv)
    tmax = np.where(core, np.maximum(core_tmax + 0.5 * f_tissue, config.core_tmax[0]), tmax)

    cbf = cbf_n * rel_cbf
    cbv = cbv_n * rel_cbv
    mtt = 60.0 * cbv / np.maximum(cbf, 1e-3)  # central volume principle, in seconds
    ttp = arrival + tmax + 0.5 * mtt

    # MIP: the unenhanced CT, tissue enhancement with flow, and bright vessels in the CSF spaces,
    # thinned out downstream of the occlusion.
    vessel_field = _smooth_field(shape, (0.0, 1.0, 1.0), rng)
    csf = p.intracranial & ~brain
    feeding = ipsi & (dist <= 1.5 * local)
    vessels = csf * np.clip(vessel_field - 0.5, 0.0, 1.5) * 120.0 * np.where(feeding, 0.25, 1.0)
    mip = p.hu + np.where(brain, 0.3 * cbf, 0.0) + vessels

    maps = {"cbf": cbf, "cbv": cbv, "tmax": tmax, "ttp": ttp, "mip": mip}
    keep = p.keep
    out = {}
    for k, name in enumerate(MAP_NAMES):
        m = maps[name][keep].astype(np.float32)
        if config.noise > 0:
            noise = rng.standard_normal(m.shape).astype(np.float32)
            if config.noise_correlation > 0:
                s = config.noise_correlation
                noise = ndimage.gaussian_filter(noise, (0, s, s))
                noise /= max(float(noise.std()), 1e-6)
            m = m + np.float32(config.noise * MAP_NOISE[name]) * noise
        if name != "mip":
            # Perfusion software masks everything but the brain.
            m = np.where(brain[keep], np.maximum(m, 0.0), 0.0).astype(np.float32)
        out[name] = m
    labels = np.zeros(shape, np.uint8)
    labels[brain] = BRAIN
    labels[penumbra] = PENUMBRA
    labels[core] = CORE

    voxel_ml = sp * float(p.spacing[1]) * p.out_thickness / 1000.0
    core_ml = float(core.sum()) * voxel_ml
    penumbra_ml = float(penumbra.sum()) * voxel_ml
    nihss = (config.nihss_base + config.nihss_per_core_ml * core_ml
             + config.nihss_per_penumbra_ml * penumbra_ml + config.nihss_sd * nihss_noise)
    return {
        "maps": out,
        "labels": labels[keep],
        "occlusion": "LVO" if lvo else "other",
        "core_ml": core_ml,
        "penumbra_ml": penumbra_ml,
        "nihss": float(np.clip(np.round(nihss), 0, NIHSS_MAX)),
        "margin_mm": float(margin),
    }


def normalize_maps(maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Stack physical maps into channels in [0, 1] using :data:`MAP_RANGES`.

    Args:
        maps: map name → array (N, H, W) in physical units, for every name of :data:`MAP_NAMES`.

    Returns:
        float32 (N, H, W, len(MAP_NAMES)).
    """
    missing = [m for m in MAP_NAMES if m not in maps]
    if missing:
        raise ValueError(f"maps lacks {missing}; expected every one of {list(MAP_NAMES)}")
    channels = []
    for name in MAP_NAMES:
        lo, hi = MAP_RANGES[name]
        channels.append(np.clip((np.asarray(maps[name], np.float32) - lo) / (hi - lo), 0.0, 1.0))
    return np.stack(channels, axis=-1).astype(np.float32)


def to_physical(images: np.ndarray) -> dict[str, np.ndarray]:
    """Undo :func:`normalize_maps`: channel arrays (..., 5) in [0, 1] → physical maps by name."""
    images = np.asarray(images, np.float32)
    if images.shape[-1] != len(MAP_NAMES):
        raise ValueError(
            f"expected {len(MAP_NAMES)} channels {list(MAP_NAMES)} in the last axis; got shape "
            f"{images.shape}"
        )
    return {name: MAP_RANGES[name][0] + images[..., k] * (MAP_RANGES[name][1] - MAP_RANGES[name][0])
            for k, name in enumerate(MAP_NAMES)}


def synthesize_perfusion(
    volume_or_dataset: Any,
    config: PerfusionConfig = PerfusionConfig(),
    seed: int = 0,
    progress: bool = True,
) -> SliceDataset:
    """Perfusion maps, 4-class masks and clinical labels for the phantom's ischemic patients.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        volume_or_dataset: a :class:`strokekit.phantom.PhantomVolume` (its ``selected`` slices
            are kept; the geometry is worked out in 3-D over the whole volume), a list of them,
            or a SliceDataset in HU with ischemic lesion masks (each slice processed in 2-D, the
            brain found by thresholds; an ``extra["territory"]`` column sets the occlusion group).
        config: the map settings.
        seed: patient ``P`` draws from ``(seed, P)`` only, so adding patients changes no other.
        progress: show a progress bar over patients.

    Returns:
        A SliceDataset with images (N, H, W, 5) holding the channels of :data:`MAP_NAMES`
        normalised to [0, 1] by :data:`MAP_RANGES` (``unit="display"``; :func:`to_physical`
        undoes it), masks 0 background / 1 brain / 2 penumbra / 3 core, class names
        :data:`CLASS_NAMES`, and extra columns ``occlusion`` ("LVO"/"other"), ``nihss``,
        ``core_ml`` and ``penumbra_ml`` (per patient, whole volume), ``territory``, ``side``
        (the lesion's hemisphere from the phantom, "unknown" for datasets), ``margin_mm`` and
        ``level``.

    Raises:
        DataError: hemorrhagic patients, a dataset not in HU.
        ValueError: an input of another type.
    """
    from tqdm.auto import tqdm

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0. Received: seed={seed!r}")
    patients = _patients_from(volume_or_dataset)
    parts = []
    for p in tqdm(patients, desc="perfusion maps", disable=not progress):
        res = _synthesize_patient(p, config, int(seed))
        n = len(p.keep)
        width = max(2, len(str(int(p.slice_index.max()) if len(p.slice_index) else 0)))
        cols = {
            "occlusion": res["occlusion"], "nihss": res["nihss"], "core_ml": res["core_ml"],
            "penumbra_ml": res["penumbra_ml"], "territory": p.territory, "side": p.side,
            "margin_mm": res["margin_mm"],
        }
        extra = {k: np.full(n, v) for k, v in cols.items()}
        extra["level"] = p.levels[p.keep].astype(str)
        parts.append(SliceDataset(
            images=normalize_maps(res["maps"]),
            masks=res["labels"],
            case_ids=[f"{p.patient_id}_s{int(k):0{width}d}" for k in p.slice_index[p.keep]],
            patient_ids=[p.patient_id] * n,
            slice_indices=p.slice_index[p.keep],
            unit="display",
            class_names=CLASS_NAMES,
            spacing=tuple(p.spacing),
            slice_thickness=p.out_thickness,
            extra=extra,
        ))
    return concat(parts)


def perfusion_phantom(
    phantom_config: Any = None,
    config: PerfusionConfig = PerfusionConfig(),
    seed: int | None = None,
    progress: bool = True,
) -> SliceDataset:
    """Ischemic phantom patients with perfusion maps: :func:`synthesize_perfusion` over volumes.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        phantom_config: a :class:`strokekit.phantom.PhantomConfig`; its ``lesion_types`` are
            replaced by ``("ischemic",)`` (perfusion deficits come from infarcts).
        config: the map settings.
        seed: seed of the maps; defaults to the phantom's seed.
        progress: show a progress bar over patients.

    Returns:
        The dataset of :func:`synthesize_perfusion`, ``slices_per_patient`` slices per patient.
    """
    from tqdm.auto import tqdm

    from .phantom import PhantomConfig, make_volume

    phantom_config = phantom_config or PhantomConfig()
    phantom_config = dataclasses.replace(phantom_config, lesion_types=("ischemic",))
    volumes = [make_volume(k, phantom_config)
               for k in tqdm(range(phantom_config.n_patients), desc="phantom volumes",
                             disable=not progress)]
    return synthesize_perfusion(volumes, config, phantom_config.seed if seed is None else seed,
                                progress=False)


# ============================================================================ inspection
def map_statistics(dataset: SliceDataset):
    """Mean physical value of every map in each region: normal brain, penumbra, core.

    ``normal`` is all brain outside the hypoperfused region (both hemispheres). Useful to check
    the synthesis against the textbook rules (core CBF < 30 % of normal, penumbra Tmax > 6 s, ...).

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        dataset: from :func:`synthesize_perfusion`.

    Returns:
        pandas DataFrame indexed by region (``normal``, ``penumbra``, ``core``) with one column
        per map and ``pixels``.
    """
    import pandas as pd

    phys = to_physical(dataset.images)
    rows = {}
    for name, label in (("normal", BRAIN), ("penumbra", PENUMBRA), ("core", CORE)):
        region = dataset.masks == label
        row = {m: float(phys[m][region].mean()) if region.any() else float("nan") for m in MAP_NAMES}
        row["pixels"] = int(region.sum())
        rows[name] = row
    return pd.DataFrame(rows).T[[*MAP_NAMES, "pixels"]]


def patient_table(dataset: SliceDataset):
    """One row per patient (indexed by patient id): occlusion group, territory, core and
    penumbra volumes (mL), NIHSS. Introduced in notebooks/08_ctp_core_penumbra.ipynb."""
    frame = dataset.to_frame()
    cols = ["occlusion", "territory", "core_ml", "penumbra_ml", "nihss"]
    return frame.groupby("patient_id", sort=False)[cols].first()


def plot_maps(dataset: SliceDataset, index: int, cmap: str = "turbo"):
    """The five maps of one slice in physical units, and its core/penumbra mask.

    Args:
        dataset: from :func:`synthesize_perfusion`.
        index: slice position.
        cmap: colour map of the perfusion maps (the MIP is grey).

    Returns:
        matplotlib Figure.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if not -len(dataset) <= index < len(dataset):
        raise IndexError(f"index {index} out of range for {len(dataset)} slices")
    phys = to_physical(dataset.images[index])
    fig = Figure(figsize=(15, 3.2), layout="constrained")
    axes = fig.subplots(1, len(MAP_NAMES) + 1)
    for ax, name in zip(axes, MAP_NAMES):
        lo, hi = MAP_RANGES[name]
        if name == "tmax":
            lo, hi = 0.0, 14.0
        im = ax.imshow(phys[name], cmap="gray" if name == "mip" else cmap, vmin=lo, vmax=hi)
        ax.set_title(f"{name.upper()} ({MAP_UNITS[name]})", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, shrink=0.8)
    colours = ListedColormap(["black", "#555555", "#f2c94c", "#d62728"])
    axes[-1].imshow(dataset.masks[index], cmap=colours, vmin=0, vmax=3, interpolation="nearest")
    axes[-1].set_title("mask: brain / penumbra / core", fontsize=9)
    axes[-1].set_axis_off()
    extra = dataset.extra
    title = dataset.case_ids[index]
    if "occlusion" in extra:
        title += (f" · {extra['occlusion'][index]} ({extra['territory'][index]}) · "
                  f"NIHSS {extra['nihss'][index]:.0f}")
    fig.suptitle(title, fontsize=10)
    return fig


def threshold_segmentation(dataset: SliceDataset, core_cbf: float = 0.3, tmax: float = 6.0,
                           core_cbv: float = 1.0) -> np.ndarray:
    """The classical rule on the (noisy) maps: core = rCBF < 30 % and CBV reduced, penumbra = Tmax > 6 s.

    Relative CBF and CBV are taken against the median of the brain pixels with Tmax <= 6 s of
    the same slice (a stand-in for the contralateral hemisphere). This is what perfusion
    software does, and the baseline a network must beat.

    Args:
        dataset: from :func:`synthesize_perfusion`.
        core_cbf: relative CBF below which tissue is core.
        tmax: Tmax (s) above which tissue is hypoperfused.
        core_cbv: relative CBV below which tissue may be core.

    Returns:
        uint8 labels (N, H, W) with the classes of :data:`CLASS_NAMES`.
    """
    phys = to_physical(dataset.images)
    brain = (phys["cbf"] > 0) | (phys["cbv"] > 0) | (phys["tmax"] > 0)
    out = np.zeros(dataset.masks.shape, np.uint8)
    for i in range(len(dataset)):
        b = brain[i]
        hypo = b & (phys["tmax"][i] > tmax)
        normal = b & ~hypo
        ref = normal if normal.sum() >= 10 else b
        if not ref.any():
            continue
        rcbf = phys["cbf"][i] / max(float(np.median(phys["cbf"][i][ref])), 1e-6)
        rcbv = phys["cbv"][i] / max(float(np.median(phys["cbv"][i][ref])), 1e-6)
        out[i][b] = BRAIN
        out[i][hypo] = PENUMBRA
        out[i][hypo & (rcbf < core_cbf) & (rcbv < core_cbv)] = CORE
    return out


# ============================================================================ model side
def clinical_features(dataset: SliceDataset, column: str = "nihss", scale: float = NIHSS_MAX) -> np.ndarray:
    """The clinical input of the model: ``extra[column] / scale`` as (N, 1) float32."""
    if column not in dataset.extra:
        raise DataError(f"the dataset has no extra column {column!r}; columns: {sorted(dataset.extra)}")
    return (np.asarray(dataset.extra[column], np.float32) / np.float32(scale))[:, None]


def split_inputs(images: np.ndarray, input_names: Sequence[str] = MAP_NAMES,
                 clinical: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Channels (N, H, W, C) → the model's named inputs ``{name: (N, H, W, 1)}`` (+ clinical)."""
    images = _check_channels(images, input_names)
    out = {name: np.ascontiguousarray(images[..., k: k + 1]) for k, name in enumerate(input_names)}
    if clinical is not None:
        clinical = np.asarray(clinical, np.float32)
        if clinical.ndim == 1:
            clinical = clinical[:, None]
        if clinical.ndim != 2 or len(clinical) != len(images):
            raise ValueError(f"clinical must be (N,) or (N, F) with N = {len(images)}; got shape {clinical.shape}")
        out["clinical"] = clinical
    return out


def _check_channels(images, input_names: Sequence[str]) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != len(input_names):
        raise ValueError(
            f"images must be (N, H, W, {len(input_names)}), one channel per input name "
            f"{list(input_names)}; got shape {images.shape}"
        )
    return images


def _make_loader_class():
    from .augment import SegmentationLoader

    class MultiInputLoader(SegmentationLoader):
        """Batches for a multi-input model: each map its own named input, plus a clinical vector.

        A :class:`strokekit.augment.SegmentationLoader` over the stacked channels (shuffling,
        augmentation with the same geometry for every map and the mask, one-hot targets, epochs)
        whose batches are split into the model's named inputs (:func:`split_inputs`), so it works
        on every Keras backend.

        Args:
            images: (N, H, W, C), one channel per input name.
            masks: (N, H, W) integer labels.
            input_names: the model's input names, one per channel (default :data:`MAP_NAMES`).
            clinical: None, or (N,) / (N, F) clinical features fed as the input ``"clinical"``.
            batch_size, augment, shuffle, seed, num_classes: as for SegmentationLoader (use
                geometric augmentation only: intensity changes would break the maps' units).
            workers, use_multiprocessing, max_queue_size: as for ``keras.utils.PyDataset``.

        Yields (through ``loader[i]``):
            ({name: (B, H, W, 1), ..., "clinical": (B, F)}, y (B, H, W, K)).
        """

        def __init__(self, images, masks, input_names: Sequence[str] = MAP_NAMES,
                     clinical=None, batch_size: int = 8, augment=None, shuffle: bool = True,
                     seed: int = 0, num_classes: int = len(CLASS_NAMES), workers: int = 1,
                     use_multiprocessing: bool = False, max_queue_size: int = 8):
            names = tuple(str(n) for n in input_names)
            if len(set(names)) != len(names) or "clinical" in names:
                raise ValueError(f"input names must be distinct and not 'clinical'; got {list(names)}")
            images = _check_channels(images, names)
            # split_inputs checks the clinical rows (beside one pixel of each image: no copy of the images).
            self.clinical = split_inputs(images[:, :1, :1], names, clinical).get("clinical")
            self.input_names = names
            super().__init__(images, masks, batch_size=batch_size, augment=augment, shuffle=shuffle, seed=seed,
                             num_classes=num_classes, workers=workers, use_multiprocessing=use_multiprocessing,
                             max_queue_size=max_queue_size)

        def __getitem__(self, index: int):
            x, y = super().__getitem__(index)
            rows = None if self.clinical is None else self.clinical[self.batch_indices(index)]
            return split_inputs(x, self.input_names, rows), y

    MultiInputLoader.__module__ = __name__
    MultiInputLoader.__qualname__ = "MultiInputLoader"
    return MultiInputLoader


_LAZY: dict[str, Any] = {}


def __getattr__(name: str):
    # Keras is imported on first use of these names only, so `import strokekit.perfusion` (and
    # the synthesis) stays cheap.
    factory = {"MultiInputLoader": _make_loader_class, "WeightedFocalTverskyLoss": _make_loss_class}.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _LAZY:
        _LAZY[name] = factory()
    return _LAZY[name]


def _make_loss_class():
    import keras
    from keras import ops

    from .losses import FocalTverskyLoss, _safe_power

    @keras.saving.register_keras_serializable(package="strokekit")
    class WeightedFocalTverskyLoss(FocalTverskyLoss):
        """Focal Tversky loss per class, averaged over classes with class weights.

        ``sum_c w_c (1 - TI_c)^gamma / sum_c w_c``: with equal weights it is
        :class:`strokekit.losses.FocalTverskyLoss`; larger weights on the rare classes (core,
        penumbra) keep the large background and brain classes from dominating.

        Args:
            class_weights: one non-negative weight per output channel (None: all 1).
            alpha, beta, gamma, smooth, per_image, name, reduction, dtype: as
                :class:`strokekit.losses.FocalTverskyLoss`.
        """

        default_name = "weighted_focal_tversky_loss"

        def __init__(self, class_weights=None, **kwargs):
            super().__init__(**kwargs)
            if class_weights is not None:
                class_weights = [float(w) for w in class_weights]
                if not class_weights or min(class_weights) < 0 or sum(class_weights) <= 0:
                    raise ValueError(
                        "class_weights must be non-negative numbers, one per class, with a "
                        f"positive sum. Received: class_weights={class_weights!r}"
                    )
            self.class_weights = class_weights

        def call(self, y_true, y_pred):
            per_class = _safe_power(self._one_minus_ti(y_true, y_pred), self.gamma)
            if self.class_weights is None:
                return ops.mean(per_class, axis=-1)
            if per_class.shape[-1] is not None and per_class.shape[-1] != len(self.class_weights):
                raise ValueError(
                    f"{len(self.class_weights)} class weights for {per_class.shape[-1]} output "
                    "channels"
                )
            w = ops.convert_to_tensor(self.class_weights, dtype=per_class.dtype)
            return ops.sum(per_class * w, axis=-1) / ops.sum(w)

        def _extra_config(self):
            return {**super()._extra_config(), "class_weights": self.class_weights}

    WeightedFocalTverskyLoss.__module__ = __name__
    WeightedFocalTverskyLoss.__qualname__ = "WeightedFocalTverskyLoss"
    return WeightedFocalTverskyLoss


def weighted_focal_tversky_loss(class_weights=None, alpha: float = 0.7, beta: float = 0.3,
                                gamma: float = 0.75, smooth: float = 1.0, per_image: bool = False):
    """A :class:`WeightedFocalTverskyLoss` (focal Tversky with class weights).

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.
    """
    cls = __getattr__("WeightedFocalTverskyLoss")
    return cls(class_weights=class_weights, alpha=alpha, beta=beta, gamma=gamma, smooth=smooth,
               per_image=per_image)


@dataclasses.dataclass(frozen=True)
class PerfusionTrainConfig:
    """Everything that decides a core/penumbra training run. Variants by ``dataclasses.replace``.

    Attributes:
        filters: U-Net filters per level (the last is the bottleneck).
        activation: as in :func:`strokekit.models.unet`.
        dropout: dropout after the bottleneck.
        use_clinical: feed NIHSS (scaled to 0..1) as the extra input ``clinical``.
        alpha: focal Tversky weight of false negatives.
        beta: focal Tversky weight of false positives.
        gamma: focal Tversky exponent.
        class_weights: one weight per class of :data:`CLASS_NAMES` (None: all 1).
        learning_rate: Adam learning rate (from scratch, and while the encoder is frozen).
        lr_scale: factor on the learning rate whenever pretrained encoder blocks train.
        unfreeze_every: epochs between two unfreezing steps of the gradual schedule.
        batch_size: slices per batch.
        num_epochs: epochs of a run.
        augment: geometric augmentation (``strokekit.augment.AugmentConfig``) or None.
        seed: weights, shuffling and augmentation.
        workers: loader threads.
    """

    filters: tuple[int, ...] = (16, 32, 64, 128)
    activation: str = "relu"
    dropout: float = 0.0
    use_clinical: bool = True
    alpha: float = 0.7
    beta: float = 0.3
    gamma: float = 0.75
    class_weights: tuple[float, ...] | None = (0.2, 0.5, 1.5, 2.0)
    learning_rate: float = 1e-3
    lr_scale: float = 0.3
    unfreeze_every: int = 1
    batch_size: int = 8
    num_epochs: int = 20
    augment: Any = None
    seed: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", tuple(int(f) for f in self.filters))
        if self.class_weights is not None:
            object.__setattr__(self, "class_weights", tuple(float(w) for w in self.class_weights))
            if len(self.class_weights) != len(CLASS_NAMES) or min(self.class_weights) < 0:
                raise ValueError(
                    f"PerfusionTrainConfig.class_weights needs {len(CLASS_NAMES)} non-negative "
                    f"numbers, one per class {list(CLASS_NAMES)}; got {self.class_weights!r}"
                )
        if not self.learning_rate > 0:
            raise ValueError(f"PerfusionTrainConfig.learning_rate must be > 0; got {self.learning_rate!r}")
        if not 0 < self.lr_scale <= 1:
            raise ValueError(f"PerfusionTrainConfig.lr_scale must be in (0, 1]; got {self.lr_scale!r}")
        for name in ("num_epochs", "unfreeze_every", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"PerfusionTrainConfig.{name} must be an int >= 1; got {value!r}")


def build_perfusion_model(config: PerfusionTrainConfig, image_size: int, seed: int | None = None):
    """The multi-input U-Net: one input per map (early fusion), optionally the clinical input.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        config: filters, activation, dropout, ``use_clinical`` and (default) seed.
        image_size: side of the square maps.
        seed: weight initialisation seed; None uses ``config.seed``.

    Returns:
        An uncompiled ``keras.Model`` with inputs ``cbf``, ``cbv``, ``tmax``, ``ttp``, ``mip``
        (each (S, S, 1)) and ``clinical`` (1 value) when used, and a 4-class softmax head.
    """
    from .models import multi_input_unet

    return multi_input_unet(
        {name: (image_size, image_size, 1) for name in MAP_NAMES},
        num_classes=len(CLASS_NAMES),
        clinical_features=1 if config.use_clinical else 0,
        filters=config.filters,
        activation=config.activation,
        dropout=config.dropout,
        seed=config.seed if seed is None else seed,
    )


def copy_model(model):
    """A new model with the same architecture and a copy of the weights (one per fine-tuning run)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def make_schedule(schedule: Any, config: PerfusionTrainConfig):
    """A :class:`strokekit.transfer.FineTuneSchedule` from a name of :data:`SCHEDULES` (or as is).

    ``"scratch"`` trains everything at the full rate; the others are notebook 05's modes with
    the config's ``lr_scale`` and ``unfreeze_every``.
    """
    from .transfer import SCRATCH, FineTuneSchedule

    if isinstance(schedule, FineTuneSchedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"Expected one of {list(SCHEDULES)}. Received: schedule={schedule!r}")
    if schedule == "scratch":
        return SCRATCH
    # No batch norm in these models; keep_batchnorm_frozen would change nothing.
    return FineTuneSchedule(mode=schedule, unfreeze_every=int(config.unfreeze_every),
                            lr_scale=float(config.lr_scale), keep_batchnorm_frozen=True)


class ModelPool(engine.ModelPool):
    """Compiled copies of one architecture, reused across runs that share trainable blocks and loss
    (:class:`strokekit.engine.ModelPool`), and one shared copy for predictions.

    A schedule comparison (several schedules × seeds × phases) would otherwise compile dozens of
    times for only a handful of distinct settings; results are the same as compiling afresh.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.
    """

    def __init__(self):
        super().__init__()
        self._predictor = None

    def predict(self, model, inputs, batch_size: int = 8) -> np.ndarray:
        """``model.predict`` through one shared copy (one traced prediction step for all runs)."""
        import keras

        if self._predictor is None or [tuple(w.shape) for w in self._predictor.weights] != \
                [tuple(w.shape) for w in model.weights]:
            self._predictor = keras.models.clone_model(model)
        self._predictor.set_weights(model.get_weights())
        return np.asarray(self._predictor.predict(inputs, batch_size=batch_size, verbose=0))


@dataclasses.dataclass
class PerfusionRun:
    """What :func:`train_perfusion` returns."""

    model: Any
    history: Any  # pandas DataFrame, one row per epoch with its phase and trainable blocks
    schedule: str
    config: PerfusionTrainConfig
    run_dir: Path | None
    seconds: float
    best_epoch: int


def loss_and_metrics(config: PerfusionTrainConfig) -> tuple[Any, list]:
    """The class-weighted focal Tversky loss of a config, and the Dice of penumbra and core."""
    from .losses import DiceMetric

    return (weighted_focal_tversky_loss(config.class_weights, config.alpha, config.beta, config.gamma),
            [DiceMetric(class_id=PENUMBRA, name="dice_penumbra"), DiceMetric(class_id=CORE, name="dice_core")])


def loader_for(dataset: SliceDataset, config: PerfusionTrainConfig, training: bool):
    """A :class:`MultiInputLoader` over a perfusion dataset for a config (shuffled and
    augmented when ``training``)."""
    cls = __getattr__("MultiInputLoader")
    return cls(
        dataset.images, dataset.masks, MAP_NAMES,
        clinical=clinical_features(dataset) if config.use_clinical else None,
        batch_size=config.batch_size, augment=config.augment if training else None,
        shuffle=training, seed=config.seed, num_classes=len(CLASS_NAMES),
        workers=config.workers if training else 1,
    )


def train_perfusion(
    model,
    train_data: SliceDataset,
    val_data: SliceDataset,
    config: PerfusionTrainConfig,
    schedule: Any = "scratch",
    num_epochs: int | None = None,
    run_dir: str | os.PathLike | None = None,
    restore_best: bool = True,
    pool: ModelPool | None = None,
    overwrite: bool = False,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> PerfusionRun:
    """Train (or fine-tune) a multi-input model following a freezing schedule.

    The schedules are notebook 05's (:class:`strokekit.transfer.FineTuneSchedule`): each phase
    sets the encoder blocks' ``trainable`` flags as :func:`strokekit.transfer.fine_tune` does
    (:meth:`~strokekit.transfer.FineTuneSchedule.engine_phases`), recompiles (Keras fixes the
    trainable weights at compile time; Adam starts afresh at ``learning_rate * phase.lr_factor``)
    and trains its epochs, all through :func:`strokekit.engine.fit`. This function exists beside
    :func:`strokekit.transfer.fine_tune` because the perfusion model takes a dict of inputs
    (:class:`MultiInputLoader`) and a class-weighted focal Tversky loss.

    Introduced in notebooks/08_ctp_core_penumbra.ipynb.

    Args:
        model: from :func:`build_perfusion_model` (or :func:`copy_model` of a pretrained one);
            changed in place.
        train_data: training slices from :func:`synthesize_perfusion`.
        val_data: validation slices (best epoch).
        config: the training settings (seed, loss, learning rate, ...).
        schedule: a name of :data:`SCHEDULES` or a FineTuneSchedule.
        num_epochs: overrides ``config.num_epochs`` (e.g. for pretraining).
        run_dir: when given, a :class:`strokekit.runs.RunFolder` of kind ``"perfusion"``:
            ``config.json`` (with the schedule and epochs), ``history.csv`` and ``model.keras``
            (the weights returned, saved with the trainable flags of the last phase).
        restore_best: end with the weights of the epoch with the lowest validation loss.
        pool: a :class:`ModelPool` to reuse compiled copies across calls (much faster for many
            runs of one architecture); None compiles ``model`` itself.
        overwrite: replace a run already in ``run_dir``.
        resume: continue the interrupted run in ``run_dir`` (as :func:`strokekit.train.train`).
        callbacks: more Keras callbacks for every phase (their ``model`` is the one training it).

    Returns:
        :class:`PerfusionRun`; ``history`` has ``epoch``, ``phase``, ``trainable_blocks`` (joined
        by ``+``), ``trainable_params``, ``learning_rate`` and Keras' logs (``loss``, ``val_loss``,
        ``val_dice_core``, ...).

    Raises:
        DataError: empty training or validation data.
        FileExistsError: ``run_dir`` already holds a run and neither ``overwrite`` nor ``resume`` is set.
        ValueError: ``resume`` without a ``run_dir``.
    """
    from .config import seed_everything, to_dict
    from .runs import RunFolder
    from .train import check_run_inputs

    check_run_inputs(train_data, val_data, run_dir, resume)
    plan = make_schedule(schedule, config)
    name = schedule if isinstance(schedule, str) else plan.mode
    epochs = int(num_epochs or config.num_epochs)
    phases = plan.engine_phases(model, epochs, config.learning_rate)
    seed_everything(config.seed)
    loader = loader_for(train_data, config, training=True)
    val_loader = loader_for(val_data, config, training=False)
    run = None if run_dir is None else RunFolder.create(
        run_dir, "perfusion", {**to_dict(config), "schedule": name, "epochs": epochs}, overwrite=overwrite,
        resume=resume)
    fitted = engine.fit(model, loader, val_loader, phases, *loss_and_metrics(config), restore_best=restore_best,
                        run=run, resume=resume, progress=False, callbacks=callbacks, pool=pool,
                        desc=f"perfusion ({name})")
    for layer in model.layers:
        layer.trainable = True
    history = fitted.history.assign(trainable_blocks=fitted.history["trainable_blocks"].map("+".join))
    return PerfusionRun(model, history, name, config, run.folder if run else None, fitted.seconds, fitted.best_epoch)


def predict_labels(model, dataset: SliceDataset, use_clinical: bool | None = None,
                   batch_size: int = 8, pool: ModelPool | None = None) -> np.ndarray:
    """Arg-max labels (N, H, W) uint8 of a multi-input model on a perfusion dataset."""
    if use_clinical is None:
        use_clinical = "clinical" in [t.name for t in model.inputs] if hasattr(model, "inputs") else False
    inputs = split_inputs(dataset.images, MAP_NAMES,
                          clinical_features(dataset) if use_clinical else None)
    if pool is not None:
        prob = pool.predict(model, inputs, batch_size)
    else:
        prob = np.asarray(model.predict(inputs, batch_size=batch_size, verbose=0))
    return np.argmax(prob, axis=-1).astype(np.uint8)


def group_scores(dataset: SliceDataset, pred: np.ndarray, group_column: str = "occlusion"):
    """Per-class F1 (= Dice) of penumbra and core, pooled over the pixels of each group.

    Args:
        dataset: the evaluated slices (truth in ``masks``).
        pred: predicted labels (N, H, W).
        group_column: extra column that names the groups.

    Returns:
        pandas DataFrame, one row per group (occlusion groups in :data:`OCCLUSION_GROUPS` order,
        others in order of appearance): ``group``, ``core_f1``,
        ``penumbra_f1``, ``slices``, ``patients``.
    """
    import pandas as pd

    from .metrics import per_class_metrics

    pred = np.asarray(pred)
    if pred.shape != dataset.masks.shape:
        raise ValueError(f"pred shape {pred.shape} does not match masks {dataset.masks.shape}")
    if group_column not in dataset.extra:
        raise DataError(f"the dataset has no extra column {group_column!r}")
    groups = np.asarray(dataset.extra[group_column]).astype(str)
    present = list(dict.fromkeys(groups.tolist()))
    # Occlusion groups in their fixed order (LVO first), so tables and charts line up.
    order = [g for g in OCCLUSION_GROUPS if g in present] + [g for g in present if g not in OCCLUSION_GROUPS]
    rows = []
    for g in order:
        sel = groups == g
        table = per_class_metrics(dataset.masks[sel], pred[sel], len(CLASS_NAMES), CLASS_NAMES)
        by = table.set_index("class_name")["dice"]
        pids = np.asarray(dataset.patient_ids)[sel] if dataset.patient_ids else []
        rows.append({"group": g, "core_f1": float(by["core"]), "penumbra_f1": float(by["penumbra"]),
                     "slices": int(sel.sum()), "patients": len(set(pids))})
    return pd.DataFrame(rows)


def schedule_table(scores, by: Sequence[str] = ("schedule", "group")):
    """The study's table: rows schedule × group, columns core F1 and penumbra F1 as mean ± sd.

    Args:
        scores: one row per run and group with ``core_f1``, ``penumbra_f1``, ``seed`` and the
            ``by`` columns (e.g. several :func:`group_scores` tables with ``schedule`` and
            ``seed`` added).
        by: row keys.

    Returns:
        pandas DataFrame indexed by ``by`` with columns ``Core F1``, ``Penumbra F1`` (strings
        "mean ± sd"), ``core_mean``, ``penumbra_mean`` and ``seeds``.
    """
    missing = [c for c in (*by, "core_f1", "penumbra_f1") if c not in scores.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; columns are {list(scores.columns)}")
    grouped = scores.groupby(list(by), sort=False)
    mean, sd = grouped[["core_f1", "penumbra_f1"]].mean(), grouped[["core_f1", "penumbra_f1"]].std(ddof=1)
    sd = sd.fillna(0.0)
    out = mean.copy()
    out["Core F1"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean["core_f1"], sd["core_f1"])]
    out["Penumbra F1"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean["penumbra_f1"], sd["penumbra_f1"])]
    out = out.rename(columns={"core_f1": "core_mean", "penumbra_f1": "penumbra_mean"})
    out["seeds"] = grouped.size()
    return out[["Core F1", "Penumbra F1", "core_mean", "penumbra_mean", "seeds"]]
