"""The run configuration: everything one benchmark run depends on (written to ``run_config.json``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from spark_jax.backbones.diffusion import BackboneConfig
from spark_jax.config import SparkConfig
from spark_jax.evaluation import PROTOCOLS
from spark_jax.graph.ncut import NCutConfig
from spark_jax.masks.pamr import PamrConfig
from spark_jax.methods.autosc import AutoSCConfig
from spark_jax.methods.kmeans import KMeansConfig
from spark_jax.presets import SPARK_PRESETS, preset_for_backbone
from spark_jax.runner.methods import METHODS

__all__ = ["BACKBONES", "METHOD_FIELDS", "ON_BAD_SAMPLE", "RunConfig", "resolve_spark"]

# What a run does with an unreadable image or label: stop naming every bad file, or skip and list them.
ON_BAD_SAMPLE = ("fail", "skip")
BACKBONES = ("auto", "ssd1b", "handcrafted")


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



def resolve_spark(cfg: RunConfig, kind: str) -> RunConfig:
    """``cfg`` with SPARK's settings made concrete: ``cfg.spark`` if given, else the preset ``cfg.spark_preset``
    names (``auto``: the backbone kind's own); ``spark_preset`` then names the preset used, or ``custom``."""
    name = cfg.spark_preset if cfg.spark_preset not in ("auto", "custom") else preset_for_backbone(kind)
    if cfg.spark is None:
        return dataclasses.replace(cfg, spark=SPARK_PRESETS[name].config, spark_preset=name)
    same = [name] if SPARK_PRESETS[name].config == cfg.spark else [
        n for n, p in SPARK_PRESETS.items() if p.config == cfg.spark]
    return dataclasses.replace(cfg, spark_preset=same[0] if same else "custom")
