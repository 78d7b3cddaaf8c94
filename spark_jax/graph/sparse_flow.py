"""Sparse Markov-flow clustering (SPARK Eq. 5-9 on a pruned sparse form, `SparkConfig(flow='sparse')`).

The dense form (`markov_flow.markov_flow`) squares an N x N matrix every iteration: 2 N^3 flops, 137 GFLOP at
64 x 64 tokens. After a few iterations almost every row's flow sits on a handful of columns (Eq. 8's inflation
concentrates it), so the rest of the iterations can run on a fixed number k of kept entries per row, as van
Dongen's `mcl` does with its selection number (`-S`): each row is stored as its k largest values [N, k] and their
column indices [N, k] (static shapes), and the expansion costs N k^2 multiply-adds instead of N^3.

The early iterations are not sparse: SPARK's S is dense (the global affinity links every pair of tokens) and its
rows spread over whole regions, so keeping k entries of them replaces a region-wide average by a k-token one and
fragments large regions (planted 32 x 32 features: 31-73 clusters instead of 5 when selecting from P_0 or P_1).
So the flow runs in two phases, in one jitted program:

1. **dense**: Eq. 8 as `markov_flow` does, while some row's k largest entries hold less than `switch_mass` of
   its flow ("rows have few survivors" is the switch);
2. **sparse**: P_{t+1} = RowNorm(Select_k(Prune_tau(Inflate_r(P_t^l)))) on the kept entries, where Select_k keeps
   each row's k largest entries (mcl's selection) and, optionally, mcl's recovery brings back entries that the
   threshold tau removed when too little mass survived it.

With k >= N selection keeps everything and the sparse form is the dense one (tested). Both phases use the dense
form's convergence test (`markov_flow.change_norm`'s norms, computed on the kept entries) and iteration cap.

Expansion: the first product of the sparse P with itself is a scatter-add of its N k^2 products into an N x N
buffer (duplicates summed), from which `lax.top_k` selects; measured on this CPU at N = 4096 against keeping the
k^2 candidates per row and merging duplicates by sorting (8x slower). Further powers (l > 2) multiply that buffer
by the sparse P from the left (N^2 k each).

Row-stochastic convention as in `markov_flow`: P[i, j] is the flow from token i to token j; mcl's matrices are
column-stochastic, so its column pruning is our row pruning.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spark_jax.config import MclNorm
from spark_jax.graph.markov_flow import Clusters, change_norm, markov_flow_step, relabel_contiguous


class SparseRows(NamedTuple):
    """A row-sparse N x N matrix with k stored entries per row (static shapes).

    Attributes:
      values: float32 [N, k], each row's stored entries in descending order (zeros last).
      columns: int32 [N, k], their column indices, distinct within a row.
    """

    values: jax.Array
    columns: jax.Array


class SparseFlowResult(NamedTuple):
    """Output of `sparse_markov_flow`.

    Attributes:
      flow: P* as `SparseRows` (row-stochastic); `densify(flow)` gives the [N, N] matrix.
      num_iters: int32 [], iterations of Eq. 8 that ran, both phases together.
      converged: bool [], the convergence test was met before the cap (as `markov_flow`).
      dense_iters: int32 [], iterations run in the dense phase (before the switch to k entries per row).
      discarded_mass: float32 [], the largest fraction of a row's flow that selection dropped, at the switch or
        in any sparse iteration (of P_t at the switch, of P_t^l, before inflation, afterwards). 0 means the sparse
        iterations were exact; a large value says `keep` is too small for these features.
    """

    flow: SparseRows
    num_iters: jax.Array
    converged: jax.Array
    dense_iters: jax.Array
    discarded_mass: jax.Array


def densify(rows: SparseRows, n: int | None = None) -> jax.Array:
    """The dense [N, n] matrix of `rows` (n defaults to N)."""
    num_rows = rows.values.shape[0]
    n = num_rows if n is None else n
    # .add, not .set: a row's stored columns are distinct, and zero entries add nothing wherever they point.
    return jnp.zeros((num_rows, n), rows.values.dtype).at[jnp.arange(num_rows)[:, None], rows.columns].add(rows.values)


def select_rows(d: jax.Array, keep: int) -> tuple[SparseRows, jax.Array]:
    """The `keep` largest entries of each row of a non-negative d [N, M] (ties to the lower column, as
    `lax.top_k`), and the fraction of each row's sum outside them [N] (0 for rows without mass)."""
    values, columns = jax.lax.top_k(d, min(keep, d.shape[-1]))
    total = jnp.sum(d, axis=-1)
    lost = jnp.where(total > 0, 1.0 - jnp.sum(values, axis=-1) / jnp.where(total > 0, total, 1.0), 0.0)
    return SparseRows(values, columns.astype(jnp.int32)), jnp.maximum(lost, 0.0)


def sparse_expand(p: SparseRows, power: int, n: int) -> jax.Array:
    """P^power [N, n] of a row-sparse row-stochastic P (power static, >= 1), as a dense buffer.

    The first product gathers, for each stored entry P[i, a], the stored row a: N k^2 products scattered into
    their columns (duplicates summed). Each further power multiplies the buffer by P from the left.
    """
    num_rows, k = p.values.shape
    rows = jnp.arange(num_rows)
    if power == 1:
        return densify(p, n)
    products = p.values[:, :, None] * p.values[p.columns]  # [N, k, k]: P[i, a] P[a, b]
    out = jnp.zeros((num_rows, n), p.values.dtype).at[rows[:, None, None], p.columns[p.columns]].add(products)

    def left_multiply(prev):  # (P prev)[i] = sum_a P[i, a] prev[a], one stored slot a at a time
        return jax.lax.fori_loop(
            0, k, lambda a, acc: acc + p.values[:, a, None] * prev[p.columns[:, a]], jnp.zeros_like(prev)
        )

    for _ in range(power - 2):
        out = left_multiply(out)
    return out


def prune_and_normalize(
    selected: SparseRows,
    *,
    inflation: float | jax.Array,
    prune_threshold: float | jax.Array,
    recovery: int = 0,
    recovery_mass: float | jax.Array = 0.9,
) -> SparseRows:
    """RowNorm(Prune_tau(Inflate_r(.))) of selected entries (each row's largest, in descending order).

    Pruning is the dense form's: entries below tau after inflation are zeroed, each row's maximum always
    survives. Recovery (mcl's `-R` / `-pct`, off when `recovery` is 0): a row whose surviving entries hold less
    than `recovery_mass` of its selected (inflated) mass and number fewer than `recovery` gets back its largest
    pruned entries until it has `recovery` entries or that fraction of the mass. Entries are in descending order,
    so survivors and recovered entries are both prefixes of the row. A row left without mass becomes a self-loop,
    as `affinity.row_normalize` makes it.
    """
    num_rows, k = selected.values.shape
    slot = jnp.arange(k)[None, :]
    inflated = selected.values**inflation
    # Descending order makes "kept" a prefix: tau-survivors and the maximum (slot 0, which may tie others).
    kept = (inflated >= prune_threshold) | (slot == 0)
    if recovery > 0:
        total = jnp.sum(inflated, axis=-1, keepdims=True)
        count = jnp.sum(kept, axis=-1, keepdims=True)
        short = (jnp.sum(jnp.where(kept, inflated, 0.0), axis=-1, keepdims=True) < recovery_mass * total) & (
            count < recovery
        )
        # Slot j is recovered if the slots before it hold less than the target mass and j < recovery.
        before = jnp.cumsum(inflated, axis=-1) - inflated
        kept = kept | (short & (slot < recovery) & (before < recovery_mass * total))
    pruned = jnp.where(kept, inflated, 0.0)
    total = jnp.sum(pruned, axis=-1, keepdims=True)
    has_mass = ~(total <= 0)  # NaN rows stay NaN (and unconverged), as in the dense form
    values = jnp.where(has_mass, pruned / jnp.where(has_mass, total, 1.0), (slot == 0).astype(pruned.dtype))
    # A self-loop row stores (i, 1) first; its other (zero) entries get distinct columns i + 1, i + 2, ...
    self_loop = (jnp.arange(num_rows)[:, None] + slot) % num_rows
    columns = jnp.where(has_mass, selected.columns, self_loop.astype(jnp.int32))
    return SparseRows(values, columns)


def sparse_change_norm(old: SparseRows, new: SparseRows, norm: MclNorm) -> jax.Array:
    """`markov_flow.change_norm` of new - old for two row-sparse matrices, from their stored entries.

    Entries are matched by column within each row (k x k comparisons per row); an entry stored in one matrix
    only counts in full. Exact because a row's stored columns are distinct and unstored entries are zero.
    """
    same = (new.columns[:, :, None] == old.columns[:, None, :]) & (old.values[:, None, :] != 0)  # [N, k_new, k_old]
    old_at_new = jnp.sum(jnp.where(same, old.values[:, None, :], 0.0), axis=-1)
    only_old = jnp.where(jnp.any(same, axis=1), 0.0, old.values)  # old entries the new row does not store
    diff_new = jnp.abs(new.values - old_at_new)
    if norm == "inf":
        return jnp.max(jnp.sum(diff_new, axis=-1) + jnp.sum(only_old, axis=-1))
    if norm == "max_abs":
        return jnp.maximum(jnp.max(diff_new), jnp.max(only_old))
    raise ValueError(f"norm must be 'inf' or 'max_abs', got {norm!r}")


def sparse_markov_flow(
    s: jax.Array,
    *,
    keep: int = 64,
    switch_mass: float | jax.Array = 0.9,
    recovery: int = 0,
    recovery_mass: float | jax.Array = 0.9,
    expansion: int = 2,
    inflation: float | jax.Array = 2.6,
    prune_threshold: float | jax.Array = 1e-7,
    tol: float | jax.Array = 1e-6,
    max_iter: int = 100,
    norm: MclNorm = "inf",
    precision=jax.lax.Precision.HIGHEST,
) -> SparseFlowResult:
    """Iterates Eq. 8 from P_0 = S, dense until rows have few survivors, then on `keep` entries per row.

    Runs in two `lax.while_loop`s (jittable, vmappable; under vmap each member keeps its own counts).

    Args:
      s: row-stochastic transition matrix [N, N].
      keep: k, entries kept per row in the sparse phase (static; mcl's selection number). k >= N keeps every
        entry: the dense form.
      switch_mass: the dense phase runs while some row's k largest entries hold less than this fraction of its
        flow; in [0, 1): 0 starts sparse at P_0 = Select_k(S), values near 1 wait until the rows are (almost)
        exactly k-sparse.
      recovery: mcl's recovery number (static); 0 (off) keeps the dense form's pruning. See
        `prune_and_normalize`.
      recovery_mass: mcl's recovery percentage, as a fraction.
      expansion, inflation, prune_threshold, tol, max_iter, norm, precision: as `markov_flow`; `precision` is the
        dense phase's matmul precision.

    Returns:
      SparseFlowResult(flow, num_iters, converged, dense_iters, discarded_mass).
    """
    s = s.astype(jnp.float32)
    n = s.shape[-1]
    k = min(keep, n)

    def dense_cond(state):
        _, t, delta, lost = state
        return (t < max_iter) & (delta >= tol) & (lost > 1.0 - switch_mass)

    def dense_body(state):
        p, t, _, _ = state
        p_next = markov_flow_step(
            p, expansion=expansion, inflation=inflation, prune_threshold=prune_threshold, precision=precision
        )
        return p_next, t + 1, change_norm(p_next - p, norm), jnp.max(select_rows(p_next, k)[1])

    lost0 = jnp.max(select_rows(s, k)[1])
    p, t_dense, delta, lost = jax.lax.while_loop(dense_cond, dense_body, (s, jnp.int32(0), jnp.float32(jnp.inf), lost0))
    # The switch: P_t's k largest entries per row, renormalised (no inflation or pruning: P_t has had them).
    selected, _ = select_rows(p, k)
    rows = prune_and_normalize(selected, inflation=1.0, prune_threshold=0.0)
    # An input that stopped in the dense phase (converged or capped) is reported as it is; its last change stays.

    def sparse_cond(state):
        _, t, delta, _ = state
        return (t < max_iter) & (delta >= tol)

    def sparse_body(state):
        p, t, _, discarded = state
        chosen, dropped = select_rows(sparse_expand(p, expansion, n), k)
        p_next = prune_and_normalize(
            chosen, inflation=inflation, prune_threshold=prune_threshold, recovery=recovery,
            recovery_mass=recovery_mass,
        )
        return p_next, t + 1, sparse_change_norm(p, p_next, norm), jnp.maximum(discarded, jnp.max(dropped))

    rows, t, delta, discarded = jax.lax.while_loop(
        sparse_cond, sparse_body, (rows, t_dense, delta, jnp.where(t_dense > 0, lost, lost0))
    )
    return SparseFlowResult(flow=rows, num_iters=t, converged=delta < tol, dense_iters=t_dense, discarded_mass=discarded)


def extract_sparse_clusters(flow: SparseRows) -> Clusters:
    """`markov_flow.extract_clusters` of a row-sparse P*: token i joins the column of its largest stored entry
    (ties to the lowest column index, as `jnp.argmax` on the dense row), relabelled 0..K-1 in attractor order."""
    n = flow.values.shape[0]
    top = jnp.max(flow.values, axis=-1, keepdims=True)
    attractors = jnp.min(jnp.where(flow.values == top, flow.columns, n), axis=-1).astype(jnp.int32)
    labels, k = relabel_contiguous(attractors, n)
    return Clusters(labels=labels, num_clusters=k, attractors=attractors)
