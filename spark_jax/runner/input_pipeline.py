"""The runner's input pipeline: the pending images are read, decoded and prepared in background threads while the
device works on earlier batches, and handed to the batch loop in the order of the pending list, whatever order
the threads finish in.

Per image a worker does what the loop used to do before each batch: ``ds[i]`` (file decoding or the demo's
painting), the center crop and resize of the image (:func:`spark_jax.data.preprocess.prepare_image`, waited for,
so the batch is ready when it is handed over), the label map's crop and resize and its class count K*. A sample
that cannot be read (:class:`~spark_jax.data.BadSampleError`) is handed over as such, in its place, and the
:class:`BatchLoader` then does what the loop did: stop with every detail (``on_bad_sample='fail'``) or list it as
skipped. Any other exception of a worker is raised in the loop's thread when the loop reaches that image.

Resumable by construction: the pipeline keeps no state of its own. The pending list is what ``results.jsonl``
lacks (:func:`spark_jax.runner.benchmark.run`); an image read ahead but not finished when a run stops was never
logged, so a resume reads it again.

Why threads, and not grain: Pillow's decoders and resizers, zlib and JAX's dispatch release the GIL, so threads
overlap decoding with the device without copying images between processes. grain 0.2.18 was measured against this
module's scheme (a ``concurrent.futures`` pool, bounded, in order) on the same work, decoding 48 demo images saved
as 1024 x 768 JPEG + PNG pairs, center crop, resize to 256 (Pillow), on this shared 2-core VM (load average 7-10),
11 alternating rounds, min / median seconds: one thread 0.53 / 0.88; pool of 4, depth 8: 0.48 / 0.77; grain's
thread prefetch (``MapDataset.map`` -> ``to_iter_dataset(ReadOptions(num_threads=4, prefetch_buffer_size=8))``)
0.51 / 0.71; grain's ``mp_prefetch`` with 2 processes 2.14 / 2.58 (process start and shared-memory transfer; it
also printed ``SharedMemoryArray.__del__`` errors at exit). Both thread schemes are level within this VM's noise
and give identical arrays, so grain would be a dependency without a gain here; its processes pay off only for
Python-heavy transforms, which this pipeline does not have (the resize is one jitted call).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.data import BadSampleError, Dataset, Sample
from spark_jax.data.preprocess import prepare_image, prepare_label
from spark_jax.runner.errors import bad_data_error
from spark_jax.runner.scoring import classes_present

__all__ = ["BatchLoader", "LoadedBatch", "OrderedPrefetcher", "PreparedSample", "prepare_sample", "skip_record"]

T = TypeVar("T")
R = TypeVar("R")

_prep_jit = jax.jit(prepare_image, static_argnums=1)
_END = object()


class OrderedPrefetcher(Generic[T, R]):
    """``fn`` over ``items`` in ``workers`` threads, at most ``depth`` items ahead of the consumer, the results
    yielded in the order of ``items`` (whatever order the threads finish in).

    An exception raised by ``fn`` is raised by the iteration at that item's place, after every earlier result.
    ``workers=0`` calls ``fn`` in the consumer's thread as it iterates (nothing ahead, no thread). Use it as a
    context manager (or call :meth:`close`): leaving stops the work not yet started, waits for the items in
    progress and joins the threads, also on an exception or a KeyboardInterrupt in the consumer.
    """

    def __init__(self, fn: Callable[[T], R], items: Iterable[T], *, workers: int, depth: int,
                 name: str = "spark-jax-loader"):
        if workers < 0 or depth < 1:
            raise ValueError(f"workers must be >= 0 and depth >= 1, got workers={workers}, depth={depth}")
        self._fn, self._items = fn, iter(items)
        self._depth = max(depth, workers)  # fewer items in flight than threads would leave threads idle
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=name) if workers else None)
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._closed = False

    def _fill(self) -> None:
        while len(self._pending) < self._depth:
            item = next(self._items, _END)
            if item is _END:
                return
            self._pending.append(self._pool.submit(self._fn, item))

    def __iter__(self) -> Iterator[R]:
        return self

    def __next__(self) -> R:
        if self._closed:
            raise StopIteration
        if self._pool is None:
            item = next(self._items, _END)
            if item is _END:
                raise StopIteration
            return self._fn(item)
        self._fill()
        if not self._pending:
            raise StopIteration
        result = self._pending.popleft().result()  # re-raises fn's exception here, in order
        self._fill()  # keep the threads busy while the consumer works on this result
        return result

    def close(self) -> None:
        """Cancels the items not started, waits for those in progress, joins the threads (idempotent)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def __enter__(self) -> OrderedPrefetcher[T, R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreparedSample(NamedTuple):
    """One sample as the batch loop needs it.

    Attributes:
        index: its position in the dataset.
        sample: what ``ds[index]`` returned.
        image: ``[S, S, 3]`` float32 in [0, 1], center-cropped and resized to the backbone's resolution S.
        label: ``[m, m]`` int32 label map at the mask size, or None (unlabelled).
        num_classes: K*, the classes its label map holds as the protocol scores them (0 when unlabelled).
    """

    index: int
    sample: Sample
    image: jax.Array
    label: np.ndarray | None
    num_classes: int


class LoadedBatch(NamedTuple):
    """One batch's readable samples, in order (the fields of :class:`spark_jax.runner.loop.Batch`)."""

    indices: list[int]
    samples: list[Sample]
    prepared: jax.Array  # [n, S, S, 3] float32
    labels: list[np.ndarray | None]  # [m, m] int32 each
    num_classes: list[int]


def prepare_sample(ds: Dataset, index: int, *, resolution: int, mask_size: int, protocol: str,
                   read_slots: threading.Semaphore | None = None) -> PreparedSample | BadSampleError:
    """Reads and prepares sample ``index`` of ``ds`` (thread-safe when ``ds[i]`` is, or with ``read_slots``
    bounding the threads inside ``ds[i]``). A sample that cannot be read is returned as its BadSampleError."""
    try:
        with read_slots if read_slots is not None else contextlib.nullcontext():
            sample = ds[index]
    except BadSampleError as err:
        return err
    image = jax.block_until_ready(_prep_jit(jnp.asarray(sample.image), resolution))
    via = resolution if protocol == "diffcut" else None  # DiffCut's two-step nearest resize of the label
    label = None if sample.label is None else np.asarray(prepare_label(sample.label, mask_size, via=via))
    num_classes = 0 if label is None else classes_present(label, ds.label_space, protocol)
    return PreparedSample(index, sample, image, label, num_classes)


def skip_record(err: BadSampleError) -> dict:
    """A skipped sample as ``metrics.json`` lists it."""
    return {"id": err.image_id, "path": err.path, "reason": err.reason}


class BatchLoader:
    """The batches of ``pending`` (groups of ``batch_size`` positions, in order), read and prepared ahead in
    ``workers`` threads; each yielded :class:`LoadedBatch` holds the group's readable samples (a group with none
    is not yielded).

    A sample that fails to read stops the run with :class:`~spark_jax.runner.errors.BadDataError`
    (``on_bad_sample='fail'``) when the loop reaches its batch, or is appended to ``skipped`` (``'skip'``), as
    the loop did before batches were read ahead.

    Args:
        ds: the dataset.
        pending: dataset positions to evaluate, in order.
        batch_size: images per batch.
        resolution: the backbone's input side S.
        mask_size: side m of the label maps.
        protocol: the scoring protocol (the label resize and K* depend on it).
        on_bad_sample: ``fail`` or ``skip``.
        skipped: where skipped samples are appended (the run's list).
        workers: reading threads; 0 reads each batch in the loop's thread when the loop asks for it.
        prefetch_batches: batches read ahead at most (>= 1).
        timing: the seconds the loop waits for each batch are added to ``timing['load']`` (if given).
    """

    def __init__(self, ds: Dataset, pending: Sequence[int], *, batch_size: int, resolution: int, mask_size: int,
                 protocol: str, on_bad_sample: str, skipped: list, workers: int, prefetch_batches: int,
                 timing: dict[str, float] | None = None):
        if batch_size < 1 or prefetch_batches < 1:
            raise ValueError(f"batch_size and prefetch_batches must be >= 1, got {batch_size}, {prefetch_batches}")
        self._pending, self._batch_size = list(pending), batch_size
        self._on_bad_sample, self._skipped, self._timing = on_bad_sample, skipped, timing
        # A reader not known to be thread-safe (Dataset.verify_threads, 1 by default) is read by one thread at a
        # time; the preparation around it still runs on all the workers.
        slots = getattr(ds, "verify_threads", 1)
        read_slots = threading.Semaphore(max(1, slots)) if workers > max(1, slots) else None

        def prepare(i: int) -> PreparedSample | BadSampleError:
            return prepare_sample(ds, i, resolution=resolution, mask_size=mask_size, protocol=protocol,
                                  read_slots=read_slots)

        self._samples = OrderedPrefetcher(prepare, self._pending, workers=workers,
                                          depth=prefetch_batches * batch_size)

    def __iter__(self) -> Iterator[LoadedBatch]:
        for start in range(0, len(self._pending), self._batch_size):
            t = time.perf_counter()
            batch = self._next_batch(min(self._batch_size, len(self._pending) - start))
            if self._timing is not None:
                self._timing["load"] += time.perf_counter() - t
            if batch is not None:
                yield batch

    def _next_batch(self, n: int) -> LoadedBatch | None:
        kept: list[PreparedSample] = []
        for _ in range(n):
            item = next(self._samples)
            if isinstance(item, BadSampleError):
                if self._on_bad_sample == "fail":
                    raise bad_data_error([item], len(self._pending)) from None
                self._skipped.append(skip_record(item))
            else:
                kept.append(item)
        if not kept:
            return None
        return LoadedBatch([p.index for p in kept], [p.sample for p in kept], jnp.stack([p.image for p in kept]),
                           [p.label for p in kept], [p.num_classes for p in kept])

    def close(self) -> None:
        """Stops the reading threads (see :meth:`OrderedPrefetcher.close`)."""
        self._samples.close()

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
