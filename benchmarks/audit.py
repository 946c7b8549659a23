"""The fairness audit of a k-fold run, or of any model's predictions: one self-contained HTML report
with uncertainty.

::

    python -m benchmarks.audit (--run DIR | --predictions FILE --groups ATTR ...) --out REPORT.html
        [--resamples 1000] [--permutations 1000] [--seed 0] [--level 0.95] [--reference METHOD]
        [--focus-model MODEL] [--aggregate fold_mean|pooled] [--thresholds 0.05,0.1,...] [--bins 10]
        [--no-auroc] [--min-deaths 10] [--fairness-min-share S] [--groups ATTR ...] [--threshold 0.5]
        [--overwrite]

``DIR`` is the ``--out`` folder of ``benchmarks.kfold`` (``predictions.parquet`` and ``run.json``).
``FILE`` holds predictions made anywhere else (:func:`load_predictions`), a parquet or CSV file with
one row per scored patient or visit: ``patient_id``, the ``--groups`` columns, ``y_true`` (0/1) and
``score`` (the predicted probability of the positive class), and optionally ``prediction`` (0/1;
default ``score > --threshold``, 0.5), ``fold`` (default: one fold), ``method`` (default
``original``), ``model`` (default ``model``) and ``visit_index`` (default: the rows of a patient in
file order). With one fold, the audited patients' group sizes stand in for the training sizes of
the disparate impact, and no group is left out of the fairness measures unless
``--fairness-min-share`` says so.
The report holds, for every group attribute (and the intersection of several):

* per-group F1, precision, TPR, FPR, underdiagnosis rate, AUROC and calibration error with
  patient-level bootstrap confidence intervals (:mod:`benchmarks.stats`);
* FPR, underdiagnosis, F1 and calibration gaps to the largest group with intervals and
  permutation p-values, as gap charts with error bars;
* FairPlay's fairness measures (disparate impact, Theil index, ...) in both aggregations (per unit
  then averaged, and the paper's, on the mean group F1s) with intervals, and every
  method's change against Original in F1, Theil and disparate impact with paired permutation
  p-values and Benjamini-Hochberg q-values;
* the min-max underdiagnosis and FPR gaps of every method (mitigation strategy) per attribute beside
  its AUROC, with the paired permutation test of the change against Original (the CT fairness
  audit's Figure 3), over models and per model;
* calibration curves per group and a threshold sweep of per-group TPR / FPR (does a gap persist at
  every threshold?) for one downstream model (``--focus-model``).

Groups with fewer than ``--min-deaths`` deaths among the test patients are flagged (†) in the tables
and left out of the charts: a handful of patients decide their intervals and p-values.

Plots are PNG (matplotlib, Agg backend) embedded as base64, so the file opens anywhere; a table of
contents leads to every section and tables longer than ``LONG_TABLE_ROWS`` rows fold away. Beside the
report, ``REPORT`` with the suffix ``.parquet`` holds every statistic as one tidy table. Every option
and the output path are checked before any work; nothing is written on an error.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from halo_balance.errors import DatasetError, HaloBalanceError, OutputExistsError, did_you_mean, unknown_choice
from halo_balance.io import atomic_write_bytes, check_writable, read_json

from .calibration import DEFAULT_THRESHOLDS, calibration_curve_by_group
from .metrics import group_header
from .stats import ALL, MODEL_MEAN, RANGE, REQUIRED_COLUMNS, AuditTables, Design, audit_statistics, \
    bootstrap_threshold_sweep

METRIC_LABELS = {"f1": "F1", "precision": "precision", "tpr": "TPR", "fpr": "FPR", "underdiagnosis": "UDR",
                 "selection_rate": "selection rate", "calibration_error": "ECE", "auroc": "AUROC",
                 "di_weighted": "DI weighted (units)", "di_averaged": "DI averaged (units)", "theil": "Theil (units)",
                 "f1_variance": "F1 variance (units)", "di_weighted_of_means": "DI weighted (paper)",
                 "di_averaged_of_means": "DI averaged (paper)", "theil_of_means": "Theil (paper)",
                 "f1_sd_of_means": "F1 SD (paper)", "equalized_odds": "eq. odds", "equal_opportunity": "eq. opp.",
                 "fpr_difference": "FPR range", "demographic_parity": "dem. parity", "calibration_gap": "ECE range"}
SIGNIFICANCE = 0.05
LONG_TABLE_ROWS = 15  # longer tables are collapsed (<details>) under a one-line summary
# columns a predictions file may leave out, and what stands in for them (see load_predictions)
DEFAULT_METHOD, DEFAULT_MODEL = "original", "model"


# ---------------------------------------------------------------------- inputs
def load_run(run_dir: str | os.PathLike, *, groups: Sequence[str] | None = None) -> tuple[pl.DataFrame, dict]:
    """The predictions of a k-fold run and its ``run.json`` (``{}`` when absent, then ``groups`` is needed)."""
    run_dir = Path(run_dir)
    path = run_dir / "predictions.parquet"
    if not path.is_file():
        raise HaloBalanceError(f"{path} not found; pass the --out folder of a finished "
                               "`python -m benchmarks.kfold` run")
    meta = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    if groups is None and "groups" not in meta:
        raise HaloBalanceError(f"{run_dir / 'run.json'} is missing, so the group attributes are unknown; pass --groups")
    return pl.read_parquet(path), meta


def load_predictions(path: str | os.PathLike, *, groups: Sequence[str], threshold: float = 0.5) -> pl.DataFrame:
    """A predictions file made outside ``benchmarks.kfold``, completed to the harness's columns.

    Parameters
    ----------
    path : a ``.parquet`` or ``.csv`` file, one row per scored patient (or visit) and, when it
        holds several, per method and model.
    groups : the group attribute columns to audit.
    threshold : the decision threshold when the file has no ``prediction`` column
        (``prediction = score > threshold``, as in the harness).

    Required columns: ``patient_id``, ``groups``, ``y_true`` (0/1), ``score`` (probability of the
    positive class). Optional: ``prediction`` (0/1), ``fold`` (default 0: one fold), ``method``
    (default ``original``), ``model`` (default ``model``), ``visit_index`` (default: a patient's rows
    numbered in file order).
    """
    path = Path(path)
    if not path.is_file():
        raise HaloBalanceError(f"{path} not found; pass a predictions file (.parquet or .csv)")
    strings = {c: pl.String for c in ("patient_id", "method", "model", *groups)}
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            frame = pl.read_csv(path, schema_overrides=strings, infer_schema_length=None)
        else:
            raise HaloBalanceError(f"{path}: unknown file type {path.suffix!r}; write the predictions as .parquet "
                                   "or .csv")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DatasetError(f"cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})", file=str(path),
                           fix="write the predictions with polars or pandas (to_parquet / to_csv)") from None
    missing = [c for c in ("patient_id", *groups, "y_true", "score") if c not in frame.columns]
    if missing:
        raise DatasetError("missing column(s) " + ", ".join(f"{c!r}{did_you_mean(c, frame.columns)}" for c in missing)
                           + f"; it has {', '.join(frame.columns)}", file=str(path),
                           fix="name the columns patient_id, y_true, score and the --groups attributes")
    defaults = {"fold": pl.lit(0, pl.Int32), "method": pl.lit(DEFAULT_METHOD), "model": pl.lit(DEFAULT_MODEL),
                "prediction": (pl.col("score") > threshold).cast(pl.Int8)}
    frame = frame.with_columns(v.alias(c) for c, v in defaults.items() if c not in frame.columns)
    frame = frame.with_columns(pl.col("patient_id", "method", "model", *groups).cast(pl.String),
                               *(pl.col(c).cast(pl.Int8) for c in ("y_true", "prediction")
                                 if frame.schema[c] == pl.Boolean))
    if "visit_index" not in frame.columns:
        frame = frame.with_columns(visit_index=pl.int_range(pl.len()).over("method", "model", "patient_id"))
    dup = frame.filter(pl.struct("method", "model", "patient_id", "visit_index").is_duplicated())
    if dup.height:
        raise DatasetError("a (method, model, patient_id, visit_index) occurs more than once", file=str(path),
                           value=dup.row(0, named=True)["patient_id"],
                           fix="give each row of a patient its own visit_index, or keep one row per patient")
    return frame.select(*REQUIRED_COLUMNS, *groups)


# ---------------------------------------------------------------------- formatting
def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(est: float | None, lo: float | None, hi: float | None, digits: int = 3) -> str:
    """``0.412 [0.351, 0.470]``; ``n/a`` when undefined."""
    if est is None or math.isnan(est):
        return "n/a"
    if lo is None or hi is None or math.isnan(lo) or math.isnan(hi):
        return _num(est, digits)
    return f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _ci(row: dict | None, *, bold_if_significant: bool = False) -> str:
    """A table row's ``estimate [ci_low, ci_high]``; bold when its q-value is below ``SIGNIFICANCE``."""
    if row is None:
        return "n/a"
    text = fmt_ci(row["estimate"], row["ci_low"], row["ci_high"])
    q = row.get("q_value")
    sig = bold_if_significant and q is not None and not math.isnan(q) and q < SIGNIFICANCE
    return f"<b>{text}</b>" if sig else text


def fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "&lt;0.001" if p < 0.001 else f"{p:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "", fold: bool = True) -> str:
    """An HTML table; with ``fold``, one longer than ``LONG_TABLE_ROWS`` rows is collapsed under a summary."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    if fold and len(rows) > LONG_TABLE_ROWS:
        return f"<details><summary>Table of {len(rows)} rows (click to show)</summary>{table}</details>"
    return table


def _contents(parts: list[str]) -> str:
    """A nested table of contents of the ``<h2>`` / ``<h3>`` headings in ``parts``, which get ids."""
    items, n = [], 0
    for i, part in enumerate(parts):
        for level in (2, 3):
            if part.startswith(f"<h{level}>"):
                n += 1
                title = part[4:part.index(f"</h{level}>")]
                parts[i] = f'<h{level} id="s{n}">' + part[4:]
                items.append((level, n, title))
    out, prev = ["<nav class='toc'><b>Contents</b><ul>"], 2
    for i, (level, k, title) in enumerate(items):
        if i:
            out.append("<ul>" if level > prev else "</li></ul></li>" if level < prev else "</li>")
        out.append(f'<li><a href="#s{k}">{title}</a>')
        prev = level
    out.append(("</li></ul></li>" if prev == 3 else "</li>") + "</ul></nav>")
    return "".join(out)


def _e(text: object) -> str:
    return html.escape(str(text))


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # layouts are already tight; a tight bbox would lay out twice
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _lookup(df: pl.DataFrame, keys: Sequence[str]) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in df.iter_rows(named=True)}


# ---------------------------------------------------------------------- plots
def plot_group_rates(tab: AuditTables, attribute: str, methods: Sequence[str], groups: Sequence[str],
                     metrics: Sequence[str] = ("fpr", "underdiagnosis")) -> str:
    """Per-group rates, one bar per method (mean over models), with bootstrap-interval error bars."""
    plt = _plt()
    g = _lookup(tab.group_metrics.filter((pl.col("attribute") == attribute) & (pl.col("model") == MODEL_MEAN)),
                ["method", "group", "metric"])
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(7, 0.35 * len(groups) * len(methods)), 3.3 * len(metrics)),
                             squeeze=False)
    x, width = np.arange(len(groups)), 0.8 / len(methods)
    for ax, metric in zip(axes[:, 0], metrics):
        for i, m in enumerate(methods):
            r = [g.get((m, grp, metric)) for grp in groups]
            est = np.array([np.nan if v is None else v["estimate"] for v in r])
            lo = np.array([np.nan if v is None else v["ci_low"] for v in r])
            hi = np.array([np.nan if v is None else v["ci_high"] for v in r])
            err = np.nan_to_num(np.vstack([est - lo, hi - est]).clip(min=0))
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(est), width, yerr=err, capsize=2,
                   label=m, error_kw={"elinewidth": 0.8})
        ax.set_xticks(x, groups, rotation=25 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.set_title(f"{METRIC_LABELS[metric]} by {attribute} (mean over models; bootstrap CI)", fontsize=10)
    axes[0, 0].legend(ncol=min(len(methods), 5), fontsize=7)
    fig.tight_layout()
    return _png(fig)


def plot_gaps(tab: AuditTables, attribute: str, methods: Sequence[str], groups: Sequence[str], reference: str,
              metrics: Sequence[str] = ("fpr", "underdiagnosis")) -> str:
    """Gap of each group to the reference per method, dot and whisker; filled = permutation q < 0.05."""
    plt = _plt()
    gaps = _lookup(tab.gaps.filter((pl.col("attribute") == attribute) & (pl.col("model") == MODEL_MEAN)),
                   ["method", "group", "metric"])
    others = [x for x in groups if x != reference]
    height = 0.45 * len(methods) * max(1, len(others) / 2) + 1.5
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), height), squeeze=False, sharey=True)
    y = np.arange(len(methods))[::-1]
    off = 0.7 / max(len(others), 1)
    for ax, metric in zip(axes[0], metrics):
        for j, grp in enumerate(others):
            color = f"C{groups.index(grp) % 10}"  # a group keeps its colour in every figure
            for i, m in enumerate(methods):
                r = gaps.get((m, grp, metric))
                if r is None or r["estimate"] is None or math.isnan(r["estimate"]):
                    continue
                yy = y[i] + (j - (len(others) - 1) / 2) * off
                ax.errorbar(r["estimate"], yy, xerr=[[max(r["estimate"] - r["ci_low"], 0)],
                                                     [max(r["ci_high"] - r["estimate"], 0)]],
                            fmt="o", color=color, mfc=color if (r["q_value"] or 1) < SIGNIFICANCE else "white",
                            capsize=2, label=grp if i == 0 else None)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(y, methods)
        ax.set_xlabel(f"{METRIC_LABELS[metric]}(group) - {METRIC_LABELS[metric]}({reference})")
        ax.set_title(f"{METRIC_LABELS[metric]} gap by {attribute}", fontsize=10)
    axes[0, 0].legend(fontsize=7, title="group", title_fontsize=7)
    fig.tight_layout()
    return _png(fig)


# the min-max gaps of the strategy chart: TPR's spread is also the underdiagnosis rate's (UDR = 1 - TPR)
RANGE_METRICS = {"equal_opportunity": "UDR max - min", "fpr_difference": "FPR max - min"}


def plot_strategy_gaps(tab: AuditTables, attributes: Sequence[str], methods: Sequence[str], model: str,
                       reference: str) -> str:
    """The CT audit's Figure 3: each method's min-max UDR and FPR gap per attribute, with its AUROC beside.

    Dot and whisker (bootstrap interval) per method and attribute; filled = the paired permutation
    test of the change against ``reference`` has q < 0.05; dotted lines mark the reference's values.
    """
    plt = _plt()
    fair = _lookup(tab.fairness.filter(pl.col("model") == model), ["method", "attribute", "metric"])
    comp = _lookup(tab.comparisons.filter(pl.col("model") == model), ["method", "attribute", "metric"])
    overall = _lookup(tab.group_metrics.filter((pl.col("attribute") == ALL) & (pl.col("model") == model)
                                               & (pl.col("metric") == "auroc")), ["method"])
    y = np.arange(len(methods))[::-1]
    off = 0.6 / max(len(attributes), 1)
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.42 * len(methods) * max(1, len(attributes) / 2) + 1.6),
                             squeeze=False, sharey=True, gridspec_kw={"width_ratios": [1, 1, 0.7]})

    def whisker(ax, r, yy, color, filled, marker="o"):
        lo, hi = max(r["estimate"] - r["ci_low"], 0), max(r["ci_high"] - r["estimate"], 0)
        ax.errorbar(r["estimate"], yy, xerr=[[0 if math.isnan(lo) else lo], [0 if math.isnan(hi) else hi]],
                    fmt=marker, color=color, mfc=color if filled else "white", capsize=2)

    for ax, metric in zip(axes[0, :2], RANGE_METRICS):
        for j, attr in enumerate(attributes):
            color = f"C{j % 10}"
            for i, m in enumerate(methods):
                r = fair.get((m, attr, metric))
                if r is None or r["estimate"] is None or math.isnan(r["estimate"]):
                    continue
                c = comp.get((m, attr, metric))
                filled = c is not None and c["q_value"] is not None and c["q_value"] < SIGNIFICANCE
                whisker(ax, r, y[i] + (j - (len(attributes) - 1) / 2) * off, color, filled)
            ref = fair.get((reference, attr, metric))
            if ref is not None and not math.isnan(ref["estimate"]):
                ax.axvline(ref["estimate"], color=color, lw=0.8, ls=":", label=attr)
        ax.set_xlabel(f"{RANGE_METRICS[metric]} across groups")
        ax.set_title(f"min-max {RANGE_METRICS[metric].split()[0]} gap ({model})", fontsize=10)
    for i, m in enumerate(methods):
        r = overall.get((m,))
        if r is not None and not math.isnan(r["estimate"]):
            whisker(axes[0, 2], r, y[i], "black", True, marker="s")
    if (reference,) in overall:
        axes[0, 2].axvline(overall[(reference,)]["estimate"], color="black", lw=0.8, ls=":")
    axes[0, 2].set_xlabel("AUROC (all test visits)")
    axes[0, 2].set_title(f"AUROC ({model})", fontsize=10)
    axes[0, 0].set_yticks(y, methods)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=len(attributes), fontsize=8,
               title=f"attribute (dotted: {reference}; filled: change vs {reference} q < {SIGNIFICANCE})",
               title_fontsize=8)
    fig.tight_layout(rect=(0, 0.55 / fig.get_size_inches()[1], 1, 1))  # room for the legend below
    return _png(fig)


def plot_calibration(frame: pl.DataFrame, attribute: str, methods: Sequence[str], groups: Sequence[str],
                     model: str, n_bins: int, ece: dict) -> str:
    """Reliability curves per group, one panel per method (one model; test visits of all folds)."""
    plt = _plt()
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.2 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, m in zip(axes.ravel(), methods):
        part = frame.filter((pl.col("method") == m) & (pl.col("model") == model))
        if part.height == 0:
            ax.set_visible(False)
            continue
        cur = calibration_curve_by_group(part["y_true"].to_numpy(), part["score"].to_numpy(),
                                         part["_group"].to_numpy(), n_bins=n_bins)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        for (grp,), c in cur.group_by("group", maintain_order=True):
            e = ece.get((m, grp))
            ax.plot(c["mean_prob"], c["frac_positive"], marker="o", ms=3, lw=1, color=f"C{groups.index(grp) % 10}",
                    label=f"{grp} (ECE {_num(e)})")
        ax.set_title(m, fontsize=9)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes.ravel()[len(methods):]:
        ax.set_visible(False)
    fig.supxlabel("mean predicted probability (bin)", fontsize=9)
    fig.supylabel("observed death rate (bin)", fontsize=9)
    fig.suptitle(f"Calibration by {attribute}, model {model}", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_sweep(sweep: pl.DataFrame, attribute: str, methods: Sequence[str], groups: Sequence[str],
               reference: str) -> tuple[str, str]:
    """(per-group TPR / FPR against threshold; underdiagnosis gap with its bootstrap band)."""
    plt = _plt()
    sw = sweep.filter(pl.col("attribute") == attribute)
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    figs = []
    for kind in ("rates", "gap"):
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False, sharex=True,
                                 sharey=True)
        for ax, m in zip(axes.ravel(), methods):
            part = sw.filter(pl.col("method") == m)
            for j, grp in enumerate(groups):
                color = f"C{j % 10}"
                if kind == "rates":
                    for metric, ls in (("tpr", "-"), ("fpr", "--")):
                        c = part.filter((pl.col("group") == grp) & (pl.col("metric") == metric)).sort("threshold")
                        ax.plot(c["threshold"], c["estimate"], ls=ls, color=color, lw=1,
                                label=f"{grp} {metric.upper()}" if ax is axes[0, 0] else None)
                elif grp != reference:
                    c = part.filter((pl.col("group") == grp) & (pl.col("metric") == "underdiagnosis_gap"))
                    c = c.sort("threshold")
                    ax.plot(c["threshold"], c["estimate"], color=color, lw=1, label=grp if ax is axes[0, 0] else None)
                    ax.fill_between(c["threshold"], c["ci_low"], c["ci_high"], color=color, alpha=0.2)
            if kind == "gap":
                ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(m, fontsize=9)
        for ax in axes.ravel()[len(methods):]:
            ax.set_visible(False)
        axes[0, 0].legend(fontsize=6)
        fig.supxlabel("threshold (positive if score > t)", fontsize=9)
        fig.supylabel("rate" if kind == "rates" else f"UDR(group) - UDR({reference})", fontsize=9)
        what = "TPR (solid), FPR (dashed)" if kind == "rates" else "underdiagnosis gap, 95% bootstrap band"
        fig.suptitle(f"Threshold sweep by {attribute}: {what}", fontsize=10)
        fig.tight_layout()
        figs.append(_png(fig))
    return figs[0], figs[1]


# ---------------------------------------------------------------------- sections
def _comparison_rows(tab: AuditTables, model: str) -> list[list[str]]:
    return [[_e(r["method"]), _e(r["attribute"]), METRIC_LABELS.get(r["metric"], r["metric"]),
             _ci(r, bold_if_significant=True), fmt_p(r["p_value"]), fmt_p(r["q_value"])]
            for r in tab.comparisons.filter(pl.col("model") == model).iter_rows(named=True)]


def _group_table(tab: AuditTables, attribute: str, metric: str, methods: Sequence[str], groups: Sequence[str],
                 small: set[str]) -> str:
    g = _lookup(tab.group_metrics.filter((pl.col("attribute") == attribute) & (pl.col("model") == MODEL_MEAN)
                                         & (pl.col("metric") == metric)), ["method", "group"])
    sizes = {r["group"]: (r["n_patients"], r["n_deaths"]) for r in g.values()}
    rows = [[_e(m), *(_ci(g.get((m, grp))) for grp in groups)] for m in methods]
    header = [group_header(f"{grp}{' †' if grp in small else ''}", *sizes.get(grp, ("?", "?"))) for grp in groups]
    return _table(["method", *header], rows)


def _gap_table(tab: AuditTables, attribute: str, methods: Sequence[str], metrics: Sequence[str],
               small: set[str]) -> str:
    gp = tab.gaps.filter((pl.col("attribute") == attribute) & (pl.col("model") == MODEL_MEAN))
    rows = []
    for m in methods:
        for r in gp.filter((pl.col("method") == m) & pl.col("metric").is_in(list(metrics))).iter_rows(named=True):
            dagger = " †" if r["group"] in small else ""
            label = "max - min" if r["group"] == RANGE else f"{r['group']}{dagger} - {r['reference']}"
            rows.append([_e(m), METRIC_LABELS[r["metric"]], _e(label), _ci(r, bold_if_significant=True),
                         fmt_p(r["p_value"]), fmt_p(r["q_value"])])
    return _table(["method", "metric", "gap", "estimate [CI]", "p", "q"], rows)


def _fairness_table(tab: AuditTables, attribute: str, methods: Sequence[str]) -> str:
    f = _lookup(tab.fairness.filter((pl.col("attribute") == attribute) & (pl.col("model") == MODEL_MEAN)),
                ["method", "metric"])
    metrics = list(dict.fromkeys(tab.fairness["metric"].to_list()))
    rows = [[_e(m), *(_ci(f.get((m, k))) for k in metrics)] for m in methods]
    return _table(["method", *(METRIC_LABELS.get(k, k) for k in metrics)], rows)


def sweep_persistence(sweep: pl.DataFrame, metric: str = "underdiagnosis_gap") -> pl.DataFrame:
    """Per (method, model, attribute, group): at how many thresholds the gap is positive / negative and
    how many of those have a bootstrap interval excluding 0."""
    g = sweep.filter((pl.col("metric") == metric) & pl.col("estimate").is_not_nan())
    return (g.group_by("method", "model", "attribute", "group", maintain_order=True)
            .agg(n=pl.len(), positive=(pl.col("estimate") > 0).sum(), negative=(pl.col("estimate") < 0).sum(),
                 ci_above_0=(pl.col("ci_low") > 0).sum(), ci_below_0=(pl.col("ci_high") < 0).sum()))


def _persistence_table(sweep: pl.DataFrame, attribute: str, methods: Sequence[str]) -> str:
    per = sweep_persistence(sweep).filter(pl.col("attribute") == attribute)
    rows = []
    for m in methods:
        for r in per.filter(pl.col("method") == m).iter_rows(named=True):
            same = r["positive"] == r["n"] or r["negative"] == r["n"]
            verdict = ("persists (CI excludes 0 everywhere)" if max(r["ci_above_0"], r["ci_below_0"]) == r["n"]
                       else "same sign everywhere" if same else "changes sign")
            rows.append([_e(m), _e(r["group"]), f"{r['positive']}/{r['n']}", f"{r['negative']}/{r['n']}",
                         f"{r['ci_above_0']}/{r['n']}", f"{r['ci_below_0']}/{r['n']}", verdict])
    return _table(["method", "group", "gap > 0", "gap < 0", "CI > 0", "CI < 0", "reading"], rows)


def _strategy_table(tab: AuditTables, attributes: Sequence[str], methods: Sequence[str], model: str,
                    reference: str) -> str:
    fair = _lookup(tab.fairness.filter(pl.col("model") == model), ["method", "attribute", "metric"])
    comp = _lookup(tab.comparisons.filter(pl.col("model") == model), ["method", "attribute", "metric"])
    auroc = _lookup(tab.group_metrics.filter((pl.col("attribute") == ALL) & (pl.col("model") == model)
                                             & (pl.col("metric") == "auroc")), ["method"])
    ref_auroc = auroc.get((reference,), {}).get("estimate", math.nan)

    def change(m: str, attr: str, metric: str) -> str:
        c = comp.get((m, attr, metric))
        if c is None:
            return ""
        text = f"{c['estimate']:+.3f} (p {fmt_p(c['p_value'])}, q {fmt_p(c['q_value'])})"
        return f"<b>{text}</b>" if c["q_value"] is not None and c["q_value"] < SIGNIFICANCE else text

    rows = []
    for m in methods:
        a = auroc.get((m,))
        diff = a["estimate"] - ref_auroc if a is not None and m != reference else math.nan
        for attr in attributes:
            cells = []
            for metric in RANGE_METRICS:
                cells += [_ci(fair.get((m, attr, metric))), change(m, attr, metric)]
            rows.append([_e(m), _e(attr), *cells, _ci(a), "" if math.isnan(diff) else f"{diff:+.3f}"])
    return _table(["method", "attribute", "UDR max - min [CI]", f"change vs {reference} (p, q)",
                   "FPR max - min [CI]", f"change vs {reference} (p, q)", "AUROC [CI]",
                   f"AUROC - {reference}"], rows, fold=False)  # the section's key table: always shown


def strategy_section(tab: AuditTables, design: Design, reference: str) -> list[str]:
    """HTML parts: the min-max gap chart and table per mitigation strategy, over models and per model."""
    attributes = design.attributes
    methods = design.methods()
    models = list(dict.fromkeys(k for _, k in design.series))
    parts = ["<h2>Min-max gaps by mitigation strategy</h2>",
             "<p class='note'>As in the CT fairness audit's Figure 3: per method and attribute, the largest minus "
             "the smallest group underdiagnosis rate (UDR = 1 - TPR, so this is also the TPR spread) and the same "
             "for FPR, over the groups in the fairness measures, with 95% bootstrap intervals; beside them each "
             f"method's AUROC on all test visits. Filled markers and bold changes: the paired permutation test of "
             f"the change against {_e(reference)} has q &lt; {SIGNIFICANCE}. A method run with some models only is "
             "averaged over those in <i>mean</i> (its change over the models both methods have): compare it in "
             "its own model's chart below.</p>",
             plot_strategy_gaps(tab, attributes, methods, MODEL_MEAN, reference),
             _strategy_table(tab, attributes, methods, MODEL_MEAN, reference)]
    per_model = []
    for model in models:
        ms = [m for m in methods if (m, model) in design.series]
        per_model += [f"<h4>{_e(model)}</h4>", plot_strategy_gaps(tab, attributes, ms, model, reference),
                      _strategy_table(tab, attributes, ms, model, reference)]
    parts.append("<details><summary>Per model</summary>" + "".join(per_model) + "</details>")
    return parts


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1250px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}th{background:#f2f2f2}h2{border-bottom:2px solid #444;margin-top:2em}
img{max-width:100%}details{margin:.5em 0 1em}summary{cursor:pointer;font-weight:600}.note{color:#555;font-size:.9em}
code{background:#f5f5f5;padding:0 3px}pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f7f7f7;padding:.6em}
nav.toc{background:#f7f7f7;padding:.4em 1em;font-size:.9em}nav.toc ul{margin:.2em 0}"""


def render(tab: AuditTables, *, design: Design, predictions: pl.DataFrame, sweep: pl.DataFrame, meta: dict,
           focus_model: str, reference: str, source: str, seconds: float, min_deaths: int = 10) -> str:
    """The report's HTML. ``source`` is the audited k-fold folder or predictions file (``meta`` is empty
    for a file)."""
    methods = design.methods()
    models = list(dict.fromkeys(k for _, k in design.series))
    per_method_models = {m: [k for mm, k in design.series if mm == m] for m in methods}
    partial = {m: ks for m, ks in per_method_models.items() if len(ks) < len(models)}
    p = tab.params
    origin = (f"Run <code>{_e(source)}</code>; data <code>{_e(meta.get('data', '?'))}</code>" if meta
              else f"Predictions <code>{_e(source)}</code>")
    head = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Fairness audit: {_e(source)}</title>"
            f"<style>{CSS}</style></head><body>",
            f"<h1>Fairness audit</h1><p>{origin}; "
            f"written {datetime.now(timezone.utc).isoformat(timespec='seconds')} in {seconds:.0f} s.</p>"]
    parts = ["<ul>",
             f"<li>{design.n_patients} test patients, {len(design.y_true)} test visits "
             f"({int(design.y_true.sum())} positive), {design.n_folds} folds; methods: {_e(', '.join(methods))}; "
             f"models: {_e(', '.join(models))}.</li>",
             f"<li>Group attributes: {_e(', '.join(design.attributes))}; reference (largest) groups: "
             f"{_e(', '.join(f'{a}: {g}' for a, g in p['reference_groups'].items()))}.</li>",
             f"<li>Uncertainty: patient-level bootstrap, {p['n_resamples']} resamples drawn within folds, "
             f"{100 * p['level']:.0f}% percentile intervals; permutation tests with {p['n_permutations']} "
             f"resamples, p = (1 + #extreme) / (1 + #valid), two-sided; q = Benjamini-Hochberg within each table "
             f"and metric; seed {p['seed']}. Statistics are computed per fold and averaged over folds "
             f"({_e(p['aggregate'])}); <i>mean</i> = the model average, taken within each fold.</li>",
             f"<li>Fairness measures leave out groups under {100 * p['fairness_min_share']:g}% of a fold's "
             f"training patients ({'the run' if meta else 'with one fold: the audited patients'}'s setting). "
             f"Group sizes: test patients (each tested in one fold) and those who died. "
             f"Bold: q &lt; {SIGNIFICANCE}.</li></ul>"]
    if partial:
        parts.append("<p class='note'>Methods run with some models only (their <i>mean</i> averages those; a "
                     "comparison's <i>mean</i> averages the models both methods have): "
                     + _e("; ".join(f"{m}: {', '.join(ks)}" for m, ks in partial.items())) + ".</p>")
    parts += ["<p class='note'>How to read: a gap is a group's value minus the reference group's (UDR = "
              "underdiagnosis rate = 1 - TPR, so a positive UDR gap means that group's deaths are missed more "
              "often). Disparate impact: minority F1 / training-majority F1 (nearer 1 is fairer); Theil index "
              "over group F1s (lower is fairer). Both come in two aggregations: <i>units</i> (per fold and "
              "model, then averaged; groups under the minimum share left out, undefined F1 dropped) and "
              "<i>paper</i> (once, on the group F1s averaged over models and folds; every group, undefined F1 "
              "as 0, majority and weights from the groups' patients). For spreads (Theil, max - min, equalized odds) resampled values "
              "lie above the estimate on average, so the percentile interval can sit above the estimate; use the "
              "p-value for those.</p>",
              f"<h2>Changes against {_e(reference)} (mean over models)</h2>"]
    if tab.comparisons.height == 0:
        parts.append(f"<p class='note'>Only one method ({_e(reference)}): nothing to compare.</p>")
    else:
        parts += ["<p class='note'>Paired permutation test: each resample swaps the two methods' predictions for "
                  "a random half of the patients. Interval: paired bootstrap of the difference.</p>",
                  _table(["method", "attribute", "metric", "difference [CI]", "p", "q"],
                         _comparison_rows(tab, MODEL_MEAN))]
        sig = tab.comparisons.filter((pl.col("model") == MODEL_MEAN) & (pl.col("q_value") < SIGNIFICANCE))
        parts.append("<p><b>Significant (q &lt; 0.05):</b> " + (_e("; ".join(
            f"{r['method']} {METRIC_LABELS[r['metric']]}" + ("" if r["attribute"] == ALL else f" ({r['attribute']})")
            + f" {r['estimate']:+.3f}" for r in sig.iter_rows(named=True))) or "none") + ".</p>")
        parts.append("<details><summary>Per model</summary>" + _table(
            ["method", "model", "attribute", "metric", "difference [CI]", "p", "q"],
            [[_e(r["method"]), _e(r["model"]), _e(r["attribute"]), METRIC_LABELS[r["metric"]],
              _ci(r), fmt_p(r["p_value"]), fmt_p(r["q_value"])]
             for r in tab.comparisons.filter(pl.col("model") != MODEL_MEAN).iter_rows(named=True)], fold=False)
            + "</details>")
    parts += ["<h2>Overall performance (mean over models)</h2>"]
    overall = _lookup(tab.group_metrics.filter((pl.col("attribute") == ALL) & (pl.col("model") == MODEL_MEAN)),
                      ["method", "metric"])
    om = ["f1", "precision", "tpr", "fpr", "auroc", "calibration_error"]
    parts.append(_table(["method", *(METRIC_LABELS[k] for k in om)],
                        [[_e(m), *(_ci(overall.get((m, k))) for k in om)] for m in methods]))
    parts += strategy_section(tab, design, reference)

    frame = predictions
    for attr in design.attributes:
        all_groups, reference_group = design.categories[attr], p["reference_groups"][attr]
        small = {g for g, d in zip(all_groups, design.deaths[attr]) if d < min_deaths and g != reference_group}
        groups = [g for g in all_groups if g not in small]  # the charts leave tiny groups out
        parts += [f"<h2>Attribute: {_e(attr)}</h2>"]
        if small:
            parts.append(f"<p class='note'>† fewer than {min_deaths} deaths among the test patients: their "
                         "intervals and p-values are not interpretable (a handful of patients decide them); "
                         f"they are left out of the charts: {_e(', '.join(sorted(small)))}.</p>")
        parts += ["<h3>Fairness measures (mean over models)</h3>", _fairness_table(tab, attr, methods)]
        for metric in ("f1", "fpr", "underdiagnosis", "auroc", "calibration_error"):
            parts += [f"<h3>{METRIC_LABELS[metric]} by group (mean over models)</h3>",
                      _group_table(tab, attr, metric, methods, all_groups, small)]
        parts += ["<h3>FPR and underdiagnosis by group</h3>", plot_group_rates(tab, attr, methods, groups),
                  f"<h3>Gaps to {_e(reference_group)}</h3>",
                  "<p class='note'>Filled markers: permutation q &lt; 0.05 (group labels permuted across patients "
                  "within folds).</p>",
                  plot_gaps(tab, attr, methods, groups, reference_group),
                  _gap_table(tab, attr, methods, ("fpr", "underdiagnosis", "f1", "calibration_error"), small)]
        per_model = tab.gaps.filter((pl.col("attribute") == attr) & (pl.col("model") != MODEL_MEAN))
        parts.append("<details><summary>Gaps per model</summary>" + _table(
            ["method", "model", "metric", "gap", "estimate [CI]", "p", "q"],
            [[_e(r["method"]), _e(r["model"]), METRIC_LABELS[r["metric"]],
              _e("max - min" if r["group"] == RANGE else f"{r['group']} - {r['reference']}"),
              _ci(r), fmt_p(r["p_value"]), fmt_p(r["q_value"])] for r in per_model.iter_rows(named=True)],
            fold=False) + "</details>")
        focus = frame.with_columns(_group=pl.concat_str([pl.col(a) for a in attr.split(" & ")], separator=" & "))
        focus = focus.filter(pl.col("_group").is_in(groups))
        ece = {(r["method"], r["group"]): r["estimate"] for r in tab.group_metrics.filter(
            (pl.col("attribute") == attr) & (pl.col("model") == focus_model) & (pl.col("metric") == "calibration_error")
        ).iter_rows(named=True)}
        fm = [m for m in methods if (m, focus_model) in design.series]
        parts += [f"<h3>Calibration by group ({_e(focus_model)})</h3>",
                  "<p class='note'>Reliability curves over the test visits of all folds, "
                  f"{design.n_bins} equal-width bins; ECE in the legend (fold mean).</p>",
                  plot_calibration(focus, attr, fm, groups, focus_model, design.n_bins, ece)]
        shown = sweep.filter(pl.col("group").is_in(groups))
        rates, gap = plot_sweep(shown, attr, fm, groups, reference_group)
        parts += [f"<h3>Threshold sweep ({_e(focus_model)})</h3>",
                  "<p class='note'>Does the underdiagnosis gap persist at every threshold? Counts over the "
                  "thresholds where both groups have positives; CI = 95% bootstrap interval at that threshold. "
                  "Post-processing methods keep their base model's scores, so their curves here and in the "
                  "calibration plots are that model's; their group-specific decisions are in the tables above.</p>",
                  _persistence_table(shown, attr, fm), rates, gap]
    parts.append("<h2>Settings</h2><pre>" + _e(json.dumps(p, indent=1, default=str)) + "</pre></body></html>")
    return "\n".join([*head, _contents(parts), *parts])


# ---------------------------------------------------------------------- entry points
def run_audit(source: str | os.PathLike, out: str | os.PathLike, *, groups: Sequence[str] | None = None,
              threshold: float = 0.5, n_resamples: int = 1000, n_permutations: int = 1000, seed: int = 0,
              level: float = 0.95, reference: str | None = None, focus_model: str | None = None,
              aggregate: str = "fold_mean", thresholds: Sequence[float] = DEFAULT_THRESHOLDS, n_bins: int = 10,
              auroc: bool = True, min_deaths: int = 10, fairness_min_share: float | None = None,
              overwrite: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """Audit a k-fold run (``source`` a folder) or a predictions file (``source`` a ``.parquet`` or
    ``.csv`` file, :func:`load_predictions`, which needs ``groups`` and uses ``threshold``); write the HTML
    report ``out`` and its table (``out`` with ``.parquet``). Every option is checked before any work.

    ``reference`` defaults to ``original`` when the predictions have it, else their first method;
    ``focus_model`` to ``logreg``, else the first model.
    """
    out = Path(out)
    table_path = out.with_suffix(".parquet")
    _check_options(out=out, table_path=table_path, overwrite=overwrite, level=level, n_resamples=n_resamples,
                   n_permutations=n_permutations, threshold=threshold, thresholds=thresholds, n_bins=n_bins,
                   min_deaths=min_deaths, aggregate=aggregate, fairness_min_share=fairness_min_share)
    inputs = [Path(source) / "predictions.parquet" if Path(source).is_dir() else Path(source)]
    clash = [p for p in (out, table_path) if p.resolve() in {i.resolve() for i in inputs}]
    if clash:
        raise HaloBalanceError(f"--out {out} would overwrite the audited predictions {clash[0]} (the table is written "
                               "beside the report, with the suffix .parquet); choose another --out")
    t0 = time.perf_counter()
    if Path(source).is_dir():
        predictions, meta = load_run(source, groups=groups)
        file = str(Path(source) / "predictions.parquet")
    elif groups is None:
        raise HaloBalanceError(f"--groups is needed to audit a predictions file ({source}): name its group columns")
    else:
        predictions, meta, file = load_predictions(source, groups=groups, threshold=threshold), {}, str(source)
    groups = list(groups or meta["groups"])
    unknown = [g for g in groups if g not in predictions.columns]
    if unknown:
        raise unknown_choice(f"--groups (the group columns of {file})", unknown, meta.get("groups") or [
            c for c in predictions.columns if c not in REQUIRED_COLUMNS])
    share = meta.get("fairness_min_share", 0.0) if fairness_min_share is None else fairness_min_share
    design = Design.from_predictions(predictions, groups=groups, n_bins=n_bins, fairness_min_share=share,
                                     methods=meta.get("methods"), source=file)
    methods = design.methods()
    reference = reference or ("original" if "original" in methods else methods[0])
    if reference not in methods:
        raise unknown_choice(f"--reference (the methods of {file})", [reference], methods)
    models = list(dict.fromkeys(k for _, k in design.series))
    focus_model = focus_model or ("logreg" if "logreg" in models else models[0])
    if focus_model not in models:
        raise unknown_choice(f"--focus-model (the models of {file})", [focus_model], models)
    say = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    say(f"audit: {design.n_patients} patients, {len(design.series)} (method, model) series; "
        f"{n_resamples} bootstrap resamples, {n_permutations} permutations")
    tab = audit_statistics(design, reference=reference, n_resamples=n_resamples, n_permutations=n_permutations,
                           level=level, seed=seed, aggregate=aggregate, auroc=auroc)
    say(f"audit: statistics done in {time.perf_counter() - t0:.1f} s; threshold sweep ({focus_model})")
    sweep = bootstrap_threshold_sweep(design, series=[s for s, (_, k) in enumerate(design.series) if k == focus_model],
                                      thresholds=thresholds, n_resamples=n_resamples, level=level, seed=seed,
                                      aggregate=aggregate)
    text = render(tab, design=design, predictions=predictions, sweep=sweep, meta=meta, focus_model=focus_model,
                  reference=reference, source=str(source), seconds=time.perf_counter() - t0, min_deaths=min_deaths)
    long = pl.concat([tab.long(), sweep.with_columns(table=pl.lit("threshold_sweep"))], how="diagonal_relaxed")
    buf = io.BytesIO()
    long.write_parquet(buf)
    atomic_write_bytes(table_path, buf.getvalue())
    atomic_write_bytes(out, text.encode())
    say(f"audit: {time.perf_counter() - t0:.1f} s")
    return out, table_path


def _check_options(*, out: Path, table_path: Path, overwrite: bool, level: float, n_resamples: int,
                   n_permutations: int, threshold: float, thresholds: Sequence[float], n_bins: int, min_deaths: int,
                   aggregate: str, fairness_min_share: float | None) -> None:
    for path in (out, table_path):
        if path.is_dir():
            raise HaloBalanceError(f"--out {out}: {path} is a folder; name the HTML file to write, "
                                   f"e.g. {path / 'audit.html'}")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} already exists; choose another --out or pass --overwrite")
    check_writable(out, f"--out {out}")
    if not 0 < level < 1:
        raise HaloBalanceError(f"--level must lie in (0, 1), got {level}")
    if n_resamples < 1 or n_permutations < 1:
        raise HaloBalanceError("--resamples and --permutations must be at least 1")
    if not 0 <= threshold <= 1:
        raise HaloBalanceError(f"--threshold must lie in [0, 1], got {threshold}")
    if not thresholds or not all(0 <= t <= 1 for t in thresholds):
        raise HaloBalanceError(f"--thresholds must be values in [0, 1], got {list(thresholds)}")
    if n_bins < 1:
        raise HaloBalanceError(f"--bins must be at least 1, got {n_bins}")
    if min_deaths < 0:
        raise HaloBalanceError(f"--min-deaths must be at least 0, got {min_deaths}")
    if aggregate not in ("fold_mean", "pooled"):
        raise unknown_choice("--aggregate", [aggregate], ("fold_mean", "pooled"))
    if fairness_min_share is not None and not 0 <= fairness_min_share < 1:
        raise HaloBalanceError(f"--fairness-min-share must lie in [0, 1), got {fairness_min_share}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.2,0.5,0.8, "
                                         f"got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the --out folder of a benchmarks.kfold run")
    source.add_argument("--predictions", metavar="FILE",
                        help="a .parquet or .csv file of predictions made elsewhere: patient_id, the --groups "
                             "columns, y_true, score; optional prediction, fold, method, model, visit_index")
    p.add_argument("--out", required=True, help="the HTML report to write (its table goes beside it, .parquet)")
    p.add_argument("--groups", nargs="+", default=None, metavar="ATTR",
                   help="group columns to audit (default: the run's --groups; required with --predictions)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="--predictions without a prediction column: prediction = score > this (default 0.5)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--permutations", type=int, default=1000, help="permutation-test resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--reference", default=None,
                   help="the method every other method is compared with (default original, else the first)")
    p.add_argument("--focus-model", default=None, help="model of the calibration curves and threshold sweep "
                   "(default logreg, else the first)")
    p.add_argument("--aggregate", choices=("fold_mean", "pooled"), default="fold_mean")
    p.add_argument("--thresholds", type=_floats, default=DEFAULT_THRESHOLDS,
                   help="comma-separated thresholds of the sweep")
    p.add_argument("--bins", type=int, default=10, help="calibration bins")
    p.add_argument("--no-auroc", action="store_true", help="skip the AUROC bootstrap (the slowest part)")
    p.add_argument("--min-deaths", type=int, default=10,
                   help="groups with fewer deaths are flagged in the tables and left out of the charts")
    p.add_argument("--fairness-min-share", type=float, default=None,
                   help="leave groups under this share of a fold's training patients out of the fairness "
                        "measures (default: the run's setting, 0 if it has none)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if a.run is not None and not Path(a.run).is_dir():
        raise HaloBalanceError(f"--run {a.run} " + ("is a file; pass a predictions file as --predictions"
                                                    if Path(a.run).exists() else
                                                    "not found; pass the --out folder of a benchmarks.kfold run"))
    if a.predictions is not None and Path(a.predictions).is_dir():
        raise HaloBalanceError(f"--predictions {a.predictions} is a folder; pass a k-fold output folder as --run, "
                               "and a predictions file (.parquet or .csv) as --predictions")
    report, table = run_audit(a.run if a.run is not None else a.predictions, a.out, groups=a.groups,
                              threshold=a.threshold, n_resamples=a.resamples, n_permutations=a.permutations,
                              seed=a.seed, level=a.level, reference=a.reference, focus_model=a.focus_model,
                              aggregate=a.aggregate, thresholds=a.thresholds, n_bins=a.bins, auroc=not a.no_auroc,
                              min_deaths=a.min_deaths, fairness_min_share=a.fairness_min_share,
                              overwrite=a.overwrite, progress=not a.no_progress)
    print(f"report: {report}\ntable: {table}")


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
