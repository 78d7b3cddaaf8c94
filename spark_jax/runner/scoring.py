"""Scoring one image as the reference does: the method's labels -> many-to-one background merge -> PAMR on the
merged map -> per-image Hungarian counts (:mod:`spark_jax.evaluation`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.evaluation import Evaluator, LabelSpace, protocol_labels
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
from spark_jax.openvocab.evaluation import OpenVocabEvaluator, sparse_confusion
from spark_jax.runner.errors import CorruptRunError

__all__ = ["classes_present", "contiguous", "make_evaluator", "pamr_refiner", "restore_scores", "score_image"]

_refine_jit = jax.jit(refine_labels, static_argnums=(2, 3))


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


def pamr_refiner(image_small: np.ndarray, cfg: PamrConfig) -> Callable[[np.ndarray], np.ndarray]:
    """PAMR of a label map at the mask size on the image resized to it [m, m, 3], with as many label slots as
    the map has segments (rounded up to a power of two: few compilations)."""
    image = jnp.asarray(image_small)

    def refine(pred: np.ndarray) -> np.ndarray:
        pred = contiguous(pred)
        k = int(pred.max()) + 1
        return np.asarray(_refine_jit(image, jnp.asarray(pred, jnp.int32), label_capacity(k), cfg))

    return refine


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
