"""The code pairs that enough patients share within a visit: the fine module's pair terms (``model.py``).

A pair term is fitted from the visits that hold its first code (``train.refit_output_biases``). Only
pairs that at least ``min_patients`` of the fitting patients hold together, in at least one of their
visits, get one: a pair held by a handful of patients would describe those patients.
"""

from __future__ import annotations

import numpy as np

#: pairs are counted for whole patients, about this many visit pairs at a time (memory: a few int64
#: arrays of that length; visits of 50 codes hold 1,225 pairs each)
_CHUNK_PAIRS = 4_000_000


def shared_pairs(visit_ptr: np.ndarray, code_ptr: np.ndarray, codes: np.ndarray, *, vocab_size: int,
                 min_patients: int, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Code pairs (j, i), j < i, held together in a visit by at least ``min_patients`` patients.

    Parameters
    ----------
    visit_ptr : (P + 1,) int
        Patient p's visits are ``visit_ptr[p]:visit_ptr[p + 1]`` (rows of ``code_ptr``).
    code_ptr, codes : int arrays
        Visit v holds ``codes[code_ptr[v]:code_ptr[v + 1]]``, sorted.
    vocab_size : int
    min_patients : int
    skip : (V,) int, optional
        ``skip[j]``: the last id of j's exclusive group (``FineModule.skip``); pairs within a group
        are never held together and are left out.

    Returns
    -------
    pairs : (K, 2) int64, sorted by j then i
    patients : (K,) int64, the patients holding each
    """
    V = int(vocab_size)
    visit_ptr, code_ptr = np.asarray(visit_ptr, np.int64), np.asarray(code_ptr, np.int64)
    keys, counts = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    size = np.diff(code_ptr)
    pairs_before = np.concatenate(([0], np.cumsum(size * (size - 1) // 2)))[visit_ptr]  # per patient boundary
    first = 0
    n_patients = len(visit_ptr) - 1
    while first < n_patients:  # whole patients per chunk, about _CHUNK_PAIRS pairs each
        last = int(np.searchsorted(pairs_before, pairs_before[first] + _CHUNK_PAIRS, side="right")) - 1
        last = min(max(last, first + 1), n_patients)
        v0, v1 = visit_ptr[first], visit_ptr[last]
        k = np.diff(code_ptr[v0:v1 + 1])
        owner = np.repeat(np.repeat(np.arange(first, last), np.diff(visit_ptr[first:last + 1])), k)
        at = np.arange(code_ptr[v0], code_ptr[v1])
        later = np.repeat(code_ptr[v0 + 1:v1 + 1], k) - at - 1  # codes after each in its visit
        src = np.repeat(at, later)
        dst = src + 1 + np.arange(len(src)) - np.repeat(np.cumsum(later) - later, later)
        pair = codes[src].astype(np.int64) * V + codes[dst]
        held, _ = _runs(owner[src - code_ptr[v0]] * (V * V) + pair)  # once per patient
        key, count = _runs(held % (V * V))
        keys.append(key)
        counts.append(count)
        first = last
    key, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    patients = np.bincount(inverse, weights=np.concatenate(counts), minlength=len(key)).astype(np.int64)
    j, i = key // V, key % V
    keep = patients >= min_patients
    if skip is not None:
        keep &= i > np.asarray(skip)[j]
    return np.stack([j[keep], i[keep]], 1), patients[keep]


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``keys``, sorted, and how often each occurs. ``np.unique`` without counts
    hashes, which on tens of millions of int64 keys is several times slower than this sort."""
    keys = np.sort(keys)
    start = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[start], np.diff(np.append(start, len(keys)))
