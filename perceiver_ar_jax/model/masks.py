"""Attention masks of Perceiver AR. True means "may attend"; every mask broadcasts to (batch, heads, queries, keys).

Queries and keys are right-aligned: the last query is the last key's token, so query i (of Nq) sees keys
0 .. i + (Nk - Nq). In the hybrid cross-attention the keys are [prefix, latents] and the queries the latents, so
every latent sees the whole prefix and the latents up to itself. Pad tokens (left padding) are masked as keys only.

Decoding keeps keys in ring buffers (`sampling/cache.py`): there a key's place says nothing of its token's order,
so its masks compare token indices (`ring_causal_mask`) and say which slots hold keys of the window
(`visible_keys`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(num_queries: int, num_keys: int) -> jnp.ndarray:
    """(1, 1, num_queries, num_keys) bool: the right-aligned causal mask."""
    query = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
    key = jnp.arange(num_keys)[None, :]
    return (key <= query)[None, None]


def key_pad_mask(pad_mask: jnp.ndarray) -> jnp.ndarray:
    """(batch, keys) bool, True = pad  ->  (batch, 1, 1, keys) bool, True = may attend."""
    return ~pad_mask[:, None, None, :]


def cross_attention_mask(num_latents: int, num_keys: int, pad_mask: jnp.ndarray | None) -> jnp.ndarray:
    """Mask of the hybrid layer: causal over [prefix, latents] keys, and pad keys hidden.

    pad_mask: (batch, num_keys) bool, True = pad, or None. Returns (batch or 1, 1, num_latents, num_keys).
    """
    mask = causal_mask(num_latents, num_keys)
    if pad_mask is not None:
        mask = mask & key_pad_mask(pad_mask)
    return mask


def visible_keys(visible: jnp.ndarray) -> jnp.ndarray:
    """(keys,) or (batch, keys) bool, True = a key every query may see -> (1 or batch, 1, 1, keys)."""
    return visible.reshape((-1, 1, 1, visible.shape[-1]))


def ring_causal_mask(query_index: jnp.ndarray, slot_index: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """A ring cache's causal mask: a query sees the visible slots that hold its own token or an earlier one.

    query_index (queries,) and slot_index (slots,) int: token indices of the queries and of what each slot
    holds; visible (slots,) or (batch, slots) bool. Returns (batch or 1, 1, queries, slots).
    """
    causal = slot_index[None, :] <= query_index[:, None]
    return visible_keys(visible) & causal[None, None]


def uniform_where_no_key(q: jnp.ndarray, mask: jnp.ndarray, fallback: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """perceiver-io's rule for a query that sees no key (a pad latent): it averages uniformly over ALL keys.

    A fully masked row of scores becomes uniform in dense attention too, but over every key it is given; in a
    cache those include bucket pads and stale slots. Here such a row gets a zero query (all scores 0) and sees
    the `fallback` keys (those of the window), which is the same uniform average over the same keys as
    perceiver-io's. q (batch, queries, heads, head_dim); mask (batch, 1, queries, keys); fallback broadcastable to
    the mask. Returns (q, mask).
    """
    sees_a_key = jnp.any(mask, axis=-1, keepdims=True)  # (batch, 1, queries, 1)
    q = jnp.where(jnp.swapaxes(sees_a_key, 1, 2), q, jnp.zeros_like(q))
    return q, jnp.where(sees_a_key, mask, fallback)


def prefix_keep_indices(rng: jax.Array, batch_size: int, prefix_len: int, rate: float) -> jnp.ndarray:
    """Cross-attention dropout: which prefix positions each example keeps, (batch, keep) int32, increasing.

    As perceiver-io, exactly keep = prefix_len - int(prefix_len * rate) positions survive, a uniformly random
    subset per example, kept in their original order (so shapes stay static and causality is unchanged).
    """
    keep = prefix_len - int(prefix_len * rate)
    scores = jax.random.uniform(rng, (batch_size, prefix_len))
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1).astype(jnp.int32)
