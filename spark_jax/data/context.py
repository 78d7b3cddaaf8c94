"""Pascal Context val (VOC2010, 5,105 images; 59 classes + background = 60).

Layout of mmsegmentation's converter (``tools/dataset_converters/pascal_context.py``), the common on-disk
form: ``SegmentationClassContext/<id>.png`` holds 0 = background (every pixel outside the 59 frequent
classes) and 1..59 the classes in the order below. There is no void pixel. DiffCut's detectron2-prepared copy
stores the same labels with background as 255; the ``diffcut`` protocol reorders rows to match it.
"""

from __future__ import annotations

import os

from spark_jax.data.base import FileDataset, layout_error, raw_label_space, read_id_list, require_dirs
from spark_jax.data.voc import find_voc_root
from spark_jax.evaluation import LabelSpace

__all__ = ["CONTEXT_LABEL_SPACE", "CONTEXT_RAW_LABELS", "CONTEXT_LAYOUT", "context"]

CONTEXT_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall",
    "water", "window", "wood",
)
CONTEXT_LABEL_SPACE = LabelSpace("context", ("background",) + CONTEXT_CLASSES, background=0)

# mmsegmentation's converter writes 0..59 only (it asserts every raw Pascal-Context id is in its 59-class map).
CONTEXT_RAW_LABELS = raw_label_space({i: i for i in range(60)}, "0..59: 0 background, 1..59 classes; no void")

CONTEXT_LAYOUT = """\
    <data_dir>/VOCdevkit/VOC2010/            (or <data_dir> pointing at VOC2010/ itself)
        JPEGImages/<id>.jpg
        SegmentationClassContext/<id>.png    8-bit: 0 background, 1..59 classes (mmsegmentation's converter)
        ImageSets/SegmentationContext/val.txt  one <id> per line (5,105 ids)"""
CONTEXT_SOURCE = (
    "VOCtrainval_03-May-2010.tar (http://host.robots.ox.ac.uk/pascal/VOC/voc2010/) plus trainval_merged.json "
    "(https://codalabuser.blob.core.windows.net/public/trainval_merged.json), converted with mmsegmentation's "
    "tools/dataset_converters/pascal_context.py (needs the 'detail' API), which writes SegmentationClassContext "
    "and ImageSets/SegmentationContext."
)


def context(data_dir: str, split: str = "val") -> FileDataset:
    """Pascal Context (59 classes + background) ``split`` in mmsegmentation's layout."""
    root = find_voc_root(data_dir, "2010")
    require_dirs("context", root,
                 ["JPEGImages", "SegmentationClassContext", f"ImageSets/SegmentationContext/{split}.txt"],
                 CONTEXT_LAYOUT, CONTEXT_SOURCE)
    ids = read_id_list(os.path.join(root, "ImageSets", "SegmentationContext", f"{split}.txt"))
    if not ids:
        raise layout_error("context", root, f"{split}.txt is empty.", CONTEXT_LAYOUT, CONTEXT_SOURCE)
    items = [(i, os.path.join(root, "JPEGImages", f"{i}.jpg"),
              os.path.join(root, "SegmentationClassContext", f"{i}.png")) for i in ids]
    return FileDataset("context", CONTEXT_LABEL_SPACE, items, CONTEXT_RAW_LABELS, root=root, layout=CONTEXT_LAYOUT,
                       source=CONTEXT_SOURCE)
