"""CTGAN and TVAE (Xu et al., NeurIPS 2019) as the off-the-shelf tabular generators a data team
would try instead of FairPlay, from the ``ctgan`` package (the SDV project's maintained
implementation of both).

**Licence.** ``ctgan`` and its dependency ``rdt`` are under the Business Source License 1.1
(BUSL-1.1), which is not an OSI-approved open-source licence (production use needs the licensor's
grant). They are an optional extra, imported only by these two methods::

    pip install -e ".[baselines]"

Without it, the methods ``ctgan`` and ``tvae`` stop with a message naming that command; nothing
else in the project needs them. (SDV itself, which wraps the same models, is under the same licence
and pulls in far more.)

The table handed to the library has one discrete 0/1 column per code present in the training rows
and a discrete ``cell`` column (the harness's cell); every column is declared discrete, since the
library's mode-specific normalisation is for continuous columns. Conditioning on the cell, the way
the library supports it:

- CTGAN conditions through its conditional vector, ``sample(n, condition_column="cell",
  condition_value=...)``. In training, each step conditions on one discrete column chosen at
  random, so the cell column is one of about V + 1 candidates: the vector raises the chance of the
  requested cell without guaranteeing it.
- TVAE has no conditional input.

For both, a generated row is kept only if its ``cell`` is the requested one (SDV's reject sampling
for conditions). Rows are drawn in rounds sized from the acceptance rate so far, until the cell is
full, ``max_rounds`` rounds have run or ``max_draw_ratio`` times the requested rows have been
drawn (the library decodes every drawn row, the cost of sampling); rows still missing are a
shortfall, reported per cell in
``report_`` (and by the harness), not an error: a cell that is rare in an unconditional
generator's output may not fill, which is part of what this baseline shows.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from halo_balance.errors import import_optional

from . import torch_threads

EXTRA = "baselines"
LICENCE_NOTE = "ctgan is under the Business Source License 1.1 (not OSI-approved); see the README"
CELL = "cell"
MAX_ROUND_ROWS = 100_000


def load_ctgan():
    """The ``ctgan`` module, or a clear error naming the extra that installs it."""
    return import_optional("ctgan", extra=EXTRA, needed_for="the ctgan / tvae methods", note=LICENCE_NOTE)


class LibraryGenerator:
    """CTGAN or TVAE of the ``ctgan`` package on binary visit rows and their cells (see the module docstring).

    Parameters
    ----------
    kind : "ctgan" or "tvae".
    epochs, batch_size : of the library's model (its defaults: 300, 500).
    max_rounds : reject-sampling rounds per cell.
    max_draw_ratio : rows drawn per cell at most, as a multiple of the rows requested.
    device : "auto" (the library uses CUDA when present) or "cpu".
    n_jobs : torch CPU threads.
    random_state : passed to the library's ``set_random_state``.
    """

    def __init__(self, kind: Literal["ctgan", "tvae"] = "ctgan", *, epochs: int = 300, batch_size: int = 500,
                 max_rounds: int = 10, max_draw_ratio: float = 20.0, device: str = "auto", n_jobs: int = 1,
                 random_state: int = 0) -> None:
        self.kind = kind
        self.epochs = epochs
        self.batch_size = batch_size
        self.max_rounds = max_rounds
        self.max_draw_ratio = max_draw_ratio
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, cells: np.ndarray) -> LibraryGenerator:
        import pandas as pd

        module = load_ctgan()
        X = sp.csr_matrix(X != 0)
        cells = np.asarray(cells, dtype=np.int64)
        self.n_features_in_ = X.shape[1]
        self.codes_ = np.flatnonzero(np.asarray(X.sum(0)).ravel())
        frame = pd.DataFrame(X[:, self.codes_].toarray().astype(np.int64), columns=[f"c{j}" for j in self.codes_])
        frame[CELL] = [f"cell{c}" for c in cells]
        self.cell_share_ = np.bincount(cells) / len(cells)
        cls = module.CTGAN if self.kind == "ctgan" else module.TVAE
        self.model_ = cls(epochs=self.epochs, batch_size=self.batch_size, enable_gpu=self.device != "cpu")
        self.model_.set_random_state(self.random_state)
        with warnings.catch_warnings(), torch_threads(self.n_jobs), self._joblib():
            warnings.simplefilter("ignore")
            self.model_.fit(frame, discrete_columns=list(frame.columns))
        return self

    def _joblib(self):
        """The library transforms each column in a joblib process of its own (``n_jobs=-1``): with one
        job, run them in this process instead (on the eICU demo's ~500 columns the process round
        trips cost ~40x the transform itself)."""
        from joblib import parallel_config

        return parallel_config(backend="sequential") if self.n_jobs == 1 else nullcontext()

    def _draw(self, n: int, cell: int):
        with warnings.catch_warnings(), torch_threads(self.n_jobs), self._joblib():
            warnings.simplefilter("ignore")
            if self.kind == "ctgan":
                return self.model_.sample(n, condition_column=CELL, condition_value=f"cell{cell}")
            return self.model_.sample(n)

    def sample(self, counts: Mapping[int, int]) -> tuple[sp.csr_matrix, np.ndarray]:
        """Up to ``counts[c]`` rows of each cell ``c`` (see ``report_`` for shortfalls)."""
        parts, cells = [], []
        self.report_: dict[int, dict[str, Any]] = {}
        for cell, need in counts.items():
            kept, drawn, rounds = [], 0, 0
            rate = max(float(self.cell_share_[cell]) if cell < len(self.cell_share_) else 0.0, 1e-3)
            budget = int(math.ceil(self.max_draw_ratio * need))
            while sum(len(k) for k in kept) < need and rounds < self.max_rounds and drawn < budget:
                missing = need - sum(len(k) for k in kept)
                n = int(min(max(math.ceil(1.2 * missing / rate), 500), MAX_ROUND_ROWS, max(budget - drawn, 1)))
                frame = self._draw(n, cell)
                match = frame[frame[CELL].astype(str) == f"cell{cell}"]
                kept.append(match.drop(columns=CELL).to_numpy(dtype=np.float32))
                drawn, rounds = drawn + n, rounds + 1
                rate = max(sum(len(k) for k in kept) / drawn, 1e-3)
            rows = np.vstack(kept)[:need] if kept else np.zeros((0, len(self.codes_)), np.float32)
            self.report_[int(cell)] = {"requested": int(need), "generated": len(rows), "drawn": drawn,
                                       "rounds": rounds, "shortfall": int(need - len(rows))}
            parts.append(sp.csr_matrix(rows))
            cells.append(np.full(len(rows), cell, dtype=np.int64))
        block = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(self.codes_)), dtype=np.float32)
        full = sp.csr_matrix((block.data, self.codes_[block.indices], block.indptr),
                             shape=(block.shape[0], self.n_features_in_))
        return full, (np.concatenate(cells) if cells else np.zeros(0, dtype=np.int64))
