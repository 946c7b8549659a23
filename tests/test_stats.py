"""Patient-level bootstrap and permutation tests: agreement with the harness, coverage, uniformity."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats as sst

from benchmarks import metrics as M
from benchmarks.speed.bench_audit import simulate_predictions
from benchmarks.stats import (ALL, Design, audit_statistics, bootstrap, bootstrap_threshold_sweep, disparate_impact,
                              group_permutation, paired_permutation, permutation_p_value, theil_index)
from halo_balance.errors import DatasetError

GROUPS = {"age": {"a": 0.06, "b": 0.64, "c": 0.3}, "gender": {"F": 0.5, "M": 0.5}}


def harness_summary(df: pl.DataFrame, groups: list[str], *, min_share: float = 0.0) -> pl.DataFrame:
    """The harness's own per-unit metrics and fold summary of a predictions table."""
    patients = df.select("patient_id", "fold", *groups).unique()
    frames = []
    for (fold, _, _), part in df.partition_by("fold", "method", "model", as_dict=True).items():
        train = patients.filter(pl.col("fold") != fold)
        sizes = {}
        for name, attrs in M.groupings(groups):
            names, counts = np.unique(M.group_labels(train, attrs).to_numpy(), return_counts=True)
            sizes[name] = dict(zip(names.tolist(), counts.tolist()))
        frames.append(M.unit_metrics(part, attributes=groups, train_sizes=sizes, min_share=min_share))
    return M.summarise(pl.concat(frames)).with_columns(pl.col("attribute", "group").fill_null(ALL))


@pytest.mark.parametrize("min_share", [0.0, 0.08])  # 0.08 leaves age group "a" (6%) out of fairness
def test_point_estimates_equal_the_harness_summary(min_share):
    df = simulate_predictions(n_patients=300, n_folds=3, methods={"original": 0.0, "upsample": 0.7},
                              models=["logreg", "rf"], groups=GROUPS, group_shift={"gender": {"F": -1.0}}, seed=3)
    df = df.filter(~((pl.col("method") == "upsample") & (pl.col("model") == "rf")))  # a missing unit
    design = Design.from_predictions(df, groups=["age", "gender"], fairness_min_share=min_share)
    tab = audit_statistics(design, n_resamples=20, n_permutations=20)
    mine = pl.concat([tab.group_metrics.select("method", "model", "attribute", "group", "metric", "estimate"),
                      tab.fairness.with_columns(group=pl.lit(ALL))
                      .select("method", "model", "attribute", "group", "metric", "estimate")])
    joined = harness_summary(df, ["age", "gender"], min_share=min_share).join(
        mine, on=["method", "model", "attribute", "group", "metric"], how="inner")
    # every harness metric except the counts and recall (= tpr) has a counterpart
    assert joined.height > 350
    assert set(joined["metric"].unique()) >= {"f1", "precision", "tpr", "fpr", "underdiagnosis", "auroc",
                                              "calibration_error", "di_weighted", "di_averaged", "theil",
                                              "equalized_odds", "demographic_parity", "fpr_difference"}
    assert set(joined["model"].unique()) == {"logreg", "rf", "mean"}
    assert {"age & gender"} <= set(joined["attribute"].unique())
    np.testing.assert_allclose(joined["estimate"].to_numpy(), joined["mean"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_array_fairness_functions_equal_the_harness_scalar_ones():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (200, 4))
    x[rng.random(x.shape) < 0.2] = np.nan
    x[:10] = 0.0
    x[10:15, :] = np.nan
    sizes = rng.integers(0, 50, (200, 4))
    majority = np.argmax(sizes, axis=1)
    sizes[np.arange(200), majority] += 100
    t = theil_index(x)
    w, a = disparate_impact(x, majority=majority, sizes=sizes)
    for i in range(200):
        names = list("abcd")
        f1 = dict(zip(names, x[i]))
        ref_w, ref_a = M.fairplay_disparate_impact(f1, {g: s for g, s in zip(names, sizes[i]) if s > 0})
        np.testing.assert_allclose([t[i], w[i], a[i]], [M.theil_index_f1(x[i]), ref_w, ref_a], equal_nan=True)


def test_weighted_auroc_equals_sklearn_on_duplicated_visits():
    from sklearn.metrics import roc_auc_score

    df = simulate_predictions(n_patients=120, n_folds=2, models=["knn"], seed=1)
    df = df.with_columns((pl.col("score") * 5).round() / 5)  # ties, as kNN votes give
    d = Design.from_predictions(df, groups=["gender"])
    res = bootstrap(d, n_resamples=3, seed=0)
    frame = df.sort("patient_id", "visit_index")
    for f in range(2):
        part = frame.filter(pl.col("fold") == f)
        for gi, g in enumerate(d.categories["gender"]):
            sub = part.filter(pl.col("gender") == g)
            # point estimate: the per-fold AUROC averaged over folds, as sklearn computes it
            assert np.isfinite(roc_auc_score(sub["y_true"], sub["score"]))
    expected = np.mean([roc_auc_score(p["y_true"], p["score"]) for p in frame.partition_by("fold")])
    assert res.estimates[("group", ALL, "auroc")][0, 0] == pytest.approx(expected)
    # a resample = patients repeated: compare one replicate with sklearn on the repeated visits
    from benchmarks.stats import _AurocPlan, _multinomial_weights, _rng
    W = _multinomial_weights(_rng(0, "bootstrap"), d.fold_bounds, 1)
    got = _AurocPlan(d, ALL, "pooled")(W, 1)[0, 0, 0, 0]
    reps = np.repeat(np.arange(len(d.y_true)), W[0, d.visit_patient].astype(int))
    assert got == pytest.approx(roc_auc_score(d.y_true[reps], d.score[0, reps]))


def _clustered_fpr_predictions(rng: np.random.Generator, n_patients: int, n_series: int) -> pl.DataFrame:
    """Negative visits only; each patient has its own false-positive propensity (strong clustering).

    Group A (60%): propensity ~ Beta(0.5, 2), mean 0.2; group B: Beta(1, 2), mean 1/3. The
    visit-weighted FPR of a group therefore has population value 0.2 (A) and 1/3 (B) and the gap
    B - A is 2/15, since visit counts do not depend on the propensity.
    """
    n_vis = 1 + rng.poisson(5, n_patients)
    pid = np.repeat(np.arange(n_patients), n_vis)
    group = np.where(rng.random(n_patients) < 0.6, "A", "B")
    frames = []
    for s in range(n_series):
        prop = np.where(group == "A", rng.beta(0.5, 2, n_patients), rng.beta(1, 2, n_patients))
        pred = (rng.random(len(pid)) < prop[pid]).astype(np.int8)
        frames.append(pl.DataFrame({
            "fold": (pid % 2).astype(np.int32), "method": f"r{s:03d}", "model": "m",
            "patient_id": pid.astype(str),
            "visit_index": np.arange(len(pid)) - np.repeat(np.cumsum(n_vis) - n_vis, n_vis),
            "g": group[pid], "y_true": np.zeros(len(pid), np.int8), "score": pred * 0.8 + 0.1, "prediction": pred}))
    return pl.concat(frames)


def _coverage(df: pl.DataFrame, *, visit_level: bool) -> tuple[float, float]:
    if visit_level:  # every visit its own patient: the bootstrap ignores the clustering
        df = df.with_columns(patient_id=pl.concat_str("patient_id", pl.lit("-"), "visit_index"), visit_index=pl.lit(0))
    d = Design.from_predictions(df, groups=["g"])
    res = bootstrap(d, n_resamples=200, seed=7, auroc=False)
    lo, hi = res.interval(("group", "g", "fpr"))
    glo, ghi = res.interval(("gap", "g", "fpr"))
    S = len(d.series)  # one replication per series; rows past S are per-method means (identical)
    a = d.categories["g"].index("A")
    cover = (lo[:S, a] <= 0.2) & (0.2 <= hi[:S, a])
    b = d.categories["g"].index("B")
    cover_gap = (glo[:S, b] <= 2 / 15) & (2 / 15 <= ghi[:S, b])
    return float(cover.mean()), float(cover_gap.mean())


def test_patient_bootstrap_covers_at_nominal_rate_and_visit_bootstrap_does_not():
    """200 replications of 80 clustered patients (~480 visits), 95% percentile intervals."""
    df = _clustered_fpr_predictions(np.random.default_rng(2026), n_patients=80, n_series=200)
    cov, cov_gap = _coverage(df, visit_level=False)
    naive, naive_gap = _coverage(df, visit_level=True)
    # binomial sd of a coverage over 200 replications is ~0.016 at 0.95
    assert 0.90 <= cov <= 0.99 and 0.90 <= cov_gap <= 0.99
    # ignoring the clustering understates the variance (design effect ~2.4): clearly under-covers
    assert naive < 0.86 and naive_gap < 0.86
    assert cov - naive > 0.08


def _null_group_p_values(*, visit_level: bool, reps: int = 150) -> np.ndarray:
    rng = np.random.default_rng(11)
    out = []
    for r in range(reps):
        df = simulate_predictions(n_patients=60, n_folds=2, patient_sd=1.5, mean_extra_visits=3.0,
                                  groups={"g": {"A": 0.5, "B": 0.5}}, seed=int(rng.integers(1 << 31)))
        if visit_level:
            df = df.with_columns(patient_id=pl.concat_str("patient_id", pl.lit("-"), "visit_index"),
                                 visit_index=pl.lit(0))
        d = Design.from_predictions(df, groups=["g"])
        res = group_permutation(d, n_permutations=99, seed=r, metrics=("fpr",))
        out.append(res[("g", "fpr")][1][0, 1 - d.reference["g"]])  # the non-reference group, series 0
    return np.asarray(out)


def test_group_permutation_p_values_are_uniform_under_the_null():
    """Groups assigned at random: p-values of the FPR gap are uniform. Permuting visits instead of
    patients (clustered data) gives too many small p-values."""
    p = _null_group_p_values(visit_level=False)
    assert sst.kstest(p, "uniform").pvalue > 0.01
    assert 0.01 <= np.mean(p <= 0.05) <= 0.10
    naive = _null_group_p_values(visit_level=True)
    assert np.mean(naive <= 0.05) > 0.15
    assert sst.kstest(naive, "uniform").pvalue < 0.001


def test_paired_permutation_p_values_are_uniform_under_the_null_and_detect_a_real_change():
    """Two methods with exchangeable predictions (same score model, independent noise): the paired
    p-values of the F1, Theil and disparate-impact differences are uniform; a real shift is found."""
    rng = np.random.default_rng(5)
    null, alt = [], []
    for r in range(150):
        seed = int(rng.integers(1 << 31))
        df = simulate_predictions(n_patients=100, n_folds=2, methods={"original": 0.0, "other": 0.0}, noise_sd=1.5,
                                  groups={"g": {"A": 0.5, "B": 0.5}}, seed=seed)
        labels, res = paired_permutation(Design.from_predictions(df, groups=["g"]), n_permutations=99, seed=r)
        null.append([res[k][1][0] for k in ((ALL, "f1"), ("g", "theil"), ("g", "di_weighted"))])
        if r < 20:
            df = simulate_predictions(n_patients=100, n_folds=2, methods={"original": 0.0, "other": 2.0},
                                      noise_sd=1.5, groups={"g": {"A": 0.5, "B": 0.5}}, seed=seed)
            alt.append(paired_permutation(Design.from_predictions(df, groups=["g"]), n_permutations=99,
                                          seed=r, metrics=("f1",))[1][(ALL, "f1")][1][0])
    assert labels == [("other", "logreg"), ("other", "mean")]
    for p in np.asarray(null).T:
        p = p[~np.isnan(p)]
        assert len(p) >= 145
        assert sst.kstest(p, "uniform").pvalue > 0.01
        assert np.mean(p <= 0.05) <= 0.10
    assert np.median(alt) < 0.05


def test_group_permutation_detects_a_true_underdiagnosis_gap():
    df = simulate_predictions(n_patients=600, groups={"g": {"A": 0.4, "B": 0.6}}, group_shift={"g": {"A": -2.0}},
                              seed=4)
    d = Design.from_predictions(df, groups=["g"])
    obs, p = group_permutation(d, n_permutations=199, metrics=("underdiagnosis",))[("g", "underdiagnosis")]
    a = d.categories["g"].index("A")
    assert obs[0, a] > 0.1 and p[0, a] < 0.01
    assert np.isnan(p[0, d.reference["g"]])


def test_permutation_p_value_formula():
    null = np.array([[0.1], [-0.5], [0.3], [np.nan], [0.2]])
    p = permutation_p_value(np.array([0.3]), null)
    assert p[0] == pytest.approx((1 + 2) / (1 + 4))  # |-0.5| and |0.3| reach 0.3; NaN left out
    assert np.isnan(permutation_p_value(np.array([np.nan]), null)[0])


def test_seeded_and_deterministic():
    df = simulate_predictions(n_patients=100, methods={"original": 0.0, "up": 0.5}, seed=0)
    d = Design.from_predictions(df, groups=["gender"])
    a = audit_statistics(d, n_resamples=50, n_permutations=50, seed=3)
    b = audit_statistics(d, n_resamples=50, n_permutations=50, seed=3)
    c = audit_statistics(d, n_resamples=50, n_permutations=50, seed=4)
    assert a.gaps.equals(b.gaps) and a.comparisons.equals(b.comparisons)
    assert not a.gaps["ci_low"].equals(c.gaps["ci_low"])


def test_threshold_sweep_intervals_contain_the_point_and_gap_rows_skip_the_reference():
    df = simulate_predictions(n_patients=300, groups={"g": {"A": 0.4, "B": 0.6}}, group_shift={"g": {"A": -1.5}},
                              seed=2)
    d = Design.from_predictions(df, groups=["g"])
    sw = bootstrap_threshold_sweep(d, thresholds=[0.3, 0.5, 0.7], n_resamples=100)
    gap = sw.filter((pl.col("metric") == "underdiagnosis_gap") & (pl.col("attribute") == "g"))
    assert set(gap["group"]) == {"A"} and gap.height == 3
    # positives of A get lower scores: A is underdiagnosed at every threshold
    assert (gap["ci_low"] > 0).all()
    tpr = sw.filter(pl.col("metric") == "tpr")
    assert ((tpr["ci_low"] <= tpr["estimate"]) & (tpr["estimate"] <= tpr["ci_high"])).all()
    # the point estimate at 0.5 is the harness's TPR (prediction = score > 0.5)
    boot = bootstrap(d, n_resamples=2, auroc=False)
    at_half = sw.filter((pl.col("metric") == "tpr") & (pl.col("threshold") == 0.5) & (pl.col("group") == "A"))
    a = d.categories["g"].index("A")
    assert at_half["estimate"][0] == pytest.approx(boot.estimates[("group", "g", "tpr")][0, a])


def test_bad_predictions_are_rejected_with_the_place():
    df = simulate_predictions(n_patients=40, methods={"original": 0.0, "up": 0.5}, seed=0)
    with pytest.raises(DatasetError, match="missing columns"):
        Design.from_predictions(df.drop("score"), groups=["gender"], source="predictions.parquet")
    short = df.filter(~((pl.col("method") == "up") & (pl.col("patient_id") == df["patient_id"][0])))
    with pytest.raises(DatasetError, match="same test visits"):
        Design.from_predictions(short, groups=["gender"])
    with pytest.raises(DatasetError, match="probabilities"):
        Design.from_predictions(df.with_columns(score=pl.col("score") * 2), groups=["gender"])
    moved = df.with_columns(pl.when(pl.col("visit_index") == 1).then(pl.lit("X")).otherwise(pl.col("gender"))
                            .alias("gender"))
    with pytest.raises(DatasetError, match="more than one fold or group"):
        Design.from_predictions(moved, groups=["gender"])
