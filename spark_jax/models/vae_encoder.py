"""The encoder of diffusers' ``AutoencoderKL`` (Encoder + quant_conv), NHWC, in Flax NNX.

Returns the posterior mean times the VAE's scaling factor (reference facts, section 1: the mean,
not a sample). Run it in float32: the reference does, and SDXL's VAE overflows in float16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from spark_jax.models.resnet import group_norm
from spark_jax.models.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D
from spark_jax.models.unet import UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True)
class VAEEncoderConfig:
    """Architecture and latent scaling of an ``AutoencoderKL``, read from ``vae/config.json``."""

    in_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "vae/config.json") -> VAEEncoderConfig:
        """Parses and validates a diffusers ``AutoencoderKL`` config dict."""
        name = config.get("_class_name", "AutoencoderKL")
        down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
        problem = None
        if name != "AutoencoderKL":
            problem = f"_class_name is {name!r}, not 'AutoencoderKL'"
        elif any(t != "DownEncoderBlock2D" for t in down):
            problem = f"down_block_types {down} (only DownEncoderBlock2D is supported)"
        elif config.get("act_fn", "silu") not in ("silu", "swish"):
            problem = f"act_fn={config.get('act_fn')!r} (only silu is supported)"
        elif config.get("latents_mean") is not None or config.get("latents_std") is not None:
            problem = "per-channel latents_mean/latents_std normalisation is not supported"
        boc = tuple(int(c) for c in config.get("block_out_channels", (64,)))
        if problem is None and len(boc) != len(down):
            problem = f"block_out_channels {boc} and down_block_types {down} differ in length"
        if problem is not None:
            raise UnsupportedArchitectureError(
                f"{source}: {problem}. spark_jax implements the AutoencoderKL of the SD/SDXL family."
            )
        shift = config.get("shift_factor")
        return cls(
            in_channels=int(config.get("in_channels", 3)),
            block_out_channels=boc,
            layers_per_block=int(config.get("layers_per_block", 1)),
            latent_channels=int(config.get("latent_channels", 4)),
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            use_quant_conv=bool(config.get("use_quant_conv", True)),
            mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
            scaling_factor=float(config.get("scaling_factor", 0.18215)),
            shift_factor=None if shift is None else float(shift),
        )


class Encoder(nnx.Module):
    """diffusers' VAE ``Encoder`` with ``double_z``: images -> [mean, logvar] moments."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        norm_num_groups: int,
        mid_block_add_attention: bool,
        rngs: nnx.Rngs,
    ):
        boc = block_out_channels
        eps = 1e-6  # diffusers' Encoder hard-codes resnet_eps=1e-6
        self.conv_in = nnx.Conv(in_channels, boc[0], (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    boc[max(i - 1, 0)], boc[i], temb_channels=None, num_layers=layers_per_block,
                    groups=norm_num_groups, eps=eps, add_downsample=i < len(boc) - 1, downsample_padding=0,
                    rngs=rngs,
                )
                for i in range(len(boc))
            ]
        )
        self.mid_block = UNetMidBlock2D(
            boc[-1], groups=norm_num_groups, eps=eps, add_attention=mid_block_add_attention, rngs=rngs
        )
        self.conv_norm_out = group_norm(boc[-1], norm_num_groups, eps, rngs)
        self.conv_out = nnx.Conv(boc[-1], 2 * out_channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C_in] -> [B, H / 2^(n-1), W / 2^(n-1), 2 * latent_channels]."""
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class VAEEncoder(nnx.Module):
    """``AutoencoderKL`` encoder + ``quant_conv``; returns the scaled posterior mean."""

    def __init__(self, cfg: VAEEncoderConfig, *, rngs: nnx.Rngs):
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor
        self.encoder = Encoder(
            in_channels=cfg.in_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, mid_block_add_attention=cfg.mid_block_add_attention, rngs=rngs,
        )
        c = 2 * cfg.latent_channels
        self.quant_conv = nnx.Conv(c, c, (1, 1), padding="VALID", rngs=rngs) if cfg.use_quant_conv else None

    def __call__(self, images: jax.Array) -> jax.Array:
        """Latents of images.

        Args:
          images: [B, H, W, 3] in [-1, 1].

        Returns:
          [B, H / f, W / f, latent_channels] = (posterior mean - shift_factor) * scaling_factor.
        """
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean = moments[..., : self.latent_channels]
        if self.shift_factor is not None:
            mean = mean - self.shift_factor
        return mean * self.scaling_factor
