"""spark-jax: training-free unsupervised semantic segmentation from diffusion features, in JAX."""

from spark_jax.config import SparkConfig
from spark_jax.spark import SegmentResult, check_features, segment_tokens, segment_tokens_batch

__all__ = [
    "SegmentResult",
    "SparkConfig",
    "check_features",
    "segment_tokens",
    "segment_tokens_batch",
]
