"""Loading diffusers checkpoints into the Flax NNX encoders, strictly offline.

A checkpoint is a local diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ...) or a
snapshot in the Hugging Face cache (``models--owner--name/snapshots/<rev>``). Weights are read from
safetensors with the numpy backend (fp16 or fp32), converted by ONE explicit key map and cached, so
the next start reads a single converted file.

The key map (``diffusers_key``) is derived from the module tree, leaf by leaf, with these rules and
nothing else: the parameter path ``a.b.0.c.kernel`` is the checkpoint key ``a.b.0.c.weight``,
transposed (Linear ``[out, in] -> [in, out]``, Conv ``OIHW -> HWIO``); ``scale`` is ``weight``;
``bias`` is ``bias``. Every parameter must be found with its exact shape, and every checkpoint key
must either be used or belong to a module after the feature point (listed explicitly by
``UNetEncoderConfig.skipped_checkpoint_prefixes`` and the VAE decoder prefixes). Anything else is an
error that names the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from spark_jax.models.unet_encoder import UNetEncoder, UNetEncoderConfig
from spark_jax.models.vae_encoder import VAEEncoder, VAEEncoderConfig

# Bump when the conversion rules change: invalidates every cached converted file.
CONVERSION_VERSION = 2  # 2: converted arrays are checked finite
_WEIGHTS_NAME = "diffusion_pytorch_model"
# The VAE decoder and post_quant_conv are not used by feature extraction.
VAE_SKIPPED_PREFIXES = ("decoder.", "post_quant_conv.")
# Attention names written by diffusers < 0.14 (still found in some VAE checkpoints).
VAE_LEGACY_ALIASES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

M = TypeVar("M", bound=nnx.Module)


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
    text = str(name_or_path)
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not text.startswith((".", "~")):
        hub = Path(hf_cache_dir).expanduser() if hf_cache_dir is not None else _hf_hub_cache()
        repo_dir = hub / f"models--{parts[0]}--{parts[1]}"
        if repo_dir.is_dir():
            return resolve_pretrained(repo_dir)
        raise CheckpointError(
            f"{text!r} is neither a local folder nor in the Hugging Face cache ({repo_dir} does not exist). "
            "spark_jax never downloads: fetch it where there is network (`huggingface-cli download "
            f"{text}`) and pass the folder, or set HF_HUB_CACHE."
        )
    raise CheckpointError(f"checkpoint folder {p} does not exist")


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


class _SafetensorsReader:
    """Lazy reader over one or more safetensors files (numpy backend): keys first, tensors on demand."""

    def __init__(self, files: Sequence[Path]):
        self.files = [Path(f) for f in files]
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for f in self.files:
            if (err := dangling_link_error(f)) is not None:
                raise err
            if not f.exists():
                raise CheckpointError(
                    f"weights file {f} is missing (a broken Hugging Face cache link?); download the model again"
                )
            handle = self._open(f)
            for k in handle.keys():
                self.where[k] = f

    def _open(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(
                    f"cannot read {f}: {e}. The file is truncated or corrupt; delete it and download it again."
                ) from e
        return self._handles[f]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[key]).get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        f = self.where[key]
        try:
            return self._open(f).get_tensor(key)
        except (SafetensorError, TypeError, ValueError) as e:
            dtype = self._open(f).get_slice(key).get_dtype()
            if dtype in ("BF16", "bfloat16"):
                raise CheckpointError(
                    f"{f}: {key} is bfloat16, which the numpy reader cannot hold; use the fp16 or fp32 weights"
                ) from e
            raise CheckpointError(f"cannot read {key} from {f}: {e}. The file is corrupt; download it again.") from e


def diffusers_key(path: Sequence[Any], ndim: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """The checkpoint key of a parameter path and the map from the checkpoint array to ours.

    Args:
      path: NNX parameter path, e.g. ``("down_blocks", 1, "resnets", 0, "conv1", "kernel")``.
      ndim: rank of our parameter.
    """
    *module, leaf = (str(p) for p in path)
    prefix = ".".join(module)
    if leaf == "kernel" and ndim == 2:  # Linear: torch [out, in] -> [in, out]
        return f"{prefix}.weight", lambda w: np.ascontiguousarray(w.T)
    if leaf == "kernel" and ndim == 4:  # Conv: torch OIHW -> HWIO
        return f"{prefix}.weight", lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if leaf == "scale":
        return f"{prefix}.weight", lambda w: w
    if leaf == "bias":
        return f"{prefix}.bias", lambda w: w
    raise CheckpointError(f"no conversion rule for parameter {'.'.join(map(str, path))} (rank {ndim})")


def _flat_params(abstract: nnx.Module) -> dict[tuple[Any, ...], jax.ShapeDtypeStruct]:
    _, state = nnx.split(abstract)
    return {tuple(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def convert_checkpoint(
    abstract: nnx.Module,
    files: Sequence[Path],
    *,
    skipped_prefixes: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
) -> dict[tuple[Any, ...], np.ndarray]:
    """Reads and converts every parameter of ``abstract`` from diffusers safetensors files.

    Args:
      abstract: the module (shapes only, from ``nnx.eval_shape``).
      files: safetensors files of the component.
      skipped_prefixes: key prefixes of modules after the feature point (used by diffusers, not by us).
      aliases: ``{new_fragment: legacy_fragment}`` spellings accepted when the new key is absent.

    Returns:
      ``{parameter path: array}`` in the checkpoint's dtype, in our layout.

    Raises:
      CheckpointError: on missing keys, unused keys, or shape mismatches, naming each.
    """
    reader = _SafetensorsReader(files)
    names = ", ".join(f.name for f in reader.files)
    params = _flat_params(abstract)
    plan: dict[tuple[Any, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
    missing, mismatched = [], []
    for path, spec in params.items():
        key, transform = diffusers_key(path, len(spec.shape))
        if key not in reader.where:
            for new, old in (aliases or {}).items():
                if new in key and key.replace(new, old) in reader.where:
                    key = key.replace(new, old)
                    break
        if key not in reader.where:
            missing.append(key)
            continue
        got, want = reader.shape(key), _torch_shape(spec.shape, path)
        if got != want:
            mismatched.append(f"{key}: checkpoint {got}, model expects {want}")
            continue
        plan[path] = (key, transform)
    used = {key for key, _ in plan.values()}
    unexpected = sorted(
        k for k in reader.where if k not in used and not k.startswith(tuple(skipped_prefixes))
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_some(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_some(mismatched)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_some(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{names} does not match the model built from its config.json: " + "; ".join(problems)
            + ". Check that config.json and the weights come from the same model (and that the model is "
            "of a supported family)."
        )
    arrays = {path: transform(reader.get(key)) for path, (key, transform) in plan.items()}
    # A NaN or Inf weight makes every feature NaN. Checked once per conversion (the cache holds checked
    # arrays). Measured on the SDXL VAE encoder (34M weights, file in the page cache, this 2-core CPU):
    # 0.008 of 0.40 s for float32 weights, 0.05 of 0.11 s for float16 (numpy's float16 isfinite is slow);
    # for SSD-1B's 444M-weight encoder that is ~0.1 s (float32) or ~0.65 s (fp16 variant), once.
    bad = []
    for path, (key, _) in plan.items():
        n_bad = arrays[path].size - int(np.count_nonzero(np.isfinite(arrays[path])))
        if n_bad:
            bad.append((key, f"{key} ({n_bad} of {arrays[path].size})"))
    if bad:
        raise CheckpointError(
            f"{', '.join(sorted({str(reader.where[k]) for k, _ in bad}))} holds non-finite weights (NaN or Inf) in "
            f"{len(bad)} tensor(s): {_some([text for _, text in bad])}. The file is corrupt or was saved from a "
            "diverged model: delete it and download it again."
        )
    return arrays


def _torch_shape(shape: Sequence[int], path: Sequence[Any]) -> tuple[int, ...]:
    """The diffusers (PyTorch) shape of one of our parameters."""
    if str(path[-1]) == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    if str(path[-1]) == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def _some(items: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def _cache_digest(files: Sequence[Path], config_path: Path, params: Mapping[tuple[Any, ...], Any]) -> str:
    h = hashlib.sha256()
    h.update(f"v{CONVERSION_VERSION}".encode())
    h.update(config_path.read_bytes())
    for f in files:
        st = Path(f).resolve().stat()
        h.update(f"{Path(f).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for path, spec in sorted(params.items(), key=lambda kv: tuple(map(str, kv[0]))):
        h.update(f"{'/'.join(map(str, path))}:{tuple(spec.shape)}".encode())
    return h.hexdigest()[:24]


def _path_str(path: Sequence[Any]) -> str:
    return "/".join(map(str, path))


def load_converted(
    factory: Callable[[], M] | tuple[nnx.GraphDef, nnx.State],
    component_dir: Path,
    *,
    variant: str | None = None,
    dtype: jnp.dtype = jnp.float32,
    skipped_prefixes: Sequence[str] = (),
    aliases: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> M:
    """Builds ``factory()`` with weights from ``component_dir``, through the conversion cache.

    The cache file is keyed by the conversion version, ``config.json``'s bytes, each weight file's
    name, size and mtime, and the parameter shapes; it stores the converted arrays in the
    checkpoint's own dtype. A stale or damaged cache entry is rebuilt.

    Args:
      factory: builds the module (called under ``nnx.eval_shape``: no random init is paid), or an
        already abstract ``(graphdef, state)`` pair (see ``abstract_module``).
      component_dir: e.g. ``<root>/unet``.
      variant: weight-file variant (``"fp16"``) or None.
      dtype: parameter dtype of the returned module.
      skipped_prefixes, aliases: see ``convert_checkpoint``.
      cache_dir: where converted files go (default ``default_cache_dir()``).
      use_cache: read and write the cache.
    """
    component_dir = Path(component_dir)
    files = weight_files(component_dir, variant=variant)
    graphdef, abstract_state = factory if isinstance(factory, tuple) else nnx.split(nnx.eval_shape(factory))
    abstract = nnx.merge(graphdef, abstract_state, copy=True)
    params = _flat_params(abstract)
    arrays: dict[tuple[Any, ...], np.ndarray] | None = None
    cache_file = None
    if use_cache:
        cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        digest = _cache_digest(files, component_dir / "config.json", params)
        cache_file = cache_root / "converted" / f"{component_dir.name}-{digest}.safetensors"
        arrays = _read_cache(cache_file, params)
    if arrays is None:
        arrays = convert_checkpoint(abstract, files, skipped_prefixes=skipped_prefixes, aliases=aliases)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            save_file({_path_str(p): a for p, a in arrays.items()}, str(tmp))
            os.replace(tmp, cache_file)
    _, state = nnx.split(abstract)
    nested: dict[Any, Any] = {}
    for path, arr in arrays.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr, dtype=dtype)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def _read_cache(cache_file: Path, params: Mapping[tuple[Any, ...], Any]) -> dict[tuple[Any, ...], np.ndarray] | None:
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="numpy") as f:
            keys = set(f.keys())
            if keys != {_path_str(p) for p in params}:
                return None
            out = {p: f.get_tensor(_path_str(p)) for p in params}
    except (SafetensorError, OSError):
        return None  # damaged cache entry: reconvert and overwrite
    if any(tuple(out[p].shape) != tuple(spec.shape) for p, spec in params.items()):
        return None
    return out


@functools.lru_cache(maxsize=8)
def abstract_module(cfg: UNetEncoderConfig | VAEEncoderConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes-only (graphdef, state) of the module a config describes, memoised per config.

    Tracing every initializer under ``nnx.eval_shape`` takes seconds for an SDXL UNet; loading the
    same architecture again reuses it.
    """
    cls = UNetEncoder if isinstance(cfg, UNetEncoderConfig) else VAEEncoder
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))))


def unet_encoder_config(root: str | os.PathLike) -> UNetEncoderConfig:
    """The UNet encoder's architecture from ``<root>/unet/config.json`` (required fields checked); no weights read."""
    folder = resolve_pretrained(root) / "unet"
    raw = read_config(folder)
    require_fields(raw, UNET_REQUIRED_FIELDS, str(folder / "config.json"))
    return UNetEncoderConfig.from_diffusers(raw, source=str(folder / "config.json"))


def vae_encoder_config(
    root: str | os.PathLike, *, required_fields: Sequence[str] = VAE_REQUIRED_FIELDS
) -> VAEEncoderConfig:
    """The VAE encoder's architecture from ``<root>/vae/config.json`` (``required_fields`` checked); no weights read."""
    folder = resolve_pretrained(root) / "vae"
    raw = read_config(folder)
    require_fields(raw, required_fields, str(folder / "config.json"))
    return VAEEncoderConfig.from_diffusers(raw, source=str(folder / "config.json"))


def load_unet_encoder(
    root: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> tuple[UNetEncoder, UNetEncoderConfig]:
    """The UNet encoder (to the feature point) of a diffusers checkpoint, with its config.

    Args:
      root: a pipeline folder, HF-cache snapshot or cached repo id (see ``resolve_pretrained``).
      dtype: parameter dtype (float32, bfloat16 or float16).
      variant, cache_dir, use_cache: see ``load_converted``.
    """
    folder = resolve_pretrained(root) / "unet"
    cfg = unet_encoder_config(folder.parent)
    model = load_converted(
        abstract_module(cfg), folder, variant=variant, dtype=dtype,
        skipped_prefixes=cfg.skipped_checkpoint_prefixes(), cache_dir=cache_dir, use_cache=use_cache,
    )
    return model, cfg


def load_vae_encoder(
    root: str | os.PathLike,
    *,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    required_fields: Sequence[str] = VAE_REQUIRED_FIELDS,
) -> tuple[VAEEncoder, VAEEncoderConfig]:
    """The VAE encoder (float32) of a diffusers checkpoint, with its config.

    Args:
      required_fields: config fields that must be present (``SDXL_VAE_REQUIRED_FIELDS`` for the SDXL family).
      (the rest as in ``load_unet_encoder``)
    """
    folder = resolve_pretrained(root) / "vae"
    cfg = vae_encoder_config(folder.parent, required_fields=required_fields)
    model = load_converted(
        abstract_module(cfg), folder, variant=variant, dtype=jnp.float32,
        skipped_prefixes=VAE_SKIPPED_PREFIXES, aliases=VAE_LEGACY_ALIASES, cache_dir=cache_dir,
        use_cache=use_cache,
    )
    return model, cfg
