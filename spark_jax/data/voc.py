"""Pascal VOC 2012 val (1,449 images; 20 classes + background; void = 255).

Labels are the palette indices of ``SegmentationClass/*.png``: 0 background, 1..20 the classes, 255 the void
outline around objects (ignored by the ``standard`` protocol; counted as background by ``diffcut``, whose
loader reads detectron2-prepared annotations where background and void share one id).
"""

from __future__ import annotations

import os

from spark_jax.data.base import FileDataset, layout_error, raw_label_space, read_id_list, require_dirs
from spark_jax.evaluation import LabelSpace

__all__ = ["VOC_LABEL_SPACE", "VOC_RAW_LABELS", "VOC_LAYOUT", "voc"]

VOC_LABEL_SPACE = LabelSpace(
    "voc",
    (
        "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
        "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
    ),
    background=0,
)

# Palette indices are the class ids; any other index is refused (not mapped to void).
VOC_RAW_LABELS = raw_label_space({**{i: i for i in range(21)}, 255: 255}, "0..20 and 255 (void)")

VOC_LAYOUT = """\
    <data_dir>/VOCdevkit/VOC2012/            (or <data_dir> pointing at VOC2012/ itself)
        JPEGImages/<id>.jpg
        SegmentationClass/<id>.png           palette PNG: 0 background, 1..20 classes, 255 void
        ImageSets/Segmentation/val.txt       one <id> per line (1,449 ids)"""
VOC_SOURCE = (
    "the VOC2012 trainval tar (VOCtrainval_11-May-2012.tar) from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ "
    "(mirrors: the 'Pascal VOC 2012' entries of Kaggle / academic torrents); untar it into --data_dir."
)


def find_voc_root(data_dir: str, year: str) -> str:
    """The ``VOC<year>`` folder: ``data_dir`` itself, ``data_dir/VOC<year>`` or ``data_dir/VOCdevkit/VOC<year>``."""
    for cand in (data_dir, os.path.join(data_dir, f"VOC{year}"), os.path.join(data_dir, "VOCdevkit", f"VOC{year}")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    return data_dir


def voc(data_dir: str, split: str = "val") -> FileDataset:
    """Pascal VOC 2012 segmentation ``split`` (val by default) in its official layout."""
    root = find_voc_root(data_dir, "2012")
    require_dirs("voc", root, ["JPEGImages", "SegmentationClass", f"ImageSets/Segmentation/{split}.txt"],
                 VOC_LAYOUT, VOC_SOURCE)
    ids = read_id_list(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))
    if not ids:
        raise layout_error("voc", root, f"ImageSets/Segmentation/{split}.txt is empty.", VOC_LAYOUT, VOC_SOURCE)
    items = [(i, os.path.join(root, "JPEGImages", f"{i}.jpg"), os.path.join(root, "SegmentationClass", f"{i}.png"))
             for i in ids]
    return FileDataset("voc", VOC_LABEL_SPACE, items, VOC_RAW_LABELS, root=root, layout=VOC_LAYOUT, source=VOC_SOURCE)
