"""Flax NNX ports of the diffusers modules the feature extractor needs (UNet encoder, VAE encoder).

Attribute paths mirror diffusers' parameter names, so a checkpoint key maps to a parameter path by
``weight -> kernel/scale`` plus a transpose (see ``spark_jax.models.convert``).
"""

from spark_jax.models.unet_encoder import UNetEncoder, UNetEncoderConfig, UnsupportedArchitectureError
from spark_jax.models.vae_encoder import VAEEncoder, VAEEncoderConfig

__all__ = [
    "UNetEncoder",
    "UNetEncoderConfig",
    "UnsupportedArchitectureError",
    "VAEEncoder",
    "VAEEncoderConfig",
]
