"""Generative rebalancing from the command line: prepared data in, augmented data out.

``python -m halo_balance.generate --data PREPARED --groups ATTR [ATTR ...] --out DIR``
trains a conditional HALO generator on the real patients (or reuses ``--model``), tops every
under-filled (outcome x groups) cell up to the largest cell, and writes ``DIR``: the prepared
format (real rows unchanged, synthetic rows appended with ``synthetic = true``), ``plan.csv``
(cell, real n, to generate, target, generated, rejected and kept copies, amplification) and, when
a model was trained here, ``model/``. ``meta.json`` records the parameters, seed, versions and
model path.

Every option, the data, the model and the output path are checked before any work. The generator
trains where it will live, in ``DIR/model`` (with ``training.json``, so that ``evaluate --model``
knows its early-stopping patients); its checkpoint is kept there until the run has finished, so
an interrupted run continues with ``--resume``. The dataset files are written last, ``meta.json``
the very last: a ``DIR`` without it is an unfinished run. With ``--model`` the whole of ``DIR`` is
written atomically. ``--overwrite`` replaces only a folder this package wrote, never an input;
input that already holds synthetic rows is refused.

``--shards N`` (with ``--backend ray`` and ``--ray-address``) splits each sampling round into shards
run one after another or as Ray tasks (:func:`halo_balance.sample.sample_shards`); the output is the
same whatever they are.

``python -m halo_balance.generate --demo [--out DIR]`` runs the whole pipeline on the built-in
simulated cohort: simulate MIMIC-IV-layout tables, prepare them, train a ``tiny`` model, balance on
race, evaluate the synthetic patients, and print where everything is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from .balance import BalanceResult, rebalance
from .copies import add_copy_arguments, check_copy_arguments, describe_copies
from .data import META_FILE, PreparedDataset
from .errors import HaloBalanceError
from .io import atomic_dir, atomic_write_bytes, check_output_dir, read_json, write_json
from .plan import AmplificationWarning, amplification_warnings, cell_name, plan_cells

DEMO_PATIENTS = 2000
DEMO_GROUPS = ["race"]


def write_balanced(result: BalanceResult, out: str | Path, *, overwrite: bool = False,
                   model_path: str | None = None) -> Path:
    """Write the augmented dataset and ``plan.csv`` as a new folder ``out``, atomically."""
    result.dataset.meta["generation"]["model_path"] = model_path
    with atomic_dir(out, overwrite=overwrite) as tmp:
        result.dataset.write_files(tmp)
        atomic_write_bytes(tmp / "plan.csv", result.plan.write_csv().encode())
    return Path(out)


def write_beside_model(result: BalanceResult, out: Path) -> Path:
    """Write the augmented dataset and ``plan.csv`` into ``out``, which holds the trained ``model/``.

    The files are written in a temporary folder inside ``out`` and renamed into place, ``meta.json``
    last, so that ``out`` is a complete prepared dataset exactly when ``meta.json`` is there.
    """
    result.dataset.meta["generation"]["model_path"] = "model"
    tmp = Path(tempfile.mkdtemp(prefix=".balanced.tmp-", dir=out))
    try:
        result.dataset.write_files(tmp)
        atomic_write_bytes(tmp / "plan.csv", result.plan.write_csv().encode())
        names = sorted(os.listdir(tmp), key=lambda n: n == META_FILE)
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def summary_table(plan: pl.DataFrame, groups: Sequence[str]) -> str:
    """The plan as an aligned text table: cell, real, synthetic, after, synthetic per real, status."""
    rows = [("cell", "real", "synthetic", "after", "x real", "status")]
    for r in plan.iter_rows(named=True):
        generated = r.get("generated", r["to_generate"])
        amp = "-" if r["amplification"] is None else f"{generated / r['n_real']:.1f}"
        rows.append((cell_name(r, groups), str(r["n_real"]), str(generated), str(r["n_real"] + generated), amp,
                     r["status"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) if i in (0, 5) else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in rows)


def build_parser() -> argparse.ArgumentParser:
    from .sample import add_shard_arguments
    from .train import add_train_arguments

    p = argparse.ArgumentParser(prog="python -m halo_balance.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="prepared dataset folder (the real training patients)")
    p.add_argument("--groups", nargs="*", default=None, metavar="ATTR",
                   help="group attributes crossed with the outcome to form cells (none: outcome only)")
    p.add_argument("--out", type=Path, help="output folder (the augmented prepared dataset)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only one this package wrote)")
    p.add_argument("--model", type=Path,
                   help="a trained model folder (or a generate output holding model/); without it a model is "
                        "trained in OUT/model")
    p.add_argument("--ratio", type=float, default=1.0,
                   help="fraction of each cell's gap to fill (default %(default)s; above 1 overshoots the largest "
                        "cell)")
    p.add_argument("--min-cell-size", type=int, default=5,
                   help="skip observed cells with fewer real patients (default %(default)s)")
    p.add_argument("--include-empty-cells", action="store_true", help="also generate for cells with no patient")
    add_copy_arguments(p)
    p.add_argument("--sample-batch-size", type=int, default=256, help="records sampled together (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output; only the final summary")
    p.add_argument("--demo", action="store_true",
                   help="run the built-in demo: simulate, prepare, train a tiny model, balance on race, evaluate")
    p.add_argument("--demo-patients", type=int, default=DEMO_PATIENTS,
                   help="patients in the demo cohort (default %(default)s)")
    add_shard_arguments(p, shard_index=False)
    add_train_arguments(p)
    p.set_defaults(preset=None)  # "small" for --data, "tiny" for --demo
    for action in p._actions:  # the help shows both defaults
        if action.dest == "preset":
            action.help = "model size (default small; tiny with --demo)"
        if action.dest == "resume":
            action.help = "continue an interrupted run: the training in OUT/model, then the balancing"
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
    job = _Job.checked(args, train_options_from_args(args))
    t0 = time.perf_counter()
    result = job.run()
    _print_summary(result, args.groups, args.out, time.perf_counter() - t0,
                   model=args.model if args.model is not None else args.out / "model")


class _Job:
    """A ``generate`` run whose every input and option has been checked (no work done yet)."""

    def __init__(self, args: argparse.Namespace, options, data: PreparedDataset, model) -> None:
        self.args, self.options, self.data, self.model = args, options, data, model

    @classmethod
    def checked(cls, args: argparse.Namespace, options) -> _Job:
        from .train import check_model_dir

        check_copy_arguments(args)
        if args.sample_batch_size < 1:
            raise HaloBalanceError(f"--sample-batch-size must be >= 1 (got {args.sample_batch_size})")
        from .sample import check_shard_arguments

        check_shard_arguments(args)
        out = args.out
        if args.model is not None:
            if options.resume:
                raise HaloBalanceError("--resume continues the training of OUT/model; with --model nothing is "
                                       "trained: drop --resume")
            check_output_dir(out, overwrite=args.overwrite, inputs=[args.data, args.model], what="--out")
        elif options.resume:
            if (out / META_FILE).is_file():
                raise HaloBalanceError(f"nothing to resume: --out {out} is a finished run; pass --overwrite to "
                                       "redo it, or choose another --out")
            if not (out / "model" / "training.json").is_file():
                check_model_dir(out / "model", resume=True, overwrite=False, inputs=[args.data])
            check_output_dir(out, overwrite=True, inputs=[args.data], what="--out")
        else:
            check_output_dir(out, overwrite=args.overwrite, inputs=[args.data], what="--out")
        data = PreparedDataset.load(args.data)
        n_syn = int(data.patients["synthetic"].sum())
        if n_syn:
            raise HaloBalanceError(
                f"--data {args.data} already holds {n_syn} synthetic patients (an output of halo_balance.generate); "
                "balancing it again would stack synthetic patients on synthetic ones: pass the real data")
        plan = plan_cells(data, groups=args.groups, ratio=args.ratio, min_cell_size=args.min_cell_size,
                          include_empty_cells=args.include_empty_cells)
        model = None
        if args.model is not None:
            from .model import HaloModel

            model = HaloModel.from_pretrained(args.model)
            model.check_compatible(data)
        if not args.quiet:
            for line in amplification_warnings(plan, args.groups):
                print(f"warning: {line}", file=sys.stderr)
        return cls(args, options, data, model)

    def run(self) -> BalanceResult:
        from .cli import interrupt_note
        from .model import HaloModel
        from .train import TRAINING_FILE, train_model

        args, out = self.args, self.args.out
        model = self.model
        if model is None:
            model_dir = out / "model"
            if not self.options.resume and out.exists():
                shutil.rmtree(out)  # checked: a folder of ours, and --overwrite was given
            if self.options.resume and (model_dir / TRAINING_FILE).is_file():
                model = HaloModel.from_pretrained(model_dir)
            else:
                model = train_model(self.data, out_dir=model_dir, options=self.options, progress=not args.quiet)
        with warnings.catch_warnings(), interrupt_note(lambda: _kept_model(out) if self.model is None else None):
            warnings.simplefilter("ignore", AmplificationWarning)  # reported before the work began
            result = rebalance(self.data, groups=args.groups, model=model, ratio=args.ratio,
                               min_cell_size=args.min_cell_size, include_empty_cells=args.include_empty_cells,
                               allow_copies=args.allow_copies, copy_k=args.copy_k, max_rounds=args.max_rounds,
                               seed=args.seed, batch_size=args.sample_batch_size, device=args.device,
                               progress=not args.quiet, shards=args.shards, backend=args.backend,
                               ray_address=args.ray_address, gpus_per_shard=args.gpus_per_shard)
            if self.model is not None:
                write_balanced(result, out, overwrite=args.overwrite, model_path=str(args.model))
            else:
                write_beside_model(result, out)
                shutil.rmtree(out / "model" / "checkpoint", ignore_errors=True)  # the run is complete
        return result


def _kept_model(out: Path) -> str | None:
    if (out / "model" / "training.json").is_file():
        return (f"the trained generator is kept in {out / 'model'}: re-run the same command with --resume to "
                "balance with it without training again")
    return None


def _print_summary(result: BalanceResult, groups: Sequence[str], out: Path, seconds: float, *,
                   model: Path) -> None:
    print(f"\n{summary_table(result.plan, groups)}\n")
    n_syn = result.synthetic.n_patients
    print(f"wrote {out}: {result.dataset.n_patients - n_syn} real + {n_syn} synthetic patients "
          f"({describe_copies(result.dataset.meta['generation'])}) in {seconds:.0f} s")
    print(f"plan:  {out / 'plan.csv'}\nmodel: {model}")


def run_demo(args: argparse.Namespace) -> None:
    """Simulate -> prepare -> train tiny -> balance on race -> evaluate; print where things are."""
    from data_prep.mimic_iv import prepare_mimic_iv
    from data_prep.simulate import simulate

    from .evaluate import evaluate, render_markdown
    from .train import TRAINING_FILE, train_model, train_options_from_args

    if args.resume or args.model is not None or args.data is not None:
        raise HaloBalanceError("--demo makes its own data and model: drop --resume, --model and --data")
    out = check_output_dir(args.out or Path("halo_balance_demo"), overwrite=args.overwrite, what="--out")
    args.preset = args.preset or "tiny"
    options = train_options_from_args(args)
    progress = not args.quiet
    stage = _stage if progress else (lambda text: None)
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        stage(f"1/5 simulating {args.demo_patients} patients in the MIMIC-IV layout")
        simulate(tmp / "raw", patients=args.demo_patients, seed=args.seed, progress=progress)
        stage("2/5 preparing the simulated tables")
        prepared = prepare_mimic_iv(tmp / "raw", tmp / "prepared", progress=progress)
        train_ids, holdout_ids = prepared.train_test_split(0.2, groups=DEMO_GROUPS, seed=args.seed)
        train, holdout = prepared.select(train_ids), prepared.select(holdout_ids)
        train.save(tmp / "train")
        holdout.save(tmp / "holdout")
        stage(f"3/5 training a tiny generator on {train.n_patients} patients "
              f"(the other {holdout.n_patients} are held out for the privacy report)")
        model = train_model(train, out_dir=tmp / "model", options=options, progress=progress)
        stage("4/5 balancing outcome x race")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AmplificationWarning)
            result = rebalance(train, groups=DEMO_GROUPS, model=model, ratio=args.ratio,
                               min_cell_size=args.min_cell_size, copy_k=args.copy_k, seed=args.seed,
                               batch_size=args.sample_batch_size, device=args.device, progress=progress)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        write_balanced(result, tmp / "augmented", model_path=str(out / "model"))
        stage("5/5 evaluating fidelity and privacy of the synthetic patients")
        # the early-stopping patients were never fitted: not members, as `evaluate --model` treats them
        report = evaluate(train, result.synthetic, holdout=holdout, model=result.model, seed=args.seed,
                          cells=[DEMO_GROUPS],
                          not_members=read_json(tmp / "model" / TRAINING_FILE).get("validation_patient_ids", []))
        (tmp / "report").mkdir()
        write_json(tmp / "report" / "report.json", report)
        atomic_write_bytes(tmp / "report" / "report.md", render_markdown(report).encode())
    _print_summary(result, DEMO_GROUPS, out / "augmented", time.perf_counter() - t0, model=out / "model")
    uni = report["fidelity"]["statistics"]["unigram_per_visit"]
    print(f"\nprivacy verdict: {report['privacy']['verdict']['text']}")
    print(f"unigram R^2 {uni['r2']:.3f} (real reference {uni['reference_r2']:.3f}); exact copies "
          f"{report['privacy']['exact_copies']['synthetic_copies']}")
    print(f"\nraw tables:      {out / 'raw'}\nprepared data:   {out / 'prepared'}\nmodel:           "
          f"{out / 'model'}\naugmented data:  {out / 'augmented'}\nreport:          {out / 'report' / 'report.md'}")


def _stage(text: str) -> None:
    print(f"[halo_balance] {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    from .cli import run

    run(main)
