"""Per-group performance metrics and fairness metrics for the k-fold harness.

Performance, per group and overall (fairlearn ``MetricFrame`` over scikit-learn metrics), computed on
visit rows with a hard prediction and a score:

``f1`` (primary), ``precision``, ``recall``, ``tpr`` (= recall), ``fpr``, ``underdiagnosis``
(1 - TPR), ``auroc``, ``calibration_error`` (expected calibration error over 10 equal-width score
bins, :func:`benchmarks.calibration.expected_calibration_error`),
``selection_rate``, ``n`` (visits) and ``n_pos`` (positive visits). A value that is undefined for a
group is NaN, never a made-up 0: F1 and precision when the group has neither a positive label nor a
positive prediction, TPR / recall / underdiagnosis when it has no positive label, FPR when it has no
negative label, AUROC when it holds one class only.

Fairness across the groups of one attribute (or of an intersection of attributes). Groups with an
undefined F1 are left out of the F1-based measures; groups below a minimum share of the training
patients can be left out of every fairness measure (``min_share``; the harness's default is 1%, the
paper's cut for its intersectional experiment), keeping their per-group rows.

``di_weighted``, ``di_averaged`` (:func:`fairplay_disparate_impact`)
    FairPlay's disparate impact: "the ratio of F1 Scores between minority groups and the majority
    group baseline ... for each minority group and ... a weighted combination of the metric by the
    size of those groups". The majority group is the largest group of the fold's real training
    patients; every other group is a minority group with ratio F1_g / F1_majority; ``di_weighted``
    weights the ratios by the groups' training sizes, ``di_averaged`` is their plain mean. Nearer 1
    is fairer. Undefined (NaN) when the majority group's F1 is 0 or undefined.
``theil`` (:func:`theil_index_f1`)
    The Theil T index ("a special case of the generalized entropy index") over the G group F1
    scores, each group counting once: T = (1/G) sum_g (x_g/mu) ln(x_g/mu) with mu the plain mean of
    the x_g, and 0 ln 0 = 0 so that a group F1 of 0 is safe (T = 0 when every F1 is 0). Lower is
    fairer. For groups of 700 / 200 / 100 patients with F1 0.8 / 0.6 / 0.4 this gives 0.0378; the
    size-weighted variant (each patient carrying its group's F1) would give 0.0189.
``f1_variance`` (:func:`f1_variance`)
    Population variance (ddof = 0) of the group F1 scores.
``equal_opportunity``, ``fpr_difference``, ``equalized_odds``
    Largest minus smallest group TPR; the same for FPR; the larger of the two (fairlearn's
    equalized-odds difference). Taken from the ``MetricFrame`` of the NaN-aware rates above rather
    than from ``fairlearn.metrics.equalized_odds_difference``, which scores a group without a
    positive visit as TPR 0 and so reports a spurious gap for small groups; with every group
    holding both classes the two agree.
``demographic_parity``
    ``fairlearn.metrics.demographic_parity_difference``: largest minus smallest selection rate.

Two aggregations over folds and models. The measures above are computed per (fold, method, model)
*unit*, then averaged over folds (and models): the **mean-of-units** aggregation, this project's,
stored under the names above. The published FairPlay experiments instead compute them once per
method, on the group F1s already averaged over models and folds (:func:`paper_fairness`): every
group of the data counts, an undefined or unobserved group F1 counts as 0, the majority is the
largest group of the data and the weights are the groups' sizes. Those values are stored with a
null ``fold`` under their own names, ``theil_of_means``, ``di_weighted_of_means``,
``di_averaged_of_means`` and ``f1_sd_of_means`` (the paper's "performance variance": the
population standard deviation of the group F1s, where ``f1_variance`` is a variance), per model
(averaged over folds) and for the model mean.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Literal

import numpy as np
import polars as pl

PERFORMANCE_METRICS = ("f1", "precision", "recall", "tpr", "fpr", "underdiagnosis", "auroc",
                       "calibration_error", "selection_rate", "n", "n_pos")
FAIRNESS_METRICS = ("di_weighted", "di_averaged", "theil", "f1_variance", "equalized_odds",
                    "equal_opportunity", "fpr_difference", "demographic_parity")
# the same Theil / DI / spread, computed once on the mean group F1s (the paper's aggregation)
PAPER_FAIRNESS_METRICS = ("di_weighted_of_means", "di_averaged_of_means", "theil_of_means", "f1_sd_of_means")
# which name each aggregation gives to the headline measures
AGGREGATION_METRICS = {"mean-of-units": {"theil": "theil", "di_weighted": "di_weighted",
                                         "di_averaged": "di_averaged", "spread": "f1_variance"},
                       "paper": {"theil": "theil_of_means", "di_weighted": "di_weighted_of_means",
                                 "di_averaged": "di_averaged_of_means", "spread": "f1_sd_of_means"}}
# Lower is fairer for every fairness metric except the two disparate-impact ratios (nearer 1).
HIGHER_IS_BETTER = {"f1", "precision", "recall", "tpr", "auroc"}
METRIC_COLUMNS = {"fold": pl.Int32, "method": pl.String, "model": pl.String, "attribute": pl.String,
                  "group": pl.String, "metric": pl.String, "value": pl.Float64}
GROUP_SEPARATOR = " & "


# ---------------------------------------------------------------------- FairPlay's fairness measures
def theil_index(x: np.ndarray) -> np.ndarray:
    """Theil T index over the last axis, each group once; NaN groups left out, 0 ln 0 = 0.

    The array form of :func:`theil_index_f1` (one row per replicate in ``benchmarks.stats``): NaN
    where every group is NaN, 0 where every defined value is 0.
    """
    x = np.asarray(x, np.float64)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN by design
        mu = np.nanmean(x, -1)[..., None]
        r = np.where(mu > 0, x / np.where(mu > 0, mu, 1), 0.0)
        terms = np.where(r > 0, r * np.log(np.where(r > 0, r, 1)), 0.0)  # r ln r -> 0 as r -> 0
        return np.where(np.isnan(mu[..., 0]), np.nan, np.nanmean(np.where(np.isnan(x), np.nan, terms), -1))


def disparate_impact(x: np.ndarray, *, majority: np.ndarray | int, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FairPlay's disparate impact over the last axis: ``(weighted, averaged)``.

    Ratios ``x_g / x_majority`` of every other group with a defined ``x_g`` and a positive training
    size, weighted by ``sizes`` (or their plain mean); NaN when the majority's value is 0 or NaN or
    no other group is defined. The array form of :func:`fairplay_disparate_impact`.
    """
    x = np.asarray(x, np.float64)
    sizes = np.broadcast_to(np.asarray(sizes, np.float64), x.shape)
    maj = np.broadcast_to(np.asarray(majority), x.shape[:-1])[..., None]
    base = np.take_along_axis(x, maj, -1)
    keep = (np.arange(x.shape[-1]) != maj) & ~np.isnan(x) & (sizes > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(keep, x / np.where(base > 0, base, 1), 0.0)
        w = np.where(keep, sizes, 0.0)
        ok = (keep.sum(-1) > 0) & (base[..., 0] > 0)
        weighted = np.where(ok, (ratio * w).sum(-1) / np.where(ok, w.sum(-1), 1), np.nan)
        averaged = np.where(ok, ratio.sum(-1) / np.where(ok, keep.sum(-1), 1), np.nan)
    return weighted, averaged


def fairplay_disparate_impact(f1: Mapping[str, float], sizes: Mapping[str, float]) -> tuple[float, float]:
    """FairPlay's disparate impact: ``(weighted, averaged)`` minority-to-majority F1 ratios.

    Parameters
    ----------
    f1 : mapping group -> F1 score (NaN = undefined, left out).
    sizes : mapping group -> size in the training data; the largest group is the majority and the
        sizes weight the minority ratios. Groups absent from ``sizes`` are left out.

    Examples
    --------
    >>> [round(v, 4) for v in fairplay_disparate_impact({"a": .8, "b": .6, "c": .4}, {"a": 700, "b": 200, "c": 100})]
    [0.6667, 0.625]
    """
    groups = [g for g in f1 if g in sizes]
    if not groups:
        return math.nan, math.nan
    majority = groups.index(max(groups, key=lambda g: (sizes[g], g)))
    weighted, averaged = disparate_impact(np.array([f1[g] for g in groups], dtype=float), majority=majority,
                                          sizes=np.array([sizes[g] for g in groups], dtype=float))
    return float(weighted), float(averaged)


def theil_index_f1(values: Iterable[float]) -> float:
    """Theil T index of group F1 scores, each group counting once; NaNs are left out.

    Examples
    --------
    >>> round(theil_index_f1([0.8, 0.6, 0.4]), 4)
    0.0378
    """
    x = np.asarray(list(values), dtype=float)
    return float(theil_index(x)) if x.size else math.nan


def f1_variance(values: Iterable[float]) -> float:
    """Population variance (ddof = 0) of group F1 scores; NaNs are left out."""
    x = _defined(values)
    return float(x.var()) if x.size else math.nan


def _defined(values: Iterable[float]) -> np.ndarray:
    x = np.asarray(list(values), dtype=float)
    return x[~np.isnan(x)]


# ---------------------------------------------------------------------- per-group performance
def _auroc(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y_true = np.asarray(y_true)
    return float(roc_auc_score(y_true, y_score)) if np.unique(y_true).size == 2 else math.nan


def _ece(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray) -> float:
    from .calibration import expected_calibration_error

    return expected_calibration_error(y_true, y_score)


def _fpr(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    neg = np.asarray(y_true) == 0
    return float(np.asarray(y_pred)[neg].mean()) if neg.any() else math.nan


def _n_pos(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sum(y_true))


def _metric_functions() -> dict:
    from fairlearn.metrics import count, selection_rate
    from sklearn.metrics import f1_score, precision_score, recall_score

    recall = partial(recall_score, zero_division=np.nan)
    return {"f1": partial(f1_score, zero_division=np.nan),
            "precision": partial(precision_score, zero_division=np.nan),
            "recall": recall, "tpr": recall, "fpr": _fpr, "auroc": _auroc,
            "calibration_error": _ece, "selection_rate": selection_rate, "n": count, "n_pos": _n_pos}


def metric_frame(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray,
                 sensitive: np.ndarray | Sequence[str]):
    """A fairlearn ``MetricFrame`` holding every performance metric by group (and overall)."""
    from fairlearn.metrics import MetricFrame

    y_score = np.asarray(y_score, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division warnings: those values are NaN by design
        return MetricFrame(metrics=_metric_functions(), y_true=np.asarray(y_true), y_pred=np.asarray(y_pred),
                           sensitive_features=pl.Series("group", np.asarray(sensitive)).to_pandas(),
                           sample_params={"auroc": {"y_score": y_score},
                                          "calibration_error": {"y_score": y_score}})


def _with_underdiagnosis(values: dict[str, float]) -> dict[str, float]:
    values = {k: float(v) for k, v in values.items()}
    values["underdiagnosis"] = 1.0 - values["tpr"]
    return {k: values[k] for k in PERFORMANCE_METRICS}


def overall_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    """Every performance metric over all rows."""
    frame = metric_frame(y_true, y_pred, y_score, np.zeros(len(y_true), dtype=str))
    return _with_underdiagnosis(frame.overall.to_dict())


def fairness_groups(train_sizes: Mapping[str, float], *, min_share: float = 0.0) -> set[str]:
    """The groups that take part in the fairness measures: at least ``min_share`` of the training data."""
    total = sum(train_sizes.values())
    return {g for g, n in train_sizes.items() if total and n / total >= min_share}


def group_metrics(y_true: np.ndarray, y_pred: np.ndarray, y_score: np.ndarray,
                  sensitive: np.ndarray | Sequence[str], *, train_sizes: Mapping[str, float],
                  min_share: float = 0.0) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Performance by group and fairness across groups.

    Parameters
    ----------
    y_true, y_pred, y_score : arrays of shape (n,)
        Labels, hard predictions (0/1) and scores of the positive class.
    sensitive : array of shape (n,)
        Each row's group.
    train_sizes : mapping group -> training size
        Defines the majority group and the weights of :func:`fairplay_disparate_impact`.
    min_share : float
        Groups smaller than this share of ``train_sizes`` (and groups absent from it, when
        ``min_share > 0``) are left out of the fairness measures, as the paper leaves out groups
        under 1%; they keep their per-group metrics.

    Returns
    -------
    by_group : ``{group: {metric: value}}``
    fairness : ``{metric: value}`` for every name in ``FAIRNESS_METRICS``
    """
    from fairlearn.metrics import demographic_parity_difference

    frame = metric_frame(y_true, y_pred, y_score, sensitive)
    by_group = {str(g): _with_underdiagnosis(row) for g, row in frame.by_group.to_dict("index").items()}
    kept = [g for g in by_group if min_share <= 0 or g in fairness_groups(train_sizes, min_share=min_share)]
    f1 = {g: by_group[g]["f1"] for g in kept}
    weighted, averaged = fairplay_disparate_impact(f1, train_sizes)
    tpr_gap = _spread([by_group[g]["tpr"] for g in kept])  # groups without a positive are NaN: skipped
    fpr_gap = _spread([by_group[g]["fpr"] for g in kept])
    rows = np.isin(np.asarray(sensitive), kept)
    fairness = {
        "di_weighted": weighted, "di_averaged": averaged,
        "theil": theil_index_f1(f1.values()), "f1_variance": f1_variance(f1.values()),
        "equalized_odds": _spread([tpr_gap, fpr_gap], how="max"),
        "equal_opportunity": tpr_gap, "fpr_difference": fpr_gap,
        "demographic_parity": float(demographic_parity_difference(
            np.asarray(y_true)[rows], np.asarray(y_pred)[rows], sensitive_features=np.asarray(sensitive)[rows]))
        if rows.any() else math.nan,
    }
    return by_group, fairness


def _spread(values: Iterable[float], how: Literal["range", "max"] = "range") -> float:
    """Largest minus smallest defined value (``how="max"``: the largest); NaN when none is defined."""
    x = _defined(values)
    if x.size == 0:
        return math.nan
    return float(x.max() - x.min()) if how == "range" else float(x.max())


# ---------------------------------------------------------------------- one unit's long table
def combined_attribute(attributes: Sequence[str]) -> str:
    """The name of the intersection of several attributes (``"gender & age_group"``)."""
    return GROUP_SEPARATOR.join(attributes)


def groupings(attributes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``[(name, attributes), ...]``: each attribute alone, then their intersection when several."""
    out = [(a, [a]) for a in attributes]
    if len(attributes) > 1:
        out.append((combined_attribute(attributes), list(attributes)))
    return out


def group_labels(frame: pl.DataFrame, attributes: Sequence[str]) -> pl.Series:
    """Each row's group for one grouping: the attribute's value, or values joined by ``" & "``."""
    return frame.select(pl.concat_str([pl.col(a) for a in attributes], separator=GROUP_SEPARATOR)
                        .alias("group"))["group"]


def group_patient_counts(predictions: pl.DataFrame | pl.LazyFrame, attributes: Sequence[str],
                         ) -> dict[str, dict[str, tuple[int, int]]]:
    """``{grouping: {group: (patients, deaths)}}`` of a predictions table: its distinct patients (each
    k-fold patient is tested in one fold) and those with a positive visit, counted in one series."""
    lazy = predictions.lazy()
    first = lazy.select("method", "model").first().collect()
    patients = (lazy.filter((pl.col("method") == first["method"][0]) & (pl.col("model") == first["model"][0]))
                .group_by("patient_id").agg(*(pl.col(a).first() for a in attributes), died=pl.col("y_true").max())
                .collect())
    out = {}
    for name, attrs in groupings(attributes):
        counts = patients.group_by(group_labels(patients, attrs)).agg(n=pl.len(), deaths=pl.col("died").sum())
        out[name] = {r["group"]: (r["n"], int(r["deaths"])) for r in counts.iter_rows(named=True)}
    return out


def group_header(group: str, patients: object, deaths: object) -> str:
    """A table header naming a group and what it holds; the k-fold report and the audit share it."""
    return f"{group} (patients={patients}, deaths={deaths})"


def unit_metrics(predictions: pl.DataFrame, *, attributes: Sequence[str],
                 train_sizes: Mapping[str, Mapping[str, float]], min_share: float = 0.0) -> pl.DataFrame:
    """The tidy long table of one (fold, method, model) unit.

    Parameters
    ----------
    predictions : polars.DataFrame
        One row per test visit with ``fold``, ``method``, ``model``, ``y_true``, ``prediction``,
        ``score`` and the attribute columns.
    attributes : the group attributes of the experiment.
    train_sizes : ``{grouping name: {group: training patients}}`` for every grouping.
    min_share : see :func:`group_metrics`.

    Returns
    -------
    polars.DataFrame with the columns of ``METRIC_COLUMNS``: overall rows have null ``attribute`` and
    ``group``; per-group rows have both; fairness rows have an ``attribute`` and a null ``group``.
    """
    key = predictions.row(0, named=True)
    y, p, s = (predictions[c].to_numpy() for c in ("y_true", "prediction", "score"))
    rows: list[tuple] = [(None, None, m, v) for m, v in overall_metrics(y, p, s).items()]
    for name, attrs in groupings(attributes):
        by_group, fairness = group_metrics(y, p, s, group_labels(predictions, attrs).to_numpy(),
                                           train_sizes=train_sizes[name], min_share=min_share)
        rows += [(name, g, m, v) for g, metrics in by_group.items() for m, v in metrics.items()]
        rows += [(name, None, m, v) for m, v in fairness.items()]
    out = pl.DataFrame(rows, schema={"attribute": pl.String, "group": pl.String, "metric": pl.String,
                                     "value": pl.Float64}, orient="row")
    return out.with_columns(fold=pl.lit(key["fold"], pl.Int32), method=pl.lit(key["method"]),
                            model=pl.lit(key["model"])).select(list(METRIC_COLUMNS))


# ---------------------------------------------------------------------- aggregation over folds
def summarise(metrics: pl.DataFrame, *, model_mean_label: str = "mean") -> pl.DataFrame:
    """Mean and standard error over folds, per model and averaged over models.

    The model average is taken within each fold first (mean over the models, NaNs skipped), then
    over folds, so its standard error reflects fold-to-fold variation of the model-averaged metric.
    Columns: ``method``, ``model`` (``model_mean_label`` for the average), ``attribute``, ``group``,
    ``metric``, ``mean``, ``se`` (standard deviation over folds / sqrt(folds), ddof = 1),
    ``n_folds`` (folds with a defined value). Rows with a null ``fold`` (already aggregated over
    folds, :func:`paper_fairness`) pass through with their value as ``mean`` and a null ``se``.
    """
    keys = ["method", "attribute", "group", "metric"]
    whole = metrics.filter(pl.col("fold").is_null())
    defined = metrics.filter(pl.col("fold").is_not_null() & pl.col("value").is_not_nan())
    # groups in order of appearance, so that every sum adds the same values in the same order and
    # a rerun (on any backend) writes identical bits
    averaged = (defined.group_by("fold", *keys, maintain_order=True).agg(pl.col("value").mean())
                .with_columns(model=pl.lit(model_mean_label)))
    both = pl.concat([defined.select("fold", "model", *keys, "value"),
                      averaged.select("fold", "model", *keys, "value")])
    per_fold = (both.group_by("method", "model", "attribute", "group", "metric", maintain_order=True)
                .agg(mean=pl.col("value").mean(), n_folds=pl.len().cast(pl.Int32),
                     se=pl.col("value").std(ddof=1) / pl.len().sqrt()))
    n_folds = defined["fold"].n_unique()
    passed = whole.select("method", "model", "attribute", "group", "metric", mean=pl.col("value"),
                          n_folds=pl.lit(n_folds, pl.Int32), se=pl.lit(None, pl.Float64))
    return (pl.concat([per_fold, passed.select(per_fold.columns)])
            .select("method", "model", "attribute", "group", "metric", "mean", "se", "n_folds")
            .sort("method", "model", "attribute", "group", "metric", nulls_last=False))


# ---------------------------------------------------------------------- the paper's aggregation
def fairness_of_means(f1: np.ndarray, *, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """The paper's Theil, disparate impact and F1 spread over the last axis of mean group F1s.

    ``f1`` holds every group's F1 averaged over models and folds, undefined values already 0;
    ``sizes`` the groups' sizes (the largest is the majority, ties to the last group, as in
    :func:`fairplay_disparate_impact`). Theil's 0 ln 0 is 0 (the published code would give NaN).

    Examples
    --------
    >>> out = fairness_of_means(np.array([0.8, 0.6, 0.4]), sizes=np.array([700, 200, 100]))
    >>> [round(float(out[k]), 4) for k in ("theil_of_means", "di_weighted_of_means", "f1_sd_of_means")]
    [0.0378, 0.6667, 0.1633]
    """
    f1 = np.asarray(f1, np.float64)
    sizes = np.asarray(sizes, np.float64)
    majority = len(sizes) - 1 - int(np.argmax(sizes[::-1]))
    weighted, averaged = disparate_impact(f1, majority=majority, sizes=sizes)
    return {"di_weighted_of_means": weighted, "di_averaged_of_means": averaged, "theil_of_means": theil_index(f1),
            "f1_sd_of_means": f1.std(-1)}


def paper_fairness(metrics: pl.DataFrame, *, group_sizes: Mapping[str, Mapping[str, float]],
                   model_mean_label: str = "mean") -> pl.DataFrame:
    """The fairness measures of the paper's aggregation, from per-unit metrics.

    Parameters
    ----------
    metrics : the per-unit long table (:func:`unit_metrics` rows of every fold, method and model).
    group_sizes : ``{grouping name: {group: patients}}``, every group of the data (a group no test
        fold of a unit holds counts as F1 0 there) and its size.
    model_mean_label : the model of the rows averaged over models.

    Returns
    -------
    polars.DataFrame in ``METRIC_COLUMNS`` with a null ``fold`` and ``group``: for every method,
    each model (group F1s averaged over folds) and the model mean (averaged over the method's
    units), every grouping and every name in ``PAPER_FAIRNESS_METRICS``.
    """
    unit_rows = metrics.filter(pl.col("fold").is_not_null())
    units = unit_rows.select("method", "model", "fold").unique()
    f1 = unit_rows.filter((pl.col("metric") == "f1") & pl.col("group").is_not_null()).select(
        "method", "model", "fold", "attribute", "group", "value")
    rows: list[tuple] = []
    for attribute, sizes in group_sizes.items():
        names = sorted(sizes)
        grid = units.join(pl.DataFrame({"group": names}), how="cross").with_columns(attribute=pl.lit(attribute))
        full = grid.join(f1, on=["method", "model", "fold", "attribute", "group"], how="left").with_columns(
            value=pl.col("value").fill_nan(0.0).fill_null(0.0))  # undefined or unobserved: 0
        per_model = full.group_by("method", "model", "group", maintain_order=True).agg(pl.col("value").mean())
        mean = full.group_by("method", "group", maintain_order=True).agg(pl.col("value").mean()).with_columns(
            model=pl.lit(model_mean_label))
        table = pl.concat([per_model, mean.select(per_model.columns)])
        for (method, model), part in table.group_by("method", "model", maintain_order=True):
            x = dict(part.select("group", "value").iter_rows())
            values = fairness_of_means(np.array([x[g] for g in names]), sizes=np.array([sizes[g] for g in names]))
            rows += [(method, model, attribute, k, float(v)) for k, v in values.items()]
    out = pl.DataFrame(rows, orient="row", schema={"method": pl.String, "model": pl.String, "attribute": pl.String,
                                                    "metric": pl.String, "value": pl.Float64})
    return out.with_columns(fold=pl.lit(None, pl.Int32), group=pl.lit(None, pl.String)).select(list(METRIC_COLUMNS))
