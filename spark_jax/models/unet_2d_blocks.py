"""Down blocks of the UNet and the VAE encoder (``diffusers.models.unets.unet_2d_blocks``), NHWC.

Only the blocks the encoders need: DownBlock2D, CrossAttnDownBlock2D, DownEncoderBlock2D and the
VAE's UNetMidBlock2D (no time embedding, one spatial attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from spark_jax.models.attention import Attention
from spark_jax.models.resnet import Downsample2D, ResnetBlock2D
from spark_jax.models.transformer_2d import Transformer2DModel


class DownBlock2D(nnx.Module):
    """ResNets then an optional stride-2 downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        num_layers: int,
        groups: int,
        eps: float,
        add_downsample: bool,
        downsample_padding: int,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels,
                    temb_channels=temb_channels, groups=groups, eps=eps, rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, C_in]; temb: [B, T] or None -> [B, H', W', C_out]."""
        for resnet in self.resnets:
            x = resnet(x, temb)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class DownEncoderBlock2D(DownBlock2D):
    """The VAE encoder's down block: DownBlock2D without time embedding."""


class CrossAttnDownBlock2D(nnx.Module):
    """Alternating ResNet and Transformer2DModel layers, then an optional downsampler.

    With ``feature_point=True`` the block ends at the self-attention of the last transformer block
    of its last attention: no downsampler and a truncated last Transformer2DModel.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        transformer_layers_per_block: Sequence[int],
        heads: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        add_downsample: bool,
        downsample_padding: int,
        feature_point: bool = False,
        rngs: nnx.Rngs,
    ):
        if len(transformer_layers_per_block) != num_layers:
            raise ValueError(
                f"transformer_layers_per_block {list(transformer_layers_per_block)} must have one entry per "
                f"layer ({num_layers})"
            )
        if out_channels % heads:
            raise ValueError(f"{out_channels} channels do not split into {heads} attention heads")
        self.feature_point = feature_point
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels, out_channels,
                    temb_channels=temb_channels, groups=groups, eps=eps, rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        # diffusers passes the head count and derives the width: out_channels // heads.
        self.attentions = nnx.List(
            [
                Transformer2DModel(
                    out_channels, heads=heads, dim_head=out_channels // heads, num_layers=n,
                    cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                    use_linear_projection=use_linear_projection,
                    feature_point=feature_point and i == num_layers - 1, rngs=rngs,
                )
                for i, n in enumerate(transformer_layers_per_block)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
            if add_downsample and not feature_point
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in]; temb: [B, T]; context: [B, L, D] -> [B, H', W', C_out].

        For a feature-point block, returns the feature map [B, H, W, C_out] instead.
        """
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = resnet(x, temb)
            if self.feature_point and i == last:
                return attn.features(x, context)
            x = attn(x, context)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UNetMidBlock2D(nnx.Module):
    """The VAE encoder's mid block: ResNet, single-head spatial self-attention, ResNet (no time embedding)."""

    def __init__(self, channels: int, *, groups: int, eps: float, add_attention: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=eps, rngs=rngs)
             for _ in range(2)]
        )
        # diffusers' Encoder sets attention_head_dim = channels: one head as wide as the block.
        self.attentions = (
            nnx.List(
                [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                           norm_eps=eps, residual_connection=True, rngs=rngs)]
            )
            if add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)
