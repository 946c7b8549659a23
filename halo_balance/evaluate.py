"""Evaluate synthetic records against the generator's training data: fidelity and privacy.

``python -m halo_balance.evaluate --real TRAIN --synthetic SYNTHETIC [--holdout HELD_OUT]
[--model MODEL_DIR] --out REPORT`` writes ``REPORT/report.json`` and ``REPORT/report.md``.

The report opens with a plain-language privacy verdict built from every attack, the worst one named
next to its baseline (:func:`halo_balance.privacy.privacy_verdict`).

``--real`` is the data the generator was trained on. ``--holdout`` holds real patients it never saw
(``python -m halo_balance.split`` makes both): they give the real reference of every fidelity
figure and the non-members of the membership attacks. The reference is the same figure computed
for a fresh real sample instead of the synthetic one: held-out patients, drawn (seeded) to the
synthetic data's size when there are enough of them, since every figure depends on sample size;
with fewer, all of them, and the report says that a larger synthetic sample may beat the
reference by size alone. Without ``--holdout``, ``--real`` is split into two stratified halves
(one plays the training data, a sample of the other the fresh sample), the membership attacks are
skipped, and the report says so. With ``--model`` the likelihood membership attack runs too. Every
membership attack also runs within each outcome x group cell of ``--cells``.

Rows flagged ``synthetic`` in ``--real`` / ``--holdout`` and real rows in ``--synthetic`` (an
augmented output holds both) are set aside and counted in the report.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from . import __version__
from .data import PreparedDataset
from .errors import DatasetError
from .fidelity import STATISTICS, fidelity_report
from .io import atomic_dir, atomic_write_bytes, check_output_dir, read_json, write_json
from .privacy import CELL_FAMILY_ERROR, MAX_QUERIES, VERDICT_LEVELS, Metric, privacy_report, privacy_verdict

REPORT_FORMAT = "halo_balance.evaluate/2"  # 2: "ceiling" figures renamed "reference", size-matched
MAX_CELL_ROWS = 10  # per-cell attacks listed in the verdict table (all of them are in the per-cell table)


def evaluate(real: PreparedDataset, synthetic: PreparedDataset, *, holdout: PreparedDataset | None = None,
             model: Any = None, log_likelihood: Callable[[PreparedDataset], np.ndarray] | None = None,
             seed: int = 0, metric: Metric = "jaccard", k: int = 5,
             min_cell_records: int = 20, cells: Sequence[Sequence[str]] | None = None,
             sensitive_tokens: Sequence[str] = (), max_queries: int | None = MAX_QUERIES, batch_size: int = 256,
             device: str = "auto", not_members: Sequence[str] = ()) -> dict[str, Any]:
    """Fidelity and privacy of ``synthetic`` against the generator's training data ``real``.

    Parameters
    ----------
    real : PreparedDataset
        The generator's training patients.
    synthetic : PreparedDataset
        Generated patients (an augmented dataset works too: only its synthetic rows are used).
    holdout : PreparedDataset, optional
        Real patients the generator never saw; without them ``real`` is split in halves for the
        reference (``seed``, stratified by outcome x groups) and the membership attacks are skipped.
    model : HaloModel, optional
        The generator, for the likelihood membership attack (``halo_balance.train.dataset_log_likelihood``).
    log_likelihood : callable, optional
        ``dataset -> per-patient log-likelihood``; replaces ``model`` (e.g. another generator).
    seed : int
        Seed of the half split and of the privacy samples.
    metric : {"jaccard", "hamming"}
        Distance between the token sets of two records.
    k : int
        Neighbours that vote in the attribute-inference attack.
    min_cell_records : int
        A cell's R^2 needs at least this many records on both compared sides, and its membership
        attacks at least this many members and non-members.
    cells : sequence of sequences of str, optional
        Group attributes crossed with the outcome to form cells (fidelity and membership per cell);
        default: each attribute alone.
    sensitive_tokens : sequence of str
        Tokens whose presence the attribute-inference attacker also tries to infer.
    max_queries : int or None
        Privacy distances query at most this many records per side (a seeded sample; ``None``: all);
        the records searched are always complete.
    batch_size, device : int, str
        For the model's likelihood.
    not_members : sequence of str
        Ids of ``real`` patients the generator was not fitted on (its early-stopping patients,
        ``validation_patient_ids`` of the model's ``training.json``): left out of the membership
        attacks' members, kept everywhere else.

    Returns
    -------
    dict
        ``format``, ``created``, ``parameters``, ``versions``, ``data`` (sizes and set-aside rows),
        ``notes``, ``fidelity`` (see :func:`halo_balance.fidelity.fidelity_report`), ``privacy``
        (see :func:`halo_balance.privacy.privacy_report`; its ``verdict`` from
        :func:`halo_balance.privacy.privacy_verdict`, with the model's differential-privacy
        guarantee when it has one) and ``elapsed_seconds``.
    """
    start = time.perf_counter()
    notes: list[str] = []
    data: dict[str, Any] = {}
    real = _rows_of(real, synthetic=False, role="real", data=data)
    synthetic = _rows_of(synthetic, synthetic=True, role="synthetic", data=data)
    _check_compatible(real, synthetic, "synthetic")
    if holdout is not None:
        holdout = _rows_of(holdout, synthetic=False, role="holdout", data=data)
        _check_compatible(real, holdout, "holdout")
        overlap = set(real.patients["patient_id"].to_list()) & set(holdout.patients["patient_id"].to_list())
        if overlap:
            raise DatasetError(f"{len(overlap)} patient ids are both in the training data and the held-out data",
                               column="patient_id", value=sorted(overlap)[0],
                               fix="pass held-out patients the generator never saw")
        fresh = _sample_of(holdout, synthetic.n_patients, seed=seed)
        reference = (real, fresh)
        victims_and_reference = None
        notes.append(f"Real references compare the training data with {fresh.n_patients} held-out patients "
                     "(--holdout) in place of the synthetic ones" + _size_note(fresh, synthetic))
    else:
        half_a, half_b = real.train_test_split(0.5, seed=seed)
        victims_and_reference = (real.select(half_a), real.select(half_b))
        fresh = _sample_of(victims_and_reference[1], synthetic.n_patients, seed=seed)
        reference = (victims_and_reference[0], fresh)
        data["halves"] = {"a": reference[0].n_patients, "b": victims_and_reference[1].n_patients, "seed": seed}
        notes.append(f"No held-out data was given: real references compare half a of the training data with "
                     f"{fresh.n_patients} patients of half b" + _size_note(fresh, synthetic) + " The membership "
                     "attacks are skipped; attribute inference attacks half a and uses half b as the reference "
                     "attacker's data.")
    data["reference"] = {"patients": fresh.n_patients, "synthetic_patients": synthetic.n_patients}
    members = None
    is_left_out = pl.col("patient_id").is_in(pl.Series(list(not_members), dtype=pl.String).implode())
    left_out = real.patients.filter(is_left_out)["patient_id"]
    if len(left_out):
        members = real.select(real.patients.filter(~is_left_out)["patient_id"])
        data["not_members"] = len(left_out)
        notes.append(f"{len(left_out)} patients of the training data were the generator's early-stopping "
                     "patients (never fitted): the membership attacks leave them out of the members.")
    if log_likelihood is None and model is not None:
        log_likelihood = _model_log_likelihood(model, batch_size=batch_size, device=device)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parameters": {"seed": seed, "metric": metric, "k": k, "min_cell_records": min_cell_records,
                       "cells": None if cells is None else [list(c) for c in cells],
                       "sensitive_tokens": list(sensitive_tokens), "max_queries": max_queries,
                       "r2": "sklearn r2_score(real, synthetic) over the union of keys, missing = 0",
                       "likelihood": log_likelihood is not None},
        "versions": _versions(with_torch=model is not None),
        "data": data,
        "notes": notes,
        "fidelity": fidelity_report(real, synthetic, reference=reference, cells=cells,
                                    min_cell_records=min_cell_records),
        "privacy": privacy_report(real, synthetic, holdout=holdout, log_likelihood=log_likelihood,
                                  victims_and_reference=victims_and_reference, metric=metric, k=k,
                                  sensitive_tokens=sensitive_tokens, max_queries=max_queries, seed=seed,
                                  members=members, cells=cells, min_cell_patients=min_cell_records),
    }
    report["privacy"]["verdict"] = privacy_verdict(report["privacy"], dp=getattr(model, "privacy", None))
    for side, (n, total) in report["privacy"]["sampled"].items():
        notes.append(f"Privacy distances used a random sample of {n} of the {total} {side} records as queries.")
    report["elapsed_seconds"] = round(time.perf_counter() - start, 3)
    return report


def _sample_of(ds: PreparedDataset, n: int, *, seed: int) -> PreparedDataset:
    """``n`` patients of ``ds`` drawn with ``seed`` (all of them when it has no more)."""
    if ds.n_patients <= n:
        return ds
    ids = ds.patients["patient_id"].to_numpy()
    return ds.select(np.random.default_rng(seed).choice(ids, size=n, replace=False))


def _size_note(fresh: PreparedDataset, synthetic: PreparedDataset) -> str:
    if fresh.n_patients < synthetic.n_patients:
        return (f": fewer than the {synthetic.n_patients} synthetic patients, so a synthetic figure may beat "
                "its reference by sample size alone.")
    return ", as many as the synthetic patients."


def _rows_of(ds: PreparedDataset, *, synthetic: bool, role: str, data: dict[str, Any]) -> PreparedDataset:
    """The rows of ``ds`` flagged ``synthetic`` (all rows when none is), the others counted as set aside."""
    flags = ds.patients["synthetic"]
    wanted = int((flags == synthetic).sum())
    info: dict[str, Any] = {"patients": ds.n_patients, "set_aside": None}
    if 0 < wanted < ds.n_patients:
        ds = ds.select(ds.patients.filter(pl.col("synthetic") == synthetic)["patient_id"])
        info = {"patients": ds.n_patients,
                "set_aside": {"reason": f"rows flagged synthetic={not synthetic}", "patients": len(flags) - wanted}}
    if ds.n_patients == 0:
        raise DatasetError(f"the {role} data holds no patients")
    data[role] = {**info, "visits": ds.n_visits, "flagged_synthetic": bool(ds.patients["synthetic"].all())}
    return ds


def _check_compatible(real: PreparedDataset, other: PreparedDataset, role: str) -> None:
    if not other.vocab.select("id", "token").equals(real.vocab.select("id", "token")):  # descriptions may differ
        raise DatasetError(f"the {role} data uses another vocabulary than the real data", file="vocab.parquet",
                           fix="compare datasets prepared (or generated) with one vocabulary")
    if other.group_categories != real.group_categories:
        raise DatasetError(f"the {role} data has other group attributes than the real data", file="meta.json",
                           value=other.group_categories)


def _model_log_likelihood(model: Any, *, batch_size: int, device: str) -> Callable[[PreparedDataset], np.ndarray]:
    from .train import dataset_log_likelihood

    return lambda ds: dataset_log_likelihood(model, ds, batch_size=batch_size, device=device)


def _versions(*, with_torch: bool) -> dict[str, str]:
    names = ["numpy", "scipy", "scikit-learn", "polars"] + (["torch"] if with_torch else [])
    return {"halo_balance": __version__, "python": platform.python_version(),
            **{n: metadata.version(n) for n in names}}


# ---------------------------------------------------------------------- markdown
def render_markdown(report: dict[str, Any]) -> str:
    """The report as a human-readable markdown page."""
    fid, priv, data = report["fidelity"], report["privacy"], report["data"]
    verdict = priv["verdict"]
    lines = ["# Synthetic data evaluation", "",
             f"Created {report['created']} by halo_balance {report['versions']['halo_balance']} "
             f"(seed {report['parameters']['seed']}, {report['elapsed_seconds']} s).", "",
             "## Privacy verdict", "", f"**{verdict['text']}**", "",
             "| attack | result | baseline | grade |", "| --- | ---: | ---: | --- |"]
    graded_cells = sorted((a for a in verdict["attacks"] if a.get("cell") and a["level"] != VERDICT_LEVELS[0]),
                          key=lambda a: -a["severity"])
    for a in [a for a in verdict["attacks"] if not a.get("cell")] + graded_cells[:MAX_CELL_ROWS]:
        value = f"{a['value']:.0f}" if a["kind"] == "rare_copies" else f"{a['value']:.3f}"
        if a.get("se") is not None:
            value += f" (se {a['se']:.3f}" + (f"; code frequencies {a['code_frequency']:.3f})"
                                              if a.get("code_frequency") is not None else ")")
        base = {"auroc": "0.500 (chance)", "rare_copies": "0"}.get(a["kind"], f"{a['baseline']:.3f}")
        lines.append(f"| {_cell(a['attack'])} | {value} | {base} | {a['level']} |")
    ca = verdict.get("cell_attacks") or {}
    if ca.get("attacks"):
        lines += ["", f"The membership attacks also ran within each of {ca['cells']} outcome x group cells "
                  f"({ca['attacks']} attacks; table below); a cell's AUROC counts only where Holm's step-down "
                  f"procedure over all of them rules chance out ({CELL_FAMILY_ERROR:.0%} family-wise; the strongest "
                  f"must pass {ca['z']:.2f} standard errors, the next a little less). "
                  + (f"{len(graded_cells)} of them graded above '{VERDICT_LEVELS[0]}'; the table lists "
                     f"{'them' if len(graded_cells) <= MAX_CELL_ROWS else f'the {MAX_CELL_ROWS} strongest'}."
                     if graded_cells else "None of them does measurably better than chance.")]
    lines.append("")
    for role in ("real", "synthetic", "holdout"):
        if role in data:
            d = data[role]
            aside = d["set_aside"]
            extra = f"; {aside['patients']} patients set aside ({aside['reason']})" if aside else ""
            lines.append(f"- **{role}**: {d['patients']} patients, {d['visits']} visits{extra}")
    lines += [f"- note: {n}" for n in report["notes"]] + ["", "## Fidelity", "",
              "R^2 is `r2_score(real, synthetic)` over the union of keys (a key missing on one side "
              "counts as 0), as HALO reports it. The real reference is the same figure for a fresh real sample "
              f"({data['reference']['patients']} patients the generator never saw) in place of the synthetic "
              "one: what real data of that size achieves; it is no ceiling.",
              "", "| statistic | R^2 synthetic vs real | real reference | keys (real / synthetic) |",
              "| --- | ---: | ---: | ---: |"]
    for name in STATISTICS:
        s = fid["statistics"][name]
        lines.append(f"| {name} | {_f(s['r2'])} | {_f(s['reference_r2'])} | {s['keys_real']} / {s['keys_synthetic']} |")
    lines += ["", "| distribution | real mean (sd) | synthetic mean (sd) | Wasserstein | real reference Wasserstein |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("record_length", "visit_size"):
        d = fid[name]
        lines.append(f"| {name.replace('_', ' ')} | {_ms(d['real'])} | {_ms(d['synthetic'])} | "
                     f"{_f(d['wasserstein'])} | {_f(d['reference_wasserstein'])} |")
    lines += ["", f"Outcome rate: real {_f(fid['label_rate']['real'])}, synthetic "
              f"{_f(fid['label_rate']['synthetic'])}.", "",
              "| group | real share | synthetic share |", "| --- | ---: | ---: |"]
    for attr, cats in fid["group_rates"].items():
        lines += [f"| {attr}={c} | {_f(v['real'])} | {_f(v['synthetic'])} |" for c, v in cats.items()]
    lines += ["", "Per cell (outcome x group). Shares differ by design when the synthetic data tops up small "
              "cells; R^2 needs enough records on both sides (`-` otherwise).", "",
              "| cell | n real | n synthetic | unigram/visit R^2 (reference) | unigram/record R^2 (reference) | "
              "visits per record real / synthetic |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for c in fid["cells"]:
        lines.append(f"| {_cell(c['cell'])} | {c['n_real']} | {c['n_synthetic']} | {_f(c['unigram_per_visit'])} "
                     f"({_f(c['unigram_per_visit_reference'])}) | {_f(c['unigram_per_record'])} "
                     f"({_f(c['unigram_per_record_reference'])}) | {_f(c['mean_record_length_real'])} / "
                     f"{_f(c['mean_record_length_synthetic'])} |")
    cp, nn, mia, ai = (priv["exact_copies"], priv["nearest_neighbour"], priv["membership_inference"],
                       priv["attribute_inference"])
    lines += ["", "## Privacy", "",
              f"- **Exact copies**: {cp['synthetic_copies']} of {cp['synthetic_records']} synthetic records equal a "
              f"training record ({cp['training_records_copied']} distinct training records; "
              f"{cp['copies_of_unique_records']} of these copies reproduce a record that occurs only once in the "
              f"training data); the training data itself holds {cp['training_duplicates']} duplicate records"
              + (f"; {cp['holdout_equal_to_training']} of {cp['holdout_records']} held-out records equal a "
                 "training record." if "holdout_records" in cp else ".")]
    base = nn["baseline"]
    lines += [f"- **Nearest-neighbour {nn['metric']} distance** to the training records (on each record's token "
              f"set): synthetic median {_f(nn['synthetic_to_train'].get('median'))}, {base.replace('_', ' ')} "
              f"median {_f(nn[base].get('median'))} (ratio {_f(nn['median_ratio'])}); distance 0: synthetic "
              f"{_f(nn['synthetic_to_train']['fraction_zero'])}, baseline {_f(nn[base]['fraction_zero'])}."]
    for how in ("distance", "likelihood"):
        m = mia[how]
        if "skipped" in m:
            lines.append(f"- **Membership inference by {how}**: skipped ({m['skipped']}).")
            continue
        ref = m.get("code_frequency", {})
        for name, fig, ref_fig in ((how, m, ref), (f"{how} per token (log-likelihood / (tokens + visits))",
                                                   m.get("per_event"), ref.get("per_event"))):
            if fig is not None:
                lines.append(f"- **Membership inference by {name}**: AUROC {_f(fig['auroc'])} (0.5 = no better than "
                             f"chance; TPR at 10% FPR {_f(fig['tpr_at_fpr_0.1'])}; {fig['n_members']} members, "
                             f"{fig['n_nonmembers']} non-members)"
                             + (f"; the code-frequency model of the same members: AUROC {_f(ref_fig['auroc'])}."
                                if ref_fig else "."))
    if mia["likelihood"].get("code_frequency"):
        lines.append("- The **code-frequency model** (each code an independent Bernoulli of its visit frequency "
                     "among the members) knows the training patients only through their code counts: its "
                     "attack is what such a summary reveals, a reference for the generator's.")
    lines += _cell_membership_lines(mia.get("cells", []))
    lines += ["", f"Attribute inference: a {ai['k']}-nearest-neighbour attacker who knows a training patient's "
              "tokens predicts the hidden attribute from the synthetic records; the majority guess is the training "
              "data's most frequent value; the reference attacker uses real patients outside the training data "
              "instead. Accuracy (balanced accuracy); advantage: the attacker's balanced accuracy minus the better "
              "baseline.", "",
              "| attribute | attacker on synthetic | majority guess | attacker on real reference | advantage |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, a in ai["attributes"].items():
        ref = a.get("reference")
        lines.append(f"| {name} | {_acc(a['attacker'])} | {_acc(a['majority'])} | {_acc(ref) if ref else '-'} | "
                     f"{a['advantage']:+.3f} |")
    return "\n".join(lines) + "\n"


def _cell_membership_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The per-cell membership table, then the cells too small to attack."""
    attacked = [c for c in cells if c["attacks"]]
    if not attacked:
        return []
    names, refs = list(attacked[0]["attacks"]), list(attacked[0].get("code_frequency", {}))
    lines = ["", "Membership inference within each cell (that cell's members against its non-members), AUROC "
             "(standard error):", "", "| cell | members | non-members | " + " | ".join(names)
             + "".join(f" | {n}, code frequencies" for n in refs) + " |",
             "| --- | ---: | ---: |" + " ---: |" * (len(names) + len(refs))]
    for c in attacked:
        figs = [f"{_f(c['attacks'][n]['auroc'])} ({_f(c['attacks'][n]['auroc_se'])})" for n in names]
        figs += [_f(c["code_frequency"][n]["auroc"]) for n in refs]
        lines.append(f"| {_cell(c['cell'])} | {c['n_members']} | {c['n_nonmembers']} | " + " | ".join(figs) + " |")
    skipped = [c for c in cells if not c["attacks"]]
    if skipped:
        lines += ["", f"{len(skipped)} cells with {skipped[0]['skipped']} were not attacked: "
                  + ", ".join(f"{c['cell']} ({c['n_members']} / {c['n_nonmembers']})" for c in skipped) + "."]
    return lines


def _cell(text: str) -> str:
    """Text for a markdown table cell: cell names such as ``label=1|race=Other`` hold the column separator."""
    return text.replace("|", "\\|")


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ms(d: dict[str, Any]) -> str:
    return f"{d['mean']:.2f} ({d['std']:.2f})" if d.get("n") else "-"


def _acc(a: dict[str, float]) -> str:
    return f"{a['accuracy']:.3f} ({a['balanced_accuracy']:.3f})"


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m halo_balance.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, type=Path, help="prepared dataset the generator was trained on")
    p.add_argument("--synthetic", required=True, type=Path, help="prepared dataset of generated patients")
    p.add_argument("--holdout", type=Path, help="prepared dataset of real patients the generator never saw")
    p.add_argument("--model", type=Path, help="trained model folder, for the likelihood membership attack")
    p.add_argument("--out", required=True, type=Path, help="report folder to write (report.json, report.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the half split without --holdout")
    p.add_argument("--metric", choices=["jaccard", "hamming"], default="jaccard")
    p.add_argument("--k", type=int, default=5, help="neighbours of the attribute-inference attacker")
    p.add_argument("--min-cell-records", type=int, default=20,
                   help="a cell's R^2 needs this many records per side, its membership attacks this many "
                        "members and non-members")
    p.add_argument("--cells", action="append", metavar="ATTR[,ATTR...]",
                   help="group attributes crossed with the outcome per cell table and per-cell membership "
                        "attack (repeatable); default: each attribute alone")
    p.add_argument("--sensitive-token", action="append", default=[], metavar="TOKEN",
                   help="a token whose presence the attribute attacker infers (repeatable)")
    p.add_argument("--max-queries", type=int, default=MAX_QUERIES,
                   help="privacy distances query at most this many records per side (0: all)")
    p.add_argument("--batch-size", type=int, default=256, help="records per likelihood batch")
    p.add_argument("--device", default="auto", help="device for the likelihood (auto, cpu, cuda)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_output_dir(args.out, overwrite=args.overwrite, what="--out",
                     inputs=[args.real, args.synthetic, args.holdout, args.model])
    real = PreparedDataset.load(args.real)
    synthetic = PreparedDataset.load(args.synthetic)
    holdout = PreparedDataset.load(args.holdout) if args.holdout else None
    model, not_members = None, []
    if args.model:
        from .model import HaloModel, model_folder
        from .train import TRAINING_FILE

        model = HaloModel.from_pretrained(args.model)
        if (model_folder(args.model) / TRAINING_FILE).is_file():
            not_members = read_json(model_folder(args.model) / TRAINING_FILE).get("validation_patient_ids", [])
    report = evaluate(real, synthetic, holdout=holdout, model=model, seed=args.seed, metric=args.metric, k=args.k,
                      min_cell_records=args.min_cell_records,
                      cells=[c.split(",") for c in args.cells] if args.cells else None,
                      sensitive_tokens=args.sensitive_token, max_queries=args.max_queries or None,
                      batch_size=args.batch_size, device=args.device, not_members=not_members)
    report["inputs"] = {"real": str(args.real), "synthetic": str(args.synthetic),
                        "holdout": None if args.holdout is None else str(args.holdout),
                        "model": None if args.model is None else str(args.model)}
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        write_json(tmp / "report.json", report)
        atomic_write_bytes(tmp / "report.md", render_markdown(report).encode())
    uni = report["fidelity"]["statistics"]["unigram_per_visit"]
    mia = report["privacy"]["membership_inference"]["distance"]
    print(f"privacy verdict: {report['privacy']['verdict']['text']}")
    print(f"unigram R^2 {_f(uni['r2'])} (real reference {_f(uni['reference_r2'])}); exact copies "
          f"{report['privacy']['exact_copies']['synthetic_copies']}; distance MIA AUROC {_f(mia.get('auroc'))}")
    print(f"report written to {args.out}/report.md and report.json")
    return report


if __name__ == "__main__":
    from .cli import run

    run(main)
