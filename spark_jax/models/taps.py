"""Taps: named intermediates of the UNet forward, requested by name.

Grammar
-------
A tap name is ``<module path>:<quantity>``. The module path is the module's diffusers path, i.e. its
parameter-name prefix (``down_blocks.2.attentions.1.transformer_blocks.3.attn1``); the quantity says which value
of that module. ``UNetConfig.tap_names()`` lists every valid name of a model in forward order.

Shapes (``B`` batch, ``h x w`` the module's token grid — ``UNetConfig.tap_grid(name, latent_hw)`` —,
``N = h * w`` tokens flattened row-major, ``C`` the module's channels, ``L`` text tokens, ``heads`` and
``d = C / heads`` the attention's heads and head width; dtypes are the UNet's compute dtype unless noted):

========================================================  =======================  =====================================
tap                                                       shape                    value
========================================================  =======================  =====================================
``<attn>:q``                                              [B, heads, N, d]         ``to_q`` output, unscaled
``<attn>:k``, ``<attn>:v``                                [B, heads, M, d]         ``to_k`` / ``to_v`` outputs (attn1:
                                                                                   M = N; attn2: M = L, the text tokens)
``<attn>:probs``                                          [B, heads, N, M] f32     softmax(q k^T / sqrt(d)) per head
``<attn>:probs_mean``                                     [B, N, M] f32            mean over heads of ``probs``,
                                                                                   accumulated head by head (one head's
                                                                                   [B, N, M] at a time)
``<attn>:output``                                         [B, N, C]                after ``to_out``, before the residual
                                                                                   (SPARK's and DiffCut's feature point
                                                                                   for the right attn1)
``....transformer_blocks.<k>:output``                     [B, N, C]                the block's tokens after its residuals
``....attentions.<j>:output`` (Transformer2DModel)        [B, h, w, C]             after ``proj_out`` and the residual
``....resnets.<j>:output``                                [B, h, w, C]             the ResnetBlock2D's output
``down_blocks.<i>.downsamplers.0:output``                 [B, h/2, w/2, C]         (ceil for odd sides)
``up_blocks.<i>.upsamplers.0:output``                     [B, 2h, 2w, C]           (or the skip's size)
``down_blocks.<i>:output``, ``mid_block:output``,          [B, h, w, C]             the block's output map
``up_blocks.<i>:output``
``conv_in:output``                                        [B, h, w, C0]            the latent after conv_in
``conv_out:output``                                       [B, h, w, out_channels]  the UNet's output, the noise
                                                                                   prediction
========================================================  =======================  =====================================

``<attn>`` is ``<block>.attentions.<j>.transformer_blocks.<k>.attn1`` (self-attention) or ``...attn2``
(cross-attention over the text tokens), with ``<block>`` one of ``down_blocks.<i>``, ``mid_block``,
``up_blocks.<i>``.

Mechanics
---------
- Module names: ``name_modules(root)`` walks the built module tree once (``nnx.iter_modules``) and stores each
  tap-aware module's path in its ``tap_path`` attribute (a static string in the graphdef); nothing threads names
  through the constructors, and the names cannot drift from the parameter paths the checkpoint key map uses.
- Recording: the forward creates one ``TapRecorder`` per call (a plain Python object living only while the
  function is traced, never a pytree) and passes it down; modules ask ``wants(path, quantity)`` before computing
  anything optional (``probs``, ``probs_mean``, transposed ``q``/``k``/``v``) and ``record`` their values.
- Early stop: once every requested tap is recorded, ``record`` raises ``_AllTapsRecorded`` and the model's
  ``__call__`` returns what was recorded. Nothing after the last requested tap is traced, so it is neither
  compiled nor run.
- Validation: ``check_taps`` raises ``UnknownTapError`` naming the bad tap and the closest valid names before
  anything is computed.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import jax
from flax import nnx

# Quantities of attention modules (attn1 / attn2), in the order they are recorded.
ATTENTION_QUANTITIES = ("q", "k", "v", "probs", "probs_mean", "output")
# Every other tap-aware module has one quantity.
BLOCK_QUANTITIES = ("output",)
PROBS_QUANTITIES = ("probs", "probs_mean")


class UnknownTapError(ValueError):
    """A requested tap name is not a tap of this model."""


class _AllTapsRecorded(Exception):
    """Raised by ``TapRecorder.record`` when the last requested tap is recorded: the forward stops there.

    Private control flow: the model's ``__call__`` catches it; it never reaches a caller.
    """


def parse_tap(name: str) -> tuple[str, str]:
    """``"down_blocks.1.attentions.0.transformer_blocks.0.attn1:q"`` -> (module path, quantity).

    Raises:
      UnknownTapError: if ``name`` is not ``<module path>:<quantity>`` with both parts non-empty.
    """
    if not isinstance(name, str):
        raise UnknownTapError(f"tap names are strings like 'conv_out:output', got {name!r} ({type(name).__name__})")
    path, sep, quantity = name.rpartition(":")
    if not sep or not path or not quantity:
        raise UnknownTapError(
            f"tap {name!r} is not '<module path>:<quantity>' (e.g. 'up_blocks.1:output', "
            "'down_blocks.2.attentions.1.transformer_blocks.3.attn1:output')"
        )
    return path, quantity


_UNET_TAPS_HINT = "Tap names are '<diffusers module path>:<quantity>'; UNetConfig.tap_names() lists all of them"


def check_taps(requested: Iterable[str], valid: Sequence[str], hint: str = _UNET_TAPS_HINT) -> tuple[str, ...]:
    """Validates requested tap names against a model's ``valid`` names; returns them deduplicated, in order.

    Args:
      requested: the tap names asked for.
      valid: every tap name of the model, in forward order.
      hint: what an unknown-tap error adds after the closest valid names (where the valid names come from).

    Raises:
      UnknownTapError: naming the first unknown tap and the closest valid names.
      ValueError: if nothing is requested.
    """
    if isinstance(requested, str):
        raise UnknownTapError(f"taps must be a sequence of names, got the single string {requested!r}: pass ({requested!r},)")
    names = tuple(dict.fromkeys(requested))
    if not names:
        example = valid[-1] if len(valid) else "conv_out:output"
        raise ValueError(f"no taps requested: name at least one, e.g. taps=({example!r},)")
    valid_set = frozenset(valid)
    for name in names:
        if name in valid_set:
            continue
        parse_tap(name)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
        closest = f"closest valid names: {', '.join(close)}" if close else "no valid name is close"
        raise UnknownTapError(f"unknown tap {name!r} ({closest}). {hint}")
    return names


class TapRecorder:
    """Collects the requested taps during one trace of the forward (a plain object, not a pytree).

    Attributes:
      requested: the requested names.
      values: ``{name: array}`` recorded so far, in forward order.
    """

    def __init__(self, requested: Iterable[str]):
        self.requested = frozenset(requested)
        self._modules = frozenset(parse_tap(n)[0] for n in self.requested)
        self.values: dict[str, jax.Array] = {}

    def wants(self, path: str, quantity: str) -> bool:
        """Whether ``path:quantity`` is requested (ask before computing anything only a tap needs)."""
        return path in self._modules and f"{path}:{quantity}" in self.requested

    def wants_any(self, path: str, quantities: Iterable[str]) -> bool:
        return path in self._modules and any(f"{path}:{q}" in self.requested for q in quantities)

    def record(self, path: str, quantity: str, value: jax.Array) -> None:
        """Stores ``value`` if requested; raises ``_AllTapsRecorded`` once every requested tap is stored."""
        name = f"{path}:{quantity}"
        if name not in self.requested:
            return
        self.values[name] = value
        if len(self.values) == len(self.requested):
            raise _AllTapsRecorded


# The recorder of forwards that record nothing (the VAE, blocks called on their own).
NO_TAPS = TapRecorder(())


class Tapped:
    """Mixin of tap-aware modules: ``tap_path`` is the module's diffusers path once ``name_modules`` ran."""

    tap_path: str = ""


def name_modules(root: nnx.Module) -> None:
    """Stores every tap-aware submodule's path (its diffusers parameter prefix) in its ``tap_path``."""
    for path, module in nnx.iter_modules(root):
        if isinstance(module, Tapped) and path:
            module.tap_path = ".".join(str(p) for p in path)
