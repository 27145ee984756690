"""The hybrid layer's attention to a long prefix, with kv_norm and the key/value projection inside the block loop.

In the hybrid layer the keys and values of the prefix are `kv_norm(x_prefix) @ W_k` (rotated) and `@ W_v`. Computed
the plain way, the normalised prefix, the keys, the values, the rotated keys and the gradients of each are
(batch, prefix, channels)-sized tensors alive at the same time: the largest activations of a long-context step
(1 GB each for 4 x 128k tokens x 512 channels in float32). Here none of them is materialised: when the online
softmax reaches a key block, the block's slice of the raw prefix is normalised and projected (`project`) and its
keys rotated, and the backward pass recomputes that per block and pulls the block's key/value gradients back
through it (`jax.vjp` of `project`; the rotation's transpose is the opposite rotation), writing d(prefix) block by
block and summing the parameter gradients. What the layer
keeps for the backward pass is the raw prefix; the price is one more normalisation and projection of the prefix in
the backward pass. (It also keeps the CPU compiler from transposing prefix-sized gradients for the weight-gradient
matmuls, which it does slowly.)

The latents are keys too ([prefix, latents], causal among the latents); their part is an ordinary blockwise
attention, merged with the prefix part by log-sum-exp (`combine_with_latents`). A query with no visible key at all
attends uniformly to every key in the dense path; a merged log-sum-exp cannot express that (the log of the key
count is below float32 resolution next to the masked score), so such rows are set to the mean of all values, for
which the forward loop also sums the prefix values. context_parallel.py shards the prefix part over a mesh axis.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model.attention.blockwise import (
    blockwise_attention_with_lse,
    check_attention_args,
    key_slice,
    lse_of,
    mask_4d,
    merge_partial_attention,
    online_softmax_backward,
    online_softmax_forward,
)
from perceiver_ar_jax.model.positions import apply_rotary

# project(params, x_block (batch, block, channels)) -> keys, values (batch, block, heads, head_dim), keys not rotated
ProjectFn = Callable[[Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


class PrefixAttention(NamedTuple):
    """Attention of the latent queries to the prefix keys alone, and what merging it with the latent keys needs.

    out (batch, latents, heads, head_dim) float32; lse (batch, latents, heads) float32; visible (batch or 1,
    heads or 1, latents) bool, whether a query sees any prefix key (None without a mask); value_sum (batch, heads,
    head_dim) float32, the sum of the values of all prefix keys.
    """

    out: jnp.ndarray
    lse: jnp.ndarray
    visible: jnp.ndarray | None
    value_sum: jnp.ndarray


def make_projection(norm: nn.Module | None, dtype: Any, precision: jax.lax.Precision | None = None) -> ProjectFn:
    """The hybrid layer's prefix keys and values before rotation: (norm) -> x @ k_kernel, x @ v_kernel.

    params: {"k_kernel", "v_kernel": (channels, heads, head_dim), and "norm": the LayerNorm's params if norm is
    given}. norm: an unbound LayerNorm (the model's kv_norm, `.clone(parent=None)`), so the maths is the module's
    own; dtype: the compute dtype of the projection; precision: of its products.
    """

    def project(params, x):
        if norm is not None:
            x = norm.apply({"params": params["norm"]}, x)
        x = x.astype(dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))  # (batch, keys, channels) x (channels, heads, head_dim)
        return (backend.dot_general(x, params["k_kernel"].astype(dtype), dims, precision=precision),
                backend.dot_general(x, params["v_kernel"].astype(dtype), dims, precision=precision))

    return project


def prefix_attention(
    q: jnp.ndarray,
    x_prefix: jnp.ndarray,
    project: ProjectFn,
    params: Any,
    prefix_angles: jnp.ndarray | None,
    mask: jnp.ndarray | None,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> PrefixAttention:
    """Attend from q to the keys and values that `project` makes from x_prefix, block by block.

    q: (batch, latents, heads, head_dim), scaled and rotated; x_prefix: (batch, prefix, channels); project, params:
    see `make_projection`; prefix_angles: (batch, prefix, rotated) rotary angles the keys are rotated by, or None;
    mask: bool
    broadcastable to (batch, heads, latents, prefix), True = may attend, or None. Dropout as in
    `blockwise_attention`; precision: of the attention's products. Gradients flow to q, x_prefix and params.
    """
    key_shape = jax.ShapeDtypeStruct(x_prefix.shape[:2] + q.shape[2:], q.dtype)
    check_attention_args(q, key_shape, key_shape, mask, block_size, dropout_rate, dropout_rng)
    mask = mask_4d(mask)
    out, lse, value_sum = _attention(q, x_prefix, params, prefix_angles, mask, dropout_rng, project, block_size,
                                     float(dropout_rate), precision)
    return PrefixAttention(out, lse, None if mask is None else jnp.any(mask, axis=-1), value_sum)


def combine_with_latents(
    prefix: PrefixAttention,
    q: jnp.ndarray,
    k_latent: jnp.ndarray,
    v_latent: jnp.ndarray,
    mask_latent: jnp.ndarray | None,
    prefix_len: int,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> jnp.ndarray:
    """Attention of q to [prefix, latents] from the prefix part and the latent keys.

    k_latent, v_latent: (batch, latents, heads, head_dim), k rotated; mask_latent: the latent columns of the mask;
    prefix_len: the number of real prefix keys (for the uniform average of all-masked rows).
    Returns (batch, latents, heads, head_dim) float32.
    """
    latent = blockwise_attention_with_lse(q, k_latent, v_latent, mask_latent, block_size, dropout_rate, dropout_rng,
                                          precision)
    out, _ = merge_partial_attention([(prefix.out, prefix.lse), latent])
    if prefix.visible is None and mask_latent is None:
        return out
    visible = [m for m in (prefix.visible, None if mask_latent is None else jnp.any(mask_latent, axis=-1))
               if m is not None]
    visible = visible[0] if len(visible) == 1 else visible[0] | visible[1]  # (batch or 1, heads or 1, latents)
    num_keys = prefix_len + k_latent.shape[1]
    mean_v = (prefix.value_sum + jnp.sum(v_latent.astype(jnp.float32), axis=1)) / num_keys  # (b, h, d)
    return jnp.where(jnp.transpose(visible, (0, 2, 1))[..., None], out, mean_v[:, None])


# ----------------------------------------------------------------------------------------------------------------
def _key_blocks(project, params, x, angles):
    """key_block(start, length) -> rotated keys and values of prefix positions start .. start + length."""

    def key_block(start, length):
        k, v = project(params, key_slice(x, start, length, 1))
        return _rotate(k, angles, start, length), v

    return key_block


def _rotate(k, angles, start, length, sign=1.0):
    return k if angles is None else apply_rotary(k, sign * key_slice(angles, start, length, 1))


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, x, params, angles, mask, rng, project, block_size, rate, precision):
    return _attention_fwd(q, x, params, angles, mask, rng, project, block_size, rate, precision)[0]


def _attention_fwd(q, x, params, angles, mask, rng, project, block_size, rate, precision):
    out, row_max, row_sum, value_sum = online_softmax_forward(
        q, x.shape[1], _key_blocks(project, params, x, angles), mask, rng, block_size, rate, sum_values=True,
        precision=precision)
    primal = jnp.transpose(out, (0, 2, 1, 3)), lse_of(row_max, row_sum), value_sum
    return primal, (q, x, params, angles, mask, rng, out, row_max, row_sum)


def _attention_bwd(project, block_size, rate, precision, residuals, cotangents):
    q, x, params, angles, mask, rng, *forward = residuals
    d_out, d_lse, d_value_sum = cotangents
    d_value_sum = d_value_sum.astype(jnp.float32)[:, None]  # every value adds to the sum: (b, 1, h, d)

    def key_block(start, length):  # the block's keys and values, with the pullback of their projection
        (k, v), pullback = jax.vjp(project, params, key_slice(x, start, length, 1))
        return _rotate(k, angles, start, length), v, (pullback, k.dtype)

    def add_key_grads(grads, start, length, dk_block, dv_block, aux):
        dx, d_params = grads
        pullback, dtype = aux
        # the rotation is orthogonal: its transpose rotates by the opposite angles
        d_kv = (_rotate(dk_block, angles, start, length, -1.0).astype(dtype), (dv_block + d_value_sum).astype(dtype))
        d_block_params, dx_block = pullback(d_kv)
        return (jax.lax.dynamic_update_slice_in_dim(dx, dx_block.astype(dx.dtype), start, axis=1),
                jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_params, d_block_params))

    zeros = (jnp.zeros(x.shape, x.dtype), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    dq, (dx, d_params) = online_softmax_backward(q, x.shape[1], key_block, mask, rng, block_size, rate, forward,
                                                 (d_out, d_lse), zeros, add_key_grads, precision)
    d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, params)
    # rotary angles come from integer positions: no gradient
    d_angles = None if angles is None else jnp.zeros_like(angles)
    return dq.astype(q.dtype), dx, d_params, d_angles, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)
