"""The fused transition matrix of SPARK (Sec. 3.1, Eq. 1-4).

Tokens are flattened row-major: token i = (row, col) of an (h, w) grid sits at i = row * w + col,
matching the flattening of the diffusion feature map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from spark_jax.config import GlobalMode, Negatives, SparkConfig

# Feature vectors shorter than this are treated as zero vectors by the cosine (no division by 0).
_NORM_FLOOR = 1e-12
# The 8-neighbourhood of Eq. 2, in a fixed order.
_NEIGHBOUR_OFFSETS = tuple((dh, dw) for dh in (-1, 0, 1) for dw in (-1, 0, 1) if (dh, dw) != (0, 0))


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of `x` [..., C] scaled to unit norm; zero rows stay zero."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, _NORM_FLOOR)


def finite_tokens(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens x [..., C] as float32 with non-finite tokens zeroed, and how many there were.

    Every method treats a token holding NaN/Inf as a zero vector (cosine 0 with everything):
    jitted code cannot raise on data, so entry points that must reject such input call
    `spark.check_features` first, and results report the count.
    """
    x = x.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)
    return jnp.where(finite, x, 0.0), jnp.sum(~finite).astype(jnp.int32)


def row_normalize(a: jax.Array) -> jax.Array:
    """RowNorm (Eq. 7) of a non-negative matrix [N, N] that never divides by zero.

    A row with no mass (a token with no affinity to anything) becomes a self-loop, so the
    result is always row-stochastic: such a token is a walk's dead end and its own cluster.
    """
    total = jnp.sum(a, axis=-1, keepdims=True)
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return jnp.where(total > 0, a / jnp.where(total > 0, total, 1.0), eye)


def global_affinity(
    x: jax.Array,
    *,
    mode: GlobalMode = "cosine",
    negatives: Negatives = "clip",
    sharpen: float | jax.Array = 1.0,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """Global diffusion affinity A_global (Eq. 1) of token features x [N, C] -> [N, N].

    Args:
      x: token features [N, C].
      mode: 'cosine' uses L2-normalised features (cosine similarity); 'inner' is X X^T as
        written in Eq. 1.
      negatives: 'clip' zeroes negative similarities; 'minmax' rescales the whole matrix to
        [0, 1] (DiffCut's affinity; a constant matrix becomes all ones).
      sharpen: elementwise power applied last (1 = Eq. 1; DiffCut uses minmax + 10).
      precision: matmul precision.
    """
    x = x.astype(jnp.float32)
    if mode == "cosine":
        x = l2_normalize(x)
    a = jnp.matmul(x, x.T, precision=precision)
    if negatives == "clip":
        a = jnp.maximum(a, 0.0)
    else:
        lo, hi = jnp.min(a), jnp.max(a)
        span = hi - lo
        a = jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return a**sharpen


def local_affinity(x: jax.Array, *, eps: float | jax.Array) -> jax.Array:
    """Local 8-neighbour cosine graph A_local (Eq. 2-3) of features x [h, w, C] -> [N, N].

    1 on the diagonal, cos(X_i, X_j) + eps for the (up to) 8 grid neighbours j of i, 0 elsewhere.
    Border tokens simply have fewer neighbours. Negative cos + eps is clipped at 0 so that
    RowNorm yields a stochastic matrix.
    """
    h, w, _ = x.shape
    n = h * w
    xn = l2_normalize(x.astype(jnp.float32))
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    index = rows * w + cols
    a = jnp.eye(n, dtype=jnp.float32)
    for dh, dw in _NEIGHBOUR_OFFSETS:
        valid = (rows + dh >= 0) & (rows + dh < h) & (cols + dw >= 0) & (cols + dw < w)
        # Shifted copy of the grid: neighbour features, garbage (masked below) off the border.
        shifted = jnp.roll(xn, shift=(-dh, -dw), axis=(0, 1))
        cos = jnp.sum(xn * shifted, axis=-1)
        value = jnp.where(valid, jnp.maximum(cos + eps, 0.0), 0.0)
        target = jnp.where(valid, index + dh * w + dw, index)
        # Invalid taps write 0 onto the diagonal via .add, which leaves it unchanged.
        a = a.at[index.ravel(), target.ravel()].add(value.ravel())
    return a


def transition_matrix(features: jax.Array, cfg: SparkConfig) -> jax.Array:
    """The fused row-stochastic transition matrix S (Eq. 4) of features [h, w, C] -> [N, N].

    S = beta RowNorm(A_global) + (1 - beta) RowNorm(A_local); with `cfg.use_local=False` it is
    RowNorm(A_global) alone (the paper's "global affinity only" ablation).
    """
    h, w, c = features.shape
    s_global = row_normalize(
        global_affinity(
            features.reshape(h * w, c),
            mode=cfg.global_mode,
            negatives=cfg.negatives,
            sharpen=cfg.sharpen,
            precision=cfg.precision(),
        )
    )
    if not cfg.use_local:
        return s_global
    s_local = row_normalize(local_affinity(features, eps=cfg.local_eps))
    return cfg.beta * s_global + (1.0 - cfg.beta) * s_local
