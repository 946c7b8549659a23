"""Downstream mortality classifiers with fixed hyper-parameters.

Every model is trained on visit rows (a sparse multi-hot CSR matrix) and scores the positive class
with ``predict_proba``; the hard prediction is ``score > 0.5``, which is what each classifier's own
``predict`` returns (the paper uses default classifiers and no threshold tuning). Hyper-parameters
are fixed across folds, methods and experiments. Two sets exist. The ``project`` set (the default)
is chosen for sparse binary inputs and for speed on two CPU cores (each model uses one thread;
parallelism comes from ``--jobs``):

``knn``
    ``KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute")``: cosine distance
    suits multi-hot rows of different lengths and brute force is the only exact search on CSR.
``logreg``
    ``LogisticRegression(solver="liblinear", C=1.0, max_iter=1000)``: L2, native on CSR.
``mlp``
    ``MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-4, batch_size=256, learning_rate_init=1e-3,
    max_iter=50, early_stopping=False)``: a fixed budget of 50 Adam epochs (scikit-learn still stops
    sooner when the training loss stalls for 10 epochs). Early stopping on a validation split is off
    because it watches validation *accuracy*, which on rare outcomes sits at the majority rate: on
    the eICU demo it stopped after 12 epochs with a test AUROC of 0.40, against 0.65 after 50.
``rf``
    ``RandomForestClassifier(n_estimators=100, max_features="sqrt", n_jobs=1)``: 100 trees because
    a tree costs about 2 s on the 140,000 balanced visit rows of a 20,000-patient cohort.
``xgboost``
    ``XGBClassifier(n_estimators=200, max_depth=6, learning_rate=0.1, tree_method="hist",
    n_jobs=1, eval_metric="logloss")``.

The ``paper`` parameter set (``params="paper"``, chosen by ``benchmarks.kfold --protocol paper``
or ``--model-params paper``) is the one of the published FairPlay experiments: library defaults
except where named.

``knn``
    ``KNeighborsClassifier()``: k = 5, Euclidean distance (brute force on the sparse rows).
``logreg``
    ``LogisticRegression(solver="lbfgs", max_iter=1000)``.
``mlp``
    ``MLPClassifier(hidden_layer_sizes=(256, 128), early_stopping=True, max_iter=1000)``.
``rf``
    ``RandomForestClassifier(n_estimators=100)``.
``xgboost``
    ``XGBClassifier()``.

Thread counts are pinned to one (``n_jobs=1``) in both sets; they change speed, not results.
Every random choice takes ``random_state`` (the harness passes ``seed + fold``). Convergence
warnings are silenced: the iteration caps are part of the fixed settings.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import scipy.sparse as sp

from halo_balance.errors import unknown_choice

ModelName = Literal["knn", "logreg", "mlp", "rf", "xgboost"]
ParamSet = Literal["project", "paper"]
MODELS: tuple[str, ...] = ("knn", "logreg", "mlp", "rf", "xgboost")
PARAM_SETS: tuple[str, ...] = ("project", "paper")
SAMPLE_WEIGHT_MODELS: tuple[str, ...] = ("logreg", "mlp", "rf", "xgboost")  # their fit takes sample_weight
THRESHOLD = 0.5


def make_model(name: ModelName, *, random_state: int = 0, params: ParamSet = "project"):
    """A fresh, unfitted classifier with the documented fixed hyper-parameters of ``params``."""
    if params not in PARAM_SETS:
        raise unknown_choice("downstream parameter set", [params], PARAM_SETS, error=ValueError)
    if params == "paper":
        return _paper_model(name, random_state=random_state)
    if name == "knn":
        from sklearn.neighbors import KNeighborsClassifier
        return KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute", n_jobs=1)
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(solver="liblinear", C=1.0, max_iter=1000, random_state=random_state)
    if name == "mlp":
        from sklearn.neural_network import MLPClassifier
        return MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-4, batch_size=256, learning_rate_init=1e-3,
                             max_iter=50, early_stopping=False, random_state=random_state)
    if name == "rf":
        from sklearn.ensemble import RandomForestClassifier
        return RandomForestClassifier(n_estimators=100, max_features="sqrt", n_jobs=1, random_state=random_state)
    if name == "xgboost":
        from xgboost import XGBClassifier
        return XGBClassifier(n_estimators=200, max_depth=6, learning_rate=0.1, tree_method="hist", n_jobs=1,
                             eval_metric="logloss", random_state=random_state)
    raise unknown_choice("downstream model", [name], MODELS, error=ValueError)


def _paper_model(name: ModelName, *, random_state: int):
    if name == "knn":
        from sklearn.neighbors import KNeighborsClassifier
        return KNeighborsClassifier(n_jobs=1)
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(solver="lbfgs", max_iter=1000, random_state=random_state)
    if name == "mlp":
        from sklearn.neural_network import MLPClassifier
        return MLPClassifier(hidden_layer_sizes=(256, 128), early_stopping=True, max_iter=1000,
                             random_state=random_state)
    if name == "rf":
        from sklearn.ensemble import RandomForestClassifier
        return RandomForestClassifier(n_estimators=100, n_jobs=1, random_state=random_state)
    if name == "xgboost":
        from xgboost import XGBClassifier
        return XGBClassifier(n_jobs=1, random_state=random_state)
    raise unknown_choice("downstream model", [name], MODELS, error=ValueError)


def describe(name: str, params: ParamSet = "project") -> str:
    """The model's class and hyper-parameters as text (part of a unit's settings hash); "" if unknown."""
    if name not in MODELS:
        return ""
    model = make_model(name, params=params)
    return f"{type(model).__name__}({sorted(model.get_params().items())})"


def fit(name: ModelName, X: sp.csr_matrix, y: np.ndarray, *, sample_weight: np.ndarray | None = None,
        random_state: int = 0, params: ParamSet = "project"):
    """Fit a fresh ``name`` model of parameter set ``params`` on ``(X, y)``; both classes must be present.

    ``sample_weight`` is passed to the model's ``fit``; only ``SAMPLE_WEIGHT_MODELS`` accept it.
    """
    y = np.asarray(y, dtype=np.int64)
    if np.unique(y).size != 2:
        raise ValueError(f"{name}: the training rows hold one class only; a classifier needs both")
    weights = {}
    if sample_weight is not None:
        if name not in SAMPLE_WEIGHT_MODELS:
            raise ValueError(f"{name} does not accept sample weights; models that do: "
                             f"{', '.join(SAMPLE_WEIGHT_MODELS)}")
        weights = {"sample_weight": np.asarray(sample_weight, dtype=np.float64)}
    model = make_model(name, random_state=random_state, params=params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        from sklearn.exceptions import ConvergenceWarning
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(X, y, **weights)
    return model


def score(model, X: sp.csr_matrix) -> np.ndarray:
    """Probability of the positive class, float64."""
    return np.asarray(model.predict_proba(X)[:, 1], dtype=np.float64)


def predict(scores: np.ndarray) -> np.ndarray:
    """Hard predictions at the fixed threshold (``score > 0.5``), int8."""
    return (np.asarray(scores) > THRESHOLD).astype(np.int8)
