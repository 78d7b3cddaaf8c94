"""Specification of the scoring protocol on hand-computed cases, under both protocols."""

import json

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from spark_jax.evaluation import (
    Evaluator,
    LabelSpace,
    confusion,
    iou_from_counts,
    match_counts,
    protocol_labels,
    score_image,
)

PLAIN = LabelSpace("plain", ("a", "b", "c"))  # no background (Cityscapes-like)
VOC = LabelSpace("voc", ("background", "cat", "dog"), background=0)  # background first, like VOC
ADE = LabelSpace("ade", ("wall", "floor", "sky"), diffcut_shift=True)  # reader id k = raw id k + 1
BOTH = pytest.mark.parametrize("protocol", ["standard", "diffcut"])


def halves(h=4, w=4):
    """Left half class 0, right half class 1."""
    label = np.zeros((h, w), np.int64)
    label[:, w // 2 :] = 1
    return label


def miou(space, protocol, *pairs):
    ev = Evaluator(space, protocol)
    for i, (pred, label) in enumerate(pairs):
        ev.update(str(i), pred, label)
    return ev.result()


@BOTH
@pytest.mark.parametrize("ids", [(0, 1), (1, 0), (7, 3)])
def test_perfect_segmentation_under_any_cluster_ids(protocol, ids):
    label = halves()
    pred = np.where(label == 0, ids[0], ids[1])
    r = miou(PLAIN, protocol, (pred, label))
    assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0
    assert r["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": None}  # c never appears: NaN, skipped


@BOTH
def test_over_segmentation_surplus_cluster_is_a_false_positive_of_an_absent_class(protocol):
    label = halves()  # 8 px of a, 8 px of b; c absent
    pred = np.where(label == 0, 0, 1)
    pred[0, 2:] = 2  # 2 px of b split off
    counts = score_image(pred, label, PLAIN, protocol=protocol)
    np.testing.assert_array_equal(counts.tp, [8, 6, 0])
    np.testing.assert_array_equal(counts.fn, [0, 2, 0])
    np.testing.assert_array_equal(counts.fp, [0, 0, 2])  # 3 classes, 3 clusters: every cluster is matched
    r = miou(PLAIN, protocol, (pred, label))
    assert r["miou"] == pytest.approx((1 + 0.75 + 0) / 3)


def test_more_clusters_than_classes_leaves_the_smallest_unmatched():
    two = LabelSpace("two", ("a", "b"))
    label = halves()
    pred = np.where(label == 0, 0, 1)
    pred[0, 2:] = 2
    r = miou(two, "standard", (pred, label))
    assert r["per_class_iou"] == {"a": 1.0, "b": 0.75}


@BOTH
def test_under_segmentation(protocol):
    label = halves()
    pred = np.zeros_like(label)  # one cluster for everything
    r = miou(PLAIN, protocol, (pred, label))
    # Class a or b gets the cluster (tie: 8 px each); the other scores 0 with 8 FN.
    assert sorted(v for v in r["per_class_iou"].values() if v is not None) == [0.0, 0.5]


@BOTH
def test_ignore_pixels_are_not_scored(protocol):
    label = halves()
    label[0, :] = 255
    pred = np.where(halves() == 0, 0, 1)
    pred[0, :] = 1  # wrong, but only on ignored pixels
    r = miou(PLAIN, protocol, (pred, label))
    assert r["miou"] == 1.0
    assert score_image(pred, label, PLAIN, protocol=protocol).pixels == 12


@BOTH
def test_class_absent_from_one_image_is_scored_over_the_dataset(protocol):
    label1 = halves()  # a, b
    label2 = np.full((4, 4), 2)  # only c
    pred1 = np.where(label1 == 0, 0, 1)
    pred2 = np.zeros((4, 4), np.int64)
    r = miou(PLAIN, protocol, (pred1, label1), (pred2, label2))
    assert r["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert r["num_images"] == 2


def voc_case():
    """Background on the left, a cat top-right, void on the cat's boundary; 3 clusters in background."""
    label = np.zeros((4, 4), np.int64)
    label[:2, 2:] = 1
    label[2, 2:] = 255  # void
    pred = np.zeros((4, 4), np.int64)
    pred[:, 1] = 4
    pred[:2, 2:] = 9
    pred[2:, 2:] = 5
    return pred, label


def test_background_merge_many_to_one_standard():
    pred, label = voc_case()
    counts = score_image(pred, label, VOC, protocol="standard")
    # Clusters 0, 4, 5 are not matched to a foreground class: merged into one background cluster.
    np.testing.assert_array_equal(np.unique(counts.pred[label == 0]), [np.unique(counts.pred).max()])
    np.testing.assert_array_equal(counts.tp, [10, 4, 0])  # 8 bg + 2 bg pixels of the bottom-right block
    np.testing.assert_array_equal(counts.fp, [0, 0, 0])  # void (row 2) is ignored
    np.testing.assert_array_equal(counts.fn, [0, 0, 0])
    r = miou(VOC, "standard", (pred, label))
    assert r["per_class_iou"] == {"background": 1.0, "cat": 1.0, "dog": None}


def test_background_merge_diffcut_counts_void_as_background():
    pred, label = voc_case()
    r = miou(VOC, "diffcut", (pred, label))
    # Rows in DiffCut's order: foreground first, background last; void pixels are background.
    assert list(r["per_class_iou"]) == ["cat", "dog", "background"]
    counts = score_image(pred, label, VOC, protocol="diffcut")
    np.testing.assert_array_equal(counts.tp, [4, 0, 12])
    assert counts.pixels == 16
    assert r["miou"] == 1.0


def test_without_merge_background_clusters_would_be_penalised():
    pred, label = voc_case()
    no_bg = LabelSpace("voc_no_bg", VOC.class_names, background=None)
    assert miou(no_bg, "standard", (pred, label))["miou"] < 1.0
    assert miou(VOC, "standard", (pred, label))["miou"] == 1.0


def test_merge_keeps_foreground_clusters_and_refine_runs_after_it():
    pred, label = voc_case()
    seen = []

    def refine(p):
        seen.append(p.copy())
        return p

    score_image(pred, label, VOC, protocol="standard", refine=refine)
    (merged,) = seen
    assert len(np.unique(merged)) == 2  # the cat cluster and one merged background


def test_ade20k_off_by_one_of_the_diffcut_protocol():
    # Reader ids: 0 wall, 1 floor, 2 sky (raw 1, 2, 3); 255 = raw 0 "other".
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
    std = miou(ADE, "standard", (pred, label))
    assert std["per_class_iou"] == {"wall": 1.0, "floor": 1.0, "sky": 1.0}
    assert score_image(pred, label, ADE, protocol="standard").pixels == 6
    dc = miou(ADE, "diffcut", (pred, label))
    # DiffCut scores raw ids 0..K-1: "other" becomes a class, the last class (sky, raw 3) is dropped.
    assert list(dc["per_class_iou"]) == ["other", "wall", "floor"]
    assert dc["miou"] == 1.0
    assert score_image(pred, label, ADE, protocol="diffcut").pixels == 6


def diffcut_reference(preds, labels_dc, n_class, background):
    """Independent restatement of DiffCut's released scoring on its own label convention.

    ``labels_dc`` use DiffCut's ids: foreground 0..n_class-2, -1 for background and void.
    """
    tp_all, fp_all, fn_all = (np.zeros(n_class) for _ in range(3))

    def hist_of(lab, pred, n):
        width = max(n, pred.max() + 1)
        h = np.zeros((n, width), np.int64)
        ok = (lab >= 0) & (lab < n)
        np.add.at(h, (lab[ok], pred[ok]), 1)
        return h

    for pred, lab in zip(preds, labels_dc):
        pred, lab = pred.copy(), lab.copy()
        if background:
            h = hist_of(lab, pred, n_class - 1)
            r, c = linear_sum_assignment(h, maximize=True)
            hc = h[:, c]
            keep = {c[i] for i in np.where(hc.max(axis=1) > 0)[0]}
            lab[lab == -1] = n_class - 1
            bg = pred.max() + 1
            for k in set(np.unique(pred).tolist()) - keep:
                pred[pred == k] = bg
        h = hist_of(lab, pred, n_class)
        r, c = linear_sum_assignment(h, maximize=True)
        tp = h[r, c]
        tp_all += tp
        fn_all += h.sum(1) - tp
        fp_all += h[:, c].sum(0) - tp
    return tp_all, fp_all, fn_all


@pytest.mark.parametrize("seed", range(5))
def test_diffcut_protocol_is_count_for_count_with_the_reference(seed):
    rng = np.random.default_rng(seed)
    space = LabelSpace("voc5", ("background", "a", "b", "c", "d"), background=0)
    preds, labels, labels_dc = [], [], []
    for _ in range(4):
        label = rng.integers(0, 5, (12, 12))
        label[rng.random((12, 12)) < 0.1] = 255
        # blocky predictions with a random number of clusters and gapped ids
        pred = rng.integers(0, rng.integers(2, 9), (3, 3)).repeat(4, 0).repeat(4, 1) * 3
        preds.append(pred)
        labels.append(label)
        labels_dc.append(np.where((label == 0) | (label == 255), -1, label - 1))
    ev = Evaluator(space, "diffcut")
    for i, (p, l) in enumerate(zip(preds, labels)):
        ev.update(str(i), p, l)
    tp, fp, fn = diffcut_reference(preds, labels_dc, 5, background=True)
    np.testing.assert_array_equal(ev.tp, tp)
    np.testing.assert_array_equal(ev.fp, fp)
    np.testing.assert_array_equal(ev.fn, fn)


def test_confusion_and_matching_by_hand():
    label = np.array([[0, 1], [1, 5]])  # 5 is out of range: ignored
    pred = np.array([[4, 4], [0, 0]])
    h = confusion(label, pred, 3)
    np.testing.assert_array_equal(h, [[0, 0, 0, 0, 1], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    tp, fp, fn, col = match_counts(h)
    # class 0 -> cluster 4 and class 1 -> cluster 0 (2 matched pixels; the swap matches 1); class 2 gets an
    # empty cluster.
    assert col[0] == 4 and col[1] == 0 and col[2] in (1, 2, 3)
    np.testing.assert_array_equal(tp, [1, 1, 0])
    np.testing.assert_array_equal(fp, [1, 0, 0])  # cluster 4 also covers a pixel of class 1
    np.testing.assert_array_equal(fn, [0, 1, 0])
    np.testing.assert_allclose(iou_from_counts([1, 0], [1, 0], [0, 0]), [0.5, np.nan])


@pytest.mark.parametrize(
    "tp, fp, fn, pixels, match",
    [
        ([0, 0, 0], [0, 0, 0], [0, 0, 0], 0, "no valid pixel"),
        ([4, 4, 0], [0, 0, 0], [0, 0, 0], 9, "do not add up"),
        ([4, 4], [0, 0], [0, 0], 8, "wrong number of classes"),
        ([4, 4, 0], [0, -1, 0], [0, 0, 0], 8, "negative"),
    ],
)
def test_add_counts_refuses_counts_that_cannot_come_from_an_image(tp, fp, fn, pixels, match):
    ev = Evaluator(PLAIN, "standard")
    with pytest.raises(ValueError, match=match):
        ev.add_counts("x", tp, fp, fn, pixels)
    assert len(ev) == 0 and ev.pixels == 0


def test_update_refuses_the_same_image_twice_and_state_round_trips():
    label = halves()
    pred = np.where(label == 0, 0, 1)
    ev = Evaluator(PLAIN, "standard")
    ev.update("x", pred, label)
    with pytest.raises(ValueError, match="already counted"):
        ev.update("x", pred, label)
    ev.update("y", np.zeros_like(label), label)
    restored = Evaluator.from_json(PLAIN, json.loads(json.dumps(ev.to_json())))
    assert restored.result() == ev.result()
    assert restored.image_ids == ["x", "y"]
    with pytest.raises(ValueError, match="cannot be resumed"):
        Evaluator.from_state_dict(VOC, ev.state_dict())


@pytest.mark.parametrize(
    "pred, label, match",
    [
        (np.zeros((4, 4), np.int64), np.zeros((8, 8), np.int64), "prepare_label"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int64), "integer cluster ids"),
    ],
)
def test_bad_inputs_name_the_problem(pred, label, match):
    with pytest.raises(ValueError, match=match):
        score_image(pred, label, PLAIN)


def test_protocol_labels_rejects_unknown_protocol():
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_labels(PLAIN, "paper")
