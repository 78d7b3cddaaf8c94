"""Behaviour map of SPARK on planted token features: K, MCL iterations and mIoU over a grid.

Sweeps inflation r, fusion weight beta and the global-affinity sharpening at several noise
levels: fixed exponents (`--sharpen`, Eq. 1 raised to a power) and the automatic per-image
exponent (`--targets`: `sharpen_mode='entropy'`, effective neighbours per token as a fraction of
the tokens). Each (noise level, sharpening) pair is one vmapped call over the (r, beta) grid:
the numeric hyperparameters are pytree leaves of SparkConfig, so the grid is a batch axis.

    python -m experiments.behaviour_map                      # 24x24 tokens, 450 settings
    python -m experiments.behaviour_map --grid=32 --seeds=3  # SSD-1B's grid (slow on a CPU)

A vmapped while_loop runs until its slowest member converges, so low r (slow convergence)
sets the pace of each call.

Prints one table row per setting (mean over seeds) and, per noise level, the best setting, the
best of each sharpening mode, and how often the automatic sharpening matches or beats the best
fixed exponent at the same (r, beta).
"""

from __future__ import annotations

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from spark_jax.config import SparkConfig
from spark_jax.methods.spark import segment_tokens
from spark_jax.testing.synthetic import NUM_PLANTED_REGIONS, planted_miou, planted_token_features

_GRID = flags.DEFINE_integer("grid", 24, "Token grid side (SSD-1B at 1024 px gives 32; 24 keeps the default run short).")
_CHANNELS = flags.DEFINE_integer("channels", 64, "Feature channels of the planted features.")
_NOISE = flags.DEFINE_list("noise", ["0.2", "0.5", "0.8"], "Noise levels (relative to unit-norm means).")
_INFLATION = flags.DEFINE_list("inflation", ["1.5", "1.8", "2.2", "2.6", "3.0"], "Values of r.")
_BETA = flags.DEFINE_list("beta", ["0.0", "0.4", "0.6", "0.8", "1.0"], "Values of beta.")
_SHARPEN = flags.DEFINE_list("sharpen", ["1", "4", "8"], "Values of the fixed sharpening exponent.")
_TARGETS = flags.DEFINE_list("targets", ["0.05", "0.2", "0.4"],
                             "Entropy targets of the automatic sharpening (fractions of the tokens).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Planted feature draws per noise level.")

def sharpening(label: str) -> SparkConfig:
    """The SparkConfig of a sharpening label: 'fixed <p>' or 'entropy <target>'."""
    mode, value = label.split()
    if mode == "entropy":
        return SparkConfig(sharpen_mode="entropy", sharpen_target=float(value))
    return SparkConfig(sharpen=float(value))


def sweep(features: np.ndarray, sharpen: str, rs: list[float], betas: list[float]):
    """One vmapped call over the (r, beta) grid at one sharpening label; returns the batched SegmentResult."""
    r_grid, beta_grid = (jnp.asarray(v, jnp.float32) for v in zip(*itertools.product(rs, betas)))
    base = sharpening(sharpen)
    grid = base.replace(inflation=r_grid, beta=beta_grid)
    axes = jax.tree_util.tree_map(lambda _: None, base).replace(inflation=0, beta=0)
    return jax.jit(jax.vmap(segment_tokens, in_axes=(None, axes)))(features, grid)


def main(argv):
    del argv
    rs = [float(v) for v in _INFLATION.value]
    betas = [float(v) for v in _BETA.value]
    sharpens = [f"fixed {float(v):g}" for v in _SHARPEN.value] + [f"entropy {float(v):g}" for v in _TARGETS.value]
    noises = [float(v) for v in _NOISE.value]
    side = _GRID.value
    print(f"planted {side}x{side} tokens, {_CHANNELS.value} channels, {_SEEDS.value} seeds; "
          f"{len(rs) * len(betas)} (r, beta) settings per vmapped call")
    rows = []
    start = time.perf_counter()
    for noise, sharpen in itertools.product(noises, sharpens):
        per_seed = []
        for seed in range(_SEEDS.value):
            features, gt = planted_token_features(seed, side, side, _CHANNELS.value, noise=noise)
            out = jax.device_get(sweep(features, sharpen, rs, betas))
            per_seed.append(
                [
                    (int(out.num_clusters[i]), int(out.mcl_iterations[i]), bool(out.mcl_converged[i]),
                     planted_miou(out.labels[i], gt))
                    for i in range(len(rs) * len(betas))
                ]
            )
        for i, (r, beta) in enumerate(itertools.product(rs, betas)):
            ks, iters, conv, mious = zip(*(seed_rows[i] for seed_rows in per_seed))
            rows.append((noise, sharpen, r, beta, np.mean(ks), np.mean(iters), all(conv), np.mean(mious)))
        print(f"  noise={noise} sharpening={sharpen} done ({time.perf_counter() - start:.0f}s)", flush=True)

    print()
    print("| noise | sharpening | r | beta | K | MCL iters | converged | mIoU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for noise, sharpen, r, beta, k, it, conv, miou in rows:
        print(f"| {noise:g} | {sharpen} | {r:g} | {beta:g} | {k:.1f} | {it:.1f} | {'yes' if conv else 'NO'} | {miou:.3f} |")
    print()
    print(f"true number of regions: {NUM_PLANTED_REGIONS}")
    for noise in noises:
        at = [row for row in rows if row[0] == noise]
        best = max(at, key=lambda row: row[-1])
        paper = [row for row in at if row[1] == "fixed 1" and row[2] == 2.6 and row[3] == 0.6]
        line = f"noise {noise:g}: best mIoU {best[-1]:.3f} at {best[1]}, r={best[2]:g}, beta={best[3]:g} (K={best[4]:.1f})"
        if paper:
            line += f"; paper defaults (sharpen 1, r 2.6, beta 0.6): mIoU {paper[0][-1]:.3f}, K={paper[0][4]:.1f}"
        print(line)
        for mode in ("fixed", "entropy"):
            of_mode = [row for row in at if row[1].startswith(mode)]
            if of_mode:
                b = max(of_mode, key=lambda row: row[-1])
                mean = np.mean([row[-1] for row in of_mode])
                print(f"  best {mode}: mIoU {b[-1]:.3f} at {b[1]}, r={b[2]:g}, beta={b[3]:g} (K={b[4]:.1f}); "
                      f"mean over its {len(of_mode)} settings {mean:.3f}")
        # Per (r, beta): the best automatic target against the best fixed exponent.
        wins = ties = total = 0
        for r, beta in itertools.product(rs, betas):
            cell = [row for row in at if row[2] == r and row[3] == beta]
            fixed = [row[-1] for row in cell if row[1].startswith("fixed")]
            auto = [row[-1] for row in cell if row[1].startswith("entropy")]
            if fixed and auto:
                total += 1
                wins += max(auto) > max(fixed) + 1e-3
                ties += abs(max(auto) - max(fixed)) <= 1e-3
        if total:
            print(f"  per (r, beta), best entropy target vs best fixed exponent: {wins} better, {ties} level, "
                  f"{total - wins - ties} worse (of {total})")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    app.run(main)
