"""Where the k-fold harness runs its work: this machine's processes or a Ray cluster.

The harness (``benchmarks.kfold``) describes a run as :class:`Job` s: a fold's FairPlay generator
(training it and balancing the fold's training patients) and every (fold, method) batch of
downstream units, the FairPlay ones depending on their fold's generator job. An executor runs them
and calls back on the driver as each finishes; the jobs write their own results, atomically, into
the run folder, so resume, reports and the audit do not care which executor ran them.

``local`` (:class:`LocalExecutor`)
    joblib processes on this machine (``--jobs``), in waves: every job without a pending
    dependency (baseline units and generators together), then the jobs that waited for them.
``ray`` (:class:`RayExecutor`)
    One Ray task per job on the cluster at ``--ray-address`` (:mod:`halo_balance.distributed`):
    a generator asks for ``--generator-gpus`` GPUs (default one where the cluster has GPUs) and
    ``--generator-threads`` CPUs, a unit batch for one CPU; a job's dependencies are passed to it
    as Ray object references, so the scheduler starts it when they are done. A task whose worker
    or node dies is run again (``TASK_RETRIES`` times): a job only ever writes complete files
    under names fixed by its settings, so a rerun replaces what a lost attempt left.

Identical results whatever runs them: every job takes its randomness from its own seed, and runs
with a fixed number of threads (:func:`limit_threads`: one per downstream unit, as the models are
documented; ``--generator-threads`` for a generator), since floating-point sums depend on how a
computation is split between threads. The Ray cluster must run the same Python environment and see
the run folder, data and generator cache at the same paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from halo_balance.distributed import BACKENDS, TASK_RETRIES, gather, ray_session, resolve_gpus
from halo_balance.errors import HaloBalanceError, unknown_choice

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Job:
    """``fn(*args)`` run by an executor once the jobs named in ``after`` have finished.

    ``generator`` marks a FairPlay generator (it asks for GPUs on a Ray cluster); ``threads`` is
    the number of CPU threads it runs with (and, on Ray, reserves).
    """

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    after: tuple[str, ...] = ()
    generator: bool = False
    threads: int = 1


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` threads in BLAS, OpenMP and torch (restored afterwards), so that a
    job computes the same numbers in any process."""
    from threadpoolctl import threadpool_limits

    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    os.environ.update({k: str(n) for k in _THREAD_VARIABLES})  # for libraries first loaded inside the block
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=n):
            if torch is not None:
                torch.set_num_threads(n)
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)


def _call(fn: Callable[..., Any], args: tuple[Any, ...], *done: Any) -> Any:
    """A job's body in a worker; ``done`` are its dependencies' results (they only order the work)."""
    return fn(*args)


class LocalExecutor:
    """Jobs on this machine: ``jobs`` joblib worker processes (in this process when 1)."""

    def __init__(self, *, jobs: int = 1) -> None:
        self.jobs = jobs

    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, Any], None]) -> None:
        from joblib import Parallel, delayed

        for wave in _waves(jobs):
            results = Parallel(n_jobs=min(self.jobs, len(wave)), return_as="generator_unordered")(
                delayed(_indexed)(i, job.fn, job.args) for i, job in enumerate(wave))
            for i, result in results:
                on_done(wave[i], result)


def _indexed(i: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[int, Any]:
    return i, fn(*args)


def _waves(jobs: Sequence[Job]) -> list[list[Job]]:
    """The jobs grouped so that each one comes after every job it depends on (in the given order
    within a wave); dependencies on jobs not in ``jobs`` are already satisfied."""
    names = {job.name for job in jobs}
    level: dict[str, int] = {}
    for job in jobs:
        missing = [d for d in job.after if d in names and d not in level]
        if missing:
            raise ValueError(f"job {job.name!r} is listed before the jobs it depends on: {missing}")
        level[job.name] = 1 + max((level[d] for d in job.after if d in names), default=-1)
    return [[j for j in jobs if level[j.name] == k] for k in range(max(level.values(), default=-1) + 1)]


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address`` (module docstring)."""

    def __init__(self, *, address: str = "auto", generator_gpus: float | None = None) -> None:
        self.address = address
        self.generator_gpus = generator_gpus
        self.resources: dict[str, float] = {}

    def run(self, jobs: Sequence[Job], on_done: Callable[[Job, Any], None]) -> None:
        _waves(jobs)  # dependencies come first
        with ray_session(self.address) as ray:
            self.resources = dict(ray.cluster_resources())
            gpus = resolve_gpus(ray, self.generator_gpus)
            call = ray.remote(_call)
            refs: dict[str, Any] = {}
            for job in jobs:
                cpus = job.threads if job.generator else 1
                if cpus > self.resources.get("CPU", 0):
                    raise HaloBalanceError(f"{job.name} needs {cpus} CPUs but the Ray cluster has "
                                           f"{self.resources.get('CPU', 0):g}; pass a smaller --generator-threads")
                options = {"num_cpus": cpus, "num_gpus": gpus if job.generator else 0, "name": job.name,
                           "max_retries": TASK_RETRIES, "retry_exceptions": False}
                refs[job.name] = call.options(**options).remote(job.fn, job.args,
                                                                *(refs[d] for d in job.after if d in refs))
            gather(ray, list(refs.values()), on_done=lambda i, result: on_done(jobs[i], result))


def make_executor(backend: str, *, jobs: int = 1, ray_address: str = "auto",
                  generator_gpus: float | None = None) -> LocalExecutor | RayExecutor:
    """The executor of ``--backend``."""
    if backend == "local":
        return LocalExecutor(jobs=jobs)
    if backend == "ray":
        return RayExecutor(address=ray_address, generator_gpus=generator_gpus)
    raise unknown_choice("--backend", [backend], BACKENDS)
