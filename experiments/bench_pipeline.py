r"""Benchmark for any accelerator: end-to-end images/s of backbone + SPARK + upsampling + PAMR.

    python -m experiments.bench_pipeline                         # a GPU/TPU: 1024 px, float32 + bfloat16, batches 1..32
    python -m experiments.bench_pipeline --size=256 --batch_sizes=1,2 --time_budget_s=1800   # a CPU

The model is SSD-1B's architecture (``experiments.bench_backbone.SSD1B_UNET``, the SDXL VAE) with random weights,
built from the configs alone: no download, no torch, no diffusers (``random_module``: every kernel N(0, 1/fan_in),
norm scales 1 + 0.2 N, biases 0.2 N, drawn with numpy from ``--seed``; the VAE's last convolution rescaled for
unit-variance latents, ``calibrated_vae``). Only the UNet parameters the forward reads
up to SPARK's feature tap are held, as the runner loads SSD-1B for SPARK (``convert.unet_params_for_taps``). The
prompt conditioning is random with the right shapes (77 x 2048 tokens, a 1280-wide pooled embedding), the noise is
``shared_noise(seed)`` at t = 50 of SDXL's schedule; SPARK runs with the paper's settings (the ``paper`` preset),
masks at 128 x 128, PAMR with the reference's settings and ``pipeline.segment``'s data-sized label capacity.
Images: 8 procedural demo images (``data.demo.demo_image``) of side size + 1, repeated to fill a batch, prepared
(center crop, resize to ``--size``) on the device before timing; decoding and preparation are the input pipeline's
cost and are not timed here.

Stages, each its own compiled program (``pipeline.segment`` runs the same functions; it fuses SPARK and the
upsampling into one program): ``vae`` (VAE encoder, float32), ``unet`` (noise + UNet to the feature tap in the
UNet dtype: ``diffusion.latent_features``), ``spark`` (``segment_tokens_batch``, vmapped), ``upsample`` (soft
labels to the mask size, argmax), ``pamr`` (refinement on the image resized to the mask size). The backbone is
vae + unet. One timed round runs the stages in order, each synced (``block_until_ready``), with the one host
read ``segment`` also makes (the largest segment count, to size PAMR); images/s is batch / median round time.
The VAE, SPARK, upsampling and PAMR programs are the same for every UNet dtype and are compiled once per batch
size. Compilation is ahead of time (``jit(...).lower(...).compile()``), timed apart from the rounds; compiler
options come from ``diffusion.compiler_options(platform)``: XLA:CPU's only on CPUs, none on GPUs and TPUs.

Time box: ``--time_budget_s`` (default 270 s, from the process start) is checked before every configuration (dtype,
batch). A configuration's cost is estimated from the last one measured (compile times as measured, execution scaled
by the batch ratio); with too little time left the timed rounds are reduced to one, then the configuration (and
every larger one of that dtype) is skipped and listed as skipped with the reason. A configuration that fails (e.g.
out of memory) is listed with its error, and the run goes on. Configurations run in increasing batch size, both
dtypes at each, so ``peak_gb`` (the device's peak bytes in use so far: ``Device.memory_stats()``; the
process's peak RSS on CPUs) is the peak of the largest configuration run so far. ``planned_gb`` is XLA's plan for
the largest of the configuration's programs (arguments + outputs + temporaries, ``Compiled.memory_analysis()``).
``--compilation_cache_dir`` turns on JAX's persistent compilation cache, so a second run skips most compilation.

Every device of the process is used (``--devices=N``: the first N), as the runner uses them
(:mod:`spark_jax.sharding`): a batch is split over a ``data`` mesh, the parameters and the conditioning are on every
device, the backbone's programs keep the split (XLA partitions them), and SPARK, the upsampling and PAMR run on each
device's own images (``sharding.per_device``); batch sizes are rounded up to multiples of the device count, and
images/s counts the whole batch. ``peak_gb`` is the fullest device's.

Measured on this project's 2-core CPU: see the report of issue 16 (WORKSPACE.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_START = time.perf_counter()  # the time budget counts from the process start (imports included)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from spark_jax import sharding  # noqa: E402
from spark_jax.backbones.conditioning import alphas_cumprod, shared_noise  # noqa: E402
from spark_jax.backbones.diffusion import Conditioning, compiler_options, latent_features, precision_context  # noqa: E402
from spark_jax.config import SparkConfig  # noqa: E402
from spark_jax.data.demo import demo_image  # noqa: E402
from spark_jax.data.preprocess import prepare_image  # noqa: E402
from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels  # noqa: E402
from spark_jax.masks.resample import resize_bilinear  # noqa: E402
from spark_jax.masks.upsample import upsample_labels  # noqa: E402
from spark_jax.methods.spark import num_label_columns, segment_tokens_batch  # noqa: E402
from spark_jax.models.convert import abstract_module, unet_params_for_taps  # noqa: E402
from spark_jax.models.unet import UNetConfig  # noqa: E402
from spark_jax.models.vae_encoder import VAEEncoderConfig  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TIMESTEP = 50
TEXT_TOKENS = 77  # CLIP's context length
NUM_DISTINCT_IMAGES = 8  # painting 32 demo images at 1025 px would cost seconds of the time budget


def ssd1b_configs() -> tuple[UNetConfig, VAEEncoderConfig, dict[str, Any]]:
    """SSD-1B's UNet, the SDXL VAE and SDXL's scheduler config (the reconstruction ``bench_backbone`` holds)."""
    from experiments.bench_backbone import SCHEDULER, SDXL_VAE, SSD1B_UNET

    return UNetConfig.from_diffusers(SSD1B_UNET), VAEEncoderConfig.from_diffusers(SDXL_VAE), SCHEDULER


# ------------------------------------------------------------------------------------------------ random models
def random_module(cfg: UNetConfig | VAEEncoderConfig, *, seed: int, dtype: jnp.dtype = jnp.float32,
                  keep: Callable[[tuple[Any, ...]], bool] | None = None) -> nnx.Module:
    """A random-weight module of ``cfg`` (UNet or VAE encoder), built as ``convert.load_converted`` builds one.

    Every kernel is N(0, 1 / fan_in) (fan_in: all axes but the last; flax's default variance), every norm scale
    1 + 0.2 N and every bias 0.2 N (as the tests perturb diffusers' 1 / 0 defaults, so that no parameter sits at a
    value that hides an error). Drawn with numpy (``default_rng([seed, leaf index])``): the same model on every
    machine and backend.

    Args:
      cfg: the architecture.
      seed: weight seed.
      dtype: parameter dtype.
      keep: which parameter paths to hold (``unet_params_for_taps(cfg, taps).__contains__``); the others become
        empty placeholders, as a backbone loaded with ``BackboneConfig.taps`` holds them.
    """
    graphdef, abstract_state = abstract_module(cfg)
    _, state = nnx.split(nnx.merge(graphdef, abstract_state, copy=True))
    nested: dict[Any, Any] = {}
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        path = tuple(path)
        shape = tuple(var.get_value().shape)
        if keep is not None and not keep(path):
            arr = np.zeros((0,) * len(shape), np.float32)
        else:
            arr = np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
            leaf = str(path[-1])
            if leaf == "kernel":
                arr *= np.float32(1 / math.sqrt(math.prod(shape[:-1])))
            elif leaf == "scale":
                arr *= np.float32(0.2)
                arr += np.float32(1.0)
            elif leaf == "bias":
                arr *= np.float32(0.2)
            else:
                raise ValueError(f"random_module: no rule for parameter {'.'.join(map(str, path))}")
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr, dtype)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnames="graph")
def _vae_latents(params, prepared: jax.Array, *, graph: nnx.GraphDef) -> jax.Array:
    with precision_context("highest"):
        return nnx.merge(graph, params)(2.0 * prepared - 1.0)


def calibrated_vae(cfg: VAEEncoderConfig, *, seed: int, size: int = 128) -> nnx.Module:
    """``random_module(cfg)`` with its last convolution rescaled so that the scaled latents of the demo images have
    unit standard deviation, as a trained VAE's have (what its ``scaling_factor`` is for).

    Uncalibrated, a random VAE's scaled latents have a standard deviation of ~0.1, below the noise added at t = 50
    (sqrt(1 - abar_50) ~ 0.2), so every image's features would look alike. Measured on 2 demo images at ``size`` px
    (the encoder is convolutional: the scale barely depends on the size).
    """
    vae = random_module(cfg, seed=seed)
    graph, params = nnx.split(vae)
    std = float(jnp.std(_vae_latents(params, demo_images(size, 2), graph=graph)))
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    for p in (last.kernel, last.bias):
        p.set_value(p.get_value() / std)
    return vae


def random_conditioning(unet_cfg: UNetConfig, scheduler: dict[str, Any], *, latent_hw: tuple[int, int], size: int,
                        seed: int, timestep: int = TIMESTEP) -> Conditioning:
    """Random prompt embeddings of the right shapes (text encoders play no part in the per-image cost), the
    backbone's seeded noise (``shared_noise``) and abar_t of ``scheduler``; SDXL time ids for a ``size`` square."""
    rng = np.random.default_rng([seed, 1])
    pooled = unet_cfg.text_embeds_dim
    return Conditioning(
        noise=shared_noise(seed, (*latent_hw, unet_cfg.in_channels)),
        alpha_bar=jnp.asarray(alphas_cumprod(scheduler)[timestep], jnp.float32),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((TEXT_TOKENS, unet_cfg.context_dim), np.float32)),
        text_embeds=None if pooled is None else jnp.asarray(rng.standard_normal((pooled,), np.float32)),
        time_ids=None if pooled is None else jnp.asarray([size, size, 0, 0, size, size], jnp.float32),
    )


def demo_images(size: int, batch: int) -> jax.Array:
    """[batch, size, size, 3] prepared images in [0, 1]: ``NUM_DISTINCT_IMAGES`` demo images of side size + 1
    (the reference crop takes min(H, W) - 1), repeated, through ``prepare_image``."""
    pool = np.stack([demo_image(i, size + 1, size + 1).image for i in range(min(batch, NUM_DISTINCT_IMAGES))])
    return _prepare(jnp.asarray(pool[np.arange(batch) % len(pool)]), size)


_prepare = jax.jit(prepare_image, static_argnums=1)  # one program, not one per eager op


@functools.partial(jax.jit, static_argnums=1)
def cast(tree: Any, dtype: jnp.dtype) -> Any:
    """Every leaf of ``tree`` in ``dtype``, in one program (not one small compile per leaf shape)."""
    return jax.tree.map(lambda x: x.astype(dtype), tree)


# ------------------------------------------------------------------------------------------------ the stages
@dataclasses.dataclass(frozen=True)
class Stages:
    """The pipeline's stage functions (pure; ``Bench`` jits them). ``mask_size`` (H, W), ``num_labels`` = M."""

    vae_graph: nnx.GraphDef
    unet_graph: nnx.GraphDef
    spark: SparkConfig
    mask_size: tuple[int, int]
    num_labels: int
    pamr: PamrConfig
    matmul_precision: str | None

    def vae(self, vae_params, prepared: jax.Array) -> jax.Array:
        """[B, S, S, 3] in [0, 1] -> [B, S/8, S/8, 4] scaled latents (float32, as ``encode_prepared``)."""
        with precision_context(self.matmul_precision):
            return nnx.merge(self.vae_graph, vae_params)(2.0 * prepared.astype(jnp.float32) - 1.0)

    def unet(self, unet_params, cond: Conditioning, latents: jax.Array, *, unet_dtype: jnp.dtype) -> jax.Array:
        """latents -> [B, h, w, C] float32 features of the feature tap (``latent_features``)."""
        return latent_features(nnx.merge(self.unet_graph, unet_params), latents, cond, timestep=TIMESTEP,
                               unet_dtype=unet_dtype, matmul_precision=self.matmul_precision)

    def segment(self, features: jax.Array):
        """features -> (soft labels [B, h, w, M], K [B], MCL iterations [B], MCL converged [B])."""
        tok = segment_tokens_batch(features, self.spark)
        return tok.soft_labels, tok.num_clusters, tok.mcl_iterations, tok.mcl_converged

    def upsample(self, soft_labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """soft labels -> (labels [B, H, W], segments present per image [B]: what sizes PAMR in ``segment``)."""
        coarse = jax.vmap(lambda q: upsample_labels(q, self.mask_size))(soft_labels)
        present = jax.vmap(lambda c: jnp.zeros((self.num_labels,), jnp.int32).at[c.ravel()].set(1).sum())(coarse)
        return coarse, present

    def refine(self, prepared: jax.Array, coarse: jax.Array, *, capacity: int) -> jax.Array:
        """PAMR of each image's labels on the image resized to the mask size (as ``pipeline.segment``)."""
        def one(image, labels):
            small = resize_bilinear(image, *self.mask_size)
            return refine_labels(small, labels, self.num_labels, self.pamr, capacity=capacity)

        return jax.vmap(one)(prepared, coarse)


def _planned_bytes(compiled) -> int | None:
    """XLA's planned bytes of a compiled program (arguments + outputs + temporaries), None where unreported."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError, AttributeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def peak_memory_bytes(device: jax.Device) -> tuple[int | None, str]:
    """The device's peak bytes in use so far (``memory_stats``), else this process's peak RSS (VmHWM)."""
    stats = None
    try:
        stats = device.memory_stats()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        pass
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


class Bench:
    """Holds the random model, the conditioning and the compiled programs; ``measure`` runs one configuration."""

    def __init__(self, unet_cfg: UNetConfig, vae_cfg: VAEEncoderConfig, scheduler: dict[str, Any], *, size: int,
                 dtypes: Sequence[str], seed: int = 0, spark: SparkConfig = SparkConfig(),
                 mask_size: tuple[int, int] = (128, 128), pamr: PamrConfig = PamrConfig(),
                 matmul_precision: str | None = "highest", devices: Sequence[jax.Device] | None = None):
        step = vae_cfg.downscale * unet_cfg.feature_stride
        if size <= 0 or size % step:
            raise ValueError(f"--size={size} must be a positive multiple of {step} (VAE downscale {vae_cfg.downscale}"
                             f" x UNet downsampling {unet_cfg.feature_stride} before the feature point)")
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown or not dtypes:
            raise ValueError(f"--dtypes={','.join(dtypes)}: choose among {', '.join(DTYPES)}")
        # Batches split over the devices' `data` mesh, the parameters on each of them (as spark_jax.runner runs).
        self.mesh = sharding.data_mesh(devices)
        self.size, self.dtypes, self.seed, self.device = size, tuple(dtypes), seed, self.mesh.devices.flat[0]
        self.options = compiler_options(self.device.platform)
        tap = unet_cfg.feature_tap
        latent = size // vae_cfg.downscale
        self.latent_hw = (latent, latent)
        h, w = unet_cfg.tap_grid(tap, self.latent_hw)
        t0 = time.perf_counter()
        vae = calibrated_vae(vae_cfg, seed=seed)
        unet32 = random_module(unet_cfg, seed=seed + 1, keep=unet_params_for_taps(unet_cfg, (tap,)).__contains__)
        vae_graph, vae_params = nnx.split(vae)
        unet_graph, params32 = nnx.split(unet32)
        # One model: the reduced-precision parameters are the float32 ones rounded (as load_backbone casts them).
        self.vae_params = sharding.replicate(vae_params, self.mesh)
        self.unet_params = {d: sharding.replicate(params32 if d == "float32" else cast(params32, DTYPES[d]),
                                                  self.mesh) for d in dtypes}
        self.num_params = sum(x.size for x in jax.tree.leaves(params32)) + sum(x.size for x in
                                                                             jax.tree.leaves(vae_params))
        self.cond = sharding.replicate(
            random_conditioning(unet_cfg, scheduler, latent_hw=self.latent_hw, size=size, seed=seed), self.mesh)
        self.init_s = time.perf_counter() - t0
        self.stages = Stages(vae_graph, unet_graph, spark, mask_size, num_label_columns(h * w, spark), pamr,
                             matmul_precision)
        self.token_grid = (h, w)
        self.latent_channels, self.feature_channels = vae_cfg.latent_channels, unet_cfg.feature_channels
        self._compiled: dict[tuple, Any] = {}
        self._compile_s: dict[str, float] = {}  # the last compile time of each program kind (for the estimates)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def _batch(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(self.mesh))

    def _compile(self, key: tuple, fn: Callable, *args, **static) -> tuple[Any, float]:
        """The compiled program of ``fn`` for ``args`` (cached under ``key``) and the seconds this call spent.

        The backbone's programs (``vae``, ``unet``: their batch split over the mesh, XLA keeping it so, as the
        runner's backbone runs) get the backbone's compiler options (as ``Backbone`` compiles them); the others
        run on each device's own images (``sharding.per_device``, as the runner runs the method and PAMR) and get
        none (as ``pipeline`` compiles them)."""
        if key in self._compiled:
            return self._compiled[key], 0.0
        t0 = time.perf_counter()
        if key[0] in ("vae", "unet"):
            program = jax.jit(functools.partial(fn, **static), compiler_options=self.options)
        else:
            program = jax.jit(sharding.per_device(lambda batch, _: fn(*batch, **static), self.mesh))
            args = (args, ())
        with sharding.active(self.mesh):
            compiled = program.lower(*args).compile()
        seconds = time.perf_counter() - t0
        self._compiled[key] = compiled
        self._compile_s[key[0]] = seconds
        return compiled, seconds

    def compile_estimate(self, dtype: str, batch: int) -> float:
        """Seconds of compilation a configuration still needs, from the last compile of each program kind."""
        kinds = [("unet", batch, dtype), ("vae", batch), ("spark", batch), ("upsample", batch)]
        return sum(self._compile_s.get(k[0], 0.0) for k in kinds if k not in self._compiled) + (
            self._compile_s.get("pamr", 0.0) if not any(k[:2] == ("pamr", batch) for k in self._compiled) else 0.0)

    def measure(self, dtype: str, batch: int, rounds: int) -> dict[str, Any]:
        """Compiles (where not yet done) and times one configuration: a warm-up round, then ``rounds`` timed ones."""
        st = self.stages
        if batch % self.num_devices:
            raise ValueError(f"batch {batch} does not split over {self.num_devices} devices; use a multiple")
        prepared = jax.block_until_ready(sharding.put_batch(demo_images(self.size, batch), self.mesh))
        compile_s = 0.0
        vae, s = self._compile(("vae", batch), st.vae, self.vae_params, prepared)
        compile_s += s
        latents = self._batch((batch, *self.latent_hw, self.latent_channels), jnp.float32)
        unet, s = self._compile(("unet", batch, dtype), st.unet, self.unet_params[dtype], self.cond, latents,
                                unet_dtype=DTYPES[dtype])
        compile_s += s
        feats = self._batch((batch, *self.token_grid, self.feature_channels), jnp.float32)
        segment, s = self._compile(("spark", batch), st.segment, feats)
        compile_s += s
        soft = self._batch((batch, *self.token_grid, st.num_labels), jnp.float32)
        upsample, s = self._compile(("upsample", batch), st.upsample, soft)
        compile_s += s
        planned = [_planned_bytes(c) for c in (vae, unet, segment, upsample)]

        def one_round() -> dict[str, float]:
            nonlocal compile_s
            times = {}
            t_round = t0 = time.perf_counter()
            lat = jax.block_until_ready(vae(self.vae_params, prepared))
            times["vae"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            f = jax.block_until_ready(unet(self.unet_params[dtype], self.cond, lat))
            times["unet"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            q, k, iters, converged = jax.block_until_ready(segment((f,), ()))
            times["spark"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            coarse, present = jax.block_until_ready(upsample((q,), ()))
            times["upsample"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            capacity = min(st.num_labels, label_capacity(int(jnp.max(present))))  # the host read segment makes
            refine, s = self._compile(("pamr", batch, capacity), st.refine, prepared, coarse, capacity=capacity)
            if s:  # a new capacity bucket: compiled here, its time kept out of the round
                compile_s += s
                planned.append(_planned_bytes(refine))
                t0 = time.perf_counter()
            jax.block_until_ready(refine((prepared, coarse), ()))
            times["pamr"] = time.perf_counter() - t0
            times["total"] = time.perf_counter() - t_round - s
            times.update(num_clusters=float(np.mean(k)), mcl_iterations=int(np.max(iters)),
                         mcl_converged=bool(np.all(converged)), pamr_capacity=capacity)
            return times

        first = one_round()
        timed = [one_round() for _ in range(rounds)]
        med = {name: statistics.median(r[name] for r in timed)
               for name in ("vae", "unet", "spark", "upsample", "pamr", "total")}
        peak, peak_kind = max(peak_memory_bytes(d) for d in self.mesh.devices.flat)  # the fullest device
        known = [p for p in planned if p is not None]
        return dict(
            dtype=dtype, batch=batch, status="ok", rounds=rounds, **{f"{k}_s": v for k, v in med.items()},
            backbone_s=med["vae"] + med["unet"], images_per_s=batch / med["total"], first_round_s=first["total"],
            compile_s=compile_s, planned_gb=max(known) / 2**30 if known else None,
            peak_gb=None if peak is None else peak / 2**30, peak_kind=peak_kind,
            num_clusters_mean=timed[-1]["num_clusters"], mcl_iterations_max=timed[-1]["mcl_iterations"],
            mcl_converged=timed[-1]["mcl_converged"], pamr_capacity=timed[-1]["pamr_capacity"],
            round_totals_s=[r["total"] for r in timed],
        )


def run(bench: Bench, *, batch_sizes: Sequence[int], rounds: int = 3, time_budget_s: float = 270.0,
        start: float | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every (batch, dtype) configuration of ``bench`` in increasing batch size within the time budget.

    Args:
      bench: the model and its programs (compiled programs are kept: a second ``run`` reuses them).
      batch_sizes: batch sizes (each run for every dtype of ``bench``).
      rounds: timed rounds per configuration after the warm-up one (fewer when the budget is short).
      time_budget_s: seconds from ``start`` (default: this module's import) after which no configuration starts.

    Returns:
      ``{"device": ..., "settings": ..., "rows": [one dict per configuration: status "ok" with the stage times
      (medians, seconds), images_per_s, compile_s, planned_gb, peak_gb, K; or "skipped"/"failed" with the reason]}``.
    """
    start = _START if start is None else start
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"--batch_sizes must be ints >= 1, got {list(batch_sizes)}")
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    # Every device gets as many images: batches rounded up to a multiple of the device count (as the runner pads).
    batches = sorted({sharding.padded_size(b, bench.num_devices) for b in batch_sizes})
    if batches != sorted(set(batch_sizes)):
        log(f"batch sizes {sorted(set(batch_sizes))} rounded up to multiples of the {bench.num_devices} devices: "
            f"{batches}")
    rows: list[dict[str, Any]] = []
    last: dict[str, dict[str, Any]] = {}  # the last measured row of each dtype
    stopped: dict[str, str] = {}  # dtype -> why its larger batches are skipped
    for batch in batches:
        for dtype in bench.dtypes:
            if dtype in stopped:
                rows.append(dict(dtype=dtype, batch=batch, status="skipped", reason=stopped[dtype]))
                continue
            left = time_budget_s - (time.perf_counter() - start)
            n_rounds = rounds
            # The estimate: this dtype's last row, else the last row of any dtype (the same batch, the first time).
            prev = last.get(dtype) or (rows[-1] if rows and rows[-1]["status"] == "ok" else None)
            if prev is not None:
                per_round = prev["total_s"] * batch / prev["batch"]
                compile_left = bench.compile_estimate(dtype, batch)
                n_rounds = min(rounds, math.floor((left - compile_left) / per_round) - 1)  # - 1: the warm-up
            if n_rounds < 1 or left <= 0:
                stopped[dtype] = (f"time budget: ~{compile_left + 2 * per_round:.0f} s needed (compile "
                                  f"~{compile_left:.0f} s, a round ~{per_round:.1f} s), {left:.0f} s left"
                                  if prev is not None else f"time budget: {time_budget_s:.0f} s spent")
                rows.append(dict(dtype=dtype, batch=batch, status="skipped", reason=stopped[dtype]))
                log(f"{dtype} batch {batch}: skipped ({stopped[dtype]})")
                continue
            log(f"{dtype} batch {batch}: compiling and timing ({n_rounds} rounds) ...")
            try:
                row = bench.measure(dtype, batch, n_rounds)
            except Exception as e:  # noqa: BLE001  (out of memory etc.: recorded, the run goes on)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                stopped[dtype] = f"batch {batch} failed ({msg})"
                rows.append(dict(dtype=dtype, batch=batch, status="failed", reason=msg))
                log(f"{dtype} batch {batch}: FAILED {msg}")
                continue
            rows.append(row)
            last[dtype] = row
            log(f"  {row['images_per_s']:.3g} images/s (round {row['total_s']:.3f} s; backbone {row['backbone_s']:.3f}"
                f", spark {row['spark_s']:.3f}, upsample {row['upsample_s']:.3f}, pamr {row['pamr_s']:.3f}); "
                f"compiled in {row['compile_s']:.1f} s")
    return dict(
        device=dict(platform=bench.device.platform, kind=bench.device.device_kind, device_count=jax.device_count(),
                    devices_used=bench.num_devices, jax=jax.__version__),
        settings=dict(size=bench.size, batch_sizes=batches, dtypes=list(bench.dtypes),
                      rounds=rounds, time_budget_s=time_budget_s, seed=bench.seed,
                      matmul_precision=bench.stages.matmul_precision,
                      token_grid=list(bench.token_grid), label_columns=bench.stages.num_labels,
                      parameters_held=bench.num_params, compiler_options=bench.options, init_s=bench.init_s),
        rows=rows,
        wall_s=time.perf_counter() - start,
    )


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width table (seconds are medians over the timed rounds)."""
    head = (f"{'dtype':>9} {'batch':>5} {'img/s':>8} {'round s':>8} {'vae s':>7} {'unet s':>7} {'spark s':>8} "
            f"{'upsam s':>8} {'pamr s':>7} {'compile s':>9} {'planned GB':>10} {'peak GB':>8} {'K':>6} {'MCL it':>6}")
    lines = [head]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['dtype']:>9} {r['batch']:>5} {r['status']}: {r['reason']}")
            continue
        planned = "-" if r["planned_gb"] is None else f"{r['planned_gb']:.2f}"
        peak = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(
            f"{r['dtype']:>9} {r['batch']:>5} {r['images_per_s']:8.3g} {r['total_s']:8.3f} {r['vae_s']:7.3f} "
            f"{r['unet_s']:7.3f} {r['spark_s']:8.3f} {r['upsample_s']:8.3f} {r['pamr_s']:7.3f} {r['compile_s']:9.1f} "
            f"{planned:>10} {peak:>8} {r['num_clusters_mean']:6.1f} {r['mcl_iterations_max']:6d}")
    d, s = result["device"], result["settings"]
    lines.append(f"{d['platform']} ({d['kind']}), {d['device_count']} device(s), {d['devices_used']} used; "
                 f"{s['size']} px, "
                 f"{s['token_grid'][0]}x{s['token_grid'][1]} tokens, {s['parameters_held'] / 1e6:.0f}M parameters, "
                 f"precision {s['matmul_precision']}; wall {result['wall_s']:.0f} s of a {s['time_budget_s']:.0f} s "
                 "budget")
    return "\n".join(lines)


def _define_flags():
    from absl import flags

    flags.DEFINE_integer("size", 1024, "Image side (the backbone's resolution; a multiple of 32).")
    flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32"], "Batch sizes, run in increasing order.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "UNet dtypes (the VAE is float32 in every case).")
    flags.DEFINE_integer("rounds", 3, "Timed rounds per configuration after a warm-up round (fewer when the time "
                         "budget is short).")
    flags.DEFINE_float("time_budget_s", 270.0, "Seconds from the process start after which no configuration starts "
                       "(each is estimated before it starts).")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights, conditioning and noise.")
    flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                      "Precision of every matmul/convolution (BackboneConfig.matmul_precision; 'default' lets GPUs "
                      "use TF32 for float32).")
    flags.DEFINE_integer("devices", 0, "Devices the batches are split over: the first N of this process's (0: all "
                         "of them). Batch sizes are rounded up to multiples of N.")
    flags.DEFINE_string("output", "bench_pipeline.json", "Where the JSON result is written.")
    flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache (a second run reuses it).")
    return flags.FLAGS


def main(argv):
    del argv
    FLAGS = _FLAGS
    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise SystemExit(f"--batch_sizes={','.join(FLAGS.batch_sizes)}: expected comma-separated ints") from None
    log = lambda msg: print(f"[{time.perf_counter() - _START:6.1f} s] {msg}", flush=True)  # noqa: E731
    try:
        local = jax.local_devices()
        if not 0 <= FLAGS.devices <= len(local):
            raise ValueError(f"--devices={FLAGS.devices}: this process has {len(local)} device(s); pass 1.."
                             f"{len(local)}, or 0 for all")
        bench = Bench(*ssd1b_configs(), size=FLAGS.size, dtypes=FLAGS.dtypes, seed=FLAGS.seed,
                      matmul_precision=FLAGS.matmul_precision, devices=local[: FLAGS.devices or len(local)])
        log(f"random model ready in {bench.init_s:.1f} s ({bench.num_params / 1e6:.0f}M parameters held); "
            f"{bench.device.platform} device {bench.device.device_kind}, {bench.num_devices} of "
            f"{jax.device_count()} device(s) used")
        result = run(bench, batch_sizes=batch_sizes, rounds=FLAGS.rounds, time_budget_s=FLAGS.time_budget_s, log=log)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print()
    print(format_table(result))
    Path(FLAGS.output).write_text(json.dumps(result, indent=1))
    print(f"written: {FLAGS.output}")


if __name__ == "__main__":
    from absl import app

    _FLAGS = _define_flags()
    sys.setrecursionlimit(10000)
    app.run(main)
