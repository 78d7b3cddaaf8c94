"""The one explicit key map from diffusers checkpoints to the Flax NNX modules, and the conversion cache.

The key map (``diffusers_key``) is derived from the module tree, leaf by leaf, with these rules and
nothing else: the parameter path ``a.b.0.c.kernel`` is the checkpoint key ``a.b.0.c.weight``,
transposed (Linear ``[out, in] -> [in, out]``, Conv ``OIHW -> HWIO``); ``scale`` is ``weight``;
``bias`` is ``bias``. Every parameter must be found with its exact shape, and every checkpoint key
must be used, except the prefixes a loader names explicitly (the VAE decoder). Anything else is an
error that names the key. Weights are read from safetensors with the numpy backend (fp16 or fp32)
and cached converted, so the next start reads a single file. Locating a checkpoint offline is
``spark_jax.backbones.checkpoint``'s job.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from spark_jax.backbones.checkpoint import (
    UNET_REQUIRED_FIELDS,
    VAE_REQUIRED_FIELDS,
    CheckpointError,
    dangling_link_error,
    default_cache_dir,
    read_config,
    require_fields,
    resolve_pretrained,
    weight_files,
)
from spark_jax.models.taps import check_taps
from spark_jax.models.unet import UNet2DConditionModel, UNetConfig
from spark_jax.models.vae_encoder import VAEEncoder, VAEEncoderConfig

# Bump when the conversion rules change: invalidates every cached converted file.
CONVERSION_VERSION = 2  # 2: converted arrays are checked finite
# The VAE decoder and post_quant_conv are not used by feature extraction.
VAE_SKIPPED_PREFIXES = ("decoder.", "post_quant_conv.")
# Attention names written by diffusers < 0.14 (still found in some VAE checkpoints).
VAE_LEGACY_ALIASES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}

M = TypeVar("M", bound=nnx.Module)


class SafetensorsReader:
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
    reader = SafetensorsReader(files)
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
        problems.append(f"{len(missing)} missing key(s): {abbreviated(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {abbreviated(mismatched)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {abbreviated(unexpected)}")
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
            f"{len(bad)} tensor(s): {abbreviated([text for _, text in bad])}. The file is corrupt or was saved from a "
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


def abbreviated(items: Sequence[str], n: int = 8) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many more there are (for error messages)."""
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
    keep: Callable[[tuple[Any, ...]], bool] | None = None,
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
      keep: which parameter paths to hold; the others become empty placeholders (shape ``(0,) * ndim``), so
        a caller that runs only part of the module does not hold the rest. The checkpoint is still checked and
        converted whole (the cache file holds every parameter); a cached load reads only the kept ones.
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
        arrays = _read_cache(cache_file, params, keep)
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
        node[path[-1]] = (jnp.asarray(arr, dtype=dtype) if keep is None or keep(path)
                          else jnp.zeros((0,) * arr.ndim, dtype))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def _read_cache(
    cache_file: Path, params: Mapping[tuple[Any, ...], Any], keep: Callable[[tuple[Any, ...]], bool] | None = None
) -> dict[tuple[Any, ...], np.ndarray] | None:
    """The cached arrays (those ``keep`` selects; the others as empty placeholders of the right rank), or None."""
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="numpy") as f:
            keys = set(f.keys())
            if keys != {_path_str(p) for p in params}:
                return None
            out = {}
            for p, spec in params.items():
                if keep is None or keep(p):
                    out[p] = f.get_tensor(_path_str(p))
                    if tuple(out[p].shape) != tuple(spec.shape):
                        return None
                else:
                    out[p] = np.zeros((0,) * len(spec.shape), np.float32)
    except (SafetensorError, OSError):
        return None  # damaged cache entry: reconvert and overwrite
    return out


@functools.lru_cache(maxsize=8)
def abstract_module(cfg: UNetConfig | VAEEncoderConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Shapes-only (graphdef, state) of the module a config describes, memoised per config.

    Tracing every initializer under ``nnx.eval_shape`` takes about a second for an SDXL UNet (with
    ``host_counted_rngs``); loading the same architecture again reuses it.
    """
    cls = UNet2DConditionModel if isinstance(cfg, UNetConfig) else VAEEncoder
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=host_counted_rngs())))


def host_counted_rngs(seed: int = 0) -> nnx.Rngs:
    """``nnx.Rngs`` whose draw counter is a host numpy scalar, for building modules under ``nnx.eval_shape``.

    Every parameter draw increments the counter. A traced counter costs a scan of the whole trace so far per
    draw (flax's ``Variable.set_value`` probes the new value's ``sharding``; on a tracer jax builds that
    AttributeError's message from the trace's equations): quadratic in the number of parameters. Measured on
    this CPU: 12-15 s for SSD-1B's whole UNet and for the tiny SDXL-base test form, against 0.9-1.1 s with a
    host counter, which numpy updates in place, outside the trace. Only shapes come out of ``eval_shape``, so
    the draws themselves do not matter.
    """
    rngs = nnx.Rngs(seed)
    rngs.default.count.set_value(np.zeros((), np.uint32))
    return rngs


def unet_config(root: str | os.PathLike) -> UNetConfig:
    """The UNet's architecture from ``<root>/unet/config.json`` (required fields checked); no weights read."""
    folder = resolve_pretrained(root) / "unet"
    raw = read_config(folder)
    require_fields(raw, UNET_REQUIRED_FIELDS, str(folder / "config.json"))
    return UNetConfig.from_diffusers(raw, source=str(folder / "config.json"))


def vae_encoder_config(
    root: str | os.PathLike, *, required_fields: Sequence[str] = VAE_REQUIRED_FIELDS
) -> VAEEncoderConfig:
    """The VAE encoder's architecture from ``<root>/vae/config.json`` (``required_fields`` checked); no weights read."""
    folder = resolve_pretrained(root) / "vae"
    raw = read_config(folder)
    require_fields(raw, required_fields, str(folder / "config.json"))
    return VAEEncoderConfig.from_diffusers(raw, source=str(folder / "config.json"))


def load_unet(
    root: str | os.PathLike,
    *,
    dtype: jnp.dtype = jnp.float32,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    taps: Sequence[str] | None = None,
) -> tuple[UNet2DConditionModel, UNetConfig]:
    """The whole UNet of a diffusers checkpoint (every key of ``unet/`` checked), with its config.

    Args:
      root: a pipeline folder, HF-cache snapshot or cached repo id (see ``resolve_pretrained``).
      dtype: parameter dtype (float32, bfloat16 or float16).
      variant, cache_dir, use_cache: see ``load_converted``.
      taps: if given, hold only the parameters the forward reads up to the last of these taps (the rest are
        empty placeholders: ``unet_params_for_taps``); the model then serves those taps and any earlier one.
    """
    folder = resolve_pretrained(root) / "unet"
    cfg = unet_config(folder.parent)
    keep = None
    if taps is not None:
        needed = unet_params_for_taps(cfg, taps)
        keep = needed.__contains__
    model = load_converted(abstract_module(cfg), folder, variant=variant, dtype=dtype, cache_dir=cache_dir,
                           use_cache=use_cache, keep=keep)
    return model, cfg


@functools.lru_cache(maxsize=32)
def _params_for_taps(cfg: UNetConfig, taps: tuple[str, ...]) -> frozenset[tuple[Any, ...]]:
    graphdef, abstract_state = abstract_module(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    # A small latent: which parameters are read does not depend on the size (every module runs at any size).
    side = 2 ** (len(cfg.block_out_channels) - 1)
    sample = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 2, cfg.context_dim), jnp.float32)
    extra = ()
    if cfg.addition_embed_type == "text_time":
        extra = (jax.ShapeDtypeStruct((1, cfg.text_embeds_dim), jnp.float32), jax.ShapeDtypeStruct((1, 6), jnp.float32))

    def forward(state, sample, context, *extra):
        return nnx.merge(graphdef, state)(sample, jnp.zeros((), jnp.float32), context, *extra, taps=taps)

    closed = jax.make_jaxpr(forward)(abstract_state, sample, context, *extra)
    # Parameters enter the program as its first inputs, in the state's flattening order; a parameter of a module
    # after the last requested tap is never traced (the forward stops there), so no equation reads it.
    read = {v for eqn in closed.jaxpr.eqns for v in eqn.invars if isinstance(v, jax_core.Var)}
    read |= {v for v in closed.jaxpr.outvars if isinstance(v, jax_core.Var)}
    paths = []
    for (keypath, _), var in zip(leaves, closed.jaxpr.invars[: len(leaves)]):
        if var in read:  # key path of the state leaf minus the Variable's own `.value`
            paths.append(tuple(k.key if hasattr(k, "key") else k.idx for k in keypath
                               if not isinstance(k, jax.tree_util.GetAttrKey)))
    return frozenset(paths)


def unet_params_for_taps(cfg: UNetConfig, taps: Sequence[str]) -> frozenset[tuple[Any, ...]]:
    """The parameter paths (as ``load_converted``'s ``keep`` sees them) the forward reads to serve ``taps``.

    Read off the traced program (shapes only, nothing computed): the forward stops after the last requested tap,
    so the parameters of every later module are absent from it.

    Raises:
      UnknownTapError: a name that is not a tap of this UNet.
    """
    return _params_for_taps(cfg, check_taps(taps, cfg.tap_names()))


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
      (the rest as in ``load_unet``)
    """
    folder = resolve_pretrained(root) / "vae"
    cfg = vae_encoder_config(folder.parent, required_fields=required_fields)
    model = load_converted(
        abstract_module(cfg), folder, variant=variant, dtype=jnp.float32,
        skipped_prefixes=VAE_SKIPPED_PREFIXES, aliases=VAE_LEGACY_ALIASES, cache_dir=cache_dir,
        use_cache=use_cache,
    )
    return model, cfg
