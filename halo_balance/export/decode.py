"""Prepared records back to values and times, the same way for every output layout.

:func:`decode` turns a :class:`~halo_balance.data.PreparedDataset` into format-neutral tables: one
row per patient (output id, outcome, groups, ages), per visit (admission and discharge times,
episode, age, death), per diagnosis token, per lab token (a value drawn inside the token's bin and a
time inside the visit) and per other token. A :class:`Layout` says how the layout's preparer reads a
timeline back (which visits share an episode, where it times gaps, where it reads the age group),
so that the timeline drawn here gives back each record's outcome and time tokens under that
preparer's own rules (:mod:`data_prep.outcomes`, :func:`data_prep.time_tokens.time_bin`), and
counts what no timeline can give back. The writers (``mimic_iv``, ``eicu``, ``meds``) only lay these
tables out. Every rule is in the package docstring (:mod:`halo_balance.export`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import polars as pl
from scipy.special import ndtr, ndtri

from data_prep import eicu as eicu_prep
from data_prep import mimic_iv as mimic_prep
from data_prep.common import OUTCOMES
from data_prep.common import SIGNIFICANT_DIGITS as PREPARED_DIGITS
from data_prep.outcomes import LONG_STAY_DAYS, OUTCOME_NAMES, READMISSION_DAYS, SECONDS_PER_DAY
from data_prep.time_tokens import time_bin

from ..data import PreparedDataset
from ..errors import DatasetError

#: Visit times are drawn in whole minutes.
MINUTE = 60_000_000  # microseconds
DAY_MINUTES = 1440

DX_ICD = re.compile(r"^dx(9|10):(.+)$")
DX_STRING = re.compile(r"^dxstr:(.+)$")
LAB = re.compile(r"^lab:(.+):(\d+)$")
TIME = re.compile(r"^time:(age|gap):(\d+)$")

#: The oldest age MIMIC-IV writes (``anchor_age`` of everyone over 89 is 91).
MIMIC_OLDEST_AGE = 91.0


def _age_ranges(groups: tuple[tuple[str, float], ...], oldest: float) -> dict[str, tuple[float, float]]:
    youngest = [float(lo) for _, lo in groups]
    return {label: (lo, hi) for (label, _), lo, hi in zip(groups, youngest, youngest[1:] + [oldest + 1])}


#: Whole-year age ranges [lo, hi) of the preparers' age groups (their ``AGE_GROUPS``), the oldest
#: group ending at the oldest age its source writes; other categories (e.g. Unknown) carry no age.
AGE_RANGES: dict[str, tuple[float, float]] = {**_age_ranges(mimic_prep.AGE_GROUPS, MIMIC_OLDEST_AGE),
                                              **_age_ranges(eicu_prep.AGE_GROUPS, eicu_prep.OLDEST_AGE)}
#: ``meta.json`` outcome names -> the preparers' ``--outcome`` options.
OUTCOME_OPTIONS = {**{v: k for k, v in OUTCOME_NAMES.items()},
                   **{v: k for k, v in eicu_prep.OUTCOME_SPEC_NAMES.items()}}


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
        columns, ``age`` (whole years at the first visit as written; null: written as unknown),
        ``group_age`` (the age that gives back the age group where the layout reads it: at the
        first visit for ``age_group_at="first"``, at the final one for ``"final"``; null when the
        group is unknown or the layout reads no age), ``n_visits`` (the record's).
    visits : ``patient_id``, ``out_id``, ``visit_index``, ``visit_no`` (0.. over the dataset; written
        readmissions after the records' visits), ``is_final``, ``label`` (the visit's), ``admit``,
        ``discharge`` (datetime, minutes), ``discharge_known`` (false: write the discharge time as
        missing), ``episode`` (0-based within the patient: eICU hospital stays), ``age`` (whole
        years at the visit as written, null: unknown), ``died`` (the visit ends in death) and
        ``readmission`` (a visit written after a positive index visit for the readmission outcome:
        it holds no tokens, and the preparer leaves it out again).
    diagnoses : ``visit_no``, ``token``, ``scheme`` (icd9 / icd10 / string), ``value`` (ICD
        category or diagnosis-string path), ``description``.
    labs : ``visit_no``, ``item``, ``bin``, ``value`` (float64), ``time`` (datetime), ``unit``.
    other : ``visit_no``, ``token``, ``kind``, ``description`` (tokens of any other kind).
    outcome : the preparers' ``--outcome`` option behind the labels (``None``: they came from
        elsewhere, e.g. a MEDS label file).
    report : counts for ``export.json``: what was written and what the preparers cannot rebuild.
    """

    patients: pl.DataFrame
    visits: pl.DataFrame
    diagnoses: pl.DataFrame
    labs: pl.DataFrame
    other: pl.DataFrame
    outcome: str | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TimeRules:
    """How a record's timeline is drawn where its time tokens and outcome leave it free.

    First admissions fall uniformly in [``first``, ``last``); a stay lasts LogNormal(median
    ``los_median_days``, sigma ``los_sigma``) days, clipped to [``los_min_days``, ``los_max_days``];
    the next admission follows ``gap_min_days`` + Exponential(``gap_mean_days``) days later or,
    within an episode (eICU unit stays of one hospital stay), Exponential(``episode_gap_mean_days``)
    days later. A readmission written for the readmission outcome starts uniformly within
    ``readmission_days`` after the index visit's discharge.
    """

    first: datetime = datetime(2110, 1, 1)
    last: datetime = datetime(2180, 1, 1)
    los_median_days: float = 3.0
    los_sigma: float = 0.8
    los_min_days: float = 0.25
    los_max_days: float = 60.0
    gap_min_days: float = 1.0
    gap_mean_days: float = 300.0
    episode_gap_mean_days: float = 0.5
    readmission_days: tuple[float, float] = (1.0, READMISSION_DAYS)


@dataclass(frozen=True)
class Layout:
    """How a layout's preparer reads a timeline back.

    Attributes
    ----------
    times : how the free parts of a timeline are drawn.
    episodes : which visits share an episode (what ``long-stay`` measures and, for eICU, where gaps
        are timed): ``"visit"``, each its own (MIMIC-IV and MEDS admissions); ``"gap-token"``, a
        later visit continues the previous visit's episode exactly when it holds a gap token (eICU
        by person: its preparer times gaps only within a hospital stay); ``"patient"``, one episode
        (eICU by hospital stay).
    gaps : where the preparer times the gap before a visit: ``"always"`` or ``"within-episode"``.
    age_group_at : where the preparer reads the age group from an age: the ``"first"`` visit
        (MIMIC-IV's ``anchor_age``, whose ``anchor_year`` can be set so that any age at the first
        admission comes back too), the ``"final"`` visit (eICU: the final stay's ``age``), or
        ``None`` (a static code, MEDS: ages are free).
    oldest_age : the oldest age the layout can write.
    blank_ends : whether the layout can leave a visit's end time empty (the preparer then does not
        time the next gap), which a real record without a gap token where gaps are timed needs:
        its source lacked that time.
    """

    times: TimeRules = TimeRules()
    episodes: Literal["visit", "gap-token", "patient"] = "visit"
    gaps: Literal["always", "within-episode"] = "always"
    age_group_at: Literal["first", "final"] | None = "first"
    oldest_age: float = 120.0
    blank_ends: bool = True


def outcome_option(meta: dict[str, Any]) -> str | None:
    """The ``--outcome`` option behind the labels (``meta.json``), or ``None`` when they came from
    elsewhere (a MEDS label file given to ``data_prep.meds``, an outcome no preparer names)."""
    pre = meta.get("preprocessing") or {}
    if (pre.get("parameters") or {}).get("labels"):
        return None
    option = (pre.get("outcome") or {}).get("option")
    return option if option in OUTCOMES else OUTCOME_OPTIONS.get(str(meta.get("outcome")))


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


def decode(ds: PreparedDataset, *, seed: int, numeric_ids: bool, layout: Layout,
           stored: Callable[[np.ndarray], np.ndarray] = lambda v: v,
           forbidden_values: tuple[float, ...] = ()) -> Decoded:
    """Decode every patient of ``ds`` (see :class:`Decoded` and the package rules)."""
    rng = np.random.default_rng(seed)
    meta = ds.meta
    vocab = classify_vocab(ds.vocab)
    items = lab_items(meta)
    time_bins = meta.get("preprocessing", {}).get("time_bins") or {}
    outcome = outcome_option(meta)
    report: dict[str, Any] = {}

    patients = ds.patients.with_columns(output_ids(ds.patients, numeric=numeric_ids))
    order = patients.select("patient_id").with_row_index("_p")
    visits = (ds.visits.join(order, on="patient_id").sort("_p", "visit_index")
              .with_columns(visit_no=pl.int_range(pl.len()).cast(pl.Int64),
                            n_visits=pl.len().over("patient_id"))
              .with_columns(is_final=pl.col("visit_index") == pl.col("n_visits") - 1))
    tokens = (visits.select("visit_no", "patient_id", "visit_index", "codes").explode("codes")
              .drop_nulls("codes").join(vocab, left_on="codes", right_on="id").drop("codes"))

    patients, visits = _timeline(rng, patients, visits, tokens, layout=layout, time_bins=time_bins,
                                 outcome=outcome, report=report)

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
    visits = visits.with_columns(out_id=pl.col("patient_id").replace_strict(patients["patient_id"],
                                                                              patients["out_id"]))
    return Decoded(patients=patients, visits=visits, diagnoses=dx, labs=lab, other=other, outcome=outcome,
                   report=report)


# ---------------------------------------------------------------------- timelines and ages
def _timeline(rng: np.random.Generator, patients: pl.DataFrame, visits: pl.DataFrame, tokens: pl.DataFrame, *,
              layout: Layout, time_bins: dict[str, Any], outcome: str | None,
              report: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Times, episodes, ages and deaths of every visit (written readmissions added), and the counts of
    time tokens the layout's preparer will not give back (package rules: Times, Outcome, Ages)."""
    rules = layout.times
    n_p = patients.height
    p_real = visits["_p"].to_numpy()
    n_real = len(p_real)
    n_vis = np.bincount(p_real, minlength=n_p)
    label = patients["label"].to_numpy().astype(np.int64)
    age_edges = [float(x) for x in time_bins.get("age_edges", [])]
    gap_edges = [float(x) for x in time_bins.get("gap_days_edges", [])]
    timed = bool(time_bins)

    record = (tokens.filter(pl.col("scheme").is_in(["time_age", "time_gap"]))
              .select("visit_no", variable=pl.col("scheme").str.slice(5), bin="bin"))
    lowest = record.group_by("visit_no", "variable").agg(pl.col("bin").min())
    age_tok, gap_tok = (np.full(n_real, -1, dtype=np.int64) for _ in range(2))
    for var, arr in (("age", age_tok), ("gap", gap_tok)):
        part = lowest.filter(pl.col("variable") == var)
        arr[part["visit_no"].to_numpy()] = part["bin"].to_numpy()

    # ------------------------------------------------------------------ visits, episodes and written readmissions
    first_r = visits["visit_index"].to_numpy() == 0
    final_r = visits["is_final"].to_numpy()
    readmit_p = np.flatnonzero(label == 1) if outcome == "readmission-30d" else np.zeros(0, dtype=np.int64)
    n = n_real + len(readmit_p)
    p = np.concatenate([p_real, readmit_p])
    vi = np.concatenate([visits["visit_index"].to_numpy(), n_vis[readmit_p]])
    first = np.concatenate([first_r, np.zeros(len(readmit_p), bool)])
    final = np.concatenate([final_r, np.zeros(len(readmit_p), bool)])
    extra = np.arange(n) >= n_real
    gap_bin = np.concatenate([gap_tok, np.full(len(readmit_p), -1)])
    if layout.episodes == "visit":
        same = np.zeros(n, dtype=bool)
    elif layout.episodes == "patient":
        same = ~first
    else:  # a gap token is what the preparer gives a stay of the same hospital stay
        same = ~first & ((gap_bin >= 0) | extra)
    defined = ~first & (same | (layout.gaps == "always"))
    # a real record lacks a gap token where it is timed only when its source lacked the time before it
    real = ~patients["synthetic"].to_numpy()[p]
    untimed = defined & ~extra & real & (gap_bin < 0) & timed & layout.blank_ends
    defined &= ~untimed

    # ------------------------------------------------------------------ lengths of stay
    los_days = np.exp(np.log(rules.los_median_days) + rules.los_sigma * rng.standard_normal(n))
    los_days = np.clip(los_days, rules.los_min_days, rules.los_max_days)
    long_limit = int(LONG_STAY_DAYS * DAY_MINUTES)
    if outcome == "long-stay":  # the final visit's length (and its episode's, below) gives the label back
        fl = final & (label[p] == 1)
        f0 = final & (label[p] == 0)
        los_days[fl] = _lognormal_between(rng, rules, LONG_STAY_DAYS, max(rules.los_max_days, LONG_STAY_DAYS * 2),
                                          int(fl.sum()))
        los_days[f0] = _lognormal_between(rng, rules, rules.los_min_days, LONG_STAY_DAYS, int(f0.sum()))
    los = np.maximum(np.round(los_days * DAY_MINUTES), 1).astype(np.int64)
    if outcome == "long-stay":
        los[fl] = np.maximum(los[fl], long_limit + 1)
        los[f0] = np.minimum(los[f0], long_limit)

    # ------------------------------------------------------------------ gaps
    across = np.round((rules.gap_min_days + rng.exponential(rules.gap_mean_days, n)) * DAY_MINUTES)
    within = np.round(rng.exponential(rules.episode_gap_mean_days, n) * DAY_MINUTES)
    gap = np.where(same, within, across).astype(np.int64)
    gap[first] = 0
    lower = np.zeros(n, dtype=np.int64)
    if outcome == "readmission-30d":  # a negative index visit must not look like a readmission
        lower[final & (label[p] == 0) & defined] = int(READMISSION_DAYS * DAY_MINUTES) + 1
    tokened = timed & defined & (gap_bin >= 0)
    forced = np.zeros(n, dtype=bool)
    if tokened.any():
        idx = np.flatnonzero(tokened)
        drawn, ok = _whole_in_bins(rng, gap_edges, gap_bin[idx], per_unit=DAY_MINUTES, lower=lower[idx],
                                   upper=np.full(len(idx), np.inf), value=_gap_days)
        gap[idx[ok]] = drawn[ok]
        forced[idx[~ok & (lower[idx] > 0)]] = True  # the outcome wins over the token
    short = (lower > 0) & (gap < lower)
    gap[short] = lower[short] + across[short].astype(np.int64)
    if len(readmit_p):
        lo_m, hi_m = (int(np.ceil(rules.readmission_days[0] * DAY_MINUTES)),
                      int(min(rules.readmission_days[1], READMISSION_DAYS) * DAY_MINUTES))
        gap[extra] = rng.integers(lo_m, hi_m + 1, len(readmit_p))

    # ------------------------------------------------------------------ order, episodes, long-stay episodes
    order = np.lexsort((vi, p))
    p, vi, first, final, extra, same, defined, los, gap, forced, gap_bin, untimed = (
        a[order] for a in (p, vi, first, final, extra, same, defined, los, gap, forced, gap_bin, untimed))
    discharge_known = ~np.r_[untimed[1:], False]  # the visit before an untimed gap: its end is not written
    visit_no = np.concatenate([np.arange(n_real), n_real + np.arange(len(readmit_p))])[order]
    episode = (pl.DataFrame({"p": p, "new": (first | ~same).astype(np.int64)})
               .select(pl.col("new").cum_sum().over("p") - 1)["new"].to_numpy())
    if outcome == "long-stay" and layout.episodes != "visit":
        _fit_episodes(p, episode, final, label, los, gap, forced, limit=long_limit)

    # ------------------------------------------------------------------ times
    start_min = (np.datetime64(rules.first, "m").astype(np.int64)
                 + np.floor(rng.random(n_p) * (np.datetime64(rules.last, "m") - np.datetime64(rules.first, "m"))
                            .astype(np.int64)).astype(np.int64))
    t = pl.DataFrame({"p": p, "los": los, "gap": gap}).with_columns(
        offset=(pl.col("los").shift(1, fill_value=0) + pl.col("gap")).cum_sum().over("p"))
    admit_min = start_min[p] + t["offset"].to_numpy()
    disch_min = admit_min + los
    admit = pl.Series(admit_min * MINUTE).cast(pl.Datetime("us"))
    disch = pl.Series(disch_min * MINUTE).cast(pl.Datetime("us"))
    year = disch.dt.year().to_numpy().astype(np.int64)
    first_year = np.zeros(n_p, dtype=np.int64)
    first_year[p[first]] = year[first]
    years_in = year - first_year[p]  # whole years since the first visit's discharge (how ages grow)
    final_years = np.zeros(n_p, dtype=np.int64)
    final_years[p[final]] = years_in[final]

    # ------------------------------------------------------------------ ages
    age0_bin = np.full(n_p, -1, dtype=np.int64)
    age0_bin[p_real[first_r]] = age_tok[first_r]
    a0, group_age, age = _ages(rng, patients, layout, n_vis=n_vis, age_bin=age0_bin, age_edges=age_edges,
                               timed=timed, final_years=final_years, p=p, first=first, final=final,
                               years_in=years_in, report=report)

    # ------------------------------------------------------------------ what the preparer will read back
    if timed:
        expected = [pl.DataFrame({"visit_no": visit_no[first & ~extra & ~np.isnan(age)], "variable": "age",
                                  "bin": time_bin(age_edges, age[first & ~extra & ~np.isnan(age)])}),
                    pl.DataFrame({"visit_no": visit_no[defined & ~extra], "variable": "gap",
                                  "bin": time_bin(gap_edges, _gap_days(gap[defined & ~extra]))})]
        expected = pl.concat([e.cast({"visit_no": pl.Int64, "bin": pl.Int64}) for e in expected])
        have = record.cast({"visit_no": pl.Int64, "bin": pl.Int64})
        lost = have.join(expected, on=["visit_no", "variable", "bin"], how="anti").group_by("variable").len()
        added = expected.join(have, on=["visit_no", "variable", "bin"], how="anti").group_by("variable").len()
        for var in ("age", "gap"):
            report[f"{var}_tokens_not_kept"] = int(lost.filter(pl.col("variable") == var)["len"].sum())
            report[f"{var}_tokens_added"] = int(added.filter(pl.col("variable") == var)["len"].sum())
        report["time_tokens"] = record.height
        moved = forced & (gap_bin >= 0)
        report["gap_tokens_changed_for_outcome"] = int(
            (time_bin(gap_edges, _gap_days(gap[moved])) != gap_bin[moved]).sum()) if moved.any() else 0
    report["readmissions_written"] = len(readmit_p)

    died = final & (label[p] == 1) & (outcome == "mortality")
    out_visits = pl.DataFrame({
        "patient_id": patients["patient_id"].gather(p), "visit_index": vi.astype(np.int32),
        "visit_no": visit_no.astype(np.int64), "is_final": final,
        "label": np.where(final, label[p], 0).astype(np.int8), "admit": admit, "discharge": disch,
        "discharge_known": discharge_known, "episode": episode.astype(np.int64),
        "age": pl.Series(age, dtype=pl.Float64).fill_nan(None),
        "died": died, "readmission": extra})
    out_patients = patients.with_columns(age=pl.Series(a0, dtype=pl.Float64).fill_nan(None),
                                         group_age=pl.Series(group_age, dtype=pl.Float64).fill_nan(None),
                                         n_visits=pl.Series(n_vis, dtype=pl.Int64))
    return out_patients, out_visits


def _gap_days(minutes: np.ndarray) -> np.ndarray:
    """A gap of whole minutes in days, as the preparers compute it from times in seconds, clipped at 0
    (overlaps give 0)."""
    return np.maximum(np.asarray(minutes, dtype=np.int64) * 60 / SECONDS_PER_DAY, 0.0)


def _lognormal_between(rng: np.random.Generator, rules: TimeRules, lo: float, hi: float, size: int) -> np.ndarray:
    """Lengths of stay from the rules' log-normal, restricted to [lo, hi] days (inverse CDF)."""
    mu, sigma = np.log(rules.los_median_days), rules.los_sigma
    a, b = ndtr((np.log(lo) - mu) / sigma), ndtr((np.log(hi) - mu) / sigma)
    return np.exp(mu + sigma * ndtri(a + rng.random(size) * (b - a)))


def _whole_in_bins(rng: np.random.Generator, edges: list[float], bins: np.ndarray, *, per_unit: float,
                   lower: np.ndarray, upper: np.ndarray,
                   value: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Whole numbers ``m`` (minutes, years) drawn uniformly among those that :func:`time_bin` puts in
    ``bins`` (0-based) and that lie in [``lower``, ``upper``]; ``value(m)`` is what the preparer bins.

    A side of an outer bin that the bounds leave open is closed by the width of its neighbour
    (:func:`bin_range`). Returns the numbers and where they exist (elsewhere ``m`` is ``lower``).
    """
    b = np.asarray(bins, dtype=np.int64)
    e = np.asarray(edges, dtype=np.float64)
    k = len(e)
    lo_edge = np.where(b >= 1, e[np.clip(b - 1, 0, max(k - 1, 0))] if k else -np.inf, -np.inf)
    hi_edge = np.where(b < k, e[np.clip(b, 0, max(k - 1, 0))] if k else np.inf, np.inf)
    lo = np.maximum(np.ceil(lo_edge * per_unit), lower).astype(np.float64)
    hi = np.minimum(np.ceil(hi_edge * per_unit) - 1, upper).astype(np.float64)
    closed = np.array([bin_range(edges, int(x) + 1) for x in b], dtype=np.float64).reshape(-1, 2) * per_unit
    width = np.maximum(np.ceil(closed[:, 1] - closed[:, 0]), 1)
    lo = np.where(np.isinf(lo), np.where(np.isinf(hi), np.ceil(closed[:, 0]), hi - width + 1), lo)
    hi = np.where(np.isinf(hi), lo + width - 1, hi)
    span = np.maximum(hi - lo + 1, 1)
    m = lo + np.floor(rng.random(len(b)) * span)
    ok = (lo <= hi) & (time_bin(edges, value(m)) == b)
    # rounding to 9 significant digits may carry a number next to an edge into the next bin
    for cand in (lo, lo + 1, hi, hi - 1):
        fix = ~ok & (lo <= cand) & (cand <= hi) & (time_bin(edges, value(cand)) == b)
        m[fix] = cand[fix]
        ok |= fix
    m[~ok] = np.where(np.isinf(lower[~ok]), 0, lower[~ok])
    return m.astype(np.int64), ok


def _fit_episodes(p: np.ndarray, episode: np.ndarray, final: np.ndarray, label: np.ndarray, los: np.ndarray,
                  gap: np.ndarray, forced: np.ndarray, *, limit: int) -> None:
    """``long-stay`` label 0: shorten the final episode (its stays, and the gaps between them if they
    alone are too long, marking those ``forced``) to at most ``limit`` minutes, in place."""
    f = np.flatnonzero(final)
    final_episode = np.full(int(p.max()) + 1 if len(p) else 0, -1)
    final_episode[p[f]] = episode[f]
    members = final_episode[p] == episode
    q_m = p[members]
    opens = np.r_[True, q_m[1:] != q_m[:-1]]  # the episode's first stay: its gap lies outside the episode
    span = pl.DataFrame({"p": q_m, "los": los[members], "gap": np.where(opens, 0, gap[members])})
    too_long = span.group_by("p").agg(total=pl.col("los").sum() + pl.col("gap").sum()).filter(
        pl.col("total") > limit)["p"].to_numpy()
    for q in too_long[label[too_long] == 0]:
        rows = np.flatnonzero(members & (p == q))
        inner = rows[1:]  # gaps within the episode
        g, k = int(gap[inner].sum()), len(rows)
        budget = limit - g - 60 * k
        if budget >= 0:
            spare = los[rows] - 60
            los[rows] = 60 + np.floor(spare * budget / max(int(spare.sum()), 1)).astype(np.int64)
        else:
            los[rows] = 60
            gap[inner] = np.floor(gap[inner] * (limit - 60 * k) / max(g, 1)).astype(np.int64)
            forced[inner] = True


def _ages(rng: np.random.Generator, patients: pl.DataFrame, layout: Layout, *, n_vis: np.ndarray,
          age_bin: np.ndarray, age_edges: list[float], timed: bool, final_years: np.ndarray, p: np.ndarray,
          first: np.ndarray, final: np.ndarray, years_in: np.ndarray,
          report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ages at the first visit, where the layout reads the group, and at every visit (package rules: Ages).

    Returns ``(a0, group_age, age)`` (NaN: written as unknown)."""
    n_p = patients.height
    has_group = "age_group" in patients.columns
    groups = patients["age_group"].to_list() if has_group else [None] * n_p
    g_lo = np.array([AGE_RANGES.get(g, (np.nan, np.nan))[0] for g in groups], dtype=np.float64)
    g_hi = np.array([AGE_RANGES.get(g, (np.nan, np.nan))[1] for g in groups], dtype=np.float64) - 1
    oldest = layout.oldest_age
    g_hi = np.minimum(g_hi, oldest)
    known = ~np.isnan(g_lo)
    unknown = np.zeros(n_p, dtype=bool) if not has_group else ~known  # the group says: no age
    shift = final_years if layout.age_group_at == "final" else np.zeros(n_p, dtype=np.int64)
    want_lo = np.where(known, np.maximum(g_lo - shift, 0), 0.0)
    want_hi = np.where(known, np.minimum(g_hi - shift, oldest), oldest)

    a0 = np.full(n_p, np.nan)
    tok = (age_bin >= 0) & timed
    if tok.any():
        idx = np.flatnonzero(tok)
        both, ok = _whole_in_bins(rng, age_edges, age_bin[idx], per_unit=1, lower=want_lo[idx], upper=want_hi[idx],
                                  value=lambda v: v.astype(np.float64))
        alone, _ = _whole_in_bins(rng, age_edges, age_bin[idx], per_unit=1, lower=np.zeros(len(idx)),
                                  upper=np.full(len(idx), oldest), value=lambda v: v.astype(np.float64))
        a0[idx] = np.where(ok, both, alone)
        report["age_token_outside_age_group"] = int((~ok & known[idx]).sum())
    elif timed:
        report["age_token_outside_age_group"] = 0
    drawn = np.floor(want_lo + rng.random(n_p) * np.maximum(want_hi - want_lo + 1, 1))
    drawn = np.where(want_lo <= want_hi, drawn, np.floor(g_lo + rng.random(n_p) * (g_hi - g_lo + 1)))
    if not timed:  # no tokens: the age comes from the group
        a0 = np.where(known, drawn, np.nan)

    group_age = np.full(n_p, np.nan)
    at = layout.age_group_at
    if at is not None:
        a0[unknown] = np.nan  # any age written would give the group back as known
    if at == "first":
        group_age = np.where(known, np.where(np.isnan(a0), drawn, np.clip(a0, g_lo, g_hi)),
                             np.where(unknown, np.nan, a0))
    elif at == "final":
        single = n_vis == 1
        a0 = np.where(single & known, np.where(np.isnan(a0), drawn, np.clip(a0, g_lo, g_hi)), a0)
        base = np.where(np.isnan(a0), np.where(known, drawn, np.nan), a0)  # drawn is already shifted
        later = base[p] + years_in
        later = np.where(known[p], np.clip(later, g_lo[p], g_hi[p]), later)
        later = np.where(unknown[p], np.nan, np.minimum(later, oldest))
        age = np.where(first, a0[p], later)
        group_age = np.full(n_p, np.nan)
        group_age[p[final]] = age[final]  # the index visit's: a written readmission follows it
        return a0, group_age, age
    age = a0[p] + years_in
    return a0, group_age, age
