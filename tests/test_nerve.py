"""Specification of NERVE (spark_jax.methods.nerve, spark_jax.graph.random_walk) against the NumPy transcription of
its equations (spark_jax.testing.numpy_nerve), and of the method as the registry runs it.

Each equation is checked on its own (entropy head weights, global and local Q/K affinities, the fusion, G's
resampling, the truncated walk, its closed form and the limit between them), then the whole method. Discrete
outputs (labels) are compared only where the top two upsampled probabilities are at least MARGIN apart.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.backbones.handcrafted import FEATURE_TAP, HandcraftedBackbone, HandcraftedConfig
from spark_jax.graph.random_walk import closed_form_walk, random_walk, truncated_walk
from spark_jax.masks.upsample import upsample_soft_labels
from spark_jax.methods import REGISTRY, MethodContext, MethodInputs
from spark_jax.methods.nerve import (
    SD21_ATTENTION_MODULE,
    NerveConfig,
    attention_taps,
    class_probs_on_grid,
    head_entropies,
    head_weights,
    nerve_image,
    nerve_transition,
    weighted_global_affinity,
    weighted_local_affinity,
)
from spark_jax.methods.registry import jitted_method
from spark_jax.testing import numpy_nerve as ref

MARGIN = 1e-4
# One compiled program per shape (eager dispatch of the loops inside would be slower than compiling them).
nerve_image_jit = jax.jit(nerve_image, static_argnums=3, static_argnames=("mask_size", "background_threshold"))


# ----------------------------------------------------------------------------------------------- fixtures
def queries_keys(seed: int, heads: int, grid: tuple[int, int], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries and keys [heads, N, d] with a different sharpness per head (so the entropies differ) and keys
    correlated with the queries (as a trained attention's), plus a spatial layout (two halves of the grid)."""
    rng = np.random.default_rng(seed)
    n = grid[0] * grid[1]
    side = (np.arange(n) % grid[1] >= grid[1] // 2).astype(np.float64)
    base = rng.standard_normal((2, d))
    q, k = [], []
    for h in range(heads):
        scale = 1.0 + 1.5 * h
        tokens = base[side.astype(int)] + 0.7 * rng.standard_normal((n, d))
        q.append(scale * tokens)
        k.append(scale * (tokens + 0.5 * rng.standard_normal((n, d))))
    return np.stack(q).astype(np.float32), np.stack(k).astype(np.float32)


def stochastic(seed: int, n: int, k: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, n if k is None else k)) ** 3
    return (x / x.sum(axis=1, keepdims=True)).astype(np.float32)


GRID = (5, 6)


# ----------------------------------------------------------------------------------------------- the equations
def test_head_entropies_are_the_mean_attention_row_entropies():
    q, k = queries_keys(0, 3, GRID, 8)
    got = np.asarray(head_entropies(jnp.asarray(q), jnp.asarray(k)))
    want = ref.head_entropies(q, k)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want[0] > want[1] > want[2]  # the fixture's sharper heads attend more narrowly


@pytest.mark.parametrize("c", [0.0, 1.0, 4.0])
def test_head_weights_are_a_softmax_of_minus_c_entropy(c):
    entropies = np.array([2.5, 1.0, 3.2, 1.7], np.float32)
    got = np.asarray(head_weights(jnp.asarray(entropies), c))
    np.testing.assert_allclose(got, ref.head_weights(entropies, c), rtol=1e-6)
    if c == 0:
        np.testing.assert_allclose(got, 0.25, rtol=1e-6)  # the mean over heads
    else:
        assert np.argmax(got) == np.argmin(entropies)  # the most confident head weighs most


def test_global_affinity_is_the_weighted_query_key_cosine():
    q, k = queries_keys(1, 3, GRID, 8)
    w = np.array([0.5, 0.2, 0.3], np.float32)
    got = np.asarray(weighted_global_affinity(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w)))
    want = ref.global_affinity(q, k, w)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, want.T, atol=1e-3)  # cos(Q_i, K_j): not symmetric, unlike a feature cosine
    assert (want == 0).any()  # negatives clipped


@pytest.mark.parametrize("eps_self", [1e-3, 1.0])
def test_local_affinity_has_eps_self_and_neighbour_cosines(eps_self):
    q, k = queries_keys(2, 2, GRID, 8)
    w = np.array([0.7, 0.3], np.float32)
    got = np.asarray(weighted_local_affinity(jnp.asarray(q), jnp.asarray(k), jnp.asarray(w), GRID,
                                             eps_self=eps_self))
    want = ref.local_affinity(q, k, w, GRID, eps_self)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.diag(got), eps_self, rtol=1e-6)
    assert np.count_nonzero(want[0]) <= 4 and np.count_nonzero(want[7]) <= 9  # corner and interior token


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
def test_fusion_is_the_convex_mix_of_the_row_normalised_parts(beta):
    q, k = queries_keys(3, 3, GRID, 8)
    cfg = NerveConfig(c=2.0, eps_self=0.05, beta=beta)
    graph = nerve_transition(jnp.asarray(q), jnp.asarray(k), GRID, cfg)
    want = ref.transition(q, k, GRID, c=2.0, eps_self=0.05, beta=beta)
    np.testing.assert_allclose(np.asarray(graph.s), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(graph.s).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(graph.weights), ref.head_weights(ref.head_entropies(q, k), 2.0),
                               rtol=1e-4)


@pytest.mark.parametrize("source,target", [((4, 3), (5, 6)), ((12, 12), (5, 6)), ((5, 6), (5, 6))])
def test_class_probs_are_resampled_bilinearly_and_renormalised(source, target):
    rng = np.random.default_rng(4)
    probs = rng.random((*source, 4)).astype(np.float32)
    probs /= probs.sum(axis=-1, keepdims=True)
    g, bad = class_probs_on_grid(jnp.asarray(probs), target)
    np.testing.assert_allclose(np.asarray(g), ref.class_probs_on_grid(probs, target), atol=1e-6)
    assert int(bad) == 0
    if source == target:
        np.testing.assert_allclose(np.asarray(g), probs.reshape(-1, 4), atol=1e-6)


@pytest.mark.parametrize("steps", [0, 1, 5, 20])
def test_truncated_walk_is_the_normalised_sum_of_powers(steps):
    s, g = stochastic(5, 24), stochastic(6, 24, 3)
    res = truncated_walk(jnp.asarray(s), jnp.asarray(g), alpha=0.8, steps=steps)
    np.testing.assert_allclose(np.asarray(res.probs), ref.truncated_walk(s, g, 0.8, steps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.probs).sum(axis=1), 1.0, atol=1e-5)
    if steps == 0:
        np.testing.assert_allclose(np.asarray(res.probs), g, atol=1e-7)


def test_closed_form_is_the_inverse_and_the_fixed_point():
    s, g = stochastic(7, 24), stochastic(8, 24, 3)
    res = closed_form_walk(jnp.asarray(s), jnp.asarray(g), alpha=0.9)
    want = ref.closed_form_walk(s, g, 0.9)
    np.testing.assert_allclose(np.asarray(res.probs), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.probs).sum(axis=1), 1.0, atol=1e-5)
    assert float(res.residual) < 1e-5


def test_truncated_walk_tends_to_the_closed_form_within_alpha_to_the_l_plus_1():
    s, g = stochastic(9, 32), stochastic(10, 32, 4)
    alpha = 0.9
    limit = ref.closed_form_walk(s, g, alpha)
    errors, residuals = [], []
    for steps in (0, 2, 5, 10, 20, 50, 100, 300):
        res = truncated_walk(jnp.asarray(s), jnp.asarray(g), alpha=alpha, steps=steps)
        err = np.abs(np.asarray(res.probs) - limit).max()
        assert err <= alpha ** (steps + 1) + 1e-5, (steps, err)  # the bound of the module docstring
        errors.append(err)
        residuals.append(float(res.residual))
    assert all(a > b for a, b in zip(errors[:5], errors[1:6]))  # shrinks with L until float32 rounding
    assert errors[-1] < 1e-5 and residuals[-1] < 1e-5 and residuals[0] > 1e-2


def test_random_walk_dispatches_and_rejects_bad_shapes():
    s, g = jnp.asarray(stochastic(11, 8)), jnp.asarray(stochastic(12, 8, 2))
    chex.assert_trees_all_close(random_walk(s, g, alpha=0.5, walk="closed_form"), closed_form_walk(s, g, alpha=0.5))
    chex.assert_trees_all_close(random_walk(s, g, alpha=0.5, steps=3), truncated_walk(s, g, alpha=0.5, steps=3))
    with pytest.raises(ValueError, match="walk must be one of"):
        random_walk(s, g, alpha=0.5, walk="power")
    with pytest.raises(ValueError, match=r"G must be \[N, K\] with N = 8"):
        truncated_walk(s, g[:5], alpha=0.5, steps=2)
    with pytest.raises(ValueError, match="int >= 0"):
        truncated_walk(s, g, alpha=0.5, steps=-1)


@pytest.mark.parametrize("walk", ["truncated", "closed_form"])
def test_whole_method_matches_the_transcription(walk):
    grid = (6, 6)
    q, k = queries_keys(13, 2, grid, 8)
    rng = np.random.default_rng(14)
    probs = rng.dirichlet(np.full(4, 0.5), size=(4, 4)).astype(np.float32)
    cfg = NerveConfig(walk=walk, walk_steps=6, alpha=0.8, eps_self=0.1)
    res = nerve_image_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(probs), grid, cfg, mask_size=12)
    labels, p, up = ref.nerve(q, k, probs, grid, mask_size=12, c=cfg.c, eps_self=0.1, alpha=0.8, beta=cfg.beta,
                              steps=6, walk=walk)
    np.testing.assert_allclose(np.asarray(res.token_probs), p, atol=1e-5)
    top2 = np.sort(up, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > MARGIN
    assert clear.mean() > 0.9, "fixture not well-posed"
    np.testing.assert_array_equal(np.asarray(res.labels)[clear], labels[clear])
    assert int(res.num_predicted_classes) == len(np.unique(np.asarray(res.labels)))


def test_background_threshold_sets_unsure_pixels_to_class_0():
    grid = (6, 6)
    q, k = queries_keys(15, 2, grid, 8)
    probs = np.random.default_rng(16).dirichlet(np.full(3, 1.0), size=(6, 6)).astype(np.float32)
    args = (jnp.asarray(q), jnp.asarray(k), jnp.asarray(probs), grid, NerveConfig())
    plain = nerve_image_jit(*args, mask_size=12)
    top = np.asarray(upsample_soft_labels(plain.token_probs, (12, 12))).max(axis=-1)
    threshold = float(np.median(top))
    thresholded = nerve_image_jit(*args, mask_size=12, background_threshold=threshold)
    far = np.abs(top - threshold) > MARGIN
    below = top < threshold
    np.testing.assert_array_equal(np.asarray(thresholded.labels)[far & below], 0)
    np.testing.assert_array_equal(np.asarray(thresholded.labels)[far & ~below], np.asarray(plain.labels)[far & ~below])
    assert float(thresholded.background_fraction) == pytest.approx(below.mean(), abs=2 / 144)
    assert float(plain.background_fraction) == 0.0


def test_non_finite_inputs_are_counted_and_labels_stay_valid():
    grid = (4, 4)
    q, k = queries_keys(17, 2, grid, 4)
    q[1, 3] = np.nan
    probs = np.full((2, 2, 3), 1 / 3, np.float32)
    probs[0, 1] = np.inf
    res = nerve_image_jit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(probs), grid, NerveConfig(), mask_size=8)
    assert int(res.num_nonfinite_tokens) == 1 and int(res.num_nonfinite_class_probs) == 1
    labels = np.asarray(res.labels)
    assert np.isfinite(np.asarray(res.token_probs)).all() and labels.min() >= 0 and labels.max() < 3


# ----------------------------------------------------------------------------------------------- the registered method
def planted_image(size: int) -> np.ndarray:
    """Region ids [size, size] of about a third of the image each: background 0, a disc 1, a lower band 2 (balanced,
    so that no region's features sit at the origin of the handcrafted backbone's per-image standardisation)."""
    r, c = np.mgrid[0:size, 0:size] / size
    layout = np.zeros((size, size), np.int32)
    layout[(r - 0.3) ** 2 + (c - 0.35) ** 2 < 0.28**2] = 1
    layout[r > 0.64] = 2
    return layout


def planted_inputs(seed: int, resolution: int = 128, clip_grid: int = 8, noise: float = 1.2):
    """Images of the planted layout in three colours and CLIP-like class probabilities on a coarser grid: a softmax
    of 2 x one-hot(the patch's majority region) + N(0, noise^2) per class (a noisy, blurred G)."""
    rng = np.random.default_rng(seed)
    layout = planted_image(resolution)
    colours = np.array([[0.2, 0.5, 0.2], [0.85, 0.2, 0.2], [0.2, 0.3, 0.85]])
    image = np.clip(colours[layout] + 0.03 * rng.standard_normal((resolution, resolution, 3)), 0, 1)
    patch = resolution // clip_grid
    counts = np.stack([(layout == v).reshape(clip_grid, patch, clip_grid, patch).mean(axis=(1, 3))
                       for v in range(3)], axis=-1)
    logits = 2.0 * np.eye(3)[np.argmax(counts, axis=-1)] + noise * rng.standard_normal((clip_grid, clip_grid, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return image.astype(np.float32), probs.astype(np.float32), layout


def run_registered(images, probs, *, mask_size: int, cfg: NerveConfig | None = None, background_threshold=0.0):
    spec = REGISTRY["nerve"]
    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=images.shape[1]))
    cfg = spec.resolve_config(cfg, "handcrafted")
    taps = spec.taps(cfg, backbone)
    values = backbone.extract_prepared(jnp.asarray(images), taps)
    b, (h, w) = images.shape[0], backbone.token_grid
    inputs = MethodInputs(features=values[FEATURE_TAP].reshape(b, h, w, -1), taps=values, images=jnp.asarray(images),
                          num_classes=jnp.zeros((b,), jnp.int32), index=jnp.arange(b, dtype=jnp.int32),
                          class_probs=jnp.asarray(probs))
    ctx = MethodContext(mask_size, "soft_labels", FEATURE_TAP, background_threshold)
    params = spec.params(cfg, ctx, (h, w))
    labels, diag = jitted_method("nerve", ctx)(inputs, params)
    return np.asarray(labels), {k: np.asarray(v) for k, v in diag.items()}


def test_registered_method_recovers_planted_classes_on_the_handcrafted_backbone():
    spec = REGISTRY["nerve"]
    assert spec.open_vocab and spec.upsampling == "soft_labels"
    assert spec.diffusion_defaults == {"resolution": 512, "timestep": 100}
    drawn = [planted_inputs(seed) for seed in (0, 1)]
    images = np.stack([d[0] for d in drawn])
    probs = np.stack([d[1] for d in drawn])
    labels, diag = run_registered(images, probs, mask_size=32)
    assert labels.shape == (2, 32, 32) and labels.dtype == np.int32
    assert set(diag) == set(spec.diagnostics) and all(v.shape == (2,) for v in diag.values())
    truth = planted_image(32)
    for i, (_, p, _) in enumerate(drawn):
        clip_only = np.argmax(np.asarray(upsample_soft_labels(jnp.asarray(p), (32, 32))), axis=-1)
        nerve_acc, clip_acc = (labels[i] == truth).mean(), (clip_only == truth).mean()
        assert nerve_acc > 0.9 and nerve_acc > clip_acc + 0.05, (nerve_acc, clip_acc)
    np.testing.assert_array_equal(diag["walk_steps"], 10)
    np.testing.assert_array_equal(diag["max_head_weight"], 1.0)  # the handcrafted backbone's one head
    np.testing.assert_array_equal(diag["head_weight_entropy"], 0.0)
    assert (diag["num_predicted_classes"] == 3).all() and (diag["num_nonfinite_tokens"] == 0).all()
    assert (diag["walk_residual"] > 0).all() and (diag["background_fraction"] == 0).all()


def test_registered_method_applies_the_context_background_threshold():
    image, probs, _ = planted_inputs(2)
    labels, diag = run_registered(image[None], probs[None], mask_size=16, background_threshold=1.01)
    assert (labels == 0).all() and diag["background_fraction"][0] == 1.0  # every probability is below 1.01
    _, diag = run_registered(image[None], probs[None], mask_size=16, cfg=NerveConfig(walk="closed_form"))
    assert diag["walk_steps"][0] == -1 and diag["walk_residual"][0] < 1e-5


def test_numeric_settings_are_traced(compilations):
    image, probs, _ = planted_inputs(3)
    run_registered(image[None], probs[None], mask_size=16)
    with compilations() as c:
        run_registered(image[None], probs[None], mask_size=16,
                       cfg=NerveConfig(attention_module="tokens.attn1", alpha=0.5, beta=0.3, c=2.0, eps_self=0.5))
    assert c.count == 0


def test_open_vocabulary_inputs_are_required():
    spec = REGISTRY["nerve"]
    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64))
    cfg = spec.resolve_config(None, "handcrafted")
    values = backbone.extract_prepared(jnp.zeros((1, 64, 64, 3)), spec.taps(cfg, backbone))
    inputs = MethodInputs(features=values[FEATURE_TAP].reshape(1, 8, 8, -1), taps=values,
                          images=jnp.zeros((1, 64, 64, 3)), num_classes=jnp.zeros((1,), jnp.int32), index=jnp.zeros((1,), jnp.int32))
    ctx = MethodContext(16, "soft_labels", FEATURE_TAP)
    with pytest.raises(ValueError, match="open-vocabulary method: it needs MethodInputs.class_probs"):
        spec.build(ctx)(inputs, cfg)


def test_taps_resolution_and_bad_settings():
    spec = REGISTRY["nerve"]
    assert spec.resolve_config(None, "handcrafted").attention_module == "tokens.attn1"
    assert spec.resolve_config(None, "ssd1b").attention_module == SD21_ATTENTION_MODULE
    assert attention_taps(NerveConfig(), "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output") == (
        f"{SD21_ATTENTION_MODULE}:q", f"{SD21_ATTENTION_MODULE}:k")
    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64))
    assert spec.taps(spec.resolve_config(None, "handcrafted"), backbone) == (
        FEATURE_TAP, "tokens.attn1:q", "tokens.attn1:k")
    with pytest.raises(ValueError, match="self-attention modules: tokens.attn1. Pass one as --nerve_attention_module"):
        spec.taps(NerveConfig(attention_module=SD21_ATTENTION_MODULE), backbone)
    for bad in ("tokens.attn1:q", "up_blocks.3.attentions.1.transformer_blocks.0.attn2"):
        with pytest.raises(ValueError, match="nerve_attention_module.*ending in attn1"):
            attention_taps(NerveConfig(attention_module=bad), FEATURE_TAP)
    with pytest.raises(ValueError, match="nerve_walk must be one of"):
        NerveConfig(walk="power")
    with pytest.raises(ValueError, match="nerve_walk_steps"):
        NerveConfig(walk_steps=-1)
    with pytest.raises(ValueError, match="nerve_alpha must lie in .0, 1.*nerve_beta"):
        NerveConfig(alpha=1.0, beta=1.5).check_values()
    with pytest.raises(ValueError, match="nerve_c must be >= 0"):
        NerveConfig(c=-1.0).check_values()
    with pytest.raises(ValueError, match="nerve_eps_self must be a finite number"):
        NerveConfig(eps_self=float("nan")).check_values()


# ----------------------------------------------------------------------------------------------- scale
@pytest.mark.slow
def test_closed_form_runs_on_device_at_sd_scale():
    """SD 2.1's 64 x 64 grid at 512 px: N = 4096 tokens, the whole of NERVE with one LU solve, no host transfer
    (~15-25 s on a 2-core CPU, most of it compiling and the 4096 x 4096 LU)."""
    n, num_classes, heads, d = 4096, 8, 2, 16

    @jax.jit
    def make(key):
        kq, kk, kg = jax.random.split(key, 3)
        q = jax.random.normal(kq, (1, heads, n, d))
        k = q + 0.5 * jax.random.normal(kk, (1, heads, n, d))
        return q, k, jax.nn.softmax(3.0 * jax.random.normal(kg, (1, 16, 16, num_classes)), axis=-1)

    from spark_jax.methods.nerve import nerve_batch

    run = jax.jit(lambda q, k, g, cfg: nerve_batch(q, k, g, cfg, mask_size=64))
    q, k, g = make(jax.random.key(0))
    cfg = jax.device_put(NerveConfig(walk="closed_form"))  # its numeric leaves, on the device before the guard
    with jax.transfer_guard("disallow"):
        res = run(q, k, g, cfg)
        res = jax.block_until_ready(res)
    assert res.token_probs.shape == (1, 64, 64, num_classes)
    assert float(res.walk_residual[0]) < 1e-5
    np.testing.assert_allclose(np.asarray(res.token_probs).sum(axis=-1), 1.0, atol=1e-4)
