"""The whole Flax NNX UNet against ``diffusers.UNet2DConditionModel``, its config grammar, key map and taps.

Specification:
- On tiny random-weight UNets of every form of tests/unet_forms.py (SSD-1B-like SDXL with text_time, linear
  projections, per-block heads and uneven depths both ways; SDXL base; a Vega-like reduced UNet without mid
  block; SD 1.x with conv projections and an attention mid block; SD 2.x with upcast_attention, per-block head
  counts and a latent that is not a multiple of its 8x downsampling), saved in the diffusers layout and loaded
  through the real loader, the noise prediction (``conv_out:output``) equals diffusers' in float32 to within
  1e-4 of max |reference|.
- ``UNetConfig.from_diffusers`` reads the up path (reversed values, ``reverse_transformer_layers_per_block``),
  and names every unsupported or inconsistent value.
- The key map is total and strict on the whole UNet: a missing, unexpected or misshapen key anywhere (up blocks,
  mid block, conv_out) raises naming it.
- Taps: every name of ``tap_names()`` is recorded, in that order, with ``tap_shape``'s shape; an unknown name
  raises ``UnknownTapError`` with the closest valid names before anything runs; the forward stops after the last
  requested tap (the feature tap calls no module of the mid or up blocks, nor attn2/ff of its own transformer
  block); ``probs_mean`` holds one head's probabilities at a time.
Under ``-m slow``: the full SSD-1B and SD 2.1 architectures (random weights) at a small latent.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import torch  # noqa: E402  (oracles are imported plainly: see conftest)
from test_backbone_helpers import assert_parity
from unet_forms import FORMS, INPUTS, build_unet, form_inputs, random_inputs, save_unet, torch_noise_prediction

from experiments.bench_backbone import SSD1B_UNET  # noqa: E402  (the one reconstruction of SSD-1B's config)
from spark_jax.backbones.checkpoint import CheckpointError
from spark_jax.models import attention as attention_module
from spark_jax.models import taps as taps_module
from spark_jax.models.attention import FeedForward, attention_probs, attention_probs_mean
from spark_jax.models.convert import load_unet
from spark_jax.models.taps import UnknownTapError
from spark_jax.models.unet import UNetConfig, UnsupportedArchitectureError
from spark_jax.models.unet_2d_blocks import (
    CrossAttnUpBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """form -> (diffusers UNet, the folder it is saved in), built once per module."""
    base = tmp_path_factory.mktemp("unet_forms")
    out = {}
    for i, form in enumerate(FORMS):
        unet = build_unet(form, seed=10 * i)
        out[form] = (unet, save_unet(unet, base / form))
    return out


def noise_prediction(model, inputs) -> np.ndarray:
    """Our ``conv_out:output`` from one jitted forward (the parameters an argument, not baked-in constants)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a, taps=("conv_out:output",)))
    return np.asarray(forward(state, *inputs.jax_args())["conv_out:output"])


# ---- the noise prediction ---------------------------------------------------------------------------------------


# Each form compiles a whole UNet (8-18 s here); SDXL base's two differences from the SSD-1B-like form (a mid
# block with attention, reversed plain depths) are covered by sd1 and by the config tests, so it runs under slow.
@pytest.mark.parametrize("form", [f if f != "sdxl_base" else pytest.param(f, marks=pytest.mark.slow) for f in FORMS])
def test_noise_prediction_matches_diffusers(saved, form):
    unet, folder = saved[form]
    model, cfg = load_unet(folder, use_cache=False)
    inputs = form_inputs(form, seed=1)
    ours = noise_prediction(model, inputs)
    size = INPUTS[form]
    chex.assert_shape(ours, (size.batch, *size.latent_hw, cfg.out_channels))
    assert_parity(ours, torch_noise_prediction(unet, inputs))


# ---- the config grammar -----------------------------------------------------------------------------------------


def test_up_path_is_read_from_the_config(saved):
    sdxl = UNetConfig.from_diffusers(FORMS["sdxl"])
    assert sdxl.transformer_layers_per_block == ((1, 1), (2, 2), (1, 3))
    assert sdxl.up_transformer_layers_per_block == ((1, 1, 1), (2, 2, 2), (1, 1, 1))  # the checkpoint's own
    assert (sdxl.heads, sdxl.mid_block_type, sdxl.up_layers_per_block) == ((1, 2, 4), "UNetMidBlock2D", (3, 3, 3))
    base = UNetConfig.from_diffusers(FORMS["sdxl_base"])
    assert base.up_transformer_layers_per_block == ((3, 3, 3), (2, 2, 2), (1, 1, 1))  # the down depths reversed
    assert (base.mid_block_type, base.mid_transformer_layers) == ("UNetMidBlock2DCrossAttn", 3)
    vega = UNetConfig.from_diffusers(FORMS["vega"])
    assert (vega.mid_block_type, vega.layers_per_block, vega.up_layers_per_block) == (None, (1, 2, 2), (3, 3, 2))
    sd2 = UNetConfig.from_diffusers(FORMS["sd2"])
    assert (sd2.upcast_attention, sd2.use_linear_projection, sd2.cross_attention_dim) == (True, True, (24,) * 4)
    # The loader reads the same from the saved config.json (which diffusers completes with every default).
    assert load_unet(saved["sdxl"][1], use_cache=False)[1] == sdxl


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(up_block_types=("CrossAttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")), "up block type 'AttnUpBlock2D'"),
        (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "up_block_types .* differ in length"),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
        (dict(reverse_transformer_layers_per_block=None), "reverse_transformer_layers_per_block is missing"),
        (dict(reverse_transformer_layers_per_block=[[1, 1], [2, 2, 2], [1, 1, 1]]),
         r"reverse_transformer_layers_per_block\[0\]=\[1, 1\] must have 3 entries"),
        (dict(transformer_layers_per_block=[1, 2, [1, 0]]), "transformer depths of 0"),
        (dict(cross_attention_dim=[32, 32, 16]), "cross_attention_dim .* differs between blocks"),
        (dict(attention_head_dim=(1, 3, 4)), "32 channels do not split into 3 attention heads"),
        (dict(norm_num_groups=None), "norm_num_groups=None"),
        (dict(norm_num_groups=12), "norm_num_groups=12 does not divide the GroupNorm widths"),
        (dict(conv_out_kernel=2), "conv_out_kernel=2"),
        (dict(mid_block_only_cross_attention=True), "mid_block_only_cross_attention=True"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_named(change, match):
    with pytest.raises(UnsupportedArchitectureError, match=match) as err:
        UNetConfig.from_diffusers({**FORMS["sdxl"], **change}, source="tiny/unet/config.json")
    assert str(err.value).startswith("tiny/unet/config.json: ")


# ---- the key map ------------------------------------------------------------------------------------------------


def _edited_copy(saved, tmp_path, edit):
    folder = save_unet(saved["sdxl"][0], tmp_path / "edited")
    tensors = load_file(str(folder / "unet" / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / "unet" / WEIGHTS))
    return folder


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("up_blocks.0.upsamplers.0.conv.weight"), r"1 missing key\(s\): up_blocks\.0\.upsamplers\.0\.conv\.weight"),
        (lambda t: t.pop("mid_block.resnets.0.time_emb_proj.bias"), r"missing key\(s\): mid_block\.resnets\.0\.time_emb_proj\.bias"),
        (lambda t: t.__setitem__("mid_block.attentions.0.proj_in.weight", np.zeros((64, 64), np.float32)),
         r"1 unexpected key\(s\): mid_block\.attentions\.0\.proj_in\.weight"),
        (lambda t: t.__setitem__("conv_out.weight", np.zeros((4, 16, 1, 1), np.float32)),
         r"shape mismatch\(es\): conv_out\.weight: checkpoint \(4, 16, 1, 1\), model expects \(4, 16, 3, 3\)"),
        (lambda t: t.__setitem__("up_blocks.1.resnets.2.conv1.weight", np.zeros((32, 32, 3, 3), np.float32)),
         r"up_blocks\.1\.resnets\.2\.conv1\.weight: checkpoint \(32, 32, 3, 3\), model expects \(32, 48, 3, 3\)"),
    ],
)
def test_key_map_is_strict_on_the_whole_unet(saved, tmp_path, edit, match):
    folder = _edited_copy(saved, tmp_path, edit)
    with pytest.raises(CheckpointError, match=match):
        load_unet(folder, use_cache=False)


# ---- taps -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", list(FORMS))
def test_every_tap_is_recorded_in_forward_order_with_its_documented_shape(saved, form, monkeypatch):
    """One trace (no compilation) requesting every name: each recorded once, in tap_names() order, shaped as
    tap_shape says; probabilities float32."""
    model, cfg = load_unet(saved[form][1], use_cache=False)
    names = cfg.tap_names()
    assert len(names) == len(set(names)) and names[0] == "conv_in:output" and names[-1] == "conv_out:output"
    order = []
    real_record = taps_module.TapRecorder.record

    def record(self, path, quantity, value):
        if f"{path}:{quantity}" in self.requested:
            order.append(f"{path}:{quantity}")
        return real_record(self, path, quantity, value)

    monkeypatch.setattr(taps_module.TapRecorder, "record", record)
    inputs = form_inputs(form)
    out = jax.eval_shape(lambda *a: model(*a, taps=names[::-1]), *inputs.jax_args())
    assert tuple(order) == names
    assert set(out) == set(names)  # (a dict through a jax transform comes back with sorted keys)
    b, tokens = inputs.encoder_hidden_states.shape[:2]
    for name in names:
        assert out[name].shape == cfg.tap_shape(name, batch=b, latent_hw=INPUTS[form].latent_hw, text_tokens=tokens), name
        assert out[name].dtype == jnp.float32, name


def test_tap_grid_and_stride_follow_the_down_path():
    sd2 = UNetConfig.from_diffusers(FORMS["sd2"])
    # 20 x 12 latent: 10 x 6 after one downsampler, 5 x 3 after two, 3 x 2 after three.
    assert sd2.feature_tap == "down_blocks.2.attentions.1.transformer_blocks.0.attn1:output"
    assert (sd2.tap_grid(sd2.feature_tap, (20, 12)), sd2.tap_stride(sd2.feature_tap), sd2.feature_stride) == ((5, 3), 4, 4)
    assert sd2.tap_grid("down_blocks.2:output", (20, 12)) == (3, 2)  # after its downsampler
    assert sd2.tap_grid("mid_block.attentions.0.transformer_blocks.0.attn2:probs", (20, 12)) == (3, 2)
    assert sd2.tap_grid("up_blocks.0.resnets.2:output", (20, 12)) == (3, 2)
    assert sd2.tap_grid("up_blocks.0:output", (20, 12)) == (5, 3)  # upsampled to the skip's size
    assert sd2.tap_grid("up_blocks.3:output", (20, 12)) == sd2.tap_grid("conv_out:output", (20, 12)) == (20, 12)
    shape = sd2.tap_shape("up_blocks.1.attentions.2.transformer_blocks.0.attn2:k", batch=2, latent_hw=(20, 12), text_tokens=7)
    assert shape == (2, 4, 7, 8)  # heads 4, head width 32 / 4
    ssd = UNetConfig.from_diffusers(SSD1B_UNET)
    assert ssd.feature_tap == "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"
    assert ssd.tap_grid(ssd.feature_tap, (128, 128)) == (32, 32) and ssd.feature_channels == 1280


def test_unknown_tap_names_the_closest_valid_names_before_anything_runs(saved):
    model, cfg = load_unet(saved["sdxl"][1], use_cache=False)
    bad = "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"  # SSD-1B's feature tap; this form has 3 blocks
    wrong_shape = jnp.zeros((1, 3, 8, 8))  # would fail the input check if anything ran first
    with pytest.raises(UnknownTapError, match="closest valid names: down_blocks.2.attentions.1.transformer_blocks.2.attn1:output"):
        model(wrong_shape, 50, jnp.zeros((1, 7, 32)), taps=(bad,))
    with pytest.raises(UnknownTapError, match=r"pass \('conv_out:output',\)"):
        model(wrong_shape, 50, jnp.zeros((1, 7, 32)), taps="conv_out:output")
    with pytest.raises(ValueError, match="no taps requested"):
        model(wrong_shape, 50, jnp.zeros((1, 7, 32)), taps=())
    assert issubclass(UnknownTapError, ValueError)


def test_feature_tap_stops_the_forward_at_the_feature_point(saved, monkeypatch):
    """Requesting SPARK's feature tap traces the old truncated encoder's work: no mid or up block, no downsampler
    of the feature block, and in the feature's transformer block neither attn2 nor ff."""
    model, cfg = load_unet(saved["sdxl"][1], use_cache=False)
    inputs = form_inputs("sdxl")

    def never(*_a, **_k):
        raise AssertionError("a module after the feature point was called")

    for cls in (UpBlock2D, CrossAttnUpBlock2D, UNetMidBlock2D, UNetMidBlock2DCrossAttn):
        monkeypatch.setattr(cls, "__call__", never)
    calls = {"attention": [], "ff": 0}
    real_attention, real_ff = attention_module.Attention.__call__, FeedForward.__call__

    def attention(self, *a, **k):
        calls["attention"].append(self.tap_path)
        return real_attention(self, *a, **k)

    def ff(self, x):
        calls["ff"] += 1
        return real_ff(self, x)

    monkeypatch.setattr(attention_module.Attention, "__call__", attention)
    monkeypatch.setattr(FeedForward, "__call__", ff)
    jaxpr = jax.make_jaxpr(lambda *a: model(*a, taps=(cfg.feature_tap,)))(*inputs.jax_args())
    # down_blocks.1: 2 attentions x 2 blocks; down_blocks.2: 1 block, then 3 blocks of which the last stops at attn1.
    assert calls["ff"] == 4 + 1 + 2
    assert calls["attention"][-1] == cfg.feature_tap.partition(":")[0]
    assert len(calls["attention"]) == 2 * 7 + 1
    out_shape = jaxpr.out_avals[0].shape
    assert out_shape == (2, 16, 64)  # [B, N, C] at the feature block's 4 x 4 grid


def test_requesting_probabilities_leaves_the_attention_output_unchanged(saved):
    model, cfg = load_unet(saved["sdxl"][1], use_cache=False)
    attn = cfg.feature_tap.partition(":")[0]
    args = form_inputs("sdxl").jax_args()
    fast = jax.jit(lambda *a: model(*a, taps=(cfg.feature_tap,)))(*args)
    probs_taps = (f"{attn}:probs", f"{attn}:probs_mean", cfg.feature_tap)
    both = jax.jit(lambda *a: model(*a, taps=probs_taps))(*args)
    np.testing.assert_array_equal(np.asarray(both[cfg.feature_tap]), np.asarray(fast[cfg.feature_tap]))
    probs, mean = np.asarray(both[f"{attn}:probs"]), np.asarray(both[f"{attn}:probs_mean"])
    chex.assert_shape(probs, (2, 4, 16, 16))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(mean, probs.mean(1), atol=1e-6)


def test_probs_mean_holds_one_head_at_a_time():
    """Its program has no value larger than one head's [B, T, S] probabilities (all heads would be 8x that)."""
    b, t, s, n, h = 2, 64, 48, 8, 4
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.float32)
    mean = jax.jit(lambda q, k: attention_probs_mean(q, k, scale=h**-0.5))(q, k)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(attention_probs(q, k, scale=h**-0.5)).mean(1), atol=1e-6)

    def sizes(jaxpr):  # every value of the program, the scan body's included
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
            for param in eqn.params.values():
                sub = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from sizes(sub)

    largest = max(sizes(jax.make_jaxpr(lambda q, k: attention_probs_mean(q, k, scale=0.5))(q, k).jaxpr))
    assert largest == b * t * s


# ---- full architectures (slow) ----------------------------------------------------------------------------------

# SD 2.1's UNet (stabilityai/stable-diffusion-2-1, 768 px): diffusers' known config. attention_head_dim is a head
# count per block (64-wide heads); 2.1 sets upcast_attention.
SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)


@pytest.mark.slow
@pytest.mark.parametrize("config,latent,tokens", [(SSD1B_UNET, (32, 32), 77), (SD21_UNET, (32, 24), 77)],
                         ids=["ssd1b", "sd21"])
def test_full_architecture_noise_prediction_matches_diffusers(tmp_path, config, latent, tokens):
    unet = build_unet(config, seed=0)
    model, cfg = load_unet(save_unet(unet, tmp_path), use_cache=False)
    assert sum(p.numel() for p in unet.parameters()) == sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    inputs = random_inputs(config, batch=1, latent_hw=latent, tokens=tokens, seed=0)
    assert_parity(noise_prediction(model, inputs), torch_noise_prediction(unet, inputs))
