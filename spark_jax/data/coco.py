"""COCO-Object and COCO-Stuff-27 on the curated 2,175-image COCO val2017 subset.

Both read the COCO-Stuff ``stuffthingmaps`` PNGs, whose values are the 182 fine COCO-Stuff ids, zero-based
(COCO category id - 1): 0..90 things (80 used; 11 ids unused by COCO 2017), 91..181 stuff, 255 unlabeled.

* COCO-Stuff-27: the fine -> coarse map of IIC (``fine_to_coarse_dict.pickle``, reused unchanged by PiCIE,
  STEGO and DiffCut): 12 thing super-categories (0..11) and 15 stuff super-categories (12..26) of the COCO-Stuff
  hierarchy, in the order of :data:`COARSE_NAMES`; unlabeled is ignored.
* COCO-Object: background (0) = every stuff pixel, 1..80 = the 80 thing categories in COCO id order;
  unlabeled is void (ignored by ``standard``, background for ``diffcut``, whose mapping sends stuff and
  unlabeled alike to background).

The image list ``Coco164kFull_Stuff_Coarse_7.txt`` is IIC's curated val2017 subset (2,175 images whose pixels
are mostly stuff-labelled), used by PiCIE, STEGO and DiffCut.
"""

from __future__ import annotations

import os

from spark_jax.data.base import FileDataset, layout_error, raw_label_space, read_id_list, require_dirs
from spark_jax.evaluation import LabelSpace

__all__ = [
    "COARSE_NAMES",
    "FINE_TO_COARSE",
    "COCO_THING_IDS",
    "COCO_THING_NAMES",
    "COCO_OBJECT_LABEL_SPACE",
    "COCO_STUFF27_LABEL_SPACE",
    "COCO_OBJECT_RAW_LABELS",
    "COCO_STUFF27_RAW_LABELS",
    "COCO_LAYOUT",
    "coco_object",
    "coco_stuff27",
]

COARSE_NAMES = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen", "accessory", "animal",
    "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall", "window", "building",
    "ground", "plant", "sky", "solid", "structural", "water",
)
# Fine id (0..181) -> coarse id (0..26): IIC's fine_to_coarse_dict.pickle ("fine_index_to_coarse_index").
FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6,
    10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4, 4,
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13, 13, 13, 13, 13,
    22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21,
    25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18, 18,
    18, 18, 18, 18, 18, 26, 26, 19, 19, 24,
)
# Zero-based fine ids of the 80 COCO 2017 thing categories (COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91
# are unused).
_UNUSED_THINGS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_THING_IDS = tuple(i for i in range(91) if i not in _UNUSED_THINGS)
COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
COCO_OBJECT_LABEL_SPACE = LabelSpace("coco_object", ("background",) + COCO_THING_NAMES, background=0)
COCO_STUFF27_LABEL_SPACE = LabelSpace("coco_stuff27", COARSE_NAMES, background=None)

# Both read the stuffthingmaps' 182 fine ids and 255 (unlabeled); any other value is refused. The 11 thing ids
# COCO 2017 dropped (street sign, hat, shoe, ...) are part of COCO-Stuff's label list and of IIC's coarse map,
# so they are inside the space: COCO-Stuff-27 scores them under their super-category; COCO-Object, which has
# no class for them, ignores them (void, not background: they are things).
_FINE_SPACE = "fine ids 0..181 and 255 (unlabeled)"
COCO_STUFF27_RAW_LABELS = raw_label_space({**dict(enumerate(FINE_TO_COARSE)), 255: 255}, _FINE_SPACE)
COCO_OBJECT_RAW_LABELS = raw_label_space(
    {**{i: 255 for i in _UNUSED_THINGS}, **{t: k + 1 for k, t in enumerate(COCO_THING_IDS)},
     **{s: 0 for s in range(91, 182)}, 255: 255},
    _FINE_SPACE,
)

CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
COCO_LAYOUT = f"""\
    <data_dir>/                              (the COCO-Stuff folder, as in IIC / STEGO / DiffCut)
        images/val2017/<id>.jpg              COCO val2017 images (<id> = 12 digits)
        annotations/val2017/<id>.png         stuffthingmaps: 8-bit fine ids 0..181, 255 unlabeled
        curated/val2017/{CURATED_LIST}   the 2,175 curated ids, one per line
                                             (also accepted directly in <data_dir>/)"""
COCO_SOURCE = (
    "images: http://images.cocodataset.org/zips/val2017.zip; labels: stuffthingmaps_trainval2017.zip from "
    "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip "
    f"(https://github.com/nightrome/cocostuff); the curated list {CURATED_LIST} ships with IIC "
    "(https://github.com/xu-ji/IIC), PiCIE, STEGO and DiffCut (dataloader/coco/val2017/)."
)


def _coco_items(name: str, data_dir: str, split: str) -> tuple[str, list[tuple[str, str, str]]]:
    root = data_dir
    if os.path.isdir(os.path.join(data_dir, "cocostuff", "images")):
        root = os.path.join(data_dir, "cocostuff")
    require_dirs(name, root, [f"images/{split}2017", f"annotations/{split}2017"], COCO_LAYOUT, COCO_SOURCE)
    candidates = [os.path.join(root, "curated", f"{split}2017", CURATED_LIST), os.path.join(root, CURATED_LIST)]
    list_path = next((p for p in candidates if os.path.isfile(p)), None)
    if list_path is None:
        raise layout_error(name, root, f"the curated image list {CURATED_LIST} is missing.", COCO_LAYOUT,
                           COCO_SOURCE)
    ids = read_id_list(list_path)
    if not ids:
        raise layout_error(name, root, f"{list_path} is empty.", COCO_LAYOUT, COCO_SOURCE)
    items = [(i, os.path.join(root, "images", f"{split}2017", f"{i}.jpg"),
              os.path.join(root, "annotations", f"{split}2017", f"{i}.png")) for i in ids]
    return root, items


def coco_stuff27(data_dir: str, split: str = "val") -> FileDataset:
    """COCO-Stuff-27 on the curated list (fine 182 -> coarse 27)."""
    root, items = _coco_items("coco_stuff27", data_dir, split)
    return FileDataset("coco_stuff27", COCO_STUFF27_LABEL_SPACE, items, COCO_STUFF27_RAW_LABELS, root=root,
                       layout=COCO_LAYOUT, source=COCO_SOURCE)


def coco_object(data_dir: str, split: str = "val") -> FileDataset:
    """COCO-Object on the curated list (80 things + background)."""
    root, items = _coco_items("coco_object", data_dir, split)
    return FileDataset("coco_object", COCO_OBJECT_LABEL_SPACE, items, COCO_OBJECT_RAW_LABELS, root=root,
                       layout=COCO_LAYOUT, source=COCO_SOURCE)
