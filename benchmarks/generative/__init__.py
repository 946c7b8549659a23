"""Generative over-samplers for the k-fold harness: MCRAGE, SMA, CTGAN and TVAE.

Each generator is a small estimator, fitted on a fold's real training visit rows and their cells,
that returns synthetic visit rows for requested cells::

    gen = make_generator("mcrage", random_state=0, iterations=2000)
    gen.fit(X, cells)                             # X: CSR (n, V) 0/1; cells: int (n,) in 0..C-1
    X_new, cells_new = gen.sample({2: 150, 3: 40})   # 150 rows of cell 2, 40 of cell 3

``benchmarks.methods.generative_oversample`` computes the cells and the counts exactly as for
SMOTE (``benchmarks.methods.visit_targets``: visit label x the ``--balance-by`` attributes, with
the ``--ratio`` and the protocol's minimum cell size) and checks every row that comes back.

============  ==========================================  =========================  ==========================
name          method                                      implementation             licence
============  ==========================================  =========================  ==========================
``mcrage``    conditional Bernoulli diffusion (DDPM)      :mod:`.mcrage`, torch      this project's (MIT)
``sma``       sequential CART copy, upsampled per cell    :mod:`.sma`, scikit-learn  this project's (MIT)
``ctgan``     CTGAN, conditional vector + reject          :mod:`.tabular_gan`        ``ctgan``: BUSL-1.1, extra
``tvae``      TVAE, reject sampling                       :mod:`.tabular_gan`        ``ctgan``: BUSL-1.1, extra
============  ==========================================  =========================  ==========================

Options (``benchmarks.kfold --generator-options``) are the keyword arguments of each class;
``n_jobs`` (parallel tree fits for ``sma``, torch CPU threads for the others, default 1 like the
downstream models) and ``device`` do not change results and stay out of a unit's settings hash.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Literal

from halo_balance.errors import unknown_choice

GeneratorName = Literal["mcrage", "sma", "ctgan", "tvae"]
GENERATORS: tuple[str, ...] = ("mcrage", "sma", "ctgan", "tvae")
NEUTRAL_OPTIONS = frozenset({"n_jobs", "device"})


@contextmanager
def torch_threads(n: int):
    """Run torch's CPU operators on ``n`` threads inside the block (these models are small: more threads
    only contend, e.g. 14x slower with two threads on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(int(n), 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _classes() -> dict[str, tuple[type, dict[str, Any]]]:
    from .mcrage import BernoulliDiffusion
    from .sma import SMA
    from .tabular_gan import LibraryGenerator

    return {"mcrage": (BernoulliDiffusion, {}), "sma": (SMA, {}),
            "ctgan": (LibraryGenerator, {"kind": "ctgan"}), "tvae": (LibraryGenerator, {"kind": "tvae"})}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise a clear error when ``options`` are not keyword arguments of generator ``name``."""
    if name not in GENERATORS:
        raise unknown_choice("--generator-options", [name], GENERATORS)
    cls, fixed = _classes()[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "random_state", *fixed)]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise unknown_choice(f"--generator-options for {name}", bad, allowed)


def make_generator(name: GeneratorName, *, random_state: int = 0, **options: Any):
    """An unfitted generator ``name`` with ``options`` (see the module docstring)."""
    check_options(name, options)
    cls, fixed = _classes()[name]
    return cls(**fixed, **options, random_state=random_state)


def result_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that change results (all but ``NEUTRAL_OPTIONS``)."""
    return {k: v for k, v in options.items() if k not in NEUTRAL_OPTIONS}


__all__ = ["GENERATORS", "GeneratorName", "check_options", "make_generator", "result_options"]
