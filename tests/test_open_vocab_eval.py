"""The open-vocabulary protocol (``--protocol=open_vocab``) and its benchmarks.

Specification: predictions are class ids, scored without matching on one dataset-level confusion matrix, as
mmsegmentation's IoUMetric (void ignored; IoU = intersect / union per class, NaN and skipped where a class is
neither present nor predicted; aAcc, mAcc); sums of image counts merge exactly; a pixel whose largest class
probability is below the threshold becomes the background; V20 / PC59 ignore the background that V21 / PC60
score; the full-val2017 COCO readers map stuffthingmaps ids to COCO-Object's 81 and COCO-Stuff's 171 classes; each
shipped class file has one line per class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spark_jax.data.open_vocab import COCO_STUFF171_LABEL_SPACE, coco_object_full, coco_stuff171
from spark_jax.evaluation import Evaluator, LabelSpace
from spark_jax.openvocab.benchmarks import BENCHMARKS, benchmark
from spark_jax.openvocab.evaluation import (
    OpenVocabEvaluator,
    apply_background_threshold,
    confusion_matrix,
    scores_from_confusion,
    sparse_confusion,
)
from spark_jax.openvocab.prompts import read_class_names

SPACE3 = LabelSpace("three", ("a", "b", "c"))


def _mmseg_intersect_and_union(pred, label, k, ignore=255):
    """mmsegmentation's ``IoUMetric.intersect_and_union``, transcribed: histograms of the kept pixels."""
    keep = label != ignore
    pred, label = pred[keep], label[keep]
    inter = np.histogram(pred[pred == label], bins=k, range=(0, k - 1))[0]
    area_pred = np.histogram(pred, bins=k, range=(0, k - 1))[0]
    area_label = np.histogram(label, bins=k, range=(0, k - 1))[0]
    return inter, area_pred + area_label - inter, area_label


def test_one_image_by_hand():
    label = np.array([[0, 1, 1], [2, 2, 255]])
    pred = np.array([[0, 1, 2], [2, 0, 1]])  # the void pixel's prediction (1) is not counted
    conf = confusion_matrix(label, pred, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    s = scores_from_confusion(conf, SPACE3.class_names)
    # IoU: a 1 / (1 + 2 - 1), b 1 / (2 + 1 - 1), c 1 / (2 + 2 - 1)
    assert s["per_class_iou"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 1 / 3})
    assert s["miou"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert s["pixel_accuracy"] == pytest.approx(3 / 5)
    assert s["mean_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_absent_classes_nan_when_never_predicted_zero_when_predicted():
    space = LabelSpace("four", ("a", "b", "c", "d"))
    label = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 0, 1, 2]])  # c predicted, never present: IoU 0; d neither: NaN, left out of the mean
    s = scores_from_confusion(confusion_matrix(label, pred, 4), space.class_names)
    assert s["per_class_iou"] == {"a": 1.0, "b": 0.5, "c": 0.0, "d": None}
    assert s["miou"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert s["per_class_accuracy"]["c"] is None  # no pixel of c to be right about


def test_dataset_level_not_mean_of_images():
    # Image 1: one pixel of a, right. Image 2: three pixels of b, one predicted a. Per image: 1.0 and
    # mean(0, 2/3) ...; over the dataset: a 1/2, b 2/3.
    ev = OpenVocabEvaluator(LabelSpace("two", ("a", "b")))
    ev.update("i1", np.array([[0]]), np.array([[0]]))
    ev.update("i2", np.array([[1, 1, 0]]), np.array([[1, 1, 1]]))
    r = ev.result()
    assert r["per_class_iou"] == pytest.approx({"a": 0.5, "b": 2 / 3})
    assert r["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["pixel_accuracy"] == pytest.approx(3 / 4) and r["num_images"] == 2


def test_matches_mmseg_intersect_and_union_summed_over_images():
    rng = np.random.default_rng(0)
    k = 7
    ev = OpenVocabEvaluator(LabelSpace("seven", tuple("abcdefg")))
    inter = union = area_label = 0
    for i in range(6):
        label = rng.integers(0, k, (13, 11))
        label[rng.random(label.shape) < 0.2] = 255
        label[label == 5] = 255  # class 5 never present
        pred = np.where(rng.random(label.shape) < 0.6, label % k, rng.integers(0, k, label.shape))
        pred[pred == 6] = 0  # class 6 never predicted
        a, u, lab = _mmseg_intersect_and_union(pred, label, k)
        inter, union, area_label = inter + a, union + u, area_label + lab
        ev.update(f"img{i}", pred, label)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    r = ev.result()
    got = np.array([np.nan if v is None else v for v in r["per_class_iou"].values()])
    np.testing.assert_allclose(got, iou, rtol=0, atol=1e-12)
    assert r["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12)
    assert r["pixel_accuracy"] == pytest.approx(inter.sum() / area_label.sum(), abs=1e-12)


def test_counts_merge_exactly_and_restore_from_records():
    rng = np.random.default_rng(1)
    items = [(f"i{n}", rng.integers(0, 3, (5, 4)), rng.integers(0, 3, (5, 4))) for n in range(5)]
    whole, left, right = (OpenVocabEvaluator(SPACE3) for _ in range(3))
    for n, (i, pred, label) in enumerate(items):
        whole.update(i, pred, label)
        (left if n % 2 else right).update(i, pred, label)
    left.merge(right)
    np.testing.assert_array_equal(left.confusion, whole.confusion)
    assert left.confusion.dtype == np.int64 and left.result() == whole.result()
    with pytest.raises(ValueError, match="counted in both"):
        left.merge(whole)

    restored = OpenVocabEvaluator(SPACE3)
    for i, pred, label in items:
        c = OpenVocabEvaluator(SPACE3).update(i, pred, label)
        restored.add_counts(i, c.tp.tolist(), c.fp.tolist(), c.fn.tolist(), c.pixels,
                            confusion=sparse_confusion(c.confusion))
    np.testing.assert_array_equal(restored.confusion, whole.confusion)
    c = OpenVocabEvaluator(SPACE3).update("x", items[0][1], items[0][2])
    with pytest.raises(ValueError, match="damaged"):
        OpenVocabEvaluator(SPACE3).add_counts("x", c.tp.tolist(), c.fp.tolist(), c.fn.tolist(), c.pixels + 1,
                                              confusion=sparse_confusion(c.confusion))
    bad_tp = (c.tp + np.eye(3, dtype=np.int64)[0]).tolist()
    with pytest.raises(ValueError, match="tp counts"):
        OpenVocabEvaluator(SPACE3).add_counts("x", bad_tp, c.fp.tolist(), c.fn.tolist(), c.pixels,
                                              confusion=sparse_confusion(c.confusion))


def test_an_all_void_image_is_not_counted_and_segment_ids_are_refused():
    ev = OpenVocabEvaluator(SPACE3)
    counts = ev.update("void", np.zeros((2, 2), np.int64), np.full((2, 2), 255))
    assert not counts.scored and len(ev) == 0
    with pytest.raises(ValueError, match="label_with=clip"):
        ev.update("seg", np.array([[0, 3]]), np.array([[0, 1]]))  # id 3 of a 3-class vocabulary
    ev.update("a", np.zeros((1, 1), int), np.zeros((1, 1), int))
    with pytest.raises(ValueError, match="already counted"):
        ev.update("a", np.zeros((1, 1), int), np.zeros((1, 1), int))
    with pytest.raises(ValueError, match="OpenVocabEvaluator"):
        Evaluator(SPACE3, "open_vocab")  # the matching evaluator refuses class ids


def test_background_threshold_by_hand():
    labels = jnp.array([[3, 1], [2, 0]], jnp.int32)
    probs = jnp.array([[0.09, 0.1], [0.5, 0.05]])
    np.testing.assert_array_equal(jax.jit(apply_background_threshold)(labels, probs, 0.1), [[0, 1], [2, 0]])
    np.testing.assert_array_equal(apply_background_threshold(labels, probs, 0.0), labels)  # 0: off
    np.testing.assert_array_equal(apply_background_threshold(labels, probs, 0.6, background=7), [[7, 7], [7, 7]])


def _palette_png(path, indices):
    im = Image.fromarray(np.asarray(indices, np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


@pytest.fixture
def tiny_voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    label = np.array([[0, 0, 1, 1], [15, 15, 255, 0]])
    Image.fromarray(np.full((2, 4, 3), 128, np.uint8)).save(root / "JPEGImages" / "a.jpg")
    _palette_png(root / "SegmentationClass" / "a.png", label)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    return tmp_path


def test_voc20_ignores_the_background_that_voc21_scores(tiny_voc):
    v21 = BENCHMARKS["voc21"].read(str(tiny_voc))
    v20 = BENCHMARKS["voc20"].read(str(tiny_voc))
    assert v21.label_space.num_classes == 21 and v20.label_space.num_classes == 20
    assert v20.label_space.class_names[0] == "aeroplane" and v20.label_space.background is None
    np.testing.assert_array_equal(v21[0].label, [[0, 0, 1, 1], [15, 15, 255, 0]])
    np.testing.assert_array_equal(v20[0].label, [[255, 255, 0, 0], [14, 14, 255, 255]])
    assert v20.verify() == [] and v20.ids == ["a"]

    # V21: background 2 of 3 right (one predicted aeroplane), aeroplane 2/3, person 1/2 (one pixel background).
    ev21 = OpenVocabEvaluator(v21.label_space)
    ev21.update("a", np.array([[0, 1, 1, 1], [15, 0, 0, 0]]), v21[0].label)
    r21 = ev21.result()["per_class_iou"]
    assert (r21["background"], r21["aeroplane"], r21["person"]) == pytest.approx((2 / 4, 2 / 3, 1 / 2))
    assert ev21.result()["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)
    # V20: only the four object pixels count; a V20 prediction has no background id.
    ev20 = OpenVocabEvaluator(v20.label_space)
    ev20.update("a", np.array([[3, 3, 0, 0], [14, 5, 9, 9]]), v20[0].label)
    r20 = ev20.result()
    assert r20["per_class_iou"]["aeroplane"] == 1.0 and r20["per_class_iou"]["person"] == 0.5
    assert r20["per_class_iou"]["bus"] == 0.0 and r20["per_class_iou"]["bird"] is None  # predicted only on void
    assert r20["miou"] == pytest.approx((1 + 0.5 + 0) / 3) and r20["pixel_accuracy"] == pytest.approx(3 / 4)


def test_full_val2017_coco_readers(tmp_path):
    for d in ("images/val2017", "annotations/val2017"):
        (tmp_path / d).mkdir(parents=True)
    raw = np.array([[0, 91, 255], [2, 181, 11]], np.uint8)  # person, banner (stuff), void, car, wood, dropped id
    for stem in ("000000000001", "000000000002"):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "images/val2017" / f"{stem}.jpg")
        Image.fromarray(raw, mode="L").save(tmp_path / "annotations/val2017" / f"{stem}.png")
    obj, stf = coco_object_full(str(tmp_path)), coco_stuff171(str(tmp_path))
    assert len(obj) == len(stf) == 2  # every image listed, no curated list
    np.testing.assert_array_equal(obj[0].label, [[1, 0, 255], [3, 0, 255]])
    np.testing.assert_array_equal(stf[0].label, [[0, 80, 255], [2, 170, 255]])
    assert COCO_STUFF171_LABEL_SPACE.class_names[80] == "banner" and stf.label_space.num_classes == 171


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_ships_one_class_line_per_class(name):
    b = BENCHMARKS[name]
    vocabulary = read_class_names(b.class_path)
    assert len(vocabulary) == b.label_space.num_classes
    if b.background_threshold > 0:
        assert b.background == 0  # the threshold falls back to class 0
    if name in ("voc21", "coco_object_full"):
        assert "sky" in vocabulary[0] and len(vocabulary[0]) == 26  # SCLIP's background synonyms


def test_benchmark_names_the_open_vocabulary_form_of_an_unsupervised_dataset():
    with pytest.raises(ValueError, match="voc21 or voc20"):
        benchmark("voc")
