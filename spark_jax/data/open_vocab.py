"""The readers the open-vocabulary benchmarks need beyond the unsupervised ones (NERVE's table; method-facts 1.3).

* **VOC20** and **Pascal Context 59**: the VOC 2012 / Context readers' samples with the background class left out
  (mmsegmentation's ``reduce_zero_label``: background becomes void, class ``k`` becomes ``k - 1``), as NACLIP's
  ``PascalVOC20Dataset`` and ``PascalContext59Dataset``.
* **COCO-Object** on the *full* COCO val2017 (5,000 images; NACLIP / SCLIP / GroupViT / TCL), not the curated
  2,175 of the unsupervised benchmarks: background = every stuff pixel, 1..80 the things in COCO id order,
  unlabeled void. It reads the COCO-Stuff ``stuffthingmaps`` PNGs, with the same id map as
  :data:`spark_jax.data.coco.COCO_OBJECT_RAW_LABELS` (GroupViT's ``cvt_coco_object.py``: fine ids > 90 ->
  background, things -> 1..80, 255 kept).
* **COCO-Stuff 171** on the full val2017: the 80 things and 91 stuff classes in COCO-Stuff id order (the 11 thing
  ids COCO 2017 dropped removed), unlabeled void: the ids mmsegmentation's ``coco_stuff164k.py`` converter writes
  to ``*_labelTrainIds.png``, read here from the raw ``stuffthingmaps``.
"""

from __future__ import annotations

import os

import numpy as np

from spark_jax.data.base import Dataset, FileDataset, Sample, layout_error, raw_label_space, require_dirs
from spark_jax.data.coco import COCO_OBJECT_RAW_LABELS, COCO_THING_IDS, COCO_THING_NAMES
from spark_jax.data.context import CONTEXT_CLASSES, context
from spark_jax.data.voc import VOC_LABEL_SPACE, voc
from spark_jax.evaluation import LabelSpace

__all__ = [
    "COCO_OBJECT_FULL_LABEL_SPACE",
    "COCO_STUFF171_LABEL_SPACE",
    "COCO_STUFF171_RAW_LABELS",
    "COCO_FULL_LAYOUT",
    "CONTEXT59_LABEL_SPACE",
    "VOC20_LABEL_SPACE",
    "ReducedZeroLabel",
    "coco_object_full",
    "coco_stuff171",
    "context59",
    "voc20",
]

VOC20_LABEL_SPACE = LabelSpace("voc20", VOC_LABEL_SPACE.class_names[1:])
CONTEXT59_LABEL_SPACE = LabelSpace("context59", CONTEXT_CLASSES)

# COCO-Stuff's 91 stuff classes, fine ids 91..181 in order (the dataset's labels.txt, 92..182 one-based).
COCO_STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
COCO_OBJECT_FULL_LABEL_SPACE = LabelSpace("coco_object_full", ("background",) + COCO_THING_NAMES, background=0)
COCO_STUFF171_LABEL_SPACE = LabelSpace("coco_stuff171", COCO_THING_NAMES + COCO_STUFF_NAMES)
_USED_FINE = COCO_THING_IDS + tuple(range(91, 182))
_UNUSED_THINGS = tuple(i for i in range(91) if i not in COCO_THING_IDS)
# The dropped thing ids are inside the stuffthingmaps' space but have no class: void, as the COCO-Object map does.
COCO_STUFF171_RAW_LABELS = raw_label_space(
    {**{i: 255 for i in _UNUSED_THINGS}, **{f: k for k, f in enumerate(_USED_FINE)}, 255: 255},
    "fine ids 0..181 and 255 (unlabeled)")

COCO_FULL_LAYOUT = """\
    <data_dir>/                              (the COCO-Stuff folder; or <data_dir>/cocostuff/)
        images/val2017/<id>.jpg              all 5,000 COCO val2017 images (<id> = 12 digits)
        annotations/val2017/<id>.png         stuffthingmaps: 8-bit fine ids 0..181, 255 unlabeled"""
COCO_FULL_SOURCE = (
    "images: http://images.cocodataset.org/zips/val2017.zip; labels: stuffthingmaps_trainval2017.zip from "
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip "
    "(https://github.com/nightrome/cocostuff)."
)


def _coco_full_items(name: str, data_dir: str, split: str) -> tuple[str, list[tuple[str, str, str]]]:
    root = data_dir
    if data_dir and os.path.isdir(os.path.join(data_dir, "cocostuff", "images")):
        root = os.path.join(data_dir, "cocostuff")
    require_dirs(name, root, [f"images/{split}2017", f"annotations/{split}2017"], COCO_FULL_LAYOUT, COCO_FULL_SOURCE)
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, "images", f"{split}2017"))
                   if f.lower().endswith(".jpg"))
    if not stems:
        raise layout_error(name, root, f"images/{split}2017 holds no .jpg file.", COCO_FULL_LAYOUT, COCO_FULL_SOURCE)
    return root, [(s, os.path.join(root, "images", f"{split}2017", f"{s}.jpg"),
                   os.path.join(root, "annotations", f"{split}2017", f"{s}.png")) for s in stems]


def coco_object_full(data_dir: str, split: str = "val") -> FileDataset:
    """COCO-Object on every image of COCO ``split``2017 (80 things + background; NACLIP's C-Obj)."""
    root, items = _coco_full_items("coco_object_full", data_dir, split)
    return FileDataset("coco_object_full", COCO_OBJECT_FULL_LABEL_SPACE, items, COCO_OBJECT_RAW_LABELS, root=root,
                       layout=COCO_FULL_LAYOUT, source=COCO_FULL_SOURCE)


def coco_stuff171(data_dir: str, split: str = "val") -> FileDataset:
    """COCO-Stuff with its 171 classes on every image of COCO ``split``2017 (NACLIP's C-Stf)."""
    root, items = _coco_full_items("coco_stuff171", data_dir, split)
    return FileDataset("coco_stuff171", COCO_STUFF171_LABEL_SPACE, items, COCO_STUFF171_RAW_LABELS, root=root,
                       layout=COCO_FULL_LAYOUT, source=COCO_FULL_SOURCE)


class ReducedZeroLabel(Dataset):
    """A reader's samples with class 0 left out (mmsegmentation's ``reduce_zero_label``): reader id 0 becomes the
    ignore value, ``k`` becomes ``k - 1``, void stays void. Files are read and checked by the wrapped reader.

    Args:
        base: a reader whose label space has class 0 (its background) first.
        space: the reduced label space (the base's classes 1..K-1, same ignore value).
    """

    def __init__(self, base: Dataset, space: LabelSpace):
        bs = base.label_space
        if bs is None or space.class_names != bs.class_names[1:] or space.ignore_index != bs.ignore_index:
            raise ValueError(f"{space.name}: the reduced classes must be {bs.name if bs else 'the base'}'s classes "
                             "1..K-1 with the same ignore value")
        self.base, self.name, self.label_space = base, space.name, space
        self.note, self.verify_threads = base.note, base.verify_threads
        self.root = getattr(base, "root", None)
        lut = np.full(max(bs.num_classes, bs.ignore_index + 1), space.ignore_index, np.int32)
        lut[1:bs.num_classes] = np.arange(bs.num_classes - 1, dtype=np.int32)
        self._lut = lut

    @property
    def ids(self) -> list[str]:
        return self.base.ids

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Sample:
        s = self.base[index]
        return s if s.label is None else s._replace(label=self._lut[s.label])

    def _check(self, index: int):
        return self.base._check(index)


def voc20(data_dir: str, split: str = "val") -> ReducedZeroLabel:
    """Pascal VOC 2012 ``split`` with the background ignored: 20 classes (NACLIP's V20)."""
    return ReducedZeroLabel(voc(data_dir, split), VOC20_LABEL_SPACE)


def context59(data_dir: str, split: str = "val") -> ReducedZeroLabel:
    """Pascal Context ``split`` with the background ignored: 59 classes (NACLIP's PC59)."""
    return ReducedZeroLabel(context(data_dir, split), CONTEXT59_LABEL_SPACE)
