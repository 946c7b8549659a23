"""Differentially private training (DP-SGD) with the patient as the unit of privacy.

``python -m halo_balance.train --dp-epsilon EPS [--dp-delta D] [--dp-max-grad-norm C]`` trains so that
the model is (EPS, D)-differentially private with respect to adding or removing one patient: all of
a patient's visits are one record, and every quantity computed from the training patients and
kept in the model (weights, output-bias initialisation, the cell counts used to draw conditions)
passes through a Gaussian mechanism counted by one privacy accountant (Opacus, RDP or PRV).

**Per-record gradients.** The model does not present one row per record to its layers: the fine
module works on visits and on within-visit states, the embedding bags on visits, and the output
layer is applied block-wise through its raw weight (``model.py``). Opacus' hook-based per-sample
gradients would therefore be per visit or missing. :func:`record_gradients` computes them exactly
per record in one forward and one backward pass: forward hooks keep each layer's input, one
``autograd.grad`` gives the gradient at each layer's output, and each row's contribution to the
weight gradient is summed over the rows its record owns (padded batched matmuls by record for
linear layers, by (record, block) for the block-wise output layer; scatter-adds for layer norms
and embeddings). The model runs with ``per_record=True`` so that no record's values depend on
another record's (``FineModule._blocks``); what remains is float rounding, which depends on the
batch's padded shape through the kernels' blocking, as in any batched per-sample gradient. :func:`reference_record_gradients` is the plain loop
(one backward pass per record) that the tests check it against.

**DP-SGD.** Each step draws a Poisson sample of patients (each independently with probability
q = batch_size / N, Opacus' ``UniformWithReplacementSampler``); their per-record gradients are
clipped to L2 norm C, summed, and Gaussian noise of standard deviation sigma * C is added
(Opacus' ``DPOptimizer`` around AdamW; larger samples are processed in chunks whose clipped
gradients accumulate before the one noisy step). Sigma is calibrated before training so that the
planned steps (``epochs`` x N / batch_size) and the initialisation below spend at most EPS at D;
the accountant's history (noise, sample rate, steps) is saved with every checkpoint, so a resumed
run continues it, and ``training.json`` reports the epsilon actually spent. Noise and sampling use
generators seeded from the operating system's entropy, never from ``--seed``: an attacker who knew
the seed and the other patients could replay training and subtract the noise.

**Initialisation.** The non-private model starts from the marginal code frequencies and copies the
training cell counts into ``conditions.json``. Under DP both come from one Gaussian-mechanism
release of sample rate 1, counted in the same accountant: per patient, the fraction of its visits
holding each code and its end-of-record rate (clipped to L2 norm :data:`STATISTICS_CLIP`), and its
one-hot (outcome x groups) cell over every possible combination of categories. Its noise is a fixed
multiple of DP-SGD's, chosen so that it takes about :data:`STATISTICS_SHARE` of the budget
(:func:`statistics_noise_ratio`); the accountant composes both exactly. Cells whose noisy count
falls below two noise standard deviations are dropped.

**Validation patients.** With DP the validation split defaults to none: training runs the planned
number of epochs and keeps the last weights, so every patient is protected. With an explicit
``--val-fraction``, the validation patients are left out of the private training set and are *not*
protected: their loss chooses the saved epoch and may stop training early. ``training.json`` says
how many there are.

**What is public.** The vocabulary, the group categories, the lab bin edges of ``meta.json``, the
number of training patients and the context length (the preset's, not fitted to the data) are
treated as public. Outside the guarantee: ``training.json`` (losses, counts and validation ids),
``dataset_meta.json``, and the record hashes of the copy filter (``copies.py``), which stay with
the data team; and the copy filter itself, which consults the training records.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import HaloBalanceError

AccountantName = Literal["rdp", "prv"]

#: about this share of the privacy budget (in Renyi-DP terms) goes to the statistics release: the
#: code frequencies it gives are most of what a DP generator's token fidelity rests on (on the eICU
#: demo at epsilon 8, R^2 against the true frequencies 0.977 at 0.3 against 0.967 at 0.1)
STATISTICS_SHARE = 0.3
#: L2 clipping norm of a patient's vector of code fractions and end rate (one-visit records with up
#: to 9 codes are not clipped; a smaller norm means less noise per code)
STATISTICS_CLIP = 3.0
#: per-record gradients held at once are capped at this many floats (the Poisson sample is chunked)
PER_RECORD_FLOATS = 1 << 26

# the rows each parameterised module of HaloModel sees in forward(per_record=True): a record, an
# embedding bag (one per visit position), an end bit, a visit, a code or a within-visit state
ROW_KINDS = {"cond_emb": "record", "visit_emb": "bag", "pos_emb": "record", "blocks": "record",
             "ln_f": "record", "end_head": "end", "fine.proj": "visit", "fine.token_emb": "code",
             "fine.ln_1": "state", "fine.mlp": "state", "fine.ln_2": "state"}
# applied block-wise through its weight (FineModule._blocks), never through its forward
BLOCK_OUTPUT = "fine.out"


def _require_opacus():
    try:
        import opacus  # noqa: F401
    except ImportError as exc:  # pragma: no cover - opacus is a dependency
        raise HaloBalanceError("differentially private training needs Opacus: pip install 'opacus>=1.5'") from exc


# ---------------------------------------------------------------------- per-record gradients
def record_gradients(model, batch, *, autocast: Callable[[], Any] | None = None):
    """Set ``p.grad_sample`` (shape ``(B, *p.shape)``) for every parameter: record b's gradient of
    its own negative log-likelihood (nats). Returns the forward pass's :class:`HaloOutput`."""
    import contextlib

    import torch
    import torch.nn as nn

    kinds = _module_kinds(model)
    calls: list[tuple[nn.Module, tuple, torch.Tensor]] = []

    def keep(module, inputs, output):
        calls.append((module, inputs, output))

    handles = [m.register_forward_hook(keep) for m in kinds]
    try:
        with autocast() if autocast else contextlib.nullcontext():
            out = model(batch, per_record=True)
    finally:
        for h in handles:
            h.remove()
    blocks = out.fine_blocks
    grads = torch.autograd.grad(out.record_nll.sum(), [o for _, _, o in calls] + [blocks.logits],
                                allow_unused=True)
    owners = _row_owners(batch)
    B = batch.n_records
    per_record: dict[nn.Parameter, torch.Tensor] = {}

    def add(p, g):
        per_record[p] = per_record[p] + g if p in per_record else g

    for (module, inputs, output), g in zip(calls, grads):
        if g is None:
            g = torch.zeros_like(output)
        for p, value in _layer_gradients(module, inputs, g.float(), owners[kinds[module]], B):
            add(p, value)
    fine_out = model.get_submodule(BLOCK_OUTPUT)
    for p, value in _block_output_gradients(fine_out, blocks, grads[-1], owners["visit"], B):
        add(p, value)
    for name, p in model.named_parameters():
        if p not in per_record:
            raise HaloBalanceError(f"per-record gradients: parameter {name} was not reached; the model uses it "
                                   "in a way halo_balance.dp does not know")
        p.grad_sample = per_record[p].to(p.dtype)
    return out


def _module_kinds(model) -> dict[Any, str]:
    import torch.nn as nn

    kinds = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)) or name == BLOCK_OUTPUT:
            continue
        kind = next((k for prefix, k in ROW_KINDS.items() if name == prefix or name.startswith(prefix + ".")), None)
        if kind is None or not isinstance(module, (nn.Linear, nn.LayerNorm, nn.Embedding, nn.EmbeddingBag)):
            raise HaloBalanceError(f"per-record gradients: module {name} ({type(module).__name__}) is not supported")
        kinds[module] = kind
    return kinds


def _row_owners(batch) -> dict[str, Any]:
    """The record owning each row of every kind of row (see ``ROW_KINDS``)."""
    import torch

    dev = batch.cond.device
    record = torch.arange(batch.n_records, device=dev)
    k = batch.code_ptr[1:] - batch.code_ptr[:-1]
    visit = batch.target_record
    return {"record": record, "bag": record.repeat_interleave(batch.n_positions - 1), "end": batch.end_record,
            "visit": visit, "code": visit.repeat_interleave(k), "state": visit.repeat_interleave(k + 1)}


def _expand_owner(owner, n_rows: int):
    """Owners of the flattened rows when each owner's leading row spans ``n_rows / len(owner)`` rows."""
    if owner.numel() == n_rows:
        return owner
    if owner.numel() == 0 or n_rows % owner.numel():
        raise HaloBalanceError(f"per-record gradients: {n_rows} rows cannot belong to {owner.numel()} owners")
    return owner.repeat_interleave(n_rows // owner.numel())


def _layer_gradients(module, inputs, g, owner, B: int):
    """``(parameter, per-record gradient)`` pairs of one call of a Linear, LayerNorm, Embedding or EmbeddingBag."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if isinstance(module, nn.EmbeddingBag):
        if module.mode != "sum" or module.max_norm is not None or module.padding_idx is not None:
            raise HaloBalanceError("per-record gradients support EmbeddingBag(mode='sum') only")
        index, offsets = inputs[0], inputs[1] if len(inputs) > 1 else None
        if index.dim() == 2:  # fixed-size bags, one per row
            bag = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
        else:
            sizes = torch.diff(offsets, append=torch.tensor([index.numel()], device=index.device))
            bag = torch.arange(offsets.numel(), device=index.device).repeat_interleave(sizes)
        index, owner, g = index.reshape(-1), _expand_owner(owner, g.shape[0])[bag], g[bag]
        return [(module.weight, _scatter_rows(g, owner * module.num_embeddings + index, B, module.weight.shape))]
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise HaloBalanceError("per-record gradients do not support Embedding(max_norm=...)")
        index = inputs[0].reshape(-1)
        g = g.reshape(-1, g.shape[-1])
        owner = _expand_owner(owner, index.numel())
        if module.padding_idx is not None:
            g = g.masked_fill((index == module.padding_idx)[:, None], 0.0)
        return [(module.weight, _scatter_rows(g, owner * module.num_embeddings + index, B, module.weight.shape))]
    x = inputs[0].detach().float()
    x, g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    owner = _expand_owner(owner, x.shape[0])
    if isinstance(module, nn.LayerNorm):
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        pairs = [(module.weight, _scatter_rows(g * xhat, owner, B, module.weight.shape))]
        return pairs + ([(module.bias, _scatter_rows(g, owner, B, module.bias.shape))] if module.bias is not None else [])
    gp, xp = _group_rows(owner, B, g, x)  # Linear
    pairs = [(module.weight, torch.bmm(gp.transpose(1, 2), xp))]
    return pairs + ([(module.bias, gp.sum(1))] if module.bias is not None else [])


def _block_output_gradients(linear, blocks, g, owner_of_visit, B: int):
    """Per-record gradients of the output layer applied block-wise: row r of the block layout holds
    ``row_state[r] @ W[block]^T + b[block]`` for block ``row_block[r]`` of ``size`` codes."""
    import torch

    V, size = linear.out_features, blocks.size
    C = -(-V // size)
    if g is None:
        g = torch.zeros_like(blocks.logits)
    g = g.float()
    key = owner_of_visit[blocks.row_visit] * C + blocks.row_block
    gp, up = _group_rows(key, B * C, g, blocks.row_state.detach().float())
    weight = torch.bmm(gp.transpose(1, 2), up).reshape(B, C * size, -1)[:, :V]
    bias = gp.sum(1).reshape(B, C * size)[:, :V]
    return [(linear.weight, weight), (linear.bias, bias)]


def _group_rows(owner, n: int, *tensors):
    """Rows grouped by owner into ``(n, M, width)`` tensors (M = most rows of one owner; zero padding)."""
    import torch

    counts = torch.bincount(owner, minlength=n)
    order = torch.argsort(owner, stable=True)
    sorted_owner = owner[order]
    at = torch.arange(owner.numel(), device=owner.device) - (torch.cumsum(counts, 0) - counts)[sorted_owner]
    M = int(counts.max()) if owner.numel() else 0
    out = []
    for t in tensors:
        padded = t.new_zeros(n, M, t.shape[-1])
        padded[sorted_owner, at] = t[order]
        out.append(padded)
    return out


def _scatter_rows(rows, flat_index, B: int, shape):
    """Sum ``rows`` into a ``(B, *shape)`` tensor at flat (record x leading index) positions."""
    width = rows.shape[-1] if rows.dim() > 1 else 1
    out = rows.new_zeros(B * int(np.prod(shape)) // width, width)
    out.index_add_(0, flat_index, rows.reshape(-1, width))
    return out.reshape(B, *shape)


def reference_record_gradients(model, enc, rows: Sequence[int]) -> dict[str, Any]:
    """Per-record gradients by the plain loop: one forward and backward pass per record.

    Returns ``{parameter name: (len(rows), *shape) tensor}``; the exact reference that
    :func:`record_gradients` is tested against (the model's mode, e.g. dropout, is left as it is).
    """
    import torch

    from .train import collate

    names = [n for n, _ in model.named_parameters()]
    per_record: dict[str, list] = {n: [] for n in names}
    for row in rows:
        model.zero_grad(set_to_none=True)
        model(collate(enc, np.array([row]))).record_nll.sum().backward()
        for n, p in model.named_parameters():
            per_record[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in per_record.items()}


# ---------------------------------------------------------------------- the privacy budget
def default_delta(n_records: int) -> float:
    """1e-5 or 1 / (10 N), whichever is smaller: well below 1/N."""
    return min(1e-5, 0.1 / max(n_records, 1))


def epsilon_spent(history: Sequence[Sequence[float]], *, delta: float, accountant: AccountantName) -> float:
    """Epsilon of a history of ``(noise_multiplier, sample_rate, steps)`` at ``delta`` (Opacus' accountant)."""
    _require_opacus()
    import warnings

    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not acc.history:
        return 0.0
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" (the bound holds, only
        warnings.simplefilter("ignore")  # looser) and PRV's log(1 - q) at q = 1
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, accountant: AccountantName,
                    history: Callable[[float], list], tolerance: float = 0.01) -> float:
    """The smallest noise multiplier sigma (to ``tolerance`` in epsilon) whose mechanisms
    ``history(sigma)`` spend at most ``target_epsilon`` at ``delta``.

    With ``history = lambda s: [(s, q, steps)]`` this is Opacus' ``get_noise_multiplier`` (the same
    doubling and bisection).
    """
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        eps_high = epsilon_spent(history(high), delta=delta, accountant=accountant)
        if high > 1e6:
            raise HaloBalanceError(f"epsilon={target_epsilon} at delta={delta} cannot be reached; "
                                   "train fewer epochs, with a larger --batch-size, or raise --dp-epsilon")
    while target_epsilon - eps_high > tolerance:
        mid = (low + high) / 2
        e = epsilon_spent(history(mid), delta=delta, accountant=accountant)
        if e < target_epsilon:
            high, eps_high = mid, e
        else:
            low = mid
    return high


# ---------------------------------------------------------------------- private statistics
@dataclass
class PrivateStatistics:
    """The noisy release that initialises a DP model (module docstring)."""

    code_frequency: np.ndarray  # (V,)
    end_rate: float
    cells: list[dict[str, Any]]  # ConditionLayout.cells with noisy counts
    noise_multiplier: float
    history: list[tuple[float, float, int]]  # its accountant entries


def private_statistics(enc, layout, vocab_size: int, *, noise_multiplier: float, generator: np.random.Generator,
                       clip: float | None = None) -> PrivateStatistics:
    """Code frequencies, end rate and cell counts of ``enc``'s patients through two Gaussian mechanisms
    (sensitivity 1 each after clipping; noise ``noise_multiplier``), counted as ``(sigma, 1.0, 2)``."""
    from .train import _ranges

    clip = STATISTICS_CLIP if clip is None else clip
    N = len(enc)
    vis = enc.visit_ids()
    k = enc.code_ptr[vis + 1] - enc.code_ptr[vis]
    owner = np.repeat(np.arange(N), enc.lengths)
    codes = enc.codes[_ranges(enc.code_ptr[vis], k)]
    code_owner = np.repeat(owner, k)
    frac = np.zeros((N, vocab_size + 1))
    np.add.at(frac, (code_owner, codes), 1.0)
    frac[:, :vocab_size] /= enc.lengths[:, None]
    frac[:, vocab_size] = 1.0 / enc.lengths  # the record's end bit per end slot
    norms = np.linalg.norm(frac, axis=1)
    frac *= np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]
    noisy = (frac.sum(0) + generator.normal(0.0, noise_multiplier * clip, vocab_size + 1)) / N
    floor = 0.5 / N
    code_frequency = np.clip(noisy[:vocab_size], floor, 1 - floor)
    end_rate = float(np.clip(noisy[vocab_size], floor, 1 - floor))
    # every combination of categories is a cell, seen or not, so that the release does not tell which
    # exist; the cell index is mixed-radix in itertools.product order (label first)
    combos = list(itertools.product([0, 1], *layout.groups.values()))
    cell, offset = enc.cond[:, 0].copy(), 2
    for j, cats in enumerate(layout.groups.values(), start=1):
        cell = cell * len(cats) + (enc.cond[:, j] - offset)
        offset += len(cats)
    counts = np.bincount(cell, minlength=len(combos))
    noisy_counts = counts + generator.normal(0.0, noise_multiplier, len(combos))
    cells = [{"label": c[0], **dict(zip(layout.groups, c[1:])), "n": int(round(n))}
             for c, n in zip(combos, noisy_counts) if n >= 2 * noise_multiplier and round(n) >= 1]
    return PrivateStatistics(code_frequency=code_frequency, end_rate=end_rate, cells=cells,
                             noise_multiplier=noise_multiplier, history=[(noise_multiplier, 1.0, 2)])


def statistics_noise_ratio(sample_rate: float, steps: int, share: float | None = None) -> float:
    """Noise of the statistics release relative to DP-SGD's, so that it takes about ``share`` of the
    Renyi-DP budget: two full-batch Gaussian releases cost alpha / sigma0^2, ``steps`` Poisson-sampled
    steps about 2 q^2 alpha steps / sigma^2 (small q). The accountant composes both exactly."""
    share = STATISTICS_SHARE if share is None else share
    if sample_rate >= 1.0:
        return math.sqrt((1 - share) / (share * steps / 2))
    return 1.0 / (sample_rate * math.sqrt(2 * steps * share / (1 - share)))


# ---------------------------------------------------------------------- DP-SGD
@dataclass
class PrivacyPlan:
    """The calibrated mechanism of one DP training run (saved in checkpoints and ``training.json``)."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    accountant: AccountantName
    n_records: int
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int
    noise_multiplier: float
    statistics_noise_multiplier: float
    history: list[list[float]]  # (noise multiplier, sample rate, steps) so far, the accountant's state
    steps: int = 0  # DP-SGD steps taken

    @classmethod
    def calibrate(cls, *, target_epsilon: float, delta: float | None, max_grad_norm: float,
                  accountant: AccountantName, n_records: int, batch_size: int, epochs: int) -> PrivacyPlan:
        delta = default_delta(n_records) if delta is None else delta
        q = min(1.0, batch_size / n_records)
        steps_per_epoch = max(1, round(1 / q))
        steps = epochs * steps_per_epoch
        ratio = statistics_noise_ratio(q, steps)
        sigma = calibrate_noise(target_epsilon=target_epsilon, delta=delta, accountant=accountant,
                                history=lambda s: [(ratio * s, 1.0, 2), (s, q, steps)])
        return cls(target_epsilon=target_epsilon, delta=delta, max_grad_norm=max_grad_norm, accountant=accountant,
                   n_records=n_records, sample_rate=q, steps_per_epoch=steps_per_epoch, planned_steps=steps,
                   noise_multiplier=sigma, statistics_noise_multiplier=ratio * sigma, history=[])

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_records

    def spent(self) -> float:
        return epsilon_spent(self.history, delta=self.delta, accountant=self.accountant)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Count ``steps`` more mechanisms (merged with the last entry when it has the same parameters)."""
        if self.history and list(self.history[-1][:2]) == [noise_multiplier, sample_rate]:
            self.history[-1][2] += steps
        else:
            self.history.append([noise_multiplier, sample_rate, steps])

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)

    def summary(self, *, unprotected_patients: int) -> dict[str, Any]:
        """What ``training.json`` and the model folder's ``privacy.json`` report."""
        return {"epsilon": self.spent(), "delta": self.delta, "target_epsilon": self.target_epsilon,
                "accountant": self.accountant, "max_grad_norm": self.max_grad_norm,
                "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size, "steps": self.steps,
                "planned_steps": self.planned_steps, "unit": "patient (all of its visits)",
                "statistics_noise_multiplier": self.statistics_noise_multiplier,
                "n_private_patients": self.n_records, "unprotected_patients": unprotected_patients,
                "history": self.history, "mechanism": "DP-SGD (Opacus DPOptimizer) with Poisson sampling; "
                "Gaussian release of code frequencies, end rate and cell counts"}


class PrivateSteps:
    """DP-SGD steps for a :class:`HaloModel`: Poisson samples of records, per-record clipping and noise.

    Parameters
    ----------
    model : HaloModel
    optimizer : torch.optim.Optimizer
        Wrapped in Opacus' ``DPOptimizer``.
    plan : PrivacyPlan
        Its ``history`` (the accountant's state) counts every step.
    device : torch.device
    noise_seed, sampling_seed : int, optional
        For tests only; by default both generators are seeded from ``secrets`` (never saved).
    """

    def __init__(self, model, optimizer, plan: PrivacyPlan, *, device, noise_seed: int | None = None,
                 sampling_seed: int | None = None) -> None:
        _require_opacus()
        import torch
        from opacus.optimizers import DPOptimizer

        self.model, self.plan, self.device = model, plan, device
        self.noise_rng = torch.Generator(device=device).manual_seed(
            secrets.randbits(63) if noise_seed is None else noise_seed)
        self.sampling_rng = torch.Generator().manual_seed(secrets.randbits(63) if sampling_seed is None else sampling_seed)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier,
                                     max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size,
                                     loss_reduction="mean", generator=self.noise_rng, secure_mode=True)
        n_params = sum(p.numel() for p in model.parameters())
        self.chunk = max(1, PER_RECORD_FLOATS // n_params)

    def batches(self):
        """One epoch of Poisson samples (lists of record indices; possibly empty)."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        return UniformWithReplacementSampler(num_samples=self.plan.n_records, sample_rate=self.plan.sample_rate,
                                             generator=self.sampling_rng, steps=self.plan.steps_per_epoch)

    def step(self, enc, rows: Sequence[int], *, autocast=None) -> tuple[float, int]:
        """One noisy step on the records ``rows`` of ``enc``; returns (their NLL in nats, their visits)."""
        import torch

        from .train import collate

        rows = np.asarray(rows, dtype=np.int64)
        chunks = [rows[i:i + self.chunk] for i in range(0, len(rows), self.chunk)] or [rows]
        nll, visits = 0.0, 0
        for i, chunk in enumerate(chunks):
            self.optimizer.zero_grad(set_to_none=True)
            if len(chunk):
                out = record_gradients(self.model, collate(enc, chunk).to(self.device), autocast=autocast)
                nll += float(out.record_nll.detach().sum())
                visits += out.n_visits
            else:  # an empty Poisson sample still takes its noisy step
                for p in self.model.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            if i < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
        self.plan.record(self.plan.noise_multiplier, self.plan.sample_rate)
        self.plan.steps += 1
        return nll, visits
