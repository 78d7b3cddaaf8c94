"""Per-image outputs: the prediction PNG (cluster ids at the mask size) and the overlay image | prediction |
ground truth, and the :class:`OutputWriter` that writes them off the batch loop's critical path."""

from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from spark_jax.masks.resample import resize_bilinear
from spark_jax.runner.rundir import atomic_write_png, safe_name

__all__ = ["OutputWriter", "overlay", "resize_image", "write_image_outputs"]

_small_jit = jax.jit(resize_bilinear, static_argnums=(1, 2))


def resize_image(images, height: int, width: int) -> np.ndarray:
    """Images [..., S, S, 3] resized bilinearly (as PAMR and the overlays see them)."""
    return np.asarray(_small_jit(images, height, width))


def _palette(n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (n, 3), dtype=np.int64)
    pal[0] = (70, 70, 200)
    return pal.astype(np.uint8)


_PALETTE = _palette()


def _colour(labels: np.ndarray, ignore: int | None = None) -> np.ndarray:
    out = _PALETTE[np.asarray(labels) % len(_PALETTE)]
    if ignore is not None:
        out[np.asarray(labels) == ignore] = 0
    return out


def overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, ignore: int) -> np.ndarray:
    """image [S, S, 3] float | prediction blend | ground-truth blend, side by side (uint8)."""
    scale = max(1, 256 // pred.shape[0])  # overlays at >= 256 px, predictions upsampled by pixel repetition

    def up(a):
        return np.repeat(np.repeat(a, scale, 0), scale, 1)

    base = resize_image(image, pred.shape[0] * scale, pred.shape[1] * scale)
    base = (np.clip(base, 0, 1) * 255).astype(np.float32)
    panels = [base, 0.45 * base + 0.55 * up(_colour(pred))]
    if label is not None:
        panels.append(0.45 * base + 0.55 * up(_colour(label, ignore)))
    return np.concatenate(panels, axis=1).astype(np.uint8)


def write_image_outputs(out: str, image_id: str, final: np.ndarray, image, label: np.ndarray | None,
                        ignore: int, with_overlay: bool) -> None:
    """Writes ``predictions/<id>.png`` (16-bit if >= 256 segments) and, if asked, ``overlays/<id>.png`` (of
    ``image`` [S, S, 3] in [0, 1], a NumPy or JAX array)."""
    dtype = np.uint8 if final.max() < 256 else np.uint16
    atomic_write_png(os.path.join(out, "predictions", safe_name(image_id) + ".png"), final.astype(dtype))
    if with_overlay:
        atomic_write_png(os.path.join(out, "overlays", safe_name(image_id) + ".png"),
                         overlay(image, final, label, ignore))


class OutputWriter:
    """Writes each image's files in ``workers`` background threads and *commits* each image (logs it in the resume
    log, then tells the caller) in the caller's thread, in submission order, only once its files exist.

    ``submit(write, commit)``: ``write()`` runs in a worker; ``commit()`` runs later in the caller's thread,
    during a later :meth:`submit`, :meth:`poll` or :meth:`flush`, after ``write`` and every earlier write have
    finished. At most ``max_pending`` images are written but not committed: a submit beyond waits for the oldest.
    A write's exception (e.g. :class:`~spark_jax.runner.errors.OutputPathError`, disk full) is raised in the
    caller's thread where that image would have been committed; nothing after it is committed.

    As a context manager: a clean exit flushes (every image committed); an exception, a KeyboardInterrupt too,
    commits nothing more, waits for the writes in progress (no half-written file: each is written atomically),
    drops the queued ones and joins the threads. An image whose files were written but that was not committed is
    not in the log, so a resume computes it again. ``workers=0`` writes and commits in :meth:`submit` itself.

    Args:
        workers: writing threads (0: none, synchronous).
        max_pending: images written or being written but not yet committed, at most (>= 1).
        timing: the caller's seconds inside submit / poll / flush (waits and commits) are added to
            ``timing['write']`` (if given).
    """

    def __init__(self, *, workers: int = 1, max_pending: int = 8, timing: dict[str, float] | None = None):
        if workers < 0 or max_pending < 1:
            raise ValueError(f"workers must be >= 0 and max_pending >= 1, got workers={workers}, "
                             f"max_pending={max_pending}")
        self._pool = (concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="spark-jax-writer")
                      if workers else None)
        self._max_pending, self._timing = max_pending, timing
        self._queue: collections.deque[tuple[concurrent.futures.Future, Callable[[], None]]] = collections.deque()
        self._closed = False

    def _timed(self, t: float) -> None:
        if self._timing is not None:
            self._timing["write"] += time.perf_counter() - t

    def submit(self, write: Callable[[], None], commit: Callable[[], None]) -> None:
        """Queues ``write`` (files) and, once it and every earlier write are done, ``commit`` (the log)."""
        t = time.perf_counter()
        if self._closed:
            raise RuntimeError("OutputWriter.submit after close")
        try:
            if self._pool is None:
                write()
                commit()
                return
            self._queue.append((self._pool.submit(write), commit))
            self._commit_done()
            while len(self._queue) > self._max_pending:
                self._commit_head()
        finally:
            self._timed(t)

    def poll(self) -> None:
        """Commits every image at the head of the queue whose files are written (never waits)."""
        t = time.perf_counter()
        try:
            self._commit_done()
        finally:
            self._timed(t)

    def flush(self) -> None:
        """Waits for every write and commits every image, in order."""
        t = time.perf_counter()
        try:
            while self._queue:
                self._commit_head()
        finally:
            self._timed(t)

    def _commit_done(self) -> None:
        while self._queue and self._queue[0][0].done():
            self._commit_head()

    def _commit_head(self) -> None:
        future, commit = self._queue[0]
        future.result()  # a failed write raises here, before its image (or any later one) is committed
        self._queue.popleft()
        commit()

    def close(self) -> None:
        """Commits nothing more; waits for the writes in progress, drops the queued ones, joins the threads."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._queue.clear()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()
