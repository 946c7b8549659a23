"""MCRAGE: a conditional denoising diffusion model of visit rows (Behal et al., arXiv 2310.18430, 2023).

MCRAGE trains a conditional DDPM on the training rows and samples rows of the under-represented
classes until the classes are balanced. Here the condition is the harness's cell (outcome x
groups) and the rows are binary visit rows over the vocabulary.

Binary features: **Bernoulli diffusion**, the two-category case of the multinomial diffusion of
Hoogeboom et al. (NeurIPS 2021) that TabDDPM (Kotelnikov et al., ICML 2023) uses for categorical
columns, not Gaussian diffusion followed by thresholding. The rows are 0/1 and very sparse (a few
codes of ~500 per visit): Gaussian noise puts the model's input and output in a continuous space
where most of the capacity goes to modelling values that never occur, and the 0.5 threshold of
the result decides almost every code's presence from a small, noisy margin. A Bernoulli chain
stays on binary rows at every step and its loss is an exact KL divergence between Bernoulli
posteriors. Each code ``j`` is noised towards a stationary rate ``m_j``:
``q(x_t | x_0) = Bernoulli(abar_t x_0 + (1 - abar_t) m_j)``. With ``prior="marginal"`` (default)
``m_j`` is the code's training frequency (the "marginal" transitions of D3PM, Austin et al. 2021):
noisy rows stay as sparse as real ones and the chain ends in the independent-codes model, which is
a better start for sparse data than TabDDPM's uniform ``m_j = 1/2`` (``prior="uniform"``), whose
noisy rows hold half of the vocabulary.

The denoiser is TabDDPM's kind of MLP: the noisy row, a sinusoidal embedding of ``t`` and a learned
embedding of the cell are summed into a hidden vector, then residual SiLU blocks output logits of
``p(x_0 = 1 | x_t, t, cell)``. The loss is the KL divergence between the true posterior
``q(x_{t-1} | x_t, x_0)`` and the one implied by the predicted ``x_0`` (``-log p(x_0 | x_1)`` at
``t = 1``), summed over codes, with ``t`` uniform and a small direct cross-entropy on ``x_0``
(D3PM's hybrid loss). Sampling runs the chain from the stationary distribution to ``t = 0`` with
the cell fixed. Codes that never occur in the training rows are left out (they would be 0).

Why implemented here: the maintained TabDDPM implementation is synthcity's (Apache-2.0), which pins
``torch<2.3`` and so cannot be installed beside this project's torch; the TabDDPM authors' code is
not a package. The model is a few dozen lines of torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

from . import torch_threads

EPS = 1e-6


def cosine_alpha_bar(steps: int, s: float = 0.008) -> np.ndarray:
    """``abar_t`` for t = 0..steps of the cosine schedule (Nichol & Dhariwal 2021); ``abar_0 = 1``."""
    t = np.arange(steps + 1) / steps
    f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return np.clip(f / f[0], 1e-5, 1.0)


class Denoiser(nn.Module):
    """MLP predicting the logits of ``x_0`` from ``(x_t, t, cell)``."""

    def __init__(self, n_features: int, n_cells: int, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(n_features, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cell = nn.Embedding(n_cells, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_features))
        self.width = width

    def forward(self, x: torch.Tensor, t: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=x.device) / half)
        angles = t.float()[:, None] * freqs[None]
        h = self.inp(x) + self.time(torch.cat([angles.sin(), angles.cos()], 1)) + self.cell(cell)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class BernoulliDiffusion:
    """Conditional Bernoulli diffusion over binary visit rows (see the module docstring).

    Parameters
    ----------
    steps : diffusion steps T.
    prior : stationary rate of each code: its training frequency, or 1/2.
    width, depth : hidden width and residual blocks of the denoiser.
    iterations, batch_size, lr, weight_decay : AdamW training.
    aux_weight : weight of the direct ``x_0`` cross-entropy beside the KL loss.
    device : torch device ("auto": CUDA when present).
    n_jobs : torch CPU threads.
    random_state : seeds the initialisation, the batches, the noise and the samples.
    """

    def __init__(self, *, steps: int = 100, prior: Literal["marginal", "uniform"] = "marginal", width: int = 256,
                 depth: int = 2, iterations: int = 1500, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 1e-4, aux_weight: float = 0.01, device: str = "auto", n_jobs: int = 1,
                 random_state: int = 0) -> None:
        self.steps = steps
        self.prior = prior
        self.width = width
        self.depth = depth
        self.iterations = iterations
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.aux_weight = aux_weight
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state

    # ------------------------------------------------------------------ chain
    def _posterior(self, x_t: torch.Tensor, p0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``q(x_{t-1} = 1 | x_t, x_0 ~ Bernoulli(p0))``, elementwise (t >= 1 per row)."""
        alpha = self.alpha_[t][:, None]
        bar_prev = self.alpha_bar_[t - 1][:, None]
        m = self.rate_[None]
        m_xt = torch.where(x_t > 0.5, m, 1 - m)  # P(x_t | jump to the stationary distribution)
        lik1 = alpha * x_t + (1 - alpha) * m_xt
        lik0 = alpha * (1 - x_t) + (1 - alpha) * m_xt
        prior1 = bar_prev * p0 + (1 - bar_prev) * m
        num = lik1 * prior1
        return num / (num + lik0 * (1 - prior1)).clamp_min(EPS)

    def _loss(self, x0: torch.Tensor, cell: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = x0.shape[0]
        t = torch.randint(1, self.steps + 1, (n,), generator=gen, device=x0.device)
        bar = self.alpha_bar_[t][:, None]
        x_t = torch.bernoulli(bar * x0 + (1 - bar) * self.rate_[None], generator=gen)
        logits = self.model_(x_t, t, cell)
        p0 = torch.sigmoid(logits)
        true = self._posterior(x_t, x0, t).clamp(EPS, 1 - EPS)
        pred = self._posterior(x_t, p0, t).clamp(EPS, 1 - EPS)
        kl = true * (true.log() - pred.log()) + (1 - true) * ((1 - true).log() - (1 - pred).log())
        nll = F.binary_cross_entropy_with_logits(logits, x0, reduction="none")
        per_row = torch.where((t == 1)[:, None], nll, kl).sum(1)
        return per_row.mean() + self.aux_weight * nll.sum(1).mean()

    # ------------------------------------------------------------------ estimator API
    def fit(self, X: sp.csr_matrix, cells: np.ndarray) -> BernoulliDiffusion:
        """Fit on binary rows ``X`` (n, V) with cell codes ``cells`` (n,) in 0..C-1."""
        with torch_threads(self.n_jobs):
            return self._fit(X, cells)

    def _fit(self, X: sp.csr_matrix, cells: np.ndarray) -> BernoulliDiffusion:
        X = sp.csr_matrix(X)
        cells = np.asarray(cells, dtype=np.int64)
        self.device_ = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                                    else ("cpu" if self.device == "auto" else self.device))
        self.n_features_in_ = X.shape[1]
        self.codes_ = np.flatnonzero(np.asarray((X != 0).sum(0)).ravel())
        self.n_cells_ = int(cells.max()) + 1
        dense = torch.from_numpy((X[:, self.codes_] != 0).toarray().astype(np.float32)).to(self.device_)
        rate = dense.mean(0).clamp(1e-4, 1 - 1e-4) if self.prior == "marginal" else torch.full(
            (len(self.codes_),), 0.5, device=self.device_)
        bar = cosine_alpha_bar(self.steps)
        self.alpha_bar_ = torch.tensor(bar, dtype=torch.float32, device=self.device_)
        self.alpha_ = torch.tensor(np.r_[1.0, bar[1:] / bar[:-1]], dtype=torch.float32, device=self.device_)
        self.rate_ = rate
        with torch.random.fork_rng(devices=[]):  # a seeded initialisation without touching the global state
            torch.manual_seed(self.random_state)
            self.model_ = Denoiser(len(self.codes_), self.n_cells_, self.width, self.depth).to(self.device_)
        gen = torch.Generator(device=self.device_).manual_seed(self.random_state)
        opt = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.iterations)
        cell_t = torch.from_numpy(cells).to(self.device_)
        self.model_.train()
        losses = []
        for _ in range(self.iterations):
            idx = torch.randint(0, dense.shape[0], (min(self.batch_size, dense.shape[0]),), generator=gen,
                                device=self.device_)
            loss = self._loss(dense[idx], cell_t[idx], gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        tail = max(1, len(losses) // 10)
        self.final_loss_ = float(np.mean(losses[-tail:]))  # nats per row, last 10% of the iterations
        self.model_.eval()
        return self

    def sample(self, counts: Mapping[int, int], *, batch_size: int = 2048) -> tuple[sp.csr_matrix, np.ndarray]:
        """``counts[c]`` rows of each cell ``c``: CSR (N, V) 0/1 float32 and the rows' cell codes."""
        with torch_threads(self.n_jobs), torch.no_grad():
            return self._sample(counts, batch_size)

    def _sample(self, counts: Mapping[int, int], batch_size: int) -> tuple[sp.csr_matrix, np.ndarray]:
        cells = np.repeat(np.fromiter(counts.keys(), dtype=np.int64), np.fromiter(counts.values(), dtype=np.int64))
        gen = torch.Generator(device=self.device_).manual_seed(self.random_state + 1)
        parts = []
        for start in range(0, len(cells), batch_size):
            c = torch.from_numpy(cells[start:start + batch_size]).to(self.device_)
            x = torch.bernoulli(self.rate_[None].expand(len(c), -1).contiguous(), generator=gen)
            for step in range(self.steps, 0, -1):
                t = torch.full((len(c),), step, device=self.device_, dtype=torch.long)
                p0 = torch.sigmoid(self.model_(x, t, c))
                x = torch.bernoulli(p0 if step == 1 else self._posterior(x, p0, t), generator=gen)
            parts.append(sp.csr_matrix(x.cpu().numpy().astype(np.float32)))
        rows = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(self.codes_)), dtype=np.float32)
        full = sp.csr_matrix((rows.data, self.codes_[rows.indices], rows.indptr),
                             shape=(rows.shape[0], self.n_features_in_))
        return full, cells
