"""The prepared dataset: the one format between every stage of the pipeline.

A prepared dataset is a folder of four files::

    visits.parquet    patient_id str, visit_index int32 (0-based, chronological),
                      codes list<int32> (sorted, unique vocabulary ids), label int8, synthetic bool
    patients.parquet  patient_id str, label int8 (the patient's outcome), one str column per group
                      attribute, synthetic bool
    vocab.parquet     id int32 (dense 0..V-1), token str, kind str, description str
    meta.json         format_version, source, outcome, groups {attribute: [categories]},
                      preprocessing parameters, counts (patients, visits, dropped rows by reason)

The outcome belongs to the patient and sits on the final visit: every earlier visit is negative.
Downstream models see one row per visit (:meth:`PreparedDataset.to_visit_matrix`); the generator
sees one record per patient (:meth:`PreparedDataset.records`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

from .errors import DatasetError, unknown_choice
from .io import atomic_dir, read_json, write_json

FORMAT_VERSION = 1

VISITS_FILE, PATIENTS_FILE, VOCAB_FILE, META_FILE = (
    "visits.parquet", "patients.parquet", "vocab.parquet", "meta.json")

VISITS_SCHEMA: dict[str, pl.DataType] = {
    "patient_id": pl.String, "visit_index": pl.Int32, "codes": pl.List(pl.Int32),
    "label": pl.Int8, "synthetic": pl.Boolean}
PATIENTS_BASE_SCHEMA: dict[str, pl.DataType] = {
    "patient_id": pl.String, "label": pl.Int8, "synthetic": pl.Boolean}
VOCAB_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Int32, "token": pl.String, "kind": pl.String, "description": pl.String}
REQUIRED_META = ("format_version", "source", "outcome", "groups")


@dataclass(frozen=True)
class VisitMatrix:
    """One row per visit, ready for scikit-learn.

    Attributes
    ----------
    X : scipy.sparse.csr_matrix of shape (n_visits, V), float32 multi-hot tokens.
    y : ndarray of shape (n_visits,), int8 visit labels.
    frame : polars.DataFrame with ``patient_id``, ``visit_index``, the patient's group columns
        and ``synthetic``, row-aligned with ``X``.
    """

    X: sp.csr_matrix
    y: np.ndarray
    frame: pl.DataFrame


@dataclass(frozen=True)
class Records:
    """Patients as ragged arrays, the generator's view of a dataset.

    Patient ``p`` owns visits ``visit_ptr[p]:visit_ptr[p+1]``; visit ``v`` owns tokens
    ``codes[code_ptr[v]:code_ptr[v+1]]`` (sorted ascending).
    """

    patient_ids: list[str]
    labels: np.ndarray  # int8, (n_patients,)
    groups: pl.DataFrame  # one str column per group attribute, (n_patients, n_attributes)
    visit_ptr: np.ndarray  # int64, (n_patients + 1,)
    code_ptr: np.ndarray  # int64, (n_visits + 1,)
    codes: np.ndarray  # int32, (n_tokens,)

    def __len__(self) -> int:
        return len(self.patient_ids)

    def visit_counts(self) -> np.ndarray:
        return np.diff(self.visit_ptr)

    def patient(self, p: int) -> list[list[int]]:
        """Patient ``p``'s visits as lists of token ids."""
        return [self.codes[self.code_ptr[v]:self.code_ptr[v + 1]].tolist()
                for v in range(self.visit_ptr[p], self.visit_ptr[p + 1])]

    def keys(self) -> list[tuple[tuple[int, ...], ...]]:
        """Each patient's record as a hashable tuple of visit tuples (for exact-copy checks)."""
        visits = [tuple(self.codes[a:b].tolist()) for a, b in zip(self.code_ptr[:-1], self.code_ptr[1:])]
        return [tuple(visits[self.visit_ptr[p]:self.visit_ptr[p + 1]]) for p in range(len(self))]


class PreparedDataset:
    """A prepared EHR dataset (see the module docstring for the format).

    Parameters
    ----------
    visits, patients, vocab : polars.DataFrame
        The three tables, in the schemas above.
    meta : dict
        The content of ``meta.json``.

    The constructor stores its arguments only; call :meth:`validate` (``load`` does) to check them.
    """

    def __init__(self, visits: pl.DataFrame, patients: pl.DataFrame, vocab: pl.DataFrame,
                 meta: dict[str, Any]) -> None:
        self.visits = visits
        self.patients = patients
        self.vocab = vocab
        self.meta = meta

    # ------------------------------------------------------------------ properties
    @property
    def group_categories(self) -> dict[str, list[str]]:
        """``{attribute: [categories]}`` in the order fixed by ``meta.json``."""
        return {k: list(v) for k, v in self.meta["groups"].items()}

    @property
    def group_attributes(self) -> list[str]:
        return list(self.meta["groups"])

    @property
    def vocab_size(self) -> int:
        return self.vocab.height

    @property
    def n_patients(self) -> int:
        return self.patients.height

    @property
    def n_visits(self) -> int:
        return self.visits.height

    def __repr__(self) -> str:
        n_syn = int(self.patients["synthetic"].sum()) if "synthetic" in self.patients.columns else 0
        return (f"PreparedDataset(patients={self.n_patients} ({n_syn} synthetic), "
                f"visits={self.n_visits}, vocab={self.vocab_size}, groups={self.group_attributes})")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def load(cls, path: str | os.PathLike, *, validate: bool = True) -> PreparedDataset:
        """Read a prepared-dataset folder; by default validate it and raise :class:`DatasetError`."""
        root = Path(path)
        if not root.is_dir():
            raise DatasetError("prepared dataset folder not found", file=str(root),
                               fix="pass the folder written by data_prep or halo_balance.generate")
        for name in (VISITS_FILE, PATIENTS_FILE, VOCAB_FILE, META_FILE):
            if not (root / name).is_file():
                raise DatasetError("required file is missing", file=str(root / name),
                                   fix="re-run the preparation step that writes this folder")
        tables = {}
        for name in (VISITS_FILE, PATIENTS_FILE, VOCAB_FILE):
            try:
                tables[name] = pl.read_parquet(root / name)
            except Exception as exc:  # polars raises several exception types for corrupt files
                raise DatasetError(f"cannot be read as parquet ({exc})", file=str(root / name)) from exc
        try:
            meta = read_json(root / META_FILE)
        except ValueError as exc:
            raise DatasetError(f"is not valid JSON ({exc})", file=str(root / META_FILE)) from exc
        ds = cls(tables[VISITS_FILE], tables[PATIENTS_FILE], tables[VOCAB_FILE], meta)
        if validate:
            ds.validate(where=str(root))
        return ds

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Validate, then write the folder atomically (temporary folder, then rename)."""
        with atomic_dir(path, overwrite=overwrite) as tmp:
            self.write_files(tmp)
        return Path(path)

    def write_files(self, folder: str | os.PathLike) -> None:
        """Validate, then write the four files into an existing ``folder`` (not atomic by itself).

        For callers that assemble a larger output inside their own :func:`~halo_balance.io.atomic_dir`.
        The counts in ``meta.json`` are refreshed from the tables.
        """
        self.validate()
        meta = copy.deepcopy(self.meta)
        counts = meta.setdefault("counts", {})
        counts["patients"] = self.n_patients
        counts["visits"] = self.n_visits
        counts["synthetic_patients"] = int(self.patients["synthetic"].sum())
        meta["vocab_size"] = self.vocab_size
        folder = Path(folder)
        self.visits.write_parquet(folder / VISITS_FILE)
        self.patients.write_parquet(folder / PATIENTS_FILE)
        self.vocab.write_parquet(folder / VOCAB_FILE)
        write_json(folder / META_FILE, meta)
        self.meta = meta

    # ------------------------------------------------------------------ validation
    def validate(self, *, where: str | None = None) -> PreparedDataset:
        """Check every rule of the format; raise :class:`DatasetError` naming file, column, value."""
        def f(name: str) -> str:
            return str(Path(where) / name) if where else name

        self._validate_meta(f(META_FILE))
        groups = self.group_categories
        patients_schema = {**PATIENTS_BASE_SCHEMA, **{g: pl.String for g in groups}}
        _check_schema(self.visits, VISITS_SCHEMA, f(VISITS_FILE))
        _check_schema(self.patients, patients_schema, f(PATIENTS_FILE))
        _check_schema(self.vocab, VOCAB_SCHEMA, f(VOCAB_FILE))
        _check_no_nulls(self.visits, list(VISITS_SCHEMA), f(VISITS_FILE))
        _check_no_nulls(self.patients, list(patients_schema), f(PATIENTS_FILE))
        _check_no_nulls(self.vocab, ["id", "token", "kind"], f(VOCAB_FILE))
        self._validate_vocab(f(VOCAB_FILE))
        self._validate_patients(f(PATIENTS_FILE), groups)
        self._validate_visits(f(VISITS_FILE), f(PATIENTS_FILE))
        return self

    def _validate_meta(self, file: str) -> None:
        if not isinstance(self.meta, dict):
            raise DatasetError("must hold a JSON object", file=file)
        for key in REQUIRED_META:
            if key not in self.meta:
                raise DatasetError(f"required key {key!r} is missing", file=file)
        if self.meta["format_version"] != FORMAT_VERSION:
            raise DatasetError(f"unsupported format_version (this package reads {FORMAT_VERSION})",
                               file=file, value=self.meta["format_version"])
        groups = self.meta["groups"]
        if not isinstance(groups, dict) or not all(
                isinstance(c, list) and c and all(isinstance(x, str) for x in c) for c in groups.values()):
            raise DatasetError("'groups' must map each attribute to a non-empty list of category names",
                               file=file, value=groups)
        reserved = set(PATIENTS_BASE_SCHEMA)
        if reserved & set(groups):
            raise DatasetError("a group attribute uses a reserved column name", file=file,
                               value=sorted(reserved & set(groups)))

    def _validate_vocab(self, file: str) -> None:
        ids = self.vocab["id"].to_numpy()
        expected = np.arange(len(ids), dtype=ids.dtype)
        if not np.array_equal(ids, expected):
            bad = int(np.flatnonzero(ids != expected)[0])
            raise DatasetError(f"ids must be dense 0..V-1 in row order; row {bad} holds another id",
                               file=file, column="id", value=int(ids[bad]))
        dup = self.vocab.filter(pl.col("token").is_duplicated())
        if dup.height:
            raise DatasetError(f"{dup.height} rows repeat a token", file=file, column="token",
                               value=dup["token"][0])

    def _validate_patients(self, file: str, groups: dict[str, list[str]]) -> None:
        p = self.patients
        dup = p.filter(pl.col("patient_id").is_duplicated())
        if dup.height:
            raise DatasetError("patient ids must be unique", file=file, column="patient_id",
                               value=dup["patient_id"][0])
        _check_binary(p, "label", file)
        for attr, cats in groups.items():
            bad = p.filter(~pl.col(attr).is_in(cats))
            if bad.height:
                raise DatasetError(
                    f"{bad.height} patients have a category not listed in meta.json groups[{attr!r}] "
                    f"= {cats} (first: patient {bad['patient_id'][0]!r})", file=file, column=attr,
                    value=bad[attr][0], fix="add the category to meta.json or map it to a listed one")

    def _validate_visits(self, file: str, patients_file: str) -> None:
        v, V = self.visits, self.vocab_size
        _check_binary(v, "label", file)
        unknown = v.join(self.patients.select("patient_id"), on="patient_id", how="anti")
        if unknown.height:
            raise DatasetError(f"{unknown.height} visits belong to patients missing from patients.parquet",
                               file=file, column="patient_id", value=unknown["patient_id"][0])
        orphans = self.patients.join(v.select("patient_id").unique(), on="patient_id", how="anti")
        if orphans.height:
            raise DatasetError(f"{orphans.height} patients have no visits", file=patients_file,
                               column="patient_id", value=orphans["patient_id"][0],
                               fix="every patient needs at least one visit; drop (and count) such patients")
        codes = v.select(
            "patient_id", "visit_index",
            lo=pl.col("codes").list.min(), hi=pl.col("codes").list.max(),
            has_null=pl.col("codes").list.eval(pl.element().is_null()).list.any(),
            min_step=pl.col("codes").list.diff(null_behavior="drop").list.min())
        nulls = codes.filter(pl.col("has_null"))
        if nulls.height:
            raise DatasetError("token lists must not contain nulls", file=file, column="codes",
                               value=_visit_ref(nulls))
        out = codes.filter((pl.col("lo") < 0) | (pl.col("hi") >= V))
        if out.height:
            val = out["lo"][0] if out["lo"][0] < 0 else out["hi"][0]
            raise DatasetError(f"{out.height} visits hold token ids outside the vocabulary 0..{V - 1} "
                               f"(first: {_visit_ref(out)})", file=file, column="codes", value=val)
        unsorted = codes.filter(pl.col("min_step") <= 0)
        if unsorted.height:
            kind = "duplicate" if unsorted["min_step"][0] == 0 else "unsorted"
            raise DatasetError(f"{unsorted.height} visits hold unsorted or duplicate token ids "
                               f"(first: {_visit_ref(unsorted)}, {kind})", file=file, column="codes",
                               value=v.filter((pl.col("patient_id") == unsorted["patient_id"][0]) & (
                                   pl.col("visit_index") == unsorted["visit_index"][0]))["codes"][0].to_list(),
                               fix="each visit's codes must be strictly increasing")
        per = v.group_by("patient_id").agg(
            n=pl.len(), n_unique=pl.col("visit_index").n_unique(),
            lo=pl.col("visit_index").min(), hi=pl.col("visit_index").max())
        dup = per.filter(pl.col("n_unique") < pl.col("n"))
        if dup.height:
            pid = dup["patient_id"][0]
            idx = v.filter((pl.col("patient_id") == pid) & pl.col("visit_index").is_duplicated())["visit_index"][0]
            raise DatasetError(f"{dup.height} patients repeat a visit_index (first: patient {pid!r})",
                               file=file, column="visit_index", value=int(idx))
        gap = per.filter((pl.col("lo") != 0) | (pl.col("hi") != pl.col("n") - 1))
        if gap.height:
            raise DatasetError(f"{gap.height} patients have visit_index values that are not 0..n-1 "
                               f"(first: patient {gap['patient_id'][0]!r}, range {gap['lo'][0]}.."
                               f"{gap['hi'][0]} for {gap['n'][0]} visits)", file=file,
                               column="visit_index", value=int(gap["hi"][0]))
        joined = v.join(per.select("patient_id", last=pl.col("hi")), on="patient_id").join(
            self.patients.select("patient_id", p_label="label", p_syn="synthetic"), on="patient_id")
        early = joined.filter((pl.col("label") == 1) & (pl.col("visit_index") != pl.col("last")))
        if early.height:
            raise DatasetError(f"{early.height} positive visit labels are not on the patient's final "
                               f"visit (first: {_visit_ref(early)})", file=file, column="label", value=1,
                               fix="the outcome belongs on the final visit; earlier visits are 0")
        mism = joined.filter((pl.col("visit_index") == pl.col("last")) & (pl.col("label") != pl.col("p_label")))
        if mism.height:
            raise DatasetError(f"{mism.height} patients' label differs from their final visit's label "
                               f"(first: patient {mism['patient_id'][0]!r})", file=patients_file,
                               column="label", value=int(mism["p_label"][0]))
        syn = joined.filter(pl.col("synthetic") != pl.col("p_syn"))
        if syn.height:
            raise DatasetError(f"{syn.height} visits disagree with their patient's synthetic flag "
                               f"(first: {_visit_ref(syn)})", file=file, column="synthetic",
                               value=syn["synthetic"][0])

    # ------------------------------------------------------------------ views
    def _visits_in_patient_order(self) -> pl.DataFrame:
        order = self.patients.select("patient_id").with_row_index("_p")
        return (self.visits.join(order, on="patient_id", how="left")
                .sort("_p", "visit_index").drop("_p"))

    def to_visit_matrix(self) -> VisitMatrix:
        """One row per visit (patients in table order, visits chronological): CSR, labels, frame."""
        v = self._visits_in_patient_order()
        offsets, values = ragged_arrays(v["codes"])
        X = sp.csr_matrix((np.ones(len(values), dtype=np.float32), values, offsets),
                          shape=(v.height, self.vocab_size))
        frame = v.select("patient_id", "visit_index").join(
            self.patients.select("patient_id", *self.group_attributes, "synthetic"),
            on="patient_id", how="left", maintain_order="left")
        return VisitMatrix(X=X, y=v["label"].to_numpy(), frame=frame)

    def records(self) -> Records:
        """Patients as ragged arrays (patients in table order, visits chronological)."""
        v = self._visits_in_patient_order()
        code_ptr, codes = ragged_arrays(v["codes"])
        counts = (self.patients.select("patient_id")
                  .join(v.group_by("patient_id").len(), on="patient_id", how="left",
                        maintain_order="left")["len"].fill_null(0).to_numpy())
        visit_ptr = np.zeros(self.n_patients + 1, dtype=np.int64)
        np.cumsum(counts, out=visit_ptr[1:])
        return Records(patient_ids=self.patients["patient_id"].to_list(),
                       labels=self.patients["label"].to_numpy(),
                       groups=self.patients.select(self.group_attributes),
                       visit_ptr=visit_ptr, code_ptr=code_ptr, codes=codes)

    @classmethod
    def from_records(cls, *, patient_ids: Sequence[str], labels: Sequence[int] | np.ndarray,
                     groups: pl.DataFrame | dict[str, Sequence[str]], visits: Sequence[Sequence[Sequence[int]]],
                     vocab: pl.DataFrame, meta: dict[str, Any], synthetic: bool) -> PreparedDataset:
        """Build a dataset from per-patient visit lists; visit labels follow the patient label.

        Token lists are sorted and de-duplicated here, so callers may pass them in any order.
        """
        labels = np.asarray(labels, dtype=np.int8)
        n_vis = np.fromiter((len(r) for r in visits), dtype=np.int64, count=len(visits))
        flat = [sorted(set(int(c) for c in visit)) for rec in visits for visit in rec]
        code_ptr = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in flat], out=code_ptr[1:])
        codes = np.fromiter((c for visit in flat for c in visit), dtype=np.int32, count=int(code_ptr[-1]))
        visit_ptr = np.zeros(len(visits) + 1, dtype=np.int64)
        np.cumsum(n_vis, out=visit_ptr[1:])
        return cls.from_arrays(patient_ids=patient_ids, labels=labels, groups=groups, visit_ptr=visit_ptr,
                               code_ptr=code_ptr, codes=codes, vocab=vocab, meta=meta, synthetic=synthetic)

    @classmethod
    def from_arrays(cls, *, patient_ids: Sequence[str], labels: np.ndarray,
                    groups: pl.DataFrame | dict[str, Sequence[str]], visit_ptr: np.ndarray,
                    code_ptr: np.ndarray, codes: np.ndarray, vocab: pl.DataFrame,
                    meta: dict[str, Any], synthetic: bool) -> PreparedDataset:
        """Build a dataset from ragged arrays (the layout of :class:`Records`; codes must be sorted)."""
        n = len(patient_ids)
        n_vis = np.diff(np.asarray(visit_ptr, dtype=np.int64))
        pids = pl.Series("patient_id", list(patient_ids), dtype=pl.String)
        labels = np.asarray(labels, dtype=np.int8)
        owner = np.repeat(np.arange(n), n_vis)
        last = np.zeros(len(owner), dtype=bool)
        last[np.asarray(visit_ptr[1:], dtype=np.int64)[n_vis > 0] - 1] = True
        visit_index = (np.arange(len(owner)) - np.repeat(np.asarray(visit_ptr[:-1], dtype=np.int64), n_vis))
        code_list = pa.LargeListArray.from_arrays(pa.array(np.asarray(code_ptr, dtype=np.int64)),
                                                  pa.array(np.asarray(codes, dtype=np.int32)))
        visits = pl.DataFrame({
            "patient_id": pids.gather(owner),
            "visit_index": pl.Series(visit_index, dtype=pl.Int32),
            "codes": pl.Series(code_list).cast(pl.List(pl.Int32)),
            "label": pl.Series(np.where(last, labels[owner], 0), dtype=pl.Int8),
            "synthetic": pl.Series(np.full(len(owner), synthetic)),
        })
        gframe = groups if isinstance(groups, pl.DataFrame) else pl.DataFrame(
            {k: pl.Series(list(v), dtype=pl.String) for k, v in groups.items()})
        patients = pl.DataFrame({"patient_id": pids, "label": pl.Series(labels, dtype=pl.Int8)}).hstack(
            gframe.select(list(meta["groups"]))).with_columns(synthetic=pl.lit(synthetic))
        return cls(visits, patients, vocab, copy.deepcopy(meta))

    # ------------------------------------------------------------------ selection and splits
    def select(self, patient_ids: Iterable[str]) -> PreparedDataset:
        """The sub-dataset of these patients (in this dataset's order); unknown ids are an error."""
        ids = pl.Series("patient_id", list(patient_ids), dtype=pl.String)
        missing = ids.to_frame().join(self.patients.select("patient_id"), on="patient_id", how="anti")
        if missing.height:
            raise DatasetError(f"{missing.height} requested patient ids are not in the dataset",
                               column="patient_id", value=missing["patient_id"][0])
        keep = pl.col("patient_id").is_in(ids.implode())
        return PreparedDataset(self.visits.filter(keep), self.patients.filter(keep), self.vocab,
                               copy.deepcopy(self.meta))

    @classmethod
    def concat(cls, datasets: Sequence[PreparedDataset]) -> PreparedDataset:
        """Stack datasets that share one vocabulary and group layout (e.g. real + synthetic).

        The first dataset's metadata is kept; patient ids must not collide.
        """
        first = datasets[0]
        for other in datasets[1:]:
            if not other.vocab.equals(first.vocab):
                raise DatasetError("cannot concatenate datasets with different vocabularies",
                                   file=VOCAB_FILE)
            if other.group_categories != first.group_categories:
                raise DatasetError("cannot concatenate datasets with different group layouts",
                                   file=META_FILE, value=other.group_categories)
        patients = pl.concat([d.patients.select(first.patients.columns) for d in datasets])
        dup = patients.filter(pl.col("patient_id").is_duplicated())
        if dup.height:
            raise DatasetError("patient ids collide between the concatenated datasets",
                               file=PATIENTS_FILE, column="patient_id", value=dup["patient_id"][0])
        visits = pl.concat([d.visits.select(list(VISITS_SCHEMA)) for d in datasets])
        return cls(visits, patients, first.vocab, copy.deepcopy(first.meta))

    def cell_groupings(self, cells: Sequence[Sequence[str]] | None = None) -> list[list[str]]:
        """The group attributes of each per-cell table: ``cells`` as lists, or each attribute alone."""
        return [[g] for g in self.group_attributes] if cells is None else [list(c) for c in cells]

    def strata(self, groups: Sequence[str] | None = None) -> pl.Series:
        """Per-patient cell name: the outcome crossed with the given group attributes."""
        groups = self.group_attributes if groups is None else list(groups)
        self._check_attributes(groups)
        parts = [pl.lit("label=") + pl.col("label").cast(pl.String)]
        parts += [pl.lit(f"{g}=") + pl.col(g) for g in groups]
        return self.patients.select(pl.concat_str(parts, separator="|").alias("stratum"))["stratum"]

    def _check_attributes(self, groups: Sequence[str]) -> None:
        unknown = [g for g in groups if g not in self.meta["groups"]]
        if unknown:
            raise unknown_choice("group attribute", unknown, self.group_attributes, error=DatasetError)

    def kfold(self, n_splits: int = 5, *, groups: Sequence[str] | None = None,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Patient-level stratified k-fold: ``[(train_ids, test_ids), ...]``.

        Strata are outcome x ``groups`` (default: all attributes). Strata with fewer than
        ``n_splits`` patients fall back to the outcome alone so that every fold sees every outcome.
        """
        from sklearn.model_selection import StratifiedKFold

        y = _merge_rare(self.strata(groups), self.patients["label"], n_splits)
        ids = self.patients["patient_id"].to_numpy()
        skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [(ids[tr], ids[te]) for tr, te in skf.split(np.zeros(len(ids)), y)]

    def train_test_split(self, test_fraction: float, *, groups: Sequence[str] | None = None,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Patient-level stratified split: ``(train_ids, test_ids)``."""
        from sklearn.model_selection import train_test_split

        ids = self.patients["patient_id"].to_numpy()
        y = _merge_rare(self.strata(groups), self.patients["label"], 2)
        try:
            return tuple(train_test_split(ids, test_size=test_fraction, random_state=seed, stratify=y))
        except ValueError:  # too few patients per stratum for the requested fraction
            return tuple(train_test_split(ids, test_size=test_fraction, random_state=seed))

    def cell_counts(self, groups: Sequence[str] | None = None, *, synthetic: bool | None = None) -> pl.DataFrame:
        """Patients per (outcome x groups) cell; ``synthetic`` filters real / synthetic rows."""
        groups = self.group_attributes if groups is None else list(groups)
        self._check_attributes(groups)
        p = self.patients if synthetic is None else self.patients.filter(pl.col("synthetic") == synthetic)
        return p.group_by("label", *groups).len("n").sort("label", *groups)


# ---------------------------------------------------------------------- helpers
def ragged_arrays(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets int64, values int32)`` of a list<int32> column without copying per row."""
    arr = series.rechunk().to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.int32, copy=False)
    return offsets - offsets[0], values


def empty_meta(*, source: str, source_version: str = "", outcome: str = "in_hospital_mortality",
               groups: dict[str, list[str]]) -> dict[str, Any]:
    """A minimal valid ``meta.json`` content; preparation steps add their parameters and counts."""
    return {"format_version": FORMAT_VERSION, "source": {"name": source, "version": source_version},
            "outcome": outcome, "groups": groups, "preprocessing": {}, "counts": {"dropped": {}}}


def _merge_rare(strata: pl.Series, labels: pl.Series, min_count: int) -> np.ndarray:
    counts = strata.value_counts()
    rare = set(counts.filter(pl.col("count") < min_count)["stratum"].to_list())
    fallback = pl.Series(["label=" + str(x) for x in labels.to_list()])
    return np.where(strata.is_in(list(rare)).to_numpy(), fallback.to_numpy(), strata.to_numpy())


def _check_schema(df: pl.DataFrame, schema: dict[str, pl.DataType], file: str) -> None:
    for col, dtype in schema.items():
        if col not in df.columns:
            raise DatasetError("required column is missing", file=file, column=col,
                               fix=f"add it with type {dtype}")
        if df.schema[col] != dtype:
            raise DatasetError(f"has type {df.schema[col]}, expected {dtype}", file=file, column=col,
                               fix=f"cast the column to {dtype}")


def _check_no_nulls(df: pl.DataFrame, columns: list[str], file: str) -> None:
    for col in columns:
        n = df[col].null_count()
        if n:
            raise DatasetError(f"{n} rows are null", file=file, column=col, value=None)


def _check_binary(df: pl.DataFrame, col: str, file: str) -> None:
    bad = df.filter(~pl.col(col).is_in([0, 1]))
    if bad.height:
        raise DatasetError(f"{bad.height} rows hold a label other than 0/1", file=file, column=col,
                           value=int(bad[col][0]))


def _visit_ref(df: pl.DataFrame) -> str:
    return f"patient {df['patient_id'][0]!r} visit {df['visit_index'][0]}"
