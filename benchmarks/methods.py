"""Rebalancing methods: a fold's real training patients in, downstream training rows out.

Every method receives only the training patients of its fold and returns a :class:`TrainingSet`
of visit rows (the downstream models see visits, SPEC section 2). The cells are those of the
FairPlay balancer: the outcome crossed with the chosen group attributes (their intersection when
several). With ``n`` in a cell and ``m`` in the largest, an over-sampler adds
``round(ratio x (m - n))`` rows to every cell of at least ``min_cell_size`` (cells below it are
left as they are, as the balancer leaves them; they are too small to learn or to interpolate).

``original``
    The training visits unchanged.
``upsample`` (imbalanced-learn ``RandomOverSampler``)
    Patient level, like FairPlay: cells are counted in patients (label = the patient's outcome),
    whole patients are drawn with replacement, then expanded to all their visits.
``downsample`` (``RandomUnderSampler``)
    Patient level: every cell of at least ``min_cell_size`` patients is cut to the smallest such
    cell (by ``round(ratio x (n - smallest))`` patients); smaller cells are kept whole.
``smote`` (``SMOTE``)
    Visit level: cells are (visit label, groups) counted in visits; new rows interpolate between a
    visit and one of its k = min(5, n - 1) nearest visits of the same cell (Euclidean on the CSR
    rows; values become fractional). One call per cell, so a small cell does not shrink k for others.
``smoten`` (``SMOTEN``, for categorical features such as binary codes)
    Visit level, same cells and targets; a new row takes, per code, the most common value among a
    visit and its k nearest visits of the cell under the value difference metric, so rows stay
    binary. imbalanced-learn's SMOTEN works on a dense copy and a quadratic distance matrix per cell;
    to bound memory and time it is fitted on at most ``smoten_max_rows`` visits per cell (a seeded
    random subset) and on the codes present in that subset (absent codes would be 0 in every new
    row anyway). Synthetic rows get their cell's label and groups.
``separate`` (:class:`SeparateModels`)
    The training visits unchanged, one downstream model per group (the intersection of the chosen
    attributes); a test visit is scored by its group's model. A group with fewer than
    ``SEPARATE_MIN_PER_CLASS`` training visits of either class, or absent from training, falls back
    to a model trained on all training visits (reported per unit).
``fairplay`` (:func:`fairplay_dataset`)
    ``halo_balance.balance.rebalance`` with a generator trained on the fold's training patients;
    the generator is cached on disk by (fold, settings hash) and reused by a rerun.
``mcrage``, ``sma``, ``ctgan``, ``tvae`` (:func:`generative_oversample`, ``benchmarks.generative``)
    Visit level, the same cells and targets as SMOTE: a generator fitted on the fold's training
    visit rows and their cells (conditional Bernoulli diffusion; a sequential-CART synthetic copy
    upsampled per cell; CTGAN and TVAE of the ``ctgan`` package, an optional extra) returns each
    cell's gap in binary rows, which get their cell's label and groups. Selected by name; not in
    the default ``--methods``.

Every random choice takes the ``seed`` argument (the harness passes ``seed + fold``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError, unknown_choice
from halo_balance.io import atomic_dir

from . import downstream
from .generative import GENERATORS, GeneratorName, make_generator
from .metrics import group_labels

MethodName = Literal["original", "upsample", "downsample", "smote", "smoten", "separate", "fairplay",
                     "mcrage", "sma", "ctgan", "tvae"]
METHODS: tuple[str, ...] = ("original", "upsample", "downsample", "smote", "smoten", "separate", "fairplay")
GENERATIVE_METHODS: tuple[str, ...] = GENERATORS  # selected by name; not in the default --methods
SEPARATE_MIN_PER_CLASS = 10
SMOTEN_MAX_ROWS = 500


@dataclass(frozen=True)
class TrainingSet:
    """Downstream training rows.

    Attributes
    ----------
    X : csr_matrix (n_rows, V), float32.
    y : int8 labels.
    group : str, each row's group (attribute values joined by ``" & "``).
    synthetic : bool, rows that are not a real training visit (interpolated or generated).
    source : str, the id of the real training patient whose visit the row repeats ("" if synthetic).
    info : what the method reports about itself (e.g. a generator's timings), recorded per unit.
    """

    X: sp.csr_matrix
    y: np.ndarray
    group: np.ndarray
    synthetic: np.ndarray
    source: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.X.shape[0]

    def take(self, rows: np.ndarray) -> TrainingSet:
        return TrainingSet(self.X[rows], self.y[rows], self.group[rows], self.synthetic[rows], self.source[rows],
                           self.info)

    def append_synthetic(self, X: sp.csr_matrix, y: np.ndarray, group: np.ndarray) -> TrainingSet:
        n = X.shape[0]
        return TrainingSet(sp.vstack([self.X, X.astype(np.float32)], format="csr"),
                           np.concatenate([self.y, np.asarray(y, dtype=np.int8)]),
                           np.concatenate([self.group, np.asarray(group, dtype=self.group.dtype)]),
                           np.concatenate([self.synthetic, np.ones(n, dtype=bool)]),
                           np.concatenate([self.source, np.full(n, "", dtype=self.source.dtype)]), self.info)

    def cells(self) -> np.ndarray:
        """Each row's visit-level cell, ``"<label>|<group>"``."""
        return np.char.add(np.char.add(self.y.astype(str), "|"), self.group)


def training_rows(ds: PreparedDataset, groups: Sequence[str]) -> TrainingSet:
    """Every visit of ``ds`` as training rows (patients in table order, visits chronological)."""
    vm = ds.to_visit_matrix()
    synthetic = vm.frame["synthetic"].to_numpy()
    pids = vm.frame["patient_id"].to_numpy().astype(str)
    return TrainingSet(X=vm.X, y=np.asarray(vm.y, dtype=np.int8),
                       group=group_labels(vm.frame, groups).to_numpy().astype(str),
                       synthetic=synthetic, source=np.where(synthetic, "", pids))


def balance_targets(counts: Mapping[int, int], *, ratio: float, min_cell_size: int,
                    direction: Literal["up", "down"]) -> dict[int, int]:
    """Target size of every cell that changes: ``{cell: n_after}``.

    ``up``: cells of at least ``min_cell_size`` grow by ``round(ratio x (m - n))``, m the largest
    cell. ``down``: they shrink by ``round(ratio x (n - s))``, s the smallest such cell.
    """
    eligible = {c: n for c, n in counts.items() if n >= max(min_cell_size, 1)}
    if not eligible:
        return {}
    if direction == "up":
        m = max(counts.values())
        return {c: n + round(ratio * (m - n)) for c, n in eligible.items() if round(ratio * (m - n)) > 0}
    s = min(eligible.values())
    return {c: n - round(ratio * (n - s)) for c, n in eligible.items() if round(ratio * (n - s)) > 0}


def _codes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    names, codes = np.unique(labels, return_inverse=True)
    return names, codes.astype(np.int64)


def _patient_rows(ptr: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Row indices of the given patients' visits (patients repeat when drawn twice)."""
    lengths = ptr[patients + 1] - ptr[patients]
    starts = np.repeat(ptr[patients], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def resample_patients(train: PreparedDataset, groups: Sequence[str], sampler_cls, *, ratio: float,
                      min_cell_size: int, seed: int, direction: Literal["up", "down"],
                      cells: np.ndarray | None = None) -> TrainingSet:
    """Whole patients resampled per cell by an imbalanced-learn ``sampler_cls``, expanded to their visits.

    ``cells`` holds each patient's cell label (patients-table order); default outcome x ``groups``.
    """
    rows = training_rows(train, groups)
    _, cells = _codes(train.strata(groups).to_numpy() if cells is None else np.asarray(cells))
    targets = balance_targets(dict(enumerate(np.bincount(cells).tolist())), ratio=ratio,
                              min_cell_size=min_cell_size, direction=direction)
    if not targets:
        return rows
    sampler = sampler_cls(sampling_strategy=targets, random_state=seed)
    sampler.fit_resample(np.arange(len(cells)).reshape(-1, 1), cells)
    # visits are contiguous per patient, in the patients table's order (to_visit_matrix)
    counts = train.visits.group_by("patient_id").len()
    per_patient = train.patients.select("patient_id").join(counts, on="patient_id", how="left",
                                                           maintain_order="left")["len"].to_numpy()
    ptr = np.concatenate([[0], np.cumsum(per_patient, dtype=np.int64)])
    return rows.take(_patient_rows(ptr, np.sort(sampler.sample_indices_)))


def upsample(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0, min_cell_size: int = 5,
             seed: int = 0) -> TrainingSet:
    """Random patient-level over-sampling of the cells (see the module docstring)."""
    from imblearn.over_sampling import RandomOverSampler

    return resample_patients(train, groups, RandomOverSampler, ratio=ratio, min_cell_size=min_cell_size,
                             seed=seed, direction="up")


def downsample(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0, min_cell_size: int = 5,
               seed: int = 0) -> TrainingSet:
    """Random patient-level under-sampling of the cells (see the module docstring)."""
    from imblearn.under_sampling import RandomUnderSampler

    return resample_patients(train, groups, RandomUnderSampler, ratio=ratio, min_cell_size=min_cell_size,
                             seed=seed, direction="down")


def _visit_cells(rows: TrainingSet) -> tuple[np.ndarray, np.ndarray]:
    """Visit-level cells ``(names, codes)``; a name is ``"<label>|<group>"``."""
    return _codes(rows.cells())


@dataclass(frozen=True)
class _VisitCells:
    """A fold's training rows, their visit-level cells and the over-samplers' target per cell."""

    rows: TrainingSet
    names: np.ndarray
    cells: np.ndarray
    counts: np.ndarray
    targets: dict[int, int]


def _visit_targets(train: PreparedDataset, groups: Sequence[str], *, ratio: float, min_cell_size: int) -> _VisitCells:
    """Visit-level cells of ``train`` and the targets of the cells to top up (at least 2 rows each)."""
    rows = training_rows(train, groups)
    names, cells = _visit_cells(rows)
    counts = np.bincount(cells)
    targets = balance_targets(dict(enumerate(counts.tolist())), ratio=ratio,
                              min_cell_size=max(min_cell_size, 2), direction="up")
    return _VisitCells(rows, names, cells, counts, targets)


def smote(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0, min_cell_size: int = 5,
          seed: int = 0) -> TrainingSet:
    """SMOTE on visit rows, per (visit label x groups) cell (see the module docstring)."""
    from imblearn.over_sampling import SMOTE

    vc = _visit_targets(train, groups, ratio=ratio, min_cell_size=min_cell_size)
    rows, names, cells, counts, targets = vc.rows, vc.names, vc.cells, vc.counts, vc.targets
    out = rows
    for cell, target in sorted(targets.items()):
        sampler = SMOTE(sampling_strategy={cell: target}, k_neighbors=min(5, int(counts[cell]) - 1),
                        random_state=seed + cell)
        X_res, _ = sampler.fit_resample(rows.X, cells)
        out = _append_cell(out, sp.csr_matrix(X_res[len(cells):]), names, cell)
    return out


def _append_cell(rows: TrainingSet, X_new: sp.csr_matrix, names: np.ndarray, cell: int) -> TrainingSet:
    label, _, group = str(names[cell]).partition("|")
    n = X_new.shape[0]
    return rows.append_synthetic(X_new, np.full(n, int(label)), np.full(n, group))


def smoten(train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0, min_cell_size: int = 5,
           seed: int = 0, max_rows: int = SMOTEN_MAX_ROWS) -> TrainingSet:
    """SMOTEN on binary visit rows, per (visit label x groups) cell (see the module docstring)."""
    from imblearn.over_sampling import SMOTEN

    vc = _visit_targets(train, groups, ratio=ratio, min_cell_size=min_cell_size)
    rows, names, cells, counts, targets = vc.rows, vc.names, vc.cells, vc.counts, vc.targets
    if not targets:
        return rows
    rng = np.random.default_rng(seed)
    subset = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(cells == c), size=min(int(n), max_rows), replace=False)
        for c, n in enumerate(counts) if n]))
    X_sub, cells_sub = rows.X[subset], cells[subset]
    columns = np.unique(X_sub.indices)
    dense = X_sub[:, columns].toarray().astype(np.int8)
    n_sub = np.bincount(cells_sub, minlength=len(counts))
    V, out = rows.X.shape[1], rows
    for cell, target in sorted(targets.items()):
        n_new = target - int(counts[cell])
        sampler = SMOTEN(sampling_strategy={cell: int(n_sub[cell]) + n_new},
                         k_neighbors=min(5, int(n_sub[cell]) - 1), random_state=seed + cell)
        X_res, _ = sampler.fit_resample(dense, cells_sub)
        new = sp.csr_matrix(np.asarray(X_res[len(cells_sub):], dtype=np.float32))
        out = _append_cell(out, sp.csr_matrix((new.data, columns[new.indices], new.indptr), shape=(n_new, V)),
                           names, cell)
    return out


def generative_oversample(method: GeneratorName, train: PreparedDataset, *, groups: Sequence[str],
                          ratio: float = 1.0, min_cell_size: int = 5, seed: int = 0,
                          options: Mapping[str, Any] | None = None) -> TrainingSet:
    """A generative over-sampler of ``benchmarks.generative`` on visit rows (see the module docstring).

    The generator is fitted on every training visit row and its cell, then asked for each cell's
    gap; its rows are checked (:func:`benchmarks.synthetic_rows.check_rows`) and appended with
    their cell's label and group. ``info`` records the generator's fit and sampling seconds and,
    per cell, rows requested and generated (a shortfall is possible for ``ctgan`` / ``tvae``).
    """
    from .synthetic_rows import check_rows

    vc = _visit_targets(train, groups, ratio=ratio, min_cell_size=min_cell_size)
    requested = {c: t - int(vc.counts[c]) for c, t in sorted(vc.targets.items())}
    if not requested:
        return vc.rows
    t0 = time.perf_counter()
    generator = make_generator(method, random_state=seed, **dict(options or {})).fit(vc.rows.X, vc.cells)
    t1 = time.perf_counter()
    X_new, cells_new = generator.sample(requested)
    t2 = time.perf_counter()
    X_new = check_rows(X_new, vocab_size=vc.rows.X.shape[1], expected=len(cells_new), method=method)
    made = np.bincount(cells_new, minlength=len(vc.counts))
    label_of, _, group_of = zip(*(str(name).partition("|") for name in vc.names), strict=True)
    out = vc.rows.append_synthetic(X_new, np.asarray(label_of, dtype=np.int8)[cells_new],
                                   np.asarray(group_of)[cells_new])
    info = {"generator_fit_seconds": round(t1 - t0, 3), "generator_sample_seconds": round(t2 - t1, 3),
            "cells": {str(vc.names[c]): {"real": int(vc.counts[c]), "requested": n, "generated": int(made[c])}
                      for c, n in requested.items()}}
    info["shortfall"] = sum(v["requested"] - v["generated"] for v in info["cells"].values())
    return dataclasses.replace(out, info=info)


def build_training_set(method: MethodName, train: PreparedDataset, *, groups: Sequence[str], ratio: float = 1.0,
                       min_cell_size: int = 5, seed: int = 0, options: Mapping[str, Any] | None = None) -> TrainingSet:
    """The training rows of every method except ``fairplay`` (see :func:`fairplay_dataset`).

    ``options`` are a generative method's keyword arguments (``benchmarks.generative``).
    """
    if method in ("original", "separate"):
        return training_rows(train, groups)
    if method in GENERATIVE_METHODS:
        return generative_oversample(method, train, groups=groups, ratio=ratio, min_cell_size=min_cell_size,
                                     seed=seed, options=options)
    builders = {"upsample": upsample, "downsample": downsample, "smote": smote, "smoten": smoten}
    if method not in builders:
        raise HaloBalanceError(f"unknown rebalancing method {method!r}; choose from "
                               f"{', '.join(METHODS + GENERATIVE_METHODS)}")
    return builders[method](train, groups=groups, ratio=ratio, min_cell_size=min_cell_size, seed=seed)


# ---------------------------------------------------------------------- downstream estimators
class SingleModel:
    """One downstream model on all training rows: the estimator of every method that only changes the rows.

    The harness's estimators share one interface: ``fit(X, y, groups, *, patients=None,
    synthetic=None)``, ``score(X, groups)`` (positive-class probability), ``predict(X, groups)`` and
    ``score_and_predict(X, groups)`` (both at the cost of one scoring pass; the harness uses it).
    """

    def __init__(self, model: downstream.ModelName, *, random_state: int = 0) -> None:
        self.model = model
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> SingleModel:
        self.model_ = downstream.fit(self.model, X, y, random_state=self.random_state)
        return self

    def score(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> np.ndarray:
        return downstream.score(self.model_, X)

    def score_and_predict(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and 0/1 decisions of the rows (decisions: ``score > 0.5`` unless a method overrides)."""
        scores = self.score(X, groups)
        return scores, downstream.predict(scores)

    def predict(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> np.ndarray:
        return self.score_and_predict(X, groups)[1]

    def pooled_groups(self, groups: np.ndarray) -> list[str]:
        """The groups of ``groups`` served by a model or setting shared with other groups (none here)."""
        return []


class SeparateModels(SingleModel):
    """One downstream model per group, with a pooled model for groups too small to train alone.

    Parameters
    ----------
    model : downstream model name.
    min_per_class : a group needs this many training visits of each class for its own model.
    random_state : seed of every model.
    """

    def __init__(self, model: downstream.ModelName, *, min_per_class: int = SEPARATE_MIN_PER_CLASS,
                 random_state: int = 0) -> None:
        self.model = model
        self.min_per_class = min_per_class
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> SeparateModels:
        self.models_: dict[str, Any] = {}
        self.fallback_: list[str] = []
        for g in np.unique(groups):
            rows = np.flatnonzero(groups == g)
            n_pos = int(y[rows].sum())
            if min(n_pos, len(rows) - n_pos) >= self.min_per_class:
                self.models_[str(g)] = downstream.fit(self.model, X[rows], y[rows], random_state=self.random_state)
            else:
                self.fallback_.append(str(g))
        self.pooled_ = downstream.fit(self.model, X, y, random_state=self.random_state)
        return self

    def score(self, X: sp.csr_matrix, groups: np.ndarray) -> np.ndarray:
        """Positive-class probability of each row from its group's model (or the pooled one)."""
        out = np.empty(X.shape[0], dtype=np.float64)
        own = np.isin(groups, list(self.models_))
        for g, model in self.models_.items():
            rows = np.flatnonzero(groups == g)
            if rows.size:
                out[rows] = downstream.score(model, X[rows])
        if (~own).any():
            out[~own] = downstream.score(self.pooled_, X[~own])
        return out

    def pooled_groups(self, groups: np.ndarray) -> list[str]:
        return sorted(set(np.asarray(groups).astype(str).tolist()) - set(self.models_))


# ---------------------------------------------------------------------- FairPlay
@dataclass(frozen=True)
class FairPlaySettings:
    """FairPlay's own settings (the cells, ``ratio`` and ``min_cell_size`` are the run's).

    ``train_options`` are keyword arguments of ``halo_balance.train.TrainOptions``; ``seed`` (the
    run's seed + fold), ``device`` and ``resume`` / ``overwrite`` (of an interrupted training) are
    filled in unless given. ``threads`` is the number of torch threads the harness trains and
    samples with (like the device, it changes the last bits of the results, not their settings).
    """

    allow_copies: bool = False
    batch_size: int = 256
    device: str = "auto"
    train_options: dict[str, Any] = field(default_factory=dict)
    threads: int = 1

    def result_settings(self) -> dict[str, Any]:
        """The settings that change results (not ``device`` or ``batch_size``)."""
        return {"allow_copies": self.allow_copies, "train_options": self.train_options}


def settings_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def generator_key(train: PreparedDataset, *, fold: int, data_fingerprint: str, train_options: Mapping[str, Any],
                  seed: int) -> str:
    """The cache name of a fold's generator: the fold and a hash of its data and training settings."""
    ids = sorted(train.patients.filter(~pl.col("synthetic"))["patient_id"].to_list())
    return f"fold{fold}-" + settings_hash({"data": data_fingerprint, "train_ids": settings_hash(ids),
                                            "train_options": dict(train_options), "seed": seed})


def _train_options(options: Mapping[str, Any], *, seed: int, device: str, resume: bool):
    from halo_balance.train import TrainOptions

    names = {f.name for f in dataclasses.fields(TrainOptions)}
    run = {"seed": seed, "device": device, "resume": resume, "overwrite": not resume}
    return TrainOptions(**{**{k: v for k, v in run.items() if k in names}, **options})


def check_train_options(options: Mapping[str, Any]) -> None:
    """Fail early on generator training options that ``halo_balance.train.TrainOptions`` would reject:
    an unknown name or choice (with the closest one suggested), a value of the wrong type or out of range."""
    if not options:
        return
    from halo_balance.train import TrainOptions

    hints = typing.get_type_hints(TrainOptions)
    unknown = [k for k in options if k not in hints]
    if unknown:
        raise unknown_choice("--train-options", unknown, hints)
    for name, value in options.items():
        _check_option(name, value, hints[name])
    try:
        TrainOptions(**options).validate()
    except HaloBalanceError as exc:
        raise HaloBalanceError(f"--train-options: {exc}") from None


def _check_option(name: str, value: Any, hint: Any) -> None:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        if value not in args:
            raise unknown_choice(f"--train-options {name}", [value], args)
        return
    if type(None) in args:  # an optional value
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
    accepted = (int, float) if hint is float else (hint,)
    if isinstance(value, bool) != (hint is bool) or not isinstance(value, accepted):
        raise HaloBalanceError(f"--train-options: {name} must be a JSON "
                               f"{ {bool: 'true or false', int: 'integer', float: 'number', str: 'string'}[hint]}"
                               f"{' or null' if type(None) in args else ''}, got {value!r}")


def load_or_train_generator(train: PreparedDataset, *, path: Path, train_options: Mapping[str, Any], seed: int,
                            device: str = "auto", progress: bool = True):
    """The generator cached at ``path``, or one trained on ``train`` and saved there.

    Training works in ``<path>.training`` and resumes from its checkpoint when an earlier run was
    interrupted; the finished model (and ``training.json``) is written to ``path`` atomically, so
    an existing ``path`` is always a complete model.
    """
    from halo_balance.model import HaloModel

    if path.is_dir():
        return HaloModel.from_pretrained(path)
    from halo_balance.train import CHECKPOINT_DIR, STATE_FILE, TRAINING_FILE, train_model

    work = path.with_name(path.name + ".training")
    resume = (work / CHECKPOINT_DIR / STATE_FILE).is_file()
    model = train_model(train, out_dir=work, progress=progress,
                        options=_train_options(train_options, seed=seed, device=device, resume=resume))
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if (work / TRAINING_FILE).is_file():
            shutil.copy2(work / TRAINING_FILE, tmp / TRAINING_FILE)
    shutil.rmtree(work, ignore_errors=True)
    return model


def fairplay_dataset(train: PreparedDataset, *, groups: Sequence[str], fold: int, seed: int,
                     settings: FairPlaySettings, generator_dir: Path, data_fingerprint: str, ratio: float = 1.0,
                     min_cell_size: int = 5,
                     progress: bool = True) -> tuple[PreparedDataset, pl.DataFrame, dict[str, Any]]:
    """The fold's training patients plus FairPlay's synthetic patients, the balancing plan, and the
    seconds spent on the generator (training, or loading a cached one) and on balancing.

    The real patients of the result must be exactly the fold's training patients; anything else
    (a test patient, a dropped patient) is an error.
    """
    from halo_balance.balance import rebalance

    t0 = time.perf_counter()
    key = generator_key(train, fold=fold, data_fingerprint=data_fingerprint,
                        train_options=settings.train_options, seed=seed)
    cached = (Path(generator_dir) / key).is_dir()
    model = load_or_train_generator(train, path=Path(generator_dir) / key, train_options=settings.train_options,
                                    seed=seed, device=settings.device, progress=progress)
    t1 = time.perf_counter()
    result = rebalance(train, groups=list(groups), model=model, ratio=ratio,
                       min_cell_size=min_cell_size, allow_copies=settings.allow_copies, seed=seed,
                       batch_size=settings.batch_size, device=settings.device, progress=progress)
    real = set(result.dataset.patients.filter(~pl.col("synthetic"))["patient_id"].to_list())
    expected = set(train.patients["patient_id"].to_list())
    if real != expected:
        raise HaloBalanceError(
            f"fold {fold}: the balanced data's real patients differ from the fold's training patients "
            f"({len(real - expected)} unexpected, {len(expected - real)} missing)")
    timings = {"generator_seconds": round(t1 - t0, 1), "generator_cached": cached,
               "balance_seconds": round(time.perf_counter() - t1, 1)}
    return result.dataset, result.plan, timings
