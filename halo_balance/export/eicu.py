"""Decoded records as the eICU tables (rules: :mod:`halo_balance.export`)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import polars as pl

from data_prep.eicu import APACHE_LABS, OLDEST_AGE

from ..data import PreparedDataset
from ..errors import DatasetError
from .decode import Decoded, Layout, TimeRules, decode
from .tables import dotted, icd_codes, number_text, write_csv_gz

TIMES = TimeRules(first=datetime(2014, 1, 1), last=datetime(2015, 7, 1),  # the eICU release's years
                  readmission_days=(0.25, 14.0))  # an ICU readmission within the hospital stay
#: ``--patient-unit person``: a later stay continues the hospital stay exactly where the record has a
#: gap token (the preparer times gaps only within a hospital stay); ``hospital-stay``: one hospital stay.
LAYOUTS = {unit: Layout(times=TIMES, episodes=episodes, gaps="within-episode", age_group_at="final",
                        oldest_age=OLDEST_AGE)
           for unit, episodes in (("person", "gap-token"), ("hospital-stay", "patient"))}
#: New unit-stay (and hospital-stay) ids count up from here, above the release's largest ids.
STAY_START = 10_000_000
PATIENT_COLS = (
    "patientunitstayid", "patienthealthsystemstayid", "gender", "age", "ethnicity", "hospitalid", "wardid",
    "apacheadmissiondx", "admissionheight", "hospitaladmittime24", "hospitaladmitoffset", "hospitaladmitsource",
    "hospitaldischargeyear", "hospitaldischargetime24", "hospitaldischargeoffset", "hospitaldischargelocation",
    "hospitaldischargestatus", "unittype", "unitadmittime24", "unitadmitsource", "unitvisitnumber", "unitstaytype",
    "admissionweight", "dischargeweight", "unitdischargetime24", "unitdischargeoffset", "unitdischargelocation",
    "unitdischargestatus", "uniquepid")
DIAGNOSIS_COLS = ("diagnosisid", "patientunitstayid", "activeupondischarge", "diagnosisoffset", "diagnosisstring",
                  "icd9code", "diagnosispriority")
LAB_COLS = ("labid", "patientunitstayid", "labresultoffset", "labtypeid", "labname", "labresult", "labresulttext",
            "labmeasurenamesystem", "labmeasurenameinterface", "labresultrevisedoffset")
APACHE_COLS = ("apacheapsvarid", "patientunitstayid", "intubated", "vent", "dialysis", "eyes", "motor", "verbal",
               "meds", "urine", "wbc", "temperature", "respiratoryrate", "sodium", "heartrate", "meanbp", "ph",
               "hematocrit", "creatinine", "albumin", "pao2", "pco2", "bun", "glucose", "bilirubin", "fio2")
#: apacheApsVar's code for a value that was not recorded.
NOT_MEASURED = -1.0


def write_eicu(ds: PreparedDataset, folder: Path, *, seed: int,
               dictionary: str | os.PathLike | None) -> tuple[Decoded, dict[str, int]]:
    """Write ``folder/{patient,diagnosis,lab|apacheApsVar}.csv.gz``; return the records and rows per table."""
    lab_source = ds.meta.get("preprocessing", {}).get("labs", {}).get("source")
    apache = lab_source == "eicu:apacheApsVar"
    unit = ds.meta.get("preprocessing", {}).get("parameters", {}).get("patient_unit", "person")
    dec = decode(ds, seed=seed, numeric_ids=False, layout=LAYOUTS[unit],
                 forbidden_values=(NOT_MEASURED,) if apache else ())
    folder.mkdir(parents=True, exist_ok=True)
    dec.patients = dec.patients.with_columns(_hospital_stay_ids(dec.patients, unit))
    p, v = dec.patients, dec.visits
    hospital = ["patient_id", "episode"]

    people = p.select("patient_id", "uniquepid", "hsid", *[c for c in ("gender", "ethnicity") if c in p.columns])
    stays = (v.join(people, on="patient_id", how="left", maintain_order="left")
             .with_columns(stay=pl.col("visit_no") + STAY_START)
             .with_columns(hsid=pl.col("hsid").fill_null(pl.col("stay").min().over(hospital)),
                           h_admit=pl.col("admit").min().over(hospital),
                           h_disch=pl.col("discharge").max().over(hospital),
                           h_died=pl.col("died").any().over(hospital),
                           number=pl.col("admit").rank("ordinal").over(hospital).cast(pl.Int64)))
    status = pl.when("died").then(pl.lit("Expired")).otherwise(pl.lit("Alive"))
    h_status = pl.when("h_died").then(pl.lit("Expired")).otherwise(pl.lit("Alive"))
    patient = stays.select(
        patientunitstayid="stay", patienthealthsystemstayid="hsid",
        gender=_col(stays, "gender").replace({"Other/Unknown": "Unknown"}),
        age=pl.when(pl.col("age") >= OLDEST_AGE).then(pl.lit("> 89")).otherwise(pl.col("age").cast(pl.Int64)
                                                                               .cast(pl.String)),
        ethnicity=_col(stays, "ethnicity"), hospitalid=pl.lit(None, pl.Int64), wardid=pl.lit(None, pl.Int64),
        apacheadmissiondx=pl.lit(None, pl.String), admissionheight=pl.lit(None, pl.Float64),
        hospitaladmittime24=pl.col("h_admit").dt.strftime("%H:%M:%S"),
        hospitaladmitoffset=-_minutes("h_admit", "admit"), hospitaladmitsource=pl.lit(None, pl.String),
        hospitaldischargeyear=pl.col("h_disch").dt.year(),
        hospitaldischargetime24=pl.col("h_disch").dt.strftime("%H:%M:%S"),
        hospitaldischargeoffset=_minutes("admit", "h_disch"),
        hospitaldischargelocation=pl.when("h_died").then(pl.lit("Death")), hospitaldischargestatus=h_status,
        unittype=pl.lit(None, pl.String), unitadmittime24=pl.col("admit").dt.strftime("%H:%M:%S"),
        unitadmitsource=pl.lit(None, pl.String), unitvisitnumber="number", unitstaytype=pl.lit("admit"),
        admissionweight=pl.lit(None, pl.Float64), dischargeweight=pl.lit(None, pl.Float64),
        unitdischargetime24=pl.when("discharge_known").then(pl.col("discharge").dt.strftime("%H:%M:%S")),
        unitdischargeoffset=pl.when("discharge_known").then(_minutes("admit", "discharge")),
        unitdischargelocation=pl.when("died").then(pl.lit("Death")), unitdischargestatus=status,
        uniquepid="uniquepid")

    keys = stays.select("visit_no", "stay", "admit", "discharge")
    codes, _ = icd_codes(dec.diagnoses, dictionary)
    if dictionary is not None:  # eICU writes codes with their decimal point
        codes = codes.with_columns(icd_code=dotted(pl.col("icd_code"), pl.col("scheme").str.slice(3).cast(pl.Int64)))
    dx = (dec.diagnoses.join(codes, on=["scheme", "value"], how="left").join(keys, on="visit_no")
          .sort("visit_no", "token"))
    span = _minutes("admit", "discharge")
    diagnosis = dx.select(
        diagnosisid=pl.int_range(1, pl.len() + 1), patientunitstayid="stay",
        activeupondischarge=pl.lit("False"),
        diagnosisoffset=(pl.int_range(pl.len()).over("visit_no") * span / pl.len().over("visit_no")).cast(pl.Int64),
        diagnosisstring=pl.when(pl.col("scheme") == "string").then("value")
        .otherwise(pl.col("description").fill_null(pl.lit("ICD category ") + pl.col("value"))),
        icd9code=pl.when(pl.col("scheme") == "string").then(pl.lit(None, pl.String)).otherwise("icd_code"),
        diagnosispriority=pl.lit(None, pl.String))
    dec.report["diagnosis_tokens_not_written"] = dec.diagnoses.height - diagnosis.height

    lab = (dec.labs.join(keys, on="visit_no").with_columns(offset=_minutes("admit", "time"))
           .sort("visit_no", "offset", "item"))
    tables = {"patient": patient.select(PATIENT_COLS), "diagnosis": diagnosis.select(DIAGNOSIS_COLS)}
    if apache:
        tables["apacheApsVar"] = _apache(lab, dec)
    elif dec.labs.height or lab_source == "eicu:lab":
        text = number_text(lab["value"])
        tables["lab"] = lab.select(
            labid=pl.int_range(1, pl.len() + 1), patientunitstayid="stay", labresultoffset="offset",
            labtypeid=pl.lit(None, pl.Int64), labname="item", labresult=text, labresulttext=text,
            labmeasurenamesystem="unit", labmeasurenameinterface="unit", labresultrevisedoffset="offset")
    rows = {}
    for name, frame in tables.items():
        write_csv_gz(frame, folder / f"{name}.csv.gz")
        rows[name] = frame.height
    return dec, rows


def _hospital_stay_ids(patients: pl.DataFrame, unit: str) -> list[pl.Expr]:
    """``uniquepid`` and a fixed ``hsid`` per patient, and ``out_id`` as the preparer's patient id.

    By person, ``uniquepid`` is the id and the hospital stays are numbered later (``hsid`` null).
    By hospital stay, a real id ``<uniquepid>:<patienthealthsystemstayid>`` is split back into its
    columns; any other id (synthetic) is the ``uniquepid`` of one new hospital stay, and ``out_id``
    becomes ``<uniquepid>:<its number>``, the id the preparer gives it.
    """
    if unit != "hospital-stay":
        return [pl.col("out_id").alias("uniquepid"), pl.lit(None, pl.Int64).alias("hsid")]
    head = pl.col("patient_id").str.extract(r"^(.*):(\d+)$", 1)
    tail = pl.col("patient_id").str.extract(r"^(.*):(\d+)$", 2).cast(pl.Int64)
    split = ~pl.col("synthetic") & head.is_not_null()
    new = STAY_START + pl.int_range(pl.len()).cast(pl.Int64)  # one new hospital stay per patient
    uniquepid = pl.when(split).then(head).otherwise(pl.col("patient_id"))
    hsid = pl.when(split).then(tail).otherwise(new)
    return [uniquepid.alias("uniquepid"), hsid.alias("hsid"),
            pl.concat_str([uniquepid, hsid.cast(pl.String)], separator=":").alias("out_id")]


def _minutes(start: str, end: str) -> pl.Expr:
    """Whole minutes from ``start`` to ``end`` (eICU's offsets)."""
    return ((pl.col(end) - pl.col(start)) / pl.duration(minutes=1)).cast(pl.Int64)


def _col(frame: pl.DataFrame, name: str) -> pl.Expr:
    return pl.col(name) if name in frame.columns else pl.lit(None, dtype=pl.String)


def _apache(lab: pl.DataFrame, dec: Decoded) -> pl.DataFrame:
    """One apacheApsVar row per stay with a lab token: the 11 laboratory values, -1 where the stay has
    none; the table's other measurements -1 and its yes/no flags empty (the prepared data has neither)."""
    unknown = sorted(set(lab["item"].to_list()) - {f"aps_{k}" for k in APACHE_LABS})
    if unknown:
        raise DatasetError(f"lab items {unknown[:3]} are not apacheApsVar variables", file="meta.json",
                           column="preprocessing.labs.items", fix="export eICU data with its own lab source")
    one = lab.unique(["stay", "item"], keep="first", maintain_order=True)
    dec.report["lab_tokens_not_written"] = lab.height - one.height  # the table holds one value per variable
    wide = (one.select("stay", var=pl.col("item").str.slice(4), value="value")
            .pivot(on="var", index="stay", values="value").sort("stay"))
    missing = [c for c in APACHE_LABS if c not in wide.columns]
    wide = wide.with_columns(*[pl.lit(None, pl.Float64).alias(c) for c in missing])
    cols = [pl.int_range(1, pl.len() + 1).alias("apacheapsvarid"), pl.col("stay").alias("patientunitstayid")]
    for c in APACHE_COLS[2:]:
        if c in ("intubated", "vent", "dialysis"):
            cols.append(pl.lit(None, pl.Int64).alias(c))
        elif c in APACHE_LABS:
            cols.append(number_text(wide[c]).fill_null("-1").alias(c))
        else:
            cols.append(pl.lit("-1").alias(c))
    return wide.select(cols)
