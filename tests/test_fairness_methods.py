"""Further mitigation methods: importance weighting, group resampling, fairlearn post/in-processing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp
from test_kfold import make_cohort  # the harness tests' skewed cohort (tests/ is on sys.path)

from benchmarks import downstream
from benchmarks import fairness_methods as FM
from benchmarks.methods import training_rows
from halo_balance.errors import HaloBalanceError


@pytest.fixture(scope="module")
def split():
    ds = make_cohort(3600, seed=5)
    ids = ds.patients["patient_id"].to_numpy()
    return training_rows(ds.select(ids[:1200]), ["gender"]), training_rows(ds.select(ids[1200:]), ["gender"])


def rates(pred, rows, group):
    m = rows.group == group
    return pred[m & (rows.y == 1)].mean(), pred[m & (rows.y == 0)].mean()


def test_importance_weights_by_hand():
    # cells (label, group): (0,A) 6, (1,A) 2, (0,B) 3, (1,B) 1; largest 6, min_cell_size 2
    y = np.array([0] * 6 + [1] * 2 + [0] * 3 + [1])
    g = np.array(["A"] * 8 + ["B"] * 4)
    w = FM.importance_weights(y, g, min_cell_size=2)
    raw = np.array([1] * 6 + [3] * 2 + [2] * 3 + [1])  # (1,A) 2 -> 6: x3; (0,B) 3 -> 6: x2; (1,B) below min: x1
    np.testing.assert_allclose(w, raw / raw.mean())
    assert w.mean() == pytest.approx(1.0)
    # ratio 0.5 fills half the gap: (1,A) 2 -> 2 + 2 = 4, (0,B) 3 -> 3 + round(1.5) = 5 (as the resamplers)
    half = FM.importance_weights(y, g, ratio=0.5, min_cell_size=2)
    raw = np.array([1] * 6 + [2] * 2 + [5 / 3] * 3 + [1])
    np.testing.assert_allclose(half, raw / raw.mean())


def test_importance_weighting_every_model(split):
    train, test = split
    for model in downstream.MODELS:
        est = FM.make_estimator("importance_weighting", model, random_state=1).fit(train.X, train.y, train.group)
        s = est.score(test.X, test.group)
        assert s.shape == (test.X.shape[0],) and np.all((s >= 0) & (s <= 1))
        np.testing.assert_array_equal(est.predict(test.X, test.group), downstream.predict(s))
    # up-weighting the rare deaths raises the scores of the positives compared with the plain model
    plain = downstream.score(downstream.fit("logreg", train.X, train.y), test.X)
    weighted = FM.make_estimator("importance_weighting", "logreg").fit(train.X, train.y, train.group).score(test.X)
    assert weighted[test.y == 1].mean() > plain[test.y == 1].mean() + 0.1


def test_knn_fallback_is_a_weighted_vote_of_the_same_neighbours(split):
    train, test = split
    even = FM.ImportanceWeighted("knn", ratio=0.0).fit(train.X, train.y, train.group)  # every weight 1
    np.testing.assert_allclose(even.score(test.X), downstream.score(downstream.fit("knn", train.X, train.y), test.X))
    est = FM.ImportanceWeighted("knn").fit(train.X, train.y, train.group)
    nb = est.model_.kneighbors(test.X[:5], return_distance=False)
    w = est.weights_[nb]
    np.testing.assert_allclose(est.score(test.X[:5]), (w * train.y[nb]).sum(1) / w.sum(1))


def test_group_resample_equalises_groups_with_whole_patients():
    ds = make_cohort(400, seed=3)
    rows = FM.training_set("group_resample", ds, groups=["gender"], seed=0)
    assert not rows.synthetic.any()
    n_vis = Counter(ds.visits["patient_id"].to_list())
    seen = Counter(rows.source.tolist())
    assert all(k % n_vis[p] == 0 for p, k in seen.items())  # a drawn patient brings every visit
    gender = dict(zip(ds.patients["patient_id"].to_list(), ds.patients["gender"].to_list()))
    drawn = Counter()
    for p, k in seen.items():
        drawn[gender[p]] += k // n_vis[p]
    sizes = Counter(gender.values())
    # F and X (both at least min_cell_size 5) grow to the largest group M; label mix is not balanced
    assert drawn["F"] == drawn["X"] == drawn["M"] == sizes["M"]
    deaths = Counter(gender[p] for p, k in seen.items() for _ in range(k // n_vis[p])
                     if ds.patients.filter(ds.patients["patient_id"] == p)["label"][0] == 1)
    assert deaths["M"] / sizes["M"] < 0.25


def biased_rows(n: int, seed: int):
    """Visit rows where one telling code marks deaths reliably for M (80%) but rarely for F (35%),
    so that a model blind to the group misses more deaths among F."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    group = rng.choice(["F", "M", "X"], n, p=[0.45, 0.545, 0.005])
    y = (rng.random(n) < 0.15).astype(np.int8)
    signal = rng.random(n) < np.where(y == 1, np.where(group == "F", 0.35, 0.8), 0.03)
    noise = rng.random((n, 9)) < 0.2
    X = sp.csr_matrix(np.column_stack([signal, noise]).astype(np.float32))
    return X, y, group, np.array([f"p{i}" for i in range(n)])


def test_threshold_optimizer_equalises_error_rates_on_held_out_visits():
    X, y, g, pid = biased_rows(6000, 0)
    Xt, yt, gt, _ = biased_rows(6000, 1)
    test = type("Rows", (), {"y": yt, "group": gt})
    est = FM.make_estimator("threshold_optimizer", "logreg", random_state=0).fit(X, y, g, patients=pid)
    np.testing.assert_allclose(est.score(Xt, gt), downstream.score(downstream.fit("logreg", X, y), Xt))
    plain = downstream.predict(est.score(Xt))
    assert rates(plain, test, "M")[0] - rates(plain, test, "F")[0] > 0.3  # the bias to remove
    pred = est.predict(Xt, gt)
    (tpr_f, fpr_f), (tpr_m, fpr_m) = rates(pred, test, "F"), rates(pred, test, "M")
    assert abs(tpr_f - tpr_m) < 0.08 and abs(fpr_f - fpr_m) < 0.05
    assert est.fallback_groups_ == ["X"] and est.fallback_group_ == "M"  # too few X deaths for own thresholds
    # unseen groups use the largest group's thresholds; predictions are seeded
    np.testing.assert_array_equal(est.predict(Xt[:50], np.full(50, "new")), est.predict(Xt[:50], np.full(50, "M")))
    np.testing.assert_array_equal(pred, est.predict(Xt, gt))


def test_fairplay_threshold_fits_thresholds_on_real_rows_only(split):
    train, _ = split
    synthetic = np.zeros(len(train), bool)
    synthetic[:300] = True
    group = train.group.copy()
    group[:300] = "S"  # a group that exists only among synthetic rows
    est = FM.make_estimator("fairplay_threshold", "logreg").fit(train.X, train.y, group, patients=train.source,
                                                                synthetic=synthetic)
    assert "S" not in est.groups_ and "S" not in est.fallback_groups_


def test_exponentiated_gradient_logreg(split):
    train, test = split
    est = FM.make_estimator("exponentiated_gradient", "logreg", random_state=2).fit(train.X, train.y, train.group)
    s = est.score(test.X)
    assert np.all((s >= 0) & (s <= 1)) and est.weights_.sum() == pytest.approx(1.0)
    pred = est.predict(test.X, test.group)
    assert set(np.unique(pred)) <= {0, 1}
    np.testing.assert_array_equal(pred, est.predict(test.X, test.group))  # seeded
    assert rates(pred, test, "F")[0] > 0.5  # balanced error: deaths are found


def test_method_registry_and_errors():
    assert FM.supports("exponentiated_gradient", "logreg") and not FM.supports("exponentiated_gradient", "knn")
    assert all(FM.supports(m, "knn") for m in FM.METHODS if m not in ("exponentiated_gradient", "adversarial_debiasing"))
    with pytest.raises(HaloBalanceError, match="does not run with model knn"):
        FM.make_estimator("exponentiated_gradient", "knn")
    with pytest.raises(HaloBalanceError, match="mitigation method: unknown"):
        FM.make_estimator("magic", "logreg")
    with pytest.raises(HaloBalanceError, match="FairPlay"):
        FM.training_set("fairplay_threshold", make_cohort(40), groups=["gender"])
    with pytest.raises(ValueError, match="sample weights"):
        downstream.fit("knn", sp.csr_matrix(np.eye(2)), np.array([0, 1]), sample_weight=np.ones(2))
