"""Attention, GEGLU feed-forward and BasicTransformerBlock (``diffusers.models.attention*``), in Flax NNX.

Attribute names mirror diffusers' parameter names (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ...). Attention
and BasicTransformerBlock record taps (``spark_jax.models.taps``): q/k/v, the attention probabilities (computed
only when requested) and their outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.resnet import group_norm
from spark_jax.models.taps import NO_TAPS, PROBS_QUANTITIES, Tapped, TapRecorder
from spark_jax.sharding import batch_local


class Attention(Tapped, nnx.Module):
    """Multi-head (cross-)attention with diffusers' parameter layout.

    Used in two forms: the UNet's token attention (no q/k/v bias) and the VAE's spatial self-attention
    (``norm_num_groups`` set: GroupNorm first, q/k/v biases, residual added inside).
    Logits and softmax are computed in float32 whatever the input dtype (diffusers' ``upcast_softmax``, and
    ``upcast_attention``'s float32 logits), so diffusers' ``upcast_attention`` needs no switch here.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        residual_connection: bool = False,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.residual_connection = residual_connection
        self.group_norm = (
            group_norm(query_dim, norm_num_groups, norm_eps, rngs) if norm_num_groups is not None else None
        )
        self.to_q = nnx.Linear(query_dim, inner, use_bias=bias, rngs=rngs)
        self.to_k = nnx.Linear(kv_dim, inner, use_bias=bias, rngs=rngs)
        self.to_v = nnx.Linear(kv_dim, inner, use_bias=bias, rngs=rngs)
        # diffusers' to_out is [Linear, Dropout]; dropout is the identity at inference.
        self.to_out = nnx.List([nnx.Linear(inner, query_dim, rngs=rngs), nnx.Dropout(0.0)])

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, rec: TapRecorder = NO_TAPS
    ) -> jax.Array:
        """x: [B, T, C] tokens or [B, H, W, C] maps; context: [B, L, D] or None (self-attention).

        Returns an array shaped like ``x``. Records the taps ``q``, ``k``, ``v``, ``probs``, ``probs_mean`` and
        ``output`` (see ``spark_jax.models.taps``); the output is always the fast path's
        (``dot_product_attention``), the probabilities are computed besides it only when requested.
        """
        spatial_shape = x.shape
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b, t, _ = x.shape
        path = self.tap_path
        q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
        if rec.wants(path, "q"):
            rec.record(path, "q", q.transpose(0, 2, 1, 3))
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        if rec.wants(path, "k"):
            rec.record(path, "k", k.transpose(0, 2, 1, 3))
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        if rec.wants(path, "v"):
            rec.record(path, "v", v.transpose(0, 2, 1, 3))
        scale = self.dim_head**-0.5
        if rec.wants_any(path, PROBS_QUANTITIES):
            if rec.wants(path, "probs"):
                rec.record(path, "probs", attention_probs(q, k, scale=scale))
            if rec.wants(path, "probs_mean"):
                rec.record(path, "probs_mean", attention_probs_mean(q, k, scale=scale))
        out = dot_product_attention(q, k, v, scale=scale)
        out = self.to_out[0](out.reshape(b, t, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        out = out.reshape(spatial_shape)
        rec.record(path, "output", out)
        return out


def attention_probs(
    q: jax.Array, k: jax.Array, *, scale: float, precision: str | jax.lax.Precision | None = None
) -> jax.Array:
    """softmax(q k^T * scale) of every head, float32.

    Args:
      q: [B, T, N, H] queries; k: [B, S, N, H] keys (N heads of width H).
      scale: logit scale (diffusers: dim_head ** -0.5).
      precision: precision of the product (None follows ``jax.default_matmul_precision``).

    Returns:
      [B, N, T, S] float32 probabilities (rows sum to 1).
    """
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32, precision=precision)
    return jax.nn.softmax(logits * scale, axis=-1)


def attention_probs_mean(
    q: jax.Array, k: jax.Array, *, scale: float, precision: str | jax.lax.Precision | None = None
) -> jax.Array:
    """Mean over heads of ``attention_probs``, accumulated one head at a time.

    A ``lax.scan`` over heads holds one head's [B, T, S] probabilities and the running sum, never all heads
    at once: DiffSeg-style averages of 4096 x 4096 maps over 10-20 heads stay at two such maps.

    Args:
      q: [B, T, N, H]; k: [B, S, N, H]; scale, precision: as in ``attention_probs``.

    Returns:
      [B, T, S] float32.
    """
    b, t, n, _ = q.shape
    s = k.shape[1]

    def add_head(acc: jax.Array, qk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        qh, kh = qk  # [B, T, H], [B, S, H]
        logits = jnp.einsum("bth,bsh->bts", qh, kh, preferred_element_type=jnp.float32, precision=precision)
        return acc + jax.nn.softmax(logits * scale, axis=-1), None

    total, _ = jax.lax.scan(
        add_head, jnp.zeros((b, t, s), jnp.float32), (q.transpose(2, 0, 1, 3), k.transpose(2, 0, 1, 3))
    )
    return total / n


# Attention is computed per (batch, head) and per block of BLOCK_Q queries, each block a plain 2-D
# problem whose [BLOCK_Q, S] logits stay small: XLA:CPU runs batched (per-head) dots and long
# softmax passes several times slower than 2-D ones (experiments/bench_attention.py: 1.4-3.9x
# faster than one batched softmax at the SSD-1B and SDXL-VAE shapes). Small problems (all logits
# <= MAX_UNBLOCKED_LOGITS elements, e.g. cross-attention over 77 tokens) run in one batched step,
# where a loop costs more than it saves. Rows of a softmax are independent: blocking changes no result.
BLOCK_Q = 1024
MAX_UNBLOCKED_LOGITS = 2**22


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    block_q: int = BLOCK_Q,
    max_unblocked_logits: int = MAX_UNBLOCKED_LOGITS,
    precision: str | jax.lax.Precision | None = None,
) -> jax.Array:
    """softmax(q k^T * scale) v with float32 logits and accumulation.

    Args:
      q: [B, T, N, H] queries.
      k, v: [B, S, N, H] keys and values.
      scale: logit scale (diffusers: dim_head ** -0.5).
      block_q: queries per block when blocking (T is zero-padded to a multiple; padded rows are
        dropped).
      max_unblocked_logits: problems with at most this many logits (B * N * T * S) are not blocked.
      precision: precision of the two products; None follows ``jax.default_matmul_precision``, which the
        backbone sets for its whole program (``BackboneConfig.matmul_precision``, "highest" by default).

    Returns:
      [B, T, N, H] in v's dtype. The softmax is normalised after the value product (one division
      per output element instead of one per logit).
    """
    # Under a mesh (spark_jax.sharding.active) each device attends over its own images: the flattening of
    # (batch, head) and the loop over its blocks below would otherwise gather the whole batch onto every device.
    attend_all = functools.partial(_attention, scale=scale, block_q=block_q,
                                   max_unblocked_logits=max_unblocked_logits, precision=precision)
    return batch_local(attend_all)(q, k, v)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, block_q: int, max_unblocked_logits: int,
               precision: str | jax.lax.Precision | None) -> jax.Array:
    b, t, n, h = q.shape
    s = k.shape[1]
    # [B*N, T, H]: one independent 2-D attention per (batch, head).
    qh, kh, vh = (x.transpose(0, 2, 1, 3).reshape(b * n, x.shape[1], h) for x in (q, k, v))

    def attend(qc: jax.Array, kc: jax.Array, vc: jax.Array) -> jax.Array:
        logits = jnp.einsum(
            "...th,...sh->...ts", qc, kc, preferred_element_type=jnp.float32, precision=precision
        ) * scale
        weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
        out = jnp.einsum(
            "...ts,...sh->...th", weights.astype(vc.dtype), vc, preferred_element_type=jnp.float32,
            precision=precision,
        )
        return (out / jnp.sum(weights, axis=-1, keepdims=True)).astype(vc.dtype)

    if b * n * t * s <= max_unblocked_logits:
        out = attend(qh, kh, vh)
    else:
        block = min(block_q, t)
        blocks = -(-t // block)
        qh = jnp.pad(qh, ((0, 0), (0, blocks * block - t), (0, 0))).reshape(b * n * blocks, block, h)
        head = jnp.arange(b * n * blocks) // blocks
        out = jax.lax.map(lambda a: attend(a[0], kh[a[1]], vh[a[1]]), (qh, head))
        out = out.reshape(b * n, blocks * block, h)[:, :t]
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


class GEGLU(nnx.Module):
    """``h * gelu(gate)`` with ``[h, gate] = proj(x)`` (exact erf GELU, as torch's default)."""

    def __init__(self, dim_in: int, dim_out: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(dim_in, 2 * dim_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net = [GEGLU, Dropout, Linear]``."""

    def __init__(self, dim: int, *, mult: int = 4, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, rngs=rngs), nnx.Dropout(0.0), nnx.Linear(inner, dim, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(Tapped, nnx.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        self.norm1 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, bias=attention_bias, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
        self.attn2 = Attention(
            dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
            bias=attention_bias, rngs=rngs,
        )
        self.norm3 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
        self.ff = FeedForward(dim, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, T, C]; context: [B, L, D] -> [B, T, C]."""
        x = x + self.attn1(self.norm1(x), rec=rec)
        x = x + self.attn2(self.norm2(x), context, rec=rec)
        x = x + self.ff(self.norm3(x))
        rec.record(self.tap_path, "output", x)
        return x
