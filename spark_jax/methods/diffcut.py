"""DiffCut (Couairon et al. 2024) as a method of the runner: the backbone's features -> recursive Normalized Cut
(:func:`spark_jax.graph.ncut.recursive_ncut_batch`, DiffCut Sec. 3.2, Algorithm 1) -> concept assignment of the
token segments to the mask size (Sec. 3.3). The algorithm lives in :mod:`spark_jax.graph.ncut`; this module is the
glue the registry needs (``--method=diffcut``, flags ``--ncut_<field>``)."""

from __future__ import annotations

from spark_jax.graph.ncut import NCutConfig, recursive_ncut_batch
from spark_jax.methods.registry import MethodContext, MethodInputs, MethodSpec, concept_masks

__all__ = ["SPEC"]


def _build(ctx: MethodContext):
    def method(inputs: MethodInputs, ncfg: NCutConfig):
        res = recursive_ncut_batch(inputs.features, ncfg)  # image by image: see its docstring
        _, h, w, _ = inputs.features.shape
        bound = h * w if ncfg.max_segments is None else min(ncfg.max_segments, h * w)  # labels lie in [0, bound)
        labels = concept_masks(inputs.features, res.labels, bound, ctx.mask_size)
        diag = {
            "num_segments": res.num_segments,
            "num_labels": res.num_labels,  # below num_segments only when segment_codes='float32' collides
            "num_eigensolves": res.num_eigensolves,
            "truncated": res.truncated,
            "num_nonfinite_tokens": res.num_nonfinite_tokens,
        }
        return labels, diag

    return method


def _params(cfg: NCutConfig, ctx: MethodContext, grid: tuple[int, int]) -> NCutConfig:
    del ctx, grid
    cfg.check_values()
    return cfg


SPEC = MethodSpec(
    name="diffcut",
    title="DiffCut (recursive NCut)",
    config_type=NCutConfig,
    flag_prefix="ncut_",
    build=_build,
    params=_params,
    diagnostics=("num_segments", "num_labels", "num_eigensolves", "truncated", "num_nonfinite_tokens"),
    check=NCutConfig.check_values,
    source="spark_jax/graph/ncut.py",
)
