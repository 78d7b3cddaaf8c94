r"""Benchmark: how long the batch loop keeps the device waiting on the host, with the input pipeline and the
output writer (``--loader_workers=N``) against the loop reading, preparing and writing in its own thread
(``--loader_workers=0``: the same per-image code, run where the loop ran it before the pipeline).

The loop is synchronous (each batch's backbone and method are waited for), so the device idles whenever the loop's
thread works on the host. Of that host work, the pipeline moves two stages off the critical path: ``load`` (now
the wait for a batch read ahead) and ``write`` (now the wait for the writer plus the log appends). Their sum is
printed as *stall*: the device idle time this item is about. ``score`` (PAMR's dispatch and the Hungarian match on
the host) is the same in every setting and is printed beside it. Each round runs every setting once in a fresh
output folder, in an order that alternates between rounds (this VM's speed drifts within minutes); the first round
compiles and is not counted; medians over the counted rounds.

Usage:
  python -m experiments.bench_input_pipeline                   # the demo as experiments.run runs it
  python -m experiments.bench_input_pipeline --source=files    # the demo saved as 1024 x 768 JPEG + PNG files
  python -m experiments.bench_input_pipeline --workers=0,1,2,4 --rounds=4

Measured 2026-12-02 on this shared 2-core CPU (load average 7-10 from other jobs), handcrafted backbone at 256 px,
batch 4, SPARK with the backbone's preset, medians of 3 counted rounds (seconds; stall = load + write):

  source                          loader_workers   wall    stall   load    write   score   method   stall/wall
  demo (8 images + 4 photos)      0                32.6    1.33    0.25    1.09    1.87    23.8     4.1%
                                  4                36.4    0.38    0.12    0.27    2.46    24.3     1.0%
  files (8 JPEGs, 1024 x 768)     0                23.0    0.94    0.20    0.73    0.33    15.0     4.1%
                                  4                17.1    0.31    0.12    0.23    0.39    12.2     1.8%

The stall falls 2.6-5.0x in every round (in-round ratios: demo 3.1, 2.6, 5.0; files 3.1, 2.6, 2.6). What is left
of it is the first batch's read (nothing runs before it to hide it behind), the last batch's writes (the final
flush) and the per-image log appends, each fsynced in the loop's thread (the log is committed there, in order, so
that an interrupted run's log holds exactly the images reported done). The wall times are not comparable here:
the method's time alone moves by ~30% between rounds on this VM, and on a CPU the "device" is the same two cores,
so work moved to a thread still competes with the backbone and the method for them (score and method rise a
little with threads); on a GPU the overlap is free. An earlier run of 16 demo images + 4 photos gave stall 2.63 ->
0.74 s (3.6x, 3.4% -> 0.8% of the wall).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags
from PIL import Image

from spark_jax.data.base import FileDataset
from spark_jax.data.demo import DEMO_LABEL_SPACE, DEMO_RAW_LABELS, DemoDataset, demo_image
from spark_jax.runner import RunConfig, run

_SOURCE = flags.DEFINE_enum("source", "demo", ["demo", "files"],
                            "demo: the procedural demo (painted in memory) and its photographs, as experiments.run "
                            "reads it; files: the demo images saved as JPEG (quality 90) with PNG labels at "
                            "--file_size and read back through FileDataset, as a benchmark's files are.")
_WORKERS = flags.DEFINE_list("workers", ["0", "4"], "--loader_workers settings to compare (0: in the loop's thread).")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Counted rounds (after one warm-up round).")
_IMAGES = flags.DEFINE_integer("images", 8, "Demo images per run (experiments.run's demo: 8, with 4 photographs).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Images per batch.")
_FILE_SIZE = flags.DEFINE_list("file_size", ["1024", "768"], "Width, height of the saved images (--source=files).")

_STAGES = ("load", "write", "score", "backbone", "method")


def _file_dataset(folder: str, n: int, width: int, height: int) -> FileDataset:
    """The first ``n`` demo images upscaled to ``width`` x ``height`` (bicubic; labels nearest), saved as a
    JPEG + PNG pair each and listed as a FileDataset."""
    os.makedirs(folder, exist_ok=True)
    items = []
    for i in range(n):
        s = demo_image(i)
        image = Image.fromarray(s.image).resize((width, height), Image.BICUBIC)
        label = Image.fromarray(s.label.astype("uint8")).resize((width, height), Image.NEAREST)
        img_path, lab_path = os.path.join(folder, f"{s.image_id}.jpg"), os.path.join(folder, f"{s.image_id}.png")
        image.save(img_path, quality=90)
        label.save(lab_path)
        items.append((s.image_id, img_path, lab_path))
    return FileDataset("demo", DEMO_LABEL_SPACE, items, DEMO_RAW_LABELS, root=folder, layout="(generated)",
                       source="experiments.bench_input_pipeline")


def _one_run(ds, workers: int, folder: str) -> dict[str, float]:
    cfg = RunConfig(dataset="demo", backbone="handcrafted", batch_size=_BATCH.value, output_dir=folder,
                    loader_workers=workers, demo_images=_IMAGES.value)
    t = time.perf_counter()
    m = run(cfg, dataset=ds, quiet=True)
    out = {k: m["timing"]["stage_seconds"][k] for k in _STAGES}
    out["wall"] = time.perf_counter() - t
    out["stall"] = out["load"] + out["write"]
    out["images"] = m["num_images"]
    return out


def main(argv):
    del argv
    workers = [int(w) for w in _WORKERS.value]
    with tempfile.TemporaryDirectory() as tmp:
        if _SOURCE.value == "files":
            width, height = (int(v) for v in _FILE_SIZE.value)
            ds = _file_dataset(os.path.join(tmp, "data"), _IMAGES.value, width, height)
        else:
            ds = DemoDataset(num_images=_IMAGES.value)
        results: dict[int, list[dict[str, float]]] = {w: [] for w in workers}
        for r in range(_ROUNDS.value + 1):
            order = workers if r % 2 == 0 else workers[::-1]
            for w in order:
                res = _one_run(ds, w, os.path.join(tmp, f"run-{r}-{w}"))
                if r > 0:  # round 0 compiles
                    results[w].append(res)
                print(f"round {r}{' (warm-up)' if r == 0 else ''} workers={w}: wall {res['wall']:.2f} s, stall "
                      f"{res['stall']:.3f} s (load {res['load']:.3f}, write {res['write']:.3f})", flush=True)

    n = results[workers[0]][0]["images"]
    print(f"\nsource={_SOURCE.value}, {n} images, batch {_BATCH.value}, medians of {_ROUNDS.value} rounds (seconds):")
    head = f"{'loader_workers':>14} {'wall':>7} {'stall':>7} {'load':>7} {'write':>7} {'score':>7} {'backbone':>8} " \
           f"{'method':>7} {'stall/wall':>10}"
    print(head)
    med = {w: {k: statistics.median(x[k] for x in results[w]) for k in (*_STAGES, "wall", "stall")}
           for w in workers}
    for w in workers:
        m = med[w]
        print(f"{w:>14} {m['wall']:7.2f} {m['stall']:7.3f} {m['load']:7.3f} {m['write']:7.3f} {m['score']:7.3f} "
              f"{m['backbone']:8.3f} {m['method']:7.3f} {m['stall'] / m['wall']:10.1%}")
    base = med[workers[0]]
    for w in workers[1:]:
        ratios = [a["stall"] / b["stall"] for a, b in zip(results[workers[0]], results[w]) if b["stall"] > 0]
        walls = [a["wall"] / b["wall"] for a, b in zip(results[workers[0]], results[w])]
        print(f"workers={w} vs {workers[0]}: stall {base['stall']:.3f} -> {med[w]['stall']:.3f} s "
              f"(in-round ratios {', '.join(f'{x:.1f}x' for x in ratios)}); wall in-round ratios "
              f"{', '.join(f'{x:.2f}x' for x in walls)}")


if __name__ == "__main__":
    app.run(main)
