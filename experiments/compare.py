r"""Side-by-side comparison: ``python -m experiments.compare [flags]``.

Runs SPARK and the baselines it claims to beat — DiffCut's recursive NCut, AutoSC, K-means, and SPARK with the
global affinity only (Table 2's ablation) — on the same features, upsampling rules, PAMR and scoring, each with
and without PAMR, on the demo benchmark and on every real benchmark found under ``--data_dir`` (absent ones are
skipped with a printed note). The backbone runs once per image: every run reads one feature cache. Writes
``<output_dir>/comparison.md``: mIoU shaped like the paper's Tables 1-2 (rows = methods, columns = datasets,
best in bold, second underlined), and the per-image clustering time (the jitted method call on device,
excluding the backbone, compilation and PAMR; per image the faster of the two runs' measurements).
``comparison.json`` holds the same numbers.

    python -m experiments.compare                              # the demo, handcrafted backbone, ~10 min on 2 CPUs
    python -m experiments.compare --data_dir=/data --checkpoint=/models/SSD-1B --datasets=voc,cityscapes

Every run is an ordinary ``experiments.run`` output folder (``<output_dir>/<dataset>/<method>-pamr`` and
``-nopamr``, with metrics.json, predictions and overlays) and resumes: rerunning the command continues where it
stopped and rebuilds the tables from the metrics.json files. Every hyperparameter flag of ``experiments.run``
applies (``--spark_beta``, ``--ncut_tau``, ``--kmeans_k``, ...; each method reads its own). The library logic is
:mod:`spark_jax.runner.comparison`; this module parses the flags.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments import run_flags
from spark_jax.data import DatasetNotFoundError
from spark_jax.runner import DATASET_ORDER, BackboneNotFoundError, compare, comparison_entries

FLAGS = flags.FLAGS

flags.DEFINE_list("datasets", list(DATASET_ORDER),
                  "Benchmarks to compare on; real ones are looked for under --data_dir and skipped with a note when "
                  "absent.")
flags.DEFINE_list("methods", list(comparison_entries()),
                  f"Methods (and variants) to compare, among {', '.join(comparison_entries())} (and any method "
                  "registered later).")
FLAGS.set_default("batch_size", 1)  # per-image clustering time, as the papers report it


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    output_dir = FLAGS.output_dir or "outputs/compare"
    try:
        base = run_flags.run_config_from_flags()
        summary = compare(base, datasets=FLAGS.datasets, methods=FLAGS.methods, output_dir=output_dir,
                          method_configs=run_flags.method_configs_from_flags())
    except (DatasetNotFoundError, BackboneNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not summary["datasets"]:
        print("error: no dataset available (see the notes above)", file=sys.stderr)
        return 2
    print(f"comparison: {os.path.abspath(os.path.join(output_dir, 'comparison.md'))}")
    return 0


if __name__ == "__main__":
    app.run(main)
