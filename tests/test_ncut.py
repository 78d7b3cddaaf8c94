"""Specification of DiffCut's recursive NCut (spark_jax.graph.ncut) against a NumPy/SciPy transcription.

The transcription below follows DiffCut's Algorithm 1 (Appendix A) and Eq. 2-3 literally, in
float64, with the conventions of the released code (`recursive_normalized_cut.py`): induced
subgraph per segment, SciPy's dense `eigh` of D^-1/2 (D - W) D^-1/2, y = D^-1/2 v with the
largest-magnitude entry positive, 100 thresholds in [0.99 min y, 0.99 max y], the Shi-Malik form
y'Ly / y'Dy of the NCut value, depth-first recursion ({y > t} side first) while NCut < tau,
zero-affinity rows dropped below the root, and the released cluster assembly's numbering (its
codes taken exactly with Python integers, or replayed in float32).

Well-posedness. spark_jax computes in float32, the transcription in float64, so a discrete output
is compared only where it cannot depend on rounding (on any CPU or BLAS):
* the partition, when the transcription returns the same partition on 3 copies of the problem
  perturbed by 1e-5 (relative on W, absolute on the normalised Laplacian; float32 rounding is
  ~1e-7): near-degenerate eigenvectors, thresholds and tau ties show up there;
* the numbering as well, when the perturbed copies also number the segments alike and no
  accepted split has a sign tie (|max y| vs |min y| within 1e-3; every split of a 2-token segment
  is an exact tie, its numbering is decided by rounding, in the released code too);
* with zero-affinity rows dropped, when no power affinity lies near float32's underflow
  (every positive entry above 1e-34: which entries flush to zero then does not depend on the CPU's
  denormal handling), so the zero rows are those of the exact minimum.
Each test asserts these of its fixture before comparing: a fixture that is not well-posed fails
as such, not as a mismatch.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spark_jax.graph.ncut import (
    NCutConfig,
    best_bipartition,
    recursive_ncut,
    recursive_ncut_affinity,
    recursive_ncut_batch,
    released_segment_labels,
)
from spark_jax.testing.synthetic import many_regions_features, planted_token_features

PERTURBATION = 1e-5
PERTURBED_COPIES = 3
SIGN_MARGIN = 1e-3
UNDERFLOW_MARGIN = 1e-34  # float32's smallest normal is 1.2e-38, its smallest subnormal 1.4e-45


# ----------------------------------------------------------------------------------------------
# Reference transcription (float64, recursive, one segment at a time).


def reference_affinity(features: np.ndarray, alpha: float) -> np.ndarray:
    """Eq. 3: cosine, min-max rescaled over the whole matrix to [0, 1], power alpha."""
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T
    a = (a - a.min()) / (a.max() - a.min())
    return a**alpha


def reference_split(w: np.ndarray, num_thresholds: int = 100, scale: float = 0.99, rng=None):
    """Algorithm 1 step 3 on a whole graph: (best side {y > t}, its NCut value, y, sign margin).

    With `rng`, the normalised Laplacian is perturbed by a symmetric random matrix of norm
    ~PERTURBATION before its eigendecomposition.
    """
    d = w.sum(axis=1)
    d_inv_sqrt = 1.0 / np.sqrt(d)
    sym = d_inv_sqrt[:, None] * (np.diag(d) - w) * d_inv_sqrt[None, :]
    if rng is not None:
        e = rng.standard_normal(sym.shape)
        sym = sym + PERTURBATION * (e + e.T) / np.sqrt(8 * len(w))
    _, vectors = scipy.linalg.eigh(sym, subset_by_index=[0, 1])  # the two smallest pairs
    y = d_inv_sqrt * vectors[:, 1]
    y = y * np.sign(y[np.argmax(np.abs(y))])
    laplacian = np.diag(d) - w
    thresholds = np.linspace(scale * y.min(), scale * y.max(), num_thresholds)
    x = np.where(y[:, None] > thresholds[None, :], 1.0, -1.0)  # [N, T], one column per threshold
    k = d @ (x > 0) / d.sum()
    b = k / (1 - k)
    z = (1 + x) - b * (1 - x)
    values = np.sum(z * (laplacian @ z), axis=0) / np.sum(z * (d[:, None] * z), axis=0)
    best = np.argmin(values)  # the first (lowest) threshold wins ties
    best_value, best_side = values[best], x[:, best] > 0
    sign_margin = abs(y.max() + y.min()) / max(y.max(), -y.min())
    return best_side, best_value, y, sign_margin


def release_numbering(sides: list[np.ndarray], n: int, codes: str = "exact") -> np.ndarray:
    """The released `assemble_clusters`: code += v * side, v = max(code) + 1, ids = code ranks."""
    if codes == "exact":  # Python integers: no collision
        code, v = [0] * n, 1
        for side in sides:
            code = [c + v * int(s) for c, s in zip(code, side)]
            v = max(code) + 1
        distinct = sorted(set(code))
        return np.array([distinct.index(c) for c in code])
    code, v = np.zeros(n, np.float32), np.float32(1)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 = NaN after overflow
        for side in sides:
            code = code + v * side.astype(np.float32)
            v = np.max(code) + np.float32(1)
    labels = np.zeros(n, np.int64)  # a NaN code equals nothing: label 0
    for i, c in enumerate(np.unique(code)):
        labels[code == c] = i
    return labels


def _recursion(w: np.ndarray, tau: float, exclude_zero: bool, rng=None):
    """Depth first, {y > t} first: (accepted {y > t} sides in visiting order, their sign margins)."""
    n = w.shape[0]
    zero_row = np.any(w == 0, axis=1) if exclude_zero else np.zeros(n, bool)
    sides, margins = [], []

    def visit(nodes: np.ndarray, level: int):
        idx = nodes if level == 0 else nodes[~zero_row[nodes]]
        if len(idx) < 2:
            return
        sub = w[np.ix_(idx, idx)]
        if rng is not None:
            e = rng.standard_normal(sub.shape)
            sub = sub * (1 + PERTURBATION * (e + e.T) / 2)
        side, value, _, margin = reference_split(sub, rng=rng)
        if value < tau:
            positive = np.zeros(n, bool)
            positive[idx[side]] = True
            sides.append(positive)
            margins.append(margin)
            visit(np.flatnonzero(positive), level + 1)
            visit(np.setdiff1d(nodes, np.flatnonzero(positive)), level + 1)

    visit(np.arange(n), 0)
    return sides, margins


def partition(labels) -> np.ndarray:
    """Labels renumbered by raster order of first token: equal iff the partitions are equal."""
    _, first, inverse = np.unique(np.asarray(labels).ravel(), return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


class Reference(NamedTuple):
    labels: np.ndarray  # [N], numbered as the released code numbers them
    num_cuts: int
    partition_is_well_posed: bool
    numbering_is_well_posed: bool


def reference_recursive_ncut(
    w: np.ndarray, tau: float, *, exclude_zero_affinity_nodes: bool = True, codes: str = "exact"
) -> Reference:
    """Recursive NCut (Algorithm 1 step 4) with the released numbering, and its conditioning."""
    n = w.shape[0]
    sides, margins = _recursion(w, tau, exclude_zero_affinity_nodes)
    exact = release_numbering(sides, n)
    rng = np.random.default_rng(0)
    perturbed = [
        release_numbering(_recursion(w, tau, exclude_zero_affinity_nodes, rng)[0], n)
        for _ in range(PERTURBED_COPIES)
    ]
    partition_ok = all(np.array_equal(partition(p), partition(exact)) for p in perturbed)
    numbering_ok = all(np.array_equal(p, exact) for p in perturbed) and min(
        margins, default=1.0
    ) >= SIGN_MARGIN
    return Reference(release_numbering(sides, n, codes), len(sides), partition_ok, numbering_ok)


def assert_zero_rows_are_unambiguous(features: np.ndarray, alpha: float) -> None:
    w = reference_affinity(features, alpha)
    assert w[w > 0].min() > UNDERFLOW_MARGIN, "fixture: affinities near float32 underflow"


def assert_split_is_well_posed(w: np.ndarray) -> None:
    side, _, _, margin = reference_split(w)
    rng = np.random.default_rng(0)
    for _ in range(PERTURBED_COPIES):
        e = rng.standard_normal(w.shape)
        other = reference_split(w * (1 + PERTURBATION * (e + e.T) / 2), rng=rng)[0]
        assert np.array_equal(other, side), "fixture: the best cut is not well-posed"
    assert margin >= SIGN_MARGIN, "fixture: the cut's sign is a tie"


# ----------------------------------------------------------------------------------------------


def _random_features(seed: int, h: int, w: int, c: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((h, w, c)).astype(np.float32)


def _affinity_f32(features: np.ndarray, alpha: float) -> np.ndarray:
    return reference_affinity(features, alpha).astype(np.float32)


def test_defaults_are_the_released_code():
    cfg = NCutConfig()
    assert (cfg.tau, cfg.alpha, cfg.threshold_scale, cfg.num_thresholds) == (0.5, 10.0, 0.99, 100)
    assert cfg.max_segments is None and cfg.exclude_zero_affinity_nodes
    assert cfg.segment_codes == "exact" and cfg.eigensolver == "eigh"


# Clean planted regions: 4-5 cuts, partition and numbering well-posed.
CLEAN = [(0, 16, 16, 32, 0.5), (1, 16, 16, 32, 0.5), (5, 16, 16, 32, 0.5)]
# Shredded thin structures: many cuts, among them 2-token splits (sign ties), so only the
# partition is well-posed; N = 288 > 256 solves segments at all three static sizes (64, 256, N).
SHREDDED = [(1, 16, 16, 32, 0.8), (2, 12, 24, 16, 1.2), (4, 16, 20, 16, 0.8)]


@pytest.mark.parametrize(
    "seed,h,w,c,noise,exclude_zero", [case + (True,) for case in CLEAN] + [CLEAN[0] + (False,)]
)
def test_planted_matches_transcription_with_released_numbering(seed, h, w, c, noise, exclude_zero):
    features, _ = planted_token_features(seed, h, w, c, noise)
    assert_zero_rows_are_unambiguous(features, 10.0)
    cfg = NCutConfig(exclude_zero_affinity_nodes=exclude_zero)
    result = recursive_ncut(jnp.asarray(features), cfg)
    ref = reference_recursive_ncut(
        reference_affinity(features, cfg.alpha), cfg.tau, exclude_zero_affinity_nodes=exclude_zero
    )
    assert ref.numbering_is_well_posed and ref.partition_is_well_posed
    chex.assert_shape(result.labels, (h, w))
    chex.assert_type(result.labels, jnp.int32)
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), ref.labels)
    assert int(result.num_segments) == int(result.num_labels) == ref.num_cuts + 1
    assert int(result.num_eigensolves) == 2 * int(result.num_segments) - 1
    assert not bool(result.truncated)


@pytest.mark.parametrize("seed,h,w,c,noise", SHREDDED)
def test_shredded_planted_partition_matches_transcription(seed, h, w, c, noise):
    features, _ = planted_token_features(seed, h, w, c, noise)
    assert_zero_rows_are_unambiguous(features, 10.0)
    result = recursive_ncut(jnp.asarray(features), NCutConfig())
    ref = reference_recursive_ncut(reference_affinity(features, 10.0), 0.5)
    assert ref.partition_is_well_posed
    np.testing.assert_array_equal(partition(result.labels), partition(ref.labels))
    assert int(result.num_segments) == ref.num_cuts + 1


def test_zero_affinity_quirk_and_its_correction_match_transcription():
    # The least-similar pair (min-max value 0) is dropped from every cut below the root by the
    # released code: here it changes the partition (35 vs 36 segments).
    features, _ = planted_token_features(2, 12, 24, 16, 1.2)
    assert_zero_rows_are_unambiguous(features, 10.0)
    w = reference_affinity(features, 10.0)
    partitions = {}
    for exclude_zero in (True, False):
        result = recursive_ncut(
            jnp.asarray(features), NCutConfig(exclude_zero_affinity_nodes=exclude_zero)
        )
        ref = reference_recursive_ncut(w, 0.5, exclude_zero_affinity_nodes=exclude_zero)
        assert ref.partition_is_well_posed
        np.testing.assert_array_equal(partition(result.labels), partition(ref.labels))
        partitions[exclude_zero] = partition(ref.labels)
    assert not np.array_equal(partitions[True], partitions[False]), "the case must tell them apart"


def test_many_cuts_numbering_and_float32_code_collisions():
    # 44 cuts: the released float32 codes collide, merging segments (45 -> 43 labels).
    features = many_regions_features(6, 16, 16, 32)
    assert_zero_rows_are_unambiguous(features, 10.0)
    w = reference_affinity(features, 10.0)
    ref = reference_recursive_ncut(w, 0.5)
    assert ref.partition_is_well_posed and ref.numbering_is_well_posed
    assert ref.num_cuts == 44
    exact = recursive_ncut(jnp.asarray(features), NCutConfig())
    np.testing.assert_array_equal(np.asarray(exact.labels).ravel(), ref.labels)
    assert int(exact.num_segments) == int(exact.num_labels) == 45

    merged = reference_recursive_ncut(w, 0.5, codes="float32").labels
    released = recursive_ncut(jnp.asarray(features), NCutConfig(segment_codes="float32"))
    np.testing.assert_array_equal(np.asarray(released.labels).ravel(), merged)
    assert int(released.num_segments) == 45
    assert int(released.num_labels) == len(np.unique(merged)) == 43
    # Collisions only merge segments: every float32 label is a union of exact segments.
    pairs = set(zip(np.asarray(exact.labels).ravel().tolist(), merged.tolist()))
    assert len(pairs) == 45


def _random_tree(rng, n: int, max_splits: int):
    """A recursion tree in visiting (breadth-first) slot order, as recursive_ncut builds it."""
    node = np.zeros(n, np.int64)
    pos_child = np.full(2 * n - 1, -1, np.int64)
    head, tail = 0, 1
    while head < tail and (tail + 1) // 2 <= max_splits:
        members = np.flatnonzero(node == head)
        if len(members) >= 2 and rng.random() < 0.9:
            side = rng.random(len(members)) < rng.uniform(0.2, 0.8)
            if side.all() or not side.any():  # both sides non-empty
                side[0] = not side[0]
            node[members[side]], node[members[~side]] = tail + 1, tail
            pos_child[head] = tail + 1
            tail += 2
        head += 1
    return node, pos_child, tail


def _tree_sides(node: np.ndarray, pos_child: np.ndarray) -> list[np.ndarray]:
    """The {y > t} sides of the splits in the released depth-first order."""
    sides = []

    def tokens(s):
        if pos_child[s] < 0:
            return node == s
        return tokens(pos_child[s]) | tokens(pos_child[s] - 1)

    def visit(s):
        if pos_child[s] >= 0:
            sides.append(tokens(pos_child[s]))
            visit(pos_child[s])
            visit(pos_child[s] - 1)

    visit(0)
    return sides


@pytest.mark.parametrize("codes", ["exact", "float32"])
def test_segment_numbering_replays_the_released_cluster_assembly(codes):
    # Trees of 0-300 cuts: no collision, collisions (from ~40 cuts), overflow (one segment).
    rng = np.random.default_rng(0)
    number = jax.jit(released_segment_labels, static_argnums=3)
    n = 320  # one shape: one compilation
    merged = single = False
    for max_splits in (0, 1, 5, 20, 45, 80, 150, 250, 319):
        node, pos_child, num_nodes = _random_tree(rng, n, max_splits)
        want = release_numbering(_tree_sides(node, pos_child), n, codes)
        got = number(jnp.asarray(node, jnp.int32), jnp.asarray(pos_child, jnp.int32),
                     jnp.int32(num_nodes), codes)
        np.testing.assert_array_equal(np.asarray(got), want)
        leaves = (num_nodes + 1) // 2
        merged |= len(np.unique(want)) < leaves
        single |= leaves > 1 and len(np.unique(want)) == 1
    # Exact codes never merge; the float32 replay meets both failure modes among these trees.
    assert (merged, single) == ((False, False) if codes == "exact" else (True, True))


def test_numbering_small_trees_by_hand():
    # Root -> {y > t} P, {y <= t} N; P -> PP, PN. Released codes: N 0, PN 1, PP 1 + 2 = 3.
    node = jnp.array([1, 3, 4, 4], jnp.int32)  # token 0 in N, 1 in PN, 2-3 in PP
    pos_child = jnp.array([2, -1, 4, -1, -1, -1, -1], jnp.int32)
    np.testing.assert_array_equal(released_segment_labels(node, pos_child, 5), [0, 1, 2, 2])
    # Root -> P, N; N -> NP, NN. Codes: NN 0, P 1, NP 2.
    node = jnp.array([2, 3, 4], jnp.int32)
    pos_child = jnp.array([2, 4, -1, -1, -1], jnp.int32)
    np.testing.assert_array_equal(released_segment_labels(node, pos_child, 5), [1, 0, 2])


@pytest.mark.parametrize("seed", [0, 1])
def test_root_bipartition_matches_transcription(seed):
    features, _ = planted_token_features(seed, 12, 12, 16, 0.8)
    w = _affinity_f32(features, 10.0)
    assert_split_is_well_posed(w.astype(np.float64))
    side, value, y, _ = reference_split(w.astype(np.float64))
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
    sub = w[np.ix_(active, active)].astype(np.float64)
    assert_split_is_well_posed(sub)
    side, value, _, _ = reference_split(sub)
    cut = jax.jit(best_bipartition, static_argnames="eigensolver")(
        jnp.asarray(w), jnp.asarray(active), eigensolver=eigensolver
    )
    np.testing.assert_array_equal(np.asarray(cut.side)[active], side)
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
    features, _ = planted_token_features(0, 16, 16, 32, 0.5)
    cfg = NCutConfig(max_segments=2)
    w = reference_affinity(features, cfg.alpha)
    assert_split_is_well_posed(w)
    result = recursive_ncut(jnp.asarray(features), cfg)
    assert int(result.num_segments) == 2
    assert bool(result.truncated)
    # Two segments = the root split of the transcription, {y > t} numbered 1 (code 1).
    side, _, _, _ = reference_split(w)
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), side.astype(int))


@pytest.mark.parametrize("seed,noise", [(1, 0.8), (0, 0.5)])
def test_lobpcg_solver_agrees_with_eigh_on_planted_features(seed, noise):
    features, _ = planted_token_features(seed, 16, 16, 32, noise)
    assert_zero_rows_are_unambiguous(features, 10.0)
    assert reference_recursive_ncut(reference_affinity(features, 10.0), 0.5).partition_is_well_posed
    exact = recursive_ncut(jnp.asarray(features), NCutConfig())
    fast = recursive_ncut(jnp.asarray(features), NCutConfig(eigensolver="lobpcg"))
    np.testing.assert_array_equal(partition(fast.labels), partition(exact.labels))


def test_batch_is_map_of_single():
    batch = np.stack([planted_token_features(s, 16, 16, 32, 0.5)[0] for s in (0, 1)])
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
    # The cuts do not depend on tau, so a looser tau accepts a superset of the splits.
    assert counts[1] >= counts[0]


def test_larger_tau_gives_finer_partitions():
    features, _ = planted_token_features(2, 16, 16, 32, 0.8)
    counts = [int(recursive_ncut(jnp.asarray(features), NCutConfig(tau=t)).num_segments)
              for t in (0.2, 0.35, 0.5)]
    assert counts == sorted(counts)


@pytest.mark.parametrize("seed", [0, 3])
def test_low_noise_planted_regions_are_recovered_exactly_by_the_correction(seed):
    features, layout = planted_token_features(seed, 16, 16, 32, 0.3)
    result = recursive_ncut(jnp.asarray(features), NCutConfig(exclude_zero_affinity_nodes=False))
    # Same partition as the planted layout: a bijection between label ids and region ids.
    np.testing.assert_array_equal(partition(result.labels), partition(layout))
    assert int(result.num_segments) == len(np.unique(layout))


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
    with pytest.raises(ValueError, match="segment_codes must be 'exact' or 'float32'"):
        NCutConfig(segment_codes="float16")
    with pytest.raises(ValueError, match="lobpcg"):
        recursive_ncut(jnp.zeros((4, 4, 8)), NCutConfig(eigensolver="lobpcg"))
    with pytest.raises(ValueError, match="tau"):
        NCutConfig(tau=-1.0).check_values()


@pytest.mark.slow
@pytest.mark.parametrize("eigensolver", ["eigh", "lobpcg"])
def test_full_size_32x32_matches_transcription(eigensolver):
    # DiffCut's token grid for a 1024 input, with SSD-1B's channel count.
    features, _ = planted_token_features(5, 32, 32, 1280, 0.8)
    assert_zero_rows_are_unambiguous(features, 10.0)
    cfg = NCutConfig(eigensolver=eigensolver)
    result = recursive_ncut(jnp.asarray(features), cfg)
    ref = reference_recursive_ncut(reference_affinity(features, cfg.alpha), cfg.tau)
    assert ref.partition_is_well_posed
    np.testing.assert_array_equal(partition(result.labels), partition(ref.labels))
    assert not bool(result.truncated)
