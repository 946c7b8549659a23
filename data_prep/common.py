"""Pieces shared by the raw-table preprocessors (``data_prep.mimic_iv``, ``data_prep.eicu``).

- Reading raw tables (``.csv`` or ``.csv.gz``) lazily with polars, every column as text, with clear
  errors for a missing table or column, an unreadable or truncated gzip, an empty table and
  numbers that do not parse (counted and skipped while they are a minority).
- :class:`Counts`: every dropped row or patient, by reason, for ``meta.json``.
- :class:`Progress`: step-wise progress on stderr whose clock keeps running during long steps.
- Lab tokens: the ``n_items`` most frequent items, binned by quantiles (:class:`LabItem` holds the
  edges; ``--bins-from`` reuses them so that new data is binned exactly like the training data), in
  one of two modes (``--lab-tokens``): ``mean``, one token per (visit, item), the item's mean over
  the visit binned by the item's quantiles of visit means; ``every``, every measurement binned by
  the item's quantiles over all measurements, a token for each bin the visit's measurements touched.
- The options every preparer shares (:func:`add_common_arguments`, :func:`common_options`), defined
  here once, and :func:`settings`: with ``--bins-from D`` every option that defines the
  representation (``--n-lab-items``, ``--n-bins``, ``--lab-tokens``, ``--time-bins``, ``--outcome``,
  ``--max-visits``; eICU's ``--lab-source`` and ``--patient-unit`` through :meth:`Reference.resolve`)
  is D's, and one given explicitly with another value is an error naming the option, D's value and
  the fix, so that data prepared with ``--bins-from D`` is always comparable with D. Options that say
  how to read an input (``--root``, the MEDS codes and rules) are the input's own. D's group
  categories come first; a category D lacks is kept after them and its patients counted
  (``patients_<attribute>_category_not_in_reference``).
- :func:`assemble`: visits, tokens, vocabulary and patients into a validated
  :class:`~halo_balance.data.PreparedDataset`.

Polars 2.x decompresses gzip while it streams (``scan_csv`` + ``collect(engine="streaming")``), so
a multi-gigabyte ``.csv.gz`` is never held in memory whole; every large table here is only ever
aggregated in streaming mode.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import os
import re
import sys
import threading
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import polars as pl

from halo_balance.data import META_FILE, VOCAB_FILE, VOCAB_SCHEMA, PreparedDataset, empty_meta
from halo_balance.errors import DatasetError, unknown_choice
from halo_balance.io import read_json

if TYPE_CHECKING:
    from .outcomes import OutcomeSpec
    from .time_tokens import TimeTokens

#: Above this share of malformed numbers in a column the input is taken to be the wrong file or
#: layout, and preparation stops instead of skipping most of the rows.
MAX_BAD_NUMBER_FRACTION = 0.5
QUANTILE_METHOD = "linear"
LabTokenMode = Literal["mean", "every"]
LAB_TOKEN_MODES: tuple[str, ...] = get_args(LabTokenMode)
Outcome = Literal["mortality", "readmission-30d", "long-stay"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
#: Visit means and bin edges are rounded to this many significant digits (lab values carry far fewer).
SIGNIFICANT_DIGITS = 9
#: ``--n-bins`` when it is not given (and there is no ``--bins-from`` folder to take it from).
DEFAULT_N_BINS = 10
#: ``--n-lab-items`` when it is not given (and there is no ``--bins-from`` folder to take it from).
DEFAULT_N_LAB_ITEMS = 50


# ---------------------------------------------------------------------- reading raw tables
@dataclass(frozen=True)
class RawTable:
    """A raw CSV table found on disk, with its header checked."""

    name: str
    path: Path
    header: tuple[str, ...]

    def scan(self, columns: Sequence[str]) -> pl.LazyFrame:
        """The table's ``columns``, every one as text (numbers are parsed by :func:`number`)."""
        return pl.scan_csv(self.path, infer_schema=False).select(list(columns))

    def read(self, columns: Sequence[str]) -> pl.DataFrame:
        """Read the (small) table eagerly; an empty table is an error."""
        with reading(self.path):
            df = self.scan(columns).collect(engine="streaming")
        if df.height == 0:
            raise DatasetError("the table has a header but no rows", file=str(self.path),
                               fix="the file is empty or was cut short; re-export or re-download it")
        return df

    def check_not_empty(self) -> None:
        with reading(self.path):
            empty = self.scan(self.header[:1]).head(1).collect(engine="streaming").height == 0
        if empty:
            raise DatasetError("the table has a header but no rows", file=str(self.path),
                               fix="the file is empty or was cut short; re-export or re-download it")


def find_table(roots: Sequence[Path], name: str, columns: Sequence[str], *,
               required: bool = True, fix: str | None = None, column_fix: str | None = None) -> RawTable | None:
    """Locate ``name.csv.gz`` or ``name.csv`` in the first of ``roots`` that has it; check its header.

    A missing required table, a file that is not valid gzip, an empty file and missing columns are
    :class:`DatasetError` naming the file (or the folders searched), the column and the fix
    (``fix`` for a missing table, ``column_fix`` for a missing column).
    """
    for root in roots:
        for suffix in (".csv.gz", ".csv"):
            path = root / f"{name}{suffix}"
            if path.is_file():
                header = _read_header(path)
                missing = [c for c in columns if c not in header]
                if missing:
                    raise DatasetError(
                        f"required column(s) {missing} are missing; the header has {list(header)}",
                        file=str(path), column=missing[0],
                        fix=column_fix or f"point --root at the unmodified {name} table (or add the column)")
                return RawTable(name, path, header)
    if required:
        where = " or ".join(str(r) for r in roots)
        raise DatasetError(f"required table {name!r} not found (looked for {name}.csv.gz and "
                           f"{name}.csv in {where})", file=str(roots[0] / f"{name}.csv.gz"),
                           fix=fix or "point --root at the folder that holds the raw tables")
    return None


def _read_header(path: Path) -> tuple[str, ...]:
    try:
        if path.name.endswith(".gz"):
            with open(path, "rb") as raw:
                if raw.read(2) != b"\x1f\x8b":
                    raise DatasetError("is named .gz but is not a gzip file", file=str(path),
                                       fix="re-download it, or drop the .gz suffix if it is plain CSV")
            with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as f:
                line = f.readline()
        else:
            with open(path, encoding="utf-8-sig", newline="") as f:
                line = f.readline()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot be read ({exc})", file=str(path),
                           fix="check it with `gzip -t` and re-download it") from exc
    if not line.strip():
        raise DatasetError("is empty (no header line)", file=str(path),
                           fix="re-export or re-download the table")
    return tuple(c.strip() for c in next(csv.reader(io.StringIO(line))))


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn a read failure inside a polars query on ``path`` into a :class:`DatasetError`."""
    try:
        yield
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise DatasetError(f"cannot be read to the end ({str(exc).splitlines()[0]}); the file may be "
                           "truncated or corrupt", file=str(path),
                           fix="check it with `gzip -t` (or `wc -l`) and re-download it") from exc


def blank(col: str) -> pl.Expr:
    """True where the text cell is empty (null or only spaces)."""
    return pl.col(col).is_null() | (pl.col(col).str.strip_chars() == "")


def text(col: str) -> pl.Expr:
    """The cell's text, stripped, with empty cells as null."""
    s = pl.col(col).str.strip_chars()
    return pl.when(s == "").then(None).otherwise(s)


def number(col: str, dtype: type[pl.DataType] | pl.DataType = pl.Float64) -> pl.Expr:
    """The cell parsed as a number; null where it is empty or does not parse (see :func:`malformed`).

    Non-finite floats (``inf``, ``nan``) count as not parsing.
    """
    x = pl.col(col).str.strip_chars().cast(dtype, strict=False)
    if dtype in (pl.Float64, pl.Float32):
        x = pl.when(x.is_finite()).then(x)
    return x


def malformed(col: str, dtype: type[pl.DataType] | pl.DataType = pl.Float64) -> pl.Expr:
    """True where the cell holds text that is not a number of ``dtype``."""
    return ~blank(col) & number(col, dtype).is_null()


def check_numbers(table: RawTable | Path, column: str, *, n_bad: int, n_filled: int,
                  example: object = None) -> None:
    """Fail when most filled cells of a numeric column are malformed (a wrong file or layout).

    A minority of malformed cells is counted and skipped by the caller.
    """
    if n_bad and n_bad > MAX_BAD_NUMBER_FRACTION * max(n_filled, 1):
        path = table.path if isinstance(table, RawTable) else table
        raise DatasetError(f"{n_bad:,} of {n_filled:,} filled cells are not numbers", file=str(path),
                           column=column, value=example,
                           fix="check that the column holds numbers (decimal point '.', no units)")


def parse_numbers(df: pl.DataFrame, table: RawTable, columns: dict[str, pl.DataType],
                  counts: Counts) -> pl.DataFrame:
    """Parse the numeric ``columns`` of an eagerly read table; malformed cells become null.

    Each column's malformed cells are counted as ``{table}_{column}_not_a_number`` (the row's
    fate then depends on whether the value was required) and a majority of them is an error.
    """
    out = []
    for col, dtype in columns.items():
        bad = df.filter(malformed(col, dtype))
        filled = df.height - df.select(blank(col).sum()).item()
        check_numbers(table, col, n_bad=bad.height, n_filled=filled,
                      example=bad[col][0] if bad.height else None)
        counts.note(f"{table.name}_{col}_not_a_number", bad.height)
        out.append(number(col, dtype).alias(col))
    return df.with_columns(out)


def table_roots(root: Path, *subfolders: str) -> list[Path]:
    """``root/sub`` for each subfolder that exists, then ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("input folder not found", file=str(root),
                           fix="pass --root the folder that holds the raw tables")
    return [root / s for s in subfolders if (root / s).is_dir()] + [root]


# ---------------------------------------------------------------------- counts and progress
@dataclass
class Counts:
    """Rows read per table, rows or patients dropped by reason, and other notable counts."""

    rows_read: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    info: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + int(n)

    def note(self, name: str, n: int) -> None:
        self.info[name] = self.info.get(name, 0) + int(n)

    def to_meta(self) -> dict[str, Any]:
        return {"rows_read": dict(self.rows_read), "dropped": dict(self.dropped), "info": dict(self.info)}


class Progress:
    """A tqdm bar over named steps on stderr; its clock ticks while a long step blocks."""

    def __init__(self, steps: int, *, desc: str, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} [{elapsed}] step {n_fmt}/{total_fmt}{postfix}")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.bar.refresh()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.enabled:
            self.bar.set_postfix_str(name)
        yield
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self._stop.set()
            self._ticker.join()
            self.bar.set_postfix_str("done")
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- reference dataset (--bins-from)
@dataclass(frozen=True)
class Reference:
    """The parts of an earlier prepared dataset that make new data binned and coded like it."""

    path: Path
    meta: dict[str, Any]
    vocab: pl.DataFrame

    @classmethod
    def load(cls, path: str | os.PathLike, *, source: str | None, lab_source: str | None) -> Reference:
        """Read ``path``; ``source`` / ``lab_source`` None accept a folder prepared from any source
        (``data_prep.meds`` re-prepares data that came from MIMIC-IV or eICU)."""
        path = Path(path)
        for name in (META_FILE, VOCAB_FILE):
            if not (path / name).is_file():
                raise DatasetError("--bins-from needs a prepared dataset folder; this file is missing",
                                   file=str(path / name), fix="pass the folder written by data_prep")
        try:
            meta = read_json(path / META_FILE)
        except ValueError as exc:
            raise DatasetError(f"is not valid JSON ({exc})", file=str(path / META_FILE)) from exc
        vocab = pl.read_parquet(path / VOCAB_FILE)
        labs = meta.get("preprocessing", {}).get("labs")
        if (source is not None and meta.get("source", {}).get("name") != source) or not isinstance(labs, dict):
            origin = source or "raw tables"
            raise DatasetError(f"was not prepared from {origin} by data_prep", file=str(path / META_FILE),
                               column="source", value=meta.get("source"),
                               fix=f"pass a folder prepared by data_prep from {origin}")
        if lab_source is not None and labs.get("source") != lab_source:
            raise DatasetError(f"its labs come from {labs.get('source')!r}, not {lab_source!r}",
                               file=str(path / META_FILE), column="preprocessing.labs.source",
                               fix="prepare both datasets with the same lab source")
        return cls(path, meta, vocab)

    @property
    def lab_items(self) -> list[LabItem]:
        return [LabItem.from_meta(d) for d in self.meta["preprocessing"]["labs"]["items"]]

    @property
    def n_bins(self) -> int:
        return int(self.meta["preprocessing"]["labs"]["n_bins"])

    @property
    def lab_mode(self) -> str:
        """``mean`` or ``every`` (folders written before ``--lab-tokens`` existed are ``mean``)."""
        return str(self.meta["preprocessing"]["labs"].get("mode", "mean"))

    @property
    def time_bins(self) -> dict[str, Any] | None:
        """``preprocessing.time_bins`` (``None`` when the folder has no time tokens)."""
        return self.meta["preprocessing"].get("time_bins")

    def parameter(self, name: str, default: Any = None) -> Any:
        """The value ``preprocessing.parameters`` records for an option (``default`` when absent)."""
        return (self.meta["preprocessing"].get("parameters") or {}).get(name, default)

    @property
    def n_lab_items(self) -> int:
        """``--n-lab-items`` as given to the reference (folders without it: the items it kept)."""
        n = self.parameter("n_lab_items")
        return int(n) if n is not None else len(self.meta["preprocessing"]["labs"].get("items", []))

    @property
    def outcome_option(self) -> str | None:
        """The reference's ``--outcome`` (``None`` when its labels came from a MEDS label file)."""
        pre = self.meta["preprocessing"]
        if self.parameter("labels"):
            return None
        option = (pre.get("outcome") or {}).get("option") or self.parameter("outcome")
        if option is None and self.meta.get("outcome") == "in_hospital_mortality":
            option = "mortality"  # folders written before --outcome existed
        return option

    def resolve(self, option: str, given: Any, value: Any) -> Any:
        """The reference's ``value`` of a command-line ``option``; an explicit ``given`` that differs is an
        error, since data prepared otherwise would not be comparable with the reference."""
        if given is not None and given != value:
            shown = "none" if value is None else value
            raise DatasetError(f"{option} {given} differs from the --bins-from folder's {shown}",
                               file=str(self.path / META_FILE), column="preprocessing.parameters",
                               fix=f"leave {option} out to use the reference's, or prepare the reference "
                                   f"with {option} {given}")
        return value

    def categories(self, present: dict[str, list[str]]) -> dict[str, list[str]]:
        """The reference's group categories, followed by any category new in this data."""
        ref = self.meta["groups"]
        return {a: list(ref.get(a, [])) + [c for c in cats if c not in ref.get(a, [])]
                for a, cats in present.items()}


# ---------------------------------------------------------------------- lab tokens
@dataclass
class LabItem:
    """One lab item kept as tokens: its bins are ``(-inf, e1), [e1, e2), ..., [ek, inf)``."""

    item: str
    label: str
    unit: str | None
    rows: int
    edges: list[float] = field(default_factory=list)

    @property
    def n_bins(self) -> int:
        return len(self.edges) + 1

    def token(self, b: int) -> str:
        return f"lab:{self.item}:{b}"

    def describe(self, b: int) -> str:
        unit = f" [{self.unit}]" if self.unit else ""
        return f"{self.label}{unit}: {bin_range(self.edges, b - 1)} (bin {b} of {self.n_bins})"

    def to_meta(self) -> dict[str, Any]:
        return {"item": self.item, "label": self.label, "unit": self.unit, "rows": self.rows,
                "edges": [float(x) for x in self.edges]}

    @classmethod
    def from_meta(cls, d: dict[str, Any]) -> LabItem:
        return cls(str(d["item"]), str(d["label"]), d.get("unit"), int(d.get("rows", 0)),
                   [float(x) for x in d["edges"]])


def bin_range(edges: Sequence[float], b: int) -> str:
    """The values of 0-based bin ``b`` of ``edges``: ``x < e1``, ``e1 <= x < e2``, ..., ``x >= ek``."""
    if not edges:
        return "any value"
    if b == 0:
        return f"x < {edges[0]:.6g}"
    if b == len(edges):
        return f"x >= {edges[-1]:.6g}"
    return f"{edges[b - 1]:.6g} <= x < {edges[b]:.6g}"


def decile_edges(values: np.ndarray, n_bins: int, counts: np.ndarray | None = None) -> list[float]:
    """Interior quantile edges of ``values`` for ``n_bins`` bins; repeated edges are merged.

    Quantiles use linear interpolation (numpy's default) and are rounded to
    :data:`SIGNIFICANT_DIGITS`. Merging equal edges leaves fewer, wider bins for items with few
    distinct values; a value equal to an edge belongs to the upper bin. With ``counts``, ``values``
    are the distinct values in ascending order and ``counts`` how often each occurs: the edges are
    those of the expanded sample (``np.repeat(values, counts)``), computed without expanding it.
    """
    q = np.arange(1, n_bins) / n_bins
    if counts is None:
        if len(values) == 0 or n_bins < 2:
            return []
        e = np.quantile(values, q, method=QUANTILE_METHOD)
    else:
        n = int(np.sum(counts))
        if n == 0 or n_bins < 2:
            return []
        # numpy's linear rule: position h = (n - 1) q between order statistics floor(h) and floor(h) + 1
        h = (n - 1) * q
        lo = np.floor(h).astype(np.int64)
        ends = np.cumsum(counts)
        x_lo = values[np.searchsorted(ends, lo, side="right")]
        x_hi = values[np.searchsorted(ends, np.minimum(lo + 1, n - 1), side="right")]
        e = x_lo + (x_hi - x_lo) * (h - lo)
    e = pl.Series(e).round_sig_figs(SIGNIFICANT_DIGITS).to_numpy()
    return np.unique(e).tolist()


def bin_of(edges: Sequence[float], values: np.ndarray) -> np.ndarray:
    """0-based bin of each value: ``searchsorted(edges, value, side="right")`` (an edge goes up)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")


class Reasons:
    """Why rows of a large table are dropped, as small integer codes (0 = kept) that are cheap to
    carry on every row of a streaming query; names are restored for ``meta.json``."""

    def __init__(self) -> None:
        self.names = ["ok"]

    def code(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def lit(self, name: str) -> pl.Expr:
        return pl.lit(self.code(name), dtype=pl.UInt16)

    def encode(self, df: pl.DataFrame, col: str = "status") -> pl.DataFrame:
        """Replace a small frame's text ``col`` by codes."""
        mapping = {n: self.code(n) for n in df[col].unique().drop_nulls().to_list()}
        return df.with_columns(pl.col(col).replace_strict(mapping, return_dtype=pl.UInt16))


@dataclass
class LabTokens:
    """Result of :func:`lab_tokens`."""

    items: list[LabItem]
    tokens: pl.DataFrame  # key (Int64), token and kind (Categorical): one row per (visit, item, bin)
    extra: list[pl.DataFrame]  # results of the caller's extra queries
    branch_rows: list[int]  # rows in each branch


def lab_tokens(branches: Sequence[pl.LazyFrame], *, table: RawTable, value_column: str, reasons: Reasons,
               n_items: int, n_bins: int, labels: dict[Any, str], counts: Counts, progress: Progress,
               reference: Sequence[LabItem] | None = None, extra: Sequence[pl.LazyFrame] = (),
               mode: LabTokenMode = "mean") -> LabTokens:
    """Lab rows to binned tokens per visit.

    Parameters
    ----------
    branches : lazy frames with columns ``key`` (Int64, the visit), ``item`` (any type), ``raw``
        (String, the value as text), ``unit`` (String) and ``status`` (UInt16 code of ``reasons``:
        0 or the reason the row is dropped). The raw table is read once, in one streaming pass over
        all branches; nothing of the size of the table is ever collected.
    value_column : the raw table's column behind ``raw`` (named in errors).
    reasons : decodes ``status``.
    n_items, n_bins : the most frequent items (by rows that hold a number) and bins per item.
    labels : item -> readable label for descriptions.
    reference : items and edges to reuse (``--bins-from``); then nothing is fitted here.
    extra : further small aggregation queries to run alongside; returned in order.
    mode : ``"mean"``: one token per (visit, item), the visit mean binned by the item's quantiles of
        visit means. ``"every"``: each measurement binned by the item's quantiles over all
        measurements (of kept visits), one token per distinct (visit, item, bin). The pass over the
        raw table then aggregates per (item, value) and writes the kept rows' (visit, item, value)
        to a temporary parquet file, which a second, fast pass bins once the edges are known.

    Rows dropped are counted by status, as ``{table}_no_numeric_value`` (empty value),
    ``{table}_not_a_number`` (malformed) and ``{table}_item_not_selected``.
    """
    tname = table.name
    with contextlib.ExitStack() as stack:
        if mode == "every":
            spill = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="halo_balance_labs_")))
        with progress.step(f"{tname}: aggregate per {'visit and item' if mode == 'mean' else 'item and value'}"
                           " (streaming)"), reading(table.path):
            rows = [b.select(pl.when(pl.col("status") == 0).then("key").alias("key"), "status", "item", "unit",
                             v=number("raw"), filled=~blank("raw")) for b in branches]
            if mode == "mean":
                queries = [r.group_by("status", "key", "item")
                           .agg(n=pl.len(), n_filled=pl.col("filled").sum(), n_num=pl.col("v").count(),
                                s=pl.col("v").sum(), unit=pl.col("unit").first()) for r in rows]
            else:
                # values matter only in kept rows; nulling the rest keeps the histogram small. Values
                # are rounded to SIGNIFICANT_DIGITS as visit means are: one binning rule in both modes
                queries = [r.with_columns(v=pl.when(pl.col("status") == 0).then(
                               pl.col("v").round_sig_figs(SIGNIFICANT_DIGITS)))
                           .group_by("status", "item", "unit", "v")
                           .agg(n=pl.len(), n_filled=pl.col("filled").sum()).with_columns(
                               n_num=pl.when(pl.col("v").is_not_null()).then(pl.col("n")).otherwise(0))
                           for r in rows]
                queries += [r.filter(pl.col("status") == 0, pl.col("v").is_not_null())
                            .select("key", "item", pl.col("v").round_sig_figs(SIGNIFICANT_DIGITS))
                            .sink_parquet(spill / f"branch{i}.parquet", lazy=True) for i, r in enumerate(rows)]
            results = pl.collect_all([*queries, *extra], engine="streaming")
        n_branches = len(branches)
        extra_out = results[len(queries):]
        branch_rows = [int(r["n"].sum()) for r in results[:n_branches]]
        # mean: one (visit, item) row per group, the large part; every: one row per (item, value).
        # Everything after works on it lazily or on small summaries, so no second copy is ever held.
        agg = pl.concat(results[:n_branches], rechunk=False)
        del results
        items, index = _select_lab_items(agg, branches, table=table, value_column=value_column, reasons=reasons,
                                         n_items=n_items, labels=labels, counts=counts, reference=reference)
        if mode == "mean":
            binned = _mean_bins(agg, index, items, n_bins=n_bins, fit=reference is None)
        else:
            binned = _every_bins(agg, index, items, sorted(spill.glob("*.parquet")), n_bins=n_bins,
                                 fit=reference is None)
        del agg
    # token text is built once per distinct (item, bin), not once per row: at full scale there are
    # tens of millions of rows, and categorical tokens keep them at a few bytes each
    names = (binned.select("idx", "b").unique().join(index.select("idx", "name"), on="idx")
             .select("idx", "b", token=(pl.lit("lab:") + pl.col("name") + pl.lit(":") + pl.col("b").cast(pl.String))
                     .cast(pl.Categorical), kind=pl.lit("lab", dtype=pl.Categorical)))
    tokens = binned.join(names, on=["idx", "b"], maintain_order="left").select("key", "token", "kind")
    return LabTokens(items, tokens, list(extra_out), branch_rows)


def _select_lab_items(agg: pl.DataFrame, branches: Sequence[pl.LazyFrame], *, table: RawTable, value_column: str,
                      reasons: Reasons, n_items: int, labels: dict[Any, str], counts: Counts,
                      reference: Sequence[LabItem] | None) -> tuple[list[LabItem], pl.DataFrame]:
    """Count the drops of ``agg`` (``status``, ``item``, ``unit``, ``n``, ``n_filled``, ``n_num``) and
    pick the items: the reference's, or the ``n_items`` with most numeric rows. Returns the items and
    the index frame ``idx`` (position in items), ``name`` (item as text), ``item`` (raw type) of
    those present in the data."""
    tname = table.name
    by_status = agg.group_by("status").agg(pl.col("n", "n_filled", "n_num").sum())
    for code, n in by_status.filter(pl.col("status") != 0).select("status", "n").iter_rows():
        counts.drop(reasons.names[code], n)
    n, n_filled, n_num = (by_status.filter(pl.col("status") == 0).select(pl.col("n", "n_filled", "n_num").sum())
                          .row(0))
    n, n_filled, n_num = int(n or 0), int(n_filled or 0), int(n_num or 0)
    if n_filled - n_num > MAX_BAD_NUMBER_FRACTION * max(n_filled, 1):
        with reading(table.path):
            example = pl.concat([b.filter(pl.col("status") == 0, malformed("raw")).select("raw").head(1)
                                 for b in branches]).head(1).collect(engine="streaming")["raw"]
        check_numbers(table, value_column, n_bad=n_filled - n_num, n_filled=n_filled,
                      example=example[0] if len(example) else None)
    counts.drop(f"{tname}_no_numeric_value", n - n_filled)
    counts.drop(f"{tname}_not_a_number", n_filled - n_num)
    ok = agg.lazy().filter(pl.col("status") == 0, pl.col("n_num") > 0)
    by_unit = (ok.group_by("item", "unit").agg(pl.col("n_num").sum()).collect()
               .with_columns(unit=pl.col("unit").str.strip_chars().replace("", None)))

    # items may be numbers (MIMIC itemid) or text (eICU labname); LabItem.item is always text
    per_item = (by_unit.group_by("item").agg(pl.col("n_num").sum())
                .with_columns(name=pl.col("item").cast(pl.String)))
    if reference is not None:
        rows = dict(per_item.select("name", "n_num").iter_rows())
        items = [LabItem(it.item, it.label, it.unit, int(rows.get(it.item, 0)), list(it.edges))
                 for it in reference]
    else:
        top = per_item.sort(["n_num", "name"], descending=[True, False]).head(n_items)
        units = (by_unit.drop_nulls("unit").group_by("item", "unit").agg(pl.col("n_num").sum())
                 .sort(["n_num", "unit"], descending=[True, False])
                 .group_by("item", maintain_order=True).agg(pl.col("unit").first()))
        unit_of = dict(units.iter_rows())
        items = [LabItem(text_, labels.get(it, text_), unit_of.get(it), int(n))
                 for it, n, text_ in top.select("item", "n_num", "name").iter_rows()]
    index = pl.DataFrame({"name": [it.item for it in items]}, schema={"name": pl.String}).with_row_index("idx")
    index = index.join(per_item.select("item", "name"), on="name", how="inner")  # items present in the data
    selected = pl.col("name").is_in(index["name"].implode())
    counts.drop(f"{tname}_item_not_selected", int(per_item.filter(~selected)["n_num"].sum()))
    counts.note(f"{tname}_rows_used", int(per_item.filter(selected)["n_num"].sum()))
    return items, index


def _mean_bins(agg: pl.DataFrame, index: pl.DataFrame, items: list[LabItem], *, n_bins: int,
               fit: bool) -> pl.DataFrame:
    """``key``, ``idx``, ``b``: each (visit, item) mean's 1-based bin; fits the edges when ``fit``."""
    ok = agg.lazy().filter(pl.col("status") == 0, pl.col("n_num") > 0)
    # means are rounded to SIGNIFICANT_DIGITS so that the order in which partial sums were added
    # (it varies between streaming runs) never moves a value that sits on an edge to another bin
    means = (ok.join(index.lazy().select("item", "idx"), on="item").group_by("key", "idx")
             .agg(v=(pl.col("s").sum() / pl.col("n_num").sum()).round_sig_figs(SIGNIFICANT_DIGITS))
             .sort("idx", "key").collect())
    if fit:
        for i, it in enumerate(items):
            it.edges = decile_edges(means.filter(pl.col("idx") == i)["v"].to_numpy(), n_bins)
    return means.with_columns(_bin_index(means, items)).drop("v")


def _every_bins(hist: pl.DataFrame, index: pl.DataFrame, items: list[LabItem], spilled: Sequence[Path], *,
                n_bins: int, fit: bool) -> pl.DataFrame:
    """``key``, ``idx``, ``b``: the distinct 1-based bins of each (visit, item)'s measurements.

    The edges (when ``fit``) and each distinct value's bin come from the (item, value) histogram;
    the spilled rows are then binned by joining that small table, in a streaming pass."""
    values = (hist.lazy().filter(pl.col("status") == 0, pl.col("v").is_not_null())
              .join(index.lazy().select("item", "idx"), on="item")
              .group_by("idx", "item", "v").agg(pl.col("n").sum()).sort("idx", "v").collect())
    if fit:
        for i, it in enumerate(items):
            h = values.filter(pl.col("idx") == i)
            it.edges = decile_edges(h["v"].to_numpy(), n_bins, counts=h["n"].to_numpy())
    lookup = values.with_columns(_bin_index(values, items)).select("item", "v", "idx", "b")
    rows = pl.scan_parquet(list(spilled)).join(lookup.lazy(), on=["item", "v"])
    keys = rows.select(lo=pl.col("key").min(), hi=pl.col("key").max()).collect(engine="streaming").row(0)
    if not (0 <= (keys[0] or 0) and (keys[1] or 0) < 2**32 and len(items) < 2**16 and n_bins < 2**16):
        return rows.select("key", "idx", "b").unique().collect(engine="streaming")
    # tens of millions of distinct (visit, item, bin) at full scale: deduplicated as one UInt64 each
    packed = (pl.col("key").cast(pl.UInt64) * 2**32 + pl.col("idx").cast(pl.UInt64) * 2**16
              + pl.col("b").cast(pl.UInt64))
    code = rows.select(code=packed).unique().collect(engine="streaming")["code"]
    return pl.DataFrame({"key": (code // 2**32).cast(pl.Int64), "idx": (code // 2**16 % 2**16).cast(pl.UInt32),
                         "b": (code % 2**16).cast(pl.Int32)})


def _bin_index(agg: pl.DataFrame, items: Sequence[LabItem]) -> pl.Series:
    """1-based bin of each row's ``v`` in ``agg`` (sorted by ``idx``): :func:`bin_of` + 1."""
    idx, v = agg["idx"].to_numpy(), agg["v"].to_numpy()
    out = np.empty(len(v), dtype=np.int32)
    bounds = np.searchsorted(idx, np.arange(len(items) + 1), side="left")
    for i, it in enumerate(items):
        a, b = bounds[i], bounds[i + 1]
        out[a:b] = bin_of(it.edges, v[a:b]) + 1
    return pl.Series("b", out)


def lab_vocab(items: Sequence[LabItem]) -> pl.DataFrame:
    """Vocabulary rows (token, kind, description) for every bin of every item."""
    rows = [(it.token(b), "lab", it.describe(b)) for it in items for b in range(1, it.n_bins + 1)]
    return pl.DataFrame(rows, schema={"token": pl.String, "kind": pl.String, "description": pl.String},
                        orient="row")


# ---------------------------------------------------------------------- assembling the dataset
def build_vocab(parts: Sequence[pl.DataFrame], reference: Reference | None) -> pl.DataFrame:
    """Dense vocabulary from (token, kind, description) parts, or the reference's vocabulary."""
    if reference is not None:
        return reference.vocab.select(list(VOCAB_SCHEMA)).cast(VOCAB_SCHEMA)
    vocab = pl.concat(parts).unique("token", keep="first", maintain_order=True)
    return vocab.with_row_index("id").with_columns(pl.col("id").cast(pl.Int32)).select(
        list(VOCAB_SCHEMA)).cast(VOCAB_SCHEMA)


def assemble(*, visits: pl.DataFrame, tokens: pl.DataFrame, vocab: pl.DataFrame,
             patients: pl.DataFrame, meta: dict[str, Any], counts: Counts) -> PreparedDataset:
    """Build the prepared dataset.

    Parameters
    ----------
    visits : ``patient_id``, ``key`` (Int64 visit key), ``visit_index``, ``label``, in order.
    tokens : ``key``, ``token``, ``kind`` rows (duplicates allowed; text or categorical). Tokens
        missing from ``vocab`` (only possible with a reference vocabulary) are dropped and counted by kind.
    patients : ``patient_id``, ``label`` and the group columns of ``meta["groups"]``.
    """
    ids = tokens.lazy().join(vocab.lazy().select(pl.col("token").cast(tokens.schema["token"]), "id"), on="token",
                             how="left")
    # streamed: the joined (token, id) rows are never held whole (tens of millions at full scale)
    oov, codes = pl.collect_all([
        ids.filter(pl.col("id").is_null()).group_by("kind").len(),
        ids.filter(pl.col("id").is_not_null()).group_by("key").agg(codes=pl.col("id").unique().sort()),
    ], engine="streaming")
    for kind, n in oov.iter_rows():
        counts.drop(f"{kind}_tokens_not_in_reference_vocab", n)
    v = (visits.join(codes, on="key", how="left", maintain_order="left")
         .with_columns(pl.col("codes").fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
                       synthetic=pl.lit(False)))
    counts.note("visits_without_tokens", v.filter(pl.col("codes").list.len() == 0).height)
    visits_out = v.select(
        pl.col("patient_id").cast(pl.String), pl.col("visit_index").cast(pl.Int32),
        pl.col("codes").cast(pl.List(pl.Int32)), pl.col("label").cast(pl.Int8), "synthetic")
    groups = list(meta["groups"])
    patients_out = patients.select(
        pl.col("patient_id").cast(pl.String), pl.col("label").cast(pl.Int8),
        *[pl.col(g).cast(pl.String) for g in groups], synthetic=pl.lit(False))
    return PreparedDataset(visits_out, patients_out, vocab, meta)


def count_rows_by_status(by_status: pl.DataFrame, table: RawTable, counts: Counts) -> None:
    """Record a table's rows read, drops by status (``len`` per ``status``) and rows used."""
    n = int(by_status["len"].sum())
    if n == 0:
        raise DatasetError("the table has a header but no rows", file=str(table.path),
                           fix="re-export or re-download it")
    counts.rows_read[table.name] = n
    for reason, k in by_status.filter(pl.col("status") != "ok").iter_rows():
        counts.drop(reason, k)
    counts.note(f"{table.name}_rows_used", int(by_status.filter(pl.col("status") == "ok")["len"].sum()))


def finish(*, source: str, module: str, root: Path, tables: dict[str, RawTable | None],
           parameters: dict[str, Any], rules: dict[str, str], visits: pl.DataFrame,
           dx_tokens: pl.DataFrame, dx_vocab: pl.DataFrame, lab_source: str, labs: LabTokens | None,
           n_bins: int, bins_from: str | os.PathLike | None, reference: Reference | None,
           patients: pl.DataFrame, canonical: dict[str, list[str]], counts: Counts,
           outcome: OutcomeSpec | None = None, lab_mode: LabTokenMode = "mean", time: TimeTokens | None = None,
           extra_meta: dict[str, Any] | None = None) -> PreparedDataset:
    """Vocabulary, ``meta.json`` and the assembled dataset, the same way for every source.

    ``outcome`` defaults to in-hospital mortality as ``rules["outcome"]`` states it.
    """
    if outcome is None:
        from .outcomes import OUTCOME_NAMES, OutcomeSpec

        outcome = OutcomeSpec("mortality", OUTCOME_NAMES["mortality"], rules.get("outcome", ""))
    if patients.height == 0:  # say why, rather than fail later on an empty category list
        reasons = sorted(((n, k) for k, n in counts.dropped.items() if n), reverse=True)[:3]
        raise DatasetError("no patient is left to prepare; dropped: " + (", ".join(f"{k} {n:,}" for n, k in reasons)
                                                                        or "nothing (the tables hold no patient)"),
                           file=str(root), fix="check the input tables and the options against the module's rules")
    items = labs.items if labs is not None else []
    vocab = build_vocab([dx_vocab, lab_vocab(items)] + ([time.bins.vocab()] if time else []), reference)
    parts = [dx_tokens] + ([labs.tokens] if labs is not None else []) + ([time.tokens] if time else [])
    tokens = pl.concat([t.select("key", pl.col("token", "kind").cast(pl.Categorical)) for t in parts],
                       rechunk=False)
    groups = present_categories(patients, canonical)
    if reference is not None:  # categories the reference lacks are kept, after its own, and counted
        for attr, cats in groups.items():
            new = [c for c in cats if c not in reference.meta["groups"].get(attr, [])]
            if new:
                counts.note(f"patients_{attr}_category_not_in_reference", patients.filter(pl.col(attr).is_in(new)).height)
        groups = reference.categories(groups)
    bins_from = str(bins_from) if bins_from else None
    meta = empty_meta(source=source, source_version=source_version(root), outcome=outcome.name,
                      groups=groups)
    meta["preprocessing"] = {
        "module": module, "root": str(Path(root).resolve()),
        "tables": {k: str(t.path.resolve()) for k, t in tables.items() if t is not None},
        "parameters": {**parameters, "n_bins": n_bins, "bins_from": bins_from, "outcome": outcome.option,
                       "lab_tokens": lab_mode, "time_bins": time.bins.n_bins if time else 0},
        "rules": rules,
        "outcome": outcome.to_meta(),
        "labs": {"source": lab_source, "mode": lab_mode, "aggregate": "mean" if lab_mode == "mean" else "none",
                 "quantiles_of": "visit means" if lab_mode == "mean" else "measurements",
                 "quantile_method": QUANTILE_METHOD, "significant_digits": SIGNIFICANT_DIGITS,
                 "n_items": len(items), "n_bins": n_bins, "bins_from": bins_from,
                 "items": [it.to_meta() for it in items]},
        "time_bins": time.bins.to_meta() if time else None,
        **(extra_meta or {}),
        "versions": versions(),
    }
    ds = assemble(visits=visits, tokens=tokens, vocab=vocab, patients=patients, meta=meta, counts=counts)
    ds.meta["counts"] = {**ds.meta.get("counts", {}), **counts.to_meta()}
    return ds


def present_categories(patients: pl.DataFrame, canonical: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per attribute, the canonical categories that occur, in canonical order."""
    out = {}
    for attr, cats in canonical.items():
        seen = set(patients[attr].unique().to_list())
        unknown = seen - set(cats)
        if unknown:  # a mapping bug, never bad input: every raw value maps to a canonical category
            raise AssertionError(f"{attr}: categories {sorted(unknown)} are not canonical")
        out[attr] = [c for c in cats if c in seen]
    return out


def icd_category(code: pl.Expr, version: pl.Expr) -> pl.Expr:
    """ICD code -> its category: the part before the decimal point.

    Codes stored without the point (MIMIC) give the first 3 characters (ICD-10; ICD-9 numeric and
    V codes) or 4 (ICD-9 E codes such as ``E849``), which is the same thing.
    """
    base = code.str.replace_all(r"\s", "").str.to_uppercase().str.split(".").list.first()
    return (pl.when((version == 9) & base.str.starts_with("E")).then(base.str.slice(0, 4))
            .otherwise(base.str.slice(0, 3)))


def age_group(age: pl.Expr, groups: Sequence[tuple[str, float]], *, unknown: str = "Unknown") -> pl.Expr:
    """The age group of ``age``: ``groups`` are ``(label, youngest age)`` in ascending order, the first
    taking every younger age too; ``unknown`` where the age is null."""
    expr = pl.when(age.is_null()).then(pl.lit(unknown))
    for (label, _), (_, older) in zip(groups[:-1], groups[1:]):
        expr = expr.when(age < older).then(pl.lit(label))
    return expr.otherwise(pl.lit(groups[-1][0]))


def row_status(visits: pl.DataFrame, *, on: Sequence[str], table: str, visit_word: str) -> pl.DataFrame:
    """The ``on`` columns, the visit ``key`` and ``status``: ``ok`` or the reason rows of ``table``
    belonging to that visit are dropped (``{table}_{visit_word}_{fate}``)."""
    return visits.select(*dict.fromkeys([*on, "key"]), status=pl.when(pl.col("fate") == "ok").then(pl.lit("ok"))
                         .otherwise(pl.lit(f"{table}_{visit_word}_") + pl.col("fate")))


MIMIC_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def datetime(col: str, fmt: str | None = None) -> pl.Expr:
    """Text cell parsed as a timestamp (``fmt``, else inferred); null where it does not parse."""
    return pl.col(col).str.strip_chars().str.to_datetime(fmt, time_unit="us", strict=False)


def time_format(table: RawTable, col: str, fmt: str = MIMIC_TIME_FORMAT) -> str | None:
    """``fmt`` if the column's first filled cells all follow it (parsing is then faster), else None."""
    with reading(table.path):
        sample = (table.scan([col]).filter(~blank(col)).head(1000).collect(engine="streaming")[col]
                  .str.strip_chars())
    ok = sample.str.to_datetime(fmt, strict=False).null_count() == 0 if len(sample) else False
    return fmt if ok else None


def add_common_arguments(p: argparse.ArgumentParser, *, root_help: str, visit: str) -> None:
    """The options every preprocessor CLI shares (read them back with :func:`common_options`)."""
    p.add_argument("--root", required=True, help=root_help)
    p.add_argument("--out", required=True, help="output folder for the prepared dataset")
    p.add_argument("--n-lab-items", type=int, default=None,
                   help=f"lab items kept (default {DEFAULT_N_LAB_ITEMS}; 0 = no labs; with --bins-from: the reference's)")
    p.add_argument("--n-bins", type=int, default=None,
                   help=f"bins per lab item (default {DEFAULT_N_BINS}: deciles; with --bins-from: the reference's)")
    p.add_argument("--lab-tokens", choices=LAB_TOKEN_MODES, default=None,
                   help="mean (default): one token per lab and visit, the visit mean binned by the lab's "
                        "quantiles of visit means; every: each measurement binned by the lab's quantiles over all "
                        "measurements, a token for every bin the visit touched (with --bins-from: the reference's)")
    p.add_argument("--time-bins", type=int, default=None, metavar="N",
                   help="add time tokens: age at the first visit and days since the previous visit, in N "
                        "quantile bins (default 0: none; with --bins-from: the reference's)")
    p.add_argument("--outcome", choices=OUTCOMES, default=None,
                   help="the label on each record's final visit: in-hospital death (default), a readmission "
                        "within 30 days of the final discharge, or a stay over 7 days (rules: the module docstring; "
                        "with --bins-from: the reference's)")
    p.add_argument("--max-visits", type=int, default=None,
                   help=f"keep each patient's N most recent {visit} (with --bins-from: the reference's)")
    p.add_argument("--bins-from", default=None, metavar="PREPARED_DIR",
                   help="prepare like this prepared dataset: its lab items, bin edges, lab-token mode, time bins, "
                        "vocabulary, outcome and visit cap (an option given with another value is an error)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a ``prepare_*`` function that :func:`add_common_arguments` gives."""
    return {"n_lab_items": args.n_lab_items, "n_bins": args.n_bins, "lab_tokens": args.lab_tokens,
            "time_bins": args.time_bins, "outcome": args.outcome, "max_visits": args.max_visits,
            "bins_from": args.bins_from, "overwrite": args.overwrite, "progress": not args.quiet}


def check_parameters(*, n_lab_items: int | None, n_bins: int | None, max_visits: int | None,
                     time_bins: int | None = None, lab_tokens: str | None = None, outcome: str | None = None) -> None:
    if n_lab_items is not None and n_lab_items < 0:
        raise DatasetError("must be 0 or more", column="n_lab_items", value=n_lab_items)
    if n_bins is not None and n_bins < 2:
        raise DatasetError("must be at least 2", column="n_bins", value=n_bins)
    if max_visits is not None and max_visits < 1:
        raise DatasetError("must be at least 1", column="max_visits", value=max_visits)
    if time_bins is not None and (time_bins < 0 or time_bins == 1):
        raise DatasetError("must be 0 (no time tokens) or at least 2", column="time_bins", value=time_bins)
    for option, value, choices in (("--lab-tokens", lab_tokens, LAB_TOKEN_MODES), ("--outcome", outcome, OUTCOMES)):
        if value is not None and value not in choices:
            raise unknown_choice(option, [value], choices)


@dataclass(frozen=True)
class Settings:
    """The options that define a prepared dataset's representation, as in effect (:func:`settings`)."""

    n_bins: int
    time_bins: int
    lab_mode: LabTokenMode
    time_reference: dict[str, Any] | None  # the reference's ``preprocessing.time_bins`` to reuse
    n_lab_items: int
    outcome: Outcome
    max_visits: int | None


def settings(*, n_bins: int | None, time_bins: int | None, lab_tokens: str | None, n_lab_items: int | None,
             outcome: str | None, max_visits: int | None, reference: Reference | None) -> Settings:
    """``--n-bins``, ``--time-bins``, ``--lab-tokens``, ``--n-lab-items``, ``--outcome`` and ``--max-visits``
    in effect, and the reference's time bins to reuse.

    Without a reference: the values given (``None``: 10, 0, ``mean``, 50, ``mortality`` and no cap). With
    ``--bins-from`` they are the reference's, so new data is prepared exactly like it; a different value
    given explicitly is an error rather than silently ignored (:meth:`Reference.resolve`). ``--outcome``
    of a reference whose labels came from a MEDS label file is left to ``data_prep.meds``.
    """
    if reference is None:
        return Settings(DEFAULT_N_BINS if n_bins is None else n_bins, time_bins or 0,
                        lab_tokens or "mean", None,  # type: ignore[arg-type]
                        DEFAULT_N_LAB_ITEMS if n_lab_items is None else n_lab_items,
                        outcome or "mortality", max_visits)  # type: ignore[arg-type]
    ref_time = reference.time_bins
    r = reference.resolve
    ref_outcome = reference.outcome_option
    return Settings(
        n_bins=r("--n-bins", n_bins, reference.n_bins),
        time_bins=r("--time-bins", time_bins, int(ref_time["n_bins"]) if ref_time else 0),
        lab_mode=r("--lab-tokens", lab_tokens, reference.lab_mode), time_reference=ref_time,
        n_lab_items=r("--n-lab-items", n_lab_items, reference.n_lab_items),
        outcome=(r("--outcome", outcome, ref_outcome) if ref_outcome is not None  # type: ignore[arg-type]
                 else outcome or "mortality"),
        max_visits=r("--max-visits", max_visits, reference.parameter("max_visits")))


def summary(ds: PreparedDataset, out: str | os.PathLike) -> str:
    """A short report of a prepared dataset: sizes, positives and drops."""
    dropped = {k: v for k, v in ds.meta["counts"]["dropped"].items() if v}
    lines = [f"wrote {out}: {ds.n_patients:,} patients ({int(ds.patients['label'].sum()):,} positive), "
             f"{ds.n_visits:,} visits, {ds.vocab_size:,} tokens"]
    lines += [f"  dropped {k}: {v:,}" for k, v in sorted(dropped.items())]
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import platform

    import halo_balance

    return {"python": platform.python_version(), "polars": pl.__version__,
            "numpy": np.__version__, "halo_balance": halo_balance.__version__}


def order_visits(df: pl.DataFrame, *, by: Sequence[str], descending: Sequence[bool] | None = None,
                 max_visits: int | None, counts: Counts, reason: str) -> pl.DataFrame:
    """Sort visits per patient and number them; mark all but the ``max_visits`` most recent.

    ``df`` needs ``patient_id``; ``by`` are the within-patient sort keys (oldest first). Adds
    ``order`` (0-based over all of the patient's visits), ``kept`` (false beyond the cap; counted
    under ``reason``), ``visit_index`` (0-based among kept visits, null otherwise) and ``is_final``.
    """
    desc = [False] + list(descending or [False] * len(by))
    df = df.sort(["patient_id", *by], descending=desc, nulls_last=True, maintain_order=True)
    df = df.with_columns(order=pl.int_range(pl.len()).over("patient_id").cast(pl.Int32),
                         _n=pl.len().over("patient_id").cast(pl.Int32))
    first = (pl.col("_n") - max_visits).clip(lower_bound=0) if max_visits is not None else pl.lit(0)
    df = df.with_columns(_first=first).with_columns(kept=pl.col("order") >= pl.col("_first"))
    counts.drop(reason, df.filter(~pl.col("kept")).height)
    return df.with_columns(
        visit_index=pl.when(pl.col("kept")).then(pl.col("order") - pl.col("_first")).cast(pl.Int32),
        is_final=pl.col("order") == pl.col("_n") - 1).drop("_n", "_first")


def source_version(root: Path) -> str:
    """A release number in the input folder's name (``mimic-iv-demo-2.2`` -> ``2.2``), else ''."""
    m = re.search(r"(\d+\.\d+)", Path(root).resolve().name)
    return m.group(1) if m else ""
