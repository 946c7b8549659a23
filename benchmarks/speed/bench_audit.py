"""Speed of the audit statistics on a simulated predictions table of benchmark size.

``python -m benchmarks.speed.bench_audit --patients 2000 --resamples 1000`` prints the seconds taken by
the design, the bootstrap (with and without AUROC), both permutation families and the threshold
sweep. :func:`simulate_predictions` is also the test suite's source of predictions with known
group effects.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl


def simulate_predictions(*, n_patients: int = 400, n_folds: int = 5,
                         groups: Mapping[str, Mapping[str, float]] | None = None,
                         methods: Mapping[str, float] | None = None, models: Sequence[str] = ("logreg",),
                         group_shift: Mapping[str, Mapping[str, float]] | None = None,
                         mean_extra_visits: float = 0.6, patient_sd: float = 1.0, noise_sd: float = 0.3,
                         seed: int = 0) -> pl.DataFrame:
    """A harness-shaped predictions table with patient-clustered scores.

    Parameters
    ----------
    n_patients, n_folds : size and folds (patients are assigned to folds at random).
    groups : ``{attribute: {group: probability}}``; default gender F/M 0.4/0.6.
    methods : ``{method: score shift on the logit scale}``; default ``{"original": 0.0}``.
    models : downstream model names (each adds its own small noise).
    group_shift : ``{attribute: {group: logit shift}}`` applied to positives only, which makes
        that group underdiagnosed (a true TPR/UDR gap) when negative.
    mean_extra_visits : Poisson mean of visits beyond the first.
    patient_sd : standard deviation of the patient random effect (the within-patient correlation).
    noise_sd : standard deviation of each series' own visit-level noise.
    seed : seed of every random choice.

    Every visit but a patient's last is negative; the last carries the patient's outcome
    (probability 0.2). Score = sigmoid(-1.5 + 2.5 y + u_patient + shifts + noise); prediction =
    score >= 0.5.
    """
    rng = np.random.default_rng(seed)
    groups = groups or {"gender": {"F": 0.4, "M": 0.6}}
    methods = methods or {"original": 0.0}
    group_shift = group_shift or {}
    n_vis = 1 + rng.poisson(mean_extra_visits, n_patients)
    pid = np.repeat(np.arange(n_patients), n_vis)
    last = np.r_[np.diff(pid) != 0, True]
    outcome = rng.random(n_patients) < 0.2
    y = (last & outcome[pid]).astype(np.int8)
    u = rng.normal(0, patient_sd, n_patients)
    fold = rng.integers(0, n_folds, n_patients)
    cols: dict[str, np.ndarray] = {}
    shift = np.zeros(n_patients)
    for attr, probs in groups.items():
        names = list(probs)
        g = rng.choice(len(names), n_patients, p=np.asarray(list(probs.values())) / sum(probs.values()))
        cols[attr] = np.asarray(names, dtype=object)[g]
        for name, s in group_shift.get(attr, {}).items():
            shift += np.where(cols[attr] == name, s, 0.0)
    visit_index = np.arange(len(pid)) - np.repeat(np.cumsum(n_vis) - n_vis, n_vis)
    frames = []
    for m, ms in methods.items():
        for k in models:
            noise = rng.normal(0, noise_sd, len(pid))
            logit = -1.5 + 2.5 * y + u[pid] + ms + y * shift[pid] + noise
            score = 1.0 / (1.0 + np.exp(-logit))
            frames.append(pl.DataFrame({
                "fold": fold[pid].astype(np.int32), "method": m, "model": k,
                "patient_id": [f"p{p:06d}" for p in pid], "visit_index": visit_index.astype(np.int32),
                **{a: c[pid].astype(str) for a, c in cols.items()},
                "y_true": y, "score": score, "prediction": (score >= 0.5).astype(np.int8)}))
    return pl.concat(frames)


def _naive_seconds_per_resample(df: pl.DataFrame, groups: list[str], *, units: int = 6) -> float:
    """CPU seconds of one bootstrap resample done the direct way: resample patients, then recompute
    the harness's per-unit metrics (``benchmarks.metrics.unit_metrics``) of every (fold, method,
    model) unit; timed on ``units`` units and scaled to all of them."""
    from ..metrics import groupings, group_labels, unit_metrics

    patients = df.select("patient_id", "fold", *groups).unique()
    keys = df.select("fold", "method", "model").unique().sort("fold", "method", "model")
    rng = np.random.default_rng(0)
    t0 = time.process_time()
    for fold, method, model in keys.head(units).iter_rows():
        part = df.filter((pl.col("fold") == fold) & (pl.col("method") == method) & (pl.col("model") == model))
        ids = part["patient_id"].unique().to_numpy()
        drawn = pl.DataFrame({"patient_id": rng.choice(ids, len(ids))})
        part = drawn.join(part, on="patient_id", how="left")
        train = patients.filter(pl.col("fold") != fold)
        sizes = {name: dict(zip(*np.unique(group_labels(train, attrs).to_numpy(), return_counts=True)))
                 for name, attrs in groupings(groups)}
        unit_metrics(part, attributes=groups, train_sizes=sizes)
    return (time.process_time() - t0) / units * keys.height


def main(argv: Sequence[str] | None = None) -> None:
    from ..stats import Design, bootstrap, bootstrap_threshold_sweep, group_permutation, paired_permutation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--methods", type=int, default=12, help="methods incl. original")
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-naive", action="store_true", help="skip the direct-recomputation baseline")
    args = ap.parse_args(argv)
    methods = {"original": 0.0, **{f"m{i}": 0.1 * i for i in range(1, args.methods)}}
    models = [f"model{i}" for i in range(args.models)]
    groups = {"age": {"<18": 0.05, "18-74": 0.7, "75+": 0.25}, "gender": {"F": 0.45, "M": 0.55}}
    df = simulate_predictions(n_patients=args.patients, methods=methods, models=models, seed=args.seed, groups=groups)
    rows = []

    def timed(name, fn):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        rows.append((name, time.perf_counter() - w, time.process_time() - c))
        return out

    d = timed("design", lambda: Design.from_predictions(df, groups=list(groups)))
    B = args.resamples
    timed("bootstrap, no AUROC", lambda: bootstrap(d, n_resamples=B, auroc=False))
    timed("bootstrap with AUROC", lambda: bootstrap(d, n_resamples=B, auroc=True))
    timed("paired permutation", lambda: paired_permutation(d, n_permutations=B))
    timed("group permutation", lambda: group_permutation(d, n_permutations=B))
    timed("threshold sweep, 1 model", lambda: bootstrap_threshold_sweep(
        d, series=[s for s, (_, k) in enumerate(d.series) if k == models[0]], n_resamples=B))
    print(f"patients={args.patients} visits={len(d.y_true)} series={len(d.series)} resamples={B} "
          f"(2 attributes + intersection)")
    print(f"{'step':28s} {'wall s':>8s} {'CPU s':>8s}")
    for name, w, c in rows:
        print(f"{name:28s} {w:8.2f} {c:8.2f}")
    if not args.no_naive:
        naive = _naive_seconds_per_resample(df, list(groups))
        boot = rows[1][2]
        print(f"direct recomputation (harness unit_metrics): {naive:.1f} CPU s per resample, "
              f"{naive * B / 3600:.1f} CPU h for {B}; vectorised bootstrap without AUROC: {boot:.1f} CPU s "
              f"(ratio {naive * B / boot:,.0f}x)")


if __name__ == "__main__":
    main()
