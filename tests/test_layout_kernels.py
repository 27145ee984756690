"""The CPU layout kernels (backend/layout.cc): a row-major transpose and a copy XLA cannot fuse through; and that
the training step's compiled program uses them where they pay (bf16 weight gradients from a row-major operand, the
rotary embedding's cos and sin evaluated once, not per attention head)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model.positions import apply_rotary, positions, rotary_angles

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (130, 65), (8, 64), (64, 8), (200, 300), (256, 1000)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "int16", "uint32"])
def test_transpose_and_copy_are_exact(shape, dtype):
    x = np.arange(np.prod(shape)).reshape(shape) % 30011
    x = jnp.asarray(x, dtype)
    np.testing.assert_array_equal(jax.jit(cpu_kernels.transpose)(x), np.asarray(x).T)
    np.testing.assert_array_equal(jax.jit(cpu_kernels.copy)(x), np.asarray(x))


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 3, 130, 65), (5, 8, 64), (1, 1, 1)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_transpose_swaps_the_last_two_axes_of_a_batch(shape, dtype):
    x = jnp.asarray(np.arange(np.prod(shape)).reshape(shape) % 30011, dtype)
    np.testing.assert_array_equal(jax.jit(cpu_kernels.transpose)(x), np.swapaxes(np.asarray(x), -1, -2))


@needs_kernels
def test_kernels_under_vmap_and_eagerly():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 17, 9)), jnp.bfloat16)
    np.testing.assert_array_equal(jax.vmap(cpu_kernels.transpose)(x), np.swapaxes(np.asarray(x), 1, 2))
    np.testing.assert_array_equal(jax.vmap(cpu_kernels.copy)(x), np.asarray(x))
    np.testing.assert_array_equal(cpu_kernels.transpose(x[0]), np.asarray(x[0]).T)


def compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_kernels
@pytest.mark.parametrize("rhs_transposed", [False, True])
def test_bf16_weight_gradient_multiplies_a_row_major_operand(rhs_transposed):
    """XLA:CPU makes a product that contracts its left operand's leading axis a float32 one, 3-6x slower: the
    weight gradient's operand comes transposed by the kernel instead, and no product contracts axis 0."""
    a = jnp.ones((64, 32), jnp.bfloat16)
    b = jnp.ones((48, 32) if rhs_transposed else (32, 48), jnp.bfloat16)
    loss = lambda a, b: jnp.sum(backend.matmul(a, b, jnp.float32, rhs_transposed=rhs_transposed))  # noqa: E731
    text = compiled_text(jax.grad(loss, argnums=(0, 1)), a, b)
    assert "perceiver_ar_transpose" in text
    assert not re.search(r"lhs_contracting_dims=\{0\}", text)


@needs_kernels
def test_rotary_cos_and_sin_are_evaluated_once():
    """XLA fuses cos/sin into each consumer (forward and backward products' operands), evaluating them per head
    and channel of each; backend.computed_once keeps one evaluation of each in a buffer of its own."""
    angles = rotary_angles(positions(2, 64), 16)
    x, w = jnp.ones((2, 64, 4, 16), jnp.bfloat16), jnp.ones((64, 64), jnp.bfloat16)
    loss = lambda x, angles, w: jnp.sum((apply_rotary(x, angles).reshape(2, 64, 64) @ w).astype(jnp.float32) ** 2)  # noqa: E731
    text = compiled_text(jax.grad(loss), x, angles, w)
    assert len(re.findall(r" cosine\(", text)) == 1 and len(re.findall(r" sine\(", text)) == 1
