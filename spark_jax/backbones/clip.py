"""Loading CLIP offline (a transformers ``CLIPModel`` folder or HF-cache snapshot, or an open_clip checkpoint) and
running it: ``load_clip(path_or_repo_id) -> CLIP``.

``CLIP`` does on the host what the checkpoint's own processors do (the image processor's resize, crop, rescale
and normalisation through Pillow, as transformers' ``CLIPImageProcessorPil`` and open_clip's torchvision
transform do; tokenisation through the checkpoint's own tokenizer) and runs both towers as jitted programs
(``spark_jax.models.clip.CLIPModel``, weights through ``spark_jax.models.clip_convert``'s key maps).

Formats (a folder may hold both, as open_clip's hub uploads do; the transformers one is then used):
- transformers: ``config.json`` with ``model_type='clip'``, ``model.safetensors`` or a sharded
  ``model.safetensors.index.json``, ``preprocessor_config.json``, tokenizer files.
- open_clip (``save_for_hf``'s layout): ``open_clip_config.json`` (``model_cfg`` and ``preprocess_cfg``),
  ``open_clip_model.safetensors``, and the tokenizer files it saves beside them; without those, open_clip's own
  tokenizer when open_clip is importable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from spark_jax.backbones.checkpoint import (
    CheckpointError,
    _snapshot,
    cached_repo_dir,
    dangling_link_error,
    hf_repo_id,
)
from spark_jax.models.clip import CLIPConfig, CLIPConfigError, CLIPModel
from spark_jax.models.clip_convert import (
    OPEN_CLIP_IGNORED_KEYS,
    TRANSFORMERS_IGNORED_SUFFIXES,
    build_clip,
    convert_clip,
    open_clip_key_map,
    open_clip_text_prefix,
    safetensors_reader,
    transformers_key_map,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Texts per text-tower call (ViT-L/14's tower at 256 x 77 tokens: ~250 MB of MLP activations in float32).
TEXT_BATCH = 256
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# PIL resampling codes (transformers' PILImageResampling values) by open_clip's interpolation names.
_OPEN_CLIP_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                       "random": Image.Resampling.BICUBIC}  # open_clip: 'random' is bicubic at inference


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """The checkpoint's inference image transform.

    Attributes:
      resize: ``'shortest'`` (shortest side to ``size``, the other by ``int(size * long / short)``), ``'squash'``
        (to ``size`` x ``size`` exactly, or ``(h, w)``) or ``'none'``.
      size: the target of ``resize``.
      crop: center-crop side(s) ``(h, w)``, or None.
      crop_offset: how an odd margin is split: ``'floor'`` (transformers: ``(h - ch) // 2``) or ``'round'``
        (torchvision's ``CenterCrop``, open_clip: ``int(round((h - ch) / 2))``, Python's half-to-even).
      resample: the PIL filter (``Image.Resampling.BICUBIC`` for every CLIP checkpoint we know).
      rescale_factor: multiplies uint8 values (1/255).
      mean, std: per channel, applied after rescaling.
    """

    resize: str = "shortest"
    size: int | tuple[int, int] = 224
    crop: tuple[int, int] | None = (224, 224)
    crop_offset: str = "floor"
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(h, w) of every preprocessed image, or None when it follows the input (no resize, no crop)."""
        if self.crop is not None:
            return self.crop
        if self.resize == "squash":
            return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        return None


def image_processing_from_hf(raw: dict[str, Any], *, source: str) -> ImageProcessing:
    """From a transformers ``preprocessor_config.json`` (``CLIPImageProcessor``'s fields and defaults)."""
    def side(value: Any, what: str) -> tuple[int, int] | int:
        if isinstance(value, int):
            return value
        if isinstance(value, dict) and "shortest_edge" in value and len(value) == 1:
            return int(value["shortest_edge"])
        if isinstance(value, dict) and {"height", "width"} <= set(value):
            return int(value["height"]), int(value["width"])
        raise CheckpointError(f"{source}: {what}={value!r} is not one of {{'shortest_edge': n}}, "
                              "{'height': h, 'width': w} or an int")

    size = side(raw.get("size", {"shortest_edge": 224}), "size")
    crop = side(raw.get("crop_size", {"height": 224, "width": 224}), "crop_size")
    crop = (crop, crop) if isinstance(crop, int) else crop
    if raw.get("do_resize", True):
        # An int size is a shortest edge (CLIPImageProcessor's default_to_square=False); {height, width} is exact.
        resize, target = ("shortest", size) if isinstance(size, int) else ("squash", size)
    else:
        resize, target = "none", 0
    return ImageProcessing(
        resize=resize, size=target, crop=crop if raw.get("do_center_crop", True) else None, crop_offset="floor",
        resample=int(raw.get("resample", Image.Resampling.BICUBIC)),
        rescale_factor=float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0,
        mean=tuple(raw.get("image_mean", OPENAI_MEAN)) if raw.get("do_normalize", True) else (0.0, 0.0, 0.0),
        std=tuple(raw.get("image_std", OPENAI_STD)) if raw.get("do_normalize", True) else (1.0, 1.0, 1.0),
    )


def image_processing_from_open_clip(preprocess_cfg: dict[str, Any], image_size: int, *, source: str) -> ImageProcessing:
    """From open_clip's ``preprocess_cfg`` (``image_transform(..., is_train=False)``'s defaults)."""
    mode = preprocess_cfg.get("resize_mode") or "shortest"
    interp = preprocess_cfg.get("interpolation") or "bicubic"
    if interp not in _OPEN_CLIP_RESAMPLE:
        raise CheckpointError(f"{source}: preprocess_cfg.interpolation={interp!r}; open_clip allows "
                              f"{sorted(_OPEN_CLIP_RESAMPLE)}")
    if mode not in ("shortest", "squash"):
        raise CheckpointError(f"{source}: preprocess_cfg.resize_mode={mode!r} is not supported here ('shortest', "
                              "'squash'); resize the images yourself and call CLIP.normalize")
    def triple(v: Any, default: tuple[float, ...]) -> tuple[float, float, float]:
        v = default if v is None else v
        return tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3))
    return ImageProcessing(
        resize=mode, size=image_size, crop=(image_size, image_size) if mode == "shortest" else None,
        crop_offset="round", resample=_OPEN_CLIP_RESAMPLE[interp], rescale_factor=1 / 255,
        mean=triple(preprocess_cfg.get("mean"), OPENAI_MEAN), std=triple(preprocess_cfg.get("std"), OPENAI_STD),
    )


def _check_images(images: Any) -> list[np.ndarray]:
    """[B, H, W, 3] array or a list of [H, W, 3] arrays, uint8 or float in [0, 1] -> list of arrays."""
    if isinstance(images, np.ndarray) or hasattr(images, "shape"):
        arr = np.asarray(images)
        if arr.ndim == 3:
            raise ValueError(f"images of shape {arr.shape}: pass a batch [B, H, W, 3] (add a leading axis)")
        if arr.ndim != 4:
            raise ValueError(f"images must be [B, H, W, 3]; got shape {arr.shape}")
        items = list(arr)
    else:
        items = [np.asarray(im) for im in images]
        if not items:
            raise ValueError("images is empty")
    for i, im in enumerate(items):
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"image {i} has shape {im.shape}; expected [H, W, 3] RGB (convert grayscale/RGBA first)")
        if im.dtype != np.uint8 and not np.issubdtype(im.dtype, np.floating):
            raise ValueError(f"image {i} has dtype {im.dtype}; pass uint8 or float in [0, 1]")
        if np.issubdtype(im.dtype, np.floating):
            lo, hi = float(np.min(im)), float(np.max(im))
            if not (0.0 <= lo and hi <= 1.0):
                raise ValueError(f"float image {i} has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] (uint8 "
                                 "images are accepted as they are)")
    return items


def _resize(im: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """Pillow resize of one [H, W, 3] image to ``hw``. uint8 as the processors do it; float images channel by channel
    in Pillow's float mode ('F': the same filter without rounding to uint8; clipped back to [0, 1])."""
    size = (hw[1], hw[0])
    if im.dtype == np.uint8:
        return np.asarray(Image.fromarray(im).resize(size, resample=resample))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(im[..., c], np.float32)).resize(size, resample=resample))
              for c in range(3)]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def preprocess_images(images: Any, proc: ImageProcessing) -> np.ndarray:
    """Host-side image transform (see ``CLIP.preprocess``) -> float32 [B, h, w, 3]."""
    out = []
    for im in _check_images(images):
        h, w = im.shape[:2]
        if proc.resize == "shortest":
            s = int(proc.size)
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            im = _resize(im, (s, new_long) if h <= w else (new_long, s), proc.resample)
        elif proc.resize == "squash":
            im = _resize(im, (proc.size, proc.size) if isinstance(proc.size, int) else tuple(proc.size), proc.resample)
        if proc.crop is not None:
            (h, w), (ch, cw) = im.shape[:2], proc.crop
            if ch > h or cw > w:
                raise ValueError(f"image of {h} x {w} after resizing is smaller than the crop {ch} x {cw}")
            if proc.crop_offset == "floor":
                top, left = (h - ch) // 2, (w - cw) // 2
            else:
                top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            im = im[top:top + ch, left:left + cw]
        x = im.astype(np.float32) * np.float32(proc.rescale_factor) if im.dtype == np.uint8 else im.astype(np.float32)
        out.append((x - np.asarray(proc.mean, np.float32)) / np.asarray(proc.std, np.float32))
    shapes = {o.shape for o in out}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in size ({sorted(shapes)}): this processor has no crop; pass "
                         "images of one size")
    return np.stack(out)


def resolve_clip(path_or_repo_id: str | os.PathLike, *, hf_cache_dir: str | os.PathLike | None = None) -> Path:
    """The checkpoint folder of a CLIP model, never touching the network.

    Args:
      path_or_repo_id: a folder, a ``models--owner--name`` folder or snapshot of the Hugging Face cache, or a repo
        id (``openai/clip-vit-large-patch14``) looked up in that cache.
      hf_cache_dir: the hub cache (default ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).
    """
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return _snapshot(p) if p.name.startswith("models--") else p
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint folder that contains it")
    repo_dir = cached_repo_dir(path_or_repo_id, hf_cache_dir)
    if repo_dir is not None:
        return _snapshot(repo_dir)
    raise CheckpointError(f"CLIP checkpoint folder {p} does not exist")


def _read_json(path: Path) -> dict[str, Any]:
    if (err := dangling_link_error(path)) is not None:
        raise err
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the model") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a JSON object")
    return raw


def checkpoint_format(folder: Path) -> str:
    """``'transformers'`` or ``'open_clip'``: which layout ``folder`` holds (see the module docstring)."""
    config = folder / "config.json"
    model_type = _read_json(config).get("model_type") if config.exists() or config.is_symlink() else None
    if model_type == "clip":
        return "transformers"
    if (folder / "open_clip_config.json").exists() or (folder / "open_clip_config.json").is_symlink():
        return "open_clip"
    found = sorted(p.name for p in folder.iterdir())
    if model_type is not None:
        raise CheckpointError(
            f"{config}: model_type={model_type!r} is not a CLIP model. load_clip reads a transformers CLIPModel "
            "(model_type 'clip': vision-only or text-only towers are not enough) or an open_clip checkpoint "
            f"(open_clip_config.json). Found: {found}"
        )
    raise CheckpointError(
        f"{folder} holds neither a transformers CLIP config (config.json with model_type 'clip') nor an open_clip "
        f"one (open_clip_config.json); found {found}. Pass the folder written by CLIPModel.save_pretrained or "
        "open_clip's save_for_hf / hub upload."
    )


def _weights(folder: Path, stem: str) -> list[Path]:
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if (err := dangling_link_error(single)) is not None:
        raise err
    if single.exists():
        return [single]
    if index.exists() or index.is_symlink():
        try:
            shards = sorted(set(_read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map: {e})") from e
        return [folder / s for s in shards]
    found = sorted(p.name for p in folder.iterdir())
    pt = [f for f in found if f.endswith((".bin", ".pt", ".pth"))]
    hint = (f" Only PyTorch pickles are present ({', '.join(pt)}): re-save them as safetensors "
            "(transformers: `model.save_pretrained(folder)`; open_clip: "
            "`safetensors.torch.save_file(model.state_dict(), 'open_clip_model.safetensors')`)." if pt else "")
    raise CheckpointError(f"no {stem}.safetensors (or {stem}.safetensors.index.json) in {folder}; found {found}.{hint}")


def _checkpoint_id(fmt: str, folder: Path, files: Sequence[Path], configs: Sequence[Path]) -> str:
    """A stable identity: the format, the repo id (or folder name), and a digest of the configs' bytes and the
    weight files' names and sizes (plus the snapshot revision in the HF cache, or mtimes elsewhere)."""
    repo = hf_repo_id(folder)
    h = hashlib.sha256(fmt.encode())
    for c in configs:
        if c.exists():
            h.update(c.name.encode() + c.read_bytes())
    for f in files:
        st = f.resolve().stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        if repo is None:
            h.update(str(st.st_mtime_ns).encode())
    if repo is not None:
        h.update(folder.name.encode())
    return f"{fmt}:{repo or folder.resolve().name}:{h.hexdigest()[:16]}"


class CLIP:
    """A loaded CLIP: host-side preprocessing and tokenisation, jitted towers.

    Attributes:
      model: the ``CLIPModel`` (NNX; the dense variants reuse its modules).
      config: its ``CLIPConfig``.
      checkpoint_id: a stable identity of the weights and configs (cache keys).
      image_size, patch_size: the vision tower's native side and patch.
      mean, std: the per-channel normalisation of ``preprocess`` / ``normalize``.
      context_length: tokens per text (the text tower's positions).
      processing: the full ``ImageProcessing``.
    """

    def __init__(
        self,
        model: CLIPModel,
        config: CLIPConfig,
        *,
        checkpoint_id: str,
        processing: ImageProcessing,
        tokenizer_factory: Callable[[], Callable[[list[str], int], np.ndarray]],
        matmul_precision: str | None = "highest",
    ):
        self.model = model
        self.config = config
        self.checkpoint_id = checkpoint_id
        self.processing = processing
        self.image_size = config.vision.image_size
        self.patch_size = config.vision.patch_size
        self.mean = tuple(processing.mean)
        self.std = tuple(processing.std)
        self.context_length = config.text.max_position_embeddings
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer: Callable[[list[str], int], np.ndarray] | None = None
        graphdef, self._state = nnx.split(model)

        def run(method: str) -> Callable[..., jax.Array]:
            def f(state: nnx.State, x: jax.Array) -> jax.Array:
                precision = (jax.default_matmul_precision(matmul_precision) if matmul_precision
                             else contextlib.nullcontext())
                with precision:
                    return getattr(nnx.merge(graphdef, state), method)(x)
            return jax.jit(f)

        self._image = run("get_image_features")
        self._patches = run("patch_tokens")
        self._text = run("get_text_features")

    # Host side ---------------------------------------------------------------------------------------------------
    def preprocess(self, images: Any) -> np.ndarray:
        """The checkpoint's image processor: uint8 [B, H, W, 3] (or a list of [H, W, 3] of any sizes), or float in
        [0, 1] -> float32 pixel values [B, S, S, 3].

        uint8 images go exactly as transformers' ``CLIPImageProcessor`` (PIL backend) / open_clip's transform:
        Pillow resize of the shortest side to S (the filter of the config, bicubic for CLIP), center crop, times
        1/255, (x - mean) / std. Float images are resized by the same Pillow filter in float mode (no rounding
        to uint8, clipped to [0, 1]; *our choice*: transformers would truncate them to uint8 first).
        """
        return preprocess_images(images, self.processing)

    def normalize(self, images01: jax.Array) -> jax.Array:
        """(x - mean) / std per channel, no resize (dense use at any size): float [0, 1] (or uint8) [B, H, W, 3]."""
        x = jnp.asarray(images01)
        x = x.astype(jnp.float32) * self.processing.rescale_factor if x.dtype == jnp.uint8 else x.astype(jnp.float32)
        return (x - jnp.asarray(self.mean, jnp.float32).reshape(1, 1, 1, 3)) / jnp.asarray(self.std, jnp.float32).reshape(1, 1, 1, 3)

    def tokenize(self, texts: Sequence[str] | str) -> np.ndarray:
        """int32 [T, context_length] ids from the checkpoint's own tokenizer (start, BPE tokens, end-of-text,
        padding; a text longer than the context is truncated, keeping its end-of-text token, as both libraries do)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        if self._tokenizer is None:
            self._tokenizer = self._tokenizer_factory()
        ids = np.asarray(self._tokenizer(texts, self.context_length), np.int64)
        if ids.shape != (len(texts), self.context_length):
            raise CheckpointError(f"the tokenizer returned ids of shape {ids.shape}; expected "
                                  f"{(len(texts), self.context_length)}")
        if ids.max() >= self.config.text.vocab_size:
            raise CheckpointError(f"the tokenizer produced id {int(ids.max())}, beyond the text tower's vocabulary "
                                  f"({self.config.text.vocab_size}): the tokenizer files belong to another model")
        return ids.astype(np.int32)

    # Towers --------------------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised pixel values (sides multiples of the patch) -> [B, projection_dim]."""
        return self._image(self._state, jnp.asarray(pixel_values, jnp.float32))

    def patch_features(self, pixel_values: jax.Array) -> jax.Array:
        """[B, H, W, 3] normalised pixel values -> [B, H / p, W / p, projection_dim] (every patch token through
        post_layernorm and the visual projection)."""
        return self._patches(self._state, jnp.asarray(pixel_values, jnp.float32))

    def text_features(self, input_ids: jax.Array, *, batch_size: int = TEXT_BATCH) -> jax.Array:
        """int [T, L] ids -> [T, projection_dim], ``batch_size`` texts per call (more are run in chunks of that
        size, the last padded: one compiled shape, and a prompt-ensembled vocabulary of thousands of prompts never
        holds all its activations at once)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        t = ids.shape[0]
        if t <= batch_size:
            return self._text(self._state, ids)
        pad = -t % batch_size
        ids = jnp.concatenate([ids, jnp.broadcast_to(ids[:1], (pad, ids.shape[1]))], axis=0)
        chunks = [self._text(self._state, ids[i:i + batch_size]) for i in range(0, t + pad, batch_size)]
        return jnp.concatenate(chunks, axis=0)[:t]

    def encode_image(self, images: Any) -> jax.Array:
        """Images (see ``preprocess``) -> [B, projection_dim], = transformers' ``get_image_features``."""
        return self.image_features(self.preprocess(images))

    def encode_text(self, texts: Sequence[str] | str) -> jax.Array:
        """Texts -> [T, projection_dim], = transformers' ``get_text_features`` on the tokenizer's ids."""
        return self.text_features(self.tokenize(texts))

    def patch_tokens(self, images: Any, *, resize: bool = True) -> jax.Array:
        """Images -> [B, gh, gw, projection_dim] per-patch embeddings.

        Args:
          images: as ``preprocess`` (``resize=True``: the processor's S x S, grid S / p), or float [0, 1] /
            uint8 [B, H, W, 3] with sides multiples of the patch (``resize=False``: ``normalize`` only, the position
            embedding interpolated to the H / p x W / p grid).
        """
        px = self.preprocess(images) if resize else self.normalize(images)
        return self.patch_features(px)


def _hf_tokenizer(folder: Path) -> Callable[[list[str], int], np.ndarray]:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise CheckpointError("tokenizing needs transformers (pip install 'spark_jax[torch]')") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the tokenizer files of {folder}: {e}") from e

    def run(texts: list[str], length: int) -> np.ndarray:
        return np.asarray(tok(texts, padding="max_length", max_length=length, truncation=True)["input_ids"])
    return run


def _tokenizer_factory(folder: Path, fmt: str, model_cfg: dict[str, Any] | None) -> Callable[[], Any]:
    """Loads the checkpoint's tokenizer when first needed: its HF tokenizer files; for open_clip checkpoints
    without them, open_clip's own tokenizer if open_clip is importable."""
    def make():
        if any((folder / f).exists() for f in _TOKENIZER_FILES):
            return _hf_tokenizer(folder)
        if fmt == "open_clip":
            try:
                import open_clip.tokenizer as oc_tok
            except ImportError:
                raise CheckpointError(
                    f"{folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}) and open_clip is not "
                    "importable: install open_clip_torch, or save the tokenizer into the folder (for OpenAI's BPE: "
                    "`CLIPTokenizer.from_pretrained('openai/clip-vit-large-patch14').save_pretrained(folder)`)"
                ) from None
            text_cfg = (model_cfg or {}).get("text_cfg", {})
            name = text_cfg.get("hf_tokenizer_name")
            tok = (oc_tok.HFTokenizer(name, **(text_cfg.get("tokenizer_kwargs") or {})) if name
                   else oc_tok.SimpleTokenizer(**(text_cfg.get("tokenizer_kwargs") or {})))
            return lambda texts, length: tok(texts, context_length=length).numpy()
        raise CheckpointError(
            f"{folder} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}): save the checkpoint's tokenizer into "
            "it (`CLIPTokenizer.from_pretrained(<repo>).save_pretrained(folder)`), as the Hugging Face repos have it"
        )
    return make


def load_clip(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: str = "float32",
    matmul_precision: str | None = "highest",
    hf_cache_dir: str | os.PathLike | None = None,
) -> CLIP:
    """Loads a CLIP checkpoint offline (see the module docstring for the layouts).

    Args:
      path_or_repo_id: a folder, an HF-cache ``models--*`` folder or snapshot, or a cached repo id.
      dtype: parameter dtype: ``'float32'`` (parity), ``'bfloat16'`` or ``'float16'``.
      matmul_precision: ``jax.default_matmul_precision`` of the jitted towers ("highest": float32 products on
        every device; None keeps the caller's).
      hf_cache_dir: the Hugging Face hub cache to look repo ids up in.

    Raises:
      CheckpointError: a missing/unknown config, missing weights, keys that do not match (each named), missing
        image-processor or tokenizer files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    folder = resolve_clip(path_or_repo_id, hf_cache_dir=hf_cache_dir)
    fmt = checkpoint_format(folder)
    if fmt == "transformers":
        config_path = folder / "config.json"
        try:
            cfg = CLIPConfig.from_transformers(_read_json(config_path), source=str(config_path))
        except (CLIPConfigError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path}: {e}") from e
        files = _weights(folder, "model")
        proc_path = folder / "preprocessor_config.json"
        if not proc_path.exists():
            raise CheckpointError(
                f"{proc_path} is missing: the checkpoint's image processor says how images are resized and "
                "normalised. Save it into the folder (`CLIPImageProcessor.from_pretrained(<repo>)"
                ".save_pretrained(folder)`), as the Hugging Face repos have it"
            )
        processing = image_processing_from_hf(_read_json(proc_path), source=str(proc_path))
        reader = safetensors_reader(files)
        key_map = transformers_key_map(cfg)
        ignored = lambda k: k.endswith(TRANSFORMERS_IGNORED_SUFFIXES)  # noqa: E731
        configs, model_cfg = [config_path, proc_path], None
    else:
        config_path = folder / "open_clip_config.json"
        raw = _read_json(config_path)
        if "model_cfg" not in raw:
            raise CheckpointError(f"{config_path} has no 'model_cfg' (open_clip's save_for_hf writes model_cfg and "
                                  "preprocess_cfg); re-save it with open_clip")
        model_cfg = raw["model_cfg"]
        try:
            cfg = CLIPConfig.from_open_clip(model_cfg, source=str(config_path))
        except (CLIPConfigError, TypeError, ValueError) as e:
            raise CheckpointError(str(e)) from e
        files = _weights(folder, "open_clip_model")
        processing = image_processing_from_open_clip(raw.get("preprocess_cfg") or {}, cfg.vision.image_size,
                                                     source=str(config_path))
        reader = safetensors_reader(files)
        key_map = open_clip_key_map(cfg, text_prefix=open_clip_text_prefix(reader.where))
        ignored = lambda k: k in OPEN_CLIP_IGNORED_KEYS  # noqa: E731
        configs = [config_path]
    arrays = convert_clip(cfg, reader, key_map, ignored=ignored,
                          hint=f"Check that {config_path.name} and the weights come from the same model.")
    model = build_clip(cfg, arrays, dtype=DTYPES[dtype])
    return CLIP(model, cfg, checkpoint_id=_checkpoint_id(fmt, folder, files, configs), processing=processing,
                tokenizer_factory=_tokenizer_factory(folder, fmt, model_cfg), matmul_precision=matmul_precision)
