"""End-to-end SPARK: images -> backbone features -> token segmentation -> masks -> PAMR.

`segment(images, backbone, cfg)` runs the backbone's jitted feature extractor and then one
jitted, vmapped `segment_features` on device (no host round-trip in between). The paper's
ablation switches are fields of `PipelineConfig`: global only vs global + local
(`spark.use_local`), PAMR on/off (`pamr=None`), inflation and beta (`spark.inflation`,
`spark.beta`), and the upsampling (SPARK's soft labels or DiffCut's concept assignment).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from spark_jax.config import SparkConfig
from spark_jax.markov_flow import relabel_contiguous
from spark_jax.pamr import PamrConfig, refine_labels
from spark_jax.preprocess import prepare_image, resize_bilinear
from spark_jax.spark import SegmentResult, num_label_columns, segment_tokens
from spark_jax.upsample import concept_assignment, upsample_labels

Upsampling = Literal["soft_labels", "concept"]


class FeatureBackbone(Protocol):
    """What `segment` needs of a backbone (the diffusion one, or the handcrafted demo one)."""

    @property
    def resolution(self) -> int: ...

    def extract_features_prepared(self, prepared: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything after the backbone.

    Attributes:
      spark: SPARK's hyperparameters (a pytree: numeric fields don't recompile).
      mask_size: (H, W) of the output masks; the evaluation protocol scores at 128 x 128.
      upsampling: 'soft_labels' (bilinear upsampling of the propagated Q*, then argmax: SPARK's
        default) or 'concept' (DiffCut's concept assignment from the features).
      pamr: PAMR settings, or None to switch PAMR off (paper Fig. 4).
      pamr_max_labels: static number of label channels PAMR refines. Labels are first renumbered
        0..S-1 in order (the same partition, so PAMR's result is unchanged), so PAMR's cost follows
        the segments present, not the M label columns of Q*. An image with more than this many
        segments is flagged in `Segmentation.pamr_overflow` (its extra segments are absorbed by
        their neighbours during PAMR).
    """

    spark: SparkConfig = SparkConfig()
    mask_size: tuple[int, int] = (128, 128)
    upsampling: Upsampling = "soft_labels"
    pamr: PamrConfig | None = PamrConfig()
    pamr_max_labels: int = 256

    def __post_init__(self):
        if self.upsampling not in ("soft_labels", "concept"):
            raise ValueError(f"upsampling must be 'soft_labels' or 'concept', got {self.upsampling!r}")
        if len(self.mask_size) != 2 or min(self.mask_size) < 1:
            raise ValueError(f"mask_size must be (height, width) >= 1, got {self.mask_size!r}")
        if not isinstance(self.pamr_max_labels, int) or self.pamr_max_labels < 1:
            raise ValueError(f"pamr_max_labels must be an int >= 1, got {self.pamr_max_labels!r}")


jax.tree_util.register_dataclass(
    PipelineConfig, data_fields=["spark"], meta_fields=["mask_size", "upsampling", "pamr", "pamr_max_labels"]
)


class Segmentation(NamedTuple):
    """Output of `segment` / `segment_features` (leading batch axis B).

    Attributes:
      labels: int32 [B, H, W], final masks (after PAMR when it is on). Ids are label columns of
        the token result, in [0, M), not necessarily contiguous.
      coarse_labels: int32 [B, H, W], the upsampled labels before PAMR.
      tokens: the token-level SegmentResult with its diagnostics (K, MCL iterations, ...).
      pamr_overflow: bool [B], the upsampled mask had more segments than `pamr_max_labels`.
    """

    labels: jax.Array
    coarse_labels: jax.Array
    tokens: SegmentResult
    pamr_overflow: jax.Array


def _one_image(features: jax.Array, image: jax.Array, cfg: PipelineConfig):
    h, w, _ = features.shape
    num_labels = num_label_columns(h * w, cfg.spark)
    tokens = segment_tokens(features, cfg.spark)
    if cfg.upsampling == "soft_labels":
        coarse = upsample_labels(tokens.soft_labels, cfg.mask_size)
    else:
        coarse = concept_assignment(features, tokens.labels, num_labels, cfg.mask_size)
    if cfg.pamr is None:
        return coarse, coarse, tokens, jnp.bool_(False)
    # PAMR sees the backbone's input image resized bilinearly to the mask size (reference eval).
    small = resize_bilinear(image, *cfg.mask_size)
    slots = min(num_labels, cfg.pamr_max_labels)
    compact, num_present = relabel_contiguous(coarse.ravel(), num_labels)
    original = jnp.zeros((num_labels,), jnp.int32).at[compact].set(coarse.ravel())
    refined = refine_labels(small, compact.reshape(coarse.shape), slots, cfg.pamr)
    return original[refined], coarse, tokens, num_present > slots


@jax.jit
def segment_features(features: jax.Array, images: jax.Array, cfg: PipelineConfig) -> Segmentation:
    """Token features [B, h, w, C] and prepared images [B, S, S, 3] in [0, 1] -> Segmentation."""
    labels, coarse, tokens, overflow = jax.vmap(_one_image, in_axes=(0, 0, None))(features, images, cfg)
    return Segmentation(labels=labels, coarse_labels=coarse, tokens=tokens, pamr_overflow=overflow)


def segment(images: jax.Array, backbone: FeatureBackbone, cfg: PipelineConfig = PipelineConfig()) -> Segmentation:
    """SPARK end to end on a batch of images [B, H, W, 3] (uint8, or float in [0, 1]) of one shape.

    The images are center-cropped and resized to the backbone's resolution exactly as the
    reference pipeline does (`preprocess.prepare_image`); masks come out at `cfg.mask_size`.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"segment expects images [B, H, W, 3] (RGB, channels last), got shape {images.shape}")
    # Prepared once, for the backbone and for PAMR's image alike.
    prepared = prepare_image(images, backbone.resolution)
    return segment_features(backbone.extract_features_prepared(prepared), prepared, cfg)
