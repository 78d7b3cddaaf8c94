"""The side-by-side comparison: every method with and without PAMR, one feature cache, comparison.md."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.runner import compare, comparison_entries, run_dir, to_markdown
from spark_jax.config import SparkConfig
from spark_jax.backbones.handcrafted import HandcraftedBackbone
from spark_jax.runner import RunConfig, load_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["spark", "diffcut", "autosc", "kmeans"]


def write_cityscapes(root, stem="lindau_000000_000019"):
    city = stem.split("_")[0]
    for d in (f"leftImg8bit/val/{city}", f"gtFine/val/{city}"):
        os.makedirs(os.path.join(root, "cityscapes", d), exist_ok=True)
    ids = np.full((40, 80), 23, np.uint8)  # sky above road, a car
    ids[20:] = 7
    ids[14:26, 20:40] = 26
    img = np.zeros((40, 80, 3), np.uint8)
    for k, c in {23: (120, 170, 240), 7: (90, 90, 90), 26: (200, 30, 30)}.items():
        img[ids == k] = c
    Image.fromarray(img).save(os.path.join(root, "cityscapes", "leftImg8bit", "val", city,
                                           f"{stem}_leftImg8bit.png"))
    Image.fromarray(ids, mode="L").save(os.path.join(root, "cityscapes", "gtFine", "val", city,
                                                     f"{stem}_gtFine_labelIds.png"))


def test_compare_runs_every_method_with_and_without_pamr_on_shared_features(tmp_path, monkeypatch):
    write_cityscapes(tmp_path / "data")
    calls = []
    original = HandcraftedBackbone.extract_prepared

    def counting(self, x, taps):
        calls.append(x.shape[0])
        return original(self, x, taps)

    monkeypatch.setattr(HandcraftedBackbone, "extract_prepared", counting)
    # The settings of the runner tests (small, fast, and the same compiled methods).
    base = RunConfig(backbone="handcrafted", resolution=64, mask_size=32, batch_size=2, demo_images=2,
                     demo_photos=False, num_overlays=0, data_dir=str(tmp_path / "data"),
                     method_config=SparkMethodConfig(spark=SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)))
    logs = []
    out = tmp_path / "cmp"
    summary = compare(base, datasets=["demo", "voc", "cityscapes"], methods=METHODS, output_dir=str(out),
                      quiet=True, log=logs.append)

    assert summary["datasets"] == ["demo", "cityscapes"]
    assert any(n.startswith("skipped voc:") for n in summary["notes"]) and any("skipped voc" in s for s in logs)
    # the backbone ran once per batch for 4 methods x 2 PAMR settings: the 2 demo images, then the Cityscapes image
    # padded to the batch's 2 slots with a masked copy (one compiled shape; the copy is never scored)
    assert calls == [2, 2]
    md = (out / "comparison.md").read_text()
    for row in summary["rows"]:
        assert row["title"] in md
        for name in ("demo", "cityscapes"):
            for pamr in (True, False):
                m = json.load(open(os.path.join(run_dir(str(out), name, row["method"], pamr), "metrics.json")))
                assert m["config"]["run"]["pamr"] is pamr and m["method"] == comparison_entries()[row["method"]].method
                cell = row["datasets"][name]
                assert cell["miou_pamr" if pamr else "miou_nopamr"] == m["miou"]
                assert f"{100 * m['miou']:.1f}" in md
            assert cell["clustering_median_s"] > 0 and cell["num_images_scored"] == (2 if name == "demo" else 1)
    assert [r["title"] for r in summary["rows"]] == ["SPARK", "DiffCut (recursive NCut)", "AutoSC", "K-means (K*)"]
    assert "| --- | --- | ---: | ---: |" in md and "## Clustering time per image (ms)" in md
    assert "Published" in md and "not the paper's SSD-1B" in md  # a real benchmark column, handcrafted features

    # Rerunning resumes every run: nothing is recomputed, the tables are identical.
    before = {p: len(load_results(os.path.join(p, "results.jsonl")))
              for p in (run_dir(str(out), "demo", m, True) for m in METHODS)}
    again = compare(base, datasets=["demo", "voc", "cityscapes"], methods=METHODS, output_dir=str(out), quiet=True,
                    log=lambda s: None)
    assert calls == [2, 2]  # no further backbone call
    assert {p: len(load_results(os.path.join(p, "results.jsonl"))) for p in before} == before
    assert [r["datasets"] for r in again["rows"]] == [r["datasets"] for r in summary["rows"]]


def test_markdown_marks_best_bold_and_second_underlined():
    def row(method, title, a, b):
        cell = {"miou_pamr": a, "miou_nopamr": b, "num_images_scored": 5, "clustering_mean_s": 0.012,
                "clustering_median_s": 0.010, "batch_size": 1, "num_segments": 4.0}
        return {"method": method, "title": title, "datasets": {"voc": cell}}

    summary = {"datasets": ["voc"], "protocol": "standard", "backbones": ["diffusion backbone"], "notes": [],
               "rows": [row("spark", "SPARK", 0.70, 0.60), row("diffcut", "DiffCut", 0.65, 0.62),
                        row("kmeans", "K-means", 0.50, float("nan"))]}
    md = to_markdown(summary)
    assert "| SPARK | yes | **70.0** |" in md and "| DiffCut | yes | <u>65.0</u> |" in md
    assert "| K-means | yes | 50.0 |" in md
    assert "| DiffCut | no | **62.0** |" in md and "| SPARK | no | <u>60.0</u> |" in md
    assert "| K-means | no | – |" in md
    assert "| SPARK | 12.0 (10.0) |" in md
    assert "| SPARK | yes | 66.9 |" in md  # the published table for the real benchmark
    assert "not the paper's" not in md


def test_compare_cli_skips_absent_benchmarks_and_needs_weights_for_real_ones(tmp_path):
    write_cityscapes(tmp_path / "data")
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf"), "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "experiments.compare", "--methods=kmeans", "--datasets=demo,ade20k,cityscapes",
           f"--data_dir={tmp_path}/data", "--demo_images=1", "--demo_photos=false", "--resolution=64",
           "--mask_size=32", "--kmeans_k=3", f"--output_dir={tmp_path}/cmp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "note: skipped ade20k" in proc.stdout
    assert "note: skipped cityscapes: No SSD-1B checkpoint found" in proc.stdout  # found, but no weights
    assert "demo / kmeans / PAMR off: mIoU" in proc.stdout
    md = open(tmp_path / "cmp" / "comparison.md").read()
    assert "| K-means (K=3) | yes |" in md and "| K-means (K=3) | no |" in md
    bad = subprocess.run(cmd[:3] + ["--methods=ncut"], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert bad.returncode == 2 and "unknown methods ['ncut']" in bad.stderr


def test_compare_rejects_unknown_names_before_running(tmp_path):
    base = RunConfig(backbone="handcrafted")
    with pytest.raises(ValueError, match="unknown datasets"):
        compare(base, datasets=["imagenet"], methods=METHODS, output_dir=str(tmp_path), quiet=True)
    with pytest.raises(ValueError, match="unknown methods"):
        compare(base, datasets=["demo"], methods=["ncut"], output_dir=str(tmp_path), quiet=True)
    assert not os.listdir(tmp_path)


def test_open_vocabulary_methods_are_not_rows_and_are_named_as_such():
    """NERVE names classes with CLIP: it is scored under --protocol=open_vocab, not by this table."""
    from spark_jax.methods import REGISTRY

    vocab = [name for name, spec in REGISTRY.items() if spec.open_vocab]
    assert "nerve" in vocab
    assert not set(vocab) & set(comparison_entries())
    with pytest.raises(ValueError, match="nerve: open-vocabulary, scored with experiments.run --protocol=open_vocab"):
        compare(RunConfig(backbone="handcrafted"), datasets=["demo"], methods=["nerve"], output_dir="unused",
                quiet=True)
