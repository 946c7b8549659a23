"""The balancing plan: how many synthetic patients each (outcome x groups) cell receives.

Cells are the outcome crossed with the chosen group attributes (none: outcome only; one; several:
intersectional). With ``n`` real training patients in a cell and ``m`` in the largest cell, an
observed cell receives ``round(ratio * (m - n))`` synthetic patients. Cells with no real patient are
listed and skipped unless ``include_empty_cells``; cells smaller than ``min_cell_size`` are skipped,
since a generator cannot have learned them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import polars as pl

from .data import PreparedDataset
from .errors import HaloBalanceError

STATUS_LARGEST = "largest"
STATUS_TOP_UP = "top_up"
STATUS_TOO_SMALL = "skipped_below_min_size"
STATUS_EMPTY = "skipped_empty"
STATUS_EMPTY_INCLUDED = "empty_included"


def plan_cells(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0,
               min_cell_size: int = 5, include_empty_cells: bool = False) -> pl.DataFrame:
    """One row per cell: ``label``, the group columns, ``n_real``, ``to_generate``, ``target``, ``status``.

    Parameters
    ----------
    train : PreparedDataset
        The real training patients (synthetic rows, if any, are not counted).
    groups : sequence of str
        Group attributes that define the cells, in addition to the outcome; may be empty.
    ratio : float in [0, 1]
        Fraction of each cell's gap to the largest cell to fill.
    min_cell_size : int
        Observed cells with fewer real patients are skipped.
    include_empty_cells : bool
        Generate for cells with no real patient too (the generator composes their conditions).
    """
    groups = list(groups)
    if not 0.0 <= ratio <= 1.0:
        raise HaloBalanceError(f"ratio must lie in [0, 1], got {ratio}")
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
    gap = (ratio * (m - pl.col("n_real"))).round(0).cast(pl.Int64)
    status = (pl.when(pl.col("n_real") == m).then(pl.lit(STATUS_LARGEST))
              .when(pl.col("n_real") == 0).then(pl.lit(STATUS_EMPTY_INCLUDED if include_empty_cells else STATUS_EMPTY))
              .when(pl.col("n_real") < min_cell_size).then(pl.lit(STATUS_TOO_SMALL))
              .otherwise(pl.lit(STATUS_TOP_UP)))
    cells = cells.with_columns(status=status).with_columns(
        to_generate=pl.when(pl.col("status").is_in([STATUS_TOP_UP, STATUS_EMPTY_INCLUDED])).then(gap).otherwise(0))
    return cells.with_columns(target=pl.col("n_real") + pl.col("to_generate")).select(
        "label", *groups, "n_real", "to_generate", "target", "status")
