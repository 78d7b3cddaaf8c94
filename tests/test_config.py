"""SparkConfig: the paper's defaults, validation, and its behaviour as a JAX pytree."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import SparkConfig
from spark_jax import config as config_module

# The numeric fields: pytree leaves (traced, vmappable). Everything else is static metadata.
NUMERIC_FIELDS = {
    "beta", "inflation", "prune_threshold", "sharpen", "local_eps", "mcl_tol", "gamma", "propagation_tol",
    "sharpen_target", "sparse_switch_mass", "sparse_rank_tol", "sparse_recovery_mass",
}


def test_defaults_are_the_papers():
    cfg = SparkConfig()
    assert (cfg.beta, cfg.expansion, cfg.inflation, cfg.prune_threshold) == (0.6, 2, 2.6, 1e-7)
    assert cfg.global_mode == "cosine" and cfg.negatives == "clip" and cfg.sharpen == 1.0
    assert cfg.use_local
    assert cfg.mcl_norm == "inf"  # ||.||_inf of a matrix (Eq. 8): the largest absolute row sum
    cfg.check_values()


def test_config_is_frozen_and_hashable():
    cfg = SparkConfig()
    with pytest.raises(AttributeError):
        cfg.beta = 0.5  # type: ignore[misc]
    assert hash(cfg) == hash(SparkConfig())
    assert cfg.replace(beta=0.3).beta == 0.3


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(global_mode="dot"), "global_mode"),
        (dict(negatives="abs"), "negatives"),
        (dict(propagation="power"), "propagation"),
        (dict(expansion=0), "expansion"),
        (dict(expansion=2.0), "expansion"),
        (dict(expansion=True), "expansion"),
        (dict(mcl_max_iter=0), "mcl_max_iter"),
        (dict(propagation_max_iter=1.5), "propagation_max_iter"),
        (dict(max_clusters=0), "max_clusters"),
        (dict(matmul_precision="fast"), "matmul_precision"),
        (dict(mcl_norm="l2"), "mcl_norm"),
        (dict(use_local="yes"), "use_local"),
    ],
)
def test_bad_static_options_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        SparkConfig(**changes)


def test_every_numeric_field_has_an_allowed_range():
    assert set(config_module._RANGES) == NUMERIC_FIELDS


# One case per bound: (field, bad value, the interval the message must name).
BAD_VALUES = [
    ("beta", -0.1, r"\[0, 1\]"),
    ("beta", 1.5, r"\[0, 1\]"),
    ("inflation", 1.0, r"\(1, inf\)"),  # the paper requires r > 1
    ("inflation", 0.5, r"\(1, inf\)"),
    ("inflation", float("inf"), r"\(1, inf\)"),
    ("prune_threshold", -1e-9, r"\[0, 1\)"),
    ("prune_threshold", 1.0, r"\[0, 1\)"),
    ("sharpen", 0.0, r"\(0, inf\)"),
    ("sharpen_target", 0.0, r"\(0, 1\]"),
    ("sharpen_target", 1.5, r"\(0, 1\]"),
    ("local_eps", 0.0, r"\(0, inf\)"),  # the paper: eps > 0
    ("mcl_tol", 0.0, r"\(0, inf\)"),
    ("mcl_tol", -1e-6, r"\(0, inf\)"),
    ("gamma", 0.0, r"\(0, 1\)"),
    ("gamma", 1.0, r"\(0, 1\)"),
    ("propagation_tol", 0.0, r"\(0, inf\)"),
    ("sparse_switch_mass", 1.0, r"\[0, 1\)"),
    ("sparse_recovery_mass", 0.0, r"\(0, 1\]"),
    ("beta", float("nan"), r"\[0, 1\]"),
]


@pytest.mark.parametrize("field, value, interval", BAD_VALUES)
def test_check_values_names_the_field_the_value_and_the_range(field, value, interval):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is outside {interval}"):
        SparkConfig(**{field: value}).check_values()


@pytest.mark.parametrize(
    "field, value",
    [("beta", 0.0), ("beta", 1.0), ("prune_threshold", 0.0), ("inflation", 1.01), ("sharpen_target", 1.0)],
)
def test_check_values_accepts_the_closed_ends(field, value):
    SparkConfig(**{field: value}).check_values()


def test_check_values_reports_every_bad_field_at_once():
    with pytest.raises(ValueError, match=r"beta=2\.0 .*; gamma=1\.0 "):
        SparkConfig(beta=2.0, gamma=1.0).check_values()


def test_check_values_rejects_non_numbers():
    with pytest.raises(ValueError, match=r"beta='high' is not a real number"):
        SparkConfig(beta="high").check_values()


def test_check_values_checks_a_grid_elementwise_and_skips_tracers():
    with pytest.raises(ValueError, match="inflation="):
        SparkConfig(inflation=np.array([1.5, 0.8])).check_values()
    SparkConfig(inflation=jnp.array([1.5, 2.6])).check_values()

    @jax.jit
    def traced(cfg):
        cfg.check_values()  # leaves are tracers here: nothing to check, nothing raised
        return cfg.inflation

    assert float(traced(SparkConfig(inflation=2.0))) == 2.0


def test_numeric_fields_are_leaves_and_static_fields_are_not():
    paths = jax.tree_util.tree_flatten_with_path(SparkConfig())[0]
    assert {path[0].name for path, _ in paths} == NUMERIC_FIELDS
    static = {f.name for f in dataclasses.fields(SparkConfig)} - NUMERIC_FIELDS
    assert {"global_mode", "expansion", "mcl_max_iter", "mcl_norm", "max_clusters"} <= static


def test_changing_a_numeric_field_does_not_recompile(compilations):
    fn = jax.jit(lambda cfg: cfg.beta * cfg.inflation)
    fn(SparkConfig(beta=0.5))
    with compilations() as c:
        assert float(fn(SparkConfig(beta=0.25))) == pytest.approx(0.65)
    assert c.count == 0
    with compilations() as c:
        fn(SparkConfig(mcl_norm="max_abs"))  # a static field is part of the program
    assert c.count == 1


def test_config_vmaps_over_a_hyperparameter_grid():
    grid = SparkConfig(inflation=jnp.array([1.5, 2.0, 3.0]))
    axes = jax.tree_util.tree_map(lambda _: None, SparkConfig()).replace(inflation=0)
    out = jax.vmap(lambda c: c.inflation * c.beta, in_axes=(axes,))(grid)
    chex.assert_trees_all_close(out, jnp.array([1.5, 2.0, 3.0]) * 0.6)
