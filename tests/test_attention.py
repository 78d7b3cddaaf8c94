"""dot_product_attention: blocking over heads and queries is an implementation detail, never a result."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from spark_jax.models.attention import dot_product_attention


def _inputs(b, t, s, n, h, seed=0, dtype=jnp.float32, spread=1.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)) * spread
    k = rng.standard_normal((b, s, n, h)) * spread
    v = rng.standard_normal((b, s, n, h))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _torch_sdpa(q, k, v, scale):
    """PyTorch's fused attention (what diffusers runs) in float64, [B, T, N, H] layout."""
    qt, kt, vt = (torch.from_numpy(np.asarray(x, np.float64)).transpose(1, 2) for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    return out.transpose(1, 2).numpy()


@pytest.mark.parametrize(
    "b,t,s,n,h,block_q",
    [
        (2, 64, 64, 3, 8, 16),  # self-attention, T a multiple of the block
        (1, 50, 50, 2, 8, 16),  # T not a multiple: queries padded, padding dropped
        (2, 40, 7, 4, 8, 16),  # cross-attention, S != T
        (1, 64, 64, 1, 32, 64),  # one block per head (the VAE's single-head form)
        (1, 9, 9, 2, 8, 1024),  # block larger than T
    ],
)
def test_blocked_and_unblocked_equal_torch_sdpa(b, t, s, n, h, block_q):
    q, k, v = _inputs(b, t, s, n, h)
    ref = _torch_sdpa(q, k, v, 0.3)
    blocked = jax.jit(lambda *a: dot_product_attention(*a, scale=0.3, block_q=block_q, max_unblocked_logits=0))(q, k, v)
    whole = jax.jit(lambda *a: dot_product_attention(*a, scale=0.3, max_unblocked_logits=2**40))(q, k, v)
    chex.assert_shape([blocked, whole], (b, t, n, h))
    chex.assert_type([blocked, whole], jnp.float32)
    np.testing.assert_allclose(blocked, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-6)


def test_default_thresholds_block_large_problems_only():
    """At the defaults a 1x4096x4096x1 problem is blocked and a 77-key cross-attention is not; both exact."""
    for t, s in ((4096, 4096), (512, 77)):
        q, k, v = _inputs(1, t, s, 1, 8, seed=t)
        ours = jax.jit(lambda *a: dot_product_attention(*a, scale=8**-0.5))(q, k, v)
        np.testing.assert_allclose(ours, _torch_sdpa(q, k, v, 8**-0.5), rtol=1e-5, atol=2e-6)


def test_large_logits_stay_finite():
    """Logits of ~1e4 (softmax of a near one-hot row) would overflow exp without the max shift."""
    q, k, v = _inputs(1, 32, 32, 2, 8, spread=40.0)
    for unblocked in (0, 2**40):
        out = jax.jit(lambda *a: dot_product_attention(*a, scale=1.0, block_q=8, max_unblocked_logits=unblocked))(
            q, k, v
        )
        chex.assert_tree_all_finite(out)
        np.testing.assert_allclose(out, _torch_sdpa(q, k, v, 1.0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_keep_their_dtype_and_accuracy(dtype):
    """Logits and accumulation are float32: the result is the float32 one rounded to the input dtype."""
    q, k, v = _inputs(1, 48, 48, 2, 16, dtype=dtype)
    out = jax.jit(lambda *a: dot_product_attention(*a, scale=0.25, block_q=16, max_unblocked_logits=0))(q, k, v)
    chex.assert_type(out, dtype)
    ref = _torch_sdpa(q, k, v, 0.25)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=4 * eps * np.abs(ref).max())



@pytest.mark.parametrize("max_unblocked_logits", [2**22, 0], ids=["unblocked", "blocked"])
@pytest.mark.parametrize("precision, printed", [("highest", "HIGHEST"), ("default", "DEFAULT"), (None, "HIGH")])
def test_precision_reaches_both_products(max_unblocked_logits, precision, printed):
    """An explicit precision wins; None follows the enclosing jax.default_matmul_precision (here 'high')."""
    q, k, v = _inputs(1, 32, 32, 2, 8)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, scale=0.3, block_q=16, max_unblocked_logits=max_unblocked_logits,
                                     precision=precision)

    with jax.default_matmul_precision("high"):
        text = jax.jit(attend).lower(q, k, v).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 2
    assert all(f"precision = [{printed}, {printed}]" in line for line in dots), dots
