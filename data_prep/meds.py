"""A MEDS dataset (Medical Event Data Standard) to the prepared dataset.

``python -m data_prep.meds --root MEDS_DIR --out DIR`` reads ``MEDS_DIR/data/**/*.parquet``
(``subject_id``, ``time``, ``code``, ``numeric_value`` and any extra columns) and, when present,
``MEDS_DIR/metadata/codes.parquet`` for descriptions. It takes the preparers' common options
(``--n-lab-items``, ``--n-bins``, ``--lab-tokens``, ``--time-bins``, ``--max-visits``,
``--bins-from``, ``--overwrite``, ``--quiet``; ``--outcome`` other than ``mortality`` is an error:
the outcome comes from death events or ``--labels``). With ``--bins-from D`` the options that define
the representation are D's (:func:`data_prep.common.settings`); the options below say how to read
this MEDS dataset and are its own.
The defaults read the layout of the MIMIC-IV MEDS extraction; every rule below can be overridden.

Rules (also written to ``meta.json`` under ``preprocessing.rules``)
-------------------------------------------------------------------
- **Visits**, ``--visit-rule admission`` (default): an admission event (code ``--admission-code``,
  default ``HOSPITAL_ADMISSION``, or that code followed by ``//...``) opens a visit that the
  subject's first discharge event at or after it (``--discharge-code``, default
  ``HOSPITAL_DISCHARGE``) closes; an admission whose discharge comes only after the next admission
  (or never) is dropped (``admissions_without_discharge``). An event belongs to the latest visit
  admitted at or before its time if it is not after that visit's discharge; other events are
  dropped by kind (``diagnosis_events_outside_visits``, ...). ``--visit-rule gap``: the subject's
  timed events (birth and death left aside) form one visit while consecutive events are at most
  ``--gap-hours`` (24) apart. Visits are ordered by start time; ``--max-visits N`` keeps the N most
  recent.
- **Outcome**: 1 when a death event (``--death-code``, default ``MEDS_DEATH``) falls within the
  final visit (a death stamped at midnight, i.e. a date, counts when its date is within the
  visit's dates; under the gap rule up to ``--gap-hours`` after its last event), else 0; on the
  final visit, earlier visits 0. With ``--labels FILE`` (a MEDS label table: ``subject_id``,
  ``prediction_time``, ``boolean_value`` or ``integer_value``) each subject's latest label row is
  the outcome instead: visits that start after its ``prediction_time`` and events after it are
  dropped (counted), and subjects without a label are dropped (``patients_without_outcome``).
  ``meta.json`` names the outcome: ``in_hospital_mortality`` (``--outcome mortality``) from death
  events; from a label file, the file's name without ``.parquet`` (``readmission_30d.parquet``, as
  ``halo_balance.export`` writes it, gives ``readmission_30d``), with ``preprocessing.outcome.option``
  null. With ``--bins-from D`` the outcome must be D's: D's mortality from death events (or a label
  file of that name), any other outcome from a label file named after it.
- **Diagnoses**: ``DIAGNOSIS//ICD//<version>//<code>`` (``--diagnosis-prefix``) -> ``dx9:`` /
  ``dx10:<category>``, the category as in the MIMIC-IV preparer (the part before the decimal
  point; 3 characters, 4 for ICD-9 E codes). With ``--bins-from``, a code equal to one of the
  reference vocabulary's other tokens (e.g. eICU's ``dxstr:`` paths, as ``halo_balance.export``
  writes them) is that token.
- **Labs**: ``LAB//<item>//<unit>`` (``--lab-prefix``): the ``--n-lab-items`` items with the most
  numeric values in visits; per visit, the mean of each item's ``numeric_value`` (float32 in MEDS,
  read exactly as stored), binned by the item's quantiles of the visit means as in the other
  preparers (``--lab-tokens every``: each value binned by the item's quantiles over all values, a
  token for every bin the visit touched); token ``lab:<item>:<bin>``; ``UNK`` is an empty unit.
- **Time tokens** (``--time-bins N``, see :mod:`data_prep.time_tokens`): ``time:age:<b>`` on the
  first kept visit, the whole years from ``MEDS_BIRTH`` to its start; ``time:gap:<b>`` on later
  visits, the days from the previous visit's end to this one's start.
- **Groups** (``--group ATTR=SOURCE``, repeatable): ``code:PREFIX`` the value after ``PREFIX//`` of
  the subject's latest such event (static events, with no time, count as the earliest), e.g.
  ``gender=code:GENDER``; ``column:NAME`` the latest non-empty value of an extra column, e.g.
  ``race=column:race``; ``age:E1,E2,...`` the age in whole years at the first kept visit from
  ``MEDS_BIRTH``, grouped ``<E1``, ``E1-(E2-1)``, ..., ``Ek+``. A subject without a value is
  ``Unknown``. Defaults: the MIMIC-IV extraction's ``gender=code:GENDER``, ``race=column:race``,
  ``insurance=column:insurance``, ``age_group=age:18,45,65,80`` (those whose source occurs); with
  ``--bins-from``, the reference's attributes as static codes (``ATTR=code:ATTR``, upper case:
  what ``halo_balance.export --format meds`` writes) where the data has them, else by the
  reference's own rule (a reference prepared by ``data_prep.meds``); an attribute with neither is an
  error (every subject would be Unknown), and ``--group`` rules given with ``--bins-from`` must name
  exactly the reference's attributes. Categories are the values as written.
- **Drops**: every event, visit or subject left out is counted by reason in ``meta.json``.
  The selected events (admissions, discharges, deaths, diagnoses, labs, group sources) are
  gathered in memory; the lab aggregation streams.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from halo_balance.cli import run
from halo_balance.data import META_FILE, PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.io import check_output_dir

from .common import (Counts, LabTokenMode, Outcome, Progress, RawTable, Reasons, Reference, add_common_arguments,
                     check_parameters, finish, icd_category, lab_tokens, order_visits, settings, summary)
from .outcomes import OUTCOME_NAMES, OutcomeSpec
from .time_tokens import time_rules, time_tokens

SOURCE = "meds"
LAB_SOURCE = "meds:LAB"
BIRTH, DEATH = "MEDS_BIRTH", "MEDS_DEATH"
DEFAULT_GROUPS = ("gender=code:GENDER", "race=column:race", "insurance=column:insurance",
                  "age_group=age:18,45,65,80")
UNKNOWN = "Unknown"


@dataclass(frozen=True)
class GroupRule:
    """One group attribute and where it comes from (``code``, ``column`` or ``age``)."""

    attribute: str
    kind: Literal["code", "column", "age"]
    arg: str

    @classmethod
    def parse(cls, spec: str) -> GroupRule:
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(code|column|age):(.+)", spec)
        if not m:
            raise DatasetError("expected ATTRIBUTE=code:PREFIX, ATTRIBUTE=column:NAME or ATTRIBUTE=age:E1,E2,...",
                               column="--group", value=spec)
        rule = cls(m.group(1), m.group(2), m.group(3).strip())  # type: ignore[arg-type]
        if rule.kind == "age":
            rule.edges()
        return rule

    def edges(self) -> list[int]:
        try:
            e = [int(x) for x in self.arg.split(",")]
        except ValueError:
            e = []
        if not e or e != sorted(set(e)):
            raise DatasetError("age groups need increasing whole-year edges", column="--group", value=self.arg)
        return e

    def age_labels(self) -> list[str]:
        e = self.edges()
        return [f"<{e[0]}"] + [f"{a}-{b - 1}" for a, b in zip(e[:-1], e[1:])] + [f"{e[-1]}+"]

    def __str__(self) -> str:
        return f"{self.attribute}={self.kind}:{self.arg}"


def prepare_meds(root: str | os.PathLike, out: str | os.PathLike, *, n_lab_items: int | None = None,
                 n_bins: int | None = None, lab_tokens: LabTokenMode | None = None, time_bins: int | None = None,
                 outcome: Outcome | None = None, max_visits: int | None = None,
                 bins_from: str | os.PathLike | None = None,
                 visit_rule: Literal["admission", "gap"] = "admission",
                 admission_code: str = "HOSPITAL_ADMISSION", discharge_code: str = "HOSPITAL_DISCHARGE",
                 gap_hours: float = 24.0, death_code: str = DEATH, labels: str | os.PathLike | None = None,
                 groups: Sequence[str] | None = None, diagnosis_prefix: str = "DIAGNOSIS//ICD",
                 lab_prefix: str = "LAB", overwrite: bool = False, progress: bool = True) -> PreparedDataset:
    """Prepare the MEDS dataset under ``root`` into the folder ``out`` (see the module rules).

    Parameters
    ----------
    root : MEDS dataset folder (``data/`` and optionally ``metadata/``).
    out : output folder, written atomically; it must not exist unless ``overwrite``.
    n_lab_items, n_bins, lab_tokens, time_bins, max_visits, bins_from : as in ``data_prep.mimic_iv``
        (``None``: the default or the ``bins_from`` folder's).
    outcome : only ``"mortality"`` (the death rule), or ``None``; ``labels`` gives any other outcome.
    visit_rule : ``"admission"`` (admission and discharge codes) or ``"gap"`` (time gaps).
    admission_code, discharge_code : codes (or code prefixes before ``//``) that open and close a visit.
    gap_hours : the largest gap within a visit under the gap rule.
    death_code : the death event's code (outcome rule).
    labels : a MEDS label parquet file to take the outcome from instead.
    groups : ``ATTR=SOURCE`` rules (see the module docstring); default as documented there.
    diagnosis_prefix, lab_prefix : code prefixes of ICD diagnoses and lab values.
    overwrite : replace ``out`` if it exists.
    progress : show step progress on stderr.
    """
    check_parameters(n_lab_items=n_lab_items, n_bins=n_bins, max_visits=max_visits, time_bins=time_bins,
                     lab_tokens=lab_tokens, outcome=outcome)
    if outcome is not None and labels is not None:
        raise DatasetError("--outcome and --labels exclude each other: the label file is the outcome",
                           column="outcome", value=outcome, fix="leave --outcome out")
    if outcome not in (None, "mortality"):
        raise DatasetError("data_prep.meds takes the outcome from death events or a MEDS label file",
                           column="outcome", value=outcome,
                           fix="pass the outcome as a MEDS label table with --labels (readmission and long-stay "
                               "rules belong to data_prep.mimic_iv and data_prep.eicu)")
    if visit_rule not in ("admission", "gap"):
        raise DatasetError("must be 'admission' or 'gap'", column="visit_rule", value=visit_rule)
    if gap_hours <= 0:
        raise DatasetError("must be positive", column="gap_hours", value=gap_hours)
    check_output_dir(out, overwrite=overwrite, inputs=[root, bins_from, labels])
    reference = Reference.load(bins_from, source=None, lab_source=None) if bins_from else None
    opts = settings(n_bins=n_bins, time_bins=time_bins, lab_tokens=lab_tokens, n_lab_items=n_lab_items,
                    outcome=None, max_visits=max_visits, reference=reference)
    n_bins, time_bins, lab_mode, n_lab_items, max_visits = (
        opts.n_bins, opts.time_bins, opts.lab_mode, opts.n_lab_items, opts.max_visits)
    rules_text = _rules_text(visit_rule, labels is not None, lab_mode, bool(time_bins))
    outcome_spec = _outcome_spec(labels, rules_text["outcome"], reference)
    root = Path(root)
    files = sorted((root / "data").glob("**/*.parquet")) if (root / "data").is_dir() else []
    if not files:
        raise DatasetError("no MEDS data shards found (looked for data/**/*.parquet)", file=str(root / "data"),
                           fix="point --root at a MEDS dataset folder (holding data/ and metadata/)")
    events = pl.scan_parquet(files)
    columns = events.collect_schema()
    for col in ("subject_id", "time", "code"):
        if col not in columns:
            raise DatasetError("required MEDS column is missing", file=str(files[0]), column=col,
                               fix="MEDS data needs subject_id, time and code")
    table = RawTable("events", root / "data", tuple(columns))
    counts = Counts()
    rules = _group_rules(groups, reference, events, columns)
    with_labs = bool(reference.lab_items) if reference else n_lab_items > 0

    with Progress(4 + with_labs + bool(time_bins), desc="prepare MEDS", enabled=progress) as steps:
        with steps.step("visits"):
            counts.rows_read["events"] = int(events.select(pl.len()).collect().item())
            visits = _visits(events, visit_rule, admission_code, discharge_code, death_code, gap_hours, counts)
            visits, cutoff = _outcome(events, visits, death_code, labels, visit_rule, gap_hours, counts)
            visits = order_visits(visits.rename({"subject_id": "patient_id"}), by=["admit", "key"],
                                  max_visits=max_visits, counts=counts, reason="visits_beyond_max_visits")
            kept = visits.filter(pl.col("kept")).rename({"patient_id": "subject_id"})
        with steps.step("diagnoses and group attributes"):
            assigned = _assign(events, kept, cutoff, visit_rule, gap_hours)
            dx_tokens, dx_vocab = _diagnoses(assigned, root, diagnosis_prefix, reference, counts)
            people = _groups(events, kept, rules)
        labs = None
        if with_labs:
            labs = _labs(assigned, table, root, lab_prefix, n_lab_items, n_bins, reference, counts, steps,
                         mode=lab_mode)
        time = None
        if time_bins:
            with steps.step("time tokens"):
                time = time_tokens(_timeline(events, visits), n_bins=time_bins, reference=opts.time_reference,
                                   counts=counts)
        with steps.step("vocabulary and visits"):
            vis = kept.select(patient_id=pl.col("subject_id").cast(pl.String), key="key", visit_index="visit_index",
                              label=pl.when(pl.col("is_final")).then(pl.col("outcome")).otherwise(0).cast(pl.Int8))
            canonical = {r.attribute: _categories(people[r.attribute], r) for r in rules}
            ds = finish(source=SOURCE, module="data_prep.meds", root=root, tables={"events": table},
                        parameters={"n_lab_items": n_lab_items, "max_visits": max_visits, "visit_rule": visit_rule,
                                    "admission_code": admission_code, "discharge_code": discharge_code,
                                    "gap_hours": gap_hours, "death_code": death_code,
                                    "labels": str(labels) if labels else None, "groups": [str(r) for r in rules],
                                    "diagnosis_prefix": diagnosis_prefix, "lab_prefix": lab_prefix},
                        rules=rules_text, visits=vis, dx_tokens=dx_tokens, dx_vocab=dx_vocab, lab_source=LAB_SOURCE,
                        labs=labs, n_bins=n_bins, bins_from=bins_from, reference=reference, patients=people,
                        canonical=canonical, counts=counts, outcome=outcome_spec, lab_mode=lab_mode, time=time)
        with steps.step(f"write {out}"):
            ds.save(out, overwrite=overwrite)
    return ds


# ---------------------------------------------------------------------- visits and outcome
def _outcome_spec(labels: str | os.PathLike | None, rule: str, reference: Reference | None) -> OutcomeSpec:
    """The outcome as ``meta.json`` records it: in-hospital mortality from death events, or the label
    file's outcome, named by the file (``readmission_30d.parquet``: ``readmission_30d``), with no
    ``--outcome`` option behind it. With a reference, the outcome must be the reference's."""
    if labels is None:
        spec = OutcomeSpec("mortality", OUTCOME_NAMES["mortality"], rule)
    else:
        spec = OutcomeSpec(None, Path(labels).name.removesuffix(".parquet"), rule)
    ref = reference.meta.get("outcome") if reference is not None else None
    if ref is None or ref == spec.name:
        return spec
    where = {"file": str(reference.path / META_FILE), "column": "outcome"}
    if labels is None:
        raise DatasetError(f"the --bins-from folder's outcome is {ref!r}; data_prep.meds labels only deaths "
                           "from events, any other outcome comes from a MEDS label file", **where,
                           fix=f"pass --labels with the label file of {ref!r} (halo_balance.export writes it as "
                               f"labels/{ref}.parquet)")
    death = " or leave --labels out to label deaths" if ref == OUTCOME_NAMES["mortality"] else ""
    raise DatasetError(f"--labels {labels} gives the outcome {spec.name!r} (the file's name); the --bins-from "
                       f"folder's is {ref!r}", **where, fix=f"pass the label file of {ref!r}, named "
                                                           f"{ref}.parquet{death}")


def _is_code(code: str) -> pl.Expr:
    """The event's code is ``code`` or starts with ``code//``."""
    return (pl.col("code") == code) | pl.col("code").str.starts_with(code + "//")


def _visits(events: pl.LazyFrame, rule: str, admission: str, discharge: str, death: str, gap_hours: float,
            counts: Counts) -> pl.DataFrame:
    """``subject_id``, ``key``, ``admit``, ``disch`` of every visit."""
    timed = events.filter(pl.col("time").is_not_null()).select("subject_id", "time", "code")
    if rule == "admission":
        adm = (timed.filter(_is_code(admission)).select("subject_id", admit="time").unique()
               .sort("subject_id", "admit").collect())
        dis = (timed.filter(_is_code(discharge)).select("subject_id", disch="time").unique()
               .sort("subject_id", "disch").collect())
        v = (adm.join_asof(dis, left_on="admit", right_on="disch", by="subject_id", strategy="forward",
                        check_sortedness=False)  # sorted by subject, then time
             .with_columns(nxt=pl.col("admit").shift(-1).over("subject_id")))
        ok = pl.col("disch").is_not_null() & (pl.col("nxt").is_null() | (pl.col("disch") <= pl.col("nxt")))
        counts.drop("admissions_without_discharge", v.filter(~ok).height)
        v = v.filter(ok).drop("nxt")
    else:
        gap = pl.duration(microseconds=int(gap_hours * 3_600_000_000))
        v = (timed.filter(pl.col("code") != BIRTH, ~_is_code(death)).select("subject_id", "time").unique()
             .sort("subject_id", "time").collect()
             .with_columns(new=(pl.col("time").diff().over("subject_id") > gap).fill_null(True))
             .with_columns(n=pl.col("new").cum_sum().over("subject_id"))
             .group_by("subject_id", "n", maintain_order=True).agg(admit=pl.col("time").min(),
                                                                    disch=pl.col("time").max()).drop("n"))
    counts.note("visits_found", v.height)
    return v.sort("subject_id", "admit").with_row_index("key").with_columns(pl.col("key").cast(pl.Int64))


def _outcome(events: pl.LazyFrame, visits: pl.DataFrame, death: str, labels: str | os.PathLike | None,
             rule: str, gap_hours: float, counts: Counts) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Visits with ``outcome`` (the subject's); with a label file also the per-subject cut-off time."""
    if labels is not None:
        path = Path(labels)
        if not path.is_file():
            raise DatasetError("label file not found", file=str(path), fix="pass --labels a MEDS label parquet file")
        lab = pl.read_parquet(path)
        value = next((c for c in ("boolean_value", "integer_value") if c in lab.columns), None)
        if value is None or "prediction_time" not in lab.columns or "subject_id" not in lab.columns:
            raise DatasetError("a MEDS label file needs subject_id, prediction_time and boolean_value or "
                               "integer_value", file=str(path), column=value or "boolean_value")
        counts.note("label_rows", lab.height)
        last = (lab.sort("subject_id", "prediction_time").group_by("subject_id", maintain_order=True)
                .agg(cutoff=pl.col("prediction_time").last(), outcome=(pl.col(value).last().cast(pl.Int64) != 0)
                     .cast(pl.Int8)))
        counts.note("subjects_with_several_labels", lab.height - last.height)
        v = visits.join(last, on="subject_id", how="left")
        no_label = v.filter(pl.col("outcome").is_null())
        counts.drop("patients_without_outcome", no_label["subject_id"].n_unique())
        counts.drop("visits_of_patients_without_outcome", no_label.height)
        v = v.filter(pl.col("outcome").is_not_null())
        late = pl.col("admit") > pl.col("cutoff")
        counts.drop("visits_after_prediction_time", v.filter(late).height)
        v = v.filter(~late)
        return v.drop("cutoff"), last.select("subject_id", "cutoff")
    deaths = (events.filter(_is_code(death), pl.col("time").is_not_null()).select("subject_id", t="time")
              .collect())
    final = visits.filter(pl.col("admit") == pl.col("admit").max().over("subject_id"))
    slack = pl.duration(microseconds=int(gap_hours * 3_600_000_000)) if rule == "gap" else pl.duration(seconds=0)
    at_midnight = pl.col("t") == pl.col("t").dt.truncate("1d")
    within = ((pl.col("t") >= pl.col("admit")) & (pl.col("t") <= pl.col("disch") + slack)) | (
        at_midnight & (pl.col("t").dt.date() >= pl.col("admit").dt.date())
        & (pl.col("t").dt.date() <= pl.col("disch").dt.date()))
    died = final.join(deaths, on="subject_id").filter(within).select("subject_id").unique()
    early = deaths.join(final.select("subject_id", "admit"), on="subject_id").filter(pl.col("t") < pl.col("admit"))
    counts.note("patients_death_before_final_visit", early["subject_id"].n_unique())
    counts.note("patients_death_events", deaths["subject_id"].n_unique())
    out = visits.with_columns(outcome=pl.col("subject_id").is_in(died["subject_id"].implode()).cast(pl.Int8))
    return out, None


def _assign(events: pl.LazyFrame, kept: pl.DataFrame, cutoff: pl.DataFrame | None, rule: str,
            gap_hours: float) -> pl.LazyFrame:
    """Timed events with the ``key`` of their visit (null outside every kept visit)."""
    windows = kept.select("subject_id", "key", "admit", "disch").sort("subject_id", "admit")
    ev = events.filter(pl.col("time").is_not_null())
    cols = ["subject_id", "time", "code"] + (["numeric_value"] if "numeric_value" in events.collect_schema() else [])
    ev = ev.select(cols).sort("subject_id", "time")
    if cutoff is not None:
        ev = ev.join(cutoff.lazy(), on="subject_id", how="left").with_columns(
            late=pl.col("time") > pl.col("cutoff")).drop("cutoff")
    else:
        ev = ev.with_columns(late=pl.lit(False))
    return (ev.join_asof(windows.lazy(), left_on="time", right_on="admit", by="subject_id", strategy="backward",
                       check_sortedness=False)
            .with_columns(key=pl.when((pl.col("time") <= pl.col("disch")) & ~pl.col("late")).then("key")))


# ---------------------------------------------------------------------- tokens
def _code_descriptions(root: Path) -> pl.DataFrame:
    path = root / "metadata" / "codes.parquet"
    if not path.is_file():
        return pl.DataFrame(schema={"code": pl.String, "description": pl.String})
    return pl.read_parquet(path, columns=["code", "description"]).drop_nulls("description").unique("code")


def _diagnoses(assigned: pl.LazyFrame, root: Path, prefix: str, reference: Reference | None,
               counts: Counts) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Diagnosis tokens per visit (key, token, kind) and their vocabulary rows."""
    parts = pl.col("code").str.slice(len(prefix) + 2).str.split("//")
    dx = (assigned.filter(pl.col("code").str.starts_with(prefix + "//"))
          .select("key", "code", ver=parts.list.get(0, null_on_oob=True).cast(pl.Int64, strict=False),
                  icd=parts.list.get(1, null_on_oob=True)).collect())
    counts.drop("diagnosis_events_outside_visits", dx.filter(pl.col("key").is_null()).height)
    bad = dx.filter(pl.col("key").is_not_null(), ~pl.col("ver").is_in([9, 10]).fill_null(False) | pl.col("icd").is_null())
    counts.drop("diagnosis_events_bad_version_or_code", bad.height)
    dx = dx.filter(pl.col("key").is_not_null(), pl.col("ver").is_in([9, 10]), pl.col("icd").is_not_null())
    counts.note("diagnosis_events_used", dx.height)
    dx = dx.with_columns(cat=icd_category(pl.col("icd"), pl.col("ver")))
    token = pl.lit("dx") + pl.col("ver").cast(pl.String) + pl.lit(":") + pl.col("cat")
    tokens = dx.select("key", token=token, kind=pl.lit("diagnosis")).unique()
    desc = (dx.join(_code_descriptions(root), on="code", how="left").sort("ver", "cat", "icd")
            .group_by("ver", "cat", maintain_order=True).agg(pl.col("description").drop_nulls().first()))
    vocab = desc.select(token=token, kind=pl.lit("diagnosis"), description=pl.col("description").fill_null(
        pl.lit("ICD-") + pl.col("ver").cast(pl.String) + pl.lit(" category ") + pl.col("cat")))
    if reference is not None:  # codes that are the reference's own tokens (dxstr: paths, ...)
        other = reference.vocab.filter(~pl.col("kind").is_in(["lab", "time"]),
                                       ~pl.col("token").str.contains(r"^dx(9|10):"))
        lit = (assigned.filter(pl.col("key").is_not_null()).join(other.lazy().select(code="token", kind="kind"),
                                                                  on="code").select("key", token="code", kind="kind")
               .unique().collect())
        counts.note("events_matching_reference_tokens", lit.height)
        tokens = pl.concat([tokens, lit])
    return tokens, vocab.sort("token")


def _timeline(events: pl.LazyFrame, visits: pl.DataFrame) -> pl.DataFrame:
    """The kept visits' ``key``, ``visit_index``, ``age_years`` (whole years from ``MEDS_BIRTH`` to the
    visit's start) and ``gap_days`` since the end of the subject's previous visit (``gap_status``)."""
    births = (events.filter(pl.col("code") == BIRTH, pl.col("time").is_not_null()).group_by("subject_id")
              .agg(birth=pl.col("time").min()).collect())
    day = 86_400_000_000  # microseconds
    prev = pl.col("disch").shift(1).over("subject_id")
    v = (visits.rename({"patient_id": "subject_id"}).sort("subject_id", "order")
         .with_columns(gap_days=(pl.col("admit") - prev).dt.total_microseconds() / day,
                       gap_status=pl.when(pl.col("order") == 0).then(pl.lit("first")).otherwise(pl.lit("ok")))
         .join(births, on="subject_id", how="left"))
    return v.filter(pl.col("kept")).select(
        "key", "visit_index", "gap_days", "gap_status",
        age_years=((pl.col("admit") - pl.col("birth")).dt.total_days() / 365.25).floor())


def _labs(assigned: pl.LazyFrame, table: RawTable, root: Path, prefix: str, n_items: int, n_bins: int,
          reference: Reference | None, counts: Counts, steps: Progress, *, mode: LabTokenMode):
    reasons = Reasons()
    parts = pl.col("code").str.slice(len(prefix) + 2).str.split("//")
    unit = parts.list.get(1, null_on_oob=True)
    value = (pl.col("numeric_value").cast(pl.Float64).cast(pl.String) if "numeric_value" in
             assigned.collect_schema() else pl.lit(None, pl.String))
    branch = (assigned.filter(pl.col("code").str.starts_with(prefix + "//"))
              .select(pl.col("key").fill_null(-1), item=parts.list.get(0), raw=value,
                      unit=pl.when(unit != "UNK").then(unit),
                      status=pl.when(pl.col("key").is_null()).then(reasons.lit("lab_events_outside_visits"))
                      .otherwise(pl.lit(0, dtype=pl.UInt16))))
    names = (_code_descriptions(root).filter(pl.col("code").str.starts_with(prefix + "//"))
             .select(item=pl.col("code").str.slice(len(prefix) + 2).str.split("//").list.get(0), description="description")
             .unique("item", keep="first"))
    res = lab_tokens([branch], table=table, value_column="numeric_value", reasons=reasons, n_items=n_items,
                     n_bins=n_bins, labels=dict(names.iter_rows()), counts=counts, progress=steps,
                     reference=reference.lab_items if reference else None, mode=mode)
    counts.note("lab_events", res.branch_rows[0])
    return res


# ---------------------------------------------------------------------- groups
def _group_rules(specs: Sequence[str] | None, reference: Reference | None, events: pl.LazyFrame,
                 columns: dict) -> list[GroupRule]:
    if specs:
        rules = [GroupRule.parse(s) for s in specs]
        for r in rules:
            if r.kind == "column" and r.arg not in columns:
                raise DatasetError(f"group {r.attribute!r} reads a column the MEDS data does not have",
                                   column=r.arg, fix=f"the data's columns are {list(columns)}")
        ref_groups = list(reference.meta["groups"]) if reference is not None else None
        if ref_groups is not None and sorted(r.attribute for r in rules) != sorted(ref_groups):
            raise DatasetError(f"--group gives the attributes {[r.attribute for r in rules]}; the --bins-from "
                               f"folder's are {ref_groups}", column="--group",
                               fix="give one --group for each of the folder's attributes, or leave --group out")
    elif reference is not None:  # the reference's attributes: static codes (export), else its own rules
        own = {}
        if reference.meta["preprocessing"].get("module") == "data_prep.meds":
            own = {r.attribute: r for r in map(GroupRule.parse, reference.parameter("groups") or [])}
        rules = []
        for attribute in reference.meta["groups"]:
            static = GroupRule(attribute, "code", attribute.upper())
            rule = static if _present(static, events, columns) or attribute not in own else own[attribute]
            if not _present(rule, events, columns):
                raise DatasetError(f"the --bins-from folder's group {attribute!r} has no source in this data "
                                   f"(looked for {rule}); every subject would be {UNKNOWN}", column="--group",
                                   value=str(rule), fix=f"name its source with --group {attribute}=code:PREFIX, "
                                                        f"{attribute}=column:NAME or {attribute}=age:E1,E2,...")
            rules.append(rule)
    else:  # the MIMIC-IV extraction's sources, those that occur
        rules = [r for r in map(GroupRule.parse, DEFAULT_GROUPS) if _present(r, events, columns)]
    names = [r.attribute for r in rules]
    if len(set(names)) != len(names):
        raise DatasetError("a group attribute is given twice", column="--group", value=names)
    return rules


def _present(rule: GroupRule, events: pl.LazyFrame, columns: dict) -> bool:
    """Whether the data holds the source of a group rule at all."""
    if rule.kind == "column":
        return rule.arg in columns
    cond = (pl.col("code") == BIRTH) if rule.kind == "age" else pl.col("code").str.starts_with(rule.arg + "//")
    return events.filter(cond).select(pl.len()).collect().item() > 0


def _groups(events: pl.LazyFrame, kept: pl.DataFrame, rules: Sequence[GroupRule]) -> pl.DataFrame:
    """One row per subject with kept visits: ``patient_id``, ``label`` and each group attribute."""
    final = kept.filter(pl.col("is_final")).select("subject_id", label=pl.col("outcome").cast(pl.Int8))
    first = kept.filter(pl.col("visit_index") == 0).select("subject_id", first="admit")
    out = final.join(first, on="subject_id", how="left")
    ordered = events.with_row_index("_row").sort("subject_id", "time", "_row", nulls_last=False)
    for r in rules:
        if r.kind == "code":
            vals = (ordered.filter(pl.col("code").str.starts_with(r.arg + "//"))
                    .group_by("subject_id").agg(v=pl.col("code").last().str.slice(len(r.arg) + 2)))
        elif r.kind == "column":
            vals = (ordered.filter(pl.col(r.arg).is_not_null(), pl.col(r.arg).cast(pl.String).str.strip_chars() != "")
                    .group_by("subject_id").agg(v=pl.col(r.arg).last().cast(pl.String).str.strip_chars()))
        else:
            e, labels = r.edges(), r.age_labels()
            births = ordered.filter(pl.col("code") == BIRTH, pl.col("time").is_not_null()).group_by(
                "subject_id").agg(birth=pl.col("time").first())
            age = ((pl.col("first") - pl.col("birth")).dt.total_days() / 365.25).floor()
            group = pl.when(age < e[0]).then(pl.lit(labels[0]))
            for edge, label in zip(e[1:], labels[1:-1]):
                group = group.when(age < edge).then(pl.lit(label))
            vals = births.join(first.lazy(), on="subject_id").select(
                "subject_id", v=group.otherwise(pl.lit(labels[-1])))
        out = out.join(vals.collect(), on="subject_id", how="left").with_columns(
            pl.col("v").fill_null(UNKNOWN).alias(r.attribute)).drop("v")
    return out.sort("subject_id").select(patient_id=pl.col("subject_id").cast(pl.String), label="label",
                                         *[r.attribute for r in rules])


def _categories(values: pl.Series, rule: GroupRule) -> list[str]:
    """Every value of an attribute, in order: age groups as defined, others sorted; Unknown last."""
    seen = set(values.to_list())
    order = rule.age_labels() if rule.kind == "age" else sorted(seen - {UNKNOWN})
    return [c for c in order if c in seen] + ([UNKNOWN] if UNKNOWN in seen else [])


def _rules_text(visit_rule: str, with_labels: bool, lab_mode: str, with_time: bool) -> dict[str, str]:
    time = time_rules(age="whole years from MEDS_BIRTH to the visit's start",
                      gap="days from the previous visit's end to this one's start") if with_time else {}
    return {
        **time,
        "visit": ("admission code opens, the first discharge code at or after it closes; events by time "
                  "into the latest visit admitted at or before them" if visit_rule == "admission"
                  else "timed events at most gap_hours apart (birth and death aside) form a visit"),
        "outcome": ("the subject's latest label row; visits and events after its prediction_time dropped"
                    if with_labels else "death code within the final visit (a midnight death by date)"),
        "diagnosis": "DIAGNOSIS//ICD//<version>//<code> -> dx<version>:<category before the decimal point>",
        "labs": ("LAB//<item>//<unit>: visit mean of numeric_value per item, binned by quantiles of visit means"
                 if lab_mode == "mean" else "LAB//<item>//<unit>: each numeric_value binned by the item's quantiles "
                 "over all values; a token per bin the visit touched"),
        "groups": "code:PREFIX latest value after PREFIX//; column:NAME latest non-empty value; "
                  "age:E1,... age at the first visit from MEDS_BIRTH; missing -> Unknown",
    }


# ---------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_prep.meds", description=__doc__.split("\n\n")[0])
    add_common_arguments(p, root_help="MEDS dataset folder (holding data/ and metadata/)", visit="visits")
    p.add_argument("--visit-rule", choices=["admission", "gap"], default="admission",
                   help="visits from admission/discharge codes (default) or from time gaps")
    p.add_argument("--admission-code", default="HOSPITAL_ADMISSION", help="code opening a visit (and code//...)")
    p.add_argument("--discharge-code", default="HOSPITAL_DISCHARGE", help="code closing a visit (and code//...)")
    p.add_argument("--gap-hours", type=float, default=24.0, help="largest gap within a visit (--visit-rule gap)")
    p.add_argument("--death-code", default=DEATH, help="death event code for the outcome (default MEDS_DEATH)")
    p.add_argument("--labels", default=None, metavar="FILE", help="MEDS label parquet to take the outcome from")
    p.add_argument("--group", action="append", default=None, metavar="ATTR=SOURCE",
                   help="group attribute from code:PREFIX, column:NAME or age:E1,E2,... (repeatable)")
    p.add_argument("--diagnosis-prefix", default="DIAGNOSIS//ICD", help="code prefix of ICD diagnoses")
    p.add_argument("--lab-prefix", default="LAB", help="code prefix of lab values")
    a = p.parse_args(argv)
    ds = prepare_meds(a.root, a.out, n_lab_items=a.n_lab_items, n_bins=a.n_bins, lab_tokens=a.lab_tokens,
                      time_bins=a.time_bins, outcome=a.outcome, max_visits=a.max_visits,
                      bins_from=a.bins_from, visit_rule=a.visit_rule, admission_code=a.admission_code,
                      discharge_code=a.discharge_code, gap_hours=a.gap_hours, death_code=a.death_code,
                      labels=a.labels, groups=a.group, diagnosis_prefix=a.diagnosis_prefix, lab_prefix=a.lab_prefix,
                      overwrite=a.overwrite, progress=not a.quiet)
    print(summary(ds, a.out))


if __name__ == "__main__":
    run(main)
