"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as used by SPARK and DiffCut.

PAMR smooths label masks along image colour: each pixel repeatedly takes a weighted average of its
neighbours' masks, the weights being a softmax of negative, locally normalised colour differences.

What follows the original PAMR module (Araslanov & Roth 2020, ``models/mods/pamr.py`` of their
released code, which DiffCut vendors unchanged):
  * neighbours: for every dilation d, the 8 pixels at offsets ``d * (dy, dx)``, ``dy, dx in {-1, 0, 1}``
    minus the centre, with replicate (edge) padding;
  * ``sigma``: per colour channel, the unbiased standard deviation over all ``9 * len(dilations)``
    taps (the 3x3 window of every dilation, centre included — so the centre counts once per dilation);
  * affinity ``-|I(i) - I(i+p)| / (1e-8 + 0.1 * sigma)`` per channel, averaged over colour channels,
    then a softmax over the ``8 * len(dilations)`` neighbours (the centre is not a neighbour);
  * ``num_iter`` steps of ``m(i) <- sum_p alpha_p(i) m(i + p)``, with the affinities computed once.
What follows DiffCut's evaluation (``eval_diffcut.py``; reference-facts section 4), and is our default:
  * 10 iterations with dilations (1, 2, 4, 8) (the module's constructor defaults are 1 iteration and
    dilation 1; Araslanov & Roth's own setting is 10 iterations with dilations (1, 2, 4, 8, 12, 24)),
    applied at the 128x128 scoring size to the one-hot masks of the predicted labels, with the image
    resized bilinearly (no anti-aliasing: ``spark_jax.data.preprocess.resize_bilinear``) to 128x128 in [0, 1];
  * then the argmax over labels (ties: lowest id) and a 3x3 median filter of the label map
    (``scipy.ndimage.median_filter(labels, 3)``, default ``mode='reflect'``; see ``median_filter_3x3``).
The original module also resizes the masks to the image size (bilinear, ``align_corners=True``); in
DiffCut's use both are already 128x128, so ``pamr`` here requires masks at the image size instead.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

__all__ = [
    "PamrConfig",
    "pamr",
    "pamr_affinity",
    "median_filter_3x3",
    "refine_labels",
    "refine_labels_batch",
    "keep_largest_segments",
    "label_capacity",
]

# The 8 neighbour directions of a 3x3 window, row-major without the centre (the original module's order).
_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# The 9 taps of the window, centre included: the standard deviation is taken over these.
_WINDOW = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclasses.dataclass(frozen=True)
class PamrConfig:
    """PAMR settings of the reference evaluation (DiffCut's ``eval_diffcut.py``, used by SPARK).

    Attributes:
      num_iter: propagation steps.
      dilations: neighbourhood dilations; each contributes 8 neighbours.
      median_filter: apply a 3x3 median filter to the label map after the argmax.
    """

    num_iter: int = 10
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    median_filter: bool = True

    def __post_init__(self):
        _check_schedule(self.num_iter, self.dilations)


def _check_schedule(num_iter, dilations) -> None:
    if isinstance(num_iter, bool) or not isinstance(num_iter, numbers.Integral) or num_iter < 0:
        raise ValueError(f"num_iter must be a static int >= 0; got {num_iter!r}.")
    if not isinstance(dilations, tuple) or not dilations:
        raise ValueError(f"dilations must be a non-empty tuple of positive ints, e.g. (1, 2, 4, 8); got {dilations!r}.")
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dilations):
        raise ValueError(f"dilations must be positive ints; got {dilations!r}.")


def _shift(x: jax.Array, padded: jax.Array, r: int, oy: int, ox: int) -> jax.Array:
    """``x[clip(i + oy), clip(j + ox)]``, sliced from ``padded`` = ``x`` edge-padded by ``r >= |oy|, |ox|``."""
    h, w = x.shape[:2]
    return padded[r + oy : r + oy + h, r + ox : r + ox + w]


def _edge_pad(x: jax.Array, d: int) -> jax.Array:
    return jnp.pad(x, ((d, d), (d, d), (0, 0)), mode="edge")


def pamr_affinity(image: jax.Array, dilations: tuple[int, ...] = (1, 2, 4, 8)) -> jax.Array:
    """PAMR's neighbour weights alpha: ``[H, W, 8 * len(dilations)]``, summing to one per pixel.

    Neighbour ``8 * a + b`` is direction ``b`` (row-major 3x3 order without the centre) at dilation
    ``dilations[a]``. A constant image has sigma = 0 and all differences 0, hence uniform weights.

    Args:
      image: ``[H, W, C]`` float image (RGB in [0, 1] in the reference; C >= 1).
      dilations: static tuple of positive ints.

    Returns:
      float ``[H, W, P]`` softmax weights, ``P = 8 * len(dilations)``.
    """
    _check_schedule(0, dilations)
    h, w, c = image.shape
    r = max(dilations)
    padded = _edge_pad(image, r)  # one pad serves every dilation: edge padding is clamping
    window = jnp.array([(r + d * dy, r + d * dx) for d in dilations for dy, dx in _WINDOW], jnp.int32)
    neighbours = jnp.array([(r + d * dy, r + d * dx) for d in dilations for dy, dx in _DIRECTIONS], jnp.int32)

    def diff(corner):  # I(i + p) - I(i) for the tap whose window starts at `corner` in `padded`
        return jax.lax.dynamic_slice(padded, (corner[0], corner[1], 0), (h, w, c)) - image

    # Taps are visited with lax.scan rather than unrolled: the program stays small (fast compiles) and
    # only one [H, W, C] tap is live at a time, never an [H, W, 9|D|, C] stack.
    def accumulate(carry, corner):
        total, squares = carry
        t = diff(corner)
        return (total + t, squares + t * t), None

    zeros = jnp.zeros_like(image)
    (total, squares), _ = jax.lax.scan(accumulate, (zeros, zeros), window)
    # Unbiased std over all 9 |D| window taps (centre included once per dilation), by the shifted-data
    # formula around the centre pixel. No catastrophic cancellation: the |D| centre taps (difference 0)
    # are part of the window, which bounds mean^2 / variance of the differences by about 8.
    n = window.shape[0]
    var = jnp.maximum(squares - jnp.square(total) / n, 0.0) / (n - 1)
    scale = 1e-8 + 0.1 * jnp.sqrt(var)  # [H, W, C]

    def logit(_, corner):  # colour-averaged -|dI| / (1e-8 + 0.1 sigma) for one neighbour
        return None, jnp.mean(-jnp.abs(diff(corner)) / scale, axis=-1)

    _, logits = jax.lax.scan(logit, None, neighbours)  # [P, H, W]
    logits = jnp.moveaxis(logits, 0, -1)
    return jax.nn.softmax(logits, axis=-1)


def pamr(
    image: jax.Array,
    masks: jax.Array,
    *,
    num_iter: int = 10,
    dilations: tuple[int, ...] = (1, 2, 4, 8),
) -> jax.Array:
    """Pixel-adaptive mask refinement (Araslanov & Roth 2020): ``num_iter`` steps of m <- sum_p alpha_p m_p.

    The weights ``alpha`` (``pamr_affinity``) depend on the image only and are computed once. Each step
    reads the ``8 * len(dilations)`` shifted copies of the masks one at a time and accumulates, so
    memory stays at a few ``[H, W, K]`` buffers (no ``[H, W, P, K]`` stack; this matters at 1024x1024).
    Masks that sum to one per pixel keep summing to one (the weights are a convex combination).

    Args:
      image: ``[H, W, C]`` float image, RGB in [0, 1] in the reference.
      masks: ``[H, W, K]`` float masks at the image's size (e.g. one-hot labels, or soft labels
        upsampled with ``spark_jax.masks.upsample.upsample_soft_labels``).
      num_iter: static number of propagation steps.
      dilations: static tuple of neighbourhood dilations.

    Returns:
      ``[H, W, K]`` refined masks, dtype of ``masks``.
    """
    _check_schedule(num_iter, dilations)
    _check_image(image, "pamr")
    if masks.ndim != 3 or masks.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"pamr expects masks [H, W, K] at the image's size {image.shape[:2]}; got {masks.shape}. "
            "Upsample them first (spark_jax.masks.upsample.upsample_soft_labels)."
        )
    if not jnp.issubdtype(masks.dtype, jnp.floating):
        raise ValueError(f"pamr expects floating masks; got dtype {masks.dtype}. Use jax.nn.one_hot for labels.")
    alpha = pamr_affinity(image, dilations).astype(masks.dtype)  # [H, W, P]

    r = max(dilations)

    def step(_, m):
        padded = _edge_pad(m, r)
        out = jnp.zeros_like(m)
        p = 0
        for d in dilations:
            for dy, dx in _DIRECTIONS:
                out = out + alpha[:, :, p : p + 1] * _shift(m, padded, r, d * dy, d * dx)
                p += 1
        return out

    return jax.lax.fori_loop(0, num_iter, step, masks)


def median_filter_3x3(labels: jax.Array) -> jax.Array:
    """3x3 median filter of an integer label map, as DiffCut's evaluation applies after PAMR.

    Matches ``scipy.ndimage.median_filter(labels, size=3)`` with its default ``mode='reflect'``
    (half-sample symmetric: for a 3x3 window that is edge replication at the border). DiffCut calls it
    on a ``[1, H, W]`` array, which makes the window 3x3x3; with a batch axis of size 1 the reflected
    copies repeat the same 3x3 values three times, which leaves the median unchanged, so the 2-D 3x3
    median here is the same operation. The median of 9 values is the 5th smallest — always one of the
    window's labels, so there are no ties to break and no new label ids appear. Because it is
    order-based, it depends on the numeric order of the ids (a property of the reference, kept).

    Args:
      labels: ``[H, W]`` integer labels.

    Returns:
      ``[H, W]`` labels, same dtype.
    """
    if labels.ndim != 2:
        raise ValueError(f"median_filter_3x3 expects labels [H, W]; got shape {labels.shape}.")
    padded = jnp.pad(labels, 1, mode="edge")
    h, w = labels.shape
    window = jnp.stack([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _WINDOW], axis=-1)
    return jnp.sort(window, axis=-1)[..., 4]


def label_capacity(num_segments: int) -> int:
    """A static label-slot count for PAMR that holds ``num_segments``: the next power of two, at least 8.

    PAMR's cost and the compiled program follow the slot count, so sizing it from the data (on the host,
    before the jitted refinement) with power-of-two buckets costs at most 2x the exact count in work and
    keeps distinct compilations to a handful (8, 16, ..., 1024 for a 32x32 token grid).
    """
    if isinstance(num_segments, bool) or not isinstance(num_segments, numbers.Integral) or num_segments < 0:
        raise ValueError(f"num_segments must be an int >= 0; got {num_segments!r}.")
    return max(8, 1 << max(int(num_segments) - 1, 0).bit_length())


def keep_largest_segments(labels: jax.Array, num_labels: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Maps label ids to at most ``capacity`` slots, keeping the largest segments.

    The ``capacity`` segments with the most pixels keep a slot (equal sizes: the lower id first); slots
    are numbered in the order of the kept ids, so argmax ties and the order-based median filter behave as
    on the original ids. Smaller segments, and ids outside ``[0, num_labels)``, map to slot ``capacity``:
    outside the slots, so ``jax.nn.one_hot`` gives them an all-zero mask and PAMR fills them from their
    neighbours. With no more segments than slots every segment keeps its own slot.

    Args:
      labels: int ``[H, W]`` ids in ``[0, num_labels)``.
      num_labels: static number of ids.
      capacity: static number of slots (>= 1).

    Returns:
      ``(slots int32 [H, W] in [0, capacity], slot_ids int32 [capacity])``: ``slot_ids[slots]`` are the
      input's ids wherever a pixel's segment was kept. Unused slots hold id 0.
    """
    ids = jnp.arange(num_labels, dtype=jnp.int32)
    in_range = (labels >= 0) & (labels < num_labels)
    sizes = jnp.zeros((num_labels,), jnp.int32).at[jnp.where(in_range, labels, num_labels)].add(1, mode="drop")
    order = jnp.argsort(-sizes, stable=True)  # ids by decreasing size, lower id first among equals
    rank = jnp.zeros((num_labels,), jnp.int32).at[order].set(ids)
    kept = (rank < capacity) & (sizes > 0)
    slot_of = jnp.where(kept, jnp.cumsum(kept) - 1, capacity).astype(jnp.int32)
    slot_ids = jnp.zeros((capacity,), jnp.int32).at[slot_of].set(ids, mode="drop")
    slots = jnp.where(in_range, slot_of[jnp.clip(labels, 0, num_labels - 1)], capacity)
    return slots.astype(jnp.int32), slot_ids


def refine_labels(
    image: jax.Array,
    labels: jax.Array,
    num_labels: int,
    cfg: PamrConfig = PamrConfig(),
    *,
    capacity: int | None = None,
) -> jax.Array:
    """DiffCut's PAMR post-processing of a label map: one-hot -> PAMR -> argmax -> 3x3 median.

    Equivalent to the reference's ``pamr`` step, which builds masks only for the labels present
    (``torch.unique``, sorted): label slots without pixels stay all-zero under PAMR and can never win
    the argmax (a pixel's masks sum to one), and the reference's relabelling to ``0..K'-1`` is
    order-preserving, so argmax ties (lowest id wins, as ``torch.argmax``) and the median filter give
    the same partition; the ids returned here are the input's ids.

    PAMR's cost is linear in the number of mask channels. ``capacity`` bounds it independently of
    ``num_labels``: masks are built for the ``capacity`` largest segments only
    (``keep_largest_segments``). With no more segments present than ``capacity`` the result is the
    exact one above; beyond it the smallest segments get no mask and their pixels take the labels
    PAMR propagates into them from the kept neighbours (a pixel that no kept segment reaches takes
    the kept segment of the lowest id). Size ``capacity`` from the data with ``label_capacity`` to
    stay exact.

    Args:
      image: ``[H, W, C]`` float image in [0, 1] (the reference resizes the 1024 input bilinearly
        to the mask size).
      labels: int ``[H, W]`` labels in ``[0, num_labels)``. Out-of-range ids get an all-zero mask
        (they cannot be checked under jit); such pixels take their neighbours' labels.
      num_labels: static number of label ids K.
      cfg: PAMR settings.
      capacity: static number of mask channels; None (or >= num_labels) gives every id its own.

    Returns:
      int32 ``[H, W]`` refined labels in ``[0, num_labels)``.
    """
    _check_image(image, "refine_labels")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels must have the image's shape {image.shape[:2]}; got {labels.shape}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ValueError(f"num_labels must be a static int >= 1; got {num_labels!r}.")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral)
                                 or capacity < 1):
        raise ValueError(f"capacity must be None or a static int >= 1; got {capacity!r}.")
    if capacity is None or capacity >= num_labels:
        return _refine(image, labels, num_labels, cfg)
    slots, slot_ids = keep_largest_segments(labels, num_labels, capacity)
    return slot_ids[_refine(image, slots, capacity, cfg)]


def refine_labels_batch(
    images: jax.Array, labels: jax.Array, num_labels: int, cfg: PamrConfig = PamrConfig()
) -> jax.Array:
    """:func:`refine_labels` of each image of a batch (``vmap``): images ``[B, H, W, C]``, labels int ``[B, H, W]``
    in ``[0, num_labels)`` -> int32 ``[B, H, W]``, every image's result its own (the steps are per pixel and per
    label slot; nothing mixes the images). Jitted on a batch split over devices, it runs on each device's rows."""
    if images.ndim != 4 or labels.ndim != 3 or labels.shape != images.shape[:3]:
        raise ValueError(f"refine_labels_batch expects images [B, H, W, C] and labels [B, H, W] of the same B, H, W; "
                         f"got {images.shape} and {labels.shape}.")
    return jax.vmap(lambda image, lab: refine_labels(image, lab, num_labels, cfg))(images, labels)


def _refine(image: jax.Array, labels: jax.Array, num_slots: int, cfg: PamrConfig) -> jax.Array:
    masks = jax.nn.one_hot(labels, num_slots, dtype=image.dtype)
    refined = pamr(image, masks, num_iter=cfg.num_iter, dilations=cfg.dilations)
    out = jnp.argmax(refined, axis=-1).astype(jnp.int32)
    if cfg.median_filter:
        out = median_filter_3x3(out)
    return out


def _check_image(image: jax.Array, fn: str) -> None:
    if image.ndim != 3:
        raise ValueError(f"{fn} expects an image [H, W, C] (channels last); got shape {image.shape}.")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(
            f"{fn} expects a floating image in [0, 1]; got dtype {image.dtype}. "
            "Convert with image.astype(jnp.float32) / 255."
        )
