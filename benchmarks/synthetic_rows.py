"""Checks and statistics of a method's synthetic training rows.

:func:`check_rows` is applied to every row a generative over-sampler returns: binary and within
the vocabulary, like FairPlay's records (flagged synthetic by ``TrainingSet.append_synthetic``).
:func:`describe_synthetic` gives the figures the harness records per unit for every method with
synthetic rows (FairPlay's included):

``n_synthetic_distinct``
    Distinct synthetic rows (upsampling a synthetic copy repeats rows).
``n_synthetic_training_copies``
    Synthetic rows equal to one of the real training rows (a visit with a single common code is
    often equal to a real one; compare methods with each other, not with zero).
``fidelity_unigram_r2``, ``fidelity_pair_r2``
    HALO's per-visit unigram and within-visit pair probabilities (:func:`halo_balance.fidelity.
    visit_statistics`) of the synthetic rows against those of the real training rows of the same
    cells, mixed in the synthetic rows' cell proportions, compared by ``r2_score`` over the union
    of keys. Mixing matters: the synthetic rows are mostly deaths, the training rows mostly not.
``fidelity_ceiling_unigram_r2``, ``fidelity_ceiling_pair_r2``
    The same comparison between the fold's real test rows and its real training rows, with the same
    cell weights: what a fresh real sample of those cells achieves (a small one: the test rows of a
    rare cell are few, which lowers the ceiling).

Rows that are not binary (SMOTE's interpolations) get ``None`` figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from halo_balance.errors import HaloBalanceError
from halo_balance.fidelity import Probabilities, union_r2, visit_statistics

STATISTICS = ("unigram_per_visit", "pair_per_visit")


def check_rows(X: sp.csr_matrix, *, vocab_size: int, expected: int, method: str) -> sp.csr_matrix:
    """``X`` as float32 CSR after checking it holds ``expected`` rows of 0/1 values over ``vocab_size`` codes."""
    X = sp.csr_matrix(X, dtype=np.float32)
    X.eliminate_zeros()
    if X.shape != (expected, vocab_size):
        raise HaloBalanceError(f"{method} returned rows of shape {X.shape}; expected ({expected}, {vocab_size}) "
                               f"(one column per vocabulary id)")
    bad = X.data[X.data != 1]
    if bad.size:
        raise HaloBalanceError(f"{method} returned a non-binary value {float(bad[0])!r} in {bad.size} entries; "
                               f"synthetic visit rows must be 0/1")
    X.sort_indices()
    return X


def row_keys(X: sp.csr_matrix) -> list[bytes]:
    """One hashable key per row: its sorted column indices."""
    X = sp.csr_matrix(X)
    X.sort_indices()
    return [X.indices[X.indptr[i]:X.indptr[i + 1]].tobytes() for i in range(X.shape[0])]


def is_binary(X: sp.csr_matrix) -> bool:
    return bool(np.isin(sp.csr_matrix(X).data, (0, 1)).all())


def mixture(parts: Sequence[Probabilities], weights: Sequence[float]) -> Probabilities:
    """The weighted sum of several statistics over the union of their keys."""
    keys = np.unique(np.concatenate([p.keys for p in parts])) if parts else np.zeros(0, np.int64)
    values = np.zeros(len(keys))
    for p, w in zip(parts, weights, strict=True):
        values[np.searchsorted(keys, p.keys)] += w * p.values
    return Probabilities(keys=keys, values=values)


def _cell_mixture(X: sp.csr_matrix, cells: np.ndarray, weights: dict[str, float], name: str) -> Probabilities:
    parts, w = [], []
    for cell, weight in weights.items():
        rows = np.flatnonzero(cells == cell)
        if rows.size:
            parts.append(visit_statistics(X[rows], pairs=name != "unigram_per_visit")[name])
            w.append(weight)
    total = sum(w)
    return mixture(parts, [x / total for x in w])


def describe_synthetic(X: sp.csr_matrix, cells: np.ndarray, synthetic: np.ndarray, *,
                       test_X: sp.csr_matrix | None = None,
                       test_cells: np.ndarray | None = None) -> dict[str, Any]:
    """The module docstring's figures for training rows ``X`` with cell labels ``cells``.

    ``synthetic`` flags the synthetic rows; the others are the real training rows. ``test_X`` and
    ``test_cells`` (the fold's real test rows) give the ceilings.
    """
    cells = np.asarray(cells).astype(str)
    synthetic = np.asarray(synthetic, dtype=bool)
    out: dict[str, Any] = {"n_synthetic_distinct": None, "n_synthetic_training_copies": None}
    for name in ("unigram", "pair"):
        out[f"fidelity_{name}_r2"] = out[f"fidelity_ceiling_{name}_r2"] = None
    syn, real = X[synthetic], X[~synthetic]
    if syn.shape[0] == 0 or not is_binary(syn):
        return out
    keys = row_keys(syn)
    out["n_synthetic_distinct"] = len(set(keys))
    training = set(row_keys(real))
    out["n_synthetic_training_copies"] = sum(k in training for k in keys)
    names, counts = np.unique(cells[synthetic], return_counts=True)
    weights = {str(c): n / counts.sum() for c, n in zip(names, counts, strict=True)}
    syn_stats = visit_statistics(syn)
    tested: dict[str, float] = {}
    if test_X is not None and test_cells is not None:
        test_cells = np.asarray(test_cells).astype(str)
        tested = {c: w for c, w in weights.items() if (test_cells == c).any()}
    for short, name in zip(("unigram", "pair"), STATISTICS, strict=True):
        real_mix = _cell_mixture(real, cells[~synthetic], weights, name)
        out[f"fidelity_{short}_r2"] = union_r2(real_mix, syn_stats[name])
        if tested:  # both sides over the cells that hold test rows (usually all of them: real_mix again)
            real_tested = real_mix if tested == weights else _cell_mixture(real, cells[~synthetic], tested, name)
            out[f"fidelity_ceiling_{short}_r2"] = union_r2(real_tested, _cell_mixture(test_X, test_cells, tested, name))
    return out
