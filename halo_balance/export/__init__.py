"""Prepared (or augmented) data back to the raw MIMIC-IV / eICU layouts and to MEDS.

``python -m halo_balance.export --data PREPARED --format mimic-iv|eicu|meds --out RAW`` writes
tables that an existing pipeline reads unchanged, so augmented data is a drop-in replacement:

- ``mimic-iv``: ``RAW/hosp/{patients,admissions,diagnoses_icd,labevents,d_labitems,d_icd_diagnoses}.csv.gz``
  with the MIMIC-IV demo's columns, order and formats (the layout :mod:`data_prep.simulate` writes).
- ``eicu``: ``RAW/{patient,diagnosis}.csv.gz`` and ``RAW/lab.csv.gz`` or ``RAW/apacheApsVar.csv.gz``,
  whichever the data was prepared from, with the eICU release's columns.
- ``meds``: ``RAW/data/train/0.parquet`` (``subject_id``, ``time``, ``code``, ``numeric_value``,
  ``hadm_id``), ``RAW/metadata/{dataset.json,codes.parquet,subject_splits.parquet,
  synthetic_subjects.parquet}`` and ``RAW/labels/<outcome>.parquet``, each checked with the ``meds``
  package's schemas; codes as the MIMIC-IV MEDS extraction names them.

Beside the tables: ``patient_ids.csv`` (``patient_id`` in the prepared data, ``exported_id``,
``synthetic``) and ``export.json`` (parameters, seed, rows per table, the counts below and
``prepare_again``, the command that prepares the output back). Everything is read from the prepared
folder (``meta.json`` holds the lab items, bin edges, time bins, groups, outcome and rules); the only
outside input is an optional ICD dictionary (``--dictionary``). The output folder is written
atomically. ``data_prep.mimic_iv`` / ``data_prep.eicu`` / ``data_prep.meds`` with ``--bins-from
PREPARED`` (which brings the dataset's outcome, eICU lab source and patient unit, lab and time bins;
MEDS also ``--labels`` the written label file for outcomes other than mortality) on the output give
back the prepared records, labels and groups exactly; :func:`restore_ids` maps the ids back. Where a generated record holds
something no table can express, the rules below say what is written and ``export.json`` counts it.

Rules
-----
- **Ids.** Real patients keep their ids (``subject_id``, ``uniquepid``; eICU data prepared with
  ``--patient-unit hospital-stay`` has ids ``<uniquepid>:<patienthealthsystemstayid>``, split back
  into those columns). Synthetic patients get ids that cannot collide: integer ids (MIMIC-IV, MEDS)
  count up from the first multiple of 10^(d-1) above every real id of d digits (``20000000`` above
  MIMIC-IV's ``1xxxxxxx``); eICU's text ids stay as generated (``syn-000001``; by hospital stay
  ``syn-000001:<a new hospital stay id>``). MEDS needs integers: real ids that are not are numbered
  the same way. Admissions and unit stays get new ids (``hadm_id`` from 30,000,000, eICU stay and
  hospital stay ids from 10,000,000; the prepared data does not keep the originals).
- **Times.** Visits become admissions (eICU: unit stays) in visit order. The first admission falls
  uniformly in a window (2110-2179, MIMIC-IV's shifted years; 2014 to mid-2015 for eICU); a stay
  lasts LogNormal(median 3 days, sigma 0.8) days, clipped to 6 hours..60 days; the next admission
  follows 1 day + Exponential(300 days) after the discharge. Each ``time:gap`` token becomes a gap
  of whole minutes that the preparer puts back in that bin (:func:`data_prep.time_tokens.time_bin`);
  an open outer bin is closed by its neighbour's width unless a bound (below) asks for more.
  eICU times gaps only within a hospital stay: by person, a stay that holds a gap token continues
  the previous stay's hospital stay and a stay without one opens a new hospital stay, which the
  preparer does not time, so both come back; by hospital stay, all of a record's stays are one
  hospital stay (a gap within one without a token: Exponential(0.5 days)). A hospital stay runs
  from its first unit admission to its last unit discharge (``hospitaladmitoffset``,
  ``hospitaldischargeoffset`` and ``hospitaldischargeyear`` from those); without time tokens every
  eICU stay by person is its own hospital stay. Admission precedes discharge, lab times fall
  strictly inside their admission.
- **Ages.** The age at the first visit is drawn (whole years) inside its ``time:age`` bin and, where
  both allow it, inside the age group's range where the layout reads the group: MIMIC-IV reads the
  group from ``anchor_age`` and the age at the first admission as ``anchor_age + year(admittime) -
  anchor_year``, so ``anchor_age`` is put in the group and ``anchor_year`` shifted (from the first
  admission's year) by the difference: both always come back. eICU reads the age token from the
  first stay's ``age`` and the group from the final stay's: ages grow with the discharge years and
  every later stay's age is held inside the group (``> 89`` from 90); a record with one stay has one
  age, and where its token and group disagree the group wins (the token comes back in the group's
  bin). MEDS writes groups as static codes and ``MEDS_BIRTH`` from the age token. A record whose
  group and token leave no common age is counted (``age_token_outside_age_group``; real MIMIC-IV
  records do this whenever ``anchor_year`` is not the first admission's year). A record without an
  age token (its source lacked the age) is written without one: MIMIC-IV ``anchor_year`` empty,
  eICU's first stay's ``age`` empty, no ``MEDS_BIRTH``; an Unknown age group writes no age at all.
- **Missing gaps.** Where the layout times every gap (MIMIC-IV, MEDS, eICU by hospital stay), a
  real record lacks a gap token only because its source lacked the time before it: the previous
  visit's end (MIMIC-IV ``dischtime``, eICU ``unitdischargeoffset`` and ``unitdischargetime24``) is
  written empty, as the source had it, and no gap comes back. MEDS needs every discharge, so it
  times every gap: eICU records prepared by person gain the gap tokens of their new hospital stays
  there (counted; export them as eICU for an exact round trip).
- **Time tokens a generated record cannot carry.** Generated records learn where time tokens go;
  nothing forces them. A second age or gap token on a visit, an age token after the first visit or
  a gap token on it cannot be written (the lowest bin is used); a later visit of a generated record
  without a gap token gets a gap the preparer will time and bin wherever the layout times every
  gap. ``export.json`` counts, by the preparer's own rules, the tokens that will not come back
  (``age_tokens_not_kept``, ``gap_tokens_not_kept``) and those that will appear
  (``age_tokens_added``, ``gap_tokens_added``): 0 for real records written in their own source's
  layout.
- **Labs.** Each lab token is one measurement whose value lies in the token's bin: uniform in
  ``[e_{b-1}, e_b)`` and then written with the fewest significant digits (2-9) that keep it there
  after the layout's storage (text; float32 in MEDS) and the preparers' rounding. The open-ended
  outer bins are closed by the width of their inner neighbour (the lowest bin stops at 0 when its
  edge is positive); an item with one edge uses half its magnitude. With lab tokens from visit
  means (``mean``, the default) one measurement per token gives back the token; a visit that holds
  several bins of one item (possible in generated records) cannot come back as several tokens and is
  counted (``visit_items_with_several_bins``); with ``every`` each token is its own measurement and
  comes back. eICU's ``apacheApsVar`` holds one value per variable and stay: further values are
  counted (``lab_tokens_not_written``); its other measurements are written as -1 (not recorded) and
  its yes/no flags empty.
- **Diagnoses.** ``dx9:<category>`` / ``dx10:<category>`` become one code of that category: with
  ``--dictionary DIR`` (a folder holding ``d_icd_diagnoses``, e.g. the raw MIMIC-IV root) the
  category's own code where the dictionary lists it, else its lowest code, and the dictionary is
  written whole; without it the category itself (``428``, ``I50``, the heading's code), with the
  vocabulary's description as its ``long_title``. eICU writes ICD-9 and ICD-10 tokens as separate
  rows (its preparer uses ICD-10 only for rows without ICD-9), codes from a dictionary with their
  decimal point, and ``dxstr:`` tokens as a row without code whose ``diagnosisstring`` is the path.
  MEDS: ``DIAGNOSIS//ICD//<version>//<code>`` at the discharge time; ``dxstr:`` and tokens of any
  other kind as a code equal to the token.
- **Groups** land in their source columns: MIMIC-IV ``gender``, ``anchor_age`` (Ages above),
  ``insurance`` and ``race`` (the most frequent raw string of the group in ``meta.json``
  ``race_map``) on every admission; eICU ``gender``, ``ethnicity`` and ``age`` on every stay; Unknown
  categories as empty fields. MEDS: one static code per attribute (``GENDER//F``,
  ``AGE_GROUP//65-79``).
- **Outcome** (``meta.json`` ``preprocessing.outcome``; the rules of :mod:`data_prep.outcomes`), on
  the final visit as each preparer reads it; nothing else in a record says the outcome happened.

  - ``mortality``: a death at the final discharge (MIMIC-IV ``hospital_expire_flag`` 1,
    ``deathtime`` = ``dischtime``, ``dod`` its date, ``discharge_location`` DIED; eICU
    ``unitdischargestatus`` Expired on the final stay and ``hospitaldischargestatus`` Expired on
    every stay of its hospital stay, locations Death; MEDS ``MEDS_DEATH``). Nobody else dies.
  - ``readmission-30d`` (eICU: ``icu_readmission_30d``): a positive patient gets one more
    admission, without tokens, 1-30 days after the final visit's discharge (eICU: a unit stay of
    the same hospital stay 6 hours to 14 days later), which the preparer counts as the readmission
    and leaves out again (``readmissions_written``); a negative patient's final visit starts more
    than 30 days after the previous one where the layout times that gap (if its gap token's bin
    lies wholly within 30 days, the outcome wins: ``gap_tokens_changed_for_outcome``). Nobody dies
    (patients who died at the index are not in such data).
  - ``long-stay``: the final visit lasts more than 7 days if positive, at most 7 if not, drawn
    from the length-of-stay law restricted to that side; eICU measures the final stay's hospital
    stay, whose other stays (and, where they alone exceed 7 days, the gaps between them: counted as
    ``gap_tokens_changed_for_outcome``) are shortened for a negative patient. Nobody dies: the
    prepared data does not say who died.
  - MEDS writes ``labels/<outcome>.parquet`` (``subject_id``, ``prediction_time`` = the final
    discharge, ``boolean_value``) for every outcome; re-prepare outcomes other than mortality with
    ``data_prep.meds --labels`` that file. Labels from a MEDS label file can only be written as
    MEDS: the raw layouts refuse them, naming the outcome.
- Columns the prepared data does not carry (admission type, provider, language, ...) are empty.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl

from data_prep.common import OUTCOMES

from ..cli import run
from ..data import PreparedDataset
from ..errors import DatasetError, unknown_choice
from ..io import atomic_dir, check_output_dir, write_json
from .decode import outcome_option

ExportFormat = Literal["mimic-iv", "eicu", "meds"]
FORMATS: tuple[str, ...] = ("mimic-iv", "eicu", "meds")
IDS_FILE, EXPORT_FILE = "patient_ids.csv", "export.json"
#: Counts of ``export.json`` that say what the preparer will not give back as it was.
NOT_REPRESENTABLE = ("visit_items_with_several_bins", "lab_tokens_not_written", "lab_values_outside_bin",
                     "diagnosis_tokens_not_written", "age_tokens_not_kept", "age_tokens_added",
                     "gap_tokens_not_kept", "gap_tokens_added")
#: The prepared source each raw layout can be written from (MEDS takes any).
SOURCES = {"mimic-iv": "mimic-iv", "eicu": "eicu"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the folder, rows per table, the counts of ``export.json`` and the
    command that prepares it back."""

    path: Path
    rows: dict[str, int]
    report: dict[str, Any]
    prepare_again: str = ""


def export(data: str | os.PathLike | PreparedDataset, out: str | os.PathLike, *, format: ExportFormat,
           seed: int = 0, dictionary: str | os.PathLike | None = None, overwrite: bool = False) -> ExportResult:
    """Write a prepared or augmented dataset in a raw layout (see the module docstring).

    Parameters
    ----------
    data : a prepared-dataset folder or a loaded :class:`~halo_balance.data.PreparedDataset`.
    out : output folder, written atomically; it must not exist unless ``overwrite``.
    format : ``"mimic-iv"``, ``"eicu"`` or ``"meds"``.
    seed : seed of every drawn value and time.
    dictionary : a folder holding ``d_icd_diagnoses`` to pick real ICD codes from.
    overwrite : replace ``out`` if it exists.
    """
    if format not in FORMATS:
        raise unknown_choice("format", [format], FORMATS, error=DatasetError)
    check_output_dir(out, overwrite=overwrite, what="--out",
                     inputs=[None if isinstance(data, PreparedDataset) else data, dictionary])
    ds = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)
    source = ds.meta.get("source", {}).get("name")
    if format in SOURCES and source != SOURCES[format]:
        raise DatasetError(f"holds data prepared from {source!r}; the {format} layout needs data prepared "
                           f"by data_prep.{format.replace('-', '_')}", file="meta.json", column="source",
                           value=source, fix="export it with --format meds, which takes any prepared dataset")
    if format in SOURCES and outcome_option(ds.meta) is None:
        raise DatasetError(f"the outcome {ds.meta.get('outcome')!r} cannot be written in the {format} layout: its "
                           "tables express in-hospital death, readmissions and lengths of stay, from which "
                           f"data_prep.{format.replace('-', '_')} reads only --outcome "
                           f"{'|'.join(OUTCOMES)}, and this dataset's labels came from elsewhere",
                           file="meta.json", column="preprocessing.outcome",
                           fix="export it with --format meds, which writes the labels as a MEDS label file")
    if format == "mimic-iv":
        from .mimic_iv import write_mimic_iv as writer
    elif format == "eicu":
        from .eicu import write_eicu as writer
    else:
        from .meds import write_meds as writer
    with atomic_dir(out, overwrite=overwrite) as tmp:
        dec, rows = writer(ds, tmp, seed=seed, dictionary=dictionary)
        ids = dec.patients.select("patient_id", exported_id=pl.col("out_id").cast(pl.String), synthetic="synthetic")
        ids.write_csv(tmp / IDS_FILE)
        report = {"patients": ds.n_patients, "synthetic_patients": int(ds.patients["synthetic"].sum()),
                  "visits": ds.n_visits, **dec.report}
        again = prepare_again(ds.meta, format=format, out=out,
                              data=None if isinstance(data, PreparedDataset) else data)
        write_json(tmp / EXPORT_FILE, {
            "format": format, "data": str(data) if not isinstance(data, PreparedDataset) else None,
            "source": ds.meta.get("source"), "outcome": ds.meta.get("outcome"), "seed": seed,
            "dictionary": str(dictionary) if dictionary else None, "rows": rows, "counts": report,
            "prepare_again": again, "versions": _versions()})
    return ExportResult(Path(out), rows, report, again)


def prepare_again(meta: dict[str, Any], *, format: ExportFormat, out: str | os.PathLike,
                  data: str | os.PathLike | None) -> str:
    """The command that prepares an export of data with ``meta`` back into the same records
    (``PREPARED`` stands for the exported folder when it is not known; ``AGAIN`` for the new one).

    ``--bins-from`` brings every option that defines the representation (outcome, eICU lab source and
    patient unit, lab and time bins, ...); MEDS also needs the written label file for outcomes other
    than mortality, since ``data_prep.meds`` labels only deaths from events.
    """
    ref = str(data) if data is not None else "PREPARED"
    args = [f"python -m data_prep.{format.replace('-', '_')}", f"--root {out}", "--out AGAIN", f"--bins-from {ref}"]
    if format == "meds" and outcome_option(meta) != "mortality":
        args.append(f"--labels {Path(out) / 'labels' / (str(meta.get('outcome', 'outcome')) + '.parquet')}")
    return " ".join(args)


def restore_ids(ds: PreparedDataset, export_dir: str | os.PathLike) -> PreparedDataset:
    """A dataset re-prepared from an export, with the prepared ids and synthetic flags put back.

    Patients not listed in the export's ``patient_ids.csv`` keep their ids (and are real).
    """
    ids = pl.read_csv(Path(export_dir) / IDS_FILE, schema_overrides={"patient_id": pl.String,
                                                                      "exported_id": pl.String})
    rename = dict(zip(ids["exported_id"], ids["patient_id"]))
    syn = dict(zip(ids["exported_id"], ids["synthetic"]))

    def fix(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.with_columns(
            synthetic=pl.col("patient_id").replace_strict(syn, default=False, return_dtype=pl.Boolean),
            patient_id=pl.col("patient_id").replace(rename))
    return PreparedDataset(fix(ds.visits), fix(ds.patients), ds.vocab, ds.meta)


def _versions() -> dict[str, str]:
    import platform

    import halo_balance

    return {"python": platform.python_version(), "polars": pl.__version__, "halo_balance": halo_balance.__version__}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m halo_balance.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared or augmented dataset folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="raw layout to write")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dictionary", default=None, metavar="DIR",
                   help="folder holding d_icd_diagnoses (e.g. the raw MIMIC-IV root) to pick real ICD codes from")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn values and times (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    a = p.parse_args(argv)
    res = export(a.data, a.out, format=a.format, seed=a.seed, dictionary=a.dictionary, overwrite=a.overwrite)
    print(f"wrote {res.path} ({a.format}): {res.report['patients']:,} patients "
          f"({res.report['synthetic_patients']:,} synthetic), " + ", ".join(f"{k} {v:,}" for k, v in res.rows.items()))
    notes = {k: v for k, v in res.report.items() if k in NOT_REPRESENTABLE and v}
    for k, v in notes.items():
        print(f"  not representable ({k}): {v:,}")
    print(f"  prepare it back with: {res.prepare_again}")


if __name__ == "__main__":
    run(main)
