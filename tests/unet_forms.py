"""Tiny diffusers ``UNet2DConditionModel`` configs, one per architecture form the port supports, and the
torch side of the parity tests (random weights, random inputs, the reference forward).

Not a test module: shared by tests/test_unet_parity.py, the tap-parity tests and tests/test_backbone_helpers.py
(whose tiny pipelines use ``FORMS["sdxl"]`` and ``FORMS["sd1"]``). Every form is small enough that building,
saving and loading it takes well under a second; each exercises a different part of the config grammar:

| form        | family      | what it exercises                                                                 |
| ----------- | ----------- | --------------------------------------------------------------------------------- |
| `sdxl`      | SSD-1B-like | text_time, linear projections, per-block heads (1, 2, 4), uneven depths ``[1, 2, [1, 3]]`` with ``reverse_transformer_layers_per_block``, ``UNetMidBlock2D`` (one ResNet, no attention) |
| `sdxl_base` | SDXL base   | a plain list of depths ``[1, 2, 3]`` (reversed for the up path), ``UNetMidBlock2DCrossAttn`` with the last depth (3) |
| `vega`      | Vega-like   | reduced blocks: no mid block (``mid_block_type=None``), per-block ``layers_per_block`` (1, 2, 2), uneven depths both ways |
| `sd1`       | SD 1.x      | 1x1-conv projections, one head count (2), ``UNetMidBlock2DCrossAttn``, the feature point in ``down_blocks[-2]`` |
| `sd2`       | SD 2.x      | linear projections, ``upcast_attention``, per-block head counts (1, 2, 4, 4: head widths 16, 16, 8, 8), a per-block ``cross_attention_dim`` list, ``layers_per_block`` 2 |

``INPUTS`` gives each form a default input size (batch, latent height and width, text tokens); ``sd2``'s is not a
multiple of its 8x downsampling, so diffusers forwards explicit upsample sizes (its ``forward_upsample_size``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# diffusers' "attention_head_dim" is a head *count* in all of these (as in the real SD/SDXL configs).
FORMS: dict[str, dict[str, Any]] = {
    "sdxl": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        transformer_layers_per_block=[1, 2, [1, 3]],
        reverse_transformer_layers_per_block=[[1, 1, 1], [2, 2, 2], [1, 1, 1]],
        attention_head_dim=(1, 2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
    "sdxl_base": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 3],
        attention_head_dim=(1, 2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
    "vega": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=(1, 2, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        transformer_layers_per_block=[1, [1, 2], [2, 1]],
        reverse_transformer_layers_per_block=[[1, 2, 1], [1, 1, 1], [1, 1]],
        attention_head_dim=(1, 2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8,
    ),
    "sd1": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=16,
        norm_num_groups=8,
    ),
    "sd2": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2, 4, 4),
        cross_attention_dim=[24, 24, 24, 24],
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=True,
    ),
}


class FormInputs(NamedTuple):
    """Default input size of a form: ``batch`` latents of ``latent_hw`` and ``tokens`` text tokens."""

    batch: int
    latent_hw: tuple[int, int]
    tokens: int


INPUTS: dict[str, FormInputs] = {
    "sdxl": FormInputs(2, (16, 16), 7),
    "sdxl_base": FormInputs(1, (16, 16), 7),
    "vega": FormInputs(1, (16, 8), 5),
    "sd1": FormInputs(2, (16, 16), 7),
    "sd2": FormInputs(1, (20, 12), 5),  # not multiples of 8: upsample sizes follow the skips
}


class UNetInputs(NamedTuple):
    """One forward's inputs as numpy arrays in diffusers' layout (``sample`` is NCHW).

    ``text_embeds`` / ``time_ids`` are None for models without the ``text_time`` added embedding.
    """

    sample: np.ndarray  # [B, C, h, w] float32
    timesteps: np.ndarray  # [B] float32
    encoder_hidden_states: np.ndarray  # [B, L, D] float32
    text_embeds: np.ndarray | None  # [B, P] float32
    time_ids: np.ndarray | None  # [B, 6] float32

    def jax_args(self) -> tuple[Any, ...]:
        """The same inputs as our ``UNet2DConditionModel`` takes them (sample NHWC), as jax arrays."""
        import jax.numpy as jnp

        opt = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
        return (
            jnp.asarray(self.sample.transpose(0, 2, 3, 1)), jnp.asarray(self.timesteps),
            jnp.asarray(self.encoder_hidden_states), opt(self.text_embeds), opt(self.time_ids),
        )


def context_dim(config: dict[str, Any]) -> int:
    """Width of ``encoder_hidden_states`` for a form's config (its one cross-attention width)."""
    dims = config.get("cross_attention_dim", 1280)
    return int(dims if isinstance(dims, int) else dims[0])


def pooled_dim(config: dict[str, Any]) -> int | None:
    """Width of the pooled text embedding a ``text_time`` config expects (None without text_time)."""
    if config.get("addition_embed_type") != "text_time":
        return None
    return int(config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"])


def random_inputs(
    config: dict[str, Any],
    *,
    batch: int,
    latent_hw: tuple[int, int],
    tokens: int,
    seed: int = 0,
    timestep: float = 50.0,
) -> UNetInputs:
    """Standard-normal latents, context and pooled embedding; SDXL-like ``time_ids`` varying per sample."""
    rng = np.random.default_rng(seed)
    h, w = latent_hw
    sample = rng.standard_normal((batch, config.get("in_channels", 4), h, w)).astype(np.float32)
    context = rng.standard_normal((batch, tokens, context_dim(config))).astype(np.float32)
    pooled = pooled_dim(config)
    text_embeds = time_ids = None
    if pooled is not None:
        text_embeds = rng.standard_normal((batch, pooled)).astype(np.float32)
        base = np.asarray([8 * h, 8 * w, 0, 0, 8 * h, 8 * w], np.float32)
        time_ids = np.stack([base + np.asarray([16 * i, -8 * i, 4 * i, 2 * i, 0, 0], np.float32) for i in range(batch)])
    timesteps = np.full((batch,), timestep, np.float32)
    return UNetInputs(sample, timesteps, context, text_embeds, time_ids)


def form_inputs(form: str, seed: int = 0) -> UNetInputs:
    """``random_inputs`` at a form's default size (``INPUTS[form]``)."""
    size = INPUTS[form]
    return random_inputs(FORMS[form], batch=size.batch, latent_hw=size.latent_hw, tokens=size.tokens, seed=seed)


def perturb(module, seed: int) -> None:
    """Randomise every 1-D parameter (norm scales near 1, biases near 0): the defaults 1 / 0 would hide a
    swapped or dropped mapping."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def build_unet(form_or_config: str | dict[str, Any], seed: int = 0):
    """A random-weight ``diffusers.UNet2DConditionModel`` of a form (name or config dict), eval mode, float32."""
    import torch
    from diffusers import UNet2DConditionModel

    config = FORMS[form_or_config] if isinstance(form_or_config, str) else form_or_config
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    perturb(unet, seed + 1)
    return unet


def save_unet(unet, folder: Path) -> Path:
    """Saves a diffusers UNet as a one-model pipeline folder (``model_index.json`` + ``unet/``); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    unet.save_pretrained(folder / "unet")
    return folder


def torch_kwargs(inputs: UNetInputs) -> dict[str, Any]:
    """The keyword arguments of ``diffusers.UNet2DConditionModel.forward`` for ``inputs`` (torch tensors)."""
    import torch

    kwargs: dict[str, Any] = dict(
        sample=torch.from_numpy(inputs.sample), timestep=torch.from_numpy(inputs.timesteps),
        encoder_hidden_states=torch.from_numpy(inputs.encoder_hidden_states),
    )
    if inputs.text_embeds is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(inputs.text_embeds), "time_ids": torch.from_numpy(inputs.time_ids),
        }
    return kwargs


def torch_noise_prediction(unet, inputs: UNetInputs) -> np.ndarray:
    """diffusers' UNet output (the noise prediction) for ``inputs``, as NHWC numpy [B, h, w, out_channels]."""
    import torch

    with torch.no_grad():
        out = unet(**torch_kwargs(inputs)).sample
    return out.numpy().transpose(0, 2, 3, 1)
