"""Specification of AutoSC (spark_jax.methods.autosc) against a NumPy/SciPy transcription.

The transcription follows DiffCut Sec. 4.3 and the released `autosc.py` conventions, in
float64: min-max cosine affinity, exponents (1, 5, 10, 15), SciPy's dense eigh of
D^-1/2 (D - W) D^-1/2, the relative eigengap with a cumulative mean and 1e-6, k = its argmax,
the last exponent's eigenvectors as the embedding (the released code's behaviour), the
QR-pivoting discretisation with SciPy's LAPACK pivoted QR and SVD, and clusters numbered by
their QR column.

Well-posedness: spark_jax computes in float32, so its labels are compared with the float64
transcription only where the transcription gives the same (k, alpha, labels) on 3 copies of the
problem perturbed by 1e-5 (float32 rounding is ~1e-7): the exponent and k decided by eigengap
ties, a k-th eigenvalue inside a cluster of eigenvalues, pivot and argmax ties all show up there.
Each test asserts this of its fixture before comparing.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from spark_jax.methods.autosc import (
    AutoSCConfig,
    autosc,
    autosc_batch,
    cluster_qr,
    relative_eigengap,
)
from spark_jax.testing.synthetic import many_regions_features, planted_token_features

PERTURBATION = 1e-5
PERTURBED_COPIES = 3


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


def _autosc(affinity, alphas, embed_with_last_alpha, rng=None):
    best_gap, k, best_alpha, best_vectors = 0.0, None, None, None
    for alpha in alphas:
        a = affinity**alpha
        d = a.sum(axis=1)
        d_inv_sqrt = 1 / np.sqrt(d)
        sym = d_inv_sqrt[:, None] * (np.diag(d) - a) * d_inv_sqrt
        if rng is not None:
            e = rng.standard_normal(sym.shape)
            sym = sym + PERTURBATION * (e + e.T) / np.sqrt(8 * len(sym))
        values, vectors = scipy.linalg.eigh(sym)
        vectors = d_inv_sqrt[:, None] * vectors
        cummean = np.cumsum(values) / np.arange(1, len(values) + 1)
        gap = (values - cummean) / (cummean + 1e-6)
        if gap.max() > best_gap:
            best_gap, k, best_alpha, best_vectors = gap.max(), int(gap.argmax()), alpha, vectors
    # The released code clusters `vectors` of the loop's last exponent.
    embedding = vectors if embed_with_last_alpha else best_vectors
    # Numbered as the released code: the QR columns present, in ascending order.
    labels = np.unique(reference_cluster_qr(embedding[:, :k]), return_inverse=True)[1]
    return labels, k, best_alpha


def reference_autosc(features: np.ndarray, alphas=(1, 5, 10, 15), embed_with_last_alpha=True):
    """-> (labels [N], k, alpha, well_posed)."""
    affinity = reference_affinity(features)
    labels, k, alpha = _autosc(affinity, alphas, embed_with_last_alpha)
    rng = np.random.default_rng(0)
    well_posed = True
    for _ in range(PERTURBED_COPIES):
        e = rng.standard_normal(affinity.shape)
        perturbed = affinity * (1 + PERTURBATION * (e + e.T) / 2)
        other, k2, alpha2 = _autosc(perturbed, alphas, embed_with_last_alpha, rng)
        well_posed &= (k2, alpha2) == (k, alpha) and np.array_equal(other, labels)
    return labels, k, alpha, well_posed


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered by raster order of first token: equal iff the partitions are equal."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]


PLANTED = [(0, 16, 16, 32, 0.3), (1, 16, 16, 32, 0.6), (2, 16, 16, 32, 0.8)]


def test_defaults_are_the_released_code():
    cfg = AutoSCConfig()
    assert cfg.alphas == (1.0, 5.0, 10.0, 15.0) and cfg.gap_eps == 1e-6
    assert cfg.max_clusters is None and cfg.embed_with_last_alpha


@pytest.mark.parametrize("seed,h,w,c,noise", PLANTED)
def test_planted_matches_transcription(seed, h, w, c, noise):
    features, _ = planted_token_features(seed, h, w, c, noise)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    labels, k, alpha, well_posed = reference_autosc(features)
    assert well_posed
    chex.assert_shape(result.labels, (h, w))
    chex.assert_type(result.labels, jnp.int32)
    assert int(result.num_clusters) == k
    assert float(result.alpha) == alpha
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)
    assert not bool(result.truncated)


def test_embedding_quirk_and_its_correction_match_transcription():
    # With exponents (10, 1), 10 wins; the released code then clusters alpha = 1's eigenvectors.
    features, _ = planted_token_features(2, 16, 16, 32, 0.8)
    outputs = {}
    for quirk in (False, True):
        cfg = AutoSCConfig(alphas=(10.0, 1.0), embed_with_last_alpha=quirk)
        result = autosc(jnp.asarray(features), cfg)
        labels, k, alpha, well_posed = reference_autosc(
            features, alphas=(10, 1), embed_with_last_alpha=quirk
        )
        assert well_posed
        assert (int(result.num_clusters), float(result.alpha)) == (k, alpha) == (4, 10.0)
        np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)
        outputs[quirk] = labels
    assert (outputs[False] != outputs[True]).any(), "the case must tell the two embeddings apart"


def test_well_separated_planted_regions_are_recovered():
    features, layout = planted_token_features(0, 16, 16, 32, 0.3)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    pairs = set(zip(np.asarray(result.labels).ravel().tolist(), layout.ravel().tolist()))
    assert len(pairs) == len(np.unique(layout)) == int(result.num_clusters)


@pytest.mark.parametrize("seed,k", [(0, 48), (1, 49)])
def test_many_clusters_match_transcription_without_a_cap(seed, k):
    # (i.i.d. random features are no test: their k is ~N - 1 and the QR labels of near-singleton
    # clusters change under 1e-5 perturbations.)
    features = many_regions_features(seed, 16, 16, 32)
    result = autosc(jnp.asarray(features), AutoSCConfig())
    labels, ref_k, alpha, well_posed = reference_autosc(features)
    assert well_posed
    assert int(result.num_clusters) == ref_k == k
    assert float(result.alpha) == alpha
    np.testing.assert_array_equal(np.asarray(result.labels).ravel(), labels)
    assert not bool(result.truncated)


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
    # Well-posed: every token's largest rotated coordinate leads the next one by > 0.1.
    _, _, pivots = scipy.linalg.qr(vectors.T, pivoting=True)
    u, _, vh = scipy.linalg.svd(vectors[pivots[:k], :].T)
    top2 = np.sort(np.abs(vectors @ (u @ vh)), axis=1)[:, -2:]
    assert k == 1 or (top2[:, 1] - top2[:, 0]).min() > 0.1
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


def test_batch_is_map_of_single():
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
