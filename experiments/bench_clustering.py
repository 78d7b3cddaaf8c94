"""Benchmark: jitted SPARK clustering vs the NumPy transcription, on the same planted features.

    python -m experiments.bench_clustering                       # 32x32 and 64x64, batch 1 and 8
    python -m experiments.bench_clustering --grids=32 --batches=1,8

For each token grid and batch size it times, after compilation:
  * jax `segment_tokens_batch` (affinity + Markov flow + propagation, closed-form Eq. 11),
  * jax one image at a time (`chunk_size=1`): a vmapped while_loop runs every image until the
    slowest converges, which a CPU pays for in full,
  * jax with the fixed-point propagation of Eq. 10 and with a bounded number of label columns
    (32x32 only: the label-column choices of reference-facts section 9),
  * the NumPy transcription (`spark_jax.testing.numpy_reference`, float64, iterative propagation with
    exactly K columns) on the same images, image by image: its MCL + propagation only (S is
    built outside the timer), so the ratio is conservative: the JAX time includes building S.
Memory: XLA's own accounting of the compiled program (arguments + outputs + temporaries) for
JAX, tracemalloc's peak for NumPy. Both implementations run with the settings of the planted
tests (sharpen 8, beta 0.8, r 1.8), for which they converge to the same 5 regions.
"""

from __future__ import annotations

import time
import tracemalloc

import jax
import numpy as np
from absl import app, flags

from spark_jax.testing import numpy_reference as ref
from spark_jax.config import SparkConfig
from spark_jax.methods.spark import segment_tokens_batch
from spark_jax.testing.synthetic import planted_token_features

_GRIDS = flags.DEFINE_list("grids", ["32", "64"], "Token grid sides.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Feature channels.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of the JAX call (best is reported).")
_NUMPY_IMAGES = flags.DEFINE_integer(
    "numpy_images_64", 1,
    "At grids >= 64 the NumPy transcription takes minutes per image: time this many images and "
    "scale to the batch (marked 'scaled' in the table).",
)

CFG = SparkConfig(beta=0.8, sharpen=8.0, inflation=1.8)


def _best_time(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _xla_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def time_jax(features: np.ndarray, cfg: SparkConfig, repeats: int, chunk_size: int | None = None):
    # segment_tokens_batch validates on the host, then runs its jitted program; jit it whole to lower it.
    compiled = jax.jit(segment_tokens_batch, static_argnames="chunk_size").lower(features, cfg, chunk_size=chunk_size).compile()
    out = compiled(features, cfg)  # warm-up
    jax.block_until_ready(out)
    seconds = _best_time(lambda: compiled(features, cfg), repeats)
    return seconds, _xla_bytes(compiled), out


def time_numpy(features: np.ndarray, cfg: SparkConfig, images: int):
    """Times the transcription's clustering (MCL + propagation) apart from building S, whose
    token-by-token Python loop (Eq. 3) would otherwise dominate and flatter the ratio."""
    tracemalloc.start()
    cluster_seconds = 0.0
    labels = []
    for x in features[:images]:
        s = ref.transition_matrix(x, beta=cfg.beta, eps=cfg.local_eps, sharpen=cfg.sharpen)
        start = time.perf_counter()
        p, _, _ = ref.mcl(s, cfg.expansion, cfg.inflation, cfg.prune_threshold, cfg.mcl_tol, cfg.mcl_max_iter)
        coarse, k = ref.clusters(p)
        _, final, _ = ref.propagate(s, coarse, k, cfg.gamma, method="iterative")
        cluster_seconds += time.perf_counter() - start
        labels.append(final.reshape(x.shape[:2]))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return cluster_seconds, peak, labels


def main(argv):
    del argv
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, numpy {np.__version__}; "
          f"config: sharpen={CFG.sharpen}, beta={CFG.beta}, r={CFG.inflation}, gamma={CFG.gamma}")
    rows = []
    for side in (int(g) for g in _GRIDS.value):
        for batch in (int(b) for b in _BATCHES.value):
            features = np.stack(
                [planted_token_features(seed, side, side, _CHANNELS.value, noise=0.4)[0] for seed in range(batch)]
            )
            print(f"-- {side}x{side} tokens (N={side * side}), batch {batch}", flush=True)
            variants = [("jax closed-form", CFG, None)]
            if batch > 1:
                variants.append(("jax closed-form, chunk_size=1", CFG, 1))
            if side <= 32:
                variants += [
                    ("jax fixed-point", CFG.replace(propagation="iterative"), None),
                    ("jax closed-form, 64 columns", CFG.replace(max_clusters=64), None),
                ]
            jax_results = []
            for name, cfg, chunk_size in variants:
                seconds, nbytes, out = time_jax(features, cfg, _REPEATS.value, chunk_size)
                jax_results.append((name, seconds, nbytes, out))
                print(f"   {name}: {seconds:.3f}s, {nbytes / 2**20:.0f} MiB, "
                      f"K={np.asarray(out.num_clusters).tolist()}, MCL iters={np.asarray(out.mcl_iterations).tolist()}",
                      flush=True)
            np_images = batch if side < 64 else min(batch, _NUMPY_IMAGES.value)
            np_seconds, np_peak, np_outs = time_numpy(features, CFG, np_images)
            scaled = np_seconds * batch / np_images
            agree = all(
                np.array_equal(np.asarray(jax_results[0][3].labels[i]), labels)
                for i, labels in enumerate(np_outs)
            )
            print(f"   numpy MCL + propagation: {np_seconds:.3f}s for {np_images} image(s), peak {np_peak / 2**20:.0f} MiB, "
                  f"labels equal to jax: {agree}", flush=True)
            for name, seconds, nbytes, _ in jax_results:
                rows.append((side, batch, name, seconds, nbytes, scaled, np_images < batch, np_peak, agree))

    print()
    print("| grid | batch | jax variant (all of it) | jax s | jax MiB | numpy MCL+prop s | numpy peak MiB | speed-up | same labels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for side, batch, name, seconds, nbytes, np_s, was_scaled, np_peak, agree in rows:
        np_text = f"{np_s:.2f}" + (" (scaled)" if was_scaled else "")
        print(f"| {side}x{side} | {batch} | {name} | {seconds:.3f} | {nbytes / 2**20:.0f} | {np_text} | "
              f"{np_peak / 2**20:.0f} | {np_s / seconds:.1f}x | {'yes' if agree else 'no'} |")


if __name__ == "__main__":
    app.run(main)
