"""The batch loop: batches read and prepared ahead in worker threads (:mod:`~spark_jax.runner.input_pipeline`),
their features, the method, then each image scored and handed to the writer, which logs it once its files exist
(:class:`~spark_jax.runner.outputs.OutputWriter`; so an interrupted run loses at most the batches in flight)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax import sharding
from spark_jax.data import BadSampleError, Dataset, Sample
from spark_jax.evaluation import Evaluator
from spark_jax.runner.backbones import ResolvedBackbone
from spark_jax.runner.config import RunConfig
from spark_jax.runner.errors import bad_data_error, nonfinite_error
from spark_jax.methods.registry import MethodContext, MethodInputs, jitted_method
from spark_jax.runner.features import batch_taps, feature_map, token_grid
from spark_jax.runner.input_pipeline import BatchLoader
from spark_jax.runner.outputs import OutputWriter, write_image_outputs
from spark_jax.runner.rundir import append_record
from spark_jax.runner.scoring import BatchRefiner, score_batch

__all__ = ["STAGES", "Batch", "MethodCaller", "RunState", "run_batches", "verify_data"]

# Stages of metrics.json's ``timing.stage_seconds``. ``load`` and ``write`` are the loop's own waits (for a batch
# read ahead, for the writer and the log appends); the reading and writing threads' work is not in them.
STAGES = ("load", "backbone", "compile", "method", "score", "write")


@dataclasses.dataclass
class RunState:
    """What the loop accumulates: the finished images' records (earlier sessions' first), the skipped samples,
    the scores and the time per stage."""

    evaluator: Evaluator
    records: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    timing: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


class Batch:
    """One batch's samples and their prepared inputs (only the samples that could be read)."""

    def __init__(self, indices: list[int], samples: list[Sample], prepared: jax.Array, labels: list, num_classes):
        self.indices, self.samples, self.prepared = indices, samples, prepared
        self.labels, self.num_classes = labels, num_classes


def _skip(err: BadSampleError) -> dict[str, Any]:
    return {"id": err.image_id, "path": err.path, "reason": err.reason}


def verify_data(ds: Dataset, pending: list[int], on_bad_sample: str, quiet: bool) -> tuple[list[int], list[dict]]:
    """Decodes every pending image and label before the run, so that a bad file is named now, with all the
    others, not after hours of work. Returns the pending indices that can be read and the skipped samples (with
    ``on_bad_sample='fail'`` a bad sample raises BadDataError instead)."""
    if not pending or not hasattr(ds, "verify"):
        return pending, []
    bad = ds.verify(pending, progress=not quiet)
    if bad and on_bad_sample == "fail":
        raise bad_data_error(bad, len(pending))
    bad_index = {b.index for b in bad}
    return [i for i in pending if i not in bad_index], [_skip(b) for b in bad]


def batch_slots(batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """Images per backbone and method call: ``batch_size`` rounded up to a multiple of the mesh's devices, so that
    every device gets as many (every batch is padded to it: one compilation)."""
    return sharding.padded_size(batch_size, mesh.size)


@functools.lru_cache(maxsize=64)
def _on_each_device(jitted: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """A jitted method run by each device on its own images (no communication between devices inside the program),
    once per process for each (method, mesh): runs share its compilations as they share ``jitted_method``'s."""
    return jax.jit(sharding.per_device(jitted, mesh))


class MethodCaller:
    """The run's method (``cfg.method``'s spec, built for the run's mask size, upsampling and feature tap),
    compiled ahead of time once per input signature (one in practice: batches are padded to ``slots``), run with
    the batch split over ``mesh``, and timed on device."""

    def __init__(self, cfg: RunConfig, feature_tap: str, mesh: jax.sharding.Mesh, open_vocab=None):
        self.cfg, self.spec, self.mesh = cfg, cfg.spec, mesh
        self.slots = batch_slots(cfg.batch_size, mesh)
        # Open-vocabulary methods apply the run's background threshold themselves (they have the probabilities).
        threshold = open_vocab.background_threshold if open_vocab is not None and self.spec.open_vocab else 0.0
        self.ctx = MethodContext(cfg.mask_size, cfg.resolved_upsampling, feature_tap, background_threshold=threshold)
        self.jitted = _on_each_device(jitted_method(cfg.method, self.ctx), mesh)
        self.executables: dict[Any, Any] = {}

    def _check_outputs(self, labels, diag, batch_size: int) -> None:
        """A registered method's outputs must be what its spec declares (named, once per compilation)."""
        want = (batch_size, self.cfg.mask_size, self.cfg.mask_size)
        if tuple(labels.shape) != want or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"method {self.spec.name!r} returned labels {labels.dtype} {tuple(labels.shape)}; it "
                             f"must return integer labels of shape {want} (batch, mask size, mask size)")
        if set(diag) != set(self.spec.diagnostics):
            raise ValueError(f"method {self.spec.name!r} returned diagnostics {sorted(diag)}, its spec declares "
                             f"{sorted(self.spec.diagnostics)}")
        bad = [k for k, v in diag.items() if tuple(v.shape) != (batch_size,)]
        if bad:
            raise ValueError(f"method {self.spec.name!r}: diagnostics {bad} are not one value per image "
                             f"(shape ({batch_size},))")

    def __call__(self, feats: jax.Array, taps: dict[str, jax.Array], images: jax.Array, batch: Batch,
                 state: RunState, class_probs: jax.Array | None = None) -> tuple[np.ndarray, dict, float]:
        """Labels [n, m, m], diagnostics {name: [n]} of the batch's n images, and the per-image seconds.

        Every input is padded to ``slots`` rows (copies of the last real one, computed and never scored: the
        outputs' first n rows are the real images) and split over the mesh, as are the outputs."""
        inputs = MethodInputs(
            features=feats,
            taps=taps,
            images=images,
            num_classes=np.asarray(batch.num_classes, np.int32),
            index=np.asarray(batch.indices, np.int32),
            class_probs=class_probs,
        )
        inputs = jax.block_until_ready(jax.tree_util.tree_map(lambda x: sharding.put_rows(x, self.slots, self.mesh),
                                                              inputs))
        params = self.spec.params(self.cfg.method_config, self.ctx, tuple(feats.shape[1:3]))
        params = sharding.replicate(params, self.mesh)
        leaves, structure = jax.tree_util.tree_flatten(inputs)
        signature = (structure, tuple((a.shape, str(a.dtype)) for a in leaves),
                     jax.tree_util.tree_structure(params))
        if signature not in self.executables:
            t = time.perf_counter()
            with sharding.active(self.mesh):  # the methods' per-image loops run on each device's rows
                self.executables[signature] = self.jitted.lower(inputs, params).compile()
            # One untimed warm-up call: the first execution also pays one-off allocations.
            self._check_outputs(*jax.block_until_ready(self.executables[signature](inputs, params)), self.slots)
            state.timing["compile"] += time.perf_counter() - t
        # The clustering time: the jitted method alone, on device, waited for (no backbone, compilation, PAMR or
        # scoring). Every slot of the padded batch is computed, so a slot's share is the per-image time.
        t = time.perf_counter()
        labels, diag = jax.block_until_ready(self.executables[signature](inputs, params))
        seconds = time.perf_counter() - t
        state.timing["method"] += seconds
        n = len(batch.samples)
        return np.asarray(labels)[:n], {k: np.asarray(v)[:n] for k, v in diag.items()}, seconds / self.slots


def _finish(log, state: RunState, on_image: Callable[[str], None] | None, rec: dict[str, Any]) -> None:
    """An image's files exist: its record goes into the resume log and ``state``, then ``on_image`` hears of it."""
    append_record(log, rec)
    state.records.append(rec)
    if on_image is not None:
        on_image(rec["id"])


def run_batches(cfg: RunConfig, ds: Dataset, bb: ResolvedBackbone, resolution: int, pending: list[int],
                state: RunState, log, *, on_image: Callable[[str], None] | None, progress,
                mesh: jax.sharding.Mesh | None = None, open_vocab=None) -> None:
    """Evaluates the ``pending`` images batch by batch, appending each finished image to ``state`` and to the
    resume log ``log`` once its files are written. Images are read ahead and written behind in
    ``cfg.loader_workers`` threads; both sets of threads are stopped, whatever ends the loop.

    Batches of ``batch_slots(cfg.batch_size, mesh)`` images are split over ``mesh`` (default: every device of this
    process, :func:`spark_jax.sharding.data_mesh`); a short last batch is padded with masked copies.

    ``open_vocab`` (:class:`spark_jax.runner.open_vocab.OpenVocab`, open-vocabulary runs): CLIP's class
    probabilities go to the method, ``--label_with=clip`` names its segments, and the scores are of class ids."""
    mesh = sharding.data_mesh() if mesh is None else mesh
    if hasattr(bb.backbone, "replicate"):  # the diffusion backbone: its parameters on every device, once
        bb.backbone.replicate(sharding.replicated(mesh))
    loader = BatchLoader(ds, pending, batch_size=batch_slots(cfg.batch_size, mesh), resolution=resolution, mask_size=cfg.mask_size,
                         protocol=cfg.protocol, on_bad_sample=cfg.on_bad_sample, skipped=state.skipped,
                         workers=cfg.loader_workers, prefetch_batches=cfg.prefetch_batches, timing=state.timing)
    # One writing thread (PNG encoding and fsync release the GIL); images written behind at most a few batches.
    writer = OutputWriter(workers=min(1, cfg.loader_workers), max_pending=cfg.prefetch_batches * cfg.batch_size,
                          timing=state.timing)
    with loader, writer:  # a clean end commits every written image; an error commits nothing more
        _batch_loop(cfg, ds, bb, resolution, state, log, loader, writer, mesh, on_image=on_image, progress=progress,
                    open_vocab=open_vocab)


def _batch_loop(cfg: RunConfig, ds: Dataset, bb: ResolvedBackbone, resolution: int, state: RunState, log,
                loader: BatchLoader, writer: OutputWriter, mesh: jax.sharding.Mesh, *, on_image, progress,
                open_vocab=None) -> None:
    backbone = bb.backbone
    feature_tap = backbone.feature_tap
    taps = tuple(dict.fromkeys(cfg.spec.taps(cfg.method_config, backbone)))  # in order, without repeats
    if feature_tap not in taps:
        taps = (feature_tap, *taps)  # MethodInputs.features is always there
    grid = token_grid(backbone, feature_tap)
    method = MethodCaller(cfg, feature_tap, mesh, open_vocab)
    # PAMR on each device's images: of the segments before CLIP names them (--label_with=clip), else at scoring
    # (keeping class ids in an open-vocabulary run).
    pamr_cfg = (cfg.pamr_config if cfg.pamr else None) if open_vocab is None else open_vocab.pamr
    refiner = None if pamr_cfg is None else BatchRefiner(pamr_cfg, mesh, method.slots,
                                                         keep_ids=open_vocab is not None)
    scoring_refiner = None if open_vocab is not None and open_vocab.label_with == "clip" else refiner
    space = ds.label_space
    for loaded in loader:  # in order; the wait is timing["load"]; unreadable samples raised or skipped there
        batch = Batch(*loaded)

        t = time.perf_counter()
        cache = cfg.feature_cache if cfg.spec.cache_taps else None  # some methods' taps are too large to keep
        # The batch padded to the method's slots and split over the devices; the backbone runs on it sharded (taps
        # read from the cache come back as the real rows only, and are padded and placed alike).
        images = sharding.put_rows(batch.prepared, method.slots, mesh)
        with sharding.active(mesh):
            values = batch_taps(backbone, bb.key, cache, cfg.dataset, resolution, batch.samples, images, taps)
        values = {t: sharding.put_rows(v, method.slots, mesh) for t, v in values.items()}
        feats = feature_map(values[feature_tap], grid, feature_tap)
        # One small reduction per batch (the method syncs on its outputs anyway); padded rows are not looked at.
        nonfinite = np.asarray(jnp.sum(~jnp.all(jnp.isfinite(feats), axis=-1), axis=(1, 2)))[: len(batch.samples)]
        state.timing["backbone"] += time.perf_counter() - t
        if nonfinite.any() and not cfg.allow_nonfinite_features:
            found = [(s.image_id, int(n)) for s, n in zip(batch.samples, nonfinite) if n]
            raise nonfinite_error(found, feats.shape[1] * feats.shape[2], bb.description)

        clip = None  # open-vocabulary runs: dense CLIP features and class probabilities of the padded batch
        if open_vocab is not None:
            t = time.perf_counter()
            clip = jax.block_until_ready(open_vocab.encode(images))
            state.timing["backbone"] += time.perf_counter() - t
        labels, diag, per_image_seconds = method(feats, values, images, batch, state,
                                                 class_probs=None if clip is None else clip[1])
        t = time.perf_counter()
        if open_vocab is not None and open_vocab.label_with == "clip":  # segments -> PAMR -> CLIP's class names
            labels = open_vocab.name_segments(labels, images, clip[0], refiner, mesh, method.slots)
        scores = score_batch(state.evaluator, [s.image_id for s in batch.samples], list(labels), batch.labels,
                             scoring_refiner, images, class_ids=open_vocab is not None)
        state.timing["score"] += time.perf_counter() - t

        for j, (i, s) in enumerate(zip(batch.indices, batch.samples)):
            final, score = scores[j]
            rec: dict[str, Any] = {"id": s.image_id, "index": int(i), "clustering_seconds": per_image_seconds,
                                   "num_classes_present": batch.num_classes[j],
                                   "nonfinite_feature_tokens": int(nonfinite[j]), **score}

            rec["diagnostics"] = {k: v[j].item() for k, v in diag.items()}
            rec["num_predicted_segments"] = int(np.unique(final).size)  # ids are contiguous, or class ids
            # Files written in the writer's thread; the record logged (then on_image) once they exist (timing
            # "write": the loop's waits and logging).
            writer.submit(functools.partial(write_image_outputs, cfg.output_dir, s.image_id, final, batch.prepared[j],
                                            batch.labels[j], space.ignore_index,
                                            with_overlay=i < cfg.num_overlays or s.label is None),
                          functools.partial(_finish, log, state, on_image, rec))
        progress.update(len(batch.samples))
        if len(state.evaluator):
            progress.set_postfix_str(f"mIoU {100 * state.evaluator.result()['miou']:.1f}", refresh=False)
