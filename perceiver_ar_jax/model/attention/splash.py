"""TPU attention: JAX's Pallas splash-attention kernel with Perceiver AR's masks.

Both attentions of the model are causal with queries and keys right-aligned (query i of Nq sees keys
0 .. i + Nk - Nq) and hide pad keys. Splash expresses that as a static `CausalMask(shape, offset=Nk - Nq)`, which
also lets it skip the key blocks that are causally invisible, and `SegmentIds`: every query has segment 0, a key
has segment 0 if it is a token and 1 if it is padding.

Two things splash does not do the way the dense path does, and how they are handled here:
- A query whose visible keys are all padding (left-padded latents with prefix_len 0) must attend uniformly to ALL
  keys (perceiver-io fills masked scores with the most negative finite float; fixture case `pad_p0_edge`). Splash
  skips causally invisible blocks, so its average would cover only part of the keys. Those rows are found from the
  pad mask and replaced by the mean of all values (a `jnp.where`, so their gradient is that of the mean, as dense).
- Lengths must be multiples of the block sizes (128 lanes at least): queries and keys are padded at the end. Padded
  keys lie beyond every real query's causal horizon, so they are never seen; padded query rows are dropped.

Splash has no dropout on the probabilities; `dispatch.py` picks the blockwise XLA path when that dropout is active.
On a backend other than TPU the kernel runs in Pallas interpret mode (`interpret=True`), which is how the tests
check it on CPU; that is exact but slow, for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from perceiver_ar_jax.model.attention.dense import MASKED_SCORE

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
        mask_value=MASKED_SCORE, interpret=interpret)

    def to_heads_major(x, length):  # (b, n, h, d) -> (b, h, length, d), zero-padded at the end
        return jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, 0)))

    pad = jnp.zeros((batch, num_keys), bool) if key_pad is None else key_pad
    kv_segments = jnp.pad(pad.astype(jnp.int32), ((0, 0), (0, padded_k - num_keys)), constant_values=1)
    segments = splash.SegmentIds(q=jnp.zeros((batch, padded_q), jnp.int32), kv=kv_segments)
    out = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=s_))(
        to_heads_major(q, padded_q), to_heads_major(k, padded_k), to_heads_major(v, padded_k), segments)
    out = jnp.transpose(out[:, :, :num_queries], (0, 2, 1, 3)).astype(v.dtype)  # (b, q, h, d)

    if key_pad is None:
        return out  # every query sees at least key 0
    # a query sees keys 0 .. i + offset; it has no visible key when all of them are padding
    visible_tokens = jnp.cumsum(~key_pad, axis=1)[:, num_keys - num_queries:] if causal else jnp.sum(
        ~key_pad, axis=1, keepdims=True)
    all_masked = (visible_tokens == 0)[:, :, None, None]  # (b, q or 1, 1, 1)
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1, keepdims=True).astype(v.dtype)  # uniform over ALL keys
    return jnp.where(all_masked, mean_v, out)


def splash_attention_from_mask(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    block_size: int = 512,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """`splash_attention` behind `dense_attention`'s contract, for the masks this model builds.

    mask: bool (batch or 1, 1, queries, keys), True = may attend, which must be `masks.causal_mask` or
    `masks.cross_attention_mask` (right-aligned causal AND key padding), or None (no mask at all). The key
    padding is read off the last query row, which the causal part lets see every key.
    """
    if mask is None:
        return splash_attention(q, k, v, None, causal=False, block_size=block_size, interpret=interpret)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] not in (1, q.shape[1]) or mask.shape[3] != k.shape[1]:
        raise ValueError(f"splash attention takes a (batch, 1, queries, keys) causal/padding mask, got shape "
                         f"{mask.shape} for {q.shape[1]} queries and {k.shape[1]} keys")
    key_pad = jnp.broadcast_to(~mask[:, 0, -1, :], (q.shape[0], k.shape[1]))
    return splash_attention(q, k, v, key_pad, causal=True, block_size=block_size, interpret=interpret)


def _round_up(n: int, multiple: int) -> int:
    return int(np.ceil(n / multiple)) * multiple
