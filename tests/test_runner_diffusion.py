"""The runner on a diffusion checkpoint (a tiny random-weight SDXL-form pipeline in the diffusers layout).

Specification: `run` loads the backbone holding only the UNet parameters the method's taps need (SPARK: the
feature tap), scores the demo with it, and a method asking for attention taps (SPARK with
global_source='attention') gets them from the same checkpoint.
"""

from __future__ import annotations

import json

import pytest

from test_backbone_helpers import build_tiny_pipeline

from spark_jax import SparkConfig
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.runner import RunConfig, resolve_backbone, run

RES = 128


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sdxl_runner", "sdxl")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPARK_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "spark_jax_cache_runner"))


def _cfg(root, tmp_path, **kw):
    return RunConfig(dataset="demo", backbone="ssd1b", checkpoint=str(root), resolution=RES, demo_images=2,
                     demo_photos=False, num_overlays=0, batch_size=2, output_dir=str(tmp_path / "out"), **kw)


def test_a_run_loads_only_the_parameters_of_the_methods_taps(root, tmp_path):
    cfg = _cfg(root, tmp_path)
    lean = resolve_backbone(cfg)
    assert lean.backbone.cfg.taps == (lean.backbone.feature_tap,)
    full = resolve_backbone(cfg, only_method_taps=False)
    assert full.backbone.cfg.taps is None and full.key == lean.key  # the same features: one cache entry
    metrics = run(cfg, quiet=True)
    assert metrics["num_images_scored"] == 2
    assert json.load(open(tmp_path / "out" / "metrics.json"))["num_images_scored"] == 2


def test_a_method_asking_for_attention_taps_gets_them_from_the_checkpoint(root, tmp_path):
    spark = SparkMethodConfig(spark=SparkConfig(global_source="attention", beta=0.8, inflation=1.8))
    cfg = _cfg(root, tmp_path, method="spark", method_config=spark)
    bb = resolve_backbone(cfg)
    attn = bb.backbone.feature_tap.rsplit(":", 1)[0]
    assert set(bb.backbone.cfg.taps) == {bb.backbone.feature_tap, f"{attn}:probs_mean"}
    metrics = run(cfg, backbone=bb, quiet=True)
    assert metrics["num_images_scored"] == 2
