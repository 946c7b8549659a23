"""Model configuration and the conditioning layout (no torch needed).

:class:`HaloConfig` holds the sizes of the model (Hugging Face style: a plain dataclass written to
``config.json``). :class:`ConditionLayout` says how a patient's outcome and group memberships become
the conditioning visit at position 0, and keeps the training counts of every (outcome x groups)
cell so that callers may leave some attributes unspecified when sampling.

Conditioning slots, in this order::

    label=0, label=1, <attribute>=<category> for every attribute and category of meta.json groups

A record activates exactly ``1 + n_attributes`` slots (one-hot outcome, one-hot membership per
attribute); the model sums their embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from .errors import HaloBalanceError, did_you_mean

PresetName = Literal["tiny", "small", "base"]
#: ``model_type`` of ``config.json``: the name under which ``halo_balance.hf`` registers the model
#: with ``transformers``' Auto classes.
MODEL_TYPE = "halo_balance"
#: Bookkeeping keys ``transformers`` writes into ``config.json``; they carry no model size.
HF_CONFIG_KEYS = frozenset({"model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                            "auto_map", "_name_or_path"})

#: Model sizes per preset. ``tiny`` trains a 600-patient cohort in seconds on a CPU, ``small`` the
#: eICU demo in minutes, ``base`` has the transformer size of the published HALO (GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_ctx=16, n_embd=64, n_layer=2, n_head=2, fine_hidden=64, dropout=0.0),
    "small": dict(n_ctx=32, n_embd=128, n_layer=4, n_head=4, fine_hidden=128, dropout=0.1),
    "base": dict(n_ctx=48, n_embd=768, n_layer=12, n_head=12, fine_hidden=512, dropout=0.1),
}


@dataclass
class HaloConfig:
    """Sizes of a :class:`halo_balance.model.HaloModel`.

    Parameters
    ----------
    vocab_size : int
        V, the number of tokens (codes) a visit may hold.
    n_conditions : int
        Number of conditioning slots (see :class:`ConditionLayout`).
    n_ctx : int
        Context length in visits, the conditioning visit included: a record has at most
        ``n_ctx - 1`` visits.
    n_embd, n_layer, n_head : int
        Width, depth and attention heads of the coarse transformer.
    fine_hidden : int
        Width H of the fine (within-visit) module; its parameters grow as O(V x H).
    dropout : float
        Dropout in the transformer and the fine module during training.
    layer_norm_eps : float
    preset : str or None
        Name of the preset these sizes came from (informational).
    """

    vocab_size: int
    n_conditions: int
    n_ctx: int = 32
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    fine_hidden: int = 128
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    preset: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_conditions", "n_embd", "n_layer", "n_head", "fine_hidden"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_ctx < 2:
            problems.append(f"n_ctx must be >= 2: the conditioning visit and one visit (got {self.n_ctx})")
        if self.n_embd % max(self.n_head, 1):
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must lie in [0, 1) (got {self.dropout})")
        if problems:
            raise HaloBalanceError("invalid model configuration: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, *, vocab_size: int, n_conditions: int, **overrides: Any) -> HaloConfig:
        """The preset's sizes for this vocabulary and layout; keyword overrides win (``None`` is ignored)."""
        if name not in PRESETS:
            raise HaloBalanceError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        sizes = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(vocab_size=vocab_size, n_conditions=n_conditions, preset=name, **sizes)

    def to_dict(self) -> dict[str, Any]:
        """The sizes, and ``model_type`` so that ``transformers.AutoConfig`` recognises ``config.json``."""
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HaloConfig:
        """Read :meth:`to_dict`'s output; keys that ``transformers`` adds to ``config.json`` are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in HF_CONFIG_KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise HaloBalanceError(f"config.json holds unknown keys {unknown}; it was written by a "
                                   "newer or different version of halo_balance")
        return cls(**dict(d))

    @property
    def n_fine_parameters(self) -> int:
        """Parameters of the fine module: ``2*V*H + V + d*H + 2*H^2 + 7*H`` (see ``model.py``)."""
        V, H, d = self.vocab_size, self.fine_hidden, self.n_embd
        return 2 * V * H + V + d * H + 2 * H * H + 7 * H


@dataclass
class ConditionLayout:
    """How (outcome, group memberships) become conditioning slots, and the training cell counts.

    Parameters
    ----------
    groups : dict
        ``{attribute: [categories]}`` in ``meta.json`` order.
    outcome : str
        Name of the outcome (``meta.json`` ``outcome``), informational.
    cells : list of dict
        One entry per (label, categories...) combination seen in training, with its patient count
        ``n``; used to fill unspecified attributes when sampling (:meth:`complete`).
    """

    groups: dict[str, list[str]]
    outcome: str = "outcome"
    cells: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ slots
    @property
    def attributes(self) -> list[str]:
        return list(self.groups)

    @property
    def n_slots(self) -> int:
        return 2 + sum(len(c) for c in self.groups.values())

    def slot_names(self) -> list[str]:
        return ["label=0", "label=1"] + [f"{a}={c}" for a, cats in self.groups.items() for c in cats]

    def encode(self, frame: pl.DataFrame) -> np.ndarray:
        """Slot ids, shape ``(n, 1 + n_attributes)`` int64, from a frame with ``label`` and every attribute.

        Raises :class:`HaloBalanceError` naming the column and value that do not fit the layout.
        """
        missing = [c for c in ("label", *self.groups) if c not in frame.columns]
        if missing:
            raise HaloBalanceError(f"conditions lack column(s) {missing}; every record needs 'label' "
                                   f"and each group attribute {self.attributes}")
        labels = frame["label"].cast(pl.Int64, strict=False)
        bad = frame.filter(~labels.is_in([0, 1]) | labels.is_null())
        if bad.height:
            raise HaloBalanceError(f"condition column 'label' must be 0 or 1 (offending value: {bad['label'][0]!r})")
        out = np.empty((frame.height, 1 + len(self.groups)), dtype=np.int64)
        out[:, 0] = labels.to_numpy()
        offset = 2
        for j, (attr, cats) in enumerate(self.groups.items(), start=1):
            col = frame[attr].cast(pl.String)
            unknown = col.filter(~col.is_in(cats) | col.is_null())
            if unknown.len():
                raise HaloBalanceError(f"condition column {attr!r}: value {unknown[0]!r} is not one of the "
                                       f"model's categories {cats}")
            out[:, j] = offset + col.replace_strict(cats, list(range(len(cats))), return_dtype=pl.Int64).to_numpy()
            offset += len(cats)
        return out

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_dataset(cls, dataset: Any) -> ConditionLayout:
        """The layout of a :class:`~halo_balance.data.PreparedDataset`, with its patients' cell counts."""
        groups = dataset.group_categories
        counts = dataset.cell_counts(list(groups))
        cells = [{"label": int(r["label"]), **{a: r[a] for a in groups}, "n": int(r["n"])}
                 for r in counts.iter_rows(named=True)]
        return cls(groups=groups, outcome=str(dataset.meta.get("outcome", "outcome")), cells=cells)

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "groups": self.groups, "slots": self.slot_names(), "cells": self.cells}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionLayout:
        layout = cls(groups={k: list(v) for k, v in d["groups"].items()}, outcome=d.get("outcome", "outcome"),
                     cells=list(d.get("cells", [])))
        if "slots" in d and list(d["slots"]) != layout.slot_names():
            raise HaloBalanceError("conditions.json: 'slots' do not match 'groups'; the file was edited by hand")
        return layout

    # ------------------------------------------------------------------ filling unspecified attributes
    def complete(self, fixed: Mapping[str, Any], n: int, *, seed: int = 0) -> pl.DataFrame:
        """``n`` full conditions with the ``fixed`` values; every other column drawn from training.

        Unspecified columns (``label`` included) are drawn jointly from the training patients'
        (outcome x groups) cell counts restricted to the cells that agree with ``fixed``, so the
        drawn combinations are the ones seen in training, in their training proportions. When every
        column is fixed, no training count is needed (any combination may be requested).
        """
        fixed = dict(fixed)
        columns = ["label", *self.groups]
        unknown = sorted(set(fixed) - set(columns))
        if unknown:
            bad = ", ".join(f"{u!r}{did_you_mean(u, columns)}" for u in unknown)
            raise HaloBalanceError(f"unknown condition attribute {bad}; the model knows {columns}")
        if "label" in fixed:
            fixed["label"] = _as_label(fixed["label"])
        for attr, value in fixed.items():
            if attr != "label" and value not in self.groups[attr]:
                raise HaloBalanceError(f"condition {attr}={value!r}{did_you_mean(value, self.groups[attr])}: not one "
                                       f"of the categories {self.groups[attr]}")
        schema = {"label": pl.Int8, **{a: pl.String for a in self.groups}}
        if len(fixed) == len(columns):
            return pl.DataFrame({c: [fixed[c]] * n for c in columns}, schema=schema)
        cells = [c for c in self.cells if all(c[k] == v for k, v in fixed.items()) and c["n"] > 0]
        if not cells:
            spec = ",".join(f"{k}={v}" for k, v in fixed.items()) or "(none)"
            raise HaloBalanceError(f"no training patient has {spec}, so the other attributes cannot be drawn "
                                   f"from training frequencies; specify all of {columns}")
        weights = np.array([c["n"] for c in cells], dtype=float)
        pick = np.random.default_rng(seed).choice(len(cells), size=n, p=weights / weights.sum())
        return pl.DataFrame({c: [cells[i][c] for i in pick] for c in columns}, schema=schema)


def parse_condition(text: str) -> dict[str, Any]:
    """``"label=1,gender=F"`` -> ``{"label": 1, "gender": "F"}`` (used by the command lines).

    An empty text is an error, not "no condition": leaving the condition out means that.
    """
    if not text.strip():
        raise HaloBalanceError(f"condition {text!r} is empty; give attribute=value pairs such as \"label=1\", "
                               "or leave the condition out to draw every attribute from the training frequencies")
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise HaloBalanceError(f"condition {text!r}: expected comma-separated attribute=value pairs")
        key = key.strip()
        if key in out:
            raise HaloBalanceError(f"condition {text!r}: {key!r} is given twice")
        out[key] = _as_label(value.strip()) if key == "label" else value.strip()
    return out


def _as_label(value: Any) -> int:
    if str(value).strip() in ("0", "1"):
        return int(str(value).strip())
    raise HaloBalanceError(f"label must be 0 or 1 (got {value!r})")
