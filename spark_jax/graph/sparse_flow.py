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
   its flow ("rows have few survivors" is the switch). Its expansion is low-rank once P_t is: after a few
   iterations every token of a region sends (almost) the same flow, so P_t has numerical rank about its number
   of clusters long before its rows are sparse (planted 64 x 64: rank 5 from iteration 4; rows k-sparse from
   iteration 10). Each dense iteration sketches P's row space, V = orth((Omega P)^T) for a fixed Gaussian
   Omega [r, N] (Halko, Martinsson and Tropp's range finder), and measures E = P - (P V) V^T; if
   ||E||_inf < `rank_tol` the expansion is P^l ~ P^(l-1) (P V) V^T (5 N^2 r multiply-adds instead of N^3),
   whose error is P^(l-1) E, at most ||E||_inf in the same norm since P^(l-1) is row-stochastic. Otherwise
   the iteration squares densely.
2. **sparse**: P_{t+1} = RowNorm(Select_k(Prune_tau(Inflate_r(P_t^l)))) on the kept entries, where Select_k keeps
   each row's k largest entries (mcl's selection) and, optionally, mcl's recovery brings back entries that the
   threshold tau removed when too little mass survived it. Rows keep concentrating, so once every row's
   `keep_final` largest entries hold `switch_mass` of its flow the rows narrow to those (an iteration at k = 16
   costs a third of one at k = 64 at N = 4096: the N k^2 products and the selection shrink, the N x N
   scatter buffer stays).

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

import functools

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spark_jax.config import MclNorm
from spark_jax.graph.affinity import row_normalize
from spark_jax.graph.markov_flow import Clusters, change_norm, expand, relabel_contiguous


LOWRANK_MIN_RATIO = 16  # tokens per sketch column below which the dense phase always squares densely


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
      lowrank_iters: int32 [], dense-phase iterations whose expansion was the low-rank one.
      lowrank_error: float32 [], the largest ||P - P V V^T||_inf of those iterations (each one's bound on the
        infinity-norm error of its expansion); 0 when there were none.
      discarded_mass: float32 [], the largest fraction of a row's flow that selection dropped, at the switch or
        in any sparse iteration (of P_t at the switch, of P_t^l, before inflation, afterwards). 0 means the sparse
        iterations were exact; a large value says `keep` is too small for these features.
    """

    flow: SparseRows
    num_iters: jax.Array
    converged: jax.Array
    dense_iters: jax.Array
    lowrank_iters: jax.Array
    lowrank_error: jax.Array
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


def sketch(rank: int, n: int) -> jax.Array:
    """The fixed Gaussian sketch Omega [rank, n] of `row_space` (the same for every call: reproducible runs)."""
    return jax.random.normal(jax.random.key(0), (rank, n), jnp.float32)


def row_space(p: jax.Array, omega: jax.Array, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """An orthonormal basis V [N, rank] of (most of) P's row space: the span of the rows of Omega P.

    For P of rank <= `rank` V spans the whole row space, and `projection_residual` is float32 roundoff (about
    1e-6 at N = 4096).
    """
    # The barrier keeps XLA:CPU from fusing the transpose into the product (measured 3x slower there).
    y = jax.lax.optimization_barrier(jnp.matmul(omega, p, precision=precision))
    v, _ = jnp.linalg.qr(y.T)
    return v


def projection_residual(p: jax.Array, v: jax.Array, *, precision=jax.lax.Precision.HIGHEST) -> tuple[jax.Array, jax.Array]:
    """||P - P V V^T||_inf (the largest absolute row sum) of P [M, N] and its projection P V [M, rank]."""
    pv = jnp.matmul(p, v, precision=precision)
    return jnp.max(jnp.sum(jnp.abs(p - jnp.matmul(pv, v.T, precision=precision)), axis=-1)), pv


def lowrank_expand(p: jax.Array, v: jax.Array, pv: jax.Array, power: int, *,
                   precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """P^power ~ P^(power - 1) (P V) V^T for a row-space basis V of `row_space` (power static, >= 2), clipped at 0.

    The clip only moves entries towards the true (non-negative) P^power: the error bound stays ||P - P V V^T||_inf.
    """
    w = pv
    for _ in range(power - 1):
        w = jnp.matmul(p, w, precision=precision)
    return jnp.maximum(jnp.matmul(w, v.T, precision=precision), 0.0)


def inflate_prune_normalize(expanded: jax.Array, inflation: float | jax.Array,
                            prune_threshold: float | jax.Array) -> jax.Array:
    """RowNorm(Prune_tau(Inflate_r(.))) of a dense expanded P^l, as `markov_flow.markov_flow_step` computes it
    (to float32 rounding), in half its time on a CPU: the row maximum is read before inflating (inflation is
    increasing), and P^r is exp(r log P) (0 stays 0), which XLA fuses with the pruning into one pass."""
    row_max = jnp.max(expanded, axis=-1, keepdims=True)
    inflated = jnp.exp(inflation * jnp.log(expanded))
    return row_normalize(jnp.where((inflated >= prune_threshold) | (expanded == row_max), inflated, 0.0))


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
    keep_final: int = 16,
    switch_mass: float | jax.Array = 0.9,
    rank: int = 128,
    rank_tol: float | jax.Array = 1e-3,
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
      keep_final: the sparse phase narrows to this many entries per row (static) once every row's `keep_final`
        largest entries hold `switch_mass` of its flow; >= keep: one width throughout.
      switch_mass: the dense phase runs while some row's k largest entries hold less than this fraction of its
        flow; in [0, 1): 0 starts sparse at P_0 = Select_k(S), values near 1 wait until the rows are (almost)
        exactly k-sparse.
      rank: r, the sketch size of the dense phase's low-rank expansion (static); 0, or N < 16 r
        (`LOWRANK_MIN_RATIO`), squares densely throughout. While it is on, a vmap of this function runs its members
        one after another (`jax.custom_batching.sequential_vmap`): each iteration chooses its expansion (and skips
        the switch test) with `lax.cond` on the member's own data, and a batched cond would run both branches for
        every member, the dense N^3 squaring included.
      rank_tol: a dense-phase iteration expands through the rank-r sketch when ||P - P V V^T||_inf is below
        this (its error bound in Eq. 8's infinity norm); in [0, 2]. 0 never does.
      recovery: mcl's recovery number (static); 0 (off) keeps the dense form's pruning. See
        `prune_and_normalize`.
      recovery_mass: mcl's recovery percentage, as a fraction.
      expansion, inflation, prune_threshold, tol, max_iter, norm, precision: as `markov_flow`; `precision` is the
        dense phase's matmul precision.

    Returns:
      SparseFlowResult(flow, num_iters, converged, dense_iters, lowrank_iters, lowrank_error, discarded_mass).
    """
    s = s.astype(jnp.float32)
    n = s.shape[-1]
    # P^1 needs no expansion; below N = 16 r the sketch's own N^2 r passes cost more than they save (measured:
    # r = 128 at N = 1024 made the flow 1.1-1.3x slower than squaring densely).
    rank = rank if expansion > 1 and n >= LOWRANK_MIN_RATIO * rank else 0
    flow = functools.partial(_sparse_markov_flow, keep=keep, keep_final=keep_final, rank=rank, recovery=recovery,
                             expansion=expansion, max_iter=max_iter, norm=norm, precision=precision)
    if rank:
        flow = jax.custom_batching.sequential_vmap(flow)
    leaves = (switch_mass, rank_tol, recovery_mass, inflation, prune_threshold, tol)
    return flow(s, *(jnp.asarray(x, jnp.float32) for x in leaves))


def _sparse_markov_flow(s, switch_mass, rank_tol, recovery_mass, inflation, prune_threshold, tol, *, keep: int,
                        keep_final: int, rank: int, recovery: int, expansion: int, max_iter: int, norm: MclNorm,
                        precision) -> SparseFlowResult:
    """`sparse_markov_flow` with its numeric settings as arrays (positional: what `sequential_vmap` maps over) and
    ``rank`` already resolved (0: no sketch)."""
    n = s.shape[-1]
    k = min(keep, n)

    # A strided sample of rows decides first whether the (N^2 r) residual of every row can pass: its residual
    # is a lower bound of the whole one (a max over fewer rows), so a failing sample skips it exactly.
    sample = max(1, n // 256)
    omega = sketch(rank, n) if rank else None  # made once, outside the loop

    def expand_dense_state(p):
        if rank == 0:
            return expand(p, expansion, precision=precision), jnp.bool_(False), jnp.float32(0)
        v = row_space(p, omega, precision=precision)
        may_pass = projection_residual(p[::sample], v, precision=precision)[0] < rank_tol  # False for NaN
        residual, pv = jax.lax.cond(
            may_pass,
            lambda: projection_residual(p, v, precision=precision),
            lambda: (jnp.float32(jnp.inf), jnp.zeros((n, rank), jnp.float32)),
        )
        low = residual < rank_tol
        expanded = jax.lax.cond(
            low,
            lambda: lowrank_expand(p, v, pv, expansion, precision=precision),
            lambda: expand(p, expansion, precision=precision),
        )
        return expanded, low, jnp.where(low, residual, 0.0)

    def switch_lost(p):
        # A row's k largest entries hold at most its mass in entries >= theta plus k theta (those below theta), so
        # unless that bound reaches switch_mass for every row the switch cannot happen, and the N x N top-k
        # selection is skipped (one fused pass instead; theta = (1 - switch_mass) / (2 k)).
        theta = (1.0 - switch_mass) / (2 * k)
        bound = jnp.sum(jnp.where(p >= theta, p, 0.0), axis=-1) + k * theta
        possible = jnp.min(bound) >= switch_mass
        return jax.lax.cond(possible, lambda: jnp.max(select_rows(p, k)[1]), lambda: jnp.float32(1))

    def dense_cond(state):
        _, t, delta, lost, _, _ = state
        return (t < max_iter) & (delta >= tol) & (lost > 1.0 - switch_mass)

    def dense_body(state):
        p, t, _, _, low_count, low_error = state
        expanded, low, error = expand_dense_state(p)
        p_next = inflate_prune_normalize(expanded, inflation, prune_threshold)
        return (p_next, t + 1, change_norm(p_next - p, norm), switch_lost(p_next), low_count + low.astype(jnp.int32),
                jnp.maximum(low_error, error))

    p, t_dense, delta, _, low_count, low_error = jax.lax.while_loop(
        dense_cond, dense_body, (s, jnp.int32(0), jnp.float32(jnp.inf), switch_lost(s), jnp.int32(0), jnp.float32(0))
    )
    # The switch: P_t's k largest entries per row, renormalised (no inflation or pruning: P_t has had them).
    selected, dropped = select_rows(p, k)
    rows = prune_and_normalize(selected, inflation=1.0, prune_threshold=0.0)
    # An input that stopped in the dense phase (converged or capped) is reported as it is; its last change stays.

    def sparse_stage(rows, t, delta, discarded, next_keep):
        # Eq. 8 on the stored entries until convergence or the cap, or (next_keep given) until every row's
        # next_keep largest entries hold switch_mass of its flow.
        def next_lost(p):  # entries are in descending order: the next stage keeps a prefix
            if next_keep is None:
                return jnp.float32(0)
            return jnp.max(jnp.maximum(1.0 - jnp.sum(p.values[:, :next_keep], axis=-1), 0.0))

        def cond(state):
            _, t, delta, _, lost = state
            running = (t < max_iter) & (delta >= tol)
            return running if next_keep is None else running & (lost > 1.0 - switch_mass)

        def body(state):
            p, t, _, discarded, _ = state
            chosen, dropped = select_rows(sparse_expand(p, expansion, n), p.values.shape[-1])
            p_next = prune_and_normalize(
                chosen, inflation=inflation, prune_threshold=prune_threshold, recovery=recovery,
                recovery_mass=recovery_mass,
            )
            return (p_next, t + 1, sparse_change_norm(p, p_next, norm), jnp.maximum(discarded, jnp.max(dropped)),
                    next_lost(p_next))

        rows, t, delta, discarded, lost = jax.lax.while_loop(cond, body, (rows, t, delta, discarded, next_lost(rows)))
        if next_keep is None:
            return rows, t, delta, discarded
        narrowed = prune_and_normalize(SparseRows(rows.values[:, :next_keep], rows.columns[:, :next_keep]),
                                       inflation=1.0, prune_threshold=0.0)
        return narrowed, t, delta, jnp.maximum(discarded, lost)

    discarded = jnp.max(dropped)
    k_final = min(keep_final, k)
    if k_final < k:
        rows, t_wide, delta, discarded = sparse_stage(rows, t_dense, delta, discarded, k_final)
    else:
        t_wide = t_dense
    rows, t, delta, discarded = sparse_stage(rows, t_wide, delta, discarded, None)
    return SparseFlowResult(flow=rows, num_iters=t, converged=delta < tol, dense_iters=t_dense,
                            lowrank_iters=low_count, lowrank_error=low_error, discarded_mass=discarded)


def extract_sparse_clusters(flow: SparseRows) -> Clusters:
    """`markov_flow.extract_clusters` of a row-sparse P*: token i joins the column of its largest stored entry
    (ties to the lowest column index, as `jnp.argmax` on the dense row), relabelled 0..K-1 in attractor order."""
    n = flow.values.shape[0]
    top = jnp.max(flow.values, axis=-1, keepdims=True)
    attractors = jnp.min(jnp.where(flow.values == top, flow.columns, n), axis=-1).astype(jnp.int32)
    labels, k = relabel_contiguous(attractors, n)
    return Clusters(labels=labels, num_clusters=k, attractors=attractors)
