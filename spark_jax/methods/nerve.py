"""NERVE (Mahatha, Dolz, Desrosiers, WACV 2026): open-vocabulary segmentation by a label-generating random walk
over a diffusion-attention graph, with entropy-weighted attention heads.

What is published is the WACV slides (``/work/shared/papers/003_*``) and an equation summary; there is no code and
no paper text (``/work/shared/notes/method-facts.md`` section 1). This module implements the slides' equations;
every value or reading they leave open is a field of :class:`NerveConfig` or a documented choice below.

Per image, from one self-attention module's queries and keys q, k [heads, N, d] (SD's ``attn1:q`` / ``attn1:k``
taps, on the module's h x w token grid, tokens row-major) and CLIP's class probabilities [hc, wc, K]:

1. **Head weights** (slide 4.3): ``w_h = softmax_h(-c H_h)``. H_h is *our reading* of the unpublished entropy: the
   mean over queries i of the Shannon entropy (nats) of head h's attention row softmax(q_i k^T / sqrt(d)), the
   attention the UNet itself computes. A peaked ("confident") head has low entropy and, for c > 0, the larger
   weight; c = 0 is the plain mean over heads (the slides' "Mean" ablation). With the default c = 1, w_h is
   proportional to exp(-H_h) = 1 / (the head's geometric-mean effective number of attended keys).
2. **Global affinity** (slide 4.2): ``[A_global]_ij = cos(q_i, k_j)``, the cosine of token i's *query* and token
   j's *key* (not the softmax probability), per head, then ``A = sum_h w_h A^(h)`` (slide 4.3's A_weighted). As one
   matrix product: the per-head unit vectors concatenated over heads, the queries' scaled by w_h.
3. **Local affinity** (slide 4.2): ``eps_self`` on the diagonal, the same per-head cosine ``cos(q_i, k_j)`` for
   j in the 8-neighbourhood N(i) (SPARK's Eq. 2; the slides do not say which neighbourhood), 0 elsewhere; heads
   weighted by the same w_h (the diagonal stays eps_self: the weights sum to 1).
4. **Fusion** (slide 4.4): ``S = beta RowNorm(A_global) + (1 - beta) RowNorm(A_local)``. RowNorm of each part is
   *inferred* (a walk needs stochastic rows; SPARK, by the same authors, writes it). Negative cosines are clipped
   at 0 before RowNorm (after the head mix), as the project's ``negatives='clip'``: RowNorm of a signed row is not
   a distribution. A row left without mass becomes a self-loop (:func:`spark_jax.graph.affinity.row_normalize`).
5. **G** (the node-to-label matrix): ``MethodInputs.class_probs`` (the runner's dense CLIP class probabilities on
   CLIP's patch grid) bilinearly resampled to the h x w token grid (torch's ``interpolate(mode='bilinear',
   align_corners=False)``: :func:`spark_jax.masks.resample.bilinear_matrix`) and renormalised per token (*our
   choice*; the slides do not say how CLIP's and SD's grids are matched). Both grids are taken to cover the same
   square image (the runner's prepared image). Non-finite entries count as 0; a token left without mass gets the
   uniform distribution.
6. **Walk** (slide 4.1, :mod:`spark_jax.graph.random_walk`): the truncated walk
   ``P_L = (1 - alpha) / (1 - alpha^(L+1)) sum_{t<=L} alpha^t S^t G`` (``walk='truncated'``, the default: the slides'
   formula, whose L their Fig. 1 ablates) or its limit ``(1 - alpha) (I - alpha S)^-1 G`` (``'closed_form'``).
7. **Labels**: P [h, w, K] bilinearly upsampled to the mask size, argmax over the K classes (ties to the lowest id)
   -> class ids in [0, K). With ``MethodContext.background_threshold`` > 0, pixels whose largest upsampled
   probability is below it become class 0 (the background of V21 / PC60 / COCO-Object, as NACLIP's ``prob_thd``,
   here applied to the walk's probabilities). No post-processing (the slides' "Post.: No").

Backbone (``SPEC.diffusion_defaults`` and ``NerveConfig.attention_module``; the slides name only "Stable Diffusion
2.1"): SD 2.1 at **512 px** and **t = 100**, the setting of iSeg (NERVE's strongest no-post-processing baseline,
``linsun449/iseg.code``: SD2.1-base, 512 px, ``test_t=[100]``), and iSeg's self-attention layer
``up_blocks.3.attentions.1.transformer_blocks.0.attn1`` (64 x 64 tokens at 512 px, 5 heads of 64): all *inferred*.
``--resolution`` / ``--timestep`` override the first two, ``--nerve_attention_module`` the layer (any ``attn1``
module of the checkpoint; SDXL-family checkpoints have no ``up_blocks.3``). On the weights-free handcrafted backbone
the layer is its one pretend head ``tokens.attn1`` (queries = keys = its features).

Cost per image at SD 2.1's 64 x 64 grid (N = 4096): the entropies need each head's [N, N] logits (one head at a
time: 64 MiB), S is a dense [N, N] float32 (64 MiB), the truncated walk L products [N, N] x [N, K], the closed
form one LU of [N, N] (~46 GFLOP), on the device. Images run one at a time (``lax.map``), so the working set is one
image's whatever the batch size. The upsampled probabilities are [m, m, K] (m = the mask size).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.affinity import finite_tokens, l2_normalize, row_normalize
from spark_jax.graph.random_walk import WALKS, random_walk
from spark_jax.masks.resample import bilinear_matrix
from spark_jax.masks.upsample import labels_from_soft_labels, upsample_soft_labels
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec
from spark_jax.sharding import per_image_map

__all__ = [
    "HANDCRAFTED_ATTENTION_MODULE",
    "SD21_ATTENTION_MODULE",
    "SPEC",
    "NerveConfig",
    "NerveResult",
    "attention_module",
    "attention_taps",
    "class_probs_on_grid",
    "head_entropies",
    "head_weights",
    "nerve_batch",
    "nerve_image",
    "nerve_transition",
    "weighted_global_affinity",
    "weighted_local_affinity",
]

# iSeg's self-attention layer of SD 2.1 (64 x 64 tokens at 512 px): NERVE's layer is unpublished (*inferred*).
SD21_ATTENTION_MODULE = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
# The handcrafted demo backbone's one pretend self-attention module.
HANDCRAFTED_ATTENTION_MODULE = "tokens.attn1"
_HIGHEST = jax.lax.Precision.HIGHEST
# The 8-neighbourhood (SPARK's Eq. 2), in a fixed order.
_NEIGHBOUR_OFFSETS = tuple((dh, dw) for dh in (-1, 0, 1) for dw in (-1, 0, 1) if (dh, dw) != (0, 0))


@dataclasses.dataclass(frozen=True)
class NerveConfig:
    """NERVE's settings (module docstring). None of these values is published; each default says where it comes
    from. ``c``, ``eps_self``, ``alpha`` and ``beta`` are traced pytree leaves (a sweep over them compiles once);
    the rest is static. The backbone's resolution and timestep are the spec's ``diffusion_defaults`` (512 px,
    t = 100: iSeg's SD 2.1 setting, *inferred*), set by ``--resolution`` / ``--timestep``.

    Attributes:
      attention_module: the self-attention module whose ``:q`` / ``:k`` taps give the queries and keys, a
        diffusers path ending in ``attn1``; ``auto`` (default): iSeg's SD 2.1 layer
        ``up_blocks.3.attentions.1.transformer_blocks.0.attn1`` (*inferred*) on a diffusion backbone, the
        handcrafted backbone's ``tokens.attn1`` on that one.
      c: the head-weight sharpness of ``w_h = softmax_h(-c H_h)``. Default 1 (*our choice*: w_h proportional to
        exp(-H_h), the inverse of the head's effective number of attended keys); 0 = the mean over heads.
      eps_self: the local affinity's diagonal. Default 1e-3 (*our choice*: the symbol reads as a small positive
        constant that keeps every token's row non-empty, the value of the project's SPARK local eps; SPARK's own
        diagonal is 1, ``--nerve_eps_self=1`` gives it).
      alpha: the walk's move probability (1 - alpha: it generates a label). Default 0.9 (*our choice*: the
        project's SPARK propagation gamma, the same linear system), in [0, 1).
      walk_steps: L of the truncated walk (static). Default 10 (*our choice*: iSeg's iteration count for COCO; 8
        for VOC, 5 for Context); unused by ``walk='closed_form'``.
      beta: the fusion weight of the global affinity. Default 0.6 (*our choice*: SPARK's published beta, same
        authors), in [0, 1]; 1 = global only, 0 = local only (the slides' Table 2 rows).
      walk: ``truncated`` (default, the slides' P_L) or ``closed_form`` (its L -> infinity limit, one LU solve).
    """

    attention_module: str = dataclasses.field(default="auto", metadata={
        "help": "NERVE's self-attention module (its :q and :k taps), a diffusers path ending in attn1; auto = iSeg's "
                f"SD 2.1 layer {SD21_ATTENTION_MODULE} (inferred; NERVE's is unpublished) on a diffusion backbone, "
                f"{HANDCRAFTED_ATTENTION_MODULE} on the handcrafted one."})
    c: float = dataclasses.field(default=1.0, metadata={
        "help": "NERVE's head weights softmax_h(-c * H_h), H_h the head's mean attention-row entropy (0 = mean of "
                "the heads; unpublished, our choice)."})
    eps_self: float = dataclasses.field(default=1e-3, metadata={
        "help": "NERVE's local-affinity diagonal eps_self (unpublished, our choice; SPARK's diagonal is 1)."})
    alpha: float = dataclasses.field(default=0.9, metadata={
        "help": "NERVE's random-walk move probability alpha in [0, 1) (unpublished; the project's SPARK gamma)."})
    walk_steps: int = dataclasses.field(default=10, metadata={
        "help": "NERVE's truncated-walk length L (unpublished; iSeg's COCO iteration count)."})
    beta: float = dataclasses.field(default=0.6, metadata={
        "help": "NERVE's fusion weight of the global affinity in [0, 1] (unpublished; SPARK's beta)."})
    walk: Literal["truncated", "closed_form"] = dataclasses.field(default="truncated", metadata={
        "help": "NERVE's walk: truncated (the slides' P_L) or closed_form ((1 - alpha)(I - alpha S)^-1 G)."})

    def __post_init__(self):
        # Static fields only: the numeric ones may be tracers.
        if not isinstance(self.attention_module, str) or not self.attention_module:
            raise ValueError(f"--nerve_attention_module must be 'auto' or a module path ending in attn1, got "
                             f"{self.attention_module!r}")
        if self.walk not in WALKS:
            raise ValueError(f"--nerve_walk must be one of {WALKS}, got {self.walk!r}")
        if isinstance(self.walk_steps, bool) or not isinstance(self.walk_steps, int) or self.walk_steps < 0:
            raise ValueError(f"--nerve_walk_steps must be an int >= 0 (the truncated walk's L), got "
                             f"{self.walk_steps!r}")

    def replace(self, **changes) -> NerveConfig:
        return dataclasses.replace(self, **changes)

    def check_values(self) -> None:
        """Validates the numeric fields on the host (ValueError naming every bad flag)."""
        problems = []

        def number(name):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)
            if not ok:
                problems.append(f"--nerve_{name} must be a finite number, got {v!r}")
            return ok

        if number("c") and self.c < 0:
            problems.append(f"--nerve_c must be >= 0 (a negative c favours the least confident heads), got {self.c}")
        if number("eps_self") and self.eps_self < 0:
            problems.append(f"--nerve_eps_self must be >= 0, got {self.eps_self}")
        if number("alpha") and not 0 <= self.alpha < 1:
            problems.append(f"--nerve_alpha must lie in [0, 1) (at 1 the walk never generates a label), got "
                            f"{self.alpha}")
        if number("beta") and not 0 <= self.beta <= 1:
            problems.append(f"--nerve_beta must lie in [0, 1], got {self.beta}")
        if problems:
            raise ValueError("Invalid NerveConfig: " + "; ".join(problems))


jax.tree_util.register_dataclass(NerveConfig, data_fields=["c", "eps_self", "alpha", "beta"],
                                 meta_fields=["attention_module", "walk_steps", "walk"])


# ----------------------------------------------------------------------------------------------- the equations
def head_entropies(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """H_h: mean over queries i of the Shannon entropy (nats) of softmax_j(q_i^h . k_j^h / sqrt(d)) -> [heads].

    Args:
      queries, keys: float [heads, N, d] (unscaled ``to_q`` / ``to_k`` outputs; non-finite vectors count as 0).

    One head's [N, N] logits at a time (``lax.map``).
    """
    q = finite_tokens(queries)[0]
    k = finite_tokens(keys)[0]
    scale = q.shape[-1] ** -0.5

    def one_head(qk):
        logits = jnp.matmul(qk[0], qk[1].T, precision=_HIGHEST) * scale
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1))

    return jax.lax.map(one_head, (q, k))


def head_weights(entropies: jax.Array, c: float | jax.Array) -> jax.Array:
    """w_h = exp(-c H_h) / sum_h' exp(-c H_h') (slide 4.3) of the heads' entropies [heads] -> [heads]."""
    return jax.nn.softmax(-jnp.asarray(c, jnp.float32) * entropies.astype(jnp.float32))


def _weighted_unit_vectors(queries: jax.Array, keys: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([N, heads * d] unit queries scaled by w_h, [N, heads * d] unit keys): their dot product is
    sum_h w_h cos(q_i^h, k_j^h)."""
    q = l2_normalize(finite_tokens(queries)[0]) * weights[:, None, None]
    k = l2_normalize(finite_tokens(keys)[0])
    heads, n, d = q.shape
    return q.transpose(1, 0, 2).reshape(n, heads * d), k.transpose(1, 0, 2).reshape(n, heads * d)


def weighted_global_affinity(queries: jax.Array, keys: jax.Array, weights: jax.Array) -> jax.Array:
    """A_global = max(sum_h w_h cos(q_i^h, k_j^h), 0) (slides 4.2-4.3) of q, k [heads, N, d], w [heads] -> [N, N]."""
    q, k = _weighted_unit_vectors(queries, keys, weights)
    return jnp.maximum(jnp.matmul(q, k.T, precision=_HIGHEST), 0.0)


def weighted_local_affinity(queries: jax.Array, keys: jax.Array, weights: jax.Array, grid: tuple[int, int], *,
                            eps_self: float | jax.Array) -> jax.Array:
    """A_local (slide 4.2), heads weighted by w (slide 4.3): eps_self on the diagonal, max(sum_h w_h cos(q_i^h,
    k_j^h), 0) for the up to 8 grid neighbours j of i, 0 elsewhere -> [N, N].

    Args:
      queries, keys: [heads, N, d] on the ``grid`` (h, w), tokens row-major.
      weights: [heads], summing to 1.
      eps_self: the diagonal.
    """
    h, w = grid
    q, k = _weighted_unit_vectors(queries, keys, weights)
    q, k = q.reshape(h, w, -1), k.reshape(h, w, -1)
    n = h * w
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    index = rows * w + cols
    a = jnp.asarray(eps_self, jnp.float32) * jnp.eye(n, dtype=jnp.float32)
    for dh, dw in _NEIGHBOUR_OFFSETS:
        valid = (rows + dh >= 0) & (rows + dh < h) & (cols + dw >= 0) & (cols + dw < w)
        neighbour_keys = jnp.roll(k, shift=(-dh, -dw), axis=(0, 1))  # off-border values are masked below
        value = jnp.where(valid, jnp.maximum(jnp.sum(q * neighbour_keys, axis=-1), 0.0), 0.0)
        target = jnp.where(valid, index + dh * w + dw, index)
        a = a.at[index.ravel(), target.ravel()].add(value.ravel())  # invalid taps add 0 to the diagonal
    return a


class Transition(NamedTuple):
    """NERVE's graph of one image: S [N, N] (row-stochastic), the head weights [heads] and entropies [heads]."""

    s: jax.Array
    weights: jax.Array
    entropies: jax.Array


def nerve_transition(queries: jax.Array, keys: jax.Array, grid: tuple[int, int], cfg: NerveConfig) -> Transition:
    """S = beta RowNorm(A_global) + (1 - beta) RowNorm(A_local) (slide 4.4) with entropy-weighted heads."""
    entropies = head_entropies(queries, keys)
    weights = head_weights(entropies, cfg.c)
    s_global = row_normalize(weighted_global_affinity(queries, keys, weights))
    s_local = row_normalize(weighted_local_affinity(queries, keys, weights, grid, eps_self=cfg.eps_self))
    return Transition(cfg.beta * s_global + (1.0 - cfg.beta) * s_local, weights, entropies)


def class_probs_on_grid(class_probs: jax.Array, grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """G [h * w, K]: CLIP's class probabilities [hc, wc, K] bilinearly resampled to the token grid (h, w) (torch's
    align_corners=False) and renormalised per token; non-finite entries count as 0, a token without mass gets the
    uniform distribution. Also returns how many CLIP patches held a non-finite entry."""
    hc, wc, num_classes = class_probs.shape
    g = class_probs.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(g), axis=-1)
    g = jnp.maximum(jnp.where(jnp.isfinite(g), g, 0.0), 0.0)
    rows = jnp.asarray(bilinear_matrix(hc, grid[0]))
    cols = jnp.asarray(bilinear_matrix(wc, grid[1]))
    g = jnp.einsum("Hh,Ww,hwk->HWk", rows, cols, g, precision=_HIGHEST).reshape(-1, num_classes)
    total = jnp.sum(g, axis=-1, keepdims=True)
    g = jnp.where(total > 0, g / jnp.where(total > 0, total, 1.0), 1.0 / num_classes)
    return g, jnp.sum(~finite).astype(jnp.int32)


class NerveResult(NamedTuple):
    """NERVE's segmentation of one image (a leading batch axis when batched).

    Attributes:
      labels: int32 [m, m], class ids in [0, K) (0 also for pixels below the background threshold).
      token_probs: float32 [h, w, K], the walk's class probabilities on the token grid (rows sum to 1).
      head_weights: float32 [heads], w_h.
      head_entropies: float32 [heads], H_h (nats).
      walk_residual: float32 [], the walk's fixed-point residual (:mod:`spark_jax.graph.random_walk`).
      background_fraction: float32 [], the fraction of pixels the background threshold set to class 0.
      num_predicted_classes: int32 [], distinct class ids in ``labels``.
      num_nonfinite_tokens: int32 [], query/key vectors (over heads) holding NaN/Inf (treated as zero vectors).
      num_nonfinite_class_probs: int32 [], CLIP patches holding NaN/Inf (those entries count as 0).
    """

    labels: jax.Array
    token_probs: jax.Array
    head_weights: jax.Array
    head_entropies: jax.Array
    walk_residual: jax.Array
    background_fraction: jax.Array
    num_predicted_classes: jax.Array
    num_nonfinite_tokens: jax.Array
    num_nonfinite_class_probs: jax.Array


def nerve_image(queries: jax.Array, keys: jax.Array, class_probs: jax.Array, grid: tuple[int, int],
                cfg: NerveConfig, *, mask_size: int, background_threshold: float = 0.0) -> NerveResult:
    """The whole of NERVE on one image (module docstring, steps 1-7).

    Args:
      queries, keys: float [heads, N, d], one self-attention module's ``:q`` / ``:k`` taps, N = h * w.
      class_probs: float [hc, wc, K], CLIP's per-patch class probabilities.
      grid: (h, w), the attention's token grid.
      cfg: NERVE's settings.
      mask_size: side of the label map (static).
      background_threshold: pixels whose largest probability is below it become class 0; 0: off (static).
    """
    h, w = grid
    if queries.ndim != 3 or keys.shape != queries.shape or queries.shape[1] != h * w:
        raise ValueError(f"NERVE needs queries and keys [heads, {h * w}, d] of the {h} x {w} tokens, got "
                         f"{queries.shape} and {keys.shape}")
    if class_probs.ndim != 3 or class_probs.shape[-1] < 1:
        raise ValueError(f"NERVE needs class probabilities [hc, wc, K], got shape {class_probs.shape}")
    num_nonfinite = finite_tokens(queries)[1] + finite_tokens(keys)[1]
    graph = nerve_transition(queries, keys, grid, cfg)
    g, num_bad_g = class_probs_on_grid(class_probs, grid)
    walk = random_walk(graph.s, g, alpha=cfg.alpha, walk=cfg.walk, steps=cfg.walk_steps)
    token_probs = walk.probs.reshape(h, w, -1)
    up = upsample_soft_labels(token_probs, (mask_size, mask_size))
    labels = labels_from_soft_labels(up)
    if background_threshold > 0:
        below = jnp.max(up, axis=-1) < background_threshold
        labels = jnp.where(below, 0, labels)
        background = jnp.mean(below.astype(jnp.float32))
    else:
        background = jnp.float32(0.0)
    present = jnp.zeros((token_probs.shape[-1],), bool).at[labels.reshape(-1)].set(True)
    return NerveResult(labels, token_probs, graph.weights, graph.entropies, walk.residual, background,
                       jnp.sum(present).astype(jnp.int32), num_nonfinite, num_bad_g)


def nerve_batch(queries: jax.Array, keys: jax.Array, class_probs: jax.Array, cfg: NerveConfig, *, mask_size: int,
                background_threshold: float = 0.0) -> NerveResult:
    """:func:`nerve_image` over a batch, one image at a time (``lax.map``: one image's working set).

    Args:
      queries, keys: [B, heads, N, d] on a square token grid (the prepared images are square).
      class_probs: [B, hc, wc, K].
    """
    if queries.ndim != 4 or class_probs.ndim != 4 or class_probs.shape[0] != queries.shape[0]:
        raise ValueError(f"NERVE takes queries and keys [B, heads, N, d] and class probabilities [B, hc, wc, K] of "
                         f"the same batch, got {queries.shape} and {class_probs.shape}")
    n = queries.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"NERVE: the attention has {n} tokens, not a square grid")
    return per_image_map(  # per device under a mesh (spark_jax.sharding)
        lambda x: nerve_image(*x, (side, side), cfg, mask_size=mask_size, background_threshold=background_threshold),
        (queries, keys, class_probs))


# ----------------------------------------------------------------------------------------------- the method spec
def attention_module(cfg: NerveConfig, feature_tap: str) -> str:
    """The module whose queries and keys NERVE reads: ``cfg.attention_module``, ``auto`` resolved for a backbone
    whose feature tap is ``feature_tap`` (the handcrafted one's: its pretend head; otherwise iSeg's SD 2.1 layer)."""
    module = cfg.attention_module
    if module == "auto":
        handcrafted = feature_tap.rpartition(":")[0] == HANDCRAFTED_ATTENTION_MODULE
        return HANDCRAFTED_ATTENTION_MODULE if handcrafted else SD21_ATTENTION_MODULE
    if ":" in module or not module.endswith("attn1"):
        raise ValueError(f"--nerve_attention_module={module!r}: NERVE needs a self-attention module path (no "
                         f"':quantity'), ending in attn1, e.g. {SD21_ATTENTION_MODULE!r}")
    return module


def attention_taps(cfg: NerveConfig, feature_tap: str) -> tuple[str, str]:
    """(queries tap, keys tap) of the module :func:`attention_module` names."""
    module = attention_module(cfg, feature_tap)
    return f"{module}:q", f"{module}:k"


def _spec_resolve(cfg: NerveConfig | None, kind: str) -> NerveConfig:
    cfg = NerveConfig() if cfg is None else cfg
    if cfg.attention_module != "auto":
        return cfg
    module = HANDCRAFTED_ATTENTION_MODULE if kind == "handcrafted" else SD21_ATTENTION_MODULE
    return cfg.replace(attention_module=module)


def _spec_taps(cfg: NerveConfig, backbone) -> tuple[str, ...]:
    taps = attention_taps(cfg, backbone.feature_tap)
    names = backbone.tap_names() if hasattr(backbone, "tap_names") else ()
    missing = [t for t in taps if t not in names]
    if missing:
        modules = [n[: -len(":q")] for n in names if n.endswith("attn1:q")]
        shown = ", ".join(modules[:6]) + (", ..." if len(modules) > 6 else "")
        raise ValueError(f"--method=nerve reads {taps[0]!r} and {taps[1]!r}, which {type(backbone).__name__} does "
                         f"not provide; its self-attention modules: {shown or 'none'}. Pass one as "
                         "--nerve_attention_module (NERVE's backbone is SD 2.1, whose default layer is "
                         f"{SD21_ATTENTION_MODULE}).")
    return (backbone.feature_tap, *taps)


def _spec_build(ctx: MethodContext):
    def method(inputs: MethodInputs, cfg: NerveConfig):
        if inputs.class_probs is None:
            raise ValueError("--method=nerve is an open-vocabulary method: it needs MethodInputs.class_probs (CLIP's "
                             "per-patch class probabilities [B, hc, wc, K]), which the runner computes under "
                             "--protocol=open_vocab with a CLIP checkpoint (--clip_checkpoint); got None")
        q_tap, k_tap = attention_taps(cfg, ctx.feature_tap)
        missing = [t for t in (q_tap, k_tap) if t not in inputs.taps]
        if missing:
            raise ValueError(f"NERVE: the taps {missing} are not among the method's inputs ({sorted(inputs.taps)}); "
                             "the runner extracts SPEC.taps(config, backbone)")
        res = nerve_batch(inputs.taps[q_tap], inputs.taps[k_tap], inputs.class_probs, cfg, mask_size=ctx.mask_size,
                          background_threshold=ctx.background_threshold)
        w = res.head_weights
        diag = {
            "head_weight_entropy": -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1),
            "max_head_weight": jnp.max(w, axis=-1),
            "attention_entropy": jnp.sum(w * res.head_entropies, axis=-1),
            "walk_steps": jnp.full(w.shape[:1], cfg.walk_steps if cfg.walk == "truncated" else -1, jnp.int32),
            "walk_residual": res.walk_residual,
            "background_fraction": res.background_fraction,
            "num_predicted_classes": res.num_predicted_classes,
            "num_nonfinite_tokens": res.num_nonfinite_tokens,
            "num_nonfinite_class_probs": res.num_nonfinite_class_probs,
        }
        return res.labels, diag

    return method


def _spec_params(cfg: NerveConfig, ctx: MethodContext, grid: tuple[int, int]) -> NerveConfig:
    del ctx, grid  # the attention's grid is read off its taps when the program is traced
    cfg.check_values()
    return cfg


SPEC = MethodSpec(
    name="nerve",
    title="NERVE",
    config_type=NerveConfig,
    flag_prefix="nerve_",
    build=_spec_build,
    params=_spec_params,
    # head_weight_entropy: entropy (nats) of the head weights w (log heads = uniform); attention_entropy: the
    # weighted mean of the heads' H_h; walk_steps: L, or -1 for the closed form (the unbounded walk).
    diagnostics=("head_weight_entropy", "max_head_weight", "attention_entropy", "walk_steps", "walk_residual",
                 "background_fraction", "num_predicted_classes", "num_nonfinite_tokens", "num_nonfinite_class_probs"),
    taps=_spec_taps,
    upsampling="soft_labels",
    upsamplings=("soft_labels",),
    resolve=_spec_resolve,
    check=NerveConfig.check_values,
    row_title=lambda cfg: "NERVE" if cfg.walk == "truncated" else "NERVE (closed form)",
    source="spark_jax/methods/nerve.py",
    diffusion_defaults={"resolution": 512, "timestep": 100},
    open_vocab=True,
)
