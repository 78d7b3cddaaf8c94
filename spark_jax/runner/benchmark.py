"""``run``: one method on one benchmark, as a short sequence of named steps (see the package docstring)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from spark_jax import distributed, sharding
from spark_jax.data import Dataset, get_dataset
from spark_jax.evaluation import Evaluator
from spark_jax.runner.backbones import ResolvedBackbone, as_resolved, backbone_resolution, digest
from spark_jax.runner.config import RunConfig
from spark_jax.runner.loop import RunState, batch_slots, run_batches, verify_data
from spark_jax.runner.metrics import clustering_time, diagnostics_mean, nonfinite_summary, progress_bar, versions
from spark_jax.runner.rundir import atomic_write_json, log_path, open_log, open_run_dir
from spark_jax.runner.open_vocab import open_vocab_dataset, setup_open_vocab
from spark_jax.runner.scoring import make_evaluator, restore_scores

__all__ = ["open_dataset", "run", "run_identity"]


def open_dataset(cfg: RunConfig) -> Dataset:
    """The dataset ``cfg`` names (the demo with its size and photos)."""
    kwargs = {"num_images": cfg.demo_images, "photos": cfg.demo_photos} if cfg.dataset == "demo" else {}
    if cfg.protocol == "open_vocab":  # the open-vocabulary benchmarks (voc21, voc20, ...)
        return open_vocab_dataset(cfg, **kwargs)
    return get_dataset(cfg.dataset, cfg.data_dir, **kwargs)


def run_identity(cfg: RunConfig, ds: Dataset, bb: ResolvedBackbone, resolution: int) -> dict[str, Any]:
    """The run's identity, ``run_config.json``: its configuration, the backbone, the data folder and the list of
    images it reads (a resume against another copy or version of the dataset is refused, not mixed in)."""
    ids = ds.ids
    return {"run": cfg.to_json(), "backbone": bb.description, "backbone_key": bb.key, "resolution": resolution,
            "data_dir": None if cfg.data_dir is None else os.path.realpath(cfg.data_dir),
            "image_list": {"num_images": len(ids), "sha256": digest("\n".join(ids))}}


def run(
    cfg: RunConfig,
    *,
    dataset: Dataset | None = None,
    backbone: Any | None = None,
    on_image: Callable[[str], None] | None = None,
    quiet: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Evaluates ``cfg.method`` on ``cfg.dataset``; resumes what ``cfg.output_dir`` already holds.

    Every device of the process takes part (:mod:`spark_jax.sharding`): batches of ``cfg.batch_size`` images,
    rounded up to a multiple of the device count, are split over them. Started on several hosts (one process each,
    :func:`spark_jax.distributed.initialize`), every process calls ``run`` with the same arguments: each evaluates
    its share of the pending images and logs them in its own resume log; the scores are rebuilt from every
    process's per-image counts, and process 0 alone writes ``metrics.json`` (every process returns it).

    Args:
        cfg: the run's configuration.
        dataset: use this dataset object instead of ``get_dataset(cfg.dataset, cfg.data_dir)``.
        backbone: a :class:`ResolvedBackbone` (from :func:`resolve_backbone`, to load a checkpoint once for
            several runs), or a backbone to use instead of the one ``cfg`` selects: one with taps
            (``feature_tap``, ``tap_grid``, ``extract(images, taps)`` or ``extract_prepared(prepared, taps)``, a
            ``resolution``), or a feature extractor with ``extract_features(images [B, H, W, 3] uint8) -> [B, h,
            w, C]`` and a ``resolution`` (or ``cfg.resolution``) attribute (``extract_features_prepared(x [B, S, S,
            3])`` is used when present), which provides only the features.
        on_image: called with each image id once its results are persisted (this process's images).
        quiet: no progress bar.
        devices: this process's devices to split the batches over (default: all of them).

    Returns:
        The contents of ``metrics.json``.
    """
    t_start = time.perf_counter()
    ds = dataset if dataset is not None else open_dataset(cfg)
    ov = setup_open_vocab(cfg, ds)  # open vocabulary: CLIP and the vocabulary, before the diffusion weights load
    bb = as_resolved(cfg, backbone)
    cfg = cfg.resolved(bb.kind)  # the method's config made concrete (SPARK: the backbone's preset)
    resolution = backbone_resolution(bb.backbone)
    mesh = sharding.data_mesh(devices)
    processes = jax.process_count()

    # The run directory: refuses another run's folder, returns what earlier sessions (of any process) finished.
    identity = run_identity(cfg, ds, bb, resolution)
    if ov is not None:
        identity["open_vocab"] = ov.identity()
    logged = open_run_dir(cfg.output_dir, identity)
    results_path = log_path(cfg.output_dir, jax.process_index())
    logs = results_path if processes == 1 else os.path.join(cfg.output_dir, "results*.jsonl")
    ids = ds.ids
    selection = list(range(len(ids) if cfg.limit is None else min(cfg.limit, len(ids))))
    wanted = {ids[i] for i in selection}
    # Only images of this run's selection count (a previous run may have had a larger --limit).
    earlier = [r for r in logged if r["id"] in wanted]
    state = RunState(make_evaluator(ds.label_space, cfg.protocol), list(earlier), [])
    restore_scores(state.evaluator, state.records, logs)
    done = {r["id"] for r in state.records}

    # This process's share of what is left (all of it with one process): every process computed the same list.
    mine = distributed.process_shard([i for i in selection if ids[i] not in done])
    pending, state.skipped = distributed.run_together(lambda: verify_data(ds, mine, cfg.on_bad_sample, quiet))
    desc = f"{ds.name} / {cfg.method}" + (f" / process {jax.process_index()} of {processes}" if processes > 1 else "")
    progress = (progress_bar(len(selection) - len(state.skipped), len(done), quiet, desc) if processes == 1
                else progress_bar(len(pending), 0, quiet, desc))
    with open_log(results_path) as log:
        distributed.run_together(lambda: run_batches(cfg, ds, bb, resolution, pending, state, log,
                                                     on_image=on_image, progress=progress, mesh=mesh,
                                                     open_vocab=ov))
    progress.close()

    num_pending = len(pending)
    if processes > 1:
        state, num_pending = merge_processes(state, earlier, ds, cfg, logs), distributed.process_sum(num_pending)
    metrics = build_metrics(cfg, ds, identity, state, time.perf_counter() - t_start, num_pending)
    if ov is not None:
        metrics.update(ov.metrics(state.evaluator.result()))
    metrics["timing"].update(num_processes=processes, devices_per_process=mesh.size,
                             batch_slots=batch_slots(cfg.batch_size, mesh))
    if distributed.is_main_process():
        atomic_write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    distributed.barrier("spark_jax: metrics written")
    return metrics


def merge_processes(state: RunState, earlier: list[dict[str, Any]], ds: Dataset, cfg: RunConfig,
                    logs: str) -> RunState:
    """The whole run's state from every process's: the records of earlier sessions (every process holds the same),
    then each process's new records in process order (the order of the pending list: the shares are contiguous),
    the skipped samples, the stage seconds summed over processes, and the scores rebuilt from the per-image TP /
    FP / FN counts of all of them (sums of counts, as one process would have made: never a mean of means)."""
    parts = distributed.gather_objects({"records": state.records[len(earlier):], "skipped": state.skipped})
    records = list(earlier) + [r for p in parts for r in p["records"]]
    merged = RunState(make_evaluator(ds.label_space, cfg.protocol), records, [s for p in parts for s in p["skipped"]],
                      timing=distributed.process_sum(dict(state.timing)))
    restore_scores(merged.evaluator, records, logs)
    return merged


def build_metrics(cfg: RunConfig, ds: Dataset, identity: dict[str, Any], state: RunState, elapsed: float,
                  num_pending: int) -> dict[str, Any]:
    """The contents of ``metrics.json``."""
    result = state.evaluator.result()
    records = state.records
    out = cfg.output_dir
    return {
        "dataset": ds.name,
        "method": cfg.method,
        "protocol": cfg.protocol,
        "miou": result["miou"],
        "pixel_accuracy": result["pixel_accuracy"],
        "num_images_scored": result["num_images"],
        "num_images": len(records),
        "unscored": [{"id": r["id"], "reason": r.get("unscored_reason", "no label map")}
                     for r in records if not r.get("scored")],
        "skipped": state.skipped,
        "nonfinite_features": nonfinite_summary(records, cfg.allow_nonfinite_features),
        "per_class_iou": result["per_class_iou"],
        "diagnostics_mean": diagnostics_mean(records, list(cfg.spec.diagnostics)),
        "clustering_seconds_per_image": clustering_time(records, cfg.batch_size),
        "config": identity,
        "versions": versions(),
        "timing": {
            "this_session_seconds": elapsed,
            "note": "stage 'compile' includes one warm-up call of the method",
            "images_this_session": num_pending,
            "images_per_second": num_pending / elapsed if elapsed > 0 and num_pending else None,
            "stage_seconds": state.timing,
        },
        "notes": [n for n in (getattr(ds, "note", ""),) if n],
        "output_dir": os.path.abspath(out),
        "overlays": os.path.abspath(os.path.join(out, "overlays")),
        **(cfg.spec.metrics(cfg.method_config) if cfg.spec.metrics is not None else {}),
    }
