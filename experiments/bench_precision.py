r"""Reduced precision, measured: bfloat16 and float16 UNets against float32 on the same random-weight models.

    python -m experiments.bench_precision                              # tiny forms x 10 seeds, SSD-1B at 512 px
    python -m experiments.bench_precision --ssd1b_size=0 --seeds=3     # tiny forms only

For each model and weight seed: the float32 model (``bench_pipeline.random_module``: kernels N(0, 1/fan_in), norm
scales 1 + 0.2 N, biases 0.2 N; only the parameters up to the feature tap, as the runner loads SPARK's backbone),
and the same parameters rounded to each reduced dtype, as ``load_backbone`` casts them
(``BackboneConfig.unet_dtype``). The procedural demo images (``data.demo``) go through the random VAE encoder in
float32 (the VAE is float32 for every UNet dtype), the backbone's noise at t = 50 and random prompt embeddings of
the right shapes, then the UNet up to SPARK's feature tap in each dtype (the VAE's last convolution is rescaled
for unit-variance latents, ``bench_pipeline.calibrated_vae``, so that the images, not the noise, dominate). Per image:

  feature rel err   ||f_dtype - f_32||_F / ||f_32||_F of the feature tap (the attn1 output)
  centred           the same error over ||f_32 - mean over tokens of f_32||_F: the part of the features that
                    varies over the image, what SPARK's cosine affinities tell apart
  max-abs rel err   max |f_dtype - f_32| / max |f_32| (the parity tests' convention)
  attention rel err the feature point's attention alone (``attention.dot_product_attention``) on the float32
                    model's q, k, v rounded to the dtype, against float32 on the unrounded ones (Frobenius)
  ARI               adjusted Rand index of SPARK's final token labels (paper preset) on f_dtype against f_32
  K                 SPARK's cluster counts (float32 / dtype)
  cos med           median pairwise cosine of the float32 tokens: near 1, the features are nearly one vector
                    and SPARK's partition is set by the token grid (K ~ 143 of 256 whatever the features), so
                    an ARI of 1 there says nothing
  f32 1e-6          control: float32 on the latents perturbed by 1e-6 relative noise; a model that amplifies
                    any perturbation (deep stacks of sharp random attention do) shows it here too

Each model runs as initialised (``--q_gains`` 1), where attention is nearly uniform and the attn1 output is nearly
the same vector at every token (pairwise cosines 0.995-1.0), and with every ``to_q`` kernel times 4 and 8: more
selective attention, whose output varies over the image (tiny ``sdxl`` x 4: cosines 0.73-0.98; SSD-1B needs x 8 for
a median of 0.84): rounding q and k matters most there, and deep stacks of sharp random attention amplify every
perturbation (the float32 control column).

Models: the tiny UNet forms of the test suite (``tests/unet_forms.FORMS``: SSD-1B-like ``sdxl``, ``sdxl_base``,
``vega``, ``sd1``, ``sd2``) with the tests' tiny VAE, at 512 px (16 x 16 tokens at the feature tap), and SSD-1B's
architecture with the SDXL VAE (``bench_pipeline.ssd1b_configs``) at ``--ssd1b_size`` px. Random weights say
nothing about the activation ranges of trained ones: float16's range (65504) is the risk with trained SDXL-family
weights (their VAE overflows in float16; the UNet is known to run in it), which this cannot measure; ``max |f_32|``
is reported to show how far these models stay from it.

tests/test_precision.py bounds the tiny ``sdxl`` form's errors by 3x the worst measured here over the seeds.

No dtype bug showed: norms take float32 statistics (flax), attention float32 logits and softmax
(``models/attention.py``), and the errors are the formats' own. Checked against diffusers with a scratch script
(2026-12-02; the tiny ``sdxl`` form with diffusers' init and ``to_q`` x 4, latents 64 x 64, feature tap, Frobenius
error against each library's own float32): bfloat16 diffusers 0.53%, spark_jax 0.59% (x 16: 1.15% and 1.02%);
float16 diffusers 0.43%, spark_jax 0.08% (x 16: 0.63% and 0.13%): diffusers' CPU float16 attention rounds its
logits, ours keeps them float32.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench_pipeline import (
    DTYPES,
    TIMESTEP,
    calibrated_vae,
    cast,
    demo_images,
    random_conditioning,
    random_module,
    ssd1b_configs,
)
from spark_jax.backbones.diffusion import compiler_options, latent_taps, precision_context
from spark_jax.config import SparkConfig
from spark_jax.methods.spark import segment_tokens_batch
from spark_jax.models.attention import dot_product_attention
from spark_jax.models.convert import abstract_module, unet_params_for_taps
from spark_jax.models.unet import UNetConfig
from spark_jax.models.vae_encoder import VAEEncoderConfig

TINY_FORMS = ("sdxl", "sdxl_base", "vega", "sd1", "sd2")
TINY_SIZE = 512  # the tests' tiny VAE downscales 8x, the forms 4x before the feature tap: 16 x 16 tokens


def tiny_configs(form: str) -> tuple[UNetConfig, VAEEncoderConfig, dict[str, Any]]:
    """A tiny test form's UNet, the tests' tiny VAE and SDXL's scheduler (the test suite's tiny pipelines)."""
    from experiments.bench_backbone import SCHEDULER

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:  # the test helpers import each other by their bare module names
        sys.path.insert(0, tests)
    from test_backbone_helpers import VAE
    from unet_forms import FORMS

    return UNetConfig.from_diffusers(FORMS[form]), VAEEncoderConfig.from_diffusers(VAE), SCHEDULER


@functools.lru_cache(maxsize=16)
def _programs(unet_cfg: UNetConfig, vae_cfg: VAEEncoderConfig):
    """The jitted VAE, UNet and attention programs of an architecture (compiled once per shape and dtype, reused
    by every seed: the parameters are arguments)."""
    vae_graph, unet_graph = abstract_module(vae_cfg)[0], abstract_module(unet_cfg)[0]
    attn = unet_cfg.feature_tap.rsplit(":", 1)[0]
    taps = (unet_cfg.feature_tap, f"{attn}:q", f"{attn}:k", f"{attn}:v")
    options = compiler_options(jax.devices()[0].platform)

    def vae(params, prepared):
        with precision_context("highest"):
            return nnx.merge(vae_graph, params)(2.0 * prepared - 1.0)

    def unet(params, cond, latents, *, unet_dtype):
        return latent_taps(nnx.merge(unet_graph, params), latents, cond, taps=taps, timestep=TIMESTEP,
                           unet_dtype=DTYPES[unet_dtype], matmul_precision="highest")

    def attention(q, k, v, *, dtype):  # taps [B, heads, N, d] -> the attention's [B, N, heads, d]
        q, k, v = (x.transpose(0, 2, 1, 3).astype(DTYPES[dtype]) for x in (q, k, v))
        with precision_context("highest"):
            return dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5).astype(jnp.float32)

    return (jax.jit(vae, compiler_options=options),
            jax.jit(unet, static_argnames="unet_dtype", compiler_options=options),
            jax.jit(attention, static_argnames="dtype", compiler_options=options), taps)


def _rel_fro(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per image (leading axis): ||x - ref||_F / ||ref||_F."""
    axes = tuple(range(1, ref.ndim))
    return np.sqrt(((x - ref) ** 2).sum(axes) / (ref**2).sum(axes))


def _max_abs_rel(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, ref.ndim))
    return np.abs(x - ref).max(axes) / np.abs(ref).max(axes)


def _scale_queries(params: nnx.State, gain: float) -> nnx.State:
    """Every attention's ``to_q`` kernel times ``gain``: logits ``gain`` times larger, a more selective softmax."""
    def scale(path, x):
        return x * gain if x.size and any(getattr(k, "key", None) == "to_q" for k in path) else x

    return jax.tree_util.tree_map_with_path(scale, params)


def measure(unet_cfg: UNetConfig, vae_cfg: VAEEncoderConfig, scheduler: dict[str, Any], *, size: int,
            num_images: int, seed: int, dtypes: Sequence[str] = ("bfloat16", "float16"), q_gain: float = 1.0,
            spark: SparkConfig = SparkConfig()) -> dict[str, dict[str, list[float]]]:
    """Errors of each reduced dtype against float32 on one random model (weights from ``seed``), per image.

    Args:
      q_gain: factor on every ``to_q`` kernel. At 1 (the plain random init) attention is nearly uniform, so the
        attn1 output is nearly the same vector at every token (pairwise cosines 0.995-1.0 on the tiny ``sdxl``
        form); at 4 the softmax is selective and the feature tap varies over the image (cosines 0.73-0.98), the
        regime where rounding q and k moves the features most.

    Returns:
      ``{dtype: {"feature_rel_err", "feature_rel_err_centred" (the error over the norm of the features minus
      their mean over tokens: the part that varies over the image, what SPARK's affinities see),
      "feature_max_abs_rel_err", "attention_rel_err", "ari", "k_float32", "k", "nonfinite_tokens",
      "max_abs_feature": [one value per image]}}``.
    """
    from sklearn.metrics import adjusted_rand_score

    tap = unet_cfg.feature_tap
    vae = calibrated_vae(vae_cfg, seed=seed)
    unet = random_module(unet_cfg, seed=seed + 1, keep=unet_params_for_taps(unet_cfg, (tap,)).__contains__)
    _, vae_params = nnx.split(vae)
    _, params32 = nnx.split(unet)
    if q_gain != 1.0:
        params32 = _scale_queries(params32, q_gain)
    vae_fn, unet_fn, attn_fn, taps = _programs(unet_cfg, vae_cfg)
    latents = vae_fn(vae_params, demo_images(size, num_images))
    latent_hw = tuple(latents.shape[1:3])
    cond = random_conditioning(unet_cfg, scheduler, latent_hw=latent_hw, size=size, seed=seed)
    grid = unet_cfg.tap_grid(tap, latent_hw)

    def run(dtype: str):
        params = params32 if dtype == "float32" else cast(params32, DTYPES[dtype])
        out = unet_fn(params, cond, latents, unet_dtype=dtype)
        feats = out[tap].reshape(num_images, *grid, -1)
        return np.asarray(feats), out

    f32, out32 = run("float32")
    # Control: float32 again on latents perturbed by 1e-6 relative noise. A model that amplifies any perturbation
    # (deep stacks of sharp attention do) shows it here as well as in the reduced dtypes.
    noise = jax.random.normal(jax.random.key(seed), latents.shape, latents.dtype)
    control = np.asarray(unet_fn(params32, cond, latents * (1 + 1e-6 * noise), unet_dtype="float32")[tap])
    control_err = _rel_fro(control.reshape(f32.shape), f32)
    seg32 = segment_tokens_batch(jnp.asarray(f32), spark)
    labels32 = np.asarray(seg32.labels).reshape(num_images, -1)
    attn32 = np.asarray(attn_fn(out32[taps[1]], out32[taps[2]], out32[taps[3]], dtype="float32"))
    # Median pairwise cosine of the float32 tokens: near 1, the features are one vector everywhere and SPARK's
    # partition is set by the token grid, not by them (an ARI of 1 then says nothing).
    unit = f32.reshape(num_images, -1, f32.shape[-1]) / np.linalg.norm(f32.reshape(num_images, -1, f32.shape[-1]),
                                                                         axis=-1, keepdims=True)
    cosines = np.median(np.einsum("bnc,bmc->bnm", unit, unit).reshape(num_images, -1), axis=-1)
    result = {}
    for dtype in dtypes:
        f, _ = run(dtype)
        finite = np.all(np.isfinite(f), axis=-1)
        seg = segment_tokens_batch(jnp.asarray(f), spark)
        labels = np.asarray(seg.labels).reshape(num_images, -1)
        attn = np.asarray(attn_fn(out32[taps[1]], out32[taps[2]], out32[taps[3]], dtype=dtype))
        result[dtype] = dict(
            feature_rel_err=_rel_fro(f, f32).tolist(),
            feature_rel_err_centred=_rel_fro(f - f32.mean((1, 2), keepdims=True),
                                             f32 - f32.mean((1, 2), keepdims=True)).tolist(),
            feature_max_abs_rel_err=_max_abs_rel(f, f32).tolist(),
            attention_rel_err=_rel_fro(attn, attn32).tolist(),
            ari=[float(adjusted_rand_score(a, b)) for a, b in zip(labels32, labels)],
            k_float32=np.asarray(seg32.num_clusters).tolist(),
            k=np.asarray(seg.num_clusters).tolist(),
            nonfinite_tokens=(~finite).reshape(num_images, -1).sum(-1).tolist(),
            max_abs_feature=np.abs(f32).reshape(num_images, -1).max(-1).tolist(),
            cosine_median=cosines.tolist(),
            control_rel_err=control_err.tolist(),
        )
    return result


def summarize(per_seed: list[dict[str, dict[str, list[float]]]]) -> dict[str, dict[str, float]]:
    """Worst and typical values over seeds x images, per dtype."""
    out = {}
    for dtype in per_seed[0]:
        pool = {k: [v for r in per_seed for v in r[dtype][k]] for k in per_seed[0][dtype]}
        out[dtype] = dict(
            images=len(pool["ari"]),
            feature_rel_err_median=statistics.median(pool["feature_rel_err"]),
            feature_rel_err_max=max(pool["feature_rel_err"]),
            feature_rel_err_centred_max=max(pool["feature_rel_err_centred"]),
            feature_max_abs_rel_err_max=max(pool["feature_max_abs_rel_err"]),
            attention_rel_err_max=max(pool["attention_rel_err"]),
            ari_median=statistics.median(pool["ari"]),
            ari_min=min(pool["ari"]),
            k_float32_mean=float(np.mean(pool["k_float32"])),
            k_mean=float(np.mean(pool["k"])),
            nonfinite_tokens=int(sum(pool["nonfinite_tokens"])),
            max_abs_feature=max(pool["max_abs_feature"]),
            cosine_median=statistics.median(pool["cosine_median"]),
            control_rel_err_max=max(pool["control_rel_err"]),
        )
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'model':>10} {'q gain':>6} {'px':>5} {'tokens':>6} {'dtype':>9} {'images':>6} "
            f"{'feat rel (med / max)':>21} {'centred max':>11} {'max-abs rel':>11} {'attn rel':>9} "
            f"{'ARI (med / min)':>16} {'K f32 / dt':>11} {'nonfin':>6} {'max|f32|':>9} {'cos med':>7} {'f32 1e-6':>8}")
    lines = [head]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"{r['model']:>10} {r['q_gain']:>6g} {r['size']:>5} {r['tokens']:>6} {r['dtype']:>9} {s['images']:>6} "
            f"{s['feature_rel_err_median']:10.2e} / {s['feature_rel_err_max']:8.2e} "
            f"{s['feature_rel_err_centred_max']:11.2e} {s['feature_max_abs_rel_err_max']:11.2e} "
            f"{s['attention_rel_err_max']:9.2e} {s['ari_median']:7.3f} / {s['ari_min']:6.3f} "
            f"{s['k_float32_mean']:5.1f} / {s['k_mean']:4.1f} {s['nonfinite_tokens']:6d} {s['max_abs_feature']:9.3g} "
            f"{s['cosine_median']:7.3f} {s['control_rel_err_max']:8.1e}")
    return "\n".join(lines)


def run(models: Sequence[tuple[str, Callable[[], tuple], int, int, Sequence[int]]], dtypes: Sequence[str],
        q_gains: Sequence[float] = (1.0, 4.0, 8.0), log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``models``: (name, configs(), size, images, seeds) -> one row per (model, q gain, dtype) with per-seed
    values."""
    rows = []
    for name, configs, size, num_images, seeds in models:
        unet_cfg, vae_cfg, scheduler = configs()
        grid = unet_cfg.tap_grid(unet_cfg.feature_tap, (size // vae_cfg.downscale,) * 2)
        for gain in q_gains:
            per_seed = []
            for seed in seeds:
                t0 = time.perf_counter()
                per_seed.append(measure(unet_cfg, vae_cfg, scheduler, size=size, num_images=num_images, seed=seed,
                                        dtypes=dtypes, q_gain=gain))
                log(f"{name} q gain {gain:g} seed {seed}: {time.perf_counter() - t0:.1f} s")
            summary = summarize(per_seed)
            for dtype in dtypes:
                rows.append(dict(model=name, q_gain=gain, size=size, tokens=grid[0] * grid[1], dtype=dtype,
                                 seeds=list(seeds), summary=summary[dtype], per_seed=[r[dtype] for r in per_seed]))
    return rows


def main(argv):
    del argv
    F = _FLAGS
    seeds = list(range(F.seeds))
    models = [(form, functools.partial(tiny_configs, form), TINY_SIZE, F.images, seeds) for form in F.forms]
    if F.ssd1b_size:
        models.append(("ssd1b", ssd1b_configs, F.ssd1b_size, F.ssd1b_images, list(range(F.ssd1b_seeds))))
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    rows = run(models, F.dtypes, [float(g) for g in F.q_gains], log)
    print()
    print(format_table(rows))
    device = jax.devices()[0]
    Path(F.output).write_text(json.dumps(dict(device=dict(platform=device.platform, kind=device.device_kind,
                                                          jax=jax.__version__), rows=rows), indent=1))
    print(f"written: {F.output}")


def _define_flags():
    from absl import flags

    flags.DEFINE_list("forms", list(TINY_FORMS), "Tiny test forms to measure (tests/unet_forms.FORMS).")
    flags.DEFINE_integer("seeds", 10, "Weight seeds per tiny form.")
    flags.DEFINE_integer("images", 2, "Demo images per seed (tiny forms).")
    flags.DEFINE_integer("ssd1b_size", 512, "Image side for the SSD-1B-architecture model (0: leave it out).")
    flags.DEFINE_integer("ssd1b_images", 2, "Demo images for the SSD-1B-architecture model.")
    flags.DEFINE_integer("ssd1b_seeds", 1, "Weight seeds for the SSD-1B-architecture model.")
    flags.DEFINE_list("dtypes", ["bfloat16", "float16"], "Reduced UNet dtypes compared with float32.")
    flags.DEFINE_list("q_gains", ["1", "4", "8"], "Factors on every to_q kernel (1: the plain init's nearly "
                      "uniform attention; 4, 8: more selective ones).")
    flags.DEFINE_string("output", "bench_precision.json", "Where the JSON result is written.")
    return flags.FLAGS


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()
    sys.setrecursionlimit(10000)
    app.run(main)
