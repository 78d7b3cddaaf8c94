"""Parity of the Flax NNX encoders with diffusers PyTorch on the same (tiny, random) weights.

Specification: on float32, the UNet features at the feature point (a forward hook on the same
attn1 in diffusers), the VAE latents, the noised latents and the prompt embeddings agree with
diffusers to within 1e-4 of the reference's scale (max |reference|).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # noqa: E402  (oracles are imported plainly: see conftest)
import diffusers  # noqa: E402

from test_backbone_helpers import (  # noqa: E402
    SD1_UNET,
    SDXL_UNET,
    assert_parity,
    build_tiny_pipeline,
    hooked_unet_features,
    perturb,
)

from experiments.bench_backbone import SSD1B_UNET  # noqa: E402  (the one reconstruction of SSD-1B's config)
from spark_jax.models.convert import load_unet, load_vae_encoder  # noqa: E402
from spark_jax.backbones.conditioning import add_noise, load_alphas_cumprod, prompt_embeddings  # noqa: E402
from spark_jax.models.embeddings import timestep_embedding  # noqa: E402


@pytest.fixture(scope="session")
def tiny_roots(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return {kind: build_tiny_pipeline(base / f"tiny_{kind}", kind) for kind in ("sdxl", "sd1", "sd2")}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "spark_jax_cache"


@pytest.mark.parametrize("t", [0, 50, 999])
@pytest.mark.parametrize("flip,shift", [(True, 0.0), (False, 1.0)])
def test_timestep_embedding_matches_diffusers(t, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    ref = get_timestep_embedding(torch.tensor([t, t + 0.5]), 33, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ours = jax.jit(lambda x: timestep_embedding(x, 33, flip_sin_to_cos=flip, freq_shift=shift))(
        jnp.asarray([t, t + 0.5])
    )
    # Angles reach ~1e3 rad, where one float32 ulp is 6e-5: sin/cos agree to that, not better.
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-4)


def feature_map(model, *args):
    """Our UNet's feature tap (``cfg.feature_tap``) reshaped to the [B, h, w, C] map."""
    tap = model.config.feature_tap
    tokens = model(*args, taps=(tap,))[tap]
    return tokens.reshape(tokens.shape[0], *model.config.tap_grid(tap, args[0].shape[1:3]), -1)


def save_and_load_unet(unet_t, folder):
    """Saves a diffusers UNet as a one-model pipeline folder and loads our UNet from it (no cache)."""
    (folder / "model_index.json").write_text("{}")
    unet_t.save_pretrained(folder / "unet")
    return load_unet(folder, use_cache=False)


def unet_features_both_ways(unet_t, model, cfg, *, batch, side, tokens, seed, time_ids=None):
    """(ours, diffusers') features at the feature point for the same random latents and context.

    Random pooled text embeddings and the given ``time_ids`` go in only for ``text_time`` models.
    """
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, 4, side, side)).astype(np.float32)
    context = rng.standard_normal((batch, tokens, cfg.cross_attention_dim[-1])).astype(np.float32)
    text_embeds = None
    if cfg.text_embeds_dim is None:
        time_ids = None
    else:
        text_embeds = rng.standard_normal((batch, cfg.text_embeds_dim)).astype(np.float32)
        time_ids = np.asarray(time_ids, np.float32)
    ref = hooked_unet_features(unet_t, sample, 50, context, text_embeds, time_ids)
    ours = jax.jit(lambda *a: feature_map(model, *a))(
        jnp.asarray(sample.transpose(0, 2, 3, 1)), jnp.asarray(50), jnp.asarray(context),
        None if text_embeds is None else jnp.asarray(text_embeds), None if time_ids is None else jnp.asarray(time_ids),
    )
    return ours, ref


@pytest.mark.parametrize("kind,feature_shape", [("sdxl", (2, 8, 8, 64)), ("sd1", (2, 8, 8, 32)), ("sd2", (2, 8, 8, 32))])
def test_unet_features_match_hooked_diffusers_unet(tiny_roots, cache_dir, kind, feature_shape):
    root = tiny_roots[kind]
    unet_t = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
    model, cfg = load_unet(root, cache_dir=cache_dir)
    assert cfg.text_embeds_dim == (24 if kind == "sdxl" else None)
    ours, ref = unet_features_both_ways(
        unet_t, model, cfg, batch=2, side=32, tokens=16, seed=0,
        time_ids=[[256, 256, 0, 0, 256, 256], [300, 200, 10, 5, 256, 256]],
    )
    chex.assert_shape(ours, feature_shape)
    assert_parity(ours, ref)


# Other members of the family, UNet only: SDXL base's form (a plain list of transformer depths, like
# its [1, 2, 10]) and SD 2.x's (linear projections, upcast_attention, a head count per block, no added
# embedding, the feature point in down_blocks[-2]).
FAMILY_FORMS = {
    "sdxl_base": dict(
        SDXL_UNET, transformer_layers_per_block=[1, 2, 3], reverse_transformer_layers_per_block=None,
    ),
    "sd2": dict(
        SD1_UNET, attention_head_dim=(1, 2, 2, 2), use_linear_projection=True, upcast_attention=True,
        cross_attention_dim=24, layers_per_block=2,
    ),
}


@pytest.mark.parametrize("form,feature_shape", [("sdxl_base", (1, 4, 4, 64)), ("sd2", (1, 4, 4, 32))])
def test_unet_family_forms_match_hooked_diffusers_unet(tmp_path, form, feature_shape):
    torch.manual_seed(0)
    unet_t = diffusers.UNet2DConditionModel(**FAMILY_FORMS[form]).eval()
    perturb(unet_t, 1)
    model, cfg = save_and_load_unet(unet_t, tmp_path)
    if form == "sdxl_base":
        assert cfg.transformer_layers_per_block == ((1, 1), (2, 2), (3, 3))
    ours, ref = unet_features_both_ways(
        unet_t, model, cfg, batch=1, side=16, tokens=7, seed=1, time_ids=[[128, 128, 0, 0, 128, 128]]
    )
    chex.assert_shape(ours, feature_shape)
    assert_parity(ours, ref)


def test_unet_feature_point_is_last_attention_down_block(tiny_roots, cache_dir):
    """SDXL form: down_blocks[-1]; SD 1.x form: down_blocks[-2] (its final DownBlock2D has no attention).

    That nothing after the feature point is traced is tests/test_unet_parity.py's early-stop test.
    """
    _, sdxl = load_unet(tiny_roots["sdxl"], cache_dir=cache_dir)
    model, sd1 = load_unet(tiny_roots["sd1"], cache_dir=cache_dir)
    assert (sdxl.feature_block, sd1.feature_block) == (2, 2)
    assert sdxl.feature_tap == "down_blocks.2.attentions.1.transformer_blocks.2.attn1:output"
    assert sd1.feature_tap == "down_blocks.2.attentions.0.transformer_blocks.0.attn1:output"
    assert len(model.down_blocks) == 4 and model.config == sd1  # the whole UNet is built


@pytest.mark.parametrize(
    "unet_dtype,rel_tol",
    # Reduced-precision XLA compiles take ~30 s each on CPU: CI checks the loaded dtype only (below).
    [pytest.param("bfloat16", 0.1, marks=pytest.mark.slow), pytest.param("float16", 0.02, marks=pytest.mark.slow)],
)
def test_unet_reduced_precision_tracks_float32(tiny_roots, cache_dir, unet_dtype, rel_tol):
    root = tiny_roots["sdxl"]
    f32, _ = load_unet(root, cache_dir=cache_dir)
    low, _ = load_unet(root, dtype=jnp.dtype(unet_dtype), cache_dir=cache_dir)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 16, 32)), jnp.float32)
    te = jnp.asarray(rng.standard_normal((1, 24)), jnp.float32)
    ids = jnp.asarray([[256, 256, 0, 0, 256, 256]], jnp.float32)
    ref = jax.jit(lambda *a: feature_map(f32, *a))(x, jnp.asarray(50), ctx, te, ids)
    out = jax.jit(lambda *a: feature_map(low, *a))(
        x.astype(unet_dtype), jnp.asarray(50), ctx.astype(unet_dtype), te.astype(unet_dtype), ids
    )
    chex.assert_type(out, jnp.dtype(unet_dtype))
    assert_parity(out, ref, rel_tol)


@pytest.mark.parametrize("unet_dtype", ["bfloat16", "float16"])
def test_unet_loads_in_reduced_precision(tiny_roots, cache_dir, unet_dtype):
    model, _ = load_unet(tiny_roots["sdxl"], dtype=jnp.dtype(unet_dtype), cache_dir=cache_dir)
    leaves = jax.tree.leaves(model)
    assert leaves and all(leaf.dtype == jnp.dtype(unet_dtype) for leaf in leaves)


def test_vae_latents_match_diffusers(tiny_roots, cache_dir):
    root = tiny_roots["sdxl"]
    vae_t = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    model, cfg = load_vae_encoder(root, cache_dir=cache_dir)
    assert cfg.scaling_factor == pytest.approx(0.13025)
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 64, 48)).astype(np.float32)
    with torch.no_grad():
        ref = vae_t.encode(torch.from_numpy(x)).latent_dist.mean * vae_t.config.scaling_factor
    ours = jax.jit(lambda im: model(im))(jnp.asarray(x.transpose(0, 2, 3, 1)))
    chex.assert_shape(ours, (2, 8, 6, 4))
    assert_parity(ours, ref.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize("t", [1, 50, 500])
def test_noised_latents_match_diffusers_ddpm(tiny_roots, t):
    root = tiny_roots["sdxl"]
    sched = diffusers.DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    abar = load_alphas_cumprod(root)
    np.testing.assert_allclose(abar, sched.alphas_cumprod.numpy(), rtol=1e-5)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = sched.add_noise(
        torch.from_numpy(latents), torch.from_numpy(noise).expand(3, -1, -1, -1), torch.tensor([t] * 3)
    )
    ours = jax.jit(add_noise)(
        jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(noise.transpose(0, 2, 3, 1)), abar[t]
    )
    assert_parity(ours, ref.numpy().transpose(0, 2, 3, 1))


def test_reference_schedule_abar_50():
    """SDXL's scaled_linear schedule: abar_50 ~ 0.9516 (reference facts, section 1)."""
    from spark_jax.backbones.conditioning import alphas_cumprod

    abar = alphas_cumprod({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    assert abar[50] == pytest.approx(0.9516, abs=1e-4)


@pytest.mark.parametrize("kind", ["sdxl", "sd1", "sd2"])
def test_empty_prompt_embeddings_match_pipeline_encode_prompt(tiny_roots, cache_dir, kind):
    root = tiny_roots[kind]
    ours = prompt_embeddings(root, cache_dir=cache_dir)
    if kind == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(root)
        with torch.no_grad():
            ref, _, pooled, _ = pipe.encode_prompt("", do_classifier_free_guidance=False)
        chex.assert_shape(ours.text_embeds, (24,))
        assert_parity(ours.text_embeds, pooled[0].numpy())
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None)
        with torch.no_grad():
            ref, _ = pipe.encode_prompt("", "cpu", 1, do_classifier_free_guidance=False)
        assert ours.text_embeds is None
    chex.assert_shape(ours.encoder_hidden_states, (16, {"sdxl": 32, "sd1": 16, "sd2": 24}[kind]))
    assert_parity(ours.encoder_hidden_states, ref[0].numpy())


def test_prompt_embeddings_are_read_from_cache_without_torch(tiny_roots, cache_dir, monkeypatch):
    root = tiny_roots["sdxl"]
    first = prompt_embeddings(root, cache_dir=cache_dir)
    import spark_jax.backbones.conditioning as conditioning

    def no_torch(*_a, **_k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(conditioning, "compute_prompt_embeddings", no_torch)
    again = conditioning.prompt_embeddings(root, cache_dir=cache_dir)
    np.testing.assert_array_equal(first.encoder_hidden_states, again.encoder_hidden_states)
    np.testing.assert_array_equal(first.text_embeds, again.text_embeds)


@pytest.mark.slow
def test_ssd1b_architecture_parity_at_small_latent(tmp_path):
    """Full SSD-1B UNet architecture (random weights) against diffusers at a 32x32 latent."""
    unet_t = diffusers.UNet2DConditionModel(**SSD1B_UNET).eval()
    model, cfg = save_and_load_unet(unet_t, tmp_path)
    assert (cfg.feature_block, cfg.transformer_layers_per_block[2]) == (2, (4, 4))
    ours, ref = unet_features_both_ways(
        unet_t, model, cfg, batch=1, side=32, tokens=77, seed=0, time_ids=[[1024, 1024, 0, 0, 1024, 1024]]
    )
    chex.assert_shape(ours, (1, 8, 8, 1280))
    assert_parity(ours, ref)
