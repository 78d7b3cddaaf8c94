"""Shared test setup: strict numerics so silent broadcasting and dtype drift fail loudly.

Dependency policy: the README's test command installs the ``test`` and ``torch`` extras, and every oracle the
tests compare against (torch, diffusers, transformers, scikit-learn, markov_clustering, cityscapesscripts) is
imported plainly, never through ``pytest.importorskip``: a missing oracle is a loud collection error, never a
silent skip of the parity evidence. Without the torch extra, leave those modules out explicitly
(``--ignore=tests/test_models_parity.py`` ...).
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
