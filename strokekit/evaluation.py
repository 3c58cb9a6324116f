"""Statistics and figures for comparing segmentation models honestly.

Introduced in notebooks/06_evaluation.ipynb.

Confidence intervals come from the bootstrap; because slices of one patient are correlated,
:func:`bootstrap_ci` can resample patients (a cluster bootstrap) instead of slices. Paired
comparisons use the Wilcoxon signed-rank test with an effect size. A probability threshold is
chosen on validation data with :func:`threshold_sweep` / :func:`choose_threshold` and only then
applied to the test set. The metric conventions (empty masks, NaN) are those of
:mod:`strokekit.metrics`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import DataError
from .metrics import as_binary, metrics_from_counts, per_patient_dice, slice_confusion

__all__ = [
    "ERROR_COLOURS",
    "ConfidenceInterval",
    "RUN_COLUMNS",
    "bootstrap_ci",
    "choose_threshold",
    "compare_patients",
    "error_overlay",
    "find_runs",
    "paired_comparison",
    "patient_dice_table",
    "per_patient_dice",
    "plot_error_overlays",
    "plot_metric_boxes",
    "plot_threshold_sweep",
    "specificity_illusion",
    "study_table",
    "threshold_sweep",
    "versus_baseline",
    "whole_scan_summary",
    "whole_scans",
]

#: Colours of the error overlay: true positive, false positive, false negative (RGB 0..255).
ERROR_COLOURS: dict[str, tuple[int, int, int]] = {
    "true positive": (255, 215, 0),  # yellow
    "false positive": (230, 25, 25),  # red
    "false negative": (30, 110, 255),  # blue
}


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


# --------------------------------------------------------------------------- bootstrap
class ConfidenceInterval(tuple):
    """``(estimate, low, high)`` — unpacks like a 3-tuple and carries the details as attributes.

    Attributes:
        estimate: the statistic on all (non-NaN) values.
        low: lower bound of the percentile interval.
        high: upper bound.
        ci: coverage, e.g. 0.95.
        n: number of values used.
        n_skipped: number of NaN values dropped before resampling.
        n_groups: number of groups (patients) resampled, or None for a row bootstrap.
        distribution: the ``n_boot`` bootstrap replicates.
    """

    def __new__(cls, estimate, low, high, **details):
        obj = super().__new__(cls, (float(estimate), float(low), float(high)))
        obj.estimate, obj.low, obj.high = obj
        for k, v in details.items():
            setattr(obj, k, v)
        return obj

    def __repr__(self) -> str:
        unit = (
            f"{self.n_groups} groups"
            if getattr(self, "n_groups", None)
            else f"{getattr(self, 'n', '?')} values"
        )
        return (
            f"ConfidenceInterval(estimate={self.estimate:.4g}, "
            f"{100 * getattr(self, 'ci', 0):.0f}% CI [{self.low:.4g}, {self.high:.4g}], "
            f"{unit}, {getattr(self, 'n_skipped', 0)} NaN skipped)"
        )


def bootstrap_ci(
    values: Any,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | np.random.Generator = 0,
    groups: Sequence[Any] | None = None,
) -> ConfidenceInterval:
    """Percentile bootstrap confidence interval of a statistic.

    NaN values (e.g. sensitivity of lesion-free slices) are dropped first, and counted in
    ``result.n_skipped``.

    Args:
        values: one value per row (slice or patient).
        statistic: function of a 1-D array returning a number.
        n_boot: number of bootstrap replicates.
        ci: coverage of the interval, in (0, 1).
        seed: an int or a ``numpy.random.Generator``; the same seed gives the same interval.
        groups: group (patient id) of each row. When given, whole groups are resampled with
            replacement (a cluster bootstrap) and the statistic is computed over all rows of the
            drawn groups — the honest choice when slices of one patient are correlated.

    Returns:
        a :class:`ConfidenceInterval` ``(estimate, low, high)``.

    Raises:
        ValueError: for an empty input, a bad ``ci``/``n_boot`` or groups of the wrong length.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie strictly between 0 and 1, got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if groups is not None:
        g = np.asarray([str(x) for x in groups], dtype=object)
        if len(g) != len(v):
            raise ValueError(f"{len(g)} group labels for {len(v)} values; expected one per value")
    keep = ~np.isnan(v)
    n_skipped = int((~keep).sum())
    v = v[keep]
    if v.size == 0:
        raise ValueError("no non-NaN values to bootstrap")
    rng = _rng(seed)
    estimate = float(statistic(v))
    boot = np.empty(n_boot, dtype=np.float64)
    if groups is None:
        n_groups = None
        for i in range(n_boot):
            boot[i] = statistic(v[rng.integers(0, v.size, v.size)])
    else:
        g = g[keep]
        _, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
        n_groups = len(members)
        for i in range(n_boot):
            drawn = rng.integers(0, n_groups, n_groups)
            boot[i] = statistic(v[np.concatenate([members[k] for k in drawn])])
    alpha = (1.0 - ci) / 2.0
    low, high = np.percentile(boot, [100 * alpha, 100 * (1 - alpha)])
    return ConfidenceInterval(
        estimate,
        low,
        high,
        ci=ci,
        n=int(v.size),
        n_skipped=n_skipped,
        n_groups=n_groups,
        distribution=boot,
    )


def paired_comparison(
    a: Any,
    b: Any,
    names: tuple[str, str] = ("A", "B"),
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int | np.random.Generator = 0,
) -> dict[str, Any]:
    """Compare two models evaluated on the same cases (slices or patients).

    Pairs with a NaN on either side are dropped (and counted). Differences are ``a − b``.

    Args:
        a: metric per case for the first model.
        b: metric per case for the second model, in the same case order.
        names: labels of the two models, kept in the result.
        n_boot: bootstrap replicates for the CI of the mean difference.
        ci: coverage of that interval.
        seed: seed of the bootstrap.

    Returns:
        dict with ``names``, ``n``, ``n_skipped``, ``mean_a``, ``mean_b``, ``mean_difference``,
        ``ci_low``, ``ci_high``, ``median_difference``, ``wilcoxon_statistic`` and ``p_value``
        (``scipy.stats.wilcoxon``, two-sided, zero differences dropped), ``rank_biserial``
        (matched-pairs rank-biserial correlation: (R+ − R−)/(R+ + R−), in −1..1, positive
        when ``a`` tends to be larger) and ``cohens_dz`` (mean difference / SD of differences).

    Raises:
        ValueError: if the lengths differ or fewer than two pairs remain.
    """
    from scipy import stats

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(
            f"{a.size} values for {names[0]} and {b.size} for {names[1]}; expected paired values"
        )
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        raise ValueError(f"need at least two complete pairs, got {a.size}")
    d = a - b
    boot = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=seed)
    nonzero = d[d != 0]
    if nonzero.size:
        res = stats.wilcoxon(a, b)
        w, pval = float(res.statistic), float(res.pvalue)
        ranks = stats.rankdata(np.abs(nonzero))
        r_plus, r_minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
        rank_biserial = float((r_plus - r_minus) / (r_plus + r_minus))
    else:
        # Identical results on every case: no evidence of a difference, no test to run.
        w, pval, rank_biserial = float("nan"), 1.0, 0.0
    sd = float(np.std(d, ddof=1))
    dz = (
        float(np.mean(d) / sd)
        if sd > 0
        else (0.0 if np.mean(d) == 0 else float("inf") * np.sign(np.mean(d)))
    )
    return {
        "names": tuple(names),
        "n": int(a.size),
        "n_skipped": int((~keep).sum()),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_difference": float(d.mean()),
        "ci_low": boot.low,
        "ci_high": boot.high,
        "median_difference": float(np.median(d)),
        "wilcoxon_statistic": w,
        "p_value": pval,
        "rank_biserial": rank_biserial,
        "cohens_dz": dz,
    }


def compare_patients(method: dict[str, float], baseline: dict[str, float], draws: int = 10000,
                     seed: int = 0) -> dict[str, float]:
    """Two methods patient by patient (e.g. :func:`strokekit.fewshot.patient_dice` of each): wins, a bootstrap interval.

    Two means over 32 patients can differ by less than their spread; the paired view asks on
    how many patients one method beats the other and how sure the mean difference is. The 95 %
    interval is a percentile bootstrap over patients (seeded): it shows how much the difference
    depends on which patients are in the test set, not on training seeds. (Seeded on its own, not
    like :func:`paired_comparison`, so the few-shot study's figures stay as they were.)

    Introduced in notebooks/10_what_generalizes.ipynb.

    Args:
        method: ``{patient_id: score}``.
        baseline: ``{patient_id: score}``; only patients in both are compared.
        draws: bootstrap resamples.
        seed: seed of the resampling.

    Returns:
        ``n`` (patients compared), ``wins`` (method higher), ``ties``, ``losses``,
        ``mean_difference`` (method − baseline), ``ci_low``, ``ci_high``.

    Raises:
        ValueError: no patient in common.
    """
    common = [p for p in method if p in baseline]
    if not common:
        raise ValueError("the two methods share no patient")
    diff = np.array([float(method[p]) - float(baseline[p]) for p in common])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 13]))
    boot = diff[rng.integers(0, len(diff), size=(int(draws), len(diff)))].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    ties = int((np.abs(diff) <= 1e-12).sum())
    wins = int((diff > 1e-12).sum())
    return dict(n=len(diff), wins=wins, ties=ties, losses=len(diff) - wins - ties,
                mean_difference=float(diff.mean()), ci_low=float(low), ci_high=float(high))


def patient_dice_table(slices, by: str = "model"):
    """Each model's Dice per patient from a per-slice table: a patient's pixels pooled (per seed),
    then averaged over the model's seeds.

    Introduced in notebooks/06_evaluation.ipynb.

    Args:
        slices: rows of :func:`strokekit.metrics.segmentation_report` with columns ``by``, ``seed``,
            ``patient_id`` and the confusion counts ``tp``, ``fp``, ``fn``, ``tn``.
        by: column naming the model.

    Returns:
        DataFrame, one row per patient (sorted), one column per model (in order of appearance).

    Raises:
        ValueError: a column missing.
    """
    import pandas as pd

    needed = (by, "seed", "patient_id", "tp", "fp", "fn", "tn")
    missing = [c for c in needed if c not in slices.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; columns are {list(slices.columns)}")
    counts = slices.groupby([by, "seed", "patient_id"])[["tp", "fp", "fn", "tn"]].sum()
    dice = pd.Series(metrics_from_counts(*counts.to_numpy().T)["dice"], index=counts.index)
    table = dice.groupby(level=[by, "patient_id"]).mean().unstack(by)  # mean over seeds
    return table[list(dict.fromkeys(slices[by]))]


def versus_baseline(dice_by_patient, models: Sequence[str], baseline: str, groups: Any = None):
    """Does each model beat the baseline on the mean of patients' Dice — on all patients and per group?

    A model chosen on validation patients of one kind (e.g. hemorrhages only) can lose to a simple
    baseline on another kind it was never judged on; splitting by ``groups`` (e.g. lesion type)
    shows it. A tie does not beat.

    Introduced in notebooks/06_evaluation.ipynb.

    Args:
        dice_by_patient: :func:`patient_dice_table` (patients × models).
        models: the models to judge.
        baseline: the baseline's column.
        groups: optional ``{patient: label}`` (dict or Series); patients without a label count in
            ``"all"`` only.

    Returns:
        DataFrame, per model ``"all"`` first and then each group (sorted): ``model``, ``patients``
        (``"all"`` or the label), ``n_patients``, ``dice``, ``baseline_dice``, ``difference``,
        ``beats``.

    Raises:
        ValueError: a model or the baseline not among the columns.
    """
    import pandas as pd

    for name in (*models, baseline):
        if name not in dice_by_patient.columns:
            raise ValueError(f"{name!r} is not a column; columns are {list(dice_by_patient.columns)}")
    labels = {} if groups is None else {p: str(g) for p, g in dict(groups).items() if p in dice_by_patient.index}
    subsets = [("all", list(dice_by_patient.index))]
    subsets += [(g, [p for p in dice_by_patient.index if labels.get(p) == g]) for g in sorted(set(labels.values()))]
    rows = []
    for model in models:
        for label, patients in subsets:
            dice = float(dice_by_patient.loc[patients, model].mean())
            base = float(dice_by_patient.loc[patients, baseline].mean())
            rows.append(dict(model=model, patients=label, n_patients=len(patients), dice=dice,
                             baseline_dice=base, difference=dice - base, beats=bool(dice > base)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- thresholds
def threshold_sweep(
    truth: Any,
    prob: Any,
    thresholds: Sequence[float] = np.linspace(0.05, 0.95, 19),
    patient_ids: Sequence[Any] | None = None,
    progress: bool = False,
):
    """Dice of a probability map at many thresholds, per patient or pooled.

    One pass over the data: each pixel's probability is binned between the sorted thresholds,
    so the cost hardly grows with the number of thresholds. A pixel is foreground at
    threshold ``t`` when ``prob >= t`` (as in :func:`strokekit.metrics.as_binary`).

    Args:
        truth: masks (N, H, W).
        prob: probabilities (N, H, W) or (N, H, W, 1).
        thresholds: cut-offs in (0, 1).
        patient_ids: patient of each slice: one row per patient and threshold (each patient's
            pixels pooled). Without them, one pooled row per threshold.
        progress: show a progress bar over slices.

    Returns:
        long pandas DataFrame with columns ``threshold``, ``patient_id`` (``"(pooled)"``
        without patient ids), ``tp``, ``fp``, ``fn`` and ``dice``.
    """
    import pandas as pd

    t = as_binary(truth)
    p = np.asarray(prob)
    if p.ndim == t.ndim + 1 and p.shape[-1] == 1:
        p = p[..., 0]
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"prob must be a float array of probabilities, got dtype {p.dtype}")
    if p.shape != t.shape or t.ndim < 2:
        raise ValueError(f"truth shape {t.shape} and prob shape {p.shape} must match as (N, H, W)")
    thr = np.sort(np.asarray(thresholds, dtype=np.float64).ravel())
    if thr.size == 0:
        raise ValueError("no thresholds given")
    n = len(t)
    if patient_ids is None:
        pid = np.zeros(n, dtype=np.int64)
        names = ["(pooled)"]
    else:
        ids = [str(x) for x in patient_ids]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} patient ids for {n} slices; expected one per slice")
        names_arr, pid = np.unique(np.asarray(ids, dtype=object), return_inverse=True)
        names = [str(x) for x in names_arr]
    k = thr.size
    thr_cast = thr.astype(p.dtype)  # compare in the probabilities' own precision
    # above[g, j] = pixels of group g whose probability passes exactly j thresholds.
    above_pos = np.zeros((len(names), k + 1), dtype=np.int64)
    above_neg = np.zeros((len(names), k + 1), dtype=np.int64)
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="threshold sweep", leave=False)
    for i in it:
        bins = np.searchsorted(thr_cast, p[i].ravel(), side="right")
        m = t[i].ravel()
        above_pos[pid[i]] += np.bincount(bins[m], minlength=k + 1)
        above_neg[pid[i]] += np.bincount(bins[~m], minlength=k + 1)
    # Pixels with prob >= thr[j] are those passing more than j thresholds.
    tp = np.cumsum(above_pos[:, ::-1], axis=1)[:, ::-1][:, 1:]
    fp = np.cumsum(above_neg[:, ::-1], axis=1)[:, ::-1][:, 1:]
    fn = above_pos.sum(axis=1, keepdims=True) - tp
    dice = metrics_from_counts(tp, fp, fn, np.zeros_like(tp))["dice"]
    rows = {
        "threshold": np.repeat(thr[None, :], len(names), axis=0).ravel(),
        "patient_id": np.repeat(np.asarray(names, dtype=object), k),
        "tp": tp.ravel(),
        "fp": fp.ravel(),
        "fn": fn.ravel(),
        "dice": dice.ravel(),
    }
    return (
        pd.DataFrame(rows)
        .sort_values(["threshold", "patient_id"], kind="stable")
        .reset_index(drop=True)
    )


def _sweep_curve(sweep, metric: str):
    if metric not in sweep.columns or "threshold" not in sweep.columns:
        raise ValueError(
            f"expected a threshold_sweep table with columns 'threshold' and {metric!r}, "
            f"got {list(sweep.columns)}"
        )
    return sweep.groupby("threshold")[metric].mean()  # pandas skips NaN


def choose_threshold(sweep, metric: str = "dice") -> float:
    """The threshold with the best mean metric (over patients, or the pooled row).

    Choose it on validation data and apply it unchanged to the test set. Ties go to the
    threshold closest to 0.5.

    Args:
        sweep: a table from :func:`threshold_sweep`.
        metric: column to maximise.

    Returns:
        the chosen threshold.
    """
    curve = _sweep_curve(sweep, metric)
    if curve.isna().all():
        raise ValueError(f"all {metric} values in the sweep are NaN")
    best = curve.max()
    ties = curve.index[np.isclose(curve.to_numpy(), best, rtol=0, atol=1e-12)].to_numpy(
        dtype=np.float64
    )
    return float(ties[np.argmin(np.abs(ties - 0.5))])


def plot_threshold_sweep(sweep, chosen: float | None = None, metric: str = "dice"):
    """Metric against threshold: the mean curve, each patient faintly, the chosen threshold.

    Args:
        sweep: a table from :func:`threshold_sweep`.
        chosen: threshold to mark with a vertical line (e.g. :func:`choose_threshold`).
        metric: column to plot.

    Returns:
        matplotlib Figure with one axes.
    """
    from matplotlib.figure import Figure

    curve = _sweep_curve(sweep, metric)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    groups = sweep["patient_id"].unique() if "patient_id" in sweep.columns else []
    if len(groups) > 1:
        for _, g in sweep.groupby("patient_id"):
            ax.plot(g["threshold"], g[metric], color="0.6", lw=0.6, alpha=0.5)
        ax.plot([], [], color="0.6", lw=0.6, label="one patient")
    ax.plot(
        curve.index,
        curve.to_numpy(),
        color="C0",
        lw=2,
        marker="o",
        ms=3,
        label="mean over patients" if len(groups) > 1 else "pooled",
    )
    if chosen is not None:
        ax.axvline(chosen, color="C3", ls="--", label=f"chosen {chosen:.2f}")
    ax.set_xlabel("probability threshold")
    ax.set_ylabel(metric)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower center")
    ax.set_title(f"{metric} against threshold (choose on validation only)")
    return fig


# --------------------------------------------------------------------------- figures
def plot_metric_boxes(table, metric: str = "dice", by: str = "model", seed: int = 0, title: str | None = None):
    """Box plot per model with every case drawn as a jittered point on top.

    Args:
        table: long DataFrame with a ``by`` column and a ``metric`` column (e.g. several
            :func:`strokekit.metrics.segmentation_report` tables with a ``model`` column).
        metric: column to plot; NaN rows are skipped and counted in the tick labels.
        by: column naming the model (or any grouping).
        seed: seed of the horizontal jitter.
        title: the axes title (default ``"<metric> per case"``; say "per run" for a grid of seeds).

    Returns:
        matplotlib Figure with one axes.
    """
    from matplotlib.figure import Figure

    for col in (metric, by):
        if col not in table.columns:
            raise ValueError(f"column {col!r} not in the table; columns are {list(table.columns)}")
    rng = np.random.default_rng(seed)
    names = list(dict.fromkeys(table[by].tolist()))
    data, labels = [], []
    for name in names:
        v = table.loc[table[by] == name, metric].to_numpy(dtype=np.float64)
        finite = v[np.isfinite(v)]
        data.append(finite)
        skipped = v.size - finite.size
        labels.append(f"{name}\n(n={finite.size}" + (f", {skipped} skipped)" if skipped else ")"))
    fig = Figure(figsize=(1.6 + 1.4 * len(names), 4), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(data, showfliers=False, widths=0.5, medianprops={"color": "C3"})
    for i, v in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=8, alpha=0.5, color="C0", zorder=3)
    ax.set_xticks(range(1, len(names) + 1), labels)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per case")
    return fig


def error_overlay(image: Any, truth: Any, pred: Any, alpha: float = 0.6) -> np.ndarray:
    """RGB picture of one slice with TP, FP and FN pixels in the :data:`ERROR_COLOURS`.

    Args:
        image: grey slice (H, W) or (H, W, C) (channel 0 is shown); values outside [0, 1]
            are min-max scaled for display.
        truth: reference mask (H, W).
        pred: predicted mask or probabilities (H, W).
        alpha: opacity of the colours.

    Returns:
        uint8 array (H, W, 3).
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img[..., 0]
    t, p = as_binary(truth), as_binary(pred)
    if img.shape != t.shape or t.shape != p.shape:
        raise ValueError(
            f"image {img.shape}, truth {t.shape} and pred {p.shape} must share one (H, W) shape"
        )
    lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 1.0)
    if lo < 0 or hi > 1:
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    rgb = np.repeat(img[..., None], 3, axis=-1)
    for region, key in (
        (t & p, "true positive"),
        (~t & p, "false positive"),
        (t & ~p, "false negative"),
    ):
        colour = np.asarray(ERROR_COLOURS[key], dtype=np.float32) / 255.0
        rgb[region] = (1 - alpha) * rgb[region] + alpha * colour
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def plot_error_overlays(
    images: Any,
    truth: Any,
    pred: Any,
    case_ids: Sequence[Any] | None = None,
    which: Sequence[str] = ("best", "median", "worst"),
    values: Any = None,
    metric: str = "dice",
    threshold: float = 0.5,
    only_lesion_slices: bool = True,
):
    """Show chosen slices with true positives, false positives and false negatives coloured.

    Args:
        images: slices (N, H, W) or (N, H, W, C).
        truth: masks (N, H, W).
        pred: predicted masks or probabilities (N, H, W) or (N, H, W, 1).
        case_ids: id of each slice, shown in the titles and usable in ``which``.
        which: ``"best"``, ``"median"``, ``"worst"`` (by ``values``) or case ids.
        values: metric per slice used to rank slices; defaults to the per-slice Dice.
        metric: name of that metric for the titles.
        threshold: probability cut-off for float predictions.
        only_lesion_slices: rank only slices where the truth or the prediction is non-empty
            (otherwise "best" is just an empty slice with Dice 1).

    Returns:
        matplotlib Figure with one axes per entry of ``which`` and a colour legend.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    images = np.asarray(images)
    p = np.asarray(pred)
    if p.ndim == 4 and p.shape[-1] == 1:
        p = p[..., 0]
    p = as_binary(p, threshold)
    t = as_binary(truth)
    n = len(t)
    if p.shape != t.shape or len(images) != n:
        raise ValueError(
            f"images {images.shape}, truth {t.shape} and pred {p.shape} must have the same slices"
        )
    ids = [str(i) for i in range(n)] if case_ids is None else [str(c) for c in case_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} case ids for {n} slices")
    if values is None:
        values = metrics_from_counts(*slice_confusion(t, p).T)["dice"]
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n,):
        raise ValueError(f"values must hold one number per slice ({n}), got shape {values.shape}")
    pool = np.isfinite(values)
    if only_lesion_slices:
        pool &= (t | p).reshape(n, -1).any(axis=1)
    ranked = np.flatnonzero(pool)
    ranked = ranked[np.argsort(values[ranked], kind="stable")]
    chosen = []
    for w in which:
        if w in ("best", "median", "worst"):
            if ranked.size == 0:
                raise ValueError("no slice to rank: every value is NaN or every slice is empty")
            pos = {"worst": 0, "median": (ranked.size - 1) // 2, "best": ranked.size - 1}[w]
            chosen.append((w, int(ranked[pos])))
        elif str(w) in ids:
            chosen.append(("case", ids.index(str(w))))
        else:
            raise ValueError(
                f"Expected 'best', 'median', 'worst' or a case id. Received: which={w!r}"
            )
    fig = Figure(figsize=(3.2 * len(chosen), 3.6), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, (label, i) in zip(axes, chosen):
        ax.imshow(error_overlay(images[i], t[i], p[i]))
        head = "" if label == "case" else f"{label}: "
        ax.set_title(f"{head}case {ids[i]}\n{metric} = {values[i]:.3f}", fontsize=9)
        ax.set_axis_off()
    handles = [Patch(color=np.asarray(c) / 255.0, label=k) for k, c in ERROR_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    return fig


# --------------------------------------------------------------------------- study numbers
def specificity_illusion(truth: Any, pred: Any, threshold: float = 0.5) -> dict[str, float]:
    """Why a specificity of 0.9987 says little on CT: the numbers for the notebook's section.

    All counts are pooled over every pixel given.

    Args:
        truth: masks, any shape.
        pred: the model's masks or probabilities.
        threshold: probability cut-off.

    Returns:
        dict with ``background_fraction``; the ``specificity``, ``sensitivity`` and ``dice``
        of a useless all-background prediction (``all_background_*``) and of the given
        prediction (``model_*``); ``fp_budget_at_0999``: false-positive pixels a model may
        mark and still report specificity 0.999; and ``fp_budget_over_lesion_pixels``: that
        budget divided by the number of true lesion pixels (> 1 means a model could paint
        more false lesion than there is real lesion and still score 0.999).
    """
    t, p = as_binary(truth), as_binary(pred, threshold)
    if p.ndim == t.ndim + 1 and p.shape[-1] == 1:
        p = p[..., 0]
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} and pred shape {p.shape} differ")
    counts = slice_confusion(t.reshape(1, -1), p.reshape(1, -1))[0]
    tp, fp, fn, tn = (int(x) for x in counts)
    negatives, positives = tn + fp, tp + fn
    model = metrics_from_counts(tp, fp, fn, tn)
    empty = metrics_from_counts(0, 0, positives, negatives)
    budget = 0.001 * negatives
    return {
        "pixels": int(t.size),
        "lesion_pixels": positives,
        "background_fraction": negatives / t.size if t.size else float("nan"),
        "all_background_specificity": empty["specificity"],
        "all_background_sensitivity": empty["sensitivity"],
        "all_background_dice": empty["dice"],
        "model_specificity": model["specificity"],
        "model_sensitivity": model["sensitivity"],
        "model_dice": model["dice"],
        "fp_budget_at_0999": budget,
        "fp_budget_over_lesion_pixels": budget / positives if positives else float("inf"),
    }


_PRETTY = {
    "dice": "Dice",
    "iou": "IoU",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
}


def study_table(
    df, by: str = "model", metrics: Sequence[str] = ("iou", "sensitivity", "specificity")
):
    """The study's results table: one row per model, each metric as a mean over slices.

    NaN values (e.g. sensitivity of lesion-free slices) are skipped; ``n_slices`` counts all
    slices. Reproduce the study's format with this, then put it next to
    :func:`strokekit.metrics.aggregate` to see what the format hides.

    Args:
        df: per-slice table with a ``by`` column (several segmentation reports concatenated).
        by: column naming the model.
        metrics: metric columns to average, in order.

    Returns:
        pandas DataFrame indexed by model with columns ``IoU``, ``Sensitivity``,
        ``Specificity`` (or the chosen metrics) and ``n_slices``.
    """
    missing = [c for c in (by, *metrics) if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; columns are {list(df.columns)}")
    grouped = df.groupby(by, sort=False)
    out = grouped[list(metrics)].mean()  # pandas skips NaN
    out.columns = [_PRETTY.get(m, m) for m in metrics]
    out["n_slices"] = grouped.size()
    return out


# --------------------------------------------------------------------------- which runs to evaluate
#: Columns of :func:`find_runs`' table, in order.
RUN_COLUMNS: tuple[str, ...] = ("model", "seed", "source", "split_checked", "folder", "config", "saved_val_dice",
                                "mtime")
# "<label>-s<seed>" with an optional "-<date>-<time>[-<n>]" of train.make_run_dir → "<label>"
_SEED_SUFFIX = re.compile(r"-s\d+(-\d{8}-\d{6}(-\d+)?)?$")


def find_runs(
    root: str | os.PathLike,
    test_cases: Sequence[str],
    source: str = "",
    prefix: str = "",
    log: Callable[[str], Any] | None = None,
):
    """The finished binary runs under ``root`` that may be evaluated on a test set, one row per configuration
    and seed. Introduced in notebooks/06_evaluation.ipynb (step 2), whose markdown states the rules:

    1. a run is a finished binary run folder (:func:`strokekit.runs.list_runs`) with a readable
       ``config.json`` (a slice :class:`strokekit.config.TrainConfig` with one class) and a ``metrics.json``;
    2. a run that saved a ``split.json`` is kept only when that split's test cases are ``test_cases``
       (otherwise it may have trained on them); a run without one is kept with ``split_checked=False``;
    3. when a configuration and seed were trained more than once, the newest ``model.keras`` counts.

    Args:
        root: where to look, at any depth; a missing folder holds no runs.
        test_cases: the case ids of the test set.
        source: written into the ``source`` column (which notebook trained the runs).
        prefix: put before each model name (to tell apart runs of two notebooks with the same folder names).
        log: called with one line for each run folder left out, saying why (e.g. ``print``); None: silent.

    A run whose ``metrics.json`` or ``split.json`` is damaged is left out with a warning that names its
    folder and the problem (as :func:`strokekit.runs.list_runs` does for a damaged ``config.json``).

    Returns:
        pandas DataFrame with the columns :data:`RUN_COLUMNS`, sorted by model and seed: ``model`` is the
        run folder's path under ``root`` without its seed and time suffix, ``folder`` the run folder,
        ``config`` the TrainConfig, ``saved_val_dice`` the Dice of its ``metrics.json`` (NaN when absent),
        ``mtime`` the modification time of its ``model.keras``.
    """
    import pandas as pd

    from .runs import list_runs
    from .split import Split
    from .train import config_from_dict

    rows = []
    for run in list_runs(root, kind="binary"):
        folder = run.folder
        try:
            config = config_from_dict(run.config)
        except ValueError as err:  # a config this kit cannot read
            if log:
                log(f"skipped {folder.name}: {err}")
            continue
        try:
            saved = run.metrics
            split = None if run.split_path is None else Split.load(run.split_path)
        except DataError as err:  # a damaged metrics.json or split.json: say so, go on with the others
            warnings.warn(f"skipped the run in {folder}: {err.problem}", stacklevel=2)
            continue
        if not saved or config.num_classes != 1:
            if log:
                log(f"skipped {folder.name}: unfinished (no metrics.json) or not a binary model")
            continue
        checked = split is not None
        if checked and sorted(split.cases("test")) != sorted(test_cases):
            if log:
                log(f"skipped {folder.name}: trained on another split")
            continue
        rel = folder.relative_to(root)
        name = "/".join([*rel.parts[:-1], _SEED_SUFFIX.sub("", rel.name)])
        rows.append([f"{prefix}{name}", config.seed, source, checked, folder, config,
                     saved.get("dice", np.nan), run.model_path.stat().st_mtime])
    table = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    table = table.sort_values("mtime").drop_duplicates(["model", "seed"], keep="last")
    return table.sort_values(["model", "seed"]).reset_index(drop=True)


def whole_scans(fitted: Any, patients: Sequence[str | int], folder: str | os.PathLike | None = None,
                image_size: int | None = None, progress: bool = False) -> Any:
    """A fitted few-shot recipe on CT-ICH patients' whole scans (every slice, in order), as the app applies it
    (the app measures the floor at the upload's size; here it is measured at the model's, as
    :func:`strokekit.fewshot.predict_recipe` does, which is the same at the default ``image_size``).

    Each scan is read at ``image_size`` (default the recipe's), predicted with the whole recipe
    (:func:`strokekit.fewshot.predict_recipe`) and thresholded, and the recipe's brightness floor
    (:func:`strokekit.fewshot.keep_bright_components`) is applied to the same prediction. Volumes use
    CT-ICH's geometry (:func:`strokekit.recon3d.voxel_ml`). CT-ICH holds
    traumatic haemorrhage, not stroke.

    Returns:
        A pandas DataFrame, one row per patient: ``patient_id``, ``slices``, ``true_ml``, ``has_lesion``
        (from ``slices.csv``, so a bleed lost at a small ``image_size`` still counts), ``dice_3d`` and
        ``predicted_ml`` of the thresholded mask (``unfiltered_*``) and after the floor, and
        ``false_ml`` (predicted mL outside the truth) after it. Dice is NaN for a scan without a lesion.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from .fewshot import _predict_masks
    from .io import load_ctich
    from .metrics import dice
    from .recon3d import voxel_ml as ml_per_voxel

    size = int(image_size or fitted.recipe.config.image_size)
    voxel_ml = ml_per_voxel((size, size))
    rows = []
    for pid in tqdm(list(patients), desc="whole scans", disable=not progress):
        scan = load_ctich(folder, image_size=size, patients=[pid], progress=False)
        scan = scan.subset(np.argsort(scan.slice_indices, kind="stable"))
        truth = scan.masks > 0
        _, raw, kept = _predict_masks(fitted, scan)  # thresholded, and after the floor
        flags = scan.extra.get("has_mask")  # slices.csv's flags, from the full-size masks
        row = {"patient_id": str(pid), "slices": len(scan), "true_ml": truth.sum() * voxel_ml,
               "has_lesion": bool(np.any(flags)) if flags is not None else bool(truth.any())}
        for name, mask in (("unfiltered_", raw), ("", kept)):
            row[f"{name}dice_3d"] = float(dice(truth, mask)) if truth.any() else float("nan")
            row[f"{name}predicted_ml"] = mask.sum() * voxel_ml
        row["false_ml"] = (kept & ~truth).sum() * voxel_ml
        rows.append(row)
    return pd.DataFrame(rows)


def whole_scan_summary(scans: Any, patient: str = "71") -> Any:
    """Two rows from :func:`whole_scans`: the thresholded masks and the masks after the brightness floor.

    Columns: ``mean_dice_3d`` and ``median_dice_3d`` over the scans with a lesion (``has_lesion``), ``lesion_free_ml``
    (mean mL marked on the scans without one), and ``patient_ml`` / ``patient_true_ml`` for ``patient``.
    """
    import pandas as pd

    has = scans["has_lesion"].astype(bool) if "has_lesion" in scans else scans.true_ml > 0
    lesion, free = scans[has], scans[~has]
    one = scans.set_index("patient_id").loc[str(patient)]
    rows = {}
    for name, prefix in (("thresholded", "unfiltered_"), ("brighter than brain", "")):
        rows[name] = {"mean_dice_3d": lesion[f"{prefix}dice_3d"].mean(),
                      "median_dice_3d": lesion[f"{prefix}dice_3d"].median(),
                      "lesion_free_ml": free[f"{prefix}predicted_ml"].mean(),
                      "patient_ml": one[f"{prefix}predicted_ml"], "patient_true_ml": one["true_ml"]}
    return pd.DataFrame.from_dict(rows, orient="index")
