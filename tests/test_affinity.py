"""The transition matrix S (Eq. 1-4) against the NumPy transcription of the paper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig
from spark_jax.graph import affinity
from spark_jax.testing import numpy_reference as ref


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


# ------------------------------------------------------------------ automatic sharpening (entropy)
def _np_mean_row_entropy(a, p):
    """Float64 transcription: mean entropy of the rows of RowNorm(a**p) that have mass."""
    q = a.astype(np.float64) ** p
    total = q.sum(axis=1)
    q = q[total > 0] / total[total > 0, None]
    logq = np.log(np.where(q > 0, q, 1.0))
    return float(np.mean(-(q * logq).sum(axis=1)))


def _np_entropy_sharpness(a, fraction):
    """The exponent by scipy's brentq on log2 p, over the same bracket as the JAX bisection."""
    from scipy.optimize import brentq

    target = np.log(fraction * a.shape[0])
    lo, hi = affinity.SHARPEN_LOG2_RANGE
    return 2.0 ** brentq(lambda lp: _np_mean_row_entropy(a, 2.0**lp) - target, lo, hi, xtol=1e-10)


def _planted_affinity(seed, noise=0.5, side=8):
    from spark_jax.testing.synthetic import planted_token_features

    x, _ = planted_token_features(seed, side, side, 16, noise=noise)
    return np.asarray(affinity.global_affinity(x.reshape(side * side, 16)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.3])
def test_entropy_sharpness_matches_brentq_and_hits_the_target(seed, fraction):
    a = _planted_affinity(seed)
    p = float(jax.jit(affinity.entropy_sharpness)(a, fraction))
    want = _np_entropy_sharpness(a, fraction)
    np.testing.assert_allclose(p, want, rtol=1e-3)
    # The calibrated rows have the target geometric-mean number of effective neighbours.
    effective = np.exp(_np_mean_row_entropy(a, p))
    np.testing.assert_allclose(effective / a.shape[0], fraction, rtol=1e-3)
    np.testing.assert_allclose(float(affinity.mean_row_entropy(a, p)), _np_mean_row_entropy(a, p), rtol=1e-5)


def test_entropy_sharpness_is_monotone_in_the_target():
    a = _planted_affinity(0)
    ps = [float(affinity.entropy_sharpness(a, f)) for f in (0.02, 0.05, 0.1, 0.2)]
    assert ps == sorted(ps, reverse=True), ps  # fewer neighbours wanted -> sharper rows


def test_unreachable_targets_give_the_bracket_ends():
    a = _planted_affinity(0)
    lo, hi = affinity.SHARPEN_LOG2_RANGE
    # Below one neighbour per token: as sharp as the bracket allows. A whole row: as flat.
    np.testing.assert_allclose(float(affinity.entropy_sharpness(a, 0.5 / a.shape[0])), 2.0**hi, rtol=1e-4)
    np.testing.assert_allclose(float(affinity.entropy_sharpness(np.ones((6, 6), np.float32), 1.0)), 2.0**lo,
                               rtol=1e-4)


def test_mean_row_entropy_leaves_out_rows_without_mass():
    a = np.zeros((4, 4), np.float32)
    a[:2, :2] = 1.0  # two tokens, each spread evenly over both; two zero tokens
    np.testing.assert_allclose(float(affinity.mean_row_entropy(a, 3.0)), np.log(2.0), rtol=1e-6)
    assert float(affinity.mean_row_entropy(np.zeros((3, 3), np.float32), 2.0)) == 0.0


def test_entropy_mode_is_the_fixed_power_it_calibrates():
    x = _features(6, 6, 8)
    cfg = SparkConfig(sharpen_mode="entropy", sharpen_target=0.1, beta=0.7)
    a, p = jax.jit(affinity.sharpened_global_affinity)(x.reshape(36, 8), cfg)
    s = jax.jit(affinity.transition_matrix)(x, cfg)
    want = ref.transition_matrix(x, beta=0.7, eps=cfg.local_eps, sharpen=float(p))
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(s, axis=1), np.ones(36), rtol=1e-5)
    np.testing.assert_allclose(np.exp(_np_mean_row_entropy(np.asarray(a), 1.0)) / 36, 0.1, rtol=1e-3)


def test_entropy_mode_keeps_large_powers_finite():
    # Cosines far below 1 raised to p ~ 2^8 underflow in float32 unless rows are scaled first.
    x = _features(4, 4, 3, seed=3)
    cfg = SparkConfig(sharpen_mode="entropy", sharpen_target=1e-3, use_local=False)
    s = affinity.transition_matrix(x, cfg)
    assert bool(jnp.all(jnp.isfinite(s)))
    np.testing.assert_allclose(jnp.sum(s, axis=1), np.ones(16), rtol=1e-5)


def test_entropy_target_is_traced_and_vmaps():
    x = jnp.asarray(_features(5, 5, 6))
    fn = jax.jit(chex.assert_max_traces(lambda x, cfg: affinity.sharpened_global_affinity(x, cfg)[1], n=1))
    chex.clear_trace_counter()
    p1 = fn(x.reshape(25, 6), SparkConfig(sharpen_mode="entropy", sharpen_target=0.1))
    p2 = fn(x.reshape(25, 6), SparkConfig(sharpen_mode="entropy", sharpen_target=0.2))
    assert float(p1) > float(p2)
    targets = jnp.array([0.1, 0.2])
    grid = SparkConfig(sharpen_mode="entropy", sharpen_target=targets)
    axes = jax.tree_util.tree_map(lambda _: None, grid.replace(sharpen_target=0.1)).replace(sharpen_target=0)
    ps = jax.vmap(lambda c: affinity.sharpened_global_affinity(x.reshape(25, 6), c)[1], in_axes=(axes,))(grid)
    np.testing.assert_allclose(ps, [p1, p2], rtol=1e-5)
    images = jnp.stack([x, x[::-1]]).reshape(2, 25, 6)
    per_image = jax.vmap(lambda f: affinity.entropy_sharpness(affinity.global_affinity(f), 0.1))(images)
    np.testing.assert_allclose(per_image, [p1, p1], rtol=1e-5)  # a permutation of tokens: same rows


def test_fixed_mode_ignores_the_target():
    x = _features()
    base = affinity.transition_matrix(x, SparkConfig(sharpen=3.0))
    other = affinity.transition_matrix(x, SparkConfig(sharpen=3.0, sharpen_target=0.7))
    np.testing.assert_array_equal(base, other)


def test_sharpening_options_are_validated():
    with pytest.raises(ValueError, match="sharpen_mode"):
        SparkConfig(sharpen_mode="auto")
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="sharpen_target"):
            SparkConfig(sharpen_target=bad).check_values()
