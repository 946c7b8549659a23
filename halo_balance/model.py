"""The conditional HALO model: a causal transformer over visits and an exact within-visit module.

A patient record R is a sequence of visits v_1..v_L, each a set of token ids from 0..V-1, generated
given conditions c (outcome and one-hot group memberships)::

    P(R | c) = P(v_1 | h_0) * prod_{t=1}^{L-1} [P(not end | h_t) P(v_{t+1} | h_t)] * P(end | h_L)
    P(v | h) = prod_{i=0}^{V-1} P(x_i | x_{<i}, h)          (x = the visit's multi-hot vector)

with P(end | h_L) = 1 when L = n_ctx - 1 (the context is full).

**Coarse model.** Position 0 is the conditioning visit (sum of the embeddings of its active
condition slots); position t >= 1 is visit t (an embedding-bag sum over its token ids, never a dense
V-wide matmul). A causal transformer gives h_t, which summarises the conditions and visits 1..t and
predicts visit t+1. The conditioning visit is context only: it is never a target and never sampled.
The transformer is a compact own implementation (pre-LayerNorm GPT-2 blocks) on
``F.scaled_dot_product_attention`` with an explicit, preallocated KV cache, rather than
``transformers``' GPT-2: the inputs here are embedding-bags rather than token ids, the sampler drops
finished records from the cache batch by batch (:meth:`KVCache.keep`), and the code stays
independent of that library's changing cache classes, in about 80 lines.

**Conditions at every state** (``config.condition_every_visit``, every preset): an embedding of each
group membership *crossed with the outcome* (and of the outcome itself) is added to every state h_t
the transformer puts out, so the codes and end bit of every visit see the outcome x group cell
directly, not only through attention to position 0 and the sum of separate slot embeddings there.
The balancer's cells are exactly these crossings, and what sets a minority group's deaths apart is
often their own: without this path the model gave the synthetic deaths of the small cells the
majority's death codes.

**End of record** is a learned event: before each visit t+1 >= 2 the model predicts a bit
"end" from h_t (P(end | h_0) = 0, every record has a visit; at h_{n_ctx-1} the end is forced, so a
record never exceeds the trained context). In training, "not end" is the target at h_1..h_{L-1} and
"end" at h_L; there is no extra, untrained visit at either end.

**Fine module (exactly autoregressive, O(V x H) parameters).** Codes are ordered by id. The logit
of code i depends on h and on the codes chosen before i, through a running additive summary::

    s_{<i}  = sum_{j < i, x_j = 1} e_j                      (e: V x H table)
    u_{<i}  = LN(z + MLP(LN(z))),  z = P h + b_P + s_{<i}   (P: H x d; MLP H -> H -> H)
    logit_i = w_i . u_{<i} + b_i                             (w: V x H, b: V)

so perturbing any x_j with j >= i leaves logit_i unchanged.

**Pair terms** (``config.n_pairs``): a fitted logit a_ji for code pairs (j, i), j < i, that at
least ``pair_min_patients`` training patients share within a visit and whose co-occurrence the
network misses by at least ``pair_min_score`` standard errors (at the false discovery rate
``pair_max_fdr`` over all candidate pairs), added to logit_i when j was chosen before it::

    logit_i = w_i . u_{<i} + b_i + sum_{j < i, x_j = 1, (j, i) a pair} a_ji

The network learns common clinical associations (diabetes with a high glucose bin, creatinine with
BUN) only weakly by the epoch model selection stops at; these direct terms, fitted after training
with everything else fixed (``train.refit_output_biases``), carry them. A pair that few patients
share gets no term, so no term describes a handful of patients.

**Cell terms** (``config.n_cell_terms``): likewise a fitted logit c_si added to code i in every
visit of the records whose conditions hold the outcome x group crossing s (the crossings of
``condition_every_visit``), for the codes that at least ``cell_min_patients`` of that cell's
training patients hold and whose rate in it the model misses::

    logit_i = w_i . u_{<i} + b_i + sum_{j < i, x_j = 1} a_ji + sum_{s in cells(record)} c_si

The crossings' embeddings reach the codes only through the fine module's LayerNorms, and a small
cell's embedding, learned from its own few patients, is still far from its cell's pattern when the
validation loss stops training; these terms give each cell its own code rates directly.

**Empty visits** (``config.empty_visit_event``, every preset) are an event of their own: a bit
"empty" predicted from h, then, for a visit that is not empty, the chain above conditioned on
holding at least one code::

    P(v | h) = P(empty | h)                                    if v is empty
             = (1 - P(empty | h)) P_chain(v | h) / (1 - P_chain(empty | h))    otherwise

with P_chain(empty | h) = exp(-sum_i softplus(logit_i)) under the state before any code. Left to
the chain, an empty visit needs every code's probability low at once; the `small` model then drew
2-7% empty later stays on the eICU demo against 27% real.

**Exclusive groups.** Some tokens cannot share a visit: a lab item's bins (``lab:<item>:<bin>``,
one bin of the visit's mean) and the time tokens' bins (``data_prep``). Their ids form runs
(``config.exclusive_groups``, found by :func:`halo_balance.config.exclusive_token_groups` and checked
against the training visits); once a code of a run is chosen, the run's later codes have
probability exactly 0: they are skipped, in the likelihood (their BCE terms vanish) and in
sampling (the next code comes after the run). Left to learn this from data, the `small` model put
two or more bins of one lab item into 5-7% of the (visit, lab item) pairs it drew.

The module has
``2*V*H + V + d*H + 2*H^2 + 7*H`` parameters (O(V x H)), against HALO's two dense masked layers of
``2*(d + V')^2`` (V' = V plus its label and special tokens). Since s_{<i} only changes at chosen
codes, a visit with k codes has k + 1 distinct states u, each governing a contiguous run of codes;
training multiplies each state only with the blocks of codes it governs (``FineModule._blocks``),
about V x H multiply-adds per visit however many codes it holds.

Sampling uses the same factorisation: given the current state, the next chosen code is the first
i > (last chosen) with x_i = 1, a categorical over {i > last} and "stop" with
P(first = i) = p_i * prod_{last < j < i} (1 - p_j), P(stop) = prod_{j > last} (1 - p_j). Each record
advances its own pointer, so a visit with k codes costs k + 1 fine passes (see ``sample.py``).

**Loss.** Binary cross-entropy with logits over the V code variables of every real visit, plus the
end bits, summed per record and divided by the number of real visits: nats per visit. It is the
exact negative log-likelihood of the record, comparable with the marginal-frequency model (each
code an independent Bernoulli of its visit frequency, a constant end hazard) in the same units;
dividing by V gives HALO's per-code BCE. Empty visits (an admission without codes) are modelled as
what they are (all V bits zero), the first visit included, and sampled as often as the model says.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConditionLayout, HaloConfig
from .copies import RECORD_COUNTS_FILE, RecordCounts
from .errors import HaloBalanceError, IncompatibleModelError
from .io import atomic_write_bytes, read_json, write_json

CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, CONDITIONS_FILE, DATASET_META_FILE, PRIVACY_FILE = (
    "config.json", "model.safetensors", "vocab.parquet", "conditions.json", "dataset_meta.json", "privacy.json")


# ---------------------------------------------------------------------- coarse transformer
class KVCache:
    """Keys and values of every layer for positions ``0..length-1``, preallocated to ``n_ctx``."""

    def __init__(self, n_layer: int, batch: int, n_head: int, n_ctx: int, head_dim: int, *,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_head, n_ctx, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values of ``layer``; return all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep(self, index: torch.Tensor) -> None:
        """Keep only these batch rows (records that have not ended), so finished ones cost nothing."""
        self.k = self.k[:, index]
        self.v = self.v[:, index]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: HaloConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.update(layer, k, v)
        mask, causal = None, past == 0 and T > 1
        if past and T > 1:  # several new positions after a cached prefix: explicit causal mask
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: HaloConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------- fine module
class FineModule(nn.Module):
    """P(visit | h): exact autoregression over the V code bits in id order (module docstring)."""

    #: teacher-forced logits are evaluated in at most this many blocks of codes (see ``_blocks``)
    max_blocks = 64

    def __init__(self, cfg: HaloConfig) -> None:
        super().__init__()
        H = cfg.fine_hidden
        self.proj = nn.Linear(cfg.n_embd, H)
        self.token_emb = nn.Embedding(cfg.vocab_size, H)
        self.ln_1 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(H, H), nn.GELU(approximate="tanh"), nn.Linear(H, H),
                                 nn.Dropout(cfg.dropout))
        self.ln_2 = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.out = nn.Linear(H, cfg.vocab_size)
        # skip[i]: the last id of i's exclusive group (i itself outside any): after drawing i the
        # next code comes after skip[i]
        skip = torch.arange(cfg.vocab_size)
        for a, b in cfg.exclusive_groups:
            skip[a:b + 1] = b
        self.register_buffer("skip", skip, persistent=False)
        # pair terms (j, i) sorted by j then i, and their logits; None without any (a buffer that
        # is None stays out of the state dict, so models without pair terms load as before)
        pairs = cfg.n_pairs > 0
        self.register_buffer("pair_index", torch.zeros(cfg.n_pairs, 2, dtype=torch.long) if pairs else None)
        self.register_buffer("pair_weight", torch.zeros(cfg.n_pairs) if pairs else None)
        # cell terms (crossing s, code i) and their logits, likewise None without any
        cells = cfg.n_cell_terms > 0
        self.n_crossings = 2 * cfg.n_conditions
        self.register_buffer("cell_index", torch.zeros(cfg.n_cell_terms, 2, dtype=torch.long) if cells else None)
        self.register_buffer("cell_weight", torch.zeros(cfg.n_cell_terms) if cells else None)
        self.empty_head = nn.Linear(cfg.n_embd, 1) if cfg.empty_visit_event else None
        self.empty_position = (nn.Embedding(cfg.n_ctx, 1) if cfg.empty_visit_event and cfg.position_event_bias
                               else None)

    def state(self, z: torch.Tensor) -> torch.Tensor:
        """u from z = P h + b_P + s (the summary of the codes chosen so far)."""
        return self.ln_2(z + self.mlp(self.ln_1(z)))

    def set_pairs(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Give the module the pair terms ``index`` ``(P, 2)`` (earlier code j, later code i) with
        logits ``weight`` (zeros by default). The caller updates ``config.n_pairs``."""
        V = self.out.out_features
        self.pair_index, self.pair_weight = self._terms(
            index, weight, lambda j, i: (j >= 0) & (j < i) & (i < V), f"pair terms must be (j, i) with 0 <= j < i < {V}")

    def set_cell_terms(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Give the module the cell terms ``index`` ``(K, 2)`` (crossing s, code i) with logits
        ``weight`` (zeros by default). The caller updates ``config.n_cell_terms``."""
        V, S = self.out.out_features, self.n_crossings
        self.cell_index, self.cell_weight = self._terms(
            index, weight, lambda s, i: (s >= 0) & (s < S) & (i >= 0) & (i < V),
            f"cell terms must be (s, i) with 0 <= s < {S}, 0 <= i < {V}")

    def _terms(self, index, weight, valid, message: str):
        """``index`` ``(K, 2)`` and its logits on the module's device, sorted by (first column, code);
        ``(None, None)`` for no terms (a None buffer stays out of the state dict)."""
        V, dev = self.out.out_features, self.out.weight.device
        index = index.long().to(dev).reshape(-1, 2)
        weight = (torch.zeros(len(index)) if weight is None else weight.float()).to(dev)
        if not bool(valid(index[:, 0], index[:, 1]).all()):
            raise HaloBalanceError(message)
        if not len(index):
            return None, None
        order = torch.argsort(index[:, 0] * V + index[:, 1])
        return index[order].contiguous(), weight[order].contiguous()

    def cell_offsets(self, crossings: torch.Tensor) -> torch.Tensor | None:
        """Each record's summed cell terms ``(B, V)`` from its crossing ids ``(B, A)``; None without terms."""
        if self.cell_index is None:
            return None
        V = self.out.out_features
        table = self.cell_weight.new_zeros(self.n_crossings, V).index_put(
            (self.cell_index[:, 0], self.cell_index[:, 1]), self.cell_weight)
        return F.embedding_bag(crossings, table, mode="sum")

    def pair_edges(self, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair terms leaving each code of ``sources``: ``(which source, pair id)`` per term."""
        V, dev = self.out.out_features, sources.device
        ptr = F.pad(torch.bincount(self.pair_index[:, 0], minlength=V).cumsum(0), (1, 0))
        sources = sources.long()
        degree = ptr[sources + 1] - ptr[sources]
        which = torch.repeat_interleave(torch.arange(sources.numel(), device=dev), degree)
        pair = ptr[sources][which] + torch.arange(which.numel(), device=dev) - (degree.cumsum(0) - degree)[which]
        return which, pair

    def add_pair_terms(self, logits: torch.Tensor, rows: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """``logits`` (R, V) with the pair terms leaving code ``sources[k]`` added to row ``rows[k]``."""
        which, pair = self.pair_edges(sources)
        return logits.index_put((rows[which], self.pair_index[pair, 1]), self.pair_weight[pair].to(logits.dtype),
                                accumulate=True)

    def _blocks(self, h: torch.Tensor, codes: torch.Tensor, code_ptr: torch.Tensor, *,
                isolated: bool = False, offset: torch.Tensor | None = None) -> _FineBlocks:
        """Teacher-forced logits of N visits, laid out by blocks of codes (see :class:`_FineBlocks`).

        Visit n holds ``codes[code_ptr[n]:code_ptr[n+1]]`` (sorted). A visit with k codes has k + 1
        states; state m (after its m smallest codes) governs codes c_{m-1}+1 .. c_m (the last one
        up to V-1). Computing every state's V logits would cost (k + 1) x V x H; instead the codes
        are cut into C blocks of ``size`` and each state is multiplied only with the blocks it
        governs: (N x C + K) x size x H multiply-adds, about N x V x H.

        With ``isolated``, each visit's running code sums are computed from its own codes alone
        (a padded per-visit cumsum) instead of as differences of batch-wide prefix sums, whose
        rounding depends on the other visits of the batch: per-record gradients for differential
        privacy (``dp.py``) must be functions of their record only. ``offset`` ``(N, V)``: added to
        every logit of its visit (the cell terms, :meth:`cell_offsets`).
        """
        N, V, dev = h.shape[0], self.out.out_features, h.device
        codes = codes.long()
        k = code_ptr[1:] - code_ptr[:-1]
        first_state = torch.cumsum(k + 1, 0) - (k + 1)
        visit_of_state = torch.repeat_interleave(torch.arange(N, device=dev), k + 1)
        m = torch.arange(visit_of_state.numel(), device=dev) - first_state[visit_of_state]
        start = code_ptr[:-1][visit_of_state]
        visit_of_code = torch.repeat_interleave(torch.arange(N, device=dev), k)
        emb = self.token_emb(codes)
        if isolated:
            at = torch.arange(codes.numel(), device=dev) - code_ptr[:-1][visit_of_code]
            padded = emb.new_zeros(N, int(k.max()) + 1 if N else 1, emb.shape[1])
            s = padded.index_put((visit_of_code, at + 1), emb).cumsum(1)[visit_of_state, m]
        else:
            # prefix sums of the code embeddings over the batch, differenced per visit (cumsum runs
            # along the contiguous dimension: several times faster on CPU); gathers use index_select,
            # whose backward is an index_add
            prefix = F.pad(emb.T.cumsum(1), (1, 0)).T.contiguous()
            s = prefix.index_select(0, start + m) - prefix.index_select(0, start)
        u = self.state(self.proj(h).index_select(0, visit_of_state) + s)  # (S, H), S = N + K
        size = max(16, -(-V // self.max_blocks))
        C = -(-V // size)
        block_of_code = codes // size
        counts = torch.bincount(visit_of_code * C + block_of_code, minlength=N * C).view(N, C)
        lo = torch.cumsum(counts, 1) - counts  # first state of each (visit, block)
        at_edge = (codes % size == size - 1) | (codes == V - 1)  # its successor state starts in the next block
        edge = torch.bincount((visit_of_code * C + block_of_code)[at_edge], minlength=N * C).view(N, C)
        n_rows = (counts + 1 - edge).T.reshape(-1)  # rows ordered by (block, visit, state)
        row_start = torch.cumsum(n_rows, 0) - n_rows
        row_block = torch.repeat_interleave(torch.arange(C, device=dev), n_rows.view(C, N).sum(1))
        row_visit = torch.repeat_interleave(torch.arange(N, device=dev).repeat(C), n_rows)
        row_m = (torch.repeat_interleave(lo.T.reshape(-1), n_rows)
                 + torch.arange(int(n_rows.sum()), device=dev) - torch.repeat_interleave(row_start, n_rows))
        # the row's codes within its block: from after c_{m-1} to c_m (or the block's / vocabulary's end)
        code_at = code_ptr[:-1][row_visit] + row_m  # index of c_m in `codes` (valid if m < k)
        padded = F.pad(codes, (0, 1), value=V - 1)  # every index below is in range, even with no codes
        seg_lo = torch.where(row_m > 0, self.skip[padded[code_at - 1]] + 1, 0)  # empty rows are masked out
        seg_hi = torch.where(row_m < k[row_visit], padded[code_at], V - 1)
        base = row_block * size
        col_lo = (seg_lo - base).clamp(min=0)
        col_hi = (seg_hi - base).clamp(max=size - 1)
        # one batched matmul over the blocks, each block's rows padded to the fullest block's count
        per_block = n_rows.view(C, N).sum(1)
        slot = row_block * int(per_block.max()) + torch.arange(row_block.numel(), device=dev) - (
            torch.cumsum(per_block, 0) - per_block)[row_block]
        row_state = u.index_select(0, first_state[row_visit] + row_m)  # (R, H)
        rows = u.new_zeros(C * int(per_block.max()), u.shape[1]).index_copy(0, slot, row_state)
        weight = F.pad(self.out.weight, (0, 0, 0, C * size - V)).view(C, size, -1)
        bias = F.pad(self.out.bias, (0, C * size - V)).view(C, 1, size)
        logits = torch.baddbmm(bias, rows.view(C, -1, rows.shape[1]), weight.transpose(1, 2))
        logits = logits.view(-1, size).index_select(0, slot)  # (R, size)
        if offset is not None:
            logits = logits + F.pad(offset, (0, C * size - V)).view(N, C, size)[row_visit, row_block].to(logits.dtype)
        first_row = row_start.view(C, N)
        code_row = first_row[block_of_code, visit_of_code] + (
            torch.arange(codes.numel(), device=dev) - code_ptr[:-1][visit_of_code] - lo[visit_of_code, block_of_code])
        if self.pair_index is not None and codes.numel():
            # a_ji goes to code i's row in visit n: its state is the one after the visit's codes below i
            which, pair = self.pair_edges(codes)
            n, target = visit_of_code[which], self.pair_index[pair, 1]
            below = torch.searchsorted(visit_of_code * V + codes, n * V + target) - code_ptr[:-1][n]
            block = target // size
            logits = logits.index_put((first_row[block, n] + below - lo[n, block], target % size),
                                      self.pair_weight[pair].to(logits.dtype), accumulate=True)
        return _FineBlocks(logits=logits, row_state=row_state, row_visit=row_visit, row_block=row_block,
                           col_lo=col_lo, col_hi=col_hi, code_row=code_row, code_col=codes % size,
                           visit_of_code=visit_of_code, size=size, n_visits=N)

    def logits(self, h: torch.Tensor, codes: torch.Tensor, code_ptr: torch.Tensor,
               offset: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(N, V)``: logit i of visit n under the state after its codes below i
        (with the visits' cell terms ``offset``)."""
        blocks = self._blocks(h, codes, code_ptr, offset=offset)
        V = self.out.out_features
        r, j = blocks.mask().nonzero(as_tuple=True)
        out = blocks.logits.new_full((blocks.n_visits, V), -torch.inf)  # codes an exclusive group rules out
        out[blocks.row_visit[r], blocks.row_block[r] * blocks.size + j] = blocks.logits[r, j]
        return out

    def visit_nll(self, h: torch.Tensor, codes: torch.Tensor, code_ptr: torch.Tensor,
                  position: torch.Tensor | int = 0, offset: torch.Tensor | None = None) -> torch.Tensor:
        """``-log P(visit n | h_n)`` for each visit, shape ``(N,)``, float32: the sum of V BCE terms.

        BCE with logits summed over the codes: sum_i softplus(l_i) - sum_{i chosen} l_i, over the
        codes an exclusive group leaves open; a visit holding two codes of one group has
        probability 0 (NLL ``inf``). ``position``: of the state h (0: it predicts the first visit),
        for the empty-visit event's position bias; ``offset``: the visits' cell terms (:meth:`_blocks`).
        """
        blocks = self._blocks(h, codes, code_ptr, offset=offset)
        return self.with_events(blocks.visit_nll(), blocks, h, codes, code_ptr, position, offset)

    def with_events(self, chain_nll: torch.Tensor, blocks: _FineBlocks, h: torch.Tensor, codes: torch.Tensor,
                    code_ptr: torch.Tensor, position: torch.Tensor | int = 0,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
        """The visits' NLL from the chain's (``_FineBlocks.visit_nll``): ``inf`` for a visit holding
        two codes of one exclusive group, and the empty-visit event (``config.empty_visit_event``)."""
        nll = chain_nll
        codes = codes.long()
        ruled_out = (codes[1:] <= self.skip[codes[:-1]]) & (blocks.visit_of_code[1:] == blocks.visit_of_code[:-1])
        if bool(ruled_out.any()):
            nll = nll.index_put((blocks.visit_of_code[1:][ruled_out],), torch.tensor(torch.inf, device=nll.device))
        if self.empty_head is not None:
            empty_logit = self.empty_logit(h, position)
            log_nonempty = self.log_chain_nonempty(h, offset)  # log P_chain(at least one code)
            nll = torch.where(code_ptr[1:] == code_ptr[:-1], F.softplus(-empty_logit),
                              F.softplus(empty_logit) + nll + log_nonempty)
        return nll

    def empty_logit(self, h: torch.Tensor, position: torch.Tensor | int = 0) -> torch.Tensor:
        """Logit of "the visit holds no token" (``config.empty_visit_event``), float32 ``(N,)``."""
        logit = self.empty_head(h).squeeze(-1).float()
        return logit if self.empty_position is None else logit + _position_bias(self.empty_position, position, logit)

    def first_logits(self, h: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Every code's logit under the state before any code, float32 ``(N, V)`` (with the cell
        terms ``offset``)."""
        logits = self.out(self.state(self.proj(h))).float()
        return logits if offset is None else logits + offset.float()

    def chain_hazard(self, h: torch.Tensor, *, first_logits: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
        """``S = sum_i softplus(logit_i)`` under the state before any code: ``P_chain(no code) = exp(-S)``.

        ``first_logits``, when the caller has them (:meth:`first_logits` of ``h``), are not computed again.
        """
        logits = self.first_logits(h, offset) if first_logits is None else first_logits
        return F.softplus(logits).sum(1)

    def log_chain_nonempty(self, h: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """``log P_chain(at least one code) = log(1 - exp(-S))``, float32 ``(N,)``."""
        return torch.log(-torch.expm1(-self.chain_hazard(h, offset=offset).clamp(min=1e-6)))


def _position_bias(table: nn.Embedding, position: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """The bias of each state's position (one position for all, or one per state)."""
    if not torch.is_tensor(position):
        return table.weight[position, 0].float()
    return table(position.to(like.device)).squeeze(-1).float()


@dataclass
class _FineBlocks:
    """Block layout of teacher-forced logits: row r holds the logits of block ``row_block[r]`` (codes
    ``row_block*size + j``) under one state of visit ``row_visit[r]``, valid for ``col_lo <= j <= col_hi``;
    chosen code q sits at ``logits[code_row[q], code_col[q]]``."""

    logits: torch.Tensor  # (R, size)
    row_state: torch.Tensor  # (R, H), the state u the row's logits are computed from
    row_visit: torch.Tensor
    row_block: torch.Tensor
    col_lo: torch.Tensor
    col_hi: torch.Tensor
    code_row: torch.Tensor
    code_col: torch.Tensor
    visit_of_code: torch.Tensor
    size: int
    n_visits: int

    def mask(self) -> torch.Tensor:
        j = torch.arange(self.size, device=self.logits.device)
        return (j >= self.col_lo[:, None]) & (j <= self.col_hi[:, None])

    def visit_nll(self) -> torch.Tensor:
        """``-log P(visit n | h_n)`` per visit, float32 (see :meth:`FineModule.visit_nll`)."""
        logits = self.logits.float()
        per_row = torch.where(self.mask(), F.softplus(logits), 0.0).sum(1)
        chosen = logits.reshape(-1).index_select(0, self.code_row * self.size + self.code_col)
        nll = logits.new_zeros(self.n_visits).index_add(0, self.row_visit, per_row)
        return nll.index_add(0, self.visit_of_code, -chosen)


# ---------------------------------------------------------------------- batches and outputs
@dataclass
class Batch:
    """A padded batch of records for :meth:`HaloModel.forward` (built by ``train.collate``).

    B records padded to T = (longest record) + 1 positions. ``visit_codes``/``visit_offsets`` are the
    embedding-bag input of positions 1..T-1 (pads are empty bags). ``target_hidden`` indexes the
    flattened ``(B*T)`` hidden states that predict each real visit (whose codes are
    ``visit_codes[code_ptr[n]:code_ptr[n+1]]``, in record order); ``end_hidden``/``end_target`` are
    the trained end-bit positions.
    """

    cond: torch.Tensor  # (B, 1 + n_attributes) int64 slot ids
    visit_codes: torch.Tensor  # (K,) int64
    visit_offsets: torch.Tensor  # (B*(T-1),) int64
    code_ptr: torch.Tensor  # (N+1,) int64, the real visits' code ranges in visit_codes
    target_hidden: torch.Tensor  # (N,) int64
    target_record: torch.Tensor  # (N,) int64
    end_hidden: torch.Tensor  # (E,) int64
    end_record: torch.Tensor  # (E,) int64
    end_target: torch.Tensor  # (E,) float32
    n_positions: int  # T

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for k, v in vars(self).items()})

    @property
    def n_records(self) -> int:
        return self.cond.shape[0]

    @property
    def n_visits(self) -> int:
        return self.target_hidden.numel()


@dataclass
class HaloOutput:
    """``loss`` (nats per real visit), per-record NLL and its parts (sums over the batch).

    ``fine_blocks`` (the fine module's block layout) is kept only by ``forward(..., per_record=True)``.
    """

    loss: torch.Tensor
    record_nll: torch.Tensor  # (B,) nats
    code_nll: torch.Tensor  # scalar sum over visits
    end_nll: torch.Tensor  # scalar sum
    n_visits: int
    fine_blocks: _FineBlocks | None = None


# ---------------------------------------------------------------------- the model
class HaloModel(nn.Module):
    """Conditional HALO: P(record | outcome, groups). See the module docstring.

    Parameters
    ----------
    config : HaloConfig
    layout : ConditionLayout
        Conditioning slots; ``layout.n_slots`` must equal ``config.n_conditions``.
    vocab : polars.DataFrame, optional
        The vocabulary table of the training data (saved with the model, checked on use).
    dataset_meta : dict, optional
        ``meta.json`` of the training data; sampled datasets carry it.
    privacy : dict, optional
        The differential-privacy guarantee of a DP-trained model (epsilon, delta, accountant,
        clipping norm, ...: ``dp.PrivacyPlan.summary``); ``None`` for a model trained without DP.
    record_counts : halo_balance.copies.RecordCounts, optional
        Salted digests of the training records with their patient counts, for the copy rule
        (``copies.py``); saved as ``record_counts.parquet``.
    """

    def __init__(self, config: HaloConfig, layout: ConditionLayout, *, vocab: pl.DataFrame | None = None,
                 dataset_meta: dict[str, Any] | None = None, privacy: dict[str, Any] | None = None,
                 record_counts: Any = None) -> None:
        super().__init__()
        if layout.n_slots != config.n_conditions:
            raise HaloBalanceError(f"the layout has {layout.n_slots} condition slots, the config "
                                   f"n_conditions={config.n_conditions}")
        if vocab is not None and vocab.height != config.vocab_size:
            raise HaloBalanceError(f"the vocabulary has {vocab.height} tokens, the config vocab_size="
                                   f"{config.vocab_size}")
        self.config, self.layout, self.vocab, self.dataset_meta = config, layout, vocab, dataset_meta or {}
        self.privacy, self.record_counts = privacy, record_counts
        d = config.n_embd
        self.cond_emb = nn.EmbeddingBag(config.n_conditions, d, mode="sum")
        self.visit_emb = nn.EmbeddingBag(config.vocab_size, d, mode="sum")
        self.pos_emb = nn.Embedding(config.n_ctx, d)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.end_head = nn.Linear(d, 1)
        self.end_position = nn.Embedding(config.n_ctx, 1) if config.position_event_bias else None
        self.cond_out = (nn.EmbeddingBag(2 * config.n_conditions, d, mode="sum") if config.condition_every_visit
                         else None)
        self.fine = FineModule(config)
        self.apply(self._init_weights)
        for table in (self.cond_out, self.end_position, self.fine.empty_position):
            if table is not None:  # training starts from the plain model
                nn.init.zeros_(table.weight)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.c_proj.weight", "mlp.2.weight")) and name.startswith("blocks"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def for_dataset(cls, dataset: Any, config: HaloConfig) -> HaloModel:
        """A fresh model whose vocabulary and conditioning layout come from ``dataset``."""
        layout = ConditionLayout.from_dataset(dataset)
        if config.vocab_size != dataset.vocab_size or config.n_conditions != layout.n_slots:
            raise HaloBalanceError("config sizes do not match the dataset (vocab_size, n_conditions)")
        return cls(config, layout, vocab=dataset.vocab, dataset_meta=dataset.meta)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_pairs(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Pair terms for the fine module (:meth:`FineModule.set_pairs`); ``config.n_pairs`` follows."""
        self.fine.set_pairs(index, weight)
        self.config.n_pairs = 0 if self.fine.pair_index is None else len(self.fine.pair_index)

    def set_cell_terms(self, index: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Cell terms for the fine module (:meth:`FineModule.set_cell_terms`); ``config.n_cell_terms`` follows."""
        self.fine.set_cell_terms(index, weight)
        self.config.n_cell_terms = 0 if self.fine.cell_index is None else len(self.fine.cell_index)

    def crossings(self, cond: torch.Tensor) -> torch.Tensor:
        """Each condition slot crossed with the outcome: ids in ``0..2 n_conditions - 1``, ``(B, A)``."""
        return cond + cond[:, :1] * self.config.n_conditions

    def code_offsets(self, cond: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """The cell terms each record's codes get, ``(B, V)``, or with ``rows`` (e.g. each visit's
        record) those of these records; None for a model without them."""
        offset = self.fine.cell_offsets(self.crossings(cond))
        return offset if offset is None or rows is None else offset[rows]

    @torch.no_grad()
    def init_output_biases(self, code_frequency: torch.Tensor, end_rate: float, empty_rate: float = 0.0) -> None:
        """Start from the marginal-frequency model: code biases = log-odds of their visit frequency;
        the end (and empty-visit) biases: log-odds of their rates."""
        p = code_frequency.clamp(1e-6, 1 - 1e-6).to(self.fine.out.bias)
        self.fine.out.bias.copy_(torch.log(p) - torch.log1p(-p))
        for head, rate in ((self.end_head, end_rate), (self.fine.empty_head, empty_rate)):
            if head is not None:
                r = min(max(rate, 1e-6), 1 - 1e-6)
                head.bias.fill_(math.log(r) - math.log1p(-r))

    # ------------------------------------------------------------------ training / scoring
    def hidden_states(self, cond: torch.Tensor, visit_codes: torch.Tensor, visit_offsets: torch.Tensor,
                      n_positions: int) -> torch.Tensor:
        """h for positions ``0..n_positions-1`` of a padded batch, shape ``(B, T, n_embd)``."""
        B, T = cond.shape[0], n_positions
        x = self.cond_emb(cond)[:, None]
        if T > 1:
            visits = self.visit_emb(visit_codes, visit_offsets).view(B, T - 1, -1)
            x = torch.cat([x, visits], 1)
        # positions looked up per record (not broadcast), so that each record has its own rows
        x = self.drop(x + self.pos_emb(torch.arange(T, device=cond.device).expand(B, T)))
        for block in self.blocks:
            x = block(x)
        return self._output(x, cond)

    def _output(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_f(x)
        if self.cond_out is None:
            return h
        if cond is None:
            raise HaloBalanceError("this model adds the conditions to every state: pass cond")
        c = self.cond_out(self.crossings(cond))
        return h + (c[:, None] if h.dim() == 3 else c)

    def forward(self, batch: Batch, *, per_record: bool = False) -> HaloOutput:
        """Loss and per-record NLL of a batch.

        ``per_record=True`` computes every record's values from that record alone and keeps the
        fine module's block layout in the output, for per-record gradients (``dp.py``).
        """
        h = self.hidden_states(batch.cond, batch.visit_codes, batch.visit_offsets, batch.n_positions)
        h = h.reshape(-1, h.shape[-1])
        T = batch.n_positions
        hv = h[batch.target_hidden]
        offset = self.code_offsets(batch.cond, batch.target_record)
        blocks = self.fine._blocks(hv, batch.visit_codes, batch.code_ptr, isolated=per_record, offset=offset)
        code_nll = self.fine.with_events(blocks.visit_nll(), blocks, hv, batch.visit_codes, batch.code_ptr,
                                         batch.target_hidden % T, offset)
        end_logit = self.end_logit(h[batch.end_hidden], batch.end_hidden % T).float()
        end_nll = F.binary_cross_entropy_with_logits(end_logit, batch.end_target, reduction="none")
        record_nll = (torch.zeros(batch.n_records, device=h.device)
                      .index_add(0, batch.target_record, code_nll).index_add(0, batch.end_record, end_nll))
        code_sum, end_sum = code_nll.sum(), end_nll.sum()
        loss = (code_sum + end_sum) / max(batch.n_visits, 1)
        return HaloOutput(loss=loss, record_nll=record_nll, code_nll=code_sum.detach(),
                          end_nll=end_sum.detach(), n_visits=batch.n_visits,
                          fine_blocks=blocks if per_record else None)

    # ------------------------------------------------------------------ incremental (sampling)
    def new_cache(self, batch: int, *, device: torch.device | str, dtype: torch.dtype = torch.float32) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, c.n_ctx, c.n_embd // c.n_head, device=device, dtype=dtype)

    def condition_input(self, cond: torch.Tensor) -> torch.Tensor:
        """Input vector of the conditioning visit, ``(B, n_embd)``."""
        return self.cond_emb(cond)

    def visit_input(self, codes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Input vectors of one visit per record (an embedding-bag), ``(B, n_embd)``."""
        return self.visit_emb(codes, offsets)

    def step(self, x: torch.Tensor, cache: KVCache, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Run one position (``cache.length``) for every record: input ``(B, d)`` -> h ``(B, d)``;
        ``cond``: the records' condition slot ids (needed with ``config.condition_every_visit``)."""
        pos = cache.length
        if pos >= self.config.n_ctx:
            raise HaloBalanceError(f"context of {self.config.n_ctx} positions exceeded")
        x = self.drop(x + self.pos_emb.weight[pos])[:, None]
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        cache.length += 1
        return self._output(x[:, 0], cond)

    def end_logit(self, h: torch.Tensor, position: torch.Tensor | int) -> torch.Tensor:
        """Logit of "the record ends" at states ``h`` of visit position ``position`` (>= 1)."""
        logit = self.end_head(h).squeeze(-1)
        return logit if self.end_position is None else logit + _position_bias(self.end_position, position, logit)

    # ------------------------------------------------------------------ compatibility and I/O
    def check_compatible(self, dataset: Any) -> None:
        """Raise :class:`IncompatibleModelError` saying what differs between the model and ``dataset``."""
        problems = []
        if self.vocab is not None:
            msg = vocabulary_difference(self.vocab["token"].to_list(), dataset.vocab["token"].to_list())
            if msg:
                problems.append(msg)
        mg, dg = self.layout.groups, dataset.group_categories
        if list(mg) != list(dg):
            problems.append(f"group attributes differ: model {list(mg)}, dataset {list(dg)}")
        for attr in mg:
            if attr in dg and mg[attr] != dg[attr]:
                problems.append(f"categories of {attr!r} differ: model {mg[attr]}, dataset {dg[attr]}")
        if problems:
            raise IncompatibleModelError("the model does not fit this dataset: " + "; ".join(problems) +
                                         ". Train a model on data prepared with the same vocabulary and groups")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors``, ``vocab.parquet``, ``conditions.json``,
        ``dataset_meta.json``, ``record_counts.parquet`` (when known) and, for a DP-trained model,
        ``privacy.json`` into ``directory`` (each file atomically; ``config.json`` last)."""
        from safetensors.torch import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
        if self.vocab is not None:
            import io

            buf = io.BytesIO()
            self.vocab.write_parquet(buf)
            atomic_write_bytes(directory / VOCAB_FILE, buf.getvalue())
        write_json(directory / CONDITIONS_FILE, self.layout.to_dict())
        write_json(directory / DATASET_META_FILE, self.dataset_meta)
        for name, value in ((PRIVACY_FILE, self.privacy), (RECORD_COUNTS_FILE, self.record_counts)):
            if value is None:
                (directory / name).unlink(missing_ok=True)
            elif name == PRIVACY_FILE:
                write_json(directory / name, value)
            else:
                value.save(directory / name)
        write_json(directory / CONFIG_FILE, self.config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> HaloModel:
        """Load a model written by :meth:`save_pretrained` (no pickle), in eval mode.

        ``directory`` may also be an output folder of ``python -m halo_balance.generate`` (its
        ``model/`` is loaded); see :func:`model_folder`.
        """
        from safetensors.torch import load_file

        directory = model_folder(directory)
        config = HaloConfig.from_dict(read_json(directory / CONFIG_FILE))
        layout = ConditionLayout.from_dict(read_json(directory / CONDITIONS_FILE))
        vocab = pl.read_parquet(directory / VOCAB_FILE) if (directory / VOCAB_FILE).is_file() else None
        meta = read_json(directory / DATASET_META_FILE) if (directory / DATASET_META_FILE).is_file() else {}
        privacy = read_json(directory / PRIVACY_FILE) if (directory / PRIVACY_FILE).is_file() else None
        counts = RecordCounts.load(directory / RECORD_COUNTS_FILE) if (directory / RECORD_COUNTS_FILE).is_file() else None
        model = cls(config, layout, vocab=vocab, dataset_meta=meta, privacy=privacy, record_counts=counts)
        state = load_file(directory / WEIGHTS_FILE, device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise HaloBalanceError(f"{directory / WEIGHTS_FILE} does not match config.json "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(map_location).eval()


def model_folder(path: str | os.PathLike) -> Path:
    """The saved-model folder that ``path`` names: the folder itself, or a ``generate`` output's ``model/``.

    Anything else is a :class:`HaloBalanceError` that says what ``path`` is (missing, a prepared
    dataset, a training that has not finished, a ``generate`` output balanced with another model)
    and which folder to pass instead.
    """
    path = Path(path)
    required = (CONFIG_FILE, WEIGHTS_FILE, CONDITIONS_FILE)
    if all((path / name).is_file() for name in required):
        return path
    if all((path / "model" / name).is_file() for name in required):
        return path / "model"
    fix = ("pass a folder written by python -m halo_balance.train (its --out), or a python -m "
           "halo_balance.generate output (which holds the trained generator in model/)")
    if not path.exists():
        raise HaloBalanceError(f"model folder {path} not found; {fix}")
    if not path.is_dir():
        raise HaloBalanceError(f"model folder {path} is a file, not a folder; {fix}")
    for folder in (path, path / "model"):
        if (folder / "checkpoint" / "state.json").is_file():
            raise HaloBalanceError(f"{folder} holds a training that has not finished (only its checkpoint); "
                                   "finish it by re-running the same command with --resume")
    meta = path / "meta.json"
    if meta.is_file():
        generation = read_json(meta).get("generation") or {}
        if generation.get("model_path"):
            raise HaloBalanceError(f"{path} is a python -m halo_balance.generate output balanced with the model "
                                   f"{generation['model_path']}; pass that folder")
        raise HaloBalanceError(f"{path} is a prepared dataset, not a model; {fix}")
    raise HaloBalanceError(f"{path} is not a saved model (it lacks {', '.join(required)}); {fix}")


def vocabulary_difference(mine: list[str], theirs: list[str], *, names: tuple[str, str] = ("model", "dataset")) -> str | None:
    """How two token lists differ (sizes, tokens only on one side, or the first reordered id); None if equal."""
    if mine == theirs:
        return None
    only_m, only_d = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    msg = f"vocabularies differ ({names[0]} {len(mine)} tokens, {names[1]} {len(theirs)})"
    if only_m:
        msg += f"; {len(only_m)} only in the {names[0]}, e.g. {only_m[:3]}"
    if only_d:
        msg += f"; {len(only_d)} only in the {names[1]}, e.g. {only_d[:3]}"
    if not only_m and not only_d:
        msg += f"; same tokens in another order, first at id {first}"
    return msg
