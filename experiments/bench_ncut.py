"""Benchmark: SPARK against DiffCut's recursive NCut (and AutoSC, K-means) on the same features.

    python -m experiments.bench_ncut                                   # 32x32 and 64x64
    python -m experiments.bench_ncut --grids=32 --repeats=3
    python -m experiments.bench_ncut --grids=64 --methods=spark,diffcut,diffcut_lobpcg

For each token grid it builds one image of planted token features
(`spark_jax.testing.synthetic.planted_token_features`), compiles every method ahead of time (compile
time is printed separately), then times `--repeats` calls (`--repeats_large` at grids >= 64)
and reports the best wall time and its ratio to SPARK's, measured in the same run. The methods are
those of the registry (`spark_jax.methods.REGISTRY`), each called as the runner calls it (its spec's
jitted function on `MethodInputs`, labels at a mask size equal to the grid), with planted-data settings
where the defaults do not fit, plus one variant:

  spark           SPARK (affinity, Markov flow, closed-form propagation, soft-label upsampling)
  diffcut         recursive NCut, dense eigh per segment (DiffCut's solver; exact), concept assignment
  diffcut_lobpcg  the same with the LOBPCG eigensolver (matrix-vector products only)
  autosc          AutoSC (4 dense eigendecompositions + QR-pivot discretisation)
  kmeans          K-means with K = the planted region count
  (any method registered later and reading only the features, with its default config)

It also prints each method's segment count and its mIoU against the planted regions (one-to-one
Hungarian matching), so the timed runs are seen to do the work they should.

Cost on a 2-core CPU: dense eigh of 1024 x 1024 takes ~1 s, of 4096 x 4096 about a minute; the
recursive NCut runs 2L - 1 of them for L segments, so 64x64 with 'ncut' takes many minutes.
SPARK runs with the planted-data settings of the SPARK tests (sharpen 8, beta 0.8, r 1.8;
`--paper_spark_config` for the paper's defaults).

Measured here with the previous revision, which called the algorithms directly (token labels, no
mask-size step; ncut = diffcut): 2-core CPU shared with other jobs, load average ~7, so single
timings vary by 2-3x between runs; all methods found the 5 planted regions, mIoU 1.0, except
K-means, 0.44:

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

from spark_jax.config import SparkConfig
from spark_jax.evaluation import confusion, iou_from_counts, match_counts
from spark_jax.graph.ncut import NCutConfig
from spark_jax.methods import REGISTRY, MethodContext, MethodInputs, method_spec
from spark_jax.methods.kmeans import KMeansConfig, KMeansMethodConfig
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.testing.synthetic import planted_token_features

FEATURE_TAP = "features"  # the planted features stand for the backbone's feature tap
PLANTED_SPARK = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.8)
# Bench variants: name -> (registered method, config).
VARIANTS = {"diffcut_lobpcg": ("diffcut", NCutConfig(eigensolver="lobpcg"))}


def entries() -> list[str]:
    """The timed entries: every registered method, then the variants."""
    return [*REGISTRY, *VARIANTS]


_GRIDS = flags.DEFINE_list("grids", ["32", "64"], "Token grid sides.")
_METHODS_FLAG = flags.DEFINE_list(
    "methods", entries(), f"Methods to time, among {', '.join(entries())}."
)
_METHODS_LARGE = flags.DEFINE_list(
    "methods_large",
    ["spark", "diffcut", "diffcut_lobpcg"],
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


def _miou(pred: np.ndarray, layout: np.ndarray) -> float:
    _, pred = np.unique(pred, return_inverse=True)
    hist = confusion(layout, pred.reshape(layout.shape), int(layout.max()) + 1)
    tp, fp, fn, _ = match_counts(hist)
    return float(np.nanmean(iou_from_counts(tp, fp, fn)))


class _PlantedBackbone:
    feature_tap = FEATURE_TAP


def bench_config(entry: str, num_regions: int):
    """(registered method, config) of a timed entry: planted-data settings for SPARK and K-means (K = the planted
    region count), the variants' own, the default for every other method."""
    if entry in VARIANTS:
        return VARIANTS[entry]
    if entry == "spark":
        return "spark", SparkMethodConfig(spark=SparkConfig() if _PAPER_SPARK.value else PLANTED_SPARK)
    if entry == "kmeans":
        return "kmeans", KMeansMethodConfig(k=num_regions, kmeans=KMeansConfig(max_clusters=8))
    return entry, method_spec(entry).default()


def _make_call(entry: str, features: jax.Array, num_regions: int):
    """The compiled call of an entry without arguments (as the runner calls it), or None if it reads taps the
    planted features cannot provide."""
    name, config = bench_config(entry, num_regions)
    spec = method_spec(name)
    config = spec.resolve_config(config, "user")
    if set(spec.taps(config, _PlantedBackbone())) != {FEATURE_TAP}:
        return None
    _, h, w, c = features.shape
    ctx = MethodContext(mask_size=h, upsampling=spec.upsampling, feature_tap=FEATURE_TAP)
    inputs = MethodInputs(features=features, taps={FEATURE_TAP: features.reshape(1, h * w, c)},
                          images=jnp.zeros((1, h, w, 3), jnp.float32),
                          num_classes=jnp.asarray([num_regions], jnp.int32), index=jnp.zeros((1,), jnp.int32))
    params = spec.params(config, ctx, (h, w))
    compiled = jax.jit(spec.build(ctx)).lower(inputs, params).compile()
    return lambda: compiled(inputs, params)


def run_grid(side: int, methods: list[str], repeats: int) -> dict[str, float]:
    features_np, layout = planted_token_features(
        _SEED.value, side, side, _CHANNELS.value, _NOISE.value
    )
    features = jnp.asarray(features_np)[None]  # one image: [1, h, w, C]
    num_regions = len(np.unique(layout))
    print(f"\n== {side}x{side} tokens (N = {side * side}), {_CHANNELS.value} channels, "
          f"noise {_NOISE.value}, {repeats} timed call(s) per method", flush=True)
    times = {}
    for method in methods:
        start = time.perf_counter()
        call = _make_call(method, features, num_regions)
        if call is None:
            print(f"  {method:<14} skipped: it reads taps other than the features", flush=True)
            continue
        compile_s = time.perf_counter() - start
        print(f"  {method:<12} compiled in {compile_s:.1f} s; timing ...", flush=True)
        best, result = float("inf"), None
        for i in range(repeats):
            start = time.perf_counter()
            result = jax.block_until_ready(call())
            elapsed = time.perf_counter() - start
            best = min(best, elapsed)
            print(f"    call {i + 1}/{repeats}: {elapsed:.2f} s", flush=True)
        labels, diag = result
        labels = np.asarray(labels)[0]
        diagnostics = " ".join(f"{k}={np.asarray(v)[0].item():g}" for k, v in diag.items())
        times[method] = best
        print(f"  {method:<12} best {best:8.3f} s  segments={len(np.unique(labels)):<3d} "
              f"mIoU={_miou(labels, layout):.3f}  {diagnostics}", flush=True)
    return times


def main(argv):
    del argv
    unknown = sorted(set(_METHODS_FLAG.value + _METHODS_LARGE.value) - set(entries()))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; choose among {', '.join(entries())}")
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
