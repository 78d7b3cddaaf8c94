"""spark-jax: training-free unsupervised semantic segmentation from diffusion features, in JAX.

The public API; each name lives in the module named after its concept (see WORKSPACE.md).
"""

from spark_jax.methods.autosc import AutoSCConfig, AutoSCResult, autosc, autosc_batch
from spark_jax.backbones.diffusion import Backbone, BackboneConfig, load_backbone
from spark_jax.backbones.checkpoint import CheckpointError
from spark_jax.backbones.clip import CLIP, load_clip  # noqa: F401  (issue 15: CLIP in Flax NNX)
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.config import SparkConfig
from spark_jax.methods.kmeans import KMeansConfig, KMeansResult, kmeans_tokens, kmeans_tokens_batch
from spark_jax.graph.ncut import NCutConfig, NCutResult, recursive_ncut, recursive_ncut_batch
from spark_jax.masks.pamr import PamrConfig, pamr, refine_labels
from spark_jax.pipeline import PipelineConfig, Segmentation, segment, segment_features
from spark_jax.methods.spark import SegmentResult, check_features, segment_tokens, segment_tokens_batch
from spark_jax.masks.upsample import concept_assignment, upsample_labels, upsample_soft_labels
from spark_jax.methods import REGISTRY, MethodInputs, MethodSpec, register
from spark_jax.models.taps import UnknownTapError
from spark_jax.models.unet import UNet2DConditionModel, UNetConfig

__all__ = [
    "REGISTRY",
    "HandcraftedBackbone",
    "HandcraftedConfig",
    "MethodInputs",
    "MethodSpec",
    "UNet2DConditionModel",
    "UNetConfig",
    "UnknownTapError",
    "register",
    "AutoSCConfig",
    "AutoSCResult",
    "Backbone",
    "BackboneConfig",
    "CheckpointError",
    "KMeansConfig",
    "KMeansResult",
    "NCutConfig",
    "NCutResult",
    "autosc",
    "autosc_batch",
    "kmeans_tokens",
    "kmeans_tokens_batch",
    "load_backbone",
    "recursive_ncut",
    "recursive_ncut_batch",
    "PamrConfig",
    "PipelineConfig",
    "SegmentResult",
    "Segmentation",
    "SparkConfig",
    "check_features",
    "concept_assignment",
    "pamr",
    "refine_labels",
    "segment",
    "segment_features",
    "segment_tokens",
    "segment_tokens_batch",
    "upsample_labels",
    "upsample_soft_labels",
]
