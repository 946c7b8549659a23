"""SMA: sequential synthesis with decision trees, then upsampling (Juwara, El-Hussuna & El Emam,
Patterns 5:100946, 2024).

SMA makes a synthetic copy of the training data with synthpop's CART method, in which each variable
of a "visit sequence" is drawn from a classification tree fitted on the variables before it, and
balances the classes by upsampling that copy. Here, on binary visit rows:

- The first variable is the harness's cell (outcome x groups). The copy keeps the training rows'
  cells as they are (synthpop draws its first variable from its marginal; keeping the exact counts
  means every cell of the copy holds as many rows as the real one, so there is always something to
  upsample).
- The codes follow in decreasing order of training frequency (ties by id); codes absent from the
  training rows stay 0.
- Code ``j`` is drawn from a ``DecisionTreeClassifier(min_samples_leaf=5)`` (synthpop's default
  ``minbucket``) fitted on the training rows, predicting code ``j`` from the cell (one-hot) and
  earlier codes. A synthetic row goes down the tree and takes the code with the probability of
  the training rows in its leaf: for a binary variable, synthpop's draw of a donor from the leaf.
- :class:`SMA` then tops up each cell with rows drawn with replacement from the copy's rows of that
  cell (the FairPlay paper's SMA protocol); the real training rows stay as they are.

Speed. synthpop fits the tree of the j-th variable on all j - 1 earlier ones, which made SMA
computationally infeasible on MIMIC-IV in the FairPlay paper. What makes it fast here:

1. Every tree is fitted on the real rows, so the V trees are independent of each other and are
   fitted in parallel (joblib, ``n_jobs``); only the sampling is sequential, one tree traversal per
   code and row.
2. Each tree sees at most ``max_predictors`` earlier codes (default 50): those most associated with
   the code, by the absolute phi coefficient from the sparse co-occurrence matrix ``X^T X``, plus
   the cell. synthpop restricts predictors the same way through its ``predictor.matrix``; a CART
   tree with leaves of at least 5 rows uses few of its candidates anyway. ``max_predictors=None``
   gives synthpop's full lower-triangular predictor set.
3. Sparse CSC inputs (scikit-learn's sparse splitter), and row blocks when sampling.

``python -m benchmarks.speed.sma_speed`` measures both predictor sets, serial and parallel.

Why implemented here: synthpop is an R package; the Python ports of sequential CART synthesis
(e.g. in synthcity, which cannot be installed beside this project's torch) do not work on sparse
rows. scikit-learn's trees are the building block.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
from sklearn.tree import DecisionTreeClassifier

from halo_balance.errors import HaloBalanceError

ROW_BLOCK = 20_000


def _fit_tree(design: sp.csc_matrix, y: np.ndarray, min_samples_leaf: int, seed: int) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(min_samples_leaf=min_samples_leaf, random_state=seed).fit(design, y)


def _positive_rate(tree: DecisionTreeClassifier, design: np.ndarray) -> np.ndarray:
    classes = list(tree.classes_)
    if 1 not in classes:
        return np.zeros(design.shape[0])
    return tree.predict_proba(design)[:, classes.index(1)]


def strongest_predictors(X: sp.csr_matrix, order: np.ndarray, max_predictors: int | None) -> list[np.ndarray]:
    """For position ``i`` of ``order``: the positions (< i) of the codes most associated with ``order[i]``.

    Association is the absolute phi coefficient of the two codes' presence over the rows of ``X``;
    ``None`` keeps every earlier position.
    """
    if max_predictors is None:
        return [np.arange(i) for i in range(len(order))]
    n = X.shape[0]
    Xo = sp.csc_matrix(X[:, order], dtype=np.float64)
    co = (Xo.T @ Xo).tocsc()
    freq = co.diagonal()
    spread = np.sqrt(np.maximum(freq * (n - freq), 1e-12))
    out = []
    for i in range(len(order)):
        if i <= max_predictors:
            out.append(np.arange(i))
            continue
        both = co[:i, i].toarray().ravel()
        phi = np.abs(n * both - freq[:i] * freq[i]) / (spread[:i] * spread[i])
        out.append(np.sort(np.argpartition(-phi, max_predictors - 1)[:max_predictors]))
    return out


class SequentialCART:
    """synthpop-style sequential CART synthesis of binary rows given their cell (see the module docstring).

    Parameters
    ----------
    max_predictors : earlier codes each tree may use (``None``: all of them).
    min_samples_leaf : of every tree (synthpop's ``minbucket``).
    n_jobs : parallel tree fits (results do not depend on it).
    random_state : seeds the trees and the draws.
    """

    def __init__(self, *, max_predictors: int | None = 50, min_samples_leaf: int = 5, n_jobs: int = 1,
                 random_state: int = 0) -> None:
        self.max_predictors = max_predictors
        self.min_samples_leaf = min_samples_leaf
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, cells: np.ndarray) -> SequentialCART:
        """Fit one tree per code present in ``X`` (n, V) on the rows' cells (n,) and earlier codes."""
        from joblib import Parallel, delayed

        X = sp.csr_matrix(X != 0, dtype=np.float32)
        cells = np.asarray(cells, dtype=np.int64)
        freq = np.asarray(X.sum(0)).ravel()
        present = np.flatnonzero(freq)
        self.n_features_in_ = X.shape[1]
        self.n_cells_ = int(cells.max()) + 1
        self.order_ = present[np.lexsort((present, -freq[present]))]
        self.predictors_ = strongest_predictors(X, self.order_, self.max_predictors)
        onehot = self._onehot(cells)
        Xo = sp.csc_matrix(X[:, self.order_])
        designs = (sp.hstack([onehot, Xo[:, p]], format="csc") for p in self.predictors_)
        targets = (Xo[:, i].toarray().ravel().astype(np.int8) for i in range(len(self.order_)))
        self.trees_ = Parallel(n_jobs=self.n_jobs, batch_size=16)(
            delayed(_fit_tree)(d, y, self.min_samples_leaf, self.random_state + i)
            for i, (d, y) in enumerate(zip(designs, targets)))
        return self

    def _onehot(self, cells: np.ndarray) -> sp.csc_matrix:
        return sp.csc_matrix((np.ones(len(cells), dtype=np.float32), (np.arange(len(cells)), cells)),
                             shape=(len(cells), self.n_cells_))

    def synthesize(self, cells: np.ndarray) -> sp.csr_matrix:
        """One synthetic row per entry of ``cells``: CSR (n, V) 0/1 float32."""
        cells = np.asarray(cells, dtype=np.int64)
        rng = np.random.default_rng(self.random_state)
        blocks = []
        for start in range(0, len(cells), ROW_BLOCK):
            c = cells[start:start + ROW_BLOCK]
            onehot = self._onehot(c).toarray()
            S = np.zeros((len(c), len(self.order_)), dtype=np.float32)
            for i, (tree, pred) in enumerate(zip(self.trees_, self.predictors_)):
                p = _positive_rate(tree, np.hstack([onehot, S[:, pred]]))
                S[:, i] = rng.random(len(c)) < p
            blocks.append(sp.csr_matrix(S))
        rows = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.order_)), dtype=np.float32)
        return sp.csr_matrix((rows.data, self.order_[rows.indices], rows.indptr),
                             shape=(rows.shape[0], self.n_features_in_))


class SMA(SequentialCART):
    """The SMA over-sampler: a sequential-CART synthetic copy of the training rows, upsampled per cell.

    Parameters are those of :class:`SequentialCART`.
    """

    def fit(self, X: sp.csr_matrix, cells: np.ndarray) -> SMA:
        """Fit the trees on ``(X, cells)`` and synthesize the copy (one row per training row, same cells)."""
        super().fit(X, cells)
        self.copy_cells_ = np.asarray(cells, dtype=np.int64)
        self.copy_ = self.synthesize(self.copy_cells_)
        return self

    def sample(self, counts: Mapping[int, int]) -> tuple[sp.csr_matrix, np.ndarray]:
        """``counts[c]`` rows of cell ``c`` drawn with replacement from the copy's rows of that cell."""
        rng = np.random.default_rng(self.random_state + 1)
        empty = [c for c, k in counts.items() if k and not (self.copy_cells_ == c).any()]
        if empty:
            raise HaloBalanceError(f"SMA cannot upsample cell(s) {empty}: the training rows hold none of them")
        picks = [rng.choice(np.flatnonzero(self.copy_cells_ == c), size=int(k), replace=True)
                 for c, k in counts.items()]
        rows = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
        return self.copy_[rows], self.copy_cells_[rows]
