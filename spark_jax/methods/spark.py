"""SPARK on token features: affinity -> Markov-flow clustering -> label propagation.

`segment_tokens` is the whole method at token resolution (Eq. 1-12) as one jitted program;
`segment_tokens_batch` is its vmap over images. Both take the config as a pytree, so changing a
numeric hyperparameter (inflation, beta, ...) does not recompile.

Validation: both check the features' shape and dtype and the config's numeric values on the
host, then run the jitted program. Called inside a user's own jit/vmap they still check shapes
(static), but config leaves are tracers there and are skipped, and nothing can raise on data:
non-finite tokens are segmented as zero vectors and counted (`check_features` rejects them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.affinity import GlobalInputs, finite_tokens, transition_matrix
from spark_jax.config import SparkConfig
from spark_jax.graph.markov_flow import extract_clusters, markov_flow
from spark_jax.graph.propagation import propagate_labels, seed_matrix
from spark_jax.graph.sparse_flow import extract_sparse_clusters, sparse_markov_flow
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec, Variant
from spark_jax.presets import SPARK_PRESETS, preset_for_backbone
from spark_jax.sharding import per_image_map


class SegmentResult(NamedTuple):
    """SPARK's token-level segmentation and its diagnostics (add a leading batch axis when batched).

    Attributes:
      labels: int32 [h, w], final labels (Eq. 12): a column index of `soft_labels`, in [0, M).
        Ids need not be contiguous: a coarse cluster can lose all its tokens in propagation.
      soft_labels: float32 [h, w, M], the propagated Q* (Eq. 11); M = cfg.max_clusters or h*w.
        This is what SPARK upsamples bilinearly to the mask size.
      cluster_labels: int32 [h, w], the coarse Markov-flow clusters (Eq. 9), contiguous 0..K-1.
      num_clusters: int32 [], K, the number of coarse clusters.
      num_segments: int32 [], the number of distinct final labels.
      mcl_iterations: int32 [], iterations of Eq. 8.
      mcl_converged: bool [], whether Eq. 8 met its tolerance before the cap.
      propagation_iterations: int32 [], fixed-point iterations of Eq. 10 (0 for the closed form).
      propagation_converged: bool [].
      num_nonfinite_tokens: int32 [], tokens whose features held NaN/Inf. They are segmented as
        zero vectors (no affinity to anything in the cosine mode); callers that must not accept
        such input should call `check_features` first.
    """

    labels: jax.Array
    soft_labels: jax.Array
    cluster_labels: jax.Array
    num_clusters: jax.Array
    num_segments: jax.Array
    mcl_iterations: jax.Array
    mcl_converged: jax.Array
    propagation_iterations: jax.Array
    propagation_converged: jax.Array
    num_nonfinite_tokens: jax.Array


def num_label_columns(num_tokens: int, cfg: SparkConfig) -> int:
    """M, the static number of label columns of Q for a grid of `num_tokens` tokens."""
    return num_tokens if cfg.max_clusters is None else min(cfg.max_clusters, num_tokens)


_LAYOUTS = {3: "[h, w, C]", 4: "[B, h, w, C]"}
_RANK_HINTS = {
    (3, 4): " (a batch: use segment_tokens_batch)",
    (4, 3): " (one image: add a batch axis, features[None], or use segment_tokens)",
    (3, 2): " (flattened tokens: reshape them to the token grid [h, w, C])",
    (4, 2): " (flattened tokens: reshape them to the token grid [B, h, w, C])",
}


def check_token_features(features, *, rank: int, fn: str) -> None:
    """Shape and dtype checks of token features: rank `rank` (3: [h, w, C], 4: [B, h, w, C]),
    every axis >= 1 (C >= 1 channels), floating dtype. Works on tracers (shapes are static)."""
    shape = tuple(np.shape(features))
    layout = _LAYOUTS[rank]
    if len(shape) != rank:
        raise ValueError(
            f"{fn} expects token features {layout}, got shape {shape} (rank {len(shape)})"
            + _RANK_HINTS.get((rank, len(shape)), "")
        )
    if min(shape) == 0:
        raise ValueError(
            f"{fn}: token features are empty, shape {shape}; every axis of {layout} must be >= 1 "
            "(at least one token and one channel)"
        )
    dtype = features.dtype if hasattr(features, "dtype") else np.asarray(features).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{fn} expects floating token features, got dtype {dtype}; cast with .astype(np.float32)")


def _check_config(cfg, fn: str) -> None:
    if not isinstance(cfg, SparkConfig):
        raise TypeError(f"{fn} expects cfg to be a SparkConfig, got {type(cfg).__name__}")
    cfg.check_values()


def check_features(features: np.ndarray | jax.Array) -> None:
    """Host-side validation of token features [h, w, C] or [B, h, w, C]; raises ValueError on bad input.

    Checks what `segment_tokens` checks (shape, dtype) and, on the host, that every value is finite:
    the jitted functions cannot raise on data, so entry points that must reject NaN/Inf call this.
    """
    features = np.asarray(features)
    check_token_features(features, rank=4 if features.ndim >= 4 else 3, fn="check_features")
    bad = ~np.all(np.isfinite(features), axis=-1)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"token features hold NaN/Inf in {int(bad.sum())} of {bad.size} tokens (first at index "
            f"{first}); the backbone produced non-finite values — check the input images and the "
            "model dtype (float16 overflows are the usual cause; use float32 or bfloat16)."
        )


# What each global source needs besides the features (SparkConfig.global_source), and the taps holding it.
SOURCE_INPUTS = {"features": (), "attention": ("attention",), "qk_cosine": ("queries", "keys")}
SOURCE_TAPS = {"attention": ("probs_mean",), "queries": ("q",), "keys": ("k",)}


def source_taps(cfg: SparkConfig, feature_tap: str) -> dict[str, str]:
    """{input name: tap name} that `cfg.global_source` reads from a backbone whose feature point is `feature_tap`
    (``<attn1 module>:output``): the same attention module's ``probs_mean`` or ``q`` and ``k``."""
    module = feature_tap.rsplit(":", 1)[0]
    return {name: f"{module}:{SOURCE_TAPS[name][0]}" for name in SOURCE_INPUTS[cfg.global_source]}


def global_inputs(cfg: SparkConfig, features_shape: tuple[int, ...], fn: str, *, attention=None, queries=None,
                  keys=None) -> GlobalInputs:
    """The inputs `cfg.global_source` needs, checked against the features' shape ([..., h, w, C]): exactly the
    needed ones given, attention [..., N, N], queries/keys [..., heads, N, d], the same leading axes."""
    given = {"attention": attention, "queries": queries, "keys": keys}
    need = SOURCE_INPUTS[cfg.global_source]
    lead, n = tuple(features_shape[:-3]), int(np.prod(features_shape[-3:-1]))
    for name, value in given.items():
        if name in need and value is None:
            taps = ", ".join(f"'...attn1:{t}'" for t in SOURCE_TAPS[name])
            raise ValueError(f"{fn}: global_source={cfg.global_source!r} needs `{name}` (the backbone's {taps} tap "
                             "of the feature point's attention)")
        if name not in need and value is not None:
            raise ValueError(f"{fn}: `{name}` was given but global_source={cfg.global_source!r} does not use it; "
                             f"pass SparkConfig(global_source=...) to use it, or drop it")
        if value is None:
            continue
        shape = tuple(np.shape(value))
        ok = (shape == lead + (n, n)) if name == "attention" else (len(shape) == len(lead) + 3
                                                                   and shape[:len(lead)] == lead and shape[-2] == n)
        if not ok:
            want = "[" + ", ".join([*map(str, lead), str(n), str(n)] if name == "attention"
                                   else [*map(str, lead), "heads", str(n), "d"]) + "]"
            raise ValueError(f"{fn}: `{name}` must be {want} for features of shape {tuple(features_shape)} "
                             f"({n} tokens), got {shape}")
        dtype = value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{fn}: `{name}` must be floating, got dtype {dtype}")
    if queries is not None and keys is not None and np.shape(queries) != np.shape(keys):
        raise ValueError(f"{fn}: queries {tuple(np.shape(queries))} and keys {tuple(np.shape(keys))} differ in shape")
    return GlobalInputs(attention=attention, queries=queries, keys=keys)


def segment_tokens(features: jax.Array, cfg: SparkConfig, *, attention: jax.Array | None = None,
                   queries: jax.Array | None = None, keys: jax.Array | None = None) -> SegmentResult:
    """SPARK at token resolution: features [h, w, C] -> SegmentResult.

    Builds S (Eq. 1-4), runs Markov-flow clustering to P* (Eq. 5-8), reads clusters off P*
    (Eq. 9), and propagates them over S (Eq. 10-12).

    Args:
      features: [h, w, C] token features (the attn1 output; the local graph always uses them).
      cfg: the hyperparameters.
      attention: [N, N] self-attention probabilities (mean over heads), for
        `cfg.global_source='attention'`; N = h * w.
      queries, keys: [heads, N, d], for `cfg.global_source='qk_cosine'`.

    Raises:
      ValueError: features not [h, w, C] with every axis >= 1 and a floating dtype, a
        concrete numeric field of `cfg` outside its range (`SparkConfig.check_values`), or the
        inputs of `cfg.global_source` missing, misshapen or given when unused.
    """
    check_token_features(features, rank=3, fn="segment_tokens")
    _check_config(cfg, "segment_tokens")
    extra = global_inputs(cfg, np.shape(features), "segment_tokens", attention=attention, queries=queries, keys=keys)
    return _segment_tokens_jit(features, cfg, extra)


def _segment_tokens(features: jax.Array, cfg: SparkConfig, extra: GlobalInputs = GlobalInputs()) -> SegmentResult:
    h, w, _ = features.shape
    n = h * w
    features, num_nonfinite = finite_tokens(features)
    if cfg.global_mode == "inner":
        # RowNorm, clipping, min-max and the power are all invariant to a global positive scale
        # of X X^T, so scaling X keeps S exact while keeping X X^T finite for large features.
        scale = jnp.max(jnp.linalg.norm(features, axis=-1))
        features = features / jnp.where(scale > 0, scale, 1.0)

    s = transition_matrix(features, cfg, extra)
    mcl_args = dict(expansion=cfg.expansion, inflation=cfg.inflation, prune_threshold=cfg.prune_threshold,
                    tol=cfg.mcl_tol, max_iter=cfg.mcl_max_iter, norm=cfg.mcl_norm, precision=cfg.precision())
    if cfg.flow == "sparse":
        flow = sparse_markov_flow(s, keep=cfg.sparse_keep, keep_final=cfg.sparse_keep_final, switch_mass=cfg.sparse_switch_mass, rank=cfg.sparse_rank,
                                  rank_tol=cfg.sparse_rank_tol, recovery=cfg.sparse_recovery, recovery_mass=cfg.sparse_recovery_mass, **mcl_args)
        clusters = extract_sparse_clusters(flow.flow)
    else:
        flow = markov_flow(s, **mcl_args)
        clusters = extract_clusters(flow.flow)
    m = num_label_columns(n, cfg)
    prop = propagate_labels(
        s,
        seed_matrix(clusters.labels, m),
        gamma=cfg.gamma,
        method=cfg.propagation,
        tol=cfg.propagation_tol,
        max_iter=cfg.propagation_max_iter,
        block=cfg.propagation_block,
        precision=cfg.precision(),
    )
    present = jnp.zeros((m,), jnp.int32).at[prop.labels].set(1)
    return SegmentResult(
        labels=prop.labels.reshape(h, w),
        soft_labels=prop.soft_labels.reshape(h, w, m),
        cluster_labels=clusters.labels.reshape(h, w),
        num_clusters=clusters.num_clusters,
        num_segments=jnp.sum(present),
        mcl_iterations=flow.num_iters,
        mcl_converged=flow.converged,
        propagation_iterations=prop.num_iters,
        propagation_converged=prop.converged,
        num_nonfinite_tokens=num_nonfinite,
    )


_segment_tokens_jit = jax.jit(_segment_tokens)


def segment_tokens_batch(features: jax.Array, cfg: SparkConfig, chunk_size: int | None = None, *,
                         attention: jax.Array | None = None, queries: jax.Array | None = None,
                         keys: jax.Array | None = None) -> SegmentResult:
    """`segment_tokens` over a batch: features [B, h, w, C] -> SegmentResult with a leading B.

    Args:
      features: [B, h, w, C].
      cfg: SPARK hyperparameters, shared by the batch.
      attention, queries, keys: as in `segment_tokens`, with a leading B.
      chunk_size: images processed together (static). None vmaps the whole batch: the right
        choice on accelerators. A vmapped `while_loop` runs until its slowest member converges,
        so on a CPU, where batching buys no parallelism, `chunk_size=1` (one image at a time,
        each with its own iteration count) is faster. Results are the same either way. (`flow='sparse'`
        with its low-rank sketch on runs the Markov flow of a vmapped batch one image at a time anyway:
        `graph.sparse_flow.sparse_markov_flow`'s `rank`.)

    Raises:
      ValueError: as `segment_tokens`, for features [B, h, w, C]; chunk_size not None or an int >= 1.
    """
    check_token_features(features, rank=4, fn="segment_tokens_batch")
    _check_config(cfg, "segment_tokens_batch")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"segment_tokens_batch: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    extra = global_inputs(cfg, np.shape(features), "segment_tokens_batch", attention=attention, queries=queries,
                          keys=keys)
    return _segment_tokens_batch_jit(features, cfg, extra, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames="chunk_size")
def _segment_tokens_batch_jit(features: jax.Array, cfg: SparkConfig, extra: GlobalInputs,
                              chunk_size: int | None) -> SegmentResult:
    if chunk_size is None or chunk_size >= features.shape[0]:
        return jax.vmap(_segment_tokens, in_axes=(0, None, 0))(features, cfg, extra)
    return per_image_map(lambda xe: _segment_tokens(xe[0], cfg, xe[1]), (features, extra), batch_size=chunk_size)


# ----------------------------------------------------------------------------------------------- the method spec
# SPARK as a method of the runner (``--method=spark``; flags ``--spark_preset`` and ``--spark_<SparkConfig
# field>``): the features (and the taps `global_source` reads) -> `pipeline.segment_features` without PAMR (the
# reference applies PAMR after the many-to-one background merge, which needs the ground truth, so the runner's
# scoring runs it).
@dataclasses.dataclass(frozen=True)
class SparkMethodConfig:
    """SPARK's settings in a run.

    Attributes:
        preset: a name of :data:`spark_jax.presets.SPARK_PRESETS` (``paper``, ...), or ``auto`` for the backbone's
            own (:data:`spark_jax.presets.BACKBONE_PRESETS`: the paper's for SSD-1B). Used when ``spark`` is None;
            a run records the resolved name (``custom`` for settings no preset holds) and values.
        spark: the hyperparameters; None: those of ``preset``.
    """

    preset: str = dataclasses.field(default="auto", metadata={
        "help": "SPARK's settings: auto = the backbone's own preset (the paper's for SSD-1B; a calibrated one for "
                "the handcrafted demo backbone); paper = the paper's. A SPARK flag given explicitly overrides the "
                "preset's value.",
        "choices": ("auto", *SPARK_PRESETS)})
    spark: SparkConfig | None = None

    def __post_init__(self):
        if self.preset not in ("auto", "custom", *SPARK_PRESETS):
            raise ValueError(f"--spark_preset must be 'auto' or one of {sorted(SPARK_PRESETS)}, got {self.preset!r}")
        if self.preset == "custom" and self.spark is None:
            raise ValueError("spark_preset='custom' names explicit settings: give spark=SparkConfig(...)")
        if self.spark is not None and not isinstance(self.spark, SparkConfig):
            raise TypeError(f"spark must be a SparkConfig or None, got {type(self.spark).__name__}")


def resolve_spark(cfg: SparkMethodConfig | None, kind: str) -> SparkMethodConfig:
    """SPARK's settings made concrete for a backbone of ``kind``: ``cfg.spark`` if given, else the preset
    ``cfg.preset`` names (``auto``: the backbone kind's own); ``preset`` then names the preset used, or
    ``custom``."""
    cfg = SparkMethodConfig() if cfg is None else cfg
    name = cfg.preset if cfg.preset not in ("auto", "custom") else preset_for_backbone(kind)
    if cfg.spark is None:
        return SparkMethodConfig(preset=name, spark=SPARK_PRESETS[name].config)
    same = [name] if SPARK_PRESETS[name].config == cfg.spark else [
        n for n, p in SPARK_PRESETS.items() if p.config == cfg.spark]
    return SparkMethodConfig(preset=same[0] if same else "custom", spark=cfg.spark)


def _spec_taps(cfg: SparkMethodConfig, backbone) -> tuple[str, ...]:
    return (backbone.feature_tap, *source_taps(cfg.spark, backbone.feature_tap).values())


def _spec_build(ctx: MethodContext):
    from spark_jax.pipeline import segment_features  # the pipeline imports this module

    def method(inputs: MethodInputs, pcfg):
        extra = {name: inputs.taps[tap] for name, tap in source_taps(pcfg.spark, ctx.feature_tap).items()}
        seg = segment_features(inputs.features, inputs.images, pcfg, **extra)
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


def _spec_params(cfg: SparkMethodConfig, ctx: MethodContext, grid: tuple[int, int]):
    from spark_jax.pipeline import PipelineConfig  # the pipeline imports this module

    del grid
    cfg.spark.check_values()
    return PipelineConfig(spark=cfg.spark, mask_size=(ctx.mask_size, ctx.mask_size), upsampling=ctx.upsampling,
                          pamr=None)


def _spec_check(cfg: SparkMethodConfig) -> None:
    if cfg.spark is not None:
        cfg.spark.check_values()


def _spec_metrics(cfg: SparkMethodConfig) -> dict:
    how = (SPARK_PRESETS[cfg.preset].how_chosen if cfg.preset in SPARK_PRESETS
           else "explicit settings (flags or a SparkConfig)")
    return {"spark_preset": {"name": cfg.preset, "how_chosen": how}}


SPEC = MethodSpec(
    name="spark",
    title="SPARK",
    config_type=SparkMethodConfig,
    flag_prefix="spark_",
    build=_spec_build,
    params=_spec_params,
    diagnostics=("num_clusters", "num_segments", "mcl_iterations", "mcl_converged", "num_nonfinite_tokens"),
    taps=_spec_taps,
    upsampling="soft_labels",
    upsamplings=("soft_labels", "concept"),
    resolve=resolve_spark,
    check=_spec_check,
    variants={"spark_global": Variant(
        "SPARK w/ global affinity",
        lambda cfg: dataclasses.replace(cfg, spark=cfg.spark.replace(use_local=False)))},
    metrics=_spec_metrics,
    source="spark_jax/config.py",
)
