"""Markov-flow clustering (SPARK Sec. 3.2, Eq. 5-9): expansion, inflation, pruning, RowNorm.

Row-stochastic convention: P[i, j] is the flow from token i to token j, so each *row* sums to 1
and a token's cluster is the column it sends most flow to (Eq. 9). Van Dongen's mcl and the
`markov_clustering` package use the transpose (column-stochastic).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spark_jax.graph.affinity import row_normalize
from spark_jax.config import MclNorm


class MarkovFlowResult(NamedTuple):
    """Output of `markov_flow`.

    Attributes:
      flow: P* [N, N], the last iterate (row-stochastic).
      num_iters: int32 [], iterations of Eq. 8 that ran.
      converged: bool [], True iff ||P_{t+1} - P_t|| < tol (in the chosen norm) was reached
        before the cap.
    """

    flow: jax.Array
    num_iters: jax.Array
    converged: jax.Array


class Clusters(NamedTuple):
    """Hard clusters read off P* (Eq. 9).

    Attributes:
      labels: int32 [N], cluster ids relabelled to 0..K-1 in order of their attractor index.
      num_clusters: int32 [], K.
      attractors: int32 [N], the attractor (argmax column) of each token before relabelling.
    """

    labels: jax.Array
    num_clusters: jax.Array
    attractors: jax.Array


def expand(p: jax.Array, power: int, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """Expansion (Eq. 5): the `power`-step transition matrix P^l (power is static)."""
    result = p
    for _ in range(power - 1):
        result = jnp.matmul(result, p, precision=precision)
    return result


def inflate(p: jax.Array, r: float | jax.Array) -> jax.Array:
    """Inflation (Eq. 6): elementwise power r."""
    return p**r


def prune(p: jax.Array, tau: float | jax.Array) -> jax.Array:
    """Pruning: zero entries below tau, always keeping each row's maximum so no row empties."""
    row_max = jnp.max(p, axis=-1, keepdims=True)
    return jnp.where((p >= tau) | (p == row_max), p, 0.0)


def markov_flow_step(
    p: jax.Array,
    *,
    expansion: int,
    inflation: float | jax.Array,
    prune_threshold: float | jax.Array,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
    """One application of Eq. 8: RowNorm(Prune_tau(Inflate_r(P^l)))."""
    expanded = expand(p, expansion, precision=precision)
    return row_normalize(prune(inflate(expanded, inflation), prune_threshold))


def change_norm(d: jax.Array, norm: MclNorm) -> jax.Array:
    """||d|| of the convergence test of Eq. 8, for d = P_{t+1} - P_t [N, N].

    'inf' is the matrix infinity norm, the largest absolute row sum max_i sum_j |d_ij| (what
    ||.||_inf of a matrix means, and for row-stochastic P the largest total-variation change of
    a token's flow distribution); 'max_abs' is the largest entry max_ij |d_ij|, at most 'inf'
    and at least 'inf' / N.
    """
    if norm == "inf":
        return jnp.max(jnp.sum(jnp.abs(d), axis=-1))
    if norm == "max_abs":
        return jnp.max(jnp.abs(d))
    raise ValueError(f"norm must be 'inf' or 'max_abs', got {norm!r}")


def markov_flow(
    s: jax.Array,
    *,
    expansion: int = 2,
    inflation: float | jax.Array = 2.6,
    prune_threshold: float | jax.Array = 1e-7,
    tol: float | jax.Array = 1e-6,
    max_iter: int = 100,
    norm: MclNorm = "inf",
    precision=jax.lax.Precision.HIGHEST,
) -> MarkovFlowResult:
    """Iterates Eq. 8 from P_0 = S until ||P_{t+1} - P_t|| < tol or `max_iter` steps.

    Runs in `lax.while_loop`, so it is jittable and vmappable; under vmap each batch member
    keeps its own iteration count (the loop runs until the slowest one stops).

    Args:
      s: row-stochastic transition matrix [N, N].
      expansion: matrix power l (static).
      inflation: r.
      prune_threshold: tau.
      tol: convergence threshold on the change (Eq. 8's epsilon).
      max_iter: iteration cap (static); reaching it without convergence gives converged=False.
      norm: the norm of the change (static), see `change_norm`: 'inf' (the matrix infinity norm
        of Eq. 8) or 'max_abs' (the largest entry).
      precision: matmul precision of the expansion.

    Returns:
      MarkovFlowResult(flow, num_iters, converged).
    """
    s = s.astype(jnp.float32)

    def cond(state):
        _, t, delta = state
        return (t < max_iter) & (delta >= tol)

    def body(state):
        p, t, _ = state
        p_next = markov_flow_step(
            p,
            expansion=expansion,
            inflation=inflation,
            prune_threshold=prune_threshold,
            precision=precision,
        )
        return p_next, t + 1, change_norm(p_next - p, norm)

    p, t, delta = jax.lax.while_loop(cond, body, (s, jnp.int32(0), jnp.float32(jnp.inf)))
    return MarkovFlowResult(flow=p, num_iters=t, converged=delta < tol)


def relabel_contiguous(ids: jax.Array, num_ids: int) -> tuple[jax.Array, jax.Array]:
    """Maps ids in [0, num_ids) to 0..K-1 preserving their order; returns (labels, K)."""
    present = jnp.zeros((num_ids,), jnp.int32).at[ids].set(1)
    new_index = jnp.cumsum(present) - 1
    return new_index[ids].astype(jnp.int32), jnp.sum(present).astype(jnp.int32)


def extract_clusters(flow: jax.Array) -> Clusters:
    """Coarse clusters of Eq. 9: token i joins the attractor argmax_j P*[i, j].

    Ties go to the lowest column index (jnp.argmax), attractors that win no token form no
    cluster, and clusters are numbered 0..K-1 in the order of their attractor's index.
    """
    attractors = jnp.argmax(flow, axis=-1).astype(jnp.int32)
    labels, k = relabel_contiguous(attractors, flow.shape[-1])
    return Clusters(labels=labels, num_clusters=k, attractors=attractors)
