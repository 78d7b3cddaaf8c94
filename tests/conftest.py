"""Shared test setup: strict numerics so silent broadcasting and dtype drift fail loudly."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
