"""Per-image outputs: the prediction PNG (cluster ids at the mask size) and the overlay image | prediction |
ground truth."""

from __future__ import annotations

import os

import jax
import numpy as np

from spark_jax.masks.resample import resize_bilinear
from spark_jax.runner.rundir import atomic_write_png, safe_name

__all__ = ["overlay", "resize_image", "write_image_outputs"]

_small_jit = jax.jit(resize_bilinear, static_argnums=(1, 2))


def resize_image(images, height: int, width: int) -> np.ndarray:
    """Images [..., S, S, 3] resized bilinearly (as PAMR and the overlays see them)."""
    return np.asarray(_small_jit(images, height, width))


def _palette(n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (n, 3), dtype=np.int64)
    pal[0] = (70, 70, 200)
    return pal.astype(np.uint8)


_PALETTE = _palette()


def _colour(labels: np.ndarray, ignore: int | None = None) -> np.ndarray:
    out = _PALETTE[np.asarray(labels) % len(_PALETTE)]
    if ignore is not None:
        out[np.asarray(labels) == ignore] = 0
    return out


def overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray | None, ignore: int) -> np.ndarray:
    """image [S, S, 3] float | prediction blend | ground-truth blend, side by side (uint8)."""
    scale = max(1, 256 // pred.shape[0])  # overlays at >= 256 px, predictions upsampled by pixel repetition

    def up(a):
        return np.repeat(np.repeat(a, scale, 0), scale, 1)

    base = resize_image(image, pred.shape[0] * scale, pred.shape[1] * scale)
    base = (np.clip(base, 0, 1) * 255).astype(np.float32)
    panels = [base, 0.45 * base + 0.55 * up(_colour(pred))]
    if label is not None:
        panels.append(0.45 * base + 0.55 * up(_colour(label, ignore)))
    return np.concatenate(panels, axis=1).astype(np.uint8)


def write_image_outputs(out: str, image_id: str, final: np.ndarray, image: np.ndarray, label: np.ndarray | None,
                        ignore: int, with_overlay: bool) -> None:
    """Writes ``predictions/<id>.png`` (16-bit if >= 256 segments) and, if asked, ``overlays/<id>.png``."""
    dtype = np.uint8 if final.max() < 256 else np.uint16
    atomic_write_png(os.path.join(out, "predictions", safe_name(image_id) + ".png"), final.astype(dtype))
    if with_overlay:
        atomic_write_png(os.path.join(out, "overlays", safe_name(image_id) + ".png"),
                         overlay(image, final, label, ignore))
