"""Decoded records as a MEDS dataset (rules: :mod:`halo_balance.export`), checked with ``meds``' schemas."""

from __future__ import annotations

import io
import os
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from ..data import PreparedDataset
from ..errors import HaloBalanceError
from ..io import atomic_write_bytes, write_json
from .decode import Decoded, Layout, as_float32, decode
from .tables import dotted, icd_codes

#: Admissions, each timed against the one before; groups are static codes, so ages are free; every
#: visit needs its discharge event, so no end time can be left out.
LAYOUT = Layout(episodes="visit", gaps="always", age_group_at=None, blank_ends=False)
HADM_START = 30_000_000
#: The codes the MIMIC-IV MEDS extraction gives admissions, discharges and diagnoses; ``UNK`` stands
#: for an empty part, as there.
ADMISSION, DISCHARGE, DIAGNOSIS, LAB = "HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE", "DIAGNOSIS//ICD", "LAB"
SYNTHETIC_FILE = "metadata/synthetic_subjects.parquet"


def meds_schemas():
    """The ``meds`` package (``pip install -e ".[meds]"``), imported lazily."""
    try:
        import meds
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HaloBalanceError('MEDS needs the meds package: pip install -e ".[meds]"') from exc
    return meds


def static_code(attribute: str, category: str) -> str:
    """A group membership as a static MEDS code: ``GENDER//F``, ``AGE_GROUP//65-79``."""
    return f"{attribute.upper()}//{category}"


def write_meds(ds: PreparedDataset, folder: Path, *, seed: int,
               dictionary: str | os.PathLike | None) -> tuple[Decoded, dict[str, int]]:
    """Write ``folder/data/train/0.parquet``, ``folder/metadata/*`` and ``folder/labels/<outcome>.parquet``."""
    meds = meds_schemas()
    dec = decode(ds, seed=seed, numeric_ids=True, layout=LAYOUT, stored=as_float32)
    p, v = dec.patients, dec.visits
    groups = ds.group_attributes
    first = v.filter(pl.col("visit_index") == 0).select("patient_id", first_admit="admit")
    null_time = pl.lit(None, dtype=pl.Datetime("us"))
    frames = []
    for attr in groups:
        frames.append(p.select(subject_id="out_id", time=null_time,
                               code=pl.lit(f"{attr.upper()}//") + pl.col(attr), numeric_value=pl.lit(None, pl.Float32),
                               hadm_id=pl.lit(None, pl.Int64)))
    # birth half a year past the age at the first admission, so whole years of age come back
    birth = p.join(first, on="patient_id").filter(pl.col("age").is_not_null()).select(
        subject_id="out_id", time=(pl.col("first_admit") - pl.duration(
            hours=((pl.col("age") + 0.5) * 365.25 * 24).cast(pl.Int64))).dt.truncate("1d"), code=pl.lit(meds.birth_code), numeric_value=pl.lit(None, pl.Float32),
        hadm_id=pl.lit(None, pl.Int64))
    frames.append(birth)
    vis = v.with_columns(hadm_id=pl.col("visit_no") + HADM_START)
    frames.append(vis.select(subject_id="out_id", time="admit", code=pl.lit(f"{ADMISSION}//UNK//UNK"),
                             numeric_value=pl.lit(None, pl.Float32), hadm_id="hadm_id"))
    frames.append(vis.select(subject_id="out_id", time="discharge",
                             code=pl.when("died").then(pl.lit(f"{DISCHARGE}//DIED")).otherwise(pl.lit(f"{DISCHARGE}//UNK")),
                             numeric_value=pl.lit(None, pl.Float32), hadm_id="hadm_id"))
    frames.append(vis.filter("died").select(subject_id="out_id", time="discharge", code=pl.lit(meds.death_code),
                                            numeric_value=pl.lit(None, pl.Float32), hadm_id="hadm_id"))
    keys = vis.select("visit_no", "out_id", "hadm_id", "discharge")
    codes, _ = icd_codes(dec.diagnoses, dictionary)
    dx = dec.diagnoses.join(codes, on=["scheme", "value"], how="left").join(keys, on="visit_no")
    dx_code = (pl.when(pl.col("scheme") == "string").then(pl.col("token"))
               .otherwise(pl.lit(f"{DIAGNOSIS}//") + pl.col("scheme").str.slice(3) + pl.lit("//") + pl.col("icd_code")))
    frames.append(dx.select(subject_id="out_id", time="discharge", code=dx_code,
                            numeric_value=pl.lit(None, pl.Float32), hadm_id="hadm_id"))
    frames.append(dec.other.join(keys, on="visit_no").select(
        subject_id="out_id", time="discharge", code="token", numeric_value=pl.lit(None, pl.Float32),
        hadm_id="hadm_id"))
    frames.append(dec.labs.join(keys, on="visit_no").select(
        subject_id="out_id", time="time",
        code=pl.lit(f"{LAB}//") + pl.col("item") + pl.lit("//") + pl.col("unit").fill_null("UNK"),
        numeric_value=pl.col("value").cast(pl.Float32), hadm_id="hadm_id"))
    events = (pl.concat(frames).with_columns(pl.col("subject_id").cast(pl.Int64))
              .sort("subject_id", "time", "code", nulls_last=False, maintain_order=True))

    table = _checked(meds.DataSchema, _arrow(events))
    (folder / "data" / "train").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    _write_parquet(table, folder / "data" / "train" / "0.parquet")

    code_rows = _code_metadata(ds, dx, codes, events)
    _write_parquet(_checked(meds.CodeMetadataSchema, _arrow(code_rows)), folder / meds.code_metadata_filepath)
    ids = p.select(subject_id=pl.col("out_id").cast(pl.Int64), patient_id="patient_id", synthetic="synthetic")
    splits = ids.select("subject_id", split=pl.lit(meds.train_split))
    _write_parquet(_checked(meds.SubjectSplitSchema, _arrow(splits)), folder / meds.subject_splits_filepath)
    _write_parquet(_arrow(ids), folder / SYNTHETIC_FILE)
    outcome = str(ds.meta.get("outcome", "outcome"))
    final = vis.filter(pl.col("is_final")).select(
        subject_id=pl.col("out_id").cast(pl.Int64), prediction_time="discharge",
        boolean_value=pl.col("label") == 1)
    (folder / "labels").mkdir(exist_ok=True)
    _write_parquet(_checked(meds.LabelSchema, _arrow(final)), folder / "labels" / f"{outcome}.parquet")
    info = {"dataset_name": f"halo_balance export of {ds.meta.get('source', {}).get('name', 'a prepared dataset')}",
            "dataset_version": str(ds.meta.get("source", {}).get("version", "")),
            "etl_name": "halo_balance.export", "etl_version": _version(), "meds_version": meds.__version__,
            "created_at": datetime.now(timezone.utc).replace(tzinfo=None).isoformat(),
            "raw_source_id_columns": ["hadm_id"],
            "synthetic_subjects": SYNTHETIC_FILE, "n_synthetic_subjects": int(p["synthetic"].sum())}
    meds.DatasetMetadataSchema.validate(info)
    write_json(folder / meds.dataset_metadata_filepath, info)
    return dec, {"data": events.height, "codes": code_rows.height, "subjects": p.height}


def _code_metadata(ds: PreparedDataset, dx: pl.DataFrame, codes: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """``codes.parquet``: every code written, its description and (ICD) parent code."""
    used = events.select("code").unique()
    dx_meta = dx.select(code=pl.when(pl.col("scheme") == "string").then(pl.col("token")).otherwise(
        pl.lit(f"{DIAGNOSIS}//") + pl.col("scheme").str.slice(3) + pl.lit("//") + pl.col("icd_code")),
        description="description",
        parent=pl.when(pl.col("scheme") == "string").then(pl.lit(None, pl.String)).otherwise(
            pl.lit("ICD") + pl.col("scheme").str.slice(3) + pl.lit("CM/")
            + dotted(pl.col("icd_code"), pl.col("scheme").str.slice(3).cast(pl.Int64)))).unique("code")
    items = ds.meta.get("preprocessing", {}).get("labs", {}).get("items", [])
    lab_meta = pl.DataFrame({"item": [str(i["item"]) for i in items], "description": [i["label"] for i in items],
                             "unit": [i.get("unit") for i in items]}, schema={
        "item": pl.String, "description": pl.String, "unit": pl.String}).select(
        code=pl.lit(f"{LAB}//") + pl.col("item") + pl.lit("//") + pl.col("unit").fill_null("UNK"),
        description="description", parent=pl.lit(None, pl.String))
    known = pl.concat([dx_meta, lab_meta]).unique("code", keep="first")
    out = used.join(known, on="code", how="left").sort("code")
    return out.select("code", "description",
                      parent_codes=pl.when(pl.col("parent").is_not_null()).then(pl.concat_list("parent"))
                      .cast(pl.List(pl.String)))


def _arrow(frame: pl.DataFrame) -> pa.Table:
    """``frame`` as arrow with plain ``string`` / ``list`` types (polars gives large ones; MEDS wants plain)."""
    table = frame.to_arrow()

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t):
            return pa.string()
        if pa.types.is_large_list(t):
            return pa.list_(plain(t.value_type))
        return t
    return table.cast(pa.schema([pa.field(f.name, plain(f.type), f.nullable) for f in table.schema]))


def _checked(schema, table: pa.Table) -> pa.Table:
    """``table`` after the ``meds`` schema's check (which raises on a mismatch)."""
    schema.validate(table)
    return table


def _write_parquet(table: pa.Table, path: Path) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def _version() -> str:
    import halo_balance

    return halo_balance.__version__
