r"""Benchmark: PAMR in JAX (spark_jax.masks.pamr) against a PyTorch formulation of the published module.

The PyTorch side follows the structure of the original PAMR module (Araslanov & Roth 2020), which
DiffCut's evaluation runs: shift kernels applied with dilated ``conv2d`` on replicate-padded inputs,
neighbour stacks ``[B, K, P, H, W]`` materialised for the affinities *and* for every propagation step.
Both run float32 on this CPU with their default thread pools. Each (framework, size) runs in a fresh
process so its peak memory can be read from the kernel (``VmHWM`` after resetting it with
``/proc/self/clear_refs``); XLA's own buffer plan (temp + output bytes) is printed as well.
Outputs are compared in the same run (max |difference|).

Usage:
  python -m experiments.bench_pamr                      # 128x128 and 1024x1024, K=8, 10 iterations
  python -m experiments.bench_pamr --sizes=128 --num_labels=21 --repeats=5

Measured 2026-11-22 on the shared 2-core CPU (load average 7-9 from other jobs, so absolute times are
inflated and vary ~2x between runs; ratios come from the same run), K=8, 10 iterations, dilations
(1, 2, 4, 8), one thread each, peak RSS counted from before the first execution:

  size       impl          run s   peak RSS MB   XLA MB
  128x128    jax           0.015        7           5
  128x128    torch         0.64        95           -    (torch/jax: 42x time, 13x memory)
  128x128    torch_slices  0.32        20           -    (21x time, 2.8x memory)
  1024x1024  jax           5.3        333         323
  1024x1024  torch        82         2399           -    (15x time, 7.2x memory)
  1024x1024  torch_slices 33          637           -    (6.3x time, 1.9x memory)

max |jax - torch| = 3.6e-6 (128) and 5.0e-6 (1024). An earlier run under heavier load gave 21x/31x
(torch) and 8x/7x (torch_slices) time ratios. The JAX version holds no [H, W, P, K] stack.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np
from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["128", "1024"], "Square image sides to benchmark.")
_NUM_LABELS = flags.DEFINE_integer("num_labels", 8, "Number of mask channels K (one-hot labels).")
_NUM_ITER = flags.DEFINE_integer("num_iter", 10, "PAMR propagation steps.")
_DILATIONS = flags.DEFINE_list("dilations", ["1", "2", "4", "8"], "PAMR dilations.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (the median is printed).")
_THREADS = flags.DEFINE_integer(
    "threads", 1,
    "1: both frameworks single-threaded (fair and stable on a shared, oversubscribed CPU, where torch's "
    "OpenMP pool can slow down tenfold); 0: each framework's default thread pool.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic image and labels.")
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", ["jax", "torch", "torch_slices"],
    "Implementations: jax (spark_jax.masks.pamr), torch (the published module's conv2d formulation), "
    "torch_slices (a leaner torch formulation: replicate pad once, neighbours as slices).")


def _synthetic(size: int, num_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth colour image with noise and blocky labels (token-grid labels upsampled 32x)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size * 40.0
    base = np.stack([np.sin(yy), np.cos(xx), np.sin(xx + yy)], -1) * 0.3 + 0.5
    image = np.clip(base + 0.05 * rng.normal(size=base.shape), 0.0, 1.0).astype(np.float32)
    cell = max(1, size // 32)
    tokens = rng.integers(0, num_labels, (size // cell + 1, size // cell + 1))
    labels = np.kron(tokens, np.ones((cell, cell), np.int64))[:size, :size]
    masks = np.eye(num_labels, dtype=np.float32)[labels]
    return image, masks


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _time_runs(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def _run_jax(inputs: str, output: str, num_iter: int, dilations: tuple[int, ...], repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from spark_jax.masks.pamr import pamr

    data = np.load(inputs)
    image, masks = jnp.asarray(data["image"]), jnp.asarray(data["masks"])
    fn = jax.jit(lambda x, m: pamr(x, m, num_iter=num_iter, dilations=dilations))
    t0 = time.perf_counter()
    compiled = fn.lower(image, masks).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_mb = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20 if mem is not None else float("nan")
    # Peak from before the first execution: XLA's allocator keeps buffers between runs, so a baseline
    # taken after a warm-up would hide them.
    peak_ok = _reset_peak()
    base = _rss_mb("VmRSS")
    compiled(image, masks).block_until_ready()  # warm-up
    times, out = _time_runs(lambda: compiled(image, masks).block_until_ready(), repeats)
    peak = _rss_mb("VmHWM") - base if peak_ok else float("nan")
    np.save(output, np.asarray(out))
    return dict(compile_s=compile_s, times=times, peak_mb=peak, xla_mb=xla_mb)


def _torch_pamr(image, masks, num_iter: int, dilations: tuple[int, ...]):
    """PAMR as the published module computes it: dilated shift kernels, stacked neighbours."""
    import torch
    import torch.nn.functional as F

    def shift_kernels(with_centre: bool, minus_centre: bool):
        """One 3x3 kernel per tap: picks the tap (and subtracts the centre if asked)."""
        taps = [(i, j) for i in range(3) for j in range(3) if with_centre or (i, j) != (1, 1)]
        k = torch.zeros(len(taps), 1, 3, 3)
        for n, (i, j) in enumerate(taps):
            k[n, 0, i, j] += 1.0
            if minus_centre:
                k[n, 0, 1, 1] -= 1.0
        return k

    def stack(x, kernel):  # [B, C, H, W] -> [B, C, P, H, W]
        b, c, h, w = x.shape
        x = x.reshape(b * c, 1, h, w)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d) for d in dilations]
        return torch.cat(outs, 1).reshape(b, c, -1, h, w)

    copy_nb = shift_kernels(with_centre=False, minus_centre=False)
    copy_win = shift_kernels(with_centre=True, minus_centre=False)
    diff_nb = shift_kernels(with_centre=False, minus_centre=True)  # neighbour - centre
    x = image.permute(2, 0, 1)[None]
    m = masks.permute(2, 0, 1)[None]
    sigma = stack(x, copy_win).std(2, keepdim=True)
    logits = (-stack(x, diff_nb).abs() / (1e-8 + 0.1 * sigma)).mean(1, keepdim=True)
    alpha = F.softmax(logits, 2)
    for _ in range(num_iter):
        m = (stack(m, copy_nb) * alpha).sum(2)
    return m[0].permute(1, 2, 0)


def _torch_pamr_slices(image, masks, num_iter: int, dilations: tuple[int, ...]):
    """A leaner torch PAMR: one replicate pad, neighbours as slices accumulated one at a time."""
    import torch
    import torch.nn.functional as F

    r = max(dilations)
    h, w = image.shape[:2]
    window = [(d * i, d * j) for d in dilations for i in (-1, 0, 1) for j in (-1, 0, 1)]
    neighbours = [o for o in window if o != (0, 0)]

    def shifted(padded, oy, ox):
        return padded[:, :, r + oy : r + oy + h, r + ox : r + ox + w]

    x = image.permute(2, 0, 1)[None]
    xp = F.pad(x, [r] * 4, mode="replicate")
    sigma = torch.stack([shifted(xp, oy, ox) for oy, ox in window], 2).std(2)
    scale = 1e-8 + 0.1 * sigma
    logits = torch.stack([(-(x - shifted(xp, oy, ox)).abs() / scale).mean(1) for oy, ox in neighbours], 1)
    alpha = F.softmax(logits, 1)  # [1, P, H, W]
    m = masks.permute(2, 0, 1)[None]
    for _ in range(num_iter):
        mp_ = F.pad(m, [r] * 4, mode="replicate")
        acc = torch.zeros_like(m)
        for p, (oy, ox) in enumerate(neighbours):
            acc.add_(alpha[:, p : p + 1] * shifted(mp_, oy, ox))
        m = acc
    return m[0].permute(1, 2, 0)


def _run_torch(inputs: str, output: str, num_iter: int, dilations: tuple[int, ...], repeats: int,
               impl=None) -> dict:
    import torch

    impl = impl or _torch_pamr

    data = np.load(inputs)
    image, masks = torch.from_numpy(data["image"]), torch.from_numpy(data["masks"])
    with torch.inference_mode():
        peak_ok = _reset_peak()
        base = _rss_mb("VmRSS")
        impl(image, masks, num_iter, dilations)  # warm-up
        times, out = _time_runs(lambda: impl(image, masks, num_iter, dilations), repeats)
        peak = _rss_mb("VmHWM") - base if peak_ok else float("nan")
    np.save(output, out.numpy())
    return dict(compile_s=0.0, times=times, peak_mb=peak, xla_mb=float("nan"), threads=torch.get_num_threads())


def _child(kind, queue, threads, *args):
    if threads == 1:
        # Must precede the first import of jax/torch in this fresh process.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        os.environ["OMP_NUM_THREADS"] = "1"
        if kind != "jax":
            import torch

            torch.set_num_threads(1)
    runners = {
        "jax": _run_jax,
        "torch": _run_torch,
        "torch_slices": lambda *a: _run_torch(*a, impl=_torch_pamr_slices),
    }
    try:
        queue.put(("ok", runners[kind](*args)))
    except Exception as e:  # report, don't hang the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _in_subprocess(kind: str, threads: int, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kind, queue, threads) + args)
    proc.start()
    status, result = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{kind} benchmark failed: {result}")
    return result


def main(argv):
    del argv
    dilations = tuple(int(d) for d in _DILATIONS.value)
    sizes = [int(s) for s in _SIZES.value]
    frameworks = [f.strip() for f in _FRAMEWORKS.value]
    unknown = set(frameworks) - {"jax", "torch", "torch_slices"}
    if unknown:
        raise app.UsageError(f"--frameworks accepts jax, torch and torch_slices; got {sorted(unknown)}.")
    print(f"PAMR: K={_NUM_LABELS.value} labels, {_NUM_ITER.value} iterations, dilations {dilations}, "
          f"median of {_REPEATS.value} runs, float32, {os.cpu_count()} CPUs, "
          f"threads: {'1 each' if _THREADS.value == 1 else 'framework defaults'}")
    header = (f"{'size':>9} {'impl':>6} {'compile s':>10} {'run s':>8} {'peak RSS MB':>12} {'XLA MB':>8}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            image, masks = _synthetic(size, _NUM_LABELS.value, _SEED.value)
            inputs = os.path.join(tmp, f"in_{size}.npz")
            np.savez(inputs, image=image, masks=masks)
            results = {}
            for kind in frameworks:
                print(f"running {kind} at {size}x{size} ...", flush=True)
                out_path = os.path.join(tmp, f"{kind}_{size}.npy")
                results[kind] = _in_subprocess(kind, _THREADS.value, inputs, out_path, _NUM_ITER.value, dilations, _REPEATS.value)
                results[kind]["out"] = out_path
            rows.append((size, results))
            print(header)
            for kind, r in results.items():
                print(f"{size:>4}x{size:<4} {kind:>6} {r['compile_s']:>10.2f} {statistics.median(r['times']):>8.3f} "
                      f"{r['peak_mb']:>12.0f} {r['xla_mb']:>8.0f}")
            if "jax" in results:
                jax_out = np.load(results["jax"]["out"])
                t_jax = statistics.median(results["jax"]["times"])
                for kind in (k for k in results if k != "jax"):
                    r = results[kind]
                    diff = np.max(np.abs(jax_out - np.load(r["out"])))
                    print(f"  {kind}/jax: time {statistics.median(r['times']) / t_jax:.2f}x, "
                          f"peak memory {r['peak_mb'] / results['jax']['peak_mb']:.2f}x, "
                          f"max |jax - {kind}| = {diff:.2e} (torch threads: {r['threads']})")

if __name__ == "__main__":
    app.run(main)
