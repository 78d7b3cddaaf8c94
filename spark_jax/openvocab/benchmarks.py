"""The open-vocabulary benchmarks (``--protocol=open_vocab --dataset=NAME``): NERVE's Table 1 columns.

NERVE compares with the training-free CLIP methods on their mmsegmentation protocol (SCLIP, NACLIP; method-facts
section 1.3), so each benchmark is defined as NACLIP's ``configs/cfg_*.py`` and ``custom_datasets.py`` define it:

=====================  ==========  ==============================  =======  =================  ===========  ====
``--dataset``          NERVE       reader (layout: docs/eval...)   classes  background         reduce_zero  thd
=====================  ==========  ==============================  =======  =================  ===========  ====
``voc21``              V21         VOC 2012 val, 1,449             21       0                  no           0.1
``voc20``              V20         the same images                 20       none (ignored)     yes          0
``context60``          PC60        Pascal Context val, 5,105       60       0                  no           0.1
``context59``          PC59        the same images                 59       none (ignored)     yes          0
``coco_object_full``   C-Obj       COCO val2017, all 5,000         81       0 (every stuff)    no           0.1
``coco_stuff171``      C-Stf       COCO val2017, all 5,000         171      none               no           0
``ade20k``             ADE         ADE20K val, 2,000               150      none ("other"      yes          0
                                                                            ignored)
=====================  ==========  ==============================  =======  =================  ===========  ====

``thd`` is NACLIP's ``prob_thd`` (a pixel whose largest class probability is below it becomes the background
class), the default of ``--background_threshold``. ``demo`` (the procedural demo, 6 classes, no background, no
threshold) runs the protocol without any data.

Class names: ``spark_jax/openvocab/classes/<name>.txt``, one line per class in the label space's order, synonyms
as ``a, b, c`` (a class scores the max over its synonyms). The seven benchmark files are SCLIP's
``configs/cls_*.txt`` (wangf3014/SCLIP, reused unchanged by NACLIP), so the vocabulary is the one NERVE's baselines
were scored with, quirks included: the background lines of V21 and C-Obj are 26 stuff names ("sky, wall, tree,
..."), VOC's "boat" is "ship", COCO-Stuff's and ADE20K's multi-word names are written without spaces
("trafficlight", "chestofdrawers"). ``--vocabulary=FILE`` replaces a benchmark's file (same number of lines).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from spark_jax.data import Dataset
from spark_jax.data.ade20k import ADE20K_LABEL_SPACE, ade20k
from spark_jax.data.context import CONTEXT_LABEL_SPACE, context
from spark_jax.data.demo import DEMO_LABEL_SPACE, DemoDataset
from spark_jax.data.open_vocab import (
    COCO_OBJECT_FULL_LABEL_SPACE,
    COCO_STUFF171_LABEL_SPACE,
    CONTEXT59_LABEL_SPACE,
    VOC20_LABEL_SPACE,
    coco_object_full,
    coco_stuff171,
    context59,
    voc20,
)
from spark_jax.data.voc import VOC_LABEL_SPACE, voc
from spark_jax.evaluation import LabelSpace

__all__ = ["BENCHMARKS", "CLASSES_DIR", "OpenVocabBenchmark", "benchmark"]

CLASSES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "classes")


@dataclasses.dataclass(frozen=True)
class OpenVocabBenchmark:
    """One open-vocabulary benchmark.

    Attributes:
        name: the ``--dataset`` value under ``--protocol=open_vocab``.
        title: its column in NERVE's Table 1.
        label_space: the classes its reader yields (scored ids; void = ``ignore_index``).
        read: ``data_dir -> Dataset`` (the demo's takes its own keywords).
        class_file: the shipped class-name file under :data:`CLASSES_DIR`.
        background_threshold: NACLIP's ``prob_thd`` for it (0: none).
        reduce_zero_label: whether the source's class 0 (background / "other") is ignored (mmsegmentation's
            ``reduce_zero_label``; documentation: the reader does it).
        clip_resolution: side of CLIP's input: NACLIP's resize short side (``Resize(scale=(2048, 336))``; 448
            for COCO-Stuff), applied here to the square crop every method sees (*inferred*: NACLIP resizes the
            whole image and slides 224 px windows over it; this runner feeds CLIP the crop in one pass).
    """

    name: str
    title: str
    label_space: LabelSpace
    read: Callable[..., Dataset]
    class_file: str
    background_threshold: float = 0.0
    reduce_zero_label: bool = False
    clip_resolution: int = 336

    @property
    def background(self) -> int | None:
        return self.label_space.background

    @property
    def class_path(self) -> str:
        return os.path.join(CLASSES_DIR, self.class_file)


def _demo(data_dir=None, **kw) -> Dataset:
    del data_dir
    return DemoDataset(**kw)


BENCHMARKS: dict[str, OpenVocabBenchmark] = {b.name: b for b in (
    OpenVocabBenchmark("voc21", "V21", VOC_LABEL_SPACE, voc, "voc21.txt", 0.1),
    OpenVocabBenchmark("voc20", "V20", VOC20_LABEL_SPACE, voc20, "voc20.txt", reduce_zero_label=True),
    OpenVocabBenchmark("context60", "PC60", CONTEXT_LABEL_SPACE, context, "context60.txt", 0.1),
    OpenVocabBenchmark("context59", "PC59", CONTEXT59_LABEL_SPACE, context59, "context59.txt",
                       reduce_zero_label=True),
    OpenVocabBenchmark("coco_object_full", "C-Obj", COCO_OBJECT_FULL_LABEL_SPACE, coco_object_full,
                       "coco_object.txt", 0.1),
    OpenVocabBenchmark("coco_stuff171", "C-Stf", COCO_STUFF171_LABEL_SPACE, coco_stuff171, "coco_stuff171.txt",
                       clip_resolution=448),
    OpenVocabBenchmark("ade20k", "ADE", ADE20K_LABEL_SPACE, ade20k, "ade20k.txt", reduce_zero_label=True),
    OpenVocabBenchmark("demo", "demo", DEMO_LABEL_SPACE, _demo, "demo.txt"),
)}


def benchmark(name: str) -> OpenVocabBenchmark:
    """The open-vocabulary benchmark ``name``; ValueError listing them (and the unsupervised dataset it may have
    been confused with)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    hint = {"voc": "voc21 or voc20", "context": "context60 or context59", "coco_object": "coco_object_full",
            "coco_stuff27": "coco_stuff171"}.get(name)
    raise ValueError(f"--protocol=open_vocab scores the open-vocabulary benchmarks {', '.join(BENCHMARKS)}; got "
                     f"--dataset={name}" + (f" (the open-vocabulary form of {name} is {hint})" if hint else ""))
