r"""Benchmark runner: ``python -m experiments.run --dataset=NAME [flags]``.

With no flags it runs the embedded demo benchmark (procedural images with exact ground truth, nothing to
download) with the weights-free handcrafted backbone — a smoke test of the whole pipeline, not the paper's
numbers — and SPARK's calibrated preset for that backbone (``--spark_preset=paper`` for the paper's values).
What it scores, and its variants, are in docs/evaluation.md's demo table (``python -m experiments.demo_table``
regenerates it); about a minute on a 2-core CPU. For Table 1, give a dataset and a checkpoint, e.g.::

    python -m experiments.run --dataset=voc --data_dir=/data/VOCdevkit --checkpoint=/models/SSD-1B \
        --output_dir=runs/voc-spark

``--method=spark|diffcut|autosc|kmeans`` (or any method registered in :data:`spark_jax.methods.REGISTRY`)
selects SPARK or one of its baselines, all on the same features, upsampling, PAMR and scoring. Every method's
hyperparameters are flags with its prefix, generated from its config: ``--spark_beta``, ``--spark_inflation``,
``--spark_global_source``, ... (given explicitly, they override the preset's values), ``--ncut_tau``,
``--ncut_alpha``, ``--autosc_alphas``, ``--kmeans_k=gt|K``, ... (see experiments/run_flags.py). Deprecated: the
unprefixed SPARK flags of earlier releases (``--beta``, ``--inflation``, ...) are still accepted for one release as
aliases of ``--spark_beta``, ``--spark_inflation``, ....
Runs resume: rerunning the same command continues where it stopped. ``--feature_cache=DIR`` keeps the
backbone's features so that sweeps over SPARK's hyperparameters skip the backbone.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments import run_flags
from spark_jax import distributed
from spark_jax.data import DATASETS, DatasetNotFoundError
from spark_jax.methods import REGISTRY
from spark_jax.openvocab.benchmarks import BENCHMARKS as OPEN_VOCAB_BENCHMARKS
from spark_jax.runner import BackboneNotFoundError, OutputPathError, RunConfig, run

FLAGS = flags.FLAGS

flags.DEFINE_enum("dataset", "demo", sorted({*DATASETS, *OPEN_VOCAB_BENCHMARKS}),
                  "Benchmark to evaluate (under --protocol=open_vocab: one of "
                  f"{', '.join(OPEN_VOCAB_BENCHMARKS)}).")
flags.DEFINE_string("method", "spark",
                    f"Segmentation method, one of {', '.join(REGISTRY)} (or one registered later): spark, or a "
                    "baseline on the same features, upsampling, PAMR and scoring: diffcut (recursive NCut), autosc "
                    "(eigengap spectral clustering), kmeans. Its flags carry its prefix (--spark_beta, --ncut_tau, "
                    "--autosc_alphas, --kmeans_k, ...).")


def _known_method(name: str) -> bool:
    if name not in REGISTRY:  # checked when the flags are parsed: a method registered after import counts
        raise flags.ValidationError(f"--method={name!r} is not a registered method; choose among "
                                    f"{', '.join(REGISTRY)}")
    return True


flags.register_validator("method", _known_method)
flags.DEFINE_bool("pamr", True, "Refine with PAMR after the background merge (the paper's setting).")
flags.DEFINE_bool("distributed", False, "One process per host (jax.distributed): each evaluates its share of the "
                  "images on its devices; process 0 writes metrics.json. Without the next three flags JAX detects "
                  "them (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes). See the README.")
flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0, reachable by all.")
flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes (hosts).")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's rank, 0 .. num_processes - 1.")
flags.DEFINE_enum("upsampling", None, ["soft_labels", "concept"],
                  "Token labels -> masks: SPARK's soft-label upsampling or DiffCut's concept assignment (default: "
                  "the method's own: soft_labels for spark, concept for the baselines).")


def config_from_flags() -> RunConfig:
    output_dir = FLAGS.output_dir or f"outputs/{FLAGS.dataset}-{FLAGS.method}-{FLAGS.protocol}"
    return run_flags.run_config_from_flags(dataset=FLAGS.dataset, method=FLAGS.method, output_dir=output_dir,
                                           pamr=FLAGS.pamr, upsampling=FLAGS.upsampling)


def summary_lines(metrics: dict) -> list[str]:
    """What the run printed last: the score, what it was computed on, what was left out, where to look."""
    lines = [f"{metrics['dataset']} / {metrics['method']} / protocol {metrics['protocol']}: "
             f"mIoU {100 * metrics['miou']:.1f} over {metrics['num_images_scored']} scored images "
             f"(pixel accuracy {100 * metrics['pixel_accuracy']:.1f})"]
    segments = metrics["diagnostics_mean"].get("num_segments")
    if segments is not None:
        lines.append(f"segments per image: {segments:.1f} (mean)")
    clustering = metrics["clustering_seconds_per_image"]
    if clustering["num_images"]:
        lines.append(f"clustering time per image: mean {1e3 * clustering['mean']:.1f} ms, median "
                     f"{1e3 * clustering['median']:.1f} ms (method call on device, batch size "
                     f"{clustering['batch_size']})")
    if metrics.get("spark_preset"):
        preset = metrics["spark_preset"]
        lines.append(f"SPARK settings: preset {preset['name']} ({preset['how_chosen']})")
    lines.append(f"backbone: {metrics['config']['backbone']}")
    unscored = [u for u in metrics.get("unscored", []) if u["reason"] != "no label map"]
    for u in unscored:
        lines.append(f"not scored: {u['id']}: {u['reason']}")
    for s in metrics.get("skipped", []):
        lines.append(f"skipped (--on_bad_sample=skip): {s['id']}: {s['path']}: {s['reason']}")
    bad = metrics.get("nonfinite_features", {})
    if bad.get("num_images"):
        lines.append(f"warning: {bad['num_tokens']} non-finite feature tokens in {bad['num_images']} images were "
                     "treated as zero vectors (--allow_nonfinite_features)")
    for note in metrics.get("notes", []):
        lines.append(f"note: {note}")
    if metrics["config"]["backbone"].startswith("handcrafted"):
        lines.append("note: these are demo features (the weights-free handcrafted backbone), not the paper's SSD-1B "
                     "features: the scores say the pipeline works, not how SPARK does on the benchmarks.")
    lines.append(f"metrics: {metrics['output_dir']}/metrics.json")
    lines.append(f"overlays: {metrics['overlays']}")
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        # Before any JAX computation: the distributed runtime must start first.
        distributed.initialize(distributed.DistributedConfig(FLAGS.distributed, FLAGS.coordinator_address,
                                                             FLAGS.num_processes, FLAGS.process_id))
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_flags()
        metrics = run(cfg)
    except (DatasetNotFoundError, BackboneNotFoundError, OutputPathError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(metrics)))
    return 0


if __name__ == "__main__":
    app.run(main)
