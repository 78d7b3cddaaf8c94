"""ResnetBlock2D, Downsample2D and Upsample2D (``diffusers.models.resnet`` / ``downsampling`` / ``upsampling``),
NHWC, in Flax NNX. Each records its ``output`` tap (``spark_jax.models.taps``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_jax.models.taps import NO_TAPS, Tapped, TapRecorder


def group_norm(num_channels: int, num_groups: int, eps: float, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """torch.nn.GroupNorm equivalent: two-pass variance (the fast E[x^2]-E[x]^2 form loses digits)."""
    return nnx.GroupNorm(
        num_channels, num_groups=num_groups, epsilon=eps, use_fast_variance=False, rngs=rngs
    )


class ResnetBlock2D(Tapped, nnx.Module):
    """Pre-norm residual block with an optional additive time embedding ('default' time_embedding_norm).

    out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))) / scale
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
        rngs: nnx.Rngs,
    ):
        self.output_scale_factor = output_scale_factor
        self.norm1 = group_norm(in_channels, groups, eps, rngs)
        self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.time_emb_proj = (
            nnx.Linear(temb_channels, out_channels, rngs=rngs) if temb_channels is not None else None
        )
        self.norm2 = group_norm(out_channels, groups, eps, rngs)
        self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.conv_shortcut = (
            nnx.Conv(in_channels, out_channels, (1, 1), padding="VALID", rngs=rngs)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C_in]; temb: [B, temb_channels] or None -> [B, H, W, C_out]."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D has a time_emb_proj and needs `temb`")
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        out = shortcut + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        rec.record(self.tap_path, "output", out)
        return out


class Downsample2D(Tapped, nnx.Module):
    """Stride-2 3x3 convolution. ``padding=0`` pads right/bottom by one first (the VAE's convention)."""

    def __init__(self, channels: int, *, padding: int, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = nnx.Conv(
            channels, channels, (3, 3), strides=(2, 2), padding=((padding, padding), (padding, padding)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, rec: TapRecorder = NO_TAPS) -> jax.Array:
        """x: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = self.conv(x)
        rec.record(self.tap_path, "output", x)
        return x


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch's ``F.interpolate(mode="nearest")`` of a [B, H, W, C] map to ``size`` (out, in) -> in index
    ``floor(out * H / H_out)``.

    ``jax.image.resize(method="nearest")`` samples half-pixel centres (``floor((out + 0.5) * H / H_out)``), which
    differs from torch's legacy nearest for sizes other than an exact doubling, hence the explicit gather.
    """
    _, h, w, _ = x.shape
    if size == (2 * h, 2 * w):  # the common case: every pixel repeated 2 x 2
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    def source(n_in: int, n_out: int) -> np.ndarray:  # torch computes the scale and the product in float32
        scale = np.float32(n_in) / np.float32(n_out)
        return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)

    rows, cols = source(h, size[0]), source(w, size[1])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class Upsample2D(Tapped, nnx.Module):
    """Nearest-neighbour upsampling (2x, or to an explicit size) then a 3x3 convolution (diffusers' ``use_conv``)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(
        self, x: jax.Array, size: tuple[int, int] | None = None, rec: TapRecorder = NO_TAPS
    ) -> jax.Array:
        """x: [B, H, W, C]; size: output (H', W'), default (2H, 2W) -> [B, H', W', C]."""
        x = self.conv(upsample_nearest(x, size if size is not None else (2 * x.shape[1], 2 * x.shape[2])))
        rec.record(self.tap_path, "output", x)
        return x
