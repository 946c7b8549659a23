"""The original HALO training step, re-implemented as the reference for ``train_speed.py`` only.

It follows the published model (Theodorou et al., Nature Communications 2023) and its training
code in every respect that costs time or memory:

- one vocabulary of V' = V codes + L label slots + 3 special tokens (start, end, pad);
- a record is a dense multi-hot tensor of shape ``(n_ctx, V')``: position 0 the start token,
  position 1 the label visit (itself a prediction target), positions 2..L+1 the visits, the end
  token added to the last visit, the pad token in every later position; every batch is padded to
  the full context ``n_ctx`` and built densely in numpy per batch;
- the visit embedding is a dense ``Linear(V', d, bias=False)`` over the multi-hot input;
- GPT-2 blocks with explicit masked attention;
- the fine head: two masked ``(d + V') x (d + V')`` linear layers (lower-triangular weight masks)
  with a ReLU between them, over the concatenation of the coarse state and the next visit;
- sigmoid probabilities and ``nn.BCELoss`` on probabilities, masked to the real positions.

Nothing here is used by the package; the conditional model lives in ``halo_balance.model``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceConfig:
    def __init__(self, *, code_vocab_size: int, label_vocab_size: int, n_ctx: int, n_embd: int, n_layer: int,
                 n_head: int, layer_norm_epsilon: float = 1e-5) -> None:
        self.code_vocab_size, self.label_vocab_size = code_vocab_size, label_vocab_size
        self.special_vocab_size = 3
        self.total_vocab_size = code_vocab_size + label_vocab_size + 3
        self.n_ctx = self.n_positions = n_ctx
        self.n_embd, self.n_layer, self.n_head = n_embd, n_layer, n_head
        self.layer_norm_epsilon = layer_norm_epsilon


class _Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(cfg.n_ctx, cfg.n_ctx)).view(1, 1, cfg.n_ctx, cfg.n_ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
        w = q @ k.transpose(-2, -1) / math.sqrt(v.size(-1))
        b = self.bias[:, :, :T, :T]
        w = torch.softmax(w * b - 1e10 * (1 - b), dim=-1)
        return self.c_proj((w @ v).transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        d = cfg.n_embd
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon), nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.attn = _Attention(cfg)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class MaskedLinear(nn.Linear):
    """A square linear layer whose output j sees inputs 0..j only (lower-triangular weight mask)."""

    def __init__(self, n: int) -> None:
        super().__init__(n, n)
        self.register_buffer("mask", torch.tril(torch.ones(n, n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.mask * self.weight, self.bias)


class ReferenceHALO(nn.Module):
    """The original HALO: dense visit input, GPT-2 coarse model, dense masked fine head."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        Vt, d = cfg.total_vocab_size, cfg.n_embd
        self.vis_embed_mat = nn.Linear(Vt, d, bias=False)
        self.pos_embed_mat = nn.Embedding(cfg.n_positions, d)
        self.h = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.auto1, self.auto2 = MaskedLinear(d + Vt), MaskedLinear(d + Vt)

    def forward(self, visits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        T = visits.shape[1]
        x = self.vis_embed_mat(visits) + self.pos_embed_mat(torch.arange(T, device=visits.device))
        for block in self.h:
            x = block(x)
        history = self.ln_f(x)[:, :-1]
        target = visits[:, 1:]
        logits = self.auto2(torch.relu(self.auto1(torch.cat([history, target], 2))))[:, :, self.cfg.n_embd - 1:-1]
        probs = torch.sigmoid(logits) * masks
        return nn.BCELoss()(probs, target * masks)


def dense_batch(cfg: ReferenceConfig, records: list[list[list[int]]], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original per-batch tensors: multi-hot ``(B, n_ctx, V')`` and the shifted mask ``(B, n_ctx-1, 1)``."""
    V, L = cfg.code_vocab_size, cfg.label_vocab_size
    ehr = np.zeros((len(records), cfg.n_ctx, cfg.total_vocab_size), dtype=np.float32)
    mask = np.zeros((len(records), cfg.n_ctx, 1), dtype=np.float32)
    for i, visits in enumerate(records):
        for j, v in enumerate(visits):
            ehr[i, j + 2, v] = 1
            mask[i, j + 2] = 1
        ehr[i, 1, V:V + L] = labels[i]
        ehr[i, len(visits) + 1, V + L + 1] = 1  # end token on the last visit
        ehr[i, len(visits) + 2:, V + L + 2] = 1  # pad token afterwards
    mask[:, 1] = 1  # the label visit is a target
    ehr[:, 0, V + L] = 1  # start token
    return ehr, mask[:, 1:]


def parameter_count(cfg: ReferenceConfig) -> int:
    """Parameters of :class:`ReferenceHALO`, computed without allocating it."""
    with torch.device("meta"):
        return sum(p.numel() for p in ReferenceHALO(cfg).parameters())
