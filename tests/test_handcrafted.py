"""The weights-free demo/CI backbone: shapes, preprocessing, and that it separates colour and texture."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig, features_from_prepared, handcrafted_features
from spark_jax.data.preprocess import prepare_image

CFG = HandcraftedConfig(resolution=64, patch=8)


def cosine(a, b):
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@pytest.mark.parametrize("shape", [(2, 48, 80, 3), (1, 65, 65, 3)])
def test_shapes_dtype_and_jit(shape):
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    bb = HandcraftedBackbone(CFG)
    out = bb.extract_features(images)
    chex.assert_shape(out, (shape[0], 8, 8, 15))
    chex.assert_type(out, jnp.float32)
    chex.assert_tree_all_finite(out)
    assert bb.token_grid == (8, 8) and bb.resolution == 64
    # same preprocessing as the paper's backbone: raw path == prepared path
    prepared = jax.jit(prepare_image, static_argnums=1)(images, CFG.resolution)
    np.testing.assert_allclose(np.asarray(bb.extract_features_prepared(prepared)), np.asarray(out), atol=1e-5)


def test_separates_colour_and_texture_regions():
    h = w = 65
    img = np.zeros((h, w, 3), np.float32)
    img[:, :32] = (0.8, 0.2, 0.2)  # flat red on the left
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 0.5 + 0.4 * np.sin(2 * np.pi * xx / 6.0)
    img[:, 32:] = np.stack([stripes, stripes, stripes], -1)[:, 32:]  # grey stripes on the right
    f = jax.jit(lambda x: handcrafted_features(x, HandcraftedConfig(64, 8, position_weight=0.0)))(img[None])[0]
    left_a, left_b, right = f[2, 1], f[6, 2], f[4, 6]
    assert cosine(left_a, left_b) > 0.95
    assert cosine(left_a, right) < 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: HandcraftedConfig(resolution=60, patch=8), "multiple of patch"),
        (lambda: handcrafted_features(jnp.zeros((40, 40, 3)), CFG), r"\[B, H, W, 3\]"),
        (lambda: features_from_prepared(jnp.zeros((1, 32, 32, 3)), CFG), "prepared images must be"),
    ],
)
def test_bad_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
