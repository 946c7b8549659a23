"""Further mitigation methods for the k-fold harness (pre-, in- and post-processing).

Each method names its training rows (:func:`training_set`, a :class:`benchmarks.methods.TrainingSet`)
and a group-aware estimator (:func:`make_estimator`, with the interface of
:class:`benchmarks.methods.SingleModel`) whose ``predict(X, groups)`` (0/1) is not always
``score > 0.5``. ``groups`` are the harness's groups of the method (:data:`PER_GROUP_METHODS` use the
balanced attributes, or the evaluation groups when only the outcome is balanced; the others the
balanced attributes), values joined by ``" & "``.

``importance_weighting``
    The original training visits with sample weights that make every (visit label x group) cell
    weigh what upsampling would make it count: ``(n + ratio x (m - n)) / n`` for cells of at least
    ``min_cell_size`` visits (``m`` the largest cell, as in ``benchmarks.cells.balance_targets``),
    1 for smaller cells, normalised to mean 1. ``logreg``, ``mlp``, ``rf`` and ``xgboost`` take the
    weights in ``fit``; ``knn`` cannot, so its probability is the weight-weighted vote of its 5
    neighbours (the same neighbours, each counting its weight).
``group_resample``
    Group-balanced resampling: whole training patients are drawn with replacement until every group
    of at least ``min_cell_size`` patients reaches the largest group (``ratio`` of the gap), keeping
    each group's own outcome mix; ``upsample`` instead balances outcome x group cells. Every model.
``threshold_optimizer``
    fairlearn's ``ThresholdOptimizer`` (equalized odds; objective balanced accuracy, because plain
    accuracy under equalized odds is met by predicting nobody dies when deaths are rare) on top of
    the downstream model trained on the original rows (``prefit=True``, ``predict_method=
    "predict_proba"``). Its group-specific randomised thresholds are fitted on out-of-fold scores
    of the real training visits (3 inner folds, split by patient): a model's scores on its own
    training rows are over-confident (kNN and random forests nearly memorise them). The test rows'
    groups select the thresholds. ``score`` stays the downstream model's probability. Every model.
``exponentiated_gradient``
    fairlearn's ``ExponentiatedGradient`` (equalized odds, eps 0.01, at most 50 iterations; objective
    balanced error rate, for the same reason) over a downstream model trained with sample weights:
    ``logreg`` and ``xgboost`` (``mlp`` and ``rf`` accept weights too but make 50 refits slow);
    ``knn`` cannot take weights. ``score`` is the weighted mean of the mixture's probabilities and
    ``predict`` draws the randomised classifier's decision with a seeded generator. The sparse rows
    stay sparse: the reduction sees row indices and the weighted model looks the rows up.
``adversarial_debiasing`` (:mod:`benchmarks.adversarial`)
    An MLP whose hidden representation is trained against an adversary of one protected attribute
    through a gradient-reversal layer, alpha chosen per fold from {0.5, 1.0, 2.0} on an inner
    validation split of the training patients. It replaces the downstream model, so it runs as
    ``mlp`` only (its network is the ``mlp`` model's size and budget); the harness hands it the
    attribute of ``--adversary-attribute`` (default: the experiment's groups) as ``groups``.
``fairplay_threshold``
    FairPlay's balanced training data (real and synthetic patients; the harness builds it as for
    ``fairplay``) followed by the ``threshold_optimizer`` post-processing, whose thresholds are fitted
    on the real rows only. Every model.

For the two fairlearn methods, a group with fewer than ``min_per_class`` (10) real training visits
of either class, or absent from training, uses the largest group's thresholds / constraint slot;
``fallback_groups_`` lists them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin

from halo_balance.data import PreparedDataset
from halo_balance.errors import HaloBalanceError, unknown_choice

from . import downstream
from .cells import Balancing, balance_targets, codes, group_names
from .methods import SingleModel, TrainingSet, resample_patients, training_rows

FairnessMethodName = Literal["importance_weighting", "group_resample", "threshold_optimizer",
                             "exponentiated_gradient", "adversarial_debiasing", "fairplay_threshold"]
METHODS: tuple[str, ...] = ("importance_weighting", "group_resample", "threshold_optimizer",
                            "exponentiated_gradient", "adversarial_debiasing", "fairplay_threshold")
SAMPLE_WEIGHT_MODELS = downstream.SAMPLE_WEIGHT_MODELS
MODELS_FOR: dict[str, tuple[str, ...]] = {
    "importance_weighting": downstream.MODELS, "group_resample": downstream.MODELS,
    "threshold_optimizer": downstream.MODELS, "exponentiated_gradient": ("logreg", "xgboost"),
    "adversarial_debiasing": ("mlp",), "fairplay_threshold": downstream.MODELS}
# which rows each method trains on: the fold's real training rows, a resampling of them, or FairPlay's data
TRAINING_DATA: dict[str, str] = {
    "importance_weighting": "original", "group_resample": "group_resample", "threshold_optimizer": "original",
    "exponentiated_gradient": "original", "adversarial_debiasing": "original", "fairplay_threshold": "fairplay"}
# methods whose estimator is told one protected attribute (the harness's --adversary-attribute)
TARGETED: tuple[str, ...] = ("adversarial_debiasing",)
# methods that treat groups (not outcome x group cells) apart: Balancing.groups_for(per_group=True)
PER_GROUP_METHODS: tuple[str, ...] = ("group_resample", "threshold_optimizer", "exponentiated_gradient",
                                      "fairplay_threshold")
MIN_PER_CLASS = 10


def supports(method: str, model: str) -> bool:
    """Whether ``method`` runs with downstream ``model`` (the harness skips the other units)."""
    _check_method(method)
    return model in MODELS_FOR[method]


def describe(method: str) -> str:
    """A method's own estimator settings as text, beyond the downstream model's (part of a unit's settings hash)."""
    _check_method(method)
    if method == "adversarial_debiasing":
        from .adversarial import describe as describe_adversarial  # imports torch
        return describe_adversarial()
    return ""


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise unknown_choice("mitigation method", [method], METHODS)


# ---------------------------------------------------------------------- training rows
def group_resample(train: PreparedDataset, *, groups: Sequence[str], balancing: Balancing | None = None,
                   seed: int = 0) -> TrainingSet:
    """Patient-level random over-sampling of the ``groups`` (not of outcome x group cells), with the
    ratio and minimum size of ``balancing`` (default: ratio 1, minimum 5)."""
    from imblearn.over_sampling import RandomOverSampler

    return resample_patients(train, RandomOverSampler, balancing=balancing or Balancing(), seed=seed, direction="up",
                             cells=group_names(train.patients, groups), groups=groups)


def training_set(method: FairnessMethodName, train: PreparedDataset, *, groups: Sequence[str],
                 balancing: Balancing | None = None, seed: int = 0) -> TrainingSet:
    """The training rows of ``method`` with rows grouped by ``groups`` (``fairplay_threshold`` trains
    on the harness's FairPlay data)."""
    _check_method(method)
    kind = TRAINING_DATA[method]
    if kind == "fairplay":
        raise HaloBalanceError(f"{method} trains on FairPlay's balanced data; load it as for the 'fairplay' method "
                               "and pass its training_rows")
    if kind == "group_resample":
        return group_resample(train, groups=groups, balancing=balancing, seed=seed)
    return training_rows(train, groups)


def importance_weights(y: np.ndarray, groups: np.ndarray, *, ratio: float = 1.0, min_cell_size: int = 5) -> np.ndarray:
    """Per-visit weights ``(n + ratio (m - n)) / n`` of its (label, group) cell, mean 1 (see the module docstring)."""
    y = np.asarray(y, dtype=np.int8)
    rows = TrainingSet(X=sp.csr_matrix((len(y), 0)), y=y, group=np.asarray(groups).astype(str),
                       synthetic=np.zeros(len(y), bool), source=np.full(len(y), ""))
    _, cells = codes(rows.cells())
    counts = np.bincount(cells)
    targets = balance_targets(dict(enumerate(counts.tolist())), ratio=ratio, min_cell_size=min_cell_size,
                              direction="up")
    per_cell = np.ones(len(counts))
    for c, t in targets.items():
        per_cell[c] = t / counts[c]
    w = per_cell[cells]
    return w / w.mean()


class ImportanceWeighted(SingleModel):
    """A downstream model trained with :func:`importance_weights` (kNN: weighted neighbour vote).

    Parameters
    ----------
    model : downstream model name.
    ratio, min_cell_size : as for the harness's rebalancing methods.
    params : downstream parameter set (:mod:`benchmarks.downstream`).
    random_state : seed of the model.
    """

    def __init__(self, model: downstream.ModelName, *, ratio: float = 1.0, min_cell_size: int = 5,
                 params: downstream.ParamSet = "project", random_state: int = 0) -> None:
        self.model = model
        self.ratio = ratio
        self.min_cell_size = min_cell_size
        self.params = params
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> ImportanceWeighted:
        self.weights_ = importance_weights(y, groups, ratio=self.ratio, min_cell_size=self.min_cell_size)
        if self.model == "knn":
            self.model_ = downstream.fit("knn", X, y, random_state=self.random_state, params=self.params)
            self.y_ = np.asarray(y, dtype=np.float64)
        else:
            self.model_ = downstream.fit(self.model, X, y, sample_weight=self.weights_,
                                         random_state=self.random_state, params=self.params)
        return self

    def score(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> np.ndarray:
        if self.model != "knn":
            return downstream.score(self.model_, X)
        neighbours = self.model_.kneighbors(X, return_distance=False)
        w = self.weights_[neighbours]
        return (w * self.y_[neighbours]).sum(1) / w.sum(1)


# ---------------------------------------------------------------------- fairlearn helpers
def _fallback_map(y: np.ndarray, groups: np.ndarray, min_per_class: int) -> tuple[str, list[str]]:
    """The largest group and the groups too small (in either class) for their own thresholds."""
    names, counts = np.unique(groups, return_counts=True)
    pos = np.array([int(y[groups == g].sum()) for g in names])
    small = [str(g) for g, n, p in zip(names, counts, pos) if min(p, n - p) < min_per_class]
    return str(names[np.argmax(counts)]), small


def _mapped(groups: np.ndarray, known: set[str], fallback: str) -> np.ndarray:
    g = np.asarray(groups).astype(str)
    return np.where(np.isin(g, list(known)), g, fallback)


def _patient_folds(y: np.ndarray, patients: np.ndarray | None, synthetic: np.ndarray, n_splits: int, seed: int):
    """Inner folds split by patient (each synthetic row its own patient), stratified by label."""
    from sklearn.model_selection import StratifiedGroupKFold

    ids = np.arange(len(y)).astype(str) if patients is None else np.asarray(patients).astype(str)
    ids = np.where(synthetic, np.char.add("synthetic-", np.arange(len(y)).astype(str)), ids)
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, ids)


class _GroupSlots(SingleModel):
    """Estimators with per-group thresholds or constraints (``groups_``); the rest share the largest group's."""

    def pooled_groups(self, groups: np.ndarray) -> list[str]:
        return sorted(set(np.asarray(groups).astype(str).tolist()) - set(self.groups_))


class _ScoreColumn(ClassifierMixin, BaseEstimator):
    """A fitted 'classifier' whose input is already its score (column 0): lets ThresholdOptimizer
    learn thresholds from scores computed elsewhere (out of fold) and apply them to test scores."""

    def fit(self, X=None, y=None):
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X):
        s = np.asarray(X, dtype=np.float64)[:, 0]
        return np.column_stack([1 - s, s])

    def predict(self, X):
        return (self.predict_proba(X)[:, 1] > downstream.THRESHOLD).astype(np.int8)


class ThresholdOptimized(_GroupSlots):
    """A downstream model followed by fairlearn's ``ThresholdOptimizer`` (see the module docstring).

    Parameters
    ----------
    model : downstream model name.
    constraints, objective : of ``ThresholdOptimizer``.
    cv : inner folds for the out-of-fold training scores.
    min_per_class : per-class training visits a group needs for thresholds of its own.
    params : downstream parameter set (:mod:`benchmarks.downstream`).
    random_state : seeds the models, the inner folds and the randomised thresholds.
    """

    def __init__(self, model: downstream.ModelName, *, constraints: str = "equalized_odds",
                 objective: str = "balanced_accuracy_score", cv: int = 3, min_per_class: int = MIN_PER_CLASS,
                 params: downstream.ParamSet = "project", random_state: int = 0) -> None:
        self.model = model
        self.params = params
        self.constraints = constraints
        self.objective = objective
        self.cv = cv
        self.min_per_class = min_per_class
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> ThresholdOptimized:
        from fairlearn.postprocessing import ThresholdOptimizer

        y = np.asarray(y, dtype=np.int64)
        synthetic = np.zeros(len(y), bool) if synthetic is None else np.asarray(synthetic, bool)
        self.model_ = downstream.fit(self.model, X, y, random_state=self.random_state, params=self.params)
        oof = np.full(len(y), np.nan)
        for tr, te in _patient_folds(y, patients, synthetic, self.cv, self.random_state):
            oof[te] = downstream.score(downstream.fit(self.model, X[tr], y[tr], random_state=self.random_state,
                                                      params=self.params), X[te])
        real = ~synthetic
        g = np.asarray(groups).astype(str)[real]
        self.fallback_group_, self.fallback_groups_ = _fallback_map(y[real], g, self.min_per_class)
        self.groups_ = set(np.unique(g).tolist()) - set(self.fallback_groups_)
        if not self.groups_:  # no group is large enough: one threshold pair for everybody
            self.fallback_group_, self.groups_ = "(all)", {"(all)"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.thresholder_ = ThresholdOptimizer(
                estimator=_ScoreColumn().fit(), constraints=self.constraints, objective=self.objective,
                prefit=True, predict_method="predict_proba").fit(
                oof[real].reshape(-1, 1), y[real], sensitive_features=_mapped(g, self.groups_, self.fallback_group_))
        return self

    def score_and_predict(self, X: sp.csr_matrix, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.thresholder_.predict(scores.reshape(-1, 1), random_state=self.random_state,
                                            sensitive_features=_mapped(groups, self.groups_, self.fallback_group_))
        return scores, np.asarray(out, dtype=np.int8)


class _Shared:
    """Holds the training matrix; copies share it (sklearn's ``clone`` deep-copies parameters)."""

    def __init__(self, X: sp.csr_matrix) -> None:
        self.X = X

    def __deepcopy__(self, memo) -> _Shared:
        return self


class _RowsOf(ClassifierMixin, BaseEstimator):
    """A weighted downstream model whose input is row indices into a shared sparse matrix."""

    def __init__(self, model: str = "logreg", rows: _Shared | None = None, random_state: int = 0,
                 params: downstream.ParamSet = "project") -> None:
        self.model = model
        self.rows = rows
        self.random_state = random_state
        self.params = params

    def fit(self, X, y, sample_weight=None):
        idx = np.asarray(X).ravel().astype(np.int64)
        self.model_ = downstream.fit(self.model, self.rows.X[idx], np.asarray(y), sample_weight=sample_weight,
                                     random_state=self.random_state, params=self.params)
        self.classes_ = np.array([0, 1])
        return self

    def predict(self, X):
        idx = np.asarray(X).ravel().astype(np.int64)
        return downstream.predict(downstream.score(self.model_, self.rows.X[idx]))


class ExponentiatedGradientModel(_GroupSlots):
    """fairlearn's ``ExponentiatedGradient`` over a weighted downstream model (see the module docstring).

    Parameters
    ----------
    model : ``logreg`` or ``xgboost`` (any model of ``SAMPLE_WEIGHT_MODELS`` works, slowly).
    eps, max_iter : of ``ExponentiatedGradient``.
    objective : ``"balanced_error"`` (false positives and false negatives weighted by the inverse
        class frequency) or ``"error"`` (plain error rate).
    min_per_class : per-class training visits a group needs to be constrained on its own.
    params : downstream parameter set (:mod:`benchmarks.downstream`).
    random_state : seeds the models and the randomised predictions.
    """

    def __init__(self, model: downstream.ModelName, *, eps: float = 0.01, max_iter: int = 50,
                 objective: Literal["balanced_error", "error"] = "balanced_error",
                 min_per_class: int = MIN_PER_CLASS, params: downstream.ParamSet = "project",
                 random_state: int = 0) -> None:
        self.model = model
        self.params = params
        self.eps = eps
        self.max_iter = max_iter
        self.objective = objective
        self.min_per_class = min_per_class
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> ExponentiatedGradientModel:
        from fairlearn.reductions import EqualizedOdds, ErrorRate, ExponentiatedGradient

        if self.model not in SAMPLE_WEIGHT_MODELS:
            raise HaloBalanceError(f"exponentiated_gradient needs a model that takes sample weights "
                                   f"({', '.join(SAMPLE_WEIGHT_MODELS)}), not {self.model}")
        y = np.asarray(y, dtype=np.int64)
        g = np.asarray(groups).astype(str)
        self.fallback_group_, self.fallback_groups_ = _fallback_map(y, g, self.min_per_class)
        self.groups_ = (set(np.unique(g).tolist()) - set(self.fallback_groups_)) or {self.fallback_group_}
        prevalence = y.mean()
        costs = ({"fp": 0.5 / (1 - prevalence), "fn": 0.5 / prevalence} if self.objective == "balanced_error"
                 else None)
        reduction = ExponentiatedGradient(
            _RowsOf(self.model, _Shared(sp.csr_matrix(X)), self.random_state, self.params), constraints=EqualizedOdds(),
            objective=ErrorRate(costs=costs), eps=self.eps, max_iter=self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reduction.fit(np.arange(len(y)).reshape(-1, 1), y,
                          sensitive_features=_mapped(g, self.groups_, self.fallback_group_))
        weights = np.asarray(reduction.weights_, dtype=np.float64)
        keep = weights > 0
        self.predictors_ = [p for p, k in zip(reduction.predictors_, keep) if k]
        self.weights_ = weights[keep] / weights[keep].sum()
        for p in self.predictors_:  # the test rows are not the shared training matrix
            if isinstance(p, _RowsOf):
                p.rows = None
        return self

    def _probabilities(self, X: sp.csr_matrix) -> np.ndarray:
        """(n_predictors, n) positive-class probability of every predictor of the mixture."""
        out = []
        for p in self.predictors_:
            if isinstance(p, _RowsOf):
                out.append(downstream.score(p.model_, X))
            else:  # fairlearn's constant predictor for a single-class relabelling
                out.append(np.full(X.shape[0], float(p.constant)))
        return np.vstack(out)

    def score(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> np.ndarray:
        return self.weights_ @ self._probabilities(X)

    def score_and_predict(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The mixture's mean probability, and the randomised classifier's seeded decision."""
        probabilities = self._probabilities(X)
        p_positive = self.weights_ @ downstream.predict(probabilities).astype(np.float64)
        rng = np.random.default_rng(self.random_state)
        return self.weights_ @ probabilities, (rng.random(X.shape[0]) < p_positive).astype(np.int8)


def make_estimator(method: FairnessMethodName, model: downstream.ModelName, *, ratio: float = 1.0,
                   min_cell_size: int = 5, params: downstream.ParamSet = "project", random_state: int = 0):
    """The group-aware estimator of ``method`` for downstream ``model`` of parameter set ``params`` (unfitted)."""
    _check_method(method)
    if not supports(method, model):
        raise HaloBalanceError(f"{method} does not run with model {model}; "
                               f"it runs with {', '.join(MODELS_FOR[method])}")
    if method == "importance_weighting":
        return ImportanceWeighted(model, ratio=ratio, min_cell_size=min_cell_size, params=params,
                                  random_state=random_state)
    if method in ("threshold_optimizer", "fairplay_threshold"):
        return ThresholdOptimized(model, params=params, random_state=random_state)
    if method == "exponentiated_gradient":
        return ExponentiatedGradientModel(model, params=params, random_state=random_state)
    if method == "adversarial_debiasing":
        from .adversarial import AdversarialDebiasing  # imports torch
        return AdversarialDebiasing(random_state=random_state)
    return SingleModel(model, params=params, random_state=random_state)
