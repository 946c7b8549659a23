"""The paper's protocol beside the project's: aggregation, cells, downsampling floor, SMOTE, outcome-only runs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import polars as pl
import pytest

from benchmarks import downstream, kfold
from benchmarks.cells import Balancing, balance_targets
from benchmarks.methods import FairPlaySettings, build_training_set, generator_key
from benchmarks.metrics import paper_fairness, summarise, unit_metrics
from benchmarks.protocols import PROTOCOLS, resolve_protocol
from halo_balance.data import PreparedDataset, empty_meta
from halo_balance.errors import HaloBalanceError
from tests.test_kfold import install_fairplay_stand_in, make_cohort

# ---------------------------------------------------------------------- the two aggregations, by hand
# Two folds, two models, groups X, Y, Z of one attribute "g"; each patient has one visit. Group F1
# per unit (TP, FP, FN chosen to give them):
#   fold 0  model a: X 0.6 (3, 2, 2)  Y 0.2 (1, 4, 4)  Z undefined (no positive label, none predicted)
#           model b: X 0.4 (2, 3, 3)  Y 0.4 (2, 3, 3)  Z 0.0 (one false positive)
#   fold 1  model a: X 0.8 (4, 1, 1)  Y 0.6 (3, 2, 2)  Z not in the test fold
#           model b: X 0.2 (1, 4, 4)  Y 0.4 (2, 3, 3)
# Patients: X 10 + 10, Y 10 + 12, Z 3 + 0 (Y is the majority, 22).
UNITS = {(0, "a"): {"X": (3, 2), "Y": (1, 4), "Z": (0, 0)}, (0, "b"): {"X": (2, 3), "Y": (2, 3), "Z": (0, 1)},
         (1, "a"): {"X": (4, 1), "Y": (3, 2)}, (1, "b"): {"X": (1, 4), "Y": (2, 3)}}
PATIENTS = {0: {"X": (5, 5), "Y": (5, 5), "Z": (0, 3)}, 1: {"X": (5, 5), "Y": (5, 7)}}  # (positives, negatives)


def toy_predictions() -> pl.DataFrame:
    frames = []
    for (fold, model), cells in UNITS.items():
        for group, (pos, neg) in PATIENTS[fold].items():
            tp, fp = cells[group]
            y = np.r_[np.ones(pos), np.zeros(neg)].astype(np.int8)
            pred = np.r_[np.ones(tp), np.zeros(pos - tp), np.ones(fp), np.zeros(neg - fp)].astype(np.int8)
            frames.append(pl.DataFrame({
                "fold": np.full(pos + neg, fold, np.int32), "method": "m", "model": model,
                "patient_id": [f"{fold}{group}{i}" for i in range(pos + neg)], "visit_index": np.zeros(pos + neg, np.int32),
                "g": group, "y_true": y, "score": np.where(pred == 1, 0.9, 0.1), "prediction": pred}))
    return pl.concat(frames)


def test_paper_aggregation_by_hand_differs_from_the_mean_of_units():
    preds = toy_predictions()
    sizes = {0: {"g": {"X": 10, "Y": 12}}, 1: {"g": {"X": 10, "Y": 10, "Z": 3}}}  # training = the other fold
    units = pl.concat([unit_metrics(part, attributes=["g"], train_sizes=sizes[fold])
                       for (fold, _), part in preds.group_by("fold", "model", maintain_order=True)])
    f1 = {(r["fold"], r["model"], r["group"]): r["value"] for r in units.filter(
        (pl.col("metric") == "f1") & pl.col("group").is_not_null()).iter_rows(named=True)}
    assert f1[(0, "a", "X")] == pytest.approx(0.6) and f1[(1, "b", "Y")] == pytest.approx(0.4)
    assert np.isnan(f1[(0, "a", "Z")]) and f1[(0, "b", "Z")] == 0.0 and (1, "a", "Z") not in f1

    paper = paper_fairness(units, group_sizes={"g": {"X": 20, "Y": 22, "Z": 3}})
    got = {(r["model"], r["metric"]): r["value"] for r in paper.iter_rows(named=True)}
    assert paper["fold"].is_null().all() and paper["group"].is_null().all()
    # mean group F1s, undefined and unobserved as 0: X 0.5, Y 0.4, Z 0; mean 0.3
    theil = (5 / 3 * np.log(5 / 3) + 4 / 3 * np.log(4 / 3)) / 3  # Z's 0 ln 0 = 0
    assert got[("mean", "theil_of_means")] == pytest.approx(theil) == pytest.approx(0.411651, abs=1e-6)
    # majority Y (22): X / Y = 1.25 weighted by 20, Z / Y = 0 by 3
    assert got[("mean", "di_weighted_of_means")] == pytest.approx(25 / 23)
    assert got[("mean", "di_averaged_of_means")] == pytest.approx(0.625)
    assert got[("mean", "f1_sd_of_means")] == pytest.approx(np.sqrt(0.14 / 3))
    # per model, averaged over folds: model a X 0.7, Y 0.4, Z 0 (0 in fold 0, unobserved in fold 1)
    mu = 1.1 / 3
    assert got[("a", "theil_of_means")] == pytest.approx((0.7 / mu * np.log(0.7 / mu) + 0.4 / mu * np.log(0.4 / mu)) / 3)

    # the mean of units: Theil per unit over its defined groups, model mean per fold, then over folds
    def t(*x):
        x = np.array(x) / np.mean(x)
        return float(np.mean(np.where(x > 0, x * np.log(np.where(x > 0, x, 1)), 0)))
    by_units = np.mean([(t(.6, .2) + t(.4, .4, 0)) / 2, (t(.8, .6) + t(.2, .4)) / 2])
    summary = summarise(pl.concat([units, paper]))
    mean = {r["metric"]: r["mean"] for r in summary.filter(
        (pl.col("model") == "mean") & (pl.col("attribute") == "g") & pl.col("group").is_null()).iter_rows(named=True)}
    assert mean["theil"] == pytest.approx(by_units) == pytest.approx(0.150787, abs=1e-6)
    assert mean["theil_of_means"] == pytest.approx(theil)  # passed through unchanged
    assert abs(mean["theil"] - mean["theil_of_means"]) > 0.2


def test_audit_bootstrap_reproduces_both_aggregations():
    from benchmarks.stats import Design, bootstrap

    design = Design.from_predictions(toy_predictions(), groups=["g"])
    boot = bootstrap(design, n_resamples=20, seed=0, auroc=False, reference="m")
    mean = boot.series.index(("m", "mean"))
    theil_paper = boot.estimates[("fairness", "g", "theil_of_means")][mean]
    assert theil_paper == pytest.approx(0.411651, abs=1e-6)
    assert boot.estimates[("fairness", "g", "di_weighted_of_means")][mean] == pytest.approx(25 / 23)
    assert boot.estimates[("fairness", "g", "theil")][mean] == pytest.approx(0.150787, abs=1e-6)
    assert boot.replicates[("fairness", "g", "theil_of_means")].shape == (20, len(boot.series))


# ---------------------------------------------------------------------- cells and targets
def test_downsampling_floor_keeps_small_cells_whole_and_cuts_large_ones_to_the_floor():
    counts = {"dead": 150, "alive-small": 800, "alive-large": 1300}
    assert balance_targets(counts, ratio=1.0, min_cell_size=1, direction="down", floor=1000) == {"alive-large": 1000}
    assert balance_targets(counts, ratio=1.0, min_cell_size=1, direction="down") == {
        "alive-small": 150, "alive-large": 150}  # the project's: to the smallest cell
    assert balance_targets(counts, ratio=0.5, min_cell_size=1, direction="down", floor=1000) == {"alive-large": 1150}
    with pytest.raises(HaloBalanceError, match="at most 1"):
        balance_targets(counts, ratio=2, min_cell_size=1, direction="down")


def _big_cohort() -> PreparedDataset:
    """1,300 alive men, 800 alive women, 150 deaths per gender: one cell above the floor."""
    n = {("M", 0): 1300, ("F", 0): 800, ("M", 1): 150, ("F", 1): 150}
    gender, labels = [], []
    for (g, y), k in n.items():
        gender += [g] * k
        labels += [y] * k
    rng = np.random.default_rng(0)
    visits = [[sorted(rng.choice(10, size=2, replace=False).tolist())] for _ in labels]
    vocab = pl.DataFrame({"id": pl.Series(range(10), dtype=pl.Int32), "token": [f"t{j}" for j in range(10)],
                          "kind": ["diagnosis"] * 10, "description": [""] * 10})
    return PreparedDataset.from_records(
        patient_ids=[f"p{i:05d}" for i in range(len(labels))], labels=np.array(labels), groups={"gender": gender},
        visits=visits, vocab=vocab, meta=empty_meta(source="floor test", groups={"gender": ["F", "M"]}),
        synthetic=False).validate()


def test_paper_downsampling_in_patients():
    ds = _big_cohort()
    rows = build_training_set("downsample", ds, balancing=Balancing(balance_by=("gender",), min_cell_size=1,
                                                                   downsample_floor=1000), seed=0)
    kept = Counter(zip(rows.y.tolist(), rows.group.tolist(), strict=True))
    assert kept == {(0, "M"): 1000, (0, "F"): 800, (1, "M"): 150, (1, "F"): 150}
    assert len(set(rows.source)) == len(rows)  # whole patients, none twice


def test_smote_combined_classes_and_binarised_rows():
    cohort = make_cohort(400, seed=3)
    balancing = Balancing(balance_by=("gender",), min_cell_size=1)
    base = build_training_set("original", cohort, balancing=balancing)
    rows = build_training_set("smote", cohort, balancing=balancing, seed=0, smote_classes="combined",
                              smote_binarize=True)
    before = Counter(zip(base.y.tolist(), base.group.tolist(), strict=True))
    after = Counter(zip(rows.y.tolist(), rows.group.tolist(), strict=True))
    largest = max(before.values())
    for cell, n in before.items():  # cells of more than 5 visits are filled; smaller ones cannot be interpolated
        assert after[cell] == (largest if n > 5 else n), cell
    assert any(n <= 5 for n in before.values())  # the cohort holds such a cell (X's deaths)
    new = rows.synthetic
    assert set(np.unique(rows.X[new].data)) == {1.0}  # binarised
    fractional = build_training_set("smote", cohort, balancing=balancing, seed=0, smote_classes="combined")
    assert (fractional.X[fractional.synthetic].data < 1).any()
    # one call: the class of a synthetic row is its cell, so its codes are its cell's
    telling = np.asarray(rows.X[new][:, :4].sum(axis=1)).ravel() > 0
    assert telling[rows.y[new] == 1].mean() > 0.5 > telling[rows.y[new] == 0].mean()


def test_outcome_only_balancing_fills_the_outcome_cells_only():
    cohort = make_cohort(400, seed=3)
    balancing = Balancing(balance_by=(), min_cell_size=1)
    patients = Counter(cohort.patients["label"].to_list())
    rows = build_training_set("upsample", cohort, balancing=balancing, seed=0)
    assert set(rows.group) == {""}
    drawn = Counter()
    for p, n in Counter(rows.source.tolist()).items():
        drawn[int(cohort.patients.filter(pl.col("patient_id") == p)["label"][0])] += n // int(
            cohort.visits.filter(pl.col("patient_id") == p).height)
    assert drawn == {0: patients[0], 1: patients[0]}  # deaths topped up to the living; no group cells
    assert Balancing(balance_by=()).groups_for(per_group=True, evaluation=["gender"]) == ("gender",)
    assert Balancing(balance_by=()).groups_for(per_group=False, evaluation=["gender"]) == ()


# ---------------------------------------------------------------------- protocols and the harness
def test_protocols_and_overrides():
    paper = resolve_protocol("paper")
    assert paper == PROTOCOLS["paper"] and paper.overrides == ()
    assert (paper.min_cell_size, paper.downsample_floor, paper.smote_classes, paper.smote_binarize,
            paper.model_params, paper.generator_conditioning, paper.fairness_aggregation) == (
        1, 1000, "combined", True, "paper", "balanced", "paper")
    assert paper.train_options({"preset": "small"})["lr"] == 1e-4 and paper.train_options({"preset": "small"})[
        "preset"] == "small"
    mixed = resolve_protocol("paper", downsample_floor=0, smote_binarize=None)
    assert mixed.overrides == ("downsample_floor",) and mixed.smote_binarize and "downsample-floor 0" in mixed.describe()
    with pytest.raises(HaloBalanceError, match="--protocol: unknown"):
        resolve_protocol("fairplay")
    params = downstream.make_model("mlp", params="paper").get_params()
    assert params["hidden_layer_sizes"] == (256, 128) and params["early_stopping"] and params["max_iter"] == 1000
    assert downstream.make_model("knn", params="paper").get_params()["metric"] == "minkowski"
    assert downstream.describe("logreg", "paper") != downstream.describe("logreg")


def test_generator_key_names_what_the_generator_is_conditioned_on():
    cohort = make_cohort(100, seed=1)
    key = lambda attrs: generator_key(cohort, fold=0, data_fingerprint="d", train_options={}, seed=0,  # noqa: E731
                                      conditioning=attrs)
    assert len({key(["gender", "age_group"]), key(["gender"]), key([])}) == 3
    assert FairPlaySettings(conditioning="balanced").conditioned_on(cohort, ("gender",)) == ["gender"]
    assert FairPlaySettings().conditioned_on(cohort, ()) == cohort.group_attributes


def test_outcome_only_run_under_the_paper_protocol(monkeypatch, tmp_path):
    """--balance-by with no attribute: methods fill the outcome cells, FairPlay's generator sees the
    outcome only, fairness is still reported per evaluation group, both aggregations included."""
    calls = install_fairplay_stand_in(monkeypatch)
    data = make_cohort(300, seed=4).save(tmp_path / "data")
    out = kfold.run_kfold(data=data, groups=["gender", "age_group"], balance_by=[], out=tmp_path / "run", folds=2,
                          methods=["original", "upsample", "smote", "separate", "fairplay"], models=["logreg"],
                          protocol="paper", generator_cache=tmp_path / "gen",
                          fairplay=FairPlaySettings(train_options={"epochs": 2}), progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["balance_by"] == [] and run["protocol"]["name"] == "paper"
    assert all(c["groups"] == [] for c in calls["rebalance"])
    assert all(set(c["ids"]) for c in calls["train"])
    assert calls["train"][0]["options"].lr == 1e-4 and calls["train"][0]["options"].epochs == 2
    units = pl.read_parquet(out / "units.parquet")
    original = {r["fold"]: json.loads(r["train_cells"]) for r in units.filter(
        pl.col("method") == "original").iter_rows(named=True)}
    for r in units.filter(pl.col("method").is_in(["upsample", "smote", "fairplay"])).iter_rows(named=True):
        cells = json.loads(r["train_cells"])
        assert set(cells) == {"0|", "1|"}, r["method"]  # outcome cells only
        assert cells["0|"] >= original[r["fold"]]["0|"] and cells["1|"] > 3 * original[r["fold"]]["1|"], r["method"]
        if r["method"] == "smote":  # visit rows: the positive cell filled to the negative one
            assert cells["1|"] == cells["0|"]
    separate = units.filter(pl.col("method") == "separate")
    assert separate["cell_attributes"].to_list() == ["gender & age_group"] * 2  # per evaluation group
    metrics = pl.read_parquet(out / "metrics.parquet")
    groups = metrics.filter((pl.col("metric") == "f1") & (pl.col("attribute") == "gender"))["group"].unique()
    assert set(groups) == {"F", "M", "X"}
    fair = set(metrics.filter((pl.col("attribute") == "gender") & pl.col("group").is_null())["metric"])
    assert {"theil", "di_weighted", "theil_of_means", "di_weighted_of_means", "f1_sd_of_means"} <= fair
    report = (out / "report.md").read_text()
    assert "protocol: `paper`" in report and "balanced by: outcome only" in report
    # the synthetic patients of the outcome-only generator carry groups drawn from their cell
    fp = next((out / "fairplay").iterdir())
    balanced = PreparedDataset.load(fp)
    assert balanced.group_attributes == ["gender", "age_group"]
    # the audit tests both aggregations against original
    from benchmarks.audit import run_audit

    _, table = run_audit(out, out / "audit.html", n_resamples=20, n_permutations=20, auroc=False, progress=False)
    compared = pl.read_parquet(table).filter((pl.col("table") == "comparisons") & (pl.col("model") == "mean"))
    tested = set(compared.filter(pl.col("attribute") == "gender")["metric"])
    assert {"theil", "di_weighted", "theil_of_means", "di_weighted_of_means"} <= tested
    assert compared["p_value"].drop_nans().is_between(0, 1).all()
    assert "Theil (paper)" in (out / "audit.html").read_text()


def test_a_ratio_sweep_labels_the_methods_that_have_a_ratio(monkeypatch, tmp_path):
    calls = install_fairplay_stand_in(monkeypatch)
    data = make_cohort(300, seed=4).save(tmp_path / "data")
    out = kfold.run_kfold(data=data, groups=["gender"], out=tmp_path / "run", folds=2, ratio=[0.5, 2],
                          methods=["original", "upsample", "fairplay"], models=["logreg"],
                          generator_cache=tmp_path / "gen", fairplay=FairPlaySettings(train_options={"epochs": 2}),
                          progress=False)
    run = json.loads((out / "run.json").read_text())
    assert run["methods"] == ["original", "upsample@0.5", "upsample@2", "fairplay@0.5", "fairplay@2"]
    assert len(calls["train"]) == 2  # one generator per fold, shared by the ratios
    units = pl.read_parquet(out / "units.parquet")
    rows = dict(units.filter(pl.col("fold") == 0).select("method", "n_train_positive").rows())
    assert rows["original"] < rows["upsample@0.5"] < rows["upsample@2"]
    assert (out / "plots" / "ratio_sweep.png").is_file()
    with pytest.raises(HaloBalanceError, match="downsample takes a --ratio of at most 1"):
        kfold.run_kfold(data=data, groups=["gender"], out=tmp_path / "bad", ratio=[1, 2], methods=["downsample"],
                        progress=False)


def test_a_folds_later_ratios_wait_for_the_job_that_trains_its_generator():
    from types import SimpleNamespace

    from benchmarks.executors import _waves

    cfg = SimpleNamespace(ratios=(0.5, 1.0, 2.0), fairplay=FairPlaySettings(threads=2))
    steps = {(0, 0.5): kfold.GENERATOR_WEIGHT, (0, 2.0): kfold.BALANCE_WEIGHT, (1, 1.0): kfold.GENERATOR_WEIGHT}
    splits = [(np.array(["a"]), np.array(["b"]))] * 2
    jobs = kfold._fairplay_jobs(cfg, steps, splits, "fingerprint")
    assert [(j.name, j.after) for j in jobs] == [
        ("FairPlay fold 0 ratio 0.5", ()), ("FairPlay fold 0 ratio 2", ("FairPlay fold 0 ratio 0.5",)),
        ("FairPlay fold 1 ratio 1", ())]
    assert all(j.generator and j.threads == 2 and j.args[1:3] == (k, r) for j, (k, r) in zip(jobs, steps))
    assert [[j.name for j in wave] for wave in _waves(jobs)] == [
        ["FairPlay fold 0 ratio 0.5", "FairPlay fold 1 ratio 1"], ["FairPlay fold 0 ratio 2"]]


def test_cli_protocol_options(tmp_path, monkeypatch):
    install_fairplay_stand_in(monkeypatch)
    data = make_cohort(200, seed=2).save(tmp_path / "data")
    kfold.main(["--data", str(data), "--groups", "gender", "--balance-by", "outcome", "--out", str(tmp_path / "o"),
                "--folds", "2", "--methods", "original,downsample,smote", "--models", "logreg", "--protocol", "paper",
                "--downsample-floor", "50", "--no-smote-binarize", "--no-progress"])
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["protocol"]["downsample_floor"] == 50 and run["protocol"]["smote_binarize"] is False
    assert sorted(run["protocol"]["overrides"]) == ["downsample_floor", "smote_binarize"]
    assert run["balance_by"] == []
