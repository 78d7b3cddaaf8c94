"""Several processes (hosts) in one evaluation: starting them (``jax.distributed``), each one's share of the images,
and the few points where they meet.

One process runs per host (per GPU node, per TPU VM of a pod slice). Each evaluates its own contiguous share of the
pending images on its own devices (:mod:`spark_jax.sharding`) and logs them in its own resume log; they meet only
where the run directory is opened (one view of what is done), and at the end, where the per-image results of
every process are gathered, the scores rebuilt from the sums of their counts, and process 0 alone writes
``metrics.json``. Every exchange is a small collective over all devices (``jax.experimental.multihost_utils``), so
it works on GPU clusters (NCCL) and TPU pods alike, and on CPUs through gloo (JAX's default CPU collectives): the
tests run two local processes.

With one process every function here is the identity or a no-op: nothing needs ``jax.distributed`` then.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "DistributedConfig",
    "barrier",
    "check_all",
    "gather_objects",
    "initialize",
    "is_main_process",
    "process_shard",
    "process_sum",
    "run_together",
]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How the processes of one evaluation find each other (``jax.distributed.initialize``'s arguments).

    Attributes:
        enabled: start the distributed runtime (one process per host). False: one process, nothing started.
        coordinator_address: ``host:port`` of process 0, reachable from every host; None: detected by JAX (Cloud TPU
            pod slices, SLURM, Open MPI, Kubernetes, or the ``JAX_COORDINATOR_ADDRESS`` variable).
        num_processes: how many processes take part; None: detected as above.
        process_id: this process's rank in ``[0, num_processes)``; None: detected as above.
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        given = [n for n in ("coordinator_address", "num_processes", "process_id") if getattr(self, n) is not None]
        if given and not self.enabled:
            raise ValueError(f"--{given[0]} is given without --distributed: pass --distributed to start one process "
                             "per host, or drop the flag for a one-process run")
        if self.num_processes is not None and (not isinstance(self.num_processes, int) or self.num_processes < 1):
            raise ValueError(f"--num_processes must be an int >= 1, got {self.num_processes!r}")
        if self.process_id is not None:
            if not isinstance(self.process_id, int) or self.process_id < 0:
                raise ValueError(f"--process_id must be an int >= 0, got {self.process_id!r}")
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(f"--process_id={self.process_id} must be below --num_processes="
                                 f"{self.num_processes} (ranks 0..{self.num_processes - 1})")
        if self.coordinator_address is not None:
            host, _, port = self.coordinator_address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--coordinator_address={self.coordinator_address!r} must be host:port of process "
                                 "0, e.g. node0:12345")


def initialize(cfg: DistributedConfig) -> None:
    """Starts JAX's distributed runtime as ``cfg`` says (before any other JAX call of the process); a no-op when
    ``cfg.enabled`` is False or the runtime is already up.

    Raises:
        RuntimeError: the runtime could not start (the coordinator unreachable, settings not detectable), with
            JAX's reason and the flags that set it.
    """
    if not cfg.enabled or jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    except (RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({err}). Give --coordinator_address=host:port (process 0's, reachable "
            "from every host), --num_processes and --process_id on each host, or run where JAX detects them (a "
            "Cloud TPU pod slice, SLURM's srun, Open MPI's mpirun); see the README's 'Several hosts'."
        ) from None


def is_main_process() -> bool:
    """Whether this process writes the run's shared files (process 0)."""
    return jax.process_index() == 0


def process_shard(items: Sequence[T], index: int | None = None, count: int | None = None) -> list[T]:
    """Process ``index``'s contiguous share of ``items`` (default: this process of ``jax.process_count()``): the
    shares are in order, differ in length by at most one, and together hold every item once (as
    ``tfds.even_splits``)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_shard: process {index} is not among {count} processes")
    bounds = np.linspace(0, len(items), count + 1).round().astype(int)
    return list(items[bounds[index]:bounds[index + 1]])


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this ``name`` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (JSON-serialisable), in process order, on every process: ``[obj]`` with one.

    Objects travel as JSON bytes padded to the longest, so floats come back exactly (Python's JSON writes the
    shortest repr that round-trips).
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(obj))]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(every, lengths)]


def process_sum(tree: Any) -> Any:
    """The elementwise sum over processes of a tree of numbers or integer/float arrays (counts, seconds), on every
    process; ``tree`` itself with one process. Integer counts stay exact (int64 on the host)."""
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # Through JSON rather than device arrays: exact int64 sums whatever jax_enable_x64 says.
    every = gather_objects([np.asarray(x).tolist() for x in leaves])
    sums = [np.sum([np.asarray(p[k]) for p in every], axis=0) for k in range(len(leaves))]
    sums = [s.item() if isinstance(x, (int, float)) else s for s, x in zip(sums, leaves)]
    return jax.tree_util.tree_unflatten(treedef, sums)


def check_all(problem: str | None) -> None:
    """Raises ValueError on every process when any process found a problem (a message; None: none), naming each,
    so that no process goes on alone to wait for the others forever."""
    problems = gather_objects(problem)
    found = [f"process {k}: {p}" for k, p in enumerate(problems) if p is not None]
    if found:
        raise ValueError("; ".join(found))


def run_together(fn: Callable[[], T]) -> T:
    """``fn()`` on every process; when it raises on any, every process raises (that one its own exception, the
    others a RuntimeError naming it) instead of waiting at the next meeting point for a process that is gone."""
    if jax.process_count() == 1:
        return fn()
    error: Exception | None = None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others are told
        error = err
    problems = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [f"process {k}: {p}" for k, p in enumerate(problems) if p is not None]
    if failed:
        raise RuntimeError(f"another process of this run failed, so this one stops too ({'; '.join(failed)})")
    return result
