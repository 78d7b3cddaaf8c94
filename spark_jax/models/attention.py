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
        out = _attention(q, k, v, scale=self.dim_head**-0.5)
        out = self.to_out[0](out.reshape(b, t, self.heads * self.dim_head))
        if self.residual_connection:
            out = out + residual
        return out.reshape(spatial_shape)


# Largest logits block materialised at once (elements): 2^26 float32 = 256 MB. Above it, queries are
# processed in chunks (rows of a softmax are independent, so the result is the same). Without this the
# SDXL VAE's single-head attention over 128x128 latents holds two 1 GB [16384, 16384] arrays.
MAX_LOGITS = 2**26


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, max_logits: int = MAX_LOGITS) -> jax.Array:
    """softmax(q k^T * scale) v with float32 logits; q: [B, T, N, H], k, v: [B, S, N, H] -> [B, T, N, H]."""
    b, t, n, h = q.shape
    chunks = 1
    while b * n * (t // chunks) * k.shape[1] > max_logits and t % (2 * chunks) == 0:
        chunks *= 2

    def block(qc: jax.Array) -> jax.Array:
        logits = jnp.einsum("btnh,bsnh->bnts", qc, k, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", probs, v)

    if chunks == 1:
        return block(q)
    qs = q.reshape(b, chunks, t // chunks, n, h).swapaxes(0, 1)
    return jax.lax.map(block, qs).swapaxes(0, 1).reshape(b, t, n, h)


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
