"""Random-walk label propagation (SPARK Sec. 3.3, Eq. 10-12)."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.sparse.linalg import gmres

# Krylov subspace built per GMRES cycle of the 'krylov' propagation (JAX's default restart). S's spectrum is a few
# eigenvalues near 1 (one per region) and a bulk well inside the unit disc, so one cycle of 20 usually reaches
# 1e-6 (planted and demo features, 32 x 32 and 64 x 64: experiments/bench_sparse_flow.py).
KRYLOV_RESTART = 20


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


def seeded_columns(q0: jax.Array) -> jax.Array:
    """int32 [], the number of leading columns of Q_0 [N, M] that can hold a seed: one past the last column with
    a non-zero entry (`seed_matrix` numbers its columns 0..min(K, M) - 1). Q*'s later columns are zero too."""
    used = jnp.any(q0 != 0, axis=0)
    return jnp.max(jnp.where(used, jnp.arange(q0.shape[1]) + 1, 0)).astype(jnp.int32)


def _krylov(s, q0, gamma, tol, max_iter, block, precision):
    """Eq. 11 by GMRES on blocks of `block` label columns, only those holding seeds (see `propagate_labels`)."""
    n, m = q0.shape
    width = min(block, m)
    num_blocks = math.ceil(m / width)
    padded = jnp.pad(q0, ((0, 0), (0, num_blocks * width - m)))
    cycles = max(1, math.ceil(max_iter / KRYLOV_RESTART))

    def system(x):  # (I - gamma S) x
        return x - gamma * jnp.matmul(s, x, precision=precision)

    def solve(j, out):
        seeds = jax.lax.dynamic_slice_in_dim(padded, j * width, width, axis=1)
        rhs = (1.0 - gamma) * seeds
        bound = tol * jnp.linalg.norm(rhs)

        def cond(state):
            _, cycle, residual = state
            return (cycle < cycles) & (residual > bound)

        def body(state):
            x, cycle, _ = state
            x, _ = gmres(system, rhs, x, tol=0.0, atol=bound, restart=KRYLOV_RESTART, maxiter=1)
            return x, cycle + 1, jnp.linalg.norm(rhs - system(x))

        # Q_0 is a good first guess: a region's indicator is nearly invariant under S, so Q* stays close to it.
        x, cycle, residual = jax.lax.while_loop(cond, body, (seeds, jnp.int32(0), jnp.linalg.norm(rhs - system(seeds))))
        return jax.lax.dynamic_update_slice_in_dim(out, x, j * width, axis=1), cycle, residual <= bound

    def block_cond(state):
        j, *_ = state
        return j * width < seeded_columns(q0)

    def block_body(state):
        j, out, most, ok = state
        out, cycle, converged = solve(j, out)
        return j + 1, out, jnp.maximum(most, cycle), ok & converged

    _, q, most, converged = jax.lax.while_loop(
        block_cond, block_body, (jnp.int32(0), jnp.zeros_like(padded), jnp.int32(0), jnp.bool_(True))
    )
    return q[:, :m], most * KRYLOV_RESTART, converged


def propagate_labels(
    s: jax.Array,
    q0: jax.Array,
    *,
    gamma: float | jax.Array = 0.9,
    method: Literal["closed_form", "iterative", "krylov"] = "closed_form",
    tol: float | jax.Array = 1e-6,
    max_iter: int = 1000,
    block: int = 32,
    precision=jax.lax.Precision.HIGHEST,
) -> PropagationResult:
    """Propagates seed labels Q_0 [N, M] over the transition matrix S [N, N].

    'iterative' runs Q_{t+1} = (1 - gamma) Q_0 + gamma S Q_t (Eq. 10) from Q_0 until the max
    change is below `tol` or `max_iter` steps; 'closed_form' solves (I - gamma S) Q* =
    (1 - gamma) Q_0 (Eq. 11) directly. Both reach the same Q*: for row-stochastic S and
    0 < gamma < 1 the iteration is a contraction and I - gamma S is strictly diagonally
    dominant, hence invertible.

    'krylov' solves Eq. 11 by restarted GMRES (`jax.scipy.sparse.linalg.gmres`, `KRYLOV_RESTART` steps a
    cycle) on blocks of `block` label columns (static), and only on the blocks that hold seeds
    (`seeded_columns`): with K clusters it costs about 2 N^2 K flops per Krylov step and no N x N x N
    factorisation, where 'closed_form' factorises S (2/3 N^3) and 'iterative' multiplies by all M columns.
    A block stops when its residual ||(1 - gamma) Q_0 - (I - gamma S) Q||_F is at most `tol` times
    ||(1 - gamma) Q_0||_F (checked after every cycle), or after `max_iter` Krylov steps; `num_iters` is the
    Krylov steps of the slowest block (a multiple of `KRYLOV_RESTART`), `converged` whether every block met
    the tolerance.
    """
    s = s.astype(jnp.float32)
    q0 = q0.astype(jnp.float32)
    if method == "krylov":
        q, num_iters, converged = _krylov(s, q0, gamma, tol, max_iter, block, precision)
    elif method == "closed_form":
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
        raise ValueError(f"method must be 'closed_form', 'iterative' or 'krylov', got {method!r}")
    labels = jnp.argmax(q, axis=-1).astype(jnp.int32)
    return PropagationResult(soft_labels=q, labels=labels, num_iters=num_iters, converged=converged)
