"""Scoring as the reference does: the method's labels -> many-to-one background merge -> PAMR on the merged map ->
per-image Hungarian counts (:mod:`spark_jax.evaluation`). The merges and counts are per image on the host (scipy's
Hungarian solver); PAMR runs on the whole batch in one program on the devices (:class:`BatchRefiner`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from spark_jax import sharding
from spark_jax.evaluation import Evaluator, LabelSpace, protocol_labels, refinement_input
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels_batch
from spark_jax.masks.resample import resize_bilinear
from spark_jax.openvocab.evaluation import OpenVocabEvaluator, sparse_confusion
from spark_jax.runner.errors import CorruptRunError

__all__ = ["BatchRefiner", "classes_present", "contiguous", "make_evaluator", "restore_scores", "score_batch",
           "score_image"]


def make_evaluator(space: LabelSpace, protocol: str) -> Evaluator | OpenVocabEvaluator:
    """The evaluator of ``protocol``: Hungarian matching of segments, or class ids on one confusion matrix
    (``open_vocab``)."""
    return OpenVocabEvaluator(space) if protocol == "open_vocab" else Evaluator(space, protocol)


def classes_present(label: np.ndarray, space: LabelSpace, protocol: str) -> int:
    """K*: the number of classes present in a label map [h, w] (reader ids) as ``protocol`` scores it.

    Void pixels do not count, except where the protocol scores them as a class (``diffcut``: VOC-style void is
    background, ADE20K's "other" is class 0).
    """
    spec = protocol_labels(space, protocol)
    rows = spec.fix_void(label)
    valid = (rows >= 0) & (rows < len(spec.class_names))
    return int(np.unique(rows[valid]).size)


def contiguous(pred: np.ndarray) -> np.ndarray:
    """Cluster ids as ranks of the sorted ids present (what DiffCut's PAMR step hands the evaluator)."""
    _, inverse = np.unique(np.asarray(pred), return_inverse=True)
    return inverse.reshape(np.shape(pred)).astype(np.int64)


def _as_ids(pred: np.ndarray) -> np.ndarray:
    return np.asarray(pred, np.int64)


@functools.lru_cache(maxsize=64)
def _refine_program(cfg: PamrConfig, mesh: jax.sharding.Mesh, capacity: int, height: int, width: int) -> Callable:
    """PAMR with ``capacity`` slots at ``height x width`` on each device's rows, one jitted program per process for
    each setting (runs, and sweeps of runs, share its compilations)."""

    def refine(batch, _):
        images, ranks = batch
        return refine_labels_batch(resize_bilinear(images, height, width), ranks, capacity, cfg)

    return jax.jit(sharding.per_device(refine, mesh))


class BatchRefiner:
    """PAMR of a batch's label maps in one jitted program on the devices of ``mesh``, each device refining its own
    images (:func:`spark_jax.sharding.per_device`; results identical to refining them one by one), on the prepared
    images resized bilinearly to the maps' size (the reference's PAMR input), inside the same program.

    Every map's ids are first replaced by their ranks among the ids present (what DiffCut's PAMR step does), and
    PAMR gets as many label slots as the batch's largest count, rounded up to a power of two (few compilations;
    slots no pixel holds never win, so every image's result is the one its own count would give). ``keep_ids``:
    the refined ranks are mapped back to the ids (class ids of an open-vocabulary run); else they are returned.
    """

    def __init__(self, cfg: PamrConfig, mesh: jax.sharding.Mesh, slots: int, *, keep_ids: bool = False):
        self.cfg, self.mesh, self.slots, self.keep_ids = cfg, mesh, slots, keep_ids

    def __call__(self, images: jax.Array | np.ndarray, maps: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Refines ``maps`` (n int [m, m] label maps, 1 <= n <= ``slots``) on ``images``, the batch's prepared
        images [slots or n, S, S, 3] in [0, 1] (rows past n are padding; a host array is padded and placed)."""
        uniques = [np.unique(np.asarray(m), return_inverse=True) for m in maps]
        ranks = np.stack([inv.reshape(np.shape(m)) for m, (_, inv) in zip(maps, uniques)]).astype(np.int32)
        capacity = label_capacity(max(ids.size for ids, _ in uniques))
        batch = (sharding.put_rows(images, self.slots, self.mesh), sharding.put_rows(ranks, self.slots, self.mesh))
        out = _refine_program(self.cfg, self.mesh, capacity, *ranks.shape[1:])(batch, ())
        out = np.asarray(out)[: len(maps)].astype(np.int64)
        return [ids[o] for (ids, _), o in zip(uniques, out)] if self.keep_ids else list(out)


def _given(expected: np.ndarray, result: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A ``refine`` that hands back ``result``, computed beforehand on ``expected`` (batched PAMR)."""

    def refine(pred: np.ndarray) -> np.ndarray:
        if not np.array_equal(pred, expected):  # a scoring change that moved the refinement's input
            raise RuntimeError("score_batch: the map handed to refinement is not the one refined in the batch (an "
                               "internal inconsistency of the scoring order; please report it)")
        return result

    return refine


def score_batch(evaluator: Evaluator | OpenVocabEvaluator, image_ids: Sequence[str], preds: Sequence[np.ndarray],
                gts: Sequence[np.ndarray | None], refiner: BatchRefiner | None, images: jax.Array | np.ndarray, *,
                class_ids: bool = False) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """:func:`score_image` of every image of a batch, with the refinement (PAMR) of all of them in one program
    on the devices (``refiner``, None: no refinement) between the background merge and the counts, as the
    reference orders them. ``images``: the batch's prepared images, for PAMR."""
    ids_of = _as_ids if class_ids else contiguous
    preds = [ids_of(p) for p in preds]
    refines: list[Callable | None] = [None] * len(preds)
    if refiner is not None:
        inputs = [p if gt is None or class_ids else
                  refinement_input(p, gt, evaluator.space, protocol=evaluator.protocol)
                  for p, gt in zip(preds, gts)]
        refines = [_given(x, y) for x, y in zip(inputs, refiner(images, inputs))]
    return [score_image(evaluator, i, p, gt, r, class_ids=class_ids)
            for i, p, gt, r in zip(image_ids, preds, gts, refines)]


def score_image(evaluator: Evaluator, image_id: str, pred: np.ndarray, gt: np.ndarray | None,
                refine: Callable[[np.ndarray], np.ndarray] | None, *,
                class_ids: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
    """Scores one image's labels [m, m] against its ground truth (None: unlabelled, drawn only).

    ``class_ids``: the labels are class ids (``--protocol=open_vocab``, an ``OpenVocabEvaluator``): they are kept
    as they are, and the record also holds the image's confusion cells (``confusion``, for resuming).

    Returns:
        The final label map (merged and refined, contiguous ids; class ids as scored) and the record fields of the
        score: ``scored``, and the TP/FP/FN counts and pixel count, or ``unscored_reason``.
    """
    ids_of = _as_ids if class_ids else contiguous
    pred = ids_of(pred)
    if gt is None:
        final = refine(pred) if refine is not None else pred
        return ids_of(final), {"scored": False, "unscored_reason": "no label map"}
    counts = evaluator.update(image_id, pred, gt, refine=refine)
    if counts.pixels == 0:  # every pixel void after the crop and resize: drawn and reported, not scored
        return ids_of(counts.pred), {"scored": False, "unscored_reason": "no valid pixel in the label map"}
    fields = {"scored": True, "tp": counts.tp.tolist(), "fp": counts.fp.tolist(), "fn": counts.fn.tolist(),
              "pixels": counts.pixels}
    if class_ids:
        fields["confusion"] = sparse_confusion(counts.confusion)
    return ids_of(counts.pred), fields


def restore_scores(evaluator: Evaluator, records: list[dict[str, Any]], results_path: str) -> None:
    """Adds the counts of the images a previous session scored (their ``results.jsonl`` records)."""
    for r in records:
        if r.get("scored"):
            try:
                extra = {"confusion": r["confusion"]} if "confusion" in r else {}  # open-vocabulary records
                evaluator.add_counts(r["id"], r["tp"], r["fp"], r["fn"], r["pixels"], **extra)
            except ValueError as err:
                raise CorruptRunError(f"{results_path}: the record of {r['id']!r} cannot be restored ({err}); "
                                      "delete its line (the image is then recomputed) to resume") from None
