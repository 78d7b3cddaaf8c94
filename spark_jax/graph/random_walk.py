"""Random walks that generate labels (NERVE, slide 4.1): label probabilities propagated over a transition matrix.

The walker starts at token i; at each step it *generates a label* from the node-to-label matrix G at its current
token with probability 1 - alpha, or *moves* along the row-stochastic transition matrix S with probability alpha.
Token i's label distribution, for a walk stopped after at most L moves (renormalised over the walks that generate
a label by then), is NERVE's truncated walk

    P_L = (1 - alpha) / (1 - alpha^(L+1)) * sum_{t=0..L} alpha^t S^t G,

and without the stop (L -> infinity) the closed form

    P_inf = (1 - alpha) (I - alpha S)^-1 G,

the same linear system as SPARK's label propagation (Eq. 11, :func:`spark_jax.graph.propagation.propagate_labels`,
gamma = alpha). Conventions: tokens are rows; S [N, N] is row-stochastic (S[i, j] = the flow i -> j); G [N, K] holds
one distribution over the K labels per token. Then every row of P_L and of P_inf sums to 1 (the weights of the sum
add up to 1 - alpha^(L+1) before the normalisation).

The truncated walk is computed by the recursion of NERVE's summary (*derived*: it gives exactly the sum above)

    P~_0 = (1 - alpha) G,    P~_t = (1 - alpha) G + alpha S P~_{t-1},    P_L = P~_L / (1 - alpha^(L+1)),

L matrix products [N, N] x [N, K]: O(L N^2 K), against the closed form's O(N^3) LU. The two differ by at most
alpha^(L+1) in any entry: both are convex mixtures of the label distributions S^t G, and P_L - P_inf is a
mixture of weight alpha^(L+1) (the extra weight of t <= L) minus one of the same weight (the tail t > L), of
entries in [0, 1]. So the truncated walk tends to the closed form geometrically in L.

Both report the residual of the infinite walk's fixed-point equation, max |P - (1 - alpha) G - alpha S P|: about
float32 rounding for the closed form, and how far the truncation stops from the limit for the truncated walk.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["WALKS", "WalkResult", "closed_form_walk", "fixed_point_residual", "random_walk", "truncated_walk"]

Walk = Literal["truncated", "closed_form"]
WALKS = ("truncated", "closed_form")
_HIGHEST = jax.lax.Precision.HIGHEST


class WalkResult(NamedTuple):
    """A label-generating random walk's output.

    Attributes:
      probs: float32 [N, K], each token's label distribution (rows sum to 1 for stochastic S and G).
      residual: float32 [], max |probs - (1 - alpha) G - alpha S probs|, the infinite walk's fixed-point residual.
    """

    probs: jax.Array
    residual: jax.Array


def _check(s: jax.Array, g: jax.Array) -> None:
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"the transition matrix S must be square [N, N], got shape {s.shape}")
    if g.ndim != 2 or g.shape[0] != s.shape[0]:
        raise ValueError(f"the node-to-label matrix G must be [N, K] with N = {s.shape[0]} (S's tokens), got shape "
                         f"{g.shape}")


def fixed_point_residual(s: jax.Array, g: jax.Array, p: jax.Array, alpha: float | jax.Array,
                         precision=_HIGHEST) -> jax.Array:
    """max |P - (1 - alpha) G - alpha S P| of label distributions P [N, K] (0 at the closed form)."""
    step = (1.0 - alpha) * g + alpha * jnp.matmul(s, p, precision=precision)
    return jnp.max(jnp.abs(p - step))


def truncated_walk(s: jax.Array, g: jax.Array, *, alpha: float | jax.Array, steps: int,
                   precision=_HIGHEST) -> WalkResult:
    """NERVE's truncated walk P_L (module docstring) of S [N, N] and G [N, K], L = ``steps`` (static, >= 0).

    The recursion P~_t = (1 - alpha) G + alpha S P~_{t-1} from P~_0 = (1 - alpha) G, then P_L = P~_L / (1 -
    alpha^(L+1)); ``steps=0`` returns G. ``alpha`` may be traced; 0 < alpha < 1.
    """
    _check(s, g)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"the walk's number of steps L must be an int >= 0, got {steps!r}")
    s = s.astype(jnp.float32)
    g = g.astype(jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    start = (1.0 - alpha) * g
    p = jax.lax.fori_loop(0, steps, lambda _, p: start + alpha * jnp.matmul(s, p, precision=precision), start)
    p = p / (1.0 - alpha ** (steps + 1))
    return WalkResult(p, fixed_point_residual(s, g, p, alpha, precision))


def closed_form_walk(s: jax.Array, g: jax.Array, *, alpha: float | jax.Array, precision=_HIGHEST) -> WalkResult:
    """The infinite walk P_inf = (1 - alpha) (I - alpha S)^-1 G of S [N, N] and G [N, K], by one LU solve.

    I - alpha S is strictly diagonally dominant by rows for row-stochastic S and 0 < alpha < 1 (its off-diagonal row
    sums are alpha (1 - S_ii) < 1 - alpha S_ii), hence invertible and well conditioned (cond_inf <= (1 + alpha) /
    (1 - alpha)). The solve stays on the device (no host round-trip), at N = 4096 (SD's 64 x 64 grid) too.
    """
    _check(s, g)
    s = s.astype(jnp.float32)
    g = g.astype(jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    system = jnp.eye(s.shape[0], dtype=jnp.float32) - alpha * s
    p = jnp.linalg.solve(system, (1.0 - alpha) * g)
    return WalkResult(p, fixed_point_residual(s, g, p, alpha, precision))


def random_walk(s: jax.Array, g: jax.Array, *, alpha: float | jax.Array, walk: Walk = "truncated", steps: int = 10,
                precision=_HIGHEST) -> WalkResult:
    """``walk='truncated'``: :func:`truncated_walk` with L = ``steps``; ``'closed_form'``: :func:`closed_form_walk`
    (``steps`` unused)."""
    if walk == "truncated":
        return truncated_walk(s, g, alpha=alpha, steps=steps, precision=precision)
    if walk == "closed_form":
        return closed_form_walk(s, g, alpha=alpha, precision=precision)
    raise ValueError(f"walk must be one of {WALKS}, got {walk!r}")
