"""Decoded records as the MIMIC-IV ``hosp`` tables (rules: :mod:`halo_balance.export`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from data_prep.simulate import DATETIME_FORMAT, TABLE_COLUMNS  # the hosp layout, defined once

from ..data import PreparedDataset
from .decode import Decoded, Layout, decode
from .tables import icd_codes, number_text, split_label, write_csv_gz

#: Admissions, each timed against the one before; the age group from anchor_age, whose anchor_year is free.
LAYOUT = Layout(episodes="visit", gaps="always", age_group_at="first")
#: New hadm_ids count up from here, above MIMIC-IV's 2xxxxxxx range: the original ids are not in
#: the prepared data, and these can never be taken for them.
HADM_START = 30_000_000
#: Race strings per group when meta.json has no ``race_map`` (each maps back to its group).
RACE_DEFAULT = {"White": "WHITE", "Black": "BLACK/AFRICAN AMERICAN", "Hispanic": "HISPANIC OR LATINO",
                "Asian": "ASIAN", "Other": "OTHER"}
ANCHOR_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")


def write_mimic_iv(ds: PreparedDataset, folder: Path, *, seed: int,
                   dictionary: str | os.PathLike | None) -> tuple[Decoded, dict[str, int]]:
    """Write ``folder/hosp/*.csv.gz``; return the decoded records and rows per table."""
    dec = decode(ds, seed=seed, numeric_ids=True, layout=LAYOUT)
    rng = np.random.default_rng([seed, 1])
    hosp = folder / "hosp"
    hosp.mkdir(parents=True, exist_ok=True)
    p, v = dec.patients, dec.visits
    death = v.filter(pl.col("died")).select("patient_id", death="discharge")
    first = v.filter(pl.col("visit_index") == 0).select("patient_id", first_admit="admit")
    p = p.join(first, on="patient_id", how="left", maintain_order="left").join(
        death, on="patient_id", how="left", maintain_order="left")
    timed = bool(ds.meta.get("preprocessing", {}).get("time_bins"))
    first_year = pl.col("first_admit").dt.year()
    # the age at the first admission is anchor_age + year(admittime) - anchor_year (data_prep.mimic_iv)
    anchor_year = (pl.when(pl.col("age").is_not_null() & pl.col("group_age").is_not_null())
                   .then(first_year - (pl.col("age") - pl.col("group_age")).cast(pl.Int32))
                   .when(pl.col("age").is_null() & pl.lit(timed)).then(None).otherwise(first_year))

    patients = p.select(
        subject_id="out_id",
        gender=_column(p, "gender").replace({"Unknown": None}),
        anchor_age=pl.col("group_age").cast(pl.Int64),
        anchor_year=anchor_year.cast(pl.Int64),
        anchor_year_group=pl.Series(rng.choice(ANCHOR_YEAR_GROUPS, p.height)),
        dod=pl.col("death").dt.date())

    race = _race_strings(ds.meta)
    people = p.select("patient_id", race=_column(p, "race").replace_strict(race, default=None),
                      insurance=_column(p, "insurance"))
    adm = (v.join(people, on="patient_id", how="left", maintain_order="left")
           .with_columns(hadm_id=pl.col("visit_no") + HADM_START))
    admissions = adm.select(
        subject_id="out_id", hadm_id="hadm_id", admittime="admit",
        dischtime=pl.when("discharge_known").then("discharge"),
        deathtime=pl.when("died").then("discharge"), admission_type=pl.lit(None, pl.String),
        admit_provider_id=pl.lit(None, pl.String), admission_location=pl.lit(None, pl.String),
        discharge_location=pl.when("died").then(pl.lit("DIED")), insurance="insurance",
        language=pl.lit(None, pl.String), marital_status=pl.lit(None, pl.String), race="race",
        edregtime=pl.lit(None, pl.Datetime("us")), edouttime=pl.lit(None, pl.Datetime("us")),
        hospital_expire_flag=pl.col("died").cast(pl.Int64))

    keys = adm.select("visit_no", "out_id", "hadm_id")
    codes, d_icd = icd_codes(dec.diagnoses, dictionary)
    dx = (dec.diagnoses.filter(pl.col("scheme") != "string").join(codes, on=["scheme", "value"])
          .join(keys, on="visit_no").sort("visit_no", "icd_code"))
    diagnoses = dx.select(subject_id="out_id", hadm_id="hadm_id",
                          seq_num=pl.int_range(1, pl.len() + 1).over("visit_no"),
                          icd_code="icd_code", icd_version=pl.col("scheme").str.slice(3).cast(pl.Int64))
    dec.report["diagnosis_tokens_not_written"] = dec.diagnoses.height - diagnoses.height

    lab = dec.labs.join(keys, on="visit_no").sort("visit_no", "time", "item")
    text = number_text(lab["value"])
    labevents = lab.select(
        labevent_id=pl.int_range(1, pl.len() + 1), subject_id="out_id", hadm_id="hadm_id",
        specimen_id=pl.int_range(1, pl.len() + 1), itemid=pl.col("item").cast(pl.Int64),
        order_provider_id=pl.lit(None, pl.String), charttime="time", storetime=pl.lit(None, pl.Datetime("us")),
        value=text, valuenum=text, valueuom="unit", ref_range_lower=pl.lit(None, pl.String),
        ref_range_upper=pl.lit(None, pl.String), flag=pl.lit(None, pl.String),
        priority=pl.lit(None, pl.String), comments=pl.lit(None, pl.String))

    items = ds.meta.get("preprocessing", {}).get("labs", {}).get("items", [])
    d_labitems = pl.DataFrame([(int(it["item"]), *split_label(it["label"]), None) for it in items],
                              schema={"itemid": pl.Int64, "label": pl.String, "fluid": pl.String,
                                      "category": pl.String}, orient="row")
    tables = {"patients": patients, "admissions": admissions, "diagnoses_icd": diagnoses,
              "labevents": labevents, "d_labitems": d_labitems, "d_icd_diagnoses": d_icd}
    rows = {}
    for name, frame in tables.items():
        frame = frame.select(TABLE_COLUMNS[name])
        write_csv_gz(frame, hosp / f"{name}.csv.gz", datetime_format=DATETIME_FORMAT)
        rows[name] = frame.height
    return dec, rows


def _column(p: pl.DataFrame, name: str) -> pl.Expr:
    """A group column, or nulls when the dataset does not have that attribute."""
    return pl.col(name) if name in p.columns else pl.lit(None, dtype=pl.String)


def _race_strings(meta: dict[str, Any]) -> dict[str, str]:
    """Per race group, the raw string with the most admissions in meta.json ``race_map`` (which the
    preparer maps back to that group), else :data:`RACE_DEFAULT`."""
    best: dict[str, tuple[int, str]] = {}
    for raw, info in (meta.get("race_map") or {}).items():
        group, n = info.get("group"), int(info.get("admissions", 0))
        if group in RACE_DEFAULT and raw != "(empty)" and (group not in best or n > best[group][0]):
            best[group] = (n, raw)
    return {g: best[g][1] if g in best else s for g, s in RACE_DEFAULT.items()}
