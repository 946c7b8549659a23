"""The privacy-utility table: generators trained at several privacy budgets, every attack, fidelity and FairPlay.

::

    python -m benchmarks.privacy_utility --data PREPARED --out DIR [--epsilons 1 3 8 16 none]
        [--train-options JSON] [--dp-train-options JSON] [--test-fraction 0.2] [--seed 0]
        [--kfold EXPERIMENT:SETTING=RUN_DIR ...]

For every setting (an epsilon, or ``none`` for training without differential privacy) a generator
is trained on a stratified ``1 - test_fraction`` share of the patients (``--train-options``, plus
``--dp-train-options`` and ``dp_epsilon`` for the private settings), as many records as there are
training patients are drawn as ``python -m halo_balance.sample`` draws them by default (conditions
from the model's training cells, copies of rare training records re-drawn), and
``halo_balance.evaluate`` scores them against the training records with the held-out patients as
non-members: every membership attack's AUROC, the one farthest from chance among the attacks within
an outcome x group cell (with the same attack by the code-frequency model of the training patients,
when it is a likelihood attack), the largest attribute-inference advantage, and the token and
within-visit pair R^2. Each setting's model, synthetic records and report stay in
``DIR/<setting>/`` and are reused by a rerun.

``--kfold`` adds FairPlay's mean F1 (over the downstream models) and Theil index of group F1s from
finished ``benchmarks.kfold`` folders, e.g. ``--kfold gender:8=runs/gender_eps8`` for the gender
experiment's epsilon-8 run (its ``--train-options`` must be the setting's). The table goes to
``DIR/table.md`` and every figure to ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from halo_balance.cli import json_object
from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError
from halo_balance.io import atomic_write_bytes, read_json, write_json

ATTACKS = (("distance", None), ("likelihood", None), ("likelihood", "per_event"))


def setting_name(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"eps{epsilon:g}"


def run_setting(train: PreparedDataset, holdout: PreparedDataset, *, epsilon: float | None, out: Path,
                train_options: dict[str, Any], dp_train_options: dict[str, Any], seed: int,
                device: str) -> dict[str, Any]:
    """Train (or reuse), sample and evaluate one setting; returns its row of the table."""
    from halo_balance.copies import CopyFilter, draw_without_copies
    from halo_balance.evaluate import evaluate
    from halo_balance.model import HaloModel
    from halo_balance.train import TRAINING_FILE, TrainOptions, train_model

    options = {**train_options, **(dp_train_options if epsilon is not None else {}),
               **({"dp_epsilon": epsilon} if epsilon is not None else {})}
    model_dir = out / "model"
    t0 = time.perf_counter()
    if (model_dir / TRAINING_FILE).is_file():
        model = HaloModel.from_pretrained(model_dir)
    else:
        model = train_model(train, out_dir=model_dir, progress=False, options=TrainOptions(
            **{"seed": seed, "device": device, "overwrite": True, **options}))
    train_seconds = time.perf_counter() - t0
    info = read_json(model_dir / TRAINING_FILE)
    conditions = model.layout.complete({}, train.n_patients, seed=seed)
    draw = draw_without_copies(model, conditions, copy_filter=CopyFilter(references=[model.record_counts]),
                               seed=seed, device=device, progress=False)
    if len(draw.unfilled):
        raise HaloBalanceError(f"{out.name}: {len(draw.unfilled)} records could not be drawn without rare copies")
    synthetic = draw.dataset
    synthetic.save(out / "synthetic", overwrite=True)
    report = evaluate(train, synthetic, holdout=holdout, model=model, seed=seed, device=device,
                      not_members=info.get("validation_patient_ids", []))
    write_json(out / "report.json", report)
    return table_row(report, setting=setting_name(epsilon), options=options, training=info,
                     copies=draw.summary(CopyFilter()), train_seconds=train_seconds)


def table_row(report: dict[str, Any], *, setting: str, options: dict[str, Any], training: dict[str, Any],
              copies: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    """The figures of one setting from its evaluation report and ``training.json``."""
    priv, stats = report["privacy"], report["fidelity"]["statistics"]
    mia = priv["membership_inference"]
    row: dict[str, Any] = {"setting": setting, "train_options": options,
                           "epsilon_spent": (training.get("dp") or {}).get("epsilon"),
                           "delta": (training.get("dp") or {}).get("delta"),
                           "epochs": len(training["history"]), "train_seconds": round(train_seconds, 1)}
    for how, sub in ATTACKS:
        fig = mia[how] if sub is None else mia[how].get(sub, {})
        row[f"auroc_{how}" + (f"_{sub}" if sub else "")] = fig.get("auroc")
    in_cells = [a for a in priv["verdict"]["attacks"] if a.get("cell") and a["kind"] == "auroc"]
    strongest = max(in_cells, key=lambda a: a["severity"], default=None)  # the farthest from chance
    row.update(auroc_strongest_cell=strongest and strongest["value"], strongest_cell=strongest and strongest["attack"],
               strongest_cell_level=strongest and strongest["level"],
               auroc_strongest_cell_code_frequency=strongest and strongest.get("code_frequency"))
    attributes = priv["attribute_inference"]["attributes"]
    worst = max(attributes, key=lambda a: attributes[a]["advantage"])
    row.update(attribute_advantage=attributes[worst]["advantage"], attribute_worst=worst,
               token_r2=stats["unigram_per_visit"]["r2"], pair_r2=stats["pair_per_visit"]["r2"],
               token_r2_reference=stats["unigram_per_visit"]["reference_r2"],
               pair_r2_reference=stats["pair_per_visit"]["reference_r2"],
               verdict=priv["verdict"]["level"], rejected_copies=copies["rejected_copies"],
               kept_copies=copies["kept_copies"])
    return row


def kfold_figures(run_dir: str | Path, *, method: str = "fairplay") -> dict[str, float]:
    """FairPlay's overall F1 (mean of the models) and the Theil index of group F1s of a k-fold run."""
    run = read_json(Path(run_dir) / "run.json")
    groups = run.get("groups") or []
    summary = pl.read_parquet(Path(run_dir) / "summary.parquet").filter(
        (pl.col("method") == method) & (pl.col("model") == "mean"))
    f1 = summary.filter(pl.col("attribute").is_null() & (pl.col("metric") == "f1"))
    theil = summary.filter((pl.col("attribute") == (" & ".join(groups) if len(groups) > 1 else groups[0]))
                           & (pl.col("metric") == "theil")) if groups else summary.clear()
    if not f1.height:
        raise HaloBalanceError(f"{run_dir}: no finished {method} units in summary.parquet")
    return {"f1": float(f1["mean"][0]), "f1_se": float(f1["se"][0]),
            "theil": float(theil["mean"][0]) if theil.height else math.nan}


def render_table(rows: Sequence[dict[str, Any]], kfold: dict[str, dict[str, dict[str, float]]]) -> str:
    """The table as markdown: one row per setting."""
    experiments = sorted({e for per in kfold.values() for e in per})
    head = ["setting", "epsilon spent", "MIA distance", "MIA likelihood", "MIA per token",
            "MIA in a cell (code frequencies)", "attribute adv.", "token R^2", "pair R^2", "verdict"]
    head += [f"{e}: {m}" for e in experiments for m in ("FairPlay F1", "Theil")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def f(x: Any, spec: str = ".3f") -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for r in rows:
        cells = [r["setting"], f(r["epsilon_spent"], ".2f"), f(r["auroc_distance"]), f(r["auroc_likelihood"]),
                 f(r["auroc_likelihood_per_event"]),
                 f(r.get("auroc_strongest_cell")) + (f" ({f(r['auroc_strongest_cell_code_frequency'])})"
                                                     if r.get("auroc_strongest_cell_code_frequency") is not None else ""),
                 f(r["attribute_advantage"], "+.3f"), f(r["token_r2"]),
                 f(r["pair_r2"]), r["verdict"]]
        for e in experiments:
            k = kfold.get(r["setting"], {}).get(e)
            cells += [f"{k['f1']:.3f} ± {k['f1_se']:.3f}" if k else "-", f(k["theil"]) if k else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _epsilon(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0 or 'none' (got {text})")
    return value


def _kfold_arg(text: str) -> tuple[str, str, str]:
    key, sep, path = text.partition("=")
    experiment, sep2, setting = key.partition(":")
    if not sep or not sep2 or not experiment or not setting:
        raise argparse.ArgumentTypeError(f"--kfold expects EXPERIMENT:SETTING=RUN_DIR (got {text!r})")
    return experiment, setting_name(_epsilon(setting)), path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.privacy_utility", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="prepared dataset")
    p.add_argument("--out", required=True, type=Path, help="output folder (one subfolder per setting)")
    p.add_argument("--epsilons", nargs="+", type=_epsilon, default=[1.0, 3.0, 8.0, 16.0, None],
                   metavar="EPS|none", help="privacy budgets; none = without differential privacy")
    p.add_argument("--train-options", type=json_object, default={}, metavar="JSON",
                   help="TrainOptions fields for every setting")
    p.add_argument("--dp-train-options", type=json_object, default={}, metavar="JSON",
                   help="TrainOptions fields added for the private settings")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out patients (non-members)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--kfold", type=_kfold_arg, action="append", default=[], metavar="EXPERIMENT:SETTING=RUN_DIR")
    args = p.parse_args(argv)
    data = PreparedDataset.load(args.data)
    train_ids, test_ids = data.train_test_split(args.test_fraction, seed=args.seed)
    train, holdout = data.select(train_ids), data.select(test_ids)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for epsilon in args.epsilons:
        name = setting_name(epsilon)
        print(f"[privacy_utility] {name}: {train.n_patients} training / {holdout.n_patients} held-out patients",
              file=sys.stderr, flush=True)
        rows.append(run_setting(train, holdout, epsilon=epsilon, out=args.out / name,
                                train_options=args.train_options, dp_train_options=args.dp_train_options,
                                seed=args.seed, device=args.device))
    kfold: dict[str, dict[str, dict[str, float]]] = {}
    for experiment, setting, path in args.kfold:
        kfold.setdefault(setting, {})[experiment] = {**kfold_figures(path), "run": str(path)}
    table = render_table(rows, kfold)
    write_json(args.out / "results.json", {"data": str(args.data), "seed": args.seed, "test_fraction":
                                           args.test_fraction, "n_train": train.n_patients,
                                           "n_holdout": holdout.n_patients, "rows": rows, "kfold": kfold})
    atomic_write_bytes(args.out / "table.md", table.encode())
    print(table)
    return rows


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
