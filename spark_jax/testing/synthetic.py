"""Planted-structure token features: known regions, to test and map the clustering's behaviour.

The layout follows reference-facts section 8: a large background, a disc, a rectangle, a
one-token-wide diagonal line and a small 3x3 square — very unequal sizes and a thin structure.
Each region has a random unit mean vector; tokens add isotropic Gaussian noise of std `noise`
per unit-norm feature (noise is scaled by 1/sqrt(C) per channel).
"""

from __future__ import annotations

import numpy as np

from spark_jax.evaluation import LabelSpace, iou_from_counts, score_image

NUM_PLANTED_REGIONS = 5
_PLANTED_SPACE = LabelSpace("planted", tuple(f"region{i}" for i in range(NUM_PLANTED_REGIONS)))


def planted_layout(h: int, w: int) -> np.ndarray:
    """Region ids int32 [h, w] in 0..4: background, disc, rectangle, diagonal, small square.

    Sizes scale with the grid; grids smaller than 8x8 keep only the regions that fit.
    """
    rows, cols = np.mgrid[0:h, 0:w]
    layout = np.zeros((h, w), np.int32)
    # Disc in the upper-left quadrant.
    cy, cx, radius = 0.3 * h, 0.3 * w, 0.18 * min(h, w)
    layout[(rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2] = 1
    # Rectangle in the lower half.
    layout[int(0.6 * h) : int(0.85 * h), int(0.15 * w) : int(0.6 * w)] = 2
    # One-token-wide anti-diagonal line across the right half.
    for r in range(int(0.1 * h), int(0.55 * h)):
        c = int(0.95 * w) - (r - int(0.1 * h))
        if 0 <= c < w:
            layout[r, c] = 3
    # Small 3x3 square near the lower right corner.
    if h >= 8 and w >= 8:
        top, left = int(0.7 * h), int(0.75 * w)
        layout[top : top + 3, left : left + 3] = 4
    return layout


def planted_token_features(
    seed: int, h: int = 32, w: int = 32, c: int = 64, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Token features float32 [h, w, c] and their ground-truth regions int32 [h, w].

    Args:
      seed: seed of the region means and the noise (NumPy PCG64).
      h, w: token grid.
      c: feature channels.
      noise: std of the noise relative to the unit-norm region means.
    """
    rng = np.random.default_rng(seed)
    layout = planted_layout(h, w)
    means = rng.standard_normal((NUM_PLANTED_REGIONS, c))
    means /= np.linalg.norm(means, axis=-1, keepdims=True)
    features = means[layout] + rng.standard_normal((h, w, c)) * (noise / np.sqrt(c))
    return features.astype(np.float32), layout


def many_regions_features(seed: int, h: int, w: int, c: int, noise: float = 0.1) -> np.ndarray:
    """[h, w, c] float32 token features of dozens of small planted regions: runs of 3-8 tokens in raster
    order, each a tight cluster around its own random unit mean (noise std ``noise`` relative to the unit
    means). With DiffCut's defaults most runs become segments, one cut at a time (40-50 cuts on 16 x 16)."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < h * w:
        sizes.append(int(rng.integers(3, 9)))
    layout = np.repeat(np.arange(len(sizes)), sizes)[: h * w].reshape(h, w)
    means = rng.standard_normal((len(sizes), c))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    features = means[layout] + rng.standard_normal((h, w, c)) * noise / np.sqrt(c)
    return features.astype(np.float32)


def planted_miou(pred: np.ndarray, regions: np.ndarray) -> float:
    """mIoU of one prediction [h, w] against planted regions [h, w], after Hungarian matching.

    Scored with the benchmarks' own protocol (`evaluation.score_image`, one image): segments
    are matched one-to-one to regions; unmatched segments count as false positives.
    """
    counts = score_image(np.asarray(pred), np.asarray(regions), _PLANTED_SPACE)
    return float(np.nanmean(iou_from_counts(counts.tp, counts.fp, counts.fn)))
