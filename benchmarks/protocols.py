"""Evaluation protocols of the k-fold harness: ``project`` (the default) and ``paper``.

A protocol is the set of choices, beyond the data and the folds, that decides which method wins:
the downstream models' hyper-parameters, how each rebalancing method forms and fills its cells,
what FairPlay's generator is conditioned on and trained with, and how the fairness measures are
aggregated. ``python -m benchmarks.kfold --protocol paper`` applies every choice of the published
FairPlay experiments (npj Digital Medicine 8:100, 2025, and the experiment code its authors
released); ``--protocol project`` (the default) keeps this project's. Single options
(``--min-cell-size``, ``--downsample-floor``, ``--smote-classes``, ``--smote-binarize``,
``--model-params``, ``--generator-conditioning``, ``--fairness-aggregation``) override one choice
of either protocol; ``run.json`` records the protocol, every effective value and the overrides.

==========================  =====================================  ==========================================
choice                      ``project``                            ``paper``
==========================  =====================================  ==========================================
downstream models           ``benchmarks.downstream`` ``project``  ``paper``: library defaults but logreg
                            (sparse-friendly, fixed budgets)       lbfgs 1000 iterations, MLP (256, 128)
                                                                   early-stopped, kNN k=5 Euclidean, forest
                                                                   100 trees, XGBoost defaults
minimum cell size           5 (smaller cells are left as they      1 (every observed cell is filled)
                            are, for every method)
downsampling                to the smallest cell                   to max(smallest cell, 1,000 patients);
                                                                   smaller cells kept whole
SMOTE                       one call per (visit label x group)     one call over all visit rows with the
                            cell, values stay fractional           class = (visit label, group); values
                                                                   binarised (non-zero -> 1)
FairPlay's generator        conditioned on the outcome and every   conditioned on the outcome and the
                            group attribute of the data (one per   experiment's ``--balance-by`` attributes
                            fold, shared by the experiments)       only (one per fold and experiment)
generator training          ``--train-options`` over the           Adam (no weight decay, warm-up or
                            ``TrainOptions`` defaults              clipping), lr 1e-4, batch 512, patience 3,
                                                                   the ``base`` (768 x 12 x 12) preset
headline fairness           mean over (fold, model) units of the   once, on the group F1s averaged over
aggregation                 per-unit Theil / DI; groups under 1%   models and folds, over every group, an
                            of training left out; undefined F1     undefined F1 counted as 0
                            dropped
==========================  =====================================  ==========================================

Both fairness aggregations are always computed and stored under their own names (see
:mod:`benchmarks.metrics`); the protocol only picks the one the report leads with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from halo_balance.errors import unknown_choice

ProtocolName = Literal["project", "paper"]
ModelParams = Literal["project", "paper"]
SmoteClasses = Literal["per-cell", "combined"]
GeneratorConditioning = Literal["all", "balanced"]
FairnessAggregation = Literal["mean-of-units", "paper"]
# the choices of each option, for argparse and checks: the Literals above are their one statement
PROTOCOL_NAMES: tuple[str, ...] = get_args(ProtocolName)
SMOTE_CLASSES: tuple[str, ...] = get_args(SmoteClasses)
GENERATOR_CONDITIONINGS: tuple[str, ...] = get_args(GeneratorConditioning)
FAIRNESS_AGGREGATIONS: tuple[str, ...] = get_args(FairnessAggregation)
PAPER_DOWNSAMPLE_FLOOR = 1000
# Adam as in HALO's training script: no weight decay, warm-up or gradient clipping.
PAPER_TRAIN_OPTIONS: dict[str, Any] = {"preset": "base", "lr": 1e-4, "batch_size": 512, "patience": 3,
                                       "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 0.0}


@dataclass(frozen=True)
class Protocol:
    """Every choice a protocol fixes (see the module docstring for the two named ones).

    Attributes
    ----------
    name : the named protocol these values start from.
    model_params : downstream hyper-parameter set (:func:`benchmarks.downstream.make_model`).
    min_cell_size : cells with fewer real members are left as they are by every method.
    downsample_floor : downsampling cuts cells to max(smallest cell, floor) patients.
    smote_classes : ``per-cell`` (one SMOTE call per cell) or ``combined`` (one call, class = cell).
    smote_binarize : SMOTE's synthetic values become 1 where non-zero.
    generator_conditioning : FairPlay's generator sees ``all`` group attributes, or only the
        ``balanced`` ones (the experiment's ``--balance-by``).
    generator_options : ``halo_balance.train.TrainOptions`` fields under ``--train-options``.
    fairness_aggregation : the Theil / DI aggregation the report leads with.
    overrides : names of the fields set by a single option rather than by the named protocol.
    """

    name: ProtocolName = "project"
    model_params: ModelParams = "project"
    min_cell_size: int = 5
    downsample_floor: int = 0
    smote_classes: SmoteClasses = "per-cell"
    smote_binarize: bool = False
    generator_conditioning: GeneratorConditioning = "all"
    generator_options: Mapping[str, Any] = field(default_factory=dict)
    fairness_aggregation: FairnessAggregation = "mean-of-units"
    overrides: tuple[str, ...] = ()

    def train_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The generator's training options: the protocol's, then the given ones over them."""
        return {**self.generator_options, **given}

    def settings(self) -> dict[str, Any]:
        """The effective choices as JSON (``run.json``)."""
        out = dataclasses.asdict(self)
        out["generator_options"] = dict(self.generator_options)
        out["overrides"] = list(self.overrides)
        return out

    def describe(self) -> str:
        """One line for the report: the protocol's name and the options that override it."""
        if not self.overrides:
            return f"`{self.name}`"
        values = ", ".join(f"{k.replace('_', '-')} {getattr(self, k)}" for k in self.overrides)
        return f"`{self.name}`, overridden: {values}"


PROTOCOLS: dict[str, Protocol] = {
    "project": Protocol(),
    "paper": Protocol(name="paper", model_params="paper", min_cell_size=1, downsample_floor=PAPER_DOWNSAMPLE_FLOOR,
                      smote_classes="combined", smote_binarize=True, generator_conditioning="balanced",
                      generator_options=PAPER_TRAIN_OPTIONS, fairness_aggregation="paper"),
}


def resolve_protocol(name: str = "project", **overrides: Any) -> Protocol:
    """The named protocol with the given fields replaced; ``None`` values keep the protocol's.

    Raises :class:`HaloBalanceError` naming an unknown protocol or field.
    """
    if name not in PROTOCOLS:
        raise unknown_choice("--protocol", [name], PROTOCOL_NAMES)
    base = PROTOCOLS[name]
    fields = {f.name for f in dataclasses.fields(Protocol)} - {"name", "overrides"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise unknown_choice("protocol setting", unknown, sorted(fields))
    given = {k: v for k, v in overrides.items() if v is not None}
    changed = tuple(k for k in sorted(given) if given[k] != getattr(base, k))
    return dataclasses.replace(base, **given, overrides=changed)
