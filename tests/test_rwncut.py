"""Specification of random-walk NCut on self-attention (spark_jax.methods.rwncut) against a NumPy/SciPy
transcription, and of the shared NCut tree machinery it adds to spark_jax.graph.ncut (growing, pruning).

The transcription below follows the module docstring literally, in float64: the stationary distribution as
SciPy's left eigenvector of eigenvalue 1, W = (Pi P^k + (Pi P^k)^T) / 2 or the clipped cosine of the rows, the
recursion one segment at a time (induced subgraph, SciPy's eigh of D^-1/2 (D - W) D^-1/2, 100 thresholds in
0.99 [min y, max y], the exact NCut, breadth first), the dynamic threshold by Otsu's rule written as a loop, and
the dynamic segmentation as the recursion rerun with that threshold (not pruned).

Well-posedness (as tests/test_ncut.py): partitions are compared only on fixtures whose every visited segment's
best NCut value lies at least MARGIN away from the threshold applied, asserted first.
"""

from __future__ import annotations

from collections import deque

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spark_jax.graph.ncut import NCutConfig, cut_tree_result, grow_cut_tree, prune_cut_tree
from spark_jax.methods import REGISTRY
from spark_jax.methods.rwncut import (
    NULL_NCUT,
    RWNCutConfig,
    attention_taps,
    dynamic_threshold,
    random_walk_adjacency,
    rw_adjacency,
    rw_ncut,
    rw_ncut_batch,
    stationary_distribution,
    walk_power,
)
from spark_jax.testing.synthetic import planted_token_features

MARGIN = 1e-2


# ----------------------------------------------------------------------------------------------- fixtures
def planted_walk(seed: int, sizes, strength: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A block-structured transition matrix: softmax over j of strength [same block] + noise N(0, 1), the tokens of
    the blocks shuffled. Returns (P float32 [N, N], block labels [N])."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    logits = strength * (labels[:, None] == labels[None, :]) + noise * rng.standard_normal((len(labels),) * 2)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32), labels


def attention_of_features(seed: int, h: int, w: int, c: int, noise: float, scale: float = 4.0) -> tuple[np.ndarray,
                                                                                                          np.ndarray]:
    """Softmax attention of planted spatial regions' features (as the handcrafted backbone's pretend head)."""
    x, labels = planted_token_features(seed, h, w, c, noise)
    x = x.reshape(h * w, c).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    logits = scale * x @ x.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32), np.asarray(labels).reshape(-1)


def partition(labels) -> frozenset:
    labels = np.asarray(labels).reshape(-1)
    return frozenset(frozenset(np.flatnonzero(labels == v).tolist()) for v in np.unique(labels))


# ----------------------------------------------------------------------------------------------- transcription
def ref_stationary(p: np.ndarray) -> np.ndarray:
    values, vectors = scipy.linalg.eig(p.astype(np.float64).T)
    v = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return v / v.sum()


def ref_adjacency(p: np.ndarray, adjacency: str, k: int = 2) -> np.ndarray:
    p = p.astype(np.float64)
    if adjacency == "attention_similarity":
        x = p / np.linalg.norm(p, axis=1, keepdims=True)
        return np.maximum(x @ x.T, 0.0)
    walk = np.linalg.matrix_power(p, k) if adjacency == "power_walk" else p
    flow = ref_stationary(p)[:, None] * walk
    return (flow + flow.T) / 2


def ref_split(w: np.ndarray, members: np.ndarray, num_thresholds: int = 100, scale: float = 0.99):
    """Best cut of the segment `members` (token indices): (its {y > t} side as indices, its NCut value)."""
    if len(members) < 2:
        return None, np.inf
    ws = w[np.ix_(members, members)]
    d = ws.sum(axis=1)
    dis = 1.0 / np.sqrt(d)
    _, vectors = scipy.linalg.eigh(np.eye(len(d)) - dis[:, None] * ws * dis[None, :], subset_by_index=[0, 1])
    y = dis * vectors[:, 1]
    y = y * np.sign(y[np.argmax(np.abs(y))])
    best, best_side = np.inf, None
    for t in np.linspace(scale * y.min(), scale * y.max(), num_thresholds):
        side = y > t
        if side.all() or not side.any():
            continue
        cut = ws[side][:, ~side].sum()
        value = cut / d[side].sum() + cut / d[~side].sum()
        if value < best:
            best, best_side = value, side
    return members[best_side], best


def ref_tree(w: np.ndarray, tau: float, max_leaves: int | None = None):
    """Breadth-first recursion: (final segments as index arrays, the NCut value of every visited segment,
    the NCut values of the accepted cuts)."""
    queue, leaves, visited, accepted = deque([np.arange(len(w))]), [], [], []
    while queue and (max_leaves is None or len(leaves) + len(queue) < max_leaves):
        members = queue.popleft()
        side, value = ref_split(w, members)
        visited.append(value)
        if value < tau:
            accepted.append(value)
            queue.append(np.setdiff1d(members, side))
            queue.append(side)
        else:
            leaves.append(members)
    return leaves + list(queue), visited, accepted


def ref_otsu(values, scale: str = "linear") -> float:
    f = (lambda v: np.log(max(v, 1e-30))) if scale == "log" else (lambda v: v)
    x = sorted(f(v) for v in values) + [f(NULL_NCUT)]
    if len(x) == 1:
        return NULL_NCUT
    best, threshold = -np.inf, None
    for i in range(len(x) - 1):
        lo, hi = x[: i + 1], x[i + 1:]
        between = len(lo) * len(hi) * (np.mean(lo) - np.mean(hi)) ** 2
        if between > best:
            best, threshold = between, (x[i] + x[i + 1]) / 2
    return float(np.exp(threshold)) if scale == "log" else threshold


def ref_rwncut(p: np.ndarray, cfg: RWNCutConfig):
    """(final segments, the threshold applied, every visited NCut value of the final recursion)."""
    w = ref_adjacency(p, cfg.adjacency, cfg.walk_steps)
    if cfg.stopping == "constant":
        leaves, visited, _ = ref_tree(w, cfg.tau, cfg.max_segments)
        return leaves, cfg.tau, visited
    _, grown, accepted = ref_tree(w, NULL_NCUT, cfg.dynamic_max_segments)
    tau = ref_otsu(accepted, cfg.dynamic_scale)
    leaves, visited, _ = ref_tree(w, tau)  # rerun, not pruned
    return leaves, tau, visited


def ref_labels(leaves, n: int) -> np.ndarray:
    labels = np.zeros(n, int)
    for k, members in enumerate(leaves):
        labels[members] = k
    return labels


# ----------------------------------------------------------------------------------------------- the adjacencies
@pytest.mark.parametrize("method,iterations,atol", [("power", 200, 1e-6), ("solve", 1, 1e-6)])
def test_stationary_distribution_matches_scipy(method, iterations, atol):
    p, _ = planted_walk(0, (40, 30, 26), 2.0, 1.0)
    pi, residual = stationary_distribution(jnp.asarray(p), method, iterations)
    np.testing.assert_allclose(np.asarray(pi), ref_stationary(p), atol=atol)
    assert float(jnp.sum(pi)) == pytest.approx(1.0, abs=1e-5) and float(residual) < 1e-5


def test_stationary_residual_reports_an_unconverged_power_iteration():
    p, _ = planted_walk(1, (48, 48), 6.0, 0.3)  # two nearly closed classes: the walk mixes slowly between them
    p[:48] *= 0.5 + np.linspace(0, 1, 96)[None, :]  # uneven stationary mass
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    _, few = stationary_distribution(jnp.asarray(p), "power", 1)
    _, many = stationary_distribution(jnp.asarray(p), "power", 500)
    _, exact = stationary_distribution(jnp.asarray(p), "solve")
    assert float(few) > 1e-3 and float(many) < float(few) / 100 and float(exact) < 1e-5


@pytest.mark.parametrize("adjacency,k", [("random_walk", 1), ("power_walk", 2), ("power_walk", 3),
                                         ("power_walk", 5), ("attention_similarity", 1)])
def test_adjacencies_match_transcription(adjacency, k):
    p, _ = planted_walk(2, (30, 20, 14), 2.0, 1.0)
    cfg = RWNCutConfig(adjacency=adjacency, walk_steps=k, stationary_iterations=300)
    w, _ = rw_adjacency(jnp.asarray(p), cfg)
    ref = ref_adjacency(p, adjacency, k)
    np.testing.assert_allclose(np.asarray(w), ref, rtol=2e-4, atol=1e-9)
    chex.assert_trees_all_close(np.asarray(w), np.asarray(w).T)


def test_walk_power_is_the_matrix_power():
    p, _ = planted_walk(3, (20, 12), 1.0, 1.0)
    for k in (1, 2, 3, 4, 7, 8):
        np.testing.assert_allclose(np.asarray(walk_power(jnp.asarray(p), k)), np.linalg.matrix_power(
            p.astype(np.float64), k), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="walk_steps"):
        walk_power(jnp.asarray(p), 0)


def test_random_walk_ncut_is_meila_shis_transition_probability():
    """Degrees of W are pi, and NCut_W(A, B) = P(A -> B | A) + P(B -> A | B) for the walk P at stationarity."""
    p, _ = planted_walk(4, (30, 34), 1.5, 1.0)
    pi = ref_stationary(p)
    w = np.asarray(random_walk_adjacency(jnp.asarray(p), jnp.asarray(pi, jnp.float32)), np.float64)
    np.testing.assert_allclose(w.sum(axis=1), pi, rtol=1e-5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random(len(p)) < 0.4
        cut = w[a][:, ~a].sum()
        ncut = cut / w[a].sum() + cut / w[~a].sum()
        leave_a = (pi[a, None] * p[a][:, ~a]).sum() / pi[a].sum()
        leave_b = (pi[~a, None] * p[~a][:, a]).sum() / pi[~a].sum()
        assert ncut == pytest.approx(leave_a + leave_b, rel=1e-4)


# ----------------------------------------------------------------------------------------------- the tree machinery
def test_pruning_a_grown_tree_is_the_recursion_rerun_with_the_lower_threshold():
    p, _ = attention_of_features(0, 12, 12, 16, 0.6)
    w, _ = rw_adjacency(jnp.asarray(p), RWNCutConfig())
    cfg = NCutConfig(exclude_zero_affinity_nodes=False)
    grow = jax.jit(grow_cut_tree, static_argnums=1)  # tau traced: one program, the same arithmetic
    grown = grow(w, cfg, 1.0)
    assert int(jnp.sum(grown.pos_child >= 0)) >= 8
    for tau in (0.05, 0.3, 0.6, 0.9, 1.0):
        pruned, truncated = prune_cut_tree(grown, tau)
        direct = cut_tree_result(grow(w, cfg, tau), cfg)
        got = cut_tree_result(pruned, cfg, truncated=truncated)
        np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(direct.labels))  # numbering included
        assert int(got.num_segments) == int(direct.num_segments)
        assert not bool(truncated)
        # The grown tree stopped at one token per segment, leaving single-token leaves unvisited; the direct run
        # visits them (an eigensolve that can't cut) unless it stops there too.
        leaves = np.unique(np.asarray(pruned.node))
        unvisited = int(np.sum(leaves >= int(grown.num_visited)))
        expected = int(pruned.num_visited) + (unvisited if int(direct.num_segments) < len(p) else 0)
        assert int(direct.num_eigensolves) == expected


def test_pruning_a_truncated_tree_says_so():
    p, _ = attention_of_features(1, 12, 12, 16, 0.6)
    w, _ = rw_adjacency(jnp.asarray(p), RWNCutConfig())
    grown = grow_cut_tree(w, NCutConfig(max_segments=4, exclude_zero_affinity_nodes=False), 1.0)
    _, truncated = prune_cut_tree(grown, 1.0)
    _, coarse = prune_cut_tree(grown, float(grown.ncut[0]) * 0.999)  # the root stays whole: nothing unvisited
    assert bool(truncated) and not bool(coarse)


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_dynamic_threshold_is_otsus_split_with_the_null_anchor(scale):
    rng = np.random.default_rng(5)
    for m in (0, 1, 2, 5, 20):
        values = np.concatenate([rng.uniform(0.0, 0.1, m // 3), rng.uniform(0.5, 1.0, m - m // 3)])
        slots = np.full(2 * 24 - 1, np.inf, np.float32)
        where = rng.choice(len(slots), m, replace=False)
        slots[where] = values
        accepted = np.zeros(len(slots), bool)
        accepted[where] = True
        got = float(dynamic_threshold(jnp.asarray(slots), jnp.asarray(accepted), scale))
        assert got == pytest.approx(ref_otsu(values.astype(np.float32).tolist(), scale), rel=1e-5)
    assert float(dynamic_threshold(jnp.asarray([0.0, 0.6, np.inf]), jnp.asarray([True, True, False]), "log")) < 1e-3


# ----------------------------------------------------------------------------------------------- the method
CONFIGS = {
    "random_walk/constant": RWNCutConfig(stopping="constant"),
    "random_walk/dynamic": RWNCutConfig(),
    "random_walk/dynamic-log": RWNCutConfig(dynamic_scale="log"),
    "power_walk/dynamic": RWNCutConfig(adjacency="power_walk"),
    "attention_similarity/constant": RWNCutConfig(adjacency="attention_similarity", stopping="constant"),
    "attention_similarity/dynamic": RWNCutConfig(adjacency="attention_similarity"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sizes", [(96,), (60, 36), (40, 26, 18, 12)])
def test_planted_blocks_are_recovered(name, sizes):
    p, blocks = planted_walk(7, sizes, 4.0, 0.5)
    cfg = CONFIGS[name].replace(stationary_iterations=300)
    res = rw_ncut(jnp.asarray(p), cfg)
    assert partition(res.labels) == partition(blocks)
    assert int(res.num_segments) == len(sizes) and not bool(res.truncated)


@pytest.mark.parametrize("name", ["random_walk/constant", "random_walk/dynamic", "power_walk/dynamic",
                                  "attention_similarity/dynamic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_transcription_on_planted_regions(name, seed):
    p, _ = attention_of_features(seed, 12, 12, 16, 0.6)
    cfg = CONFIGS[name].replace(stationary_iterations=300, dynamic_max_segments=16)
    leaves, tau, visited = ref_rwncut(p, cfg)
    assert min(abs(v - tau) for v in visited) > MARGIN, "fixture not well-posed: a cut lies at the threshold"
    res = rw_ncut(jnp.asarray(p), cfg)
    assert float(res.threshold) == pytest.approx(tau, rel=1e-3)
    assert partition(res.labels) == partition(ref_labels(leaves, len(p)))
    assert int(res.num_segments) == len(leaves) >= 2


def test_one_block_stays_whole_under_the_dynamic_rule():
    p, _ = planted_walk(8, (128,), 0.0, 1.0)
    res = rw_ncut(jnp.asarray(p), RWNCutConfig())
    assert int(res.num_segments) == 1


def test_batch_is_map_of_single_and_tau_does_not_recompile():
    ps = np.stack([planted_walk(s, (40, 24), 3.0, 0.5)[0] for s in range(2)])
    cfg = RWNCutConfig(stopping="constant")
    batch = rw_ncut_batch(jnp.asarray(ps), cfg)
    for i in range(2):
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], batch), rw_ncut(jnp.asarray(ps[i]), cfg))
    before = rw_ncut._cache_size()
    rw_ncut(jnp.asarray(ps[0]), cfg.replace(tau=0.3))
    assert rw_ncut._cache_size() == before


def test_non_finite_attention_rows_are_uniform_and_counted():
    p, _ = planted_walk(9, (40, 24), 3.0, 0.5)
    p[[3, 10]] = np.nan
    res = rw_ncut(jnp.asarray(p), RWNCutConfig())
    assert int(res.num_nonfinite_tokens) == 2 and np.all(np.asarray(res.labels) >= 0)


def test_bad_settings_raise_naming_the_flag():
    with pytest.raises(ValueError, match="rwncut_adjacency"):
        RWNCutConfig(adjacency="walk")
    with pytest.raises(ValueError, match="rwncut_walk_steps"):
        RWNCutConfig(walk_steps=0)
    with pytest.raises(ValueError, match="rwncut_tau"):
        RWNCutConfig(tau=0.0).check_values()
    feature_tap = "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"
    assert attention_taps(RWNCutConfig(), feature_tap) == (feature_tap.replace(":output", ":probs_mean"), feature_tap)
    for bad in ("down_blocks.2.attentions.1.transformer_blocks.3.attn2:probs_mean",
                "down_blocks.2.attentions.1.transformer_blocks.3.attn1:q", "up_blocks.1:output"):
        with pytest.raises(ValueError, match="rwncut_attention_tap.*attn1>:probs_mean"):
            attention_taps(RWNCutConfig(attention_tap=bad), feature_tap)
    with pytest.raises(ValueError, match="rw_ncut takes a square"):
        rw_ncut(jnp.ones((4, 5)), RWNCutConfig())


# ----------------------------------------------------------------------------------------------- end to end
def test_end_to_end_on_the_demo(tmp_path):
    from spark_jax.runner import RunConfig, run

    assert REGISTRY["rwncut"].default() == RWNCutConfig()
    cfg = RunConfig(dataset="demo", method="rwncut", backbone="handcrafted", resolution=64, mask_size=32,
                    batch_size=2, demo_images=3, demo_photos=False, num_overlays=0, pamr=False,
                    output_dir=str(tmp_path / "run"))
    m = run(cfg, quiet=True)
    assert m["method"] == "rwncut" and m["num_images_scored"] == 3
    d = m["diagnostics_mean"]
    assert set(d) == set(REGISTRY["rwncut"].diagnostics)
    assert 1 <= d["num_segments"] <= 64 and 0 < d["threshold"] < 1 and d["stationary_residual"] < 1e-2
    assert m["config"]["run"]["method_config"]["stopping"] == "dynamic"


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    from test_backbone_helpers import build_tiny_pipeline

    base = tmp_path_factory.getbasetemp()
    return lambda kind: build_tiny_pipeline(base / f"tiny_{kind}", kind)  # built on first use, then reused


@pytest.mark.parametrize("kind", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_end_to_end_on_tiny_checkpoints(tiny_pipelines, tmp_path, tmp_path_factory, monkeypatch, kind):
    """Through ``run`` on a tiny random-weight checkpoint in the diffusers layout: the feature point's attn1
    probabilities are the transition matrix, and the backbone is loaded with exactly the taps rwncut reads."""
    from spark_jax.runner import RunConfig, resolve_backbone, run

    monkeypatch.setenv("SPARK_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "spark_jax_cache_rwncut"))
    cfg = RunConfig(dataset="demo", method="rwncut", backbone="ssd1b", checkpoint=str(tiny_pipelines(kind)),
                    resolution=128, mask_size=32, demo_images=2, demo_photos=False, num_overlays=0, batch_size=2,
                    pamr=False, output_dir=str(tmp_path / "run"))
    resolved = resolve_backbone(cfg)
    bb = resolved.backbone
    attn = bb.feature_tap.rsplit(":", 1)[0]
    assert set(bb.cfg.taps) == {bb.feature_tap, f"{attn}:probs_mean"}
    m = run(cfg, backbone=resolved, quiet=True)
    assert m["num_images_scored"] == 2 and m["diagnostics_mean"]["num_segments"] >= 1
    assert m["diagnostics_mean"]["stationary_residual"] < 1e-2
