"""Command-line flags shared by ``experiments.run`` and ``experiments.compare``.

Importing this module defines the flags of everything a run depends on except the dataset, the method, PAMR
on/off and the output folder (which each script defines its own way): backbone, resolution, protocol, PAMR's
settings, the feature cache, the demo, and the flags of every registered method (:data:`spark_jax.methods.REGISTRY`),
generated from its config dataclass with its defaults and its flag prefix (a field that is itself a dataclass is
flattened under the same prefix):

* SPARK: ``--spark_preset`` and one flag per ``SparkConfig`` field (``--spark_beta``, ``--spark_inflation``,
  ``--spark_global_source``, ...);
* DiffCut's recursive NCut: ``NCutConfig`` fields prefixed ``ncut_`` (``--ncut_tau``, ``--ncut_alpha``, ...);
* AutoSC: ``AutoSCConfig`` fields prefixed ``autosc_`` (``--autosc_alphas=1,5,10,15``, ...);
* K-means: ``--kmeans_k`` (an int, or ``gt`` for K* from the ground truth), ``--kmeans_unlabelled_k``,
  ``--kmeans_seed`` and the ``KMeansConfig`` fields (``--kmeans_max_clusters``, ...).

A method registered later (``spark_jax.methods.register``, before the flags are parsed) gets its flags too.

Deprecated: the unprefixed SPARK flags of earlier releases (``--beta``, ``--inflation``, ... one per
``SparkConfig`` field) are still accepted, for one release, as aliases of ``--spark_<field>``; using one logs a
warning. A method flag given explicitly replaces the value of the method's default (SPARK: of its preset,
``--spark_preset`` or the backbone's own); with none given, the run uses the default (the preset).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterator
from typing import Any

from absl import flags, logging

from spark_jax.backbones.diffusion import MATMUL_PRECISIONS, NOISE_SOURCES, BackboneConfig
from spark_jax.config import SparkConfig
from spark_jax.evaluation import PROTOCOLS
from spark_jax.masks.pamr import PamrConfig
from spark_jax.methods import REGISTRY, MethodSpec, add_listener, method_spec
from spark_jax.runner import BACKBONES, ON_BAD_SAMPLE, BackboneNotFoundError, RunConfig, backbone_kind
from spark_jax.runner.config import DENSE_MODES, LABEL_WITH, TEMPLATES
from spark_jax.runner.config import DENSE_MODES, LABEL_WITH, TEMPLATES

FLAGS = flags.FLAGS

flags.DEFINE_string("output_dir", None, "Output folder (experiments.run: default "
                    "outputs/<dataset>-<method>-<protocol>; experiments.compare: default outputs/compare).")
flags.DEFINE_string("data_dir", None, "Folder holding the dataset(s) (see docs/evaluation.md for layouts).")
flags.DEFINE_enum("backbone", "auto", list(BACKBONES),
                  "auto: SSD-1B from --checkpoint or the HF cache (handcrafted only for --dataset=demo when no "
                  "checkpoint exists); ssd1b; handcrafted (weights-free demo/CI backbone, not the paper's).")
flags.DEFINE_string("checkpoint", None, "Diffusers folder of SSD-1B (default: the local HF cache entry of "
                    "segmind/SSD-1B if present).")
flags.DEFINE_integer("resolution", None, "Backbone input side (default: the method's own on a diffusion backbone, "
                     "DiffSeg's 512; else 1024; 256 for handcrafted; the token grid follows from it).")
_B = BackboneConfig()
flags.DEFINE_integer("timestep", None, f"Diffusion backbone: timestep t of the UNet call (default: the method's own, "
                     f"DiffSeg's 300; else {_B.timestep}, SPARK's and DiffCut's).")
flags.DEFINE_integer("seed", _B.seed, "Diffusion backbone: seed of the noise shared by every image (the papers: 42).")
flags.DEFINE_enum("noise_source", None, list(NOISE_SOURCES),
                  "Diffusion backbone noise: jax (JAX's generator), torch (torch's CPU generator; DiffCut drew on "
                  "CUDA, which differs), file (--noise_file), none (the clean latent, DiffSeg's). Default: the "
                  f"method's own (DiffSeg: none), else {_B.noise_source}.")
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
                  "DiffCut's tables are comparable to; standard = the datasets' own definitions (the correction); "
                  "open_vocab = class ids on a dataset-level confusion matrix, no matching (the open-vocabulary "
                  "benchmarks voc21, voc20, context60, ...; --method=nerve or --label_with=clip).")
flags.DEFINE_enum("on_bad_sample", RunConfig().on_bad_sample, list(ON_BAD_SAMPLE),
                  "An unreadable image or label (checked before the run): fail = stop naming every bad file; "
                  "skip = leave them out, listed in metrics.json.")
flags.DEFINE_bool("allow_nonfinite_features", False,
                  "Score images whose backbone features hold NaN/Inf (those tokens act as zero vectors, counted in "
                  "metrics.json) instead of stopping.")
flags.DEFINE_integer("pamr_iters", PamrConfig().num_iter, "PAMR iterations.")
flags.DEFINE_list("pamr_dilations", [str(d) for d in PamrConfig().dilations], "PAMR dilations.")
flags.DEFINE_string("feature_cache", None, "Folder caching backbone taps across runs.")
flags.DEFINE_integer("num_overlays", 8, "Overlay images written for the first N images.")
flags.DEFINE_integer("loader_workers", RunConfig().loader_workers, "Threads reading and preparing images ahead of "
                     "the batch loop and writing its PNGs behind it (0: both in the loop's thread; results do not "
                     "depend on it).")
flags.DEFINE_integer("prefetch_batches", RunConfig().prefetch_batches, "Batches read ahead (and written behind) at "
                     "most.")
flags.DEFINE_integer("demo_images", 8, "Number of procedural images of the demo benchmark.")
flags.DEFINE_bool("demo_photos", True, "Add scikit-image's sample photographs to the demo (overlays only).")
# Open-vocabulary runs (--protocol=open_vocab; docs/evaluation.md, spark_jax/runner/open_vocab.py).
flags.DEFINE_string("clip_checkpoint", None, "Open vocabulary: CLIP weights, a transformers CLIPModel folder or an "
                    "open_clip checkpoint (default: the HF cache snapshot of openai/clip-vit-large-patch14 if present).")
flags.DEFINE_enum("label_with", "none", list(LABEL_WITH), "Open vocabulary: clip = name each segment of an "
                  "unsupervised method (after PAMR) by CLIP mask pooling (DiffCut's open-vocabulary mode).")
flags.DEFINE_enum("dense_mode", RunConfig().dense_mode, list(DENSE_MODES),
                  "Open vocabulary: CLIP's dense per-patch features (NACLIP's by default).")
flags.DEFINE_enum("templates", RunConfig().templates, list(TEMPLATES), "Open vocabulary: prompt templates of the "
                  "class embeddings (imagenet: the 80 OpenAI ones; vild: DiffCut's 14; photo: 'a photo of a {}.').")
flags.DEFINE_float("background_threshold", None, "Open vocabulary: pixels (segments with --label_with=clip) whose "
                   "largest class probability is below it become the background (default: the benchmark's, "
                   "NACLIP's 0.1 on voc21 / context60 / coco_object_full, else 0 = off).")
flags.DEFINE_string("vocabulary", None, "Open vocabulary: a class-name file replacing the benchmark's own (one line "
                    "per class, synonyms 'a, b, c').")
flags.DEFINE_integer("clip_resolution", None, "Open vocabulary: side of CLIP's input (default: the benchmark's, "
                     "336; 448 for coco_stuff171), rounded down to a multiple of the patch size.")

# method name -> {flag name: path of its field in the method's config, e.g. ("spark", "beta")}.
METHOD_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {}
# Deprecated alias -> the flag it stands for (kept for one release).
DEPRECATED_ALIASES: dict[str, str] = {}


class _Leaf(typing.NamedTuple):
    path: tuple[str, ...]
    field: dataclasses.Field
    hint: Any
    owner: type


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and type(None) in typing.get_args(hint) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def config_leaves(cls: type, path: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    """The fields of a method config that get a flag: every field, those holding a dataclass flattened."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        inner = _dataclass_of(hints[field.name])
        if inner is not None:
            yield from config_leaves(inner, (*path, field.name))
        else:
            yield _Leaf((*path, field.name), field, hints[field.name], cls)


def _define(name: str, leaf: _Leaf, source: str) -> None:
    field, hint = leaf.field, leaf.hint
    default = field.default
    if default is dataclasses.MISSING:
        raise TypeError(f"{leaf.owner.__name__}.{field.name} has no default: a method config needs defaults for its "
                        "flags")
    doc = field.metadata.get("help") or f"{leaf.owner.__name__}.{field.name} (see {source or leaf.owner.__module__})."
    doc = f"{doc} Default {default!r}."
    args = typing.get_args(hint)
    if "parse" in field.metadata:
        flags.DEFINE_string(name, str(default), doc)
    elif "choices" in field.metadata:
        flags.DEFINE_enum(name, default, list(field.metadata["choices"]), doc)
    elif typing.get_origin(hint) is typing.Literal:
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
        raise TypeError(f"no flag type for {leaf.owner.__name__}.{field.name}: {hint}; give the field a "
                        "metadata 'parse' function (text, flag name) -> value")


def define_method_flags(spec: MethodSpec) -> None:
    """Defines the flags of one method's config (``spec.flag_prefix`` + field name)."""
    names: dict[str, tuple[str, ...]] = {}
    for leaf in config_leaves(spec.config_type):
        name = spec.flag_prefix + leaf.field.name
        if name in names or name in FLAGS:
            raise ValueError(f"method {spec.name!r}: flag --{name} (of {'.'.join(leaf.path)}) is already defined; "
                             "rename the field or choose another flag_prefix")
        names[name] = leaf.path
    for leaf in config_leaves(spec.config_type):
        _define(spec.flag_prefix + leaf.field.name, leaf, spec.source)
    METHOD_FLAGS[spec.name] = names


def remove_method_flags(spec: MethodSpec) -> None:
    """Removes the flags of an unregistered method."""
    for name in METHOD_FLAGS.pop(spec.name, {}):
        for alias, target in list(DEPRECATED_ALIASES.items()):
            if target == name:
                delattr(FLAGS, alias)
                del DEPRECATED_ALIASES[alias]
        delattr(FLAGS, name)


def _on_registry(event: str, spec: MethodSpec) -> None:
    if event == "register":
        define_method_flags(spec)
    else:
        remove_method_flags(spec)


for _spec in REGISTRY.values():
    define_method_flags(_spec)
add_listener(_on_registry)

# The unprefixed SPARK flags of earlier releases (--beta, --inflation, ...): aliases for one release.
for _field in dataclasses.fields(SparkConfig):
    _target = "spark_" + _field.name
    flags.DEFINE_alias(_field.name, _target)
    FLAGS[_field.name].help = f"DEPRECATED alias of --{_target} (kept for one release; use --{_target})."
    DEPRECATED_ALIASES[_field.name] = _target


def _value(name: str, leaf: _Leaf) -> Any:
    """The parsed value of a method flag."""
    value, hint, field = FLAGS[name].value, leaf.hint, leaf.field
    if "parse" in field.metadata:
        return field.metadata["parse"](value, f"--{name}")
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2 and typing.get_origin(hint) is not typing.Literal:
        item = args[0] if args[1] is type(None) else args[1]
        try:
            return None if value.strip().lower() == "none" else item(value)
        except ValueError:
            raise ValueError(f"--{name}: expected {item.__name__} or 'none', got {value!r}") from None
    if typing.get_origin(hint) is tuple:
        item = args[0]
        try:
            return tuple(item(v) for v in value)
        except ValueError:
            raise ValueError(f"--{name}: expected comma-separated {item.__name__} values, got "
                             f"{','.join(value)!r}") from None
    return value


def method_config_from_flags(name: str, kind: Callable[[], str]) -> Any | None:
    """Method ``name``'s config from its flags: None (the default, or SPARK's preset, resolved by the run) unless
    one of its flags is given; then its default with the given flags replacing its values. A given flag of a field
    that the default leaves to a preset (SPARK's ``spark``) replaces the value of the preset ``kind()`` (the
    backbone kind) selects."""
    spec = method_spec(name)
    leaves = {spec.flag_prefix + leaf.field.name: leaf for leaf in config_leaves(spec.config_type)}
    given = {flag: leaf for flag, leaf in leaves.items() if FLAGS[flag].present}
    if not given:
        return None
    for alias, target in DEPRECATED_ALIASES.items():
        if FLAGS[alias].present and target in given:
            logging.warning("--%s is deprecated and will be removed: use --%s", alias, target)

    def apply(config: Any, depth: int, of: dict[str, _Leaf]) -> Any:
        top = {leaf.path[depth]: _value(flag, leaf) for flag, leaf in of.items() if len(leaf.path) == depth + 1}
        groups: dict[str, dict[str, _Leaf]] = {}
        for flag, leaf in of.items():
            if len(leaf.path) > depth + 1:
                groups.setdefault(leaf.path[depth], {})[flag] = leaf
        nested = {}
        for field, sub in groups.items():
            inner = getattr(config, field)
            if inner is None and depth == 0:  # left to the preset: the value the resolved config holds
                inner = getattr(spec.resolve_config(dataclasses.replace(config, **top), kind()), field)
            if inner is None:
                raise ValueError(f"{', '.join('--' + f for f in sub)}: method {spec.name!r} leaves "
                                 f"{'.'.join(sub[next(iter(sub))].path[:depth + 1])} unset, so there is no value to "
                                 "replace")
            nested[field] = apply(inner, depth + 1, sub)
        return dataclasses.replace(config, **top, **nested)  # at once: a config validates its fields together

    return apply(spec.default(), 0, given)


def method_configs_from_flags(dataset: str = "demo") -> dict[str, Any | None]:
    """Every registered method's config from its flags (``experiments.compare`` runs them all)."""
    kind = _kind_of(dataset)
    return {name: method_config_from_flags(name, kind) for name in REGISTRY}


def _kind_of(dataset: str) -> Callable[[], str]:
    """The kind of the backbone the flags select, looked up (cheaply, without loading it) when first needed."""
    @functools.cache
    def kind() -> str:
        probe = RunConfig(dataset=dataset, backbone=FLAGS.backbone, checkpoint=FLAGS.checkpoint)
        try:
            return backbone_kind(probe)[0]
        except BackboneNotFoundError:
            return "ssd1b"  # the run itself reports the missing checkpoint
    return kind


def run_config_from_flags(**fields: Any) -> RunConfig:
    """The RunConfig of the shared flags; ``fields`` gives the rest (dataset, method, pamr, output_dir, ...) and
    replaces any value the flags give."""
    try:
        dilations = tuple(int(d) for d in FLAGS.pamr_dilations)
    except ValueError:
        raise ValueError(f"--pamr_dilations: expected comma-separated ints, got {','.join(FLAGS.pamr_dilations)!r}")\
            from None
    if not dilations or min(dilations) < 1 or FLAGS.pamr_iters < 0:
        raise ValueError(f"--pamr_dilations must be ints >= 1 and --pamr_iters >= 0, got "
                         f"{','.join(FLAGS.pamr_dilations)!r} and {FLAGS.pamr_iters}")
    method = fields.get("method", "spark")
    values = dict(
        data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, checkpoint=FLAGS.checkpoint, resolution=FLAGS.resolution,
        mask_size=FLAGS.mask_size, batch_size=FLAGS.batch_size, limit=FLAGS.limit, protocol=FLAGS.protocol,
        feature_cache=FLAGS.feature_cache, num_overlays=FLAGS.num_overlays, on_bad_sample=FLAGS.on_bad_sample,
        loader_workers=FLAGS.loader_workers, prefetch_batches=FLAGS.prefetch_batches,
        allow_nonfinite_features=FLAGS.allow_nonfinite_features, demo_images=FLAGS.demo_images,
        demo_photos=FLAGS.demo_photos, timestep=FLAGS.timestep, seed=FLAGS.seed, noise_source=FLAGS.noise_source,
        noise_file=FLAGS.noise_file, unet_dtype=FLAGS.unet_dtype, backbone_precision=FLAGS.backbone_precision,
        pamr_config=PamrConfig(num_iter=FLAGS.pamr_iters, dilations=dilations), method=method,
        clip_checkpoint=FLAGS.clip_checkpoint, label_with=FLAGS.label_with, dense_mode=FLAGS.dense_mode,
        templates=FLAGS.templates, background_threshold=FLAGS.background_threshold, vocabulary=FLAGS.vocabulary,
        clip_resolution=FLAGS.clip_resolution,
    )
    values["method_config"] = method_config_from_flags(method, _kind_of(fields.get("dataset", "demo")))
    values.update(fields)
    return RunConfig(**values)
