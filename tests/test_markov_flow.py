"""Markov-flow clustering (Eq. 5-9): the update rule, convergence, cluster extraction, and
agreement with an independent MCL implementation (the `markov_clustering` package)."""

import chex
import jax
import jax.numpy as jnp
import markov_clustering
import numpy as np
import pytest

from spark_jax.graph import affinity
from spark_jax.graph import markov_flow as mf
from spark_jax.testing import numpy_reference as ref
from spark_jax.testing.synthetic import planted_token_features


def _stochastic(n=12, seed=0):
    a = np.random.default_rng(seed).random((n, n)) ** 4
    return (a / a.sum(1, keepdims=True)).astype(np.float32)


def _argmax_margin(flow):
    """The smallest gap between a row's largest and second-largest entry: how far the argmax
    (the cluster, Eq. 9) is from a tie. Discrete outputs are compared across precisions only where
    the float64 oracle's margin is large, so that float32 rounding cannot flip them."""
    top = np.sort(np.asarray(flow, np.float64), axis=1)[:, -2:]
    return float((top[:, 1] - top[:, 0]).min())


def test_expand_is_the_matrix_power():
    p = _stochastic()
    for power in (1, 2, 3):
        np.testing.assert_allclose(mf.expand(p, power), np.linalg.matrix_power(p.astype(np.float64), power), rtol=1e-5, atol=1e-7)


def test_prune_keeps_each_rows_maximum():
    p = np.array([[0.5, 0.3, 0.2], [1e-9, 2e-9, 5e-10], [0.0, 0.0, 0.0]], np.float32)
    pruned = mf.prune(jnp.asarray(p), 1e-7)
    want = np.array([[0.5, 0.3, 0.2], [0.0, 2e-9, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(pruned, want)


@pytest.mark.parametrize("expansion", [1, 2, 3])
@pytest.mark.parametrize("inflation", [1.5, 2.6])
@pytest.mark.parametrize("tau", [0.0, 1e-7, 1e-2])
def test_one_step_matches_eq8(expansion, inflation, tau):
    p = _stochastic()
    got = jax.jit(mf.markov_flow_step, static_argnames="expansion")(
        p, expansion=expansion, inflation=inflation, prune_threshold=tau
    )
    np.testing.assert_allclose(got, ref.mcl_step(p, expansion, inflation, tau), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["inf", "max_abs"])
def test_iteration_matches_the_numpy_transcription(norm):
    p0 = _stochastic(seed=3)
    got = jax.jit(mf.markov_flow, static_argnames="norm")(p0, norm=norm)
    want, iters, converged = ref.mcl(p0, norm=norm)
    assert bool(got.converged) and converged
    assert _argmax_margin(want) > 0.5  # converged to one attractor per row, far from a tie
    # +-1: the count is the first step whose change is below tol, and float32 can move a change
    # that lies close to tol across it.
    assert abs(int(got.num_iters) - iters) <= 1
    np.testing.assert_allclose(got.flow, want, atol=1e-4)
    chex.assert_type(got.num_iters, jnp.int32)


def test_change_norms_are_the_matrix_infinity_norm_and_the_largest_entry():
    d = np.array([[0.1, -0.2, 0.05], [0.15, 0.15, -0.15], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(mf.change_norm(jnp.asarray(d), "inf"), np.linalg.norm(d, np.inf), rtol=1e-6)
    np.testing.assert_allclose(mf.change_norm(jnp.asarray(d), "inf"), 0.45, rtol=1e-6)
    np.testing.assert_allclose(mf.change_norm(jnp.asarray(d), "max_abs"), 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        mf.change_norm(jnp.asarray(d), "l2")


def test_the_two_norms_stop_at_different_iterations_as_the_oracle_does():
    # Near convergence a row's change moves mass between two entries, so its sum is twice the
    # largest entry; a tol between the two at step 12 stops 'max_abs' there and 'inf' one later.
    features, _ = planted_token_features(0, 10, 10, 16, noise=0.3)
    s = ref.transition_matrix(features, beta=0.8, sharpen=8.0).astype(np.float32)
    tol = 2.2e-4
    stops = {}
    for norm in ("max_abs", "inf"):
        # Well-posed: the oracle stops at the same step for any tol within 30% of this one.
        oracle = {ref.mcl(s, 2, 1.8, 1e-7, t, 100, norm)[1] for t in (tol / 1.3, tol, tol * 1.3)}
        assert len(oracle) == 1
        got = jax.jit(mf.markov_flow, static_argnames="norm")(s, inflation=1.8, tol=tol, norm=norm)
        assert bool(got.converged)
        stops[norm] = int(got.num_iters)
        assert stops[norm] == oracle.pop()
    assert stops == {"max_abs": 12, "inf": 13}


def test_oscillating_graph_stops_at_the_cap_unconverged():
    # A directed 3-cycle with l = 2 flips between the permutation P and P^2 = P^T forever:
    # inflation, pruning and RowNorm leave permutation matrices unchanged.
    cycle = np.roll(np.eye(3, dtype=np.float32), 1, axis=1)
    result = jax.jit(mf.markov_flow, static_argnames="max_iter")(cycle, max_iter=25)
    assert int(result.num_iters) == 25
    assert not bool(result.converged)
    np.testing.assert_array_equal(result.flow, cycle.T)  # odd step count: P^2


def test_nan_input_terminates_and_reports_unconverged():
    p = jnp.full((4, 4), jnp.nan)
    result = mf.markov_flow(p, max_iter=50)
    assert int(result.num_iters) <= 50 and not bool(result.converged)


def test_extract_clusters_breaks_ties_to_the_lowest_index_and_relabels():
    flow = jnp.array(
        [
            [0.0, 0.0, 0.5, 0.0, 0.5],  # tie between 2 and 4 -> 2
            [0.0, 0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    clusters = jax.jit(mf.extract_clusters)(flow)
    np.testing.assert_array_equal(clusters.attractors, [2, 2, 4, 4, 4])
    np.testing.assert_array_equal(clusters.labels, [0, 0, 1, 1, 1])
    assert int(clusters.num_clusters) == 2


def _two_cliques(size=5):
    n = 2 * size
    a = np.zeros((n, n))
    a[:size, :size] = 1
    a[size:, size:] = 1
    a[size - 1, size] = a[size, size - 1] = 1  # the bridge
    return a


def _ring_of_cliques(num=4, size=4, seed=0):
    # Random weights inside the cliques: with all-equal weights MCL converges to exactly tied
    # attractors (argmax margin 0 in float64), and which one float32 picks depends on rounding.
    rng = np.random.default_rng(seed)
    n = num * size
    a = np.zeros((n, n))
    for k in range(num):
        a[k * size : (k + 1) * size, k * size : (k + 1) * size] = rng.uniform(0.5, 1.0, (size, size))
        j = ((k + 1) % num) * size
        a[k * size + size - 1, j] = 1
    return (a + a.T) / 2


def _partition(labels):
    groups = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(tuple(g) for g in groups.values())


def _weighted_blocks(seed=0):
    # Three noisy blocks with random weights: no exact symmetry, so attractors never tie.
    rng = np.random.default_rng(seed)
    sizes = (4, 6, 5)
    labels = np.repeat(np.arange(3), sizes)
    a = rng.random((15, 15)) * np.where(labels[:, None] == labels[None, :], 1.0, 0.05)
    return (a + a.T) / 2


def _mcl_both(adjacency, inflation, prune_ours, prune_theirs):
    adjacency = adjacency.copy()
    np.fill_diagonal(adjacency, 1.0)
    theirs = markov_clustering.run_mcl(adjacency, expansion=2, inflation=inflation, loop_value=1,
                                       pruning_threshold=prune_theirs, iterations=200)
    assert _argmax_margin(theirs.T) > 0.5  # the partition is far from an attractor tie
    ours = mf.markov_flow(affinity.row_normalize(jnp.asarray(adjacency, jnp.float32)), expansion=2,
                          inflation=inflation, prune_threshold=prune_ours, tol=1e-7, max_iter=200)
    assert bool(ours.converged)
    return ours, theirs


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("inflation", [2.0, 2.6])
def test_flow_matrix_is_the_transpose_of_the_markov_clustering_package(seed, inflation):
    # Conventions aligned: the package is column-stochastic (we are row-stochastic: transpose),
    # self-loops are set to 1 on the adjacency on both sides, and the package prunes after
    # normalising without renormalising, so pruning is off on both sides for this comparison.
    ours, theirs = _mcl_both(_weighted_blocks(seed), inflation, 0.0, 0.0)
    np.testing.assert_allclose(ours.flow, theirs.T, atol=1e-4)
    assert _partition(mf.extract_clusters(ours.flow).labels) == [tuple(range(0, 4)), tuple(range(4, 10)), tuple(range(10, 15))]


@pytest.mark.parametrize("graph", [_two_cliques(), _ring_of_cliques(), _ring_of_cliques(5, 3), _weighted_blocks(2)])
@pytest.mark.parametrize("inflation", [2.0, 2.6])
@pytest.mark.parametrize("prune", [0.0, 1e-7, 1e-3])
def test_partition_agrees_with_the_markov_clustering_package(graph, inflation, prune):
    # The package reads clusters off nonzero entries, so it needs pruning to drop the ~1e-30
    # residues that would otherwise merge every cluster: it always prunes at 1e-3 here.
    ours, theirs = _mcl_both(graph, inflation, prune, 1e-3)
    assert _partition(mf.extract_clusters(ours.flow).labels) == sorted(markov_clustering.get_clusters(theirs))


def test_two_cliques_split_at_the_bridge():
    a = _two_cliques() + np.eye(10)
    assert _argmax_margin(ref.mcl(ref.row_norm(a), inflation=2.0)[0]) > 0.5  # one attractor per clique
    s = affinity.row_normalize(jnp.asarray(a, jnp.float32))
    labels = mf.extract_clusters(mf.markov_flow(s, inflation=2.0).flow).labels
    np.testing.assert_array_equal(labels, [0] * 5 + [1] * 5)


def test_markov_flow_vmaps_with_per_member_iteration_counts():
    batch = np.stack([_stochastic(seed=s) for s in range(3)])
    cycle = np.roll(np.eye(12, dtype=np.float32), 1, axis=1)
    batch = np.concatenate([batch, cycle[None]])
    out = jax.jit(jax.vmap(lambda p: mf.markov_flow(p, max_iter=40)))(batch)
    chex.assert_shape(out.flow, (4, 12, 12))
    for i in range(4):
        single = mf.markov_flow(batch[i], max_iter=40)
        assert int(out.num_iters[i]) == int(single.num_iters)
        np.testing.assert_allclose(out.flow[i], single.flow, atol=1e-6)
    assert not bool(out.converged[3])
