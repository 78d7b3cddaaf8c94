"""Command-line flags shared by ``experiments.run`` and ``experiments.compare``.

Importing this module defines the flags of everything a run depends on except the dataset, the method, PAMR
on/off and the output folder (which each script defines its own way): backbone, resolution, protocol, PAMR's
settings, the feature cache, the demo, and one flag per hyperparameter of every method, generated from the
config dataclasses with their defaults:

* SPARK: every ``SparkConfig`` field under its own name (``--beta``, ``--inflation``, ...);
* DiffCut's recursive NCut: ``NCutConfig`` fields prefixed ``ncut_`` (``--ncut_tau``, ``--ncut_alpha``, ...);
* AutoSC: ``AutoSCConfig`` fields prefixed ``autosc_`` (``--autosc_alphas=1,5,10,15``, ...);
* K-means: ``KMeansConfig`` fields prefixed ``kmeans_`` (``--kmeans_max_clusters``, ...), plus ``--kmeans_k``
  (an int, or ``gt`` for K* from the ground truth), ``--kmeans_unlabelled_k`` and ``--kmeans_seed``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from absl import flags

from spark_jax.methods.autosc import AutoSCConfig
from spark_jax.backbones.diffusion import MATMUL_PRECISIONS, NOISE_SOURCES, BackboneConfig
from spark_jax.config import SparkConfig
from spark_jax.evaluation import PROTOCOLS
from spark_jax.methods.kmeans import KMeansConfig
from spark_jax.graph.ncut import NCutConfig
from spark_jax.masks.pamr import PamrConfig
from spark_jax.presets import SPARK_PRESETS, preset_for_backbone
from spark_jax.runner import BACKBONES, ON_BAD_SAMPLE, BackboneNotFoundError, RunConfig, backbone_kind

FLAGS = flags.FLAGS

# Config dataclass -> (flag prefix, RunConfig field, module named in the help).
CONFIG_FLAGS: dict[type, tuple[str, str, str]] = {
    SparkConfig: ("", "spark", "spark_jax/config.py"),
    NCutConfig: ("ncut_", "ncut", "spark_jax/graph/ncut.py"),
    AutoSCConfig: ("autosc_", "autosc", "spark_jax/methods/autosc.py"),
    KMeansConfig: ("kmeans_", "kmeans", "spark_jax/methods/kmeans.py"),
}

flags.DEFINE_string("output_dir", None, "Output folder (experiments.run: default "
                    "outputs/<dataset>-<method>-<protocol>; experiments.compare: default outputs/compare).")
flags.DEFINE_string("data_dir", None, "Folder holding the dataset(s) (see docs/evaluation.md for layouts).")
flags.DEFINE_enum("backbone", "auto", list(BACKBONES),
                  "auto: SSD-1B from --checkpoint or the HF cache (handcrafted only for --dataset=demo when no "
                  "checkpoint exists); ssd1b; handcrafted (weights-free demo/CI backbone, not the paper's).")
flags.DEFINE_string("checkpoint", None, "Diffusers folder of SSD-1B (default: the local HF cache entry of "
                    "segmind/SSD-1B if present).")
flags.DEFINE_integer("resolution", None, "Backbone input side (default 1024 for SSD-1B, 256 for handcrafted; "
                     "the token grid follows from it).")
_B = BackboneConfig()
flags.DEFINE_integer("timestep", _B.timestep, "Diffusion backbone: timestep t of the forward noising (the papers: 50).")
flags.DEFINE_integer("seed", _B.seed, "Diffusion backbone: seed of the noise shared by every image (the papers: 42).")
flags.DEFINE_enum("noise_source", _B.noise_source, list(NOISE_SOURCES),
                  "Diffusion backbone noise: jax (JAX's generator), torch (torch's CPU generator; DiffCut drew on "
                  "CUDA, which differs), file (--noise_file).")
flags.DEFINE_string("noise_file", None, "Diffusion backbone: .npy of the noise in torch's layout [1, 4, h, w] "
                    "(e.g. DiffCut's CUDA draw saved once); needs --noise_source=file.")
flags.DEFINE_enum("unet_dtype", _B.unet_dtype, ["float32", "bfloat16", "float16"],
                  "Diffusion backbone: the UNet's dtype (the VAE always runs in float32).")
flags.DEFINE_enum("backbone_precision", _B.matmul_precision, list(MATMUL_PRECISIONS),
                  "Diffusion backbone: precision of every matmul and convolution (highest = float32, exact).")
flags.DEFINE_integer("mask_size", 128, "Side of the predicted and scored label maps.")
flags.DEFINE_integer("batch_size", 4, "Images per backbone/method call.")
flags.DEFINE_integer("limit", None, "Evaluate only the first N images (of each dataset).")
flags.DEFINE_enum("protocol", RunConfig().protocol, list(PROTOCOLS),
                  "Scoring protocol (docs/evaluation.md): diffcut = DiffCut's released evaluation, which SPARK's and "
                  "DiffCut's tables are comparable to; standard = the datasets' own definitions (the correction).")
flags.DEFINE_enum("spark_preset", "auto", ["auto", *SPARK_PRESETS],
                  "SPARK's settings: auto = the backbone's own preset (the paper's for SSD-1B; a calibrated one for "
                  "the handcrafted demo backbone); paper = the paper's. A SPARK flag given explicitly overrides "
                  "the preset's value.")
flags.DEFINE_enum("on_bad_sample", RunConfig().on_bad_sample, list(ON_BAD_SAMPLE),
                  "An unreadable image or label (checked before the run): fail = stop naming every bad file; "
                  "skip = leave them out, listed in metrics.json.")
flags.DEFINE_bool("allow_nonfinite_features", False,
                  "Score images whose backbone features hold NaN/Inf (those tokens act as zero vectors, counted in "
                  "metrics.json) instead of stopping.")
flags.DEFINE_integer("pamr_iters", PamrConfig().num_iter, "PAMR iterations.")
flags.DEFINE_list("pamr_dilations", [str(d) for d in PamrConfig().dilations], "PAMR dilations.")
flags.DEFINE_string("feature_cache", None, "Folder caching backbone features across runs.")
flags.DEFINE_integer("num_overlays", 8, "Overlay images written for the first N images.")
flags.DEFINE_integer("demo_images", 8, "Number of procedural images of the demo benchmark.")
flags.DEFINE_bool("demo_photos", True, "Add scikit-image's sample photographs to the demo (overlays only).")
flags.DEFINE_string("kmeans_k", "gt", "K-means cluster count: an int fixed across the dataset (DiffCut Table 9: "
                    "3 on VOC, 6 elsewhere) or 'gt' for K* = the classes present in each image's ground truth.")
flags.DEFINE_integer("kmeans_unlabelled_k", RunConfig().kmeans_unlabelled_k,
                     "K-means K for unlabelled images when --kmeans_k=gt (they are drawn, not scored).")
flags.DEFINE_integer("kmeans_seed", RunConfig().kmeans_seed, "Seed of the K-means (k-means++) initialisation.")


def _define_config_flags(cls: type, prefix: str, where: str) -> None:
    """One flag per field of the config dataclass ``cls``, typed from its annotation, with its default."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, default = hints[field.name], field.default
        name = prefix + field.name
        doc = f"{cls.__name__}.{field.name} (default {default!r}; see {where})."
        args = typing.get_args(hint)
        if typing.get_origin(hint) is typing.Literal:
            flags.DEFINE_enum(name, default, list(args), doc)
        elif hint is bool:
            flags.DEFINE_bool(name, default, doc)
        elif type(None) in args and len(args) == 2:  # int | None, float | None: "none" selects None
            item = args[0] if args[1] is type(None) else args[1]
            flags.DEFINE_string(name, "none" if default is None else str(default),
                                doc + f" A{'n' if item is int else ''} {item.__name__}, or 'none'.")
        elif hint is int:
            flags.DEFINE_integer(name, default, doc)
        elif hint is float:
            flags.DEFINE_float(name, default, doc)
        elif hint is str:
            flags.DEFINE_string(name, default, doc)
        elif typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
            flags.DEFINE_list(name, [str(v) for v in default], doc + " Comma-separated.")
        else:
            raise TypeError(f"no flag type for {cls.__name__}.{field.name}: {hint}")


def _config_from_flags(cls: type, prefix: str, base: Any = None) -> Any:
    """``cls`` from its flags; with ``base``, only the flags given on the command line replace its values."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if base is not None and not FLAGS[prefix + field.name].present:
            continue
        value = FLAGS[prefix + field.name].value
        hint = hints[field.name]
        args = typing.get_args(hint)
        if type(None) in args and len(args) == 2:
            item = args[0] if args[1] is type(None) else args[1]
            try:
                value = None if value.strip().lower() == "none" else item(value)
            except ValueError:
                raise ValueError(f"--{prefix}{field.name}: expected {item.__name__} or 'none', got {value!r}") from None
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                raise ValueError(f"--{prefix}{field.name}: expected comma-separated {item.__name__} values, "
                                 f"got {','.join(value)!r}") from None
        values[field.name] = value
    return cls(**values) if base is None else dataclasses.replace(base, **values)


for _cls, (_prefix, _, _where) in CONFIG_FLAGS.items():
    _define_config_flags(_cls, _prefix, _where)


def kmeans_k_from_flag(value: str) -> int | str:
    """``--kmeans_k``: 'gt' or a positive int."""
    if value.strip().lower() == "gt":
        return "gt"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--kmeans_k must be an int >= 1 or 'gt', got {value!r}") from None


def spark_from_flags(dataset: str) -> SparkConfig | None:
    """SPARK's settings: None (the preset, resolved by the runner) unless a SPARK flag is given; then the preset
    (``--spark_preset``, or the backbone's own) with the given flags replacing its values."""
    given = [f.name for f in dataclasses.fields(SparkConfig) if FLAGS[f.name].present]
    if not given:
        return None
    name = FLAGS.spark_preset
    if name == "auto":
        probe = RunConfig(dataset=dataset, backbone=FLAGS.backbone, checkpoint=FLAGS.checkpoint)
        try:
            name = preset_for_backbone(backbone_kind(probe)[0])
        except BackboneNotFoundError:
            name = "paper"  # the run itself reports the missing checkpoint
    if name not in SPARK_PRESETS:
        raise ValueError(f"--spark_preset must be 'auto' or one of {sorted(SPARK_PRESETS)}, got {name!r}")
    return _config_from_flags(SparkConfig, "", base=SPARK_PRESETS[name].config)


def run_config_from_flags(**fields: Any) -> RunConfig:
    """The RunConfig of the shared flags; ``fields`` gives the rest (dataset, method, pamr, output_dir, ...)."""
    configs = {field: _config_from_flags(cls, prefix) for cls, (prefix, field, _) in CONFIG_FLAGS.items()
               if cls is not SparkConfig}
    configs["spark"] = spark_from_flags(fields.get("dataset", "demo"))
    try:
        dilations = tuple(int(d) for d in FLAGS.pamr_dilations)
    except ValueError:
        raise ValueError(f"--pamr_dilations: expected comma-separated ints, got {','.join(FLAGS.pamr_dilations)!r}")\
            from None
    if not dilations or min(dilations) < 1 or FLAGS.pamr_iters < 0:
        raise ValueError(f"--pamr_dilations must be ints >= 1 and --pamr_iters >= 0, got "
                         f"{','.join(FLAGS.pamr_dilations)!r} and {FLAGS.pamr_iters}")
    pamr = PamrConfig(num_iter=FLAGS.pamr_iters, dilations=dilations)
    return RunConfig(
        data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, checkpoint=FLAGS.checkpoint, resolution=FLAGS.resolution,
        mask_size=FLAGS.mask_size, batch_size=FLAGS.batch_size, limit=FLAGS.limit, protocol=FLAGS.protocol,
        feature_cache=FLAGS.feature_cache, num_overlays=FLAGS.num_overlays, on_bad_sample=FLAGS.on_bad_sample,
        allow_nonfinite_features=FLAGS.allow_nonfinite_features, spark_preset=FLAGS.spark_preset,
        demo_images=FLAGS.demo_images, demo_photos=FLAGS.demo_photos, timestep=FLAGS.timestep, seed=FLAGS.seed,
        noise_source=FLAGS.noise_source, noise_file=FLAGS.noise_file, unet_dtype=FLAGS.unet_dtype,
        backbone_precision=FLAGS.backbone_precision, pamr_config=pamr, kmeans_k=kmeans_k_from_flag(FLAGS.kmeans_k),
        kmeans_unlabelled_k=FLAGS.kmeans_unlabelled_k, kmeans_seed=FLAGS.kmeans_seed, **configs, **fields,
    )
