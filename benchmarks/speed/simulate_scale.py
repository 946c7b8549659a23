"""Scale benchmark of the MIMIC-IV-layout simulator: wall time, rows, bytes on disk, peak memory.

    python -m benchmarks.speed.simulate_scale [--patients 300000] [--out DIR] [--seed 0] [--chunk-patients K]
    python -m benchmarks.speed.simulate_scale --compare-levels [--patients 2000]

Runs ``python -m data_prep.simulate`` as a child process (so its peak resident memory is measured
alone, threads included, via ``getrusage(RUSAGE_CHILDREN)``) and prints wall time, CPU time, rows
written per table, bytes on disk per file and peak RSS. Without ``--out`` the cohort goes to a
temporary folder that is removed afterwards; with ``--out`` it is kept. ``--compare-levels`` instead
serialises the ``labevents`` rows of ``--patients`` simulated patients once and deflates that CSV at
each zlib level, printing size ratio and single-core speed side by side (how the simulator's level
was chosen).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil


def run(patients: int, out: Path, seed: int, chunk_patients: int | None) -> dict:
    cmd = [sys.executable, "-m", "data_prep.simulate", "--patients", str(patients), "--seed", str(seed),
           "--out", str(out), "--overwrite"]
    if chunk_patients:
        cmd += ["--chunk-patients", str(chunk_patients)]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, cwd=Path(__file__).resolve().parents[1])
    sampled = 0
    while proc.poll() is None:  # sampling only cross-checks ru_maxrss, which is exact
        try:
            sampled = max(sampled, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"simulator failed with exit status {proc.returncode}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "simulation.json").read_text())
    files = {p.name: p.stat().st_size for p in sorted((out / "hosp").iterdir())}
    return {
        "patients": patients, "seed": seed, "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "peak_rss_sampled_mb": round(sampled / 2**20, 1),
        "rows": summary["rows"], "bytes": files, "bytes_total": sum(files.values()),
        "admissions_per_patient": round(summary["admissions"] / patients, 3),
        "lab_rows_per_admission": round(summary["rows"]["labevents"] / summary["admissions"], 1),
        "lab_rows_without_hadm": summary["lab_rows_without_hadm"],
        "mortality": round(summary["mortality"], 4), "chunk_patients": summary["chunk_patients"],
        "compression_level": summary["compression_level"],
    }


def compare_levels(patients: int, seed: int) -> list[dict]:
    """Compression ratio and single-core speed of each zlib level on simulated labevents CSV."""
    import zlib

    import polars as pl

    from data_prep import simulate as sim

    blocks = sim.cohort_blocks(patients, seed, sim.SimulationParams())
    frames = [block.labevents for block in blocks]
    raw, _ = sim._deflate_csv(pl.concat(frames), True, 0)
    out = []
    for level in (1, 2, 3, 4, 5, 6, 9):
        t0 = time.process_time()
        z = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        size = len(z.compress(raw) + z.flush())
        cpu = time.process_time() - t0
        out.append({"level": level, "ratio": round(len(raw) / size, 2), "mb_per_cpu_s": round(len(raw) / cpu / 1e6, 1)})
    print(f"labevents CSV of {patients:,} patients: {len(raw) / 1e6:,.1f} MB")
    print(f"{'level':>5}{'ratio':>8}{'MB/s':>8}{'vs level %d (the default)' % sim.COMPRESSION_LEVEL:>28}")
    ref = next(r for r in out if r["level"] == sim.COMPRESSION_LEVEL)
    for r in out:
        print(f"{r['level']:>5}{r['ratio']:>8.2f}{r['mb_per_cpu_s']:>8.1f}"
              f"{'size x%.2f, time x%.2f' % (ref['ratio'] / r['ratio'], ref['mb_per_cpu_s'] / r['mb_per_cpu_s']):>28}")
    return out


def main(argv: Sequence[str] | None = None) -> dict | list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed.simulate_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=None,
                        help="patients (default 300000; 2000 with --compare-levels)")
    parser.add_argument("--out", type=Path, help="keep the cohort here (default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-patients", type=int, default=None)
    parser.add_argument("--compare-levels", action="store_true", help="compare zlib levels on one sample")
    args = parser.parse_args(argv)
    if args.compare_levels:
        return compare_levels(args.patients or 2000, args.seed)
    tmp = None if args.out else Path(tempfile.mkdtemp(prefix="halo_sim_bench_"))
    out = args.out or tmp / "cohort"
    try:
        res = run(args.patients or 300_000, out, args.seed, args.chunk_patients)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = res["rows"]
    print(f"patients {res['patients']:,}  seed {res['seed']}  chunk {res['chunk_patients']:,}  "
          f"gzip level {res['compression_level']}")
    print(f"wall {res['wall_s']:.1f} s   cpu {res['cpu_s']:.1f} s (x{res['cpu_s'] / res['wall_s']:.2f})   "
          f"peak RSS {res['peak_rss_mb']:,.0f} MB (sampled {res['peak_rss_sampled_mb']:,.0f} MB)")
    print(f"{'table':<18}{'rows':>15}{'bytes':>16}")
    for table in rows:
        print(f"{table:<18}{rows[table]:>15,}{res['bytes'][table + '.csv.gz']:>16,}")
    print(f"{'total':<18}{sum(rows.values()):>15,}{res['bytes_total']:>16,}")
    print(f"admissions/patient {res['admissions_per_patient']}  lab rows/admission {res['lab_rows_per_admission']}  "
          f"lab rows without hadm_id {res['lab_rows_without_hadm'] / rows['labevents']:.1%}  "
          f"mortality {res['mortality']:.2%}  lab rows/s {rows['labevents'] / res['wall_s']:,.0f}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
