"""Benchmark: sparse against dense Markov flow (+ propagation) on planted and demo features, per image.

    python -m experiments.bench_sparse_flow                          # 32x32 (3 rounds) and 64x64 (1 round)
    python -m experiments.bench_sparse_flow --grids=32 --rounds=5 --keeps=16,64 --ranks=128,0 --keep_finals=16,64

For each token grid and input it builds S once (outside the timer), then times, after compilation, MCL +
cluster extraction + propagation (Eq. 5-12) of
  * dense:  `markov_flow` + the closed-form propagation (the library's defaults),
  * sparse: `sparse_markov_flow` (`SparkConfig(flow='sparse')`, each `--keeps` value) + the Krylov propagation,
  * (64 x 64) dense MCL + Krylov propagation, to separate the two halves,
interleaved round by round (this VM's speed drifts by up to ~40%, so each round's sparse / dense ratio is
reported, and their median). Agreement with the dense form: identical coarse clusters (Eq. 9), identical final
labels (Eq. 12), and their adjusted Rand index (sklearn). Inputs: planted features (`testing.synthetic`, 64
channels, noise 0.4, sharpen 8, beta 0.8, r 1.5: five planted regions at both grids) and demo features (the
handcrafted backbone on `data.demo` images with its preset; 64 x 64 tokens from a 512 px input, patch 8).

Figures of 2026-12-02, second session (defaults: sparse_keep 64 -> sparse_keep_final 16, sparse_rank 128,
sparse_rank_tol 1e-3; the 2-core AMD EPYC at load 1.5-1.8; 1 round at 64 x 64, 5 at 32 x 32). Every sparse partition,
coarse and final, was identical to the dense one (ARI 1.0) on all 8 input/grid pairs.
  64 x 64 (MCL + Krylov propagation, s / image): planted 3.77 and 3.94 (dense 10.05, 9.84), demo 4.63 and 4.49
           (dense 14.12, 13.03); 10-11 of 20-31 iterations before the switch, 3-6 of them through the sketch
           (residual <= 7.8e-4). rank 64: 3.72-4.89 s; rank 0 (the first session's form): 5.2-6.1 s.
  32 x 32: the sketch is off below N = 16 r; sparse 0.72-0.88x dense in-round (k 64 -> 16); with rank 128 forced
           on it was 1.1-1.3x, hence the threshold.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from sklearn.metrics import adjusted_rand_score

from spark_jax.backbones.handcrafted import HandcraftedConfig, handcrafted_features
from spark_jax.config import SparkConfig
from spark_jax.data.demo import demo_image
from spark_jax.graph.affinity import transition_matrix
from spark_jax.graph.markov_flow import extract_clusters, markov_flow
from spark_jax.graph.propagation import propagate_labels, seed_matrix
from spark_jax.graph.sparse_flow import extract_sparse_clusters, sparse_markov_flow
from spark_jax.presets import SPARK_PRESETS
from spark_jax.testing.synthetic import planted_token_features

_GRIDS = flags.DEFINE_list("grids", ["32", "64"], "Token grid sides.")
_KEEPS = flags.DEFINE_list("keeps", ["64"], "SparkConfig.sparse_keep values to time.")
_KEEP_FINAL = flags.DEFINE_list("keep_finals", ["16", "64"], "SparkConfig.sparse_keep_final values to time (a "
                                "value >= the keep: one width).")
_RANKS = flags.DEFINE_list("ranks", ["128", "0"], "SparkConfig.sparse_rank values to time (0: dense-phase "
                           "iterations always square densely).")
_RANK_TOL = flags.DEFINE_float("rank_tol", None, "SparkConfig.sparse_rank_tol (default: the config's).")
_PLANTED = flags.DEFINE_list("planted_seeds", ["0", "1"], "Seeds of the planted inputs.")
_DEMO = flags.DEFINE_list("demo_images", ["0", "1"], "Indices of the demo images.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved timing rounds at grids below 64.")
_ROUNDS_64 = flags.DEFINE_integer("rounds_64", 1, "Rounds at 64x64 (the dense form takes tens of seconds).")

PLANTED_CFG = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.5)
DEMO_CFG = SPARK_PRESETS["handcrafted"].config


@functools.partial(jax.jit, static_argnames=("flow", "keep", "keep_final", "rank", "method"))
def mcl_and_propagation(s, cfg: SparkConfig, flow: str, keep: int, keep_final: int, rank: int, method: str):
    """Eq. 5-12 on a transition matrix, as `methods.spark._segment_tokens` runs them (no affinity)."""
    n = s.shape[0]
    common = dict(expansion=cfg.expansion, inflation=cfg.inflation, prune_threshold=cfg.prune_threshold,
                  tol=cfg.mcl_tol, max_iter=cfg.mcl_max_iter, norm=cfg.mcl_norm)
    if flow == "sparse":
        out = sparse_markov_flow(s, keep=keep, keep_final=keep_final, switch_mass=cfg.sparse_switch_mass, rank=rank,
                                 rank_tol=cfg.sparse_rank_tol if _RANK_TOL.value is None else _RANK_TOL.value,
                                 **common)
        clusters = extract_sparse_clusters(out.flow)
        extra = (out.dense_iters, out.lowrank_iters, out.lowrank_error, out.discarded_mass)
    else:
        out = markov_flow(s, **common)
        clusters, extra = extract_clusters(out.flow), (jnp.int32(-1), jnp.int32(0), jnp.float32(0), jnp.float32(0))
    prop = propagate_labels(s, seed_matrix(clusters.labels, n), gamma=cfg.gamma, method=method,
                            tol=cfg.propagation_tol, max_iter=cfg.propagation_max_iter, block=cfg.propagation_block)
    return clusters.labels, prop.labels, clusters.num_clusters, out.num_iters, out.converged, prop.converged, *extra


def _inputs(side: int):
    for seed in map(int, _PLANTED.value):
        yield f"planted {seed}", planted_token_features(seed, side, side, 64, noise=0.4)[0], PLANTED_CFG
    for index in map(int, _DEMO.value):
        image = jnp.asarray(demo_image(index).image[None])
        feats = handcrafted_features(image, HandcraftedConfig(resolution=8 * side, patch=8))[0]
        yield f"demo {index}", np.asarray(feats), DEMO_CFG


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def main(argv):
    del argv
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    rows = []
    for side in map(int, _GRIDS.value):
        rounds = _ROUNDS_64.value if side >= 64 else _ROUNDS.value
        for name, features, cfg in _inputs(side):
            s = jax.block_until_ready(jax.jit(transition_matrix)(jnp.asarray(features), cfg))
            variants = [("dense", "dense", 0, 0, 0, "closed_form")]
            if side >= 64:
                variants.append(("dense + krylov", "dense", 0, 0, 0, "krylov"))
            variants += [(f"sparse k={k}>{kf} r={r}", "sparse", int(k), int(kf), int(r), "krylov")
                         for k in _KEEPS.value for kf in _KEEP_FINAL.value for r in _RANKS.value if int(kf) <= int(k)]
            # Compiled ahead of the timed rounds (no warm-up run: a dense 64 x 64 run takes tens of seconds).
            calls = {}
            for v, flow, keep, keep_final, rank, method in variants:
                compiled = mcl_and_propagation.lower(s, cfg, flow=flow, keep=keep, keep_final=keep_final, rank=rank,
                                                     method=method).compile()
                calls[v] = functools.partial(compiled, s, cfg)
            outs, times = {}, {v: [] for v in calls}
            for _ in range(rounds):
                for v, c in calls.items():
                    seconds, outs[v] = _timed(c)
                    times[v].append(seconds)
            ref_clusters, ref_labels = np.asarray(outs["dense"][0]), np.asarray(outs["dense"][1])
            for v in calls:
                clusters, labels, k, iters, conv, pconv, dense_iters, low_iters, low_err, lost = (
                    np.asarray(a) for a in outs[v])
                ratios = [t / d for t, d in zip(times[v], times["dense"])]
                row = dict(grid=side, input=name, variant=v, seconds=statistics.median(times[v]),
                           ratio=statistics.median(ratios), K=int(k), iters=int(iters), dense_iters=int(dense_iters),
                           lowrank_iters=int(low_iters), lowrank_error=float(low_err),
                           lost=float(lost), converged=bool(conv) and bool(pconv),
                           same_clusters=bool(np.array_equal(clusters, ref_clusters)),
                           same_labels=bool(np.array_equal(labels, ref_labels)),
                           ari_clusters=adjusted_rand_score(ref_clusters, clusters),
                           ari_labels=adjusted_rand_score(ref_labels, labels))
                rows.append(row)
                print(row, flush=True)
    print()
    print("| grid | input | variant | s / image (median) | ratio to dense (median of rounds) | K | MCL iters (dense "
          "phase, of them low-rank) | low-rank error | dropped mass | converged | same clusters | same labels | "
          "ARI clusters / labels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        phase = f" ({r['dense_iters']}, {r['lowrank_iters']})" if r["dense_iters"] >= 0 else ""
        print(f"| {r['grid']}x{r['grid']} | {r['input']} | {r['variant']} | {r['seconds']:.2f} | {r['ratio']:.2f} | "
              f"{r['K']} | {r['iters']}{phase} | {r['lowrank_error']:.1e} | {r['lost']:.3f} | {r['converged']} | "
              f"{r['same_clusters']} | "
              f"{r['same_labels']} | {r['ari_clusters']:.4f} / {r['ari_labels']:.4f} |")


if __name__ == "__main__":
    app.run(main)
