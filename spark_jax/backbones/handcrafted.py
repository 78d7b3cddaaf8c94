"""A weights-free token-feature backbone for the demo and CI: colour, texture and position per token.

This is NOT the paper's backbone (SPARK and DiffCut use SSD-1B self-attention features, see
``spark_jax.backbones.diffusion``). It exists so that the whole pipeline — preprocessing, SPARK, upsampling, PAMR,
scoring — runs on a fresh machine with nothing downloaded, and so CI can test it end to end. Its features
are classical low-level statistics, so it separates regions that differ in colour or texture and knows
nothing of objects.

Per token (a ``patch x patch`` cell of the prepared image) it stacks, each channel standardised over the
tokens of its image and scaled by its group weight:

* colour: mean of an opponent colour space (luminance, red-green, yellow-blue);
* texture: standard deviation of the three colour channels, mean absolute horizontal/vertical luminance
  differences at one and two pixels, mean absolute Laplacian, the two orientation components of the
  structure tensor (``dx^2 - dy^2``, ``2 dx dy``), each also averaged over the 3x3 token neighbourhood so
  that textures coarser than a patch are seen;
* position: the token's (row, column) in [-1, 1].

Taps (the contract of ``spark_jax.backbones.diffusion.Backbone.extract``, so every method runs on the demo): the
features are the output of one pretend self-attention module ``tokens.attn1`` with a single head whose queries,
keys and values are the features themselves:

* ``tokens.attn1:output`` [B, N, C] and ``tokens:output`` [B, g, g, C]: the features (the feature tap);
* ``tokens.attn1:q`` / ``:k`` / ``:v`` [B, 1, N, C]: the features again, as one head;
* ``tokens.attn1:probs`` [B, 1, N, N]: softmax over j of ``attention_scale * <x_i, x_j>`` (``attention_scale``
  None: 1 / sqrt(C), i.e. softmax(q k^T / sqrt(d)) as in the UNet), the attention-like map of these features;
  ``tokens.attn1:probs_mean`` [B, N, N] the same (one head).

It has no UNet taps (down/mid/up blocks, cross-attention): asking for one names the diffusion backbone.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.data.preprocess import prepare_image
from spark_jax.models.taps import check_taps, parse_tap

__all__ = ["HandcraftedConfig", "handcrafted_features", "handcrafted_taps", "HandcraftedBackbone", "TAP_NAMES",
           "FEATURE_TAP"]

FEATURE_TAP = "tokens.attn1:output"
TAP_NAMES = ("tokens.attn1:q", "tokens.attn1:k", "tokens.attn1:v", "tokens.attn1:probs", "tokens.attn1:probs_mean",
             FEATURE_TAP, "tokens:output")


@dataclasses.dataclass(frozen=True)
class HandcraftedConfig:
    """Settings of the handcrafted backbone.

    Attributes:
        resolution: side of the prepared (cropped, resized) image.
        patch: pixels per token side; the token grid is ``resolution // patch``.
        colour_weight: scale of the colour channels after standardisation.
        texture_weight: scale of the texture channels.
        position_weight: scale of the position channels (0 drops spatial bias).
        attention_scale: logit scale of the attention-like taps (``tokens.attn1:probs``): softmax over tokens of
            ``attention_scale * <x_i, x_j>``; None is 1 / sqrt(C), the UNet's softmax(q k^T / sqrt(d)).
    """

    resolution: int = 256
    patch: int = 8
    colour_weight: float = 1.0
    texture_weight: float = 1.0
    position_weight: float = 0.25
    attention_scale: float | None = None

    def __post_init__(self):
        if self.attention_scale is not None and not self.attention_scale > 0:
            raise ValueError(f"attention_scale must be None (1 / sqrt(C)) or > 0, got {self.attention_scale!r}")
        if self.patch < 2 or self.resolution % self.patch:
            raise ValueError(
                f"resolution ({self.resolution}) must be a multiple of patch ({self.patch}), patch >= 2"
            )

    @property
    def grid(self) -> int:
        return self.resolution // self.patch


# A NumPy constant: a device array here would start JAX's backend at import, before a multi-host run can call
# jax.distributed.initialize (spark_jax.distributed).
_OPPONENT = np.array(
    [[1 / 3, 1 / 3, 1 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]], np.float32
)  # rows: luminance, red-green, yellow-blue


def _pool(x: jax.Array, patch: int) -> jax.Array:
    """[B, S, S, C] -> [B, S/p, S/p, C] mean over patches."""
    b, s, _, c = x.shape
    g = s // patch
    return x.reshape(b, g, patch, g, patch, c).mean(axis=(2, 4))


def _neighbourhood_mean(t: jax.Array) -> jax.Array:
    """3x3 token box filter with edge replication. [B, g, g, C] -> same."""
    padded = jnp.pad(t, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    g = t.shape[1]
    return sum(padded[:, i : i + g, j : j + g, :] for i in range(3) for j in range(3)) / 9.0


def _diff(x: jax.Array, axis: int, step: int) -> jax.Array:
    """|x[i + step] - x[i]| along ``axis`` with edge replication (same shape)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, step)
    xp = jnp.pad(x, pad, mode="edge")
    n = x.shape[axis]
    return jnp.abs(jax.lax.slice_in_dim(xp, step, step + n, axis=axis) - x)


def _standardise(t: jax.Array) -> jax.Array:
    mean = t.mean(axis=(1, 2), keepdims=True)
    std = t.std(axis=(1, 2), keepdims=True)
    return (t - mean) / (std + 1e-6)


def handcrafted_features(images: jax.Array, cfg: HandcraftedConfig = HandcraftedConfig()) -> jax.Array:
    """Token features of a batch of images.

    Args:
        images: ``[B, H, W, 3]`` uint8 (or float in [0, 1]) RGB, all of one shape; they are center-cropped
            and resized with :func:`spark_jax.data.preprocess.prepare_image` (the paper's preprocessing).
        cfg: settings.

    Returns:
        ``[B, g, g, 15]`` float32 (3 colour, 10 texture, 2 position channels) with ``g = cfg.resolution // cfg.patch``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3] RGB, got shape {images.shape}")
    x = prepare_image(images, cfg.resolution)
    return features_from_prepared(x, cfg)


def features_from_prepared(x: jax.Array, cfg: HandcraftedConfig = HandcraftedConfig()) -> jax.Array:
    """As :func:`handcrafted_features` on images already prepared: ``[B, S, S, 3]`` float in [0, 1], S = resolution."""
    if x.ndim != 4 or x.shape[1:] != (cfg.resolution, cfg.resolution, 3):
        raise ValueError(
            f"prepared images must be [B, {cfg.resolution}, {cfg.resolution}, 3], got shape {x.shape}"
        )
    x = x.astype(jnp.float32)
    opp = jnp.einsum("bhwc,dc->bhwd", x, _OPPONENT)
    lum = opp[..., :1]
    p = cfg.patch

    colour = _pool(opp, p)
    spread = jnp.sqrt(jnp.maximum(_pool(x * x, p) - _pool(x, p) ** 2, 0.0))
    dx, dy = _diff(lum, 2, 1), _diff(lum, 1, 1)
    dx2, dy2 = _diff(lum, 2, 2), _diff(lum, 1, 2)
    lap = jnp.abs(
        jnp.pad(lum, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")[:, 1:-1, :-2]
        + jnp.pad(lum, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")[:, 1:-1, 2:]
        + jnp.pad(lum, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")[:, :-2, 1:-1]
        + jnp.pad(lum, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")[:, 2:, 1:-1]
        - 4 * lum
    )
    gx = jnp.diff(jnp.pad(lum, ((0, 0), (0, 0), (0, 1), (0, 0)), mode="edge"), axis=2)
    gy = jnp.diff(jnp.pad(lum, ((0, 0), (0, 1), (0, 0), (0, 0)), mode="edge"), axis=1)
    orient = jnp.concatenate([gx * gx - gy * gy, 2 * gx * gy], axis=-1)
    texture = _pool(jnp.concatenate([dx, dy, dx2, dy2, lap, orient], axis=-1), p)
    texture = jnp.concatenate([spread, texture], axis=-1)  # 3 + 7 = 10 channels
    texture = 0.5 * (texture + _neighbourhood_mean(texture))

    b, g = x.shape[0], cfg.grid
    coords = (jnp.arange(g, dtype=jnp.float32) + 0.5) / g * 2 - 1
    pos = jnp.stack(jnp.meshgrid(coords, coords, indexing="ij"), axis=-1)
    pos = jnp.broadcast_to(pos[None], (b, g, g, 2))
    return jnp.concatenate(
        [
            cfg.colour_weight * _standardise(colour),
            cfg.texture_weight * _standardise(texture) / jnp.sqrt(10.0 / 3.0),  # groups weigh alike
            cfg.position_weight * pos,
        ],
        axis=-1,
    )


_TAPS_HINT = (
    f"The handcrafted backbone provides {', '.join(TAP_NAMES)} (its features as one pretend self-attention head). "
    "UNet taps (down/mid/up blocks, attn2, conv_out) come from the diffusion backbone: pass "
    "--checkpoint=<a diffusers folder> (spark_jax.load_backbone)."
)


def _check_handcrafted_taps(taps: Sequence[str]) -> tuple[str, ...]:
    return check_taps(taps, TAP_NAMES, hint=_TAPS_HINT)


def handcrafted_taps(x: jax.Array, cfg: HandcraftedConfig, taps: Sequence[str]) -> dict[str, jax.Array]:
    """The requested taps (module docstring) of prepared images ``[B, S, S, 3]`` in [0, 1]; ``taps`` static."""
    names = _check_handcrafted_taps(taps)
    maps = features_from_prepared(x, cfg)
    b, g, _, c = maps.shape
    tokens = maps.reshape(b, g * g, c)
    out: dict[str, jax.Array] = {}
    for name in names:
        _, quantity = parse_tap(name)
        if name == "tokens:output":
            out[name] = maps
        elif quantity == "output":
            out[name] = tokens
        elif quantity in ("q", "k", "v"):
            out[name] = tokens[:, None]
        else:
            scale = cfg.attention_scale if cfg.attention_scale is not None else c**-0.5
            logits = jnp.einsum("bic,bjc->bij", tokens, tokens, precision=jax.lax.Precision.HIGHEST) * scale
            probs = jax.nn.softmax(logits, axis=-1)
            out[name] = probs[:, None] if quantity == "probs" else probs
    return out


# Module-level jits with the (hashable) config static: every backbone object shares the compilation cache.
_raw_jit = jax.jit(handcrafted_features, static_argnums=1)
_prepared_jit = jax.jit(features_from_prepared, static_argnums=1)
_taps_jit = jax.jit(handcrafted_taps, static_argnums=(1, 2))


class HandcraftedBackbone:
    """The demo/CI backbone behind the same interface as ``spark_jax.backbones.diffusion``: ``extract_features(images)``.

    Args:
        cfg: settings; ``cfg.resolution`` is the preprocessing size, ``cfg.grid`` the token grid.
    """

    name = "handcrafted"

    def __init__(self, cfg: HandcraftedConfig = HandcraftedConfig()):
        self.cfg = cfg

    @property
    def resolution(self) -> int:
        return self.cfg.resolution

    @property
    def token_grid(self) -> tuple[int, int]:
        return (self.cfg.grid, self.cfg.grid)

    def extract_features(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` raw RGB images of one shape -> ``[B, g, g, C]`` token features."""
        return _raw_jit(jnp.asarray(images), self.cfg)

    def extract_features_prepared(self, x: jax.Array) -> jax.Array:
        """``[B, S, S, 3]`` float images already prepared at ``resolution`` -> ``[B, g, g, C]``."""
        return _prepared_jit(jnp.asarray(x), self.cfg)

    # The tap contract of the diffusion backbone (``Backbone.extract``).
    feature_tap = FEATURE_TAP

    def tap_names(self) -> tuple[str, ...]:
        return TAP_NAMES

    def tap_grid(self, name: str) -> tuple[int, int]:
        """The token grid of a tap (every tap of this backbone lives on the one grid)."""
        _check_handcrafted_taps((name,))
        return self.token_grid

    def extract(self, images: jax.Array, taps: Sequence[str]) -> dict[str, jax.Array]:
        """``[B, H, W, 3]`` raw RGB images of one shape (uint8, or float in [0, 1]) -> ``{tap: array}``."""
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3] RGB, got shape {images.shape}")
        return self.extract_prepared(_prepare_jit(images, self.cfg.resolution), taps)

    def extract_prepared(self, x: jax.Array, taps: Sequence[str]) -> dict[str, jax.Array]:
        """``[B, S, S, 3]`` float images prepared at ``resolution`` -> ``{tap: array}`` (shapes: module docstring)."""
        names = _check_handcrafted_taps(taps)
        x = jnp.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (self.cfg.resolution, self.cfg.resolution, 3):
            raise ValueError(
                f"prepared images must be [B, {self.cfg.resolution}, {self.cfg.resolution}, 3], got shape {x.shape}"
            )
        return _taps_jit(x, self.cfg, names)


_prepare_jit = jax.jit(prepare_image, static_argnums=1)
