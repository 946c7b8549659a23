"""Running work on a Ray cluster: connecting, asking for resources, collecting results.

Ray (Apache-2.0) is an optional extra: ``pip install -e ".[ray]"``. It is imported only when a
command runs with ``--backend ray``; without it that command stops with one line naming the
install command. ``torchrun`` stays the way to train one generator on several GPUs; Ray spreads
many independent pieces of work (shards of a sampling request, the units of a k-fold grid) over
the machines of a cluster.

Addresses (``--ray-address``): ``auto`` joins the cluster this machine belongs to (started with
``ray start --head`` here, or ``ray start --address HEAD:PORT`` to join a head elsewhere);
``HOST:PORT`` joins that head; ``local`` starts a private one-machine Ray for this command alone,
listening on the loopback interface only, and stops it at the end.

Every node must run the same Python environment (this package installed) and, where tasks read
or write files (the k-fold harness), see the same paths (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from .errors import HaloBalanceError, import_optional

BackendName = Literal["local", "ray"]
BACKENDS: tuple[str, ...] = ("local", "ray")
RAY_INSTALL = 'pip install -e ".[ray]"'
#: Ray re-runs a task this many times when the worker or node running it dies.
TASK_RETRIES = 3


def import_ray():
    """The ``ray`` module, or a :class:`MissingDependencyError` naming the install command."""
    return import_optional("ray", extra="ray", needed_for="--backend ray",
                           note="Or run with --backend local (this machine)")


@contextlib.contextmanager
def ray_session(address: str = "auto") -> Iterator[Any]:
    """Yield the ``ray`` module connected to the cluster at ``address`` (module docstring).

    A connection this block opened is closed at its end (the cluster keeps running, except a
    ``local`` one, which is this command's own); an existing connection is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    with contextlib.ExitStack() as stack:
        if address == "local":
            address = stack.enter_context(local_cluster(node_cpus=(os.cpu_count() or 1,))).address
        try:
            ray.init(address=address, logging_level="warning")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            hint = ("start one with `ray start --head` (on this machine), pass its head's HOST:PORT, or pass "
                    "--ray-address local for a private one-machine Ray")
            raise HaloBalanceError(f"cannot reach a Ray cluster at --ray-address {address} ({exc}); {hint}") from None
        try:
            yield ray
        finally:
            ray.shutdown()


@contextlib.contextmanager
def local_cluster(*, node_cpus: Sequence[int] = (1, 1)) -> Iterator[Any]:
    """A Ray cluster of several node processes on this machine, for tests and measurements.

    The first node is the head, the others join it as workers; ``node_cpus[i]`` is node i's CPU
    count. Every process listens on the loopback interface only, and every process is stopped at
    the end of the block, on failure too. Yields ``ray.cluster_utils.Cluster``: ``.address`` to
    pass as ``--ray-address``, ``.worker_nodes`` and ``.remove_node(node)`` to kill a node.
    """
    ray = import_ray()
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # Ray replaces a loopback address by the machine's network address before connecting, where a
    # loopback-only cluster does not listen; with this flag off it keeps the loopback address.
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = None
    try:
        node = {"include_dashboard": False, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": node_cpus[0]},
                          shutdown_at_exit=True)
        for cpus in node_cpus[1:]:
            cluster.add_node(**node, num_cpus=cpus)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved


def check_reachable(address: str) -> None:
    """Fail early, with the fix, unless Ray is installed and the cluster at ``address`` answers."""
    ray = import_ray()
    if address != "local" and not ray.is_initialized():
        with ray_session(address):
            pass


def cluster_gpus(ray) -> float:
    """GPUs in the cluster (0 when it has none)."""
    return float(ray.cluster_resources().get("GPU", 0))


def resolve_gpus(ray, requested: float | None) -> float:
    """GPUs per GPU task: ``requested``, or one where the cluster has GPUs and none where it has not."""
    if requested is None:
        return 1.0 if cluster_gpus(ray) else 0.0
    if requested < 0:
        raise HaloBalanceError(f"GPUs per task must be >= 0 (got {requested})")
    if requested > 0 and not cluster_gpus(ray):
        raise HaloBalanceError(f"{requested:g} GPU(s) per task were asked for, but the Ray cluster has no GPU "
                               f"(resources: {ray.cluster_resources()}); pass 0")
    return float(requested)


def task_error(exc: BaseException) -> BaseException:
    """The exception a failed Ray task raised (so that the package's own errors stay themselves)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


def gather(ray, refs: Sequence[Any], on_done: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Wait for every task of ``refs``; call ``on_done(i, result)`` as task i finishes (in the
    order they finish) and return the results in the order of ``refs``. The first failure cancels
    the tasks still pending and raises that task's own error."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    waiting = list(refs)
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            i = index[done[0]]
            try:
                results[i] = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                raise task_error(exc) from None
            if on_done is not None:
                on_done(i, results[i])
    except BaseException:
        cancel(ray, waiting)
        raise
    return results


def cancel(ray, refs: Iterable[Any]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
