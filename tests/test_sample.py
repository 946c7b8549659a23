"""Sampling: exactness against the likelihood and the plain sampler, reproducibility, format, CLI."""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch

from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError
from halo_balance.model import HaloModel
from halo_balance.sample import main, reference_sample_records, sample_records, sample_shards, sample_visits, \
    shard_rows
from tests.conftest import make_tiny_dataset
from tests.test_model import _visits, random_model


@pytest.fixture(scope="module")
def model():
    return random_model(seed=2, n_ctx=6, code_bias=-2.5, end_bias=-0.3, condition_every_visit=False,
                        empty_visit_event=False)


def _conditions(model, n: int, seed: int = 0) -> pl.DataFrame:
    return model.layout.complete({}, n, seed=seed)


def _code_rates(ds: PreparedDataset, V: int) -> np.ndarray:
    """Fraction of records holding each code at least once."""
    rec = ds.records()
    owner = np.repeat(np.arange(len(rec)), np.diff(rec.visit_ptr))
    per_code = np.repeat(owner, np.diff(rec.code_ptr))
    pairs = np.unique(per_code.astype(np.int64) * V + rec.codes)
    return np.bincount(pairs % V, minlength=V) / len(rec)


def _pair_rates(ds: PreparedDataset, pairs: np.ndarray) -> np.ndarray:
    """Fraction of visits holding both codes of each pair (j, i)."""
    rec = ds.records()
    visit = np.repeat(np.arange(len(rec.code_ptr) - 1), np.diff(rec.code_ptr))
    held = set(zip(visit.tolist(), rec.codes.tolist()))
    n_visits = len(rec.code_ptr) - 1
    return np.array([sum((v, j) in held and (v, i) in held for v in range(n_visits)) for j, i in pairs]) / n_visits


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("groups, empty_event, pairs, cells", [
    ([], False, False, False), ([[1, 2], [3, 4]], False, False, False), ([[1, 2], [3, 4]], True, False, False),
    ([[1, 2], [3, 4]], True, True, False), ([[1, 2], [3, 4]], True, True, True)])
def test_visit_sampler_matches_the_likelihood_exactly(groups, empty_event, pairs, cells):
    """Over all 2^5 visits, the sampled frequencies equal exp(-visit_nll), with and without
    exclusive groups (whose ruled-out visits have probability 0 on both sides), the empty-visit
    event, pair terms and a cell's terms."""
    m = random_model(make_tiny_dataset(), code_bias=-1.0, scale=0.2, seed=5, exclusive_groups=groups,
                     empty_visit_event=empty_event)
    if pairs:  # strong ones, one into a code an exclusive group can rule out
        m.set_pairs(torch.tensor([[0, 3], [1, 4], [0, 2], [2, 4]]), torch.tensor([2.5, -2.0, 1.5, 1.0]))
    if empty_event:
        with torch.no_grad():
            m.fine.empty_head.bias.fill_(1.5)  # far likelier than the chain's own empty visit
    visits = [[i for i in range(5) if mask >> i & 1] for mask in range(32)]
    h = torch.randn(1, m.config.n_embd, generator=torch.Generator().manual_seed(0))
    offset = torch.tensor([[1.5, -1.0, 0.0, 2.0, -0.5]]) if cells else None  # one record's cell terms
    expand = (lambda t, n: None if t is None else t.expand(n, -1))
    with torch.no_grad():
        prob = torch.exp(-m.fine.visit_nll(h.expand(32, -1), *_visits(visits), 0, expand(offset, 32))).double().numpy()
        n = 40000
        codes, ptr = sample_visits(m.fine, h.expand(n, -1), torch.Generator().manual_seed(0), 0, expand(offset, n))
    masks = np.zeros(n, dtype=np.int64)
    np.add.at(masks, np.repeat(np.arange(n), np.diff(ptr.numpy())), 1 << codes.numpy())
    freq = np.bincount(masks, minlength=32) / n
    se = np.sqrt(prob * (1 - prob) / n) + 1e-12
    assert prob.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.max(np.abs(freq - prob) / np.maximum(se, 1e-3)) < 4.5, (freq, prob)
    assert prob[0] > 0.01 and freq[0] > 0.01  # empty visits are drawn as often as the model says
    if empty_event:
        torch.testing.assert_close(torch.tensor(prob[0]), torch.sigmoid(m.fine.empty_logit(h))[0].double())
    ruled_out = [mask for mask in range(32) if any(mask >> a & 1 and mask >> b & 1 for a, b in groups)]
    assert (prob[ruled_out] == 0).all() and (freq[ruled_out] == 0).all() and len(ruled_out) == 8 * len(groups) - (
        2 if groups else 0)


def _z_max(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> float:
    pooled = (a * n_a + b * n_b) / (n_a + n_b)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return float(np.max(np.abs(a - b) / np.maximum(se, 1e-9)))


@pytest.fixture(scope="module")
def structured_model():
    """Exclusive groups and the empty-visit event (the empty event made likely)."""
    m = random_model(seed=2, n_ctx=6, code_bias=-2.5, end_bias=-0.3, exclusive_groups=[[3, 9], [20, 25]],
                     empty_visit_event=True)
    with torch.no_grad():
        m.fine.empty_head.weight.mul_(0.05)
        m.fine.empty_head.bias.fill_(-1.0)
    return m


@pytest.fixture(scope="module")
def paired_model(structured_model):
    """The structured model with pair terms, strong enough to move the co-occurrence of their codes."""
    m = copy.deepcopy(structured_model)
    V = m.config.vocab_size
    rng = np.random.default_rng(3)
    j = rng.integers(0, V - 1, size=60)
    i = np.minimum(j + rng.integers(1, 12, size=60), V - 1)
    index = np.unique(np.stack([j, i], 1)[j < i], axis=0)
    m.set_pairs(torch.from_numpy(index), torch.from_numpy(rng.choice([-2.0, 2.5], size=len(index))).float())
    return m


@pytest.fixture(scope="module")
def celled_model(structured_model):
    """The structured model with strong cell terms on the deaths of one gender and on every death."""
    m = copy.deepcopy(structured_model)
    slots = m.layout.slot_names()
    deaths_f, deaths = m.config.n_conditions + slots.index("gender=F"), m.config.n_conditions + 1
    index = [[deaths_f, c] for c in range(0, 40, 3)] + [[deaths, c] for c in range(1, 40, 5)]
    weight = [2.5 if c % 2 else -2.0 for _, c in index]
    m.set_cell_terms(torch.tensor(index), torch.tensor(weight))
    return m


@pytest.mark.parametrize("which", ["model", "structured_model", "paired_model", "celled_model"])
def test_fast_and_reference_samplers_agree_in_distribution(which, request):
    model = request.getfixturevalue(which)
    V, n = model.config.vocab_size, 3000
    cond = _conditions(model, n, seed=1)
    fast = sample_records(model, cond, batch_size=256, seed=11, device="cpu", progress=False)
    ref = reference_sample_records(model, cond, batch_size=256, seed=12, device="cpu")
    assert _z_max(_code_rates(fast, V), _code_rates(ref, V), n, n) < 4.5  # per-code rates, 40 codes
    lengths_fast = np.bincount(fast.records().visit_counts(), minlength=6)[1:] / n
    lengths_ref = np.bincount(ref.records().visit_counts(), minlength=6)[1:] / n
    assert _z_max(lengths_fast, lengths_ref, n, n) < 4.5  # record lengths
    sizes = [np.diff(d.records().code_ptr).mean() for d in (fast, ref)]
    assert sizes[0] == pytest.approx(sizes[1], rel=0.05)  # codes per visit
    empty = np.array([(np.diff(d.records().code_ptr) == 0).mean() for d in (fast, ref)])
    assert _z_max(empty[:1], empty[1:], n, n) < 4.5 and (empty > 0.1).all() == (which != "model")
    if which == "paired_model":  # the pairs' co-occurrence agrees, and differs from the model without them
        pairs = model.fine.pair_index.numpy()
        unpaired = sample_records(request.getfixturevalue("structured_model"), cond, batch_size=256, seed=14,
                                  device="cpu", progress=False)
        n_visits = [len(d.records().code_ptr) - 1 for d in (fast, ref, unpaired)]
        rates = [_pair_rates(d, pairs) for d in (fast, ref, unpaired)]
        assert _z_max(rates[0], rates[1], n_visits[0], n_visits[1]) < 4.5
        assert _z_max(rates[0], rates[2], n_visits[0], n_visits[2]) > 8
    if which == "celled_model":  # each cell's code rates agree, and differ from the model without the terms
        plain = sample_records(request.getfixturevalue("structured_model"), cond, batch_size=256, seed=14,
                               device="cpu", progress=False)
        cells = cond.select("label", "gender").to_dicts()
        for label, gender in ((1, "F"), (1, "M"), (0, "F")):
            rows = [k for k, c in enumerate(cells) if c == {"label": label, "gender": gender}]
            picked = [d.select([d.patients["patient_id"][k] for k in rows]) for d in (fast, ref, plain)]
            rates = [_code_rates(d, V) for d in picked]
            assert _z_max(rates[0], rates[1], len(rows), len(rows)) < 4.5
            assert (_z_max(rates[0], rates[2], len(rows), len(rows)) > 6) == (label == 1), (label, gender)
    # the comparison has power: a slightly different model is told apart
    shifted = copy.deepcopy(model)
    grouped = {c for a, b in model.config.exclusive_groups for c in range(a, b + 1)}
    rates = _code_rates(fast, V)
    code = min((c for c in range(V) if c not in grouped), key=lambda c: abs(rates[c] - 0.4))
    with torch.no_grad():
        shifted.fine.out.bias[code] -= 0.8
    other = sample_records(shifted, cond, batch_size=256, seed=13, device="cpu", progress=False)
    assert _z_max(_code_rates(fast, V), _code_rates(other, V), n, n) > 5


def test_conditions_steer_the_samples(model):
    """Records of different conditions share batches and each keeps its own conditioning."""
    cond = pl.concat([model.layout.complete({"label": 0, "gender": "F", "age_group": "65+"}, 1500),
                      model.layout.complete({"label": 1, "gender": "M", "age_group": "18-64"}, 1500)])
    mixed = sample_records(model, cond, batch_size=500, seed=0, device="cpu", progress=False)
    first, second = (mixed.select(mixed.patients["patient_id"].to_list()[s]) for s in (slice(0, 1500), slice(1500, None)))
    alone = sample_records(model, cond[1500:], batch_size=500, seed=3, device="cpu", progress=False)
    V = model.config.vocab_size
    assert _z_max(_code_rates(second, V), _code_rates(alone, V), 1500, 1500) < 4.5
    assert _z_max(_code_rates(first, V), _code_rates(second, V), 1500, 1500) > 5


# ---------------------------------------------------------------------- properties of the samples
def test_sampling_is_reproducible_with_a_seed(model):
    cond = _conditions(model, 300)
    a = sample_records(model, cond, seed=4, device="cpu", progress=False)
    b = sample_records(model, cond, seed=4, device="cpu", progress=False)
    c = sample_records(model, cond, seed=5, device="cpu", progress=False)
    assert a.visits.equals(b.visits) and a.patients.equals(b.patients)
    assert not a.visits["codes"].equals(c.visits["codes"])


def test_samples_respect_the_context_and_keep_empty_visits():
    # end is unlikely and codes are rare: records would run long and visits would often be empty
    m = random_model(n_ctx=4, code_bias=-6.0, end_bias=-6.0, scale=0.05, empty_visit_event=False)
    data = sample_records(m, _conditions(m, 400), seed=0, device="cpu", progress=False).validate()
    counts = data.records().visit_counts()
    assert counts.max() == 3 and (counts == 3).mean() > 0.9  # the end is forced at n_ctx - 1
    empty = data.visits.with_columns(empty=pl.col("codes").list.len() == 0)
    # exact sampling: an empty visit is drawn as often as the model gives it, the first one included
    assert empty.filter(pl.col("visit_index") == 0)["empty"].mean() > 0.5
    assert empty.filter(pl.col("visit_index") > 0)["empty"].mean() > 0.5


def test_output_is_a_synthetic_prepared_dataset(model, tmp_path):
    base = make_tiny_dataset()
    cond = pl.DataFrame({"label": [1, 0, 1], "gender": ["F", "M", "M"], "age_group": ["65+", "18-64", "65+"]})
    m = random_model(base)
    data = sample_records(m, cond, seed=7, device="cpu", id_prefix="gen", progress=False).validate()
    assert data.patients["patient_id"].to_list() == ["gen-7-0", "gen-7-1", "gen-7-2"]
    assert data.patients.select("label", "gender", "age_group").equals(cond.cast({"label": pl.Int8}))
    assert data.patients["synthetic"].all() and data.visits["synthetic"].all()
    assert data.vocab.equals(base.vocab) and data.group_categories == base.group_categories
    assert data.meta["generation"]["seed"] == 7 and data.meta["source"] == base.meta["source"]
    last = data.visits.group_by("patient_id").agg(pl.col("label").last(), pl.col("visit_index").max())
    assert sorted(last["label"].to_list()) == [0, 1, 1]  # the outcome sits on the final visit
    both = PreparedDataset.concat([base, data]).validate()  # ids cannot collide with real ones
    assert both.n_patients == base.n_patients + 3
    data.save(tmp_path / "out")
    assert PreparedDataset.load(tmp_path / "out").n_patients == 3
    with pytest.raises(HaloBalanceError, match="'gender': value 'X'"):
        sample_records(m, cond.with_columns(gender=pl.lit("X")), device="cpu", progress=False)


# ---------------------------------------------------------------------- command line
def test_cli_samples_each_condition(model, tmp_path, capsys):
    from halo_balance.copies import RecordCounts
    from tests.conftest import make_learnable_dataset

    model.record_counts = RecordCounts.from_dataset(make_learnable_dataset(50))  # random_model's data
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "s"
    main(["--model", str(tmp_path / "m"), "--out", str(out), "--count", "20", "--condition", "label=1,gender=F",
          "--condition", "label=0", "--seed", "3", "--device", "cpu"])
    data = PreparedDataset.load(out)
    p = data.patients
    assert p.height == 40 and p["synthetic"].all()
    assert p[:20].select(pl.col("label").eq(1).all(), pl.col("gender").eq("F").all()).row(0) == (True, True)
    assert p[20:]["label"].eq(0).all()
    assert set(p["age_group"]) <= {"18-64", "65+"}
    assert "records/s" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(main, ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "t"), "--count", "2",
                   "--condition", "race=White"])
    assert exc.value.code == 2 and "condition attribute: unknown" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run(main, ["--model", str(tmp_path / "m"), "--out", str(out), "--count", "2"])
    assert exc.value.code == 2 and "already exists" in capsys.readouterr().err
    assert isinstance(HaloModel.from_pretrained(tmp_path / "m"), HaloModel)


# ---------------------------------------------------------------------- shards
def _same_records(a: PreparedDataset, b: PreparedDataset) -> bool:
    return a.visits.equals(b.visits) and a.patients.equals(b.patients)


@pytest.mark.parametrize("n, batch_size, shards", [(1000, 100, 4), (1000, 64, 3), (130, 64, 4), (5, 2, 7)])
def test_shards_cover_the_request_once_in_whole_batches(n, batch_size, shards):
    rows = [shard_rows(n, batch_size=batch_size, shards=shards, index=i) for i in range(shards)]
    assert [i for r in rows for i in r] == list(range(n))
    assert all(r.start % batch_size == 0 for r in rows if len(r))
    sizes = [len(r) for r in rows]
    assert max(sizes) - min(sizes) <= batch_size  # even up to one batch (and the last, short one)
    with pytest.raises(HaloBalanceError, match="--shard-index"):
        shard_rows(n, batch_size=batch_size, shards=shards, index=shards)


def test_four_shards_give_the_records_of_one(model):
    cond = _conditions(model, 1000, seed=3)
    whole = sample_records(model, cond, batch_size=100, seed=9, device="cpu", progress=False)
    for shards in (1, 4, 3):
        sharded = sample_shards(model, cond, shards=shards, batch_size=100, seed=9, device="cpu", progress=False)
        assert _same_records(sharded, whole), shards
    # each shard alone, as a separate process would draw it, has the whole request's records and ids
    parts = [sample_records(model, cond[r.start:r.stop], first_row=r.start, batch_size=100, seed=9, device="cpu",
                            progress=False)
             for r in (shard_rows(1000, batch_size=100, shards=4, index=i) for i in range(4))]
    assert _same_records(PreparedDataset.concat(parts), whole)
    assert parts[1].patients["patient_id"][0] == "syn-9-200"  # batches 2-4 of 10
    # the comparison has power: another seed gives other records
    assert not _same_records(sample_shards(model, cond, shards=4, batch_size=100, seed=10, device="cpu",
                                           progress=False), whole)
    with pytest.raises(HaloBalanceError, match="multiple of batch_size"):
        sample_records(model, cond[:10], first_row=50, batch_size=100, device="cpu", progress=False)


def test_cli_shards_as_separate_processes_join_to_the_whole_request(model, tmp_path):
    """Copy rejection on (the default): rows re-drawn in several shards get the whole request's records."""
    import copy

    from halo_balance.copies import COPY_K, RecordCounts, record_digests

    m = copy.deepcopy(model)
    m.record_counts = None
    m.save_pretrained(tmp_path / "m")
    common = ["--model", str(tmp_path / "m"), "--count", "150", "--condition", "label=1", "--condition", "label=0",
              "--batch-size", "40", "--seed", "5", "--device", "cpu", "--quiet"]
    main([*common, "--out", str(tmp_path / "raw"), "--allow-copies"])
    raw = PreparedDataset.load(tmp_path / "raw")
    # the model's "training records": every 9th first-round record (rare) and one shared by COPY_K patients
    ids = raw.patients["patient_id"]
    counts = RecordCounts.from_dataset(raw.select(ids.gather_every(9)))
    shared = record_digests(raw.select(ids[4:5]).records(), counts.salt)[0]
    counts.counts[shared] = COPY_K
    m.record_counts = counts
    m.save_pretrained(tmp_path / "m")
    main([*common, "--out", str(tmp_path / "whole")])
    for i in range(4):
        main([*common, "--out", str(tmp_path / f"shard{i}"), "--shards", "4", "--shard-index", str(i)])
    whole = PreparedDataset.load(tmp_path / "whole")
    parts = [PreparedDataset.load(tmp_path / f"shard{i}") for i in range(4)]
    assert [p.n_patients for p in parts] == [80, 80, 80, 60]  # 8 batches of 40 (the last of 20), 2 per shard
    assert parts[2].meta["generation"]["shard_index"] == 2
    assert _same_records(PreparedDataset.concat(parts), whole)
    # re-draws happened in every shard, and the whole request's counts are the shards' sums
    rejected = [p.meta["generation"]["copies"]["rejected_copies"] for p in parts]
    assert all(r > 0 for r in rejected)
    assert whole.meta["generation"]["copies"]["rejected_copies"] == sum(rejected) >= 300 // 9
    assert whole.meta["generation"]["copies"]["kept_copies"] >= 1
    held = counts.lookup(whole.records())
    assert not ((held > 0) & (held < COPY_K)).any() and held[4] == COPY_K
    assert not _same_records(whole, raw)


def test_shard_options_are_checked_before_any_work(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "m")
    base = ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--count", "10"]
    for extra, message in ((["--shards", "0"], "--shards must be >= 1"),
                           (["--shards", "2", "--shard-index", "2"], "--shard-index must lie in 0..1"),
                           (["--shards", "2", "--shard-index", "0", "--backend", "ray"], "drop --backend ray")):
        with pytest.raises(SystemExit) as exc:
            run(main, [*base, *extra])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ray_backend_without_ray_names_the_install_command(model, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as exc:
        run(main, ["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--count", "10", "--shards", "2",
                   "--backend", "ray"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and 'pip install -e ".[ray]"' in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
