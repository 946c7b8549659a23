"""CPU cost of ``adversarial_debiasing`` per fold, beside the downstream ``mlp`` it replaces.

``python -m benchmarks.speed.adversarial_cost --data PREPARED [--attribute age_group] [--folds 5]
[--stratify gender age_group] [--seed 0]``

For every fold of the harness's split (same ``--folds``, ``--stratify`` and ``--seed`` as
``benchmarks.kfold``), fits :class:`benchmarks.adversarial.AdversarialDebiasing` on the fold's
training visits (alpha selection included) and scikit-learn's ``mlp`` on the same rows, and prints
the CPU seconds of each (process time, so a busy machine does not inflate it; run it with one
thread, e.g. through ``/work/bin/heavy`` or ``OMP_NUM_THREADS=1``), the chosen alpha and the test
AUROC of both. A network with alpha 0 (no adversary) is fitted too: its AUROC should match the
``mlp``'s, the check that the predictor alone is the same model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks import downstream
from benchmarks.adversarial import AdversarialDebiasing
from benchmarks.methods import training_rows
from halo_balance.data import PreparedDataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.adversarial_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--attribute", nargs="+", default=["age_group"])
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--stratify", nargs="+", default=["gender", "age_group"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ds = PreparedDataset.load(a.data)
    print(f"torch threads {torch.get_num_threads()}; attribute {' & '.join(a.attribute)}")
    print("fold | train rows | adversarial CPU s | alpha | AUROC | alpha-0 AUROC | mlp CPU s | mlp AUROC")
    totals = np.zeros(2)
    for k, (train_ids, test_ids) in enumerate(ds.kfold(a.folds, groups=a.stratify, seed=a.seed)):
        rows, test = training_rows(ds.select(train_ids), a.attribute), training_rows(ds.select(test_ids), a.attribute)
        seed = a.seed + k
        t0 = time.process_time()
        est = AdversarialDebiasing(random_state=seed).fit(rows.X, rows.y, rows.group, patients=rows.source)
        t1 = time.process_time()
        mlp = downstream.fit("mlp", rows.X, rows.y, random_state=seed)
        t2 = time.process_time()
        plain = AdversarialDebiasing(alphas=(0.0,), random_state=seed).fit(rows.X, rows.y, rows.group)
        totals += (t1 - t0, t2 - t1)
        print(f"{k} | {len(rows)} | {t1 - t0:.1f} | {est.alpha_:g} | {roc_auc_score(test.y, est.score(test.X)):.3f} | "
              f"{roc_auc_score(test.y, plain.score(test.X)):.3f} | {t2 - t1:.1f} | "
              f"{roc_auc_score(test.y, downstream.score(mlp, test.X)):.3f}")
    print(f"total CPU s: adversarial {totals[0]:.1f}, mlp {totals[1]:.1f} (ratio {totals[0] / totals[1]:.1f})")


if __name__ == "__main__":
    main()
