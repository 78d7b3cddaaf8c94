"""The embedded benchmark: procedurally generated images with exact ground truth, nothing to download.

Each image is painted from a seeded generator, so the benchmark is identical on every machine and numpy
version that keeps ``Generator(PCG64)`` streams (numpy guarantees this). Classes are materials, each with its
own colour family *and* texture, so that a segmenter must group by appearance, not by a single colour:

==========  ===============================================================
background  smooth vertical two-colour gradient (sky-like), always present
stripes     sinusoidal stripes of random orientation and period, large ellipse
checker     two-shade checkerboard, medium rotated rectangle
dots        dot lattice on a light base, small disc (a few % of the image)
speckle     per-pixel noise on a dark base, triangle
wire        a 2-3 pixel wide straight line across the image (a thin structure)
==========  ===============================================================

Sizes are very unequal by construction (background > stripes > checker > speckle > dots > wire). Each image
holds the background plus a random subset of 3-5 other classes. The scikit-image sample photographs are
appended as unlabelled samples (shown in overlays, not scored).
"""

from __future__ import annotations

import numpy as np

from spark_jax.data.base import Dataset, Sample, map_raw_labels, raw_label_space
from spark_jax.evaluation import LabelSpace

__all__ = ["DEMO_LABEL_SPACE", "demo_image", "DemoDataset", "PHOTO_NAMES"]

DEMO_LABEL_SPACE = LabelSpace(
    "demo", ("background", "stripes", "checker", "dots", "speckle", "wire"), background=None
)
# The generator paints class ids 0..5 and no void; the reader checks every map against that like any reader.
DEMO_RAW_LABELS = raw_label_space({i: i for i in range(DEMO_LABEL_SPACE.num_classes)}, "0..5, no void")
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
_SEED = 20260
# Base colours per class (RGB in [0, 1]); per-image jitter stays well inside each family.
_COLOURS = {
    1: (0.85, 0.35, 0.15),  # stripes: orange
    2: (0.20, 0.55, 0.25),  # checker: green
    3: (0.95, 0.90, 0.55),  # dots: pale yellow
    4: (0.25, 0.20, 0.45),  # speckle: dark violet
    5: (0.05, 0.05, 0.05),  # wire: near black
}


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy, xx


def _texture(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``[h, w, 3]`` float texture of material ``cls`` over the whole canvas."""
    base = np.clip(np.asarray(_COLOURS[cls]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    if cls == 1:  # stripes
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 11)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        return base * (0.55 + 0.45 * s)[..., None]
    if cls == 2:  # checker
        cell = int(rng.integers(6, 10))
        c = ((yy // cell + xx // cell) % 2)[..., None]
        return base * (0.6 + 0.4 * c)
    if cls == 3:  # dots
        step = int(rng.integers(5, 8))
        d = np.hypot((yy % step) - step / 2, (xx % step) - step / 2)
        return base * np.where(d < step / 4, 0.55, 1.0)[..., None]
    if cls == 4:  # speckle
        return np.clip(base + rng.normal(0, 0.12, yy.shape + (3,)), 0, 1)
    return np.broadcast_to(base, yy.shape + (3,)).copy()  # wire: flat


def _shape_mask(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    h, w = yy.shape
    if cls == 1:  # large ellipse
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.3, 0.7) * w
        ry, rx = rng.uniform(0.25, 0.38) * h, rng.uniform(0.25, 0.38) * w
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if cls == 2:  # medium rotated rectangle
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        a = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        return (np.abs(u) <= rng.uniform(0.12, 0.2) * w) & (np.abs(v) <= rng.uniform(0.1, 0.16) * h)
    if cls == 3:  # small disc
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        return np.hypot(yy - cy, xx - cx) <= rng.uniform(0.06, 0.09) * min(h, w)
    if cls == 4:  # triangle
        pts = np.stack([rng.uniform(0.1, 0.9, 3) * h, rng.uniform(0.1, 0.9, 3) * w], axis=1)
        def area2(q):  # twice the triangle's area
            (ay, ax), (by, bx) = q[1] - q[0], q[2] - q[0]
            return abs(ay * bx - ax * by)

        while area2(pts) < 0.04 * h * w:  # not a sliver
            pts = np.stack([rng.uniform(0.1, 0.9, 3) * h, rng.uniform(0.1, 0.9, 3) * w], axis=1)
        signs = []
        for i in range(3):
            (y0, x0), (y1, x1) = pts[i], pts[(i + 1) % 3]
            signs.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0)
        return (signs[0] & signs[1] & signs[2]) | (~signs[0] & ~signs[1] & ~signs[2])
    # wire: a thin line through the canvas
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    a = rng.uniform(0, np.pi)
    dist = np.abs(-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a))
    return dist <= rng.uniform(1.0, 1.5)


def demo_image(index: int, height: int = 192, width: int = 256) -> Sample:
    """Paints demo image ``index`` deterministically.

    Args:
        index: image number (any non-negative int; each gives a different scene).
        height: image height in pixels.
        width: image width in pixels (landscape by default, so the center crop matters).

    Returns:
        :class:`Sample` with a uint8 image and an int32 label map in ``DEMO_LABEL_SPACE`` ids (no void).
    """
    if index < 0:
        raise ValueError(f"demo image index must be >= 0, got {index}")
    rng = np.random.default_rng([_SEED, index])
    yy, xx = _grid(height, width)
    top = np.clip(np.array([0.45, 0.65, 0.95]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    bottom = np.clip(np.array([0.75, 0.85, 1.0]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    t = (yy / max(height - 1, 1))[..., None]
    image = (1 - t) * top + t * bottom
    label = np.zeros((height, width), np.int32)
    classes = sorted(rng.choice([1, 2, 3, 4, 5], size=int(rng.integers(3, 6)), replace=False).tolist())
    for cls in classes:  # painted in class order: large first, the wire last (on top)
        mask = _shape_mask(cls, rng, yy, xx)
        image = np.where(mask[..., None], _texture(cls, rng, yy, xx), image)
        label[mask] = cls
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return Sample(image, label, f"demo_{index:04d}")


class DemoDataset(Dataset):
    """``num_images`` procedural images (scored), then the scikit-image photographs (not scored).

    Args:
        num_images: number of generated images.
        height: generated image height.
        width: generated image width.
        photos: append the scikit-image sample photographs (needs scikit-image; skipped with a note if absent).
    """

    name = "demo"
    label_space = DEMO_LABEL_SPACE

    def __init__(self, num_images: int = 8, height: int = 192, width: int = 256, photos: bool = True):
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        self.num_images, self.height, self.width = num_images, height, width
        self.photos: tuple[str, ...] = ()
        self.note = ""
        if photos:
            try:
                import skimage.data  # noqa: F401  (optional: only the overlay photographs need it)

                self.photos = PHOTO_NAMES
            except ImportError:
                self.note = "scikit-image is not installed: the sample photographs are skipped."

    @property
    def ids(self) -> list[str]:
        return [f"demo_{i:04d}" for i in range(self.num_images)] + [f"photo_{n}" for n in self.photos]

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < self.num_images:
            s = demo_image(index, self.height, self.width)
            where = f"<generated demo image {index}>"
            return s._replace(label=map_raw_labels(s.label, DEMO_RAW_LABELS, dataset="demo", image_id=s.image_id,
                                                   path=where))
        import skimage.data

        name = self.photos[index - self.num_images]
        image = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)[..., :3]
        return Sample(image, None, f"photo_{name}")
