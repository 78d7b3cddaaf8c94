r"""Regenerates the demo table of docs/evaluation.md from real runs: ``python -m experiments.demo_table``.

Runs each command of :data:`COMMANDS` (the README's main command first) as a user would, in a fresh process,
reads its ``metrics.json`` and writes

* ``docs/demo_runs.json``: per command, the flags, mIoU, pixel accuracy, segments per image, scored images, the
  wall time and the machine;
* the table between the ``demo-table`` markers of ``docs/evaluation.md``, rendered from that file.

``tests/test_docs.py`` checks that the table is the rendering of the recorded runs (so the docs cannot drift from
what was measured) and, under ``-m slow``, that the main command still scores what was recorded. About 4-5
minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("docs_dir", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs"),
                    "Folder holding evaluation.md and demo_runs.json.")

# (flags, what the row shows). Every command runs the default 8 demo images + 4 photos (overlays only).
COMMANDS: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "the main command: SPARK with the handcrafted backbone's calibrated preset"),
    (("--spark_preset=paper",), "SPARK with the paper's settings (tuned on SSD-1B features)"),
    (("--method=diffcut",), "DiffCut's recursive NCut (released-code defaults)"),
    (("--method=autosc",), "AutoSC"),
    (("--method=kmeans",), "K-means with K* from the ground truth (an oracle)"),
)

BEGIN, END = "<!-- demo-table:begin (python -m experiments.demo_table) -->", "<!-- demo-table:end -->"


def run_command(extra: tuple[str, ...], output_dir: str, env: dict[str, str] | None = None) -> dict:
    """Runs ``python -m experiments.run`` with ``extra`` flags into ``output_dir``; returns the table's fields."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "experiments.run", *extra, f"--output_dir={output_dir}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(output_dir, "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)
    return {
        "flags": list(extra),
        "miou": round(100 * m["miou"], 1),
        "pixel_accuracy": round(100 * m["pixel_accuracy"], 1),
        "segments_per_image": round(m["diagnostics_mean"].get("num_segments", float("nan")), 1),
        "num_images_scored": m["num_images_scored"],
        "seconds": round(seconds),
        "spark_preset": (m.get("spark_preset") or {}).get("name"),
    }


def render(record: dict) -> str:
    """The markdown table of a ``demo_runs.json`` record."""
    lines = [
        BEGIN,
        "",
        f"Measured by `python -m experiments.demo_table` on {record['machine']} ({record['date']}); "
        f"{record['runs'][0]['num_images_scored']} scored demo images, 256 px input, 32x32 tokens, PAMR on, "
        "wall time including compilation.",
        "",
        "| command | what | mIoU | pixel acc. | segments / image | time |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in record["runs"]:
        cmd = " ".join(["python -m experiments.run", *r["flags"]])
        lines.append(f"| `{cmd}` | {r['what']} | {r['miou']:.1f} | {r['pixel_accuracy']:.1f} | "
                     f"{r['segments_per_image']:.1f} | {r['seconds']} s |")
    lines += ["", END]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with the block between the markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"docs/evaluation.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + table + tail


def main(argv):
    del argv
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (extra, what) in enumerate(COMMANDS):
            row = run_command(extra, os.path.join(tmp, str(k)))
            row["what"] = what
            runs.append(row)
            print(f"{' '.join(extra) or '(defaults)'}: mIoU {row['miou']:.1f}, {row['segments_per_image']:.1f} "
                  f"segments/image, {row['seconds']} s", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if model:
            machine = f"{model}, {os.cpu_count()} cores"
    except OSError:
        pass
    record = {"machine": machine, "date": time.strftime("%Y-%m-%d"), "runs": runs}
    with open(os.path.join(FLAGS.docs_dir, "demo_runs.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    path = os.path.join(FLAGS.docs_dir, "evaluation.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(replace_table(text, render(record)))
    print(f"wrote {path} and demo_runs.json")


if __name__ == "__main__":
    app.run(main)
