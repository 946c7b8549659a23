"""Prepared records back to values and times, the same way for every output layout.

:func:`decode` turns a :class:`~halo_balance.data.PreparedDataset` into format-neutral tables: one
row per patient (output id, outcome, groups, age), per visit (admission and discharge times), per
diagnosis token, per lab token (a value drawn inside the token's bin and a time inside the visit)
and per other token. The writers (``mimic_iv``, ``eicu``, ``meds``) only lay these tables out.
Every rule is in the package docstring (:mod:`halo_balance.export`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from ..data import PreparedDataset
from ..errors import DatasetError

#: Significant digits the preparers round a visit's lab mean to before binning (data_prep.common).
PREPARED_DIGITS = 9
#: Visit times are drawn at minute resolution.
MINUTE = 60_000_000  # microseconds

DX_ICD = re.compile(r"^dx(9|10):(.+)$")
DX_STRING = re.compile(r"^dxstr:(.+)$")
LAB = re.compile(r"^lab:(.+):(\d+)$")
TIME = re.compile(r"^time:(age|gap):(\d+)$")

#: Age ranges [lo, hi) in years of the preparers' age groups (MIMIC-IV and eICU); other categories
#: (e.g. Unknown) carry no age.
AGE_RANGES: dict[str, tuple[float, float]] = {
    "<18": (0, 18), "18-44": (18, 45), "45-64": (45, 65), "65-79": (65, 80), "80+": (80, 92),
    "pediatric": (1, 18), "adult": (18, 75), "elderly": (75, 95),
}


# ---------------------------------------------------------------------- bins
def round_sig(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits exactly as the preparers round (polars)."""
    return pl.Series(np.asarray(values, dtype=np.float64)).round_sig_figs(digits).to_numpy()


def bin_of(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """The preparers' 1-based lab bin: ``searchsorted(edges, round9(v), 'right') + 1``."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), round_sig(values, PREPARED_DIGITS),
                           side="right") + 1


def bin_range(edges: list[float], b: int, *, nonnegative: bool = True) -> tuple[float, float]:
    """A finite [lo, hi) for 1-based bin ``b`` of ``(-inf, e1), [e1, e2), ..., [ek, inf)``.

    The open-ended outer bins are closed by the width of their inner neighbour (the distance
    between the two outermost edges on that side); a lower bin whose edge is positive stops at 0
    when ``nonnegative``. With a single edge the width is half its magnitude (1 when it is 0); an
    item without edges has the one bin [0, 1).
    """
    e = [float(x) for x in edges]
    if not e:
        return 0.0, 1.0
    k = len(e)
    if 2 <= b <= k:
        return e[b - 2], e[b - 1]
    if b <= 1:
        width = e[1] - e[0] if k > 1 else (abs(e[0]) / 2 or 1.0)
        lo = e[0] - width
        if nonnegative and e[0] > 0:
            lo = max(lo, 0.0)
        return lo, e[0]
    width = e[-1] - e[-2] if k > 1 else (abs(e[-1]) / 2 or 1.0)
    return e[-1], e[-1] + width


def draw_in_bins(rng: np.random.Generator, edges: list[float], bins: np.ndarray, *,
                 stored: Callable[[np.ndarray], np.ndarray] = lambda v: v,
                 forbidden: tuple[float, ...] = ()) -> tuple[np.ndarray, int]:
    """A value for each 1-based bin in ``bins`` that the preparers bin back to that bin.

    Each value is drawn uniformly in :func:`bin_range` and then written with the fewest significant
    digits (2..9) that keep it in its bin after ``stored`` (how the output layout stores a number,
    e.g. as float32 in MEDS) and the preparers' rounding, so exported values look like measurements.
    Values in ``forbidden`` (e.g. eICU's -1 for "not measured") are never returned. Returns the
    values and how many could not be placed in their bin (0 unless a bin is narrower than the
    stored precision).
    """
    bins = np.asarray(bins, dtype=np.int64)
    out = np.full(len(bins), np.nan)
    if not len(bins):
        return out, 0
    bounds = np.array([bin_range(edges, int(b)) for b in range(1, len(edges) + 2)])
    lo, hi = bounds[bins - 1, 0], bounds[bins - 1, 1]
    raw = lo + rng.random(len(bins)) * (hi - lo)

    def fits(v: np.ndarray) -> np.ndarray:
        s = stored(v)
        ok = bin_of(s, edges) == bins
        for f in forbidden:
            ok &= s != f
        return ok

    todo = np.ones(len(bins), dtype=bool)
    for digits in range(2, PREPARED_DIGITS + 1):
        cand = round_sig(raw, digits)
        hit = todo & fits(cand)
        out[hit] = stored(cand)[hit]
        todo &= ~hit
        if not todo.any():
            return out, 0
    for cand in (raw, lo, (lo + hi) / 2):  # full precision, then the lower edge itself, then the middle
        hit = todo & fits(cand)
        out[hit] = stored(cand)[hit]
        todo &= ~hit
    out[todo] = stored(raw)[todo]
    return out, int(todo.sum())


def as_float32(v: np.ndarray) -> np.ndarray:
    """How MEDS stores a ``numeric_value``: float32, read back as float64; rounds up into the bin
    when float32 rounding fell below a lower edge."""
    return np.asarray(v, dtype=np.float32).astype(np.float64)


# ---------------------------------------------------------------------- decoded tables
@dataclass
class Decoded:
    """A dataset's records as values and times (see the module docstring).

    Attributes
    ----------
    patients : ``patient_id``, ``out_id`` (the output id), ``synthetic``, ``label``, the group
        columns, ``age`` (years at the first visit, float; null when unknown), ``n_visits``.
    visits : ``patient_id``, ``out_id``, ``visit_index``, ``visit_no`` (0.. over the dataset),
        ``is_final``, ``label`` (the visit's), ``admit``, ``discharge`` (datetime, minutes).
    diagnoses : ``visit_no``, ``token``, ``scheme`` (icd9 / icd10 / string), ``value`` (ICD
        category or diagnosis-string path), ``description``.
    labs : ``visit_no``, ``item``, ``bin``, ``value`` (float64), ``time`` (datetime), ``unit``.
    other : ``visit_no``, ``token``, ``kind``, ``description`` (tokens of any other kind).
    report : counts for ``export.json``: what was written and what the preparers cannot rebuild.
    """

    patients: pl.DataFrame
    visits: pl.DataFrame
    diagnoses: pl.DataFrame
    labs: pl.DataFrame
    other: pl.DataFrame
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimeRules:
    """How the timeline of a record is drawn when the prepared data has no time tokens.

    First admissions fall uniformly in [``first``, ``last``); a stay lasts LogNormal(median
    ``los_median_days``, sigma ``los_sigma``) days, clipped to [``los_min_days``, ``los_max_days``];
    the next admission follows ``gap_min_days`` + Exponential(``gap_mean_days``) days later.
    """

    first: datetime = datetime(2110, 1, 1)
    last: datetime = datetime(2180, 1, 1)
    los_median_days: float = 3.0
    los_sigma: float = 0.8
    los_min_days: float = 0.25
    los_max_days: float = 60.0
    gap_min_days: float = 1.0
    gap_mean_days: float = 300.0


def lab_items(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{item: {"edges": [...], "unit": ..., "label": ...}}`` from ``meta.json``."""
    labs = meta.get("preprocessing", {}).get("labs") or {}
    return {str(it["item"]): it for it in labs.get("items", [])}


def classify_vocab(vocab: pl.DataFrame) -> pl.DataFrame:
    """The vocabulary with ``scheme`` (icd9 / icd10 / string / lab / time / other) and its parts."""
    rows = []
    for tid, token, kind, desc in vocab.select("id", "token", "kind", "description").iter_rows():
        scheme, a, b = "other", None, None
        if (m := DX_ICD.match(token)) is not None:
            scheme, a = f"icd{m.group(1)}", m.group(2)
        elif (m := DX_STRING.match(token)) is not None:
            scheme, a = "string", m.group(1)
        elif kind == "lab" and (m := LAB.match(token)) is not None:
            scheme, a, b = "lab", m.group(1), int(m.group(2))
        elif kind == "time" and (m := TIME.match(token)) is not None:
            scheme, a, b = f"time_{m.group(1)}", None, int(m.group(2))
        rows.append((tid, token, kind, desc, scheme, a, b))
    return pl.DataFrame(rows, orient="row", schema={
        "id": pl.Int32, "token": pl.String, "kind": pl.String, "description": pl.String,
        "scheme": pl.String, "part": pl.String, "bin": pl.Int64})


def output_ids(patients: pl.DataFrame, *, numeric: bool) -> pl.Series:
    """Output ids: real patients keep theirs; synthetic ones (and, when ``numeric``, real ones whose
    id is not an integer) get new ones that cannot collide.

    Numeric ids start at the first multiple of 10^(d-1) above every real integer id (d = its number
    of digits: 20000000 above MIMIC-IV's 1xxxxxxx), in table order; text ids stay as they are
    (synthetic ids such as ``syn-000001`` never look like a source's ids).
    """
    pid = patients["patient_id"]
    if not numeric:
        return pid.alias("out_id")
    as_int = pid.cast(pl.Int64, strict=False)
    real = ~patients["synthetic"]
    keep = real & as_int.is_not_null()
    top = int(as_int.filter(keep).max() or 0)
    d = max(len(str(top)), 1)
    start = (top // 10 ** (d - 1) + 1) * 10 ** (d - 1)
    new = (~keep).cast(pl.Int64).cum_sum() - 1 + start
    return pl.Series("out_id", np.where(keep.to_numpy(), as_int.fill_null(0).to_numpy(), new.to_numpy()),
                     dtype=pl.Int64)


def decode(ds: PreparedDataset, *, seed: int, numeric_ids: bool, rules: TimeRules,
           stored: Callable[[np.ndarray], np.ndarray] = lambda v: v,
           forbidden_values: tuple[float, ...] = ()) -> Decoded:
    """Decode every patient of ``ds`` (see :class:`Decoded` and the package rules)."""
    rng = np.random.default_rng(seed)
    meta = ds.meta
    vocab = classify_vocab(ds.vocab)
    items = lab_items(meta)
    time_bins = meta.get("preprocessing", {}).get("time_bins") or {}
    report: dict[str, Any] = {}

    patients = ds.patients.with_columns(output_ids(ds.patients, numeric=numeric_ids))
    order = patients.select("patient_id").with_row_index("_p")
    visits = (ds.visits.join(order, on="patient_id").sort("_p", "visit_index")
              .with_columns(visit_no=pl.int_range(pl.len()).cast(pl.Int64),
                            n_visits=pl.len().over("patient_id"))
              .with_columns(is_final=pl.col("visit_index") == pl.col("n_visits") - 1))
    tokens = (visits.select("visit_no", "patient_id", "visit_index", "codes").explode("codes")
              .drop_nulls("codes").join(vocab, left_on="codes", right_on="id").drop("codes"))

    # ------------------------------------------------------------------ time tokens
    age_tok = tokens.filter(pl.col("scheme") == "time_age")
    gap_tok = tokens.filter(pl.col("scheme") == "time_gap")
    if time_bins:
        report["time_tokens_misplaced"] = _check_time_tokens(visits, age_tok, gap_tok)

    # ------------------------------------------------------------------ ages
    n_p = patients.height
    n_vis = patients.select("patient_id").join(visits.group_by("patient_id").len(), on="patient_id",
                                                how="left")["len"].fill_null(0).to_numpy()
    age = _draw_ages(rng, patients, meta, age_tok, time_bins)

    # ------------------------------------------------------------------ timeline
    gap_bins = gap_tok.group_by("visit_no").agg(pl.col("bin").min())
    admit, disch = _draw_timeline(rng, visits, n_vis, rules, gap_bins, time_bins)
    visits = visits.with_columns(admit=pl.Series(admit).cast(pl.Datetime("us")),
                                 discharge=pl.Series(disch).cast(pl.Datetime("us")))
    patients = patients.with_columns(age=pl.Series(age, dtype=pl.Float64).fill_nan(None), n_visits=pl.Series(n_vis))
    assert patients.height == n_p

    # ------------------------------------------------------------------ labs
    lab = tokens.filter(pl.col("scheme") == "lab").select("visit_no", item="part", bin="bin")
    unknown = sorted(set(lab["item"].unique().to_list()) - set(items))
    if unknown:
        raise DatasetError(f"lab tokens of item(s) {unknown[:5]} have no bin edges in meta.json "
                           "preprocessing.labs.items", file="meta.json", column="preprocessing.labs",
                           fix="export data prepared by data_prep (its meta.json holds every item's edges)")
    mode = meta.get("preprocessing", {}).get("labs", {}).get("mode", "mean")
    several = lab.group_by("visit_no", "item").len().filter(pl.col("len") > 1)
    report["lab_tokens"] = lab.height
    report["lab_mode"] = mode
    if mode == "mean":
        # one bin per (visit, item) is all the preparers' visit mean can give back
        report["visit_items_with_several_bins"] = several.height
    parts, misplaced = [], 0
    for (name,), part in lab.with_row_index("_r").partition_by("item", as_dict=True).items():
        v, bad = draw_in_bins(rng, items[name]["edges"], part["bin"].to_numpy(), stored=stored,
                              forbidden=forbidden_values)
        parts.append(part.with_columns(value=pl.Series(v, dtype=pl.Float64)))
        misplaced += bad
    report["lab_values_outside_bin"] = misplaced
    lab = (pl.concat(parts).sort("_r").drop("_r") if parts
           else lab.with_columns(value=pl.lit(None, dtype=pl.Float64)))
    lab = lab.join(visits.select("visit_no", "admit", "discharge"), on="visit_no")
    span = (lab["discharge"] - lab["admit"]).dt.total_microseconds().to_numpy()
    offset = (np.floor(rng.random(lab.height) * (span // MINUTE - 1)) + 1) * MINUTE if lab.height else span
    lab = lab.with_columns(time=(pl.col("admit") + pl.Series(offset.astype(np.int64)).cast(pl.Duration("us"))),
                           unit=pl.col("item").replace_strict(
                               {k: v.get("unit") for k, v in items.items()}, default=None,
                               return_dtype=pl.String)).drop("admit", "discharge")

    dx = tokens.filter(pl.col("scheme").is_in(["icd9", "icd10", "string"])).select(
        "visit_no", "token", "scheme", value="part", description="description")
    other = tokens.filter(pl.col("scheme") == "other").select("visit_no", "token", "kind", "description")
    report["diagnosis_tokens"] = dx.height
    report["other_tokens"] = other.height
    report["time_tokens"] = age_tok.height + gap_tok.height
    visits = visits.select("patient_id", "visit_index", "visit_no", "is_final", "label", "admit", "discharge",
                           out_id=pl.col("patient_id").replace_strict(
                               patients["patient_id"], patients["out_id"]))
    return Decoded(patients=patients, visits=visits, diagnoses=dx, labs=lab, other=other, report=report)


# ---------------------------------------------------------------------- ages and timelines
def _draw_ages(rng: np.random.Generator, patients: pl.DataFrame, meta: dict[str, Any], age_tok: pl.DataFrame,
               time_bins: dict[str, Any]) -> np.ndarray:
    """Age at the first visit: inside the age group's range and, with time tokens, the age bin."""
    n = patients.height
    groups = patients["age_group"].to_list() if "age_group" in patients.columns else [None] * n
    lo = np.array([AGE_RANGES.get(g, (math.nan, math.nan))[0] for g in groups], dtype=float)
    hi = np.array([AGE_RANGES.get(g, (math.nan, math.nan))[1] for g in groups], dtype=float)
    if time_bins and age_tok.height:
        edges = [float(x) for x in time_bins.get("age_edges", [])]
        first = (age_tok.group_by("patient_id").agg(pl.col("bin").min())
                 .join(patients.select("patient_id").with_row_index("_p"), on="patient_id"))
        idx = first["_p"].to_numpy()
        b = first["bin"].to_numpy() + 1  # time bins are 0-based
        rng_b = np.array([bin_range(edges, int(x)) for x in b]).reshape(-1, 2)
        no_group = np.isnan(lo[idx])
        lo[idx] = np.where(no_group, rng_b[:, 0], np.maximum(lo[idx], rng_b[:, 0]))
        hi[idx] = np.where(no_group, rng_b[:, 1], np.minimum(hi[idx], rng_b[:, 1]))
        bad = hi[idx] <= lo[idx]  # the group and the bin disagree: the bin wins, the group is kept
        lo[idx[bad]], hi[idx[bad]] = rng_b[bad, 0], rng_b[bad, 1]
    # the preparers' ages are whole years: draw a whole year inside [lo, hi) (quantile edges need not be)
    lo, hi = np.ceil(lo), np.ceil(hi)
    hi = np.where(hi > lo, hi, lo + 1)
    return np.floor(lo + rng.random(n) * (hi - lo))


def _draw_timeline(rng: np.random.Generator, visits: pl.DataFrame, n_vis: np.ndarray, rules: TimeRules,
                   gap_bins: pl.DataFrame, time_bins: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Admission and discharge times (datetime64[us], minute resolution) for every visit, in order.

    ``admit_0`` is drawn in the rules' window; ``discharge_t = admit_t + los_t`` and
    ``admit_{t+1} = discharge_t + gap_{t+1}``, the gap drawn inside its time-token bin when present.
    """
    n = visits.height
    day = 24 * 60 * MINUTE
    los = np.exp(np.log(rules.los_median_days) + rules.los_sigma * rng.standard_normal(n))
    los = np.clip(los, rules.los_min_days, rules.los_max_days) * day
    gap = (rules.gap_min_days + rng.exponential(rules.gap_mean_days, n)) * day
    if time_bins and gap_bins.height:
        edges = [float(x) for x in time_bins.get("gap_days_edges", [])]
        rows = gap_bins["visit_no"].to_numpy()
        bounds = np.array([bin_range(edges, int(b) + 1) for b in gap_bins["bin"].to_numpy()]).reshape(-1, 2)
        gap[rows] = (bounds[:, 0] + rng.random(len(rows)) * (bounds[:, 1] - bounds[:, 0])) * day
    first_us = np.datetime64(rules.first, "us").astype(np.int64)
    last_us = np.datetime64(rules.last, "us").astype(np.int64)
    start = np.round((first_us + rng.random(len(n_vis)) * (last_us - first_us)) / MINUTE) * MINUTE
    t = pl.DataFrame({"p": np.repeat(np.arange(len(n_vis)), n_vis), "i": visits["visit_index"].to_numpy(),
                      "los": np.maximum(np.round(los / MINUTE), 1).astype(np.int64) * MINUTE,
                      "gap": np.maximum(np.round(gap / MINUTE), 1).astype(np.int64) * MINUTE})
    t = t.with_columns(offset=(pl.col("los").shift(1, fill_value=0) + pl.when(pl.col("i") > 0)
                               .then(pl.col("gap")).otherwise(0)).cum_sum().over("p"))
    admit = start.astype(np.int64)[t["p"].to_numpy()] + t["offset"].to_numpy()
    disch = admit + t["los"].to_numpy()
    return admit.astype("datetime64[us]"), disch.astype("datetime64[us]")


def _check_time_tokens(visits: pl.DataFrame, age_tok: pl.DataFrame, gap_tok: pl.DataFrame) -> int:
    """Visits whose time tokens break the contract (one age token on the first visit, one gap
    token on later ones): counted, since no timeline gives them back."""
    age_n = age_tok.group_by("visit_no").len()
    gap_n = gap_tok.group_by("visit_no").len()
    v = (visits.select("visit_no", "visit_index")
         .join(age_n.rename({"len": "n_age"}), on="visit_no", how="left")
         .join(gap_n.rename({"len": "n_gap"}), on="visit_no", how="left")
         .with_columns(pl.col("n_age", "n_gap").fill_null(0)))
    first = pl.col("visit_index") == 0
    bad = (first & ((pl.col("n_age") > 1) | (pl.col("n_gap") > 0))) | (
        ~first & ((pl.col("n_age") > 0) | (pl.col("n_gap") != 1)))
    return v.filter(bad).height
