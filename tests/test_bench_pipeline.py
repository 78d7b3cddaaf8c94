"""experiments/bench_pipeline.py, smoke-tested on the tiny SSD-1B-like test form.

Specification: the benchmark builds a random-weight model from configs alone (no checkpoint, no torch), times every
stage of backbone + SPARK + upsampling + PAMR on one configuration and reports it in its table and as JSON; its
backbone stages compute what the library's extractor computes; its time budget skips what it cannot fit, naming why;
bad settings are named; CPU-only compiler options never reach another platform.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_backbone_helpers import VAE
from unet_forms import FORMS

from experiments import bench_pipeline as bp
from experiments.bench_backbone import SCHEDULER
from spark_jax.backbones.diffusion import _CPU_COMPILER_OPTIONS, compiler_options, encode_prepared
from spark_jax.models.unet import UNetConfig
from spark_jax.sharding import padded_size
from spark_jax.models.vae_encoder import VAEEncoderConfig

UNET = UNetConfig.from_diffusers(FORMS["sdxl"])
TINY_VAE = VAEEncoderConfig.from_diffusers(VAE)
SIZE = 64  # 8 x 8 latents, 2 x 2 tokens at the tiny form's feature tap


@pytest.fixture(scope="module")
def bench():
    return bp.Bench(UNET, TINY_VAE, SCHEDULER, size=SIZE, dtypes=["float32"])


@pytest.fixture(scope="module")
def result(bench):
    return bp.run(bench, batch_sizes=[2], rounds=1, time_budget_s=600, start=time.perf_counter(), log=lambda m: None)


def test_one_configuration_is_timed_stage_by_stage_and_written_as_json(result, tmp_path):
    (row,) = result["rows"]
    assert row["status"] == "ok" and (row["dtype"], row["batch"]) == ("float32", 2)
    stages = [row[f"{name}_s"] for name in ("vae", "unet", "spark", "upsample", "pamr")]
    assert all(t > 0 for t in stages) and row["total_s"] >= sum(stages)
    assert row["backbone_s"] == pytest.approx(row["vae_s"] + row["unet_s"])
    assert row["images_per_s"] == pytest.approx(2 / row["total_s"])
    assert row["compile_s"] > 0 and row["peak_gb"] > 0 and row["num_clusters_mean"] >= 1
    assert result["device"]["device_count"] == jax.device_count() and result["settings"]["token_grid"] == [2, 2]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["rows"][0]["batch"] == 2
    table = bp.format_table(result)
    assert "img/s" in table and "float32" in table.splitlines()[1]


def test_the_backbone_stages_compute_the_librarys_extractor(bench, result):
    """The timed vae and unet programs = encode_prepared (the one program Backbone compiles), same parameters."""
    st, prepared = bench.stages, bp.demo_images(SIZE, 2)
    vae, unet = bench._compiled[("vae", 2)], bench._compiled[("unet", 2, "float32")]  # what `result` timed
    staged = unet(bench.unet_params["float32"], bench.cond, vae(bench.vae_params, prepared))
    whole = jax.jit(lambda up, vp, cond, x: encode_prepared(nnx.merge(st.unet_graph, up), nnx.merge(st.vae_graph, vp),
                                                            x, cond, timestep=bp.TIMESTEP))(
        bench.unet_params["float32"], bench.vae_params, bench.cond, prepared)
    assert staged.shape == (2, 2, 2, UNET.feature_channels)
    np.testing.assert_allclose(np.asarray(staged), np.asarray(whole), rtol=1e-5, atol=1e-5 * float(jnp.abs(whole).max()))


def test_the_calibrated_random_vae_gives_unit_variance_latents():
    graph, params = nnx.split(bp.calibrated_vae(TINY_VAE, seed=3))
    latents = bp._vae_latents(params, bp.demo_images(128, 2), graph=graph)  # the calibration's own program
    assert float(jnp.std(latents)) == pytest.approx(1.0, rel=1e-3)


def test_the_time_budget_skips_what_cannot_start_and_says_why(bench, result):
    spent = bp.run(bench, batch_sizes=[1, 4], time_budget_s=0.0, start=time.perf_counter(), log=lambda m: None)
    batches = sorted({padded_size(b, jax.local_device_count()) for b in (1, 4)})  # a batch fills every device
    assert [(r["dtype"], r["batch"], r["status"]) for r in spent["rows"]] == [
        ("float32", b, "skipped") for b in batches]
    assert all("time budget" in r["reason"] for r in spent["rows"])
    assert "skipped: time budget" in bp.format_table(spent)
    # After a measured configuration, the next one is estimated: a budget shorter than its rounds skips it, named.
    (row,) = result["rows"]
    short = bp.run(bench, batch_sizes=[2, 64], rounds=1, start=time.perf_counter(), log=lambda m: None,
                   time_budget_s=20 * row["total_s"])  # batch 64 needs 2 rounds (warm-up + 1) of ~32x batch 2's
    assert [r["status"] for r in short["rows"]] == ["ok", "skipped"]
    assert short["rows"][1]["reason"].startswith("time budget: ~") and "left" in short["rows"][1]["reason"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=48), "--size=48 must be a positive multiple of 32"),
    (dict(dtypes=["float8"]), "--dtypes=float8: choose among float32, bfloat16, float16"),
])
def test_bad_model_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bp.Bench(UNET, TINY_VAE, SCHEDULER, **{**dict(size=SIZE, dtypes=["float32"]), **kwargs})


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_sizes=[0]), r"--batch_sizes must be ints >= 1, got \[0\]"),
    (dict(batch_sizes=[]), r"--batch_sizes must be ints >= 1, got \[\]"),
    (dict(rounds=0), "--rounds must be >= 1"),
])
def test_bad_schedules_are_named(bench, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bp.run(bench, **{**dict(batch_sizes=[1], time_budget_s=0.0), **kwargs}, log=lambda m: None)


def test_cpu_compiler_options_reach_only_cpu_compiles(bench):
    assert compiler_options("cpu") == _CPU_COMPILER_OPTIONS
    for platform in ("gpu", "cuda", "rocm", "tpu", "METAL"):
        assert compiler_options(platform) is None
    assert bench.options == compiler_options(jax.devices()[0].platform)
