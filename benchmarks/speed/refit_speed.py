"""The cost of the bias refit alone, with cell terms and with cell and pair terms, side by side on
one trained model.

``python -m benchmarks.speed.refit_speed --model MODEL_DIR --data PREPARED [--repeats 2]``

Runs ``halo_balance.train.refit_output_biases`` on the model's training patients (its validation
patients left out) three ways, each from a fresh copy of the model, alternating ``--repeats``
times: the code, end and empty-visit biases alone; with cell terms (``--cell-min-patients``,
default as in training); with cell and pair terms (``--pair-min-patients`` and ``--pair-max-fdr``,
the training defaults: the candidates counted, scored and selected, then fitted), each with the
arguments training passes (``halo_balance.train.term_arguments``). Printed: CPU
seconds of each, the ratios to the biases alone, and the number of terms fitted. The model's own
terms, if any, are removed first.
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
from halo_balance.train import TrainOptions


def main(argv: list[str] | None = None) -> None:
    d = TrainOptions()
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.refit_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained model folder (with its training.json)")
    p.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    p.add_argument("--cell-min-patients", type=int, default=d.cell_min_patients)
    p.add_argument("--pair-min-patients", type=int, default=d.pair_min_patients)
    p.add_argument("--pair-max-fdr", type=float, default=d.pair_max_fdr)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from halo_balance.data import PreparedDataset
    from halo_balance.model import HaloModel
    from halo_balance.train import EncodedRecords, refit_output_biases, term_arguments

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
    ways = {"biases alone": TrainOptions(cell_min_patients=0, pair_min_patients=0),
            "+ cell terms": TrainOptions(cell_min_patients=a.cell_min_patients, pair_min_patients=0),
            "+ cell and pair terms": TrainOptions(cell_min_patients=a.cell_min_patients,
                                                  pair_min_patients=a.pair_min_patients, pair_max_fdr=a.pair_max_fdr)}
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(a.repeats):
        for way, options in ways.items():
            model = copy.deepcopy(base)
            t0 = time.process_time()  # counting the candidate pairs is part of what training pays
            out = refit_output_biases(model, enc, rows, batch_size=256, device=torch.device("cpu"),
                                      **term_arguments(options, model, enc, rows))
            seconds[way].append(time.process_time() - t0)
            print(f"{way:<22} {seconds[way][-1]:6.1f} CPU s, {out.get('cell_terms') or 0} cell terms, "
                  f"{out.get('pairs') or 0} pair terms of {out.get('pair_candidates') or 0} candidates")
    best = {way: min(s) for way, s in seconds.items()}
    alone = best["biases alone"]
    print(f"fastest of {a.repeats}: " + ", ".join(f"{way} {s:.1f} s ({s / alone:.2f}x)" for way, s in best.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
