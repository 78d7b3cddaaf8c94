"""Open-vocabulary segmentation with CLIP: dense per-patch features, prompt-ensembled text classifiers, mask pooling."""

from spark_jax.openvocab.classifier import (
    TextClassifier,
    class_logits,
    class_probabilities,
    clear_text_classifier_cache,
    label_segments,
    text_classifier,
)
from spark_jax.openvocab.dense import DENSE_MODES, DenseCLIPConfig, dense_features, neighbourhood_bias
from spark_jax.openvocab.prompts import IMAGENET_TEMPLATES, VILD_TEMPLATES, parse_class_names, read_class_names

__all__ = [
    "DENSE_MODES",
    "IMAGENET_TEMPLATES",
    "VILD_TEMPLATES",
    "DenseCLIPConfig",
    "TextClassifier",
    "class_logits",
    "class_probabilities",
    "clear_text_classifier_cache",
    "dense_features",
    "label_segments",
    "neighbourhood_bias",
    "parse_class_names",
    "read_class_names",
    "text_classifier",
]
