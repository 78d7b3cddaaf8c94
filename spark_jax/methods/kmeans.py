"""K-means on token features (DiffCut, Appendix F, Table 9), jittable with a traced K.

DiffCut's Table 9 clusters each image's features with K-means, K fixed across a dataset or
K* = the number of ground-truth classes of each image. To run both without recompiling, the
centers live in a static array of `max_clusters` rows and the number of clusters K <= that
bound is a traced integer: rows K.. are masked out of every assignment.

The algorithm is scikit-learn's `KMeans(init="k-means++", n_init=1, algorithm="lloyd")`:
* Greedy k-means++ seeding: the first center is a uniformly drawn token; each next one is the
  best (least total squared distance) of `num_local_trials` candidates drawn with probability
  proportional to the squared distance to the nearest chosen center. sklearn's default number
  of trials is 2 + floor(ln K); here it is taken from the static bound (see `KMeansConfig`), so
  the first K centers do not depend on K: seeding with K = 3 gives the first three centers of
  seeding with K = 6, with the same key.
* Lloyd iterations until the assignment stops changing, or the summed squared center shift
  falls to tol times the mean per-channel variance of the data, or `max_iter`; labels are then
  the assignment to the final centers.
* One difference: sklearn moves the center of a cluster that empties to a far point; here it
  keeps its previous position (so a cluster may stay empty and the segmentation has fewer
  than K segments). It does not happen from k-means++ seeding on distinct tokens in practice.

DiffCut does not say whether its K-means features were L2-normalised; `KMeansConfig.normalize`
(default True, the cosine geometry every other method of the shared pipeline uses) chooses.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.affinity import finite_tokens, l2_normalize
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec, concept_masks

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
    """Hyperparameters of K-means. `tol` is a pytree leaf; the rest is static.

    Attributes:
      max_clusters: static bound on K (rows of the centers array).
      max_iter: cap of Lloyd iterations. sklearn: 300.
      tol: relative tolerance on the summed squared center shift (scaled by the mean
        per-channel variance of the data, as sklearn). sklearn: 1e-4.
      num_local_trials: candidates per greedy k-means++ step; None = 2 + floor(ln max_clusters)
        (sklearn's rule, evaluated at the bound so that seeding does not depend on K).
      normalize: L2-normalise token features before clustering (`kmeans_tokens` only).
    """

    max_clusters: int = 32
    max_iter: int = 300
    tol: float = 1e-4
    num_local_trials: int | None = None
    normalize: bool = True

    def __post_init__(self):
        for name in ("max_clusters", "max_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_local_trials is not None and (
            not isinstance(self.num_local_trials, int) or self.num_local_trials < 1
        ):
            raise ValueError(
                f"num_local_trials must be None or an int >= 1, got {self.num_local_trials!r}"
            )

    def replace(self, **changes) -> KMeansConfig:
        return dataclasses.replace(self, **changes)

    def local_trials(self) -> int:
        if self.num_local_trials is not None:
            return self.num_local_trials
        return 2 + int(math.log(self.max_clusters))


jax.tree_util.register_dataclass(
    KMeansConfig,
    data_fields=["tol"],
    meta_fields=["max_clusters", "max_iter", "num_local_trials", "normalize"],
)


class KMeansResult(NamedTuple):
    """K-means output (add a leading batch axis when batched).

    Attributes:
      labels: int32 [N] (or [h, w] from `kmeans_tokens`), the index of each point's center,
        in [0, K).
      centers: float32 [max_clusters, C]; rows K.. are unused.
      inertia: float32 [], the sum of squared distances of points to their centers.
      num_iters: int32 [], Lloyd iterations run.
      converged: bool [], stopped by the assignment or tolerance test, not by `max_iter`.
    """

    labels: jax.Array
    centers: jax.Array
    inertia: jax.Array
    num_iters: jax.Array
    converged: jax.Array


def _squared_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
    """||x_i - c_j||^2 [N, K] for points x [N, C] and centers [K, C], clipped at 0."""
    cross = jnp.matmul(x, centers.T, precision=_HIGHEST)
    d2 = jnp.sum(x * x, axis=1)[:, None] - 2.0 * cross + jnp.sum(centers * centers, axis=1)[None, :]
    return jnp.maximum(d2, 0.0)


def kmeans_plusplus_from_draws(
    x: jax.Array, first_draw: jax.Array, trial_draws: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Greedy k-means++ seeding driven by given uniform draws (the deterministic core).

    Args:
      x: points [N, C].
      first_draw: uniform in [0, 1) []; picks the first center uniformly among the N points.
      trial_draws: uniforms in [0, 1) [K - 1, T]; step k draws T candidates with probability
        proportional to the squared distance to the nearest center chosen so far.

    Returns:
      (centers [K, C], their point indices int32 [K]).
    """
    n = x.shape[0]
    first = jnp.minimum(jnp.floor(first_draw * n).astype(jnp.int32), n - 1)
    closest = _squared_distances(x, x[first][None, :])[:, 0]

    def step(closest, draws):  # draws [T]
        potential = jnp.sum(closest)
        cumulative = jnp.cumsum(closest)
        candidates = jnp.searchsorted(cumulative, draws * potential, side="left")
        candidates = jnp.minimum(candidates, n - 1)
        to_candidates = _squared_distances(x, x[candidates])  # [N, T]
        candidate_closest = jnp.minimum(closest[:, None], to_candidates)
        best = jnp.argmin(jnp.sum(candidate_closest, axis=0))
        return candidate_closest[:, best], candidates[best].astype(jnp.int32)

    _, rest = jax.lax.scan(step, closest, trial_draws)
    indices = jnp.concatenate([first[None], rest])
    return x[indices], indices


def kmeans_plusplus(
    x: jax.Array, key: jax.Array, *, num_centers: int, num_local_trials: int
) -> tuple[jax.Array, jax.Array]:
    """Greedy k-means++ seeding of `num_centers` centers from points x [N, C] with a PRNG key.

    Returns:
      (centers [num_centers, C], their point indices int32 [num_centers]).
    """
    key_first, key_trials = jax.random.split(key)
    first_draw = jax.random.uniform(key_first, ())
    trial_draws = jax.random.uniform(key_trials, (num_centers - 1, num_local_trials))
    return kmeans_plusplus_from_draws(x, first_draw, trial_draws)


class _LloydState(NamedTuple):
    centers: jax.Array
    labels: jax.Array
    iteration: jax.Array
    done: jax.Array


def lloyd(
    x: jax.Array,
    centers: jax.Array,
    num_clusters: jax.Array | int,
    *,
    max_iter: int = 300,
    tol: float | jax.Array = 1e-4,
) -> KMeansResult:
    """Lloyd's K-means iterations from given centers (sklearn's `algorithm="lloyd"`).

    Args:
      x: points [N, C].
      centers: initial centers [Kmax, C]; only the first `num_clusters` rows are used.
      num_clusters: K <= Kmax (may be traced).
      max_iter: iteration cap.
      tol: relative tolerance; the absolute one is tol * mean(var(x, axis=0)).
    """
    x = x.astype(jnp.float32)
    centers = centers.astype(jnp.float32)
    width = centers.shape[0]
    valid = jnp.arange(width) < num_clusters
    abs_tol = tol * jnp.mean(jnp.var(x, axis=0))

    def assign(centers):
        d2 = jnp.where(valid[None, :], _squared_distances(x, centers), jnp.inf)
        return jnp.argmin(d2, axis=1).astype(jnp.int32)

    def update(centers, labels):
        one_hot = (labels[:, None] == jnp.arange(width)[None, :]).astype(x.dtype)  # [N, Kmax]
        counts = jnp.sum(one_hot, axis=0)
        sums = jnp.matmul(one_hot.T, x, precision=_HIGHEST)
        # An emptied cluster keeps its center (sklearn relocates it instead; see module doc).
        return jnp.where((counts > 0)[:, None], sums / jnp.maximum(counts, 1.0)[:, None], centers)

    def cond(state: _LloydState):
        return (state.iteration < max_iter) & ~state.done

    def body(state: _LloydState) -> _LloydState:
        labels = assign(state.centers)
        new_centers = update(state.centers, labels)
        unchanged = jnp.all(labels == state.labels)
        shift = jnp.sum(jnp.where(valid[:, None], (new_centers - state.centers) ** 2, 0.0))
        return _LloydState(
            centers=new_centers,
            labels=labels,
            iteration=state.iteration + 1,
            done=unchanged | (shift <= abs_tol),
        )

    init = _LloydState(
        centers=centers,
        labels=jnp.full((x.shape[0],), -1, jnp.int32),
        iteration=jnp.int32(0),
        done=jnp.bool_(False),
    )
    final = jax.lax.while_loop(cond, body, init)
    # Labels of the final centers (they differ from the last assignment only when the loop
    # stopped on the tolerance or the cap).
    labels = assign(final.centers)
    d2 = _squared_distances(x, final.centers)
    inertia = jnp.sum(jnp.take_along_axis(d2, labels[:, None], axis=1))
    return KMeansResult(
        labels=labels,
        centers=final.centers,
        inertia=inertia,
        num_iters=final.iteration,
        converged=final.done,
    )


def kmeans(
    x: jax.Array, num_clusters: jax.Array | int, key: jax.Array, cfg: KMeansConfig
) -> KMeansResult:
    """K-means with greedy k-means++ seeding on points x [N, C] (sklearn's KMeans, n_init=1).

    Args:
      x: points [N, C].
      num_clusters: K, 1 <= K <= cfg.max_clusters (a Python int or a traced int32 scalar).
      key: PRNG key of the seeding.
      cfg: see `KMeansConfig`.
    """
    x = x.astype(jnp.float32)
    if cfg.max_clusters > x.shape[0]:
        raise ValueError(
            f"max_clusters={cfg.max_clusters} exceeds the number of points {x.shape[0]}; "
            "lower KMeansConfig.max_clusters"
        )
    if isinstance(num_clusters, int) and not 1 <= num_clusters <= cfg.max_clusters:
        raise ValueError(
            f"num_clusters must lie in [1, max_clusters={cfg.max_clusters}], got {num_clusters}"
        )
    num_clusters = jnp.clip(jnp.asarray(num_clusters, jnp.int32), 1, cfg.max_clusters)
    centers, _ = kmeans_plusplus(
        x, key, num_centers=cfg.max_clusters, num_local_trials=cfg.local_trials()
    )
    return lloyd(x, centers, num_clusters, max_iter=cfg.max_iter, tol=cfg.tol)


@jax.jit
def kmeans_tokens(
    features: jax.Array, num_clusters: jax.Array | int, key: jax.Array, cfg: KMeansConfig
) -> KMeansResult:
    """K-means segmentation of token features [h, w, C] into K clusters; labels [h, w].

    Args:
      features: token features [h, w, C].
      num_clusters: K (fixed, or K* from the ground truth; traced, no recompilation).
      key: PRNG key of the seeding.
      cfg: see `KMeansConfig`.
    """
    if features.ndim != 3:
        raise ValueError(
            f"kmeans_tokens takes token features of shape [h, w, C], got shape {features.shape}; "
            "use kmeans_tokens_batch for [B, h, w, C]"
        )
    h, w, c = features.shape
    # Non-finite tokens become zero vectors (as in the other methods; see spark.check_features).
    x, _ = finite_tokens(features.reshape(h * w, c))
    if cfg.normalize:
        x = l2_normalize(x)
    result = kmeans(x, num_clusters, key, cfg)
    return result._replace(labels=result.labels.reshape(h, w))


@jax.jit
def kmeans_tokens_batch(
    features: jax.Array, num_clusters: jax.Array, key: jax.Array, cfg: KMeansConfig
) -> KMeansResult:
    """`kmeans_tokens` over a batch: features [B, h, w, C], num_clusters int32 [B] (or a scalar
    shared by all images), one key split per image."""
    if features.ndim != 4:
        raise ValueError(
            f"kmeans_tokens_batch takes features [B, h, w, C], got shape {features.shape}"
        )
    b = features.shape[0]
    num_clusters = jnp.broadcast_to(jnp.asarray(num_clusters, jnp.int32), (b,))
    keys = jax.random.split(key, b)
    return jax.vmap(kmeans_tokens, in_axes=(0, 0, 0, None))(features, num_clusters, keys, cfg)


# ----------------------------------------------------------------------------------------------- the method spec
# K-means as a method of the runner (``--method=kmeans``; flags ``--kmeans_k``, ``--kmeans_unlabelled_k``,
# ``--kmeans_seed`` and ``--kmeans_<KMeansConfig field>``): K-means on the (L2-normalised) token features, K fixed
# or K* from the ground truth (DiffCut App. F, Table 9), then DiffCut's concept assignment.

def _parse_k(text: str, flag: str) -> int | str:
    """``--kmeans_k``: 'gt' or a positive int."""
    if text.strip().lower() == "gt":
        return "gt"
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} must be an int >= 1 or 'gt', got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class KMeansMethodConfig:
    """The K-means method's settings.

    Attributes:
        k: the number of clusters: an int fixed across the dataset (DiffCut Table 9 uses 3 on VOC, 6 elsewhere),
            or ``'gt'`` for K* = the number of classes present in the image's label map as the protocol scores
            it (an oracle, DiffCut Table 9's K*). K above ``kmeans.max_clusters`` is clipped (reported in the
            ``k_clipped`` diagnostic).
        unlabelled_k: K for images without a label map (or with no scored pixel) when ``k='gt'``; such images
            are only drawn, never scored.
        seed: seed of the k-means++ initialisation; image ``i`` of the dataset uses ``fold_in(key(seed), i)``, so
            results do not depend on batching or on resuming.
        kmeans: the clustering's settings; ``max_clusters`` bounds K and is lowered to the token count when the
            grid is smaller.
    """

    k: int | str = dataclasses.field(default="gt", metadata={
        "parse": _parse_k,
        "help": "K-means cluster count: an int fixed across the dataset (DiffCut Table 9: 3 on VOC, 6 elsewhere) "
                "or 'gt' for K* = the classes present in each image's ground truth."})
    unlabelled_k: int = dataclasses.field(default=6, metadata={
        "help": "K-means K for unlabelled images when --kmeans_k=gt (they are drawn, not scored)."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of the K-means (k-means++) initialisation."})
    kmeans: KMeansConfig = KMeansConfig()

    def __post_init__(self):
        if not (self.k == "gt" or (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1)):
            raise ValueError(f"kmeans_k must be an int >= 1 or 'gt' (K* from the ground truth), got {self.k!r}")
        if isinstance(self.k, int) and self.k > self.kmeans.max_clusters:
            raise ValueError(f"kmeans_k={self.k} exceeds kmeans.max_clusters={self.kmeans.max_clusters}; raise "
                             "--kmeans_max_clusters.")
        if not isinstance(self.unlabelled_k, int) or self.unlabelled_k < 1:
            raise ValueError(f"kmeans_unlabelled_k must be an int >= 1, got {self.unlabelled_k!r}")
        if not isinstance(self.kmeans, KMeansConfig):
            raise TypeError(f"kmeans must be a KMeansConfig, got {type(self.kmeans).__name__}")


class KMeansParams(NamedTuple):
    """The K-means method's hyperparameters (a pytree: K, the fallback K and the seed are traced).

    Attributes:
        kmeans: KMeansConfig, ``max_clusters`` lowered to the token count if larger.
        k: int32 [], the fixed K, or 0 for K* from the ground truth.
        unlabelled_k: int32 [], K of images without ground truth when ``k == 0``.
        seed: int32 [], seed of the k-means++ initialisation.
    """

    kmeans: KMeansConfig
    k: jax.Array
    unlabelled_k: jax.Array
    seed: jax.Array


def _spec_build(ctx: MethodContext):
    def method(inputs: MethodInputs, p: KMeansParams):
        bound = p.kmeans.max_clusters
        wanted = jnp.where(p.k > 0, p.k, jnp.where(inputs.num_classes > 0, inputs.num_classes, p.unlabelled_k))
        num = jnp.clip(wanted, 1, bound).astype(jnp.int32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(p.seed), i))(inputs.index)
        res = jax.vmap(kmeans_tokens, in_axes=(0, 0, 0, None))(inputs.features, num, keys, p.kmeans)
        labels = concept_masks(inputs.features, res.labels, bound, ctx.mask_size)
        present = jax.vmap(lambda lab: jnp.bincount(lab.ravel(), length=bound) > 0)(res.labels)
        nonfinite = jnp.sum(~jnp.all(jnp.isfinite(inputs.features), axis=-1), axis=(1, 2)).astype(jnp.int32)
        diag = {
            "num_clusters": num,
            "num_segments": jnp.sum(present, axis=1).astype(jnp.int32),
            "k_clipped": wanted > bound,
            "num_iters": res.num_iters,
            "converged": res.converged,
            "inertia": res.inertia,
            "num_nonfinite_tokens": nonfinite,
        }
        return labels, diag

    return method


def _spec_params(cfg: KMeansMethodConfig, ctx: MethodContext, grid: tuple[int, int]) -> KMeansParams:
    del ctx
    tokens = grid[0] * grid[1]
    if isinstance(cfg.k, int) and cfg.k > tokens:
        raise ValueError(f"kmeans_k={cfg.k} exceeds the {grid[0]}x{grid[1]}={tokens} tokens of the feature grid")
    k = 0 if cfg.k == "gt" else cfg.k
    return KMeansParams(cfg.kmeans.replace(max_clusters=min(cfg.kmeans.max_clusters, tokens)), np.int32(k),
                        np.int32(cfg.unlabelled_k), np.int32(cfg.seed))


SPEC = MethodSpec(
    name="kmeans",
    title="K-means",
    config_type=KMeansMethodConfig,
    flag_prefix="kmeans_",
    build=_spec_build,
    params=_spec_params,
    diagnostics=("num_clusters", "num_segments", "k_clipped", "num_iters", "converged", "inertia",
                 "num_nonfinite_tokens"),
    row_title=lambda cfg: "K-means (K*)" if cfg.k == "gt" else f"K-means (K={cfg.k})",
    source="spark_jax/methods/kmeans.py",
)
