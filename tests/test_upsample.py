"""Specification of spark_jax.masks.upsample: torch-exact bilinear resampling and DiffCut's concept assignment."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spark_jax.masks.resample import resize_bilinear
from spark_jax.masks.upsample import (
    bilinear_matrix,
    concept_assignment,
    concept_scores,
    labels_from_soft_labels,
    upsample_labels,
    upsample_soft_labels,
)


def torch_bilinear(q: np.ndarray, size) -> np.ndarray:
    """The reference: torch's bilinear interpolate (align_corners=False) on an NCHW view of [h, w, K]."""
    t = torch.from_numpy(np.ascontiguousarray(q.transpose(2, 0, 1)))[None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0].numpy().transpose(1, 2, 0)


def numpy_bilinear_loop(x: np.ndarray, size) -> np.ndarray:
    """Per-output-pixel bilinear resampling, half-pixel centres, source clamped to the grid (float64)."""
    h, w, _ = x.shape
    out_h, out_w = size
    out = np.zeros((out_h, out_w, x.shape[2]))

    def taps(o, n_in, n_out):
        s = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(s)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    for i in range(out_h):
        r0, r1, fr = taps(i, h, out_h)
        for j in range(out_w):
            c0, c1, fc = taps(j, w, out_w)
            out[i, j] = ((1 - fr) * ((1 - fc) * x[r0, c0] + fc * x[r0, c1])
                         + fr * ((1 - fc) * x[r1, c0] + fc * x[r1, c1]))
    return out


def numpy_concept_assignment(features, labels, size):
    """DiffCut Sec. 3.3 as published in its code, literally: normalise, masked means over the segments
    present, bilinear upsampling of the normalised features, argmax of dot products; ids mapped back.

    Returns (labels [H, W], gap [H, W]) where gap is the margin between the best and second-best score.
    """
    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    present = np.unique(labels)
    means = np.stack([x[labels == k].sum(0) / ((labels == k).sum() + 1e-8) for k in present])
    up = numpy_bilinear_loop(x, size)
    scores = up @ means.T
    order = np.sort(scores, axis=-1)
    gap = order[..., -1] - order[..., -2] if len(present) > 1 else np.full(size, np.inf)
    return present[np.argmax(scores, axis=-1)], gap


SIZES = [
    pytest.param((32, 32), (128, 128), 5, id="up_4x"),
    pytest.param((32, 32), (20, 20), 4, id="down_mask_smaller_than_grid"),
    pytest.param((32, 32), (96, 160), 3, id="non_square_output"),
    pytest.param((24, 40), (50, 30), 2, id="non_square_input"),
    pytest.param((8, 8), (8, 8), 3, id="identity"),
    pytest.param((32, 32), (1, 1), 2, id="single_pixel"),
    pytest.param((16, 16), (37, 61), 1, id="single_channel_odd_sizes"),
]


class TestBilinearMatrix:
    @pytest.mark.parametrize("n_in,n_out", [(32, 128), (32, 20), (5, 7), (7, 1), (1, 9), (8, 8)])
    def test_rows_are_convex_weights(self, n_in, n_out):
        m = bilinear_matrix(n_in, n_out)
        assert m.shape == (n_out, n_in) and m.dtype == np.float32
        assert np.all(m >= 0)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
        assert np.all((m > 0).sum(1) <= 2)

    def test_same_size_is_identity(self):
        np.testing.assert_array_equal(bilinear_matrix(11, 11), np.eye(11, dtype=np.float32))

    def test_rejects_empty_sizes(self):
        with pytest.raises(ValueError, match="sizes >= 1"):
            bilinear_matrix(0, 4)


class TestUpsampleSoftLabels:
    @pytest.mark.parametrize("grid,size,k", SIZES)
    def test_matches_torch_interpolate(self, grid, size, k):
        rng = np.random.default_rng(0)
        q = rng.random(grid + (k,)).astype(np.float32)
        out = jax.jit(upsample_soft_labels, static_argnums=1)(jnp.asarray(q), size)
        chex.assert_shape(out, size + (k,))
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(np.asarray(out), torch_bilinear(q, size), atol=1e-5, rtol=0)

    def test_downsampling_does_not_antialias(self):
        # jax.image.resize anti-aliases when shrinking; torch (the reference) does not. A checkerboard
        # shrunk 2x reads between the squares, so torch gives exactly 0.5 everywhere...
        q = np.indices((32, 32)).sum(0)[..., None] % 2
        out = upsample_soft_labels(jnp.asarray(q, jnp.float32), (16, 16))
        np.testing.assert_allclose(np.asarray(out), 0.5, atol=1e-6)
        # ...and a 3x shrink samples single tokens (source = 3o + 1): no averaging at all.
        out3 = upsample_soft_labels(jnp.asarray(q[:30, :30], jnp.float32), (10, 10))
        np.testing.assert_array_equal(np.asarray(out3)[..., 0], q[1:30:3, 1:30:3, 0])

    def test_image_resize_of_diffcut_pamr_step(self):
        # DiffCut's PAMR input: the 1024 image brought to 128 by F.interpolate(bilinear), no antialias.
        image = np.random.default_rng(7).random((1024, 1024, 3)).astype(np.float32)
        out = jax.jit(resize_bilinear, static_argnums=(1, 2))(jnp.asarray(image), 128, 128)
        chex.assert_shape(out, (128, 128, 3))
        np.testing.assert_allclose(np.asarray(out), torch_bilinear(image, (128, 128)), atol=1e-5, rtol=0)

    def test_vmap_over_batch(self):
        q = np.random.default_rng(1).random((3, 8, 8, 4)).astype(np.float32)
        out = jax.jit(jax.vmap(lambda x: upsample_soft_labels(x, (13, 21))))(jnp.asarray(q))
        chex.assert_shape(out, (3, 13, 21, 4))
        for b in range(3):
            np.testing.assert_allclose(np.asarray(out[b]), torch_bilinear(q[b], (13, 21)), atol=1e-5, rtol=0)

    @pytest.mark.parametrize(
        "q,size,match",
        [
            (np.zeros((4, 4), np.float32), (8, 8), r"\[h, w, K\]"),
            (np.zeros((4, 4, 2), np.int32), (8, 8), "floating"),
            (np.zeros((4, 4, 2), np.float32), (8, 0), "positive ints"),
            (np.zeros((4, 4, 2), np.float32), (8,), "positive ints"),
            (np.zeros((4, 4, 2), np.float32), (8.5, 8), "positive ints"),
        ],
    )
    def test_rejects_bad_input(self, q, size, match):
        with pytest.raises(ValueError, match=match):
            upsample_soft_labels(jnp.asarray(q), size)


class TestUpsampleLabels:
    @pytest.mark.parametrize("rows_per_chunk", [None, 1, 7, 1000])
    @pytest.mark.parametrize("grid,size,k", SIZES[:4])
    def test_argmax_of_torch_upsampling_any_chunking(self, grid, size, k, rows_per_chunk):
        rng = np.random.default_rng(2)
        q = rng.random(grid + (k,)).astype(np.float32)
        fn = jax.jit(lambda x: upsample_labels(x, size, rows_per_chunk=rows_per_chunk))
        out = fn(jnp.asarray(q))
        chex.assert_shape(out, size)
        chex.assert_type(out, jnp.int32)
        ref = torch_bilinear(q, size)
        top2 = np.sort(ref, axis=-1)[..., -2:] if k > 1 else None
        decided = (top2[..., 1] - top2[..., 0] > 1e-5) if k > 1 else np.ones(size, bool)
        assert decided.mean() > 0.95
        np.testing.assert_array_equal(np.asarray(out)[decided], np.argmax(ref, -1)[decided])

    def test_invalid_channels_never_win(self):
        q = np.zeros((4, 4, 3), np.float32)
        q[..., 1] = 1.0  # channel 1 dominates everywhere...
        q[..., 2] = 0.5
        valid = jnp.array([True, False, True])  # ...but is not allowed
        out = upsample_labels(jnp.asarray(q), (9, 9), valid=valid, rows_per_chunk=2)
        np.testing.assert_array_equal(np.asarray(out), 2)
        np.testing.assert_array_equal(np.asarray(labels_from_soft_labels(jnp.asarray(q), valid)), 2)

    def test_single_cluster(self):
        q = jnp.asarray(np.random.default_rng(8).random((8, 8, 1)), jnp.float32)
        out = jax.jit(lambda x: upsample_labels(x, (12, 20), rows_per_chunk=5))(q)
        np.testing.assert_array_equal(np.asarray(out), np.zeros((12, 20), np.int32))

    def test_compiles_once_per_shape(self, compilations):
        fn = jax.jit(lambda x: upsample_labels(x, (40, 40), rows_per_chunk=8))
        q = jnp.asarray(np.random.default_rng(9).random((8, 8, 3)), jnp.float32)
        first = fn(q)
        doubled = 2.0 * q
        with compilations() as c:
            np.testing.assert_array_equal(np.asarray(fn(doubled)), np.asarray(first))  # argmax is scale-free
        assert c.count == 0

    def test_ties_go_to_lowest_index(self):
        q = jnp.ones((3, 3, 4), jnp.float32)
        np.testing.assert_array_equal(np.asarray(upsample_labels(q, (5, 5))), 0)

    def test_rejects_wrong_valid_shape(self):
        with pytest.raises(ValueError, match=r"valid must have shape \[K\]"):
            upsample_labels(jnp.zeros((4, 4, 3)), (8, 8), valid=jnp.ones((2,), bool))


def _planted(seed, h, w, c, num_labels):
    """Token features: one random direction per segment plus noise; random blocky labels."""
    rng = np.random.default_rng(seed)
    labels = np.kron(rng.integers(0, num_labels, (h // 4 + 1, w // 4 + 1)), np.ones((4, 4), int))[:h, :w]
    centres = rng.normal(size=(num_labels, c))
    feats = centres[labels] + 0.8 * rng.normal(size=(h, w, c))
    return feats.astype(np.float32), labels.astype(np.int32)


class TestConceptAssignment:
    @pytest.mark.parametrize(
        "grid,size,num_labels",
        [
            pytest.param((8, 8), (32, 32), 4, id="up_4x"),
            pytest.param((16, 16), (64, 64), 6, id="up_4x_more_labels"),
            pytest.param((16, 16), (10, 10), 3, id="mask_smaller_than_grid"),
            pytest.param((8, 12), (20, 36), 5, id="non_square"),
        ],
    )
    def test_matches_numpy_reference(self, grid, size, num_labels):
        feats, labels = _planted(3, *grid, 16, num_labels)
        fn = jax.jit(concept_assignment, static_argnums=(2, 3))
        out = fn(jnp.asarray(feats), jnp.asarray(labels), num_labels + 2, size)  # 2 extra empty slots
        chex.assert_shape(out, size)
        chex.assert_type(out, jnp.int32)
        ref, gap = numpy_concept_assignment(feats, labels, size)
        decided = gap > 1e-5
        assert decided.mean() > 0.95
        np.testing.assert_array_equal(np.asarray(out)[decided], ref[decided])

    def test_scores_match_upsampling_features_first(self):
        # Scores are computed on the token grid and then upsampled (linearity); check against the
        # literal order: upsample the normalised features, then take dot products with the means.
        feats, labels = _planted(4, 8, 8, 16, 3)
        scores, nonempty = jax.jit(concept_scores, static_argnums=(2, 3))(
            jnp.asarray(feats), jnp.asarray(labels), 5, (24, 40))
        x = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
        up = torch_bilinear(x, (24, 40))
        means = np.stack([x[labels == k].mean(0) if (labels == k).any() else np.zeros(16) for k in range(5)])
        np.testing.assert_allclose(np.asarray(scores), up @ means.T, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(nonempty), [(labels == k).any() for k in range(5)])

    def test_single_cluster_and_empty_slots_never_win(self):
        # One segment whose tokens are +v (60%) and -v (40%): its mean is 0.2 v, so the -v tokens score
        # -0.2 against it, below the 0 of an empty slot's zero mean. Empty slots must still never win.
        v = np.random.default_rng(5).normal(size=8).astype(np.float32)
        sign = np.where(np.arange(64).reshape(8, 8) < 38, 1.0, -1.0).astype(np.float32)
        feats = sign[..., None] * v
        labels = jnp.zeros((8, 8), jnp.int32)
        scores, _ = concept_scores(jnp.asarray(feats), labels, 3, (16, 16))
        assert float(jnp.min(scores[..., 0])) < -0.1  # the trap is real
        out = jax.jit(concept_assignment, static_argnums=(2, 3))(jnp.asarray(feats), labels, 3, (16, 16))
        np.testing.assert_array_equal(np.asarray(out), 0)

    def test_chunked_equals_unchunked_and_vmaps(self):
        batch = [_planted(s, 8, 8, 16, 4) for s in range(3)]
        feats = jnp.asarray(np.stack([f for f, _ in batch]))
        labels = jnp.asarray(np.stack([l for _, l in batch]))
        whole = jax.jit(jax.vmap(lambda f, l: concept_assignment(f, l, 4, (30, 30))))(feats, labels)
        chunked = jax.jit(jax.vmap(lambda f, l: concept_assignment(f, l, 4, (30, 30), rows_per_chunk=4)))(
            feats, labels)
        chex.assert_shape(whole, (3, 30, 30))
        np.testing.assert_array_equal(np.asarray(whole), np.asarray(chunked))
        for b in range(3):
            np.testing.assert_array_equal(
                np.asarray(whole[b]), np.asarray(concept_assignment(feats[b], labels[b], 4, (30, 30))))

    @pytest.mark.parametrize(
        "feats_shape,labels_shape,labels_dtype,num_labels,match",
        [
            ((8, 8), (8, 8), np.int32, 3, r"\[h, w, C\]"),
            ((8, 8, 4), (8, 7), np.int32, 3, "token grid's shape"),
            ((8, 8, 4), (8, 8), np.float32, 3, "integers"),
            ((8, 8, 4), (8, 8), np.int32, 0, "num_labels"),
        ],
    )
    def test_rejects_bad_input(self, feats_shape, labels_shape, labels_dtype, num_labels, match):
        with pytest.raises(ValueError, match=match):
            concept_assignment(jnp.zeros(feats_shape), jnp.zeros(labels_shape, labels_dtype), num_labels, (16, 16))


class TestNonFiniteInput:
    """Jitted code cannot raise on data: a NaN/Inf token never gives a NaN output or an invalid label."""

    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_concept_assignment_treats_a_nonfinite_token_as_a_zero_vector(self, bad):
        feats, labels = _planted(6, 8, 8, 16, 4)
        poisoned, zeroed = feats.copy(), feats.copy()
        poisoned[3, 5, 2] = bad
        zeroed[3, 5, :] = 0.0
        args = (jnp.asarray(labels), 6, (20, 20))
        scores, _ = concept_scores(jnp.asarray(poisoned), *args)
        chex.assert_tree_all_finite(scores)
        np.testing.assert_array_equal(np.asarray(scores), np.asarray(concept_scores(jnp.asarray(zeroed), *args)[0]))
        np.testing.assert_array_equal(np.asarray(concept_assignment(jnp.asarray(poisoned), *args)),
                                      np.asarray(concept_assignment(jnp.asarray(zeroed), *args)))

    @pytest.mark.parametrize("rows_per_chunk", [None, 3])
    def test_an_all_nan_image_gets_a_present_label_everywhere(self, rows_per_chunk):
        labels = np.zeros((8, 8), np.int32)
        labels[4:] = 2  # ids 0 and 2 present, 1 and 3 empty
        out = concept_assignment(jnp.full((8, 8, 16), jnp.nan), jnp.asarray(labels), 4, (20, 20),
                                 rows_per_chunk=rows_per_chunk)
        # No evidence anywhere: every score is 0, the lowest present id wins (never an empty slot).
        np.testing.assert_array_equal(np.asarray(out), 0)

    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_soft_label_upsampling_counts_a_nonfinite_entry_as_zero(self, bad):
        q = np.random.default_rng(7).random((6, 6, 3)).astype(np.float32)
        poisoned, zeroed = q.copy(), q.copy()
        poisoned[2, 2, 1], zeroed[2, 2, 1] = bad, 0.0
        up = upsample_soft_labels(jnp.asarray(poisoned), (24, 24))
        chex.assert_tree_all_finite(up)
        np.testing.assert_array_equal(np.asarray(up), np.asarray(upsample_soft_labels(jnp.asarray(zeroed), (24, 24))))
        for rows in (None, 5):
            np.testing.assert_array_equal(
                np.asarray(upsample_labels(jnp.asarray(poisoned), (24, 24), rows_per_chunk=rows)),
                np.asarray(upsample_labels(jnp.asarray(zeroed), (24, 24), rows_per_chunk=rows)))

    def test_an_all_nan_soft_label_map_gives_finite_zeros_and_label_zero(self):
        q = jnp.full((4, 4, 3), jnp.nan)
        np.testing.assert_array_equal(np.asarray(upsample_soft_labels(q, (8, 8))), 0.0)
        np.testing.assert_array_equal(np.asarray(upsample_labels(q, (8, 8))), 0)
        valid = jnp.array([False, True, True])
        np.testing.assert_array_equal(np.asarray(upsample_labels(q, (8, 8), valid=valid)), 1)

    def test_a_nan_score_never_wins_the_argmax(self):
        scores = jnp.array([[0.2, jnp.nan, 0.1], [jnp.nan, jnp.nan, -1.0]])
        np.testing.assert_array_equal(np.asarray(labels_from_soft_labels(scores)), [0, 2])
