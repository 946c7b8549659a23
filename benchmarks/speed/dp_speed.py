"""Cost of differentially private training: DP-SGD steps against ordinary steps on the same data.

``python -m benchmarks.speed.dp_speed --data PREPARED [--preset tiny] [--batch-size 128] [--epochs 5]``

Trains the same preset for the same number of epochs twice, without and with ``--dp-epsilon 8``
(validation and early stopping off, so both run every epoch), and prints wall and CPU seconds per
epoch and their ratio. A DP step computes every patient's own gradient (``halo_balance.dp``)
instead of one batch gradient, and calibrating the noise costs a few seconds once; run it under
one thread (``/work/bin/heavy``) for figures comparable with the other CPU benchmarks.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from halo_balance.data import PreparedDataset


def timed_training(data: PreparedDataset, out: Path, **options) -> dict[str, float]:
    from halo_balance.train import TRAINING_FILE, TrainOptions, train_model

    wall, cpu = time.perf_counter(), time.process_time()
    train_model(data, out_dir=out, progress=False, options=TrainOptions(device="cpu", val_fraction=0.0, **options))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    history = json.loads((out / TRAINING_FILE).read_text())["history"]
    epoch_seconds = sum(h["seconds"] for h in history) / len(history)
    return {"wall_s": wall, "cpu_s": cpu, "epoch_s": epoch_seconds, "epochs": len(history)}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.dp_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=5)
    args = p.parse_args(argv)
    data = PreparedDataset.load(args.data)
    common = dict(preset=args.preset, batch_size=args.batch_size, epochs=args.epochs, patience=args.epochs, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"plain": timed_training(data, Path(tmp) / "plain", **common),
               "dp": timed_training(data, Path(tmp) / "dp", dp_epsilon=8.0, **common)}
    print(f"{data.n_patients} patients, preset {args.preset}, batch {args.batch_size}, {args.epochs} epochs")
    for name, r in out.items():
        print(f"{name:>5}: {r['epoch_s']:.2f} s per epoch; whole run {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU")
    print(f"DP / plain per epoch: {out['dp']['epoch_s'] / out['plain']['epoch_s']:.2f}x")
    return out


if __name__ == "__main__":
    main()
