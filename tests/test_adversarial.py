"""Adversarial debiasing: gradient reversal, alpha selection on training patients only, the harness."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from test_kfold import install_fairplay_stand_in, make_cohort  # tests/ is on sys.path

from benchmarks import adversarial as AD
from benchmarks import downstream, fairness_methods, kfold
from benchmarks.methods import training_rows
from halo_balance.errors import HaloBalanceError

TINY = AD.AdversarialConfig(hidden=16, adversary_hidden=8, epochs=5, batch_size=64)


def encoded_groups(n: int, *, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Rows whose tokens 0-3 tell the group (b: 60% each, a: 10%) and tokens 4-5 the outcome; 6.. noise."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 2, n)
    y = (rng.random(n) < 0.3).astype(np.int64)
    X = (rng.random((n, 30)) < 0.15).astype(np.float32)
    for j in range(4):
        X[:, j] = rng.random(n) < np.where(g == 1, 0.6, 0.1)
    X[:, 4] = rng.random(n) < np.where(y == 1, 0.8, 0.1)
    X[:, 5] = rng.random(n) < np.where(y == 1, 0.7, 0.1)
    return sp.csr_matrix(X), y, np.array(["a", "b"])[g]


def test_gradient_reversal_flips_the_adversary_gradient_on_the_shared_layers():
    torch.manual_seed(0)
    net = AD.DebiasedMLP(6, 3, TINY)
    x = torch.rand(20, 6)
    a = torch.randint(0, 3, (20,))
    alpha = 0.7

    def grads(adversary_logits) -> dict[str, torch.Tensor]:
        net.zero_grad()
        F.cross_entropy(adversary_logits, a).backward()
        return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    through_grl = grads(net(x, alpha)[1])
    plain = grads(net.adversary(net.encoder(x)))  # the same loss without the reversal layer
    assert set(through_grl) == set(plain) and not any(k.startswith("predictor") for k in plain)
    for name, g in plain.items():
        if name.startswith("encoder"):  # the shared layer is pushed to *raise* the adversary's loss
            torch.testing.assert_close(through_grl[name], -alpha * g)
            assert g.abs().sum() > 0
        else:  # the adversary itself still learns to lower it
            torch.testing.assert_close(through_grl[name], g)
    # forward, the layer is the identity; the outcome's gradient is untouched by alpha
    torch.testing.assert_close(AD.reverse_gradient(x, alpha), x)
    net.zero_grad()
    F.binary_cross_entropy_with_logits(net(x, alpha)[0], torch.ones(20)).backward()
    g1 = net.encoder[0].weight.grad.clone()
    net.zero_grad()
    F.binary_cross_entropy_with_logits(net(x, 5.0)[0], torch.ones(20)).backward()
    torch.testing.assert_close(net.encoder[0].weight.grad, g1)


def test_reversal_defeats_the_adversary_and_keeps_the_outcome():
    X, y, g = encoded_groups(4000)
    half = X.shape[0] // 2
    accuracy, auroc = {}, {}
    for alpha in (0.0, 1.0):
        est = AD.AdversarialDebiasing(alphas=(alpha,), random_state=0).fit(X[:half], y[:half], g[:half])
        with torch.no_grad():
            guess = est.net_(AD._dense(X[half:]), alpha)[1].argmax(1).numpy()
        accuracy[alpha] = (est.groups_[guess] == g[half:]).mean()
        from sklearn.metrics import roc_auc_score
        auroc[alpha] = roc_auc_score(y[half:], est.score(X[half:]))
    assert accuracy[0.0] > 0.8  # without reversal the representation tells the groups apart
    assert accuracy[1.0] < 0.62  # with it, the adversary is near chance (0.5)
    assert auroc[1.0] > 0.9 and abs(auroc[1.0] - auroc[0.0]) < 0.02


def test_select_alpha_by_hand():
    nan = math.nan

    def c(alpha, auroc, gap, tpr=0.3):
        return {"alpha": alpha, "auroc": auroc, "udr_gap": gap, "tpr": tpr}

    # 2.0 has the smallest gap but costs 0.05 AUROC; 1.0 is within 0.02 of the best
    assert AD.select_alpha([c(0.5, 0.70, 0.30), c(1.0, 0.69, 0.10), c(2.0, 0.65, 0.01)], max_auroc_loss=0.02) == 1.0
    assert AD.select_alpha([c(0.5, 0.70, 0.30), c(1.0, 0.69, 0.10), c(2.0, 0.65, 0.01)], max_auroc_loss=0.1) == 2.0
    # equal gaps: the higher AUROC, then the smaller alpha; an undefined gap never wins
    assert AD.select_alpha([c(0.5, 0.69, 0.1), c(1.0, 0.70, 0.1), c(2.0, 0.70, 0.1)], max_auroc_loss=0.02) == 1.0
    assert AD.select_alpha([c(0.5, 0.70, nan), c(1.0, 0.70, 0.4)], max_auroc_loss=0.02) == 1.0
    assert AD.select_alpha([c(0.5, nan, nan), c(1.0, nan, 0.2)], max_auroc_loss=0.02) == 1.0
    # a network that finds no death has UDR 1 in every group: its gap of 0 does not count
    missing_all = c(2.0, 0.70, 0.0, tpr=0.0)
    assert AD.select_alpha([c(0.5, 0.70, 0.2), c(1.0, 0.70, 0.1), missing_all], max_auroc_loss=0.02) == 1.0
    assert AD.select_alpha([c(0.5, 0.70, 0.0, tpr=0.0), missing_all], max_auroc_loss=0.02) == 0.5


def test_alpha_selection_uses_only_the_training_patients():
    ds = make_cohort(600, seed=4)
    ids = ds.patients["patient_id"].to_numpy()
    train_ids, test_ids = ids[:450], ids[450:]
    rows = training_rows(ds.select(train_ids), ["age_group"])
    est = AD.AdversarialDebiasing(config=TINY, random_state=3).fit(rows.X, rows.y, rows.group, patients=rows.source)
    valid = set(est.validation_patients_)
    assert valid <= set(train_ids) and not valid & set(test_ids)
    assert 0.15 * len(train_ids) < len(valid) < 0.25 * len(train_ids)  # one fold of five, by patient
    report = est.fit_report_
    assert [c["alpha"] for c in report["candidates"]] == list(AD.ALPHAS) and est.alpha_ in AD.ALPHAS
    assert est.alpha_ == AD.select_alpha(report["candidates"], max_auroc_loss=est.max_auroc_loss)
    assert report["groups"] == ["adult", "elderly"] and report["n_validation_patients"] == len(valid)
    assert report["n_validation_rows"] == int(np.isin(rows.source, list(valid)).sum())
    json.dumps(report)  # the harness stores it as JSON

    # seeded: the same seed gives the same network, another seed another one
    test = training_rows(ds.select(test_ids), ["age_group"])
    again = AD.AdversarialDebiasing(config=TINY, random_state=3).fit(rows.X, rows.y, rows.group, patients=rows.source)
    np.testing.assert_array_equal(est.score(test.X), again.score(test.X))
    other = AD.AdversarialDebiasing(config=TINY, random_state=4).fit(rows.X, rows.y, rows.group, patients=rows.source)
    assert not np.array_equal(est.score(test.X), other.score(test.X))
    scores, decisions = est.score_and_predict(test.X, test.group)
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_array_equal(decisions, downstream.predict(scores))
    with pytest.raises(ValueError, match="one class"):
        AD.AdversarialDebiasing(config=TINY).fit(rows.X, np.zeros(len(rows.y)), rows.group)


def test_registered_as_an_mlp_only_method():
    assert fairness_methods.supports("adversarial_debiasing", "mlp")
    assert not any(fairness_methods.supports("adversarial_debiasing", m) for m in downstream.MODELS if m != "mlp")
    assert isinstance(fairness_methods.make_estimator("adversarial_debiasing", "mlp", random_state=2),
                      AD.AdversarialDebiasing)
    with pytest.raises(HaloBalanceError, match="does not run with model logreg"):
        fairness_methods.make_estimator("adversarial_debiasing", "logreg")


def test_in_the_harness_the_adversary_sees_training_patients_and_its_attribute(monkeypatch, tmp_path):
    install_fairplay_stand_in(monkeypatch)
    data = make_cohort(300, seed=6).save(tmp_path / "data")
    seen: list[tuple[set, set]] = []
    real_fit = AD.AdversarialDebiasing.fit

    def spy(self, X, y, groups, *, patients=None, synthetic=None):
        self.config = TINY
        seen.append((set(patients), set(groups)))
        return real_fit(self, X, y, groups, patients=patients, synthetic=synthetic)

    monkeypatch.setattr(AD.AdversarialDebiasing, "fit", spy)
    args = dict(data=data, groups=["gender"], out=tmp_path / "run", folds=3, models=["logreg", "mlp"],
                methods=["original", "adversarial_debiasing"], seed=0, progress=False)
    out = kfold.run_kfold(**args, adversary_attribute=["age_group"])
    folds = dict(pl.read_parquet(out / "folds.parquet").rows())
    assert len(seen) == 3
    for fold, (patients, groups) in enumerate(seen):  # tasks run in fold order with jobs=1
        assert patients and all(folds[p] != fold for p in patients)  # no test patient, validation included
        assert groups == {"adult", "elderly"}  # the adversary's attribute, not the experiment's gender

    units = pl.read_parquet(out / "units.parquet")
    ran = set(units.select("method", "model").unique().rows())
    assert ran == {("original", "logreg"), ("original", "mlp"), ("adversarial_debiasing", "mlp")}
    reports = [json.loads(r) for r in units.filter(pl.col("method") == "adversarial_debiasing")["fit_report"]]
    assert len(reports) == 3 and all(r["alpha"] in AD.ALPHAS and len(r["candidates"]) == 3 for r in reports)
    info = json.loads((out / "units" / "fold=0" / "adversarial_debiasing" / "mlp.json").read_text())
    assert info["fit_report"]["groups"] == ["adult", "elderly"]
    assert json.loads((out / "run.json").read_text())["adversary_attribute"] == ["age_group"]
    preds = pl.read_parquet(out / "predictions.parquet").filter(pl.col("method") == "adversarial_debiasing")
    assert (preds["prediction"] == (preds["score"] > downstream.THRESHOLD).cast(pl.Int8)).all()
    assert "adversarial_debiasing (mlp)" in (out / "report.md").read_text()

    # another attribute recomputes only this method's units; the default is the experiment's groups
    kfold.run_kfold(**args)
    assert json.loads((out / "run.json").read_text())["invocations"][-1]["units_computed"] == 3
    assert all(groups == {"F", "M", "X"} for _, groups in seen[3:])
    # without --adversary-attribute the adversary targets the balanced attributes, and the
    # evaluation groups when only the outcome is balanced
    kfold.run_kfold(**{**args, "out": tmp_path / "by_age"}, balance_by=["age_group"])
    assert len(seen) == 9 and all(groups == {"adult", "elderly"} for _, groups in seen[6:])
    out = kfold.run_kfold(**{**args, "out": tmp_path / "outcome"}, balance_by=[])
    assert len(seen) == 12 and all(groups == {"F", "M", "X"} for _, groups in seen[9:])
    assert json.loads((out / "run.json").read_text())["adversary_attribute"] == ["gender"]
    with pytest.raises(HaloBalanceError, match="distinct"):
        kfold.run_kfold(**{**args, "out": tmp_path / "bad"}, adversary_attribute=["gender", "gender"])
