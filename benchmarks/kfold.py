"""k-fold benchmark: rebalancing methods x downstream models x performance and fairness metrics.

::

    python -m benchmarks.kfold --data PREPARED --groups ATTR [ATTR ...] --out DIR
        [--folds 5] [--methods original,upsample,downsample,smote,smoten,separate,fairplay]
        [--models knn,logreg,mlp,rf,xgboost] [--seed 0] [--jobs 1] [--device auto]
        [--stratify ATTR ...] [--ratio 1.0] [--min-cell-size 5]
        [--train-options JSON] [--batch-size 256] [--allow-copies] [--generator-cache DIR]
        [--adversary-attribute ATTR ...] [--generator-options JSON] [--fairness-min-share 0.01]
        [--overwrite] [--no-progress]
        [--backend local|ray] [--ray-address auto|HOST:PORT|local] [--generator-gpus G]
        [--generator-threads 1]

Folds are patient-level and stratified by outcome x the ``--stratify`` attributes (default: the
``--groups``; :meth:`PreparedDataset.kfold`). Pass the same ``--stratify`` to several experiments
on one dataset to give them the same folds (as the paper does), which also lets them share
FairPlay generators through ``--generator-cache``. In each fold every method sees only the fold's
training patients (``benchmarks.methods``; the further mitigation methods of
``benchmarks.fairness_methods``, ``importance_weighting``, ``group_resample``, ``threshold_optimizer``,
``exponentiated_gradient``, ``adversarial_debiasing`` and ``fairplay_threshold``, are selected by
name the same way and run with the models they support; ``adversarial_debiasing`` targets the
``--adversary-attribute``, default the ``--groups``, several = their intersection; so are the
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
where the cluster has GPUs) and the FairPlay units of a fold depending on its generator. Both
write the same files, so a run started on one backend resumes on the other. A generator runs with
``--generator-threads`` torch threads (default 1) and each unit with one thread wherever it runs,
so that the outputs do not depend on the backend or the machine's cores.

The output folder::

    run.json              settings, data fingerprint, versions, wall times of each invocation
    folds.parquet         patient_id, fold (the fold in which the patient is tested)
    units/fold=K/METHOD/MODEL.parquet (+ .json)   one finished (fold, method, model) unit
    fairplay/foldK-HASH/  FairPlay's balanced training data of fold K (+ plan.parquet)
    generators/           FairPlay generators, one per fold and settings (or --generator-cache)
    predictions.parquet   fold, method, model, patient_id, visit_index, <groups>, y_true, score, prediction
    metrics.parquet       fold, method, model, attribute, group, metric, value (tidy, long)
    summary.parquet       method, model (``mean`` = averaged over models), attribute, group, metric,
                          mean, se, n_folds
    units.parquet         per unit: training rows, positives, synthetic and copied rows, fallbacks, seconds,
                          and ``fit_report`` (JSON) where a method records its own choices (the
                          alpha that adversarial_debiasing selected, with every candidate's figures);
                          for binary synthetic rows their distinct rows, copies of training rows and
                          fidelity to the training rows of their cells (``benchmarks.synthetic_rows``);
                          a generative method's fit / sampling seconds and per-cell counts
    report.md, plots/     the paper's tables and the plots (``benchmarks.report``)

Each unit is written atomically as it finishes, and a rerun into the same folder skips every unit
whose settings are unchanged, so an interrupted run resumes. A rerun with different data, groups,
folds, stratification or seed is refused (choose another ``--out`` or pass ``--overwrite``);
changing a method's settings (``--ratio``, ``--min-cell-size``, FairPlay's, a generative method's
``--generator-options``) recomputes only the units that depend on them.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from halo_balance.data import META_FILE, PATIENTS_FILE, VISITS_FILE, VOCAB_FILE, PreparedDataset, VisitMatrix
from halo_balance.distributed import BACKENDS, RAY_INSTALL, check_reachable
from halo_balance.errors import DatasetError, HaloBalanceError, unknown_choice
from halo_balance.io import atomic_write_bytes, check_output_dir, check_writable, read_json, write_json

from . import downstream, fairness_methods
from .executors import Job, limit_threads, make_executor
from .generative import check_options, result_options
from .methods import GENERATIVE_METHODS, METHODS, FairPlaySettings, SeparateModels, SingleModel, build_training_set, \
    check_train_options, fairplay_dataset, generator_key, settings_hash, training_rows
from .metrics import groupings, group_labels, summarise, unit_metrics
from .synthetic_rows import describe_synthetic

RUN_FILE = "run.json"
TIMING_FILE = "timing.json"
# Settings that define the folds and the test sets: a folder holds one combination only.
RUN_IDENTITY = ("data_fingerprint", "groups", "stratify", "folds", "seed")
ALL_METHODS: tuple[str, ...] = METHODS + GENERATIVE_METHODS + fairness_methods.METHODS
# methods whose settings include the cells' ratio and minimum size, and those trained on FairPlay's data
_CELL_METHODS = {"upsample", "downsample", "smote", "smoten", "fairplay", "fairplay-data", "importance_weighting",
                 "group_resample", "fairplay_threshold", *GENERATIVE_METHODS}
_FAIRPLAY_DATA = {"fairplay", "fairplay-data"} | {m for m, kind in fairness_methods.TRAINING_DATA.items()
                                                  if kind == "fairplay"}


def uses_fairplay_data(method: str) -> bool:
    """Whether ``method`` trains on FairPlay's balanced data of the fold."""
    return method in _FAIRPLAY_DATA


def supports(method: str, model: str) -> bool:
    """Whether the harness runs ``method`` with downstream ``model`` (other pairs are skipped)."""
    return method not in fairness_methods.METHODS or fairness_methods.supports(method, model)


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
    ratio: float
    min_cell_size: int
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
        """The attributes whose groups ``adversarial_debiasing``'s adversary predicts."""
        return self.adversary_attribute or self.groups

    def unit_settings(self, method: str, model: str) -> str:
        """Hash of the settings a (method, model) unit depends on beyond the run identity: the
        model's hyper-parameters and the method's settings."""
        settings: dict[str, Any] = {"method": method, "model": downstream.describe(model)}
        if method in _CELL_METHODS:
            settings.update(ratio=self.ratio, min_cell_size=self.min_cell_size)
        if uses_fairplay_data(method):
            settings.update(self.fairplay.result_settings())
        if method in fairness_methods.TARGETED:
            settings.update(adversary_attribute=list(self.adversary), estimator=fairness_methods.describe(method))
        if method in GENERATIVE_METHODS:
            settings["generator"] = result_options(self.generator_options.get(method, {}))
        return settings_hash(settings)


@dataclass(frozen=True)
class _Task:
    """One (fold, method) and the models still to run on it; executed by :func:`_run_task`."""

    data: str
    out: str
    fold: int
    method: str
    models: tuple[str, ...]
    groups: tuple[str, ...]
    train_ids: np.ndarray
    test_ids: np.ndarray
    seed: int
    ratio: float
    min_cell_size: int
    unit_hashes: tuple[str, ...]
    fairplay_data: str | None = None
    adversary: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------- entry points
def run_kfold(*, data: str | os.PathLike, groups: Sequence[str], out: str | os.PathLike, folds: int = 5,
              methods: Sequence[str] = METHODS, models: Sequence[str] = downstream.MODELS, seed: int = 0,
              jobs: int = 1, stratify: Sequence[str] | None = None, ratio: float = 1.0, min_cell_size: int = 5,
              fairplay: FairPlaySettings | None = None, generator_cache: str | os.PathLike | None = None,
              fairness_min_share: float = 0.01, adversary_attribute: Sequence[str] | None = None,
              generator_options: dict[str, dict[str, Any]] | None = None,
              overwrite: bool = False, progress: bool = True,
              backend: Literal["local", "ray"] = "local", ray_address: str = "auto",
              generator_gpus: float | None = None, argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the benchmark and write every output into ``out``; returns ``out``.

    The keyword arguments are the command-line options (see the module docstring); ``argv``, when
    given, is recorded in ``run.json``.
    """
    cfg = _Config(data=str(Path(data).resolve()), groups=tuple(groups), out=str(Path(out).resolve()),
                  folds=folds, methods=tuple(methods), models=tuple(models), seed=seed, jobs=jobs,
                  stratify=None if stratify is None else tuple(stratify), ratio=ratio,
                  min_cell_size=min_cell_size, fairplay=fairplay or FairPlaySettings(),
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
    pending = [(k, m, model) for k in range(cfg.folds) for m in cfg.methods for model in cfg.models
               if supports(m, model) and not _unit_done(out, k, m, model, cfg.unit_settings(m, model))]
    try:
        _write_parquet(out / "folds.parquet", pl.concat([
            pl.DataFrame({"patient_id": test, "fold": np.full(len(test), k, dtype=np.int32)})
            for k, (_, test) in enumerate(splits)]))
        baseline = [u for u in pending if not uses_fairplay_data(u[1])]
        fair = [u for u in pending if uses_fairplay_data(u[1])]
        steps = _fairplay_steps(cfg, ds, splits, sorted({u[0] for u in fair}), run["data_fingerprint"])
        prepared = {k: _fairplay_path(cfg, k) for k in sorted({u[0] for u in fair})}
        jobs = [Job(_generator_job(k), _prepare_fairplay, (cfg, k, splits[k][0], run["data_fingerprint"]),
                    generator=True, threads=cfg.fairplay.threads) for k in steps]
        jobs += [Job(f"{t.method} fold {t.fold}", _run_task, (t,),
                     after=(_generator_job(t.fold),) if t.fairplay_data else ())
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
    units = [(k, m, model) for k in range(cfg.folds) for m in cfg.methods for model in cfg.models
             if supports(m, model)]
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
    if cfg.folds < 2:
        raise HaloBalanceError(f"--folds must be at least 2, got {cfg.folds}")
    if cfg.jobs < 1:
        raise HaloBalanceError(f"--jobs must be at least 1, got {cfg.jobs}")
    if not 0.0 <= cfg.ratio <= 1.0:
        raise HaloBalanceError(f"--ratio must lie in [0, 1], got {cfg.ratio}")
    if cfg.min_cell_size < 1:
        raise HaloBalanceError(f"--min-cell-size must be at least 1, got {cfg.min_cell_size}")
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
                          ("--adversary-attribute", cfg.adversary_attribute or ())):
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
    run.update(methods=list(cfg.methods), models=list(cfg.models), ratio=cfg.ratio,
               min_cell_size=cfg.min_cell_size, fairplay=cfg.fairplay.result_settings(),
               generator_options=cfg.generator_options,
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
           fairplay_data: dict[int, Path] | None = None) -> list[_Task]:
    by_pair: dict[tuple[int, str], list[str]] = {}
    for k, method, model in units:
        by_pair.setdefault((k, method), []).append(model)
    return [_Task(data=cfg.data, out=cfg.out, fold=k, method=method, models=tuple(models), groups=cfg.groups,
                  train_ids=splits[k][0], test_ids=splits[k][1], seed=cfg.seed + k, ratio=cfg.ratio,
                  min_cell_size=cfg.min_cell_size,
                  unit_hashes=tuple(cfg.unit_settings(method, model) for model in models),
                  fairplay_data=str(fairplay_data[k]) if fairplay_data else None, adversary=cfg.adversary,
                  options=cfg.generator_options.get(method, {}))
            for (k, method), models in by_pair.items()]


# Progress weights: a (fold, method, model) unit counts 1; a FairPlay fold step counts as many units as
# it roughly costs: training its generator and balancing, or balancing alone with a cached generator
# (CPU-time ratios measured on the eICU demo and the simulated cohort, benchmarks/RESULTS.md: a
# generator cost 3-40 downstream units, balancing 2-6).
GENERATOR_WEIGHT = 15
BALANCE_WEIGHT = 3


class _Progress:
    """One bar for the whole run: every unit and every FairPlay generator, with an ETA."""

    def __init__(self, enabled: bool, *, n_units: int, steps: dict[int, int]) -> None:
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

    def fold_prepared(self, fold: int) -> None:
        weight = self.steps.get(fold, 0)
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
    folds = {_generator_job(k): k for k in bar.steps}
    for name, k in folds.items():
        bar.write(f"{name}: {'training a generator and ' if bar.steps[k] == GENERATOR_WEIGHT else ''}balancing "
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
        # a targeted method's estimator is told its attribute's groups, not the experiment's
        fit_groups = task.adversary if task.method in fairness_methods.TARGETED else task.groups
        rows = fairness_methods.training_set(task.method, ds.select(task.train_ids), groups=fit_groups,
                                             ratio=task.ratio, min_cell_size=task.min_cell_size, seed=task.seed)
    else:
        rows = build_training_set(task.method, ds.select(task.train_ids), groups=task.groups, ratio=task.ratio,
                                  min_cell_size=task.min_cell_size, seed=task.seed, options=task.options)
    # FairPlay's time is its generator plus balancing (done once per fold, before this task)
    method_seconds = time.perf_counter() - t0 + extra.get("generator_seconds", 0) + extra.get("balance_seconds", 0)
    test = vm.frame["patient_id"].is_in(pl.Series(task.test_ids, dtype=pl.String).implode()).to_numpy()
    X_test, frame, y_test = vm.X[test], vm.frame.filter(pl.Series(test)), vm.y[test]
    test_groups = group_labels(frame, task.groups).to_numpy()
    # real rows beyond the visits of the distinct patients they come from are repeated copies
    real = rows.source[~rows.synthetic]
    n_copied = int(real.size - np.isin(vm.frame["patient_id"].to_numpy(), np.unique(real)).sum())
    synthetic_info = describe_synthetic(rows.X, rows.cells(), rows.synthetic, test_X=X_test,
                                        test_cells=np.char.add(np.char.add(y_test.astype(str), "|"),
                                                               test_groups.astype(str)))
    infos = []
    for name, unit_hash in zip(task.models, task.unit_hashes, strict=True):
        t1 = time.perf_counter()
        est = make_estimator(task.method, name, ratio=task.ratio, min_cell_size=task.min_cell_size,
                             random_state=task.seed)
        est.fit(rows.X, rows.y, rows.group, patients=rows.source, synthetic=rows.synthetic)
        scores, prediction = est.score_and_predict(X_test, test_groups)
        pooled = est.pooled_groups(test_groups)
        preds = frame.select("patient_id", "visit_index", *task.groups).with_columns(
            fold=pl.lit(task.fold, pl.Int32), method=pl.lit(task.method), model=pl.lit(name),
            y_true=pl.Series(y_test, dtype=pl.Int8), score=pl.Series(scores, dtype=pl.Float64),
            prediction=pl.Series(prediction, dtype=pl.Int8),
        ).select("fold", "method", "model", "patient_id", "visit_index", *task.groups, "y_true", "score",
                 "prediction")
        info = {"fold": task.fold, "method": task.method, "model": name, "settings": unit_hash,
                "n_train_rows": len(rows), "n_train_positive": int(rows.y.sum()),
                "n_synthetic_rows": int(rows.synthetic.sum()),
                "n_copied_rows": n_copied,
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
        path = _unit_path(Path(task.out), task.fold, task.method, name)
        write_json(path.with_suffix(".json"), info)
        _write_parquet(path, preds)
        infos.append(info)
    return infos


def make_estimator(method: str, model: str, *, ratio: float, min_cell_size: int, random_state: int):
    """The downstream estimator of a unit: per group for ``separate``, the mitigation method's own
    for ``benchmarks.fairness_methods``, else one model on the method's rows."""
    if method in fairness_methods.METHODS:
        return fairness_methods.make_estimator(method, model, ratio=ratio, min_cell_size=min_cell_size,
                                               random_state=random_state)
    if method == "separate":
        return SeparateModels(model, random_state=random_state)
    return SingleModel(model, random_state=random_state)


def _write_parquet(path: Path, frame: pl.DataFrame) -> None:
    buf = io.BytesIO()
    frame.write_parquet(buf)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------- FairPlay preparation
def _generator_dir(cfg: _Config) -> Path:
    return Path(cfg.generator_cache or Path(cfg.out) / "generators")


def _generator_job(fold: int) -> str:
    return f"FairPlay fold {fold}"


def _fairplay_path(cfg: _Config, fold: int) -> Path:
    return Path(cfg.out) / "fairplay" / f"fold{fold}-{cfg.unit_settings('fairplay-data', '')}"


def _fairplay_done(path: Path) -> bool:
    return (path / VISITS_FILE).is_file() and (path / TIMING_FILE).is_file()


def _fairplay_steps(cfg: _Config, ds: PreparedDataset, splits: list[tuple[np.ndarray, np.ndarray]],
                    folds: Sequence[int], fingerprint: str) -> dict[int, int]:
    """``{fold: progress weight}`` of the FairPlay folds still to balance (see ``GENERATOR_WEIGHT``)."""
    steps = {}
    for k in folds:
        if _fairplay_done(_fairplay_path(cfg, k)):
            continue
        key = generator_key(ds.select(splits[k][0]), fold=k, data_fingerprint=fingerprint,
                            train_options=cfg.fairplay.train_options, seed=cfg.seed + k)
        steps[k] = BALANCE_WEIGHT if (_generator_dir(cfg) / key).is_dir() else GENERATOR_WEIGHT
    return steps


def _prepare_fairplay(cfg: _Config, fold: int, train_ids: np.ndarray, fingerprint: str) -> dict[str, Any]:
    """Balance fold ``fold``'s training patients with FairPlay once (a job: any process, any
    machine); later runs reuse the saved result. Returns the timings."""
    path = _fairplay_path(cfg, fold)
    if _fairplay_done(path):
        return read_json(path / TIMING_FILE)
    train = _load_data(cfg.data)[0].select(train_ids)
    with limit_threads(cfg.fairplay.threads):
        balanced, plan, timings = fairplay_dataset(
            train, groups=cfg.groups, fold=fold, seed=cfg.seed + fold, settings=cfg.fairplay,
            generator_dir=_generator_dir(cfg), data_fingerprint=fingerprint,
            ratio=cfg.ratio, min_cell_size=cfg.min_cell_size, progress=False)
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

    keys = [(k, m, model) for k in range(cfg.folds) for m in cfg.methods for model in cfg.models
            if supports(m, model)]
    paths = [_unit_path(out, *key) for key in keys]
    predictions = pl.concat([pl.read_parquet(p) for p in paths])
    _write_parquet(out / "predictions.parquet", predictions)
    sizes = {k: train_group_sizes(ds, splits[k][0], cfg.groups) for k in range(cfg.folds)}
    frames = Parallel(n_jobs=cfg.jobs)(delayed(_unit_metrics)(p, cfg.groups, sizes[key[0]],
                                                              min_share=cfg.fairness_min_share)
                                       for p, key in zip(paths, keys, strict=True))
    metrics = pl.concat(frames)
    _write_parquet(out / "metrics.parquet", metrics)
    _write_parquet(out / "summary.parquet", summarise(metrics))
    infos = [read_json(p.with_suffix(".json")) for p in paths]
    infos = [{**i, "fit_report": json.dumps(i["fit_report"])} if "fit_report" in i else i for i in infos]
    _write_parquet(out / "units.parquet", pl.from_dicts(infos, infer_schema_length=None).with_columns(
        pl.col("pooled_groups").cast(pl.List(pl.String)).list.join(", ")).drop("settings"))


# ---------------------------------------------------------------------- CLI
def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}; "
                                         """write e.g. '{"preset": "small", "epochs": 20}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of option: value pairs, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kfold", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset folder")
    p.add_argument("--groups", required=True, nargs="+", metavar="ATTR",
                   help="group attributes; several = intersectional cells")
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
    p.add_argument("--ratio", type=float, default=1.0, help="fraction of each cell's gap to fill (all methods)")
    p.add_argument("--min-cell-size", type=int, default=5, help="cells smaller than this are left as they are")
    p.add_argument("--train-options", type=_json_object, default={}, metavar="JSON",
                   help="FairPlay generator training options (halo_balance.train.TrainOptions fields)")
    p.add_argument("--batch-size", type=int, default=256, help="FairPlay sampling batch size")
    p.add_argument("--allow-copies", action="store_true", help="FairPlay keeps synthetic copies of training records")
    p.add_argument("--generator-cache", default=None,
                   help="folder of cached FairPlay generators (default OUT/generators)")
    p.add_argument("--adversary-attribute", nargs="+", metavar="ATTR", default=None,
                   help="the protected attribute adversarial_debiasing's adversary predicts (default: the "
                        "--groups; several = their intersection)")
    p.add_argument("--generator-options", type=json.loads, default={}, metavar="JSON",
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
    out = run_kfold(data=args.data, groups=args.groups, out=args.out, folds=args.folds, methods=args.methods,
                    models=args.models, seed=args.seed, jobs=args.jobs, stratify=args.stratify, ratio=args.ratio,
                    min_cell_size=args.min_cell_size, fairplay=fairplay, generator_cache=args.generator_cache,
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
