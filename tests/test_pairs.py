"""The code pairs patients share within a visit: counted once per patient, against a direct count."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

import halo_balance.pairs as pairs_module
from halo_balance.pairs import shared_pairs


def _cohort(seed: int = 0, n_patients: int = 300, vocab_size: int = 30):
    rng = np.random.default_rng(seed)
    visit_ptr, code_ptr, codes, held = [0], [0], [], []
    for _ in range(n_patients):
        mine = set()
        for _ in range(int(rng.integers(0, 4))):  # a patient may have no visit, a visit no code
            visit = sorted(rng.choice(vocab_size, size=int(rng.integers(0, 7)), replace=False).tolist())
            codes += visit
            code_ptr.append(len(codes))
            mine |= set(itertools.combinations(visit, 2))
        visit_ptr.append(len(code_ptr) - 1)
        held.append(mine)
    counts = collections.Counter(pair for mine in held for pair in mine)
    return np.array(visit_ptr), np.array(code_ptr), np.array(codes, dtype=np.int32), counts


@pytest.mark.parametrize("chunk", [40, 10**9])  # patients a few at a time (40 pairs), or all at once
def test_pairs_are_counted_once_per_patient(chunk, monkeypatch):
    visit_ptr, code_ptr, codes, counts = _cohort()
    monkeypatch.setattr(pairs_module, "_CHUNK_PAIRS", chunk)
    pairs, patients = shared_pairs(visit_ptr, code_ptr, codes, vocab_size=30, min_patients=6)
    want = sorted((pair, n) for pair, n in counts.items() if n >= 6)
    assert sorted((tuple(p), int(n)) for p, n in zip(pairs.tolist(), patients)) == want
    assert 50 < len(want) < len(counts)  # the threshold leaves some pairs out, keeps others
    assert (pairs[:, 0] < pairs[:, 1]).all() and (np.diff(pairs[:, 0] * 30 + pairs[:, 1]) > 0).all()


def test_a_pair_in_several_visits_of_one_patient_counts_once():
    # patient 0: (1, 2) in three visits; patient 1: once; patient 2: (1, 2) never, (2, 5) once
    visit_ptr = np.array([0, 3, 4, 5])
    code_ptr = np.array([0, 2, 5, 7, 9, 11])
    codes = np.array([1, 2, 1, 2, 3, 1, 2, 1, 2, 2, 5], dtype=np.int32)
    pairs, patients = shared_pairs(visit_ptr, code_ptr, codes, vocab_size=6, min_patients=1)
    assert dict(zip(map(tuple, pairs.tolist()), patients.tolist())) == {(1, 2): 2, (1, 3): 1, (2, 3): 1, (2, 5): 1}
    pairs, _ = shared_pairs(visit_ptr, code_ptr, codes, vocab_size=6, min_patients=2)
    assert pairs.tolist() == [[1, 2]]


def test_pairs_within_an_exclusive_group_are_left_out():
    visit_ptr, code_ptr, codes, counts = _cohort(seed=1)
    skip = np.arange(30)
    skip[10:15] = 14  # codes 10..14: one group
    pairs, _ = shared_pairs(visit_ptr, code_ptr, codes, vocab_size=30, min_patients=3, skip=skip)
    within = [(j, i) for j, i in pairs.tolist() if 10 <= j < i <= 14]
    assert not within and any(10 <= j < i <= 14 and n >= 3 for (j, i), n in counts.items())
    assert len(pairs) == sum(n >= 3 and not 10 <= j < i <= 14 for (j, i), n in counts.items())
