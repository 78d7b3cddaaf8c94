"""Conditioning and noise of the reference feature pipeline (reference facts, section 1).

- Prompt embeddings of the empty prompt through the checkpoint's own CLIP text encoder(s), run once
  with transformers (PyTorch) and cached as ``.npz`` beside the converted weights: later runs need
  no torch.
- SDXL ``add_time_ids`` ``[H, W, 0, 0, H, W]``.
- The DDPM forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with the alphas of the
  checkpoint's own scheduler config, and one seeded noise tensor shared by the whole batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError

from spark_jax.backbones.checkpoint import (
    CheckpointError,
    dangling_link_error,
    default_cache_dir,
    read_config,
    require_fields,
    resolve_pretrained,
)

CONDITIONING_VERSION = 1


class PromptEmbeddings(NamedTuple):
    """Text conditioning of one prompt.

    Attributes:
      encoder_hidden_states: [L, D] float32 token embeddings (SDXL family: CLIP-L and bigG penultimate
        hidden states concatenated; SD 1.x/2.x: the encoder's last hidden state).
      text_embeds: [P] float32 pooled projection of the second encoder (SDXL family), else None.
    """

    encoder_hidden_states: np.ndarray
    text_embeds: np.ndarray | None


def _encoder_folders(root: Path) -> list[tuple[Path, Path]]:
    """(tokenizer, text_encoder) folder pairs of a pipeline, in diffusers' order."""
    pairs = [(root / "tokenizer", root / "text_encoder")]
    listed = {}
    if (root / "model_index.json").is_file():
        with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
            listed = json.loads((root / "model_index.json").read_text())
    # SDXL-family pipelines list a second encoder in model_index.json: its folder is required, not optional.
    if (root / "text_encoder_2").is_dir() or listed.get("text_encoder_2"):
        pairs.append((root / "tokenizer_2", root / "text_encoder_2"))
    for tok, enc in pairs:
        for folder in (tok, enc):
            if not folder.is_dir():
                raise CheckpointError(
                    f"{folder} is missing: the empty-prompt embeddings are computed with the checkpoint's own "
                    "tokenizer and text encoder; use a complete diffusers pipeline folder"
                )
    return pairs


def _conditioning_digest(root: Path, prompt: str) -> str:
    h = hashlib.sha256(f"v{CONDITIONING_VERSION}:{prompt!r}".encode())
    for tok, enc in _encoder_folders(root):
        for folder in (tok, enc):
            for f in sorted(folder.iterdir()):
                if (err := dangling_link_error(f)) is not None:
                    raise err
                if f.is_file():
                    st = f.resolve().stat()
                    h.update(f"{folder.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def compute_prompt_embeddings(root: str | os.PathLike, prompt: str = "") -> PromptEmbeddings:
    """Encodes ``prompt`` as diffusers' SD/SDXL pipelines do (no classifier-free guidance, no clip skip).

    Needs torch and transformers; ``prompt_embeddings`` caches the result.

    Args:
      root: a diffusers pipeline folder (see ``checkpoint.resolve_pretrained``).
      prompt: the prompt; the reference pipeline uses "".
    """
    try:
        import torch
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as e:
        raise CheckpointError(
            "computing the prompt embeddings needs torch and transformers once per checkpoint "
            "(pip install 'spark_jax[torch]'); afterwards they are read from the cache"
        ) from e
    root = resolve_pretrained(root)
    pairs = _encoder_folders(root)
    hidden, pooled = [], None
    with torch.no_grad():
        for i, (tok_dir, enc_dir) in enumerate(pairs):
            read_config(enc_dir)
            try:
                tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
                cls = CLIPTextModelWithProjection if i == 1 else CLIPTextModel
                encoder = cls.from_pretrained(enc_dir, local_files_only=True, dtype=torch.float32).eval()
            except (OSError, ValueError, SafetensorError) as e:
                raise CheckpointError(
                    f"cannot load {tok_dir} / {enc_dir}: {e}. A file there is missing, truncated or corrupt: "
                    "download the model again"
                ) from e
            ids = tokenizer(
                prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )
            if len(pairs) == 1:
                # SD 1.x/2.x: last hidden state, with the attention mask only if the config asks for it.
                mask = ids.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
                hidden.append(encoder(ids.input_ids, attention_mask=mask)[0][0])
            else:
                # SDXL: penultimate hidden states of both encoders; pooled projection of the second.
                out = encoder(ids.input_ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2][0])
                if i == 1:
                    pooled = out.text_embeds[0].float().numpy()
    states = torch.cat(hidden, dim=-1).float().numpy()
    for name, arr in (("token embeddings", states), ("pooled embedding", pooled)):
        if arr is not None and not np.isfinite(arr).all():  # NaN weights in a text encoder would reach every feature
            raise CheckpointError(
                f"the prompt's {name} from {', '.join(str(enc) for _, enc in pairs)} are not finite: a text "
                "encoder's weights are corrupt (NaN or Inf); download the model again"
            )
    return PromptEmbeddings(states, pooled)


def prompt_embeddings(
    root: str | os.PathLike,
    prompt: str = "",
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> PromptEmbeddings:
    """The prompt's embeddings, computed once per checkpoint (with torch) and then read from the cache.

    The cache entry is keyed by the prompt and the name, size and mtime of every tokenizer and
    text-encoder file, so a changed checkpoint is re-encoded.
    """
    root = resolve_pretrained(root)
    if not use_cache:
        return compute_prompt_embeddings(root, prompt)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache_root / "conditioning" / f"prompt-{_conditioning_digest(root, prompt)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                pooled = z["text_embeds"] if "text_embeds" in z.files else None
                return PromptEmbeddings(z["encoder_hidden_states"], pooled)
        except (OSError, ValueError, KeyError):
            pass  # damaged entry: recompute below
    emb = compute_prompt_embeddings(root, prompt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    arrays = {"encoder_hidden_states": emb.encoder_hidden_states}
    if emb.text_embeds is not None:
        arrays["text_embeds"] = emb.text_embeds
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return emb


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None
) -> np.ndarray:
    """SDXL micro-conditioning ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` -> [6] float32."""
    target_size = original_size if target_size is None else target_size
    return np.asarray([*original_size, *crop_top_left, *target_size], dtype=np.float32)


def alphas_cumprod(scheduler_config: Mapping[str, Any]) -> np.ndarray:
    """Cumulative products abar_t of a diffusers scheduler config (DDPM/DDIM/Euler/PNDM share them).

    Returns:
      [num_train_timesteps] float64.
    """
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    start = float(scheduler_config.get("beta_start", 0.0001))
    end = float(scheduler_config.get("beta_end", 0.02))
    schedule = scheduler_config.get("beta_schedule", "linear")
    if scheduler_config.get("trained_betas") is not None:
        betas = np.asarray(scheduler_config["trained_betas"], np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def abar(t: np.ndarray) -> np.ndarray:
            return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        t = np.arange(n, dtype=np.float64)
        betas = np.minimum(1 - abar((t + 1) / n) / abar(t / n), 0.999)
    else:
        raise CheckpointError(
            f"scheduler beta_schedule={schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        )
    if scheduler_config.get("rescale_betas_zero_snr", False):
        raise CheckpointError("scheduler rescale_betas_zero_snr=True is not supported")
    return np.cumprod(1.0 - betas)


def load_alphas_cumprod(root: str | os.PathLike) -> np.ndarray:
    """abar_t from ``<root>/scheduler/scheduler_config.json``."""
    folder = resolve_pretrained(root) / "scheduler"
    path = folder / "scheduler_config.json"
    if (err := dangling_link_error(path)) is not None:
        raise err
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the noise schedule is read from the checkpoint's scheduler config")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if config.get("trained_betas") is None:  # the schedule is computed from these; defaults would be DDPM's
        require_fields(config, ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule"), str(path))
    return alphas_cumprod(config)


def add_noise(latents: jax.Array, noise: jax.Array, alpha_bar: float | jax.Array) -> jax.Array:
    """DDPM forward process ``sqrt(abar) x_0 + sqrt(1 - abar) eps``.

    Args:
      latents: [B, h, w, c] clean latents x_0.
      noise: [1 or B, h, w, c] Gaussian noise (broadcast over the batch when leading dim is 1).
      alpha_bar: abar_t of the timestep.
    """
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    noise = jnp.broadcast_to(noise, latents.shape)
    return (jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1.0 - alpha_bar) * noise).astype(latents.dtype)


def load_noise_file(path: str | os.PathLike, shape: tuple[int, int, int]) -> jax.Array:
    """The noise tensor of ``BackboneConfig(noise_source="file")``: a ``.npy`` array in torch's layout.

    The format is what ``np.save(path, torch.randn(1, c, h, w, ...).cpu().numpy())`` writes: one array of shape
    [1, c, h, w] (NCHW, h = w = resolution / 8 for SD-family VAEs), any float dtype (cast to float32; save the
    float32 draw itself to reproduce it exactly), every value finite. Channels-last files are refused, not
    guessed: a [1, h, w, c] array would be read as another noise.

    Args:
      path: the ``.npy`` file, e.g. DiffCut's CUDA draw saved once where a GPU is.
      shape: (h, w, c) of one latent at the configured resolution.

    Returns:
      [1, h, w, c] float32 (channels last, as ``shared_noise``).

    Raises:
      CheckpointError: the file is missing or unreadable, or its shape, dtype or values are wrong; the message
        names the file, what it holds and what is expected.
    """
    h, w, c = shape
    name = f"noise_file {str(path)!r}"
    want = f"(1, {c}, {h}, {w})"
    save_hint = "save the draw with np.save(path, eps.cpu().numpy()) where eps = torch.randn(1, c, h, w, ...)"
    if not Path(path).is_file():
        raise CheckpointError(f"{name} does not exist (or is not a file); {save_hint}, shape {want}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{name} cannot be read as a .npy array ({e}); {save_hint}") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive under a .npy name
        arr.close()
        raise CheckpointError(f"{name} is an .npz archive, not one .npy array; {save_hint}")
    if arr.shape != (1, c, h, w):
        layout = (
            f"; it looks channels-last: store torch's NCHW layout (arr.transpose(0, 3, 1, 2))"
            if arr.shape == (1, h, w, c) else ""
        )
        raise CheckpointError(
            f"{name} holds shape {arr.shape}; the latent at this resolution needs {want} in torch's NCHW layout "
            f"(as torch.randn(1, c, h, w) draws it){layout}"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise CheckpointError(
            f"{name} holds {arr.dtype} values; Gaussian noise is floating point (float32 as torch draws it)"
        )
    if not np.isfinite(arr).all():
        raise CheckpointError(
            f"{name} holds {int((~np.isfinite(arr)).sum())} non-finite values (NaN or Inf) of {arr.size}; "
            "the file is damaged: save the draw again"
        )
    return jnp.asarray(np.ascontiguousarray(arr.transpose(0, 2, 3, 1)), jnp.float32)


def shared_noise(
    seed: int, shape: tuple[int, int, int], *, source: str = "jax", cache_dir: str | os.PathLike | None = None
) -> jax.Array:
    """One standard-normal noise tensor [1, h, w, c] from ``seed``, shared by every image of a batch.

    Args:
      seed: generator seed (42 in the reference).
      shape: (h, w, c) of one latent.
      source: "jax" draws from JAX's generator (same distribution as the reference, another
        sample); "torch" is exactly ``torch.randn((1, c, h, w), generator=torch.Generator("cpu")
        .manual_seed(seed))``, needs torch on first use and is then cached as ``.npy``. That is
        DiffCut's draw only where DiffCut ran without a GPU: its ``tools/ldm.py`` seeds
        ``torch.Generator(device=self.device)`` on ``cuda:0`` when one is available, and torch's CUDA
        generator draws other numbers than its CPU one. Pass such a draw with ``load_noise_file``.
      cache_dir: cache of the torch draw (default ``default_cache_dir()``).
    """
    if source == "jax":
        return jax.random.normal(jax.random.key(seed), (1, *shape), jnp.float32)
    if source != "torch":
        raise ValueError(f"noise source {source!r}; choose 'jax' or 'torch'")
    h, w, c = shape
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / "noise" / f"torch-cpu-seed{seed}-{c}x{h}x{w}.npy"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError, EOFError):  # a damaged entry is drawn again below
            cached = np.load(path, allow_pickle=False)
            if isinstance(cached, np.ndarray) and cached.shape == (1, h, w, c) and np.isfinite(cached).all():
                return jnp.asarray(cached, jnp.float32)
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            "noise source 'torch' needs torch once to draw the reference noise (pip install 'spark_jax[torch]'); "
            "afterwards it is read from the cache"
        ) from e
    eps = torch.randn((1, c, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    arr = np.ascontiguousarray(eps.numpy().transpose(0, 2, 3, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return jnp.asarray(arr)
