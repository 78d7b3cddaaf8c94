"""Transformer2DModel over continuous inputs (``diffusers.models.transformers.transformer_2d``), NHWC."""

from __future__ import annotations

import jax
from flax import nnx

from spark_jax.models.attention import BasicTransformerBlock
from spark_jax.models.resnet import group_norm


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in, a stack of BasicTransformerBlocks, proj_out, residual.

    ``proj_in``/``proj_out`` are Linear layers when ``use_linear_projection`` (SDXL family, SD 2.x)
    and 1x1 convolutions otherwise (SD 1.x). With ``feature_point=True`` the module ends at the
    self-attention output of its last block: ``proj_out`` is not built and ``features`` is the only
    forward.
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
        feature_point: bool = False,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.feature_point = feature_point
        # diffusers hard-codes eps=1e-6 for this GroupNorm (blocks use norm_eps=1e-5).
        self.norm = group_norm(in_channels, norm_num_groups, 1e-6, rngs)
        if use_linear_projection:
            self.proj_in = nnx.Linear(in_channels, inner, rngs=rngs)
        else:
            self.proj_in = nnx.Conv(in_channels, inner, (1, 1), padding="VALID", rngs=rngs)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner, heads=heads, dim_head=dim_head, cross_attention_dim=cross_attention_dim,
                    attn1_only=feature_point and i == num_layers - 1, rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        if not feature_point:
            if use_linear_projection:
                self.proj_out = nnx.Linear(inner, in_channels, rngs=rngs)
            else:
                self.proj_out = nnx.Conv(inner, in_channels, (1, 1), padding="VALID", rngs=rngs)

    def _tokens(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = self.norm(x)
        if self.use_linear_projection:
            return self.proj_in(x.reshape(b, h * w, c))
        x = self.proj_in(x)
        return x.reshape(b, h * w, x.shape[-1])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, H, W, C]; context: [B, L, D] -> [B, H, W, C]."""
        if self.feature_point:
            raise ValueError("this Transformer2DModel ends at the feature point; call `features`")
        b, h, w, _ = x.shape
        tokens = self._tokens(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear_projection:
            out = self.proj_out(tokens).reshape(b, h, w, -1)
        else:
            out = self.proj_out(tokens.reshape(b, h, w, -1))
        return out + x

    def features(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Self-attention output of the last block (after to_out, before the residual).

        Args:
          x: [B, H, W, C] input map.
          context: [B, L, D] text embeddings.

        Returns:
          [B, H, W, inner] tokens in row-major order reshaped to the map.
        """
        b, h, w, _ = x.shape
        tokens = self._tokens(x)
        for block in self.transformer_blocks[:-1]:
            tokens = block(tokens, context)
        return self.transformer_blocks[-1].self_attention(tokens).reshape(b, h, w, -1)
