"""Sparse Markov flow (`SparkConfig(flow='sparse')`, graph/sparse_flow.py) and the Krylov propagation
(`propagation='krylov'`): the sparse form is the dense one when it keeps every entry, each building block
matches its dense counterpart, and on well-posed planted features it finds the dense partition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig, segment_tokens, segment_tokens_batch
from spark_jax.graph import markov_flow as mf
from spark_jax.graph import propagation
from spark_jax.graph import sparse_flow as sf
from spark_jax.testing import numpy_reference as ref
from spark_jax.testing.synthetic import planted_miou, planted_token_features

PLANTED = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.8)
_sparse_flow = jax.jit(sf.sparse_markov_flow, static_argnames=("keep", "keep_final", "rank", "recovery", "expansion", "max_iter", "norm"))


def _planted_s(side=10, channels=16, noise=0.3, seed=0):
    features, regions = planted_token_features(seed, side, side, channels, noise=noise)
    return ref.transition_matrix(features, beta=0.8, sharpen=8.0).astype(np.float32), regions


def _random_rows(n, k, seed):
    """Row-sparse matrix with k distinct random columns per row and descending positive values (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    values = -np.sort(-rng.random((n, k)), axis=1)
    values /= values.sum(1, keepdims=True)
    columns = np.stack([rng.choice(n, k, replace=False) for _ in range(n)])
    return sf.SparseRows(jnp.asarray(values, jnp.float32), jnp.asarray(columns, jnp.int32))


@pytest.mark.parametrize("expansion", [2, 3])
@pytest.mark.parametrize("norm", ["inf", "max_abs"])
def test_keeping_every_entry_is_the_dense_form(expansion, norm):
    s, _ = _planted_s()
    dense = mf.markov_flow(s, expansion=expansion, inflation=1.8, norm=norm)
    sparse = _sparse_flow(s, keep=s.shape[0], keep_final=s.shape[0], expansion=expansion, inflation=1.8, norm=norm)
    assert int(sparse.dense_iters) == 0  # nothing to drop: sparse from P_0 on
    assert float(sparse.discarded_mass) < 1e-6
    assert int(sparse.num_iters) == int(dense.num_iters) and bool(sparse.converged) and bool(dense.converged)
    np.testing.assert_allclose(sf.densify(sparse.flow), dense.flow, atol=1e-5)
    np.testing.assert_array_equal(sf.extract_sparse_clusters(sparse.flow).labels, mf.extract_clusters(dense.flow).labels)


def test_a_larger_keep_than_tokens_is_clipped_to_the_tokens():
    s, _ = _planted_s(side=6)
    out = _sparse_flow(s, keep=1000, keep_final=1000, inflation=1.8)
    chex.assert_shape(out.flow.values, (36, 36))
    np.testing.assert_allclose(sf.densify(out.flow), mf.markov_flow(s, inflation=1.8).flow, atol=1e-5)


def test_few_kept_entries_switch_after_a_dense_phase_and_keep_the_partition():
    s, regions = _planted_s(side=16, noise=0.3)
    dense = mf.markov_flow(s, inflation=1.8)
    sparse = _sparse_flow(s, keep=8, inflation=1.8)
    # Well-posed: the dense attractors are far from ties, and the sparse phase really ran.
    top2 = np.sort(np.asarray(dense.flow), axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 0.5
    assert 0 < int(sparse.dense_iters) < int(sparse.num_iters) and bool(sparse.converged)
    assert 0 < float(sparse.discarded_mass) < 0.1  # switch_mass 0.9: at most 10% of a row's flow dropped
    chex.assert_shape(sparse.flow.values, (256, 8))
    chex.assert_type(sparse.flow.columns, jnp.int32)
    labels = sf.extract_sparse_clusters(sparse.flow).labels
    np.testing.assert_array_equal(labels, mf.extract_clusters(dense.flow).labels)
    assert planted_miou(np.asarray(labels).reshape(16, 16), regions) == 1.0


def test_selecting_from_the_start_fragments_large_regions():
    # Why the dense phase exists (switch_mass = 0 selects from P_0 = S): documented behaviour, pinned.
    s, _ = _planted_s(side=16, noise=0.3)
    sparse = _sparse_flow(s, keep=8, inflation=1.8, switch_mass=0.0)
    assert int(sparse.dense_iters) == 0 and float(sparse.discarded_mass) > 0.5
    assert int(sf.extract_sparse_clusters(sparse.flow).num_clusters) > 2 * int(
        mf.extract_clusters(mf.markov_flow(s, inflation=1.8).flow).num_clusters)


def test_the_switch_is_the_first_iterate_whose_rows_are_k_sparse():
    # The cheap bound that skips the top-k selection never changes when the switch happens.
    s, _ = _planted_s(side=16, noise=0.3)
    sparse = _sparse_flow(s, keep=8, inflation=1.8)
    t = int(sparse.dense_iters)

    def lost(iters):
        p = np.asarray(mf.markov_flow(s, inflation=1.8, max_iter=iters).flow) if iters else np.asarray(s)
        return (1.0 - np.sort(p, axis=1)[:, -8:].sum(1)).max()

    assert lost(t) <= 0.1 < lost(t - 1)


def _low_rank_rows(n=64, rank=3, seed=0):
    """A row-stochastic P of rank `rank`: every row a mixture of `rank` distributions."""
    rng = np.random.default_rng(seed)
    weights = rng.random((n, rank))
    weights /= weights.sum(1, keepdims=True)
    bases = rng.random((rank, n)) ** 4
    bases /= bases.sum(1, keepdims=True)
    return jnp.asarray(weights @ bases, jnp.float32)


@pytest.mark.parametrize("power", [2, 3])
def test_a_low_rank_p_is_expanded_through_its_sketch_within_its_residual(power):
    p = _low_rank_rows()
    v = sf.row_space(p, sf.sketch(8, 64))
    chex.assert_shape(v, (64, 8))
    np.testing.assert_allclose(v.T @ v, np.eye(8), atol=1e-5)  # orthonormal columns
    residual, pv = sf.projection_residual(p, v)
    assert float(residual) < 1e-5  # rank 3 <= 8: the whole row space
    want = np.linalg.matrix_power(np.asarray(p, np.float64), power)
    got = sf.lowrank_expand(p, v, pv, power)
    assert np.abs(np.asarray(got, np.float64) - want).sum(1).max() <= float(residual) + 1e-6
    # A sketch smaller than the rank misses part of the row space, and the residual says so.
    assert float(sf.projection_residual(p, sf.row_space(p, sf.sketch(2, 64)))[0]) > 1e-2


def test_inflate_prune_normalize_is_the_dense_step():
    p = _low_rank_rows(seed=1).at[:, 5].set(0.0)  # zeros stay zeros (exp(r log 0) = 0)
    p2 = mf.expand(p, 2)
    want = mf.markov_flow_step(p, expansion=2, inflation=2.6, prune_threshold=1e-4)
    np.testing.assert_allclose(sf.inflate_prune_normalize(p2, 2.6, 1e-4), want, rtol=1e-5, atol=1e-8)
    assert float(jnp.max(sf.inflate_prune_normalize(p2, 2.6, 1e-4)[:, 5])) == 0.0


def test_low_rank_iterates_expand_through_the_sketch_and_keep_the_partition():
    # 32 x 32 planted tokens with a rank-8 sketch (N = 1024 >= 16 r): the iterates collapse to the five planted
    # regions' rank, the sketch takes over before the rows are sparse, and the partition is the dense one.
    s, regions = _planted_s(side=32, noise=0.3)
    dense = mf.markov_flow(s, inflation=1.8)
    low = _sparse_flow(s, keep=16, keep_final=16, rank=8, rank_tol=1e-3, inflation=1.8)
    off = _sparse_flow(s, keep=16, keep_final=16, rank=0, inflation=1.8)
    assert int(low.lowrank_iters) > 0 and 0 < float(low.lowrank_error) < 1e-3
    assert int(off.lowrank_iters) == 0 and float(off.lowrank_error) == 0.0
    assert int(low.dense_iters) == int(off.dense_iters) and bool(low.converged)
    labels = sf.extract_sparse_clusters(low.flow).labels
    np.testing.assert_array_equal(labels, mf.extract_clusters(dense.flow).labels)
    np.testing.assert_array_equal(labels, sf.extract_sparse_clusters(off.flow).labels)
    assert planted_miou(np.asarray(labels).reshape(32, 32), regions) == 1.0
    # Below N = 16 r the sketch is not used: the same run as rank 0.
    small = _sparse_flow(s, keep=16, keep_final=16, rank=128, inflation=1.8)
    assert int(small.lowrank_iters) == 0


def test_rows_narrow_to_keep_final_and_keep_the_partition():
    s, _ = _planted_s(side=16, noise=0.3)
    wide = _sparse_flow(s, keep=16, keep_final=16, inflation=1.8)
    narrow = _sparse_flow(s, keep=16, keep_final=4, inflation=1.8)
    chex.assert_shape(narrow.flow.values, (256, 4))
    assert bool(narrow.converged) and float(narrow.discarded_mass) < 0.1
    np.testing.assert_array_equal(sf.extract_sparse_clusters(narrow.flow).labels,
                                  sf.extract_sparse_clusters(wide.flow).labels)
    np.testing.assert_array_equal(sf.extract_sparse_clusters(wide.flow).labels,
                                  mf.extract_clusters(mf.markov_flow(s, inflation=1.8).flow).labels)


@pytest.mark.parametrize("power", [1, 2, 3])
def test_sparse_expansion_is_the_matrix_power(power):
    p = _random_rows(12, 4, seed=0)
    want = np.linalg.matrix_power(np.asarray(sf.densify(p), np.float64), power)
    np.testing.assert_allclose(jax.jit(sf.sparse_expand, static_argnums=(1, 2))(p, power, 12), want, atol=1e-6)


@pytest.mark.parametrize("norm", ["inf", "max_abs"])
def test_sparse_change_norm_is_the_dense_one(norm):
    old, new = _random_rows(15, 5, seed=1), _random_rows(15, 5, seed=2)
    # Each new row stores two of the old row's columns and three it lacks: matched and unmatched entries.
    rng = np.random.default_rng(3)
    columns = [np.concatenate([c[1:3], rng.choice(np.setdiff1d(np.arange(15), c), 3, replace=False)])
               for c in np.asarray(old.columns)]
    new = new._replace(columns=jnp.asarray(np.stack(columns), jnp.int32))
    want = mf.change_norm(sf.densify(new) - sf.densify(old), norm)
    np.testing.assert_allclose(sf.sparse_change_norm(old, new, norm), want, rtol=1e-6)
    with pytest.raises(ValueError, match="norm"):
        sf.sparse_change_norm(old, new, "l2")


def test_pruning_is_the_dense_forms_and_empty_rows_become_self_loops():
    selected = sf.SparseRows(jnp.array([[0.5, 0.3, 0.2], [2e-9, 1e-9, 5e-10], [0.0, 0.0, 0.0]]),
                             jnp.array([[2, 0, 1], [1, 0, 2], [0, 1, 2]], jnp.int32))
    out = sf.prune_and_normalize(selected, inflation=1.0, prune_threshold=1e-7)
    np.testing.assert_allclose(out.values, [[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(out.columns[:2], selected.columns[:2])
    np.testing.assert_array_equal(out.columns[2], [2, 0, 1])  # (2, 1) first, then distinct columns
    dense = mf.prune(sf.densify(selected) ** 1.0, 1e-7)
    np.testing.assert_allclose(sf.densify(out)[:2], dense[:2] / dense[:2].sum(1, keepdims=True), rtol=1e-6)


def test_recovery_brings_back_the_largest_pruned_entries():
    # tau keeps only the maximum (40% of the mass): recovery 3 at 90% brings back the next entries while the
    # entries before hold less than 90%: 0.4, 0.3, 0.2 (the fourth would start at 0.9).
    selected = sf.SparseRows(jnp.array([[0.4, 0.3, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02]]),
                             jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]], jnp.int32))
    kw = dict(inflation=1.0, prune_threshold=0.35)
    np.testing.assert_allclose(sf.prune_and_normalize(selected, **kw).values[0], [1, 0, 0, 0])
    out = sf.prune_and_normalize(selected, recovery=3, recovery_mass=0.9, **kw)
    np.testing.assert_allclose(out.values[0], np.array([0.4, 0.3, 0.2, 0.0]) / 0.9, rtol=1e-6)
    np.testing.assert_allclose(out.values[1], [1, 0, 0, 0])  # 90% survived tau: nothing to recover
    out = sf.prune_and_normalize(selected, recovery=2, recovery_mass=0.9, **kw)  # at most 2 entries
    np.testing.assert_allclose(out.values[0], np.array([0.4, 0.3, 0.0, 0.0]) / 0.7, rtol=1e-6)


def test_extract_sparse_clusters_is_the_dense_argmax_with_ties_to_the_lowest_column():
    flow = sf.SparseRows(jnp.array([[0.5, 0.5], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
                         jnp.array([[4, 2], [2, 0], [4, 0], [4, 1], [4, 0]], jnp.int32))
    got = sf.extract_sparse_clusters(flow)
    want = mf.extract_clusters(sf.densify(flow))
    np.testing.assert_array_equal(got.attractors, [2, 2, 4, 4, 4])
    np.testing.assert_array_equal(got.labels, want.labels)
    assert int(got.num_clusters) == int(want.num_clusters) == 2


def test_vmaps_with_per_member_iteration_counts():
    s = np.stack([_planted_s(side=8, seed=i)[0] for i in range(2)])
    batched = jax.vmap(lambda x: sf.sparse_markov_flow(x, keep=6, inflation=1.8))(s)
    chex.assert_shape(batched.flow.values, (2, 64, 6))
    for i in range(2):
        single = _sparse_flow(s[i], keep=6, inflation=1.8)
        assert int(batched.num_iters[i]) == int(single.num_iters)
        assert int(batched.dense_iters[i]) == int(single.dense_iters)
        np.testing.assert_allclose(batched.flow.values[i], single.flow.values, atol=1e-6)


def test_with_the_sketch_on_vmapped_members_run_one_by_one_with_their_own_branches():
    # A batched lax.cond becomes a select that runs both expansions (the dense N^3 one too) for every member; with
    # the sketch on, a vmap runs the members one after another instead, each choosing its own branch.
    s = np.stack([_planted_s(side=16, seed=i, noise=0.3)[0] for i in range(2)])
    flow = lambda x: sf.sparse_markov_flow(x, keep=16, keep_final=16, rank=16, inflation=1.8)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(jax.vmap(flow))(s))
    assert "cond[" in jaxpr
    batched = jax.jit(jax.vmap(flow))(s)
    for i in range(2):
        single = jax.jit(flow)(s[i])
        assert int(single.lowrank_iters) > 0  # the sketch did take over
        for name in ("num_iters", "dense_iters", "lowrank_iters"):
            assert int(getattr(batched, name)[i]) == int(getattr(single, name)), name
        np.testing.assert_array_equal(batched.flow.columns[i], single.flow.columns)
        np.testing.assert_allclose(batched.flow.values[i], single.flow.values, atol=1e-6)
    # With the sketch off (N < 16 r) nothing is chosen per member: the vmap batches the members.
    assert "cond[" not in str(jax.make_jaxpr(jax.vmap(lambda x: sf.sparse_markov_flow(x, keep=16, rank=128)))(s))


def test_cap_and_nan_input_report_unconverged():
    s, _ = _planted_s(side=8)
    capped = _sparse_flow(s, keep=4, inflation=1.8, max_iter=3)
    assert int(capped.num_iters) == 3 and not bool(capped.converged)
    nan = _sparse_flow(jnp.full((6, 6), jnp.nan), keep=3, max_iter=20)
    assert int(nan.num_iters) <= 20 and not bool(nan.converged)


@pytest.mark.parametrize("seed, noise", [(0, 0.2), (1, 0.5)])
def test_segment_tokens_sparse_gives_the_dense_partition_on_planted_features(seed, noise):
    features, regions = planted_token_features(seed, 16, 16, 32, noise=noise)
    dense = segment_tokens(features, PLANTED)
    sparse = segment_tokens(features, PLANTED.replace(flow="sparse", sparse_keep=8, propagation="krylov"))
    assert int(dense.num_clusters) == int(sparse.num_clusters) == 5  # well-posed: the planted regions
    np.testing.assert_array_equal(sparse.cluster_labels, dense.cluster_labels)
    np.testing.assert_array_equal(sparse.labels, dense.labels)
    np.testing.assert_allclose(sparse.soft_labels, dense.soft_labels, atol=1e-4)
    assert bool(sparse.mcl_converged) and bool(sparse.propagation_converged)
    assert planted_miou(sparse.labels, regions) == 1.0


def test_numeric_sparse_fields_do_not_recompile_and_batches_match(compilations):
    features = np.stack([planted_token_features(i, 8, 8, 16, noise=0.3)[0] for i in range(2)])
    cfg = PLANTED.replace(flow="sparse", sparse_keep=6, propagation="krylov")
    batch = segment_tokens_batch(features, cfg)
    for i in range(2):
        np.testing.assert_array_equal(batch.labels[i], segment_tokens(features[i], cfg).labels)
        np.testing.assert_array_equal(batch.cluster_labels[i], segment_tokens(features[i], cfg).cluster_labels)
    with compilations() as c:
        segment_tokens_batch(features, cfg.replace(sparse_switch_mass=0.8, sparse_recovery_mass=0.5,
                                                   sparse_rank_tol=1e-4))
    assert c.count == 0


def test_config_validation_names_the_field():
    for bad, field in [(dict(flow="csr"), "flow"), (dict(sparse_keep=0), "sparse_keep"),
                       (dict(sparse_keep_final=0), "sparse_keep_final"), (dict(sparse_rank=-1), "sparse_rank"),
                       (dict(sparse_rank=2.5), "sparse_rank"),
                       (dict(sparse_recovery=-1), "sparse_recovery"), (dict(sparse_keep=4, sparse_recovery=5),
                                                                         "sparse_recovery"),
                       (dict(propagation_block=0), "propagation_block"), (dict(propagation="cg"), "propagation")]:
        with pytest.raises(ValueError, match=field):
            SparkConfig(**bad)
    for bad, field in [(dict(sparse_switch_mass=1.0), "sparse_switch_mass"),
                       (dict(sparse_switch_mass=-0.1), "sparse_switch_mass"),
                       (dict(sparse_recovery_mass=0.0), "sparse_recovery_mass"),
                       (dict(sparse_rank_tol=-1e-3), "sparse_rank_tol"), (dict(sparse_rank_tol=3.0), "sparse_rank_tol")]:
        with pytest.raises(ValueError, match=field):
            SparkConfig(**bad).check_values()
    assert SparkConfig().flow == "dense"  # the dense form stays the default
    leaves = jax.tree_util.tree_leaves(SparkConfig(flow="sparse"))
    assert len(leaves) == len(jax.tree_util.tree_leaves(SparkConfig())) and 0.9 in leaves


# ------------------------------------------------------------------------------------------- Krylov propagation
def _propagation_problem(n=40, k=6, seed=0):
    s, _ = _planted_s(side=int(np.sqrt(n)) if int(np.sqrt(n)) ** 2 == n else 6, seed=seed)
    n = s.shape[0]
    labels = np.concatenate([np.arange(k), np.random.default_rng(seed).integers(0, k, n - k)]).astype(np.int32)
    return s, labels


@pytest.mark.parametrize("block, gamma", [(1, 0.9), (4, 0.5), (64, 0.9)])
def test_krylov_reaches_the_closed_form_q(block, gamma):
    s, labels = _propagation_problem()
    q0 = propagation.seed_matrix(jnp.asarray(labels), s.shape[0])  # 36 columns, 6 seeded
    f = jax.jit(propagation.propagate_labels, static_argnames=("method", "block"))
    closed = f(s, q0, gamma=gamma, method="closed_form")
    krylov = f(s, q0, gamma=gamma, method="krylov", block=block)
    assert bool(krylov.converged) and int(krylov.num_iters) % propagation.KRYLOV_RESTART == 0
    np.testing.assert_allclose(krylov.soft_labels, closed.soft_labels, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(krylov.soft_labels)[:, 6:], 0.0)  # unseeded columns stay zero
    np.testing.assert_array_equal(krylov.labels, closed.labels)


def test_seeded_columns_counts_up_to_the_last_column_holding_a_seed():
    assert int(propagation.seeded_columns(jnp.zeros((3, 5)).at[1, 3].set(1.0))) == 4
    assert int(propagation.seeded_columns(jnp.zeros((3, 5)))) == 0


def test_krylov_cap_reports_unconverged():
    s, labels = _propagation_problem()
    q0 = propagation.seed_matrix(jnp.asarray(labels), 6)
    out = propagation.propagate_labels(s, q0, gamma=0.99, method="krylov", tol=1e-12, max_iter=20)
    assert int(out.num_iters) == propagation.KRYLOV_RESTART and not bool(out.converged)
