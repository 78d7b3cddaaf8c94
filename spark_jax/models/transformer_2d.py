"""Transformer2DModel over continuous inputs (``diffusers.models.transformers.transformer_2d``), NHWC."""

from __future__ import annotations

import jax
from flax import nnx

from spark_jax.models.attention import BasicTransformerBlock
from spark_jax.models.resnet import group_norm
from spark_jax.models.taps import NO_TAPS, Tapped, TapRecorder


class Transformer2DModel(Tapped, nnx.Module):
    """GroupNorm, proj_in, a stack of BasicTransformerBlocks, proj_out, residual.

    ``proj_in``/``proj_out`` are Linear layers when ``use_linear_projection`` (SDXL family, SD 2.x)
    and 1x1 convolutions otherwise (SD 1.x).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        heads: int,
        dim_head: int,
        num_layers: int,
        cross_attention_dim: int,
        norm_num_groups: int,
        use_linear_projection: bool,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        # diffusers hard-codes eps=1e-6 for this GroupNorm (blocks use norm_eps=1e-5).
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner, rngs=rngs)
            self.proj_out = nnx.Linear(inner, in_channels, rngs=rngs)
        else:
            self.proj_in = nnx.Conv(in_channels, inner, (1, 1), padding="VALID", rngs=rngs)
            self.proj_out = nnx.Conv(inner, in_channels, (1, 1), padding="VALID", rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim, rngs=rngs
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C]; context: [B, L, D] -> [B, H, W, C] (tokens in row-major order)."""
        b, h, w, c = x.shape
        tokens = self.norm(x)
        if self.use_linear_projection:
            tokens = self.proj_in(tokens.reshape(b, h * w, c))
        else:
            tokens = self.proj_in(tokens)
            tokens = tokens.reshape(b, h * w, tokens.shape[-1])
        for block in self.transformer_blocks:
            tokens = block(tokens, context, rec)
        if self.use_linear_projection:
            out = self.proj_out(tokens).reshape(b, h, w, -1)
        else:
            out = self.proj_out(tokens.reshape(b, h, w, -1))
        out = out + x
        rec.record(self.tap_path, "output", out)
        return out
