"""Uncertainty for the k-fold harness's metrics: patient-level bootstrap and permutation tests.

The unit of resampling is the patient: a patient's visits share a history and an outcome and are
not independent. Everything is computed from per-patient sums, once:

* per (method, model) *series* and patient: the visit-level confusion counts ``tp, fp, fn, tn`` and,
  per calibration bin, the sum of ``y - score`` (enough for the calibration error, see
  :mod:`benchmarks.calibration`);
* patients are sorted by fold, then by *fine cell* (the combination of every group attribute), so
  any per-fold, per-group total is a sum of contiguous slices.

A bootstrap resample is a vector of patient multiplicities ``w`` (multinomial within each fold, so
the fold sizes are kept); the totals of a cell are ``w[slice] @ X[slice]``, one matrix product for
a whole chunk of resamples. F1, precision, TPR, FPR, underdiagnosis (1 - TPR), selection rate and
calibration error follow from the totals; the Theil index, disparate impact, the other fairness
measures and the group gaps from the matrix of group metrics. AUROC is bootstrapped from one sort
per cell and cumulative sums of resampled negative weights. Intervals are **percentile** intervals
(the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled statistic, undefined resamples
left out). For spreads (Theil, max - min gaps, equalized odds) the resampled values lie above the
estimate on average, so such an interval may not contain the estimate; the permutation p-value is
the test for those.

Permutation tests, two-sided, ``p = (1 + #{|T_b| >= |T_obs|}) / (1 + #valid resamples)``:

* method vs reference (Original) on F1, Theil, disparate impact and the min-max TPR and FPR gaps
  (``equal_opportunity``, which is also the min-max underdiagnosis gap, and ``fpr_difference``:
  does a mitigation narrow the gap?), *paired*: the methods are
  evaluated on the same test visits, so under the null the two methods' predictions for a patient
  are exchangeable; each resample swaps them for a random half of the patients.
* a group gap within a method (FPR, underdiagnosis, F1, ...): group membership is permuted across
  patients within each fold (the group sizes of every fold are kept).

Conventions follow :mod:`benchmarks.metrics` so that point estimates equal the harness's summary:
undefined values are NaN (F1 and precision without a positive label or prediction, TPR without
positives, FPR without negatives); every statistic is computed within a fold; the model average is
taken within each fold, then the mean over folds. Disparate impact uses each fold's training
majority (training size = all patients minus the fold's test patients; with a single fold, the
audited patients themselves) and training-size weights.
Group gaps are ``metric(group) - metric(reference)``, the reference being each attribute's largest
group, and ``max - min``. With ``fairness_min_share`` (the run's setting), groups under that share of
a fold's training patients are left out of the fairness measures, as in the harness. The paper's
aggregation (``theil_of_means``, ``di_weighted_of_means``, ``di_averaged_of_means``,
``f1_sd_of_means``; :func:`benchmarks.metrics.paper_fairness`) is computed in every resample from
the group F1s averaged over models and folds, undefined ones as 0, over every group, weighted by
the groups' patients; its comparisons with the reference are paired the same way.
``aggregate="pooled"`` instead pools the counts of all folds first.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from halo_balance.errors import DatasetError

from .calibration import DEFAULT_THRESHOLDS, bin_index
from .metrics import PAPER_FAIRNESS_METRICS, disparate_impact, fairness_of_means, group_labels, groupings, \
    theil_index

Aggregate = Literal["fold_mean", "pooled"]
ALL = "(all)"  # the attribute and group of whole-population rows
MODEL_MEAN = "mean"  # the model of rows averaged over models (as in the harness's summary)
RANGE = "max-min"  # the group of the spread of a metric over groups
GROUP_METRICS = ("f1", "precision", "tpr", "fpr", "underdiagnosis", "selection_rate", "calibration_error", "auroc")
GAP_METRICS = ("f1", "tpr", "fpr", "underdiagnosis", "calibration_error")
FAIRNESS_METRICS = ("di_weighted", "di_averaged", "theil", "f1_variance", "equalized_odds", "equal_opportunity",
                    "fpr_difference", "demographic_parity", "calibration_gap")
COMPARE_METRICS = ("f1", "theil", "di_weighted", "di_averaged", "equal_opportunity", "fpr_difference",
                   "theil_of_means", "di_weighted_of_means", "di_averaged_of_means")
REQUIRED_COLUMNS = ("fold", "method", "model", "patient_id", "visit_index", "y_true", "score", "prediction")
_STREAMS = {"bootstrap": 0, "paired": 1, "groups": 2}
_CHUNK_BYTES = 96 * 2**20  # bounds a chunk's working set (weights and cell totals)
_AUROC_BYTES = 4 * 2**20  # AUROC sub-chunks stay cache-sized: measured 1.7x faster than 96 MB


# --------------------------------------------------------------------------- design
@dataclass(frozen=True, eq=False)
class Design:
    """The predictions of one k-fold run, arranged for resampling (see :meth:`from_predictions`).

    Attributes
    ----------
    patient_ids : (n,) patients, sorted by fold, fine cell, id.
    fold : (n,) fold index of each patient (into ``folds``).
    categories : ``{attribute: [groups]}``, starting with ``{ALL: [ALL]}``; an intersection of
        several attributes is one more attribute named ``"a & b"``.
    labels : ``{attribute: (n,)}`` group index of each patient.
    sizes, train_sizes : ``{attribute: (F, G)}`` test / training patients per fold and group.
    deaths : ``{attribute: (G,)}`` patients with a positive visit per group.
    reference : ``{attribute: group index}`` the largest group (the reference of the gaps).
    majority : ``{attribute: (F,)}`` each fold's largest training group (disparate impact).
    fairness_min_share : groups under this share of a fold's training patients are left out of the
        fairness measures (the harness's ``--fairness-min-share``; 0 keeps every group).
    bounds : fine cell ``k`` holds patients ``bounds[k]:bounds[k+1]``.
    fine_fold, fine_labels : the fold and ``{attribute: group}`` of every fine cell.
    series : ``[(method, model)]``, methods in report order.
    visit_ptr : patient ``p`` owns visits ``visit_ptr[p]:visit_ptr[p+1]``.
    y_true : (n_visits,); score, prediction : (S, n_visits).
    X : (n, S, 4 + n_bins) per-patient ``tp, fp, fn, tn`` and calibration residuals per bin.
    """

    patient_ids: np.ndarray
    fold: np.ndarray
    folds: list
    categories: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    sizes: dict[str, np.ndarray]
    train_sizes: dict[str, np.ndarray]
    deaths: dict[str, np.ndarray]
    reference: dict[str, int]
    majority: dict[str, np.ndarray]
    fairness_min_share: float
    bounds: np.ndarray
    fine_fold: np.ndarray
    fine_labels: dict[str, np.ndarray]
    series: list[tuple[str, str]]
    visit_ptr: np.ndarray
    y_true: np.ndarray
    score: np.ndarray
    prediction: np.ndarray
    n_bins: int
    X: np.ndarray = field(repr=False)

    @property
    def n_patients(self) -> int:
        return len(self.patient_ids)

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def attributes(self) -> list[str]:
        """The group attributes and intersections (without ``ALL``)."""
        return [a for a in self.categories if a != ALL]

    @property
    def fold_bounds(self) -> np.ndarray:
        return np.searchsorted(self.fold, np.arange(self.n_folds + 1))

    @property
    def visit_patient(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_patients), np.diff(self.visit_ptr))

    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.series))

    def pairs(self, reference: str) -> tuple[np.ndarray, np.ndarray]:
        """Series indices ``(s, r)``: every non-reference series and its ``(reference, same model)``."""
        where = {k: s for s, k in enumerate(self.series)}
        pairs = [(s, where[(reference, k)]) for s, (m, k) in enumerate(self.series)
                 if m != reference and (reference, k) in where]
        return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)

    @classmethod
    def from_predictions(cls, predictions: pl.DataFrame, *, groups: Sequence[str], n_bins: int = 10,
                         fairness_min_share: float = 0.0, methods: Sequence[str] | None = None,
                         source: str = "predictions") -> Design:
        """Check and arrange a harness ``predictions`` table.

        Parameters
        ----------
        predictions : polars.DataFrame
            ``fold, method, model, patient_id, visit_index, <groups>, y_true, score, prediction``;
            one row per (method, model, test visit). Every series must cover the same test visits
            with the same labels (the design is paired) and every patient of the data must be a
            test patient of exactly one fold (so that training sizes follow from the folds; with a
            single fold the audited patients' own group sizes are used).
        groups : the run's group attributes (columns of ``predictions``); with several, their
            intersection is audited too, as in the harness.
        n_bins : calibration bins.
        fairness_min_share : see the class attributes; the harness records it in ``run.json``.
        methods : report order of the methods (default: order of appearance).
        source : file name for error messages.
        """
        missing = [c for c in (*REQUIRED_COLUMNS, *groups) if c not in predictions.columns]
        if missing:
            raise DatasetError(f"missing columns {missing}", file=source,
                               fix="audit a predictions table written by benchmarks.kfold, with its --groups")
        if predictions.height == 0:
            raise DatasetError("no predictions", file=source)
        df = predictions.select(*REQUIRED_COLUMNS, *groups).with_columns(
            pl.col("patient_id").cast(pl.String), *(pl.col(g).cast(pl.String) for g in groups))
        for c in ("y_true", "prediction"):
            bad = df.filter(~pl.col(c).is_in([0, 1]) | pl.col(c).is_null())
            if bad.height:
                raise DatasetError("values must be 0 or 1", file=source, column=c, value=bad[c][0])
        bad = df.filter(pl.col("score").is_null() | pl.col("score").is_nan() | (pl.col("score") < 0)
                        | (pl.col("score") > 1))
        if bad.height:
            raise DatasetError("scores must be probabilities in [0, 1]", file=source, column="score",
                               value=bad["score"][0], fix="write the positive-class probability")
        for g in groups:
            if df[g].null_count():
                raise DatasetError("missing group value", file=source, column=g,
                                   value=df.filter(pl.col(g).is_null())["patient_id"][0])
        # fold and groups are properties of the patient
        names = groupings(list(groups))
        patients = df.select("patient_id", "fold", *groups).unique()
        patients = patients.with_columns(group_labels(patients, a).alias(f"_g{i}") for i, (_, a) in enumerate(names))
        dup = patients.filter(pl.col("patient_id").is_duplicated())
        if dup.height:
            raise DatasetError("a patient has more than one fold or group value", file=source,
                               column="patient_id", value=dup["patient_id"][0])
        folds = sorted(patients["fold"].unique().to_list())
        categories: dict[str, list[str]] = {ALL: [ALL]}
        codes = {ALL: np.zeros(patients.height, np.int64)}
        for i, (name, _) in enumerate(names):
            col = patients[f"_g{i}"].to_numpy().astype(str)
            categories[name] = sorted(set(col.tolist()))
            codes[name] = np.searchsorted(categories[name], col)
        fold_code = np.searchsorted(folds, patients["fold"].to_numpy())
        keys = np.stack([fold_code, *(codes[g] for g in groups)], axis=1)
        fine_keys, fine_of = np.unique(keys, axis=0, return_inverse=True)
        fine_of = fine_of.ravel()
        order = np.lexsort((patients["patient_id"].to_numpy(), fine_of))
        ids, fine_of, fold_code = patients["patient_id"].to_numpy()[order], fine_of[order], fold_code[order]
        labels = {a: c[order] for a, c in codes.items()}
        F = len(folds)
        sizes = {a: np.zeros((F, len(categories[a])), np.int64) for a in categories}
        for a in categories:
            np.add.at(sizes[a], (fold_code, labels[a]), 1)
        # a fold's training patients are the other folds'; with one fold (predictions audited without
        # folds) there are none, and the audited patients' group sizes stand in
        train_sizes = {a: s.sum(0, keepdims=True) - s if len(folds) > 1 else s.copy() for a, s in sizes.items()}
        # the harness's majority: the largest group, ties to the last name (max over (size, name))
        largest = lambda s: s.shape[-1] - 1 - np.argmax(s[..., ::-1], axis=-1)  # noqa: E731
        reference = {a: int(largest(s.sum(0))) for a, s in sizes.items()}
        majority = {a: largest(s) for a, s in train_sizes.items()}
        fine_first = np.searchsorted(fine_of, np.arange(len(fine_keys)))

        # visits: every series holds the same test visits, in patient order
        pos = pl.DataFrame({"patient_id": ids, "_p": np.arange(len(ids))})
        df = df.join(pos, on="patient_id").sort("_p", "visit_index")
        order_m = df["method"].unique(maintain_order=True).to_list()
        if methods is not None:
            order_m = [m for m in methods if m in order_m] + [m for m in order_m if m not in methods]
        models = df["model"].unique(maintain_order=True).to_list()
        present = set(df.select("method", "model").unique().iter_rows())
        series = [(m, k) for m in order_m for k in models if (m, k) in present]
        parts = df.partition_by("method", "model", as_dict=True)
        first = parts[series[0]]
        vp, vi, y = first["_p"].to_numpy(), first["visit_index"].to_numpy(), first["y_true"].to_numpy()
        score = np.empty((len(series), len(vp)))
        pred = np.empty((len(series), len(vp)), np.int8)
        for s, key in enumerate(series):
            part = parts[key]
            if not (part.height == len(vp) and np.array_equal(part["_p"].to_numpy(), vp)
                    and np.array_equal(part["visit_index"].to_numpy(), vi)):
                raise DatasetError(f"series {key} does not cover the same test visits as {series[0]} "
                                   f"({part.height} vs {len(vp)} rows)", file=source,
                                   fix="audit a run in which every method and model predicted every test visit")
            if not np.array_equal(part["y_true"].to_numpy(), y):
                raise DatasetError(f"series {key} has other y_true values for the same visits", file=source,
                                   column="y_true")
            score[s], pred[s] = part["score"].to_numpy(), part["prediction"].to_numpy()
        visit_ptr = np.searchsorted(vp, np.arange(len(ids) + 1))
        died = np.bincount(vp, weights=y, minlength=len(ids)) > 0
        deaths = {a: np.bincount(labels[a], weights=died, minlength=len(categories[a])).astype(np.int64)
                  for a in categories}
        return cls(patient_ids=ids, fold=fold_code, folds=folds, categories=categories, labels=labels,
                   sizes=sizes, train_sizes=train_sizes, deaths=deaths, reference=reference, majority=majority,
                   fairness_min_share=fairness_min_share,
                   bounds=np.searchsorted(fine_of, np.arange(len(fine_keys) + 1)), fine_fold=fine_keys[:, 0],
                   fine_labels={a: labels[a][fine_first] for a in categories}, series=series,
                   visit_ptr=visit_ptr, y_true=y.astype(np.int8), score=score, prediction=pred, n_bins=n_bins,
                   X=_patient_sums(vp, y, score, pred, n_patients=len(ids), n_bins=n_bins))


def _patient_sums(visit_patient: np.ndarray, y: np.ndarray, score: np.ndarray, pred: np.ndarray, *,
                  n_patients: int, n_bins: int) -> np.ndarray:
    """(n, S, 4 + n_bins): confusion counts and per-bin sums of ``y - score`` of each patient."""
    X = np.zeros((n_patients, score.shape[0], 4 + n_bins))
    y = y.astype(np.float64)
    for s in range(score.shape[0]):
        p = pred[s].astype(np.float64)
        for q, w in enumerate((y * p, (1 - y) * p, y * (1 - p), (1 - y) * (1 - p))):
            X[:, s, q] = np.bincount(visit_patient, weights=w, minlength=n_patients)
        cell = visit_patient * n_bins + bin_index(score[s], n_bins=n_bins)
        X[:, s, 4:] = np.bincount(cell, weights=y - score[s], minlength=n_patients * n_bins).reshape(n_patients, n_bins)
    return X


# --------------------------------------------------------------------------- metrics on arrays
def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nan_quiet(fn: Callable, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def rates_from_counts(C: np.ndarray, *, n_bins: int = 0) -> dict[str, np.ndarray]:
    """Metrics from totals ``C[..., q]`` (``tp, fp, fn, tn``, then ``n_bins`` calibration residuals).

    NaN where undefined, as in :mod:`benchmarks.metrics`.
    """
    tp, fp, fn, tn = (C[..., q] for q in range(4))
    tpr = _div(tp, tp + fn)
    out = {"f1": _div(2 * tp, 2 * tp + fp + fn), "precision": _div(tp, tp + fp), "tpr": tpr,
           "fpr": _div(fp, fp + tn), "underdiagnosis": 1.0 - tpr, "selection_rate": _div(tp + fp, tp + fp + fn + tn)}
    if n_bins:
        out["calibration_error"] = _div(np.abs(C[..., 4:4 + n_bins]).sum(-1), tp + fp + fn + tn)
    return out


def _spread(x: np.ndarray) -> np.ndarray:
    return _nan_quiet(lambda a: np.nanmax(a, -1) - np.nanmin(a, -1), x)


def fairness_from_groups(m: Mapping[str, np.ndarray], *, majority: np.ndarray | int,
                         train_sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Every fairness measure of the harness from group metrics ``m[name][..., G]``."""
    weighted, averaged = disparate_impact(m["f1"], majority=majority, sizes=train_sizes)
    tpr_gap, fpr_gap = _spread(m["tpr"]), _spread(m["fpr"])
    return {"di_weighted": weighted, "di_averaged": averaged, "theil": theil_index(m["f1"]),
            "f1_variance": _nan_quiet(np.nanvar, m["f1"], -1), "equalized_odds": np.fmax(tpr_gap, fpr_gap),
            "equal_opportunity": tpr_gap, "fpr_difference": fpr_gap,
            "demographic_parity": _spread(m["selection_rate"]), "calibration_gap": _spread(m["calibration_error"])}


def gaps_from_groups(x: np.ndarray, *, reference: int) -> np.ndarray:
    """``x_g - x_reference`` for every group, then ``max - min``: shape (..., G + 1)."""
    return np.concatenate([x - x[..., reference:reference + 1], _spread(x)[..., None]], axis=-1)


# --------------------------------------------------------------------------- the resampling engine
def _one_blas_thread(fn: Callable) -> Callable:
    """Run ``fn`` with single-threaded BLAS: the engine makes many small products per chunk, where
    thread start-up and spinning cost more than they gain (15x slower with 2 threads on a busy
    2-core machine; ``python -m benchmarks.speed.bench_audit``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapper


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream]])


def _chunks(total: int, *, per_resample_bytes: float) -> list[int]:
    size = int(max(1, min(total, _CHUNK_BYTES // max(per_resample_bytes, 1))))
    return [min(size, total - i) for i in range(0, total, size)]


def _multinomial_weights(rng: np.random.Generator, fold_bounds: np.ndarray, size: int) -> np.ndarray:
    """(size, n) patient multiplicities: ``n_f`` draws with replacement within each fold."""
    parts = []
    for a, b in zip(fold_bounds[:-1], fold_bounds[1:]):
        k = int(b - a)
        parts.append(rng.multinomial(k, np.full(k, 1.0 / k), size=size).astype(np.float64) if k
                     else np.zeros((size, 0)))
    return np.concatenate(parts, axis=1)


def _fine_sums(W: np.ndarray, X2: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(c, K, m) totals of every fine cell: one matrix product per contiguous cell."""
    out = np.empty((W.shape[0], len(bounds) - 1, X2.shape[1]))
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[:, k] = W[:, a:b] @ X2[a:b]
    return out


def _cell_sums(fine: np.ndarray, design: Design, attribute: str) -> np.ndarray:
    """Fine-cell totals (c, K, S, Q) -> (c, F, S, G, Q) per fold and group of ``attribute``."""
    F, G = design.n_folds, len(design.categories[attribute])
    c, K = fine.shape[:2]
    ind = np.zeros((F * G, K))
    ind[design.fine_fold * G + design.fine_labels[attribute], np.arange(K)] = 1.0
    return np.moveaxis((ind @ fine.reshape(c, K, -1)).reshape(c, F, G, *fine.shape[2:]), 2, 3)


def _fold_statistics(cells: np.ndarray, design: Design, attribute: str, aggregate: Aggregate,
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-fold group metrics (c, F', S, G), fairness (c, F', S), gaps (c, F', S, G+1)."""
    majority, train = design.majority[attribute], design.train_sizes[attribute]
    if aggregate == "pooled":
        cells, train = cells.sum(1, keepdims=True), train.sum(0, keepdims=True)
        majority = np.array([len(train[0]) - 1 - np.argmax(train[0, ::-1])])
    rates = rates_from_counts(cells, n_bins=design.n_bins)
    share = design.fairness_min_share
    if share > 0:  # small groups are left out of the fairness measures (NaN groups are skipped)
        kept = (train > 0) & (train / train.sum(1, keepdims=True) >= share)  # (F', G)
        in_fairness = {k: np.where(kept[None, :, None, :], v, np.nan) for k, v in rates.items()}
    else:
        in_fairness = rates
    fair = fairness_from_groups(in_fairness, majority=majority[None, :, None], train_sizes=train[None, :, None, :])
    gaps = {m: gaps_from_groups(rates[m], reference=design.reference[attribute]) for m in GAP_METRICS}
    return rates, fair, gaps


def _finish(x: np.ndarray, design: Design, *, series: Sequence[int] | None = None,
            model_means: bool = True) -> np.ndarray:
    """Per-fold (c, F, S, ...) -> (c, S', ...): append each method's model mean (taken within each
    fold, NaN skipped), then the mean over folds. ``series`` names the design series of axis 2."""
    if model_means:
        idx = list(range(len(design.series))) if series is None else list(series)
        methods = [design.series[s][0] for s in idx]
        member = np.array([[m == mm for mm in dict.fromkeys(methods)] for m in methods], np.float64)  # (S, M)
        xs = np.moveaxis(x, 2, -1)
        valid = ~np.isnan(xs)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (np.where(valid, xs, 0.0) @ member) / (valid @ member)  # NaN where no model is defined
        x = np.concatenate([x, np.moveaxis(means, -1, 2)], axis=2)
    return _nan_quiet(np.nanmean, x, 1)


def _series_labels(design: Design, series: Sequence[int] | None = None) -> list[tuple[str, str]]:
    idx = list(range(len(design.series))) if series is None else list(series)
    labels = [design.series[s] for s in idx]
    return labels + [(m, MODEL_MEAN) for m in dict.fromkeys(m for m, _ in labels)]


def _paired_difference(a: np.ndarray, r: np.ndarray, design: Design, pairs: np.ndarray) -> np.ndarray:
    """Finished ``stat(method) - stat(reference)`` for per-fold (c, F, P) statistics of the pairs;
    a method's ``mean`` row averages only over the models that both methods have."""
    return _finish(a, design, series=pairs) - _finish(r, design, series=pairs)


class _AurocPlan:
    """Bootstrap AUROC of every (fold, series, group) cell of one attribute in one vectorised pass.

    Within a cell, negatives are sorted by score and laid end to end over all cells; ``CN`` is the
    running sum of their resampled weights. A positive visit with score ``s`` beats the negatives
    below ``s`` and ties half of those equal to ``s``: the mean of the negative weight with score
    ``< s`` and ``<= s``, two look-ups in ``CN`` at precomputed positions. The AUROC of a cell is
    ``sum_pos w_i below_i / (P N)``. Per resample this costs one gather and one cumulative sum over
    the negative visits and a few gathers over the positive visits.
    """

    def __init__(self, design: Design, attribute: str, aggregate: Aggregate) -> None:
        self.F = design.n_folds if aggregate == "fold_mean" else 1
        self.G = len(design.categories[attribute])
        vpat, y = design.visit_patient, design.y_true.astype(bool)
        neg_pat, pos_pat, lo, hi, base, pos_start, neg_bounds, items = [], [], [], [], [], [], [], []
        n_neg = n_pos = 0
        for f in range(self.F):
            for g in range(self.G):
                keep = design.labels[attribute] == g
                if aggregate == "fold_mean":
                    keep &= design.fold == f
                idx = np.flatnonzero(keep[vpat])
                ip, ineg = idx[y[idx]], idx[~y[idx]]
                if len(ip) == 0 or len(ineg) == 0:
                    continue  # AUROC undefined in every resample
                for s in range(len(design.series)):
                    o = np.argsort(design.score[s, ineg], kind="stable")
                    sn = design.score[s, ineg[o]]
                    lo.append(n_neg + np.searchsorted(sn, design.score[s, ip], side="left"))
                    hi.append(n_neg + np.searchsorted(sn, design.score[s, ip], side="right"))
                    base.append(np.full(len(ip), n_neg))
                    neg_pat.append(vpat[ineg[o]])
                    pos_pat.append(vpat[ip])
                    pos_start.append(n_pos)
                    neg_bounds.append((n_neg, n_neg + len(ineg)))
                    items.append((f, s, g))
                    n_neg, n_pos = n_neg + len(ineg), n_pos + len(ip)
        # int32 indices halve the plan's memory (S x visits entries per attribute) when they fit
        itype = np.int32 if max(n_neg, n_pos, design.n_patients) < 2**31 - 1 else np.int64
        cat = lambda x: np.concatenate(x).astype(itype) if x else np.zeros(0, itype)  # noqa: E731
        self.neg_pat, self.pos_pat, self.lo, self.hi, self.base = map(cat, (neg_pat, pos_pat, lo, hi, base))
        self.pos_start = np.asarray(pos_start, np.int64)
        self.neg_bounds = np.asarray(neg_bounds, np.int64).reshape(-1, 2)
        self.items = np.asarray(items, np.int64).reshape(-1, 3)

    def __call__(self, W: np.ndarray, n_series: int) -> np.ndarray:
        """Per-fold AUROC (c, F', S, G) under resample weights ``W`` (c, n)."""
        out = np.full((W.shape[0], self.F, n_series, self.G), np.nan)
        if len(self.items) == 0:
            return out
        f, s, g = self.items.T
        rows = max(1, int(_AUROC_BYTES // (8 * 3 * (len(self.neg_pat) + 4 * len(self.pos_pat)))))
        for r in range(0, W.shape[0], rows):
            Wr = W[r:r + rows]
            cn = np.zeros((len(Wr), len(self.neg_pat) + 1))
            np.cumsum(Wr[:, self.neg_pat], axis=1, out=cn[:, 1:])
            wp = Wr[:, self.pos_pat]
            below = 0.5 * (cn[:, self.lo] + cn[:, self.hi]) - cn[:, self.base]
            num = np.add.reduceat(wp * below, self.pos_start, axis=1)
            P = np.add.reduceat(wp, self.pos_start, axis=1)
            N = cn[:, self.neg_bounds[:, 1]] - cn[:, self.neg_bounds[:, 0]]
            out[r:r + rows, f, s, g] = _div(num, P * N)
        return out


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    a = (1.0 - level) / 2
    lo, hi = _nan_quiet(np.nanquantile, reps, [a, 1 - a], axis=0)
    return lo, hi


def permutation_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """Two-sided ``(1 + #{|null| >= |observed|}) / (1 + #valid)`` over axis 0 of ``null``.

    NaN resamples are not counted; NaN where the observed statistic is NaN.
    """
    valid = ~np.isnan(null)
    tol = 1e-12 * np.maximum(1.0, np.abs(observed))
    extreme = valid & (np.abs(np.where(valid, null, 0.0)) >= np.abs(observed) - tol)
    p = (1.0 + extreme.sum(0)) / (1.0 + valid.sum(0))
    return np.where(np.isnan(observed), np.nan, p)


# --------------------------------------------------------------------------- bootstrap
Key = tuple[str, str, str]


@dataclass
class BootstrapResult:
    """Point estimates and bootstrap replicates of every statistic of a :class:`Design`.

    ``estimates[key]`` has shape (S', ...) and ``replicates[key]`` (B, S', ...) over ``series``
    (the design's series, then one ``MODEL_MEAN`` series per method). Keys:
    ``("group", attribute, metric)`` (..., G); ``("fairness", attribute, metric)`` (scalar);
    ``("gap", attribute, metric)`` (..., G + 1: each group minus the reference, then max - min);
    ``("compare", attribute, metric)`` over ``compare_series`` (method minus reference, paired).
    """

    series: list[tuple[str, str]]
    compare_series: list[tuple[str, str]]
    estimates: dict[Key, np.ndarray]
    replicates: dict[Key, np.ndarray]
    n_resamples: int
    level: float
    seed: int
    aggregate: str
    reference: str

    def interval(self, key: Key) -> tuple[np.ndarray, np.ndarray]:
        """Percentile interval of ``key`` at ``level``."""
        return _percentile_ci(self.replicates[key], self.level)


def _compare_keys(design: Design, metrics: Sequence[str]) -> list[tuple[str, str]]:
    keys = [(ALL, "f1")] if "f1" in metrics else []
    return keys + [(a, m) for a in design.attributes for m in metrics if m != "f1"]


def _fold_stat(pf: Mapping[Key, np.ndarray], attribute: str, metric: str) -> np.ndarray:
    """Per-fold (c, F, S) array of a comparison statistic."""
    return pf[("group", ALL, "f1")][..., 0] if metric == "f1" else pf[("fairness", attribute, metric)]


def _of_means(f1: np.ndarray, design: Design, attribute: str, *, series: Sequence[int] | None = None,
              ) -> dict[str, np.ndarray]:
    """The paper's aggregation from per-fold group F1s (c, F', S, G): an undefined F1 counts as 0,
    the mean over models and folds is taken first, then Theil / DI / SD over every group, weighted
    by the groups' patients (:func:`benchmarks.metrics.fairness_of_means`). Returns (c, S') arrays."""
    means = _finish(np.nan_to_num(f1, nan=0.0), design, series=series)
    return fairness_of_means(means, sizes=design.sizes[attribute].sum(0))


def _difference(pf: Mapping[Key, np.ndarray], design: Design, attribute: str, metric: str, pa: np.ndarray,
                pr: np.ndarray) -> np.ndarray:
    """Finished ``stat(method) - stat(reference)`` of the pairs from per-fold statistics ``pf``."""
    if metric in PAPER_FAIRNESS_METRICS:
        f1 = pf[("group", attribute, "f1")]
        return (_of_means(f1[:, :, pa], design, attribute, series=pa)[metric]
                - _of_means(f1[:, :, pr], design, attribute, series=pa)[metric])
    v = _fold_stat(pf, attribute, metric)
    return _paired_difference(v[:, :, pa], v[:, :, pr], design, pa)


def _statistics(fine: np.ndarray, design: Design, aggregate: Aggregate,
                auroc: Mapping[str, _AurocPlan] | None, W: np.ndarray) -> dict[Key, np.ndarray]:
    """Every per-fold statistic (c, F', S, ...) from fine-cell totals (c, K, S, Q)."""
    out: dict[Key, np.ndarray] = {}
    for attr in design.categories:
        rates, fair, gaps = _fold_statistics(_cell_sums(fine, design, attr), design, attr, aggregate)
        if auroc is not None:
            rates["auroc"] = auroc[attr](W, fine.shape[2])
        out |= {("group", attr, k): v for k, v in rates.items()}
        if attr != ALL:
            out |= {("fairness", attr, k): v for k, v in fair.items()}
            out |= {("gap", attr, k): v for k, v in gaps.items()}
    return out


@_one_blas_thread
def bootstrap(design: Design, *, n_resamples: int = 1000, level: float = 0.95, seed: int = 0,
              aggregate: Aggregate = "fold_mean", auroc: bool = True, reference: str = "original",
              progress: Callable[[int], None] | None = None) -> BootstrapResult:
    """Patient-level bootstrap of every per-group metric, fairness measure, gap and comparison.

    Parameters
    ----------
    design : the run's predictions (:meth:`Design.from_predictions`).
    n_resamples : bootstrap resamples (multinomial within each fold).
    level : coverage of the percentile intervals.
    seed : the same design, seed and ``n_resamples`` give the same result.
    aggregate : ``"fold_mean"`` (per fold, then the mean over folds, as the harness) or ``"pooled"``.
    auroc : also bootstrap the per-group AUROC (the costliest part on large runs).
    reference : the method that comparisons are made against.
    progress : called with the number of resamples done after each chunk.
    """
    n, S, Q = design.X.shape
    X2 = design.X.reshape(n, S * Q)
    plans = {a: _AurocPlan(design, a, aggregate) for a in design.categories} if auroc else None
    pa, pr = design.pairs(reference)
    ckeys = _compare_keys(design, COMPARE_METRICS)

    def stats(W: np.ndarray) -> dict[Key, np.ndarray]:
        pf = _statistics(_fine_sums(W, X2, design.bounds).reshape(len(W), -1, S, Q), design, aggregate, plans, W)
        out = {k: _finish(v, design) for k, v in pf.items()}
        for a in design.attributes:  # the paper's aggregation: on the finished group F1s
            out |= {("fairness", a, k): v for k, v in _of_means(pf[("group", a, "f1")], design, a).items()}
        if len(pa):
            for a, m in ckeys:
                out[("compare", a, m)] = _difference(pf, design, a, m, pa, pr)
        return out

    est = {k: v[0] for k, v in stats(np.ones((1, n))).items()}
    rng = _rng(seed, "bootstrap")
    per = 8.0 * (3 * n + 3 * (len(design.bounds) - 1) * S * Q)
    reps: dict[Key, list[np.ndarray]] = {k: [] for k in est}
    done = 0
    for c in _chunks(n_resamples, per_resample_bytes=per):
        for k, v in stats(_multinomial_weights(rng, design.fold_bounds, c)).items():
            reps[k].append(v)
        done += c
        if progress is not None:
            progress(done)
    return BootstrapResult(series=_series_labels(design), compare_series=_series_labels(design, pa),
                           estimates=est, replicates={k: np.concatenate(v) for k, v in reps.items()},
                           n_resamples=n_resamples, level=level, seed=seed, aggregate=aggregate, reference=reference)


# --------------------------------------------------------------------------- permutation tests
@_one_blas_thread
def paired_permutation(design: Design, *, reference: str = "original", n_permutations: int = 1000, seed: int = 0,
                       aggregate: Aggregate = "fold_mean", metrics: Sequence[str] = COMPARE_METRICS,
                       ) -> tuple[list[tuple[str, str]], dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """Paired permutation test of ``stat(method) - stat(reference)`` for the same model.

    Each resample swaps the two methods' predictions for a random half of the patients, the same
    swap for every model, so the ``mean`` row (over the models both methods have) is paired too.
    ``f1`` is the whole-population F1; the fairness measures (``theil``, ``di_*``, the min-max gaps)
    are per attribute.

    Returns
    -------
    series : ``[(method, model)]`` of the rows (non-reference series with a reference, then means).
    results : ``{(attribute, metric): (observed (P',), p_value (P',))}``.
    """
    pa, pr = design.pairs(reference)
    labels = _series_labels(design, pa) if len(pa) else []
    keys = _compare_keys(design, metrics)
    if len(pa) == 0:
        return labels, {k: (np.zeros(0), np.zeros(0)) for k in keys}
    n, Q = design.n_patients, design.X.shape[2]
    A, R = design.X[:, pa].reshape(n, -1), design.X[:, pr].reshape(n, -1)
    ones = np.ones((1, n))
    base_a, base_r = _fine_sums(ones, A, design.bounds), _fine_sums(ones, R, design.bounds)

    def diff(fa: np.ndarray, fr: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        shape = fa.shape[:2] + (len(pa), Q)
        out = {}
        for attr in dict.fromkeys(a for a, _ in keys):
            ga = _fold_statistics(_cell_sums(fa.reshape(shape), design, attr), design, attr, aggregate)
            gr = _fold_statistics(_cell_sums(fr.reshape(shape), design, attr), design, attr, aggregate)
            for a, m in keys:
                if a == attr and m in PAPER_FAIRNESS_METRICS:
                    out[(a, m)] = (_of_means(ga[0]["f1"], design, a, series=pa)[m]
                                   - _of_means(gr[0]["f1"], design, a, series=pa)[m])
                elif a == attr:
                    va, vr = (g[0]["f1"][..., 0] if m == "f1" else g[1][m] for g in (ga, gr))
                    out[(a, m)] = _paired_difference(va, vr, design, pa)
        return out

    observed = {k: v[0] for k, v in diff(base_a, base_r).items()}
    dX = R - A
    rng = _rng(seed, "paired")
    null: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in observed}
    for c in _chunks(n_permutations, per_resample_bytes=8.0 * (2 * n + 4 * (len(design.bounds) - 1) * A.shape[1])):
        swap = rng.integers(0, 2, size=(c, n)).astype(np.float64)
        D = _fine_sums(swap, dX, design.bounds)
        for k, v in diff(base_a + D, base_r - D).items():
            null[k].append(v)
    return labels, {k: (observed[k], permutation_p_value(observed[k], np.concatenate(null[k]))) for k in observed}


@_one_blas_thread
def group_permutation(design: Design, *, n_permutations: int = 1000, seed: int = 0,
                      aggregate: Aggregate = "fold_mean", metrics: Sequence[str] = GAP_METRICS,
                      ) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Permutation test of every group gap within each series.

    Group labels are permuted across the patients of each fold; all series share a permutation.

    Returns
    -------
    dict
        ``{(attribute, metric): (observed (S', G + 1), p_value (S', G + 1))}`` over the design's
        series and model means: the gap of each group to the reference (NaN p for the reference
        itself), then ``max - min``.
    """
    n, S, Q = design.X.shape
    X2 = design.X.reshape(n, S * Q)
    fb, F = design.fold_bounds, design.n_folds
    rng = _rng(seed, "groups")
    observed_all = _statistics(_fine_sums(np.ones((1, n)), X2, design.bounds).reshape(1, -1, S, Q), design,
                               aggregate, None, np.ones((1, n)))
    out = {}
    for attr in design.attributes:
        G, ref = len(design.categories[attr]), design.reference[attr]
        observed = {m: _finish(observed_all[("gap", attr, m)], design)[0] for m in metrics}
        null: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
        for c in _chunks(n_permutations, per_resample_bytes=8.0 * (3 * n + 2 * F * G * S * Q)):
            cells = np.empty((c, F, G, S * Q))
            for f, (a, b) in enumerate(zip(fb[:-1], fb[1:])):
                lab = rng.permuted(np.broadcast_to(design.labels[attr][a:b], (c, b - a)), axis=1)
                rows = (np.arange(c)[:, None] * G + lab).ravel()
                onehot = sp.csr_matrix((np.ones(rows.size), (rows, np.tile(np.arange(b - a), c))), shape=(c * G, b - a))
                cells[:, f] = np.asarray(onehot @ X2[a:b]).reshape(c, G, S * Q)
            cells = np.moveaxis(cells.reshape(c, F, G, S, Q), 2, 3)
            _, _, gaps = _fold_statistics(cells, design, attr, aggregate)
            for m in metrics:
                null[m].append(_finish(gaps[m], design))
        for m in metrics:
            p = permutation_p_value(observed[m], np.concatenate(null[m]))
            p[..., ref] = np.nan
            out[(attr, m)] = (observed[m], p)
    return out


# --------------------------------------------------------------------------- threshold sweep
@_one_blas_thread
def bootstrap_threshold_sweep(design: Design, *, series: Sequence[int] | None = None,
                              thresholds: Sequence[float] = DEFAULT_THRESHOLDS, n_resamples: int = 1000,
                              level: float = 0.95, seed: int = 0, aggregate: Aggregate = "fold_mean") -> pl.DataFrame:
    """Per-group TPR / FPR / underdiagnosis at each threshold (positive if ``score > t``), with
    bootstrap intervals, and their gaps to the reference group (``*_gap``).

    Uses the resamples of :func:`bootstrap` (same seed). Returns a long frame: ``method, model,
    attribute, group, threshold, metric, estimate, ci_low, ci_high``.
    """
    sel = list(range(len(design.series))) if series is None else list(series)
    t = np.asarray(thresholds, np.float64)
    n, T, vpat = design.n_patients, len(t), design.visit_patient
    y = design.y_true.astype(np.float64)
    X = np.zeros((n, len(sel), 2 * T + 2))
    for j, s in enumerate(sel):
        above = design.score[s][:, None] > t[None, :]
        X[:, j, -2] = np.bincount(vpat, weights=y, minlength=n)
        X[:, j, -1] = np.bincount(vpat, weights=1 - y, minlength=n)
        for i in range(T):
            X[:, j, i] = np.bincount(vpat, weights=y * above[:, i], minlength=n)
            X[:, j, T + i] = np.bincount(vpat, weights=(1 - y) * above[:, i], minlength=n)
    X2 = X.reshape(n, -1)

    def stats(W: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        fine = _fine_sums(W, X2, design.bounds).reshape(len(W), -1, len(sel), 2 * T + 2)
        out = {}
        for attr in design.categories:
            cells = _cell_sums(fine, design, attr)  # (c, F, S, G, Q)
            if aggregate == "pooled":
                cells = cells.sum(1, keepdims=True)
            tpr, fpr = _div(cells[..., :T], cells[..., -2:-1]), _div(cells[..., T:2 * T], cells[..., -1:])
            ref = design.reference[attr]
            d = {"tpr": tpr, "fpr": fpr, "underdiagnosis": 1 - tpr}
            d |= {f"{k}_gap": v - v[..., ref:ref + 1, :] for k, v in list(d.items())}
            out |= {(attr, k): _finish(v, design, model_means=False) for k, v in d.items()}  # (c, S, G, T)
        return out

    est = stats(np.ones((1, n)))
    rng = _rng(seed, "bootstrap")
    reps: dict[tuple[str, str], list[np.ndarray]] = {k: [] for k in est}
    for c in _chunks(n_resamples, per_resample_bytes=8.0 * (3 * n + 3 * (len(design.bounds) - 1) * X2.shape[1])):
        for k, v in stats(_multinomial_weights(rng, design.fold_bounds, c)).items():
            reps[k].append(v)
    rows = []
    for (attr, k), e in est.items():
        lo, hi = _percentile_ci(np.concatenate(reps[(attr, k)]), level)
        for j, s in enumerate(sel):
            for g, name in enumerate(design.categories[attr]):
                if k.endswith("_gap") and g == design.reference[attr]:
                    continue
                rows += [(*design.series[s], attr, name, float(t[i]), k, e[0, j, g, i], lo[j, g, i], hi[j, g, i])
                         for i in range(T)]
    return pl.DataFrame(rows, orient="row", schema={
        "method": pl.String, "model": pl.String, "attribute": pl.String, "group": pl.String,
        "threshold": pl.Float64, "metric": pl.String, "estimate": pl.Float64, "ci_low": pl.Float64,
        "ci_high": pl.Float64})


# --------------------------------------------------------------------------- tidy tables
def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values; NaN entries left out."""
    from scipy.stats import false_discovery_control

    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


@dataclass
class AuditTables:
    """Tidy results of :func:`audit_statistics` (one row per statistic).

    group_metrics : method, model, attribute, group, n_patients, n_deaths, metric, estimate, ci_low, ci_high
    fairness : method, model, attribute, metric, estimate, ci_low, ci_high
    gaps : method, model, attribute, group, reference, metric, estimate, ci_low, ci_high, p_value, q_value
    comparisons : method, reference, model, attribute, metric, estimate (method - reference),
        ci_low, ci_high, p_value, q_value
    params : the resampling settings.

    ``q_value``: Benjamini-Hochberg within each table and metric.
    """

    group_metrics: pl.DataFrame
    fairness: pl.DataFrame
    gaps: pl.DataFrame
    comparisons: pl.DataFrame
    params: dict

    def long(self) -> pl.DataFrame:
        """The four tables in one long frame; ``table`` names the source."""
        return pl.concat([getattr(self, t).with_columns(table=pl.lit(t))
                          for t in ("group_metrics", "fairness", "gaps", "comparisons")], how="diagonal_relaxed")


_FLOATS = ("estimate", "ci_low", "ci_high", "p_value")


def _frame(rows: list[tuple], columns: Sequence[str]) -> pl.DataFrame:
    schema = {c: (pl.Float64 if c in _FLOATS else pl.Int64 if c.startswith("n_") else pl.String) for c in columns}
    return pl.DataFrame([tuple(float(v) if columns[i] in _FLOATS else v for i, v in enumerate(r)) for r in rows],
                        orient="row", schema=schema)


def _with_q(df: pl.DataFrame) -> pl.DataFrame:
    q = np.full(df.height, np.nan)
    for metric in df["metric"].unique().to_list():
        idx = np.flatnonzero((df["metric"] == metric).to_numpy())
        q[idx] = _bh(df["p_value"].to_numpy()[idx].astype(np.float64))
    return df.with_columns(q_value=pl.Series(q, dtype=pl.Float64))


def audit_statistics(design: Design, *, reference: str = "original", n_resamples: int = 1000,
                     n_permutations: int = 1000, level: float = 0.95, seed: int = 0,
                     aggregate: Aggregate = "fold_mean", auroc: bool = True) -> AuditTables:
    """Bootstrap intervals for every statistic, permutation p-values for gaps and comparisons."""
    boot = bootstrap(design, n_resamples=n_resamples, level=level, seed=seed, aggregate=aggregate, auroc=auroc,
                     reference=reference)
    rows_g, rows_f, rows_gap, rows_c = [], [], [], []
    for key, est in boot.estimates.items():
        kind, attr, metric = key
        if kind not in ("group", "fairness"):
            continue
        lo, hi = boot.interval(key)
        for s, (m, k) in enumerate(boot.series):
            if kind == "group":
                size, deaths = design.sizes[attr].sum(0), design.deaths[attr]
                rows_g += [(m, k, attr, g, int(size[j]), int(deaths[j]), metric, est[s, j], lo[s, j], hi[s, j])
                           for j, g in enumerate(design.categories[attr])]
            else:
                rows_f.append((m, k, attr, metric, est[s], lo[s], hi[s]))
    for (attr, metric), (_, p) in group_permutation(design, n_permutations=n_permutations, seed=seed,
                                                    aggregate=aggregate).items():
        est, (lo, hi) = boot.estimates[("gap", attr, metric)], boot.interval(("gap", attr, metric))
        cats, ref = design.categories[attr], design.reference[attr]
        for s, (m, k) in enumerate(boot.series):
            rows_gap += [(m, k, attr, g, cats[ref], metric, est[s, j], lo[s, j], hi[s, j], p[s, j])
                         for j, g in enumerate([*cats, RANGE]) if j != ref]
    labels, paired = paired_permutation(design, reference=reference, n_permutations=n_permutations, seed=seed,
                                        aggregate=aggregate)
    for (attr, metric), (obs, p) in paired.items():
        if not len(obs):  # one method only: nothing to compare
            continue
        lo, hi = boot.interval(("compare", attr, metric))
        rows_c += [(m, reference, k, attr, metric, obs[s], lo[s], hi[s], p[s]) for s, (m, k) in enumerate(labels)]
    base = ["method", "model", "attribute"]
    return AuditTables(
        group_metrics=_frame(rows_g, [*base, "group", "n_patients", "n_deaths", "metric", "estimate", "ci_low",
                                      "ci_high"]),
        fairness=_frame(rows_f, [*base, "metric", "estimate", "ci_low", "ci_high"]),
        gaps=_with_q(_frame(rows_gap, [*base, "group", "reference", "metric", "estimate", "ci_low", "ci_high",
                                       "p_value"])),
        comparisons=_with_q(_frame(rows_c, ["method", "reference", "model", "attribute", "metric", "estimate",
                                            "ci_low", "ci_high", "p_value"])),
        params={"n_resamples": n_resamples, "n_permutations": n_permutations, "level": level, "seed": seed,
                "aggregate": aggregate, "interval": "percentile", "resampling_unit": "patient",
                "bootstrap_strata": "fold", "permutation_p": "(1 + #extreme) / (1 + #valid)",
                "reference_method": reference, "n_bins": design.n_bins,
                "fairness_min_share": design.fairness_min_share,
                "reference_groups": {a: design.categories[a][design.reference[a]] for a in design.attributes}})
