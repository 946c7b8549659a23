"""Copies of training records in synthetic output: which to reject, which identify nobody.

A synthetic record is a *copy* when it equals a training patient's record (the same visits with
the same tokens, in the same order). A record that many real patients share (an empty visit, a
common one- or two-code visit) identifies nobody, and rejecting its copies only distorts the
distribution; a record that few patients hold may identify them. The rule, applied by
``halo_balance.generate`` / :func:`~halo_balance.balance.rebalance`, ``halo_balance.sample`` and
``FairPlaySampler`` alike: a copy of a training record held by fewer than ``k`` training patients
(:data:`COPY_K` by default, ``--copy-k``) is rejected and re-drawn; a copy of a record that at least
``k`` patients share is kept and counted. Both counts are reported.

The check needs the training records' counts but must not keep the records: a model folder holds
``record_counts.parquet``, one row per distinct training record with the number of patients
holding it (``n``) and a 128-bit keyed BLAKE2b digest of the record (``digest``), keyed by a random
16-byte salt of that model (stored in the file's metadata). Why digests rather than records: the
file reveals no patient's codes, so it can sit beside the weights. Why a salt: digests of the same
record differ between model folders, so folders cannot be linked patient by patient, and no table
of digests can be prepared in advance. What it does not protect against: whoever holds the folder
can test a *guessed* complete record for membership, and very short records can be guessed by
enumeration; like ``training.json``, the file belongs with the data team, not with the synthetic
data that is shared.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .data import PreparedDataset, Records
from .errors import HaloBalanceError

#: default k: copies of records held by fewer than this many training patients are rejected
COPY_K = 5
RECORD_COUNTS_FILE = "record_counts.parquet"
DIGEST_BYTES = 16
_FORMAT = "halo_balance.record_counts/1"


def record_digests(records: Records, salt: bytes) -> list[bytes]:
    """Keyed BLAKE2b digest of each record: its visits' sorted int32 codes, each visit closed by -1."""
    n_visits = len(records.code_ptr) - 1
    flat = np.empty(len(records.codes) + n_visits, dtype="<i4")
    end_of_visit = records.code_ptr[1:] + np.arange(n_visits)  # each visit shifted by the delimiters before it
    is_delim = np.zeros(len(flat), dtype=bool)
    is_delim[end_of_visit] = True
    flat[is_delim] = -1
    flat[~is_delim] = records.codes
    start = records.code_ptr[records.visit_ptr[:-1]] + records.visit_ptr[:-1]
    stop = records.code_ptr[records.visit_ptr[1:]] + records.visit_ptr[1:]
    buf = flat.tobytes()
    return [hashlib.blake2b(buf[4 * a:4 * b], digest_size=DIGEST_BYTES, key=salt).digest()
            for a, b in zip(start.tolist(), stop.tolist())]


@dataclass
class RecordCounts:
    """Patients per distinct training record, by salted digest (module docstring).

    Attributes
    ----------
    salt : bytes
        The key of the digests (16 random bytes per model).
    counts : dict of bytes to int
        Digest -> number of training patients holding that record.
    """

    salt: bytes
    counts: dict[bytes, int] = field(default_factory=dict)

    @classmethod
    def from_dataset(cls, dataset: PreparedDataset | Records, *, salt: bytes | None = None) -> RecordCounts:
        records = dataset.records() if isinstance(dataset, PreparedDataset) else dataset
        salt = secrets.token_bytes(16) if salt is None else salt
        return cls(salt=salt, counts=dict(Counter(record_digests(records, salt))))

    @property
    def n_patients(self) -> int:
        return sum(self.counts.values())

    def lookup(self, records: Records) -> np.ndarray:
        """Training patients holding each of ``records`` (0: not a training record), int64."""
        return self.held(record_digests(records, self.salt))

    def held(self, digests: Sequence[bytes]) -> np.ndarray:
        """Training patients holding each record of these digests (of this salt), int64."""
        return np.fromiter((self.counts.get(d, 0) for d in digests), dtype=np.int64, count=len(digests))

    def to_bytes(self) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"digest": pa.array(list(self.counts), type=pa.binary(DIGEST_BYTES)),
                          "n": pa.array(list(self.counts.values()), type=pa.int64())})
        table = table.replace_schema_metadata({"format": _FORMAT, "salt": self.salt.hex()})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        from .io import atomic_write_bytes

        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecordCounts:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != _FORMAT or "salt" not in meta:
            raise HaloBalanceError(f"{path} is not a record-count file written by halo_balance")
        frame = pl.from_arrow(table)
        return cls(salt=bytes.fromhex(meta["salt"]), counts=dict(zip(frame["digest"].to_list(), frame["n"].to_list())))


def check_copy_settings(*, copy_k: int | None = None, max_rounds: int | None = None, options: bool = False) -> None:
    """Refuse a ``copy_k`` or ``max_rounds`` under 1 (``None``: not given).

    Applied whether or not copies are allowed, so that ``generate``, ``sample`` and
    :class:`~halo_balance.sampler.FairPlaySampler` accept the same settings. ``options`` names them
    as the command-line options ``--copy-k`` and ``--max-rounds``.
    """
    k_name, rounds_name = ("--copy-k", "--max-rounds") if options else ("copy_k", "max_rounds")
    problems = []
    if copy_k is not None and int(copy_k) < 1:
        problems.append(f"{k_name} must be >= 1 (got {copy_k}); 1 re-draws no copy, and --allow-copies skips "
                        "the check")
    if max_rounds is not None and int(max_rounds) < 1:
        problems.append(f"{rounds_name} must be >= 1 (got {max_rounds}); the first draw is round 1, so 1 re-draws "
                        "nothing")
    if problems:
        raise HaloBalanceError("; ".join(problems))


@dataclass
class CopyFilter:
    """The copy rule: reject copies of records held by fewer than ``k`` patients of any reference.

    Parameters
    ----------
    k : int
        Records that at least ``k`` training patients share may be emitted.
    references : sequence of RecordCounts
        The training data(s) to check against (e.g. the data being balanced and the generator's
        own training data); a record is rare if any reference holds it 1..k-1 times.
    """

    k: int = COPY_K
    references: Sequence[RecordCounts] = ()

    def __post_init__(self) -> None:
        check_copy_settings(copy_k=self.k)

    def classify(self, records: Records) -> tuple[np.ndarray, np.ndarray]:
        """``(rare, common)`` boolean arrays: copies to reject, and copies of shared records to keep."""
        rare = np.zeros(len(records), dtype=bool)
        copy = np.zeros(len(records), dtype=bool)
        for ref in self.references:
            n = ref.lookup(records)
            rare |= self.is_rare(n)
            copy |= n > 0
        return rare, copy & ~rare

    def is_rare(self, held: np.ndarray) -> np.ndarray:
        """Whether a copy of a record held by ``held`` training patients (0: none) is rare: 1 to k - 1."""
        return (held > 0) & (held < self.k)


def add_copy_arguments(parser) -> None:
    """``--allow-copies``, ``--copy-k`` and ``--max-rounds``, shared by ``generate`` and ``sample``."""
    parser.add_argument("--allow-copies", action="store_true",
                        help="keep synthetic records equal to a rare training record (re-drawn by default)")
    parser.add_argument("--copy-k", type=int, default=COPY_K,
                        help="copies of records held by fewer than this many training patients are re-drawn; "
                             "copies of records that at least this many share are kept (default %(default)s)")
    parser.add_argument("--max-rounds", type=int, default=10,
                        help="re-draw rounds for rejected copies (default %(default)s)")


def check_copy_arguments(args) -> None:
    """:func:`check_copy_settings` on the options of :func:`add_copy_arguments`, with or without ``--allow-copies``."""
    check_copy_settings(copy_k=args.copy_k, max_rounds=args.max_rounds, options=True)


def describe_copies(summary: dict[str, Any]) -> str:
    """One line from :meth:`Draw.summary` (or a generation entry holding the same keys)."""
    if summary["allow_copies"]:
        return "copies allowed"
    k = summary["copy_k"]
    return (f"{summary['rejected_copies']} copies of training records held by fewer than {k} patients rejected and "
            f"re-drawn, {summary['kept_copies']} copies of records that at least {k} share kept")


@dataclass
class Draw:
    """What :func:`draw_without_copies` returns.

    ``dataset`` holds one record per condition row that could be filled, in row order, with ids
    ``{id_prefix}-{seed}-{first_row + row}``; ``rejected`` per condition row the rare copies
    re-drawn; ``kept_copies`` per row whether its record is a copy of a shared training record;
    ``unfilled`` the rows still a rare copy after the last round.
    """

    dataset: PreparedDataset
    rejected: np.ndarray
    kept_copies: np.ndarray
    unfilled: np.ndarray

    def summary(self, copy_filter: CopyFilter | None) -> dict[str, Any]:
        return {"allow_copies": copy_filter is None, "copy_k": None if copy_filter is None else int(copy_filter.k),
                "rejected_copies": int(self.rejected.sum()), "kept_copies": int(self.kept_copies.sum())}


def draw_without_copies(model, conditions: pl.DataFrame, *, copy_filter: CopyFilter | None, max_rounds: int = 10,
                        seed: int = 0, batch_size: int = 256, device: str = "auto", id_prefix: str = "syn",
                        progress: bool = True, first_row: int = 0, shards: int = 1, backend: str = "local",
                        ray_address: str = "auto", gpus_per_shard: float | None = None) -> Draw:
    """Sample one record per row of ``conditions``, re-drawing rare copies (``copy_filter``) in up to
    ``max_rounds`` rounds; ``copy_filter=None`` keeps every record.

    Round 0 draws every row as :func:`~halo_balance.sample.sample_records` does (in ``shards`` on
    ``backend``: :func:`~halo_balance.sample.sample_shards`). Round r >= 1 re-draws the rows still
    to fill batch by batch: the rows of request batch b together, from the generator of seed
    ``seed + r`` and batch b (:func:`~halo_balance.sample.batch_seed`). A row's record thus depends
    on its own batch only, so a shard of the request (whole batches; ``first_row`` = its first row
    in the whole request, e.g. ``sample --shard-index``) fills its rows exactly as the whole request
    does, re-drawn copies included, and the result does not depend on ``shards`` or ``backend``.
    Re-draw rounds run here, one batch at a time (they hold the few rejected rows only).
    """
    from .sample import sample_records, sample_shards
    from .train import _bar

    check_copy_settings(max_rounds=max_rounds)
    if first_row and (shards != 1 or backend != "local"):
        raise HaloBalanceError("first_row is for one shard of a request, sampled here: pass shards=1, backend='local'")
    n = conditions.height
    todo = np.arange(n)
    rejected = np.zeros(n, dtype=np.int64)
    kept_copies = np.zeros(n, dtype=bool)
    parts: list[tuple[PreparedDataset, np.ndarray]] = []
    options = {"batch_size": batch_size, "device": device}
    for round_ in range(max_rounds):
        if not len(todo):
            break
        prefix = f"{id_prefix}-r{round_}"
        if round_ == 0 and (shards != 1 or backend != "local"):
            drawn = sample_shards(model, conditions, shards=shards, backend=backend, ray_address=ray_address,
                                  gpus=gpus_per_shard, seed=seed, id_prefix=prefix, progress=progress, **options)
        elif round_ == 0:
            drawn = sample_records(model, conditions, seed=seed, first_row=first_row, id_prefix=prefix,
                                   progress=progress, **options)
        else:
            batch_of = (first_row + todo) // batch_size
            drawn = PreparedDataset.concat([
                sample_records(model, conditions[todo[batch_of == b]], seed=seed + round_,
                               first_row=int(b) * batch_size, id_prefix=prefix, progress=False, **options)
                for b in _bar(np.unique(batch_of).tolist(), progress, f"re-draw round {round_}")])
        if copy_filter is None:
            parts.append((drawn, todo))
            todo = todo[:0]
            break
        rare, common = copy_filter.classify(drawn.records())
        rejected[todo[rare]] += 1
        kept_copies[todo[common]] = True
        if (~rare).any():
            parts.append((drawn.select(drawn.patients["patient_id"].filter(pl.Series(~rare))), todo[~rare]))
        todo = todo[rare]
    if not parts:  # nothing drawn: an empty dataset of the model's format
        parts.append((sample_records(model, conditions.clear(), seed=seed, device=device, progress=False),
                      np.zeros(0, dtype=np.int64)))
    return Draw(dataset=_in_row_order(parts, id_prefix, seed, first_row), rejected=rejected,
                kept_copies=kept_copies, unfilled=todo)


def _in_row_order(parts: list[tuple[PreparedDataset, np.ndarray]], id_prefix: str, seed: int,
                  first_row: int = 0) -> PreparedDataset:
    """The drawn parts as one dataset in condition-row order, ids ``{id_prefix}-{seed}-{first_row + row}``."""
    data = PreparedDataset.concat([d for d, _ in parts])
    rows = np.concatenate([r for _, r in parts])
    new_ids = [f"{id_prefix}-{seed}-{first_row + r}" for r in rows.tolist()]
    mapping = pl.DataFrame({"patient_id": data.patients["patient_id"], "_new": new_ids, "_row": rows})
    patients = (data.patients.join(mapping, on="patient_id", how="left")
                .sort("_row").with_columns(patient_id=pl.col("_new")).drop("_new", "_row"))
    visits = (data.visits.join(mapping, on="patient_id", how="left")
              .sort("_row", "visit_index").with_columns(patient_id=pl.col("_new")).drop("_new", "_row"))
    return PreparedDataset(visits, patients, data.vocab, data.meta)
