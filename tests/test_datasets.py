"""Each reader on a small fixture written in the dataset's real on-disk format; its label tables against the
datasets' official definitions. Bad files and modes: tests/test_bad_inputs_data.py."""

import os

import cityscapesscripts.helpers.labels as cityscapes_labels
import numpy as np
import pytest
from PIL import Image

from spark_jax.data import DATASETS, DatasetNotFoundError, get_dataset
from spark_jax.data.cityscapes import CITYSCAPES_ID_NAMES, CITYSCAPES_LABEL_SPACE, CITYSCAPES_RAW_LABELS
from spark_jax.data.coco import COARSE_NAMES, COCO_THING_NAMES, FINE_TO_COARSE
from spark_jax.data.demo import DEMO_LABEL_SPACE, DemoDataset, demo_image

H, W = 12, 17
IGNORE = 255


def write_jpg(path, h=H, w=W, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, quality=95)


def write_png(path, arr, palette=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.asarray(arr, np.uint8)
    im = Image.fromarray(arr, mode="L")
    if palette:  # VOC's annotations are palette PNGs: the pixel values are palette indices
        im = Image.new("P", (arr.shape[1], arr.shape[0]))
        im.putpalette([(i * 37) % 256 for i in range(768)])
        im.putdata(arr.ravel().tolist())
    im.save(path)


def raw_map(values):
    """A label map whose rows cycle through ``values``."""
    arr = np.zeros((H, W), np.int64)
    for r in range(H):
        arr[r] = values[r % len(values)]
    return arr


# ------------------------------------------------------------------ VOC
def make_voc(root, ids=("2007_000033", "2007_000042")):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    for k, i in enumerate(ids):
        write_jpg(os.path.join(base, "JPEGImages", f"{i}.jpg"), seed=k)
        write_png(os.path.join(base, "SegmentationClass", f"{i}.png"), raw_map([0, 15, 255, 20]), palette=True)
    os.makedirs(os.path.join(base, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")
    return base


def test_voc_reads_palette_indices_and_void(tmp_path):
    make_voc(tmp_path)
    ds = get_dataset("voc", str(tmp_path))
    assert len(ds) == 2 and ds.ids == ["2007_000033", "2007_000042"]
    s = ds[1]
    assert s.image.dtype == np.uint8 and s.image.shape == (H, W, 3)
    assert s.label.dtype == np.int32 and s.label.shape == (H, W)
    assert sorted(np.unique(s.label).tolist()) == [0, 15, 20, IGNORE]
    assert ds.label_space.class_names[15] == "person" and ds.label_space.background == 0
    # the VOC2012 folder itself is accepted as --data_dir
    assert len(get_dataset("voc", os.path.join(tmp_path, "VOCdevkit", "VOC2012"))) == 2


def test_voc_incomplete_copy_names_the_missing_files_and_layout(tmp_path):
    base = make_voc(tmp_path)
    os.remove(os.path.join(base, "SegmentationClass", "2007_000042.png"))
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset("voc", str(tmp_path))
    msg = str(err.value)
    assert "1 listed file(s) are missing" in msg and "2007_000042.png" in msg
    assert "SegmentationClass/<id>.png" in msg and "host.robots.ox.ac.uk" in msg


# ------------------------------------------------------------------ Pascal Context
def test_context_mmseg_layout(tmp_path):
    base = os.path.join(tmp_path, "VOCdevkit", "VOC2010")
    write_jpg(os.path.join(base, "JPEGImages", "2008_000002.jpg"))
    write_png(os.path.join(base, "SegmentationClassContext", "2008_000002.png"), raw_map([0, 1, 59]))
    os.makedirs(os.path.join(base, "ImageSets", "SegmentationContext"))
    with open(os.path.join(base, "ImageSets", "SegmentationContext", "val.txt"), "w") as f:
        f.write("2008_000002\n")
    ds = get_dataset("context", str(tmp_path))
    s = ds[0]
    assert sorted(np.unique(s.label).tolist()) == [0, 1, 59]
    names = ds.label_space.class_names
    assert len(names) == 60 and names[0] == "background" and names[1] == "aeroplane" and names[59] == "wood"


# ------------------------------------------------------------------ COCO
def make_coco(root, ids=("000000000139", "000000000285"), curated_in_root=False):
    for k, i in enumerate(ids):
        write_jpg(os.path.join(root, "images", "val2017", f"{i}.jpg"), seed=k)
        # person (0), sky-other (156 -> sky), unlabeled (255), unused thing id (11, COCO id 12), toothbrush (89)
        write_png(os.path.join(root, "annotations", "val2017", f"{i}.png"), raw_map([0, 156, 255, 11, 89]))
    list_dir = root if curated_in_root else os.path.join(root, "curated", "val2017")
    os.makedirs(list_dir, exist_ok=True)
    with open(os.path.join(list_dir, "Coco164kFull_Stuff_Coarse_7.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def test_coco_stuff27_fine_to_coarse(tmp_path):
    make_coco(tmp_path)
    ds = get_dataset("coco_stuff27", str(tmp_path))
    assert ds.ids == ["000000000139", "000000000285"]
    label = ds[0].label
    assert COARSE_NAMES[label[0, 0]] == "person"
    assert COARSE_NAMES[label[1, 0]] == "sky"
    assert label[2, 0] == IGNORE
    assert COARSE_NAMES[label[3, 0]] == "outdoor"  # street sign (unused by COCO 2017) is still an outdoor thing
    assert COARSE_NAMES[label[4, 0]] == "indoor"  # toothbrush


# COCO-Stuff's official label list (labels.txt of the cocostuff repository: ids 1..182 after 0 "unlabeled";
# the stuffthingmaps store id - 1) ...
COCO_STUFF_LABELS = (
    "person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|street sign|stop sign|"
    "parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|hat|backpack|umbrella|shoe|"
    "eye glasses|handbag|tie|suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|baseball glove|"
    "skateboard|surfboard|tennis racket|bottle|plate|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|"
    "orange|broccoli|carrot|hot dog|pizza|donut|cake|chair|couch|potted plant|bed|mirror|dining table|window|desk|"
    "toilet|door|tv|laptop|mouse|remote|keyboard|cell phone|microwave|oven|toaster|sink|refrigerator|blender|book|"
    "clock|vase|scissors|teddy bear|hair drier|toothbrush|hair brush|banner|blanket|branch|bridge|building-other|"
    "bush|cabinet|cage|cardboard|carpet|ceiling-other|ceiling-tile|cloth|clothes|clouds|counter|cupboard|curtain|"
    "desk-stuff|dirt|door-stuff|fence|floor-marble|floor-other|floor-stone|floor-tile|floor-wood|flower|fog|"
    "food-other|fruit|furniture-other|grass|gravel|ground-other|hill|house|leaves|light|mat|metal|mirror-stuff|"
    "moss|mountain|mud|napkin|net|paper|pavement|pillow|plant-other|plastic|platform|playingfield|railing|"
    "railroad|river|road|rock|roof|rug|salad|sand|sea|shelf|sky-other|skyscraper|snow|solid-other|stairs|stone|"
    "straw|structural-other|table|tent|textile-other|towel|tree|vegetable|wall-brick|wall-concrete|wall-other|"
    "wall-panel|wall-stone|wall-tile|wall-wood|water-other|waterdrops|window-blind|window-other|wood"
).split("|")
# ... and its two-level hierarchy: things under COCO's own super-categories (the "supercategory" field of the
# COCO instance categories, the 11 ids COCO 2017 dropped included), stuff under COCO-Stuff's (the
# "supercategory" field of stuff_*.json). Keyed by IIC's coarse names, in IIC's coarse index order
# (cocostuff_fine_to_coarse.py: "things first, then stuff").
COCO_STUFF_HIERARCHY = {
    "electronic-things": "tv laptop mouse remote keyboard|cell phone",
    "appliance-things": "microwave oven toaster sink refrigerator blender",
    "food-things": "banana apple sandwich orange broccoli carrot|hot dog|pizza donut cake",
    "furniture-things": "chair couch|potted plant|bed mirror|dining table|window desk toilet door",
    "indoor-things": "book clock vase scissors|teddy bear|hair drier|toothbrush|hair brush",
    "kitchen-things": "bottle plate|wine glass|cup fork knife spoon bowl",
    "accessory-things": "hat backpack umbrella shoe|eye glasses|handbag tie suitcase",
    "animal-things": "bird cat dog horse sheep cow elephant bear zebra giraffe",
    "outdoor-things": "traffic light|fire hydrant|street sign|stop sign|parking meter|bench",
    "person-things": "person",
    "sports-things": "frisbee skis snowboard|sports ball|kite|baseball bat|baseball glove|skateboard surfboard|"
                     "tennis racket",
    "vehicle-things": "bicycle car motorcycle airplane bus train truck boat",
    "ceiling-stuff": "ceiling-tile ceiling-other",
    "floor-stuff": "carpet floor-tile floor-wood floor-marble floor-stone floor-other",
    "food-stuff": "fruit salad vegetable food-other",
    "furniture-stuff": "door-stuff desk-stuff table shelf cabinet cupboard mirror-stuff counter light stairs "
                       "furniture-other",
    "rawmaterial-stuff": "cardboard paper plastic metal",
    "textile-stuff": "rug mat towel napkin clothes cloth curtain blanket pillow banner textile-other",
    "wall-stuff": "wall-tile wall-panel wall-wood wall-brick wall-stone wall-concrete wall-other",
    "window-stuff": "window-blind window-other",
    "building-stuff": "house skyscraper bridge tent roof building-other",
    "ground-stuff": "sand snow dirt mud gravel road pavement railroad platform playingfield ground-other",
    "plant-stuff": "grass tree bush leaves flower branch moss straw plant-other",
    "sky-stuff": "clouds sky-other",
    "solid-stuff": "wood rock stone mountain hill solid-other",
    "structural-stuff": "fence cage net railing structural-other",
    "water-stuff": "fog river sea waterdrops water-other",
}


def test_coco_stuff27_whole_table_matches_the_cocostuff_hierarchy():
    # '|' separates chunks; a chunk is one multi-word label name or several one-word names.
    multiword = {n for n in COCO_STUFF_LABELS if " " in n}
    parent = {}
    for coarse, spec in COCO_STUFF_HIERARCHY.items():
        for chunk in spec.split("|"):
            names = [chunk] if chunk in multiword else chunk.split(" ")
            for name in names:
                assert name in COCO_STUFF_LABELS, name
                assert name not in parent, name  # a tree: one parent each
                parent[name] = coarse
    assert len(COCO_STUFF_LABELS) == 182 and set(parent) == set(COCO_STUFF_LABELS)
    # Our coarse names: IIC's without the -things/-stuff suffix, except where a name is both (food, furniture).
    stems = [c.rsplit("-", 1)[0] for c in COCO_STUFF_HIERARCHY]
    ours = tuple(c if stems.count(s) > 1 else s for c, s in zip(COCO_STUFF_HIERARCHY, stems))
    assert COARSE_NAMES == ours
    coarse_index = {c: k for k, c in enumerate(COCO_STUFF_HIERARCHY)}
    expected = tuple(coarse_index[parent[name]] for name in COCO_STUFF_LABELS)  # fine id = position (id - 1)
    assert FINE_TO_COARSE == expected


def test_coco_object_things_background_and_void(tmp_path):
    make_coco(tmp_path, curated_in_root=True)
    ds = get_dataset("coco_object", str(tmp_path))
    label = ds[1].label
    names = ds.label_space.class_names
    assert len(names) == 81 and ds.label_space.background == 0
    assert names[label[0, 0]] == "person"
    assert label[1, 0] == 0  # stuff -> background
    assert label[2, 0] == IGNORE  # unlabeled -> void
    assert label[3, 0] == IGNORE  # unused thing id never occurs; treated as void
    assert names[label[4, 0]] == "toothbrush" == COCO_THING_NAMES[-1]


def test_coco_without_curated_list_says_where_to_get_it(tmp_path):
    make_coco(tmp_path)
    os.remove(os.path.join(tmp_path, "curated", "val2017", "Coco164kFull_Stuff_Coarse_7.txt"))
    with pytest.raises(DatasetNotFoundError, match="curated image list .* is missing"):
        get_dataset("coco_object", str(tmp_path))


# ------------------------------------------------------------------ Cityscapes
def make_cityscapes(root, frames=(("frankfurt", "000000_000294"), ("lindau", "000001_000019"))):
    for k, (city, frame) in enumerate(frames):
        stem = f"{city}_{frame}"
        write_jpg(os.path.join(root, "leftImg8bit", "val", city, f"{stem}_leftImg8bit.png"), seed=k)
        write_png(os.path.join(root, "gtFine", "val", city, f"{stem}_gtFine_labelIds.png"),
                  raw_map([0, 6, 7, 26, 33]))
    return [f"{c}/{c}_{f}" for c, f in frames]


def test_cityscapes_label_ids_7_to_33(tmp_path):
    ids = make_cityscapes(tmp_path)
    ds = get_dataset("cityscapes", str(tmp_path))
    assert ds.ids == ids
    label = ds[0].label
    assert [int(label[r, 0]) for r in range(5)] == [IGNORE, IGNORE, 0, 19, 26]
    names = ds.label_space.class_names
    assert len(names) == 27 and names[0] == "road" and names[19] == "car" and names[26] == "bicycle"


def test_cityscapes_table_matches_the_official_package():
    labels = cityscapes_labels.labels
    assert {label.id: label.name for label in labels} == CITYSCAPES_ID_NAMES
    # The 27 classes are every label outside the "void" category, in id order.
    assert CITYSCAPES_LABEL_SPACE.class_names == tuple(lab.name for lab in labels if lab.category != "void"
                                                       and lab.id >= 0)
    # The reader's raw space: exactly the ids a labelIds PNG can hold (0..255), void ids ignored.
    table = CITYSCAPES_RAW_LABELS.table
    for lab in labels:
        if lab.id < 0:  # license plate: not drawn into labelIds PNGs
            continue
        expected = IGNORE if lab.category == "void" else CITYSCAPES_LABEL_SPACE.class_names.index(lab.name)
        assert table[lab.id] == expected, lab
    assert table.size == 1 + max(lab.id for lab in labels)


# ------------------------------------------------------------------ ADE20K
def test_ade20k_shifts_ids_and_ignores_other(tmp_path):
    root = os.path.join(tmp_path, "ADEChallengeData2016")
    for k in (2, 1):
        write_jpg(os.path.join(root, "images", "validation", f"ADE_val_{k:08d}.jpg"), seed=k)
        write_png(os.path.join(root, "annotations", "validation", f"ADE_val_{k:08d}.png"), raw_map([0, 1, 150]))
    ds = get_dataset("ade20k", str(tmp_path))
    assert ds.ids == ["ADE_val_00000001", "ADE_val_00000002"]  # sorted
    label = ds[0].label
    assert [int(label[r, 0]) for r in range(3)] == [IGNORE, 0, 149]
    assert ds.label_space.class_names[0] == "wall" and ds.label_space.class_names[149] == "flag"
    assert ds.label_space.diffcut_shift


def test_ade20k_label_of_another_size_is_rejected(tmp_path):
    root = os.path.join(tmp_path, "ADEChallengeData2016")
    write_jpg(os.path.join(root, "images", "validation", "ADE_val_00000001.jpg"))
    write_png(os.path.join(root, "annotations", "validation", "ADE_val_00000001.png"), np.zeros((H + 1, W)))
    with pytest.raises(ValueError, match="does not belong to this image"):
        get_dataset("ade20k", str(tmp_path))[0]


# ------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", sorted(set(DATASETS) - {"demo"}))
def test_missing_data_prints_layout_and_source(name, tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset(name, str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "Expected layout" in msg and "Where to get it" in msg


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("imagenet")
    with pytest.raises(DatasetNotFoundError, match="--data_dir is required"):
        get_dataset("voc")


# ------------------------------------------------------------------ demo
def test_demo_is_deterministic_with_exact_ground_truth():
    a, b = demo_image(3), demo_image(3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(demo_image(4).image, a.image)
    assert a.image.dtype == np.uint8 and a.image.shape == (192, 256, 3)
    assert a.label.dtype == np.int32 and a.label.min() >= 0 and a.label.max() < DEMO_LABEL_SPACE.num_classes


def test_demo_benchmark_has_unequal_sizes_thin_structures_and_a_background():
    ds = DemoDataset(num_images=8, photos=False)
    counts = np.stack([np.bincount(s.label.ravel(), minlength=6) for s in ds])
    assert (counts[:, 0] > 0).all()  # background always present
    assert (counts > 0).any(axis=0).all()  # every class occurs somewhere
    present = counts[counts > 0]
    assert present.max() / present.min() > 20  # very unequal region sizes
    wire = [s.label == 5 for s in ds if (s.label == 5).any()]
    assert wire
    for m in wire:  # a thin structure: area / length is its width, 2-3 px (up to sqrt(2) more when diagonal)
        ys, xs = np.nonzero(m)
        length = max(np.ptp(ys), np.ptp(xs)) + 1
        assert m.sum() / length <= 3 * np.sqrt(2) + 0.5


def test_demo_photos_are_unlabelled():
    ds = get_dataset("demo", num_images=2)
    assert len(ds) == 6 and ds.ids[2] == "photo_astronaut"
    s = ds[2]
    assert s.label is None and s.image.dtype == np.uint8 and s.image.shape[-1] == 3


def test_demo_without_scikit_image_skips_the_photos_with_a_note(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage.data` fail
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    ds = DemoDataset(num_images=2)
    assert ds.ids == ["demo_0000", "demo_0001"] and "scikit-image is not installed" in ds.note
