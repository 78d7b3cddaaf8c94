"""The transition matrix S (Eq. 1-4) against the NumPy transcription of the paper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig
from spark_jax import affinity
from spark_jax import numpy_reference as ref


def _features(h=5, w=7, c=6, seed=0):
    return np.random.default_rng(seed).standard_normal((h, w, c)).astype(np.float32)


@pytest.mark.parametrize("mode", ["cosine", "inner"])
@pytest.mark.parametrize("negatives", ["clip", "minmax"])
@pytest.mark.parametrize("sharpen", [1.0, 3.0])
def test_global_affinity_matches_eq1(mode, negatives, sharpen):
    x = _features().reshape(35, 6)
    got = jax.jit(affinity.global_affinity, static_argnames=("mode", "negatives"))(
        x, mode=mode, negatives=negatives, sharpen=sharpen
    )
    want = ref.global_affinity(x, mode, negatives, sharpen)
    chex.assert_shape(got, (35, 35))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.min(got)) >= 0.0


def test_global_affinity_clips_negative_similarities():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], np.float32)
    a = affinity.global_affinity(x)
    np.testing.assert_allclose(a, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], atol=1e-7)


def test_minmax_of_a_constant_matrix_is_all_ones():
    a = affinity.global_affinity(np.ones((4, 3), np.float32), negatives="minmax")
    np.testing.assert_array_equal(a, np.ones((4, 4)))


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (6, 1), (1, 1), (2, 2)])
def test_local_affinity_matches_eq3(shape):
    x = _features(*shape)
    got = jax.jit(affinity.local_affinity)(x, eps=1e-3)
    want = ref.local_affinity(x, 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_local_affinity_structure():
    h, w = 4, 5
    a = np.asarray(affinity.local_affinity(np.ones((h, w, 3), np.float32), eps=0.5))
    np.testing.assert_array_equal(np.diag(a), np.ones(h * w))
    np.testing.assert_array_equal(a, a.T)
    off = a - np.diag(np.diag(a))
    # Constant features: cosine 1 + eps on every grid neighbour, nothing beyond.
    assert set(np.unique(off)) == {0.0, 1.5}
    degree = (off > 0).sum(axis=1).reshape(h, w)
    assert degree[0, 0] == 3 and degree[0, 2] == 5 and degree[1, 1] == 8
    # Token (0, 0) links to (0, 1), (1, 0), (1, 1) only; no wrap-around to the far border.
    assert np.flatnonzero(off[0]).tolist() == [1, 5, 6]


def test_local_affinity_clips_anticorrelated_neighbours():
    x = np.array([[[1.0, 0.0], [-1.0, 0.0]]], np.float32)  # 1x2 grid, cosine -1
    a = affinity.local_affinity(x, eps=1e-3)
    np.testing.assert_allclose(a, np.eye(2))


def test_row_normalize_never_divides_by_zero():
    a = jnp.array([[0.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    s = affinity.row_normalize(a)
    np.testing.assert_allclose(s, [[0, 0.5, 0.5], [0, 1, 0], [0.25, 0, 0.75]])
    np.testing.assert_allclose(s, ref.row_norm(np.asarray(a)))


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("use_local", [True, False])
def test_transition_matrix_matches_eq4_and_is_stochastic(beta, use_local):
    x = _features()
    cfg = SparkConfig(beta=beta, use_local=use_local, sharpen=2.0)
    s = jax.jit(affinity.transition_matrix)(x, cfg)
    want = ref.transition_matrix(x, beta=beta, eps=cfg.local_eps, sharpen=2.0, use_local=use_local)
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(s, axis=1), np.ones(35), rtol=1e-5)
    assert float(jnp.min(s)) >= 0.0


def test_zero_features_give_a_stochastic_matrix():
    s = affinity.transition_matrix(np.zeros((3, 4, 5), np.float32), SparkConfig())
    assert bool(jnp.all(jnp.isfinite(s)))
    np.testing.assert_allclose(jnp.sum(s, axis=1), np.ones(12), rtol=1e-6)
