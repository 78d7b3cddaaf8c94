"""Data parallelism over the devices of a process: a mesh with one ``data`` axis, batches sharded over it, parameters
replicated, and the per-image loops of the methods run on each device's own rows.

Every computation of an evaluation is per image, so the batch axis is the only one split: a batch of B images
(B a multiple of the device count D, padded where needed, :func:`pad_rows`) lives as D blocks of B / D rows, one per
device, and every jitted program (backbone, method) runs on all devices at once with no communication. A jitted
``vmap`` keeps that sharding by itself; a ``lax.map`` over the batch does not (XLA gathers the whole batch onto every
device to index it, and every device then does all the work), so the methods' image-by-image loops go through
:func:`per_image_map`, which runs the loop inside ``shard_map`` over each device's rows when a mesh is active
(:func:`active`), and is ``lax.map`` otherwise.

Usage (what :func:`spark_jax.runner.run` does)::

    mesh = data_mesh()                                     # every device of this process
    x, mask = pad_rows(images_np, multiple=mesh.size)      # masked rows are never scored
    with active(mesh):
        out = jitted(put_batch(x, mesh), replicate(params, mesh))

The mesh spans the process's own devices (``jax.local_devices()``), also in a multi-process run
(:mod:`spark_jax.distributed`): *our choice*, since no computation needs another host's data, each process runs its
own programs on its own shard of the dataset, and the processes meet only at the start and the end of a run, so a
slower host never holds the others back.

The mesh's axis is ``Auto`` (``jax.sharding.Mesh``'s default): ``jax.make_mesh`` now defaults to ``Explicit`` axes,
under which a jitted ``vmap`` of an eigensolver on a sharded input fails outside ``jax.set_mesh`` (method-facts
section 6.3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "active",
    "batch_local",
    "batch_sharding",
    "data_mesh",
    "pad_rows",
    "padded_size",
    "per_device",
    "per_image_map",
    "put_batch",
    "put_rows",
    "replicate",
    "replicated",
]

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: every device of this process).

    Raises:
        ValueError: no devices, or a device another process owns (each process runs on its own devices).
    """
    devices = list(jax.local_devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh: no devices given; pass a non-empty list (default: jax.local_devices())")
    foreign = [d for d in devices if d.process_index != jax.process_index()]
    if foreign:
        raise ValueError(f"data_mesh: devices {foreign} belong to other processes; a run's mesh spans this "
                         f"process's devices (jax.local_devices()), each process evaluating its own images")
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh`` (parameters, constants)."""
    return NamedSharding(mesh, PartitionSpec())


def padded_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one multiple: a batch is never empty)."""
    if multiple < 1:
        raise ValueError(f"padded_size: multiple must be >= 1, got {multiple}")
    return max(1, -(-n // multiple)) * multiple


def pad_rows(x: np.ndarray, size: int | None = None, *, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pads the rows (axis 0) of a host array with copies of its last row.

    Copies, not zeros: a padded row then costs what a real one does (a method's while loop over a degenerate
    input could run to its iteration cap, and a vmapped loop runs as long as its slowest row).

    Args:
        x: [n, ...] with n >= 1.
        size: rows wanted (>= n); None: ``padded_size(n, multiple)``.
        multiple: see ``size``.

    Returns:
        ``(padded [size, ...], mask bool [size])``, ``mask`` True on the n real rows (the first n).
    """
    x = np.asarray(x)
    n = x.shape[0]
    if n < 1:
        raise ValueError("pad_rows: nothing to pad (0 rows); a batch needs at least one real row to copy")
    size = padded_size(n, multiple) if size is None else size
    if size < n:
        raise ValueError(f"pad_rows: cannot pad {n} rows to {size}")
    mask = np.arange(size) < n
    if size == n:
        return x, mask
    return np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)], axis=0), mask


def put_batch(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (or device arrays) [B, ...] -> arrays sharded over ``mesh``'s ``data`` axis (B a multiple of
    the mesh size: pad first with :func:`pad_rows`).

    Raises:
        ValueError: a leading axis that does not divide by the device count, naming it.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        if np.ndim(x) == 0 or np.shape(x)[0] % mesh.size:
            raise ValueError(f"put_batch: an array of shape {np.shape(x)} cannot be split over {mesh.size} devices; "
                             f"pad its rows to a multiple of {mesh.size} (sharding.pad_rows)")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map(put, tree)


def put_rows(x: jax.Array | np.ndarray, size: int, mesh: Mesh) -> jax.Array:
    """A batch array [n, ...] (n <= ``size``) padded to ``size`` rows with copies of its last (:func:`pad_rows`; on
    the device it is on, for a device array) and split over ``mesh``; one already so placed is returned as it is."""
    n = np.shape(x)[0]
    if n < size:
        if isinstance(x, jax.Array):
            x = jnp.concatenate([x, jnp.repeat(x[-1:], size - n, axis=0)], axis=0)
        else:
            x, _ = pad_rows(x, size)
    elif n > size:
        raise ValueError(f"put_rows: {n} rows do not fit in a batch of {size}")
    return put_batch(x, mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree``'s arrays copied to every device of ``mesh`` once (passing single-device parameters to a program
    on sharded data would copy them on every call); Python scalars and None stay as they are."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding) if isinstance(x, (jax.Array, np.ndarray))
                                  else x, tree)


@contextlib.contextmanager
def active(mesh: Mesh | None) -> Iterator[None]:
    """Programs traced inside run their per-image loops on each device's rows of ``mesh`` (``jax.set_mesh``: it is
    part of jit's cache key, so a program traced without a mesh is never reused under one); None: no change."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield


def _active_data_axis(leading: int | None) -> int | None:
    """The size of the active mesh's ``data`` axis if a traced loop should run per device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or DATA_AXIS in mesh.manual_axes:
        return None  # no mesh, another mesh, or already inside a shard_map over it
    size = mesh.shape[DATA_AXIS]
    if leading is not None and leading % size:
        raise ValueError(f"a batch of {leading} images cannot be split over the {size} devices of the active mesh; "
                         f"pad it to a multiple of {size} (sharding.pad_rows)")
    return size


# The bodies run per device with no collective, so shard_map's check of which values vary across devices
# (check_vma) is off: it would otherwise refuse every while loop whose initial carry is a constant (NCut's tree,
# AutoSC's discretisation) while its body's output depends on the device's images.


def _leading(tree: Any) -> int | None:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if np.ndim(x)]
    return leaves[0].shape[0] if leaves else None


def batch_local(fn: Callable) -> Callable:
    """``fn`` on each device's rows when a mesh is active (``shard_map`` over ``data``: every argument and result
    split along its leading batch axis), else ``fn`` itself.

    For functions whose rows are independent but whose body mixes the batch into another axis (a reshape to
    [B * heads, ...], a loop over it), which would lose the batch sharding: inside, the batch is the local one.
    """

    def wrapped(*args):
        if _active_data_axis(_leading(args)) is None:
            return fn(*args)
        spec = PartitionSpec(DATA_AXIS)
        return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(*args)

    return wrapped


def per_device(fn: Callable, mesh: Mesh) -> Callable:
    """``fn(batch, params)`` run by every device of ``mesh`` on its own rows of ``batch`` (a pytree of [B, ...]
    arrays split over ``data``) with the whole of ``params``; the results ([B, ...] leaves) split like the batch.

    For functions whose rows are independent, as every method's are (their results do not depend on batching):
    the devices then never communicate, so a vmapped loop (SPARK's Markov flow) ends on each device when its own
    images are done, instead of all devices looping until the slowest image of the whole batch is.

    On CPUs each device calls ``fn`` on one image at a time (``lax.map`` over batches of one): batching buys no
    parallelism there (WORKSPACE: SPARK's ``chunk_size=1`` is the faster on a CPU), and with several CPU devices
    jaxlib's batched LAPACK LU (SPARK's closed-form propagation) deadlocks in its thread pool (jax 0.10.2, every
    worker waiting in ``lapack_sgetrf_ffi``'s ParallelBatchMap; measured with two devices holding two images each).
    """
    data, whole = PartitionSpec(DATA_AXIS), PartitionSpec()
    body = fn
    if mesh.devices.flat[0].platform == "cpu":
        def body(batch, params):
            one = jax.lax.map(lambda row: fn(jax.tree_util.tree_map(lambda x: x[None], row), params), batch)
            return jax.tree_util.tree_map(lambda y: y[:, 0], one)  # [B, 1, ...] -> [B, ...]
    return jax.shard_map(body, mesh=mesh, in_specs=(data, whole), out_specs=data, check_vma=False)


def per_image_map(fn: Callable, xs: Any, *, batch_size: int | None = None) -> Any:
    """``lax.map(fn, xs, batch_size=batch_size)``, on each device's rows of the active mesh if there is one.

    Results are those of ``lax.map`` image for image: every image runs the same per-image program, on whichever
    device holds it.

    Args:
        fn: one image's inputs -> its outputs (pytrees).
        xs: pytree of arrays with a common leading batch axis.
        batch_size: images processed together (``lax.map``'s), per device under a mesh.
    """

    def loop(v):
        return jax.lax.map(fn, v, batch_size=batch_size)

    if _active_data_axis(_leading(xs)) is None:
        return loop(xs)
    spec = PartitionSpec(DATA_AXIS)
    return jax.shard_map(loop, in_specs=spec, out_specs=spec, check_vma=False)(xs)
