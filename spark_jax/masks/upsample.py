"""From token-grid results to masks of any size: bilinear upsampling and concept assignment.

SPARK clusters a 32x32 token grid; masks are wanted at the scoring size (128x128) or at image size.
Two upsamplings are provided, both pure, jittable and vmappable with static shapes:

* ``upsample_soft_labels``: bilinear upsampling of the propagated soft labels Q* (SPARK, Eq. 11-12:
  the label of a pixel is the argmax of the interpolated Q*).
* ``concept_assignment``: DiffCut's "high-resolution concept assignment" (DiffCut Sec. 3.3): segment
  means of the L2-normalised token features, bilinear upsampling of the normalised features, argmax of
  the dot products.

Bilinear means exactly ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``:
half-pixel centres, source coordinates clamped at 0 and the last index repeated at the far edge, no
anti-aliasing. ``jax.image.resize(..., 'bilinear')`` anti-aliases when *down*sampling, so a mask
smaller than the token grid would differ from the reference; the separable interpolation is therefore
written out as two small ``[out, in]`` matrices contracted with einsum (also the fast way: the
matrices are constants of the static shapes, and the contraction is two thin matmuls).

Non-finite input never makes a non-finite output or an invalid label: jitted code cannot raise on
data, and the bilinear weights would spread one NaN token over every pixel it touches. Entries of a
soft-label map that are NaN/Inf count as 0 (no evidence for any label), and concept assignment treats
a token holding NaN/Inf as a zero feature vector, as SPARK does (``affinity.finite_tokens``); a
pixel with no evidence at all takes the lowest valid label id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.graph.affinity import finite_tokens, l2_normalize  # l2_normalize: torch's F.normalize
from spark_jax.masks.resample import bilinear_matrix

__all__ = [
    "upsample_soft_labels",
    "labels_from_soft_labels",
    "upsample_labels",
    "concept_scores",
    "concept_assignment",
]

# Interpolation weights are exact small rationals; contracting them at reduced precision (the TPU
# default for float32 matmuls is bf16 passes) would move label boundaries, so ask for full float32.
_PRECISION = jax.lax.Precision.HIGHEST

# Budget (in float32 elements) of one chunk of the chunked upsample+argmax: 2**24 elements = 64 MiB.
_CHUNK_ELEMENTS = 1 << 24

# DiffCut's masked mean divides by (count + 1e-8); kept so segment means match the reference bit for bit.
_MASK_POOL_EPS = 1e-8


def _check_size(size, name: str = "size") -> tuple[int, int]:
    try:
        out_h, out_w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair of positive ints (height, width); got {size!r}.") from None
    if out_h <= 0 or out_w <= 0 or (out_h, out_w) != tuple(size):
        raise ValueError(f"{name} must be a pair of positive ints (height, width); got {size!r}.")
    return out_h, out_w


def upsample_soft_labels(q: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resampling of per-token soft labels (or any channels-last map) to ``size``.

    Used for SPARK's propagated soft labels Q* (Eq. 11): the pixel label is then the argmax of the
    interpolated rows (Eq. 12 at pixel resolution), see ``upsample_labels``. Works for up- and
    down-sampling alike and matches ``torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False)`` on an NCHW view of ``q``.

    Args:
      q: ``[h, w, K]`` floating map (K channels, e.g. soft labels of K clusters).
      size: static ``(H, W)`` of the output.

    Returns:
      ``[H, W, K]`` array of ``q``'s dtype.
    """
    if q.ndim != 3:
        raise ValueError(
            f"upsample_soft_labels expects a map of shape [h, w, K]; got shape {q.shape}. "
            "Use jax.vmap for a batch, or add a trailing channel axis for a single map."
        )
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"upsample_soft_labels expects a floating map; got dtype {q.dtype}. Cast it first.")
    out_h, out_w = _check_size(size)
    h, w, _ = q.shape
    q = _finite_or_zero(q)
    rows = jnp.asarray(bilinear_matrix(h, out_h), dtype=q.dtype)
    cols = jnp.asarray(bilinear_matrix(w, out_w), dtype=q.dtype)
    # Rows first: the intermediate [H, w, K] is w/W of the output's size when upsampling.
    t = jnp.einsum("Hh,hwk->Hwk", rows, q, precision=_PRECISION)
    return jnp.einsum("Ww,Hwk->HWk", cols, t, precision=_PRECISION)


def _finite_or_zero(q: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(q), q, jnp.zeros((), q.dtype))


def labels_from_soft_labels(soft_labels: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Per-pixel argmax over the last axis (SPARK Eq. 12); ties go to the lowest index.

    Args:
      soft_labels: ``[..., K]`` scores or soft labels.
      valid: optional bool ``[K]``; channels marked False never win (a pixel whose channels are all
        invalid gets label 0). NaN scores never win either.

    Returns:
      int32 ``[...]`` labels in ``[0, K)``.
    """
    # jnp.argmax would pick a NaN as the maximum.
    soft_labels = jnp.where(jnp.isnan(soft_labels), -jnp.inf, soft_labels)
    if valid is not None:
        if valid.shape != soft_labels.shape[-1:]:
            raise ValueError(f"valid must have shape [K] = {soft_labels.shape[-1:]}; got {valid.shape}.")
        soft_labels = jnp.where(valid, soft_labels, -jnp.inf)
    return jnp.argmax(soft_labels, axis=-1).astype(jnp.int32)


def upsample_labels(
    q: jax.Array,
    size: tuple[int, int],
    *,
    valid: jax.Array | None = None,
    rows_per_chunk: int | None = None,
) -> jax.Array:
    """Labels at ``size`` from token soft labels: argmax of the bilinearly upsampled ``q``.

    Equal to ``labels_from_soft_labels(upsample_soft_labels(q, size), valid)`` but never holds the
    whole ``[H, W, K]`` map: output rows are produced in chunks (``lax.map``), so image-size masks with
    many label columns (e.g. Q* with one column per token, K = h*w) stay within a fixed memory budget.

    Args:
      q: ``[h, w, K]`` floating soft labels.
      size: static ``(H, W)``.
      valid: optional bool ``[K]``: channels allowed to win the argmax.
      rows_per_chunk: output rows per chunk; default picks chunks of about 2**24 elements (64 MiB).

    Returns:
      int32 ``[H, W]`` labels in ``[0, K)``.
    """
    if q.ndim != 3:
        raise ValueError(f"upsample_labels expects q of shape [h, w, K]; got shape {q.shape}.")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"upsample_labels expects a floating q; got dtype {q.dtype}. Cast it first.")
    out_h, out_w = _check_size(size)
    h, w, k = q.shape
    if valid is not None and valid.shape != (k,):
        raise ValueError(f"valid must have shape [K] = ({k},); got {valid.shape}.")
    if rows_per_chunk is None:
        rows_per_chunk = max(1, min(out_h, _CHUNK_ELEMENTS // max(1, out_w * k)))
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1; got {rows_per_chunk}.")
    q = _finite_or_zero(q)
    rows = jnp.asarray(bilinear_matrix(h, out_h), dtype=q.dtype)
    cols = jnp.asarray(bilinear_matrix(w, out_w), dtype=q.dtype)
    if rows_per_chunk >= out_h:
        up = jnp.einsum("Ww,Hwk->HWk", cols, jnp.einsum("Hh,hwk->Hwk", rows, q, precision=_PRECISION),
                        precision=_PRECISION)
        return labels_from_soft_labels(up, valid)

    def one_row(row_weights):  # [h] -> [W] labels of one output row
        t = jnp.einsum("h,hwk->wk", row_weights, q, precision=_PRECISION)
        return labels_from_soft_labels(jnp.einsum("Ww,wk->Wk", cols, t, precision=_PRECISION), valid)

    return jax.lax.map(one_row, rows, batch_size=rows_per_chunk)


def _token_scores(features: jax.Array, labels: jax.Array, num_labels: int) -> tuple[jax.Array, jax.Array]:
    """Dot products of the normalised token features with the segment means (DiffCut's masked SMM).

    Returns ``(scores [h, w, K], nonempty bool [K])``.
    """
    _check_concept_inputs(features, labels, num_labels)
    h, w, c = features.shape
    # DiffCut casts the (float16) UNet features to float32 before anything else; so do we. Non-finite
    # tokens become zero vectors (score 0 for every segment), as in SPARK.
    x, _ = finite_tokens(features.reshape(h * w, c))
    x = l2_normalize(x)
    onehot = jax.nn.one_hot(labels.reshape(h * w), num_labels, dtype=x.dtype)  # [N, K]
    counts = jnp.sum(onehot, axis=0)  # [K]
    means = jnp.einsum("nk,nc->kc", onehot, x, precision=_PRECISION) / (counts[:, None] + _MASK_POOL_EPS)
    scores = jnp.einsum("nc,kc->nk", x, means, precision=_PRECISION)
    return scores.reshape(h, w, num_labels), counts > 0


def _check_concept_inputs(features, labels, num_labels):
    if features.ndim != 3:
        raise ValueError(f"features must have shape [h, w, C]; got {features.shape}.")
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"features must be floating; got dtype {features.dtype}.")
    if labels.shape != features.shape[:2]:
        raise ValueError(
            f"labels must have the token grid's shape {features.shape[:2]}; got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers in [0, num_labels); got dtype {labels.dtype}.")
    if not isinstance(num_labels, (int, np.integer)) or num_labels < 1:
        raise ValueError(f"num_labels must be a static int >= 1; got {num_labels!r}.")


def concept_scores(
    features: jax.Array, labels: jax.Array, num_labels: int, size: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """DiffCut's concept-assignment scores at ``size`` (DiffCut Sec. 3.3).

    Score of pixel p for segment k = <up(z)_p, c_k>, where z are the L2-normalised token features,
    up is bilinear upsampling and c_k the masked mean of z over segment k (DiffCut's released code
    uses this dot product with the un-renormalised mean; the paper calls it cosine similarity, which
    has the same argmax only if the means are renormalised — they are not).

    Bilinear upsampling is linear and acts on spatial axes only, so up(z) c_k = up(z c_k): the scores
    are computed on the token grid (``[h, w, K]``) and then upsampled. This equals upsampling the
    C = 1280 feature channels first, up to float rounding, at K/C of the memory and cost.

    Args:
      features: ``[h, w, C]`` token features (not necessarily normalised).
      labels: int ``[h, w]`` segment ids in ``[0, num_labels)``.
      num_labels: static number of label slots K; slots without tokens are empty segments.
      size: static ``(H, W)``.

    Returns:
      ``(scores [H, W, K], nonempty bool [K])``. Empty segments have mean zero, hence score zero.
    """
    token_scores, nonempty = _token_scores(features, labels, num_labels)
    return upsample_soft_labels(token_scores, size), nonempty


def concept_assignment(
    features: jax.Array,
    labels: jax.Array,
    num_labels: int,
    size: tuple[int, int],
    *,
    rows_per_chunk: int | None = None,
) -> jax.Array:
    """DiffCut's high-resolution concept assignment (DiffCut Sec. 3.3; reference-facts section 5).

    Each output pixel takes the segment whose mean normalised feature has the largest dot product with
    the pixel's bilinearly upsampled normalised feature (see ``concept_scores``). Empty segments (label
    slots with no token) never win, even where every present segment scores negatively. Ties go to the
    lowest label id, as in ``torch.argmax``.

    Labels keep the input's ids (DiffCut's code relabels to ``0..K'-1`` in the order of
    ``torch.unique``; ours is the same partition with the original ids, which is what the evaluation's
    matching sees).

    Args:
      features: ``[h, w, C]`` token features.
      labels: int ``[h, w]`` token labels in ``[0, num_labels)``.
      num_labels: static number of label slots.
      size: static output ``(H, W)`` (may be smaller than, equal to or larger than ``(h, w)``).
      rows_per_chunk: see ``upsample_labels``.

    Returns:
      int32 ``[H, W]`` labels in ``[0, num_labels)``.
    """
    token_scores, nonempty = _token_scores(features, labels, num_labels)
    return upsample_labels(token_scores, size, valid=nonempty, rows_per_chunk=rows_per_chunk)
