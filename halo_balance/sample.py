"""Draw synthetic patient records from a trained model, exactly and fast.

``python -m halo_balance.sample --model MODEL_DIR --out DIR --count N --condition "label=1,gender=F"``
``[--shards N [--shard-index I] [--backend local|ray] [--ray-address auto|HOST:PORT|local]]``

Each ``--condition`` gets N records. Copies of training records held by fewer than ``--copy-k``
training patients are rejected and re-drawn (``copies.py``; the model folder's
``record_counts.parquet``), copies of records that at least that many patients share are kept, and
both are counted, unless ``--allow-copies``. Attributes a condition leaves out (``label`` included) are
drawn jointly from the training patients' (outcome x groups) cell frequencies stored with the
model, restricted to the cells that match the given values (:meth:`ConditionLayout.complete`);
without ``--condition`` every attribute is drawn that way.

The sampler (:func:`sample_records`) draws from the model's distribution exactly (``model.py``):

- records are batched, and one batch may mix conditions;
- the coarse transformer keeps a KV cache, so each new visit costs one incremental step;
- records that drew "end" leave the batch (and the cache) at once;
- within a visit every record advances its own pointer: at each pass it draws the first code after
  its last one (after the last one's exclusive group, see ``model.py``), or "stop", from the exact
  distribution of the per-code Bernoulli chain (an exponential waiting time on the cumulated
  hazard and a binary search per record), so a visit costs max(codes per visit) + 1 fine passes
  over the still-sampling records; with pair terms (``model.py``) each record also carries the sum
  of the terms its visit's codes so far add to the later codes' logits;
- nothing is rejected or reweighted: an empty visit, the first one included, is drawn as often as
  the model gives it (real records hold them: 4.6% of the eICU demo's first stays have no token);
- a record never exceeds the trained context (``n_ctx - 1`` visits; the end is forced there).

:func:`reference_sample_records` is the plain sampler, kept to check this one: the whole prefix
re-run for every visit, one pointer shared across the batch (one fine pass per code position any
record samples), Bernoulli draws and finished records still computed. Both give the same
distribution.

Large requests are split into shards (:func:`sample_shards`, ``--shards N``): contiguous runs of
whole batches, run one after another here, as tasks on a Ray cluster (``--backend ray``,
:mod:`halo_balance.distributed`) or as separate processes (``--shard-index I``, one shard each,
ids as in the whole request; ``PreparedDataset.concat`` joins them in shard order). Every batch
draws from its own generator, seeded from the run's seed and the batch's index in the whole
request (:func:`batch_seed`), so the records are the same for any number of shards or workers.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from .config import parse_condition
from .copies import (RECORD_COUNTS_FILE, CopyFilter, add_copy_arguments, check_copy_arguments, describe_copies,
                     draw_without_copies)
from .data import PreparedDataset, empty_meta
from .distributed import BACKENDS, RAY_INSTALL, BackendName
from .errors import HaloBalanceError, unknown_choice
from .io import check_output_dir
from .train import DeviceName, _bar, _ranges, _versions, resolve_device


# ---------------------------------------------------------------------- the fast sampler
def sample_visits(fine, h, generator, position: int = 0, offset=None):
    """One visit for each of the B coarse states ``h``: ``(codes int64, code_ptr (B+1,))``.

    With an empty-visit event (``config.empty_visit_event``) it is drawn first (``position``: of
    the states, 0 before the first visit), and a visit that is not empty draws its first code
    conditioned on there being one. Every record advances its own pointer. Under its current
    state, a record's next code is the first success of the Bernoulli chain after its pointer (its
    last code, or the end of that code's exclusive group: the codes between have probability 0). With
    ``c_i = sum_{j <= i} -log(1 - p_j)`` (non-decreasing), P(no success in (pointer, i]) =
    exp(-(c_i - c_pointer)), so the first success is the first i with ``c_i >= c_pointer + E``,
    E ~ Exponential(1): one draw and a binary search per record and pass; none such i means
    "stop" and the record leaves the loop. Logits are computed from the smallest pointer of the
    batch on only. ``offset`` ``(B, V)``: the records' cell terms (``HaloModel.code_offsets``).
    """
    import torch
    import torch.nn.functional as F

    B, dev = h.shape[0], h.device
    V = fine.out.out_features
    ids = torch.arange(B, device=dev)  # the records still drawing codes, and their ...
    nonempty = fine.empty_head is not None  # the visits to draw hold at least one code
    if nonempty:  # the empty-visit event first; a visit drawn empty takes no code
        empty = torch.rand(B, generator=generator, device=dev) < torch.sigmoid(fine.empty_logit(h, position))
        ids = (~empty).nonzero().squeeze(1)
    z = fine.proj(h[ids])  # ... pre-states P h + b_P + (sum of the embeddings of their codes so far)
    last = torch.full((len(ids),), -1, dtype=torch.long, device=dev)  # ... and pointers
    # ... and what their cell and the pair terms of their codes so far add to each logit
    pairs = fine.pair_index is not None
    carry = pairs or offset is not None
    added = offset[ids].float() if offset is not None else torch.zeros(len(ids), V if pairs else 0, device=dev)
    picked_rec, picked_code = [], []
    while ids.numel():
        lo = max(int(last.min()), 0)  # columns from the smallest pointer on
        logits = F.linear(fine.state(z), fine.out.weight[lo:], fine.out.bias[lo:]).float()
        hazard = F.softplus(logits + added[:, lo:] if carry else logits)
        cum = F.pad(hazard.cumsum(1), (1, 0))  # cum[:, q] = c_{lo+q-1} - c_{lo-1}
        at = (last + 1 - lo)[:, None]  # the pointer's column in cum (-1: column 0, nothing yet)
        if nonempty:  # first pass of a visit that holds a code: E conditioned on E < c_{V-1}
            total = cum[:, -1:]
            u = torch.rand(total.shape, generator=generator, device=dev)
            wait = torch.minimum(-torch.log1p(u * torch.expm1(-total)), total)
            nonempty = False
        else:
            wait = torch.empty(at.shape, dtype=cum.dtype, device=dev).exponential_(generator=generator)
        column = torch.maximum(torch.searchsorted(cum, cum.gather(1, at) + wait), at + 1)  # a wait lost
        # to rounding still moves past the pointer
        pick = column.squeeze(1) - 1 + lo
        picked_rec.append(ids)
        picked_code.append(pick)  # pick >= V: "stop"
        pointer = fine.skip[pick.clamp(max=V - 1)]
        keep = (pick < V) & (pointer < V - 1)  # "stop", or nothing left after it: the visit is complete
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            ids, pick, pointer, z, added = ids[idx], pick[idx], pointer[idx], z[idx], added[idx]
        last = pointer
        z = z + fine.token_emb(pick)
        if pairs:
            added = fine.add_pair_terms(added, torch.arange(len(pick), device=dev), pick)
    none = torch.zeros(0, dtype=torch.long, device=dev)  # every visit may have been drawn empty
    rec, codes = torch.cat([none, *picked_rec]), torch.cat([none, *picked_code])
    rec, codes = rec[codes < V], codes[codes < V]
    order = torch.sort(rec, stable=True).indices  # passes are in code order, so codes stay sorted
    ptr = torch.zeros(B + 1, dtype=torch.long, device=dev)
    ptr[1:] = torch.bincount(rec, minlength=B).cumsum(0)
    return codes[order], ptr


def _sample_batch(model, cond, generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records for the condition slot ids ``cond`` (B, A): ``(visit_ptr, code_ptr, codes)`` arrays."""
    import torch

    n_ctx = model.config.n_ctx
    cache = model.new_cache(cond.shape[0], device=cond.device)
    h = model.step(model.condition_input(cond), cache, cond)
    alive, cond_alive, offset = torch.arange(cond.shape[0], device=cond.device), cond, model.code_offsets(cond)
    steps = []
    for t in range(n_ctx - 1):
        if t > 0:  # a record has at least one visit; afterwards "end" is a learned event
            end = torch.rand(alive.numel(), generator=generator, device=cond.device) < torch.sigmoid(
                model.end_logit(h, t).float())
            if end.any():
                keep = (~end).nonzero().squeeze(1)
                alive, h, cond_alive = alive[keep], h[keep], cond_alive[keep]
                offset = offset[keep] if offset is not None else None
                cache.keep(keep)
                if not alive.numel():
                    break
        codes, ptr = sample_visits(model.fine, h, generator, t, offset)
        steps.append((alive.cpu().numpy(), codes.cpu().numpy(), ptr.cpu().numpy()))
        if t < n_ctx - 2:  # no state is needed after the last visit the context allows
            h = model.step(model.visit_input(codes, ptr[:-1]), cache, cond_alive)
    return _assemble(cond.shape[0], steps)


def _assemble(n_records: int, steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Per-step (owner, codes, ptr) visits -> record-major ragged arrays."""
    owners = np.concatenate([s[0] for s in steps])
    lengths = np.concatenate([np.diff(s[2]) for s in steps])
    starts = np.concatenate([s[2][:-1] + off for s, off in
                             zip(steps, np.cumsum([0] + [len(s[1]) for s in steps[:-1]]))])
    flat = np.concatenate([s[1] for s in steps])
    order = np.argsort(owners, kind="stable")  # steps are chronological: visits stay in order
    lengths, starts = lengths[order], starts[order]
    codes = flat[_ranges(starts, lengths)].astype(np.int32)
    code_ptr = np.concatenate([[0], np.cumsum(lengths)])
    visit_ptr = np.concatenate([[0], np.cumsum(np.bincount(owners, minlength=n_records))])
    return visit_ptr, code_ptr, codes


def sample_records(model, conditions: pl.DataFrame, *, batch_size: int = 256, seed: int = 0,
                   device: DeviceName | str = "auto", id_prefix: str = "syn", progress: bool = True,
                   first_row: int = 0) -> PreparedDataset:
    """Draw one synthetic record per row of ``conditions``.

    Parameters
    ----------
    model : HaloModel
    conditions : polars.DataFrame
        One row per record: ``label`` (0/1) and every group attribute of the model
        (see :meth:`halo_balance.config.ConditionLayout.complete` to fill some from training).
    batch_size : int
        Records sampled together (rows of different conditions share batches).
    seed : int
        The same model, conditions, batch size, seed and device give the same records. Batch b
        (rows ``b * batch_size`` on) draws from its own generator, seeded by :func:`batch_seed`
        from ``seed`` and b, so a batch's records do not depend on the batches before it.
    device : {"auto", "cpu", "cuda"}
    id_prefix : str
        Patient ids are ``f"{id_prefix}-{seed}-{i}"``, i the row of ``conditions`` (+ ``first_row``).
    progress : bool
    first_row : int
        The position of ``conditions``' first row in a larger request, a multiple of
        ``batch_size``: a shard of that request (:func:`shard_rows`) then draws exactly the records
        the whole request draws for its rows, with the same ids.

    Returns
    -------
    PreparedDataset
        The prepared format: every row ``synthetic=True``, the conditions as the patients'
        ``label`` and group columns, the model's vocabulary and its training data's metadata.
    """
    return _sample(model, conditions, batch_size=batch_size, seed=seed, device=device, id_prefix=id_prefix,
                   progress=progress, batch_fn=_sample_batch, sampler="cached, per-record pointer",
                   first_row=first_row)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a request sampled with ``seed`` (independent streams per batch)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0])


def shard_rows(n_records: int, *, batch_size: int, shards: int, index: int) -> range:
    """The rows of shard ``index`` of ``shards``: a contiguous run of whole batches, the batches
    split as evenly as possible (a shard may be empty when there are fewer batches than shards)."""
    if shards < 1 or not 0 <= index < shards:
        raise HaloBalanceError(f"shard index {index} of {shards} shards: pass 0 <= --shard-index < --shards")
    n_batches = -(-n_records // batch_size)
    first, last = index * n_batches // shards, (index + 1) * n_batches // shards
    return range(min(first * batch_size, n_records), min(last * batch_size, n_records))


def _sample(model, conditions: pl.DataFrame, *, batch_size: int, seed: int, device, id_prefix: str,
            progress: bool, batch_fn, sampler: str, first_row: int = 0) -> PreparedDataset:
    import torch

    if batch_size < 1:
        raise HaloBalanceError(f"batch_size must be >= 1 (got {batch_size})")
    if first_row < 0 or first_row % batch_size:
        raise HaloBalanceError(f"first_row must be a multiple of batch_size {batch_size} (got {first_row})")
    cond = model.layout.encode(conditions)
    dev = resolve_device(device)
    model.to(dev).eval()
    parts = []
    with torch.inference_mode():
        for i in _bar(range(0, len(cond), batch_size), progress, "sampling"):
            generator = torch.Generator(device=dev).manual_seed(batch_seed(seed, (first_row + i) // batch_size))
            parts.append(batch_fn(model, torch.from_numpy(cond[i:i + batch_size]).to(dev), generator))
    visit_ptr, code_ptr, codes = _concat_ragged(parts)
    attrs = model.layout.attributes
    groups = conditions.select([pl.col(a).cast(pl.String) for a in attrs]) if attrs else pl.DataFrame()
    meta = _output_meta(model, {"sampler": sampler, "seed": seed, "batch_size": batch_size,
                                "n_records": len(cond), "first_row": first_row, "id_prefix": id_prefix,
                                "versions": _versions(), "model_config": model.config.to_dict(),
                                "model_privacy": model.privacy})
    return PreparedDataset.from_arrays(
        patient_ids=[f"{id_prefix}-{seed}-{first_row + i}" for i in range(len(cond))],
        labels=cond[:, 0].astype(np.int8),
        groups=groups, visit_ptr=visit_ptr, code_ptr=code_ptr, codes=codes, vocab=_vocab(model),
        meta=meta, synthetic=True)


def sample_shards(model, conditions: pl.DataFrame, *, shards: int, backend: BackendName = "local",
                  ray_address: str = "auto", gpus: float | None = None, batch_size: int = 256, seed: int = 0,
                  device: DeviceName | str = "auto", id_prefix: str = "syn", progress: bool = True) -> PreparedDataset:
    """:func:`sample_records` split into ``shards`` shards of whole batches (:func:`shard_rows`),
    run one after another here (``backend="local"``) or as parallel tasks on a Ray cluster
    (``"ray"``: ``ray_address``; ``gpus`` per task, default one where the cluster has GPUs).

    Every batch is seeded from ``seed`` and its index in the whole request, so the records are
    those of ``sample_records(model, conditions, ...)`` for any number of shards or workers.
    """
    if shards < 1:
        raise HaloBalanceError(f"--shards must be >= 1 (got {shards})")
    if batch_size < 1:
        raise HaloBalanceError(f"batch_size must be >= 1 (got {batch_size})")
    rows = [r for i in range(shards) if len(r := shard_rows(len(conditions), batch_size=batch_size, shards=shards,
                                                                 index=i))]
    options = {"batch_size": batch_size, "seed": seed, "device": device, "id_prefix": id_prefix}
    if backend == "local":
        parts = [_sample_shard(model, conditions, r.start, r.stop, options)
                 for r in _bar(rows, progress and len(rows) > 1, "shards")]
    elif backend == "ray":
        from .distributed import TASK_RETRIES, gather, ray_session, resolve_gpus

        with ray_session(ray_address) as ray:
            task = ray.remote(_sample_shard).options(num_cpus=1, num_gpus=resolve_gpus(ray, gpus),
                                                     max_retries=TASK_RETRIES)
            device = next(model.parameters()).device
            try:  # ray.put serialises at once: the caller's model goes back to its device
                model_ref, cond_ref = ray.put(model.cpu()), ray.put(conditions)
            finally:
                model.to(device)
            from tqdm import tqdm

            with tqdm(total=len(rows), desc="shards", disable=not progress, leave=False, file=sys.stderr) as bar:
                parts = gather(ray, [task.remote(model_ref, cond_ref, r.start, r.stop, options) for r in rows],
                               on_done=lambda i, part: bar.update(1))
    else:
        raise unknown_choice("--backend", [backend], BACKENDS)
    out = PreparedDataset.concat(parts) if parts else sample_records(model, conditions, progress=False, **options)
    out.meta["generation"].update(n_records=len(conditions), first_row=0, shards=shards)
    return out


def _sample_shard(model, conditions: pl.DataFrame, start: int, stop: int, options: dict[str, Any]) -> PreparedDataset:
    return sample_records(model, conditions[start:stop], first_row=start, progress=False, **options)


def _concat_ragged(parts):
    visit_ptr, code_ptr, codes = [np.zeros(1, dtype=np.int64)], [np.zeros(1, dtype=np.int64)], []
    for vp, cp, c in parts:
        visit_ptr.append(vp[1:] + visit_ptr[-1][-1])
        code_ptr.append(cp[1:] + code_ptr[-1][-1])
        codes.append(c)
    return (np.concatenate(visit_ptr), np.concatenate(code_ptr),
            np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32))


def _vocab(model) -> pl.DataFrame:
    if model.vocab is not None:
        return model.vocab
    V = model.config.vocab_size
    return pl.DataFrame({"id": pl.Series(range(V), dtype=pl.Int32), "token": [f"token{i}" for i in range(V)],
                         "kind": ["unknown"] * V, "description": [""] * V})


def _output_meta(model, generation: dict[str, Any]) -> dict[str, Any]:
    meta = copy.deepcopy(model.dataset_meta) or empty_meta(source="halo_balance.sample", groups=model.layout.groups)
    meta["groups"] = copy.deepcopy(model.layout.groups)
    meta["outcome"] = model.layout.outcome
    meta["counts"] = {"dropped": {}}
    meta["generation"] = generation
    return meta


# ---------------------------------------------------------------------- the plain reference sampler
def _reference_visits(fine, h, generator, offset=None):
    """Multi-hot visits ``(B, V)`` with one pointer shared by the batch: one pass per code position
    any record samples; each pass draws Bernoulli bits for every record under its current state
    (none for the codes an exclusive group has ruled out for that record); ``offset``: the cell terms."""
    import torch

    B, V = h.shape[0], fine.out.out_features
    base = fine.proj(h)
    summary = torch.zeros_like(base)
    # the cell terms and the pair terms of the codes taken so far
    added = offset.float().clone() if offset is not None else torch.zeros(B, V, device=h.device)
    x = torch.zeros(B, V, dtype=torch.bool, device=h.device)
    ruled_out = torch.full((B, 1), -1, dtype=torch.long, device=h.device)  # codes <= this are closed
    column = torch.arange(V, device=h.device)
    i = 0
    while i < V:
        probs = torch.sigmoid(fine.out(fine.state(base + summary)).float() + added)
        draws = torch.rand(B, V, generator=generator, device=h.device) < probs
        draws[:, :i] = False
        draws &= column > ruled_out
        hit = draws.any(0).nonzero()
        if not hit.numel():
            break
        p = int(hit[0, 0])
        took = draws[:, p]
        x[:, p] = took
        summary[took] += fine.token_emb.weight[p]
        if fine.pair_index is not None:
            rows = took.nonzero().squeeze(1)
            added = fine.add_pair_terms(added, rows, torch.full_like(rows, p))
        ruled_out[took] = int(fine.skip[p])
        i = p + 1
    return x


def _reference_batch(model, cond, generator):
    import torch

    B, dev, n_ctx = cond.shape[0], cond.device, model.config.n_ctx
    offset = model.code_offsets(cond)
    visits: list[list[np.ndarray]] = [[] for _ in range(B)]
    ended = torch.zeros(B, dtype=torch.bool, device=dev)
    empty = np.zeros(0, np.int64)
    for t in range(n_ctx - 1):
        # the whole prefix, every time; finished records stay in the batch and are computed too
        bags = [visits[b][j] if j < len(visits[b]) else empty for b in range(B) for j in range(t)]
        lengths = torch.tensor([len(v) for v in bags], dtype=torch.long)
        offsets = (torch.cumsum(lengths, 0) - lengths).to(dev)
        codes = torch.from_numpy(np.concatenate(bags) if bags else empty).long().to(dev)
        h = model.hidden_states(cond, codes, offsets, t + 1)[:, t]
        if t > 0:
            ended |= torch.rand(B, generator=generator, device=dev) < torch.sigmoid(model.end_logit(h, t).float())
            if ended.all():
                break
        x = _reference_visits(model.fine, h, generator, offset)
        if model.fine.empty_head is not None:  # the empty-visit event, then rejection of empty chains
            empty = torch.rand(B, generator=generator, device=dev) < torch.sigmoid(model.fine.empty_logit(h, t))
            while (redo := ~empty & ~x.any(1)).any():
                x[redo] = _reference_visits(model.fine, h[redo], generator, None if offset is None else offset[redo])
            x[empty] = False
        for b in np.flatnonzero(~ended.cpu().numpy()):
            visits[b].append(x[b].nonzero().squeeze(1).cpu().numpy())
    return _records_to_ragged(visits)


def _records_to_ragged(records: list[list[np.ndarray]]):
    visit_ptr = np.concatenate([[0], np.cumsum([len(r) for r in records])])
    flat = [v for r in records for v in r]
    code_ptr = np.concatenate([[0], np.cumsum([len(v) for v in flat])])
    codes = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, np.int32)
    return visit_ptr, code_ptr, codes


def reference_sample_records(model, conditions: pl.DataFrame, *, batch_size: int = 256, seed: int = 0,
                             device: DeviceName | str = "auto", id_prefix: str = "ref",
                             progress: bool = False) -> PreparedDataset:
    """The plain reference sampler (module docstring); same distribution, same output format."""
    return _sample(model, conditions, batch_size=batch_size, seed=seed, device=device, id_prefix=id_prefix,
                   progress=progress, batch_fn=_reference_batch, sampler="reference: prefix re-run, shared pointer")


# ---------------------------------------------------------------------- command line
def add_shard_arguments(parser: argparse.ArgumentParser, *, shard_index: bool = True) -> None:
    """The sharding flags of ``sample`` (and, without ``--shard-index``, of ``generate``)."""
    g = parser.add_argument_group("sharding (large requests; the records do not depend on the shards)")
    g.add_argument("--shards", type=int, default=1,
                   help="split the sampling into this many shards of whole batches (default %(default)s)")
    if shard_index:
        g.add_argument("--shard-index", type=int, default=None, metavar="I",
                       help="sample shard I (0-based) alone, e.g. as one of several processes; OUT then holds "
                            "that shard's records, with their ids in the whole request")
    g.add_argument("--backend", choices=BACKENDS, default="local",
                   help="run the shards here one after another, or as parallel tasks on a Ray cluster "
                        f"(needs {RAY_INSTALL}; default %(default)s)")
    g.add_argument("--ray-address", default="auto",
                   help="the Ray cluster: auto, HOST:PORT or local (default %(default)s)")
    g.add_argument("--gpus-per-shard", type=float, default=None,
                   help="GPUs each Ray task asks for (default: 1 where the cluster has GPUs, else 0)")


def check_shard_arguments(args: argparse.Namespace) -> None:
    """Refuse bad sharding flags, and a missing Ray for ``--backend ray``, before any work."""
    if args.shards < 1:
        raise HaloBalanceError(f"--shards must be >= 1 (got {args.shards})")
    if getattr(args, "shard_index", None) is not None:
        if not 0 <= args.shard_index < args.shards:
            raise HaloBalanceError(f"--shard-index must lie in 0..{args.shards - 1} for --shards {args.shards} "
                                   f"(got {args.shard_index})")
        if args.backend != "local":
            raise HaloBalanceError("--shard-index samples one shard in this process: drop --backend ray")
    if args.gpus_per_shard is not None and args.gpus_per_shard < 0:
        raise HaloBalanceError(f"--gpus-per-shard must be >= 0 (got {args.gpus_per_shard})")
    if args.backend == "ray":
        from .distributed import import_ray

        import_ray()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m halo_balance.sample",
                                     description="Sample synthetic records from a trained model.")
    parser.add_argument("--model", required=True,
                        help="model folder written by halo_balance.train (or a halo_balance.generate output)")
    parser.add_argument("--out", required=True, help="prepared dataset folder to write")
    parser.add_argument("--count", type=int, required=True, help="records per --condition")
    parser.add_argument("--condition", action="append", default=[], metavar="ATTR=VALUE,...",
                        help='e.g. "label=1,gender=F" (repeatable); attributes left out are drawn from the '
                             "training frequencies of the matching cells; none given: all drawn")
    parser.add_argument("--batch-size", type=int, default=256, help="records sampled together (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--id-prefix", default="syn", help="patient ids are PREFIX-SEED-i (default %(default)s)")
    add_copy_arguments(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out folder (only one this package wrote)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_shard_arguments(parser)
    args = parser.parse_args(argv)
    if args.count < 1:
        raise HaloBalanceError(f"--count must be >= 1 (got {args.count})")
    if args.batch_size < 1:
        raise HaloBalanceError(f"--batch-size must be >= 1 (got {args.batch_size})")
    check_copy_arguments(args)
    check_shard_arguments(args)
    copy_filter = None if args.allow_copies else CopyFilter(k=args.copy_k)
    specs = [parse_condition(c) for c in args.condition] or [{}]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.model], what="--out")
    from .model import HaloModel

    model = HaloModel.from_pretrained(args.model)
    if copy_filter is not None:
        if model.record_counts is None:
            raise HaloBalanceError(f"{args.model} has no {RECORD_COUNTS_FILE} (a model trained by an older version) "
                                   "to check copies of training records against; retrain it, or pass --allow-copies")
        copy_filter.references = [model.record_counts]
    conditions = pl.concat([model.layout.complete(spec, args.count, seed=args.seed + j)
                            for j, spec in enumerate(specs)])
    options = {"batch_size": args.batch_size, "seed": args.seed, "device": args.device, "id_prefix": args.id_prefix,
               "progress": not args.quiet}
    t0 = time.perf_counter()
    if args.shard_index is None:
        rows = range(len(conditions))
        sharding = {"shards": args.shards, "backend": args.backend, "ray_address": args.ray_address,
                    "gpus_per_shard": args.gpus_per_shard}
    else:  # one shard of the request, here: its records and ids are the whole request's for its rows
        rows, sharding = shard_rows(len(conditions), batch_size=args.batch_size, shards=args.shards,
                                    index=args.shard_index), {}
    draw = draw_without_copies(model, conditions[rows.start:rows.stop], copy_filter=copy_filter,
                               max_rounds=args.max_rounds, first_row=rows.start, **sharding, **options)
    if len(draw.unfilled):
        raise HaloBalanceError(f"{len(draw.unfilled)} records could not be drawn without copying a training record "
                               f"held by fewer than {args.copy_k} patients after {args.max_rounds} rounds; the model "
                               "memorises them. Train with more regularisation (or --dp-epsilon), raise --max-rounds, "
                               "or pass --allow-copies")
    seconds = time.perf_counter() - t0
    data = draw.dataset
    data.meta["generation"]["copies"] = draw.summary(copy_filter)
    if args.shard_index is not None:
        data.meta["generation"].update(shards=args.shards, shard_index=args.shard_index,
                                       n_records_in_request=len(conditions))
    data.save(args.out, overwrite=args.overwrite)
    if not data.n_patients:
        print(f"shard {args.shard_index} of {args.shards} is empty (the request has fewer batches than shards) "
              f"-> {args.out}", file=sys.stderr)
        return
    print(f"{data.n_patients} records, {data.n_visits} visits ({data.n_visits / data.n_patients:.2f} per record) "
          f"in {seconds:.1f} s ({data.n_patients / seconds:,.0f} records/s); "
          f"{describe_copies(data.meta['generation']['copies'])} -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    from .cli import run

    run(main)
