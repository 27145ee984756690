"""Dense attention's derivative (written out in dense.py): the same gradients as JAX's own derivative of the
formula, for every mask form, and in bfloat16 a compiled backward pass whose products all multiply bfloat16
operands (JAX's own derivative multiplies the float32 score gradient with bf16 queries and keys, which XLA:CPU
computes in float32, off its fast path)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.model.attention.dense import MASKED_SCORE, dense_attention
from perceiver_ar_jax.model.masks import causal_mask

B, Q, K, H, D = 2, 6, 10, 4, 8


def formula(q, k, v, mask):
    """Softmax attention as plain JAX, differentiated by JAX."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED_SCORE)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))


def inputs(dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, g = (jax.random.normal(key, shape) for key, shape in zip(keys, [(B, Q, H, D), (B, K, H, D),
                                                                           (B, K, H, D), (B, Q, H, D)], strict=True))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), g


def masks():
    causal = causal_mask(Q, K)  # (1, 1, Q, K), right-aligned: query i sees keys up to K - Q + i
    padding = jnp.arange(K)[None, None, None, :] >= jnp.array([0, 3])[:, None, None, None]  # batch 1: 3 pad keys
    none_visible = causal & padding & (jnp.arange(Q) > 0)[None, None, :, None]  # query 0 sees no key
    per_head = jnp.broadcast_to(causal, (B, H, Q, K)) & (jnp.arange(H) != 2)[None, :, None, None]
    return {"none": None, "causal": causal, "causal+padding": causal & padding, "no visible key": none_visible,
            "per head": per_head}


def gradients(attention, q, k, v, g, mask):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask).astype(jnp.float32) * g)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("mask_name", list(masks()))
@pytest.mark.parametrize("max_heads_parallel", [None, 3])
def test_float32_gradient_is_jax_derivative_of_the_formula(mask_name, max_heads_parallel):
    q, k, v, g = inputs()
    mask = masks()[mask_name]
    ours = lambda q, k, v, m: dense_attention(q, k, v, m, max_heads_parallel=max_heads_parallel)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v, mask), formula(q, k, v, mask), rtol=1e-5, atol=1e-6)
    for got, want in zip(gradients(ours, q, k, v, g, mask), gradients(formula, q, k, v, g, mask), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_name", ["causal+padding", "no visible key"])
def test_bfloat16_gradient_is_close_to_float32(mask_name):
    q, k, v, g = inputs(jnp.bfloat16)
    mask = masks()[mask_name]
    got = gradients(dense_attention, q, k, v, g, mask)
    want = gradients(formula, *(x.astype(jnp.float32) for x in (q, k, v)), g, mask)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2 * scale)


def test_gradient_under_jit_vmap_and_checkpoint():
    q, k, v, g = inputs()
    mask = masks()["causal"]
    loss = lambda q, k, v: jnp.sum(dense_attention(q, k, v, mask) * g)  # noqa: E731
    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    batched = jax.vmap(lambda q, k, v, g: jax.grad(lambda q: jnp.sum(dense_attention(q[None], k[None], v[None], mask)
                                                                      * g[None]))(q))(q, k, v, g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched, want[0], rtol=1e-5, atol=1e-6)


def dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
    """The element types of every dot's operands in an optimized HLO module's text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    return [tuple(types.get(name, "?") for name in re.findall(r"%([\w.\-]+)", operands))
            for operands in re.findall(r" dot\(([^)]*)\)", hlo)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's choice of product dtypes")
def test_bfloat16_backward_products_multiply_bfloat16_operands():
    q, k, v, g = (x.astype(jnp.bfloat16) for x in inputs(jnp.bfloat16))
    mask = masks()["causal+padding"]
    loss = lambda q, k, v: jnp.sum(dense_attention(q, k, v, mask).astype(jnp.float32) * g)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    operand_types = dot_operand_types(hlo)
    assert len(operand_types) >= 5  # the forward's two products (the output's recomputed or kept) and backward's 4
    assert all(types == ("bf16", "bf16") for types in operand_types), operand_types


@pytest.mark.parametrize("queries, keys, heads, head_dim", [
    (256, 1024, 8, 64),  # the bench model's hybrid layer
    (512, 1024, 10, 128),  # the 455M model's hybrid layer
    (512, 512, 10, 128),  # its self-attention layers
    (100, 300, 3, 24),  # odd sizes
])
def test_bfloat16_gradient_runs_at_the_models_shapes(queries, keys, heads, head_dim):
    """XLA:CPU fails at run time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32") for some
    bf16 product forms it does not hand to its fast path; the backward's forms must run at every shape we train."""
    shapes = [(1, queries, heads, head_dim), (1, keys, heads, head_dim), (1, keys, heads, head_dim)]
    q, k, v = (jax.random.normal(jax.random.key(i), s).astype(jnp.bfloat16) for i, s in enumerate(shapes))
    mask = causal_mask(queries, keys)
    loss = lambda q, k, v: jnp.sum(dense_attention(q, k, v, mask).astype(jnp.float32))  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)
