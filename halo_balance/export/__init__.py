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
``synthetic``) and ``export.json`` (parameters, seed, rows per table, and the counts below).
Everything is read from the prepared folder (``meta.json`` holds the lab items, bin edges, time
bins, groups and rules); the only outside input is an optional ICD dictionary (``--dictionary``).
The output folder is written atomically. ``data_prep.mimic_iv`` / ``data_prep.eicu`` /
``data_prep.meds`` with ``--bins-from PREPARED`` on the output give back the prepared records,
labels and groups exactly; :func:`restore_ids` maps the ids back.

Rules
-----
- **Ids.** Real patients keep their ids (``subject_id``, ``uniquepid``). Synthetic patients get
  ids that cannot collide: integer ids (MIMIC-IV, MEDS) count up from the first multiple of
  10^(d-1) above every real id of d digits (``20000000`` above MIMIC-IV's ``1xxxxxxx``); eICU's text
  ids stay as generated (``syn-000001``). MEDS needs integers: real ids that are not are numbered
  the same way. Admissions and unit stays get new ids (``hadm_id`` from 30,000,000, eICU stay ids
  from 10,000,000; the prepared data does not keep the originals).
- **Times.** Visits become admissions in visit order. The first admission falls uniformly in a
  window (2110-2179, MIMIC-IV's shifted years; 2014 to mid-2015 for eICU); a stay lasts
  LogNormal(median 3 days, sigma 0.8) days, clipped to 6 hours..60 days; the next admission follows
  1 day + Exponential(300 days) after the discharge. With time tokens (``meta.json``
  ``preprocessing.time_bins``), the age at the first visit is drawn inside its ``time:age`` bin
  (and the age group's range) and each gap inside its ``time:gap`` bin, in days. Admission
  precedes discharge, lab times fall strictly inside their admission, and a death is at the final
  discharge (``deathtime`` = ``dischtime``, ``dod`` its date, ``discharge_location`` DIED;
  eICU: Expired / Death).
- **Labs.** Each lab token is one measurement whose value lies in the token's bin: uniform in
  ``[e_{b-1}, e_b)`` and then written with the fewest significant digits (2-9) that keep it there
  after the layout's storage (text; float32 in MEDS) and the preparers' rounding. The open-ended
  outer bins are closed by the width of their inner neighbour (the lowest bin stops at 0 when its
  edge is positive); an item with one edge uses half its magnitude. With lab tokens from visit
  means (``mean``, the default) one measurement per token gives back the token; a visit that holds
  several bins of one item (possible in generated records) cannot come back as several tokens and is
  counted (``visit_items_with_several_bins``). eICU's ``apacheApsVar`` holds one value per
  variable and stay: further values are counted (``lab_tokens_not_written``); its other
  measurements are written as -1 (not recorded) and its yes/no flags empty.
- **Diagnoses.** ``dx9:<category>`` / ``dx10:<category>`` become one code of that category: with
  ``--dictionary DIR`` (a folder holding ``d_icd_diagnoses``, e.g. the raw MIMIC-IV root) the
  category's own code where the dictionary lists it, else its lowest code, and the dictionary is
  written whole; without it the category itself (``428``, ``I50``, the heading's code), with the
  vocabulary's description as its ``long_title``. eICU writes ICD-9 and ICD-10 tokens as separate
  rows (its preparer uses ICD-10 only for rows without ICD-9), codes from a dictionary with their
  decimal point, and ``dxstr:`` tokens as a row without code whose ``diagnosisstring`` is the path.
  MEDS: ``DIAGNOSIS//ICD//<version>//<code>`` at the discharge time; ``dxstr:`` and tokens of any
  other kind as a code equal to the token.
- **Groups** land in their source columns: MIMIC-IV ``gender``, ``anchor_age`` (inside the age
  group; ``anchor_year`` = the first admission's year), ``insurance`` and ``race`` (the most frequent
  raw string of the group in ``meta.json`` ``race_map``) on every admission; eICU ``gender``,
  ``ethnicity`` and ``age`` (``> 89`` from 90) on every stay, the age growing with the years between
  stays but never past the group; Unknown categories as empty fields. MEDS: one static code per
  attribute (``GENDER//F``, ``AGE_GROUP//65-79``) and ``MEDS_BIRTH`` consistent with the age.
- **Outcome.** On the final visit, as each preparer reads it (``hospital_expire_flag``,
  ``hospitaldischargestatus``; MEDS: ``MEDS_DEATH`` at the final discharge and a label file with
  the final discharge as prediction time). Earlier visits are survived.
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

from ..cli import run
from ..data import PreparedDataset
from ..errors import DatasetError
from ..io import atomic_dir, check_output_dir, write_json

ExportFormat = Literal["mimic-iv", "eicu", "meds"]
FORMATS: tuple[str, ...] = ("mimic-iv", "eicu", "meds")
IDS_FILE, EXPORT_FILE = "patient_ids.csv", "export.json"
#: The prepared source each raw layout can be written from (MEDS takes any).
SOURCES = {"mimic-iv": "mimic-iv", "eicu": "eicu"}


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the folder, rows per table and the counts of ``export.json``."""

    path: Path
    rows: dict[str, int]
    report: dict[str, Any]


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
        raise DatasetError(f"unknown format; choose one of {', '.join(FORMATS)}", column="format", value=format)
    check_output_dir(out, overwrite=overwrite, what="--out",
                     inputs=[None if isinstance(data, PreparedDataset) else data, dictionary])
    ds = data if isinstance(data, PreparedDataset) else PreparedDataset.load(data)
    source = ds.meta.get("source", {}).get("name")
    if format in SOURCES and source != SOURCES[format]:
        raise DatasetError(f"holds data prepared from {source!r}; the {format} layout needs data prepared "
                           f"by data_prep.{format.replace('-', '_')}", file="meta.json", column="source",
                           value=source, fix="export it with --format meds, which takes any prepared dataset")
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
        write_json(tmp / EXPORT_FILE, {
            "format": format, "data": str(data) if not isinstance(data, PreparedDataset) else None,
            "source": ds.meta.get("source"), "outcome": ds.meta.get("outcome"), "seed": seed,
            "dictionary": str(dictionary) if dictionary else None, "rows": rows, "counts": report,
            "versions": _versions()})
    return ExportResult(Path(out), rows, report)


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
    notes = {k: v for k, v in res.report.items() if k in (
        "visit_items_with_several_bins", "lab_tokens_not_written", "lab_values_outside_bin",
        "time_tokens_misplaced", "diagnosis_tokens_not_written") and v}
    for k, v in notes.items():
        print(f"  not representable ({k}): {v:,}")


if __name__ == "__main__":
    run(main)
