"""Calibration by group and per-group error rates across decision thresholds.

* Expected calibration error (ECE) with equal-width bins over the predicted probability of the
  positive class: ``ECE = sum_b (n_b / N) * |frac_positive_b - mean_probability_b|``, i.e. the
  bin-weighted gap between observed frequency ("accuracy") and predicted probability
  ("confidence"), as in the CLIP fairness audit (the harness's ``calibration_error`` metric). Bin
  ``b`` of ``n_bins`` holds probabilities in ``[b/n_bins, (b+1)/n_bins)``; the last bin also holds 1.0. Since
  ``(n_b / N) * |mean(y - p)|_b = |sum_b(y - p)| / N``, the ECE of any weighted set of visits needs
  only the per-bin sums of ``y - p`` and the total weight, which is what lets
  :mod:`benchmarks.stats` bootstrap it from per-patient sums.
* The ECE gap of an attribute: each group's ECE minus the reference group's, and max - min.
* A threshold sweep: each group's TPR, FPR and underdiagnosis rate (1 - TPR) at a grid of
  thresholds on the score (positive if ``score > t``, the harness's rule at t = 0.5), to see
  whether a gap between groups persists at every threshold or is
  an artefact of the one threshold the model happens to use.

Point estimates per group go through fairlearn's :class:`~fairlearn.metrics.MetricFrame`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import polars as pl

DEFAULT_THRESHOLDS = tuple(np.round(np.linspace(0.05, 0.95, 19), 2).tolist())


def bin_index(y_prob: np.ndarray, *, n_bins: int = 10) -> np.ndarray:
    """Equal-width bin of each probability: ``floor(p * n_bins)``, with 1.0 in the last bin."""
    p = np.asarray(y_prob, dtype=np.float64)
    if p.size and (np.nanmin(p) < 0 or np.nanmax(p) > 1 or np.isnan(p).any()):
        raise ValueError("predicted probabilities must lie in [0, 1] (no NaN)")
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, *, n_bins: int = 10,
                               sample_weight: np.ndarray | None = None) -> float:
    """ECE of binary outcomes ``y_true`` against predicted probabilities ``y_prob``.

    Parameters
    ----------
    y_true : array of 0/1, shape (n,)
    y_prob : probabilities of the positive class, shape (n,)
    n_bins : number of equal-width bins on [0, 1].
    sample_weight : non-negative weights (e.g. bootstrap multiplicities), optional.

    Returns
    -------
    float
        ``sum_b (w_b / W) |mean_w(y)_b - mean_w(p)_b|``; NaN when the total weight is zero.
    """
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_prob, dtype=np.float64)
    w = np.ones_like(p) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    total = w.sum()
    if total <= 0:
        return float("nan")
    residual = np.bincount(bin_index(p, n_bins=n_bins), weights=w * (y - p), minlength=n_bins)
    return float(np.abs(residual).sum() / total)


def calibration_curve_by_group(y_true: np.ndarray, y_prob: np.ndarray, groups: np.ndarray, *,
                               n_bins: int = 10) -> pl.DataFrame:
    """Reliability-diagram points per group: one row per non-empty (group, bin).

    Columns: ``group``, ``bin``, ``lower``, ``upper``, ``count``, ``mean_prob``, ``frac_positive``.
    """
    frame = pl.DataFrame({"group": np.asarray(groups).astype(str), "y": np.asarray(y_true, np.float64),
                          "p": np.asarray(y_prob, np.float64), "bin": bin_index(y_prob, n_bins=n_bins)})
    return (frame.group_by("group", "bin")
            .agg(pl.len().alias("count"), pl.col("p").mean().alias("mean_prob"),
                 pl.col("y").mean().alias("frac_positive"))
            .with_columns((pl.col("bin") / n_bins).alias("lower"), ((pl.col("bin") + 1) / n_bins).alias("upper"))
            .select("group", "bin", "lower", "upper", "count", "mean_prob", "frac_positive")
            .sort("group", "bin"))


def ece_by_group(y_true: np.ndarray, y_prob: np.ndarray, groups: np.ndarray, *, n_bins: int = 10,
                 reference: str | None = None) -> pl.DataFrame:
    """ECE of each group and its gap to a reference group (default: the largest group).

    Returns one row per group (``group``, ``n``, ``ece``, ``ece_gap`` = ECE - reference ECE) and a
    final row ``group = "max-min"`` holding the spread of the group ECEs in ``ece_gap``.
    """
    from fairlearn.metrics import MetricFrame, count

    groups = np.asarray(groups).astype(str)
    mf = MetricFrame(metrics={"ece": partial(expected_calibration_error, n_bins=n_bins), "n": count},
                     y_true=np.asarray(y_true), y_pred=np.asarray(y_prob),
                     sensitive_features=groups)
    by = mf.by_group
    names = [str(g) for g in by.index]
    ece = by["ece"].to_numpy(dtype=np.float64)
    n = by["n"].to_numpy(dtype=np.int64)
    ref = reference if reference is not None else names[int(np.argmax(n))]
    if ref not in names:
        raise ValueError(f"reference group {ref!r} is not among the groups {names}")
    gap = ece - ece[names.index(ref)]
    return pl.DataFrame({
        "group": [*names, "max-min"], "n": [*n.tolist(), int(n.sum())],
        "ece": [*ece.tolist(), None], "ece_gap": [*gap.tolist(), float(np.nanmax(ece) - np.nanmin(ece))],
        "reference": [ref] * (len(names) + 1)})


def _rate_at(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float, rate: str) -> float:
    from fairlearn.metrics import false_positive_rate, true_positive_rate

    y_pred = (np.asarray(y_score) > threshold).astype(np.int8)
    fn = true_positive_rate if rate == "tpr" else false_positive_rate
    if not np.any(np.asarray(y_true) == (1 if rate == "tpr" else 0)):
        return float("nan")  # undefined without positives (TPR) / negatives (FPR)
    return float(fn(y_true, y_pred, pos_label=1))


def threshold_sweep(y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray, *,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> pl.DataFrame:
    """Per-group TPR, FPR and underdiagnosis rate at each threshold (predict positive if score > t).

    Returns a long frame: ``group``, ``threshold``, ``tpr``, ``fpr``, ``udr``; TPR (FPR) is NaN for a
    group without positives (negatives).
    """
    from fairlearn.metrics import MetricFrame

    metrics = {}
    for t in thresholds:
        metrics[f"tpr@{t}"] = partial(_rate_at, threshold=float(t), rate="tpr")
        metrics[f"fpr@{t}"] = partial(_rate_at, threshold=float(t), rate="fpr")
    by = MetricFrame(metrics=metrics, y_true=np.asarray(y_true), y_pred=np.asarray(y_score, np.float64),
                     sensitive_features=np.asarray(groups).astype(str)).by_group
    rows = []
    for g in by.index:
        for t in thresholds:
            tpr, fpr = by.loc[g, f"tpr@{t}"], by.loc[g, f"fpr@{t}"]
            rows.append((str(g), float(t), float(tpr), float(fpr), float(1.0 - tpr)))
    return pl.DataFrame(rows, schema=["group", "threshold", "tpr", "fpr", "udr"], orient="row")
