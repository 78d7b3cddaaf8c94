"""The benchmark runner behind ``python -m experiments.run``: dataset -> features -> method -> scores.

One call of :func:`run` evaluates a method on a benchmark and writes, under ``output_dir``:

* ``run_config.json`` — the full configuration (checked on resume: a different configuration is refused);
* ``results.jsonl`` — one line per finished image (its TP/FP/FN per class, diagnostics, timing), appended and
  flushed after the image's files are written. It is the resume log: a rerun skips every image listed there
  and rebuilds the scores from it, so an interrupted run loses at most the image in flight and never counts an
  image twice (a torn last line is discarded);
* ``predictions/<id>.png`` — the scored label map at the mask size (cluster ids; 16-bit if >= 256 of them);
* ``overlays/<id>.png`` — image | prediction | ground truth, for the first ``num_overlays`` images and every
  unlabelled one;
* ``metrics.json`` — mIoU, pixel accuracy, per-class IoU, configuration, package versions, timing, diagnostics.

Per image the pipeline is the reference's (DiffCut's evaluation, which SPARK reuses): features of the
center-cropped, resized image -> the method's token labels, upsampled to the 128x128 mask size -> many-to-one
background merge (VOC, Context, COCO-Object) -> PAMR on the merged map -> Hungarian scoring
(:mod:`spark_jax.evaluation`).

``feature_cache`` stores each image's backbone taps (one ``.npz`` per image) keyed by backbone, preprocessing and
resolution, and tap set, so a hyperparameter sweep runs the backbone once (methods whose taps are too large to keep,
DiffSeg's, opt out: ``MethodSpec.cache_taps``).

Methods (:data:`spark_jax.methods.REGISTRY`, ``--method``): ``spark`` and the baselines it is compared with on the same features,
upsampling, PAMR and scoring: ``diffcut`` (DiffCut's recursive Normalized Cut), ``autosc`` (spectral clustering
with an eigengap cluster count, DiffCut Sec. 4.3) and ``kmeans`` (DiffCut App. F, K fixed or K* from the ground
truth). Each method is one jitted call per batch; its time on device (excluding the backbone, compilation, PAMR

The package, one concept per module, in the order :func:`run` uses them:

* :mod:`~spark_jax.runner.config` — :class:`RunConfig`, the run's configuration;
* :mod:`~spark_jax.runner.backbones` — which backbone a run uses and how its features are identified;
* :mod:`~spark_jax.runner.rundir` — the run directory: atomic writes, ``run_config.json`` (the resume identity) and
  the resume log ``results.jsonl``;
* :mod:`~spark_jax.runner.loop` — the pre-run data check and the batch loop;
* :mod:`~spark_jax.runner.features` — a batch's backbone features and the feature cache;
* :mod:`~spark_jax.runner.scoring` — one image's background merge, PAMR and Hungarian counts;
* :mod:`~spark_jax.runner.outputs` — prediction PNGs and overlays;
* :mod:`~spark_jax.runner.metrics` — the pieces of ``metrics.json``;
* :mod:`~spark_jax.runner.benchmark` — :func:`run` itself;
* :mod:`~spark_jax.runner.comparison` — :func:`compare`: every method side by side, ``comparison.md``;
* :mod:`~spark_jax.runner.errors` — the errors, each naming the problem and the fix.
"""

from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec
from spark_jax.runner.backbones import (
    SSD1B_REPO,
    FeaturesOnly,
    ResolvedBackbone,
    backbone_kind,
    find_cached_checkpoint,
    resolve_backbone,
)
from spark_jax.runner.benchmark import run
from spark_jax.runner.comparison import (
    DATASET_ORDER,
    DATASET_TITLES,
    PUBLISHED,
    Entry,
    compare,
    comparison_entries,
    run_dir,
    summarize,
    to_markdown,
)
from spark_jax.runner.config import BACKBONES, ON_BAD_SAMPLE, RunConfig
from spark_jax.runner.errors import (
    BackboneNotFoundError,
    BadDataError,
    CorruptRunError,
    NonFiniteFeaturesError,
    OutputPathError,
)
from spark_jax.runner.rundir import load_results
from spark_jax.runner.scoring import classes_present

__all__ = [
    "BACKBONES",
    "DATASET_ORDER",
    "DATASET_TITLES",
    "ON_BAD_SAMPLE",
    "PUBLISHED",
    "SSD1B_REPO",
    "BackboneNotFoundError",
    "BadDataError",
    "CorruptRunError",
    "Entry",
    "FeaturesOnly",
    "MethodContext",
    "MethodInputs",
    "MethodSpec",
    "NonFiniteFeaturesError",
    "OutputPathError",
    "ResolvedBackbone",
    "RunConfig",
    "backbone_kind",
    "classes_present",
    "compare",
    "comparison_entries",
    "find_cached_checkpoint",
    "load_results",
    "resolve_backbone",
    "run",
    "run_dir",
    "summarize",
    "to_markdown",
]
