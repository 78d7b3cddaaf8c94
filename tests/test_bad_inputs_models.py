"""Bad checkpoints and backbone settings, as tables: each row damages a tiny random-weight SDXL-form pipeline
saved in diffusers' real layout (or passes a bad setting) and names the error it must raise and the message
fragments (regular expressions) that error must contain. Then the documented behaviours around them: a noise
file reproduces a given draw exactly, and the extractor's matmul precision reaches every dot and convolution.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from test_backbone_helpers import build_tiny_pipeline

from spark_jax.backbones.diffusion import BackboneConfig, extract_features, load_backbone
import spark_jax.models.convert as convert
from spark_jax.backbones.checkpoint import CheckpointError

RES = 128  # 16 x 16 latents, 4 x 4 tokens
LATENT = (1, 4, RES // 8, RES // 8)  # torch's NCHW noise layout
W = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def pristine(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sdxl_bad_inputs", "sdxl")


@pytest.fixture
def pipe(pristine, tmp_path):
    """A private copy of the tiny pipeline to damage."""
    root = tmp_path / "pipe"
    shutil.copytree(pristine, root, symlinks=True)
    return root


def load(root: Path, tmp_path: Path, **kw):
    return load_backbone(root, BackboneConfig(resolution=RES, cache_dir=str(tmp_path / "cache"), **kw))


# ----------------------------------------------------------------------------------------------- damage
# Each returns None (load the damaged folder) or the folder to load instead.
def dangling(*rels: str) -> Callable[[Path], None]:
    """Replaces files by symlinks to blobs that never arrived (a partial Hugging Face download)."""

    def damage(root: Path) -> None:
        for i, rel in enumerate(rels):
            (root / rel).unlink()
            os.symlink(f"../../blobs/4f2a9c{i}-never-downloaded", root / rel)

    return damage


def in_hf_cache_with_dangling(rel: str) -> Callable[[Path], Path]:
    """Moves the pipeline into a Hugging Face cache snapshot (models--someone--tiny-sdxl) with ``rel`` dangling."""

    def damage(root: Path) -> Path:
        snap = root.parent / "hub" / "models--someone--tiny-sdxl" / "snapshots" / "0123abc"
        snap.parent.mkdir(parents=True)
        shutil.move(root, snap)
        dangling(rel)(snap)
        return snap

    return damage


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / rel)


def edit_json(rel: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        cfg = json.loads((root / rel).read_text())
        edit(cfg)
        (root / rel).write_text(json.dumps(cfg))

    return damage


def drop_field(rel: str, field: str) -> Callable[[Path], None]:
    return edit_json(rel, lambda cfg: cfg.pop(field))


def overwrite(rel: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        old = (root / rel).read_bytes()
        (root / rel).write_bytes(data(old) if callable(data) else data)

    return damage


def poison(rel: str, key: str, value: float) -> Callable[[Path], None]:
    """Writes ``value`` (NaN or Inf) into one entry of the tensor ``key`` of a safetensors file."""

    def damage(root: Path) -> None:
        tensors = load_file(str(root / rel))
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = value
        save_file(tensors, str(root / rel))

    return damage


def noise_file(array: np.ndarray | None, name: str = "eps.npy", npz: bool = False) -> Callable[[Path], dict]:
    def settings(root: Path) -> dict:
        path = root / name
        if npz:
            with open(path, "wb") as f:
                np.savez(f, eps=array)
        elif array is not None:
            np.save(path, array)
        return {"noise_source": "file", "noise_file": str(path)}

    return settings


class Case(NamedTuple):
    name: str
    damage: Callable[[Path], Path | None] | None  # what is done to the pipeline folder
    settings: Callable[[Path], dict] | dict  # BackboneConfig fields (or a function of the folder giving them)
    error: type[Exception]
    message: tuple[str, ...]
    # raised from the folder and configs alone, before any weight file is read (seconds for SSD-1B)
    before_weights: bool = True


NAN = np.full(LATENT, np.nan, np.float32)
HTML = b"<!DOCTYPE html><html><body>502 Bad Gateway</body></html>"
TEXT_WEIGHTS = "text_encoder_2/model.safetensors"

CASES = [
    # partial Hugging Face downloads: symlinks into blobs/ that point nowhere, named with the fix
    Case("UNet weights a dangling symlink", dangling(f"unet/{W}"), {}, CheckpointError,
         (rf"unet/{W} is a dangling symlink \(-> \.\./\.\./blobs/4f2a9c0-never-downloaded\)",
          "download is incomplete", "huggingface-cli download")),
    Case("dangling symlink in an HF cache snapshot names the repo", in_hf_cache_with_dangling(f"unet/{W}"), {},
         CheckpointError, (rf"unet/{W} is a dangling symlink", "huggingface-cli download someone/tiny-sdxl")),
    Case("several dangling symlinks are listed at once", dangling(TEXT_WEIGHTS, "tokenizer_2/tokenizer.json",
                                                                  "vae/config.json"), {}, CheckpointError,
         ("3 dangling symlinks", "text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json",
          r"vae/config\.json")),
    Case("scheduler config a dangling symlink", dangling("scheduler/scheduler_config.json"), {}, CheckpointError,
         (r"scheduler/scheduler_config\.json is a dangling symlink \(-> ",)),
    # missing component folders
    Case("text_encoder_2/ missing", remove("text_encoder_2"), {}, CheckpointError,
         ("lacks text_encoder_2/", "SDXL-family", "second text encoder", "complete pipeline folder")),
    Case("tokenizer_2/ missing", remove("tokenizer_2"), {}, CheckpointError, ("lacks tokenizer_2/", "SDXL-family")),
    Case("vae/ missing", remove("vae"), {}, CheckpointError, ("lacks vae/", "complete pipeline folder")),
    Case("unet/ missing", remove("unet"), {}, CheckpointError, ("lacks unet/",)),
    Case("scheduler/ missing", remove("scheduler"), {}, CheckpointError, ("lacks scheduler/",)),
    # configs without a field that fixes the model (a class default would build another model silently)
    Case("UNet config without block_out_channels", drop_field("unet/config.json", "block_out_channels"), {},
         CheckpointError, (r"unet/config\.json lacks the required field 'block_out_channels'", "re-download")),
    Case("UNet config without attention_head_dim (changes no shape)",
         drop_field("unet/config.json", "attention_head_dim"), {}, CheckpointError,
         (r"unet/config\.json lacks the required field 'attention_head_dim'",)),
    Case("VAE config without latent_channels", drop_field("vae/config.json", "latent_channels"), {},
         CheckpointError, (r"vae/config\.json lacks the required field 'latent_channels'",)),
    Case("SDXL VAE config without scaling_factor", drop_field("vae/config.json", "scaling_factor"), {},
         CheckpointError, (r"vae/config\.json lacks the required field 'scaling_factor'",)),
    Case("scheduler config without beta_start", drop_field("scheduler/scheduler_config.json", "beta_start"), {},
         CheckpointError, (r"scheduler_config\.json lacks the required field 'beta_start'", "re-download")),
    Case("UNet config not JSON", overwrite("unet/config.json", b"{'block_out_channels': "), {}, CheckpointError,
         (r"unet/config\.json is not valid JSON",)),
    # truncated or corrupt weight files
    Case("UNet weights truncated to half", overwrite(f"unet/{W}", lambda d: d[: len(d) // 2]), {},
         CheckpointError, (rf"unet/{W}", "truncated or corrupt", "download it again"), before_weights=False),
    Case("VAE weights missing their last byte", overwrite(f"vae/{W}", lambda d: d[:-1]), {}, CheckpointError,
         (rf"vae/{W}", "truncated or corrupt"), before_weights=False),
    Case("UNet weights an HTML error page", overwrite(f"unet/{W}", HTML), {}, CheckpointError,
         (rf"unet/{W}", "truncated or corrupt"), before_weights=False),
    Case("text encoder weights truncated", overwrite(TEXT_WEIGHTS, lambda d: d[: len(d) // 2]), {},
         CheckpointError, ("text_encoder_2", "truncated or corrupt"), before_weights=False),
    # non-finite weights: checked once at conversion (measured cost in convert.convert_checkpoint)
    Case("NaN in a UNet weight", poison(f"unet/{W}", "conv_in.weight", np.nan), {}, CheckpointError,
         (rf"unet/{W} holds non-finite weights", r"conv_in\.weight \(1 of \d+\)", "download it again"),
         before_weights=False),
    Case("Inf in a VAE weight", poison(f"vae/{W}", "encoder.conv_out.bias", np.inf), {}, CheckpointError,
         (rf"vae/{W} holds non-finite weights", r"encoder\.conv_out\.bias"), before_weights=False),
    Case("NaN in a text encoder weight", poison(TEXT_WEIGHTS, "text_model.embeddings.position_embedding.weight",
                                                np.nan), {}, CheckpointError,
         ("token embeddings", "text_encoder_2", "not finite"), before_weights=False),
    # settings that only the checkpoint can judge
    Case("timestep past the schedule", None, {"timestep": 1000}, ValueError,
         (r"BackboneConfig\.timestep=1000 is outside the schedule's \[0, 1000\)", r"scheduler_config\.json")),
    Case("resolution not a multiple of the downsampling", None, {"resolution": 100}, ValueError,
         (r"BackboneConfig\.resolution=100 must be a multiple of 32", "e.g. 96 or 128")),
    # noise files: format, shape at the configured resolution, dtype, finiteness
    Case("noise file of the wrong shape", None, noise_file(np.zeros((1, 4, 8, 8), np.float32)), CheckpointError,
         ("eps.npy", r"holds shape \(1, 4, 8, 8\)", r"needs \(1, 4, 16, 16\)", "NCHW")),
    Case("noise file channels-last", None, noise_file(np.zeros((1, 16, 16, 4), np.float32)), CheckpointError,
         (r"holds shape \(1, 16, 16, 4\)", "looks channels-last", r"transpose\(0, 3, 1, 2\)")),
    Case("noise file with NaN", None, noise_file(NAN), CheckpointError, ("1024 non-finite values",)),
    Case("noise file of integers", None, noise_file(np.zeros(LATENT, np.int32)), CheckpointError,
         ("holds int32 values",)),
    Case("noise file missing", None, noise_file(None), CheckpointError, ("eps.npy' does not exist", "np.save")),
    Case("noise file an .npz archive", None, noise_file(np.zeros(LATENT, np.float32), npz=True), CheckpointError,
         ("is an .npz archive",)),
]

SETTINGS = [  # BackboneConfig(**settings) -> ValueError with this message fragment
    ({"noise_source": "file"}, "noise_file is given exactly when noise_source='file'"),
    ({"noise_file": "eps.npy"}, "noise_file is given exactly when noise_source='file'"),
    ({"noise_source": "file", "noise_file": "eps.pt"}, "BackboneConfig.noise_file='eps.pt' must be the path of a .npy"),
    ({"noise_source": "numpy"}, "BackboneConfig.noise_source='numpy'; choose one of ('jax', 'torch', 'file', 'none')"),
    ({"matmul_precision": "fastest"}, "BackboneConfig.matmul_precision='fastest'; choose one of"),
    ({"unet_dtype": "float8"}, "BackboneConfig.unet_dtype='float8'; choose one of"),
    ({"timestep": -1}, "BackboneConfig.timestep must be >= 0"),
    ({"timestep": 50.0}, "BackboneConfig.timestep must be an int, got 50.0"),
    ({"seed": 4.2}, "BackboneConfig.seed must be an int"),
    ({"seed": True}, "BackboneConfig.seed must be an int"),
    ({"seed": -1}, "BackboneConfig.seed must be in [0, 2**32), got -1"),
    ({"seed": 2**32}, "BackboneConfig.seed must be in [0, 2**32)"),
    ({"resolution": 0}, "BackboneConfig.resolution must be positive"),
    ({"resolution": "1024"}, "BackboneConfig.resolution must be an int"),
    ({"prompt": None}, "BackboneConfig.prompt must be a str"),
    ({"variant": "fp16.safetensors"}, "BackboneConfig.variant must be None or a weight-file variant"),
    ({"cache_dir": 3}, "BackboneConfig.cache_dir must be None or a path"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_checkpoint_or_setting(case, pipe, tmp_path, monkeypatch):
    root = pipe
    if case.damage is not None:
        root = case.damage(pipe) or pipe
    settings = case.settings(root) if callable(case.settings) else case.settings
    kw = {"resolution": RES, **settings}
    conversions = []
    real_convert = convert.convert_checkpoint
    monkeypatch.setattr(convert, "convert_checkpoint", lambda *a, **k: conversions.append(1) or real_convert(*a, **k))
    with pytest.raises(case.error) as info:
        load_backbone(root, BackboneConfig(cache_dir=str(tmp_path / "cache"), **kw))
    for fragment in case.message:
        assert re.search(fragment, str(info.value)), f"{fragment!r} not in: {info.value}"
    assert (conversions == []) == case.before_weights, f"weights converted {len(conversions)} time(s)"


@pytest.mark.parametrize("settings, message", SETTINGS, ids=[m for _, m in SETTINGS])
def test_bad_backbone_setting(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BackboneConfig(**settings)


def test_seed_range_is_where_jax_keys_stop_being_distinct():
    """Why seeds stop below 2**32: without x64, JAX keeps a seed's low 32 bits, so 2**32 would draw seed 0's noise."""
    np.testing.assert_array_equal(jax.random.key_data(jax.random.key(2**32)), jax.random.key_data(jax.random.key(0)))
    BackboneConfig(seed=2**32 - 1)


# ----------------------------------------------------------------------------------------------- behaviours
IMAGES = np.random.default_rng(0).integers(0, 256, (1, 96, 80, 3), dtype=np.uint8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_noise_file_holding_the_torch_draw_gives_the_torch_source_features(pipe, tmp_path, dtype):
    eps = torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(42)).numpy()
    np.save(tmp_path / "eps.npy", eps.astype(dtype))  # a float64 copy of a float32 draw casts back exactly
    from_torch = load(pipe, tmp_path, noise_source="torch").extract_features(IMAGES)
    from_file = load(pipe, tmp_path, noise_source="file", noise_file=str(tmp_path / "eps.npy"))
    np.testing.assert_array_equal(np.asarray(from_file.extract_features(IMAGES)), np.asarray(from_torch))
    other = load(pipe, tmp_path, noise_source="torch", seed=7).extract_features(IMAGES)
    assert not np.allclose(np.asarray(other), np.asarray(from_torch))  # the noise does reach the features


def _op_precisions(lowered) -> list[str]:
    """The precision of every dot_general and convolution of a lowered program, e.g. 'HIGHEST HIGHEST'."""
    ops = [line for line in lowered.as_text().splitlines()
           if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert sum("stablehlo.convolution" in op for op in ops) > 10 and sum("dot_general" in op for op in ops) > 10
    # dot_general prints `precision = [HIGHEST, HIGHEST]`, convolution `#stablehlo<precision HIGHEST>` per operand
    pattern = r"precision = \[(\w+), (\w+)\]|<precision (\w+)>"
    return [" ".join(p for m in re.findall(pattern, line) for p in m if p) or "none" for line in ops]


@pytest.mark.parametrize("precision, op_precision", [("highest", "HIGHEST"), ("high", "HIGH"),
                                                     ("default", "DEFAULT")])
def test_matmul_precision_reaches_every_dot_and_convolution(pipe, tmp_path, precision, op_precision):
    backbone = load(pipe, tmp_path, matmul_precision=precision)
    args = (backbone.unet_params, backbone.vae_params, backbone.cond)
    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    prepared = jnp.zeros((1, RES, RES, 3), jnp.float32)
    for lowered in (backbone._jitted.lower(*args, images), backbone._jitted_prepared.lower(*args, prepared)):
        found = _op_precisions(lowered)
        assert {p for p in found if set(p.split()) != {op_precision}} == set(), sorted(set(found))


def test_pure_extractor_is_exact_by_default_whatever_the_callers_setting(pipe, tmp_path):
    backbone = load(pipe, tmp_path)
    unet, vae = backbone._unet_graph, backbone._vae_graph
    from flax import nnx

    def run(up, vp, cond, x):
        return extract_features(nnx.merge(unet, up), nnx.merge(vae, vp), x, cond, timestep=50, resolution=RES)

    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    with jax.default_matmul_precision("bfloat16"):
        found = _op_precisions(jax.jit(run).lower(backbone.unet_params, backbone.vae_params, backbone.cond, images))
    assert set(found) == {"HIGHEST HIGHEST"}
