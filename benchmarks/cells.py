"""The cells every rebalancing method fills, and their target sizes: one piece for all methods.

A cell is the outcome crossed with the *balanced* attributes (``benchmarks.kfold --balance-by``;
none: the outcome alone, the paper's Table 2; several: their intersection). Patient-level methods
(upsampling, downsampling, FairPlay) count a cell in patients, the label being the patient's
outcome; visit-level methods (SMOTE, SMOTEN, importance weights) count it in visit rows, the label
being the visit's. The evaluation groups (``--groups``) are independent of the cells: fairness is
measured across them whatever a method balanced.

Targets (:func:`balance_targets`): with ``n`` in a cell and ``m`` in the largest, an over-sampler
brings every cell of at least ``min_cell_size`` to ``n + round(ratio x (m - n))`` (``ratio`` above
1 overshoots the largest cell, as in the paper's sweep of the amount of synthetic data); an
under-sampler cuts every such cell larger than ``t = max(s, floor)``, ``s`` the smallest such cell,
by ``round(ratio x (n - t))`` (``ratio`` at most 1). Cells below ``min_cell_size`` are left as they
are and do not set ``s``.

A new method plugs in by asking its :class:`Balancing` for ``patient_cells(train)`` (or taking
:func:`cell_names` of visit rows) and ``targets(counts, direction=...)``; the harness builds the
``Balancing`` from ``--balance-by``, ``--ratio`` and the protocol (:mod:`benchmarks.protocols`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import polars as pl

from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError

from .metrics import group_labels

Direction = Literal["up", "down"]
K = TypeVar("K", bound=Hashable)
CELL_SEPARATOR = "|"


def balance_targets(counts: Mapping[K, int], *, ratio: float, min_cell_size: int, direction: Direction,
                    floor: int = 0) -> dict[K, int]:
    """Target size of every cell that changes: ``{cell: n_after}`` (see the module docstring).

    Examples
    --------
    >>> balance_targets({"a": 100, "b": 40, "c": 3}, ratio=1.0, min_cell_size=5, direction="up")
    {'b': 100}
    >>> balance_targets({"a": 1500, "b": 1200, "c": 300}, ratio=1.0, min_cell_size=1, direction="down", floor=1000)
    {'a': 1000, 'b': 1000}
    """
    if direction == "down" and ratio > 1:
        raise HaloBalanceError(f"downsampling takes a ratio of at most 1 (got {ratio}): it cannot cut a cell "
                               "below its target")
    eligible = {c: n for c, n in counts.items() if n >= max(min_cell_size, 1)}
    if not eligible:
        return {}
    if direction == "up":
        m = max(counts.values())
        return {c: n + round(ratio * (m - n)) for c, n in eligible.items() if round(ratio * (m - n)) > 0}
    t = max(min(eligible.values()), floor)
    return {c: n - round(ratio * (n - t)) for c, n in eligible.items() if n > t and round(ratio * (n - t)) > 0}


def group_names(frame: pl.DataFrame, attributes: Sequence[str]) -> np.ndarray:
    """Each row's group over ``attributes`` (values joined by ``" & "``); ``""`` for no attribute."""
    if not attributes:
        return np.full(frame.height, "", dtype=object).astype(str)
    return group_labels(frame, attributes).to_numpy().astype(str)


@dataclass(frozen=True)
class Balancing:
    """The cells of a rebalancing method and their target sizes.

    Parameters
    ----------
    balance_by : attributes crossed with the outcome; empty balances the outcome only.
    ratio : fraction of each cell's gap to fill (over-samplers may exceed 1).
    min_cell_size : cells with fewer members are left as they are.
    downsample_floor : an under-sampler cuts no cell below this many (the paper's 1,000).
    """

    balance_by: tuple[str, ...] = ()
    ratio: float = 1.0
    min_cell_size: int = 5
    downsample_floor: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "balance_by", tuple(self.balance_by))
        if self.ratio < 0:
            raise HaloBalanceError(f"the ratio must be >= 0, got {self.ratio}")
        if self.min_cell_size < 1 or self.downsample_floor < 0:
            raise HaloBalanceError(f"min_cell_size must be >= 1 and downsample_floor >= 0, got "
                                   f"{self.min_cell_size} and {self.downsample_floor}")

    @property
    def label(self) -> str:
        """``outcome x gender`` (for reports)."""
        return " x ".join(("outcome", *self.balance_by))

    def groups_for(self, *, per_group: bool, evaluation: Sequence[str]) -> tuple[str, ...]:
        """The attributes whose groups a method treats apart: the balanced ones; a method that is
        per group rather than per cell (separate models, group thresholds) falls back to the
        ``evaluation`` groups when only the outcome is balanced."""
        return self.balance_by if self.balance_by or not per_group else tuple(evaluation)

    def patient_cells(self, train: PreparedDataset) -> np.ndarray:
        """Each patient's cell, ``"<outcome>|<groups>"``, in the patients table's order."""
        return cell_names(train.patients["label"].to_numpy(), group_names(train.patients, self.balance_by))

    def targets(self, counts: Mapping[K, int], *, direction: Direction, min_cell_size: int | None = None,
                ) -> dict[K, int]:
        """:func:`balance_targets` with this balancing's settings (``min_cell_size`` may be raised
        by a method that needs more members, e.g. SMOTE's neighbours)."""
        return balance_targets(counts, ratio=self.ratio, direction=direction,
                               min_cell_size=self.min_cell_size if min_cell_size is None else min_cell_size,
                               floor=self.downsample_floor if direction == "down" else 0)


def cell_names(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``"<label>|<group>"`` per row (:func:`split_cell` inverts it)."""
    return np.char.add(np.char.add(np.asarray(labels).astype(int).astype(str), CELL_SEPARATOR),
                       np.asarray(groups).astype(str))


def split_cell(name: str) -> tuple[int, str]:
    """``(label, group)`` of a cell name."""
    label, _, group = str(name).partition(CELL_SEPARATOR)
    return int(label), group


def codes(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct names, code of each row)``: cells as small integers for the samplers."""
    distinct, inverse = np.unique(np.asarray(names), return_inverse=True)
    return distinct, inverse.astype(np.int64).ravel()
