"""Parity of every tap quantity of the Flax NNX UNet with diffusers, on the same tiny random weights.

Specification: for each family form (SDXL, SD 1.x, SD 2.x of tests/unet_forms.py), in float32, every quantity of a
representative set of taps -- attn1 and attn2 of a down block, of the mid block and of an up block
(output, q, k, v, probs, probs_mean), SPARK's feature tap, the output of a down block, of the mid block
and of an up block, and conv_out (the noise prediction) -- equals what diffusers computes, captured by
tests/diffusers_capture.py, to within 1e-4 of max |reference|; attention probabilities are rows that
sum to 1. A request returns exactly the requested keys, asking for probs does not change the
attention output, a tap asked alone equals the same tap asked among others, and an unknown name
raises UnknownTapError naming it. Under ``-m slow``: every name of ``UNetConfig.tap_names()`` of every
tiny form, and the feature tap and its attn1's probs_mean at the full SSD-1B architecture.

The first tests pin the oracle itself against diffusers: its processor reproduces diffusers' UNet
output, its attention output is the forward hook the feature-point tests already use, and its q, k,
v, probs are consistent with each other and with the module's weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import torch  # noqa: E402  (oracles are imported plainly: see conftest)
from diffusers.models.attention_processor import AttnProcessor

from diffusers_capture import UnknownCaptureTap, capture  # noqa: E402
from test_backbone_helpers import hooked_unet_features  # noqa: E402
from unet_forms import (  # noqa: E402
    FORMS,
    UNetInputs,
    build_unet,
    form_inputs,
    random_inputs,
    save_unet,
    torch_noise_prediction,
)

from experiments.bench_backbone import SSD1B_UNET  # noqa: E402  (the one reconstruction of SSD-1B's config)
from spark_jax.models.convert import load_unet  # noqa: E402
from spark_jax.models.taps import UnknownTapError  # noqa: E402

REL_TOL = 1e-4
# The forms of the CI parity tests (the brief's SDXL, SD 1.x and SD 2.x); ``-m slow`` checks every form.
PARITY_FORMS = ("sdxl", "sd1", "sd2")


def assert_parity(ours, ref, name, rel_tol=REL_TOL) -> float:
    """Max abs error <= rel_tol x max |ref|; returns the error relative to that scale."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != diffusers' {ref.shape}"
    scale = float(np.abs(ref).max())
    assert scale > 0, f"{name}: the reference is all zeros"
    err = float(np.abs(ours - ref).max())
    assert err <= rel_tol * scale, f"{name}: max abs error {err:.3g} > {rel_tol:g} x scale {scale:.3g}"
    return err / scale


@pytest.fixture(scope="module")
def torch_unets() -> Mapping[str, tuple[torch.nn.Module, UNetInputs]]:
    """form -> (random-weight diffusers UNet, its default random inputs), each built on first use, once."""

    class Built(dict):
        def __missing__(self, form: str):
            seed = list(FORMS).index(form)
            self[form] = (build_unet(form, seed=seed), form_inputs(form, seed=seed))
            return self[form]

    return Built()


def attention_paths(unet) -> list[str]:
    return [name.removesuffix(".processor") for name in unet.attn_processors]


def first_attention(unet, part: str, which: str) -> str:
    """The first attn1/attn2 module path under ``part`` (``down_blocks``, ``mid_block``, ``up_blocks``)."""
    return next(p for p in attention_paths(unet) if p.startswith(part + ".") and p.endswith(which))


def diffusers_output(unet, inputs: UNetInputs, processor) -> np.ndarray:
    """diffusers' noise prediction (NHWC) with ``processor`` set on every attention; the UNet's own put back."""
    saved = unet.attn_processors
    unet.set_attn_processor(processor)
    try:
        return torch_noise_prediction(unet, inputs)
    finally:
        unet.set_attn_processor(dict(saved))


def added_cond(inputs: UNetInputs) -> dict[str, np.ndarray] | None:
    if inputs.text_embeds is None:
        return None
    return {"text_embeds": inputs.text_embeds, "time_ids": inputs.time_ids}


def run_capture(unet, inputs: UNetInputs, names) -> dict[str, np.ndarray]:
    return capture(
        unet, inputs.sample, inputs.timesteps, inputs.encoder_hidden_states, added_cond(inputs), names=names
    )


# --- the oracle against diffusers ---------------------------------------------------------------


@pytest.mark.parametrize("form", PARITY_FORMS)
def test_recording_processor_reproduces_diffusers_unet(torch_unets, form):
    """Exactly AttnProcessor's result (same ops in the same order), and the default SDPA one to float32."""
    unet, inputs = torch_unets[form]
    names = [f"{p}:{q}" for p in attention_paths(unet) for q in ("output", "probs")] + ["conv_out:output"]
    captured = run_capture(unet, inputs, names)["conv_out:output"]
    np.testing.assert_array_equal(captured, diffusers_output(unet, inputs, AttnProcessor()))
    assert_parity(captured, torch_noise_prediction(unet, inputs), "conv_out vs AttnProcessor2_0", rel_tol=1e-5)


@pytest.mark.parametrize("form", PARITY_FORMS)
def test_capture_attention_output_is_the_feature_point_hook(torch_unets, form):
    """attn1:output is the Attention module's return (before the residual), the hook the encoder tests use."""
    unet, inputs = torch_unets[form]
    blocks = [i for i, b in enumerate(unet.down_blocks) if getattr(b, "attentions", None)]
    block = unet.down_blocks[blocks[-1]]
    last, depth = len(block.attentions) - 1, len(block.attentions[-1].transformer_blocks) - 1
    name = f"down_blocks.{blocks[-1]}.attentions.{last}.transformer_blocks.{depth}.attn1:output"
    ours = run_capture(unet, inputs, [name])[name]
    ref = hooked_unet_features(
        unet, inputs.sample, torch.from_numpy(inputs.timesteps), inputs.encoder_hidden_states,
        inputs.text_embeds, inputs.time_ids,
    )
    b, h, w, c = ref.shape
    np.testing.assert_allclose(ours, ref.reshape(b, h * w, c), rtol=0, atol=1e-6 * np.abs(ref).max())


def representative_attentions(unet) -> list[str]:
    """attn1 and attn2 of the first attention in the down blocks, the mid block and the up blocks."""
    parts = ["down_blocks", "up_blocks"] + (["mid_block"] if getattr(unet.mid_block, "attentions", None) else [])
    return [first_attention(unet, part, which) for part in parts for which in ("attn1", "attn2")]


@pytest.mark.parametrize("form", PARITY_FORMS)
def test_captured_attention_quantities_are_consistent(torch_unets, form):
    """Independent of the processor's code path: to_q's output split into heads is q; probs is
    softmax(q k^T / sqrt(d)) (rows sum to 1), probs_mean its mean over heads; probs @ v through to_out
    is the output; attn2 attends over the text tokens."""
    unet, inputs = torch_unets[form]
    paths = representative_attentions(unet)
    names = {  # (path, short name) -> tap; "to_q" is q before the head split
        (path, q): f"{path}.to_q:output" if q == "to_q" else f"{path}:{q}"
        for path in paths
        for q in ("q", "k", "v", "probs", "probs_mean", "output", "to_q")
    }
    captured = run_capture(unet, inputs, list(names.values()))
    modules = dict(unet.named_modules())
    for path in paths:
        got = {q: captured[name].astype(np.float64) for (p, q), name in names.items() if p == path}
        attn = modules[path]
        batch, heads, tokens, d = got["q"].shape
        contexts = inputs.encoder_hidden_states.shape[1] if path.endswith("attn2") else tokens
        chex.assert_shape(got["k"], (batch, heads, contexts, d))
        chex.assert_shape(got["probs"], (batch, heads, tokens, contexts))
        assert heads == attn.heads, path
        split = got["to_q"].reshape(batch, tokens, heads, d).transpose(0, 2, 1, 3)
        np.testing.assert_allclose(split, got["q"], err_msg=path)
        logits = got["q"] @ got["k"].swapaxes(-1, -2) / np.sqrt(d)
        softmax = np.exp(logits - logits.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)
        np.testing.assert_allclose(got["probs"], softmax, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(got["probs"].sum(-1), 1.0, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(got["probs_mean"], got["probs"].mean(1), atol=1e-7, err_msg=path)
        merged = (got["probs"] @ got["v"]).transpose(0, 2, 1, 3).reshape(batch, tokens, heads * d)
        weight, bias = (p.detach().double().numpy() for p in (attn.to_out[0].weight, attn.to_out[0].bias))
        scale = np.abs(got["output"]).max()
        np.testing.assert_allclose(got["output"], merged @ weight.T + bias, atol=1e-5 * scale, err_msg=path)


def test_capture_leaves_the_unet_as_it_was(torch_unets):
    unet, inputs = torch_unets["sdxl"]
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    run_capture(unet, inputs, ["mid_block:output", f"{first_attention(unet, 'up_blocks', 'attn1')}:probs"])
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert not any(m._forward_hooks for m in unet.modules())


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("mid_block", "'<module path>:<quantity>'"),
        ("down_blocks.7:output", "no module 'down_blocks.7'"),
        ("mid_block:probs", "no quantity 'probs'"),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn1:weights", "valid: output, q, k, v, probs, probs_mean"),
    ],
)
def test_capture_refuses_unknown_names(torch_unets, name, fragment):
    unet, inputs = torch_unets["sdxl"]
    with pytest.raises(UnknownCaptureTap) as err:
        run_capture(unet, inputs, [name])
    assert name in str(err.value) and fragment in str(err.value)


# --- our taps against the capture -----------------------------------------------------------------

# Same computation, differently fused programs: agreement far below the parity tolerance.
SAME_TOL = 1e-6


@pytest.fixture(scope="module")
def models(torch_unets, tmp_path_factory):
    """form -> (our UNet, its config), loaded through the real loader from the saved diffusers UNet."""
    base = tmp_path_factory.mktemp("tap_forms")
    return {form: load_unet(save_unet(torch_unets[form][0], base / form), use_cache=False) for form in PARITY_FORMS}


def run_taps(model, inputs: UNetInputs, taps) -> dict[str, np.ndarray]:
    """Our taps from one jitted forward (the model's state an argument, the tap names static)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args, taps=tuple(taps)))
    return {name: np.asarray(value) for name, value in forward(state, *inputs.jax_args()).items()}


def representative_taps(cfg) -> tuple[str, ...]:
    """Every quantity of attn1 and attn2 of the first transformer block of a down, the mid and an up block;
    the feature tap; the outputs of a down block, the mid block and an up block; conv_out."""
    names = cfg.tap_names()
    paths = list(dict.fromkeys(n.partition(":")[0] for n in names))
    taps = []
    for part in ("down_blocks.", "mid_block.", "up_blocks."):
        for which in ("attn1", "attn2"):
            path = next((p for p in paths if p.startswith(part) and p.endswith(which)), None)
            if path is not None:
                taps += [n for n in names if n.startswith(path + ":")]
    taps += [cfg.feature_tap, f"down_blocks.{cfg.feature_block}:output", "up_blocks.1:output", "conv_out:output"]
    if "mid_block:output" in names:
        taps.append("mid_block:output")
    return tuple(dict.fromkeys(taps))


@pytest.fixture(scope="module")
def representative(torch_unets, models):
    """form -> (requested taps, in reverse forward order; ours; diffusers' capture)."""
    out = {}
    for form in PARITY_FORMS:
        (unet, inputs), (model, cfg) = torch_unets[form], models[form]
        taps = tuple(reversed(representative_taps(cfg)))
        out[form] = (taps, run_taps(model, inputs, taps), run_capture(unet, inputs, taps))
    return out


@pytest.mark.parametrize("form", PARITY_FORMS)
def test_representative_taps_match_diffusers(representative, models, torch_unets, form):
    taps, ours, ref = representative[form]
    cfg, inputs = models[form][1], torch_unets[form][1]
    quantities = {name.partition(":")[2] for name in taps}
    assert quantities == {"q", "k", "v", "probs", "probs_mean", "output"}
    assert sum(name.endswith("attn2:probs") for name in taps) >= 2  # cross-attention of a down and an up block
    assert sorted(ours) == sorted(taps)  # exactly the requested keys (a jitted dict comes back key-sorted)
    batch, tokens = inputs.encoder_hidden_states.shape[:2]
    for name in taps:
        shape = cfg.tap_shape(name, batch=batch, latent_hw=tuple(inputs.sample.shape[2:]), text_tokens=tokens)
        assert ours[name].shape == shape, name
        assert_parity(ours[name], ref[name], name)
        if name.endswith((":probs", ":probs_mean")):
            assert ours[name].dtype == np.float32, name
            np.testing.assert_allclose(ours[name].sum(-1), 1.0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("form", PARITY_FORMS)
def test_fast_path_and_single_requests_agree_with_the_full_request(representative, models, torch_unets, form):
    """Attention outputs asked without q/k/v/probs (the fast path, which stops early), and the feature tap
    asked alone, equal the same taps of the representative request (which had every quantity)."""
    taps, together, _ = representative[form]
    (model, cfg), inputs = models[form], torch_unets[form][1]
    first_down = tuple(
        n for n in reversed(taps)  # forward order
        if n.startswith("down_blocks.") and n.endswith(("attn1:output", "attn2:output")) and n != cfg.feature_tap
    )
    assert len(first_down) == 2  # the first down transformer block's attn1 and attn2
    for request in (first_down, (cfg.feature_tap,)):
        alone = run_taps(model, inputs, request)
        assert sorted(alone) == sorted(request)
        for name in request:
            scale = np.abs(together[name]).max()
            np.testing.assert_allclose(alone[name], together[name], rtol=0, atol=SAME_TOL * scale, err_msg=name)


@pytest.mark.parametrize(
    "bad",
    [
        "down_blocks.9:output",  # no such block
        "mid_block:probs",  # a block has only an output
        "mid_block.attentions.0.transformer_blocks.0.attn1:q",  # this form's mid block has no attention
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1:prob",  # quantity misspelt
        "down_blocks.1.attentions.0.transformer_blocks.7.attn1:q",  # deeper than the block
        "conv_out",  # no quantity
    ],
)
def test_unknown_tap_raises_naming_it(models, torch_unets, bad):
    model, cfg = models["sdxl"]
    with pytest.raises(UnknownTapError) as err:
        model(*torch_unets["sdxl"][1].jax_args(), taps=(cfg.feature_tap, bad))
    assert repr(bad) in str(err.value)


# --- slow: every tap of every form, and the full SSD-1B architecture ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_every_tap_of_every_form_matches_diffusers(torch_unets, tmp_path, form):
    """Every name of UNetConfig.tap_names() in one request (every attention's probs included)."""
    unet, inputs = torch_unets[form]
    model, cfg = load_unet(save_unet(unet, tmp_path), use_cache=False)
    names = cfg.tap_names()
    ours, ref = run_taps(model, inputs, names), run_capture(unet, inputs, names)
    assert sorted(ours) == sorted(names)
    for name in names:
        assert_parity(ours[name], ref[name], name)


@pytest.mark.slow
def test_ssd1b_feature_tap_and_probs_mean_match_diffusers(tmp_path):
    """Full SSD-1B architecture, random weights, a 32x32 latent: the feature tap and its attn1's
    probs_mean ([1, 64, 64]). The reference is captured and the torch model freed before ours loads
    (both at once would need ~2x the UNet's float32 size in RAM)."""
    unet = build_unet(SSD1B_UNET)
    inputs = random_inputs(SSD1B_UNET, batch=1, latent_hw=(32, 32), tokens=77, seed=0)
    feature = "down_blocks.2.attentions.1.transformer_blocks.3.attn1"
    taps = (f"{feature}:output", f"{feature}:probs_mean")
    ref = run_capture(unet, inputs, taps)
    save_unet(unet, tmp_path)
    del unet
    model, cfg = load_unet(tmp_path, use_cache=False)
    assert cfg.feature_tap == taps[0]
    ours = run_taps(model, inputs, taps)
    chex.assert_shape([ours[taps[0]], ours[taps[1]]], [(1, 64, 1280), (1, 64, 64)])
    for name in taps:
        assert_parity(ours[name], ref[name], name)
    np.testing.assert_allclose(ours[taps[1]].sum(-1), 1.0, atol=1e-5)
