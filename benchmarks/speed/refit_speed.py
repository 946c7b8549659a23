"""The cost of the bias refit with and without cell terms, side by side on one trained model.

``python -m benchmarks.speed.refit_speed --model MODEL_DIR --data PREPARED [--repeats 2]``

Runs ``halo_balance.train.refit_output_biases`` on the model's training patients (its validation
patients left out), once with ``cell_min_patients`` 0 (the code, end and empty-visit biases alone)
and once with 25 (the default: cell terms chosen and fitted with the biases), each from a fresh
copy of the model, alternating ``--repeats`` times. Printed: CPU seconds of each, the ratio, and
the number of terms fitted. The model's own terms, if any, are removed first.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

import halo_balance  # noqa: F401  (sets passive OpenMP waiting before torch is imported)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.refit_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained model folder (with its training.json)")
    p.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    p.add_argument("--cell-min-patients", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from halo_balance.data import PreparedDataset
    from halo_balance.model import HaloModel
    from halo_balance.train import EncodedRecords, refit_output_biases

    torch.set_num_threads(a.threads)
    base = HaloModel.from_pretrained(a.model)
    base.set_cell_terms(torch.zeros(0, 2, dtype=torch.long))
    base.set_pairs(torch.zeros(0, 2, dtype=torch.long))
    data = PreparedDataset.load(a.data)
    held_out = set(json.loads((Path(a.model) / "training.json").read_text())["validation_patient_ids"])
    rows = np.flatnonzero(~data.patients["patient_id"].cast(str).is_in(list(held_out)).to_numpy())
    enc = EncodedRecords.from_dataset(data, base.layout, base.config.n_ctx)
    print(f"model {a.model}: V = {base.config.vocab_size}, {len(rows):,} training patients, "
          f"{int(enc.lengths[rows].sum()):,} visits; {torch.get_num_threads()} thread(s)")
    seconds: dict[int, list[float]] = {0: [], a.cell_min_patients: []}
    for _ in range(a.repeats):
        for n in seconds:
            model = copy.deepcopy(base)
            t0 = time.process_time()
            out = refit_output_biases(model, enc, rows, batch_size=256, device=torch.device("cpu"),
                                      cell_min_patients=n, max_cell_terms=model.config.vocab_size)
            seconds[n].append(time.process_time() - t0)
            print(f"cell_min_patients {n:>3}: {seconds[n][-1]:6.1f} CPU s, {out.get('cell_terms') or 0} cell terms")
    best = {n: min(s) for n, s in seconds.items()}
    print(f"fastest of {a.repeats}: {best[0]:.1f} s without cell terms, {best[a.cell_min_patients]:.1f} s with "
          f"({best[a.cell_min_patients] / best[0]:.2f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
