"""CLIP (ViT image tower, causal text tower, projections) in Flax NNX.

Attribute paths equal transformers' ``CLIPModel`` parameter names (``vision_model.encoder.layers.3.self_attn.q_proj``,
``vision_model.pre_layrnorm`` with the typo the weights carry, ``text_model.final_layer_norm``, ``visual_projection``,
``logit_scale``), up to ``weight -> kernel/scale/embedding`` and a transpose; the key maps from transformers and
from open_clip/OpenAI checkpoints are ``spark_jax.models.clip_convert``. Images are NHWC (``[B, H, W, 3]``),
normalised by the checkpoint's mean/std. transformers 5 has no Flax CLIP, so this port is ours
(method-facts section 5); the OpenAI/open_clip architecture is the same network under other names.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_jax.models.attention import dot_product_attention


class CLIPConfigError(ValueError):
    """A CLIP config describes a model this port does not build (names the field, its value and the fix)."""


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (transformers' ``quick_gelu``, open_clip's ``QuickGELU``)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU: transformers' ``gelu``, torch's ``nn.GELU()`` (open_clip's LAION-trained towers)."""
    return jax.nn.gelu(x, approximate=False)


# transformers' hidden_act names; open_clip's quick_gelu flag picks one of the two.
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {"quick_gelu": quick_gelu, "gelu": gelu}
TEXT_POOLS = ("argmax", "eos", "first", "last")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The ViT image tower (transformers ``CLIPVisionConfig`` field names).

    Attributes:
      hidden_size: token width D (ViT-L/14: 1024).
      intermediate_size: MLP width (4 D).
      num_hidden_layers, num_attention_heads: depth and heads (head width = hidden_size / heads).
      image_size: the side S the position embedding was trained at (its grid is S / patch_size).
      patch_size: patch side p.
      hidden_act: ``'quick_gelu'`` (OpenAI weights) or ``'gelu'`` (LAION open_clip weights).
      layer_norm_eps: every LayerNorm's epsilon.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The causal text tower (transformers ``CLIPTextConfig`` field names, plus how it pools).

    Attributes:
      pool: which token's state is the sentence embedding: ``'argmax'`` (the largest id: OpenAI's EOT 49407, and
        transformers' rule for configs with the legacy ``eos_token_id=2``), ``'eos'`` (the first ``eos_token_id``),
        ``'first'`` or ``'last'`` (open_clip's ``pool_type``).
      eos_token_id: the end-of-text id (``pool='eos'``).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pool: str = "eos"
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP model: both towers and the shared embedding width ``projection_dim``."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    def __post_init__(self):
        for name, tower in (("text", self.text), ("vision", self.vision)):
            if tower.hidden_act not in ACTIVATIONS:
                raise CLIPConfigError(
                    f"{name} hidden_act={tower.hidden_act!r} is not supported; this port has {sorted(ACTIVATIONS)}"
                )
            if tower.hidden_size % tower.num_attention_heads:
                raise CLIPConfigError(
                    f"{name} hidden_size={tower.hidden_size} is not a multiple of "
                    f"num_attention_heads={tower.num_attention_heads}"
                )
        if self.text.pool not in TEXT_POOLS:
            raise CLIPConfigError(f"text pool={self.text.pool!r}; choose one of {TEXT_POOLS}")
        if self.vision.image_size % self.vision.patch_size:
            raise CLIPConfigError(
                f"vision image_size={self.vision.image_size} is not a multiple of patch_size={self.vision.patch_size}"
            )

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], *, source: str = "config.json") -> CLIPConfig:
        """From a transformers ``CLIPModel`` ``config.json`` dict (``model_type='clip'``).

        transformers writes only the fields that differ from its defaults (``save_pretrained``), so the dict is
        read through transformers' own ``CLIPConfig`` (its defaults, its legacy ``*_config_dict`` keys) rather
        than a second copy of them here.
        """
        from transformers import CLIPConfig as HFCLIPConfig

        if raw.get("model_type") != "clip":
            raise CLIPConfigError(
                f"{source}: model_type={raw.get('model_type')!r}, expected 'clip' (a transformers CLIPModel)"
            )
        hf = HFCLIPConfig.from_dict(dict(raw))
        t, v = hf.text_config, hf.vision_config
        for name, tower in (("text_config", t), ("vision_config", v)):
            if tower.hidden_act not in ACTIVATIONS:
                raise CLIPConfigError(
                    f"{source}: {name}.hidden_act={tower.hidden_act!r} is not supported (this port has "
                    f"{sorted(ACTIVATIONS)})"
                )
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(v, name), int):
                raise CLIPConfigError(f"{source}: vision_config.{name}={getattr(v, name)!r}; only square ints are supported")
        eos = t.eos_token_id
        if isinstance(eos, (list, tuple)):
            raise CLIPConfigError(f"{source}: text_config.eos_token_id={eos!r}; one id expected")
        return cls(
            text=CLIPTextConfig(
                vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                layer_norm_eps=float(t.layer_norm_eps),
                # transformers' rule (CLIPTextTransformer.forward): configs written before its PR #24773 carry
                # eos_token_id=2 and pool at the largest id.
                pool="argmax" if eos == 2 else "eos", eos_token_id=int(eos),
            ),
            vision=CLIPVisionConfig(
                hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                hidden_act=v.hidden_act, layer_norm_eps=float(v.layer_norm_eps),
            ),
            projection_dim=hf.projection_dim,
        )

    @classmethod
    def from_open_clip(cls, model_cfg: Mapping[str, Any], *, source: str = "open_clip_config.json") -> CLIPConfig:
        """From open_clip's model config (``open_clip_config.json``'s ``model_cfg``, or a ``model_configs/*.json``).

        Builds open_clip's standard ``CLIP`` with a ViT tower and its built-in text transformer. Architecture
        fields open_clip's own configs always write are required; the rest take open_clip's ``CLIPVisionCfg`` /
        ``CLIPTextCfg`` defaults (head_width 64, mlp_ratio 4, text pool 'argmax'). Any option that changes the
        network away from that (a timm or ResNet tower, layer scale, attentional pooling, ...) is refused by name.
        """
        where = source
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
        if missing:
            raise CLIPConfigError(f"{where} lacks {missing}; is it an open_clip model config (embed_dim, vision_cfg, "
                                  "text_cfg)?")
        vis, txt = dict(model_cfg["vision_cfg"]), dict(model_cfg["text_cfg"])
        if vis.get("timm_model_name"):
            raise CLIPConfigError(
                f"{where}: vision_cfg.timm_model_name={vis['timm_model_name']!r} is a timm image tower (ConvNeXt, "
                "...); this port has the ViT towers only"
            )
        if isinstance(vis.get("layers"), (list, tuple)):
            raise CLIPConfigError(f"{where}: vision_cfg.layers={vis['layers']!r} is a ModifiedResNet tower; this port "
                                  "has the ViT towers only")
        if txt.get("hf_model_name"):
            raise CLIPConfigError(f"{where}: text_cfg.hf_model_name={txt['hf_model_name']!r} is a Hugging Face text "
                                  "tower; this port has open_clip's built-in text transformer only")
        for key in ("layers", "width", "patch_size", "image_size"):
            if key not in vis:
                raise CLIPConfigError(f"{where}: vision_cfg lacks {key!r}")
        for key in ("width", "heads", "layers", "context_length", "vocab_size"):
            if key not in txt:
                raise CLIPConfigError(f"{where}: text_cfg lacks {key!r}")
        # (field, the value the standard network has): anything else is another network.
        standard = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "final_ln_after_pool": False,
                    "pool_type": "tok", "act_kwargs": None, "block_type": None, "qk_norm": False,
                    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                    "scale_fc": False}
        text_standard = {**{k: v for k, v in standard.items() if k not in ("attentional_pool", "no_ln_pre",
                                                                           "pool_type")},
                         "embed_cls": False, "no_causal_mask": False, "proj_bias": False, "proj_type": "linear"}
        for tower, cfg, ok in (("vision_cfg", vis, standard), ("text_cfg", txt, text_standard)):
            for key, want in ok.items():
                if key in cfg and cfg[key] != want and not (want is None and not cfg[key]):
                    raise CLIPConfigError(f"{where}: {tower}.{key}={cfg[key]!r} is not supported by this port "
                                          f"(it builds the standard CLIP network, {key}={want!r})")
        if model_cfg.get("init_logit_bias") is not None:
            raise CLIPConfigError(f"{where}: init_logit_bias is a SigLIP-style model; this port is CLIP only")
        eps = {}
        for tower, cfg in (("vision_cfg", vis), ("text_cfg", txt)):
            kw = dict(cfg.get("norm_kwargs") or {})
            eps[tower] = float(kw.pop("eps", 1e-5))
            if kw:
                raise CLIPConfigError(f"{where}: {tower}.norm_kwargs {sorted(kw)} not supported (only eps)")
        pool = txt.get("pool_type", "argmax")
        if pool not in TEXT_POOLS:
            raise CLIPConfigError(f"{where}: text_cfg.pool_type={pool!r}; this port pools with one of {TEXT_POOLS}")
        for key in ("image_size", "patch_size"):
            if not isinstance(vis[key], int):
                raise CLIPConfigError(f"{where}: vision_cfg.{key}={vis[key]!r}; only square ints are supported")
        act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
        width = int(vis["width"])
        head_width = int(vis.get("head_width", 64))
        return cls(
            text=CLIPTextConfig(
                vocab_size=int(txt["vocab_size"]), hidden_size=int(txt["width"]),
                intermediate_size=int(int(txt["width"]) * float(txt.get("mlp_ratio", 4.0))),
                num_hidden_layers=int(txt["layers"]), num_attention_heads=int(txt["heads"]),
                max_position_embeddings=int(txt["context_length"]), hidden_act=act, layer_norm_eps=eps["text_cfg"],
                pool=pool, eos_token_id=int(txt.get("eos_id", 2)),
            ),
            vision=CLIPVisionConfig(
                hidden_size=width, intermediate_size=int(width * float(vis.get("mlp_ratio", 4.0))),
                num_hidden_layers=int(vis["layers"]), num_attention_heads=width // head_width,
                image_size=int(vis["image_size"]), patch_size=int(vis["patch_size"]), hidden_act=act,
                layer_norm_eps=eps["vision_cfg"],
            ),
            projection_dim=int(model_cfg["embed_dim"]),
        )


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, as torch's LayerNorm (the fast E[x^2] - E[x]^2 loses digits on large activations).
    return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/out projections (biases on all four)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.k_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.v_proj = nnx.Linear(dim, dim, rngs=rngs)
        self.out_proj = nnx.Linear(dim, dim, rngs=rngs)

    def heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v of ``x`` [B, T, D], each [B, T, heads, head_dim] (for callers that change the attention)."""
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        return split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))

    def __call__(self, x: jax.Array, *, causal: bool = False) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]; ``causal``: token i attends to tokens <= i (the text tower)."""
        b, t, d = x.shape
        q, k, v = self.heads(x)
        scale = self.head_dim**-0.5
        if causal:
            logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
            allowed = jnp.tril(jnp.ones((t, t), bool))
            probs = jax.nn.softmax(jnp.where(allowed[None, None], logits, -jnp.inf), axis=-1)
            out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)
        else:
            out = dot_product_attention(q, k, v, scale=scale)
        return self.out_proj(out.reshape(b, t, d))


class CLIPMLP(nnx.Module):
    """fc2(activation(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, activation: Callable[[jax.Array], jax.Array], *, rngs: nnx.Rngs):
        self.activation = activation
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, rngs=rngs)
        self.layer_norm1 = _layer_norm(d, cfg.layer_norm_eps, rngs)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, ACTIVATIONS[cfg.hidden_act], rngs=rngs)
        self.layer_norm2 = _layer_norm(d, cfg.layer_norm_eps, rngs)

    def __call__(self, x: jax.Array, *, causal: bool = False) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of ``CLIPEncoderLayer``s (``layers``)."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, *, num_layers: int | None = None, causal: bool = False) -> jax.Array:
        """x: [B, T, D] through the first ``num_layers`` layers (None: all) -> [B, T, D]."""
        n = len(self.layers) if num_layers is None else num_layers
        if not 0 <= n <= len(self.layers):
            raise ValueError(f"num_layers={num_layers}; the encoder has {len(self.layers)} layers")
        for layer in self.layers[:n]:
            x = layer(x, causal=causal)
        return x


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The four cubic-convolution weights at offsets -1, 0, 1, 2 of fractions ``t`` [n] -> [n, 4]."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of torch's ``interpolate(mode='bicubic', align_corners=False)`` along one
    axis (given ``size``: source = (i + 0.5) * in / out - 0.5, cubic a = -0.75, border taps clamped, no antialias).

    Written out because ``jax.image`` resizes with Keys' a = -0.5 (and antialiases when shrinking): a different
    interpolant from the one transformers' ``interpolate_pos_encoding`` (and NACLIP, DINO) use.
    """
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size))
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m


def interpolate_grid(table: jax.Array, grid: int, out_hw: tuple[int, int]) -> jax.Array:
    """A [grid * grid, D] table of per-patch vectors resampled bicubically (torch's) to [out_h * out_w, D]."""
    if out_hw == (grid, grid):
        return table
    mh = jnp.asarray(torch_bicubic_matrix(grid, out_hw[0]), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(grid, out_hw[1]), jnp.float32)
    x = table.reshape(grid, grid, -1).astype(jnp.float32)
    out = jnp.einsum("hi,wj,ijd->hwd", mh, mw, x, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(out_hw[0] * out_hw[1], -1).astype(table.dtype)


class CLIPVisionEmbeddings(nnx.Module):
    """Patch embedding (conv, no bias), the class token and the learned position embedding."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_size = p
        self.grid = cfg.grid
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, (p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)))
        self.position_embedding = nnx.Embed(cfg.grid * cfg.grid + 1, d, rngs=rngs)

    def position_table(self, gh: int, gw: int) -> jax.Array:
        """[1 + gh * gw, D]: the class position and the patch positions, bicubically resampled when (gh, gw) is
        not the checkpoint's grid (as transformers' ``interpolate_pos_encoding=True``)."""
        table = self.position_embedding.embedding[...]
        return jnp.concatenate([table[:1], interpolate_grid(table[1:], self.grid, (gh, gw))], axis=0)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: [B, H, W, C] normalised, H and W multiples of the patch -> [B, 1 + gh * gw, D]."""
        b, h, w, _ = pixel_values.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h} x {w} is not a multiple of the patch size {p}: crop or resize it")
        x = self.patch_embedding(pixel_values.astype(self.patch_embedding.kernel[...].dtype))
        gh, gw, d = x.shape[1:]
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_table(gh, gw).astype(x.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    """embeddings -> pre_layrnorm -> encoder; post_layernorm of the class token is the pooled output."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
        self.pre_layrnorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.post_layernorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def embed(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 1 + gh * gw, D]: patch + class + position embeddings, then pre_layrnorm."""
        return self.pre_layrnorm(self.embeddings(pixel_values))

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """The last hidden state [B, 1 + gh * gw, D] (before post_layernorm)."""
        return self.encoder(self.embed(pixel_values))


class CLIPTextEmbeddings(nnx.Module):
    """Token and (learned) position embeddings."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: int [T, L] (L <= max_position_embeddings) -> [T, L, D]."""
        length = input_ids.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens; the text tower holds {self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding.embedding[None, :length]


class CLIPTextTransformer(nnx.Module):
    """embeddings -> causal encoder -> final_layer_norm; pooled at the end-of-text token."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.pool = cfg.pool
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, rngs=rngs)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: int [T, L] -> the normalised last hidden state [T, L, D]."""
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))

    def pool_index(self, input_ids: jax.Array) -> jax.Array:
        """int [T]: the position whose state is each sentence's embedding (see ``CLIPTextConfig.pool``)."""
        if self.pool == "argmax":
            return jnp.argmax(input_ids, axis=-1)
        if self.pool == "eos":  # first occurrence; 0 when absent, as transformers (padding may equal eos)
            return jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return jnp.full(input_ids.shape[:1], 0 if self.pool == "first" else input_ids.shape[1] - 1)

    def pooled(self, input_ids: jax.Array) -> jax.Array:
        """[T, D]: the pooled sentence states (transformers' ``pooler_output``)."""
        hidden = self(input_ids)
        return jnp.take_along_axis(hidden, self.pool_index(input_ids)[:, None, None], axis=1)[:, 0]


class CLIPModel(nnx.Module):
    """Both towers, their projections into the shared space and ``logit_scale`` (transformers' ``CLIPModel``)."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs)
        self.vision_model = CLIPVisionTransformer(cfg.vision, rngs=rngs)
        self.visual_projection = nnx.Linear(cfg.vision.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)
        self.text_projection = nnx.Linear(cfg.text.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), jnp.float32))

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] normalised -> [B, projection_dim] (transformers' ``get_image_features``; any grid: the
        position embedding is interpolated, as its ``interpolate_pos_encoding=True``)."""
        hidden = self.vision_model(pixel_values)
        return self.visual_projection(self.vision_model.post_layernorm(hidden[:, 0]))

    def patch_tokens(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, gh, gw, projection_dim]: post_layernorm and visual_projection of every patch token."""
        b, h, w, _ = pixel_values.shape
        p = self.vision_model.embeddings.patch_size
        hidden = self.vision_model(pixel_values)[:, 1:]
        tokens = self.visual_projection(self.vision_model.post_layernorm(hidden))
        return tokens.reshape(b, h // p, w // p, -1)

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """int [T, L] -> [T, projection_dim] (transformers' ``get_text_features``)."""
        return self.text_projection(self.text_model.pooled(input_ids))
