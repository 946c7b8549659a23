"""Fidelity statistics and R^2 against values counted by hand on small hand-made datasets."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.speed.evaluate_speed import draw_cohort, loop_statistics
from halo_balance.fidelity import (STATISTICS, Probabilities, code_statistics, compare_statistics,
                                   distribution_summary, fidelity_report, pair_counts, record_matrix, record_shape,
                                   size_matched_r2, union_r2, visit_matrix)
from tests.conftest import tiny_like

V = 5  # the tiny vocabulary; a pair key is a * V + b


def _as_dict(p: Probabilities) -> dict[int, float]:
    return dict(zip(p.keys.tolist(), p.values.tolist()))


def test_statistics_of_tiny_counted_by_hand(tiny):
    # a: [0,3] | b: [1] -> [2,4] -> [0] | c: [1,4] | d: [3]  (6 visits, 4 records, 2 consecutive pairs)
    s = code_statistics(tiny)
    assert (s.n_records, s.n_visits, s.n_transitions) == (4, 6, 2)
    p = {name: _as_dict(s.probabilities[name]) for name in STATISTICS}
    assert p["unigram_per_visit"] == pytest.approx({0: 2 / 6, 1: 2 / 6, 2: 1 / 6, 3: 2 / 6, 4: 2 / 6})
    assert p["unigram_per_record"] == pytest.approx({0: 2 / 4, 1: 2 / 4, 2: 1 / 4, 3: 2 / 4, 4: 2 / 4})
    # unordered pairs (0,3) in a, (2,4) in b, (1,4) in c
    assert p["pair_per_visit"] == pytest.approx({0 * V + 3: 1 / 6, 2 * V + 4: 1 / 6, 1 * V + 4: 1 / 6})
    assert p["pair_per_record"] == pytest.approx({0 * V + 3: 1 / 4, 2 * V + 4: 1 / 4, 1 * V + 4: 1 / 4})
    # ordered (visit t, visit t+1) pairs, all in b: (1,2) (1,4) then (2,0) (4,0)
    seq = {1 * V + 2: 1 / 2, 1 * V + 4: 1 / 2, 2 * V + 0: 1 / 2, 4 * V + 0: 1 / 2}
    assert p["consecutive_per_visit"] == pytest.approx(seq)
    assert p["consecutive_per_record"] == pytest.approx({k: 1 / 4 for k in seq})
    assert s.record_lengths.tolist() == [1, 3, 1, 1]
    assert s.visit_sizes.tolist() == [2, 1, 2, 1, 2, 1]


def test_per_record_counts_a_record_once_and_keeps_repeats():
    # one record repeating visit [0,1] three times, then [1]; one record [1] -> [1]
    s = code_statistics(tiny_like([[[0, 1], [0, 1], [0, 1], [1]], [[1], [1]]]))
    p = {name: _as_dict(s.probabilities[name]) for name in STATISTICS}
    assert p["unigram_per_visit"] == pytest.approx({0: 3 / 6, 1: 6 / 6})
    assert p["unigram_per_record"] == pytest.approx({0: 1 / 2, 1: 2 / 2})
    assert p["pair_per_visit"] == pytest.approx({0 * V + 1: 3 / 6})
    assert p["pair_per_record"] == pytest.approx({0 * V + 1: 1 / 2})
    # transitions: [0,1]->[0,1] twice, [0,1]->[1], [1]->[1]: 4 in all; a token may follow itself
    assert p["consecutive_per_visit"] == pytest.approx({0: 2 / 4, 1: 3 / 4, 5: 2 / 4, 6: 4 / 4})
    assert p["consecutive_per_record"] == pytest.approx({0: 1 / 2, 1: 1 / 2, 5: 1 / 2, 6: 2 / 2})


def test_union_r2_counts_missing_keys_as_zero():
    real = Probabilities(np.array([0, 1]), np.array([0.5, 0.25]))
    other = Probabilities(np.array([1, 2]), np.array([0.25, 0.5]))
    # union [0,1,2]: real [.5,.25,0], other [0,.25,.5]: SS_res = .5, SS_tot = .125
    assert union_r2(real, other) == pytest.approx(1 - 0.5 / 0.125)
    assert union_r2(real, real) == 1.0
    one = Probabilities(np.array([3]), np.array([1.0]))
    assert union_r2(one, one) is None


def test_synthetic_vs_real_r2_by_hand(tiny):
    syn = tiny_like([[[0, 3]], [[1]], [[3]]])
    out = compare_statistics(code_statistics(tiny), code_statistics(syn))
    # unigram per visit: real [2,2,1,2,2]/6, synthetic [1,1,0,2,0]/3
    # residuals [0,0,1/6,1/3,1/3]: SS_res = 1/4; mean real 0.3: SS_tot = 1/45
    assert out["unigram_per_visit"]["r2"] == pytest.approx(1 - (1 / 4) / (1 / 45))
    assert out["unigram_per_visit"]["keys"] == 5
    # pairs: real {(0,3),(2,4),(1,4)} each 1/6; synthetic {(0,3)} 1/3: SS_res = 1/36 + 2/36, SS_tot = 0
    assert out["pair_per_visit"]["r2"] == 0.0  # sklearn's convention for a constant real side
    # record lengths [1,3,1,1] vs [1,1,1]: CDFs differ by 1/4 on [1,3)
    assert out["record_length_wasserstein"] == pytest.approx(0.5)
    assert out["consecutive_per_visit"]["keys_other"] == 0


def test_identical_data_scores_one(tiny):
    copy = tiny_like([[[0, 3]], [[1], [2, 4], [0]], [[4, 1]], [[3]]])
    out = compare_statistics(code_statistics(tiny), code_statistics(copy))
    assert all(out[name]["r2"] == 1.0 for name in STATISTICS)
    assert out["record_length_wasserstein"] == 0 and out["visit_size_wasserstein"] == 0


@pytest.mark.parametrize("block_pairs", [1, 300, 10**9])
def test_pair_counts_match_plain_loops_in_any_block_size(block_pairs):
    ds = draw_cohort(60, vocab_size=40, seed=5)
    expected = loop_statistics(ds)
    rec = ds.records()
    X = visit_matrix(rec, ds.vocab_size)
    for per_group, name, total in ((False, "pair_per_visit", ds.n_visits), (True, "pair_per_record", len(rec))):
        keys, counts = pair_counts(left=X, right=X, group_ptr=rec.visit_ptr, upper=True, per_group=per_group,
                                   vocab_size=ds.vocab_size, block_pairs=block_pairs)
        assert dict(zip(keys.tolist(), (counts / total).tolist())) == pytest.approx(expected[name])
    got = code_statistics(ds)
    for name in STATISTICS:
        assert _as_dict(got.probabilities[name]) == pytest.approx(expected[name])


def test_matrix_views(tiny):
    rec = tiny.records()
    assert visit_matrix(rec, V).toarray().tolist()[2] == [0, 0, 1, 0, 1]
    R = record_matrix(rec, V).toarray()
    assert R.tolist() == [[1, 0, 0, 1, 0], [1, 1, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 1, 0]]


def test_distribution_summary():
    s = distribution_summary(np.array([1, 3, 1, 1]))
    assert s["mean"] == 1.5 and s["median"] == 1.0 and s["max"] == 3 and s["histogram"] == [0, 3, 0, 1]
    assert s["std"] == pytest.approx(np.sqrt(0.75))
    assert "histogram" not in distribution_summary(np.array([0.5, 0.25]))
    assert distribution_summary(np.array([], dtype=int)) == {"n": 0}


def test_report_reference_and_cells(tiny):
    syn = tiny_like([[[0, 3]], [[1]], [[3]]], labels=[0, 1, 0], gender=["F", "M", "M"])
    half_a, half_b = tiny.select(["a", "b"]), tiny.select(["c", "d"])
    rep = fidelity_report(tiny, syn, reference=(half_a, half_b), cells=[["gender"]], min_cell_records=1)
    ceiling = compare_statistics(code_statistics(half_a), code_statistics(half_b))
    for name in STATISTICS:
        assert rep["statistics"][name]["reference_r2"] == ceiling[name]["r2"]
    # per record, halves a+b hold [1,1/2,1/2,1/2,1/2], c+d [0,1/2,0,1/2,1/2]: SS_res 1.25, SS_tot 0.2
    assert rep["statistics"]["unigram_per_record"]["reference_r2"] == pytest.approx(1 - 1.25 / 0.2)
    assert rep["label_rate"] == {"real": 0.5, "synthetic": pytest.approx(1 / 3)}
    assert rep["group_rates"]["gender"] == {"F": {"real": 0.5, "synthetic": pytest.approx(1 / 3)},
                                            "M": {"real": 0.5, "synthetic": pytest.approx(2 / 3)}}
    cells = {c["cell"]: c for c in rep["cells"]}
    assert set(cells) == {"label=0|gender=F", "label=0|gender=M", "label=1|gender=F", "label=1|gender=M"}
    f0 = cells["label=0|gender=F"]  # real a: [0,3]; synthetic s0: [0,3]
    assert (f0["n_real"], f0["n_synthetic"], f0["share_real"]) == (1, 1, 0.25)
    assert f0["unigram_per_visit"] == 1.0 and f0["mean_record_length_real"] == 1.0
    assert f0["n_reference"] == [1, 0] and f0["unigram_per_visit_reference"] is None  # c, d are not in this cell
    m0 = cells["label=0|gender=M"]  # real c: [1,4]; synthetic s2: [3] -> keys 1,3,4: real [1,0,1], syn [0,1,0]
    assert m0["unigram_per_visit"] == pytest.approx(1 - 3 / (2 / 3))
    f1 = cells["label=1|gender=F"]  # real d only: no synthetic record, no R^2
    assert f1["n_synthetic"] == 0 and f1["unigram_per_visit"] is None and f1["mean_record_length_synthetic"] is None
    strict = fidelity_report(tiny, syn, reference=(half_a, half_b), cells=[["gender"]], min_cell_records=2)
    assert all(c["unigram_per_visit"] is None for c in strict["cells"])


def test_record_shape_by_hand(tiny):
    shape = record_shape(tiny_like([[[0, 3]], [[], [2]], [[1], [], [4], [3], [0, 1]], [[]]]))
    assert (shape["share_1"], shape["share_2"], shape["share_3plus"], shape["share_5plus"]) == (0.5, 0.25, 0.25, 0.25)
    assert shape["max_visits"] == 5 and shape["mean_visits"] == 2.25 and shape["n_visits"] == 9
    assert shape["empty_visit_share"] == pytest.approx(3 / 9) and shape["empty_first_visit_share"] == 0.5
    assert shape["distinct_tokens"] == 5 and shape["mean_visit_size"] == pytest.approx(8 / 9)
    assert record_shape(tiny)["distinct_tokens"] == 5
    again = record_shape(tiny, np.array([3, 3, 0]))  # patient d ([3]) twice and a ([0, 3])
    assert again["n_records"] == 3 and again["distinct_tokens"] == 2 and again["share_1"] == 1.0
    assert record_shape(tiny, np.arange(4)) == record_shape(tiny)


def test_size_matched_r2_carries_halves_over_to_full_size_samples():
    """Two halves of one cohort, rescaled, predict the R^2 between it and an independent cohort of its size."""
    cohort, other = draw_cohort(800, vocab_size=300, seed=0), draw_cohort(800, vocab_size=300, seed=100, prefix="q")
    a, b = (cohort.select(ids) for ids in cohort.train_test_split(0.5, seed=0))
    direct = compare_statistics(code_statistics(cohort), code_statistics(other))
    halves = compare_statistics(code_statistics(a), code_statistics(b))
    for name in ("unigram_per_visit", "unigram_per_record", "pair_per_visit", "consecutive_per_visit"):
        scaled = size_matched_r2(halves[name]["r2"], sizes=(a.n_patients, b.n_patients), target=(800, 800))
        assert abs(scaled - direct[name]["r2"]) < 0.012, name
    assert direct["pair_per_visit"]["r2"] - halves["pair_per_visit"]["r2"] > 0.03  # the halves alone are far off
    assert size_matched_r2(0.9, sizes=(100, 100), target=(100, 100)) == pytest.approx(0.9)
    assert size_matched_r2(0.9, sizes=(100, 100), target=(200, 200)) == pytest.approx(0.95)
    assert size_matched_r2(None, sizes=(100, 100), target=(1, 1)) is None
