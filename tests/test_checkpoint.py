"""Loading diffusers checkpoints: locating them offline, the strict key map, clear errors, the cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import diffusers  # noqa: E402,F401  (oracles are imported plainly: see conftest)

from test_backbone_helpers import build_tiny_pipeline  # noqa: E402

import spark_jax.models.convert as convert  # noqa: E402
from spark_jax.backbones.checkpoint import CheckpointError, resolve_pretrained  # noqa: E402
from spark_jax.models.convert import load_unet, load_vae_encoder  # noqa: E402
from spark_jax.models import UnsupportedArchitectureError  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def sdxl_root(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sdxl", "sdxl")


@pytest.fixture
def copy_root(sdxl_root, tmp_path):
    """A private copy of the tiny pipeline's unet/ and vae/ to damage."""
    root = tmp_path / "pipe"
    root.mkdir()
    (root / "model_index.json").write_text((sdxl_root / "model_index.json").read_text())
    for c in ("unet", "vae"):
        shutil.copytree(sdxl_root / c, root / c)
    return root


def _params(model):
    return jax.tree.leaves(jax.tree.map(np.asarray, model))


def _assert_same_params(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- locating checkpoints -------------------------------------------------------------------------


def _fake_hf_cache(tmp_path: Path, snapshot_src: Path, with_ref: bool = True) -> Path:
    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-sdxl"
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for child in snapshot_src.iterdir():
        os.symlink(child, snap / child.name)
    if with_ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
    return hub


@pytest.mark.parametrize("with_ref", [True, False])
def test_resolves_repo_id_and_cache_folders_offline(sdxl_root, tmp_path, with_ref):
    hub = _fake_hf_cache(tmp_path, sdxl_root, with_ref)
    snap = hub / "models--someone--tiny-sdxl" / "snapshots" / "0123abc"
    assert resolve_pretrained("someone/tiny-sdxl", hf_cache_dir=hub) == snap
    assert resolve_pretrained(hub / "models--someone--tiny-sdxl") == snap
    assert resolve_pretrained(snap) == snap
    assert resolve_pretrained(sdxl_root) == sdxl_root


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: "someone/not-cached", "never downloads"),
        (lambda p: p / "does-not-exist", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a diffusers pipeline folder"),
    ],
)
def test_locating_errors_say_what_to_do(tmp_path, make, match):
    with pytest.raises(CheckpointError, match=match):
        resolve_pretrained(make(tmp_path), hf_cache_dir=tmp_path / "hub")


# --- strict conversion ----------------------------------------------------------------------------


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


@pytest.mark.parametrize(
    "component,edit,match",
    [
        ("unet", lambda t: t.pop("down_blocks.1.attentions.0.proj_in.weight"), "missing key.*proj_in.weight"),
        ("unet", lambda t: t.__setitem__("down_blocks.0.extra.weight", np.zeros(3, np.float32)),
         "unexpected key.*down_blocks.0.extra.weight"),
        ("unet", lambda t: t.__setitem__("conv_in.weight", np.zeros((16, 4, 1, 1), np.float32)),
         r"shape mismatch.*conv_in.weight: checkpoint \(16, 4, 1, 1\), model expects \(16, 4, 3, 3\)"),
        ("vae", lambda t: t.pop("encoder.mid_block.attentions.0.to_q.bias"), "missing key.*to_q.bias"),
    ],
)
def test_key_map_rejects_missing_unexpected_and_misshapen_keys(copy_root, tmp_path, component, edit, match):
    _edit_weights(copy_root / component, edit)
    load = load_unet if component == "unet" else load_vae_encoder
    with pytest.raises(CheckpointError, match=match):
        load(copy_root, cache_dir=tmp_path / "cache")


def test_a_unet_file_pruned_after_the_feature_point_names_its_missing_keys(copy_root, tmp_path):
    """The whole UNet is built, so every key is required: a file cut after the feature point is incomplete."""
    def prune(t):
        after = ("up_blocks.", "mid_block.", "conv_out.", "down_blocks.2.attentions.1.proj_out")
        for k in [k for k in t if k.startswith(after)]:
            del t[k]

    _edit_weights(copy_root / "unet", prune)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): .*(up_blocks|mid_block|conv_out)"):
        load_unet(copy_root, use_cache=False)


def test_legacy_vae_attention_names_are_accepted(copy_root, sdxl_root):
    def rename(t):
        prefix = "encoder.mid_block.attentions.0."
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            for leaf in ("weight", "bias"):
                t[prefix + old + "." + leaf] = t.pop(prefix + new + "." + leaf)

    _edit_weights(copy_root / "vae", rename)
    legacy, _ = load_vae_encoder(copy_root, use_cache=False)
    current, _ = load_vae_encoder(sdxl_root, use_cache=False)
    _assert_same_params(legacy, current)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated or corrupt"),
        (lambda f: f.write_bytes(b"not a safetensors file at all"), "truncated or corrupt"),
        (lambda f: f.rename(f.with_suffix(".bin")), "Only PyTorch .bin weights"),
        (lambda f: (f.parent / "config.json").unlink(), "config.json is missing"),
        (lambda f: shutil.rmtree(f.parent), "no unet/ folder|unet.*(does not exist|missing)"),
    ],
)
def test_damaged_or_missing_files_name_the_file(copy_root, tmp_path, damage, match):
    damage(copy_root / "unet" / WEIGHTS)
    with pytest.raises(CheckpointError, match=match):
        load_unet(copy_root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"], "AttnDownBlock2D"),
        ("time_embedding_type", "fourier", "time_embedding_type"),
        ("addition_embed_type", "image", "addition_embed_type"),
        ("_class_name", "UNetSpatioTemporalConditionModel", "_class_name"),
    ],
)
def test_unsupported_architectures_are_named(copy_root, field, value, match):
    cfg_path = copy_root / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match=match):
        load_unet(copy_root, use_cache=False)


# --- variants and the conversion cache ------------------------------------------------------------


def test_fp16_variant_loads_and_matches_fp32_to_fp16_rounding(copy_root, sdxl_root):
    folder = copy_root / "unet"
    tensors = load_file(str(folder / WEIGHTS))
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_file(half, str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    (folder / WEIGHTS).unlink()
    half, _ = load_unet(copy_root, use_cache=False)  # falls back to the fp16 variant
    full, _ = load_unet(sdxl_root, use_cache=False)
    for a, b in zip(_params(half), _params(full), strict=True):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_second_load_reads_the_cache_and_a_changed_file_invalidates_it(copy_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, _ = load_unet(copy_root, cache_dir=cache)
    assert len(list((cache / "converted").glob("unet-*.safetensors"))) == 1

    real_convert = convert.convert_checkpoint
    calls = []
    monkeypatch.setattr(convert, "convert_checkpoint", lambda *a, **k: calls.append(1) or real_convert(*a, **k))
    cached, _ = load_unet(copy_root, cache_dir=cache)
    assert calls == []
    _assert_same_params(first, cached)

    _edit_weights(copy_root / "unet", lambda t: t.__setitem__("conv_in.bias", t["conv_in.bias"] + 1.0))
    changed, _ = load_unet(copy_root, cache_dir=cache)
    assert calls == [1]
    np.testing.assert_allclose(np.asarray(changed.conv_in.bias), np.asarray(first.conv_in.bias) + 1.0, rtol=1e-6)


def test_damaged_cache_entry_is_rebuilt(copy_root, tmp_path):
    cache = tmp_path / "cache"
    first, _ = load_unet(copy_root, cache_dir=cache)
    (entry,) = (cache / "converted").glob("unet-*.safetensors")
    entry.write_bytes(b"garbage")
    again, _ = load_unet(copy_root, cache_dir=cache)
    _assert_same_params(first, again)
