"""Benchmark: the attention methods (random-walk NCut, DiffSeg) next to SPARK and DiffCut, on the same image.

    python -m experiments.bench_methods                      # 5 interleaved rounds
    python -m experiments.bench_methods --rounds=9 --methods=spark,rwncut

One image of planted regions (`spark_jax.testing.synthetic.planted_token_features` on a 64 x 64 grid, `--channels`
channels, `--noise`) stands for the backbone's output at each method's default size:

  spark, diffcut  the feature tap at SSD-1B's feature point: the 64 x 64 features average-pooled to 32 x 32
                  (N = 1024 tokens), SPARK with the paper's preset (the one `ssd1b` runs get), DiffCut's defaults
  rwncut          the same 32 x 32 tokens' attention probabilities, softmax over j of `--attention_scale` x
                  cos(x_i, x_j) (P [1024, 1024]), the default config (random_walk, dynamic stopping)
  diffseg         DiffSeg's default size (SD 1.x at 512 px): 16 attn1 maps of the same image, the features pooled
                  to each layer's grid (64 x 64: 5 maps, 32 x 32: 5, 16 x 16: 5, 8 x 8: 1), each the softmax of
                  scaled cosines; aggregation to 64 x 64 (N = 4096) and merging, the default config
                  (`--methods` without diffseg when spark_jax/methods/diffseg.py is absent)

Every method is called as the runner calls it (its spec's jitted function on `MethodInputs`, labels at
`--mask_size`), compiled ahead of time (compile time printed). The rounds interleave the methods (one call of each
per round, the order rotated each round): this shared VM's speed drifts by up to 40% within minutes, so a ratio is
taken within a round and the median over rounds is reported. Peak memory: XLA's plan of each compiled program
(arguments + outputs + temporaries, `Compiled.memory_analysis()`), and on GPU/TPU the device's peak bytes in use
measured around the calls (`Device.memory_stats()`, not available on CPU).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from spark_jax.evaluation import confusion, iou_from_counts, match_counts
from spark_jax.methods import REGISTRY, MethodContext, MethodInputs, method_spec
from spark_jax.testing.synthetic import planted_token_features

FEATURE_TAP = "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"  # SSD-1B's feature point
ATTENTION_TAP = FEATURE_TAP.replace(":output", ":probs_mean")
# DiffSeg's 16 SD 1.x attn1 layers at 512 px: (module path, grid side).
SD1_ATTN1 = (
    *[(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1", 64 >> b) for b in range(3) for a in range(2)],
    ("mid_block.attentions.0.transformer_blocks.0.attn1", 8),
    *[(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1", 8 << b) for b in range(1, 4) for a in range(3)],
)
DEFAULT_METHODS = [m for m in ("spark", "diffcut", "rwncut", "diffseg") if m in REGISTRY]

_METHODS = flags.DEFINE_list("methods", DEFAULT_METHODS, "Methods to time (registered names).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (one call of every method per round).")
_CHANNELS = flags.DEFINE_integer("channels", 1280, "Feature channels (SSD-1B's feature point: 1280).")
_NOISE = flags.DEFINE_float("noise", 0.5, "Noise of the planted features (relative to unit means).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the planted features.")
_SCALE = flags.DEFINE_float("attention_scale", 8.0, "Logit scale of the synthetic attention (x cosine).")
_MASK = flags.DEFINE_integer("mask_size", 128, "Side of the label maps (the runner's default).")


def _pool(x: np.ndarray, side: int) -> np.ndarray:
    """Average-pool [S, S, C] to [side, side, C]."""
    f = x.shape[0] // side
    return x.reshape(side, f, side, f, -1).mean(axis=(1, 3))


def _attention(x: np.ndarray, scale: float) -> np.ndarray:
    """softmax over j of scale * cos(x_i, x_j): [h, w, C] -> [N, N] float32."""
    t = x.reshape(-1, x.shape[-1]).astype(np.float64)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    logits = scale * t @ t.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def planted_inputs() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every tap the benchmarked methods read, of one planted image, and the regions on the 32 x 32 grid."""
    x64, layout64 = planted_token_features(_SEED.value, 64, 64, _CHANNELS.value, _NOISE.value)
    x32 = _pool(x64, 32)
    taps = {FEATURE_TAP: x32.reshape(1, 32 * 32, -1), ATTENTION_TAP: _attention(x32, _SCALE.value)[None]}
    for module, side in SD1_ATTN1:
        taps[f"{module}:probs_mean"] = _attention(_pool(x64, side), _SCALE.value)[None]
    return taps, layout64[::2, ::2]


class _Backbone:
    """What the specs' `taps` read of a backbone: the feature tap and the tap names."""

    feature_tap = FEATURE_TAP

    def tap_names(self) -> tuple[str, ...]:
        return (FEATURE_TAP, ATTENTION_TAP, *(f"{m}:probs_mean" for m, _ in SD1_ATTN1))


def _config(name: str):
    spec = method_spec(name)
    return spec.resolve_config(None, "ssd1b")  # SPARK: the paper preset an SSD-1B run gets


def compiled_call(name: str, taps: dict[str, np.ndarray]):
    """(call without arguments, compile seconds, XLA's planned bytes) of a method as the runner calls it."""
    spec = method_spec(name)
    config = _config(name)
    wanted = spec.taps(config, _Backbone())
    features = jnp.asarray(taps[FEATURE_TAP]).reshape(1, 32, 32, -1)
    inputs = MethodInputs(features=features, taps={t: jnp.asarray(taps[t]) for t in wanted},
                          images=jnp.zeros((1, 512, 512, 3), jnp.float32), num_classes=jnp.asarray([0], jnp.int32),
                          index=jnp.zeros((1,), jnp.int32))
    ctx = MethodContext(mask_size=_MASK.value, upsampling=spec.upsampling, feature_tap=FEATURE_TAP)
    params = spec.params(config, ctx, (32, 32))
    start = time.perf_counter()
    compiled = jax.jit(spec.build(ctx)).lower(inputs, params).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    planned = None
    if mem is not None:
        planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
    return (lambda: compiled(inputs, params)), seconds, planned


def _miou(pred: np.ndarray, layout: np.ndarray) -> float:
    """One-to-one Hungarian mIoU of a label map against the planted regions (the label map resized to them)."""
    f = pred.shape[0] // layout.shape[0]
    pred = pred[f // 2::f, f // 2::f] if f >= 1 else pred
    _, pred = np.unique(pred, return_inverse=True)
    hist = confusion(layout, pred.reshape(layout.shape), int(max(layout.max(), pred.max())) + 1)
    tp, fp, fn, _ = match_counts(hist)
    return float(np.nanmean(iou_from_counts(tp, fp, fn)))


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def main(argv):
    del argv
    unknown = sorted(set(_METHODS.value) - set(REGISTRY))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; registered: {', '.join(REGISTRY)}"
                             + ("" if "diffseg" in REGISTRY else " (diffseg: spark_jax/methods/diffseg.py absent)"))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})", flush=True)
    taps, layout = planted_inputs()
    calls, planned, device_peak = {}, {}, {}
    for name in _METHODS.value:
        call, seconds, planned[name] = compiled_call(name, taps)
        labels, diag = jax.block_until_ready(call())  # warm-up
        labels = np.asarray(labels)[0]
        print(f"  {name:<8} compiled in {seconds:5.1f} s; segments {len(np.unique(labels)):3d}, planted mIoU "
              f"{_miou(labels, layout):.3f}; "
              + " ".join(f"{k}={np.asarray(v)[0].item():g}" for k, v in diag.items()), flush=True)
        calls[name] = call
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(_ROUNDS.value):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            before = _peak_bytes()
            start = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - start)
            after = _peak_bytes()
            if after is not None:
                device_peak[name] = max(device_peak.get(name, 0), after - (before or 0))
        print(f"  round {r + 1}/{_ROUNDS.value}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names),
              flush=True)
    ref = "spark" if "spark" in times else names[0]
    print(f"\n== per image (batch 1), {_ROUNDS.value} interleaved rounds; ratio = median over rounds of "
          f"time / {ref}'s time in the same round")
    print(f"{'method':<8} {'median s':>9} {'min s':>8} {'x ' + ref:>9} {'x diffcut':>10} {'XLA plan MiB':>13}"
          f" {'device peak MiB':>16}")
    for name in names:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[ref]))
        vs_diffcut = (f"{statistics.median(a / b for a, b in zip(times[name], times['diffcut'])):10.2f}"
                      if "diffcut" in times else f"{'-':>10}")
        plan = f"{planned[name] / 2**20:13.1f}" if planned[name] is not None else f"{'-':>13}"
        peak = f"{device_peak[name] / 2**20:16.1f}" if name in device_peak else f"{'- (cpu)':>16}"
        print(f"{name:<8} {statistics.median(times[name]):9.3f} {min(times[name]):8.3f} {ratio:9.2f} {vs_diffcut}"
              f" {plan} {peak}")


if __name__ == "__main__":
    app.run(main)
