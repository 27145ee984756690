"""Dense softmax attention: the (queries x keys) scores materialised, as perceiver-io computes them.

Masked scores are set to the most negative finite float32 (`MASKED_SCORE`, not -inf), so a query whose keys are all
masked attends uniformly to every key instead of giving NaN, as in perceiver-io. Scores and softmax are float32
whatever the compute dtype.

`cached_attention` is the same maths for decoding: a few new queries attend to keys/values held in a cache (in
the layouts their products read without a transpose) plus their own keys/values, without concatenating them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_jax.backend import (
    MASKED_SCORE,
    as_precision,
    batched_product,
    batched_product_on_kernel,
    masked_softmax,
    masked_softmax_grad,
    swap_last_axes,
)
from perceiver_ar_jax.model.masks import AttentionMask, causal_mask


def dense_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    max_heads_parallel: int | None = None,
    precision: jax.lax.Precision | str | None = None,
) -> jnp.ndarray:
    """Softmax attention that materialises the (queries x keys) scores, `max_heads_parallel` heads at a time.

    q: (batch, queries, heads, head_dim), already scaled and rotated; k, v: (batch, keys, heads, head_dim);
    mask: bool, broadcastable to (batch, heads, queries, keys), True = may attend; dropout: applied to the
    probabilities; precision: of both products (lax.Precision). Returns (batch, queries, heads, head_dim) in v's
    dtype.
    """
    num_heads = q.shape[2]
    chunk = num_heads if max_heads_parallel is None else min(max_heads_parallel, num_heads)
    precision = as_precision(precision)
    outputs = []
    for start in range(0, num_heads, chunk):
        heads = slice(start, start + chunk)
        head_mask = mask if mask is None or mask.shape[1] == 1 else mask[:, heads]
        qkv = q[:, :, heads], k[:, :, heads], v[:, :, heads]
        if dropout is None:
            outputs.append(_softmax_attention(*qkv, head_mask, precision))
        else:
            outputs.append(_weighted_values(dropout(_probabilities(qkv[0], qkv[1], head_mask, precision)), qkv[2],
                                            precision))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)


def _einsum(subscripts: str, a: jnp.ndarray, b: jnp.ndarray, precision) -> jnp.ndarray:
    """A product of two operands with a float32 result (float32 accumulation whatever their dtype)."""
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32, precision=precision)


def _probabilities(q, k, mask, precision, kernels: bool = False) -> jnp.ndarray:
    """softmax(q k^T), masked: (batch, heads, queries, keys) float32. kernels: the product and the softmax may run
    on `backend`'s CPU kernels (not differentiable: inside the custom VJP only)."""
    if kernels:
        return masked_softmax(batched_product("bqhd,bkhd->bhqk", q, k, jnp.float32, precision), mask)
    scores = _einsum("bqhd,bkhd->bhqk", q, k, precision)
    if mask is not None:
        scores = jnp.where(mask, scores, MASKED_SCORE)
    return jax.nn.softmax(scores, axis=-1)


def _weighted_values(probs, v, precision, kernels: bool = False) -> jnp.ndarray:
    """probs (batch, heads, queries, keys) float32 x v -> (batch, queries, heads, head_dim) in v's dtype."""
    if kernels:
        return batched_product("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, v.dtype, precision)
    return _einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision).astype(v.dtype)


# The derivative written out, so that every product of the backward pass multiplies operands of the compute
# dtype, as the forward ones do: JAX's own derivative multiplies the float32 score gradient with bfloat16 queries
# or keys, which XLA computes in float32 (on CPU with both operands converted and off the fast path: the bench
# model's attention products took 187 ms of op time per bf16 train step with it, ~120 ms with this one). The score
# gradient is rounded to the compute dtype first, as under PyTorch's autocast; with float32 operands this is JAX's
# own derivative. Its products may run on `backend.batched_product`'s CPU kernel (bf16 on CPUs with AMX tiles).
@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q, k, v, mask, precision):
    return _softmax_attention_fwd(q, k, v, mask, precision)[0]


def _softmax_attention_fwd(q, k, v, mask, precision):
    probs = _probabilities(q, k, mask, precision, kernels=True)
    return _weighted_values(probs, v, precision, kernels=True), (q, k, v, mask, probs)


def _softmax_attention_bwd(precision, residuals, g):
    q, k, v, mask, probs = residuals
    g = g.astype(v.dtype)
    d_probs = batched_product("bqhd,bkhd->bhqk", g, v, jnp.float32, precision)
    d_scores = masked_softmax_grad(probs, d_probs, mask, q.dtype)  # softmax's vjp, masked
    d_q = _input_gradient("bhqk,bkhd->bqhd", d_scores, k, q.dtype, precision)
    d_k = _input_gradient("bhqk,bqhd->bkhd", d_scores, q, k.dtype, precision)
    d_v = _input_gradient("bhqk,bqhd->bkhd", probs.astype(v.dtype), g, v.dtype, precision)
    d_mask = None if mask is None else np.zeros(mask.shape, jax.dtypes.float0)
    return d_q, d_k, d_v, d_mask


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _input_gradient(subscripts: str, a: jnp.ndarray, b: jnp.ndarray, dtype, precision) -> jnp.ndarray:
    """The gradient of q, k or v, (batch, n, heads, head_dim) in dtype: `subscripts` ends in "->b?hd".

    The CPU kernel writes it in that layout. XLA computes such a product in (batch, heads, head_dim, n) whatever
    it is asked for, then moves it with a strided transposing fusion; `swap_last_axes` moves it faster (bench
    model, bf16 step: ~30 -> ~10 ms of op time)."""
    if batched_product_on_kernel(subscripts, a, b):
        return batched_product(subscripts, a, b, dtype)
    operands, out = subscripts.split("->")
    x = _einsum(f"{operands}->{out[0]}{out[2]}{out[3]}{out[1]}", a, b, precision).astype(dtype)
    batch, heads, head_dim, n = x.shape
    return swap_last_axes(x.reshape(batch, heads * head_dim, n)).reshape(batch, n, heads, head_dim)


def cached_attention(
    q: jnp.ndarray,
    cached_keys: jnp.ndarray,
    cached_values: jnp.ndarray,
    cache_mask: jnp.ndarray,
    own_keys: jnp.ndarray | None = None,
    own_values: jnp.ndarray | None = None,
    precision: jax.lax.Precision | str | None = None,
) -> jnp.ndarray:
    """`dense_attention` of new queries over cached keys/values and (optionally) their own keys/values.

    q: (batch, queries, heads, head_dim), scaled and rotated; cached_keys (batch, heads, head_dim, slots) and
    cached_values (batch, heads, slots, head_dim); cache_mask bool broadcastable to (batch, 1, queries, slots);
    own_keys, own_values (batch, queries, heads, head_dim) or None: the queries' own tokens, after every cached
    one, seen causally (a query sees its own key and those of the queries before it). Returns (batch, queries,
    heads, head_dim) in the cached values' dtype; the same as dense attention over the concatenated keys.
    precision: of every product.
    """
    einsum = lambda *args, **kwargs: jnp.einsum(*args, precision=precision, **kwargs)  # noqa: E731
    if q.shape[1] == 1:  # one new token (a decoding step): products of vectors, no query axis
        scores = einsum("bhd,bhds->bhs", q[:, 0], cached_keys, preferred_element_type=jnp.float32)
        scores = jnp.where(cache_mask[:, 0], scores, MASKED_SCORE)
        if own_keys is not None:
            own = einsum("bhd,bhd->bh", q[:, 0], own_keys[:, 0], preferred_element_type=jnp.float32)
            scores = jnp.concatenate([scores, own[..., None]], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(cached_values.dtype)
        slots = cached_values.shape[2]
        o = einsum("bhs,bhsd->bhd", probs[..., :slots], cached_values)
        if own_keys is not None:
            o = o + probs[..., slots:] * own_values[:, 0].astype(o.dtype)
        return o[:, None]

    scores = einsum("bqhd,bhds->bhqs", q, cached_keys, preferred_element_type=jnp.float32)
    scores = jnp.where(cache_mask, scores, MASKED_SCORE)
    num_queries, slots = q.shape[1], cached_values.shape[2]
    if own_keys is not None:
        own = einsum("bqhd,bkhd->bhqk", q, own_keys, preferred_element_type=jnp.float32)
        own = jnp.where(causal_mask(num_queries, num_queries), own, MASKED_SCORE)
        scores = jnp.concatenate([scores, own], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1).astype(cached_values.dtype)
    o = einsum("bhqs,bhsd->bqhd", probs[..., :slots], cached_values)
    if own_keys is not None:
        o = o + einsum("bhqk,bkhd->bqhd", probs[..., slots:], own_values.astype(o.dtype))
    return o


def uniform_where_no_visible_key(out: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask | None) -> jnp.ndarray:
    """perceiver-io's rule, for kernels that skip masked blocks: a query that sees no key (a pad latent with
    prefix 0) attends uniformly to ALL keys. out (batch, queries, heads, head_dim), v (batch, keys, heads,
    head_dim); returns out with those rows replaced by the mean of v (a `where`, so their gradient is the mean's,
    as in the dense path)."""
    rows = None if mask is None else mask.no_visible_key()
    if rows is None:
        return out
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(out.dtype)  # (batch, 1, heads, d)
    return jnp.where(rows[:, :, None, None], mean_v, out)
