"""UNet and VAE-encoder blocks (``diffusers.models.unets.unet_2d_blocks``), NHWC.

The blocks of the SD 1.x/2.x and SDXL family: DownBlock2D, CrossAttnDownBlock2D, UNetMidBlock2D (the UNet's
ResNet-only form and the VAE's ResNet-attention-ResNet form), UNetMidBlock2DCrossAttn, UpBlock2D,
CrossAttnUpBlock2D, and the VAE's DownEncoderBlock2D. Down blocks return their skip connections (diffusers'
``output_states``: every layer's output, then the downsampler's); up blocks pop them from the end, one per
ResNet, concatenated after the running map on the channel axis. Each block records its ``output`` tap.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.attention import Attention
from spark_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from spark_jax.models.taps import NO_TAPS, Tapped, TapRecorder
from spark_jax.models.transformer_2d import Transformer2DModel


def _resnets(
    in_channels: Sequence[int], out_channels: int, *, temb_channels: int | None, groups: int, eps: float,
    output_scale_factor: float = 1.0, rngs: nnx.Rngs,
) -> nnx.List:
    return nnx.List(
        [
            ResnetBlock2D(
                c, out_channels, temb_channels=temb_channels, groups=groups, eps=eps,
                output_scale_factor=output_scale_factor, rngs=rngs,
            )
            for c in in_channels
        ]
    )


def _transformers(
    channels: int, depths: Sequence[int], *, heads: int, cross_attention_dim: int, groups: int,
    use_linear_projection: bool, rngs: nnx.Rngs,
) -> nnx.List:
    if channels % heads:
        raise ValueError(f"{channels} channels do not split into {heads} attention heads")
    # diffusers passes the head count and derives the width: channels // heads.
    return nnx.List(
        [
            Transformer2DModel(
                channels, heads=heads, dim_head=channels // heads, num_layers=n,
                cross_attention_dim=cross_attention_dim, norm_num_groups=groups,
                use_linear_projection=use_linear_projection, rngs=rngs,
            )
            for n in depths
        ]
    )


class DownBlock2D(Tapped, nnx.Module):
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
        self.resnets = _resnets(
            [in_channels] + [out_channels] * (num_layers - 1), out_channels, temb_channels=temb_channels,
            groups=groups, eps=eps, rngs=rngs,
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, rec: TapRecorder = NO_TAPS
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """x: [B, H, W, C_in]; temb: [B, T] or None -> ([B, H', W', C_out], skip maps)."""
        skips = []
        for resnet in self.resnets:
            x = resnet(x, temb, rec)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, rec)
            skips.append(x)
        rec.record(self.tap_path, "output", x)
        return x, tuple(skips)


class DownEncoderBlock2D(DownBlock2D):
    """The VAE encoder's down block: DownBlock2D without time embedding or skip connections."""

    def __call__(self, x: jax.Array, temb: None = None, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H', W', C_out]."""
        return super().__call__(x, None, rec)[0]


class CrossAttnDownBlock2D(Tapped, nnx.Module):
    """Alternating ResNet and Transformer2DModel layers, then an optional downsampler."""

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
        rngs: nnx.Rngs,
    ):
        if len(transformer_layers_per_block) != num_layers:
            raise ValueError(
                f"transformer_layers_per_block {list(transformer_layers_per_block)} must have one entry per "
                f"layer ({num_layers})"
            )
        self.resnets = _resnets(
            [in_channels] + [out_channels] * (num_layers - 1), out_channels, temb_channels=temb_channels,
            groups=groups, eps=eps, rngs=rngs,
        )
        self.attentions = _transformers(
            out_channels, transformer_layers_per_block, heads=heads, cross_attention_dim=cross_attention_dim,
            groups=groups, use_linear_projection=use_linear_projection, rngs=rngs,
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=downsample_padding, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array, rec: TapRecorder = NO_TAPS
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """x: [B, H, W, C_in]; temb: [B, T]; context: [B, L, D] -> ([B, H', W', C_out], skip maps)."""
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb, rec), context, rec)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, rec)
            skips.append(x)
        rec.record(self.tap_path, "output", x)
        return x, tuple(skips)


class UNetMidBlock2D(Tapped, nnx.Module):
    """A ResNet, then ``num_layers`` x (optional single-head spatial self-attention, ResNet).

    The UNet's ``mid_block_type="UNetMidBlock2D"`` is ``num_layers=0`` (one ResNet with the time embedding, as in
    SSD-1B); the VAE encoder's mid block is ``num_layers=1`` with attention and no time embedding.
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        eps: float,
        add_attention: bool,
        num_layers: int = 1,
        temb_channels: int | None = None,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(
            [channels] * (num_layers + 1), channels, temb_channels=temb_channels, groups=groups, eps=eps,
            output_scale_factor=output_scale_factor, rngs=rngs,
        )
        # diffusers' Encoder sets attention_head_dim = channels: one head as wide as the block.
        self.attentions = (
            nnx.List(
                [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups,
                           norm_eps=eps, residual_connection=True, rngs=rngs)
                 for _ in range(num_layers)]
            )
            if add_attention
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C]; temb: [B, T] or None -> [B, H, W, C]."""
        x = self.resnets[0](x, temb, rec)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions is not None:
                x = self.attentions[i](x, rec=rec)
            x = resnet(x, temb, rec)
        rec.record(self.tap_path, "output", x)
        return x


class UNetMidBlock2DCrossAttn(Tapped, nnx.Module):
    """ResNet, Transformer2DModel, ResNet (diffusers' ``num_layers=1``, the only form the UNet builds)."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        transformer_layers: int,
        heads: int,
        cross_attention_dim: int,
        groups: int,
        eps: float,
        use_linear_projection: bool,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(
            [channels] * 2, channels, temb_channels=temb_channels, groups=groups, eps=eps,
            output_scale_factor=output_scale_factor, rngs=rngs,
        )
        self.attentions = _transformers(
            channels, [transformer_layers], heads=heads, cross_attention_dim=cross_attention_dim, groups=groups,
            use_linear_projection=use_linear_projection, rngs=rngs,
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C]; temb: [B, T]; context: [B, L, D] -> [B, H, W, C]."""
        x = self.resnets[0](x, temb, rec)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context, rec), temb, rec)
        rec.record(self.tap_path, "output", x)
        return x


def _up_resnet_channels(in_channels: int, prev_output_channels: int, out_channels: int, num_layers: int) -> list[int]:
    """Input widths of an up block's ResNets: the running map (the previous block's output, then this block's)
    concatenated with its skip (this resolution's maps; the last one the downsampler output of the block below)."""
    return [
        (prev_output_channels if i == 0 else out_channels) + (in_channels if i == num_layers - 1 else out_channels)
        for i in range(num_layers)
    ]


class UpBlock2D(Tapped, nnx.Module):
    """ResNets over [map, skip] concatenations, then an optional 2x upsampler."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        groups: int,
        eps: float,
        add_upsample: bool,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(
            _up_resnet_channels(in_channels, prev_output_channels, out_channels, num_layers), out_channels,
            temb_channels=temb_channels, groups=groups, eps=eps, rngs=rngs,
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        upsample_size: tuple[int, int] | None = None,
        rec: TapRecorder = NO_TAPS,
    ) -> jax.Array:
        """x: [B, H, W, C_prev]; skips: this block's skip maps, used from the last -> [B, H', W', C_out]."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, rec)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size, rec)
        rec.record(self.tap_path, "output", x)
        return x


class CrossAttnUpBlock2D(Tapped, nnx.Module):
    """ResNet + Transformer2DModel layers over [map, skip] concatenations, then an optional 2x upsampler."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
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
        add_upsample: bool,
        rngs: nnx.Rngs,
    ):
        if len(transformer_layers_per_block) != num_layers:
            raise ValueError(
                f"transformer_layers_per_block {list(transformer_layers_per_block)} must have one entry per "
                f"layer ({num_layers})"
            )
        self.resnets = _resnets(
            _up_resnet_channels(in_channels, prev_output_channels, out_channels, num_layers), out_channels,
            temb_channels=temb_channels, groups=groups, eps=eps, rngs=rngs,
        )
        self.attentions = _transformers(
            out_channels, transformer_layers_per_block, heads=heads, cross_attention_dim=cross_attention_dim,
            groups=groups, use_linear_projection=use_linear_projection, rngs=rngs,
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, rngs=rngs)]) if add_upsample else None

    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None = None,
        rec: TapRecorder = NO_TAPS,
    ) -> jax.Array:
        """As ``UpBlock2D``, with context: [B, L, D] for the cross-attentions."""
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            x = attn(resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb, rec), context, rec)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size, rec)
        rec.record(self.tap_path, "output", x)
        return x
