"""Decoded records as the eICU tables (rules: :mod:`halo_balance.export`)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import polars as pl

from data_prep.eicu import APACHE_LABS

from ..data import PreparedDataset
from ..errors import DatasetError
from .decode import AGE_RANGES, Decoded, TimeRules, decode
from .tables import dotted, icd_codes, number_text, write_csv_gz

RULES = TimeRules(first=datetime(2014, 1, 1), last=datetime(2015, 7, 1))  # the eICU release's years
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
    dec = decode(ds, seed=seed, numeric_ids=False, rules=RULES,
                 forbidden_values=(NOT_MEASURED,) if apache else ())
    folder.mkdir(parents=True, exist_ok=True)
    p, v = dec.patients, dec.visits
    minutes = pl.duration(minutes=1)

    years_in = (pl.col("discharge").dt.year() - pl.col("discharge").dt.year().first().over("patient_id"))
    ages = p.select("patient_id", a=pl.col("age"),
                    cap=pl.col("age_group").replace_strict({g: r[1] - 1 for g, r in AGE_RANGES.items()},
                                                           default=None, return_dtype=pl.Float64)
                    if "age_group" in p.columns else pl.lit(None, pl.Float64))
    stays = (v.join(ages, on="patient_id", how="left", maintain_order="left")
             .join(p.select("patient_id", *[c for c in ("gender", "ethnicity") if c in p.columns]),
                   on="patient_id", how="left", maintain_order="left")
             .with_columns(stay=pl.col("visit_no") + STAY_START,
                           died=pl.col("is_final") & (pl.col("label") == 1),
                           # ages grow with the years between stays, never past the patient's age group
                           age=pl.min_horizontal(pl.col("a") + years_in, pl.col("cap")).cast(pl.Int64)))
    status = pl.when("died").then(pl.lit("Expired")).otherwise(pl.lit("Alive"))
    los = ((pl.col("discharge") - pl.col("admit")) / minutes).cast(pl.Int64)
    patient = stays.select(
        patientunitstayid="stay", patienthealthsystemstayid="stay",
        gender=_col(stays, "gender").replace({"Other/Unknown": "Unknown"}),
        age=pl.when(pl.col("age") >= 90).then(pl.lit("> 89")).otherwise(pl.col("age").cast(pl.String)),
        ethnicity=_col(stays, "ethnicity"), hospitalid=pl.lit(None, pl.Int64), wardid=pl.lit(None, pl.Int64),
        apacheadmissiondx=pl.lit(None, pl.String), admissionheight=pl.lit(None, pl.Float64),
        hospitaladmittime24=pl.col("admit").dt.strftime("%H:%M:%S"), hospitaladmitoffset=pl.lit(0),
        hospitaladmitsource=pl.lit(None, pl.String), hospitaldischargeyear=pl.col("discharge").dt.year(),
        hospitaldischargetime24=pl.col("discharge").dt.strftime("%H:%M:%S"), hospitaldischargeoffset=los,
        hospitaldischargelocation=pl.when("died").then(pl.lit("Death")), hospitaldischargestatus=status,
        unittype=pl.lit(None, pl.String), unitadmittime24=pl.col("admit").dt.strftime("%H:%M:%S"),
        unitadmitsource=pl.lit(None, pl.String), unitvisitnumber=pl.lit(1), unitstaytype=pl.lit("admit"),
        admissionweight=pl.lit(None, pl.Float64), dischargeweight=pl.lit(None, pl.Float64),
        unitdischargetime24=pl.col("discharge").dt.strftime("%H:%M:%S"), unitdischargeoffset=los,
        unitdischargelocation=pl.when("died").then(pl.lit("Death")), unitdischargestatus=status,
        uniquepid="out_id")

    keys = stays.select("visit_no", "stay", "admit", "discharge")
    codes, _ = icd_codes(dec.diagnoses, dictionary)
    if dictionary is not None:  # eICU writes codes with their decimal point
        codes = codes.with_columns(icd_code=dotted(pl.col("icd_code"), pl.col("scheme").str.slice(3).cast(pl.Int64)))
    dx = (dec.diagnoses.join(codes, on=["scheme", "value"], how="left").join(keys, on="visit_no")
          .sort("visit_no", "token"))
    span = ((pl.col("discharge") - pl.col("admit")) / minutes).cast(pl.Int64)
    diagnosis = dx.select(
        diagnosisid=pl.int_range(1, pl.len() + 1), patientunitstayid="stay",
        activeupondischarge=pl.lit("False"),
        diagnosisoffset=(pl.int_range(pl.len()).over("visit_no") * span / pl.len().over("visit_no")).cast(pl.Int64),
        diagnosisstring=pl.when(pl.col("scheme") == "string").then("value")
        .otherwise(pl.col("description").fill_null(pl.lit("ICD category ") + pl.col("value"))),
        icd9code=pl.when(pl.col("scheme") == "string").then(pl.lit(None, pl.String)).otherwise("icd_code"),
        diagnosispriority=pl.lit(None, pl.String))
    dec.report["diagnosis_tokens_not_written"] = dec.diagnoses.height - diagnosis.height

    lab = dec.labs.join(keys, on="visit_no").with_columns(offset=((pl.col("time") - pl.col("admit")) / minutes)
                                                          .cast(pl.Int64)).sort("visit_no", "offset", "item")
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
