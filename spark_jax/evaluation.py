"""Unsupervised-segmentation scoring: per-image Hungarian matching, many-to-one background, mIoU.

The protocol is DiffCut's released evaluation (DiffCut, Sec. 4 and Appendix H), which SPARK's Table 1 numbers
are comparable to:

1. Predictions and ground truth at 128x128 (the label map center-cropped like the image, nearest resize).
2. Per image, a confusion histogram ``hist[class, cluster]`` over the valid pixels; rows are all classes of
   the dataset, columns ``max(num_classes, max cluster id + 1)``; ``scipy.optimize.linear_sum_assignment``
   maximises the matched pixels, every class row gets a column. ``TP`` = matched cell, ``FN`` = rest of the
   row, ``FP`` = rest of the matched column. Classes absent from the image are matched too: a surplus
   cluster that lands on an absent class counts as its false positives, which is how over-segmentation is
   penalised.
3. TP/FP/FN are summed over the dataset; ``IoU = TP / (TP + FP + FN)``; ``mIoU = nanmean`` over classes
   (a class with no pixel anywhere and never predicted is NaN and skipped).
4. Datasets with a background class (VOC, Pascal Context, COCO-Object): the prediction is first matched
   against the foreground classes only; every cluster not assigned to a foreground class present in the
   image is merged into one "background" cluster (many-to-one), optionally refined (PAMR runs *after* the
   merge in the reference), then scored as in 2.

Two protocols, differing only where DiffCut's code departs from the datasets' definitions:

========================  ======================================  ========================================
                          ``standard`` (default)                  ``diffcut`` (count-for-count with DiffCut)
========================  ======================================  ========================================
void pixels (VOC 255,     ignored                                 counted as background (its loaders map
COCO unlabeled)                                                   void and background to one id)
ADE20K                    id 0 ("other") ignored, 150 classes     scores raw ids 0..149: "other" is class 0
                                                                  and the last class (id 150) is ignored
label resize to 128       one nearest-exact resize of the crop    nearest-exact to 1024, then legacy nearest
                                                                  to 128 (loader, then evaluation script)
cluster ids               made contiguous (rank of sorted ids)    used as given (the histogram width and
                          before matching, so a score never       scipy's tie-breaking depend on them)
                          depends on arbitrary id numbering
"assigned" foreground     its own matched cluster overlaps it     any matched cluster overlaps its row
class in the merge
background row            the dataset's own index                 last row (DiffCut's id order)
========================  ======================================  ========================================

Everything here is host-side NumPy/SciPy: the assignment problem has no jittable exact solver and is tiny
(<= 150 x a few hundred) next to the backbone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "LabelSpace",
    "ProtocolLabels",
    "ImageCounts",
    "protocol_labels",
    "confusion",
    "match_counts",
    "merge_background",
    "refinement_input",
    "score_image",
    "iou_from_counts",
    "Evaluator",
]

Protocol = Literal["standard", "diffcut", "open_vocab"]
# open_vocab: predictions are class ids, scored without matching (spark_jax.openvocab.evaluation).
PROTOCOLS: tuple[str, ...] = ("standard", "diffcut", "open_vocab")


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The classes of a benchmark as its reader yields them.

    Attributes:
        name: dataset name (registry key).
        class_names: one name per class id ``0..K-1``.
        background: id of the background class whose clusters are merged many-to-one (VOC, Context,
            COCO-Object), or None.
        ignore_index: the one value the reader writes for void / unlabelled pixels.
        diffcut_shift: ADE20K only: the reader's id ``k`` is the raw annotation id ``k + 1`` and the
            ignore value is raw id 0; the ``diffcut`` protocol scores raw ids (see module docstring).
    """

    name: str
    class_names: tuple[str, ...]
    background: int | None = None
    ignore_index: int = 255
    diffcut_shift: bool = False

    def __post_init__(self):
        if self.background is not None and not 0 <= self.background < len(self.class_names):
            raise ValueError(f"background id {self.background} outside 0..{len(self.class_names) - 1}")
        if 0 <= self.ignore_index < len(self.class_names):
            raise ValueError(f"ignore_index {self.ignore_index} collides with a class id")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ProtocolLabels(NamedTuple):
    """A label space as one protocol scores it: the rows of the confusion histogram."""

    class_names: tuple[str, ...]  # one per row, in row order
    background: int | None  # row of the background class, or None
    fix_void: Callable[[np.ndarray], np.ndarray]  # reader ids -> row ids (anything else is ignored)


def protocol_labels(space: LabelSpace, protocol: Protocol) -> ProtocolLabels:
    """Maps a reader's label space to the rows scored under ``protocol``.

    Args:
        space: the dataset's label space.
        protocol: ``'standard'`` or ``'diffcut'``.

    Returns:
        Row names, the background row, and a function mapping a label map in reader ids (``[h, w]`` int) to
        row ids; pixels outside ``[0, len(rows))`` are ignored when scoring.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    names, bg, ign = space.class_names, space.background, space.ignore_index
    if protocol in ("standard", "open_vocab"):  # the reader's ids; void ignored
        return ProtocolLabels(names, bg, lambda label: np.asarray(label, np.int64))
    if space.diffcut_shift:
        # DiffCut scores raw ADE ids 0..149: "other" (raw 0, our ignore) is a class, raw 150 is dropped.
        def shift(label):
            label = np.asarray(label, np.int64)
            return np.where(label == ign, 0, label + 1)

        return ProtocolLabels(("other",) + names[:-1], None, shift)
    if bg is None:
        return ProtocolLabels(names, None, lambda label: np.asarray(label, np.int64))
    # Background last, foreground classes in their order; void pixels become background.
    order = [c for c in range(len(names)) if c != bg] + [bg]
    lut = np.full(max(len(names), ign + 1), -1, np.int64)
    lut[order] = np.arange(len(names))
    lut[ign] = len(names) - 1

    def to_rows(label):
        label = np.asarray(label, np.int64)
        inside = (label >= 0) & (label < lut.size)
        return np.where(inside, lut[np.clip(label, 0, lut.size - 1)], -1)

    return ProtocolLabels(tuple(names[c] for c in order), len(names) - 1, to_rows)


def confusion(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Histogram ``hist[class, cluster]`` of one image over valid pixels.

    Args:
        label: ``[h, w]`` int class ids; pixels outside ``[0, num_classes)`` are ignored.
        pred: ``[h, w]`` int cluster ids >= 0.
        num_classes: number of rows.

    Returns:
        ``[num_classes, max(num_classes, pred.max() + 1)]`` int64.
    """
    label = np.asarray(label, np.int64).ravel()
    pred = np.asarray(pred, np.int64).ravel()
    if label.shape != pred.shape:
        raise ValueError(f"label and prediction differ in size: {label.size} vs {pred.size} pixels")
    if pred.size and pred.min() < 0:
        raise ValueError("cluster ids must be >= 0")
    cols = max(num_classes, int(pred.max()) + 1 if pred.size else 0)
    valid = (label >= 0) & (label < num_classes)
    flat = np.bincount(label[valid] * cols + pred[valid], minlength=num_classes * cols)
    return flat.reshape(num_classes, cols)


def match_counts(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one Hungarian matching of classes to clusters on one histogram.

    Args:
        hist: ``[K, P]`` confusion, ``P >= K``.

    Returns:
        ``(tp [K], fp [K], fn [K], col [K])``: counts per class and the cluster matched to each class.
    """
    rows, cols = linear_sum_assignment(hist, maximize=True)
    col = np.empty(hist.shape[0], np.int64)
    col[rows] = cols
    tp = hist[np.arange(hist.shape[0]), col]
    fn = hist.sum(axis=1) - tp
    fp = hist[:, col].sum(axis=0) - tp
    return tp, fp, fn, col


def _contiguous(pred: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(pred, return_inverse=True)
    return inverse.reshape(pred.shape).astype(np.int64)


def merge_background(
    pred: np.ndarray, rows: np.ndarray, num_rows: int, background: int, *, protocol: Protocol = "standard"
) -> np.ndarray:
    """Many-to-one background: merges every cluster not matched to a present foreground class (App. H).

    Args:
        pred: ``[h, w]`` int cluster ids.
        rows: ``[h, w]`` int row ids (see :func:`protocol_labels`); background and invalid pixels are left
            out of the foreground matching.
        num_rows: number of classes (rows), background included.
        background: the background row.
        protocol: selects the test of "assigned" (see the module docstring).

    Returns:
        ``[h, w]`` int64 prediction where every unassigned cluster carries one new id ``pred.max() + 1``.
    """
    pred = np.asarray(pred, np.int64)
    rows = np.asarray(rows, np.int64)
    # Foreground rows keep their order with the background row taken out (the identity when it is last).
    keep = np.array([r for r in range(num_rows) if r != background], np.int64)
    lut = np.full(num_rows, -1, np.int64)
    lut[keep] = np.arange(keep.size)
    fg = np.where((rows >= 0) & (rows < num_rows), lut[np.clip(rows, 0, num_rows - 1)], -1)
    hist = confusion(fg, pred, int(keep.size))
    _, _, _, col = match_counts(hist)
    if protocol == "diffcut":
        # As released: a row counts as assigned if *any* matched column overlaps it.
        assigned_rows = np.nonzero(hist[:, col].max(axis=1) > 0)[0]
    else:
        assigned_rows = np.nonzero(hist[np.arange(keep.size), col] > 0)[0]
    assigned = np.asarray(sorted(set(col[assigned_rows].tolist())), np.int64)
    new_id = int(pred.max()) + 1
    return np.where(np.isin(pred, assigned), pred, new_id)


class ImageCounts(NamedTuple):
    """Scores of one image (rows in the protocol's order).

    ``pixels == 0`` (``scored`` False) means the label map had no valid pixel after the crop and resize (all
    void): the image says nothing about any class, so :class:`Evaluator` does not count it.
    """

    tp: np.ndarray  # [K] int64
    fp: np.ndarray  # [K] int64
    fn: np.ndarray  # [K] int64
    pixels: int  # valid pixels scored
    pred: np.ndarray  # [h, w] the prediction actually scored (after merge and refinement)

    @property
    def scored(self) -> bool:
        """Whether the image had a valid pixel, i.e. counts towards the dataset's scores."""
        return self.pixels > 0


def _merged(pred, label, space: LabelSpace, protocol: Protocol) -> tuple[np.ndarray, np.ndarray, ProtocolLabels]:
    pred = np.asarray(pred)
    label = np.asarray(label)
    if pred.shape != label.shape or pred.ndim != 2:
        raise ValueError(
            f"prediction {pred.shape} and label {label.shape} must be the same [h, w]: resize the label with "
            "preprocess.prepare_label to the prediction's size first."
        )
    if not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"predictions must be integer cluster ids, got {pred.dtype}")
    spec = protocol_labels(space, protocol)
    rows = spec.fix_void(label)
    pred = pred.astype(np.int64)
    if protocol == "standard":
        pred = _contiguous(pred)
    if spec.background is not None:
        pred = merge_background(pred, rows, len(spec.class_names), spec.background, protocol=protocol)
    return pred, rows, spec


def refinement_input(pred: np.ndarray, label: np.ndarray, space: LabelSpace, *,
                     protocol: Protocol = "standard") -> np.ndarray:
    """The map :func:`score_image`'s ``refine`` is called on (after the background merge): to refine a batch of
    images at once, compute these first, refine them together, and hand each image's result back through
    ``refine``."""
    return _merged(pred, label, space, protocol)[0]


def score_image(
    pred: np.ndarray,
    label: np.ndarray,
    space: LabelSpace,
    *,
    protocol: Protocol = "standard",
    refine: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ImageCounts:
    """Scores one prediction against its label map.

    Args:
        pred: ``[h, w]`` int cluster ids (any non-negative ids).
        label: ``[h, w]`` int reader ids, already cropped/resized to ``pred``'s size.
        space: the dataset's label space.
        protocol: ``'standard'`` or ``'diffcut'``.
        refine: optional ``pred [h, w] -> pred [h, w]`` applied after the background merge and before
            scoring (the reference applies PAMR there).

    Returns:
        :class:`ImageCounts`.
    """
    pred, rows, spec = _merged(pred, label, space, protocol)
    if refine is not None:
        pred = np.asarray(refine(pred), np.int64)
        if pred.shape != label.shape:
            raise ValueError(f"refine changed the prediction's shape to {pred.shape}")
    if protocol == "standard":
        pred = _contiguous(pred)
    hist = confusion(rows, pred, len(spec.class_names))
    tp, fp, fn, _ = match_counts(hist)
    return ImageCounts(tp, fp, fn, int(hist.sum()), pred)


def iou_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class IoU ``TP / (TP + FP + FN)``, NaN where the denominator is 0."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    denom = tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)


class Evaluator:
    """Accumulates TP/FP/FN over a dataset, once per image id, and serialises for resume.

    Only images with at least one valid pixel are counted (``num_images``); :meth:`update` returns the counts of
    an image without one with ``pixels == 0`` and leaves the evaluator unchanged, so the caller reports it.

    Example::

        ev = Evaluator(space, protocol="standard")
        for image_id, pred, label in ...:
            ev.update(image_id, pred, label)
        ev.result()["miou"]
    """

    def __init__(self, space: LabelSpace, protocol: Protocol = "standard"):
        if protocol == "open_vocab":
            raise ValueError("the open_vocab protocol scores class ids without matching: use "
                             "spark_jax.openvocab.evaluation.OpenVocabEvaluator")
        self.space = space
        self.protocol = protocol
        self.rows = protocol_labels(space, protocol)
        k = len(self.rows.class_names)
        self._per_image: dict[str, tuple[list[int], list[int], list[int], int]] = {}
        self.tp = np.zeros(k, np.int64)
        self.fp = np.zeros(k, np.int64)
        self.fn = np.zeros(k, np.int64)
        self.pixels = 0

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._per_image

    def __len__(self) -> int:
        return len(self._per_image)

    @property
    def image_ids(self) -> list[str]:
        return list(self._per_image)

    def update(
        self,
        image_id: str,
        pred: np.ndarray,
        label: np.ndarray,
        *,
        refine: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> ImageCounts:
        """Scores one image and adds it (see :func:`score_image`).

        Returns:
            The image's :class:`ImageCounts`. When ``counts.pixels == 0`` (no valid pixel: every label pixel is
            void after the crop and resize) the image is *not* counted: ``num_images``, the sums and
            ``image_ids`` stay as they were, and the caller should report it as unscored.

        Raises:
            ValueError: if ``image_id`` was already counted (an image must count exactly once).
        """
        if image_id in self._per_image:
            raise ValueError(f"image {image_id!r} is already counted; each image must be scored once")
        counts = score_image(pred, label, self.space, protocol=self.protocol, refine=refine)
        if counts.scored:
            self.add_counts(image_id, counts.tp, counts.fp, counts.fn, counts.pixels)
        return counts

    def add_counts(self, image_id: str, tp, fp, fn, pixels: int) -> None:
        """Adds precomputed counts of one image (used when restoring).

        Raises:
            ValueError: the id is already counted, the counts have the wrong length, are negative, cover no
                valid pixel (such an image is not scored), or do not add up (``sum(tp + fn)`` must be
                ``pixels``: every valid pixel belongs to one class row).
        """
        if image_id in self._per_image:
            raise ValueError(f"image {image_id!r} is already counted; each image must be scored once")
        tp, fp, fn = (np.asarray(a, np.int64) for a in (tp, fp, fn))
        if not tp.shape == fp.shape == fn.shape == self.tp.shape:
            raise ValueError(f"counts of {image_id!r} have the wrong number of classes")
        if min(tp.min(), fp.min(), fn.min()) < 0:
            raise ValueError(f"counts of {image_id!r} are negative")
        if int(pixels) <= 0:
            raise ValueError(f"image {image_id!r} has no valid pixel ({pixels}); such an image is not scored")
        if int(tp.sum() + fn.sum()) != int(pixels):
            raise ValueError(
                f"counts of {image_id!r} do not add up: sum(tp + fn) = {int(tp.sum() + fn.sum())} but pixels = "
                f"{int(pixels)}; the saved counts are damaged"
            )
        self._per_image[image_id] = (tp.tolist(), fp.tolist(), fn.tolist(), int(pixels))
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.pixels += int(pixels)

    def result(self) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU over the images counted so far."""
        iou = iou_from_counts(self.tp, self.fp, self.fn)
        miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan
        return {
            "miou": miou,
            "pixel_accuracy": float(self.tp.sum() / self.pixels) if self.pixels else math.nan,
            "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(self.rows.class_names, iou)},
            "num_images": len(self._per_image),
            "protocol": self.protocol,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: per-image counts (sums are rebuilt from them on restore)."""
        return {
            "dataset": self.space.name,
            "protocol": self.protocol,
            "classes": list(self.rows.class_names),
            "images": {k: {"tp": v[0], "fp": v[1], "fn": v[2], "pixels": v[3]} for k, v in self._per_image.items()},
        }

    @classmethod
    def from_state_dict(cls, space: LabelSpace, state: Mapping[str, Any]) -> Evaluator:
        """Restores an evaluator; refuses state written for another dataset, protocol or class list."""
        protocol = state.get("protocol")
        ev = cls(space, protocol)
        if state.get("dataset") != space.name or list(state.get("classes", [])) != list(ev.rows.class_names):
            raise ValueError(
                f"saved evaluation state is for dataset {state.get('dataset')!r} / protocol {protocol!r} with other "
                f"classes; it cannot be resumed as {space.name!r}. Use a fresh --output_dir."
            )
        for image_id, c in state["images"].items():
            ev.add_counts(image_id, c["tp"], c["fp"], c["fn"], c["pixels"])
        return ev

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, space: LabelSpace, text: str) -> Evaluator:
        return cls.from_state_dict(space, json.loads(text))


def evaluate(
    items: Iterable[tuple[str, np.ndarray, np.ndarray]], space: LabelSpace, protocol: Protocol = "standard"
) -> dict[str, Any]:
    """Scores ``(image_id, pred [h, w], label [h, w])`` triples and returns :meth:`Evaluator.result`."""
    ev = Evaluator(space, protocol)
    for image_id, pred, label in items:
        ev.update(image_id, pred, label)
    return ev.result()
