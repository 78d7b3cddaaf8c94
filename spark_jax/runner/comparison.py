"""Side-by-side comparison of methods on the same features, upsampling rules, PAMR and scoring.

:func:`compare` runs every method with and without PAMR on the demo benchmark and on every real benchmark found
under ``data_dir`` (absent ones are skipped with a note). The backbone runs once per image: every run reads one
feature cache. It writes ``<output_dir>/comparison.md`` — mIoU shaped like the paper's Tables 1-2 (rows = methods,
columns = datasets, best in bold, second underlined) and the per-image clustering time (the jitted method call on
device, excluding the backbone, compilation and PAMR; per image the faster of the two runs' measurements) — and
``comparison.json`` with the same numbers. Every run is an ordinary run folder
(``<output_dir>/<dataset>/<method>-pamr`` and ``-nopamr``) and resumes, so rerunning continues where it stopped.
The command line is ``python -m experiments.compare``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from spark_jax.data import DATASETS, Dataset, DatasetNotFoundError, get_dataset
from spark_jax.runner.backbones import ResolvedBackbone, backbone_kind, resolve_backbone
from spark_jax.methods import REGISTRY, MethodSpec, method_spec
from spark_jax.runner.config import RunConfig
from spark_jax.runner.errors import BackboneNotFoundError
from spark_jax.runner.rundir import load_run_results
from spark_jax.runner.benchmark import run

__all__ = ["DATASET_ORDER", "DATASET_TITLES", "Entry", "PUBLISHED", "compare", "comparison_entries", "run_dir",
           "summarize", "to_markdown"]

# Column order of the paper's tables; the demo first.
DATASET_ORDER = ("demo", "voc", "context", "coco_object", "coco_stuff27", "cityscapes", "ade20k")
DATASET_TITLES = {
    "demo": "Demo", "voc": "VOC", "context": "Context", "coco_object": "COCO-Object",
    "coco_stuff27": "COCO-Stuff-27", "cityscapes": "Cityscapes", "ade20k": "ADE20K",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A row of the comparison: a registered method, and the change a variant makes to its resolved config.

    Attributes:
        name: the row's name (``--methods``): the method's, or its variant's.
        method: the method's name in :data:`spark_jax.methods.REGISTRY`.
        title: the row title for a resolved config of the method.
        change: resolved config -> the config the row runs with.
    """

    name: str
    method: str
    title: Callable[[Any], str]
    change: Callable[[Any], Any] = lambda config: config


def comparison_entries(registry: dict[str, MethodSpec] | None = None) -> dict[str, Entry]:
    """The comparison's rows, in registry order: each method, then its variants (SPARK's ``spark_global``).

    Open-vocabulary methods (``spec.open_vocab``: NERVE) are not rows: they name classes with CLIP instead of
    segmenting, so they are scored by ``experiments.run --protocol=open_vocab``, not by this table's per-image
    Hungarian matching.
    """
    out: dict[str, Entry] = {}
    for spec in (REGISTRY if registry is None else registry).values():
        if spec.open_vocab:
            continue
        out[spec.name] = Entry(spec.name, spec.name, spec.title_for)
        for name, variant in spec.variants.items():
            out[name] = Entry(name, spec.name, lambda config, t=variant.title: t, variant.change)
    return out


# Published mIoU with SSD-1B features (reference-facts section 7; DiffCut Table 2 for AutoSC and DiffCut w/o PAMR).
PUBLISHED = {
    ("DiffCut", True): {"voc": 65.2, "context": 56.5, "coco_object": 34.1, "coco_stuff27": 49.1,
                        "cityscapes": 30.6, "ade20k": 44.3},
    ("DiffCut", False): {"voc": 62.0, "context": 54.1, "coco_object": 32.0, "coco_stuff27": 46.1,
                         "cityscapes": 28.4, "ade20k": 42.4},
    ("AutoSC", False): {"voc": 61.5, "context": 53.3, "coco_object": 29.8, "coco_stuff27": 46.9,
                        "cityscapes": 25.3, "ade20k": 38.9},
    ("SPARK w/ global affinity", True): {"voc": 66.0, "context": 56.9, "coco_object": 36.3, "coco_stuff27": 51.7,
                                         "cityscapes": 30.3, "ade20k": 44.1},
    ("SPARK", True): {"voc": 66.9, "context": 57.7, "coco_object": 42.7, "coco_stuff27": 52.0,
                      "cityscapes": 33.9, "ade20k": 48.0},
}

def run_dir(output_dir: str, dataset: str, method: str, pamr: bool) -> str:
    return os.path.join(output_dir, dataset, f"{method}-{'pamr' if pamr else 'nopamr'}")


def _backbone(cfg: RunConfig, loaded: dict[str, ResolvedBackbone]) -> ResolvedBackbone:
    """The backbone ``cfg`` selects, loaded once per kind and diffusion settings for the whole comparison (a method
    with settings of its own, DiffSeg's 512 px / t = 300 / no noise, gets its own diffusion backbone)."""
    kind, _ = backbone_kind(cfg)  # raises BackboneNotFoundError with the download instructions
    key = kind if kind == "handcrafted" else f"{kind}:{cfg.backbone_config(cfg.diffusion_setting('resolution'))!r}"
    if key not in loaded:
        loaded[key] = resolve_backbone(dataclasses.replace(cfg, backbone=kind), only_method_taps=False)  # every method
    return loaded[key]


def compare(
    base: RunConfig,
    *,
    datasets: Sequence[str],
    methods: Sequence[str],
    output_dir: str,
    method_configs: dict[str, Any] | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs every method with and without PAMR on every available dataset and writes ``comparison.md``.

    Args:
        base: the shared configuration (backbone, resolution, protocol, limit, ...); ``dataset``, ``method``,
            ``method_config``, ``pamr`` and ``output_dir`` are set per run. Without a ``feature_cache`` it uses
            ``<output_dir>/features``.
        datasets: registry names; the demo always exists, real ones are read from ``base.data_dir``.
        methods: row names of :func:`comparison_entries` (methods and variants).
        output_dir: folder of the runs and of ``comparison.md`` / ``comparison.json``.
        method_configs: ``{method name: config or None}``, each method's configuration (None or absent: its
            default; SPARK: the backbone's preset); ``base.method_config`` counts for ``base.method``.
        quiet: no progress bars.
        log: where notes and per-run summaries go.

    Returns:
        The contents of ``comparison.json``.
    """
    entries = comparison_entries()
    unknown = sorted(set(methods) - set(entries))
    if unknown:
        vocab = [m for m in unknown if m in REGISTRY and REGISTRY[m].open_vocab]
        why = (f" ({', '.join(vocab)}: open-vocabulary, scored with experiments.run --protocol=open_vocab "
               "--clip_checkpoint=...)" if vocab else "")
        raise ValueError(f"unknown methods {unknown}{why}; choose among {', '.join(entries)}")
    configs = {base.method: base.method_config, **(method_configs or {})}
    for name, config in configs.items():
        if config is not None:
            method_spec(name).validate(config)  # a wrong config type or value is named before any run
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; choose among {', '.join(DATASET_ORDER)}")
    base = dataclasses.replace(base, feature_cache=base.feature_cache or os.path.join(output_dir, "features"))
    loaded: dict[str, ResolvedBackbone] = {}
    notes: list[str] = []
    runs: dict[str, dict[str, dict[str, str]]] = {}  # dataset -> method -> {"pamr"|"nopamr": metrics path}
    titles: dict[str, str] = {}  # row -> its title
    for name in sorted(datasets, key=lambda d: DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER)):
        cfg = dataclasses.replace(base, dataset=name)
        try:
            ds = _dataset(cfg)
            backbone = _backbone(cfg, loaded)
        except (DatasetNotFoundError, BackboneNotFoundError) as err:
            note = f"skipped {name}: {_first_line(err)}"
            notes.append(note)
            log(f"note: {note}")
            continue
        for method in methods:
            entry = entries[method]
            # The method's config for this backbone (SPARK: its preset unless settings are given), then the row's.
            spec = REGISTRY[entry.method]
            config = entry.change(spec.resolve_config(configs.get(entry.method), backbone.kind))
            titles[method] = entry.title(config)
            for pamr in (True, False):
                out = run_dir(output_dir, name, method, pamr)
                rcfg = dataclasses.replace(cfg, method=entry.method, method_config=config, pamr=pamr,
                                           output_dir=out, upsampling=None)
                m = run(rcfg, dataset=ds, backbone=_backbone(rcfg, loaded), quiet=quiet)
                t = m["clustering_seconds_per_image"]
                log(f"{name} / {method} / PAMR {'on ' if pamr else 'off'}: mIoU {100 * m['miou']:5.1f}  "
                    f"clustering {1e3 * (t['median'] or math.nan):7.1f} ms/image (median)  [{out}]")
                runs.setdefault(name, {}).setdefault(method, {})["pamr" if pamr else "nopamr"] = os.path.join(
                    out, "metrics.json")
    for method in methods:  # rows never run (no dataset available) keep the title of the default config
        if method not in titles:
            entry = entries[method]
            titles[method] = entry.title(entry.change(REGISTRY[entry.method].resolve_config(
                configs.get(entry.method), "user")))
    summary = summarize(runs, methods, titles, base.protocol, notes)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, allow_nan=True)
    with open(os.path.join(output_dir, "comparison.md"), "w", encoding="utf-8") as f:
        f.write(to_markdown(summary))
    return summary


def _dataset(cfg: RunConfig) -> Dataset:
    if cfg.dataset == "demo":
        return get_dataset("demo", num_images=cfg.demo_images, photos=cfg.demo_photos)
    if not cfg.data_dir:
        raise DatasetNotFoundError("no --data_dir given")
    return get_dataset(cfg.dataset, cfg.data_dir)


def _first_line(err: Exception) -> str:
    return str(err).strip().split("\n")[0]


def summarize(runs: dict[str, dict[str, dict[str, str]]], methods: Sequence[str], titles: dict[str, str],
              protocol: str, notes: list[str]) -> dict[str, Any]:
    """Reads the runs' metrics.json files (``runs``: dataset -> row -> {"pamr"|"nopamr": path}) into the numbers
    of the tables; ``titles``: each row's title."""
    datasets = list(runs)
    rows = []
    backbones = set()
    for method in methods:
        row: dict[str, Any] = {"method": method, "title": titles[method], "datasets": {}}
        for name in datasets:
            paths = runs[name].get(method)
            if not paths:
                continue
            cell: dict[str, Any] = {}
            best: dict[str, float] = {}  # image id -> its fastest clustering time over the runs
            for key, path in paths.items():
                with open(path, encoding="utf-8") as f:
                    m = json.load(f)
                backbones.add(m["config"]["backbone"])
                cell[f"miou_{key}"] = m["miou"]
                cell["num_images_scored"] = m["num_images_scored"]
                cell[f"clustering_median_s_{key}"] = m["clustering_seconds_per_image"]["median"]
                cell.update(batch_size=m["clustering_seconds_per_image"]["batch_size"],
                            num_segments=m["diagnostics_mean"].get("num_segments"))
                if key == "pamr":
                    cell["run_config"] = m["config"]["run"]
                # The method call is the same computation in both runs: per image, the faster of the two
                # measurements (best of two, as timeit does; shared machines add noise, never speed).
                for r in load_run_results(os.path.dirname(path)):  # every process's resume log
                    if "clustering_seconds" in r:
                        best[r["id"]] = min(best.get(r["id"], math.inf), r["clustering_seconds"])
            times = sorted(best.values())
            cell["clustering_mean_s"] = sum(times) / len(times) if times else None
            cell["clustering_median_s"] = statistics.median(times) if times else None
            row["datasets"][name] = cell
        rows.append(row)
    return {"datasets": datasets, "rows": rows, "backbones": sorted(backbones), "protocol": protocol,
            "notes": notes}


def _fmt(value: float | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{scale * value:.{digits}f}"


def _ranked(values: list[float | None]) -> list[str]:
    """Best in bold, second underlined (the paper's convention), per column."""
    finite = sorted({round(v, 6) for v in values if v is not None and not math.isnan(v)}, reverse=True)
    out = []
    for v in values:
        s = _fmt(v)
        if v is not None and not math.isnan(v) and finite:
            if round(v, 6) == finite[0]:
                s = f"**{s}**"
            elif len(finite) > 1 and round(v, 6) == finite[1]:
                s = f"<u>{s}</u>"
        out.append(s)
    return out


def to_markdown(summary: dict[str, Any]) -> str:
    """The comparison as markdown: mIoU with/without PAMR, clustering time per image, segments per image."""
    datasets, rows = summary["datasets"], summary["rows"]
    titles = [DATASET_TITLES.get(d, d) for d in datasets]
    lines = ["# SPARK and its baselines, side by side", ""]
    lines.append(f"Protocol `{summary['protocol']}`; features: {'; '.join(summary['backbones']) or 'none'}.")
    if any(b.startswith("handcrafted") for b in summary["backbones"]):
        lines.append("The handcrafted backbone is the weights-free demo/CI backbone, **not the paper's SSD-1B "
                     "features**: these numbers test the pipeline, they do not reproduce the paper.")
    counts = []
    for d, t in zip(datasets, titles):
        n = {c.get("num_images_scored") for r in rows for c in [r["datasets"].get(d, {})] if c}
        counts.append(f"{t}: {', '.join(str(x) for x in sorted(n))}")
    lines.append(f"Images scored per dataset: {'; '.join(counts)}.")
    for note in summary["notes"]:
        lines.append(f"Note: {note.rstrip('.')}.")
    lines += ["", "## mIoU (%)", "", "Rows as the paper's Tables 1-2; PAMR after the many-to-one background merge "
              "(the paper's setting), then without it (its Fig. 4 ablation). Best per column in bold, second "
              "underlined.", ""]
    lines.append("| method | PAMR | " + " | ".join(titles) + " |")
    lines.append("| --- | --- | " + " | ".join("---:" for _ in titles) + " |")
    for key, label in (("miou_pamr", "yes"), ("miou_nopamr", "no")):
        columns = [_ranked([r["datasets"].get(d, {}).get(key) for r in rows]) for d in datasets]
        for i, r in enumerate(rows):
            lines.append(f"| {r['title']} | {label} | " + " | ".join(col[i] for col in columns) + " |")
    lines += ["", "## Clustering time per image (ms)", "",
              "The jitted method call on device (token clustering and upsampling to the mask size), mean "
              "(median) over the images; excludes the backbone, compilation, PAMR and scoring. Each image's "
              "time is the faster of its two measurements (the runs with and without PAMR make the same call).",
              ""]
    lines.append("| method | " + " | ".join(titles) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in titles) + " |")
    for r in rows:
        cells = []
        for d in datasets:
            c = r["datasets"].get(d, {})
            cells.append(f"{_fmt(c.get('clustering_mean_s'), 1e3)} ({_fmt(c.get('clustering_median_s'), 1e3)})"
                         if c else "–")
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    batch = sorted({c.get("batch_size") for r in rows for c in r["datasets"].values() if c})
    lines += ["", f"Batch size {', '.join(str(b) for b in batch)} (per-image time = batch time / batch size).", "",
              "## Token segments per image (mean)", ""]
    lines.append("| method | " + " | ".join(titles) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in titles) + " |")
    for r in rows:
        cells = [_fmt(r["datasets"].get(d, {}).get("num_segments"), 1.0) for d in datasets]
        lines.append(f"| {r['title']} | " + " | ".join(cells) + " |")
    real = [d for d in datasets if d in PUBLISHED[("SPARK", True)]]
    if real:
        lines += ["", "## Published (SSD-1B features, the papers' numbers, for reference)", ""]
        lines.append("| method | PAMR | " + " | ".join(DATASET_TITLES[d] for d in real) + " |")
        lines.append("| --- | --- | " + " | ".join("---:" for _ in real) + " |")
        for (title, pamr), values in PUBLISHED.items():
            lines.append(f"| {title} | {'yes' if pamr else 'no'} | "
                         + " | ".join(f"{values[d]:.1f}" for d in real) + " |")
    lines.append("")
    return "\n".join(lines)
