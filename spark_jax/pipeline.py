"""End-to-end SPARK: images -> backbone features -> token segmentation -> masks -> PAMR.

`segment(images, backbone, cfg)` runs the backbone's jitted feature extractor and then SPARK,
the upsampling and PAMR on device. The paper's ablation switches are fields of `PipelineConfig`:
global only vs global + local (`spark.use_local`), PAMR on/off (`pamr=None`), inflation and beta
(`spark.inflation`, `spark.beta`), and the upsampling (SPARK's soft labels or DiffCut's concept
assignment).

Validation happens on the host, before anything is traced: image and feature shapes and dtypes,
the images' value range, and the numeric SPARK hyperparameters (`SparkConfig.check_values`).
Inside jit nothing can raise on data (called from a user's own jit, only the static checks run).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.config import SparkConfig
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
from spark_jax.data.preprocess import prepare_image
from spark_jax.masks.resample import resize_bilinear
from spark_jax.graph.affinity import GlobalInputs
from spark_jax.methods.spark import (
    SegmentResult,
    check_token_features,
    global_inputs,
    num_label_columns,
    segment_tokens,
    source_taps,
)
from spark_jax.masks.upsample import concept_assignment, upsample_labels

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
      pamr_max_labels: how many segments PAMR refines (its cost is linear in them). None (the
        default) never drops one: `segment` counts the segments of the upsampled masks on the host
        and gives PAMR `pamr.label_capacity(count)` slots (a power of two, so few compilations);
        `segment_features`, one jitted program, gives it one slot per label column (M). An int is
        a fixed capacity inside one program: an image with more segments keeps its
        `pamr_max_labels` largest ones (`pamr.keep_largest_segments`); the smaller ones are absorbed
        by their neighbours during PAMR, and the image is flagged in `Segmentation.pamr_overflow`.
        The paper's defaults give ~300 segments per image on the demo data.
    """

    spark: SparkConfig = SparkConfig()
    mask_size: tuple[int, int] = (128, 128)
    upsampling: Upsampling = "soft_labels"
    pamr: PamrConfig | None = PamrConfig()
    pamr_max_labels: int | None = None

    def __post_init__(self):
        if not isinstance(self.spark, SparkConfig):
            raise TypeError(f"spark must be a SparkConfig, got {type(self.spark).__name__}")
        if self.upsampling not in ("soft_labels", "concept"):
            raise ValueError(f"upsampling must be 'soft_labels' or 'concept', got {self.upsampling!r}")
        if (
            not isinstance(self.mask_size, tuple)
            or len(self.mask_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.mask_size)
        ):
            raise ValueError(f"mask_size must be a tuple (height, width) of ints >= 1, got {self.mask_size!r}")
        if self.pamr is not None and not isinstance(self.pamr, PamrConfig):
            raise TypeError(f"pamr must be a PamrConfig or None, got {type(self.pamr).__name__}")
        if self.pamr_max_labels is not None and (
            isinstance(self.pamr_max_labels, bool) or not isinstance(self.pamr_max_labels, int) or self.pamr_max_labels < 1
        ):
            raise ValueError(f"pamr_max_labels must be None or an int >= 1, got {self.pamr_max_labels!r}")


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
      pamr_overflow: bool [B], the upsampled mask had more segments than PAMR's capacity (only
        possible with an int `pamr_max_labels`).
    """

    labels: jax.Array
    coarse_labels: jax.Array
    tokens: SegmentResult
    pamr_overflow: jax.Array


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_images(
    images, *, fn: str = "segment", fix: str = "divide 0..255 values by 255 or pass them as uint8"
) -> None:
    """What `segment` (like `Backbone.extract_features`) accepts: [B, H, W, 3] RGB, uint8 in
    [0, 255] or floating in [0, 1]. Other dtypes and out-of-range (or NaN) floats are refused,
    never rescaled; the range is checked on the host when the values are concrete."""
    shape, dtype = tuple(np.shape(images)), images.dtype
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"{fn} expects images [B, H, W, 3] (RGB, channels last), got shape {shape}; add a batch axis "
            "(images[None]) or move channels last"
        )
    if shape[0] < 1 or min(shape[1:3]) < 2:
        raise ValueError(f"{fn} expects at least one image of at least 2 x 2 pixels, got shape {shape}")
    if dtype != jnp.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{fn} expects uint8 images in [0, 255] or floating images in [0, 1], got dtype {dtype}; convert "
            "0..255 integer values with .astype(np.uint8), or scale to [0, 1] floats"
        )
    if dtype != jnp.uint8 and _is_concrete(images):
        xp = np if isinstance(images, np.ndarray) else jnp
        lo, hi = float(xp.min(images)), float(xp.max(images))
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both
            got = f"values in [{lo:g}, {hi:g}]" if np.isfinite(lo) and np.isfinite(hi) else "NaN/Inf values"
            raise ValueError(f"{fn} expects floating images in [0, 1], got {dtype} {got}; {fix}")


def _num_segments(labels: jax.Array, num_labels: int) -> jax.Array:
    return jnp.sum(jnp.zeros((num_labels,), jnp.int32).at[labels.ravel()].set(1))


def _coarse_one(features: jax.Array, cfg: PipelineConfig, extra: GlobalInputs) -> tuple[jax.Array, SegmentResult]:
    h, w, _ = features.shape
    num_labels = num_label_columns(h * w, cfg.spark)
    tokens = segment_tokens(features, cfg.spark, **extra._asdict())
    if cfg.upsampling == "soft_labels":
        coarse = upsample_labels(tokens.soft_labels, cfg.mask_size)
    else:
        coarse = concept_assignment(features, tokens.labels, num_labels, cfg.mask_size)
    return coarse, tokens


def _refine_one(image: jax.Array, coarse: jax.Array, num_labels: int, capacity: int, cfg: PipelineConfig):
    # PAMR sees the backbone's input image resized bilinearly to the mask size (reference eval).
    small = resize_bilinear(image, *cfg.mask_size)
    refined = refine_labels(small, coarse, num_labels, cfg.pamr, capacity=capacity)
    return refined, _num_segments(coarse, num_labels) > capacity


def _one_image(features: jax.Array, image: jax.Array, cfg: PipelineConfig, extra: GlobalInputs):
    coarse, tokens = _coarse_one(features, cfg, extra)
    if cfg.pamr is None:
        return coarse, coarse, tokens, jnp.bool_(False)
    h, w, _ = features.shape
    num_labels = num_label_columns(h * w, cfg.spark)
    capacity = num_labels if cfg.pamr_max_labels is None else min(num_labels, cfg.pamr_max_labels)
    refined, overflow = _refine_one(image, coarse, num_labels, capacity, cfg)
    return refined, coarse, tokens, overflow


def _check_pipeline_inputs(features, images, cfg, fn: str) -> None:
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"{fn} expects cfg to be a PipelineConfig, got {type(cfg).__name__}")
    check_token_features(features, rank=4, fn=fn)
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3 or shape[0] != np.shape(features)[0]:
        raise ValueError(
            f"{fn} expects prepared images [B, S, S, 3] with the features' B = {np.shape(features)[0]}, got "
            f"shape {shape}; prepare them with preprocess.prepare_image"
        )
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{fn} expects prepared float images in [0, 1] (preprocess.prepare_image), got {images.dtype}")
    check_images(images, fn=fn, fix="prepare them with preprocess.prepare_image")
    cfg.spark.check_values()


def segment_features(features: jax.Array, images: jax.Array, cfg: PipelineConfig, *,
                     attention: jax.Array | None = None, queries: jax.Array | None = None,
                     keys: jax.Array | None = None) -> Segmentation:
    """Token features [B, h, w, C] and prepared images [B, S, S, 3] in [0, 1] -> Segmentation.

    One jitted, vmapped program. With `cfg.pamr_max_labels=None` PAMR gets one slot per label
    column (exact, and its cost follows M); `segment` sizes it from the data instead.
    `attention` [B, N, N] or `queries`/`keys` [B, heads, N, d]: what `cfg.spark.global_source`
    needs besides the features (`spark.segment_tokens`).

    Raises:
      ValueError/TypeError: bad shapes, dtypes or (concrete) values, named; see `check_images` and
        `SparkConfig.check_values`.
    """
    _check_pipeline_inputs(features, images, cfg, "segment_features")
    extra = global_inputs(cfg.spark, np.shape(features), "segment_features", attention=attention, queries=queries,
                          keys=keys)
    return _segment_features_jit(features, images, cfg, extra)


@jax.jit
def _segment_features_jit(features: jax.Array, images: jax.Array, cfg: PipelineConfig,
                          extra: GlobalInputs = GlobalInputs()) -> Segmentation:
    labels, coarse, tokens, overflow = jax.vmap(_one_image, in_axes=(0, 0, None, 0))(features, images, cfg, extra)
    return Segmentation(labels=labels, coarse_labels=coarse, tokens=tokens, pamr_overflow=overflow)


@jax.jit
def _coarse_batch(features: jax.Array, cfg: PipelineConfig,
                  extra: GlobalInputs) -> tuple[jax.Array, SegmentResult, jax.Array]:
    coarse, tokens = jax.vmap(_coarse_one, in_axes=(0, None, 0))(features, cfg, extra)
    h, w = features.shape[1:3]
    num_labels = num_label_columns(h * w, cfg.spark)
    return coarse, tokens, jax.vmap(_num_segments, in_axes=(0, None))(coarse, num_labels)


@functools.partial(jax.jit, static_argnames=("num_labels", "capacity"))
def _refine_batch(images, coarse, cfg: PipelineConfig, *, num_labels: int, capacity: int) -> jax.Array:
    return jax.vmap(lambda i, c: _refine_one(i, c, num_labels, capacity, cfg)[0])(images, coarse)


def segment(images: jax.Array, backbone: FeatureBackbone, cfg: PipelineConfig = PipelineConfig()) -> Segmentation:
    """SPARK end to end on a batch of images [B, H, W, 3] (uint8, or float in [0, 1]) of one shape.

    The images are center-cropped and resized to the backbone's resolution exactly as the
    reference pipeline does (`preprocess.prepare_image`); masks come out at `cfg.mask_size`.
    With PAMR on and `cfg.pamr_max_labels=None`, SPARK and the upsampling run as one jitted
    program, the largest per-image segment count comes back to the host (one scalar), and PAMR
    runs as a second program with `pamr.label_capacity(count)` slots: exact, at a cost that
    follows the segments present.

    Raises:
      ValueError/TypeError: images not [B, H, W, 3] uint8 or float in [0, 1] (named, never
        rescaled), or a numeric SPARK hyperparameter out of range.
    """
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    check_images(images, fn="segment")
    if not isinstance(cfg, PipelineConfig):
        raise TypeError(f"segment expects cfg to be a PipelineConfig, got {type(cfg).__name__}")
    cfg.spark.check_values()
    # Prepared once, for the backbone and for PAMR's image alike.
    prepared = prepare_image(jnp.asarray(images), backbone.resolution)
    if cfg.spark.global_source == "features":
        features = backbone.extract_features_prepared(prepared)
        extra = GlobalInputs()
    else:
        # The feature tap and, from the same attention, what the global source reads (one forward).
        wanted = source_taps(cfg.spark, backbone.feature_tap)
        taps = backbone.extract_prepared(prepared, (backbone.feature_tap, *wanted.values()))
        features = taps[backbone.feature_tap].reshape(
            taps[backbone.feature_tap].shape[0], *backbone.tap_grid(backbone.feature_tap), -1)
        extra = GlobalInputs(**{name: taps[tap] for name, tap in wanted.items()})
    check_token_features(features, rank=4, fn="segment (the backbone's features)")
    extra = global_inputs(cfg.spark, np.shape(features), "segment (the backbone's taps)", **extra._asdict())
    if cfg.pamr is None or cfg.pamr_max_labels is not None:
        return _segment_features_jit(features, prepared, cfg, extra)  # inputs checked above
    coarse, tokens, num_segments = _coarse_batch(features, cfg, extra)
    num_labels = num_label_columns(features.shape[1] * features.shape[2], cfg.spark)
    capacity = min(num_labels, label_capacity(int(jnp.max(num_segments))))
    labels = _refine_batch(prepared, coarse, cfg, num_labels=num_labels, capacity=capacity)
    return Segmentation(
        labels=labels, coarse_labels=coarse, tokens=tokens, pamr_overflow=jnp.zeros(labels.shape[:1], jnp.bool_)
    )
