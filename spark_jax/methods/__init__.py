"""The segmentation methods, one module each, and their registry (:mod:`spark_jax.methods.registry`).

Adding a method is one module declaring a ``SPEC`` (a :class:`~spark_jax.methods.registry.MethodSpec`) and one
line below; ``experiments.run``, ``experiments.compare``, the benchmarks and ``metrics.json`` follow the registry.
"""

from spark_jax.methods import autosc, diffcut, diffseg, kmeans, nerve, rwncut, spark
from spark_jax.methods.registry import (
    REGISTRY,
    MethodContext,
    MethodInputs,
    MethodSpec,
    Variant,
    add_listener,
    concept_masks,
    method_spec,
    register,
    unregister,
)

register(spark.SPEC)
register(diffcut.SPEC)
register(autosc.SPEC)
register(kmeans.SPEC)
register(rwncut.SPEC)
register(diffseg.SPEC)
register(nerve.SPEC)

__all__ = [
    "REGISTRY",
    "MethodContext",
    "MethodInputs",
    "MethodSpec",
    "Variant",
    "add_listener",
    "concept_masks",
    "method_spec",
    "register",
    "unregister",
]
