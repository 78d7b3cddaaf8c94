"""Random-walk label propagation (SPARK Sec. 3.3, Eq. 10-12)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp


class PropagationResult(NamedTuple):
    """Output of `propagate_labels`.

    Attributes:
      soft_labels: Q* [N, M], the propagated label distribution (Eq. 11).
      labels: int32 [N], argmax_k Q*[i, k] (Eq. 12), ties to the lowest column.
      num_iters: int32 [], fixed-point iterations (0 for the closed form).
      converged: bool [], the fixed-point iteration met its tolerance (True for the closed form).
    """

    soft_labels: jax.Array
    labels: jax.Array
    num_iters: jax.Array
    converged: jax.Array


def seed_matrix(cluster_labels: jax.Array, num_columns: int) -> jax.Array:
    """Q_0 = RowNorm(C) of Eq. 10 with a static number of label columns -> [N, num_columns].

    `cluster_labels` [N] are contiguous ids 0..K-1. When K <= num_columns, column k is cluster k
    and Q_0 is exactly the paper's one-hot C (its rows already sum to one). When K exceeds
    num_columns, the num_columns largest clusters (ties: lower id first) keep a column, in id
    order, and tokens of the other clusters get an all-zero row: they are unlabelled seeds
    that receive labels by propagation.
    """
    n = cluster_labels.shape[0]
    if num_columns >= n:
        return jax.nn.one_hot(cluster_labels, num_columns, dtype=jnp.float32)
    sizes = jnp.bincount(cluster_labels, length=n)
    order = jnp.argsort(-sizes, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    kept = (rank < num_columns) & (sizes > 0)
    column = jnp.cumsum(kept) - 1
    token_column = jnp.where(kept[cluster_labels], column[cluster_labels], num_columns)
    # Index num_columns is out of range for one_hot, which yields an all-zero row.
    return jax.nn.one_hot(token_column, num_columns, dtype=jnp.float32)


def propagate_labels(
    s: jax.Array,
    q0: jax.Array,
    *,
    gamma: float | jax.Array = 0.9,
    method: Literal["closed_form", "iterative"] = "closed_form",
    tol: float | jax.Array = 1e-6,
    max_iter: int = 1000,
    precision=jax.lax.Precision.HIGHEST,
) -> PropagationResult:
    """Propagates seed labels Q_0 [N, M] over the transition matrix S [N, N].

    'iterative' runs Q_{t+1} = (1 - gamma) Q_0 + gamma S Q_t (Eq. 10) from Q_0 until the max
    change is below `tol` or `max_iter` steps; 'closed_form' solves (I - gamma S) Q* =
    (1 - gamma) Q_0 (Eq. 11) directly. Both reach the same Q*: for row-stochastic S and
    0 < gamma < 1 the iteration is a contraction and I - gamma S is strictly diagonally
    dominant, hence invertible.
    """
    s = s.astype(jnp.float32)
    q0 = q0.astype(jnp.float32)
    if method == "closed_form":
        system = jnp.eye(s.shape[0], dtype=jnp.float32) - gamma * s
        q = jnp.linalg.solve(system, (1.0 - gamma) * q0)
        num_iters, converged = jnp.int32(0), jnp.bool_(True)
    elif method == "iterative":

        def cond(state):
            _, t, delta = state
            return (t < max_iter) & (delta >= tol)

        def body(state):
            q, t, _ = state
            q_next = (1.0 - gamma) * q0 + gamma * jnp.matmul(s, q, precision=precision)
            return q_next, t + 1, jnp.max(jnp.abs(q_next - q))

        q, num_iters, delta = jax.lax.while_loop(
            cond, body, (q0, jnp.int32(0), jnp.float32(jnp.inf))
        )
        converged = delta < tol
    else:
        raise ValueError(f"method must be 'closed_form' or 'iterative', got {method!r}")
    labels = jnp.argmax(q, axis=-1).astype(jnp.int32)
    return PropagationResult(soft_labels=q, labels=labels, num_iters=num_iters, converged=converged)
