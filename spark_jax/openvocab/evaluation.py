"""The open-vocabulary evaluation protocol (``--protocol=open_vocab``): a dataset-level confusion matrix.

Open-vocabulary methods (NERVE, or any method whose segments CLIP names: ``--label_with=clip``) predict class
*ids* of the benchmark's vocabulary, so nothing is matched: a prediction is right when its id is the label's.
Scoring follows mmsegmentation's ``IoUMetric``, which the training-free open-vocabulary papers NERVE compares
with report (SCLIP, NACLIP, ProxyCLIP; method-facts section 1.3):

1. Per image, over the pixels whose label is a class (``0 <= label < K``; void, the reader's ignore value, is
   left out), a confusion matrix ``C[label, pred]``.
2. The matrices are summed over the dataset (int64; sums of any split of the images are equal, so per-host or
   per-device partial matrices reduce exactly by addition).
3. Per class ``IoU_k = C_kk / (sum_j C_kj + sum_i C_ik - C_kk)``: intersect over the union of the label's and
   the prediction's pixels of class k; NaN when that union is empty (the class is neither present nor
   predicted anywhere), ``mIoU = nanmean(IoU)``. A class predicted but never present has IoU 0 and counts.
   ``aAcc = trace(C) / sum(C)``; ``mAcc = nanmean(C_kk / sum_j C_kj)``.

The optional background threshold (NACLIP's ``prob_thd``: V21, PC60, COCO-Object use 0.1) is applied where the
class probabilities are, before scoring: :func:`apply_background_threshold`.

Everything except :func:`apply_background_threshold` is host-side NumPy: one ``bincount`` per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.evaluation import LabelSpace

__all__ = [
    "OpenVocabCounts",
    "OpenVocabEvaluator",
    "apply_background_threshold",
    "confusion_matrix",
    "dense_confusion",
    "scores_from_confusion",
    "sparse_confusion",
]


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[label, pred]`` of one image over its class pixels.

    Args:
        label: ``[h, w]`` int reader ids; pixels outside ``[0, num_classes)`` (void) are left out.
        pred: ``[h, w]`` int predicted class ids in ``[0, num_classes)``.
        num_classes: K.

    Returns:
        ``[K, K]`` int64.

    Raises:
        ValueError: shapes differ, or a predicted id lies outside ``[0, K)`` (a method that returns segment ids
            under this protocol, or a vocabulary of another size).
    """
    label = np.asarray(label)
    pred = np.asarray(pred)
    if label.shape != pred.shape:
        raise ValueError(f"label {label.shape} and prediction {pred.shape} differ in shape")
    if not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"open-vocabulary predictions must be integer class ids, got {pred.dtype}")
    label = label.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(
            f"predicted class ids {int(pred.min())}..{int(pred.max())} are outside the vocabulary's 0..{num_classes - 1}"
            ": under --protocol=open_vocab a method must return class ids of the benchmark's classes (an "
            "unsupervised method needs --label_with=clip)")
    valid = (label >= 0) & (label < num_classes)
    flat = np.bincount(label[valid] * num_classes + pred[valid], minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def scores_from_confusion(confusion: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """mmsegmentation's IoUMetric numbers from a (summed) confusion matrix ``[K, K]`` (rows: label).

    Returns:
        ``miou``, ``pixel_accuracy`` (aAcc), ``mean_accuracy`` (mAcc), ``per_class_iou`` and
        ``per_class_accuracy`` (``{name: value or None}``; None where undefined), NaN where nothing was scored.
    """
    conf = np.asarray(confusion, np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1] or conf.shape[0] != len(class_names):
        raise ValueError(f"confusion must be [K, K] with K = {len(class_names)} classes, got {conf.shape}")
    inter = np.diag(conf).astype(np.float64)
    area_label = conf.sum(axis=1).astype(np.float64)
    union = area_label + conf.sum(axis=0) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), np.nan)
        acc = np.where(area_label > 0, inter / np.where(area_label > 0, area_label, 1.0), np.nan)
    total = float(conf.sum())

    def mean(v):
        return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan

    def named(v):
        return {n: (None if np.isnan(x) else float(x)) for n, x in zip(class_names, v)}

    return {"miou": mean(iou), "pixel_accuracy": float(inter.sum() / total) if total else math.nan,
            "mean_accuracy": mean(acc), "per_class_iou": named(iou), "per_class_accuracy": named(acc)}


def sparse_confusion(confusion: np.ndarray) -> list[list[int]]:
    """The nonzero cells ``[[label, pred, count], ...]`` (row-major) of a confusion matrix: an image's record in
    ``results.jsonl`` (a handful of cells, where the dense matrix of 171 classes has 29k)."""
    conf = np.asarray(confusion, np.int64)
    rows, cols = np.nonzero(conf)
    return [[int(r), int(c), int(conf[r, c])] for r, c in zip(rows, cols)]


def dense_confusion(cells: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """Inverse of :func:`sparse_confusion`; ValueError on a cell outside ``[0, K)^2``, a negative count or a cell
    given twice."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    seen = set()
    for cell in cells:
        if len(cell) != 3:
            raise ValueError(f"a confusion cell is [label, pred, count], got {cell!r}")
        r, c, n = (int(v) for v in cell)
        if not (0 <= r < num_classes and 0 <= c < num_classes) or n < 0 or (r, c) in seen:
            raise ValueError(f"bad confusion cell {cell!r} for {num_classes} classes")
        seen.add((r, c))
        conf[r, c] = n
    return conf


def apply_background_threshold(labels: jax.Array, max_prob: jax.Array, threshold: float | jax.Array,
                               background: int = 0) -> jax.Array:
    """NACLIP's ``prob_thd``: pixels whose largest class probability is below ``threshold`` become ``background``.

    Args:
        labels: int class ids, any shape.
        max_prob: float, the same shape: each pixel's largest class probability.
        threshold: in [0, 1]; 0 leaves every label (no probability is below 0).
        background: the benchmark's background class id.

    Returns:
        Labels of the same shape and dtype. Jittable (``threshold`` may be traced).
    """
    return jnp.where(max_prob < threshold, jnp.asarray(background, labels.dtype), labels)


class OpenVocabCounts(NamedTuple):
    """Scores of one image. ``tp``/``fp``/``fn`` per class (``C_kk``, column minus diagonal, row minus diagonal)
    are the record fields every protocol writes; ``confusion`` is the image's whole matrix."""

    tp: np.ndarray  # [K] int64
    fp: np.ndarray  # [K] int64
    fn: np.ndarray  # [K] int64
    pixels: int  # class pixels scored (void left out)
    pred: np.ndarray  # [h, w] the class ids actually scored (after refinement)
    confusion: np.ndarray  # [K, K] int64

    @property
    def scored(self) -> bool:
        return self.pixels > 0


def _tp_fp_fn(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(conf).copy()
    return tp, conf.sum(axis=0) - tp, conf.sum(axis=1) - tp


class OpenVocabEvaluator:
    """Sums per-image confusion matrices over a dataset, once per image id (the runner's evaluator under
    ``--protocol=open_vocab``; same interface as :class:`spark_jax.evaluation.Evaluator`).

    Only images with at least one class pixel count; :meth:`update` returns the counts of one without and leaves
    the evaluator unchanged, so the caller reports it as unscored. The accumulator ``confusion`` is a plain int64
    sum: :meth:`merge` adds another evaluator's (disjoint images), e.g. from another host.
    """

    protocol = "open_vocab"

    def __init__(self, space: LabelSpace):
        self.space = space
        k = space.num_classes
        self.confusion = np.zeros((k, k), np.int64)
        self._images: set[str] = set()

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._images

    def __len__(self) -> int:
        return len(self._images)

    @property
    def image_ids(self) -> list[str]:
        return sorted(self._images)

    def update(self, image_id: str, pred: np.ndarray, label: np.ndarray, *,
               refine: Callable[[np.ndarray], np.ndarray] | None = None) -> OpenVocabCounts:
        """Scores one image's class ids ``pred [h, w]`` against ``label [h, w]`` (reader ids, already at
        ``pred``'s size) and adds it; ``refine`` (class ids -> class ids) runs first.

        Raises:
            ValueError: the id is already counted, or :func:`confusion_matrix` refuses the inputs.
        """
        if image_id in self._images:
            raise ValueError(f"image {image_id!r} is already counted; each image must be scored once")
        pred = np.asarray(pred)
        if pred.ndim != 2 or pred.shape != np.shape(label):
            raise ValueError(f"prediction {pred.shape} and label {np.shape(label)} must be the same [h, w]: resize "
                             "the label with preprocess.prepare_label to the prediction's size first")
        if refine is not None:
            refined = np.asarray(refine(pred))
            if refined.shape != pred.shape:
                raise ValueError(f"refine changed the prediction's shape to {refined.shape}")
            pred = refined
        conf = confusion_matrix(label, pred, self.space.num_classes)
        counts = OpenVocabCounts(*_tp_fp_fn(conf), int(conf.sum()), pred.astype(np.int64), conf)
        if counts.scored:
            self._add(image_id, conf)
        return counts

    def _add(self, image_id: str, conf: np.ndarray) -> None:
        self.confusion += conf
        self._images.add(image_id)

    def add_counts(self, image_id: str, tp, fp, fn, pixels: int, *,
                   confusion: Sequence[Sequence[int]] | None = None) -> None:
        """Adds an image's saved record (resume): its sparse ``confusion`` cells, checked against its TP/FP/FN.

        Raises:
            ValueError: the id is already counted, the cells are missing or malformed, cover no pixel, or disagree
                with the record's TP/FP/FN or pixel count (the saved record is damaged).
        """
        if image_id in self._images:
            raise ValueError(f"image {image_id!r} is already counted; each image must be scored once")
        if confusion is None:
            raise ValueError(f"the record of {image_id!r} has no confusion cells (it was not written by an "
                             "open-vocabulary run)")
        conf = dense_confusion(confusion, self.space.num_classes)
        if int(pixels) <= 0 or int(conf.sum()) != int(pixels):
            raise ValueError(f"the confusion cells of {image_id!r} hold {int(conf.sum())} pixels but the record says "
                             f"{pixels}; the saved record is damaged")
        want = _tp_fp_fn(conf)
        for name, got, w in zip(("tp", "fp", "fn"), (tp, fp, fn), want):
            if np.asarray(got, np.int64).shape != w.shape or not np.array_equal(np.asarray(got, np.int64), w):
                raise ValueError(f"the {name} counts of {image_id!r} disagree with its confusion cells; the saved "
                                 "record is damaged")
        self._add(image_id, conf)

    def merge(self, other: OpenVocabEvaluator) -> None:
        """Adds another evaluator's images (another host's or device's share); they must be disjoint."""
        if other.space != self.space:
            raise ValueError(f"cannot merge scores of {other.space.name!r} into {self.space.name!r}")
        both = self._images & other._images
        if both:
            raise ValueError(f"{len(both)} images are counted in both evaluators, e.g. {sorted(both)[0]!r}")
        self.confusion += other.confusion
        self._images |= other._images

    def result(self) -> dict[str, Any]:
        """mIoU, aAcc (``pixel_accuracy``), mAcc and per-class IoU / accuracy over the images counted so far."""
        return {**scores_from_confusion(self.confusion, self.space.class_names), "num_images": len(self._images),
                "protocol": self.protocol}
