"""Sampling throughput: the cached, per-record-pointer sampler against the plain reference sampler.

``python -m benchmarks.speed.sample_speed [--model MODEL_DIR | --patients N --train-epochs E] [--records-1 50]
[--records-256 512]``

On one trained model and in one run, both samplers of ``halo_balance.sample`` draw records for
the same conditions (drawn from the training cell frequencies) at batch size 1 and 256:
``sample_records`` (KV cache, finished records leave the batch, every record its own pointer,
inverse-CDF draws) and ``reference_sample_records`` (the whole prefix re-run for every visit,
one pointer shared by the batch, Bernoulli draws, finished records computed to the end).
Printed: records/s of each, the ratio, and the records' mean visits and codes (same distribution).
Without ``--model`` a cohort is simulated and prepared (``data_prep``), and a ``small`` model is
trained on it for ``--train-epochs`` epochs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.speed.train_speed import simulated_cohort
import halo_balance  # noqa: F401  (sets passive OpenMP waiting before torch is imported)


def _timed(fn, model, conditions, batch_size: int, seed: int, device: str):
    t0 = time.perf_counter()
    data = fn(model, conditions, batch_size=batch_size, seed=seed, device=device, progress=False)
    return data, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.sample_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="trained model folder (default: train one on a simulated cohort)")
    p.add_argument("--patients", type=int, default=2000)
    p.add_argument("--train-epochs", type=int, default=4)
    p.add_argument("--records-1", type=int, default=50, help="records drawn at batch size 1")
    p.add_argument("--records-256", type=int, default=512, help="records drawn at batch size 256")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import torch

    from halo_balance.data import PreparedDataset
    from halo_balance.model import HaloModel
    from halo_balance.sample import reference_sample_records, sample_records
    from halo_balance.train import TrainOptions, train_model

    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="sample_speed-") as tmp:
        if a.model:
            model = HaloModel.from_pretrained(a.model)
            source = a.model
        else:
            data = PreparedDataset.load(simulated_cohort(Path(tmp), patients=a.patients, seed=a.seed))
            model = train_model(data, out_dir=Path(tmp) / "model", progress=False, options=TrainOptions(
                preset="small", epochs=a.train_epochs, device=a.device, seed=a.seed))
            source = f"small preset, {a.train_epochs} epochs on {data.n_patients} simulated patients"
    cfg = model.config
    print(f"model: {source}; V = {cfg.vocab_size}, n_ctx = {cfg.n_ctx}, d = {cfg.n_embd}, {cfg.n_layer} layers, "
          f"fine H = {cfg.fine_hidden}; device {a.device}, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'sampler':>10} {'records':>8} {'seconds':>8} {'records/s':>10} {'visits/rec':>11} "
          f"{'codes/visit':>12}")
    for batch, n in ((1, a.records_1), (256, a.records_256)):
        conditions = model.layout.complete({}, n, seed=a.seed)
        rates = {}
        for name, fn in (("reference", reference_sample_records), ("ours", sample_records)):
            data, seconds = _timed(fn, model, conditions, batch, a.seed, a.device)
            rec = data.records()
            rates[name] = n / seconds
            print(f"{batch:>5} {name:>10} {n:>8} {seconds:>8.2f} {n / seconds:>10.2f} "
                  f"{rec.visit_counts().mean():>11.2f} {np.diff(rec.code_ptr).mean():>12.1f}")
        print(f"{batch:>5} {'ratio':>10} {'':>8} {'':>8} {rates['ours'] / rates['reference']:>9.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
