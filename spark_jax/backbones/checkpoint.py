"""Locating diffusers checkpoints strictly offline, and naming what is missing or broken.

A checkpoint is a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ...) or a
snapshot in the Hugging Face cache (``models--owner--name/snapshots/<rev>``). This module resolves
names and paths, checks that every component folder, config and weight file is there (every dangling
cache link is listed with the repo's download command), and reads configs. Converting the weights
(the one explicit key map) is ``spark_jax.models.convert``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any



_WEIGHTS_NAME = "diffusion_pytorch_model"


# Config fields that fix the architecture: without them a class default would describe another model.
# attention_head_dim (a head count) changes no parameter shape, so the key map cannot catch a wrong default
# (diffusers' 8 would run SDXL's (5, 10, 20)-head blocks with 8 heads); diffusers has written it in every
# UNet config since its first release.
UNET_REQUIRED_FIELDS = ("block_out_channels", "down_block_types", "cross_attention_dim", "in_channels",
                        "attention_head_dim")
VAE_REQUIRED_FIELDS = ("block_out_channels", "down_block_types", "latent_channels")
# The latent scale changes no shape either, and diffusers' default (0.18215, SD 1.x) is wrong for the SDXL
# family (0.13025): required there (``load_backbone``), not for SD 1.x configs older than the field.
SDXL_VAE_REQUIRED_FIELDS = VAE_REQUIRED_FIELDS + ("scaling_factor",)


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, unreadable or does not match the model."""


def default_cache_dir() -> Path:
    """``$SPARK_JAX_CACHE`` or ``~/.cache/spark_jax``."""
    return Path(os.environ.get("SPARK_JAX_CACHE", Path.home() / ".cache" / "spark_jax")).expanduser()


def _hf_hub_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if "HF_HOME" in os.environ:
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _is_diffusers_folder(p: Path) -> bool:
    return (p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file()


def _snapshot(repo_dir: Path) -> Path:
    snapshots = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    candidates = sorted(p for p in snapshots.glob("*") if p.is_dir()) if snapshots.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"{repo_dir} holds no snapshot; download the model again with huggingface-cli")
    raise CheckpointError(
        f"{repo_dir} holds {len(candidates)} snapshots and no refs/main; pass the snapshot folder itself, "
        f"one of: {', '.join(str(c) for c in candidates)}"
    )


def resolve_pretrained(name_or_path: str | os.PathLike, *, hf_cache_dir: str | os.PathLike | None = None) -> Path:
    """Finds a diffusers checkpoint folder, never touching the network.

    Args:
      name_or_path: a diffusers folder, a snapshot or ``models--owner--name`` folder of the Hugging
        Face cache, or a repo id such as ``segmind/SSD-1B`` looked up in that cache.
      hf_cache_dir: the hub cache (default ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).

    Returns:
      The folder holding ``unet/``, ``vae/``, ... .

    Raises:
      CheckpointError: naming what is missing and what to do.
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if _is_diffusers_folder(p):
            return p
        if p.name.startswith("models--"):
            snap = _snapshot(p)
            if _is_diffusers_folder(snap):
                return snap
            raise CheckpointError(f"snapshot {snap} is not a diffusers pipeline (no model_index.json or unet/)")
        raise CheckpointError(
            f"{p} is not a diffusers pipeline folder: it has no model_index.json and no unet/config.json. "
            "Pass the folder written by `DiffusionPipeline.save_pretrained` or a Hugging Face cache snapshot."
        )
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the diffusers pipeline folder that contains it")
    repo_dir = cached_repo_dir(name_or_path, hf_cache_dir)
    if repo_dir is not None:
        return resolve_pretrained(repo_dir)
    raise CheckpointError(f"checkpoint folder {p} does not exist")


def cached_repo_dir(name: str | os.PathLike, hf_cache_dir: str | None = None) -> Path | None:
    """The Hugging Face cache folder (``models--owner--name``) of a repo id ``owner/name``; None if ``name`` is not
    of that form (a local path); CheckpointError, saying how to fetch it, if the cache does not hold it."""
    text = str(name)
    parts = text.split("/")
    if not (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))):
        return None
    hub = Path(hf_cache_dir).expanduser() if hf_cache_dir is not None else _hf_hub_cache()
    repo_dir = hub / f"models--{parts[0]}--{parts[1]}"
    if repo_dir.is_dir():
        return repo_dir
    raise CheckpointError(
        f"{text!r} is neither a local folder nor in the Hugging Face cache ({repo_dir} does not exist). "
        "spark_jax never downloads: fetch it where there is network (`huggingface-cli download "
        f"{text}`) and pass the folder, or set HF_HUB_CACHE."
    )


def hf_repo_id(path: str | os.PathLike) -> str | None:
    """``owner/name`` when ``path`` is in a Hugging Face cache snapshot (``models--owner--name/snapshots/<rev>``)."""
    for parent in Path(path).parents:
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            owner, _, name = parent.parent.name[len("models--"):].partition("--")
            return f"{owner}/{name}" if owner and name else None
    return None


def _download_command(path: Path) -> str:
    return f"`huggingface-cli download {hf_repo_id(path) or '<owner>/<name>'}`"


def _redownload_hint(path: Path) -> str:
    return f"re-run {_download_command(path)} (it resumes and restores missing blobs) or pass a complete folder"


def dangling_link_error(path: Path) -> CheckpointError | None:
    """A CheckpointError when ``path`` is a symlink to nothing (a Hugging Face cache snapshot whose blob is
    missing: an interrupted download or a cleaned cache), else None."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return CheckpointError(
            f"{path} is a dangling symlink (-> {os.readlink(path)}): the Hugging Face download is incomplete; "
            + _redownload_hint(path)
        )
    return None


# Folders the feature extractor reads: the UNet, the VAE, the noise schedule and the prompt's encoder(s).
PIPELINE_COMPONENTS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
SECOND_ENCODER_COMPONENTS = ("text_encoder_2", "tokenizer_2")


def needs_second_encoder(root: Path) -> bool:
    """Whether a pipeline is of the SDXL family (two text encoders): ``model_index.json`` lists
    ``text_encoder_2`` or the UNet's config has ``addition_embed_type='text_time'``. Unreadable files say no
    here; reading them later raises the error that names them."""
    for path, key, wanted in ((root / "model_index.json", "text_encoder_2", None),
                              (root / "unet" / "config.json", "addition_embed_type", "text_time")):
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if (value == wanted) if wanted is not None else (value not in (None, [None, None])):
            return True
    return False


def check_pipeline_files(root: str | os.PathLike, components: Sequence[str] | None = None) -> None:
    """Checks that a pipeline folder holds every component the extractor reads and no dangling symlink.

    A partial Hugging Face download leaves symlinks into ``blobs/`` that point nowhere, often several; a
    copied pipeline may lack a folder. Both are reported at once, before anything is loaded, each by name,
    instead of surfacing one at a time from deep inside a loader. Costs one ``lstat`` per file.

    Args:
      root: the pipeline folder (from ``resolve_pretrained``).
      components: folder names to require (default ``PIPELINE_COMPONENTS``, plus
        ``SECOND_ENCODER_COMPONENTS`` when ``needs_second_encoder``).

    Raises:
      CheckpointError: listing the missing folders and dangling links, with the fix.
    """
    root = Path(root)
    if components is None:
        components = PIPELINE_COMPONENTS + (SECOND_ENCODER_COMPONENTS if needs_second_encoder(root) else ())
    def is_dangling(p: Path) -> bool:
        return p.is_symlink() and not p.exists()

    dangling = [p for p in (root / "model_index.json", *(root / c for c in components)) if is_dangling(p)]
    missing = [c for c in components if not (root / c).is_dir() and root / c not in dangling]
    for c in components:
        if (root / c).is_dir():
            dangling += sorted(p for p in (root / c).rglob("*") if is_dangling(p))
    if missing and not dangling:
        second = [c for c in missing if c in SECOND_ENCODER_COMPONENTS]
        why = (
            " (an SDXL-family pipeline: its UNet, addition_embed_type='text_time', is conditioned on the pooled "
            "embedding of the second text encoder)" if second else ""
        )
        raise CheckpointError(
            f"{root} lacks {', '.join(c + '/' for c in missing)}{why}. The extractor reads "
            f"{', '.join(c + '/' for c in components)}: use the complete pipeline folder ({_download_command(root)}, "
            "or the folder DiffusionPipeline.save_pretrained writes)"
        )
    if dangling:
        if len(dangling) == 1:
            what = f"{dangling[0].relative_to(root)} is a dangling symlink (-> {os.readlink(dangling[0])})"
        else:
            links = ", ".join(f"{p.relative_to(root)} (-> {os.readlink(p)})" for p in dangling[:8])
            more = f" and {len(dangling) - 8} more" if len(dangling) > 8 else ""
            what = f"{len(dangling)} dangling symlinks: {links}{more}"
        lacks = f"; {', '.join(c + '/' for c in missing)} missing" if missing else ""
        raise CheckpointError(
            f"{root}: {what}{lacks}: the Hugging Face download is incomplete; {_redownload_hint(root)}"
        )


def require_fields(config: Mapping[str, Any], fields: Sequence[str], source: str) -> None:
    """Raises CheckpointError naming ``source`` and every field of ``fields`` that ``config`` lacks.

    diffusers writes every constructor argument into its configs, so a missing architecture or schedule field
    means a damaged or hand-edited file: filling it with a class default would build another model silently.
    """
    missing = [f for f in fields if f not in config]
    if missing:
        raise CheckpointError(
            f"{source} lacks the required field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            "the file is damaged or hand-edited: re-download it or re-save the model with diffusers"
        )


def read_config(component_dir: Path) -> dict[str, Any]:
    """Reads ``<component>/config.json`` with a clear error when missing or malformed."""
    path = Path(component_dir) / "config.json"
    if (err := dangling_link_error(path)) is not None:
        raise err
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing; the checkpoint folder must hold the diffusers layout ({path.parent.name}/config.json)"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the model") from e


def weight_files(component_dir: Path, *, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of a component, single or sharded.

    Args:
      component_dir: e.g. ``<root>/unet``.
      variant: e.g. ``"fp16"`` for ``diffusion_pytorch_model.fp16.safetensors``; None prefers the
        plain file and falls back to the fp16 variant.
    """
    component_dir = Path(component_dir)
    if not component_dir.is_dir():
        raise CheckpointError(f"{component_dir} does not exist; the checkpoint has no {component_dir.name}/ folder")
    variants = [variant] if variant is not None else [None, "fp16"]
    for v in variants:
        stem = _WEIGHTS_NAME if v is None else f"{_WEIGHTS_NAME}.{v}"
        single = component_dir / f"{stem}.safetensors"
        index = component_dir / f"{stem}.safetensors.index.json"
        if (err := dangling_link_error(single)) is not None:
            raise err
        if single.exists():
            return [single]
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from e
            return [component_dir / s for s in shards]
    found = sorted(p.name for p in component_dir.iterdir())
    hint = (
        " Only PyTorch .bin weights are present: re-save them as safetensors "
        "(`model.save_pretrained(folder, safe_serialization=True)`)."
        if any(f.endswith(".bin") for f in found)
        else ""
    )
    want = f"{_WEIGHTS_NAME}{'' if variant is None else '.' + variant}.safetensors"
    raise CheckpointError(f"no {want} in {component_dir} (found: {found}).{hint}")
