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
    again = prepare_mimic_iv(MIMIC_DEMO, tmp_path / "again", bins_from=first, n_bins=10, progress=False)
    assert again.vocab.equals(demo.vocab)  # the reference's own --n-bins given again is fine
    assert again.meta["preprocessing"]["labs"]["items"] == demo.meta["preprocessing"]["labs"]["items"]
    assert again.visits.equals(demo.visits)
    ids = demo.patients["patient_id"].to_list()
    assert PreparedDataset.concat([demo.select(ids[:50]), again.select(ids[50:])]).validate().n_patients == 100


def test_demo_max_visits_keeps_most_recent(demo: PreparedDataset, tmp_path: Path) -> None:
    ds = prepare_mimic_iv(MIMIC_DEMO, tmp_path / "one", max_visits=1, n_lab_items=0, progress=False)
    assert ds.n_visits == 100 and ds.meta["counts"]["dropped"]["admissions_beyond_max_visits"] == 175
    assert int(ds.patients["label"].sum()) == 15  # the final admission is always kept
    assert set(ds.vocab["kind"]) == {"diagnosis"} and "labevents" not in ds.meta["preprocessing"]["tables"]


# ---------------------------------------------------------------------- time tokens, every lab value, outcomes
@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """The demo with time tokens (deciles) and a lab token for every bin a measurement touched."""
    out = tmp_path_factory.mktemp("mimic_rich") / "prepared"
    prepare_mimic_iv(require(MIMIC_DEMO), out, time_bins=10, lab_tokens="every", progress=False)
    return PreparedDataset.load(out)


def raw_timeline() -> pl.DataFrame:
    """Admissions in order with visit_index, the age at the first one and the gap (days) since the last."""
    adm = read("admissions", try_parse_dates=True).sort("subject_id", "admittime", "hadm_id")
    pts = read("patients").select("subject_id", "anchor_age", "anchor_year")
    return adm.join(pts, on="subject_id").select(
        patient_id=pl.col("subject_id").cast(pl.String),
        visit_index=pl.int_range(pl.len()).over("subject_id").cast(pl.Int32),
        age=(pl.col("anchor_age") + pl.col("admittime").dt.year() - pl.col("anchor_year")).cast(pl.Float64),
        gap=((pl.col("admittime") - pl.col("dischtime").shift(1).over("subject_id")).dt.total_seconds() / 86400)
        .clip(lower_bound=0))


def test_demo_time_tokens_match_raw(rich: PreparedDataset) -> None:
    """One age token on each first visit, one gap token on each later visit, bins from the deciles."""
    bins = rich.meta["preprocessing"]["time_bins"]
    assert bins["n_bins"] == 10 and rich.meta["preprocessing"]["parameters"]["time_bins"] == 10
    raw = raw_timeline()
    first, later = raw.filter(pl.col("visit_index") == 0), raw.filter(pl.col("visit_index") > 0)
    assert first.height == 100 and later.height == 175
    q = np.arange(1, 10) / 10
    for values, edges in ((first["age"], bins["age_edges"]), (later["gap"], bins["gap_days_edges"])):
        np.testing.assert_allclose(edges, np.unique(np.quantile(values.to_numpy(), q)), rtol=1e-8)
        assert len(edges) >= 8  # deciles, few ties
    time = {k: {t for t in v if t.startswith("time:")} for k, v in visit_tokens(rich).items()}
    expected = {}
    for (pid, i, age, gap) in raw.select("patient_id", "visit_index", "age", "gap").iter_rows():
        name, value, edges = ("age", age, bins["age_edges"]) if i == 0 else ("gap", gap, bins["gap_days_edges"])
        expected[(pid, i)] = {f"time:{name}:{expected_bins(edges, np.array([value]))[0] - 1}"}
    assert time == expected
    counts = pl.Series([t.split(":")[2] for v in time.values() for t in v if t.startswith("time:gap")]).value_counts()
    assert counts.height == 10 and counts["count"].min() >= 10  # every decile bin is used
    vocab = rich.vocab.filter(pl.col("kind") == "time")
    assert vocab.height == 20 and vocab["token"].to_list()[:2] == ["time:age:0", "time:age:1"]


def test_demo_every_lab_tokens_match_raw(rich: PreparedDataset, demo: PreparedDataset) -> None:
    """A visit holds a token for every bin its measurements touched; edges are deciles of all values."""
    labs = rich.meta["preprocessing"]["labs"]
    assert labs["mode"] == "every" and labs["quantiles_of"] == "measurements"
    mean_items = demo.meta["preprocessing"]["labs"]["items"]
    assert [(it["item"], it["rows"]) for it in labs["items"]] == [(it["item"], it["rows"]) for it in mean_items]
    rows = lab_rows_in_admissions().drop_nulls("valuenum")
    expect: dict[tuple[int, str], set[str]] = {}
    q = np.arange(1, 10) / 10
    for it in labs["items"]:
        values = rows.filter(pl.col("itemid") == int(it["item"]))
        np.testing.assert_allclose(it["edges"], np.unique(np.quantile(values["valuenum"].to_numpy(), q)), rtol=1e-8)
        bins = expected_bins(it["edges"], values["valuenum"].to_numpy())
        for hadm, b in zip(values["hadm_id"], bins):
            expect.setdefault((hadm, it["item"]), set()).add(f"lab:{it['item']}:{b}")
    visits = hadm_of_visits(rich)
    hadm = dict(zip(zip(visits["patient_id"], visits["visit_index"]), visits["hadm_id"]))
    ours: dict[tuple[int, str], set[str]] = {}
    for key, tokens in visit_tokens(rich).items():
        for t in tokens:
            if t.startswith("lab:"):
                ours.setdefault((hadm[key], t.split(":")[1]), set()).add(t)
    assert ours == expect
    several = {k: v for k, v in ours.items() if len(v) > 1}
    assert len(several) > 1000  # labs that rose and fell: several tokens of one item in one admission
    # one admission in detail: potassium (50971) of hadm 20626031, every value and its decile
    k = rows.filter(pl.col("hadm_id") == 20626031, pl.col("itemid") == 50971)["valuenum"].to_list()
    edges = next(it["edges"] for it in labs["items"] if it["item"] == "50971")
    assert len(k) >= 3 and ours[(20626031, "50971")] == {f"lab:50971:{np.searchsorted(edges, v, 'right') + 1}"
                                                           for v in k}


def raw_final_admissions() -> pl.DataFrame:
    """Each subject's last admission, the gap (days) since the one before it and the count."""
    adm = read("admissions", try_parse_dates=True).sort("subject_id", "admittime", "hadm_id")
    adm = adm.with_columns(
        gap=(pl.col("admittime") - pl.col("dischtime").shift(1).over("subject_id")).dt.total_seconds() / 86400,
        los=(pl.col("dischtime") - pl.col("admittime")).dt.total_seconds() / 86400)
    return adm.group_by("subject_id", maintain_order=True).agg(pl.all().last(), n=pl.len()).with_columns(
        patient_id=pl.col("subject_id").cast(pl.String))


def test_demo_readmission_outcome_matches_raw(tmp_path: Path) -> None:
    ds = prepare_mimic_iv(require(MIMIC_DEMO), tmp_path / "r", outcome="readmission-30d", n_lab_items=0,
                          progress=False)
    final = raw_final_admissions()
    readmitted = final.filter(pl.col("gap") <= 30)
    died = final.filter(~pl.col("patient_id").is_in(readmitted["patient_id"].implode()),
                        pl.col("hospital_expire_flag") == 1)
    assert (readmitted.height, died.height) == (16, 14)
    assert set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == set(readmitted["patient_id"])
    assert ds.n_patients == 100 - 14 and not set(died["patient_id"]) & set(ds.patients["patient_id"])
    d = ds.meta["counts"]["dropped"]
    assert d["patients_died_at_index"] == 14 and d["admissions_of_patients_died_at_index"] == died["n"].sum()
    assert d["admissions_readmission_after_index"] == 16  # the readmissions themselves are left out
    n_visits = dict(ds.visits.group_by("patient_id").len().iter_rows())
    assert all(n_visits[p] == n - 1 for p, n in readmitted.select("patient_id", "n").iter_rows())
    assert ds.meta["outcome"] == "readmission_30d" and ds.meta["preprocessing"]["outcome"]["window_days"] == 30
    assert ds.visits.filter(pl.col("label") == 1).height == 16
    # 15 in-hospital deaths: 14 dropped at the index, one is itself the readmission of a positive patient
    assert readmitted.filter(pl.col("hospital_expire_flag") == 1).height == 1
    # deaths within 30 days of the index discharge without a readmission are labelled 0, and counted
    dod = read("patients", try_parse_dates=True).select(patient_id=pl.col("subject_id").cast(pl.String), dod="dod")
    soon = final.filter(~(pl.col("gap") <= 30).fill_null(False), pl.col("hospital_expire_flag") == 0).join(
        dod, on="patient_id").filter((pl.col("dod") - pl.col("dischtime").dt.date()).dt.total_days() <= 30)
    assert ds.meta["counts"]["info"]["patients_died_within_30_days_of_index_discharge_labelled_0"] == soon.height == 3
    assert set(soon["patient_id"]) <= set(ds.patients.filter(pl.col("label") == 0)["patient_id"])


def test_demo_long_stay_outcome_matches_raw(tmp_path: Path) -> None:
    ds = prepare_mimic_iv(require(MIMIC_DEMO), tmp_path / "l", outcome="long-stay", n_lab_items=0, progress=False)
    final = raw_final_admissions()
    long = set(final.filter(pl.col("los") > 7)["patient_id"])
    assert len(long) == 35 and set(ds.patients.filter(pl.col("label") == 1)["patient_id"]) == long
    assert ds.n_patients == 100 and ds.meta["outcome"] == "long_stay_7d"
    deaths = final.filter(pl.col("hospital_expire_flag") == 1).height
    assert ds.meta["counts"]["info"]["patients_died_in_final_admissions_labelled_by_length_of_stay"] == deaths == 15


def test_demo_bins_from_reuses_time_bins_and_lab_mode(rich: PreparedDataset, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    rich.save(ref)
    again = prepare_mimic_iv(MIMIC_DEMO, tmp_path / "again", bins_from=ref, progress=False)
    assert again.meta["preprocessing"]["time_bins"] == rich.meta["preprocessing"]["time_bins"]
    assert again.meta["preprocessing"]["labs"]["mode"] == "every"
    assert again.vocab.equals(rich.vocab) and again.visits.equals(rich.visits)
    with pytest.raises(DatasetError, match=r"--lab-tokens mean differs from the --bins-from folder's every"):
        prepare_mimic_iv(MIMIC_DEMO, tmp_path / "x", bins_from=ref, lab_tokens="mean", progress=False)
    with pytest.raises(DatasetError, match=r"--time-bins 5 differs .* 10.*leave --time-bins out"):
        prepare_mimic_iv(MIMIC_DEMO, tmp_path / "x", bins_from=ref, time_bins=5, progress=False)
    with pytest.raises(DatasetError, match=r"--n-bins 4 differs from the --bins-from folder's 10.*leave --n-bins out"):
        prepare_mimic_iv(MIMIC_DEMO, tmp_path / "x", bins_from=ref, n_bins=4, progress=False)
    assert not (tmp_path / "x").exists()


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


def test_mini_time_tokens(tmp_path: Path) -> None:
    """Ages 30, 70, 85 at the first visits: median edge 70; gaps 27 days and an overlap (0): edge 13.5."""
    pats = [dict(p, anchor_year="2100") for p in PATIENTS]
    ds = prepare_mimic_iv(write_mini(tmp_path / "raw", patients=pats), tmp_path / "out", n_lab_items=0, time_bins=2,
                          progress=False)
    assert ds.meta["preprocessing"]["time_bins"] == {"n_bins": 2, "age_edges": [70.0], "gap_days_edges": [13.5]}
    time = {k: {t for t in v if t.startswith("time:")} for k, v in visit_tokens(ds).items()}
    assert time == {("1", 0): {"time:age:0"}, ("1", 1): {"time:gap:1"}, ("2", 0): {"time:age:1"},
                    ("2", 1): {"time:gap:0"}, ("3", 0): {"time:age:1"}}
    assert ds.meta["counts"]["info"]["time_gap_overlap_set_to_0"] == 1
    with pytest.raises(DatasetError, match=r"patients\.csv\.gz, column 'anchor_year'.*--time-bins 0"):
        prepare_mimic_iv(write_mini(tmp_path / "raw2"), tmp_path / "out2", n_lab_items=0, time_bins=2, progress=False)


def test_mini_readmission(tmp_path: Path) -> None:
    """Patient 1 is readmitted 27 days after the first discharge (and dies there), patient 2 while the
    first admission still runs: both end at their first admission with 1; patient 3 has one admission."""
    ds = prepare_mimic_iv(write_mini(tmp_path / "raw"), tmp_path / "out", n_lab_items=0, outcome="readmission-30d",
                          progress=False)
    assert ds.patients.select("patient_id", "label").rows() == [("1", 1), ("2", 1), ("3", 0)]
    assert visit_tokens(ds) == {("1", 0): {"dx9:428", "dx9:E849"}, ("2", 0): {"dx9:V70"}, ("3", 0): set()}
    d = {k: v for k, v in ds.meta["counts"]["dropped"].items() if v and not k.startswith("diagnoses")}
    assert d == {"admissions_readmission_after_index": 2, "patients_without_outcome": 1,
                 "admissions_of_patients_without_outcome": 1, "patients_without_admissions": 1,
                 "admissions_unknown_subject": 1}
    assert ds.meta["counts"]["dropped"]["diagnoses_icd_admission_after_index"] == 2
    rows = [dict(a) for a in ADMISSIONS]
    rows[1]["admittime"] = "2100-03-01 00:00:00"  # 55 days after the first discharge: not a readmission
    rows[1]["dischtime"] = "2100-03-10 00:00:00"
    ds = prepare_mimic_iv(write_mini(tmp_path / "raw2", admissions=rows), tmp_path / "out2", n_lab_items=0,
                          outcome="readmission-30d", progress=False)
    assert ds.patients.select("patient_id", "label").rows() == [("2", 1), ("3", 0)]  # 1 died at the index
    assert ds.meta["counts"]["dropped"]["patients_died_at_index"] == 1
    assert ds.meta["counts"]["dropped"]["admissions_of_patients_died_at_index"] == 2


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
