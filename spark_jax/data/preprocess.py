"""Center crop and resize of images and label maps, exactly as DiffCut's released pipeline does it.

SPARK (Sec. 4.1) runs DiffCut's pipeline: every image is center-cropped to a square and resized to
1024x1024 before the VAE, and predictions are scored at 128x128 against the label map cropped the same way.
DiffCut's released data loader (``dataloader/iterator.py``) does, on CHW torch tensors:

* ``side = min(H, W) - 1`` (one pixel shorter than the short side, as released);
* ``torchvision.transforms.CenterCrop(side)``: top/left = ``int(round((H - side) / 2))`` with Python's
  round-half-to-even;
* images: ``read_image(...) / 255`` then ``Resize(size, BILINEAR, antialias=None)``, which on tensors means
  ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)``: half-pixel
  centres, source coordinate clamped at 0, no low-pass filter when shrinking;
* labels: ``Resize(1024, NEAREST_EXACT)`` in the loader, then ``F.interpolate(size=128)`` (legacy
  ``nearest``: source index ``floor(dst * in / out)``) in the evaluation script.

Resampling here is a gather with index/weight tables computed in NumPy from the static shapes at trace
time, so both functions are ``jax.jit``/``vmap`` compatible and agree with torch to float rounding (the
tests compare against ``torch.nn.functional.interpolate``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from spark_jax.masks.resample import resize_bilinear

__all__ = ["crop_box", "label_indices", "nearest_index", "prepare_image", "prepare_label"]


def crop_box(height: int, width: int) -> tuple[int, int, int]:
    """Square center crop of DiffCut's loader.

    Args:
        height: image height H (>= 2).
        width: image width W (>= 2).

    Returns:
        ``(top, left, side)`` with ``side = min(H, W) - 1`` and torchvision's CenterCrop offsets
        ``int(round((H - side) / 2))``, ``int(round((W - side) / 2))`` (round half to even).

    Raises:
        ValueError: if the image is smaller than 2x2 (the crop would be empty).
    """
    height, width = int(height), int(width)
    if min(height, width) < 2:
        raise ValueError(
            f"crop_box needs an image of at least 2x2 pixels, got {height}x{width}: the reference crop is "
            "min(H, W) - 1 pixels wide."
        )
    side = min(height, width) - 1
    # Python's round() is round-half-to-even, exactly what torchvision's center_crop uses.
    top = int(round((height - side) / 2.0))
    left = int(round((width - side) / 2.0))
    return top, left, side


@functools.lru_cache(maxsize=256)
def nearest_index(in_size: int, out_size: int, exact: bool) -> np.ndarray:
    """Source indices of torch's ``nearest-exact`` (``exact=True``) or legacy ``nearest`` resize, in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = (dst + np.float32(0.5)) * scale if exact else dst * scale
    return np.minimum(np.floor(src).astype(np.int64), in_size - 1).astype(np.int32)


def label_indices(height: int, width: int, size: int, *, via: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source rows and columns that :func:`prepare_label` gathers (static, NumPy).

    Args:
        height: label map height H.
        width: label map width W.
        size: output side.
        via: if given, emulate DiffCut's two-step path: nearest-exact resize of the crop to ``via`` x ``via``
            (the loader, ``via`` = image resolution) followed by legacy nearest to ``size`` (the evaluation).
            ``None``: one nearest-exact resize of the crop to ``size`` (pixel-centre sampling).

    Returns:
        ``(rows [size], cols [size])`` int32 indices into the *uncropped* label map.
    """
    top, left, side = crop_box(height, width)
    if via is None:
        idx = nearest_index(side, size, True)
    else:
        idx = nearest_index(side, int(via), True)[nearest_index(int(via), size, False)]
    return (idx + top).astype(np.int32), (idx + left).astype(np.int32)


def _check_hw(x: jnp.ndarray, what: str, channels: bool) -> tuple[int, int]:
    need = 3 if channels else 2
    if x.ndim < need or (channels and x.shape[-1] != 3):
        layout = "[..., H, W, 3] (RGB, channels last)" if channels else "[..., H, W]"
        raise ValueError(f"{what} must have layout {layout}, got shape {tuple(x.shape)}.")
    return (int(x.shape[-3]), int(x.shape[-2])) if channels else (int(x.shape[-2]), int(x.shape[-1]))


def prepare_image(image: jnp.ndarray, size: int) -> jnp.ndarray:
    """Center-crop and bilinearly resize an RGB image as DiffCut's loader does (Sec. 4.1 of SPARK).

    Args:
        image: ``[..., H, W, 3]`` uint8 in [0, 255] or float in [0, 1]. Leading batch dimensions are kept
            (all images of a batch share one shape; use ``vmap`` or stack).
        size: output side (1024 for SSD-1B).

    Returns:
        ``[..., size, size, 3]`` float32 in [0, 1]. Not yet mapped to [-1, 1]: that is the VAE's input
        convention and belongs to the backbone.
    """
    image = jnp.asarray(image)
    height, width = _check_hw(image, "image", channels=True)
    if image.dtype == jnp.uint8:
        x = image.astype(jnp.float32) / 255.0  # the loader divides by 255 before resizing
    else:
        x = image.astype(jnp.float32)
    top, left, side = crop_box(height, width)
    x = x[..., top : top + side, left : left + side, :]
    return resize_bilinear(x, int(size), int(size))


def prepare_label(label: jnp.ndarray, size: int, *, via: int | None = None) -> jnp.ndarray:
    """Center-crop and nearest-resize a label map with the crop of :func:`prepare_image`.

    Args:
        label: ``[..., H, W]`` integer class ids (any ignore value is kept as is).
        size: output side (128 for scoring).
        via: ``None`` for one nearest-exact resize of the crop; an int (the image resolution, 1024) for
            DiffCut's exact two-step path (see :func:`label_indices`), used by the ``diffcut`` protocol.

    Returns:
        ``[..., size, size]`` int32.
    """
    label = jnp.asarray(label)
    height, width = _check_hw(label, "label", channels=False)
    if not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"label must hold integer class ids, got dtype {label.dtype}.")
    rows, cols = label_indices(height, width, int(size), via=via)
    return jnp.take(jnp.take(label.astype(jnp.int32), rows, axis=-2), cols, axis=-1)
