"""Train a conditional HALO model on a prepared dataset; score records by their likelihood.

``python -m halo_balance.train --data PREPARED --out MODEL_DIR [--preset tiny|small|base] ...``

- Patient-level validation split (stratified by outcome x groups), early stopping on the validation
  loss (nats per visit, see ``model.py``), the best epoch's weights saved as the model.
- A checkpoint every epoch in ``MODEL_DIR/checkpoint`` (replaced atomically: weights, optimizer,
  best weights and the loop state, no pickle); ``--resume`` continues after its last epoch, and an
  interrupted run says that the checkpoint was kept.
- Training data that holds synthetic rows (an output of ``halo_balance.generate``) is refused unless
  ``--allow-synthetic``: a generator trained on them learns partly from another generator's samples.
- Batches are bucketed by record length (each batch is padded to its own longest record only),
  visits enter as embedding-bags over sparse token ids; bf16 autocast on CUDA.
- The objective is the likelihood of the records: each batch's summed record NLL over one constant
  (batch size x mean visits per record), so every record weighs the same whatever its batch; a
  per-batch mean over visits, or a binding gradient clip, would weigh the patients of
  short-record batches more and teach the model to end records too early.
- Records longer than the context keep their last ``n_ctx - 1`` visits (the outcome sits on the
  final visit); the number of truncated patients is reported. The context is the preset's, or
  ``--n-ctx``, shortened to the longest training record + 1.
- Data-parallel training: ``torchrun --nproc_per_node=2 -m halo_balance.train ...`` (DDP; gloo on
  CPU, nccl on CUDA); each process takes every world-size-th batch; rank 0 writes.
- Differential privacy: ``--dp-epsilon EPS`` trains with DP-SGD, the patient as the unit of privacy
  (``dp.py``: per-record gradients, Poisson sampling, clipping, noise, the accountant).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .config import PLAIN_STRUCTURE, PRESETS, ConditionLayout, HaloConfig, PresetName, exclusive_token_groups
from .copies import RecordCounts
from .data import PreparedDataset
from .dp import AccountantName, PrivacyPlan, PrivateSteps, private_statistics
from .errors import HaloBalanceError, OutputExistsError, unknown_choice
from .io import atomic_dir, check_output_dir, read_json, write_json
from .pairs import shared_pairs

DeviceName = Literal["auto", "cpu", "cuda"]
CHECKPOINT_DIR, STATE_FILE, BEST_FILE, OPTIMIZER_FILE, TRAINING_FILE = (
    "checkpoint", "state.json", "best.safetensors", "optimizer.safetensors", "training.json")
PRESET_LR = {"tiny": 3e-3, "small": 1e-3, "base": 3e-4}
#: Raised whenever training or sampling changes what a generator trained with the same options
#: produces; caches of trained generators key on it (``benchmarks.methods.generator_key``).
GENERATOR_VERSION = 5
#: option fields that do not change the trained generator
RUNTIME_OPTIONS = ("device", "resume", "overwrite", "allow_synthetic")


@dataclass
class TrainOptions:
    """Training options (the command-line flags of ``python -m halo_balance.train``).

    Parameters
    ----------
    preset : {"tiny", "small", "base"}
        Model size (:data:`halo_balance.config.PRESETS`).
    epochs : int
        Maximum number of epochs.
    batch_size : int
        Patients per optimisation step (summed over processes under DDP).
    lr : float or None
        AdamW learning rate; ``None`` takes the preset's (tiny 3e-3, small 1e-3, base 3e-4).
    weight_decay : float
    patience : int
        Stop after this many epochs without a better validation loss.
    val_fraction : float or None
        Fraction of patients held out for validation (0 disables validation and early stopping);
        ``None``: 0.1, or 0 with ``dp_epsilon`` (every patient then in the private training set).
    device : {"auto", "cpu", "cuda"}
    seed : int
        Seeds the split, the initialisation, the batch order and dropout.
    resume : bool
        Continue from ``out_dir/checkpoint`` (written by an earlier, stopped run).
    overwrite : bool
        Delete an existing ``out_dir`` before training (only a folder this package wrote).
    allow_synthetic : bool
        Train on rows flagged ``synthetic`` too (refused by default).
    n_ctx : int or None
        Context length in visits (conditioning visit included); ``None``: the preset's.
    dropout : float or None
        ``None``: the preset's.
    grad_clip : float
        Clip the gradient norm at this value (0: no clipping). A clip that binds shrinks a batch of
        long records more than one of short records and so teaches the model to end records too
        early (with the ``small`` preset on the eICU demo a clip of 1 bound at every step: 84% of
        the sampled records had one visit against 77% of the real ones).
    warmup_steps : int
        Linear learning-rate warm-up.
    dp_epsilon : float or None
        Train with differential privacy (DP-SGD, the patient as the unit) at this epsilon
        (``dp.py``); ``batch_size`` is then the expected size of the Poisson samples, ``epochs``
        the planned length the noise is calibrated for, and ``grad_clip`` is replaced by the
        per-patient clipping norm ``dp_max_grad_norm``.
    dp_delta : float or None
        ``None``: 1e-5 or 1 / (10 N), whichever is smaller.
    dp_max_grad_norm : float
        Each patient's gradient is clipped to this L2 norm.
    dp_accountant : {"rdp", "prv"}
        Opacus' privacy accountant.
    condition_lr_scale : float
        The outcome x group embeddings (models with ``condition_every_visit``) learn at this
        multiple of the learning rate, in training and in the condition refit. Each of their rows
        is moved only by its own cell's patients, a fraction of one per batch in a small cell: at
        the base rate a small cell's row has barely left zero when validation stops the training
        (20,000 simulated patients, 102 deaths of the "Other" group: unigram R^2 0.49 against a
        ceiling of 0.73 at scale 1, 0.73 at scale 10 with the refit).
    refit_conditions : bool
        After choosing the epoch, go on fitting the outcome x group embeddings alone (the rest
        fixed) while the validation loss falls within the gap limit (models with
        ``condition_every_visit``).
    refit_biases : bool
        Then refit the code, end and empty-visit biases by maximum likelihood on the training
        patients with the rest of the model fixed (:func:`refit_output_biases`).
    pair_min_patients : int
        With the bias refit, fit pair terms (``model.py``) for code pairs that at least this many
        training patients hold together in a visit (0: none). The early-stopped network draws
        strong common associations (diabetes with a high glucose bin) at a fraction of their real
        rate; fewer patients than this describe too few people to be fitted directly (on the eICU
        demo, pairs that 10-16 patients share raised the membership attacks and gained nothing
        against held-out patients; ``benchmarks/RESULTS.md``).
    pair_min_score : float
        Of those pairs, only the ones whose co-occurrence the model (its biases refitted) misses by
        at least this many standard errors get a term, the 2 V strongest at most.
    pair_max_fdr : float
        And only those whose miss stays significant at this false discovery rate over all the
        candidates (Benjamini-Hochberg on the two-sided p-values of their scores; 1: no control).
        A large cohort has hundreds of thousands of candidates whose scores, when the network
        already holds its pairs, are spread as chance spreads them: two standard errors alone then
        select thousands of pairs that fit the training patients' sampling noise.
    pair_shrinkage : float
        Gaussian penalty on each pair term, worth about this many observations.
    cell_min_patients : int
        With the bias refit, fit cell terms (``model.py``): for each outcome x group crossing, a
        logit of its own for the codes that at least this many of its training patients hold and
        whose rate in it the model (its biases refitted) misses by ``cell_min_score`` standard
        errors, the V strongest at most (0: none). The network leaves a small cell's own codes
        at a fraction of their rate (20,000 simulated patients: the 102 "Other" deaths held
        haemoglobin below 7.9 in 28% of their synthetic visits against 55% real); with the terms
        every death cell comes within 0.025 of its ceiling, at a membership-attack cost of at most
        0.01 (``benchmarks/RESULTS.md``).
    cell_min_score, cell_max_fdr, cell_shrinkage : float
        As ``pair_min_score``, ``pair_max_fdr`` and ``pair_shrinkage``, for the cell terms.
    max_gap : float or None
        The model is the best epoch (by validation loss) among those whose generalisation gap is
        at most this (the first epoch always qualifies); ``None`` or 0: no limit. The gap is
        ``(validation NLL - training NLL) / validation NLL`` on the validation patients and as many
        training patients, less the same figure under the marginal-frequency model (the two
        samples' own difference): how much better the model knows its training patients, which is
        what a likelihood membership attack reads.
    """

    preset: PresetName = "small"
    epochs: int = 50
    batch_size: int = 64
    lr: float | None = None
    weight_decay: float = 0.01
    patience: int = 5
    val_fraction: float | None = None
    device: DeviceName = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    allow_synthetic: bool = False
    n_ctx: int | None = None
    dropout: float | None = None
    grad_clip: float = 0.0
    warmup_steps: int = 100
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_accountant: AccountantName = "rdp"
    max_gap: float | None = 0.055
    condition_lr_scale: float = 10.0
    refit_conditions: bool = True
    refit_biases: bool = True
    pair_min_patients: int = 20
    pair_min_score: float = 2.0
    pair_max_fdr: float = 0.1
    pair_shrinkage: float = 3.0
    cell_min_patients: int = 25
    cell_min_score: float = 2.0
    cell_max_fdr: float = 1.0
    cell_shrinkage: float = 3.0

    def validate(self) -> TrainOptions:
        problems = []
        for name, choices in (("preset", sorted(PRESETS)), ("device", ["auto", "cpu", "cuda"]),
                              ("dp_accountant", ["rdp", "prv"])):
            if getattr(self, name) not in choices:
                problems.append(str(unknown_choice(name, [getattr(self, name)], choices)))
        for name in ("epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must lie in [0, 1) (got {self.val_fraction})")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            problems.append(f"dp_epsilon must be > 0 (got {self.dp_epsilon})")
        if self.dp_delta is not None and not 0.0 < self.dp_delta < 1.0:
            problems.append(f"dp_delta must lie in (0, 1) (got {self.dp_delta})")
        if not self.dp_max_grad_norm > 0:
            problems.append(f"dp_max_grad_norm must be > 0 (got {self.dp_max_grad_norm})")
        if self.max_gap is not None and self.max_gap < 0:
            problems.append(f"max_gap must be >= 0 (got {self.max_gap})")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not self.condition_lr_scale > 0:
            problems.append(f"condition_lr_scale must be > 0 (got {self.condition_lr_scale})")
        if self.pair_min_patients < 0:
            problems.append(f"pair_min_patients must be >= 0 (got {self.pair_min_patients}; 0: no pair terms)")
        if self.cell_min_patients < 0:
            problems.append(f"cell_min_patients must be >= 0 (got {self.cell_min_patients}; 0: no cell terms)")
        for name in ("pair_min_score", "cell_min_score"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("pair_shrinkage", "cell_shrinkage"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("pair_max_fdr", "cell_max_fdr"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must lie in (0, 1] (got {getattr(self, name)}; 1: no control)")
        if self.n_ctx is not None and self.n_ctx < 2:
            problems.append(f"n_ctx must be >= 2 (got {self.n_ctx})")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other (resume continues the folder's training, "
                            "overwrite starts it over)")
        if problems:
            raise HaloBalanceError("invalid training options: " + "; ".join(problems))
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PRESET_LR[self.preset]

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None

    @property
    def validation_fraction(self) -> float:
        if self.val_fraction is not None:
            return self.val_fraction
        return 0.0 if self.private else 0.1

    def resolved(self) -> dict[str, Any]:
        """Everything that decides the trained generator beside the data: the generator version, the
        options (not the runtime ones) with the preset's defaults filled in, and the preset's sizes."""
        options = {k: v for k, v in dataclasses.asdict(self).items()
                   if k not in (*RUNTIME_OPTIONS, "n_ctx", "dropout")}  # these two: in the sizes
        sizes = {**PRESETS[self.preset], **{k: v for k, v in (("n_ctx", self.n_ctx), ("dropout", self.dropout))
                                            if v is not None}}
        return {"generator_version": GENERATOR_VERSION, "options": {**options, "lr": self.learning_rate},
                "model": sizes}


# ---------------------------------------------------------------------- records -> batches
@dataclass
class EncodedRecords:
    """A dataset in the model's terms: condition slot ids and, per patient, its (truncated) visits."""

    cond: np.ndarray  # (P, 1 + n_attributes) int64
    first_visit: np.ndarray  # (P,) int64, global index of the first kept visit
    lengths: np.ndarray  # (P,) int64, kept visits, 1..n_ctx-1
    code_ptr: np.ndarray  # (n_visits + 1,) int64
    codes: np.ndarray  # int32
    n_ctx: int
    n_truncated: int  # patients with more than n_ctx - 1 visits

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset, layout: Any, n_ctx: int) -> EncodedRecords:
        rec = dataset.records()
        counts = rec.visit_counts()
        lengths = np.minimum(counts, n_ctx - 1)
        return cls(cond=layout.encode(dataset.patients), first_visit=rec.visit_ptr[1:] - lengths,
                   lengths=lengths, code_ptr=rec.code_ptr, codes=rec.codes, n_ctx=n_ctx,
                   n_truncated=int((counts > n_ctx - 1).sum()))

    def __len__(self) -> int:
        return len(self.lengths)

    def subset(self, rows: np.ndarray) -> EncodedRecords:
        """The patients ``rows`` (sharing the code arrays)."""
        return dataclasses.replace(self, cond=self.cond[rows], first_visit=self.first_visit[rows],
                                   lengths=self.lengths[rows], n_truncated=0)

    def visit_ids(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Global ids of the kept visits of ``rows`` (all patients by default), record by record."""
        L = self.lengths if rows is None else self.lengths[rows]
        first = self.first_visit if rows is None else self.first_visit[rows]
        return _ranges(first, L)

    def ragged(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept visits of ``rows`` as ragged arrays ``(visit_ptr, code_ptr, codes)``."""
        vis = self.visit_ids(rows)
        k = self.code_ptr[vis + 1] - self.code_ptr[vis]
        return (np.concatenate([[0], np.cumsum(self.lengths[rows])]), np.concatenate([[0], np.cumsum(k)]),
                self.codes[_ranges(self.code_ptr[vis], k)])

    def end_slots(self) -> tuple[int, int]:
        """(trained end bits, of which "end"): h_1..h_L per record, minus the forced end at n_ctx - 1."""
        continues, ends = self.end_bits()
        positives = int(ends.sum())
        return int(continues.sum()) + positives, positives

    def end_bits(self) -> tuple[np.ndarray, np.ndarray]:
        """Per record: its "not end" bits (one before each later visit) and whether it has an "end" bit
        (not when it reaches n_ctx - 1 visits, where the end is forced)."""
        return self.lengths - 1, self.lengths < self.n_ctx - 1


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - offsets, lengths) + np.arange(total, dtype=np.int64)


def collate(enc: EncodedRecords, rows: np.ndarray):
    """The :class:`~halo_balance.model.Batch` of patients ``rows``, padded to its longest record."""
    import torch

    from .model import Batch

    rows = np.asarray(rows, dtype=np.int64)
    L = enc.lengths[rows]
    B, T = len(rows), int(L.max()) + 1
    _, code_ptr, codes = enc.ragged(rows)
    k = np.diff(code_ptr)
    bag = np.zeros((B, T - 1), dtype=np.int64)
    bag[np.arange(T - 1)[None, :] < L[:, None]] = k  # row-major fill = record by record, visit by visit
    offsets = np.concatenate([[0], np.cumsum(bag.ravel())[:-1]]) if T > 1 else np.zeros(0, dtype=np.int64)
    rec = np.repeat(np.arange(B), L)
    t = np.arange(len(rec)) - np.repeat(np.cumsum(L) - L, L)  # 0-based visit index: visit t+1 is predicted by h_t
    end_t = t + 1  # end bits at h_1..h_L; the one at h_{n_ctx-1} is forced, not trained
    keep = end_t != enc.n_ctx - 1
    tensor = lambda a, dt=torch.long: torch.from_numpy(np.ascontiguousarray(a)).to(dt)  # noqa: E731
    return Batch(cond=tensor(enc.cond[rows]), visit_codes=tensor(codes), visit_offsets=tensor(offsets),
                 code_ptr=tensor(code_ptr), target_hidden=tensor(rec * T + t), target_record=tensor(rec),
                 end_hidden=tensor((rec * T + end_t)[keep]), end_record=tensor(rec[keep]),
                 end_target=tensor((end_t == L[rec])[keep], torch.float32), n_positions=T)


def bucket_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of similar record length (random within equal lengths), in random order."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ---------------------------------------------------------------------- the marginal-frequency baseline
@dataclass(frozen=True)
class MarginalModel:
    """Each code an independent Bernoulli of its visit frequency; a constant end-of-record hazard."""

    code_frequency: np.ndarray  # (V,)
    end_rate: float

    @classmethod
    def fit(cls, enc: EncodedRecords, vocab_size: int) -> MarginalModel:
        vis = enc.visit_ids()
        k = enc.code_ptr[vis + 1] - enc.code_ptr[vis]
        counts = np.bincount(enc.codes[_ranges(enc.code_ptr[vis], k)], minlength=vocab_size)
        slots, ends = enc.end_slots()
        return cls(code_frequency=(counts + 0.5) / (len(vis) + 1.0), end_rate=(ends + 0.5) / (slots + 1.0))

    def loss(self, enc: EncodedRecords) -> float:
        """Negative log-likelihood of ``enc`` in nats per visit (the unit of the model's loss)."""
        return float(-self.record_log_likelihood(enc).sum() / max(int(enc.lengths.sum()), 1))

    def record_log_likelihood(self, enc: EncodedRecords) -> np.ndarray:
        """Log-likelihood of each record of ``enc`` in nats: every code bit of every visit, and the end bits."""
        p = self.code_frequency
        log1m, logit = np.log1p(-p), np.log(p) - np.log1p(-p)
        vis = enc.visit_ids()
        k = enc.code_ptr[vis + 1] - enc.code_ptr[vis]
        present = enc.codes[_ranges(enc.code_ptr[vis], k)]
        visit_ll = log1m.sum() + np.bincount(np.repeat(np.arange(len(vis)), k), weights=logit[present],
                                             minlength=len(vis))
        ll = np.bincount(np.repeat(np.arange(len(enc)), enc.lengths), weights=visit_ll, minlength=len(enc))
        continues, ends = enc.end_bits()
        return ll + ends * math.log(self.end_rate) + continues * math.log1p(-self.end_rate)


# ---------------------------------------------------------------------- devices and processes
def resolve_device(device: DeviceName | str, local_rank: int = 0):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise HaloBalanceError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise HaloBalanceError(f"device must be auto, cpu or cuda (got {device!r})")
    return torch.device("cpu")


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        # nccl reduces CUDA tensors only, gloo CPU tensors
        device = f"cuda:{self.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def _init_distributed(device_name: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    created = not dist.is_initialized()
    if created:
        use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank=rank, world=world, local_rank=local, created=created)


# ---------------------------------------------------------------------- scoring
def _record_nll(model, enc: EncodedRecords, rows: np.ndarray, *, batch_size: int, device) -> np.ndarray:
    """Per-record NLL (nats) of ``rows``, in ``rows`` order; the model in eval mode, no gradients."""
    import torch

    out = np.zeros(len(rows), dtype=np.float64)
    order = np.argsort(enc.lengths[rows], kind="stable")  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(order), batch_size):
            pos = order[i:i + batch_size]
            res = model(collate(enc, rows[pos]).to(device))
            out[pos] = res.record_nll.double().cpu().numpy()
    model.train(was_training)
    return out


def significant_misses(z, *, min_score: float, max_fdr: float = 1.0, cap: int | None = None):
    """Indices of the candidates whose score ``z`` (standard errors) is at least ``min_score`` in size
    and significant at the false discovery rate ``max_fdr`` over all candidates (Benjamini-Hochberg
    on two-sided normal p-values; 1: no control), largest ``|z|`` first, ``cap`` at most."""
    import torch
    from scipy.stats import false_discovery_control

    order = torch.argsort(z.abs(), descending=True)
    keep = z.abs()[order] >= min_score
    if max_fdr < 1 and len(z):
        p_value = torch.special.erfc(z.abs()[order].double() / math.sqrt(2)).cpu().numpy()
        keep &= torch.as_tensor(false_discovery_control(p_value) <= max_fdr, device=z.device)
    return order[keep][:cap]


def term_arguments(options: TrainOptions, model, enc: EncodedRecords, rows: np.ndarray) -> dict[str, Any]:
    """The pair- and cell-term arguments of :func:`refit_output_biases` that ``options`` set, the
    candidate pairs counted over ``rows`` (:func:`halo_balance.pairs.shared_pairs`; None without
    pair terms): what training passes, for anything that must refit as training does."""
    V = model.config.vocab_size
    pairs = None
    if options.pair_min_patients:
        pairs, _ = shared_pairs(*enc.ragged(rows), vocab_size=V, min_patients=options.pair_min_patients,
                                skip=model.fine.skip.cpu().numpy())
    return dict(pairs=pairs, pair_shrinkage=options.pair_shrinkage, pair_min_score=options.pair_min_score,
                pair_max_fdr=options.pair_max_fdr, max_pairs=2 * V, cell_min_patients=options.cell_min_patients,
                cell_min_score=options.cell_min_score, cell_max_fdr=options.cell_max_fdr,
                cell_shrinkage=options.cell_shrinkage, max_cell_terms=V)


def refit_output_biases(model, enc: EncodedRecords, rows: np.ndarray, *, batch_size: int, device,
                        shrinkage: float = 5.0, iterations: int = 10, reduce=None, pairs: np.ndarray | None = None,
                        pair_shrinkage: float = 3.0, pair_min_score: float = 0.0, pair_max_fdr: float = 1.0,
                        max_pairs: int | None = None, pair_iterations: int = 40, cell_min_patients: int = 0,
                        cell_min_score: float = 2.0, cell_max_fdr: float = 1.0, cell_shrinkage: float = 3.0,
                        max_cell_terms: int | None = None) -> dict[str, Any]:
    """Refit the code biases ``b_i``, the end bias and the empty-visit bias by maximum likelihood on
    ``rows``, the rest of the model fixed; then, given candidate ``pairs`` (``(P, 2)`` code pairs
    j < i, :func:`halo_balance.pairs.shared_pairs`) or ``cell_min_patients``, fit pair terms and
    cell terms jointly with the biases.

    With the states fixed (teacher forcing), each bias is a one-dimensional convex problem: the
    logistic likelihood of its code's bits (or of the end or empty-visit bits) with the other terms
    of the logit as an offset; a few Newton steps solve it. At the solution the expected count of
    every code over the training visits equals its count, which early stopping, taken while the
    network still moves fast, leaves off by up to a third for common lab bins. A Gaussian penalty
    ``shrinkage / 2 * (b - b_trained)^2`` keeps a rare code's bias near its trained value (worth
    about ``shrinkage`` observations) instead of fitting its few training occurrences exactly.
    With the empty-visit event the codes are fitted on the visits that hold one, under the
    condition that they do. ``reduce`` sums per-process lists under DDP.

    Pair terms: a candidate gets one when, under the refitted biases, the model misses its pair's
    co-occurrence by at least ``pair_min_score`` standard errors (the score statistic of a_ji at 0:
    observed minus expected count of code i in the visits that hold j, over the root of the summed
    variances) and the miss stays significant at the false discovery rate ``pair_max_fdr`` over all
    candidates (Benjamini-Hochberg), the ``max_pairs`` strongest at most. A term enters the logit of
    code i in the visits that hold j, next to b_i and the other terms into i. Cell terms likewise:
    the candidates are the (outcome x group crossing, code) pairs whose code at least
    ``cell_min_patients`` of the crossing's patients in ``rows`` hold, scored by the code's observed
    minus expected count in the crossing's visits; those missed by ``cell_min_score`` standard
    errors (at the false discovery rate ``cell_max_fdr``) get a term, the ``max_cell_terms``
    strongest at most (:func:`significant_misses`). Newton steps then fit terms and biases
    together: each code's bias and its cell terms as one small system (they share the code's
    logits), each pair term's curvature multiplied by the number of parameters sharing each of its
    logits (a diagonal bound on the joint Hessian), a step that raises the penalised NLL halved
    until it does not, and ``pair_shrinkage / 2 * a_ji^2`` (``cell_shrinkage`` for the cell terms) shrinking each term
    towards none: ``pair_iterations`` steps with pair terms, whose diagonal steps converge slowly,
    ``iterations`` without. Returns the mean absolute change of the code biases, the changes of the
    other biases and, with terms, their number and size. :func:`term_arguments` gives the term
    arguments that training passes.
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    fine, V = model.fine, model.config.vocab_size
    n_cross = fine.n_crossings
    if pairs is not None:
        model.set_pairs(torch.zeros(0, 2, dtype=torch.long))  # candidates are scored without any term
    if cell_min_patients:
        model.set_cell_terms(torch.zeros(0, 2, dtype=torch.long))
    # each event's bias: per visit position when the model has position biases, else the head's one
    heads = {"end": (model.end_position.weight[:, 0] if model.end_position is not None else model.end_head.bias)}
    if fine.empty_head is not None:
        heads["empty"] = fine.empty_position.weight[:, 0] if fine.empty_position is not None else fine.empty_head.bias
    visits, events = [], {name: [] for name in heads}
    holders = torch.zeros(n_cross, V, device=device)  # patients of each crossing holding each code
    summed = (lambda t: torch.tensor(reduce(t.flatten().tolist()), dtype=t.dtype, device=device).view(t.shape)
              ) if reduce is not None else (lambda t: t)

    def pair_terms(codes, visit_of_code):
        """Each pair term's (visit, code) logit in these visits; and the logits that pair terms share
        (flat ids into (visits, V)) with how many parameters share each (the code's bias, or its bias
        and cell terms, counted as one; every other logit has one)."""
        if fine.pair_index is None:
            return None, None
        which, pair = fine.pair_edges(codes)
        at = (visit_of_code[which], fine.pair_index[pair, 1])
        shared, terms = torch.unique(at[0] * V + at[1], return_counts=True)
        return (at, pair), (shared, (terms + 1).float())

    def by_crossing(values, crossings, *, two: bool = False):
        """``values`` (visits, V) summed over the visits of each crossing, ``(2 n_conditions, V)``; with
        ``two``, over the visits holding each two crossings, ``((2 n_conditions) ** 2, V)``."""
        keys = crossings[:, :, None] * n_cross + crossings[:, None, :] if two else crossings
        out = values.new_zeros(n_cross ** (2 if two else 1), V)
        for column in keys.reshape(len(keys), -1).T:  # one visit row per column: no copies of values
            out.index_add_(0, column, values)
        return out

    def code_blocks():
        """Each code's cell terms: ``(crossing per slot, term id per slot)``, ``(V, K)``, -1 for none."""
        code = fine.cell_index[:, 1]
        per_code = torch.bincount(code, minlength=V)
        order = torch.argsort(code, stable=True)
        slot = torch.arange(len(code), device=device) - (per_code.cumsum(0) - per_code)[code[order]]
        crossing = torch.full((V, int(per_code.max())), -1, dtype=torch.long, device=device)
        term = torch.full_like(crossing, -1)
        crossing[code[order], slot] = fine.cell_index[order, 0]
        term[code[order], slot] = order
        return crossing, term

    def block_step(blocks, grad, hess, cell_grad, cell_w, cell_ww, shift, c):
        """Joint Newton step of every code's bias and cell terms (``blocks``: :func:`code_blocks`): one
        small system per code, with the curvature over the visits each two of its parameters share."""
        crossing, term = blocks
        K = crossing.shape[1]
        index = torch.cat([torch.full((V, 1), n_cross, device=device, dtype=torch.long), crossing], 1)
        valid = index >= 0
        at = index.clamp(min=0)
        # the per-code curvatures; row and column n_cross: the bias
        full = torch.zeros(n_cross + 1, n_cross + 1, V, dtype=torch.float64, device=device)
        full[:n_cross, :n_cross] = cell_ww.view(n_cross, n_cross, V)
        full[n_cross, :n_cross] = full[:n_cross, n_cross] = cell_w
        full[n_cross, n_cross] = hess
        codes = torch.arange(V, device=device)[:, None, None]
        matrix = full[at[:, :, None], at[:, None, :], codes] * (valid[:, :, None] & valid[:, None, :])
        penalty = torch.cat([torch.full((V, 1), shrinkage, dtype=torch.float64, device=device),
                             torch.where(valid[:, 1:], cell_shrinkage, 1.0)], 1)  # 1 keeps an unused slot's row
        matrix = matrix + torch.diag_embed(penalty.double())
        weight = torch.zeros(V, K, dtype=torch.float64, device=device)
        weight[valid[:, 1:]] = c[term[valid[:, 1:]]]
        rhs = torch.cat([(grad + shrinkage * shift)[:, None],
                         torch.where(valid[:, 1:], cell_grad[at[:, 1:], torch.arange(V, device=device)[:, None]]
                                     + cell_shrinkage * weight, 0.0)], 1)
        step = torch.linalg.solve(matrix, rhs).clamp(-2.0, 2.0)
        cell_step = torch.zeros_like(c)
        cell_step[term[valid[:, 1:]]] = step[:, 1:][valid[:, 1:]]
        return step[:, 0], cell_step

    def newton(n_steps: int, score: torch.Tensor | None = None, cell_score: torch.Tensor | None = None) -> None:
        """Newton steps on the code biases, pair and cell terms (and the event biases); with ``score``
        (2, V, V) and ``cell_score`` (2, 2 n_conditions, V), the last evaluation also sums the score
        statistic's parts of every pair and every (crossing, code) into them."""
        n_pairs, n_cells = model.config.n_pairs, model.config.n_cell_terms
        blocks = code_blocks() if n_cells else None  # the terms stay the same through these steps
        last = None  # the last accepted point: (loss, biases, pair terms, cell terms, steps..., multiple)
        for it in range(n_steps):
            scoring = it == n_steps - 1 and (score is not None or cell_score is not None)
            loss = 0.0
            grad = torch.zeros(V, dtype=torch.float64, device=device)
            hess = torch.zeros_like(grad)
            pair_grad = torch.zeros(n_pairs, dtype=torch.float64, device=device)
            pair_hess = torch.zeros_like(pair_grad)
            cell_grad = torch.zeros(n_cross, V, dtype=torch.float64, device=device)
            cell_w = torch.zeros_like(cell_grad)
            cell_ww = torch.zeros(n_cross * n_cross, V, dtype=torch.float64, device=device) if n_cells else None
            bias_now = fine.out.bias.float()
            for base, first_base, (codes, visit_of_code), crossings, terms, sharing in visits:
                x = torch.zeros_like(base).index_put_((visit_of_code, codes), torch.ones(len(codes), device=device))
                offset = fine.cell_offsets(crossings)
                logits = base + bias_now  # -inf where a group rules a code out
                if offset is not None:
                    logits = logits + offset
                if terms is not None:
                    logits = logits.index_put(terms[0], fine.pair_weight[terms[1]].float(), accumulate=True)
                p = torch.sigmoid(logits)
                g, w = p - x, p * (1 - p)
                nll = torch.where(torch.isfinite(logits), F.softplus(logits) - x * logits, 0.0).sum(1)
                if score is not None and scoring:  # rows of empty visits are 0 in x
                    score[0] += (x.T @ g).double()
                    score[1] += (x.T @ w).double()
                if terms is not None:  # pair terms sit on chosen codes' visits: never the empty-chain term
                    shared, sharers = sharing
                    w = w.flatten().index_put((shared,), w.flatten()[shared] * sharers).view_as(w)
                    at, pair = terms
                    pair_grad.index_add_(0, pair, g[at].double())
                    pair_hess.index_add_(0, pair, w[at].double())
                if "empty" in heads:  # non-empty visits only, given that they hold a code
                    keep = (x.sum(1) > 0).float()[:, None]
                    first_logits = first_base + bias_now
                    if offset is not None:
                        first_logits = first_logits + offset
                    hazard = F.softplus(first_logits).sum(1).clamp(min=1e-6)
                    first = torch.sigmoid(first_logits)
                    g, w = (g + first / torch.expm1(hazard)[:, None]) * keep, w * keep
                    nll = (nll + torch.log(-torch.expm1(-hazard))) * keep[:, 0]
                if n_cells or (cell_score is not None and scoring):
                    parts = by_crossing(g, crossings).double(), by_crossing(w, crossings).double()
                    cell_grad += parts[0]
                    cell_w += parts[1]
                    if n_cells:
                        cell_ww += by_crossing(w, crossings, two=True).double()
                    if cell_score is not None and scoring:
                        cell_score[0] += parts[0]
                        cell_score[1] += parts[1]
                loss += float(nll.double().sum())
                grad += g.sum(0).double()
                hess += w.sum(0).double()
            grad, hess, pair_grad, pair_hess = (summed(t) for t in (grad, hess, pair_grad, pair_hess))
            if n_cells:
                cell_grad, cell_w, cell_ww = summed(cell_grad), summed(cell_w), summed(cell_ww)
            loss = float(summed(torch.tensor([loss], dtype=torch.float64))[0])
            shift = fine.out.bias.double() - old["codes"].double()
            empty = torch.zeros(0, dtype=torch.float64, device=device)
            a = fine.pair_weight.double() if n_pairs else empty
            c = fine.cell_weight.double() if n_cells else empty
            loss += 0.5 * (shrinkage * float((shift ** 2).sum()) + pair_shrinkage * float((a ** 2).sum())
                           + cell_shrinkage * float((c ** 2).sum()))
            # near 0 or 1 the curvature vanishes and a full step can overshoot: undo and halve it
            if last is not None and loss > last[0] + 1e-9 * abs(last[0]):
                last = (*last[:-1], last[-1] / 2)
                bias, a, c, step, pair_step, cell_step, multiple = last[1:]
            else:
                if n_cells:
                    step, cell_step = block_step(blocks, grad, hess, cell_grad, cell_w, cell_ww, shift, c)
                else:
                    step = ((grad + shrinkage * shift) / (hess + shrinkage)).clamp(-2.0, 2.0)
                    cell_step = empty
                pair_step = ((pair_grad + pair_shrinkage * a) / (pair_hess + pair_shrinkage)).clamp(-2.0, 2.0)
                last = (loss, fine.out.bias.double().clone(), a.clone(), c.clone(), step, pair_step, cell_step, 1.0)
                bias, multiple = last[1], 1.0
            if scoring:
                break  # the scores are of these biases
            fine.out.bias.copy_((bias - multiple * step).clamp(min=floor).to(fine.out.bias.dtype))
            if n_pairs:
                fine.pair_weight.copy_((a - multiple * pair_step).to(fine.pair_weight.dtype))
            if n_cells:
                fine.cell_weight.copy_((c - multiple * cell_step).to(fine.cell_weight.dtype))
            for name, bias in heads.items():
                g_h = torch.zeros(len(bias), dtype=torch.float64, device=device)
                w_h = torch.zeros_like(g_h)
                for offset, target, slot in events[name]:
                    q = torch.sigmoid(offset + bias[slot]).double()
                    g_h.index_add_(0, slot, q - target.double())
                    w_h.index_add_(0, slot, q * (1 - q))
                g_h, w_h = summed(g_h), summed(w_h)
                g_h += shrinkage * (bias.double() - old[name].double())
                bias -= ((g_h / (w_h + shrinkage)).clamp(-2.0, 2.0)).to(bias.dtype)

    def strongest(observed_minus_expected, variance, min_score, max_fdr, cap):
        z = -observed_minus_expected / variance.clamp(min=1e-12).sqrt()  # > 0: the model draws it too rarely
        return significant_misses(z, min_score=min_score, max_fdr=max_fdr, cap=cap), z

    kept = (fine.pair_index, fine.pair_weight)
    fine.pair_index = fine.pair_weight = None  # the logits without biases and pair terms, fixed from here on
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(rows), batch_size):
            b = collate(enc, rows[i:i + batch_size]).to(device)
            h = model.hidden_states(b.cond, b.visit_codes, b.visit_offsets, b.n_positions)
            h = h.reshape(b.n_records * b.n_positions, -1).float()
            visit_of_code = torch.repeat_interleave(torch.arange(b.n_visits, device=device), b.code_ptr.diff())
            hv, bias = h[b.target_hidden], fine.out.bias.float()
            crossings = model.crossings(b.cond)
            visits.append([fine.logits(hv, b.visit_codes, b.code_ptr).float() - bias,
                           fine.first_logits(hv) - bias if "empty" in heads else None,
                           (b.visit_codes.long(), visit_of_code), crossings[b.target_record], None, None])
            if cell_min_patients:  # each patient once per code it holds
                held = torch.zeros(b.n_records, V, device=device)
                held[b.target_record[visit_of_code], b.visit_codes] = 1.0
                holders += by_crossing(held, crossings)
            T = b.n_positions
            end_at, visit_at = b.end_hidden % T, b.target_hidden % T
            end_slot = end_at if model.end_position is not None else torch.zeros_like(end_at)
            events["end"].append((model.end_logit(h[b.end_hidden], end_at).float() - heads["end"][end_slot],
                                  b.end_target, end_slot))
            if "empty" in heads:
                slot = visit_at if fine.empty_position is not None else torch.zeros_like(visit_at)
                events["empty"].append((fine.empty_logit(h[b.target_hidden], visit_at) - heads["empty"][slot],
                                        (b.code_ptr[1:] == b.code_ptr[:-1]).float(), slot))
        fine.pair_index, fine.pair_weight = kept

        def share_logits():
            for visit in visits:  # the visits' codes are kept, not their dense (visits x V) bits
                visit[4:6] = pair_terms(*visit[2])

        def steps():  # the pair terms' diagonal steps converge slowly; biases and cell terms take exact ones
            return pair_iterations if fine.pair_index is not None else iterations

        share_logits()
        old = {"codes": fine.out.bias.detach().clone(), **{k: v.detach().clone() for k, v in heads.items()}}
        floor = math.log(1e-6) - math.log1p(-1e-6)  # the marginal model's smallest frequency
        out: dict[str, Any] = {}
        has_pairs, has_cells = pairs is not None and len(pairs) > 0, bool(cell_min_patients)
        if not (has_pairs or has_cells):
            newton(steps())
        else:  # the biases first; the candidates scored under them; then the chosen terms and the biases
            score = torch.zeros(2, V, V, dtype=torch.float64, device=device) if has_pairs else None
            cell_score = torch.zeros(2, n_cross, V, dtype=torch.float64, device=device) if has_cells else None
            newton(iterations + 1, score, cell_score)
            if has_pairs:
                score = summed(score)
                j, i = torch.as_tensor(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), device=device).T
                order, z = strongest(score[0, j, i], score[1, j, i], pair_min_score, pair_max_fdr, max_pairs)
                model.set_pairs(torch.stack([j[order], i[order]], 1))
                out.update(pair_candidates=len(z), pair_score_abs_median=float(z.abs().median()) if len(z) else None)
            if has_cells:
                cell_score, holders = summed(cell_score), summed(holders)
                s, i = (holders >= cell_min_patients).nonzero(as_tuple=True)
                order, z = strongest(cell_score[0, s, i], cell_score[1, s, i], cell_min_score, cell_max_fdr,
                                     max_cell_terms)
                model.set_cell_terms(torch.stack([s[order], i[order]], 1))
                out.update(cell_candidates=len(z))
            share_logits()
            if fine.pair_index is not None or fine.cell_index is not None:
                newton(steps())
    model.train(was_training)
    out.update(code_bias_mean_abs_change=float((fine.out.bias.detach() - old["codes"]).abs().mean()),
               **{f"{name}_bias_change": (bias.detach() - old[name]).tolist() for name, bias in heads.items()})
    if fine.pair_index is not None:
        out.update(pairs=model.config.n_pairs, pair_term_mean_abs=float(fine.pair_weight.abs().mean()))
    if fine.cell_index is not None:
        out.update(cell_terms=model.config.n_cell_terms, cell_term_mean_abs=float(fine.cell_weight.abs().mean()))
    return out


def dataset_log_likelihood(model, dataset: PreparedDataset, *, batch_size: int = 256,
                           device: DeviceName | str = "auto") -> np.ndarray:
    """Natural-log likelihood of each patient's record given its conditions, ``log P(R | c)``.

    In ``dataset.patients`` order. Records longer than the model's context are scored on their
    last ``n_ctx - 1`` visits, as in training. Raises :class:`IncompatibleModelError` when the
    dataset's vocabulary or groups differ from the model's.
    """
    model.check_compatible(dataset)
    dev = resolve_device(device)
    model.to(dev)
    enc = EncodedRecords.from_dataset(dataset, model.layout, model.config.n_ctx)
    return -_record_nll(model, enc, np.arange(len(enc)), batch_size=batch_size, device=dev)


# ---------------------------------------------------------------------- checkpoints (no pickle)
def _flatten_optimizer(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _save_checkpoint(path: Path, model, optimizer, best_state: dict, loop_state: dict) -> None:
    from safetensors.torch import save_file

    tensors, opt_meta = _flatten_optimizer(optimizer)
    with atomic_dir(path, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        save_file(best_state, str(tmp / BEST_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        write_json(tmp / STATE_FILE, {**loop_state, "optimizer": opt_meta})


# ---------------------------------------------------------------------- training
def _choose_n_ctx(options: TrainOptions, enc_lengths: np.ndarray) -> int:
    wanted = options.n_ctx or PRESETS[options.preset]["n_ctx"]
    return int(max(2, min(wanted, int(enc_lengths.max()) + 1)))


def _versions() -> dict[str, str]:
    import torch

    from . import __version__

    return {"halo_balance": __version__, "torch": torch.__version__, "python": platform.python_version()}


def train_model(dataset: PreparedDataset, *, out_dir: str | os.PathLike, options: TrainOptions | None = None,
                progress: bool = True):
    """Train a :class:`~halo_balance.model.HaloModel` on ``dataset`` and save it in ``out_dir``.

    Returns the model with the best validation epoch's weights (eval mode). ``out_dir`` receives
    the model files (``HaloModel.save_pretrained``), ``training.json`` (options, history, marginal
    baseline, versions) and ``checkpoint/``. Under ``torchrun`` every process calls this function.
    """
    from .cli import interrupt_note

    options = (options or TrainOptions()).validate()
    check_training_data(dataset, allow_synthetic=options.allow_synthetic)
    out_dir = check_model_dir(out_dir, resume=options.resume, overwrite=options.overwrite)
    dist_ctx = _init_distributed(options.device)
    try:
        trainer = _Trainer(dataset, out_dir, options, dist_ctx, progress)
        with interrupt_note(lambda: _kept_checkpoint(out_dir)):
            trainer.run()
        return trainer.finish()
    finally:
        if dist_ctx.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def check_training_data(dataset: PreparedDataset, *, allow_synthetic: bool) -> None:
    """Refuse training data that holds synthetic rows unless ``allow_synthetic``."""
    n_syn = int(dataset.patients["synthetic"].sum())
    if n_syn and not allow_synthetic:
        raise HaloBalanceError(
            f"the training data holds {n_syn} synthetic patients (of {dataset.n_patients}; an output of "
            "halo_balance.generate?): a generator trained on them learns from another generator's samples. "
            "Train on the real data, or pass --allow-synthetic (allow_synthetic=True) to use every row")


def check_model_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool,
                    inputs: Sequence[str | os.PathLike | None] = (), what: str = "model folder") -> Path:
    """Check, before any work, that a training can write ``out_dir`` (see ``--resume`` / ``--overwrite``).

    With ``resume`` the folder must hold a checkpoint; without it, an existing non-empty folder
    needs ``overwrite`` and is replaced only if this package wrote it.
    """
    out = Path(out_dir)
    if resume:
        if not (out / CHECKPOINT_DIR / STATE_FILE).is_file():
            raise HaloBalanceError(f"nothing to resume: {what} {out} holds no training checkpoint "
                                   f"({CHECKPOINT_DIR}/{STATE_FILE}); start without --resume")
        return check_output_dir(out, overwrite=True, inputs=inputs, what=what)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return check_output_dir(out, overwrite=True, inputs=inputs, what=what)  # an empty folder is used as is
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{what} {out} already exists; choose another path, "
                                "pass --resume to continue its training, or --overwrite")
    return check_output_dir(out, overwrite=overwrite, inputs=inputs, what=what)


def _kept_checkpoint(out_dir: Path) -> str | None:
    if (out_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
        state = read_json(out_dir / CHECKPOINT_DIR / STATE_FILE)
        return (f"the checkpoint of epoch {state.get('epoch')} is kept in {out_dir / CHECKPOINT_DIR}: "
                "re-run the same command with --resume to continue from it")
    return None


@dataclass
class _LoopState:
    """Everything the training loop needs to continue after a checkpoint (saved in ``state.json``)."""

    val_ids: list[str]
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_val: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    dp: dict[str, Any] | None = None  # the PrivacyPlan, its accountant history included


class _Trainer:
    """One training run: set-up (fresh or resumed), the epochs, checkpoints and the final model."""

    def __init__(self, dataset: PreparedDataset, out_dir: Path, options: TrainOptions, dist_ctx: _Dist,
                 progress: bool) -> None:
        import torch
        from safetensors.torch import load_file

        self.options, self.dist, self.out_dir = options, dist_ctx, out_dir
        self.ckpt_dir = out_dir / CHECKPOINT_DIR
        self.device = resolve_device(options.device, dist_ctx.local_rank)
        self.progress = progress and dist_ctx.main
        self.say = _printer(self.progress)
        model, self.loop = self._resumed(dataset) if options.resume else self._fresh(dataset)
        if options.resume and self.loop.dp and not options.private:
            raise HaloBalanceError("the checkpoint was trained with differential privacy; resume it with the same "
                                   "--dp-epsilon (and --dp-delta, --dp-max-grad-norm, --batch-size, --epochs)")
        ids = set(self.loop.val_ids)
        unknown = ids - set(dataset.patients["patient_id"].to_list())
        if unknown:
            raise HaloBalanceError(f"the checkpoint's validation patients are not in this dataset (e.g. "
                                   f"{sorted(unknown)[:3]}); resume with the dataset it was trained on")
        train_ds = dataset.select([i for i in dataset.patients["patient_id"].to_list() if i not in ids])
        if train_ds.n_patients == 0:
            raise HaloBalanceError("no training patients left after the validation split")
        if model is None:
            model = self._new_model(train_ds, dataset)
        # every patient given, validation ones included, for the copy rule of sample / generate
        model.record_counts = model.record_counts or RecordCounts.from_dataset(dataset)
        self.model, config = model, model.config
        self.train = EncodedRecords.from_dataset(train_ds, model.layout, config.n_ctx)
        self.val = (EncodedRecords.from_dataset(dataset.select(self.loop.val_ids), model.layout, config.n_ctx)
                    if self.loop.val_ids else None)
        marginal = MarginalModel.fit(self.train, config.vocab_size)
        self.plan = self._privacy_plan() if options.private else None
        if not options.resume and self.plan is None:  # start from the marginal-frequency model
            vis = self.train.visit_ids()
            empty_rate = float((self.train.code_ptr[vis + 1] == self.train.code_ptr[vis]).mean())
            model.init_output_biases(torch.from_numpy(marginal.code_frequency), marginal.end_rate, empty_rate)
        elif not options.resume:  # ... or from its private estimate (dp.py)
            stats = private_statistics(self.train, model.layout, config.vocab_size,
                                       noise_multiplier=self.plan.statistics_noise_multiplier,
                                       generator=np.random.default_rng(secrets.randbits(64)))
            model.init_output_biases(torch.from_numpy(stats.code_frequency), stats.end_rate)
            model.layout.cells = stats.cells
            for sigma, q, n in stats.history:
                self.plan.record(sigma, q, n)
        model.to(self.device)
        # "lr_scale": the group's multiple of the scheduled learning rate (see condition_lr_scale)
        table = None if model.cond_out is None else model.cond_out.weight
        decay = [p for p in model.parameters() if p.dim() >= 2 and p is not table]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": options.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
        if table is not None:
            groups.append({"params": [table], "weight_decay": options.weight_decay,
                           "lr_scale": options.condition_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=options.learning_rate, betas=(0.9, 0.95))
        if options.resume:
            if any("lr_scale" not in g for g in self._resume_meta["optimizer"]["param_groups"]):
                raise HaloBalanceError(f"{self.ckpt_dir} was written by an earlier version of halo_balance, whose "
                                       "optimiser this one cannot continue; train again without --resume")
            self.optimizer.load_state_dict(_unflatten_optimizer(
                load_file(self.ckpt_dir / OPTIMIZER_FILE, device=str(self.device)), self._resume_meta["optimizer"]))
            self.best_state = load_file(self.ckpt_dir / BEST_FILE)
            self.say(f"resuming after epoch {self.loop.epoch} (best loss {self.loop.best_val})")
        else:
            self.best_state = self._weights()
        self.net = model
        self.private = None
        if self.plan is not None:
            self.private = PrivateSteps(model, self.optimizer, self.plan, device=self.device)
        if dist_ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # as many training patients as validation ones, scored in eval mode like them: the gap
        n_fit = min(len(self.train), len(self.val) if self.val else 0)
        self.fit_rows = np.sort(np.random.default_rng([options.seed, 1]).choice(len(self.train), n_fit, replace=False))
        self.composition_gap = 0.0  # the two samples' own difference: the marginal model's gap between them
        if self.val is not None:
            val_m, fit_m = marginal.loss(self.val), marginal.loss(self.train.subset(self.fit_rows))
            self.composition_gap = (val_m - fit_m) / val_m
        # every record weighs the same in every batch: the sum of its NLL over a constant (a batch of
        # average records), never over the batch's own visit count, which would favour short records
        self.record_scale = options.batch_size * float(self.train.lengths.mean())
        self.summary = {
            "n_train": len(self.train), "n_val": len(self.val) if self.val else 0,
            "truncated_patients": self.train.n_truncated + (self.val.n_truncated if self.val else 0),
            "marginal_train_loss": marginal.loss(self.train),
            "marginal_val_loss": marginal.loss(self.val) if self.val else None}
        self._announce()

    def _privacy_plan(self) -> PrivacyPlan:
        """A calibrated plan, or the checkpoint's (its accountant continues) when resuming."""
        opts, n = self.options, len(self.train)
        if self.dist.world > 1:
            raise HaloBalanceError("differentially private training runs in one process; start it without torchrun")
        plan = PrivacyPlan.calibrate(target_epsilon=opts.dp_epsilon, delta=opts.dp_delta,
                                     max_grad_norm=opts.dp_max_grad_norm, accountant=opts.dp_accountant,
                                     n_records=n, batch_size=opts.batch_size, epochs=opts.epochs) \
            if not (opts.resume and self.loop.dp) else PrivacyPlan(**self.loop.dp)
        if opts.resume:
            if not self.loop.dp:
                raise HaloBalanceError("the checkpoint was trained without differential privacy; resume it without "
                                       "--dp-epsilon, or start a new private training")
            fresh = PrivacyPlan.calibrate(target_epsilon=opts.dp_epsilon, delta=opts.dp_delta,
                                          max_grad_norm=opts.dp_max_grad_norm, accountant=opts.dp_accountant,
                                          n_records=n, batch_size=opts.batch_size, epochs=opts.epochs)
            fields = ("target_epsilon", "delta", "max_grad_norm", "accountant", "n_records", "sample_rate",
                      "planned_steps")
            changed = [f"{f} {getattr(plan, f)} -> {getattr(fresh, f)}" for f in fields
                       if getattr(plan, f) != getattr(fresh, f)]
            if changed:
                raise HaloBalanceError("the checkpoint's noise was calibrated for other privacy settings ("
                                       + "; ".join(changed) + "); resume with the options it was started with")
        return plan

    # ------------------------------------------------------------------ set-up
    def _fresh(self, dataset: PreparedDataset) -> tuple[None, _LoopState]:
        out, opts = self.out_dir, self.options
        if out.exists() and any(out.iterdir()):  # checked by check_model_dir: ours, and overwrite was asked
            self.dist.barrier()  # every process has seen the old folder before it goes
            if self.dist.main:
                shutil.rmtree(out)
        self.dist.barrier()
        val_ids: list[str] = []
        if opts.validation_fraction > 0 and dataset.n_patients >= 2:
            val_ids = [str(x) for x in dataset.train_test_split(opts.validation_fraction, seed=opts.seed)[1]]
        return None, _LoopState(val_ids=val_ids)

    def _resumed(self, dataset: PreparedDataset):
        from .model import HaloModel

        if not (self.ckpt_dir / STATE_FILE).is_file():
            raise HaloBalanceError(f"nothing to resume: {self.ckpt_dir / STATE_FILE} not found; start without --resume")
        self._resume_meta = read_json(self.ckpt_dir / STATE_FILE)
        model = HaloModel.from_pretrained(self.ckpt_dir)
        model.check_compatible(dataset)
        names = {f.name for f in dataclasses.fields(_LoopState)}
        return model, _LoopState(**{k: v for k, v in self._resume_meta.items() if k in names})

    def _new_model(self, train_ds: PreparedDataset, dataset: PreparedDataset):
        import torch

        from .model import HaloModel

        opts = self.options
        # under DP the context is not fitted to the longest record (that would reveal its length), and
        # the model is the plain one: no structure read off the records, no modules dp.py cannot clip
        n_ctx = (opts.n_ctx or PRESETS[opts.preset]["n_ctx"]) if opts.private else \
            _choose_n_ctx(opts, train_ds.records().visit_counts())
        structure: dict[str, Any] = dict(PLAIN_STRUCTURE) if opts.private else {}
        if not opts.private:
            rec = dataset.records()  # training and validation visits: both must keep every group exclusive
            groups, dropped = exclusive_token_groups(dataset.vocab, rec.codes, rec.code_ptr)
            structure["exclusive_groups"] = groups
            if dropped:
                self.say(f"note: {len(dropped)} binned items occur twice in some visit and are modelled without "
                         f"exclusivity (e.g. {dropped[:3]})")
        config = HaloConfig.from_preset(opts.preset, vocab_size=train_ds.vocab_size, **structure,
                                        n_conditions=ConditionLayout.from_dataset(train_ds).n_slots,
                                        n_ctx=n_ctx, dropout=opts.dropout)
        torch.manual_seed(opts.seed)
        return HaloModel.for_dataset(train_ds, config)

    def _announce(self) -> None:
        c, s = self.model.config, self.summary
        if s["truncated_patients"]:
            self.say(f"note: {s['truncated_patients']} patients have more than {c.n_ctx - 1} visits; "
                     "their last n_ctx - 1 visits are used")
        self.say(f"{self.model.num_parameters():,} parameters ({c.preset}, V={c.vocab_size}, n_ctx={c.n_ctx}); "
                 f"{s['n_train']} training / {s['n_val']} validation patients on {self.device}"
                 + (f" x {self.dist.world} processes" if self.dist.world > 1 else "")
                 + f"; marginal-frequency loss {s['marginal_train_loss']:.3f} train"
                 + (f", {s['marginal_val_loss']:.3f} val" if self.val else "") + " nats/visit")
        if self.plan is not None:
            p = self.plan
            self.say(f"differential privacy: epsilon {p.target_epsilon:g}, delta {p.delta:.2g} ({p.accountant}); "
                     f"noise multiplier {p.noise_multiplier:.3f}, clipping norm {p.max_grad_norm:g}, Poisson "
                     f"samples of {p.expected_batch_size:.0f} expected patients, {p.planned_steps} steps"
                     + (f"; the {s['n_val']} validation patients are NOT protected" if self.val else ""))

    def _weights(self) -> dict[str, Any]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        loop, opts = self.loop, self.options
        for epoch in range(loop.epoch + 1, opts.epochs + 1):
            if loop.bad_epochs >= opts.patience:
                break
            t0 = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            val_loss = self._validate()
            # the training patients' loss is no DP output: not computed under DP
            fit_loss = self._validate(self.fit_rows) if val_loss is not None and self.plan is None else None
            gap = None if fit_loss is None else (val_loss - fit_loss) / val_loss - self.composition_gap
            seconds = time.perf_counter() - t0
            score = val_loss if val_loss is not None else train_loss
            # a model that fits its training patients much better than new ones gives them away (the
            # gap reads training patients: not under DP, where without validation patients nothing
            # selects among epochs and the last one is kept)
            admissible = (epoch == 1 or gap is None or not opts.max_gap or gap <= opts.max_gap or self.plan is not None)
            improved = admissible and (loop.best_val is None or score < loop.best_val
                                       or (self.plan is not None and self.val is None))
            if improved:
                loop.best_val, loop.best_epoch, loop.bad_epochs = score, epoch, 0
                self.best_state = self._weights()
            else:
                loop.bad_epochs += 1
            loop.epoch = epoch
            loop.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "fit_loss": fit_loss, "gap": gap, "seconds": seconds,
                                 "patients_per_s": len(self.train) / seconds})
            stopped = loop.bad_epochs >= opts.patience
            self.say(f"epoch {epoch}: train {train_loss:.4f}"
                     + (f"  val {val_loss:.4f}" if val_loss is not None else "")
                     + (f"  gap {gap:.3f}" if gap is not None else "")
                     + f"  {len(self.train) / seconds:,.0f} patients/s" + ("  *best*" if improved else "")
                     + ("  (early stop)" if stopped else ""))
            if self.plan is not None:
                loop.dp = self.plan.to_dict()
            if self.dist.main:
                _save_checkpoint(self.ckpt_dir, self.model, self.optimizer, self.best_state,
                                 {**dataclasses.asdict(loop), "options": dataclasses.asdict(opts)})
            self.dist.barrier()

    def _train_epoch(self, epoch: int) -> float:
        import torch

        opts, dist_ctx = self.options, self.dist
        torch.manual_seed(opts.seed + 7919 * epoch + dist_ctx.rank)  # dropout: reproducible on resume
        batches = self._batches(epoch)
        self.net.train()
        nll = visits = 0.0
        bar = _bar(batches, self.progress, f"epoch {epoch}/{opts.epochs}")
        for rows in bar:
            lr = opts.learning_rate * min(1.0, (self.loop.step + 1) / max(opts.warmup_steps, 1))
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            if self.private is not None:
                step_nll, step_visits = self.private.step(self.train, rows, autocast=lambda: _autocast(self.device))
                self.loop.step += 1
                nll, visits = nll + step_nll, visits + step_visits
                continue
            with _autocast(self.device):
                out = self.net(collate(self.train, rows).to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            (out.record_nll.sum() / self.record_scale).backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.grad_clip)
            self.optimizer.step()
            self.loop.step += 1
            nll += float(out.code_nll + out.end_nll)
            visits += out.n_visits
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{out.loss.item():.3f}")
        nll, visits = dist_ctx.sum([nll, visits])
        return nll / max(visits, 1)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """This process's batches of an epoch (every process takes the same number: wrap around)."""
        if self.private is not None:  # Poisson samples of patients (secret randomness, see dp.py)
            batches = list(self.private.batches())
        else:
            batches = bucket_batches(self.train.lengths, self.options.batch_size,
                                     np.random.default_rng([self.options.seed, epoch]))
        if self.dist.world > 1:
            total = len(batches) + (-len(batches) % self.dist.world)
            batches = [batches[i % len(batches)] for i in range(self.dist.rank, total, self.dist.world)]
        return batches

    def _refit_conditions(self, max_epochs: int = 10) -> dict[str, Any]:
        """Fit the outcome x group embeddings (``model.cond_out``) alone, the rest of the chosen model
        fixed, by maximum likelihood on the training patients: an epoch is kept while it lowers the
        validation loss within the gap limit. They carry what sets a small cell apart and are the
        slowest part to learn; the rest would overfit long before they settle."""
        import torch

        model, opts = self.model, self.options
        table = model.cond_out.weight
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in flags:
            p.requires_grad_(p is table)
        optimizer = torch.optim.Adam([table], lr=opts.learning_rate * opts.condition_lr_scale)
        model.eval()  # no dropout: the rest of the model is fixed
        best_val, best = self._validate(), table.detach().clone()
        history = []
        for epoch in range(1, max_epochs + 1):
            for rows in self._batches(10_000 + epoch):
                with _autocast(self.device):
                    out = model(collate(self.train, rows).to(self.device))
                optimizer.zero_grad(set_to_none=True)
                (out.record_nll.sum() / self.record_scale).backward()
                if self.dist.world > 1:
                    import torch.distributed as dist

                    dist.all_reduce(table.grad)
                    table.grad /= self.dist.world
                optimizer.step()
            val = self._validate()
            gap = (val - self._validate(self.fit_rows)) / val - self.composition_gap
            history.append({"epoch": epoch, "val_loss": val, "gap": gap})
            if val >= best_val or (opts.max_gap and gap > opts.max_gap):
                break
            best_val, best = val, table.detach().clone()
        with torch.no_grad():
            table.copy_(best)
        for p, flag in flags:
            p.requires_grad_(flag)
        return {"history": history, "val_loss": best_val}

    def _validate(self, fit_rows: np.ndarray | None = None) -> float | None:
        """NLL per visit of the validation patients, or (``fit_rows``) of those training patients."""
        if self.val is None:
            return None
        enc, rows = (self.val, np.arange(len(self.val))) if fit_rows is None else (self.train, fit_rows)
        shard = rows[self.dist.rank::self.dist.world]
        nll = _record_nll(self.model, enc, shard, batch_size=max(self.options.batch_size, 256), device=self.device)
        total, visits = self.dist.sum([nll.sum(), enc.lengths[shard].sum()])
        return total / max(visits, 1)

    def finish(self):
        """Load the best weights, write the model and ``training.json`` (rank 0), return the model."""
        loop, model = self.loop, self.model
        model.load_state_dict({k: v.to(self.device) for k, v in self.best_state.items()})
        # the refits fit the training patients without noise: never under DP
        if self.options.refit_conditions and model.cond_out is not None and self.val is not None:
            self.summary["condition_refit"] = self._refit_conditions()
        if self.options.refit_biases and self.plan is None:
            shard = np.arange(len(self.train))[self.dist.rank::self.dist.world]
            # every process counts the candidate pairs over all training patients: the same pairs
            self.summary["bias_refit"] = refit_output_biases(
                model, self.train, shard, batch_size=max(self.options.batch_size, 256), device=self.device,
                reduce=self.dist.sum if self.dist.world > 1 else None,
                **term_arguments(self.options, model, self.train, np.arange(len(self.train))))
            if self.val is not None:
                self.summary["bias_refit"]["val_loss"] = self._validate()
        model.eval()
        privacy = self.plan.summary(unprotected_patients=len(loop.val_ids)) if self.plan is not None else None
        model.privacy = privacy
        if self.dist.main:
            model.save_pretrained(self.out_dir)
            write_json(self.out_dir / TRAINING_FILE, {
                "options": dataclasses.asdict(self.options), "config": model.config.to_dict(), **self.summary,
                "best_epoch": loop.best_epoch, "best_loss": loop.best_val, "loss_unit": "nats per visit",
                "early_stopped": loop.bad_epochs >= self.options.patience, "history": loop.history,
                "world_size": self.dist.world, "device": str(self.device), "n_parameters": model.num_parameters(),
                "generator_version": GENERATOR_VERSION, "versions": _versions(),
                # patients held out for early stopping: evaluation must not count them as members
                "validation_patient_ids": sorted(loop.val_ids), "dp": privacy})
            if loop.best_val is not None:
                self.say(f"saved the model of epoch {loop.best_epoch} (loss {loop.best_val:.4f} nats/visit"
                         + (f"; marginal-frequency model {self.summary['marginal_val_loss']:.4f}" if self.val else "")
                         + f") to {self.out_dir}")
            if privacy is not None:
                self.say(f"privacy spent: epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:.2g} "
                         f"({privacy['steps']} DP-SGD steps, {privacy['accountant']} accountant)")
        self.dist.barrier()
        return model


def _printer(enabled: bool):
    def say(msg: str) -> None:
        if enabled:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
    return say


def _bar(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False, unit="batch", file=sys.stderr)


# ---------------------------------------------------------------------- command line
def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training flags (every :class:`TrainOptions` field but ``overwrite`` and
    ``allow_synthetic``) to ``parser``."""
    d = TrainOptions()
    g = parser.add_argument_group("training")
    g.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="model size (default %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="patients per step (default %(default)s)")
    g.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: the preset's, " + ", ".join(f"{k} {v:g}" for k, v in PRESET_LR.items()) + ")")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without a better validation loss before stopping (default %(default)s)")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="patients held out for validation (default 0.1; 0 with --dp-epsilon)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="default %(default)s")
    g.add_argument("--seed", type=int, default=d.seed, help="default %(default)s")
    g.add_argument("--resume", action="store_true", help="continue the training from MODEL_DIR/checkpoint")
    g.add_argument("--n-ctx", type=int, default=None,
                   help="context length in visits incl. the conditioning visit (default: the preset's)")
    g.add_argument("--dropout", type=float, default=None, help="default: the preset's")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="default %(default)s (0: no clipping)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="default %(default)s")
    g.add_argument("--max-gap", type=float, default=d.max_gap,
                   help="only epochs whose relative train/validation NLL gap is at most this may be chosen "
                        "(default %(default)s; 0: no limit)")
    g.add_argument("--condition-lr-scale", type=float, default=d.condition_lr_scale,
                   help="learning-rate multiple of the outcome x group embeddings (default %(default)s)")
    g.add_argument("--refit-conditions", action=argparse.BooleanOptionalAction, default=d.refit_conditions,
                   help="after training, go on fitting the outcome x group embeddings alone")
    g.add_argument("--refit-biases", action=argparse.BooleanOptionalAction, default=d.refit_biases,
                   help="refit the code and end biases on the training patients after training")
    g.add_argument("--pair-min-patients", type=int, default=d.pair_min_patients, metavar="N",
                   help="with the bias refit, fit pair terms for code pairs at least N training patients hold "
                        "together in a visit (default %(default)s; 0: none)")
    g.add_argument("--cell-min-patients", type=int, default=d.cell_min_patients, metavar="N",
                   help="with the bias refit, fit cell terms: per outcome x group crossing, a logit for each code at "
                        "least N of its training patients hold (default %(default)s; 0: none)")
    for kind, what in (("pair", "pairs whose co-occurrence"), ("cell", "codes whose rate in their crossing")):
        g.add_argument(f"--{kind}-min-score", type=float, default=getattr(d, f"{kind}_min_score"), metavar="Z",
                       help=f"of those, only the {what} the model misses by at least Z standard errors get a "
                            "term (default %(default)s)")
        g.add_argument(f"--{kind}-max-fdr", type=float, default=getattr(d, f"{kind}_max_fdr"), metavar="Q",
                       help="and only those significant at false discovery rate Q over all candidates "
                            "(Benjamini-Hochberg; default %(default)s; 1: no control)")
        g.add_argument(f"--{kind}-shrinkage", type=float, default=getattr(d, f"{kind}_shrinkage"),
                       help=f"penalty on each {kind} term, in observations (default %(default)s)")
    p = parser.add_argument_group("differential privacy (DP-SGD; the unit of privacy is the patient)")
    p.add_argument("--dp-epsilon", type=float, default=None, metavar="EPS",
                   help="train (EPS, delta)-differentially private (default: no DP)")
    p.add_argument("--dp-delta", type=float, default=None, metavar="D",
                   help="delta (default: 1e-5 or 1/(10 N), whichever is smaller)")
    p.add_argument("--dp-max-grad-norm", type=float, default=d.dp_max_grad_norm, metavar="C",
                   help="per-patient gradient clipping norm (default %(default)s)")
    p.add_argument("--dp-accountant", choices=["rdp", "prv"], default=d.dp_accountant,
                   help="Opacus privacy accountant (default %(default)s)")
    return parser


def train_options_from_args(args: argparse.Namespace) -> TrainOptions:
    """The :class:`TrainOptions` of parsed :func:`add_train_arguments` flags."""
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in vars(args).items() if k in names}).validate()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m halo_balance.train",
                                     description="Train a conditional HALO model on a prepared dataset.")
    parser.add_argument("--data", required=True, help="prepared dataset folder")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing model folder (only one this package wrote)")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="train on rows flagged synthetic too (refused by default)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    options = train_options_from_args(args)
    check_model_dir(args.out, resume=options.resume, overwrite=options.overwrite, inputs=[args.data], what="--out")
    dataset = PreparedDataset.load(args.data)
    check_training_data(dataset, allow_synthetic=options.allow_synthetic)
    train_model(dataset, out_dir=args.out, options=options, progress=not args.quiet)


if __name__ == "__main__":
    from .cli import run

    run(main)
