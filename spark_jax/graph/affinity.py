"""The fused transition matrix of SPARK (Sec. 3.1, Eq. 1-4).

Tokens are flattened row-major: token i = (row, col) of an (h, w) grid sits at i = row * w + col,
matching the flattening of the diffusion feature map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spark_jax.config import GlobalMode, Negatives, SparkConfig

# Bisection bracket of the automatic sharpening exponent p, in log2 p, and its number of steps.
# 2^-4..2^10 spans a nearly flat to a nearly one-hot row for float32 cosines (DiffCut uses 10, the
# behaviour map finds 4-8 good on planted features; the handcrafted backbone's cosines crowd near
# 1 and need p ~ 100); 24 halvings leave 14 / 2^24 ~ 1e-6 in log2 p, below what float32
# entropies resolve.
SHARPEN_LOG2_RANGE = (-4.0, 10.0)
SHARPEN_BISECTION_STEPS = 24

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
    a = _handle_negatives(jnp.matmul(x, x.T, precision=precision), negatives)
    return a**sharpen


def _handle_negatives(a: jax.Array, negatives: Negatives) -> jax.Array:
    if negatives == "clip":
        return jnp.maximum(a, 0.0)
    lo, hi = jnp.min(a), jnp.max(a)
    span = hi - lo
    return jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 1.0)


class GlobalInputs(NamedTuple):
    """What A_global is computed from besides the features, for `SparkConfig.global_source`.

    Attributes:
      attention: float [N, N], self-attention probabilities (rows sum to 1), mean over heads
        ('attention'); the backbone's ``...attn1:probs_mean`` tap.
      queries, keys: float [heads, N, d], the same attention's queries and keys ('qk_cosine');
        the ``...attn1:q`` and ``...attn1:k`` taps.
    Fields a source does not use are None (an empty pytree: vmapping over the batch works).
    """

    attention: jax.Array | None = None
    queries: jax.Array | None = None
    keys: jax.Array | None = None


def attention_affinity(attention: jax.Array) -> jax.Array:
    """A_global from self-attention probabilities [N, N] (Fig. 2's reading of Eq. 1): the
    probabilities themselves as float32, non-finite entries set to 0 (a row left without mass
    becomes a self-loop in RowNorm)."""
    a = attention.astype(jnp.float32)
    return jnp.where(jnp.isfinite(a), jnp.maximum(a, 0.0), 0.0)


def qk_cosine_affinity(
    queries: jax.Array,
    keys: jax.Array,
    *,
    negatives: Negatives = "clip",
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """A_global from queries and keys [heads, N, d]: mean over heads of cos(q_i^h, k_j^h) -> [N, N],
    then `negatives` as in `global_affinity`. Non-finite query/key vectors count as zero vectors."""
    q = l2_normalize(finite_tokens(queries)[0])
    k = l2_normalize(finite_tokens(keys)[0])
    a = jnp.mean(jnp.einsum("hid,hjd->hij", q, k, precision=precision), axis=0)
    return _handle_negatives(a, negatives)


def _log_affinity(a: jax.Array) -> jax.Array:
    """log of a non-negative affinity [N, N], -inf where it is 0 (such entries stay 0 under any power)."""
    positive = a > 0
    return jnp.where(positive, jnp.log(jnp.where(positive, a, 1.0)), -jnp.inf)


def mean_row_entropy(a: jax.Array, sharpen: float | jax.Array) -> jax.Array:
    """Mean Shannon entropy (nats) of the rows of RowNorm(a**sharpen), a [N, N] non-negative.

    Rows without mass (zero or non-finite tokens, which RowNorm turns into self-loops) are left
    out of the mean; with no such row left the result is 0. Computed in log space, so large
    powers neither underflow nor overflow.
    """
    log_a = _log_affinity(a)
    logits = sharpen * log_a
    has_mass = jnp.any(a > 0, axis=-1)
    lse = jax.nn.logsumexp(jnp.where(has_mass[:, None], logits, 0.0), axis=-1, keepdims=True)
    q = jnp.exp(logits - lse)
    # H = -sum q log q = lse - sum q * logits; q = 0 entries contribute 0 (not 0 * -inf).
    entropy = lse[:, 0] - jnp.sum(jnp.where(q > 0, q * logits, 0.0), axis=-1)
    count = jnp.sum(has_mass)
    return jnp.sum(jnp.where(has_mass, entropy, 0.0)) / jnp.maximum(count, 1)


def entropy_sharpness(
    a: jax.Array,
    target_fraction: float | jax.Array,
    *,
    log2_range: tuple[float, float] = SHARPEN_LOG2_RANGE,
    num_steps: int = SHARPEN_BISECTION_STEPS,
) -> jax.Array:
    """The power p whose sharpened rows RowNorm(a**p) have a target mean entropy (automatic Eq. 1).

    p solves  mean_i H(RowNorm(a**p)_i) = log(target_fraction * N):  the geometric mean over
    tokens of the effective number of neighbours exp(H_i) is the fraction `target_fraction` of the
    N tokens. A fraction of the tokens, not of log N, because what a row should spread over is
    roughly its token's region, and a region covers the same fraction of an image at every token
    grid; a fixed H / log N would mean N^(h-1) of the tokens, a different region size per grid.
    The mean entropy is non-increasing in p (dH_i/dp = -p Var_{q_i}(log a_i) <= 0), so p is found
    by bisection on log2 p over `log2_range` in `num_steps` fixed steps (static shapes, jittable,
    vmappable; `target_fraction` may be traced). A target outside what the bracket reaches gives
    its nearer end (e.g. a fraction below 1 / N, or above the rows' support, which is what p -> 0
    gives: each row uniform on its non-zero entries).

    Args:
      a: non-negative global affinity [N, N] before sharpening (Eq. 1 after negatives).
      target_fraction: effective neighbours per token as a fraction of N, in (0, 1].
      log2_range: bisection bracket of log2 p.
      num_steps: bisection steps.

    Returns:
      float32 [], the sharpening exponent p.
    """
    n = a.shape[-1]
    target = jnp.log(jnp.asarray(target_fraction, jnp.float32) * n)

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        # Entropy above the target: the rows are still too flat, sharpen more (raise p).
        too_flat = mean_row_entropy(a, jnp.exp2(mid)) > target
        return jnp.where(too_flat, mid, lo), jnp.where(too_flat, hi, mid)

    lo, hi = jax.lax.fori_loop(
        0, num_steps, step, (jnp.float32(log2_range[0]), jnp.float32(log2_range[1]))
    )
    return jnp.exp2(0.5 * (lo + hi))


def _unsharpened_global_affinity(x: jax.Array, cfg: SparkConfig, extra: GlobalInputs) -> jax.Array:
    """A_global before sharpening, from the source `cfg.global_source` names."""
    n = x.shape[0]
    if cfg.global_source == "features":
        return global_affinity(x, mode=cfg.global_mode, negatives=cfg.negatives, sharpen=1.0,
                               precision=cfg.precision())
    if cfg.global_source == "attention":
        if extra.attention is None or extra.attention.shape != (n, n):
            raise ValueError(f"global_source='attention' needs the attention probabilities [{n}, {n}] of the "
                             f"{n} tokens, got {None if extra.attention is None else extra.attention.shape}")
        return attention_affinity(extra.attention)
    shapes = [None if t is None else t.shape for t in (extra.queries, extra.keys)]
    if any(s is None or len(s) != 3 or s[1] != n for s in shapes) or shapes[0] != shapes[1]:
        raise ValueError(f"global_source='qk_cosine' needs queries and keys [heads, {n}, d] of the {n} tokens, "
                         f"got {shapes[0]} and {shapes[1]}")
    return qk_cosine_affinity(extra.queries, extra.keys, negatives=cfg.negatives, precision=cfg.precision())


def sharpened_global_affinity(
    x: jax.Array, cfg: SparkConfig, extra: GlobalInputs = GlobalInputs()
) -> tuple[jax.Array, jax.Array]:
    """A_global (Eq. 1) of tokens x [N, C] sharpened as `cfg` says, and the exponent used.

    A_global comes from `cfg.global_source`: the features x, or `extra`'s attention
    probabilities or queries and keys. `cfg.sharpen_mode='fixed'` applies `cfg.sharpen`;
    `'entropy'` calibrates the exponent per input with
    `entropy_sharpness(target_fraction=cfg.sharpen_target)` and applies it to each row divided
    by its maximum: the same matrix after RowNorm, without float32 underflow of large powers.

    Returns:
      (affinity [N, N], exponent float32 []).
    """
    if cfg.sharpen_mode == "fixed":
        if cfg.global_source == "features":
            a = global_affinity(
                x, mode=cfg.global_mode, negatives=cfg.negatives, sharpen=cfg.sharpen,
                precision=cfg.precision(),
            )
        else:
            a = _unsharpened_global_affinity(x, cfg, extra) ** cfg.sharpen
        return a, jnp.asarray(cfg.sharpen, jnp.float32)
    a = _unsharpened_global_affinity(x, cfg, extra)
    p = entropy_sharpness(a, cfg.sharpen_target)
    row_max = jnp.max(a, axis=-1, keepdims=True)
    return (a / jnp.where(row_max > 0, row_max, 1.0)) ** p, p


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


def transition_matrix(features: jax.Array, cfg: SparkConfig, extra: GlobalInputs = GlobalInputs()) -> jax.Array:
    """The fused row-stochastic transition matrix S (Eq. 4) of features [h, w, C] -> [N, N].

    S = beta RowNorm(A_global) + (1 - beta) RowNorm(A_local); with `cfg.use_local=False` it is
    RowNorm(A_global) alone (the paper's "global affinity only" ablation). A_global is sharpened
    by `cfg.sharpen` or, with `cfg.sharpen_mode='entropy'`, by a per-image calibrated exponent
    (`sharpened_global_affinity`); it is computed from `cfg.global_source` (features, or
    `extra`'s attention probabilities or queries and keys).
    """
    h, w, c = features.shape
    s_global = row_normalize(sharpened_global_affinity(features.reshape(h * w, c), cfg, extra)[0])
    if not cfg.use_local:
        return s_global
    s_local = row_normalize(local_affinity(features, eps=cfg.local_eps))
    return cfg.beta * s_global + (1.0 - cfg.beta) * s_local
