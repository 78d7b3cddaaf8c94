"""Which backbone a run uses: SSD-1B from a checkpoint or the Hugging Face cache, or the weights-free handcrafted
one; and how its features are identified in the feature cache and in ``run_config.json``."""

from __future__ import annotations

import dataclasses

import hashlib
import os
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from spark_jax.backbones.diffusion import load_backbone, tap_info
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.models.taps import UnknownTapError
from spark_jax.runner.errors import BackboneNotFoundError

if TYPE_CHECKING:
    from spark_jax.runner.config import RunConfig

__all__ = [
    "SSD1B_REPO",
    "FeaturesOnly",
    "ResolvedBackbone",
    "as_resolved",
    "backbone_kind",
    "backbone_resolution",
    "digest",
    "find_cached_checkpoint",
    "has_taps",
    "image_digest",
    "resolve_backbone",
    "with_taps",
]

SSD1B_REPO = "segmind/SSD-1B"

_HOW_TO_GET_SSD1B = (
    "No SSD-1B checkpoint found: pass --checkpoint=/path/to/SSD-1B (a diffusers folder with unet/, vae/, "
    "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), or download it once into the "
    "Hugging Face cache with `huggingface-cli download segmind/SSD-1B` (about 9 GB; "
    "https://huggingface.co/segmind/SSD-1B). To run without weights use --backbone=handcrafted (a weights-free "
    "demo/CI backbone, NOT the paper's) or --dataset=demo."
)


class ResolvedBackbone(NamedTuple):
    """A loaded feature extractor and how its features are identified.

    Attributes:
            backbone: a backbone with taps (``feature_tap``, ``tap_names()``, ``tap_grid(name)``, ``extract(images,
            taps)`` and/or ``extract_prepared(prepared, taps)``, a ``resolution``: the diffusion and handcrafted
            backbones), or a feature extractor with ``extract_features(images [B, H, W, 3] uint8) -> [B, h, w,
            C]`` (and optionally ``extract_features_prepared``), which :func:`run` sees through
            :class:`FeaturesOnly`.
        key: identifies its features in the feature cache (backbone kind, checkpoint and settings).
        description: human-readable, recorded in ``metrics.json``.
        kind: ``ssd1b`` or ``handcrafted`` (selects the default SPARK preset).
    """

    backbone: Any
    key: str
    description: str
    kind: str = "user"


def find_cached_checkpoint(repo_id: str = SSD1B_REPO) -> str | None:
    """The newest local Hugging Face cache snapshot of ``repo_id`` holding a UNet, or None."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    snapshots = os.path.join(hub, "models--" + repo_id.replace("/", "--"), "snapshots")
    if not os.path.isdir(snapshots):
        return None
    cands = [os.path.join(snapshots, s) for s in os.listdir(snapshots)]
    cands = [c for c in cands if os.path.isdir(os.path.join(c, "unet"))]
    return max(cands, key=os.path.getmtime) if cands else None


def backbone_kind(cfg: RunConfig) -> tuple[str, str | None]:
    """``(kind, checkpoint)`` of the backbone ``cfg`` selects, without loading it: ``auto`` is SSD-1B from
    ``cfg.checkpoint`` or the Hugging Face cache, else the handcrafted backbone for the demo.

    Raises:
        BackboneNotFoundError: no checkpoint where one is needed; the message says how to get SSD-1B.
    """
    checkpoint, kind = cfg.checkpoint, cfg.backbone
    if kind == "handcrafted":
        return kind, checkpoint
    if checkpoint is None:
        checkpoint = find_cached_checkpoint()
    if kind == "auto":
        if checkpoint is None and cfg.dataset == "demo":
            return "handcrafted", None
        kind = "ssd1b"
    if checkpoint is None:
        raise BackboneNotFoundError(_HOW_TO_GET_SSD1B)
    return kind, checkpoint


def resolve_backbone(cfg: RunConfig, *, only_method_taps: bool = True) -> ResolvedBackbone:
    """Loads the backbone ``cfg`` selects (see :class:`RunConfig`); pass it to several :func:`run` calls to load
    a checkpoint once.

    With ``only_method_taps`` (the default) a diffusion backbone holds only the UNet parameters the selected
    method's taps need (``BackboneConfig.taps``: SPARK's feature tap needs the down blocks up to it, a third of
    SSD-1B's UNet); pass False to hold the whole UNet, e.g. to serve several methods (``compare``).

    Raises:
        BackboneNotFoundError: no checkpoint where one is needed; the message says how to get SSD-1B.
    """
    kind, checkpoint = backbone_kind(cfg)
    if kind == "handcrafted":
        hc = HandcraftedConfig(resolution=cfg.resolution or 256)
        key = "handcrafted-" + digest(repr(hc))
        return ResolvedBackbone(HandcraftedBackbone(hc), key, f"handcrafted (weights-free demo backbone), {hc}", kind)
    if not os.path.isdir(checkpoint):
        raise BackboneNotFoundError(f"--checkpoint={checkpoint!r} is not a folder. " + _HOW_TO_GET_SSD1B)
    bcfg = cfg.backbone_config(cfg.diffusion_setting("resolution"))  # the method's own where cfg gives none
    noise = "" if bcfg.noise_file is None else _file_digest(bcfg.noise_file)  # the draw, not just its path
    key = "diffusion-" + digest(os.path.abspath(checkpoint) + repr(bcfg) + noise)  # before `taps`: same features
    if only_method_taps:
        taps = cfg.spec.taps(cfg.resolved(kind).method_config, tap_info(checkpoint, bcfg))
        bcfg = dataclasses.replace(bcfg, taps=tuple(dict.fromkeys(taps)))
    return ResolvedBackbone(load_backbone(checkpoint, bcfg), key, f"diffusion backbone from {checkpoint}, {bcfg}",
                            kind)


def as_resolved(cfg: RunConfig, backbone: Any | None) -> ResolvedBackbone:
    """What :func:`run`'s ``backbone`` argument stands for: None (the one ``cfg`` selects, loaded now), a
    ResolvedBackbone, or a user's backbone or feature extractor (identified by its type and ``cfg`` attribute);
    its ``backbone`` is seen through the tap contract (:func:`with_taps`)."""
    if backbone is None:
        bb = resolve_backbone(cfg)
    elif isinstance(backbone, ResolvedBackbone):
        bb = backbone
    else:
        description = f"user-supplied {type(backbone).__name__}"
        key = "user-" + digest(description + repr(getattr(backbone, "cfg", "")))
        kind = "handcrafted" if isinstance(backbone, HandcraftedBackbone) else "user"
        bb = ResolvedBackbone(backbone, key, description, kind)
    return bb._replace(backbone=with_taps(bb.backbone))


def has_taps(backbone: Any) -> bool:
    """Whether ``backbone`` implements the tap contract (``feature_tap`` and ``extract`` or ``extract_prepared``)."""
    return hasattr(backbone, "feature_tap") and (hasattr(backbone, "extract") or hasattr(backbone, "extract_prepared"))


class FeaturesOnly:
    """A feature extractor without taps (only ``extract_features`` and maybe ``extract_features_prepared``) seen
    as a backbone with one tap, ``'features'`` ([B, h, w, C], its output as it is).

    Args:
        inner: the feature extractor.
    """

    feature_tap = "features"

    def __init__(self, inner: Any):
        if not hasattr(inner, "extract_features"):
            raise TypeError(f"a backbone needs extract(images, taps) or extract_features(images); "
                            f"{type(inner).__name__} has neither")
        self.inner = inner
        self.resolution = backbone_resolution(inner)
        if hasattr(inner, "extract_features_prepared"):
            self.extract_prepared = self._extract_prepared

    def tap_names(self) -> tuple[str, ...]:
        return (self.feature_tap,)

    def _check(self, taps) -> None:
        for tap in taps:
            if tap != self.feature_tap:
                raise UnknownTapError(
                    f"tap {tap!r} is not available from {type(self.inner).__name__}: a feature extractor without "
                    f"taps (extract_features only) provides its features alone, as tap {self.feature_tap!r}. "
                    "Taps come from backbones with extract(images, taps): the diffusion backbone "
                    "(spark_jax.backbones.diffusion) and the handcrafted one (spark_jax.backbones.handcrafted)."
                )

    def extract(self, images, taps) -> dict[str, Any]:
        self._check(taps)
        return {self.feature_tap: self.inner.extract_features(images)}

    def _extract_prepared(self, prepared, taps) -> dict[str, Any]:
        self._check(taps)
        return {self.feature_tap: self.inner.extract_features_prepared(prepared)}


def with_taps(backbone: Any) -> Any:
    """``backbone`` if it implements the tap contract, else its :class:`FeaturesOnly` view."""
    return backbone if has_taps(backbone) else FeaturesOnly(backbone)


def backbone_resolution(backbone: Any) -> int:
    """The side of the images a backbone takes."""
    if hasattr(backbone, "resolution"):
        return int(backbone.resolution)
    return int(backbone.cfg.resolution)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()[:12]
    except OSError:
        return "unreadable"  # load_backbone names the problem


def image_digest(image: np.ndarray) -> str:
    """A digest of an image's shape and pixels (a changed file never reuses stale features)."""
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:12]
