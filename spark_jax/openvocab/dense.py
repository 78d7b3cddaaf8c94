"""Dense per-patch CLIP features: the CLIP vision tower with its last block modified (method-facts 5.5).

CLIP's patch tokens, taken as they are, classify poorly: the last block's attention mixes every patch with a
few global ones. Training-free dense CLIP methods therefore change only the **last** block, then apply
``post_layernorm`` and the visual projection to every token. With ``h = layer_norm1(x)``, ``q, k, v`` its
per-head projections (head width d), ``W_o`` the output projection and ``MLP(.) = mlp(layer_norm2(.))``:

* ``vanilla``  (CLIP, the unchanged block): y = x + W_o softmax(q k^T / sqrt d) v, then y + MLP(y).
* ``maskclip`` (MaskCLIP, Zhou et al. ECCV 2022, ``vit.py``): the value path, y = x + W_o v, then y + MLP(y)
  (attention replaced by the identity).
* ``sclip``    (SCLIP, Wang et al. ECCV 2024, ``clip/model.py``): correlative self-attention,
  y = x + W_o [softmax(q q^T / sqrt d) + softmax(k k^T / sqrt d)] v, then y + MLP(y).
* ``naclip``   (NACLIP, Hajimiri et al. WACV 2025, ``clip/model.py``, arch ``'reduced'``): neighbourhood attention,
  y = W_o softmax(k k^T / sqrt d + omega) v, with neither the residual nor the MLP.

NACLIP's omega is a Gaussian of the 2-D distance between patch positions, ``exp(-||p_i - p_j||^2 / (2 std^2))``
(peak 1, not normalised), std 5 in the paper's setting (``reduced naclip 5``); the class token's row and column
are 0. The published code builds it by convolving one-hot maps with a (2 gh - 1) x (2 gw - 1) Gaussian window,
which covers every pair of patches, so it equals the closed form used here.

``dense_features`` returns the patch tokens [B, gh, gw, proj], L2-normalised; the class token is dropped.
The last block's attention is materialised per head ([B, heads, N, N] float32 logits, N = 1 + gh gw): small at
the protocol's sizes (ViT-L/14 at 336 px: N = 577), ~1.8 GB per image at 1022 px (N = 5330, 16 heads).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from spark_jax.backbones.diffusion import MATMUL_PRECISIONS, precision_context
from spark_jax.graph.affinity import l2_normalize

__all__ = ["DENSE_MODES", "DenseCLIPConfig", "dense_features", "neighbourhood_bias"]

DENSE_MODES = ("naclip", "sclip", "maskclip", "vanilla")


@dataclasses.dataclass(frozen=True)
class DenseCLIPConfig:
    """Which last block ``dense_features`` runs (hashable: a static argument of jit).

    Attributes:
      mode: ``'naclip'`` (default: NACLIP's paper setting ``reduced naclip 5``, the dense features of the
        SCLIP/NACLIP protocol NERVE reports against; NERVE's own choice is not published, method-facts 1.2),
        ``'sclip'``, ``'maskclip'`` or ``'vanilla'`` (the unchanged block); see the module docstring.
      gaussian_std: NACLIP's neighbourhood std in patches (5.0, its paper setting; ``test_all.sh``); only
        ``'naclip'`` reads it.
      matmul_precision: precision of every matmul of the tower (``jax.default_matmul_precision``): ``'highest'``
        (float32, as the rest of the library; the TPU/GPU default is bf16-like), ``'high'``, ``'default'``, or
        None for the caller's setting.
    """

    mode: str = "naclip"
    gaussian_std: float = 5.0
    matmul_precision: str | None = "highest"

    def __post_init__(self):
        if self.mode not in DENSE_MODES:
            raise ValueError(f"DenseCLIPConfig.mode={self.mode!r}; choose one of {DENSE_MODES}.")
        if not (isinstance(self.gaussian_std, (int, float)) and math.isfinite(self.gaussian_std)
                and self.gaussian_std > 0):
            raise ValueError(f"DenseCLIPConfig.gaussian_std={self.gaussian_std!r}; NACLIP's neighbourhood needs a "
                             "finite std > 0 (in patches; the paper uses 5).")
        if self.matmul_precision is not None and self.matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(f"DenseCLIPConfig.matmul_precision={self.matmul_precision!r}; choose one of "
                             f"{MATMUL_PRECISIONS} or None.")


def neighbourhood_bias(grid_h: int, grid_w: int, std: float) -> jax.Array:
    """NACLIP's omega, float32 [1 + P, 1 + P] (P = grid_h * grid_w, patches row-major after the class token).

    The Gaussian of the squared distance is separable, exp(-(dr^2 + dc^2) / 2s^2) = g(dr) g(dc), so omega is the
    Kronecker product of two 1-D Gaussian matrices, computed in the graph (no P x P constant in the program).
    """
    def gauss(n: int) -> jax.Array:
        pos = jnp.arange(n, dtype=jnp.float32)
        return jnp.exp(-((pos[:, None] - pos[None, :]) ** 2) / (2.0 * std**2))

    p = grid_h * grid_w
    omega = (gauss(grid_h)[:, None, :, None] * gauss(grid_w)[None, :, None, :]).reshape(p, p)
    return jnp.pad(omega, ((1, 0), (1, 0)))


def _attend(queries: jax.Array, keys: jax.Array, values: jax.Array, scale: float,
            bias: jax.Array | None = None) -> jax.Array:
    """softmax(queries keys^T * scale + bias) values per head; [B, N, H, d] in and out."""
    if bias is not None:
        bias = bias[None, None].astype(queries.dtype)  # [1, 1, N, N]: the same for every image and head
    return jax.nn.dot_product_attention(queries, keys, values, bias=bias, scale=scale)


def _last_block(layer, x: jax.Array, grid: tuple[int, int], cfg: DenseCLIPConfig) -> jax.Array:
    """The last encoder layer of ``cfg.mode`` on tokens x [B, N, D] (module docstring's table)."""
    attn = layer.self_attn
    b, n, d = x.shape
    q, k, v = attn.heads(layer.layer_norm1(x))  # each [B, N, heads, head_dim]; jit drops the unused ones
    scale = attn.head_dim**-0.5
    if cfg.mode == "maskclip":
        mixed = v  # the value path: each token keeps its own value
    elif cfg.mode == "vanilla":
        mixed = _attend(q, k, v, scale)
    elif cfg.mode == "sclip":
        # (softmax(qq^T) + softmax(kk^T)) v = softmax(qq^T) v + softmax(kk^T) v: rows of A sum to 2, as in SCLIP.
        mixed = _attend(q, q, v, scale) + _attend(k, k, v, scale)
    else:  # naclip
        mixed = _attend(k, k, v, scale, neighbourhood_bias(*grid, cfg.gaussian_std))
    out = attn.out_proj(mixed.reshape(b, n, d))
    if cfg.mode == "naclip":
        return out  # NACLIP's 'reduced' architecture drops the residual and the feed-forward network
    x = x + out
    return x + layer.mlp(layer.layer_norm2(x))


def dense_features(model, pixel_values: jax.Array, cfg: DenseCLIPConfig = DenseCLIPConfig()) -> jax.Array:
    """Dense CLIP features: the vision tower with ``cfg.mode``'s last block, every patch token projected.

    Runs ``vision_model.embed`` (patches, class token, position embedding at this grid, pre-LN), the first
    n - 1 encoder layers unchanged, the modified last layer, ``post_layernorm`` and ``visual_projection``.
    Static shapes, no host round-trip; jit it with ``nnx.jit(dense_features, static_argnames='cfg')``.

    Args:
      model: ``spark_jax.models.clip.CLIPModel`` (``load_clip(...).model``).
      pixel_values: float [B, H, W, 3], normalised with CLIP's mean and std (``CLIP.normalize``); H and W
        multiples of the patch size (any grid: the position embedding is interpolated).
      cfg: the mode and its parameters.

    Returns:
      float32 [B, H / patch, W / patch, proj], each patch's feature of unit L2 norm.
    """
    vm = model.vision_model
    patch = vm.embeddings.patch_size
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != 3:
        raise ValueError(f"pixel_values must be [B, H, W, 3] (channels last); got shape {tuple(pixel_values.shape)}.")
    _, height, width, _ = pixel_values.shape
    if height % patch or width % patch or height < patch or width < patch:
        raise ValueError(f"pixel_values are {height} x {width}; dense CLIP needs H and W to be positive multiples "
                         f"of the patch size {patch} (resize or crop the images first).")
    grid = (height // patch, width // patch)
    with precision_context(cfg.matmul_precision):
        x = vm.embed(pixel_values)
        x = vm.encoder(x, num_layers=len(vm.encoder.layers) - 1)
        x = _last_block(vm.encoder.layers[-1], x, grid, cfg)
        x = model.visual_projection(vm.post_layernorm(x))
    tokens = x[:, 1:].reshape(x.shape[0], grid[0], grid[1], x.shape[-1])
    return l2_normalize(tokens.astype(jnp.float32))
