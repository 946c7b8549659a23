"""``FairPlaySampler``: generative rebalancing as an imbalanced-learn sampler.

The sampler takes a table whose *group columns* hold each row's group memberships and whose other
columns are binary token features (0/1: diagnoses, binned labs, ...). Each row is one patient with a
single visit, the static case of FairPlay; visit-level tables work the same way, each visit then
counting as a one-visit patient. ``fit_resample`` trains a conditional HALO generator on the rows
(or reuses ``generator``), tops every (outcome x groups) cell up to the largest one, and returns the
input rows unchanged followed by the synthetic rows, in the input's own type (pandas or polars
DataFrame, or numpy array). Inside :class:`imblearn.pipeline.Pipeline` the sampler runs only at fit
time, so synthetic rows only ever enter training folds.

Group columns stay in the output, as every imbalanced-learn sampler returns the columns it was
given: at predict time a pipeline skips its samplers, so the steps after the sampler see the input
columns, group columns included, and must treat them the same way at fit time. A stock estimator
needs them dropped or encoded first, e.g. ``make_column_transformer(("drop", ["gender"]),
remainder="passthrough")`` (or a ``OneHotEncoder`` on them) between the sampler and the estimator.

How much is generated. By default (``sampling_strategy="auto"``) every cell is topped up to the
largest; ``sampling_strategy`` also takes imbalanced-learn's other forms, per cell: a float ``a``
(every cell up to ``round(a * largest)``), a dict ``{cell: patients after resampling}`` or a
callable ``f({cell: real count}) -> dict``, and ``"minority"`` / ``"not minority"`` /
``"not majority"`` / ``"all"``. A cell is ``(class, *group values)`` (the class alone when there
are no group columns), e.g. ``(1, "F")``. ``ratio`` then fills that fraction of each cell's gap.

:func:`patient_table` turns a prepared dataset into such a table (one row per patient), whose
feature columns are exactly the dataset's vocabulary, so that a generator trained on the dataset
(``halo_balance.train``, or ``model/`` of a ``halo_balance.generate`` output) can be reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from imblearn.base import BaseSampler

from .copies import COPY_K
from .data import PreparedDataset, empty_meta
from .errors import DatasetError, HaloBalanceError, did_you_mean

_ALL_CELLS = ("auto", "not majority", "all")
_STRATEGY_WORDS = (*_ALL_CELLS, "minority", "not minority")


class FairPlaySampler(BaseSampler):
    """Balance outcome x groups with synthetic rows from a conditional HALO generator.

    Parameters
    ----------
    group_columns : sequence of str or int, default=()
        Columns of ``X`` holding group memberships (names for data frames, positions for arrays).
        They define the cells with the outcome and are not features; they are kept in the output
        (drop or encode them after the sampler, see the module docstring). Empty: balance the outcome.
    sampling_strategy : str, float, dict or callable, default="auto"
        How many rows each cell should have after resampling (module docstring): ``"auto"`` tops
        every cell up to the largest.
    ratio : float, default=1.0
        Fraction of each cell's gap to its target to fill, in [0, 1].
    min_cell_size : int, default=5
        Cells with fewer rows are left alone.
    allow_copies : bool, default=False
        Keep synthetic rows identical to a rare training row (re-drawn by default).
    copy_k : int, default=5
        Synthetic rows identical to a training row that fewer than ``copy_k`` training rows hold
        are re-drawn; copies of rows that at least ``copy_k`` share (an empty row, a common one-
        or two-token row) identify nobody and are kept (``halo_balance.copies``).
    generator : HaloModel or path, default=None
        A trained generator whose vocabulary is the feature columns (see :func:`patient_table`):
        a :class:`~halo_balance.model.HaloModel`, a model folder, or an output folder of
        ``python -m halo_balance.generate``. ``None`` trains one per fit. Group attributes the
        generator conditions on but ``X`` lacks are drawn, per row, from the generator's training
        frequencies given the row's outcome and groups.
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

    def __init__(self, *, group_columns: Sequence[str | int] = (),
                 sampling_strategy: str | float | Mapping[Any, int] | Callable[[dict], Mapping[Any, int]] = "auto",
                 ratio: float = 1.0, min_cell_size: int = 5, allow_copies: bool = False, copy_k: int = COPY_K,
                 generator: Any = None, preset: str = "tiny", epochs: int = 30,
                 patience: int = 5, device: str = "auto", random_state: int | None = None) -> None:
        self.group_columns = group_columns
        self.sampling_strategy = sampling_strategy
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
        seed = 0 if self.random_state is None else int(self.random_state)
        targets = self._targets(table, labels)
        options = TrainOptions(preset=self.preset, epochs=self.epochs, patience=self.patience, seed=seed,
                               device=self.device)
        generator = self.generator
        if isinstance(generator, (str, os.PathLike)):
            from .model import HaloModel

            generator = HaloModel.from_pretrained(generator)
        if generator is not None:
            dataset = table.to_dataset_for(generator, labels, seed=seed)
        else:
            dataset = table.to_dataset(labels)
        result = rebalance(dataset, groups=table.group_names, model=generator, ratio=self.ratio,
                           min_cell_size=self.min_cell_size, allow_copies=self.allow_copies, copy_k=self.copy_k,
                           seed=seed, device=self.device, train_options=options, progress=False, targets=targets)
        self.generator_, self.plan_, self.n_synthetic_ = result.model, result.plan, result.synthetic.n_patients
        syn = result.synthetic
        y_syn = np.where(syn.patients["label"].to_numpy() == 1, self.classes_[-1], self.classes_[0])
        return table.append(syn), np.concatenate([y, y_syn.astype(y.dtype)])

    def _targets(self, table: _Table, labels: np.ndarray) -> dict[tuple, int] | None:
        """``sampling_strategy`` as plan targets ``{(label 0/1, *groups): rows after resampling}``."""
        strategy = self.sampling_strategy
        if isinstance(strategy, str):
            if strategy not in _STRATEGY_WORDS:
                raise HaloBalanceError(f"sampling_strategy={strategy!r} is not one of {list(_STRATEGY_WORDS)}"
                                       f"{did_you_mean(strategy, _STRATEGY_WORDS)}; a float, dict or callable "
                                       "works too")
            if strategy in _ALL_CELLS:
                return None
        keys = [(int(lab), *row) for lab, row in zip(labels, table.groups.iter_rows())]
        counts: dict[tuple, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        m = max(counts.values())
        eligible = {k: n for k, n in counts.items() if n >= self.min_cell_size}
        if isinstance(strategy, str):
            smallest = min(eligible, key=eligible.get) if eligible else None
            return {k: m for k in eligible if (k == smallest) == (strategy == "minority")}
        if isinstance(strategy, (float, np.floating)) and not isinstance(strategy, bool):
            if not 0.0 < strategy <= 1.0:
                raise HaloBalanceError(f"sampling_strategy as a float must lie in (0, 1] (every cell up to that "
                                       f"fraction of the largest); got {strategy}")
            return {k: round(strategy * m) for k, n in eligible.items() if round(strategy * m) > n}
        user = {self._user_cell(k, table): n for k, n in counts.items()}
        if callable(strategy):
            strategy = strategy(dict(user))
        if not isinstance(strategy, Mapping):
            raise HaloBalanceError("sampling_strategy must be a str, a float in (0, 1], a dict {cell: rows} or a "
                                   f"callable returning such a dict; got {type(strategy).__name__}")
        inverse = {cell: k for k, cell in zip(counts, user)}
        targets = {}
        for cell, n in strategy.items():
            cell = cell if isinstance(cell, tuple) else (cell,)
            key = inverse.get(self._normal_cell(cell))
            if key is None:
                raise HaloBalanceError(f"sampling_strategy names the cell {cell!r}, which X does not hold; cells are "
                                       f"(class{''.join(', ' + g for g in table.group_names)}): "
                                       f"{sorted(map(repr, user))}")
            targets[key] = int(n)
        return targets

    def _user_cell(self, key: tuple, table: _Table) -> tuple:
        return self._normal_cell((self.classes_[key[0]], *key[1:]))

    @staticmethod
    def _normal_cell(cell: tuple) -> tuple:
        # numpy scalars and their Python values name the same cell; group values are compared as text
        first = cell[0].item() if isinstance(cell[0], np.generic) else cell[0]
        return (first, *(str(v) for v in cell[1:]))

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

    def to_dataset(self, labels: np.ndarray, *, vocab: pl.DataFrame | None = None,
                   groups: pl.DataFrame | None = None,
                   categories: dict[str, list[str]] | None = None) -> PreparedDataset:
        n, V = self.features.shape
        if vocab is None:
            vocab = pl.DataFrame({"id": pl.Series(range(V), dtype=pl.Int32), "token": self.feature_names,
                                  "kind": ["feature"] * V, "description": [""] * V})
        if categories is None:
            categories = {g: sorted(self.groups[g].unique().to_list()) for g in self.group_names}
        meta = empty_meta(source="FairPlaySampler", groups=categories)
        X = self.features.tocsr()
        X.sort_indices()
        return PreparedDataset.from_arrays(
            patient_ids=[f"row-{i}" for i in range(n)], labels=labels,
            groups=self.groups if groups is None else groups,
            visit_ptr=np.arange(n + 1, dtype=np.int64), code_ptr=X.indptr.astype(np.int64),
            codes=X.indices.astype(np.int32), vocab=vocab, meta=meta, synthetic=False)

    def to_dataset_for(self, generator: Any, labels: np.ndarray, *, seed: int) -> PreparedDataset:
        """The rows in ``generator``'s terms, after checking that they fit it (one clear error if not).

        Its attributes that the table lacks are drawn per row from its training cell frequencies
        given the row's outcome and groups.
        """
        layout = generator.layout
        tokens = generator.vocab["token"].to_list() if generator.vocab is not None else None
        V = generator.config.vocab_size
        if (tokens is not None and tokens != self.feature_names) or len(self.feature_names) != V:
            raise HaloBalanceError("generator=: " + _vocabulary_mismatch(tokens, self.feature_names, V))
        for g in self.group_names:
            if g not in layout.groups:
                raise HaloBalanceError(f"generator=: group column {g!r}{did_you_mean(g, layout.attributes)} is not an "
                                       f"attribute of the generator (it conditions on {layout.attributes}); "
                                       "rename the column or pass a generator trained with it")
            unknown = sorted(set(self.groups[g].to_list()) - set(layout.groups[g]))
            if unknown:
                raise HaloBalanceError(f"generator=: column {g!r} holds {unknown[0]!r}"
                                       f"{did_you_mean(unknown[0], layout.groups[g])}, which the generator does not "
                                       f"know (its categories: {layout.groups[g]}); recode the column to them")
        frame = self.groups.with_columns(label=pl.Series(labels, dtype=pl.Int8)).with_row_index("_row")
        missing = [a for a in layout.attributes if a not in self.group_names]
        if missing:
            parts = []
            fixed_cols = ["label", *self.group_names]
            for i, (key, rows) in enumerate(frame.group_by(fixed_cols, maintain_order=True)):
                fixed = dict(zip(fixed_cols, key))
                try:
                    drawn = layout.complete(fixed, rows.height, seed=seed + i)
                except HaloBalanceError as exc:
                    raise HaloBalanceError(f"generator=: cannot fill its attributes {missing} that X lacks: {exc}; "
                                           "add them to X as group columns") from None
                parts.append(rows.select("_row").hstack(drawn.select(missing)))
            frame = frame.join(pl.concat(parts), on="_row").sort("_row")
        return self.to_dataset(labels, vocab=generator.vocab if generator.vocab is not None else None,
                               groups=frame.select(layout.attributes), categories=layout.groups)

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


def _vocabulary_mismatch(tokens: list[str] | None, features: list[str], V: int) -> str:
    from .model import vocabulary_difference

    fix = ("X's feature columns (all but group_columns) must be the generator's vocabulary tokens, in order; "
           "build X with halo_balance.sampler.patient_table(dataset) from data prepared like the generator's")
    if tokens is None:
        return f"the generator has {V} tokens, X has {len(features)} feature columns; {fix}"
    return f"{vocabulary_difference(tokens, features, names=('generator', 'X'))}. {fix}"


def patient_table(dataset: PreparedDataset, *, groups: Sequence[str] | None = None) -> tuple[Any, np.ndarray]:
    """``(X, y)`` for :class:`FairPlaySampler`: one row per patient of ``dataset``.

    ``X`` is a pandas DataFrame: the ``groups`` columns (default: every group attribute), then one
    0/1 int8 column per vocabulary token, in vocabulary order and named by the token (1: the token
    occurs in any of the patient's visits). ``y`` is the patients' outcome. A generator trained on
    ``dataset`` (or on data prepared with its vocabulary and groups) fits these columns, so it can
    be passed as ``FairPlaySampler(generator=...)``.
    """
    import pandas as pd

    groups = dataset.group_attributes if groups is None else list(groups)
    dataset.cell_counts(groups)  # names an unknown attribute
    rec = dataset.records()
    owner = np.repeat(np.arange(len(rec)), rec.visit_counts())
    rows = np.repeat(owner, np.diff(rec.code_ptr))
    X = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, rec.codes)),
                      shape=(len(rec), dataset.vocab_size))
    X.data[:] = 1  # a token of several visits was summed: back to presence
    frame = pd.DataFrame(X.astype(np.int8).toarray(), columns=dataset.vocab["token"].to_list())
    for i, g in enumerate(groups):
        frame.insert(i, g, rec.groups[g].to_numpy())
    return frame, np.asarray(rec.labels)
