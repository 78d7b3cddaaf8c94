"""segment: images -> backbone -> SPARK -> masks -> PAMR, with the paper's ablation switches.

Compiling the pipeline takes seconds, so the tests share shapes and static settings (IMAGES, CFG)
wherever the behaviour under test allows: jit caches are per process.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
from spark_jax.pipeline import PipelineConfig, segment, segment_features
from spark_jax.data.preprocess import prepare_image
from spark_jax.masks.resample import resize_bilinear

BACKBONE = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))  # 8x8 tokens
SPARK = SparkConfig(max_clusters=16)
CFG = PipelineConfig(spark=SPARK, mask_size=(16, 16))

_refine_jit = jax.jit(refine_labels, static_argnums=(2, 3))


def _images(batch=2, h=50, w=70, seed=0):
    """Two-colour images (left/right halves) with noise: a clear two-region structure."""
    rng = np.random.default_rng(seed)
    images = np.zeros((batch, h, w, 3), np.float32)
    images[:, :, : w // 2] = [0.9, 0.1, 0.1]
    images[:, :, w // 2 :] = [0.1, 0.2, 0.9]
    images += rng.normal(0, 0.03, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


IMAGES = _images()
NOISE = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)


def _exact_pamr(images, coarse, num_labels, pamr_cfg):
    """PAMR with one mask per label column, image by image: what the default capacity must equal."""
    small = resize_bilinear(prepare_image(images, BACKBONE.resolution), *coarse.shape[1:])
    return np.stack([_refine_jit(small[i], coarse[i], num_labels, pamr_cfg) for i in range(len(images))])


def test_segment_shapes_ranges_and_the_colour_edge():
    out = segment(IMAGES, BACKBONE, PipelineConfig(spark=SPARK, mask_size=(32, 24)))
    chex.assert_shape([out.labels, out.coarse_labels], (2, 32, 24))
    chex.assert_type([out.labels, out.coarse_labels], jnp.int32)
    chex.assert_shape(out.tokens.labels, (2, 8, 8))
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 16
    assert not bool(jnp.any(out.pamr_overflow))
    for labels in np.asarray(out.labels):
        left, right = labels[:, :9], labels[:, 15:]
        assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1
        assert left[0, 0] != right[0, 0]


def test_pamr_off_returns_the_upsampled_labels():
    out = segment(IMAGES, BACKBONE, PipelineConfig(spark=SPARK, mask_size=(16, 16), pamr=None))
    np.testing.assert_array_equal(out.labels, out.coarse_labels)


def test_pamr_refines_the_upsampled_labels_with_their_own_ids():
    out = segment(IMAGES, BACKBONE, CFG)
    np.testing.assert_array_equal(out.labels, _exact_pamr(IMAGES, out.coarse_labels, 16, CFG.pamr))


def test_default_pamr_capacity_is_sized_from_the_data_and_never_drops_a_segment():
    # The paper's defaults on noise images: many segments of the 64 label columns (8 x 8 tokens).
    cfg = PipelineConfig(spark=SparkConfig(), mask_size=(16, 16))
    out = segment(NOISE, BACKBONE, cfg)
    counts = [len(np.unique(np.asarray(c))) for c in out.coarse_labels]
    assert label_capacity(max(counts)) < 64  # the data-sized capacity is below one slot per column
    assert not bool(jnp.any(out.pamr_overflow))
    np.testing.assert_array_equal(out.labels, _exact_pamr(NOISE, out.coarse_labels, 64, cfg.pamr))
    # segment_features, one program, gives PAMR every label column: the same masks.
    prepared = prepare_image(NOISE, BACKBONE.resolution)
    whole = segment_features(BACKBONE.extract_features_prepared(prepared), prepared, cfg)
    np.testing.assert_array_equal(whole.labels, out.labels)


def test_a_fixed_capacity_flags_overflow_and_keeps_the_largest_segments():
    cfg = PipelineConfig(spark=SparkConfig(), mask_size=(16, 16), pamr_max_labels=2)
    out = segment(NOISE, BACKBONE, cfg)
    for coarse, labels, overflow in zip(out.coarse_labels, out.labels, out.pamr_overflow):
        ids, sizes = np.unique(np.asarray(coarse), return_counts=True)
        assert bool(overflow) == (len(ids) > 2)
        largest = set(ids[np.argsort(-sizes, kind="stable")[:2]])
        assert set(np.unique(np.asarray(labels))) <= largest
    assert bool(jnp.any(out.pamr_overflow))


@pytest.mark.parametrize("upsampling", ["soft_labels", "concept"])
@pytest.mark.parametrize("use_local", [True, False])
def test_ablation_switches_run(upsampling, use_local):
    cfg = PipelineConfig(spark=SPARK.replace(use_local=use_local), upsampling=upsampling, mask_size=(16, 16))
    out = segment(IMAGES, BACKBONE, cfg)
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 16


def test_batch_equals_single():
    both = segment(IMAGES, BACKBONE, CFG)
    one = segment(IMAGES[1:], BACKBONE, CFG)
    np.testing.assert_array_equal(both.labels[1], one.labels[0])


def test_numeric_hyperparameters_do_not_recompile_the_pipeline(compilations):
    prepared = prepare_image(IMAGES, BACKBONE.resolution)
    features = BACKBONE.extract_features_prepared(prepared)

    def cfg(r, beta):
        return PipelineConfig(spark=SPARK.replace(inflation=r, beta=beta), mask_size=(16, 16))

    segment_features(features, prepared, cfg(1.5, 0.3))
    with compilations() as c:
        segment_features(features, prepared, cfg(2.6, 0.6))
        segment_features(features, prepared, cfg(3.0, 0.9))
    assert c.count == 0
    segment(IMAGES, BACKBONE, cfg(1.5, 0.3))
    with compilations() as c:
        segment(IMAGES, BACKBONE, cfg(2.6, 0.6))
    assert c.count == 0


@pytest.mark.parametrize("upsampling", ["soft_labels", "concept"])
def test_nonfinite_tokens_give_valid_masks(upsampling):
    prepared = prepare_image(IMAGES, BACKBONE.resolution)
    features = np.array(BACKBONE.extract_features_prepared(prepared))
    features[0, 2, 3, 0] = np.nan  # one token
    features[1] = np.nan  # a whole image
    out = segment_features(features, prepared, PipelineConfig(spark=SPARK, mask_size=(16, 16), upsampling=upsampling))
    chex.assert_tree_all_finite(out.tokens.soft_labels)
    np.testing.assert_array_equal(out.tokens.num_nonfinite_tokens, [1, 64])
    for labels in (out.coarse_labels, out.labels):
        assert int(labels.min()) >= 0 and int(labels.max()) < 16
