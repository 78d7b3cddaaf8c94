"""DiffSeg (Tian et al., CVPR 2024; google/diffseg): self-attention aggregation -> iterative KL merging -> NMS.

The published algorithm (``diffseg/segmentor.py``, ``third_party/keras_cv/diffusion_model.py``), re-derived as
static-shape JAX (one jitted program per image batch; nothing leaves the device):

1. **Backbone** (``SPEC.diffusion_defaults``; any flag overrides): an SD 1.x-form UNet at 512 px, one UNet call at
   timestep 300 with **no noise** (``noise_source='none'``: the VAE posterior mean x scaling factor enters the UNet
   with t = 300's embedding), the empty prompt. The taps are the head-mean self-attention probabilities of every
   ``attn1`` of the UNet (``<module>.attn1:probs_mean``, [B, N, N], accumulated head by head inside the UNet). On
   SD 1.x these are the 16 modules DiffSeg reads: at 64 x 64 ``down_blocks.0.attentions.{0,1}`` and
   ``up_blocks.3.attentions.{0,1,2}``, at 32 x 32 ``down_blocks.1`` / ``up_blocks.2``, at 16 x 16
   ``down_blocks.2`` / ``up_blocks.1`` (five each), at 8 x 8 ``mid_block.attentions.0`` (each
   ``...transformer_blocks.0.attn1``). On SDXL-family checkpoints it is the same rule over that UNet's attn1 modules
   (every transformer block of every attention module, down, mid and up): SSD-1B at 1024 px has 8 of them at
   64 x 64 and 26 at 32 x 32 (no 16 x 16 or 8 x 8 attention), so the resolution weights are 64:32 = 2/3, 1/3.
   (The original centre-crops to the short side and resizes with TensorFlow's bilinear; the runner's shared
   preprocessing crops to the short side - 1, DiffCut's, and is kept so every method sees the same pixels.)
2. **Aggregation** (:func:`aggregate_attention`, the original's ``aggregate_weights``): the layers of one token
   grid are averaged (KerasCV's ``/ 5``); per grid the key axes are bilinearly upsampled to the finest grid
   (half-pixel centres: Keras ``UpSampling2D(interpolation='bilinear')`` = torch ``align_corners=False`` =
   :func:`spark_jax.masks.resample.bilinear_matrix`), each query's map renormalised to sum 1, the query axes
   nearest-repeated, and the grids weighted in proportion to their side (64:32:16:8 = 8/15, 4/15, 2/15, 1/15). The
   repeat is never materialised: each grid's [N_r, S, S] maps are added into the one [S^2, S^2] accumulator through a
   broadcasting reshape, one grid at a time.
3. **Iterative merging** (:func:`merge_attention`, the original's ``mask_merge``): anchors on a ``num_points``^2
   grid (:func:`anchor_grid`: rows and columns 1, 5, ..., 61 on 64 x 64); the symmetric divergence
   ``(KL(p||q) + KL(q||p)) / 2 = 0.5 * sum (p - q)(log p - log q)`` of every anchor against every map as two matrix
   products (:func:`symmetric_kl`: no [256, 4096, 4096] tensor); every map closer than ``kl_threshold`` (strict
   ``<``) joins the anchor's proposal, the proposal being their mean. Then ``iterations - 1`` greedy passes over the
   proposals in order: a proposal not yet matched becomes an anchor, every proposal closer than the threshold (also
   ones matched before, as the original) is averaged into it, and all of them are marked matched. The original's
   list grows and shrinks with the data; here there are always ``num_points^2`` slots with a validity mask, and a
   pass writes anchor ``i``'s merge into slot ``i``, so the valid slots keep the original's list order.
4. **Labels** (the original's NMS): the proposals are bilinearly upsampled to the mask size and each pixel takes the
   argmax over the valid ones (ties to the first); ids are then made contiguous. The original upsamples x8 to
   512 px; here the runner's mask size (128 by default) is the target, as for every method.

Choices and differences (documented, not the paper's):

* **Logs of zeros.** The divergence needs ``log p``; a float32 zero stands for a probability below 1.2e-38 and is
  read as ``finfo(float32).tiny`` inside the log (``p`` itself is not changed). The original takes the log of
  exact zeros: its float64 passes then give NaN for every pair involving such a map, and NaN ``<`` threshold is
  False, so the pair silently never merges.
* **The original's first pass runs in float16** (``tf.cast(..., tf.float16)`` before ``KL``): every probability
  below 2^-25 (~3e-8) underflows to 0, ``0 * log 0`` is NaN, and an anchor or map with a single underflowed entry
  matches nothing (NaN < threshold is False); such an anchor's proposal is 0/0 = NaN and is dropped in the next
  pass. ``first_pass='float16'`` reproduces exactly these drops (the pairs allowed are those of the float16 view)
  and computes the divergence of the allowed pairs from the float16-rounded probabilities in float32; it does not
  reproduce float16 rounding of the logarithms and of the 4096-term sums. The default ``'float32'`` has no drops.
* **Non-finite maps** (NaN/Inf anywhere in a query's aggregated map) never match and are never anchors; they are
  counted (``num_nonfinite_maps``).
* **K-means refinement** (``refine``, the original's optional ``KMeans(init=proposals, n_init=1)``; off in its
  benchmark notebook, the default here) uses :func:`spark_jax.methods.kmeans.lloyd` (an emptied cluster keeps its
  centre where sklearn relocates it) and then the cluster means, as the original.
* **Thresholds:** 1.1 (COCO-Stuff, the benchmark notebook) by default; the authors' notebook uses 0.9 for
  Cityscapes: ``--diffseg_kl_threshold=0.9`` (the runner's method configs are not per dataset). DiffCut re-ran
  DiffSeg with 1.0.
* **Anchor grid on other grids**: the original's ``63`` is ``side - 1`` (``segment = (side - 1) // (P - 1)``,
  centred); on the demo's 32 x 32 grid the anchors are 0, 2, ..., 30.

On the weights-free demo (the handcrafted backbone's one pretend head ``tokens.attn1:probs_mean``, a 32 x 32 grid)
the aggregation reduces to the identity: one grid of one layer has weight 1, upsampling to its own size is the
identity and its rows already sum to 1.

Memory (SD 1.x shapes at 512 px, float32; XLA:CPU ``memory_analysis`` of the runner's compiled method): the 16 maps
arrive as the backbone's taps, 341 MiB per image (5 x 64 MiB at 64 x 64, the rest ~21 MiB); the program's
temporaries are 136 MiB for a batch of one (the 64 MiB accumulator, its logarithm, [256, 4096] anchor blocks) and
410 MiB for any batch of two or more (images run one at a time through ``lax.map``, which also holds one image's
slice of the inputs). Time: aggregation + merging + labels ~0.53 s per image on this project's 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.masks.resample import bilinear_matrix
from spark_jax.masks.upsample import upsample_labels
from spark_jax.methods.kmeans import lloyd
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec
from spark_jax.sharding import per_image_map

__all__ = [
    "ATTENTION_QUANTITY",
    "DiffSegConfig",
    "DiffSegResult",
    "MergeResult",
    "SPEC",
    "aggregate_attention",
    "anchor_grid",
    "attention_taps",
    "diffseg_segment",
    "merge_attention",
    "resolution_weights",
    "symmetric_kl",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_TINY = float(np.finfo(np.float32).tiny)
# The taps DiffSeg reads: the head-mean self-attention probabilities of an attn1 module ([B, N, N]).
ATTENTION_QUANTITY = "attn1:probs_mean"
FIRST_PASS = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class DiffSegConfig:
    """DiffSeg's hyperparameters (the benchmark notebook's values). ``kl_threshold`` is a traced pytree leaf (a sweep
    over it compiles once); the rest is static.

    Attributes:
        kl_threshold: merge when the symmetric KL divergence is below this (strict), in every pass. 1.1 for
            COCO-Stuff (the paper's notebook), 0.9 for Cityscapes (the authors' notebook).
        iterations: merging passes: the anchor pass, then ``iterations - 1`` greedy passes (3 in the paper).
        num_points: anchors per side of the anchor grid (16: 256 anchors at rows/columns 1, 5, ..., 61 of 64 x 64).
        first_pass: ``float32`` (exact) or ``float16``: the original's float16 first pass, whose underflowed
            probabilities make NaN divergences that silently drop anchors and maps (module docstring).
        refine: the original's optional K-means refinement of the proposals (off in its benchmark).
    """

    kl_threshold: float = dataclasses.field(default=1.1, metadata={
        "help": "DiffSeg's merge threshold on the symmetric KL divergence (1.1 = COCO-Stuff, the paper's notebook; "
                "the authors use 0.9 for Cityscapes)."})
    iterations: int = dataclasses.field(default=3, metadata={
        "help": "DiffSeg's merging passes (the anchor pass, then greedy passes over the proposals)."})
    num_points: int = dataclasses.field(default=16, metadata={
        "help": "DiffSeg's anchors per side of the anchor grid (16 -> 256 anchors)."})
    first_pass: Literal["float32", "float16"] = dataclasses.field(default="float32", metadata={
        "help": "Precision of DiffSeg's first merge pass: float32, or float16 to reproduce the original's "
                "underflow drops."})
    refine: bool = dataclasses.field(default=False, metadata={
        "help": "DiffSeg's optional K-means refinement of the proposals (off in the paper's benchmark)."})

    def __post_init__(self):
        for name in ("iterations", "num_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "iterations" else 2):
                raise ValueError(f"diffseg_{name} must be an int >= {1 if name == 'iterations' else 2}, got "
                                 f"{value!r}")
        if self.first_pass not in FIRST_PASS:
            raise ValueError(f"diffseg_first_pass must be one of {FIRST_PASS}, got {self.first_pass!r}")
        if not isinstance(self.refine, bool):
            raise ValueError(f"diffseg_refine must be a bool, got {self.refine!r}")

    def check_values(self) -> None:
        """The traced value, checked on the host (ValueError naming the flag)."""
        t = self.kl_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"diffseg_kl_threshold must be a finite number > 0, got {t!r}")


jax.tree_util.register_dataclass(DiffSegConfig, data_fields=["kl_threshold"],
                                 meta_fields=["iterations", "num_points", "first_pass", "refine"])


# ----------------------------------------------------------------------------------------------- aggregation
def _side(num_tokens: int, what: str) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"DiffSeg needs square token grids; {what} has {num_tokens} tokens")
    return side


def resolution_weights(sides: Sequence[int]) -> np.ndarray:
    """DiffSeg's resolution weights (``get_weight_rato``): proportional to each grid's side, summing to 1.
    ``[64, 32, 16, 8] -> [8, 4, 2, 1] / 15``; SSD-1B's ``[64, 32] -> [2/3, 1/3]``."""
    sides = np.asarray(sides, np.float64)
    return sides / sides.sum()


def aggregate_attention(maps: Sequence[jax.Array]) -> jax.Array:
    """DiffSeg's attention aggregation (``aggregate_weights``) of one image's self-attention maps.

    Args:
        maps: head-mean self-attention probabilities of each layer, [N_l, N_l] (queries x keys, tokens row-major on
            a square grid); layers of one grid are averaged.

    Returns:
        float32 [S^2, S^2], S the finest grid's side: row ``r * S + c`` is query (r, c)'s map over the S x S keys,
        summing to 1.
    """
    groups: dict[int, list[jax.Array]] = {}
    for i, m in enumerate(maps):
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"DiffSeg: attention map {i} must be [N, N] (queries x keys), got {m.shape}")
        groups.setdefault(int(m.shape[0]), []).append(m)
    if not groups:
        raise ValueError("DiffSeg needs at least one self-attention map")
    sides = {n: _side(n, f"a {n}-token attention map") for n in groups}
    big = max(sides.values())
    bad = sorted(s for s in sides.values() if big % s)
    if bad:
        raise ValueError(f"DiffSeg's nearest repeat of the query axes needs every grid to divide the finest "
                         f"({big} x {big}); got grids {bad}")
    order = sorted(groups, reverse=True)
    weights = resolution_weights([sides[n] for n in order])
    acc = jnp.zeros((big, 1, big, 1, big * big), jnp.float32)
    for n, w in zip(order, weights):
        s = sides[n]
        mean = sum(m.astype(jnp.float32) for m in groups[n]) / len(groups[n])  # the per-grid layer mean
        keys = mean.reshape(n, s, s)
        if s != big:
            up = jnp.asarray(bilinear_matrix(s, big))  # [S, s]
            keys = jnp.einsum("Kk,qkl->qKl", up, keys, precision=_HIGHEST)
            keys = jnp.einsum("Ll,qKl->qKL", up, keys, precision=_HIGHEST)
        keys = keys / jnp.sum(keys, axis=(1, 2), keepdims=True)
        f = big // s
        # Nearest repeat of the query axes by broadcasting into the accumulator's [s, f, s, f] view.
        acc = acc.reshape(s, f, s, f, big * big) + np.float32(w) * keys.reshape(s, 1, s, 1, big * big)
    return acc.reshape(big * big, big * big)


# ----------------------------------------------------------------------------------------------- merging
def anchor_grid(side: int, num_points: int) -> np.ndarray:
    """Flat token indices (row-major) of DiffSeg's ``num_points`` x ``num_points`` anchors on a ``side``^2 grid
    (``generate_sampling_grid`` with its 63 = side - 1): rows/columns ``start + k * segment``, segment =
    ``(side - 1) // (num_points - 1)``, centred. 64 and 16: 1, 5, ..., 61."""
    if not 2 <= num_points <= side:
        raise ValueError(f"diffseg_num_points={num_points} must lie in [2, {side}] (the finest attention grid is "
                         f"{side} x {side}); lower --diffseg_num_points")
    segment = (side - 1) // (num_points - 1)
    start = (side - 1 - segment * (num_points - 1)) // 2
    coords = start + segment * np.arange(num_points)
    return (coords[:, None] * side + coords[None, :]).reshape(-1).astype(np.int32)


def _log(p: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(p, _TINY))  # a float32 zero is a probability below tiny (module docstring)


def symmetric_kl(p: jax.Array, q: jax.Array) -> jax.Array:
    """``(KL(p_i||q_j) + KL(q_j||p_i)) / 2 = 0.5 (h_i + h_j - p_i . log q_j - q_j . log p_i)`` for every pair, h the
    negative entropies: two matrix products, no [A, M, D] tensor.

    Args:
        p: [A, D] distributions; q: [M, D] distributions.

    Returns:
        float32 [A, M].
    """
    lp, lq = _log(p), _log(q)
    hp, hq = jnp.sum(p * lp, axis=1), jnp.sum(q * lq, axis=1)
    cross = jnp.matmul(p, lq.T, precision=_HIGHEST) + jnp.matmul(lp, q.T, precision=_HIGHEST)
    return 0.5 * (hp[:, None] + hq[None, :] - cross)


class MergeResult(NamedTuple):
    """DiffSeg's proposals of one image (fixed slots).

    Attributes:
        proposals: float32 [K, S^2] merged maps, K = num_points^2 slots; invalid slots hold zeros.
        valid: bool [K], the slots holding a proposal, in the original's list order.
        num_first_pass: int32 [], proposals after the anchor pass (K unless float16 drops some).
        num_nonfinite_maps: int32 [], query maps holding NaN/Inf (never merged).
    """

    proposals: jax.Array
    valid: jax.Array
    num_first_pass: jax.Array
    num_nonfinite_maps: jax.Array


def _merged(members: jax.Array, maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Means of the member maps (members bool [K, M], maps [M, D]) and whether a row has any."""
    count = jnp.sum(members, axis=1)
    total = jnp.matmul(members.astype(jnp.float32), maps, precision=_HIGHEST)
    return total / jnp.maximum(count, 1)[:, None].astype(jnp.float32), count > 0


def _anchor_pass(maps: jax.Array, finite: jax.Array, anchors: np.ndarray, threshold: jax.Array,
                 first_pass: str) -> tuple[jax.Array, jax.Array]:
    """The first pass: every map closer than the threshold to anchor a joins its proposal."""
    anchor_maps = maps[anchors]
    allowed = finite[anchors][:, None] & finite[None, :]
    if first_pass == "float16":
        # The original casts to float16: an underflowed entry makes every divergence with that map NaN.
        half = maps.astype(jnp.float16)
        whole = jnp.all(half > 0, axis=1)
        allowed &= whole[anchors][:, None] & whole[None, :]
        rounded = half.astype(jnp.float32)
        div = symmetric_kl(rounded[anchors], rounded)
    else:
        div = symmetric_kl(anchor_maps, maps)
    is_self = jnp.arange(maps.shape[0])[None, :] == jnp.asarray(anchors)[:, None]
    div = jnp.where(is_self, 0.0, div)  # exactly 0; the matrix form leaves rounding there
    members = allowed & (div < threshold)
    return _merged(members, maps)


def _greedy_pass(proposals: jax.Array, valid: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A later pass: in slot order, a proposal not yet matched absorbs every proposal closer than the threshold
    (matched or not, as the original) and marks them matched."""
    k = proposals.shape[0]
    div = jnp.where(jnp.eye(k, dtype=bool), 0.0, symmetric_kl(proposals, proposals))
    close = valid[:, None] & valid[None, :] & (div < threshold)

    def step(matched, i):
        is_anchor = valid[i] & ~matched[i]
        return matched | (is_anchor & close[i]), is_anchor

    _, is_anchor = jax.lax.scan(step, jnp.zeros((k,), bool), jnp.arange(k))
    merged, any_member = _merged(close & is_anchor[:, None], proposals)
    keep = is_anchor & any_member
    return jnp.where(keep[:, None], merged, 0.0), keep


def merge_attention(maps: jax.Array, cfg: DiffSegConfig) -> MergeResult:
    """DiffSeg's iterative attention merging (``mask_merge``, all ``cfg.iterations`` passes) of one image.

    Args:
        maps: [S^2, S^2] aggregated attention (:func:`aggregate_attention`), rows summing to 1.
        cfg: the thresholds, passes, anchor grid and first-pass precision.
    """
    n = maps.shape[0]
    side = _side(n, "the aggregated attention")
    anchors = anchor_grid(side, cfg.num_points)
    finite = jnp.all(jnp.isfinite(maps), axis=1)
    clean = jnp.where(finite[:, None], maps.astype(jnp.float32), 1.0 / n)  # keeps NaN out of the products
    threshold = jnp.asarray(cfg.kl_threshold, jnp.float32)
    proposals, valid = _anchor_pass(clean, finite, anchors, threshold, cfg.first_pass)
    proposals = jnp.where(valid[:, None], proposals, 0.0)
    num_first = jnp.sum(valid).astype(jnp.int32)
    for _ in range(cfg.iterations - 1):
        proposals, valid = _greedy_pass(proposals, valid, threshold)
    if cfg.refine:
        proposals, valid = _refine(clean, proposals, valid)
    return MergeResult(proposals, valid, num_first, jnp.sum(~finite).astype(jnp.int32))


def _refine(maps: jax.Array, proposals: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The original's K-means refinement: Lloyd on every map from the proposals (sklearn's defaults), then the
    cluster means."""
    k = proposals.shape[0]
    order = jnp.argsort(~valid, stable=True)  # valid proposals first, in their order
    res = lloyd(maps, proposals[order], jnp.sum(valid), max_iter=300, tol=1e-4)
    members = res.labels[None, :] == jnp.arange(k)[:, None]
    return _merged(members, maps)


# ----------------------------------------------------------------------------------------------- labels
class DiffSegResult(NamedTuple):
    """DiffSeg's segmentation of one image (add a leading batch axis when batched).

    Attributes:
        labels: int32 [m, m], contiguous ids in [0, num_proposals).
        num_proposals: int32 [], proposals after the last pass.
        num_segments: int32 [], distinct labels in ``labels``.
        num_first_pass: int32 [], proposals after the anchor pass.
        num_nonfinite_maps: int32 [].
    """

    labels: jax.Array
    num_proposals: jax.Array
    num_segments: jax.Array
    num_first_pass: jax.Array
    num_nonfinite_maps: jax.Array


def diffseg_segment(maps: Sequence[jax.Array], cfg: DiffSegConfig, mask_size: int) -> DiffSegResult:
    """The whole of DiffSeg on one image: aggregation, merging, upsampling of the proposals and argmax.

    Args:
        maps: each layer's head-mean self-attention [N_l, N_l].
        cfg: DiffSeg's hyperparameters.
        mask_size: side of the label map.
    """
    agg = aggregate_attention(maps)
    res = merge_attention(agg, cfg)
    side = math.isqrt(agg.shape[0])
    k = res.proposals.shape[0]
    soft = res.proposals.T.reshape(side, side, k)
    slot = upsample_labels(soft, (mask_size, mask_size), valid=res.valid)
    rank = jnp.cumsum(res.valid).astype(jnp.int32) - 1  # slot -> contiguous id
    labels = rank[slot]
    present = jnp.zeros((k,), bool).at[labels.reshape(-1)].set(True)
    return DiffSegResult(labels, jnp.sum(res.valid).astype(jnp.int32), jnp.sum(present).astype(jnp.int32),
                         res.num_first_pass, res.num_nonfinite_maps)


# ----------------------------------------------------------------------------------------------- the method spec
def attention_taps(names: Sequence[str]) -> tuple[str, ...]:
    """The taps DiffSeg reads among a backbone's tap names: every ``...attn1:probs_mean``."""
    return tuple(n for n in names if n.endswith("." + ATTENTION_QUANTITY) or n == ATTENTION_QUANTITY)


def _spec_taps(cfg: DiffSegConfig, backbone) -> tuple[str, ...]:
    del cfg
    names = backbone.tap_names() if hasattr(backbone, "tap_names") else ()
    taps = attention_taps(names)
    if not taps:
        raise ValueError(
            f"--method=diffseg reads self-attention probabilities ('<module>.{ATTENTION_QUANTITY}' taps), which "
            f"{type(backbone).__name__} does not provide (its taps: {', '.join(names) or 'none'}). Use a diffusion "
            "checkpoint (--checkpoint=<a diffusers folder>; DiffSeg's is SD 1.x) or --backbone=handcrafted.")
    return (backbone.feature_tap, *taps)


def _spec_build(ctx: MethodContext):
    def method(inputs: MethodInputs, cfg: DiffSegConfig):
        maps = [v for k, v in inputs.taps.items() if k in attention_taps((k,))]
        # Image by image (lax.map): the working set is one image's whatever the batch size (module docstring); a
        # vmap holds B of them (measured 332 MiB of temporaries already for B = 1 on XLA:CPU, against 136 MiB).
        res = per_image_map(lambda ms: diffseg_segment(ms, cfg, ctx.mask_size), maps)  # per device under a mesh
        diag = {
            "num_proposals": res.num_proposals,
            "num_segments": res.num_segments,
            "num_first_pass": res.num_first_pass,
            "num_nonfinite_maps": res.num_nonfinite_maps,
        }
        return res.labels, diag

    return method


def _spec_params(cfg: DiffSegConfig, ctx: MethodContext, grid: tuple[int, int]) -> DiffSegConfig:
    del ctx, grid  # the attention grids are checked when the program is traced (anchor_grid)
    cfg.check_values()
    return cfg


SPEC = MethodSpec(
    name="diffseg",
    title="DiffSeg",
    config_type=DiffSegConfig,
    flag_prefix="diffseg_",
    build=_spec_build,
    params=_spec_params,
    diagnostics=("num_proposals", "num_segments", "num_first_pass", "num_nonfinite_maps"),
    taps=_spec_taps,
    upsampling="soft_labels",
    upsamplings=("soft_labels",),
    check=DiffSegConfig.check_values,
    source="spark_jax/methods/diffseg.py",
    diffusion_defaults={"resolution": 512, "timestep": 300, "noise_source": "none"},
    # 16 [N, N] maps per image (341 MB at SD 1.x 512 px): a cache of them would outgrow any disk on a benchmark.
    cache_taps=False,
)
