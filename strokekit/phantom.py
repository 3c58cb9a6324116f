"""A deterministic synthetic non-contrast head-CT phantom in Hounsfield units, with lesion masks.

The phantom stands in for real scans on any machine: each synthetic patient is a 3-D volume from the
skull base to the vertex (scalp, skull with sinuses, mastoids and orbits at the base, grey matter as
a folded cortical ribbon, white matter, deep grey nuclei, CSF in sulci, fissures, cisterns and
ventricles) with one lesion: an ischemic infarct (hypodense, shaped as an arterial territory) or a
hemorrhage (hyperdense, with a hypodense edema halo that is not part of the mask). Axial slices are
labelled by level (``"skull_base"``, ``"ventricles"``, ``"vertex"``), the three groups that the
study found with VGG16 features and k-means.

Anatomy is modelled with approximate signed distance functions in a canonical head frame (mm) and
smooth random fields built from a few random plane waves, so a phantom at 64 px is a coarser picture
of the same head as at 256 px. Patient ``k`` depends only on ``(seed, k)``: the first three patients
are the same whether 3 or 12 are generated.

Label convention: 0 background, 1 hemorrhagic, 2 ischemic (red = hemorrhagic, green = ischemic in
overlays); binary datasets use 0/1 with class names ("background", "lesion").

It is not real anatomy or pathology: textures, partial volume, beam hardening and the variety of
real lesions are simplified.

:func:`phantom_source` draws a larger set of another lesion type to pretrain on (notebooks/05_transfer_learning.ipynb).

Introduced in notebooks/01_preprocessing.ipynb.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .dataset import SliceDataset, concat

#: Slice levels from the skull base up, as stored in the ``level`` column.
LEVELS: tuple[str, ...] = ("skull_base", "ventricles", "vertex")
#: Lesion types a phantom can draw from.
LESION_TYPES: tuple[str, ...] = ("ischemic", "hemorrhagic")
#: Territories (where the lesion sits) for each lesion type.
TERRITORIES: dict[str, tuple[str, ...]] = {
    "ischemic": ("MCA", "ACA", "PCA"),
    "hemorrhagic": ("deep", "lobar", "cerebellar"),
}
#: Label value of each lesion type in multiclass masks (0 is background).
LABELS: dict[str, int] = {"hemorrhagic": 1, "ischemic": 2}
MULTICLASS_NAMES: tuple[str, ...] = ("background", "hemorrhagic", "ischemic")
BINARY_NAMES: tuple[str, ...] = ("background", "lesion")

# Geometry of the canonical head, in mm. The volume spans HEAD_HEIGHT_MM from the foramen magnum to
# the vertex whatever the number of slices, so slice thickness = HEAD_HEIGHT_MM / n_slices.
HEAD_HEIGHT_MM = 120.0
# Pixel spacing at 256 px; other sizes keep the same field of view (230 mm).
SPACING_AT_256 = 0.9
# Normalised heights (0 = first slice, 1 = last) where the levels change.
_LEVEL_EDGES = (0.275, 0.68)
_BIG = np.float32(1e3)  # "far outside" for signed distances of absent structures


def tuple_fields(config, names) -> None:
    """Make fields of a frozen config tuples: from_dict and JSON give lists (a lone string becomes a
    1-tuple), and the config must stay hashable and comparable."""
    for name in names:
        value = getattr(config, name)
        object.__setattr__(config, name, (value,) if isinstance(value, str) else tuple(value))


def field_checker(config):
    """``need(ok, field, expected)``, which raises ``ValueError("<Config>.<field> must be <expected>;
    got <value>")`` unless ``ok``: the field checks of a config's ``__post_init__``."""

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{type(config).__name__}.{field} must be {expected}; got {getattr(config, field)!r}")

    return need


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    """What the phantom generates; every field is checked when the config is built.

    Attributes:
        n_patients: synthetic patients (volumes).
        slices_per_patient: lesion-bearing slices taken from each patient.
        empty_slices_per_patient: lesion-free slices taken from each patient (teaches absence).
        image_size: side of the square slices in pixels (field of view 230 mm).
        n_slices: depth of each volume, skull base to vertex (120 mm in all).
        lesion_types: lesion types drawn from, one per patient.
        multiclass: False for 0/1 masks; True for 0 / 1 hemorrhagic / 2 ischemic.
        lesion_size: range of the lesion radius in mm (the in-plane half-width); 12-30 mm is a
            territorial infarct or a large hematoma, the lesions a few-shot study can learn.
        ischemic_contrast: how many HU an infarct lies below the parenchyma (smaller is harder);
            14 HU lies in the 10-20 HU of an infarct core on non-contrast CT.
        hemorrhage_hu: range of the hemorrhage density in HU (65-85 HU: fresh blood, 25-45 HU
            above grey matter's ~40 HU).
        noise_sd: standard deviation of the image noise in HU.
        blur_sigma: in-plane Gaussian point-spread function, sigma in pixels.
        noise_correlation: sigma in pixels of the Gaussian that correlates the noise (0: white).
        seed: seed of the whole phantom; patient k depends only on (seed, k).
    """

    n_patients: int = 12
    slices_per_patient: int = 5
    empty_slices_per_patient: int = 0
    image_size: int = 256
    n_slices: int = 24
    lesion_types: tuple[str, ...] = ("ischemic", "hemorrhagic")
    multiclass: bool = False
    lesion_size: tuple[float, float] = (12.0, 30.0)
    ischemic_contrast: float = 14.0
    hemorrhage_hu: tuple[float, float] = (65.0, 85.0)
    noise_sd: float = 4.0
    blur_sigma: float = 0.7
    noise_correlation: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        tuple_fields(self, ("lesion_types", "lesion_size", "hemorrhage_hu"))
        need = field_checker(self)

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        need(is_int(self.n_patients) and self.n_patients >= 1, "n_patients", "an integer >= 1")
        need(is_int(self.n_slices) and self.n_slices >= 9, "n_slices",
             "an integer >= 9 so that every level has at least 3 slices")
        need(is_int(self.slices_per_patient) and 0 <= self.slices_per_patient <= self.n_slices // 2,
             "slices_per_patient", f"an integer in 0..n_slices // 2 = {self.n_slices // 2}")
        need(is_int(self.empty_slices_per_patient)
             and 0 <= self.empty_slices_per_patient <= self.n_slices // 3,
             "empty_slices_per_patient", f"an integer in 0..n_slices // 3 = {self.n_slices // 3}")
        need(self.slices_per_patient + self.empty_slices_per_patient >= 1, "slices_per_patient",
             ">= 1 (or empty_slices_per_patient >= 1) so that each patient gives a slice")
        need(is_int(self.image_size) and 32 <= self.image_size <= 2048, "image_size",
             "an integer in 32..2048")
        unknown = [t for t in self.lesion_types if t not in LESION_TYPES]
        if unknown or not self.lesion_types:
            raise ValueError(
                f"PhantomConfig.lesion_types: Expected a non-empty tuple of {list(LESION_TYPES)}. "
                f"Received: lesion_types={self.lesion_types!r}"
            )
        need(isinstance(self.multiclass, (bool, np.bool_)), "multiclass", "True or False")
        low_high = self.lesion_size
        need(len(low_high) == 2 and 1.0 <= low_high[0] <= low_high[1] <= 60.0, "lesion_size",
             "a (low, high) radius range in mm with 1 <= low <= high <= 60")
        need(0.0 < self.ischemic_contrast <= 40.0, "ischemic_contrast", "in (0, 40] HU")
        need(len(self.hemorrhage_hu) == 2
             and 20.0 <= self.hemorrhage_hu[0] <= self.hemorrhage_hu[1] <= 200.0,
             "hemorrhage_hu", "a (low, high) range in HU with 20 <= low <= high <= 200")
        need(0.0 <= self.noise_sd <= 100.0, "noise_sd", "in [0, 100] HU")
        need(0.0 <= self.blur_sigma <= 5.0, "blur_sigma", "in [0, 5] pixels")
        need(0.0 <= self.noise_correlation <= 5.0, "noise_correlation", "in [0, 5] pixels")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")

    @property
    def spacing(self) -> tuple[float, float]:
        """Pixel spacing (row, col) in mm: 0.9 mm at 256 px, same field of view at other sizes."""
        s = SPACING_AT_256 * 256.0 / self.image_size
        return (s, s)

    @property
    def slice_thickness(self) -> float:
        """Distance between slices in mm (5 mm for 24 slices)."""
        return HEAD_HEIGHT_MM / self.n_slices


@dataclasses.dataclass
class PhantomVolume:
    """One synthetic patient.

    Attributes:
        hu: (D, H, W) float32 Hounsfield units, slice 0 at the skull base.
        labels: (D, H, W) uint8, 0 background / 1 hemorrhagic / 2 ischemic.
        brain: (D, H, W) bool, brain parenchyma (grey and white matter, no CSF).
        levels: (D,) level of each slice, one of :data:`LEVELS`.
        patient_id: e.g. ``"P01"``.
        lesion_type: ``"ischemic"`` or ``"hemorrhagic"``.
        territory: ``"MCA"``, ``"ACA"``, ``"PCA"`` (ischemic) or ``"deep"``, ``"lobar"``,
            ``"cerebellar"`` (hemorrhagic).
        spacing: pixel spacing (row, col) in mm.
        slice_thickness: distance between slices in mm.
        intracranial: (D, H, W) bool, everything inside the inner table (brain and CSF).
        side: hemisphere of the lesion, ``"left"`` or ``"right"`` (patient's side; radiological
            display puts the patient's left on the image right).
        selected: the slices :func:`generate_phantom` takes from this patient (lesion slices
            spread over the lesion, then any empty ones), sorted.
    """

    hu: np.ndarray
    labels: np.ndarray
    brain: np.ndarray
    levels: np.ndarray
    patient_id: str
    lesion_type: str
    territory: str
    spacing: tuple[float, float]
    slice_thickness: float
    intracranial: np.ndarray | None = None
    side: str = ""
    selected: np.ndarray | None = None

    @property
    def lesion_area(self) -> np.ndarray:
        """Lesion pixels per slice."""
        return (self.labels > 0).reshape(len(self.labels), -1).sum(axis=1)


# --------------------------------------------------------------------------- small geometry helpers
def _rngs(seed: int, patient_index: int) -> list[np.random.Generator]:
    """Independent streams for anatomy, lesion, noise and slice picking of one patient.

    Separate streams keep the anatomy of patient k unchanged when only lesion or noise settings
    change, so a difficulty sweep compares like with like.
    """
    children = np.random.SeedSequence([int(seed), int(patient_index)]).spawn(4)
    return [np.random.default_rng(c) for c in children]


def _patient_id(index: int, n_patients: int | None = None) -> str:
    width = max(2, len(str(n_patients if n_patients else index + 1)))
    return f"P{index + 1:0{width}d}"


def _level_of(t: np.ndarray) -> np.ndarray:
    return np.asarray(LEVELS)[np.searchsorted(np.asarray(_LEVEL_EDGES), t, side="right")]


def _ellipse(X, Y, cx, cy, a, b, angle=0.0):
    """Normalised radius rho of an ellipse and 1/|grad rho| (mm), so (rho - f) / |grad rho| is the
    approximate signed distance to the ellipse scaled by f."""
    dx = X - np.float32(cx)
    dy = Y - np.float32(cy)
    if angle:
        c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    ua = dx / np.float32(a)
    vb = dy / np.float32(b)
    rho = np.sqrt(ua * ua + vb * vb)
    grad = np.sqrt((ua / np.float32(a)) ** 2 + (vb / np.float32(b)) ** 2)
    inv = np.where(grad > 1e-9, rho / np.maximum(grad, 1e-9), np.float32(min(a, b)))
    return rho, inv.astype(np.float32)


def _profile(t: np.ndarray, centre: float, half: float) -> np.ndarray:
    """Cross-section scale of an ellipsoid at heights t (0 outside it)."""
    return np.sqrt(np.clip(1.0 - ((t - centre) / half) ** 2, 0.0, None)).astype(np.float32)


def _supra_profile(t: np.ndarray) -> np.ndarray:
    """Scale of the supratentorial cross-section with height: widest at 0.42, small at the top."""
    return np.where(t >= 0.42, _profile(t, 0.42, 0.64), _profile(t, 0.42, 0.6)).astype(np.float32)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances (rounds the seam between compartments)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


class _Canvas:
    """Head-frame coordinates of the pixels of every slice of one patient."""

    def __init__(self, config: PhantomConfig, pose: dict, slices: np.ndarray | None = None):
        n = config.image_size
        index = np.arange(config.n_slices) if slices is None else np.asarray(slices, np.int64)
        self.D = len(index)
        self.sp = config.spacing[0]
        c = (n - 1) / 2.0
        coords = (np.arange(n, dtype=np.float32) - c) * np.float32(self.sp)
        xi = coords[None, :] - np.float32(pose["tx"])  # image mm, + = image right = patient left
        yi = -coords[:, None] - np.float32(pose["ty"])  # image mm, + = up = anterior
        cr, sr = math.cos(pose["rot"]), math.sin(pose["rot"])
        X = ((cr * xi + sr * yi) / (pose["scale"] * pose["aspect"])).astype(np.float32)
        Y = ((-sr * xi + cr * yi) / (pose["scale"] / pose["aspect"])).astype(np.float32)
        # Work only on the window that can hold the head (about half the image).
        inside = (np.abs(X) <= 96.0) & (Y >= -108.0) & (Y <= 100.0)
        rows = np.flatnonzero(inside.any(axis=1))
        cols = np.flatnonzero(inside.any(axis=0))
        if len(rows) == 0:
            rows = cols = np.arange(n)
        self.window = (slice(max(0, rows[0] - 2), min(n, rows[-1] + 3)),
                       slice(max(0, cols[0] - 2), min(n, cols[-1] + 3)))
        self.X, self.Y = X[self.window], Y[self.window]
        self.H, self.W = self.X.shape
        self.size = n
        self.sp_head = np.float32(self.sp / pose["scale"])  # mm of the canonical head per pixel
        self.t = ((index + 0.5) / config.n_slices + pose["shift"]).astype(np.float32)
        self.z = self.t * np.float32(HEAD_HEIGHT_MM)

    def paste(self, arr: np.ndarray, fill) -> np.ndarray:
        """A (D, size, size) array with ``arr`` (computed on the window) and ``fill`` around it."""
        full = np.full((arr.shape[0], self.size, self.size), fill, dtype=arr.dtype)
        full[(slice(None), *self.window)] = arr
        return full

    def slab(self, prof: np.ndarray) -> slice:
        idx = np.flatnonzero(prof > 0)
        return slice(0, 0) if len(idx) == 0 else slice(int(idx[0]), int(idx[-1]) + 1)

    def ellipsoid(self, cx, cy, a, b, tc, th, angle=0.0, scale=None):
        """(slab, signed distance on the slab) of an ellipsoid; scale replaces its profile."""
        prof = _profile(self.t, tc, th) if scale is None else np.asarray(scale, np.float32)
        sl = self.slab(prof)
        if sl.stop == sl.start:  # absent from these slices: an empty slab
            return sl, np.empty((0, self.H, self.W), np.float32)
        rho, inv = _ellipse(self.X, self.Y, cx, cy, a, b, angle)
        p = prof[sl][:, None, None]
        sdf = (rho[None] - p) * inv[None]
        sdf[np.broadcast_to(p <= 0, sdf.shape)] = _BIG
        return sl, sdf


class _Fields:
    """Smooth random fields (unit variance) made of random plane waves in the head frame.

    The head frame is an affine function of the pixel indices, so each wave factorises into a row
    part and a column part and a field costs one small matrix product per slice instead of a
    cosine per pixel and wave.
    """

    def __init__(self, canvas: _Canvas, rng: np.random.Generator):
        self.c = canvas
        self.rng = rng

    def _waves(self, n_waves, lam_xy, lam_z):
        rng = self.rng
        lam = rng.uniform(*lam_xy, n_waves)
        ang = rng.uniform(0.0, np.pi, n_waves)
        ku = (2 * np.pi / lam) * np.cos(ang)
        kv = (2 * np.pi / lam) * np.sin(ang)
        kz = (2 * np.pi / rng.uniform(*lam_z, n_waves)) * rng.choice([-1.0, 1.0], n_waves)
        phase = rng.uniform(0.0, 2 * np.pi, n_waves)
        return ku, kv, kz, phase

    @staticmethod
    def _separable(ku, kv, kz, phase, z, row0, drow, dcol, n_rows, n_cols):
        """sum_k sqrt(2/K) cos(ku U + kv V + kz z + phase) on a grid where (U, V) = row0 + i drow
        + j dcol; returns (len(z), n_rows, n_cols) float32.

        cos(A_i + B_j + e) = cos(A_i) cos(B_j + e) - sin(A_i) sin(B_j + e): the row factor is the
        same for every slice and the slice's phase e goes into the column factor.
        """
        a = ku * drow[0] + kv * drow[1]  # phase step per row
        b = ku * dcol[0] + kv * dcol[1]  # phase step per column
        c = ku * row0[0] + kv * row0[1]
        amp = math.sqrt(2.0 / len(ku))
        rows = np.arange(n_rows)[:, None] * a[None, :]  # (R, K)
        left = np.ascontiguousarray(np.concatenate([np.cos(rows), -np.sin(rows)], axis=1) * amp,
                                    dtype=np.float32)  # (R, 2K)
        cols = np.arange(n_cols)[None, :] * b[:, None]  # (K, C)
        cos_b, sin_b = np.cos(cols), np.sin(cols)
        out = np.empty((len(z), n_rows, n_cols), np.float32)
        # One product per slice, so that a slice comes out bit-identical whichever other slices
        # are rendered with it.
        for d in range(len(z)):
            e = (c + phase + z[d] * kz)[:, None]
            ce, se = np.cos(e), np.sin(e)
            right = np.concatenate([ce * cos_b - se * sin_b, se * cos_b + ce * sin_b])
            out[d] = left @ right.astype(np.float32)
        return out

    def make(self, n_waves, lam_xy, lam_z, rows):
        """Field on the slices ``rows`` (a slice object) in the head frame, shape (len, H, W)."""
        cv = self.c
        waves = self._waves(n_waves, lam_xy, lam_z)
        z = cv.z[rows].astype(np.float64)
        if len(z) == 0:
            return np.zeros((0, cv.H, cv.W), np.float32)
        X, Y = cv.X.astype(np.float64), cv.Y.astype(np.float64)
        row0 = (X[0, 0], Y[0, 0])
        drow = (X[1, 0] - X[0, 0], Y[1, 0] - Y[0, 0])
        dcol = (X[0, 1] - X[0, 0], Y[0, 1] - Y[0, 0])
        return self._separable(*waves, z, row0, drow, dcol, cv.H, cv.W)

    def make_polar(self, n_waves, lam_arc, lam_rad, lam_z, rows, phi, radial, radius):
        """Field in (arc length, radial) coordinates around the brain centre, periodic in angle.

        Computed on a 1 mm polar grid and interpolated bilinearly at the pixels, so that its zero
        lines (the sulci) run mostly across the cortex, as they appear in axial slices.
        """
        cv = self.c
        rng = self.rng
        circumference = 2 * np.pi * radius
        # Whole numbers of periods around the head: no seam at the posterior midline.
        n_per = np.round(circumference / rng.uniform(*lam_arc, n_waves))
        ku = 2 * np.pi * n_per / circumference * rng.choice([-1.0, 1.0], n_waves)
        kv = 2 * np.pi / rng.uniform(*lam_rad, n_waves) * rng.choice([-1.0, 1.0], n_waves)
        kz = (2 * np.pi / rng.uniform(*lam_z, n_waves)) * rng.choice([-1.0, 1.0], n_waves)
        phase = rng.uniform(0.0, 2 * np.pi, n_waves)
        z = cv.z[rows].astype(np.float64)
        if len(z) == 0:
            return np.zeros((0, cv.H, cv.W), np.float32)
        n_arc = math.ceil(circumference)
        step = circumference / n_arc
        r_max = float(np.max(radial)) + 2.0
        n_rad = math.ceil(r_max) + 2
        grid = self._separable(ku, kv, kz, phase, z, (-np.pi * radius, 0.0), (step, 0.0),
                               (0.0, 1.0), n_arc, n_rad)
        fa = ((phi + np.pi) * radius / step).ravel()
        fr = np.clip(radial.ravel(), 0.0, n_rad - 2.001)
        ia = np.floor(fa).astype(np.int64)
        ir = np.floor(fr).astype(np.int64)
        wa = (fa - ia).astype(np.float32)
        wr = (fr - ir).astype(np.float32)
        ia0 = ia % n_arc
        ia1 = (ia + 1) % n_arc
        flat = grid.reshape(len(z), -1)
        f00 = np.take(flat, ia0 * n_rad + ir, axis=1)
        f01 = np.take(flat, ia0 * n_rad + ir + 1, axis=1)
        f10 = np.take(flat, ia1 * n_rad + ir, axis=1)
        f11 = np.take(flat, ia1 * n_rad + ir + 1, axis=1)
        out = (f00 * (1 - wr) + f01 * wr) * (1 - wa) + (f10 * (1 - wr) + f11 * wr) * wa
        return out.reshape(len(z), cv.H, cv.W)


# --------------------------------------------------------------------------------- the anatomy
def _draw_anatomy(rng: np.random.Generator) -> dict:
    """Random anatomy and pose of one patient (all draws in a fixed order)."""
    a = {}
    a["pose"] = {
        "scale": rng.uniform(0.85, 1.10),
        "aspect": rng.uniform(0.94, 1.06),
        "rot": math.radians(rng.uniform(-15.0, 15.0)),
        "tx": rng.uniform(-6.0, 6.0),
        "ty": rng.uniform(-6.0, 6.0),
        "shift": rng.uniform(-0.02, 0.02),
    }
    a["shape"] = rng.normal(0.0, 0.012, 6)  # head outline harmonics 2..4 (cos, sin)
    a["ventricles"] = rng.uniform(0.8, 1.45)
    a["atrophy"] = rng.uniform(0.0, 1.0)
    a["skull"] = rng.uniform(5.0, 7.0)
    a["scalp"] = rng.uniform(4.0, 6.0)
    a["gm"] = rng.uniform(37.5, 42.5)
    a["wm"] = rng.uniform(26.0, 31.0)
    a["csf"] = rng.uniform(3.0, 10.0)
    a["soft"] = rng.uniform(36.0, 46.0)
    a["table"] = rng.uniform(1150.0, 1450.0)
    a["diploe"] = rng.uniform(450.0, 700.0)
    a["ribbon"] = rng.uniform(2.6, 3.6)
    return a


def _render_anatomy(canvas: _Canvas, a: dict, rng: np.random.Generator) -> dict:
    """Noise-free HU of the head without lesion, plus the masks the lesion needs."""
    cv = canvas
    D, H, W = cv.D, cv.H, cv.W
    X, Y, t = cv.X, cv.Y, cv.t
    f32 = np.float32
    fields = _Fields(cv, rng)
    atrophy = a["atrophy"]
    v = a["ventricles"]
    allrows = slice(0, D)
    shape3 = (D, H, W)

    # The skull's inner outline: an egg-shaped ellipse (narrower in front) that shrinks towards
    # the vertex. Above the floors of the anterior fossa (orbital roofs), the middle fossae
    # (temporal lobes) and the tentorium lies the supratentorial compartment; below the
    # tentorium and behind the petrous ridges, the posterior fossa. Both share the outline, so
    # only the tentorium separates the occipital lobes from the cerebellum.
    Xe = X / (1.0 - 0.06 * Y / 80.0)
    rho, inv = _ellipse(Xe, Y, 0.0, -4.0, 64.0, 80.0)
    phi = np.arctan2(X, Y + 4.0)  # 0 = anterior, +-pi = posterior midline
    h = a["shape"]
    wobble = 1.0 + sum(h[2 * i] * np.cos((i + 2) * phi) + h[2 * i + 1] * np.sin((i + 2) * phi)
                       for i in range(3))
    rho = (rho / wobble).astype(f32)
    prof_s = _supra_profile(t)
    s_sdf = (rho[None] - prof_s[:, None, None]) * inv[None]

    def gauss(x, y):
        return np.exp(-0.5 * (x * x + y * y))

    def below_sdf(height):
        """In-plane signed distance (mm) to where a floor of this height meets each slice,
        positive below it. Where the floor is flat the distance is large (tiny slope floor)."""
        gy, gx = np.gradient(height, cv.sp_head)
        slope = np.maximum(np.hypot(gx, gy), 2e-4).astype(f32)  # height per mm
        return (height[None] - t[:, None, None]) / slope[None]

    # The tentorium slopes down from the incisura towards the occipital bone.
    tent = (0.275 - 0.07 * np.clip((np.hypot(X, 0.8 * (Y + 5.0)) - 25.0) / 55.0, 0.0, 1.0)
            * np.clip(-(Y + 5.0) / 15.0, 0.0, 1.0)).astype(f32)  # continuous: no crease
    floor = (tent
             - 0.20 * (gauss((X - 38) / 16, (Y - 6) / 25) + gauss((X + 38) / 16, (Y - 6) / 25))
             - 0.07 * gauss(X / 20, (Y - 42) / 22)).astype(f32)
    plane = ((Y - 6.0 + 0.62 * np.abs(X)) / math.sqrt(1.0 + 0.62**2)).astype(f32)
    under_tent = below_sdf(tent)
    # Above the floor and, behind the petrous ridges, above the tentorium as well; low down the
    # ridges are a thick bony wall, higher up only the tentorium.
    ridge = np.interp(t, [0.0, 0.2, 0.235, 1.0], [4.0, 4.0, 0.0, 0.0]).astype(f32)
    np.maximum(s_sdf, below_sdf(floor), out=s_sdf)
    np.maximum(s_sdf, np.minimum(ridge[:, None, None] - plane[None], under_tent), out=s_sdf)

    # Posterior fossa: the same outline, narrowing at the foramen magnum, below the tentorium,
    # behind the petrous ridges and clivus.
    prof_p = prof_s * np.where(t < 0.17, _profile(t, 0.17, 0.19), 1.0).astype(f32)
    p_sl = cv.slab(prof_p * (t < 0.3))
    p_sdf = (rho[None] - prof_p[p_sl, None, None]) * inv[None]
    np.maximum(p_sdf, plane[None], out=p_sdf)
    np.maximum(p_sdf, -under_tent[p_sl], out=p_sdf)
    tentorium = np.zeros(shape3, bool)
    tentorium[p_sl] = (np.abs(under_tent[p_sl]) < 0.6) & (plane < 0)[None]
    del under_tent
    cavity = s_sdf.copy()
    cavity[p_sl] = _smin(s_sdf[p_sl], p_sdf, 2.0)
    in_p = np.zeros(shape3, bool)
    in_p[p_sl] = p_sdf < s_sdf[p_sl]

    # The suprasellar cistern belongs to the intracranial space too.
    sup_sl, sup = cv.ellipsoid(0.0, 12.0, 10.0, 8.0, 0.25, 0.045)
    cavity[sup_sl] = np.minimum(cavity[sup_sl], sup)

    intracranial = cavity < 0
    depth = -cavity  # mm below the inner table (negative outside)

    # ------------------------------------------------------------------ CSF spaces and cortex
    rim = f32(0.6 + 1.4 * atrophy)
    # Sulci: zero lines of a random field in (arc length, radius) coordinates, so that most run
    # from the surface inwards; depth-limited and lined by the cortical ribbon.
    sulc_field = fields.make_polar(30, (13.0, 26.0), (25.0, 60.0), (25.0, 60.0), allrows,
                                   phi, rho * f32(65.0), 65.0)
    sulc_field += 0.6 * fields.make(16, (18.0, 36.0), (25.0, 60.0), allrows)  # less regular
    line = _line_distance(sulc_field, cv.sp_head)
    del sulc_field
    sulcal_depth = (9.0 + 7.0 * atrophy) * (1.0 + 0.3 * fields.make(8, (30.0, 60.0), (30.0, 60.0),
                                                                      allrows))
    w_sulcus = np.full(shape3, 0.3 + 0.6 * atrophy, f32)
    # Cerebellar folia: finer, shallower, thinner. (Every field is drawn even when its slab is
    # empty, so that the random stream, and thus each slice, is the same for any set of slices.)
    folia = _line_distance(fields.make(16, (6.0, 10.0), (10.0, 20.0), p_sl), cv.sp_head)
    ip = in_p[p_sl]
    line[p_sl] = np.where(ip, folia, line[p_sl])
    sulcal_depth[p_sl][ip] = 7.0
    w_sulcus[p_sl][ip] = 0.25
    sulcus = np.maximum(line - w_sulcus, depth - sulcal_depth)
    # No sulci near the centre, where the polar pattern would converge into spokes.
    core = (0.5 - rho[None] / np.maximum(prof_s, 0.05)[:, None, None]) * f32(40.0)
    core[in_p] = -_BIG
    np.maximum(sulcus, core, out=sulcus)
    del core
    del line, sulcal_depth, w_sulcus

    # Interhemispheric fissure: deep in front and behind, down to the corpus callosum at the
    # ventricle levels, the whole length at the vertex.
    w_fis = f32(0.8 + 1.2 * atrophy)
    reach = np.interp(t, [0.0, 0.60, 0.72, 1.0], [30.0, 30.0, 200.0, 200.0]).astype(f32)
    in_s = (s_sdf < 0) & ~in_p
    fissure = np.maximum((np.abs(X) - w_fis)[None], -s_sdf - reach[:, None, None])
    fissure[~in_s] = _BIG
    falx = (fissure < 0) & (np.abs(X) < 0.45)[None]

    # Sylvian fissures and insular cisterns at the lower ventricle levels.
    sylvian = np.full(shape3, _BIG, f32)
    prof_syl = _profile(t, 0.33, 0.09)
    for sgn in (-1.0, 1.0):
        for (cx, cy, aa, bb, ang) in ((50.0, 10.0, 15.0, 0.9 + 1.4 * atrophy, -sgn * 0.12),
                                      (36.5, 6.0, 0.7 + 1.0 * atrophy, 17.0, sgn * 0.08)):
            sl, d = cv.ellipsoid(sgn * cx, cy, aa, bb, 0, 0, ang, scale=prof_syl)
            np.minimum(sylvian[sl], d, out=sylvian[sl])
    sylvian += 1.2 * fields.make(10, (8.0, 20.0), (20.0, 40.0), allrows)  # ragged, not straight

    # Cortical ribbon: grey matter within a few mm of any CSF space except the ventricles.
    ribbon_field = fields.make(10, (15.0, 35.0), (30.0, 60.0), allrows)
    ribbon = f32(a["ribbon"]) * (1.0 + 0.25 * ribbon_field)
    ribbon[in_p] *= 1.5
    to_csf = np.minimum(np.minimum(depth - rim, sulcus), np.minimum(fissure, sylvian))
    csf_mask = to_csf < 0
    grey = to_csf < ribbon
    del to_csf, ribbon, ribbon_field

    # ------------------------------------------------------------------ ventricles and deep nuclei
    def add(mask_vol, cx, cy, aa, bb, tc, th, ang=0.0):
        sl, d = cv.ellipsoid(cx, cy, aa, bb, tc, th, ang)
        if mask_vol.dtype == bool:
            mask_vol[sl] |= d < 0
        else:  # a signed distance: union
            np.minimum(mask_vol[sl], d, out=mask_vol[sl])

    vent = np.zeros(shape3, bool)
    for sgn in (-1.0, 1.0):
        add(vent, sgn * (4.4 + 2.4 * v), 20.0, 4.0 * v, 12.0, 0.45, 0.11, -sgn * 0.42)  # frontal
        add(vent, sgn * (6.0 + 5.0 * v), -2.0, 3.8 * v, 24.0, 0.60, 0.085, -sgn * 0.08)  # bodies
        add(vent, sgn * (8.5 + 4.0 * v), -8.0, 2.4 * v, 14.0, 0.46, 0.07, sgn * 0.25)  # to atria
        add(vent, sgn * (14.0 + 6.0 * v), -26.0, 4.6 * v, 10.0, 0.45, 0.10, sgn * 0.45)  # atria
        add(vent, sgn * 31.0, 0.0, 2.0 * v, 7.0, 0.22, 0.06, sgn * 0.3)  # temporal horns
    add(vent, 0.0, -6.0, 1.1 + 1.0 * v, 11.0, 0.37, 0.07)  # third ventricle
    add(vent, 0.0, -24.0, 4.5 + v, 3.5, 0.14, 0.06)  # fourth ventricle

    deep = np.zeros(shape3, bool)
    for sgn in (-1.0, 1.0):
        add(deep, sgn * (11.0 + 5.0 * v), 19.0, 5.0, 8.5, 0.45, 0.09)  # caudate heads
        add(deep, sgn * 24.5, 1.0, 6.0, 15.0, 0.38, 0.08, -sgn * 0.35)  # lentiform nuclei
        add(deep, sgn * 10.5, -14.0, 8.5, 11.0, 0.38, 0.075)  # thalami

    # Brainstem (medulla, pons, midbrain) with its cisterns.
    bs_a = np.interp(t, [0.0, 0.10, 0.17, 0.25, 0.33, 0.36], [9, 12, 15, 13, 12, 0])
    bs_cy = np.interp(t, [0.0, 0.16, 0.36], [-16.0, -9.0, -9.0])
    stem = np.zeros(shape3, bool)
    cistern = np.zeros(shape3, bool)
    for k in np.flatnonzero(bs_a > 0):
        r, iv = _ellipse(X, Y, 0.0, bs_cy[k], bs_a[k], 0.85 * bs_a[k])
        sd = (r - 1.0) * iv
        stem[k] = sd < 0
        ring = (sd >= 0) & (sd < 1.2 + 2.0 * atrophy)
        if t[k] > 0.25:  # ambient and quadrigeminal cisterns wrap the midbrain from behind
            ring &= Y < bs_cy[k] + 3.0
        else:  # prepontine cistern in front of the pons
            ring &= Y > bs_cy[k] - 2.0
        cistern[k] = ring
    cistern[sup_sl] |= sup < 0
    csf_mask |= vent | cistern
    brain = intracranial & ~csf_mask & ~tentorium
    # Where a hematoma may spread: brain and the sulci, fissures and rim it would efface.
    fillable = intracranial & ~vent & ~cistern
    del vent, cistern, csf_mask

    # ------------------------------------------------------------------ skull, sinuses, scalp
    out = cavity  # > 0 outside the inner table
    skull_field = fields.make(10, (25.0, 60.0), (30.0, 80.0), allrows)
    thick = f32(a["skull"]) * (1.0 + 0.15 * skull_field)
    bone = (out > 0) & (out < thick)  # the vault, following the cavity

    # Skull base: clivus and sphenoid body, petrous ridges, ethmoid, maxilla, orbital rims and
    # mastoids, each a block of bone; cavities, sinuses and orbits are carved out afterwards.
    base_sdf = np.full(shape3, _BIG, f32)
    add(base_sdf, 0.0, 8.0, 20.0, 30.0, 0.12, 0.15)  # clivus and sphenoid body
    add(base_sdf, 0.0, 56.0, 15.0, 30.0, 0.10, 0.14)  # ethmoid and nasal bones
    add(base_sdf, 0.0, 44.0, 46.0, 32.0, -0.02, 0.12)  # maxilla
    for sgn in (-1.0, 1.0):
        add(base_sdf, sgn * 45.0, -18.0, 11.0, 13.0, 0.12, 0.085)  # mastoid processes
        add(base_sdf, sgn * 28.0, 58.0, 17.5, 23.5, 0.155, 0.085, sgn * 0.3)  # orbital walls
    petrous = ((np.abs(plane - 1.5) < 5.0) & (np.abs(X) > 8.0) & (np.abs(X) < 56.0))
    p_prof = _profile(t, 0.135, 0.085)
    base = base_sdf < 0
    psl = cv.slab(p_prof)
    within = (rho[None] - prof_s[psl, None, None]) * inv[None] < 5.0  # not beyond the skull
    base[psl] |= petrous[None] & within
    base &= ~intracranial
    bone |= base

    # Soft tissue: scalp over the vault (thicker over the temporal muscles), face and neck.
    temporalis = 6.0 * np.abs(np.sin(phi)) ** 6
    head_sdf = out - thick - f32(a["scalp"])
    head_sdf -= _profile(t, 0.22, 0.22)[:, None, None] * temporalis[None]
    np.minimum(head_sdf, base_sdf - 3.5, out=head_sdf)  # soft tissue over the facial bones
    add(head_sdf, 0.0, 18.0, 60.0, 72.0, 0.04, 0.24)  # face
    add(head_sdf, 0.0, -20.0, 64.0, 72.0, -0.02, 0.22)  # neck
    head = (head_sdf < 0) | bone
    del head_sdf, base_sdf

    hu = np.full(shape3, -1000.0, f32)
    hu[head] = a["soft"]
    fat = head & ~bone & (out - thick > 1.2) & (out - thick < 2.2) & (t > 0.2)[:, None, None]
    hu[fat] = -40.0
    low = t < 0.3
    deep_soft = head[low] & ~bone[low] & (out[low] > thick[low] + 9.0)  # muscles of face and neck
    hu[low] = np.where(deep_soft, f32(a["soft"] + 8.0), hu[low])

    # Vault: dense inner and outer tables around the lighter diploe; skull base: thick and
    # irregular, denser along the petrous ridges.
    q = np.clip(out / thick, 0.0, 1.0)
    bone_hu = f32(a["table"]) - f32(a["table"] - a["diploe"]) * np.exp(-(((q - 0.5) / 0.22) ** 2))
    bone_hu += 120.0 * skull_field
    del q, skull_field
    bsl = cv.slab(base.any(axis=(1, 2)).astype(f32))
    tex = fields.make(14, (6.0, 20.0), (10.0, 30.0), bsl)
    dense = (np.exp(-((plane / 6.0) ** 2)) * (np.abs(X) > 8) * (Y < 10)).astype(f32)
    base_hu = 850.0 + 260.0 * tex + 650.0 * dense[None]
    bone_hu[bsl] = np.where(base[bsl] & (out[bsl] > thick[bsl]), base_hu, bone_hu[bsl])
    np.copyto(hu, np.clip(bone_hu, 300.0, 1900.0), where=bone)
    del bone_hu, thick

    # Air spaces (never inside the intracranial space).
    air = np.zeros(shape3, bool)
    add(air, 0.0, 58.0, 8.5, 22.0, 0.10, 0.12)  # nasal cavity and ethmoid cells
    add(air, 0.0, 22.0, 12.0, 10.0, 0.15, 0.065)  # sphenoid sinus
    add(air, 0.0, 30.0, 13.0, 8.0, 0.0, 0.07)  # nasopharynx
    for sgn in (-1.0, 1.0):
        add(air, sgn * 26.0, 48.0, 14.0, 16.0, -0.01, 0.10)  # maxillary sinuses
    air &= ~(np.abs(X) < 0.9)[None]  # nasal septum
    mast = np.zeros(shape3, bool)
    for sgn in (-1.0, 1.0):
        add(mast, sgn * 45.5, -18.0, 8.5, 10.5, 0.12, 0.075)
    msl = cv.slab(mast.any(axis=(1, 2)).astype(f32))
    cells = fields.make(12, (4.0, 7.0), (6.0, 12.0), msl)
    mast[msl] &= cells > -0.3  # honeycomb of air cells with thin bony septa
    air |= mast
    air &= ~intracranial
    hu[air] = -1000.0
    del air, mast

    orbit = np.zeros(shape3, bool)
    globe = np.zeros(shape3, bool)
    lens = np.zeros(shape3, bool)
    for sgn in (-1.0, 1.0):
        add(orbit, sgn * 28.0, 58.0, 14.0, 20.0, 0.155, 0.08, sgn * 0.3)
        add(globe, sgn * 30.0, 66.0, 11.5, 11.5, 0.155, 0.07)
        add(lens, sgn * 30.0, 76.5, 4.0, 1.4, 0.155, 0.03)
    orbit &= ~intracranial
    hu[orbit] = -90.0
    hu[globe & ~intracranial] = 12.0
    hu[lens & ~intracranial] = 85.0
    del orbit, globe, lens

    # ------------------------------------------------------------------ intracranial contents
    tissue = np.where(grey, f32(a["gm"]), f32(a["wm"]))
    tissue[deep] = a["gm"] - 2.0
    tissue[stem] = a["wm"] + 3.0
    tissue += 0.8 * fields.make(6, (80.0, 160.0), (80.0, 200.0), allrows)
    np.copyto(hu, f32(a["csf"]), where=intracranial)
    np.copyto(hu, tissue, where=brain)
    hu[falx] = 70.0
    hu[tentorium & intracranial] = 50.0
    return {
        "hu": hu,
        "brain": brain,
        "intracranial": intracranial,
        "in_s": in_s,
        "fillable": fillable,
    }


def _line_distance(field: np.ndarray, sp_head: float) -> np.ndarray:
    """Approximate distance (mm) to the zero lines of a smooth field, |f| / |grad f|."""
    gy, gx = np.gradient(field, axis=(1, 2))
    grad = np.sqrt(gx * gx + gy * gy) + np.float32(1e-6)
    return (np.abs(field) / grad * sp_head).astype(np.float32)


# --------------------------------------------------------------------------------- the lesion
def _ray_to_surface(cx, cy, ox, oy, scale):
    """Distance from (cx, cy) along (ox, oy) to the supratentorial ellipse at a given scale."""
    a, b, ey = 64.0 * scale, 80.0 * scale, -4.0
    dy = cy - ey
    qa = (ox / a) ** 2 + (oy / b) ** 2
    qb = 2 * (cx * ox / a**2 + dy * oy / b**2)
    qc = (cx / a) ** 2 + (dy / b) ** 2 - 1.0
    return (-qb + math.sqrt(max(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)


def _draw_lesion(rng: np.random.Generator, config: PhantomConfig, patient_index: int) -> dict:
    """Type, territory, side, size and position of the lesion of one patient."""
    kind = config.lesion_types[int(rng.integers(len(config.lesion_types)))]
    # The lesion straddles a level boundary (or sits in the level) chosen by patient index, so any
    # three consecutive patients have lesion slices at all three levels.
    target = LEVELS[patient_index % 3]
    side = float(rng.choice([-1.0, 1.0]))
    r = float(rng.uniform(*config.lesion_size))
    u = rng.uniform(size=8)

    def near(edge: float) -> float:
        return edge + (u[0] - 0.5) * 0.08

    # Inside the ventricle level but close to one of its edges, so that it reaches a neighbour.
    mid = 0.345 + 0.02 * u[0] if u[2] < 0.5 else 0.595 + 0.02 * u[0]
    les = {"type": kind, "side": side, "r": r, "u": u}
    if kind == "ischemic":
        if target == "skull_base":  # only the temporal lobes reach below the tentorium
            terr = "MCA"
        elif target == "ventricles":
            terr = ("MCA", "PCA", "ACA")[int(u[1] * 2.999) if u[1] < 0.8 else 2]
        else:
            terr = "MCA" if u[1] < 0.5 else "ACA"
        if terr == "MCA":
            les["t0"] = {"skull_base": near(0.28), "ventricles": mid, "vertex": near(0.68)}[target]
            les["phi"] = math.radians(-35.0 + 80.0 * u[3])
        elif terr == "PCA":
            les["t0"] = 0.56 + 0.04 * u[2]  # the occipital lobe up to the parieto-occipital level
            les["phi"] = math.radians(5.0 + 30.0 * u[3])
        else:
            les["t0"] = {"ventricles": 0.60 + 0.03 * u[2]}.get(target, near(0.70))
            les["y0"] = 10.0 + 40.0 * u[3]
    else:
        if target == "skull_base":
            terr = "deep" if u[1] < 0.6 else "cerebellar"
        elif target == "ventricles":
            terr = "deep" if u[1] < 0.6 else "lobar"
        else:
            terr = "lobar"
        if terr == "deep":
            les["t0"] = near(0.29) if target == "skull_base" else 0.33 + 0.04 * u[2]
            thal = u[3] < 0.4
            les["centre"] = (side * (11.0 if thal else 24.0) + 3 * (u[4] - 0.5),
                             (-13.0 if thal else 1.0) + 6 * (u[5] - 0.5))
        elif terr == "cerebellar":
            les["t0"] = 0.15 + 0.05 * u[2]
            les["centre"] = (side * (20.0 + 6.0 * u[4]), -44.0 + 8.0 * (u[5] - 0.5))
        else:
            les["t0"] = near(0.68) if target == "vertex" else mid
            les["phi"] = 2 * math.pi * u[3]
    les["territory"] = terr
    les["contrast"] = config.ischemic_contrast * rng.uniform(0.85, 1.15)
    les["hem_hu"] = rng.uniform(*config.hemorrhage_hu)
    les["edema"] = rng.uniform(5.0, 10.0)
    les["axes"] = rng.uniform(0.75, 1.15, 2)
    les["angle"] = rng.uniform(0.0, math.pi)
    return les


def _lesion_slab(t: np.ndarray, les: dict) -> np.ndarray:
    """Vertical profile of the lesion at heights t (0 where the lesion cannot reach)."""
    hz = les["hz"] / HEAD_HEIGHT_MM
    t0 = float(np.clip(les["t0"], hz * 0.3, 1.0 - hz * 0.3))
    return _profile(t, t0, hz)


def _lesion_region(canvas: _Canvas, anat: dict, les: dict, edge: np.ndarray):
    """(lesion mask before clipping to the brain, signed distance for hemorrhages or None)."""
    cv = canvas
    X, Y, t = cv.X, cv.Y, cv.t
    r, side, terr = les["r"], les["side"], les["territory"]
    hz = les["hz"] / HEAD_HEIGHT_MM
    t0 = float(np.clip(les["t0"], hz * 0.3, 1.0 - hz * 0.3))
    prof = _lesion_slab(t, les)
    if les["type"] == "ischemic":
        # A wedge (a cone in 3-D) whose base lies on the cortex and whose apex points inwards.
        scale = max(float(_supra_profile(np.array([t0]))[0]), 0.55)
        length = 1.5 * r + 10.0
        if terr == "ACA":
            ox, oy = -side, 0.0
            ax, ay = side * length, les["y0"]
        else:
            if terr == "MCA":
                cx, cy = side * 18.0, 0.0
                ox, oy = side * math.cos(les["phi"]), math.sin(les["phi"])
            else:  # PCA: occipital, from the posterior pole forwards
                cx, cy = side * 12.0, -10.0
                ox, oy = side * math.sin(les["phi"]), -math.cos(les["phi"])
            reach = _ray_to_surface(cx, cy, ox, oy, scale)
            length = min(length, reach - 2.0)
            ax, ay = cx + (reach - length) * ox, cy + (reach - length) * oy
        wx, wy = X - np.float32(ax), Y - np.float32(ay)
        along = wx * np.float32(ox) + wy * np.float32(oy)
        perp = np.abs(wx * np.float32(oy) - wy * np.float32(ox))
        tan_a = r / length
        region = (along[None] > 0) & (
            perp[None] < along[None] * np.float32(tan_a) * prof[:, None, None] + 2.5 * edge
        ) & (prof[:, None, None] > 0)
        region &= (side * X > 0.8)[None] & anat["in_s"]
        return region, None
    # Hemorrhage: an irregular ellipsoid.
    if terr == "lobar":
        scale = float(_supra_profile(np.array([t0]))[0])
        ox, oy = math.cos(les["phi"]), math.sin(les["phi"])
        reach = _ray_to_surface(0.0, -4.0, ox, oy, max(scale, 0.55))
        d = min(reach - r - 4.0 - 4.0 * les["u"][6], reach * 0.7)
        cx, cy = d * ox, -4.0 + d * oy
    else:
        cx, cy = les["centre"]
    ra, rb = r * les["axes"][0], r * les["axes"][1]
    rho, inv = _ellipse(X, Y, cx, cy, ra, rb, les["angle"])
    p = prof[:, None, None]
    sdf = np.where(p > 0, (rho[None] - p) * inv[None], _BIG) + np.float32(0.2 * r) * edge
    return sdf < 0, sdf.astype(np.float32)


# --------------------------------------------------------------------------------- planning
# The lesion geometry and the choice of slices come from a coarse pass at this size, so that they
# do not depend on image_size and so that generate_phantom renders only the slices it keeps.
_PLAN_SIZE = 64
# Area a slice's lesion must have at the coarse size to be counted as lesion-bearing (3 coarse
# pixels); at 256 px that is 60 px or more, well above the 20 px asked for.
_PLAN_MIN_MM2 = 3 * (SPACING_AT_256 * 256.0 / _PLAN_SIZE) ** 2


def _plan(patient_index: int, config: PhantomConfig) -> dict:
    """Random anatomy and lesion of one patient, the lesion's final size, and the slices to keep."""
    if not isinstance(patient_index, (int, np.integer)) or isinstance(patient_index, bool) \
            or patient_index < 0:
        raise ValueError(f"patient_index must be an integer >= 0; got {patient_index!r}")
    rng_anat, rng_lesion, _, rng_pick = _rngs(config.seed, patient_index)
    anatomy = _draw_anatomy(rng_anat)
    lesion = _draw_lesion(rng_lesion, config, patient_index)
    # Each rendering pass rebuilds its random fields from these seeds: same waves at any size.
    seeds = (int(rng_anat.integers(2**62)), int(rng_lesion.integers(2**62)))

    coarse = dataclasses.replace(config, image_size=_PLAN_SIZE)
    canvas = _Canvas(coarse, anatomy["pose"])
    anat = _render_anatomy(canvas, anatomy, np.random.default_rng(seeds[0]))
    edge = _lesion_edge(canvas, seeds[1])
    thickness = config.slice_thickness
    need = max(config.slices_per_patient, 1)
    px_mm2 = coarse.spacing[0] ** 2
    lesion["hz"] = max(lesion["r"], (need / 2.0 + 1.0) * thickness)
    for _ in range(80):
        region, _ = _lesion_region(canvas, anat, lesion, edge)
        area = _lesion_mask(region, anat, lesion).reshape(canvas.D, -1).sum(axis=1) * px_mm2
        eligible = np.flatnonzero(area >= _PLAN_MIN_MM2)
        if len(eligible) >= need:
            break
        # Too few slices: stretch the lesion vertically (a small lesion may still be tall) and,
        # once it is as tall as the brain, grow it in plane too.
        if lesion["hz"] < 0.6 * HEAD_HEIGHT_MM:
            lesion["hz"] += 0.5 * thickness
        else:
            lesion["r"] *= 1.15
    else:  # pragma: no cover - the geometry converges long before
        raise RuntimeError(f"could not place a lesion on {need} slices of patient {patient_index}")

    n_les = config.slices_per_patient
    chosen = eligible[np.round(np.linspace(0, len(eligible) - 1, n_les)).astype(int)]
    empty = np.zeros(0, np.int64)
    if config.empty_slices_per_patient:
        # Outside the lesion's vertical extent the mask is empty at any size; keep one slice of
        # margin, and prefer slices with a fair amount of brain.
        touched = np.flatnonzero(_lesion_slab(canvas.t, lesion) > 0)
        far = np.ones(canvas.D, bool)
        for k in touched:
            far[max(0, k - 1): k + 2] = False
        brain_area = anat["brain"].reshape(canvas.D, -1).sum(axis=1)
        candidates = np.flatnonzero(far & (brain_area >= 0.25 * brain_area.max()))
        if len(candidates) < config.empty_slices_per_patient:
            candidates = np.flatnonzero(_lesion_slab(canvas.t, lesion) == 0)
        if len(candidates) < config.empty_slices_per_patient:
            raise ValueError(
                f"patient {_patient_id(patient_index)} has {len(candidates)} lesion-free slices, "
                f"fewer than empty_slices_per_patient={config.empty_slices_per_patient}; lower it "
                "or raise n_slices"
            )
        empty = rng_pick.choice(candidates, size=config.empty_slices_per_patient, replace=False)
    selected = np.sort(np.concatenate([chosen.astype(np.int64), empty.astype(np.int64)]))
    return {"anatomy": anatomy, "lesion": lesion, "seeds": seeds, "selected": selected,
            "lesion_slices": chosen.astype(np.int64)}


def _lesion_mask(region: np.ndarray, anat: dict, les: dict) -> np.ndarray:
    """The labelled lesion: an infarct is brain tissue; a hematoma also fills the sulci it hides."""
    return region & (anat["fillable"] if les["type"] == "hemorrhagic" else anat["brain"])


def _lesion_edge(canvas: _Canvas, seed: int) -> np.ndarray:
    """Smooth field that roughens the lesion outline and its density."""
    return _Fields(canvas, np.random.default_rng(seed)).make(12, (12.0, 30.0), (20.0, 50.0),
                                                             slice(0, canvas.D))


def _render(plan: dict, config: PhantomConfig, patient_index: int, slices: np.ndarray) -> dict:
    """HU (blurred, with noise), labels and masks of the given slices of a planned patient."""
    slices = np.asarray(slices, np.int64)
    canvas = _Canvas(config, plan["anatomy"]["pose"], slices)
    anat = _render_anatomy(canvas, plan["anatomy"], np.random.default_rng(plan["seeds"][0]))
    edge = _lesion_edge(canvas, plan["seeds"][1])
    les = plan["lesion"]
    region, sdf = _lesion_region(canvas, anat, les, edge)
    brain = anat["brain"]
    mask = _lesion_mask(region, anat, les)
    if les["type"] == "hemorrhagic":
        brain = brain | mask  # the hematoma displaces the CSF it covers
    hu = anat["hu"]
    if les["type"] == "ischemic":
        drop = np.float32(les["contrast"]) * (1.0 + 0.12 * edge)
        hu -= np.where(mask, drop, np.float32(0.0))
    else:
        halo_w = 3.0 + 0.3 * les["r"]
        halo = brain & ~mask & (sdf >= 0) & (sdf < halo_w)
        hu[halo] -= (les["edema"] * (1.0 - sdf[halo] / halo_w) ** 0.5).astype(np.float32)
        np.copyto(hu, np.float32(les["hem_hu"]) + 3.0 * edge, where=mask)
    labels = np.zeros(hu.shape, np.uint8)
    labels[mask] = LABELS[les["type"]]
    hu = canvas.paste(hu, -1000.0)
    if config.blur_sigma > 0:
        hu = ndimage.gaussian_filter(hu, (0.0, config.blur_sigma, config.blur_sigma))
    if config.noise_sd > 0:
        hu += np.float32(config.noise_sd) * _noise(hu.shape, slices, config, patient_index)
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return {
        "hu": hu,
        "labels": canvas.paste(labels, 0),
        "brain": canvas.paste(brain, False),
        "intracranial": canvas.paste(anat["intracranial"], False),
        "levels": _level_of(canvas.t),
    }


def _noise(shape, slices, config: PhantomConfig, patient_index: int) -> np.ndarray:
    """Unit-variance, slightly correlated Gaussian noise; slice k has its own stream."""
    root = np.random.SeedSequence([int(config.seed), int(patient_index)])
    noise = np.empty(shape, np.float32)
    for i, k in enumerate(slices):
        ss = np.random.SeedSequence(root.entropy, spawn_key=(4, int(k)))
        noise[i] = np.random.default_rng(ss).standard_normal(shape[1:], dtype=np.float32)
    if config.noise_correlation > 0:
        s = config.noise_correlation
        noise = ndimage.gaussian_filter(noise, (0.0, s, s))
        noise *= np.float32(1.0 / _white_noise_gain(s))
    return noise


def _one_blas_thread():
    """Run the many thin matrix products on one BLAS thread: threaded OpenBLAS is several times
    slower for them, worst on a busy machine. Scoped: the previous limits come back on exit."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _white_noise_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after scipy's 2-D Gaussian filter of this sigma."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float((w**2).sum())  # separable kernel: sqrt((sum w^2)^2)


# --------------------------------------------------------------------------------- public API
def make_volume(patient_index: int, config: PhantomConfig = PhantomConfig()) -> PhantomVolume:
    """Generate the whole 3-D volume of one synthetic patient.

    Args:
        patient_index: 0-based index; the patient id is ``P{index + 1:02d}``. The volume depends
            only on ``(config.seed, patient_index)`` and the config, not on how many patients are
            made.
        config: the phantom settings.

    Returns:
        A :class:`PhantomVolume`. Its ``selected`` slices are the ones :func:`generate_phantom`
        takes (bit-identical): ``config.slices_per_patient`` lesion slices spread over the
        lesion's extent, each with a lesion of at least 20 px at 256 px, plus
        ``config.empty_slices_per_patient`` slices away from the lesion.

    Raises:
        ValueError: for a patient index that is not an integer >= 0.
    """
    with _one_blas_thread():
        plan = _plan(patient_index, config)
        out = _render(plan, config, patient_index, np.arange(config.n_slices))
    return _volume(patient_index, config, plan, out)


def _volume(patient_index: int, config: PhantomConfig, plan: dict, out: dict,
            n_patients: int | None = None) -> PhantomVolume:
    les = plan["lesion"]
    return PhantomVolume(
        hu=out["hu"],
        labels=out["labels"],
        brain=out["brain"],
        levels=out["levels"],
        patient_id=_patient_id(patient_index, n_patients),
        lesion_type=les["type"],
        territory=les["territory"],
        spacing=config.spacing,
        slice_thickness=config.slice_thickness,
        intracranial=out["intracranial"],
        side="left" if les["side"] > 0 else "right",
        selected=plan["selected"],
    )


def volume_to_dataset(volume: PhantomVolume, multiclass: bool = False) -> SliceDataset:
    """All slices of one patient as a :class:`SliceDataset` in HU.

    Args:
        volume: a volume from :func:`make_volume`.
        multiclass: keep labels 1 hemorrhagic / 2 ischemic; otherwise masks are 0/1.

    Returns:
        A dataset with case ids ``"P01_s00"`` ..., extra columns ``level``, ``lesion_type`` and
        ``territory`` (``"none"`` on slices without lesion).
    """
    n = len(volume.hu)
    return _to_dataset(volume.patient_id, volume, np.arange(n), np.arange(n), multiclass)


def _to_dataset(patient_id: str, volume: PhantomVolume, index: np.ndarray, rows: np.ndarray,
                multiclass: bool) -> SliceDataset:
    """Slices ``index`` (positions in the patient's volume) held at ``rows`` of the arrays."""
    labels = volume.labels[rows]
    masks = labels if multiclass else (labels > 0).astype(np.uint8)
    present = labels.reshape(len(rows), -1).any(axis=1)
    width = max(2, len(str(len(volume.levels) - 1)))
    n = len(index)
    return SliceDataset(
        images=volume.hu[rows],
        masks=masks,
        case_ids=[f"{patient_id}_s{k:0{width}d}" for k in index],
        patient_ids=[patient_id] * n,
        slice_indices=np.asarray(index, np.int64),
        source_paths=[""] * n,
        unit="HU",
        class_names=MULTICLASS_NAMES if multiclass else BINARY_NAMES,
        spacing=tuple(volume.spacing),
        slice_thickness=float(volume.slice_thickness),
        extra={
            "level": np.asarray(volume.levels)[index].astype(str),
            "lesion_type": np.where(present, volume.lesion_type, "none").astype(str),
            "territory": np.where(present, volume.territory, "none").astype(str),
        },
    )


def generate_phantom(
    config: PhantomConfig = PhantomConfig(), progress: bool = True
) -> SliceDataset:
    """The few-shot phantom set: ``slices_per_patient`` lesion slices (+ empty ones) per patient.

    Only the kept slices are rendered at full size, so this is much faster than building whole
    volumes; slice k of patient p equals ``make_volume(p, config).hu[k]`` exactly.

    Args:
        config: the phantom settings (:class:`PhantomConfig`).
        progress: show a progress bar over patients.

    Returns:
        A :class:`SliceDataset` in HU (``unit="HU"``) with case ids like ``"P01_s07"``, patient ids,
        slice indices, spacing, slice thickness and extra columns ``level``, ``lesion_type`` and
        ``territory`` (``"none"`` on empty slices). Masks are 0/1 (class names "background",
        "lesion") or, with ``config.multiclass``, 0 / 1 hemorrhagic / 2 ischemic.
    """
    from tqdm.auto import tqdm

    parts = []
    for k in tqdm(range(config.n_patients), desc="phantom patients", disable=not progress):
        with _one_blas_thread():
            plan = _plan(k, config)
            selected = plan["selected"]
            out = _render(plan, config, k, selected)
        # Levels of the whole volume, so that the dataset can index them by slice position.
        levels = np.empty(config.n_slices, dtype=object)
        levels[selected] = out["levels"]
        volume = _volume(k, config, plan, dict(out, levels=levels))
        lesion_rows = np.searchsorted(selected, plan["lesion_slices"])
        if not volume.labels[lesion_rows].reshape(len(lesion_rows), -1).any(axis=1).all():
            # Cannot happen with the margin the coarse plan keeps; a loud failure if it ever does.
            raise RuntimeError(f"a planned lesion slice of patient {k} came out empty")
        pid = _patient_id(k, config.n_patients)
        rows = np.arange(len(selected))
        parts.append(_to_dataset(pid, volume, selected, rows, config.multiclass))
    return concat(parts)


def level_counts(dataset: SliceDataset, lesion_only: bool = True) -> dict[str, int]:
    """Slices per level (lesion slices only by default), in :data:`LEVELS` order."""
    levels = np.asarray(dataset.extra["level"])
    if lesion_only:
        levels = levels[dataset.has_lesion()]
    return {name: int((levels == name).sum()) for name in LEVELS}


def describe(config: PhantomConfig) -> list[str]:
    """Lines that describe a phantom config in words (for notebook printouts)."""
    sp = config.spacing[0]
    size = (
        f"{config.n_patients} patients x ({config.slices_per_patient} lesion + "
        f"{config.empty_slices_per_patient} empty) slices of {config.image_size} px "
        f"({sp:.2f} mm pixels, {config.slice_thickness:.1f} mm slices)"
    )
    lesions = (
        f"lesions: {', '.join(config.lesion_types)}; radius {config.lesion_size[0]:g}-"
        f"{config.lesion_size[1]:g} mm; infarct -{config.ischemic_contrast:g} HU; "
        f"hemorrhage {config.hemorrhage_hu[0]:g}-{config.hemorrhage_hu[1]:g} HU"
    )
    image = (f"noise sd {config.noise_sd:g} HU, blur sigma {config.blur_sigma:g} px, "
             f"seed {config.seed}")
    return [size, lesions, image]


def phantom_source(
    n_patients: int = 40,
    lesion_types: Sequence[str] = ("hemorrhagic",),
    seed: int = 1000,
    image_size: int | None = None,
    slices_per_patient: int = 5,
    empty_slices_per_patient: int = 1,
    target=None,
    prefix: str = "S",
    progress: bool = True,
) -> SliceDataset:
    """A larger phantom set of another lesion type, to pretrain on (the "source task").

    The patients come from a different phantom seed than the target's and their ids carry
    another prefix (``"S01"``… instead of ``"P01"``…), so no source patient is a target
    patient and none can leak into a target split.

    Introduced in notebooks/05_transfer_learning.ipynb.

    Args:
        n_patients: synthetic source patients.
        lesion_types: lesion types drawn from (default hemorrhage, for an ischemic target).
        seed: the source phantom's seed; must differ from the target's.
        image_size: slice side in pixels; None takes the target's (else 128).
        slices_per_patient: lesion slices per patient.
        empty_slices_per_patient: lesion-free slices per patient.
        target: the target's :class:`strokekit.phantom.PhantomConfig`; the source copies its
            imaging settings (noise, blur, contrast, size) and must not share its seed.
        prefix: patient-id prefix, letters only, not ``"P"`` (the target's).
        progress: a progress bar over patients.

    Returns:
        A :class:`SliceDataset` (HU) with patient ids ``f"{prefix}01"``… and case ids
        ``f"{prefix}01_s07"``…

    Raises:
        ValueError: the target's seed, a bad prefix or bad phantom settings.
    """
    if not (isinstance(prefix, str) and prefix.isalpha() and prefix != "P"):
        raise ValueError(
            f"prefix must be letters other than 'P' (the target phantom's). Received: prefix={prefix!r}"
        )
    base = target if target is not None else PhantomConfig()
    if target is not None and int(seed) == int(target.seed):
        raise ValueError(
            f"the source phantom must use another seed than the target (seed={target.seed}): "
            "with the same seed patient k has the same anatomy in both sets. "
            f"Received: seed={seed!r}"
        )
    size = image_size if image_size is not None else (target.image_size if target is not None else 128)
    config = dataclasses.replace(
        base, n_patients=int(n_patients), lesion_types=tuple(lesion_types), seed=int(seed),
        image_size=int(size), slices_per_patient=int(slices_per_patient),
        empty_slices_per_patient=int(empty_slices_per_patient), multiclass=False,
    )
    data = generate_phantom(config, progress=progress)
    renamed = {p: f"{prefix}{i + 1:02d}" for i, p in enumerate(data.patients())}
    case_ids = []
    for case, patient in zip(data.case_ids, data.patient_ids):
        suffix = case[len(patient):] if case.startswith(patient) else f"_{case}"
        case_ids.append(renamed[patient] + suffix)
    return data.replace(case_ids=case_ids, patient_ids=[renamed[p] for p in data.patient_ids])
