"""eICU Collaborative Research Database to the prepared dataset.

``python -m data_prep.eicu --root DIR --out DIR [--lab-source lab|apache] [--patient-unit
person|hospital-stay]`` reads ``patient``, ``diagnosis`` and either ``lab`` or ``apacheApsVar``
(``.csv`` or ``.csv.gz``, flat in ``DIR``).

Rules (also written to ``meta.json`` under ``preprocessing.rules``)
-------------------------------------------------------------------
- **Visits**: one per ICU unit stay (``patientunitstayid``). **Patients** (``--patient-unit``):
  ``person`` (default), by ``uniquepid``; ``hospital-stay`` (the FairPlay paper's eICU unit), one
  patient per hospital admission, ``uniquepid`` + ``patienthealthsystemstayid``, with the id
  ``<uniquepid>:<patienthealthsystemstayid>`` and that hospital stay's unit stays as its visits.
  eICU has no absolute dates, so stays are ordered by ``hospitaldischargeyear``; within a year,
  hospital stays that ended in death come last (nothing can follow a death), then by
  ``patienthealthsystemstayid``; within a hospital stay, by the unit admission's time since hospital
  admission (``-hospitaladmitoffset``), then ``unitvisitnumber``. ``--max-visits N`` keeps the N
  most recent stays (the rest are counted).
- **Outcome** (``--outcome``, rules shared with MIMIC-IV in :mod:`data_prep.outcomes`), on the
  record's final visit; earlier visits are 0.

  - ``mortality`` (default): ``hospitaldischargestatus`` of the final stay (Expired -> 1, Alive ->
    0). A patient whose final stay has no status (28 stays of the demo are empty) is dropped: the
    outcome is unknown, and calling it survival would bias the label (``patients_without_outcome``).
    Earlier stays without a status are kept as ordinary visits.
  - ``readmission-30d`` (``icu_readmission_30d``): eICU times stays only within a hospital stay
    (offsets from the unit admission); across hospital stays it keeps only
    ``hospitaldischargeyear``, so a 30-day *hospital* readmission cannot be measured. Its
    equivalent is the ICU readmission: 1 when the final stay is another unit stay of the same
    hospital stay that begins at most 30 days after the previous stay's unit discharge (that stay
    is the index and ends the record; the readmission is left out, ``stays_readmission_after_index``).
    Otherwise the final stay is the index with 0, unless the patient died in it
    (``unitdischargestatus`` Expired: dropped, ``patients_died_at_index``; empty: dropped,
    ``patients_without_outcome``). A hospital death after an index ICU discharge without an ICU
    readmission is 0 (counted in ``counts.info``).
  - ``long-stay``: 1 when the final stay's hospital stay lasted more than 7 days
    (``hospitaldischargeoffset - hospitaladmitoffset``, minutes); deaths are labelled by their
    length; a missing or negative length: dropped (``patients_without_outcome``).
- **Time tokens** (``--time-bins N``, see :mod:`data_prep.time_tokens`): ``time:age:<b>`` on the
  first visit, that stay's ``age``; ``time:gap:<b>`` on each later stay of the same hospital stay,
  the days from the previous unit discharge (``-hospitaladmitoffset + unitdischargeoffset``) to
  this unit admission (``-hospitaladmitoffset``). The first stay of a later hospital stay gets no
  gap token (only the discharge year is known across hospital stays; counted as
  ``time_gap_undefined_new_episode``); with ``--patient-unit hospital-stay`` every later visit has one.
- **Diagnoses**: ``icd9code`` holds several codes in one string (e.g. ``"401.9, I10"``). Each part
  is classified by its form: ICD-9 (``ddd``, ``Vdd``, ``Eddd``, optional decimals) or ICD-10
  (letter, digit, alphanumeric, optional decimals); anything else (e.g. the procedure code
  ``31.1``) is ignored and counted. A row with ICD-9 codes gives their categories
  (``dx9:401``: the part before the decimal point); ICD-10 categories (``dx10:I10``) are used
  only when the row has no ICD-9 code, because eICU (2014-2015) was coded in ICD-9 and its ICD-10
  codes mirror them one for one. A row with no usable code falls back to the first three levels
  of ``diagnosisstring`` (``dxstr:cardiovascular|shock / hypotension|hypotension``). A code
  token's description is the ``diagnosisstring`` most often recorded with it.
- **Labs**, ``--lab-source lab`` (default): the ``--n-lab-items`` ``labname``s with the most numeric
  ``labresult`` rows in kept stays; per stay, the mean of each item's results, binned by the
  item's quantiles of the stay means (``--n-bins``; linear interpolation, equal edges merged, a
  value on an edge goes to the upper bin): token ``lab:<labname>:<bin>``. ``--lab-tokens every``
  instead bins every result by the item's quantiles over all results and gives the stay a token
  for each bin its results touched (see :mod:`data_prep.mimic_iv`).
  ``--lab-source apache``: ``apacheApsVar`` (first-day worst values) for the 11 laboratory
  variables wbc, sodium, ph, hematocrit, creatinine, albumin, pao2, pco2, bun, glucose,
  bilirubin (vital signs, GCS, urine output and FiO2 are not labs); ``-1`` means not measured and
  is skipped (counted under ``counts.info``); token ``lab:aps_<variable>:<bin>``, binned like the
  raw labs. The demo lacks ``lab``, so it needs ``--lab-source apache``. apacheApsVar holds one
  value per stay and variable, so ``--lab-tokens every`` gives exactly the tokens of ``mean``
  there. ``--bins-from`` reuses the items, edges, lab mode, time bins and vocabulary of an earlier
  prepared folder, and takes its ``--lab-source``, ``--patient-unit``, ``--n-lab-items``,
  ``--n-bins``, ``--outcome`` and ``--max-visits`` (one given with another value is an error).
- **Columns an option needs**: ``--patient-unit hospital-stay`` reads ``patienthealthsystemstayid``,
  ``--outcome readmission-30d`` ``unitdischargeoffset`` and ``unitdischargestatus``, ``--outcome
  long-stay`` ``hospitaldischargeoffset``; a patient table without such a column, or without a single
  value in it, is an error naming the file, the column and the option (time tokens read
  ``unitdischargeoffset`` too, but a gap without it is only left untimed and counted).
- **Groups** from the final stay (or the most recent stay where the value is known):
  ``age_group`` pediatric (< 18), adult (18-74), elderly (>= 75), with ``"> 89"`` read as 90 and
  Unknown when no stay has an age; ``gender`` Female / Male / Other/Unknown; ``ethnicity``
  Caucasian / African American / Hispanic / Asian / Native American / Other/Unknown (empty ->
  Other/Unknown). Only categories that occur are listed.
- **Drops**: every row, stay or patient left out is counted by reason in ``meta.json``
  ``counts.dropped``; ``counts.rows_read`` and ``counts.info`` reconcile them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import polars as pl

from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.io import check_output_dir

from .common import (Counts, LabTokenMode, LabTokens, Outcome, Progress, RawTable, Reasons, Reference,
                     add_common_arguments, age_group, blank, check_parameters, common_options, count_rows_by_status,
                     find_table, finish, icd_category, lab_tokens, number, parse_numbers, reading, row_status,
                     settings, summary, table_roots, text)
from .outcomes import OUTCOME_NAMES, OutcomeSpec, select_visits
from .time_tokens import time_rules, time_tokens

SOURCE = "eicu"
PATIENT_COLS = ("patientunitstayid", "patienthealthsystemstayid", "uniquepid", "gender", "age",
                "ethnicity", "hospitaldischargeyear", "hospitaladmitoffset", "unitvisitnumber",
                "hospitaldischargestatus")
#: ``patient`` columns read only when an option needs them.
UNIT_DISCHARGE_COLS = ("unitdischargeoffset", "unitdischargestatus")
HOSPITAL_DISCHARGE_COLS = ("hospitaldischargeoffset",)
DIAGNOSIS_COLS = ("patientunitstayid", "diagnosisstring", "icd9code")
PatientUnit = Literal["person", "hospital-stay"]
PATIENT_UNITS: tuple[str, ...] = get_args(PatientUnit)
LAB_COLS = ("patientunitstayid", "labname", "labresult", "labmeasurenamesystem")
#: apacheApsVar's laboratory variables and their units (eICU documentation).
APACHE_LABS = {"wbc": ("WBC", "K/mcL"), "sodium": ("Sodium", "mmol/L"), "ph": ("pH", None),
               "hematocrit": ("Hematocrit", "%"), "creatinine": ("Creatinine", "mg/dL"),
               "albumin": ("Albumin", "g/dL"), "pao2": ("PaO2", "mm Hg"), "pco2": ("PaCO2", "mm Hg"),
               "bun": ("BUN", "mg/dL"), "glucose": ("Glucose", "mg/dL"), "bilirubin": ("Bilirubin", "mg/dL")}
ICD9_FORM = r"^(\d{3}|V\d{2}|E\d{3})(\.?\d{1,2})?$"
ICD10_FORM = r"^[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?$"
DXSTR_LEVELS = 3

#: Age groups of the stay's age: (label, youngest age); ``age`` "> 89" is read as OLDEST_AGE.
AGE_GROUPS = (("pediatric", 0), ("adult", 18), ("elderly", 75))
OLDEST_AGE = 90.0
CATEGORIES = {
    "age_group": ["pediatric", "adult", "elderly", "Unknown"],
    "gender": ["Female", "Male", "Other/Unknown"],
    "ethnicity": ["Caucasian", "African American", "Hispanic", "Asian", "Native American", "Other/Unknown"],
}

VISIT_RULES = {
    "person": "one per unit stay; patients by uniquepid; ordered by hospitaldischargeyear, then Expired hospital "
              "stays last within a year, patienthealthsystemstayid, -hospitaladmitoffset (unit admission time "
              "since hospital admission), unitvisitnumber",
    "hospital-stay": "one per unit stay; patients by uniquepid + patienthealthsystemstayid (one hospital "
                     "admission; id <uniquepid>:<patienthealthsystemstayid>); ordered by -hospitaladmitoffset "
                     "(unit admission time since hospital admission), unitvisitnumber",
}
OUTCOME_RULES = {
    "mortality": "hospitaldischargestatus of the final stay (Expired=1, Alive=0) on that visit; "
                 "patients whose final stay has no status are dropped",
    "readmission-30d": "ICU readmission (eICU cannot time hospital readmissions: only hospitaldischargeyear across "
                       "hospital stays): 1 if the final stay is in the same hospital stay as the previous one and "
                       "begins <= 30 days after its unit discharge: the previous stay is the index (the "
                       "readmission is left out, counted); else the final stay is the index with 0; patients who "
                       "died in it (unitdischargestatus Expired) or whose unit status is empty are dropped",
    "long-stay": "1 if the final stay's hospital stay (hospitaldischargeoffset - hospitaladmitoffset) lasted "
                 "> 7 days, else 0 (deaths included); missing or negative length: patient dropped",
}
OUTCOME_SPEC_NAMES = {**OUTCOME_NAMES, "readmission-30d": "icu_readmission_30d"}
TIME_RULES = time_rules(age="the stay's age in years ('> 89' = 90)",
                        gap="days from the previous unit stay's discharge to this unit admission, within one "
                            "hospital stay (offsets); undefined across hospital stays (only the year is known)")
RULES = {
    "max_visits": "keep each patient's most recent stays; older ones counted as dropped",
    "diagnosis": "icd9code split on ','; ICD-9 parts (ddd, Vdd, Eddd + decimals) give dx9:<before the "
                 "point>; if a row has none, ICD-10 parts give dx10:<first 3 characters>; if neither, "
                 f"dxstr:<first {DXSTR_LEVELS} levels of diagnosisstring>; other parts ignored and counted",
    "diagnosis_description": "the diagnosisstring most often recorded with the code token",
    "labs_apache": "apacheApsVar laboratory variables (wbc, sodium, ph, hematocrit, creatinine, albumin, "
                   "pao2, pco2, bun, glucose, bilirubin); -1 = not measured; item aps_<variable>",
    "age_group": "final (else most recent known) age: pediatric <18, adult 18-74, elderly >=75; "
                 "'> 89' = 90; none known -> Unknown",
    "gender": "Female/Male; other, unknown or empty -> Other/Unknown (most recent known value)",
    "ethnicity": "as recorded (most recent known value); empty -> Other/Unknown",
}
LAB_RULES = {
    "mean": "top items by numeric rows in kept stays; mean per stay; bins from the item's quantiles of stay means "
            "(linear interpolation, equal edges merged, a value on an edge goes to the upper bin); token "
            "lab:<item>:<bin>",
    "every": "top items by numeric rows in kept stays; each result binned by the item's quantiles over all its "
             "results (linear interpolation, equal edges merged, a value on an edge goes to the upper bin); one "
             "token lab:<item>:<bin> per bin the stay's results touched",
}


def prepare_eicu(root: str | os.PathLike, out: str | os.PathLike, *,
                 lab_source: Literal["lab", "apache"] | None = None, patient_unit: PatientUnit | None = None,
                 n_lab_items: int | None = None, n_bins: int | None = None, lab_tokens: LabTokenMode | None = None,
                 time_bins: int | None = None, outcome: Outcome | None = None, max_visits: int | None = None,
                 bins_from: str | os.PathLike | None = None, overwrite: bool = False,
                 progress: bool = True) -> PreparedDataset:
    """Prepare eICU tables under ``root`` into the folder ``out`` (see the module rules).

    Every option left ``None`` takes its default or, with ``bins_from``, that folder's value; an
    option given with another value than that folder's is an error.

    Parameters
    ----------
    root : folder holding the eICU tables.
    out : output folder, written atomically; it must not exist unless ``overwrite``.
    lab_source : ``"lab"`` (the raw ``lab`` table, default) or ``"apache"`` (``apacheApsVar``, for the demo).
    patient_unit : ``"person"`` (``uniquepid``, default) or ``"hospital-stay"`` (one patient per hospital
        admission).
    n_lab_items : number of lab items kept (default 50; 0: no lab tokens and no lab table read).
    n_bins : bins per lab item (default 10, deciles).
    lab_tokens : ``"mean"`` (default) or ``"every"`` (see the module rules).
    time_bins : age and gap tokens in this many quantile bins (default 0: none).
    outcome : ``"mortality"`` (default), ``"readmission-30d"`` (ICU readmission) or ``"long-stay"``.
    max_visits : keep at most this many most recent unit stays per patient (default: all).
    bins_from : a prepared eICU folder to prepare like: its lab source, patient unit, lab items, bin edges,
        lab mode, time bins, outcome, visit cap and vocabulary are reused.
    overwrite : replace ``out`` if it exists.
    progress : show step progress on stderr.

    Returns
    -------
    The prepared dataset, already saved to ``out``.
    """
    if lab_source not in (None, "lab", "apache"):
        raise DatasetError("must be 'lab' or 'apache'", column="lab_source", value=lab_source)
    if patient_unit not in (None, *PATIENT_UNITS):
        raise DatasetError("must be 'person' or 'hospital-stay'", column="patient_unit", value=patient_unit)
    check_parameters(n_lab_items=n_lab_items, n_bins=n_bins, max_visits=max_visits, time_bins=time_bins,
                     lab_tokens=lab_tokens, outcome=outcome)
    check_output_dir(out, overwrite=overwrite, inputs=[root, bins_from])
    reference = Reference.load(bins_from, source=SOURCE, lab_source=None) if bins_from else None
    if reference is not None:
        ref_labs = reference.meta["preprocessing"]["labs"].get("source", "eicu:lab")
        lab_source = reference.resolve("--lab-source", lab_source, reference.parameter(
            "lab_source", "apache" if ref_labs == "eicu:apacheApsVar" else "lab"))
        patient_unit = reference.resolve("--patient-unit", patient_unit, reference.parameter("patient_unit", "person"))
    lab_source, patient_unit = lab_source or "lab", patient_unit or "person"
    opts = settings(n_bins=n_bins, time_bins=time_bins, lab_tokens=lab_tokens, n_lab_items=n_lab_items,
                 outcome=outcome, max_visits=max_visits, reference=reference)
    n_bins, time_bins, lab_mode, n_lab_items, outcome, max_visits = (
        opts.n_bins, opts.time_bins, opts.lab_mode, opts.n_lab_items, opts.outcome, opts.max_visits)
    lab_table_name = "lab" if lab_source == "lab" else "apacheApsVar"
    roots = table_roots(Path(root))
    with_labs = bool(reference.lab_items) if reference else n_lab_items > 0
    counts = Counts()
    patient_cols = (PATIENT_COLS + (UNIT_DISCHARGE_COLS if time_bins or outcome == "readmission-30d" else ())
                    + (HOSPITAL_DISCHARGE_COLS if outcome == "long-stay" else ()))
    needs = _column_needs(outcome=outcome, patient_unit=patient_unit)
    tables = {
        "patient": find_table(roots, "patient", patient_cols, column_fix=_column_fix(needs)),
        "diagnosis": find_table(roots, "diagnosis", DIAGNOSIS_COLS),
    }
    if with_labs and lab_source == "lab":
        tables["lab"] = find_table(roots, "lab", LAB_COLS, fix=(
            "the eICU demo has no lab table: pass --lab-source apache to use apacheApsVar's first-day "
            "lab values instead, or --n-lab-items 0 for no labs"))
    elif with_labs:
        tables["apacheApsVar"] = find_table(roots, "apacheApsVar", ("patientunitstayid", *APACHE_LABS))

    with Progress(4 + with_labs + bool(time_bins), desc="prepare eICU", enabled=progress) as steps:
        with steps.step("unit stays and patients"):
            stays = _read_stays(tables["patient"], patient_cols, max_visits=max_visits, outcome=outcome,
                                patient_unit=patient_unit, needs=needs, counts=counts)
            people = _patient_groups(stays)
        with steps.step("diagnoses"):
            dx_tokens, dx_vocab = _diagnoses(tables["diagnosis"], stays, counts)
        labs = None
        if with_labs:
            labs = _labs(tables[lab_table_name], stays, counts, steps, n_items=n_lab_items, n_bins=n_bins,
                         reference=reference, mode=lab_mode)
        kept = stays.filter(pl.col("fate") == "ok")
        time = None
        if time_bins:
            with steps.step("time tokens"):
                time = time_tokens(kept, n_bins=time_bins, reference=opts.time_reference, counts=counts)
        with steps.step("vocabulary and visits"):
            visits = kept.select("patient_id", "key", "visit_index", "label")
            rules = {"visit": VISIT_RULES[patient_unit], **RULES, "outcome": OUTCOME_RULES[outcome],
                     "labs": LAB_RULES[lab_mode], **(TIME_RULES if time_bins else {})}
            ds = finish(source=SOURCE, module="data_prep.eicu", root=Path(root), tables=tables,
                        parameters={"lab_source": lab_source, "patient_unit": patient_unit, "n_lab_items": n_lab_items,
                                    "max_visits": max_visits},
                        rules=rules, visits=visits, dx_tokens=dx_tokens, dx_vocab=dx_vocab,
                        lab_source=f"eicu:{lab_table_name}", labs=labs, n_bins=n_bins, bins_from=bins_from,
                        reference=reference, patients=people, canonical=CATEGORIES, counts=counts,
                        outcome=OutcomeSpec(outcome, OUTCOME_SPEC_NAMES[outcome], OUTCOME_RULES[outcome]),
                        lab_mode=lab_mode, time=time)
        with steps.step(f"write {out}"):
            ds.save(out, overwrite=overwrite)
    return ds


# ---------------------------------------------------------------------- stays and patients
def _column_needs(*, outcome: Outcome, patient_unit: PatientUnit) -> dict[str, str]:
    """``patient`` columns that the chosen options cannot do without, and the option that reads each.

    Time tokens read ``unitdischargeoffset`` too, but a gap without it is only left untimed (counted).
    """
    needs = {}
    if patient_unit == "hospital-stay":
        needs["patienthealthsystemstayid"] = "--patient-unit hospital-stay"
    if outcome == "readmission-30d":
        needs.update(dict.fromkeys(UNIT_DISCHARGE_COLS, "--outcome readmission-30d"))
    if outcome == "long-stay":
        needs.update(dict.fromkeys(HOSPITAL_DISCHARGE_COLS, "--outcome long-stay"))
    return needs


def _column_fix(needs: dict[str, str]) -> str:
    """The fix for a ``patient`` table that lacks a column (or every value of one) that an option needs."""
    options = " and ".join(sorted(set(needs.values())))
    why = "; ".join(f"{o} reads {', '.join(c for c in needs if needs[c] == o)}" for o in sorted(set(needs.values())))
    return ("point --root at the unmodified eICU patient table" + (f" ({why}), or prepare without {options}"
                                                                    if needs else ""))


def _read_stays(table: RawTable, columns: Sequence[str], *, max_visits: int | None, outcome: Outcome,
                patient_unit: PatientUnit, needs: dict[str, str], counts: Counts) -> pl.DataFrame:
    """Every unit stay with a ``fate`` (``ok`` or why it is left out), visit order, label and times
    (:func:`data_prep.outcomes.select_visits`).

    A column in ``needs`` (:func:`_column_needs`) without a single value is an error naming the option
    that reads it: every stay would otherwise be dropped or go untimed.
    """
    df = table.read(columns)
    counts.rows_read["patient"] = df.height
    offsets = [c for c in ("hospitaladmitoffset", "unitdischargeoffset", "hospitaldischargeoffset") if c in columns]
    df = parse_numbers(df, table, {"patientunitstayid": pl.Int64, "patienthealthsystemstayid": pl.Int64,
                                   "hospitaldischargeyear": pl.Int64, "unitvisitnumber": pl.Int64,
                                   **dict.fromkeys(offsets, pl.Int64)}, counts)
    for col, option in needs.items():
        empty = df.select(blank(col).all()).item() if df.schema[col] == pl.String else df[col].null_count() == df.height
        if empty:
            raise DatasetError(f"no stay has a value; {option} needs it", file=str(table.path), column=col,
                               fix=_column_fix({col: option}))
    person = text("uniquepid")
    pid = person if patient_unit == "person" else pl.concat_str(
        [person, pl.col("patienthealthsystemstayid").cast(pl.String)], separator=":")
    df = df.with_columns(patient_id=pid, status=text("hospitaldischargestatus"))
    missing = df.filter(pl.col("patientunitstayid").is_null() | pl.col("patient_id").is_null())
    counts.drop("stays_missing_id", missing.height)
    df = df.filter(pl.col("patientunitstayid").is_not_null(), pl.col("patient_id").is_not_null())
    counts.drop("stays_duplicate_patientunitstayid", df.height - df["patientunitstayid"].n_unique())
    df = df.unique("patientunitstayid", keep="first", maintain_order=True).with_columns(
        key=pl.col("patientunitstayid"))
    counts.note("stays_missing_discharge_year", df["hospitaldischargeyear"].null_count())
    counts.note("stays_without_discharge_status", df["status"].null_count())
    start = -pl.col("hospitaladmitoffset") * 60  # seconds since the hospital admission
    has = set(df.columns).__contains__
    unit_status = text("unitdischargestatus") if has("unitdischargestatus") else pl.lit(None, dtype=pl.String)
    df = df.with_columns(
        died=(pl.col("status") == "Expired").fill_null(False),
        mortality=pl.when(pl.col("status") == "Expired").then(1).when(pl.col("status") == "Alive").then(0),
        start=start, episode="patienthealthsystemstayid",
        end=start + pl.col("unitdischargeoffset") * 60 if has("unitdischargeoffset") else pl.lit(None, pl.Int64),
        died_in_visit=pl.when(unit_status == "Expired").then(True).when(unit_status == "Alive").then(False),
        los_days=(pl.col("hospitaldischargeoffset") - pl.col("hospitaladmitoffset")) / 1440
        if has("hospitaldischargeoffset") else pl.lit(None, pl.Float64),
        age_years=_age_years())
    by = ["hospitaldischargeyear", "died", "patienthealthsystemstayid", "hospitaladmitoffset",
          "unitvisitnumber", "patientunitstayid"]
    ordered = select_visits(df, by=by, descending=[False, False, False, True, False, False], outcome=outcome,
                            max_visits=max_visits, counts=counts, unit="stays")
    kept = ordered.filter(pl.col("fate") == "ok")
    final_hosp = pl.col("patienthealthsystemstayid").filter(pl.col("is_final")).first().over("patient_id")
    counts.note("patients_expired_before_final_hospital_stay", kept.filter(
        pl.col("died"), pl.col("patienthealthsystemstayid") != final_hosp)["patient_id"].n_unique())
    return ordered


def _age_years() -> pl.Expr:
    a = text("age")
    return pl.when(a.str.replace_all(" ", "") == ">89").then(pl.lit(OLDEST_AGE)).otherwise(
        a.cast(pl.Float64, strict=False))


def _patient_groups(stays: pl.DataFrame) -> pl.DataFrame:
    """One row per kept patient: ``patient_id``, ``label`` and the group attributes.

    Each attribute comes from the final stay or, where it is unknown there, the most recent stay
    that knows it (among all of the patient's stays up to the index, trimmed ones included).
    """
    g = text("gender")
    e = text("ethnicity")
    last_known = (stays.filter(pl.col("fate") != "after_index").sort("patient_id", "order")
                  .group_by("patient_id", maintain_order=True).agg(
        age=_age_years().drop_nulls().last(),
        gender_v=pl.when(g.is_in(["Female", "Male"])).then(g).when(g == "Other").then(pl.lit("Other/Unknown"))
        .drop_nulls().last(),
        ethnicity_v=pl.when(e.is_in(CATEGORIES["ethnicity"][:-1])).then(e).drop_nulls().last()))
    final = stays.filter(pl.col("fate") == "ok", pl.col("is_final")).select("patient_id", "label")
    age = pl.col("age")
    return (final.join(last_known, on="patient_id", how="left").sort("patient_id").select(
        "patient_id", pl.col("label").cast(pl.Int8),
        age_group=age_group(age, AGE_GROUPS),
        gender=pl.col("gender_v").fill_null("Other/Unknown"),
        ethnicity=pl.col("ethnicity_v").fill_null("Other/Unknown")))


# ---------------------------------------------------------------------- diagnoses
def _diagnoses(table: RawTable, stays: pl.DataFrame, counts: Counts) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Diagnosis tokens per kept stay (key, token, kind) and their vocabulary rows."""
    status = row_status(stays, on=["key"], table="diagnosis", visit_word="stay")
    parts = text("icd9code").str.to_uppercase().str.split(",").list.eval(
        pl.element().str.strip_chars().filter(pl.element() != ""))
    i9 = pl.col("parts").list.eval(pl.element().filter(pl.element().str.contains(ICD9_FORM)))
    i10 = pl.col("parts").list.eval(pl.element().filter(
        pl.element().str.contains(ICD10_FORM) & ~pl.element().str.contains(ICD9_FORM)))
    path = text("diagnosisstring").str.split("|").list.head(DXSTR_LEVELS).list.join("|")
    lf = (table.scan(DIAGNOSIS_COLS)
          .with_columns(key=number("patientunitstayid", pl.Int64), parts=parts, path=path)
          .join(status.lazy(), on="key", how="left")
          .with_columns(i9=i9.fill_null([]), i10=i10.fill_null([]))
          .with_columns(status=pl.when(pl.col("key").is_null()).then(pl.lit("diagnosis_missing_stay_id"))
                        .when(pl.col("status").is_null()).then(pl.lit("diagnosis_unknown_stay"))
                        .when((pl.col("i9").list.len() == 0) & (pl.col("i10").list.len() == 0)
                              & pl.col("path").is_null()).then(pl.lit("diagnosis_no_code_or_string"))
                        .otherwise(pl.col("status")),
                        n_other=pl.col("parts").list.len().fill_null(0) - pl.col("i9").list.len().fill_null(0)
                        - pl.col("i10").list.len().fill_null(0),
                        ver=pl.when(pl.col("i9").list.len() > 0).then(9)
                        .when(pl.col("i10").list.len() > 0).then(10)))
    used = lf.filter(pl.col("status") == "ok")
    codes = (used.filter(pl.col("ver").is_not_null())
             .select("key", "ver", "path", code=pl.when(pl.col("ver") == 9).then("i9").otherwise("i10"))
             .explode("code").with_columns(cat=icd_category(pl.col("code"), pl.col("ver")))
             .select("key", "path", token=pl.lit("dx") + pl.col("ver").cast(pl.String) + pl.lit(":") + pl.col("cat")))
    fallback = used.filter(pl.col("ver").is_null()).select(
        "key", "path", token=pl.lit("dxstr:") + pl.col("path"))
    with reading(table.path):
        by_status, stats, tok = pl.collect_all([
            lf.group_by("status").len(),
            used.select(code_rows=pl.col("ver").is_not_null().sum(), icd10_only=(pl.col("ver") == 10).sum(),
                        fallback=pl.col("ver").is_null().sum(), other_parts=pl.col("n_other").sum()),
            pl.concat([codes, fallback]).group_by("key", "token", "path").len(),
        ], engine="streaming")
    count_rows_by_status(by_status, table, counts)
    s = stats.row(0, named=True)
    counts.note("diagnosis_rows_with_icd_code", s["code_rows"] or 0)
    counts.note("diagnosis_rows_icd10_only", s["icd10_only"] or 0)
    counts.note("diagnosis_rows_using_diagnosisstring", s["fallback"] or 0)
    counts.note("diagnosis_code_parts_unrecognised", s["other_parts"] or 0)
    tokens = tok.select("key", "token", kind=pl.lit("diagnosis")).unique()
    desc = (tok.group_by("token", "path").agg(pl.col("len").sum())
            .sort(["len", "path"], descending=[True, False])
            .group_by("token", maintain_order=True).agg(description=pl.col("path").first()))
    kind_order = pl.col("token").str.extract(r"^(dx9|dx10|dxstr):").replace_strict(
        {"dx9": 0, "dx10": 1, "dxstr": 2}, return_dtype=pl.Int8)
    vocab = desc.sort(kind_order, "token").select("token", kind=pl.lit("diagnosis"), description="description")
    return tokens, vocab


# ---------------------------------------------------------------------- labs
def _labs(table: RawTable, stays: pl.DataFrame, counts: Counts, steps: Progress, *, n_items: int, n_bins: int,
          reference: Reference | None, mode: LabTokenMode) -> LabTokens:
    raw = table.name == "lab"
    reasons = Reasons()
    status = reasons.encode(row_status(stays, on=["key"], table=table.name, visit_word="stay"))
    branch = _raw_lab_rows(table, status, reasons) if raw else _apache_rows(table, status, reasons, counts)
    labels = {} if raw else {f"aps_{k}": f"{v[0]} (APACHE first-day worst)" for k, v in APACHE_LABS.items()}
    labs = lab_tokens([branch], table=table, reasons=reasons, labels=labels,
                      value_column="labresult" if raw else ",".join(APACHE_LABS), n_items=n_items, n_bins=n_bins,
                      counts=counts, progress=steps, reference=reference.lab_items if reference else None, mode=mode)
    if raw:
        counts.rows_read["lab"] = labs.branch_rows[0]
    return labs


def _raw_lab_rows(table: RawTable, status: pl.DataFrame, reasons: Reasons) -> pl.LazyFrame:
    table.check_not_empty()
    item = text("labname")
    return (table.scan(LAB_COLS).with_columns(key=number("patientunitstayid", pl.Int64))
            .join(status.lazy(), on="key", how="left")
            .select("key", item=item, raw=pl.col("labresult"), unit=pl.col("labmeasurenamesystem"),
                    status=pl.when(pl.col("key").is_null()).then(reasons.lit("lab_missing_stay_id"))
                    .when(pl.col("status").is_null()).then(reasons.lit("lab_unknown_stay"))
                    .when(item.is_null()).then(reasons.lit("lab_missing_labname"))
                    .otherwise(pl.col("status"))))


def _apache_rows(table: RawTable, status: pl.DataFrame, reasons: Reasons, counts: Counts) -> pl.LazyFrame:
    """apacheApsVar in the lab-row layout: one row per (stay, variable) value; -1 = not measured."""
    df = table.read(("patientunitstayid", *APACHE_LABS))
    counts.rows_read["apacheApsVar"] = df.height
    long = (df.with_columns(key=number("patientunitstayid", pl.Int64))
            .unpivot(index="key", on=list(APACHE_LABS), variable_name="var", value_name="raw"))
    missing = number("raw") == -1
    counts.note("apacheApsVar_values_not_measured", long.filter(missing).height)
    long = long.filter(~missing.fill_null(False))
    return (long.join(status, on="key", how="left")
            .select("key", item=pl.lit("aps_") + pl.col("var"), raw="raw",
                    unit=pl.col("var").replace_strict({k: u for k, (_, u) in APACHE_LABS.items()},
                                                      return_dtype=pl.String),
                    status=pl.when(pl.col("key").is_null()).then(reasons.lit("apacheApsVar_missing_stay_id"))
                    .when(pl.col("status").is_null()).then(reasons.lit("apacheApsVar_unknown_stay"))
                    .otherwise(pl.col("status")))).lazy()


# ---------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.eicu", description=__doc__.split("\n\n")[0])
    add_common_arguments(p, root_help="folder holding the eICU tables", visit="unit stays")
    p.add_argument("--lab-source", choices=["lab", "apache"], default=None,
                   help="raw lab table (default) or apacheApsVar's first-day values (the demo lacks lab); "
                        "with --bins-from: the reference's")
    p.add_argument("--patient-unit", choices=PATIENT_UNITS, default=None,
                   help="a patient is a person (uniquepid, default) or one hospital admission (uniquepid + "
                        "patienthealthsystemstayid, the FairPlay paper's unit) with its unit stays as visits; "
                        "with --bins-from: the reference's")
    a = p.parse_args(argv)
    ds = prepare_eicu(a.root, a.out, lab_source=a.lab_source, patient_unit=a.patient_unit, **common_options(a))
    print(summary(ds, a.out))


if __name__ == "__main__":
    run(main)
