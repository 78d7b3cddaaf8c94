"""Random-walk label propagation (Eq. 10-12)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.graph import affinity
from spark_jax.testing import numpy_reference as ref
from spark_jax.graph import propagation


def _problem(n=20, k=4, seed=0):
    rng = np.random.default_rng(seed)
    s = np.asarray(affinity.row_normalize(jnp.asarray(rng.random((n, n)) ** 3, jnp.float32)))
    labels = np.concatenate([np.arange(k), rng.integers(0, k, n - k)]).astype(np.int32)
    return s, labels


def test_seed_matrix_is_the_one_hot_of_the_clusters():
    q0 = propagation.seed_matrix(jnp.array([0, 2, 1, 2]), 4)
    np.testing.assert_array_equal(q0, np.eye(4)[[0, 2, 1, 2]])


def test_seed_matrix_keeps_the_largest_clusters_when_columns_are_bounded():
    labels = jnp.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 3])  # sizes 1, 3, 2, 4
    q0 = jax.jit(propagation.seed_matrix, static_argnums=1)(labels, 2)
    # Clusters 1 and 3 (the two largest) keep columns 0 and 1 in id order; 0 and 2 start empty.
    want = np.zeros((10, 2))
    want[[1, 2, 3], 0] = 1
    want[[6, 7, 8, 9], 1] = 1
    np.testing.assert_array_equal(q0, want)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_closed_form_and_fixed_point_reach_the_same_q(gamma):
    s, labels = _problem()
    q0 = propagation.seed_matrix(jnp.asarray(labels), 4)
    closed = jax.jit(propagation.propagate_labels, static_argnames="method")(s, q0, gamma=gamma, method="closed_form")
    iterative = jax.jit(propagation.propagate_labels, static_argnames=("method", "max_iter"))(
        s, q0, gamma=gamma, method="iterative", tol=1e-7, max_iter=5000
    )
    assert bool(iterative.converged) and int(iterative.num_iters) > 1
    np.testing.assert_allclose(closed.soft_labels, iterative.soft_labels, atol=1e-5)
    # Eq. 11 holds for the closed form.
    residual = (np.eye(20) - gamma * s) @ np.asarray(closed.soft_labels) - (1 - gamma) * np.asarray(q0)
    assert np.abs(residual).max() < 1e-5
    np.testing.assert_array_equal(closed.labels, jnp.argmax(closed.soft_labels, axis=1))


@pytest.mark.parametrize("method", ["closed_form", "iterative"])
def test_matches_the_numpy_transcription(method):
    s, labels = _problem(seed=1)
    got = propagation.propagate_labels(s, propagation.seed_matrix(jnp.asarray(labels), 4), method=method)
    want_q, want_labels, _ = ref.propagate(s.astype(np.float64), labels, 4, method=method)
    np.testing.assert_allclose(got.soft_labels, want_q, atol=1e-5)
    # The argmax is compared where it is well-posed: every row's top two entries of the float64
    # Q* differ by far more than the 1e-5 the float32 Q* may be off by.
    top2 = np.sort(want_q, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-3
    np.testing.assert_array_equal(got.labels, want_labels)
    chex.assert_type(got.labels, jnp.int32)


def test_rows_of_q_stay_distributions():
    s, labels = _problem(seed=2)
    q = propagation.propagate_labels(s, propagation.seed_matrix(jnp.asarray(labels), 4)).soft_labels
    np.testing.assert_allclose(jnp.sum(q, axis=1), np.ones(20), rtol=1e-5)
    assert float(jnp.min(q)) >= -1e-6


def test_iterative_cap_reports_unconverged():
    s, labels = _problem()
    out = propagation.propagate_labels(
        s, propagation.seed_matrix(jnp.asarray(labels), 4), gamma=0.99, method="iterative", max_iter=3
    )
    assert int(out.num_iters) == 3 and not bool(out.converged)
