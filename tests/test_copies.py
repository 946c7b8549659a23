"""The copy rule: salted record digests with counts, rare copies re-drawn, shared ones kept, everywhere."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from halo_balance.cli import run
from halo_balance.copies import COPY_K, RECORD_COUNTS_FILE, CopyFilter, RecordCounts, record_digests
from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError
from halo_balance.model import HaloModel
from halo_balance.sample import main as sample_main
from tests.conftest import make_tiny_dataset, tiny_like
from tests.test_model import random_model

RARE = [[1], [2, 4]]  # held by one training patient
SHARED = [[3]]  # held by COPY_K training patients


def _training() -> PreparedDataset:
    visits = [RARE] + [SHARED] * COPY_K + [[[0, 3]], [[1, 4]], [[0], [2]]]
    n = len(visits)
    return tiny_like(visits, prefix="t", synthetic=False, labels=[1, 1] + [0] * (n - 2),
                     gender=["F", "M"] * (n // 2) + ["F"] * (n % 2))


def test_digests_tell_records_apart_and_depend_on_the_salt():
    ds = tiny_like([[[1, 2]], [[1], [2]], [[1, 2]], [[1, 2], []], [[1, 2]]])
    a = record_digests(ds.records(), b"s" * 16)
    assert a[0] == a[2] == a[4] and len({a[0], a[1], a[3]}) == 3  # visit boundaries and empty visits count
    assert record_digests(ds.records(), b"t" * 16)[0] != a[0]
    assert all(len(d) == 16 for d in a)


def test_record_counts_round_trip_without_the_records(tmp_path):
    counts = RecordCounts.from_dataset(_training())
    assert counts.n_patients == _training().n_patients and max(counts.counts.values()) == COPY_K
    path = counts.save(tmp_path / RECORD_COUNTS_FILE)
    back = RecordCounts.load(path)
    assert back == counts and len(back.salt) == 16
    stored = pl.read_parquet(path)
    assert stored.columns == ["digest", "n"]  # digests and counts only: no codes
    assert RecordCounts.from_dataset(_training()).salt != counts.salt  # a fresh salt per model
    (tmp_path / "other.parquet").write_bytes(b"PAR1")
    with pytest.raises(Exception):
        RecordCounts.load(tmp_path / "other.parquet")


def test_filter_rejects_rare_copies_and_keeps_shared_ones():
    counts = RecordCounts.from_dataset(_training())
    syn = tiny_like([RARE, SHARED, [[0, 3]], [[4]], SHARED])
    rare, common = CopyFilter(k=COPY_K, references=[counts]).classify(syn.records())
    assert rare.tolist() == [True, False, True, False, False]
    assert common.tolist() == [False, True, False, False, True]
    rare, common = CopyFilter(k=COPY_K + 1, references=[counts]).classify(syn.records())
    assert rare.tolist() == [True, True, True, False, True] and not common.any()
    # a second reference that holds the shared record once makes it rare
    other = RecordCounts.from_dataset(tiny_like([SHARED], prefix="o", synthetic=False))
    rare, _ = CopyFilter(k=COPY_K, references=[counts, other]).classify(syn.records())
    assert rare.tolist() == [True, True, True, False, True]
    with pytest.raises(HaloBalanceError, match="copy_k must be >= 1"):
        CopyFilter(k=0)


@pytest.fixture
def replaying(monkeypatch):
    """Make the sampler's first round return the rare training record and the shared one first."""
    import halo_balance.sample as sample_mod

    real = sample_mod.sample_records
    rounds = []

    def fake(model, conditions, **kw):
        drawn = real(model, conditions, **kw)
        if not rounds:
            head = drawn.patients[:2]
            forced = PreparedDataset.from_records(
                patient_ids=head["patient_id"].to_list(), labels=head["label"].to_list(),
                groups={a: head[a].to_list() for a in drawn.group_attributes}, visits=[RARE, SHARED],
                vocab=drawn.vocab, meta=drawn.meta, synthetic=True)
            drawn = PreparedDataset.concat([forced, drawn.select(drawn.patients["patient_id"][2:])])
        rounds.append(conditions.height)
        return drawn

    monkeypatch.setattr(sample_mod, "sample_records", fake)
    return rounds


def _model_folder(tmp_path):
    model = random_model(make_tiny_dataset(), seed=1)
    model.record_counts = RecordCounts.from_dataset(_training())
    return model.save_pretrained(tmp_path / "m")


def test_sample_rejects_rare_copies_by_default_and_counts_them(tmp_path, replaying, capsys):
    folder = _model_folder(tmp_path)
    sample_main(["--model", str(folder), "--out", str(tmp_path / "s"), "--count", "6", "--device", "cpu"])
    out = PreparedDataset.load(tmp_path / "s")
    assert replaying == [6, 1]  # exactly the rare copy was re-drawn
    keys = out.records().keys()
    assert len(keys) == 6 and out.patients["patient_id"].to_list() == [f"syn-0-{i}" for i in range(6)]
    assert tuple(map(tuple, RARE)) not in keys and keys[1] == tuple(map(tuple, SHARED))
    assert out.meta["generation"]["copies"] == {"allow_copies": False, "copy_k": COPY_K, "rejected_copies": 1,
                                                "kept_copies": 1}
    err = capsys.readouterr().err
    assert f"1 copies of training records held by fewer than {COPY_K} patients rejected" in err
    assert f"1 copies of records that at least {COPY_K} share kept" in err


def test_sample_allow_copies_and_copy_k(tmp_path, replaying, capsys):
    folder = _model_folder(tmp_path)
    sample_main(["--model", str(folder), "--out", str(tmp_path / "a"), "--count", "4", "--device", "cpu",
                 "--allow-copies"])
    assert PreparedDataset.load(tmp_path / "a").records().keys()[0] == tuple(map(tuple, RARE))
    assert replaying == [4]
    replaying.clear()
    sample_main(["--model", str(folder), "--out", str(tmp_path / "k"), "--count", "4", "--device", "cpu",
                 "--copy-k", str(COPY_K + 1)])
    assert replaying == [4, 2]  # the shared record is now rare too
    meta = PreparedDataset.load(tmp_path / "k").meta["generation"]["copies"]
    assert (meta["rejected_copies"], meta["kept_copies"]) == (2, 0)


def test_sample_needs_the_record_counts(tmp_path, capsys):
    model = random_model(make_tiny_dataset(), seed=1)
    folder = model.save_pretrained(tmp_path / "old")
    with pytest.raises(SystemExit) as exc:
        run(sample_main, ["--model", str(folder), "--out", str(tmp_path / "s"), "--count", "2"])
    assert exc.value.code == 2 and f"no {RECORD_COUNTS_FILE}" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    sample_main(["--model", str(folder), "--out", str(tmp_path / "s"), "--count", "2", "--allow-copies",
                 "--device", "cpu"])


def test_trained_model_folder_holds_every_patients_record_counts(tmp_path):
    from halo_balance.train import TrainOptions, train_model

    data = _training()
    train_model(data, out_dir=tmp_path / "m", options=TrainOptions(preset="tiny", epochs=1, device="cpu",
                                                                   val_fraction=0.3), progress=False)
    counts = HaloModel.from_pretrained(tmp_path / "m").record_counts
    assert counts.n_patients == data.n_patients  # validation patients included
    assert counts.lookup(data.records()).tolist() == [1] + [COPY_K] * COPY_K + [1, 1, 1]


def test_rebalance_keeps_shared_copies_and_counts_them(tmp_path, replaying):
    from halo_balance.balance import rebalance

    data = _training()
    model = HaloModel.from_pretrained(_model_folder(tmp_path))
    res = rebalance(data, groups=[], model=model, seed=0, min_cell_size=1, progress=False)
    assert replaying[1] == 1
    # the forced shared copy, and any the model drew itself (a one-code record is a likely draw)
    shared = sum(key == tuple(map(tuple, SHARED)) for key in res.synthetic.records().keys())
    assert int(res.plan["rejected"].sum()) == 1 and int(res.plan["kept_copies"].sum()) == shared >= 1
    gen = res.dataset.meta["generation"]
    assert (gen["rejected_copies"], gen["kept_copies"], gen["copy_k"]) == (1, shared, COPY_K)
    assert tuple(map(tuple, RARE)) not in res.synthetic.records().keys()


def test_rebalance_in_shards_rejects_and_keeps_the_same_copies(tmp_path, replaying):
    from halo_balance.balance import rebalance

    data = _training()
    model = HaloModel.from_pretrained(_model_folder(tmp_path))
    options = {"groups": [], "model": model, "seed": 0, "min_cell_size": 1, "batch_size": 2, "progress": False}
    whole = rebalance(data, **options)
    replaying.clear()
    sharded = rebalance(data, shards=2, **options)
    assert replaying[:3] == [2, 3, 1]  # round 0 in two shards of whole batches (rows 0-1, then 2-4), one re-draw
    assert int(whole.plan["rejected"].sum()) == 1 and int(whole.plan["kept_copies"].sum()) == 1
    assert sharded.plan.equals(whole.plan)
    assert sharded.dataset.visits.equals(whole.dataset.visits)
    assert sharded.dataset.patients.equals(whole.dataset.patients)


@pytest.mark.filterwarnings("ignore::halo_balance.plan.AmplificationWarning")  # deaths are rare visit rows
def test_sampler_on_eicu_visit_rows_runs_in_every_fold(eicu_prepared):
    """Visit rows of the eICU demo restricted to their first 100 tokens hold many records that dozens of
    patients share (a single common token): rejecting every copy cannot fill the cells; the rule can."""
    from imblearn.pipeline import Pipeline
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.preprocessing import FunctionTransformer

    from halo_balance import FairPlaySampler

    ds = PreparedDataset.load(eicu_prepared)
    vm = ds.to_visit_matrix()
    X = pl.DataFrame(vm.X[:, :100].toarray().astype(np.int64), schema=[f"t{i}" for i in range(100)])
    X = X.with_columns(gender=vm.frame["gender"]).to_pandas()
    y = np.asarray(vm.y)

    def pipe(**kw):
        return Pipeline([("balance", FairPlaySampler(group_columns=["gender"], epochs=3, patience=1, device="cpu",
                                                     random_state=0, **kw)),
                         ("features", FunctionTransformer(lambda t: t.drop(columns=["gender"], errors="ignore"))),
                         ("clf", LogisticRegression(max_iter=200))])

    scores = cross_val_score(pipe(), X, y, cv=5, scoring="f1", error_score="raise")
    assert len(scores) == 5 and np.isfinite(scores).all()
    with pytest.raises(HaloBalanceError, match="could not be drawn without copying"):
        pipe(copy_k=10**9).fit(X, y)  # the old rule: every copy rejected
