"""Timestep embeddings of the diffusers UNet (``diffusers.models.embeddings``), in Flax NNX.

Attribute names mirror diffusers' parameter names (``linear_1``, ``linear_2``) so that weight
conversion is a rename plus a transpose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM and diffusers' ``Timesteps``.

    Args:
      timesteps: [N] timesteps.
      dim: embedding width.
      flip_sin_to_cos: order the halves ``cos, sin`` (True, SD/SDXL) instead of ``sin, cos``.
      freq_shift: diffusers' ``downscale_freq_shift`` (0 for SD/SDXL).
      max_period: the longest period of the sinusoids.

    Returns:
      [N, dim] float32 embedding.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Two-layer MLP ``linear_2(silu(linear_1(x)))`` (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = nnx.Linear(in_channels, time_embed_dim, rngs=rngs)
        self.linear_2 = nnx.Linear(time_embed_dim, time_embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, in_channels] -> [B, time_embed_dim]."""
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
