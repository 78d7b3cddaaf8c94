"""Random-walk Normalized Cut on self-attention ("Unsupervised Segmentation by Diffusing, Walking and Cutting",
Ivanova et al. 2024): the self-attention probabilities of one layer read as a random walk's transition matrix,
cut recursively in two with the shared NCut machinery of :mod:`spark_jax.graph.ncut`.

Only the paper's abstract is public (no method section, no code; ``/work/shared/notes/method-facts.md`` section 2),
so this is a documented reading of it. Every choice is a field of :class:`RWNCutConfig`:

* **Transition matrix** P [N, N]: ``attention_tap``'s probabilities (rows sum to 1), by default the backbone's
  feature-point attn1 (SPARK's and DiffCut's layer), mean over heads (``<module>:probs_mean``). The abstract says
  "self-attention layers" and names neither the model's layers nor the heads.
* **Adjacency** W (``adjacency``):

  - ``random_walk`` (default, the abstract's first method): W = (Pi P + (Pi P)^T) / 2, Pi = diag(pi), pi the
    stationary distribution (pi P = pi). This is Meila and Shi's random-walk view: W's degrees are exactly pi
    (P's rows and, at stationarity, pi P's entries sum to pi), cut_W(A, B) is the stationary flow A -> B (which
    equals the flow B -> A), so NCut_W(A, B) = P(A -> B | A) + P(B -> A | B) for the walk P itself, reversible or
    not: "minimizing transition probabilities between clusters".
  - ``power_walk``: the same with P^k (``walk_steps`` = k, static; binary powering, float32 HIGHEST matmuls), the
    k-step walk ("matrix exponentiation, which captures k-step transitions"); P^k has the same pi.
  - ``attention_similarity``: cosine similarity of the attention rows (each token's attention distribution as its
    embedding), clipped at 0 (a no-op for probabilities, kept for any signed input): "a graph representation based
    on self-attention feature similarity".

  W keeps its diagonal (self-loops add to the volume, not to any cut), as DiffCut's affinity does.
* **Stationary distribution** (``stationary``): ``power`` (default) iterates pi <- pi P from the uniform
  distribution ``stationary_iterations`` times (static; error ~ |mu_2|^t, mu_2 P's second eigenvalue modulus;
  matrix-vector products only, the cheapest on accelerators); ``solve`` solves (I - P^T) pi = 0 with sum(pi) = 1
  by one LU (exact for an irreducible P, N^3 / 3). Both are clipped at 0 and renormalised; the residual
  ||pi P - pi||_1 is reported (``stationary_residual``). A softmax attention has every entry positive, so P is
  irreducible and aperiodic and pi is unique.
* **Cut**: :func:`spark_jax.graph.ncut.grow_cut_tree`, DiffCut's recursion (induced subgraph per segment, the
  Fiedler vector of D^-1/2 (D - W) D^-1/2, ``num_thresholds`` candidate thresholds in ``threshold_scale`` x
  [min y, max y], the best exact NCut), every token of a segment in its cut (DiffCut's zero-affinity-row quirk
  off: it belongs to its min-max affinity), the released code's segment numbering.
* **Stopping** (``stopping``):

  - ``constant``: cut while the best NCut < ``tau`` (DiffCut's rule; DiffCut's value 0.5 as the default).
  - ``dynamic`` (default; the abstract's "automatically determine the NCut cost criterion"; its rule is not
    public, this one is ours): the threshold is read off the image's own cut hierarchy. (1) Grow the hierarchy
    with the null threshold 1: under the degree-preserving structureless graph (W_ij = d_i d_j / vol, the walk
    that jumps to j with probability pi_j) *every* bipartition has NCut exactly 1, so a cut at or above 1 is no
    better than no structure; breadth first (coarse cuts first), bounded by ``dynamic_max_segments`` leaves.
    (2) Split the NCut values of its accepted cuts, with the null's 1 as a member of the upper class, in two by
    Otsu's rule (the split maximising the between-class variance): cuts along real boundaries leave the walk
    rarely, cuts through homogeneous regions spread over [~0.5, 1); the anchor gives the rule a no-structure
    class even when every cut is real. (3) The threshold tau* is the midpoint of the two classes' boundary values;
    the segmentation is the hierarchy pruned at tau* (:func:`spark_jax.graph.ncut.prune_cut_tree`: exactly the
    recursion rerun with tau*, without new eigendecompositions). With a single accepted cut it is kept.
    ``dynamic_scale='linear'`` (default) splits the values themselves (NCut = P(A -> B | A) + P(B -> A | B) is a
    sum of two probabilities; its own scale); ``'log'`` splits their logs (exact-zero cuts count as 1e-30): it is
    scale-free but lets the one very clean root cut of an image (NCut ~0.02 on the demo) form the lower class
    alone, and under-segments (measured: demo mIoU without PAMR 32.4 at 3.3 segments vs 52.9 at 7.1 for
    'linear'). Failure mode: an image with no structure still gets its lowest cuts accepted whenever they form a
    class of their own (on planted single-block attention, none did); ``dynamic_max_segments`` is a compute
    bound, not a threshold, but it sets the sample the threshold is read from.

The result's token labels go to the mask size by DiffCut's concept assignment on the attention module's own
output tokens (``<module>:output``; the feature tap for the default layer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.affinity import global_affinity
from spark_jax.graph.ncut import (
    Eigensolver,
    NCutConfig,
    SegmentCodes,
    cut_tree_result,
    grow_cut_tree,
    prune_cut_tree,
)
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec, concept_masks
from spark_jax.sharding import per_image_map

__all__ = [
    "RWNCutConfig",
    "RWNCutResult",
    "SPEC",
    "attention_taps",
    "dynamic_threshold",
    "random_walk_adjacency",
    "rw_adjacency",
    "rw_ncut",
    "rw_ncut_batch",
    "stationary_distribution",
    "walk_power",
]

Adjacency = Literal["random_walk", "power_walk", "attention_similarity"]
Stopping = Literal["constant", "dynamic"]
Stationary = Literal["power", "solve"]
DynamicScale = Literal["linear", "log"]

# The NCut value of every bipartition of the degree-preserving structureless graph: the dynamic rule's null.
NULL_NCUT = 1.0
# Floor of the NCut values before their log in the dynamic rule (exact-zero cuts of disconnected parts).
_NCUT_FLOOR = 1e-30
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RWNCutConfig:
    """Random-walk NCut on self-attention (module docstring). `tau` and `threshold_scale` are pytree leaves
    (traced: changing them does not recompile); the rest is static.

    Attributes:
      attention_tap: the transition matrix's tap, a self-attention ``<...attn1>:probs_mean`` (or ``:probs``,
        averaged over heads here); None (default): the backbone's feature-point attn1, ``feature_tap`` with
        ``:output`` -> ``:probs_mean``.
      adjacency: 'random_walk' (default), 'power_walk' or 'attention_similarity'.
      walk_steps: k of 'power_walk' (P^k). Default 2, the first multi-hop walk; the abstract gives no value.
      stationary: how pi is computed: 'power' (default) or 'solve'.
      stationary_iterations: iterations of 'power'. Default 100: a softmax attention mixes fast (residual
        reported per image as ``stationary_residual``).
      stopping: 'dynamic' (default, the abstract's hyperparameter-free setting) or 'constant' (NCut < tau).
      tau: the 'constant' threshold. Default 0.5, DiffCut's value (not recalibrated for attention graphs).
      dynamic_max_segments: leaves of the hierarchy the 'dynamic' rule reads its threshold from (breadth first).
        Default 64, above the class counts of the benchmarks (<= 59 for Context, 27 for COCO-Stuff); the demo
        gave 52.9 / 46.7 / 45.5 mIoU (no PAMR) at 64 / 32 / 16, for 80 / 36 / 17 eigensolves.
      dynamic_scale: 'linear' (default) or 'log': the scale on which the 'dynamic' rule splits the NCut values.
      threshold_scale, num_thresholds, eigensolver, lobpcg_iterations, segment_codes: as `NCutConfig` (DiffCut's
        released values 0.99, 100, 'eigh', 200, 'exact').
      max_segments: bound on the final segments of 'constant' (None: the token count, DiffCut's unbounded
        recursion); 'dynamic' is bounded by ``dynamic_max_segments``.
    """

    attention_tap: str | None = None
    adjacency: Adjacency = "random_walk"
    walk_steps: int = 2
    stationary: Stationary = "power"
    stationary_iterations: int = 100
    stopping: Stopping = "dynamic"
    tau: float = 0.5
    dynamic_max_segments: int = 64
    dynamic_scale: DynamicScale = "linear"
    threshold_scale: float = 0.99
    num_thresholds: int = 100
    max_segments: int | None = None
    eigensolver: Eigensolver = "eigh"
    lobpcg_iterations: int = 200
    segment_codes: SegmentCodes = "exact"

    def __post_init__(self):
        # Static fields only: tau and threshold_scale may be tracers.
        choices = {"adjacency": ("random_walk", "power_walk", "attention_similarity"),
                   "stationary": ("power", "solve"), "stopping": ("constant", "dynamic"),
                   "dynamic_scale": ("linear", "log")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"RWNCutConfig.{name} (--rwncut_{name}) must be one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        for name in ("walk_steps", "stationary_iterations", "dynamic_max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RWNCutConfig.{name} (--rwncut_{name}) must be an int >= 1, got {value!r}")
        if self.attention_tap is not None and not isinstance(self.attention_tap, str):
            raise TypeError(f"RWNCutConfig.attention_tap must be a tap name or None, got {self.attention_tap!r}")
        self.ncut_config()  # NCutConfig checks the shared static fields

    def replace(self, **changes) -> RWNCutConfig:
        return dataclasses.replace(self, **changes)

    def ncut_config(self) -> NCutConfig:
        """The shared cutting machinery's settings (DiffCut's zero-affinity-row quirk off)."""
        return NCutConfig(
            tau=self.tau, threshold_scale=self.threshold_scale, num_thresholds=self.num_thresholds,
            max_segments=self.dynamic_max_segments if self.stopping == "dynamic" else self.max_segments,
            eigensolver=self.eigensolver, lobpcg_iterations=self.lobpcg_iterations,
            exclude_zero_affinity_nodes=False, segment_codes=self.segment_codes)

    def check_values(self) -> None:
        """Validates the numeric fields on the host (ValueError naming the flag)."""
        problems = []
        if not self.tau > 0:
            problems.append(f"--rwncut_tau must be > 0 (DiffCut uses 0.5), got {self.tau}")
        if not 0 < self.threshold_scale <= 1:
            problems.append(f"--rwncut_threshold_scale must lie in (0, 1], got {self.threshold_scale}")
        if problems:
            raise ValueError("Invalid RWNCutConfig: " + "; ".join(problems))


jax.tree_util.register_dataclass(
    RWNCutConfig,
    data_fields=["tau", "threshold_scale"],
    meta_fields=["attention_tap", "adjacency", "walk_steps", "stationary", "stationary_iterations", "stopping",
                 "dynamic_max_segments", "dynamic_scale", "num_thresholds", "max_segments", "eigensolver",
                 "lobpcg_iterations",
                 "segment_codes"],
)


class RWNCutResult(NamedTuple):
    """Random-walk NCut's token segmentation (a leading batch axis when batched).

    Attributes:
      labels: int32 [N], segments 0..L-1 numbered as DiffCut's released code numbers them.
      num_segments, num_labels, num_eigensolves, truncated: as `NCutResult` (for 'dynamic': eigensolves of the
        whole hierarchy grown, truncated when a final segment was never visited).
      threshold: float32 [], the NCut threshold applied (tau, or the dynamic rule's tau*).
      stationary_residual: float32 [], ||pi P - pi||_1 of the stationary distribution used (0 when the adjacency
        does not use one).
      num_nonfinite_tokens: int32 [], attention rows holding NaN/Inf (replaced by uniform rows).
    """

    labels: jax.Array
    num_segments: jax.Array
    num_labels: jax.Array
    num_eigensolves: jax.Array
    truncated: jax.Array
    threshold: jax.Array
    stationary_residual: jax.Array
    num_nonfinite_tokens: jax.Array


def stationary_distribution(p: jax.Array, method: Stationary = "power", iterations: int = 100
                            ) -> tuple[jax.Array, jax.Array]:
    """Stationary distribution pi [N] of a row-stochastic P [N, N] (pi P = pi, sum 1) and ||pi P - pi||_1.

    'power': pi <- pi P from the uniform distribution, `iterations` times (static), renormalised each step.
    'solve': (I - P^T) pi = 0 with its last equation replaced by sum(pi) = 1, one LU.
    """
    n = p.shape[0]
    p = p.astype(jnp.float32)
    if method == "power":
        def step(_, pi):
            pi = jnp.matmul(pi, p, precision=_HIGHEST)
            return pi / jnp.sum(pi)

        pi = jax.lax.fori_loop(0, iterations, step, jnp.full((n,), 1.0 / n, jnp.float32))
    elif method == "solve":
        a = (jnp.eye(n, dtype=jnp.float32) - p.T).at[-1].set(1.0)
        pi = jnp.linalg.solve(a, jnp.zeros((n,), jnp.float32).at[-1].set(1.0))
    else:
        raise ValueError(f"stationary must be 'power' or 'solve', got {method!r}")
    pi = jnp.maximum(pi, 0.0)
    pi = pi / jnp.sum(pi)
    residual = jnp.sum(jnp.abs(jnp.matmul(pi, p, precision=_HIGHEST) - pi))
    return pi, residual


def walk_power(p: jax.Array, k: int) -> jax.Array:
    """P^k [N, N] for a static k >= 1 by binary powering (ceil(log2 k) squarings), float32 HIGHEST matmuls."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"walk_steps must be an int >= 1, got {k!r}")
    p = p.astype(jnp.float32)
    result, base = None, p
    while True:
        if k & 1:
            result = base if result is None else jnp.matmul(result, base, precision=_HIGHEST)
        k >>= 1
        if not k:
            return result
        base = jnp.matmul(base, base, precision=_HIGHEST)


def random_walk_adjacency(p: jax.Array, pi: jax.Array) -> jax.Array:
    """Meila-Shi's symmetrised flow W = (Pi P + (Pi P)^T) / 2 [N, N] (degrees pi, NCut = P(A->B|A) + P(B->A|B))."""
    flow = pi[:, None] * p
    return 0.5 * (flow + flow.T)


def rw_adjacency(p: jax.Array, cfg: RWNCutConfig) -> tuple[jax.Array, jax.Array]:
    """The adjacency `cfg.adjacency` builds from the transition matrix P [N, N]: (W [N, N], stationary residual)."""
    if cfg.adjacency == "attention_similarity":
        return global_affinity(p, mode="cosine", negatives="clip"), jnp.float32(0.0)
    pi, residual = stationary_distribution(p, cfg.stationary, cfg.stationary_iterations)
    walk = walk_power(p, cfg.walk_steps) if cfg.adjacency == "power_walk" else p.astype(jnp.float32)
    return random_walk_adjacency(walk, pi), residual


def dynamic_threshold(ncut: jax.Array, accepted: jax.Array, scale: DynamicScale = "linear") -> jax.Array:
    """The dynamic rule's threshold tau* from the NCut values [S] of a hierarchy's accepted cuts (`accepted` [S]).

    Otsu's two-class split of {f(v) : accepted v} u {f(1)} (the null's value in the upper class), f the identity
    ('linear') or log max(v, 1e-30) ('log'); tau* = f^-1 of the midpoint of the boundary values; 1 when nothing
    was accepted (no cut is then made).
    """
    num_slots = ncut.shape[0]
    x = jnp.where(accepted, ncut, NULL_NCUT)
    if scale == "log":
        x = jnp.log(jnp.maximum(x, _NCUT_FLOOR))
    elif scale != "linear":
        raise ValueError(f"dynamic_scale must be 'linear' or 'log', got {scale!r}")
    x = jnp.sort(jnp.where(accepted, x, jnp.inf))  # at most S - 1 of the S slots are cuts
    m = jnp.sum(accepted).astype(jnp.int32)
    anchor = jnp.log(NULL_NCUT) if scale == "log" else NULL_NCUT
    x = jnp.where(jnp.arange(num_slots) == m, anchor, x)  # the anchor after the m values
    valid = jnp.arange(num_slots) <= m
    xv = jnp.where(valid, x, 0.0)
    total, count = jnp.sum(xv), (m + 1).astype(jnp.float32)
    low_sum = jnp.cumsum(xv)  # lower class = the first i + 1 values, i = 0..m-1
    n0 = jnp.arange(1, num_slots + 1, dtype=jnp.float32)
    n1 = count - n0
    mean0 = low_sum / n0
    mean1 = (total - low_sum) / jnp.maximum(n1, 1.0)
    between = n0 * n1 * (mean0 - mean1) ** 2
    between = jnp.where(jnp.arange(num_slots) < m, between, -jnp.inf)
    i = jnp.argmax(between)  # first maximum
    upper = x[jnp.minimum(i + 1, num_slots - 1)]
    middle = 0.5 * (x[i] + upper)
    return jnp.where(m > 0, jnp.exp(middle) if scale == "log" else middle, NULL_NCUT)


def _finite_rows(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """P with rows holding NaN/Inf replaced by uniform rows (a token without information jumps anywhere), and
    their count."""
    p = p.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(p), axis=-1, keepdims=True)
    return jnp.where(finite, p, 1.0 / p.shape[-1]), jnp.sum(~finite).astype(jnp.int32)


@jax.jit
def rw_ncut(p: jax.Array, cfg: RWNCutConfig) -> RWNCutResult:
    """Random-walk NCut of one transition matrix P [N, N] (rows sum to 1) -> RWNCutResult with labels [N]."""
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"rw_ncut takes a square transition matrix [N, N], got shape {p.shape}; use "
                         "rw_ncut_batch for [B, N, N]")
    p, num_nonfinite = _finite_rows(p)
    w, residual = rw_adjacency(p, cfg)
    ncfg = cfg.ncut_config()
    if cfg.stopping == "constant":
        tree = grow_cut_tree(w, ncfg, cfg.tau)
        res, threshold = cut_tree_result(tree, ncfg), jnp.asarray(cfg.tau, jnp.float32)
    else:
        tree = grow_cut_tree(w, ncfg, NULL_NCUT)
        threshold = dynamic_threshold(tree.ncut, tree.pos_child >= 0, cfg.dynamic_scale)
        grown_leaves = jnp.sum(tree.pos_child >= 0) + 1
        grown_truncated = (tree.num_visited < tree.num_nodes) & (grown_leaves < p.shape[0])
        pruned, unvisited_leaf = prune_cut_tree(tree, threshold)
        res = cut_tree_result(pruned, ncfg, truncated=grown_truncated & unvisited_leaf)
        res = res._replace(num_eigensolves=tree.num_visited)
    return RWNCutResult(
        labels=res.labels, num_segments=res.num_segments, num_labels=res.num_labels,
        num_eigensolves=res.num_eigensolves, truncated=res.truncated, threshold=threshold,
        stationary_residual=residual, num_nonfinite_tokens=num_nonfinite)


@jax.jit
def rw_ncut_batch(p: jax.Array, cfg: RWNCutConfig) -> RWNCutResult:
    """`rw_ncut` over a batch [B, N, N], image by image (`per_image_map`: see `recursive_ncut_batch`)."""
    if p.ndim != 3:
        raise ValueError(f"rw_ncut_batch takes transition matrices [B, N, N], got shape {p.shape}")
    return per_image_map(lambda x: rw_ncut(x, cfg), p)


# ----------------------------------------------------------------------------------------------- the method spec
def attention_taps(cfg: RWNCutConfig, feature_tap: str) -> tuple[str, str]:
    """(the transition matrix's tap, its module's output tap) for a backbone whose feature tap is `feature_tap`."""
    tap = cfg.attention_tap or feature_tap.rsplit(":", 1)[0] + ":probs_mean"
    module, sep, quantity = tap.rpartition(":")
    if not sep or quantity not in ("probs_mean", "probs") or not module.endswith("attn1"):
        raise ValueError(f"--rwncut_attention_tap={tap!r}: random-walk NCut needs a self-attention probability "
                         "tap, '<...attn1>:probs_mean' (or ':probs', averaged over heads), e.g. "
                         f"{feature_tap.rsplit(':', 1)[0] + ':probs_mean'!r}")
    return tap, f"{module}:output"


def _spec_taps(cfg: RWNCutConfig, backbone) -> tuple[str, ...]:
    tap, output = attention_taps(cfg, backbone.feature_tap)
    names = backbone.tap_names()
    if tap not in names:
        close = [n for n in names if n.endswith(":probs_mean")][:4]
        raise ValueError(f"--rwncut_attention_tap={tap!r} is not a tap of this backbone; its self-attention "
                         f"probability taps include {close}")
    return tuple(dict.fromkeys((backbone.feature_tap, tap, output)))


def _spec_build(ctx: MethodContext):
    def method(inputs: MethodInputs, cfg: RWNCutConfig):
        tap, output = attention_taps(cfg, ctx.feature_tap)
        p = inputs.taps[tap]
        if p.ndim == 4:  # ':probs' [B, heads, N, N]
            p = jnp.mean(p.astype(jnp.float32), axis=1)
        b, n, _ = p.shape
        if output == ctx.feature_tap:
            features = inputs.features
        else:  # the module's own tokens [B, N, C], on its (square: prepared images are square) grid
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"rwncut: the tap {tap!r} has {n} tokens, not a square grid")
            features = inputs.taps[output].reshape(b, side, side, -1)
        res = rw_ncut_batch(p, cfg)
        _, h, w, _ = features.shape
        ncfg = cfg.ncut_config()
        bound = n if ncfg.max_segments is None else min(ncfg.max_segments, n)  # labels lie in [0, bound)
        labels = concept_masks(features, res.labels.reshape(b, h, w), bound, ctx.mask_size)
        diag = {
            "num_segments": res.num_segments,
            "num_labels": res.num_labels,
            "num_eigensolves": res.num_eigensolves,
            "truncated": res.truncated,
            "threshold": res.threshold,
            "stationary_residual": res.stationary_residual,
            "num_nonfinite_tokens": res.num_nonfinite_tokens,
        }
        return labels, diag

    return method


def _spec_params(cfg: RWNCutConfig, ctx: MethodContext, grid: tuple[int, int]) -> RWNCutConfig:
    del ctx
    cfg.check_values()
    if cfg.eigensolver == "lobpcg" and int(np.prod(grid)) <= 20:
        raise ValueError(f"--rwncut_eigensolver=lobpcg needs more than 20 tokens, the grid is {grid}; use eigh")
    return cfg


SPEC = MethodSpec(
    name="rwncut",
    title="Random-walk NCut (attention)",
    config_type=RWNCutConfig,
    flag_prefix="rwncut_",
    build=_spec_build,
    params=_spec_params,
    diagnostics=("num_segments", "num_labels", "num_eigensolves", "truncated", "threshold", "stationary_residual",
                 "num_nonfinite_tokens"),
    taps=_spec_taps,
    check=RWNCutConfig.check_values,
    row_title=lambda cfg: f"Random-walk NCut ({cfg.adjacency}, {cfg.stopping})",
    source="spark_jax/methods/rwncut.py",
)
