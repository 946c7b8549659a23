"""The generative baselines (MCRAGE, SMA, CTGAN, TVAE): cells, fold discipline, seeds, missing extra."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from benchmarks import kfold
from benchmarks.generative import check_options, make_generator
from benchmarks.generative.mcrage import BernoulliDiffusion
from benchmarks.generative.sma import SequentialCART, strongest_predictors
from benchmarks.cells import Balancing
from benchmarks.methods import build_training_set, training_rows
from benchmarks.synthetic_rows import check_rows, describe_synthetic
from halo_balance.errors import HaloBalanceError, MissingDependencyError
from tests.test_kfold import N_CODES, assert_visit_cells_topped_up, make_cohort

# small, fast settings; the defaults are for real data
FAST = {"mcrage": {"iterations": 200, "width": 64, "steps": 20, "lr": 3e-3}, "sma": {},
        "ctgan": {"epochs": 3, "batch_size": 100, "max_rounds": 2, "max_draw_ratio": 3},
        "tvae": {"epochs": 30, "batch_size": 100, "max_rounds": 2, "max_draw_ratio": 3}}
OWN = ("mcrage", "sma")  # implemented here, no optional dependency


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(400, seed=3)


def _has_ctgan() -> bool:
    try:
        import ctgan  # noqa: F401
    except ImportError:
        return False
    return True


LIBRARY = [pytest.param(m, marks=[pytest.mark.slow, pytest.mark.skipif(
    not _has_ctgan(), reason='needs pip install -e ".[baselines]"')]) for m in ("ctgan", "tvae")]


@pytest.mark.parametrize("method", OWN)
def test_own_generators_fill_every_eligible_cell_with_binary_rows_of_that_cell(cohort, method):
    groups = ["gender", "age_group"]
    base = training_rows(cohort, groups)
    rows = build_training_set(method, cohort, balancing=Balancing(balance_by=groups), seed=0,
                              options=FAST[method])
    telling = assert_visit_cells_topped_up(base, rows)
    new = rows.synthetic
    assert set(np.unique(rows.X.data)) == {1.0} and rows.X.shape[1] == cohort.vocab_size
    assert rows.info["shortfall"] == 0 and rows.info["generator_fit_seconds"] > 0
    # synthetic positives look like positives: the telling codes 0-3 are far more common in them
    assert telling[rows.y[new] == 1].mean() > 0.4 > 0.2 > telling[rows.y[new] == 0].mean()


@pytest.mark.parametrize("method", LIBRARY)
def test_library_generators_fill_cells_or_report_the_shortfall(cohort, method):
    rows = build_training_set(method, cohort, balancing=Balancing(balance_by=["gender"]), seed=0,
                              options=FAST[method])
    base = training_rows(cohort, ["gender"])
    assert set(np.unique(rows.X.data)) <= {1.0} and rows.X.shape[1] == cohort.vocab_size
    cells = rows.info["cells"]
    added = Counter(zip(rows.y[rows.synthetic].tolist(), rows.group[rows.synthetic].tolist(), strict=True))
    for name, c in cells.items():
        label, _, group = name.partition("|")
        assert added[(int(label), group)] == c["generated"] <= c["requested"]
    assert rows.info["shortfall"] == sum(c["requested"] - c["generated"] for c in cells.values())
    assert len(rows) == len(base) + sum(c["generated"] for c in cells.values())


@pytest.mark.parametrize("method", LIBRARY)
def test_library_draws_follow_the_seed(cohort, method):
    """The library's raw draws, before the cell check. TVAE decodes every discrete column to its most
    probable category: on sparse codes that is the all-zero row of the largest cell whatever the
    seed (what the eICU runs show: it never yields a death)."""
    rows = training_rows(cohort, ["gender"])
    cells = np.unique(rows.cells(), return_inverse=True)[1]

    def draw(seed):
        return make_generator(method, random_state=seed, **FAST[method]).fit(rows.X, cells)._draw(300, 1)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.equals(b)
    if method == "ctgan":
        assert not a.equals(c)
    else:
        codes = a.drop(columns="cell").to_numpy()
        assert (codes == 0).mean() > 0.99 and a["cell"].nunique() == 1


@pytest.mark.parametrize("method", [*OWN, *LIBRARY[:1]])
def test_same_seed_same_rows_other_seed_other_rows(cohort, method):
    def draw(seed):
        return build_training_set(method, cohort, balancing=Balancing(balance_by=["gender"]), seed=seed,
                                  options=FAST[method])

    a, b, c = draw(0), draw(0), draw(1)
    assert a.synthetic.sum() > 0
    assert (a.X != b.X).nnz == 0 and np.array_equal(a.y, b.y) and np.array_equal(a.group, b.group)
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0


def test_no_generated_row_carries_a_test_patients_marker():
    """Fitted on the fold's training rows only: no row can show a test patient's own token."""
    ds = make_cohort(240, seed=5, marker_tokens=True)
    marker = {pid: N_CODES + i for i, pid in enumerate(ds.patients["patient_id"])}
    for fold, (train_ids, test_ids) in enumerate(ds.kfold(2, groups=["gender"], seed=0)):
        for method in OWN:
            rows = build_training_set(method, ds.select(train_ids), balancing=Balancing(balance_by=["gender"]),
                                      seed=fold, options={**FAST[method], "iterations": 20} if method == "mcrage" else {})
            assert rows.synthetic.sum() > 0
            assert rows.X[:, [marker[p] for p in test_ids]].nnz == 0, method


# ---------------------------------------------------------------------- the models themselves
def test_bernoulli_posterior_is_bayes_rule():
    gen = BernoulliDiffusion(steps=10, width=8, depth=1, iterations=1)
    X = sp.csr_matrix((np.random.default_rng(0).random((50, 6)) < 0.3).astype(np.float32))
    gen.fit(X, np.zeros(50, dtype=int))
    m, bar, alpha = gen.rate_.numpy(), gen.alpha_bar_.numpy(), gen.alpha_.numpy()
    for t in (1, 4, 10):
        for x0 in (0.0, 1.0):
            for xt in (0.0, 1.0):
                def step(a, b):  # q(x_t = b | x_{t-1} = a)
                    rate = alpha[t] * (a == 1) + (1 - alpha[t]) * m
                    return rate if b == 1 else 1 - rate

                prior1 = bar[t - 1] * x0 + (1 - bar[t - 1]) * m
                expect = step(1, xt) * prior1 / (step(1, xt) * prior1 + step(0, xt) * (1 - prior1))
                got = gen._posterior(torch.full((1, 6), xt), torch.full((1, 6), x0), torch.tensor([t])).numpy()[0]
                assert np.allclose(got, expect, atol=1e-5), (t, x0, xt)
    # the forward chain ends at the stationary (marginal) rate
    assert bar[-1] < 1e-3 and np.allclose(m, np.asarray(X.mean(0)).ravel().clip(1e-4, 1 - 1e-4), atol=1e-6)


def test_mcrage_learns_cell_specific_rates():
    rng = np.random.default_rng(0)
    cells = np.repeat([0, 1], 300)
    X = sp.csr_matrix(np.column_stack([rng.random(600) < np.where(cells == 0, 0.9, 0.05),
                                       rng.random(600) < 0.3]).astype(np.float32))
    gen = BernoulliDiffusion(iterations=600, width=64, steps=20, random_state=0).fit(X, cells)
    rows, made = gen.sample({0: 400, 1: 400})
    rate0 = rows[made == 0][:, 0].mean()
    rate1 = rows[made == 1][:, 0].mean()
    assert rate0 > 0.75 and rate1 < 0.2, (rate0, rate1)
    assert abs(rows[:, 1].mean() - 0.3) < 0.1


def test_sequential_cart_keeps_a_dependency_and_the_cells_rates():
    rng = np.random.default_rng(1)
    cells = np.repeat([0, 1], 400)
    a = rng.random(800) < np.where(cells == 0, 0.7, 0.1)
    b = a & (rng.random(800) < 0.95)  # b almost only with a
    noise = rng.random((800, 5)) < 0.2
    X = sp.csr_matrix(np.column_stack([a, b, noise]).astype(np.float32))
    gen = SequentialCART(max_predictors=2, random_state=0).fit(X, cells)
    # the most frequent code comes first; b's predictors include a (the most associated earlier code)
    order = list(gen.order_)
    assert order[0] == 0 and 0 in order[: order.index(1)]
    assert order.index(0) in gen.predictors_[order.index(1)]
    S = gen.synthesize(np.repeat([0, 1], 1000)).toarray()
    assert S[:1000, 0].mean() > 0.6 and S[1000:, 0].mean() < 0.2
    assert S[S[:, 1] == 1, 0].mean() > 0.95  # b without a stays rare


def test_strongest_predictors_all_earlier_codes_without_a_limit():
    X = sp.csr_matrix((np.random.default_rng(0).random((100, 8)) < 0.3).astype(np.float32))
    full = strongest_predictors(X, np.arange(8), None)
    assert [list(p) for p in full] == [list(range(i)) for i in range(8)]
    limited = strongest_predictors(X, np.arange(8), 3)
    assert all(len(p) == min(i, 3) and (p < i).all() for i, p in enumerate(limited))


def test_sma_upsamples_its_synthetic_copy():
    ds = make_cohort(300, seed=2)
    rows = build_training_set("sma", ds, balancing=Balancing(balance_by=["gender"]), seed=0)
    base = training_rows(ds, ["gender"])
    info = describe_synthetic(rows.X, rows.cells(), rows.synthetic)
    # the gap of a cell is filled from a copy as large as the real cell: rows repeat
    assert info["n_synthetic_distinct"] < rows.synthetic.sum() / 2
    assert len(rows) > len(base)


# ---------------------------------------------------------------------- row checks and statistics
def test_check_rows_rejects_non_binary_and_out_of_vocabulary_rows():
    ok = check_rows(sp.csr_matrix(np.array([[0, 1, 1], [1, 0, 0]], dtype=np.float32)), vocab_size=3, expected=2,
                    method="x")
    assert ok.dtype == np.float32 and ok.nnz == 3
    with pytest.raises(HaloBalanceError, match="non-binary value 0.5"):
        check_rows(sp.csr_matrix(np.array([[0.5, 1, 0]])), vocab_size=3, expected=1, method="x")
    with pytest.raises(HaloBalanceError, match=r"shape \(1, 4\)"):
        check_rows(sp.csr_matrix(np.ones((1, 4))), vocab_size=3, expected=1, method="x")


def test_describe_synthetic_on_copies_of_real_rows(cohort):
    rows = training_rows(cohort, ["gender"])
    cells = rows.cells()
    pos = np.flatnonzero(cells == "1|F")
    X = sp.vstack([rows.X, rows.X[pos]], format="csr")
    all_cells = np.concatenate([cells, cells[pos]])
    synthetic = np.r_[np.zeros(len(rows), bool), np.ones(len(pos), bool)]
    info = describe_synthetic(X, all_cells, synthetic, test_X=rows.X, test_cells=cells)
    assert info["fidelity_unigram_r2"] == pytest.approx(1.0) and info["fidelity_pair_r2"] == pytest.approx(1.0)
    assert info["n_synthetic_training_copies"] == len(pos)
    assert info["fidelity_ceiling_unigram_r2"] == pytest.approx(1.0)  # same rows on both sides
    fractional = describe_synthetic(sp.vstack([rows.X, rows.X[pos] * 0.5], format="csr"), all_cells, synthetic)
    assert fractional["fidelity_unigram_r2"] is None  # interpolated rows are not scored


# ---------------------------------------------------------------------- options and the missing extra
def test_options_are_checked_by_name():
    check_options("mcrage", {"iterations": 10, "device": "cpu"})
    with pytest.raises(HaloBalanceError, match="'iteration' \\(did you mean 'iterations'\\?\\)"):
        check_options("mcrage", {"iteration": 10})
    with pytest.raises(HaloBalanceError, match="unknown 'gan'"):
        make_generator("gan")


def test_missing_ctgan_gives_the_install_command(monkeypatch, tmp_path, cohort, capsys):
    from halo_balance.cli import run

    monkeypatch.setitem(sys.modules, "ctgan", None)  # import ctgan now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install -e "\.\[baselines\]"'):
        build_training_set("tvae", cohort, balancing=Balancing(balance_by=["gender"]), options=FAST["tvae"])
    data = cohort.save(tmp_path / "data")
    with pytest.raises(SystemExit) as exc:
        run(kfold.main, ["--data", str(data), "--groups", "gender", "--out", str(tmp_path / "run"),
                         "--methods", "original,ctgan", "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'pip install -e ".[baselines]"' in err and "Business Source" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()  # stopped before any work


# ---------------------------------------------------------------------- in the harness
def test_generative_methods_in_the_harness(tmp_path, cohort):
    data = cohort.save(tmp_path / "data")
    args = dict(data=data, groups=["gender"], out=tmp_path / "run", folds=2, methods=["original", *OWN],
                models=["logreg"], seed=0, progress=False, generator_options={m: FAST[m] for m in OWN})
    out = kfold.run_kfold(**args)
    units = pl.read_parquet(out / "units.parquet")
    gen = units.filter(pl.col("method").is_in(OWN))
    assert gen.height == 4 and (gen["n_synthetic_rows"] > 0).all() and (gen["generator_shortfall"] == 0).all()
    assert gen["fidelity_unigram_r2"].is_not_null().all() and gen["generator_fit_seconds"].is_not_null().all()
    assert all(json.loads(c) for c in gen["generator_cells"])
    assert units.filter(pl.col("method") == "original")["fidelity_unigram_r2"].is_null().all()
    # only the units of the method whose options changed are recomputed
    kfold.run_kfold(**{**args, "generator_options": {"mcrage": {**FAST["mcrage"], "iterations": 150},
                                                     "sma": {**FAST["sma"], "n_jobs": 2}}})
    assert json.loads((out / "run.json").read_text())["invocations"][-1]["units_computed"] == 2
    with pytest.raises(HaloBalanceError, match="unknown 'epochs'"):
        kfold.run_kfold(**{**args, "generator_options": {"mcrage": {"epochs": 3}}})


def test_sma_results_do_not_depend_on_n_jobs_and_the_speed_script_runs(capsys):
    from benchmarks.speed import sma_speed

    ds = make_cohort(150, seed=4)
    rows = training_rows(ds, ["gender"])
    cells = np.unique(rows.cells(), return_inverse=True)[1]
    one = SequentialCART(n_jobs=1, max_predictors=5, random_state=3).fit(rows.X, cells).synthesize(cells)
    two = SequentialCART(n_jobs=2, max_predictors=5, random_state=3).fit(rows.X, cells).synthesize(cells)
    assert (one != two).nnz == 0
    out = sma_speed.run(ds, groups=["gender"], limits=[None, 5], jobs=[1])
    assert [r["max_predictors"] for r in out] == [None, 5] and all(r["unigram_r2"] > 0.5 for r in out)
    assert "| all | 1 |" in capsys.readouterr().out


def test_ratio_and_min_cell_size_apply_as_for_the_other_over_samplers(cohort):
    base = training_rows(cohort, ["gender"])
    before = Counter(zip(base.y.tolist(), base.group.tolist(), strict=True))
    rows = build_training_set("sma", cohort, balancing=Balancing(balance_by=["gender"], ratio=0.5, min_cell_size=30),
                              seed=0)
    after = Counter(zip(rows.y.tolist(), rows.group.tolist(), strict=True))
    largest = max(before.values())
    for cell, n in before.items():
        assert after[cell] == (n if n < 30 else n + round(0.5 * (largest - n))), cell


def test_generative_oversamplers_balance_the_outcome_only_with_balance_by_outcome(cohort):
    """--balance-by outcome: the cells are the two visit labels; the groups are not crossed in."""
    base = training_rows(cohort, [])
    rows = build_training_set("sma", cohort, balancing=Balancing(balance_by=()), seed=0)
    assert set(rows.group.tolist()) == {""} and set(rows.info["cells"]) == {"1|"}
    assert Counter(rows.y.tolist())[1] == Counter(rows.y.tolist())[0] == Counter(base.y.tolist())[0]

