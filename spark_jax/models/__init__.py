"""Flax NNX ports of the diffusers modules the feature extractor needs (the whole UNet with named taps, VAE encoder).

Attribute paths mirror diffusers' parameter names, so a checkpoint key maps to a parameter path by
``weight -> kernel/scale`` plus a transpose (see ``spark_jax.models.convert``).
"""

from spark_jax.models.taps import UnknownTapError
from spark_jax.models.unet import UNet2DConditionModel, UNetConfig, UnsupportedArchitectureError
from spark_jax.models.vae_encoder import VAEEncoder, VAEEncoderConfig

__all__ = [
    "UNet2DConditionModel",
    "UNetConfig",
    "UnknownTapError",
    "UnsupportedArchitectureError",
    "VAEEncoder",
    "VAEEncoderConfig",
]
