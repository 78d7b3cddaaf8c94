"""The one torch-exact bilinear resampler: ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``.

With an output size (not a scale factor) and no antialiasing, torch reads for output sample ``o`` the source
coordinate ``s = max((o + 0.5) * in / out - 0.5, 0)`` (in float32) and mixes ``floor(s)`` and
``min(floor(s) + 1, in - 1)`` with weights ``1 - frac(s)`` and ``frac(s)``. ``bilinear_taps`` computes these
index pairs and weights once (NumPy, static shapes); ``resize_bilinear`` applies them as a gather (images, any
size), ``bilinear_matrix`` as a matrix (token grids: upsampling is then one matmul per axis).
``jax.image.resize(..., 'bilinear')`` is not a substitute: it anti-aliases when downsampling.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["bilinear_matrix", "bilinear_taps", "resize_bilinear"]


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs and weights of torch's bilinear resize (align_corners=False, no antialias).

    Mirrors ``area_pixel_compute_source_index`` in float32: ``src = (dst + 0.5) * in / out - 0.5``,
    clamped at 0; ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, weight of ``i1`` = ``src - i0``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), w1


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The 1-D resampling of ``bilinear_taps`` as an interpolation matrix (rows sum to one).

    Args:
      in_size: number of source samples (>= 1).
      out_size: number of output samples (>= 1).

    Returns:
      float32 array ``[out_size, in_size]``; a NumPy constant, since both sizes are static.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear_matrix needs sizes >= 1; got in_size={in_size}, out_size={out_size}.")
    lo, hi, frac = bilinear_taps(in_size, out_size)
    mat = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), np.float32(1.0) - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def resize_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` without antialias.

    DiffCut gives PAMR the 1024 input resized this way to the 128x128 mask size.

    Args:
        x: ``[..., H, W, C]`` float image.
        height: output height.
        width: output width.

    Returns:
        ``[..., height, width, C]`` float32.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"resize_bilinear expects [..., H, W, C], got shape {tuple(x.shape)}")
    lead = (1,) * (x.ndim - 3)  # explicit ranks: no implicit rank promotion
    r0, r1, rw = bilinear_taps(int(x.shape[-3]), int(height))
    c0, c1, cw = bilinear_taps(int(x.shape[-2]), int(width))
    w_rows = jnp.asarray(rw).reshape(lead + (-1, 1, 1))
    w_cols = jnp.asarray(cw).reshape(lead + (1, -1, 1))
    # Rows (axis -3) then columns (axis -2): bilinear interpolation is separable.
    x = jnp.take(x, r0, axis=-3) * (1.0 - w_rows) + jnp.take(x, r1, axis=-3) * w_rows
    return jnp.take(x, c0, axis=-2) * (1.0 - w_cols) + jnp.take(x, c1, axis=-2) * w_cols
