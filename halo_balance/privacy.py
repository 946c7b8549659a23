"""Privacy of synthetic records: copies, closeness to training patients and three attacks.

- **Exact copies**: synthetic records whose whole visit sequence equals a training record.
- **Nearest-neighbour distance**: each record is the set of tokens it holds in any visit; the
  distance between two records is the Jaccard distance ``1 - |A & B| / |A | B|`` (0 for two empty
  records) or, on request, the Hamming distance ``|A ^ B|``. Synthetic-to-training distances are set
  beside held-out-to-training distances: a generator that memorises sits closer to its training
  patients than new real patients do.
- **Membership inference**: an attacker ranks training patients (members) above held-out patients
  (non-members), by closeness to the nearest synthetic record or by the model's likelihood; AUROC
  0.5 means the attacker learns nothing. The same attacks run within each outcome x group cell
  (members and non-members of that cell only): a generator that learns a small cell's few patients
  exposes them, and they weigh little in an attack over every record.
- **Attribute inference**: an attacker who knows a patient's tokens predicts a hidden attribute (a
  group, the outcome or a sensitive token) by majority vote of its ``k`` nearest synthetic records;
  its accuracy is set beside a guess of the training data's majority class and beside the same
  attacker working from real patients outside the training data (what any population sample would
  reveal); its *advantage* is its balanced accuracy minus the better of those two.
- **Verdict** (:func:`privacy_verdict`): every attack against its baseline, graded by the
  thresholds of :data:`VERDICT_THRESHOLDS`, the worst one named, in plain words.

Distances come from sparse products in blocks of query rows, so memory stays bounded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import numpy as np
import polars as pl
import scipy.sparse as sp

from .copies import COPY_K, CopyFilter, RecordCounts, record_digests
from .data import PreparedDataset, Records
from .errors import DatasetError, unknown_choice
from .fidelity import distribution_summary, record_matrix

Metric = Literal["jaccard", "hamming"]

# distances computed per block: query rows x reference rows
BLOCK_CELLS = 1 << 23
# records queried per side for distances (the reference side is always complete)
MAX_QUERIES = 5_000

#: (some leakage above, leaks above) per kind of figure: membership AUROC (chance 0.5; 0.55 is about
#: three standard errors at 400 held-out patients), attribute-inference advantage in balanced
#: accuracy, copies of training records held by fewer than k patients
VERDICT_THRESHOLDS = {"auroc": (0.55, 0.65), "advantage": (0.02, 0.05), "rare_copies": (0, 0)}
VERDICT_LEVELS = ("no measurable leak", "some leakage", "leaks")
#: family-wise error rate of the per-cell membership attacks: a cell's AUROC counts only where Holm's
#: step-down procedure over every cell attack of the report rules chance out at this rate
CELL_FAMILY_ERROR = 0.05


# ---------------------------------------------------------------------- copies
def exact_copies(synthetic: Records, train: Records, *, k: int = COPY_K) -> dict[str, int]:
    """How many synthetic records equal a training record (every visit, every token, same order).

    Returns ``synthetic_copies`` (synthetic records equal to some training record),
    ``copies_of_unique_records`` (those equal to a training record that occurs once in the
    training data: common records, such as one visit with one frequent token, are shared by many
    patients and reveal no one), ``copies_of_rare_records`` (equal to a training record held by
    fewer than ``k`` patients: the copies ``halo_balance.copies`` rejects), ``rare_k`` (that k),
    ``training_records_copied`` (distinct training records reproduced) and ``training_duplicates``
    (training records equal to an earlier training record: copies the data itself already holds).
    """
    reference = RecordCounts.from_dataset(train)
    digests = record_digests(synthetic, reference.salt)
    held = reference.held(digests)  # one digest per record, for the counts and the distinct copies alike
    return {"synthetic_copies": int((held > 0).sum()), "copies_of_unique_records": int((held == 1).sum()),
            "copies_of_rare_records": int(CopyFilter(k=k).is_rare(held).sum()), "rare_k": k,
            "training_records_copied": len({d for d, n in zip(digests, held) if n > 0}),
            "training_duplicates": reference.n_patients - len(reference.counts)}


# ---------------------------------------------------------------------- distances
def nearest_neighbours(queries: sp.csr_matrix, reference: sp.csr_matrix, *, k: int = 1,
                       metric: Metric = "jaccard", exclude: np.ndarray | None = None,
                       block_cells: int = BLOCK_CELLS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest reference rows of every query row, by distance between their token sets.

    Parameters
    ----------
    queries, reference : csr_matrix
        Multi-hot rows (any positive value counts as present) over the same columns.
    k : int
        Neighbours per query (at most the number of reference rows, or one less with ``exclude``).
    metric : {"jaccard", "hamming"}
    exclude : ndarray of shape (n_queries,), optional
        For queries drawn from ``reference``: the reference row of each query, which may not be its
        own neighbour (another, identical row still may, at distance 0).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float64, ascending per row.
    indices : ndarray of shape (n_queries, k), int64 rows of ``reference``.
    """
    if metric not in get_args(Metric):
        raise unknown_choice("metric", [metric], get_args(Metric), error=ValueError)
    Q, R = _binary(queries), _binary(reference)
    n_ref = R.shape[0]
    k = min(k, n_ref - int(exclude is not None))
    if k < 1:
        raise ValueError("nearest_neighbours needs at least one reference row besides the query itself")
    q_size, r_size = np.diff(Q.indptr).astype(np.float32), np.diff(R.indptr).astype(np.float32)
    r_empty = np.flatnonzero(r_size == 0)
    RT = R.T.tocsc()
    step = max(1, block_cells // max(n_ref, 1))
    dist = np.empty((Q.shape[0], k))
    ind = np.empty((Q.shape[0], k), dtype=np.int64)
    for lo in range(0, Q.shape[0], step):
        hi = min(lo + step, Q.shape[0])
        d = (Q[lo:hi] @ RT).toarray()  # float32 intersection sizes, turned into distances in place
        if metric == "jaccard":
            union = q_size[lo:hi, None] + r_size[None, :] - d
            np.divide(d, np.maximum(union, 1, out=union), out=d)
            np.subtract(1, d, out=d)
            q_empty = np.flatnonzero(q_size[lo:hi] == 0)
            if len(q_empty) and len(r_empty):  # two empty records are equal
                d[np.ix_(q_empty, r_empty)] = 0
        else:
            d *= -2
            d += q_size[lo:hi, None]
            d += r_size[None, :]
        if exclude is not None:
            d[np.arange(hi - lo), exclude[lo:hi]] = np.inf
        if k == 1:
            ind[lo:hi, 0] = d.argmin(axis=1)
        else:
            part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n_ref else np.tile(np.arange(n_ref), (hi - lo, 1))
            order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
            ind[lo:hi] = np.take_along_axis(part, order, axis=1)
        dist[lo:hi] = np.take_along_axis(d, ind[lo:hi], axis=1)
    return dist, ind


def _binary(X: sp.spmatrix) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.eliminate_zeros()
    X.data[:] = 1.0
    return X


def record_features(dataset: PreparedDataset, *, drop_tokens: Sequence[int] = ()) -> sp.csr_matrix:
    """Per-record multi-hot rows over the vocabulary, with the columns of ``drop_tokens`` emptied."""
    R = record_matrix(dataset.records(), dataset.vocab_size)
    if len(drop_tokens):
        R.data[np.isin(R.indices, np.asarray(drop_tokens))] = 0
        R.eliminate_zeros()
    return R


# ---------------------------------------------------------------------- membership inference
def membership_auroc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> dict[str, Any]:
    """AUROC of an attacker who calls a record a member when its score is high.

    Also the true-positive rate at a 10% false-positive rate (the attacker's hit rate when it
    may wrongly accuse one non-member in ten) and the AUROC's standard error (Hanley & McNeil,
    1982), which says how far from 0.5 chance alone takes it at these sample sizes. ``None``
    figures when either side is empty.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    member_scores, nonmember_scores = np.asarray(member_scores, float), np.asarray(nonmember_scores, float)
    out: dict[str, Any] = {"n_members": int(len(member_scores)), "n_nonmembers": int(len(nonmember_scores))}
    if not len(member_scores) or not len(nonmember_scores):
        return {**out, "auroc": None, "auroc_se": None, "tpr_at_fpr_0.1": None}
    y = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    s = np.r_[member_scores, nonmember_scores]
    fpr, tpr, _ = roc_curve(y, s)
    auroc = float(roc_auc_score(y, s))
    return {**out, "auroc": auroc, "auroc_se": auroc_standard_error(auroc, len(member_scores), len(nonmember_scores)),
            "tpr_at_fpr_0.1": float(tpr[fpr <= 0.1].max())}


def auroc_standard_error(auroc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUROC from ``n_positive`` and ``n_negative`` scores."""
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_positive - 1) * (q1 - a * a) + (n_negative - 1) * (q2 - a * a)) / (n_positive * n_negative)
    return float(np.sqrt(max(var, 0.0)))


def cell_membership_inference(members: PreparedDataset, nonmembers: PreparedDataset,
                              scores: dict[str, tuple[np.ndarray, np.ndarray]], *,
                              cells: Sequence[Sequence[str]] | None = None, min_patients: int = 20,
                              references: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                              ) -> list[dict[str, Any]]:
    """Each membership attack within each (outcome x group) cell: that cell's members against its non-members.

    Parameters
    ----------
    members, nonmembers : PreparedDataset
        The patients attacked, in the order of the scores.
    scores : dict
        Attack name -> (member scores, non-member scores), higher meaning likelier a member.
    cells : sequence of sequences of str, optional
        Group attributes crossed with the outcome to form cells; default: each attribute alone.
    min_patients : int
        A cell is attacked only when it holds at least this many members and non-members.
    references : dict, optional
        Scores of the same form from a reference model (:func:`code_frequency_log_likelihood`).

    Returns
    -------
    list of dict, one per cell present on either side: ``cell``, ``groups``, ``n_members``,
    ``n_nonmembers``, ``attacks`` (name -> :func:`membership_auroc`; empty for a cell below
    ``min_patients``, which also gets ``skipped``) and, with ``references``, ``code_frequency``
    (the same for the reference scores).
    """
    rows = []
    for groups in members.cell_groupings(cells):
        m_cell, n_cell = members.strata(groups).to_numpy(), nonmembers.strata(groups).to_numpy()
        for cell in sorted(set(m_cell) | set(n_cell)):
            in_m, in_n = m_cell == cell, n_cell == cell
            row: dict[str, Any] = {"cell": cell, "groups": groups, "n_members": int(in_m.sum()),
                                   "n_nonmembers": int(in_n.sum()), "attacks": {}}
            if min(row["n_members"], row["n_nonmembers"]) < max(min_patients, 1):
                row["skipped"] = f"fewer than {min_patients} members or non-members"
            else:
                row["attacks"] = {name: membership_auroc(m[in_m], n[in_n]) for name, (m, n) in scores.items()}
                if references:
                    row["code_frequency"] = {name: membership_auroc(m[in_m], n[in_n])
                                             for name, (m, n) in references.items()}
            rows.append(row)
    return rows


def distance_membership_inference(member_distances: np.ndarray, nonmember_distances: np.ndarray) -> dict[str, Any]:
    """Membership by closeness: the nearer a record's nearest synthetic record, the likelier a member."""
    return membership_auroc(-np.asarray(member_distances, float), -np.asarray(nonmember_distances, float))


def likelihood_membership_inference(member_log_likelihood: np.ndarray, nonmember_log_likelihood: np.ndarray, *,
                                    member_sizes: np.ndarray | None = None,
                                    nonmember_sizes: np.ndarray | None = None) -> dict[str, Any]:
    """Membership by the model's log-likelihood (higher: likelier a member).

    With ``*_sizes`` (events per record, e.g. tokens + visits), a second attacker divides the
    log-likelihood by the size first, so that short records do not look like members merely for
    being short; its figures are under ``per_event``.
    """
    out = membership_auroc(member_log_likelihood, nonmember_log_likelihood)
    if member_sizes is not None and nonmember_sizes is not None:
        out["per_event"] = membership_auroc(per_event(member_log_likelihood, member_sizes),
                                            per_event(nonmember_log_likelihood, nonmember_sizes))
    return out


def code_frequency_log_likelihood(fit_on: PreparedDataset) -> Callable[[PreparedDataset], np.ndarray]:
    """``dataset -> per-patient log-likelihood`` under the marginal-frequency model of ``fit_on``.

    Each code an independent Bernoulli of its visit frequency among ``fit_on``'s patients and a
    constant end-of-record hazard (:class:`halo_balance.train.MarginalModel`, the baseline of the
    training loss). It knows those patients only through their code counts, so its membership
    attack is what such a summary of them reveals (records holding codes that few of them share
    stand out): a reference for a generator's attack.
    """
    from .config import ConditionLayout
    from .train import EncodedRecords, MarginalModel

    def encode(ds: PreparedDataset) -> EncodedRecords:  # no truncation: a context beyond the longest record
        n_ctx = int(ds.records().visit_counts().max(initial=0)) + 2
        return EncodedRecords.from_dataset(ds, ConditionLayout.from_dataset(ds), n_ctx)

    model = MarginalModel.fit(encode(fit_on), fit_on.vocab_size)
    return lambda ds: model.record_log_likelihood(encode(ds))


def per_event(log_likelihood: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Log-likelihood per event (tokens + visits), so that short records do not look like members for being short."""
    return np.asarray(log_likelihood, float) / np.maximum(sizes, 1)


# ---------------------------------------------------------------------- attribute inference
def knn_vote(neighbour_values: np.ndarray) -> np.ndarray:
    """Majority value per row of an (n, k) array of neighbours' integer codes (ties: the smaller code)."""
    from scipy.stats import mode

    return mode(neighbour_values, axis=1, keepdims=False).mode


def attribute_inference(victims: PreparedDataset, attacker: PreparedDataset, *,
                        reference: PreparedDataset | None = None, attributes: Sequence[str] | None = None,
                        sensitive_tokens: Sequence[str] = (), k: int = 5,
                        metric: Metric = "jaccard", prior: PreparedDataset | None = None) -> dict[str, Any]:
    """A kNN attacker over ``attacker``'s records predicts each hidden attribute of ``victims``.

    Parameters
    ----------
    victims : PreparedDataset
        The patients whose attributes are hidden (training patients of the generator).
    attacker : PreparedDataset
        The records the attacker holds (the synthetic data).
    reference : PreparedDataset, optional
        Real patients outside the training data: the same attacker working from them shows what a
        population sample reveals anyway.
    attributes : sequence of str, optional
        Patient attributes to hide: group attributes and/or ``"label"`` (default: all of them).
    sensitive_tokens : sequence of str
        Tokens (vocabulary ``token`` strings) whose presence anywhere in the record is hidden and
        predicted; these columns are removed from the attacker's view for every attribute.
    k : int
        Neighbours that vote.
    prior : PreparedDataset, optional
        The data whose most frequent value is the majority guess: the generator's training data
        (default ``victims``, who are training patients).

    Returns
    -------
    dict with ``k``, ``metric`` and, per attribute, ``accuracy`` / ``balanced_accuracy`` of the
    attacker, of a majority-class guess (the training data's most frequent value) and, with
    ``reference``, of the reference attacker, and the attacker's ``advantage``: its balanced
    accuracy minus the better of the majority guess's and the reference attacker's.
    """
    attributes = ["label", *victims.group_attributes] if attributes is None else list(attributes)
    unknown = [a for a in attributes if a != "label" and a not in victims.group_attributes]
    if unknown:
        raise unknown_choice("attribute", unknown, ["label", *victims.group_attributes], error=DatasetError)
    token_ids = _token_ids(victims, sensitive_tokens)
    sides = {"attacker": attacker, **({"reference": reference} if reference is not None else {})}
    known = {"victims": victims, "prior": victims if prior is None else prior, **sides}
    X_victims = record_features(victims, drop_tokens=token_ids)
    neighbours = {s: nearest_neighbours(X_victims, record_features(d, drop_tokens=token_ids), k=k, metric=metric)[1]
                  for s, d in sides.items()}
    targets = {a: {s: d.patients[a].cast(pl.String).to_numpy() for s, d in known.items()} for a in attributes}
    presence = {s: record_matrix(d.records(), d.vocab_size)[:, token_ids].toarray()
                for s, d in known.items()} if token_ids else {}
    for j, tok in enumerate(sensitive_tokens):
        targets[f"token:{tok}"] = {s: presence[s][:, j].astype(str) for s in presence}
    out: dict[str, Any] = {"k": k, "metric": metric, "n_victims": victims.n_patients,
                           "n_attacker_records": attacker.n_patients,
                           "n_reference_records": None if reference is None else reference.n_patients,
                           "attributes": {}}
    for name, values in targets.items():
        classes, codes = np.unique(np.concatenate(list(values.values())), return_inverse=True)
        split = np.cumsum([len(v) for v in values.values()])[:-1]
        coded = dict(zip(values, np.split(codes, split)))
        truth = coded["victims"]
        majority = np.bincount(coded["prior"], minlength=len(classes)).argmax()
        row = {"classes": classes.tolist(), "majority_class": str(classes[majority]),
               "majority": _accuracies(truth, np.full(len(truth), majority))}
        for side in sides:
            row[side] = _accuracies(truth, knn_vote(coded[side][neighbours[side]]))
        baseline = max(row[s]["balanced_accuracy"] for s in ("majority", "reference") if s in row)
        row["advantage"] = row["attacker"]["balanced_accuracy"] - baseline
        out["attributes"][name] = row
    return out


def _accuracies(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    with warnings.catch_warnings():  # small samples may lack a class on one side; that is fine here
        warnings.simplefilter("ignore", UserWarning)
        return {"accuracy": float(accuracy_score(truth, pred)),
                "balanced_accuracy": float(balanced_accuracy_score(truth, pred))}


def _token_ids(dataset: PreparedDataset, tokens: Sequence[str]) -> list[int]:
    lookup = dict(zip(dataset.vocab["token"].to_list(), dataset.vocab["id"].to_list()))
    missing = [t for t in tokens if t not in lookup]
    if missing:
        raise DatasetError(f"{len(missing)} sensitive token(s) are not in the vocabulary", file="vocab.parquet",
                           column="token", value=missing[0], fix="pass tokens exactly as vocab.parquet spells them")
    return [int(lookup[t]) for t in tokens]


# ---------------------------------------------------------------------- the privacy section
def privacy_report(train: PreparedDataset, synthetic: PreparedDataset, *, holdout: PreparedDataset | None,
                   log_likelihood: Callable[[PreparedDataset], np.ndarray] | None = None,
                   victims_and_reference: tuple[PreparedDataset, PreparedDataset] | None = None,
                   metric: Metric = "jaccard", k: int = 5, sensitive_tokens: Sequence[str] = (),
                   max_queries: int | None = MAX_QUERIES, seed: int = 0,
                   members: PreparedDataset | None = None, cells: Sequence[Sequence[str]] | None = None,
                   min_cell_patients: int = 20) -> dict[str, Any]:
    """Every privacy figure of ``synthetic`` against the generator's training data ``train``.

    Parameters
    ----------
    train : PreparedDataset
        The generator's training patients (the members).
    synthetic : PreparedDataset
    holdout : PreparedDataset, optional
        Real patients the generator never saw (non-members). Without them the membership attacks
        are skipped (there is no non-member) and the nearest-neighbour baseline is each training
        record's nearest *other* training record.
    log_likelihood : callable, optional
        ``dataset -> per-patient log-likelihood`` under the generator, for the likelihood attack;
        the same attack with the code-frequency model of the members
        (:func:`code_frequency_log_likelihood`) goes beside it, under ``code_frequency``.
    victims_and_reference : (PreparedDataset, PreparedDataset), optional
        For attribute inference without ``holdout``: the training patients attacked and the real
        patients of the reference attacker (e.g. two halves of ``train``). Default with ``holdout``:
        ``(train, holdout)``.
    max_queries : int or None
        Distances cost (queries x reference records): at most this many records of a side are
        queried (a seeded random sample; ``None``: all). Reference sides are always complete, and
        exact copies are always counted over every record.
    seed : int
        Seed of those samples.
    members : PreparedDataset, optional
        The patients of ``train`` the generator was fitted on, for the membership attacks (default
        ``train``): a model's early-stopping patients are in its data but were never fitted.
    cells, min_cell_patients
        The cells of the per-cell membership attacks (:func:`cell_membership_inference`).
    """
    rng = np.random.default_rng(seed)
    sampled: dict[str, list[int]] = {}

    def sample(ds: PreparedDataset, name: str) -> np.ndarray:
        n = ds.n_patients
        if max_queries is None or n <= max_queries:
            return np.arange(n)
        sampled[name] = [int(max_queries), n]
        return np.sort(rng.choice(n, size=max_queries, replace=False))

    train_rec, syn_rec = train.records(), synthetic.records()
    copies = exact_copies(syn_rec, train_rec)
    copies["synthetic_records"] = len(syn_rec)
    copies["fraction"] = copies["synthetic_copies"] / len(syn_rec) if len(syn_rec) else None
    if holdout is not None:
        copies["holdout_equal_to_training"] = exact_copies(holdout.records(), train_rec)["synthetic_copies"]
        copies["holdout_records"] = holdout.n_patients

    X_train, X_syn = record_features(train), record_features(synthetic)
    q_syn, q_train = sample(synthetic, "synthetic"), sample(train, "train")
    syn_to_train = nearest_neighbours(X_syn[q_syn], X_train, metric=metric)[0][:, 0]
    if holdout is not None:
        X_hold, q_hold = record_features(holdout), sample(holdout, "holdout")
        base_name, base = "holdout_to_train", nearest_neighbours(X_hold[q_hold], X_train, metric=metric)[0][:, 0]
    else:
        base_name, base = "train_to_other_train", nearest_neighbours(X_train[q_train], X_train, metric=metric,
                                                                     exclude=q_train)[0][:, 0]
    nn = {"metric": metric, "synthetic_to_train": _distance_summary(syn_to_train),
          base_name: _distance_summary(base), "baseline": base_name,
          "median_ratio": _ratio(np.median(syn_to_train), np.median(base)),
          "mean_ratio": _ratio(syn_to_train.mean(), base.mean())}

    mia: dict[str, Any]
    if holdout is None:
        reason = "needs held-out real patients (--holdout): every --real patient is a training member"
        mia = {"distance": {"skipped": reason}, "likelihood": {"skipped": reason}}
    else:
        if members is None:
            members, X_members, q_members = train, X_train, q_train
        else:
            X_members, q_members = record_features(members), sample(members, "members")
        member_d = nearest_neighbours(X_members[q_members], X_syn, metric=metric)[0][:, 0]
        nonmember_d = nearest_neighbours(X_hold[q_hold], X_syn, metric=metric)[0][:, 0]
        mia = {"distance": {"metric": metric, **distance_membership_inference(member_d, nonmember_d)}}
        queried, nonmembers = _subset(members, q_members), _subset(holdout, q_hold)
        scores, references = {"distance": (-member_d, -nonmember_d)}, None
        if log_likelihood is None:
            mia["likelihood"] = {"skipped": "needs the model (--model)"}
        else:
            sizes = (_events(queried.records()), _events(nonmembers.records()))

            def likelihood_scores(fn: Callable[[PreparedDataset], np.ndarray]) -> dict[str, Any]:
                ll = (_checked_ll(fn(queried), queried), _checked_ll(fn(nonmembers), nonmembers))
                return {"likelihood": ll, "likelihood per token": (per_event(ll[0], sizes[0]),
                                                                   per_event(ll[1], sizes[1]))}

            scores.update(likelihood_scores(log_likelihood))
            references = likelihood_scores(code_frequency_log_likelihood(members))
            mia["likelihood"] = likelihood_membership_inference(*scores["likelihood"], member_sizes=sizes[0],
                                                                nonmember_sizes=sizes[1])
            mia["likelihood"]["code_frequency"] = likelihood_membership_inference(
                *references["likelihood"], member_sizes=sizes[0], nonmember_sizes=sizes[1])
        mia["cells"] = cell_membership_inference(queried, nonmembers, scores, cells=cells,
                                                 min_patients=min_cell_patients, references=references)

    victims, reference = victims_and_reference if victims_and_reference else (train, holdout)
    attr = attribute_inference(_subset(victims, sample(victims, "victims")), synthetic, reference=reference,
                               sensitive_tokens=sensitive_tokens, k=k, metric=metric, prior=train)
    return {"exact_copies": copies, "nearest_neighbour": nn, "membership_inference": mia,
            "attribute_inference": attr, "sampled": sampled}


def _subset(ds: PreparedDataset, rows: np.ndarray) -> PreparedDataset:
    return ds if len(rows) == ds.n_patients else ds.select(ds.patients["patient_id"].gather(rows))


def _distance_summary(d: np.ndarray) -> dict[str, Any]:
    return {**distribution_summary(d), "fraction_zero": float((d == 0).mean()) if len(d) else None}


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def _events(records: Records) -> np.ndarray:
    """Tokens plus visits per record: the events a record's likelihood is a product over."""
    tokens = records.code_ptr[records.visit_ptr[1:]] - records.code_ptr[records.visit_ptr[:-1]]
    return tokens + records.visit_counts()


def _checked_ll(values: np.ndarray, dataset: PreparedDataset) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != dataset.n_patients:
        raise ValueError(f"log_likelihood returned {len(values)} values for {dataset.n_patients} patients")
    return values


# ---------------------------------------------------------------------- the verdict
def holm_rejections(p_values: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's (1979) step-down procedure: which of these hypotheses are rejected at family-wise error ``alpha``.

    The smallest p-value is compared with ``alpha / m``, the next with ``alpha / (m - 1)``, and so on;
    the first that fails stops the procedure, and it and every larger one are kept.
    """
    p_values = np.asarray(p_values, dtype=float)
    m = len(p_values)
    order = np.argsort(p_values, kind="stable")
    passed = p_values[order] <= alpha / (m - np.arange(m))
    n_rejected = m if passed.all() else int(np.argmin(passed))
    reject = np.zeros(m, dtype=bool)
    reject[order[:n_rejected]] = True
    return reject


def privacy_verdict(privacy: dict[str, Any], *, dp: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain-language verdict from every attack of a :func:`privacy_report`, the worst one named.

    Each attack's excess over its baseline is graded by :data:`VERDICT_THRESHOLDS`: a membership
    AUROC's distance from chance (0.5; an AUROC below 0.5 counts as much as its mirror image, since
    an attacker would flip the score), an attribute-inference advantage over the better of the
    majority guess and a real population sample, and the number of synthetic copies of training
    records held by fewer than k patients. An AUROC within two standard errors of 0.5 is no
    measurable leak whatever its value (with few held-out patients chance alone moves it far), and
    the text says how small a leak the sample could have detected. The per-cell membership attacks
    are graded alike, except that chance is ruled out only where Holm's step-down procedure
    (:func:`holm_rejections`, two-sided normal p-values of the AUROCs) rejects it at a family-wise
    error of :data:`CELL_FAMILY_ERROR` over all of them; it holds whatever their dependence (cells
    overlap, and a cell's attacks are correlated). The verdict is the worst grade; ``dp`` (a
    model's ``privacy`` summary) adds its guarantee to the text.

    Returns
    -------
    dict with ``level`` (one of :data:`VERDICT_LEVELS`), ``worst`` (the attack), ``attacks`` (one
    entry per attack: ``attack``, ``kind``, ``value``, ``baseline``, ``se``, ``level``,
    ``severity``, ``cell`` (None for the attacks over every record) and ``code_frequency`` (the
    reference of a likelihood attack)), ``cell_attacks`` (``cells`` and ``attacks`` graded, ``z``:
    the standard errors the strongest of them must pass), ``complete`` (False when the membership
    attacks were skipped), ``dp`` and ``text``.
    """
    from scipy.stats import norm

    attacks: list[dict[str, Any]] = []

    def grade(kind: str, name: str, value: float, baseline: float, se: float | None = None, *,
              chance: bool | None = None, cell: str | None = None, reference: float | None = None) -> None:
        some, leak = VERDICT_THRESHOLDS[kind]
        excess = abs(value - baseline) + 0.5 if kind == "auroc" else value - baseline
        level = 2 if excess > leak else 1 if excess > some else 0
        if chance is None:
            chance = se is not None and abs(value - baseline) <= 2 * se
        if chance:  # indistinguishable from chance
            level = 0
        # how far towards (or past) the "leaks" threshold, comparable across kinds
        zero = 0.5 if kind == "auroc" else 0.0
        severity = (excess - zero) / (leak - zero) if leak > zero else float(excess)
        attacks.append({"attack": name, "kind": kind, "value": value, "baseline": baseline, "se": se,
                        "level": VERDICT_LEVELS[level], "severity": severity, "cell": cell,
                        "code_frequency": reference})

    mia = privacy["membership_inference"]
    overall = {how: m for how, m in mia.items() if how != "cells"}
    complete = all("skipped" not in m for m in overall.values())
    for how, m in overall.items():
        ref = m.get("code_frequency", {})
        for name, fig, ref_fig in ((how, m, ref), (f"{how} per token", m.get("per_event", {}), ref.get("per_event", {}))):
            if fig.get("auroc") is not None:
                grade("auroc", f"membership inference by {name}", fig["auroc"], 0.5, fig.get("auroc_se"),
                      reference=ref_fig.get("auroc"))
    in_cells = [(row, how, fig) for row in mia.get("cells", []) for how, fig in row["attacks"].items()
                if fig.get("auroc") is not None]
    z = float(norm.isf(CELL_FAMILY_ERROR / (2 * len(in_cells)))) if in_cells else None  # Holm's first step
    distance = np.array([abs(fig["auroc"] - 0.5) / fig["auroc_se"] if fig.get("auroc_se") else
                         (np.inf if fig["auroc"] != 0.5 else 0.0) for _, _, fig in in_cells])
    counts = holm_rejections(2 * norm.sf(distance), CELL_FAMILY_ERROR)
    for (row, how, fig), real in zip(in_cells, counts):
        grade("auroc", f"membership inference by {how} among {row['cell']} patients ({row['n_members']} members, "
              f"{row['n_nonmembers']} non-members)", fig["auroc"], 0.5, fig.get("auroc_se"), chance=not real,
              cell=row["cell"], reference=row.get("code_frequency", {}).get(how, {}).get("auroc"))
    for name, a in privacy["attribute_inference"]["attributes"].items():
        value = a["attacker"]["balanced_accuracy"]
        grade("advantage", f"attribute inference of {name}", value, value - a["advantage"])
    cp = privacy["exact_copies"]
    grade("rare_copies", f"copies of training records held by fewer than {cp['rare_k']} patients",
          cp["copies_of_rare_records"], 0)
    worst = max(attacks, key=lambda a: (VERDICT_LEVELS.index(a["level"]), a["severity"]))
    level, (some, leak) = worst["level"], VERDICT_THRESHOLDS[worst["kind"]]
    text = {"no measurable leak": "No measurable leak: no attack did measurably better than its baseline",
            "some leakage": "Some leakage: an attack does measurably better than its baseline",
            "leaks": "Leaks: the synthetic data gives away information about its training patients"}[level]
    if worst["kind"] == "auroc":
        text += (f". Strongest attack: {worst['attack']}, which tells training patients from held-out ones with "
                 f"AUROC {worst['value']:.3f} (chance 0.5; some leakage beyond 0.5 +/- {some - 0.5:.2f}, leaks "
                 f"beyond +/- {leak - 0.5:.2f}" + (")." if worst["cell"] is None else
                 f"; within a cell only where Holm's procedure over the {len(in_cells)} cell attacks rules chance "
                 f"out, {CELL_FAMILY_ERROR:.0%} family-wise)."))
        if worst["code_frequency"] is not None:
            text += (f" A model that knows these training patients only through their code frequencies reaches "
                     f"{worst['code_frequency']:.3f} on the same patients: that much a summary of their code counts "
                     "alone reveals.")
    elif worst["kind"] == "advantage":
        text += (f". Strongest attack: {worst['attack']}, balanced accuracy {worst['value']:.3f} from the synthetic "
                 f"records against {worst['baseline']:.3f} without them (some leakage above +{some}, leaks above "
                 f"+{leak}).")
    else:
        text += f". {worst['value']:.0f} {worst['attack']} (any is a leak)."
    text += {"no measurable leak": " This is evidence from these attacks, not a guarantee.",
             "some leakage": " Review before sharing; differential privacy (--dp-epsilon) bounds the risk.",
             "leaks": " Do not share these records as they are: train with differential privacy (--dp-epsilon) "
                      "or more regularisation, and keep copy rejection on."}[level]
    if not complete:
        text += " Incomplete: the membership attacks need held-out real patients (--holdout)."
    ses = [a["se"] for a in attacks if a.get("se") is not None and a["cell"] is None]
    if ses and 2 * max(ses) > VERDICT_THRESHOLDS["auroc"][0] - 0.5:
        text += (f" With these few held-out patients a membership AUROC within 0.5 +/- {2 * max(ses):.2f} "
                 "cannot be told from chance.")
    if dp:
        text += (f" The generator is differentially private (epsilon {dp['epsilon']:.2f}, delta {dp['delta']:.1e} "
                 f"per patient, {dp['accountant']} accountant): a bound on every attack, these included.")
    cell_attacks = {"cells": len({row["cell"] for row, _, _ in in_cells}), "attacks": len(in_cells), "z": z}
    return {"level": level, "worst": worst, "attacks": attacks, "cell_attacks": cell_attacks, "complete": complete,
            "dp": dp, "text": text}
