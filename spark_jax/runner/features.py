"""A batch's backbone features, from and into the feature cache.

The cache holds one ``.npy`` per image under ``<feature_cache>/<backbone key>/<dataset>/``, named by the image id
and a digest of its pixels, so a sweep over a method's hyperparameters runs the backbone once and a changed image
never reuses stale features. An entry that cannot be used is rebuilt with a RuntimeWarning naming it.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.data import Sample
from spark_jax.runner.backbones import image_digest
from spark_jax.runner.rundir import atomic_write_bytes, safe_name

__all__ = ["batch_features"]


def _read_cached(paths: list[str]) -> np.ndarray | None:
    """The cached features of a batch, or None (with a warning naming the entry) when one cannot be used: it is
    then rebuilt from the backbone and rewritten."""
    arrays = []
    for p in paths:
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            warnings.warn(f"feature cache entry {p} is unreadable ({err}); recomputing it", RuntimeWarning,
                          stacklevel=4)
            return None
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating) or (arrays and a.shape != arrays[0].shape):
            warnings.warn(f"feature cache entry {p} holds a {a.dtype} array of shape {a.shape}, not the [h, w, C] "
                          "float features of its batch; recomputing it", RuntimeWarning, stacklevel=4)
            return None
        arrays.append(a)
    return np.stack(arrays)


def _extract(backbone: Any, samples: list[Sample], prepared: jax.Array) -> jax.Array:
    if hasattr(backbone, "extract_features_prepared"):
        return backbone.extract_features_prepared(prepared)
    # A backbone that preprocesses raw images itself: batch images of one shape together.
    parts, k = [], 0
    while k < len(samples):
        shape = samples[k].image.shape
        m = k
        while m < len(samples) and samples[m].image.shape == shape:
            m += 1
        parts.append(backbone.extract_features(np.stack([s.image for s in samples[k:m]])))
        k = m
    return jnp.concatenate(parts, axis=0)


def batch_features(backbone: Any, key: str, cache: str | None, dataset: str, samples: list[Sample],
                   prepared: jax.Array) -> jax.Array:
    """Backbone features [B, h, w, C] of a batch (``prepared``: its images [B, S, S, 3] in [0, 1]), read from and
    written to the feature cache folder ``cache`` when one is given."""
    paths = None
    if cache:
        folder = os.path.join(cache, key, dataset)
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, f"{safe_name(s.image_id)}-{image_digest(s.image)}.npy") for s in samples]
        if all(os.path.exists(p) for p in paths):
            cached = _read_cached(paths)
            if cached is not None:
                return jnp.asarray(cached)
    feats = _extract(backbone, samples, prepared)
    if paths is not None:
        for p, f in zip(paths, np.asarray(feats)):
            buf = io.BytesIO()
            np.save(buf, f)
            atomic_write_bytes(p, buf.getvalue())
    return feats
