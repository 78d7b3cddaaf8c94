r"""Benchmark: diffusion feature extraction in JAX vs diffusers PyTorch, same random SSD-1B-architecture weights.

Three ways to get the same features (the SSD-1B feature point, down_blocks.2.attentions.1.
transformer_blocks.3.attn1) from uint8 images, all in float32 on this machine's CPU:

  reference  the reference pipeline's way: VAE + noise + the FULL UNet with a forward hook
  truncated  PyTorch stopped at the feature point (the hook raises once it has the output)
  jax        spark_jax's jitted extractor (Backbone.extract_features)

Each path runs in its own spawned process (so peak memory is per path). The processes load and
warm up one after another (for JAX the warm-up includes compilation), then take turns: each round
calls every path once, in an order rotated every round, and ratios are taken within a round. This
machine's speed drifts by up to ~40% over tens of minutes (a shared VM), which made the earlier
path-after-path timings disagree from run to run; interleaving puts every path under the same drift.
Prompt conditioning is random (77 x 2048 + 1280), as text encoders play no part in the per-image cost.
The jax path runs with ``BackboneConfig``'s default ``matmul_precision='highest'``. On XLA:CPU the
precision changes nothing: measured 2026-12-01, the optimized program of the SDXL-VAE encoder is the
same with 'highest' and 'default' once the precision attributes are removed, its output bit-identical,
its time at 256 px 1.644 vs 1.649 s (medians of 5 alternating calls). On GPUs 'highest' turns TF32 off
and costs time there; pass 'default' to measure that trade.

Usage:
  python -m experiments.bench_backbone --sizes=512,1024 --repeats=3

Measured 2026-11-22 (2-core CPU, nothing else running, float32, batch 1; medians; ratios are
medians of per-round ratios). Run A: the VAE and UNet as two programs (an intermediate version);
run B: the current single program with YNNPACK fusions off, 4 rounds at 512 px and 3 at 1024 px:

   size       path  A time (s)  A time/jax  (rounds)            B time (s)  B time/jax  (rounds)
   1024  reference       61.11        1.49  1.37, 1.55, 1.49         54.43        1.37  1.31, 1.37, 1.38
   1024  truncated       47.01        1.15  1.14, 1.16, 1.15         39.40        1.00  1.15, 0.97, 1.00
   1024        jax       40.95                                       39.35
    512  reference       13.36        1.50  1.50, 1.40, 1.56         14.73        1.57  1.50, 1.36, 1.65, 1.64
    512  truncated        7.85        0.88  0.86, 1.05, 0.88         10.63        1.12  1.13, 1.00, 1.26, 1.11
    512        jax        8.90                                        9.08

   peak RSS (GB, run B): 1024 px reference 7.77, truncated 4.93, jax 3.99; 512 px 5.72, 2.81, 3.07.

   Run C, the same code as B, a later session, 3 rounds per size: 1024 px reference 57.55 s,
   truncated 44.38, jax 41.46 (ratios 1.39 and 1.03); 512 px 14.21, 9.12, 8.64 (1.58 and 0.96).

Targets: JAX is level with PyTorch truncated (0.88-1.15 across runs and sizes; PyTorch's own
times moved by 35% between runs A and B, JAX's by 2-4%) and 1.37-1.58x faster than the reference,
not 2x. By component (one process, alternating
calls, 512 px): the VAE runs ~1.3x faster in JAX than in PyTorch (6.4-7.6 vs 8.2-10.9 s), the UNet
encoder ~1.2-1.4x slower (1.9-2.5 vs 1.6-1.8 s). With YNNPACK fusions off (as compiled here)
XLA:CPU's 3x3 convolutions at the UNet's shapes are level with PyTorch's (JAX/torch time 0.77-1.20,
e.g. 1280 -> 1280 channels on 16x16: 46 vs 60 ms); its float32 GEMMs with 256 rows (the 256 tokens
of down_blocks.2 at 512 px) are 1.5-1.7x slower (256 x 1280 x 10240: 64 vs 37 ms), and its
attention 1.0-1.9x (experiments/bench_attention.py). The 2x target would need the
VAE, common to every path (4.33 of the reference's 8.04 TFLOP at 1024 px), to run ~2x faster than
PyTorch's, i.e. all of it at this CPU's float32 matmul peak (~230 GF/s, which both libraries reach)
or fewer FLOPs; Winograd convolutions, the FLOP-cutting option, measured slower than XLA:CPU's direct
ones at the VAE's large maps (WORKSPACE.md, "Backbone speed on a CPU").

Before this version (path after path, under other jobs' load 6-9): reference/jax 1.64 (512) and
1.67 (1024), truncated/jax 1.14 and 1.11; on an idle machine, path after path, the first version
(batched attention, default compiler options) gave 1.44 / 0.85 at 512 px. What changed since:
attention blocked per head and per 1024 queries (models/attention.py; 1.4-3.9x faster at the UNet's
and VAE's shapes, see experiments/bench_attention.py) and the extractor compiled with XLA:CPU's
YNNPACK fusions off (backbone.py; VAE 5.6 vs 7.1 s at 512 px).

The whole-UNet port against the truncated encoder it replaced (2026-12-02, ``--sizes=512 --paths=jax_baseline,jax
--repeats=6 --baseline_checkout=<worktree at 2a42855>``, idle machine): jax_baseline 4.75 s, jax 4.59 s (the
feature tap of a backbone loaded with ``BackboneConfig.taps``), ratio 1.03 (rounds 1.38, 1.01, 0.97, 1.06, 1.04,
1.02); RSS after load 1.95 / 1.97 GB, peak 3.06 / 3.12 GB. Holding the whole UNet instead (no ``taps``, a run under
load): peak 8.94 GB against 3.19.

The first run writes ~6 GB of random weights to --workdir (reused afterwards). Expect several
minutes per size at 1024 px on a 2-core CPU.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["512", "1024"], "Image sides (the resolution the images are resized to).")
flags.DEFINE_list("paths", ["reference", "truncated", "jax"], "Which extraction paths to time (add jax_baseline "
                  "with --baseline_checkout to time an earlier revision of spark_jax in the same rounds).")
flags.DEFINE_string("baseline_checkout", None, "A checkout of spark_jax before the whole-UNet port (e.g. "
                    "`git worktree add /tmp/base 2a42855`): the jax_baseline path imports spark_jax from there.")
flags.DEFINE_integer("batch", 1, "Images per call.")
flags.DEFINE_integer("repeats", 3, "Timed rounds after the warm-up call (each round calls every path once).")
flags.DEFINE_string("workdir", "/tmp/spark_jax_bench", "Where the random-weight checkpoint and cache live.")

# SSD-1B UNet (reference facts, section 1) and the SDXL VAE.
SSD1B_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    transformer_layers_per_block=[1, 2, 4],
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
)
SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    num_train_timesteps=1000,
)
TIMESTEP, SEED = 50, 42


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_checkpoint(root: Path) -> None:
    """Random-weight SSD-1B UNet + SDXL VAE saved in the diffusers layout (once)."""
    if (root / "unet" / "diffusion_pytorch_model.safetensors").exists() and (root / "vae" / "config.json").exists():
        return
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    log("building the SSD-1B-architecture UNet with random weights (1.3B parameters) ...")
    unet = UNet2DConditionModel(**SSD1B_UNET)
    log(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters; saving ...")
    unet.save_pretrained(root / "unet", max_shard_size="20GB")
    del unet
    log("building and saving the SDXL-architecture VAE ...")
    AutoencoderKL(**SDXL_VAE).save_pretrained(root / "vae")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    log(f"checkpoint written to {root}")


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def _peak_gb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _conditioning(size: int):
    import numpy as np

    rng = np.random.default_rng(1)
    return (
        rng.standard_normal((77, 2048)).astype(np.float32),
        rng.standard_normal((1280,)).astype(np.float32),
        np.asarray([size, size, 0, 0, size, size], np.float32),
    )


def _images(size: int, batch: int):
    import numpy as np

    # One pixel larger than the target so the reference crop (side min(H, W) - 1) gives `size`.
    return np.random.default_rng(2).integers(0, 256, (batch, size + 1, size + 1, 3), dtype=np.uint8)


def _torch_extractor(root: Path, size: int, truncated: bool):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    sched = DDPMScheduler.from_pretrained(root, subfolder="scheduler")
    ctx, pooled, ids = (torch.from_numpy(a)[None] for a in _conditioning(size))
    attn1 = unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1
    noise = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(SEED))

    class _Stop(Exception):
        pass

    captured = {}

    def hook(module, inputs, output):
        captured["features"] = output
        if truncated:
            raise _Stop

    attn1.register_forward_hook(hook)

    @torch.no_grad()
    def extract(images):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        side = min(x.shape[-2:]) - 1
        top, left = round((x.shape[-2] - side) / 2), round((x.shape[-1] - side) / 2)
        x = x[..., top : top + side, left : left + side]
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=False, align_corners=False) * 2 - 1
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        b = latents.shape[0]
        noisy = sched.add_noise(latents, noise.expand(b, -1, -1, -1), torch.tensor([TIMESTEP]))
        try:
            unet(noisy, TIMESTEP, encoder_hidden_states=ctx.expand(b, -1, -1),
                 added_cond_kwargs={"text_embeds": pooled.expand(b, -1), "time_ids": ids.expand(b, -1)})
        except _Stop:
            pass
        f = captured.pop("features")
        h = size // 32
        return f.reshape(b, h, h, -1)

    return extract


def _jax_conditioning(root: Path, size: int, conditioning, shared_noise, load_alphas_cumprod):
    """The backbone's constants for the random prompt conditioning, built with the given revision's own
    ``Conditioning``, ``shared_noise`` and ``load_alphas_cumprod`` (the baseline's layout differs)."""
    import jax.numpy as jnp

    ctx, pooled, ids = (jnp.asarray(a) for a in _conditioning(size))
    return conditioning(
        noise=shared_noise(SEED, (size // 8, size // 8, 4)),
        alpha_bar=jnp.asarray(load_alphas_cumprod(root)[TIMESTEP], jnp.float32),
        encoder_hidden_states=ctx, text_embeds=pooled, time_ids=ids,
    )


def _jax_extractor(root: Path, size: int):
    import jax

    from spark_jax.backbones.diffusion import Backbone, BackboneConfig, Conditioning
    from spark_jax.models.convert import load_unet, load_vae_encoder, unet_config
    from spark_jax.backbones.conditioning import load_alphas_cumprod, shared_noise

    # As the runner loads it for SPARK: only the parameters up to the feature tap (BackboneConfig.taps).
    taps = (unet_config(root).feature_tap,)
    cfg = BackboneConfig(resolution=size, cache_dir=str(root / "cache"), taps=taps)
    t0 = time.perf_counter()
    unet, unet_cfg = load_unet(root, cache_dir=cfg.cache_dir, taps=taps)
    vae, vae_cfg = load_vae_encoder(root, cache_dir=cfg.cache_dir)
    load_s = time.perf_counter() - t0
    cond = _jax_conditioning(root, size, Conditioning, shared_noise, load_alphas_cumprod)
    backbone = Backbone(unet, vae, cond, cfg, unet_cfg, vae_cfg)  # SPARK's default request, as the runner makes it

    def extract(images):
        return jax.block_until_ready(backbone.extract(images, taps)[taps[0]])

    return extract, load_s


def _jax_baseline_extractor(root: Path, size: int, checkout: str):
    """The extractor of a revision before the whole-UNet port (flat layout: spark_jax.backbone, .checkpoint, with
    the UNet encoder truncated at the feature point), imported from ``checkout``."""
    sys.path.insert(0, checkout)
    import jax
    import spark_jax

    if not Path(spark_jax.__file__).resolve().is_relative_to(Path(checkout).resolve()):
        raise RuntimeError(f"jax_baseline imported spark_jax from {spark_jax.__file__}, not from {checkout}")
    from spark_jax.backbone import Backbone, BackboneConfig, Conditioning
    from spark_jax.checkpoint import load_unet_encoder, load_vae_encoder
    from spark_jax.conditioning import load_alphas_cumprod, shared_noise

    cfg = BackboneConfig(resolution=size, cache_dir=str(root / "cache"))
    t0 = time.perf_counter()
    unet, unet_cfg = load_unet_encoder(root, cache_dir=cfg.cache_dir)
    vae, vae_cfg = load_vae_encoder(root, cache_dir=cfg.cache_dir)
    load_s = time.perf_counter() - t0
    cond = _jax_conditioning(root, size, Conditioning, shared_noise, load_alphas_cumprod)
    backbone = Backbone(unet, vae, cond, cfg, unet_cfg, vae_cfg)

    def extract(images):
        return jax.block_until_ready(backbone.extract_features(images))

    return extract, load_s


def _worker(path: str, size: int, batch: int, root: str, conn, baseline_checkout: str | None = None) -> None:
    """One extraction path in its own process, driven by commands from the parent over `conn`."""
    root = Path(root)
    t0 = time.perf_counter()
    if path == "jax":
        extract, load_s = _jax_extractor(root, size)
    elif path == "jax_baseline":
        extract, load_s = _jax_baseline_extractor(root, size, baseline_checkout)
    else:
        extract = _torch_extractor(root, size, truncated=path == "truncated")
        load_s = time.perf_counter() - t0
    images = _images(size, batch)
    conn.send(dict(load_s=load_s, rss_loaded_gb=_rss_gb()))
    shape = None
    while True:
        cmd = conn.recv()
        if cmd == "call":
            t0 = time.perf_counter()
            feats = extract(images)
            conn.send(time.perf_counter() - t0)
            shape = tuple(feats.shape)
        else:
            # diffusers maps its weights lazily (they page in during the first call), spark_jax holds
            # them after loading: the comparable figure is the peak RSS over loading and extracting.
            conn.send(dict(peak_gb=_peak_gb(), shape=shape))
            return


def run(sizes: list[int], paths: list[str], batch: int, repeats: int, workdir: Path,
        baseline_checkout: str | None = None) -> list[dict]:
    """Times every path at every size, interleaved, and prints a table of times and ratios.

    Each path lives in its own process (so peak memory is per path). They load and warm up one
    after another, then take turns: round r calls every path once, in an order rotated each round,
    so a drift in the machine's speed (a shared CPU's neighbours, clocks) hits every path alike.
    Ratios are taken per round (same moment), and their median is reported.
    """
    build_checkpoint(workdir)
    ctx = mp.get_context("spawn")
    results = []
    for size in sizes:
        workers = {}
        for path in paths:
            log(f"{path} at {size} px (batch {batch}): loading and warming up ...")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(path, size, batch, str(workdir), child, baseline_checkout))
            proc.start()
            info = _receive(path, proc, parent, timeout=3600)  # loading
            parent.send("call")  # warm-up (for JAX: compilation included)
            info["first_s"] = _receive(path, proc, parent)
            workers[path] = (proc, parent, info)
            log(f"  load {info['load_s']:.1f} s, first call {info['first_s']:.1f} s, "
                f"RSS after load {info['rss_loaded_gb']:.2f} GB")
        times = {path: [] for path in paths}
        for r in range(repeats):
            order = paths[r % len(paths):] + paths[: r % len(paths)]
            for path in order:
                proc, conn, _ = workers[path]
                conn.send("call")
                times[path].append(_receive(path, proc, conn))
            log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{p} {times[p][-1]:.2f} s" for p in paths))
        for path in paths:
            proc, conn, info = workers[path]
            conn.send("stop")
            info.update(_receive(path, proc, conn))
            proc.join()
            results.append(dict(path=path, size=size, time_s=statistics.median(times[path]), times=times[path], **info))
    print()
    print(f"{'size':>5} {'path':>10} {'time (s)':>9} {'first (s)':>10} {'load (s)':>9} {'RSS loaded':>11} "
          f"{'peak RSS':>9} {'time / jax':>11}")
    for size in sizes:
        rows = {r["path"]: r for r in results if r["size"] == size}
        for path in paths:
            r = rows[path]
            ratio = f"{_ratio(r, rows.get('jax')):11.2f}" if "jax" in rows else f"{'-':>11}"
            print(f"{size:>5} {path:>10} {r['time_s']:9.2f} {r['first_s']:10.1f} {r['load_s']:9.1f} "
                  f"{r['rss_loaded_gb']:11.2f} {r['peak_gb']:9.2f} {ratio}")
    for size in sizes:
        rows = {r["path"]: r for r in results if r["size"] == size}
        if "jax" in rows:
            for path, target in (("truncated", 1.0), ("reference", 2.0), ("jax_baseline", None)):
                if path in rows:
                    per_round = _per_round(rows[path], rows["jax"])
                    ratio = statistics.median(per_round)
                    if target is None:  # the earlier revision: the same work, so the same cost up to drift
                        verdict = "the cost of the feature tap against the earlier truncated encoder"
                    else:
                        verdict = f"target >= {target:.1f}: " + ("met" if ratio >= target else "NOT met")
                    print(f"{size} px: {path} / jax = {ratio:.2f} (median of rounds "
                          f"{', '.join(f'{x:.2f}' for x in per_round)}; {verdict})")
    return results


def _per_round(row: dict, jax_row: dict) -> list[float]:
    """This path's time / JAX's time, round by round (same moment)."""
    return [a / b for a, b in zip(row["times"], jax_row["times"])]


def _ratio(row: dict, jax_row: dict) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(_per_round(row, jax_row))


def _receive(path: str, proc, conn, timeout: float | None = None):
    """The worker's next message; a worker that died (e.g. out of memory) is named, not an EOFError."""
    if not conn.poll(timeout):
        raise RuntimeError(f"the {path} worker did not answer within {timeout} s")
    try:
        return conn.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the {path} worker exited with code {proc.exitcode} before answering") from None


def main(argv):
    del argv
    sizes = [int(s) for s in FLAGS.sizes]
    unknown = sorted(set(FLAGS.paths) - {"reference", "truncated", "jax", "jax_baseline"})
    if unknown:
        raise app.UsageError(f"unknown --paths {unknown}; choose among reference, truncated, jax, jax_baseline")
    if "jax_baseline" in FLAGS.paths and not FLAGS.baseline_checkout:
        raise app.UsageError("--paths=jax_baseline needs --baseline_checkout=<a checkout of the earlier revision>")
    run(sizes, FLAGS.paths, FLAGS.batch, FLAGS.repeats, Path(FLAGS.workdir), FLAGS.baseline_checkout)


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    app.run(main)
