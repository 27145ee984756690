"""`backend.cross_entropy_gradient`: log Z, the labels' logits and the loss's gradient, by the CPU kernel
(backend/cross_entropy.cc, on CPU) and by XLA's formula (everywhere else): the same numbers, the kernel's bf16
gradient the rounding of the exact one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")


def inputs(rows, vocab, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    logits = jax.random.normal(keys[0], (rows, vocab)) * 4.0
    labels = jax.random.randint(keys[1], (rows,), 0, vocab)
    weights = jax.random.uniform(keys[2], (rows,)).at[0].set(0.0)  # a padded position: weight 0
    return logits, labels, weights


def exact(logits, labels, weights, z_loss_weight):
    """float64 numpy: log Z, label logits and the gradient."""
    x, w = np.asarray(logits, np.float64), np.asarray(weights, np.float64)
    m = x.max(-1, keepdims=True)
    log_z = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    grad = (w * (1 + 2 * z_loss_weight * log_z))[:, None] * np.exp(x - log_z[:, None])
    grad[np.arange(len(x)), np.asarray(labels)] -= w
    return log_z, x[np.arange(len(x)), np.asarray(labels)], grad


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 16, 17, 1003, 32000])
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-4])
def test_kernel_matches_the_exact_values(vocab, z_loss_weight):
    logits, labels, weights = inputs(37, vocab)
    want_log_z, want_label, want_grad = exact(logits, labels, weights, z_loss_weight)
    for dtype in (jnp.float32, jnp.bfloat16):
        kernel = jax.jit(lambda x, y, w, dtype=dtype: cpu_kernels.cross_entropy(x, y, w, z_loss_weight, dtype))
        log_z, label, grad = kernel(logits, labels, weights)
        assert grad.dtype == dtype and grad.shape == logits.shape
        np.testing.assert_allclose(log_z, want_log_z, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(label, np.asarray(logits)[np.arange(37), np.asarray(labels)])
        if dtype == jnp.float32:
            np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7)  # float32 sums over the vocabulary
        else:  # the rounding of the exact gradient, but where that lies within a float32 error of a tie
            rounded = np.asarray(jnp.asarray(want_grad, jnp.float32).astype(jnp.bfloat16), np.float32)
            got = np.asarray(grad, np.float32)
            assert np.sum(got != rounded) <= max(1, got.size // 1000)
            np.testing.assert_allclose(got, want_grad, rtol=2 ** -8, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_backend_takes_the_kernel_on_cpu(dtype, monkeypatch):
    logits, labels, weights = inputs(8, 100)
    logits, labels, weights = logits.reshape(2, 4, 100), labels.reshape(2, 4), weights.reshape(2, 4)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(cpu_kernels, "available", lambda kernels=kernels: kernels)
        fn = jax.jit(lambda x, y, w: backend.cross_entropy_gradient(x, y, w, 1e-4, dtype))
        assert ("perceiver_ar_cross_entropy" in fn.lower(logits, labels, weights).compile().as_text()) == kernels
        results.append(fn(logits, labels, weights))
        assert results[-1][2].shape == (2, 4, 100) and results[-1][0].shape == (2, 4) and results[-1][2].dtype == dtype
    for a, b in zip(*results, strict=True):  # kernel against XLA's formula
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2 ** -8, atol=1e-6)


def test_xla_formula_matches_the_exact_values(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    logits, labels, weights = inputs(5, 50)
    log_z, label, grad = backend.cross_entropy_gradient(logits, labels, weights, 1e-4, jnp.float32)
    want = exact(logits, labels, weights, 1e-4)
    for got, w in zip((log_z, label, grad), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_kernel_under_vmap():
    logits, labels, weights = inputs(12, 40)
    batched = jax.vmap(lambda x, y, w: cpu_kernels.cross_entropy(x, y, w, 0.0, jnp.bfloat16))(
        logits.reshape(3, 4, 40), labels.reshape(3, 4), weights.reshape(3, 4))
    flat = cpu_kernels.cross_entropy(logits, labels, weights, 0.0, jnp.bfloat16)
    for a, b in zip(batched, flat, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32).reshape(b.shape), np.asarray(b, np.float32))
