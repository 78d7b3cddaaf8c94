"""What an open-vocabulary run (``--protocol=open_vocab``) adds to the runner: CLIP, the vocabulary, its text
classifier, and per batch the dense CLIP class probabilities and the naming of segments.

* **CLIP** from ``--clip_checkpoint`` (a transformers ``CLIPModel`` folder or an open_clip checkpoint,
  :func:`spark_jax.backbones.clip.load_clip`), else the Hugging Face cache snapshot of
  ``openai/clip-vit-large-patch14`` (NERVE's ViT-L/14). With neither the run refuses before any weight is read,
  saying which weights it needs and where it looked: nothing is faked.
* **Vocabulary**: the benchmark's class-name file (:mod:`spark_jax.openvocab.benchmarks`) or ``--vocabulary``;
  its text classifier is prompt-ensembled over ``--templates`` and cached per (checkpoint, vocabulary, templates)
  under ``$SPARK_JAX_CACHE/text_classifiers``.
* **Per batch** (:meth:`OpenVocab.encode`, one jitted program): the prepared images (the square crop every method
  sees, in [0, 1]) resized to CLIP's side (bilinear with antialiasing, *our choice*), normalised with CLIP's
  mean and std, dense features of ``--dense_mode``, class probabilities (softmax of 40 x cosine, max over
  synonyms) on CLIP's patch grid: ``MethodInputs.class_probs`` for open-vocabulary methods (NERVE).
* **--label_with=clip** (:meth:`OpenVocab.name_segments`): an unsupervised method's segments are refined with PAMR
  first (``--pamr``), then each is named by the class of its mask-pooled dense CLIP embedding — DiffCut's
  open-vocabulary order (``eval_diffcut_openvoc.py``: masks, PAMR, mask classification; method-facts section 3).
  Its background is the benchmark's background class (V21 / C-Obj: SCLIP's 26 stuff synonyms; DiffCut's own
  74-synonym line is not used, so that every method of a benchmark is scored on one vocabulary: *our choice*).
* **Background threshold**: ``--background_threshold`` or the benchmark's (NACLIP's ``prob_thd``); the method
  applies it to pixels (``MethodContext.background_threshold``), the CLIP naming to segments. A threshold on a
  benchmark without a background class is refused (class 0 is then an object).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spark_jax import sharding
from spark_jax.backbones.checkpoint import CheckpointError, default_cache_dir
from spark_jax.backbones.clip import load_clip, resolve_clip
from spark_jax.data import Dataset
from spark_jax.evaluation import LabelSpace
from spark_jax.masks.pamr import PamrConfig, label_capacity
from spark_jax.openvocab.benchmarks import BENCHMARKS, OpenVocabBenchmark, benchmark
from spark_jax.openvocab.classifier import TextClassifier, class_probabilities, label_segments, text_classifier
from spark_jax.openvocab.dense import DenseCLIPConfig, dense_features
from spark_jax.openvocab.prompts import read_class_names
from spark_jax.runner.config import TEMPLATE_SETS, RunConfig
from spark_jax.runner.errors import BackboneNotFoundError
from spark_jax.runner.scoring import BatchRefiner, contiguous

__all__ = ["CLIP_REPO", "OpenVocab", "open_vocab_dataset", "resolve_clip_checkpoint",
           "setup_open_vocab"]

# NERVE's CLIP (seed 003, slide 5.1: CLIP ViT-L/14).
CLIP_REPO = "openai/clip-vit-large-patch14"


def resolve_clip_checkpoint(cfg: RunConfig) -> str:
    """``--clip_checkpoint`` (a folder or a cached repo id), else the Hugging Face cache snapshot of
    ``openai/clip-vit-large-patch14``.

    Raises:
        BackboneNotFoundError: neither exists; the message names the weights, where they were looked for and how
            to get them.
    """
    if cfg.clip_checkpoint:  # a folder, or a repo id of the Hugging Face cache
        try:
            return str(resolve_clip(cfg.clip_checkpoint))
        except CheckpointError as err:
            raise BackboneNotFoundError(f"--clip_checkpoint={cfg.clip_checkpoint!r}: {err}. Pass a transformers "
                                        "CLIPModel folder (config.json + model.safetensors) or an open_clip "
                                        "checkpoint folder.") from None
    try:
        return str(resolve_clip(CLIP_REPO))
    except CheckpointError as err:
        who = f"--method={cfg.method}" if cfg.spec.open_vocab else f"--method={cfg.method} --label_with={cfg.label_with}"
        raise BackboneNotFoundError(
            f"{who} (--protocol=open_vocab) needs CLIP weights to name classes, and none were found. It looks for "
            "--clip_checkpoint=PATH (a transformers CLIPModel folder with config.json and model.safetensors, or an "
            f"open_clip checkpoint), else the Hugging Face cache snapshot of {CLIP_REPO} (CLIP ViT-L/14, NERVE's): "
            f"{err} Download it once with `huggingface-cli download {CLIP_REPO}` (about 1.7 GB; "
            f"https://huggingface.co/{CLIP_REPO}), or pass --clip_checkpoint. Nothing is substituted for CLIP."
        ) from None


def open_vocab_dataset(cfg: RunConfig, **kwargs) -> Dataset:
    """The reader of the open-vocabulary benchmark ``cfg.dataset`` (ValueError listing them)."""
    return benchmark(cfg.dataset).read(cfg.data_dir, **kwargs)


@functools.partial(nnx.jit, static_argnames=("cfg", "side"))
def _encode(model, clf: TextClassifier, images: jax.Array, mean: jax.Array, std: jax.Array, *,
            cfg: DenseCLIPConfig, side: int) -> tuple[jax.Array, jax.Array]:
    """Images [B, S, S, 3] in [0, 1] -> dense CLIP features [B, gh, gw, D] and class probabilities [B, gh, gw, K]."""
    x = jax.image.resize(images.astype(jnp.float32), (images.shape[0], side, side, 3), "bilinear", antialias=True)
    dense = dense_features(model, (x - mean) / std, cfg)
    return dense, class_probabilities(dense, clf)


@functools.lru_cache(maxsize=16)
def _label_program(mesh: jax.sharding.Mesh, num_segments: int):
    """``label_segments`` on each device's images (``sharding.per_device``), one program per process for each
    (mesh, segment capacity)."""

    def label(batch, params):
        segments, dense = batch
        classifier, threshold = params
        return label_segments(segments, dense, classifier, num_segments=num_segments, background_threshold=threshold)

    return jax.jit(sharding.per_device(label, mesh))


@dataclasses.dataclass
class OpenVocab:
    """An open-vocabulary run's CLIP side (:func:`setup_open_vocab` builds it).

    Attributes:
        benchmark: the registered benchmark, or None for a dataset object of another name (``--vocabulary``).
        label_space: the scored classes.
        vocabulary: one synonym tuple per class; ``vocabulary_source``: its file.
        background: the background class id, or None.
        background_threshold: the threshold in use (0: off).
        clip: the loaded CLIP; ``classifier``: the vocabulary's text classifier.
        clip_resolution: side of CLIP's input; ``dense``: the dense-feature variant.
        label_with: ``none`` (the method returns class ids) or ``clip`` (segments named here).
        pamr: PAMR's settings, or None (``--nopamr``).
        templates: the template set's name.
    """

    benchmark: OpenVocabBenchmark | None
    label_space: LabelSpace
    vocabulary: tuple[tuple[str, ...], ...]
    vocabulary_source: str
    background: int | None
    background_threshold: float
    clip: Any
    classifier: TextClassifier
    clip_resolution: int
    dense: DenseCLIPConfig
    label_with: str
    pamr: PamrConfig | None
    templates: str

    def encode(self, prepared: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Dense CLIP features [B, gh, gw, D] and class probabilities [B, gh, gw, K] of prepared images
        [B, S, S, 3] in [0, 1] (one jitted call)."""
        mean = jnp.asarray(self.clip.mean, jnp.float32).reshape(1, 1, 1, 3)
        std = jnp.asarray(self.clip.std, jnp.float32).reshape(1, 1, 1, 3)
        return _encode(self.clip.model, self.classifier, prepared, mean, std, cfg=self.dense,
                       side=self.clip_resolution)

    def name_segments(self, segments: np.ndarray, images: jax.Array, dense: jax.Array, refiner: BatchRefiner | None,
                      mesh: jax.sharding.Mesh, slots: int) -> np.ndarray:
        """``--label_with=clip``: segments [n, m, m] (any ids) -> class ids [n, m, m]: PAMR on each image's
        segments (``refiner``, on the batch's prepared ``images``; None: ``--nopamr``), then CLIP mask pooling
        of ``dense`` [slots, ...] (rows past n are padding), each device naming its own images."""
        segments = list(np.asarray(segments))
        if refiner is not None:  # it ranks the ids itself
            segments = refiner(images, segments)
        refined = np.stack([contiguous(seg) for seg in segments]).astype(np.int32)
        capacity = label_capacity(int(refined.max()) + 1)  # power-of-two buckets: few compilations
        batch = (sharding.put_rows(refined, slots, mesh), sharding.put_rows(dense, slots, mesh))
        ids = _label_program(mesh, capacity)(batch, (self.classifier, jnp.float32(self.background_threshold)))
        return np.asarray(ids)[: len(refined)]

    def identity(self) -> dict[str, Any]:
        """What the run's results depend on beyond ``RunConfig`` (``run_config.json``: a resume with another CLIP
        or vocabulary is refused)."""
        return {"clip_checkpoint": self.clip.checkpoint_id, "clip_resolution": self.clip_resolution,
                "vocabulary_sha256": hashlib.sha256(json.dumps(self.vocabulary).encode()).hexdigest(),
                "background_threshold": self.background_threshold}

    def metrics(self, result: dict[str, Any]) -> dict[str, Any]:
        """The ``open_vocab`` entry of ``metrics.json``."""
        return {"open_vocab": {
            "benchmark": None if self.benchmark is None else self.benchmark.name,
            "nerve_column": None if self.benchmark is None else self.benchmark.title,
            "scoring": "dataset-level confusion matrix (mmsegmentation IoUMetric): void ignored, no matching",
            "mean_accuracy": result.get("mean_accuracy"),
            "per_class_accuracy": result.get("per_class_accuracy"),
            "vocabulary": self.vocabulary_source, "num_classes": len(self.vocabulary),
            "num_synonyms": int(sum(len(c) for c in self.vocabulary)),
            "templates": self.templates, "num_templates": len(TEMPLATE_SETS[self.templates]),
            "clip_checkpoint": self.clip.checkpoint_id, "clip_resolution": self.clip_resolution,
            "dense_mode": self.dense.mode, "label_with": self.label_with,
            "background": self.background, "background_threshold": self.background_threshold,
        }}


def setup_open_vocab(cfg: RunConfig, ds: Dataset) -> OpenVocab | None:
    """The CLIP side of an open-vocabulary run (None for the other protocols): checks the vocabulary and the
    threshold against the dataset, then loads CLIP and its text classifier.

    Raises:
        BackboneNotFoundError: no CLIP weights (see :func:`resolve_clip_checkpoint`).
        ValueError: a vocabulary of another size than the label space, a threshold without a background class, a
            dataset that is no open-vocabulary benchmark and no ``--vocabulary``.
    """
    if cfg.protocol != "open_vocab":
        return None
    space = ds.label_space
    bench = BENCHMARKS.get(cfg.dataset)
    if bench is not None and bench.label_space.class_names != space.class_names:
        bench = None  # a dataset object of another label space under a benchmark's name: its own vocabulary
    if cfg.vocabulary is None and bench is None:
        raise ValueError(f"dataset {cfg.dataset!r} is not an open-vocabulary benchmark ({', '.join(BENCHMARKS)}) with "
                         "its label space: pass --vocabulary=FILE, one line of class names per class")
    source = cfg.vocabulary or bench.class_path
    if not os.path.isfile(source):
        raise ValueError(f"--vocabulary={source!r} is not a file; pass a text file with one line of class names per "
                         "class (synonyms 'a, b, c')")
    vocabulary = read_class_names(source)
    if len(vocabulary) != space.num_classes:
        raise ValueError(f"the vocabulary {source} has {len(vocabulary)} classes (lines) but {space.name} scores "
                         f"{space.num_classes}; it needs one line per class, in the label space's order")
    threshold = cfg.background_threshold
    if threshold is None:
        threshold = bench.background_threshold if bench is not None else 0.0
    if threshold > 0 and space.background is None:
        raise ValueError(f"--background_threshold={threshold}: {space.name} has no background class (class 0 is "
                         f"{space.class_names[0]!r}), so nothing can fall back to it; leave it unset or 0")
    if space.background not in (None, 0):
        raise ValueError(f"{space.name}: the background class must be class 0 (the open-vocabulary methods "
                         f"write 0 for it), got {space.background}")
    clip = load_clip(resolve_clip_checkpoint(cfg))
    side = cfg.clip_resolution or (bench.clip_resolution if bench is not None else 336)
    side = max(clip.patch_size, side // clip.patch_size * clip.patch_size)
    cache = os.path.join(default_cache_dir(), "text_classifiers")
    classifier = text_classifier(clip, vocabulary, TEMPLATE_SETS[cfg.templates], cache_dir=cache)
    return OpenVocab(bench, space, vocabulary, os.path.abspath(source), space.background, float(threshold), clip,
                     classifier, side, DenseCLIPConfig(mode=cfg.dense_mode), cfg.label_with,
                     cfg.pamr_config if cfg.pamr else None, cfg.templates)
