"""The balancer: top every under-filled (outcome x groups) cell up with synthetic patients.

:func:`rebalance` plans the cells (:func:`halo_balance.plan.plan_cells`), trains a generator on the
real training patients unless one is given, draws exactly the planned number of records per cell
and appends them, flagged ``synthetic``, to the unchanged real rows.

Conditions. The generator conditions on the outcome and on *every* group attribute of the dataset,
while a cell fixes only the outcome and the balanced attributes. The remaining attributes of each
synthetic patient are drawn from the real training patients of that cell, in their proportions
(for a cell with no real patient, from the real patients sharing its group values, whatever their
outcome; failing that, from all real patients).

Privacy. A synthetic record equal to a training record held by fewer than ``copy_k`` training
patients is rejected and re-drawn, in up to ``max_rounds`` rounds, unless ``allow_copies``; copies of
records that at least ``copy_k`` patients share identify nobody and are kept (``copies.py``). The
plan reports both counts per cell, and a cell that cannot be filled is an error. The training
records are those of ``train`` and, when the generator carries them, its own training records.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .config import ConditionLayout
from .copies import COPY_K, CopyFilter, RecordCounts, check_copy_settings, draw_without_copies
from .data import PreparedDataset
from .errors import HaloBalanceError
from .plan import AmplificationWarning, amplification_warnings, cell_name, plan_cells


@dataclass
class BalanceResult:
    """What :func:`rebalance` returns.

    Attributes
    ----------
    dataset : PreparedDataset
        The real training patients, unchanged, followed by the synthetic ones.
    synthetic : PreparedDataset
        The synthetic patients alone.
    plan : polars.DataFrame
        One row per cell: ``label``, the group columns, ``n_real``, ``to_generate``, ``target``,
        ``status``, ``generated``, ``rejected`` (copies of records held by fewer than ``copy_k``
        training patients, re-drawn) and ``kept_copies`` (copies of shared records, kept).
    model : HaloModel
        The generator used.
    """

    dataset: PreparedDataset
    synthetic: PreparedDataset
    plan: pl.DataFrame
    model: Any


def rebalance(train: PreparedDataset, *, groups: Sequence[str], model: Any = None, ratio: float = 1.0,
              min_cell_size: int = 5, include_empty_cells: bool = False, allow_copies: bool = False,
              copy_k: int = COPY_K, max_rounds: int = 10, seed: int = 0, batch_size: int = 256, device: str = "auto",
              train_options: Any = None, model_dir: str | os.PathLike | None = None,
              progress: bool = True, targets: Mapping[tuple, int] | None = None, shards: int = 1,
              backend: str = "local", ray_address: str = "auto", gpus_per_shard: float | None = None) -> BalanceResult:
    """Balance ``train`` on outcome x ``groups`` with a conditional HALO generator.

    Parameters
    ----------
    train : PreparedDataset
        The real training patients (rows already flagged synthetic are kept but not counted).
    groups : sequence of str
        Attributes that define the cells with the outcome; empty balances the outcome only.
    model : HaloModel, path or None
        A trained generator (or its folder); ``None`` trains one on ``train`` with ``train_options``.
    ratio, min_cell_size, include_empty_cells, targets
        See :func:`halo_balance.plan.plan_cells`. A cell amplified more than
        :data:`~halo_balance.plan.AMPLIFICATION_WARNING` times raises an
        :class:`~halo_balance.plan.AmplificationWarning`.
    allow_copies : bool
        Keep every synthetic record, copies of rare training records included.
    copy_k : int
        Copies of training records held by fewer than this many patients are rejected and
        re-drawn; copies of records that at least ``copy_k`` patients share are kept.
    max_rounds : int
        Rounds of re-drawing rejected records before giving up on a cell.
    seed : int
        Seeds training (when ``train_options`` gives none), the conditions and the sampler.
    batch_size : int
        Records sampled together.
    device : {"auto", "cpu", "cuda"}
    train_options : halo_balance.train.TrainOptions, optional
        Used when ``model`` is None; default: the ``tiny`` preset with this ``seed``.
    model_dir : path, optional
        Where a newly trained model is saved (default: a temporary folder, deleted afterwards;
        ``python -m halo_balance.generate`` trains in ``OUT/model``).
    progress : bool
    shards, backend, ray_address, gpus_per_shard
        Each round's sampling in shards, here or on a Ray cluster
        (:func:`halo_balance.sample.sample_shards`); the result does not depend on them.
    """
    from .model import HaloModel

    groups = list(groups)
    check_copy_settings(copy_k=copy_k, max_rounds=max_rounds)
    copy_filter = None if allow_copies else CopyFilter(k=copy_k)
    real = train.select(train.patients.filter(~pl.col("synthetic"))["patient_id"]) \
        if train.patients["synthetic"].any() else train
    if real.n_patients == 0:
        raise HaloBalanceError("the training data holds no real patients; nothing to balance")
    plan = plan_cells(real, groups=groups, ratio=ratio, min_cell_size=min_cell_size,
                      include_empty_cells=include_empty_cells, targets=targets)
    for line in amplification_warnings(plan, groups):
        warnings.warn(line, AmplificationWarning, stacklevel=2)
    if model is None:
        model = _train(real, train_options, seed=seed, device=device, model_dir=model_dir, progress=progress)
    elif isinstance(model, (str, os.PathLike)):
        model = HaloModel.from_pretrained(model)
    model.check_compatible(real)

    conditions, cell_of = _conditions(real, plan, groups, seed=seed)
    if copy_filter is not None:
        copy_filter.references = [RecordCounts.from_dataset(real)] + (
            [model.record_counts] if getattr(model, "record_counts", None) is not None else [])
    draw = draw_without_copies(model, conditions, copy_filter=copy_filter, max_rounds=max_rounds, seed=seed,
                               batch_size=batch_size, device=device, id_prefix="syn", progress=progress,
                               shards=shards, backend=backend, ray_address=ray_address, gpus_per_shard=gpus_per_shard)
    if len(draw.unfilled):
        short = plan.with_row_index("_i").filter(pl.col("_i").is_in(np.unique(cell_of[draw.unfilled]).tolist()))
        raise HaloBalanceError(
            f"{len(draw.unfilled)} synthetic records could not be drawn without copying a training record held by "
            f"fewer than {copy_k} patients after {max_rounds} rounds (cells: {_cell_names(short, groups)}); the "
            "generator memorises these cells. Train with more regularisation (or with --dp-epsilon), raise "
            "max_rounds, or pass allow_copies/--allow-copies")

    synthetic = _renumber(draw.dataset, train)
    generated = np.bincount(cell_of, minlength=plan.height)
    plan = plan.with_columns(generated=pl.Series(generated, dtype=pl.Int64),
                             rejected=pl.Series(np.bincount(cell_of, weights=draw.rejected, minlength=plan.height)
                                                .astype(np.int64), dtype=pl.Int64),
                             kept_copies=pl.Series(np.bincount(cell_of, weights=draw.kept_copies, minlength=plan.height)
                                                   .astype(np.int64), dtype=pl.Int64))
    out = PreparedDataset.concat([train, synthetic]) if synthetic.n_patients else train
    out.meta = {**out.meta, "generation": {
        "method": "halo_balance.rebalance", "groups": groups, "ratio": ratio, "min_cell_size": min_cell_size,
        "include_empty_cells": include_empty_cells, "max_rounds": max_rounds,
        **draw.summary(copy_filter), "seed": seed, "batch_size": batch_size,
        "synthetic_patients": synthetic.n_patients, "model_config": model.config.to_dict(),
        "sampler": synthetic.meta.get("generation", {}) if synthetic.n_patients else {}}}
    return BalanceResult(dataset=out, synthetic=synthetic, plan=plan, model=model)


def _train(real: PreparedDataset, options: Any, *, seed: int, device: str, model_dir: Any, progress: bool):
    from .train import TrainOptions, train_model

    options = options if options is not None else TrainOptions(preset="tiny", seed=seed, device=device)
    if model_dir is not None:
        return train_model(real, out_dir=model_dir, options=options, progress=progress)
    with tempfile.TemporaryDirectory(prefix="halo_balance_model_") as tmp:
        return train_model(real, out_dir=Path(tmp) / "model", options=options, progress=progress)


def _conditions(real: PreparedDataset, plan: pl.DataFrame, groups: list[str], *,
                seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """One full condition row per planned record, and the plan row (cell) each belongs to."""
    layout = ConditionLayout.from_dataset(real)
    rng = np.random.default_rng(seed)
    frames, cells = [], []
    for i, row in enumerate(plan.iter_rows(named=True)):
        n = row["to_generate"]
        if n <= 0:
            continue
        fixed = {"label": row["label"], **{g: row[g] for g in groups}}
        cell_seed = int(rng.integers(2**31))
        if row["n_real"] > 0:
            frame = layout.complete(fixed, n, seed=cell_seed)
        else:  # no real patient in the cell: borrow the other attributes from its group values
            without_label = {g: row[g] for g in groups}
            try:
                frame = layout.complete(without_label, n, seed=cell_seed)
            except HaloBalanceError:
                frame = layout.complete({}, n, seed=cell_seed)
            frame = frame.with_columns(**{k: pl.lit(v, dtype=frame.schema[k]) for k, v in fixed.items()})
        frames.append(frame)
        cells.append(np.full(n, i, dtype=np.int64))
    if not frames:
        schema = {"label": pl.Int8, **{a: pl.String for a in real.group_attributes}}
        return pl.DataFrame(schema=schema), np.zeros(0, dtype=np.int64)
    return pl.concat(frames), np.concatenate(cells)


def _renumber(synthetic: PreparedDataset, train: PreparedDataset) -> PreparedDataset:
    """Give the synthetic patients the ids ``syn-000001``...; never one of ``train``'s ids."""
    prefix = "syn"
    real_ids = train.patients["patient_id"]
    while real_ids.str.starts_with(f"{prefix}-").any():
        prefix += "x"
    width = max(6, len(str(synthetic.n_patients)))
    new = pl.Series([f"{prefix}-{i + 1:0{width}d}" for i in range(synthetic.n_patients)], dtype=pl.String)
    mapping = dict(zip(synthetic.patients["patient_id"].to_list(), new.to_list()))
    remap = pl.col("patient_id").replace_strict(mapping, return_dtype=pl.String)
    return PreparedDataset(synthetic.visits.with_columns(remap), synthetic.patients.with_columns(remap),
                           synthetic.vocab, synthetic.meta)


def _cell_names(cells: pl.DataFrame, groups: list[str]) -> str:
    return "; ".join(cell_name(r, groups) for r in cells.iter_rows(named=True))
