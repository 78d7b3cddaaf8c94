"""The diffusion feature extractor shared by SPARK and DiffCut (reference facts, section 1).

images -> center crop to side min(H, W) - 1 -> bilinear resize -> [-1, 1] -> VAE posterior mean x
scaling factor (float32) -> one seeded noise tensor added at timestep t -> UNet encoder with the
empty-prompt conditioning -> self-attention features of the last transformer block of the last
attention down block, [B, h, w, C] (32 x 32 x 1280 for SSD-1B at 1024 px).

Usage::

    backbone = load_backbone("segmind/SSD-1B", BackboneConfig())
    features = backbone.extract_features(images_uint8)   # [B, 32, 32, 1280]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_jax.backbones.checkpoint import (
    SDXL_VAE_REQUIRED_FIELDS,
    VAE_REQUIRED_FIELDS,
    CheckpointError,
    check_pipeline_files,
    resolve_pretrained,
)
from spark_jax.models.convert import load_unet, load_vae_encoder, unet_config, vae_encoder_config
from spark_jax.backbones.conditioning import (
    add_noise,
    load_alphas_cumprod,
    load_noise_file,
    prompt_embeddings,
    sdxl_time_ids,
    shared_noise,
)
from spark_jax.backbones.handcrafted import TAP_NAMES as HANDCRAFTED_TAPS
from spark_jax.models.taps import UnknownTapError, check_taps
from spark_jax.models.unet import UNet2DConditionModel, UNetConfig
from spark_jax.models.vae_encoder import VAEEncoder, VAEEncoderConfig
from spark_jax.data.preprocess import prepare_image

_log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
NOISE_SOURCES = ("jax", "torch", "file", "none")
MATMUL_PRECISIONS = ("highest", "high", "default")


# jax.random.key keeps only the low 32 bits of a seed when x64 is off (key(2**32) == key(0)), so larger
# seeds would silently share a draw; torch accepts these too.
SEED_RANGE = (0, 2**32)


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Options of the feature extractor; defaults are the reference pipeline's (DiffCut, SPARK).

    Every field is validated here (a ValueError naming the field and its value); what depends on the checkpoint
    (the resolution's multiple, the schedule's length, the noise file's shape) is checked by ``load_backbone``.

    Attributes:
      resolution: side of the square the images are resized to (1024 in the papers); positive, and a multiple of
        the VAE's downscale x the UNet's downsampling before the feature point (32 for SSD-1B and SDXL).
      timestep: diffusion timestep t of the forward noising (50); in [0, num_train_timesteps) of the
        checkpoint's scheduler (1000 for the SD family).
      seed: seed of the noise tensor shared by every image (42); an int in [0, 2**32).
      noise_source: "jax" (JAX's generator: the reference's distribution, another sample), "torch" (torch's *CPU*
        generator: ``torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(seed))``; torch is
        needed once, then the draw is cached) or "file" (the array in ``noise_file``). DiffCut's released
        pipeline (``tools/ldm.py``) draws ``torch.randn(1, 4, h, w, generator=torch.Generator(device).manual_seed(42),
        device=device)`` on ``cuda:0`` when a GPU is present, and torch's CUDA generator gives other numbers than
        its CPU one: "torch" is DiffCut's draw only on a machine without a GPU. To use the CUDA draw, save it
        once where a GPU is, ``np.save("eps.npy", torch.randn(1, 4, 128, 128, generator=torch.Generator("cuda")
        .manual_seed(42), device="cuda").cpu().numpy())``, and pass it with ``noise_source="file"``.
        "none": no forward noising at all: the clean latent (posterior mean x scaling factor, not scaled by
        sqrt(abar_t)) enters the UNet with the timestep's embedding, as DiffSeg does (t = 300); ``seed`` is unused.
      noise_file: path of a ``.npy`` file holding the noise in torch's layout: one float array [1, c, h, w]
        (NCHW; c = 4 and h = w = resolution / 8 for the SD family: (1, 4, 128, 128) at 1024 px), finite; float32
        to be reproduced bit for bit. Required with ``noise_source="file"`` and refused otherwise; its shape,
        dtype and values are checked when the backbone is loaded.
      unet_dtype: "float32", "bfloat16" or "float16" for the UNet; the VAE always runs in float32.
        The reference ran float16 on GPU; float32 is the default here because it is exact and
        reduced precision is slow on CPUs.
      prompt: the text prompt ("" in the papers).
      variant: weight-file variant ("fp16" for ``*.fp16.safetensors``) or None for the default.
      cache_dir: cache of converted weights and prompt embeddings (default ``~/.cache/spark_jax``).
      matmul_precision: precision of every matmul and convolution of the UNet, VAE and attention, applied
        to the whole jitted extractor (``jax.default_matmul_precision``): "highest" (float32 throughout, the
        default: exact), "high" (bf16_3x / TF32-class passes) or "default" (the backend's default: TF32 on
        recent NVIDIA GPUs, one bfloat16 pass on TPUs). On CPUs all three compile to the same program.
      taps: the taps this backbone will serve, or None for every tap of the UNet (the whole UNet's parameters
        are held: 1.33B for SSD-1B, 5.3 GB in float32). With taps given, only the parameters the forward reads up
        to the last of them are held (SPARK's feature tap: SSD-1B's down blocks up to it, ~0.44B), and
        ``extract`` serves those taps and any tap before them in forward order (``UNetConfig.tap_names()``);
        a later one is refused by name.
    """

    resolution: int = 1024
    timestep: int = 50
    seed: int = 42
    noise_source: str = "jax"
    unet_dtype: str = "float32"
    prompt: str = ""
    variant: str | None = None
    cache_dir: str | None = None
    noise_file: str | None = None
    matmul_precision: str = "highest"
    taps: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.taps is not None and (isinstance(self.taps, str) or not isinstance(self.taps, tuple)
                                      or not self.taps or not all(isinstance(t, str) for t in self.taps)):
            raise ValueError(f"BackboneConfig.taps must be None (every tap) or a non-empty tuple of tap names, got "
                             f"{self.taps!r}")
        for name in ("resolution", "timestep", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"BackboneConfig.{name} must be an int, got {value!r}")
        if self.resolution <= 0:
            raise ValueError(f"BackboneConfig.resolution must be positive, got {self.resolution}")
        if self.timestep < 0:
            raise ValueError(
                f"BackboneConfig.timestep must be >= 0 (a step of the training schedule, 50 in the papers), "
                f"got {self.timestep}"
            )
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"BackboneConfig.seed must be in [0, 2**32), got {self.seed}")
        if self.unet_dtype not in _DTYPES:
            raise ValueError(f"BackboneConfig.unet_dtype={self.unet_dtype!r}; choose one of {sorted(_DTYPES)}")
        if self.noise_source not in NOISE_SOURCES:
            raise ValueError(f"BackboneConfig.noise_source={self.noise_source!r}; choose one of {NOISE_SOURCES}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"BackboneConfig.matmul_precision={self.matmul_precision!r}; choose one of {MATMUL_PRECISIONS}"
            )
        if (self.noise_source == "file") != (self.noise_file is not None):
            raise ValueError("noise_file is given exactly when noise_source='file' (got noise_source="
                             f"{self.noise_source!r}, noise_file={self.noise_file!r})")
        if self.noise_file is not None and (
            not isinstance(self.noise_file, (str, os.PathLike)) or not str(self.noise_file).endswith(".npy")
        ):
            raise ValueError(
                f"BackboneConfig.noise_file={self.noise_file!r} must be the path of a .npy file (what np.save "
                "writes) holding torch's [1, c, h, w] draw"
            )
        if not isinstance(self.prompt, str):
            raise ValueError(f"BackboneConfig.prompt must be a str, got {self.prompt!r}")
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant.isidentifier()):
            raise ValueError(
                f"BackboneConfig.variant must be None or a weight-file variant such as 'fp16' "
                f"(diffusion_pytorch_model.fp16.safetensors), got {self.variant!r}"
            )
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise ValueError(f"BackboneConfig.cache_dir must be None or a path, got {self.cache_dir!r}")


def precision_context(matmul_precision: str | None) -> contextlib.AbstractContextManager:
    """``jax.default_matmul_precision(matmul_precision)``, or no change for None (the caller's setting)."""
    if matmul_precision is None:
        return contextlib.nullcontext()
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision={matmul_precision!r}; choose one of {MATMUL_PRECISIONS} or None")
    return jax.default_matmul_precision(matmul_precision)


class Conditioning(NamedTuple):
    """Per-checkpoint constants of the extractor (pytree of arrays).

    Attributes:
      noise: [1, h, w, c] float32 noise shared by the batch (h = w = resolution / VAE downscale); None with
        ``noise_source="none"`` (the clean latent goes in).
      alpha_bar: [] float32 abar_t of the checkpoint's schedule at the timestep.
      encoder_hidden_states: [L, D] float32 prompt embeddings.
      text_embeds: [P] float32 pooled embedding (SDXL family) or None.
      time_ids: [6] float32 SDXL size conditioning or None.
    """

    noise: jax.Array
    alpha_bar: jax.Array
    encoder_hidden_states: jax.Array
    text_embeds: jax.Array | None
    time_ids: jax.Array | None


def preprocess_images(images: jax.Array, *, resolution: int) -> jax.Array:
    """Reference preprocessing: center crop, bilinear resize (``preprocess.prepare_image``), map to [-1, 1].

    Args:
      images: [B, H, W, 3] uint8 in [0, 255] or floating in [0, 1].
      resolution: output side.

    Returns:
      [B, resolution, resolution, 3] float32 in [-1, 1], the VAE's input convention.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be [B, H, W, 3] RGB (NHWC), got shape {tuple(images.shape)}; add a batch axis "
            "or move channels last"
        )
    if jnp.issubdtype(images.dtype, jnp.integer) and images.dtype != jnp.uint8:
        raise ValueError(f"integer images must be uint8 in [0, 255], got {images.dtype}")
    if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
        raise ValueError(f"images must be uint8 or floating, got {images.dtype}")
    return 2.0 * prepare_image(images, resolution) - 1.0


def extract_features(
    unet: UNet2DConditionModel,
    vae: VAEEncoder,
    images: jax.Array,
    cond: Conditioning,
    *,
    timestep: int,
    resolution: int,
    unet_dtype: jnp.dtype = jnp.float32,
    matmul_precision: str | None = "highest",
) -> jax.Array:
    """Diffusion features of a batch of images (pure; jit it or use ``Backbone``).

    Args:
      unet: the UNet encoder (parameters in ``unet_dtype``).
      vae: the VAE encoder (float32).
      images: [B, H, W, 3] uint8 or float in [0, 1].
      cond: per-checkpoint constants (noise, abar_t, prompt embeddings, time ids).
      timestep: t passed to the UNet (must match ``cond.alpha_bar``).
      resolution: side the images are resized to.
      unet_dtype: compute dtype of the UNet.
      matmul_precision: precision of every dot and convolution (``BackboneConfig.matmul_precision``): "highest"
        (exact float32, the default), "high", "default", or None to keep the caller's
        ``jax.default_matmul_precision``.

    Returns:
      [B, h, w, C] float32 features (h = w = resolution / (8 * 2^feature_block) for SD-family VAEs).
    """
    with precision_context(matmul_precision):
        latents = vae(preprocess_images(images, resolution=resolution))
        return latent_features(unet, latents, cond, timestep=timestep, unet_dtype=unet_dtype, matmul_precision=None)


def encode_prepared(
    unet: UNet2DConditionModel,
    vae: VAEEncoder,
    prepared: jax.Array,
    cond: Conditioning,
    *,
    timestep: int,
    unet_dtype: jnp.dtype = jnp.float32,
    matmul_precision: str | None = "highest",
) -> jax.Array:
    """Features of images already cropped and resized by ``preprocess.prepare_image`` (pure).

    Datasets mix image sizes; preparing each image on its own and batching the prepared squares
    keeps one compiled extractor for all of them.

    Args:
      prepared: [B, S, S, 3] float in [0, 1], S the backbone's resolution.
      (the rest as in ``extract_features``)
    """
    with precision_context(matmul_precision):
        latents = vae(2.0 * prepared.astype(jnp.float32) - 1.0)
        return latent_features(unet, latents, cond, timestep=timestep, unet_dtype=unet_dtype, matmul_precision=None)


def latent_taps(
    unet: UNet2DConditionModel,
    latents: jax.Array,
    cond: Conditioning,
    *,
    taps: Sequence[str],
    timestep: int,
    unet_dtype: jnp.dtype = jnp.float32,
    matmul_precision: str | None = "highest",
) -> dict[str, jax.Array]:
    """UNet stage (pure): noise the latents at ``timestep`` and run the UNet to its last requested tap.

    Args:
      latents: [B, h, w, c] float32 scaled VAE posterior means.
      taps: tap names (``spark_jax.models.taps``; ``unet.config.tap_names()`` lists them).
      (the rest as in ``extract_features``)

    Returns:
      ``{tap: array}`` in the taps' documented layouts, floating taps as float32.
    """
    with precision_context(matmul_precision):
        return _latent_taps(unet, latents, cond, taps=tuple(taps), timestep=timestep, unet_dtype=unet_dtype)


def _latent_taps(
    unet: UNet2DConditionModel, latents: jax.Array, cond: Conditioning, *, taps: tuple[str, ...], timestep: int,
    unet_dtype: jnp.dtype,
) -> dict[str, jax.Array]:
    noisy = latents if cond.noise is None else add_noise(latents, cond.noise, cond.alpha_bar)
    b = latents.shape[0]
    context = jnp.broadcast_to(cond.encoder_hidden_states, (b, *cond.encoder_hidden_states.shape))
    text_embeds = None if cond.text_embeds is None else jnp.broadcast_to(cond.text_embeds, (b, *cond.text_embeds.shape))
    time_ids = None if cond.time_ids is None else jnp.broadcast_to(cond.time_ids, (b, *cond.time_ids.shape))
    out = unet(
        noisy.astype(unet_dtype), jnp.asarray(timestep), context.astype(unet_dtype),
        None if text_embeds is None else text_embeds.astype(unet_dtype), time_ids, taps=taps,
    )
    return {name: value.astype(jnp.float32) for name, value in out.items()}


def latent_features(
    unet: UNet2DConditionModel,
    latents: jax.Array,
    cond: Conditioning,
    *,
    timestep: int,
    unet_dtype: jnp.dtype = jnp.float32,
    matmul_precision: str | None = "highest",
) -> jax.Array:
    """UNet stage (pure): noise the latents at ``timestep`` and run the encoder to the feature point.

    Args:
      latents: [B, h, w, c] float32 scaled VAE posterior means.
      (the rest as in ``extract_features``)

    Returns:
      [B, h', w', C] float32 features.
    """
    with precision_context(matmul_precision):
        return _latent_features(unet, latents, cond, timestep=timestep, unet_dtype=unet_dtype)


def _latent_features(
    unet: UNet2DConditionModel, latents: jax.Array, cond: Conditioning, *, timestep: int, unet_dtype: jnp.dtype
) -> jax.Array:
    tap = unet.config.feature_tap
    feats = _latent_taps(unet, latents, cond, taps=(tap,), timestep=timestep, unet_dtype=unet_dtype)[tap]
    h, w = unet.config.tap_grid(tap, latents.shape[1:3])
    return feats.reshape(latents.shape[0], h, w, -1)


# XLA:CPU hands dots and convolutions to its YNNPACK library fusions by default. On this project's
# 2-core CPU they are slower for both halves of the extractor (float32, 512 px: SDXL VAE 5.3-5.6 s
# off vs 7.1-7.5 s on in back-to-back processes; SSD-1B encoder median 1.87 s off vs 2.09 s on over
# 10 alternating rounds in one process), so the extractor is compiled with them off. The option
# exists only for CPUs.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str) -> dict[str, str] | None:
    """The extractor's XLA compiler options for a device platform (``jax.Device.platform``): the XLA:CPU ones on
    ``'cpu'``, none on any other (``'gpu'``, ``'tpu'``, ...), so no CPU-only option reaches a GPU or TPU compile."""
    return dict(_CPU_COMPILER_OPTIONS) if platform == "cpu" else None


class TapInfo:
    """What a checkpoint's backbone offers (``feature_tap``, ``tap_names()``, ``tap_grid(name)``, ``resolution``),
    from its configs alone: ``tap_info`` gives one before any weight is read (to choose ``BackboneConfig.taps``),
    and every ``Backbone`` is one."""

    def __init__(self, unet_config: UNetConfig, vae_config: VAEEncoderConfig, resolution: int):
        self.unet_config = unet_config
        self.vae_config = vae_config
        self._resolution = resolution

    @property
    def resolution(self) -> int:
        """Side of the square the images are resized to before the VAE."""
        return self._resolution

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self._resolution // self.vae_config.downscale
        return side, side

    @property
    def feature_tap(self) -> str:
        """SPARK's and DiffCut's feature point, e.g. ``down_blocks.2.attentions.1.transformer_blocks.3.attn1:output``."""
        return self.unet_config.feature_tap

    def tap_names(self) -> tuple[str, ...]:
        """Every tap of the UNet, in forward order (``spark_jax.models.taps`` documents names and shapes)."""
        return self.unet_config.tap_names()

    def _check_taps(self, taps: Sequence[str]) -> tuple[str, ...]:
        if not isinstance(taps, str):
            for name in taps:
                if name in HANDCRAFTED_TAPS:
                    raise UnknownTapError(
                        f"tap {name!r} is the handcrafted demo backbone's (HandcraftedBackbone), not a tap of this "
                        f"UNet; its counterpart here is {self.feature_tap.rsplit(':', 1)[0]}:"
                        f"{name.rsplit(':', 1)[1]} (backbone.feature_tap is {self.feature_tap!r})"
                    )
        return check_taps(taps, self.tap_names())

    def tap_grid(self, name: str) -> tuple[int, int]:
        """(h, w) token grid of a tap at this resolution (raises UnknownTapError for a bad name)."""
        self._check_taps((name,))
        return self.unet_config.tap_grid(name, self.latent_grid)


class Backbone(TapInfo):
    """A loaded feature extractor: modules, constants and one jitted ``extract_features``.

    Build with ``load_backbone``. The jitted function takes the parameters as arguments (not as
    baked-in constants), so compilation stays small; it compiles once per input shape and dtype.
    On CPUs it is compiled with ``_CPU_COMPILER_OPTIONS``.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: VAEEncoder,
        cond: Conditioning,
        cfg: BackboneConfig,
        unet_config: UNetConfig,
        vae_config: VAEEncoderConfig,
    ):
        super().__init__(unet_config, vae_config, cfg.resolution)
        self.cfg = cfg
        self.cond = cond
        self._unet_graph, self.unet_params = nnx.split(unet)
        self._vae_graph, self.vae_params = nnx.split(vae)
        options = compiler_options(jax.default_backend())
        self._jitted = jax.jit(self._run, compiler_options=options)
        self._jitted_prepared = jax.jit(self._run_prepared, compiler_options=options)
        # One program per tap set (static): the UNet stops after the last requested tap.
        self._jitted_taps = jax.jit(self._run_taps, static_argnames=("taps", "prepared_input"),
                                    compiler_options=options)

    def replicate(self, sharding: jax.sharding.Sharding) -> None:
        """Places the parameters and constants with ``sharding`` (``spark_jax.sharding.replicated(mesh)``: a copy on
        every device), so that batches split over that mesh find them there instead of copying them every call."""
        self.unet_params, self.vae_params, self.cond = jax.device_put(
            (self.unet_params, self.vae_params, self.cond), sharding)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(h, w, C) of the features of one image."""
        side = self.cfg.resolution // (self.vae_config.downscale * self.unet_config.feature_stride)
        return side, side, self.unet_config.feature_channels

    def _run(self, unet_params, vae_params, cond: Conditioning, images: jax.Array) -> jax.Array:
        return extract_features(
            nnx.merge(self._unet_graph, unet_params), nnx.merge(self._vae_graph, vae_params), images, cond,
            timestep=self.cfg.timestep, resolution=self.cfg.resolution,
            unet_dtype=_DTYPES[self.cfg.unet_dtype], matmul_precision=self.cfg.matmul_precision,
        )

    def _run_prepared(self, unet_params, vae_params, cond: Conditioning, prepared: jax.Array) -> jax.Array:
        return encode_prepared(
            nnx.merge(self._unet_graph, unet_params), nnx.merge(self._vae_graph, vae_params), prepared, cond,
            timestep=self.cfg.timestep, unet_dtype=_DTYPES[self.cfg.unet_dtype],
            matmul_precision=self.cfg.matmul_precision,
        )

    def _run_taps(self, unet_params, vae_params, cond: Conditioning, x: jax.Array, *, taps: tuple[str, ...],
                  prepared_input: bool) -> dict[str, jax.Array]:
        vae = nnx.merge(self._vae_graph, vae_params)
        with precision_context(self.cfg.matmul_precision):
            if prepared_input:
                latents = vae(2.0 * x.astype(jnp.float32) - 1.0)
            else:
                latents = vae(preprocess_images(x, resolution=self.cfg.resolution))
            return _latent_taps(nnx.merge(self._unet_graph, unet_params), latents, cond, taps=taps,
                                timestep=self.cfg.timestep, unet_dtype=_DTYPES[self.cfg.unet_dtype])

    def _check_prepared(self, prepared: jax.Array) -> None:
        if prepared.ndim != 4 or prepared.shape[1:] != (self.resolution, self.resolution, 3):
            raise ValueError(
                f"prepared images must be [B, {self.resolution}, {self.resolution}, 3] from "
                f"preprocess.prepare_image(image, {self.resolution}), got shape {tuple(prepared.shape)}"
            )

    def extract_features(self, images: jax.Array | np.ndarray) -> jax.Array:
        """images: [B, H, W, 3] uint8 or float in [0, 1] -> [B, h, w, C] float32 features (the feature tap)."""
        return self._jitted(self.unet_params, self.vae_params, self.cond, jnp.asarray(images))

    def extract_features_prepared(self, prepared: jax.Array | np.ndarray) -> jax.Array:
        """[B, S, S, 3] float in [0, 1] from ``prepare_image(image, self.resolution)`` -> [B, h, w, C]."""
        prepared = jnp.asarray(prepared)
        self._check_prepared(prepared)
        return self._jitted_prepared(self.unet_params, self.vae_params, self.cond, prepared)

    # ---------------------------------------------------------------------------------- taps
    def _check_taps(self, taps: Sequence[str]) -> tuple[str, ...]:
        """As ``TapInfo._check_taps``, and only taps up to the last of ``cfg.taps`` (the parameters held)."""
        names = super()._check_taps(taps)
        if self.cfg.taps is not None:
            order = {name: i for i, name in enumerate(self.tap_names())}
            last = max(order[t] for t in self.cfg.taps)
            beyond = [t for t in names if order[t] > last]
            if beyond:
                raise UnknownTapError(
                    f"tap {beyond[0]!r} comes after the last tap this backbone was loaded for "
                    f"(BackboneConfig.taps={self.cfg.taps}): only the parameters up to "
                    f"{self.tap_names()[last]!r} are held. Load it with BackboneConfig(taps=None) for the whole UNet, "
                    "or with the taps you need."
                )
        return names

    def extract(self, images: jax.Array | np.ndarray, taps: Sequence[str]) -> dict[str, jax.Array]:
        """Named intermediates of the UNet for raw images, one jitted forward that stops after the last of them.

        Args:
          images: [B, H, W, 3] uint8 or float in [0, 1], as ``extract_features`` takes them.
          taps: tap names, e.g. ``(backbone.feature_tap, "up_blocks.1:output")``.

        Returns:
          ``{tap: float32 array}``: attention outputs [B, N, C], q/k/v [B, heads, N, d], probs [B, heads, N, M],
          probs_mean [B, N, M], block outputs [B, h, w, C] (``spark_jax.models.taps``).

        Raises:
          UnknownTapError: a name that is not a tap of this UNet, with the closest valid names.
        """
        names = self._check_taps(taps)
        return self._jitted_taps(self.unet_params, self.vae_params, self.cond, jnp.asarray(images), taps=names,
                                 prepared_input=False)

    def extract_prepared(self, prepared: jax.Array | np.ndarray, taps: Sequence[str]) -> dict[str, jax.Array]:
        """As ``extract`` for [B, S, S, 3] float images in [0, 1] from ``prepare_image(image, self.resolution)``."""
        names = self._check_taps(taps)
        prepared = jnp.asarray(prepared)
        self._check_prepared(prepared)
        return self._jitted_taps(self.unet_params, self.vae_params, self.cond, prepared, taps=names,
                                 prepared_input=True)

    __call__ = extract_features


def tap_info(path: str | os.PathLike, cfg: BackboneConfig = BackboneConfig()) -> TapInfo:
    """The taps the backbone of ``path`` would offer at ``cfg.resolution`` (configs only, no weights read)."""
    root = resolve_pretrained(path)
    unet_cfg = unet_config(root)
    sdxl = unet_cfg.addition_embed_type == "text_time"
    vae_cfg = vae_encoder_config(root, required_fields=SDXL_VAE_REQUIRED_FIELDS if sdxl else VAE_REQUIRED_FIELDS)
    return TapInfo(unet_cfg, vae_cfg, cfg.resolution)


def load_backbone(path: str | os.PathLike, cfg: BackboneConfig = BackboneConfig()) -> Backbone:
    """Loads a diffusers checkpoint (folder, HF-cache snapshot or cached repo id) as a feature extractor.

    The first load converts the weights and, with torch, encodes the prompt; both are cached
    (``cfg.cache_dir``), so later loads need neither the conversion nor torch.

    Raises:
      CheckpointError / UnsupportedArchitectureError: naming the file, key or field at fault.
    """
    t0 = time.perf_counter()
    root = resolve_pretrained(path)
    check_pipeline_files(root)  # every folder present, no dangling link: all named at once, before any loading
    # The settings the checkpoint judges are checked from its configs, before seconds of weight conversion.
    info = tap_info(root, cfg)
    unet_cfg, vae_cfg = info.unet_config, info.vae_config
    sdxl = unet_cfg.addition_embed_type == "text_time"
    step = vae_cfg.downscale * unet_cfg.feature_stride
    if cfg.resolution % step:
        lower = max(step, cfg.resolution // step * step)
        raise ValueError(
            f"BackboneConfig.resolution={cfg.resolution} must be a multiple of {step} for {root} (VAE downscale "
            f"{vae_cfg.downscale} x UNet downsampling {unet_cfg.feature_stride} before the feature point); "
            f"e.g. {lower} or {lower + step}"
        )
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise CheckpointError(
            f"{root}: the UNet takes {unet_cfg.in_channels} channels but the VAE makes {vae_cfg.latent_channels}"
        )
    abar = load_alphas_cumprod(root)
    if not 0 <= cfg.timestep < len(abar):
        raise ValueError(
            f"BackboneConfig.timestep={cfg.timestep} is outside the schedule's [0, {len(abar)}) "
            f"({root / 'scheduler' / 'scheduler_config.json'}: num_train_timesteps={len(abar)}); the papers use 50"
        )
    latent = (cfg.resolution // vae_cfg.downscale, cfg.resolution // vae_cfg.downscale, vae_cfg.latent_channels)
    noise = (
        None if cfg.noise_source == "none"
        else load_noise_file(cfg.noise_file, latent) if cfg.noise_source == "file"
        else shared_noise(cfg.seed, latent, source=cfg.noise_source, cache_dir=cfg.cache_dir)
    )

    dtype = _DTYPES[cfg.unet_dtype]
    if cfg.taps is not None:
        check_taps(cfg.taps, unet_cfg.tap_names())  # named before any weight is read
    unet, _ = load_unet(root, dtype=dtype, variant=cfg.variant, cache_dir=cfg.cache_dir, taps=cfg.taps)
    _log.info("UNet encoder loaded from %s in %.1f s", root, time.perf_counter() - t0)
    vae, _ = load_vae_encoder(
        root, variant=cfg.variant, cache_dir=cfg.cache_dir,
        required_fields=SDXL_VAE_REQUIRED_FIELDS if sdxl else VAE_REQUIRED_FIELDS,
    )
    _log.info("VAE encoder loaded in %.1f s", time.perf_counter() - t0)
    emb = prompt_embeddings(root, cfg.prompt, cache_dir=cfg.cache_dir)
    _log.info("prompt embeddings ready in %.1f s", time.perf_counter() - t0)
    want = unet_cfg.cross_attention_dim[unet_cfg.feature_block]
    if emb.encoder_hidden_states.shape[-1] != want:
        raise CheckpointError(
            f"{root}: the text encoders give {emb.encoder_hidden_states.shape[-1]}-wide embeddings, the UNet "
            f"expects cross_attention_dim={want}"
        )
    time_ids = None
    if unet_cfg.addition_embed_type == "text_time":
        if emb.text_embeds is None or emb.text_embeds.shape[-1] != unet_cfg.text_embeds_dim:
            got = None if emb.text_embeds is None else emb.text_embeds.shape[-1]
            raise CheckpointError(
                f"{root}: the UNet's text_time embedding expects a {unet_cfg.text_embeds_dim}-wide pooled text "
                f"embedding from text_encoder_2, got {got}"
            )
        time_ids = jnp.asarray(sdxl_time_ids((cfg.resolution, cfg.resolution)))
    cond = Conditioning(
        noise=noise,
        alpha_bar=jnp.asarray(abar[cfg.timestep], jnp.float32),
        encoder_hidden_states=jnp.asarray(emb.encoder_hidden_states, jnp.float32),
        text_embeds=None if emb.text_embeds is None else jnp.asarray(emb.text_embeds, jnp.float32),
        time_ids=time_ids,
    )
    return Backbone(unet, vae, cond, cfg, unet_cfg, vae_cfg)


__all__ = [
    "Backbone",
    "BackboneConfig",
    "Conditioning",
    "compiler_options",
    "extract_features",
    "latent_taps",
    "load_backbone",
    "tap_info",
    "TapInfo",
    "preprocess_images",
]

