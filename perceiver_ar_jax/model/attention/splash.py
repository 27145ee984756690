"""TPU attention: JAX's Pallas splash-attention kernel with Perceiver AR's masks.

Both attentions of the model are causal with queries and keys right-aligned (query i of Nq sees keys
0 .. i + Nk - Nq) and hide pad keys. Splash expresses that as a static `CausalMask(shape, offset=Nk - Nq)`, which
also lets it skip the key blocks that are causally invisible, and `SegmentIds`: every query has segment 0, a key
has segment 0 if it is a token and 1 if it is padding.

The mask comes as an `AttentionMask` (`model/masks.py`), the form of a full forward pass's masks; decoding's
ring-buffer masks are bool arrays and never reach the kernel (`dispatch.py`).

Two things splash does not do the way the dense path does, and how they are handled here:
- A query whose visible keys are all padding (left-padded latents with prefix_len 0) must attend uniformly to ALL
  keys (perceiver-io fills masked scores with the most negative finite float; fixture case `pad_p0_edge`). Splash
  skips causally invisible blocks, so its average would cover only part of the keys. Those rows are found from the
  pad mask and replaced by the mean of all values (`dense.uniform_where_no_visible_key`).
- Lengths must be multiples of the block sizes (128 lanes at least): queries and keys are padded at the end. Padded
  keys lie beyond every real query's causal horizon (or are segment-masked), so they are never seen; padded query
  rows are dropped.

Under a mesh the kernel runs inside `jax.shard_map` (`sharding.kernel_shard_map`): rows over the mesh axes of the
logical axis `batch`, heads over those of `heads`, so each device runs the kernel on its own rows and heads; XLA's
partitioner cannot split the Pallas call itself.

Splash has no dropout on the probabilities; `dispatch.py` picks the blockwise XLA path when that dropout is active.
On a backend other than TPU the kernel runs in Pallas interpret mode (`interpret=True`), which is how the tests
check it on CPU; that is exact but slow, for tests only.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from perceiver_ar_jax.model.attention.dense import MASKED_SCORE, uniform_where_no_visible_key
from perceiver_ar_jax.model.masks import AttentionMask
from perceiver_ar_jax.model.sharding import kernel_shard_map

LANES = 128  # TPU vector lane count: splash block sizes must be multiples of it


def splash_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    key_pad: jnp.ndarray | None,
    causal: bool = True,
    block_size: int = 512,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """Right-aligned causal attention with key padding, by the splash kernel.

    q: (batch, queries, heads, head_dim), already scaled and rotated; k, v: (batch, keys, heads, head_dim) with
    keys >= queries when causal; key_pad: (batch, keys) bool, True = padding, or None; block_size: key block
    length (rounded up to a multiple of 128); interpret: run the kernel in Pallas interpret mode (default: when
    the backend is not TPU). Returns (batch, queries, heads, head_dim) in v's dtype.
    """
    out = _kernel_call(q, k, v, key_pad, causal, block_size, interpret)
    return uniform_where_no_visible_key(out.astype(v.dtype), v,
                                        AttentionMask(q.shape[1], k.shape[1], causal, key_pad))


def splash_attention_with_lse(q, k, v, key_pad, causal: bool = True, block_size: int = 512,
                              interpret: bool | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`splash_attention` without the uniform rows, also giving each query's log-sum-exp, both differentiable, so
    that parts over disjoint keys can be merged (`blockwise.merge_partial_attention`; context parallelism).

    Returns out (batch, queries, heads, head_dim) float32 and lse (batch, queries, heads) float32. The kernel gives
    its log-sum-exp (`save_residuals`) without a gradient, so the backward pass adds the log-sum-exp's own: with
    d lse_i / d s_ij = p_ij, that is dq_i += d_lse_i sum_j p_ij k_j (the kernel's attention with the keys as values)
    and dk_j += sum_i p_ij d_lse_i q_i (that attention's value gradient for the cotangent d_lse q): one more
    kernel call forward and backward.
    """
    return _with_lse(q, k, v, key_pad, causal, block_size, interpret)


def _kernel_call(q, k, v, key_pad, causal, block_size, interpret, save_residuals=False):
    """The kernel on (batch, length, heads, head_dim) arrays: out (batch, queries, heads, head_dim) [and lse
    (batch, queries, heads) float32 when save_residuals], rows without a visible key as the kernel leaves them."""
    batch, num_queries, num_heads, _ = q.shape
    num_keys = k.shape[1]
    if causal and num_keys < num_queries:
        raise ValueError(f"causal splash attention needs keys >= queries, got {num_keys} keys, {num_queries} queries")
    if key_pad is not None and key_pad.shape != (batch, num_keys):
        raise ValueError(f"key_pad shape {key_pad.shape} is not (batch, keys) = {(batch, num_keys)}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"

    block_q = min(_round_up(num_queries, LANES), 512)
    block_kv = min(_round_up(num_keys, LANES), _round_up(block_size, LANES))
    padded_q, padded_k = _round_up(num_queries, block_q), _round_up(num_keys, block_kv)
    shape = (padded_q, padded_k)
    if causal:
        head_mask = splash_mask.CausalMask(shape, offset=num_keys - num_queries)
    else:
        head_mask = splash_mask.FullMask(shape)
    sizes = splash.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([head_mask] * num_heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        mask_value=MASKED_SCORE, interpret=interpret, save_residuals=save_residuals)

    def to_heads_major(x, length):  # (b, n, h, d) -> (b, h, length, d), zero-padded at the end
        return jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))

    pad = jnp.zeros((batch, num_keys), bool) if key_pad is None else key_pad
    kv_segments = jnp.pad(pad.astype(jnp.int32), ((0, 0), (0, padded_k - num_keys)), constant_values=1)
    segments = splash.SegmentIds(q=jnp.zeros((batch, padded_q), jnp.int32), kv=kv_segments)
    result = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_))(
        to_heads_major(q, padded_q), to_heads_major(k, padded_k), to_heads_major(v, padded_k), segments)
    out, lse = result if save_residuals else (result, None)
    out = jnp.transpose(out[:, :, :num_queries], (0, 2, 1, 3))  # (b, q, h, d)
    if not save_residuals:
        return out
    return out, jnp.transpose(lse[0][:, :, :num_queries], (0, 2, 1)).astype(jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _with_lse(q, k, v, key_pad, causal, block_size, interpret):
    out, lse = _kernel_call(q, k, v, key_pad, causal, block_size, interpret, save_residuals=True)
    return out.astype(jnp.float32), lse


def _with_lse_fwd(q, k, v, key_pad, causal, block_size, interpret):
    return _with_lse(q, k, v, key_pad, causal, block_size, interpret), (q, k, v, key_pad)


def _with_lse_bwd(causal, block_size, interpret, residuals, cotangents):
    q, k, v, key_pad = residuals
    d_out, d_lse = cotangents
    attention = lambda q, k, v: _kernel_call(q, k, v, key_pad, causal, block_size, interpret)  # noqa: E731
    _, pullback = jax.vjp(attention, q, k, v)
    dq, dk, dv = pullback(d_out.astype(q.dtype))
    keys_as_values, pullback = jax.vjp(lambda values: attention(q, k, values), k)
    d_lse = d_lse.astype(jnp.float32)[..., None]  # (b, q, h, 1)
    (dk_lse,) = pullback((d_lse * q.astype(jnp.float32)).astype(q.dtype))
    dq = dq.astype(jnp.float32) + d_lse * keys_as_values.astype(jnp.float32)
    pad_grad = None if key_pad is None else np.zeros(key_pad.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), (dk.astype(jnp.float32) + dk_lse.astype(jnp.float32)).astype(k.dtype), dv, pad_grad


_with_lse.defvjp(_with_lse_fwd, _with_lse_bwd)


def splash_attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: AttentionMask | None,
    block_size: int = 512,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """`splash_attention` for an `AttentionMask` (or None: no mask), on each device's rows and heads under a mesh.

    q: (batch, queries, heads, head_dim), scaled and rotated; k, v: (batch, keys, heads, head_dim). Returns
    (batch, queries, heads, head_dim) in v's dtype.
    """
    if mask is not None and (mask.num_queries, mask.num_keys) != (q.shape[1], k.shape[1]):
        raise ValueError(f"mask of {mask.num_queries} queries x {mask.num_keys} keys for {q.shape[1]} queries and "
                         f"{k.shape[1]} keys")
    causal = mask is not None and mask.causal

    def kernel(q, k, v, key_pad):
        return splash_attention(q, k, v, key_pad, causal=causal, block_size=block_size, interpret=interpret)

    return kernel_shard_map(kernel, q, k, v, None if mask is None else mask.key_pad)


def _round_up(n: int, multiple: int) -> int:
    return int(np.ceil(n / multiple)) * multiple
