"""MIMIC-IV (``hosp`` module) to the prepared dataset.

``python -m data_prep.mimic_iv --root DIR --out DIR`` reads ``patients``, ``admissions``,
``diagnoses_icd`` and ``labevents`` (``.csv`` or ``.csv.gz``, in ``DIR/hosp`` or ``DIR``; the
dictionaries ``d_icd_diagnoses`` and ``d_labitems`` are used for descriptions when present).

Rules (also written to ``meta.json`` under ``preprocessing.rules``)
-------------------------------------------------------------------
- **Visits**: one per admission (``hadm_id``), ordered by ``admittime`` (ties by ``hadm_id``).
  ``--max-visits N`` keeps each patient's N most recent admissions (the rest are counted).
- **Outcome** (``--outcome``, rules shared with eICU in :mod:`data_prep.outcomes`), on the record's
  final visit; earlier visits are 0. A flag of 1 on an earlier admission contradicts the data and
  is counted (``patients_death_before_final_admission``), never used as a label.

  - ``mortality`` (default): ``hospital_expire_flag`` of the final admission. A patient whose
    final flag is missing or not 0/1 is dropped (``patients_without_outcome``).
  - ``readmission-30d``: 1 when the patient's final admission has its ``admittime`` at most 30 days
    after the ``dischtime`` of the admission before it (or before that ``dischtime``): that earlier
    admission is the index and ends the record, the readmission itself is left out
    (``admissions_readmission_after_index``). Otherwise the final admission is the index, labelled
    0; if the patient died in it (``hospital_expire_flag`` 1) nobody can be readmitted and the
    patient is dropped (``patients_died_at_index``); a missing flag there: dropped
    (``patients_without_outcome``). Deaths after discharge without a readmission are 0 (those
    within 30 days by ``patients.dod`` are counted in ``counts.info``).
  - ``long-stay``: 1 when the final admission lasted more than 7 days (``dischtime - admittime``);
    in-hospital deaths are labelled by their length like everyone else; a missing or negative
    length: dropped (``patients_without_outcome``).
- **Time tokens** (``--time-bins N``, see :mod:`data_prep.time_tokens`): ``time:age:<b>`` on the
  first visit, the age at that admission, ``anchor_age + year(admittime) - anchor_year`` (the
  ``patients`` table must then hold ``anchor_year``); ``time:gap:<b>`` on each later visit, the days
  from the previous admission's ``dischtime`` to this ``admittime`` (none when a time is missing).
- **Diagnoses**: ``dx9:<category>`` / ``dx10:<category>``, ICD-9 and ICD-10 kept apart. The category
  is the part of the code before the decimal point; MIMIC stores codes without the point, so it
  is the first 3 characters (ICD-10; ICD-9 numeric and V codes) or 4 (ICD-9 E codes, ``E849``).
  The description is the category's own ``long_title`` in ``d_icd_diagnoses`` or, where the
  category is not itself listed, the first (lowest) code's title with the number of codes folded in.
- **Labs**: the ``--n-lab-items`` items (``itemid``) with the most rows that hold a number and
  belong to a kept admission, binned by the item's quantiles (``--n-bins``, linear interpolation;
  equal edges merged; a value on an edge goes to the upper bin): token ``lab:<itemid>:<bin>``.
  ``--lab-tokens mean`` (default): each item's ``valuenum`` is averaged over the admission (robust
  to how often a test is repeated and independent of row order) and that mean is binned by the
  quantiles of admission means: one token per (admission, item). ``--lab-tokens every`` (the
  FairPlay paper's representation): every ``valuenum`` is binned by the item's quantiles over all
  its measurements, and the admission holds a token for every bin its measurements touched (a
  value that rose and fell gives several). Edges are computed on the data being prepared unless
  ``--bins-from`` names a prepared folder whose items, edges, mode, time bins and vocabulary are
  reused (tokens it lacks are then dropped and counted), together with its ``--n-lab-items``,
  ``--n-bins``, ``--outcome`` and ``--max-visits`` (see :func:`data_prep.common.settings`).
- **Lab rows without ``hadm_id``** are attached to the patient's most recent admission whose
  ``admittime`` is at or before the ``charttime``, if the ``charttime`` is not after that
  admission's ``dischtime`` (for overlapping admissions this is the later one); otherwise they are
  dropped (``labevents_no_admission_match``). Rows that carry a ``hadm_id`` keep it, even when
  charted before ``admittime`` (emergency-department draws).
- **Groups**: ``race`` from the most recent admission with a known race, mapped to White / Black /
  Hispanic / Asian / Other (WHITE*, PORTUGUESE -> White; BLACK* -> Black; HISPANIC*, SOUTH AMERICAN
  -> Hispanic; ASIAN* -> Asian; everything else, including unknown, unable to obtain and declined,
  -> Other); ``insurance`` of the final admission (Medicare / Medicaid / Private as written; any
  other value, including "No charge" and empty, -> Other); ``gender`` (F / M, else Unknown);
  ``age_group`` from ``anchor_age``: <18, 18-44, 45-64, 65-79, 80+ (Unknown if missing). Only
  categories that occur are listed.
- **Drops**: every row, admission or patient left out is counted by reason in
  ``meta.json`` ``counts.dropped``; ``counts.rows_read`` and ``counts.info`` reconcile them.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.io import check_output_dir

from .common import (Counts, LabTokenMode, LabTokens, Outcome, Progress, RawTable, Reasons, Reference,
                     add_common_arguments, age_group, blank, check_parameters, common_options, count_rows_by_status,
                     datetime, find_table, finish, icd_category, lab_tokens, number, parse_numbers, reading,
                     row_status, settings, summary, table_roots, text, time_format)
from .outcomes import OUTCOME_NAMES, READMISSION_DAYS, SECONDS_PER_DAY, OutcomeSpec, select_visits
from .time_tokens import time_rules, time_tokens

SOURCE = "mimic-iv"
LAB_SOURCE = "mimic-iv:labevents"

PATIENTS_COLS = ("subject_id", "gender", "anchor_age")
ADMISSIONS_COLS = ("subject_id", "hadm_id", "admittime", "dischtime", "insurance", "race",
                   "hospital_expire_flag")
DIAGNOSES_COLS = ("subject_id", "hadm_id", "icd_code", "icd_version")
D_ICD_COLS = ("icd_code", "icd_version", "long_title")
LAB_COLS = ("subject_id", "hadm_id", "itemid", "charttime", "valuenum", "valueuom")
D_LAB_COLS = ("itemid", "label", "fluid")

CATEGORIES = {
    "race": ["White", "Black", "Hispanic", "Asian", "Other"],
    "insurance": ["Medicare", "Medicaid", "Private", "Other"],
    "gender": ["F", "M", "Unknown"],
    "age_group": ["<18", "18-44", "45-64", "65-79", "80+", "Unknown"],
}
#: Age groups of ``anchor_age``: (label, youngest age).
AGE_GROUPS = (("<18", 0), ("18-44", 18), ("45-64", 45), ("65-79", 65), ("80+", 80))
RACE_UNKNOWN = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER")

RULES = {
    "visit": "one per admission (hadm_id), ordered by admittime then hadm_id",
    "max_visits": "keep each patient's most recent admissions; older ones counted as dropped",
    "diagnosis": "dxV:<category>, V = icd_version; category = code before the decimal point: first 3 "
                 "characters (ICD-10, ICD-9 numeric and V codes) or 4 (ICD-9 E codes)",
    "diagnosis_description": "the category's long_title, else the first code's title in the category",
    "lab_attach": "rows without hadm_id go to the subject's latest admission with admittime <= "
                  "charttime, if charttime <= its dischtime; otherwise dropped",
    "race": "most recent known race: WHITE*/PORTUGUESE->White, BLACK*->Black, HISPANIC*/SOUTH "
            "AMERICAN->Hispanic, ASIAN*->Asian, else (incl. unknown/declined)->Other",
    "insurance": "final admission's insurance: Medicare/Medicaid/Private, anything else->Other",
    "gender": "F/M, else Unknown",
    "age_group": "anchor_age: <18, 18-44, 45-64, 65-79, 80+, missing->Unknown",
}
OUTCOME_RULES = {
    "mortality": "hospital_expire_flag of the final admission, on that visit; earlier visits 0; "
                 "patients whose final flag is missing or not 0/1 are dropped",
    "readmission-30d": "1 if the final admission's admittime is <= 30 days after the previous admission's "
                       "dischtime: the previous one is the index (the readmission is left out, counted); else "
                       "the final admission is the index with 0; patients who died in it (flag 1) are dropped, "
                       "as are those whose flag there is missing; deaths after discharge without readmission: 0",
    "long-stay": "1 if dischtime - admittime of the final admission > 7 days, else 0 (deaths included); "
                 "missing or negative length: patient dropped",
}
LAB_RULES = {
    "mean": "top items by rows with a number in kept admissions; mean of valuenum per admission; bins from the "
            "item's quantiles of admission means (linear interpolation, equal edges merged, a value on an edge "
            "goes to the upper bin); token lab:<itemid>:<bin>",
    "every": "top items by rows with a number in kept admissions; each valuenum binned by the item's quantiles "
             "over all its measurements (linear interpolation, equal edges merged, a value on an edge goes to the "
             "upper bin); one token lab:<itemid>:<bin> per bin the admission's measurements touched",
}
TIME_RULES = time_rules(age="anchor_age + year(admittime) - anchor_year",
                        gap="days from the previous admission's dischtime to this admittime")


def prepare_mimic_iv(root: str | os.PathLike, out: str | os.PathLike, *, n_lab_items: int | None = None,
                     n_bins: int | None = None, lab_tokens: LabTokenMode | None = None, time_bins: int | None = None,
                     outcome: Outcome | None = None, max_visits: int | None = None,
                     bins_from: str | os.PathLike | None = None, overwrite: bool = False,
                     progress: bool = True) -> PreparedDataset:
    """Prepare MIMIC-IV ``hosp`` tables under ``root`` into the folder ``out`` (see module rules).

    Every option left ``None`` takes its default or, with ``bins_from``, that folder's value; an
    option given with another value than that folder's is an error.

    Parameters
    ----------
    root : folder holding ``hosp/`` (or the ``hosp`` tables themselves).
    out : output folder, written atomically; it must not exist unless ``overwrite``.
    n_lab_items : number of lab items kept (default 50; 0: no lab tokens, ``labevents`` is not read).
    n_bins : bins per lab item (default 10, deciles).
    lab_tokens : ``"mean"`` (one token per admission and item, default) or ``"every"`` (a token for every
        bin an admission's measurements touched).
    time_bins : age and gap tokens in this many quantile bins (default 0: none).
    outcome : ``"mortality"`` (default), ``"readmission-30d"`` or ``"long-stay"`` (see the module rules).
    max_visits : keep at most this many most recent admissions per patient (default: all).
    bins_from : a prepared MIMIC-IV folder to prepare like: its lab items, bin edges, lab mode, time bins,
        outcome, visit cap and vocabulary are reused.
    overwrite : replace ``out`` if it exists.
    progress : show step progress on stderr.

    Returns
    -------
    The prepared dataset, already saved to ``out``.
    """
    check_parameters(n_lab_items=n_lab_items, n_bins=n_bins, max_visits=max_visits, time_bins=time_bins,
                     lab_tokens=lab_tokens, outcome=outcome)
    check_output_dir(out, overwrite=overwrite, inputs=[root, bins_from])
    reference = Reference.load(bins_from, source=SOURCE, lab_source=LAB_SOURCE) if bins_from else None
    opts = settings(n_bins=n_bins, time_bins=time_bins, lab_tokens=lab_tokens, n_lab_items=n_lab_items,
                 outcome=outcome, max_visits=max_visits, reference=reference)
    n_bins, time_bins, lab_mode, n_lab_items, outcome, max_visits = (
        opts.n_bins, opts.time_bins, opts.lab_mode, opts.n_lab_items, opts.outcome, opts.max_visits)
    roots = table_roots(Path(root), "hosp")
    with_labs = bool(reference.lab_items) if reference else n_lab_items > 0
    counts = Counts()

    tables = {
        "patients": find_table(roots, "patients", PATIENTS_COLS + (("anchor_year",) if time_bins else ()),
                               column_fix="point --root at the unmodified patients table"
                               + (" (time tokens read anchor_year), or pass --time-bins 0" if time_bins else "")),
        "admissions": find_table(roots, "admissions", ADMISSIONS_COLS),
        "diagnoses_icd": find_table(roots, "diagnoses_icd", DIAGNOSES_COLS),
        "d_icd_diagnoses": find_table(roots, "d_icd_diagnoses", D_ICD_COLS, required=False),
        "labevents": find_table(roots, "labevents", LAB_COLS, fix="point --root at the MIMIC-IV folder "
                                "(holding hosp/), or pass --n-lab-items 0 to prepare without labs")
        if with_labs else None,
        "d_labitems": find_table(roots, "d_labitems", D_LAB_COLS, required=False) if with_labs else None,
    }
    with Progress(4 + with_labs + bool(time_bins), desc="prepare MIMIC-IV", enabled=progress) as steps:
        with steps.step("patients and admissions"):
            dod = outcome == "readmission-30d" and "dod" in tables["patients"].header
            patients = _read_patients(tables["patients"], counts, anchor_year=bool(time_bins), dod=dod)
            adm = _read_admissions(tables["admissions"], patients, max_visits, outcome, counts)
            people = _patient_groups(adm, patients, counts)
        with steps.step("diagnoses"):
            dx_tokens, dx_vocab = _diagnoses(tables["diagnoses_icd"], tables["d_icd_diagnoses"], adm, counts)
        labs = None
        if with_labs:
            labs = _labs(tables["labevents"], tables["d_labitems"], adm, counts, steps,
                         n_items=n_lab_items, n_bins=n_bins, reference=reference, mode=lab_mode)
        kept = adm.filter(pl.col("fate") == "ok")
        time = None
        if time_bins:
            with steps.step("time tokens"):
                time = time_tokens(kept, n_bins=time_bins, reference=opts.time_reference, counts=counts)
        with steps.step("vocabulary and visits"):
            visits = kept.select(patient_id=pl.col("subject_id").cast(pl.String), key="key",
                                 visit_index="visit_index", label="label")
            rules = {**RULES, "outcome": OUTCOME_RULES[outcome], "labs": LAB_RULES[lab_mode],
                     **(TIME_RULES if time_bins else {})}
            ds = finish(source=SOURCE, module="data_prep.mimic_iv", root=Path(root), tables=tables,
                        parameters={"n_lab_items": n_lab_items, "max_visits": max_visits}, rules=rules,
                        visits=visits, dx_tokens=dx_tokens, dx_vocab=dx_vocab, lab_source=LAB_SOURCE, labs=labs,
                        n_bins=n_bins, bins_from=bins_from, reference=reference, patients=people,
                        canonical=CATEGORIES, counts=counts, extra_meta={"race_map": _race_map(adm)},
                        outcome=OutcomeSpec(outcome, OUTCOME_NAMES[outcome], OUTCOME_RULES[outcome]),
                        lab_mode=lab_mode, time=time)
        with steps.step(f"write {out}"):
            ds.save(out, overwrite=overwrite)
    return ds


# ---------------------------------------------------------------------- patients and admissions
def _read_patients(table: RawTable, counts: Counts, *, anchor_year: bool, dod: bool) -> pl.DataFrame:
    """One row per subject; ``anchor_year`` (time tokens) and ``dod`` (a date) when asked for."""
    year = ("anchor_year",) if anchor_year else ()
    df = table.read(PATIENTS_COLS + year + (("dod",) if dod else ()))
    counts.rows_read["patients"] = df.height
    df = parse_numbers(df, table, {"subject_id": pl.Int64, "anchor_age": pl.Float64,
                                   **dict.fromkeys(year, pl.Float64)}, counts)
    if dod:
        df = df.with_columns(dod=text("dod").str.slice(0, 10).str.to_date("%Y-%m-%d", strict=False))
    counts.drop("patients_missing_subject_id", df.filter(pl.col("subject_id").is_null()).height)
    df = df.filter(pl.col("subject_id").is_not_null())
    dup = df.height - df["subject_id"].n_unique()
    counts.drop("patients_duplicate_subject_id", dup)
    return df.unique("subject_id", keep="first", maintain_order=True)


def _read_admissions(table: RawTable, patients: pl.DataFrame, max_visits: int | None, outcome: Outcome,
                     counts: Counts) -> pl.DataFrame:
    """All admissions with a ``fate`` (``ok`` or why they are left out), visit order, label and times
    (:func:`data_prep.outcomes.select_visits`)."""
    df = table.read(ADMISSIONS_COLS)
    counts.rows_read["admissions"] = df.height
    df = parse_numbers(df, table, {"subject_id": pl.Int64, "hadm_id": pl.Int64,
                                   "hospital_expire_flag": pl.Int64}, counts)
    df = df.with_columns(admittime=datetime("admittime"), dischtime=datetime("dischtime"))
    missing = df.filter(pl.col("subject_id").is_null() | pl.col("hadm_id").is_null())
    counts.drop("admissions_missing_id", missing.height)
    df = df.filter(pl.col("subject_id").is_not_null(), pl.col("hadm_id").is_not_null())
    # hadm_id is unique in MIMIC-IV; rows and tables are matched on (subject_id, hadm_id) so that a
    # corrupt input reusing a hadm_id for two patients never mixes their records
    counts.drop("admissions_duplicate_hadm_id",
                df.height - df.select("subject_id", "hadm_id").n_unique())
    df = df.unique(["subject_id", "hadm_id"], keep="first", maintain_order=True)
    counts.note("admissions_hadm_id_shared_by_subjects",
                df.filter(pl.col("hadm_id").is_duplicated())["hadm_id"].n_unique())
    df = df.with_row_index("key").with_columns(pl.col("key").cast(pl.Int64))
    known = pl.col("subject_id").is_in(patients["subject_id"].implode())
    df = df.with_columns(fate=pl.when(~known).then(pl.lit("unknown_subject"))
                         .when(pl.col("admittime").is_null()).then(pl.lit("missing_admittime"))
                         .otherwise(pl.lit("ok")),
                         flag=pl.when(pl.col("hospital_expire_flag").is_in([0, 1]))
                         .then(pl.col("hospital_expire_flag")))
    counts.drop("admissions_unknown_subject", df.filter(pl.col("fate") == "unknown_subject").height)
    counts.drop("admissions_missing_admittime", df.filter(pl.col("fate") == "missing_admittime").height)
    counts.note("admissions_dischtime_missing", df.filter(pl.col("dischtime").is_null()).height)

    usable = df.filter(pl.col("fate") == "ok").join(patients, on="subject_id", how="left")
    start, end = pl.col("admittime").dt.epoch("s"), pl.col("dischtime").dt.epoch("s")
    age = (pl.col("anchor_age") + pl.col("admittime").dt.year() - pl.col("anchor_year")
           if "anchor_year" in patients.columns else pl.lit(None, dtype=pl.Float64))
    ordered = select_visits(
        usable.select(*df.columns, patient_id="subject_id", start=start, end=end, episode=pl.lit(0),
                      mortality="flag", died_in_visit=pl.col("flag") == 1, los_days=(end - start) / SECONDS_PER_DAY,
                      age_years=age),
        by=["admittime", "hadm_id"], outcome=outcome, max_visits=max_visits, counts=counts, unit="admissions")
    counts.note("patients_death_before_final_admission", ordered.filter(
        pl.col("visit_index").is_not_null(), ~pl.col("is_final"), pl.col("flag") == 1)["subject_id"].n_unique())
    if "dod" in patients.columns:  # readmission-30d: deaths soon after the index discharge are labelled 0
        index = ordered.filter(pl.col("is_final"), pl.col("label") == 0).join(patients, on="subject_id")
        counts.note("patients_died_within_30_days_of_index_discharge_labelled_0", index.filter(
            (pl.col("dod") - pl.col("dischtime").dt.date()).dt.total_days() <= READMISSION_DAYS).height)
    return pl.concat([ordered.drop("patient_id"), df.filter(pl.col("fate") != "ok")], how="diagonal_relaxed")


def _race_group(col: str = "race") -> pl.Expr:
    """Raw race string -> White / Black / Hispanic / Asian / Other; null where unknown."""
    r = text(col).str.to_uppercase()
    return (pl.when(r.is_null() | r.is_in(RACE_UNKNOWN)).then(None)
            .when(r.str.starts_with("WHITE") | (r == "PORTUGUESE")).then(pl.lit("White"))
            .when(r.str.starts_with("BLACK")).then(pl.lit("Black"))
            .when(r.str.starts_with("HISPANIC") | (r == "SOUTH AMERICAN")).then(pl.lit("Hispanic"))
            .when(r.str.starts_with("ASIAN")).then(pl.lit("Asian"))
            .otherwise(pl.lit("Other")))


def _race_map(adm: pl.DataFrame) -> dict[str, dict[str, object]]:
    """Every raw race string seen, its group and its number of admissions (for meta.json)."""
    m = (adm.group_by(raw=text("race")).agg(n=pl.len(), group=_race_group().first())
         .with_columns(pl.col("group").fill_null("Other (unknown)"), pl.col("raw").fill_null("(empty)"))
         .sort("n", "raw", descending=[True, False]))
    return {raw: {"group": g, "admissions": int(n)} for raw, n, g in m.iter_rows()}


def _patient_groups(adm: pl.DataFrame, patients: pl.DataFrame, counts: Counts) -> pl.DataFrame:
    """One row per kept patient: ``patient_id``, ``label`` and the four group attributes."""
    kept = adm.filter(pl.col("fate") == "ok")
    final = kept.filter(pl.col("is_final")).select("subject_id", "label", insurance_raw="insurance")
    race = (adm.filter(pl.col("admittime").is_not_null())
            .with_columns(race_group=_race_group())
            .sort("subject_id", "admittime", "hadm_id")
            .group_by("subject_id", maintain_order=True)
            .agg(pl.col("race_group").drop_nulls().last()))
    with_adm = adm.filter(~pl.col("fate").is_in(["unknown_subject", "missing_admittime"]))
    counts.drop("patients_without_admissions",
                patients.join(with_adm.select("subject_id").unique(), on="subject_id", how="anti").height)
    age = pl.col("anchor_age")
    ins = text("insurance_raw").str.to_lowercase()
    out = (final.join(patients, on="subject_id", how="left").join(race, on="subject_id", how="left")
           .sort("subject_id")
           .select(
               patient_id=pl.col("subject_id").cast(pl.String),
               label=pl.col("label").cast(pl.Int8),
               race=pl.col("race_group").fill_null("Other"),
               insurance=pl.when(ins == "medicare").then(pl.lit("Medicare"))
               .when(ins == "medicaid").then(pl.lit("Medicaid"))
               .when(ins == "private").then(pl.lit("Private")).otherwise(pl.lit("Other")),
               gender=pl.when(text("gender").str.to_uppercase().is_in(["F", "M"]))
               .then(text("gender").str.to_uppercase()).otherwise(pl.lit("Unknown")),
               age_group=age_group(age, AGE_GROUPS)))
    counts.note("patients_race_unknown_mapped_to_other",
                final.join(race, on="subject_id", how="left")["race_group"].null_count())
    return out


# ---------------------------------------------------------------------- diagnoses
def _diagnoses(table: RawTable, d_icd: RawTable | None, adm: pl.DataFrame,
               counts: Counts) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Diagnosis tokens per kept admission (key, token, kind) and their vocabulary rows."""
    status = row_status(adm, on=["subject_id", "hadm_id"], table="diagnoses_icd", visit_word="admission")
    lf = (table.scan(DIAGNOSES_COLS)
          .with_columns(subject_id=number("subject_id", pl.Int64), hadm_id=number("hadm_id", pl.Int64),
                        ver=number("icd_version", pl.Int64), code=text("icd_code"))
          .join(status.lazy(), on=["subject_id", "hadm_id"], how="left")
          .with_columns(status=pl.when(pl.col("hadm_id").is_null() | pl.col("subject_id").is_null())
                        .then(pl.lit("diagnoses_icd_missing_id"))
                        .when(pl.col("status").is_null()).then(pl.lit("diagnoses_icd_unknown_admission"))
                        .when(pl.col("code").is_null()).then(pl.lit("diagnoses_icd_missing_code"))
                        .when(~pl.col("ver").is_in([9, 10]).fill_null(False)).then(pl.lit("diagnoses_icd_bad_version"))
                        .otherwise(pl.col("status")))
          .with_columns(cat=icd_category(pl.col("code"), pl.col("ver"))))
    with reading(table.path):
        by_status, pairs = pl.collect_all([
            lf.group_by("status").len(),
            lf.filter(pl.col("status") == "ok").select("key", "ver", "cat").unique(),
        ], engine="streaming")
    count_rows_by_status(by_status, table, counts)
    token = pl.lit("dx") + pl.col("ver").cast(pl.String) + pl.lit(":") + pl.col("cat")
    tokens = pairs.select("key", token=token, kind=pl.lit("diagnosis"))
    cats = pairs.select("ver", "cat").unique().sort("ver", "cat")
    vocab = cats.join(_icd_titles(d_icd), on=["ver", "cat"], how="left").select(
        token=token, kind=pl.lit("diagnosis"),
        description=pl.coalesce("description", pl.lit("ICD-") + pl.col("ver").cast(pl.String)
                                + pl.lit(" category ") + pl.col("cat")))
    return tokens, vocab


def _icd_titles(d_icd: RawTable | None) -> pl.DataFrame:
    """(ver, cat) -> description from ``d_icd_diagnoses`` (empty frame when the table is absent)."""
    schema = {"ver": pl.Int64, "cat": pl.String, "description": pl.String}
    if d_icd is None:
        return pl.DataFrame(schema=schema)
    d = d_icd.read(D_ICD_COLS).with_columns(
        ver=number("icd_version", pl.Int64),
        code=text("icd_code").str.replace_all(r"[\s.]", "").str.to_uppercase()).filter(
        pl.col("ver").is_in([9, 10]), pl.col("code").is_not_null())
    d = d.with_columns(cat=icd_category(pl.col("code"), pl.col("ver")))
    return (d.sort("ver", "cat", pl.col("code") != pl.col("cat"), "code")
            .group_by("ver", "cat", maintain_order=True)
            .agg(title=pl.col("long_title").first(), n=pl.len(), exact=(pl.col("code") == pl.col("cat")).any())
            .select("ver", "cat", description=pl.when(pl.col("exact") | (pl.col("n") == 1)).then(pl.col("title"))
                    .otherwise(pl.col("title") + pl.lit(" (first of ") + pl.col("n").cast(pl.String)
                               + pl.lit(" codes in ") + pl.col("cat") + pl.lit(")"))))


# ---------------------------------------------------------------------- labs
def _labs(table: RawTable, d_lab: RawTable | None, adm: pl.DataFrame, counts: Counts,
          steps: Progress, *, n_items: int, n_bins: int, reference: Reference | None,
          mode: LabTokenMode) -> LabTokens:
    table.check_not_empty()
    reasons = Reasons()
    status = reasons.encode(row_status(adm, on=["subject_id", "hadm_id"], table="labevents",
                                       visit_word="admission"))
    lab = table.scan(LAB_COLS)
    item, raw, unit = number("itemid", pl.Int64), pl.col("valuenum"), pl.col("valueuom")
    has = (lab.filter(~blank("hadm_id"))
           .with_columns(subject_id=number("subject_id", pl.Int64), hadm_id=number("hadm_id", pl.Int64))
           .join(status.lazy(), on=["subject_id", "hadm_id"], how="left")
           .select("key", item=item, raw=raw, unit=unit,
                   status=pl.when(pl.col("hadm_id").is_null() | pl.col("subject_id").is_null())
                   .then(reasons.lit("labevents_id_not_a_number"))
                   .when(pl.col("status").is_null()).then(reasons.lit("labevents_unknown_admission"))
                   .when(item.is_null()).then(reasons.lit("labevents_itemid_not_a_number"))
                   .otherwise(pl.col("status"))))
    # rows without hadm_id: attach by charttime (module rules); windows never overlap, so a row
    # matches at most one admission and unmatched rows are the candidates minus the matches
    cand = lab.filter(blank("hadm_id")).with_columns(
        subject=number("subject_id", pl.Int64), t=datetime("charttime", fmt=time_format(table, "charttime")))
    windows = (adm.filter(pl.col("admittime").is_not_null())
               .sort("subject_id", "admittime", "hadm_id")
               .with_columns(nxt=pl.col("admittime").shift(-1).over("subject_id"))
               .filter(pl.col("dischtime").is_not_null())
               .join(status, on=["subject_id", "hadm_id"])
               .select(subject="subject_id", key="key", a="admittime", d="dischtime", nxt="nxt",
                       adm_status="status"))
    t = pl.col("t")
    matched = (cand.filter(pl.col("subject").is_not_null(), t.is_not_null())
               .join(windows.lazy(), on="subject", how="inner")
               .filter(t >= pl.col("a"), t <= pl.col("d"), pl.col("nxt").is_null() | (t < pl.col("nxt")))
               .select("key", item=item, raw=raw, unit=unit,
                       status=pl.when(item.is_null()).then(reasons.lit("labevents_itemid_not_a_number"))
                       .otherwise(pl.col("adm_status"))))
    cand_stats = cand.group_by(bad_subject=pl.col("subject").is_null(), bad_time=t.is_null()).len()
    res = lab_tokens([has, matched], table=table, value_column="valuenum", reasons=reasons, n_items=n_items,
                     n_bins=n_bins, labels=_lab_labels(d_lab), counts=counts, progress=steps,
                     reference=reference.lab_items if reference else None, extra=[cand_stats], mode=mode)
    cand_counts = {"labevents_no_hadm_id_bad_subject_id": 0, "labevents_no_hadm_id_bad_charttime": 0,
                   "labevents_no_admission_match": 0}
    for bad_subject, bad_time, n in res.extra[0].iter_rows():
        reason = ("labevents_no_hadm_id_bad_subject_id" if bad_subject else
                  "labevents_no_hadm_id_bad_charttime" if bad_time else "labevents_no_admission_match")
        cand_counts[reason] += n
    n_matched = res.branch_rows[1]
    counts.rows_read["labevents"] = res.branch_rows[0] + sum(cand_counts.values())
    cand_counts["labevents_no_admission_match"] -= n_matched
    for reason, n in cand_counts.items():
        counts.drop(reason, n)
    counts.note("labevents_attached_by_charttime", n_matched)
    return res


def _lab_labels(d_lab: RawTable | None) -> dict[int, str]:
    if d_lab is None:
        return {}
    d = d_lab.read(D_LAB_COLS).select(
        item=number("itemid", pl.Int64),
        label=pl.when(text("fluid").is_not_null())
        .then(pl.concat_str([text("label"), pl.lit(" ("), text("fluid"), pl.lit(")")]))
        .otherwise(text("label"))).drop_nulls()
    return dict(d.unique("item", keep="first").iter_rows())


# ---------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.mimic_iv", description=__doc__.split("\n\n")[0])
    add_common_arguments(p, root_help="MIMIC-IV folder (holding hosp/) or the hosp folder", visit="admissions")
    a = p.parse_args(argv)
    ds = prepare_mimic_iv(a.root, a.out, **common_options(a))
    print(summary(ds, a.out))


if __name__ == "__main__":
    run(main)
