"""``FairPlaySampler``: generative rebalancing as an imbalanced-learn sampler.

The sampler takes a table whose *group columns* hold each row's group memberships and whose other
columns are binary token features (0/1: diagnoses, binned labs, ...). Each row is one patient with a
single visit, the static case of FairPlay; visit-level tables work the same way, each visit then
counting as a one-visit patient. ``fit_resample`` trains a conditional HALO generator on the rows
(or reuses ``generator``), tops every (outcome x groups) cell up to the largest one, and returns the
input rows unchanged followed by the synthetic rows, in the input's own type (pandas or polars
DataFrame, or numpy array). Inside :class:`imblearn.pipeline.Pipeline` the sampler runs only at fit
time, so synthetic rows only ever enter training folds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from imblearn.base import BaseSampler

from .copies import COPY_K
from .data import PreparedDataset, empty_meta
from .errors import DatasetError


class FairPlaySampler(BaseSampler):
    """Balance outcome x groups with synthetic rows from a conditional HALO generator.

    Parameters
    ----------
    group_columns : sequence of str or int, default=()
        Columns of ``X`` holding group memberships (names for data frames, positions for arrays).
        They define the cells with the outcome and are not features. Empty: balance the outcome.
    ratio : float, default=1.0
        Fraction of each cell's gap to the largest cell to fill, in [0, 1].
    min_cell_size : int, default=5
        Cells with fewer rows are left alone.
    allow_copies : bool, default=False
        Keep synthetic rows identical to a rare training row (re-drawn by default).
    copy_k : int, default=5
        Synthetic rows identical to a training row that fewer than ``copy_k`` training rows hold
        are re-drawn; copies of rows that at least ``copy_k`` share (an empty row, a common one-
        or two-token row) identify nobody and are kept (``halo_balance.copies``).
    generator : HaloModel or path, default=None
        A trained generator whose vocabulary is the feature columns; ``None`` trains one per fit.
    preset : {"tiny", "small", "base"}, default="tiny"
    epochs : int, default=30
    patience : int, default=5
    device : {"auto", "cpu", "cuda"}, default="auto"
    random_state : int or None, default=None
        Seeds training and sampling (``None`` means 0, so that fits are reproducible).

    Attributes
    ----------
    generator_ : HaloModel
        The generator used in the last fit.
    plan_ : polars.DataFrame
        The balancing plan of the last fit (cells, real counts, generated, rejected and kept copies).
    n_synthetic_ : int
    feature_names_in_ : ndarray of str
        Names of the token feature columns.
    classes_ : ndarray
        The two outcome values of ``y``; the second is the positive outcome.
    """

    _sampling_type = "over-sampling"

    def __init__(self, *, group_columns: Sequence[str | int] = (), ratio: float = 1.0, min_cell_size: int = 5,
                 allow_copies: bool = False, copy_k: int = COPY_K, generator: Any = None, preset: str = "tiny", epochs: int = 30,
                 patience: int = 5, device: str = "auto", random_state: int | None = None) -> None:
        self.group_columns = group_columns
        self.ratio = ratio
        self.min_cell_size = min_cell_size
        self.allow_copies = allow_copies
        self.copy_k = copy_k
        self.generator = generator
        self.preset = preset
        self.epochs = epochs
        self.patience = patience
        self.device = device
        self.random_state = random_state

    def fit(self, X: Any, y: Any, **params: Any) -> FairPlaySampler:
        """Fit the generator and plan; use :meth:`fit_resample` to get the balanced data."""
        self.fit_resample(X, y)
        return self

    def fit_resample(self, X: Any, y: Any, **params: Any) -> tuple[Any, np.ndarray]:
        """Return ``(X_resampled, y_resampled)``: the input rows, then the synthetic rows."""
        return self._fit_resample(X, y)

    def _fit_resample(self, X: Any, y: Any, **params: Any) -> tuple[Any, np.ndarray]:
        from .balance import rebalance
        from .train import TrainOptions

        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
        y = np.asarray(y)
        if y.ndim != 1:
            raise DatasetError(f"y must be one-dimensional (multilabel and multioutput targets are not "
                               f"supported); got shape {y.shape}")
        table = _Table.read(X, self.group_columns)
        if len(y) != table.n_rows:
            raise DatasetError(f"y has {len(y)} values for {table.n_rows} rows of X")
        self.classes_ = np.unique(y)
        if len(self.classes_) > 2:
            raise DatasetError(f"FairPlaySampler balances a binary outcome; y holds {len(self.classes_)} "
                                   f"classes {self.classes_.tolist()[:5]}")
        labels = (y == self.classes_[-1]).astype(np.int8) if len(self.classes_) == 2 else np.zeros(len(y), np.int8)
        self.feature_names_in_ = np.asarray(table.feature_names, dtype=object)
        dataset = table.to_dataset(labels)
        seed = 0 if self.random_state is None else int(self.random_state)
        options = TrainOptions(preset=self.preset, epochs=self.epochs, patience=self.patience, seed=seed,
                               device=self.device)
        generator = self.generator
        if isinstance(generator, (str, os.PathLike)):
            from .model import HaloModel

            generator = HaloModel.from_pretrained(generator)
        if generator is not None:  # the generator's layout must cover these rows' categories
            dataset.meta["groups"] = {a: list(c) for a, c in generator.layout.groups.items()}
            dataset.validate()
        result = rebalance(dataset, groups=table.group_names, model=generator, ratio=self.ratio,
                           min_cell_size=self.min_cell_size, allow_copies=self.allow_copies, copy_k=self.copy_k,
                           seed=seed,
                           device=self.device, train_options=options, progress=False)
        self.generator_, self.plan_, self.n_synthetic_ = result.model, result.plan, result.synthetic.n_patients
        syn = result.synthetic
        y_syn = np.where(syn.patients["label"].to_numpy() == 1, self.classes_[-1], self.classes_[0])
        return table.append(syn), np.concatenate([y, y_syn.astype(y.dtype)])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # group columns need a dense table
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        return tags


class _Table:
    """The input table split into group columns (str) and binary token features (CSR)."""

    def __init__(self, X: Any, kind: str, group_names: list[str], groups: pl.DataFrame,
                 features: sp.csr_matrix, feature_names: list[str], positions: list[int]) -> None:
        self.X, self.kind, self.group_names, self.groups = X, kind, group_names, groups
        self.features, self.feature_names, self.positions = features, feature_names, positions

    @property
    def n_rows(self) -> int:
        return self.features.shape[0]

    @classmethod
    def read(cls, X: Any, group_columns: Sequence[str | int]) -> _Table:
        group_columns = list(group_columns)
        if isinstance(X, pl.DataFrame):
            kind, columns = "polars", X.columns
            frame = X
        elif hasattr(X, "columns") and hasattr(X, "iloc"):
            kind, columns = "pandas", [str(c) for c in X.columns]
            frame = pl.from_pandas(X.rename(columns=str))
        else:
            kind = "numpy"
            arr = np.asarray(X, dtype=object) if not sp.issparse(X) else None
            if arr is None or arr.ndim != 2:
                raise DatasetError("X must be a 2-d numpy array or a pandas / polars DataFrame "
                                       "(sparse input cannot carry group columns)")
            columns = [str(i) for i in range(arr.shape[1])]
            frame = pl.DataFrame({c: arr[:, i] for i, c in enumerate(columns)}, strict=False)
        names = [str(g) for g in group_columns]
        missing = [g for g in names if g not in columns]
        if missing:
            raise DatasetError(f"group column(s) {missing} are not columns of X (columns: {columns[:10]}...)")
        positions = [i for i, c in enumerate(columns) if c not in names]
        feature_names = [columns[i] for i in positions]
        if not feature_names:
            raise DatasetError("X has no feature columns besides the group columns")
        dense = frame.select(feature_names).to_numpy()
        try:
            values = dense.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"feature columns must be numeric 0/1 token indicators ({exc})") from exc
        bad = ~np.isin(values, (0.0, 1.0))
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DatasetError(f"column {feature_names[c]!r}, row {r}: value {float(values[r, c])!r} is not 0/1; "
                                   "FairPlaySampler models binary token features (binarise or bin them first)")
        groups = frame.select([pl.col(g).cast(pl.String).fill_null("missing") for g in names])
        return cls(X, kind, names, groups, sp.csr_matrix(values, dtype=np.float32), feature_names, positions)

    def to_dataset(self, labels: np.ndarray) -> PreparedDataset:
        n, V = self.features.shape
        vocab = pl.DataFrame({"id": pl.Series(range(V), dtype=pl.Int32), "token": self.feature_names,
                              "kind": ["feature"] * V, "description": [""] * V})
        categories = {g: sorted(self.groups[g].unique().to_list()) for g in self.group_names}
        meta = empty_meta(source="FairPlaySampler", groups=categories)
        X = self.features.tocsr()
        X.sort_indices()
        return PreparedDataset.from_arrays(
            patient_ids=[f"row-{i}" for i in range(n)], labels=labels, groups=self.groups,
            visit_ptr=np.arange(n + 1, dtype=np.int64), code_ptr=X.indptr.astype(np.int64),
            codes=X.indices.astype(np.int32), vocab=vocab, meta=meta, synthetic=False)

    def append(self, synthetic: PreparedDataset) -> Any:
        """The input rows followed by one row per synthetic patient (union of its visits' tokens)."""
        m = synthetic.n_patients
        if m == 0:
            return self.X
        vm = synthetic.to_visit_matrix()
        owner = vm.frame["patient_id"].to_numpy()
        pid = synthetic.patients["patient_id"].to_numpy()
        rows = {p: i for i, p in enumerate(pid)}
        agg = sp.csr_matrix((np.ones(len(owner)), ([rows[p] for p in owner], np.arange(len(owner)))),
                            shape=(m, len(owner))) @ vm.X
        feats = (agg.toarray() > 0).astype(np.int64)
        new = {name: feats[:, j] for j, name in enumerate(self.feature_names)}
        for g in self.group_names:
            new[g] = synthetic.patients[g].to_numpy()
        if self.kind == "numpy":
            out = np.empty((m, len(self.feature_names) + len(self.group_names)), dtype=object)
            for name, col in new.items():
                out[:, int(name)] = col
            base = np.asarray(self.X)
            return np.vstack([base, out.astype(base.dtype) if base.dtype != object else out])
        if self.kind == "polars":
            extra = pl.DataFrame(new).select(self.X.columns).cast(self.X.schema, strict=False)
            return pl.concat([self.X, extra])
        import pandas as pd

        extra = pd.DataFrame({c: new[str(c)] for c in self.X.columns})
        extra = extra.astype({c: self.X[c].dtype for c in self.X.columns}, errors="ignore")
        return pd.concat([self.X, extra], ignore_index=True)
