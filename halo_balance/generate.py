"""Generative rebalancing from the command line: prepared data in, augmented data out.

``python -m halo_balance.generate --data PREPARED --groups ATTR [ATTR ...] --out DIR``
trains a conditional HALO generator on the real patients (or reuses ``--model``), tops every
under-filled (outcome x groups) cell up to the largest cell, and writes ``DIR`` atomically: the
prepared format (real rows unchanged, synthetic rows appended with ``synthetic = true``),
``plan.csv`` (cell, real n, to generate, target, generated, rejected and kept copies) and, when a model was
trained here, ``model/``. ``meta.json`` records the parameters, seed, versions and model path.

``python -m halo_balance.generate --demo [--out DIR]`` runs the whole pipeline on the built-in
simulated cohort: simulate MIMIC-IV-layout tables, prepare them, train a ``tiny`` model, balance on
race, evaluate the synthetic patients, and print where everything is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from .balance import BalanceResult, rebalance
from .copies import add_copy_arguments, describe_copies
from .data import PreparedDataset
from .io import atomic_dir, atomic_write_bytes, check_output_dir, write_json

DEMO_PATIENTS = 2000
DEMO_GROUPS = ["race"]


def write_balanced(result: BalanceResult, out: str | Path, *, overwrite: bool = False,
                   model_path: str | None = None, trained_model: bool = False) -> Path:
    """Write the augmented dataset, ``plan.csv`` and (when trained here) ``model/`` atomically."""
    result.dataset.meta["generation"]["model_path"] = "model" if trained_model else model_path
    with atomic_dir(out, overwrite=overwrite) as tmp:
        result.dataset.write_files(tmp)
        atomic_write_bytes(tmp / "plan.csv", result.plan.write_csv().encode())
        if trained_model:
            result.model.save_pretrained(tmp / "model")
    return Path(out)


def summary_table(plan: pl.DataFrame, groups: Sequence[str]) -> str:
    """The plan as an aligned text table: cell, real, synthetic, after, status."""
    rows = [("cell", "real", "synthetic", "after", "status")]
    for r in plan.iter_rows(named=True):
        cell = ",".join(f"{c}={r[c]}" for c in ["label", *groups])
        rows.append((cell, str(r["n_real"]), str(r.get("generated", 0)),
                     str(r["n_real"] + r.get("generated", 0)), r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(v.ljust(w) if i in (0, 4) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in rows)


def build_parser() -> argparse.ArgumentParser:
    from .train import add_train_arguments

    p = argparse.ArgumentParser(prog="python -m halo_balance.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="prepared dataset folder (the real training patients)")
    p.add_argument("--groups", nargs="*", default=None, metavar="ATTR",
                   help="group attributes crossed with the outcome to form cells (none: outcome only)")
    p.add_argument("--out", type=Path, help="output folder (the augmented prepared dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--model", type=Path, help="a trained model folder; without it a model is trained here")
    p.add_argument("--ratio", type=float, default=1.0, help="fraction of each cell's gap to fill, in [0, 1]")
    p.add_argument("--min-cell-size", type=int, default=5, help="skip observed cells with fewer real patients")
    p.add_argument("--include-empty-cells", action="store_true", help="also generate for cells with no patient")
    add_copy_arguments(p)
    p.add_argument("--sample-batch-size", type=int, default=256, help="records sampled together")
    p.add_argument("--demo", action="store_true",
                   help="run the built-in demo: simulate, prepare, train a tiny model, balance on race, evaluate")
    p.add_argument("--demo-patients", type=int, default=DEMO_PATIENTS, help="patients in the demo cohort")
    add_train_arguments(p)
    p.set_defaults(preset=None)  # "small" for --data, "tiny" for --demo
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from .train import train_options_from_args

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        run_demo(args)
        return
    missing = [f"--{k}" for k in ("data", "out") if getattr(args, k) is None] + (
        ["--groups"] if args.groups is None else [])
    if missing:
        parser.error(f"the following arguments are required without --demo: {', '.join(missing)}")
    if args.preset is None:
        args.preset = "small"
    check_output_dir(args.out, overwrite=args.overwrite)
    options = train_options_from_args(args)
    data = PreparedDataset.load(args.data)
    t0 = time.perf_counter()
    result = rebalance(data, groups=args.groups, model=args.model, ratio=args.ratio,
                       min_cell_size=args.min_cell_size, include_empty_cells=args.include_empty_cells,
                       allow_copies=args.allow_copies, copy_k=args.copy_k, max_rounds=args.max_rounds, seed=args.seed,
                       batch_size=args.sample_batch_size, device=args.device, train_options=options)
    write_balanced(result, args.out, overwrite=args.overwrite,
                   model_path=None if args.model is None else str(args.model), trained_model=args.model is None)
    _print_summary(result, args.groups, args.out, time.perf_counter() - t0)


def _print_summary(result: BalanceResult, groups: Sequence[str], out: Path, seconds: float) -> None:
    print(f"\n{summary_table(result.plan, groups)}\n")
    n_syn = result.synthetic.n_patients
    print(f"wrote {out}: {result.dataset.n_patients - n_syn} real + {n_syn} synthetic patients "
          f"({describe_copies(result.dataset.meta['generation'])}) in {seconds:.0f} s")
    print(f"plan: {out / 'plan.csv'}")


def run_demo(args: argparse.Namespace) -> None:
    """Simulate -> prepare -> train tiny -> balance on race -> evaluate; print where things are."""
    from data_prep.mimic_iv import prepare_mimic_iv
    from data_prep.simulate import simulate

    from .evaluate import evaluate, render_markdown
    from .train import train_model, train_options_from_args

    out = check_output_dir(args.out or Path("halo_balance_demo"), overwrite=args.overwrite)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        _stage(f"1/5 simulating {args.demo_patients} patients in the MIMIC-IV layout")
        simulate(tmp / "raw", patients=args.demo_patients, seed=args.seed)
        _stage("2/5 preparing the simulated tables")
        prepared = prepare_mimic_iv(tmp / "raw", tmp / "prepared")
        train_ids, holdout_ids = prepared.train_test_split(0.2, groups=DEMO_GROUPS, seed=args.seed)
        train, holdout = prepared.select(train_ids), prepared.select(holdout_ids)
        train.save(tmp / "train")
        holdout.save(tmp / "holdout")
        _stage(f"3/5 training a tiny generator on {train.n_patients} patients "
               f"(the other {holdout.n_patients} are held out for the privacy report)")
        args.preset = args.preset or "tiny"
        options = train_options_from_args(args)
        model = train_model(train, out_dir=tmp / "model", options=options)
        _stage("4/5 balancing outcome x race")
        result = rebalance(train, groups=DEMO_GROUPS, model=model, ratio=args.ratio,
                           min_cell_size=args.min_cell_size, copy_k=args.copy_k, seed=args.seed,
                           batch_size=args.sample_batch_size, device=args.device)
        write_balanced(result, tmp / "augmented", model_path=str(out / "model"))
        _stage("5/5 evaluating fidelity and privacy of the synthetic patients")
        report = evaluate(train, result.synthetic, holdout=holdout, model=result.model, seed=args.seed,
                          cells=[DEMO_GROUPS])
        (tmp / "report").mkdir()
        write_json(tmp / "report" / "report.json", report)
        atomic_write_bytes(tmp / "report" / "report.md", render_markdown(report).encode())
    _print_summary(result, DEMO_GROUPS, out / "augmented", time.perf_counter() - t0)
    uni = report["fidelity"]["statistics"]["unigram_per_visit"]
    print(f"\nprivacy verdict: {report['privacy']['verdict']['text']}")
    print(f"unigram R^2 {uni['r2']:.3f} (real-vs-real ceiling {uni['ceiling_r2']:.3f}); exact copies "
          f"{report['privacy']['exact_copies']['synthetic_copies']}")
    print(f"\nraw tables:      {out / 'raw'}\nprepared data:   {out / 'prepared'}\nmodel:           "
          f"{out / 'model'}\naugmented data:  {out / 'augmented'}\nreport:          {out / 'report' / 'report.md'}")


def _stage(text: str) -> None:
    print(f"[halo_balance] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from .cli import run

    run(main)
