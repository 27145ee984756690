"""Attention's masked softmax and its derivative on the CPU kernel (backend/softmax.cc, `backend.masked_softmax`,
`backend.masked_softmax_grad`): XLA's `softmax(where(mask, scores, MASKED_SCORE))` and its masked derivative to
float32 rounding, for every way a mask broadcasts, rows with no visible key (uniform, as perceiver-io) and key
counts with vector tails; XLA's own path under a mesh of several devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model.attention.dense import MASKED_SCORE

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")


def xla_softmax_and_grad(scores, mask, d_probs, out_dtype):
    probs = jax.nn.softmax(scores if mask is None else jnp.where(mask, scores, MASKED_SCORE), axis=-1)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    if mask is not None:
        d_scores = jnp.where(mask, d_scores, 0.0)
    return probs, d_scores.astype(out_dtype)


@needs_kernels
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,mask_shape", [
    ((2, 3, 5, 37), (2, 1, 5, 37)),    # padding and causality per example, shared by the heads
    ((2, 3, 5, 37), (5, 37)),          # one mask for every example and head
    ((1, 2, 4, 16), (1, 2, 4, 1)),     # broadcast over the keys too
    ((2, 2, 7, 300), (2, 1, 1, 300)),  # padding only: every row of an example alike
    ((2, 2, 7, 33), None),
])
def test_kernel_equals_xla(shape, mask_shape, out_dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    scores = 3 * jax.random.normal(k1, shape)
    d_probs = jax.random.normal(k2, shape)
    mask = None
    if mask_shape is not None:
        mask = jax.random.uniform(k3, mask_shape) < 0.6
        mask = mask.at[..., 0, :].set(False)  # rows that see no key: uniform over every key
    want_probs, want_grad = xla_softmax_and_grad(scores, mask, d_probs, out_dtype)
    probs = jax.jit(cpu_kernels.masked_softmax)(scores, mask)
    grad = jax.jit(lambda p, d, m: cpu_kernels.masked_softmax_grad(p, d, m, out_dtype))(want_probs, d_probs, mask)
    assert grad.dtype == out_dtype
    np.testing.assert_allclose(probs, want_probs, rtol=2e-6, atol=1e-7)
    if mask is not None:  # masked keys exactly 0, unless the row sees no key at all
        sees_some = jnp.any(jnp.broadcast_to(mask, shape), axis=-1, keepdims=True)
        assert bool(jnp.all(jnp.where(sees_some & ~mask, probs, 0.0) == 0.0))
        uniform = np.float32(1) / np.float32(shape[-1])
        assert bool(jnp.all(jnp.where(sees_some, uniform, probs) == uniform))
    # (d_probs - their weighted sum) cancels: a few float32 ulps of the larger terms
    tolerance = dict(rtol=1e-5, atol=1e-6) if out_dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), **tolerance)


@needs_kernels
def test_backend_functions_take_the_kernel_and_xla_under_a_mesh():
    scores = jax.random.normal(jax.random.key(0), (2, 2, 8, 64))
    mask = jnp.tril(jnp.ones((8, 64), bool), 56)
    assert "perceiver_ar_masked_softmax" in jax.jit(backend.masked_softmax).lower(scores, mask).as_text()
    np.testing.assert_allclose(backend.masked_softmax(scores, mask),
                               xla_softmax_and_grad(scores, mask, scores, jnp.float32)[0], rtol=2e-6, atol=1e-7)
    if jax.device_count() < 2:
        pytest.skip("needs several devices")
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        text = jax.jit(lambda s: backend.masked_softmax_grad(s, s, mask, jnp.float32)).lower(scores).as_text()
    assert "perceiver_ar_masked_softmax" not in text
