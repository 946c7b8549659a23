"""Does a generator reproduce the timeline? Age and gap tokens of synthetic against real records.

``python -m benchmarks.time_fidelity --data PREPARED --out DIR [--model MODEL] [--preset small]``

``PREPARED`` must hold time tokens (``data_prep.mimic_iv`` / ``data_prep.eicu --time-bins N``). The
patients are split into training and held-out parts (``--holdout-fraction``, stratified, seeded);
a generator is trained on the training part (or ``--model`` is used) and samples as many records
as there are training patients, their conditions drawn from the training cells. For each time
variable it prints and writes to ``DIR/time_fidelity.json``:

- the 1-Wasserstein distance between the bin-index distributions of the synthetic and the training
  records (``scipy.stats.wasserstein_distance`` on the 0-based bin indices: the mean number of
  bins the mass must move), beside its ceiling, the same distance between held-out and training
  records (what a fresh real sample achieves);
- how often the token is where the format puts it: records whose first visit holds exactly one
  age token, later visits holding exactly one gap token, and tokens on the wrong visit.

``--figure PNG`` saves the three distributions side by side (bars per bin).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from data_prep.time_tokens import VARIABLES, time_token_table
from halo_balance.cli import run
from halo_balance.data import PreparedDataset
from halo_balance.errors import DatasetError
from halo_balance.io import write_json


def time_distributions(ds: PreparedDataset) -> dict[str, Any]:
    """Per variable: the bin of every token where the format puts it, and placement counts."""
    t = time_token_table(ds)
    first = pl.col("visit_index") == 0
    out: dict[str, Any] = {}
    n_first, n_later = ds.n_patients, ds.n_visits - ds.n_patients
    for var, where, n_slots in (("age", first, n_first), ("gap", ~first, n_later)):
        v = t.filter(pl.col("variable") == var)
        placed = v.filter(where)
        per_slot = placed.group_by("patient_id", "visit_index").len()
        out[var] = {"bins": placed["bin"].to_numpy(), "slots": n_slots,
                    "slots_with_one_token": int((per_slot["len"] == 1).sum()),
                    "slots_with_several": int((per_slot["len"] > 1).sum()),
                    "tokens_on_wrong_visit": v.filter(~where).height}
    return out


def w1(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def compare(train: PreparedDataset, holdout: PreparedDataset, synthetic: PreparedDataset,
            n_bins: dict[str, int]) -> dict[str, Any]:
    d = {name: time_distributions(ds) for name, ds in (("train", train), ("holdout", holdout),
                                                          ("synthetic", synthetic))}
    report: dict[str, Any] = {}
    for var in VARIABLES:
        tr, ho, sy = (d[k][var] for k in ("train", "holdout", "synthetic"))
        freq = {k: (np.bincount(d[k][var]["bins"], minlength=n_bins[var]) / max(len(d[k][var]["bins"]), 1)).tolist()
                for k in d}
        report[var] = {"w1_synthetic_vs_train": w1(sy["bins"], tr["bins"]),
                       "w1_holdout_vs_train": w1(ho["bins"], tr["bins"]),
                       "mean_bin": {k: float(np.mean(d[k][var]["bins"])) if len(d[k][var]["bins"]) else None
                                    for k in d},
                       "frequencies": freq,
                       **{k: {f: v for f, v in d[k][var].items() if f != "bins"} for k in d}}
    return report


def plot(report: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.9), dpi=90)
    labels = {"train": "training", "holdout": "held-out real", "synthetic": "synthetic"}
    for ax, var in zip(axes, VARIABLES):
        freq = report[var]["frequencies"]
        x = np.arange(len(freq["train"]))
        for i, (k, name) in enumerate(labels.items()):
            ax.bar(x + (i - 1) * 0.27, freq[k], width=0.27, label=name)
        r = report[var]
        ax.set_title(f"{VARIABLES[var][1]}\nW1 synthetic {r['w1_synthetic_vs_train']:.3f}, "
                     f"held-out {r['w1_holdout_vs_train']:.3f} (bins)", fontsize=8)
        ax.set_xticks(x)
        ax.set_xlabel("bin", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("share of tokens", fontsize=8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    save_figure(fig, path, dpi="figure", bbox_inches=None)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset with time tokens")
    p.add_argument("--out", required=True, type=Path, help="folder for the splits, model, samples and report")
    p.add_argument("--model", default=None, help="a trained model to sample from (default: train one on the split)")
    p.add_argument("--preset", default="small", help="model preset when training (default small)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs when training (default: train's)")
    p.add_argument("--holdout-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--figure", type=Path, default=None, help="save the distributions as this PNG")
    a = p.parse_args(argv)
    from halo_balance.model import HaloModel
    from halo_balance.sample import sample_records
    from halo_balance.train import TrainOptions, train_model

    ds = PreparedDataset.load(a.data)
    bins = ds.meta.get("preprocessing", {}).get("time_bins")
    if not bins:
        raise DatasetError("has no time tokens", file=str(Path(a.data) / "meta.json"),
                           column="preprocessing.time_bins", fix="prepare it with --time-bins 10")
    n_bins = {var: len(bins[VARIABLES[var][0]]) + 1 for var in VARIABLES}
    tr_ids, ho_ids = ds.train_test_split(a.holdout_fraction, seed=a.seed)
    train, holdout = ds.select(tr_ids), ds.select(ho_ids)
    if a.model:
        model = HaloModel.from_pretrained(a.model)
    else:
        opts = {"preset": a.preset, "seed": a.seed, "device": a.device, "overwrite": True}
        if a.epochs:
            opts["epochs"] = a.epochs
        model = train_model(train, out_dir=a.out / "model", options=TrainOptions(**opts))
    conditions = model.layout.complete({}, train.n_patients, seed=a.seed)
    synthetic = sample_records(model, conditions, seed=a.seed, device=a.device)
    report = {"data": str(a.data), "model": a.model or str(a.out / "model"), "seed": a.seed,
              "n_train": train.n_patients, "n_holdout": holdout.n_patients, "n_synthetic": synthetic.n_patients,
              "visits": {"train": train.n_visits, "holdout": holdout.n_visits, "synthetic": synthetic.n_visits},
              "time_bins": bins, **compare(train, holdout, synthetic, n_bins)}
    write_json(a.out / "time_fidelity.json", report)
    print(f"{'variable':<9} {'W1 synthetic':>13} {'W1 held-out':>12} {'mean bin tr/ho/syn':>22} "
          f"{'one token (syn)':>16} {'several':>8} {'wrong visit':>12}")
    for var in VARIABLES:
        r = report[var]
        m = r["mean_bin"]
        s = r["synthetic"]
        print(f"{var:<9} {r['w1_synthetic_vs_train']:>13.3f} {r['w1_holdout_vs_train']:>12.3f} "
              f"{m['train']:>7.2f}/{m['holdout']:.2f}/{m['synthetic']:.2f} "
              f"{s['slots_with_one_token']:>7,}/{s['slots']:<8,} {s['slots_with_several']:>8,} "
              f"{s['tokens_on_wrong_visit']:>12,}")
    print(f"records: training {train.n_patients:,} ({train.n_visits:,} visits), held out {holdout.n_patients:,}, "
          f"synthetic {synthetic.n_patients:,} ({synthetic.n_visits:,} visits)")
    if a.figure:
        plot(report, a.figure, f"time tokens: {Path(a.data).name}, {synthetic.n_patients:,} synthetic records")
        print(f"figure: {a.figure}")
    return report


if __name__ == "__main__":
    run(main)
