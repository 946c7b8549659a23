"""The balancing plan: how many synthetic patients each (outcome x groups) cell receives.

Cells are the outcome crossed with the chosen group attributes (none: outcome only; one; several:
intersectional). With ``n`` real training patients in a cell and ``m`` in the largest cell, an
observed cell receives ``round(ratio * (m - n))`` synthetic patients. Cells with no real patient are
listed and skipped unless ``include_empty_cells``; cells smaller than ``min_cell_size`` are skipped,
since a generator cannot have learned them. Explicit ``targets`` (patients per cell after balancing)
replace the largest cell as each cell's goal; ``ratio`` then fills that fraction of the gap.

Amplification. A cell's ``amplification`` is its synthetic patients per real patient
(``to_generate / n_real``). Above :data:`AMPLIFICATION_WARNING` the generator makes many patients
from few examples of the cell (e.g. 987 from 14); :func:`amplification_warnings` names such cells
and the balancer warns about them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import polars as pl

from .data import PreparedDataset
from .errors import HaloBalanceError

#: Synthetic patients per real patient of a cell above which the plan is flagged (``--min-cell-size``,
#: ``--ratio`` or coarser groups lower it).
AMPLIFICATION_WARNING = 10.0

STATUS_LARGEST = "largest"
STATUS_TOP_UP = "top_up"
STATUS_TOO_SMALL = "skipped_below_min_size"
STATUS_EMPTY = "skipped_empty"
STATUS_EMPTY_INCLUDED = "empty_included"
STATUS_AT_TARGET = "at_target"


class AmplificationWarning(UserWarning):
    """A cell receives more than :data:`AMPLIFICATION_WARNING` synthetic patients per real one."""


def plan_cells(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0,
               min_cell_size: int = 5, include_empty_cells: bool = False,
               targets: Mapping[tuple, int] | None = None) -> pl.DataFrame:
    """One row per cell: ``label``, the group columns, ``n_real``, ``to_generate``, ``target``, ``status``,
    ``amplification``.

    Parameters
    ----------
    train : PreparedDataset
        The real training patients (synthetic rows, if any, are not counted).
    groups : sequence of str
        Group attributes that define the cells, in addition to the outcome; may be empty.
    ratio : float >= 0
        Fraction of each cell's gap to the largest cell to fill (above 1 the cells overshoot the
        largest, e.g. for a sweep of the amount of synthetic data).
    min_cell_size : int
        Observed cells with fewer real patients are skipped.
    include_empty_cells : bool
        Generate for cells with no real patient too (the generator composes their conditions).
    targets : mapping, optional
        ``{(label, *group values): patients after balancing}``; cells left out get none. A target
        below a cell's real count, or for a cell under ``min_cell_size`` (or empty, without
        ``include_empty_cells``), is an error. Default: every cell's target is the largest cell.
    """
    groups = list(groups)
    if not ratio >= 0.0:
        raise HaloBalanceError(f"ratio must be >= 0, got {ratio}")
    if min_cell_size < 0:
        raise HaloBalanceError(f"min_cell_size must be >= 0, got {min_cell_size}")
    if len(set(groups)) != len(groups):
        raise HaloBalanceError(f"group attributes repeat: {groups}")
    observed = train.cell_counts(groups, synthetic=False)
    if observed.height == 0:
        raise HaloBalanceError("the training data holds no real patients; nothing to balance")
    categories = train.group_categories
    every = pl.DataFrame(
        list(itertools.product([0, 1], *[categories[g] for g in groups])),
        schema={"label": pl.Int8, **{g: pl.String for g in groups}}, orient="row")
    cells = (every.join(observed.with_columns(pl.col("label").cast(pl.Int8)), on=["label", *groups], how="left")
             .with_columns(n_real=pl.col("n").fill_null(0).cast(pl.Int64)).drop("n"))
    m = int(cells["n_real"].max())
    if targets is None:
        goal = pl.lit(m)
    else:
        goal = pl.Series("goal", _target_column(cells, groups, targets, min_cell_size=min_cell_size,
                                                  include_empty_cells=include_empty_cells), dtype=pl.Int64)
    gap = (ratio * (goal - pl.col("n_real")).clip(lower_bound=0)).round(0).cast(pl.Int64)
    status = (pl.when(pl.col("n_real") == m).then(pl.lit(STATUS_LARGEST))
              .when(pl.col("n_real") == 0).then(pl.lit(STATUS_EMPTY_INCLUDED if include_empty_cells else STATUS_EMPTY))
              .when(pl.col("n_real") < min_cell_size).then(pl.lit(STATUS_TOO_SMALL))
              .when(goal <= pl.col("n_real")).then(pl.lit(STATUS_AT_TARGET))
              .otherwise(pl.lit(STATUS_TOP_UP)))
    cells = cells.with_columns(status=status).with_columns(
        to_generate=pl.when(pl.col("status").is_in([STATUS_TOP_UP, STATUS_EMPTY_INCLUDED])).then(gap).otherwise(0))
    return cells.with_columns(
        target=pl.col("n_real") + pl.col("to_generate"),
        amplification=pl.when(pl.col("n_real") > 0).then(pl.col("to_generate") / pl.col("n_real")),
    ).select("label", *groups, "n_real", "to_generate", "target", "status", "amplification")


def _target_column(cells: pl.DataFrame, groups: list[str], targets: Mapping[tuple, int], *,
                   min_cell_size: int, include_empty_cells: bool) -> list[int]:
    keys = [(int(r["label"]), *(r[g] for g in groups)) for r in cells.iter_rows(named=True)]
    known = set(keys)
    unknown = [k for k in targets if tuple(k) not in known]
    if unknown:
        raise HaloBalanceError(f"target for an unknown cell {unknown[0]!r}; cells are (label, "
                               f"{', '.join(groups) or 'no groups'}) such as {keys[0]!r}")
    out = []
    for key, n in zip(keys, cells["n_real"].to_list()):
        goal = targets.get(key)
        if goal is None:
            out.append(n)
            continue
        if int(goal) < n:
            raise HaloBalanceError(f"target {goal} for cell {key!r} is below its {n} real patients; "
                                   "oversampling never removes patients: ask for at least that many")
        if int(goal) > n and (0 < n < min_cell_size or (n == 0 and not include_empty_cells)):
            raise HaloBalanceError(f"cell {key!r} has {n} real patients, fewer than min_cell_size={min_cell_size}"
                                   + (" (an empty cell also needs include_empty_cells)" if n == 0 else "")
                                   + "; lower min_cell_size to generate for it, or leave it out of the targets")
        out.append(int(goal))
    return out


def amplification_warnings(plan: pl.DataFrame, groups: Sequence[str], *,
                           threshold: float = AMPLIFICATION_WARNING) -> list[str]:
    """One line per cell whose synthetic patients per real patient exceed ``threshold``."""
    hot = plan.filter(pl.col("amplification") > threshold)
    return [f"cell {cell_name(r, groups)}: {r['to_generate']} synthetic patients from {r['n_real']} real "
            f"({r['amplification']:.1f}x, above {threshold:g}x): the generator learned this cell from few "
            "examples; raise the minimum cell size (--min-cell-size), lower the ratio (--ratio) or balance "
            "on coarser groups"
            for r in hot.iter_rows(named=True)]


def cell_name(row: Mapping, groups: Sequence[str]) -> str:
    """``label=1,gender=F``: a plan row's cell."""
    return ",".join(f"{c}={row[c]}" for c in ["label", *groups])
