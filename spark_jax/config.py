"""SPARK hyperparameters: the paper's defaults, and documented choices where it is silent.

`SparkConfig` is a frozen dataclass registered as a JAX pytree. Numeric hyperparameters are
pytree *leaves*: a jitted function taking the config as an argument does not recompile when
only they change, and they can be vmapped over (the behaviour map sweeps inflation, beta and
the sharpening exponent in one call). Structural options (modes, iteration caps, the matrix
power, the number of label columns) are static metadata: changing them recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import numpy as np

GlobalMode = Literal["cosine", "inner"]
Negatives = Literal["clip", "minmax"]
Propagation = Literal["closed_form", "iterative", "krylov"]
Flow = Literal["dense", "sparse"]
Precision = Literal["highest", "high", "default"]
MclNorm = Literal["inf", "max_abs"]
SharpenMode = Literal["fixed", "entropy"]
GlobalSource = Literal["features", "attention", "qk_cosine"]
GLOBAL_SOURCES = ("features", "attention", "qk_cosine")

_NUMERIC = (
    "beta",
    "inflation",
    "prune_threshold",
    "sharpen",
    "local_eps",
    "mcl_tol",
    "gamma",
    "propagation_tol",
    "sharpen_target",
    "sparse_switch_mass",
    "sparse_rank_tol",
    "sparse_recovery_mass",
)
_STATIC = (
    "global_mode",
    "negatives",
    "use_local",
    "expansion",
    "mcl_max_iter",
    "mcl_norm",
    "propagation",
    "propagation_max_iter",
    "max_clusters",
    "matmul_precision",
    "sharpen_mode",
    "global_source",
    "flow",
    "sparse_keep",
    "sparse_keep_final",
    "sparse_rank",
    "sparse_recovery",
    "propagation_block",
)


@dataclasses.dataclass(frozen=True)
class SparkConfig:
    """Every SPARK hyperparameter.

    Paper values (SPARK, Sec. 3 and 4.1): `beta`, `expansion`, `inflation`, `prune_threshold`.
    The rest are choices the paper leaves open; each is documented here and in WORKSPACE.md.
    Static fields are validated on construction; numeric fields by `check_values`, which the
    entry points call on the host (the allowed ranges are in `_RANGES`).

    Attributes:
      beta: weight of the global affinity in the fused transition matrix (Eq. 4). Paper: 0.6.
      inflation: elementwise power r of the inflation step (Eq. 6). Paper: 2.6 (best on ADE20K).
      prune_threshold: tau of the pruning step; entries below it are zeroed, but each row's
        maximum always survives so no row empties. Paper: 1e-7.
      sharpen: elementwise power applied to the global affinity after negatives are handled.
        1.0 is Eq. 1 as written; DiffCut sharpens its affinity with 10 (after a min-max rescale).
        Used when `sharpen_mode='fixed'`.
      sharpen_target: with `sharpen_mode='entropy'`, the effective number of neighbours exp(H)
        of the rows of RowNorm(A_global^p), as a fraction of the N tokens, that the per-image
        exponent p is chosen to give (geometric mean over rows; `affinity.entropy_sharpness`).
        In (0, 1]; a fraction of N rather than of log N so that it means the same region size
        at every token grid.
      local_eps: epsilon added to the neighbour cosines of Eq. 3. Paper: "eps > 0", unspecified.
      mcl_tol: stop when ||P_{t+1} - P_t|| < mcl_tol in the norm `mcl_norm` (Eq. 8's epsilon,
        unspecified). 1e-6 is reachable in float32 because the iteration converges
        quadratically near its fixed point.
      gamma: the propagation weight of Eq. 10 (unspecified; 0.9 keeps the seeds influential
        while letting labels flow about ten hops).
      propagation_tol: stop the fixed-point iteration of Eq. 10 when the max change is below it.
      global_mode: 'cosine' (Eq. 1 on L2-normalised features, the default: the raw inner product
        of Eq. 1 is dominated by feature norms) or 'inner' (X X^T on the raw features).
      negatives: how signed similarities become affinities before RowNorm. 'clip' sets
        negatives to 0 (the default); 'minmax' rescales the whole matrix to [0, 1] (DiffCut).
        Negative local cosines (+ eps) are always clipped at 0.
      use_local: include the local graph (Eq. 3). False is the paper's "global affinity only"
        ablation (Table 2) and forces beta = 1.
      expansion: the matrix power l of Eq. 5 (static). Paper: 2.
      mcl_max_iter: iteration cap of the Markov-flow loop; hitting it reports converged=False.
      mcl_norm: the norm of Eq. 8's convergence test ||P_{t+1} - P_t|| < mcl_tol (static).
        'inf' (the default) is the matrix infinity norm, the largest absolute row sum: what
        ||.||_inf of a matrix means, and a bound on every token's total change of flow.
        'max_abs' is the largest entry (the reading before 'inf' became the default); it is
        never larger, so it stops at the same or an earlier iteration. On planted 32x32
        features (27 settings) both gave the same clusters; 'inf' ran 0-1 more iterations.
      propagation: 'closed_form' solves Eq. 11 with one LU factorisation (default, cheapest
        with many label columns); 'iterative' runs Eq. 10 to its fixed point; 'krylov' solves Eq. 11 by
        GMRES on blocks of `propagation_block` label columns, only those holding seeds (no N x N x N
        factorisation: the choice for large token grids, `graph.propagation.propagate_labels`).
      propagation_max_iter: cap of the iterative propagation (for 'krylov': of its Krylov steps per block).
      propagation_block: label columns per GMRES solve of 'krylov' (static). Blocks without seeds are
        skipped, so K clusters cost ceil(K / block) solves of `block` columns each.
      flow: the Markov-flow form (static). 'dense' (the default) iterates Eq. 8 on N x N matrices;
        'sparse' (`graph.sparse_flow.sparse_markov_flow`, our addition) switches to `sparse_keep` entries
        per row once every row's flow is concentrated there, as van Dongen's mcl prunes with its selection
        number. With sparse_keep >= N it is the dense form.
      sparse_keep: k, entries kept per row by the sparse flow (static; mcl's selection number `-S`).
        64: the planted and demo partitions of the dense form at 32 x 32 and 64 x 64 tokens
        (experiments/bench_sparse_flow.py); the sparse iterations cost N k^2 each.
      sparse_keep_final: the width the sparse phase narrows to (static) once every row's `sparse_keep_final`
        largest entries hold `sparse_switch_mass` of its flow; >= sparse_keep keeps one width. 16: MCL rows
        end on 1-3 entries, and the narrower iterations cost a third (bench_sparse_flow).
      sparse_switch_mass: the sparse flow iterates densely while some row's `sparse_keep` largest
        entries hold less than this fraction of its flow, in [0, 1). 0.9, as mcl's recovery percentage
        `-pct 90`: selecting from the first iterates (a row spread over a whole region) fragments large
        regions; 0.9 gave the dense partitions on every planted and demo input measured.
      sparse_rank: r, the sketch size of the sparse flow's dense phase (static; 0 turns it off): an
        iteration whose P_t is within `sparse_rank_tol` of its projection on a rank-r sketch of its row space
        expands through it (5 N^2 r multiply-adds instead of N^3; `graph.sparse_flow.row_space`). MCL iterates
        reach numerical rank about their number of clusters well before their rows are sparse. 128: at 64 x 64
        the demo inputs (20-28 clusters) pass one iteration earlier than with 64, the planted ones alike; an
        image with more clusters keeps squaring densely. Used only from N = 16 r tokens on (64 x 64 for 128):
        below, the sketch costs more than it saves.
      sparse_rank_tol: the bound on ||P_t - P_t V V^T||_inf (the infinity-norm error of that expansion,
        out of a row sum of 1) under which it is used, in [0, 2]. 1e-3: the dense partitions on every planted
        and demo input at 64 x 64 (1e-4 too, but the demo passes 2-3 iterations later: 5.6 instead of 4.6 s);
        the dense form's own float32 roundoff is ~1e-6.
      sparse_recovery: mcl's recovery number `-R` (static): a row whose entries surviving tau hold
        less than `sparse_recovery_mass` of its selected mass and number fewer than this gets back its
        largest pruned entries up to this many. 0 (the default) turns recovery off, so that the sparse
        flow prunes exactly as the dense one (mcl's cutoff is coarse, 1/4000; tau = 1e-7 removes little).
      sparse_recovery_mass: mcl's recovery percentage `-pct`, as a fraction in (0, 1].
      max_clusters: number of label columns kept for propagation (static). None keeps one
        column per token (exact for any number of clusters). With a bound M, the M largest
        clusters seed propagation and tokens of smaller clusters start unlabelled (they take
        labels by propagation); `SegmentResult.num_clusters` still reports the MCL count.
      matmul_precision: precision of the dense matmuls. 'highest' keeps float32 accuracy on
        TPUs/GPUs, whose default precision is bfloat16-like and perturbs the MCL fixed point.
      sharpen_mode: 'fixed' (the default) raises A_global to the power `sharpen`; 'entropy'
        calibrates the power per image to `sharpen_target` (not in the paper).
      global_source: what A_global (Eq. 1) is computed from (static). The paper's Eq. 1 is the
        inner product of the diffusion features, while its Fig. 2 caption says "we extract
        self-attention maps ... to form a global affinity"; three documented readings:
        'features' (the default: Eq. 1 on the attn1 output, `global_mode` and `negatives` as
        above); 'attention' (the self-attention probabilities of the same attn1, mean over
        heads, [N, N]: already non-negative, so `global_mode`/`negatives` do not apply);
        'qk_cosine' (the cosine of that attn1's queries and keys per head, cos(q_i^h, k_j^h),
        averaged over heads — NERVE's affinity with uniform head weights — then `negatives`).
        Sharpening (`sharpen`, `sharpen_mode`) applies to every source; the local graph
        (Eq. 2-3) always uses the features. The runner requests the taps a source needs.
    """

    beta: float = 0.6
    inflation: float = 2.6
    prune_threshold: float = 1e-7
    sharpen: float = 1.0
    local_eps: float = 1e-3
    mcl_tol: float = 1e-6
    gamma: float = 0.9
    propagation_tol: float = 1e-6
    global_mode: GlobalMode = "cosine"
    negatives: Negatives = "clip"
    use_local: bool = True
    expansion: int = 2
    mcl_max_iter: int = 100
    mcl_norm: MclNorm = "inf"
    propagation: Propagation = "closed_form"
    propagation_max_iter: int = 1000
    max_clusters: int | None = None
    matmul_precision: Precision = "highest"
    sharpen_target: float = 0.05
    sharpen_mode: SharpenMode = "fixed"
    global_source: GlobalSource = "features"
    flow: Flow = "dense"
    sparse_keep: int = 64
    sparse_keep_final: int = 16
    sparse_switch_mass: float = 0.9
    sparse_rank: int = 128
    sparse_rank_tol: float = 1e-3
    sparse_recovery: int = 0
    sparse_recovery_mass: float = 0.9
    propagation_block: int = 32

    def __post_init__(self):
        # Only static fields are validated here: numeric ones may be tracers inside jit/vmap, or
        # in_axes specs (None / 0) when a config is used to describe a vmap. `check_values`
        # validates them where concrete values enter the library.
        if self.global_mode not in ("cosine", "inner"):
            raise ValueError(f"global_mode must be 'cosine' or 'inner', got {self.global_mode!r}")
        if self.sharpen_mode not in ("fixed", "entropy"):
            raise ValueError(f"sharpen_mode must be 'fixed' or 'entropy', got {self.sharpen_mode!r}")
        if self.global_source not in GLOBAL_SOURCES:
            raise ValueError(
                f"global_source must be one of {GLOBAL_SOURCES} (what A_global is computed from: the attn1 "
                f"features, its attention probabilities, or the cosine of its queries and keys), got "
                f"{self.global_source!r}"
            )
        if self.negatives not in ("clip", "minmax"):
            raise ValueError(f"negatives must be 'clip' or 'minmax', got {self.negatives!r}")
        if not isinstance(self.use_local, bool):
            raise ValueError(f"use_local must be True or False, got {self.use_local!r}")
        if self.mcl_norm not in ("inf", "max_abs"):
            raise ValueError(
                "mcl_norm (the norm of Eq. 8's convergence test) must be 'inf' (largest absolute "
                f"row sum) or 'max_abs' (largest entry), got {self.mcl_norm!r}"
            )
        if self.propagation not in ("closed_form", "iterative", "krylov"):
            raise ValueError(
                f"propagation must be 'closed_form', 'iterative' or 'krylov', got {self.propagation!r}"
            )
        if self.flow not in ("dense", "sparse"):
            raise ValueError(
                f"flow (the Markov-flow form) must be 'dense' or 'sparse', got {self.flow!r}"
            )
        if self.matmul_precision not in ("highest", "high", "default"):
            raise ValueError(
                "matmul_precision must be 'highest', 'high' or 'default', "
                f"got {self.matmul_precision!r}"
            )
        if isinstance(self.expansion, bool) or not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"expansion (the matrix power l) must be an int >= 1, got {self.expansion!r}")
        for name in ("mcl_max_iter", "propagation_max_iter", "sparse_keep", "sparse_keep_final", "propagation_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.sparse_rank, bool) or not isinstance(self.sparse_rank, int) or self.sparse_rank < 0:
            raise ValueError(
                f"sparse_rank (the sketch size of the sparse flow's low-rank expansion) must be an int >= 0 "
                f"(0 turns it off), got {self.sparse_rank!r}"
            )
        if (
            isinstance(self.sparse_recovery, bool)
            or not isinstance(self.sparse_recovery, int)
            or not 0 <= self.sparse_recovery <= self.sparse_keep
        ):
            raise ValueError(
                f"sparse_recovery (mcl's recovery number) must be an int in [0, sparse_keep={self.sparse_keep}] "
                f"(0 turns recovery off), got {self.sparse_recovery!r}"
            )
        if self.max_clusters is not None and (
            isinstance(self.max_clusters, bool) or not isinstance(self.max_clusters, int) or self.max_clusters < 1
        ):
            raise ValueError(f"max_clusters must be None or an int >= 1, got {self.max_clusters!r}")

    def replace(self, **changes) -> SparkConfig:
        return dataclasses.replace(self, **changes)

    def precision(self) -> jax.lax.Precision:
        return {
            "highest": jax.lax.Precision.HIGHEST,
            "high": jax.lax.Precision.HIGH,
            "default": jax.lax.Precision.DEFAULT,
        }[self.matmul_precision]

    def check_values(self) -> None:
        """Raises ValueError naming every numeric field outside its range (`_RANGES`).

        Numeric fields are pytree leaves, so inside jit/vmap they are tracers whose values
        cannot be checked (and jitted code cannot raise on data): the library's entry points
        (`segment_tokens`, `segment_tokens_batch`, `segment_features`, `segment`, the runner)
        call this on the host before tracing, and it skips leaves that are tracers. A leaf
        holding an array (a hyperparameter grid to vmap over) is checked elementwise.
        """
        problems = []
        for name, (lo, lo_closed, hi, hi_closed, why) in _RANGES.items():
            value = getattr(self, name)
            if isinstance(value, jax.core.Tracer):
                continue
            try:
                v = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                problems.append(f"{name}={value!r} is not a real number ({why})")
                continue
            inside = (v >= lo if lo_closed else v > lo) & (v <= hi if hi_closed else v < hi)
            if not np.all(inside):  # NaN is outside every range
                interval = f"{'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"
                problems.append(f"{name}={value!r} is outside {interval}: {why}")
        if problems:
            raise ValueError("Invalid SparkConfig: " + "; ".join(problems))


# The allowed range of every numeric field, (low, low included, high, high included, why), checked
# by `SparkConfig.check_values`. Open upper bounds at inf also reject inf.
_RANGES = {
    "beta": (0.0, True, 1.0, True, "the weight of RowNorm(A_global) in Eq. 4 (paper: 0.6)"),
    "inflation": (1.0, False, np.inf, False,
                  "the inflation power r of Eq. 6 must exceed 1, as the paper requires (r <= 1 never "
                  "separates clusters; the paper sweeps 1.5..3.0)"),
    "prune_threshold": (0.0, True, 1.0, False,
                        "tau of the pruning step (paper: 1e-7; 0 switches pruning off; each row's "
                        "maximum always survives)"),
    "sharpen": (0.0, False, np.inf, False, "the power applied to A_global (1 = Eq. 1 as written)"),
    "sharpen_target": (0.0, False, 1.0, True, "effective neighbours as a fraction of the tokens"),
    "local_eps": (0.0, False, np.inf, False, "eps of Eq. 3, which the paper requires to be > 0"),
    "mcl_tol": (0.0, False, np.inf, False, "Eq. 8's stopping threshold on ||P_{t+1} - P_t||"),
    "gamma": (0.0, False, 1.0, False,
              "the propagation weight of Eq. 10 (gamma = 1 has no fixed point; 0 ignores S)"),
    "propagation_tol": (0.0, False, np.inf, False, "the stopping threshold of Eq. 10's iteration"),
    "sparse_switch_mass": (0.0, True, 1.0, False,
                           "the fraction of every row's flow its sparse_keep largest entries must hold before the "
                           "sparse flow stops iterating densely (0: sparse from the start)"),
    "sparse_rank_tol": (0.0, True, 2.0, True,
                        "the infinity-norm residual of P_t on its rank-sparse_rank sketch under which the sparse "
                        "flow expands through the sketch (0: never)"),
    "sparse_recovery_mass": (0.0, False, 1.0, True, "mcl's recovery percentage, as a fraction"),
}


jax.tree_util.register_dataclass(SparkConfig, data_fields=list(_NUMERIC), meta_fields=list(_STATIC))
