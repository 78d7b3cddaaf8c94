"""segment: images -> backbone -> SPARK -> masks -> PAMR, with the paper's ablation switches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig
from spark_jax.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.pamr import PamrConfig, refine_labels
from spark_jax.pipeline import PipelineConfig, segment, segment_features
from spark_jax.preprocess import prepare_image, resize_bilinear

BACKBONE = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))  # 8x8 tokens
SPARK = SparkConfig(max_clusters=16)


def _images(batch=2, h=50, w=70, seed=0):
    """Two-colour images (left/right halves) with noise: a clear two-region structure."""
    rng = np.random.default_rng(seed)
    images = np.zeros((batch, h, w, 3), np.float32)
    images[:, :, : w // 2] = [0.9, 0.1, 0.1]
    images[:, :, w // 2 :] = [0.1, 0.2, 0.9]
    images += rng.normal(0, 0.03, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8)


def test_segment_shapes_and_ranges():
    cfg = PipelineConfig(spark=SPARK, mask_size=(32, 24))
    out = segment(_images(), BACKBONE, cfg)
    chex.assert_shape([out.labels, out.coarse_labels], (2, 32, 24))
    chex.assert_type([out.labels, out.coarse_labels], jnp.int32)
    chex.assert_shape(out.tokens.labels, (2, 8, 8))
    assert int(out.labels.min()) >= 0 and int(out.labels.max()) < 16
    assert not bool(jnp.any(out.pamr_overflow))


def test_two_colour_image_splits_at_the_colour_edge():
    out = segment(_images(batch=1), BACKBONE, PipelineConfig(spark=SPARK, mask_size=(32, 32)))
    labels = np.asarray(out.labels[0])
    left, right = labels[:, :12], labels[:, 20:]
    assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1
    assert left[0, 0] != right[0, 0]


def test_pamr_off_returns_the_upsampled_labels():
    out = segment(_images(), BACKBONE, PipelineConfig(spark=SPARK, pamr=None))
    np.testing.assert_array_equal(out.labels, out.coarse_labels)


def test_pamr_on_renumbered_labels_equals_pamr_on_the_original_ids():
    images = _images(batch=1, seed=3)
    cfg = PipelineConfig(spark=SPARK, mask_size=(32, 32), pamr=PamrConfig(num_iter=5))
    out = segment(images, BACKBONE, cfg)
    small = resize_bilinear(prepare_image(images, BACKBONE.resolution), 32, 32)[0]
    want = refine_labels(small, out.coarse_labels[0], 16, cfg.pamr)
    np.testing.assert_array_equal(out.labels[0], want)


def test_too_many_segments_for_pamr_are_flagged():
    rng = np.random.default_rng(0)
    noise = (rng.random((1, 64, 64, 3)) * 255).astype(np.uint8)
    cfg = PipelineConfig(spark=SparkConfig(), mask_size=(16, 16), pamr_max_labels=2)
    out = segment(noise, BACKBONE, cfg)
    assert bool(out.pamr_overflow[0]) == (len(np.unique(np.asarray(out.coarse_labels[0]))) > 2)


@pytest.mark.parametrize("upsampling", ["soft_labels", "concept"])
@pytest.mark.parametrize("use_local", [True, False])
def test_ablation_switches_run_and_batch_equals_single(upsampling, use_local):
    cfg = PipelineConfig(spark=SPARK.replace(use_local=use_local), upsampling=upsampling, mask_size=(16, 16))
    images = _images(batch=2)
    both = segment(images, BACKBONE, cfg)
    one = segment(images[1:], BACKBONE, cfg)
    np.testing.assert_array_equal(both.labels[1], one.labels[0])


def test_numeric_hyperparameters_do_not_recompile_the_pipeline():
    images = _images(batch=1)
    features = BACKBONE.extract_features(images)
    prepared = prepare_image(images, BACKBONE.resolution)
    fn = jax.jit(chex.assert_max_traces(segment_features.__wrapped__, n=1))
    chex.clear_trace_counter()
    for r, beta in [(1.5, 0.3), (2.6, 0.6)]:
        fn(features, prepared, PipelineConfig(spark=SPARK.replace(inflation=r, beta=beta), mask_size=(16, 16)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        segment(np.zeros((64, 64, 3), np.uint8), BACKBONE)
    with pytest.raises(ValueError, match="upsampling"):
        PipelineConfig(upsampling="nearest")
    with pytest.raises(ValueError, match="pamr_max_labels"):
        PipelineConfig(pamr_max_labels=0)
