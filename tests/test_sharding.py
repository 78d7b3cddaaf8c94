"""Data parallelism over a process's devices (spark_jax.sharding): sharded runs give the single-device results.

Specification: a batch is padded to a multiple of the device count with masked copies that are never scored; every
registered method, and the backbones, keep the batch split over the devices inside jit (their compiled programs
gather nothing) and give the labels of a single-device run image for image; so does the runner on the demo.

The module is meant to run in its own process with several simulated CPU devices, as .ci/run runs it::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 .venv-test/bin/python -m pytest tests/test_sharding.py -q

In the default suite (one device) its fast tests compare a one-device mesh with the plain programs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import sharding
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.config import SparkConfig
from spark_jax.data.demo import demo_image
from spark_jax.data.preprocess import prepare_image
from spark_jax.methods import REGISTRY
from spark_jax.methods.registry import MethodContext, MethodInputs, jitted_method
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.runner import RunConfig, load_results, run

DEVICES = jax.devices()
D = len(DEVICES)


def _split(x, mesh) -> bool:
    """Whether ``x`` is split over ``mesh`` along its batch axis (on one device: any equivalent sharding)."""
    return x.sharding.is_equivalent_to(sharding.batch_sharding(mesh), x.ndim)


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_the_device_count_is_the_one_the_flag_asks_for():
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if flag is not None:
        assert D == int(flag.group(1))
    assert sharding.data_mesh().size == len(jax.local_devices())


@pytest.mark.parametrize("n, multiple, size", [(1, 4, 4), (4, 4, 4), (5, 4, 8), (3, 1, 3), (0, 4, 4)])
def test_padded_size_rounds_up_to_a_multiple_and_is_never_empty(n, multiple, size):
    assert sharding.padded_size(n, multiple) == size


def test_pad_rows_appends_masked_copies_of_the_last_row():
    x = np.arange(6).reshape(3, 2)
    padded, mask = sharding.pad_rows(x, multiple=4)
    np.testing.assert_array_equal(padded, [[0, 1], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(mask, [True, True, True, False])
    same, mask = sharding.pad_rows(x, 3)
    assert same is x and mask.all()


def test_bad_padding_and_placement_are_named():
    with pytest.raises(ValueError, match="cannot pad 3 rows to 2"):
        sharding.pad_rows(np.zeros((3, 1)), 2)
    with pytest.raises(ValueError, match="0 rows"):
        sharding.pad_rows(np.zeros((0, 1)), 4)
    mesh = sharding.data_mesh()
    if D > 1:
        with pytest.raises(ValueError, match=f"cannot be split over {D} devices; pad its rows"):
            sharding.put_batch(np.zeros((D + 1, 2)), mesh)
    with pytest.raises(ValueError, match="do not fit"):
        sharding.put_rows(np.zeros((D + 1, 2)), D, mesh)


def test_put_rows_pads_and_splits_the_batch_over_the_devices():
    mesh = sharding.data_mesh()
    x = sharding.put_rows(jnp.arange(3.0)[:, None], sharding.padded_size(3, D), mesh)
    assert _split(x, mesh)
    np.testing.assert_array_equal(np.asarray(x)[:, 0], [0, 1, 2] + [2] * (x.shape[0] - 3))
    assert _split(sharding.put_rows(x, x.shape[0], mesh), mesh)


def test_per_image_map_runs_each_devices_images_and_matches_lax_map():
    mesh = sharding.data_mesh()

    def one(z):  # an eigensolver in a loop: what NCut's and AutoSC's per-image programs hold
        return jnp.linalg.eigh(z @ z.T)[0]

    x = np.random.default_rng(0).normal(size=(2 * D, 5, 5)).astype(np.float32)
    want = np.asarray(jax.jit(lambda v: jax.lax.map(one, v))(x))
    placed = sharding.put_batch(x, mesh)
    with sharding.active(mesh):
        compiled = jax.jit(lambda v: sharding.per_image_map(one, v)).lower(placed).compile()
    if D > 1:  # a plain lax.map over the split batch gathers it onto every device
        assert "all-gather" in _compiled_text(lambda v: jax.lax.map(one, v), placed)
    assert "all-gather" not in compiled.as_text()
    got = compiled(placed)
    assert _split(got, mesh)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    with sharding.active(mesh), pytest.raises(ValueError, match="cannot be split over"):
        if D == 1:
            raise ValueError("cannot be split over")  # every batch divides over one device
        jax.jit(lambda v: sharding.per_image_map(one, v))(x[: D + 1])


# --------------------------------------------------------------------------- every registered method, tiny
RES, MASK = 64, 32  # the handcrafted backbone at 64 px: 8 x 8 tokens
DEMO_SPARK = SparkMethodConfig(spark=SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5))


def _method_inputs(spec, config, n):
    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=RES))
    images = jnp.stack([prepare_image(jnp.asarray(demo_image(i, 48, 64).image), RES) for i in range(n)])
    taps = tuple(dict.fromkeys((backbone.feature_tap, *spec.taps(config, backbone))))
    values = backbone.extract_prepared(images, taps)
    feats = values[backbone.feature_tap].reshape(n, 8, 8, -1)
    class_probs = None
    if spec.open_vocab:  # CLIP's per-patch probabilities of 3 classes on a 4 x 4 patch grid, planted
        logits = np.random.default_rng(1).normal(size=(n, 4, 4, 3)).astype(np.float32)
        class_probs = jax.nn.softmax(3 * jnp.asarray(logits), axis=-1)
    return MethodInputs(features=feats, taps=values, images=images, num_classes=jnp.full((n,), 3, jnp.int32),
                        index=jnp.arange(n, dtype=jnp.int32), class_probs=class_probs)


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _tiny_config(name, spec):
    if name == "spark":
        return DEMO_SPARK
    config = spec.resolve_config(None, "handcrafted")
    if name == "diffseg":  # its anchor grid must fit the 8 x 8 tokens
        config = dataclasses.replace(config, num_points=4)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_runs_on_each_devices_images_and_gives_the_single_device_labels(name):
    # As the runner calls it (spark_jax.runner.loop): inside shard_map over the data axis (sharding.per_device).
    spec = REGISTRY[name]
    config = _tiny_config(name, spec)
    ctx = MethodContext(MASK, spec.upsampling, HandcraftedBackbone.feature_tap)
    n = 2 * D
    inputs = _method_inputs(spec, config, n)
    params = spec.params(config, ctx, (8, 8))
    fn = jitted_method(name, ctx)
    want_labels, want_diag = jax.device_get(fn(inputs, params))  # no mesh: the plain program on one device

    mesh = sharding.data_mesh()
    placed = jax.tree_util.tree_map(lambda x: sharding.put_batch(x, mesh), inputs)
    with sharding.active(mesh):
        compiled = jax.jit(sharding.per_device(fn, mesh)).lower(placed, sharding.replicate(params, mesh)).compile()
    found = [c for c in COLLECTIVES if c in compiled.as_text()]
    assert not found, f"{name}: the devices communicate ({found}) although every image is independent"
    labels, diag = compiled(placed, sharding.replicate(params, mesh))
    assert _split(labels, mesh)
    np.testing.assert_array_equal(np.asarray(labels), want_labels)
    assert sorted(diag) == sorted(want_diag)
    for k, v in diag.items():
        np.testing.assert_allclose(np.asarray(v), want_diag[k], rtol=1e-5, atol=1e-6, err_msg=f"{name}: {k}")


# --------------------------------------------------------------------------- PAMR at scoring
def _blocky_maps(n, side, rng):
    """Label maps of very different segment counts (1 .. ~30 blocks of random ids), sparse ids."""
    maps = []
    for j in range(n):
        blocks = 1 + (j * 5) % 6
        coarse = rng.integers(0, blocks * blocks, size=(blocks, blocks)) * 7 + 3  # non-contiguous ids
        maps.append(np.kron(coarse, np.ones((-(-side // blocks),) * 2, np.int64))[:side, :side])
    return maps


def _pamr_images(n, side=64):
    return np.stack([np.asarray(prepare_image(jnp.asarray(demo_image(i, 48, side).image), side)) for i in range(n)])


@pytest.mark.parametrize("keep_ids", [False, True])
def test_pamr_refines_each_devices_images_to_the_one_by_one_labels(keep_ids):
    # The runner's PAMR (runner.scoring.BatchRefiner): one program for the batch, split over the devices, with the
    # batch's largest slot count; each image as refined alone with its own count (the earlier per-image path).
    from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
    from spark_jax.masks.resample import resize_bilinear
    from spark_jax.runner.scoring import BatchRefiner, _refine_program

    cfg, mesh = PamrConfig(num_iter=3), sharding.data_mesh()
    n, slots = 2 * D + 1, sharding.padded_size(2 * D + 1, D)  # a short batch: padded rows
    images, maps = _pamr_images(n), _blocky_maps(n, MASK, np.random.default_rng(0))
    got = BatchRefiner(cfg, mesh, slots, keep_ids=keep_ids)(images, maps)
    one = jax.jit(refine_labels, static_argnums=(2, 3))
    for image, m, g in zip(images, maps, got):
        ids, ranks = np.unique(m, return_inverse=True)
        small = resize_bilinear(jnp.asarray(image), MASK, MASK)
        want = np.asarray(one(small, jnp.asarray(ranks.reshape(m.shape), jnp.int32), label_capacity(ids.size), cfg))
        np.testing.assert_array_equal(g, ids[want] if keep_ids else want)
    assert len({np.unique(m).size for m in maps}) > 2  # the images needed different slot counts
    batch = (sharding.put_rows(images, slots, mesh),
             sharding.put_rows(np.zeros((n, MASK, MASK), np.int32), slots, mesh))
    text = _refine_program(cfg, mesh, 32, MASK, MASK).lower(batch, ()).compile().as_text()
    assert not [c for c in COLLECTIVES if c in text], "PAMR's devices communicate"


def test_scoring_a_batch_merges_then_refines_each_image_as_the_reference_orders_them():
    # score_batch: every image's background merge, one PAMR program for all, then the counts; the same as scoring
    # each image with its own PAMR call between merge and counts (evaluation.score_image's `refine`).
    from spark_jax.evaluation import Evaluator, LabelSpace, score_image
    from spark_jax.masks.pamr import PamrConfig, label_capacity, refine_labels
    from spark_jax.masks.resample import resize_bilinear
    from spark_jax.runner.scoring import BatchRefiner, score_batch

    voc = LabelSpace("voc", ("background", "cat", "dog"), background=0)
    rng = np.random.default_rng(1)
    n, cfg = D + 3, PamrConfig(num_iter=2)
    images, preds = _pamr_images(n), _blocky_maps(n, MASK, rng)
    gts = [np.kron(rng.integers(0, 3, size=(4, 4)), np.ones((MASK // 4, MASK // 4), np.int64)) for _ in range(n)]
    gts[-1] = None  # an unlabelled image: refined, not scored
    ev = Evaluator(voc, "standard")
    refiner = BatchRefiner(cfg, sharding.data_mesh(), sharding.padded_size(n, D))
    got = score_batch(ev, [f"i{j}" for j in range(n)], preds, gts, refiner, images)

    def own_pamr(image):
        small = resize_bilinear(jnp.asarray(image), MASK, MASK)

        def refine(pred):
            ids, ranks = np.unique(pred, return_inverse=True)
            return np.asarray(refine_labels(small, jnp.asarray(ranks.reshape(pred.shape), jnp.int32),
                                            label_capacity(ids.size), cfg))
        return refine

    merged_something = False
    for j in range(n - 1):
        want = score_image(preds[j], gts[j], voc, refine=own_pamr(images[j]))
        final, fields = got[j]
        np.testing.assert_array_equal(final, want.pred)
        assert (fields["tp"], fields["fp"], fields["fn"], fields["pixels"]) == \
            (want.tp.tolist(), want.fp.tolist(), want.fn.tolist(), want.pixels)
        merged_something |= np.unique(want.pred).size < np.unique(preds[j]).size
    assert merged_something  # the merge ran before PAMR on some image
    final, fields = got[-1]
    assert not fields["scored"]
    np.testing.assert_array_equal(final, own_pamr(images[-1])(np.unique(preds[-1], return_inverse=True)[1]
                                                             .reshape(preds[-1].shape)))
    assert len(ev) == n - 1


# --------------------------------------------------------------------------- the runner on the demo
def _demo_cfg(out, method="spark", **kw):
    base = dict(dataset="demo", backbone="handcrafted", resolution=RES, mask_size=MASK, demo_images=5,
                demo_photos=False, num_overlays=1, output_dir=str(out), method=method)
    if method == "spark":
        base["method_config"] = DEMO_SPARK
    base.update(kw)
    return RunConfig(**base)


def _same_run(a, b):
    """The two run folders hold the same images with the same scores, diagnostics and prediction files."""
    ra = {r["id"]: r for r in load_results(os.path.join(a, "results.jsonl"))}
    rb = {r["id"]: r for r in load_results(os.path.join(b, "results.jsonl"))}
    assert sorted(ra) == sorted(rb)
    for i in ra:
        for key in ("scored", "tp", "fp", "fn", "pixels", "num_predicted_segments"):
            assert ra[i].get(key) == rb[i].get(key), (i, key)
        # Counts exact; real-valued diagnostics to float32 roundoff (XLA partitions a sharded batch's matmuls, CLIP's
        # for one, into other block sizes than one device's).
        da, db = ra[i]["diagnostics"], rb[i]["diagnostics"]
        assert sorted(da) == sorted(db), i
        for k in da:
            if isinstance(da[k], float):
                assert da[k] == pytest.approx(db[k], rel=1e-5, abs=1e-7), (i, k)
            else:
                assert da[k] == db[k], (i, k)
        pa, pb = (open(os.path.join(d, "predictions", f"{i}.png"), "rb").read() for d in (a, b))
        assert pa == pb, i
    ma, mb = (json.load(open(os.path.join(d, "metrics.json"))) for d in (a, b))
    for key in ("miou", "pixel_accuracy", "per_class_iou", "num_images_scored"):
        assert ma[key] == mb[key], key
    assert ma["diagnostics_mean"] == pytest.approx(mb["diagnostics_mean"], rel=1e-5, abs=1e-7)


def test_a_sharded_demo_run_gives_the_single_device_results_and_scores_no_padding(tmp_path):
    # 5 images in batches of 3: slots of 3 on one device, of 4 on four (a short batch either way: padded, masked).
    one = run(_demo_cfg(tmp_path / "one", batch_size=3), quiet=True, devices=DEVICES[:1])
    every = run(_demo_cfg(tmp_path / "every", batch_size=3), quiet=True)
    assert (one["timing"]["batch_slots"], every["timing"]["batch_slots"]) == (3, sharding.padded_size(3, D))
    assert every["timing"]["devices_per_process"] == D
    ids = [r["id"] for r in load_results(str(tmp_path / "every" / "results.jsonl"))]
    assert len(ids) == len(set(ids)) == 5 == every["num_images_scored"]  # the padded copies were never scored
    _same_run(str(tmp_path / "one"), str(tmp_path / "every"))


@pytest.mark.parametrize("method,label_with", [("nerve", "none"), ("diffcut", "clip")])
def test_an_open_vocabulary_run_sharded_gives_the_single_device_results(tmp_path, method, label_with):
    # CLIP's dense features and probabilities, the method, PAMR keeping class ids or before CLIP names the
    # segments (--label_with=clip), and the naming itself, on each device's images.
    from test_runner_open_vocab import build_tiny_clip

    from spark_jax.masks.pamr import PamrConfig

    clip = build_tiny_clip(tmp_path / "clip")
    kw = dict(protocol="open_vocab", label_with=label_with, batch_size=3, clip_checkpoint=str(clip),
              clip_resolution=40, templates="photo", pamr_config=PamrConfig(num_iter=2))
    run(_demo_cfg(tmp_path / "one", method, **kw), quiet=True, devices=DEVICES[:1])
    every = run(_demo_cfg(tmp_path / "every", method, **kw), quiet=True)
    assert every["num_images_scored"] == 5 and every["open_vocab"]["label_with"] == label_with
    _same_run(str(tmp_path / "one"), str(tmp_path / "every"))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(n for n, s in REGISTRY.items() if not s.open_vocab and n != "spark"))
def test_every_unsupervised_method_runs_sharded_to_the_single_device_results(tmp_path, method):
    config = _tiny_config(method, REGISTRY[method])
    kw = dict(batch_size=2, demo_images=3, method_config=config)
    run(_demo_cfg(tmp_path / "one", method, **kw), quiet=True, devices=DEVICES[:1])
    run(_demo_cfg(tmp_path / "every", method, **kw), quiet=True)
    _same_run(str(tmp_path / "one"), str(tmp_path / "every"))


@pytest.mark.slow
def test_the_diffusion_backbone_runs_sharded_to_the_single_device_features(tmp_path, monkeypatch):
    from test_backbone_helpers import build_tiny_pipeline

    from spark_jax.backbones.diffusion import BackboneConfig, load_backbone

    monkeypatch.setenv("SPARK_JAX_CACHE", str(tmp_path / "cache"))
    backbone = load_backbone(build_tiny_pipeline(tmp_path / "tiny", "sdxl"), BackboneConfig(resolution=128))
    attn = backbone.feature_tap.rsplit(":", 1)[0]
    taps = (backbone.feature_tap, f"{attn}:probs_mean")
    rng = np.random.default_rng(0)
    images = rng.random((2 * D, 128, 128, 3)).astype(np.float32)
    want = jax.device_get(backbone.extract_prepared(images, taps))  # one device, no mesh

    mesh = sharding.data_mesh()
    backbone.replicate(sharding.replicated(mesh))
    placed = sharding.put_batch(images, mesh)
    with sharding.active(mesh):
        got = backbone.extract_prepared(placed, taps)
        text = backbone._jitted_taps.lower(backbone.unet_params, backbone.vae_params, backbone.cond, placed,
                                           taps=taps, prepared_input=True).compile().as_text()
    assert "all-gather" not in text  # attention's (batch, head) blocks run on each device's images
    for t in taps:
        assert _split(got[t], mesh)
        scale = np.max(np.abs(want[t]))
        np.testing.assert_allclose(np.asarray(got[t]), want[t], rtol=0, atol=1e-4 * scale, err_msg=t)


@pytest.mark.slow
def test_the_pipeline_benchmark_splits_its_batches_over_every_device():
    # experiments.bench_pipeline, on the tiny SDXL form: every stage runs on the devices' own images (nothing
    # gathered), the batch sizes are rounded to the device count, and SPARK finds what one device finds.
    import time

    from test_backbone_helpers import VAE
    from unet_forms import FORMS

    from experiments import bench_pipeline as bp
    from experiments.bench_backbone import SCHEDULER
    from spark_jax.models.unet import UNetConfig
    from spark_jax.models.vae_encoder import VAEEncoderConfig

    def bench(devices, batch_sizes):
        b = bp.Bench(UNetConfig.from_diffusers(FORMS["sdxl"]), VAEEncoderConfig.from_diffusers(VAE), SCHEDULER,
                     size=64, dtypes=["float32"], devices=devices, mask_size=(MASK, MASK))
        return b, bp.run(b, batch_sizes=batch_sizes, rounds=1, time_budget_s=600, start=time.perf_counter(),
                         log=lambda m: None)

    every, result = bench(None, [D + 1])  # rounded up to 2 D images (two per device), or 2 on one device
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["batch"] == 2 * D
    assert result["device"]["devices_used"] == D and f"{D} used" in bp.format_table(result)
    for key, compiled in every._compiled.items():
        text = compiled.as_text()
        assert not [c for c in COLLECTIVES if c in text], f"{key}: the devices communicate"
    _, alone = bench(DEVICES[:1], [2 * D])
    (one,) = alone["rows"]
    assert (one["status"], one["batch"], alone["device"]["devices_used"]) == ("ok", 2 * D, 1)
    # The same 2 D images give the same clusters on one device as on all of them.
    for key in ("num_clusters_mean", "mcl_iterations_max", "mcl_converged", "pamr_capacity"):
        assert row[key] == one[key], key
