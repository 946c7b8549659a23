"""k-fold benchmark: rebalancing methods x downstream models x performance and fairness metrics.

::

    python -m benchmarks.kfold --data PREPARED --groups ATTR [ATTR ...] --out DIR
        [--protocol project|paper] [--balance-by [ATTR ...]] [--ratio R [R ...]]
        [--folds 5] [--methods original,upsample,downsample,smote,smoten,separate,fairplay]
        [--models knn,logreg,mlp,rf,xgboost] [--seed 0] [--jobs 1] [--device auto]
        [--stratify ATTR ...] [--min-cell-size N] [--downsample-floor N]
        [--smote-classes per-cell|combined] [--smote-binarize | --no-smote-binarize]
        [--model-params project|paper] [--generator-conditioning all|balanced]
        [--fairness-aggregation mean-of-units|paper]
        [--train-options JSON] [--batch-size 256] [--allow-copies] [--generator-cache DIR]
        [--adversary-attribute ATTR ...] [--generator-options JSON] [--fairness-min-share 0.01]
        [--overwrite] [--no-progress]
        [--backend local|ray] [--ray-address auto|HOST:PORT|local] [--generator-gpus G]
        [--generator-threads 1]

``--protocol`` picks every choice that differs between this project's protocol and the published
FairPlay experiments (:mod:`benchmarks.protocols`); the single options after it override one
choice each. ``--groups`` are the evaluation groups: every fairness measure is taken across them.
``--balance-by`` names the attributes a rebalancing method crosses with the outcome to form its
cells (:mod:`benchmarks.cells`; default: the ``--groups``); given with no attribute (or as
``outcome``) the methods balance the outcome only, while fairness is still measured across the
``--groups`` (the paper's Table 2). Several ``--ratio`` values run every method that has a ratio
once per value (``upsample@0.5``, ``fairplay@2``, ...; FairPlay's generators are shared), for a
sweep of the amount of added data (the paper's Supplementary Fig. 1).

Folds are patient-level and stratified by outcome x the ``--stratify`` attributes (default: the
``--groups``; :meth:`PreparedDataset.kfold`). Pass the same ``--stratify`` to several experiments
on one dataset to give them the same folds (as the paper does), which also lets them share
FairPlay generators through ``--generator-cache``. In each fold every method sees only the fold's
training patients (``benchmarks.methods``; the further mitigation methods of
``benchmarks.fairness_methods``, ``importance_weighting``, ``group_resample``, ``threshold_optimizer``,
``exponentiated_gradient``, ``adversarial_debiasing`` and ``fairplay_threshold``, are selected by
name the same way and run with the models they support; ``adversarial_debiasing`` targets the
``--adversary-attribute``, default the ``--balance-by`` attributes, or the ``--groups`` when only
the outcome is balanced, several = their intersection; so are the
generative baselines ``mcrage``, ``sma``, ``ctgan`` and ``tvae`` of ``benchmarks.generative``, whose
keyword arguments ``--generator-options`` gives per method); every downstream
model (``benchmarks.downstream``) is trained on the method's visit rows and scores the real visits
of the fold's test patients; the
metrics (``benchmarks.metrics``) come from those predictions; groups under ``--fairness-min-share``
of a fold's training patients (default 1%, the paper's cut) keep their per-group metrics but are
left out of the fairness measures. Seeds: the method and the models of fold k use ``seed + k``.

Every option is checked before anything is written (``_check_config``): unknown methods, models,
attributes and ``--train-options`` names or choices (with the closest suggested), ``--folds`` above
the number of patients with the rarer outcome, an ``--out`` that cannot be created or overlaps
``--data``. One progress bar covers the run: every unit and every FairPlay fold
(``GENERATOR_WEIGHT`` units when its generator must be trained, ``BALANCE_WEIGHT`` when a cached
one balances it), with an ETA. Ctrl-C says how many finished units and FairPlay generators were
kept for a rerun. The run ends by printing the report's headline table
(``benchmarks.report.headline``).

Where the work runs (``benchmarks.executors``): ``--backend local`` (default) runs it in ``--jobs``
processes here; ``--backend ray`` makes every unit batch and every fold's generator a Ray task on
the cluster at ``--ray-address``, the generators asking for ``--generator-gpus`` GPUs (default one
where the cluster has GPUs) and the FairPlay units of a fold depending on its generator (in a
ratio sweep, one FairPlay job per fold and ratio; a fold's later ratios wait for its first, which
trains the generator they reuse). Both write the same files, so a run started on one backend resumes on the other. A generator runs with
``--generator-threads`` torch threads (default 1) and each unit with one thread wherever it runs,
so that the outputs do not depend on the backend or the machine's cores.

The output folder::

    run.json              settings (the protocol's effective choices included), data fingerprint,
                          versions, wall times of each invocation
    folds.parquet         patient_id, fold (the fold in which the patient is tested)
    units/fold=K/METHOD/MODEL.parquet (+ .json)   one finished (fold, method, model) unit
    fairplay/foldK-HASH/  FairPlay's balanced training data of fold K (+ plan.parquet)
    generators/           FairPlay generators, one per fold and settings (or --generator-cache)
    predictions.parquet   fold, method, model, patient_id, visit_index, <groups>, y_true, score, prediction
    metrics.parquet       fold, method, model, attribute, group, metric, value (tidy, long); the
                          fairness measures of the paper's aggregation have a null fold
    summary.parquet       method, model (``mean`` = averaged over models), attribute, group, metric,
                          mean, se, n_folds
    units.parquet         per unit: training rows, positives, synthetic and copied rows, training
                          rows per cell (JSON), fallbacks, seconds, and ``fit_report`` (JSON) where a
                          method records its own choices (the alpha that adversarial_debiasing
                          selected, with every candidate's figures); for binary synthetic rows their
                          distinct rows, copies of training rows and fidelity to the training rows of
                          their cells (``benchmarks.synthetic_rows``); a generative method's fit /
                          sampling seconds and per-cell counts
    report.md, plots/     the paper's tables and the plots (``benchmarks.report``)

Each unit is written atomically as it finishes, and a rerun into the same folder skips every unit
whose settings are unchanged, so an interrupted run resumes. A rerun with different data, groups,
folds, stratification or seed is refused (choose another ``--out`` or pass ``--overwrite``);
changing a method's settings (``--balance-by``, ``--ratio``, the protocol's choices, FairPlay's, a
generative method's ``--generator-options``) recomputes only the units that depend on them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from halo_balance.cli import json_object
from halo_balance.data import META_FILE, PATIENTS_FILE, VISITS_FILE, VOCAB_FILE, PreparedDataset, VisitMatrix
from halo_balance.distributed import BACKENDS, RAY_INSTALL, check_reachable
from halo_balance.errors import DatasetError, HaloBalanceError, unknown_choice
from halo_balance.io import atomic_write_bytes, check_output_dir, check_writable, read_json, write_json

from . import downstream, fairness_methods
from .cells import Balancing, cell_names, group_names
from .executors import Job, limit_threads, make_executor
from .generative import check_options, result_options
from .methods import GENERATIVE_METHODS, METHODS, PER_GROUP_METHODS, FairPlaySettings, SeparateModels, SingleModel, \
    build_training_set, check_train_options, fairplay_dataset, generator_key, settings_hash, training_rows
from .metrics import groupings, group_labels, paper_fairness, summarise, unit_metrics
from .protocols import (FAIRNESS_AGGREGATIONS, GENERATOR_CONDITIONINGS, PROTOCOL_NAMES, SMOTE_CLASSES, Protocol,
                        resolve_protocol)
from .synthetic_rows import describe_synthetic

RUN_FILE = "run.json"
TIMING_FILE = "timing.json"
# Settings that define the folds and the test sets: a folder holds one combination only.
RUN_IDENTITY = ("data_fingerprint", "groups", "stratify", "folds", "seed")
ALL_METHODS: tuple[str, ...] = METHODS + GENERATIVE_METHODS + fairness_methods.METHODS
# methods whose settings include the cells' ratio and minimum size (they have a ratio), and those
# trained on FairPlay's data
_CELL_METHODS = {"upsample", "downsample", "smote", "smoten", "fairplay", "fairplay-data", "importance_weighting",
                 "group_resample", "fairplay_threshold", *GENERATIVE_METHODS}
_FAIRPLAY_DATA = {"fairplay", "fairplay-data"} | {m for m, kind in fairness_methods.TRAINING_DATA.items()
                                                  if kind == "fairplay"}
_PER_GROUP = set(PER_GROUP_METHODS) | set(fairness_methods.PER_GROUP_METHODS)
OUTCOME_ONLY = "outcome"  # --balance-by outcome: the outcome alone
RATIO_SEPARATOR = "@"  # a method's label in a sweep of several ratios: upsample@0.5


def uses_fairplay_data(method: str) -> bool:
    """Whether ``method`` trains on FairPlay's balanced data of the fold."""
    return base_method(method) in _FAIRPLAY_DATA


def has_ratio(method: str) -> bool:
    """Whether ``method`` fills (or cuts) its cells by a ratio of their gaps."""
    return base_method(method) in _CELL_METHODS


def base_method(label: str) -> str:
    """The method of a label (``fairplay@0.5`` -> ``fairplay``)."""
    return label.split(RATIO_SEPARATOR)[0]


def supports(method: str, model: str) -> bool:
    """Whether the harness runs ``method`` (or its label) with downstream ``model`` (other pairs are skipped)."""
    method = base_method(method)
    return method not in fairness_methods.METHODS or fairness_methods.supports(method, model)


@dataclass(frozen=True)
class Variant:
    """A method as run: its label in the outputs, the method and its ratio."""

    label: str
    method: str
    ratio: float


@dataclass(frozen=True)
class _Config:
    """Everything that defines a k-fold run (the keyword arguments of :func:`run_kfold`)."""

    data: str
    groups: tuple[str, ...]
    out: str
    folds: int
    methods: tuple[str, ...]
    models: tuple[str, ...]
    seed: int
    jobs: int
    stratify: tuple[str, ...] | None
    balance_by: tuple[str, ...]
    ratios: tuple[float, ...]
    protocol: Protocol
    fairplay: FairPlaySettings
    generator_cache: str | None
    fairness_min_share: float
    overwrite: bool
    progress: bool
    adversary_attribute: tuple[str, ...] | None = None
    backend: str = "local"
    ray_address: str = "auto"
    generator_gpus: float | None = None
    generator_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def adversary(self) -> tuple[str, ...]:
        """The attributes whose groups ``adversarial_debiasing``'s adversary predicts: the
        ``--adversary-attribute``, else the balanced attributes (the mitigation targets what the
        rebalancing methods balance), else, when only the outcome is balanced, the ``--groups``."""
        return self.adversary_attribute or self.balance_by or self.groups

    @property
    def min_cell_size(self) -> int:
        return self.protocol.min_cell_size

    def variants(self) -> list[Variant]:
        """Every method once, and a method with a ratio once per ``--ratio`` value when several are given."""
        sweep = len(self.ratios) > 1
        return [Variant(f"{m}{RATIO_SEPARATOR}{r:g}" if sweep and has_ratio(m) else m, m, r)
                for m in self.methods for r in (self.ratios if sweep and has_ratio(m) else self.ratios[:1])]

    def variant(self, label: str) -> Variant:
        return next(v for v in self.variants() if v.label == label)

    def balancing(self, ratio: float) -> Balancing:
        """The cells and targets of the rebalancing methods at ``ratio`` (:mod:`benchmarks.cells`)."""
        return Balancing(balance_by=self.balance_by, ratio=ratio, min_cell_size=self.protocol.min_cell_size,
                         downsample_floor=self.protocol.downsample_floor)

    def method_groups(self, method: str) -> tuple[str, ...]:
        """The attributes whose groups ``method``'s rows and estimator tell apart."""
        return self.balancing(1.0).groups_for(per_group=base_method(method) in _PER_GROUP, evaluation=self.groups)

    def unit_settings(self, label: str, model: str) -> str:
        """Hash of the settings a (method, model) unit depends on beyond the run identity: the
        model's hyper-parameters and the method's settings."""
        return settings_hash({**self.method_settings(base_method(label), self.variant(label).ratio),
                              "model": downstream.describe(model, self.protocol.model_params)})

    def method_settings(self, method: str, ratio: float) -> dict[str, Any]:
        """The settings of ``method`` at ``ratio`` that change its training rows or estimator.
        Settings at the values they had before they became options are left out, so that earlier
        runs stay valid."""
        settings: dict[str, Any] = {"method": method}
        if method in _CELL_METHODS:
            settings.update(ratio=ratio, min_cell_size=self.protocol.min_cell_size)
        groups = self.method_groups(method)
        if groups != self.groups:
            settings.update(groups=list(groups))
        if method == "downsample" and self.protocol.downsample_floor:
            settings.update(downsample_floor=self.protocol.downsample_floor)
        if method == "smote" and (self.protocol.smote_classes, self.protocol.smote_binarize) != ("per-cell", False):
            settings.update(smote_classes=self.protocol.smote_classes, smote_binarize=self.protocol.smote_binarize)
        if uses_fairplay_data(method):
            settings.update(self.fairplay.result_settings(), balance_by=list(self.balance_by))
        if method in fairness_methods.TARGETED:
            settings.update(adversary_attribute=list(self.adversary), estimator=fairness_methods.describe(method))
        if method in GENERATIVE_METHODS:
            settings["generator"] = result_options(self.generator_options.get(method, {}))
        return settings


@dataclass(frozen=True)
class _Task:
    """One (fold, method) and the models still to run on it; executed by :func:`_run_task`."""

    data: str
    out: str
    fold: int
    label: str
    method: str
    models: tuple[str, ...]
    groups: tuple[str, ...]  # the method's groups (rows and estimator)
    eval_groups: tuple[str, ...]  # the evaluation groups (columns of the predictions)
    train_ids: np.ndarray
    test_ids: np.ndarray
    seed: int
    balancing: Balancing
    protocol: Protocol
    unit_hashes: tuple[str, ...]
    fairplay_data: str | None = None
    adversary: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- entry points
def run_kfold(*, data: str | os.PathLike, groups: Sequence[str], out: str | os.PathLike, folds: int = 5,
              methods: Sequence[str] = METHODS, models: Sequence[str] = downstream.MODELS, seed: int = 0,
              jobs: int = 1, stratify: Sequence[str] | None = None, balance_by: Sequence[str] | None = None,
              ratio: float | Sequence[float] = 1.0, protocol: str | Protocol = "project",
              min_cell_size: int | None = None, fairplay: FairPlaySettings | None = None,
              generator_cache: str | os.PathLike | None = None, fairness_min_share: float = 0.01,
              adversary_attribute: Sequence[str] | None = None,
              generator_options: dict[str, dict[str, Any]] | None = None,
              overwrite: bool = False, progress: bool = True,
              backend: Literal["local", "ray"] = "local", ray_address: str = "auto",
              generator_gpus: float | None = None, argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the benchmark and write every output into ``out``; returns ``out``.

    The keyword arguments are the command-line options (see the module docstring): ``balance_by``
    ``None`` balances by the ``groups``, ``[]`` by the outcome only; ``ratio`` is one value or
    several (a sweep); ``protocol`` is a name or a :class:`benchmarks.protocols.Protocol` (from
    :func:`~benchmarks.protocols.resolve_protocol`, with single choices overridden), and
    ``min_cell_size`` overrides its minimum cell size. FairPlay's generator is trained with the
    protocol's training options under ``fairplay.train_options`` and conditioned as the protocol
    says. ``argv``, when given, is recorded in ``run.json``.
    """
    protocol = resolve_protocol(protocol) if isinstance(protocol, str) else protocol
    if min_cell_size is not None:
        protocol = resolve_protocol(protocol.name, **{**{k: getattr(protocol, k) for k in protocol.overrides},
                                                      "min_cell_size": min_cell_size})
    fairplay = fairplay or FairPlaySettings()
    fairplay = dataclasses.replace(fairplay, train_options=protocol.train_options(fairplay.train_options),
                                   conditioning=protocol.generator_conditioning)
    ratios = (ratio,) if isinstance(ratio, (int, float)) else tuple(ratio)
    balance_by = tuple(groups) if balance_by is None else tuple(a for a in balance_by if a != OUTCOME_ONLY)
    cfg = _Config(data=str(Path(data).resolve()), groups=tuple(groups), out=str(Path(out).resolve()),
                  folds=folds, methods=tuple(methods), models=tuple(models), seed=seed, jobs=jobs,
                  stratify=None if stratify is None else tuple(stratify), balance_by=balance_by,
                  ratios=tuple(float(r) for r in ratios), protocol=protocol, fairplay=fairplay,
                  generator_cache=None if generator_cache is None else str(Path(generator_cache).resolve()),
                  fairness_min_share=fairness_min_share, overwrite=overwrite, progress=progress,
                  adversary_attribute=tuple(adversary_attribute) if adversary_attribute else None,
                  generator_options={} if generator_options is None else generator_options,
                  backend=backend, ray_address=ray_address, generator_gpus=generator_gpus)
    return _run(cfg, argv=argv)


def _run(cfg: _Config, *, argv: Sequence[str] | None) -> Path:
    started = time.perf_counter()
    ds, splits = _check_config(cfg)  # every option is checked before anything is written
    out = Path(cfg.out)
    run = _open_run(cfg, out, data_fingerprint(cfg.data), argv)
    labels = [v.label for v in cfg.variants()]
    pending = [(k, m, model) for k in range(cfg.folds) for m in labels for model in cfg.models
               if supports(m, model) and not _unit_done(out, k, m, model, cfg.unit_settings(m, model))]
    try:
        _write_parquet(out / "folds.parquet", pl.concat([
            pl.DataFrame({"patient_id": test, "fold": np.full(len(test), k, dtype=np.int32)})
            for k, (_, test) in enumerate(splits)]))
        baseline = [u for u in pending if not uses_fairplay_data(u[1])]
        fair = [u for u in pending if uses_fairplay_data(u[1])]
        balanced = sorted({(u[0], cfg.variant(u[1]).ratio) for u in fair})  # (fold, ratio) to balance
        steps = _fairplay_steps(cfg, ds, splits, balanced, run["data_fingerprint"])
        prepared = {step: _fairplay_path(cfg, *step) for step in balanced}
        jobs = _fairplay_jobs(cfg, steps, splits, run["data_fingerprint"])
        jobs += [Job(f"{t.label} fold {t.fold}", _run_task, (t,),
                     after=(_generator_job(cfg, t.fold, t.balancing.ratio),) if t.fairplay_data else ())
                 for t in (*_tasks(cfg, baseline, splits), *_tasks(cfg, fair, splits, fairplay_data=prepared))]
        with _Progress(cfg.progress, n_units=len(pending), steps=steps) as bar:
            _execute(cfg, jobs, bar)
        _assemble(cfg, ds, splits, out)
    except KeyboardInterrupt as exc:
        # cli.run prints exc.kept; it replaces a generator training's own note (its checkpoint),
        # since rerunning this command resumes that training too
        left = sum(not _unit_done(out, *u, cfg.unit_settings(*u[1:])) for u in pending)
        run["invocations"][-1].update(interrupted=_now(), units_computed=len(pending) - left)
        write_json(out / RUN_FILE, run)
        exc.kept = _kept(cfg, out)
        raise
    run["invocations"][-1].update(finished=_now(), wall_seconds=round(time.perf_counter() - started, 1),
                                  units_computed=len(pending))
    write_json(out / RUN_FILE, run)
    from .report import write_report
    write_report(out)
    return out


def _kept(cfg: _Config, out: Path) -> str:
    """What an interrupted run leaves for a rerun to reuse."""
    units = [(k, v.label, model) for k in range(cfg.folds) for v in cfg.variants() for model in cfg.models
             if supports(v.method, model)]
    done = sum(_unit_done(out, *u, cfg.unit_settings(*u[1:])) for u in units)
    text = f"kept {done} of {len(units)} finished (fold, method, model) units in {out / 'units'}"
    if any(uses_fairplay_data(m) for m in cfg.methods):
        gen = _generator_dir(cfg)
        found = [p for p in gen.iterdir() if not p.name.startswith(".")] if gen.is_dir() else []
        trained = sum(not p.name.endswith(".training") for p in found)
        text += f" and {trained} FairPlay generator(s) in {gen}"
        if len(found) > trained:
            text += f" (plus {len(found) - trained} interrupted training(s), resumed from their checkpoint)"
    return text + "; run the same command again to resume from them (--overwrite starts over)"


def _check_config(cfg: _Config) -> tuple[PreparedDataset, list[tuple[np.ndarray, np.ndarray]]]:
    """Check every option against the data; returns the dataset and its folds. Writes nothing."""
    if not cfg.methods:
        raise HaloBalanceError(f"--methods is empty; choose from {', '.join(ALL_METHODS)}")
    unknown = [m for m in cfg.methods if m not in ALL_METHODS]
    if unknown:
        raise unknown_choice("--methods", unknown, ALL_METHODS)
    if not cfg.models:
        raise HaloBalanceError(f"--models is empty; choose from {', '.join(downstream.MODELS)}")
    unknown = [m for m in cfg.models if m not in downstream.MODELS]
    if unknown:
        raise unknown_choice("--models", unknown, downstream.MODELS)
    if len(set(cfg.groups)) != len(cfg.groups) or not cfg.groups:
        raise HaloBalanceError(f"--groups needs one or more distinct attributes, got {list(cfg.groups)}")
    if cfg.adversary_attribute is not None and len(set(cfg.adversary_attribute)) != len(cfg.adversary_attribute):
        raise HaloBalanceError(f"--adversary-attribute needs distinct attributes, got {list(cfg.adversary_attribute)}")
    if len(set(cfg.balance_by)) != len(cfg.balance_by):
        raise HaloBalanceError(f"--balance-by needs distinct attributes, got {list(cfg.balance_by)}")
    if cfg.folds < 2:
        raise HaloBalanceError(f"--folds must be at least 2, got {cfg.folds}")
    if cfg.jobs < 1:
        raise HaloBalanceError(f"--jobs must be at least 1, got {cfg.jobs}")
    if not cfg.ratios or len(set(cfg.ratios)) != len(cfg.ratios) or min(cfg.ratios) < 0:
        raise HaloBalanceError(f"--ratio needs one or more distinct values >= 0, got {list(cfg.ratios)}")
    if "downsample" in cfg.methods and max(cfg.ratios) > 1:
        raise HaloBalanceError(f"downsample takes a --ratio of at most 1 (got {max(cfg.ratios):g}): it cannot cut a "
                               "cell below its target; run the larger ratios without downsample")
    if cfg.min_cell_size < 1:
        raise HaloBalanceError(f"--min-cell-size must be at least 1, got {cfg.min_cell_size}")
    if cfg.protocol.downsample_floor < 0:
        raise HaloBalanceError(f"--downsample-floor must be >= 0, got {cfg.protocol.downsample_floor}")
    if not isinstance(cfg.generator_options, dict) or not all(isinstance(v, dict)
                                                              for v in cfg.generator_options.values()):
        raise HaloBalanceError('--generator-options must be a JSON object of objects, e.g. '
                               '\'{"mcrage": {"iterations": 2000}, "ctgan": {"epochs": 100}}\'')
    for name, options in cfg.generator_options.items():
        check_options(name, options)
    if {"ctgan", "tvae"} & set(cfg.methods):
        from .generative.tabular_gan import load_ctgan
        load_ctgan()  # a missing optional extra stops the run before any work
    if not 0.0 <= cfg.fairness_min_share < 1.0:
        raise HaloBalanceError(f"--fairness-min-share must lie in [0, 1), got {cfg.fairness_min_share}")
    if cfg.fairplay.batch_size < 1:
        raise HaloBalanceError(f"--batch-size must be at least 1, got {cfg.fairplay.batch_size}")
    if cfg.fairplay.device not in ("auto", "cpu", "cuda"):
        raise unknown_choice("--device", [cfg.fairplay.device], ("auto", "cpu", "cuda"))
    check_train_options(cfg.fairplay.train_options)
    if cfg.fairplay.threads < 1:
        raise HaloBalanceError(f"--generator-threads must be at least 1, got {cfg.fairplay.threads}")
    if cfg.backend not in BACKENDS:
        raise unknown_choice("--backend", [cfg.backend], BACKENDS)
    if cfg.backend == "ray":
        check_reachable(cfg.ray_address)  # a missing extra or cluster is reported before any work
    _check_paths(cfg)

    ds = PreparedDataset.load(cfg.data)
    for option, attrs in (("--groups", cfg.groups), ("--stratify", cfg.stratify or ()),
                          ("--balance-by", cfg.balance_by), ("--adversary-attribute", cfg.adversary_attribute or ())):
        unknown = [a for a in attrs if a not in ds.group_attributes]
        if unknown:
            raise unknown_choice(f"{option} (the group attributes of {Path(cfg.data) / META_FILE})", unknown,
                                 ds.group_attributes)
    outcomes = ds.patients["label"].value_counts()
    rarest = int(outcomes["count"].min()) if outcomes.height == 2 else 0
    if rarest < 2:
        raise DatasetError(f"{rarest} of the {ds.n_patients} patients have the rarer outcome; the benchmark needs "
                           "at least 2 of each outcome (a test fold without deaths has no F1)",
                           file=str(Path(cfg.data) / PATIENTS_FILE), column="label")
    if cfg.folds > rarest:
        raise HaloBalanceError(
            f"--folds {cfg.folds} is too many for {cfg.data}: every test fold needs patients of both outcomes, and "
            f"only {rarest} of its {ds.n_patients} patients have the rarer one; pass --folds {min(5, rarest)}"
            + (f" (at most {rarest})" if rarest > 5 else ""))
    return ds, ds.kfold(cfg.folds, groups=list(cfg.stratify or cfg.groups), seed=cfg.seed)


def _check_paths(cfg: _Config) -> None:
    """``--out`` must be creatable, outside the data, and empty or an earlier run (``--overwrite`` acts
    in :func:`_open_run`); ``--generator-cache`` a writable folder outside the data, reused as it is."""
    check_output_dir(cfg.out, overwrite=True, inputs=[cfg.data], what="--out")
    cache = cfg.generator_cache
    if cache is None:
        return
    if not Path(cache).is_dir():
        check_output_dir(cache, overwrite=False, inputs=[cfg.data], what="--generator-cache")
    elif Path(cfg.data) in (Path(cache), *Path(cache).parents):
        raise HaloBalanceError(f"--generator-cache {cache} lies inside the input {cfg.data}; choose a folder "
                               "outside the input")
    else:
        check_writable(cache, f"--generator-cache {cache}")


def data_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a prepared dataset's four files (the identity of the data a run used)."""
    h = hashlib.sha256()
    for name in (VISITS_FILE, PATIENTS_FILE, VOCAB_FILE, META_FILE):
        with open(Path(path) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("halo-balance", "numpy", "polars", "scikit-learn", "xgboost", "imbalanced-learn", "fairlearn",
                "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _open_run(cfg: _Config, out: Path, fingerprint: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Create ``out`` or check that it holds a run of the same identity; record this invocation."""
    identity = {"data_fingerprint": fingerprint, "groups": list(cfg.groups),
                "stratify": list(cfg.stratify or cfg.groups), "folds": cfg.folds, "seed": cfg.seed}
    run_file = out / RUN_FILE
    if out.exists() and cfg.overwrite:
        if any(out.iterdir()) and not run_file.is_file():
            raise HaloBalanceError(f"--overwrite refused: {out} is not empty and holds no {RUN_FILE}, so it is not "
                                   f"a k-fold output folder; choose another --out")
        shutil.rmtree(out)
    if run_file.is_file():
        run = read_json(run_file)
        changed = [k for k in RUN_IDENTITY if run.get(k) != identity[k]]
        if changed:
            raise HaloBalanceError(
                f"{out} holds a run with other {', '.join(changed)} "
                f"({', '.join(f'{k}={run.get(k)!r}' for k in changed)}); choose another --out or pass --overwrite")
    elif out.exists() and any(out.iterdir()):
        raise HaloBalanceError(f"{out} exists, is not empty and holds no {RUN_FILE}; choose another --out")
    else:
        run = {**identity, "data": cfg.data, "invocations": []}
    variants = cfg.variants()
    run.update(methods=[v.label for v in variants], models=list(cfg.models),
               variants={v.label: {"method": v.method, "ratio": v.ratio if has_ratio(v.method) else None}
                         for v in variants},
               balance_by=list(cfg.balance_by), ratio=cfg.ratios[0] if len(cfg.ratios) == 1 else list(cfg.ratios),
               min_cell_size=cfg.min_cell_size, protocol=cfg.protocol.settings(),
               fairplay=cfg.fairplay.result_settings(), generator_options=cfg.generator_options,
               fairness_min_share=cfg.fairness_min_share, adversary_attribute=list(cfg.adversary),
               downstream_threshold=downstream.THRESHOLD, versions=_versions())
    run["invocations"].append({"started": _now(), "argv": list(argv) if argv is not None else None,
                               "jobs": cfg.jobs, "device": cfg.fairplay.device, "machine": _machine(),
                               "backend": cfg.backend, "generator_threads": cfg.fairplay.threads})
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run)
    return run


def _machine() -> str:
    mem = ""
    try:
        import psutil
        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{mem}"


# ---------------------------------------------------------------------- units
def _unit_path(out: Path, fold: int, method: str, model: str) -> Path:
    return out / "units" / f"fold={fold}" / method / f"{model}.parquet"


def _unit_done(out: Path, fold: int, method: str, model: str, unit_hash: str) -> bool:
    path = _unit_path(out, fold, method, model)
    info = path.with_suffix(".json")
    return path.is_file() and info.is_file() and read_json(info).get("settings") == unit_hash


def _tasks(cfg: _Config, units: list[tuple[int, str, str]], splits: list[tuple[np.ndarray, np.ndarray]],
           fairplay_data: dict[tuple[int, float], Path] | None = None) -> list[_Task]:
    by_pair: dict[tuple[int, str], list[str]] = {}
    for k, label, model in units:
        by_pair.setdefault((k, label), []).append(model)
    tasks = []
    for (k, label), models in by_pair.items():
        variant = cfg.variant(label)
        tasks.append(_Task(
            data=cfg.data, out=cfg.out, fold=k, label=label, method=variant.method, models=tuple(models),
            groups=cfg.method_groups(variant.method), eval_groups=cfg.groups, train_ids=splits[k][0],
            test_ids=splits[k][1], seed=cfg.seed + k, balancing=cfg.balancing(variant.ratio), protocol=cfg.protocol,
            unit_hashes=tuple(cfg.unit_settings(label, model) for model in models),
            fairplay_data=str(fairplay_data[(k, variant.ratio)]) if fairplay_data else None,
            adversary=cfg.adversary, options=cfg.generator_options.get(variant.method, {})))
    return tasks


# Progress weights: a (fold, method, model) unit counts 1; a FairPlay fold step counts as many units as
# it roughly costs: training its generator and balancing, or balancing alone with a cached generator
# (CPU-time ratios measured on the eICU demo and the simulated cohort, benchmarks/RESULTS.md: a
# generator cost 3-40 downstream units, balancing 2-6).
GENERATOR_WEIGHT = 15
BALANCE_WEIGHT = 3


class _Progress:
    """One bar for the whole run: every unit and every FairPlay generator, with an ETA."""

    def __init__(self, enabled: bool, *, n_units: int, steps: dict[tuple[int, float], int]) -> None:
        self.enabled, self.n_units, self.steps = enabled, n_units, steps
        self.units = self.generators = 0
        self.n_generators = sum(w == GENERATOR_WEIGHT for w in steps.values())
        self.bar = None
        if enabled and n_units:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n_units + sum(steps.values()), desc="k-fold", file=sys.stderr, smoothing=0,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
            self._show("")

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def _show(self, doing: str, *, refresh: bool = True) -> None:
        counts = f"units {self.units}/{self.n_units}"
        if self.n_generators:
            counts += f", generators {self.generators}/{self.n_generators}"
        self.bar.set_postfix_str(f"{counts}{'; ' + doing if doing else ''}", refresh=refresh)

    def units_done(self, n: int, what: str = "") -> None:
        self.units += n
        if self.bar is not None:  # the counts first, so that the bar never shows stale ones
            self._show(what, refresh=False)
            self.bar.update(n)

    def fold_prepared(self, step: tuple[int, float]) -> None:
        weight = self.steps.get(step, 0)
        self.generators += weight == GENERATOR_WEIGHT
        if self.bar is not None:
            self._show("", refresh=False)
            self.bar.update(weight)

    def write(self, text: str) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)


def _execute(cfg: _Config, jobs: list[Job], bar: _Progress) -> None:
    """Run the jobs on the chosen backend (``benchmarks.executors``), advancing the bar as each ends."""
    if not jobs:
        return
    folds = {_generator_job(cfg, *step): step for step in bar.steps}
    for name, step in folds.items():
        bar.write(f"{name}: {'training a generator and ' if bar.steps[step] == GENERATOR_WEIGHT else ''}balancing "
                  f"its training patients ({cfg.backend} backend)")

    def done(job: Job, result: Any) -> None:
        if job.generator:
            bar.fold_prepared(folds[job.name])
            bar.write(f"{job.name}: done in {result['generator_seconds'] + result['balance_seconds']:.0f} s")
        else:
            bar.units_done(len(result), job.name)

    make_executor(cfg.backend, jobs=cfg.jobs, ray_address=cfg.ray_address,
                  generator_gpus=cfg.generator_gpus).run(jobs, done)


_DATA_CACHE: dict[str, tuple[PreparedDataset, VisitMatrix]] = {}


def _load_data(path: str) -> tuple[PreparedDataset, VisitMatrix]:
    """The dataset and its visit matrix, loaded once per worker process (workers are reused)."""
    if path not in _DATA_CACHE:
        _DATA_CACHE.clear()
        ds = PreparedDataset.load(path, validate=False)  # validated by the parent process
        _DATA_CACHE[path] = (ds, ds.to_visit_matrix())
    return _DATA_CACHE[path]


def _run_task(task: _Task) -> list[dict[str, Any]]:
    """Build the method's training rows for one fold, then fit, score and save each model's unit."""
    with limit_threads(1):
        return _run_units(task)


def _run_units(task: _Task) -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    ds, vm = _load_data(task.data)
    extra: dict[str, Any] = {}
    if task.fairplay_data:
        rows = training_rows(PreparedDataset.load(task.fairplay_data, validate=False), task.groups)
        extra = read_json(Path(task.fairplay_data) / TIMING_FILE)
    elif task.method in fairness_methods.METHODS:
        # a targeted method's estimator is told its attribute's groups, not the method's cells
        fit_groups = task.adversary if task.method in fairness_methods.TARGETED else task.groups
        rows = fairness_methods.training_set(task.method, ds.select(task.train_ids), groups=fit_groups,
                                             balancing=task.balancing, seed=task.seed)
    else:
        rows = build_training_set(task.method, ds.select(task.train_ids), balancing=task.balancing,
                                  groups=task.groups, seed=task.seed, smote_classes=task.protocol.smote_classes,
                                  smote_binarize=task.protocol.smote_binarize, options=task.options)
    # FairPlay's time is its generator plus balancing (done once per fold, before this task)
    method_seconds = time.perf_counter() - t0 + extra.get("generator_seconds", 0) + extra.get("balance_seconds", 0)
    test = vm.frame["patient_id"].is_in(pl.Series(task.test_ids, dtype=pl.String).implode()).to_numpy()
    X_test, frame, y_test = vm.X[test], vm.frame.filter(pl.Series(test)), vm.y[test]
    test_groups = group_names(frame, task.groups)
    # real rows beyond the visits of the distinct patients they come from are repeated copies
    real = rows.source[~rows.synthetic]
    n_copied = int(real.size - np.isin(vm.frame["patient_id"].to_numpy(), np.unique(real)).sum())
    cells = json.dumps(rows.cell_counts(), sort_keys=True)
    synthetic_info = describe_synthetic(rows.X, rows.cells(), rows.synthetic, test_X=X_test,
                                        test_cells=cell_names(y_test, test_groups))
    infos = []
    for name, unit_hash in zip(task.models, task.unit_hashes, strict=True):
        t1 = time.perf_counter()
        est = make_estimator(task.method, name, ratio=task.balancing.ratio, min_cell_size=task.balancing.min_cell_size,
                             params=task.protocol.model_params, random_state=task.seed)
        est.fit(rows.X, rows.y, rows.group, patients=rows.source, synthetic=rows.synthetic)
        scores, prediction = est.score_and_predict(X_test, test_groups)
        pooled = est.pooled_groups(test_groups)
        preds = frame.select("patient_id", "visit_index", *task.eval_groups).with_columns(
            fold=pl.lit(task.fold, pl.Int32), method=pl.lit(task.label), model=pl.lit(name),
            y_true=pl.Series(y_test, dtype=pl.Int8), score=pl.Series(scores, dtype=pl.Float64),
            prediction=pl.Series(prediction, dtype=pl.Int8),
        ).select("fold", "method", "model", "patient_id", "visit_index", *task.eval_groups, "y_true", "score",
                 "prediction")
        info = {"fold": task.fold, "method": task.label, "model": name, "settings": unit_hash,
                "n_train_rows": len(rows), "n_train_positive": int(rows.y.sum()),
                "n_synthetic_rows": int(rows.synthetic.sum()),
                "n_copied_rows": n_copied, "cell_attributes": " & ".join(task.groups), "train_cells": cells,
                "pooled_groups": pooled, "n_test_rows": int(test.sum()),
                "method_seconds": round(method_seconds, 3), "fit_seconds": round(time.perf_counter() - t1, 3),
                "generator_seconds": extra.get("generator_seconds"), "balance_seconds": extra.get("balance_seconds"),
                "generator_cached": extra.get("generator_cached"), **synthetic_info,
                "generator_fit_seconds": rows.info.get("generator_fit_seconds"),
                "generator_sample_seconds": rows.info.get("generator_sample_seconds"),
                "generator_shortfall": rows.info.get("shortfall"),
                "generator_cells": json.dumps(rows.info["cells"]) if "cells" in rows.info else None}
        if hasattr(est, "fit_report_"):
            info["fit_report"] = est.fit_report_
        path = _unit_path(Path(task.out), task.fold, task.label, name)
        write_json(path.with_suffix(".json"), info)
        _write_parquet(path, preds)
        infos.append(info)
    return infos


def make_estimator(method: str, model: str, *, ratio: float, min_cell_size: int, random_state: int,
                   params: downstream.ParamSet = "project"):
    """The downstream estimator of a unit: per group for ``separate``, the mitigation method's own
    for ``benchmarks.fairness_methods``, else one model on the method's rows."""
    method = base_method(method)
    if method in fairness_methods.METHODS:
        return fairness_methods.make_estimator(method, model, ratio=ratio, min_cell_size=min_cell_size,
                                               params=params, random_state=random_state)
    if method == "separate":
        return SeparateModels(model, params=params, random_state=random_state)
    return SingleModel(model, params=params, random_state=random_state)


def _write_parquet(path: Path, frame: pl.DataFrame) -> None:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------- FairPlay preparation
def _generator_dir(cfg: _Config) -> Path:
    return Path(cfg.generator_cache or Path(cfg.out) / "generators")


def _generator_job(cfg: _Config, fold: int, ratio: float) -> str:
    return f"FairPlay fold {fold}" + (f" ratio {ratio:g}" if len(cfg.ratios) > 1 else "")


def _fairplay_path(cfg: _Config, fold: int, ratio: float) -> Path:
    return Path(cfg.out) / "fairplay" / f"fold{fold}-{settings_hash(cfg.method_settings('fairplay-data', ratio))}"


def _fairplay_done(path: Path) -> bool:
    return (path / VISITS_FILE).is_file() and (path / TIMING_FILE).is_file()


def _fairplay_steps(cfg: _Config, ds: PreparedDataset, splits: list[tuple[np.ndarray, np.ndarray]],
                    balanced: Sequence[tuple[int, float]], fingerprint: str) -> dict[tuple[int, float], int]:
    """``{(fold, ratio): progress weight}`` of the FairPlay folds still to balance (see
    ``GENERATOR_WEIGHT``); a fold's generator is trained once, for its first ratio."""
    steps: dict[tuple[int, float], int] = {}
    trained: set[int] = set()
    for k, r in balanced:
        if _fairplay_done(_fairplay_path(cfg, k, r)):
            continue
        train = ds.select(splits[k][0])
        key = generator_key(train, fold=k, data_fingerprint=fingerprint, train_options=cfg.fairplay.train_options,
                            seed=cfg.seed + k, conditioning=cfg.fairplay.conditioned_on(train, cfg.balance_by))
        cached = k in trained or (_generator_dir(cfg) / key).is_dir()
        steps[(k, r)] = BALANCE_WEIGHT if cached else GENERATOR_WEIGHT
        trained.add(k)
    return steps


def _fairplay_jobs(cfg: _Config, steps: dict[tuple[int, float], int], splits: list[tuple[np.ndarray, np.ndarray]],
                   fingerprint: str) -> list[Job]:
    """One job per (fold, ratio) still to balance; a fold's later ratios wait for its first, whose
    job trains the generator they reuse."""
    first: dict[int, float] = {}
    jobs = []
    for k, r in steps:  # sorted by fold, then ratio
        after = (_generator_job(cfg, k, first[k]),) if k in first else ()
        first.setdefault(k, r)
        jobs.append(Job(_generator_job(cfg, k, r), _prepare_fairplay, (cfg, k, r, splits[k][0], fingerprint),
                        after=after, generator=True, threads=cfg.fairplay.threads))
    return jobs


def _prepare_fairplay(cfg: _Config, fold: int, ratio: float, train_ids: np.ndarray, fingerprint: str
                      ) -> dict[str, Any]:
    """Balance fold ``fold``'s training patients with FairPlay once per ratio (a job: any process,
    any machine); later runs reuse the saved result (and every ratio the fold's generator).
    Returns the timings."""
    path = _fairplay_path(cfg, fold, ratio)
    if _fairplay_done(path):
        return read_json(path / TIMING_FILE)
    train = _load_data(cfg.data)[0].select(train_ids)
    with limit_threads(cfg.fairplay.threads):
        balanced, plan, timings = fairplay_dataset(
            train, balancing=cfg.balancing(ratio), fold=fold, seed=cfg.seed + fold, settings=cfg.fairplay,
            generator_dir=_generator_dir(cfg), data_fingerprint=fingerprint, progress=False)
    balanced.save(path, overwrite=True)
    _write_parquet(path / "plan.parquet", plan)
    write_json(path / TIMING_FILE, timings)  # written last: marks the folder complete
    return timings


# ---------------------------------------------------------------------- assembly
def train_group_sizes(ds: PreparedDataset, train_ids: np.ndarray, groups: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{grouping: {group: real training patients}}`` for every grouping of ``groups``."""
    train = ds.patients.filter(pl.col("patient_id").is_in(pl.Series(train_ids, dtype=pl.String).implode())
                               & ~pl.col("synthetic"))
    out = {}
    for name, attrs in groupings(groups):
        labels = group_labels(train, attrs)
        out[name] = {str(k): int(v) for k, v in zip(*np.unique(labels.to_numpy(), return_counts=True), strict=True)}
    return out


def _unit_metrics(path: Path, groups: Sequence[str], sizes: dict[str, dict[str, int]], *,
                  min_share: float = 0.0) -> pl.DataFrame:
    return unit_metrics(pl.read_parquet(path), attributes=groups, train_sizes=sizes, min_share=min_share)


def _assemble(cfg: _Config, ds: PreparedDataset, splits: list[tuple[np.ndarray, np.ndarray]], out: Path) -> None:
    """Gather the requested units into the final tables (each written atomically)."""
    from joblib import Parallel, delayed

    keys = [(k, v.label, model) for k in range(cfg.folds) for v in cfg.variants() for model in cfg.models
            if supports(v.method, model)]
    paths = [_unit_path(out, *key) for key in keys]
    predictions = pl.concat([pl.read_parquet(p) for p in paths])
    _write_parquet(out / "predictions.parquet", predictions)
    sizes = {k: train_group_sizes(ds, splits[k][0], cfg.groups) for k in range(cfg.folds)}
    frames = Parallel(n_jobs=cfg.jobs)(delayed(_unit_metrics)(p, cfg.groups, sizes[key[0]],
                                                              min_share=cfg.fairness_min_share)
                                       for p, key in zip(paths, keys, strict=True))
    metrics = pl.concat(frames)
    # the paper's aggregation: every group of the data, weighted by its size
    everyone = train_group_sizes(ds, ds.patients["patient_id"].to_numpy(), cfg.groups)
    metrics = pl.concat([metrics, paper_fairness(metrics, group_sizes=everyone)])
    _write_parquet(out / "metrics.parquet", metrics)
    _write_parquet(out / "summary.parquet", summarise(metrics))
    infos = [read_json(p.with_suffix(".json")) for p in paths]
    infos = [{**i, "fit_report": json.dumps(i["fit_report"])} if "fit_report" in i else i for i in infos]
    _write_parquet(out / "units.parquet", pl.from_dicts(infos, infer_schema_length=None).with_columns(
        pl.col("pooled_groups").cast(pl.List(pl.String)).list.join(", ")).drop("settings"))


# ---------------------------------------------------------------------- CLI
def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kfold", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--groups", required=True, nargs="+", metavar="ATTR",
                   help="evaluation group attributes, fairness is measured across them; several = their "
                        "intersection too")
    p.add_argument("--out", required=True, help="output folder (resumed when it holds the same run)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--methods", type=_csv, default=METHODS,
                   help=f"comma-separated, from {','.join(ALL_METHODS)} (default: {','.join(METHODS)})")
    p.add_argument("--models", type=_csv, default=downstream.MODELS,
                   help=f"comma-separated, from {','.join(downstream.MODELS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1,
                   help="local backend: parallel processes for (fold, method) unit batches and FairPlay generators")
    p.add_argument("--device", default="auto", help="FairPlay's torch device: auto, cpu or cuda")
    p.add_argument("--stratify", nargs="+", metavar="ATTR", default=None,
                   help="attributes that stratify the folds with the outcome (default: --groups)")
    p.add_argument("--balance-by", nargs="*", metavar="ATTR", default=None,
                   help="attributes crossed with the outcome to form the rebalancing cells (default: --groups); "
                        "no attribute, or 'outcome', balances the outcome only")
    p.add_argument("--ratio", type=float, nargs="+", default=[1.0], metavar="R",
                   help="fraction of each cell's gap to fill (every method with a ratio); several values run a "
                        "sweep, e.g. 0.25 0.5 1 2 (above 1 overshoots the largest cell)")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES, default="project",
                   help="every choice that differs between this project and the published FairPlay "
                        "experiments (benchmarks/PROTOCOLS.md); the options below override single choices")
    p.add_argument("--min-cell-size", type=int, default=None,
                   help="cells smaller than this are left as they are (project 5, paper 1)")
    p.add_argument("--downsample-floor", type=int, default=None,
                   help="downsampling cuts cells to max(smallest cell, this) patients (project 0, paper 1000)")
    p.add_argument("--smote-classes", choices=SMOTE_CLASSES, default=None,
                   help="one SMOTE call per cell, or one over all rows with class = cell (project per-cell, "
                        "paper combined)")
    p.add_argument("--smote-binarize", action=argparse.BooleanOptionalAction, default=None,
                   help="synthetic SMOTE values become 1 where non-zero (project no, paper yes)")
    p.add_argument("--model-params", choices=downstream.PARAM_SETS, default=None,
                   help="downstream hyper-parameters (benchmarks/downstream.py; project or paper)")
    p.add_argument("--generator-conditioning", choices=GENERATOR_CONDITIONINGS, default=None,
                   help="FairPlay's generator sees every group attribute, or only the --balance-by ones "
                        "(project all, paper balanced)")
    p.add_argument("--fairness-aggregation", choices=FAIRNESS_AGGREGATIONS, default=None,
                   help="the Theil / DI aggregation the report leads with; both are always computed")
    p.add_argument("--train-options", type=json_object, default={}, metavar="JSON",
                   help="FairPlay generator training options (halo_balance.train.TrainOptions fields)")
    p.add_argument("--batch-size", type=int, default=256, help="FairPlay sampling batch size")
    p.add_argument("--allow-copies", action="store_true", help="FairPlay keeps synthetic copies of training records")
    p.add_argument("--generator-cache", default=None,
                   help="folder of cached FairPlay generators (default OUT/generators)")
    p.add_argument("--adversary-attribute", nargs="+", metavar="ATTR", default=None,
                   help="the protected attribute adversarial_debiasing's adversary predicts (default: the "
                        "--balance-by attributes, or the --groups when only the outcome is balanced; "
                        "several = their intersection)")
    p.add_argument("--generator-options", type=json_object, default={}, metavar="JSON",
                   help="keyword arguments of the generative methods, by method, e.g. "
                        "'{\"mcrage\": {\"iterations\": 2000}, \"sma\": {\"n_jobs\": 2}}' (benchmarks.generative)")
    p.add_argument("--fairness-min-share", type=float, default=0.01,
                   help="groups under this share of the training patients are left out of the fairness "
                        "measures (default 0.01, the paper's 1%%; 0 keeps every group)")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in --out first")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("where the work runs (benchmarks.executors)")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="local: --jobs processes here; ray: every generator and unit batch a Ray task "
                        f"(needs {RAY_INSTALL}; default %(default)s)")
    g.add_argument("--ray-address", default="auto", help="the Ray cluster: auto, HOST:PORT or local (default auto)")
    g.add_argument("--generator-gpus", type=float, default=None,
                   help="GPUs each FairPlay generator task asks for on Ray (default: 1 where the cluster has GPUs)")
    g.add_argument("--generator-threads", type=int, default=1,
                   help="torch threads of each FairPlay generator, on either backend (default %(default)s)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    fairplay = FairPlaySettings(allow_copies=args.allow_copies, batch_size=args.batch_size, device=args.device,
                                train_options=args.train_options, threads=args.generator_threads)
    protocol = resolve_protocol(args.protocol, min_cell_size=args.min_cell_size,
                                downsample_floor=args.downsample_floor, smote_classes=args.smote_classes,
                                smote_binarize=args.smote_binarize, model_params=args.model_params,
                                generator_conditioning=args.generator_conditioning,
                                fairness_aggregation=args.fairness_aggregation)
    out = run_kfold(data=args.data, groups=args.groups, out=args.out, folds=args.folds, methods=args.methods,
                    models=args.models, seed=args.seed, jobs=args.jobs, stratify=args.stratify,
                    balance_by=args.balance_by, ratio=args.ratio, protocol=protocol,
                    fairplay=fairplay, generator_cache=args.generator_cache,
                    fairness_min_share=args.fairness_min_share, adversary_attribute=args.adversary_attribute,
                    generator_options=args.generator_options, overwrite=args.overwrite,
                    progress=not args.no_progress, backend=args.backend, ray_address=args.ray_address,
                    generator_gpus=args.generator_gpus, argv=argv)
    from .report import headline
    print(headline(out))
    print(f"\nreport: {out / 'report.md'}")


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
