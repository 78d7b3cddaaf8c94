"""``run``: one method on one benchmark, as a short sequence of named steps (see the package docstring)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from spark_jax.data import Dataset, get_dataset
from spark_jax.evaluation import Evaluator
from spark_jax.runner.backbones import ResolvedBackbone, as_resolved, backbone_resolution, digest
from spark_jax.runner.config import RunConfig
from spark_jax.runner.loop import RunState, run_batches, verify_data
from spark_jax.runner.metrics import clustering_time, diagnostics_mean, nonfinite_summary, progress_bar, versions
from spark_jax.runner.rundir import atomic_write_json, open_log, open_run_dir
from spark_jax.runner.scoring import restore_scores

__all__ = ["open_dataset", "run", "run_identity"]


def open_dataset(cfg: RunConfig) -> Dataset:
    """The dataset ``cfg`` names (the demo with its size and photos)."""
    kwargs = {"num_images": cfg.demo_images, "photos": cfg.demo_photos} if cfg.dataset == "demo" else {}
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
) -> dict[str, Any]:
    """Evaluates ``cfg.method`` on ``cfg.dataset``; resumes what ``cfg.output_dir`` already holds.

    Args:
        cfg: the run's configuration.
        dataset: use this dataset object instead of ``get_dataset(cfg.dataset, cfg.data_dir)``.
        backbone: a :class:`ResolvedBackbone` (from :func:`resolve_backbone`, to load a checkpoint once for
            several runs), or a backbone to use instead of the one ``cfg`` selects: one with taps
            (``feature_tap``, ``tap_grid``, ``extract(images, taps)`` or ``extract_prepared(prepared, taps)``, a
            ``resolution``), or a feature extractor with ``extract_features(images [B, H, W, 3] uint8) -> [B, h,
            w, C]`` and a ``resolution`` (or ``cfg.resolution``) attribute (``extract_features_prepared(x [B, S, S,
            3])`` is used when present), which provides only the features.
        on_image: called with each image id once its results are persisted.
        quiet: no progress bar.

    Returns:
        The contents of ``metrics.json``.
    """
    t_start = time.perf_counter()
    ds = dataset if dataset is not None else open_dataset(cfg)
    bb = as_resolved(cfg, backbone)
    cfg = cfg.resolved(bb.kind)  # the method's config made concrete (SPARK: the backbone's preset)
    resolution = backbone_resolution(bb.backbone)

    # The run directory: refuses another run's folder, returns what earlier sessions finished.
    identity = run_identity(cfg, ds, bb, resolution)
    logged = open_run_dir(cfg.output_dir, identity)
    results_path = os.path.join(cfg.output_dir, "results.jsonl")
    ids = ds.ids
    selection = list(range(len(ids) if cfg.limit is None else min(cfg.limit, len(ids))))
    wanted = {ids[i] for i in selection}
    # Only images of this run's selection count (a previous run may have had a larger --limit).
    state = RunState(Evaluator(ds.label_space, cfg.protocol), [r for r in logged if r["id"] in wanted], [])
    restore_scores(state.evaluator, state.records, results_path)
    done = {r["id"] for r in state.records}

    pending, state.skipped = verify_data(ds, [i for i in selection if ids[i] not in done], cfg.on_bad_sample, quiet)
    progress = progress_bar(len(selection) - len(state.skipped), len(done), quiet, f"{ds.name} / {cfg.method}")
    with open_log(results_path) as log:
        run_batches(cfg, ds, bb, resolution, pending, state, log, on_image=on_image, progress=progress)
    progress.close()

    metrics = build_metrics(cfg, ds, identity, state, time.perf_counter() - t_start, len(pending))
    atomic_write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
    return metrics


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
