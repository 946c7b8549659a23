"""Split a prepared dataset into training and held-out patients.

``python -m halo_balance.split --data PREPARED --out DIR [--holdout-fraction 0.2] [--stratify ATTR ...]
[--seed 0]`` writes ``DIR/train`` and ``DIR/holdout``, two prepared datasets, atomically. The split
is patient-level (a patient's visits stay together) and stratified by the outcome crossed with
``--stratify`` (default: every group attribute; strata too small to split fall back to the outcome
alone). Train the generator on ``DIR/train`` only; ``DIR/holdout`` then holds real patients it never
saw, for ``python -m halo_balance.evaluate --real DIR/train --holdout DIR/holdout`` (the fidelity
reference and the membership attacks' non-members) or for testing a downstream model.

Each part's ``meta.json`` gains a ``split`` entry (source folder, part, fraction, strata, seed).
Input that holds synthetic rows is refused: held-out patients must be real.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .data import PreparedDataset
from .errors import HaloBalanceError
from .io import atomic_dir, check_output_dir


def split_dataset(dataset: PreparedDataset, *, holdout_fraction: float = 0.2, stratify: Sequence[str] | None = None,
                  seed: int = 0) -> tuple[PreparedDataset, PreparedDataset]:
    """``(train, holdout)``: a patient-level split stratified by outcome x ``stratify`` (default: all groups)."""
    if not 0.0 < holdout_fraction < 1.0:
        raise HaloBalanceError(f"--holdout-fraction must lie strictly between 0 and 1 (got {holdout_fraction})")
    n_syn = int(dataset.patients["synthetic"].sum())
    if n_syn:
        raise HaloBalanceError(f"the data holds {n_syn} synthetic patients; split the real data (held-out "
                               "patients must be real), before any balancing")
    if dataset.n_patients < 2:
        raise HaloBalanceError(f"the data holds {dataset.n_patients} patient(s); a split needs at least two")
    train_ids, holdout_ids = dataset.train_test_split(holdout_fraction, groups=stratify, seed=seed)
    return dataset.select(train_ids), dataset.select(holdout_ids)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m halo_balance.split", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder (real patients)")
    p.add_argument("--out", required=True, type=Path, help="output folder: OUT/train and OUT/holdout")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of the patients held out (default %(default)s)")
    p.add_argument("--stratify", nargs="*", default=None, metavar="ATTR",
                   help="group attributes crossed with the outcome for stratification (default: all)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only one this package wrote)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.data], what="--out")
    data = PreparedDataset.load(args.data)
    train, holdout = split_dataset(data, holdout_fraction=args.holdout_fraction, stratify=args.stratify,
                                   seed=args.seed)
    stratify = data.group_attributes if args.stratify is None else list(args.stratify)
    with atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        for part, ds in (("train", train), ("holdout", holdout)):
            ds.meta["split"] = {"source": str(args.data), "part": part, "holdout_fraction": args.holdout_fraction,
                                "stratify": ["label", *stratify], "seed": args.seed}
            ds.save(tmp / part)
    print(f"wrote {args.out / 'train'} ({train.n_patients} patients) and {args.out / 'holdout'} "
          f"({holdout.n_patients} patients)", file=sys.stderr)


if __name__ == "__main__":
    from .cli import run

    run(main)
