"""Export to the raw MIMIC-IV / eICU layouts and MEDS: round trips on the real demos and the simulator."""

from __future__ import annotations

import copy
import gzip
import importlib
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from conftest import EICU_DEMO, MIMIC_DEMO, REPO, fails_cleanly, require, run_cli, visit_tokens
from data_prep.eicu import prepare_eicu
from data_prep.meds import prepare_meds
from data_prep.mimic_iv import prepare_mimic_iv
from halo_balance import PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.export import ExportResult, export, restore_ids
from halo_balance.export.decode import Layout, as_float32, bin_of, bin_range, decode, draw_in_bins


@pytest.fixture(scope="module")
def mimic_demo_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mimic") / "prepared"
    prepare_mimic_iv(require(MIMIC_DEMO), out, progress=False)
    return out


def with_synthetic(ds: PreparedDataset, n: int, seed: int = 0) -> PreparedDataset:
    """``ds`` plus ``n`` synthetic patients: real records put under other patients' groups and outcomes."""
    rng = np.random.default_rng(seed)
    rec = ds.records()
    src, dst = rng.choice(len(rec), n, replace=False), rng.choice(len(rec), n, replace=False)
    syn = PreparedDataset.from_records(
        patient_ids=[f"syn-{i:06d}" for i in range(n)], labels=rec.labels[dst],
        groups=rec.groups[dst.tolist()], visits=[rec.patient(int(p)) for p in src],
        vocab=ds.vocab, meta=ds.meta, synthetic=True)
    return PreparedDataset.concat([ds, syn]).validate()


def representation(ds: PreparedDataset) -> tuple:
    """What makes two prepared datasets comparable: outcome, groups, lab items and bins, time bins."""
    pre = ds.meta["preprocessing"]
    labs = {k: v for k, v in pre["labs"].items() if k not in ("source", "bins_from", "items")}
    items = [{k: v for k, v in it.items() if k != "rows"} for it in pre["labs"]["items"]]  # rows: of this data
    return ds.meta["outcome"], ds.meta["groups"], labs, items, pre["time_bins"]


def same_patients_and_visits(original: PreparedDataset, back: PreparedDataset,
                             export_dir: Path) -> tuple[dict, dict]:
    """Assert that ``back`` (ids restored) has ``original``'s outcome, lab and time bins, patients (labels, groups,
    flags) and visits; return both datasets' tokens per visit."""
    assert representation(back) == representation(original)
    back = restore_ids(back, export_dir)
    cols = original.patients.columns
    assert back.patients.sort("patient_id").select(cols).equals(original.patients.sort("patient_id"))
    key = ["patient_id", "visit_index", "label", "synthetic"]
    assert back.visits.sort("patient_id", "visit_index").select(key).equals(
        original.visits.sort("patient_id", "visit_index").select(key))
    a, b = visit_tokens(original), visit_tokens(back)
    assert a.keys() == b.keys()
    return a, b


def assert_round_trip(original: PreparedDataset, back: PreparedDataset, export_dir: Path, *,
                      conflicts_allowed: bool = False) -> None:
    """Records, labels, groups and synthetic flags of ``back`` (ids restored) equal ``original``'s.

    With ``conflicts_allowed``, a visit that holds several bins of one lab item (which no visit mean
    can give back) may come back with one bin of that item between the extremes, and nothing else.
    """
    a, b = same_patients_and_visits(original, back, export_dir)
    bad = {k for k in a if a[k] != b[k]}
    if not conflicts_allowed:
        assert not bad, sorted(bad)[:3]
    for k in bad:
        def split(tokens):
            labs: dict[str, list[int]] = {}
            for t in tokens:
                if t.startswith("lab:"):
                    item, _, b_ = t[4:].rpartition(":")
                    labs.setdefault(item, []).append(int(b_))
            return {t for t in tokens if not t.startswith("lab:")}, labs
        (oa, la), (ob, lb) = split(a[k]), split(b[k])
        assert oa == ob and la.keys() == lb.keys()
        for item, bins in la.items():
            if len(bins) == 1:
                assert lb[item] == bins
            else:
                assert len(lb[item]) == 1 and min(bins) <= lb[item][0] <= max(bins)


def assert_round_trip_counted(original: PreparedDataset, back: PreparedDataset, export_dir: Path,
                              report: dict, *, real_exact: bool = True) -> None:
    """Labels, groups, flags and visits of ``back`` (ids restored) equal ``original``'s, and every token
    that differs is a time token that ``export.json`` counts: as many age and gap tokens lost and
    gained as its ``*_tokens_not_kept`` / ``*_tokens_added`` say. Real records come back exactly."""
    a, b = same_patients_and_visits(original, back, export_dir)
    synthetic = set(original.patients.filter(pl.col("synthetic"))["patient_id"])
    lost, gained = Counter(), Counter()
    for k in a:
        if a[k] != b[k]:
            assert not real_exact or k[0] in synthetic, (k, a[k] ^ b[k])
            lost.update(t.rsplit(":", 1)[0] for t in a[k] - b[k])
            gained.update(t.rsplit(":", 1)[0] for t in b[k] - a[k])
    assert set(lost) | set(gained) <= {"time:age", "time:gap"}, (lost, gained)
    assert (lost["time:age"], lost["time:gap"], gained["time:age"], gained["time:gap"]) == (
        report.get("age_tokens_not_kept", 0), report.get("gap_tokens_not_kept", 0),
        report.get("age_tokens_added", 0), report.get("gap_tokens_added", 0))


def prepare_back(res: ExportResult, out: Path, capsys) -> PreparedDataset:
    """Run the command the export names in ``export.json`` (``prepare_again``), as the console does."""
    words = shlex.split(res.prepare_again)
    assert words[:2] == ["python", "-m"]
    argv = [out if w == "AGAIN" else w for w in words[3:]] + ["--quiet"]
    code, _, err = run_cli(importlib.import_module(words[2]).main, argv, capsys)
    assert code == 0, err
    return PreparedDataset.load(out)


# ---------------------------------------------------------------------- lab values
def test_bin_ranges_close_open_outer_bins() -> None:
    edges = [1.0, 2.0, 4.0]
    assert bin_range(edges, 1) == (0.0, 1.0)  # width 1, stopped at 0
    assert bin_range(edges, 2) == (1.0, 2.0)
    assert bin_range(edges, 4) == (4.0, 6.0)
    assert bin_range([-3.0, -1.0], 1) == (-5.0, -3.0)  # a negative edge keeps the mirrored width
    assert bin_range([7.35], 2) == (7.35, 7.35 + 7.35 / 2)


@pytest.mark.parametrize("stored", [lambda v: v, as_float32])
def test_drawn_values_land_in_their_bin(stored) -> None:
    rng = np.random.default_rng(0)
    edges = [0.1, 0.1000001, 1.0, 7.35, 7.4, 140.0, 1e6]  # a very narrow bin too
    bins = rng.integers(1, len(edges) + 2, 5000)
    values, misplaced = draw_in_bins(rng, edges, bins, stored=stored, forbidden=(-1.0,))
    assert misplaced == 0
    assert np.array_equal(bin_of(stored(values), edges), bins)
    assert not np.any(values == -1.0)
    as_text = (lambda v: str(np.float32(v))) if stored is as_float32 else (lambda v: repr(float(v)))
    short = [len(as_text(v)) for v in values[bins == 4]]  # [1.0, 7.35): a few digits, not 17
    assert np.median(short) <= 5


def test_every_exported_lab_value_is_in_its_tokens_bin(mimic_demo_prepared: Path) -> None:
    ds = PreparedDataset.load(mimic_demo_prepared)
    dec = decode(ds, seed=0, numeric_ids=True, layout=Layout())
    items = {it["item"]: np.asarray(it["edges"]) for it in ds.meta["preprocessing"]["labs"]["items"]}
    assert dec.labs.height > 8000
    outer = 0
    for item, part in dec.labs.partition_by("item", as_dict=True).items():
        # bin b of edges e1 < ... < ek is [e_{b-1}, e_b), open below bin 1 and above bin k + 1
        e, v, b = items[item[0]], part["value"].to_numpy(), part["bin"].to_numpy()
        padded = np.concatenate([[-np.inf], e, [np.inf]])
        assert ((padded[b - 1] <= v) & (v < padded[b])).all(), item
        outer += int(((b == 1) | (b == len(e) + 1)).sum())
    assert outer > 1000  # the open-ended outer bins are exercised
    v = dec.visits
    assert (v["admit"] < v["discharge"]).all()
    t = dec.labs.join(v.select("visit_no", "admit", "discharge"), on="visit_no")
    assert ((t["time"] > t["admit"]) & (t["time"] < t["discharge"])).all()
    nxt = v.with_columns(n=pl.col("admit").shift(-1).over("patient_id")).drop_nulls("n")
    assert (nxt["discharge"] < nxt["n"]).all()  # visits in order, never overlapping


# ---------------------------------------------------------------------- round trips on the real demos
def test_mimic_demo_round_trip_with_synthetic(mimic_demo_prepared: Path, tmp_path: Path) -> None:
    ds = with_synthetic(PreparedDataset.load(mimic_demo_prepared), 30)
    res = export(ds, tmp_path / "raw", format="mimic-iv", seed=1)
    assert res.report["lab_values_outside_bin"] == 0 and res.report["visit_items_with_several_bins"] == 0
    hosp = tmp_path / "raw" / "hosp"
    for name in ("patients", "admissions", "diagnoses_icd", "labevents", "d_labitems", "d_icd_diagnoses"):
        raw = pl.read_csv(MIMIC_DEMO / "hosp" / f"{name}.csv.gz", n_rows=1, infer_schema=False)
        assert pl.read_csv(hosp / f"{name}.csv.gz", n_rows=1, infer_schema=False).columns == raw.columns
    adm = pl.read_csv(hosp / "admissions.csv.gz", try_parse_dates=True)
    assert (adm["admittime"] < adm["dischtime"]).all()
    deaths = adm.filter(pl.col("hospital_expire_flag") == 1)
    assert deaths.height == int(ds.patients["label"].sum())
    assert (deaths["deathtime"] == deaths["dischtime"]).all() and (deaths["discharge_location"] == "DIED").all()
    ids = pl.read_csv(tmp_path / "raw" / "patient_ids.csv", infer_schema=False).with_columns(
        synthetic=pl.col("synthetic") == "true")
    syn = ids.filter(pl.col("synthetic"))
    assert syn.height == 30 and syn["exported_id"].cast(pl.Int64).min() == 20_000_000
    real = ids.filter(~pl.col("synthetic"))
    assert (real["patient_id"] == real["exported_id"]).all()  # real patients keep their ids

    back = prepare_mimic_iv(tmp_path / "raw", tmp_path / "back", bins_from=mimic_demo_prepared, progress=False)
    assert_round_trip(ds, back, tmp_path / "raw")
    assert {k: v for k, v in back.meta["counts"]["dropped"].items() if v} == {}


def test_mimic_dictionary_gives_real_codes(mimic_demo_prepared: Path, tmp_path: Path) -> None:
    export(mimic_demo_prepared, tmp_path / "raw", format="mimic-iv", dictionary=MIMIC_DEMO)
    dx = pl.read_csv(tmp_path / "raw" / "hosp" / "diagnoses_icd.csv.gz", schema_overrides={"icd_code": pl.String})
    d = pl.read_csv(tmp_path / "raw" / "hosp" / "d_icd_diagnoses.csv.gz", schema_overrides={"icd_code": pl.String})
    raw = pl.read_csv(MIMIC_DEMO / "hosp" / "d_icd_diagnoses.csv.gz", schema_overrides={"icd_code": pl.String})
    assert d.height == raw.height  # the dictionary is written whole
    assert dx.join(raw, on=["icd_code", "icd_version"], how="anti").height == 0  # every code is a listed code
    assert "4280" in dx.filter(pl.col("icd_version") == 9)["icd_code"].to_list()  # 428 has no code of its own
    back = prepare_mimic_iv(tmp_path / "raw", tmp_path / "back", bins_from=mimic_demo_prepared, progress=False)
    assert_round_trip(PreparedDataset.load(mimic_demo_prepared), back, tmp_path / "raw")


def test_eicu_demo_round_trip_with_synthetic(eicu_prepared: Path, tmp_path: Path) -> None:
    ds = with_synthetic(PreparedDataset.load(eicu_prepared), 40)
    res = export(ds, tmp_path / "raw", format="eicu", seed=2)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        "apacheApsVar.csv.gz", "diagnosis.csv.gz", "export.json", "patient.csv.gz", "patient_ids.csv"]
    assert res.report["lab_values_outside_bin"] == 0
    pat = pl.read_csv(tmp_path / "raw" / "patient.csv.gz", infer_schema=False)
    assert set(ds.patients["patient_id"]) == set(pat["uniquepid"])  # synthetic ids stay as they are
    assert (pat.filter(pl.col("hospitaldischargestatus") == "Expired").height == int(ds.patients["label"].sum()))
    aps = pl.read_csv(tmp_path / "raw" / "apacheApsVar.csv.gz", infer_schema_length=None)
    from data_prep.eicu import APACHE_LABS

    assert (aps.select(list(APACHE_LABS)) != -1).to_numpy().any(axis=1).all()  # a row only for stays with labs
    assert (aps.select("eyes", "temperature", "fio2") == -1).to_numpy().all()  # not in the prepared data
    back = prepare_eicu(tmp_path / "raw", tmp_path / "back", lab_source="apache", bins_from=eicu_prepared,
                        progress=False)
    assert_round_trip(ds, back, tmp_path / "raw")


def test_eicu_raw_lab_table_round_trip(tmp_path: Path) -> None:
    """The full release's ``lab`` path: a hand-made lab table, prepared, exported and prepared again."""
    from test_eicu import write_fixture

    first = prepare_eicu(write_fixture(tmp_path / "in"), tmp_path / "prepared", lab_source="lab", n_lab_items=2,
                         n_bins=2, progress=False)
    assert first.meta["preprocessing"]["labs"]["n_items"] > 0
    export(tmp_path / "prepared", tmp_path / "raw", format="eicu")
    assert (tmp_path / "raw" / "lab.csv.gz").is_file()
    back = prepare_eicu(tmp_path / "raw", tmp_path / "back", lab_source="lab", bins_from=tmp_path / "prepared",
                        progress=False)
    assert_round_trip(first, back, tmp_path / "raw")


@pytest.mark.parametrize("which", ["mimic", "eicu"])
def test_meds_round_trip_on_the_demos(which: str, mimic_demo_prepared: Path, eicu_prepared: Path,
                                      tmp_path: Path) -> None:
    import meds

    src = mimic_demo_prepared if which == "mimic" else eicu_prepared
    ds = with_synthetic(PreparedDataset.load(src), 25)
    res = export(ds, tmp_path / "meds", format="meds")
    assert res.report["lab_values_outside_bin"] == 0
    shard = tmp_path / "meds" / "data" / "train" / "0.parquet"
    meds.DataSchema.validate(pq.read_table(shard))
    data = pl.read_parquet(shard)
    syn = pl.read_parquet(tmp_path / "meds" / "metadata" / "synthetic_subjects.parquet")
    assert int(syn["synthetic"].sum()) == 25
    assert set(data["subject_id"]) == set(syn["subject_id"])
    back = prepare_meds(tmp_path / "meds", tmp_path / "back", bins_from=src, progress=False)
    assert_round_trip(ds, back, tmp_path / "meds")


@pytest.mark.parametrize("fmt", ["mimic-iv", "meds"])
def test_round_trip_with_time_tokens_and_every_lab_value(fmt: str, tmp_path: Path) -> None:
    """Ages (whole years inside fractional decile edges), gaps and several bins of one lab per visit
    come back exactly from data prepared with --time-bins 10 --lab-tokens every."""
    src = tmp_path / "prepared"
    ds = prepare_mimic_iv(require(MIMIC_DEMO), src, time_bins=10, lab_tokens="every", progress=False)
    assert any(e != int(e) for e in ds.meta["preprocessing"]["time_bins"]["age_edges"])
    res = export(ds, tmp_path / "raw", format=fmt, seed=2)
    assert res.report["lab_mode"] == "every"
    assert [res.report[f"{v}_tokens_{k}"] for v in ("age", "gap") for k in ("not_kept", "added")] == [0, 0, 0, 0]
    assert res.report["lab_values_outside_bin"] == 0
    prepare = prepare_mimic_iv if fmt == "mimic-iv" else prepare_meds
    back = prepare(tmp_path / "raw", tmp_path / "back", bins_from=src, progress=False)
    assert back.meta["preprocessing"]["time_bins"] == ds.meta["preprocessing"]["time_bins"]
    assert_round_trip(ds, back, tmp_path / "raw")


# ---------------------------------------------------------------------- time tokens, patient units and outcomes
@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory):
    """The demos prepared with ``--time-bins 10`` (eICU from apacheApsVar), by source, eICU patient unit
    and outcome; each made on first use."""
    base = tmp_path_factory.mktemp("timed")
    made: dict[tuple[str, str, str], Path] = {}

    def get(source: str, outcome: str, unit: str = "person") -> Path:
        if (source, outcome, unit) not in made:
            out = base / f"{source}_{unit}_{outcome}"
            if source == "mimic":
                prepare_mimic_iv(require(MIMIC_DEMO), out, time_bins=10, outcome=outcome, progress=False)
            else:
                # by hospital stay with every apacheApsVar value as its own token (one per stay and variable)
                prepare_eicu(require(EICU_DEMO), out, lab_source="apache", patient_unit=unit, time_bins=10,
                             outcome=outcome, lab_tokens="every" if unit == "hospital-stay" else "mean",
                             progress=False)
            made[source, outcome, unit] = out
        return made[source, outcome, unit]
    return get


@pytest.mark.parametrize("unit", ["person", "hospital-stay"])
@pytest.mark.parametrize("outcome", ["mortality", "readmission-30d", "long-stay"])
def test_eicu_round_trip_with_time_tokens_patient_units_and_outcomes(unit: str, outcome: str, timed, tmp_path: Path,
                                                                      capsys) -> None:
    """Gap tokens within and across hospital stays, age tokens, both patient units and every outcome come
    back from the eICU tables: real records exactly, synthetic ones up to the time tokens export counts."""
    src = timed("eicu", outcome, unit)
    ds = with_synthetic(PreparedDataset.load(src), 40)
    res = export(ds, tmp_path / "raw", format="eicu", seed=4)
    assert "--bins-from PREPARED" in res.prepare_again  # exported from memory: the folder is not known
    assert res.report["lab_mode"] == ("every" if unit == "hospital-stay" else "mean")
    back = prepare_back(ExportResult(res.path, res.rows, res.report, res.prepare_again.replace("PREPARED", str(src))),
                        tmp_path / "back", capsys)
    assert_round_trip_counted(ds, back, tmp_path / "raw", res.report)
    dropped = {k: v for k, v in back.meta["counts"]["dropped"].items() if v}
    positives = int(ds.patients["label"].sum())
    assert dropped == ({"stays_readmission_after_index": positives} if outcome == "readmission-30d" else {})

    pat = pl.read_csv(tmp_path / "raw" / "patient.csv.gz", infer_schema_length=None,
                      schema_overrides={"uniquepid": pl.String, "age": pl.String})
    hospital_stays = pat.select("uniquepid", "patienthealthsystemstayid").n_unique()
    if unit == "hospital-stay":  # one hospital stay per patient; real ones keep their uniquepid and stay id
        assert hospital_stays == ds.n_patients
        ids = pat.select(pl.concat_str("uniquepid", pl.col("patienthealthsystemstayid").cast(pl.String),
                                       separator=":")).to_series()
        assert set(ds.patients.filter(~pl.col("synthetic"))["patient_id"]) <= set(ids)
    else:  # a stay opens a new hospital stay exactly where its record has no gap token
        tok = visit_tokens(ds)
        opening = sum(1 for (_, i), t in tok.items() if i == 0 or not any(x.startswith("time:gap:") for x in t))
        assert hospital_stays == opening
    if outcome == "mortality":
        assert pat.filter(pl.col("unitdischargestatus") == "Expired").height == positives
    else:
        assert (pat["hospitaldischargestatus"] == "Alive").all() and (pat["unitdischargestatus"] == "Alive").all()
        assert res.report["readmissions_written"] == (positives if outcome == "readmission-30d" else 0)


@pytest.mark.parametrize("outcome", ["readmission-30d", "long-stay"])
@pytest.mark.parametrize("fmt", ["mimic-iv", "meds"])
def test_mimic_outcomes_come_back_from_the_admissions(fmt: str, outcome: str, timed, tmp_path: Path, capsys) -> None:
    """A readmission within 30 days after each positive index, and final stays over / under 7 days,
    read directly from the written admissions, and the labels again through data_prep."""
    src = timed("mimic", outcome)
    ds = with_synthetic(PreparedDataset.load(src), 30)
    res = export(ds, tmp_path / "raw", format=fmt, seed=5)
    back = prepare_back(ExportResult(res.path, res.rows, res.report, res.prepare_again.replace("PREPARED", str(src))),
                        tmp_path / "back", capsys)
    assert_round_trip_counted(ds, back, tmp_path / "raw", res.report)
    ids = pl.read_csv(tmp_path / "raw" / "patient_ids.csv", infer_schema=False)
    labels = dict(ds.patients.join(ids.drop("synthetic"), on="patient_id").select("exported_id", "label").iter_rows())
    if fmt == "mimic-iv":
        adm = pl.read_csv(tmp_path / "raw" / "hosp" / "admissions.csv.gz", try_parse_dates=True,
                          schema_overrides={"subject_id": pl.String})
        assert (adm["hospital_expire_flag"] == 0).all() and adm["deathtime"].null_count() == adm.height
    else:
        events = pl.read_parquet(tmp_path / "raw" / "data" / "train" / "0.parquet")
        assert events.filter(pl.col("code") == "MEDS_DEATH").height == 0
        stays = events.filter(pl.col("hadm_id").is_not_null()).group_by("subject_id", "hadm_id").agg(
            admittime=pl.col("time").min(), dischtime=pl.col("time").max())
        adm = stays.with_columns(pl.col("subject_id").cast(pl.String))
    adm = adm.sort("subject_id", "admittime").with_columns(
        gap=(pl.col("admittime") - pl.col("dischtime").shift(1).over("subject_id")).dt.total_minutes() / 1440,
        los=(pl.col("dischtime") - pl.col("admittime")).dt.total_minutes() / 1440)
    last = adm.group_by("subject_id", maintain_order=True).last()
    if outcome == "readmission-30d":
        readmitted = last.filter(pl.col("gap") <= 30)["subject_id"].to_list()
        assert sorted(readmitted) == sorted(k for k, v in labels.items() if v == 1)
    else:
        long = last.filter(pl.col("los") > 7)["subject_id"].to_list()
        assert sorted(long) == sorted(k for k, v in labels.items() if v == 1)


def test_generated_records_with_missing_or_extra_time_tokens(timed, tmp_path: Path, capsys) -> None:
    """Generated records may lack a time token or hold one too many: export writes what the tables can
    hold (an unknown age, a new eICU hospital stay), uses the lowest bin of two, and counts the rest."""
    for source, fmt, expected in (("mimic", "mimic-iv", (1, 1, 0, 1)), ("mimic", "meds", (1, 1, 0, 1)),
                                  ("eicu", "eicu", (1, 1, 0, 0))):
        src = timed(source, "mortality")
        ds = PreparedDataset.load(src)
        tok = dict(zip(ds.vocab["token"], ds.vocab["id"]))
        rec = ds.records()
        multi = [p for p in range(len(rec)) if rec.visit_ptr[p + 1] - rec.visit_ptr[p] >= 3
                 and rec.groups["age_group"][p] != "Unknown"
                 and any(tok.get(f"time:age:{b}") in rec.patient(p)[0] for b in range(10))
                 and all(any(tok.get(f"time:gap:{b}") in v for b in range(10)) for v in rec.patient(p)[1:])]
        assert len(multi) >= 4
        chosen = multi[:4]
        records = [rec.patient(p) for p in chosen]
        age_ids = {tok[f"time:age:{b}"] for b in range(10) if f"time:age:{b}" in tok}
        gap_ids = sorted(tok[f"time:gap:{b}"] for b in range(10) if f"time:gap:{b}" in tok)
        records[0][0] = [c for c in records[0][0] if c not in age_ids]               # no age token
        records[1][1] = records[1][1] + [g for g in gap_ids if g not in records[1][1]][:1]  # two gap tokens
        records[2][1] = records[2][1] + [c for c in records[2][0] if c in age_ids]   # an age token too late
        records[3][2] = [c for c in records[3][2] if c not in gap_ids]               # no gap token
        syn = PreparedDataset.from_records(
            patient_ids=[f"syn-{i:06d}" for i in range(4)], labels=rec.labels[chosen],
            groups=rec.groups[chosen], visits=records, vocab=ds.vocab, meta=ds.meta, synthetic=True)
        both = PreparedDataset.concat([ds, syn]).validate()
        res = export(both, tmp_path / fmt, format=fmt, seed=6)
        counts = tuple(res.report[f"{v}_tokens_{k}"] for v, k in (("age", "not_kept"), ("gap", "not_kept"),
                                                                     ("age", "added"), ("gap", "added")))
        assert counts == expected, (fmt, counts)
        back = prepare_back(ExportResult(res.path, res.rows, res.report,
                                         res.prepare_again.replace("PREPARED", str(src))), tmp_path / f"{fmt}_back",
                            capsys)
        assert_round_trip_counted(both, back, tmp_path / fmt, res.report)


def test_real_record_without_a_gap_token_gets_an_empty_discharge_time(timed, tmp_path: Path) -> None:
    """A real MIMIC-IV record lacks a gap token only where its source lacked a time: export leaves the
    previous admission's dischtime empty, as the source had it, and the record comes back exactly."""
    src = timed("mimic", "mortality")
    ds = PreparedDataset.load(src)
    gap_ids = ds.vocab.filter(pl.col("token").str.starts_with("time:gap:"))["id"].implode()
    pid = ds.visits.filter(pl.col("visit_index") == 2)["patient_id"][0]
    at = (pl.col("patient_id") == pid) & (pl.col("visit_index") == 2)
    visits = ds.visits.with_columns(codes=pl.when(at).then(pl.col("codes").list.set_difference(gap_ids))
                                    .otherwise("codes"))
    gapless = PreparedDataset(visits, ds.patients, ds.vocab, ds.meta).validate()
    res = export(gapless, tmp_path / "raw", format="mimic-iv", seed=8)
    assert [res.report[f"{v}_tokens_{k}"] for v in ("age", "gap") for k in ("not_kept", "added")] == [0, 0, 0, 0]
    adm = pl.read_csv(tmp_path / "raw" / "hosp" / "admissions.csv.gz", infer_schema=False)
    empty = adm.filter(pl.col("dischtime").is_null())
    assert empty.height == 1 and empty["subject_id"][0] == pid
    back = prepare_mimic_iv(tmp_path / "raw", tmp_path / "back", bins_from=src, progress=False)
    assert_round_trip(gapless, back, tmp_path / "raw")
    assert back.meta["counts"]["info"]["time_gap_undefined_time_missing"] == 1


def test_eicu_raw_lab_table_every_value_by_hospital_stay(tmp_path: Path, capsys) -> None:
    """The full release's ``lab`` table with --lab-tokens every, time tokens and hospital-stay patients."""
    from test_eicu import write_fixture

    first = prepare_eicu(write_fixture(tmp_path / "in"), tmp_path / "prepared", lab_source="lab", n_lab_items=2,
                         n_bins=2, lab_tokens="every", time_bins=2, patient_unit="hospital-stay", progress=False)
    ds = with_synthetic(first, 2, seed=1)
    res = export(ds, tmp_path / "raw", format="eicu", seed=7)
    assert (tmp_path / "raw" / "lab.csv.gz").is_file() and res.report["lab_mode"] == "every"
    # --bins-from brings the lab source, patient unit, lab mode and time bins
    assert res.prepare_again == f"python -m data_prep.eicu --root {tmp_path / 'raw'} --out AGAIN --bins-from PREPARED"
    back = prepare_back(ExportResult(res.path, res.rows, res.report,
                                     res.prepare_again.replace("PREPARED", str(tmp_path / "prepared"))),
                        tmp_path / "back", capsys)
    assert_round_trip_counted(ds, back, tmp_path / "raw", res.report)


def test_meds_cannot_leave_eicu_gaps_untimed(timed, tmp_path: Path) -> None:
    """MEDS times every gap: eICU records by person gain a gap token where a new hospital stay began,
    and export counts exactly those."""
    src = timed("eicu", "mortality")
    ds = PreparedDataset.load(src)
    res = export(ds, tmp_path / "meds", format="meds")
    untimed = ds.meta["counts"]["info"]["time_gap_undefined_new_episode"]
    assert res.report["gap_tokens_added"] == untimed > 300 and res.report["gap_tokens_not_kept"] == 0
    back = prepare_meds(tmp_path / "meds", tmp_path / "back", bins_from=src, progress=False)
    assert_round_trip_counted(ds, back, tmp_path / "meds", res.report, real_exact=False)


def test_outcome_the_layout_cannot_express_is_a_clear_error(mimic_demo_prepared: Path, tmp_path: Path,
                                                            capsys) -> None:
    from halo_balance.export import main

    ds = PreparedDataset.load(mimic_demo_prepared)
    meta = copy.deepcopy(ds.meta)
    meta["outcome"] = "sepsis_onset"
    meta["preprocessing"]["outcome"] = {"option": "sepsis", "name": "sepsis_onset", "rule": "a label file"}
    PreparedDataset(ds.visits, ds.patients, ds.vocab, meta).save(tmp_path / "sepsis")
    fails_cleanly(main, ["--data", tmp_path / "sepsis", "--format", "mimic-iv", "--out", tmp_path / "raw"], capsys,
                  "'sepsis_onset' cannot be written in the mimic-iv layout", "--format meds")
    assert not (tmp_path / "raw").exists()
    res = export(tmp_path / "sepsis", tmp_path / "meds", format="meds")  # MEDS: labels as a label file
    labels = pl.read_parquet(tmp_path / "meds" / "labels" / "sepsis_onset.parquet")
    assert int(labels["boolean_value"].sum()) == int(ds.patients["label"].sum())
    events = pl.read_parquet(tmp_path / "meds" / "data" / "train" / "0.parquet")
    assert events.filter(pl.col("code") == "MEDS_DEATH").height == 0  # nothing says who died
    assert "--labels" in res.prepare_again


# ---------------------------------------------------------------------- generated records (simulator)
@pytest.fixture(scope="module")
def sim_augmented(sim_prepared: Path, sim_model: Path) -> PreparedDataset:
    from halo_balance import HaloModel
    from halo_balance.sample import sample_records

    model = HaloModel.from_pretrained(sim_model)
    synthetic = sample_records(model, model.layout.complete({}, 60, seed=0), seed=0)
    return PreparedDataset.concat([PreparedDataset.load(sim_prepared), synthetic]).validate()


@pytest.mark.parametrize("fmt", ["mimic-iv", "meds"])
def test_simulator_round_trip_with_generated_records(fmt: str, sim_prepared: Path, sim_augmented: PreparedDataset,
                                                     tmp_path: Path) -> None:
    res = export(sim_augmented, tmp_path / "raw", format=fmt, seed=3)
    assert res.report["lab_values_outside_bin"] == 0
    prepare = prepare_mimic_iv if fmt == "mimic-iv" else prepare_meds
    back = prepare(tmp_path / "raw", tmp_path / "back", bins_from=sim_prepared, progress=False)
    assert_round_trip(sim_augmented, back, tmp_path / "raw",
                      conflicts_allowed=res.report["visit_items_with_several_bins"] > 0)


# ---------------------------------------------------------------------- errors and the command line
def test_wrong_source_is_a_clear_error(eicu_prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="prepared from 'eicu'.*--format meds"):
        export(eicu_prepared, tmp_path / "raw", format="mimic-iv")
    assert not (tmp_path / "raw").exists()


def test_cli_writes_and_refuses_to_overwrite(mimic_demo_prepared: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "halo_balance.export", "--data", str(mimic_demo_prepared), "--format", "mimic-iv",
           "--out", str(tmp_path / "raw")]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "100 patients" in ok.stdout
    with gzip.open(tmp_path / "raw" / "hosp" / "patients.csv.gz", "rt") as f:
        assert f.readline().startswith("subject_id,gender,anchor_age")
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "Traceback" not in again.stderr and "--overwrite" in again.stderr


def test_time_tokens_decode_to_ages_and_gaps_inside_their_bins() -> None:
    """The time-token contract (kind ``time``, ``time:age:<b>`` on first visits, ``time:gap:<b>`` on later
    ones, 0-based bins, edges in ``preprocessing.time_bins``) turned into consistent dates."""
    from conftest import make_tiny_dataset

    base = make_tiny_dataset()
    extra = pl.DataFrame({"id": pl.Series(range(5, 11), dtype=pl.Int32),
                          "token": ["time:age:0", "time:age:1", "time:age:2", "time:gap:0", "time:gap:1", "time:gap:2"],
                          "kind": ["time"] * 6, "description": [""] * 6})
    vocab = pl.concat([base.vocab, extra])
    meta = {**base.meta, "groups": {"gender": ["F", "M"], "age_group": ["18-44", "65-79"]},
            "preprocessing": {"time_bins": {"n_bins": 3, "age_edges": [40.0, 70.0],
                                            "gap_days_edges": [30.0, 365.0]}}}
    n = 300
    rng = np.random.default_rng(0)
    age_bin = rng.integers(0, 3, n)
    gap_bins = [rng.integers(0, 3, 2) for _ in range(n)]
    visits = [[[0, 5 + int(age_bin[i])], [1, 8 + int(gap_bins[i][0])], [2, 8 + int(gap_bins[i][1])]] for i in range(n)]
    groups = {"gender": ["F"] * n, "age_group": ["65-79" if b == 2 else "18-44" for b in age_bin]}
    ds = PreparedDataset.from_records(patient_ids=[f"p{i}" for i in range(n)], labels=[0] * n, groups=groups,
                                      visits=visits, vocab=vocab, meta=meta, synthetic=False).validate()
    dec = decode(ds, seed=0, numeric_ids=False, layout=Layout())
    assert [dec.report[f"{v}_tokens_{k}"] for v in ("age", "gap") for k in ("not_kept", "added")] == [0, 0, 0, 0]
    age = dec.patients["age"].to_numpy()
    lo = np.array([0, 40, 70])[age_bin]
    hi = np.array([40, 70, 92])[age_bin]
    group_lo = np.where(age_bin == 2, 65, 18)
    assert ((age >= np.maximum(lo, group_lo)) & (age < hi)).all()
    v = dec.visits.sort("visit_no")
    gaps = (v["admit"] - v["discharge"].shift(1)).dt.total_minutes().to_numpy()[v["visit_index"].to_numpy() > 0] / 1440
    b = np.array([g for pair in gap_bins for g in pair])
    edges = np.array([0.0, 30.0, 365.0, 700.0])
    assert ((gaps >= edges[b] - 1 / 1440) & (gaps < edges[b + 1] + 1 / 1440)).all()  # minute rounding


@pytest.mark.parametrize("fmt", ["mimic-iv", "meds"])
def test_round_trip_with_every_representation_option(fmt: str, tmp_path: Path, capsys) -> None:
    """D prepared with non-default values of every option that defines its representation (lab items, bins,
    lab mode, time bins, outcome, visit cap) comes back through the printed command, which names none of
    them: --bins-from D brings them all, and the prepared-again data records D's values."""
    from data_prep import meds
    from test_prep_options import REPRESENTATION

    options = REPRESENTATION["mimic"]
    src = tmp_path / "prepared"
    ds = with_synthetic(prepare_mimic_iv(require(MIMIC_DEMO), src, progress=False, **options), 20)
    res = export(ds, tmp_path / "raw", format=fmt, seed=9)
    assert not any(f"--{k.replace('_', '-')}" in res.prepare_again for k in options)
    back = prepare_back(ExportResult(res.path, res.rows, res.report, res.prepare_again.replace("PREPARED", str(src))),
                        tmp_path / "back", capsys)
    assert_round_trip_counted(ds, back, tmp_path / "raw", res.report)
    params = back.meta["preprocessing"]["parameters"]
    assert {k: params[k] for k in options if k != "outcome"} == {k: v for k, v in options.items() if k != "outcome"}
    assert back.meta["outcome"] == "readmission_30d"
    if fmt == "meds":  # the outcome came from the label file; an explicit visit cap of another value is refused
        assert params["outcome"] is None and params["labels"].endswith("readmission_30d.parquet")
        fails_cleanly(meds.main, shlex.split(res.prepare_again.replace("PREPARED", str(src)))[3:] + [
            "--max-visits", "3", "--quiet"], capsys, "--max-visits 3 differs from the --bins-from folder's 2")
