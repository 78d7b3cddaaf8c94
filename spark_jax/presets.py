"""Named SPARK settings, and which one each backbone runs with by default.

SPARK's hyperparameters depend on the features' affinity statistics (WORKSPACE.md, behaviour map): the paper's
values were tuned on SSD-1B features and over-segment the low-level features of the weights-free handcrafted
backbone. So each backbone carries a named preset; ``--spark_preset`` picks another, and any SPARK flag given
explicitly (``--spark_beta``, ...) overrides the preset's value for that field. The SPARK method's config
(:class:`spark_jax.methods.spark.SparkMethodConfig`: a preset name and optional explicit settings) is resolved
against these by :func:`spark_jax.methods.spark.resolve_spark`.
"""

from __future__ import annotations

from typing import NamedTuple

from spark_jax.config import SparkConfig

__all__ = ["SparkPreset", "SPARK_PRESETS", "BACKBONE_PRESETS", "preset_for_backbone"]


class SparkPreset(NamedTuple):
    """A named SparkConfig and where its values come from (recorded in ``metrics.json``)."""

    config: SparkConfig
    how_chosen: str


SPARK_PRESETS: dict[str, SparkPreset] = {
    "paper": SparkPreset(
        SparkConfig(),
        "the SPARK paper's settings (Sec. 4: beta 0.6, l 2, r 2.6, tau 1e-7), tuned on SSD-1B features",
    ),
    "handcrafted": SparkPreset(
        SparkConfig(sharpen=24.0, beta=0.8, inflation=1.5),
        "calibrated for the handcrafted backbone on 16 never-scored demo images (indices 1000-1015) by "
        "`python -m experiments.calibrate_demo`: best calibration mIoU over 74 settings (sharpen 1-128 and "
        "entropy-calibrated sharpening x beta x r), fewest segments among ties; the other fields are the paper's",
    ),
}

# Backbone kind -> its default preset.
BACKBONE_PRESETS: dict[str, str] = {
    "ssd1b": "paper",
    "handcrafted": "handcrafted",
}


def preset_for_backbone(kind: str) -> str:
    """The default preset name of a backbone kind (``'paper'`` for user-supplied feature extractors)."""
    return BACKBONE_PRESETS.get(kind, "paper")
