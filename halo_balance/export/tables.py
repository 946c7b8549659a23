"""Helpers the raw-layout writers share: ICD codes for categories, number text, gzip CSV output."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import polars as pl

from ..io import atomic_write_bytes

D_ICD_COLS = ("icd_code", "icd_version", "long_title")


def write_csv_gz(frame: pl.DataFrame, path: Path, *, datetime_format: str = "%Y-%m-%d %H:%M:%S") -> None:
    """``frame`` as gzip CSV (empty fields for nulls, quoting only where needed, mtime 0)."""
    buf = io.BytesIO()
    frame.write_csv(buf, datetime_format=datetime_format, date_format="%Y-%m-%d")
    atomic_write_bytes(path, gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))


def number_text(values: pl.Series) -> pl.Series:
    """Numbers as the shortest text that reads back to the same float (``140`` rather than ``140.0``)."""
    return values.cast(pl.Float64).cast(pl.String).str.replace(r"\.0$", "")


def split_label(label: str) -> tuple[str, str | None]:
    """``"Creatinine (Blood)"`` -> ``("Creatinine", "Blood")``: the preparer's label + fluid, undone."""
    if label.endswith(")") and " (" in label:
        head, _, fluid = label[:-1].rpartition(" (")
        return head, fluid
    return label, None


def icd_codes(diagnoses: pl.DataFrame, dictionary: str | os.PathLike | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One ICD code per diagnosis category, and the ``d_icd_diagnoses`` table to write beside it.

    With ``dictionary`` (a folder holding ``d_icd_diagnoses``, e.g. the raw MIMIC-IV root), a
    category becomes its own code where the dictionary lists it, else its lowest listed code (the
    preparer's description rule); the dictionary is written whole. Without one, or for a category
    it lacks, the category itself (``428``, ``I50``: the code of the category's heading) is the
    code and gets a row with the vocabulary's description.

    Returns ``(codes, d_icd)``: ``codes`` has ``scheme`` (icd9 / icd10), ``value`` (category) and
    ``icd_code``; ``d_icd`` has ``icd_code``, ``icd_version``, ``long_title``.
    """
    from data_prep.common import icd_category

    cats = (diagnoses.filter(pl.col("scheme").is_in(["icd9", "icd10"]))
            .group_by("scheme", "value").agg(pl.col("description").first()).sort("scheme", "value")
            .with_columns(ver=pl.col("scheme").str.slice(3).cast(pl.Int64)))
    schema = {"icd_code": pl.String, "icd_version": pl.Int64, "long_title": pl.String}
    d_icd = pl.DataFrame(schema=schema)
    chosen = pl.DataFrame(schema={"ver": pl.Int64, "value": pl.String, "icd_code": pl.String})
    if dictionary is not None:
        d_icd = read_icd_dictionary(dictionary)
        d = d_icd.with_columns(code=pl.col("icd_code").str.replace_all(r"[\s.]", "").str.to_uppercase(),
                               ver=pl.col("icd_version")).filter(pl.col("ver").is_in([9, 10]))
        d = d.with_columns(value=icd_category(pl.col("code"), pl.col("ver")))
        chosen = (d.sort("ver", "value", pl.col("code") != pl.col("value"), "code")
                  .group_by("ver", "value", maintain_order=True).agg(icd_code=pl.col("icd_code").first()))
    codes = cats.join(chosen, on=["ver", "value"], how="left").with_columns(
        pl.col("icd_code").fill_null(pl.col("value")))
    missing = codes.filter(~pl.col("icd_code").is_in(d_icd["icd_code"].implode()))
    derived = missing.select(icd_code="icd_code", icd_version="ver",
                             long_title=pl.col("description").fill_null(pl.lit("ICD category ") + pl.col("value")))
    return codes.select("scheme", "value", "icd_code"), pl.concat([d_icd, derived.cast(schema)])


def read_icd_dictionary(root: str | os.PathLike) -> pl.DataFrame:
    """``d_icd_diagnoses`` (``.csv`` or ``.csv.gz``) from ``root/hosp`` or ``root``, as read by data_prep."""
    from data_prep.common import find_table, number, table_roots

    table = find_table(table_roots(Path(root), "hosp"), "d_icd_diagnoses", D_ICD_COLS,
                       fix="pass --dictionary the raw MIMIC-IV folder (holding hosp/d_icd_diagnoses.csv.gz)")
    df = table.read(D_ICD_COLS)
    return df.select(pl.col("icd_code").str.strip_chars(), icd_version=number("icd_version", pl.Int64),
                     long_title="long_title").filter(pl.col("icd_code").is_not_null())


def dotted(code: pl.Expr, version: pl.Expr) -> pl.Expr:
    """An undotted ICD code with its decimal point (``4019`` -> ``401.9``, ``E8490`` -> ``E849.0``)."""
    at = pl.when((version == 9) & code.str.starts_with("E")).then(4).otherwise(3)
    return (pl.when(code.str.len_chars() > at)
            .then(code.str.slice(0, at) + pl.lit(".") + code.str.slice(at)).otherwise(code))
