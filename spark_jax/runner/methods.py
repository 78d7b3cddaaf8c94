"""The methods a run can evaluate: each a jitted ``(MethodInputs, params) -> (labels, diagnostics)``."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.ncut import NCutConfig, recursive_ncut_batch
from spark_jax.masks.upsample import concept_assignment
from spark_jax.methods.autosc import AutoSCConfig, autosc_batch
from spark_jax.methods.kmeans import KMeansConfig, kmeans_tokens
from spark_jax.pipeline import PipelineConfig, segment_features

if TYPE_CHECKING:
    from spark_jax.runner.config import RunConfig

__all__ = ["METHODS", "KMeansParams", "Method", "MethodInputs", "MethodSpec", "jitted_method"]


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
def jitted_method(name: str, mask_size: int, upsampling: str) -> Callable:
    """METHODS[name] jitted once per process: runs that differ in hyperparameters, PAMR, dataset or output
    share its compilations (hyperparameters are traced arguments)."""
    return jax.jit(METHODS[name].build(mask_size, upsampling))

