"""Synthetic CT perfusion (CTP): parametric maps, core/penumbra masks and clinical scores from the phantom.

:func:`synthesize_perfusion` draws the maps that :mod:`strokekit.perfusion` describes (CBF, CBV,
Tmax, TTP, MIP) over the phantom's ischemic patients: the phantom's hypodense infarct becomes the
core and a margin around it in the same hemisphere (wide behind a large-vessel occlusion, narrow
behind a distal one) the penumbra. Masks have four classes: 0 background, 1 brain, 2 penumbra,
3 core. Each patient is in an occlusion group, ``"LVO"`` (large-vessel occlusion, here the MCA M1
segment: a large penumbra, often a small core) or ``"other"`` (ACA/PCA and distal occlusions:
smaller hypoperfusion), and has a synthetic NIHSS score that grows with the core and penumbra
volumes. :func:`perfusion_phantom` does it all from a :class:`strokekit.phantom.PhantomConfig`.

It is not a perfusion model: no arterial input function, deconvolution, delay correction or
motion; maps are drawn from region rules with smooth random variation and noise.

Introduced in notebooks/08_ctp_core_penumbra.ipynb.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

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
