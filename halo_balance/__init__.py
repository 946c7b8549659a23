"""halo_balance: generative rebalancing of electronic health records.

A conditional HALO transformer learns P(patient record | outcome, groups); a balancer tops every
under-filled (outcome, group) cell up with synthetic patients. The pipeline is
``data_prep`` (raw tables -> prepared dataset) -> ``halo_balance`` (train, sample, balance,
evaluate) -> ``benchmarks`` (k-fold comparison with other rebalancing methods).
"""

from __future__ import annotations

import os

# Idle OpenMP threads that spin instead of sleeping slow this model's many small torch operations
# down several-fold on a CPU shared with other work. This only takes effect before torch is first
# imported, so it is set here, on import of the package; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from importlib import import_module  # noqa: E402
from typing import Any

from .data import PreparedDataset  # noqa: E402, Records, VisitMatrix
from .errors import DatasetError  # noqa: E402, HaloBalanceError, IncompatibleModelError, OutputExistsError

__version__ = "0.1.0"

# torch-backed names load lazily so that `import halo_balance` stays light for data work.
_LAZY = {
    "HaloConfig": "halo_balance.config",
    "HaloModel": "halo_balance.model",
    "FairPlaySampler": "halo_balance.sampler",
}

__all__ = ["PreparedDataset", "Records", "VisitMatrix", "DatasetError", "HaloBalanceError",
           "IncompatibleModelError", "OutputExistsError", *_LAZY]


def _register_with_transformers() -> None:
    """Register the model with ``transformers``' Auto classes (``halo_balance.hf``) once transformers
    is imported: now if it already is, else right after its import, so that ``import halo_balance``
    never pays for importing transformers itself."""
    import importlib.abc
    import importlib.util
    import sys

    def register() -> None:
        try:
            from .hf import register as hf_register
            hf_register()
        except Exception as exc:  # an incompatible transformers must not break this package
            import warnings
            warnings.warn(f"halo_balance: not registered with transformers ({exc})", stacklevel=2)

    if "transformers" in sys.modules:
        register()
        return
    if importlib.util.find_spec("transformers") is None:
        return

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib protocol
            if name != "transformers":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def exec_and_register(module):  # noqa: ANN001, ANN202
                    exec_module(module)
                    register()
                spec.loader.exec_module = exec_and_register
            return spec

    sys.meta_path.insert(0, _AfterImport())


_register_with_transformers()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'halo_balance' has no attribute {name!r}")
