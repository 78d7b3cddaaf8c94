"""Dense CLIP features (MaskCLIP, SCLIP, NACLIP, vanilla) against NumPy transcriptions of the papers' last blocks.

A tiny random transformers ``CLIPModel`` is converted to the NNX port; the NumPy oracle
(``spark_jax.testing.numpy_clip``) runs each mode's last block on the input of the last layer, taken from
transformers itself at the checkpoint's grid, and from the port's own first n - 1 layers on another grid.
Every dense output comes from one jitted program (one compilation for the whole module).
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from spark_jax.backbones.clip import load_clip
from spark_jax.models.clip import CLIPConfig
from spark_jax.models.clip_convert import ArrayReader, build_clip, convert_clip, transformers_key_map
from spark_jax.openvocab import (
    DENSE_MODES,
    DenseCLIPConfig,
    class_probabilities,
    clear_text_classifier_cache,
    dense_features,
    label_segments,
    neighbourhood_bias,
    text_classifier,
)
from spark_jax.testing import numpy_clip
from test_clip_parity import CONTEXT, _hf_config, save_tiny_clip

HEADS = 4
NARROW = 1.5  # a narrow neighbourhood, so that NACLIP's bias matters on a 3 x 5 grid


def _tiny_torch_clip(seed: int = 0) -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=HEADS, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=HEADS,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # transformers' init leaves LayerNorms at (1, 0) and biases at 0: make every weight count
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def _port(torch_model):
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    cfg = CLIPConfig.from_transformers(torch_model.config.to_dict())
    ignored = lambda key: key.endswith("position_ids")  # noqa: E731  (a buffer, not a parameter)
    model = build_clip(cfg, convert_clip(cfg, ArrayReader(state), transformers_key_map(cfg), ignored=ignored))
    return model, state


def _pixels(batch, height, width, seed=1):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


def _all_outputs(model, px_square, px_wide):
    """Every mode at the checkpoint's 4 x 4 grid and on a 3 x 5 grid, and what the tests compare them with."""
    vm = model.vision_model
    out = {"hidden_wide": vm.encoder(vm.embed(px_wide), num_layers=len(vm.encoder.layers) - 1),
           "patch_tokens_wide": model.patch_tokens(px_wide),
           "naclip_std_0.5": dense_features(model, px_square, DenseCLIPConfig(mode="naclip", gaussian_std=0.5))}
    for mode in DENSE_MODES:
        out[f"{mode}_square"] = dense_features(model, px_square, DenseCLIPConfig(mode=mode))
        out[f"{mode}_wide"] = dense_features(model, px_wide, DenseCLIPConfig(mode=mode, gaussian_std=NARROW))
    return out


_all_outputs_jit = nnx.jit(_all_outputs)


@pytest.fixture(scope="module")
def tiny():
    torch_model = _tiny_torch_clip()
    model, state = _port(torch_model)
    px_square, px_wide = _pixels(2, 32, 32), _pixels(1, 24, 40, seed=2)
    out = _all_outputs_jit(model, jnp.asarray(px_square), jnp.asarray(px_wide))
    with torch.no_grad():
        ref = torch_model.vision_model(torch.from_numpy(px_square).permute(0, 3, 1, 2), output_hidden_states=True)
        ref_tokens = torch_model.visual_projection(torch_model.vision_model.post_layernorm(ref.last_hidden_state))
    return dict(model=model, state=state, out=out, px_square=px_square, px_wide=px_wide,
                hidden_square=ref.hidden_states[-2].numpy(),  # transformers' input of the last layer
                torch_tokens=ref_tokens[:, 1:].numpy().reshape(2, 4, 4, -1))


@pytest.mark.parametrize("mode", DENSE_MODES)
def test_each_mode_matches_its_numpy_transcription_at_the_checkpoint_grid(tiny, mode):
    want = numpy_clip.dense_from_hidden(tiny["hidden_square"], tiny["state"], mode=mode, num_heads=HEADS, grid=(4, 4))
    got = tiny["out"][f"{mode}_square"]
    chex.assert_shape(got, (2, 4, 4, 16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("mode", DENSE_MODES)
def test_each_mode_on_a_non_square_grid(tiny, mode):
    # The input of the last layer from the port's own first layers (its position embedding interpolated to 3 x 5).
    want = numpy_clip.dense_from_hidden(np.asarray(tiny["out"]["hidden_wide"]), tiny["state"], mode=mode,
                                        num_heads=HEADS, grid=(3, 5), gaussian_std=NARROW)
    got = tiny["out"][f"{mode}_wide"]
    chex.assert_shape(got, (1, 3, 5, 16))
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_numpy_vanilla_block_is_transformers_last_layer(tiny):
    # The oracle's block mechanics (heads, scale, LayerNorms, activation) checked against transformers itself.
    want = tiny["torch_tokens"] / np.linalg.norm(tiny["torch_tokens"], axis=-1, keepdims=True)
    got = numpy_clip.dense_from_hidden(tiny["hidden_square"], tiny["state"], mode="vanilla", num_heads=HEADS,
                                       grid=(4, 4))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_vanilla_equals_the_ports_patch_tokens(tiny):
    tokens = tiny["out"]["patch_tokens_wide"]
    np.testing.assert_allclose(tiny["out"]["vanilla_wide"], tokens / jnp.linalg.norm(tokens, axis=-1, keepdims=True),
                               atol=1e-5)


def test_the_modes_differ(tiny):
    out = tiny["out"]
    for a, b in itertools.combinations(DENSE_MODES, 2):
        assert float(jnp.max(jnp.abs(out[f"{a}_square"] - out[f"{b}_square"]))) > 1e-2, (a, b)
    # The std reaches the attention.
    assert float(jnp.max(jnp.abs(out["naclip_std_0.5"] - out["naclip_square"]))) > 1e-3


def test_new_pixels_do_not_recompile(tiny, compilations):
    px_square, px_wide = jnp.asarray(tiny["px_square"] + 1.0), jnp.asarray(tiny["px_wide"] - 1.0)
    with compilations() as c:
        _all_outputs_jit(tiny["model"], px_square, px_wide)
    assert c.count == 0


@pytest.mark.parametrize("grid, std", [((3, 5), 5.0), ((4, 4), 1.3), ((1, 2), 0.7)])
def test_neighbourhood_bias_matches_the_pairwise_definition(grid, std):
    got = neighbourhood_bias(*grid, std)
    want = numpy_clip.neighbourhood_bias(*grid, std)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(got[0], 0.0)  # the class token: no neighbourhood
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_allclose(jnp.diagonal(got)[1:], 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="clearclip"), "mode='clearclip'"),
    (dict(gaussian_std=0.0), "gaussian_std=0.0"),
    (dict(gaussian_std=float("nan")), "gaussian_std=nan"),
    (dict(matmul_precision="fast"), "matmul_precision='fast'"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DenseCLIPConfig(**kwargs)


def test_pixel_value_errors(tiny):
    model = tiny["model"]
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        dense_features(model, jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        dense_features(model, jnp.zeros((1, 3, 32, 32)))


def test_text_classifier_and_dense_labels_on_a_saved_checkpoint(tmp_path):
    # load_clip of a saved transformers folder; text side against transformers' own tokenizer and text tower.
    reference = save_tiny_clip(tmp_path / "clip", _hf_config("quick_gelu"))
    clip = load_clip(tmp_path / "clip")
    vocabulary = [("cat", "dog"), ("photo",)]
    templates = ("a {}", "a photo of a {}.", "{}")
    clear_text_classifier_cache()
    clf = text_classifier(clip, vocabulary, templates, cache_dir=tmp_path / "cache")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "clip")
    for row, name in enumerate(["cat", "dog", "photo"]):
        ids = tokenizer([t.format(name) for t in templates], padding="max_length", max_length=CONTEXT,
                        truncation=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            emb = reference.get_text_features(input_ids=ids)
        emb = getattr(emb, "pooler_output", emb).numpy()
        np.testing.assert_allclose(clf.embeddings[row], numpy_clip.prompt_ensemble(emb), atol=1e-4)
    np.testing.assert_array_equal(clf.synonym_class, [0, 0, 1])
    # The runner's path: dense features at a non-native grid -> per-patch probabilities; mask pooling of segments.
    images01 = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 2 * clip.patch_size, 3 * clip.patch_size, 3)))
    dense = nnx.jit(dense_features, static_argnames="cfg")(clip.model, clip.normalize(images01), DenseCLIPConfig())
    probs = jax.jit(class_probabilities)(dense, clf)
    chex.assert_shape(probs, (1, 2, 3, 2))
    np.testing.assert_allclose(jnp.sum(probs, axis=-1), 1.0, atol=1e-5)
    segments = jnp.asarray(np.kron(np.array([[0, 1, 1], [2, 2, 1]]), np.ones((4, 4), int))[None])
    labels = jax.jit(label_segments, static_argnames="num_segments")(segments, dense, clf, num_segments=3)
    want = numpy_clip.label_segments(np.asarray(segments), np.asarray(dense), np.asarray(clf.embeddings), [0, 0, 1], 2)
    np.testing.assert_array_equal(labels, want)
