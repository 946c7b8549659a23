"""Privacy figures against values computed by hand: copies, distances and the three attacks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from halo_balance.errors import DatasetError
from halo_balance.privacy import (attribute_inference, cell_membership_inference, distance_membership_inference,
                                  exact_copies, knn_vote, likelihood_membership_inference, membership_auroc,
                                  nearest_neighbours, privacy_report, record_features)
from tests.conftest import tiny_like


def _rows(*sets, width=5) -> sp.csr_matrix:
    dense = np.zeros((len(sets), width))
    for i, s in enumerate(sets):
        dense[i, list(s)] = 1
    return sp.csr_matrix(dense)


def test_exact_copies(tiny):
    # tiny: a [0,3] | b [1] [2,4] [0] | c [1,4] | d [3]
    syn = tiny_like([[[0, 3]], [[0, 3]], [[2, 4], [1], [0]], [[1], [2, 4]], [[1, 4]], [[3, 4]]])
    out = exact_copies(syn.records(), tiny.records())
    # s0, s1 copy a; s4 copies c; s2 reorders b's visits and s3 is b's prefix: not copies
    assert out == {"synthetic_copies": 3, "copies_of_unique_records": 3, "copies_of_rare_records": 3, "rare_k": 5,
                   "training_records_copied": 2, "training_duplicates": 0}
    doubled = tiny_like([[[0, 3]], [[0, 3]], [[1]]], prefix="t", synthetic=False)
    assert exact_copies(syn.records(), doubled.records()) == {
        "synthetic_copies": 2, "copies_of_unique_records": 0, "copies_of_rare_records": 2, "rare_k": 5,
        "training_records_copied": 1, "training_duplicates": 1}
    # [0,3] is held by two training patients: rare below k = 3, shared from k = 2 on
    assert exact_copies(syn.records(), doubled.records(), k=2)["copies_of_rare_records"] == 0


def test_jaccard_and_hamming_by_hand():
    queries = _rows({0, 1}, set(), {3})
    reference = _rows({1, 2}, {0, 1, 2, 3}, set())
    d, i = nearest_neighbours(queries, reference, k=3)
    # {0,1} vs {1,2}: 1 - 1/3; vs {0,1,2,3}: 1 - 2/4; vs {}: 1.  {} vs {}: 0 (two empty records are equal)
    assert d[0].tolist() == pytest.approx([0.5, 2 / 3, 1.0]) and i[0].tolist() == [1, 0, 2]
    assert d[1, 0] == 0.0 and i[1, 0] == 2
    assert d[2].tolist() == pytest.approx([0.75, 1.0, 1.0]) and i[2, 0] == 1
    h, hi = nearest_neighbours(queries, reference, k=1, metric="hamming")
    assert h[:, 0].tolist() == [2.0, 0.0, 1.0] and hi[1:, 0].tolist() == [2, 2]  # row 0: a three-way tie
    with pytest.raises(ValueError, match="metric: unknown"):
        nearest_neighbours(queries, reference, metric="cosine")


def test_exclude_self_keeps_identical_others():
    X = _rows({0, 1}, {0, 1}, {2}, {2, 3})
    d, i = nearest_neighbours(X, X, exclude=np.arange(4))
    assert d[:, 0].tolist() == pytest.approx([0.0, 0.0, 0.5, 0.5])
    assert i[:, 0].tolist() == [1, 0, 3, 2]
    d, i = nearest_neighbours(X[[3, 0]], X, exclude=np.array([3, 0]))  # a sample of the rows
    assert d[:, 0].tolist() == pytest.approx([0.5, 0.0]) and i[:, 0].tolist() == [2, 1]
    d0, _ = nearest_neighbours(X, X)
    assert d0[:, 0].tolist() == [0.0] * 4


def test_distances_match_scipy_in_small_blocks():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(0)
    A, B = rng.random((37, 20)) < 0.2, rng.random((23, 20)) < 0.2
    d, i = nearest_neighbours(sp.csr_matrix(A), sp.csr_matrix(B), k=4, block_cells=50)
    full = np.nan_to_num(cdist(A, B, metric="jaccard"))
    assert np.allclose(d, np.sort(full, axis=1)[:, :4])
    assert np.allclose(np.take_along_axis(full, i, axis=1), d)
    h, _ = nearest_neighbours(sp.csr_matrix(A), sp.csr_matrix(B), k=2, metric="hamming", block_cells=7)
    assert np.allclose(h, np.sort(cdist(A, B, metric="hamming") * 20, axis=1)[:, :2])


def test_membership_auroc_by_hand():
    # member/non-member pairs: 3>1, 3>2, 2>1, 2=2 (half) -> 3.5 / 4
    out = membership_auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0]))
    assert out["auroc"] == pytest.approx(0.875) and (out["n_members"], out["n_nonmembers"]) == (2, 2)
    assert out["tpr_at_fpr_0.1"] == 0.5  # only the member at 3 is caught before any non-member
    assert distance_membership_inference(np.array([0.0, 0.5]), np.array([0.5, 1.0]))["auroc"] == pytest.approx(0.875)
    assert membership_auroc(np.array([1.0]), np.array([]))["auroc"] is None


def test_likelihood_attack_per_event():
    # long member records have the lower total log-likelihood, but the higher per-event one
    out = likelihood_membership_inference(np.array([-10.0, -12.0]), np.array([-2.0, -3.0]),
                                          member_sizes=np.array([10, 12]), nonmember_sizes=np.array([1, 1]))
    assert out["auroc"] == 0.0 and out["per_event"]["auroc"] == 1.0


def test_knn_vote_ties_take_the_smaller_code():
    assert knn_vote(np.array([[1, 1, 0], [2, 0, 0], [0, 1, 2]])).tolist() == [1, 0, 0]


def test_record_features_drop_tokens(tiny):
    X = record_features(tiny, drop_tokens=[0, 4]).toarray()
    assert X.tolist() == [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_attribute_inference_by_hand():
    # token 0 marks women, token 1 men; token 2 (sensitive) is held by the men only
    victims = tiny_like([[[0]], [[0, 3]], [[1, 2]], [[1]]], prefix="v", synthetic=False,
                        gender=["F", "F", "M", "M"], labels=[0, 0, 0, 1])
    attacker = tiny_like([[[0]], [[0, 3]], [[0]], [[1, 2]], [[1, 2]]], gender=["F", "F", "F", "M", "M"])
    reference = tiny_like([[[1]], [[1]], [[0]]], prefix="h", synthetic=False, gender=["F", "F", "M"],
                          labels=[1, 1, 0])
    out = attribute_inference(victims, attacker, reference=reference, attributes=["gender", "label"],
                              sensitive_tokens=["dx9:428"], k=1)
    g = out["attributes"]["gender"]
    assert g["attacker"] == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    assert g["majority_class"] == "F" and g["majority"]["accuracy"] == 0.5
    assert g["reference"]["accuracy"] == 0.0  # the reference data has the tokens the other way round
    lab = out["attributes"]["label"]  # every synthetic label is 0
    assert lab["attacker"]["accuracy"] == 0.75 and lab["majority"]["accuracy"] == 0.75
    # label from the reference: v0 [0] -> h2 (0); v1 [0,3] -> h2 (0); v2 [1] (2 hidden) -> h0 (1); v3 [1] -> h0 (1)
    assert lab["reference"]["accuracy"] == 0.75
    tok = out["attributes"]["token:dx9:428"]  # token 2 hidden: v2 [1] and v3 [1] both look like holders
    assert tok["classes"] == ["0", "1"] and tok["attacker"]["accuracy"] == 0.75
    assert tok["attacker"]["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert tok["majority"]["accuracy"] == 0.75 and tok["reference"]["accuracy"] == 0.75
    with pytest.raises(DatasetError, match="not in the vocabulary"):
        attribute_inference(victims, attacker, sensitive_tokens=["dx:nope"])
    with pytest.raises(DatasetError, match="attribute: unknown"):
        attribute_inference(victims, attacker, attributes=["race"])


def test_privacy_report_with_holdout(tiny):
    syn = tiny_like([[[0, 3]], [[1, 4]], [[2]]])
    holdout = tiny_like([[[3]], [[2, 3]]], prefix="h", synthetic=False)
    calls = []

    def log_likelihood(ds):
        calls.append(ds.n_patients)
        return np.where(ds.patients["patient_id"].str.starts_with("h").to_numpy(), -5.0, -1.0)

    rep = privacy_report(tiny, syn, holdout=holdout, log_likelihood=log_likelihood)
    cp = rep["exact_copies"]
    assert (cp["synthetic_copies"], cp["synthetic_records"], cp["holdout_equal_to_training"]) == (2, 3, 1)
    nn = rep["nearest_neighbour"]
    # synthetic: [0,3]=a 0, [1,4]=c 0, [2] vs b {0,1,2,4}: 1 - 1/4
    assert nn["synthetic_to_train"]["mean"] == pytest.approx(0.75 / 3)
    # holdout: [3]=d 0, {2,3} vs d {3}: 1/2
    assert nn["baseline"] == "holdout_to_train" and nn["holdout_to_train"]["median"] == 0.25
    assert nn["median_ratio"] == 0.0 and nn["synthetic_to_train"]["fraction_zero"] == pytest.approx(2 / 3)
    mia = rep["membership_inference"]
    # members' distance to the nearest synthetic record: a 0, b 1/2 ({0,1,2,4} vs {1,4}), c 0, d 1/2 (vs {0,3});
    # non-members: h0 {3} 1/2, h1 {2,3} 1/2 (vs {2}): a and c win their 4 pairs, b and d tie their 4
    assert mia["distance"]["auroc"] == pytest.approx((4 + 4 * 0.5) / 8)
    assert mia["likelihood"]["auroc"] == 1.0 and calls == [4, 2]
    assert mia["likelihood"]["per_event"]["auroc"] == 1.0
    assert set(rep["attribute_inference"]["attributes"]) == {"label", "gender", "age_group"}


def test_privacy_report_without_holdout_skips_membership(tiny):
    syn = tiny_like([[[0, 3]]])
    rep = privacy_report(tiny, syn, holdout=None, log_likelihood=lambda ds: np.zeros(ds.n_patients))
    assert "skipped" in rep["membership_inference"]["distance"]
    assert "skipped" in rep["membership_inference"]["likelihood"]
    nn = rep["nearest_neighbour"]
    # nearest other training record: a {0,3} -> d {3} 1/2; b {0,1,2,4} -> c 1/2; c {1,4} -> b 1/2; d -> a 1/2
    assert nn["baseline"] == "train_to_other_train" and nn["train_to_other_train"]["mean"] == 0.5
    assert "holdout_records" not in rep["exact_copies"]
    assert "reference" not in rep["attribute_inference"]["attributes"]["gender"]


def test_likelihood_length_checked(tiny):
    holdout = tiny_like([[[3]]], prefix="h", synthetic=False)
    with pytest.raises(ValueError, match="returned 1 values for 4 patients"):
        privacy_report(tiny, tiny, holdout=holdout, log_likelihood=lambda ds: np.zeros(1))


def test_privacy_report_samples_queries_but_searches_everything(tiny):
    syn = tiny_like([[[0, 3]], [[1, 4]], [[2]]])
    holdout = tiny_like([[[3]], [[2, 3]]], prefix="h", synthetic=False)
    calls = []

    def log_likelihood(ds):
        calls.append(ds.patients["patient_id"].to_list())
        return np.zeros(ds.n_patients)

    rep = privacy_report(tiny, syn, holdout=holdout, log_likelihood=log_likelihood, max_queries=2, seed=0)
    assert rep["sampled"] == {"synthetic": [2, 3], "train": [2, 4], "victims": [2, 4]}
    assert rep["exact_copies"]["synthetic_copies"] == 2  # counted over every record
    assert rep["nearest_neighbour"]["synthetic_to_train"]["n"] == 2
    assert rep["membership_inference"]["distance"]["n_members"] == 2
    assert rep["membership_inference"]["distance"]["n_nonmembers"] == 2
    assert len(calls[0]) == 2 and set(calls[0]) <= {"a", "b", "c", "d"} and calls[1] == ["h0", "h1"]
    assert rep["attribute_inference"]["n_victims"] == 2
    assert privacy_report(tiny, syn, holdout=holdout, max_queries=2, seed=0)["nearest_neighbour"] == \
        rep["nearest_neighbour"]


def test_membership_within_each_cell_by_hand():
    members = tiny_like([[[0]]] * 5, prefix="m", synthetic=False, labels=[1, 1, 0, 0, 0],
                        gender=["F", "F", "F", "M", "M"])
    nonmembers = tiny_like([[[0]]] * 4, prefix="n", synthetic=False, labels=[1, 1, 0, 0], gender=["F", "F", "M", "M"])
    scores = {"likelihood": (np.array([3.0, 1.0, 0.0, 2.0, 0.5]), np.array([2.0, 0.0, 1.0, 1.0]))}
    rows = {r["cell"]: r for r in cell_membership_inference(members, nonmembers, scores, cells=[["gender"]],
                                                            min_patients=1)}
    assert set(rows) == {"label=0|gender=F", "label=0|gender=M", "label=1|gender=F"}
    # label=1 F: members 3, 1 against non-members 2, 0: three of four pairs won
    assert rows["label=1|gender=F"]["attacks"]["likelihood"]["auroc"] == 0.75
    # label=0 M: members 2, 0.5 against 1, 1: 2 beats both, 0.5 beats neither
    assert rows["label=0|gender=M"]["attacks"]["likelihood"]["auroc"] == 0.5
    assert (rows["label=0|gender=F"]["n_members"], rows["label=0|gender=F"]["n_nonmembers"]) == (1, 0)
    assert rows["label=0|gender=F"]["attacks"] == {}  # no non-member to rank against
    small = {r["cell"]: r for r in cell_membership_inference(members, nonmembers, scores, min_patients=2)}
    assert small["label=1|gender=F"]["attacks"] and "skipped" not in small["label=1|gender=F"]
    assert small["label=0|gender=F"] == {"cell": "label=0|gender=F", "groups": ["gender"], "n_members": 1,
                                         "n_nonmembers": 0, "attacks": {},
                                         "skipped": "fewer than 2 members or non-members"}
    # default cells: each group attribute alone
    assert {r["groups"][0] for r in small.values()} == {"gender", "age_group"}


def test_code_frequency_model_is_the_likelihood_attacks_reference(tiny):
    from halo_balance.privacy import code_frequency_log_likelihood

    syn = tiny_like([[[0, 3]], [[1, 4]], [[2]]])
    holdout = tiny_like([[[3]], [[2, 3]], [[2]]], prefix="h", synthetic=False, labels=[0, 1, 1])
    # visit frequencies of the members a, b, c (+0.5 / +1): code 3 is held by a alone, code 2 by b alone
    members = tiny.select(["a", "b", "c"])
    freq = code_frequency_log_likelihood(members)
    p = (np.array([2, 2, 1, 1, 2]) + 0.5) / 6
    end = 3.5 / 6  # three records end in 5 end slots
    visit = lambda codes: np.log(np.where(np.isin(np.arange(5), codes), p, 1 - p)).sum()  # noqa: E731
    assert freq(holdout) == pytest.approx([visit([3]) + np.log(end), visit([2, 3]) + np.log(end),
                                           visit([2]) + np.log(end)])
    # a generator that is this very model: its attacks and their reference coincide, overall and per cell
    rep = privacy_report(tiny, syn, holdout=holdout, log_likelihood=freq, members=members, min_cell_patients=1)
    lik = rep["membership_inference"]["likelihood"]
    assert lik["code_frequency"]["auroc"] == lik["auroc"] and lik["n_members"] == 3
    assert lik["code_frequency"]["per_event"]["auroc"] == lik["per_event"]["auroc"]
    by_cell = {c["cell"]: c for c in rep["membership_inference"]["cells"]}
    female_deaths = by_cell["label=1|gender=F"]  # d is not a member here: h1, h2 against no one
    assert female_deaths["attacks"] == {} and female_deaths["n_members"] == 0
    deaths = by_cell["label=1|age_group=65+"]  # b against h1, h2
    assert deaths["code_frequency"]["likelihood"] == deaths["attacks"]["likelihood"]
    # fitted on the members only: with d among them the reference moves (d holds code 3, as h0 and h1 do)
    again = privacy_report(tiny, syn, holdout=holdout, log_likelihood=freq)["membership_inference"]["likelihood"]
    assert again["code_frequency"]["auroc"] != again["auroc"]
    # the verdict names it beside the strongest likelihood attack
    from halo_balance.privacy import privacy_verdict

    strongest = {a["attack"]: a for a in privacy_verdict(rep)["attacks"]}["membership inference by likelihood"]
    assert strongest["code_frequency"] == lik["auroc"]


# ---------------------------------------------------------------------- majority guess and verdict
def test_majority_guess_is_the_training_data_majority():
    # training patients mostly F; the synthetic records mostly M
    victims = tiny_like([[[0]], [[0, 3]], [[1]]], prefix="v", synthetic=False, gender=["F", "F", "M"])
    attacker = tiny_like([[[0]], [[1]], [[1, 2]], [[1, 4]]], gender=["F", "M", "M", "M"])
    out = attribute_inference(victims, attacker, attributes=["gender"], k=1)
    g = out["attributes"]["gender"]
    assert g["majority_class"] == "F" and g["majority"]["accuracy"] == pytest.approx(2 / 3)
    train = tiny_like([[[1]]] * 5, prefix="t", synthetic=False, gender=["M"] * 5)
    assert attribute_inference(victims, attacker, attributes=["gender"], k=1, prior=train)[
        "attributes"]["gender"]["majority_class"] == "M"
    # advantage: the attacker's balanced accuracy (1.0) over the better baseline (majority: 0.5)
    assert g["attacker"]["balanced_accuracy"] == 1.0 and g["advantage"] == pytest.approx(0.5)


def _privacy(auroc=0.5, per_token=0.5, distance=0.5, advantage=0.0, rare=0, skipped=False, se=None):
    mia = {"distance": {"auroc": distance, "auroc_se": se},
           "likelihood": {"auroc": auroc, "auroc_se": se, "per_event": {"auroc": per_token, "auroc_se": se}}}
    if skipped:
        mia = {k: {"skipped": "needs held-out real patients"} for k in mia}
    attr = {"label": {"attacker": {"balanced_accuracy": 0.6 + advantage}, "advantage": advantage}}
    return {"membership_inference": mia, "attribute_inference": {"attributes": attr},
            "exact_copies": {"copies_of_rare_records": rare, "rare_k": 5}}


def test_verdict_grades_every_attack_and_names_the_worst():
    from halo_balance.privacy import privacy_verdict

    clean = privacy_verdict(_privacy(auroc=0.52, per_token=0.54, distance=0.49, advantage=0.01))
    assert clean["level"] == "no measurable leak" and clean["complete"]
    assert {a["attack"] for a in clean["attacks"]} == {
        "membership inference by distance", "membership inference by likelihood",
        "membership inference by likelihood per token", "attribute inference of label",
        "copies of training records held by fewer than 5 patients"}
    assert clean["text"].startswith("No measurable leak") and "not a guarantee" in clean["text"]
    leaky = privacy_verdict(_privacy(auroc=0.59, per_token=0.94, distance=0.57))
    assert leaky["level"] == "leaks" and leaky["worst"]["attack"] == "membership inference by likelihood per token"
    assert "AUROC 0.940" in leaky["text"] and "--dp-epsilon" in leaky["text"]
    some = privacy_verdict(_privacy(auroc=0.6, advantage=0.03))
    assert some["level"] == "some leakage" and some["worst"]["attack"] == "membership inference by likelihood"
    flipped = privacy_verdict(_privacy(distance=0.3))  # an attacker would flip a score below chance
    assert flipped["level"] == "leaks" and flipped["worst"]["attack"] == "membership inference by distance"
    attr = privacy_verdict(_privacy(advantage=0.08))
    assert attr["level"] == "leaks" and "attribute inference of label" in attr["text"] and "+0.05" in attr["text"]
    copies = privacy_verdict(_privacy(rare=2))
    assert copies["level"] == "leaks" and copies["text"].startswith("Leaks") and "2 copies" in copies["text"]
    partial = privacy_verdict(_privacy(skipped=True))
    assert not partial["complete"] and "Incomplete" in partial["text"]
    dp = privacy_verdict(_privacy(), dp={"epsilon": 7.99, "delta": 1e-5, "accountant": "rdp"})
    assert "differentially private (epsilon 7.99, delta 1.0e-05" in dp["text"]


def _cells(*aurocs, se=0.04):
    return [{"cell": f"label=1|race={i}", "groups": ["race"], "n_members": 100, "n_nonmembers": 100,
             "attacks": {"likelihood": {"auroc": a, "auroc_se": se}}} for i, a in enumerate(aurocs)]


def test_holm_step_down_by_hand():
    from halo_balance.privacy import holm_rejections

    # sorted: 0.005 <= 0.05/4, 0.01 <= 0.05/3, 0.03 > 0.05/2: the procedure stops there, keeping 0.04 too
    assert holm_rejections(np.array([0.01, 0.04, 0.03, 0.005]), 0.05).tolist() == [True, False, False, True]
    assert holm_rejections(np.array([0.001, 0.002]), 0.05).all()
    assert not holm_rejections(np.array([0.03, 0.04]), 0.05).any()  # Bonferroni's first step fails
    assert holm_rejections(np.array([]), 0.05).tolist() == []


def test_verdict_grades_each_cell_by_holms_procedure():
    from scipy.stats import norm

    from halo_balance.privacy import privacy_verdict

    def verdict(*aurocs, se=0.04):
        priv = _privacy(se=0.01)
        priv["membership_inference"]["cells"] = _cells(*aurocs, se=se)
        return privacy_verdict(priv)

    # six cell attacks: the strongest must pass norm.isf(0.05 / 12) = 2.64 standard errors
    leaky = verdict(0.75, 0.5, 0.5, 0.5, 0.5, 0.5)
    assert leaky["cell_attacks"] == {"cells": 6, "attacks": 6, "z": pytest.approx(norm.isf(0.05 / 12))}
    assert leaky["level"] == "leaks" and leaky["worst"]["cell"] == "label=1|race=0"
    assert "among label=1|race=0 patients (100 members, 100 non-members)" in leaky["text"]
    assert "Holm's procedure over the 6 cell attacks" in leaky["text"]
    # 0.62: 3.0 standard errors of 0.04 (counted: some leakage), 2.4 of 0.05 (within the bound: chance)
    assert verdict(0.62, 0.5, 0.5, 0.5, 0.5, 0.5)["level"] == "some leakage"
    assert verdict(0.62, 0.5, 0.5, 0.5, 0.5, 0.5, se=0.05)["level"] == "no measurable leak"
    # the same 0.62 over all records, two standard errors of 0.05 being the bound there, counts
    assert privacy_verdict(_privacy(auroc=0.62, se=0.05))["level"] == "some leakage"
    # 0.604 is 2.6 standard errors (p 0.0093): short of Bonferroni's 0.05 / 6, but Holm's second step
    # asks 0.05 / 5 once the 0.75 is ruled out
    second = {a["cell"]: a["level"] for a in verdict(0.75, 0.604, 0.5, 0.5, 0.5, 0.5)["attacks"] if a["cell"]}
    assert second["label=1|race=1"] == "some leakage"
    alone = {a["cell"]: a["level"] for a in verdict(0.5, 0.604, 0.5, 0.5, 0.5, 0.5)["attacks"] if a["cell"]}
    assert alone["label=1|race=1"] == "no measurable leak"
    # a cell's large standard error does not widen the chance band stated for the attacks over all records
    quiet = verdict(0.5, 0.55, se=0.2)
    assert quiet["level"] == "no measurable leak" and "cannot be told from chance" not in quiet["text"]
    assert all(a["cell"] is None for a in privacy_verdict(_privacy())["attacks"])


def test_privacy_report_feeds_the_verdict(tiny):
    from halo_balance.privacy import privacy_verdict

    syn = tiny_like([[[0, 3]], [[1, 4]], [[2]]])
    holdout = tiny_like([[[3]], [[2, 3]]], prefix="h", synthetic=False)
    rep = privacy_report(tiny, syn, holdout=holdout,
                         log_likelihood=lambda ds: np.where(ds.patients["patient_id"].str.starts_with("h"), -5.0, -1.0))
    assert rep["exact_copies"]["copies_of_rare_records"] == 2  # [0,3] and [1,4] are held by one patient each
    verdict = privacy_verdict(rep)
    assert verdict["level"] == "leaks"


def test_auroc_standard_error_and_chance_at_small_samples():
    from halo_balance.privacy import auroc_standard_error, privacy_verdict

    # under no signal, Hanley & McNeil's error is the Mann-Whitney one: sqrt((n1 + n2 + 1) / (12 n1 n2))
    assert auroc_standard_error(0.5, 100, 100) == pytest.approx(np.sqrt(201 / 120000))
    assert membership_auroc(np.arange(10.0), np.arange(10.0) - 0.5)["auroc_se"] > 0
    small = privacy_verdict(_privacy(per_token=0.59, se=0.05))  # 60 held-out patients or so
    assert small["level"] == "no measurable leak" and "cannot be told from chance" in small["text"]
    large = privacy_verdict(_privacy(per_token=0.59, se=0.015))  # 400 or so
    assert large["level"] == "some leakage" and "cannot be told" not in large["text"]
