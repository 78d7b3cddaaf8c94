"""The weights-free demo/CI backbone: shapes, preprocessing, and that it separates colour and texture."""

import re

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


# ------------------------------------------------------------------------------------------------ taps
def test_taps_follow_the_backbone_contract():
    from spark_jax.backbones.handcrafted import FEATURE_TAP, TAP_NAMES
    from spark_jax.data.preprocess import prepare_image

    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))
    images = np.random.default_rng(0).integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    taps = backbone.extract(images, TAP_NAMES)
    assert set(taps) == set(TAP_NAMES) and backbone.feature_tap == FEATURE_TAP
    feats = np.asarray(backbone.extract_features(images))  # [B, 8, 8, C]
    b, g, _, c = feats.shape
    np.testing.assert_allclose(np.asarray(taps["tokens:output"]), feats, atol=1e-6)
    np.testing.assert_allclose(np.asarray(taps[FEATURE_TAP]), feats.reshape(b, g * g, c), atol=1e-6)
    for q in ("q", "k", "v"):
        np.testing.assert_allclose(np.asarray(taps[f"tokens.attn1:{q}"]), feats.reshape(b, 1, g * g, c), atol=1e-6)
    # The attention-like map: softmax over tokens of <x_i, x_j> / sqrt(C), one head.
    x = feats.reshape(b, g * g, c).astype(np.float64)
    logits = np.einsum("bic,bjc->bij", x, x) / np.sqrt(c)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(taps["tokens.attn1:probs"])[:, 0], want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(taps["tokens.attn1:probs_mean"]), want, atol=1e-5)
    prepared = prepare_image(jnp.asarray(images), 64)
    again = backbone.extract_prepared(prepared, ("tokens.attn1:probs_mean",))
    assert list(again) == ["tokens.attn1:probs_mean"]
    np.testing.assert_allclose(np.asarray(again["tokens.attn1:probs_mean"]), want, atol=1e-5)
    assert backbone.tap_grid(FEATURE_TAP) == (8, 8)


def test_attention_scale_sharpens_the_attention_like_map():
    images = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    flat = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8, attention_scale=0.01))
    sharp = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8, attention_scale=10.0))
    p_flat = np.asarray(flat.extract(images, ("tokens.attn1:probs_mean",))["tokens.attn1:probs_mean"])
    p_sharp = np.asarray(sharp.extract(images, ("tokens.attn1:probs_mean",))["tokens.attn1:probs_mean"])
    assert p_flat.max() < 0.05 and np.mean(p_sharp.max(-1)) > 0.5
    with pytest.raises(ValueError, match="attention_scale"):
        HandcraftedConfig(attention_scale=0.0)


@pytest.mark.parametrize("tap, message", [
    ("down_blocks.2.attentions.1.transformer_blocks.3.attn1:output", "diffusion backbone"),
    ("tokens.attn2:probs", "tokens.attn1:probs_mean"),
    ("conv_out", "<module path>:<quantity>"),
])
def test_taps_it_cannot_provide_are_named(tap, message):
    from spark_jax.models.taps import UnknownTapError

    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))
    with pytest.raises(UnknownTapError, match=re.escape(message)) as info:
        backbone.extract(np.zeros((1, 64, 64, 3), np.uint8), (tap,))
    assert tap in str(info.value)
