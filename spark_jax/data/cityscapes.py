"""Cityscapes val (500 images of frankfurt, lindau, munster; 27 classes).

The unsupervised-segmentation convention (PiCIE, STEGO, DiffCut): ``gtFine`` labelIds 7..33 become classes
0..26 — every "flat", "construction", "object", "nature", "sky", "human" and "vehicle" label, including those
the official 19-class benchmark ignores (parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
trailer); ids 0..6 (unlabeled, ego vehicle, rectification border, out of roi, static, dynamic, ground) are
ignored, and any other value is refused. Both protocols agree here.

The id table is transcribed from ``cityscapesscripts/helpers/labels.py`` (cityscapesScripts 2.3.0, the
official label definition); ``tests/test_datasets.py`` compares it with the package (a test dependency).
"""

from __future__ import annotations

import os

from spark_jax.data.base import FileDataset, layout_error, raw_label_space, require_dirs
from spark_jax.evaluation import LabelSpace

__all__ = ["CITYSCAPES_ID_NAMES", "CITYSCAPES_LABEL_SPACE", "CITYSCAPES_RAW_LABELS", "CITYSCAPES_LAYOUT", "cityscapes"]

# labelId -> name, from cityscapesscripts.helpers.labels (id -1, "license plate", never occurs in labelIds PNGs).
CITYSCAPES_ID_NAMES = {
    0: "unlabeled", 1: "ego vehicle", 2: "rectification border", 3: "out of roi", 4: "static", 5: "dynamic",
    6: "ground", 7: "road", 8: "sidewalk", 9: "parking", 10: "rail track", 11: "building", 12: "wall",
    13: "fence", 14: "guard rail", 15: "bridge", 16: "tunnel", 17: "pole", 18: "polegroup", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 29: "caravan", 30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle",
    -1: "license plate",
}
FIRST_ID, LAST_ID = 7, 33
CITYSCAPES_LABEL_SPACE = LabelSpace(
    "cityscapes", tuple(CITYSCAPES_ID_NAMES[i] for i in range(FIRST_ID, LAST_ID + 1)), background=None
)

# gtFine labelIds PNGs hold the official ids 0..33 (license plate, -1, is not drawn into them): 0..6 are void,
# 7..33 the classes; any other value is refused.
CITYSCAPES_RAW_LABELS = raw_label_space(
    {i: (i - FIRST_ID if i >= FIRST_ID else 255) for i in range(LAST_ID + 1)},
    "labelIds 0..33: 0..6 ignored, 7..33 classes",
)

CITYSCAPES_LAYOUT = """\
    <data_dir>/                              (the folder holding leftImg8bit/ and gtFine/)
        leftImg8bit/val/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/val/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png   8-bit labelIds (0..33)"""
CITYSCAPES_SOURCE = (
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ "
    "(free registration); unzip both into --data_dir."
)


def cityscapes(data_dir: str, split: str = "val") -> FileDataset:
    """Cityscapes ``split`` with the 27-class mapping (labelIds 7..33 -> 0..26)."""
    root = data_dir
    if os.path.isdir(os.path.join(data_dir, "cityscapes", "leftImg8bit")):
        root = os.path.join(data_dir, "cityscapes")
    require_dirs("cityscapes", root, [f"leftImg8bit/{split}", f"gtFine/{split}"], CITYSCAPES_LAYOUT,
                 CITYSCAPES_SOURCE)
    items = []
    img_dir = os.path.join(root, "leftImg8bit", split)
    for city in sorted(os.listdir(img_dir)):
        if not os.path.isdir(os.path.join(img_dir, city)):
            continue
        for name in sorted(os.listdir(os.path.join(img_dir, city))):
            if not name.endswith("_leftImg8bit.png"):
                continue
            stem = name[: -len("_leftImg8bit.png")]
            items.append((f"{city}/{stem}", os.path.join(img_dir, city, name),
                          os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")))
    if not items:
        raise layout_error("cityscapes", root, f"no *_leftImg8bit.png under leftImg8bit/{split}/<city>/.",
                           CITYSCAPES_LAYOUT, CITYSCAPES_SOURCE)
    return FileDataset("cityscapes", CITYSCAPES_LABEL_SPACE, items, CITYSCAPES_RAW_LABELS, root=root,
                       layout=CITYSCAPES_LAYOUT, source=CITYSCAPES_SOURCE)
