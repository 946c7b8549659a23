"""eICU Collaborative Research Database to the prepared dataset.

``python -m data_prep.eicu --root DIR --out DIR [--lab-source lab|apache]`` reads ``patient``,
``diagnosis`` and either ``lab`` or ``apacheApsVar`` (``.csv`` or ``.csv.gz``, flat in ``DIR``).

Rules (also written to ``meta.json`` under ``preprocessing.rules``)
-------------------------------------------------------------------
- **Visits**: one per ICU unit stay (``patientunitstayid``); patients by ``uniquepid``. eICU has
  no absolute dates, so stays are ordered by ``hospitaldischargeyear``; within a year, hospital
  stays that ended in death come last (nothing can follow a death), then by
  ``patienthealthsystemstayid``; within a hospital stay, by the unit admission's time since hospital
  admission (``-hospitaladmitoffset``), then ``unitvisitnumber``. ``--max-visits N`` keeps the N
  most recent stays (the rest are counted).
- **Outcome**: ``hospitaldischargestatus`` of the final stay (Expired -> 1, Alive -> 0), on that
  visit; earlier visits are 0. A patient whose final stay has no status (28 stays of the demo are
  empty) is dropped: the outcome is unknown, and calling it survival would bias the label
  (``patients_without_outcome``). Earlier stays without a status are kept as ordinary visits.
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
  value on an edge goes to the upper bin): token ``lab:<labname>:<bin>``.
  ``--lab-source apache``: ``apacheApsVar`` (first-day worst values) for the 11 laboratory
  variables wbc, sodium, ph, hematocrit, creatinine, albumin, pao2, pco2, bun, glucose,
  bilirubin (vital signs, GCS, urine output and FiO2 are not labs); ``-1`` means not measured and
  is skipped (counted under ``counts.info``); token ``lab:aps_<variable>:<bin>``, binned like the
  raw labs. The demo lacks ``lab``, so it needs ``--lab-source apache``. ``--bins-from`` reuses the
  items, edges and vocabulary of an earlier prepared folder.
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
from typing import Literal

import polars as pl

from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.io import check_output_dir

from .common import (Counts, Progress, RawTable, Reasons, Reference, add_common_arguments, check_parameters,
                     count_rows_by_status, find_table, finish, icd_category, lab_tokens, number, order_visits,
                     parse_numbers, reading, row_status, summary, table_roots, text)

SOURCE = "eicu"
PATIENT_COLS = ("patientunitstayid", "patienthealthsystemstayid", "uniquepid", "gender", "age",
                "ethnicity", "hospitaldischargeyear", "hospitaladmitoffset", "unitvisitnumber",
                "hospitaldischargestatus")
DIAGNOSIS_COLS = ("patientunitstayid", "diagnosisstring", "icd9code")
LAB_COLS = ("patientunitstayid", "labname", "labresult", "labmeasurenamesystem")
#: apacheApsVar's laboratory variables and their units (eICU documentation).
APACHE_LABS = {"wbc": ("WBC", "K/mcL"), "sodium": ("Sodium", "mmol/L"), "ph": ("pH", None),
               "hematocrit": ("Hematocrit", "%"), "creatinine": ("Creatinine", "mg/dL"),
               "albumin": ("Albumin", "g/dL"), "pao2": ("PaO2", "mm Hg"), "pco2": ("PaCO2", "mm Hg"),
               "bun": ("BUN", "mg/dL"), "glucose": ("Glucose", "mg/dL"), "bilirubin": ("Bilirubin", "mg/dL")}
ICD9_FORM = r"^(\d{3}|V\d{2}|E\d{3})(\.?\d{1,2})?$"
ICD10_FORM = r"^[A-Z]\d[0-9A-Z](\.?[0-9A-Z]{1,4})?$"
DXSTR_LEVELS = 3

CATEGORIES = {
    "age_group": ["pediatric", "adult", "elderly", "Unknown"],
    "gender": ["Female", "Male", "Other/Unknown"],
    "ethnicity": ["Caucasian", "African American", "Hispanic", "Asian", "Native American", "Other/Unknown"],
}

RULES = {
    "visit": "one per unit stay; patients by uniquepid; ordered by hospitaldischargeyear, then "
             "Expired hospital stays last within a year, patienthealthsystemstayid, "
             "-hospitaladmitoffset (unit admission time since hospital admission), unitvisitnumber",
    "max_visits": "keep each patient's most recent stays; older ones counted as dropped",
    "outcome": "hospitaldischargestatus of the final stay (Expired=1, Alive=0) on that visit; "
               "patients whose final stay has no status are dropped",
    "diagnosis": "icd9code split on ','; ICD-9 parts (ddd, Vdd, Eddd + decimals) give dx9:<before the "
                 "point>; if a row has none, ICD-10 parts give dx10:<first 3 characters>; if neither, "
                 f"dxstr:<first {DXSTR_LEVELS} levels of diagnosisstring>; other parts ignored and counted",
    "diagnosis_description": "the diagnosisstring most often recorded with the code token",
    "labs": "top items by numeric rows in kept stays; mean per stay; bins from the item's quantiles "
            "of stay means (linear interpolation, equal edges merged, a value on an edge goes to the "
            "upper bin); token lab:<item>:<bin>",
    "labs_apache": "apacheApsVar laboratory variables (wbc, sodium, ph, hematocrit, creatinine, albumin, "
                   "pao2, pco2, bun, glucose, bilirubin); -1 = not measured; item aps_<variable>",
    "age_group": "final (else most recent known) age: pediatric <18, adult 18-74, elderly >=75; "
                 "'> 89' = 90; none known -> Unknown",
    "gender": "Female/Male; other, unknown or empty -> Other/Unknown (most recent known value)",
    "ethnicity": "as recorded (most recent known value); empty -> Other/Unknown",
}


def prepare_eicu(root: str | os.PathLike, out: str | os.PathLike, *,
                 lab_source: Literal["lab", "apache"] = "lab", n_lab_items: int = 50, n_bins: int = 10,
                 max_visits: int | None = None, bins_from: str | os.PathLike | None = None,
                 overwrite: bool = False, progress: bool = True) -> PreparedDataset:
    """Prepare eICU tables under ``root`` into the folder ``out`` (see the module rules).

    Parameters
    ----------
    root : folder holding the eICU tables.
    out : output folder, written atomically; it must not exist unless ``overwrite``.
    lab_source : ``"lab"`` (the raw ``lab`` table) or ``"apache"`` (``apacheApsVar``, for the demo).
    n_lab_items : number of lab items kept (0: no lab tokens and no lab table read).
    n_bins : bins per lab item (deciles for 10).
    max_visits : keep at most this many most recent unit stays per patient.
    bins_from : a prepared folder whose lab items, bin edges and vocabulary are reused.
    overwrite : replace ``out`` if it exists.
    progress : show step progress on stderr.

    Returns
    -------
    The prepared dataset, already saved to ``out``.
    """
    if lab_source not in ("lab", "apache"):
        raise DatasetError("must be 'lab' or 'apache'", column="lab_source", value=lab_source)
    check_parameters(n_lab_items=n_lab_items, n_bins=n_bins, max_visits=max_visits)
    check_output_dir(out, overwrite=overwrite, inputs=[root, bins_from])
    lab_table_name = "lab" if lab_source == "lab" else "apacheApsVar"
    reference = (Reference.load(bins_from, source=SOURCE, lab_source=f"eicu:{lab_table_name}")
                 if bins_from else None)
    roots = table_roots(Path(root))
    with_labs = bool(reference.lab_items) if reference else n_lab_items > 0
    counts = Counts()
    tables = {
        "patient": find_table(roots, "patient", PATIENT_COLS),
        "diagnosis": find_table(roots, "diagnosis", DIAGNOSIS_COLS),
    }
    if with_labs and lab_source == "lab":
        tables["lab"] = find_table(roots, "lab", LAB_COLS, fix=(
            "the eICU demo has no lab table: pass --lab-source apache to use apacheApsVar's first-day "
            "lab values instead, or --n-lab-items 0 for no labs"))
    elif with_labs:
        tables["apacheApsVar"] = find_table(roots, "apacheApsVar", ("patientunitstayid", *APACHE_LABS))

    with Progress(5 if with_labs else 4, desc="prepare eICU", enabled=progress) as steps:
        with steps.step("unit stays and patients"):
            stays = _read_stays(tables["patient"], max_visits, counts)
            people = _patient_groups(stays)
        with steps.step("diagnoses"):
            dx_tokens, dx_vocab = _diagnoses(tables["diagnosis"], stays, counts)
        labs = None
        if with_labs:
            reasons = Reasons()
            status = reasons.encode(row_status(stays, on=["key"], table=lab_table_name, visit_word="stay"))
            table = tables[lab_table_name]
            branch = (_raw_lab_rows(table, status, reasons) if lab_source == "lab"
                      else _apache_rows(table, status, reasons, counts))
            labels = ({f"aps_{k}": f"{v[0]} (APACHE first-day worst)" for k, v in APACHE_LABS.items()}
                      if lab_source == "apache" else {})
            labs = lab_tokens([branch], table=table, reasons=reasons, labels=labels,
                              value_column="labresult" if lab_source == "lab" else ",".join(APACHE_LABS),
                              n_items=n_lab_items, n_bins=n_bins, counts=counts, progress=steps,
                              reference=reference.lab_items if reference else None)
            if lab_source == "lab":
                counts.rows_read["lab"] = labs.branch_rows[0]
        with steps.step("vocabulary and visits"):
            kept = stays.filter(pl.col("fate") == "ok")
            visits = kept.select("patient_id", "key", visit_index="visit_index",
                                 label=pl.when(pl.col("is_final")).then(pl.col("expired")).otherwise(0))
            ds = finish(source=SOURCE, module="data_prep.eicu", root=Path(root), tables=tables,
                        parameters={"lab_source": lab_source, "n_lab_items": n_lab_items, "max_visits": max_visits},
                        rules=RULES, visits=visits, dx_tokens=dx_tokens, dx_vocab=dx_vocab,
                        lab_source=f"eicu:{lab_table_name}", labs=labs, n_bins=n_bins, bins_from=bins_from,
                        reference=reference, patients=people, canonical=CATEGORIES, counts=counts)
        with steps.step(f"write {out}"):
            ds.save(out, overwrite=overwrite)
    return ds


# ---------------------------------------------------------------------- stays and patients
def _read_stays(table: RawTable, max_visits: int | None, counts: Counts) -> pl.DataFrame:
    """Every unit stay with a ``fate`` (``ok`` or why it is left out) and its visit order."""
    df = table.read(PATIENT_COLS)
    counts.rows_read["patient"] = df.height
    df = parse_numbers(df, table, {"patientunitstayid": pl.Int64, "patienthealthsystemstayid": pl.Int64,
                                   "hospitaldischargeyear": pl.Int64, "hospitaladmitoffset": pl.Int64,
                                   "unitvisitnumber": pl.Int64}, counts)
    df = df.with_columns(patient_id=text("uniquepid"), status=text("hospitaldischargestatus"))
    missing = df.filter(pl.col("patientunitstayid").is_null() | pl.col("patient_id").is_null())
    counts.drop("stays_missing_id", missing.height)
    df = df.filter(pl.col("patientunitstayid").is_not_null(), pl.col("patient_id").is_not_null())
    counts.drop("stays_duplicate_patientunitstayid", df.height - df["patientunitstayid"].n_unique())
    df = df.unique("patientunitstayid", keep="first", maintain_order=True).with_columns(
        key=pl.col("patientunitstayid"))
    counts.note("stays_missing_discharge_year", df["hospitaldischargeyear"].null_count())
    counts.note("stays_without_discharge_status", df["status"].null_count())
    df = df.with_columns(died=(pl.col("status") == "Expired").fill_null(False),
                         expired=pl.when(pl.col("status") == "Expired").then(1)
                         .when(pl.col("status") == "Alive").then(0))
    by = ["hospitaldischargeyear", "died", "patienthealthsystemstayid", "hospitaladmitoffset",
          "unitvisitnumber", "patientunitstayid"]
    ordered = order_visits(df, by=by, descending=[False, False, False, True, False, False],
                           max_visits=max_visits, counts=counts, reason="stays_beyond_max_visits")
    no_outcome = ordered.filter(pl.col("is_final"), pl.col("expired").is_null())["patient_id"]
    lost = pl.col("patient_id").is_in(no_outcome.implode())
    counts.drop("patients_without_outcome", no_outcome.len())
    counts.drop("stays_of_patients_without_outcome", ordered.filter(pl.col("kept"), lost).height)
    final_hosp = pl.col("patienthealthsystemstayid").filter(pl.col("is_final")).first().over("patient_id")
    counts.note("patients_expired_before_final_hospital_stay", ordered.filter(
        pl.col("kept"), pl.col("died"), pl.col("patienthealthsystemstayid") != final_hosp)["patient_id"].n_unique())
    return ordered.with_columns(
        fate=pl.when(~pl.col("kept")).then(pl.lit("beyond_max_visits"))
        .when(lost).then(pl.lit("patient_without_outcome")).otherwise(pl.lit("ok")))


def _age_years() -> pl.Expr:
    a = text("age")
    return pl.when(a.str.replace_all(" ", "") == ">89").then(pl.lit(90.0)).otherwise(
        a.cast(pl.Float64, strict=False))


def _patient_groups(stays: pl.DataFrame) -> pl.DataFrame:
    """One row per kept patient: ``patient_id``, ``label`` and the group attributes.

    Each attribute comes from the final stay or, where it is unknown there, the most recent stay
    that knows it (among all of the patient's stays, trimmed ones included).
    """
    g = text("gender")
    e = text("ethnicity")
    last_known = (stays.sort("patient_id", "order").group_by("patient_id", maintain_order=True).agg(
        age=_age_years().drop_nulls().last(),
        gender_v=pl.when(g.is_in(["Female", "Male"])).then(g).when(g == "Other").then(pl.lit("Other/Unknown"))
        .drop_nulls().last(),
        ethnicity_v=pl.when(e.is_in(CATEGORIES["ethnicity"][:-1])).then(e).drop_nulls().last()))
    final = stays.filter(pl.col("fate") == "ok", pl.col("is_final")).select("patient_id", label="expired")
    age = pl.col("age")
    return (final.join(last_known, on="patient_id", how="left").sort("patient_id").select(
        "patient_id", pl.col("label").cast(pl.Int8),
        age_group=pl.when(age.is_null()).then(pl.lit("Unknown")).when(age < 18).then(pl.lit("pediatric"))
        .when(age < 75).then(pl.lit("adult")).otherwise(pl.lit("elderly")),
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
    p.add_argument("--lab-source", choices=["lab", "apache"], default="lab",
                   help="raw lab table (default) or apacheApsVar's first-day values (the demo lacks lab)")
    a = p.parse_args(argv)
    ds = prepare_eicu(a.root, a.out, lab_source=a.lab_source, n_lab_items=a.n_lab_items, n_bins=a.n_bins,
                      max_visits=a.max_visits, bins_from=a.bins_from, overwrite=a.overwrite,
                      progress=not a.quiet)
    print(summary(ds, a.out))


if __name__ == "__main__":
    run(main)
