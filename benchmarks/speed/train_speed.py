"""Training throughput: this package's HALO model against the original HALO training step.

``python -m benchmarks.speed.train_speed [--data PREPARED | --patients N] [--preset small] [--epochs 3]``

Both models train side by side in one run, on the same prepared data, with the same transformer
(width, depth, heads, context) and batch size, each in its own process (so that peak memory is its
own): the reference (``benchmarks/speed/halo_reference.py``: dense multi-hot input, dense masked fine
MLP of width d + V', sigmoid + BCE on probabilities, every batch padded to the full context) and
``halo_balance.model.HaloModel`` (embedding-bag input, the O(V x H) fine module, length-bucketed
batches). A step is batch construction + forward + backward + AdamW update. Printed: patients/s
per epoch for both and their ratio, parameter counts, peak memory (resident set growth on CPU,
``max_memory_allocated`` on CUDA); then parameter counts at V = 6,869 and V = 55,000 with the
published HALO size (d = 768, 12 layers), and one training step of a V = 55,000 model.

Without ``--data`` the cohort is simulated (``data_prep.simulate``) and prepared
(``data_prep.mimic_iv`` with 67 lab items in 25 bins, V ~ 2,000) into a temporary folder.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import halo_balance  # noqa: F401  (sets passive OpenMP waiting before torch is imported)


class PeakMemory:
    """Peak growth of this process's memory while the ``with`` block runs.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the resident set size, sampled every
    5 ms by a thread, minus its size on entry (the process's lifetime peak, ``ru_maxrss``, would
    hide a phase that stays below an earlier one).
    """

    def __init__(self, device) -> None:
        self.device, self.mb = device, 0.0

    def __enter__(self) -> PeakMemory:
        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        proc, self._stop = psutil.Process(), threading.Event()
        self._start = self._peak = proc.memory_info().rss

        def watch() -> None:
            while not self._stop.wait(0.005):
                self._peak = max(self._peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.mb = (self._peak - self._start) / 2**20


def _setup(device_name: str, threads: int | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    from halo_balance.train import resolve_device

    return resolve_device(device_name)


def _ours_config(ds, preset: str, n_ctx: int):
    from halo_balance.config import ConditionLayout, HaloConfig

    layout = ConditionLayout.from_dataset(ds)
    return HaloConfig.from_preset(preset, vocab_size=ds.vocab_size, n_conditions=layout.n_slots, n_ctx=n_ctx,
                                  dropout=0.0)


def run_ours(data: str, preset: str, epochs: int, batch_size: int, device_name: str, threads: int | None,
             seed: int) -> dict:
    import torch

    from halo_balance.data import PreparedDataset
    from halo_balance.model import HaloModel
    from halo_balance.train import EncodedRecords, bucket_batches, collate

    device = _setup(device_name, threads)
    ds = PreparedDataset.load(data)
    n_ctx = int(ds.records().visit_counts().max()) + 1
    torch.manual_seed(seed)
    rates = []
    with PeakMemory(device) as peak:
        model = HaloModel.for_dataset(ds, _ours_config(ds, preset, n_ctx)).to(device)
        enc = EncodedRecords.from_dataset(ds, model.layout, n_ctx)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for rows in bucket_batches(enc.lengths, batch_size, np.random.default_rng([seed, epoch])):
                out = model(collate(enc, rows).to(device))
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(len(enc) / (time.perf_counter() - t0))
    return {"patients_per_s": rates, "parameters": model.num_parameters(), "peak_mb": peak.mb,
            "config": model.config.to_dict(), "final_loss": float(out.loss.detach())}


def run_reference(data: str, preset: str, epochs: int, batch_size: int, device_name: str, threads: int | None,
                  seed: int) -> dict:
    import torch

    from benchmarks.speed.halo_reference import ReferenceConfig, ReferenceHALO, dense_batch
    from halo_balance.config import ConditionLayout
    from halo_balance.data import PreparedDataset

    device = _setup(device_name, threads)
    ds = PreparedDataset.load(data)
    rec = ds.records()
    records = [rec.patient(p) for p in range(len(rec))]
    layout = ConditionLayout.from_dataset(ds)
    slots = layout.encode(ds.patients)
    labels = np.zeros((len(rec), layout.n_slots), dtype=np.float32)
    np.put_along_axis(labels, slots, 1.0, axis=1)
    ours = _ours_config(ds, preset, int(rec.visit_counts().max()) + 1)
    # start + label visit + the longest record: the original's context for the same records
    cfg = ReferenceConfig(code_vocab_size=ds.vocab_size, label_vocab_size=layout.n_slots,
                          n_ctx=int(rec.visit_counts().max()) + 2, n_embd=ours.n_embd, n_layer=ours.n_layer,
                          n_head=ours.n_head)
    torch.manual_seed(seed)
    rates = []
    with PeakMemory(device) as peak:
        model = ReferenceHALO(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for epoch in range(epochs):
            order = np.random.default_rng([seed, epoch]).permutation(len(records))
            t0 = time.perf_counter()
            for i in range(0, len(order), batch_size):
                rows = order[i:i + batch_size]
                ehr, mask = dense_batch(cfg, [records[r] for r in rows], labels[rows])
                loss = model(torch.from_numpy(ehr).to(device), torch.from_numpy(mask).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(len(records) / (time.perf_counter() - t0))
    return {"patients_per_s": rates, "parameters": sum(p.numel() for p in model.parameters()),
            "peak_mb": peak.mb, "n_ctx": cfg.n_ctx, "total_vocab": cfg.total_vocab_size,
            "final_loss": float(loss.detach())}


def run_large_step(vocab_size: int, batch: int, codes_per_visit: int, device_name: str, threads: int | None,
                   seed: int) -> dict:
    """One training step of a base-size model with a large vocabulary, on random records."""
    import torch

    from halo_balance.config import ConditionLayout, HaloConfig
    from halo_balance.model import HaloModel
    from halo_balance.train import EncodedRecords, collate

    device = _setup(device_name, threads)
    layout = ConditionLayout(groups={"gender": ["F", "M"], "age_group": ["18-44", "45-64", "65-79", "80+"]})
    cfg = HaloConfig.from_preset("base", vocab_size=vocab_size, n_conditions=layout.n_slots, dropout=0.0)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 4, size=batch)
    n_vis = int(lengths.sum())
    k = rng.integers(codes_per_visit // 2, codes_per_visit * 3 // 2, size=n_vis)
    codes = np.concatenate([np.sort(rng.choice(vocab_size, size=n, replace=False)) for n in k]).astype(np.int32)
    cond = np.stack([rng.integers(0, 2, batch), 2 + rng.integers(0, 2, batch), 4 + rng.integers(0, 4, batch)], 1)
    enc = EncodedRecords(cond=cond, first_visit=np.cumsum(lengths) - lengths, lengths=lengths,
                         code_ptr=np.concatenate([[0], np.cumsum(k)]), codes=codes, n_ctx=cfg.n_ctx, n_truncated=0)
    torch.manual_seed(seed)
    with PeakMemory(device) as peak:
        model = HaloModel(cfg, layout).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        out = model(collate(enc, np.arange(batch)).to(device))
        out.loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "parameters": model.num_parameters(), "peak_mb": peak.mb,
            "loss": float(out.loss.detach()), "visits": n_vis, "codes": int(k.sum())}


def _in_process(fn, *args) -> dict:
    """Run ``fn`` in a fresh process (its own peak memory) and return its result."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def simulated_cohort(out: Path, *, patients: int, seed: int, **prepare_options) -> Path:
    """Simulate ``patients`` in the MIMIC-IV layout and prepare them into ``out/prepared``."""
    from data_prep.mimic_iv import prepare_mimic_iv
    from data_prep.simulate import simulate

    simulate(out / "raw", patients=patients, seed=seed, progress=False)
    prepare_mimic_iv(out / "raw", out / "prepared", progress=False, **prepare_options)
    return out / "prepared"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.train_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="prepared dataset (default: simulate --patients and prepare)")
    p.add_argument("--patients", type=int, default=3000)
    p.add_argument("--preset", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--large-vocab", type=int, default=55000, help="vocabulary of the one-step test (0: skip)")
    p.add_argument("--large-batch", type=int, default=8)
    a = p.parse_args(argv)

    from benchmarks.speed.halo_reference import ReferenceConfig, parameter_count
    from halo_balance.config import HaloConfig
    from halo_balance.data import PreparedDataset

    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        data = Path(a.data) if a.data else simulated_cohort(Path(tmp), patients=a.patients, seed=a.seed,
                                                            n_lab_items=67, n_bins=25)
        ds = PreparedDataset.load(data)
        rec = ds.records()
        print(f"data: {data if a.data else f'simulated, {a.patients} patients'}: {ds.n_patients} patients, "
              f"{ds.n_visits} visits ({ds.n_visits / ds.n_patients:.2f} per patient, max {rec.visit_counts().max()}), "
              f"V = {ds.vocab_size}, {np.diff(rec.code_ptr).mean():.1f} codes per visit")
        args = (str(data), a.preset, a.epochs, a.batch_size, a.device, a.threads, a.seed)
        ref = _in_process(run_reference, *args)
        ours = _in_process(run_ours, *args)
    c = ours["config"]
    print(f"transformer: d = {c['n_embd']}, {c['n_layer']} layers, {c['n_head']} heads; batch {a.batch_size}; "
          f"device {a.device}; reference context {ref['n_ctx']} (padded), V' = {ref['total_vocab']}")
    print(f"{'epoch':>5} {'reference p/s':>14} {'ours p/s':>10} {'ratio':>7}")
    for e, (r, o) in enumerate(zip(ref["patients_per_s"], ours["patients_per_s"]), start=1):
        print(f"{e:>5} {r:>14.1f} {o:>10.1f} {o / r:>6.1f}x")
    mean_r, mean_o = np.mean(ref["patients_per_s"]), np.mean(ours["patients_per_s"])
    print(f"{'mean':>5} {mean_r:>14.1f} {mean_o:>10.1f} {mean_o / mean_r:>6.1f}x")
    print(f"parameters: reference {ref['parameters']:,}, ours {ours['parameters']:,} "
          f"(fine module {HaloConfig.from_dict(c).n_fine_parameters:,})")
    print(f"peak memory growth (model, optimizer, training): reference {ref['peak_mb']:,.0f} MB, ours {ours['peak_mb']:,.0f} MB")

    for V in (6869, 55000):
        ref_cfg = ReferenceConfig(code_vocab_size=V, label_vocab_size=c["n_conditions"], n_ctx=48, n_embd=768,
                                  n_layer=12, n_head=12)
        ours_cfg = HaloConfig.from_preset("base", vocab_size=V, n_conditions=c["n_conditions"])
        n_ours, n_ref = _our_parameter_count(ours_cfg), parameter_count(ref_cfg)
        print(f"V = {V:,}, d = 768, 12 layers, n_ctx 48: reference {n_ref:,} parameters "
              f"({n_ref * 4 / 2**30:.1f} GiB fp32 weights; x4 with gradients and Adam), ours {n_ours:,} "
              f"(fine H = {ours_cfg.fine_hidden}: {ours_cfg.n_fine_parameters:,})")
    if a.large_vocab:
        big = _in_process(run_large_step, a.large_vocab, a.large_batch, 50, a.device, a.threads, a.seed)
        print(f"one training step at V = {a.large_vocab:,} (base preset, {big['parameters']:,} parameters, batch "
              f"{a.large_batch} patients / {big['visits']} visits / {big['codes']} codes): {big['seconds']:.1f} s, "
              f"peak memory growth {big['peak_mb']:,.0f} MB, loss {big['loss']:.1f}")


def _our_parameter_count(cfg) -> int:
    """Parameters of a HaloModel of this config, built on the meta device (no memory)."""
    import torch

    from halo_balance.config import ConditionLayout
    from halo_balance.model import HaloModel

    layout = ConditionLayout(groups={"slot": [f"c{i}" for i in range(cfg.n_conditions - 2)]})
    with torch.device("meta"):
        return sum(p.numel() for p in HaloModel(cfg, layout).parameters())


if __name__ == "__main__":
    main(sys.argv[1:])
