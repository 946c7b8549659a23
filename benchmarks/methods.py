"""Rebalancing methods: a fold's real training patients in, downstream training rows out.

Every method receives only the training patients of its fold and returns a :class:`TrainingSet`
of visit rows (the downstream models see visits, SPEC section 2). Its cells and their target sizes
come from a :class:`benchmarks.cells.Balancing`: the outcome crossed with the balanced attributes
(``--balance-by``; none: the outcome alone), filled by ``ratio`` of each gap, cells under
``min_cell_size`` left as they are (as the balancer leaves them; they are too small to learn or
to interpolate).

``original``
    The training visits unchanged.
``upsample`` (imbalanced-learn ``RandomOverSampler``)
    Patient level, like FairPlay: cells are counted in patients (label = the patient's outcome),
    whole patients are drawn with replacement, then expanded to all their visits.
``downsample`` (``RandomUnderSampler``)
    Patient level: every cell of at least ``min_cell_size`` patients is cut to
    ``max(smallest such cell, downsample_floor)`` patients (by ``round(ratio x (n - target))``);
    smaller cells are kept whole. The project's floor is 0; the paper's is 1,000 patients.
``smote`` (``SMOTE``)
    Visit level: cells are (visit label, groups) counted in visits; new rows interpolate between a
    visit and one of its k nearest visits of the same cell (Euclidean on the CSR rows).
    ``classes="per-cell"`` (the project's): one call per cell with k = min(5, n - 1), so a small
    cell does not shrink k for others. ``classes="combined"`` (the paper's): one call over all
    visit rows, the class being the cell, k = 5 (imbalanced-learn's default); a cell of at most 5
    visits cannot be interpolated with 5 neighbours and is left as it is. ``binarize`` (the
    paper's) sets every non-zero synthetic value to 1; otherwise values stay fractional.
``smoten`` (``SMOTEN``, for categorical features such as binary codes)
    Visit level, same cells and targets; a new row takes, per code, the most common value among a
    visit and its k nearest visits of the cell under the value difference metric, so rows stay
    binary. imbalanced-learn's SMOTEN works on a dense copy and a quadratic distance matrix per cell;
    to bound memory and time it is fitted on at most ``smoten_max_rows`` visits per cell (a seeded
    random subset) and on the codes present in that subset (absent codes would be 0 in every new
    row anyway). Synthetic rows get their cell's label and groups.
``separate`` (:class:`SeparateModels`)
    The training visits unchanged, one downstream model per group of the balanced attributes (the
    evaluation groups when only the outcome is balanced); a test visit is scored by its group's
    model. A group with fewer than ``SEPARATE_MIN_PER_CLASS`` training visits of either class, or
    absent from training, falls back to a model trained on all training visits (reported per unit).
``fairplay`` (:func:`fairplay_dataset`)
    ``halo_balance.balance.rebalance`` with a generator trained on the fold's training patients,
    conditioned on the outcome and every group attribute of the data or only on the balanced ones
    (``conditioning``); the generator is cached on disk by (fold, settings hash) and reused.
``mcrage``, ``sma``, ``ctgan``, ``tvae`` (:func:`generative_oversample`, ``benchmarks.generative``)
    Visit level, the same cells and targets as SMOTE (:func:`visit_targets`): a generator fitted
    on the fold's training visit rows and their cells (conditional Bernoulli diffusion; a
    sequential-CART synthetic copy upsampled per cell; CTGAN and TVAE of the ``ctgan`` package, an
    optional extra) returns each cell's gap in binary rows, which get their cell's label and
    groups. Selected by name; not in the default ``--methods``.

Every random choice takes the ``seed`` argument (the harness passes ``seed + fold``).
"""

from __future__ import annotations

import copy
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
from .cells import Balancing, Direction, balance_targets, cell_names, codes, group_names, split_cell
from .generative import GENERATORS, GeneratorName, make_generator
from .protocols import GENERATOR_CONDITIONINGS, SMOTE_CLASSES, GeneratorConditioning, SmoteClasses

MethodName = Literal["original", "upsample", "downsample", "smote", "smoten", "separate", "fairplay",
                     "mcrage", "sma", "ctgan", "tvae"]
METHODS: tuple[str, ...] = ("original", "upsample", "downsample", "smote", "smoten", "separate", "fairplay")
GENERATIVE_METHODS: tuple[str, ...] = GENERATORS  # selected by name; not in the default --methods
# methods that treat groups (not outcome x group cells) apart: Balancing.groups_for(per_group=True)
PER_GROUP_METHODS: tuple[str, ...] = ("separate",)
SEPARATE_MIN_PER_CLASS = 10
SMOTEN_MAX_ROWS = 500
SMOTE_NEIGHBOURS = 5
__all__ = ["Balancing", "balance_targets"]  # re-exported: the cells' logic lives in benchmarks.cells


@dataclass(frozen=True)
class TrainingSet:
    """Downstream training rows.

    Attributes
    ----------
    X : csr_matrix (n_rows, V), float32.
    y : int8 labels.
    group : str, each row's group (attribute values joined by ``" & "``; ``""`` for no attribute).
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
        """Each row's visit-level cell, ``"<visit label>|<group>"``."""
        return cell_names(self.y, self.group)

    def cell_counts(self) -> dict[str, int]:
        """Rows per visit-level cell."""
        names, counts = np.unique(self.cells(), return_counts=True)
        return {str(k): int(v) for k, v in zip(names, counts, strict=True)}


def training_rows(ds: PreparedDataset, groups: Sequence[str]) -> TrainingSet:
    """Every visit of ``ds`` as training rows (patients in table order, visits chronological)."""
    vm = ds.to_visit_matrix()
    synthetic = vm.frame["synthetic"].to_numpy()
    pids = vm.frame["patient_id"].to_numpy().astype(str)
    return TrainingSet(X=vm.X, y=np.asarray(vm.y, dtype=np.int8), group=group_names(vm.frame, groups),
                       synthetic=synthetic, source=np.where(synthetic, "", pids))


def _patient_rows(ptr: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Row indices of the given patients' visits (patients repeat when drawn twice)."""
    lengths = ptr[patients + 1] - ptr[patients]
    starts = np.repeat(ptr[patients], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return starts + within


def resample_patients(train: PreparedDataset, sampler_cls, *, balancing: Balancing, seed: int,
                      direction: Direction, cells: np.ndarray | None = None,
                      groups: Sequence[str] | None = None) -> TrainingSet:
    """Whole patients resampled per cell by an imbalanced-learn ``sampler_cls``, expanded to their visits.

    ``cells`` holds each patient's cell label (patients-table order; default
    ``balancing.patient_cells``); the rows' groups are ``groups`` (default the balanced attributes).
    """
    rows = training_rows(train, balancing.balance_by if groups is None else groups)
    _, cell = codes(balancing.patient_cells(train) if cells is None else np.asarray(cells))
    targets = balancing.targets(dict(enumerate(np.bincount(cell).tolist())), direction=direction)
    if not targets:
        return rows
    sampler = sampler_cls(sampling_strategy=targets, random_state=seed)
    sampler.fit_resample(np.arange(len(cell)).reshape(-1, 1), cell)
    # visits are contiguous per patient, in the patients table's order (to_visit_matrix)
    counts = train.visits.group_by("patient_id").len()
    per_patient = train.patients.select("patient_id").join(counts, on="patient_id", how="left",
                                                           maintain_order="left")["len"].to_numpy()
    ptr = np.concatenate([[0], np.cumsum(per_patient, dtype=np.int64)])
    return rows.take(_patient_rows(ptr, np.sort(sampler.sample_indices_)))


def upsample(train: PreparedDataset, *, balancing: Balancing, seed: int = 0) -> TrainingSet:
    """Random patient-level over-sampling of the cells (see the module docstring)."""
    from imblearn.over_sampling import RandomOverSampler

    return resample_patients(train, RandomOverSampler, balancing=balancing, seed=seed, direction="up")


def downsample(train: PreparedDataset, *, balancing: Balancing, seed: int = 0) -> TrainingSet:
    """Random patient-level under-sampling of the cells (see the module docstring)."""
    from imblearn.under_sampling import RandomUnderSampler

    return resample_patients(train, RandomUnderSampler, balancing=balancing, seed=seed, direction="down")


@dataclass(frozen=True)
class VisitCells:
    """A fold's training rows, their visit-level cells and an over-sampler's target per cell.

    ``names[c]`` is cell ``c``'s name (``"<visit label>|<group>"``), ``cells`` each row's cell
    code, ``counts`` the rows per cell and ``targets`` ``{cell code: rows after}`` for the cells
    to top up.
    """

    rows: TrainingSet
    names: np.ndarray
    cells: np.ndarray
    counts: np.ndarray
    targets: dict[int, int]


def visit_targets(train: PreparedDataset, *, balancing: Balancing, min_cell_size: int = 2) -> VisitCells:
    """The visit-level cells of ``train`` under ``balancing`` and their over-sampling targets.

    One piece for every visit-level over-sampler (SMOTE, SMOTEN, the generative baselines):
    ``--balance-by`` sets the cells, ``--ratio`` and the protocol the targets. ``min_cell_size``
    raises the balancing's own when a method needs more members (interpolation needs 2).
    """
    rows = training_rows(train, balancing.balance_by)
    names, cells = codes(rows.cells())
    counts = np.bincount(cells)
    targets = balancing.targets(dict(enumerate(counts.tolist())), direction="up",
                                min_cell_size=max(balancing.min_cell_size, min_cell_size))
    return VisitCells(rows, names, cells, counts, targets)


def smote(train: PreparedDataset, *, balancing: Balancing, seed: int = 0, classes: SmoteClasses = "per-cell",
          binarize: bool = False) -> TrainingSet:
    """SMOTE on visit rows, per (visit label x groups) cell or in one call (see the module docstring)."""
    from imblearn.over_sampling import SMOTE

    if classes not in SMOTE_CLASSES:
        raise unknown_choice("--smote-classes", [classes], SMOTE_CLASSES)
    k = SMOTE_NEIGHBOURS
    vc = visit_targets(train, balancing=balancing, min_cell_size=k + 1 if classes == "combined" else 2)
    rows, names, cell, counts, targets = vc.rows, vc.names, vc.cells, vc.counts, vc.targets
    if not targets:
        return rows
    if classes == "combined":
        X_res, y_res = SMOTE(sampling_strategy=targets, k_neighbors=k, random_state=seed).fit_resample(rows.X, cell)
        return _append_cells(rows, sp.csr_matrix(X_res[len(cell):]), names[y_res[len(cell):]], binarize=binarize)
    out = rows
    for c, target in sorted(targets.items()):
        sampler = SMOTE(sampling_strategy={c: target}, k_neighbors=min(SMOTE_NEIGHBOURS, int(counts[c]) - 1),
                        random_state=seed + c)
        X_res, _ = sampler.fit_resample(rows.X, cell)
        new = sp.csr_matrix(X_res[len(cell):])
        out = _append_cells(out, new, np.full(new.shape[0], names[c]), binarize=binarize)
    return out


def _append_cells(rows: TrainingSet, X_new: sp.csr_matrix, cells: np.ndarray, *, binarize: bool) -> TrainingSet:
    """Append synthetic rows with the label and group of their cell names."""
    if binarize:  # every non-zero value becomes 1
        X_new = X_new.copy()
        X_new.eliminate_zeros()
        X_new.data[:] = 1.0
    parts = [split_cell(c) for c in np.asarray(cells).tolist()]
    return rows.append_synthetic(X_new, np.array([p[0] for p in parts], dtype=np.int8),
                                 np.array([p[1] for p in parts], dtype=rows.group.dtype))


def smoten(train: PreparedDataset, *, balancing: Balancing, seed: int = 0,
           max_rows: int = SMOTEN_MAX_ROWS) -> TrainingSet:
    """SMOTEN on binary visit rows, per (visit label x groups) cell (see the module docstring)."""
    from imblearn.over_sampling import SMOTEN

    vc = visit_targets(train, balancing=balancing)
    rows, names, cell, counts, targets = vc.rows, vc.names, vc.cells, vc.counts, vc.targets
    if not targets:
        return rows
    rng = np.random.default_rng(seed)
    subset = np.sort(np.concatenate([
        rng.choice(np.flatnonzero(cell == c), size=min(int(n), max_rows), replace=False)
        for c, n in enumerate(counts) if n]))
    X_sub, cells_sub = rows.X[subset], cell[subset]
    columns = np.unique(X_sub.indices)
    dense = X_sub[:, columns].toarray().astype(np.int8)
    n_sub = np.bincount(cells_sub, minlength=len(counts))
    V, out = rows.X.shape[1], rows
    for c, target in sorted(targets.items()):
        n_new = target - int(counts[c])
        sampler = SMOTEN(sampling_strategy={c: int(n_sub[c]) + n_new},
                         k_neighbors=min(SMOTE_NEIGHBOURS, int(n_sub[c]) - 1), random_state=seed + c)
        X_res, _ = sampler.fit_resample(dense, cells_sub)
        new = sp.csr_matrix(np.asarray(X_res[len(cells_sub):], dtype=np.float32))
        out = _append_cells(out, sp.csr_matrix((new.data, columns[new.indices], new.indptr), shape=(n_new, V)),
                            np.full(n_new, names[c]), binarize=False)
    return out


def generative_oversample(method: GeneratorName, train: PreparedDataset, *, balancing: Balancing, seed: int = 0,
                          options: Mapping[str, Any] | None = None) -> TrainingSet:
    """A generative over-sampler of ``benchmarks.generative`` on visit rows (see the module docstring).

    The generator is fitted on every training visit row and its cell (:func:`visit_targets`), then
    asked for each cell's gap; its rows are checked (:func:`benchmarks.synthetic_rows.check_rows`)
    and appended with their cell's label and group. ``info`` records the generator's fit and
    sampling seconds and, per cell, rows requested and generated (a shortfall is possible for
    ``ctgan`` / ``tvae``).
    """
    from .synthetic_rows import check_rows

    vc = visit_targets(train, balancing=balancing)
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
    out = _append_cells(vc.rows, X_new, vc.names[cells_new], binarize=False)
    info = {"generator_fit_seconds": round(t1 - t0, 3), "generator_sample_seconds": round(t2 - t1, 3),
            "cells": {str(vc.names[c]): {"real": int(vc.counts[c]), "requested": n, "generated": int(made[c])}
                      for c, n in requested.items()}}
    info["shortfall"] = sum(v["requested"] - v["generated"] for v in info["cells"].values())
    return dataclasses.replace(out, info=info)


def build_training_set(method: MethodName, train: PreparedDataset, *, balancing: Balancing, seed: int = 0,
                       groups: Sequence[str] | None = None, smote_classes: SmoteClasses = "per-cell",
                       smote_binarize: bool = False, options: Mapping[str, Any] | None = None) -> TrainingSet:
    """The training rows of every method except ``fairplay`` (see :func:`fairplay_dataset`).

    ``groups`` names the rows' group attributes for ``original`` and ``separate`` (default: the
    balanced ones); ``smote_classes`` and ``smote_binarize`` apply to ``smote``; ``options`` are a
    generative method's keyword arguments (``benchmarks.generative``).
    """
    if method in ("original", "separate"):
        return training_rows(train, balancing.balance_by if groups is None else groups)
    if method in GENERATIVE_METHODS:
        return generative_oversample(method, train, balancing=balancing, seed=seed, options=options)
    if method == "smote":
        return smote(train, balancing=balancing, seed=seed, classes=smote_classes, binarize=smote_binarize)
    builders = {"upsample": upsample, "downsample": downsample, "smoten": smoten}
    if method not in builders:
        raise unknown_choice("rebalancing method", [method], METHODS + GENERATIVE_METHODS)
    return builders[method](train, balancing=balancing, seed=seed)


# ---------------------------------------------------------------------- downstream estimators
class SingleModel:
    """One downstream model on all training rows: the estimator of every method that only changes the rows.

    The harness's estimators share one interface: ``fit(X, y, groups, *, patients=None,
    synthetic=None)``, ``score(X, groups)`` (positive-class probability), ``predict(X, groups)`` and
    ``score_and_predict(X, groups)`` (both at the cost of one scoring pass; the harness uses it).
    """

    def __init__(self, model: downstream.ModelName, *, params: downstream.ParamSet = "project",
                 random_state: int = 0) -> None:
        self.model = model
        self.params = params
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> SingleModel:
        self.model_ = downstream.fit(self.model, X, y, random_state=self.random_state, params=self.params)
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
    params : downstream parameter set (``project`` or ``paper``, :mod:`benchmarks.downstream`).
    random_state : seed of every model.
    """

    def __init__(self, model: downstream.ModelName, *, min_per_class: int = SEPARATE_MIN_PER_CLASS,
                 params: downstream.ParamSet = "project", random_state: int = 0) -> None:
        self.model = model
        self.params = params
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
                self.models_[str(g)] = downstream.fit(self.model, X[rows], y[rows], random_state=self.random_state,
                                                      params=self.params)
            else:
                self.fallback_.append(str(g))
        self.pooled_ = downstream.fit(self.model, X, y, random_state=self.random_state, params=self.params)
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
    ``conditioning``: the generator is conditioned on the outcome and ``all`` group attributes of
    the data, or only on the ``balanced`` ones.
    """

    allow_copies: bool = False
    batch_size: int = 256
    device: str = "auto"
    train_options: dict[str, Any] = field(default_factory=dict)
    threads: int = 1
    conditioning: GeneratorConditioning = "all"

    def result_settings(self) -> dict[str, Any]:
        """The settings that change results (not ``device`` or ``batch_size``), the training options
        resolved (``TrainOptions.resolved``: defaults and generator version included)."""
        resolved = _train_options(self.train_options, seed=0, device="cpu", resume=False).resolved()
        if "seed" not in self.train_options:  # the fold's seed, filled in per fold
            del resolved["options"]["seed"]
        return {"allow_copies": self.allow_copies, "train_options": resolved, "conditioning": self.conditioning}

    def conditioned_on(self, train: PreparedDataset, balance_by: Sequence[str]) -> list[str]:
        """The group attributes the generator sees besides the outcome."""
        if self.conditioning not in GENERATOR_CONDITIONINGS:
            raise unknown_choice("--generator-conditioning", [self.conditioning], GENERATOR_CONDITIONINGS)
        return [a for a in train.group_attributes if self.conditioning == "all" or a in balance_by]


def settings_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def generator_key(train: PreparedDataset, *, fold: int, data_fingerprint: str, train_options: Mapping[str, Any],
                  seed: int, conditioning: Sequence[str]) -> str:
    """The cache name of a fold's generator: the fold and a hash of its training patients, training
    settings and the group attributes it is conditioned on (with the outcome).

    The settings are resolved (``TrainOptions.resolved``: every default and the generator version),
    so a generator cached before a default or the training code changed is never reused.
    """
    ids = sorted(train.patients.filter(~pl.col("synthetic"))["patient_id"].to_list())
    resolved = _train_options(train_options, seed=seed, device="cpu", resume=False).resolved()
    return f"fold{fold}-" + settings_hash({"data": data_fingerprint, "train_ids": settings_hash(ids),
                                            "train_options": resolved, "seed": seed,
                                            "conditioning": list(conditioning)})


def restrict_attributes(ds: PreparedDataset, attributes: Sequence[str]) -> PreparedDataset:
    """A view of ``ds`` whose only group attributes are ``attributes`` (a generator trained on it is
    conditioned on the outcome and those attributes alone)."""
    attributes = list(attributes)
    meta = copy.deepcopy(ds.meta)
    meta["groups"] = {a: list(ds.meta["groups"][a]) for a in attributes}
    drop = [a for a in ds.group_attributes if a not in attributes]
    return PreparedDataset(ds.visits, ds.patients.drop(drop), ds.vocab, meta)


def complete_attributes(synthetic: PreparedDataset, real: PreparedDataset, *, fixed: Sequence[str],
                        seed: int) -> PreparedDataset:
    """``synthetic`` with every group attribute of ``real``: the attributes it lacks are drawn, per
    (outcome x ``fixed``) cell, from the real patients of that cell in their proportions (as the
    balancer draws the attributes a cell leaves open)."""
    from halo_balance.config import ConditionLayout

    layout = ConditionLayout.from_dataset(real)
    missing = [a for a in real.group_attributes if a not in synthetic.group_attributes]
    rng = np.random.default_rng(seed)
    keyed = synthetic.patients.with_row_index("_row")
    parts = []
    for key, part in keyed.group_by(["label", *fixed], maintain_order=True):
        values = dict(zip(["label", *fixed], key, strict=True))
        drawn = layout.complete(values, part.height, seed=int(rng.integers(2**31)))
        parts.append(part.select("_row").hstack(drawn.select(missing)))
    filled = pl.concat(parts).sort("_row").drop("_row") if parts else pl.DataFrame(
        schema={a: pl.String for a in missing})
    patients = synthetic.patients.hstack(filled).select(real.patients.columns)
    return PreparedDataset(synthetic.visits, patients, real.vocab, copy.deepcopy(real.meta))


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
    an existing ``path`` is always a complete model. Runs sharing a cache take turns on an entry
    (a lock file ``<path>.lock``): the first trains it, the others wait and load it.
    """
    from filelock import FileLock

    from halo_balance.model import HaloModel

    if path.is_dir():  # the common case needs no lock
        return HaloModel.from_pretrained(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(path.name + ".lock")):
        if path.is_dir():  # trained by another run while this one waited
            return HaloModel.from_pretrained(path)
        return _train_generator(train, path=path, train_options=train_options, seed=seed, device=device,
                                progress=progress)


def _train_generator(train: PreparedDataset, *, path: Path, train_options: Mapping[str, Any], seed: int,
                     device: str, progress: bool):
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


def fairplay_dataset(train: PreparedDataset, *, balancing: Balancing, fold: int, seed: int,
                     settings: FairPlaySettings, generator_dir: Path, data_fingerprint: str,
                     progress: bool = True) -> tuple[PreparedDataset, pl.DataFrame, dict[str, Any]]:
    """The fold's training patients plus FairPlay's synthetic patients, the balancing plan, and the
    seconds spent on the generator (training, or loading a cached one) and on balancing.

    The generator is trained on ``train`` reduced to the attributes it is conditioned on
    (:meth:`FairPlaySettings.conditioned_on`); synthetic patients then receive the attributes it
    did not see from :func:`complete_attributes`. The real patients of the result must be exactly
    the fold's training patients; anything else (a test patient, a dropped patient) is an error.
    """
    from halo_balance.balance import rebalance

    t0 = time.perf_counter()
    attributes = settings.conditioned_on(train, balancing.balance_by)
    view = train if attributes == train.group_attributes else restrict_attributes(train, attributes)
    key = generator_key(train, fold=fold, data_fingerprint=data_fingerprint, train_options=settings.train_options,
                        seed=seed, conditioning=attributes)
    cached = (Path(generator_dir) / key).is_dir()
    model = load_or_train_generator(view, path=Path(generator_dir) / key, train_options=settings.train_options,
                                    seed=seed, device=settings.device, progress=progress)
    t1 = time.perf_counter()
    result = rebalance(view, groups=list(balancing.balance_by), model=model, ratio=balancing.ratio,
                       min_cell_size=balancing.min_cell_size, allow_copies=settings.allow_copies, seed=seed,
                       batch_size=settings.batch_size, device=settings.device, progress=progress)
    dataset = result.dataset
    if view is not train:
        synthetic = complete_attributes(result.synthetic, train, fixed=balancing.balance_by, seed=seed)
        dataset = PreparedDataset.concat([train, synthetic]) if synthetic.n_patients else train
    real = set(dataset.patients.filter(~pl.col("synthetic"))["patient_id"].to_list())
    expected = set(train.patients["patient_id"].to_list())
    if real != expected:
        raise HaloBalanceError(
            f"fold {fold}: the balanced data's real patients differ from the fold's training patients "
            f"({len(real - expected)} unexpected, {len(expected - real)} missing)")
    timings = {"generator_seconds": round(t1 - t0, 1), "generator_cached": cached,
               "balance_seconds": round(time.perf_counter() - t1, 1), "generator_conditioning": attributes}
    return dataset, result.plan, timings
