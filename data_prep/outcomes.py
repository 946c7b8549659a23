"""Which visit ends a patient's record, and the outcome it carries.

Both preparers describe their usable visits with the same columns and call :func:`select_visits`,
which orders them, measures the gap between consecutive visits, picks each patient's *index*
visit (the last visit of the prepared record, which carries the outcome), applies
``--max-visits`` and counts every visit and patient it leaves out.

Outcomes (``--outcome``; the source modules state what their columns mean)

- ``mortality`` (``in_hospital_mortality``): the index is the final visit; the label is its
  in-hospital death flag. A final visit without one: the patient is dropped
  (``patients_without_outcome``).
- ``long-stay`` (``long_stay_7d``): the index is the final visit; the label is 1 when its length
  of stay exceeds :data:`LONG_STAY_DAYS` (7) days. Deaths are labelled by their length of stay like
  everyone else (counted in ``counts.info``); a missing or negative length: dropped
  (``patients_without_outcome``).
- ``readmission-30d`` (``readmission_30d``): a visit is a *readmission* when it starts at most
  :data:`READMISSION_DAYS` (30) days after the end of the patient's previous visit (or before that
  end: overlapping visits count), where the source can time that gap. When the final visit is a
  readmission, the index is the visit before it, labelled 1, and the final visit is left out of the
  record (``<visits>_readmission_after_index``): the record ends at the discharge the prediction is
  made at. Otherwise the index is the final visit, labelled 0, unless the patient died in it
  (nobody can be readmitted after death: such patients are dropped, ``patients_died_at_index``)
  or its status is unknown (``patients_without_outcome``). A death after the index's discharge
  without a readmission is labelled 0. Follow-up after the last visit is taken to be complete: the
  tables do not say when a patient left the hospital system's view.

The outcome sits on the index visit; earlier visits are 0 (the paper's convention: only the final
visit may be positive). ``--max-visits N`` then keeps the N most recent visits up to the index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from .common import Counts, Outcome, order_visits

READMISSION_DAYS = 30.0
SECONDS_PER_DAY = 86_400.0
LONG_STAY_DAYS = 7.0


@dataclass(frozen=True)
class OutcomeSpec:
    """An outcome as ``meta.json`` records it: the option (``None``: labels from a MEDS label file), its
    name and the source's rule."""

    option: Outcome | None
    name: str
    rule: str

    def to_meta(self) -> dict[str, Any]:
        window = {"readmission-30d": {"window_days": READMISSION_DAYS},
                  "long-stay": {"threshold_days": LONG_STAY_DAYS}}.get(self.option, {})
        return {"option": self.option, "name": self.name, "rule": self.rule, **window}


OUTCOME_NAMES = {"mortality": "in_hospital_mortality", "readmission-30d": "readmission_30d",
                 "long-stay": "long_stay_7d"}


def select_visits(df: pl.DataFrame, *, by: Sequence[str], descending: Sequence[bool] | None = None,
                  outcome: Outcome, max_visits: int | None, counts: Counts, unit: str) -> pl.DataFrame:
    """Order the usable visits, pick each patient's index visit and label it.

    Parameters
    ----------
    df : one row per usable visit: ``patient_id``, the sort columns ``by`` (oldest first) and
        ``start``, ``end`` (Int64 seconds on a clock shared by the visits of one ``episode``, so that
        differences are exact; null when unknown), ``episode`` (gaps are measured only between
        consecutive visits of the same episode), ``mortality`` (Int 1 / 0 / null: in-hospital death at this visit),
        ``died_in_visit`` (Boolean / null: the visit itself ended in death) and ``los_days``
        (Float64: the length of stay ``long-stay`` reads).
    outcome : see the module docstring.
    max_visits : keep each patient's most recent visits up to the index.
    counts : drops and notes are added here.
    unit : the visit's name in count keys, plural (``admissions``, ``stays``).

    Returns
    -------
    ``df`` with ``order`` (0-based among the patient's usable visits), ``gap_days`` (days from the
    previous visit's end to this one's start; null where undefined), ``gap_status`` (``ok``,
    ``first``, ``new_episode`` or ``time_missing``), ``fate`` (``ok``, ``after_index``,
    ``beyond_max_visits``, ``patient_without_outcome``, ``patient_died_at_index``),
    ``visit_index`` and ``is_final`` (among the visits kept by ``--max-visits``, null otherwise) and
    ``label`` (the outcome on the index visit, 0 on earlier ones, null where not kept).
    """
    df = order_visits(df, by=by, descending=descending, max_visits=None, counts=counts,
                      reason=f"{unit}_beyond_max_visits").drop("kept", "visit_index")
    prev_end, prev_episode = (pl.col(c).shift(1).over("patient_id") for c in ("end", "episode"))
    first, same = pl.col("order") == 0, pl.col("episode") == prev_episode
    df = df.with_columns(
        gap_days=pl.when(~first & same).then((pl.col("start") - prev_end) / SECONDS_PER_DAY),
        gap_status=pl.when(first).then(pl.lit("first")).when(~same.fill_null(False)).then(pl.lit("new_episode"))
        .when(pl.col("start").is_null() | prev_end.is_null()).then(pl.lit("time_missing")).otherwise(pl.lit("ok")))

    final = df.filter(pl.col("is_final"))
    readmitted = (pl.col("order") > 0) & (pl.col("gap_days") <= READMISSION_DAYS).fill_null(False)
    los = pl.when(pl.col("los_days") >= 0).then(pl.col("los_days"))
    if outcome == "mortality":
        rule = pl.struct(outcome=pl.col("mortality"), index=pl.col("order"), fate=pl.lit("ok"))
    elif outcome == "long-stay":
        rule = pl.struct(outcome=(los > LONG_STAY_DAYS).cast(pl.Int64), index=pl.col("order"), fate=pl.lit("ok"))
        counts.note(f"patients_died_in_final_{unit}_labelled_by_length_of_stay",
                    final.filter(pl.col("mortality") == 1, los.is_not_null()).height)
    else:
        rule = pl.struct(
            outcome=pl.when(readmitted).then(1).when(pl.col("died_in_visit").not_()).then(0),
            index=pl.when(readmitted).then(pl.col("order") - 1).otherwise(pl.col("order")),
            fate=pl.when(readmitted | pl.col("died_in_visit").not_()).then(pl.lit("ok"))
            .when(pl.col("died_in_visit")).then(pl.lit("patient_died_at_index"))
            .otherwise(pl.lit("patient_without_outcome")))
    per_patient = final.select("patient_id", r=rule).unnest("r").with_columns(
        fate=pl.when((pl.col("fate") == "ok") & pl.col("outcome").is_null()).then(pl.lit("patient_without_outcome"))
        .otherwise(pl.col("fate")))
    df = df.join(per_patient.rename({"fate": "patient_fate"}), on="patient_id", how="left", maintain_order="left")
    after = (pl.col("order") > pl.col("index")).fill_null(False)
    counts.drop(f"{unit}_readmission_after_index", df.filter(after).height)

    before = order_visits(df.filter(~after).drop("is_final"), by=by, descending=descending, max_visits=max_visits,
                          counts=counts, reason=f"{unit}_beyond_max_visits")
    for fate, name in (("patient_without_outcome", "without_outcome"), ("patient_died_at_index", "died_at_index")):
        counts.drop(f"patients_{name}", per_patient.filter(pl.col("fate") == fate).height)
        counts.drop(f"{unit}_of_patients_{name}",
                    before.filter(pl.col("kept"), pl.col("patient_fate") == fate).height)
    if outcome == "readmission-30d":
        index = before.filter(pl.col("is_final"), pl.col("patient_fate") == "ok")
        counts.note(f"patients_hospital_death_after_index_{unit[:-1]}_labelled_0",
                    index.filter(pl.col("outcome") == 0, pl.col("mortality") == 1).height)

    before = before.with_columns(
        fate=pl.when(~pl.col("kept")).then(pl.lit("beyond_max_visits")).otherwise(pl.col("patient_fate")))
    before = before.with_columns(
        visit_index=pl.when(pl.col("fate") == "ok").then(pl.col("visit_index")),
        is_final=pl.when(pl.col("fate") == "ok").then(pl.col("is_final")),
        label=pl.when(pl.col("fate") != "ok").then(None).when(pl.col("is_final")).then(pl.col("outcome"))
        .otherwise(0).cast(pl.Int8))
    after_rows = df.filter(after).drop("is_final").with_columns(fate=pl.lit("after_index"))
    return (pl.concat([before.drop("kept"), after_rows], how="diagonal_relaxed")
            .drop("index", "patient_fate", "outcome").sort("patient_id", "order"))
