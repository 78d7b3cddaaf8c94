"""Benchmark: SPARK against DiffCut's recursive NCut (and AutoSC, K-means) on the same features.

    python -m experiments.bench_ncut                                   # 32x32 and 64x64
    python -m experiments.bench_ncut --grids=32 --repeats=3
    python -m experiments.bench_ncut --grids=64 --methods=spark,ncut,ncut_lobpcg

For each token grid it builds one image of planted token features
(`spark_jax.testing.synthetic.planted_token_features`), compiles every method ahead of time (compile
time is printed separately), then times `--repeats` calls (`--repeats_large` at grids >= 64)
and reports the best wall time and its ratio to SPARK's, measured in the same run:

  spark        `spark.segment_tokens` (affinity, Markov flow, closed-form propagation)
  ncut         `ncut.recursive_ncut`, dense eigh per segment (DiffCut's solver; exact)
  ncut_lobpcg  the same with the LOBPCG eigensolver (matrix-vector products only)
  autosc       `autosc.autosc` (4 dense eigendecompositions + QR-pivot discretisation)
  kmeans       `kmeans.kmeans_tokens` with K = the planted region count

It also prints each method's segment count and its mIoU against the planted regions (one-to-one
Hungarian matching), so the timed runs are seen to do the work they should.

Cost on a 2-core CPU: dense eigh of 1024 x 1024 takes ~1 s, of 4096 x 4096 about a minute; the
recursive NCut runs 2L - 1 of them for L segments, so 64x64 with 'ncut' takes many minutes.
SPARK runs with the planted-data settings of the SPARK tests (sharpen 8, beta 0.8, r 1.8;
`--paper_spark_config` for the paper's defaults).

Measured here (2-core CPU shared with other jobs, load average ~7, so single timings vary by
2-3x between runs; all methods found the 5 planted regions, mIoU 1.0, except K-means, 0.44):

  grid   method        best time    x SPARK (same run)
  32^2   spark         1.4-1.7 s    1
  32^2   ncut          2.9-8.8 s    2.1-6.5   (9 eigensolves)
  32^2   ncut_lobpcg   0.6-2.9 s    0.5-1.8
  32^2   autosc        3.3-8.1 s    2.0-6.0
  32^2   kmeans        ~5 ms        0.00
  64^2   spark         77 s         1         (20 MCL iterations)
  64^2   ncut          171 s        2.2
  64^2   ncut_lobpcg   4.1 s        0.05
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from spark_jax.methods.autosc import AutoSCConfig, autosc
from spark_jax.config import SparkConfig
from spark_jax.evaluation import confusion, iou_from_counts, match_counts
from spark_jax.methods.kmeans import KMeansConfig, kmeans_tokens
from spark_jax.graph.ncut import NCutConfig, recursive_ncut
from spark_jax.methods.spark import segment_tokens
from spark_jax.testing.synthetic import planted_token_features

_METHODS = ("spark", "ncut", "ncut_lobpcg", "autosc", "kmeans")

_GRIDS = flags.DEFINE_list("grids", ["32", "64"], "Token grid sides.")
_METHODS_FLAG = flags.DEFINE_list(
    "methods", list(_METHODS), f"Methods to time, among {', '.join(_METHODS)}."
)
_METHODS_LARGE = flags.DEFINE_list(
    "methods_large",
    ["spark", "ncut", "ncut_lobpcg"],
    "Methods at grids >= 64 (AutoSC's four 4096 x 4096 eigendecompositions take minutes).",
)
_CHANNELS = flags.DEFINE_integer("channels", 64, "Feature channels.")
_NOISE = flags.DEFINE_float("noise", 0.5, "Noise of the planted features (relative to unit means).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the planted features.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed calls per method at grids < 64 (the best is reported)."
)
_REPEATS_LARGE = flags.DEFINE_integer("repeats_large", 1, "Timed calls per method at grids >= 64.")
_PAPER_SPARK = flags.DEFINE_bool(
    "paper_spark_config", False, "Run SPARK with the paper's defaults instead of planted settings."
)

PLANTED_SPARK = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.8)


def _miou(pred: np.ndarray, layout: np.ndarray) -> float:
    _, pred = np.unique(pred, return_inverse=True)
    hist = confusion(layout, pred.reshape(layout.shape), int(layout.max()) + 1)
    tp, fp, fn, _ = match_counts(hist)
    return float(np.nanmean(iou_from_counts(tp, fp, fn)))


def _make_call(method: str, features: jax.Array, num_regions: int):
    """(compiled call without arguments, reader of (labels, diagnostics) off its output)."""
    if method == "spark":
        cfg = SparkConfig() if _PAPER_SPARK.value else PLANTED_SPARK
        compiled = jax.jit(segment_tokens).lower(features, cfg).compile()  # validates, then lowers
        return (lambda: compiled(features, cfg)), (
            lambda r: (r.labels, f"K={int(r.num_clusters)} mcl_iters={int(r.mcl_iterations)}")
        )
    if method in ("ncut", "ncut_lobpcg"):
        cfg = NCutConfig(eigensolver="eigh" if method == "ncut" else "lobpcg")
        compiled = recursive_ncut.lower(features, cfg).compile()
        return (lambda: compiled(features, cfg)), (
            lambda r: (
                r.labels, f"eigensolves={int(r.num_eigensolves)} truncated={bool(r.truncated)}"
            )
        )
    if method == "autosc":
        cfg = AutoSCConfig()
        compiled = autosc.lower(features, cfg).compile()
        return (lambda: compiled(features, cfg)), (
            lambda r: (r.labels, f"k={int(r.num_clusters)} alpha={float(r.alpha):g}")
        )
    if method == "kmeans":
        cfg = KMeansConfig(max_clusters=8)
        key = jax.random.key(0)
        k = jnp.int32(num_regions)
        compiled = kmeans_tokens.lower(features, k, key, cfg).compile()
        return (lambda: compiled(features, k, key, cfg)), (
            lambda r: (r.labels, f"K={num_regions} iters={int(r.num_iters)}")
        )
    raise ValueError(f"unknown method {method!r}; choose among {', '.join(_METHODS)}")


def run_grid(side: int, methods: list[str], repeats: int) -> dict[str, float]:
    features_np, layout = planted_token_features(
        _SEED.value, side, side, _CHANNELS.value, _NOISE.value
    )
    features = jnp.asarray(features_np)
    num_regions = len(np.unique(layout))
    print(f"\n== {side}x{side} tokens (N = {side * side}), {_CHANNELS.value} channels, "
          f"noise {_NOISE.value}, {repeats} timed call(s) per method", flush=True)
    times = {}
    for method in methods:
        start = time.perf_counter()
        call, read = _make_call(method, features, num_regions)
        compile_s = time.perf_counter() - start
        print(f"  {method:<12} compiled in {compile_s:.1f} s; timing ...", flush=True)
        best, result = float("inf"), None
        for i in range(repeats):
            start = time.perf_counter()
            result = jax.block_until_ready(call())
            elapsed = time.perf_counter() - start
            best = min(best, elapsed)
            print(f"    call {i + 1}/{repeats}: {elapsed:.2f} s", flush=True)
        labels, diagnostics = read(result)
        labels = np.asarray(labels)
        times[method] = best
        print(f"  {method:<12} best {best:8.3f} s  segments={len(np.unique(labels)):<3d} "
              f"mIoU={_miou(labels, layout):.3f}  {diagnostics}", flush=True)
    return times


def main(argv):
    del argv
    unknown = sorted(set(_METHODS_FLAG.value + _METHODS_LARGE.value) - set(_METHODS))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; choose among {', '.join(_METHODS)}")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}", flush=True)
    summary = []
    for side in (int(g) for g in _GRIDS.value):
        large = side >= 64
        methods = _METHODS_LARGE.value if large else _METHODS_FLAG.value
        times = run_grid(side, methods, _REPEATS_LARGE.value if large else _REPEATS.value)
        summary.append((side, times))
    print("\n== summary: best wall time, and ratio to SPARK in the same run")
    print(f"{'grid':>6} {'method':<12} {'time (s)':>10} {'x SPARK':>9}")
    for side, times in summary:
        for method, seconds in times.items():
            ratio = f"{seconds / times['spark']:9.2f}" if "spark" in times else "        -"
            print(f"{side:>4}^2 {method:<12} {seconds:10.3f} {ratio}")


if __name__ == "__main__":
    app.run(main)
