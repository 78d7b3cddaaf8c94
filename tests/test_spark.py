"""segment_tokens: SPARK end to end at token resolution (Eq. 1-12)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig, check_features, segment_tokens, segment_tokens_batch
from spark_jax.testing import numpy_reference as ref
from spark_jax.testing.synthetic import planted_layout, planted_miou, planted_token_features

# Settings suited to clean planted features (reference-facts section 8): the paper's r = 2.6 on
# the raw cosine over-segments them, a sharpened global affinity and milder inflation do not.
PLANTED = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.8)


def _oracle(features, cfg):
    return ref.segment_tokens(
        features, beta=cfg.beta, inflation=cfg.inflation, sharpen=cfg.sharpen, mode=cfg.global_mode,
        negatives=cfg.negatives, use_local=cfg.use_local, eps=cfg.local_eps, gamma=cfg.gamma,
        mcl_norm=cfg.mcl_norm, method="closed_form",
    )


def _assert_well_posed(features, cfg, rel=1e-5, draws=3):
    """Precondition of every exact comparison of clusters and labels: the float64 oracle's partition
    is unchanged when the features move by `rel` (over 100x float32 rounding). MCL amplifies small
    differences near a bifurcation of its trajectory, which the final attractors (margin ~1 once
    converged) do not show; such inputs are not compared."""
    labels, info = _oracle(features, cfg)
    rng = np.random.default_rng(0)
    for _ in range(draws):
        moved, moved_info = _oracle(features * (1 + rel * rng.standard_normal(features.shape)), cfg)
        np.testing.assert_array_equal(moved_info["cluster_labels"], info["cluster_labels"])
        np.testing.assert_array_equal(moved, labels)


def test_planted_layout_has_unequal_regions_and_a_thin_line():
    layout = planted_layout(32, 32)
    sizes = np.bincount(layout.ravel(), minlength=5)
    assert sizes[0] > 600 and sizes[4] == 9 and np.all(sizes > 0)
    line = layout == 3
    assert line.sum(axis=1).max() == 1  # one token wide


@pytest.mark.parametrize("seed, noise, inflation", [(0, 0.2, 1.8), (1, 0.5, 1.8), (2, 0.8, 1.3)])
def test_recovers_planted_regions(seed, noise, inflation):
    # More noise needs milder inflation (see the behaviour map in WORKSPACE.md).
    features, gt = planted_token_features(seed, 32, 32, 64, noise=noise)
    result = segment_tokens(features, PLANTED.replace(inflation=inflation))
    assert planted_miou(result.labels, gt) >= 0.95
    assert bool(result.mcl_converged)
    assert int(result.num_segments) == 5


def test_papers_defaults_over_segment_clean_planted_features():
    # Documented behaviour (reference-facts section 8), pinned so a change of it is noticed.
    features, _ = planted_token_features(0, 32, 32, 64, noise=0.3)
    result = segment_tokens(features, SparkConfig())
    assert int(result.num_clusters) > 50


@pytest.mark.parametrize(
    "cfg",
    [
        SparkConfig(),
        PLANTED,
        SparkConfig(use_local=False, sharpen=4.0, inflation=2.0),
        SparkConfig(global_mode="inner", negatives="minmax", sharpen=10.0, beta=0.7, inflation=2.0),
        PLANTED.replace(mcl_norm="max_abs"),
    ],
)
def test_matches_the_numpy_transcription_end_to_end(cfg):
    features, _ = planted_token_features(3, 12, 12, 16, noise=0.4)
    _assert_well_posed(features, cfg)
    got = segment_tokens(features, cfg)
    want, info = _oracle(features, cfg)
    top = np.sort(info["soft_labels"], axis=1)[:, -2:]
    assert (top[:, 1] - top[:, 0]).min() > 1e-3  # no label of Eq. 12 is near an argmax tie
    assert int(got.num_clusters) == info["num_clusters"]
    # +-1: float32 can move a change that lies close to mcl_tol across it.
    assert abs(int(got.mcl_iterations) - info["mcl_iterations"]) <= 1
    np.testing.assert_array_equal(got.cluster_labels, info["cluster_labels"])
    np.testing.assert_array_equal(got.labels, want)
    np.testing.assert_allclose(got.soft_labels[..., : info["num_clusters"]].reshape(144, -1), info["soft_labels"], atol=1e-4)


def test_shapes_and_dtypes():
    features, _ = planted_token_features(0, 8, 10, 16)
    result = segment_tokens(features, SparkConfig(max_clusters=16))
    chex.assert_shape([result.labels, result.cluster_labels], (8, 10))
    chex.assert_shape(result.soft_labels, (8, 10, 16))
    chex.assert_type([result.labels, result.cluster_labels, result.num_clusters], jnp.int32)
    chex.assert_type(result.soft_labels, jnp.float32)
    assert 0 <= int(result.labels.min()) and int(result.labels.max()) < 16


def test_bounded_label_columns_match_the_exact_result_when_clusters_fit():
    features, _ = planted_token_features(1, 16, 16, 32, noise=0.3)
    _assert_well_posed(features, PLANTED)
    exact = segment_tokens(features, PLANTED)
    bounded = segment_tokens(features, PLANTED.replace(max_clusters=8))
    assert int(exact.num_clusters) <= 8
    np.testing.assert_array_equal(exact.labels, bounded.labels)


def test_bounded_label_columns_with_more_clusters_label_every_token():
    features, _ = planted_token_features(0, 16, 16, 32, noise=0.3)
    result = segment_tokens(features, SparkConfig(max_clusters=4))  # paper defaults: many clusters
    assert int(result.num_clusters) > 4
    assert int(result.labels.max()) < 4 and int(result.num_segments) <= 4


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_batch_gives_the_per_image_results(chunk_size):
    batch = np.stack([planted_token_features(s, 16, 16, 32, noise=0.4)[0] for s in range(3)])
    if chunk_size is None:  # once is enough
        for features in batch:
            _assert_well_posed(features, PLANTED)
    batched = segment_tokens_batch(batch, PLANTED, chunk_size=chunk_size)
    chex.assert_shape(batched.labels, (3, 16, 16))
    for i in range(3):
        single = segment_tokens(batch[i], PLANTED)
        np.testing.assert_array_equal(batched.labels[i], single.labels)
        np.testing.assert_array_equal(batched.cluster_labels[i], single.cluster_labels)
        assert int(batched.mcl_iterations[i]) == int(single.mcl_iterations)
        np.testing.assert_allclose(batched.soft_labels[i], single.soft_labels, atol=1e-6)


def test_deterministic():
    features, _ = planted_token_features(5, 16, 16, 32, noise=0.6)
    first = segment_tokens(features, SparkConfig())
    second = segment_tokens(features, SparkConfig())
    chex.assert_trees_all_equal(first, second)


def test_numeric_hyperparameters_do_not_recompile(compilations):
    features, _ = planted_token_features(0, 8, 8, 16)
    segment_tokens(features, SparkConfig(inflation=1.5, beta=0.2))
    with compilations() as c:
        for r, beta in [(2.6, 0.6), (3.0, 1.0)]:
            segment_tokens(features, SparkConfig(inflation=r, beta=beta))
    assert c.count == 0
    with compilations() as c:
        segment_tokens(features, SparkConfig(mcl_norm="max_abs"))  # a static field: a new program
    assert c.count >= 1


def test_vmaps_over_a_hyperparameter_grid():
    features, _ = planted_token_features(0, 8, 8, 16, noise=0.5)
    for r in (1.5, 2.6):
        _assert_well_posed(features, SparkConfig(inflation=r))
    rs = jnp.array([1.5, 2.6])
    axes = jax.tree_util.tree_map(lambda _: None, SparkConfig()).replace(inflation=0)
    grid = jax.vmap(segment_tokens, in_axes=(None, axes))(features, SparkConfig(inflation=rs))
    for i, r in enumerate([1.5, 2.6]):
        single = segment_tokens(features, SparkConfig(inflation=r))
        np.testing.assert_array_equal(grid.cluster_labels[i], single.cluster_labels)


# Degenerate inputs: always labels in range, never NaN.


def _assert_well_formed(result, h, w):
    labels = np.asarray(result.labels)
    assert labels.shape == (h, w)
    assert labels.min() >= 0 and labels.max() < h * w
    assert np.all(np.isfinite(result.soft_labels))
    assert 1 <= int(result.num_segments) <= int(result.num_clusters)


def test_constant_features_form_one_segment_with_global_affinity_only():
    result = segment_tokens(np.ones((8, 8, 4), np.float32), SparkConfig(use_local=False))
    _assert_well_formed(result, 8, 8)
    assert int(result.num_segments) == 1 and bool(result.mcl_converged)


def test_constant_features_with_the_local_graph_split_into_grid_quadrants():
    # Documented behaviour: with nothing to tell tokens apart, the grid graph's borders (fewer
    # neighbours) break the symmetry and MCL settles on compact blocks, never noise: on 8 x 8,
    # the four quadrants, as the float64 oracle finds (stably: a well-posed comparison).
    features = np.ones((8, 8, 4), np.float32)
    _assert_well_posed(features, SparkConfig())
    result = segment_tokens(features, SparkConfig())
    _assert_well_formed(result, 8, 8)
    assert bool(result.mcl_converged)
    quadrants = np.kron(np.arange(4).reshape(2, 2), np.ones((4, 4), int))
    np.testing.assert_array_equal(result.cluster_labels, quadrants)
    np.testing.assert_array_equal(result.cluster_labels, _oracle(features, SparkConfig())[1]["cluster_labels"])


@pytest.mark.parametrize("mode", ["cosine", "inner"])
def test_all_zero_features_are_well_formed(mode):
    result = segment_tokens(np.zeros((6, 6, 4), np.float32), SparkConfig(global_mode=mode))
    _assert_well_formed(result, 6, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_tokens_are_counted_and_segmented_as_zero_vectors(bad):
    features, _ = planted_token_features(0, 8, 8, 16)
    features[2, 3, 1] = bad
    features[5, 5, :] = bad
    result = segment_tokens(features, SparkConfig())
    _assert_well_formed(result, 8, 8)
    assert int(result.num_nonfinite_tokens) == 2
    with pytest.raises(ValueError, match=r"NaN/Inf in 2 of 64 tokens \(first at index \(2, 3\)\)"):
        check_features(features)


def test_check_features_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[h, w, C\]"):
        check_features(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="empty"):
        check_features(np.zeros((0, 4, 3)))
    check_features(np.zeros((2, 4, 4, 3)))


def test_huge_inner_product_features_stay_finite():
    features, _ = planted_token_features(0, 6, 6, 8)
    result = segment_tokens(features * 1e30, SparkConfig(global_mode="inner"))
    _assert_well_formed(result, 6, 6)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1)])
def test_tiny_grids(shape):
    features = np.random.default_rng(0).standard_normal((*shape, 5)).astype(np.float32)
    result = segment_tokens(features, SparkConfig())
    _assert_well_formed(result, *shape)
    if shape == (1, 1):
        assert int(result.labels[0, 0]) == 0 and int(result.num_clusters) == 1


def test_bfloat16_features_are_accepted():
    features, gt = planted_token_features(0, 16, 16, 32, noise=0.2)
    result = segment_tokens(jnp.asarray(features, jnp.bfloat16), PLANTED)
    chex.assert_type(result.soft_labels, jnp.float32)
    assert planted_miou(result.labels, gt) >= 0.95


def test_planted_miou_scores_matching_not_ids():
    regions = planted_layout(16, 16)
    assert planted_miou(regions, regions) == 1.0
    assert planted_miou((regions + 3) % 5, regions) == 1.0  # permuted ids
    merged = np.where(regions == 4, 0, regions)  # the 3x3 square lost into the background
    assert 0.75 < planted_miou(merged, regions) < 0.81
