"""`backend.gelu`: the exact (erf) GELU in float32, returned in the input's dtype; on CPU the kernel of
backend/gelu.cc with its own derivative (float32, and bf16 whose values are those of the exact GELU rounded, up to
float32 error), and XLA's `jax.nn.gelu` everywhere else."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")
erf = np.vectorize(math.erf)


def exact_gelu(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def exact_slope(x):
    x = np.asarray(x, np.float64)
    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def inputs(n=40_001):
    x = jnp.linspace(-7.0, 7.0, n).astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(0), (n,)).astype(jnp.bfloat16)
    return x, g


@needs_kernels
def test_bf16_gelu_and_gradient_are_the_exact_ones_rounded():
    x, g = inputs()
    y, vjp = jax.vjp(jax.jit(backend.gelu), x)
    (dx,) = vjp(g)
    assert y.dtype == dx.dtype == jnp.bfloat16
    # within a bf16 rounding of the exact values; the far negative tail (|GELU| < 1e-6) to an absolute 1e-6
    np.testing.assert_allclose(np.asarray(y, np.float64), exact_gelu(x), rtol=2 ** -8, atol=1e-6)
    want = np.asarray(g, np.float64) * exact_slope(x)
    np.testing.assert_allclose(np.asarray(dx, np.float64), want, rtol=2 ** -7, atol=1e-5)


@needs_kernels
def test_bf16_gelu_takes_the_kernel_and_matches_xla():
    x, g = inputs(1000)
    x = x.reshape(10, 100)
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(backend.gelu(x).astype(jnp.float32)))).lower(x).compile().as_text()
    assert "perceiver_ar_gelu_grad" in hlo
    xla = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(backend.gelu(x), np.float32), np.asarray(xla, np.float32), rtol=2 ** -7,
                               atol=1e-6)
    batched = jax.vmap(backend.gelu)(x)
    np.testing.assert_array_equal(np.asarray(batched, np.float32), np.asarray(backend.gelu(x), np.float32))


@needs_kernels
def test_float32_gelu_and_gradient_are_the_exact_ones():
    x, g = jnp.linspace(-7.0, 7.0, 40_001), jax.random.normal(jax.random.key(0), (40_001,))
    y, vjp = jax.vjp(jax.jit(backend.gelu), x)
    (dx,) = vjp(g)
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(backend.gelu(x)))).lower(x).compile().as_text()
    assert y.dtype == dx.dtype == jnp.float32 and "perceiver_ar_gelu_grad" in hlo
    # erf's float32 approximation (~1e-7) times x; the exact GELU's form, x (1 + erf(x / sqrt 2)) / 2, as torch's
    np.testing.assert_allclose(np.asarray(y, np.float64), exact_gelu(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.asarray(g, np.float64) * exact_slope(x), rtol=1e-5,
                               atol=1e-6)


def test_gelu_off_the_kernels_is_xlas(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    x = jnp.linspace(-7.0, 7.0, 1001)
    np.testing.assert_array_equal(jax.jit(backend.gelu)(x), jax.jit(lambda x: jax.nn.gelu(x, approximate=False))(x))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(backend.gelu(x)))(x),
                                  jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False)))(x))
