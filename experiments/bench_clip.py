r"""Benchmark: the CLIP ViT-L/14 image tower, JAX (spark_jax.models.clip) vs PyTorch (transformers' CLIPModel).

Random weights at the full ViT-L/14 architecture (openai/clip-vit-large-patch14's config: 24 layers of 1024,
16 heads, patch 14, QuickGELU; nothing is downloaded), float32, both converted from the same torch model. Each
round times every path once on the same pixel values (interleaved, so machine load hits all paths alike); the
figures are the medians over rounds of the time per image and of the in-round ratios.

  jax         CLIP.image_features (one jitted get_image_features, matmul precision 'highest', XLA defaults)
  jax_noynn   the same program compiled with XLA:CPU's YNNPACK fusions off (the diffusion backbone's CPU option)
  torch       CLIPModel.get_image_features under torch.inference_mode (torch's default CPU threads)

Usage:
  python -m experiments.bench_clip [--resolution=224] [--batch=1] [--rounds=5] [--paths=jax,jax_noynn,torch]
                                   [--torch_threads=0]

--resolution other than 224 interpolates the position embedding in both (transformers' interpolate_pos_encoding).

Measured 2026-12-02 on the 2-core CPU while ~7 other processes ran (load average 8-9), 224 px, batch 1, median
s per image over interleaved rounds (max error of both JAX paths vs torch: 1e-6 of scale):

  run                          jax   jax_noynn   torch   jax/torch (in-round)
  7 rounds, torch 2 threads   2.57      2.11     10.22   0.25 (noynn 0.22)
  5 rounds, torch 2 threads   2.25      2.45     10.37   0.22 (noynn 0.21)
  3 rounds, torch 1 thread    1.61        -       2.95   0.53

torch's two OpenMP threads suffer most from the oversubscribed cores (one thread is 3.5x faster than two here);
on an idle machine expect the gap to narrow. The YNNPACK option changes JAX by less than the noise, so CLIP keeps
XLA's defaults.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

FLAGS = flags.FLAGS
PATHS = ("jax", "jax_noynn", "torch")
flags.DEFINE_integer("resolution", 224, "Image side in pixels (a multiple of 14).")
flags.DEFINE_integer("batch", 1, "Images per call.")
flags.DEFINE_integer("rounds", 5, "Timed rounds after one warm-up call per path.")
flags.DEFINE_list("paths", list(PATHS), f"Which paths, from {list(PATHS)}.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads for the torch path (0: torch's default).")

VIT_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, hidden_act="quick_gelu")
VIT_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def build(seed: int = 0):
    """(torch CLIPModel, our CLIP) with the same random ViT-L/14 weights."""
    import torch
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel as HFCLIPModel

    from spark_jax.backbones.clip import CLIP, ImageProcessing
    from spark_jax.models.clip import CLIPConfig
    from spark_jax.models.clip_convert import ArrayReader, build_clip, convert_clip, transformers_key_map

    hf_cfg = HFCLIPConfig(text_config=VIT_L14_TEXT, vision_config=VIT_L14_VISION, projection_dim=768)
    torch.manual_seed(seed)
    ref = HFCLIPModel(hf_cfg).eval()
    cfg = CLIPConfig.from_transformers(hf_cfg.to_dict())
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = build_clip(cfg, convert_clip(cfg, ArrayReader(state), transformers_key_map(cfg)))
    clip = CLIP(model, cfg, checkpoint_id="bench", processing=ImageProcessing(),
                tokenizer_factory=lambda: None)
    return ref, clip


def main(argv):
    del argv
    import torch

    from spark_jax.backbones.diffusion import _CPU_COMPILER_OPTIONS

    unknown = set(FLAGS.paths) - set(PATHS)
    if unknown:
        raise app.UsageError(f"--paths: unknown {sorted(unknown)}; choose from {list(PATHS)}")
    if FLAGS.resolution % 14:
        raise app.UsageError(f"--resolution={FLAGS.resolution} is not a multiple of the patch (14)")
    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    t0 = time.perf_counter()
    ref, clip = build()
    print(f"built ViT-L/14 (random weights) in {time.perf_counter() - t0:.1f} s; jax {jax.__version__} on "
          f"{jax.default_backend()}, torch {torch.__version__} with {torch.get_num_threads()} threads")
    px = np.random.default_rng(0).normal(size=(FLAGS.batch, FLAGS.resolution, FLAGS.resolution, 3)).astype(np.float32)
    px_t = torch.from_numpy(px.transpose(0, 3, 1, 2).copy())
    interpolate = FLAGS.resolution != 224

    graphdef, state = nnx.split(clip.model)

    def features(state, x):
        with jax.default_matmul_precision("highest"):
            return nnx.merge(graphdef, state).get_image_features(x)

    noynn = jax.jit(features, compiler_options=_CPU_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)
    px_j = jnp.asarray(px)

    def run_torch():
        with torch.inference_mode():
            return ref.get_image_features(pixel_values=px_t, interpolate_pos_encoding=interpolate).pooler_output.numpy()

    runs = {
        "jax": lambda: np.asarray(clip.image_features(px_j)),
        "jax_noynn": lambda: np.asarray(noynn(state, px_j)),
        "torch": run_torch,
    }
    paths = [p for p in PATHS if p in FLAGS.paths]
    if jax.default_backend() != "cpu" and "jax_noynn" in paths:  # a CPU-only compiler option
        paths.remove("jax_noynn")
    outputs = {}
    for p in paths:  # warm-up: compilation, first-touch allocation
        t0 = time.perf_counter()
        outputs[p] = runs[p]()
        print(f"{p:10s} first call {time.perf_counter() - t0:6.2f} s")
    if "torch" in outputs:
        scale = float(np.abs(outputs["torch"]).max())
        for p in paths:
            err = float(np.abs(outputs[p] - outputs["torch"]).max())
            print(f"{p:10s} max |error| vs torch {err:.3g} ({err / scale:.2g} of scale)")
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(FLAGS.rounds):
        for p in paths:
            t0 = time.perf_counter()
            runs[p]()
            times[p].append((time.perf_counter() - t0) / FLAGS.batch)
    print(f"\nViT-L/14 image tower, {FLAGS.resolution} px, batch {FLAGS.batch}, {FLAGS.rounds} interleaved rounds "
          "(median s per image):")
    for p in paths:
        print(f"  {p:10s} {statistics.median(times[p]):7.3f}   (min {min(times[p]):.3f}, max {max(times[p]):.3f})")
    if "torch" in paths:
        for p in paths:
            if p != "torch":
                ratio = statistics.median(a / b for a, b in zip(times[p], times["torch"]))
                print(f"  {p}/torch median in-round ratio {ratio:.2f}")


if __name__ == "__main__":
    app.run(main)
