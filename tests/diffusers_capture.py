"""The diffusers side of the tap parity tests: the same named intermediates, captured from PyTorch.

Not a test module. A tap name is a diffusers module path (``unet.named_modules()``), ``:`` and a
quantity, exactly as spark_jax.models names its taps:

- attention modules (``...transformer_blocks.j.attn1`` / ``attn2``): ``output`` ``[B, N, C]`` (after
  to_out, before the residual the transformer block adds), ``q``, ``k``, ``v`` ``[B, heads, N, d]``
  (after to_q / to_k / to_v, unscaled), ``probs`` ``[B, heads, N, M]`` (softmax(q k^T / sqrt(d)); M is
  N for attn1 and the number of text tokens for attn2) and ``probs_mean`` ``[B, N, M]`` (mean over heads);
- any other module: ``output``, its forward's result with NCHW maps turned NHWC (``[B, h, w, C]``);
  a block that returns a tuple (the down blocks return ``(hidden_states, skip_states)``) gives its
  first element. ``...attn1.to_q:output`` is q before the head split, ``[B, N, heads * d]``.

Attention quantities are recorded by :class:`RecordingAttnProcessor`, which computes what diffusers'
``AttnProcessor`` computes by calling the Attention module's own steps in the same order (to_q, to_k,
to_v, head_to_batch_dim, get_attention_scores, which applies upcast_attention / upcast_softmax and
the scale, bmm with v, batch_to_head_dim, to_out); everything else by forward hooks. Both are removed
and the UNet's own processors put back when :func:`capture` returns.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers.models.attention_processor import Attention

ATTENTION_QUANTITIES = ("output", "q", "k", "v", "probs", "probs_mean")
MODULE_QUANTITIES = ("output",)


class UnknownCaptureTap(ValueError):
    """A requested name is not ``<diffusers module path>:<quantity>`` of this UNet."""


def split_tap(name: str) -> tuple[str, str]:
    """``"down_blocks.1.attentions.0.transformer_blocks.0.attn1:probs"`` -> (module path, quantity)."""
    path, sep, quantity = name.rpartition(":")
    if not sep or not path or not quantity:
        raise UnknownCaptureTap(f"tap {name!r} is not '<module path>:<quantity>' (e.g. 'mid_block:output')")
    return path, quantity


def _check_names(unet: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The modules the names refer to, by path; an unknown path or quantity is named with the fix."""
    modules = dict(unet.named_modules())
    wanted = {}
    for name in names:
        path, quantity = split_tap(name)
        if path not in modules:
            close = difflib.get_close_matches(path, modules, n=3)
            raise UnknownCaptureTap(f"tap {name!r}: the UNet has no module {path!r} (closest: {close})")
        valid = ATTENTION_QUANTITIES if isinstance(modules[path], Attention) else MODULE_QUANTITIES
        if quantity not in valid:
            raise UnknownCaptureTap(
                f"tap {name!r}: {type(modules[path]).__name__} {path!r} has no quantity {quantity!r} "
                f"(valid: {', '.join(valid)})"
            )
        wanted[path] = modules[path]
    return wanted


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).cpu().numpy()


def _module_output(out) -> np.ndarray:
    """A forward's result as numpy: first element of a tuple, ``.sample`` of an output object, NCHW -> NHWC."""
    if isinstance(out, tuple):
        out = out[0]
    if hasattr(out, "sample"):
        out = out.sample
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot record a module output of type {type(out).__name__}")
    return _as_numpy(out.permute(0, 2, 3, 1) if out.ndim == 4 else out)


class RecordingAttnProcessor:
    """diffusers' ``AttnProcessor`` computation through the module's own steps, recording one module's taps.

    Args:
        path: the Attention module's path (the tap-name prefix).
        quantities: which of ATTENTION_QUANTITIES to record (may be empty: then it only computes).
        store: dict the taps are written into, keyed ``f"{path}:{quantity}"``.
    """

    def __init__(self, path: str, quantities: frozenset[str], store: dict[str, np.ndarray]):
        self.path, self.quantities, self.store = path, quantities, store

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The branches of AttnProcessor that UNet2DConditionModel's transformer blocks never take are
        # refused rather than reimplemented: the oracle covers exactly what the taps are compared on.
        unsupported = {
            "an attention mask": attention_mask is not None,
            "spatial_norm": attn.spatial_norm is not None,
            "group_norm": attn.group_norm is not None,
            "norm_cross": bool(attn.norm_cross),
            "residual_connection": bool(attn.residual_connection),
            "rescale_output_factor != 1": attn.rescale_output_factor != 1.0,
            "4-D hidden states": hidden_states.ndim != 3,
        }
        used = [what for what, present in unsupported.items() if present]
        if used:
            raise NotImplementedError(f"{self.path}: RecordingAttnProcessor does not handle {', '.join(used)}")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        # head_to_batch_dim's layout is [B * heads, tokens, d], batch-major: a reshape gives [B, heads, ...].
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # [B * heads, N, M]
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))  # to_out[1] is dropout (identity in eval)

        per_head = (hidden_states.shape[0], attn.heads)
        values = {"q": q, "k": k, "v": v, "probs": probs}
        for quantity in self.quantities:
            if quantity == "output":
                value = out
            elif quantity == "probs_mean":
                value = probs.reshape(*per_head, *probs.shape[1:]).float().mean(1)
            else:
                value = values[quantity].reshape(*per_head, *values[quantity].shape[1:])
            self.store[f"{self.path}:{quantity}"] = _as_numpy(value)
        return out


def capture(
    unet: torch.nn.Module,
    sample: np.ndarray,
    t: int | float | np.ndarray,
    context: np.ndarray,
    added_cond_kwargs: Mapping[str, np.ndarray] | None = None,
    *,
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Runs ``unet`` once and returns the named taps (float32 numpy, layouts in the module docstring).

    Args:
        unet: a ``diffusers.UNet2DConditionModel`` (left with its own processors and no hooks after).
        sample: ``[B, C, H, W]`` latents (torch's NCHW layout).
        t: the timestep, a number or a ``[B]`` array.
        context: ``[B, T, D]`` encoder hidden states.
        added_cond_kwargs: for ``text_time`` models, ``{"text_embeds": [B, E], "time_ids": [B, 6]}``.
        names: the taps, ``"<module path>:<quantity>"``.

    Raises:
        UnknownCaptureTap: a name whose module path or quantity this UNet does not have.
    """
    modules = _check_names(unet, names)
    per_module: dict[str, set[str]] = {}
    for name in names:
        path, quantity = split_tap(name)
        per_module.setdefault(path, set()).add(quantity)
    store: dict[str, np.ndarray] = {}
    saved = unet.attn_processors
    recording = {}
    for key in saved:  # keys are f"{module path}.processor"; every Attention gets one (set_attn_processor's rule)
        path = key.removesuffix(".processor")
        recording[key] = RecordingAttnProcessor(path, frozenset(per_module.get(path, ())), store)

    def record_output(path: str):
        return lambda _module, _inputs, out: store.__setitem__(f"{path}:output", _module_output(out))

    hooks = [
        module.register_forward_hook(record_output(path))
        for path, module in modules.items()
        if not isinstance(module, Attention)
    ]
    kwargs = {}
    if added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = {k: torch.as_tensor(np.asarray(v)) for k, v in added_cond_kwargs.items()}
    unet.set_attn_processor(recording)
    try:
        with torch.no_grad():
            unet(
                torch.as_tensor(np.asarray(sample)), torch.as_tensor(np.asarray(t)),
                encoder_hidden_states=torch.as_tensor(np.asarray(context)), **kwargs,
            )
    finally:
        for hook in hooks:
            hook.remove()
        unet.set_attn_processor(dict(saved))
    missing = sorted(set(names) - set(store))
    if missing:  # a module the forward never reached (e.g. a path of an unused branch)
        raise UnknownCaptureTap(f"taps {missing} were not reached by the UNet's forward")
    return {name: store[name] for name in names}
