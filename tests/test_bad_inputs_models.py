"""Bad checkpoints and backbone settings, as a table: each row damages a tiny random-weight SDXL-form pipeline
saved in diffusers' real layout (or passes a bad setting) and names the error and the message fragments it must
raise. Then the two documented behaviours: a noise file reproduces a given draw exactly, and the extractor's
matmul precision reaches every dot and convolution.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_backbone_helpers import build_tiny_pipeline

from spark_jax.backbone import BackboneConfig, load_backbone
from spark_jax.checkpoint import CheckpointError

RES = 128  # 16 x 16 latents, 4 x 4 tokens
LATENT = (1, 4, RES // 8, RES // 8)  # torch's NCHW noise layout


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
def dangling(rel: str) -> Callable[[Path], None]:
    """Replaces a file by a symlink to a blob that never arrived (a partial Hugging Face download)."""

    def damage(root: Path) -> None:
        (root / rel).unlink()
        os.symlink("../../blobs/4f2a9c-never-downloaded", root / rel)

    return damage


def remove(rel: str) -> Callable[[Path], None]:
    return lambda root: shutil.rmtree(root / rel)


def drop_field(rel: str, field: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        cfg = json.loads((root / rel).read_text())
        del cfg[field]
        (root / rel).write_text(json.dumps(cfg))

    return damage


def truncate(rel: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 2])

    return damage


def noise_file(array: np.ndarray | None) -> Callable[[Path], dict]:
    def settings(root: Path) -> dict:
        path = root / "eps.npy"
        if array is not None:
            np.save(path, array)
        return {"noise_source": "file", "noise_file": str(path)}

    return settings


class Case(NamedTuple):
    name: str
    damage: Callable[[Path], None] | None  # what is done to the pipeline folder
    settings: Callable[[Path], dict] | dict  # BackboneConfig fields (or a function of the folder giving them)
    error: type[Exception]
    message: tuple[str, ...]


W = "diffusion_pytorch_model.safetensors"
NAN = np.full(LATENT, np.nan, np.float32)

CASES = [
    Case("UNet weights a dangling symlink", dangling(f"unet/{W}"), {}, CheckpointError,
         (rf"unet/{W} is a dangling symlink", "download is incomplete", "huggingface-cli download")),
    Case("VAE config a dangling symlink", dangling("vae/config.json"), {}, CheckpointError,
         (r"vae/config\.json is a dangling symlink",)),
    Case("scheduler config a dangling symlink", dangling("scheduler/scheduler_config.json"), {}, CheckpointError,
         (r"scheduler_config\.json is a dangling symlink",)),
    Case("text_encoder_2/ missing", remove("text_encoder_2"), {}, CheckpointError,
         ("text_encoder_2 is missing", "text_time", "complete pipeline folder")),
    Case("UNet config without block_out_channels", drop_field("unet/config.json", "block_out_channels"), {},
         CheckpointError, (r"unet/config\.json lacks the required field 'block_out_channels'",)),
    Case("VAE config without latent_channels", drop_field("vae/config.json", "latent_channels"), {},
         CheckpointError, (r"vae/config\.json lacks the required field 'latent_channels'",)),
    Case("scheduler config without beta_start", drop_field("scheduler/scheduler_config.json", "beta_start"), {},
         CheckpointError, (r"scheduler_config\.json lacks the required field 'beta_start'", "re-download")),
    Case("UNet weights truncated", truncate(f"unet/{W}"), {}, CheckpointError,
         (rf"unet/{W}", "truncated or corrupt")),
    Case("noise file of the wrong shape", None, noise_file(np.zeros((1, 4, 8, 8), np.float32)), CheckpointError,
         (r"holds shape \(1, 4, 8, 8\)", r"needs \(1, 4, 16, 16\)", "NCHW")),
    Case("noise file with NaN", None, noise_file(NAN), CheckpointError, ("1024 non-finite values",)),
    Case("noise file of integers", None, noise_file(np.zeros(LATENT, np.int32)), CheckpointError,
         ("holds int32 values",)),
    Case("noise file missing", None, noise_file(None), CheckpointError, ("cannot be read as a .npy array",)),
    Case("timestep past the schedule", None, {"timestep": 1000}, ValueError,
         (r"timestep 1000 is outside the schedule's \[0, 1000\)",)),
    Case("resolution not a multiple of the downsampling", None, {"resolution": 100}, ValueError,
         ("must be a multiple of 32",)),
]

SETTINGS = [
    ({"noise_source": "file"}, "noise_file is given exactly when noise_source='file'"),
    ({"noise_file": "eps.npy"}, "noise_file is given exactly when noise_source='file'"),
    ({"noise_source": "numpy"}, "noise_source='numpy'; choose one of"),
    ({"matmul_precision": "fastest"}, "matmul_precision='fastest'; choose one of"),
    ({"unet_dtype": "float8"}, "unet_dtype='float8'"),
    ({"timestep": -1}, "timestep must be >= 0"),
    ({"seed": 4.2}, "seed must be an int"),
    ({"resolution": 0}, "resolution must be positive"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_checkpoint_or_setting(case, pipe, tmp_path):
    if case.damage is not None:
        case.damage(pipe)
    settings = case.settings(pipe) if callable(case.settings) else case.settings
    kw = {"resolution": RES, **settings}
    with pytest.raises(case.error) as info:
        load_backbone(pipe, BackboneConfig(cache_dir=str(tmp_path / "cache"), **kw))
    for fragment in case.message:
        assert re.search(fragment, str(info.value)), f"{fragment!r} not in: {info.value}"


@pytest.mark.parametrize("settings, message", SETTINGS, ids=[m for _, m in SETTINGS])
def test_bad_backbone_setting(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BackboneConfig(**settings)


# ----------------------------------------------------------------------------------------------- behaviours
def test_a_noise_file_holding_the_torch_draw_gives_the_torch_source_features(pipe, tmp_path):
    eps = torch.randn(LATENT, generator=torch.Generator("cpu").manual_seed(42)).numpy()
    np.save(tmp_path / "eps.npy", eps)
    images = np.random.default_rng(0).integers(0, 256, (1, 96, 80, 3), dtype=np.uint8)
    from_torch = load(pipe, tmp_path, noise_source="torch").extract_features(images)
    from_file = load(pipe, tmp_path, noise_source="file", noise_file=str(tmp_path / "eps.npy"))
    np.testing.assert_array_equal(np.asarray(from_file.extract_features(images)), np.asarray(from_torch))


def _precisions(backbone, images) -> list[str]:
    """The precision attribute of every dot_general and convolution of the extractor's program."""
    text = backbone._jitted.lower(backbone.unet_params, backbone.vae_params, backbone.cond, images).as_text()
    ops = [line for line in text.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]
    assert len(ops) > 20  # the UNet's and the VAE's
    return [" ".join(re.findall(r"(?:precision = \[|<precision )(\w+)", line)) or "none" for line in ops]


def test_matmul_precision_reaches_every_dot_and_convolution(pipe, tmp_path):
    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    exact = _precisions(load(pipe, tmp_path), images)
    assert all(p.split() and set(p.split()) == {"HIGHEST"} for p in exact), sorted(set(exact))
    backend_default = _precisions(load(pipe, tmp_path, matmul_precision="default"), images)
    assert not any("HIGHEST" in p for p in backend_default)
