"""The method registry: what the runner, the command line, the comparison and the benchmarks know of a method.

A method is one :class:`MethodSpec`, declared by the method's own module and registered by one line of
``spark_jax/methods/__init__.py`` (or by a user, with :func:`register`). Everything else is driven by the specs:
``experiments.run``'s ``--method`` and its flags (generated from ``config_type`` with ``flag_prefix``),
``experiments.compare``'s rows, ``metrics.json``'s diagnostics, and the resume check (the run records only the
selected method's configuration).

A method's jitted function maps a batch's :class:`MethodInputs` and its hyperparameters (a pytree: numeric leaves
are traced, so a sweep over them compiles once; structural fields are static metadata) to label maps at the mask
size and per-image diagnostics::

    (MethodInputs, params) -> (labels int32 [B, m, m], {diagnostic name: [B] numeric})
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from spark_jax.masks.upsample import concept_assignment

__all__ = [
    "DIFFUSION_DEFAULT_FIELDS",
    "REGISTRY",
    "UPSAMPLINGS",
    "Method",
    "MethodContext",
    "MethodInputs",
    "MethodSpec",
    "Variant",
    "add_listener",
    "concept_masks",
    "feature_tap_only",
    "jitted_method",
    "method_spec",
    "register",
    "unregister",
]

# Token labels -> masks: SPARK's bilinear upsampling of its soft labels, or DiffCut's concept assignment.
UPSAMPLINGS = ("soft_labels", "concept")
# The RunConfig fields of the diffusion backbone a method's spec may default (MethodSpec.diffusion_defaults).
DIFFUSION_DEFAULT_FIELDS = ("resolution", "timestep", "noise_source")


class MethodInputs(NamedTuple):
    """What a method sees of one batch (leading axis B; all device arrays, static shapes).

    Attributes:
        features: float [B, h, w, C], the backbone's feature tap (``backbone.feature_tap``: SPARK's and DiffCut's
            attn1 output) on its token grid.
        taps: every tap the method's spec asked for, by name, in the backbone's layout: attention outputs
            [B, N, C], q/k/v [B, heads, N, d], probs [B, heads, N, M], probs_mean [B, N, M], block outputs
            [B, h, w, C] (:mod:`spark_jax.models.taps`). Holds the feature tap too.
        images: float32 [B, S, S, 3], the prepared backbone inputs in [0, 1].
        num_classes: int32 [B], K*: the number of classes present in the image's label map as the protocol
            scores it (:func:`spark_jax.runner.classes_present`); 0 for an unlabelled image. Only oracle
            baselines read it.
        index: int32 [B], each image's position in the dataset (seeds per-image randomness, so results do not
            depend on batching or resuming).
        class_probs: float32 [B, hc, wc, K] or None: CLIP's per-patch probabilities of the run's K vocabulary classes
            on CLIP's patch grid (open-vocabulary runs, ``--protocol=open_vocab``; None otherwise). Methods whose spec
            sets ``open_vocab`` read it and return class ids in [0, K) instead of segment ids.
    """

    features: jax.Array
    taps: Mapping[str, jax.Array]
    images: jax.Array
    num_classes: jax.Array
    index: jax.Array
    class_probs: jax.Array | None = None


class MethodContext(NamedTuple):
    """The static facts a method is built for (hashable: the runner jits once per context).

    Attributes:
        mask_size: side of the label maps the method returns.
        upsampling: one of the spec's ``upsamplings``.
        feature_tap: the backbone's feature tap (``MethodInputs.features``), from which a method derives the names
            of other taps of the same module.
        background_threshold: open-vocabulary runs: a pixel whose largest class probability is below it becomes
            class 0 (the background class of V21 / PC60 / COCO-Object, as NACLIP's ``prob_thd``); 0: off. Only
            methods whose spec sets ``open_vocab`` read it.
    """

    mask_size: int
    upsampling: str
    feature_tap: str
    background_threshold: float = 0.0


Method = Callable[[MethodInputs, Any], tuple[jax.Array, dict[str, jax.Array]]]


class Variant(NamedTuple):
    """A named variant of a method for the comparison (e.g. SPARK with the global affinity only).

    Attributes:
        title: its row title.
        change: resolved method config -> the variant's config.
    """

    title: str
    change: Callable[[Any], Any]


def feature_tap_only(config: Any, backbone: Any) -> tuple[str, ...]:
    """The taps of a method that reads only the backbone's features."""
    del config
    return (backbone.feature_tap,)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything the runner, the flags and the comparison need to know of one method.

    Attributes:
        name: the ``--method`` value (a Python identifier).
        title: its row title in tables.
        config_type: its configuration, a frozen dataclass (the flags are generated from its fields; a field
            whose type is itself a dataclass, or one or None, is flattened under the same prefix).
        flag_prefix: prefix of its flags, ending in ``_`` (``spark_``, ``ncut_``, ...).
        build: ``MethodContext -> Method``; the runner jits the result once per process for each context.
        params: ``(resolved config, MethodContext, token grid (h, w)) -> params pytree``, on the host; raises
            ValueError on settings that cannot work on that grid.
        diagnostics: the names of the diagnostics the method returns (what ``metrics.json`` averages).
        taps: ``(resolved config, backbone) -> tap names`` the method reads (the backbone's feature tap among
            them); the runner extracts and caches exactly these.
        upsampling: its default upsampling; ``upsamplings``: those it supports.
        default_config: ``() -> config`` when ``config_type()`` is not the default.
        resolve: ``(config or None, backbone kind) -> concrete config`` (e.g. SPARK's preset for the backbone);
            None: the given config, else the default.
        check: host-side validation of a config's values (ValueError naming the field), run by ``RunConfig``.
        row_title: ``resolved config -> title`` when the title depends on the config (K-means' K).
        variants: extra comparison rows, ``{row name: Variant}``.
        metrics: ``resolved config -> extra top-level metrics.json entries`` (SPARK's ``spark_preset``).
        source: the module documenting the config, named in the flags' help.
        diffusion_defaults: the diffusion backbone's settings of the method's published setup, by
            :class:`~spark_jax.runner.RunConfig` field (keys among :data:`DIFFUSION_DEFAULT_FIELDS`; DiffSeg:
            ``{"resolution": 512, "timestep": 300, "noise_source": "none"}``). A run uses them where its config
            leaves the field unset (None); an explicit value (a flag) wins. The handcrafted backbone ignores them.
        cache_taps: whether the runner's feature cache stores this method's taps. False for taps too large to keep
            per image (DiffSeg's 16 attention maps: ~341 MB per image at 512 px); the backbone then runs every time.
        open_vocab: the method labels tokens with class *names* (NERVE): it reads ``MethodInputs.class_probs`` and
            returns class ids of the run's vocabulary, so it runs only under the open-vocabulary protocol, with a
            CLIP checkpoint. False: it returns segment ids (the unsupervised protocols; ``--label_with=clip`` names
            its segments afterwards).
    """

    name: str
    title: str
    config_type: type
    flag_prefix: str
    build: Callable[[MethodContext], Method]
    params: Callable[[Any, MethodContext, tuple[int, int]], Any]
    diagnostics: tuple[str, ...]
    taps: Callable[[Any, Any], tuple[str, ...]] = feature_tap_only
    upsampling: str = "concept"
    upsamplings: tuple[str, ...] = ("concept",)
    default_config: Callable[[], Any] | None = None
    resolve: Callable[[Any, str], Any] | None = None
    check: Callable[[Any], None] | None = None
    row_title: Callable[[Any], str] | None = None
    variants: Mapping[str, Variant] = dataclasses.field(default_factory=dict)
    metrics: Callable[[Any], dict[str, Any]] | None = None
    source: str = ""
    diffusion_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cache_taps: bool = True
    open_vocab: bool = False

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"a method's name must be a Python identifier (it is a flag value), got {self.name!r}")
        if not (isinstance(self.flag_prefix, str) and self.flag_prefix.endswith("_")
                and self.flag_prefix[:-1].isidentifier()):
            raise ValueError(f"method {self.name!r}: flag_prefix must be an identifier ending in '_', e.g. "
                             f"'{self.name}_', got {self.flag_prefix!r}")
        if not (dataclasses.is_dataclass(self.config_type) and isinstance(self.config_type, type)):
            raise TypeError(f"method {self.name!r}: config_type must be a dataclass, got {self.config_type!r}")
        bad = [u for u in (self.upsampling, *self.upsamplings) if u not in UPSAMPLINGS]
        if bad or self.upsampling not in self.upsamplings:
            raise ValueError(f"method {self.name!r}: upsamplings must be among {UPSAMPLINGS} and hold the default "
                             f"upsampling, got {self.upsamplings!r} and {self.upsampling!r}")
        bad = sorted(set(self.diffusion_defaults) - set(DIFFUSION_DEFAULT_FIELDS))
        if bad:
            raise ValueError(f"method {self.name!r}: diffusion_defaults may set {DIFFUSION_DEFAULT_FIELDS}, got "
                             f"{bad}")
        if not self.diagnostics or not all(isinstance(d, str) for d in self.diagnostics):
            raise ValueError(f"method {self.name!r}: diagnostics must name the diagnostics its method returns")

    def default(self) -> Any:
        """The default configuration."""
        return self.default_config() if self.default_config is not None else self.config_type()

    def validate(self, config: Any) -> None:
        """Raises TypeError unless ``config`` is a ``config_type``, ValueError on a bad value (``check``)."""
        if not isinstance(config, self.config_type):
            raise TypeError(f"method {self.name!r} takes a {self.config_type.__name__} as its config, got "
                            f"{type(config).__name__}")
        if self.check is not None:
            self.check(config)

    def resolve_config(self, config: Any | None, kind: str) -> Any:
        """The concrete configuration of a run on a backbone of ``kind`` (None: the default or preset)."""
        if self.resolve is not None:
            return self.resolve(config, kind)
        return self.default() if config is None else config

    def title_for(self, config: Any) -> str:
        return self.row_title(config) if self.row_title is not None else self.title


REGISTRY: dict[str, MethodSpec] = {}
_LISTENERS: list[Callable[[str, MethodSpec], None]] = []


def register(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Adds a method to :data:`REGISTRY` (``replace``: over one of the same name); returns it.

    Listeners (:func:`add_listener`, e.g. ``experiments.run_flags``, which defines the method's flags) are told.
    """
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register expects a MethodSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"a method named {spec.name!r} is already registered; pass replace=True to replace it")
    clash = [s.name for s in REGISTRY.values() if s.flag_prefix == spec.flag_prefix and s.name != spec.name]
    if clash:
        raise ValueError(f"method {spec.name!r}: flag prefix {spec.flag_prefix!r} is already {clash[0]!r}'s")
    if spec.name in REGISTRY:
        unregister(spec.name)
    REGISTRY[spec.name] = spec
    jitted_method.cache_clear()
    for listener in _LISTENERS:
        listener("register", spec)
    return spec


def unregister(name: str) -> MethodSpec:
    """Removes a method (e.g. a test's); listeners are told."""
    spec = method_spec(name)
    del REGISTRY[name]
    jitted_method.cache_clear()
    for listener in _LISTENERS:
        listener("unregister", spec)
    return spec


def add_listener(listener: Callable[[str, MethodSpec], None]) -> None:
    """Calls ``listener('register' | 'unregister', spec)`` on every later change of the registry."""
    _LISTENERS.append(listener)


def method_spec(name: str) -> MethodSpec:
    """The registered spec of ``name``; ValueError listing the methods if there is none."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available: {sorted(REGISTRY)}") from None


@functools.lru_cache(maxsize=64)
def jitted_method(name: str, ctx: MethodContext) -> Callable:
    """The registered method ``name`` built for ``ctx`` and jitted, once per process: runs that differ in
    hyperparameters, PAMR, dataset or output share its compilations (hyperparameters are traced arguments)."""
    return jax.jit(method_spec(name).build(ctx))


def concept_masks(features: jax.Array, token_labels: jax.Array, num_labels: int, mask_size: int) -> jax.Array:
    """DiffCut's concept assignment (Sec. 3.3) of token labels [B, h, w] in [0, num_labels) to masks [B, m, m],
    from the features [B, h, w, C]."""
    assign = functools.partial(concept_assignment, num_labels=num_labels, size=(mask_size, mask_size))
    return jax.vmap(assign)(features, token_labels)
