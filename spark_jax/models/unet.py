"""The encoder half of diffusers' ``UNet2DConditionModel``, ending at the DiffCut/SPARK feature point.

The feature point is the output of ``attn1`` (after ``to_out``, before the residual) of the last
transformer block of the last attention of the last down block that has attentions (reference
facts, section 1): ``down_blocks.2.attentions.1.transformer_blocks.3.attn1`` for SSD-1B,
``down_blocks[-2]`` for SD 1.x/2.x. Modules after that point are neither built nor run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from spark_jax.models.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D


class UnsupportedArchitectureError(ValueError):
    """A diffusers config describes a model this port does not implement."""


# Options the port implements only at the value shown (the SD 1.x/2.x/SDXL defaults). A config with
# any other value is rejected rather than silently run as something else.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "time_embedding_type": ("positional",),
    "class_embed_type": (None,),
    "encoder_hid_dim_type": (None,),
    "encoder_hid_dim": (None,),
    "addition_embed_type": (None, "text_time"),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "attention_type": ("default",),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,),
    "cross_attention_norm": (None,),
    "resnet_out_scale_factor": (1.0,),
    "resnet_skip_time_act": (False,),
    "center_input_sample": (False,),
    "class_embeddings_concat": (False,),
    "act_fn": ("silu", "swish"),
}
_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")


@dataclasses.dataclass(frozen=True)
class UNetEncoderConfig:
    """Architecture of the UNet encoder, read from a diffusers ``unet/config.json``.

    Field names are ours and say what they hold: ``heads`` is the number of attention heads per down
    block (diffusers' ``attention_head_dim`` in SD/SDXL configs).
    """

    in_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[tuple[int, ...], ...]
    heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    conv_in_kernel: int = 3
    time_embed_dim: int = 1280
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def feature_block(self) -> int:
        """Index of the last down block with attentions (the block holding the feature point)."""
        return max(i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D")

    @property
    def feature_channels(self) -> int:
        return self.block_out_channels[self.feature_block]

    @property
    def feature_stride(self) -> int:
        """Latent pixels per feature token along each side (2 ** downsamplers before the feature block)."""
        return 2**self.feature_block

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of the pooled text embedding the ``text_time`` added embedding expects."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "unet/config.json") -> UNetEncoderConfig:
        """Parses and validates a diffusers ``UNet2DConditionModel`` config dict.

        Raises:
          UnsupportedArchitectureError: naming the field and its value if the model is not of the
            SD 1.x/2.x/SDXL family this port implements.
        """
        def fail(msg: str) -> UnsupportedArchitectureError:
            return UnsupportedArchitectureError(
                f"{source}: {msg}. spark_jax implements the UNet2DConditionModel of the SD 1.x/2.x and "
                "SDXL family (SDXL, SSD-1B, Segmind-Vega); use one of those checkpoints."
            )

        name = config.get("_class_name", "UNet2DConditionModel")
        if name != "UNet2DConditionModel":
            raise fail(f"_class_name is {name!r}, not 'UNet2DConditionModel'")
        for key, allowed in _REQUIRED_VALUES.items():
            value = config.get(key, allowed[0])
            if isinstance(value, list):
                value = tuple(value)
            if value not in allowed:
                raise fail(f"{key}={value!r} is not supported (supported: {allowed})")
        only_cross = config.get("only_cross_attention", False)
        if any(only_cross if isinstance(only_cross, list) else [only_cross]):
            raise fail("only_cross_attention=True is not supported")

        # Missing fields take diffusers' UNet2DConditionModel defaults (the SD 1.x layout).
        down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        for t in down:
            if t not in _DOWN_BLOCKS:
                raise fail(f"down block type {t!r} is not supported (supported: {_DOWN_BLOCKS})")
        if "CrossAttnDownBlock2D" not in down:
            raise fail("no CrossAttnDownBlock2D: the model has no self-attention feature point")
        n = len(down)
        boc = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
        if len(boc) != n:
            raise fail(f"block_out_channels {boc} and down_block_types {down} differ in length")

        def per_block(key: str, default: Any) -> tuple[Any, ...]:
            value = config.get(key, default)
            if value is None:
                return (None,) * n
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise fail(f"{key} {value} has {len(value)} entries for {n} down blocks")
                return tuple(value)
            return (value,) * n

        layers = tuple(int(v) for v in per_block("layers_per_block", 2))
        # diffusers: num_attention_heads defaults to attention_head_dim, which is a head *count*.
        heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = tuple(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else (heads_cfg,) * n
        if len(heads) != n:
            raise fail(f"attention head counts {heads} have {len(heads)} entries for {n} down blocks")
        tlpb = []
        for i, v in enumerate(per_block("transformer_layers_per_block", 1)):
            if isinstance(v, (list, tuple)):
                if len(v) != layers[i]:
                    raise fail(f"transformer_layers_per_block[{i}]={v} must have {layers[i]} entries")
                tlpb.append(tuple(int(x) for x in v))
            else:
                tlpb.append((int(v),) * layers[i])
        cross = tuple(int(v) for v in per_block("cross_attention_dim", 1280))
        for i, t in enumerate(down):
            if t == "CrossAttnDownBlock2D" and (heads[i] is None or boc[i] % int(heads[i])):
                raise fail(f"block {i}: {boc[i]} channels do not split into {heads[i]} attention heads")

        addition = config.get("addition_embed_type")
        add_dim = config.get("addition_time_embed_dim")
        proj_dim = config.get("projection_class_embeddings_input_dim")
        if addition == "text_time" and (add_dim is None or proj_dim is None or proj_dim <= 6 * add_dim):
            raise fail(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim > 6 * addition_time_embed_dim (got {add_dim}, {proj_dim})"
            )
        return cls(
            in_channels=int(config.get("in_channels", 4)),
            block_out_channels=boc,
            down_block_types=down,
            layers_per_block=layers,
            transformer_layers_per_block=tuple(tlpb),
            heads=tuple(int(h) if h is not None else 0 for h in heads),
            cross_attention_dim=cross,
            norm_num_groups=int(config.get("norm_num_groups", 32)),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            downsample_padding=int(config.get("downsample_padding", 1)),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            time_embed_dim=int(config.get("time_embedding_dim") or 4 * boc[0]),
            addition_embed_type=addition,
            addition_time_embed_dim=None if add_dim is None else int(add_dim),
            projection_class_embeddings_input_dim=None if proj_dim is None else int(proj_dim),
        )

    def skipped_checkpoint_prefixes(self) -> tuple[str, ...]:
        """Checkpoint key prefixes of the modules after the feature point (present in a full UNet, unused)."""
        fb = self.feature_block
        la = len(self.transformer_layers_per_block[fb]) - 1
        lt = self.transformer_layers_per_block[fb][la] - 1
        last = f"down_blocks.{fb}.attentions.{la}"
        prefixes = ["mid_block.", "up_blocks.", "conv_norm_out.", "conv_out.", f"down_blocks.{fb}.downsamplers.",
                    f"{last}.proj_out."]
        prefixes += [f"{last}.transformer_blocks.{lt}.{m}." for m in ("norm2", "attn2", "norm3", "ff")]
        prefixes += [f"down_blocks.{j}." for j in range(fb + 1, len(self.down_block_types))]
        return tuple(prefixes)


class UNetEncoder(nnx.Module):
    """conv_in, time (and SDXL ``text_time``) embeddings and the down blocks up to the feature point."""

    def __init__(self, cfg: UNetEncoderConfig, *, rngs: nnx.Rngs):
        boc = cfg.block_out_channels
        self.flip_sin_to_cos = cfg.flip_sin_to_cos
        self.freq_shift = cfg.freq_shift
        self.addition_time_embed_dim = cfg.addition_time_embed_dim
        pad = (cfg.conv_in_kernel - 1) // 2
        self.conv_in = nnx.Conv(
            cfg.in_channels, boc[0], (cfg.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)), rngs=rngs
        )
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim, rngs=rngs)
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, rngs=rngs)
            if cfg.addition_embed_type == "text_time"
            else None
        )
        blocks = []
        fb = cfg.feature_block
        for i in range(fb + 1):
            common = dict(
                temb_channels=cfg.time_embed_dim, num_layers=cfg.layers_per_block[i], groups=cfg.norm_num_groups,
                eps=cfg.norm_eps, add_downsample=i < len(boc) - 1, downsample_padding=cfg.downsample_padding,
                rngs=rngs,
            )
            cin = boc[max(i - 1, 0)]
            if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
                blocks.append(
                    CrossAttnDownBlock2D(
                        cin, boc[i], transformer_layers_per_block=cfg.transformer_layers_per_block[i],
                        heads=cfg.heads[i], cross_attention_dim=cfg.cross_attention_dim[i],
                        use_linear_projection=cfg.use_linear_projection, feature_point=i == fb, **common,
                    )
                )
            else:
                blocks.append(DownBlock2D(cin, boc[i], **common))
        self.down_blocks = nnx.List(blocks)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Runs the encoder to the feature point.

        Args:
          sample: [B, h, w, C_in] noised latents (NHWC).
          timesteps: [] or [B] diffusion timesteps.
          encoder_hidden_states: [B, L, D] text embeddings.
          text_embeds: [B, P] pooled text embedding (``text_time`` models only).
          time_ids: [B, 6] SDXL size/crop conditioning (``text_time`` models only).

        Returns:
          [B, h / stride, w / stride, C] self-attention features at the feature point.
        """
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(
            timesteps, self.time_embedding.linear_1.in_features,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
        ).astype(sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("a text_time UNet (SDXL family) needs `text_embeds` and `time_ids`")
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            ).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(emb.dtype)
            emb = emb + self.add_embedding(add)
        x = self.conv_in(sample)
        for block in self.down_blocks:
            x = block(x, emb, encoder_hidden_states) if isinstance(block, CrossAttnDownBlock2D) else block(x, emb)
        return x
