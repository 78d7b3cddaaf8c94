"""CLIP in Flax NNX against transformers' ``CLIPModel`` on tiny random-weight checkpoints saved as transformers
saves them (safetensors, single and sharded; tokenizer and image processor in the folder).

Parity bound: float32 <= 1e-4 of the reference's largest magnitude (``assert_parity``). Both activations
(QuickGELU: OpenAI's weights; GELU: LAION's). The slow test repeats the parity at the full ViT-L/14 architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPImageProcessorPil, CLIPModel as HFCLIPModel, CLIPTokenizer

from spark_jax.backbones.checkpoint import CheckpointError
from spark_jax.backbones.clip import load_clip
from spark_jax.models.clip import CLIPConfig, CLIPModel, torch_bicubic_matrix
from spark_jax.models.clip_convert import abstract_clip, model_paths, open_clip_key_map, transformers_key_map
from test_backbone_helpers import _bytes_to_unicode, assert_parity

CONTEXT = 16
SIDE, PATCH = 28, 7
# A few BPE merges so that words become multi-byte tokens (the tokenizer's merge path runs, not only bytes).
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "o t", "ph ot", "phot o</w>"]
TEXTS = ["a cat", "a photo of a dog", "", "Photo  of A CAT!", "dog " * 20]


def _vocab() -> dict[str, int]:
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as OpenAI's 49407
    return vocab


def _hf_config(act: str, *, eos_token_id: int | None = None, image_size: int = SIDE, patch_size: int = PATCH,
               **sizes) -> HFCLIPConfig:
    vocab = _vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CONTEXT, hidden_act=act,
                bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                eos_token_id=vocab["<|endoftext|>"] if eos_token_id is None else eos_token_id)
    vision = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                  image_size=image_size, patch_size=patch_size, hidden_act=act)
    text.update(sizes.get("text", {}))
    vision.update(sizes.get("vision", {}))
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=sizes.get("projection_dim", 20))


def save_tiny_clip(folder: Path, hf_config: HFCLIPConfig, *, seed: int = 0, **save_kwargs) -> HFCLIPModel:
    """A random-weight CLIPModel with its tokenizer and (PIL) image processor, saved in the transformers layout."""
    torch.manual_seed(seed)
    model = HFCLIPModel(hf_config).eval()
    with torch.no_grad():  # visible position embeddings and scales (init leaves some near-constant)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder, **save_kwargs)
    CLIPTokenizer(vocab=_vocab(), merges=[tuple(m.split()) for m in MERGES], pad_token="<|endoftext|>",
                  model_max_length=CONTEXT).save_pretrained(folder)
    side = hf_config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return model


def _images(seed: int = 0) -> list[np.ndarray]:
    """uint8 images of odd sizes and both orientations (odd crop margins: the crop rounding matters)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 53), (61, 29), (28, 28))]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """One saved tiny checkpoint per activation, built on first use: (folder, torch model, loaded CLIP)."""
    built = {}

    def get(act: str):
        if act not in built:
            folder = tmp_path_factory.mktemp(f"clip_{act}")
            model = save_tiny_clip(folder, _hf_config(act))
            built[act] = folder, model, load_clip(folder)
        return built[act]
    return get


@pytest.fixture(params=["quick_gelu", "gelu"])
def tiny(request, tiny_checkpoints):
    """The model parity tests run for both activations."""
    return tiny_checkpoints(request.param)


@pytest.fixture
def tiny1(tiny_checkpoints):
    """Tests of the loader, the processors and bad input need one of them."""
    return tiny_checkpoints("quick_gelu")


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def test_key_maps_are_total():
    """Both maps name exactly the model's parameters, one source each; open_clip's q/k/v share in_proj rows."""
    cfg = CLIPConfig.from_transformers(_hf_config("gelu").to_dict())
    paths = set(model_paths(abstract_clip(cfg)))
    hf, oc = transformers_key_map(cfg), open_clip_key_map(cfg)
    assert set(hf) == paths and set(oc) == paths
    assert len({s.key for s in hf.values()}) == len(hf)  # one key per parameter
    fused = [s.key for p, s in oc.items() if len(p) > 1 and p[-2] in ("q_proj", "k_proj", "v_proj")]
    assert len(set(fused)) == len(fused) // 3


def test_preprocess_matches_image_processor(tiny1):
    folder, _, clip = tiny1
    images = _images()
    ref = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="np")["pixel_values"]
    got = clip.preprocess(images)
    assert got.shape == (3, SIDE, SIDE, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_float_images_resize_without_rounding(tiny1):
    """Float images in [0, 1] take the same Pillow filter in float mode: on a smooth image (no overshoot for the
    uint8 path to clip between its two passes) within about a grey level of the uint8 path, but not equal to it
    (no rounding to uint8, no truncation as transformers' float path would apply)."""
    _, _, clip = tiny1
    yy, xx = np.mgrid[0:41, 0:57] / 40.0
    smooth = np.stack([0.5 + 0.4 * np.sin(2 * yy + c) * np.cos(1.5 * xx) for c in range(3)], axis=-1)
    u8 = np.round(smooth * 255).astype(np.uint8)
    a = clip.preprocess([u8])
    b = clip.preprocess([u8.astype(np.float32) / 255])
    assert 0 < np.abs(b - a).max() <= 1.5 / 255 / min(clip.std)


def test_image_features_match_transformers(tiny):
    folder, model, clip = tiny
    images = _images()
    px = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=px).pooler_output.numpy()
    assert_parity(clip.encode_image(images), ref)
    assert_parity(clip.image_features(_nhwc(px)), ref)


def test_patch_tokens_match_transformers(tiny):
    folder, model, clip = tiny
    images = _images()
    px = CLIPImageProcessorPil.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=px).last_hidden_state[:, 1:]
        ref = model.visual_projection(model.vision_model.post_layernorm(hidden)).numpy()
    got = clip.patch_tokens(images)
    g = SIDE // PATCH
    assert got.shape == (3, g, g, 20)
    assert_parity(np.asarray(got).reshape(3, g * g, 20), ref)


@pytest.mark.parametrize("hw", [(42, 35), (14, 21)])
def test_interpolated_position_embedding_matches_transformers(tiny, hw):
    """A grid other than the checkpoint's (larger, smaller, non-square) = transformers' interpolate_pos_encoding."""
    _, model, clip = tiny
    px = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, *hw)).astype(np.float32))
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=px, interpolate_pos_encoding=True).pooler_output.numpy()
        hidden = model.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        ref_tokens = model.visual_projection(model.vision_model.post_layernorm(hidden)).numpy()
    assert_parity(clip.image_features(_nhwc(px)), ref)
    tokens = clip.patch_features(_nhwc(px))
    assert tokens.shape[1:3] == (hw[0] // PATCH, hw[1] // PATCH)
    assert_parity(np.asarray(tokens).reshape(ref_tokens.shape), ref_tokens)


def test_bicubic_matrix_is_torchs():
    """The position-embedding resampler is torch's bicubic (a = -0.75, clamped borders), up and down."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1, 7, 7))
    for out in (3, 7, 10, 16):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out, out), mode="bicubic",
                                              align_corners=False).numpy()[0, 0]
        m = torch_bicubic_matrix(7, out)
        np.testing.assert_allclose(m @ x[0, 0] @ m.T, ref, atol=1e-12)


def test_tokenize_and_text_features_match_transformers(tiny):
    folder, model, clip = tiny
    tok = CLIPTokenizer.from_pretrained(folder)
    enc = tok(TEXTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    ids = clip.tokenize(TEXTS)
    assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), CONTEXT)
    np.testing.assert_array_equal(ids, enc["input_ids"].numpy())
    assert ids[1].tolist().count(_vocab()["dog</w>"]) == 1  # the merges ran
    with torch.no_grad():
        ref = model.get_text_features(input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"]).pooler_output.numpy()
    assert_parity(clip.encode_text(TEXTS), ref)
    assert clip.context_length == CONTEXT


@pytest.mark.parametrize("eos_token_id", [2, None])
def test_text_pooling_follows_transformers(tmp_path, eos_token_id):
    """eos_token_id=2 (configs older than transformers' PR 24773) pools at the largest id, otherwise at the first
    end-of-text id: random ids where the two differ."""
    model = save_tiny_clip(tmp_path, _hf_config("quick_gelu", eos_token_id=eos_token_id))
    clip = load_clip(tmp_path)
    assert clip.config.text.pool == ("argmax" if eos_token_id == 2 else "eos")
    rng = np.random.default_rng(0)
    eos = _vocab()["<|endoftext|>"]
    ids = rng.integers(0, eos, (4, CONTEXT))
    ids[0, 5] = ids[0, 9] = eos
    ids[1, 3] = eos
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    assert_parity(clip.text_features(ids), ref)


def test_sharded_checkpoint_loads_the_same(tmp_path, tiny1):
    folder, _, clip = tiny1
    hf_cfg = HFCLIPConfig.from_pretrained(folder)
    save_tiny_clip(tmp_path, hf_cfg, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded = load_clip(tmp_path)
    images = _images()
    np.testing.assert_array_equal(np.asarray(sharded.encode_image(images)), np.asarray(clip.encode_image(images)))
    np.testing.assert_array_equal(np.asarray(sharded.encode_text(TEXTS)), np.asarray(clip.encode_text(TEXTS)))
    assert sharded.checkpoint_id != clip.checkpoint_id


def test_attributes_and_stable_identity(tiny1):
    folder, _, clip = tiny1
    assert (clip.image_size, clip.patch_size) == (SIDE, PATCH)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert isinstance(clip.model, CLIPModel)
    assert load_clip(folder).checkpoint_id == clip.checkpoint_id
    assert clip.checkpoint_id.startswith("transformers:")


def test_normalize_any_size(tiny1):
    _, _, clip = tiny1
    im = np.random.default_rng(0).random((1, 35, 21, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(clip.normalize(im)), (im - np.array(clip.mean)) / np.array(clip.std),
                               rtol=1e-6, atol=1e-6)
    assert clip.patch_tokens(im, resize=False).shape == (1, 5, 3, 20)


def test_text_chunks_and_reduced_precision(tiny1):
    """Many texts run in fixed-size chunks (the same features); bfloat16 weights stay close to float32."""
    folder, _, clip = tiny1
    ids = clip.tokenize(TEXTS * 3)
    np.testing.assert_allclose(np.asarray(clip.text_features(ids, batch_size=4)), np.asarray(clip.text_features(ids)),
                               rtol=1e-5, atol=1e-6)
    half = load_clip(folder, dtype="bfloat16")
    ref = np.asarray(clip.encode_image(_images()))
    err = np.abs(np.asarray(half.encode_image(_images()), np.float32) - ref).max()
    assert err <= 0.05 * np.abs(ref).max()


def test_one_compilation_per_shape(tiny1, compilations):
    _, _, clip = tiny1
    clip.encode_image(_images())
    with compilations() as c:
        clip.encode_image(_images(seed=3))
    assert c.count == 0


# Bad input --------------------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_folder_without_weights(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c", skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors .*found \[.*config\.json"):
        load_clip(folder)


def test_only_pytorch_weights_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c", skip=("model.safetensors",))
    (folder / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*save_pretrained"):
        load_clip(folder)


def test_unknown_model_type(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "siglip"}))
    with pytest.raises(CheckpointError, match=r"model_type='siglip' is not a CLIP model"):
        load_clip(folder)


def test_folder_without_any_config(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"neither a transformers CLIP config .* nor an open_clip"):
        load_clip(tmp_path)


def test_missing_and_unexpected_keys_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c")
    weights = load_file(folder / "model.safetensors")
    weights.pop("vision_model.encoder.layers.1.mlp.fc2.bias")
    weights["vision_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
                                              r".*1 unexpected key\(s\): vision_model\.extra\.weight"):
        load_clip(folder)


def test_misshapen_key_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c")
    raw = json.loads((folder / "config.json").read_text())
    raw["projection_dim"] = 16
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*visual_projection\.weight: checkpoint \(20, 24\), "
                                              r"model expects \(16, 24\)"):
        load_clip(folder)


def test_non_finite_weights_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c")
    weights = load_file(folder / "model.safetensors")
    weights["text_projection.weight"][0, 0] = np.nan
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite .*text_projection\.weight"):
        load_clip(folder)


def test_unsupported_activation_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c")
    raw = json.loads((folder / "config.json").read_text())
    raw["vision_config"]["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"vision_config\.hidden_act='relu' is not supported"):
        load_clip(folder)


def test_missing_processor_and_tokenizer_named(tmp_path, tiny1):
    folder = _copy(tiny1[0], tmp_path / "c", skip=("preprocessor_config.json",))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json is missing.*CLIPImageProcessor"):
        load_clip(folder)
    folder = _copy(tiny1[0], tmp_path / "d", skip=("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                  "merges.txt", "special_tokens_map.json"))
    clip = load_clip(folder)  # the image side works without a tokenizer
    clip.encode_image(_images())
    with pytest.raises(CheckpointError, match=r"no tokenizer files .*save_pretrained"):
        clip.tokenize(["a cat"])


def test_repo_id_not_in_cache(tmp_path):
    with pytest.raises(CheckpointError, match=r"'openai/clip-vit-large-patch14' is neither a local folder nor in the "
                                              r"Hugging Face cache.*huggingface-cli download"):
        load_clip("openai/clip-vit-large-patch14", hf_cache_dir=tmp_path)


def test_hf_cache_snapshot_resolves(tmp_path, tiny1):
    snap = tmp_path / "models--owner--tiny1-clip" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    _copy(tiny1[0], snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    clip = load_clip("owner/tiny1-clip", hf_cache_dir=tmp_path)
    assert clip.checkpoint_id.startswith("transformers:owner/tiny1-clip:")
    np.testing.assert_array_equal(np.asarray(clip.encode_text(TEXTS)), np.asarray(tiny1[2].encode_text(TEXTS)))


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 8, 8), np.uint8), r"\[B, H, W, 3\]"),
    (np.zeros((8, 8, 3), np.uint8), r"add a leading axis"),
    (np.full((1, 8, 8, 3), 2.0, np.float32), r"values in \[2, 2\]; expected \[0, 1\]"),
    (np.zeros((1, 8, 8, 4), np.uint8), r"RGB"),
    (np.zeros((1, 8, 8, 3), np.int32), r"dtype int32"),
])
def test_bad_images(tiny1, bad, match):
    with pytest.raises(ValueError, match=match):
        tiny1[2].encode_image(bad)


def test_size_not_a_multiple_of_the_patch(tiny1):
    with pytest.raises(ValueError, match=r"30 x 28 is not a multiple of the patch size 7"):
        tiny1[2].patch_tokens(np.zeros((1, 30, 28, 3), np.float32), resize=False)


def test_bad_texts(tiny1):
    with pytest.raises(ValueError, match="non-empty list of strings"):
        tiny1[2].tokenize([])
    assert tiny1[2].tokenize("a cat").shape == (1, CONTEXT)


@pytest.mark.slow
def test_vit_l14_parity(tmp_path):
    """The full ViT-L/14 architecture (openai/clip-vit-large-patch14's config: 24 x 1024 vision, 12 x 768 text,
    768 projection, QuickGELU), random weights, through save_pretrained and load_clip. ~1.7 GB of weights."""
    vocab = _vocab()
    hf_cfg = HFCLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768,
    )
    torch.manual_seed(0)
    model = HFCLIPModel(hf_cfg).eval()
    model.save_pretrained(tmp_path)
    CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in MERGES], pad_token="<|endoftext|>", model_max_length=77).save_pretrained(tmp_path)
    CLIPImageProcessorPil().save_pretrained(tmp_path)
    clip = load_clip(tmp_path)
    images = [np.random.default_rng(i).integers(0, 256, (300 + i, 250, 3), dtype=np.uint8) for i in range(2)]
    px = CLIPImageProcessorPil()(images=images, return_tensors="pt")["pixel_values"]
    enc = CLIPTokenizer.from_pretrained(tmp_path)(TEXTS, padding="max_length", max_length=77, truncation=True,
                                                  return_tensors="pt")
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=px).pooler_output.numpy()
        hidden = model.vision_model(pixel_values=px).last_hidden_state[:, 1:]
        ref_tok = model.visual_projection(model.vision_model.post_layernorm(hidden)).numpy()
        ref_txt = model.get_text_features(**enc).pooler_output.numpy()
    assert_parity(clip.encode_image(images), ref_img)
    assert_parity(np.asarray(clip.patch_tokens(images)).reshape(ref_tok.shape), ref_tok)
    assert_parity(clip.encode_text(TEXTS), ref_txt)
