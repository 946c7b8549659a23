"""Adversarial debiasing by gradient reversal: an in-processing mitigation method of the harness.

``adversarial_debiasing`` (``benchmarks.kfold --methods``) replaces the downstream model by one
network trained on the fold's real training visits::

    encoder     h = ReLU(W x + b)                  V -> 64, the downstream ``mlp``'s hidden layer
    predictor   logit = w . h + c                  the outcome
    adversary   logits_A = MLP(GRL_alpha(h))       64 -> 32 -> G, the protected attribute's groups

    loss = BCE(logit, y) + CE(logits_A, attribute)

The gradient-reversal layer (GRL) is the identity going forward and multiplies the gradient by
``-alpha`` going back. One optimiser step therefore lowers the adversary's loss in the adversary's
own weights while it *raises* it in the shared encoder: the encoder learns a representation that
predicts the outcome and from which the attribute is hard to recover (domain-adversarial training,
Ganin & Lempitsky 2015; the formulation of the CT fairness audit in ``shared/reference``), with
``alpha`` the weight of that second aim. Training follows the ``mlp`` model's fixed budget: Adam
(learning rate 1e-3), batches of 256 visit rows, 50 epochs, no early stopping; the sparse rows are
made dense one batch at a time. ``score`` is the predictor's probability and ``predict`` is
``score > 0.5``, as for every downstream model; the attribute is needed in training only.

**Alpha selection** (per fold and attribute, from ``alphas``, default {0.5, 1.0, 2.0} as in the CT
audit). The fold's training patients are split once, by patient and stratified by outcome x group,
into an inner training part and a validation part (``val_fraction``, 20%); a network is trained on
the inner part for every alpha and scored on the validation visits: AUROC, and the min-max
underdiagnosis gap across the attribute's groups (largest minus smallest group UDR = 1 - TPR at the
0.5 threshold, over the groups holding at least ``min_share`` of the training visits, as the
harness's fairness measures). The chosen alpha has the smallest gap among the alphas whose AUROC is
at most ``max_auroc_loss`` (0.02) below the best alpha's, so a gap is never bought with a collapse
of the task; an alpha whose network finds no validation death (TPR 0, so UDR 1 in every group and
a gap of 0) takes part only when every alpha's does. Ties go to the higher AUROC, then the
smaller alpha. The final network is trained on
all the fold's training visits with that alpha. Test patients are never seen: the harness hands the
estimator the training rows only. Every candidate's validation figures and the choice are kept in
``fit_report_`` (the harness writes them into the unit's JSON and ``units.parquet``).

**Why not fairlearn's ``AdversarialFairnessClassifier``.** It implements Zhang, Lemoine & Mitchell
(2018): its adversary sees the predictor's *output* (and the label, for equalized odds), not a
hidden representation, and the predictor's update projects the adversary's gradient out of its own
rather than reversing it through a shared layer, so it is not the method whose finding we test. It
also rejects sparse input (``accept_sparse=False``: a dense copy of every visit row, small on the
eICU demo at V = 510 but 100k x 7k on MIMIC-IV) and seeds by setting torch's *global* generator. The
network here is about 60 lines of torch, seeds its own weights inside ``torch.random.fork_rng`` (no
global side effect) and reads the rows in sparse batches.

Cost on the eICU demo (1,450 training patients, ~2,000 visit rows, V = 510): four trainings per
fold (three alphas on 80%, then the final one), a few CPU-seconds in all (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from . import downstream
from .fairness_methods import _patient_folds
from .methods import SingleModel
from .metrics import group_metrics

ALPHAS: tuple[float, ...] = (0.5, 1.0, 2.0)
# the rule of select_alpha, in words: part of a harness unit's settings, so a new rule reruns the units
SELECTION_RULE = "smallest validation UDR gap; AUROC within max_auroc_loss of the best; TPR > 0 unless none"


@dataclass(frozen=True)
class AdversarialConfig:
    """The network and its training budget (the downstream ``mlp``'s where they overlap)."""

    hidden: int = 64
    adversary_hidden: int = 32
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.alpha * grad, None


def reverse_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The identity on ``x`` whose gradient is multiplied by ``-alpha`` on the way back."""
    return _GradientReversal.apply(x, alpha)


class DebiasedMLP(nn.Module):
    """Encoder, outcome predictor and attribute adversary (the adversary reads the encoder through a GRL)."""

    def __init__(self, n_features: int, n_groups: int, config: AdversarialConfig) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_features, config.hidden), nn.ReLU())
        self.predictor = nn.Linear(config.hidden, 1)
        self.adversary = nn.Sequential(nn.Linear(config.hidden, config.adversary_hidden), nn.ReLU(),
                                       nn.Linear(config.adversary_hidden, n_groups))

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(outcome logit (n,), attribute logits (n, G)) of dense rows ``x``."""
        h = self.encoder(x)
        return self.predictor(h).squeeze(-1), self.adversary(reverse_gradient(h, alpha))


def _dense(X: sp.csr_matrix) -> torch.Tensor:
    return torch.from_numpy(np.asarray(X.toarray(), dtype=np.float32))


def train_network(X: sp.csr_matrix, y: np.ndarray, attribute: np.ndarray, *, n_groups: int, alpha: float,
                  config: AdversarialConfig, seed: int) -> DebiasedMLP:
    """Train a :class:`DebiasedMLP` on sparse rows; ``attribute`` holds group indices 0..n_groups-1."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DebiasedMLP(X.shape[1], n_groups, config)
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    X = sp.csr_matrix(X)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    a_t = torch.as_tensor(np.asarray(attribute), dtype=torch.long)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    net.train()
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            logit, adversary = net(_dense(X[idx]), alpha)
            loss = F.binary_cross_entropy_with_logits(logit, y_t[idx]) + F.cross_entropy(adversary, a_t[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return net.eval()


@torch.no_grad()
def _outputs(net: DebiasedMLP, X: sp.csr_matrix, *, representation: bool = False,
             batch_rows: int = 4096) -> np.ndarray:
    """Outcome probabilities (or the encoder's representation) of sparse rows, in batches."""
    X = sp.csr_matrix(X)
    out = []
    for start in range(0, X.shape[0], batch_rows):
        h = net.encoder(_dense(X[start:start + batch_rows]))
        out.append((h if representation else torch.sigmoid(net.predictor(h).squeeze(-1))).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def select_alpha(candidates: Sequence[dict], *, max_auroc_loss: float) -> float:
    """The alpha of the smallest ``udr_gap`` among candidates within ``max_auroc_loss`` of the best AUROC.

    ``candidates`` are ``{"alpha", "auroc", "udr_gap", "tpr", ...}`` (NaN: undefined). A candidate
    that finds no validation death (``tpr`` 0: UDR 1 in every group, a gap of 0 bought by missing
    everybody) is eligible only when no candidate finds one. Ties go to the higher AUROC, then the
    smaller alpha; with no defined AUROC, every candidate is eligible.
    """
    finds = [c for c in candidates if c.get("tpr", 1.0) > 0]
    candidates = finds or list(candidates)
    aurocs = [c["auroc"] for c in candidates if not math.isnan(c["auroc"])]
    best = max(aurocs) if aurocs else math.nan
    eligible = [c for c in candidates if math.isnan(best) or (not math.isnan(c["auroc"])
                                                              and c["auroc"] >= best - max_auroc_loss - 1e-12)]

    def key(c: dict) -> tuple[float, float, float]:
        gap = math.inf if math.isnan(c["udr_gap"]) else c["udr_gap"]
        return gap, -(c["auroc"] if not math.isnan(c["auroc"]) else -math.inf), c["alpha"]

    return float(min(eligible, key=key)["alpha"])


class AdversarialDebiasing(SingleModel):
    """An MLP trained against an adversary of the protected attribute (see the module docstring).

    Parameters
    ----------
    alphas : candidate weights of the gradient reversal; one value skips the selection.
    config : the network and its training budget.
    val_fraction : share of the training patients in the inner validation split.
    max_auroc_loss : how far below the best candidate's validation AUROC a chosen alpha may lie.
    min_share : groups under this share of the training visits are left out of the validation gap.
    random_state : seeds the split, the weights and the batches.

    Attributes
    ----------
    groups_ : the attribute's groups (the adversary's classes).
    alpha_ : the chosen alpha.
    validation_patients_ : the patients of the inner validation split.
    net_ : the final :class:`DebiasedMLP`.
    fit_report_ : JSON-able record of the selection (every candidate's validation figures).
    """

    def __init__(self, *, alphas: Sequence[float] = ALPHAS, config: AdversarialConfig | None = None,
                 val_fraction: float = 0.2, max_auroc_loss: float = 0.02, min_share: float = 0.01,
                 random_state: int = 0) -> None:
        self.alphas = alphas
        self.config = config
        self.val_fraction = val_fraction
        self.max_auroc_loss = max_auroc_loss
        self.min_share = min_share
        self.random_state = random_state

    def fit(self, X: sp.csr_matrix, y: np.ndarray, groups: np.ndarray, *, patients: np.ndarray | None = None,
            synthetic: np.ndarray | None = None) -> AdversarialDebiasing:
        """Select alpha on an inner validation split of the training patients, then train on them all.

        ``groups`` are the protected attribute's value of every row (the adversary's target).
        """
        cfg = self.config or AdversarialConfig()
        y = np.asarray(y, dtype=np.int64)
        if np.unique(y).size != 2:
            raise ValueError("adversarial_debiasing: the training rows hold one class only; a classifier needs both")
        if not 0 < self.val_fraction < 1 or not self.alphas:
            raise ValueError("adversarial_debiasing needs 0 < val_fraction < 1 and at least one alpha")
        names, attribute = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        self.groups_ = names
        X = sp.csr_matrix(X)
        synthetic = np.zeros(len(y), bool) if synthetic is None else np.asarray(synthetic, bool)
        ids = np.arange(len(y)).astype(str) if patients is None else np.asarray(patients).astype(str)
        candidates: list[dict] = []
        self.validation_patients_ = np.array([], dtype=str)
        if len(self.alphas) > 1:
            train, valid = self._split(y, attribute, ids, synthetic)
            self.validation_patients_ = np.unique(ids[valid])
            g = names[attribute]
            visits = dict(zip(*np.unique(g[train], return_counts=True)))
            for alpha in self.alphas:
                net = train_network(X[train], y[train], attribute[train], n_groups=len(names), alpha=float(alpha),
                                    config=cfg, seed=self.random_state)
                s = _outputs(net, X[valid])
                _, fairness = group_metrics(y[valid], downstream.predict(s), s, g[valid], train_sizes=visits,
                                            min_share=self.min_share)
                auroc = roc_auc_score(y[valid], s) if np.unique(y[valid]).size == 2 else math.nan
                found = downstream.predict(s)[y[valid] == 1]
                candidates.append({"alpha": float(alpha), "auroc": float(auroc),
                                   "tpr": float(found.mean()) if found.size else math.nan,
                                   "udr_gap": fairness["equal_opportunity"], "fpr_gap": fairness["fpr_difference"]})
            self.alpha_ = select_alpha(candidates, max_auroc_loss=self.max_auroc_loss)
        else:
            self.alpha_ = float(self.alphas[0])
        self.net_ = train_network(X, y, attribute, n_groups=len(names), alpha=self.alpha_, config=cfg,
                                  seed=self.random_state)
        self.fit_report_ = {
            "alpha": self.alpha_, "candidates": candidates, "groups": names.tolist(),
            "n_validation_patients": int(len(self.validation_patients_)),
            "n_validation_rows": int(np.isin(ids, self.validation_patients_).sum()),
            "max_auroc_loss": self.max_auroc_loss, "config": asdict(cfg)}
        return self

    def _split(self, y: np.ndarray, attribute: np.ndarray, ids: np.ndarray,
               synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inner training rows, validation rows): one fold of a patient split stratified by outcome x group."""
        n_splits = max(2, round(1 / self.val_fraction))
        strata = y * (attribute.max() + 1) + attribute
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # rare strata with fewer members than splits
            return next(iter(_patient_folds(strata, ids, synthetic, n_splits, self.random_state)))

    def score(self, X: sp.csr_matrix, groups: np.ndarray | None = None) -> np.ndarray:
        return _outputs(self.net_, X)

    def representation(self, X: sp.csr_matrix) -> np.ndarray:
        """The encoder's output (n, hidden): what the adversary reads."""
        return _outputs(self.net_, X, representation=True)


def describe() -> str:
    """The default estimator's settings and selection rule as text (part of a harness unit's settings hash)."""
    est = AdversarialDebiasing()
    return repr({"alphas": list(est.alphas), "config": asdict(AdversarialConfig()), "val_fraction": est.val_fraction,
                 "max_auroc_loss": est.max_auroc_loss, "min_share": est.min_share, "selection": SELECTION_RULE})
