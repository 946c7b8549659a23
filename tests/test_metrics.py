"""Performance and fairness metrics of the k-fold harness against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from benchmarks.metrics import (FAIRNESS_METRICS, METRIC_COLUMNS, PERFORMANCE_METRICS, f1_variance,
                                fairplay_disparate_impact, group_labels, group_metrics, groupings,
                                overall_metrics, summarise, theil_index_f1, unit_metrics)


# ---------------------------------------------------------------------- FairPlay's measures by hand
def test_paper_example_700_200_100():
    f1 = {"adult": 0.8, "elderly": 0.6, "pediatric": 0.4}
    sizes = {"adult": 700, "elderly": 200, "pediatric": 100}
    weighted, averaged = fairplay_disparate_impact(f1, sizes)
    # (200 x 0.6/0.8 + 100 x 0.4/0.8) / 300 = (150 + 50) / 300; (0.75 + 0.5) / 2
    assert weighted == pytest.approx(2 / 3) and round(weighted, 3) == 0.667
    assert averaged == pytest.approx(0.625)
    # (1/3) [ (4/3) ln(4/3) + 1 ln 1 + (2/3) ln(2/3) ]
    expected = ((4 / 3) * math.log(4 / 3) + (2 / 3) * math.log(2 / 3)) / 3
    assert theil_index_f1(f1.values()) == pytest.approx(expected)
    assert round(theil_index_f1(f1.values()), 4) == 0.0378
    assert f1_variance(f1.values()) == pytest.approx((0.2**2 + 0 + 0.2**2) / 3)


def test_majority_is_the_largest_training_group_not_the_first():
    weighted, averaged = fairplay_disparate_impact({"a": 0.4, "b": 0.8}, {"a": 10, "b": 90})
    assert weighted == averaged == pytest.approx(0.5)


def test_theil_is_safe_with_zero_f1_and_ignores_undefined_groups():
    # mu = 0.25: (1/2) [0 + 2 ln 2] = ln 2
    assert theil_index_f1([0.0, 0.5]) == pytest.approx(math.log(2))
    assert theil_index_f1([0.0, 0.0]) == 0.0
    assert theil_index_f1([0.5, float("nan"), 0.5]) == 0.0
    assert math.isnan(theil_index_f1([float("nan")]))


def test_disparate_impact_undefined_cases():
    assert all(math.isnan(v) for v in fairplay_disparate_impact({"a": 0.0, "b": 0.5}, {"a": 5, "b": 1}))
    assert all(math.isnan(v) for v in fairplay_disparate_impact({"a": 0.5}, {"a": 5}))
    # an undefined minority F1 is left out of both the ratio and the weights
    assert fairplay_disparate_impact({"a": 0.8, "b": 0.4, "c": float("nan")}, {"a": 9, "b": 3, "c": 2}) == (
        pytest.approx(0.5), pytest.approx(0.5))


# ---------------------------------------------------------------------- per-group metrics
@pytest.fixture
def toy():
    # a: tp 1, fn 1, fp 1, tn 1    b: tp 1, tn 2    c: no positive, fp 1, tn 1    d: no positive, no prediction
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    s = np.array([.9, .2, .7, .1, .8, .3, .2, .6, .4, .1, .2])
    g = np.array(list("aaaabbbccdd"))
    return y, p, s, g


def test_group_metrics_by_hand(toy):
    y, p, s, g = toy
    by, fair = group_metrics(y, p, s, g, train_sizes={"a": 40, "b": 30, "c": 20, "d": 10})
    a, b, c, d = by["a"], by["b"], by["c"], by["d"]
    assert (a["f1"], a["precision"], a["recall"], a["tpr"], a["fpr"], a["underdiagnosis"]) == pytest.approx(
        (0.5, 0.5, 0.5, 0.5, 0.5, 0.5))
    assert a["auroc"] == pytest.approx(0.75)  # positives .9 .2 vs negatives .7 .1: 3 of 4 pairs
    assert (a["n"], a["n_pos"], a["selection_rate"]) == (4, 2, 0.5)
    assert (b["f1"], b["fpr"], b["auroc"]) == (1.0, 0.0, 1.0)
    assert c["f1"] == 0.0 and c["fpr"] == 0.5  # a false positive and no positive label: F1 is 0
    assert math.isnan(c["tpr"]) and math.isnan(c["underdiagnosis"]) and math.isnan(c["auroc"])
    assert math.isnan(d["f1"]) and math.isnan(d["precision"])  # nothing to find, nothing predicted
    # fairness: F1s a .5, b 1, c 0 (d undefined); majority a (40)
    assert fair["di_weighted"] == pytest.approx((30 * 2 + 20 * 0) / 50)
    assert fair["di_averaged"] == pytest.approx(1.0)
    assert fair["theil"] == pytest.approx(theil_index_f1([0.5, 1.0, 0.0]))
    assert fair["f1_variance"] == pytest.approx(np.var([0.5, 1.0, 0.0]))
    assert fair["equal_opportunity"] == pytest.approx(0.5)  # TPR a .5, b 1; c and d have no positive
    assert fair["fpr_difference"] == pytest.approx(0.5)  # FPR a .5, b 0, c .5, d 0
    assert fair["equalized_odds"] == pytest.approx(0.5)
    assert fair["demographic_parity"] == pytest.approx(0.5 - 0.0)  # selection a .5, b 1/3, c .5, d 0
    assert set(fair) == set(FAIRNESS_METRICS) and set(a) == set(PERFORMANCE_METRICS)


def test_small_groups_can_be_left_out_of_the_fairness_measures(toy):
    y, p, s, g = toy
    sizes = {"a": 600, "b": 390, "c": 5, "d": 5}  # c and d hold 0.5% each
    by, fair = group_metrics(y, p, s, g, train_sizes=sizes, min_share=0.01)
    assert set(by) == {"a", "b", "c", "d"}  # per-group rows stay
    assert fair["theil"] == pytest.approx(theil_index_f1([0.5, 1.0]))
    assert fair["di_weighted"] == fair["di_averaged"] == pytest.approx(2.0)
    assert fair["fpr_difference"] == pytest.approx(0.5) and fair["demographic_parity"] == pytest.approx(0.5 - 1 / 3)


def test_calibration_error_by_hand():
    # bins: .05 -> 0 and .95 -> 9; |0 - .05| + |1 - .95| over 2 visits
    m = overall_metrics(np.array([0, 1]), np.array([0, 1]), np.array([0.05, 0.95]))
    assert m["calibration_error"] == pytest.approx(0.05)


def test_gaps_agree_with_fairlearn_when_every_group_has_both_classes():
    from fairlearn.metrics import (demographic_parity_difference, equal_opportunity_difference,
                                   equalized_odds_difference)

    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 300)
    p = (rng.random(600) < 0.3 + 0.3 * y).astype(int)
    g = rng.choice(["x", "y", "z"], 600)
    _, fair = group_metrics(y, p, rng.random(600), g, train_sizes={"x": 1, "y": 1, "z": 1})
    assert fair["equalized_odds"] == pytest.approx(equalized_odds_difference(y, p, sensitive_features=g))
    assert fair["equal_opportunity"] == pytest.approx(equal_opportunity_difference(y, p, sensitive_features=g))
    assert fair["demographic_parity"] == pytest.approx(demographic_parity_difference(y, p, sensitive_features=g))


def test_overall_metrics_match_scikit_learn():
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.2).astype(int)
    s = np.clip(0.5 * y + rng.random(300) * 0.6, 0, 1)
    p = (s > 0.5).astype(int)
    m = overall_metrics(y, p, s)
    assert m["f1"] == pytest.approx(f1_score(y, p)) and m["precision"] == pytest.approx(precision_score(y, p))
    assert m["tpr"] == pytest.approx(recall_score(y, p)) and m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["fpr"] == pytest.approx(p[y == 0].mean()) and m["underdiagnosis"] == pytest.approx(1 - m["tpr"])


# ---------------------------------------------------------------------- long table and aggregation
def test_groupings_and_labels():
    assert groupings(["gender"]) == [("gender", ["gender"])]
    assert groupings(["gender", "age"])[-1] == ("gender & age", ["gender", "age"])
    frame = pl.DataFrame({"gender": ["F", "M"], "age": ["old", "young"]})
    assert group_labels(frame, ["gender", "age"]).to_list() == ["F & old", "M & young"]


def test_unit_metrics_long_table(toy):
    y, p, s, g = toy
    gender = np.where(np.isin(g, ["a", "b"]), "F", "M")
    preds = pl.DataFrame({"fold": 2, "method": "smote", "model": "rf", "y_true": y, "prediction": p, "score": s,
                          "gender": gender, "site": g})
    sizes = {"gender": {"F": 5, "M": 5}, "site": {"a": 4, "b": 3, "c": 2, "d": 1},
             "gender & site": {"F & a": 4, "F & b": 3, "M & c": 2, "M & d": 1}}
    out = unit_metrics(preds, attributes=["gender", "site"], train_sizes=sizes)
    assert dict(out.schema) == METRIC_COLUMNS
    overall = out.filter(pl.col("attribute").is_null())
    assert overall.height == len(PERFORMANCE_METRICS) and overall["group"].is_null().all()
    per = out.filter(pl.col("attribute") == "gender & site")
    assert set(per["group"].drop_nulls()) == {"F & a", "F & b", "M & c", "M & d"}
    assert per.filter(pl.col("group").is_null())["metric"].to_list() == list(FAIRNESS_METRICS)
    f1_site_b = out.filter((pl.col("attribute") == "site") & (pl.col("group") == "b") & (pl.col("metric") == "f1"))
    assert f1_site_b["value"].item() == 1.0
    assert (out["fold"] == 2).all() and (out["method"] == "smote").all()


def test_summarise_mean_and_standard_error():
    rows = [(0, "m", "knn", 0.2), (1, "m", "knn", 0.4), (0, "m", "rf", 0.6), (1, "m", "rf", float("nan"))]
    metrics = pl.DataFrame(rows, schema=["fold", "method", "model", "value"], orient="row").with_columns(
        attribute=pl.lit(None, pl.String), group=pl.lit(None, pl.String), metric=pl.lit("f1"))
    out = summarise(metrics)
    knn = out.filter(pl.col("model") == "knn").row(0, named=True)
    assert knn["mean"] == pytest.approx(0.3) and knn["se"] == pytest.approx(0.1) and knn["n_folds"] == 2
    rf = out.filter(pl.col("model") == "rf").row(0, named=True)
    assert rf["mean"] == pytest.approx(0.6) and rf["n_folds"] == 1  # the NaN fold is left out
    # model mean within each fold first: fold 0 (0.2 + 0.6) / 2 = 0.4, fold 1 0.4 -> 0.4 +/- 0
    mean = out.filter(pl.col("model") == "mean").row(0, named=True)
    assert mean["mean"] == pytest.approx(0.4) and mean["se"] == pytest.approx(0.0)
