"""A batch's backbone taps, from and into the feature cache.

A method names the taps it reads (its spec's ``taps``); the backbone computes exactly those in one program. The
cache stores every requested tap of an image in one ``.npz`` (keys = tap names, each in the backbone's layout
without the batch axis) under

    <feature_cache>/<backbone key>/<dataset>/<preprocessing>-<resolution>px-taps-<digest of the tap set>/
        <image id>-<digest of its pixels>.npz

so the key is (backbone fingerprint, preprocessing and resolution, tap set): a sweep over a method's
hyperparameters runs the backbone once, runs of methods that read other taps never collide, and a changed image
never reuses stale taps. An entry that cannot be used (unreadable, a tap missing, not a floating array of rank >= 2,
or shapes that differ within the batch) is rebuilt with a RuntimeWarning naming it.
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.data import Sample
from spark_jax.runner.backbones import digest, image_digest
from spark_jax.runner.rundir import atomic_write_bytes, safe_name

__all__ = ["PREPROCESSING", "batch_taps", "cache_folder", "feature_map", "token_grid"]

# The preprocessing the cached taps were computed after (spark_jax.data.preprocess.prepare_image: center crop of
# side min(H, W) - 1, resize to the resolution); a change of it must change this tag.
PREPROCESSING = "crop-min-1-resize"


def token_grid(backbone: Any, tap: str) -> tuple[int, int] | None:
    """The token grid (h, w) of ``tap`` at the backbone's resolution, or None if the backbone does not say."""
    return tuple(backbone.tap_grid(tap)) if hasattr(backbone, "tap_grid") else None


def feature_map(x: jax.Array, grid: tuple[int, int] | None, tap: str) -> jax.Array:
    """The feature tap as a map [B, h, w, C]: token-major taps [B, N, C] are reshaped to the backbone's grid."""
    if x.ndim == 4:
        return x
    if x.ndim == 3 and grid is not None and grid[0] * grid[1] == x.shape[1]:
        return x.reshape(x.shape[0], grid[0], grid[1], x.shape[2])
    raise ValueError(f"the feature tap {tap!r} has shape {tuple(x.shape)}: expected [B, h, w, C], or [B, N, C] with "
                     f"N = h * w of the backbone's token grid {grid}")


def cache_folder(cache: str, key: str, dataset: str, resolution: int, taps: Sequence[str]) -> str:
    """The folder of one (backbone, dataset, preprocessing and resolution, tap set) in the cache ``cache``."""
    tap_set = digest("\n".join(sorted(taps)))
    return os.path.join(cache, key, dataset, f"{PREPROCESSING}-{resolution}px-taps-{tap_set}")


def _read_cached(paths: list[str], taps: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached taps of a batch stacked per tap, or None (with a warning naming the entry) when one cannot be
    used: it is then rebuilt from the backbone and rewritten."""
    out: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                entry = {t: z[t] for t in taps}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
            warnings.warn(f"feature cache entry {p} is unreadable ({err}); recomputing it", RuntimeWarning,
                          stacklevel=4)
            return None
        for t, a in entry.items():
            if a.ndim < 2 or not np.issubdtype(a.dtype, np.floating) or (out[t] and a.shape != out[t][0].shape):
                warnings.warn(f"feature cache entry {p} holds a {a.dtype} array of shape {a.shape} for tap {t!r}, "
                              "not the float tap of its batch; recomputing it", RuntimeWarning, stacklevel=4)
                return None
            out[t].append(a)
    return {t: np.stack(v) for t, v in out.items()}


def _extract(backbone: Any, samples: list[Sample], prepared: jax.Array, taps: tuple[str, ...]) -> dict[str, Any]:
    if hasattr(backbone, "extract_prepared"):
        return dict(backbone.extract_prepared(prepared, taps))
    # A backbone that preprocesses raw images itself: batch images of one shape together.
    parts, k = [], 0
    while k < len(samples):
        shape = samples[k].image.shape
        m = k
        while m < len(samples) and samples[m].image.shape == shape:
            m += 1
        parts.append(backbone.extract(np.stack([s.image for s in samples[k:m]]), taps))
        k = m
    return {t: jnp.concatenate([p[t] for p in parts], axis=0) for t in parts[0]}


def batch_taps(backbone: Any, key: str, cache: str | None, dataset: str, resolution: int, samples: list[Sample],
               prepared: jax.Array, taps: tuple[str, ...]) -> dict[str, jax.Array]:
    """The requested ``taps`` of a batch (``prepared``: its images [B, S, S, 3] in [0, 1]), read from and written
    to the feature cache folder ``cache`` when one is given.

    Raises:
        UnknownTapError: the backbone has no such tap (from the backbone, naming it).
        ValueError: the backbone returned other taps than those requested.
    """
    paths = None
    if cache:
        folder = cache_folder(cache, key, dataset, resolution, taps)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{safe_name(s.image_id)}-{image_digest(s.image)}.npz") for s in samples]
        if all(os.path.exists(p) for p in paths):
            cached = _read_cached(paths, taps)
            if cached is not None:
                return {t: jnp.asarray(a) for t, a in cached.items()}
    values = _extract(backbone, samples, prepared, taps)
    missing = [t for t in taps if t not in values]
    if missing:
        raise ValueError(f"the backbone {type(backbone).__name__} returned taps {sorted(values)} for the request "
                         f"{list(taps)}: {missing} missing")
    values = {t: values[t] for t in taps}
    if paths is not None:
        host = {t: np.asarray(v) for t, v in values.items()}
        for j, p in enumerate(paths):
            buf = io.BytesIO()
            np.savez(buf, **{t: a[j] for t, a in host.items()})
            atomic_write_bytes(p, buf.getvalue())
    return values
