"""The two explicit key maps into ``spark_jax.models.clip.CLIPModel``: from transformers and from open_clip/OpenAI.

Each map lists, for every parameter of the model a ``CLIPConfig`` describes, the checkpoint key it comes from,
the shape that key must have and the array transform (Linear ``[out, in] -> [in, out]``, Conv ``OIHW -> HWIO``,
open_clip's fused ``in_proj_weight`` ``[3D, D]`` split into q/k/v rows). ``convert_clip`` checks the map against
the checkpoint: every missing key, every key of the wrong shape and every key the map does not use is named
(the only keys skipped are the non-parameter entries each format is known to carry, listed here). Nothing is
guessed from names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_jax.backbones.checkpoint import CheckpointError
from spark_jax.models.clip import CLIPConfig, CLIPModel
from spark_jax.models.convert import SafetensorsReader, abbreviated, host_counted_rngs

Path_ = tuple[Any, ...]

# Buffers some transformers versions saved next to the parameters (position ids 0..n-1, rebuilt by the model).
TRANSFORMERS_IGNORED_SUFFIXES = ("embeddings.position_ids",)
# Integers OpenAI's original state dicts carry beside the weights (``clip.load``'s JIT archives).
OPEN_CLIP_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")


class KeySource(NamedTuple):
    """Where one of our parameters comes from: checkpoint ``key``, its allowed ``shapes``, and ``convert``."""

    key: str
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _scalar(w: np.ndarray) -> np.ndarray:
    return np.asarray(w).reshape(())


def _rows(i: int, d: int, transpose: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Block ``i`` of three stacked along the first axis (q, k, v of a fused in-projection), transposed if a weight."""
    def take(w: np.ndarray) -> np.ndarray:
        block = w[i * d:(i + 1) * d]
        return np.ascontiguousarray(block.T) if transpose else np.ascontiguousarray(block)
    return take


def _linear(ours: Path_, key: str, d_in: int, d_out: int, *, bias: bool = True) -> dict[Path_, KeySource]:
    out = {(*ours, "kernel"): KeySource(f"{key}.weight", ((d_out, d_in),), _transpose)}
    if bias:
        out[(*ours, "bias")] = KeySource(f"{key}.bias", ((d_out,),), _same)
    return out


def _norm(ours: Path_, key: str, d: int) -> dict[Path_, KeySource]:
    return {(*ours, "scale"): KeySource(f"{key}.weight", ((d,),), _same),
            (*ours, "bias"): KeySource(f"{key}.bias", ((d,),), _same)}


def _hf_layer(ours: Path_, key: str, d: int, hidden: int) -> dict[Path_, KeySource]:
    m: dict[Path_, KeySource] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        m |= _linear((*ours, "self_attn", proj), f"{key}.self_attn.{proj}", d, d)
    m |= _norm((*ours, "layer_norm1"), f"{key}.layer_norm1", d)
    m |= _linear((*ours, "mlp", "fc1"), f"{key}.mlp.fc1", d, hidden)
    m |= _linear((*ours, "mlp", "fc2"), f"{key}.mlp.fc2", hidden, d)
    m |= _norm((*ours, "layer_norm2"), f"{key}.layer_norm2", d)
    return m


def _open_clip_layer(ours: Path_, key: str, d: int, hidden: int) -> dict[Path_, KeySource]:
    m: dict[Path_, KeySource] = {}
    # nn.MultiheadAttention's fused projection: rows [0, D) are q, [D, 2D) k, [2D, 3D) v.
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        m[(*ours, "self_attn", proj, "kernel")] = KeySource(f"{key}.attn.in_proj_weight", ((3 * d, d),),
                                                            _rows(i, d, transpose=True))
        m[(*ours, "self_attn", proj, "bias")] = KeySource(f"{key}.attn.in_proj_bias", ((3 * d,),),
                                                          _rows(i, d, transpose=False))
    m |= _linear((*ours, "self_attn", "out_proj"), f"{key}.attn.out_proj", d, d)
    m |= _norm((*ours, "layer_norm1"), f"{key}.ln_1", d)
    m |= _linear((*ours, "mlp", "fc1"), f"{key}.mlp.c_fc", d, hidden)
    m |= _linear((*ours, "mlp", "fc2"), f"{key}.mlp.c_proj", hidden, d)
    m |= _norm((*ours, "layer_norm2"), f"{key}.ln_2", d)
    return m


def transformers_key_map(cfg: CLIPConfig) -> dict[Path_, KeySource]:
    """Every parameter of ``CLIPModel(cfg)`` -> its transformers ``CLIPModel`` state-dict key."""
    t, v, e = cfg.text, cfg.vision, cfg.projection_dim
    p, grid = v.patch_size, v.grid
    m: dict[Path_, KeySource] = {
        ("text_model", "embeddings", "token_embedding", "embedding"): KeySource(
            "text_model.embeddings.token_embedding.weight", ((t.vocab_size, t.hidden_size),), _same),
        ("text_model", "embeddings", "position_embedding", "embedding"): KeySource(
            "text_model.embeddings.position_embedding.weight", ((t.max_position_embeddings, t.hidden_size),), _same),
        ("vision_model", "embeddings", "class_embedding"): KeySource(
            "vision_model.embeddings.class_embedding", ((v.hidden_size,),), _same),
        ("vision_model", "embeddings", "patch_embedding", "kernel"): KeySource(
            "vision_model.embeddings.patch_embedding.weight", ((v.hidden_size, v.num_channels, p, p),), _oihw_to_hwio),
        ("vision_model", "embeddings", "position_embedding", "embedding"): KeySource(
            "vision_model.embeddings.position_embedding.weight", ((grid * grid + 1, v.hidden_size),), _same),
        ("logit_scale",): KeySource("logit_scale", ((),), _scalar),
    }
    for i in range(t.num_hidden_layers):
        m |= _hf_layer(("text_model", "encoder", "layers", i), f"text_model.encoder.layers.{i}", t.hidden_size,
                       t.intermediate_size)
    m |= _norm(("text_model", "final_layer_norm"), "text_model.final_layer_norm", t.hidden_size)
    m |= _norm(("vision_model", "pre_layrnorm"), "vision_model.pre_layrnorm", v.hidden_size)
    for i in range(v.num_hidden_layers):
        m |= _hf_layer(("vision_model", "encoder", "layers", i), f"vision_model.encoder.layers.{i}", v.hidden_size,
                       v.intermediate_size)
    m |= _norm(("vision_model", "post_layernorm"), "vision_model.post_layernorm", v.hidden_size)
    m |= _linear(("visual_projection",), "visual_projection", v.hidden_size, e, bias=False)
    m |= _linear(("text_projection",), "text_projection", t.hidden_size, e, bias=False)
    return m


def open_clip_key_map(cfg: CLIPConfig, *, text_prefix: str = "") -> dict[Path_, KeySource]:
    """Every parameter of ``CLIPModel(cfg)`` -> its open_clip / OpenAI state-dict key.

    Args:
      text_prefix: ``""`` for open_clip's ``CLIP`` and OpenAI checkpoints (text tower at the top level),
        ``"text."`` for ``CustomTextCLIP`` with the built-in text transformer (see ``open_clip_text_prefix``).
    """
    t, v, e = cfg.text, cfg.vision, cfg.projection_dim
    p, grid = v.patch_size, v.grid
    tp = text_prefix
    m: dict[Path_, KeySource] = {
        ("text_model", "embeddings", "token_embedding", "embedding"): KeySource(
            f"{tp}token_embedding.weight", ((t.vocab_size, t.hidden_size),), _same),
        ("text_model", "embeddings", "position_embedding", "embedding"): KeySource(
            f"{tp}positional_embedding", ((t.max_position_embeddings, t.hidden_size),), _same),
        ("vision_model", "embeddings", "class_embedding"): KeySource("visual.class_embedding", ((v.hidden_size,),),
                                                                      _same),
        ("vision_model", "embeddings", "patch_embedding", "kernel"): KeySource(
            "visual.conv1.weight", ((v.hidden_size, v.num_channels, p, p),), _oihw_to_hwio),
        ("vision_model", "embeddings", "position_embedding", "embedding"): KeySource(
            "visual.positional_embedding", ((grid * grid + 1, v.hidden_size),), _same),
        # open_clip applies both projections as x @ proj: already [in, out].
        ("visual_projection", "kernel"): KeySource("visual.proj", ((v.hidden_size, e),), _same),
        ("text_projection", "kernel"): KeySource(f"{tp}text_projection", ((t.hidden_size, e),), _same),
        # nonscalar_logit_scale=True stores it as [1].
        ("logit_scale",): KeySource("logit_scale", ((), (1,)), _scalar),
    }
    for i in range(t.num_hidden_layers):
        m |= _open_clip_layer(("text_model", "encoder", "layers", i), f"{tp}transformer.resblocks.{i}", t.hidden_size,
                              t.intermediate_size)
    m |= _norm(("text_model", "final_layer_norm"), f"{tp}ln_final", t.hidden_size)
    m |= _norm(("vision_model", "pre_layrnorm"), "visual.ln_pre", v.hidden_size)
    for i in range(v.num_hidden_layers):
        m |= _open_clip_layer(("vision_model", "encoder", "layers", i), f"visual.transformer.resblocks.{i}",
                              v.hidden_size, v.intermediate_size)
    m |= _norm(("vision_model", "post_layernorm"), "visual.ln_post", v.hidden_size)
    return m


def open_clip_text_prefix(keys: Iterable[str]) -> str:
    """``"text."`` when the checkpoint is a ``CustomTextCLIP`` (``text.token_embedding.weight``), else ``""``."""
    return "text." if "text.token_embedding.weight" in set(keys) else ""


class ArrayReader:
    """An in-memory state dict (``{key: array}``, e.g. a torch model's ``state_dict()`` as numpy) with the
    safetensors reader's interface, for ``convert_clip``."""

    def __init__(self, arrays: Mapping[str, np.ndarray], name: str = "<state dict>"):
        self._arrays = dict(arrays)
        self.files = [Path(name)]
        self.where = {k: Path(name) for k in self._arrays}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self._arrays[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self._arrays[key])


def safetensors_reader(files: Sequence[Path]) -> SafetensorsReader:
    """A lazy reader over one or more (sharded) safetensors files; missing or broken files are named."""
    return SafetensorsReader(files)


def abstract_clip(cfg: CLIPConfig) -> CLIPModel:
    """``CLIPModel(cfg)`` with shapes only (no initialisation is paid)."""
    return nnx.eval_shape(lambda: CLIPModel(cfg, rngs=host_counted_rngs()))


def model_paths(model: CLIPModel) -> dict[Path_, tuple[int, ...]]:
    """{parameter path: shape} of a (possibly abstract) model."""
    _, state = nnx.split(model)
    return {tuple(path): tuple(var.get_value().shape) for path, var in nnx.to_flat_state(state)}


def convert_clip(
    cfg: CLIPConfig,
    reader: Any,
    key_map: Mapping[Path_, KeySource],
    *,
    ignored: Callable[[str], bool] = lambda key: False,
    hint: str = "",
) -> dict[Path_, np.ndarray]:
    """Reads and converts every parameter of ``CLIPModel(cfg)`` through ``key_map``.

    Args:
      cfg: the architecture (its ``config.json`` / ``open_clip_config.json``).
      reader: ``safetensors_reader(files)`` or an ``ArrayReader``.
      key_map: ``transformers_key_map(cfg)`` or ``open_clip_key_map(cfg, ...)``.
      ignored: checkpoint keys known not to be parameters (never reported as unexpected).
      hint: appended to the error (what to check).

    Returns:
      ``{parameter path: array}`` in the checkpoint's dtype, in our layout.

    Raises:
      CheckpointError: naming every missing key, shape mismatch, unexpected key and non-finite tensor.
    """
    ours = model_paths(abstract_clip(cfg))
    if set(ours) != set(key_map):  # a bug in this module, never the checkpoint's fault
        raise RuntimeError(f"key map and model disagree: {sorted(set(ours) ^ set(key_map), key=str)[:8]}")
    names = ", ".join(str(f) for f in reader.files)
    missing, mismatched = [], []
    for path, src in key_map.items():
        if src.key not in reader.where:
            missing.append(src.key)
        elif reader.shape(src.key) not in src.shapes:
            want = " or ".join(map(str, src.shapes))
            mismatched.append(f"{src.key}: checkpoint {reader.shape(src.key)}, model expects {want}")
    used = {src.key for src in key_map.values()}
    unexpected = sorted(k for k in reader.where if k not in used and not ignored(k))
    problems = []
    if missing:
        problems.append(f"{len(set(missing))} missing key(s): {abbreviated(sorted(set(missing)))}")
    if mismatched:
        problems.append(f"{len(set(mismatched))} shape mismatch(es): {abbreviated(sorted(set(mismatched)))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {abbreviated(unexpected)}")
    if problems:
        raise CheckpointError(f"{names} does not match the CLIP model its config describes: " + "; ".join(problems)
                              + (f". {hint}" if hint else ""))
    fetched: dict[str, np.ndarray] = {}
    arrays = {}
    for path, src in key_map.items():
        if src.key not in fetched:
            fetched[src.key] = reader.get(src.key)
        arrays[path] = src.convert(fetched[src.key])
    bad = sorted(k for k, a in fetched.items() if not np.all(np.isfinite(a)))
    if bad:
        raise CheckpointError(f"{names} holds non-finite weights (NaN or Inf) in {len(bad)} tensor(s): {abbreviated(bad)}. "
                              "The file is corrupt or was saved from a diverged model: download it again.")
    return arrays


def build_clip(cfg: CLIPConfig, arrays: Mapping[Path_, np.ndarray], *, dtype: Any = jnp.float32) -> CLIPModel:
    """``CLIPModel(cfg)`` holding ``arrays`` (from ``convert_clip``) cast to ``dtype``."""
    graphdef, state = nnx.split(abstract_clip(cfg))
    nested: dict[Any, Any] = {}
    for path, arr in arrays.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr, dtype=dtype)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)
