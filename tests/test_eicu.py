"""eICU preprocessing: the real demo (apacheApsVar labs) and a hand-written raw ``lab`` fixture."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import EICU_DEMO, REPO, fails_cleanly, require, visit_tokens
from data_prep.eicu import APACHE_LABS, prepare_eicu
from halo_balance import PreparedDataset
from halo_balance.errors import DatasetError


# ---------------------------------------------------------------------- the real demo
@pytest.fixture(scope="module")
def demo(eicu_prepared: Path) -> PreparedDataset:
    return PreparedDataset.load(eicu_prepared)


def raw(name: str) -> pl.DataFrame:
    df = pl.read_csv(EICU_DEMO / f"{name}.csv.gz", infer_schema=False)
    return df.with_columns(pl.col(c).str.strip_chars().replace("", None) for c in df.columns)


def patient_tokens(ds: PreparedDataset, prefix: str) -> dict[str, set[str]]:
    """Per patient, the union of tokens (starting with ``prefix``) over all visits."""
    t = (ds.visits.select("patient_id", "codes").explode("codes").drop_nulls()
         .join(ds.vocab.select(codes="id", token="token"), on="codes")
         .filter(pl.col("token").str.starts_with(prefix)).group_by("patient_id").agg("token"))
    got = {p: set(tok) for p, tok in t.iter_rows()}
    return {p: got.get(p, set()) for p in ds.patients["patient_id"]}


def test_demo_counts(demo: PreparedDataset) -> None:
    pats = raw("patient")
    assert pats.height == 2520 and pats["uniquepid"].n_unique() == 1841
    c = demo.meta["counts"]
    assert c["rows_read"]["patient"] == 2520
    # 28 stays have no hospital discharge status; where such a stay is a patient's final one the
    # outcome is unknown and the patient is dropped (counted), with all their stays
    assert demo.n_patients + c["dropped"]["patients_without_outcome"] == 1841
    assert demo.n_visits + c["dropped"]["stays_of_patients_without_outcome"] == 2520
    assert (demo.n_patients, demo.n_visits) == (1818, 2487)
    no_status = set(pats.filter(pl.col("hospitaldischargestatus").is_null())["uniquepid"])
    dropped = set(pats["uniquepid"]) - set(demo.patients["patient_id"])
    assert len(dropped) == 23 and dropped <= no_status
    single = pats.filter(pl.col("uniquepid").is_in(list(no_status))).group_by("uniquepid").len()
    assert set(single.filter(pl.col("len") == 1)["uniquepid"]) <= dropped  # unambiguous cases
    per_patient = pats.group_by(patient_id="uniquepid").len()
    vis = demo.visits.group_by("patient_id").len().join(per_patient, on="patient_id")
    assert (vis["len"] == vis["len_right"]).all()


def test_demo_positives_are_final_stay_deaths(demo: PreparedDataset) -> None:
    pats = raw("patient")
    expired = set(pats.filter(pl.col("hospitaldischargestatus") == "Expired")["uniquepid"])
    positive = set(demo.patients.filter(pl.col("label") == 1)["patient_id"])
    assert positive == expired and len(positive) == 181  # no death is followed by a later stay
    assert demo.visits.filter(pl.col("label") == 1).height == 181
    last = demo.visits.filter(pl.col("visit_index") == pl.col("visit_index").max().over("patient_id"))
    assert set(last.filter(pl.col("label") == 1)["patient_id"]) == positive


def expected_dx_tokens(code: str | None, path: str | None) -> set[str]:
    parts = [p.strip().upper() for p in (code or "").split(",") if p.strip()]
    i9 = [p for p in parts if re.fullmatch(r"(\d{3}|V\d{2}|E\d{3})(\.?\d{1,2})?", p)]
    i10 = [p for p in parts if p not in i9 and re.fullmatch(r"[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?", p)]
    if i9:
        return {"dx9:" + (p.split(".")[0][:4] if p.startswith("E") else p.split(".")[0][:3]) for p in i9}
    if i10:
        return {"dx10:" + p.split(".")[0][:3] for p in i10}
    return {"dxstr:" + "|".join(path.split("|")[:3])} if path else set()


def test_demo_diagnosis_tokens_match_raw(demo: PreparedDataset) -> None:
    dx = raw("diagnosis").join(raw("patient").select("patientunitstayid", "uniquepid"), on="patientunitstayid")
    expect: dict[str, set[str]] = {}
    for pid, code, path in dx.select("uniquepid", "icd9code", "diagnosisstring").iter_rows():
        expect.setdefault(pid, set()).update(expected_dx_tokens(code, path))
    ours = patient_tokens(demo, "dx")
    assert ours == {p: expect.get(p, set()) for p in ours}
    vocab = set(demo.vocab["token"])
    assert "dx9:401" in vocab and "dx10:I10" not in vocab  # "401.9, I10": the ICD-9 code wins
    info = demo.meta["counts"]["info"]
    assert info["diagnosis_code_parts_unrecognised"] == 34  # "31.1", a procedure code
    assert info["diagnosis_rows_using_diagnosisstring"] > 3000


def test_demo_apache_labs_match_raw(demo: PreparedDataset) -> None:
    labs = demo.meta["preprocessing"]["labs"]
    assert labs["source"] == "eicu:apacheApsVar" and labs["n_items"] == 11
    aps = raw("apacheApsVar").join(raw("patient").select("patientunitstayid", "uniquepid"), on="patientunitstayid")
    aps = aps.filter(pl.col("uniquepid").is_in(demo.patients["patient_id"].implode()))
    expect: dict[str, set[str]] = {}
    for it in labs["items"]:
        var = it["item"].removeprefix("aps_")
        vals = aps.select("uniquepid", v=pl.col(var).cast(pl.Float64)).filter(pl.col("v") != -1)
        assert it["rows"] == vals.height
        edges = np.unique(np.quantile(vals["v"].to_numpy(), np.arange(1, 10) / 10))
        np.testing.assert_allclose(it["edges"], edges, rtol=1e-8)
        bins = np.searchsorted(np.asarray(it["edges"]), vals["v"].to_numpy(), side="right") + 1
        for pid, b in zip(vals["uniquepid"], bins):
            expect.setdefault(pid, set()).add(f"lab:{it['item']}:{b}")
    ours = patient_tokens(demo, "lab:")
    assert ours == {p: expect.get(p, set()) for p in ours}
    assert {it["item"] for it in labs["items"]} == {f"aps_{k}" for k in APACHE_LABS}


def test_demo_groups(demo: PreparedDataset) -> None:
    g = demo.meta["groups"]
    assert g["age_group"] == ["pediatric", "adult", "elderly", "Unknown"]
    assert g["gender"] == ["Female", "Male", "Other/Unknown"]
    assert set(g["ethnicity"]) == {"Caucasian", "African American", "Hispanic", "Asian", "Native American",
                                   "Other/Unknown"}
    pats = raw("patient")
    over89 = set(pats.filter(pl.col("age") == "> 89")["uniquepid"]) & set(demo.patients["patient_id"])
    ages = dict(demo.patients.select("patient_id", "age_group").iter_rows())
    assert over89 and {ages[p] for p in over89} == {"elderly"}


# ---------------------------------------------------------------------- hand-written tables
PATIENT_COLS = ("patientunitstayid,patienthealthsystemstayid,gender,age,ethnicity,hospitalid,wardid,"
                "apacheadmissiondx,admissionheight,hospitaladmittime24,hospitaladmitoffset,hospitaladmitsource,"
                "hospitaldischargeyear,hospitaldischargetime24,hospitaldischargeoffset,hospitaldischargelocation,"
                "hospitaldischargestatus,unittype,unitadmittime24,unitadmitsource,unitvisitnumber,unitstaytype,"
                "admissionweight,dischargeweight,unitdischargetime24,unitdischargeoffset,unitdischargelocation,"
                "unitdischargestatus,uniquepid").split(",")


def stay(unit, hosp, pid, year, offset, visit, status, *, age="60", gender="Female", eth="Caucasian"):
    row = dict.fromkeys(PATIENT_COLS, "")
    row.update(patientunitstayid=unit, patienthealthsystemstayid=hosp, uniquepid=pid, hospitaldischargeyear=year,
               hospitaladmitoffset=offset, unitvisitnumber=visit, hospitaldischargestatus=status, age=age,
               gender=gender, ethnicity=eth, hospitalid="1", unitdischargestatus="Alive")
    return row


STAYS = [
    # A: two hospital stays in 2014; the one that ended in death (hospital id 5) must come last
    stay("100", "10", "A", "2014", "0", "1", "Alive", age="> 89", eth="Hispanic"),
    stay("101", "10", "A", "2014", "-3000", "2", "Alive", age="> 89", eth="Hispanic"),
    stay("102", "5", "A", "2014", "-10", "1", "Expired", age="> 89", eth=""),
    stay("200", "20", "B", "2015", "-5", "1", "Alive", age="16", gender="Male", eth="Asian"),
    # C: final stay without a discharge status: outcome unknown
    stay("300", "30", "C", "2014", "0", "1", "Alive"),
    stay("301", "31", "C", "2015", "0", "1", ""),
    stay("400", "40", "D", "2015", "0", "1", "Expired", age="", gender="", eth="Other/Unknown"),
]

DIAGNOSES = [  # (stay, icd9code, diagnosisstring)
    ("100", "401.9, I10", "cardiovascular|ventricular disorders|hypertension"),
    ("100", "", "cardiovascular|shock / hypotension|hypotension|pressor"),
    ("101", "I10", "cardiovascular|ventricular disorders|hypertension"),
    ("102", "E980.2, 965.00, T40.60", "toxicology|drug overdose|opioid overdose"),
    ("102", "31.1", "pulmonary|respiratory failure|Tracheostomy performed"),
    ("200", "E87.1", "endocrine|electrolyte imbalance|hyponatremia"),
    ("301", "401.9", "cardiovascular|ventricular disorders|hypertension"),
    ("999", "401.9", "cardiovascular|ventricular disorders|hypertension"),
]

LAB_HEADER = ("labid,patientunitstayid,labresultoffset,labtypeid,labname,labresult,labresulttext,"
              "labmeasurenamesystem,labmeasurenameinterface,labresultrevisedoffset")
LAB_ROWS = """\
1,100,10,1,creatinine,1.0,1.0,mg/dL,mg/dL,20
2,100,400,1,creatinine ,3.0,3.0,mg/dL,mg/dL,410
3,100,10,1,sodium,140,140,mmol/L,mmol/L,20
4,101,30,1,creatinine,4.0,4.0,mg/dL,mg/dL,40
5,101,30,1,sodium,,pending,mmol/L,mmol/L,40
6,102,-60,1,creatinine,6.0,6.0,mg/dL,mg/dL,-50
7,102,15,1,sodium,150,150,mmol/L,mmol/L,20
8,200,5,1,creatinine,8.0,8.0,mg/dL,mg/dL,10
9,200,5,1,BUN,10,10,mg/dL,mg/dL,10
10,300,5,1,creatinine,1.0,1.0,mg/dL,mg/dL,10
11,400,5,1,creatinine,x,x,mg/dL,mg/dL,10
12,999,5,1,creatinine,2.0,2.0,mg/dL,mg/dL,10
"""


def write_gz(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()))


def write_fixture(root: Path, *, lab: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(STAYS, schema=dict.fromkeys(PATIENT_COLS, pl.String), orient="row").write_csv(root / "patient.csv")
    dx = pl.DataFrame([(str(i), s, "False", "0", path, code, "Major") for i, (s, code, path) in enumerate(DIAGNOSES)],
                      schema=["diagnosisid", "patientunitstayid", "activeupondischarge", "diagnosisoffset",
                              "diagnosisstring", "icd9code", "diagnosispriority"], orient="row")
    write_gz(root / "diagnosis.csv.gz", dx.write_csv())
    if lab:
        write_gz(root / "lab.csv.gz", LAB_HEADER + "\n" + LAB_ROWS)
    return root


@pytest.fixture
def hand(tmp_path: Path) -> PreparedDataset:
    return prepare_eicu(write_fixture(tmp_path / "raw"), tmp_path / "out", n_lab_items=2, n_bins=2,
                        progress=False)


def test_raw_lab_path_tokens_and_order(hand: PreparedDataset) -> None:
    assert hand.patients["patient_id"].to_list() == ["A", "B", "D"]
    assert hand.patients["label"].to_list() == [1, 0, 1]
    labs = hand.meta["preprocessing"]["labs"]
    assert labs["source"] == "eicu:lab"
    # creatinine stay means 2 (100), 4 (101), 6 (102), 8 (200): median 5; sodium 140, 150: 145
    assert [(it["item"], it["edges"], it["unit"]) for it in labs["items"]] == [
        ("creatinine", [5.0], "mg/dL"), ("sodium", [145.0], "mmol/L")]
    assert visit_tokens(hand) == {
        ("A", 0): {"dx9:401", "dxstr:cardiovascular|shock / hypotension|hypotension",
                   "lab:creatinine:1", "lab:sodium:1"},
        ("A", 1): {"dx10:I10", "lab:creatinine:1"},  # unit visit 2 of hospital stay 10
        ("A", 2): {"dx9:E980", "dx9:965", "dxstr:pulmonary|respiratory failure|Tracheostomy performed",
                   "lab:creatinine:2", "lab:sodium:2"},  # the death, last although its hospital id is lower
        ("B", 0): {"dx10:E87", "lab:creatinine:2"},
        ("D", 0): set(),
    }
    assert hand.visits.filter(pl.col("label") == 1).select("patient_id", "visit_index").rows() == [("A", 2), ("D", 0)]


def test_raw_lab_path_counts(hand: PreparedDataset) -> None:
    c = hand.meta["counts"]
    assert c["rows_read"] == {"patient": 7, "diagnosis": 8, "lab": 12}
    d = {k: v for k, v in c["dropped"].items() if v}
    assert d == {"patients_without_outcome": 1, "stays_of_patients_without_outcome": 2,
                 "diagnosis_stay_patient_without_outcome": 1, "diagnosis_unknown_stay": 1,
                 "lab_stay_patient_without_outcome": 1, "lab_unknown_stay": 1, "lab_no_numeric_value": 1,
                 "lab_not_a_number": 1, "lab_item_not_selected": 1}
    assert sum(v for k, v in d.items() if k.startswith("lab_")) + c["info"]["lab_rows_used"] == 12
    assert c["info"]["diagnosis_code_parts_unrecognised"] == 1


def test_raw_lab_path_groups(hand: PreparedDataset) -> None:
    p = {r["patient_id"]: r for r in hand.patients.iter_rows(named=True)}
    assert (p["A"]["age_group"], p["A"]["gender"], p["A"]["ethnicity"]) == ("elderly", "Female", "Hispanic")
    assert (p["B"]["age_group"], p["B"]["gender"], p["B"]["ethnicity"]) == ("pediatric", "Male", "Asian")
    assert (p["D"]["age_group"], p["D"]["gender"], p["D"]["ethnicity"]) == ("Unknown", "Other/Unknown",
                                                                             "Other/Unknown")


def test_bins_from_bins_new_data_like_the_reference(hand: PreparedDataset, tmp_path: Path) -> None:
    rows = LAB_ROWS.replace("200,5,1,creatinine,8.0", "200,5,1,creatinine,4.5")
    root = write_fixture(tmp_path / "new")
    write_gz(root / "lab.csv.gz", LAB_HEADER + "\n" + rows)
    new = prepare_eicu(root, tmp_path / "new_out", bins_from=tmp_path / "out", progress=False)
    assert new.vocab.equals(hand.vocab)
    assert new.meta["preprocessing"]["labs"]["items"][0]["edges"] == [5.0]  # not refitted (would be 4.25)
    assert "lab:creatinine:1" in visit_tokens(new)[("B", 0)]
    with pytest.raises(DatasetError, match="--lab-source apache differs from the --bins-from folder's lab"):
        prepare_eicu(root, tmp_path / "x", lab_source="apache", bins_from=tmp_path / "out", progress=False)


def test_missing_lab_table_names_the_fix(tmp_path: Path) -> None:
    root = write_fixture(tmp_path / "raw", lab=False)
    with pytest.raises(DatasetError, match=r"lab.*not found.*--lab-source apache"):
        prepare_eicu(root, tmp_path / "out", progress=False)
    r = subprocess.run([sys.executable, "-m", "data_prep.eicu", "--root", str(require(EICU_DEMO)),
                        "--out", str(tmp_path / "out"), "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "--lab-source apache" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- patient unit, time tokens, outcomes
def raw_stays() -> pl.DataFrame:
    """patient rows with numeric offsets, the age in years and the hospital-stay patient id."""
    p = raw("patient").with_columns(
        pl.col("patientunitstayid", "patienthealthsystemstayid", "hospitaladmitoffset", "unitdischargeoffset",
               "hospitaldischargeoffset", "unitvisitnumber").cast(pl.Int64),
        age=pl.when(pl.col("age") == "> 89").then(pl.lit("90")).otherwise("age").cast(pl.Float64))
    return p.with_columns(hosp_id=pl.col("uniquepid") + ":" + pl.col("patienthealthsystemstayid").cast(pl.String))


def hospital_stay_order(p: pl.DataFrame) -> pl.DataFrame:
    """Unit stays of each hospital stay in order (unit admission time, then unitvisitnumber), with
    visit_index and the gap in days since the previous unit discharge."""
    p = p.sort("hosp_id", -pl.col("hospitaladmitoffset"), "unitvisitnumber", "patientunitstayid")
    start = -pl.col("hospitaladmitoffset")
    end = start + pl.col("unitdischargeoffset")
    return p.with_columns(visit_index=pl.int_range(pl.len()).over("hosp_id").cast(pl.Int32),
                          gap=(start - end.shift(1).over("hosp_id")) / 1440)


def test_demo_hospital_stay_unit(eicu_demo: Path, tmp_path: Path) -> None:
    """The FairPlay paper's unit: one patient per hospital admission, its unit stays as visits."""
    ds = prepare_eicu(eicu_demo, tmp_path / "h", lab_source="apache", patient_unit="hospital-stay",
                      n_lab_items=0, progress=False)
    p = raw_stays()
    assert p["hosp_id"].n_unique() == 2174 and p["uniquepid"].n_unique() == 1841
    unknown = p.filter(pl.col("hospitaldischargestatus").is_null())
    assert unknown.height == 28 and unknown["hosp_id"].n_unique() == 25  # a status belongs to the hospital stay
    assert (ds.n_patients, ds.n_visits) == (2174 - 25, 2520 - 28) == (2149, 2492)
    d = ds.meta["counts"]["dropped"]
    assert (d["patients_without_outcome"], d["stays_of_patients_without_outcome"]) == (25, 28)
    expired = set(p.filter(pl.col("hospitaldischargestatus") == "Expired")["hosp_id"])
    assert len(expired) == 182 and set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == expired
    sizes = p.group_by(patient_id="hosp_id").len()
    vis = ds.visits.group_by("patient_id").len().join(sizes, on="patient_id")
    assert vis.height == 2149 and (vis["len"] == vis["len_right"]).all()
    assert ds.meta["preprocessing"]["parameters"]["patient_unit"] == "hospital-stay"
    assert "patienthealthsystemstayid" in ds.meta["preprocessing"]["rules"]["visit"]


def test_demo_time_tokens_hospital_stays(eicu_demo: Path, tmp_path: Path) -> None:
    """Age on each first unit stay; the gap since the previous unit discharge on every later one."""
    ds = prepare_eicu(eicu_demo, tmp_path / "t", lab_source="apache", patient_unit="hospital-stay",
                      n_lab_items=0, time_bins=10, progress=False)
    p = hospital_stay_order(raw_stays()).filter(pl.col("hosp_id").is_in(ds.patients["patient_id"].implode()))
    first, later = p.filter(pl.col("visit_index") == 0), p.filter(pl.col("visit_index") > 0)
    assert later.height == 2492 - 2149 == 343 and later["gap"].null_count() == 0
    bins = ds.meta["preprocessing"]["time_bins"]
    q = np.arange(1, 10) / 10
    np.testing.assert_allclose(bins["age_edges"], np.unique(np.quantile(first["age"].drop_nulls().to_numpy(), q)))
    gaps = later["gap"].clip(lower_bound=0).to_numpy()
    np.testing.assert_allclose(bins["gap_days_edges"], np.unique(np.quantile(gaps, q)), rtol=1e-8)
    expected = {}
    for pid, i, age, gap in p.select("hosp_id", "visit_index", "age", "gap").iter_rows():
        if i == 0:
            expected[(pid, i)] = set() if age is None else {
                f"time:age:{np.searchsorted(bins['age_edges'], age, 'right')}"}
        else:
            expected[(pid, i)] = {f"time:gap:{np.searchsorted(bins['gap_days_edges'], max(gap, 0), 'right')}"}
    time = {k: {t for t in v if t.startswith("time:")} for k, v in visit_tokens(ds).items()}
    assert time == expected
    info = ds.meta["counts"]["info"]
    assert info["time_age_unknown"] == first["age"].null_count() > 0
    assert info["time_gap_overlap_set_to_0"] == int((later["gap"] < 0).sum())


def test_demo_time_gaps_stop_at_hospital_stays(demo: PreparedDataset, eicu_demo: Path, tmp_path: Path) -> None:
    """By person, a stay that opens a later hospital stay cannot be timed (only its year is known)."""
    ds = prepare_eicu(eicu_demo, tmp_path / "t", lab_source="apache", n_lab_items=0, time_bins=10, progress=False)
    p = raw_stays().filter(pl.col("uniquepid").is_in(demo.patients["patient_id"].implode()))
    new_hospital_stays = p["patienthealthsystemstayid"].n_unique() - p["uniquepid"].n_unique()
    later = p.height - p["uniquepid"].n_unique()
    info = ds.meta["counts"]["info"]
    assert info["time_gap_undefined_new_episode"] == new_hospital_stays == 329
    gaps = [t for v in visit_tokens(ds).values() for t in v if t.startswith("time:gap:")]
    ages = [t for v in visit_tokens(ds).values() for t in v if t.startswith("time:age:")]
    assert len(gaps) == later - new_hospital_stays and len(ages) == 1818 - info["time_age_unknown"]


def test_demo_icu_readmission_matches_raw(eicu_demo: Path, tmp_path: Path) -> None:
    """eICU cannot time hospital readmissions; the outcome is an ICU readmission within the hospital stay."""
    ds = prepare_eicu(eicu_demo, tmp_path / "r", lab_source="apache", patient_unit="hospital-stay",
                      n_lab_items=0, outcome="readmission-30d", progress=False)
    p = hospital_stay_order(raw_stays())
    last = p.group_by("hosp_id", maintain_order=True).agg(pl.all().last(), n=pl.len())
    readmitted = last.filter(pl.col("gap") <= 30)
    died = last.filter(pl.col("gap").is_null() | (pl.col("gap") > 30), pl.col("unitdischargestatus") == "Expired")
    unknown = last.filter(pl.col("gap").is_null() | (pl.col("gap") > 30), pl.col("unitdischargestatus").is_null())
    assert (readmitted.height, died.height, unknown.height) == (280, 109, 0)
    assert set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == set(readmitted["hosp_id"])
    assert ds.n_patients == 2174 - 109
    d = ds.meta["counts"]["dropped"]
    assert (d["patients_died_at_index"], d["patients_without_outcome"], d["stays_readmission_after_index"]) == (
        109, 0, 280)
    assert ds.meta["outcome"] == "icu_readmission_30d"
    assert "ICU readmission" in ds.meta["preprocessing"]["outcome"]["rule"]
    assert ds.meta["counts"]["info"]["patients_hospital_death_after_index_stay_labelled_0"] == last.filter(
        pl.col("n") == 1, pl.col("hospitaldischargestatus") == "Expired", pl.col("unitdischargestatus") == "Alive"
    ).height + last.filter(pl.col("n") > 1, pl.col("gap") > 30, pl.col("hospitaldischargestatus") == "Expired",
                           pl.col("unitdischargestatus") == "Alive").height


def test_demo_long_stay_matches_raw(eicu_demo: Path, tmp_path: Path) -> None:
    ds = prepare_eicu(eicu_demo, tmp_path / "l", lab_source="apache", patient_unit="hospital-stay",
                      n_lab_items=0, outcome="long-stay", progress=False)
    p = raw_stays().with_columns(los=(pl.col("hospitaldischargeoffset") - pl.col("hospitaladmitoffset")) / 1440)
    long = set(p.filter(pl.col("los") > 7)["hosp_id"])
    assert len(long) == 627 and set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == long
    assert ds.n_patients == 2174 and ds.meta["outcome"] == "long_stay_7d"


def test_demo_long_stay_by_person_matches_raw(eicu_demo: Path, tmp_path: Path) -> None:
    """By person, the final stay (the documented order) decides: its hospital stay over 7 days."""
    ds = prepare_eicu(eicu_demo, tmp_path / "l", lab_source="apache", n_lab_items=0, outcome="long-stay",
                      progress=False)
    p = raw_stays().with_columns(los=(pl.col("hospitaldischargeoffset") - pl.col("hospitaladmitoffset")) / 1440,
                                 died=(pl.col("hospitaldischargestatus") == "Expired").fill_null(False),
                                 year=pl.col("hospitaldischargeyear").cast(pl.Int64))
    final = (p.sort("uniquepid", "year", "died", "patienthealthsystemstayid", -pl.col("hospitaladmitoffset"),
                    "unitvisitnumber", "patientunitstayid", nulls_last=True)
             .group_by("uniquepid", maintain_order=True).last())
    long = set(final.filter(pl.col("los") > 7)["uniquepid"])
    assert len(long) == 534 and set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == long
    assert ds.n_patients == 1841  # every stay has a length: nobody is dropped
    deaths = final.filter(pl.col("died")).height
    assert ds.meta["counts"]["info"]["patients_died_in_final_stays_labelled_by_length_of_stay"] == deaths


def test_demo_every_lab_tokens_equal_mean_on_apache(demo: PreparedDataset, eicu_demo: Path, tmp_path: Path) -> None:
    """apacheApsVar has one row per stay, so one value per (stay, variable): `every` changes nothing."""
    aps = raw("apacheApsVar")
    assert aps.height == aps["patientunitstayid"].n_unique() == 2205
    every = prepare_eicu(eicu_demo, tmp_path / "e", lab_source="apache", lab_tokens="every", progress=False)
    assert every.meta["preprocessing"]["labs"]["mode"] == "every"
    assert every.visits.equals(demo.visits) and every.vocab.equals(demo.vocab)
    strip = ("mode", "aggregate", "quantiles_of")
    assert ({k: v for k, v in every.meta["preprocessing"]["labs"].items() if k not in strip}
            == {k: v for k, v in demo.meta["preprocessing"]["labs"].items() if k not in strip})


def test_raw_lab_path_every_value(tmp_path: Path) -> None:
    """Stay 100's creatinine is 1.0 then 7.0: two tokens with `every`, one (its mean, 4) with `mean`."""
    root = write_fixture(tmp_path / "raw")
    write_gz(root / "lab.csv.gz", LAB_HEADER + "\n" + LAB_ROWS.replace("creatinine ,3.0,3.0", "creatinine ,7.0,7.0"))
    every = prepare_eicu(root, tmp_path / "every", n_lab_items=2, n_bins=2, lab_tokens="every", progress=False)
    # kept creatinine values 1, 7 (100), 4 (101), 6 (102), 8 (200): median 6; sodium 140, 150: 145
    assert [it["edges"] for it in every.meta["preprocessing"]["labs"]["items"]] == [[6.0], [145.0]]
    labs = {k: {t for t in v if t.startswith("lab:")} for k, v in visit_tokens(every).items()}
    assert labs == {("A", 0): {"lab:creatinine:1", "lab:creatinine:2", "lab:sodium:1"},
                    ("A", 1): {"lab:creatinine:1"}, ("A", 2): {"lab:creatinine:2", "lab:sodium:2"},
                    ("B", 0): {"lab:creatinine:2"}, ("D", 0): set()}
    mean = prepare_eicu(root, tmp_path / "mean", n_lab_items=2, n_bins=2, progress=False)
    assert {t for t in visit_tokens(mean)[("A", 0)] if t.startswith("lab:creatinine")} == {"lab:creatinine:1"}
    d = {k: v for k, v in every.meta["counts"]["dropped"].items() if k.startswith("lab_") and v}
    assert d == {k: v for k, v in mean.meta["counts"]["dropped"].items() if k.startswith("lab_") and v}
    assert every.meta["counts"]["info"]["lab_rows_used"] == mean.meta["counts"]["info"]["lab_rows_used"] == 7


def test_eicu_options_need_their_columns(tmp_path: Path) -> None:
    root = write_fixture(tmp_path / "raw")
    pl.DataFrame(STAYS, schema=dict.fromkeys(PATIENT_COLS, pl.String), orient="row").drop(
        "hospitaldischargeoffset").write_csv(root / "patient.csv")
    prepare_eicu(root, tmp_path / "ok", n_lab_items=0, progress=False)  # mortality does not read it
    with pytest.raises(DatasetError, match=r"patient\.csv, column 'hospitaldischargeoffset': required"):
        prepare_eicu(root, tmp_path / "x", n_lab_items=0, outcome="long-stay", progress=False)


def test_options_that_need_patient_columns_name_them(tmp_path: Path, capsys) -> None:
    """--patient-unit hospital-stay and --outcome long-stay on a patient table without the column they read, or
    without a single value in it: one line naming the file, the column, the option and the fix."""
    from data_prep.eicu import main

    root = write_fixture(tmp_path / "raw")  # hospitaldischargeoffset is empty on every stay
    base = ["--root", root, "--out", tmp_path / "out", "--n-lab-items", "0", "--quiet"]
    long_stay = ["--patient-unit", "hospital-stay", "--outcome", "long-stay"]
    fails_cleanly(main, base + long_stay, capsys, f"file {root / 'patient.csv'}", "column 'hospitaldischargeoffset'",
                  "no stay has a value; --outcome long-stay needs it",
                  "Fix: point --root at the unmodified eICU patient table (--outcome long-stay reads "
                  "hospitaldischargeoffset), or prepare without --outcome long-stay")
    pat = pl.read_csv(root / "patient.csv", infer_schema=False)
    pat.drop("hospitaldischargeoffset").write_csv(root / "patient.csv")
    fails_cleanly(main, base + long_stay, capsys, "column 'hospitaldischargeoffset'", "are missing",
                  "--outcome long-stay reads hospitaldischargeoffset", "--patient-unit hospital-stay reads "
                  "patienthealthsystemstayid")
    pat.with_columns(patienthealthsystemstayid=pl.lit(None, pl.String)).write_csv(root / "patient.csv")
    fails_cleanly(main, base + ["--patient-unit", "hospital-stay"], capsys, "column 'patienthealthsystemstayid'",
                  "no stay has a value; --patient-unit hospital-stay needs it")
    pat.with_columns(hospitaldischargestatus=pl.lit(None, pl.String)).write_csv(root / "patient.csv")
    fails_cleanly(main, base, capsys, "no patient is left to prepare; dropped: ", "patients_without_outcome 4",
                  "Fix: check the input tables")
    assert not (tmp_path / "out").exists()
