"""SparkConfig.global_source: what SPARK's global affinity A_global (Eq. 1) is computed from.

Specification: 'features' is Eq. 1 on the attn1 output (unchanged); 'attention' uses the self-attention
probabilities of that attn1 (mean over heads) as A_global; 'qk_cosine' the head-mean of cos(q_i^h, k_j^h).
Each equals the NumPy transcription (spark_jax.testing.numpy_reference); sharpening applies to every source; the
local graph always uses the features; missing, misshapen or unused inputs are named errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig, segment_tokens, segment_tokens_batch
from spark_jax.graph.affinity import GlobalInputs, row_normalize, sharpened_global_affinity, transition_matrix
from spark_jax.methods.spark import source_taps
from spark_jax.pipeline import PipelineConfig, segment_features
from spark_jax.testing import numpy_reference as ref
from spark_jax.testing.synthetic import planted_miou, planted_token_features


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _random_inputs(seed, h=5, w=6, c=8, heads=3, d=4):
    rng = np.random.default_rng(seed)
    n = h * w
    x = rng.standard_normal((h, w, c)).astype(np.float32)
    probs = _softmax(rng.standard_normal((n, n)) * 2).astype(np.float32)
    q = rng.standard_normal((heads, n, d)).astype(np.float32)
    k = rng.standard_normal((heads, n, d)).astype(np.float32)
    return x, probs, q, k


@pytest.mark.parametrize("sharpen", [1.0, 3.0])
@pytest.mark.parametrize("use_local", [True, False])
def test_attention_source_matches_the_transcription(sharpen, use_local):
    x, probs, _, _ = _random_inputs(0)
    cfg = SparkConfig(global_source="attention", sharpen=sharpen, use_local=use_local, beta=0.7)
    ours = transition_matrix(jnp.asarray(x), cfg, GlobalInputs(attention=jnp.asarray(probs)))
    want = ref.transition_matrix(x, beta=0.7, sharpen=sharpen, use_local=use_local, source="attention",
                                 attention=probs)
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours).sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("negatives", ["clip", "minmax"])
@pytest.mark.parametrize("sharpen", [1.0, 2.0])
def test_qk_cosine_source_matches_the_transcription(negatives, sharpen):
    x, _, q, k = _random_inputs(1)
    cfg = SparkConfig(global_source="qk_cosine", negatives=negatives, sharpen=sharpen)
    ours = transition_matrix(jnp.asarray(x), cfg, GlobalInputs(queries=jnp.asarray(q), keys=jnp.asarray(k)))
    want = ref.transition_matrix(x, beta=0.6, negatives=negatives, sharpen=sharpen, source="qk_cosine",
                                 queries=q, keys=k)
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-6)


def test_qk_cosine_of_one_head_holding_the_features_is_the_features_source():
    # cos(q_i, k_j) with q = k = x is Eq. 1's cosine: the two readings coincide there.
    x, _, _, _ = _random_inputs(2)
    one_head = jnp.asarray(x.reshape(1, -1, x.shape[-1]))
    qk = transition_matrix(jnp.asarray(x), SparkConfig(global_source="qk_cosine", sharpen=2.0),
                           GlobalInputs(queries=one_head, keys=one_head))
    feats = transition_matrix(jnp.asarray(x), SparkConfig(sharpen=2.0))
    np.testing.assert_allclose(np.asarray(qk), np.asarray(feats), atol=1e-6)


def _planted_attention(features, temperature=20.0):
    """An attention-like map of planted features: softmax over tokens of scaled cosines."""
    f = features.reshape(-1, features.shape[-1])
    f = f / np.linalg.norm(f, axis=-1, keepdims=True)
    return _softmax(temperature * f @ f.T).astype(np.float32)


def test_attention_source_recovers_planted_regions():
    features, gt = planted_token_features(0, 16, 16, 32, noise=0.2)
    cfg = SparkConfig(global_source="attention", beta=0.8, inflation=1.8)
    result = segment_tokens(features, cfg, attention=_planted_attention(features))
    assert bool(result.mcl_converged)
    assert planted_miou(result.labels, gt) >= 0.95


def test_entropy_sharpening_applies_to_the_attention_source():
    # The automatic exponent p is calibrated on the attention map and applied to it: RowNorm(A^p).
    x, probs, _, _ = _random_inputs(3)
    cfg = SparkConfig(global_source="attention", sharpen_mode="entropy", sharpen_target=0.2)
    a, p = sharpened_global_affinity(jnp.asarray(x.reshape(-1, x.shape[-1])), cfg,
                                     GlobalInputs(attention=jnp.asarray(probs)))
    assert float(p) != 1.0
    np.testing.assert_allclose(np.asarray(row_normalize(a)), ref.row_norm(probs.astype(np.float64) ** float(p)),
                               atol=1e-5)
    h = ref.row_norm(probs.astype(np.float64) ** float(p))
    entropy = -np.sum(np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0), axis=1).mean()
    np.testing.assert_allclose(entropy, np.log(0.2 * probs.shape[0]), atol=1e-3)


def test_batch_equals_one_image_at_a_time():
    feats, attn = [], []
    for seed in (0, 1):
        f, _ = planted_token_features(seed, 12, 12, 16, noise=0.2)
        feats.append(f)
        attn.append(_planted_attention(f))
    feats, attn = np.stack(feats), np.stack(attn)
    cfg = SparkConfig(global_source="attention", beta=0.8, inflation=1.8)
    for chunk in (None, 1):
        batch = segment_tokens_batch(feats, cfg, chunk_size=chunk, attention=attn)
        for i in range(2):
            one = segment_tokens(feats[i], cfg, attention=attn[i])
            np.testing.assert_array_equal(np.asarray(batch.labels[i]), np.asarray(one.labels))
            np.testing.assert_allclose(np.asarray(batch.soft_labels[i]), np.asarray(one.soft_labels), atol=1e-5)


def test_segment_features_passes_the_source_inputs_through():
    f, gt = planted_token_features(0, 8, 8, 16, noise=0.1)
    images = jnp.full((1, 64, 64, 3), 0.5, jnp.float32)
    pcfg = PipelineConfig(spark=SparkConfig(global_source="attention", beta=0.8, inflation=1.8), mask_size=(16, 16),
                          pamr=None)
    seg = segment_features(f[None], images, pcfg, attention=_planted_attention(f)[None])
    direct = segment_tokens(f, pcfg.spark, attention=_planted_attention(f))
    np.testing.assert_array_equal(np.asarray(seg.tokens.labels[0]), np.asarray(direct.labels))
    assert seg.labels.shape == (1, 16, 16)


def test_source_taps_name_the_feature_points_attention():
    tap = "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"
    assert source_taps(SparkConfig(), tap) == {}
    assert source_taps(SparkConfig(global_source="attention"), tap) == {
        "attention": "down_blocks.2.attentions.1.transformer_blocks.3.attn1:probs_mean"}
    assert source_taps(SparkConfig(global_source="qk_cosine"), tap) == {
        "queries": "down_blocks.2.attentions.1.transformer_blocks.3.attn1:q",
        "keys": "down_blocks.2.attentions.1.transformer_blocks.3.attn1:k"}


@pytest.mark.parametrize("cfg, kwargs, message", [
    (SparkConfig(global_source="attention"), {}, "needs `attention`"),
    (SparkConfig(global_source="qk_cosine"), {"queries": np.zeros((2, 30, 4), np.float32)}, "needs `keys`"),
    (SparkConfig(), {"attention": np.zeros((30, 30), np.float32)}, "does not use it"),
    (SparkConfig(global_source="attention"), {"attention": np.zeros((29, 30), np.float32)}, r"\[30, 30\]"),
    (SparkConfig(global_source="attention"), {"attention": np.zeros((30, 30), np.int32)}, "floating"),
    (SparkConfig(global_source="qk_cosine"), {"queries": np.zeros((2, 30, 4), np.float32),
                                              "keys": np.zeros((3, 30, 4), np.float32)}, "differ in shape"),
    (SparkConfig(global_source="qk_cosine"), {"queries": np.zeros((2, 31, 4), np.float32),
                                              "keys": np.zeros((2, 31, 4), np.float32)}, r"\[heads, 30, d\]"),
])
def test_bad_source_inputs_are_named(cfg, kwargs, message):
    x, _, _, _ = _random_inputs(0)
    with pytest.raises(ValueError, match=message):
        segment_tokens(x, cfg, **kwargs)


def test_unknown_source_is_named():
    with pytest.raises(ValueError, match="global_source must be one of"):
        SparkConfig(global_source="keys")


def test_source_is_static_and_numeric_leaves_stay_traced():
    leaves, treedef = jax.tree_util.tree_flatten(SparkConfig(global_source="attention"))
    assert "attention" in str(treedef) and len(leaves) == len(jax.tree_util.tree_leaves(SparkConfig()))


def test_segment_reads_the_sources_taps_from_the_backbone():
    # segment() asks the backbone for the feature tap and, from the same attention, what the source needs.
    from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
    from spark_jax.data.preprocess import prepare_image
    from spark_jax.pipeline import segment

    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    prepared = prepare_image(jnp.asarray(images), 64)
    for source, inputs in (("attention", {"attention": "tokens.attn1:probs_mean"}),
                           ("qk_cosine", {"queries": "tokens.attn1:q", "keys": "tokens.attn1:k"})):
        pcfg = PipelineConfig(spark=SparkConfig(global_source=source, beta=0.8, inflation=1.8), mask_size=(32, 32),
                              pamr=None)
        taps = backbone.extract_prepared(prepared, tuple(inputs.values()))
        want = segment_features(backbone.extract_features_prepared(prepared), prepared, pcfg,
                                **{name: taps[tap] for name, tap in inputs.items()})
        got = segment(images, backbone, pcfg)
        np.testing.assert_array_equal(np.asarray(got.labels), np.asarray(want.labels))
