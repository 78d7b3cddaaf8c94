"""The jitted feature extractor: preprocessing, end-to-end parity with the diffusers pipeline, batching."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (oracles are imported plainly: see conftest)
import diffusers  # noqa: E402

from test_backbone_helpers import build_tiny_pipeline, hooked_unet_features  # noqa: E402

from spark_jax.backbones.diffusion import BackboneConfig, load_backbone, preprocess_images  # noqa: E402

RES = 128  # tiny VAE downscales 8x, tiny UNet 4x more before the feature point: 4x4 tokens


@pytest.fixture(scope="session")
def sdxl_root(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sdxl", "sdxl")


@pytest.fixture(scope="session")
def backbone(sdxl_root, tmp_path_factory):
    cfg = BackboneConfig(resolution=RES, cache_dir=str(tmp_path_factory.getbasetemp() / "spark_jax_cache"))
    return load_backbone(sdxl_root, cfg)


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).integers(0, 256, (2, 100, 90, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(1, 37, 53, 3), (2, 64, 64, 3)])
def test_preprocess_maps_uint8_and_float_alike_to_minus_one_one(shape):
    u8 = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    f = jax.jit(lambda x: preprocess_images(x, resolution=32))
    out_u8, out_f = f(jnp.asarray(u8)), f(jnp.asarray(u8, jnp.float32) / 255.0)
    chex.assert_shape(out_u8, (shape[0], 32, 32, 3))
    chex.assert_type(out_u8, jnp.float32)
    np.testing.assert_allclose(out_u8, out_f, atol=1e-6)
    assert float(out_u8.min()) >= -1.0 and float(out_u8.max()) <= 1.0


def test_preprocess_is_the_shared_reference_crop_and_resize_in_minus_one_one():
    """The VAE sees preprocess.prepare_image's output (DiffCut's loader), mapped to [-1, 1]."""
    from spark_jax.data.preprocess import prepare_image

    img = np.random.default_rng(4).integers(0, 256, (2, 41, 60, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        preprocess_images(jnp.asarray(img), resolution=16), 2.0 * prepare_image(jnp.asarray(img), 16) - 1.0, atol=1e-6
    )


@pytest.mark.parametrize(
    "bad,match",
    [(np.zeros((8, 8, 3), np.uint8), r"\[B, H, W, 3\]"), (np.zeros((1, 3, 8, 8), np.uint8), "channels last"),
     (np.zeros((1, 8, 8, 3), np.int32), "uint8")],
)
def test_preprocess_rejects_bad_images_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess_images(jnp.asarray(bad), resolution=16)


def test_extract_features_matches_diffusers_pipeline(backbone, sdxl_root, images):
    """VAE mean x scale, DDPM noise at t=50, empty-prompt SDXL conditioning, hooked attn1: as in diffusers."""
    feats = backbone.extract_features(images)
    chex.assert_shape(feats, (2, *backbone.feature_shape))
    assert backbone.feature_shape == (4, 4, 64) and backbone.resolution == RES
    chex.assert_tree_all_finite(feats)

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_root)
    sched = diffusers.DDPMScheduler.from_pretrained(sdxl_root, subfolder="scheduler")
    x = np.asarray(preprocess_images(jnp.asarray(images), resolution=RES)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        latents = pipe.vae.encode(torch.from_numpy(x)).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.from_numpy(np.asarray(backbone.cond.noise).transpose(0, 3, 1, 2)).expand_as(latents)
        noisy = sched.add_noise(latents, noise, torch.tensor([50]))
        context, _, pooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
        time_ids = np.asarray([[RES, RES, 0, 0, RES, RES]] * 2, np.float32)
        ref = hooked_unet_features(
            pipe.unet, noisy.numpy(), 50, context.expand(2, -1, -1).numpy(), pooled.expand(2, -1).numpy(), time_ids
        )
    scale = np.abs(ref).max()
    assert np.abs(np.asarray(feats) - ref).max() <= 1e-4 * scale


def test_features_of_an_image_do_not_depend_on_its_batch(backbone, images):
    """One noise tensor shared by the batch: swapping images swaps features, nothing else changes."""
    ab = backbone.extract_features(images)
    ba = backbone.extract_features(images[::-1])
    np.testing.assert_allclose(ab, ba[::-1], atol=1e-5)
    assert not np.allclose(ab[0], ab[1])


def test_prepared_images_of_any_source_size_share_one_compiled_extractor(backbone, images):
    """Preparing each image on its own, then batching the squares, gives the raw path's features."""
    from spark_jax.data.preprocess import prepare_image

    prepared = prepare_image(jnp.asarray(images), RES)
    np.testing.assert_allclose(backbone.extract_features_prepared(prepared), backbone.extract_features(images), atol=1e-5)
    other = prepare_image(jnp.asarray(images[:, : images.shape[1] - 3]), RES)  # another source size
    before = backbone._jitted_prepared._cache_size()
    backbone.extract_features_prepared(other)
    assert backbone._jitted_prepared._cache_size() == before
    with pytest.raises(ValueError, match="prepare_image"):
        backbone.extract_features_prepared(images)


def test_extractor_compiles_once_per_shape(backbone, images):
    backbone.extract_features(images)
    before = backbone._jitted._cache_size()
    backbone.extract_features(images + 1)
    assert backbone._jitted._cache_size() == before


def test_backbone_equals_a_plain_jit_of_the_pure_function(backbone, images):
    """The Backbone's program (CPU compiler options) and a plain jit of extract_features agree."""
    from flax import nnx

    from spark_jax.backbones.diffusion import extract_features

    whole = jax.jit(
        lambda up, vp, cond, x: extract_features(
            nnx.merge(backbone._unet_graph, up), nnx.merge(backbone._vae_graph, vp), x, cond,
            timestep=backbone.cfg.timestep, resolution=backbone.resolution,
        )
    )(backbone.unet_params, backbone.vae_params, backbone.cond, jnp.asarray(images))
    np.testing.assert_allclose(whole, backbone.extract_features(images), rtol=1e-5, atol=1e-5)


def test_torch_noise_source_reproduces_the_reference_draw_and_is_cached(tmp_path, monkeypatch):
    from spark_jax.backbones.conditioning import shared_noise

    ours = shared_noise(42, (8, 6, 4), source="torch", cache_dir=tmp_path)
    ref = torch.randn((1, 4, 8, 6), generator=torch.Generator("cpu").manual_seed(42))
    chex.assert_shape(ours, (1, 8, 6, 4))
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1))
    monkeypatch.setattr(torch, "randn", None)  # a second draw must come from the cache
    np.testing.assert_array_equal(shared_noise(42, (8, 6, 4), source="torch", cache_dir=tmp_path), ours)


def test_backbone_config_rejects_bad_values(sdxl_root, tmp_path):
    with pytest.raises(ValueError, match="unet_dtype"):
        BackboneConfig(unet_dtype="float8")
    with pytest.raises(ValueError, match="noise_source"):
        BackboneConfig(noise_source="numpy")
    with pytest.raises(ValueError, match="multiple of 32"):
        load_backbone(sdxl_root, BackboneConfig(resolution=100, cache_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ taps
def test_extract_of_the_feature_tap_is_extract_features(backbone, images):
    tap = backbone.feature_tap
    assert tap.endswith(".attn1:output") and tap in backbone.tap_names()
    out = backbone.extract(images, (tap,))
    assert list(out) == [tap]
    h, w = backbone.tap_grid(tap)
    feats = np.asarray(backbone.extract_features(images))
    assert feats.shape[1:3] == (h, w)
    np.testing.assert_allclose(np.asarray(out[tap]).reshape(feats.shape), feats, atol=1e-6)


def test_extract_prepared_returns_every_requested_tap_in_its_layout(backbone, images):
    from spark_jax.data.preprocess import prepare_image

    attn = backbone.feature_tap.rsplit(":", 1)[0]
    taps = (backbone.feature_tap, f"{attn}:probs_mean", f"{attn}:q", "mid_block:output", "conv_out:output")
    prepared = prepare_image(jnp.asarray(images), RES)
    out = backbone.extract_prepared(prepared, taps)
    assert set(out) == set(taps)
    h, w = backbone.tap_grid(backbone.feature_tap)
    n, c = h * w, backbone.feature_shape[-1]
    chex.assert_shape(out[backbone.feature_tap], (2, n, c))
    chex.assert_shape(out[f"{attn}:probs_mean"], (2, n, n))
    np.testing.assert_allclose(np.asarray(out[f"{attn}:probs_mean"]).sum(-1), 1.0, atol=1e-5)
    assert out[f"{attn}:q"].ndim == 4 and out[f"{attn}:q"].shape[2] == n
    side = RES // 8
    chex.assert_shape(out["conv_out:output"], (2, side, side, 4))
    assert out["mid_block:output"].shape[1:3] == backbone.tap_grid("mid_block:output")
    # The same tap, alone or with others: the same values (the forward runs to the last one either way).
    alone = backbone.extract_prepared(prepared, (backbone.feature_tap,))[backbone.feature_tap]
    np.testing.assert_allclose(np.asarray(alone), np.asarray(out[backbone.feature_tap]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out[backbone.feature_tap]),
                               np.asarray(backbone.extract(images, (backbone.feature_tap,))[backbone.feature_tap]),
                               atol=1e-6)


def test_unknown_taps_are_named_with_the_closest_valid_ones(backbone, images):
    from spark_jax.models.taps import UnknownTapError

    with pytest.raises(UnknownTapError, match=r"tokens\.attn1:output.*handcrafted demo backbone") as info:
        backbone.extract(images, ("tokens.attn1:output",))
    assert backbone.feature_tap in str(info.value)
    typo = backbone.feature_tap.replace("attn1", "attn3")
    with pytest.raises(UnknownTapError, match="closest valid names") as info:
        backbone.tap_grid(typo)
    assert backbone.feature_tap in str(info.value)


def test_a_backbone_loaded_for_some_taps_holds_only_their_parameters(sdxl_root, backbone, images, tmp_path_factory):
    from spark_jax.models.taps import UnknownTapError

    cache = str(tmp_path_factory.getbasetemp() / "spark_jax_cache")
    lean = load_backbone(sdxl_root, BackboneConfig(resolution=RES, cache_dir=cache, taps=(backbone.feature_tap,)))
    nbytes = lambda params: sum(x.nbytes for x in jax.tree_util.tree_leaves(params))  # noqa: E731
    assert nbytes(lean.unet_params) < 0.8 * nbytes(backbone.unet_params)
    np.testing.assert_allclose(np.asarray(lean.extract_features(images)), np.asarray(backbone.extract_features(images)),
                               atol=1e-6)
    earlier = backbone.tap_names()[backbone.tap_names().index(backbone.feature_tap) - 1]
    np.testing.assert_allclose(np.asarray(lean.extract(images, (earlier,))[earlier]),
                               np.asarray(backbone.extract(images, (earlier,))[earlier]), atol=1e-6)
    with pytest.raises(UnknownTapError, match=r"comes after the last tap.*BackboneConfig\(taps=None\)"):
        lean.extract(images, ("conv_out:output",))
    with pytest.raises(UnknownTapError, match="no_such_block"):
        load_backbone(sdxl_root, BackboneConfig(resolution=RES, cache_dir=cache, taps=("no_such_block:output",)))
    with pytest.raises(ValueError, match="BackboneConfig.taps"):
        BackboneConfig(taps="conv_out:output")
