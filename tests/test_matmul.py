"""The model's weight products (matmul.py) compute what lax.dot_general computes, in both passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from perceiver_ar_jax import backend


def operands(shape_a, shape_b, dtype, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, shape_a).astype(dtype), jax.random.normal(kb, shape_b).astype(dtype)


DENSE_FORMS = {  # name: (lhs shape, rhs shape, dimension numbers), as Flax Dense / DenseGeneral call it
    "dense": ((2, 5, 8), (8, 6), (((2,), (0,)), ((), ()))),
    "q_proj (features heads x head_dim)": ((2, 5, 8), (8, 3, 4), (((2,), (0,)), ((), ()))),
    "o_proj (contracts heads and head_dim)": ((2, 5, 3, 4), (3, 4, 8), (((2, 3), (0, 1)), ((), ()))),
}


@pytest.mark.parametrize("form", DENSE_FORMS)
def test_float32_dot_general_equals_lax_in_value_and_gradients(form):
    shape_a, shape_b, dims = DENSE_FORMS[form]
    a, b = operands(shape_a, shape_b, jnp.float32)
    cotangent = jax.random.normal(jax.random.key(9), lax.dot_general(a, b, dims).shape)

    def value_and_grads(dot):
        out, vjp = jax.vjp(lambda a, b: dot(a, b, dims), a, b)
        return out, vjp(cotangent)

    (out, grads), (expected, expected_grads) = value_and_grads(backend.dot_general), value_and_grads(lax.dot_general)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rhs_transposed", [False, True])
def test_bfloat16_matmul_accumulates_in_float32_in_both_passes(rhs_transposed):
    """bf16 operands: the result, and the gradients of a bf16 cotangent, are the float32 products of the bf16
    values rounded once to bf16 (what a bf16 x bf16 -> f32 GEMM gives)."""
    a, b = operands((16, 64), (32, 64) if rhs_transposed else (64, 32), jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(9), (16, 32)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda a, b: backend.matmul(a, b, rhs_transposed=rhs_transposed), a, b)
    grad_a, grad_b = vjp(cotangent)
    assert out.dtype == grad_a.dtype == grad_b.dtype == jnp.bfloat16

    a32, b32, g32 = (np.asarray(x, np.float32) for x in (a, b, cotangent))
    b_kn = b32.T if rhs_transposed else b32  # (k, n)
    expected_grad_b = (a32.T @ g32).T if rhs_transposed else a32.T @ g32
    for value, expected in [(out, a32 @ b_kn), (grad_a, g32 @ b_kn.T), (grad_b, expected_grad_b)]:
        expected = np.asarray(jnp.asarray(expected).astype(jnp.bfloat16), np.float32)
        np.testing.assert_allclose(np.asarray(value, np.float32), expected, rtol=1e-2, atol=1e-2)


def test_bfloat16_matmul_can_return_float32():
    a, b = operands((4, 8), (8, 3), jnp.bfloat16)
    out = backend.matmul(a, b, jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.asarray(a, np.float32) @ np.asarray(b, np.float32), rtol=1e-5, atol=1e-5)


def test_other_dimension_numbers_go_to_lax_unchanged():
    a, b = operands((2, 5, 8), (2, 8, 6), jnp.float32)
    dims = (((2,), (1,)), ((0,), (0,)))  # a batched product: not a Dense form
    np.testing.assert_array_equal(backend.dot_general(a, b, dims), lax.dot_general(a, b, dims))
