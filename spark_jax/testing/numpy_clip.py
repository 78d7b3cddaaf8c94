"""NumPy transcriptions of dense CLIP (MaskCLIP, SCLIP, NACLIP) and of CLIP's open-vocabulary classification.

Written from the papers' definitions and their published recipes (method-facts 5.5, 3.5-3.7), not from the
JAX code: loops where the definitions loop, float64, PyTorch weight layouts (``Linear.weight`` is [out, in]).
They are the oracles of ``tests/test_dense_clip.py`` and ``tests/test_classifier.py``.

The last block of the CLIP vision tower, on tokens ``x`` [N, D] (the class token first, then the patches
row-major) with ``h = LN_1(x)``, ``q, k, v`` its per-head projections and ``d`` the head width:

* vanilla   x + W_o softmax(q k^T / sqrt d) v, then + MLP(LN_2(.))        (CLIP, Radford et al. 2021)
* MaskCLIP  x + W_o v, then + MLP(LN_2(.))                                (Zhou et al. 2022: the value path)
* SCLIP     x + W_o [softmax(q q^T / sqrt d) + softmax(k k^T / sqrt d)] v, then + MLP(LN_2(.))   (Wang et al. 2024)
* NACLIP    W_o softmax(k k^T / sqrt d + omega) v, no residual, no MLP     (Hajimiri et al. 2025, 'reduced')

with omega[i, j] = exp(-||p_i - p_j||^2 / (2 std^2)) for patches at grid positions p_i, p_j and 0 in the class
token's row and column. Every token then goes through ``post_layernorm`` and the visual projection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "class_logits",
    "class_probabilities",
    "dense_from_hidden",
    "label_segments",
    "last_block",
    "neighbourhood_bias",
    "prompt_ensemble",
]

_LN_EPS = 1e-5  # CLIP's LayerNorm epsilon (transformers' layer_norm_eps default, OpenAI's nn.LayerNorm)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = _LN_EPS) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _linear(x: np.ndarray, weights: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    out = x @ np.asarray(weights[f"{name}.weight"], np.float64).T
    bias = weights.get(f"{name}.bias")
    return out if bias is None else out + np.asarray(bias, np.float64)


def _activation(x: np.ndarray, name: str) -> np.ndarray:
    if name == "quick_gelu":
        return x / (1.0 + np.exp(-1.702 * x))
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {name!r}")


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def neighbourhood_bias(grid_h: int, grid_w: int, std: float) -> np.ndarray:
    """NACLIP's omega [1 + P, 1 + P], P = grid_h * grid_w: a Gaussian of the 2-D patch distance, pair by pair."""
    p = grid_h * grid_w
    omega = np.zeros((1 + p, 1 + p))
    for i in range(p):
        ri, ci = divmod(i, grid_w)
        for j in range(p):
            rj, cj = divmod(j, grid_w)
            omega[1 + i, 1 + j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2.0 * std**2))
    return omega


def last_block(
    x: np.ndarray,
    weights: Mapping[str, np.ndarray],
    *,
    mode: str,
    num_heads: int,
    grid: tuple[int, int],
    gaussian_std: float = 5.0,
    activation: str = "quick_gelu",
) -> np.ndarray:
    """The last vision block of ``mode`` on one image's tokens x [N, D] (N = 1 + grid_h * grid_w).

    ``weights`` holds the layer's tensors under transformers' names relative to the layer
    (``self_attn.q_proj.weight``, ``layer_norm1.weight``, ``mlp.fc1.bias``, ...).
    """
    x = np.asarray(x, np.float64)
    n, dim = x.shape
    head_dim = dim // num_heads
    w = {key: np.asarray(val, np.float64) for key, val in weights.items()}
    h = _layer_norm(x, w["layer_norm1.weight"], w["layer_norm1.bias"])
    q, k, v = (_linear(h, w, f"self_attn.{name}_proj") for name in ("q", "k", "v"))
    scale = head_dim**-0.5
    if mode == "maskclip":
        attended = v  # each token keeps its own value: the attention matrix is the identity
    else:
        attended = np.zeros_like(v)
        omega = neighbourhood_bias(*grid, gaussian_std) if mode == "naclip" else None
        for head in range(num_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
            if mode == "vanilla":
                attn = _softmax(qh @ kh.T * scale)
            elif mode == "sclip":
                attn = _softmax(qh @ qh.T * scale) + _softmax(kh @ kh.T * scale)
            elif mode == "naclip":
                attn = _softmax(kh @ kh.T * scale + omega)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            attended[:, cols] = attn @ vh
    out = _linear(attended, w, "self_attn.out_proj")
    if mode == "naclip":
        return out  # 'reduced' architecture: neither the residual nor the feed-forward network
    x = x + out
    h2 = _layer_norm(x, w["layer_norm2.weight"], w["layer_norm2.bias"])
    hidden = _activation(_linear(h2, w, "mlp.fc1"), activation)
    return x + _linear(hidden, w, "mlp.fc2")


def dense_from_hidden(
    hidden: np.ndarray,
    state_dict: Mapping[str, np.ndarray],
    *,
    mode: str,
    num_heads: int,
    grid: tuple[int, int],
    gaussian_std: float = 5.0,
    activation: str = "quick_gelu",
) -> np.ndarray:
    """Dense CLIP features [B, gh, gw, proj], L2-normalised, from the input of the last layer hidden [B, N, D].

    ``state_dict``: a transformers ``CLIPModel`` state dict as NumPy arrays (``vision_model.encoder.layers.{i}...``,
    ``vision_model.post_layernorm.*``, ``visual_projection.weight``).
    """
    layers = sorted({int(key.split(".")[3]) for key in state_dict if key.startswith("vision_model.encoder.layers.")})
    prefix = f"vision_model.encoder.layers.{layers[-1]}."
    layer = {key[len(prefix):]: val for key, val in state_dict.items() if key.startswith(prefix)}
    out = []
    for tokens in np.asarray(hidden, np.float64):
        y = last_block(tokens, layer, mode=mode, num_heads=num_heads, grid=grid, gaussian_std=gaussian_std,
                       activation=activation)
        y = _layer_norm(y, np.asarray(state_dict["vision_model.post_layernorm.weight"], np.float64),
                        np.asarray(state_dict["vision_model.post_layernorm.bias"], np.float64))
        y = y @ np.asarray(state_dict["visual_projection.weight"], np.float64).T
        patches = y[1:]
        patches = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
        out.append(patches.reshape(grid[0], grid[1], -1))
    return np.stack(out)


def prompt_ensemble(template_embeddings: np.ndarray) -> np.ndarray:
    """One synonym's class embedding from its template embeddings [T, D]: normalise each, average, normalise."""
    e = np.asarray(template_embeddings, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    mean = e.mean(axis=0)
    return mean / np.linalg.norm(mean)


def class_logits(
    features: np.ndarray, embeddings: np.ndarray, synonym_class: Sequence[int], num_classes: int, logit_scale: float
) -> np.ndarray:
    """[..., K]: logit_scale x cosine(feature, synonym), the maximum over each class's synonyms."""
    f = np.asarray(features, np.float64)
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    e = np.asarray(embeddings, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    per_synonym = logit_scale * (f @ e.T)
    out = np.full(f.shape[:-1] + (num_classes,), -np.inf)
    for s, cls in enumerate(synonym_class):
        out[..., cls] = np.maximum(out[..., cls], per_synonym[..., s])
    return out


def class_probabilities(features, embeddings, synonym_class, num_classes, logit_scale) -> np.ndarray:
    return _softmax(class_logits(features, embeddings, synonym_class, num_classes, logit_scale))


def _nearest_exact(n_in: int, n_out: int) -> np.ndarray:
    """torch's ``nearest-exact`` source index of every output sample: floor((o + 0.5) * in / out)."""
    return np.array([min(int(math.floor((o + 0.5) * n_in / n_out)), n_in - 1) for o in range(n_out)])


def _bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear resize (align_corners=False): half-pixel centres, clamped at 0."""
    mat = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        mat[o, lo] += 1.0 - frac
        mat[o, hi] += frac
    return mat


def label_segments(
    segments: np.ndarray,
    dense: np.ndarray,
    embeddings: np.ndarray,
    synonym_class: Sequence[int],
    num_classes: int,
    *,
    logit_scale: float = 40.0,
    background_threshold: float = 0.0,
    return_probabilities: bool = False,
):
    """DiffCut's mask-pooling classification, segment by segment, for segments [B, m, m] and dense [B, gh, gw, D].

    Each segment's binary mask is resized nearest-exact to the dense grid and the dense features averaged over
    it; a segment that has no grid cell there is averaged instead over its own pixels of the dense features
    resized bilinearly to the mask size. The mean is normalised and classified; below ``background_threshold``
    (largest class probability) the segment becomes class 0. With ``return_probabilities`` also returns
    ``{(image, segment id): class probabilities [K]}``.
    """
    segments = np.asarray(segments)
    dense = np.asarray(dense, np.float64)
    b, mh, mw = segments.shape
    _, gh, gw, _ = dense.shape
    rows, cols = _nearest_exact(mh, gh), _nearest_exact(mw, gw)
    wr, wc = _bilinear_weights(gh, mh), _bilinear_weights(gw, mw)
    out = np.zeros_like(segments, dtype=np.int64)
    seg_probs = {}
    for i in range(b):
        resized = np.einsum("ia,jb,abd->ijd", wr, wc, dense[i])  # dense features at the mask size
        for seg in np.unique(segments[i]):
            mask = segments[i] == seg
            grid_mask = mask[np.ix_(rows, cols)]
            if grid_mask.any():
                pooled = dense[i][grid_mask].mean(axis=0)
            else:
                pooled = resized[mask].mean(axis=0)
            probs = class_probabilities(pooled, embeddings, synonym_class, num_classes, logit_scale)
            seg_probs[(i, int(seg))] = probs
            label = int(np.argmax(probs))
            if probs.max() < background_threshold:
                label = 0
            out[i][mask] = label
    return (out, seg_probs) if return_probabilities else out
