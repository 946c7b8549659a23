"""data_prep.meds on a MEDS dataset written by hand in the MIMIC-IV MEDS extraction's layout."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import visit_tokens
from data_prep.meds import prepare_meds
from halo_balance.errors import DatasetError

T = datetime.fromisoformat


def write_fixture(root: Path) -> Path:
    """Three subjects as the MIMIC-IV MEDS extraction writes them: static ``GENDER//`` codes,
    ``MEDS_BIRTH``, ``HOSPITAL_ADMISSION//type//location`` rows carrying ``insurance`` and ``race``,
    ``DIAGNOSIS//ICD//<version>//<code>`` at the discharge time, ``LAB//<itemid>//<unit>`` values,
    ``HOSPITAL_DISCHARGE//<location>`` and ``MEDS_DEATH``; train and held_out shards."""
    adm = "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM"
    rows = [
        # subject 1: two admissions, survives; a lab outside every admission (outpatient draw)
        (1, None, "GENDER//F", None, None, None),
        (1, T("2050-01-01"), "MEDS_BIRTH", None, None, None),  # shifted years, as in MIMIC-IV
        (1, T("2120-03-01 08:00"), "LAB//50912//mg/dL", 9.9, None, None),
        (1, T("2120-05-01 10:00"), adm, None, "Medicare", "WHITE"),
        (1, T("2120-05-01 12:00"), "LAB//50912//mg/dL", 1.0, None, None),
        (1, T("2120-05-02 12:00"), "LAB//50912//mg/dL", 2.0, None, None),  # mean 1.5
        (1, T("2120-05-02 12:00"), "LAB//50971//mEq/L", 4.1, None, None),
        (1, T("2120-05-04 09:00"), "DIAGNOSIS//ICD//9//4280", None, None, None),
        (1, T("2120-05-04 09:00"), "DIAGNOSIS//ICD//9//E8497", None, None, None),
        (1, T("2120-05-04 09:00"), "HOSPITAL_DISCHARGE//HOME", None, None, None),
        (1, T("2121-01-10 10:00"), adm, None, "Medicaid", "WHITE"),
        (1, T("2121-01-10 11:00"), "LAB//50912//mg/dL", 3.0, None, None),
        (1, T("2121-01-12 09:00"), "DIAGNOSIS//ICD//10//I5023", None, None, None),
        (1, T("2121-01-12 09:00"), "HOSPITAL_DISCHARGE//HOME", None, None, None),
        # subject 2: one admission ending in death
        (2, None, "GENDER//M", None, None, None),
        (2, T("2040-06-01"), "MEDS_BIRTH", None, None, None),
        (2, T("2130-02-01 10:00"), adm, None, "Private", "BLACK/AFRICAN AMERICAN"),
        (2, T("2130-02-01 11:00"), "LAB//50912//mg/dL", 5.0, None, None),
        (2, T("2130-02-01 11:00"), "LAB//50971//mEq/L", 6.0, None, None),
        (2, T("2130-02-05 18:00"), "DIAGNOSIS//ICD//10//N179", None, None, None),
        (2, T("2130-02-05 18:00"), "HOSPITAL_DISCHARGE//DIED", None, None, None),
        (2, T("2130-02-05 18:00"), "MEDS_DEATH", None, None, None),
    ]
    held_out = [
        # subject 3: admitted, no discharge yet; and a later complete admission; no birth, no gender
        (3, T("2150-01-01 10:00"), adm, None, None, None),
        (3, T("2150-03-01 10:00"), adm, None, "Other", "UNKNOWN"),
        (3, T("2150-03-01 12:00"), "LAB//50912//mg/dL", None, None, None),  # no numeric value
        (3, T("2150-03-02 10:00"), "DIAGNOSIS//ICD//10//J189", None, None, None),
        (3, T("2150-03-02 10:00"), "HOSPITAL_DISCHARGE//HOME", None, None, None),
    ]
    schema = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                        ("numeric_value", pa.float32()), ("insurance", pa.string()), ("race", pa.string())])
    for split, data in (("train", rows), ("held_out", held_out)):
        (root / "data" / split).mkdir(parents=True, exist_ok=True)
        cols = list(zip(*data))
        pq.write_table(pa.table(dict(zip(schema.names, cols)), schema=schema), root / "data" / split / "0.parquet")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"code": ["DIAGNOSIS//ICD//9//4280", "LAB//50912//mg/dL"],
                             "description": ["Congestive heart failure, unspecified", "Creatinine"],
                             "parent_codes": [["ICD9CM/428.0"], None]}), root / "metadata" / "codes.parquet")
    return root


@pytest.fixture
def fixture_root(tmp_path: Path) -> Path:
    return write_fixture(tmp_path / "meds")


def test_fixture_prepares_as_documented(fixture_root: Path, tmp_path: Path) -> None:
    ds = prepare_meds(fixture_root, tmp_path / "out", n_bins=2, progress=False)
    assert ds.meta["source"]["name"] == "meds"
    assert ds.patients.sort("patient_id").to_dict(as_series=False) == {
        "patient_id": ["1", "2", "3"], "label": [0, 1, 0],
        "gender": ["F", "M", "Unknown"], "race": ["WHITE", "BLACK/AFRICAN AMERICAN", "UNKNOWN"],
        "insurance": ["Medicaid", "Private", "Other"],  # the latest value
        "age_group": ["65-79", "80+", "Unknown"],  # 70 and 89 at the first visit; no birth -> Unknown
        "synthetic": [False, False, False]}
    tokens = visit_tokens(ds)
    assert {k: {t for t in v if t.startswith("dx")} for k, v in tokens.items()} == {
        ("1", 0): {"dx9:428", "dx9:E849"}, ("1", 1): {"dx10:I50"}, ("2", 0): {"dx10:N17"}, ("3", 0): {"dx10:J18"}}
    assert ds.visits.filter(pl.col("label") == 1)[["patient_id", "visit_index"]].rows() == [("2", 0)]
    dropped = ds.meta["counts"]["dropped"]
    assert dropped["admissions_without_discharge"] == 1
    assert dropped["lab_events_outside_visits"] == 1  # subject 1's outpatient draw
    assert dropped["events_no_numeric_value"] == 1
    items = {it["item"]: it for it in ds.meta["preprocessing"]["labs"]["items"]}
    assert items["50912"]["unit"] == "mg/dL" and items["50912"]["label"] == "Creatinine"
    # visit means of 50912: 1.5, 3.0, 5.0 -> median edge 3.0; 3.0 sits in the upper bin
    assert items["50912"]["edges"] == [3.0]
    assert {t for t in tokens[("1", 0)] if t.startswith("lab:50912")} == {"lab:50912:1"}
    assert {t for t in tokens[("1", 1)] if t.startswith("lab:50912")} == {"lab:50912:2"}
    desc = dict(ds.vocab.select("token", "description").iter_rows())
    assert desc["dx9:428"] == "Congestive heart failure, unspecified"


def test_gap_rule_labels_file_and_group_overrides(fixture_root: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"subject_id": pa.array([1, 2], pa.int64()),
                             "prediction_time": pa.array([T("2120-05-03 00:00"), T("2130-02-03 00:00")],
                                                         pa.timestamp("us")),
                             "boolean_value": [True, False]}), labels)
    ds = prepare_meds(fixture_root, tmp_path / "out", visit_rule="gap", gap_hours=48, labels=labels,
                      groups=["sex=code:GENDER", "payer=column:insurance"], n_bins=2, progress=False)
    assert ds.group_attributes == ["sex", "payer"]
    p = ds.patients.sort("patient_id")
    assert p["patient_id"].to_list() == ["1", "2"] and p["label"].to_list() == [1, 0]
    assert ds.meta["counts"]["dropped"]["patients_without_outcome"] == 1  # subject 3 has no label
    # subject 1: the outpatient draw two months before is its own gap-rule visit; the January visit
    # starts after the prediction time and is dropped. Subject 2: the discharge events four days
    # after the labs (> 48 h) are a second visit, after the prediction time
    assert ds.visits.filter(pl.col("patient_id") == "1").height == 2
    assert ds.visits.filter(pl.col("patient_id") == "2").height == 1
    assert ds.meta["counts"]["dropped"]["visits_after_prediction_time"] == 2
    assert "dx9:428" not in set().union(*visit_tokens(ds).values())  # coded after the prediction time


def test_bad_input_is_a_clear_error(tmp_path: Path, fixture_root: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no MEDS data shards"):
        prepare_meds(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match="column:NAME"):
        prepare_meds(fixture_root, tmp_path / "out", groups=["sex"], progress=False)
    with pytest.raises(DatasetError, match="does not have"):
        prepare_meds(fixture_root, tmp_path / "out", groups=["x=column:nope"], progress=False)
    assert not (tmp_path / "out").exists()


def write_labels(path: Path) -> Path:
    pq.write_table(pa.table({"subject_id": pa.array([1, 2, 3], pa.int64()),
                             "prediction_time": pa.array([T("2121-02-01"), T("2130-03-01"), T("2150-04-01")],
                                                         pa.timestamp("us")),
                             "boolean_value": [True, False, True]}), path)
    return path


def test_label_file_outcome_is_recorded_and_must_be_the_references(fixture_root: Path, tmp_path: Path) -> None:
    """meta.json names the outcome a label file gives (by the file's name), never in-hospital mortality; with
    --bins-from the outcome is the reference's: death events or another label file are refused."""
    labels = write_labels(tmp_path / "sepsis_onset.parquet")
    ds = prepare_meds(fixture_root, tmp_path / "ref", labels=labels, n_bins=2, progress=False)
    assert ds.patients.sort("patient_id")["label"].to_list() == [1, 0, 1]  # subject 2 died, yet labelled 0
    assert ds.meta["outcome"] == "sepsis_onset"
    spec = ds.meta["preprocessing"]["outcome"]
    assert (spec["option"], spec["name"]) == (None, "sepsis_onset") and "label row" in spec["rule"]
    params = ds.meta["preprocessing"]["parameters"]
    assert params["outcome"] is None and params["labels"] == str(labels)
    deaths = prepare_meds(fixture_root, tmp_path / "deaths", n_bins=2, progress=False)
    assert deaths.meta["outcome"] == "in_hospital_mortality"
    assert deaths.meta["preprocessing"]["outcome"]["option"] == "mortality"

    again = prepare_meds(fixture_root, tmp_path / "again", labels=labels, bins_from=tmp_path / "ref", progress=False)
    assert again.meta["outcome"] == "sepsis_onset" and again.patients.equals(ds.patients)
    with pytest.raises(DatasetError, match=r"folder's outcome is 'sepsis_onset'.*Fix: pass --labels"):
        prepare_meds(fixture_root, tmp_path / "x", bins_from=tmp_path / "ref", progress=False)
    other = write_labels(tmp_path / "readmission_30d.parquet")
    with pytest.raises(DatasetError, match=r"gives the outcome 'readmission_30d'.*folder's is 'sepsis_onset'"):
        prepare_meds(fixture_root, tmp_path / "x", labels=other, bins_from=tmp_path / "ref", progress=False)
    with pytest.raises(DatasetError, match=r"gives the outcome 'sepsis_onset'.*or leave --labels out"):
        prepare_meds(fixture_root, tmp_path / "x", labels=labels, bins_from=tmp_path / "deaths", progress=False)
    with pytest.raises(DatasetError, match="--outcome and --labels exclude each other"):
        prepare_meds(fixture_root, tmp_path / "x", labels=labels, outcome="mortality", progress=False)
    assert not (tmp_path / "x").exists()


def test_bins_from_groups_are_the_references(fixture_root: Path, tmp_path: Path) -> None:
    """With --bins-from, the groups are the reference's attributes: read by its own rules from raw MEDS data
    (not as static codes that are not there), another set of --group attributes refused, and categories the
    reference lacks counted."""
    ref = prepare_meds(fixture_root, tmp_path / "ref", n_bins=2, progress=False)
    again = prepare_meds(fixture_root, tmp_path / "again", bins_from=tmp_path / "ref", progress=False)
    assert again.patients.equals(ref.patients) and again.meta["groups"] == ref.meta["groups"]
    with pytest.raises(DatasetError, match=r"--group gives the attributes \['sex'\]; the --bins-from folder's are"):
        prepare_meds(fixture_root, tmp_path / "x", groups=["sex=code:GENDER"], bins_from=tmp_path / "ref",
                     progress=False)
    assert not (tmp_path / "x").exists()
    narrow = prepare_meds(fixture_root, tmp_path / "narrow", groups=["gender=code:GENDER", "race=column:race",
                                                                    "insurance=column:insurance",
                                                                    "age_group=age:18,45,65"], progress=False)
    wide = prepare_meds(fixture_root, tmp_path / "wide", bins_from=tmp_path / "narrow", progress=False,
                        groups=[r for r in ref.meta["preprocessing"]["parameters"]["groups"]])
    assert narrow.meta["groups"]["age_group"] == ["65+", "Unknown"]
    assert wide.meta["groups"]["age_group"] == ["65+", "Unknown", "65-79", "80+"]  # the reference's first
    assert wide.meta["counts"]["info"]["patients_age_group_category_not_in_reference"] == 2
