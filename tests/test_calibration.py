"""Calibration error (hand-computed values), its per-group gap, and the per-group threshold sweep."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from benchmarks.calibration import bin_index, calibration_curve_by_group, ece_by_group, threshold_sweep
from benchmarks.calibration import expected_calibration_error as calibration_error
from benchmarks.stats import Design, bootstrap


def test_bin_index_edges():
    p = np.array([0.0, 0.0999, 0.1, 0.35, 0.5, 0.9999, 1.0])
    assert bin_index(p, n_bins=10).tolist() == [0, 0, 1, 3, 5, 9, 9]
    assert bin_index(p, n_bins=2).tolist() == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bin_index(np.array([0.2, 1.2]))


def test_ece_hand_computed():
    # 10 bins: 0.05 -> bin 0, 0.15 -> 1, 0.85 -> 8, 0.95 and 1.0 -> 9
    # |0 - .05| + |1 - .15| + |1 - .85| + |(0 + 1) - (.95 + 1.0)| = .05 + .85 + .15 + .95 = 2.0 over 5 visits
    y, p = np.array([0, 1, 1, 0, 1]), np.array([0.05, 0.15, 0.85, 0.95, 1.0])
    assert calibration_error(y, p) == pytest.approx(0.4)
    # 2 bins: [0, .5) holds y (0, 1), p (.05, .15): |1 - .2| = .8; [.5, 1] holds |2 - 2.8| = .8
    assert calibration_error(y, p, n_bins=2) == pytest.approx(1.6 / 5)
    # perfectly calibrated bins give 0
    assert calibration_error(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])) == 0.0
    # integer weights are repetitions
    w = np.array([2, 0, 1, 3, 1])
    repeated = calibration_error(np.repeat(y, w), np.repeat(p, w))
    assert calibration_error(y, p, sample_weight=w) == pytest.approx(repeated)


def test_ece_by_group_and_gap_hand_computed():
    y = np.array([0, 1, 1, 0, 1, 1, 0, 0, 0])
    p = np.array([0.05, 0.15, 0.85, 0.95, 1.0, 0.9, 0.1, 0.1, 0.2])
    g = np.array(["A"] * 5 + ["B"] * 4)
    # B: bin 9 |1 - .9| = .1, bin 1 |0 - .2| = .2, bin 2 |0 - .2| = .2 -> .5 / 4
    out = ece_by_group(y, p, g)
    rows = {r["group"]: r for r in out.iter_rows(named=True)}
    assert rows["A"]["ece"] == pytest.approx(0.4) and rows["B"]["ece"] == pytest.approx(0.125)
    assert rows["A"]["reference"] == "A"  # the largest group
    assert rows["B"]["ece_gap"] == pytest.approx(0.125 - 0.4)
    assert rows["max-min"]["ece_gap"] == pytest.approx(0.275)


def test_bootstrap_point_ece_equals_hand_value_and_weights_equal_duplicates():
    """The count-based calibration error of the resampling engine is the same quantity."""
    y = np.array([0, 1, 1, 0, 1, 1, 0, 0, 0])
    p = np.array([0.05, 0.15, 0.85, 0.95, 1.0, 0.9, 0.1, 0.1, 0.2])
    frame = pl.DataFrame({"fold": [0] * 9, "method": "original", "model": "m",
                          "patient_id": ["a", "a", "b", "c", "c", "d", "e", "e", "f"],
                          "visit_index": [0, 1, 0, 0, 1, 0, 0, 1, 0], "g": ["A"] * 5 + ["B"] * 4,
                          "y_true": y, "score": p, "prediction": (p > 0.5).astype(int)})
    d = Design.from_predictions(frame, groups=["g"])
    res = bootstrap(d, n_resamples=5, auroc=False)
    assert res.estimates[("group", "(all)", "calibration_error")][0, 0] == pytest.approx(calibration_error(y, p))
    by_group = res.estimates[("group", "g", "calibration_error")][0]
    assert by_group == pytest.approx([0.4, 0.125])
    # a patient drawn twice counts twice: compare with the duplicated visits
    w = np.array([2.0, 0.0, 1.0, 3.0, 1.0, 0.0])  # patients a..f in the design's order
    order = {pid: i for i, pid in enumerate(d.patient_ids)}
    from benchmarks.stats import _cell_sums, _fine_sums, _fold_statistics
    W = np.zeros((1, d.n_patients))
    for pid, wi in zip("abcdef", w):
        W[0, order[pid]] = wi
    fine = _fine_sums(W, d.X.reshape(d.n_patients, -1), d.bounds).reshape(1, -1, 1, d.X.shape[2])
    rates, _, _ = _fold_statistics(_cell_sums(fine, d, "(all)"), d, "(all)", "fold_mean")
    reps = np.repeat(np.arange(9), [int(w["abcdef".index(pid)]) for pid in frame["patient_id"]])
    assert rates["calibration_error"][0, 0, 0, 0] == pytest.approx(calibration_error(y[reps], p[reps]))


def test_calibration_curve_by_group():
    y = np.array([0, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.91])
    g = np.array(["A", "A", "A", "A", "A", "B"])
    cur = calibration_curve_by_group(y, p, g, n_bins=10)
    a1 = cur.filter((pl.col("group") == "A") & (pl.col("bin") == 1)).row(0, named=True)
    assert a1["count"] == 2 and a1["mean_prob"] == pytest.approx(0.135) and a1["frac_positive"] == 1.0
    assert a1["lower"] == pytest.approx(0.1) and a1["upper"] == pytest.approx(0.2)
    assert cur.filter(pl.col("group") == "B")["bin"].to_list() == [9]
    assert cur["count"].sum() == 6


def test_threshold_sweep_hand_values():
    y = np.array([1, 1, 0, 0, 1, 1, 0, 0])
    s = np.array([0.9, 0.4, 0.6, 0.1, 0.9, 0.7, 0.2, 0.1])
    g = np.array(["A"] * 4 + ["B"] * 4)
    sw = threshold_sweep(y, s, g, thresholds=[0.3, 0.5, 0.8])
    A = sw.filter(pl.col("group") == "A").sort("threshold")
    B = sw.filter(pl.col("group") == "B").sort("threshold")
    assert A["tpr"].to_list() == [1.0, 0.5, 0.5] and A["fpr"].to_list() == [0.5, 0.5, 0.0]
    assert B["tpr"].to_list() == [1.0, 1.0, 0.5] and B["fpr"].to_list() == [0.0, 0.0, 0.0]
    assert A["udr"].to_list() == [0.0, 0.5, 0.5]
    # strict inequality, the harness's rule: a score equal to the threshold is negative
    eq = threshold_sweep(np.array([1, 0]), np.array([0.5, 0.2]), np.array(["A", "A"]), thresholds=[0.5])
    assert eq["tpr"][0] == 0.0


def test_threshold_sweep_undefined_rates_are_nan():
    sw = threshold_sweep(np.array([0, 0, 1]), np.array([0.2, 0.7, 0.9]), np.array(["A", "A", "B"]), thresholds=[0.5])
    a = sw.filter(pl.col("group") == "A").row(0, named=True)
    b = sw.filter(pl.col("group") == "B").row(0, named=True)
    assert np.isnan(a["tpr"]) and a["fpr"] == 0.5
    assert b["tpr"] == 1.0 and np.isnan(b["fpr"])


def test_bootstrap_sweep_point_estimates_equal_the_metricframe_sweep():
    from benchmarks.speed.bench_audit import simulate_predictions
    from benchmarks.stats import bootstrap_threshold_sweep

    df = simulate_predictions(n_patients=200, groups={"g": {"A": 0.4, "B": 0.6}}, seed=6)
    d = Design.from_predictions(df, groups=["g"])
    t = [0.25, 0.5, 0.75]
    boot = bootstrap_threshold_sweep(d, thresholds=t, n_resamples=3, aggregate="pooled")
    plain = threshold_sweep(df["y_true"].to_numpy(), df["score"].to_numpy(), df["g"].to_numpy(), thresholds=t)
    for metric, col in (("tpr", "tpr"), ("fpr", "fpr"), ("underdiagnosis", "udr")):
        got = boot.filter((pl.col("attribute") == "g") & (pl.col("metric") == metric)).sort("group", "threshold")
        np.testing.assert_allclose(got["estimate"].to_numpy(), plain.sort("group", "threshold")[col].to_numpy())
