"""CLIP from open_clip checkpoints against open_clip's own outputs (tests/fixtures/open_clip_tiny/).

open_clip cannot be imported here (torchvision has no CPU build for this torch), so its outputs were computed
once and stored: regenerate them with ``/work/ocvenv/bin/python tests/make_open_clip_fixture.py`` (an environment
with open_clip_torch 3.3.0, torch and torchvision; see that script's docstring for what is stored). The folders are
open_clip's ``save_for_hf`` layout (``open_clip_model.safetensors``, ``open_clip_config.json``, tokenizer files),
random weights, QuickGELU (OpenAI-style) and GELU (LAION-style). Parity bound: float32 <= 1e-4 of scale.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from spark_jax.backbones.checkpoint import CheckpointError
from spark_jax.backbones.clip import load_clip
from test_backbone_helpers import assert_parity

FIXTURES = Path(__file__).parent / "fixtures" / "open_clip_tiny"
VARIANTS = ("quickgelu", "gelu")


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    folder = FIXTURES / request.param
    ref = dict(np.load(folder / "outputs.npz"))
    return request.param, folder, load_clip(folder), ref


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1)


def test_config_read_from_open_clip_config(variant):
    name, _, clip, _ = variant
    cfg = clip.config
    assert cfg.vision.hidden_act == cfg.text.hidden_act == ("quick_gelu" if name == "quickgelu" else "gelu")
    assert (cfg.vision.hidden_size, cfg.vision.num_attention_heads, cfg.vision.patch_size) == (24, 3, 7)
    assert cfg.text.pool == "argmax" and cfg.projection_dim == 20 and clip.context_length == 16
    assert clip.mean == ((0.48145466, 0.4578275, 0.40821073) if name == "quickgelu" else (0.5, 0.5, 0.5))
    assert clip.checkpoint_id.startswith("open_clip:")


def test_image_features_match_open_clip(variant):
    _, _, clip, ref = variant
    assert_parity(clip.image_features(_nhwc(ref["pixel_values"])), ref["image_features"])


def test_patch_tokens_match_open_clip(variant):
    _, _, clip, ref = variant
    tokens = clip.patch_features(_nhwc(ref["pixel_values"]))
    assert tokens.shape == (2, 4, 4, 20)
    assert_parity(np.asarray(tokens).reshape(2, 16, 20), ref["patch_tokens"])


def test_text_features_match_open_clip(variant):
    _, _, clip, ref = variant
    assert_parity(clip.text_features(ref["token_ids"]), ref["text_features_ids"])


def test_tokenizer_matches_open_clips(variant):
    """The tokenizer files beside the weights give open_clip's SimpleTokenizer ids up to each end-of-text token;
    after it open_clip pads with 0 and the Hugging Face tokenizer with end-of-text (both are never attended to
    under the causal mask, and the pooled token is the first end-of-text either way)."""
    _, _, clip, ref = variant
    texts = [str(t) for t in ref["texts"]]
    ours, theirs = clip.tokenize(texts), ref["text_ids"]
    eot = clip.config.text.vocab_size - 1
    for a, b in zip(ours, theirs):
        end = int(np.argmax(b == eot))
        np.testing.assert_array_equal(a[:end + 1], b[:end + 1])
        assert set(b[end + 1:]) <= {0} and set(a[end + 1:]) <= {eot}
    assert_parity(clip.encode_text(texts), ref["text_features"])


def test_preprocess_matches_open_clip_transform(variant):
    """open_clip's transform (torchvision Resize + CenterCrop on PIL): its crop offset rounds half to even, which
    these images' odd margins (7 and 3) exercise."""
    _, _, clip, ref = variant
    images = [ref["image_0"], ref["image_1"]]
    np.testing.assert_allclose(clip.preprocess(images), _nhwc(ref["preprocessed"]), atol=1e-5, rtol=0)
    assert_parity(clip.encode_image(images), ref["image_features_preprocessed"])


def _copy(tmp_path: Path, name: str = "quickgelu") -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_missing_fused_projection_named(tmp_path):
    folder = _copy(tmp_path)
    weights = load_file(folder / "open_clip_model.safetensors")
    weights.pop("visual.transformer.resblocks.1.attn.in_proj_weight")
    save_file(weights, folder / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): visual\.transformer\.resblocks\.1\.attn\."
                                              r"in_proj_weight.*open_clip_config\.json"):
        load_clip(folder)


def test_misshapen_fused_projection_named(tmp_path):
    folder = _copy(tmp_path)
    weights = load_file(folder / "open_clip_model.safetensors")
    weights["transformer.resblocks.0.attn.in_proj_weight"] = weights["transformer.resblocks.0.attn.in_proj_weight"][:64]
    save_file(weights, folder / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer\.resblocks\.0\.attn\.in_proj_weight: checkpoint "
                                              r"\(64, 32\), model expects \(96, 32\)"):
        load_clip(folder)


def test_openai_integer_entries_ignored_and_nonscalar_logit_scale(tmp_path):
    """OpenAI's state dicts carry input_resolution / context_length / vocab_size; nonscalar_logit_scale stores [1]."""
    folder = _copy(tmp_path)
    weights = load_file(folder / "open_clip_model.safetensors")
    weights["input_resolution"] = np.array(28)
    weights["logit_scale"] = weights["logit_scale"].reshape(1)
    save_file(weights, folder / "open_clip_model.safetensors")
    ref = np.load(folder / "outputs.npz")
    assert_parity(load_clip(folder).image_features(_nhwc(ref["pixel_values"])), ref["image_features"])


def test_custom_text_clip_prefix(tmp_path):
    """CustomTextCLIP keeps the built-in text transformer under ``text.``: the same map with that prefix."""
    folder = _copy(tmp_path)
    weights = load_file(folder / "open_clip_model.safetensors")
    text_keys = [k for k in weights if not k.startswith("visual.") and k != "logit_scale"]
    for k in text_keys:
        weights[f"text.{k}"] = weights.pop(k)
    save_file(weights, folder / "open_clip_model.safetensors")
    ref = np.load(folder / "outputs.npz")
    assert_parity(load_clip(folder).text_features(ref["token_ids"]), ref["text_features_ids"])


@pytest.mark.parametrize("tower, field, value, match", [
    ("vision_cfg", "timm_model_name", "convnext_large", r"timm image tower \(ConvNeXt"),
    ("vision_cfg", "layers", [3, 4, 6, 3], r"ModifiedResNet"),
    ("vision_cfg", "ls_init_value", 1e-5, r"vision_cfg\.ls_init_value=1e-05 is not supported"),
    ("text_cfg", "hf_model_name", "xlm-roberta-base", r"Hugging Face text tower"),
    ("text_cfg", "pool_type", "none", r"text_cfg\.pool_type='none'"),
    ("text_cfg", "no_causal_mask", True, r"no_causal_mask=True is not supported"),
])
def test_unsupported_open_clip_configs_named(tmp_path, tower, field, value, match):
    folder = _copy(tmp_path)
    raw = json.loads((folder / "open_clip_config.json").read_text())
    raw["model_cfg"][tower][field] = value
    (folder / "open_clip_config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=match):
        load_clip(folder)


def test_only_pickled_weights_named(tmp_path):
    folder = _copy(tmp_path)
    (folder / "open_clip_model.safetensors").unlink()
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"no open_clip_model\.safetensors.*open_clip_pytorch_model\.bin"):
        load_clip(folder)


def test_no_tokenizer_and_no_open_clip(tmp_path):
    """Without tokenizer files, tokenizing needs open_clip itself (absent here): the error says both fixes."""
    folder = _copy(tmp_path)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / f).unlink()
    clip = load_clip(folder)
    with pytest.raises(CheckpointError, match=r"no tokenizer files .*open_clip is not importable: install "
                                              r"open_clip_torch, or save the tokenizer"):
        clip.tokenize(["a cat"])
