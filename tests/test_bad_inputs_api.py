"""Bad input to the library's API, as a table: each case is a call and either the error it must raise
(type and message fragments: what is wrong, the value, what is expected) or the documented behaviour.

Every check runs on the host before anything is traced, so none of the raising cases compiles; inside
jit nothing can raise on data (the behaviour cases pin what happens instead).
"""

from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig, check_features, segment_tokens, segment_tokens_batch
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.masks.pamr import refine_labels
from spark_jax.pipeline import PipelineConfig, segment, segment_features

BACKBONE = HandcraftedBackbone(HandcraftedConfig(resolution=64, patch=8))  # 8x8 tokens of 15 channels
TOKENS = np.random.default_rng(0).standard_normal((4, 4, 8)).astype(np.float32)
FEATURES = np.zeros((2, 8, 8, 15), np.float32)
PREPARED = np.full((2, 64, 64, 3), 0.5, np.float32)
IMAGE_U8 = np.zeros((1, 32, 32, 3), np.uint8)


def _with_nan_token():
    features = TOKENS.copy()
    features[1, 2, 3] = np.nan
    return features


class Case(NamedTuple):
    call: Callable[[], Any]
    raises: type[Exception] | None = None
    fragments: tuple[str, ...] = ()
    behaviour: Callable[[Any], bool] | None = None  # for calls that must not raise


CASES = {
    # segment_tokens: token features [h, w, C], floating, C >= 1; a SparkConfig with values in range.
    "tokens_rank_2": Case(lambda: segment_tokens(np.zeros((16, 8), np.float32), SparkConfig()), ValueError,
                          ("segment_tokens expects token features [h, w, C]", "(16, 8)", "reshape")),
    "tokens_batched": Case(lambda: segment_tokens(FEATURES, SparkConfig()), ValueError,
                           ("[h, w, C]", "rank 4", "segment_tokens_batch")),
    "tokens_zero_channels": Case(lambda: segment_tokens(np.zeros((4, 4, 0), np.float32), SparkConfig()), ValueError,
                                 ("empty", "(4, 4, 0)", "one channel")),
    "tokens_zero_rows": Case(lambda: segment_tokens(np.zeros((0, 4, 3), np.float32), SparkConfig()), ValueError,
                             ("empty", "(0, 4, 3)")),
    "tokens_int": Case(lambda: segment_tokens(np.zeros((4, 4, 3), np.int32), SparkConfig()), ValueError,
                       ("floating", "int32", "astype")),
    "tokens_bool": Case(lambda: segment_tokens(np.zeros((4, 4, 3), bool), SparkConfig()), ValueError,
                        ("floating", "bool")),
    "tokens_cfg_not_a_config": Case(lambda: segment_tokens(TOKENS, {"beta": 0.6}), TypeError,
                                    ("SparkConfig", "dict")),
    "tokens_beta_out_of_range": Case(lambda: segment_tokens(TOKENS, SparkConfig(beta=2.0)), ValueError,
                                     ("beta=2.0", "[0, 1]")),
    "tokens_inflation_not_above_1": Case(lambda: segment_tokens(TOKENS, SparkConfig(inflation=1.0)), ValueError,
                                         ("inflation=1.0", "(1, inf)")),
    "tokens_nan_hyperparameter": Case(lambda: segment_tokens(TOKENS, SparkConfig(mcl_tol=float("nan"))),
                                      ValueError, ("mcl_tol=nan", "(0, inf)")),
    "tokens_nan_token_is_a_zero_vector": Case(
        lambda: segment_tokens(_with_nan_token(), SparkConfig()),
        behaviour=lambda r: int(r.num_nonfinite_tokens) == 1 and bool(jnp.all(jnp.isfinite(r.soft_labels)))),
    "tokens_float64_is_cast": Case(lambda: segment_tokens(TOKENS.astype(np.float64), SparkConfig()),
                                   behaviour=lambda r: r.soft_labels.dtype == jnp.float32),
    "check_features_refuses_nan": Case(lambda: check_features(_with_nan_token()), ValueError,
                                       ("NaN/Inf in 1 of 16 tokens", "(1, 2)")),
    "check_features_rank_2": Case(lambda: check_features(np.zeros((4, 4))), ValueError, ("[h, w, C]", "rank 2")),
    # segment_tokens_batch: [B, h, w, C] and chunk_size None or >= 1.
    "batch_unbatched": Case(lambda: segment_tokens_batch(TOKENS, SparkConfig()), ValueError,
                            ("segment_tokens_batch expects token features [B, h, w, C]", "features[None]")),
    "batch_zero_channels": Case(lambda: segment_tokens_batch(np.zeros((2, 4, 4, 0), np.float32), SparkConfig()),
                                ValueError, ("empty", "(2, 4, 4, 0)")),
    "batch_chunk_size_0": Case(lambda: segment_tokens_batch(TOKENS[None], SparkConfig(), chunk_size=0), ValueError,
                               ("chunk_size", "0")),
    "batch_gamma_1": Case(lambda: segment_tokens_batch(TOKENS[None], SparkConfig(gamma=1.0)), ValueError,
                          ("gamma=1.0", "(0, 1)")),
    # segment_features: features [B, h, w, C], prepared float images [B, S, S, 3] in [0, 1], a PipelineConfig.
    "features_unbatched": Case(lambda: segment_features(FEATURES[0], PREPARED, PipelineConfig()), ValueError,
                               ("segment_features expects token features [B, h, w, C]",)),
    "features_batch_mismatch": Case(lambda: segment_features(FEATURES, PREPARED[:1], PipelineConfig()), ValueError,
                                    ("prepared images [B, S, S, 3]", "B = 2", "(1, 64, 64, 3)")),
    "features_uint8_images": Case(
        lambda: segment_features(FEATURES, (PREPARED * 255).astype(np.uint8), PipelineConfig()), ValueError,
        ("prepared float images", "uint8", "prepare_image")),
    "features_images_above_1": Case(lambda: segment_features(FEATURES, PREPARED * 4, PipelineConfig()), ValueError,
                                    ("[0, 1]", "[2, 2]", "prepare_image")),
    "features_cfg_not_a_config": Case(lambda: segment_features(FEATURES, PREPARED, SparkConfig()), TypeError,
                                      ("PipelineConfig", "SparkConfig")),
    "features_bad_prune_threshold": Case(
        lambda: segment_features(FEATURES, PREPARED, PipelineConfig(spark=SparkConfig(prune_threshold=-1.0))),
        ValueError, ("prune_threshold=-1.0", "[0, 1)")),
    # segment: what Backbone.extract_features accepts, uint8 in [0, 255] or float in [0, 1]; never rescaled.
    "images_unbatched": Case(lambda: segment(IMAGE_U8[0], BACKBONE), ValueError, ("[B, H, W, 3]", "images[None]")),
    "images_channels_first": Case(lambda: segment(np.zeros((1, 3, 32, 32), np.uint8), BACKBONE), ValueError,
                                  ("[B, H, W, 3]", "(1, 3, 32, 32)", "channels last")),
    "images_too_small": Case(lambda: segment(np.zeros((1, 1, 1, 3), np.uint8), BACKBONE), ValueError, ("2 x 2",)),
    "images_int16": Case(lambda: segment(IMAGE_U8.astype(np.int16), BACKBONE), ValueError,
                         ("uint8 images in [0, 255] or floating images in [0, 1]", "int16", "astype(np.uint8)")),
    "images_int64": Case(lambda: segment(IMAGE_U8.astype(np.int64), BACKBONE), ValueError, ("int64",)),
    "images_bool": Case(lambda: segment(IMAGE_U8.astype(bool), BACKBONE), ValueError, ("bool",)),
    "images_float_0_255": Case(lambda: segment(np.full((1, 32, 32, 3), 200.0, np.float32), BACKBONE), ValueError,
                               ("floating images in [0, 1]", "[200, 200]", "divide 0..255 values by 255")),
    "images_float_negative": Case(lambda: segment(np.full((1, 32, 32, 3), -0.5, np.float32), BACKBONE), ValueError,
                                  ("[-0.5, -0.5]",)),
    "images_float_nan": Case(lambda: segment(np.full((1, 32, 32, 3), np.nan, np.float32), BACKBONE), ValueError,
                             ("NaN/Inf values",)),
    "images_jax_float_out_of_range": Case(lambda: segment(jnp.full((1, 32, 32, 3), 2.0), BACKBONE), ValueError,
                                          ("[2, 2]",)),
    "images_bad_local_eps": Case(lambda: segment(IMAGE_U8, BACKBONE, PipelineConfig(spark=SparkConfig(local_eps=0.0))),
                                 ValueError, ("local_eps=0.0", "(0, inf)")),
    "images_cfg_not_a_config": Case(lambda: segment(IMAGE_U8, BACKBONE, SparkConfig()), TypeError, ("PipelineConfig",)),
    # Configs: static fields checked on construction.
    "pipeline_pamr_max_labels_0": Case(lambda: PipelineConfig(pamr_max_labels=0), ValueError, ("pamr_max_labels", "0")),
    "pipeline_mask_size_0": Case(lambda: PipelineConfig(mask_size=(0, 16)), ValueError, ("mask_size", "(0, 16)")),
    "pipeline_mask_size_list": Case(lambda: PipelineConfig(mask_size=[16, 16]), ValueError, ("mask_size", "tuple")),
    "pipeline_upsampling": Case(lambda: PipelineConfig(upsampling="nearest"), ValueError, ("upsampling", "nearest")),
    "pipeline_spark_not_a_config": Case(lambda: PipelineConfig(spark={}), TypeError, ("SparkConfig",)),
    "spark_mcl_norm": Case(lambda: SparkConfig(mcl_norm="l2"), ValueError, ("mcl_norm", "'inf'", "'max_abs'", "'l2'")),
    "spark_expansion_float": Case(lambda: SparkConfig(expansion=2.0), ValueError, ("expansion", "int >= 1", "2.0")),
    "refine_capacity_0": Case(
        lambda: refine_labels(jnp.zeros((8, 8, 3)), jnp.zeros((8, 8), jnp.int32), 4, capacity=0), ValueError,
        ("capacity", "0")),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case):
    if case.raises is None:
        assert case.behaviour(case.call())
        return
    with pytest.raises(case.raises) as error:
        case.call()
    for fragment in case.fragments:
        assert fragment in str(error.value), f"{fragment!r} not in {str(error.value)!r}"
