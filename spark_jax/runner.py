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

``feature_cache`` stores each image's backbone features (``.npy``) keyed by backbone, its settings and the image
id, so a hyperparameter sweep runs the backbone once.

Methods (:data:`METHODS`, ``--method``): ``spark`` and the baselines it is compared with on the same features,
upsampling, PAMR and scoring: ``diffcut`` (DiffCut's recursive Normalized Cut), ``autosc`` (spectral clustering
with an eigengap cluster count, DiffCut Sec. 4.3) and ``kmeans`` (DiffCut App. F, K fixed or K* from the ground
truth). Each method is one jitted call per batch; its time on device (excluding the backbone, compilation, PAMR
and scoring) is recorded per image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from PIL import Image

from spark_jax.methods.autosc import AutoSCConfig, autosc_batch
from spark_jax.backbones.diffusion import BackboneConfig, load_backbone
from spark_jax.config import SparkConfig
from spark_jax.data import BadSampleError, Dataset, Sample, get_dataset
from spark_jax.evaluation import PROTOCOLS, Evaluator, LabelSpace, protocol_labels
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.methods.kmeans import KMeansConfig, kmeans_tokens
from spark_jax.graph.ncut import NCutConfig, recursive_ncut_batch
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
from spark_jax.pipeline import PipelineConfig, segment_features
from spark_jax.presets import SPARK_PRESETS, preset_for_backbone
from spark_jax.data.preprocess import prepare_image, prepare_label
from spark_jax.masks.resample import resize_bilinear
from spark_jax.masks.upsample import concept_assignment

__all__ = [
    "RunConfig",
    "run",
    "METHODS",
    "METHOD_FIELDS",
    "MethodInputs",
    "MethodSpec",
    "KMeansParams",
    "BACKBONES",
    "BackboneNotFoundError",
    "ResolvedBackbone",
    "resolve_backbone",
    "classes_present",
    "find_cached_checkpoint",
    "load_results",
]

SSD1B_REPO = "segmind/SSD-1B"
# What a run does with an unreadable image or label: stop naming every bad file, or skip and list them.
ON_BAD_SAMPLE = ("fail", "skip")
BACKBONES = ("auto", "ssd1b", "handcrafted")


class BackboneNotFoundError(FileNotFoundError):
    """No diffusion checkpoint available; the message says how to get one."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one benchmark run depends on (written to ``run_config.json``).

    Attributes:
        dataset: registry name (``demo``, ``voc``, ``context``, ``coco_object``, ``coco_stuff27``, ``cityscapes``,
            ``ade20k``).
        data_dir: the dataset folder (not needed for ``demo``).
        method: key of :data:`METHODS`.
        backbone: ``auto`` (SSD-1B from ``checkpoint`` or the Hugging Face cache; the handcrafted backbone only for
            the demo when no checkpoint exists), ``ssd1b`` or ``handcrafted``.
        checkpoint: a diffusers folder of SSD-1B (or another SDXL-family model).
        resolution: side of the backbone's input; None: 1024 for SSD-1B, 256 for the handcrafted backbone.
        mask_size: side of the predicted and scored label maps (128 in the reference).
        batch_size: images per backbone / method call.
        output_dir: where results go.
        limit: evaluate only the first ``limit`` images.
        protocol: ``diffcut`` (the default: DiffCut's released evaluation, what SPARK's and DiffCut's tables are
            comparable to) or ``standard`` (the datasets' own definitions, the correction; see
            :mod:`spark_jax.evaluation`).
        pamr: apply PAMR after the background merge (the paper's setting).
        feature_cache: folder of cached backbone features, or None.
        num_overlays: overlays written for the first images (unlabelled images always get one).
        demo_images: number of procedural images of the demo benchmark.
        demo_photos: append scikit-image's sample photographs to the demo (overlays only, not scored).
        upsampling: token labels -> masks: ``soft_labels`` (SPARK: bilinear upsampling of Q*, then argmax) or
            ``concept`` (DiffCut's concept assignment); None: the method's own (``soft_labels`` for SPARK,
            ``concept`` for the baselines, which have no soft labels).
        spark: SPARK's hyperparameters (``method='spark'``); None: those of ``spark_preset``.
        spark_preset: a name of :data:`spark_jax.presets.SPARK_PRESETS` (``paper``, ...), or ``auto`` for the
            backbone's own (:data:`spark_jax.presets.BACKBONE_PRESETS`: the paper's for SSD-1B). Used when
            ``spark`` is None; :func:`run` records the resolved name and values.
        pamr_config: PAMR's settings.
        ncut: DiffCut's recursive NCut hyperparameters (``method='diffcut'``).
        autosc: AutoSC's hyperparameters (``method='autosc'``).
        kmeans: K-means' hyperparameters (``method='kmeans'``); ``kmeans.max_clusters`` bounds K and is lowered
            to the token count when the grid is smaller.
        kmeans_k: the number of K-means clusters: an int fixed across the dataset (DiffCut Table 9 uses 3 on
            VOC, 6 elsewhere), or ``'gt'`` for K* = the number of classes present in the image's label map as
            the protocol scores it (an oracle, DiffCut Table 9's K*). K above the bound is clipped (reported
            in the ``k_clipped`` diagnostic).
        kmeans_unlabelled_k: K for images without a label map (or with no scored pixel) when
            ``kmeans_k='gt'``; such images are only drawn, never scored.
        kmeans_seed: seed of the k-means++ initialisation; image ``i`` of the dataset uses
            ``fold_in(key(seed), i)``, so results do not depend on batching or on resuming.
        on_bad_sample: an image or label that cannot be decoded (truncated, empty, not an image, label values
            outside the label space): ``fail`` stops before the run and names every bad file at once; ``skip``
            leaves them out and lists them in ``metrics.json`` (``skipped``) and the summary.
        allow_nonfinite_features: score images whose backbone features hold NaN/Inf (those tokens act as zero
            vectors; counted in ``metrics.json``) instead of stopping with the count and the likely cause.
        timestep, seed, noise_source, noise_file, unet_dtype: the diffusion backbone's settings
            (:class:`spark_jax.backbones.diffusion.BackboneConfig`, the reference pipeline's defaults); unused by the
            handcrafted backbone.
        backbone_precision: the diffusion backbone's ``BackboneConfig.matmul_precision`` (``highest``: exact).
    """

    dataset: str = "demo"
    data_dir: str | None = None
    method: str = "spark"
    backbone: str = "auto"
    checkpoint: str | None = None
    resolution: int | None = None
    mask_size: int = 128
    batch_size: int = 4
    output_dir: str = "outputs/demo"
    limit: int | None = None
    protocol: str = "diffcut"
    pamr: bool = True
    feature_cache: str | None = None
    num_overlays: int = 8
    demo_images: int = 8
    demo_photos: bool = True
    upsampling: str | None = None
    spark: SparkConfig | None = None
    spark_preset: str = "auto"
    pamr_config: PamrConfig = PamrConfig()
    ncut: NCutConfig = NCutConfig()
    autosc: AutoSCConfig = AutoSCConfig()
    kmeans: KMeansConfig = KMeansConfig()
    kmeans_k: int | str = "gt"
    kmeans_unlabelled_k: int = 6
    kmeans_seed: int = 0
    on_bad_sample: str = "fail"
    allow_nonfinite_features: bool = False
    timestep: int = BackboneConfig.timestep
    seed: int = BackboneConfig.seed
    noise_source: str = BackboneConfig.noise_source
    noise_file: str | None = None
    unet_dtype: str = BackboneConfig.unet_dtype
    backbone_precision: str = BackboneConfig.matmul_precision

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {sorted(METHODS)}")
        if self.batch_size < 1 or self.mask_size < 8:
            raise ValueError(f"batch_size must be >= 1 and mask_size >= 8, got --batch_size={self.batch_size} "
                             f"--mask_size={self.mask_size}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise ValueError(f"--resolution must be an int >= 8 (the backbone's input side in pixels) or unset for "
                             f"the backbone's own, got {self.resolution!r}")
        self.backbone_config(1024)  # validates the diffusion backbone's settings (ValueError naming the field)
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"--on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {self.limit}")
        if self.upsampling not in (None, "soft_labels", "concept"):
            raise ValueError(f"upsampling must be 'soft_labels', 'concept' or None, got {self.upsampling!r}")
        if self.method != "spark" and self.upsampling == "soft_labels":
            raise ValueError(
                f"--upsampling=soft_labels is SPARK's (it upsamples the propagated soft labels Q*); {self.method} "
                "produces hard token labels and uses DiffCut's concept assignment: drop --upsampling or pass "
                "--upsampling=concept."
            )
        if not (self.kmeans_k == "gt" or (isinstance(self.kmeans_k, int) and self.kmeans_k >= 1)):
            raise ValueError(f"kmeans_k must be an int >= 1 or 'gt' (K* from the ground truth), got {self.kmeans_k!r}")
        if isinstance(self.kmeans_k, int) and self.kmeans_k > self.kmeans.max_clusters:
            raise ValueError(
                f"kmeans_k={self.kmeans_k} exceeds kmeans.max_clusters={self.kmeans.max_clusters}; raise "
                "--kmeans_max_clusters."
            )
        if not isinstance(self.kmeans_unlabelled_k, int) or self.kmeans_unlabelled_k < 1:
            raise ValueError(f"kmeans_unlabelled_k must be an int >= 1, got {self.kmeans_unlabelled_k!r}")
        if self.spark_preset not in ("auto", "custom", *SPARK_PRESETS):
            raise ValueError(f"--spark_preset must be 'auto' or one of {sorted(SPARK_PRESETS)}, got "
                             f"{self.spark_preset!r}")
        if self.spark_preset == "custom" and self.spark is None:
            raise ValueError("spark_preset='custom' names explicit settings: give spark=SparkConfig(...)")
        if self.method == "spark" and self.spark is not None:
            self.spark.check_values()
        elif self.method == "diffcut":
            self.ncut.check_values()

    def backbone_config(self, resolution: int) -> BackboneConfig:
        """The diffusion backbone's settings at ``resolution``."""
        return BackboneConfig(resolution=resolution, timestep=self.timestep, seed=self.seed,
                              noise_source=self.noise_source, noise_file=self.noise_file,
                              unet_dtype=self.unet_dtype, matmul_precision=self.backbone_precision)

    @property
    def resolved_upsampling(self) -> str:
        """The upsampling actually used: the explicit choice, else the method's own."""
        if self.upsampling is not None:
            return self.upsampling
        return "soft_labels" if self.method == "spark" else "concept"

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON, holding only the selected method's hyperparameters (so that a run of one
        method never depends on another method's settings, and a resumed run compares what matters)."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as a reloaded file has them
        for method, names in METHOD_FIELDS.items():
            if method != self.method:
                for name in names:
                    d.pop(name, None)
        d["upsampling"] = self.resolved_upsampling
        return d


# RunConfig fields that belong to one method (recorded, and compared on resume, only when it runs).
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "spark": ("spark", "spark_preset"),
    "diffcut": ("ncut",),
    "autosc": ("autosc",),
    "kmeans": ("kmeans", "kmeans_k", "kmeans_unlabelled_k", "kmeans_seed"),
}


# ----------------------------------------------------------------------------------------------- backbones
def find_cached_checkpoint(repo_id: str = SSD1B_REPO) -> str | None:
    """The newest local Hugging Face cache snapshot of ``repo_id`` holding a UNet, or None."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    snapshots = os.path.join(hub, "models--" + repo_id.replace("/", "--"), "snapshots")
    if not os.path.isdir(snapshots):
        return None
    cands = [os.path.join(snapshots, s) for s in os.listdir(snapshots)]
    cands = [c for c in cands if os.path.isdir(os.path.join(c, "unet"))]
    return max(cands, key=os.path.getmtime) if cands else None


_HOW_TO_GET_SSD1B = (
    "No SSD-1B checkpoint found: pass --checkpoint=/path/to/SSD-1B (a diffusers folder with unet/, vae/, "
    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), or download it once into the "
    "Hugging Face cache with `huggingface-cli download segmind/SSD-1B` (about 9 GB; "
    "https://huggingface.co/segmind/SSD-1B). To run without weights use --backbone=handcrafted (a weights-free "
    "demo/CI backbone, NOT the paper's) or --dataset=demo."
)


class ResolvedBackbone(NamedTuple):
    """A loaded feature extractor and how its features are identified.

    Attributes:
        backbone: object with ``extract_features(images [B, H, W, 3] uint8) -> [B, h, w, C]`` (and optionally
            ``extract_features_prepared``) and a ``resolution``.
        key: identifies its features in the feature cache (backbone kind, checkpoint and settings).
        description: human-readable, recorded in ``metrics.json``.
        kind: ``ssd1b`` or ``handcrafted`` (selects the default SPARK preset).
    """

    backbone: Any
    key: str
    description: str
    kind: str = "user"


def backbone_kind(cfg: RunConfig) -> tuple[str, str | None]:
    """``(kind, checkpoint)`` of the backbone ``cfg`` selects, without loading it: ``auto`` is SSD-1B from
    ``cfg.checkpoint`` or the Hugging Face cache, else the handcrafted backbone for the demo.

    Raises:
        BackboneNotFoundError: no checkpoint where one is needed; the message says how to get SSD-1B.
    """
    checkpoint, kind = cfg.checkpoint, cfg.backbone
    if kind == "handcrafted":
        return kind, checkpoint
    if checkpoint is None:
        checkpoint = find_cached_checkpoint()
    if kind == "auto":
        if checkpoint is None and cfg.dataset == "demo":
            return "handcrafted", None
        kind = "ssd1b"
    if checkpoint is None:
        raise BackboneNotFoundError(_HOW_TO_GET_SSD1B)
    return kind, checkpoint


def resolve_spark(cfg: RunConfig, kind: str) -> RunConfig:
    """``cfg`` with SPARK's settings made concrete: ``cfg.spark`` if given, else the preset ``cfg.spark_preset``
    names (``auto``: the backbone kind's own); ``spark_preset`` then names the preset used, or ``custom``."""
    name = cfg.spark_preset if cfg.spark_preset not in ("auto", "custom") else preset_for_backbone(kind)
    if cfg.spark is None:
        return dataclasses.replace(cfg, spark=SPARK_PRESETS[name].config, spark_preset=name)
    same = [name] if SPARK_PRESETS[name].config == cfg.spark else [
        n for n, p in SPARK_PRESETS.items() if p.config == cfg.spark]
    return dataclasses.replace(cfg, spark_preset=same[0] if same else "custom")


def resolve_backbone(cfg: RunConfig) -> ResolvedBackbone:
    """Loads the backbone ``cfg`` selects (see :class:`RunConfig`); pass it to several :func:`run` calls to load
    a checkpoint once.

    Raises:
        BackboneNotFoundError: no checkpoint where one is needed; the message says how to get SSD-1B.
    """
    return ResolvedBackbone(*_resolve_backbone(cfg))


def _resolve_backbone(cfg: RunConfig):
    """Returns ``(backbone, key, description, kind)``; ``key`` identifies its features in the feature cache."""
    kind, checkpoint = backbone_kind(cfg)
    if kind == "handcrafted":
        hc = HandcraftedConfig(resolution=cfg.resolution or 256)
        key = "handcrafted-" + _digest(repr(hc))
        return HandcraftedBackbone(hc), key, f"handcrafted (weights-free demo backbone), {hc}", kind
    if not os.path.isdir(checkpoint):
        raise BackboneNotFoundError(f"--checkpoint={checkpoint!r} is not a folder. " + _HOW_TO_GET_SSD1B)
    bcfg = cfg.backbone_config(cfg.resolution or 1024)
    noise = "" if bcfg.noise_file is None else _file_digest(bcfg.noise_file)  # the draw, not just its path
    key = "diffusion-" + _digest(os.path.abspath(checkpoint) + repr(bcfg) + noise)
    return load_backbone(checkpoint, bcfg), key, f"diffusion backbone from {checkpoint}, {bcfg}", kind


def _backbone_resolution(backbone) -> int:
    if hasattr(backbone, "resolution"):
        return int(backbone.resolution)
    return int(backbone.cfg.resolution)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:12]
    except OSError:
        return "unreadable"  # load_backbone names the problem


def _image_digest(image: np.ndarray) -> str:
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- methods
class MethodInputs(NamedTuple):
    """What a method sees of one batch (leading axis B; all device arrays, static shapes).

    Attributes:
        features: float [B, h, w, C], the backbone's token features.
        images: float32 [B, S, S, 3], the prepared backbone inputs in [0, 1].
        num_classes: int32 [B], K*: the number of classes present in the image's label map as the protocol
            scores it (:func:`classes_present`); 0 for an unlabelled image. Only oracle baselines read it.
        index: int32 [B], each image's position in the dataset (seeds per-image randomness, so results do not
            depend on batching or resuming).
    """

    features: jax.Array
    images: jax.Array
    num_classes: jax.Array
    index: jax.Array


# A method: (MethodInputs, hyperparameters pytree) -> (labels int32 [B, m, m] at the mask size,
# diagnostics {name: [B] numeric}). The hyperparameters are a jit *argument*: numeric ones are traced leaves,
# so a sweep over them compiles once; structural ones live in the pytree's static metadata.
Method = Callable[[MethodInputs, Any], tuple[jax.Array, dict[str, jax.Array]]]


class MethodSpec(NamedTuple):
    """A registered method.

    Attributes:
        build: ``(mask_size, upsampling) -> Method``; jitted once per process for each key.
        params: ``(RunConfig, token grid (h, w)) -> hyperparameters pytree``, on the host; raises ValueError on
            settings that cannot work on that grid.
    """

    build: Callable[[int, str], Method]
    params: Callable[[RunConfig, tuple[int, int]], Any]


def _spark_build(mask_size: int, upsampling: str) -> Method:
    """SPARK (Eq. 1-12) via :func:`spark_jax.pipeline.segment_features`, *without* PAMR: the reference applies
    PAMR after the many-to-one background merge, which needs the ground truth, so the evaluator runs it (see
    :func:`spark_jax.evaluation.score_image`'s ``refine``). ``params`` is the PipelineConfig."""
    del mask_size, upsampling  # carried by the PipelineConfig (static fields)

    def method(inputs: MethodInputs, pcfg: PipelineConfig):
        seg = segment_features(inputs.features, inputs.images, pcfg)
        tok = seg.tokens
        diag = {
            "num_clusters": tok.num_clusters,
            "num_segments": tok.num_segments,
            "mcl_iterations": tok.mcl_iterations,
            "mcl_converged": tok.mcl_converged,
            "num_nonfinite_tokens": tok.num_nonfinite_tokens,
        }
        return seg.labels, diag

    return method


def _spark_params(cfg: RunConfig, grid: tuple[int, int]) -> PipelineConfig:
    cfg.spark.check_values()
    return PipelineConfig(spark=cfg.spark, mask_size=(cfg.mask_size, cfg.mask_size),
                          upsampling=cfg.resolved_upsampling, pamr=None)


def _concept_masks(features: jax.Array, token_labels: jax.Array, num_labels: int, mask_size: int) -> jax.Array:
    """DiffCut's concept assignment of token labels [B, h, w] in [0, num_labels) to masks [B, m, m]."""
    assign = functools.partial(concept_assignment, num_labels=num_labels, size=(mask_size, mask_size))
    return jax.vmap(assign)(features, token_labels)


def _diffcut_build(mask_size: int, upsampling: str) -> Method:
    """DiffCut: recursive Normalized Cut (DiffCut Sec. 3.2, Algorithm 1), then concept assignment (Sec. 3.3).
    ``params`` is the NCutConfig."""

    def method(inputs: MethodInputs, ncfg: NCutConfig):
        res = recursive_ncut_batch(inputs.features, ncfg)  # image by image: see its docstring
        _, h, w, _ = inputs.features.shape
        bound = h * w if ncfg.max_segments is None else min(ncfg.max_segments, h * w)  # labels lie in [0, bound)
        labels = _concept_masks(inputs.features, res.labels, bound, mask_size)
        diag = {
            "num_segments": res.num_segments,
            "num_labels": res.num_labels,  # below num_segments only when segment_codes='float32' collides
            "num_eigensolves": res.num_eigensolves,
            "truncated": res.truncated,
            "num_nonfinite_tokens": res.num_nonfinite_tokens,
        }
        return labels, diag

    return method


def _diffcut_params(cfg: RunConfig, grid: tuple[int, int]) -> NCutConfig:
    cfg.ncut.check_values()
    return cfg.ncut


def _autosc_build(mask_size: int, upsampling: str) -> Method:
    """AutoSC: k-way spectral clustering with k and alpha from the largest relative eigengap (DiffCut Sec. 4.3),
    then concept assignment. ``params`` is the AutoSCConfig."""

    def method(inputs: MethodInputs, acfg: AutoSCConfig):
        _, h, w, _ = inputs.features.shape
        res = autosc_batch(inputs.features, acfg)
        bound = h * w if acfg.max_clusters is None else min(acfg.max_clusters, h * w)  # labels lie in [0, bound)
        labels = _concept_masks(inputs.features, res.labels, bound, mask_size)
        diag = {
            "num_clusters": res.num_clusters,
            "num_segments": res.num_segments,
            "alpha": res.alpha,
            "eigengap": res.eigengap,
            "truncated": res.truncated,
            "num_nonfinite_tokens": res.num_nonfinite_tokens,
        }
        return labels, diag

    return method


def _autosc_params(cfg: RunConfig, grid: tuple[int, int]) -> AutoSCConfig:
    return cfg.autosc


class KMeansParams(NamedTuple):
    """The K-means method's hyperparameters (a pytree: K, the fallback K and the seed are traced).

    Attributes:
        kmeans: KMeansConfig, ``max_clusters`` lowered to the token count if larger.
        k: int32 [], the fixed K, or 0 for K* from the ground truth.
        unlabelled_k: int32 [], K of images without ground truth when ``k == 0``.
        seed: int32 [], seed of the k-means++ initialisation.
    """

    kmeans: KMeansConfig
    k: jax.Array
    unlabelled_k: jax.Array
    seed: jax.Array


def _kmeans_build(mask_size: int, upsampling: str) -> Method:
    """K-means on the (L2-normalised) token features, K fixed or K* from the ground truth (DiffCut App. F,
    Table 9), then concept assignment. ``params`` is a KMeansParams."""

    def method(inputs: MethodInputs, p: KMeansParams):
        bound = p.kmeans.max_clusters
        wanted = jnp.where(p.k > 0, p.k, jnp.where(inputs.num_classes > 0, inputs.num_classes, p.unlabelled_k))
        num = jnp.clip(wanted, 1, bound).astype(jnp.int32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(p.seed), i))(inputs.index)
        res = jax.vmap(kmeans_tokens, in_axes=(0, 0, 0, None))(inputs.features, num, keys, p.kmeans)
        labels = _concept_masks(inputs.features, res.labels, bound, mask_size)
        present = jax.vmap(lambda lab: jnp.bincount(lab.ravel(), length=bound) > 0)(res.labels)
        nonfinite = jnp.sum(~jnp.all(jnp.isfinite(inputs.features), axis=-1), axis=(1, 2)).astype(jnp.int32)
        diag = {
            "num_clusters": num,
            "num_segments": jnp.sum(present, axis=1).astype(jnp.int32),
            "k_clipped": wanted > bound,
            "num_iters": res.num_iters,
            "converged": res.converged,
            "inertia": res.inertia,
            "num_nonfinite_tokens": nonfinite,
        }
        return labels, diag

    return method


def _kmeans_params(cfg: RunConfig, grid: tuple[int, int]) -> KMeansParams:
    tokens = grid[0] * grid[1]
    if isinstance(cfg.kmeans_k, int) and cfg.kmeans_k > tokens:
        raise ValueError(f"kmeans_k={cfg.kmeans_k} exceeds the {grid[0]}x{grid[1]}={tokens} tokens of the "
                         "feature grid")
    k = 0 if cfg.kmeans_k == "gt" else cfg.kmeans_k
    return KMeansParams(cfg.kmeans.replace(max_clusters=min(cfg.kmeans.max_clusters, tokens)), np.int32(k),
                        np.int32(cfg.kmeans_unlabelled_k), np.int32(cfg.kmeans_seed))


# name -> MethodSpec. Every method shares the backbone, the feature cache, the background merge, PAMR and the
# scoring; only the token clustering (and its upsampling) differs.
METHODS: dict[str, MethodSpec] = {
    "spark": MethodSpec(_spark_build, _spark_params),
    "diffcut": MethodSpec(_diffcut_build, _diffcut_params),
    "autosc": MethodSpec(_autosc_build, _autosc_params),
    "kmeans": MethodSpec(_kmeans_build, _kmeans_params),
}


@functools.lru_cache(maxsize=32)
def _jitted_method(name: str, mask_size: int, upsampling: str) -> Callable:
    """METHODS[name] jitted once per process: runs that differ in hyperparameters, PAMR, dataset or output
    share its compilations (hyperparameters are traced arguments)."""
    return jax.jit(METHODS[name].build(mask_size, upsampling))


def classes_present(label: np.ndarray, space: LabelSpace, protocol: str) -> int:
    """K*: the number of classes present in a label map [h, w] (reader ids) as ``protocol`` scores it.

    Void pixels do not count, except where the protocol scores them as a class (``diffcut``: VOC-style void is
    background, ADE20K's "other" is class 0).
    """
    spec = protocol_labels(space, protocol)
    rows = spec.fix_void(label)
    valid = (rows >= 0) & (rows < len(spec.class_names))
    return int(np.unique(rows[valid]).size)


# ----------------------------------------------------------------------------------------------- file helpers
class OutputPathError(OSError):
    """The output folder cannot be written (a file in the way, no permission, disk full); says which path and
    what to do."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose another --output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output_dir",
    errno.EACCES: "permission denied: make the folder writable or choose another --output_dir",
    errno.EPERM: "permission denied: make the folder writable or choose another --output_dir",
    errno.EROFS: "the file system is read-only: choose another --output_dir",
    errno.ENOTDIR: "a file is in the way of a folder: remove it or choose another --output_dir",
    errno.EEXIST: "a file is in the way of a folder: remove it or choose another --output_dir",
}


def _output_error(path: str, err: OSError) -> OutputPathError:
    fix = _OS_FIXES.get(err.errno, "check the path or choose another --output_dir")
    return OutputPathError(err.errno, f"cannot write {path!r} ({err.strerror or err}): {fix}")


def _make_output_dirs(out: str) -> None:
    for folder in (out, os.path.join(out, "predictions"), os.path.join(out, "overlays")):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputPathError(errno.ENOTDIR, f"--output_dir: {folder!r} is a file, not a folder: remove it "
                                                 "or choose another --output_dir")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise _output_error(folder, err) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputPathError(errno.EACCES, f"cannot write into {out!r}: permission denied; make it writable or "
                                            "choose another --output_dir")


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except OSError as err:
        with contextlib.suppress(OSError):  # never leave a half-written temporary file behind
            os.remove(tmp)
        raise _output_error(path, err) from None


def _atomic_write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def _atomic_write_png(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def _safe(image_id: str) -> str:
    return image_id.replace("/", "__").replace(os.sep, "__")


class CorruptRunError(ValueError):
    """A file of an existing run folder (results.jsonl, run_config.json) cannot be read; names the file, the line
    and the fix."""


def _check_record(rec: Any, where: str) -> None:
    """Raises CorruptRunError unless ``rec`` has the fields a resume reads, with the right types."""
    def fail(problem):
        raise CorruptRunError(f"{where}: {problem}; delete that line (the image is then recomputed) to resume")

    if not isinstance(rec, dict):
        fail(f"expected a JSON object, got {type(rec).__name__}")
    for key, kind in (("id", str), ("index", int), ("scored", bool)):
        if not isinstance(rec.get(key), kind):
            fail(f"field {key!r} missing or not a {kind.__name__} (got {rec.get(key)!r})")
    if rec["scored"]:
        lengths = set()
        for key in ("tp", "fp", "fn"):
            v = rec.get(key)
            if not (isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)):
                fail(f"field {key!r} missing or not a list of counts")
            lengths.add(len(v))
        if len(lengths) != 1:
            fail("fields 'tp', 'fp', 'fn' differ in length")
        if not (isinstance(rec.get("pixels"), int) and rec["pixels"] >= 0):
            fail("field 'pixels' missing or not a count")


def load_results(path: str) -> list[dict[str, Any]]:
    """Reads ``results.jsonl``; a torn last line (interrupted write) is dropped, duplicates keep the first.

    Raises:
        CorruptRunError: a line other than the last is not UTF-8, not JSON or lacks a field a resume needs.
    """
    if not os.path.exists(path):
        return []
    out, seen = [], set()
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for k, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = k >= len(lines) - 2  # only the last record may be torn (a crash mid-write)
        where = f"{path}: line {k + 1}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if last:
                break
            raise CorruptRunError(f"{where} is not UTF-8 text (byte {err.start}); delete that line (the image is "
                                  "then recomputed) to resume") from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if last:
                break
            raise CorruptRunError(f"{where} is not valid JSON; delete that line (the image is then recomputed) "
                                  "to resume") from None
        _check_record(rec, where)
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def _load_run_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptRunError(
            f"{path} is corrupt ({err}): the folder's results cannot be matched to a configuration. Choose another "
            "--output_dir, or, if you know its results.jsonl was made with exactly these flags, delete "
            "run_config.json to adopt them."
        ) from None
    if not (isinstance(previous, dict) and isinstance(previous.get("run"), dict)):
        raise CorruptRunError(f"{path} is not a run configuration (no 'run' object): choose another --output_dir "
                              "or delete run_config.json to adopt the folder's results")
    return previous


# ----------------------------------------------------------------------------------------------- overlays
def _palette(n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (n, 3), dtype=np.int64)
    pal[0] = (70, 70, 200)
    return pal.astype(np.uint8)


_PALETTE = _palette()


def _colour(labels: np.ndarray, ignore: int | None = None) -> np.ndarray:
    out = _PALETTE[np.asarray(labels) % len(_PALETTE)]
    if ignore is not None:
        out[np.asarray(labels) == ignore] = 0
    return out


def _overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, ignore: int) -> np.ndarray:
    """image [S, S, 3] float | prediction blend | ground-truth blend, side by side (uint8)."""
    scale = max(1, 256 // pred.shape[0])  # overlays at >= 256 px, predictions upsampled by pixel repetition

    def up(a):
        return np.repeat(np.repeat(a, scale, 0), scale, 1)

    base = np.asarray(_small_jit(image, pred.shape[0] * scale, pred.shape[1] * scale))
    base = (np.clip(base, 0, 1) * 255).astype(np.float32)
    panels = [base, 0.45 * base + 0.55 * up(_colour(pred))]
    if label is not None:
        panels.append(0.45 * base + 0.55 * up(_colour(label, ignore)))
    return np.concatenate(panels, axis=1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- the run
_refine_jit = jax.jit(refine_labels, static_argnums=(2, 3))
_prep_jit = jax.jit(prepare_image, static_argnums=1)
_small_jit = jax.jit(resize_bilinear, static_argnums=(1, 2))

def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "scipy", "pillow", "spark_jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["devices"] = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    return out



def _progress(total: int, done: int, quiet: bool, desc: str):
    """The run's progress bar (images/s and ETA from tqdm; the running mIoU as its postfix)."""
    return tqdm.tqdm(total=total, initial=done, unit="img", desc=desc, disable=quiet, dynamic_ncols=True,
                     file=sys.stderr)


class BadDataError(ValueError):
    """Images or labels of the dataset cannot be used; the message names every bad file and the fix."""


class NonFiniteFeaturesError(ValueError):
    """The backbone produced NaN/Inf features; the message gives the count per image and the likely cause."""


def _bad_data_error(bad: list, total: int) -> BadDataError:
    lines = [f"  {b.image_id}: {b.path}: {b.reason}" + (f" ({b.fix})" if getattr(b, "fix", "") else "")
             for b in bad]
    return BadDataError(
        f"{len(bad)} of {total} samples cannot be read:\n" + "\n".join(lines)
        + "\nReplace or re-extract those files, or pass --on_bad_sample=skip to leave them out (they are listed "
        "in metrics.json)."
    )


def _nonfinite_error(found: list[tuple[str, int]], tokens: int, backbone_desc: str) -> NonFiniteFeaturesError:
    listed = ", ".join(f"{i} ({n} of {tokens} tokens)" for i, n in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return NonFiniteFeaturesError(
        f"the backbone's features hold NaN/Inf: {listed}{more}. Backbone: {backbone_desc}. Likely causes: NaN or "
        "Inf weights in the checkpoint (a damaged or partial download: re-download it), or float16 overflow "
        "in the UNet (run it in float32 or bfloat16). Pass --allow_nonfinite_features to score anyway (those "
        "tokens are treated as zero vectors and counted in metrics.json)."
    )


def run(
    cfg: RunConfig,
    *,
    dataset: Dataset | None = None,
    backbone: Any | None = None,
    on_image: Callable[[str], None] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluates ``cfg.method`` on ``cfg.dataset``; resumes what ``cfg.output_dir`` already holds.

    Args:
        cfg: the run's configuration.
        dataset: use this dataset object instead of ``get_dataset(cfg.dataset, cfg.data_dir)``.
        backbone: a :class:`ResolvedBackbone` (from :func:`resolve_backbone`, to load a checkpoint once for
            several runs), or any feature extractor to use instead of the one ``cfg`` selects: an object with
            ``extract_features(images [B, H, W, 3] uint8) -> [B, h, w, C]`` and a ``resolution`` (or
            ``cfg.resolution``) attribute; ``extract_features_prepared(x [B, S, S, 3])`` is used when present.
        on_image: called with each image id once its results are persisted.
        quiet: no progress bar.

    Returns:
        The contents of ``metrics.json``.
    """
    t_start = time.perf_counter()
    ds = dataset
    if ds is None:
        kwargs = {"num_images": cfg.demo_images, "photos": cfg.demo_photos} if cfg.dataset == "demo" else {}
        ds = get_dataset(cfg.dataset, cfg.data_dir, **kwargs)
    space = ds.label_space
    if backbone is None:
        backbone, backbone_key, backbone_desc, kind = _resolve_backbone(cfg)
    elif isinstance(backbone, ResolvedBackbone):
        backbone, backbone_key, backbone_desc, kind = backbone
    else:
        backbone_desc = f"user-supplied {type(backbone).__name__}"
        backbone_key = "user-" + _digest(backbone_desc + repr(getattr(backbone, "cfg", "")))
        kind = "handcrafted" if isinstance(backbone, HandcraftedBackbone) else "user"
    cfg = resolve_spark(cfg, kind)
    resolution = _backbone_resolution(backbone)
    method = _jitted_method(cfg.method, cfg.mask_size, cfg.resolved_upsampling)
    executables: dict[Any, Any] = {}  # compiled method per input signature (one in practice: batches are padded)

    out = cfg.output_dir
    _make_output_dirs(out)
    ids = ds.ids
    # The run's identity: its configuration, the data folder and the list of images it reads (a resume against
    # another copy or version of the dataset is refused, not mixed in).
    config_json = {"run": cfg.to_json(), "backbone": backbone_desc, "backbone_key": backbone_key,
                   "resolution": resolution,
                   "data_dir": None if cfg.data_dir is None else os.path.realpath(cfg.data_dir),
                   "image_list": {"num_images": len(ids), "sha256": _digest("\n".join(ids))}}
    config_path = os.path.join(out, "run_config.json")
    if os.path.exists(config_path):
        previous = _load_run_config(config_path)
        keep = ("output_dir", "batch_size", "limit", "feature_cache", "num_overlays", "data_dir", "on_bad_sample",
                "allow_nonfinite_features")
        strip = lambda c: {**c, "run": {k: v for k, v in c["run"].items() if k not in keep}}  # noqa: E731
        if strip(previous) != strip(config_json):
            changed = sorted(k for k in set(strip(previous)["run"]) | set(strip(config_json)["run"])
                             if strip(previous)["run"].get(k) != strip(config_json)["run"].get(k))
            changed += [k for k in ("backbone", "backbone_key", "resolution", "data_dir", "image_list")
                        if previous.get(k) != config_json.get(k)]
            raise ValueError(
                f"{out} holds a run with another configuration (differs in: {', '.join(changed)}; see "
                f"{config_path}); resume it with the same flags and data, or choose another --output_dir."
            )
    _atomic_write_json(config_path, config_json)

    results_path = os.path.join(out, "results.jsonl")
    logged = load_results(results_path)
    # Rewrite the log without a torn tail so that appends start on a fresh line.
    if logged:
        _atomic_write_bytes(results_path, "".join(json.dumps(r) + "\n" for r in logged).encode())

    order = list(range(len(ids) if cfg.limit is None else min(cfg.limit, len(ids))))
    wanted = {ids[i] for i in order}
    # Only images of this run's selection count (a previous run may have had a larger --limit).
    records = [r for r in logged if r["id"] in wanted]
    done = {r["id"] for r in records}
    evaluator = Evaluator(space, cfg.protocol)
    for r in records:
        if r.get("scored"):
            try:
                evaluator.add_counts(r["id"], r["tp"], r["fp"], r["fn"], r["pixels"])
            except ValueError as err:
                raise CorruptRunError(f"{results_path}: the record of {r['id']!r} cannot be restored ({err}); "
                                      "delete its line (the image is then recomputed) to resume") from None
    pending = [i for i in order if ids[i] not in done]
    # Decode every pending image and label before the run: a bad file is named now, with all the others, not
    # after hours of work.
    skipped: list[dict[str, Any]] = []
    if pending and hasattr(ds, "verify"):
        bad = ds.verify(pending, progress=not quiet)
        if bad and cfg.on_bad_sample == "fail":
            raise _bad_data_error(bad, len(pending))
        bad_index = {b.index for b in bad}
        skipped = [{"id": b.image_id, "path": b.path, "reason": b.reason} for b in bad]
        pending = [i for i in pending if i not in bad_index]
    progress = _progress(len(order) - len(skipped), len(order) - len(pending) - len(skipped), quiet,
                         f"{ds.name} / {cfg.method}")

    def show(n: int) -> None:
        progress.update(n)
        if len(evaluator):
            progress.set_postfix_str(f"mIoU {100 * evaluator.result()['miou']:.1f}", refresh=False)

    via = resolution if cfg.protocol == "diffcut" else None
    timing = {"load": 0.0, "backbone": 0.0, "compile": 0.0, "method": 0.0, "score": 0.0, "write": 0.0}

    try:
        log = open(results_path, "a", encoding="utf-8")
    except OSError as err:
        raise _output_error(results_path, err) from None
    with log:
        for start in range(0, len(pending), cfg.batch_size):
            batch = pending[start : start + cfg.batch_size]
            t = time.perf_counter()
            samples: list[Sample] = []
            for i in list(batch):
                try:
                    samples.append(ds[i])
                except BadSampleError as err:  # e.g. a file that changed after the check
                    if cfg.on_bad_sample == "fail":
                        raise _bad_data_error([err], len(pending)) from None
                    skipped.append({"id": err.image_id, "path": err.path, "reason": err.reason})
                    batch.remove(i)
            if not samples:
                continue
            prepared = jnp.stack([_prep_jit(jnp.asarray(s.image), resolution) for s in samples])
            gts = [None if s.label is None else np.asarray(prepare_label(s.label, cfg.mask_size, via=via))
                   for s in samples]
            num_classes = [0 if g is None else classes_present(g, space, cfg.protocol) for g in gts]
            timing["load"] += time.perf_counter() - t

            t = time.perf_counter()
            feats = _features(backbone, backbone_key, cfg, samples, prepared)
            # One small reduction per batch (the method syncs on its outputs anyway).
            nonfinite = np.asarray(jnp.sum(~jnp.all(jnp.isfinite(feats), axis=-1), axis=(1, 2)))
            timing["backbone"] += time.perf_counter() - t
            if nonfinite.any() and not cfg.allow_nonfinite_features:
                found = [(s.image_id, int(n)) for s, n in zip(samples, nonfinite) if n]
                raise _nonfinite_error(found, feats.shape[1] * feats.shape[2], backbone_desc)

            # Pad a short last batch with copies so that the method compiles for one batch shape only.
            pad = cfg.batch_size - feats.shape[0]
            inputs = MethodInputs(
                features=_pad(feats, pad),
                images=_pad(prepared, pad),
                num_classes=_pad(jnp.asarray(num_classes, jnp.int32), pad),
                index=_pad(jnp.asarray(batch, jnp.int32), pad),
            )
            inputs = jax.block_until_ready(inputs)
            params = METHODS[cfg.method].params(cfg, tuple(feats.shape[1:3]))
            signature = (tuple((a.shape, str(a.dtype)) for a in inputs), jax.tree_util.tree_structure(params))
            if signature not in executables:
                t = time.perf_counter()
                executables[signature] = method.lower(inputs, params).compile()
                # One untimed warm-up call: the first execution also pays one-off allocations.
                jax.block_until_ready(executables[signature](inputs, params))
                timing["compile"] += time.perf_counter() - t
            # The clustering time: the jitted method alone, on device, waited for (no backbone, compilation,
            # PAMR or scoring). Every slot of the padded batch is computed, so a slot's share is the per-image
            # time.
            t = time.perf_counter()
            labels, diag = jax.block_until_ready(executables[signature](inputs, params))
            method_seconds = time.perf_counter() - t
            timing["method"] += method_seconds
            per_image_seconds = method_seconds / cfg.batch_size
            labels = np.asarray(labels)[: len(samples)]
            diag = {k: np.asarray(v)[: len(samples)] for k, v in diag.items()}
            small = np.asarray(_small_jit(prepared, cfg.mask_size, cfg.mask_size))

            for j, (i, s) in enumerate(zip(batch, samples)):
                t = time.perf_counter()
                pred = _contiguous(labels[j])
                refine = None
                if cfg.pamr:
                    image_small = jnp.asarray(small[j])

                    def refine(p, image_small=image_small):
                        p = _contiguous(p)
                        k = int(p.max()) + 1
                        out_ = _refine_jit(image_small, jnp.asarray(p, jnp.int32), label_capacity(k),
                                           cfg.pamr_config)
                        return np.asarray(out_)

                rec: dict[str, Any] = {"id": s.image_id, "index": int(i), "clustering_seconds": per_image_seconds,
                                       "num_classes_present": num_classes[j],
                                       "nonfinite_feature_tokens": int(nonfinite[j])}
                gt = gts[j]
                if gt is not None:
                    counts = evaluator.update(s.image_id, pred, gt, refine=refine)
                    final = counts.pred
                    if counts.pixels > 0:
                        rec.update(scored=True, tp=counts.tp.tolist(), fp=counts.fp.tolist(), fn=counts.fn.tolist(),
                                   pixels=counts.pixels)
                    else:  # every pixel void after the crop and resize: drawn and reported, not scored
                        rec.update(scored=False, unscored_reason="no valid pixel in the label map")
                else:
                    final = refine(pred) if refine is not None else pred
                    rec.update(scored=False, unscored_reason="no label map")
                timing["score"] += time.perf_counter() - t

                t = time.perf_counter()
                final = _contiguous(final)
                dtype = np.uint8 if final.max() < 256 else np.uint16
                _atomic_write_png(os.path.join(out, "predictions", _safe(s.image_id) + ".png"), final.astype(dtype))
                if i < cfg.num_overlays or s.label is None:
                    ov = _overlay(np.asarray(prepared[j]), final, gt, space.ignore_index)
                    _atomic_write_png(os.path.join(out, "overlays", _safe(s.image_id) + ".png"), ov)
                rec["diagnostics"] = {k: v[j].item() for k, v in diag.items()}
                rec["num_predicted_segments"] = int(final.max()) + 1
                try:
                    log.write(json.dumps(rec) + "\n")  # one write per record: a crash leaves at most a torn tail
                    log.flush()
                    os.fsync(log.fileno())
                except OSError as err:
                    raise _output_error(results_path, err) from None
                records.append(rec)
                timing["write"] += time.perf_counter() - t
                if on_image is not None:
                    on_image(s.image_id)
            show(len(samples))
    progress.close()

    elapsed = time.perf_counter() - t_start
    result = evaluator.result()
    diag_names = sorted({k for r in records for k in r.get("diagnostics", {})})
    clustering = np.asarray([r["clustering_seconds"] for r in records if "clustering_seconds" in r], np.float64)
    metrics = {
        "dataset": ds.name,
        "method": cfg.method,
        "protocol": cfg.protocol,
        "miou": result["miou"],
        "pixel_accuracy": result["pixel_accuracy"],
        "num_images_scored": result["num_images"],
        "num_images": len(records),
        "unscored": [{"id": r["id"], "reason": r.get("unscored_reason", "no label map")}
                     for r in records if not r.get("scored")],
        "skipped": skipped,
        "nonfinite_features": {
            "allowed": cfg.allow_nonfinite_features,
            "num_images": sum(1 for r in records if r.get("nonfinite_feature_tokens", 0) > 0),
            "num_tokens": sum(r.get("nonfinite_feature_tokens", 0) for r in records),
        },
        "per_class_iou": result["per_class_iou"],
        "diagnostics_mean": {
            k: float(np.mean([r["diagnostics"][k] for r in records if k in r.get("diagnostics", {})]))
            for k in diag_names
        },
        "clustering_seconds_per_image": {
            "mean": float(np.mean(clustering)) if clustering.size else None,
            "median": float(np.median(clustering)) if clustering.size else None,
            "num_images": int(clustering.size),
            "batch_size": cfg.batch_size,
            "what": "the jitted method call (token clustering + upsampling to the mask size) on device, per "
                    "image (batch time / batch size); excludes the backbone, compilation, PAMR and scoring",
        },
        "config": config_json,
        "versions": _versions(),
        "timing": {
            "this_session_seconds": elapsed,
            "note": "stage 'compile' includes one warm-up call of the method",
            "images_this_session": len(pending),
            "images_per_second": len(pending) / elapsed if elapsed > 0 and pending else None,
            "stage_seconds": timing,
        },
        "spark_preset": ({"name": cfg.spark_preset,
                          "how_chosen": SPARK_PRESETS[cfg.spark_preset].how_chosen
                          if cfg.spark_preset in SPARK_PRESETS else "explicit settings (flags or a SparkConfig)"}
                         if cfg.method == "spark" else None),
        "notes": [n for n in (getattr(ds, "note", ""),) if n],
        "output_dir": os.path.abspath(out),
        "overlays": os.path.abspath(os.path.join(out, "overlays")),
    }
    _atomic_write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


def _pad(x: jax.Array, pad: int) -> jax.Array:
    """Appends ``pad`` copies of the last entry along axis 0."""
    return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0) if pad else x


def _contiguous(pred: np.ndarray) -> np.ndarray:
    """Cluster ids as ranks of the sorted ids present (what DiffCut's PAMR step hands the evaluator)."""
    _, inverse = np.unique(np.asarray(pred), return_inverse=True)
    return inverse.reshape(np.shape(pred)).astype(np.int64)


def _read_cached_features(paths: list[str]) -> np.ndarray | None:
    """The cached features of a batch, or None (with a warning naming the entry) when one cannot be used: it is
    then rebuilt from the backbone and rewritten."""
    arrays = []
    for p in paths:
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            warnings.warn(f"feature cache entry {p} is unreadable ({err}); recomputing it", RuntimeWarning,
                          stacklevel=3)
            return None
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating) or (arrays and a.shape != arrays[0].shape):
            warnings.warn(f"feature cache entry {p} holds a {a.dtype} array of shape {a.shape}, not the [h, w, C] "
                          "float features of its batch; recomputing it", RuntimeWarning, stacklevel=3)
            return None
        arrays.append(a)
    return np.stack(arrays)


def _features(backbone, key: str, cfg: RunConfig, samples: list[Sample], prepared: jax.Array) -> jax.Array:
    """Backbone features of a batch, from and into the feature cache when one is configured."""
    paths = None
    if cfg.feature_cache:
        folder = os.path.join(cfg.feature_cache, key, cfg.dataset)
        os.makedirs(folder, exist_ok=True)
        # The image's content is part of the key: a changed file never reuses stale features.
        paths = [os.path.join(folder, f"{_safe(s.image_id)}-{_image_digest(s.image)}.npy") for s in samples]
        if all(os.path.exists(p) for p in paths):
            cached = _read_cached_features(paths)
            if cached is not None:
                return jnp.asarray(cached)
    if hasattr(backbone, "extract_features_prepared"):
        feats = backbone.extract_features_prepared(prepared)
    else:
        # The diffusion backbone preprocesses raw images itself: batch images of one shape together.
        parts, k = [], 0
        while k < len(samples):
            shape = samples[k].image.shape
            m = k
            while m < len(samples) and samples[m].image.shape == shape:
                m += 1
            parts.append(backbone.extract_features(np.stack([s.image for s in samples[k:m]])))
            k = m
        feats = jnp.concatenate(parts, axis=0)
    if paths is not None:
        host = np.asarray(feats)
        for p, f in zip(paths, host):
            buf = io.BytesIO()
            np.save(buf, f)
            _atomic_write_bytes(p, buf.getvalue())
    return feats
