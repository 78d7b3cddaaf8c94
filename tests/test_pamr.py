"""Specification of spark_jax.masks.pamr against two formulations written from the published description.

PAMR (Araslanov & Roth 2020), reference-facts section 4: for every dilation d the 8 neighbours at
d * (dy, dx) with replicate padding; sigma = unbiased std per colour channel over all 9 * |D| window taps
(centre included); affinity -|I(i) - I(i+p)| / (1e-8 + 0.1 sigma) averaged over colour channels;
softmax over the 8 |D| neighbours; num_iter steps m(i) <- sum_p alpha_p(i) m(i+p). DiffCut's evaluation
then takes the argmax and applies scipy.ndimage.median_filter(labels[None], 3).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from spark_jax.graph.markov_flow import relabel_contiguous
from spark_jax.masks.pamr import (
    PamrConfig,
    keep_largest_segments,
    label_capacity,
    median_filter_3x3,
    pamr,
    pamr_affinity,
    refine_labels,
    refine_labels_batch,
)

pamr_jit = jax.jit(pamr, static_argnames=("num_iter", "dilations"))
refine_jit = jax.jit(refine_labels, static_argnums=(2, 3), static_argnames="capacity")

DIRS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
WINDOW = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def numpy_pamr_loop(image, masks, num_iter, dilations):
    """Plain per-pixel loop in float64, indices clamped to the image (= replicate padding)."""
    image = image.astype(np.float64)
    m = masks.astype(np.float64)
    h, w, _ = image.shape

    def at(i, j):
        return min(max(i, 0), h - 1), min(max(j, 0), w - 1)

    neighbours = [[[at(i + d * dy, j + d * dx) for d in dilations for dy, dx in DIRS] for j in range(w)]
                  for i in range(h)]
    alpha = np.zeros((h, w, len(dilations) * 8))
    for i in range(h):
        for j in range(w):
            taps = np.array([image[at(i + d * dy, j + d * dx)] for d in dilations for dy, dx in WINDOW])
            sigma = taps.std(axis=0, ddof=1)  # per colour channel
            logits = np.array([np.mean(-np.abs(image[i, j] - image[p]) / (1e-8 + 0.1 * sigma))
                               for p in neighbours[i][j]])
            e = np.exp(logits - logits.max())
            alpha[i, j] = e / e.sum()
    for _ in range(num_iter):
        new = np.zeros_like(m)
        for i in range(h):
            for j in range(w):
                for a, p in zip(alpha[i, j], neighbours[i][j]):
                    new[i, j] += a * m[p]
        m = new
    return m


def torch_pamr(image, masks, num_iter, dilations):
    """Vectorised torch formulation (float32, NCHW): replicate padding, then sliced neighbour stacks."""
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    m = torch.from_numpy(np.ascontiguousarray(masks.transpose(2, 0, 1)))[None]
    h, w = image.shape[:2]

    def stack(t, offsets):  # [B, C, H, W] -> [B, C, P, H, W]
        out = []
        for d in dilations:
            tp = F.pad(t, [d] * 4, mode="replicate")
            out += [tp[..., d + d * dy:d + d * dy + h, d + d * dx:d + d * dx + w] for dy, dx in offsets]
        return torch.stack(out, 2)

    sigma = stack(x, WINDOW).std(2, keepdim=True)
    logits = (-(x[:, :, None] - stack(x, DIRS)).abs() / (1e-8 + 0.1 * sigma)).mean(1, keepdim=True)
    alpha = F.softmax(logits, 2)
    for _ in range(num_iter):
        m = (stack(m, DIRS) * alpha).sum(2)
    return m[0].numpy().transpose(1, 2, 0)


def diffcut_refine_reference(image, labels, num_iter=10, dilations=(1, 2, 4, 8)):
    """DiffCut's evaluation step: masks of the labels present, PAMR, argmax, scipy 3x3 median on [1, H, W]."""
    present = np.unique(labels)
    masks = (labels[..., None] == present).astype(np.float32)
    refined = torch_pamr(image, masks, num_iter, dilations)
    compact = np.argmax(refined, axis=-1).astype(float)[None]
    filtered = scipy.ndimage.median_filter(compact, 3).astype(int)[0]
    return present[filtered], refined


def _image_and_labels(seed, h, w, k, constant=False):
    rng = np.random.default_rng(seed)
    if constant:
        image = np.full((h, w, 3), 0.3, np.float32)
    else:
        # Smooth-ish colour regions plus noise, like a real image at low resolution.
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(yy / 3.0), np.cos(xx / 4.0), np.sin((xx + yy) / 5.0)], -1) * 0.3 + 0.5
        image = np.clip(base + 0.05 * rng.normal(size=(h, w, 3)), 0, 1).astype(np.float32)
    labels = rng.integers(0, k, (h, w)).astype(np.int32)
    return image, labels


CASES = [
    pytest.param(16, 16, 3, (1, 2, 4, 8), 10, False, id="diffcut_defaults"),
    pytest.param(12, 20, 4, (1, 2), 5, False, id="non_square"),
    pytest.param(9, 7, 1, (1,), 3, False, id="single_label"),
    pytest.param(16, 16, 3, (1, 2, 4, 8, 12, 24), 10, False, id="original_dilations_beyond_image"),
    pytest.param(10, 10, 3, (1, 2, 4, 8), 10, True, id="constant_image_sigma_zero"),
]


class TestPamrParity:
    @pytest.mark.parametrize("h,w,k,dilations,num_iter,constant", CASES)
    def test_matches_numpy_loop_and_torch(self, h, w, k, dilations, num_iter, constant):
        image, labels = _image_and_labels(0, h, w, k, constant)
        masks = np.eye(k, dtype=np.float32)[labels]
        out = pamr_jit(jnp.asarray(image), jnp.asarray(masks), num_iter=num_iter, dilations=dilations)
        chex.assert_shape(out, (h, w, k))
        chex.assert_type(out, jnp.float32)
        chex.assert_tree_all_finite(out)
        np.testing.assert_allclose(np.asarray(out), numpy_pamr_loop(image, masks, num_iter, dilations),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(out), torch_pamr(image, masks, num_iter, dilations),
                                   atol=1e-5, rtol=0)

    def test_soft_masks_match_torch(self):
        image, _ = _image_and_labels(1, 16, 16, 1)
        masks = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
        out = pamr_jit(jnp.asarray(image), jnp.asarray(masks), num_iter=10, dilations=(1, 2, 4, 8))
        np.testing.assert_allclose(np.asarray(out), torch_pamr(image, masks, 10, (1, 2, 4, 8)), atol=1e-5, rtol=0)


class TestPamrProperties:
    def test_affinity_is_a_distribution_over_neighbours(self):
        image, _ = _image_and_labels(2, 12, 12, 1)
        alpha = jax.jit(pamr_affinity, static_argnums=1)(jnp.asarray(image), (1, 2, 4))
        chex.assert_shape(alpha, (12, 12, 24))
        assert float(jnp.min(alpha)) >= 0.0
        np.testing.assert_allclose(np.asarray(alpha.sum(-1)), 1.0, atol=1e-6)

    def test_constant_image_gives_uniform_weights(self):
        alpha = jax.jit(pamr_affinity, static_argnums=1)(jnp.full((8, 8, 3), 0.7), (1, 2, 4, 8))
        np.testing.assert_allclose(np.asarray(alpha), 1.0 / 32, atol=1e-7)

    def test_one_hot_masks_stay_distributions(self):
        image, labels = _image_and_labels(3, 16, 16, 2)
        out = pamr_jit(jnp.asarray(image), jax.nn.one_hot(labels, 3), num_iter=10, dilations=(1, 2, 4, 8))
        np.testing.assert_allclose(np.asarray(out.sum(-1)), 1.0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out[..., 2]), 0.0)  # an empty slot stays empty

    def test_zero_iterations_is_identity(self):
        image, labels = _image_and_labels(4, 8, 8, 3)
        masks = jax.nn.one_hot(labels, 3)
        out = pamr_jit(jnp.asarray(image), masks, num_iter=0, dilations=(1, 2))
        np.testing.assert_array_equal(np.asarray(out), np.asarray(masks))

    def test_vmap_matches_loop_and_traces_once(self):
        batch = [_image_and_labels(s, 12, 12, 3) for s in range(3)]
        images = jnp.asarray(np.stack([i for i, _ in batch]))
        masks = jax.nn.one_hot(jnp.asarray(np.stack([l for _, l in batch])), 3)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def batched(im, m):
            return jax.vmap(lambda a, b: pamr(a, b, num_iter=4, dilations=(1, 2)))(im, m)

        out = batched(images, masks)
        out = batched(images + 0.0, masks * 1.0)  # same shapes: no retrace
        chex.assert_shape(out, (3, 12, 12, 3))
        for b in range(3):
            np.testing.assert_allclose(np.asarray(out[b]),
                                       torch_pamr(np.asarray(images[b]), np.asarray(masks[b]), 4, (1, 2)),
                                       atol=1e-5, rtol=0)


class TestMedianFilter:
    @pytest.mark.parametrize("shape,k", [((16, 16), 5), ((7, 13), 3), ((3, 3), 9), ((1, 6), 4)])
    def test_matches_scipy_reflect(self, shape, k):
        labels = np.random.default_rng(6).integers(0, k, shape).astype(np.int32)
        out = jax.jit(median_filter_3x3)(jnp.asarray(labels))
        chex.assert_type(out, jnp.int32)
        np.testing.assert_array_equal(np.asarray(out), scipy.ndimage.median_filter(labels, 3))
        # DiffCut calls it on a [1, H, W] array: a 3x3x3 window over a size-1 batch axis, same result.
        np.testing.assert_array_equal(np.asarray(out), scipy.ndimage.median_filter(labels[None], 3)[0])

    def test_removes_isolated_pixels_and_keeps_borders(self):
        labels = np.zeros((6, 6), np.int32)
        labels[2, 3] = 4  # isolated: removed
        labels[0, :] = 2  # a border row: edge replication keeps it
        out = np.asarray(median_filter_3x3(jnp.asarray(labels)))
        assert out[2, 3] == 0
        np.testing.assert_array_equal(out[0], 2)


class TestCompactLabels:
    def test_matches_unique_relabelling(self):
        labels = np.random.default_rng(9).choice([3, 17, 40, 1023], size=(12, 12)).astype(np.int32)
        compact, count = jax.jit(relabel_contiguous, static_argnums=1)(jnp.asarray(labels), 1024)
        chex.assert_type(compact, jnp.int32)
        assert int(count) == 4
        np.testing.assert_array_equal(np.asarray(compact), np.unique(labels, return_inverse=True)[1].reshape(12, 12))

    def test_refining_compact_ids_is_refining_sparse_ids(self):
        image, labels = _image_and_labels(10, 16, 16, 3)
        sparse = labels * 7  # ids 0, 7, 14 of 15 slots
        compact, _ = relabel_contiguous(jnp.asarray(sparse), 15)
        a = refine_jit(jnp.asarray(image), jnp.asarray(sparse), 15, PamrConfig())
        b = refine_jit(jnp.asarray(image), compact, 3, PamrConfig())
        np.testing.assert_array_equal(np.asarray(a), np.array([0, 7, 14])[np.asarray(b)])


class TestCapacity:
    """PAMR's cost follows its mask channels; `capacity` bounds them by keeping the largest segments."""

    @pytest.mark.parametrize("n,slots", [(0, 8), (1, 8), (8, 8), (9, 16), (256, 256), (305, 512), (1024, 1024)])
    def test_label_capacity_is_the_next_power_of_two_at_least_8(self, n, slots):
        assert label_capacity(n) == slots

    def test_keep_largest_segments_keeps_sizes_not_ids_and_id_order(self):
        # Sizes by id: 0 -> 1, 1 -> 3, 2 -> 3, 3 -> 5, 4 -> 0 (absent); capacity 2 keeps 3 (5 px) and,
        # of the tied 1 and 2 (3 px each), the lower id 1. Kept ids take slots in id order.
        labels = jnp.asarray(np.array([[0, 1, 1, 1], [2, 2, 2, 3], [3, 3, 3, 3]], np.int32))
        slots, slot_ids = jax.jit(keep_largest_segments, static_argnums=(1, 2))(labels, 5, 2)
        np.testing.assert_array_equal(np.asarray(slot_ids), [1, 3])
        np.testing.assert_array_equal(np.asarray(slots), [[2, 0, 0, 0], [2, 2, 2, 1], [1, 1, 1, 1]])

    def test_capacity_at_least_the_segments_present_is_exact(self):
        image, labels = _image_and_labels(13, 16, 16, 3)
        sparse = jnp.asarray(labels * 7)  # ids 0, 7, 14 of 15
        exact = refine_jit(jnp.asarray(image), sparse, 15, PamrConfig())
        for capacity in (3, 8):
            np.testing.assert_array_equal(
                np.asarray(refine_jit(jnp.asarray(image), sparse, 15, PamrConfig(), capacity=capacity)),
                np.asarray(exact))

    def test_overflow_keeps_the_largest_segments_whatever_their_ids(self):
        # Four 12x12 colour quadrants with the HIGH ids 8..11 and eight 2x2 specks with the low ids
        # 0..7: 12 segments for 4 slots. Keeping by id would keep the specks and drop every quadrant.
        image = np.zeros((24, 24, 3), np.float32)
        labels = np.zeros((24, 24), np.int32)
        for q, (r, c) in enumerate([(0, 0), (0, 12), (12, 0), (12, 12)]):
            image[r:r + 12, c:c + 12] = np.random.default_rng(q).random(3)
            labels[r:r + 12, c:c + 12] = 8 + q
        for s in range(8):
            r, c = 2 + 12 * (s // 4), 1 + 3 * (s % 4)
            labels[r:r + 2, c:c + 2] = s
        out = np.asarray(refine_jit(jnp.asarray(image), jnp.asarray(labels), 12, PamrConfig(), capacity=4))
        assert set(np.unique(out)) == {8, 9, 10, 11}  # every quadrant survives, no speck displaces one
        # The same as giving the dropped specks no mask at all (ids outside [0, 12) get none).
        dropped = np.where(labels < 8, -1, labels)
        np.testing.assert_array_equal(out, np.asarray(refine_jit(jnp.asarray(image), jnp.asarray(dropped), 12,
                                                                 PamrConfig())))

    def test_capacity_is_validated(self):
        with pytest.raises(ValueError, match="capacity"):
            refine_labels(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8), jnp.int32), 3, capacity=0)
        with pytest.raises(ValueError, match="num_segments"):
            label_capacity(-1)


class TestRefineLabels:
    @pytest.mark.parametrize(
        "h,w,k,num_labels,median",
        [
            pytest.param(32, 32, 4, 4, True, id="diffcut_eval"),
            pytest.param(24, 40, 5, 8, True, id="non_square_with_empty_slots"),
            pytest.param(16, 16, 3, 3, False, id="no_median"),
            pytest.param(12, 12, 1, 2, True, id="single_cluster"),
        ],
    )
    def test_matches_diffcut_evaluation(self, h, w, k, num_labels, median):
        image, labels = _image_and_labels(7, h, w, k)
        # Use only every other slot id so the reference's relabelling via unique() is exercised.
        labels = labels * (num_labels // k) if num_labels >= 2 * k else labels
        cfg = PamrConfig(median_filter=median)
        out = refine_jit(jnp.asarray(image), jnp.asarray(labels), num_labels, cfg)
        chex.assert_shape(out, (h, w))
        chex.assert_type(out, jnp.int32)
        ref, refined = diffcut_refine_reference(image, labels)
        if not median:
            ref = np.unique(labels)[np.argmax(refined, -1)]
        # Float rounding may flip an argmax only at a near-tie; compare every pixel whose result cannot
        # depend on one (for the median: no near-tie in its 3x3 window).
        top2 = np.sort(refined, -1)[..., -2:] if refined.shape[-1] > 1 else None
        tie = (top2[..., 1] - top2[..., 0] < 1e-5) if top2 is not None else np.zeros((h, w), bool)
        if median:
            tie = scipy.ndimage.maximum_filter(tie, 3, mode="nearest")
        assert tie.mean() < 0.05
        np.testing.assert_array_equal(np.asarray(out)[~tie], ref[~tie])

    def test_constant_image(self):
        image, labels = _image_and_labels(8, 16, 16, 3, constant=True)
        out = refine_jit(jnp.asarray(image), jnp.asarray(labels), 3, PamrConfig(median_filter=False))
        # Uniform weights: every pixel averages its 32 clamped neighbours, 10 times; compare the argmax
        # before the median (the median of a constant-image result is checked in the cases above).
        refined = torch_pamr(image, np.eye(3, dtype=np.float32)[labels], 10, (1, 2, 4, 8))
        top2 = np.sort(refined, -1)[..., -2:]
        decided = top2[..., 1] - top2[..., 0] > 1e-5
        assert decided.mean() > 0.95
        np.testing.assert_array_equal(np.asarray(out)[decided], np.argmax(refined, -1)[decided])


def test_a_batch_is_refined_image_by_image():
    cases = [_image_and_labels(seed, 16, 16, 5) for seed in (1, 2, 3)]
    images, labels = (jnp.asarray(np.stack(x)) for x in zip(*cases))
    cfg = PamrConfig(num_iter=4)
    got = jax.jit(refine_labels_batch, static_argnums=(2, 3))(images, labels, 5, cfg)
    assert got.shape == labels.shape and got.dtype == jnp.int32
    for image, lab, g in zip(images, labels, got):
        np.testing.assert_array_equal(g, refine_jit(image, lab, 5, cfg))


class TestErrors:
    def test_config_defaults_and_validation(self):
        cfg = PamrConfig()
        assert (cfg.num_iter, cfg.dilations, cfg.median_filter) == (10, (1, 2, 4, 8), True)
        hash(cfg)  # usable as a static jit argument
        with pytest.raises(ValueError, match="dilations"):
            PamrConfig(dilations=[1, 2])
        with pytest.raises(ValueError, match="dilations"):
            PamrConfig(dilations=(0, 1))
        with pytest.raises(ValueError, match="num_iter"):
            PamrConfig(num_iter=-1)

    @pytest.mark.parametrize(
        "image,masks,match",
        [
            (np.zeros((8, 8, 3), np.float32), np.zeros((4, 4, 2), np.float32), "image's size"),
            (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2), np.float32), "floating image"),
            (np.zeros((8, 8), np.float32), np.zeros((8, 8, 2), np.float32), r"\[H, W, C\]"),
            (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 2), np.int32), "floating masks"),
        ],
    )
    def test_pamr_rejects_bad_input(self, image, masks, match):
        with pytest.raises(ValueError, match=match):
            pamr(jnp.asarray(image), jnp.asarray(masks))

    def test_refine_labels_rejects_bad_input(self):
        image = jnp.zeros((8, 8, 3))
        with pytest.raises(ValueError, match="image's shape"):
            refine_labels(image, jnp.zeros((8, 9), jnp.int32), 3)
        with pytest.raises(ValueError, match="integers"):
            refine_labels(image, jnp.zeros((8, 8), jnp.float32), 3)
        with pytest.raises(ValueError, match="num_labels"):
            refine_labels(image, jnp.zeros((8, 8), jnp.int32), 0)
        with pytest.raises(ValueError, match=r"images \[B, H, W, C\] and labels \[B, H, W\] of the same"):
            refine_labels_batch(image[None], jnp.zeros((2, 8, 8), jnp.int32), 3)


@pytest.mark.slow
class TestFullSize:
    def test_refine_labels_at_the_scoring_size(self):
        # The reference evaluation's setting: 128x128, 10 iterations, dilations (1, 2, 4, 8), 3x3 median.
        rng = np.random.default_rng(11)
        image, _ = _image_and_labels(11, 128, 128, 1)
        labels = np.kron(rng.integers(0, 12, (32, 32)), np.ones((4, 4), int)).astype(np.int32)
        out = refine_jit(jnp.asarray(image), jnp.asarray(labels), 12, PamrConfig())
        ref, refined = diffcut_refine_reference(image, labels)
        top2 = np.sort(refined, -1)[..., -2:]
        tie = scipy.ndimage.maximum_filter(top2[..., 1] - top2[..., 0] < 1e-5, 3, mode="nearest")
        assert tie.mean() < 0.01
        np.testing.assert_array_equal(np.asarray(out)[~tie], ref[~tie])

    def test_pamr_at_image_size(self):
        image, labels = _image_and_labels(12, 1024, 1024, 4)
        masks = np.eye(4, dtype=np.float32)[labels]
        out = pamr_jit(jnp.asarray(image), jnp.asarray(masks), num_iter=10, dilations=(1, 2, 4, 8))
        np.testing.assert_allclose(np.asarray(out), torch_pamr(image, masks, 10, (1, 2, 4, 8)), atol=1e-5, rtol=0)
