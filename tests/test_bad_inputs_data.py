"""Bad data, as a table: each row builds one bad (or unusual) input and says what must happen.

A row either raises an error naming the file and the problem (``Raises``), or has a documented behaviour
(``Gives``: a check on what it returns). For a dataset row, ``ds[0]`` is what runs, and ``ds.verify()`` must
report the very same file and reason: the runner's pre-run check and its read-time check agree. Files are real
files written with Pillow into ``tmp_path`` in each dataset's on-disk layout. No row may end in a bare
traceback from deep inside, or in a silently wrong image, label or score.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageFile

from spark_jax.data import BadSample, BadSampleError, Dataset, get_dataset
from spark_jax.data import demo as demo_module
from spark_jax.data.base import read_label, read_rgb
from spark_jax.data.demo import DemoDataset
from spark_jax.evaluation import Evaluator, LabelSpace
from spark_jax.data.preprocess import prepare_label

H, W = 10, 14
VOID = 255


# ------------------------------------------------------------------------------------------------ writers
def rgb_pixels(h=H, w=W, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(im: Image.Image, path: str, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, **kw)
    return path


def write_rgb(path, h=H, w=W, seed=0):
    return save(Image.fromarray(rgb_pixels(h, w, seed)), path, **({"quality": 95} if path.endswith(".jpg") else {}))


def write_label(path, values, palette=False, mode="L", h=H, w=W):
    """A label map whose rows cycle through ``values``, as a palette, 8-bit or 16-bit file."""
    arr = np.zeros((h, w), np.int64)
    for r in range(h):
        arr[r] = values[r % len(values)]
    if palette:  # VOC's annotations: pixel values are palette indices, the palette colours something else
        im = Image.fromarray(arr.astype(np.uint8), mode="L").convert("P")
        im.putpalette([(i * 37) % 256 for i in range(768)])
        im.frombytes(arr.astype(np.uint8).tobytes())
    elif mode == "I;16":
        im = Image.fromarray(arr.astype(np.uint16))
    else:
        im = Image.fromarray(arr.astype(np.uint8), mode="L")
    return save(im, path)


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def empty(path):
    open(path, "wb").close()
    return path


def not_an_image(path):
    with open(path, "w") as f:
        f.write("<html>404 Not Found</html>\n")
    return path


# ------------------------------------------------------------------------------ one sample per reader layout
class Layout(NamedTuple):
    paths: Callable[[str, str], tuple[str, str]]  # (root, id) -> (image path, label path); writes the id list
    palette: bool  # label files are palette PNGs
    inside: tuple[int, ...]  # raw values at the edges of the label space ...
    reads_as: tuple[int, ...]  # ... and the reader ids they become
    outside: tuple[int, ...]  # raw values just outside the space


def _id_list(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(f"{i}\n" for i in ids))


def _voc(root, i):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    _id_list(os.path.join(base, "ImageSets", "Segmentation", "val.txt"), [i])
    return os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(base, "SegmentationClass", f"{i}.png")


def _context(root, i):
    base = os.path.join(root, "VOCdevkit", "VOC2010")
    _id_list(os.path.join(base, "ImageSets", "SegmentationContext", "val.txt"), [i])
    return os.path.join(base, "JPEGImages", f"{i}.jpg"), os.path.join(base, "SegmentationClassContext", f"{i}.png")


def _coco(root, i):
    _id_list(os.path.join(root, "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"), [i])
    return os.path.join(root, "images", "val2017", f"{i}.jpg"), os.path.join(root, "annotations", "val2017", f"{i}.png")


def _cityscapes(root, i):
    return (os.path.join(root, "leftImg8bit", "val", "lindau", f"lindau_{i}_leftImg8bit.png"),
            os.path.join(root, "gtFine", "val", "lindau", f"lindau_{i}_gtFine_labelIds.png"))


def _ade20k(root, i):
    base = os.path.join(root, "ADEChallengeData2016")
    return (os.path.join(base, "images", "validation", f"ADE_val_{i}.jpg"),
            os.path.join(base, "annotations", "validation", f"ADE_val_{i}.png"))


LAYOUTS = {
    "voc": Layout(_voc, True, (0, 20, 255), (0, 20, VOID), (21, 254)),
    "context": Layout(_context, False, (0, 59), (0, 59), (60, 255)),
    # fine 0 person -> coarse "person" (9), 181 wood -> "solid" (24); COCO-Object: person 1, stuff background 0
    "coco_stuff27": Layout(_coco, False, (0, 181, 255), (9, 24, VOID), (182, 254)),
    "coco_object": Layout(_coco, False, (0, 181, 255), (1, 0, VOID), (182, 254)),
    "cityscapes": Layout(_cityscapes, False, (0, 6, 7, 33), (VOID, VOID, 0, 26), (34, 255)),
    "ade20k": Layout(_ade20k, False, (0, 1, 150), (VOID, 0, 149), (151, 255)),
}


class Files(NamedTuple):
    ds: Dataset
    image: str
    label: str


def dataset(reader, root, *, image=None, label=None, ids=("000000000001",)) -> Files:
    """Writes ``ids`` as good samples of ``reader``, then lets ``image(path)`` / ``label(path)`` spoil the
    first one; returns the dataset and the first sample's paths."""
    lay = LAYOUTS[reader]
    root = str(root)
    first = None
    for k, i in enumerate(ids):
        img_path, lab_path = lay.paths(root, i)
        write_rgb(img_path, seed=k)
        write_label(lab_path, lay.inside, palette=lay.palette)
        first = first or (img_path, lab_path)
    if image is not None:
        image(first[0])
    if label is not None:
        label(first[1])
    return Files(get_dataset(reader, root), *first)


# ------------------------------------------------------------------------------------------ expectations
class Raises(NamedTuple):
    error: type[BaseException]
    match: str  # regex the message must contain
    path: str | None = None  # which file of the sample it must name: "image" or "label"


class Gives(NamedTuple):
    check: Callable[[Any], None]  # called with the result


class Case(NamedTuple):
    name: str
    make_bad_input: Callable[[Any], Any]  # tmp_path -> Files (runs ds[0]) or a zero-argument callable
    expected: Raises | Gives


def pixels_of(values, channels=None):
    """Two equal rows of ``values`` (grey) or of ``values`` repeated over ``channels``: images must be >= 2x2."""
    arr = np.repeat(np.asarray(values, np.uint8).reshape(1, -1), 2, axis=0)
    return arr if channels is None else np.repeat(arr[..., None], channels, axis=-1)


def colours(*rgb):
    """Two equal rows of the given pixels."""
    return np.repeat(np.asarray(rgb, np.uint8)[None], 2, axis=0)


def image_file(tmp, name, im: Image.Image, **kw):
    """A zero-argument reader of ``im`` saved as ``tmp/name``."""
    path = save(im, os.path.join(str(tmp), name), **kw)
    return lambda: read_rgb(path)


def label_file(tmp, name, im: Image.Image):
    path = save(im, os.path.join(str(tmp), name))
    return lambda: read_label(path)


def equals(expected):
    def check(got):
        np.testing.assert_array_equal(got, np.asarray(expected))
    return Gives(check)


def close_to(expected, atol):
    def check(got):
        np.testing.assert_allclose(got.astype(int), np.asarray(expected), atol=atol)
    return Gives(check)


SIXTEEN = np.array([[0, 257, 32768, 65535]] * 2, np.uint16)
SIXTEEN_AS_8 = pixels_of([0, 1, 128, 255], 3)  # round(v * 255 / 65535): scaled, not clipped at 255


def palette_image(indices, palette, transparency=None, rows=2):
    im = Image.new("P", (len(indices), rows))
    im.putpalette([c for rgb in palette for c in rgb] + [0] * (768 - 3 * len(palette)))
    im.putdata(list(indices) * rows)
    if transparency is not None:
        im.info["transparency"] = transparency
    return im


def label_map(tmp, reader, values, **kw):
    """Dataset whose first label holds ``values`` (written as ``kw`` says)."""
    return dataset(reader, tmp, label=lambda p: write_label(p, values, **kw))


def read_ids(expected_by_row):
    """The label's first column must read as ``expected_by_row`` (rows cycle through the written values)."""
    def check(sample):
        assert sample.label.dtype == np.int32
        col = sample.label[: len(expected_by_row), 0].tolist()
        assert col == list(expected_by_row), col
    return Gives(check)


# ---------------------------------------------------------------------------------- evaluation situations
VOCLIKE = LabelSpace("voclike", ("background", "cat"), background=0)
PLAIN = LabelSpace("plain", ("a", "b"))


def score_all_void(protocol, space):
    def run(tmp):
        def go():
            ev = Evaluator(space, protocol)
            label = np.full((4, 4), VOID)
            counts = ev.update("void", np.zeros((4, 4), np.int64), label)
            return ev, counts
        return go
    return run


def unscored(result):
    ev, counts = result
    assert counts.pixels == 0 and not counts.scored
    assert len(ev) == 0 and "void" not in ev and ev.pixels == 0
    assert ev.tp.sum() == ev.fp.sum() == ev.fn.sum() == 0
    assert ev.result()["num_images"] == 0 and np.isnan(ev.result()["miou"])


def scored_as_background(result):
    ev, counts = result
    assert counts.pixels == 16 and counts.scored and ev.image_ids == ["void"]
    np.testing.assert_array_equal(ev.tp, [0, 16])  # rows in DiffCut's order: cat, background


def void_after_crop(tmp):
    # 4 x 9 label: only column 0 is labelled; the center crop (side 3, columns 3..5) keeps only void.
    label = np.full((4, 9), VOID, np.int32)
    label[:, 0] = 1

    def go():
        small = np.asarray(prepare_label(label, 8))
        ev = Evaluator(PLAIN, "standard")
        return ev, ev.update("void", np.zeros((8, 8), np.int64), small)
    return go


def mixed_with_void(tmp):
    def go():
        label = np.zeros((4, 4), np.int64)
        label[:, 2:] = 1
        pred = np.where(label == 0, 0, 1)
        pred[0, 2:] = 0  # 2 wrong pixels
        alone, both = Evaluator(PLAIN), Evaluator(PLAIN)
        alone.update("a", pred, label)
        both.update("a", pred, label)
        both.update("void", np.ones((4, 4), np.int64), np.full((4, 4), VOID))
        return alone, both
    return go


def same_as_without_void(result):
    alone, both = result
    assert both.result() == alone.result() and both.result()["num_images"] == 1
    assert both.image_ids == ["a"]


# ------------------------------------------------------------------------------------------- verify cases
def voc_with_several_bad(tmp):
    ids = ("a0", "a1", "a2", "a3")
    # sample 0: truncated image and label values outside the space; sample 3: empty label
    files = dataset("voc", tmp, ids=ids, image=truncate, label=lambda p: write_label(p, [0, 77, 201], palette=True))
    empty(os.path.join(os.path.dirname(files.label), "a3.png"))

    def go():
        ds = get_dataset("voc", str(tmp))
        raising = set()
        for i in range(len(ds)):
            try:
                ds[i]
            except BadSampleError:
                raising.add(i)
        return files, ds.verify(), raising
    return go


def lists_every_bad_file(result):
    files, bad, raising = result
    assert [(b.index, b.path) for b in bad] == [
        (0, files.image),  # the truncated image of sample 0 ...
        (0, files.label),  # ... and its label with values outside the space: both reported
        (3, os.path.join(os.path.dirname(files.label), "a3.png")),  # the empty label of sample 3
    ]
    assert all(isinstance(b, BadSample) and b.image_id in ("a0", "a3") for b in bad)
    assert "the file is truncated" in bad[0].reason and "[77, 201]" in bad[1].reason and "empty" in bad[2].reason
    assert raising == {b.index for b in bad}  # exactly the samples ds[i] refuses


def demo_with_generator_bug(tmp):
    original = demo_module.demo_image

    def buggy(index, height, width):
        s = original(index, height, width)
        label = s.label.copy()
        label[0, :3] = 6  # one class id past the demo's six
        return s._replace(label=label)

    def go():
        demo_module.demo_image = buggy
        try:
            ds = DemoDataset(num_images=2, photos=False)
            return ds.verify(), _raises(lambda: ds[1])
        finally:
            demo_module.demo_image = original
    return go


def _raises(fn):
    try:
        fn()
    except BadSampleError as err:
        return err
    return None


def demo_reports_the_bug(result):
    bad, err = result
    assert [b.index for b in bad] == [0, 1]
    assert err is not None and "[6]" in err.reason and "demo label space" in err.reason


def removed_after_listing(tmp):
    files = dataset("ade20k", tmp, ids=("00000001",))
    os.remove(files.image)
    return files


def load_truncated_set(tmp):
    files = dataset("voc", tmp)

    def go():
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return files.ds[0]
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
    return go


def pickled_error(tmp):
    def go():
        err = BadSampleError("x", "/data/x.png", "the file is empty (0 bytes)", "re-extract it")
        back = pickle.loads(pickle.dumps(err))
        return err, back
    return go


def same_error(result):
    err, back = result
    assert (back.image_id, back.path, back.reason, back.fix, str(back)) == (
        err.image_id, err.path, err.reason, err.fix, str(err))


# ------------------------------------------------------------------------------------------------- table
def _lab(mode, pixels):
    return Image.fromarray(np.asarray(pixels), mode=mode) if mode else Image.fromarray(np.asarray(pixels))


CASES = [
    # --- unreadable files, for every reader: the error names the file; verify finds the same one.
    *[Case(f"{r}: truncated image", lambda t, r=r: dataset(r, t, image=truncate), Raises(
        BadSampleError, "the file is truncated", "image")) for r in LAYOUTS],
    *[Case(f"{r}: zero-byte label", lambda t, r=r: dataset(r, t, label=empty), Raises(
        BadSampleError, r"empty \(0 bytes\)", "label")) for r in LAYOUTS],
    *[Case(f"{r}: truncated label", lambda t, r=r: dataset(r, t, label=truncate), Raises(
        BadSampleError, "the file is truncated", "label")) for r in LAYOUTS],
    Case("voc: zero-byte image", lambda t: dataset("voc", t, image=empty), Raises(
        BadSampleError, r"empty \(0 bytes\)", "image")),
    Case("voc: an HTML error page saved as the JPEG", lambda t: dataset("voc", t, image=not_an_image), Raises(
        BadSampleError, "not an image Pillow can read", "image")),
    Case("coco_object: not-an-image label", lambda t: dataset("coco_object", t, label=not_an_image), Raises(
        BadSampleError, "not an image Pillow can read", "label")),
    Case("ade20k: image removed after the dataset was listed", removed_after_listing, Raises(
        BadSampleError, "does not exist", "image")),
    Case("voc: a 1x1 image (and label)", lambda t: dataset(
        "voc", t, image=lambda p: write_rgb(p, 1, 1), label=lambda p: write_label(p, [0], True, h=1, w=1)), Raises(
        BadSampleError, "at least 2x2", "image")),
    Case("ade20k: label of another size", lambda t: dataset(
        "ade20k", t, label=lambda p: write_label(p, [1], h=H + 1)), Raises(
        BadSampleError, "does not belong to this image", "label")),
    Case("PIL's LOAD_TRUNCATED_IMAGES switched on", load_truncated_set, Raises(
        RuntimeError, "LOAD_TRUNCATED_IMAGES is True")),
    # --- label values: the edges of each real label space read; one past them is refused, never void.
    *[Case(f"{r}: label values {lay.inside} at the edges of the space", lambda t, r=r: dataset(r, t),
           read_ids(lay.reads_as)) for r, lay in LAYOUTS.items()],
    *[Case(f"{r}: label value {v} outside the space", lambda t, r=r, v=v: label_map(
        t, r, [LAYOUTS[r].inside[0], v], palette=LAYOUTS[r].palette), Raises(
        BadSampleError, rf"label values \[{v}\] \(\d+ pixels\) are outside the {r} label space", "label"))
      for r, lay in LAYOUTS.items() for v in lay.outside],
    Case("voc: several values outside the space are all named", lambda t: label_map(
        t, "voc", [0, 77, 201, 22], palette=True), Raises(
        BadSampleError, r"label values \[22, 77, 201\] .* \(0\.\.20 and 255 \(void\)\)", "label")),
    Case("ade20k: 16-bit label with in-space values reads", lambda t: label_map(
        t, "ade20k", [1, 150], mode="I;16"), read_ids((0, 149))),
    Case("ade20k: 16-bit label with value 1000", lambda t: label_map(t, "ade20k", [1, 1000], mode="I;16"), Raises(
        BadSampleError, r"\[1000\] .* outside the ade20k label space", "label")),
    Case("cityscapes: colour-coded label (the _color.png instead of _labelIds.png)", lambda t: dataset(
        "cityscapes", t, label=lambda p: save(Image.fromarray(rgb_pixels()), p)), Raises(
        BadSampleError, r"mode 'RGB' \(a colour-coded annotation\)", "label")),
    Case("generated demo labels outside 0..5", demo_with_generator_bug, Gives(demo_reports_the_bug)),
    # --- label modes (read_label gives raw values; which values are allowed is the reader's business)
    Case("label: palette PNG gives its indices, not its colours", lambda t: label_file(
        t, "p.png", palette_image([0, 15, 255], [(200, 10, 10)] * 256, rows=1)), equals([[0, 15, 255]])),
    Case("label: palette PNG with transparency gives its indices", lambda t: label_file(
        t, "pt.png", palette_image([0, 15, 255], [(200, 10, 10)] * 256, transparency=0, rows=1)),
        equals([[0, 15, 255]])),
    Case("label: 8-bit grey", lambda t: label_file(t, "l.png", _lab("L", pixels_of([0, 7, 255]))),
         equals(pixels_of([0, 7, 255]))),
    Case("label: 16-bit grey (I;16)", lambda t: label_file(t, "i16.png", Image.fromarray(SIXTEEN)),
         equals(SIXTEEN)),
    Case("label: RGB with three equal channels", lambda t: label_file(
        t, "grey_rgb.png", _lab("RGB", pixels_of([0, 7, 9], 3))), Raises(
        BadSampleError, "three channels are equal.*convert\\('L'\\)")),
    Case("label: RGBA", lambda t: label_file(t, "rgba.png", _lab("RGBA", pixels_of([0, 7], 4))), Raises(
        BadSampleError, "got mode 'RGBA'")),
    Case("label: grey with alpha (LA)", lambda t: label_file(t, "la.png", _lab("LA", pixels_of([0, 7], 2))), Raises(
        BadSampleError, "got mode 'LA'")),
    Case("label: 1-bit", lambda t: label_file(t, "b.png", Image.new("1", (3, 2), 1)), Raises(
        BadSampleError, "got mode '1'")),
    Case("label: float (F) TIFF", lambda t: label_file(t, "f.tif", Image.fromarray(np.ones((2, 3), np.float32))),
         Raises(BadSampleError, "got mode 'F'")),
    # --- image modes: decoded to 8-bit RGB or refused by name
    Case("image: 16-bit grey PNG (I;16) is scaled, not clipped", lambda t: image_file(
        t, "i16.png", Image.fromarray(SIXTEEN)), equals(SIXTEEN_AS_8)),
    Case("image: 16-bit big-endian TIFF (I;16B) is scaled", lambda t: image_file(
        t, "i16b.tif", Image.frombytes("I;16B", (4, 2), SIXTEEN.astype(">u2").tobytes())), equals(SIXTEEN_AS_8)),
    Case("image: 32-bit integer TIFF (I) within 0..65535 is read as 16-bit", lambda t: image_file(
        t, "i32.tif", Image.fromarray(SIXTEEN.astype(np.int32))), equals(SIXTEEN_AS_8)),
    Case("image: 32-bit integer TIFF (I) beyond 16 bits", lambda t: image_file(
        t, "i32big.tif", Image.fromarray(np.array([[0, 70000]] * 2, np.int32))), Raises(
        BadSampleError, r"mode 'I'\) with values 0\.\.70000")),
    Case("image: float TIFF (F)", lambda t: image_file(t, "f.tif", Image.fromarray(np.ones((2, 3), np.float32))),
         Raises(BadSampleError, "image mode 'F' is not read")),
    Case("image: 8-bit grey", lambda t: image_file(t, "l.png", _lab("L", pixels_of([0, 90, 255]))),
         equals(pixels_of([0, 90, 255], 3))),
    Case("image: grey JPEG (as in COCO)", lambda t: image_file(t, "l.jpg", Image.new("L", (4, 4), 90), quality=95),
         close_to(np.full((4, 4, 3), 90), atol=1)),
    Case("image: grey + alpha (LA): alpha dropped", lambda t: image_file(
        t, "la.png", _lab("LA", colours((90, 0), (200, 255)))), equals(pixels_of([90, 200], 3))),
    Case("image: palette gives its colours", lambda t: image_file(
        t, "p.png", palette_image([0, 1], [(255, 0, 0), (0, 0, 255)])), equals(colours((255, 0, 0), (0, 0, 255)))),
    Case("image: palette with transparency: colours kept, alpha dropped", lambda t: image_file(
        t, "pt.png", palette_image([0, 1], [(255, 0, 0), (0, 0, 255)], transparency=0)),
        equals(colours((255, 0, 0), (0, 0, 255)))),
    Case("image: RGBA: stored colours kept under alpha 0", lambda t: image_file(
        t, "rgba.png", _lab("RGBA", colours((10, 20, 30, 0), (40, 50, 60, 255)))),
        equals(colours((10, 20, 30), (40, 50, 60)))),
    Case("image: CMYK TIFF via Pillow's conversion", lambda t: image_file(
        t, "c.tif", Image.new("CMYK", (2, 2), (0, 255, 255, 0))), equals(np.full((2, 2, 3), [255, 0, 0]))),
    Case("image: CMYK JPEG", lambda t: image_file(t, "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
                                                  quality=95), close_to(np.full((8, 8, 3), [255, 0, 0]), atol=3)),
    Case("image: 1-bit", lambda t: image_file(t, "b.png", _lab("L", pixels_of([0, 255])).convert("1")),
         equals(pixels_of([0, 255], 3))),
    # --- images with no valid pixel: reported (pixels == 0), not counted
    Case("score: all-void label", score_all_void("standard", VOCLIKE), Gives(unscored)),
    Case("score: all-void label, no background class", score_all_void("diffcut", PLAIN), Gives(unscored)),
    Case("score: valid pixels only outside the center crop", void_after_crop, Gives(unscored)),
    Case("score: a void image does not change the others' scores", mixed_with_void, Gives(same_as_without_void)),
    Case("score: diffcut protocol scores VOC void as background (so the image counts)",
         score_all_void("diffcut", VOCLIKE), Gives(scored_as_background)),
    # --- the pre-run check
    Case("verify: every bad file of several samples, and only those ds[i] refuses", voc_with_several_bad,
         Gives(lists_every_bad_file)),
    Case("verify: a clean dataset", lambda t: (lambda ds: ds.verify)(dataset(
        "cityscapes", t, ids=("000001_000019", "000002_000019")).ds), equals([])),
    Case("verify: the demo", lambda t: DemoDataset(num_images=2, photos=False).verify, equals([])),
    Case("BadSampleError survives pickling (worker processes)", pickled_error, Gives(same_error)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path):
    subject = case.make_bad_input(tmp_path)
    act = (lambda: subject.ds[0]) if isinstance(subject, Files) else subject
    exp = case.expected
    if isinstance(exp, Gives):
        exp.check(act())
        return
    with pytest.raises(exp.error, match=exp.match) as info:
        act()
    if exp.error is not BadSampleError:
        return
    err = info.value
    if exp.path is not None:  # names the right file, and verify reports exactly it with the same reason
        path = getattr(subject, exp.path)
        assert err.path == path and path in str(err) and err.reason in str(err) and err.fix
        assert subject.ds.verify() == [BadSample(0, subject.ds.ids[0], path, err.reason, err.fix)]


def test_the_table_has_no_duplicate_names():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_verify_shows_progress_on_stderr(tmp_path, capfd):
    ds = dataset("cityscapes", tmp_path, ids=("000001_000019", "000002_000019")).ds
    assert ds.verify(progress=True) == []
    err = capfd.readouterr().err
    assert re.search(r"cityscapes: checking files.*2/2", err), err
