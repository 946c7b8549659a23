"""MIMIC-IV preprocessing: the real demo's facts, every rule on a hand-made cohort, and bad input."""

from __future__ import annotations

import functools
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import MIMIC_DEMO, REPO, require, visit_tokens
from data_prep.mimic_iv import prepare_mimic_iv
from halo_balance import PreparedDataset
from halo_balance.errors import DatasetError, OutputExistsError

HOSP = MIMIC_DEMO / "hosp"


# ---------------------------------------------------------------------- the real demo
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("mimic") / "prepared"
    prepare_mimic_iv(require(MIMIC_DEMO), out, progress=False)
    return PreparedDataset.load(out)


def read(name: str, **kw) -> pl.DataFrame:
    return pl.read_csv(HOSP / f"{name}.csv.gz", infer_schema_length=None, **kw)


def tokens_by_visit(ds: PreparedDataset) -> pl.DataFrame:
    """(patient_id, visit_index, token) for every token of every visit."""
    return (ds.visits.select("patient_id", "visit_index", "codes").explode("codes")
            .drop_nulls("codes").join(ds.vocab.select(codes="id", token="token"), on="codes").drop("codes"))


def hadm_of_visits(ds: PreparedDataset) -> pl.DataFrame:
    """(patient_id, visit_index, hadm_id): admissions in admittime order, as the rules say."""
    adm = read("admissions", try_parse_dates=True).sort("subject_id", "admittime", "hadm_id")
    return adm.select(patient_id=pl.col("subject_id").cast(pl.String), hadm_id="hadm_id",
                      visit_index=pl.int_range(pl.len()).over("subject_id").cast(pl.Int32))


def test_demo_counts(demo: PreparedDataset) -> None:
    assert demo.n_patients == 100
    assert demo.n_visits == 275  # every admission kept
    assert int(demo.patients["label"].sum()) == 15
    dropped = demo.meta["counts"]["dropped"]
    assert {k: v for k, v in dropped.items() if k.startswith(("patients_", "admissions_")) and v} == {}
    assert demo.meta["counts"]["rows_read"] == {"patients": 100, "admissions": 275, "diagnoses_icd": 4506,
                                                "labevents": 107727}


def test_demo_positives_are_final_admission_deaths(demo: PreparedDataset) -> None:
    """The 15 admissions with hospital_expire_flag = 1 are all final admissions: 15 positive patients."""
    adm = read("admissions", try_parse_dates=True).sort("subject_id", "admittime")
    last = adm.group_by("subject_id").agg(pl.col("hospital_expire_flag").last())
    assert adm["hospital_expire_flag"].sum() == 15 == last["hospital_expire_flag"].sum()
    expected = set(last.filter(pl.col("hospital_expire_flag") == 1)["subject_id"].cast(pl.String))
    assert set(demo.patients.filter(pl.col("label") == 1)["patient_id"]) == expected
    final = demo.visits.filter(pl.col("visit_index") == pl.col("visit_index").max().over("patient_id"))
    assert final.filter(pl.col("label") == 1).height == 15
    assert demo.visits.filter(pl.col("label") == 1).height == 15  # never on an earlier visit


def test_demo_diagnosis_tokens_match_raw(demo: PreparedDataset) -> None:
    dx = read("diagnoses_icd", schema_overrides={"icd_code": pl.String})
    cat = [c[:4] if v == 9 and c.startswith("E") else c[:3] for c, v in zip(dx["icd_code"], dx["icd_version"])]
    raw = (dx.with_columns(token=pl.Series([f"dx{v}:{c}" for v, c in zip(dx["icd_version"], cat)]))
           .join(hadm_of_visits(demo), on="hadm_id").select("patient_id", "visit_index", "token").unique())
    ours = tokens_by_visit(demo).filter(pl.col("token").str.starts_with("dx"))
    assert ours.height == raw.height > 3000
    assert ours.join(raw, on=["patient_id", "visit_index", "token"], how="anti").height == 0
    assert {"dx9:428", "dx10:I50", "dx9:E849"} <= set(demo.vocab["token"])


def test_demo_diagnosis_descriptions(demo: PreparedDataset) -> None:
    desc = dict(demo.vocab.select("token", "description").iter_rows())
    assert desc["dx10:I50"] == "Heart failure"  # the category is listed in d_icd_diagnoses
    assert desc["dx9:428"].startswith("Congestive heart failure")  # the first code's title, 4280
    assert "codes in 428" in desc["dx9:428"]
    assert set(demo.vocab["kind"]) == {"diagnosis", "lab"}


@functools.cache
def lab_rows_in_admissions() -> pl.DataFrame:
    """Every labevents row that belongs to an admission: by hadm_id, or (the demo's admissions never
    overlap) the admission whose admittime..dischtime holds its charttime."""
    lab = pl.read_csv(HOSP / "labevents.csv.gz", columns=["subject_id", "hadm_id", "itemid", "charttime", "valuenum"],
                      schema_overrides={"valuenum": pl.Float64}).with_columns(pl.col("charttime").str.to_datetime())
    adm = read("admissions", try_parse_dates=True).select("subject_id", "hadm_id", "admittime", "dischtime")
    attached = (lab.filter(pl.col("hadm_id").is_null()).drop("hadm_id").join(adm, on="subject_id")
                .filter(pl.col("charttime").is_between(pl.col("admittime"), pl.col("dischtime"))))
    return pl.concat([lab.filter(pl.col("hadm_id").is_not_null()).select("hadm_id", "itemid", "valuenum"),
                      attached.select("hadm_id", "itemid", "valuenum")])


def raw_lab_means() -> pl.DataFrame:
    """Per (hadm_id, itemid): mean valuenum and the number of numeric rows."""
    return (lab_rows_in_admissions().filter(pl.col("valuenum").is_not_null())
            .group_by("hadm_id", "itemid").agg(mean=pl.col("valuenum").mean(), n=pl.len()))


def expected_bins(edges: list[float], means: np.ndarray) -> np.ndarray:
    """1-based bins (a value on an edge goes up); means within 1e-8 (relative) of an edge count as
    on it, since the preprocessor rounds means and edges to 9 significant digits."""
    e = np.asarray(edges)
    near = np.isclose(means[:, None], e[None, :], rtol=1e-8, atol=0)
    return (means[:, None] >= e[None, :]).sum(axis=1) + (near & (means[:, None] < e[None, :])).sum(axis=1) + 1


def test_demo_lab_items_and_bins_match_raw(demo: PreparedDataset) -> None:
    labs = demo.meta["preprocessing"]["labs"]
    assert labs["n_items"] == 50 and labs["aggregate"] == "mean" and labs["n_bins"] == 10
    means = raw_lab_means()
    per_item = means.group_by("itemid").agg(pl.col("n").sum()).sort("n", descending=True)
    assert [it["rows"] for it in labs["items"]] == per_item["n"].head(50).to_list()
    assert {int(it["item"]) for it in labs["items"]} <= set(per_item["itemid"].head(51))
    ours = (tokens_by_visit(demo).filter(pl.col("token").str.starts_with("lab:"))
            .with_columns(pl.col("token").str.split(":").list.to_struct(fields=["_", "itemid", "bin"]))
            .unnest("token").select("patient_id", "visit_index", pl.col("itemid").cast(pl.Int64),
                                    pl.col("bin").cast(pl.Int64))
            .join(hadm_of_visits(demo), on=["patient_id", "visit_index"]))
    checked = 0
    for it in labs["items"]:
        m = means.filter(pl.col("itemid") == int(it["item"]))
        edges = np.unique(np.quantile(m["mean"].to_numpy(), np.arange(1, 10) / 10))
        np.testing.assert_allclose(it["edges"], edges, rtol=1e-8)
        got = ours.filter(pl.col("itemid") == int(it["item"])).join(m, on=["hadm_id", "itemid"], how="full")
        assert got["bin"].null_count() == 0 and got["mean"].null_count() == 0  # same (admission, item) pairs
        np.testing.assert_array_equal(got["bin"].to_numpy(), expected_bins(it["edges"], got["mean"].to_numpy()))
        checked += got.height
    assert checked > 5000


def test_demo_lab_rows_reconcile(demo: PreparedDataset) -> None:
    c = demo.meta["counts"]
    lab_drops = {k: v for k, v in c["dropped"].items() if k.startswith("labevents_")}
    assert sum(lab_drops.values()) + c["info"]["labevents_rows_used"] == 107727
    assert c["info"]["labevents_attached_by_charttime"] == 796  # of 28,420 rows without hadm_id
    assert lab_drops["labevents_no_admission_match"] == 28420 - 796
    rows = lab_rows_in_admissions()
    assert rows.height == 107727 - 28420 + 796
    assert lab_drops["labevents_no_numeric_value"] == rows["valuenum"].null_count()
    assert lab_drops["labevents_not_a_number"] == 0


def test_demo_groups(demo: PreparedDataset) -> None:
    g = demo.meta["groups"]
    assert g["insurance"] == ["Medicare", "Medicaid", "Other"]
    assert g["race"] == ["White", "Black", "Hispanic", "Other"]
    p = demo.patients
    pts = read("patients")
    assert p.filter(pl.col("gender") == "M").height == pts.filter(pl.col("gender") == "M").height == 57
    ages = pts.select(pl.col("subject_id").cast(pl.String).alias("patient_id"), "anchor_age")
    joined = p.join(ages, on="patient_id")
    assert joined.filter(pl.col("age_group") == "80+")["anchor_age"].min() >= 80
    assert joined.filter(pl.col("age_group") == "18-44")["anchor_age"].max() < 45
    race = dict(p.select("patient_id", "race").iter_rows())
    assert race["10035631"] == "White"  # WHITE, then UNKNOWN: the most recent known race
    assert race["10037928"] == "Hispanic"
    assert demo.meta["preprocessing"]["race_map"]["PORTUGUESE"]["group"] == "White"


def test_demo_bins_from_reuses_edges_and_vocab(demo: PreparedDataset, tmp_path: Path) -> None:
    first = tmp_path / "first"
    demo.save(first)
    again = prepare_mimic_iv(MIMIC_DEMO, tmp_path / "again", bins_from=first, n_bins=4, progress=False)
    assert again.vocab.equals(demo.vocab)
    assert again.meta["preprocessing"]["labs"]["items"] == demo.meta["preprocessing"]["labs"]["items"]
    assert again.visits.equals(demo.visits)
    ids = demo.patients["patient_id"].to_list()
    assert PreparedDataset.concat([demo.select(ids[:50]), again.select(ids[50:])]).validate().n_patients == 100


def test_demo_max_visits_keeps_most_recent(demo: PreparedDataset, tmp_path: Path) -> None:
    ds = prepare_mimic_iv(MIMIC_DEMO, tmp_path / "one", max_visits=1, n_lab_items=0, progress=False)
    assert ds.n_visits == 100 and ds.meta["counts"]["dropped"]["admissions_beyond_max_visits"] == 175
    assert int(ds.patients["label"].sum()) == 15  # the final admission is always kept
    assert set(ds.vocab["kind"]) == {"diagnosis"} and "labevents" not in ds.meta["preprocessing"]["tables"]


# ---------------------------------------------------------------------- a hand-made cohort
def write_table(folder: Path, name: str, rows: list[dict], *, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    df = pl.DataFrame(rows, schema={k: pl.String for k in rows[0]}, orient="row")
    path = folder / f"{name}.csv{'.gz' if gz else ''}"
    data = df.write_csv().encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


PATIENTS = [
    {"subject_id": "1", "gender": "F", "anchor_age": "30"},
    {"subject_id": "2", "gender": "M", "anchor_age": "70"},
    {"subject_id": "3", "gender": "F", "anchor_age": "85"},
    {"subject_id": "4", "gender": "M", "anchor_age": "50"},  # no admission
    {"subject_id": "5", "gender": "F", "anchor_age": "60"},  # final outcome missing
]


def adm(s, h, a, d, flag, race, ins):
    return {"subject_id": s, "hadm_id": h, "admittime": a, "dischtime": d, "deathtime": "",
            "insurance": ins, "race": race, "hospital_expire_flag": flag}


ADMISSIONS = [
    adm("1", "11", "2100-01-01 00:00:00", "2100-01-05 00:00:00", "0", "WHITE", "Private"),
    adm("1", "12", "2100-02-01 00:00:00", "2100-02-10 00:00:00", "1", "UNKNOWN", "Medicaid"),
    adm("2", "21", "2100-03-01 00:00:00", "2100-03-05 00:00:00", "0", "PORTUGUESE", "Medicare"),
    adm("2", "22", "2100-03-04 00:00:00", "2100-03-08 00:00:00", "0", "PORTUGUESE", "Medicare"),
    adm("3", "31", "2100-01-01 00:00:00", "2100-01-02 00:00:00", "0", "HISPANIC/LATINO - CUBAN", "No charge"),
    adm("5", "51", "2100-01-01 00:00:00", "2100-01-03 00:00:00", "", "ASIAN", "Medicare"),
    adm("9", "91", "2100-01-01 00:00:00", "2100-01-03 00:00:00", "0", "WHITE", "Medicare"),  # unknown subject
]


def dx(s, h, code, ver):
    return {"subject_id": s, "hadm_id": h, "seq_num": "1", "icd_code": code, "icd_version": ver}


DIAGNOSES = [dx("1", "11", "4280", "9"), dx("1", "11", "42821", "9"), dx("1", "11", "E8497", "9"),
             dx("1", "12", "I5023", "10"), dx("1", "12", "E119", "10"), dx("2", "21", "V707", "9"),
             dx("2", "22", "", "9"), dx("3", "31", "4019", "x"), dx("1", "99", "4280", "9")]


def lab(s, h, item, t, v):
    return {"labevent_id": "0", "subject_id": s, "hadm_id": h, "itemid": item, "charttime": t,
            "value": v, "valuenum": v, "valueuom": "mg/dL"}


LABS = [
    lab("1", "11", "50912", "2100-01-02 00:00:00", "1.0"), lab("1", "11", "50912", "2100-01-03 00:00:00", "3.0"),
    lab("1", "11", "50971", "2100-01-02 00:00:00", "4.0"),
    lab("1", "12", "50912", "2100-02-02 00:00:00", "5.0"), lab("1", "12", "50971", "2100-02-02 00:00:00", "abc"),
    lab("1", "12", "50971", "2100-02-03 00:00:00", ""),
    lab("2", "", "50912", "2100-03-04 12:00:00", "7.0"),  # inside 21 and 22: the later admission, 22
    lab("2", "", "50912", "2100-03-02 00:00:00", "9.0"),  # inside 21 only
    lab("1", "", "50912", "2100-06-01 00:00:00", "2.0"),  # no admission then
    lab("2", "", "50912", "garbage", "2.0"),
    lab("3", "31", "51000", "2100-01-01 10:00:00", "1.0"),  # third item: not among the top 2
    lab("9", "91", "50912", "2100-01-02 00:00:00", "1.0"),  # admission of an unknown subject
    lab("1", "77", "50912", "2100-01-02 00:00:00", "1.0"),  # no such admission
]


def write_mini(root: Path, **replace: list[dict]) -> Path:
    tables = {"patients": PATIENTS, "admissions": ADMISSIONS, "diagnoses_icd": DIAGNOSES, "labevents": LABS}
    for name, rows in {**tables, **replace}.items():
        write_table(root / "hosp", name, rows)
    return root


@pytest.fixture
def mini(tmp_path: Path) -> PreparedDataset:
    return prepare_mimic_iv(write_mini(tmp_path / "raw"), tmp_path / "out", n_lab_items=2, n_bins=2,
                            progress=False)


def test_mini_visits_labels_and_tokens(mini: PreparedDataset) -> None:
    assert mini.patients["patient_id"].to_list() == ["1", "2", "3"]
    assert mini.patients["label"].to_list() == [1, 0, 0]
    assert mini.visits.filter(pl.col("label") == 1).select("patient_id", "visit_index").row(0) == ("1", 1)
    # creatinine admission means 2, 5, 7 (h22), 9 (h21): median edge 6; potassium only 4.0: edge 4
    assert mini.meta["preprocessing"]["labs"]["items"][0]["edges"] == [6.0]
    assert mini.meta["preprocessing"]["labs"]["items"][1]["edges"] == [4.0]
    assert visit_tokens(mini) == {
        ("1", 0): {"dx9:428", "dx9:E849", "lab:50912:1", "lab:50971:2"},
        ("1", 1): {"dx10:I50", "dx10:E11", "lab:50912:1"},
        ("2", 0): {"dx9:V70", "lab:50912:2"},
        ("2", 1): {"lab:50912:2"},
        ("3", 0): set(),
    }


def test_mini_drops_are_counted(mini: PreparedDataset) -> None:
    c = mini.meta["counts"]
    d = {k: v for k, v in c["dropped"].items() if v}
    assert d == {
        "patients_without_outcome": 1, "admissions_of_patients_without_outcome": 1,
        "patients_without_admissions": 1, "admissions_unknown_subject": 1,
        "diagnoses_icd_missing_code": 1, "diagnoses_icd_bad_version": 1, "diagnoses_icd_unknown_admission": 1,
        "labevents_no_admission_match": 1, "labevents_no_hadm_id_bad_charttime": 1,
        "labevents_not_a_number": 1, "labevents_no_numeric_value": 1, "labevents_item_not_selected": 1,
        "labevents_admission_unknown_subject": 1, "labevents_unknown_admission": 1,
    }
    assert c["info"]["labevents_attached_by_charttime"] == 2
    assert sum(v for k, v in d.items() if k.startswith("labevents_")) + c["info"]["labevents_rows_used"] == len(LABS)


def test_mini_groups(mini: PreparedDataset) -> None:
    p = {r["patient_id"]: r for r in mini.patients.iter_rows(named=True)}
    assert (p["1"]["race"], p["1"]["insurance"], p["1"]["age_group"]) == ("White", "Medicaid", "18-44")
    assert (p["2"]["race"], p["2"]["insurance"], p["2"]["age_group"]) == ("White", "Medicare", "65-79")
    assert (p["3"]["race"], p["3"]["insurance"], p["3"]["age_group"]) == ("Hispanic", "Other", "80+")
    assert mini.meta["groups"]["insurance"] == ["Medicare", "Medicaid", "Other"]


def test_mini_death_before_final_admission_is_reported(tmp_path: Path) -> None:
    rows = [dict(a) for a in ADMISSIONS]
    rows[0]["hospital_expire_flag"] = "1"
    ds = prepare_mimic_iv(write_mini(tmp_path / "raw", admissions=rows), tmp_path / "out", n_lab_items=0,
                          progress=False)
    assert ds.meta["counts"]["info"]["patients_death_before_final_admission"] == 1
    assert ds.visits.filter(pl.col("label") == 1).height == 1


def test_mini_plain_csv_and_hosp_folder(tmp_path: Path) -> None:
    hosp = tmp_path / "flat"
    for name, rows in {"patients": PATIENTS, "admissions": ADMISSIONS, "diagnoses_icd": DIAGNOSES}.items():
        write_table(hosp, name, rows, gz=False)
    ds = prepare_mimic_iv(hosp, tmp_path / "out", n_lab_items=0, progress=False)
    assert ds.n_patients == 3


# ---------------------------------------------------------------------- bad input
def test_output_exists_is_an_error(mini: PreparedDataset, tmp_path: Path) -> None:
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_mimic_iv(tmp_path / "raw", tmp_path / "out", progress=False)


def test_missing_table(tmp_path: Path) -> None:
    root = write_mini(tmp_path / "raw")
    (root / "hosp" / "labevents.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"labevents.*--n-lab-items 0"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_column(tmp_path: Path) -> None:
    root = write_mini(tmp_path / "raw", admissions=[{k: v for k, v in a.items() if k != "race"} for a in ADMISSIONS])
    with pytest.raises(DatasetError, match=r"admissions\.csv\.gz, column 'race': required column"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)


def test_truncated_gzip(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    shutil.copytree(require(MIMIC_DEMO) / "hosp", root / "hosp",
                    ignore=shutil.ignore_patterns("d_*", "emar*", "poe*", "pharmacy*", "prescriptions*"))
    lab = root / "hosp" / "labevents.csv.gz"
    lab.write_bytes(lab.read_bytes()[: lab.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"labevents\.csv\.gz.*truncated or corrupt.*gzip -t"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [root]


def test_not_gzip(tmp_path: Path) -> None:
    root = write_mini(tmp_path / "raw")
    (root / "hosp" / "patients.csv.gz").write_bytes(b"subject_id,gender,anchor_age\n1,F,30\n")
    with pytest.raises(DatasetError, match="not a gzip file"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)


def test_empty_table(tmp_path: Path) -> None:
    root = write_mini(tmp_path / "raw")
    (root / "hosp" / "admissions.csv.gz").write_bytes(gzip.compress(b",".join(
        k.encode() for k in ADMISSIONS[0]) + b"\n"))
    with pytest.raises(DatasetError, match="header but no rows"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)


def test_mostly_non_numeric_values_are_an_error(tmp_path: Path) -> None:
    rows = [dict(r, valuenum="1,5") for r in LABS]
    root = write_mini(tmp_path / "raw", labevents=rows)
    with pytest.raises(DatasetError, match=r"column 'valuenum'.*not numbers.*'1,5'"):
        prepare_mimic_iv(root, tmp_path / "out", progress=False)


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "data_prep.mimic_iv", "--root", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "out"), "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "nowhere" in r.stderr


# ---------------------------------------------------------------------- the simulator's output
def test_simulated_cohort_prepares_completely(sim_prepared: Path) -> None:
    ds = PreparedDataset.load(sim_prepared)
    hosp = sim_prepared.parent / "raw" / "hosp"
    adm = pl.read_csv(hosp / "admissions.csv.gz", try_parse_dates=True).sort("subject_id", "admittime")
    final = adm.group_by("subject_id").agg(pl.col("hospital_expire_flag").last())
    assert ds.n_patients == 600 == final.height and ds.n_visits == adm.height
    assert int(ds.patients["label"].sum()) == int(final["hospital_expire_flag"].sum()) > 20
    assert ds.meta["groups"]["insurance"] == ["Medicare", "Medicaid", "Private", "Other"]
    assert ds.meta["groups"]["race"] == ["White", "Black", "Hispanic", "Asian", "Other"]
    c = ds.meta["counts"]
    assert c["info"]["labevents_attached_by_charttime"] > 0
    assert sum(v for k, v in c["dropped"].items() if k.startswith("labevents_")) + c["info"][
        "labevents_rows_used"] == c["rows_read"]["labevents"]
