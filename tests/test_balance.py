"""The balancer and ``python -m halo_balance.generate``: counts, integrity, privacy, errors."""

from __future__ import annotations

import json

import polars as pl
import pytest

from halo_balance import generate
from halo_balance.balance import rebalance
from halo_balance.data import PreparedDataset
from halo_balance.errors import IncompatibleModelError
from halo_balance.model import HaloModel


@pytest.fixture(scope="module")
def model(sim_model):
    return HaloModel.from_pretrained(sim_model)


@pytest.fixture(scope="module")
def train(sim_prepared):
    ds = PreparedDataset.load(sim_prepared)
    return ds.select(ds.patients["patient_id"].head(250))


def _cells(ds: PreparedDataset, groups, synthetic=None) -> dict:
    return {tuple(r[:-1]): r[-1] for r in ds.cell_counts(groups, synthetic=synthetic).iter_rows()}


@pytest.mark.parametrize("groups", [["gender"], ["gender", "age_group"], []])
def test_every_observed_cell_reaches_the_largest(train, model, groups):
    res = rebalance(train, groups=groups, model=model, seed=1, progress=False)
    real = _cells(train, groups)
    after = _cells(res.dataset, groups)
    m = max(real.values())
    for cell, n in real.items():
        assert after[cell] == (m if n >= 5 else n), cell
    plan = res.plan
    assert plan.filter(pl.col("status") == "top_up")["generated"].to_list() == \
        plan.filter(pl.col("status") == "top_up")["to_generate"].to_list()
    assert res.synthetic.n_patients == int(plan["generated"].sum())


def test_real_rows_unchanged_and_synthetic_flagged(train, model):
    res = rebalance(train, groups=["gender"], model=model, seed=2, progress=False)
    out = res.dataset
    real_p = out.patients.filter(~pl.col("synthetic"))
    assert real_p.equals(train.patients)
    assert out.visits.filter(~pl.col("synthetic")).equals(train.visits)
    syn = out.patients.filter(pl.col("synthetic"))
    assert syn.height == res.synthetic.n_patients > 0
    assert not set(syn["patient_id"]) & set(train.patients["patient_id"])
    assert out.visits.filter(pl.col("patient_id").is_in(syn["patient_id"].implode()))["synthetic"].all()
    out.validate()


def test_sharded_sampling_balances_identically(train, model):
    """Each round's sampling split into shards draws the same records as one piece."""
    whole = rebalance(train, groups=["gender"], model=model, seed=4, batch_size=16, progress=False)
    sharded = rebalance(train, groups=["gender"], model=model, seed=4, batch_size=16, shards=3, progress=False)
    assert whole.synthetic.n_patients > 48  # more batches than shards
    assert sharded.dataset.visits.equals(whole.dataset.visits)
    assert sharded.dataset.patients.equals(whole.dataset.patients)
    assert sharded.plan.equals(whole.plan)


def test_no_synthetic_record_copies_a_rare_training_record(train, model):
    from collections import Counter

    res = rebalance(train, groups=["gender"], model=model, seed=3, progress=False)
    held = Counter(train.records().keys())
    assert not [k for k in res.synthetic.records().keys() if 0 < held[k] < 5]
    kept = sum(held[k] >= 5 for k in res.synthetic.records().keys())
    assert int(res.plan["kept_copies"].sum()) == kept == res.dataset.meta["generation"]["kept_copies"]


def test_copies_are_rejected_and_redrawn(train, model, monkeypatch):
    """A sampler that replays a training record first is caught, counted and re-drawn."""
    import halo_balance.sample as sample_mod

    real_sample = sample_mod.sample_records
    calls = []

    def replaying(model_, conditions, **kw):
        drawn = real_sample(model_, conditions, **kw)
        if not calls:  # first round: overwrite the first record with a training record
            victim = train.patients["patient_id"][0]
            codes = train.visits.filter(pl.col("patient_id") == victim).sort("visit_index")["codes"]
            pid = drawn.patients["patient_id"][0]
            other = drawn.visits.filter(pl.col("patient_id") != pid)
            first = pl.DataFrame({"patient_id": [pid] * len(codes), "visit_index": list(range(len(codes)))})
            first = first.with_columns(pl.col("visit_index").cast(pl.Int32), codes=codes,
                                       label=pl.lit(0, dtype=pl.Int8), synthetic=pl.lit(True))
            drawn.visits = pl.concat([first, other])
            lab = drawn.patients["label"][0]
            drawn.visits = drawn.visits.with_columns(
                label=pl.when((pl.col("patient_id") == pid) & (pl.col("visit_index") == len(codes) - 1))
                .then(pl.lit(lab, dtype=pl.Int8)).otherwise(pl.col("label")))
        calls.append(conditions.height)
        return drawn

    monkeypatch.setattr(sample_mod, "sample_records", replaying)
    res = rebalance(train, groups=["gender"], model=model, seed=4, progress=False)
    assert calls[1] == 1  # exactly the copied record was re-drawn
    assert int(res.plan["rejected"].sum()) == 1
    assert res.dataset.meta["generation"]["rejected_copies"] == 1
    assert not set(res.synthetic.records().keys()) & set(train.records().keys())
    allowed = rebalance(train, groups=["gender"], model=model, seed=4, allow_copies=True, progress=False)
    assert int(allowed.plan["rejected"].sum()) == 0


def test_ratio_zero_adds_nothing(train, model):
    res = rebalance(train, groups=["gender"], model=model, ratio=0.0, progress=False)
    assert res.synthetic.n_patients == 0 and res.dataset.n_patients == train.n_patients


def test_other_attributes_follow_the_cell(train, model):
    """Balancing on gender keeps each cell's age mix from its real patients."""
    res = rebalance(train, groups=["gender"], model=model, seed=5, progress=False)
    syn = res.synthetic.patients.filter((pl.col("label") == 0) & (pl.col("gender") == "F"))
    real = train.patients.filter((pl.col("label") == 0) & (pl.col("gender") == "F"))
    assert set(syn["age_group"]) <= set(real["age_group"])


def test_reproducible(train, model):
    a = rebalance(train, groups=["gender"], model=model, seed=6, progress=False)
    b = rebalance(train, groups=["gender"], model=model, seed=6, progress=False)
    assert a.dataset.visits.equals(b.dataset.visits) and a.dataset.patients.equals(b.dataset.patients)


def test_incompatible_model_is_refused(model, tiny):
    with pytest.raises(IncompatibleModelError):
        rebalance(tiny, groups=["gender"], model=model, progress=False)


# ---------------------------------------------------------------------- command line
def _run(argv, capsys):
    from halo_balance.cli import run

    with pytest.raises(SystemExit) as info:
        run(generate.main, argv)
    return info.value.code, capsys.readouterr()


def test_cli_writes_augmented_dataset_and_plan(sim_prepared, sim_model, tmp_path, capsys):
    out = tmp_path / "aug"
    code, io = _run(["--data", str(sim_prepared), "--groups", "gender", "--model", str(sim_model),
                     "--out", str(out), "--ratio", "0.2", "--seed", "0", "--device", "cpu"], capsys)
    assert code == 0, io.err
    ds = PreparedDataset.load(out)
    plan = pl.read_csv(out / "plan.csv")
    assert int(plan["generated"].sum()) == int(ds.patients["synthetic"].sum()) > 0
    gen = ds.meta["generation"]
    assert gen["groups"] == ["gender"] and gen["ratio"] == 0.2 and gen["seed"] == 0
    assert gen["model_path"] == str(sim_model) and "versions" in gen["sampler"]
    assert "label=1,gender=F" in io.out and "synthetic" in io.out
    assert {"rejected", "kept_copies"} <= set(plan.columns) and gen["copy_k"] == 5 and not gen["allow_copies"]
    assert (f"{gen['rejected_copies']} copies of training records held by fewer than 5 patients rejected and "
            f"re-drawn, {gen['kept_copies']} copies of records that at least 5 share kept") in io.out


def test_demo_prints_the_privacy_verdict(tmp_path, capsys):
    code, io = _run(["--demo", "--demo-patients", "300", "--epochs", "2", "--out", str(tmp_path / "demo"),
                     "--device", "cpu"], capsys)
    assert code == 0, io.err
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert f"privacy verdict: {report['privacy']['verdict']['text']}" in io.out
    assert report["privacy"]["verdict"]["complete"]  # the demo holds patients out for the membership attacks
    # its generator's early-stopping patients were never fitted: not counted as members
    validation = json.loads((tmp_path / "demo" / "model" / "training.json").read_text())["validation_patient_ids"]
    assert validation and report["data"]["not_members"] == len(validation)
    assert report["privacy"]["membership_inference"]["distance"]["n_members"] == \
        report["data"]["real"]["patients"] - len(validation)


@pytest.mark.parametrize("extra,message", [
    (["--groups", "zodiac"], "group attribute: unknown 'zodiac'"),
    (["--groups", "gender", "--ratio", "-0.5"], "ratio must be >= 0"),
])
def test_cli_rejects_bad_arguments(sim_prepared, sim_model, tmp_path, capsys, extra, message):
    out = tmp_path / "aug"
    code, io = _run(["--data", str(sim_prepared), "--model", str(sim_model), "--out", str(out), *extra], capsys)
    assert code == 2 and message in io.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output(sim_prepared, sim_model, tmp_path, capsys):
    out = tmp_path / "aug"
    out.mkdir()
    code, io = _run(["--data", str(sim_prepared), "--groups", "gender", "--model", str(sim_model),
                     "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in io.err and list(out.iterdir()) == []


def test_cli_refuses_mismatched_model(eicu_prepared, sim_model, tmp_path, capsys):
    code, io = _run(["--data", str(eicu_prepared), "--groups", "gender", "--model", str(sim_model),
                     "--out", str(tmp_path / "aug")], capsys)
    assert code == 2 and "vocabulary" in io.err.lower()
    assert not (tmp_path / "aug").exists()


def test_cli_refuses_empty_dataset(tiny, sim_model, tmp_path, capsys):
    empty = PreparedDataset(tiny.visits.clear(), tiny.patients.clear(), tiny.vocab, tiny.meta)
    empty.save(tmp_path / "empty")
    code, io = _run(["--data", str(tmp_path / "empty"), "--groups", "gender", "--out", str(tmp_path / "aug"),
                     "--preset", "tiny"], capsys)
    assert code == 2 and "no real patients" in io.err
    assert not (tmp_path / "aug").exists()
