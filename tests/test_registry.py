"""The method registry: a method declared and registered in this file alone runs through ``run``, ``compare`` and
the command line; the built-in specs drive the runner; a spec that breaks its contract is refused by name."""

import dataclasses
import json
import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.config import SparkConfig
from spark_jax.data.base import Dataset
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.data.preprocess import prepare_image
from spark_jax.methods import REGISTRY, MethodSpec, concept_masks, register, unregister
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.runner import RunConfig, compare, load_results, run


# ----------------------------------------------------------------------------------------------- the toy method
@dataclasses.dataclass(frozen=True)
class SignConfig:
    """Label every token by the sign of one feature channel.

    Attributes:
        channel: the channel read.
        flip: swap the two labels.
    """

    channel: int = 0
    flip: bool = False


class SignParams(NamedTuple):
    channel: np.ndarray  # int32 [], traced: another channel does not recompile
    flip: np.ndarray  # bool []


def _sign_build(ctx):
    def method(inputs, p):
        x = jnp.take(inputs.features, p.channel, axis=-1)  # [B, h, w]
        tokens = ((x > 0) != p.flip).astype(jnp.int32)
        labels = concept_masks(inputs.features, tokens, 2, ctx.mask_size)
        positive = jnp.mean((x > 0).astype(jnp.float32), axis=(1, 2))
        return labels, {"positive_fraction": positive, "num_segments": 1 + (0 < positive) * (positive < 1)}

    return method


def _sign_params(cfg, ctx, grid):
    if cfg.channel < 0:
        raise ValueError(f"sign_channel must be >= 0, got {cfg.channel}")
    return SignParams(np.int32(cfg.channel), np.bool_(cfg.flip))


SIGN = MethodSpec(name="sign", title="Sign", config_type=SignConfig, flag_prefix="sign_", build=_sign_build,
                  params=_sign_params, diagnostics=("positive_fraction", "num_segments"),
                  row_title=lambda cfg: f"Sign of channel {cfg.channel}")


@pytest.fixture
def sign():
    from experiments import run as cli  # noqa: F401  (defines the flags first: registering adds the method's)

    register(SIGN)
    yield SIGN
    unregister("sign")


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


def tiny(out, **kw):
    base = dict(dataset="demo", backbone="handcrafted", resolution=64, mask_size=32, batch_size=2,
                output_dir=str(out), num_overlays=0, pamr=False)
    return RunConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------------------- the tests
def test_a_toy_method_registered_here_runs_end_to_end_and_resumes(sign, tmp_path):
    m = run(tiny(tmp_path, method="sign"), dataset=TinyDemo(3), quiet=True)
    assert m["method"] == "sign" and m["num_images_scored"] == 3
    assert m["config"]["run"]["method_config"] == {"channel": 0, "flip": False}
    assert m["config"]["run"]["upsampling"] == "concept"
    assert set(m["diagnostics_mean"]) == {"positive_fraction", "num_segments"}
    # The method's labels are the sign of channel 0 of the backbone's features: recompute them independently.
    backbone = HandcraftedBackbone(HandcraftedConfig(resolution=64))
    for r in load_results(os.path.join(tmp_path, "results.jsonl")):
        image = prepare_image(jnp.asarray(TinyDemo(3)[r["index"]].image), 64)[None]
        positive = np.asarray(backbone.extract_features_prepared(image))[0, ..., 0] > 0
        assert r["diagnostics"]["positive_fraction"] == pytest.approx(positive.mean(), abs=1e-6)
        assert r["num_predicted_segments"] == len(np.unique(positive))
        pred = np.asarray(Image.open(tmp_path / "predictions" / f"{r['id']}.png"))
        assert pred.shape == (32, 32) and len(np.unique(pred)) == len(np.unique(positive))
    # its config is the run's identity: another channel is another run
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny(tmp_path, method="sign", method_config=SignConfig(channel=1)), dataset=TinyDemo(3), quiet=True)
    calls = []
    run(tiny(tmp_path, method="sign", method_config=SignConfig()), dataset=TinyDemo(3), on_image=calls.append,
        quiet=True)
    assert calls == []  # the explicit default is the same run
    with pytest.raises(TypeError, match="takes a SignConfig"):
        tiny(tmp_path, method="sign", method_config=SparkMethodConfig())
    with pytest.raises(ValueError, match="--upsampling=soft_labels is not available for --method=sign"):
        tiny(tmp_path, method="sign", upsampling="soft_labels")


def test_a_toy_method_registered_here_is_a_row_of_the_comparison(sign, tmp_path):
    base = tiny(tmp_path, demo_images=2, demo_photos=False, batch_size=1)
    summary = compare(base, datasets=["demo"], methods=["sign", "kmeans"], output_dir=str(tmp_path / "cmp"),
                      method_configs={"sign": SignConfig(channel=3)}, quiet=True, log=lambda s: None)
    assert [r["title"] for r in summary["rows"]] == ["Sign of channel 3", "K-means (K*)"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| Sign of channel 3 | yes |" in md and "| Sign of channel 3 | no |" in md
    m = json.load(open(tmp_path / "cmp" / "demo" / "sign-pamr" / "metrics.json"))
    assert m["config"]["run"]["method_config"] == {"channel": 3, "flip": False} and m["num_images_scored"] == 2
    assert summary["rows"][0]["datasets"]["demo"]["miou_pamr"] == m["miou"]


def test_a_toy_method_registered_before_parsing_has_its_flags(sign):
    from absl import flags

    from experiments import run as cli

    fv = flags.FLAGS
    assert "sign_channel" in fv and "sign_flip" in fv
    try:
        fv(["run", "--method=sign", "--sign_channel=2", "--sign_flip"])
        cfg = cli.config_from_flags()
        assert cfg.method == "sign" and cfg.method_config == SignConfig(channel=2, flip=True)
        fv.unparse_flags()
        fv(["run", "--method=sign"])
        assert cli.config_from_flags().method_config is None  # the default, as for every method
    finally:
        fv.unparse_flags()
    unregister("sign")
    assert "sign_channel" not in fv  # gone with the method
    with pytest.raises(flags.IllegalFlagValueError, match="not a registered method"):
        fv(["run", "--method=sign"])
    fv.unparse_flags()
    register(SIGN)  # for the fixture's teardown


def test_the_builtin_methods_are_registered_in_table_order():
    assert list(REGISTRY)[:4] == ["spark", "diffcut", "autosc", "kmeans"]
    assert {s.flag_prefix for s in REGISTRY.values()} >= {"spark_", "ncut_", "autosc_", "kmeans_"}
    assert REGISTRY["spark"].upsampling == "soft_labels" and REGISTRY["diffcut"].upsampling == "concept"


class _Backbone:
    feature_tap = "down_blocks.2.attentions.1.transformer_blocks.3.attn1:output"


@pytest.mark.parametrize(
    "global_source, taps",
    [("features", ()), ("attention", (":probs_mean",)), ("qk_cosine", (":q", ":k"))],
)
def test_spark_requests_the_taps_its_global_source_reads(global_source, taps):
    cfg = SparkMethodConfig(spark=SparkConfig(global_source=global_source))
    module = _Backbone.feature_tap.removesuffix(":output")
    assert REGISTRY["spark"].taps(cfg, _Backbone()) == (_Backbone.feature_tap, *(module + t for t in taps))


def test_spark_with_attention_runs_on_the_demo_and_records_its_source(tmp_path):
    cfg = tiny(tmp_path, method_config=SparkMethodConfig(spark=SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5,
                                                                           global_source="attention")))
    m = run(cfg, dataset=TinyDemo(1), quiet=True)
    assert m["num_images_scored"] == 1 and m["config"]["run"]["method_config"]["spark"]["global_source"] == "attention"


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"name": "two words"}, ValueError, "Python identifier"),
        ({"flag_prefix": "sign"}, ValueError, "ending in '_'"),
        ({"config_type": dict}, TypeError, "must be a dataclass"),
        ({"upsampling": "nearest"}, ValueError, "upsamplings must be among"),
        ({"diagnostics": ()}, ValueError, "diagnostics must name"),
    ],
)
def test_a_malformed_spec_is_refused_by_name(change, error, message):
    with pytest.raises(error, match=message):
        dataclasses.replace(SIGN, **change)


def test_registering_twice_or_a_taken_prefix_is_refused(sign):
    with pytest.raises(ValueError, match="already registered"):
        register(SIGN)
    with pytest.raises(ValueError, match="flag prefix 'sign_' is already 'sign'"):
        register(dataclasses.replace(SIGN, name="sign2"))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        unregister("nope")


def test_a_method_returning_undeclared_diagnostics_is_named(tmp_path):
    register(dataclasses.replace(SIGN, name="liar", flag_prefix="liar_", diagnostics=("num_segments",)))
    try:
        with pytest.raises(ValueError, match=r"method 'liar' returned diagnostics \['num_segments', "
                                             r"'positive_fraction'\], its spec declares \['num_segments'\]"):
            run(tiny(tmp_path, method="liar", limit=1), dataset=TinyDemo(1), quiet=True)
    finally:
        unregister("liar")


def test_a_method_can_keep_its_taps_out_of_the_feature_cache(tmp_path):
    import glob

    uncached = dataclasses.replace(SIGN, name="sign_uncached", flag_prefix="sign_uncached_", cache_taps=False)
    register(SIGN)
    register(uncached)
    try:
        cache = str(tmp_path / "cache")
        run(tiny(tmp_path / "a", method="sign", feature_cache=cache), dataset=TinyDemo(2), quiet=True)
        cached = glob.glob(os.path.join(cache, "**", "*.npz"), recursive=True)
        assert len(cached) == 2
        m = run(tiny(tmp_path / "b", method="sign_uncached", feature_cache=cache), dataset=TinyDemo(2), quiet=True)
        assert m["num_images_scored"] == 2
        assert sorted(glob.glob(os.path.join(cache, "**", "*.npz"), recursive=True)) == sorted(cached)
    finally:
        unregister("sign_uncached")
        unregister("sign")
    from spark_jax.methods.diffseg import SPEC as DIFFSEG

    assert DIFFSEG.cache_taps is False  # its 16 attention maps: ~341 MB per image at 512 px
