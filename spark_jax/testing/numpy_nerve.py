"""A NumPy transcription of NERVE's equations (WACV slides 4.1-4.4), the oracle of tests/test_nerve.py.

Written from the equations and the documented readings of :mod:`spark_jax.methods.nerve`, not from its code: loops
where the slides index (heads, tokens, neighbours), float64, the walk's sum of matrix powers as written on slide 4.1
and the closed form as an explicit inverse. Conventions shared with the JAX side: tokens row-major, S row-stochastic,
negative cosines clipped at 0 after the head mix, a RowNorm row without mass becomes a self-loop, torch's bilinear
(align_corners=False) for the grid resampling.
"""

from __future__ import annotations

import numpy as np

from spark_jax.testing.numpy_reference import row_norm  # SPARK's RowNorm (a massless row -> a self-loop)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 1e-12 and nb > 1e-12 else 0.0


def head_entropies(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """H^(h): mean over queries of the entropy of softmax(q_i k^T / sqrt(d)); q, k [heads, N, d]."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    heads, n, d = q.shape
    out = np.zeros(heads)
    for h in range(heads):
        total = 0.0
        for i in range(n):
            logits = np.array([q[h, i] @ k[h, j] for j in range(n)]) / np.sqrt(d)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            total += -np.sum(p[p > 0] * np.log(p[p > 0]))
        out[h] = total / n
    return out


def head_weights(entropies: np.ndarray, c: float) -> np.ndarray:
    """w_h := exp(-c H^(h)) / sum_h' exp(-c H^(h'))."""
    e = np.exp(-c * np.asarray(entropies, np.float64))
    return e / e.sum()


def global_affinity(q: np.ndarray, k: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[A_global]_ij = <Q_i, K_j> / (|Q_i| |K_j|) per head, A_weighted = sum_h w_h A^(h), clipped at 0."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    heads, n, _ = q.shape
    a = np.zeros((n, n))
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                a[i, j] += w[h] * cosine(q[h, i], k[h, j])
    return np.maximum(a, 0.0)


def local_affinity(q: np.ndarray, k: np.ndarray, w: np.ndarray, grid: tuple[int, int], eps_self: float
                   ) -> np.ndarray:
    """eps_self if i = j; sum_h w_h cos(Q_i, K_j) (clipped at 0) if j in the 8-neighbourhood of i; 0 else."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    rows, cols = grid
    heads = q.shape[0]
    a = np.zeros((rows * cols, rows * cols))
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            a[i, i] = eps_self
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if (dr, dc) == (0, 0) or not (0 <= rr < rows and 0 <= cc < cols):
                        continue
                    j = rr * cols + cc
                    a[i, j] = max(sum(w[h] * cosine(q[h, i], k[h, j]) for h in range(heads)), 0.0)
    return a


def transition(q, k, grid, *, c: float, eps_self: float, beta: float) -> np.ndarray:
    """S := beta RowNorm(A_global) + (1 - beta) RowNorm(A_local), heads weighted by their entropies."""
    w = head_weights(head_entropies(q, k), c)
    return beta * row_norm(global_affinity(q, k, w)) + (1 - beta) * row_norm(local_affinity(q, k, w, grid, eps_self))


def truncated_walk(s: np.ndarray, g: np.ndarray, alpha: float, steps: int) -> np.ndarray:
    """P_L = (1 - alpha) / (1 - alpha^(L+1)) (sum_{t=0..L} alpha^t S^t) G, the sum of powers as written."""
    s, g = np.asarray(s, np.float64), np.asarray(g, np.float64)
    total = sum(alpha**t * np.linalg.matrix_power(s, t) for t in range(steps + 1))
    return (1 - alpha) / (1 - alpha ** (steps + 1)) * total @ g


def closed_form_walk(s: np.ndarray, g: np.ndarray, alpha: float) -> np.ndarray:
    """P_inf = (1 - alpha) (I - alpha S)^-1 G."""
    s, g = np.asarray(s, np.float64), np.asarray(g, np.float64)
    return (1 - alpha) * np.linalg.inv(np.eye(len(s)) - alpha * s) @ g


def bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch's interpolate(mode='bilinear', align_corners=False) of x [h, w, K], pixel by pixel: source coordinate
    (o + 0.5) in / out - 0.5 clamped at 0, neighbours floor and floor + 1 (clamped to the last)."""
    x = np.asarray(x, np.float64)
    h, w, _ = x.shape

    def source(o, n_in, n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), s - i0

    out = np.zeros((out_h, out_w, x.shape[2]))
    for r in range(out_h):
        r0, r1, fr = source(r, h, out_h)
        for c in range(out_w):
            c0, c1, fc = source(c, w, out_w)
            out[r, c] = ((1 - fr) * ((1 - fc) * x[r0, c0] + fc * x[r0, c1])
                         + fr * ((1 - fc) * x[r1, c0] + fc * x[r1, c1]))
    return out


def class_probs_on_grid(class_probs: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """G [h * w, K]: CLIP's probabilities resampled bilinearly to the token grid, each token renormalised."""
    g = bilinear_resize(class_probs, *grid).reshape(grid[0] * grid[1], -1)
    return g / g.sum(axis=1, keepdims=True)


def nerve(q, k, class_probs, grid, *, mask_size: int, c=1.0, eps_self=1e-3, alpha=0.9, beta=0.6, steps=10,
          walk="truncated", background_threshold=0.0):
    """The whole method: (labels [m, m], token probabilities [h, w, K], upsampled probabilities [m, m, K])."""
    s = transition(q, k, grid, c=c, eps_self=eps_self, beta=beta)
    g = class_probs_on_grid(class_probs, grid)
    p = truncated_walk(s, g, alpha, steps) if walk == "truncated" else closed_form_walk(s, g, alpha)
    p = p.reshape(grid[0], grid[1], -1)
    up = bilinear_resize(p, mask_size, mask_size)
    labels = np.argmax(up, axis=-1)
    if background_threshold > 0:
        labels[up.max(axis=-1) < background_threshold] = 0
    return labels, p, up
