"""Speed of ``halo_balance.evaluate`` at the eICU-demo scale, and its pair counting against plain loops.

``python -m benchmarks.speed.evaluate_speed [--real 1800] [--synthetic 2000] [--holdout 700] [--vocab 1300]``

Draws seeded cohorts with Zipf-like token frequencies and per-patient topics (so that pairs and
consecutive pairs carry structure), then times: HALO's statistics by sparse products
(:func:`halo_balance.fidelity.code_statistics`) against counting every pair in Python dictionaries
(the way the original HALO evaluation does it; both must agree exactly), and the whole evaluation
(imports warmed up first; best of ``--repeat`` calls).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import time
from collections import Counter

import numpy as np
import polars as pl

from halo_balance.data import PreparedDataset, empty_meta

GROUPS = {"gender": ["F", "M"], "age_group": ["<18", "18-74", "75+"]}


def draw_cohort(n: int, *, vocab_size: int = 1300, seed: int = 0, prefix: str = "p",
                synthetic: bool = False) -> PreparedDataset:
    """``n`` patients of 1-6 visits, 1-40 tokens per visit, Zipf-like token use around a topic."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    base /= base.sum()
    visits, labels, gender, age = [], [], [], []
    for _ in range(n):
        topic = rng.choice(vocab_size, size=20, replace=False, p=base)
        n_visits = int(min(6, rng.geometric(0.55)))
        record = []
        for _ in range(n_visits):
            size = int(min(40, rng.poisson(12) + 1))
            from_topic = rng.random(size) < 0.5
            tokens = np.where(from_topic, rng.choice(topic, size=size), rng.choice(vocab_size, size=size, p=base))
            record.append(tokens.tolist())
        visits.append(record)
        labels.append(int(rng.random() < 0.1))
        gender.append(GROUPS["gender"][int(rng.random() < 0.45)])
        age.append(GROUPS["age_group"][int(rng.choice(3, p=[0.05, 0.7, 0.25]))])
    vocab = pl.DataFrame({"id": pl.Series(range(vocab_size), dtype=pl.Int32),
                          "token": [f"dx:{i}" for i in range(vocab_size)],
                          "kind": ["diagnosis"] * vocab_size, "description": [""] * vocab_size})
    return PreparedDataset.from_records(
        patient_ids=[f"{prefix}{i}" for i in range(n)], labels=labels, groups={"gender": gender, "age_group": age},
        visits=visits, vocab=vocab, meta=empty_meta(source="benchmark draw", groups=GROUPS), synthetic=synthetic)


def loop_statistics(dataset: PreparedDataset) -> dict[str, dict[int, float]]:
    """HALO's six statistics counted pair by pair in dictionaries (keys as in ``halo_balance.fidelity``)."""
    V, rec = dataset.vocab_size, dataset.records()
    counts = {name: Counter() for name in ("uv", "ur", "pv", "pr", "cv", "cr")}
    n_visits = n_trans = 0
    for p in range(len(rec)):
        visits = rec.patient(p)
        seen = {"ur": set(), "pr": set(), "cr": set()}
        for t, v in enumerate(visits):
            n_visits += 1
            counts["uv"].update(v)
            seen["ur"].update(v)
            pairs = [a * V + b for a, b in itertools.combinations(v, 2)]
            counts["pv"].update(pairs)
            seen["pr"].update(pairs)
            if t:
                n_trans += 1
                seq = [a * V + b for a in visits[t - 1] for b in v]
                counts["cv"].update(seq)
                seen["cr"].update(seq)
        for name, keys in seen.items():
            counts[name].update(keys)
    totals = {"uv": n_visits, "ur": len(rec), "pv": n_visits, "pr": len(rec), "cv": n_trans, "cr": len(rec)}
    names = {"uv": "unigram_per_visit", "ur": "unigram_per_record", "pv": "pair_per_visit",
             "pr": "pair_per_record", "cv": "consecutive_per_visit", "cr": "consecutive_per_record"}
    return {names[k]: {key: c / totals[k] for key, c in counts[k].items()} for k in counts}


def main() -> None:
    from halo_balance.evaluate import evaluate
    from halo_balance.fidelity import code_statistics

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=int, default=1800)
    ap.add_argument("--synthetic", type=int, default=2000)
    ap.add_argument("--holdout", type=int, default=700)
    ap.add_argument("--vocab", type=int, default=1300)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per figure; the shortest is printed")
    args = ap.parse_args()
    real = draw_cohort(args.real, vocab_size=args.vocab, seed=1)
    holdout = draw_cohort(args.holdout, vocab_size=args.vocab, seed=2, prefix="h")
    synthetic = draw_cohort(args.synthetic, vocab_size=args.vocab, seed=3, prefix="s", synthetic=True)
    print(f"real {real.n_patients} patients / {real.n_visits} visits, synthetic {synthetic.n_patients} / "
          f"{synthetic.n_visits}, holdout {holdout.n_patients}, V = {real.vocab_size}")

    evaluate(real.select(real.patients["patient_id"][:50]), synthetic.select(synthetic.patients["patient_id"][:50]))
    t_sparse, fast = best_of(args.repeat, code_statistics, real)
    t_loops, slow = best_of(args.repeat, loop_statistics, real)
    for name, probs in fast.probabilities.items():
        expected = np.array([slow[name][k] for k in probs.keys.tolist()])
        assert len(probs) == len(slow[name]) and np.allclose(probs.values, expected), name
    print(f"statistics of the real data: sparse products {t_sparse:.3f} s, dictionary loops {t_loops:.3f} s "
          f"(x{t_loops / t_sparse:.1f}); identical values, "
          f"{len(fast.probabilities['pair_per_visit'])} within-visit pairs, "
          f"{len(fast.probabilities['consecutive_per_visit'])} consecutive pairs")

    def fake_log_likelihood(ds: PreparedDataset) -> np.ndarray:
        return -np.diff(ds.records().code_ptr)[: ds.n_patients].astype(float)

    for label, kwargs in (("with --holdout", {"holdout": holdout}), ("without --holdout (halves)", {}),
                          ("with --holdout and a likelihood", {"holdout": holdout,
                                                               "log_likelihood": fake_log_likelihood})):
        elapsed, report = best_of(args.repeat, evaluate, real, synthetic, **kwargs)
        uni = report["fidelity"]["statistics"]["unigram_per_visit"]
        print(f"evaluate {label}: {elapsed:.2f} s (unigram R^2 {uni['r2']:.3f}, real reference {uni['reference_r2']:.3f})")
    print(f"peak memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def best_of(repeat: int, fn, *args, **kwargs):
    """Shortest wall time of ``repeat`` calls (the CPU is shared) and the last result."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return min(times), out


if __name__ == "__main__":
    main()
