"""The k-fold grid on the local backend and on a local Ray cluster: wall time, overhead per task, identity.

``python -m benchmarks.speed.ray_grid --data PREPARED --groups ATTR ... --out DIR [--stratify ATTR ...]
[--folds 5] [--seed 0] [--methods original,upsample,downsample,smote,fairplay] [--models logreg,rf,xgboost]
[--train-options JSON] [--jobs 2] [--node-cpus 1 1]``

In one process, side by side: the grid of ``benchmarks.kfold`` with ``--backend local --jobs J``
into ``DIR/local``, then the same grid with ``--backend ray`` on a Ray cluster started here
(``halo_balance.distributed.local_cluster``: a head and worker node processes with
``--node-cpus`` CPUs each, loopback only, stopped at the end) into ``DIR/ray``. Each run trains
its own FairPlay generators. Printed: the wall time of each; the busy seconds of its jobs
(downstream fits, method rows, generators and balancing, from ``units.parquet``); the overhead per
task, (CPUs x wall - busy) / tasks, i.e. the CPU time a task slot spent on anything but its job
(scheduling, process start-up, data loading, idle slots at the end); the round trip of an empty
Ray task on the cluster; and whether ``metrics.parquet``, ``predictions.parquet`` and
``summary.parquet`` of the two runs are identical. Give both runs the same cores (``/work/bin/heavy --cores 2``); the per-unit
costs it prints are the input of the full-size estimate in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import polars as pl

import halo_balance  # noqa: F401  (sets passive OpenMP waiting before torch is imported)
from halo_balance.cli import json_object


def _grid(backend: str, a: argparse.Namespace, out: Path, **extra) -> tuple[float, pl.DataFrame]:
    from benchmarks.kfold import run_kfold
    from benchmarks.methods import FairPlaySettings

    t0 = time.perf_counter()
    run_kfold(data=a.data, groups=a.groups, stratify=a.stratify, out=out, folds=a.folds, seed=a.seed,
              methods=a.methods.split(","), models=a.models.split(","), jobs=a.jobs, backend=backend,
              fairplay=FairPlaySettings(device="cpu", train_options=a.train_options),
              overwrite=True, progress=False, **extra)
    return time.perf_counter() - t0, pl.read_parquet(out / "units.parquet")


def _busy(units: pl.DataFrame) -> dict[str, float]:
    """Seconds of work: fits, method rows of each (fold, method) batch, and FairPlay's per fold."""
    batches = units.group_by("fold", "method").agg(pl.col("method_seconds").first(), pl.col("fit_seconds").sum(),
                                                   pl.col("generator_seconds").first(),
                                                   pl.col("balance_seconds").first())
    fairplay = batches.filter(pl.col("generator_seconds").is_not_null())
    generator = float(fairplay["generator_seconds"].sum() + fairplay["balance_seconds"].sum())
    rows = float(batches["method_seconds"].sum()) - generator  # method_seconds includes FairPlay's share
    fits = float(batches["fit_seconds"].sum())
    return {"fits": fits, "rows": rows, "generators": generator, "total": fits + rows + generator,
            "tasks": batches.height + fairplay.height}


def _empty_task_seconds(address: str, n: int = 200) -> float:
    from halo_balance.distributed import ray_session

    with ray_session(address) as ray:
        noop = ray.remote(lambda: None).options(num_cpus=1)
        ray.get([noop.remote() for _ in range(10)])  # workers started
        t0 = time.perf_counter()
        ray.get([noop.remote() for _ in range(n)])
        return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.ray_grid", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--groups", nargs="+", required=True)
    p.add_argument("--stratify", nargs="+", default=None)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="original,upsample,downsample,smote,fairplay")
    p.add_argument("--models", default="logreg,rf,xgboost")
    p.add_argument("--train-options", type=json_object, default={"preset": "tiny", "epochs": 20, "patience": 4},
                   metavar="JSON", help="FairPlay generator training options (default %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="processes of the local backend")
    p.add_argument("--node-cpus", type=int, nargs="+", default=[1, 1], help="CPUs of the head and each worker node")
    a = p.parse_args(argv)
    from halo_balance.distributed import local_cluster

    cpus = sum(a.node_cpus)
    print(f"machine: {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; local --jobs "
          f"{a.jobs}, Ray nodes {a.node_cpus} CPUs", flush=True)
    results = {}
    wall, units = _grid("local", a, a.out / "local")
    results["local"] = (wall, _busy(units), a.jobs)
    t0 = time.perf_counter()
    with local_cluster(node_cpus=a.node_cpus) as cluster:
        started = time.perf_counter() - t0
        empty = _empty_task_seconds(cluster.address)
        wall, units = _grid("ray", a, a.out / "ray", ray_address=cluster.address)
        results["ray"] = (wall, _busy(units), cpus)
    print(f"Ray cluster: started in {started:.1f} s; empty task round trip {empty * 1000:.1f} ms", flush=True)
    print("| backend | wall s | tasks | busy s (fits / method rows / generators+balancing) | overhead s per task |")
    print("| --- | --- | --- | --- | --- |")
    for name, (wall, busy, slots) in results.items():
        overhead = (slots * wall - busy["total"]) / busy["tasks"]
        print(f"| {name} | {wall:.1f} | {busy['tasks']} | {busy['total']:.1f} ({busy['fits']:.1f} / {busy['rows']:.1f}"
              f" / {busy['generators']:.1f}) | {overhead:.2f} |")
    identical = {name: pl.read_parquet(a.out / "local" / name).equals(pl.read_parquet(a.out / "ray" / name))
                 for name in ("metrics.parquet", "predictions.parquet", "summary.parquet")}
    print(f"identical outputs: {identical}")
    units = pl.read_parquet(a.out / "ray" / "units.parquet")
    per_unit = units.group_by("method", "model").agg(fit=pl.col("fit_seconds").mean(),
                                                     rows=pl.col("method_seconds").mean()).sort("method", "model")
    print("per-unit means on the Ray run (s): fit of each model; method rows (FairPlay: generator + balancing):")
    with pl.Config(tbl_rows=100, tbl_hide_dataframe_shape=True, tbl_formatting="MARKDOWN"):
        print(per_unit)
    if not all(identical.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
