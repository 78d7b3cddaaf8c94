"""SparkConfig: the paper's defaults, validation, and its behaviour as a JAX pytree."""

import chex
import jax
import jax.numpy as jnp
import pytest

from spark_jax import SparkConfig


def test_defaults_are_the_papers():
    cfg = SparkConfig()
    assert (cfg.beta, cfg.expansion, cfg.inflation, cfg.prune_threshold) == (0.6, 2, 2.6, 1e-7)
    assert cfg.global_mode == "cosine" and cfg.negatives == "clip" and cfg.sharpen == 1.0
    assert cfg.use_local
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
        (dict(mcl_max_iter=0), "mcl_max_iter"),
        (dict(max_clusters=0), "max_clusters"),
        (dict(matmul_precision="fast"), "matmul_precision"),
    ],
)
def test_bad_static_options_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        SparkConfig(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(beta=1.5), "beta"),
        (dict(gamma=1.0), "gamma"),
        (dict(inflation=0.0), "inflation"),
        (dict(prune_threshold=-1.0), "prune_threshold"),
        (dict(sharpen=0.0), "sharpen"),
    ],
)
def test_bad_numeric_values_are_reported_by_check_values(changes, message):
    with pytest.raises(ValueError, match=message):
        SparkConfig(**changes).check_values()


def test_numeric_fields_are_leaves_and_static_fields_are_not():
    leaves = jax.tree_util.tree_leaves(SparkConfig())
    assert len(leaves) == 8
    assert 2.6 in leaves and 0.6 in leaves
    assert "cosine" not in leaves


def test_changing_a_numeric_field_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(cfg):
        return cfg.beta * cfg.inflation

    chex.clear_trace_counter()
    assert float(fn(SparkConfig(beta=0.5))) == pytest.approx(1.3)
    assert float(fn(SparkConfig(beta=0.25))) == pytest.approx(0.65)


def test_config_vmaps_over_a_hyperparameter_grid():
    grid = SparkConfig(inflation=jnp.array([1.5, 2.0, 3.0]))
    axes = SparkConfig(
        inflation=0, beta=None, prune_threshold=None, sharpen=None, local_eps=None,
        mcl_tol=None, gamma=None, propagation_tol=None, sharpen_target=None,
    )
    out = jax.vmap(lambda c: c.inflation * 2.0, in_axes=(axes,))(grid)
    chex.assert_trees_all_close(out, jnp.array([3.0, 4.0, 6.0]))
