"""The run configuration: everything one benchmark run depends on (written to ``run_config.json``)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from spark_jax.backbones.diffusion import BackboneConfig
from spark_jax.evaluation import PROTOCOLS
from spark_jax.masks.pamr import PamrConfig
from spark_jax.methods import REGISTRY, method_spec
from spark_jax.methods.registry import UPSAMPLINGS, MethodSpec
from spark_jax.openvocab.dense import DENSE_MODES
from spark_jax.openvocab.prompts import IMAGENET_TEMPLATES, VILD_TEMPLATES

__all__ = ["BACKBONES", "DENSE_MODES", "LABEL_WITH", "ON_BAD_SAMPLE", "OPEN_VOCAB_FIELDS", "TEMPLATES", "TEMPLATE_SETS",
           "RunConfig"]

# What a run does with an unreadable image or label: stop naming every bad file, or skip and list them.
ON_BAD_SAMPLE = ("fail", "skip")
BACKBONES = ("auto", "ssd1b", "handcrafted")
# Open-vocabulary runs (--protocol=open_vocab; spark_jax.runner.open_vocab): how an unsupervised method's segments
# get class names, CLIP's dense-feature variants (spark_jax.openvocab.dense), the prompt template sets.
LABEL_WITH = ("none", "clip")
TEMPLATE_SETS = {"imagenet": IMAGENET_TEMPLATES, "vild": VILD_TEMPLATES, "photo": ("a photo of a {}.",)}
TEMPLATES = tuple(TEMPLATE_SETS)
# RunConfig fields that only open-vocabulary runs read (recorded in run_config.json only for those runs).
OPEN_VOCAB_FIELDS = ("clip_checkpoint", "label_with", "dense_mode", "templates", "background_threshold",
                     "vocabulary", "clip_resolution")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one benchmark run depends on (written to ``run_config.json``).

    Attributes:
        dataset: registry name (``demo``, ``voc``, ``context``, ``coco_object``, ``coco_stuff27``, ``cityscapes``,
            ``ade20k``).
        data_dir: the dataset folder (not needed for ``demo``).
        method: a name of :data:`spark_jax.methods.REGISTRY` (``spark``, ``diffcut``, ``autosc``, ``kmeans``,
            or a registered one).
        backbone: ``auto`` (SSD-1B from ``checkpoint`` or the Hugging Face cache; the handcrafted backbone only for
            the demo when no checkpoint exists), ``ssd1b`` or ``handcrafted``.
        checkpoint: a diffusers folder of SSD-1B (or another SDXL-family model).
        resolution: side of the backbone's input; None: the method's own on a diffusion backbone (its spec's
            ``diffusion_defaults``: 512 for DiffSeg), else 1024; 256 for the handcrafted backbone.
        mask_size: side of the predicted and scored label maps (128 in the reference).
        batch_size: images per backbone / method call.
        output_dir: where results go.
        limit: evaluate only the first ``limit`` images.
        protocol: ``diffcut`` (the default: DiffCut's released evaluation, what SPARK's and DiffCut's tables are
            comparable to) or ``standard`` (the datasets' own definitions, the correction; see
            :mod:`spark_jax.evaluation`).
        pamr: apply PAMR after the background merge (the paper's setting).
        feature_cache: folder of cached backbone features, or None.
        num_overlays: overlays written for the first images (unlabelled images always get one).
        loader_workers: threads that read, decode and prepare images ahead of the batch loop and write its PNGs
            behind it (:mod:`spark_jax.runner.input_pipeline`, :class:`spark_jax.runner.outputs.OutputWriter`);
            0 does both in the loop's thread. Results do not depend on it. Default 4, *our choice*: Pillow's
            decoders release the GIL, and 4 threads keep a batch of benchmark JPEGs ahead of a GPU step (see
            ``experiments/bench_input_pipeline.py``).
        prefetch_batches: batches read ahead (and images written behind, in batches) at most; each prepared
            image holds S x S x 3 float32 on the device (12 MB at 1024 px). Default 2, *our choice*: one batch
            ready while the next is read.
        demo_images: number of procedural images of the demo benchmark.
        demo_photos: append scikit-image's sample photographs to the demo (overlays only, not scored).
        upsampling: token labels -> masks: ``soft_labels`` (SPARK: bilinear upsampling of Q*, then argmax) or
            ``concept`` (DiffCut's concept assignment); None: the method's own (its spec's ``upsampling``:
            ``soft_labels`` for SPARK, ``concept`` for the baselines, which have no soft labels).
        method_config: the selected method's configuration, an instance of its spec's ``config_type``
            (:class:`spark_jax.methods.spark.SparkMethodConfig`, :class:`spark_jax.graph.ncut.NCutConfig`,
            :class:`spark_jax.methods.autosc.AutoSCConfig`, :class:`spark_jax.methods.kmeans.KMeansMethodConfig`,
            ...); None: the spec's default (SPARK: the backbone's preset). :func:`run` records the resolved one.
        pamr_config: PAMR's settings.
        on_bad_sample: an image or label that cannot be decoded (truncated, empty, not an image, label values
            outside the label space): ``fail`` stops before the run and names every bad file at once; ``skip``
            leaves them out and lists them in ``metrics.json`` (``skipped``) and the summary.
        allow_nonfinite_features: score images whose backbone features hold NaN/Inf (those tokens act as zero
            vectors; counted in ``metrics.json``) instead of stopping with the count and the likely cause.
        timestep, seed, noise_source, noise_file, unet_dtype: the diffusion backbone's settings
            (:class:`spark_jax.backbones.diffusion.BackboneConfig`, the reference pipeline's defaults); unused by the
            handcrafted backbone. ``timestep`` and ``noise_source`` None: the method's own (its spec's
            ``diffusion_defaults``: DiffSeg's 300 and ``none``), else BackboneConfig's (50, ``jax``); the run
            records the values used.
        backbone_precision: the diffusion backbone's ``BackboneConfig.matmul_precision`` (``highest``: exact).
        clip_checkpoint: open-vocabulary runs: a transformers ``CLIPModel`` folder or an open_clip checkpoint;
            None: the Hugging Face cache snapshot of ``openai/clip-vit-large-patch14`` (NERVE's ViT-L/14) if present
            (:mod:`spark_jax.runner.open_vocab`), else the run refuses, saying so.
        label_with: ``none``, or ``clip``: an unsupervised method's segments (after PAMR) are each named by CLIP
            mask pooling (DiffCut's open-vocabulary mode); needs ``protocol='open_vocab'``.
        dense_mode: CLIP's dense per-patch features (:data:`DENSE_MODES`; NACLIP's by default, *our choice*: NERVE
            does not say how it computes G).
        templates: the prompt templates of the class embeddings (:data:`TEMPLATE_SETS`): ``imagenet`` (the 80
            OpenAI ImageNet templates, NACLIP's), ``vild`` (DiffCut's 14) or ``photo`` ("a photo of a {}.").
        background_threshold: a pixel (or, with ``label_with='clip'``, a segment) whose largest class probability is
            below it becomes the background class; None: the benchmark's own (NACLIP's 0.1 on V21 / PC60 /
            COCO-Object, else 0 = off).
        vocabulary: a class-name file replacing the benchmark's own (one line per class, synonyms ``a, b, c``).
        clip_resolution: side of CLIP's square input; None: the benchmark's (NACLIP's short side, 336; 448 for
            COCO-Stuff), rounded down to a multiple of the patch size.
    """

    dataset: str = "demo"
    data_dir: str | None = None
    method: str = "spark"
    backbone: str = "auto"
    checkpoint: str | None = None
    resolution: int | None = None
    mask_size: int = 128
    batch_size: int = 4
    output_dir: str = "outputs/demo"
    limit: int | None = None
    protocol: str = "diffcut"
    pamr: bool = True
    feature_cache: str | None = None
    num_overlays: int = 8
    loader_workers: int = 4
    prefetch_batches: int = 2
    demo_images: int = 8
    demo_photos: bool = True
    upsampling: str | None = None
    method_config: Any = None
    pamr_config: PamrConfig = PamrConfig()
    on_bad_sample: str = "fail"
    allow_nonfinite_features: bool = False
    timestep: int | None = None
    seed: int = BackboneConfig.seed
    noise_source: str | None = None
    noise_file: str | None = None
    unet_dtype: str = BackboneConfig.unet_dtype
    backbone_precision: str = BackboneConfig.matmul_precision
    clip_checkpoint: str | None = None
    label_with: str = "none"
    dense_mode: str = "naclip"
    templates: str = "imagenet"
    background_threshold: float | None = None
    vocabulary: str | None = None
    clip_resolution: int | None = None

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        spec = method_spec(self.method)  # ValueError listing the methods
        if self.batch_size < 1 or self.mask_size < 8:
            raise ValueError(f"batch_size must be >= 1 and mask_size >= 8, got --batch_size={self.batch_size} "
                             f"--mask_size={self.mask_size}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 8):
            raise ValueError(f"--resolution must be an int >= 8 (the backbone's input side in pixels) or unset for "
                             f"the backbone's own, got {self.resolution!r}")
        self.backbone_config(1024)  # validates the diffusion backbone's settings (ValueError naming the field)
        if self.loader_workers < 0 or self.prefetch_batches < 1:
            raise ValueError(f"--loader_workers must be >= 0 (0: read in the loop's thread) and --prefetch_batches "
                             f">= 1, got {self.loader_workers} and {self.prefetch_batches}")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"--on_bad_sample must be one of {ON_BAD_SAMPLE}, got {self.on_bad_sample!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all images), got {self.limit}")
        if self.upsampling not in (None, *UPSAMPLINGS):
            raise ValueError(f"upsampling must be 'soft_labels', 'concept' or None, got {self.upsampling!r}")
        if self.upsampling is not None and self.upsampling not in spec.upsamplings:
            why = (f" (it upsamples propagated soft labels Q*; {self.method} produces hard token labels)"
                   if self.upsampling == "soft_labels" else "")
            raise ValueError(f"--upsampling={self.upsampling} is not available for --method={self.method}{why}; it "
                             f"supports {', '.join(spec.upsamplings)}: drop --upsampling or pass "
                             f"--upsampling={spec.upsampling}.")
        if self.method_config is not None:
            spec.validate(self.method_config)
        self._check_open_vocab(spec)

    def _check_open_vocab(self, spec: MethodSpec) -> None:
        """The open-vocabulary settings against the protocol and the method (ValueError naming the flag)."""
        for name, value, choices in (("label_with", self.label_with, LABEL_WITH),
                                     ("dense_mode", self.dense_mode, DENSE_MODES),
                                     ("templates", self.templates, TEMPLATES)):
            if value not in choices:
                raise ValueError(f"--{name} must be one of {choices}, got {value!r}")
        thd = self.background_threshold
        if thd is not None and not (isinstance(thd, (int, float)) and 0.0 <= thd <= 1.0):
            raise ValueError(f"--background_threshold must be a probability in [0, 1] (or unset for the benchmark's "
                             f"own), got {thd!r}")
        if self.clip_resolution is not None and (not isinstance(self.clip_resolution, int) or self.clip_resolution < 14):
            raise ValueError(f"--clip_resolution must be an int >= 14 (CLIP's input side) or unset for the "
                             f"benchmark's own, got {self.clip_resolution!r}")
        if self.protocol != "open_vocab":
            if spec.open_vocab:
                raise ValueError(f"--method={self.method} names classes (it returns class ids of a vocabulary, not "
                                 "segments): it runs under --protocol=open_vocab, on an open-vocabulary benchmark")
            if self.label_with != "none":
                raise ValueError(f"--label_with={self.label_with} names segments with class ids: it needs "
                                 "--protocol=open_vocab (the other protocols match segments to classes)")
            return
        if spec.open_vocab and self.label_with != "none":
            raise ValueError(f"--method={self.method} already returns class ids; drop --label_with={self.label_with}")
        if not spec.open_vocab and self.label_with == "none":
            named = [n for n, s in REGISTRY.items() if s.open_vocab]
            raise ValueError(f"--protocol=open_vocab scores class ids, and --method={self.method} returns segment ids: "
                             "name its segments with --label_with=clip (CLIP mask pooling, DiffCut's open-vocabulary "
                             f"mode), or run an open-vocabulary method ({', '.join(named) or 'none registered'})")

    def diffusion_setting(self, name: str) -> Any:
        """A diffusion backbone setting (``timestep``, ``noise_source``, ``resolution``) as the run uses it: the
        explicit value, else the method's (``spec.diffusion_defaults``), else BackboneConfig's (resolution 1024)."""
        value = getattr(self, name)
        if value is not None:
            return value
        fallback = 1024 if name == "resolution" else getattr(BackboneConfig, name)
        return self.spec.diffusion_defaults.get(name, fallback)

    def backbone_config(self, resolution: int) -> BackboneConfig:
        """The diffusion backbone's settings at ``resolution``."""
        return BackboneConfig(resolution=resolution, timestep=self.diffusion_setting("timestep"), seed=self.seed,
                              noise_source=self.diffusion_setting("noise_source"), noise_file=self.noise_file,
                              unet_dtype=self.unet_dtype, matmul_precision=self.backbone_precision)

    @property
    def resolved_upsampling(self) -> str:
        """The upsampling actually used: the explicit choice, else the method's own."""
        if self.upsampling is not None:
            return self.upsampling
        return self.spec.upsampling

    @property
    def spec(self) -> MethodSpec:
        """The selected method's registered spec."""
        return method_spec(self.method)

    def resolved(self, kind: str) -> RunConfig:
        """This configuration with the method's config made concrete for a backbone of ``kind`` (SPARK: the
        preset's settings, unless explicit ones are given)."""
        return dataclasses.replace(self, method_config=self.spec.resolve_config(self.method_config, kind))

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON. It holds only the selected method's configuration (``method_config``), so a
        run of one method never depends on another method's settings, and a resumed run compares what matters."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as a reloaded file has them
        d["upsampling"] = self.resolved_upsampling
        d["timestep"], d["noise_source"] = self.diffusion_setting("timestep"), self.diffusion_setting("noise_source")
        if self.protocol != "open_vocab":  # unused there: the identity of other runs stays as it was
            for name in OPEN_VOCAB_FIELDS:
                del d[name]
        return d
