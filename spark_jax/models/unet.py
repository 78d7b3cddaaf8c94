"""diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x and SDXL family) in Flax NNX, with named taps.

``UNet2DConditionModel(cfg)(sample, timesteps, context, ..., taps=(...))`` returns a dict of the requested named
intermediates (``spark_jax.models.taps`` documents the names and their shapes); the forward stops after the last
requested one. ``conv_out:output`` is the UNet's output, the noise prediction.

Module attribute paths equal diffusers' parameter names (``down_blocks.1.attentions.0.proj_in``, ...), so the
checkpoint key map (``spark_jax.models.convert``) is derived leaf by leaf and total: every checkpoint key is used.

The feature point of SPARK and DiffCut (``UNetConfig.feature_tap``) is the output of ``attn1`` (after ``to_out``,
before the residual) of the last transformer block of the last attention of the last down block that has
attentions (reference facts, section 1): ``down_blocks.2.attentions.1.transformer_blocks.3.attn1:output`` for
SSD-1B, in ``down_blocks[-2]`` for SD 1.x/2.x. Requesting it traces exactly the old truncated encoder's work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from spark_jax.models.resnet import group_norm
from spark_jax.models.taps import (
    ATTENTION_QUANTITIES,
    BLOCK_QUANTITIES,
    TapRecorder,
    UnknownTapError,
    _AllTapsRecorded,
    check_taps,
    name_modules,
    parse_tap,
)
from spark_jax.models.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)


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
    "mid_block_only_cross_attention": (None, False),
    "act_fn": ("silu", "swish"),
}
_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


class _TapSite(NamedTuple):
    """Where a tap-aware module sits: its kind, the down-path level of its token grid, its widths."""

    kind: str  # "map" ([B, h, w, C]), "tokens" ([B, N, C]), "attn1" or "attn2"
    level: int  # grid = the latent after `level` stride-2 downsamplers
    channels: int
    heads: int = 0


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a ``UNet2DConditionModel``, read from a diffusers ``unet/config.json``.

    Field names are ours and say what they hold: ``heads`` is the number of attention heads per down block
    (diffusers' ``attention_head_dim`` in SD/SDXL configs); the up path's per-block values are the down path's
    reversed, except the transformer depths, which the checkpoint may give on their own
    (``up_transformer_layers_per_block``, diffusers' ``reverse_transformer_layers_per_block``).
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    layers_per_block: tuple[int, ...]
    # Per down block, one depth per layer (attention); per up block, one per layer (layers_per_block + 1).
    transformer_layers_per_block: tuple[tuple[int, ...], ...]
    up_transformer_layers_per_block: tuple[tuple[int, ...], ...]
    heads: tuple[int, ...]
    # Per down block, as diffusers reads it; all equal (one encoder_hidden_states feeds every block).
    cross_attention_dim: tuple[int, ...]
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    # Float32 logits, which every attention here computes anyway (models.attention): recorded, changes nothing.
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    mid_block_scale_factor: float = 1.0
    time_embed_dim: int = 1280
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    # ---- derived architecture -------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def context_dim(self) -> int:
        """Width of ``encoder_hidden_states``."""
        return self.cross_attention_dim[0]

    @property
    def mid_transformer_layers(self) -> int:
        """Depth of the ``UNetMidBlock2DCrossAttn`` transformer: diffusers takes the last down block's first."""
        return self.transformer_layers_per_block[-1][0]

    @property
    def up_layers_per_block(self) -> tuple[int, ...]:
        """ResNets per up block: the mirrored down block's layers plus one (for the downsampler's skip)."""
        return tuple(n + 1 for n in reversed(self.layers_per_block))

    @property
    def feature_block(self) -> int:
        """Index of the last down block with attentions (the block holding the feature point)."""
        return max(i for i, t in enumerate(self.down_block_types) if t == "CrossAttnDownBlock2D")

    @property
    def feature_tap(self) -> str:
        """SPARK's and DiffCut's feature point: the last attn1 output of the last attention down block."""
        fb = self.feature_block
        la = self.layers_per_block[fb] - 1
        lt = self.transformer_layers_per_block[fb][la] - 1
        return f"down_blocks.{fb}.attentions.{la}.transformer_blocks.{lt}.attn1:output"

    @property
    def feature_channels(self) -> int:
        return self.block_out_channels[self.feature_block]

    @property
    def feature_stride(self) -> int:
        """Latent pixels per feature token along each side (2 ** downsamplers before the feature block)."""
        return self.tap_stride(self.feature_tap)

    @property
    def text_embeds_dim(self) -> int | None:
        """Width of the pooled text embedding the ``text_time`` added embedding expects."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    # ---- taps -------------------------------------------------------------------------------------------------

    @functools.cached_property
    def _tap_sites(self) -> dict[str, _TapSite]:
        """Every tap-aware module path, in forward order, with its site (see ``tap_names``)."""
        sites: dict[str, _TapSite] = {"conv_in": _TapSite("map", 0, self.block_out_channels[0])}

        def transformer(prefix: str, level: int, channels: int, heads: int, depth: int) -> None:
            for k in range(depth):
                tb = f"{prefix}.transformer_blocks.{k}"
                sites[f"{tb}.attn1"] = _TapSite("attn1", level, channels, heads)
                sites[f"{tb}.attn2"] = _TapSite("attn2", level, channels, heads)
                sites[tb] = _TapSite("tokens", level, channels)
            sites[prefix] = _TapSite("map", level, channels)

        n = self.num_blocks
        for i, kind in enumerate(self.down_block_types):
            c = self.block_out_channels[i]
            for j in range(self.layers_per_block[i]):
                sites[f"down_blocks.{i}.resnets.{j}"] = _TapSite("map", i, c)
                if kind == "CrossAttnDownBlock2D":
                    transformer(f"down_blocks.{i}.attentions.{j}", i, c, self.heads[i],
                                self.transformer_layers_per_block[i][j])
            down = i < n - 1
            if down:
                sites[f"down_blocks.{i}.downsamplers.0"] = _TapSite("map", i + 1, c)
            sites[f"down_blocks.{i}"] = _TapSite("map", i + 1 if down else i, c)
        if self.mid_block_type is not None:
            c, level = self.block_out_channels[-1], n - 1
            sites["mid_block.resnets.0"] = _TapSite("map", level, c)
            if self.mid_block_type == "UNetMidBlock2DCrossAttn":
                transformer("mid_block.attentions.0", level, c, self.heads[-1], self.mid_transformer_layers)
                sites["mid_block.resnets.1"] = _TapSite("map", level, c)
            sites["mid_block"] = _TapSite("map", level, c)
        for i, kind in enumerate(self.up_block_types):
            c, level, heads = self.block_out_channels[n - 1 - i], n - 1 - i, self.heads[n - 1 - i]
            for j in range(self.up_layers_per_block[i]):
                sites[f"up_blocks.{i}.resnets.{j}"] = _TapSite("map", level, c)
                if kind == "CrossAttnUpBlock2D":
                    transformer(f"up_blocks.{i}.attentions.{j}", level, c, heads,
                                self.up_transformer_layers_per_block[i][j])
            up = i < n - 1
            if up:
                sites[f"up_blocks.{i}.upsamplers.0"] = _TapSite("map", level - 1, c)
            sites[f"up_blocks.{i}"] = _TapSite("map", level - 1 if up else level, c)
        sites["conv_out"] = _TapSite("map", 0, self.out_channels)
        return sites

    def tap_names(self) -> tuple[str, ...]:
        """Every valid tap name, in the order the forward computes them (see ``spark_jax.models.taps``)."""
        return self._tap_names

    @functools.cached_property
    def _tap_names(self) -> tuple[str, ...]:
        names = []
        for path, site in self._tap_sites.items():
            quantities = ATTENTION_QUANTITIES if site.kind in ("attn1", "attn2") else BLOCK_QUANTITIES
            names += [f"{path}:{q}" for q in quantities]
        return tuple(names)

    def _site(self, name: str) -> tuple[_TapSite, str]:
        check_taps((name,), self.tap_names())
        path, quantity = parse_tap(name)
        return self._tap_sites[path], quantity

    def tap_stride(self, name: str) -> int:
        """Latent pixels per token (or map pixel) of a tap along each side: 2 ** (downsamplers before it).

        Exact when the latent sides are multiples of it; see ``tap_grid`` for any size.
        """
        return 2 ** self._site(name)[0].level

    def tap_grid(self, name: str, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) token grid of a tap for a latent of ``latent_hw``: each downsampler takes ceil(side / 2), the up
        path restores the down path's sizes."""
        h, w = latent_hw
        for _ in range(self._site(name)[0].level):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def tap_shape(
        self, name: str, *, batch: int, latent_hw: tuple[int, int], text_tokens: int
    ) -> tuple[int, ...]:
        """The shape of a tap's value (the table in ``spark_jax.models.taps``)."""
        site, quantity = self._site(name)
        h, w = self.tap_grid(name, latent_hw)
        n = h * w
        if site.kind == "map":
            return (batch, h, w, site.channels)
        if site.kind == "tokens" or quantity == "output":
            return (batch, n, site.channels)
        m = n if site.kind == "attn1" else text_tokens
        d = site.channels // site.heads
        return {
            "q": (batch, site.heads, n, d), "k": (batch, site.heads, m, d), "v": (batch, site.heads, m, d),
            "probs": (batch, site.heads, n, m), "probs_mean": (batch, n, m),
        }[quantity]

    # ---- parsing ----------------------------------------------------------------------------------------------

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], *, source: str = "unet/config.json") -> UNetConfig:
        """Parses and validates a diffusers ``UNet2DConditionModel`` config dict.

        Missing fields take diffusers' ``UNet2DConditionModel`` defaults (the SD 1.x layout).

        Raises:
          UnsupportedArchitectureError: naming the field and its value if the model is not of the
            SD 1.x/2.x/SDXL family this port implements, or if the config is inconsistent.
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
        if any(only_cross if isinstance(only_cross, (list, tuple)) else [only_cross]):
            raise fail("only_cross_attention=True is not supported")

        down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        for t in down:
            if t not in _DOWN_BLOCKS:
                raise fail(f"down block type {t!r} is not supported (supported: {_DOWN_BLOCKS})")
        if "CrossAttnDownBlock2D" not in down:
            raise fail("no CrossAttnDownBlock2D: the model has no self-attention feature point")
        n = len(down)
        up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        for t in up:
            if t not in _UP_BLOCKS:
                raise fail(f"up block type {t!r} is not supported (supported: {_UP_BLOCKS})")
        if len(up) != n:
            raise fail(f"up_block_types {up} and down_block_types {down} differ in length")
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in _MID_BLOCKS:
            raise fail(f"mid_block_type={mid!r} is not supported (supported: {_MID_BLOCKS})")
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
        if min(layers) < 1:
            raise fail(f"layers_per_block {layers}: every block needs at least one layer")
        # diffusers: num_attention_heads defaults to attention_head_dim, which is a head *count*.
        heads_cfg = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = tuple(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else (heads_cfg,) * n
        if len(heads) != n:
            raise fail(f"attention head counts {heads} have {len(heads)} entries for {n} down blocks")

        def depths(key: str, value: Any, count: int) -> tuple[int, ...]:
            if isinstance(value, (list, tuple)):
                if len(value) != count:
                    raise fail(f"{key}={list(value)} must have {count} entries (one per layer)")
                out = tuple(int(x) for x in value)
            else:
                out = (int(value),) * count
            if min(out) < 1:
                raise fail(f"{key}={value}: transformer depths of 0 are not supported")
            return out

        tlpb_cfg = per_block("transformer_layers_per_block", 1)
        tlpb = tuple(
            depths(f"transformer_layers_per_block[{i}]", v, layers[i]) for i, v in enumerate(tlpb_cfg)
        )
        up_layers = tuple(k + 1 for k in reversed(layers))
        reverse = config.get("reverse_transformer_layers_per_block")
        if reverse is None:
            if any(isinstance(v, (list, tuple)) for v in tlpb_cfg):
                raise fail(
                    "transformer_layers_per_block has per-layer lists but reverse_transformer_layers_per_block "
                    "is missing (diffusers requires it for uneven UNets)"
                )
            reverse = tuple(reversed(tlpb_cfg))
        elif not isinstance(reverse, (list, tuple)) or len(reverse) != n:
            raise fail(f"reverse_transformer_layers_per_block {reverse} must have one entry per up block ({n})")
        up_tlpb = tuple(
            depths(f"reverse_transformer_layers_per_block[{i}]", v, up_layers[i]) for i, v in enumerate(reverse)
        )

        cross = tuple(int(v) for v in per_block("cross_attention_dim", 1280))
        if len(set(cross)) != 1:
            raise fail(
                f"cross_attention_dim {list(cross)} differs between blocks; diffusers passes the same "
                "encoder_hidden_states to every block, so one width is supported"
            )
        groups = config.get("norm_num_groups", 32)
        if groups is None:
            raise fail("norm_num_groups=None (GroupNorm groups derived per layer, no conv_norm_out) is not supported")
        groups = int(groups)
        attention_blocks = [(f"down block {i}", boc[i], heads[i]) for i, t in enumerate(down) if t != "DownBlock2D"]
        attention_blocks += [(f"up block {i}", boc[n - 1 - i], heads[n - 1 - i])
                             for i, t in enumerate(up) if t != "UpBlock2D"]
        if mid == "UNetMidBlock2DCrossAttn":
            attention_blocks.append(("the mid block", boc[-1], heads[-1]))
        for where, channels, h in attention_blocks:
            if h is None or int(h) < 1 or channels % int(h):
                raise fail(f"{where}: {channels} channels do not split into {h} attention heads")
        # Every GroupNorm's channels: the block widths and the up blocks' [map, skip] concatenations.
        widths = set(boc)
        for i in range(n):
            c_out, c_in = boc[n - 1 - i], boc[max(n - 2 - i, 0)]
            prev = boc[n - i] if i > 0 else boc[-1]
            for j in range(up_layers[i]):
                widths.add((prev if j == 0 else c_out) + (c_in if j == up_layers[i] - 1 else c_out))
        bad = sorted(c for c in widths if c % groups)
        if bad:
            raise fail(f"norm_num_groups={groups} does not divide the GroupNorm widths {bad}")

        addition = config.get("addition_embed_type")
        add_dim = config.get("addition_time_embed_dim")
        proj_dim = config.get("projection_class_embeddings_input_dim")
        if addition == "text_time" and (add_dim is None or proj_dim is None or proj_dim <= 6 * add_dim):
            raise fail(
                "addition_embed_type='text_time' needs addition_time_embed_dim and "
                f"projection_class_embeddings_input_dim > 6 * addition_time_embed_dim (got {add_dim}, {proj_dim})"
            )
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if int(config.get(key, 3)) % 2 != 1:
                raise fail(f"{key}={config.get(key)} is not supported (odd kernels keep the map size)")
        return cls(
            in_channels=int(config.get("in_channels", 4)),
            out_channels=int(config.get("out_channels", 4)),
            block_out_channels=boc,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=layers,
            transformer_layers_per_block=tlpb,
            up_transformer_layers_per_block=up_tlpb,
            heads=tuple(int(h) if h is not None else 0 for h in heads),
            cross_attention_dim=cross,
            norm_num_groups=groups,
            norm_eps=float(config.get("norm_eps", 1e-5)),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            downsample_padding=int(config.get("downsample_padding", 1)),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            conv_out_kernel=int(config.get("conv_out_kernel", 3)),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            time_embed_dim=int(config.get("time_embedding_dim") or 4 * boc[0]),
            addition_embed_type=addition,
            addition_time_embed_dim=None if add_dim is None else int(add_dim),
            projection_class_embeddings_input_dim=None if proj_dim is None else int(proj_dim),
        )


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs) -> nnx.Conv:
    pad = (kernel - 1) // 2
    return nnx.Conv(cin, cout, (kernel, kernel), padding=((pad, pad), (pad, pad)), rngs=rngs)


class UNet2DConditionModel(nnx.Module):
    """conv_in, time (and SDXL ``text_time``) embeddings, down blocks, mid block, up blocks, conv_norm_out, conv_out.

    Every tap-aware submodule knows its diffusers path (``taps.name_modules``, run once at the end of
    ``__init__``).
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        boc, n = cfg.block_out_channels, cfg.num_blocks
        self.config = cfg  # static (a frozen dataclass): the tap names and input checks of __call__
        self.conv_in = _conv(cfg.in_channels, boc[0], cfg.conv_in_kernel, rngs)
        self.time_embedding = TimestepEmbedding(boc[0], cfg.time_embed_dim, rngs=rngs)
        self.add_embedding = (
            TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, rngs=rngs)
            if cfg.addition_embed_type == "text_time"
            else None
        )
        common = dict(temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups, eps=cfg.norm_eps, rngs=rngs)
        attn = dict(cross_attention_dim=cfg.context_dim, use_linear_projection=cfg.use_linear_projection)
        down = []
        for i, kind in enumerate(cfg.down_block_types):
            args = dict(num_layers=cfg.layers_per_block[i], add_downsample=i < n - 1,
                        downsample_padding=cfg.downsample_padding, **common)
            cin = boc[max(i - 1, 0)]
            if kind == "CrossAttnDownBlock2D":
                down.append(CrossAttnDownBlock2D(
                    cin, boc[i], transformer_layers_per_block=cfg.transformer_layers_per_block[i],
                    heads=cfg.heads[i], **attn, **args,
                ))
            else:
                down.append(DownBlock2D(cin, boc[i], **args))
        self.down_blocks = nnx.List(down)
        if cfg.mid_block_type == "UNetMidBlock2DCrossAttn":
            self.mid_block = UNetMidBlock2DCrossAttn(
                boc[-1], transformer_layers=cfg.mid_transformer_layers, heads=cfg.heads[-1],
                output_scale_factor=cfg.mid_block_scale_factor, **attn, **common,
            )
        elif cfg.mid_block_type == "UNetMidBlock2D":
            # diffusers builds it with num_layers=0: one ResNet, no attention.
            self.mid_block = UNetMidBlock2D(
                boc[-1], add_attention=False, num_layers=0, output_scale_factor=cfg.mid_block_scale_factor,
                **common,
            )
        else:
            self.mid_block = None
        up = []
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the mirrored down block
            args = dict(num_layers=cfg.up_layers_per_block[i], add_upsample=i < n - 1, **common)
            cin, prev = boc[max(j - 1, 0)], boc[min(j + 1, n - 1)]
            if kind == "CrossAttnUpBlock2D":
                up.append(CrossAttnUpBlock2D(
                    cin, prev, boc[j], transformer_layers_per_block=cfg.up_transformer_layers_per_block[i],
                    heads=cfg.heads[j], **attn, **args,
                ))
            else:
                up.append(UpBlock2D(cin, prev, boc[j], **args))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = group_norm(boc[0], cfg.norm_num_groups, cfg.norm_eps, rngs)
        self.conv_out = _conv(boc[0], cfg.out_channels, cfg.conv_out_kernel, rngs)
        name_modules(self)

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        *,
        taps: Sequence[str],
    ) -> dict[str, jax.Array]:
        """Runs the UNet up to the last requested tap and returns the requested taps.

        Args:
          sample: [B, h, w, in_channels] noised latents (NHWC).
          timesteps: [] or [B] diffusion timesteps.
          encoder_hidden_states: [B, L, context_dim] text embeddings.
          text_embeds: [B, P] pooled text embedding (``text_time`` models only).
          time_ids: [B, 6] SDXL size/crop conditioning (``text_time`` models only).
          taps: tap names (``UNetConfig.tap_names()``; shapes in ``spark_jax.models.taps``).

        Returns:
          ``{name: array}`` for the names of ``taps`` (in their order; a dict returned through ``jax.jit`` comes
          back with sorted keys, as every pytree dict does).

        Raises:
          UnknownTapError: for a name that is not a tap of this model (before anything is computed).
          ValueError: for inputs of the wrong rank or width, or missing ``text_time`` inputs.
        """
        cfg = self.config
        names = check_taps(taps, cfg.tap_names())
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"sample must be [B, h, w, {cfg.in_channels}] (NHWC latents), got shape {tuple(sample.shape)}"
            )
        b = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (b, cfg.context_dim):
            raise ValueError(
                f"encoder_hidden_states must be [{b}, L, {cfg.context_dim}], got shape "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if self.add_embedding is not None and (text_embeds is None or time_ids is None):
            raise ValueError("a text_time UNet (SDXL family) needs `text_embeds` and `time_ids`")
        rec = TapRecorder(names)
        try:
            self._forward(sample, timesteps, encoder_hidden_states, text_embeds, time_ids, rec)
        except _AllTapsRecorded:
            pass
        missing = [name for name in names if name not in rec.values]
        if missing:  # every name of tap_names() is recorded by the forward: this is a bug, not bad input
            raise UnknownTapError(f"the forward did not record the taps {missing}")
        return {name: rec.values[name] for name in names}

    def _forward(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        text_embeds: jax.Array | None,
        time_ids: jax.Array | None,
        rec: TapRecorder,
    ) -> None:
        """The whole forward; ``rec`` stops it (``_AllTapsRecorded``) after the last requested tap."""
        cfg = self.config
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(
            timesteps, self.time_embedding.linear_1.in_features,
            flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        ).astype(sample.dtype)
        emb = self.time_embedding(t_emb)
        if self.add_embedding is not None:
            time_embeds = timestep_embedding(
                time_ids.reshape(-1), cfg.addition_time_embed_dim,
                flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
            ).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(emb.dtype)
            emb = emb + self.add_embedding(add)
        x = self.conv_in(sample)
        rec.record("conv_in", "output", x)
        skips = [x]
        for block in self.down_blocks:
            if isinstance(block, CrossAttnDownBlock2D):
                x, res = block(x, emb, context, rec)
            else:
                x, res = block(x, emb, rec)
            skips += res
        if isinstance(self.mid_block, UNetMidBlock2DCrossAttn):
            x = self.mid_block(x, emb, context, rec)
        elif self.mid_block is not None:
            x = self.mid_block(x, emb, rec)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = tuple(skips[-k:]), skips[:-k]
            # The upsampler restores the size of the next skip: 2x, or the odd side diffusers forwards as
            # `upsample_size` when the latent is not a multiple of 2 ** num_upsamplers.
            size = tuple(skips[-1].shape[1:3]) if skips else None
            if isinstance(block, CrossAttnUpBlock2D):
                x = block(x, res, emb, context, size, rec)
            else:
                x = block(x, res, emb, size, rec)
        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        rec.record("conv_out", "output", x)
