"""Specification of K-means (spark_jax.methods.kmeans) against scikit-learn and a NumPy transcription.

spark_jax runs in float32, the references in float64: discrete outputs (seed indices, labels,
iteration counts) are compared only on fixtures whose every decision has a margin above 1e-4
(relative) — no draw near a bin edge of the k-means++ potential, no point nearly equidistant to
two centers at any Lloyd iteration, no center shift near the tolerance — which each test asserts.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.methods.kmeans import (
    KMeansConfig,
    kmeans,
    kmeans_plusplus,
    kmeans_plusplus_from_draws,
    kmeans_tokens,
    kmeans_tokens_batch,
    lloyd,
)
from spark_jax.testing.synthetic import planted_token_features

sklearn_cluster = pytest.importorskip("sklearn.cluster")


def reference_kmeans_plusplus(x: np.ndarray, first_draw: float, trial_draws: np.ndarray):
    """sklearn's greedy k-means++ (`_kmeans_plusplus`), with its random draws given, in float64.

    Returns (center indices, margin): the margin is the smallest relative distance of a draw to
    a bin edge of the cumulative potential, or between the best and the next candidate's
    potential; float32 rounding (~1e-7) cannot change a decision with a margin above ~1e-5.
    """
    x = x.astype(np.float64)
    n = len(x)
    indices = [min(int(first_draw * n), n - 1)]
    margin = abs(first_draw * n - round(first_draw * n))
    closest = ((x - x[indices[0]]) ** 2).sum(axis=1)
    for draws in trial_draws:
        edges = np.cumsum(closest)
        targets = draws * closest.sum()
        candidates = np.minimum(np.searchsorted(edges, targets), n - 1)
        margin = min(margin, np.abs(edges[None, :] - targets[:, None]).min() / edges[-1])
        to_candidates = ((x[None, :, :] - x[candidates][:, None, :]) ** 2).sum(axis=2)
        candidate_closest = np.minimum(closest[None, :], to_candidates)
        potentials = candidate_closest.sum(axis=1)
        best = np.argmin(potentials)
        others = potentials[candidates != candidates[best]]
        if len(others):
            margin = min(margin, (others.min() - potentials[best]) / potentials[best])
        closest = candidate_closest[best]
        indices.append(int(candidates[best]))
    return np.array(indices), margin


def lloyd_margin(x: np.ndarray, init: np.ndarray, n_iter: int, tol: float = 1e-4) -> float:
    """Conditioning of Lloyd's iterations from `init` (float64, sklearn's update and stopping
    rules): the smallest relative gap between a point's nearest and second-nearest center over
    all iterations, and the relative distance of every center shift to the tolerance."""
    x = x.astype(np.float64)
    centers = init.astype(np.float64)
    abs_tol = tol * np.mean(np.var(x, axis=0))
    margin = np.inf
    for _ in range(n_iter + 1):
        d2 = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
        two = np.sort(d2, axis=1)[:, :2]
        margin = min(margin, ((two[:, 1] - two[:, 0]) / np.maximum(two[:, 1], 1e-12)).min())
        labels = d2.argmin(axis=1)
        new = np.stack([x[labels == j].mean(axis=0) if (labels == j).any() else centers[j]
                        for j in range(len(centers))])
        shift = ((new - centers) ** 2).sum()
        if shift > 0:
            margin = min(margin, abs(shift - abs_tol) / abs_tol)
        centers = new
    return margin


def _blobs(seed: int, n: int = 120, c: int = 8, k: int = 4, spread: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((k, c))
    return (means[rng.integers(0, k, n)] + spread * rng.standard_normal((n, c))).astype(np.float32)


def _planted(seed: int, noise: float) -> np.ndarray:
    x = planted_token_features(seed, 16, 16, 32, noise)[0].reshape(-1, 32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# Draws chosen so that no decision of the seeding is within 1e-4 of a tie (asserted below).
@pytest.mark.parametrize("seed,draw_seed", [(0, 100), (1, 102), (2, 103)])
def test_seeding_matches_greedy_kmeans_plusplus_transcription(seed, draw_seed):
    x = _blobs(seed)
    rng = np.random.default_rng(draw_seed)
    first, trials = rng.random(), rng.random((5, 3))
    _, indices = jax.jit(kmeans_plusplus_from_draws)(
        jnp.asarray(x), jnp.float32(first), jnp.asarray(trials, jnp.float32)
    )
    want, margin = reference_kmeans_plusplus(x, first, trials)
    assert margin > 1e-4, "fixture: a seeding decision is a near tie"
    np.testing.assert_array_equal(np.asarray(indices), want)


@pytest.mark.parametrize(
    "data,k",
    [("blobs0", 4), ("blobs1", 6), ("planted0.3", 5), ("planted0.8", 5), ("planted0.8", 3)],
)
def test_lloyd_matches_sklearn_from_the_same_init(data, k):
    x = _blobs(int(data[-1])) if data.startswith("blobs") else _planted(0, float(data[7:]))
    cfg = KMeansConfig(max_clusters=8)
    init, _ = kmeans_plusplus(
        jnp.asarray(x), jax.random.key(3), num_centers=8, num_local_trials=cfg.local_trials()
    )
    ours = jax.jit(lloyd, static_argnames="max_iter")(jnp.asarray(x), init, k, max_iter=300)
    ref = sklearn_cluster.KMeans(
        n_clusters=k, init=np.asarray(init[:k], np.float64), n_init=1, max_iter=300, tol=1e-4,
        algorithm="lloyd",
    ).fit(x.astype(np.float64))
    assert lloyd_margin(x, np.asarray(init[:k]), ref.n_iter_) > 1e-4, "fixture: a near tie"
    np.testing.assert_array_equal(np.asarray(ours.labels), ref.labels_)
    np.testing.assert_allclose(np.asarray(ours.centers[:k]), ref.cluster_centers_, atol=1e-5)
    np.testing.assert_allclose(float(ours.inertia), ref.inertia_, rtol=1e-4)
    assert int(ours.num_iters) == ref.n_iter_
    assert bool(ours.converged)


def test_planted_regions_recovered_with_k_from_ground_truth():
    features, layout = planted_token_features(0, 16, 16, 32, 0.3)
    k = len(np.unique(layout))
    cfg = KMeansConfig(max_clusters=8)
    result = kmeans_tokens(jnp.asarray(features), k, jax.random.key(0), cfg)
    chex.assert_shape(result.labels, (16, 16))
    chex.assert_type(result.labels, jnp.int32)
    pairs = set(zip(np.asarray(result.labels).ravel().tolist(), layout.ravel().tolist()))
    assert len(pairs) == k


def test_traced_k_masks_unused_centers_without_recompiling():
    features = jnp.asarray(planted_token_features(1, 16, 16, 32, 0.8)[0])
    cfg = KMeansConfig(max_clusters=8)
    key = jax.random.key(1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(k):
        return kmeans_tokens(features, k, key, cfg)

    x = features.reshape(-1, 32)
    x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    init, _ = kmeans_plusplus(x, key, num_centers=8, num_local_trials=cfg.local_trials())
    for k in (2, 5, 8):
        result = run(jnp.int32(k))
        assert int(jnp.max(result.labels)) < k
        # Same as Lloyd from the first k seeds alone: the masked rows play no part.
        alone = jax.jit(lloyd)(x, init[:k], k)
        np.testing.assert_array_equal(np.asarray(result.labels).ravel(), np.asarray(alone.labels))


def test_fixed_key_is_deterministic_and_one_cluster_is_the_mean():
    x = jnp.asarray(_blobs(0))
    cfg = KMeansConfig(max_clusters=8)
    a = jax.jit(kmeans)(x, 4, jax.random.key(0), cfg)
    b = jax.jit(kmeans)(x, 4, jax.random.key(0), cfg)
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    one = jax.jit(kmeans)(x, 1, jax.random.key(0), cfg)
    np.testing.assert_allclose(
        float(one.inertia), float(jnp.sum((x - x.mean(0, keepdims=True)) ** 2)), rtol=1e-4
    )
    assert float(a.inertia) < float(one.inertia)


def test_batch_with_per_image_k():
    batch = np.stack([planted_token_features(s, 8, 8, 16, 0.5)[0] for s in range(3)])
    ks = jnp.array([2, 3, 5], jnp.int32)
    cfg = KMeansConfig(max_clusters=6)
    result = kmeans_tokens_batch(jnp.asarray(batch), ks, jax.random.key(0), cfg)
    chex.assert_shape(result.labels, (3, 8, 8))
    chex.assert_shape(result.centers, (3, 6, 16))
    keys = jax.random.split(jax.random.key(0), 3)
    for i in range(3):
        single = kmeans_tokens(jnp.asarray(batch[i]), ks[i], keys[i], cfg)
        np.testing.assert_array_equal(np.asarray(result.labels[i]), np.asarray(single.labels))
        assert int(jnp.max(single.labels)) < int(ks[i])


def test_iteration_cap_is_reported():
    x = jnp.asarray(_planted(0, 1.5))
    result = jax.jit(kmeans)(x, 8, jax.random.key(0), KMeansConfig(max_clusters=8, max_iter=1))
    assert int(result.num_iters) == 1
    assert not bool(result.converged)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[h, w, C\]"):
        kmeans_tokens(jnp.zeros((16, 8)), 3, jax.random.key(0), KMeansConfig())
    with pytest.raises(ValueError, match="max_clusters"):
        kmeans_tokens(jnp.zeros((4, 4, 8)), 3, jax.random.key(0), KMeansConfig(max_clusters=32))
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(jnp.zeros((40, 8)), 9, jax.random.key(0), KMeansConfig(max_clusters=8))
    with pytest.raises(ValueError, match="num_local_trials"):
        KMeansConfig(num_local_trials=0)
