"""The k-fold harness: rebalancing methods, fold hygiene, resume, FairPlay plumbing, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks import downstream, fairness_methods, kfold, methods
from benchmarks.cells import Balancing, balance_targets
from benchmarks.methods import FairPlaySettings, SeparateModels, build_training_set
from benchmarks.report import compare_runs
from halo_balance.cli import run
from halo_balance.data import PreparedDataset, empty_meta
from halo_balance.errors import DatasetError, HaloBalanceError
from tests.conftest import fails_cleanly

N_CODES = 30


def make_cohort(n: int = 300, *, seed: int = 0, marker_tokens: bool = False) -> PreparedDataset:
    """A skewed cohort: rare deaths whose rate and telling codes depend on gender and age group.

    Gender F / M / X (X about 4%), age adult / elderly. Codes 0-3 are telling (0, 1 for men, 2, 3
    otherwise) and appear on most positive final visits and a few other visits; codes 4.. are noise.
    With ``marker_tokens`` every patient also carries a token of its own on every visit, so that
    any training row built from a patient's data shows that patient's token.
    """
    rng = np.random.default_rng(seed)
    gender = rng.choice(["F", "M", "X"], n, p=[0.36, 0.6, 0.04])
    age = rng.choice(["adult", "elderly"], n, p=[0.7, 0.3])
    labels = (rng.random(n) < 0.08 + 0.14 * (age == "elderly") + 0.06 * (gender == "F")).astype(int)
    visits = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        telling = [0, 1] if gender[i] == "M" else [2, 3]
        record = []
        for t in range(k):
            codes = set(rng.choice(np.arange(4, N_CODES), size=int(rng.integers(2, 6)), replace=False).tolist())
            final_positive = labels[i] and t == k - 1
            codes |= {c for c in telling if rng.random() < (0.6 if final_positive else 0.04)}
            if marker_tokens:
                codes.add(N_CODES + i)
            record.append(sorted(codes))
        visits.append(record)
    size = N_CODES + (n if marker_tokens else 0)
    vocab = pl.DataFrame({"id": pl.Series(range(size), dtype=pl.Int32), "token": [f"tok{j}" for j in range(size)],
                          "kind": ["diagnosis"] * size, "description": [""] * size})
    meta = empty_meta(source="k-fold test cohort",
                      groups={"gender": ["F", "M", "X"], "age_group": ["adult", "elderly"]})
    return PreparedDataset.from_records(
        patient_ids=[f"p{i:04d}" for i in range(n)], labels=labels,
        groups={"gender": gender.tolist(), "age_group": age.tolist()}, visits=visits, vocab=vocab, meta=meta,
        synthetic=False).validate()


@pytest.fixture(scope="module")
def cohort() -> PreparedDataset:
    return make_cohort(400, seed=3)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory, cohort) -> Path:
    return cohort.save(tmp_path_factory.mktemp("data") / "cohort")


# ---------------------------------------------------------------------- a stand-in FairPlay balancer
class StandInModel:
    """Saves and loads like a HaloModel; remembers which patients it was trained on."""

    def __init__(self, trained_on: list[str]) -> None:
        self.trained_on = trained_on

    def save_pretrained(self, directory) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps({"trained_on": self.trained_on}))

    @classmethod
    def from_pretrained(cls, directory) -> StandInModel:
        return cls(json.loads((Path(directory) / "config.json").read_text())["trained_on"])


@dataclass
class StandInTrainOptions:
    epochs: int = 1
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    preset: str = "small"
    lr: float | None = None
    batch_size: int = 64
    patience: int = 5
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0

    def validate(self) -> StandInTrainOptions:
        if self.epochs < 1:
            raise HaloBalanceError(f"invalid training options: epochs must be >= 1 (got {self.epochs})")
        return self

    def resolved(self) -> dict:
        return {"generator_version": 0, "options": {"epochs": self.epochs, "seed": self.seed}}


def install_fairplay_stand_in(monkeypatch) -> dict[str, list]:
    """Replace ``halo_balance.{balance,train,model}`` by stand-ins with the documented API.

    The stand-in balancer fills every cell as the real one plans it, with copies of random real
    training patients of that cell marked synthetic. Returns the log of calls.
    """
    from halo_balance.plan import plan_cells

    calls: dict[str, list] = {"train": [], "rebalance": []}

    def train_model(dataset, *, out_dir, options, progress=True):
        calls["train"].append({"ids": set(dataset.patients["patient_id"]), "options": options})
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return StandInModel(sorted(dataset.patients["patient_id"]))

    def rebalance(train, *, groups, model=None, ratio=1.0, min_cell_size=5, allow_copies=False, seed=0,
                  batch_size=256, device="auto", train_options=None, progress=True):
        assert set(model.trained_on) == set(train.patients["patient_id"])
        calls["rebalance"].append({"ids": set(train.patients["patient_id"]), "groups": list(groups)})
        plan = plan_cells(train, groups=groups, ratio=ratio, min_cell_size=min_cell_size)
        rng = np.random.default_rng(seed)
        records, cells = train.records(), train.patients
        parts = [train]
        for cell in plan.filter(pl.col("to_generate") > 0).iter_rows(named=True):
            match = pl.col("label") == cell["label"]
            for g in groups:
                match &= pl.col(g) == cell[g]
            members = np.flatnonzero(cells.select(match).to_series().to_numpy())
            drawn = rng.choice(members, size=cell["to_generate"])
            parts.append(PreparedDataset.from_records(
                patient_ids=[f"syn-{len(parts)}-{j}" for j in range(len(drawn))],
                labels=records.labels[drawn], groups=cells[drawn].select(train.group_attributes),
                visits=[records.patient(int(p)) for p in drawn], vocab=train.vocab, meta=train.meta,
                synthetic=True))
        plan = plan.rename({"to_generate": "generated"}).with_columns(rejected=pl.lit(0))
        synthetic = PreparedDataset.concat(parts[1:]) if len(parts) > 1 else train.select([])
        return types.SimpleNamespace(dataset=PreparedDataset.concat(parts), synthetic=synthetic, plan=plan,
                                     model=model)

    modules = {
        "halo_balance.balance": {"rebalance": rebalance},
        "halo_balance.train": {"TrainOptions": StandInTrainOptions, "train_model": train_model,
                               "CHECKPOINT_DIR": "checkpoint", "STATE_FILE": "state.json",
                               "TRAINING_FILE": "training.json"},
        "halo_balance.model": {"HaloModel": StandInModel},
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return calls


# ---------------------------------------------------------------------- methods
def test_generator_cache_key_follows_the_resolved_training_settings(monkeypatch, tiny):
    """Explicit defaults share a key with no options; a new default or generator version does not."""
    import halo_balance.config
    import halo_balance.train

    key = lambda options, seed=0: methods.generator_key(tiny, fold=0, data_fingerprint="d",  # noqa: E731
                                                        train_options=options, seed=seed, conditioning=["gender"])
    plain = key({})
    assert key({"preset": "small", "lr": 1e-3, "dropout": 0.1}) == plain
    assert key({"epochs": 3}) != plain and key({}, seed=1) != plain
    settings = FairPlaySettings().result_settings()
    assert settings["train_options"]["generator_version"] == halo_balance.train.GENERATOR_VERSION
    assert "seed" not in settings["train_options"]["options"]
    monkeypatch.setattr(halo_balance.train, "GENERATOR_VERSION", halo_balance.train.GENERATOR_VERSION + 1)
    assert key({}) != plain and FairPlaySettings().result_settings() != settings
    monkeypatch.undo()
    monkeypatch.setitem(halo_balance.config.PRESETS, "small", {**halo_balance.config.PRESETS["small"], "dropout": 0.3})
    assert key({}) != plain


def test_balance_targets_by_hand():
    counts = {0: 100, 1: 40, 2: 3, 3: 10}
    assert balance_targets(counts, ratio=1.0, min_cell_size=5, direction="up") == {1: 100, 3: 100}
    assert balance_targets(counts, ratio=0.5, min_cell_size=5, direction="up") == {1: 70, 3: 55}
    assert balance_targets(counts, ratio=1.0, min_cell_size=5, direction="down") == {0: 10, 1: 10}
    assert balance_targets({0: 2, 1: 3}, ratio=1.0, min_cell_size=5, direction="up") == {}


def _patient_cells(ds: PreparedDataset, groups) -> Counter:
    return Counter(map(tuple, ds.patients.select("label", *groups).rows()))


def test_upsample_and_downsample_resample_whole_patients(cohort):
    groups = ["gender"]
    cells = _patient_cells(cohort, groups)
    largest, smallest_eligible = max(cells.values()), min(n for n in cells.values() if n >= 5)
    visits_of = dict(cohort.visits.group_by("patient_id").len().rows())
    label_of = dict(cohort.patients.select("patient_id", "label").rows())
    for method, expect in (("upsample", largest), ("downsample", smallest_eligible)):
        rows = build_training_set(method, cohort, balancing=Balancing(balance_by=groups), seed=1)
        assert not rows.synthetic.any()
        per_patient = Counter(rows.source.tolist())
        # every drawn patient brings all of its visits, once per draw
        assert all(count % visits_of[p] == 0 for p, count in per_patient.items())
        drawn = Counter()
        for p, count in per_patient.items():
            row = cohort.patients.filter(pl.col("patient_id") == p).row(0, named=True)
            drawn[(row["label"], row["gender"])] += count // visits_of[p]
        for cell, n in cells.items():
            assert drawn[cell] == (n if n < 5 else expect), (method, cell)
        positives = sum(label_of[p] * (c // visits_of[p]) for p, c in per_patient.items())
        assert int(rows.y.sum()) == positives  # one positive visit per positive patient drawn


def assert_visit_cells_topped_up(base, rows) -> np.ndarray:
    """Every (visit label, group) cell of at least 5 rows is as full as the largest; the real rows come
    first, unchanged, and the added rows are synthetic. Returns, per synthetic row, whether it
    holds a telling code (0-3)."""
    before = Counter(zip(base.y.tolist(), base.group.tolist(), strict=True))
    after = Counter(zip(rows.y.tolist(), rows.group.tolist(), strict=True))
    largest = max(before.values())
    for cell, n in before.items():
        assert after[cell] == (n if n < 5 else largest), cell
    assert (rows.X[: len(base)] != base.X).nnz == 0
    new = rows.synthetic
    assert new.sum() == len(rows) - len(base) and (rows.source[new] == "").all()
    return np.asarray(rows.X[new][:, :4].sum(axis=1)).ravel() > 0


@pytest.mark.parametrize("method", ["smote", "smoten"])
def test_smote_family_fills_visit_cells_with_rows_of_their_cell(cohort, method):
    groups = ["gender", "age_group"]
    base = build_training_set("original", cohort, balancing=Balancing(balance_by=groups))
    rows = build_training_set(method, cohort, balancing=Balancing(balance_by=groups), seed=0)
    telling = assert_visit_cells_topped_up(base, rows)
    # synthetic positives of a cell look like that cell's positives (telling codes 0-3)
    new = rows.synthetic
    assert telling[rows.y[new] == 1].mean() > 0.5 > telling[rows.y[new] == 0].mean()
    if method == "smoten":
        assert set(np.unique(rows.X.data)) == {1.0}  # binary codes stay binary


def test_smoten_bounds_its_input_per_cell(cohort):
    rows = methods.smoten(cohort, balancing=Balancing(balance_by=("gender",)), seed=0, max_rows=20)
    base = build_training_set("original", cohort, balancing=Balancing(balance_by=("gender",)))
    assert Counter(rows.y.tolist())[1] > Counter(base.y.tolist())[1]
    assert rows.X.shape[1] == cohort.vocab_size


def test_separate_models_fall_back_to_the_pooled_model():
    rng = np.random.default_rng(0)
    X = __import__("scipy.sparse", fromlist=["csr_matrix"]).csr_matrix(rng.random((300, 6)) < 0.3, dtype=np.float32)
    y = (X[:, 0].toarray().ravel() > 0).astype(np.int8)
    groups = np.array(["big"] * 280 + ["tiny"] * 20)
    y[280:] = 0
    y[280] = 1  # "tiny" holds one positive: no model of its own
    sep = SeparateModels("logreg", random_state=0).fit(X, y, groups)
    assert list(sep.models_) == ["big"] and sep.fallback_ == ["tiny"]
    scores = sep.score(X, groups)
    pooled = downstream.score(sep.pooled_, X[280:])
    assert np.allclose(scores[280:], pooled)
    assert np.allclose(scores[:280], downstream.score(sep.models_["big"], X[:280]))


@pytest.mark.parametrize("name", downstream.MODELS)
def test_downstream_models_score_sparse_rows(cohort, name):
    rows = build_training_set("upsample", cohort, balancing=Balancing(balance_by=("gender",)), seed=0)
    model = downstream.fit(name, rows.X, rows.y, random_state=0)
    s = downstream.score(model, rows.X[:200])
    assert s.shape == (200,) and (s >= 0).all() and (s <= 1).all()
    assert np.array_equal(downstream.predict(s), model.predict(rows.X[:200]).astype(np.int8))


# ---------------------------------------------------------------------- fold hygiene
def test_no_synthetic_or_resampled_row_comes_from_a_test_patient(monkeypatch, tmp_path):
    """Every method's training rows use only the fold's training patients.

    Each patient carries a token of its own on every visit, so a training row holding any data of
    a test patient (a copy, an interpolation, a generated record) would show that patient's token.
    """
    install_fairplay_stand_in(monkeypatch)
    ds = make_cohort(240, seed=5, marker_tokens=True)
    marker = {pid: N_CODES + i for i, pid in enumerate(ds.patients["patient_id"])}
    groups = ["gender", "age_group"]
    for fold, (train_ids, test_ids) in enumerate(ds.kfold(3, groups=groups, seed=0)):
        assert not set(train_ids) & set(test_ids)
        test_tokens = [marker[p] for p in test_ids]
        train = ds.select(train_ids)
        for method in ("original", "upsample", "downsample", "smote", "smoten", "group_resample",
                       "adversarial_debiasing", "fairplay"):
            if method == "fairplay":
                balanced, _, _ = methods.fairplay_dataset(
                    train, balancing=Balancing(balance_by=groups), fold=fold, seed=fold, settings=FairPlaySettings(),
                    generator_dir=tmp_path / "gen", data_fingerprint="test", progress=False)
                assert balanced.patients["synthetic"].any()
                rows = methods.training_rows(balanced, groups)
            elif method in fairness_methods.METHODS:
                rows = fairness_methods.training_set(method, train, groups=groups, balancing=Balancing(), seed=fold)
            else:
                rows = build_training_set(method, train, balancing=Balancing(balance_by=groups), seed=fold)
            assert set(rows.source[rows.source != ""]) <= set(train_ids), method
            assert rows.X[:, test_tokens].nnz == 0, method
            if method in ("smote", "smoten", "fairplay"):
                assert rows.synthetic.sum() > 0


def test_harness_end_to_end_with_a_fairplay_stand_in(monkeypatch, tmp_path, cohort, cohort_dir):
    calls = install_fairplay_stand_in(monkeypatch)
    seen: list[tuple[str, set]] = []
    real_build = kfold.build_training_set

    def spy(method, train, **kw):
        seen.append((method, set(train.patients["patient_id"])))
        return real_build(method, train, **kw)

    monkeypatch.setattr(kfold, "build_training_set", spy)
    out = kfold.run_kfold(data=cohort_dir, groups=["gender"], out=tmp_path / "run", folds=3, models=["logreg"],
                          seed=0, jobs=1, generator_cache=tmp_path / "gen",
                          fairplay=FairPlaySettings(train_options={"epochs": 2}), progress=False)
    folds = dict(pl.read_parquet(out / "folds.parquet").rows())
    test_sets = [{p for p, f in folds.items() if f == k} for k in range(3)]
    assert sorted(folds) == sorted(cohort.patients["patient_id"])

    # every method got only training patients, FairPlay's generator too
    assert {m for m, _ in seen} == {"original", "upsample", "downsample", "smote", "smoten", "separate"}
    for _, ids in seen + [(None, c["ids"]) for c in calls["train"] + calls["rebalance"]]:
        assert sum(not (ids & t) for t in test_sets) == 1 and len(ids) == cohort.n_patients - min(
            len(t) for t in test_sets if not ids & t)
    assert len(calls["train"]) == 3 and all(c["options"].epochs == 2 for c in calls["train"])

    # predictions hold exactly the real visits of each fold's test patients, for every method
    preds = pl.read_parquet(out / "predictions.parquet")
    assert preds.columns == ["fold", "method", "model", "patient_id", "visit_index", "gender", "y_true", "score",
                             "prediction"]
    real = cohort.visits.select("patient_id", "visit_index", "label").join(
        pl.read_parquet(out / "folds.parquet"), on="patient_id")
    for (fold, method), part in preds.group_by("fold", "method"):
        expect = real.filter(pl.col("fold") == fold)
        assert sorted(part.select("patient_id", "visit_index").rows()) == sorted(
            expect.select("patient_id", "visit_index").rows()), method
        joined = part.join(expect, on=["patient_id", "visit_index"])
        assert (joined["y_true"] == joined["label"]).all()
    assert preds.group_by("fold", "method").len().height == 3 * len(methods.METHODS)

    metrics = pl.read_parquet(out / "metrics.parquet")
    assert set(metrics["method"]) == set(methods.METHODS)
    f1 = metrics.filter(pl.col("attribute").is_null() & (pl.col("metric") == "f1"))
    assert f1.height == 3 * len(methods.METHODS) and f1["value"].is_between(0, 1).all()
    report = (out / "report.md").read_text()
    assert "## Overall F1" in report and "| fairplay |" in report and "Fairness across gender" in report
    assert (out / "plots" / "group_f1_gender.png").read_bytes()[:4] == b"\x89PNG"
    units = pl.read_parquet(out / "units.parquet")
    fp = units.filter(pl.col("method") == "fairplay")
    assert (fp["n_synthetic_rows"] > 0).all()
    assert (units.filter(pl.col("method") == "upsample")["n_copied_rows"] > 0).all()

    # a rerun reuses every unit; another experiment with the same folds reuses the generators
    kfold.run_kfold(data=cohort_dir, groups=["gender"], out=out, folds=3, models=["logreg"], seed=0,
                    generator_cache=tmp_path / "gen", fairplay=FairPlaySettings(train_options={"epochs": 2}),
                    progress=False)
    assert json.loads((out / "run.json").read_text())["invocations"][-1]["units_computed"] == 0
    kfold.run_kfold(data=cohort_dir, groups=["age_group"], stratify=["gender"], out=tmp_path / "age", folds=3,
                    methods=["original", "fairplay"], models=["logreg"], seed=0, generator_cache=tmp_path / "gen",
                    fairplay=FairPlaySettings(train_options={"epochs": 2}), progress=False)
    assert len(calls["train"]) == 3 and calls["rebalance"][-1]["groups"] == ["age_group"]
    table = compare_runs([out, tmp_path / "age"]).splitlines()
    assert table[0].startswith("| method | project, gender: F1 | AUROC | Theil (mean-of-units) | DI (mean-of-units) "
                               "| project, age_group: F1")
    assert len(table) == 2 + len(methods.METHODS) and table[-1].startswith("| fairplay |")


def test_mitigation_methods_run_in_the_harness_with_the_models_they_support(monkeypatch, tmp_path, cohort_dir):
    install_fairplay_stand_in(monkeypatch)
    out = kfold.run_kfold(data=cohort_dir, groups=["gender"], out=tmp_path / "run", folds=2,
                          methods=["original", *fairness_methods.METHODS], models=["knn", "logreg"], seed=0,
                          generator_cache=tmp_path / "gen", fairplay=FairPlaySettings(train_options={"epochs": 2}),
                          progress=False)
    units = pl.read_parquet(out / "units.parquet")
    ran = {(m, x) for m, x in units.select("method", "model").unique().rows()}
    assert ran == {(m, x) for m in ("original", *fairness_methods.METHODS) for x in ("knn", "logreg")} - {
        ("exponentiated_gradient", "knn"), ("adversarial_debiasing", "knn"), ("adversarial_debiasing", "logreg")}
    by_method = {m: part for (m,), part in units.group_by("method")}
    assert (by_method["fairplay_threshold"]["n_synthetic_rows"] > 0).all()  # trained on FairPlay's data
    assert (by_method["group_resample"]["n_copied_rows"] > 0).all()
    assert (by_method["importance_weighting"]["n_synthetic_rows"] == 0).all()
    preds = pl.read_parquet(out / "predictions.parquet")
    # post-processing moves the decisions away from `score > 0.5`; the plain methods keep it
    for method, part in preds.group_by("method"):
        at_half = (part["prediction"] == (part["score"] > downstream.THRESHOLD).cast(pl.Int8)).all()
        assert at_half == (method[0] in ("original", "importance_weighting", "group_resample")), method
    report = (out / "report.md").read_text()
    assert "| exponentiated_gradient |" in report and "exponentiated_gradient (logreg)" in report
    with pytest.raises(HaloBalanceError, match="--methods: unknown 'reweighting'"):
        kfold.run_kfold(data=cohort_dir, groups=["gender"], out=tmp_path / "bad", methods=["reweighting"],
                        progress=False)


def test_resume_recomputes_only_missing_or_changed_units(tmp_path, cohort_dir):
    args = dict(data=cohort_dir, groups=["gender"], out=tmp_path / "run", folds=2, methods=["original", "upsample"],
                models=["logreg", "knn"], seed=0, progress=False)
    out = kfold.run_kfold(**args)

    def computed() -> int:
        return json.loads((out / "run.json").read_text())["invocations"][-1]["units_computed"]

    assert computed() == 8
    kept = out / "units" / "fold=0" / "original" / "knn.parquet"
    stamp = kept.stat().st_mtime_ns
    (out / "units" / "fold=1" / "upsample" / "logreg.parquet").unlink()
    kfold.run_kfold(**args)
    assert computed() == 1 and kept.stat().st_mtime_ns == stamp
    kfold.run_kfold(**{**args, "ratio": 0.5})  # only the resampling units depend on the ratio
    assert computed() == 4
    with pytest.raises(HaloBalanceError, match="seed"):
        kfold.run_kfold(**{**args, "seed": 1})
    kfold.run_kfold(**{**args, "seed": 1, "overwrite": True})
    assert computed() == 8


@pytest.mark.parametrize(("data", "groups"), [("eicu_prepared", ["gender", "age_group"]), ("sim_prepared", ["race"])])
def test_real_and_simulated_data(request, tmp_path, data, groups):
    path = request.getfixturevalue(data)
    out = kfold.run_kfold(data=path, groups=groups, out=tmp_path / "run", folds=3, methods=["original", "smote"],
                          models=["logreg"], progress=False)
    ds = PreparedDataset.load(path)
    preds = pl.read_parquet(out / "predictions.parquet")
    for _, part in preds.group_by("method"):  # every real visit is scored exactly once per method
        assert part.height == ds.n_visits and part.select("patient_id", "visit_index").n_unique() == ds.n_visits
    summary = pl.read_parquet(out / "summary.parquet")
    auroc = summary.filter((pl.col("method") == "original") & (pl.col("model") == "logreg")
                           & pl.col("attribute").is_null() & (pl.col("metric") == "auroc"))["mean"].item()
    assert auroc > 0.6  # the codes carry signal about death
    groups_seen = set(summary.filter(pl.col("attribute") == groups[0])["group"].drop_nulls())
    assert groups_seen == set(ds.patients[groups[0]].unique())


# ---------------------------------------------------------------------- command line
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _fails_cleanly(argv: list[str], capsys, *needles: str) -> None:
    fails_cleanly(kfold.main, argv, capsys, *needles)


def test_every_option_is_checked_before_anything_is_written(tmp_path, cohort_dir, capsys):
    inputs = _tree(cohort_dir)
    (tmp_path / "a_file").write_text("mine")
    out = tmp_path / "run"
    base = ["--data", str(cohort_dir), "--groups", "gender", "--methods", "original", "--models", "logreg",
            "--no-progress"]
    faults = [
        (["--out", str(out), "--folds", "2000"], ["--folds 2000 is too many", "pass --folds 5"]),
        (["--out", str(out), "--methods", "original,fairplay", "--train-options", '{"epoch": 3}'],
         ["--train-options: unknown 'epoch' (did you mean 'epochs'?)"]),
        (["--out", str(out), "--methods", "fairplay", "--train-options", '{"preset": "smal"}'],
         ["--train-options preset: unknown 'smal' (did you mean 'small'?)"]),
        (["--out", str(out), "--train-options", '{"epochs": "20"}'], ["epochs must be a JSON integer"]),
        (["--out", str(out), "--train-options", '{"epochs": 0}'], ["epochs must be >= 1"]),
        (["--out", str(out), "--methods", "original,upsampel"],
         ["--methods: unknown 'upsampel' (did you mean 'upsample'?)"]),
        (["--out", str(out), "--models", "logreg,xgbost"], ["--models: unknown 'xgbost' (did you mean 'xgboost'?)"]),
        (["--out", str(out), "--groups", "gendr"], ["--groups", "unknown 'gendr' (did you mean 'gender'?)"]),
        (["--out", str(out), "--stratify", "agegroup"], ["--stratify", "(did you mean 'age_group'?)"]),
        (["--out", str(out), "--device", "gpu"], ["--device: unknown 'gpu'"]),
        (["--out", str(out), "--fairness-min-share", "1.5"], ["--fairness-min-share must lie in [0, 1)"]),
        (["--out", str(out), "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["--out", str(cohort_dir), "--overwrite"], ["is also an input"]),
        (["--out", str(cohort_dir / "kfold")], ["lies inside the input"]),
        (["--out", str(tmp_path / "a_file")], ["exists and is a file"]),
        (["--out", str(tmp_path / "a_file" / "run")], ["cannot be created", "is a file, not a folder"]),
        *([(["--out", "/proc/kfold_run"], ["cannot be created", "is not writable"])]
          if Path("/proc/self").is_dir() else []),
        (["--out", str(out), "--generator-cache", str(tmp_path / "a_file")], ["--generator-cache", "is a file"]),
        (["--out", str(out), "--generator-cache", str(cohort_dir)], ["--generator-cache", "inside the input"]),
    ]
    for extra, needles in faults:
        _fails_cleanly([*base, *extra], capsys, *needles)
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"], extra
    assert _tree(cohort_dir) == inputs
    with pytest.raises(SystemExit) as exc:  # argparse's own error: still exit 2, no traceback
        kfold.main([*base, "--out", str(out), "--train-options", "{epochs: 3}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not valid JSON" in err and "Traceback" not in err and not out.exists()
    with pytest.raises(DatasetError):
        kfold.main(["--data", str(tmp_path / "nowhere"), "--out", str(out), "--groups", "gender"])
    # the corrected command is not blocked by anything a failed one left
    kfold.main([*base, "--out", str(out), "--folds", "2"])
    assert (out / "report.md").is_file() and _tree(cohort_dir) == inputs
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(HaloBalanceError, match="was not written by halo_balance"):
        kfold.main([*base, "--out", str(tmp_path / "busy")])
    # the report checks every folder before it rewrites any
    from benchmarks import report

    written = _tree(out)
    for extra in ([], ["--compare"]):
        fails_cleanly(report.main, [*extra, str(out), str(tmp_path / "busy")], capsys,
                            f"{tmp_path / 'busy'} is not a finished k-fold run (missing run.json")
        assert _tree(out) == written


def test_ctrl_c_keeps_finished_units_says_so_and_a_rerun_resumes(monkeypatch, tmp_path, cohort_dir, capsys):
    from halo_balance.cli import run

    argv = ["--data", str(cohort_dir), "--groups", "gender", "--out", str(tmp_path / "run"), "--folds", "2",
            "--methods", "original,upsample", "--models", "logreg,knn", "--no-progress"]
    real_task, calls = kfold._run_task, []

    def stopped_at_the_third_task(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_task(task)

    monkeypatch.setattr(kfold, "_run_task", stopped_at_the_third_task)
    with pytest.raises(SystemExit) as exc:
        run(kfold.main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 130 and "no partial output" not in err
    assert err.startswith("interrupted; kept 4 of 8 finished (fold, method, model) units")
    assert "run the same command again to resume" in err
    invocation = json.loads((tmp_path / "run" / "run.json").read_text())["invocations"][-1]
    assert "interrupted" in invocation and invocation["units_computed"] == 4
    monkeypatch.setattr(kfold, "_run_task", real_task)
    with pytest.raises(SystemExit) as exc:
        run(kfold.main, argv)
    assert exc.value.code == 0
    invocation = json.loads((tmp_path / "run" / "run.json").read_text())["invocations"][-1]
    assert invocation["units_computed"] == 4 and "finished" in invocation


def test_one_progress_bar_counts_generators_and_the_run_ends_with_the_headline(monkeypatch, tmp_path, cohort,
                                                                               cohort_dir, capsys):
    install_fairplay_stand_in(monkeypatch)
    bars, seen = [], []
    real_init, real_fairplay = kfold._Progress.__init__, kfold.fairplay_dataset

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        bars.append(self)

    def fairplay(*args, **kwargs):  # the bar when a generator starts: generators come first (the longest jobs)
        seen.append((bars[-1].bar.n, bars[-1].bar.total, bars[-1].units))
        return real_fairplay(*args, **kwargs)

    monkeypatch.setattr(kfold._Progress, "__init__", init)
    monkeypatch.setattr(kfold, "fairplay_dataset", fairplay)
    out = tmp_path / "run"
    kfold.main(["--data", str(cohort_dir), "--groups", "gender", "age_group", "--out", str(out), "--folds", "2",
                "--methods", "original,upsample,fairplay", "--models", "logreg", "--train-options", '{"epochs": 2}'])
    captured = capsys.readouterr()
    total = 6 + 2 * kfold.GENERATOR_WEIGHT  # 6 units, 2 generators
    assert seen == [(0, total, 0), (kfold.GENERATOR_WEIGHT, total, 0)]
    assert bars[-1].bar.n == total and "units 6/6, generators 2/2" in captured.err

    # the headline: mean F1 (vs original), AUROC, Theil and DI over the intersection, one row per method
    lines = captured.out.splitlines()
    assert lines[0].startswith("| method | ") and "gender & age_group" in lines[0]
    assert all(name in lines[0] for name in ("F1", "AUROC", "Theil", "DI"))
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| original", "| upsample", "| fairplay"]
    report = (out / "report.md").read_text()
    assert report.index("## Headline") < report.index("## Overall F1") and "\n".join(lines[:5]) in report
    assert lines[-1] == f"report: {out / 'report.md'}"

    # group headers count test patients and deaths, in the report as in the audit
    from benchmarks import audit

    audit.run_audit(out, tmp_path / "audit.html", n_resamples=5, n_permutations=5, progress=False)
    page = (tmp_path / "audit.html").read_text()
    for gender in ("F", "M"):
        members = cohort.patients.filter(pl.col("gender") == gender)
        header = f"{gender} (patients={members.height}, deaths={int(members['label'].sum())})"
        assert header in report and header in page


def test_ray_backend_problems_are_reported_before_any_work(tmp_path, cohort_dir, monkeypatch, capsys):
    args = ["--data", str(cohort_dir), "--groups", "gender", "--out", str(tmp_path / "run"), "--backend", "ray"]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # as if the extra were not installed
        with pytest.raises(SystemExit) as exc:
            run(kfold.main, args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and 'pip install -e ".[ray]"' in err and "Traceback" not in err
    if importlib.util.find_spec("ray") is not None:  # no cluster runs here
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        with pytest.raises(SystemExit) as exc:
            run(kfold.main, [*args, "--ray-address", "auto"])
        assert exc.value.code == 2 and "cannot reach a Ray cluster" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- slow: every model, real balancer
@pytest.mark.slow
def test_all_methods_and_models_on_the_cohort(monkeypatch, tmp_path):
    install_fairplay_stand_in(monkeypatch)
    data = make_cohort(1200, seed=11).save(tmp_path / "data")
    out = kfold.run_kfold(data=data, groups=["gender", "age_group"], out=tmp_path / "run", jobs=2, progress=False)
    summary = pl.read_parquet(out / "summary.parquet")
    f1 = summary.filter(pl.col("attribute").is_null() & (pl.col("metric") == "f1") & (pl.col("model") == "mean"))
    assert f1.height == len(methods.METHODS)
    assert (out / "plots" / "radar_f1_gender_age_group.png").is_file()


@pytest.mark.slow
def test_real_fairplay_small_run(tmp_path):
    pytest.importorskip("halo_balance.balance")
    from tests.conftest import make_learnable_dataset

    data = make_learnable_dataset(400, seed=2).save(tmp_path / "data")
    out = kfold.run_kfold(data=data, groups=["gender"], out=tmp_path / "run", folds=2, methods=["original", "fairplay"],
                          models=["logreg"], fairplay=FairPlaySettings(
                              device="cpu", train_options={"preset": "tiny", "epochs": 2}), progress=False)
    units = pl.read_parquet(out / "units.parquet").filter(pl.col("method") == "fairplay")
    assert (units["n_synthetic_rows"] > 0).all()
    assert len(list((out / "generators").iterdir())) == 2


def test_runs_sharing_a_generator_cache_train_each_entry_once(tmp_path, monkeypatch):
    import threading
    import time

    import torch

    import halo_balance.train
    from tests.conftest import make_learnable_dataset

    data = make_learnable_dataset(120, seed=4)
    trainings = []
    train_model = halo_balance.train.train_model

    def slow_train(*args, **kwargs):  # long enough that the second run arrives while the first trains
        trainings.append(kwargs["out_dir"])
        time.sleep(0.5)
        return train_model(*args, **kwargs)

    monkeypatch.setattr(halo_balance.train, "train_model", slow_train)
    path, models, errors = tmp_path / "cache" / "fold0-key", [], []

    def one_run():
        try:
            models.append(methods.load_or_train_generator(
                data, path=path, train_options={"preset": "tiny", "epochs": 1}, seed=0, device="cpu", progress=False))
        except Exception as exc:  # noqa: BLE001 - the assertion below names it
            errors.append(exc)

    runs = [threading.Thread(target=one_run) for _ in range(2)]
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    assert not errors and len(models) == 2 and len(trainings) == 1
    assert (path / "model.safetensors").is_file() and not path.with_name(path.name + ".training").exists()
    first, second = (m.state_dict() for m in models)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the waiting run loaded the trained one
