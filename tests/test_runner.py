"""The runner end to end: demo, a fixture Cityscapes tree, resume after interruption, feature cache, CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from spark_jax.methods.autosc import AutoSCConfig
from spark_jax.config import SparkConfig
from spark_jax.data.ade20k import ADE20K_LABEL_SPACE
from spark_jax.data.base import Dataset, Sample
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.data.voc import VOC_LABEL_SPACE
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.methods.kmeans import KMeansConfig, KMeansMethodConfig
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.graph.ncut import NCutConfig
from spark_jax.data.preprocess import prepare_label
from spark_jax.presets import SPARK_PRESETS, preset_for_backbone
from spark_jax.runner import BackboneNotFoundError, RunConfig, classes_present, load_results, run

# Tiny and fast: 8x8 tokens (64 px input, 8 px patches), 32x32 masks. Settings suited to the demo's planted
# regions (reference-facts section 8); the paper's defaults are exercised by the CLI test.
SPARK = SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)


class TinyDemo(Dataset):
    """``n`` small demo images, then one unlabelled image."""

    name = "demo"
    label_space = DEMO_LABEL_SPACE

    def __init__(self, n):
        self.n = n

    @property
    def ids(self):
        return [f"demo_{i:04d}" for i in range(self.n)] + ["photo_x"]

    def __getitem__(self, index):
        if index < self.n:
            return demo_image(index, 48, 64)
        s = demo_image(99, 40, 40)
        return Sample(s.image, None, "photo_x")


def tiny_cfg(out, spark=SPARK, **kw):
    """A tiny run; ``spark``: SPARK's settings when the method is SPARK."""
    base = dict(dataset="demo", backbone="handcrafted", resolution=64, mask_size=32, batch_size=2,
                output_dir=str(out), num_overlays=1)
    if kw.get("method", "spark") == "spark" and "method_config" not in kw:
        base["method_config"] = SparkMethodConfig(spark=spark)
    base.update(kw)
    return RunConfig(**base)


def read_ids(out):
    return [r["id"] for r in load_results(os.path.join(out, "results.jsonl"))]


def test_demo_end_to_end_writes_metrics_predictions_and_overlays(tmp_path):
    m = run(tiny_cfg(tmp_path), dataset=TinyDemo(3), quiet=True)
    assert 0.0 <= m["miou"] <= 1.0 and m["num_images_scored"] == 3 and m["num_images"] == 4
    assert set(m["per_class_iou"]) == set(DEMO_LABEL_SPACE.class_names)
    assert m["config"]["run"]["method_config"]["spark"]["inflation"] == 1.5
    # the diffusion backbone's settings are recorded with every run
    assert {k: m["config"]["run"][k] for k in ("timestep", "seed", "noise_source", "backbone_precision")} == {
        "timestep": 50, "seed": 42, "noise_source": "jax", "backbone_precision": "highest"}
    assert {"jax", "flax", "numpy", "scipy"} <= set(m["versions"])
    assert m["timing"]["images_per_second"] > 0
    assert m["diagnostics_mean"]["num_clusters"] >= 1
    on_disk = json.load(open(tmp_path / "metrics.json"))
    assert on_disk["miou"] == m["miou"]
    preds = sorted(os.listdir(tmp_path / "predictions"))
    assert preds == ["demo_0000.png", "demo_0001.png", "demo_0002.png", "photo_x.png"]
    assert np.asarray(Image.open(tmp_path / "predictions" / "demo_0001.png")).shape == (32, 32)
    # overlays: the first image (num_overlays=1) and every unlabelled one
    assert sorted(os.listdir(tmp_path / "overlays")) == ["demo_0000.png", "photo_x.png"]
    assert read_ids(tmp_path) == TinyDemo(3).ids


def constant_prediction_miou(cfg, ds, n):
    """mIoU of one cluster everywhere on the first ``n`` images, scored as ``cfg``'s run scores them: the floor
    a method must clear (pixel accuracy cannot tell: one cluster matched to the largest class scores 0.5+)."""
    from spark_jax.evaluation import Evaluator

    ev = Evaluator(ds.label_space, cfg.protocol)
    for i in range(n):
        s = ds[i]
        gt = np.asarray(prepare_label(s.label, cfg.mask_size, via=cfg.resolution if cfg.protocol == "diffcut"
                                      else None))
        ev.update(s.image_id, np.zeros_like(gt), gt)
    return ev.result()["miou"]


def test_demo_separates_its_planted_regions_far_better_than_one_cluster(tmp_path):
    cfg = tiny_cfg(tmp_path, limit=4)
    m = run(cfg, dataset=TinyDemo(4), quiet=True)
    floor = constant_prediction_miou(cfg, TinyDemo(4), 4)
    assert m["miou"] > floor + 0.2, (m["miou"], floor)


def test_interrupted_run_resumes_to_identical_metrics_with_every_image_once(tmp_path):
    full = run(tiny_cfg(tmp_path / "full"), dataset=TinyDemo(5), quiet=True)

    seen = []

    def crash_after_three(image_id):
        seen.append(image_id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "resumed"), dataset=TinyDemo(5), on_image=crash_after_three, quiet=True)
    assert read_ids(tmp_path / "resumed") == seen
    # a torn, half-written record (a crash mid-write) must be dropped, not break the resume
    with open(tmp_path / "resumed" / "results.jsonl", "a") as f:
        f.write('{"id": "demo_0003", "index": 3, "sco')

    again = []
    resumed = run(tiny_cfg(tmp_path / "resumed"), dataset=TinyDemo(5), on_image=again.append, quiet=True)
    assert again == TinyDemo(5).ids[3:]  # finished images are not recomputed
    ids = read_ids(tmp_path / "resumed")
    assert sorted(ids) == sorted(TinyDemo(5).ids) and len(ids) == len(set(ids))
    assert resumed["miou"] == full["miou"]
    assert resumed["per_class_iou"] == full["per_class_iou"]
    for name in os.listdir(tmp_path / "full" / "predictions"):
        a = np.asarray(Image.open(tmp_path / "full" / "predictions" / name))
        b = np.asarray(Image.open(tmp_path / "resumed" / "predictions" / name))
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_configuration(tmp_path):
    run(tiny_cfg(tmp_path, limit=1), dataset=TinyDemo(1), quiet=True)
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny_cfg(tmp_path, limit=1, spark=SPARK.replace(inflation=2.0)), dataset=TinyDemo(1), quiet=True)


def test_feature_cache_lets_a_sweep_skip_the_backbone(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = run(tiny_cfg(tmp_path / "a", feature_cache=str(cache)), dataset=TinyDemo(2), quiet=True)
    assert len(list(cache.rglob("*.npz"))) == 3

    def no_backbone(self, x, taps):
        raise AssertionError("the backbone ran although its features are cached")

    monkeypatch.setattr(HandcraftedBackbone, "extract_prepared", no_backbone)
    same = run(tiny_cfg(tmp_path / "b", feature_cache=str(cache)), dataset=TinyDemo(2), quiet=True)
    assert same["miou"] == first["miou"]
    other = run(tiny_cfg(tmp_path / "c", feature_cache=str(cache), spark=SPARK.replace(inflation=2.0)),
                dataset=TinyDemo(2), quiet=True)
    assert other["config"]["run"]["method_config"]["spark"]["inflation"] == 2.0


def write_cityscapes(root, frames):
    rng = np.random.default_rng(0)
    for city, frame in frames:
        stem = f"{city}_{frame}"
        img_dir = os.path.join(root, "leftImg8bit", "val", city)
        gt_dir = os.path.join(root, "gtFine", "val", city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        # a 2:1 street scene: sky (23) above road (7), a car (26) box, an ego-vehicle (1) strip
        ids = np.full((40, 80), 23, np.uint8)
        ids[20:] = 7
        ids[14:26, 20:40] = 26
        ids[36:] = 1
        colours = {23: (120, 170, 240), 7: (90, 90, 90), 26: (200, 30, 30), 1: (20, 20, 20)}
        img = np.zeros((40, 80, 3), np.uint8)
        for k, c in colours.items():
            img[ids == k] = c
        img = np.clip(img + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(img_dir, f"{stem}_leftImg8bit.png"))
        Image.fromarray(ids, mode="L").save(os.path.join(gt_dir, f"{stem}_gtFine_labelIds.png"))


@pytest.mark.parametrize("protocol", ["standard", "diffcut"])
def test_runner_on_a_fixture_cityscapes_tree(tmp_path, protocol):
    write_cityscapes(tmp_path / "cs", [("frankfurt", "000000_000294"), ("lindau", "000000_000019")])
    cfg = tiny_cfg(tmp_path / "out", dataset="cityscapes", data_dir=str(tmp_path / "cs"), protocol=protocol)
    m = run(cfg, quiet=True)
    assert m["dataset"] == "cityscapes" and m["num_images_scored"] == 2
    iou = m["per_class_iou"]
    assert len(iou) == 27 and iou["parking"] is None  # absent everywhere and never predicted: NaN
    assert iou["sky"] > 0.5 and iou["road"] > 0.5
    assert sorted(os.listdir(tmp_path / "out" / "predictions")) == [
        "frankfurt__frankfurt_000000_000294.png", "lindau__lindau_000000_000019.png"]


def test_without_weights_a_real_benchmark_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    write_cityscapes(tmp_path / "cs", [("lindau", "000000_000019")])
    with pytest.raises(BackboneNotFoundError, match="huggingface-cli download segmind/SSD-1B"):
        run(RunConfig(dataset="cityscapes", data_dir=str(tmp_path / "cs"), output_dir=str(tmp_path / "o")),
            quiet=True)


def test_cli_demo_runs_with_the_backbones_preset_and_says_what_it_shows(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf"), "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "experiments.run", "--demo_images=2", "--demo_photos=false", "--resolution=64",
           "--mask_size=32", "--batch_size=2", f"--output_dir={tmp_path}/cli"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "demo / spark / protocol diffcut: mIoU" in proc.stdout
    lines = proc.stdout.strip().splitlines()
    assert "demo features" in lines[-3] and "not the paper's" in lines[-3]
    assert lines[-2].startswith("metrics: ") and lines[-1].startswith("overlays: ")
    assert "img/s" in proc.stderr or "s/img" in proc.stderr  # tqdm's progress bar
    m = json.load(open(tmp_path / "cli" / "metrics.json"))
    preset = preset_for_backbone("handcrafted")
    assert m["spark_preset"]["name"] == preset and f"preset {preset}" in proc.stdout
    assert m["config"]["run"]["method_config"]["spark"] == {**SPARK_PRESETS[preset].config.__dict__}
    # --spark_preset=paper restores the paper's values; an explicit flag overrides one of them
    paper = subprocess.run(cmd[:-1] + [f"--output_dir={tmp_path}/paper", "--spark_preset=paper", "--beta=0.7"],
                           capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert paper.returncode == 0, paper.stderr
    m = json.load(open(tmp_path / "paper" / "metrics.json"))
    assert m["config"]["run"]["method_config"]["spark"] == {**SparkConfig(beta=0.7).__dict__}
    assert m["config"]["run"]["method_config"]["preset"] == "custom"
    bad = subprocess.run(cmd[:3] + ["--dataset=voc", f"--data_dir={tmp_path}/none", f"--output_dir={tmp_path}/x"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert bad.returncode == 2 and "Expected layout" in bad.stderr


def test_a_smaller_limit_scores_only_its_images(tmp_path):
    run(tiny_cfg(tmp_path, limit=3), dataset=TinyDemo(3), quiet=True)
    calls = []
    m = run(tiny_cfg(tmp_path, limit=2), dataset=TinyDemo(3), on_image=calls.append, quiet=True)
    assert calls == [] and m["num_images_scored"] == 2


def write_voc(root, ids):
    base = os.path.join(root, "VOCdevkit", "VOC2012")
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for k, i in enumerate(ids):
        lab = np.zeros((36, 48), np.uint8)  # background
        lab[8:28, 10 + k : 30 + k] = 8  # a cat
        lab[7, 10 + k : 30 + k] = 255  # void outline above it
        img = np.full((36, 48, 3), (60, 140, 60), np.uint8)
        img[lab == 8] = (220, 200, 40)
        img[lab == 255] = (140, 170, 50)
        Image.fromarray(img).save(os.path.join(base, "JPEGImages", f"{i}.jpg"), quality=95)
        pal = Image.new("P", (48, 36))
        pal.putpalette([(j * 53) % 256 for j in range(768)])
        pal.putdata(lab.ravel().tolist())
        pal.save(os.path.join(base, "SegmentationClass", f"{i}.png"))
    with open(os.path.join(base, "ImageSets", "Segmentation", "val.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


@pytest.mark.parametrize("protocol", ["standard", "diffcut"])
def test_runner_on_a_fixture_voc_tree_merges_background(tmp_path, protocol):
    write_voc(tmp_path / "voc", ["2007_000033", "2007_000042"])
    cfg = tiny_cfg(tmp_path / "out", dataset="voc", data_dir=str(tmp_path / "voc"), protocol=protocol)
    m = run(cfg, quiet=True)
    iou = m["per_class_iou"]
    assert len(iou) == 21 and iou["dog"] is None
    assert iou["background"] > 0.8 and iou["cat"] > 0.5  # background fragments are merged many-to-one
    pixels = [r["pixels"] for r in load_results(os.path.join(tmp_path / "out", "results.jsonl"))]
    if protocol == "standard":
        assert all(p < 32 * 32 for p in pixels)  # the void outline is not scored
        assert list(iou)[0] == "background"
    else:
        assert pixels == [32 * 32] * 2  # DiffCut counts void as background
        assert list(iou)[-1] == "background"


class RawOnlyBackbone:
    """Like the diffusion backbone: preprocesses raw images itself, so a call must hold one image shape."""

    resolution = 64

    def __init__(self):
        self.calls = []
        self.inner = HandcraftedBackbone(HandcraftedConfig(resolution=64))

    def extract_features(self, images):
        self.calls.append(images.shape)
        return self.inner.extract_features(images)


class MixedShapes(TinyDemo):
    def __getitem__(self, index):
        s = demo_image(index, 48, 64) if index % 2 == 0 else demo_image(index, 50, 40)
        return s


def test_a_raw_image_backbone_gets_one_shape_per_call(tmp_path):
    bb = RawOnlyBackbone()
    m = run(tiny_cfg(tmp_path, batch_size=4), dataset=MixedShapes(3), backbone=bb, quiet=True)
    assert m["num_images_scored"] == 4 and m["config"]["backbone"] == "user-supplied RawOnlyBackbone"
    assert [c[1:3] for c in bb.calls] == [(48, 64), (50, 40), (48, 64), (50, 40)]


# ----------------------------------------------------------------------------------------------- baselines
BASELINES = ["diffcut", "autosc", "kmeans"]
# The fields of each method's own config: all that run_config.json records of the method ("method_config").
OWN_FIELDS = {"spark": {"preset", "spark"}, "diffcut": {f.name for f in dataclasses.fields(NCutConfig)},
              "autosc": {f.name for f in dataclasses.fields(AutoSCConfig)},
              "kmeans": {"k", "unlabelled_k", "seed", "kmeans"}}
# RunConfig fields of earlier releases that held one method's settings each.
OLD_METHOD_FIELDS = {"spark", "spark_preset", "ncut", "autosc", "kmeans", "kmeans_k", "kmeans_unlabelled_k",
                     "kmeans_seed"}


@pytest.mark.parametrize("method", BASELINES)
def test_a_baseline_runs_through_the_shared_pipeline_and_records_its_config_and_time(tmp_path, method):
    cfg = tiny_cfg(tmp_path, method=method)
    m = run(cfg, dataset=TinyDemo(2), quiet=True)
    assert m["method"] == method and m["num_images_scored"] == 2 and m["num_images"] == 3
    floor = constant_prediction_miou(cfg, TinyDemo(2), 2)
    assert m["miou"] > floor + 0.1, (m["miou"], floor)
    run_cfg = m["config"]["run"]
    # only this method's hyperparameters are recorded; the baselines use DiffCut's concept assignment
    others = set().union(*OWN_FIELDS.values()) - OWN_FIELDS[method]
    own = set(run_cfg["method_config"])
    assert OWN_FIELDS[method] <= own and not others & own and not OLD_METHOD_FIELDS & set(run_cfg)
    assert run_cfg["upsampling"] == "concept"
    t = m["clustering_seconds_per_image"]
    assert t["num_images"] == 3 and 0 < t["median"] and 0 < t["mean"] < m["timing"]["this_session_seconds"]
    assert m["timing"]["stage_seconds"]["compile"] > 0
    assert m["diagnostics_mean"]["num_segments"] >= 1 and m["diagnostics_mean"]["num_nonfinite_tokens"] == 0
    records = load_results(os.path.join(tmp_path, "results.jsonl"))
    assert all(r["clustering_seconds"] > 0 for r in records)
    for name in os.listdir(tmp_path / "predictions"):
        assert np.asarray(Image.open(tmp_path / "predictions" / name)).shape == (32, 32)


@pytest.mark.parametrize(
    "method, change",
    [
        ("diffcut", {"method_config": NCutConfig(tau=0.3)}),
        ("autosc", {"method_config": AutoSCConfig(alphas=(1.0, 5.0))}),
        ("kmeans", {"method_config": KMeansMethodConfig(k=3)}),
        ("kmeans", {"method_config": KMeansMethodConfig(seed=1)}),
        ("diffcut", {"method": "kmeans"}),
    ],
)
def test_resume_refuses_a_changed_method_or_method_config(tmp_path, method, change):
    cfg = tiny_cfg(tmp_path, method=method, limit=1)
    run(cfg, dataset=TinyDemo(1), quiet=True)
    with pytest.raises(ValueError, match="another configuration"):
        run(dataclasses.replace(cfg, **change), dataset=TinyDemo(1), quiet=True)


def test_another_methods_settings_do_not_block_a_resume(tmp_path):
    from absl import flags

    from experiments import run_flags

    cfg = tiny_cfg(tmp_path, method="diffcut", limit=1)
    run(cfg, dataset=TinyDemo(1), quiet=True)
    calls = []
    fv = flags.FLAGS
    try:  # the same run from a command line that also sets other methods' flags
        fv(["run", "--spark_inflation=2.0", "--beta=0.7", "--kmeans_k=3"])
        same = run_flags.run_config_from_flags(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                                                  if f.name != "method_config"})
    finally:
        fv.unparse_flags()
    m = run(same, dataset=TinyDemo(1), on_image=calls.append, quiet=True)
    assert calls == [] and m["num_images_scored"] == 1


def test_kmeans_k_star_is_the_number_of_classes_in_each_ground_truth(tmp_path):
    m = run(tiny_cfg(tmp_path, method="kmeans", method_config=KMeansMethodConfig(k="gt")), dataset=TinyDemo(3),
            quiet=True)
    assert m["config"]["run"]["method_config"]["k"] == "gt"
    records = load_results(os.path.join(tmp_path, "results.jsonl"))
    for r in records:
        if r["scored"]:
            gt = prepare_label(TinyDemo(3)[r["index"]].label, 32)
            assert r["num_classes_present"] == len(np.unique(np.asarray(gt))) >= 2
            assert r["diagnostics"]["num_clusters"] == r["num_classes_present"]
        else:
            assert r["num_classes_present"] == 0 and r["diagnostics"]["num_clusters"] == 6  # kmeans_unlabelled_k
        assert r["diagnostics"]["num_segments"] <= r["diagnostics"]["num_clusters"]
        assert r["diagnostics"]["k_clipped"] is False


def test_kmeans_results_do_not_depend_on_batching_or_resuming(tmp_path):
    """Each image's seed is folded from its dataset index, not from its batch."""
    full = run(tiny_cfg(tmp_path / "full", method="kmeans"), dataset=TinyDemo(3), quiet=True)

    def crash_after_one(image_id):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path / "resumed", method="kmeans"), dataset=TinyDemo(3), on_image=crash_after_one,
            quiet=True)
    # batches were [0, 1], [2, photo]; the resumed run batches [1, 2], [photo]
    resumed = run(tiny_cfg(tmp_path / "resumed", method="kmeans"), dataset=TinyDemo(3), quiet=True)
    assert resumed["miou"] == full["miou"]
    for name in os.listdir(tmp_path / "full" / "predictions"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "full" / "predictions" / name)),
                                      np.asarray(Image.open(tmp_path / "resumed" / "predictions" / name)))


@pytest.mark.parametrize(
    "space, label, standard, diffcut",
    [
        (VOC_LABEL_SPACE, [[0, 8], [8, 255]], 2, 2),
        (VOC_LABEL_SPACE, [[8, 8], [8, 255]], 1, 2),  # DiffCut scores void as background
        (ADE20K_LABEL_SPACE, [[3, 3], [4, 255]], 2, 3),  # DiffCut scores "other" (our ignore) as class 0
        (ADE20K_LABEL_SPACE, [[149, 149], [3, 3]], 2, 1),  # ... and drops the last class
        (DEMO_LABEL_SPACE, [[255, 255], [255, 255]], 0, 0),
    ],
)
def test_classes_present_counts_what_the_protocol_scores(space, label, standard, diffcut):
    label = np.asarray(label, np.int32)
    assert classes_present(label, space, "standard") == standard
    assert classes_present(label, space, "diffcut") == diffcut


def test_baselines_refuse_soft_label_upsampling_and_bad_kmeans_k():
    with pytest.raises(ValueError, match="concept"):
        RunConfig(method="diffcut", upsampling="soft_labels")
    assert RunConfig(method="autosc").resolved_upsampling == "concept"
    assert RunConfig(method="spark").resolved_upsampling == "soft_labels"
    with pytest.raises(ValueError, match="kmeans_k"):
        RunConfig(method="kmeans", method_config=KMeansMethodConfig(k="auto"))
    with pytest.raises(ValueError, match="kmeans_max_clusters"):
        RunConfig(method="kmeans", method_config=KMeansMethodConfig(k=40, kmeans=KMeansConfig(max_clusters=32)))
    with pytest.raises(ValueError, match="tau"):
        RunConfig(method="diffcut", method_config=NCutConfig(tau=-1.0))
    with pytest.raises(TypeError, match="takes a NCutConfig"):
        RunConfig(method="diffcut", method_config=AutoSCConfig())


def test_kmeans_k_above_the_token_count_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, method="kmeans", limit=1,
                   method_config=KMeansMethodConfig(k=65, kmeans=KMeansConfig(max_clusters=80)))
    with pytest.raises(ValueError, match="exceeds the 8x8=64 tokens"):
        run(cfg, dataset=TinyDemo(1), quiet=True)


def test_flags_cover_every_method_hyperparameter():
    from absl import flags

    from experiments import run as cli
    from experiments import run_flags
    from spark_jax.methods import REGISTRY

    fv = flags.FLAGS
    for spec in REGISTRY.values():
        for leaf in run_flags.config_leaves(spec.config_type):
            assert spec.flag_prefix + leaf.field.name in fv, f"no flag for {spec.name}'s {'.'.join(leaf.path)}"
    for field in dataclasses.fields(SparkConfig):  # the unprefixed spellings stay, deprecated, for one release
        assert "spark_" + field.name in fv and "DEPRECATED" in fv[field.name].help
    argv = ["run", "--method=diffcut", "--ncut_tau=0.3", "--ncut_eigensolver=lobpcg", "--autosc_alphas=1,5",
            "--kmeans_k=3", "--kmeans_num_local_trials=2", "--beta=0.7", "--batch_size=2", "--ncut_max_segments=none",
            "--max_clusters=16"]
    try:
        fv(argv)
        cfg = cli.config_from_flags()
        configs = run_flags.method_configs_from_flags()  # every method's (experiments.compare runs them all)
        assert cfg.method == "diffcut" and cfg.method_config == NCutConfig(tau=0.3, eigensolver="lobpcg",
                                                                           max_segments=None)
        assert configs["spark"].spark.max_clusters == 16 and configs["kmeans"].kmeans.num_local_trials == 2
        assert configs["autosc"].alphas == (1.0, 5.0) and configs["kmeans"].k == 3
        assert configs["spark"].spark.beta == 0.7 and cfg.upsampling is None and cfg.resolved_upsampling == "concept"
        fv.unparse_flags()
        fv(["run", "--spark_beta=0.65", "--spark_global_source=attention"])  # the prefixed spelling
        spark = cli.config_from_flags().method_config.spark
        assert spark.beta == 0.65 and spark.global_source == "attention"
        fv.unparse_flags()
        fv(["run", "--method=autosc", "--kmeans_k=gt", "--autosc_alphas=1,x"])
        with pytest.raises(ValueError, match="autosc_alphas"):
            cli.config_from_flags()
        fv.unparse_flags()
        fv(["run", "--method=diffcut", "--ncut_max_segments=many"])
        with pytest.raises(ValueError, match="ncut_max_segments: expected int or 'none'"):
            cli.config_from_flags()
        fv.unparse_flags()
        fv(["run"])
        assert cli.config_from_flags().method_config is None  # no SPARK flag: the backbone's preset, resolved by the run
        fv.unparse_flags()
        fv(["run", "--spark_preset=paper", "--max_clusters=none"])
        assert cli.config_from_flags().method_config.spark == SparkConfig()  # 'none' round-trips to max_clusters=None
        fv.unparse_flags()
        fv(["run", "--timestep=300", "--seed=7", "--unet_dtype=bfloat16", "--backbone_precision=high",
            "--noise_source=file", "--noise_file=eps.npy"])
        bcfg = cli.config_from_flags().backbone_config(512)
        assert (bcfg.resolution, bcfg.timestep, bcfg.seed, bcfg.unet_dtype, bcfg.matmul_precision) == (
            512, 300, 7, "bfloat16", "high")
        assert (bcfg.noise_source, bcfg.noise_file) == ("file", "eps.npy")
        for argv, message in ((["--pamr_dilations=1,two"], "--pamr_dilations: expected comma-separated ints"),
                              (["--noise_source=file"], "noise_file is given exactly when noise_source='file'"),
                              (["--timestep=-3"], "timestep must be >= 0"),
                              (["--pamr_dilations=0,2"], "--pamr_dilations must be ints >= 1"),
                              (["--resolution=-4"], "--resolution must be an int >= 8"),
                              (["--method=kmeans", "--kmeans_k=lots"], "--kmeans_k must be an int >= 1 or 'gt'")):
            fv.unparse_flags()
            fv(["run", *argv])
            with pytest.raises(ValueError, match=message):
                cli.config_from_flags()
    finally:
        fv.unparse_flags()


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring's compile-duration event), not traces."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


COMPILES = CompileCounter()


def test_a_sweep_over_numeric_hyperparameters_compiles_once(tmp_path):
    def compiles_of(**kw):
        before = COMPILES.count
        out = tmp_path / f"run{len(os.listdir(tmp_path))}"
        m = run(tiny_cfg(out, method="diffcut", limit=1, **kw), dataset=TinyDemo(1), quiet=True)
        assert m["num_images_scored"] == 1
        return COMPILES.count - before

    compiles_of(method_config=NCutConfig(tau=0.5))  # compiles the method (and the rest of the pipeline) once
    assert compiles_of(method_config=NCutConfig(tau=0.3, alpha=5.0)) == 0  # tau and alpha are traced leaves
    assert compiles_of(method_config=NCutConfig(max_segments=32)) >= 1  # a structural field recompiles
