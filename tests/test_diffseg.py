"""DiffSeg (google/diffseg): each step against a NumPy transcription of the original, merging on planted maps, the
float16 first pass, and the method end to end through the runner (demo, tiny SD 1.x and SDXL checkpoints)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from test_backbone_helpers import build_tiny_pipeline

from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.data.base import Dataset
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.methods import REGISTRY
from spark_jax.methods.diffseg import (
    DiffSegConfig,
    aggregate_attention,
    anchor_grid,
    attention_taps,
    diffseg_segment,
    merge_attention,
    resolution_weights,
    symmetric_kl,
)
from spark_jax.runner import RunConfig, resolve_backbone, run

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------- NumPy oracle
def np_aggregate(per_resolution: list[np.ndarray]) -> np.ndarray:
    """``DiffSeg.aggregate_weights`` transcribed (float64), each input the per-grid layer mean [N, N]; Keras'
    ``UpSampling2D(interpolation='bilinear')`` is torch's ``interpolate(align_corners=False)``."""
    big = max(int(round(np.sqrt(w.shape[-1]))) for w in per_resolution)
    sizes = np.array([np.sqrt(w.shape[-2]) for w in per_resolution])
    ratio = sizes / sizes.sum()
    out = np.zeros((big, big, big, big))
    for index, weights in enumerate(per_resolution):
        size = int(np.sqrt(weights.shape[-1]))
        r = big // size
        w = torch.from_numpy(weights.reshape(-1, 1, size, size))
        w = torch.nn.functional.interpolate(w, scale_factor=r, mode="bilinear", align_corners=False).numpy()
        w = w.reshape(size, size, big, big)
        w = w / w.sum(axis=(2, 3), keepdims=True)
        w = np.repeat(np.repeat(w, r, axis=0), r, axis=1)
        out += w * ratio[index]
    return out.reshape(big * big, big * big)


def np_kl(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The original's ``KL``: elementwise, summed over the map (x [..., D] broadcast against y [..., D])."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.log(x) - np.log(y)
        return np.sum(x * q, axis=-1) / 2 - np.sum(y * q, axis=-1) / 2


def np_merge(attns: np.ndarray, grid: np.ndarray, thresholds: list[float], half: bool = False):
    """``DiffSeg.mask_merge`` over all passes (``generate_masks`` without refinement), transcribed; ``half``: the
    first pass's KL in float16 as the original. Returns the proposals and every divergence it compared."""
    seen = []
    anchors = attns[grid]
    if half:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            kl = np_kl(anchors[:, None].astype(np.float16), attns[None].astype(np.float16)).astype(np.float64)
    else:
        kl = np_kl(anchors[:, None], attns[None])
    seen.append(kl)
    kl_bin = (kl < thresholds[0]).astype(np.float64)
    with np.errstate(invalid="ignore"):
        maps = kl_bin @ attns / kl_bin.sum(1, keepdims=True)
    for it in range(1, len(thresholds)):
        matched, new = set(), []
        for i, anchor in enumerate(maps):
            if i in matched:
                continue
            matched.add(i)
            kl = np_kl(anchor[None], maps)
            seen.append(kl[~np.isnan(kl)])
            bins = kl < thresholds[it]
            if bins.sum() > 0:
                matched.update(np.flatnonzero(bins).tolist())
                new.append(maps[bins].mean(0))
        maps = np.array(new)
    return maps, seen


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def planted_maps(regions: np.ndarray, inside: float = 4.0, noise: float = 0.3, seed: int = 0) -> np.ndarray:
    """[N, N] attention whose query i attends to the tokens of its own region (logit ``inside``) plus noise."""
    flat = regions.reshape(-1)
    rng = np.random.default_rng(seed)
    logits = inside * (flat[:, None] == flat[None, :]) + noise * rng.normal(size=(flat.size, flat.size))
    return softmax_rows(logits)


def quadrants(side: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return (r >= side // 2) * 2 + (c >= side // 2)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()))
    return len(pairs) == len(set(a.reshape(-1).tolist())) == len(set(b.reshape(-1).tolist()))


# ----------------------------------------------------------------------------------------------- steps
def test_resolution_weights_are_proportional_to_the_grid_side():
    np.testing.assert_allclose(resolution_weights([64, 32, 16, 8]), np.array([8, 4, 2, 1]) / 15)
    np.testing.assert_allclose(resolution_weights([64, 32]), [2 / 3, 1 / 3])  # SSD-1B at 1024 px


def test_anchor_grid_is_the_originals_sampling_grid():
    rows = anchor_grid(64, 16) // 64
    cols = anchor_grid(64, 16) % 64
    np.testing.assert_array_equal(np.unique(rows), np.arange(1, 62, 4))
    # generate_sampling_grid's order: meshgrid(indexing='ij'), row-major over (row, column)
    np.testing.assert_array_equal(rows[:17], [1] * 16 + [5])
    np.testing.assert_array_equal(cols[:17], [*range(1, 62, 4), 1])
    np.testing.assert_array_equal(np.unique(anchor_grid(32, 16) // 32), np.arange(0, 31, 2))
    with pytest.raises(ValueError, match="diffseg_num_points=16 must lie in \\[2, 8\\]"):
        anchor_grid(8, 16)


def test_aggregation_matches_the_transcription_and_rows_sum_to_one():
    """Three grids (8, 4, 2), several layers each: layer means, upsampled keys, renormalised, repeated queries."""
    layers = {8: 3, 4: 2, 2: 1}
    maps = [softmax_rows(2 * RNG.normal(size=(s * s, s * s))) for s, n in layers.items() for _ in range(n)]
    ours = np.asarray(jax.jit(aggregate_attention)([jnp.asarray(m, jnp.float32) for m in maps]))
    means, start = [], 0
    for s, n in layers.items():
        means.append(np.mean(maps[start:start + n], axis=0))
        start += n
    ref = np_aggregate(means)
    chex.assert_shape(ours, (64, 64))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, atol=1e-5)


def test_aggregation_of_one_grid_is_the_identity():
    """The demo's case: one layer on one grid (weight 1, no upsampling, rows already distributions)."""
    m = softmax_rows(RNG.normal(size=(64, 64)))
    np.testing.assert_allclose(aggregate_attention([jnp.asarray(m, jnp.float32)]), m, rtol=1e-5, atol=1e-8)


def test_aggregation_rejects_grids_that_do_not_divide_the_finest():
    with pytest.raises(ValueError, match="divide the finest"):
        aggregate_attention([jnp.ones((36, 36)) / 36, jnp.ones((16, 16)) / 16])
    with pytest.raises(ValueError, match="square token grids"):
        aggregate_attention([jnp.ones((12, 12)) / 12])


def test_symmetric_kl_matrix_form_matches_the_elementwise_divergence():
    p = softmax_rows(2 * RNG.normal(size=(5, 64)))
    q = softmax_rows(2 * RNG.normal(size=(7, 64)))
    ours = np.asarray(jax.jit(symmetric_kl)(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)))
    np.testing.assert_allclose(ours, np_kl(p[:, None], q[None]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_matches_the_transcription_where_every_decision_has_a_margin(seed):
    """Random clustered maps (16 prototypes at two scales): the proposals of all three passes equal the original's,
    on instances whose compared divergences all lie at least 1e-3 from the threshold (asserted)."""
    rng = np.random.default_rng(seed)
    side = 8
    coarse = rng.normal(size=(4, side * side)) * 3
    fine = coarse[rng.integers(0, 4, 16)] + rng.normal(size=(16, side * side)) * 0.8
    maps = softmax_rows(fine[rng.integers(0, 16, side * side)] + 0.2 * rng.normal(size=(side * side, side * side)))
    cfg = DiffSegConfig(num_points=4, kl_threshold=1.1)
    grid = anchor_grid(side, 4)
    ref, seen = np_merge(maps, grid, [1.1] * 3)
    margin = min(np.min(np.abs(s - 1.1)) for s in seen)
    assert margin > 1e-3, f"ill-posed instance (a divergence {margin:.1e} from the threshold)"
    res = jax.jit(merge_attention, static_argnums=())(jnp.asarray(maps, jnp.float32), cfg)
    ours = np.asarray(res.proposals)[np.asarray(res.valid)]
    assert 1 < len(ref) < len(grid)  # merging happened and left several proposals
    assert int(res.num_first_pass) == len(grid)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_merging_recovers_planted_groups_and_labels_follow_them():
    """Four quadrants of an 8 x 8 grid, each query attending to its own quadrant: four proposals, the quadrants as
    labels (mask size = grid size, so the bilinear step is the identity)."""
    regions = quadrants(8)
    maps = jnp.asarray(planted_maps(regions), jnp.float32)
    cfg = DiffSegConfig(num_points=4)
    res = jax.jit(diffseg_segment, static_argnums=2)([maps], cfg, 8)
    assert int(res.num_proposals) == 4 and int(res.num_segments) == 4
    assert same_partition(np.asarray(res.labels), regions)
    # at a larger mask the labels are the quadrants' upsampling
    up = np.asarray(jax.jit(diffseg_segment, static_argnums=2)([maps], cfg, 32).labels)
    assert same_partition(up, np.kron(regions, np.ones((4, 4), int)))


def test_a_lower_threshold_splits_and_a_higher_one_merges():
    regions = quadrants(8) // 2  # two halves ...
    logits = planted_maps(regions, inside=3.0, noise=0.0)
    maps = jnp.asarray(softmax_rows(np.log(logits) + 1.5 * (quadrants(8).reshape(-1)[:, None]
                                                            == quadrants(8).reshape(-1)[None, :])), jnp.float32)
    counts = [int(jax.jit(diffseg_segment, static_argnums=2)([maps], DiffSegConfig(num_points=4, kl_threshold=t),
                                                              8).num_proposals) for t in (0.05, 1.1, 20.0)]
    assert counts[0] >= counts[1] >= counts[2] and counts[0] > counts[2] and counts[2] == 1, counts


def test_a_sweep_over_the_threshold_compiles_once(compilations):
    maps = [jnp.asarray(planted_maps(quadrants(8)), jnp.float32)]
    f = jax.jit(diffseg_segment, static_argnums=2)
    f(maps, DiffSegConfig(num_points=4, kl_threshold=1.1), 8)
    with compilations() as c:
        for t in (0.5, 0.9, 2.0):
            f(maps, DiffSegConfig(num_points=4, kl_threshold=t), 8)
    assert c.count == 0


def test_float16_first_pass_reproduces_the_originals_underflow_drops():
    """The original casts the first pass to float16: a map with a probability below 2^-25 underflows to 0, every
    divergence with it is NaN, and NaN < threshold is False, so it joins no proposal and an anchor on it is dropped.
    Planted: the top-left quadrant's maps put 1e-9 outside their quadrant."""
    regions = quadrants(8)
    flat = regions.reshape(-1)
    maps = planted_maps(regions, inside=4.0, noise=0.0)
    row = np.where(flat == 0, 1.0, 1e-9)
    maps[flat == 0] = row / row.sum()  # representable in float32, zero in float16
    grid = anchor_grid(8, 4)
    ref, _ = np_merge(maps, grid, [1.1], half=True)  # the original's first pass in float16
    dropped_ref = np.isnan(ref).any(axis=1)
    assert dropped_ref.sum() == 4  # the four anchors in the top-left quadrant
    exact = merge_attention(jnp.asarray(maps, jnp.float32), DiffSegConfig(num_points=4, iterations=1))
    half = merge_attention(jnp.asarray(maps, jnp.float32),
                           DiffSegConfig(num_points=4, iterations=1, first_pass="float16"))
    assert int(exact.num_first_pass) == 16 and int(half.num_first_pass) == 12
    np.testing.assert_array_equal(~np.asarray(half.valid), dropped_ref)
    np.testing.assert_allclose(np.asarray(half.proposals)[np.asarray(half.valid)], ref[~dropped_ref], rtol=1e-4,
                               atol=1e-7)
    # downstream: the float16 run loses the quadrant (its pixels go to other proposals); float32 keeps all four
    labels = {p: np.asarray(diffseg_segment([jnp.asarray(maps, jnp.float32)],
                                            DiffSegConfig(num_points=4, first_pass=p), 8).labels)
              for p in ("float32", "float16")}
    assert same_partition(labels["float32"], regions)
    assert len(np.unique(labels["float16"])) == 3


def test_non_finite_maps_are_counted_and_never_merged():
    maps = planted_maps(quadrants(8))
    maps[5, 3] = np.nan
    res = merge_attention(jnp.asarray(maps, jnp.float32), DiffSegConfig(num_points=4))
    assert int(res.num_nonfinite_maps) == 1
    assert np.isfinite(np.asarray(res.proposals)).all() and int(jnp.sum(res.valid)) == 4


def test_refinement_keeps_planted_groups():
    maps = [jnp.asarray(planted_maps(quadrants(8)), jnp.float32)]
    res = diffseg_segment(maps, DiffSegConfig(num_points=4, refine=True), 8)
    assert same_partition(np.asarray(res.labels), quadrants(8))


@pytest.mark.parametrize("kwargs,match", [
    ({"kl_threshold": 0.0}, "diffseg_kl_threshold must be a finite number > 0"),
    ({"kl_threshold": float("nan")}, "diffseg_kl_threshold must be a finite number > 0"),
    ({"iterations": 0}, "diffseg_iterations must be an int >= 1"),
    ({"num_points": 1}, "diffseg_num_points must be an int >= 2"),
    ({"first_pass": "bfloat16"}, "diffseg_first_pass must be one of"),
])
def test_bad_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffSegConfig(**kwargs).check_values()


# ----------------------------------------------------------------------------------------------- the method
class TinyDemo(Dataset):
    name = "demo"
    label_space = DEMO_LABEL_SPACE

    def __init__(self, n):
        self.n = n

    @property
    def ids(self):
        return [f"demo_{i:04d}" for i in range(self.n)]

    def __getitem__(self, index):
        return demo_image(index, 48, 64)


def tiny_run(out, **kw) -> RunConfig:
    base = dict(dataset="demo", method="diffseg", backbone="handcrafted", resolution=64, mask_size=32, batch_size=2,
                output_dir=str(out), num_overlays=0, pamr=False, method_config=DiffSegConfig(num_points=8))
    return RunConfig(**{**base, **kw})


def test_spec_defaults_are_diffsegs_setup():
    spec = REGISTRY["diffseg"]
    assert spec.default() == DiffSegConfig(kl_threshold=1.1, iterations=3, num_points=16, first_pass="float32",
                                           refine=False)
    cfg = RunConfig(method="diffseg", backbone="ssd1b", checkpoint="/x")
    bcfg = cfg.backbone_config(cfg.diffusion_setting("resolution"))
    assert (bcfg.resolution, bcfg.timestep, bcfg.noise_source, bcfg.prompt) == (512, 300, "none", "")
    assert (cfg.to_json()["timestep"], cfg.to_json()["noise_source"]) == (300, "none")
    # the user's values win; other methods keep BackboneConfig's
    mine = RunConfig(method="diffseg", timestep=100, noise_source="jax", resolution=256)
    assert (mine.diffusion_setting("timestep"), mine.diffusion_setting("noise_source"),
            mine.diffusion_setting("resolution")) == (100, "jax", 256)
    spark = RunConfig(method="spark")
    assert (spark.diffusion_setting("timestep"), spark.diffusion_setting("noise_source"),
            spark.diffusion_setting("resolution")) == (50, "jax", 1024)


def test_demo_end_to_end_through_the_runner(tmp_path):
    m = run(tiny_run(tmp_path), dataset=TinyDemo(3), quiet=True)
    assert m["num_images_scored"] == 3 and 0.0 <= m["miou"] <= 1.0
    d = m["diagnostics_mean"]
    assert d["num_first_pass"] == 64 and 1 <= d["num_segments"] <= d["num_proposals"] <= 64
    assert m["config"]["run"]["method_config"] == dataclasses.asdict(DiffSegConfig(num_points=8))
    with_pamr = run(tiny_run(tmp_path / "pamr", pamr=True), dataset=TinyDemo(3), quiet=True)
    assert with_pamr["num_images_scored"] == 3


def test_demo_with_the_default_anchor_grid_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="lower --diffseg_num_points"):
        run(tiny_run(tmp_path, method_config=None), dataset=TinyDemo(1), quiet=True)


def test_handcrafted_backbone_offers_one_attention_tap():
    assert REGISTRY["diffseg"].taps(DiffSegConfig(), HandcraftedBackbone(HandcraftedConfig())) == (
        "tokens.attn1:output", "tokens.attn1:probs_mean")


class _FeaturesOnly:
    feature_tap = "features"

    def tap_names(self):
        return ("features",)


def test_a_backbone_without_attention_taps_is_named():
    with pytest.raises(ValueError, match="reads self-attention probabilities"):
        REGISTRY["diffseg"].taps(DiffSegConfig(), _FeaturesOnly())


# ----------------------------------------------------------------------------------------------- checkpoints
RES = 128  # tiny VAE 8x: a 16 x 16 latent


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    return lambda kind: build_tiny_pipeline(base / f"tiny_{kind}", kind)  # built on first use, then reused


# attn1 modules per token grid at 128 px (16 x 16 latent). sd1: down_blocks.0-2 one each, the mid block one, up
# blocks 1-3 two each (layers_per_block + 1). sdxl (SSD-1B-like): down_blocks.1 2 x 2 and up_blocks.1 3 x 2 at 8 x 8;
# down_blocks.2 1 + 3 and up_blocks.0 3 x 1 at 4 x 4; no mid attention.
# The whole tiny UNet compiles once per test (~12 s of its ~17 s): SD 1.x (DiffSeg's form, with the tap parity) runs
# in CI, the SDXL form under -m slow.
@pytest.mark.parametrize("kind,grids", [("sd1", {16: 3, 8: 3, 4: 3, 2: 1}),
                                        pytest.param("sdxl", {8: 10, 4: 7}, marks=pytest.mark.slow)])
def test_end_to_end_on_tiny_checkpoints(tiny_pipelines, tmp_path, kind, grids):
    """Through ``run`` on a tiny random-weight checkpoint in the diffusers layout: DiffSeg's backbone settings (t =
    300, no noise) are used and recorded, every attn1's probabilities are read, grouped by grid; on SD 1.x they equal
    diffusers' on the clean latent."""
    cfg = tiny_run(tmp_path / "run", backbone="ssd1b", checkpoint=str(tiny_pipelines(kind)), resolution=RES,
                   method_config=DiffSegConfig(num_points=8))
    resolved = resolve_backbone(cfg)
    m = run(cfg, dataset=TinyDemo(2), backbone=resolved, quiet=True)
    assert m["num_images_scored"] == 2 and 1 <= m["diagnostics_mean"]["num_segments"]
    assert (m["config"]["run"]["timestep"], m["config"]["run"]["noise_source"]) == (300, "none")
    assert "timestep=300" in m["config"]["backbone"] and "noise_source='none'" in m["config"]["backbone"]
    bb = resolved.backbone
    taps = attention_taps(bb.tap_names())
    assert taps and all(t.endswith(".attn1:probs_mean") for t in taps)
    found: dict[int, int] = {}
    for t in taps:
        found[bb.tap_grid(t)[0]] = found.get(bb.tap_grid(t)[0], 0) + 1
    assert found == grids
    if kind == "sd1":
        _check_taps_against_diffusers(tiny_pipelines(kind), bb, taps)


def _check_taps_against_diffusers(root, bb, taps):
    """noise_source='none': DiffSeg's taps equal diffusers' UNet on the VAE posterior mean x scaling factor at
    t = 300 with the empty prompt (the run's tap set and batch: no new compilation)."""
    import diffusers

    from diffusers_capture import capture
    from spark_jax.data.preprocess import prepare_image

    assert bb.cond.noise is None
    prepared = jnp.stack([prepare_image(jnp.asarray(TinyDemo(2)[i].image), RES) for i in range(2)])
    ours = bb.extract_prepared(prepared, (bb.feature_tap, *taps))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(root, safety_checker=None)
    x = torch.from_numpy(np.array(2.0 * prepared - 1.0).transpose(0, 3, 1, 2))
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        context, _ = pipe.encode_prompt("", "cpu", 1, do_classifier_free_guidance=False)
    ref = capture(pipe.unet, latents.numpy(), 300, context.expand(2, -1, -1).numpy(), names=taps)
    for t in taps:
        assert np.abs(np.asarray(ours[t]) - ref[t]).max() <= 1e-4 * np.abs(ref[t]).max(), t
