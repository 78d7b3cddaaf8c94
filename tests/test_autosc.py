"""Specification of AutoSC (spark_jax.autosc) against a NumPy/SciPy transcription.

The transcription follows DiffCut Sec. 4.3 and the released `autosc.py` conventions, in
float64: min-max cosine affinity, exponents (1, 5, 10, 15), SciPy's dense eigh of
D^-1/2 (D - W) D^-1/2, the relative eigengap with a cumulative mean and 1e-6, k = its argmax,
and the QR-pivoting discretisation with SciPy's LAPACK pivoted QR and SVD.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spark_jax.autosc import (
    AutoSCConfig,
    autosc,
    autosc_batch,
    cluster_qr,
    relative_eigengap,
)
from spark_jax.synthetic import planted_token_features


def reference_affinity(features: np.ndarray) -> np.ndarray:
    x = features.reshape(-1, features.shape[-1]).astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = x @ x.T
    return (a - a.min()) / (a.max() - a.min())


def reference_cluster_qr(vectors: np.ndarray) -> np.ndarray:
    k = vectors.shape[1]
    _, _, pivots = scipy.linalg.qr(vectors.T, pivoting=True)
    u, _, vh = scipy.linalg.svd(vectors[pivots[:k], :].T)
    return np.abs(vectors @ (u @ vh)).argmax(axis=1)


def reference_autosc(features: np.ndarray, alphas=(1, 5, 10, 15), embed_with_last_alpha=False):
    """-> (labels [N] canonical by first occurrence, k, alpha)."""
    affinity = reference_affinity(features)
    best_gap, k, best_alpha, best_vectors = 0.0, None, None, None
    for alpha in alphas:
        a = affinity**alpha
        d = a.sum(axis=1)
        d_inv_sqrt = 1 / np.sqrt(d)
        values, vectors = scipy.linalg.eigh(d_inv_sqrt[:, None] * (np.diag(d) - a) * d_inv_sqrt)
        vectors = d_inv_sqrt[:, None] * vectors
        cummean = np.cumsum(values) / np.arange(1, len(values) + 1)
        gap = (values - cummean) / (cummean + 1e-6)
        if gap.max() > best_gap:
            best_gap, k, best_alpha, best_vectors = gap.max(), int(gap.argmax()), alpha, vectors
    # The released code clusters `vectors` of the loop's last exponent.
    embedding = vectors if embed_with_last_alpha else best_vectors
    return _canonical(reference_cluster_qr(embedding[:, :k])), k, best_alpha


def _canonical(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(labels.max() + 1, np.int64)
    remap[np.unique(labels)[order]] = np.arange(len(order))
    return remap[labels]


PLANTED = [(0, 16, 16, 32, 0.3), (1, 16, 16, 32, 0.6), (2, 16, 16, 32, 0.8)]


@pytest.mark.parametrize("seed,h,w,c,noise", PLANTED)
def test_planted_matches_transcription(seed, h, w, c, noise):
    features, _ = planted_token_features(seed, h, w, c, noise)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    labels, k, alpha = reference_autosc(features)
    chex.assert_shape(result.labels, (h, w))
    chex.assert_type(result.labels, jnp.int32)
    assert int(result.num_clusters) == k
    assert float(result.alpha) == alpha
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)
    assert not bool(result.truncated)


def test_released_code_embedding_quirk_matches_transcription():
    # With exponents (10, 1), 10 wins; the released code then clusters alpha = 1's eigenvectors.
    features, _ = planted_token_features(2, 16, 16, 32, 0.8)
    outputs = {}
    for quirk in (False, True):
        cfg = AutoSCConfig(alphas=(10.0, 1.0), embed_with_last_alpha=quirk)
        result = autosc(jnp.asarray(features), cfg)
        labels, k, alpha = reference_autosc(features, alphas=(10, 1), embed_with_last_alpha=quirk)
        assert (int(result.num_clusters), float(result.alpha)) == (k, alpha) == (4, 10.0)
        np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)
        outputs[quirk] = labels
    assert (outputs[False] != outputs[True]).any(), "the case must tell the two embeddings apart"


def test_well_separated_planted_regions_are_recovered():
    features, layout = planted_token_features(0, 16, 16, 32, 0.3)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    pairs = set(zip(np.asarray(result.labels).ravel().tolist(), layout.ravel().tolist()))
    assert len(pairs) == len(np.unique(layout)) == int(result.num_clusters)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_features_match_transcription(seed):
    features = np.random.default_rng(seed).standard_normal((8, 8, 16)).astype(np.float32)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    labels, k, alpha = reference_autosc(features)
    assert int(result.num_clusters) == k
    assert float(result.alpha) == alpha
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)


def test_relative_eigengap_formula():
    values = jnp.array([0.0, 0.01, 0.02, 0.5, 0.6])
    gap = jax.jit(relative_eigengap)(values)
    cummean = np.cumsum(values) / np.arange(1, 6)
    np.testing.assert_allclose(gap, (values - cummean) / (cummean + 1e-6), rtol=1e-5)
    assert int(jnp.argmax(gap)) == 3  # three near-null eigenvalues: k = 3


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_qr_matches_lapack_pivoting_with_padding(k, seed):
    rng = np.random.default_rng(seed)
    # A noisy k-cluster embedding: cluster indicator rows rotated, plus noise.
    assign = rng.integers(0, k, 60)
    basis = scipy.linalg.qr(rng.standard_normal((k, k)))[0]
    vectors = np.eye(k)[assign] @ basis + 0.05 * rng.standard_normal((60, k))
    padded = np.concatenate([vectors, rng.standard_normal((60, 8 - k))], axis=1)  # ignored columns
    got = jax.jit(cluster_qr)(jnp.asarray(padded, jnp.float32), k)
    expected = _canonical(reference_cluster_qr(vectors))
    np.testing.assert_array_equal(_canonical(np.asarray(got)), expected)


def test_cluster_qr_transcription_equals_sklearn():
    spectral = pytest.importorskip("sklearn.cluster._spectral")
    vectors = np.random.default_rng(0).standard_normal((50, 4))
    np.testing.assert_array_equal(reference_cluster_qr(vectors), spectral.cluster_qr(vectors))


def test_cluster_count_is_clipped_and_reported():
    features, _ = planted_token_features(0, 16, 16, 32, 0.3)
    result = autosc(jnp.asarray(features), AutoSCConfig(max_clusters=3))
    assert int(result.num_clusters) == 3
    assert bool(result.truncated)
    assert int(jnp.max(result.labels)) <= 2


def test_batch_is_vmap_of_single():
    batch = np.stack([planted_token_features(s, 8, 8, 16, 0.5)[0] for s in range(2)])
    cfg = AutoSCConfig()
    batched = autosc_batch(jnp.asarray(batch), cfg)
    chex.assert_shape(batched.labels, (2, 8, 8))
    for i in range(2):
        single = autosc(jnp.asarray(batch[i]), cfg)
        np.testing.assert_array_equal(np.asarray(batched.labels[i]), np.asarray(single.labels))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\[h, w, C\]"):
        autosc(jnp.zeros((16, 8)), AutoSCConfig())
    with pytest.raises(ValueError, match="alphas"):
        AutoSCConfig(alphas=[1, 5])
    with pytest.raises(ValueError, match="max_clusters"):
        AutoSCConfig(max_clusters=0)
