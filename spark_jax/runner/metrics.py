"""``metrics.json``: the scores, what they were computed on, what was left out, timing, versions."""

from __future__ import annotations

import platform
import sys
from typing import Any

import jax
import numpy as np
import tqdm

__all__ = ["diagnostics_mean", "progress_bar", "versions"]


def versions() -> dict[str, str]:
    """The versions of the packages a result depends on, and the devices it ran on."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "scipy", "pillow", "spark_jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["devices"] = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    return out


def progress_bar(total: int, done: int, quiet: bool, desc: str):
    """The run's progress bar (images/s and ETA from tqdm; the running mIoU as its postfix)."""
    return tqdm.tqdm(total=total, initial=done, unit="img", desc=desc, disable=quiet, dynamic_ncols=True,
                     file=sys.stderr)


def diagnostics_mean(records: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, float]:
    """The mean of each per-image diagnostic over the records holding it (``names``: those, else every one)."""
    if names is None:
        names = sorted({k for r in records for k in r.get("diagnostics", {})})
    out = {}
    for k in names:
        values = [r["diagnostics"][k] for r in records if k in r.get("diagnostics", {})]
        if values:
            out[k] = float(np.mean(values))
    return out


def clustering_time(records: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """Per-image time of the jitted method call, over the records."""
    t = np.asarray([r["clustering_seconds"] for r in records if "clustering_seconds" in r], np.float64)
    return {
        "mean": float(np.mean(t)) if t.size else None,
        "median": float(np.median(t)) if t.size else None,
        "num_images": int(t.size),
        "batch_size": batch_size,
        "what": "the jitted method call (token clustering + upsampling to the mask size) on device, per "
                "image (batch time / batch size); excludes the backbone, compilation, PAMR and scoring",
    }


def nonfinite_summary(records: list[dict[str, Any]], allowed: bool) -> dict[str, Any]:
    return {
        "allowed": allowed,
        "num_images": sum(1 for r in records if r.get("nonfinite_feature_tokens", 0) > 0),
        "num_tokens": sum(r.get("nonfinite_feature_tokens", 0) for r in records),
    }
