"""The k-fold report: the paper's tables as markdown and the plots as PNG.

``python -m benchmarks.report DIR`` re-renders ``DIR/report.md`` and ``DIR/plots/`` from the tables a
k-fold run wrote (``summary.parquet``, ``units.parquet``, ``run.json``); ``benchmarks.kfold`` calls
:func:`write_report` at the end of every run. ``python -m benchmarks.report --compare DIR ...``
prints one table across several runs (:func:`compare_runs`; ``--aggregation``, ``--attribute``);
``--cells-figure PNG DIR ...`` draws the training cells of several runs before and after balancing
in one figure.

The report opens with the run's protocol (:mod:`benchmarks.protocols`) and what it balanced by.
Tables (mean +/- standard error over folds): overall F1 per method x model with the model average
and its change against ``original`` (the paper's Table 2); FairPlay's disparate impact and the Theil
index per method, averaged over models, for every attribute and for the intersection of several
(Table 3), in the protocol's aggregation first and the other one below, with the decision gaps
beside them; F1, underdiagnosis rate and FPR per group; AUROC; the size of every method's training
data and the time it took; the distinctness, training copies and fidelity of binary synthetic rows.
Plots: the training visits per cell before and after balancing (the paper's Fig. 2), F1 / Theil /
DI against the ratio when several ratios were run (Supplementary Fig. 1), per-group F1 bars per
method (Fig. 3), per-group FPR and underdiagnosis bars, and a radar plot of per-group F1 for an
intersection of attributes (Fig. 4). Like the paper's figures, the plots leave out groups holding
less than 1% of the test visits; the tables keep every group.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from halo_balance.errors import HaloBalanceError
from halo_balance.io import atomic_write_bytes, read_json

from .methods import SEPARATE_MIN_PER_CLASS
from .metrics import AGGREGATION_METRICS, GROUP_SEPARATOR, group_header, group_patient_counts, groupings
from .protocols import FAIRNESS_AGGREGATIONS

MODEL_MEAN = "mean"
PLOT_MIN_SHARE = 0.01
FAIRNESS_LABELS = {"di_weighted": "DI weighted", "di_averaged": "DI averaged", "theil": "Theil",
                   "f1_variance": "F1 variance", "equalized_odds": "Eq. odds", "equal_opportunity": "Eq. opp.",
                   "fpr_difference": "FPR gap", "demographic_parity": "Dem. parity",
                   "di_weighted_of_means": "DI weighted", "di_averaged_of_means": "DI averaged",
                   "theil_of_means": "Theil", "f1_sd_of_means": "F1 SD"}
AGGREGATION_TITLES = {"mean-of-units": "mean of units: per (fold, model), then averaged; groups under the run's "
                                       "minimum share left out, undefined F1 dropped",
                      "paper": "the paper's: once, on the group F1s averaged over models and folds; every group, "
                               "undefined F1 as 0"}
GAP_METRICS = ("equalized_odds", "equal_opportunity", "fpr_difference", "demographic_parity")


def fmt(mean: float | None, se: float | None = None, digits: int = 3) -> str:
    """``0.457 ± 0.012``; ``n/a`` for a missing or undefined value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(summary: pl.DataFrame, **where) -> tuple[float | None, float | None]:
    cond = pl.lit(True)
    for k, v in where.items():
        cond = cond & (pl.col(k).is_null() if v is None else pl.col(k) == v)
    hit = summary.filter(cond)
    return (hit["mean"][0], hit["se"][0]) if hit.height else (None, None)


def _groups_of(summary: pl.DataFrame, attribute: str) -> list[str]:
    return sorted(summary.filter((pl.col("attribute") == attribute) & pl.col("group").is_not_null())
                  ["group"].unique().to_list())


def _plotted_groups(summary: pl.DataFrame, attribute: str, method: str) -> list[str]:
    """The groups holding at least ``PLOT_MIN_SHARE`` of the test visits (tiny groups only add noise)."""
    groups = _groups_of(summary, attribute)
    n = {g: _cell(summary, method=method, model=MODEL_MEAN, attribute=attribute, group=g, metric="n")[0] or 0
         for g in groups}
    total = sum(n.values())
    return [g for g in groups if total and n[g] / total >= PLOT_MIN_SHARE]


# ---------------------------------------------------------------------- tables
def overall_table(summary: pl.DataFrame, methods: Sequence[str], models: Sequence[str], metric: str = "f1") -> str:
    """Methods x models (+ the model mean and its change against ``original``)."""
    base, _ = _cell(summary, method="original", model=MODEL_MEAN, attribute=None, group=None, metric=metric)
    rows = []
    for m in methods:
        cells = [fmt(*_cell(summary, method=m, model=x, attribute=None, group=None, metric=metric))
                 for x in (*models, MODEL_MEAN)]
        mean, _ = _cell(summary, method=m, model=MODEL_MEAN, attribute=None, group=None, metric=metric)
        change = f"{100 * (mean - base) / base:+.1f}%" if base and mean is not None and not math.isnan(mean) else "n/a"
        rows.append([m, *cells, change])
    return markdown_table(["method", *models, "mean of models", "vs original"], rows)


def fairness_flags(theil: float | None, di: float | None, base_theil: float | None, base_di: float | None) -> str:
    """``Theil lower; DI nearer 1`` (or ``not``) against the reference values; empty where undefined."""
    defined = lambda *v: all(x is not None and not math.isnan(x) for x in v)  # noqa: E731
    flags = []
    if defined(theil, base_theil):
        flags.append("Theil lower" if theil < base_theil else "Theil not lower")
    if defined(di, base_di):
        flags.append("DI nearer 1" if abs(1 - di) < abs(1 - base_di) else "DI not nearer 1")
    return "; ".join(flags)


def fairness_table(summary: pl.DataFrame, methods: Sequence[str], attribute: str,
                   aggregation: str = "mean-of-units") -> str:
    """Theil, disparate impact and the F1 spread of one aggregation (:data:`AGGREGATION_METRICS`)
    per method, averaged over models; flags Theil / DI against ``original``."""
    names = AGGREGATION_METRICS[aggregation]

    def value(m, metric):
        return _cell(summary, method=m, model=MODEL_MEAN, attribute=attribute, group=None, metric=metric)

    columns = [names[k] for k in ("theil", "di_weighted", "di_averaged", "spread")]
    rows = []
    for m in methods:
        flags = "" if m == "original" else fairness_flags(
            value(m, names["theil"])[0], value(m, names["di_weighted"])[0],
            value("original", names["theil"])[0], value("original", names["di_weighted"])[0])
        rows.append([m, *(fmt(*value(m, k)) for k in columns), flags])
    return markdown_table(["method", *(FAIRNESS_LABELS[k] for k in columns), "vs original"], rows)


def gap_table(summary: pl.DataFrame, methods: Sequence[str], attribute: str) -> str:
    """The group gaps of the decisions (equalized odds, equal opportunity, FPR, demographic parity)."""
    rows = [[m, *(fmt(*_cell(summary, method=m, model=MODEL_MEAN, attribute=attribute, group=None, metric=k))
                  for k in GAP_METRICS)] for m in methods]
    return markdown_table(["method", *(FAIRNESS_LABELS[k] for k in GAP_METRICS)], rows)


def group_table(summary: pl.DataFrame, methods: Sequence[str], attribute: str, metric: str,
                counts: Mapping[str, tuple[int, int]] | None = None) -> str:
    """Methods x groups of one metric, averaged over models; the header gives each group's test patients
    and deaths over all folds (``counts``, :func:`benchmarks.metrics.group_patient_counts`)."""
    groups = _groups_of(summary, attribute)
    counts = counts or {}
    header = [group_header(g, *counts[g]) if g in counts else g for g in groups]
    rows = [[m, *(fmt(*_cell(summary, method=m, model=MODEL_MEAN, attribute=attribute, group=g, metric=metric))
                  for g in groups)] for m in methods]
    return markdown_table(["method", *header], rows)


def training_table(units: pl.DataFrame, methods: Sequence[str]) -> str:
    """Training rows per method (mean over folds) and seconds (summed over folds and models)."""
    per = (units.group_by("method", "fold")
           .agg(pl.col("n_train_rows", "n_train_positive", "n_synthetic_rows", "n_copied_rows").first(),
                pl.col("method_seconds").first(), pl.col("fit_seconds").sum()))
    agg = per.group_by("method").agg(pl.col("n_train_rows", "n_train_positive", "n_synthetic_rows",
                                            "n_copied_rows").mean(),
                                     pl.col("method_seconds", "fit_seconds").sum())
    rows = []
    for m in methods:
        r = agg.filter(pl.col("method") == m)
        if r.height:
            r = r.row(0, named=True)
            rows.append([m, f"{r['n_train_rows']:.0f}", f"{r['n_train_positive']:.0f}",
                         f"{r['n_synthetic_rows']:.0f}", f"{r['n_copied_rows']:.0f}",
                         f"{r['method_seconds']:.1f}", f"{r['fit_seconds']:.1f}"])
    return markdown_table(["method", "training visits", "positive", "synthetic", "copies",
                           "method s", "model fits s"], rows)


SYNTHETIC_COLUMNS = ("n_synthetic_rows", "n_synthetic_distinct", "n_synthetic_training_copies", "fidelity_unigram_r2",
                     "fidelity_pair_r2", "fidelity_ceiling_unigram_r2", "fidelity_ceiling_pair_r2",
                     "generator_shortfall", "method_seconds")


def synthetic_table(units: pl.DataFrame, methods: Sequence[str]) -> str:
    """Binary synthetic rows per method (``benchmarks.synthetic_rows``), mean over folds; "" if none."""
    if "fidelity_unigram_r2" not in units.columns:
        return ""
    present = [c for c in SYNTHETIC_COLUMNS if c in units.columns]
    per = (units.filter(pl.col("fidelity_unigram_r2").is_not_null()).group_by("method", "fold")
           .agg(pl.col(*present).first()))
    agg = per.group_by("method").agg(pl.col(*present).cast(pl.Float64).mean(), pl.len().alias("folds"))
    rows = []
    for m in methods:
        r = agg.filter(pl.col("method") == m)
        if r.height:
            r = r.row(0, named=True)
            rows.append([m, f"{r['n_synthetic_rows']:.0f}", f"{r['n_synthetic_distinct']:.0f}",
                         f"{r['n_synthetic_training_copies']:.0f}", fmt(r["fidelity_unigram_r2"]),
                         fmt(r["fidelity_pair_r2"]), fmt(r["fidelity_ceiling_unigram_r2"]),
                         fmt(r["fidelity_ceiling_pair_r2"]), fmt(r.get("generator_shortfall"), digits=0),
                         f"{r['method_seconds']:.1f}", str(r["folds"])])
    return markdown_table(["method", "synthetic rows", "distinct", "copies of training rows", "unigram R^2",
                           "pair R^2", "ceiling unigram", "ceiling pair", "shortfall", "method s per fold",
                           "folds"], rows) if rows else ""


# ---------------------------------------------------------------------- plots
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _series(summary: pl.DataFrame, method: str, attribute: str, groups: Sequence[str], metric: str):
    vals = [_cell(summary, method=method, model=MODEL_MEAN, attribute=attribute, group=g, metric=metric)
            for g in groups]
    return (np.array([np.nan if v is None else v for v, _ in vals], dtype=float),
            np.array([np.nan if s is None else s for _, s in vals], dtype=float))


def save_figure(fig, path: str | Path, **savefig: Any) -> None:
    """Write ``fig`` to ``path`` atomically (rendered in memory, then a temporary file renamed), in the
    format of its suffix (PNG without one); ``savefig`` overrides the defaults ``dpi=120, bbox_inches="tight"``."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, **{"format": path.suffix.lstrip(".").lower() or "png", "dpi": 120, "bbox_inches": "tight",
                        **savefig})
    atomic_write_bytes(path, buf.getvalue())


def plot_group_bars(summary: pl.DataFrame, methods: Sequence[str], attribute: str, metrics: Sequence[str],
                    path: Path) -> Path:
    """Grouped bars per group (one bar per method) for each metric, with standard-error whiskers;
    groups under 1% of the test visits are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _plotted_groups(summary, attribute, methods[0])
    width_in = min(16, max(6, 0.3 * len(groups) * len(methods)))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(width_in, 3.2 * len(metrics)), squeeze=False)
    x, width = np.arange(len(groups)), 0.8 / len(methods)
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        for i, m in enumerate(methods):
            mean, se = _series(summary, m, attribute, groups, metric)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(mean), width, yerr=np.nan_to_num(se),
                   label=m, capsize=2)
        ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} by {attribute} (mean over models, ± SE over folds)")
    axes[0, 0].legend(ncol=min(len(methods), 4), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_radar(summary: pl.DataFrame, methods: Sequence[str], attribute: str, path: Path,
               metric: str = "f1") -> Path | None:
    """Per-group ``metric`` on a radar chart, one polygon per method; groups under 1% of visits left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _plotted_groups(summary, attribute, methods[0])
    if len(groups) < 3:
        return None
    angles = np.linspace(0, 2 * np.pi, len(groups), endpoint=False)
    fig, ax = plt.subplots(figsize=(7, 7), subplot_kw={"projection": "polar"})
    for m in methods:
        mean, _ = _series(summary, m, attribute, groups, metric)
        vals = np.nan_to_num(mean)
        style = {"linewidth": 2.5} if m in ("original", "fairplay") else {"linewidth": 1, "alpha": 0.7}
        ax.plot(np.append(angles, angles[0]), np.append(vals, vals[0]), label=m, **style)
    ax.set_xticks(angles, [g.replace(GROUP_SEPARATOR, "\n") for g in groups], fontsize=8)
    ax.set_title(f"{metric} by {attribute} (mean over models and folds)")
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def _cell_label(name: str) -> str:
    label, _, group = name.partition("|")
    return f"{group.replace(GROUP_SEPARATOR, ' & ') or 'all'}, y={label}"


def cell_counts(units: pl.DataFrame, run: dict) -> dict[str, dict[str, float]]:
    """``{method: {cell: training visits, mean over folds}}`` of the methods whose rows are grouped
    by the balanced attributes (the balancing methods and ``original``)."""
    attributes = " & ".join(run.get("balance_by", run["groups"]))
    if "train_cells" not in units.columns:
        return {}
    out: dict[str, dict[str, float]] = {}
    per = units.filter(pl.col("cell_attributes") == attributes).group_by("method", "fold").agg(
        pl.col("train_cells").first())
    for method in run["methods"]:
        rows = per.filter(pl.col("method") == method)["train_cells"].to_list()
        if rows:
            total: dict[str, float] = {}
            for text in rows:
                for cell, n in json.loads(text).items():
                    total[cell] = total.get(cell, 0.0) + n / len(rows)
            out[method] = total
    return out


def plot_cells(units: pl.DataFrame, run: dict, path: Path, *, ax=None) -> Path | None:
    """Training visits per cell, one bar per method (the paper's Fig. 2, before and after balancing)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = cell_counts(units, run)
    methods = [m for m in counts if m != "separate"]
    if "original" not in counts or len(methods) < 2:
        return None
    cells = sorted({c for m in methods for c in counts[m]}, key=lambda c: (c.partition("|")[2], c))
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(cells) * len(methods) / 2), 3.6))
    x, width = np.arange(len(cells)), 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [counts[m].get(c, 0) for c in cells], width, label=m)
    ax.set_xticks(x, [_cell_label(c) for c in cells], rotation=30 if len(cells) > 4 else 0,
                  ha="right" if len(cells) > 4 else "center", fontsize=8)
    ax.set_ylabel("training visits (mean over folds)")
    ax.set_title(f"Cells of {_balanced_by(run)}, before and after balancing", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if own:
        fig.tight_layout()
        save_figure(fig, path)
        plt.close(fig)
    return path


def plot_ratio_sweep(summary: pl.DataFrame, run: dict, path: Path, aggregation: str | None = None) -> Path | None:
    """F1, and Theil and weighted DI in both aggregations (``aggregation``, default the run's
    headline, first), against the ratio, one line per method that has one (the paper's
    Supplementary Fig. 1); ``None`` unless the run swept several ratios. The fairness panels cover
    each attribute (their intersection too when the run has one attribute only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _variants(run)
    swept: dict[str, list[tuple[float, str]]] = {}
    for label, v in variants.items():
        if label != v["method"] and v.get("ratio") is not None:
            swept.setdefault(v["method"], []).append((float(v["ratio"]), label))
    if not swept:
        return None
    first = aggregation or headline_aggregation(run)
    order = [first, *(a for a in FAIRNESS_AGGREGATIONS if a != first)]
    short = {"mean-of-units": "units", "paper": "paper"}
    attributes = [a for a, attrs in groupings(run["groups"]) if len(attrs) == 1]
    panels = [(None, "f1", "F1 (mean of models)")] + [
        (a, AGGREGATION_METRICS[agg][k], f"{FAIRNESS_LABELS[AGGREGATION_METRICS[agg][k]]} ({short[agg]}), {a}")
        for a in attributes for k in ("theil", "di_weighted") for agg in order]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
    for ax, (attribute, metric, title) in zip(axes.ravel(), panels):
        base, _ = _cell(summary, method="original", model=MODEL_MEAN, attribute=attribute, group=None, metric=metric)
        for method, points in swept.items():
            points = sorted(points)
            vals = [_cell(summary, method=label, model=MODEL_MEAN, attribute=attribute, group=None, metric=metric)
                    for _, label in points]
            mean = np.array([np.nan if v is None else v for v, _ in vals], dtype=float)
            se = np.array([np.nan if s is None else s for _, s in vals], dtype=float)
            ax.errorbar([r for r, _ in points], mean, yerr=np.nan_to_num(se), marker="o", capsize=2, label=method)
        if base is not None and not math.isnan(base):
            ax.axhline(base, color="grey", ls="--", lw=1, label="original")
        ax.set_xscale("log", base=2)
        ratios = sorted({r for points in swept.values() for r, _ in points})
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_xlabel("ratio of each cell's gap filled")
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- the report
def _partial_methods_note(summary: pl.DataFrame, methods: Sequence[str], models: Sequence[str]) -> str:
    """A sentence naming the methods that ran with some of the models only (their mean is over those)."""
    ran = summary.group_by("method").agg(pl.col("model").unique())
    ran = {r["method"]: set(r["model"]) for r in ran.iter_rows(named=True)}
    partial = [f"{m} ({', '.join(x for x in models if x in ran.get(m, ()))})" for m in methods
               if not set(models) <= ran.get(m, set())]
    return (" Some methods run with some of the models only, and their `mean of models` averages those: "
            + "; ".join(partial) + ".") if partial else ""


def _variants(run: dict) -> dict[str, dict]:
    """``{label: {"method", "ratio"}}`` of a run (runs written before sweeps existed: one per method)."""
    return run.get("variants") or {m: {"method": m, "ratio": run.get("ratio")} for m in run["methods"]}


def _balanced_by(run: dict) -> str:
    balance_by = run.get("balance_by", run["groups"])
    return f"outcome x {' & '.join(balance_by)}" if balance_by else "outcome only"


def _protocol_line(run: dict) -> str:
    protocol = run.get("protocol") or {"name": "project", "overrides": []}
    overrides = protocol.get("overrides", [])
    extra = f", overridden: {', '.join(f'{k} {protocol[k]}' for k in overrides)}" if overrides else ""
    return (f"- protocol: `{protocol['name']}`{extra} (benchmarks/PROTOCOLS.md); downstream parameters "
            f"`{protocol.get('model_params', 'project')}`, downsampling floor {protocol.get('downsample_floor', 0)}, "
            f"SMOTE {protocol.get('smote_classes', 'per-cell')}{' binarised' if protocol.get('smote_binarize') else ''}, "
            f"generator conditioned on {protocol.get('generator_conditioning', 'all')} attributes, headline "
            f"fairness aggregation {protocol.get('fairness_aggregation', 'mean-of-units')}")


def headline_aggregation(run: dict) -> str:
    """The fairness aggregation a run's report leads with (its protocol's)."""
    return (run.get("protocol") or {}).get("fairness_aggregation", "mean-of-units")


def write_report(out: str | Path) -> Path:
    """Write ``out/report.md`` and ``out/plots/*.png`` from a finished k-fold folder."""
    out = Path(out)
    check_run(out)
    run = read_json(out / "run.json")
    summary, units = pl.read_parquet(out / "summary.parquet"), pl.read_parquet(out / "units.parquet")
    methods = [m for m in run["methods"] if m in set(summary["method"])]
    models = [m for m in run["models"] if m in set(summary["model"])]
    counts = group_patient_counts(pl.scan_parquet(out / "predictions.parquet"), run["groups"])
    finest = groupings(run["groups"])[-1][0]
    last = run["invocations"][-1]
    aggregation = headline_aggregation(run)
    others = [a for a in FAIRNESS_AGGREGATIONS if a != aggregation]
    lines = [
        "# k-fold benchmark report", "",
        _protocol_line(run),
        f"- data: `{run['data']}` (sha256 {run['data_fingerprint'][:12]})",
        f"- evaluation groups: {', '.join(run['groups'])}; balanced by: {_balanced_by(run)}; folds: {run['folds']} "
        f"(patient level, stratified by outcome x {', '.join(run['stratify'])}); seed: {run['seed']}",
        f"- methods: {', '.join(methods)}; models: {', '.join(models)}; "
        f"threshold: score > {run['downstream_threshold']}",
        f"- balancing: ratio {run['ratio']}, min cell size {run['min_cell_size']}; FairPlay: {run['fairplay']}",
        f"- fairness measures of the mean-of-units aggregation leave out groups under "
        f"{100 * run.get('fairness_min_share', 0):g}% of a fold's training patients (they keep their per-group "
        "rows); the paper's aggregation keeps every group",
        f"- machine: {last.get('machine')}; jobs: {last.get('jobs')}; this invocation: "
        f"{last.get('wall_seconds', 'n/a')} s, {last.get('units_computed', 'n/a')} units computed",
        f"- versions: {', '.join(f'{k} {v}' for k, v in run['versions'].items())}", "",
        "Values are mean ± standard error over folds; `mean of models` averages the downstream models "
        "within each fold first. Metrics are computed on test visits; the group headers count test patients "
        "(each is tested in one fold) and those who died." + _partial_methods_note(summary, methods, models),
        "",
        "## Headline", "", f"Averaged over models; Theil index and weighted disparate impact over {finest} "
        f"({aggregation} aggregation).", "",
        headline(out), "",
        "## Overall F1", "", overall_table(summary, methods, models, "f1"), "",
        "## Overall AUROC", "", overall_table(summary, methods, models, "auroc"), "",
    ]
    plots = out / "plots"
    sweep = plot_ratio_sweep(summary, run, plots / "ratio_sweep.png")
    if sweep is not None:
        lines += ["## Amount of added data", "",
                  "F1 (mean of models, ± SE), and Theil and weighted DI in both aggregations (the protocol's, "
                  f"{aggregation}, first) against the ratio of each cell's gap filled; the dashed line is "
                  "`original`.", "", f"![ratio sweep](plots/{sweep.name})", ""]
    cells = plot_cells(units, run, plots / "cells.png")
    if cells is not None:
        lines += [f"## Training data per cell ({_balanced_by(run)})", "",
                  "Training visits per (visit label x balanced groups) cell handed to the downstream models, mean "
                  "over folds, before (`original`) and after each balancing method.", "",
                  f"![cells](plots/{cells.name})", ""]
    for attribute, attrs in groupings(run["groups"]):
        lines += [f"## Fairness across {attribute}", "",
                  "Averaged over models. DI = FairPlay's disparate impact (minority F1 / majority F1; weighted by "
                  "group size, or averaged), nearer 1 is fairer; Theil index over group F1s, lower is fairer; the "
                  "spread is the variance (mean of units) or standard deviation (paper) of the group F1s; the gaps "
                  "are largest minus smallest group value.", "",
                  f"Aggregation: {AGGREGATION_TITLES[aggregation]}.", "",
                  fairness_table(summary, methods, attribute, aggregation), ""]
        for other in others:
            lines += [f"Aggregation: {AGGREGATION_TITLES[other]}.", "",
                      fairness_table(summary, methods, attribute, other), ""]
        lines += ["Gaps (mean of units):", "", gap_table(summary, methods, attribute), "",
                  f"### F1 by {attribute}", "", group_table(summary, methods, attribute, "f1", counts[attribute]), "",
                  f"### Underdiagnosis rate (1 - TPR) by {attribute}", "",
                  group_table(summary, methods, attribute, "underdiagnosis", counts[attribute]), "",
                  f"### FPR by {attribute}", "", group_table(summary, methods, attribute, "fpr", counts[attribute]), ""]
        bars = plot_group_bars(summary, methods, attribute, ["f1"], plots / f"group_f1_{_slug(attribute)}.png")
        gaps = plot_group_bars(summary, methods, attribute, ["fpr", "underdiagnosis"],
                               plots / f"group_fpr_udr_{_slug(attribute)}.png")
        lines += [f"![F1 by {attribute}](plots/{bars.name})", "", f"![FPR and underdiagnosis by {attribute}]"
                  f"(plots/{gaps.name})", ""]
        if len(attrs) > 1:
            radar = plot_radar(summary, methods, attribute, plots / f"radar_f1_{_slug(attribute)}.png")
            if radar is not None:
                lines += [f"![F1 radar, {attribute}](plots/{radar.name})", ""]
    lines += ["## Training data and time", "",
              "Visits each method hands to the downstream models (mean over folds) and seconds summed over "
              "folds (and models).", "", training_table(units, methods), ""]
    synthetic = synthetic_table(units, methods)
    if synthetic:
        lines += ["## Synthetic rows", "",
                  "Methods whose synthetic rows are binary, mean over folds: distinct rows, rows equal to a real "
                  "training row, per-visit unigram and pair R^2 against the training rows of the same cells "
                  "(mixed in the synthetic rows' cell proportions), the same between the fold's test and "
                  "training rows (ceiling), cell rows a generator could not supply (shortfall), and the "
                  "method's seconds per fold (`benchmarks.synthetic_rows`).", "", synthetic, ""]
    fairplay = [m for m, v in _variants(run).items() if v["method"] == "fairplay"]
    fp = units.filter(pl.col("method").is_in(fairplay)).group_by("method", "fold").agg(pl.all().first())
    if fp.height:
        cached = fp["generator_cached"] if "generator_cached" in fp.columns else pl.Series([None] * fp.height)
        where = (f" ({int((~cached.cast(pl.Boolean)).sum())} of {fp.height} trained here, the others loaded "
                 "from the cache)" if cached.null_count() == 0 else "")
        lines += [f"FairPlay, summed over folds: generator {fp['generator_seconds'].sum():.0f} s{where}, "
                  f"balancing {fp['balance_seconds'].sum():.0f} s; both are included in its `method s`.", ""]
    pooled = (units.filter(pl.col("pooled_groups") != "").group_by("fold").agg(pl.col("pooled_groups").first())
              .sort("fold"))
    if pooled.height:
        lines += ["`separate` scored these test groups with the pooled model (fewer than "
                  f"{SEPARATE_MIN_PER_CLASS} training visits of a class for a model of their own): " + "; ".join(
                      f"fold {r['fold']}: {r['pooled_groups']}" for r in pooled.iter_rows(named=True)), ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def headline(out: str | Path) -> str:
    """The headline table of a finished k-fold folder, the first table of its report: per method, F1
    (and its change against ``original``), AUROC, Theil index and weighted disparate impact, averaged
    over models (:func:`compare_runs` of this one run)."""
    return compare_runs([out])


RUN_FILES = ("run.json", "summary.parquet", "units.parquet", "predictions.parquet")


def check_run(out: str | Path) -> None:
    """Fail unless ``out`` holds the tables of a finished k-fold run."""
    missing = [name for name in RUN_FILES if not (Path(out) / name).is_file()]
    if missing:
        raise HaloBalanceError(f"{out} is not a finished k-fold run (missing {', '.join(missing)}); pass the --out "
                               "folder of a `python -m benchmarks.kfold` run that has finished, or rerun it")


def compare_runs(outs: Sequence[str | Path], *, aggregation: str | None = None, attribute: str | None = None) -> str:
    """One markdown table across finished runs (e.g. the experiments of a dataset, or one experiment
    under both protocols): per method, each run's mean-of-models F1 (and its change against
    ``original``), AUROC, Theil index and weighted disparate impact.

    ``aggregation`` picks the fairness aggregation (default: each run's headline, named in the
    header); ``attribute`` the grouping of the fairness columns (default: a run's last grouping,
    the intersection of its attributes when it has several).
    """
    header, columns = ["method"], []
    for out in outs:
        run = read_json(Path(out) / "run.json")
        summary = pl.read_parquet(Path(out) / "summary.parquet")
        attr = attribute or groupings(run["groups"])[-1][0]
        agg = aggregation or headline_aggregation(run)
        protocol = (run.get("protocol") or {}).get("name", "project")
        header += [f"{protocol}, {attr}: F1", "AUROC", f"Theil ({agg})", f"DI ({agg})"]
        columns.append((run["methods"], summary, attr, AGGREGATION_METRICS[agg]))
    methods = list(dict.fromkeys(m for ms, *_ in columns for m in ms))
    rows = []
    for m in methods:
        row = [m]
        for _, summary, attr, names in columns:
            def value(metric: str, a: str | None) -> tuple[float | None, float | None]:
                return _cell(summary, method=m, model=MODEL_MEAN, attribute=a, group=None, metric=metric)

            f1, se = value("f1", None)
            base = _cell(summary, method="original", model=MODEL_MEAN, attribute=None, group=None, metric="f1")[0]
            change = f" ({100 * (f1 - base) / base:+.0f}%)" if f1 is not None and base else ""
            row += [fmt(f1, se) + change, fmt(value("auroc", None)[0]), fmt(value(names["theil"], attr)[0]),
                    fmt(value(names["di_weighted"], attr)[0])]
        rows.append(row)
    return markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Re-render a k-fold report, or compare finished runs.")
    p.add_argument("out", nargs="+", help="the --out folder(s) of finished benchmarks.kfold runs")
    p.add_argument("--compare", action="store_true",
                   help="print one table across the runs (F1, AUROC, Theil, DI per method) instead")
    p.add_argument("--aggregation", choices=FAIRNESS_AGGREGATIONS, default=None,
                   help="with --compare: the fairness aggregation (default: each run's protocol's)")
    p.add_argument("--attribute", default=None,
                   help="with --compare: the grouping of the fairness columns (default: each run's last)")
    p.add_argument("--cells-figure", default=None, metavar="PNG",
                   help="write one figure of the training cells before and after balancing of every run")
    args = p.parse_args(argv)
    for out in args.out:  # every folder before any output
        check_run(out)
    if args.cells_figure:
        print(plot_cells_of_runs(args.out, Path(args.cells_figure)))
        return
    if args.compare:
        print(compare_runs(args.out, aggregation=args.aggregation, attribute=args.attribute))
        return
    for out in args.out:
        print(write_report(out))


def plot_cells_of_runs(outs: Sequence[str | Path], path: Path) -> Path:
    """The training cells before and after balancing of several runs, one panel each (the paper's
    Fig. 2 for a set of experiments)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(outs), 1, figsize=(8, 3.2 * len(outs)), squeeze=False)
    for ax, out in zip(axes[:, 0], outs, strict=True):
        run = read_json(Path(out) / "run.json")
        if plot_cells(pl.read_parquet(Path(out) / "units.parquet"), run, path, ax=ax) is None:
            raise HaloBalanceError(f"{out} holds no balancing method beside original; nothing to plot")
        protocol = (run.get("protocol") or {}).get("name", "project")
        ax.set_title(f"{ax.get_title()} ({protocol} protocol)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
