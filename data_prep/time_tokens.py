"""Time tokens (``--time-bins N``): the patient's age at the first visit and the gap since the previous visit.

Records carry an order but no clock; these tokens give them a timeline that an exporter can turn
back into dates. With ``N`` > 0 every prepared record gets, of vocabulary kind ``time``:

- ``time:age:<b>`` on its first visit (``visit_index`` 0, the first one kept by ``--max-visits``):
  the patient's age in years at that visit (how each source derives it: its module docstring);
- ``time:gap:<b>`` on every later visit where the source can time it: the days from the end of the
  previous visit of the record to the start of this one; overlapping visits give 0 (counted as
  ``time_gap_overlap_set_to_0``).

``b`` is the 0-based bin among ``(-inf, e1), [e1, e2), ..., [ek, inf)`` (a value on an edge goes
up); the edges are the N-quantiles (linear interpolation, rounded to 9 significant digits, equal
edges merged, so a variable may have fewer than N bins) of the ages of the records' first visits
and of all gaps, and are stored in ``meta.json`` as ``preprocessing.time_bins = {"n_bins": N,
"age_edges": [...], "gap_days_edges": [...]}``. Every bin of both variables is in the vocabulary.
``--bins-from`` reuses a reference folder's edges. Visits where the value is unknown get no token,
counted in ``counts.info`` as ``time_age_unknown`` and ``time_gap_undefined_<why>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from halo_balance.data import PreparedDataset

from .common import SIGNIFICANT_DIGITS, Counts, bin_of, bin_range, decile_edges

KIND = "time"
VARIABLES = {"age": ("age_edges", "age at the first visit, years"),
             "gap": ("gap_days_edges", "days since the previous visit ended")}


@dataclass
class TimeBins:
    """Edges of the age and gap bins (see the module docstring)."""

    n_bins: int
    age_edges: list[float] = field(default_factory=list)
    gap_days_edges: list[float] = field(default_factory=list)

    def edges(self, variable: str) -> list[float]:
        return getattr(self, VARIABLES[variable][0])

    def to_meta(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "age_edges": [float(x) for x in self.age_edges],
                "gap_days_edges": [float(x) for x in self.gap_days_edges]}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> TimeBins:
        return cls(int(d["n_bins"]), [float(x) for x in d["age_edges"]], [float(x) for x in d["gap_days_edges"]])

    def vocab(self) -> pl.DataFrame:
        """Vocabulary rows (token, kind, description) for every bin of both variables."""
        rows = []
        for var, (_, what) in VARIABLES.items():
            e = self.edges(var)
            rows += [(f"time:{var}:{b}", KIND, f"{what}: {bin_range(e, b)} (bin {b} of 0..{len(e)})")
                     for b in range(len(e) + 1)]
        return pl.DataFrame(rows, schema={"token": pl.String, "kind": pl.String, "description": pl.String},
                            orient="row")


@dataclass
class TimeTokens:
    """Result of :func:`time_tokens`."""

    bins: TimeBins
    tokens: pl.DataFrame  # key, token, kind


def time_tokens(visits: pl.DataFrame, *, n_bins: int, reference: dict[str, Any] | None,
                counts: Counts) -> TimeTokens:
    """Age and gap tokens for the kept visits.

    Parameters
    ----------
    visits : ``key``, ``visit_index`` (0-based among the record's visits), ``age_years`` (Float64,
        null when unknown; read on visit 0 only), ``gap_days`` (Float64 days since the previous
        visit's end, null when undefined) and ``gap_status`` (why it is undefined, see
        :func:`data_prep.outcomes.select_visits`).
    n_bins : quantile bins per variable (ignored with ``reference``).
    reference : a reference folder's ``preprocessing.time_bins``, whose edges are reused.
    """
    first = pl.col("visit_index") == 0
    values = visits.select(
        "key", age=pl.when(first).then(pl.col("age_years")),
        gap=pl.when(~first).then(pl.col("gap_days").clip(lower_bound=0.0)),
    ).with_columns(pl.col("age", "gap").round_sig_figs(SIGNIFICANT_DIGITS))
    counts.note("time_age_unknown", visits.filter(first, pl.col("age_years").is_null()).height)
    later = visits.filter(~first, pl.col("gap_days").is_null())
    for why, n in later.group_by("gap_status").len().sort("gap_status").iter_rows():
        counts.note(f"time_gap_undefined_{why}", n)
    counts.note("time_gap_overlap_set_to_0", visits.filter(~first, pl.col("gap_days") < 0).height)

    if reference is not None:
        bins = TimeBins.from_meta(reference)
    else:
        bins = TimeBins(n_bins, *(decile_edges(values[v].drop_nulls().to_numpy(), n_bins) for v in VARIABLES))
    parts = []
    for var in VARIABLES:
        v = values.filter(pl.col(var).is_not_null())
        b = time_bin(bins.edges(var), v[var].to_numpy())
        parts.append(v.select("key", token=pl.lit(f"time:{var}:") + pl.Series(b.astype(np.int32)).cast(pl.String),
                              kind=pl.lit(KIND)))
    return TimeTokens(bins, pl.concat(parts))


def time_bin(edges: Sequence[float], values: np.ndarray) -> np.ndarray:
    """The 0-based bin :func:`time_tokens` gives each age or gap value (a gap already clipped at 0):
    the value rounded to ``SIGNIFICANT_DIGITS``, a value on an edge going up."""
    rounded = pl.Series(np.asarray(values, dtype=np.float64)).round_sig_figs(SIGNIFICANT_DIGITS).to_numpy()
    return bin_of(edges, rounded)


def time_rules(*, age: str, gap: str) -> dict[str, str]:
    """The ``meta.json`` rules for a source's time tokens (``age`` and ``gap`` say what it reads)."""
    return {"time_age": f"time:age:<b> on visit 0: {age}; bins from the quantiles of the records' first-visit "
                        "ages (linear interpolation, equal edges merged, an edge goes to the upper bin)",
            "time_gap": f"time:gap:<b> on each later visit: {gap}; overlaps give 0; bins from the quantiles "
                        "of all gaps; no token where the gap is undefined (counted)"}


def time_token_table(ds: PreparedDataset) -> pl.DataFrame:
    """Every time token of a prepared (or synthetic) dataset, one row each: ``patient_id``,
    ``visit_index``, ``variable`` (``age`` or ``gap``) and ``bin`` (Int32)."""
    time = ds.vocab.filter(pl.col("token").str.starts_with(f"{KIND}:")).select(
        "id", variable=pl.col("token").str.split(":").list.get(1),
        bin=pl.col("token").str.split(":").list.get(2).cast(pl.Int32))
    return (ds.visits.select("patient_id", "visit_index", "codes").explode("codes")
            .join(time, left_on="codes", right_on="id").drop("codes"))
