"""ADE20K val (ADEChallengeData2016, 2,000 images, 150 classes).

Annotations hold 0 = "other objects" (not a class) and 1..150. The reader yields ``id - 1`` (0..149) and the
ignore value for 0. The ``diffcut`` protocol re-creates DiffCut's off-by-one (it scores raw ids 0..149, so
"other" counts as a class and the 150th class, "flag", is never scored).
"""

from __future__ import annotations

import os

from spark_jax.data.base import FileDataset, layout_error, raw_label_space, require_dirs
from spark_jax.evaluation import LabelSpace

__all__ = ["ADE20K_LABEL_SPACE", "ADE20K_RAW_LABELS", "ADE20K_LAYOUT", "ade20k"]

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock",
    "flag",
)
ADE20K_LABEL_SPACE = LabelSpace("ade20k", ADE20K_CLASSES, diffcut_shift=True)

ADE20K_RAW_LABELS = raw_label_space({0: 255, **{k: k - 1 for k in range(1, 151)}},
                                    "0..150: 0 'other objects' (ignored), 1..150 classes")

ADE20K_LAYOUT = """\
    <data_dir>/ADEChallengeData2016/         (or <data_dir> pointing at it)
        images/validation/ADE_val_<n>.jpg
        annotations/validation/ADE_val_<n>.png   8-bit: 0 other (ignored), 1..150 classes"""
ADE20K_SOURCE = (
    "ADEChallengeData2016.zip from http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip "
    "(the SceneParsing benchmark); unzip it into --data_dir."
)


def ade20k(data_dir: str, split: str = "validation") -> FileDataset:
    """ADE20K SceneParsing ``split`` (validation by default)."""
    root = data_dir
    if os.path.isdir(os.path.join(data_dir, "ADEChallengeData2016")):
        root = os.path.join(data_dir, "ADEChallengeData2016")
    require_dirs("ade20k", root, [f"images/{split}", f"annotations/{split}"], ADE20K_LAYOUT, ADE20K_SOURCE)
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, "images", split))
                   if f.lower().endswith(".jpg"))
    if not stems:
        raise layout_error("ade20k", root, f"images/{split} holds no .jpg file.", ADE20K_LAYOUT, ADE20K_SOURCE)
    items = [(s, os.path.join(root, "images", split, f"{s}.jpg"),
              os.path.join(root, "annotations", split, f"{s}.png")) for s in stems]
    return FileDataset("ade20k", ADE20K_LABEL_SPACE, items, ADE20K_RAW_LABELS, root=root, layout=ADE20K_LAYOUT,
                       source=ADE20K_SOURCE)
