"""The prepared-dataset format: round trips, views, splits and every validation rule."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from halo_balance.data import PreparedDataset
from halo_balance.errors import DatasetError, OutputExistsError


def test_round_trip_preserves_everything(tiny, tmp_path):
    tiny.save(tmp_path / "ds")
    back = PreparedDataset.load(tmp_path / "ds")
    assert back.visits.equals(tiny.visits)
    assert back.patients.equals(tiny.patients)
    assert back.vocab.equals(tiny.vocab)
    assert back.meta == tiny.meta
    assert back.meta["counts"]["patients"] == 4 and back.meta["counts"]["visits"] == 6
    assert back.visits.schema["codes"] == pl.List(pl.Int32)


def test_save_refuses_existing_folder_and_leaves_it(tiny, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        tiny.save(out)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(OutputExistsError, match="not written by halo_balance"):  # never deleted
        tiny.save(out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    out.rmdir()
    tiny.save(out)
    tiny.save(out, overwrite=True)  # a previous output is replaced
    assert (out / "visits.parquet").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary folders left


def test_failed_save_writes_nothing(tiny, tmp_path):
    tiny.visits = tiny.visits.with_columns(label=pl.lit(2, dtype=pl.Int8))
    with pytest.raises(DatasetError):
        tiny.save(tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_visit_matrix(tiny):
    vm = tiny.to_visit_matrix()
    assert vm.X.shape == (6, 5)
    dense = vm.X.toarray()
    assert dense[0].tolist() == [1, 0, 0, 1, 0]
    assert dense[2].tolist() == [0, 0, 1, 0, 1]
    assert vm.y.tolist() == [0, 0, 0, 1, 0, 1]  # b's final visit (row 3) and d's only visit
    assert vm.frame["patient_id"].to_list() == ["a", "b", "b", "b", "c", "d"]
    assert vm.frame["visit_index"].to_list() == [0, 0, 1, 2, 0, 0]
    assert vm.frame["gender"].to_list() == ["F", "M", "M", "M", "M", "F"]


def test_records(tiny):
    r = tiny.records()
    assert r.patient(1) == [[1], [2, 4], [0]]
    assert r.visit_counts().tolist() == [1, 3, 1, 1]
    assert r.keys()[2] == ((1, 4),)


def test_select_and_concat(tiny):
    part = tiny.select(["d", "b"])
    assert part.patients["patient_id"].to_list() == ["b", "d"]
    assert part.n_visits == 4
    rest = tiny.select(["a", "c"])
    both = PreparedDataset.concat([rest, part]).validate()
    assert sorted(both.patients["patient_id"]) == ["a", "b", "c", "d"]
    with pytest.raises(DatasetError, match="collide"):
        PreparedDataset.concat([tiny, part])
    with pytest.raises(DatasetError, match="not in the dataset"):
        tiny.select(["zz"])


def test_kfold_is_patient_level_and_stratified(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    labels = (rng.random(n) < 0.2).astype(int)
    gender = rng.choice(["F", "M"], n, p=[0.3, 0.7])
    from tests.conftest import make_tiny_dataset
    base = make_tiny_dataset()
    ds = PreparedDataset.from_records(
        patient_ids=[f"p{i}" for i in range(n)], labels=labels,
        groups={"gender": gender, "age_group": ["65+"] * n},
        visits=[[[i % 5]] * (1 + i % 3) for i in range(n)], vocab=base.vocab, meta=base.meta,
        synthetic=False).validate()
    folds = ds.kfold(5, groups=["gender"], seed=1)
    tests = np.concatenate([te for _, te in folds])
    assert sorted(tests) == sorted(ds.patients["patient_id"])  # each patient tested exactly once
    for tr, te in folds:
        assert not set(tr) & set(te)
        sub = ds.select(te).patients
        frac = sub["label"].mean()
        assert abs(frac - labels.mean()) < 0.03
        assert abs((sub["gender"] == "F").mean() - (gender == "F").mean()) < 0.03
    assert ds.kfold(5, groups=["gender"], seed=1)[0][1].tolist() == folds[0][1].tolist()


def test_cell_counts(tiny):
    cc = tiny.cell_counts(["gender"])
    assert cc.to_dicts() == [{"label": 0, "gender": "F", "n": 1}, {"label": 0, "gender": "M", "n": 1},
                             {"label": 1, "gender": "F", "n": 1}, {"label": 1, "gender": "M", "n": 1}]
    with pytest.raises(DatasetError, match="group attribute: unknown"):
        tiny.cell_counts(["race"])


# ---------------------------------------------------------------------- rejections
def _write(ds, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    ds.visits.write_parquet(root / "visits.parquet")
    ds.patients.write_parquet(root / "patients.parquet")
    ds.vocab.write_parquet(root / "vocab.parquet")
    (root / "meta.json").write_text(json.dumps(ds.meta))
    return root


def _visits(ds, **cols):
    ds.visits = ds.visits.with_columns(**cols)
    return ds


def test_rejects_missing_file(tiny, tmp_path):
    root = _write(tiny, tmp_path)
    (root / "vocab.parquet").unlink()
    with pytest.raises(DatasetError, match=r"vocab\.parquet: required file is missing"):
        PreparedDataset.load(root)


def test_rejects_missing_column(tiny, tmp_path):
    tiny.visits = tiny.visits.drop("synthetic")
    with pytest.raises(DatasetError, match=r"visits\.parquet, column 'synthetic': required column is missing"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_wrong_dtype(tiny, tmp_path):
    tiny.visits = tiny.visits.with_columns(pl.col("visit_index").cast(pl.Int64))
    with pytest.raises(DatasetError, match=r"column 'visit_index': has type Int64, expected Int32"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_missing_group_column(tiny, tmp_path):
    tiny.patients = tiny.patients.drop("age_group")
    with pytest.raises(DatasetError, match=r"patients\.parquet, column 'age_group'"):
        PreparedDataset.load(_write(tiny, tmp_path))


def _codes(ds, row, codes):
    col = ds.visits["codes"].to_list()
    col[row] = codes
    return _visits(ds, codes=pl.Series(col, dtype=pl.List(pl.Int32)))


@pytest.mark.parametrize("codes,pattern,value", [
    ([0, 5], r"token ids outside the vocabulary 0\.\.4 \(first: patient 'a' visit 0\)", "5"),
    ([-1, 3], r"outside the vocabulary", "-1"),
    ([3, 0], r"unsorted", "[3, 0]"),
    ([0, 0, 3], r"duplicate", "[0, 0, 3]"),
])
def test_rejects_bad_tokens(tiny, tmp_path, codes, pattern, value):
    with pytest.raises(DatasetError, match=pattern) as info:
        PreparedDataset.load(_write(_codes(tiny, 0, codes), tmp_path))
    assert "column 'codes'" in str(info.value)
    assert value in str(info.value)


def test_rejects_duplicate_visit_index(tiny, tmp_path):
    idx = tiny.visits["visit_index"].to_list()
    idx[2] = 0  # patient b: 0, 0, 2
    _visits(tiny, visit_index=pl.Series(idx, dtype=pl.Int32))
    with pytest.raises(DatasetError, match=r"column 'visit_index': 1 patients repeat a visit_index \(first: patient 'b'\)"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_non_contiguous_visit_index(tiny, tmp_path):
    idx = tiny.visits["visit_index"].to_list()
    idx[3] = 5  # patient b: 0, 1, 5
    _visits(tiny, visit_index=pl.Series(idx, dtype=pl.Int32))
    with pytest.raises(DatasetError, match=r"not 0\.\.n-1 \(first: patient 'b', range 0\.\.5 for 3 visits\)"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_visits_of_unknown_patient(tiny, tmp_path):
    pid = tiny.visits["patient_id"].to_list()
    pid[0] = "ghost"
    _visits(tiny, patient_id=pl.Series(pid))
    with pytest.raises(DatasetError, match=r"visits belong to patients missing.*'ghost'"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_patient_without_visits(tiny, tmp_path):
    tiny.visits = tiny.visits.filter(pl.col("patient_id") != "c")
    with pytest.raises(DatasetError, match=r"patients\.parquet, column 'patient_id': 1 patients have no visits.*'c'"):
        PreparedDataset.load(_write(tiny, tmp_path))


@pytest.mark.parametrize("table", ["visits", "patients"])
def test_rejects_non_binary_label(tiny, tmp_path, table):
    df = getattr(tiny, table)
    setattr(tiny, table, df.with_columns(label=pl.when(pl.col("patient_id") == "c").then(7)
                                         .otherwise(pl.col("label")).cast(pl.Int8)))
    with pytest.raises(DatasetError, match=rf"{table}\.parquet, column 'label': 1 rows hold a label other than 0/1 \(offending value: 7\)"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_positive_label_before_final_visit(tiny, tmp_path):
    lab = tiny.visits["label"].to_list()
    lab[1] = 1  # patient b, visit 0 of 3
    _visits(tiny, label=pl.Series(lab, dtype=pl.Int8))
    with pytest.raises(DatasetError, match=r"not on the patient's final visit \(first: patient 'b' visit 0\)"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_patient_label_disagreeing_with_final_visit(tiny, tmp_path):
    tiny.patients = tiny.patients.with_columns(label=pl.lit(0, dtype=pl.Int8))
    with pytest.raises(DatasetError, match=r"patients\.parquet, column 'label'.*differs from their final visit"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_unknown_category(tiny, tmp_path):
    tiny.patients = tiny.patients.with_columns(gender=pl.lit("X"))
    with pytest.raises(DatasetError, match=r"column 'gender'.*not listed in meta\.json.*'X'"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_non_dense_vocab(tiny, tmp_path):
    tiny.vocab = tiny.vocab.with_columns(id=pl.Series([0, 1, 2, 3, 7], dtype=pl.Int32))
    with pytest.raises(DatasetError, match=r"vocab\.parquet, column 'id': ids must be dense"):
        PreparedDataset.load(_write(tiny, tmp_path))


def test_rejects_bad_meta(tiny, tmp_path):
    root = _write(tiny, tmp_path)
    (root / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"meta\.json: is not valid JSON"):
        PreparedDataset.load(root)
    meta = dict(tiny.meta)
    del meta["groups"]
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"required key 'groups' is missing"):
        PreparedDataset.load(root)


def test_load_does_not_modify_input(tiny, tmp_path):
    root = _write(tiny, tmp_path)
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    PreparedDataset.load(root)
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
