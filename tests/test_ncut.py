"""Specification of DiffCut's recursive NCut (spark_jax.ncut) against a NumPy/SciPy transcription.

The transcription below follows DiffCut's Algorithm 1 (Appendix A) and Eq. 2-3 literally, in
float64, with the conventions of the released code: induced subgraph per segment, SciPy's
dense `eigh` of D^-1/2 (D - W) D^-1/2, y = D^-1/2 v with the largest-magnitude entry positive,
100 thresholds in [0.99 min y, 0.99 max y], the Shi-Malik form y'Ly / y'Dy of the NCut value,
depth-first recursion while NCut < tau.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spark_jax.ncut import (
    NCutConfig,
    best_bipartition,
    recursive_ncut,
    recursive_ncut_affinity,
    recursive_ncut_batch,
)
from spark_jax.synthetic import planted_token_features


# ----------------------------------------------------------------------------------------------
# Reference transcription (float64, recursive, one segment at a time).


def reference_affinity(features: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 3: cosine, min-max rescaled over the whole matrix to [0, 1], power alpha."""
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T
    a = (a - a.min()) / (a.max() - a.min())
    return a**alpha


def reference_split(w: np.ndarray, num_thresholds: int = 100, scale: float = 0.99):
    """Algorithm 1 step 3 on a whole graph: (best side as a bool mask, its NCut value, y)."""
    d = w.sum(axis=1)
    d_inv_sqrt = 1.0 / np.sqrt(d)
    sym = d_inv_sqrt[:, None] * (np.diag(d) - w) * d_inv_sqrt[None, :]
    _, vectors = scipy.linalg.eigh(sym)
    y = d_inv_sqrt * vectors[:, 1]
    y = y * np.sign(y[np.argmax(np.abs(y))])
    laplacian = np.diag(d) - w
    best_value, best_side = np.inf, None
    for t in np.linspace(scale * y.min(), scale * y.max(), num_thresholds):
        x = np.where(y > t, 1.0, -1.0)
        k = d[x > 0].sum() / d.sum()
        b = k / (1 - k)
        z = (1 + x) - b * (1 - x)
        value = (z @ laplacian @ z) / (z @ (d * z))
        if value < best_value:  # strict: the first (lowest) threshold wins ties
            best_value, best_side = value, y > t
    return best_side, best_value, y


def reference_recursive_ncut(
    w: np.ndarray, tau: float, *, exclude_zero_affinity_nodes: bool = False
) -> np.ndarray:
    """Recursive NCut (Algorithm 1 step 4) -> labels [N] canonical by first occurrence."""
    n = w.shape[0]
    zero_row = np.any(w == 0, axis=1) if exclude_zero_affinity_nodes else np.zeros(n, bool)
    leaves = []

    def visit(nodes: np.ndarray, level: int):
        idx = nodes if level == 0 else nodes[~zero_row[nodes]]
        if len(idx) < 2:
            leaves.append(nodes)
            return
        side, value, _ = reference_split(w[np.ix_(idx, idx)])
        if value < tau:
            positive = idx[side]
            visit(positive, level + 1)
            visit(np.setdiff1d(nodes, positive), level + 1)
        else:
            leaves.append(nodes)

    visit(np.arange(n), 0)
    labels = np.empty(n, np.int64)
    for leaf in sorted(leaves, key=lambda nodes: nodes.min()):
        labels[leaf] = len([1 for other in leaves if other.min() < leaf.min()])
    return labels


# ----------------------------------------------------------------------------------------------


def _random_features(seed: int, h: int, w: int, c: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((h, w, c)).astype(np.float32)


def _affinity_f32(features: np.ndarray, alpha: float) -> np.ndarray:
    return reference_affinity(features, alpha).astype(np.float32)


PLANTED = [
    # (seed, h, w, c, noise): clean regions; shredded thin structures; N = 288 > 256, so
    # segments are solved at all three static sizes (64, 256, N).
    (0, 16, 16, 32, 0.3),
    (1, 16, 16, 32, 0.8),
    (2, 12, 24, 16, 1.2),
]
RANDOM = [(seed, tau) for seed in (0, 1, 2) for tau in (0.5, 0.8)]


@pytest.mark.parametrize(
    "seed,h,w,c,noise,exclude_zero", [case + (False,) for case in PLANTED] + [PLANTED[1] + (True,)]
)
def test_planted_matches_transcription(seed, h, w, c, noise, exclude_zero):
    features, _ = planted_token_features(seed, h, w, c, noise)
    cfg = NCutConfig(exclude_zero_affinity_nodes=exclude_zero)
    result = recursive_ncut(jnp.asarray(features), cfg)
    expected = reference_recursive_ncut(
        reference_affinity(features, cfg.alpha), cfg.tau, exclude_zero_affinity_nodes=exclude_zero
    )
    chex.assert_shape(result.labels, (h, w))
    chex.assert_type(result.labels, jnp.int32)
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), expected)
    assert int(result.num_segments) == expected.max() + 1
    assert int(result.num_eigensolves) == 2 * int(result.num_segments) - 1
    assert not bool(result.truncated)


@pytest.mark.parametrize("seed", [0, 3])
def test_low_noise_planted_regions_are_recovered_exactly(seed):
    features, layout = planted_token_features(seed, 16, 16, 32, 0.3)
    result = recursive_ncut(jnp.asarray(features), NCutConfig())
    labels = np.asarray(result.labels)
    # Same partition as the planted layout: a bijection between label ids and region ids.
    pairs = set(zip(labels.ravel().tolist(), layout.ravel().tolist()))
    assert len(pairs) == len(np.unique(layout)) == int(result.num_segments)


@pytest.mark.parametrize("seed,tau", RANDOM)
def test_random_features_match_transcription(seed, tau):
    features = _random_features(seed, 8, 8, 16)
    cfg = NCutConfig(tau=tau)
    result = recursive_ncut(jnp.asarray(features), cfg)
    expected = reference_recursive_ncut(reference_affinity(features, cfg.alpha), tau)
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), expected)
    assert expected.max() >= 1, "the case should exercise at least one split"
    assert not bool(result.truncated)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_features_with_released_code_quirk(seed):
    features = _random_features(seed, 8, 8, 16)
    cfg = NCutConfig(tau=0.8, exclude_zero_affinity_nodes=True)
    result = recursive_ncut(jnp.asarray(features), cfg)
    expected = reference_recursive_ncut(
        reference_affinity(features, cfg.alpha), cfg.tau, exclude_zero_affinity_nodes=True
    )
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_root_bipartition_matches_transcription(seed):
    features, _ = planted_token_features(seed, 12, 12, 16, 0.8)
    w = _affinity_f32(features, 10.0)
    side, value, y = reference_split(w.astype(np.float64))
    cut = jax.jit(best_bipartition)(jnp.asarray(w), jnp.ones(w.shape[0], bool))
    np.testing.assert_array_equal(np.asarray(cut.side), side)
    np.testing.assert_allclose(float(cut.ncut), value, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(cut.fiedler), y, atol=1e-4 * np.abs(y).max())


@pytest.mark.parametrize("segment", ["5:45", "0:300:3", "0:300"])
@pytest.mark.parametrize("eigensolver", ["eigh", "lobpcg"])
def test_bipartition_of_a_subsegment_is_the_induced_subgraph_cut(segment, eigensolver):
    # Of 320 tokens: 40 are solved as a 64-token problem, 100 scattered ones as a 128-token
    # problem, 300 on the full graph (by eigh or LOBPCG).
    features, _ = planted_token_features(4, 16, 20, 16, 0.8)
    w = _affinity_f32(features, 10.0)
    active = np.zeros(w.shape[0], bool)
    active[slice(*map(int, segment.split(":")))] = True
    side, value, _ = reference_split(w[np.ix_(active, active)].astype(np.float64))
    cut = jax.jit(best_bipartition, static_argnames="eigensolver")(
        jnp.asarray(w), jnp.asarray(active), eigensolver=eigensolver
    )
    # The same cut, up to which side is called positive (a sign tie on symmetric segments).
    got = np.asarray(cut.side)[active]
    assert np.array_equal(got, side) or np.array_equal(got, ~side)
    assert not np.asarray(cut.side)[~active].any()
    np.testing.assert_allclose(float(cut.ncut), value, rtol=1e-4)


@pytest.mark.parametrize("count", [0, 1])
def test_segments_below_two_tokens_are_never_cut(count):
    w = jnp.asarray(_affinity_f32(_random_features(0, 4, 4, 8), 10.0))
    active = jnp.arange(16) < count
    cut = jax.jit(best_bipartition)(w, active)
    assert not bool(jnp.any(cut.side))
    assert float(cut.ncut) == np.inf


def test_two_token_segment_cut_rule():
    # NCut of splitting {a, b} with unit self-affinities is 2 w / (1 + w): below 0.5 iff w < 1/3.
    for weight, expect_split in [(0.2, True), (0.5, False)]:
        w = jnp.array([[1.0, weight], [weight, 1.0]])
        result = jax.jit(recursive_ncut_affinity)(w, NCutConfig())
        assert int(result.num_segments) == (2 if expect_split else 1)
        np.testing.assert_allclose(2 * weight / (1 + weight) < 0.5, expect_split)


def test_max_segments_truncates_breadth_first():
    features, _ = planted_token_features(0, 16, 16, 32, 0.3)
    cfg = NCutConfig(max_segments=2)
    result = recursive_ncut(jnp.asarray(features), cfg)
    assert int(result.num_segments) == 2
    assert bool(result.truncated)
    # Two segments = the root split of the transcription.
    side, _, _ = reference_split(reference_affinity(features, cfg.alpha))
    labels = np.asarray(result.labels).ravel()
    np.testing.assert_array_equal(labels == labels[np.argmax(side)], side)


@pytest.mark.parametrize("seed,noise", [(1, 0.8), (0, 0.5)])
def test_lobpcg_solver_agrees_with_eigh_on_planted_features(seed, noise):
    features, _ = planted_token_features(seed, 16, 16, 32, noise)
    exact = recursive_ncut(jnp.asarray(features), NCutConfig())
    fast = recursive_ncut(jnp.asarray(features), NCutConfig(eigensolver="lobpcg"))
    np.testing.assert_array_equal(np.asarray(fast.labels), np.asarray(exact.labels))


def test_batch_is_vmap_of_single():
    batch = np.stack([planted_token_features(s, 16, 16, 32, n)[0] for s, n in [(0, 0.3), (1, 0.5)]])
    cfg = NCutConfig()
    batched = recursive_ncut_batch(jnp.asarray(batch), cfg)
    chex.assert_shape(batched.labels, (2, 16, 16))
    for i in range(2):
        single = recursive_ncut(jnp.asarray(batch[i]), cfg)
        np.testing.assert_array_equal(np.asarray(batched.labels[i]), np.asarray(single.labels))
        assert int(batched.num_segments[i]) == int(single.num_segments)


def test_tau_and_alpha_do_not_recompile():
    features = jnp.asarray(planted_token_features(0, 16, 16, 32, 0.8)[0])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x, cfg):
        return recursive_ncut(x, cfg).num_segments

    counts = [int(run(features, NCutConfig(tau=tau, alpha=alpha))) for tau, alpha in
              [(0.5, 10.0), (0.9, 10.0), (0.5, 5.0)]]
    assert counts[1] >= counts[0]  # a looser tau never yields fewer segments here


def test_larger_tau_gives_finer_partitions():
    features, _ = planted_token_features(2, 16, 16, 32, 0.8)
    counts = [int(recursive_ncut(jnp.asarray(features), NCutConfig(tau=t)).num_segments)
              for t in (0.2, 0.35, 0.5)]
    assert counts == sorted(counts)


def test_non_finite_tokens_are_zeroed_and_counted():
    features, _ = planted_token_features(0, 16, 16, 32, 0.3)
    features[2, 3, 0] = np.nan
    result = recursive_ncut(jnp.asarray(features), NCutConfig())
    assert int(result.num_nonfinite_tokens) == 1
    assert np.all(np.asarray(result.labels) >= 0)
    assert int(result.num_segments) >= 2


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[h, w, C\]"):
        recursive_ncut(jnp.zeros((16, 8)), NCutConfig())
    with pytest.raises(ValueError, match="eigensolver"):
        NCutConfig(eigensolver="arpack")
    with pytest.raises(ValueError, match="max_segments"):
        NCutConfig(max_segments=0)
    with pytest.raises(ValueError, match="lobpcg"):
        recursive_ncut(jnp.zeros((4, 4, 8)), NCutConfig(eigensolver="lobpcg"))
    with pytest.raises(ValueError, match="tau"):
        NCutConfig(tau=-1.0).check_values()


@pytest.mark.slow
@pytest.mark.parametrize("eigensolver", ["eigh", "lobpcg"])
def test_full_size_32x32_matches_transcription(eigensolver):
    # DiffCut's token grid for a 1024 input, with SSD-1B's channel count.
    features, _ = planted_token_features(5, 32, 32, 1280, 0.8)  # 26 segments
    cfg = NCutConfig(eigensolver=eigensolver)
    result = recursive_ncut(jnp.asarray(features), cfg)
    expected = reference_recursive_ncut(reference_affinity(features, cfg.alpha), cfg.tau)
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), expected)
    assert not bool(result.truncated)
