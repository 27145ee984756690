"""Memory-efficient attention in plain XLA: an online softmax over blocks of keys (flash attention).

Same maths and contract as `dense.dense_attention`, but the (queries x keys) score matrix is never
materialised: keys are visited `block_size` at a time, keeping per query a running maximum `m`, a running sum of
exponentials `l` and an unnormalised output. The backward pass (a `jax.custom_vjp`) stores only q, k, v, the
output and (m, l) per query, and recomputes the scores block by block (Dao et al. 2022, algorithm 2), so the
activation memory of one attention grows with queries + keys, not queries x keys.

Masking keeps the dense path's semantics exactly: a masked score is the most negative finite float32, and the
running maximum starts at that value. A query whose keys are all masked therefore sees every score equal to that
value and attends uniformly to ALL keys, as perceiver-io does (fixture case `pad_p0_edge`); a query with at least
one visible key gives masked keys weight exp(min - max) = 0. Every block is visited (no block skipping), which is
what makes the uniform average cover all keys, and costs nothing in the hybrid layer where the latents see the
whole prefix.

Dropout on the attention probabilities (post_attention_dropout) is supported: block j draws its keep-mask from
`fold_in(dropout_rng, j)`, so the backward pass regenerates the same mask. The normaliser `l` sums the probabilities
before dropout, as `dropout(softmax(s))` does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from perceiver_ar_jax.model.attention.dense import MASKED_SCORE


def blockwise_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> jnp.ndarray:
    """Softmax attention computed `block_size` keys at a time.

    q: (batch, queries, heads, head_dim), already scaled and rotated; k, v: (batch, keys, heads, head_dim);
    mask: bool broadcastable to (batch, heads, queries, keys), True = may attend, or None; dropout_rate in [0, 1)
    with dropout_rng a PRNG key (both or neither); precision: of every product, forward and backward.
    Returns (batch, queries, heads, head_dim) in v's dtype.
    """
    out, _ = blockwise_attention_with_lse(q, k, v, mask, block_size, dropout_rate, dropout_rng, precision)
    return out.astype(v.dtype)


def blockwise_attention_with_lse(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Blockwise attention that also returns the log-sum-exp of each query's (masked) scores.

    Returns out (batch, queries, heads, head_dim) float32 and lse (batch, queries, heads) float32; both are
    differentiable, so partial results over disjoint key sets can be merged (see `merge_partial_attention`).
    For a query whose keys are all masked, lse is the masked score (the log of the key count is below float32
    resolution there); merging code must treat such rows itself.
    """
    check_attention_args(q, k, v, mask, block_size, dropout_rate, dropout_rng)
    mask = mask_4d(mask)
    return _attention(q, k, v, mask, dropout_rng, block_size, float(dropout_rate), precision)


def merge_partial_attention(
    parts: list[tuple[jnp.ndarray, jnp.ndarray]],
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Combine attention results over disjoint key sets into the result over their union.

    parts: [(out (batch, queries, heads, head_dim), lse (batch, queries, heads)), ...] float32. Each part is
    weighted by exp(lse_i - max lse), the share of the softmax normaliser its keys hold. Returns (out, lse).
    """
    lse_max = jax.lax.stop_gradient(jnp.max(jnp.stack([lse for _, lse in parts]), axis=0))
    weights = [jnp.exp(lse - lse_max) for _, lse in parts]
    total = sum(weights)
    out = sum(w[..., None] * o for w, (o, _) in zip(weights, parts, strict=True)) / total[..., None]
    return out, lse_max + jnp.log(total)


# ----------------------------------------------------------------------------------------------------------------
def mask_4d(mask: jnp.ndarray | None) -> jnp.ndarray | None:
    """A mask broadcastable to (batch, heads, queries, keys) as bool of rank 4 (leading axes of length 1 added),
    the layout the blockwise paths slice and shard along its last (keys) axis; None stays None."""
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def check_attention_args(q, k, v, mask, block_size, dropout_rate, dropout_rng) -> None:
    """ValueError naming the first argument of a blockwise attention that is out of range."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (batch, length, heads, head_dim), got shapes {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} disagree on batch, keys, heads or head_dim")
    if mask is not None and (mask.ndim > 4 or mask.shape[-1] not in (1, k.shape[1])):
        raise ValueError(f"mask shape {mask.shape} does not broadcast to (batch, heads, {q.shape[1]}, {k.shape[1]})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is out of range: must be an integer >= 1")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r} is out of range: must be in [0, 1)")
    if (dropout_rate > 0.0) != (dropout_rng is not None):
        raise ValueError("dropout_rng must be given exactly when dropout_rate > 0 "
                         f"(dropout_rate={dropout_rate}, dropout_rng={'set' if dropout_rng is not None else None})")


def _blocks(num_keys: int, block_size: int) -> tuple[int, int, int]:
    """(block length, number of full blocks, length of the last partial block or 0)."""
    size = min(block_size, num_keys)
    return size, num_keys // size, num_keys % size


def key_slice(x: jnp.ndarray, start, size: int, axis: int) -> jnp.ndarray:
    """x[..., start:start + size, ...] along `axis` (broadcast axes of length 1 are kept whole)."""
    if x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_scores(q, k_block, mask_block, precision):
    """(batch, heads, queries, block) float32 scores, masked ones set to MASKED_SCORE."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k_block, preferred_element_type=jnp.float32, precision=precision)
    return s if mask_block is None else jnp.where(mask_block, s, MASKED_SCORE)


def _keep_mask(rng, index, rate, shape):
    """The dropout keep-mask of key block `index` (the same in the forward and the backward pass)."""
    return jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - rate, shape)


def _loop_blocks(step, carry, size, num_full, tail):
    """Run step(carry, start, length, index) over the full key blocks, then over the partial last block.

    The first block runs outside the loop: its output carries the inputs' varying-over-mesh-axes type (inside
    shard_map), which the constant initial carry lacks, and a loop needs equal carry types in and out.
    """
    carry = step(carry, 0, size, 0)
    carry = jax.lax.fori_loop(1, num_full, lambda j, c: step(c, j * size, size, j), carry)
    if tail:
        carry = step(carry, num_full * size, tail, num_full)
    return carry


# ----------------------------------------------------------------------------------------------------------------
# The block loops, shared with prefix.py (which makes each key block on the fly from the prefix).
KeyBlockFn = Callable[[Any, int], tuple[jnp.ndarray, jnp.ndarray]]


def online_softmax_forward(q, num_keys: int, key_block: KeyBlockFn, mask, rng, block_size: int, rate: float,
                           sum_values: bool = False, precision: jax.lax.Precision | None = None):
    """Forward pass over key blocks. key_block(start, length) -> k, v (batch, length, heads, head_dim), k rotated.

    Returns out (batch, heads, queries, head_dim) float32, the final running max and sum (batch, heads, queries),
    and with sum_values also the sum of all values (batch, heads, head_dim) float32.
    """
    batch, num_queries, heads, head_dim = q.shape
    size, num_full, tail = _blocks(num_keys, block_size)

    def step(carry, start, length, index):
        row_max, row_sum, acc, *value_sum = carry  # (b, h, q), (b, h, q), (b, h, q, d)[, (b, h, d)]
        k_block, v_block = key_block(start, length)
        mask_block = None if mask is None else key_slice(mask, start, length, 3)
        s = _block_scores(q, k_block, mask_block, precision)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
        p = jnp.exp(s - new_max[..., None])
        alpha = jnp.exp(row_max - new_max)  # rescales what earlier blocks accumulated to the new maximum
        row_sum = alpha * row_sum + jnp.sum(p, axis=-1)
        if rate > 0.0:
            p = jnp.where(_keep_mask(rng, index, rate, p.shape), p / (1.0 - rate), 0.0)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v_block.dtype), v_block, preferred_element_type=jnp.float32,
                        precision=precision)
        value_sum = [total + jnp.sum(v_block.astype(jnp.float32), axis=1) for total in value_sum]
        return new_max, row_sum, alpha[..., None] * acc + pv, *value_sum

    carry = (jnp.full((batch, heads, num_queries), MASKED_SCORE, jnp.float32),
             jnp.zeros((batch, heads, num_queries), jnp.float32),
             jnp.zeros((batch, heads, num_queries, head_dim), jnp.float32))
    if sum_values:
        carry += (jnp.zeros((batch, heads, head_dim), jnp.float32),)
    row_max, row_sum, acc, *value_sum = _loop_blocks(step, carry, size, num_full, tail)
    return (acc / row_sum[..., None], row_max, row_sum, *value_sum)


def online_softmax_backward(q, num_keys: int, key_block: Callable, mask, rng, block_size: int, rate: float,
                            forward, cotangents, key_grads, add_key_grads, precision=None):
    """Backward pass over key blocks, recomputing each block's probabilities from the saved max and sum.

    key_block(start, length) -> k, v, aux: the block's keys and values as in the forward pass, and anything
    add_key_grads needs (e.g. the pullback of how the block was made); forward: (out, row_max, row_sum) of
    `online_softmax_forward`; cotangents: d_out (batch, queries, heads, head_dim) and d_lse (batch, queries,
    heads); key_grads: initial carry of the key-side gradients; add_key_grads(key_grads, start, length, dk_block,
    dv_block, aux) -> key_grads takes each block's gradients of its (rotated) keys and values, float32 (batch,
    length, heads, head_dim). Returns dq (float32) and key_grads.
    """
    out, row_max, row_sum = forward
    d_out = jnp.transpose(cotangents[0], (0, 2, 1, 3)).astype(jnp.float32)  # (b, h, q, d)
    d_lse = jnp.transpose(cotangents[1], (0, 2, 1)).astype(jnp.float32)  # (b, h, q)
    # d softmax: ds = p * (dp - sum_k p dp) where sum_k p dp = d_out . out (with dropout too), plus d_lse * p
    row_term = jnp.sum(d_out * out, axis=-1) - d_lse
    size, num_full, tail = _blocks(num_keys, block_size)
    q32 = q.astype(jnp.float32)

    def step(carry, start, length, index):
        dq, key_grads = carry
        k_block, v_block, aux = key_block(start, length)
        mask_block = None if mask is None else key_slice(mask, start, length, 3)
        s = _block_scores(q, k_block, mask_block, precision)
        p = jnp.exp(s - row_max[..., None]) / row_sum[..., None]  # exact, also for all-masked rows
        dp = jnp.einsum("bhqd,bkhd->bhqk", d_out, v_block.astype(jnp.float32), precision=precision)
        p_used = p
        if rate > 0.0:
            keep = _keep_mask(rng, index, rate, p.shape)
            p_used = jnp.where(keep, p / (1.0 - rate), 0.0)
            dp = jnp.where(keep, dp / (1.0 - rate), 0.0)
        ds = p * (dp - row_term[..., None])
        if mask_block is not None:
            ds = jnp.where(mask_block, ds, 0.0)  # masked scores are constants: no gradient to q, k
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, k_block.astype(jnp.float32), precision=precision)
        dk_block = jnp.einsum("bhqk,bqhd->bkhd", ds, q32, precision=precision)
        dv_block = jnp.einsum("bhqk,bhqd->bkhd", p_used, d_out, precision=precision)
        return dq, add_key_grads(key_grads, start, length, dk_block, dv_block, aux)

    return _loop_blocks(step, (jnp.zeros(q.shape, jnp.float32), key_grads), size, num_full, tail)


def lse_of(row_max, row_sum):
    """(batch, heads, queries) running max and sum -> log-sum-exp (batch, queries, heads)."""
    return jnp.transpose(row_max + jnp.log(row_sum), (0, 2, 1))


# ----------------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, mask, rng, block_size, rate, precision):
    return _attention_fwd(q, k, v, mask, rng, block_size, rate, precision)[0]


def _slices(k, v):
    return lambda start, length: (key_slice(k, start, length, 1), key_slice(v, start, length, 1))


def _attention_fwd(q, k, v, mask, rng, block_size, rate, precision):
    out, row_max, row_sum = online_softmax_forward(q, k.shape[1], _slices(k, v), mask, rng, block_size, rate,
                                                   precision=precision)
    primal = jnp.transpose(out, (0, 2, 1, 3)), lse_of(row_max, row_sum)
    return primal, (q, k, v, mask, rng, out, row_max, row_sum)


def _attention_bwd(block_size, rate, precision, residuals, cotangents):
    q, k, v, mask, rng, *forward = residuals

    def add_key_grads(grads, start, length, dk_block, dv_block, _):
        dk, dv = grads
        return (jax.lax.dynamic_update_slice_in_dim(dk, dk_block, start, axis=1),
                jax.lax.dynamic_update_slice_in_dim(dv, dv_block, start, axis=1))

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    key_block = lambda start, length: (*_slices(k, v)(start, length), None)  # noqa: E731
    dq, (dk, dv) = online_softmax_backward(q, k.shape[1], key_block, mask, rng, block_size, rate, forward,
                                           cotangents, zeros, add_key_grads, precision)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
