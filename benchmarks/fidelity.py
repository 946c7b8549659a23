"""Generator fidelity: train with a fixed seed and budget, sample, score every statistic beside its ceiling.

::

    python -m benchmarks.fidelity --data PREPARED --out DIR [--reference PREPARED] [--model MODEL_DIR]
        [--count N] [--draws 1] [--train-options JSON] [--seed 0] [--device cpu] [--cells ATTR[,ATTR...]]
        [--min-cell-records 20] [--batch-size 256] [--overwrite]

Trains a generator on ``--data`` (``halo_balance.train`` with ``--train-options``, a JSON object of
``TrainOptions`` fields; or takes ``--model``), samples N records (default: as many as ``--data``
holds patients) with conditions drawn from the training cells (the ``halo_balance.sample``
default) and prints, each beside its **size-matched real-vs-real ceiling**:

- HALO's statistics (``halo_balance.fidelity``: token, within-visit pair and consecutive-visit
  pair probabilities, per visit and per record) as ``r2_score(training, synthetic)``;
- the record shape (``fidelity.record_shape``): shares of 1, 2, 3+ and 5+ visit records, the
  longest record, the empty-visit shares and the distinct tokens of N records, beside N real
  records (N reference records; without enough of them, N training records drawn with
  replacement: a rare token of the training data is missing from such a draw as often as from the
  draws of a generator that reproduces the training frequencies) and the training data;
- the unigram R^2 of every (outcome x group) cell (``fidelity.cell_fidelity``), each with the
  ceiling of its own size.

The ceiling is what N fresh real records achieve against the training records. With a
``--reference`` of at least N real patients outside the training data (held-out patients, or an
independent cohort prepared with the same vocabulary, ``data_prep ... --bins-from``), N of them are
drawn and compared exactly so. With a smaller reference, or none (two stratified halves of the
training data), the real-vs-real R^2 is carried over to the sizes (n training, N) by the
sampling-noise scaling of ``fidelity.size_matched_r2``, and the table says so. With a
``--reference``, every statistic is also scored against it (synthetic vs reference beside training
vs reference: gains that only hold against the training records are memorisation).

A cell of a hundred patients drawn as about a hundred records is a noisy figure (on 20,000 simulated
patients the unigram R^2 of the 102 "Other" deaths has a standard deviation of 0.01-0.04 between
draws of one model). ``--draws K`` samples K independent sets of N records from the model and
reports every synthetic figure as the mean over them, each cell also with its standard deviation;
the ceilings are those of one draw of the real side, as before.

Writes ``DIR/fidelity.json`` (every figure, the settings, training time and threads),
``DIR/synthetic/`` (the first draw's records, a prepared dataset) and, when it trains, ``DIR/model/``.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import halo_balance  # noqa: F401  (sets passive OpenMP waiting before torch is imported)
from halo_balance.cli import json_object
from halo_balance.data import PreparedDataset
from halo_balance.fidelity import (STATISTICS, cell_fidelity, code_statistics, compare_statistics, record_shape,
                                   size_matched_r2)
from halo_balance.io import atomic_dir, check_output_dir, write_json

SHAPE_ROWS = (("share_1", "1-visit records"), ("share_2", "2-visit records"), ("share_3plus", "3+ visit records"),
              ("share_5plus", "5+ visit records"), ("max_visits", "longest record (visits)"),
              ("mean_visits", "visits per record"), ("empty_visit_share", "empty visits"),
              ("empty_first_visit_share", "empty first visits"), ("distinct_tokens", "distinct tokens"),
              ("mean_visit_size", "tokens per visit"))


def _draw(dataset: PreparedDataset, n: int, seed: int) -> PreparedDataset:
    """``n`` patients of ``dataset`` drawn without replacement (all of them when it holds no more)."""
    if n >= dataset.n_patients:
        return dataset
    rows = np.sort(np.random.default_rng(seed).choice(dataset.n_patients, size=n, replace=False))
    return dataset.select(dataset.patients["patient_id"].gather(rows))


def ceiling_source(train: PreparedDataset, reference: PreparedDataset | None, n_synthetic: int, *,
                   seed: int) -> tuple[PreparedDataset, PreparedDataset, str]:
    """The two real samples whose comparison gives the ceiling, and how it is matched to N.

    ``"exact"``: (training, N reference records); ``"scaled"``: (training, the whole smaller
    reference) or two halves of the training data, carried over by :func:`size_matched_r2`.
    """
    if reference is not None and reference.n_patients >= n_synthetic:
        return train, _draw(reference, n_synthetic, seed), "exact"
    if reference is not None:
        return train, reference, "scaled"
    half_a, half_b = train.train_test_split(0.5, seed=seed)
    return train.select(half_a), train.select(half_b), "scaled"


def score(train: PreparedDataset, synthetic: PreparedDataset, *, reference: PreparedDataset | None = None,
          cells: Sequence[Sequence[str]] | None = None, min_cell_records: int = 20, seed: int = 0,
          real_stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for ``synthetic`` against its generator's training data ``train``.

    ``real_stats``: a dict that keeps the real samples' code statistics between calls sharing
    ``train``, ``reference``, ``seed`` and the number of synthetic records (the draws of
    ``--draws``); the first call fills it.
    """
    n, N = train.n_patients, synthetic.n_patients
    ref_a, ref_b, matching = ceiling_source(train, reference, N, seed=seed)
    real = {} if real_stats is None else real_stats

    def real_statistics(name: str, dataset: PreparedDataset):
        if name not in real:
            real[name] = code_statistics(dataset)
        return real[name]

    stats = {"train": real_statistics("train", train), "synthetic": code_statistics(synthetic)}
    stats["ref_a"] = stats["train"] if ref_a is train else real_statistics("ref_a", ref_a)
    stats["ref_b"] = real_statistics("ref_b", ref_b)
    versus, ceiling = compare_statistics(stats["train"], stats["synthetic"]), compare_statistics(stats["ref_a"],
                                                                                                 stats["ref_b"])
    sizes, target = (ref_a.n_patients, ref_b.n_patients), (n, N)
    out: dict[str, Any] = {
        "n_train": n, "n_synthetic": N, "ceiling": {"matching": matching, "sizes": list(sizes),
                                                    "source": "reference" if reference is not None else "halves"},
        "statistics": {name: {"r2": versus[name]["r2"], "ceiling_raw": ceiling[name]["r2"],
                              "ceiling": ceiling[name]["r2"] if matching == "exact" else
                              size_matched_r2(ceiling[name]["r2"], sizes=sizes, target=target)}
                       for name in STATISTICS}}
    if reference is not None:
        stats["reference"] = stats["ref_b"] if ref_b is reference else real_statistics("reference", reference)
        held = compare_statistics(stats["reference"], stats["synthetic"])
        held_ceiling = compare_statistics(stats["reference"], stats["train"])
        for name in STATISTICS:
            out["statistics"][name]["vs_reference"] = held[name]["r2"]
            out["statistics"][name]["vs_reference_ceiling"] = held_ceiling[name]["r2"]
    if matching == "exact":
        real_n, real_n_source = record_shape(ref_b), "reference"
    else:  # N records resampled from the training data: what reproducing its records achieves
        rows = np.random.default_rng(seed).integers(0, n, size=N)
        real_n, real_n_source = record_shape(train, rows), "training records resampled"
    out["shape"] = {"train": record_shape(train), "synthetic": record_shape(synthetic), "real_N": real_n,
                    "real_N_source": real_n_source}
    groups = train.cell_groupings(cells)
    rows = []
    for g in groups:
        for row in cell_fidelity(train, synthetic, reference=(ref_a, ref_b), groups=g, min_records=min_cell_records):
            row["n_ceiling"] = row.pop("n_reference")  # the two real samples: the cell's ceiling
            for name in ("unigram_per_visit", "unigram_per_record"):
                row[f"{name}_ceiling"] = row.pop(f"{name}_reference")
            if matching == "scaled":
                for name in ("unigram_per_visit", "unigram_per_record"):
                    row[f"{name}_ceiling_raw"] = row[f"{name}_ceiling"]
                    row[f"{name}_ceiling"] = size_matched_r2(row[f"{name}_ceiling"], sizes=tuple(row["n_ceiling"]),
                                                             target=(row["n_real"], max(row["n_synthetic"], 1)))
            rows.append(row)
    out["cells"] = rows
    return out


def draw_seed(seed: int, draw: int) -> int:
    """The sampling seed of draw ``draw`` (the first keeps ``seed``; the others derive from it)."""
    return seed if draw == 0 else int(np.random.SeedSequence([seed, draw]).generate_state(1)[0])


def mean_of_draws(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One :func:`score` result from those of several synthetic draws scored against the same ceilings.

    Every synthetic-side figure (the statistics' R^2, the synthetic record shape, each cell's sizes
    and R^2) becomes the mean over the draws; each cell also gets the standard deviation of its
    unigram R^2 (``*_sd``) and the draws' values (``*_draws``).
    """
    out = dict(results[0])
    if len(results) == 1:
        return out

    def mean(values: list[Any]) -> Any:
        return None if any(v is None for v in values) else float(np.mean(values))

    out["statistics"] = {name: {**s, **{key: mean([r["statistics"][name][key] for r in results])
                                        for key in ("r2", "vs_reference") if key in s},
                                "r2_draws": [r["statistics"][name]["r2"] for r in results]}
                         for name, s in results[0]["statistics"].items()}
    shapes = [r["shape"]["synthetic"] for r in results]
    out["shape"] = {**results[0]["shape"], "synthetic": {key: mean([s.get(key) for s in shapes]) for key in shapes[0]}}
    cells = []
    for row in results[0]["cells"]:
        same = [next((c for c in r["cells"] if c["cell"] == row["cell"]), None) for r in results]
        merged = dict(row)
        for key in ("n_synthetic", "share_synthetic", "mean_record_length_synthetic", "mean_visit_size_synthetic",
                    "unigram_per_visit", "unigram_per_record"):
            merged[key] = mean([None if c is None else c[key] for c in same])
        for key in ("unigram_per_visit", "unigram_per_record"):
            values = [None if c is None else c[key] for c in same]
            merged[f"{key}_draws"] = values
            merged[f"{key}_sd"] = None if None in values else float(np.std(values, ddof=1))
        cells.append(merged)
    out["cells"] = cells
    return out


# ---------------------------------------------------------------------- printing
def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    """The figures as plain-text tables."""
    c = result["ceiling"]
    how = ("N reference records against the training records" if c["matching"] == "exact" else
           f"{c['source']} of {c['sizes'][0]:,} and {c['sizes'][1]:,} records, scaled to "
           f"{result['n_train']:,} training and {result['n_synthetic']:,} synthetic records")
    draws = len(result.get("seeds", [0]))
    what = f"{result['n_synthetic']:,} synthetic records" + (f" (mean of {draws} draws)" if draws > 1 else "")
    lines = [f"{what} against {result['n_train']:,} training records; ceiling: {how}", ""]
    has_ref = "vs_reference" in result["statistics"]["unigram_per_visit"]
    head = f"{'statistic':<24} {'R^2 vs train':>12} {'ceiling':>8}"
    head += f" {'R^2 vs reference':>17} {'ceiling':>8}" if has_ref else ""
    lines += [head, "-" * len(head)]
    for name, s in result["statistics"].items():
        line = f"{name:<24} {_f(s['r2']):>12} {_f(s['ceiling']):>8}"
        if has_ref:
            line += f" {_f(s['vs_reference']):>17} {_f(s['vs_reference_ceiling']):>8}"
        lines.append(line)
    shape = result["shape"]
    lines += ["", f"real (N): {shape['real_N_source']}",
              f"{'record shape':<26} {'synthetic':>10} {'real (N)':>10} {'training':>10}", "-" * 59]
    for key, label in SHAPE_ROWS:
        digits = 1 if key == "mean_visit_size" else 3
        lines.append(f"{label:<26} {_f(shape['synthetic'].get(key), digits):>10} "
                     f"{_f(shape['real_N'].get(key), digits):>10} {_f(shape['train'].get(key), digits):>10}")
    sd_head = f" {'sd':>6}" if draws > 1 else ""
    lines += ["", f"{'cell':<44} {'n train':>8} {'n syn':>7} {'unigram/visit':>13}{sd_head} {'ceiling':>8} "
              f"{'gap':>7}", "-" * (92 + len(sd_head))]
    for row in result["cells"]:
        r2, ceil = row["unigram_per_visit"], row["unigram_per_visit_ceiling"]
        gap = None if r2 is None or ceil is None else r2 - ceil
        sd = f" {_f(row.get('unigram_per_visit_sd')):>6}" if draws > 1 else ""
        n_syn = None if row["n_synthetic"] is None else round(row["n_synthetic"])
        lines.append(f"{row['cell']:<44} {row['n_real']:>8,} {_f(n_syn):>7} {_f(r2):>13}{sd} {_f(ceil):>8} "
                     f"{_f(gap):>7}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="prepared training data")
    p.add_argument("--out", required=True, type=Path, help="folder to write (fidelity.json, synthetic/, model/)")
    p.add_argument("--reference", type=Path, help="real patients outside the training data, same vocabulary")
    p.add_argument("--model", type=Path, help="a trained generator (default: train one on --data)")
    p.add_argument("--count", type=int, help="records to sample (default: the training patients)")
    p.add_argument("--draws", type=int, default=1,
                   help="independent sets of N records to sample; figures are their mean (default %(default)s)")
    p.add_argument("--train-options", type=json_object, default={}, metavar="JSON",
                   help="JSON object of halo_balance.train.TrainOptions fields")
    p.add_argument("--seed", type=int, default=0, help="training, conditions, sampling and ceiling draws")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=256, help="sampling batch")
    p.add_argument("--cells", action="append", metavar="ATTR[,ATTR...]",
                   help="group attributes crossed with the outcome per cell table (repeatable; default each alone)")
    p.add_argument("--min-cell-records", type=int, default=20)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be >= 1 (got {args.draws})")
    check_output_dir(args.out, overwrite=args.overwrite)
    import torch

    from halo_balance.model import HaloModel
    from halo_balance.sample import sample_records
    from halo_balance.train import TrainOptions, train_model

    options = args.train_options
    train = PreparedDataset.load(args.data)
    reference = PreparedDataset.load(args.reference) if args.reference else None
    n_synthetic = args.count or train.n_patients
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        timing: dict[str, Any] = {"threads": torch.get_num_threads()}
        if args.model:
            model = HaloModel.from_pretrained(args.model)
        else:
            opts = TrainOptions(**{"seed": args.seed, "device": args.device, **options}).validate()
            t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            model = train_model(train, out_dir=tmp / "model", options=opts, progress=False)
            c1 = resource.getrusage(resource.RUSAGE_SELF)
            timing.update(train_seconds=round(time.perf_counter() - t0, 1),
                          train_cpu_seconds=round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1))
            shutil.rmtree(tmp / "model" / "checkpoint", ignore_errors=True)
        seeds = [draw_seed(args.seed, k) for k in range(args.draws)]
        cells = [c.split(",") for c in args.cells] if args.cells else None
        results, real_stats, timing["sample_seconds"] = [], {}, 0.0
        for k, seed in enumerate(seeds):
            conditions = model.layout.complete({}, n_synthetic, seed=seed)
            t0 = time.perf_counter()
            synthetic = sample_records(model, conditions, batch_size=args.batch_size, seed=seed,
                                       device=args.device, progress=False)
            timing["sample_seconds"] = round(timing["sample_seconds"] + time.perf_counter() - t0, 1)
            if k == 0:
                synthetic.save(tmp / "synthetic")
            results.append(score(train, synthetic, reference=reference, seed=args.seed, cells=cells,
                                 min_cell_records=args.min_cell_records, real_stats=real_stats))
        result = mean_of_draws(results)
        inputs = {"data": str(args.data), "reference": None if reference is None else str(args.reference),
                  "model": str(args.model) if args.model else "model/"}
        result.update(seeds=seeds, inputs=inputs, train_options=options, seed=args.seed, timing=timing,
                      model_config=model.config.to_dict())
        write_json(tmp / "fidelity.json", result)
    print(render(result))
    extra = (f"; training {timing['train_seconds']} s wall, {timing['train_cpu_seconds']} s CPU"
             if "train_seconds" in timing else "")
    print(f"\n{timing['threads']} torch thread(s){extra}; sampling {timing['sample_seconds']} s -> {args.out}")
    return result


if __name__ == "__main__":
    from halo_balance.cli import run

    run(main)
