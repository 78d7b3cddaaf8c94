"""AutoSC: spectral clustering with an automatic cluster count (DiffCut, Sec. 4.3, Table 2).

DiffCut's "simple yet effective" baseline against its own recursive NCut. On the affinity of
DiffCut's Eq. 3 (cosine, min-max rescaled to [0, 1]) raised to each exponent alpha of a small
set, it reads the normalised Laplacian's spectrum lambda_0 <= lambda_1 <= ... and the relative
eigengap of the heuristic of DiffCut's ref. [82],

    gap_i = (lambda_i - mean(lambda_0..lambda_i)) / (mean(lambda_0..lambda_i) + 1e-6),

keeps the alpha with the largest gap, takes k = argmax_i gap_i clusters, and partitions the
tokens by k-way spectral clustering with the QR-pivoting discretisation of Damle et al.
(DiffCut's ref. [83], sklearn's `cluster_qr`) applied to D^-1/2 U_k, U_k the first k
eigenvectors of D^-1/2 (D - W) D^-1/2.

Conventions of DiffCut's released code (`autosc.py`) kept here: the exponents (1, 5, 10, 15),
the 1e-6 in the gap's denominator, the cumulative mean including lambda_i itself, ties between
exponents going to the first one, the embedding D^-1/2 U_k (not row-normalised), and the
numbering of clusters by their QR column (the released code numbers the argmax columns present
in ascending order). The defaults are the released code's behaviour, which clusters the
eigenvectors of the *last* exponent whatever exponent won (the variable holding the winner's
eigenvectors is overwritten by the loop) and caps nothing; `embed_with_last_alpha=False` is the
correction (the winner's eigenvectors), `max_clusters` an optional cap.

Static shapes: k is data dependent, so the embedding keeps `max_clusters` columns (all N by
default) and masks the unused ones; a k above `max_clusters` is clipped and reported. The
QR-pivoting discretisation runs at the smallest of 8, 16, 32, ... columns that holds k
(`lax.switch`), so a wide embedding costs nothing when k is small.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spark_jax.graph.affinity import finite_tokens, global_affinity
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec, concept_masks
from spark_jax.graph.markov_flow import relabel_contiguous
from spark_jax.sharding import per_image_map

_HIGHEST = jax.lax.Precision.HIGHEST
# Static widths of the QR-pivoting discretisation (powers of 2 from 8; the embedding's width last).
_QR_SIZES = tuple(2**p for p in range(3, 15))


@dataclasses.dataclass(frozen=True)
class AutoSCConfig:
    """Hyperparameters of AutoSC.

    `gap_eps` is a pytree leaf; the rest is static.

    Attributes:
      alphas: exponents tried on the min-max cosine affinity. DiffCut: (1, 5, 10, 15).
      max_clusters: static bound on k (the embedding's width). None (default, the released
        code's behaviour): the token count, no cap. An int is a cap (a departure from DiffCut):
        a larger eigengap index is clipped to it and `AutoSCResult.truncated` is set.
      gap_eps: the constant in the relative gap's denominator. DiffCut: 1e-6.
      embed_with_last_alpha: True (default) is the released code's behaviour: it clusters the
        eigenvectors of the last exponent in `alphas`, whichever exponent the eigengap selected.
        False is the correction: the selected exponent's eigenvectors.
    """

    alphas: tuple[float, ...] = (1.0, 5.0, 10.0, 15.0)
    max_clusters: int | None = None
    gap_eps: float = 1e-6
    embed_with_last_alpha: bool = True

    def __post_init__(self):
        if not isinstance(self.alphas, tuple) or not self.alphas:
            raise ValueError(f"alphas must be a non-empty tuple of exponents, got {self.alphas!r}")
        if any(not a > 0 for a in self.alphas):
            raise ValueError(f"every alpha must be > 0, got {self.alphas!r}")
        if self.max_clusters is not None and (
            not isinstance(self.max_clusters, int) or self.max_clusters < 1
        ):
            raise ValueError(
                f"max_clusters must be None or an int >= 1, got {self.max_clusters!r}"
            )

    def replace(self, **changes) -> AutoSCConfig:
        return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    AutoSCConfig,
    data_fields=["gap_eps"],
    meta_fields=["alphas", "max_clusters", "embed_with_last_alpha"],
)


class AutoSCResult(NamedTuple):
    """AutoSC's token-level segmentation (add a leading batch axis when batched).

    Attributes:
      labels: int32 [h, w], clusters numbered 0..L-1 in the order of their QR column (the
        released code's numbering).
      num_clusters: int32 [], k, the cluster count chosen by the eigengap (after clipping).
      num_segments: int32 [], L, distinct labels (k-way clustering may leave a cluster empty).
      alpha: float32 [], the selected exponent.
      eigengap: float32 [], its largest relative eigengap.
      truncated: bool [], the eigengap index exceeded `max_clusters` and was clipped.
      num_nonfinite_tokens: int32 [], tokens whose features held NaN/Inf (zeroed).
    """

    labels: jax.Array
    num_clusters: jax.Array
    num_segments: jax.Array
    alpha: jax.Array
    eigengap: jax.Array
    truncated: jax.Array
    num_nonfinite_tokens: jax.Array


def normalized_laplacian_eigh(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Spectrum of D^-1/2 (D - W) D^-1/2 for an affinity W [N, N].

    Returns:
      (eigenvalues [N] ascending, D^-1/2 U [N, N]: the eigenvectors mapped back by D^-1/2, i.e.
      the generalised eigenvectors of (D - W) x = lambda D x, DiffCut Eq. 2).
    """
    degree = jnp.sum(w, axis=1)
    inv_sqrt = jnp.where(degree > 0, jax.lax.rsqrt(jnp.where(degree > 0, degree, 1.0)), 0.0)
    lap = jnp.eye(w.shape[0], dtype=w.dtype) - inv_sqrt[:, None] * w * inv_sqrt[None, :]
    lap = 0.5 * (lap + lap.T)
    values, vectors = jnp.linalg.eigh(lap)
    return values, inv_sqrt[:, None] * vectors


def relative_eigengap(eigenvalues: jax.Array, eps: float | jax.Array = 1e-6) -> jax.Array:
    """gap_i = (lambda_i - m_i) / (m_i + eps), m_i the mean of lambda_0..lambda_i. [N] -> [N]."""
    count = jnp.arange(1, eigenvalues.shape[0] + 1, dtype=eigenvalues.dtype)
    cummean = jnp.cumsum(eigenvalues) / count
    return (eigenvalues - cummean) / (cummean + eps)


def cluster_qr(vectors: jax.Array, k: jax.Array | int) -> jax.Array:
    """k-way discretisation of a spectral embedding by QR pivoting (Damle et al.).

    Picks k pivot tokens by column-pivoted QR of the embedding's transpose (greedily, the token
    whose embedding row has the largest component orthogonal to the rows already picked),
    rotates the embedding by the orthogonal polar factor of the pivots' k x k block, and labels
    each token by its largest absolute coordinate. The result does not depend on the signs or
    the basis of the embedding's column space.

    Args:
      vectors: embedding [N, K] (K static); only the first k columns are used.
      k: number of clusters, 1 <= k <= K (may be traced).

    Returns:
      int32 [N] labels in [0, k): the index of each token's column.
    """
    width = vectors.shape[1]
    sizes = [size for size in _QR_SIZES if size < width] + [width]
    branches = [functools.partial(_cluster_qr_at, size=size) for size in sizes]
    branch = jnp.searchsorted(jnp.asarray(sizes[:-1], jnp.int32), k) if len(sizes) > 1 else 0
    return jax.lax.switch(branch, branches, vectors, k)


def _cluster_qr_at(vectors: jax.Array, k: jax.Array | int, size: int) -> jax.Array:
    """`cluster_qr` on the first `size` >= k columns of the embedding (static size)."""
    v = vectors[:, :size]
    col_used = jnp.arange(size) < k
    v = jnp.where(col_used[None, :], v, 0.0)

    def pick(j, carry):
        residual, pivots = carry
        norms = jnp.sum(residual * residual, axis=1)
        p = jnp.argmax(norms)  # first maximum, as LAPACK's pivoting
        row = residual[p]
        q = row / jnp.maximum(jnp.linalg.norm(row), 1e-30)
        residual = residual - jnp.matmul(residual, q, precision=_HIGHEST)[:, None] * q[None, :]
        return residual, pivots.at[j].set(p)

    # Only the first k pivots are used (the rest of the block is the identity).
    _, pivots = jax.lax.fori_loop(0, k, pick, (v, jnp.zeros((size,), jnp.int32)))
    # Block [[X_k, 0], [0, I]]: its polar factor is [[polar(X_k), 0], [0, I]].
    used = col_used[:, None] & col_used[None, :]
    block = jnp.where(used, v[pivots, :].T, jnp.eye(size, dtype=v.dtype))
    u, _, vh = jnp.linalg.svd(block)
    rotated = jnp.abs(jnp.matmul(v, jnp.matmul(u, vh, precision=_HIGHEST), precision=_HIGHEST))
    return jnp.argmax(jnp.where(col_used[None, :], rotated, -1.0), axis=1).astype(jnp.int32)


def autosc_affinity(w: jax.Array, cfg: AutoSCConfig) -> tuple[jax.Array, ...]:
    """AutoSC on the min-max cosine affinity W [N, N] (before any power).

    Returns:
      (labels int32 [N] numbered by QR column, k, num_segments, selected alpha, eigengap,
      truncated).
    """
    n = w.shape[0]
    width = n if cfg.max_clusters is None else min(cfg.max_clusters, n)
    best_gap = jnp.float32(-jnp.inf)
    best_k = jnp.int32(1)
    best_alpha = jnp.float32(cfg.alphas[0])
    best_vectors = jnp.zeros((n, width), jnp.float32)
    for alpha in cfg.alphas:
        values, vectors = normalized_laplacian_eigh(w**alpha)
        gap = relative_eigengap(values, cfg.gap_eps)
        take = jnp.max(gap) > best_gap  # strict: the first exponent wins ties
        best_gap = jnp.where(take, jnp.max(gap), best_gap)
        best_k = jnp.where(take, jnp.argmax(gap).astype(jnp.int32), best_k)
        best_alpha = jnp.where(take, jnp.float32(alpha), best_alpha)
        best_vectors = jnp.where(take, vectors[:, :width], best_vectors)
    if cfg.embed_with_last_alpha:
        best_vectors = vectors[:, :width]
    # gap_0 = 0 always; k = 0 only for a flat spectrum, which is one cluster.
    truncated = best_k > width
    k = jnp.clip(best_k, 1, width)
    labels, num_segments = relabel_contiguous(cluster_qr(best_vectors, k), width)
    return labels, k, num_segments, best_alpha, best_gap, truncated


@jax.jit
def autosc(features: jax.Array, cfg: AutoSCConfig) -> AutoSCResult:
    """AutoSC on token features [h, w, C] -> AutoSCResult (DiffCut Sec. 4.3).

    Args:
      features: token features [h, w, C] (row-major tokens).
      cfg: see `AutoSCConfig`.
    """
    if features.ndim != 3:
        raise ValueError(
            f"autosc takes token features of shape [h, w, C], got shape {features.shape}; "
            "use autosc_batch for [B, h, w, C]"
        )
    h, w, c = features.shape
    x, num_nonfinite = finite_tokens(features.reshape(h * w, c))
    affinity = global_affinity(x, mode="cosine", negatives="minmax")
    labels, k, num_segments, alpha, gap, truncated = autosc_affinity(affinity, cfg)
    return AutoSCResult(
        labels=labels.reshape(h, w),
        num_clusters=k,
        num_segments=num_segments,
        alpha=alpha,
        eigengap=gap,
        truncated=truncated,
        num_nonfinite_tokens=num_nonfinite,
    )


@jax.jit
def autosc_batch(features: jax.Array, cfg: AutoSCConfig) -> AutoSCResult:
    """`autosc` over a batch: features [B, h, w, C] -> AutoSCResult with a leading B.

    Images run one after the other (`lax.map`): under vmap the discretisation's width-bucket
    `lax.switch` would evaluate every branch, the full-width one included. Under a mesh each
    device loops over its own images (`spark_jax.sharding.per_image_map`).
    """
    if features.ndim != 4:
        raise ValueError(f"autosc_batch takes features [B, h, w, C], got shape {features.shape}")
    return per_image_map(lambda x: autosc(x, cfg), features)


# ----------------------------------------------------------------------------------------------- the method spec
# AutoSC as a method of the runner (``--method=autosc``, flags ``--autosc_<field>``): the features -> AutoSC ->
# DiffCut's concept assignment of the clusters to the mask size (AutoSC has no soft labels).

def _spec_build(ctx: MethodContext):
    def method(inputs: MethodInputs, acfg: AutoSCConfig):
        _, h, w, _ = inputs.features.shape
        res = autosc_batch(inputs.features, acfg)
        bound = h * w if acfg.max_clusters is None else min(acfg.max_clusters, h * w)  # labels lie in [0, bound)
        labels = concept_masks(inputs.features, res.labels, bound, ctx.mask_size)
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


SPEC = MethodSpec(
    name="autosc",
    title="AutoSC",
    config_type=AutoSCConfig,
    flag_prefix="autosc_",
    build=_spec_build,
    params=lambda cfg, ctx, grid: cfg,
    diagnostics=("num_clusters", "num_segments", "alpha", "eigengap", "truncated", "num_nonfinite_tokens"),
    source="spark_jax/methods/autosc.py",
)
