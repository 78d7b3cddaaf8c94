"""Reduced-precision UNets (BackboneConfig.unet_dtype) against float32, and half-precision attention.

Specification:
- On the tiny SSD-1B-like form with selective attention (``experiments.bench_precision.measure``, q gain 4, the
  regime where rounding moves the features most), bfloat16 and float16 features of the feature tap stay within 3x
  the worst relative error ``python -m experiments.bench_precision`` measured over 10 weight seeds (2 images each),
  and SPARK's partition of them agrees with float32's (adjusted Rand index) at least as well as 2x the worst
  measured disagreement (1 - ARI) allows. Every token stays finite; float16 is closer to float32 than bfloat16.
- Attention computes its logits and softmax in float32 whatever the input dtype: float16 queries and keys whose
  products overflow float16 (> 65504) give the float32 result, within the rounding the output format itself adds
  (3 units in the last place of max |v|: the probabilities and the output are rounded once each).
- ``--unet_dtype``, ``--seed`` and ``--noise_source`` reach the loaded backbone from the command line: its UNet
  parameters are in that dtype (the VAE's stay float32), its noise is that seed's draw from that generator, each
  dtype has its own feature-cache key, and bfloat16 features are the float32 backbone's within the bound above.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_backbone_helpers import build_tiny_pipeline

from experiments import bench_precision
from spark_jax.models.attention import attention_probs, attention_probs_mean, dot_product_attention

# Worst over weight seeds 0-9 x 2 demo images of `python -m experiments.bench_precision` (tiny sdxl form, 512 px,
# 16 x 16 tokens, q gain 4; 2026-12-02, this project's 2-core AMD EPYC CPU, jax 0.10.2). Seed 0, the one tested
# here, measured 0.103 / 0.052 (bfloat16) and 0.0107 / 0.0069 (float16) feature error, ARI 0.776 / 0.917 and
# 0.974 / 0.990.
MEASURED_WORST = {
    # dtype: (feature rel err ||f - f32||_F / ||f32||_F, ARI of SPARK's labels against float32's)
    "bfloat16": (0.226, 0.670),
    "float16": (0.0349, 0.923),
}
# Margins for other CPUs' dot kernels and XLA versions (bounds, not expected values): 3x the worst error; 2x the
# worst disagreement 1 - ARI (3x of bfloat16's 0.33 would allow any partition at all).
ERROR_FACTOR, DISAGREEMENT_FACTOR = 3.0, 2.0


def bounds(dtype: str) -> tuple[float, float]:
    """(max feature relative error, min ARI) allowed."""
    err, ari = MEASURED_WORST[dtype]
    return ERROR_FACTOR * err, 1.0 - DISAGREEMENT_FACTOR * (1.0 - ari)


@pytest.fixture(scope="module")
def tiny_measurement():
    unet_cfg, vae_cfg, scheduler = bench_precision.tiny_configs("sdxl")
    return bench_precision.measure(unet_cfg, vae_cfg, scheduler, size=bench_precision.TINY_SIZE, num_images=2,
                                   seed=0, dtypes=("bfloat16", "float16"), q_gain=4.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_features_and_partitions_stay_within_the_measured_bounds(tiny_measurement, dtype):
    m = tiny_measurement[dtype]
    max_err, min_ari = bounds(dtype)
    assert m["nonfinite_tokens"] == [0, 0]
    assert max(m["feature_rel_err"]) <= max_err, m["feature_rel_err"]
    assert min(m["ari"]) >= min_ari, m["ari"]
    # The error is the dtype's, not noise: float16 (11 significant bits) is closer to float32 than bfloat16 (8).
    if dtype == "float16":
        assert max(m["feature_rel_err"]) < min(tiny_measurement["bfloat16"]["feature_rel_err"])


def _reference_probs(q, k, scale):
    """softmax(q k^T scale) in float64 on the (already rounded) inputs: [B, N, T, S]."""
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("dtype,eps", [(jnp.float16, 2.0**-11), (jnp.bfloat16, 2.0**-8)])
@pytest.mark.parametrize("magnitude", [1.0, 64.0])  # 64: |q . k| has a std of 32768, beyond float16's 65504 often
@pytest.mark.parametrize("blocked", [False, True])
def test_half_precision_attention_keeps_float32_logits(dtype, eps, magnitude, blocked):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 2, 64)) * s, dtype) for s in (magnitude, magnitude, 1.0))
    scale = 64**-0.5
    if magnitude > 1 and dtype == jnp.float16:  # the case is sensitive: half-precision logits overflow
        naive = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float16)
        assert not bool(jnp.all(jnp.isfinite(naive)))
    kw = dict(block_q=16, max_unblocked_logits=0) if blocked else {}
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, scale=scale, precision="highest", **kw))(q, k, v)
    assert out.dtype == dtype
    ref_probs = _reference_probs(q, k, scale)
    ref = np.einsum("bnts,bsnh->btnh", ref_probs, np.asarray(v, np.float64))
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    assert err <= 3 * eps * np.abs(np.asarray(v, np.float64)).max(), err
    probs = attention_probs(q, k, scale=scale, precision="highest")
    mean = attention_probs_mean(q, k, scale=scale, precision="highest")
    assert probs.dtype == mean.dtype == jnp.float32
    # float32 logits of magnitude L carry an absolute error of a few L * 2^-24, which exp turns into a relative
    # error of the probabilities (measured: <= 0.7 L * 2^-24 here).
    max_logit = np.abs(np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64))).max()
    tol = 8 * 2.0**-24 * max_logit * scale
    np.testing.assert_allclose(np.asarray(probs), ref_probs, atol=tol)
    np.testing.assert_allclose(np.asarray(mean), ref_probs.mean(1), atol=tol)


@pytest.mark.slow  # 27 s here under load: three tiny pipelines loaded, two extractors compiled
def test_unet_dtype_seed_and_noise_source_reach_the_backbone_from_the_command_line(tmp_path_factory, monkeypatch):
    from absl import flags

    from experiments import run as cli
    from spark_jax.backbones.conditioning import shared_noise
    from spark_jax.runner import resolve_backbone

    root = build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sdxl", "sdxl")
    monkeypatch.setenv("SPARK_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "spark_jax_cache"))
    fv = flags.FLAGS
    images = np.random.default_rng(0).integers(0, 256, (2, 129, 129, 3), dtype=np.uint8)
    loaded = {}
    try:
        for dtype in ("float32", "bfloat16", "float16"):
            fv.unparse_flags()
            fv(["run", "--dataset=demo", f"--checkpoint={root}", "--resolution=128", f"--unet_dtype={dtype}",
                "--seed=7", "--noise_source=torch"])
            loaded[dtype] = resolve_backbone(cli.config_from_flags())
    finally:
        fv.unparse_flags()
    feats = {}
    for dtype, resolved in loaded.items():
        bb = resolved.backbone
        assert (bb.cfg.unet_dtype, bb.cfg.seed, bb.cfg.noise_source) == (dtype, 7, "torch")
        held = [x for x in jax.tree.leaves(bb.unet_params) if x.size]
        assert {x.dtype for x in held} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree.leaves(bb.vae_params)} == {jnp.dtype(jnp.float32)}  # the VAE stays float32
        np.testing.assert_array_equal(np.asarray(bb.cond.noise), np.asarray(shared_noise(7, (16, 16, 4), source="torch")))
        if dtype != "float16":  # the extractor runs in the dtype (float16 takes the same code path: not compiled too)
            feats[dtype] = np.asarray(bb.extract_features(images))
    assert len({r.key for r in loaded.values()}) == 3  # one feature-cache entry per dtype
    rel = np.linalg.norm(feats["bfloat16"] - feats["float32"]) / np.linalg.norm(feats["float32"])
    assert 0 < rel <= bounds("bfloat16")[0], rel
