"""Shared test setup: strict numerics so silent broadcasting and dtype drift fail loudly.

Dependency policy: the README's test command installs the ``test`` and ``torch`` extras, and every oracle the
tests compare against (torch, diffusers, transformers, scikit-learn, markov_clustering, cityscapesscripts) is
imported plainly, never through ``pytest.importorskip``: a missing oracle is a loud collection error, never a
silent skip of the parity evidence. Without the torch extra, leave those modules out explicitly
(``--ignore=tests/test_models_parity.py`` ...).
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)


class CompileCounter:
    """Counts XLA backend compilations while active, not traces: jax.monitoring's compile-duration
    event is recorded once per compile request (a persistent-cache hit counts too)."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def _on_event(self, name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            self.count += 1


@pytest.fixture
def compilations():
    """`with compilations() as c: ...; c.count` is the number of XLA compilations inside the block."""
    return CompileCounter
