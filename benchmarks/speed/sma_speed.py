"""Cost of SMA's sequential CART synthesis (``benchmarks.generative.sma``): full against restricted
predictor sets, serial against parallel tree fits.

``python -m benchmarks.speed.sma_speed --data PREPARED [--groups gender] [--max-predictors none,50]
[--jobs 1,2]`` or, on a drawn cohort of any size, ``--draw 20000 --vocab 2000``.

Fits :class:`SequentialCART` on every visit row of the data (cells: visit label x ``--groups``),
then synthesizes one copy of the rows, once per (predictor limit, ``n_jobs``) setting; prints
the fit and synthesis seconds (wall; and CPU of this process, which leaves out joblib's worker
processes when ``n_jobs > 1``), the trees' mean leaves and depth, and the per-visit unigram and
pair R^2 of the copy against the rows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np

from halo_balance.data import PreparedDataset
from halo_balance.fidelity import union_r2, visit_statistics

from ..generative.sma import SequentialCART
from ..cells import codes
from ..methods import training_rows


def _limits(text: str) -> list[int | None]:
    return [None if x.strip().lower() == "none" else int(x) for x in text.split(",")]


def run(ds: PreparedDataset, *, groups: Sequence[str], limits: Sequence[int | None], jobs: Sequence[int],
        seed: int = 0) -> list[dict]:
    rows = training_rows(ds, groups)
    _, cells = codes(rows.cells())
    real = visit_statistics(rows.X)
    print(f"{rows.X.shape[0]} visit rows, {rows.X.shape[1]} codes "
          f"({int((np.asarray(rows.X.sum(0)).ravel() > 0).sum())} present), {cells.max() + 1} cells")
    print("| max predictors | n_jobs | fit wall s | fit CPU s | synthesize s | mean leaves | mean depth "
          "| unigram R^2 | pair R^2 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out = []
    for limit in limits:
        for n_jobs in jobs:
            t0, c0 = time.perf_counter(), time.process_time()
            gen = SequentialCART(max_predictors=limit, n_jobs=n_jobs, random_state=seed).fit(rows.X, cells)
            t1, c1 = time.perf_counter(), time.process_time()
            copy = gen.synthesize(cells)
            t2 = time.perf_counter()
            syn = visit_statistics(copy)
            row = {"max_predictors": limit, "n_jobs": n_jobs, "fit_wall": t1 - t0, "fit_cpu": c1 - c0,
                   "synthesize": t2 - t1, "leaves": float(np.mean([t.get_n_leaves() for t in gen.trees_])),
                   "depth": float(np.mean([t.get_depth() for t in gen.trees_])),
                   "unigram_r2": union_r2(real["unigram_per_visit"], syn["unigram_per_visit"]),
                   "pair_r2": union_r2(real["pair_per_visit"], syn["pair_per_visit"])}
            out.append(row)
            print(f"| {'all' if limit is None else limit} | {n_jobs} | {row['fit_wall']:.1f} | {row['fit_cpu']:.1f} "
                  f"| {row['synthesize']:.1f} | {row['leaves']:.1f} | {row['depth']:.1f} | {row['unigram_r2']:.3f} "
                  f"| {row['pair_r2']:.3f} |", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.sma_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="prepared dataset folder")
    p.add_argument("--draw", type=int, default=None, metavar="PATIENTS",
                   help="draw a cohort of this many patients instead (benchmarks.speed.evaluate_speed.draw_cohort)")
    p.add_argument("--vocab", type=int, default=1300, help="vocabulary of the drawn cohort")
    p.add_argument("--groups", nargs="+", default=["gender"])
    p.add_argument("--max-predictors", type=_limits, default=[None, 50], help="comma-separated; none = all")
    p.add_argument("--jobs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if (a.data is None) == (a.draw is None):
        p.error("give one of --data and --draw")
    if a.data is not None:
        ds = PreparedDataset.load(a.data)
    else:
        from .evaluate_speed import draw_cohort
        ds = draw_cohort(a.draw, vocab_size=a.vocab, seed=a.seed)
    run(ds, groups=a.groups, limits=a.max_predictors, jobs=a.jobs, seed=a.seed)


if __name__ == "__main__":
    from halo_balance.cli import run as cli_run

    cli_run(main)
