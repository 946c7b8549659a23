"""Fidelity of synthetic records: how closely they reproduce the statistics of the real data.

The code statistics are those of HALO (Theodorou et al., Nature Communications 2023), each a
probability per key:

=========================  ====================================  ==================================
statistic                  key                                   probability
=========================  ====================================  ==================================
``unigram_per_visit``      token ``a``                           visits holding ``a`` / visits
``unigram_per_record``     token ``a``                           records holding ``a`` / records
``pair_per_visit``         unordered pair ``a < b``              visits holding both / visits
``pair_per_record``        unordered pair ``a < b``              records with a visit holding both
                                                                 / records
``consecutive_per_visit``  ordered ``(a in visit t, b in t+1)``  consecutive visit pairs holding it
                                                                 / consecutive visit pairs
``consecutive_per_record`` ordered ``(a in visit t, b in t+1)``  records holding it at some t
                                                                 / records
=========================  ====================================  ==================================

A consecutive pair may repeat a token (``a == b``: the token recurs in the next visit). Two sets of
statistics are compared by the coefficient of determination ``r2_score(real, other)`` over the union
of their keys, a key missing on one side counting as probability 0: the figure HALO reports.

Pair counts come from sparse products (``X^T X`` over the visit matrix, ``X_t^T X_{t+1}`` over
consecutive visits), processed in blocks of rows so that memory grows with the number of distinct
pairs, never with ``V^2``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from .data import PreparedDataset, Records

UNIGRAM_STATISTICS = ("unigram_per_visit", "unigram_per_record")
PAIR_STATISTICS = ("pair_per_visit", "pair_per_record", "consecutive_per_visit", "consecutive_per_record")
STATISTICS = UNIGRAM_STATISTICS + PAIR_STATISTICS

# (row, a, b) entries per block of a pair count: bounds the memory of the sparse products
BLOCK_PAIRS = 4_000_000


@dataclass(frozen=True)
class Probabilities:
    """One statistic: sorted int64 ``keys`` (a token id, or ``a * V + b`` for a pair) and ``values``."""

    keys: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class CodeStatistics:
    """Every statistic of one dataset (see the module docstring), plus its length distributions.

    Attributes
    ----------
    record_lengths : ndarray of shape (n_records,), visits per record.
    visit_sizes : ndarray of shape (n_visits,), tokens per visit.
    """

    vocab_size: int
    n_records: int
    n_visits: int
    n_transitions: int
    probabilities: dict[str, Probabilities]
    record_lengths: np.ndarray
    visit_sizes: np.ndarray


# ---------------------------------------------------------------------- matrix views of records
def visit_matrix(records: Records, vocab_size: int) -> sp.csr_matrix:
    """One int32 multi-hot row per visit, in record order."""
    return sp.csr_matrix((np.ones(len(records.codes), dtype=np.int32), records.codes, records.code_ptr),
                         shape=(len(records.code_ptr) - 1, vocab_size))


def record_matrix(records: Records, vocab_size: int) -> sp.csr_matrix:
    """One int32 multi-hot row per record: the union of the record's visits."""
    n_visits = len(records.code_ptr) - 1
    owner = sp.csr_matrix((np.ones(n_visits, dtype=np.int32), np.arange(n_visits), records.visit_ptr),
                          shape=(len(records), n_visits))
    R = (owner @ visit_matrix(records, vocab_size)).tocsr()
    R.data[:] = 1
    R.sort_indices()
    return R


# ---------------------------------------------------------------------- statistics
def code_statistics(dataset: PreparedDataset, *, pairs: bool = True) -> CodeStatistics:
    """HALO's statistics of ``dataset`` (all patients, real or synthetic alike).

    Parameters
    ----------
    dataset : PreparedDataset
    pairs : bool
        Also count the within-visit and consecutive-visit pairs (the costlier statistics).
    """
    records, V = dataset.records(), dataset.vocab_size
    X = visit_matrix(records, V)
    n_records, n_visits = len(records), X.shape[0]
    owner = np.repeat(np.arange(n_records), records.visit_counts())
    has_next = np.flatnonzero(owner[:-1] == owner[1:])  # visit t whose record has a visit t+1
    probs = visit_statistics(X, pairs=pairs, record_ptr=records.visit_ptr)
    probs["unigram_per_record"] = _from_counts(np.bincount(record_matrix(records, V).indices, minlength=V), n_records)
    if pairs:
        trans_ptr = np.concatenate([[0], np.cumsum(np.maximum(records.visit_counts() - 1, 0))])
        within = dict(left=X, right=X, group_ptr=records.visit_ptr, upper=True, vocab_size=V)
        seq = dict(left=X[has_next], right=X[has_next + 1], group_ptr=trans_ptr, upper=False, vocab_size=V)
        probs["pair_per_record"] = _scale(*pair_counts(**within, per_group=True), n_records)
        probs["consecutive_per_visit"] = _scale(*pair_counts(**seq, per_group=False), len(has_next))
        probs["consecutive_per_record"] = _scale(*pair_counts(**seq, per_group=True), n_records)
    return CodeStatistics(vocab_size=V, n_records=n_records, n_visits=n_visits, n_transitions=len(has_next),
                          probabilities=probs, record_lengths=records.visit_counts(),
                          visit_sizes=np.diff(records.code_ptr))


def visit_statistics(X: sp.csr_matrix, *, pairs: bool = True,
                     record_ptr: np.ndarray | None = None) -> dict[str, Probabilities]:
    """``unigram_per_visit`` and (with ``pairs``) ``pair_per_visit`` of the rows of a 0/1 visit matrix.

    Works on any rows, e.g. a benchmark method's training rows. ``record_ptr`` (rows of record ``r``
    are ``record_ptr[r]:record_ptr[r+1]``) only shapes the blocks of the pair count; default one
    row per block unit.
    """
    X = sp.csr_matrix(X, dtype=np.int32, copy=True)
    X.eliminate_zeros()
    n, V = X.shape
    out = {"unigram_per_visit": _from_counts(np.bincount(X.indices, minlength=V), n)}
    if pairs:
        ptr = np.arange(n + 1) if record_ptr is None else record_ptr
        out["pair_per_visit"] = _scale(*pair_counts(left=X, right=X, group_ptr=ptr, upper=True, per_group=False,
                                                    vocab_size=V), n)
    return out


def pair_counts(*, left: sp.csr_matrix, right: sp.csr_matrix, group_ptr: np.ndarray, upper: bool,
                per_group: bool, vocab_size: int,
                block_pairs: int = BLOCK_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Count key pairs ``(a, b)`` with ``a`` in a row of ``left`` and ``b`` in the same row of ``right``.

    Parameters
    ----------
    left, right : csr_matrix of shape (n_rows, V)
        Row-aligned multi-hot matrices (the same visit matrix for within-visit pairs; visit ``t``
        and visit ``t+1`` for consecutive pairs).
    group_ptr : ndarray of shape (n_groups + 1,)
        Rows ``group_ptr[g]:group_ptr[g+1]`` belong to group (record) ``g``.
    upper : bool
        Keep ``a < b`` only (unordered pairs of distinct tokens); otherwise every ordered pair.
    per_group : bool
        Count the groups holding the pair in at least one row, instead of the rows holding it.
    block_pairs : int
        Rows are processed in blocks of whole groups holding about this many (row, a, b) entries.

    Returns
    -------
    keys, counts : int64 ndarrays, ``keys = a * V + b`` sorted ascending.
    """
    V = vocab_size
    total = sp.csr_matrix((V, V), dtype=np.int64)
    row_pairs = np.diff(left.indptr).astype(np.int64) * np.diff(right.indptr)
    group_cost = np.concatenate([[0], np.cumsum(row_pairs)])[group_ptr]
    for g0, g1 in _group_blocks(group_cost, block_pairs):
        lo, hi = int(group_ptr[g0]), int(group_ptr[g1])
        L, R = left[lo:hi], right[lo:hi]
        if per_group:
            # rows of B are the distinct (group, token a) of this block, so that B @ R holds, per
            # group and token a, the number of the group's rows with a on the left and b on the right
            rows = np.repeat(np.arange(hi - lo), np.diff(L.indptr))
            owner = np.repeat(np.arange(g1 - g0), np.diff(group_ptr[g0:g1 + 1]))[rows]
            group_token, k = np.unique(owner.astype(np.int64) * V + L.indices, return_inverse=True)
            B = sp.csr_matrix((np.ones(len(k), dtype=np.int32), (k, rows)), shape=(len(group_token), hi - lo))
            C = (B @ R).tocoo()
            a, b = group_token[C.row] % V, C.col
            if upper:
                a, b = a[a < b], b[a < b]
            block = sp.csr_matrix((np.ones(len(a), dtype=np.int64), (a, b)), shape=(V, V))  # sums over groups
        else:
            block = (L.T @ R).astype(np.int64)
            block = sp.triu(block, k=1, format="csr") if upper else block.tocsr()
        total = total + block
    total.sum_duplicates()
    total.eliminate_zeros()
    coo = total.tocoo()
    return coo.row.astype(np.int64) * V + coo.col, coo.data.astype(np.int64)


def _group_blocks(cost_ptr: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive group ranges ``[g0, g1)`` within ``budget`` of cumulative cost ``cost_ptr`` (>= 1 group each)."""
    n_groups, g0 = len(cost_ptr) - 1, 0
    while g0 < n_groups:
        g1 = int(np.searchsorted(cost_ptr, cost_ptr[g0] + budget, side="right")) - 1
        g1 = min(max(g1, g0 + 1), n_groups)
        yield g0, g1
        g0 = g1


def _from_counts(counts: np.ndarray, total: int) -> Probabilities:
    keys = np.flatnonzero(counts).astype(np.int64)
    return _scale(keys, counts[keys], total)


def _scale(keys: np.ndarray, counts: np.ndarray, total: int) -> Probabilities:
    return Probabilities(keys=keys, values=counts / total if total else counts.astype(np.float64))


# ---------------------------------------------------------------------- comparisons
def union_r2(real: Probabilities, other: Probabilities) -> float | None:
    """``r2_score(real, other)`` over the union of keys, a missing key counting as 0.

    ``None`` when fewer than two keys exist (R^2 is undefined).
    """
    return _r2(*on_union(real, other))


def on_union(real: Probabilities, other: Probabilities) -> tuple[np.ndarray, np.ndarray]:
    """Both sides' values over the sorted union of their keys, 0 where a side lacks the key."""
    keys = np.concatenate([real.keys, other.keys])  # each side sorted and unique: sort, drop repeats
    keys.sort()
    keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys
    out = np.zeros((2, len(keys)))
    out[0, np.searchsorted(keys, real.keys)] = real.values
    out[1, np.searchsorted(keys, other.keys)] = other.values
    return out[0], out[1]


def _r2(y_real: np.ndarray, y_other: np.ndarray) -> float | None:
    from sklearn.metrics import r2_score

    return float(r2_score(y_real, y_other)) if len(y_real) >= 2 else None


def distribution_summary(values: np.ndarray) -> dict[str, Any]:
    """Mean, standard deviation, quantiles and, for integers, the histogram (``[i]`` = how many equal i)."""
    values = np.asarray(values)
    if len(values) == 0:
        return {"n": 0}
    q = np.quantile(values, [0.05, 0.1, 0.5, 0.9])
    out = {"n": int(len(values)), "mean": float(values.mean()), "std": float(values.std()),
           "p05": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]),
           "max": values.max().item()}
    if np.issubdtype(values.dtype, np.integer):
        out["histogram"] = np.bincount(values).tolist()
    return out


def record_shape(dataset: PreparedDataset, rows: np.ndarray | None = None) -> dict[str, Any]:
    """The shape of a dataset's records: length shares, empty visits and the tokens in use.

    ``share_1`` / ``share_2`` / ``share_3plus`` / ``share_5plus``: records with 1, 2, >= 3, >= 5
    visits; ``max_visits``, ``mean_visits``; ``empty_visit_share`` (visits without a token) and
    ``empty_first_visit_share`` (records whose first visit has none); ``distinct_tokens`` (tokens
    held by at least one visit) and ``mean_visit_size``. ``rows`` (patient positions, repeats
    allowed, e.g. a bootstrap resample) restricts the figures to those records.
    """
    records = dataset.records()
    lengths, visit_first = records.visit_counts(), records.visit_ptr[:-1]
    if rows is not None:
        lengths, visit_first = lengths[rows], visit_first[rows]
    visits = np.repeat(visit_first - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    sizes = (records.code_ptr[1:] - records.code_ptr[:-1])[visits]
    codes = records.codes[np.repeat(records.code_ptr[visits] - np.cumsum(sizes) + sizes, sizes)
                          + np.arange(int(sizes.sum()))]
    if not len(lengths):
        return {"n_records": 0}
    first = sizes[(np.cumsum(lengths) - lengths)[lengths > 0]]
    return {"n_records": int(len(lengths)), "n_visits": int(len(sizes)),
            "share_1": float((lengths == 1).mean()), "share_2": float((lengths == 2).mean()),
            "share_3plus": float((lengths >= 3).mean()), "share_5plus": float((lengths >= 5).mean()),
            "max_visits": int(lengths.max()), "mean_visits": float(lengths.mean()),
            "empty_visit_share": float((sizes == 0).mean()) if len(sizes) else None,
            "empty_first_visit_share": float((first == 0).mean()) if len(first) else None,
            "distinct_tokens": int(len(np.unique(codes))),
            "mean_visit_size": float(sizes.mean()) if len(sizes) else None}


def size_matched_r2(r2: float | None, *, sizes: tuple[int, int], target: tuple[int, int]) -> float | None:
    """An R^2 between two real samples of ``sizes`` records, carried over to samples of ``target`` sizes.

    Two independent estimates of a probability p from a and b records differ by p(1-p)(1/a + 1/b)
    in expected square, so the residual sum of squares behind ``1 - R^2`` grows with
    ``1/a + 1/b`` while the real side's spread stays put: ``1 - R^2`` is rescaled by
    ``(1/n + 1/N) / (1/a + 1/b)``. This gives the ceiling of N synthetic records against n training
    records from, e.g., two halves of the training data when no real sample of N records is at hand
    (first order: a key seen in neither sample is left out either way).
    """
    if r2 is None or min(*sizes, *target) < 1:
        return None
    factor = (1 / target[0] + 1 / target[1]) / (1 / sizes[0] + 1 / sizes[1])
    return 1.0 - (1.0 - r2) * factor


def compare_statistics(real: CodeStatistics, other: CodeStatistics) -> dict[str, Any]:
    """R^2 of every statistic both sides hold, and the 1-Wasserstein distance of the length distributions."""
    from scipy.stats import wasserstein_distance

    out: dict[str, Any] = {}
    for name in STATISTICS:
        if name in real.probabilities and name in other.probabilities:
            a, b = real.probabilities[name], other.probabilities[name]
            y_real, y_other = on_union(a, b)
            out[name] = {"r2": _r2(y_real, y_other), "keys": len(y_real), "keys_real": len(a), "keys_other": len(b)}
    for name, attr in (("record_length", "record_lengths"), ("visit_size", "visit_sizes")):
        a, b = getattr(real, attr), getattr(other, attr)
        out[f"{name}_wasserstein"] = float(wasserstein_distance(a, b)) if len(a) and len(b) else None
    return out


def fidelity_report(real: PreparedDataset, synthetic: PreparedDataset, *,
                    reference: tuple[PreparedDataset, PreparedDataset],
                    cells: Sequence[Sequence[str]] | None = None,
                    min_cell_records: int = 20) -> dict[str, Any]:
    """Synthetic-vs-real fidelity, each figure beside its real reference.

    Parameters
    ----------
    real : PreparedDataset
        The generator's training data; every statistic of ``synthetic`` is compared with it.
    synthetic : PreparedDataset
    reference : (PreparedDataset, PreparedDataset)
        Two disjoint real samples (training vs held-out patients, or two halves of ``real``); the
        same comparison between them is the reference: what a fresh real sample achieves (of the
        synthetic data's size, when the caller draws ``reference[1]`` so; see ``evaluate``). It is
        no ceiling: a synthetic sample may beat it, e.g. by being larger.
    cells : sequence of sequences of str, optional
        Group attributes crossed with the outcome to form cells; default: each attribute alone.
    min_cell_records : int
        A cell's R^2 is computed only when both compared sides hold at least this many records.
    """
    stats = {"real": code_statistics(real), "synthetic": code_statistics(synthetic)}
    ref_a = stats["real"] if reference[0] is real else code_statistics(reference[0])
    ref_b = code_statistics(reference[1])
    versus, ref = compare_statistics(stats["real"], stats["synthetic"]), compare_statistics(ref_a, ref_b)
    report: dict[str, Any] = {
        "statistics": {name: {"r2": versus[name]["r2"], "reference_r2": ref[name]["r2"],
                              "keys": versus[name]["keys"], "keys_real": versus[name]["keys_real"],
                              "keys_synthetic": versus[name]["keys_other"]} for name in STATISTICS},
    }
    for name, attr in (("record_length", "record_lengths"), ("visit_size", "visit_sizes")):
        report[name] = {"real": distribution_summary(getattr(stats["real"], attr)),
                        "synthetic": distribution_summary(getattr(stats["synthetic"], attr)),
                        "wasserstein": versus[f"{name}_wasserstein"],
                        "reference_wasserstein": ref[f"{name}_wasserstein"]}
    report["label_rate"] = {"real": _rate(real.patients["label"]), "synthetic": _rate(synthetic.patients["label"])}
    report["group_rates"] = {g: _category_shares(real, synthetic, g) for g in real.group_attributes}
    report["cells"] = [row for groups in real.cell_groupings(cells)
                       for row in cell_fidelity(real, synthetic, reference=reference, groups=groups,
                                                min_records=min_cell_records)]
    return report


def cell_fidelity(real: PreparedDataset, synthetic: PreparedDataset, *,
                  reference: tuple[PreparedDataset, PreparedDataset], groups: Sequence[str],
                  min_records: int = 20) -> list[dict[str, Any]]:
    """Per (outcome x ``groups``) cell: sizes and shares, unigram R^2 and its real reference, mean lengths."""
    parts = {"real": real, "synthetic": synthetic, "ref_a": reference[0], "ref_b": reference[1]}
    strata = {k: d.strata(groups) for k, d in parts.items()}
    names = sorted(set(strata["real"].to_list()) | set(strata["synthetic"].to_list()))
    rows, min_records = [], max(min_records, 1)
    for cell in names:
        subset = {k: parts[k].select(parts[k].patients.filter(strata[k] == cell)["patient_id"]) for k in parts}
        n = {k: d.n_patients for k, d in subset.items()}
        stats = {k: code_statistics(d, pairs=False) if n[k] else None for k, d in subset.items()}
        row: dict[str, Any] = {"cell": cell, "groups": list(groups),
                               "n_real": n["real"], "n_synthetic": n["synthetic"],
                               "n_reference": [n["ref_a"], n["ref_b"]],
                               "share_real": n["real"] / real.n_patients,
                               "share_synthetic": n["synthetic"] / synthetic.n_patients}
        for side in ("real", "synthetic"):
            s = stats[side]
            row[f"mean_record_length_{side}"] = float(s.record_lengths.mean()) if s else None
            row[f"mean_visit_size_{side}"] = float(s.visit_sizes.mean()) if s and s.n_visits else None
        for name in UNIGRAM_STATISTICS:
            row[name] = (union_r2(stats["real"].probabilities[name], stats["synthetic"].probabilities[name])
                         if min(n["real"], n["synthetic"]) >= min_records else None)
            row[f"{name}_reference"] = (union_r2(stats["ref_a"].probabilities[name], stats["ref_b"].probabilities[name])
                                      if min(n["ref_a"], n["ref_b"]) >= min_records else None)
        rows.append(row)
    return rows


def _rate(labels: pl.Series) -> float | None:
    return float(labels.mean()) if len(labels) else None


def _category_shares(real: PreparedDataset, synthetic: PreparedDataset, attribute: str) -> dict[str, Any]:
    out = {}
    for cat in real.group_categories[attribute]:
        out[cat] = {"real": float((real.patients[attribute] == cat).mean()) if real.n_patients else None,
                    "synthetic": float((synthetic.patients[attribute] == cat).mean())
                    if synthetic.n_patients else None}
    return out
