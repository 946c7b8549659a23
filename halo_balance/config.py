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

from .errors import HaloBalanceError, did_you_mean, unknown_choice

PresetName = Literal["tiny", "small", "base"]
#: ``model_type`` of ``config.json``: the name under which ``halo_balance.hf`` registers the model
#: with ``transformers``' Auto classes.
MODEL_TYPE = "halo_balance"
#: Bookkeeping keys ``transformers`` writes into ``config.json``; they carry no model size.
HF_CONFIG_KEYS = frozenset({"model_type", "architectures", "transformers_version", "dtype", "torch_dtype",
                            "auto_map", "_name_or_path"})

#: Model sizes per preset. ``tiny`` trains a 600-patient cohort in seconds on a CPU, ``small`` the
#: eICU demo in minutes, ``base`` has the transformer size of the published HALO (GPU). Every preset
#: conditions every state and models empty visits as their own event (see :class:`HaloConfig`).
_STRUCTURE = dict(condition_every_visit=True, empty_visit_event=True, position_event_bias=True)
#: the structure switched off: the model differentially private training uses (``dp.py`` computes
#: per-patient gradients for its modules only)
PLAIN_STRUCTURE = {name: False for name in _STRUCTURE}
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_ctx=16, n_embd=64, n_layer=2, n_head=2, fine_hidden=64, dropout=0.0, **_STRUCTURE),
    "small": dict(n_ctx=32, n_embd=128, n_layer=4, n_head=4, fine_hidden=128, dropout=0.1, **_STRUCTURE),
    "base": dict(n_ctx=48, n_embd=768, n_layer=12, n_head=12, fine_hidden=512, dropout=0.1, **_STRUCTURE),
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
    condition_every_visit : bool
        Add a learned embedding of the conditions to every state the transformer puts out, so that
        every visit's codes and end bit see the outcome and groups directly, not only through
        attention to position 0.
    exclusive_groups : list of [first, last]
        Runs of token ids of which a visit holds at most one (the bins of one lab item, see
        :func:`exclusive_token_groups`): once one is drawn, the rest of its run has probability 0.
    empty_visit_event : bool
        Model "the visit holds no token" as its own event, predicted from the visit's state, and
        the codes of the other visits given that they hold at least one (see ``model.py``).
    position_event_bias : bool
        Give the end and empty-visit events a learned bias per visit position, beside the one the
        state predicts: their rates change with the position (on the eICU demo 77% of records end
        after one stay, 65% of the rest after two; 5% of first stays are empty, 28% of later ones).
    n_pairs : int
        Within-visit pair terms of the fine module: a logit added to code i for each earlier code j
        of the visit, for the (j, i) pairs that enough training patients share (fitted after
        training, ``train.refit_output_biases``; 0 for a model without them).
    n_cell_terms : int
        Cell terms of the fine module: a logit added to code i in every visit of the records of one
        outcome x group cell, for the (cell, code) pairs that enough of the cell's training patients
        hold (fitted after training; 0 for a model without them).
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
    condition_every_visit: bool = False
    exclusive_groups: list[list[int]] = field(default_factory=list)
    empty_visit_event: bool = False
    position_event_bias: bool = False
    n_pairs: int = 0
    n_cell_terms: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "n_conditions", "n_embd", "n_layer", "n_head", "fine_hidden"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_ctx < 2:
            problems.append(f"n_ctx must be >= 2: the conditioning visit and one visit (got {self.n_ctx})")
        if self.n_embd % max(self.n_head, 1):
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("n_pairs", "n_cell_terms"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must lie in [0, 1) (got {self.dropout})")
        self.exclusive_groups = [[int(a), int(b)] for a, b in self.exclusive_groups]
        last = -1
        for a, b in self.exclusive_groups:
            if not last < a <= b < self.vocab_size:
                problems.append(f"exclusive_groups must be ascending, disjoint [first, last] id runs within "
                                f"the vocabulary (got [{a}, {b}])")
                break
            last = b
        if problems:
            raise HaloBalanceError("invalid model configuration: " + "; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, *, vocab_size: int, n_conditions: int, **overrides: Any) -> HaloConfig:
        """The preset's sizes for this vocabulary and layout; keyword overrides win (``None`` is ignored)."""
        if name not in PRESETS:
            raise unknown_choice("preset", [name], sorted(PRESETS))
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
        """Parameters of the fine module: ``2*V*H + V + d*H + 2*H^2 + 7*H`` (see ``model.py``), plus
        ``d + 1`` (and ``n_ctx`` position biases) for the empty-visit event."""
        V, H, d = self.vocab_size, self.fine_hidden, self.n_embd
        empty = (d + 1 + self.n_ctx * self.position_event_bias) * self.empty_visit_event
        return 2 * V * H + V + d * H + 2 * H * H + 7 * H + empty


#: token kinds whose tokens are ``<stem>:<bin>``, one bin per stem and visit (``data_prep``: the lab
#: items' bins of the visit mean; the time tokens' age and gap bins)
BINNED_KINDS = ("lab", "time")


def exclusive_token_groups(vocab: pl.DataFrame, codes: np.ndarray | None = None,
                           code_ptr: np.ndarray | None = None) -> tuple[list[list[int]], list[str]]:
    """Runs of token ids of which a visit holds at most one: the bins of each binned item.

    Tokens of a :data:`BINNED_KINDS` kind named ``<stem>:<integer bin>`` share a group with the
    tokens of the same stem that are adjacent in id order (the prepared format numbers an item's
    bins consecutively). With the visits (``codes`` and ``code_ptr`` of
    :meth:`PreparedDataset.records`), a run that some visit holds twice is not exclusive there and
    is left out.

    Returns
    -------
    groups : list of [first, last]
        Ascending, disjoint id runs of at least two tokens.
    dropped : list of str
        The stems left out because a visit holds two of their tokens.
    """
    tokens, kinds = vocab["token"].to_list(), vocab["kind"].to_list()
    stems = [t.rsplit(":", 1)[0] if k in BINNED_KINDS and t.rsplit(":", 1)[-1].isdigit() and ":" in t else None
             for t, k in zip(tokens, kinds)]
    runs, start = [], 0
    for i in range(1, len(stems) + 1):
        if i == len(stems) or stems[i] != stems[start] or stems[i] is None:
            if stems[start] is not None and i - start >= 2:
                runs.append([start, i - 1])
            start = i
    dropped: list[str] = []
    if codes is not None and code_ptr is not None and runs:
        run_of = np.full(len(tokens), -1, dtype=np.int64)
        for r, (a, b) in enumerate(runs):
            run_of[a:b + 1] = r
        visit = np.repeat(np.arange(len(code_ptr) - 1), np.diff(code_ptr))
        hit = run_of[codes] >= 0
        pairs = visit[hit] * len(runs) + run_of[codes[hit]]
        twice = np.unique(pairs[np.r_[False, pairs[1:] == pairs[:-1]]] % len(runs))  # codes sorted per visit
        dropped = [stems[runs[r][0]] for r in twice]
        runs = [run for r, run in enumerate(runs) if r not in set(twice.tolist())]
    return runs, dropped


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
            raise unknown_choice("condition attribute", unknown, columns)
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
