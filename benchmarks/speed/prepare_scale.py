"""Full-scale MIMIC-IV preprocessing: wall time and peak memory on the simulator's cohort.

``python -m benchmarks.speed.prepare_scale [--patients 300000] [--baseline-patients 30000]
[--time-bins N] [--lab-tokens mean|every] [--outcome ...]``

Prepares a simulated cohort in the raw MIMIC-IV layout (``data_prep.simulate``; an existing cohort
in ``--sim`` with the same size and seed is reused) with ``python -m data_prep.mimic_iv`` in a child
process, and prints its wall time, CPU time (user + system; the fairer figure on a shared machine,
whose 1-minute load average is printed beside it) and peak resident memory (``ru_maxrss``). A smaller
baseline cohort is prepared in the same run, so the figures come with ratios: memory that stays
flat while the rows grow tenfold is what "bounded regardless of input size" means. ``--time-bins``,
``--lab-tokens`` and ``--outcome`` are passed to the preparer. Targets for the 300,000-patient
cohort (~118M lab rows) on 2 cores / 24 GB: under 8 GB and under 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

TARGET_RSS_GB, TARGET_MINUTES = 8.0, 15.0


def run_child(cmd: list[str]) -> tuple[float, float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds, peak RSS in GB) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e9  # maxrss: KiB on Linux


def cohort(folder: Path, patients: int, seed: int) -> dict:
    """The simulated cohort in ``folder``, generated unless one of this size and seed is there."""
    info = folder / "simulation.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if meta.get("patients") == patients and meta.get("seed") == seed:
            print(f"reusing the simulated cohort in {folder}", flush=True)
            return meta
    print(f"simulating {patients:,} patients into {folder} ...", flush=True)
    wall, _, _ = run_child([sys.executable, "-m", "data_prep.simulate", "--patients", str(patients),
                         "--seed", str(seed), "--out", str(folder), "--overwrite"])
    print(f"  simulated in {wall / 60:.1f} min", flush=True)
    return json.loads(info.read_text())


def prepare(sim: Path, out: Path, patients: int, seed: int, options: Sequence[str] = ()) -> dict:
    meta = cohort(sim, patients, seed)
    print(f"preparing {sim} -> {out} {' '.join(options)} ...", flush=True)
    load = os.getloadavg()[0]
    wall, cpu, rss = run_child([sys.executable, "-m", "data_prep.mimic_iv", "--root", str(sim), "--out", str(out),
                                "--overwrite", "--quiet", *options])
    prepared = json.loads((out / "meta.json").read_text())
    return {"patients_in": meta["patients"], "admissions_in": meta["admissions"],
            "lab_rows": meta["rows"]["labevents"], "input_gb": meta["bytes_total"] / 1e9,
            "patients_out": prepared["counts"]["patients"], "visits_out": prepared["counts"]["visits"],
            "vocab": prepared["vocab_size"], "tokens": _token_count(out), "wall_s": wall, "cpu_s": cpu,
            "peak_rss_gb": rss,
            "load_before": load, "load_after": os.getloadavg()[0]}


def _token_count(prepared: Path) -> int:
    import polars as pl

    return int(pl.scan_parquet(prepared / "visits.parquet").select(pl.col("codes").list.len().sum()).collect().item())


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.speed.prepare_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--patients", type=int, default=300_000)
    p.add_argument("--baseline-patients", type=int, default=30_000, help="0 to skip the baseline")
    p.add_argument("--seed", type=int, default=0)
    tmp = Path(tempfile.gettempdir())
    p.add_argument("--sim", type=Path, default=tmp / "halo_sim_full",
                   help="simulated cohort folder (default: halo_sim_full in the system's temporary folder)")
    p.add_argument("--work", type=Path, default=tmp / "halo_prepare_scale",
                   help="folder for the baseline cohort and the prepared outputs (default: in the temporary folder)")
    p.add_argument("--time-bins", type=int, default=0, help="passed to the preparer (default 0: no time tokens)")
    p.add_argument("--lab-tokens", choices=["mean", "every"], default="mean", help="passed to the preparer")
    p.add_argument("--outcome", default="mortality", help="passed to the preparer")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    options = ["--time-bins", str(a.time_bins), "--lab-tokens", a.lab_tokens, "--outcome", a.outcome]
    tag = f"_{a.lab_tokens}_t{a.time_bins}_{a.outcome}"
    runs = []
    if a.baseline_patients:
        runs.append(prepare(a.work / f"sim_{a.baseline_patients}", a.work / f"prepared_{a.baseline_patients}{tag}",
                            a.baseline_patients, a.seed, options))
    runs.append(prepare(a.sim, a.work / f"prepared_{a.patients}{tag}", a.patients, a.seed, options))

    print(f"\noptions: {' '.join(options)}")
    print(f"{'patients':>9} {'admissions':>10} {'lab rows':>12} {'input':>8} {'visits out':>10} "
          f"{'vocab':>6} {'tokens':>11} {'wall':>9} {'CPU':>9} {'peak RSS':>9} {'lab rows/s':>11} {'load':>9}")
    for r in runs:
        print(f"{r['patients_in']:>9,} {r['admissions_in']:>10,} {r['lab_rows']:>12,} {r['input_gb']:>6.2f}GB "
              f"{r['visits_out']:>10,} {r['vocab']:>6,} {r['tokens']:>11,} {r['wall_s'] / 60:>7.2f}min "
              f"{r['cpu_s'] / 60:>6.2f}min "
              f"{r['peak_rss_gb']:>7.2f}GB {r['lab_rows'] / r['wall_s']:>11,.0f} "
              f"{r['load_before']:>4.1f}-{r['load_after']:<4.1f}")
    if len(runs) == 2:
        small, big = runs
        print(f"ratios (full / baseline): lab rows x{big['lab_rows'] / small['lab_rows']:.1f}, "
              f"wall x{big['wall_s'] / small['wall_s']:.1f}, CPU x{big['cpu_s'] / small['cpu_s']:.1f}, "
              f"peak RSS x{big['peak_rss_gb'] / small['peak_rss_gb']:.2f}")
    big = runs[-1]
    ok = big["peak_rss_gb"] < TARGET_RSS_GB and big["wall_s"] < TARGET_MINUTES * 60
    print(f"targets (< {TARGET_RSS_GB:g} GB, < {TARGET_MINUTES:g} min): {'met' if ok else 'NOT met'}")
    return runs


if __name__ == "__main__":
    main()
