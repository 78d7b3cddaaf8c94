"""Attention, GEGLU feed-forward and BasicTransformerBlock (``diffusers.models.attention*``), in Flax NNX.

Attribute names mirror diffusers' parameter names (``to_q``, ``to_out.0``, ``ff.net.0.proj``, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.resnet import group_norm


class Attention(nnx.Module):
    """Multi-head (cross-)attention with diffusers' parameter layout.

    Used in two forms: the UNet's token attention (no q/k/v bias) and the VAE's spatial self-attention
    (``norm_num_groups`` set: GroupNorm first, q/k/v biases, residual added inside).
    Logits and softmax are computed in float32 whatever the input dtype (diffusers' ``upcast_softmax``).
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

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: [B, T, C] tokens or [B, H, W, C] maps; context: [B, L, D] or None (self-attention).

        Returns an array shaped like ``x``.
        """
        spatial_shape = x.shape
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        residual = x
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b, t, _ = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        out = dot_product_attention(q, k, v, scale=self.dim_head**-0.5)
        out = self.to_out[0](out.reshape(b, t, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        return out.reshape(spatial_shape)


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


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm with a residual.

    With ``attn1_only=True`` only ``norm1`` and ``attn1`` are built: the block ends at the feature
    point, so nothing after the self-attention is stored or computed.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        attn1_only: bool = False,
        rngs: nnx.Rngs,
    ):
        self.norm1 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, bias=attention_bias, rngs=rngs)
        if not attn1_only:
            self.norm2 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
            self.attn2 = Attention(
                dim, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                bias=attention_bias, rngs=rngs,
            )
            self.norm3 = nnx.LayerNorm(dim, epsilon=norm_eps, use_fast_variance=False, rngs=rngs)
            self.ff = FeedForward(dim, rngs=rngs)

    def self_attention(self, x: jax.Array) -> jax.Array:
        """attn1 output after its output projection, before the residual: x [B, T, C] -> [B, T, C]."""
        return self.attn1(self.norm1(x))

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, T, C]; context: [B, L, D] -> [B, T, C]."""
        x = x + self.self_attention(x)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))
