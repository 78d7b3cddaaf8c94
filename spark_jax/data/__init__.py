"""Benchmark readers and the registry that maps ``--dataset`` names to them.

``get_dataset(name, data_dir)`` returns a :class:`~spark_jax.data.base.Dataset`: ``len(ds)``,
``ds[i] -> Sample(image uint8 [H, W, 3], label int32 [H, W] | None, image_id)``, ``ds.label_space``; a file
that cannot be used raises ``BadSampleError`` and ``ds.verify()`` lists every such file before a run.
Layouts and sources: docs/evaluation.md (and each reader's error message).
"""

from __future__ import annotations

from collections.abc import Callable

from spark_jax.data.ade20k import ADE20K_LABEL_SPACE, ade20k
from spark_jax.data.base import BadSample, BadSampleError, Dataset, DatasetNotFoundError, FileDataset, Sample
from spark_jax.data.cityscapes import CITYSCAPES_LABEL_SPACE, cityscapes
from spark_jax.data.coco import COCO_OBJECT_LABEL_SPACE, COCO_STUFF27_LABEL_SPACE, coco_object, coco_stuff27
from spark_jax.data.context import CONTEXT_LABEL_SPACE, context
from spark_jax.data.demo import DEMO_LABEL_SPACE, DemoDataset
from spark_jax.data.voc import VOC_LABEL_SPACE, voc

__all__ = ["DATASETS", "LABEL_SPACES", "get_dataset", "BadSample", "BadSampleError", "Dataset", "DatasetNotFoundError",
           "FileDataset", "Sample"]

# name -> reader(data_dir) ; the demo needs no data_dir.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "demo": lambda data_dir=None, **kw: DemoDataset(**kw),
    "voc": voc,
    "context": context,
    "coco_object": coco_object,
    "coco_stuff27": coco_stuff27,
    "cityscapes": cityscapes,
    "ade20k": ade20k,
}
LABEL_SPACES = {
    "demo": DEMO_LABEL_SPACE,
    "voc": VOC_LABEL_SPACE,
    "context": CONTEXT_LABEL_SPACE,
    "coco_object": COCO_OBJECT_LABEL_SPACE,
    "coco_stuff27": COCO_STUFF27_LABEL_SPACE,
    "cityscapes": CITYSCAPES_LABEL_SPACE,
    "ade20k": ADE20K_LABEL_SPACE,
}
_ALIASES = {"voc2012": "voc", "voc20": "voc", "pascal_context": "context", "coco-object": "coco_object",
            "coco-stuff": "coco_stuff27", "coco_stuff": "coco_stuff27", "ade": "ade20k"}


def get_dataset(name: str, data_dir: str | None = None, **kwargs) -> Dataset:
    """The reader of benchmark ``name`` on ``data_dir``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
        DatasetNotFoundError: missing or incomplete data (the message shows the expected layout and source).
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    if key != "demo" and not data_dir:
        raise DatasetNotFoundError(
            f"{key}: --data_dir is required (the folder holding the dataset; see docs/evaluation.md for the "
            "layout). Use --dataset=demo to run without any data."
        )
    return DATASETS[key](data_dir, **kwargs)
