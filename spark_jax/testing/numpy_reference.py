"""A straightforward NumPy transcription of SPARK (Eq. 1-12), written for readability.

It is the oracle of the tests and the baseline of the clustering benchmark: loops where the
paper loops, no static-shape tricks (label propagation uses exactly K columns), float64.
It follows the same documented conventions as the JAX implementation (cosine mode, negatives
clipped at 0, zero rows of RowNorm become self-loops, pruning keeps each row's maximum).
"""

from __future__ import annotations

import numpy as np


def row_norm(a: np.ndarray) -> np.ndarray:
    out = np.zeros_like(a, dtype=np.float64)
    for i in range(a.shape[0]):
        total = a[i].sum()
        if total > 0:
            out[i] = a[i] / total
        else:
            out[i, i] = 1.0
    return out


def global_affinity(x, mode="cosine", negatives="clip", sharpen=1.0):
    """Eq. 1; x [N, C]."""
    x = np.asarray(x, np.float64)
    if mode == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 1e-12)
    a = x @ x.T
    if negatives == "clip":
        a = np.maximum(a, 0.0)
    else:
        span = a.max() - a.min()
        a = (a - a.min()) / span if span > 0 else np.ones_like(a)
    return a**sharpen


def local_affinity(x, eps):
    """Eq. 2-3; x [h, w, C] -> [N, N], with a loop over tokens and their 8 neighbours."""
    x = np.asarray(x, np.float64)
    h, w, _ = x.shape
    a = np.zeros((h * w, h * w))
    for r in range(h):
        for c in range(w):
            i = r * w + c
            a[i, i] = 1.0
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if (dr, dc) == (0, 0):
                        continue
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w:
                        ni, nj = np.linalg.norm(x[r, c]), np.linalg.norm(x[rr, cc])
                        cos = x[r, c] @ x[rr, cc] / (ni * nj) if ni > 1e-12 and nj > 1e-12 else 0.0
                        a[i, rr * w + cc] = max(cos + eps, 0.0)
    return a


def attention_affinity(probs, sharpen=1.0):
    """A_global read off self-attention probabilities [N, N] (SPARK Fig. 2's caption), sharpened."""
    return np.asarray(probs, np.float64) ** sharpen


def qk_cosine_affinity(q, k, negatives="clip", sharpen=1.0):
    """A_global as the head-mean of cos(q_i^h, k_j^h); q, k [heads, N, d]. One head at a time, one pair at a time."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    heads, n, _ = q.shape
    a = np.zeros((n, n))
    for h in range(heads):
        for i in range(n):
            for j in range(n):
                nq, nk = np.linalg.norm(q[h, i]), np.linalg.norm(k[h, j])
                a[i, j] += (q[h, i] @ k[h, j] / (nq * nk) if nq > 1e-12 and nk > 1e-12 else 0.0) / heads
    if negatives == "clip":
        a = np.maximum(a, 0.0)
    else:
        span = a.max() - a.min()
        a = (a - a.min()) / span if span > 0 else np.ones_like(a)
    return a**sharpen


def transition_matrix(x, beta=0.6, eps=1e-3, mode="cosine", negatives="clip", sharpen=1.0, use_local=True,
                      source="features", attention=None, queries=None, keys=None):
    """Eq. 4; x [h, w, C]. `source` names what A_global comes from (SparkConfig.global_source)."""
    h, w, c = x.shape
    if source == "features":
        a_global = global_affinity(x.reshape(h * w, c), mode, negatives, sharpen)
    elif source == "attention":
        a_global = attention_affinity(attention, sharpen)
    else:
        a_global = qk_cosine_affinity(queries, keys, negatives, sharpen)
    s_global = row_norm(a_global)
    if not use_local:
        return s_global
    return beta * s_global + (1 - beta) * row_norm(local_affinity(x, eps))


def mcl_step(p, expansion=2, inflation=2.6, tau=1e-7):
    """Eq. 8: RowNorm(Prune(Inflate(P^l)))."""
    e = np.linalg.matrix_power(p, expansion)
    e = e**inflation
    pruned = np.where(e >= tau, e, 0.0)
    for i in range(e.shape[0]):  # keep each row's maximum
        j = np.argmax(e[i])
        pruned[i, j] = e[i, j]
    return row_norm(pruned)


def change(d, norm="inf"):
    """The norm of Eq. 8's convergence test: 'inf' = largest absolute row sum, 'max_abs' = largest entry."""
    if norm == "inf":
        return np.linalg.norm(d, np.inf)
    return np.abs(d).max()


def mcl(s, expansion=2, inflation=2.6, tau=1e-7, tol=1e-6, max_iter=100, norm="inf"):
    """Iterates Eq. 8 from P_0 = S; returns (P*, iterations, converged)."""
    p = np.asarray(s, np.float64)
    for t in range(1, max_iter + 1):
        p_next = mcl_step(p, expansion, inflation, tau)
        delta = change(p_next - p, norm)
        p = p_next
        if delta < tol:
            return p, t, True
    return p, max_iter, False


def clusters(p):
    """Eq. 9: argmax attractor per row, relabelled 0..K-1 by attractor index."""
    attractors = np.argmax(p, axis=1)
    unique = np.unique(attractors)  # sorted
    return np.searchsorted(unique, attractors), len(unique)


def propagate(s, labels, k, gamma=0.9, method="iterative", tol=1e-6, max_iter=1000):
    """Eq. 10-12 with exactly K columns; returns (Q*, labels, iterations)."""
    n = len(labels)
    q0 = np.zeros((n, k))
    q0[np.arange(n), labels] = 1.0
    if method == "closed_form":
        q = np.linalg.solve(np.eye(n) - gamma * s, (1 - gamma) * q0)
        return q, np.argmax(q, axis=1), 0
    q = q0
    for t in range(1, max_iter + 1):
        q_next = (1 - gamma) * q0 + gamma * s @ q
        delta = np.abs(q_next - q).max()
        q = q_next
        if delta < tol:
            break
    return q, np.argmax(q, axis=1), t


def segment_tokens(x, beta=0.6, expansion=2, inflation=2.6, tau=1e-7, eps=1e-3, gamma=0.9,
                   sharpen=1.0, mode="cosine", negatives="clip", use_local=True,
                   mcl_tol=1e-6, mcl_max_iter=100, mcl_norm="inf", method="iterative",
                   source="features", attention=None, queries=None, keys=None):
    """The whole of SPARK at token resolution; x [h, w, C] -> (labels [h, w], info dict)."""
    h, w, _ = x.shape
    s = transition_matrix(x, beta, eps, mode, negatives, sharpen, use_local, source, attention, queries, keys)
    p, iters, converged = mcl(s, expansion, inflation, tau, mcl_tol, mcl_max_iter, mcl_norm)
    coarse, k = clusters(p)
    q, labels, prop_iters = propagate(s, coarse, k, gamma, method)
    info = dict(num_clusters=k, mcl_iterations=iters, mcl_converged=converged,
                propagation_iterations=prop_iters, cluster_labels=coarse.reshape(h, w), soft_labels=q)
    return labels.reshape(h, w), info
